//! Scale-out end to end (`xtask::lab::cluster`): two balancer nodes, each running BIRD (the
//! repository's `packaging/bird/node.conf`) and `lb`, behind a router running BIRD
//! (`packaging/bird/router.conf`) that spreads the VIP's connections over both with ECMP. The
//! nodes share nothing; each client must still always reach the same backend, through either
//! node, also while a node is lost and after one node alone sees every backend down. Run as root
//! by `cargo xtask test`; the figures (requests lost, convergence times) are printed.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use lb::api::StatusReport;
use nix::sys::signal::Signal;
use tests::lb_bin;
use xtask::lab::cluster::{CLUSTER_VIP, Cluster, ClusterMode, ClusterSpec, EcmpHash};
use xtask::lab::{TrafficOptions, summarize};

const TIMEOUT: Duration = Duration::from_secs(2);
const CONVERGE: Duration = Duration::from_secs(30);

fn fail(c: &Cluster, msg: &str) -> ! {
    panic!("{msg}\n=== node 1 ===\n{}\n=== node 2 ===\n{}", c.node_log_tail(1, 25), c.node_log_tail(2, 25))
}

fn status(c: &Cluster, i: u32, bin: &Path) -> StatusReport {
    let out = c.lb_cli(i, bin, &["status", "--output", "json"]).unwrap_or_else(|e| panic!("{e:#}"));
    if !out.status.success() {
        fail(c, &format!("lb status on node {i}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status JSON: {e}"))
}

fn up(c: &mut Cluster, bin: &Path) {
    for i in [1, 2] {
        c.start_node(i, bin).unwrap_or_else(|e| panic!("{e:#}"));
    }
    if let Err(e) = c.wait_nexthops(&[1, 2], CONVERGE) {
        fail(c, &format!("{e:#}"));
    }
}

/// Each client's backend over `rounds` new connections (spread over both nodes by the
/// router); panics if a client reached two.
fn backends_of(c: &Cluster, rounds: usize) -> BTreeMap<Ipv4Addr, String> {
    let mut seen = BTreeMap::new();
    for _ in 0..rounds {
        for client in c.client_addrs() {
            let b = c.http_get(client, TIMEOUT).unwrap_or_else(|e| fail(c, &format!("{client}: {e:#}")));
            let first = seen.entry(client).or_insert_with(|| b.clone());
            if *first != b {
                fail(c, &format!("client {client} reached {first} and then {b}"));
            }
        }
    }
    seen
}

fn web(st: &StatusReport) -> &lb::api::ServiceReport {
    st.services.iter().find(|s| s.name == "web").expect("service web")
}

/// The backends' states on node `i`, once they are all `want` (health checks settle).
fn wait_states(c: &Cluster, i: u32, bin: &Path, want: &str) {
    let t = Instant::now();
    loop {
        let st = status(c, i, bin);
        if web(&st).backends.iter().all(|b| b.state == want) {
            return;
        }
        if t.elapsed() > CONVERGE {
            fail(c, &format!("node {i}'s backends never all became {want}: {:?}", web(&st).backends));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_nodes_agree_and_a_lost_node_moves_no_client() {
    let bin = lb_bin();
    let mut c = Cluster::create(ClusterSpec { clients: 40, backends: 3, mode: ClusterMode::Dsr, ecmp: EcmpHash::L4 })
        .unwrap_or_else(|e| panic!("{e:#}"));
    up(&mut c, &bin);

    // No state shared, same tables: the nodes' configs list the backends in opposite orders.
    let (s1, s2) = (status(&c, 1, &bin), status(&c, 2, &bin));
    assert_eq!(web(&s1).table_fingerprint, web(&s2).table_fingerprint, "the nodes' Maglev tables differ");
    for s in [&s1, &s2] {
        let a = s.announce.as_ref().expect("announcing");
        assert_eq!(a.announced, [CLUSTER_VIP.to_string()], "{a:?}");
    }
    let before = backends_of(&c, 6);
    let (p1, p2) = (web(&status(&c, 1, &bin)).counters.packets, web(&status(&c, 2, &bin)).counters.packets);
    assert!(p1 > 0 && p2 > 0, "ECMP must use both nodes: packets {p1} and {p2}");
    let distinct: std::collections::BTreeSet<&String> = before.values().collect();
    assert_eq!(distinct.len(), 3, "every backend gets clients: {before:?}");

    // Lose node 1: `lb down` (withdraw, serve through the grace time, detach), then its BIRD.
    // New connections from every client, and persistent ones from a few: an established
    // connection that the router moves to the other node must carry on.
    let clients = c.client_addrs();
    let (steady, persistent) = clients.split_at(30);
    let traffic = c
        .spawn_traffic(steady.to_vec(), TrafficOptions::new(Duration::from_millis(20)).timeout(Duration::from_secs(1)))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let kept = c
        .spawn_traffic(persistent.to_vec(), TrafficOptions::new(Duration::from_millis(20)).keep_alive().timeout(Duration::from_secs(2)))
        .unwrap_or_else(|e| panic!("{e:#}"));
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    let down = c.lb_down(1, &bin).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(down.status.success(), "lb down on node 1: {}", String::from_utf8_lossy(&down.stderr));
    let withdrawn = c.wait_nexthops(&[2], CONVERGE).unwrap_or_else(|e| fail(&c, &format!("{e:#}")));
    c.stop_bird(1, Signal::SIGKILL).unwrap();
    let lb_down_took = t0.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let records = traffic.stop();
    let sum = summarize(&records);
    let kept = summarize(&kept.stop());
    for (client, s) in &kept.clients {
        if s.connections != 1 || s.failures != 0 || s.distinct_backends().len() != 1 {
            fail(&c, &format!("persistent connection of {client} did not carry on through the failover:\n{kept}"));
        }
    }
    println!("cluster: {} persistent connections carried on through the failover ({} requests)", kept.clients.len(), kept.requests());
    println!(
        "cluster: node 1 lost (lb down, then BIRD killed): the router had moved the VIP to node 2 {withdrawn:?} after \
         lb down began (lb down took {lb_down_took:?}); {} of {} requests lost meanwhile",
        sum.failures(),
        sum.requests()
    );
    for (client, s) in &sum.clients {
        let want = &before[client];
        if s.distinct_backends().iter().any(|b| b != want) {
            fail(&c, &format!("client {client} moved during the failover (was on {want}):\n{sum}"));
        }
    }
    assert!(sum.requests() > 200, "too little traffic to judge: {sum}");
    // A withdrawal before the detach: at most a handful of connections in flight are lost.
    assert!(sum.failures() * 50 <= sum.requests(), "more than 2% of requests lost:\n{sum}");
    assert_eq!(backends_of(&c, 2), before, "after the failover");

    // Node 1 back: it announces again, and every client still has its backend.
    up(&mut c, &bin);
    assert_eq!(backends_of(&c, 3), before, "after node 1 came back");

    // Every backend down for node 2 only (its health checks are dropped): it withdraws, node 1
    // keeps serving, and no client moves.
    c.block_health_checks_from(2, true).unwrap_or_else(|e| panic!("{e:#}"));
    wait_states(&c, 2, &bin, "down");
    let took = c.wait_nexthops(&[1], CONVERGE).unwrap_or_else(|e| fail(&c, &format!("{e:#}")));
    println!("cluster: node 2 alone saw every backend down and withdrew; the router used node 1 only after {took:?}");
    let st2 = status(&c, 2, &bin);
    assert!(st2.announce.as_ref().unwrap().announced.is_empty(), "node 2 still announces: {:?}", st2.announce);
    assert!(web(&st2).fail_open, "node 2 fails open meanwhile");
    wait_states(&c, 1, &bin, "up");
    assert_eq!(backends_of(&c, 3), before, "while node 2 is withdrawn");
    c.block_health_checks_from(2, false).unwrap_or_else(|e| panic!("{e:#}"));
    wait_states(&c, 2, &bin, "up");
    c.wait_nexthops(&[1, 2], CONVERGE).unwrap_or_else(|e| fail(&c, &format!("{e:#}")));
    assert_eq!(backends_of(&c, 3), before, "after node 2 came back");

    // A daemon restart does not withdraw: the datapath keeps serving on its pins.
    c.stop_lb(1).unwrap_or_else(|e| panic!("{e:#}"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.router_nexthops().unwrap().len(), 2, "a stopped daemon must leave the announcement");
    assert_eq!(backends_of(&c, 2), before, "while node 1's daemon is stopped");
    c.start_node(1, &bin).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(status(&c, 1, &bin).announce.unwrap().announced, [CLUSTER_VIP.to_string()]);
}

#[test]
fn nat_replies_may_return_through_the_other_node() {
    let bin = lb_bin();
    // Every backend answers through node 2, whichever node the request came through.
    let mut c = Cluster::create(ClusterSpec { clients: 20, backends: 3, mode: ClusterMode::Nat { replies_via: 2 }, ecmp: EcmpHash::L4 })
        .unwrap_or_else(|e| panic!("{e:#}"));
    up(&mut c, &bin);
    let before = backends_of(&c, 6);
    let (s1, s2) = (status(&c, 1, &bin), status(&c, 2, &bin));
    assert_eq!(web(&s1).table_fingerprint, web(&s2).table_fingerprint);
    let (w1, w2) = (web(&s1).counters, web(&s2).counters);
    assert!(w1.packets > 0 && w2.packets > 0, "requests through both nodes: {w1:?} {w2:?}");
    assert_eq!(w1.reply_packets, 0, "node 1 sees no reply: {w1:?}");
    assert!(w2.reply_packets > 0, "node 2 translates every reply, also to requests node 1 forwarded: {w2:?}");
    assert_eq!(backends_of(&c, 2), before);
}
