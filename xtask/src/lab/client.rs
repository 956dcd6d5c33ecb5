//! Requests and traffic from the client namespace.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use super::http::{HttpConn, UdpCheck};
use super::system::in_netns;
use super::traffic::{TrafficHandle, TrafficOptions};
use super::{Lab, NETNS_DIR, http, traffic};

impl Lab {
    /// HTTP `GET /` to `target` from the client namespace over a socket bound to `client`
    /// (which must be one of [`Lab::client_addrs`] or 10.200.1.2). Returns the body of a
    /// `200` answer; anything else, or no full answer within `timeout`, is an error.
    pub fn http_get(
        &self,
        client: Ipv4Addr,
        target: SocketAddrV4,
        timeout: Duration,
    ) -> Result<String> {
        self.http_get_path(client, target, "/", timeout)
    }

    /// [`Lab::http_get`] for another path (e.g. `/healthz`).
    pub fn http_get_path(
        &self,
        client: Ipv4Addr,
        target: SocketAddrV4,
        path: &str,
        timeout: Duration,
    ) -> Result<String> {
        in_netns(self.ns_client(), || {
            http::http_get_here(client, target, path, timeout)
        })?
        .with_context(|| {
            format!(
                "GET http://{target}{path} from {client} in {}",
                self.ns_client()
            )
        })
    }

    /// Opens a persistent HTTP/1.1 connection from `client` (in the client namespace) to
    /// `target`; its requests ([`HttpConn::get`]) can be sent from any thread, e.g. before and
    /// after a daemon restart.
    pub fn http_connect(
        &self,
        client: Ipv4Addr,
        target: SocketAddrV4,
        timeout: Duration,
    ) -> Result<HttpConn> {
        in_netns(self.ns_client(), || {
            HttpConn::connect_here(client, target, timeout)
        })?
        .with_context(|| {
            format!(
                "connecting to {target} from {client} in {}",
                self.ns_client()
            )
        })
    }

    /// Sends one UDP datagram to `target` from `client` (in the client namespace) and returns
    /// the first reply's body and source address; no reply within `timeout` is an error.
    pub fn udp_query(
        &self,
        client: Ipv4Addr,
        target: SocketAddrV4,
        timeout: Duration,
    ) -> Result<(String, SocketAddr)> {
        in_netns(self.ns_client(), || {
            http::udp_query_here(client, target, timeout)
        })?
        .with_context(|| {
            format!(
                "UDP query to {target} from {client} in {}",
                self.ns_client()
            )
        })
    }

    /// HTTP `GET <path>` to `target` from `client` (IPv4 or IPv6, one of the client
    /// namespace's addresses); the body of a `200` answer. The backends answer `GET
    /// /bytes/<n>` with a body of `n` bytes: their name line, then filler.
    pub fn http_get_from(
        &self,
        client: IpAddr,
        target: SocketAddr,
        path: &str,
        timeout: Duration,
    ) -> Result<String> {
        in_netns(self.ns_client(), || {
            http::http_get_any(client, target, path, timeout)
        })?
        .with_context(|| {
            format!(
                "GET http://{target}{path} from {client} in {}",
                self.ns_client()
            )
        })
    }

    /// [`Lab::udp_query`] for either family.
    pub fn udp_query_from(
        &self,
        client: IpAddr,
        target: SocketAddr,
        timeout: Duration,
    ) -> Result<(String, SocketAddr)> {
        in_netns(self.ns_client(), || {
            http::udp_query_any(client, target, timeout)
        })?
        .with_context(|| {
            format!(
                "UDP query to {target} from {client} in {}",
                self.ns_client()
            )
        })
    }

    /// Sends one UDP datagram of exactly `size` bytes (at least 32) from `client` to `target`
    /// and checks the reply: the backend must have received the datagram whole (it answers with
    /// the length and FNV-1a hash of what it got, which must match what was sent) and its reply
    /// of `reply_size` bytes (its name line, then a filler pattern) must arrive whole too.
    /// Datagrams larger than the path MTU are fragmented by the sender's kernel, in both
    /// directions. No (complete, correct) reply within `timeout` is an error.
    pub fn udp_check(
        &self,
        client: IpAddr,
        target: SocketAddr,
        size: usize,
        reply_size: usize,
        timeout: Duration,
    ) -> Result<UdpCheck> {
        in_netns(self.ns_client(), || {
            http::udp_check_here(client, target, size, reply_size, timeout)
        })?
        .with_context(|| {
            format!(
                "UDP check ({size} bytes, {reply_size} back) to {target} from {client} in {}",
                self.ns_client()
            )
        })
    }

    /// Continuous traffic from the client namespace: per client, one new HTTP connection
    /// (`GET /`) after another, `pause` apart, until [`TrafficHandle::stop`]. Every request
    /// becomes a [`Record`](super::Record); see [`summarize`](super::summarize).
    pub fn spawn_traffic(
        &self,
        clients: Vec<Ipv4Addr>,
        target: SocketAddrV4,
        pause: Duration,
    ) -> Result<TrafficHandle> {
        self.spawn_traffic_with(clients, target, TrafficOptions::new(pause))
    }

    /// [`Lab::spawn_traffic`] over one persistent connection per client: proof that an
    /// established connection survives (the [`Record::conn`](super::Record::conn) of a client
    /// never changes).
    pub fn spawn_keepalive_traffic(
        &self,
        clients: Vec<Ipv4Addr>,
        target: SocketAddrV4,
        pause: Duration,
    ) -> Result<TrafficHandle> {
        self.spawn_traffic_with(clients, target, TrafficOptions::new(pause).keep_alive())
    }

    /// Continuous traffic as `options` say.
    pub fn spawn_traffic_with(
        &self,
        clients: Vec<Ipv4Addr>,
        target: SocketAddrV4,
        options: TrafficOptions,
    ) -> Result<TrafficHandle> {
        let path = Path::new(NETNS_DIR).join(self.ns_client());
        let netns = File::open(&path)
            .with_context(|| format!("opening network namespace {}", path.display()))?;
        traffic::spawn(&netns, self.ns_client(), clients, target, options)
    }
}
