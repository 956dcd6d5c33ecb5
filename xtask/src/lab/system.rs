//! Helpers for commands, namespaces, mounts and interface counters.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use nix::mount::{MntFlags, umount2};
use nix::net::if_::InterfaceFlags;
use nix::sched::{CloneFlags, setns};

use super::{CMD_TIMEOUT, Lab, NETNS_DIR};

impl Lab {
    /// The kernel's counters of interface `ifname` in namespace `ns` (from
    /// `/proc/net/dev` as seen from inside the namespace).
    pub fn link_stats(&self, ns: &str, ifname: &str) -> Result<LinkStats> {
        let text = in_netns(ns, || fs::read_to_string("/proc/thread-self/net/dev"))?
            .with_context(|| format!("reading /proc/net/dev in {ns}"))?;
        parse_net_dev(&text, ifname).with_context(|| format!("interface {ifname} in {ns}"))
    }

    /// [`Lab::link_stats`] of every interface in namespace `ns`.
    pub fn all_link_stats(&self, ns: &str) -> Result<Vec<(String, LinkStats)>> {
        let text = in_netns(ns, || fs::read_to_string("/proc/thread-self/net/dev"))?
            .with_context(|| format!("reading /proc/net/dev in {ns}"))?;
        parse_net_dev_all(&text).with_context(|| format!("/proc/net/dev in {ns}"))
    }
}

/// An interface's counters, as in `/proc/net/dev`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    /// Includes frames an XDP program dropped or failed to redirect.
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
}

/// Every interface's counters from the text of `/proc/net/dev`, in its order.
fn parse_net_dev_all(text: &str) -> Result<Vec<(String, LinkStats)>> {
    let mut out = Vec::new();
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let v: Vec<u64> = rest
            .split_whitespace()
            .map(|w| w.parse().context("a counter that is no number"))
            .collect::<Result<_>>()?;
        ensure!(v.len() >= 12, "too few counters: {line:?}");
        out.push((
            name.trim().to_owned(),
            LinkStats {
                rx_bytes: v[0],
                rx_packets: v[1],
                rx_dropped: v[3],
                tx_bytes: v[8],
                tx_packets: v[9],
                tx_dropped: v[11],
            },
        ));
    }
    Ok(out)
}

/// The counters of `ifname` from the text of `/proc/net/dev`.
fn parse_net_dev(text: &str, ifname: &str) -> Result<LinkStats> {
    parse_net_dev_all(text)?
        .into_iter()
        .find(|(name, _)| name == ifname)
        .map(|(_, s)| s)
        .context("not in /proc/net/dev")
}

/// Writes `(key under /proc/sys, value)` pairs inside network namespace `ns`.
pub(super) fn set_sysctls(ns: &str, sysctls: &[(&str, &str)]) -> Result<()> {
    in_netns(ns, || -> Result<()> {
        for (key, value) in sysctls {
            let path = Path::new("/proc/sys").join(key);
            fs::write(&path, value)
                .with_context(|| format!("writing {value} to {}", path.display()))?;
        }
        Ok(())
    })?
    .with_context(|| format!("setting sysctls in {ns}"))
}

/// Mount points at or under `dir`, deepest first, from `/proc/self/mountinfo`.
pub(super) fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    Ok(points)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lazily unmounts (`umount -l`) everything mounted at or under `dir` (stacked mounts too),
/// deepest first; a bpffs goes away with the pins in it once nothing holds it open.
pub(super) fn unmount_under(dir: &Path) -> Result<()> {
    for _ in 0..16 {
        let points = mounts_under(dir)?;
        if points.is_empty() {
            return Ok(());
        }
        for p in points {
            if let Err(e) = umount2(&p, MntFlags::MNT_DETACH)
                && e != nix::errno::Errno::EINVAL
            {
                bail!("unmounting {}: {e}", p.display());
            }
        }
    }
    bail!(
        "mounts under {} remain after 16 rounds of unmounting",
        dir.display()
    )
}

