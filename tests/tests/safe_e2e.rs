//! "Safe stickiness" end to end: established TCP connections stay on their backend through pin
//! expiry, `max_age`, pin eviction and table changes; strangers' packets write no state that
//! outlives them (a spoofed SYN flood pins and evicts nothing, a UDP flood is held by the new-pin
//! guard); a backend's address arriving from the client side is never relayed as the VIP.
//!
//! Run as root, one test at a time (`--test-threads=1`), with the real `lb` binary (`LB_BIN`,
//! else `<workspace>/target/release/lb`) in the namespace lab (`xtask::lab`). Spoofed frames are
//! written with a raw `AF_PACKET` socket on the client namespace's `eth0` and never leave the
//! lab's namespaces (they have no link to anywhere else); every namespace is removed when the
//! [`Lab`] is dropped, also when a test fails.
//!
//! Like `control.rs`, the tests know where a client without a pin lands (a fixed
//! `datapath.hash_seed` and lb's own Maglev builder), so they choose clients whose old
//! connection would move (and be reset by the new backend) if anything but its connection entry
//! decided; each test first checks that lb agrees with that model.

use std::collections::BTreeMap;
use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::PathBuf;
use std::process::Output;
use std::thread;
use std::time::{Duration, Instant};

use lb::api::AffinityList;
use lb::maglev::{self, MaglevBackend};
use tests::{Pkt, lb_bin};
use xtask::lab::{
    self, BACKEND_HTTP_PORT, HttpConn, Lab, LabOptions, LabSpec, VIP_HTTP_PORT, VIP_UDP_PORT,
    output_timeout,
};

/// One request made by a test.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// `datapath.hash_seed` of every lab here.
const HASH_SEED: u32 = 0x5afe_5eed;
/// The lab's `datapath.maglev_table_size`.
const MAGLEV_M: u32 = 65537;
/// lb's default backend weight (the lab writes none).
const DEFAULT_WEIGHT: u32 = 100;
/// The client namespace's own address: warm-up only, never a measured client.
const PROBE: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
/// Held keep-alive connections per test (one per client address).
const HELD: usize = 40;
/// Spoofed sources are drawn from 100.64.0.0/10: no lab address, no martian.
const SPOOF_BASE: u32 = 0x6440_0000;
const SPOOF_MASK: u32 = 0x003f_ffff;
/// Frames a flood writes before it lets the receiving side catch up (see [`Raw::flood`]).
const BURST: usize = 32;

// ---------------------------------------------------------------------------------------------
// The lab with lb running

/// Datapath fields this file sets beyond what the lab renders.
#[derive(Clone, Copy, Debug)]
struct Datapath {
    affinity_entries: u32,
    max_new_pins_per_cpu: Option<u32>,
}

impl Default for Datapath {
    fn default() -> Self {
        Datapath {
            affinity_entries: 65536,
            max_new_pins_per_cpu: None,
        }
    }
}

struct T {
    lab: Lab,
    bin: PathBuf,
    datapath: Datapath,
    web: SocketAddrV4,
    dns: SocketAddrV4,
}

impl T {
    /// A lab of `spec` with `options` (plus the fixed hash seed), its config patched with
    /// `datapath`, lb started and one request through the VIP answered.
    fn start(spec: LabSpec, options: LabOptions, datapath: Datapath) -> T {
        let bin = lb_bin();
        let options = options.with_hash_seed(HASH_SEED);
        let lab = Lab::create_with(spec, options.clone()).unwrap_or_else(|e| panic!("{e:#}"));
        let mut t = T {
            web: SocketAddrV4::new(lab.vip(), VIP_HTTP_PORT),
            dns: SocketAddrV4::new(lab.vip(), VIP_UDP_PORT),
            lab,
            bin,
            datapath,
        };
        t.write_config(&options, &[]);
        let bin = t.bin.clone();
        if let Err(e) = t.lab.start_lb(&bin) {
            panic!("{e:#}");
        }
        t.warm_up();
        t
    }

    /// The lab's config for `options` (and the fixed hash seed) with this test's datapath fields
    /// and the `web` backends' weights `(lab number, weight)`.
    fn config(&self, options: &LabOptions, weights: &[(u32, u32)]) -> String {
        let options = options.clone().with_hash_seed(HASH_SEED);
        let text = self
            .lab
            .render_config_with(&self.lab.interfaces(), &options);
        let dp = self.datapath;
        let mut fields = format!("affinity_entries = {}\n", dp.affinity_entries);
        if let Some(g) = dp.max_new_pins_per_cpu {
            fields.push_str(&format!("max_new_pins_per_cpu = {g}\n"));
        }
        let old = "affinity_entries = 65536\n";
        assert!(
            text.contains(old),
            "the lab's config changed shape:\n{text}"
        );
        let mut text = text.replacen(old, &fields, 1);
        for &(i, w) in weights {
            let line = format!(
                "address = \"{}\"\nport = {BACKEND_HTTP_PORT}\n",
                self.lab.backend_addr(i)
            );
            assert!(text.contains(&line), "no backend {i} in:\n{text}");
            text = text.replacen(&line, &format!("{line}weight = {w}\n"), 1);
        }
        text
    }

