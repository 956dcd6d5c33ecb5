//! The cluster lab: two balancer nodes behind a router that spreads the VIP's traffic over them
//! with ECMP, learning the VIP over BGP from each node's BIRD, which learns it from the kernel
//! table `lb` keeps (`[announce]`). The BIRD configs are the repository's own
//! (`packaging/bird/node.conf`, `router.conf`), whose example addresses are this lab's.
//!
//! ```text
//!  <p>-cl clients 10.201.1.10.. --- eth0 [<p>-rt router 10.201.1.1 | 10.201.0.1, BIRD, ECMP] eth1
//!                                                          |
//!          <p>-sw bridge br0: rt, n1, n2, b1..bN (one L2 segment, 10.201.0.0/24)
//!             |              |                      |
//!    <p>-n1 10.201.0.11   <p>-n2 10.201.0.12     <p>-b<i> 10.201.0.(100+i), VIP on lo, HTTP :80
//!    BIRD + lb (XDP eth0)  BIRD + lb (XDP eth0)
//! ```
//!
//! DSR: the nodes switch the frames to the backends, which answer the clients through the router.
//! NAT: the backends' default route is node 2, so replies may come back through the node that did
//! not see the request (reply translation keeps no per-flow state).
//!
//! Dropping the lab stops both `lb`s (and runs `lb down`, which withdraws and detaches), kills the
//! BIRDs, stops the servers, unmounts what is under its directory and deletes its namespaces.

use std::{
    fs::{self, File, OpenOptions},
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::{
    Backend, CMD_TIMEOUT, LAB_ROOT, LB_STOP_GRACE, NETNS_DIR, Servers, TrafficHandle, TrafficOptions, bpf,
    ethtool_lab_offloads,
    http::{self, Counters, ServerCtx},
    in_netns, ip, output_timeout, set_sysctls, sweep_stale, traffic, unmount_under, wait_links_running,
};

/// The VIP of the cluster's one service (`web`, TCP :80).
pub const CLUSTER_VIP: Ipv4Addr = Ipv4Addr::new(10, 201, 100, 1);
/// The service port (also the backends' port: DSR needs it).
pub const CLUSTER_PORT: u16 = 80;
/// The kernel table lb announces in (as in `packaging/bird/node.conf`).
pub const ANNOUNCE_TABLE: u32 = 4242;
/// The router on the nodes' segment (and the example neighbour of `node.conf`).
pub const ROUTER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
/// Clients reach the router here.
const ROUTER_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 1);
/// A client address that is not one of [`Cluster::client_addrs`]: for probes.
pub const CLUSTER_PROBE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 2);
/// The nodes (1-based) and their addresses, as in `packaging/bird/router.conf`.
pub const NODES: u32 = 2;
pub fn node_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, 0, 10 + i as u8)
}
/// Backend `i` (1-based).
pub fn cluster_backend_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, 0, 100 + i as u8)
}

/// How the nodes forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterMode {
    /// Direct server return: backends answer clients through the router.
    Dsr,
    /// NAT, with every backend's default route (and so every reply) through node `replies_via`.
    Nat { replies_via: u32 },
}

/// How the router's ECMP picks a node for a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EcmpHash {
    /// By addresses: a client stays on one node while the node set is unchanged.
    L3,
    /// By connection (`fib_multipath_hash_policy = 1`): a client's connections spread over the
    /// nodes (here effectively at random per connection: the packets carry their socket's hash).
    L4,
}

#[derive(Clone, Copy, Debug)]
pub struct ClusterSpec {
    /// Client addresses 10.201.1.10 ..
    pub clients: u32,
    pub backends: u32,
    pub mode: ClusterMode,
    pub ecmp: EcmpHash,
}

struct Node {
    ns: String,
    dir: PathBuf,
    lb: Option<Child>,
    bird: Option<Child>,
}