/// Whether this process runs as root (the lab, `lb run` and the e2e tests need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs `f` on a fresh thread that has entered network namespace `ns` (`/run/netns/<ns>`) and
/// returns its result. Sockets `f` creates belong to that namespace for their whole life, also
/// when used from other threads afterwards. A panic in `f` becomes an error. Use from plain
/// threads, never from inside an async runtime's worker.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = Path::new(NETNS_DIR).join(ns);
    let handle = File::open(&path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    thread::scope(|scope| {
        let worker = thread::Builder::new()
            .name(format!("in-{ns}"))
            .spawn_scoped(scope, move || -> Result<T> {
                setns(&handle, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering network namespace {ns}"))?;
                Ok(f())
            })
            .context("spawning a thread")?;
        worker.join().map_err(|panic| {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".to_owned());
            anyhow!("thread in network namespace {ns} panicked: {msg}")
        })?
    })
}

/// Runs `cmd` (stdin from /dev/null, stdout and stderr captured), killing it if it has not
/// finished after `timeout`.
pub fn output_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {shown}"))?;
    let out_pipe = child.stdout.take().context("no stdout pipe")?;
    let err_pipe = child.stderr.take().context("no stderr pipe")?;
    // Readers on their own threads so a chatty command never blocks on a full pipe.
    let (out_tx, out_rx) = mpsc::channel();
    let (err_tx, err_rx) = mpsc::channel();
    for (mut pipe, tx) in [
        (Box::new(out_pipe) as Box<dyn Read + Send>, out_tx),
        (Box::new(err_pipe), err_tx),
    ] {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {shown}"))?
        {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{shown} did not finish within {timeout:?} and was killed");
        }
        thread::sleep(Duration::from_millis(5));
    };
    // A grandchild that inherited the pipes could keep them open: wait a little, not forever.
    let stdout = out_rx
        .recv_timeout(Duration::from_secs(2))
        .unwrap_or_default();
    let stderr = err_rx
        .recv_timeout(Duration::from_secs(2))
        .unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs `ip <args>` and fails with its stderr unless it exits 0.
pub(super) fn ip(args: &[&str]) -> Result<()> {
    let out = output_timeout(Command::new("ip").args(args), CMD_TIMEOUT)?;
    ensure!(
        out.status.success(),
        "`ip {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// `ethtool -K <ifname> <features>` in namespace `ns`.
pub(super) fn ethtool(ns: &str, ifname: &str, features: &[&str]) -> Result<()> {
    let mut args = vec!["netns", "exec", ns, "ethtool", "-K", ifname];
    args.extend_from_slice(features);
    let out = output_timeout(Command::new("ip").args(&args), CMD_TIMEOUT)?;
    ensure!(
        out.status.success(),
        "`ip {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Turns tx checksum offload off (a local socket on a veth otherwise sends partial checksums,
/// which an XDP program sees and would forward broken) and GRO on (frames XDP-redirected into a
/// veth are dropped unless the receiving peer has GRO or an XDP program).
pub(super) fn ethtool_lab_offloads(ns: &str, ifname: &str) -> Result<()> {
    ethtool(ns, ifname, &["tx", "off", "gro", "on"])
}

/// Waits until every interface in `ns` is up and running (IFF_RUNNING, operstate up).
pub(super) fn wait_links_running(ns: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let not_running = in_netns(ns, || -> Result<Vec<String>> {
            let mut down = Vec::new();
            for ifa in nix::ifaddrs::getifaddrs().context("listing interfaces")? {
                if !ifa.flags.contains(InterfaceFlags::IFF_RUNNING)
                    && !down.contains(&ifa.interface_name)
                {
                    down.push(ifa.interface_name);
                }
            }
            Ok(down)
        })??;
        if not_running.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "interfaces {not_running:?} in {ns} not running after {timeout:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::LabSpec;
    use crate::skips::skip;

    #[test]
    fn net_dev_counters() {
        let text = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n  eth0:    1420      21    0    5    0     0          0         0     1032      15    0    2    0     0       0          0\n";
        let s = parse_net_dev(text, "eth0").unwrap();
        assert_eq!(
            s,
            LinkStats {
                rx_bytes: 1420,
                rx_packets: 21,
                rx_dropped: 5,
                tx_bytes: 1032,
                tx_packets: 15,
                tx_dropped: 2,
            }
        );
        assert!(parse_net_dev(text, "eth1").is_err());
        assert_eq!(parse_net_dev_all(text).unwrap().len(), 2);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/run/a\040b\\c"), r"/run/a b\\c");
        assert_eq!(unescape_mountinfo(r"/x\011"), "/x\t");
        assert_eq!(unescape_mountinfo(r"/x\04"), r"/x\04");
    }

    #[test]
    fn in_netns_names_a_missing_namespace() {
        let err = in_netns("lb-no-such-namespace", || ()).unwrap_err();
        assert!(
            format!("{err:#}").contains("lb-no-such-namespace"),
            "{err:#}"
        );
    }

    #[test]
    fn in_netns_turns_panics_into_errors() {
        if !is_root() {
            skip("in_netns_turns_panics_into_errors", "needs root");
            return;
        }
        let lab = Lab::create(LabSpec {
            clients: 1,
            backends: 1,
        })
        .expect("creating the lab");
        let err = in_netns(lab.ns_client(), || panic!("boom")).unwrap_err();
        assert!(format!("{err:#}").contains("boom"), "{err:#}");
    }

    #[test]
    fn output_timeout_kills_slow_commands() {
        let started = Instant::now();
        let err = output_timeout(Command::new("sleep").arg("10"), Duration::from_millis(200))
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3), "{err:#}");
        let out = output_timeout(Command::new("echo").arg("hi"), CMD_TIMEOUT).unwrap();
        assert_eq!(out.stdout, b"hi\n");
    }
}
