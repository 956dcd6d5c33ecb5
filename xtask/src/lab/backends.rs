//! The backend servers: started, stopped and added while the lab runs, and their counters.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use super::http::{Counters, SERVER_POLL, ServerCtx};
use super::system::{in_netns, ip, wait_links_running};
use super::{Lab, MAX_BACKENDS, VIP, http};

/// What one backend's servers have answered so far (over all its stops and starts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// HTTP requests other than `/healthz`.
    pub http: u64,
    /// HTTP requests for `/healthz` (the balancer's health checks).
    pub healthz: u64,
    /// UDP datagrams answered.
    pub udp: u64,
    /// TCP connections accepted by the HTTP server.
    pub connections: u64,
}

/// One backend: its namespace, counters, health flag and (while running) its server threads.
pub(super) struct Backend {
    pub(super) ns: String,
    pub(super) counters: Arc<Counters>,
    pub(super) healthy: Arc<AtomicBool>,
    pub(super) servers: Option<Servers>,
}

/// One generation of a backend's servers (HTTP and UDP threads with their stop flag).
pub(super) struct Servers {
    pub(super) stop: Arc<AtomicBool>,
    pub(super) threads: Vec<JoinHandle<()>>,
}

impl Servers {
    /// Stops the threads and waits for them: the listeners are closed when this returns. The
    /// threads look at the flag every [`SERVER_POLL`], so this takes about that long.
    pub(super) fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

impl Lab {
    fn backend(&self, i: u32) -> Result<&Backend> {
        (i as usize)
            .checked_sub(1)
            .and_then(|k| self.backends.get(k))
            .with_context(|| {
                format!(
                    "lab {} has backends 1..={}, not {i}",
                    self.prefix,
                    self.backends.len()
                )
            })
    }

    /// Starts backend `i`'s HTTP (:8080) and UDP (:5353) servers again after
    /// [`Lab::stop_backend`], on the same addresses (the lab starts every backend itself;
    /// starting a running backend does nothing). Its counters and health flag carry on. With
    /// IPv6 the servers listen on `[::]` too; in the DSR topology they serve :80 and :53, and a
    /// second UDP socket bound to the VIP answers datagrams to the VIP from the VIP.
    pub fn start_backend(&mut self, i: u32) -> Result<()> {
        let backend = self.backend(i)?;
        if backend.servers.is_some() {
            return Ok(());
        }
        let ns = backend.ns.clone();
        let (http_port, udp_port) = self.options.backend_ports();
        let v6 = self.options.ipv6.is_some();
        let dsr = self.options.dsr;
        let (tcps, udps) = in_netns(&ns, || -> Result<(Vec<TcpListener>, Vec<UdpSocket>)> {
            // std sets SO_REUSEADDR on listeners: connections of the previous generation that
            // are still open or in TIME_WAIT do not block the bind.
            let tcp = TcpListener::bind((Ipv4Addr::UNSPECIFIED, http_port))
                .with_context(|| format!("binding TCP 0.0.0.0:{http_port}"))?;
            let mut tcps = vec![tcp];
            let mut udps = Vec::new();
            if dsr {
                // The wildcard socket answers the balancer's own traffic; the VIP socket
                // (preferred by the kernel for datagrams to the VIP) answers clients from the
                // VIP, as DSR needs.
                udps.push(http::udp_bind_shared(SocketAddr::from((
                    Ipv4Addr::UNSPECIFIED,
                    udp_port,
                )))?);
                udps.push(http::udp_bind_shared(SocketAddr::from((VIP, udp_port)))?);
            } else {
                udps.push(
                    UdpSocket::bind((Ipv4Addr::UNSPECIFIED, udp_port))
                        .with_context(|| format!("binding UDP 0.0.0.0:{udp_port}"))?,
                );
            }
            if v6 {
                tcps.push(http::tcp_listen_v6only(http_port)?);
                udps.push(http::udp_bind_v6only(udp_port)?);
            }
            for tcp in &tcps {
                tcp.set_nonblocking(true)
                    .context("making the HTTP listener non-blocking")?;
            }
            for udp in &udps {
                udp.set_read_timeout(Some(SERVER_POLL))
                    .context("setting the UDP read timeout")?;
            }
            Ok((tcps, udps))
        })?
        .with_context(|| format!("starting the servers of backend {i} in {ns}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = Arc::new(ServerCtx {
            body: format!("backend-{i}\n"),
            counters: backend.counters.clone(),
            healthy: backend.healthy.clone(),
            stop: stop.clone(),
        });
        let mut servers = Servers {
            stop,
            threads: Vec::new(),
        };
        let mut spawned = Ok(());
        for (k, tcp) in tcps.into_iter().enumerate() {
            let c = ctx.clone();
            let name = format!(
                "{ns}-http{}",
                if k == 0 { String::new() } else { k.to_string() }
            );
            match thread::Builder::new()
                .name(name)
                .spawn(move || http::serve_http(tcp, c))
                .context("spawning the HTTP server thread")
            {
                Ok(t) => servers.threads.push(t),
                Err(e) => {
                    spawned = Err(e);
                    break;
                }
            }
        }
        if spawned.is_ok() {
            for (k, udp) in udps.into_iter().enumerate() {
                let c = ctx.clone();
                let name = format!(
                    "{ns}-udp{}",
                    if k == 0 { String::new() } else { k.to_string() }
                );
                match thread::Builder::new()
                    .name(name)
                    .spawn(move || http::serve_udp(udp, c))
                    .context("spawning the UDP server thread")
                {
                    Ok(t) => servers.threads.push(t),
                    Err(e) => {
                        spawned = Err(e);
                        break;
                    }
                }
            }
        }
        if let Err(e) = spawned {
            servers.stop();
            return Err(e);
        }
        self.backends[i as usize - 1].servers = Some(servers);
        Ok(())
    }