    fn write_config(&self, options: &LabOptions, weights: &[(u32, u32)]) {
        let text = self.config(options, weights);
        self.lab
            .write_config(&text)
            .unwrap_or_else(|e| self.fail(&format!("{e:#}")));
    }

    /// Writes the config for `options` and `weights` and runs `lb reload`, which must succeed.
    fn reload(&self, options: &LabOptions, weights: &[(u32, u32)]) -> String {
        self.write_config(options, weights);
        self.cli_ok(&["reload"])
    }

    /// Retries a request from [`PROBE`] until one is answered.
    fn warm_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.lab.http_get(PROBE, self.web, REQUEST_TIMEOUT) {
                Ok(_) => return,
                Err(e) if Instant::now() >= deadline => self.fail(&format!(
                    "no request through the VIP succeeded in 15 s: {e:#}"
                )),
                Err(_) => thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Panics with `msg` and the tail of lb's log.
    fn fail(&self, msg: &str) -> ! {
        panic!(
            "{msg}\n--- last 30 lines of {} ---\n{}\n---",
            self.lab.log_path().display(),
            self.lab.lb_log_tail(30)
        )
    }

    /// `lb <args>`, which must succeed; its stdout.
    fn cli_ok(&self, args: &[&str]) -> String {
        let out: Output = self
            .lab
            .lb_cli(&self.bin, args)
            .unwrap_or_else(|e| self.fail(&format!("lb {args:?}: {e:#}")));
        if !out.status.success() {
            self.fail(&format!(
                "lb {args:?} failed ({}):\nstdout: {}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn cli_json<J: serde::de::DeserializeOwned>(&self, args: &[&str]) -> J {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.cli_ok(&all);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| self.fail(&format!("lb {all:?}: JSON: {e}:\n{out}")))
    }

    /// Status with pin counts counted after this call (they are counted in the background).
    fn status(&self) -> Status {
        self.cli_json(&["status", "--fresh"])
    }

    /// A verdict or event counter of `lb status` (0 when not reported).
    fn stat(&self, status: &Status, name: &str) -> u64 {
        status.stats.get(name).copied().unwrap_or(0)
    }

    fn service<'a>(&self, status: &'a Status, name: &str) -> &'a ServiceView {
        status
            .services
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| self.fail(&format!("no service {name} in lb status")))
    }

    /// Backend `i` (lab number) of the `web` service in `status`.
    fn web_backend<'a>(&self, status: &'a Status, i: u32) -> &'a BackendView {
        let addr = self.lab.backend_addr(i).to_string();
        self.service(status, "web")
            .backends
            .iter()
            .find(|b| b.address == addr && b.port == BACKEND_HTTP_PORT)
            .unwrap_or_else(|| self.fail(&format!("backend {addr} not in lb status")))
    }

    /// Every pin of `service`: client -> (backend `address:port`, live).
    fn pins(&self, service: &str) -> BTreeMap<String, (String, bool)> {
        let l: AffinityList = self.cli_json(&["affinity", "list", "--service", service]);
        l.pins
            .into_iter()
            .map(|p| (p.client, (p.backend, p.live)))
            .collect()
    }

    /// The backend number of an HTTP/UDP answer body (`backend-3` -> 3).
    fn backend_no(&self, body: &str) -> u32 {
        body.trim()
            .strip_prefix("backend-")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| self.fail(&format!("unexpected answer {body:?}")))
    }

    /// `address:port` of backend `i` in `service` as lb names it.
    fn endpoint(&self, i: u32, port: u16) -> String {
        format!("{}:{port}", self.lab.backend_addr(i))
    }

    /// One persistent connection per client, each answering one request; the backend of each.
    fn hold(&self, clients: &[Ipv4Addr]) -> Vec<(Ipv4Addr, HttpConn, u32)> {
        clients
            .iter()
            .map(|&c| {
                let mut conn = self
                    .lab
                    .http_connect(c, self.web, REQUEST_TIMEOUT)
                    .unwrap_or_else(|e| self.fail(&format!("{e:#}")));
                let body = conn
                    .get("/", REQUEST_TIMEOUT)
                    .unwrap_or_else(|e| self.fail(&format!("first request from {c}: {e:#}")));
                let b = self.backend_no(&body);
                (c, conn, b)
            })
            .collect()
    }

    /// One more request on every held connection: each must be answered by the backend that
    /// answered it first. Returns the problems (empty when none).
    fn ask_held(&self, held: &mut [(Ipv4Addr, HttpConn, u32)], what: &str) -> Vec<String> {
        let mut problems = Vec::new();
        for (c, conn, b) in held.iter_mut() {
            match conn.get("/", REQUEST_TIMEOUT) {
                Ok(body) => {
                    let now = self.backend_no(&body);
                    if now != *b {
                        problems.push(format!(
                            "{what}: {c} (port {}) answered by backend-{now}, was backend-{b}",
                            conn.local_addr().port()
                        ));
                    }
                }
                Err(e) => problems.push(format!("{what}: {c}: {e:#}")),
            }
        }
        problems
    }

    /// A new connection (one request) from `client`; its backend.
    fn get(&self, client: Ipv4Addr) -> anyhow::Result<u32> {
        let body = self.lab.http_get(client, self.web, REQUEST_TIMEOUT)?;
        Ok(self.backend_no(&body))
    }

    /// Checks that every held connection went where the model says, else fails.
    fn check_model(&self, held: &[(Ipv4Addr, HttpConn, u32)], model: &Maglev) {
        let off: Vec<String> = held
            .iter()
            .filter(|(c, _, b)| model.pick(*c) != *b)
            .map(|(c, _, b)| format!("{c}: backend-{b}, model backend-{}", model.pick(*c)))
            .collect();
        if !off.is_empty() {
            self.fail(&format!(
                "lb disagrees with the Maglev model (hash seed, table size, weights):\n{}",
                off.join("\n")
            ));
        }
    }

    /// Fresh clients (no pin, no connection) must reach the model's backend: the new table is
    /// in force, so the held connections' clients would have moved too without their entries.
    fn check_fresh(&self, fresh: &[Ipv4Addr], model: &Maglev) {
        for &c in fresh {
            match self.get(c) {
                Ok(b) if b == model.pick(c) => {}
                Ok(b) => self.fail(&format!(
                    "fresh client {c} reached backend-{b}, the new table says backend-{}",
                    model.pick(c)
                )),
                Err(e) => self.fail(&format!("fresh client {c}: {e:#}")),
            }
        }
    }

    /// The MAC address of `ifname` in namespace `ns`.
    fn mac(&self, ns: &str, ifname: &str) -> [u8; 6] {
        let out = output_timeout(
            std::process::Command::new("ip").args(["-n", ns, "-j", "link", "show", "dev", ifname]),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| self.fail(&format!("{e:#}")));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| self.fail(&format!("ip -j link of {ifname} in {ns}: {e}")));
        let text = v[0]["address"].as_str().unwrap_or_default();
        let bytes: Vec<u8> = text
            .split(':')
            .filter_map(|h| u8::from_str_radix(h, 16).ok())
            .collect();
        bytes
            .try_into()
            .unwrap_or_else(|_| self.fail(&format!("MAC of {ifname} in {ns}: {text:?}")))
    }

    /// A raw socket on the client namespace's `eth0` whose frames go to the balancer's `eth0`.
    fn raw_client(&self, capture: bool) -> Raw {
        let ns = self.lab.ns_client().to_owned();
        let src = self.mac(&ns, "eth0");
        let dst = self.mac(self.lab.ns_lb(), "eth0");
        lab::in_netns(&ns, || Raw::open("eth0", capture, src, dst))
            .and_then(|r| r)
            .unwrap_or_else(|e| self.fail(&format!("raw socket in {ns}: {e:#}")))
    }
}

