//! Datapath benchmarks (run by `cargo xtask bench`, or as root with `cargo bench -p tests --bench
//! datapath`): figures printed and written to `target/bench/datapath.json`, never asserted.
//!
//! - **per packet**: BPF_PROG_TEST_RUN of the loaded XDP program (the `tests` fixture: namespace,
//!   `fixture_config()`) on one pinned CPU, against a trivial XDP_PASS program in the same harness:
//!   a hit (IPv4, IPv6: one client, pinned by its first packet), a miss (a new client each run,
//!   100.64.0.0 + n: Maglev pick + affinity insert; the fixture's 1024-entry table is full
//!   after the first batch, so every insert evicts, as in a long-running balancer whose LRU is
//!   always full; a miss into a 2M-entry table with room is printed for information), and traffic
//!   that is not for a VIP. The service counters check that every hit run was a hit and every
//!   miss run a miss; every run's verdict is checked.
//! - **scale**: the IPv4 hit (same method, same client) with the affinity table (capacity 2^21)
//!   filled to 1,000 and to 1,000,000 pins (BPF_MAP_UPDATE_BATCH), two fixtures side by side.
//!   Printed for information: a different random pinned client each run, where the 1M table's
//!   lines are cold.
//! - **veth**: two namespaces joined by a veth pair. On the generator's side a tiny XDP program
//!   run with BPF_F_TEST_XDP_LIVE_FRAMES rewrites each frame (TCP to VIP:80 from one of 65,536
//!   clients, at random, valid checksums) and sends it (XDP_TX) into the veth; on the balancer's
//!   side lb's program, attached natively, finds the client's pin (all pinned beforehand) and
//!   sends the rewritten frame back out (the backend's route is that same veth: XDP_TX), where an
//!   XDP_DROP sink ends it. The rate is the program's own counters (STATS tx + redirect) over a
//!   timed window; the baseline swaps (BPF_LINK_UPDATE, no ring rebuild) in a trivial XDP_TX
//!   program that counts in a per-CPU array. With two CPUs or more the veths use threaded NAPI:
//!   the generator (two threads, so that one sends while the other sleeps in the RCU grace
//!   period that ends every live-frames run) and the sink share the first CPU, the balancer's
//!   NAPI thread has the second to itself; its CPU time per packet is printed too, since the
//!   generator's CPU cannot saturate the baseline. The affinity and connection tables are sized
//!   as the README advises (twice the active clients and connections: 131,072). For information, a third window sends frames
//!   from 1,024 of the pinned clients only: their table lines stay in the CPU's caches, which
//!   shows how much of lb's cost per packet is the memory latency of a large affinity table.
//!
//! Every figure is the median of `LB_BENCH_REPS` repetitions (default 7; `LB_BENCH_QUICK=1`: 3
//! and shorter runs); within a repetition the cases run side by side, one after the other.
//! Debugging aids: `LB_BENCH_ONLY=veth` or `LB_BENCH_ONLY=per_packet` (that part alone, no
//! report), `LB_BENCH_WINDOW_MS`.
//! Namespaces are removed on drop, on Ctrl-C / SIGTERM, and (left by a killed run) at start.
//!
//! ## Method: single runs, not `repeat`
//!
//! With `repeat > 1` the kernel runs the program again on the buffer it has just rewritten: the
//! second run of a hit sees the backend's address, not the VIP, and measures "not ours". No VIP
//! frame is rewritten into itself, so every per-packet case (and the baseline, for the same
//! harness cost) is measured as single runs (`repeat = 1`): the kernel's `duration` of each run
//! (ns, it includes one `ktime_get_ns` pair and the bh disable/enable around the program: the
//! harness' fixed cost, which the baseline shows), averaged over a batch of runs; the figure is
//! the median of the batch means. Each case's runs alternate one by one with runs of the
//! baseline, so that both see the same machine (this one is shared: its speed drifts by tens of
//! percent within seconds); a case's ratio is the median over its batches of (case mean /
//! interleaved baseline mean), and `baseline_ns` the median of every interleaved baseline mean.
//! The two idempotent cases (baseline, not ours) are also run with a large `repeat` and printed
//! for information: that shows the fixed cost of a single run.
//!
//! Raw eBPF here (the baseline, the live-frames generator, its sink, the veth baseline) is written
//! as instructions and loaded with bpf(2), like xtask's lab programs: no eBPF toolchain needed.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd, RawFd},
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use lb_common::{AffinityKey, AffinityValue};
use tests::{FixtureNs, Loaded, Pkt, Pkt6, TCP_ACK, V6_CLIENT, XDP_PASS, XDP_REDIRECT, XDP_TX, monotonic_ns};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const VIP_MULTI: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
const BACKEND1: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 11);
/// On the client side, neither a VIP nor a backend.
const NOT_A_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);
/// Synthetic clients (misses, table fillers, the veth population) are 100.64.0.0 + n.
const SYNTH_BASE: u32 = 0x6440_0000;
/// Affinity capacity of the fixtures that need room (the scale fixtures, the roomy miss).
const BIG_AFFINITY: u32 = 2_097_152;
/// hit_many: pinned clients cycled through, and the table that holds them (half full, as the
/// Katran peer's `hit_65k` LRU of 131,072 entries holding 65,536 flows).
const MANY_CLIENTS: u32 = 65_536;
const MANY_AFFINITY: u32 = 131_072;
/// hit_many's clients are 100.96.0.0 + n (a /16 of their own, as the peer's).
const MANY_BASE: u32 = 0x6460_0000;

// ---------------------------------------------------------------------------------------------
// Settings, statistics, cleanup
// ---------------------------------------------------------------------------------------------

struct Settings {
    reps: usize,
    quick: bool,
    /// Single runs per batch (one batch per case per repetition).
    runs: usize,
    /// `repeat` of the informational kernel-loop runs.
    loop_repeat: u32,
    /// veth: measuring window, settling time after a program swap, first warm-up.
    window: Duration,
    settle: Duration,
    warmup: Duration,
}

impl Settings {
    fn from_env() -> Self {
        let quick = std::env::var("LB_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let reps = std::env::var("LB_BENCH_REPS").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0);
        let reps = reps.unwrap_or(if quick { 3 } else { 7 });
        let mut s = if quick {
            Self {
                reps,
                quick,
                runs: 5_000,
                loop_repeat: 200_000,
                window: Duration::from_millis(300),
                settle: Duration::from_millis(100),
                warmup: Duration::from_millis(300),
            }
        } else {
            Self {
                reps,
                quick,
                runs: 20_000,
                loop_repeat: 1_000_000,
                window: Duration::from_secs(1),
                settle: Duration::from_millis(200),
                warmup: Duration::from_millis(1000),
            }
        };
        // Debugging aid: a longer veth window (to watch it with perf or ethtool).
        if let Some(ms) = std::env::var("LB_BENCH_WINDOW_MS").ok().and_then(|v| v.parse().ok()) {
            s.window = Duration::from_millis(ms);
        }
        s
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    assert!(!v.is_empty());
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// `[min..max]` of a case's repetitions, with `digits` decimals.
fn spread_d(v: &[f64], digits: usize) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("[{lo:.digits$}..{hi:.digits$}]")
}

fn spread(v: &[f64]) -> String {
    spread_d(v, 1)
}

/// A small deterministic PRNG (xorshift64*), for picking clients.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u32) -> u32 {
        (((self.next() >> 32) * n as u64) >> 32) as u32
    }
}

/// Namespaces this process made, deleted by the signal thread on Ctrl-C / SIGTERM (Drop does it
/// otherwise); namespaces of earlier runs that died are removed at start.
static NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn register_ns(name: &str) {
    NAMESPACES.lock().unwrap_or_else(|e| e.into_inner()).push(name.to_owned());
}

fn del_ns(name: &str) {
    let _ = Command::new("ip").args(["netns", "del", name]).status();
    NAMESPACES.lock().unwrap_or_else(|e| e.into_inner()).retain(|n| n != name);
}

/// Blocks SIGINT/SIGTERM in every thread and handles them on one: delete our namespaces, exit.
/// Must run before any other thread is started.
fn install_signal_cleanup() {
    // SAFETY: plain libc calls on a local sigset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: `set` is a valid sigset, `sig` a valid out pointer.
        unsafe { libc::sigwait(&set, &mut sig) };
        let names = NAMESPACES.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for n in names {
            let _ = Command::new("ip").args(["netns", "del", &n]).status();
        }
        eprintln!("datapath bench: interrupted, namespaces removed");
        std::process::exit(128 + sig);
    });
}