    /// Stops backend `i`'s servers: when this returns its HTTP and UDP sockets are closed, so
    /// new connections are refused (RST) and datagrams answered with ICMP port unreachable, and
    /// `/healthz` fails with them. A request already being answered is finished; open
    /// persistent connections are closed after that (at once when idle). Stopping a stopped
    /// backend does nothing.
    pub fn stop_backend(&mut self, i: u32) -> Result<()> {
        self.backend(i)?;
        if let Some(servers) = self.backends[i as usize - 1].servers.take() {
            servers.stop();
        }
        Ok(())
    }

    /// Whether backend `i`'s servers run (false after [`Lab::stop_backend`]).
    pub fn backend_running(&self, i: u32) -> bool {
        self.backend(i).is_ok_and(|b| b.servers.is_some())
    }

    /// Makes backend `i`'s `/healthz` answer `503` (`false`) or `200` (`true`, the default)
    /// while everything else it serves stays as it is: a failing health check without a dead
    /// backend.
    pub fn set_backend_healthy(&self, i: u32, healthy: bool) -> Result<()> {
        self.backend(i)?.healthy.store(healthy, Ordering::Relaxed);
        Ok(())
    }

    /// Adds backend N+1 to a running lab: namespace `<p>-b<N+1>`, veth `eth<N+1>` in the
    /// balancer namespace with 10.200.(10+N+1).1/24, its servers. Returns its number. The config
    /// file is not touched: write it (e.g. [`Lab::rewrite_config`]) and reload when the test
    /// wants lb to know. A running lb has no XDP program on the new interface, so in NAT mode
    /// replies from the new backend are translated only once lb attaches there too; a lab
    /// started with spare backends (see [`LabOptions::backends`](super::LabOptions::backends))
    /// avoids that.
    ///
    /// In the DSR topology the new backend is port `b<N+1>` of the switch instead, and the
    /// balancer gets no new interface.
    pub fn add_backend(&mut self) -> Result<u32> {
        let i = self.spec.backends + 1;
        ensure!(
            i <= MAX_BACKENDS,
            "lab {} already has {MAX_BACKENDS} backends",
            self.prefix
        );
        let added = (|| -> Result<()> {
            self.wire_backend(i)?;
            wait_links_running(&self.ns_backend(i), Duration::from_secs(5))?;
            wait_links_running(&self.ns_lb, Duration::from_secs(5))?;
            if let Some(sw) = &self.ns_switch {
                wait_links_running(sw, Duration::from_secs(5))?;
            }
            self.spec.backends = i;
            self.start_backend(i)
        })();
        if let Err(e) = added {
            // Undo: deleting the namespace deletes the veth pair with it.
            let ns = self.ns_backend(i);
            if self.namespaces.last() == Some(&ns) {
                let _ = ip(&["netns", "del", &ns]);
                self.namespaces.pop();
            }
            if self.backends.len() == i as usize
                && let Some(servers) = self.backends.pop().and_then(|b| b.servers)
            {
                servers.stop();
            }
            self.spec.backends = i - 1;
            return Err(e.context(format!("adding backend {i} to lab {}", self.prefix)));
        }
        Ok(i)
    }

    /// Requests and datagrams backend `i` (1-based) has answered so far.
    pub fn backend_stats(&self, i: u32) -> BackendStats {
        self.backend(i)
            .map(|b| {
                let c = &b.counters;
                BackendStats {
                    http: c.http.load(Ordering::Relaxed),
                    healthz: c.healthz.load(Ordering::Relaxed),
                    udp: c.udp.load(Ordering::Relaxed),
                    connections: c.connections.load(Ordering::Relaxed),
                }
            })
            .unwrap_or_default()
    }
}