/// The part of `lb status --output json` (`lb::api::StatusReport`) these tests read. A view
/// of its own, with defaults for the fields "Safe stickiness" added, so that the same tests run
/// against an lb from before it and show what they catch there.
#[derive(Debug, serde::Deserialize)]
struct Status {
    affinity_entries: u64,
    affinity_capacity: u64,
    #[serde(default)]
    stats: BTreeMap<String, u64>,
    services: Vec<ServiceView>,
}

#[derive(Debug, serde::Deserialize)]
struct ServiceView {
    name: String,
    #[serde(default)]
    counters: CountersView,
    backends: Vec<BackendView>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct CountersView {
    #[serde(default)]
    conns: u64,
    #[serde(default)]
    moved: u64,
}

#[derive(Debug, serde::Deserialize)]
struct BackendView {
    address: String,
    port: u16,
    weight: u32,
    state: String,
    slots: u32,
}

// ---------------------------------------------------------------------------------------------
// The model

/// lb's Maglev table of the `web` service for a set of backends `(lab number, weight)`.
struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    fn new(backends: &[(u32, u32)]) -> Maglev {
        let input: Vec<MaglevBackend> = backends
            .iter()
            .map(|&(i, weight)| MaglevBackend {
                addr: IpAddr::V4(lab::backend_addr(i)),
                port: BACKEND_HTTP_PORT,
                weight,
                id: i,
            })
            .collect();
        let table = maglev::build(&input, MAGLEV_M);
        assert_eq!(
            table.len(),
            MAGLEV_M as usize,
            "Maglev table of {backends:?}"
        );
        Maglev { table }
    }

    fn equal(backends: &[u32]) -> Maglev {
        let b: Vec<(u32, u32)> = backends.iter().map(|&i| (i, DEFAULT_WEIGHT)).collect();
        Maglev::new(&b)
    }

    /// The backend a client without a pin gets.
    fn pick(&self, client: Ipv4Addr) -> u32 {
        let key = [u32::from_ne_bytes(client.octets()), 0, 0, 0];
        self.table[lb_common::hash::client_slot(HASH_SEED, &key, MAGLEV_M) as usize]
    }
}

/// From `pool`: [`HELD`] clients to hold, half of them ones `after` sends elsewhere than
/// `before` (their old connections would move), and `fresh` more movers that are never held.
fn choose(
    pool: &[Ipv4Addr],
    before: &Maglev,
    after: &Maglev,
    fresh: usize,
) -> (Vec<Ipv4Addr>, Vec<Ipv4Addr>) {
    let (movers, stayers): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) =
        pool.iter().partition(|&&c| before.pick(c) != after.pick(c));
    let half = HELD / 2;
    assert!(
        movers.len() >= half + fresh && stayers.len() >= half,
        "{} movers / {} stayers in a pool of {}",
        movers.len(),
        stayers.len(),
        pool.len()
    );
    let held = movers[..half]
        .iter()
        .chain(&stayers[..half])
        .copied()
        .collect();
    (held, movers[half..half + fresh].to_vec())
}