/// Removes namespaces left by earlier runs of this benchmark that were killed (their pid is gone).
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        // Ours: lbbench<pid>-gen / lbbench<pid>-lb, and the fixture's lbdp<pid>-<n>-bench.
        let pid = if let Some(rest) = name.strip_prefix("lbbench") {
            rest.split('-').next()
        } else if name.starts_with("lbdp") && name.ends_with("-bench") {
            name.strip_prefix("lbdp").and_then(|r| r.split('-').next())
        } else {
            None
        };
        if let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok())
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            println!("removing namespace {name} left by an earlier run");
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Other processes using more than 10% of a CPU over half a second: they disturb the figures
/// (this machine may be shared with other benchmarks or builds).
fn busy_others() -> Vec<String> {
    let sample = || -> std::collections::HashMap<i32, (u64, String)> {
        let mut m = std::collections::HashMap::new();
        let Ok(dir) = std::fs::read_dir("/proc") else { return m };
        for e in dir.filter_map(|e| e.ok()) {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            let Ok(st) = std::fs::read_to_string(e.path().join("stat")) else { continue };
            // pid (comm) state ppid ... utime(14) stime(15): fields after the closing parenthesis.
            let Some((head, rest)) = st.rsplit_once(") ") else { continue };
            let comm = head.split_once(" (").map(|(_, c)| c.to_owned()).unwrap_or_default();
            let f: Vec<&str> = rest.split_whitespace().collect();
            let t = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            m.insert(pid, (t, comm));
        }
        m
    };
    let me = std::process::id() as i32;
    let a = sample();
    std::thread::sleep(Duration::from_millis(500));
    let b = sample();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut out: Vec<(f64, String)> = b
        .iter()
        .filter(|(pid, _)| **pid != me)
        .filter_map(|(pid, (t, comm))| {
            let pct = (t.saturating_sub(a.get(pid)?.0)) as f64 / hz / 0.5 * 100.0;
            (pct > 10.0).then(|| (pct, format!("{comm}[{pid}] {pct:.0}%")))
        })
        .collect();
    out.sort_by(|x, y| y.0.total_cmp(&x.0));
    out.into_iter().map(|(_, s)| s).collect()
}

fn warn_if_busy(when: &str) -> bool {
    let busy = busy_others();
    if !busy.is_empty() {
        println!("WARNING ({when}): other processes are using CPU, figures may be disturbed: {}", busy.join(", "));
    }
    !busy.is_empty()
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("sched_getaffinity");
    (0..nix::sched::CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect()
}

fn pin_to(pid: i32, cpu: usize) -> nix::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(pid), &set)
}

// ---------------------------------------------------------------------------------------------
// Raw bpf(2): program load, test run, maps, XDP links (lb_common::sys, the project's one layer)
// ---------------------------------------------------------------------------------------------

mod raw {
    use std::{
        io,
        os::fd::{AsRawFd as _, BorrowedFd, OwnedFd},
    };

    use anyhow::Result;
    pub use lb_common::sys::{
        FUNC_GET_PRANDOM_U32, FUNC_MAP_LOOKUP_ELEM, Insn, R0, R1, R2, R3, R4, R6, R10, add_imm, add_reg, and_imm, call, exit,
        jeq_imm, jgt_reg, ld_map_fd, ldx_dw, ldx_w, link_update as replace_prog, mov_imm, mov_reg, rsh_imm, st_h, st_w,
        stx_dw, stx_h, test_run, xor_imm,
    };
    use lb_common::sys::{self, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_PROG_TYPE_XDP, BPF_XDP};

    /// Loads an XDP program (expected attach type XDP, as aya loads lb's: a link swaps only
    /// programs of the same attach type); a rejection carries the verifier log.
    pub fn load_xdp(name: &str, insns: &[Insn]) -> Result<OwnedFd> {
        sys::load_program(name, BPF_PROG_TYPE_XDP, BPF_XDP, insns).map_err(|e| anyhow::anyhow!("loading {name}: {e}"))
    }

    /// A one-slot per-CPU array of u64 (a packet counter).
    pub fn percpu_counter() -> io::Result<OwnedFd> {
        sys::create_map("bench_count", BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 1)
    }

    /// The sum over CPUs of the per-CPU counter.
    pub fn percpu_counter_sum(map: BorrowedFd<'_>) -> io::Result<u64> {
        let ncpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let key = 0u32;
        let mut vals = vec![0u64; ncpus];
        // SAFETY: a u32 key and one u64 per possible CPU, the map's sizes.
        unsafe { sys::lookup_elem(map.as_raw_fd(), (&raw const key).cast(), vals.as_mut_ptr().cast()) }?;
        Ok(vals.iter().sum())
    }

    /// Attaches `prog` to `ifindex` of the calling thread's namespace (driver mode when the
    /// device has one, as veth does); detached when the link closes or the device goes.
    pub fn attach_xdp(prog: BorrowedFd<'_>, ifindex: u32) -> io::Result<OwnedFd> {
        sys::link_create(prog, ifindex, BPF_XDP)
    }
}

use raw::{
    R0, R1, R2, R3, R4, R6, R10, add_imm, add_reg, and_imm, call, exit, jeq_imm, jgt_reg, ldx_dw, ldx_w, mov_imm,
    mov_reg, rsh_imm, st_h, st_w, stx_dw, stx_h, xor_imm,
};

/// `r0 = action; exit`.
fn trivial(action: u32) -> Vec<raw::Insn> {
    vec![mov_imm(R0, action as i32), exit()]
}

/// XDP_TX and one per-CPU counter increment (the veth baseline: it counts what it sends, as the
/// balancer counts its verdicts).
fn counting_tx(map: RawFd) -> Vec<raw::Insn> {
    let mut p = vec![st_w(R10, -4, 0), mov_reg(R2, R10), add_imm(R2, -4)];
    p.extend(raw::ld_map_fd(R1, map));
    p.extend([
        call(raw::FUNC_MAP_LOOKUP_ELEM),
        jeq_imm(R0, 0, 3),
        ldx_dw(R1, R0, 0),
        add_imm(R1, 1),
        stx_dw(R0, R1, 0),
        mov_imm(R0, XDP_TX as i32),
        exit(),
    ]);
    p
}

/// Ones' complement sum of the 16-bit little-endian words of `b` (even length): the byte-swapped
/// twin of the Internet checksum sum, which is what the generator adds to in registers.
fn le_sum(b: &[u8]) -> u32 {
    b.chunks(2).map(|w| u16::from_le_bytes([w[0], w[1]]) as u32).sum()
}

/// The live-frames generator: rewrites the headers of every frame from `template` (the
/// balancer rewrote the last frame on this page), sets the client address to 100.64.x.y with a
/// random x.y masked by `mask` (0xffff: 65,536 clients), fixes the IPv4 and TCP checksums for it,
/// and sends it (XDP_TX: out of the test run's ingress device).
fn generator(template: &[u8], mask: u16) -> Vec<raw::Insn> {
    const HDR: usize = 54; // Ethernet + IPv4 + TCP
    assert!(template.len() >= HDR && template[26..28] == [100, 64] && template[28..30] == [0, 0]);
    assert!(template[24..26] == [0, 0] && template[50..52] == [0, 0], "checksums zero in the template");
    let c_ip = le_sum(&template[14..34]);
    let tcp = &template[34..];
    let mut pseudo = template[26..34].to_vec();
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    assert!(tcp.len().is_multiple_of(2));
    let c_tcp = le_sum(&pseudo) + le_sum(tcp);
    let fold_into = |p: &mut Vec<raw::Insn>, constant: u32, at: i16| {
        p.extend([mov_reg(R1, R0), add_imm(R1, constant as i32)]);
        for _ in 0..2 {
            p.extend([mov_reg(R2, R1), rsh_imm(R2, 16), and_imm(R1, 0xffff), add_reg(R1, R2)]);
        }
        p.extend([xor_imm(R1, 0xffff), stx_h(R6, R1, at)]);
    };
    let mut p = vec![
        ldx_w(R2, R1, 0), // data
        ldx_w(R3, R1, 4), // data_end
        mov_reg(R4, R2),
        add_imm(R4, HDR as i32),
        jgt_reg(R4, R3, 0), // -> drop, patched below
    ];
    let bound_check = p.len() - 1;
    for off in (0..HDR - 2).step_by(4) {
        p.push(st_w(R2, off as i16, i32::from_le_bytes(template[off..off + 4].try_into().unwrap())));
    }
    p.push(st_h(R2, (HDR - 2) as i16, u16::from_le_bytes([template[HDR - 2], template[HDR - 1]]) as i32));
    p.extend([mov_reg(R6, R2), call(raw::FUNC_GET_PRANDOM_U32), and_imm(R0, mask as i32), stx_h(R6, R0, 28)]);
    fold_into(&mut p, c_ip, 24);
    fold_into(&mut p, c_tcp, 50);
    p.extend([mov_imm(R0, XDP_TX as i32), exit()]);
    let drop_at = p.len();
    p.extend([mov_imm(R0, tests::XDP_DROP as i32), exit()]);
    p[bound_check].off = (drop_at - bound_check - 1) as i16;
    p
}