pub struct Cluster {
    prefix: String,
    dir: PathBuf,
    spec: ClusterSpec,
    namespaces: Vec<String>,
    ns_client: String,
    ns_router: String,
    nodes: Vec<Node>,
    backends: Vec<Backend>,
    bpf_links: Vec<OwnedFd>,
    router_bird: Option<Child>,
    lb_bin: Option<PathBuf>,
}

/// The repository's BIRD config `name` (`packaging/bird/<name>`).
fn shipped_bird_config(name: &str) -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/bird").join(name);
    fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

fn ip_batch(dir: &Path, ns: &str, cmds: &[String]) -> Result<()> {
    let file = dir.join(format!("{ns}.ip"));
    fs::write(&file, cmds.join("\n") + "\n").with_context(|| format!("writing {}", file.display()))?;
    ip(&["-n", ns, "-batch", &file.to_string_lossy()]).with_context(|| format!("configuring {ns}:\n{}", cmds.join("\n")))
}

impl Cluster {
    /// Builds the topology, starts the backends' servers and the router's BIRD, and writes
    /// every node's lb and BIRD config (nodes are started with [`Cluster::start_node`]).
    pub fn create(spec: ClusterSpec) -> Result<Cluster> {
        ensure!((1..=150).contains(&spec.clients), "clients must be 1..=150");
        ensure!((1..=20).contains(&spec.backends), "backends must be 1..=20");
        ensure!(super::is_root(), "the cluster lab needs root");
        sweep_stale();
        // Names like the single-node lab's (`lb<pid>-<n>`), so its sweeper clears stale ones.
        static COUNTER: AtomicU32 = AtomicU32::new(500);
        let prefix = format!("lb{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let dir = Path::new(LAB_ROOT).join(&prefix);
        let mut c = Cluster {
            ns_client: format!("{prefix}-cl"),
            ns_router: format!("{prefix}-rt"),
            nodes: (1..=NODES)
                .map(|i| Node { ns: format!("{prefix}-n{i}"), dir: dir.join(format!("n{i}")), lb: None, bird: None })
                .collect(),
            dir,
            prefix,
            spec,
            namespaces: Vec::new(),
            backends: Vec::new(),
            bpf_links: Vec::new(),
            router_bird: None,
            lb_bin: None,
        };
        c.build().with_context(|| format!("creating cluster lab {}", c.prefix))?;
        Ok(c)
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        Ok(())
    }

    /// A veth from port `port` of the bridge to `eth0` of `ns`.
    fn switch_port(&self, sw: &str, port: &str, ns: &str) -> Result<()> {
        ip(&["link", "add", port, "netns", sw, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
        ip_batch(&self.dir, sw, &[format!("link set {port} master br0"), format!("link set {port} up")])?;
        ethtool_lab_offloads(sw, port)
    }

    fn build(&mut self) -> Result<()> {
        fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        let (cl, rt, sw) = (self.ns_client.clone(), self.ns_router.clone(), format!("{}-sw", self.prefix));
        for ns in [&cl, &rt, &sw] {
            self.add_netns(ns)?;
        }
        ip_batch(
            &self.dir,
            &sw,
            &[
                "link set lo up".into(),
                "link add br0 type bridge stp_state 0 mcast_snooping 0".into(),
                "link set br0 up".into(),
            ],
        )?;
        // Clients <-> router.
        ip(&["link", "add", "eth0", "netns", &cl, "type", "veth", "peer", "name", "eth0", "netns", &rt])?;
        let mut cmds = vec!["link set lo up".to_owned(), "link set eth0 up".to_owned()];
        cmds.push(format!("addr add {CLUSTER_PROBE_ADDR}/24 dev eth0"));
        for a in self.client_addrs() {
            cmds.push(format!("addr add {a}/24 dev eth0"));
        }
        cmds.push(format!("route add default via {ROUTER_CLIENT_SIDE}"));
        ip_batch(&self.dir, &cl, &cmds)?;
        ethtool_lab_offloads(&cl, "eth0")?;
        // The router: eth0 to the clients, eth1 on the segment.
        ip(&["link", "add", "rt", "netns", &sw, "type", "veth", "peer", "name", "eth1", "netns", &rt])?;
        ip_batch(&self.dir, &sw, &["link set rt master br0".into(), "link set rt up".into()])?;
        ethtool_lab_offloads(&sw, "rt")?;
        ip_batch(
            &self.dir,
            &rt,
            &[
                "link set lo up".into(),
                "link set eth0 up".into(),
                "link set eth1 up".into(),
                format!("addr add {ROUTER_CLIENT_SIDE}/24 dev eth0"),
                format!("addr add {ROUTER_ADDR}/24 dev eth1"),
            ],
        )?;
        ethtool_lab_offloads(&rt, "eth0")?;
        ethtool_lab_offloads(&rt, "eth1")?;
        let policy = match self.spec.ecmp {
            EcmpHash::L3 => "0",
            EcmpHash::L4 => "1",
        };
        set_sysctls(
            &rt,
            &[
                ("net/ipv4/ip_forward", "1"),
                ("net/ipv4/fib_multipath_hash_policy", policy),
                ("net/ipv4/conf/all/rp_filter", "0"),
                ("net/ipv4/conf/default/rp_filter", "0"),
            ],
        )?;
        // The nodes.
        for i in 1..=NODES {
            let ns = self.nodes[i as usize - 1].ns.clone();
            self.add_netns(&ns)?;
            let port = format!("n{i}");
            self.switch_port(&sw, &port, &ns)?;
            // The node sends its balanced frames back out (XDP_TX): the bridge port needs an XDP
            // program to take them at once.
            let link = in_netns(&sw, || bpf::attach_xdp_pass_here(&port))?
                .with_context(|| format!("attaching XDP_PASS to switch port {port}"))?;
            self.bpf_links.push(link);
            ip_batch(
                &self.dir,
                &ns,
                &[
                    "link set lo up".into(),
                    "link set eth0 up".into(),
                    format!("addr add {}/24 dev eth0", node_addr(i)),
                    format!("route add default via {ROUTER_ADDR}"),
                ],
            )?;
            ethtool_lab_offloads(&ns, "eth0")?;
            set_sysctls(
                &ns,
                &[("net/ipv4/ip_forward", "1"), ("net/ipv4/conf/all/rp_filter", "0"), ("net/ipv4/conf/eth0/rp_filter", "0")],
            )?;
            fs::create_dir_all(&self.nodes[i as usize - 1].dir)?;
        }
        // The backends.
        let gateway = match self.spec.mode {
            ClusterMode::Dsr => ROUTER_ADDR,
            ClusterMode::Nat { replies_via } => node_addr(replies_via),
        };
        for i in 1..=self.spec.backends {
            let ns = format!("{}-b{i}", self.prefix);
            self.add_netns(&ns)?;
            self.switch_port(&sw, &format!("b{i}"), &ns)?;
            ip_batch(
                &self.dir,
                &ns,
                &[
                    "link set lo up".into(),
                    // DSR: the VIP on loopback, so the backend takes packets to it and answers from it.
                    format!("addr add {CLUSTER_VIP}/32 dev lo"),
                    format!("addr add {}/24 dev eth0", cluster_backend_addr(i)),
                    "link set eth0 up".into(),
                    format!("route add default via {gateway}"),
                ],
            )?;
            ethtool_lab_offloads(&ns, "eth0")?;
            set_sysctls(
                &ns,
                &[
                    ("net/ipv4/conf/all/arp_ignore", "1"),
                    ("net/ipv4/conf/all/arp_announce", "2"),
                    ("net/ipv4/conf/eth0/arp_ignore", "1"),
                    ("net/ipv4/conf/eth0/arp_announce", "2"),
                ],
            )?;
            self.backends.push(Backend {
                ns,
                counters: Arc::new(Counters::default()),
                healthy: Arc::new(AtomicBool::new(true)),
                servers: None,
            });
        }
        for ns in self.namespaces.clone() {
            wait_links_running(&ns, Duration::from_secs(5))?;
        }
        for i in 1..=self.spec.backends {
            self.start_backend(i)?;
        }
        for i in 1..=NODES {
            self.write_node_configs(i)?;
        }
        self.start_router_bird()
    }

    fn start_backend(&mut self, i: u32) -> Result<()> {
        let b = &self.backends[i as usize - 1];
        let tcp = in_netns(&b.ns, || TcpListener::bind((Ipv4Addr::UNSPECIFIED, CLUSTER_PORT)))?
            .with_context(|| format!("binding :{CLUSTER_PORT} in {}", b.ns))?;
        tcp.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = Arc::new(ServerCtx {
            body: format!("backend-{i}\n"),
            counters: b.counters.clone(),
            healthy: b.healthy.clone(),
            stop: stop.clone(),
        });
        let t = thread::Builder::new().name(format!("{}-http", b.ns)).spawn(move || http::serve_http(tcp, ctx))?;
        self.backends[i as usize - 1].servers = Some(Servers { stop, threads: vec![t] });
        Ok(())
    }

    /// Node `i`'s lb config: both list every backend, node 2 in the other order (tables must
    /// not depend on it).
    pub fn node_config_text(&self, i: u32, health_path: &str) -> String {
        let n = &self.nodes[i as usize - 1];
        let mode = match self.spec.mode {
            ClusterMode::Dsr => "dsr",
            ClusterMode::Nat { .. } => "nat",
        };
        let mut s = format!(
            "[datapath]\ninterfaces = [\"eth0\"]\nmode = \"{mode}\"\naffinity_entries = 65536\n\
             pin_path = \"{}\"\nmax_services = 4\nmax_backends = 32\nhash_seed = 7\n\n\
             [control]\nsocket = \"{}\"\n\n[announce]\ntable = {ANNOUNCE_TABLE}\ngrace = \"1s\"\n\n\
             [[services]]\nname = \"web\"\nvip = \"{CLUSTER_VIP}\"\nport = {CLUSTER_PORT}\n\
             [services.health]\nkind = \"http\"\npath = \"{health_path}\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\n\
             rise = 1\nfall = 2\n",
            n.dir.join("bpf").display(),
            n.dir.join("lb.sock").display(),
        );
        let mut order: Vec<u32> = (1..=self.spec.backends).collect();
        if i == 2 {
            order.reverse();
        }
        for b in order {
            s.push_str(&format!("[[services.backends]]\naddress = \"{}\"\nport = {CLUSTER_PORT}\n", cluster_backend_addr(b)));
        }
        s
    }

    fn write_node_configs(&self, i: u32) -> Result<()> {
        let n = &self.nodes[i as usize - 1];
        fs::write(n.dir.join("lb.toml"), self.node_config_text(i, "/healthz"))?;
        let bird = shipped_bird_config("node.conf")?;
        ensure!(bird.contains("router id 10.201.0.11;"), "packaging/bird/node.conf changed shape");
        let bird = bird.replace("router id 10.201.0.11;", &format!("router id {};", node_addr(i)));
        // The lab reads BIRD's log from its stderr (the shipped config logs to syslog).
        fs::write(n.dir.join("bird.conf"), format!("log stderr all;\n{bird}"))?;
        Ok(())
    }

    /// Replaces node `i`'s lb config (e.g. with another health-check path) for `lb reload`.
    pub fn write_node_config(&self, i: u32, text: &str) -> Result<()> {
        fs::write(self.node_config(i), text).context("writing the node's config")
    }

    fn spawn_bird(&self, ns: &str, conf: &Path, ctl: &Path, log: &Path) -> Result<Child> {
        let out = OpenOptions::new().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        Command::new("ip")
            .args(["netns", "exec", ns, "bird", "-f", "-c"])
            .arg(conf)
            .arg("-s")
            .arg(ctl)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting bird in {ns}"))
    }

    fn start_router_bird(&mut self) -> Result<()> {
        let conf = self.dir.join("router-bird.conf");
        fs::write(&conf, format!("log stderr all;\n{}", shipped_bird_config("router.conf")?))?;
        let child = self.spawn_bird(&self.ns_router, &conf, &self.dir.join("router-bird.ctl"), &self.dir.join("router-bird.log"))?;
        self.router_bird = Some(child);
        Ok(())
    }

    pub fn node_config(&self, i: u32) -> PathBuf {
        self.nodes[i as usize - 1].dir.join("lb.toml")
    }

    pub fn node_socket(&self, i: u32) -> PathBuf {
        self.nodes[i as usize - 1].dir.join("lb.sock")
    }

    pub fn node_log(&self, i: u32) -> PathBuf {
        self.nodes[i as usize - 1].dir.join("lb.log")
    }

    pub fn node_ns(&self, i: u32) -> &str {
        &self.nodes[i as usize - 1].ns
    }

    pub fn ns_client(&self) -> &str {
        &self.ns_client
    }

    pub fn ns_router(&self) -> &str {
        &self.ns_router
    }

    /// The last `n` lines of node `i`'s lb log and of its BIRD's, for failure messages.
    pub fn node_log_tail(&self, i: u32, n: usize) -> String {
        let tail = |p: PathBuf| {
            let t = fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        };
        let d = &self.nodes[i as usize - 1].dir;
        format!("--- lb ---\n{}\n--- bird ---\n{}", tail(d.join("lb.log")), tail(d.join("bird.log")))
    }

    /// Starts node `i`'s BIRD (unless running).
    pub fn start_bird(&mut self, i: u32) -> Result<()> {
        if self.nodes[i as usize - 1].bird.is_some() {
            return Ok(());
        }
        let n = &self.nodes[i as usize - 1];
        let child = self.spawn_bird(&n.ns, &n.dir.join("bird.conf"), &n.dir.join("bird.ctl"), &n.dir.join("bird.log"))?;
        self.nodes[i as usize - 1].bird = Some(child);
        Ok(())
    }

    /// Kills node `i`'s BIRD: SIGTERM lets it close its BGP session (a clean withdrawal),
    /// SIGKILL does not (the router notices when the hold time runs out).
    pub fn stop_bird(&mut self, i: u32, signal: Signal) -> Result<()> {
        if let Some(mut child) = self.nodes[i as usize - 1].bird.take() {
            // `ip netns exec` execs bird: the child's pid is bird's.
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
            child.wait().context("waiting for bird")?;
        }
        Ok(())
    }

    /// Starts node `i`'s lb (and its BIRD) with `lb_bin`; returns once `lb status` answers.
    pub fn start_node(&mut self, i: u32, lb_bin: &Path) -> Result<()> {
        self.lb_bin = Some(lb_bin.to_owned());
        self.start_bird(i)?;
        if self.nodes[i as usize - 1].lb.is_some() {
            return Ok(());
        }
        let n = &self.nodes[i as usize - 1];
        let log = OpenOptions::new().create(true).append(true).open(n.dir.join("lb.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", Path::new(NETNS_DIR).join(&n.ns).display()))
            .arg("--")
            .arg(lb_bin)
            .args(["run", "--config"])
            .arg(n.dir.join("lb.toml"))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting lb")?;
        self.nodes[i as usize - 1].lb = Some(child);
        let t = Instant::now();
        loop {
            if let Some(st) = self.nodes[i as usize - 1].lb.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.nodes[i as usize - 1].lb = None;
                bail!("lb on node {i} exited with {st}:\n{}", self.node_log_tail(i, 30));
            }
            if self.lb_cli(i, lb_bin, &["status"]).is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(20) {
                bail!("lb on node {i} did not answer within 20s:\n{}", self.node_log_tail(i, 30));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM to node `i`'s lb (the datapath stays, and so does its announcement).
    pub fn stop_lb(&mut self, i: u32) -> Result<()> {
        let Some(mut child) = self.nodes[i as usize - 1].lb.take() else { return Ok(()) };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + LB_STOP_GRACE + Duration::from_secs(5);
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("lb on node {i} ignored SIGTERM")
    }

    /// SIGKILL to node `i`'s lb (a crash: its datapath stays until [`Cluster::lb_down`]).
    pub fn kill_lb(&mut self, i: u32) {
        if let Some(mut child) = self.nodes[i as usize - 1].lb.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `lb <args>` against node `i`'s control socket.
    pub fn lb_cli(&self, i: u32, lb_bin: &Path, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(lb_bin);
        cmd.arg("--socket").arg(self.node_socket(i)).args(args);
        output_timeout(&mut cmd, CMD_TIMEOUT)
    }

    /// `lb down --config <node i's config>` in node `i`'s namespace: with a running daemon, it
    /// withdraws the VIP, keeps serving for the grace time, detaches and exits; without one, it
    /// withdraws and detaches what is left.
    pub fn lb_down(&mut self, i: u32, lb_bin: &Path) -> Result<Output> {
        let out = output_timeout(&mut self.lb_down_command(i, lb_bin), Duration::from_secs(30))?;
        if let Some(mut child) = self.nodes[i as usize - 1].lb.take() {
            let _ = child.wait();
        }
        Ok(out)
    }

    /// The `lb down` command of [`Cluster::lb_down`], to run it alongside something else.
    pub fn lb_down_command(&self, i: u32, lb_bin: &Path) -> Command {
        let n = &self.nodes[i as usize - 1];
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", Path::new(NETNS_DIR).join(&n.ns).display()))
            .arg("--")
            .arg(lb_bin)
            .args(["down", "--config"])
            .arg(n.dir.join("lb.toml"))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    /// The router's next hops for the VIP (none when nothing announces it).
    pub fn router_nexthops(&self) -> Result<Vec<Ipv4Addr>> {
        let out = output_timeout(
            Command::new("ip").args(["-n", &self.ns_router, "route", "show", &CLUSTER_VIP.to_string()]),
            CMD_TIMEOUT,
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut hops: Vec<Ipv4Addr> = text
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "via")
            .filter_map(|w| w[1].parse().ok())
            .collect();
        hops.sort();
        Ok(hops)
    }

    /// Waits until the router's next hops for the VIP are exactly `nodes`; the time it took.
    pub fn wait_nexthops(&self, nodes: &[u32], timeout: Duration) -> Result<Duration> {
        let mut want: Vec<Ipv4Addr> = nodes.iter().map(|i| node_addr(*i)).collect();
        want.sort();
        let t = Instant::now();
        loop {
            let have = self.router_nexthops()?;
            if have == want {
                return Ok(t.elapsed());
            }
            if t.elapsed() > timeout {
                let bird = fs::read_to_string(self.dir.join("router-bird.log")).unwrap_or_default();
                bail!("the router's next hops for {CLUSTER_VIP} are {have:?}, not {want:?}, after {timeout:?}\nrouter BIRD log:\n{bird}");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn client_addrs(&self) -> Vec<Ipv4Addr> {
        (0..self.spec.clients).map(|k| Ipv4Addr::new(10, 201, 1, 10 + k as u8)).collect()
    }

    pub fn vip(&self) -> SocketAddrV4 {
        SocketAddrV4::new(CLUSTER_VIP, CLUSTER_PORT)
    }

    /// One HTTP GET through the VIP from `client` (a new connection): the answering backend's
    /// name.
    pub fn http_get(&self, client: Ipv4Addr, timeout: Duration) -> Result<String> {
        let vip = self.vip();
        in_netns(&self.ns_client, || http::http_get_here(client, vip, "/", timeout))?.map(|b| b.trim().to_owned())
    }

    /// Continuous traffic from `clients` through the VIP (see [`super::Lab::spawn_traffic_with`]).
    pub fn spawn_traffic(&self, clients: Vec<Ipv4Addr>, options: TrafficOptions) -> Result<TrafficHandle> {
        let netns = File::open(Path::new(NETNS_DIR).join(&self.ns_client)).context("opening the client namespace")?;
        traffic::spawn(&netns, &self.ns_client, clients, self.vip(), options)
    }

    /// Makes node `i` a black hole (or lifts it): its kernel drops every IP packet in and out
    /// (nftables), as a hung host would. ARP still works, so the switch keeps the node's port
    /// (no flooding of its frames to the other node); nothing it sends reaches the router any
    /// more, not even the end of its BGP session. (An XDP program still attached runs before
    /// these rules.)
    pub fn blackhole_node(&self, i: u32, on: bool) -> Result<()> {
        let ns = self.node_ns(i).to_owned();
        let script = if on {
            "table inet lbdead {\n \
             chain drop_in { type filter hook input priority -300; policy drop; }\n \
             chain drop_forward { type filter hook forward priority -300; policy drop; }\n \
             chain drop_out { type filter hook output priority -300; policy drop; }\n}\n"
                .to_owned()
        } else {
            "delete table inet lbdead\n".to_owned()
        };
        let file = self.dir.join(format!("{ns}-dead.nft"));
        fs::write(&file, script)?;
        let out = output_timeout(Command::new("ip").args(["netns", "exec", &ns, "nft", "-f"]).arg(&file), CMD_TIMEOUT)?;
        ensure!(out.status.success(), "nft in {ns}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    /// Makes every backend drop (or accept again) node `i`'s health checks: TCP from its
    /// address to the service port. Forwarded client traffic (source: the client) is untouched.
    pub fn block_health_checks_from(&self, i: u32, block: bool) -> Result<()> {
        for b in &self.backends {
            let script = if block {
                format!(
                    "table inet lbcluster {{\n chain input {{\n  type filter hook input priority 0;\n  \
                     ip saddr {} tcp dport {CLUSTER_PORT} drop\n }}\n}}\n",
                    node_addr(i)
                )
            } else {
                "delete table inet lbcluster\n".to_owned()
            };
            let file = self.dir.join(format!("{}.nft", b.ns));
            fs::write(&file, script)?;
            let out = output_timeout(
                Command::new("ip").args(["netns", "exec", &b.ns, "nft", "-f"]).arg(&file),
                CMD_TIMEOUT,
            )?;
            ensure!(out.status.success(), "nft in {}: {}", b.ns, String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

}

impl Drop for Cluster {
    fn drop(&mut self) {
        let p = self.prefix.clone();
        for i in 1..=NODES {
            if let Err(e) = self.stop_lb(i) {
                eprintln!("cluster {p}: {e:#}");
            }
            if let Some(bin) = self.lb_bin.clone() {
                let _ = self.lb_down(i, &bin);
            }
            let _ = self.stop_bird(i, Signal::SIGTERM);
        }
        if let Some(mut b) = self.router_bird.take() {
            let _ = kill(Pid::from_raw(b.id() as i32), Signal::SIGTERM);
            let _ = b.wait();
        }
        for b in &mut self.backends {
            if let Some(s) = b.servers.take() {
                s.stop();
            }
        }
        if let Err(e) = unmount_under(&self.dir) {
            eprintln!("cluster {p}: {e:#}");
        }
        let _ = fs::remove_dir_all(&self.dir);
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cluster {p}: {e:#}");
            }
        }
        self.bpf_links.clear();
    }
}
