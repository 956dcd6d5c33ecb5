//! Whether this machine can run a config, and the hand-built setups that run but fail silently.
//! `lb check` asks before anything is loaded; `lb run` refuses what cannot work and warns, at
//! start, after reloads and every half minute, about what will not (its warnings are in
//! `lb status`).

use std::{
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

use rtnetlink::packet_route::{
    RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage, LinkXdp, XdpAttached},
};

use crate::{bpffs, config::Config};

/// What `lb check` found about the machine: facts, problems that make `lb run` fail, and
/// warnings about what would run but lose traffic.
#[derive(Debug, Default)]
pub struct Report {
    pub ok: Vec<String>,
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
}

/// Checks `cfg` against this machine and network namespace, changing nothing.
pub fn check(cfg: &Config) -> Report {
    let mut r = Report::default();
    let missing = missing_capabilities();
    if missing.is_empty() {
        r.ok.push("capabilities: CAP_SYS_ADMIN and CAP_NET_ADMIN held".into());
    } else {
        r.problems.push(format!(
            "capabilities: lb run needs {} (it loads eBPF, mounts bpffs, attaches XDP): run it as root or with sudo",
            missing.join(" and ")
        ));
    }
    let mut present = Vec::new();
    for (i, name) in cfg.datapath.interfaces.iter().enumerate() {
        if nix::net::if_::if_nametoindex(name.as_str()).is_ok() {
            present.push(name.clone());
        } else {
            r.problems.push(format!(
                "datapath.interfaces[{i}]: no interface named {name:?} in this network namespace (`ip link` lists \
                 them; `lb --netns NAME check` checks another namespace)"
            ));
        }
    }
    if !present.is_empty() {
        r.ok.push(format!("interfaces: {} found", present.join(", ")));
    }
    let pins = &cfg.datapath.pin_path;
    match bpffs::plan(pins) {
        Ok(bpffs::Plan::Ready) => {
            let held = bpffs::lock_holder(pins).map(|pid| format!("; lb (pid {pid}) runs on it")).unwrap_or_default();
            r.ok.push(format!("pin path: {} is on a bpffs{held}", pins.display()));
        }
        Ok(bpffs::Plan::Create) => r.ok.push(format!("pin path: {} is made in the bpffs above it", pins.display())),
        Ok(bpffs::Plan::Mount(at)) => r.ok.push(format!("pin path: lb mounts a bpffs at {}", at.display())),
        Err(e) => r.problems.push(format!("{e:#}")),
    }
    let socket = &cfg.control.socket;
    match std::fs::symlink_metadata(socket) {
        Err(_) => r.ok.push(format!("control socket: {} is free", socket.display())),
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                r.warnings.push(format!(
                    "control.socket {}: an lb serves it now; `lb run` with this config is refused until it stops \
                     (`lb reload` applies a changed file to it)",
                    socket.display()
                ));
            } else {
                r.ok.push(format!("control socket: {} is a stale socket lb replaces", socket.display()));
            }
        }
        Ok(_) => r.problems.push(format!(
            "control.socket {}: the path exists and is not a socket; lb will not replace it: set another path, or \
             remove it yourself",
            socket.display()
        )),
    }
    r.warnings.extend(veth_warnings(&present));
    r
}

/// The capabilities `lb run` needs that this process does not hold (effective set).
fn missing_capabilities() -> Vec<&'static str> {
    const NEEDED: [(u32, &str); 2] = [(21, "CAP_SYS_ADMIN"), (12, "CAP_NET_ADMIN")];
    let eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_owned())))
        .and_then(|v| u64::from_str_radix(&v, 16).ok());
    match eff {
        Some(eff) => NEEDED.iter().filter(|(bit, _)| eff & (1 << bit) == 0).map(|(_, n)| *n).collect(),
        None if nix::unistd::geteuid().is_root() => Vec::new(),
        None => NEEDED.iter().map(|(_, n)| *n).collect(),
    }
}

// ------------------------------------------------------------------------------------------------
// veth peers.