/// struct xdp_md for a frame of `len` bytes arriving on `ifindex`, queue 0.
fn xdp_ctx(ifindex: u32, len: usize) -> [u8; 24] {
    let mut c = [0u8; 24];
    for (i, v) in [0u32, len as u32, 0, ifindex, 0, 0].iter().enumerate() {
        c[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    c
}

// ---------------------------------------------------------------------------------------------
// Per packet and scale: BPF_PROG_TEST_RUN
// ---------------------------------------------------------------------------------------------

/// What to run: the balancer (through aya) or a raw program.
#[derive(Clone, Copy)]
enum Prog<'a> {
    Lb(&'a Xdp),
    Raw(BorrowedFd<'a>),
}

/// One BPF_PROG_TEST_RUN: (verdict, kernel ns per run).
fn run_once(p: Prog<'_>, frame: &[u8], ifindex: u32, out: &mut [u8], repeat: u32) -> (u32, u64) {
    let ctx = xdp_ctx(ifindex, frame.len());
    match p {
        Prog::Lb(x) => {
            let opts = TestRunOptions {
                data_in: Some(frame),
                data_out: Some(out),
                ctx_in: Some(&ctx),
                repeat,
                ..TestRunOptions::default()
            };
            let r = x.test_run(opts).unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"));
            (r.return_value, r.duration.as_nanos() as u64)
        }
        Prog::Raw(fd) => {
            let (v, d) = raw::test_run(fd, frame, Some(out), &ctx, repeat, None)
                .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"));
            (v, d as u64)
        }
    }
}

/// `n` single runs of `p` (frame `i % frames.len()` for run `i`), each followed by a run of the
/// baseline program `base` on the first frame: the mean kernel ns per run of `p` and of `base`.
/// Every run of `p` must give `expect` (a wrong verdict means the fixture is wrong, not slow).
fn batch(
    p: Prog<'_>,
    base: BorrowedFd<'_>,
    frames: &[Vec<u8>],
    n: usize,
    ifindex: u32,
    expect: u32,
    what: &str,
) -> (f64, f64) {
    let mut out = vec![0u8; 512];
    let (mut total, mut total_base) = (0u64, 0u64);
    for i in 0..n {
        let (v, ns) = run_once(p, &frames[i % frames.len()], ifindex, &mut out, 1);
        assert_eq!(v, expect, "{what}: verdict of run {i}");
        total += ns;
        let (v, ns) = run_once(Prog::Raw(base), &frames[0], ifindex, &mut out, 1);
        assert_eq!(v, XDP_PASS, "baseline: verdict of run {i}");
        total_base += ns;
    }
    (total as f64 / n as f64, total_base as f64 / n as f64)
}

/// A case's batch means and, for each, its ratio to the baseline runs interleaved with it.
#[derive(Default)]
struct Case {
    ns: Vec<f64>,
    ratio: Vec<f64>,
}

impl Case {
    fn push(&mut self, (ns, base_ns): (f64, f64), baseline: &mut Vec<f64>) {
        self.ns.push(ns);
        self.ratio.push(ns / base_ns);
        baseline.push(base_ns);
    }
}

fn v4_word(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

fn synth(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(SYNTH_BASE + n)
}

fn tcp4(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    Pkt::tcp(src, 40000, dst, 80).bytes()
}

/// Writes a live pin to `backend_id` for each IPv4 client in `clients` (BPF_MAP_UPDATE_BATCH,
/// through the datapath's typed API); returns how many were written.
fn fill_affinity(
    dp: &mut lb::datapath::Datapath,
    service_id: u32,
    backend_id: u32,
    clients: impl Iterator<Item = Ipv4Addr>,
) -> usize {
    let now = monotonic_ns();
    let value = AffinityValue { backend_id, flags: 0, last_seen_ns: now, created_ns: now };
    let entries: Vec<(AffinityKey, AffinityValue)> =
        clients.map(|c| (AffinityKey { service_id, addr: [v4_word(c), 0, 0, 0] }, value)).collect();
    dp.write_affinity_batch(&entries).expect("BPF_MAP_UPDATE_BATCH on AFFINITY")
}

#[derive(Default)]
struct PerPacket {
    /// Every interleaved baseline batch mean.
    baseline: Vec<f64>,
    hit_v4: Case,
    hit_v6: Case,
    miss_v4: Case,
    miss_v4_room: Case,
    /// A new client of a service with `[services.balance]` whose table has a backend over the
    /// load bound left out (the placement path is the same; the table differs).
    miss_bounded_v4: Case,
    syn_v4: Case,
    handshake_v4: Case,
    other: Case,
    loop_baseline: Vec<f64>,
    loop_other: Vec<f64>,
    /// A different one of [`MANY_CLIENTS`] pinned clients each run, in a fixed shuffled cycle.
    hit_many: Case,
    hit_1k: Case,
    hit_1m: Case,
    spread_1k: Case,
    spread_1m: Case,
    cpu: usize,
    fill_1m_secs: f64,
}

/// Per packet and scale, in one fixture namespace on one pinned CPU.
fn per_packet_and_scale(s: &Settings, cpu: usize) -> PerPacket {
    let ns = FixtureNs::new("bench");
    register_ns(&ns.name);
    let r = ns.run(|| {
        pin_to(0, cpu).expect("pinning the benchmark thread");
        let mut r = PerPacket { cpu, ..Default::default() };
        let cl = FixtureNs::ifindex("cl");
        let mut big = tests::fixture_config();
        big.datapath.affinity_entries = BIG_AFFINITY;
        // The tests' fixture (1024-entry affinity table: full after the first misses, so every
        // later miss evicts, as in a long-running balancer) ...
        let mut fx = Loaded::from_config(tests::fixture_config());
        // ... and the same with room for every miss of the run (no eviction), for information.
        let mut roomy = Loaded::from_config(big.clone());
        // The tests' fixture with bounded loads on service `multi` and two of its three backends
        // over the bound (out of its table: new clients take their next choice, 10.1.0.11, the
        // one backend with a neighbour in the fixture, so every run is redirected as miss_v4's).
        let mut balanced_cfg = tests::fixture_config();
        tests::service_mut(&mut balanced_cfg, "multi").balance.load_bound = Some(1.25);
        let mut bounded = Loaded::from_config(balanced_cfg);
        {
            let i = bounded.rt.services.iter().position(|s| s.config.name == "multi").expect("multi");
            for b in bounded.rt.services[i].backends.iter_mut().filter(|b| b.config.address != IpAddr::V4(BACKEND1)) {
                b.balance.over_bound = true;
            }
            let Loaded { rt, dp } = &mut bounded;
            assert!(rt.rebalance(dp, i).expect("rebalancing multi"), "the bounded table differs from the plain one");
        }
        // hit_many: 65,536 clients with an established connection each (a pin and a connection
        // entry, in tables of 131,072), visited in a fixed shuffled order (seeded Fisher-Yates),
        // the whole cycle per batch: the tables are no longer in the CPU's caches. As the peer's
        // hit_65k (Katran's flow LRU holding 65,536 flows).
        let mut many_cfg = tests::fixture_config();
        many_cfg.datapath.affinity_entries = MANY_AFFINITY;
        many_cfg.datapath.flow_entries = MANY_AFFINITY;
        let mut many = Loaded::from_config(many_cfg);
        let many_clients: Vec<Ipv4Addr> = {
            let web_many = many.service("web").entry.id;
            let b1 = many.backend_id("web", IpAddr::V4(BACKEND1));
            let all: Vec<Ipv4Addr> = (0..MANY_CLIENTS).map(|n| Ipv4Addr::from(MANY_BASE + n)).collect();
            let n = fill_affinity(&mut many.dp, web_many, b1, all.iter().copied());
            assert_eq!(n, MANY_CLIENTS as usize);
            // Each client's connection: its first PSH|ACK through the program writes the entry.
            let mut out = vec![0u8; 512];
            for c in &all {
                let (v, _) = run_once(Prog::Lb(many.dp.program()), &tcp4(*c, VIP), cl, &mut out, 1);
                assert_eq!(v, XDP_REDIRECT, "hit_many: a client's first packet");
            }
            let c = many.dp.service_counters(web_many).expect("service counters");
            assert_eq!((c.conns, c.new_pins), (MANY_CLIENTS as u64, 0), "hit_many: a connection entry per client, no new pin");
            let mut order = all;
            let mut shuffle = Rng(0x6553_6000_5eed_f00d);
            for i in (1..order.len()).rev() {
                order.swap(i, shuffle.below(i as u32 + 1) as usize);
            }
            order
        };
        // The scale fixtures: the big table filled to 1,000 and to 1,000,000 pins.
        let mut s1k = Loaded::from_config(big.clone());
        let mut s1m = Loaded::from_config(big);
        let base = raw::load_xdp("bench_pass", &trivial(XDP_PASS)).expect("loading the baseline program");

        let hit4 = vec![tcp4(CLIENT, VIP)];
        let hit6 = vec![Pkt6::tcp(V6_CLIENT, 40000, VIP6, 80).bytes()];
        let other = vec![tcp4(CLIENT, NOT_A_VIP)];
        let web = fx.service("web").entry.id;
        let web6 = fx.service("web6").entry.id;
        let mut out = vec![0u8; 512];
        // Pin the measured clients (their first packet is a miss).
        let mut first = |l: &mut Loaded, f: &[u8]| {
            let (v, _) = run_once(Prog::Lb(l.dp.program()), f, cl, &mut out, 1);
            assert_eq!(v, XDP_REDIRECT, "first packet of a measured client");
        };
        first(&mut fx, &hit4[0]);
        first(&mut fx, &hit6[0]);
        first(&mut s1k, &hit4[0]);
        first(&mut s1m, &hit4[0]);
        // Fill the scale tables: the client's pin plus 999 / 999,999 others of the same service.
        let web_s = s1k.service("web").entry.id;
        let b1 = s1k.backend_id("web", IpAddr::V4(BACKEND1));
        let n = fill_affinity(&mut s1k.dp, web_s, b1, (1..1000).map(synth));
        assert_eq!(n, 999);
        let t = Instant::now();
        let web_m = s1m.service("web").entry.id;
        let b1m = s1m.backend_id("web", IpAddr::V4(BACKEND1));
        let n = fill_affinity(&mut s1m.dp, web_m, b1m, (1..1_000_000).map(synth));
        assert_eq!(n, 999_999);
        r.fill_1m_secs = t.elapsed().as_secs_f64();
        // The LRU must not have evicted anything: spot-check 1000 fillers (the hit checks below
        // catch a lost client pin).
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        {
            let m: aya::maps::HashMap<&aya::maps::MapData, AffinityKey, AffinityValue> =
                aya::maps::HashMap::try_from(s1m.dp.ebpf_mut().map("AFFINITY").expect("AFFINITY")).expect("AFFINITY");
            for _ in 0..1000 {
                let i = 1 + rng.below(999_999);
                let k = AffinityKey { service_id: web_m, addr: [v4_word(synth(i)), 0, 0, 0] };
                assert!(m.get(&k, 0).is_ok(), "filler {i} missing from the 1M table");
            }
        }

        let mut next_client = 1u32; // misses: 100.64.0.0 + n, never repeated
        let hits = |l: &Loaded, id: u32| {
            let c = l.dp.service_counters(id).expect("service counters");
            (c.hits, c.new_pins)
        };
        let b = base.as_fd();
        for _ in 0..s.reps {
            let bl = &mut r.baseline;
            // hit, IPv4 and IPv6 (one client, pinned; the counters prove every run was a hit)
            let before = hits(&fx, web);
            r.hit_v4.push(batch(Prog::Lb(fx.dp.program()), b, &hit4, s.runs, cl, XDP_REDIRECT, "hit_v4"), bl);
            let after = hits(&fx, web);
            assert_eq!((after.0 - before.0, after.1 - before.1), (s.runs as u64, 0), "hit_v4: every run a hit");
            let before = hits(&fx, web6);
            r.hit_v6.push(batch(Prog::Lb(fx.dp.program()), b, &hit6, s.runs, cl, XDP_REDIRECT, "hit_v6"), bl);
            let after = hits(&fx, web6);
            assert_eq!((after.0 - before.0, after.1 - before.1), (s.runs as u64, 0), "hit_v6: every run a hit");
            // miss: a new client each run, in the tests' full table and in the roomy one
            for (l, into) in [(&mut fx, &mut r.miss_v4), (&mut roomy, &mut r.miss_v4_room)] {
                let frames: Vec<Vec<u8>> = (0..s.runs as u32).map(|i| tcp4(synth(next_client + i), VIP)).collect();
                next_client += s.runs as u32;
                let id = l.service("web").entry.id;
                let before = hits(l, id);
                into.push(batch(Prog::Lb(l.dp.program()), b, &frames, s.runs, cl, XDP_REDIRECT, "miss_v4"), bl);
                let after = hits(l, id);
                assert_eq!((after.0 - before.0, after.1 - before.1), (0, s.runs as u64), "miss_v4: every run a miss");
            }
            // miss, bounded: a new client each run to `multi` with a backend over the bound
            {
                let frames: Vec<Vec<u8>> = (0..s.runs as u32).map(|i| tcp4(synth(next_client + i), VIP_MULTI)).collect();
                next_client += s.runs as u32;
                let id = bounded.service("multi").entry.id;
                let before = hits(&bounded, id);
                r.miss_bounded_v4.push(batch(Prog::Lb(bounded.dp.program()), b, &frames, s.runs, cl, XDP_REDIRECT, "miss_bounded_v4"), bl);
                let after = hits(&bounded, id);
                assert_eq!((after.0 - before.0, after.1 - before.1), (0, s.runs as u64), "miss_bounded_v4: every run a miss");
            }
            // A new client's SYN (writes nothing: pin lookup, Maglev, connection lookup), then
            // a new client's handshake-completing ACK (writes its pin and its connection entry).
            let syns: Vec<Vec<u8>> =
                (0..s.runs as u32).map(|i| Pkt::syn(synth(next_client + i), 40000, VIP, 80).bytes()).collect();
            next_client += s.runs as u32;
            let (before, syn_before) = (hits(&fx, web), fx.stat("syn"));
            r.syn_v4.push(batch(Prog::Lb(fx.dp.program()), b, &syns, s.runs, cl, XDP_REDIRECT, "syn_v4"), bl);
            let after = hits(&fx, web);
            assert_eq!((after.1 - before.1, fx.stat("syn") - syn_before), (0, s.runs as u64), "syn_v4: no pin, every run a SYN");
            let acks: Vec<Vec<u8>> = (0..s.runs as u32)
                .map(|i| Pkt { tcp_flags: TCP_ACK, payload: Vec::new(), ..Pkt::tcp(synth(next_client + i), 40000, VIP, 80) }.bytes())
                .collect();
            next_client += s.runs as u32;
            let (before, conns_before) = (hits(&fx, web), fx.stat("conn_new"));
            r.handshake_v4.push(batch(Prog::Lb(fx.dp.program()), b, &acks, s.runs, cl, XDP_REDIRECT, "handshake_v4"), bl);
            let after = hits(&fx, web);
            assert_eq!(
                (after.1 - before.1, fx.stat("conn_new") - conns_before),
                (s.runs as u64, s.runs as u64),
                "handshake_v4: every run a new pin and a new connection entry"
            );
            // hit, many clients: the whole cycle, once unmeasured (so that every connection's
            // stamp is fresh: a real client sending 20 packets/s refreshes its entries on one
            // packet in 20; here the cycle comes round only every few seconds, and every packet
            // would refresh), then measured.
            {
                let frames: Vec<Vec<u8>> = many_clients.iter().map(|c| tcp4(*c, VIP)).collect();
                let mut out = vec![0u8; 512];
                for f in &frames {
                    let (v, _) = run_once(Prog::Lb(many.dp.program()), f, cl, &mut out, 1);
                    assert_eq!(v, XDP_REDIRECT, "hit_many: warm-up pass");
                }
                let id = many.service("web").entry.id;
                let (before, conns) = (hits(&many, id), many.stat("conn_new"));
                r.hit_many.push(batch(Prog::Lb(many.dp.program()), b, &frames, frames.len(), cl, XDP_REDIRECT, "hit_many"), bl);
                let after = hits(&many, id);
                assert_eq!(
                    (after.0 - before.0, after.1 - before.1, many.stat("conn_new") - conns),
                    (frames.len() as u64, 0, 0),
                    "hit_many: every run a hit of an established connection"
                );
            }
            // not for a VIP
            r.other.push(batch(Prog::Lb(fx.dp.program()), b, &other, s.runs, cl, XDP_PASS, "other"), bl);
            // scale: the same hit with 1k and 1M pins in the table
            r.hit_1k.push(batch(Prog::Lb(s1k.dp.program()), b, &hit4, s.runs, cl, XDP_REDIRECT, "hit_1k"), bl);
            r.hit_1m.push(batch(Prog::Lb(s1m.dp.program()), b, &hit4, s.runs, cl, XDP_REDIRECT, "hit_1m"), bl);
            // information: a different pinned client each run, at random over the whole table
            let spread = |rng: &mut Rng, n: u32| -> Vec<Vec<u8>> {
                (0..s.runs).map(|_| tcp4(synth(1 + rng.below(n)), VIP)).collect()
            };
            let f1k = spread(&mut rng, 999);
            let f1m = spread(&mut rng, 999_999);
            let before = hits(&s1m, web_m);
            r.spread_1k.push(batch(Prog::Lb(s1k.dp.program()), b, &f1k, s.runs, cl, XDP_REDIRECT, "spread_1k"), bl);
            r.spread_1m.push(batch(Prog::Lb(s1m.dp.program()), b, &f1m, s.runs, cl, XDP_REDIRECT, "spread_1m"), bl);
            let after = hits(&s1m, web_m);
            assert_eq!(after.1 - before.1, 0, "spread_1m: every run a hit");
            // information: the idempotent cases in the kernel's own loop
            let (v, ns) = run_once(Prog::Raw(base.as_fd()), &hit4[0], cl, &mut out, s.loop_repeat);
            assert_eq!(v, XDP_PASS);
            r.loop_baseline.push(ns as f64);
            let (v, ns) = run_once(Prog::Lb(fx.dp.program()), &other[0], cl, &mut out, s.loop_repeat);
            assert_eq!(v, XDP_PASS);
            r.loop_other.push(ns as f64);
            eprint!(".");
        }
        eprintln!();
        r
    });
    // FixtureNs removes itself on drop.
    NAMESPACES.lock().unwrap_or_else(|e| e.into_inner()).retain(|n| *n != ns.name);
    r
}

// ---------------------------------------------------------------------------------------------
// veth: live frames through the program attached natively
// ---------------------------------------------------------------------------------------------

const MAC_GEN: [u8; 6] = [0x02, 0, 0, 0, 0xbe, 0x01];
const MAC_BAL: [u8; 6] = [0x02, 0, 0, 0, 0xbe, 0x02];

fn mac_str(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn ip_cmd(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Two namespaces joined by a veth pair: the generator side (`gen`, device `gen_dev`) and the
/// balancer side (`bal`, device `bal_dev`, 10.0.0.1/24 for clients and 10.1.0.1/24 with the
/// backend 10.1.0.11 resolved to the generator's MAC, forwarding on): the balancer's FIB sends
/// the backend's traffic back out of the same device (XDP_TX), where a sink drops it. Removed on
/// drop.
struct VethLab {
    gen_ns: String,
    bal_ns: String,
    gen_dev: String,
    bal_dev: String,
}

impl VethLab {
    fn new() -> Result<Self> {
        let pid = std::process::id();
        let lab = Self {
            gen_ns: format!("lbbench{pid}-gen"),
            bal_ns: format!("lbbench{pid}-lb"),
            gen_dev: format!("lbg{pid}"),
            bal_dev: format!("lbl{pid}"),
        };
        for ns in [&lab.gen_ns, &lab.bal_ns] {
            ip_cmd(&["netns", "add", ns])?;
            register_ns(ns);
        }
        let (g, b) = (lab.gen_ns.as_str(), lab.bal_ns.as_str());
        let (gd, bd) = (lab.gen_dev.as_str(), lab.bal_dev.as_str());
        ip_cmd(&[
            "-n", g, "link", "add", gd, "address", &mac_str(MAC_GEN), "type", "veth", "peer", "name", bd, "address",
            &mac_str(MAC_BAL), "netns", b,
        ])?;
        for (ns, dev) in [(g, gd), (b, bd)] {
            ip_cmd(&["netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
            ip_cmd(&["-n", ns, "link", "set", "lo", "up"])?;
            ip_cmd(&["-n", ns, "link", "set", dev, "up"])?;
        }
        ip_cmd(&["-n", b, "addr", "add", "10.0.0.1/24", "dev", bd])?;
        ip_cmd(&["-n", b, "addr", "add", "10.1.0.1/24", "dev", bd])?;
        ip_cmd(&["-n", b, "neigh", "replace", "10.1.0.11", "lladdr", &mac_str(MAC_GEN), "dev", bd, "nud", "permanent"])?;
        ip_cmd(&["netns", "exec", b, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        Ok(lab)
    }
}

impl Drop for VethLab {
    fn drop(&mut self) {
        del_ns(&self.gen_ns.clone());
        del_ns(&self.bal_ns.clone());
    }
}

/// Switches `dev` of namespace `ns` to threaded NAPI and pins its NAPI thread(s) to `cpu`.
fn napi_thread_on(ns: &str, dev: &str, cpu: usize) -> Result<Vec<i32>> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", &format!("echo 1 > /sys/class/net/{dev}/threaded")])
        .output()?;
    if !out.status.success() {
        bail!("threaded NAPI on {dev}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    // Kernel thread names are cut at 15 characters: "napi/<dev>-<id>".
    let prefix: String = format!("napi/{dev}-").chars().take(15).collect();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc")?.filter_map(|e| e.ok()) {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            if std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim_end().starts_with(&prefix)) {
                pids.push(pid);
            }
        }
        if !pids.is_empty() {
            for &p in &pids {
                pin_to(p, cpu).with_context(|| format!("pinning NAPI thread {p} of {dev}"))?;
            }
            return Ok(pids);
        }
        if Instant::now() > deadline {
            bail!("no NAPI thread of {dev} appeared");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Veth {
    lb: Vec<f64>,
    baseline: Vec<f64>,
    /// lb with frames from `SMALL_POPULATION` of the clients only (its table lines stay cached).
    lb_small: Vec<f64>,
    lb_small_cpu_ns: Vec<f64>,
    /// What the generator offered while each figure was taken.
    offered_lb: Vec<f64>,
    offered_baseline: Vec<f64>,
    /// Share of the balancer's verdicts that were tx/redirect, and of its packets that hit a pin.
    forwarded_share: f64,
    hit_share: f64,
    layout: String,
    /// CPU time of the balancer's NAPI thread per packet forwarded, ns (threaded NAPI only):
    /// the cost per packet even where the generator cannot saturate the baseline.
    lb_cpu_ns: Vec<f64>,
    baseline_cpu_ns: Vec<f64>,
}

/// Time the threads `pids` have run, ns (/proc/<pid>/schedstat).
fn cpu_ns(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

/// The generator's frame: a client of 100.64.0.0/16 to VIP:80, TCP, 64 bytes (the client's
/// low 16 bits and both checksums are filled in by the program).
fn generator_template() -> Vec<u8> {
    let mut p = Pkt::tcp(Ipv4Addr::new(100, 64, 0, 0), 40000, VIP, 80);
    p.eth_dst = MAC_BAL;
    p.eth_src = MAC_GEN;
    p.payload = b"0123456789".to_vec();
    let mut f = p.bytes();
    f[24] = 0;
    f[25] = 0;
    f[50] = 0;
    f[51] = 0;
    assert_eq!(f.len(), 64);
    f
}

/// The veth balancer's config: service web's one backend, no health checks, tables for the
/// whole population (twice its connections).
fn veth_config(dev: &str) -> lb::config::Config {
    let mut dp = tests::datapath_config(&[dev]);
    dp.affinity_entries = 131_072;
    dp.flow_entries = 131_072;
    dp.max_services = 4;
    dp.max_backends = 4;
    dp.maglev_table_size = 251;
    dp.hash_seed = 7;
    let mut web = tests::service("web", "10.0.0.100", 80, vec![tests::backend("10.1.0.11", 8080)]);
    web.health.kind = lb::config::HealthKind::None;
    tests::config(dp, vec![web])
}

/// Clients of the veth population (all pinned) and of the informational small one (a subset).
const POPULATION: u32 = 65536;
const SMALL_POPULATION: u32 = 1024;

/// Which veth window is being measured.
#[derive(Clone, Copy, PartialEq)]
enum Window {
    Baseline,
    Lb,
    LbSmall,
}

fn veth(s: &Settings, cpus: &[usize]) -> Result<Veth> {
    let lab = VethLab::new()?;
    // Generator on the first CPU with the sink's NAPI; the balancer's NAPI alone on the second.
    let (gen_cpu, bal_cpu) = (cpus[0], *cpus.get(1).unwrap_or(&cpus[0]));
    let template = generator_template();
    let gen_prog = raw::load_xdp("bench_gen", &generator(&template, (POPULATION - 1) as u16))?;
    let gen_small = raw::load_xdp("bench_gen_small", &generator(&template, (SMALL_POPULATION - 1) as u16))?;
    let small = AtomicBool::new(false);
    let sink = raw::load_xdp("bench_sink", &trivial(tests::XDP_DROP))?;
    let counter = raw::percpu_counter().context("creating the baseline's counter")?;
    let base = raw::load_xdp("bench_tx", &counting_tx(counter.as_raw_fd()))?;

    // The generator's side: the sink (XDP_DROP: the frames the balancer sends back end there, and
    // an XDP program gives the device the NAPI that receives XDP frames); check the generator.
    let (gen_ifindex, _sink_link) = xtask::lab::in_netns(&lab.gen_ns, || -> Result<(u32, OwnedFd)> {
        let idx = nix::net::if_::if_nametoindex(lab.gen_dev.as_str())?;
        let link = raw::attach_xdp(sink.as_fd(), idx).context("attaching the sink")?;
        let mut out = vec![0u8; 256];
        let (v, _) = raw::test_run(gen_prog.as_fd(), &template, Some(&mut out), &xdp_ctx(idx, template.len()), 1, None)
            .context("test run of the generator")?;
        out.truncate(template.len());
        if v != XDP_TX {
            bail!("the generator returned {v}");
        }
        tests::verify_checksums(&out).map_err(|e| anyhow!("generator output: {e}: {}", tests::decode(&out)))?;
        if out[26..28] != [100, 64] || out[30..34] != VIP.octets() {
            bail!("generator output: {}", tests::decode(&out));
        }
        Ok((idx, link))
    })??;

    xtask::lab::in_netns(&lab.bal_ns, || -> Result<Veth> {
        let cfg = tests::validated(veth_config(&lab.bal_dev));
        let mut dp = lb::datapath::Datapath::load(lb::datapath::Capacity::from_config(&cfg.datapath), None)?;
        let mut rt = lb::state::Runtime::new(&cfg);
        rt.reconcile(&cfg, &mut dp).context("writing the maps")?;
        dp.set_tx_port(&lab.bal_dev, true).context("TX_PORTS")?;
        let web = rt.service("web").context("service web")?.entry.id;
        let b1 = rt.service("web").and_then(|s| s.backend(IpAddr::V4(BACKEND1), 8080)).context("backend")?.id;
        // Every client of the population already pinned: the balancer sees hits, as it does
        // once the clients have been seen.
        let n = fill_affinity(&mut dp, web, b1, (0..POPULATION).map(|i| Ipv4Addr::from(SYNTH_BASE + i)));
        assert_eq!(n, POPULATION as usize);
        let bal_ifindex = nix::net::if_::if_nametoindex(lab.bal_dev.as_str())?;
        let lb_fd = dp.program().fd()?.as_fd().try_clone_to_owned()?;
        // Our own link, so the program can be swapped in place (BPF_LINK_UPDATE) between the
        // balancer and the baseline without the veth re-creating its rings and NAPI.
        let link = raw::attach_xdp(lb_fd.as_fd(), bal_ifindex).context("attaching lb to the veth")?;
        let (layout, bal_napi) = if cpus.len() >= 2 {
            let a = napi_thread_on(&lab.gen_ns, &lab.gen_dev, gen_cpu);
            let b = napi_thread_on(&lab.bal_ns, &lab.bal_dev, bal_cpu);
            match (a, b) {
                (Ok(_), Ok(pids)) => (
                    format!("generator + sink NAPI on CPU {gen_cpu}, balancer NAPI (threaded) alone on CPU {bal_cpu}"),
                    pids,
                ),
                (a, b) => {
                    let e = a.err().or(b.err()).unwrap();
                    eprintln!("veth: threaded NAPI not available ({e:#}); everything runs in softirq on CPU {gen_cpu}");
                    (format!("softirq NAPI on CPU {gen_cpu} (threaded NAPI failed: {e:#})"), Vec::new())
                }
            }
        } else {
            (format!("one CPU ({gen_cpu}): generator, balancer and sink share it"), Vec::new())
        };

        let stop = AtomicBool::new(false);
        let sent = AtomicU64::new(0);
        let gen_error: Mutex<Option<String>> = Mutex::new(None);
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        std::thread::scope(|sc| -> Result<Veth> {
            let _stop = StopOnDrop(&stop);
            // Two generator threads on the generator's CPU: each live-frames run ends with a page
            // pool teardown that sleeps for an RCU grace period (~25 ms here), during which the
            // other thread keeps the veth fed. Runs of ~250 ms each.
            for _ in 0..2 {
                sc.spawn(|| {
                    let r = xtask::lab::in_netns(&lab.gen_ns, || -> Result<()> {
                        pin_to(0, gen_cpu)?;
                        let ctx = xdp_ctx(gen_ifindex, template.len());
                        let mut per_call = 65536u32;
                        while !stop.load(Ordering::Relaxed) {
                            let t = Instant::now();
                            let prog = if small.load(Ordering::Relaxed) { &gen_small } else { &gen_prog };
                            raw::test_run(prog.as_fd(), &template, None, &ctx, per_call, Some(64))
                                .context("BPF_PROG_TEST_RUN with live frames")?;
                            sent.fetch_add(per_call as u64, Ordering::Relaxed);
                            let rate = per_call as f64 / t.elapsed().as_secs_f64().max(1e-6);
                            per_call = (rate * 0.25).clamp(65536.0, 16e6) as u32;
                        }
                        Ok(())
                    });
                    if let Err(e) = r.and_then(|r| r) {
                        *gen_error.lock().unwrap() = Some(format!("{e:#}"));
                        stop.store(true, Ordering::SeqCst);
                    }
                });
            }
            let check = || -> Result<()> {
                if let Some(e) = gen_error.lock().unwrap().clone() {
                    bail!("generator: {e}");
                }
                Ok(())
            };
            let lb_count = |dp: &lb::datapath::Datapath| -> Result<(u64, u64)> {
                let st = dp.stats()?;
                let fwd = st["tx"] + st["redirect"];
                let all: u64 = st.iter().filter(|(k, _)| !tests::INFORMATIONAL.contains(k)).map(|(_, v)| v).sum();
                Ok((fwd, all))
            };
            std::thread::sleep(s.warmup);
            check()?;
            let (mut lb_r, mut base_r, mut off_lb, mut off_base) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let (mut small_r, mut small_cpu) = (Vec::new(), Vec::new());
            let (mut fwd_total, mut all_total) = (0u64, 0u64);
            let (mut lb_cpu, mut base_cpu) = (Vec::new(), Vec::new());
            let svc0 = dp.service_counters(web)?;
            for rep in 0..s.reps {
                let order = match rep % 3 {
                    0 => [Window::Lb, Window::Baseline, Window::LbSmall],
                    1 => [Window::Baseline, Window::LbSmall, Window::Lb],
                    _ => [Window::LbSmall, Window::Lb, Window::Baseline],
                };
                for w in order {
                    let is_lb = w != Window::Baseline;
                    small.store(w == Window::LbSmall, Ordering::Relaxed);
                    raw::replace_prog(link.as_fd(), if is_lb { lb_fd.as_fd() } else { base.as_fd() })
                        .context("BPF_LINK_UPDATE")?;
                    std::thread::sleep(s.settle);
                    let read = |dp: &lb::datapath::Datapath| -> Result<(u64, u64)> {
                        if is_lb { lb_count(dp) } else { Ok((raw::percpu_counter_sum(counter.as_fd())?, 0)) }
                    };
                    let (c0, a0) = read(&dp)?;
                    let (t0, g0, n0) = (Instant::now(), sent.load(Ordering::Relaxed), cpu_ns(&bal_napi));
                    std::thread::sleep(s.window);
                    let (c1, a1) = read(&dp)?;
                    let (t1, g1, n1) = (Instant::now(), sent.load(Ordering::Relaxed), cpu_ns(&bal_napi));
                    let per_pkt = (n1 - n0) as f64 / (c1 - c0).max(1) as f64;
                    check()?;
                    let secs = (t1 - t0).as_secs_f64();
                    let mpps = (c1 - c0) as f64 / secs / 1e6;
                    let offered = (g1 - g0) as f64 / secs / 1e6;
                    let cpu_into = match w {
                        Window::Baseline => {
                            base_r.push(mpps);
                            off_base.push(offered);
                            &mut base_cpu
                        }
                        Window::Lb => {
                            lb_r.push(mpps);
                            off_lb.push(offered);
                            fwd_total += c1 - c0;
                            all_total += a1 - a0;
                            &mut lb_cpu
                        }
                        Window::LbSmall => {
                            small_r.push(mpps);
                            &mut small_cpu
                        }
                    };
                    if !bal_napi.is_empty() {
                        cpu_into.push(per_pkt);
                    }
                }
                eprint!(".");
            }
            eprintln!();
            let svc1 = dp.service_counters(web)?;
            let (hits, pins) = (svc1.hits - svc0.hits, svc1.new_pins - svc0.new_pins);
            if fwd_total == 0 {
                bail!("the balancer forwarded nothing (verdicts counted: {all_total})");
            }
            Ok(Veth {
                lb: lb_r,
                baseline: base_r,
                lb_small: small_r,
                lb_small_cpu_ns: small_cpu,
                offered_lb: off_lb,
                offered_baseline: off_base,
                forwarded_share: fwd_total as f64 / all_total.max(1) as f64,
                hit_share: hits as f64 / (hits + pins).max(1) as f64,
                layout,
                lb_cpu_ns: lb_cpu,
                baseline_cpu_ns: base_cpu,
            })
        })
    })?
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

/// The Katran peer (`../shared/peers/katran/run.sh --json`, or `LB_KATRAN_PEER`): Katran's own
/// XDP program timed by the same method on the same CPU, in this run. Its JSON object as it
/// printed it, or `{"error": why}` when it could not build or run.
fn katran_peer(cpu: usize, quick: bool) -> serde_json::Value {
    let script = std::env::var_os("LB_KATRAN_PEER")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/peers/katran/run.sh"));
    let fail = |why: String| {
        println!("Katran peer: not measured: {why}");
        serde_json::json!({ "error": why })
    };
    if !script.exists() {
        return fail(format!("{} not found (set LB_KATRAN_PEER to its run.sh)", script.display()));
    }
    let mut cmd = Command::new("bash");
    cmd.arg(&script).arg("--json").env("CPU", cpu.to_string());
    if quick {
        cmd.env("QUICK", "1");
    }
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) => return fail(format!("running {}: {e}", script.display())),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let tail = &lines[lines.len().saturating_sub(6)..];
    if !out.status.success() {
        return fail(format!("{} exited with {}: {}", script.display(), out.status, tail.join(" | ")));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    match serde_json::from_str::<serde_json::Value>(stdout.trim()) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        _ => fail(format!("{} printed no JSON object: {:?}", script.display(), stdout.trim())),
    }
}

fn machine() -> serde_json::Value {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    serde_json::json!({ "cpus": cpus, "kernel": kernel, "cpu_model": cpu_model })
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

fn write_report(json: &serde_json::Value) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let path = dir.join("datapath.json");
    match std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, serde_json::to_string_pretty(json).unwrap())) {
        Ok(()) => println!("\nwritten: {}", path.canonicalize().unwrap_or(path).display()),
        Err(e) => eprintln!("writing {}: {e}", path.display()),
    }
}

fn verdict(ratio: f64, ok: bool) -> String {
    format!("{ratio:.2}x {}", if ok { "ok" } else { "OVER TARGET" })
}

fn main() -> io::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        println!("datapath bench skipped: BPF_PROG_TEST_RUN, XDP and namespaces need root");
        return Ok(());
    }
    install_signal_cleanup();
    remove_stale_namespaces();
    let s = Settings::from_env();
    let cpus = allowed_cpus();
    let busy_before = warn_if_busy("before the run");
    let m = machine();
    println!(
        "datapath bench: {} repetitions{}; {} CPUs ({}), kernel {}",
        s.reps,
        if s.quick { " (quick)" } else { "" },
        m["cpus"],
        m["cpu_model"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?")
    );

    if std::env::var("LB_BENCH_ONLY").is_ok_and(|v| v == "veth") {
        // Debugging aid: the veth part alone, no report written.
        match veth(&s, &cpus) {
            Ok(v) => {
                print_veth(&v, &s);
            }
            Err(e) => eprintln!("veth: {e:#}"),
        }
        return Ok(());
    }
    // Per packet and scale.
    let pp_cpu = *cpus.last().expect("some CPU");
    eprint!("per packet and scale (BPF_PROG_TEST_RUN on CPU {pp_cpu}) ");
    let t = Instant::now();
    let pp = per_packet_and_scale(&s, pp_cpu);
    let pp_secs = t.elapsed().as_secs_f64();
    // The peer, right after, on the same CPU.
    eprintln!("Katran peer (its XDP program, same method, CPU {pp_cpu})");
    let katran = katran_peer(pp_cpu, s.quick);

    let per_packet_only = std::env::var("LB_BENCH_ONLY").is_ok_and(|v| v == "per_packet");
    // veth.
    let t = Instant::now();
    let veth = if per_packet_only {
        None
    } else {
        eprint!("veth (live frames) ");
        veth(&s, &cpus).map_err(|e| eprintln!("\nveth: {e:#}")).ok()
    };
    let veth_secs = t.elapsed().as_secs_f64();

    let med = |v: &[f64]| median(v.to_vec());
    let base = med(&pp.baseline);
    let (h4, h6, miss, miss_room, other) =
        (med(&pp.hit_v4.ns), med(&pp.hit_v6.ns), med(&pp.miss_v4.ns), med(&pp.miss_v4_room.ns), med(&pp.other.ns));
    let (h1k, h1m, sp1k, sp1m) =
        (med(&pp.hit_1k.ns), med(&pp.hit_1m.ns), med(&pp.spread_1k.ns), med(&pp.spread_1m.ns));
    let ratio = |c: &Case| med(&c.ratio);
    let scale_ratio = ratio(&pp.hit_1m) / ratio(&pp.hit_1k);
    let runs = s.runs;
    println!(
        "\nper packet: BPF_PROG_TEST_RUN, one CPU ({}), kernel ns per run: median over {} repetitions of the mean of {runs} single runs [min..max of the means], each run followed by a baseline run; ratio: median of (case / interleaved baseline)",
        pp.cpu, s.reps
    );
    println!("  baseline  XDP_PASS program     {base:7.1} ns  {}", spread(&pp.baseline));
    let line = |name: &str, what: &str, c: &Case, target: f64| {
        let (v, r) = (med(&c.ns), ratio(c));
        println!(
            "  {name:<12} {what:<20} {v:7.1} ns  {:<16} {:>22}  (+{:.1} ns over baseline; target <= {target}x)",
            spread(&c.ns),
            verdict(r, r <= target),
            v - base
        );
    };
    line("hit_v4", "IPv4 TCP, pinned", &pp.hit_v4, 3.0);
    line("hit_v6", "IPv6 TCP, pinned", &pp.hit_v6, 3.0);
    line("miss_v4", "new client, full LRU", &pp.miss_v4, 15.0);
    line("miss_bounded_v4", "same, load bound on", &pp.miss_bounded_v4, 15.0);
    line("syn_v4", "new client's SYN", &pp.syn_v4, 15.0);
    line("handshake_v4", "its first ACK", &pp.handshake_v4, 15.0);
    line("other", "not for a VIP", &pp.other, 1.5);
    println!(
        "  hit_many     {MANY_CLIENTS} clients cycled {:7.1} ns  {:<16} {:>8.2}x  (a different established client each run, shuffled; tables of {MANY_AFFINITY})",
        med(&pp.hit_many.ns),
        spread(&pp.hit_many.ns),
        ratio(&pp.hit_many)
    );
    println!(
        "  info: miss_v4 into a table with room (2M entries, no eviction) {miss_room:.1} ns {} = {:.2}x baseline",
        spread(&pp.miss_v4_room.ns),
        ratio(&pp.miss_v4_room)
    );
    println!(
        "  info: kernel loop (repeat {}, idempotent cases): baseline {:.1} ns, other {:.1} ns; so a single run's fixed cost is ~{:.0} ns",
        s.loop_repeat,
        med(&pp.loop_baseline),
        med(&pp.loop_other),
        base - med(&pp.loop_baseline)
    );
    println!("scale: hit_v4 with the affinity table filled (capacity {BIG_AFFINITY}; 1M filled in {:.2} s)", pp.fill_1m_secs);
    println!("  1k pins   {h1k:7.1} ns  {}  {:.2}x baseline", spread(&pp.hit_1k.ns), ratio(&pp.hit_1k));
    println!(
        "  1M pins   {h1m:7.1} ns  {}  {:.2}x baseline; 1M/1k {}  (target <= 1.3x)",
        spread(&pp.hit_1m.ns),
        ratio(&pp.hit_1m),
        verdict(scale_ratio, scale_ratio <= 1.3)
    );
    println!(
        "  info: a different random pinned client each run (cold table lines): 1k {sp1k:.1} ns, 1M {sp1m:.1} ns, 1M/1k {:.2}x",
        ratio(&pp.spread_1m) / ratio(&pp.spread_1k)
    );
    print_peer(&pp, &katran);
    if per_packet_only {
        return Ok(());
    }
    let (vb, vl) = match &veth {
        Some(v) => print_veth(v, &s),
        None => {
            println!("veth: not measured (see the error above)");
            (None, None)
        }
    };
    println!("times: per packet + scale {pp_secs:.1} s, veth {veth_secs:.1} s");
    if !(warn_if_busy("after the run") || busy_before) {
        println!("no other process used more than 10% of a CPU before or after the run");
    }

    let json = serde_json::json!({
        "per_packet": {
            "baseline_ns": round(base, 1),
            "hit_v4_ns": round(h4, 1),
            "hit_v6_ns": round(h6, 1),
            "miss_v4_ns": round(miss, 1),
            "other_ns": round(other, 1),
            "hit_v4_ratio": round(ratio(&pp.hit_v4), 2),
            "hit_v6_ratio": round(ratio(&pp.hit_v6), 2),
            "miss_v4_ratio": round(ratio(&pp.miss_v4), 2),
            "miss_bounded_v4_ns": round(med(&pp.miss_bounded_v4.ns), 1),
            "miss_bounded_v4_ratio": round(ratio(&pp.miss_bounded_v4), 2),
            "other_ratio": round(ratio(&pp.other), 2),
            "syn_v4_ns": round(med(&pp.syn_v4.ns), 1),
            "syn_v4_ratio": round(ratio(&pp.syn_v4), 2),
            "handshake_v4_ns": round(med(&pp.handshake_v4.ns), 1),
            "handshake_v4_ratio": round(ratio(&pp.handshake_v4), 2),
            "hit_many_ns": round(med(&pp.hit_many.ns), 1),
            "hit_many_ratio": round(ratio(&pp.hit_many), 2),
            "miss_v4_room_ns": round(miss_room, 1),
            "miss_v4_room_ratio": round(ratio(&pp.miss_v4_room), 2),
        },
        "peers": { "katran": katran },
        "scale": { "hit_ns_1k": round(h1k, 1), "hit_ns_1m": round(h1m, 1), "ratio_1m_1k": round(scale_ratio, 2) },
        "veth": {
            "baseline_mpps": vb,
            "lb_mpps": vl,
            "lb_mpps_small_population": veth.as_ref().map(|v| round(median(v.lb_small.clone()), 3)),
        },
        "machine": m,
    });
    write_report(&json);
    Ok(())
}

/// lb's per-packet cases beside the Katran peer's matching ones (ratios to each one's own
/// interleaved baseline, so that the two harnesses' fixed costs cancel).
fn print_peer(pp: &PerPacket, k: &serde_json::Value) {
    if k.get("error").is_some() {
        return;
    }
    let med = |v: &[f64]| median(v.to_vec());
    let ratio = |c: &Case| med(&c.ratio);
    let num = |key: &str| k.get(key).and_then(serde_json::Value::as_f64);
    println!(
        "lb beside Katran (its XDP program, commit {}, same method, same CPU, this run; ratio = case / its own interleaved baseline; lower is better)",
        k.get("katran_commit").and_then(serde_json::Value::as_str).map_or("?", |c| &c[..c.len().min(12)])
    );
    println!("  {:<34} {:>10} {:>8}   {:>10} {:>8}   lb/Katran", "case (lb / Katran)", "lb ns", "lb x", "Katran ns", "Katran x");
    println!(
        "  {:<34} {:>10.1} {:>8}   {:>10.1} {:>8}",
        "baseline (XDP_PASS)",
        med(&pp.baseline),
        "1.00",
        num("baseline_ns").unwrap_or(f64::NAN),
        "1.00"
    );
    let rows: [(&str, &Case, &str); 6] = [
        ("hit / hit", &pp.hit_v4, "hit"),
        ("miss, full LRU / miss", &pp.miss_v4, "miss"),
        ("miss, room / miss_room", &pp.miss_v4_room, "miss_room"),
        ("new client's SYN / miss_syn", &pp.syn_v4, "miss_syn"),
        ("not for a VIP / other", &pp.other, "other"),
        ("hit_many / hit_65k (65,536 clients)", &pp.hit_many, "hit_65k"),
    ];
    for (name, c, key) in rows {
        let (kn, kr) = (num(&format!("{key}_ns")), num(&format!("{key}_ratio")));
        let (ln, lr) = (med(&c.ns), ratio(c));
        println!(
            "  {name:<34} {ln:>10.1} {lr:>8.2}   {:>10} {:>8}   {}",
            kn.map_or("-".into(), |x| format!("{x:.1}")),
            kr.map_or("-".into(), |x| format!("{x:.2}")),
            kr.map_or("-".into(), |x| format!("{:.2}{}", lr / x, if lr <= x { " ahead" } else { " BEHIND" }))
        );
    }
}

fn print_veth(v: &Veth, s: &Settings) -> (Option<f64>, Option<f64>) {
    let med = |v: &[f64]| median(v.to_vec());
    let (b, l) = (med(&v.baseline), med(&v.lb));
    println!(
        "veth: live frames ({POPULATION} pinned clients, 64-byte TCP) -> veth -> XDP (native) -> XDP_TX back -> XDP_DROP sink; {}; median of {} windows of {:.1} s",
        v.layout,
        s.reps,
        s.window.as_secs_f64()
    );
    println!(
        "  baseline  XDP_TX + counter   {b:7.3} Mpps  {}  (generator offered {:.3} Mpps)",
        spread_d(&v.baseline, 3),
        med(&v.offered_baseline)
    );
    println!(
        "  lb        tx+redirect        {l:7.3} Mpps  {}  (generator offered {:.3} Mpps)  lb/baseline {}  (target >= 0.6x)",
        spread_d(&v.lb, 3),
        med(&v.offered_lb),
        verdict(l / b, l / b >= 0.6)
    );
    if !v.lb_cpu_ns.is_empty() {
        let (cb, cl) = (med(&v.baseline_cpu_ns), med(&v.lb_cpu_ns));
        println!(
            "  info: balancer NAPI thread CPU time per packet: baseline {cb:.0} ns, lb {cl:.0} ns; as Mpps per CPU: baseline {:.2}, lb {:.2}, lb/baseline {:.2}x",
            1e3 / cb,
            1e3 / cl,
            cb / cl
        );
        if 1e3 / cb > b * 1.15 {
            println!("  note: the baseline's CPU had idle time: its rate is bounded by the generator's CPU, not by XDP_TX");
        }
    }
    let small_cpu =
        if v.lb_small_cpu_ns.is_empty() { String::new() } else { format!(", {:.0} ns CPU per packet", med(&v.lb_small_cpu_ns)) };
    println!(
        "  info: lb with frames from {SMALL_POPULATION} of the clients only (their table lines stay in cache): {:.3} Mpps {}, lb/baseline {:.2}x{small_cpu}",
        med(&v.lb_small),
        spread_d(&v.lb_small, 3),
        med(&v.lb_small) / b
    );
    println!(
        "  lb verdicts forwarded (tx/redirect): {:.1}%, packets that hit a pin: {:.1}%",
        v.forwarded_share * 100.0,
        v.hit_share * 100.0
    );
    (Some(round(b, 3)), Some(round(l, 3)))
}