// ---------------------------------------------------------------------------------------------
// Raw frames

/// A raw `AF_PACKET` socket bound to one interface (made inside a namespace, usable anywhere).
struct Raw {
    fd: OwnedFd,
    ifindex: i32,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
}

impl Raw {
    /// Call inside the namespace. With `capture` the socket also receives every frame of the
    /// interface (both directions), else it only sends.
    fn open(
        ifname: &str,
        capture: bool,
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
    ) -> anyhow::Result<Raw> {
        let ifindex = nix::net::if_::if_nametoindex(ifname)? as i32;
        let proto = if capture {
            (libc::ETH_P_ALL as u16).to_be()
        } else {
            0
        };
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                proto as i32,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
        let mut ll: libc::sockaddr_ll = unsafe { mem::zeroed() };
        ll.sll_family = libc::AF_PACKET as u16;
        ll.sll_protocol = proto;
        ll.sll_ifindex = ifindex;
        // SAFETY: `ll` is a valid sockaddr_ll of the given size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&ll as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error().into());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: `tv` is a valid timeval of the given size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                mem::size_of::<libc::timeval>() as u32,
            )
        };
        Ok(Raw {
            fd,
            ifindex,
            src_mac,
            dst_mac,
        })
    }

    /// Sends one frame (Ethernet addresses set here); whether the kernel took it.
    fn send(&self, pkt: &Pkt) -> bool {
        let frame = Pkt {
            eth_src: self.src_mac,
            eth_dst: self.dst_mac,
            ..pkt.clone()
        }
        .bytes();
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
        let mut ll: libc::sockaddr_ll = unsafe { mem::zeroed() };
        ll.sll_family = libc::AF_PACKET as u16;
        ll.sll_ifindex = self.ifindex;
        ll.sll_halen = 6;
        ll.sll_addr[..6].copy_from_slice(&self.dst_mac);
        // SAFETY: `frame` and `ll` outlive the call; sizes are theirs.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&ll as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        n == frame.len() as isize
    }

    /// Sends `count` frames made by `make(k)`, [`BURST`] at a time with a short pause between
    /// bursts (the balancer's veth takes a few hundred frames at once), for at most `limit`.
    /// Returns the frames the kernel took and the time it took.
    fn flood(
        &self,
        count: usize,
        limit: Duration,
        mut make: impl FnMut(usize) -> Pkt,
    ) -> (usize, Duration) {
        let t0 = Instant::now();
        let mut sent = 0;
        for k in 0..count {
            if self.send(&make(k)) {
                sent += 1;
            }
            if k % BURST == BURST - 1 {
                if t0.elapsed() >= limit {
                    break;
                }
                thread::sleep(Duration::from_micros(50));
            }
        }
        (sent, t0.elapsed())
    }

    /// The next frame received within about 100 ms, and whether it was one this host sent.
    fn recv(&self, buf: &mut [u8]) -> Option<(usize, bool)> {
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
        let mut ll: libc::sockaddr_ll = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: `buf` and `ll` are valid for the sizes given.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut ll as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n < 0 {
            return None;
        }
        Some((n as usize, ll.sll_pkttype == libc::PACKET_OUTGOING))
    }
}

/// A small deterministic generator (xorshift64*) for spoofed sources and ports.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A random address of 100.64.0.0/10.
    fn spoofed(&mut self) -> Ipv4Addr {
        Ipv4Addr::from(SPOOF_BASE | (self.next() >> 32) as u32 & SPOOF_MASK)
    }

    fn port(&mut self) -> u16 {
        1024 + (self.next() >> 40) as u16 % 60000
    }
}