/// For each of `interfaces` that is a veth whose peer has neither GRO nor a native XDP program,
/// the warning with its fix: the kernel drops every frame XDP redirects (or sends back) into such
/// a veth, and only the peer's `rx_dropped`-like counters would tell. Peers in other network
/// namespaces are found through `/run/netns` and the namespaces of running processes; a peer
/// that cannot be found is not judged.
pub fn veth_warnings(interfaces: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut candidates: Option<Vec<(String, PathBuf)>> = None;
    for iface in interfaces {
        let Ok(index) = nix::net::if_::if_nametoindex(iface.as_str()) else { continue };
        let Some((peer_index, nsid)) = link(index).as_ref().and_then(veth_peer) else { continue };
        let found = if nsid.is_none() {
            peer(peer_index, index).map(|p| (p, None))
        } else {
            let c = candidates.get_or_insert_with(netns_candidates);
            c.iter().find_map(|(label, path)| in_netns(path, || peer(peer_index, index)).flatten().map(|p| (p, Some(label.clone()))))
        };
        let Some((p, ns)) = found else { continue };
        if p.gro || p.native_xdp {
            continue;
        }
        let (where_, fix) = match &ns {
            None => ("in this network namespace".to_string(), format!("ethtool -K {} gro on", p.name)),
            Some(label) => match label.strip_prefix("/run/netns/") {
                Some(name) => (format!("in network namespace {name}"), format!("ip netns exec {name} ethtool -K {} gro on", p.name)),
                None => (format!("in the network namespace {label}"), format!("nsenter --net={label} ethtool -K {} gro on", p.name)),
            },
        };
        out.push(format!(
            "interface {iface} is a veth whose peer {} ({where_}) has neither GRO nor an XDP program: the kernel drops \
             every frame lb redirects or sends back out of {iface}; fix: `{fix}` (or attach an XDP program to the peer)",
            p.name
        ));
    }
    out
}

struct Peer {
    name: String,
    gro: bool,
    native_xdp: bool,
}

/// The link with `index` in this thread's network namespace.
fn link(index: u32) -> Option<LinkMessage> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    match crate::routes::ask(RouteNetlinkMessage::GetLink(m)) {
        Ok(Ok(Some(RouteNetlinkMessage::NewLink(l)))) => Some(l),
        _ => None,
    }
}

/// A veth's peer: its ifindex and, when it is in another network namespace, that one's id.
fn veth_peer(l: &LinkMessage) -> Option<(u32, Option<i32>)> {
    let veth = l.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::LinkInfo(infos) if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
    });
    if !veth {
        return None;
    }
    let peer = l.attributes.iter().find_map(|a| if let LinkAttribute::Link(i) = a { Some(*i) } else { None })?;
    let nsid = l.attributes.iter().find_map(|a| if let LinkAttribute::LinkNetNsId(i) = a { Some(*i) } else { None });
    Some((peer, nsid))
}

/// The veth with ifindex `index` here, if it is the peer of `ours` (by ifindex).
fn peer(index: u32, ours: u32) -> Option<Peer> {
    let l = link(index)?;
    if veth_peer(&l)?.0 != ours {
        return None;
    }
    let name = l.attributes.iter().find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n.clone()) } else { None })?;
    let native_xdp = l.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::Xdp(x) if x.iter().any(|x| matches!(x,
            LinkXdp::Attached(XdpAttached::Driver | XdpAttached::Multiple | XdpAttached::Hardware))))
    });
    Some(Peer { gro: gro(&name).unwrap_or(true), name, native_xdp })
}

/// Whether GRO is on for `name` (ETHTOOL_GGRO), in this thread's network namespace.
fn gro(name: &str) -> Option<bool> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GGRO: u32 = 0x2b;
    #[repr(C)]
    struct Value {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct Ifreq {
        name: [libc::c_char; libc::IFNAMSIZ],
        data: *mut Value,
        _pad: [u8; 16],
    }
    let mut v = Value { cmd: ETHTOOL_GGRO, data: 0 };
    let mut req = Ifreq { name: [0; libc::IFNAMSIZ], data: &mut v, _pad: [0; 16] };
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    for (d, s) in req.name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: a datagram socket we close below, and an ioctl on structs of the kernel's layout
    // that live across the call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let r = libc::ioctl(fd, SIOCETHTOOL as _, &mut req);
        libc::close(fd);
        (r == 0).then_some(v.data != 0)
    }
}

/// Network namespaces other than this one, one path each: `ip netns` names first, then those
/// of running processes.
fn netns_candidates() -> Vec<(String, PathBuf)> {
    let ino = |p: &Path| std::fs::metadata(p).ok().map(|m| m.ino());
    let mut seen: Vec<u64> = ino(Path::new("/proc/thread-self/ns/net")).into_iter().collect();
    let mut out = Vec::new();
    let named = std::fs::read_dir("/run/netns").into_iter().flatten().filter_map(|e| e.ok()).map(|e| e.path());
    let procs = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .map(|e| e.path().join("ns/net"));
    for path in named.chain(procs) {
        if let Some(i) = ino(&path)
            && !seen.contains(&i)
        {
            seen.push(i);
            out.push((path.display().to_string(), path));
        }
    }
    out
}

/// Runs `f` on a thread of its own that entered the network namespace at `path`.
fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Option<T> {
    use std::os::fd::AsFd as _;
    let ns = std::fs::File::open(path).ok()?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            Some(f())
        })
        .join()
        .ok()
        .flatten()
    })
}