/// Source address, protocol, ports of an IPv4 TCP/UDP frame without VLAN tags.
fn l4_of(f: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u8, u16, u16)> {
    if f.len() < 14 + 20 + 4 || f[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &f[14..];
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let l4 = ip.get(ihl..ihl + 4)?;
    Some((
        Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        ip[9],
        u16::from_be_bytes([l4[0], l4[1]]),
        u16::from_be_bytes([l4[2], l4[3]]),
    ))
}

fn cpus() -> u64 {
    // SAFETY: plain sysconf.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    n.max(1) as u64
}

// ---------------------------------------------------------------------------------------------
// Established connections

/// Idle past the affinity timeout, then a backend added: every old connection stays where it
/// started (its connection entry decides, not its stale pin nor the new table), while the new
/// table is in force for fresh clients and a new connection of a held client.
#[test]
fn long_lived_connections_survive_idle_expiry_and_a_new_backend() {
    let timeout = Duration::from_secs(2);
    // Backend 4 exists from the start but is written into the config only by the reload (its
    // interface already has XDP, so its replies are translated at once).
    let options = LabOptions::default()
        .with_backends(3)
        .with_affinity_timeout(timeout);
    let t = T::start(
        LabSpec {
            clients: 160,
            backends: 4,
        },
        options.clone(),
        Datapath::default(),
    );
    let three = Maglev::equal(&[1, 2, 3]);
    let four = Maglev::equal(&[1, 2, 3, 4]);
    let (clients, fresh) = choose(&t.lab.client_addrs(), &three, &four, 4);
    let t0 = Instant::now();
    let mut held = t.hold(&clients);
    t.check_model(&held, &three);
    let before = t.status();

    thread::sleep(timeout + Duration::from_millis(1500));
    // Precondition: the held clients' pins are stale (or gone), so only a connection entry can
    // keep their connections where they are.
    let pins = t.pins("web");
    let live: Vec<&String> = clients
        .iter()
        .map(|c| c.to_string())
        .filter_map(|c| {
            pins.get_key_value(&c)
                .filter(|(_, (_, l))| *l)
                .map(|(k, _)| k)
        })
        .collect();
    if !live.is_empty() {
        t.fail(&format!(
            "pins still live {:?} after idling past the timeout: {live:?}",
            t0.elapsed()
        ));
    }

    let out = t.reload(&options.clone().with_backends(4), &[]);
    if !out.contains(&t.endpoint(4, BACKEND_HTTP_PORT)) {
        t.fail(&format!(
            "lb reload does not report the added backend: {out:?}"
        ));
    }
    let status = t.status();
    let b4 = t.web_backend(&status, 4);
    if b4.state != "up" || b4.slots == 0 {
        t.fail(&format!("the added backend after the reload: {b4:?}"));
    }
    t.check_fresh(&fresh, &four);
    // A held mover's next connection follows the new table (its stale pin is re-placed) ...
    let (c0, _, b0) = &held[0];
    match t.get(*c0) {
        Ok(b) if b == four.pick(*c0) && b != *b0 => {}
        other => t.fail(&format!(
            "new connection of held client {c0}: {other:?}, the new table says backend-{}",
            four.pick(*c0)
        )),
    }
    // ... while every old connection stays.
    let mut problems = t.ask_held(&mut held, "after idle expiry and a new backend");
    let after = t.status();
    let moved = t.stat(&after, "conn_moved") - t.stat(&before, "conn_moved");
    let web = &t.service(&after, "web").counters;
    if moved != 0 || web.moved != 0 {
        problems.push(format!("conn_moved +{moved}, web moved {}", web.moved));
    }
    // Every held connection got its entry (plus the probe's and the new connections').
    if t.stat(&before, "conn_new") < HELD as u64 || web.conns < HELD as u64 {
        problems.push(format!(
            "{HELD} connections held: conn_new {} before the reload, web conns {}",
            t.stat(&before, "conn_new"),
            web.conns
        ));
    }
    if !problems.is_empty() {
        t.fail(&format!(
            "{} problems with {HELD} held connections:\n{}",
            problems.len(),
            problems.join("\n")
        ));
    }
    eprintln!(
        "idle expiry + new backend: {HELD} connections kept in {:?}",
        t0.elapsed()
    );
}

/// The pins pass their `max_age` (the connections busy meanwhile), then backend 1's weight
/// changes: every old connection stays.
#[test]
fn long_lived_connections_survive_max_age_and_a_reweight() {
    let max_age = Duration::from_secs(2);
    let options = LabOptions::default().with_affinity_max_age(max_age);
    let t = T::start(
        LabSpec {
            clients: 160,
            backends: 3,
        },
        options.clone(),
        Datapath::default(),
    );
    let equal = Maglev::equal(&[1, 2, 3]);
    let light = [(1, 25), (2, DEFAULT_WEIGHT), (3, DEFAULT_WEIGHT)];
    let reweighted = Maglev::new(&light);
    let (clients, fresh) = choose(&t.lab.client_addrs(), &equal, &reweighted, 4);
    let t0 = Instant::now();
    let mut held = t.hold(&clients);
    t.check_model(&held, &equal);
    let before = t.status();

    // Busy across max_age (the table unchanged: nobody may move) ...
    for round in 0..3 {
        thread::sleep(Duration::from_millis(800));
        let problems = t.ask_held(&mut held, &format!("busy round {round}"));
        if !problems.is_empty() {
            t.fail(&problems.join("\n"));
        }
    }
    // ... then quiet past it, so that every pin (however it was last written) is too old.
    thread::sleep(max_age + Duration::from_millis(500));
    let pins = t.pins("web");
    let live: Vec<String> = clients
        .iter()
        .map(|c| c.to_string())
        .filter(|c| pins.get(c).is_some_and(|(_, l)| *l))
        .collect();
    if !live.is_empty() {
        t.fail(&format!(
            "pins still live past max_age ({:?}): {live:?}",
            t0.elapsed()
        ));
    }

    t.reload(&options, &[(1, 25)]);
    let status = t.status();
    let b1 = t.web_backend(&status, 1);
    if b1.weight != 25 {
        t.fail(&format!("backend 1 after the reload: {b1:?}"));
    }
    t.check_fresh(&fresh, &reweighted);
    let problems = t.ask_held(&mut held, "after max_age and a reweight");
    let after = t.status();
    let moved = t.stat(&after, "conn_moved") - t.stat(&before, "conn_moved");
    if !problems.is_empty() || moved != 0 {
        t.fail(&format!(
            "{} of {HELD} old connections broke or moved (conn_moved +{moved}):\n{}",
            problems.len(),
            problems.join("\n")
        ));
    }
    eprintln!(
        "max_age + reweight: {HELD} connections kept in {:?}",
        t0.elapsed()
    );
}

/// The smallest affinity table, flooded by UDP clients until the held clients' pins are
/// evicted, then a backend added: every old connection stays.
#[test]
fn long_lived_connections_survive_pin_loss_under_lru_pressure() {
    let options = LabOptions::default().with_backends(3);
    let dp = Datapath {
        affinity_entries: 1024,
        ..Datapath::default()
    };
    let t = T::start(
        LabSpec {
            clients: 160,
            backends: 4,
        },
        options.clone(),
        dp,
    );
    let three = Maglev::equal(&[1, 2, 3]);
    let four = Maglev::equal(&[1, 2, 3, 4]);
    let (clients, fresh) = choose(&t.lab.client_addrs(), &three, &four, 4);
    let t0 = Instant::now();
    let mut held = t.hold(&clients);
    t.check_model(&held, &three);
    let before = t.status();
    let pinned_before = clients
        .iter()
        .filter(|c| t.pins("web").contains_key(&c.to_string()))
        .count();

    // 8 x 1024 distinct UDP clients to the dns service, three datagrams each in a row: a
    // client seen again is as recently used as a pinned TCP client, so the LRU's active list
    // turns over too, not only its inactive one. How many held pins a round evicts depends on
    // where the LRU's per-CPU lists stand: on this 2-CPU machine either all 40 go, or the table
    // settles at 809 entries with about 20 of them kept however many rounds follow. So: up to
    // three rounds, then whatever held pins the LRU kept are flushed (`lb affinity flush`), so
    // that every held connection has lost its pin either way (the output says which way).
    let raw = t.raw_client(false);
    let vip = t.lab.vip();
    let (distinct, repeat) = (8 * dp.affinity_entries as usize, 3);
    let (mut sent, mut took, mut rounds) = (0, Duration::ZERO, 0u32);
    let left: Vec<&Ipv4Addr> = loop {
        let base = SPOOF_BASE + 1 + rounds * distinct as u32;
        let (n, d) = raw.flood(repeat * distinct, Duration::from_secs(20), |k| {
            let src = Ipv4Addr::from(base + (k / repeat) as u32);
            Pkt::udp(src, 40000, vip, VIP_UDP_PORT)
        });
        (sent, took, rounds) = (sent + n, took + d, rounds + 1);
        let pins = t.pins("web");
        let left: Vec<&Ipv4Addr> = clients
            .iter()
            .filter(|c| pins.contains_key(&c.to_string()))
            .collect();
        if left.len() <= HELD / 2 || rounds == 3 {
            break left;
        }
    };
    let kept_by_lru = left.len();
    if kept_by_lru > HELD / 2 {
        for c in &left {
            t.cli_ok(&["affinity", "flush", &c.to_string(), "--service", "web"]);
        }
        let pins = t.pins("web");
        let still: Vec<&&Ipv4Addr> = left.iter().filter(|c| pins.contains_key(&c.to_string())).collect();
        if !still.is_empty() {
            t.fail(&format!("held clients' pins still there after a flush: {still:?}"));
        }
        eprintln!("the LRU kept {kept_by_lru} of {HELD} held clients' pins after {rounds} rounds: flushed those");
    }
    let left: Vec<&Ipv4Addr> = if kept_by_lru > HELD / 2 { Vec::new() } else { left };
    let mid = t.status();
    eprintln!(
        "pressure: {sent} datagrams in {took:?} ({rounds} round(s)); held clients' pins {pinned_before} -> {}, table {} -> {} entries",
        left.len(),
        before.affinity_entries,
        mid.affinity_entries
    );
    if left.len() > HELD / 2 {
        t.fail(&format!(
            "the pressure evicted only {} of {HELD} held clients' pins (table {} of {}): the test proves nothing",
            HELD - left.len(),
            mid.affinity_entries,
            mid.affinity_capacity
        ));
    }

    t.reload(&options.clone().with_backends(4), &[]);
    t.check_fresh(&fresh, &four);
    let problems = t.ask_held(&mut held, "after pin eviction and a new backend");
    let after = t.status();
    let moved = t.stat(&after, "conn_moved") - t.stat(&before, "conn_moved");
    if !problems.is_empty() || moved != 0 {
        t.fail(&format!(
            "{} of {HELD} old connections broke or moved (conn_moved +{moved}):\n{}",
            problems.len(),
            problems.join("\n")
        ));
    }
    // A live connection writes its client's pin again (at its first packet a refresh interval,
    // at most 1 s, after its entry was last stamped), so the next connection follows it.
    thread::sleep(Duration::from_millis(1200));
    let problems = t.ask_held(&mut held, "a second request after the reload");
    if !problems.is_empty() {
        t.fail(&problems.join("\n"));
    }
    let pins = t.pins("web");
    let missing: Vec<String> = held
        .iter()
        .filter(|(c, _, b)| {
            pins.get(&c.to_string()).map(|p| &p.0) != Some(&t.endpoint(*b, BACKEND_HTTP_PORT))
        })
        .map(|(c, _, b)| format!("{c} (backend-{b}): {:?}", pins.get(&c.to_string())))
        .collect();
    if !missing.is_empty() {
        t.fail(&format!(
            "pins not written again by their live connections:\n{}",
            missing.join("\n")
        ));
    }
    eprintln!(
        "LRU pressure + new backend: {HELD} connections kept in {:?}",
        t0.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// Strangers

/// Real clients pinned, then a SYN flood from random spoofed sources: no pin evicted or moved,
/// no pin created, every SYN counted.
#[test]
fn spoofed_syn_flood_evicts_no_pins() {
    let dp = Datapath {
        affinity_entries: 4096,
        ..Datapath::default()
    };
    let t = T::start(
        LabSpec {
            clients: HELD as u32,
            backends: 3,
        },
        LabOptions::default(),
        dp,
    );
    let clients = t.lab.client_addrs();
    for &c in &clients {
        if let Err(e) = t.get(c) {
            t.fail(&format!("{c}: {e:#}"));
        }
    }
    let pins_before = t.pins("web");
    for c in &clients {
        if !pins_before.get(&c.to_string()).is_some_and(|p| p.1) {
            t.fail(&format!(
                "{c} has no live pin after its request: {:?}",
                pins_before.get(&c.to_string())
            ));
        }
    }
    let before = t.status();

    let flood = 3 * 4096 * 4;
    let raw = t.raw_client(false);
    let vip = t.lab.vip();
    let mut rng = Rng(0x5eed_f100d);
    let (sent, took) = raw.flood(flood, Duration::from_secs(20), |_| {
        let (src, port) = (rng.spoofed(), rng.port());
        Pkt::syn(src, port, vip, VIP_HTTP_PORT)
    });
    // Let the last frames through the balancer before reading the counters.
    thread::sleep(Duration::from_millis(300));
    let after = t.status();
    let syn = t.stat(&after, "syn") - t.stat(&before, "syn");
    let grown = after.affinity_entries as i64 - before.affinity_entries as i64;
    let pins_after = t.pins("web");
    eprintln!(
        "SYN flood: {sent} sent in {took:?}, syn +{syn}, table {} -> {} entries",
        before.affinity_entries, after.affinity_entries
    );
    let mut problems = Vec::new();
    if sent < flood * 9 / 10 {
        problems.push(format!("only {sent} of {flood} SYNs could be sent"));
    }
    if syn < sent as u64 * 9 / 10 {
        problems.push(format!("syn grew by {syn}, {sent} SYNs were sent"));
    }
    if grown > 8 {
        problems.push(format!(
            "the affinity table grew by {grown} entries ({} -> {}) during the flood",
            before.affinity_entries, after.affinity_entries
        ));
    }
    for c in &clients {
        let k = c.to_string();
        let (was, now) = (pins_before.get(&k), pins_after.get(&k));
        if now.map(|p| &p.0) != was.map(|p| &p.0) || !now.is_some_and(|p| p.1) {
            problems.push(format!("{c}: pin {was:?} before the flood, {now:?} after"));
        }
    }
    if !problems.is_empty() {
        t.fail(&problems.join("\n"));
    }
    // The real clients still reach their backends (the backends may still be answering the
    // flood's SYNs with cookies: a few tries).
    for c in &clients {
        let want = pins_before[&c.to_string()].0.clone();
        let got = (0..3).find_map(|_| t.get(*c).ok());
        if got.map(|b| t.endpoint(b, BACKEND_HTTP_PORT)) != Some(want.clone()) {
            t.fail(&format!(
                "{c} after the flood: backend-{got:?}, pinned to {want}"
            ));
        }
    }
}

/// Real UDP clients pinned, then a flood of spoofed sources far above the new-pin guard: the
/// real pins stay, the flood is `guarded`, and the table grows by at most the guard's allowance.
#[test]
fn udp_flood_above_the_guard_keeps_real_pins() {
    let guard = 200u32;
    let dp = Datapath {
        affinity_entries: 4096,
        max_new_pins_per_cpu: Some(guard),
    };
    let t = T::start(
        LabSpec {
            clients: HELD as u32,
            backends: 3,
        },
        LabOptions::default(),
        dp,
    );
    let clients = t.lab.client_addrs();
    for &c in &clients {
        if let Err(e) = t.lab.udp_query(c, t.dns, REQUEST_TIMEOUT) {
            t.fail(&format!("UDP from {c}: {e:#}"));
        }
    }
    let pins_before = t.pins("dns");
    for c in &clients {
        if !pins_before.get(&c.to_string()).is_some_and(|p| p.1) {
            t.fail(&format!(
                "{c} has no live dns pin: {:?}",
                pins_before.get(&c.to_string())
            ));
        }
    }
    let before = t.status();

    let flood = 50_000;
    let raw = t.raw_client(false);
    let vip = t.lab.vip();
    let mut rng = Rng(0x00d_f100d);
    // About 25k datagrams a second: 2 s.
    let t0 = Instant::now();
    let (sent, took) = raw.flood(flood, Duration::from_secs(10), |k| {
        if k % 250 == 249 {
            let due = t0 + Duration::from_micros(40 * k as u64);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                thread::sleep(d);
            }
        }
        Pkt::udp(rng.spoofed(), rng.port(), vip, VIP_UDP_PORT)
    });
    thread::sleep(Duration::from_millis(300));
    let after = t.status();
    let guarded = t.stat(&after, "guarded") - t.stat(&before, "guarded");
    let grown = after.affinity_entries as i64 - before.affinity_entries as i64;
    // Windows of 2^30 ns: the flood's duration touches at most this many per CPU.
    let windows = took.as_nanos() as u64 / (1 << 30) + 2;
    let bound = guard as u64 * cpus() * windows;
    let pins_after = t.pins("dns");
    eprintln!(
        "UDP flood: {sent} sent in {took:?}, guarded +{guarded}, table {} -> {} entries (bound {bound})",
        before.affinity_entries, after.affinity_entries
    );
    let mut problems = Vec::new();
    if sent < flood * 9 / 10 {
        problems.push(format!("only {sent} of {flood} datagrams could be sent"));
    }
    if guarded == 0 || guarded + bound < sent as u64 * 9 / 10 {
        problems.push(format!(
            "guarded grew by {guarded} for {sent} new sources (allowance {bound})"
        ));
    }
    if grown > bound as i64 {
        problems.push(format!(
            "the affinity table grew by {grown} entries, more than the guard's {bound}"
        ));
    }
    for c in &clients {
        let k = c.to_string();
        let (was, now) = (pins_before.get(&k), pins_after.get(&k));
        if now.map(|p| &p.0) != was.map(|p| &p.0) || !now.is_some_and(|p| p.1) {
            problems.push(format!("{c}: pin {was:?} before the flood, {now:?} after"));
        }
    }
    if !problems.is_empty() {
        t.fail(&problems.join("\n"));
    }
}

/// A frame with a backend's source address sent from the client side is dropped
/// (`drop_reply_side`), never relayed to a client as the VIP; real replies still are.
#[test]
fn spoofed_reply_from_the_client_side_is_not_relayed() {
    let t = T::start(
        LabSpec {
            clients: 4,
            backends: 3,
        },
        LabOptions::default(),
        Datapath::default(),
    );
    let victim = t.lab.client_addrs()[0];
    let vip = t.lab.vip();
    let backend = t.lab.backend_addr(1);
    // Two sockets: a packet socket never sees the frames it sent itself.
    let cap = t.raw_client(true);
    let sender = t.raw_client(false);
    let before = t.status();
    let (tcp_port, udp_port) = (41_234, 41_235);
    let tcp = Pkt {
        payload: b"HTTP/1.1 200 OK\r\n\r\nspoofed".to_vec(),
        ..Pkt::tcp(backend, BACKEND_HTTP_PORT, victim, tcp_port)
    };
    let udp = Pkt::udp(backend, lab::BACKEND_UDP_PORT, victim, udp_port);
    let spoofs = 10;
    for _ in 0..spoofs {
        if !sender.send(&tcp) || !sender.send(&udp) {
            t.fail("sending a spoofed reply failed");
        }
    }
    // Watch the client link for half a second, then make a real request while still watching:
    // its answer (from the VIP) shows that the capture sees what the balancer relays.
    let mut relayed = Vec::new();
    let (mut own, mut real_replies) = (0, 0);
    let mut buf = vec![0u8; 4096];
    let watch = |buf: &mut [u8], relayed: &mut Vec<String>, own: &mut usize, real: &mut usize| {
        if let Some((n, outgoing)) = cap.recv(buf)
            && let Some((src, dst, proto, sport, dport)) = l4_of(&buf[..n])
        {
            if outgoing && src == backend {
                *own += 1;
            } else if !outgoing && src == vip && (dport == tcp_port || dport == udp_port) {
                relayed.push(format!("{src}:{sport} -> {dst}:{dport} proto {proto}"));
            } else if !outgoing && src == vip && sport == VIP_HTTP_PORT {
                *real += 1;
            }
        }
    };
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        watch(&mut buf, &mut relayed, &mut own, &mut real_replies);
    }
    let client = t.lab.client_addrs()[1];
    let answered = t.get(client);
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        watch(&mut buf, &mut relayed, &mut own, &mut real_replies);
    }
    let after = t.status();
    let dropped = t.stat(&after, "drop_reply_side") - t.stat(&before, "drop_reply_side");
    let replies = t.stat(&after, "reply") - t.stat(&before, "reply");
    eprintln!(
        "spoofed replies: {own} seen leaving, {} relayed, drop_reply_side +{dropped}; real request {answered:?}, {real_replies} VIP replies seen, reply +{replies}",
        relayed.len()
    );
    let mut problems = Vec::new();
    if own < 2 * spoofs {
        problems.push(format!(
            "the capture saw {own} of the {} spoofed frames leave",
            2 * spoofs
        ));
    }
    if !relayed.is_empty() {
        problems.push(format!("relayed as the VIP: {relayed:?}"));
    }
    if dropped < 2 * spoofs as u64 {
        problems.push(format!(
            "drop_reply_side grew by {dropped}, {} spoofed frames were sent",
            2 * spoofs
        ));
    }
    if answered.is_err() || real_replies == 0 || replies == 0 {
        problems.push(format!(
            "a real request through the VIP: {answered:?}, {real_replies} replies from the VIP seen, reply +{replies}"
        ));
    }
    if !problems.is_empty() {
        t.fail(&problems.join("\n"));
    }
}
