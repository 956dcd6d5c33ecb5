//! The one place that loads the XDP program, attaches it, pins its maps and writes them. Every
//! map access of the daemon goes through [`Datapath`]'s typed methods.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{
        ProgramError, Xdp, XdpMode as AyaXdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    sys,
    AddrKey, AffinityKey, AffinityValue, Backend, Counters, FlowKey, FlowValue, GlobalConfig, LAYOUT_VERSION, LINK_PIN_PREFIX,
    PROGRAM_NAME, Reverse, Reverse6, Service, ServiceKey, ServiceKey6, TxPort, maps, stat,
};
use serde::Serialize;

use crate::config::{DatapathConfig, XdpMode};

/// The compiled XDP object, built by build.rs (aya-build) for bpfel-unknown-none.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// Every map the daemon pins, by name.
/// Every map pinned under the pin path (not `FIB_CACHE` and `SCRATCH`: each program has its own).
pub const ALL_MAPS: [&str; 22] = [
    maps::CONFIG,
    maps::SERVICES,
    maps::BACKENDS,
    maps::MAGLEV,
    maps::AFFINITY,
    maps::REVERSE,
    maps::LOCAL_ADDRS,
    maps::SERVICE_STATS,
    maps::BACKEND_STATS,
    maps::STATS,
    maps::ATTACH_MODES,
    maps::SERVICES6,
    maps::REVERSE6,
    maps::LOCAL_ADDRS6,
    maps::ADDRS,
    maps::FRAGS,
    maps::TX_PORTS,
    maps::ADDR_FILTER,
    maps::FLOWS,
    maps::HOT_PREFIXES,
    maps::PREFIX_NEW,
    maps::MOVES,
];

/// What to do with pinned state this lb cannot adopt.
const DOWN_ADVICE: &str = "run `lb down --config <file>` to remove it (this drops every client's pin), then start again";

/// A (address, port, protocol) endpoint of either family: a VIP (`SERVICES`/`SERVICES6` key) or a
/// backend (`REVERSE`/`REVERSE6` key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    V4(ServiceKey),
    V6(ServiceKey6),
}

/// Network-order words of an address, as the datapath stores them (IPv4 uses the first).
pub fn addr_words(a: IpAddr) -> [u32; 4] {
    match a {
        IpAddr::V4(a) => [u32::from_ne_bytes(a.octets()), 0, 0, 0],
        IpAddr::V6(a) => {
            let o = a.octets();
            std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
        }
    }
}

/// The address back from network-order words.
pub fn words_addr(w: &[u32; 4], v6: bool) -> IpAddr {
    if v6 {
        let mut o = [0u8; 16];
        for (i, x) in w.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&x.to_ne_bytes());
        }
        IpAddr::V6(std::net::Ipv6Addr::from(o))
    } else {
        IpAddr::V4(Ipv4Addr::from(w[0].to_ne_bytes()))
    }
}

/// The `ADDRS` key of an address.
pub fn addr_key(a: IpAddr) -> AddrKey {
    AddrKey { addr: addr_words(a), family: if a.is_ipv6() { 6 } else { 4 } }
}

impl Endpoint {
    pub fn new(addr: IpAddr, port: u16, proto: u8) -> Self {
        match addr {
            IpAddr::V4(a) => Endpoint::V4(ServiceKey::new(u32::from(a), port, proto)),
            IpAddr::V6(_) => Endpoint::V6(ServiceKey6 { addr: addr_words(addr), port: port.to_be(), proto, _pad: 0 }),
        }
    }

    pub fn addr(&self) -> IpAddr {
        match self {
            Endpoint::V4(k) => words_addr(&[k.addr, 0, 0, 0], false),
            Endpoint::V6(k) => words_addr(&k.addr, true),
        }
    }

    pub fn port(&self) -> u16 {
        u16::from_be(match self {
            Endpoint::V4(k) => k.port,
            Endpoint::V6(k) => k.port,
        })
    }

    pub fn proto(&self) -> u8 {
        match self {
            Endpoint::V4(k) => k.proto,
            Endpoint::V6(k) => k.proto,
        }
    }
}

/// Map capacities, fixed at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub max_services: u32,
    pub max_backends: u32,
    pub maglev_m: u32,
    pub affinity_entries: u32,
    pub flow_entries: u32,
}

impl Capacity {
    pub fn from_config(d: &DatapathConfig) -> Self {
        Self {
            max_services: d.max_services,
            max_backends: d.max_backends,
            maglev_m: d.maglev_table_size,
            affinity_entries: d.affinity_entries,
            flow_entries: d.flow_entries,
        }
    }
}

/// How the program ended up attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    Native,
    Generic,
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        })
    }
}

/// The program attached to one interface. With a pin directory the XDP link is pinned there
/// (`link_<ifname>`), so it outlives the daemon: dropping the Attachment closes our handle and
/// leaves the program attached. Without one (tests), dropping it detaches.
#[derive(Debug)]
pub struct Attachment {
    pub interface: String,
    pub mode: AttachMode,
    /// Adopted from a previous daemon (its link updated to this program) rather than new.
    pub adopted: bool,
    link: LinkHandle,
}

#[derive(Debug)]
enum LinkHandle {
    /// Managed by the program: detached when the program is dropped or on detach_all.
    Managed(XdpLinkId),
    /// Pinned under the pin directory: stays attached until the pin is removed. Our handle is
    /// kept open only so the link cannot vanish under us while we run.
    Pinned { _link: FdLink },
}

pub struct Datapath {
    ebpf: Ebpf,
    cap: Capacity,
    attachments: Vec<Attachment>,
    /// Where maps and links are pinned (none in tests).
    pin_dir: Option<PathBuf>,
    /// The MAGLEV array mapped into our memory, made on first use and kept: mapping a BPF array
    /// populates every page table entry at once, far too slow to repeat per table write.
    maglev_mem: Option<MaglevMem>,
}

/// A shared read-write mapping of the MAGLEV map (u64 words), unmapped on drop.
struct MaglevMem {
    ptr: *mut u64,
    words: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; access goes through &mut
// Datapath, so there is no unsynchronised sharing between threads.
unsafe impl Send for MaglevMem {}

impl Drop for MaglevMem {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned.
        unsafe { libc::munmap(self.ptr.cast(), self.words * 8) };
    }
}

impl Datapath {
    /// Creates the maps (pinned under `pin_dir` when given: existing pins of the same name are
    /// reused) and loads the program into the kernel. A verifier rejection is reported with the
    /// tail of the verifier log.
    pub fn load(cap: Capacity, pin_dir: Option<&Path>) -> Result<Self> {
        let maglev_entries = cap
            .max_services
            .checked_mul(2)
            .and_then(|n| n.checked_mul(cap.maglev_m))
            .ok_or_else(|| anyhow!("max_services * 2 * maglev_table_size overflows"))?;
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(maps::SERVICES, cap.max_services)
            .map_max_entries(maps::SERVICE_STATS, cap.max_services)
            .map_max_entries(maps::BACKENDS, cap.max_backends)
            .map_max_entries(maps::BACKEND_STATS, cap.max_backends)
            .map_max_entries(maps::REVERSE, cap.max_backends)
            .map_max_entries(maps::SERVICES6, cap.max_services)
            .map_max_entries(maps::REVERSE6, cap.max_backends)
            // Every VIP and every backend address, with room for both.
            .map_max_entries(maps::ADDRS, cap.max_backends + cap.max_services)
            .map_max_entries(maps::MAGLEV, maglev_entries)
            .map_max_entries(maps::AFFINITY, cap.affinity_entries)
            .map_max_entries(maps::FLOWS, cap.flow_entries);
        if let Some(dir) = pin_dir {
            check_pinned_layout(dir)?;
        }
        let pins: Vec<(&str, PathBuf)> = match pin_dir {
            Some(dir) => ALL_MAPS.iter().map(|n| (*n, dir.join(n))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).context("creating the eBPF maps")?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| anyhow!("the eBPF object has no program {PROGRAM_NAME}"))?
            .try_into()
            .context("the eBPF program is not an XDP program")?;
        prog.load().map_err(describe_load_error)?;
        Ok(Self { ebpf, cap, attachments: Vec::new(), pin_dir: pin_dir.map(Path::to_path_buf), maglev_mem: None })
    }

    /// Pin path of the XDP link of `iface`.
    pub fn link_pin(dir: &Path, iface: &str) -> PathBuf {
        dir.join(format!("{LINK_PIN_PREFIX}{iface}"))
    }

    pub fn capacity(&self) -> Capacity {
        self.cap
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The loaded XDP program (tests run it with `BPF_PROG_TEST_RUN`).
    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .expect("program checked at load")
    }

    /// Attaches to `iface`. When a previous daemon left a pinned link there, the link is switched
    /// atomically to this program (traffic never stops); otherwise a new attachment is made —
    /// native first then generic for `auto`, or exactly as asked — and pinned.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<AttachMode> {
        let mode = self.attach_any(iface, mode)?;
        self.set_tx_port(iface, true)?;
        Ok(mode)
    }

    /// Adds or removes `iface` in TX_PORTS, the interfaces frames may be redirected to.
    pub fn set_tx_port(&mut self, iface: &str, on: bool) -> Result<()> {
        let idx = nix::net::if_::if_nametoindex(iface).with_context(|| format!("ifindex of {iface}"))?;
        let mac = if on { interface_mac(iface)? } else { [0; 6] };
        let mut m: HashMap<&mut MapData, u32, TxPort> = HashMap::try_from(self.map_mut(maps::TX_PORTS)?)?;
        if on {
            m.insert(idx, TxPort { mac, _pad: 0 }, 0).context("writing TX_PORTS")?;
        } else {
            ignore_missing(m.remove(&idx)).context("removing a TX_PORTS entry")?;
        }
        // Cached next hops say whether their interface is a redirect target.
        self.bump_epochs(true, false)
    }

    /// Rewrites the `TX_PORTS` entries of attached interfaces whose MAC address changed (the
    /// datapath checks that frames are for it); returns the interfaces that changed.
    pub fn refresh_tx_port_macs(&mut self) -> Result<Vec<String>> {
        let ifaces: Vec<String> = self.attachments.iter().map(|a| a.interface.clone()).collect();
        let mut changed = Vec::new();
        for iface in ifaces {
            let Ok(idx) = nix::net::if_::if_nametoindex(iface.as_str()) else { continue };
            let Ok(mac) = interface_mac(&iface) else { continue };
            let m: HashMap<&MapData, u32, TxPort> = HashMap::try_from(self.map(maps::TX_PORTS)?)?;
            if m.get(&idx, 0).is_ok_and(|p| p.mac != mac) {
                self.set_tx_port(&iface, true)?;
                changed.push(iface);
            }
        }
        Ok(changed)
    }

    fn attach_any(&mut self, iface: &str, mode: XdpMode) -> Result<AttachMode> {
        if let Some(dir) = self.pin_dir.clone() {
            let pin = Self::link_pin(&dir, iface);
            if pin.exists() {
                return self.adopt_link(iface, &pin);
            }
        }
        let mode = self.attach_new(iface, mode)?;
        let Some(dir) = self.pin_dir.clone() else { return Ok(mode) };
        // Move the new link out of the program's care and pin it.
        let Some(LinkHandle::Managed(id)) = self.attachments.pop().map(|a| a.link) else {
            unreachable!("attach_new pushed a managed link")
        };
        let link = self.program().take_link(id).context("taking the XDP link")?;
        let fd = FdLink::try_from(link).map_err(|e| {
            anyhow!("{iface}: the kernel attached XDP without a BPF link ({e}); lb needs BPF links (Linux 5.9+) to survive restarts")
        })?;
        let pin = Self::link_pin(&dir, iface);
        let pinned = fd.pin(&pin).with_context(|| format!("pinning the XDP link of {iface} at {}", pin.display()))?;
        self.record_attach_mode(iface, mode)?;
        self.attachments.push(Attachment {
            interface: iface.to_string(),
            mode,
            adopted: false,
            link: LinkHandle::Pinned { _link: pinned.into() },
        });
        Ok(mode)
    }

    fn adopt_link(&mut self, iface: &str, pin: &Path) -> Result<AttachMode> {
        let pinned = PinnedLink::from_pin(pin).with_context(|| format!("opening pinned XDP link {}", pin.display()))?;
        let link = XdpLink::try_from(FdLink::from(pinned))
            .with_context(|| format!("{} is not an XDP link", pin.display()))?;
        let id = self
            .program()
            .attach_to_link(link)
            .with_context(|| format!("switching the XDP link of {iface} to the new program"))?;
        let link = self.program().take_link(id).context("taking the XDP link")?;
        let fd = FdLink::try_from(link).map_err(|e| anyhow!("{iface}: adopted link is not a BPF link ({e})"))?;
        let mode = self.recorded_attach_mode(iface).unwrap_or(AttachMode::Native);
        self.attachments.push(Attachment { interface: iface.to_string(), mode, adopted: true, link: LinkHandle::Pinned { _link: fd } });
        Ok(mode)
    }

    fn ifname_key(iface: &str) -> [u8; 16] {
        let mut k = [0u8; 16];
        let n = iface.len().min(15);
        k[..n].copy_from_slice(&iface.as_bytes()[..n]);
        k
    }

    fn record_attach_mode(&mut self, iface: &str, mode: AttachMode) -> Result<()> {
        let mut m: HashMap<&mut MapData, [u8; 16], u32> = HashMap::try_from(self.map_mut(maps::ATTACH_MODES)?)?;
        let v = match mode {
            AttachMode::Native => lb_common::ATTACH_NATIVE,
            AttachMode::Generic => lb_common::ATTACH_GENERIC,
        };
        m.insert(Self::ifname_key(iface), v, 0).context("writing ATTACH_MODES")
    }

    fn recorded_attach_mode(&self, iface: &str) -> Option<AttachMode> {
        let m: HashMap<&MapData, [u8; 16], u32> = HashMap::try_from(self.map(maps::ATTACH_MODES).ok()?).ok()?;
        match m.get(&Self::ifname_key(iface), 0).ok()? {
            lb_common::ATTACH_NATIVE => Some(AttachMode::Native),
            lb_common::ATTACH_GENERIC => Some(AttachMode::Generic),
            _ => None,
        }
    }

    /// Interfaces that have a pinned link in the pin directory.
    pub fn pinned_link_interfaces(dir: &Path) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
        let mut v: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_prefix(LINK_PIN_PREFIX).map(str::to_string))
            .collect();
        v.sort();
        v
    }

    /// Detaches `iface` for good: removes its pinned link (or drops the managed one).
    pub fn detach(&mut self, iface: &str) -> Result<()> {
        // The interface may be gone already; then so is its ifindex.
        let _ = self.set_tx_port(iface, false);
        if let Some(i) = self.attachments.iter().position(|a| a.interface == iface) {
            let a = self.attachments.remove(i);
            if let LinkHandle::Managed(id) = a.link {
                self.program().detach(id).with_context(|| format!("detaching XDP from {iface}"))?;
            }
        }
        if let Some(dir) = &self.pin_dir {
            let pin = Self::link_pin(dir, iface);
            match std::fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", pin.display())),
            }
        }
        if let Ok(map) = self.map_mut(maps::ATTACH_MODES)
            && let Ok(mut m) = HashMap::<&mut MapData, [u8; 16], u32>::try_from(map)
        {
            let _ = m.remove(&Self::ifname_key(iface));
        }
        Ok(())
    }

    /// A fresh attachment, managed by the program.
    fn attach_new(&mut self, iface: &str, mode: XdpMode) -> Result<AttachMode> {
        let tries: &[(AyaXdpMode, AttachMode)] = match mode {
            XdpMode::Auto => &[
                (AyaXdpMode::Driver, AttachMode::Native),
                (AyaXdpMode::Skb, AttachMode::Generic),
            ],
            XdpMode::Native => &[(AyaXdpMode::Driver, AttachMode::Native)],
            XdpMode::Skb => &[(AyaXdpMode::Skb, AttachMode::Generic)],
        };
        let mut last = None;
        for (aya_mode, mode) in tries {
            match self.program().attach(iface, *aya_mode) {
                Ok(link) => {
                    self.attachments.push(Attachment {
                        interface: iface.to_string(),
                        mode: *mode,
                        adopted: false,
                        link: LinkHandle::Managed(link),
                    });
                    return Ok(*mode);
                }
                Err(ProgramError::UnknownInterface { .. }) => {
                    bail!("attaching XDP to {iface}: no such interface (datapath.interfaces)")
                }
                Err(e) => {
                    tracing::debug!(interface = iface, mode = %mode, error = %e, "attach failed");
                    last = Some(anyhow!(e).context(format!("attaching XDP to {iface} in {mode} mode")));
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("attaching XDP to {iface}")))
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Detaches from every interface, pinned links included.
    pub fn detach_all(&mut self) {
        let ifaces: Vec<String> = self.attachments.iter().map(|a| a.interface.clone()).collect();
        for i in ifaces {
            if let Err(e) = self.detach(&i) {
                tracing::warn!(error = %format!("{e:#}"), "detaching XDP");
            }
        }
    }

    /// Lets go of the attachments without detaching: pinned links stay attached (restart).
    pub fn release_attachments(&mut self) {
        self.attachments.retain(|a| matches!(a.link, LinkHandle::Managed(_)));
    }

    fn map(&self, name: &str) -> Result<&Map> {
        self.ebpf.map(name).ok_or_else(|| anyhow!("the eBPF object has no map {name}"))
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut Map> {
        self.ebpf.map_mut(name).ok_or_else(|| anyhow!("the eBPF object has no map {name}"))
    }

    pub fn read_global(&self) -> Result<GlobalConfig> {
        let a: Array<&MapData, GlobalConfig> = Array::try_from(self.map(maps::CONFIG)?)?;
        a.get(&0, 0).context("reading CONFIG")
    }

    /// Writes the global settings; the cache epochs are the datapath's own (see `bump_epochs`)
    /// and keep their current values whatever `g` says.
    pub fn write_global(&mut self, g: GlobalConfig) -> Result<()> {
        let cur = self.read_global()?;
        let mut a: Array<&mut MapData, GlobalConfig> = Array::try_from(self.map_mut(maps::CONFIG)?)?;
        a.set(0, GlobalConfig { fib_epoch: cur.fib_epoch, svc_epoch: cur.svc_epoch, ..g }, 0).context("writing CONFIG")
    }

    /// Makes the XDP program forget what it cached: FIB results (`fib`; whenever the redirect
    /// targets change) and services (`svc`; after every change to a service entry), at the next
    /// packet that would use them.
    fn bump_epochs(&mut self, fib: bool, svc: bool) -> Result<()> {
        let g = self.read_global()?;
        let mut a: Array<&mut MapData, GlobalConfig> = Array::try_from(self.map_mut(maps::CONFIG)?)?;
        let next = GlobalConfig {
            fib_epoch: g.fib_epoch.wrapping_add(fib as u32),
            svc_epoch: g.svc_epoch.wrapping_add(svc as u32),
            ..g
        };
        a.set(0, next, 0).context("writing CONFIG")
    }

    /// The words of `ADDR_FILTER`.
    pub fn addr_filter(&self) -> Result<Vec<u64>> {
        let a: Array<&MapData, u64> = Array::try_from(self.map(maps::ADDR_FILTER)?)?;
        a.iter().collect::<Result<_, _>>().context("reading ADDR_FILTER")
    }

    pub fn write_addr_filter_word(&mut self, i: u32, word: u64) -> Result<()> {
        let mut a: Array<&mut MapData, u64> = Array::try_from(self.map_mut(maps::ADDR_FILTER)?)?;
        a.set(i, word, 0).with_context(|| format!("writing ADDR_FILTER[{i}]"))
    }

    /// Whether the maps hold state a daemon wrote before (adopted pins), and if so that it is
    /// compatible: same layout version and the same capacities. Anything else is refused with a
    /// pointer to `lb down`, which removes the old state (and with it every pin).
    pub fn check_adoptable(&self) -> Result<bool> {
        let down = DOWN_ADVICE;
        let g = self
            .read_global()
            .map_err(|e| anyhow!("the pinned datapath state cannot be read by this lb ({e:#}): {down}"))?;
        if g.layout_version == 0 {
            return Ok(false);
        }
        if g.layout_version != LAYOUT_VERSION {
            bail!("the pinned datapath state has layout version {}, this lb uses {LAYOUT_VERSION}: {down}", g.layout_version);
        }
        let c = self.cap;
        for (what, pinned, wanted) in [
            ("max_services", g.max_services, c.max_services),
            ("max_backends", g.max_backends, c.max_backends),
            ("maglev_table_size", g.maglev_m, c.maglev_m),
            ("affinity_entries", g.affinity_entries, c.affinity_entries),
            ("flow_entries", g.flow_entries, c.flow_entries),
        ] {
            if pinned != wanted {
                bail!("datapath.{what} is {wanted} but the pinned datapath state was made with {pinned}: {down}");
            }
        }
        Ok(true)
    }

    /// Writes a service entry, then retires the program's cached copies of every service.
    pub fn write_service(&mut self, key: &Endpoint, svc: Service) -> Result<()> {
        let ctx = || format!("writing the SERVICES entry of service {}", svc.id);
        match key {
            Endpoint::V4(k) => HashMap::<_, ServiceKey, Service>::try_from(self.map_mut(maps::SERVICES)?)?
                .insert(k, svc, 0)
                .with_context(ctx),
            Endpoint::V6(k) => HashMap::<_, ServiceKey6, Service>::try_from(self.map_mut(maps::SERVICES6)?)?
                .insert(k, svc, 0)
                .with_context(ctx),
        }?;
        self.bump_epochs(false, true)
    }

    pub fn remove_service(&mut self, key: &Endpoint) -> Result<()> {
        match key {
            Endpoint::V4(k) => ignore_missing(
                HashMap::<_, ServiceKey, Service>::try_from(self.map_mut(maps::SERVICES)?)?.remove(k),
            ),
            Endpoint::V6(k) => ignore_missing(
                HashMap::<_, ServiceKey6, Service>::try_from(self.map_mut(maps::SERVICES6)?)?.remove(k),
            ),
        }
        .context("removing a SERVICES entry")?;
        self.bump_epochs(false, true)
    }

    /// Every service entry of both families.
    pub fn services(&self) -> Result<Vec<(Endpoint, Service)>> {
        let v4: HashMap<&MapData, ServiceKey, Service> = HashMap::try_from(self.map(maps::SERVICES)?)?;
        let v6: HashMap<&MapData, ServiceKey6, Service> = HashMap::try_from(self.map(maps::SERVICES6)?)?;
        let mut out: Vec<(Endpoint, Service)> =
            v4.iter().map(|r| r.map(|(k, v)| (Endpoint::V4(k), v))).collect::<Result<_, _>>().context("reading SERVICES")?;
        for r in v6.iter() {
            let (k, v) = r.context("reading SERVICES6")?;
            out.push((Endpoint::V6(k), v));
        }
        Ok(out)
    }

    /// The `ADDRS` entries (every VIP and backend address with its `ADDR_F_*` flags).
    pub fn addrs(&self) -> Result<BTreeMap<AddrKey, u32>> {
        let m: HashMap<&MapData, AddrKey, u32> = HashMap::try_from(self.map(maps::ADDRS)?)?;
        m.iter().collect::<Result<_, _>>().context("reading ADDRS")
    }

    /// Writes (`Some`) or removes (`None`) the `ADDRS` entry of `k`.
    pub fn set_addr(&mut self, k: &AddrKey, flags: Option<u32>) -> Result<()> {
        let mut m: HashMap<&mut MapData, AddrKey, u32> = HashMap::try_from(self.map_mut(maps::ADDRS)?)?;
        match flags {
            Some(v) => m.insert(k, v, 0).context("writing ADDRS"),
            None => ignore_missing(m.remove(k)).context("removing an ADDRS entry"),
        }
    }

    pub fn write_backend(&mut self, id: u32, b: Backend) -> Result<()> {
        let mut a: Array<&mut MapData, Backend> = Array::try_from(self.map_mut(maps::BACKENDS)?)?;
        a.set(id, b, 0).with_context(|| format!("writing BACKENDS[{id}]"))
    }

    pub fn read_backend(&self, id: u32) -> Result<Backend> {
        let a: Array<&MapData, Backend> = Array::try_from(self.map(maps::BACKENDS)?)?;
        a.get(&id, 0).with_context(|| format!("reading BACKENDS[{id}]"))
    }

    /// Replies from `backend` arriving on interface `ifindex` (the backend side: where the
    /// route to the backend leaves; 0 for none) are translated back to `vip` (same family).
    pub fn write_reverse(&mut self, backend: &Endpoint, vip: &Endpoint, service_id: u32, backend_id: u32, ifindex: u32) -> Result<()> {
        match (backend, vip) {
            (Endpoint::V4(b), Endpoint::V4(v)) => HashMap::<_, ServiceKey, Reverse>::try_from(self.map_mut(maps::REVERSE)?)?
                .insert(b, Reverse { vip: v.addr, port: v.port, _pad: 0, service_id, backend_id, ifindex }, 0)
                .context("writing REVERSE"),
            (Endpoint::V6(b), Endpoint::V6(v)) => HashMap::<_, ServiceKey6, Reverse6>::try_from(self.map_mut(maps::REVERSE6)?)?
                .insert(b, Reverse6 { vip: v.addr, port: v.port, _pad: 0, service_id, backend_id, ifindex }, 0)
                .context("writing REVERSE6"),
            _ => bail!("backend {} and VIP {} are of different address families", backend.addr(), vip.addr()),
        }
    }

    pub fn remove_reverse(&mut self, key: &Endpoint) -> Result<()> {
        match key {
            Endpoint::V4(k) => ignore_missing(
                HashMap::<_, ServiceKey, Reverse>::try_from(self.map_mut(maps::REVERSE)?)?.remove(k),
            ),
            Endpoint::V6(k) => ignore_missing(
                HashMap::<_, ServiceKey6, Reverse6>::try_from(self.map_mut(maps::REVERSE6)?)?.remove(k),
            ),
        }
        .context("removing a REVERSE entry")
    }

    /// Every REVERSE and REVERSE6 key (backend endpoints).
    pub fn reverse_keys(&self) -> Result<Vec<Endpoint>> {
        let v4: HashMap<&MapData, ServiceKey, Reverse> = HashMap::try_from(self.map(maps::REVERSE)?)?;
        let v6: HashMap<&MapData, ServiceKey6, Reverse6> = HashMap::try_from(self.map(maps::REVERSE6)?)?;
        let mut out: Vec<Endpoint> = v4.keys().map(|k| k.map(Endpoint::V4)).collect::<Result<_, _>>().context("reading REVERSE")?;
        for k in v6.keys() {
            out.push(Endpoint::V6(k.context("reading REVERSE6")?));
        }
        Ok(out)
    }

    /// Every in-use BACKENDS slot, by id.
    pub fn backends(&self) -> Result<Vec<(u32, Backend)>> {
        let a: Array<&MapData, Backend> = Array::try_from(self.map(maps::BACKENDS)?)?;
        let mut out = Vec::new();
        for id in 0..self.cap.max_backends {
            let b = a.get(&id, 0).with_context(|| format!("reading BACKENDS[{id}]"))?;
            if b.flags & lb_common::BACKEND_F_IN_USE != 0 {
                out.push((id, b));
            }
        }
        Ok(out)
    }

    /// Writes one of a service's two Maglev tables (backend ids, 16 bits each, four per 64-bit
    /// array element) with a single copy through a memory mapping of the array (the map is
    /// BPF_F_MMAPABLE), instead of one syscall per slot.
    pub fn write_maglev(&mut self, service_id: u32, table: u32, entries: &[u32]) -> Result<()> {
        let m = self.cap.maglev_m;
        if entries.len() != m as usize {
            bail!("Maglev table of service {service_id} has {} entries, expected {m}", entries.len());
        }
        if service_id >= self.cap.max_services {
            bail!("service id {service_id} >= datapath.max_services {}", self.cap.max_services);
        }
        if let Some(id) = entries.iter().find(|id| **id > lb_common::MAX_BACKEND_ID) {
            bail!("backend id {id} does not fit a Maglev table");
        }
        let words: Vec<u64> = entries
            .chunks(lb_common::MAGLEV_IDS_PER_WORD as usize)
            .map(|c| c.iter().enumerate().fold(0u64, |w, (i, id)| w | (u64::from(*id) << (16 * i))))
            .collect();
        let first = lb_common::maglev_index(service_id, table, m, 0) as usize;
        let mem = self.maglev_mem()?;
        assert!(first + words.len() <= mem.words, "service id checked against max_services above");
        // SAFETY: the range lies inside the mapping (checked above); the datapath reads these words
        // concurrently, but only from the other (live) half of this service's tables.
        unsafe { std::ptr::copy_nonoverlapping(words.as_ptr(), mem.ptr.add(first), words.len()) };
        Ok(())
    }

    fn maglev_mem(&mut self) -> Result<&MaglevMem> {
        if self.maglev_mem.is_none() {
            let words = self.cap.max_services as usize * 2 * lb_common::maglev_words(self.cap.maglev_m) as usize;
            let Map::Array(data) = self.map(maps::MAGLEV)? else {
                bail!("MAGLEV is not an array map");
            };
            let fd = data.fd().as_fd().as_raw_fd();
            // SAFETY: mapping a BPF_F_MMAPABLE array of exactly `words` 8-byte elements, shared.
            let p = unsafe {
                libc::mmap(std::ptr::null_mut(), words * 8, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error()).context("mmap of the MAGLEV map");
            }
            self.maglev_mem = Some(MaglevMem { ptr: p.cast(), words });
        }
        Ok(self.maglev_mem.as_ref().expect("just set"))
    }

    /// Reads the backend id of one Maglev slot (diagnostics and tests).
    pub fn read_maglev(&self, service_id: u32, table: u32, slot: u32) -> Result<u32> {
        let a: Array<&MapData, u64> = Array::try_from(self.map(maps::MAGLEV)?)?;
        let word = a.get(&lb_common::maglev_index(service_id, table, self.cap.maglev_m, slot), 0).context("reading MAGLEV")?;
        Ok(lb_common::maglev_slot_id(word, slot))
    }

    /// Replaces the set of the balancer's own addresses (both families).
    pub fn set_local_addrs(&mut self, addrs: &[IpAddr]) -> Result<()> {
        let v4: Vec<u32> = addrs.iter().filter(|a| a.is_ipv4()).map(|a| addr_words(*a)[0]).collect();
        let v6: Vec<[u32; 4]> = addrs.iter().filter(|a| a.is_ipv6()).map(|a| addr_words(*a)).collect();
        sync_set(&mut HashMap::<_, u32, u32>::try_from(self.map_mut(maps::LOCAL_ADDRS)?)?, &v4).context("writing LOCAL_ADDRS")?;
        sync_set(&mut HashMap::<_, [u32; 4], u32>::try_from(self.map_mut(maps::LOCAL_ADDRS6)?)?, &v6)
            .context("writing LOCAL_ADDRS6")
    }

    /// A second handle on the affinity table for scans without the daemon lock.
    pub fn pin_table(&self) -> Result<PinTable> {
        let fd = self.map_fd(maps::AFFINITY)?;
        // SAFETY: `fd` is a live map fd owned by this Datapath for the duration of the call.
        let owned = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
            .try_clone_to_owned()
            .context("duplicating the AFFINITY map fd")?;
        let data = MapData::from_fd(owned).context("opening AFFINITY a second time")?;
        Ok(PinTable { map: Map::LruHashMap(data), capacity: self.cap.affinity_entries })
    }

    /// Every affinity entry (the datapath's clock: [`monotonic_coarse_ns`]). Read in batches
    /// (BPF_MAP_LOOKUP_BATCH: a million pins in a few dozen syscalls); reading does not refresh
    /// an entry's place in the LRU.
    pub fn affinity_entries(&self) -> Result<Vec<(AffinityKey, AffinityValue)>> {
        self.hash_entries(maps::AFFINITY)
    }

    /// Every connection entry (see [`Datapath::affinity_entries`]).
    pub fn flow_entries(&self) -> Result<Vec<(FlowKey, FlowValue)>> {
        self.hash_entries(maps::FLOWS)
    }

    /// Every entry of a hash map, in batches.
    fn hash_entries<K: aya::Pod, V: aya::Pod>(&self, name: &str) -> Result<Vec<(K, V)>> {
        let fd = self.map_fd(name)?;
        match batch::lookup_all::<K, V>(fd, 4096) {
            Ok(v) => Ok(v),
            // Kernels before 5.6 have no batch operations.
            Err(e) if batch::unsupported(&e) => {
                let m: HashMap<&MapData, K, V> = HashMap::try_from(self.map(name)?)?;
                m.iter().collect::<Result<Vec<_>, _>>().with_context(|| format!("reading {name}"))
            }
            Err(e) => Err(e).with_context(|| format!("reading {name} (BPF_MAP_LOOKUP_BATCH)")),
        }
    }

    /// One affinity entry (the lookup does not refresh its place in the LRU).
    pub fn affinity_get(&self, k: &AffinityKey) -> Result<Option<AffinityValue>> {
        let m: HashMap<&MapData, AffinityKey, AffinityValue> = HashMap::try_from(self.map(maps::AFFINITY)?)?;
        match m.get(k, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading AFFINITY"),
        }
    }

    /// Deletes every affinity entry `pred` selects (one scan, a batch at a time); returns how many.
    pub fn flush_affinity(&mut self, pred: impl Fn(&AffinityKey, &AffinityValue) -> bool) -> Result<usize> {
        let table = self.pin_table()?;
        let mut doomed = Vec::new();
        table.scan(|k, v| {
            if pred(k, v) {
                doomed.push(*k);
            }
        })?;
        table.delete(&doomed)
    }

    /// Deletes every connection entry `pred` selects; returns how many. Those connections fall
    /// back to their client's pin (or Maglev) at their next packet.
    pub fn flush_flows(&mut self, pred: impl Fn(&FlowKey, &FlowValue) -> bool) -> Result<usize> {
        let doomed: Vec<FlowKey> = self.flow_entries()?.into_iter().filter(|(k, v)| pred(k, v)).map(|(k, _)| k).collect();
        delete_keys(self.map_fd(maps::FLOWS)?, maps::FLOWS, &doomed)
    }

    fn map_fd(&self, name: &str) -> Result<std::os::fd::RawFd> {
        let data: &MapData = match self.map(name)? {
            Map::LruHashMap(d) | Map::HashMap(d) | Map::Array(d) | Map::PerCpuArray(d) => d,
            _ => bail!("map {name} has an unexpected type"),
        };
        Ok(data.fd().as_fd().as_raw_fd())
    }

    /// Writes many affinity entries (BPF_MAP_UPDATE_BATCH, a chunk at a time); returns how many.
    pub fn write_affinity_batch(&mut self, entries: &[(AffinityKey, AffinityValue)]) -> Result<usize> {
        self.pin_table()?.write(entries)
    }

    pub fn write_affinity(&mut self, k: AffinityKey, v: AffinityValue) -> Result<()> {
        let mut m: HashMap<&mut MapData, AffinityKey, AffinityValue> =
            HashMap::try_from(self.map_mut(maps::AFFINITY)?)?;
        m.insert(k, v, 0).context("writing AFFINITY")
    }

    /// New TCP connections counted per client prefix (`PREFIX_NEW`, summed over the CPUs).
    pub fn prefix_new_counts(&self) -> Result<Vec<(AffinityKey, u64)>> {
        let m: aya::maps::PerCpuHashMap<&MapData, AffinityKey, u64> = aya::maps::PerCpuHashMap::try_from(self.map(maps::PREFIX_NEW)?)?;
        let mut out = Vec::new();
        for entry in m.iter() {
            match entry {
                Ok((k, per_cpu)) => out.push((k, per_cpu.iter().sum())),
                // An entry evicted while we iterate.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(e).context("reading PREFIX_NEW"),
            }
        }
        Ok(out)
    }

    /// The prefixes split (`HOT_PREFIXES`).
    pub fn hot_prefixes(&self) -> Result<Vec<AffinityKey>> {
        let m: HashMap<&MapData, AffinityKey, u32> = HashMap::try_from(self.map(maps::HOT_PREFIXES)?)?;
        m.keys().collect::<Result<Vec<_>, _>>().context("reading HOT_PREFIXES")
    }

    /// Splits the prefix of pin key `k`: listed in `HOT_PREFIXES`, and its pin (if any) flagged,
    /// so its clients are pinned per address from their next placement on.
    pub fn split_prefix(&mut self, k: &AffinityKey) -> Result<()> {
        let mut m: HashMap<&mut MapData, AffinityKey, u32> = HashMap::try_from(self.map_mut(maps::HOT_PREFIXES)?)?;
        m.insert(k, 1, 0).context("writing HOT_PREFIXES")?;
        if let Some(mut v) = self.affinity_get(k)? {
            v.flags |= lb_common::PIN_F_SPLIT;
            // BPF_EXIST: a pin evicted meanwhile is not written back.
            let mut a: HashMap<&mut MapData, AffinityKey, AffinityValue> = HashMap::try_from(self.map_mut(maps::AFFINITY)?)?;
            match a.insert(k, v, 2) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e).context("flagging a split prefix's pin"),
            }
        }
        Ok(())
    }

    /// Joins the prefix of pin key `k` again: removed from `HOT_PREFIXES`, its pin's flag cleared.
    pub fn join_prefix(&mut self, k: &AffinityKey) -> Result<()> {
        let mut m: HashMap<&mut MapData, AffinityKey, u32> = HashMap::try_from(self.map_mut(maps::HOT_PREFIXES)?)?;
        ignore_missing(m.remove(k)).context("removing a HOT_PREFIXES entry")?;
        if let Some(mut v) = self.affinity_get(k)?
            && v.flags & lb_common::PIN_F_SPLIT != 0
        {
            v.flags &= !lb_common::PIN_F_SPLIT;
            let _ = HashMap::<&mut MapData, AffinityKey, AffinityValue>::try_from(self.map_mut(maps::AFFINITY)?)?.insert(k, v, 2);
        }
        Ok(())
    }

    fn sum_counters(&self, name: &str, id: u32) -> Result<Counters> {
        let a: PerCpuArray<&MapData, Counters> = PerCpuArray::try_from(self.map(name)?)?;
        let mut total = Counters::default();
        for c in a.get(&id, 0).with_context(|| format!("reading {name}[{id}]"))?.iter() {
            total.add(c);
        }
        Ok(total)
    }

    pub fn service_counters(&self, id: u32) -> Result<Counters> {
        self.sum_counters(maps::SERVICE_STATS, id)
    }

    pub fn backend_counters(&self, id: u32) -> Result<Counters> {
        self.sum_counters(maps::BACKEND_STATS, id)
    }

    /// Verdict counters summed over CPUs, by name.
    pub fn stats(&self) -> Result<BTreeMap<&'static str, u64>> {
        let a: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map(maps::STATS)?)?;
        let mut out = BTreeMap::new();
        for (i, name) in stat::NAMES.iter().enumerate() {
            let v = a.get(&(i as u32), 0).context("reading STATS")?;
            out.insert(*name, v.iter().sum());
        }
        Ok(out)
    }
}


/// A second handle on the AFFINITY map, for the scans that run without the daemon lock (pin
/// counts, `lb affinity list` and `flush`): the daemon's own map writes go on meanwhile (the
/// kernel locks per bucket). Made by [`Datapath::pin_table`].
pub struct PinTable {
    map: Map,
    capacity: u32,
}

impl PinTable {
    fn fd(&self) -> RawFd {
        match &self.map {
            Map::LruHashMap(d) | Map::HashMap(d) => d.fd().as_fd().as_raw_fd(),
            _ => unreachable!("made from AFFINITY"),
        }
    }

    /// The table's capacity (`datapath.affinity_entries`).
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// One pin, if there is one (a point lookup).
    pub fn get(&self, k: &AffinityKey) -> Result<Option<AffinityValue>> {
        let mut v = AffinityValue::default();
        // SAFETY: a key and a value of AFFINITY's sizes.
        let found = unsafe { sys::lookup_elem(self.fd(), (k as *const AffinityKey).cast(), (&mut v as *mut AffinityValue).cast()) }
            .context("looking a pin up in AFFINITY")?;
        Ok(found.then_some(v))
    }

    /// The AFFINITY map a daemon pinned under `pin_dir` (benchmarks and tests fill it).
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        let path = pin_dir.join(maps::AFFINITY);
        let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        let capacity = data.info().context("reading AFFINITY's info")?.max_entries();
        Ok(Self { map: Map::LruHashMap(data), capacity })
    }

    /// Writes entries (BPF_MAP_UPDATE_BATCH, 64 Ki at a time); returns how many.
    pub fn write(&self, entries: &[(AffinityKey, AffinityValue)]) -> Result<usize> {
        let mut n = 0;
        for chunk in entries.chunks(65536) {
            let (keys, values): (Vec<AffinityKey>, Vec<AffinityValue>) = chunk.iter().copied().unzip();
            n += batch::update(self.fd(), &keys, &values).context("writing AFFINITY (BPF_MAP_UPDATE_BATCH)")?;
        }
        Ok(n)
    }

    /// Calls `f` on every entry, a batch at a time (reading does not refresh an entry's place in
    /// the LRU). Returns how many entries there were.
    pub fn scan(&self, mut f: impl FnMut(&AffinityKey, &AffinityValue)) -> Result<usize> {
        match batch::lookup_each::<AffinityKey, AffinityValue>(self.fd(), 4096, &mut f) {
            Ok(n) => Ok(n),
            // Kernels before 5.6 have no batch operations: one key at a time then.
            Err(e) if batch::unsupported(&e) => {
                let m: HashMap<&MapData, AffinityKey, AffinityValue> = HashMap::try_from(&self.map)?;
                let mut n = 0;
                for entry in m.iter() {
                    let (k, v) = entry.context("reading AFFINITY")?;
                    f(&k, &v);
                    n += 1;
                }
                Ok(n)
            }
            Err(e) => Err(e).context("reading AFFINITY (BPF_MAP_LOOKUP_BATCH)"),
        }
    }

    /// Deletes these entries (those still there); returns how many were.
    pub fn delete(&self, keys: &[AffinityKey]) -> Result<usize> {
        delete_keys(self.fd(), maps::AFFINITY, keys)
    }
}

/// Deletes these keys of hash map `name` (those still there), 4096 per BPF_MAP_DELETE_BATCH, or
/// one by one on kernels without batch operations; returns how many were there.
fn delete_keys<K: aya::Pod>(fd: RawFd, name: &str, keys: &[K]) -> Result<usize> {
    let mut n = 0;
    for chunk in keys.chunks(4096) {
        match batch::delete(fd, chunk) {
            Ok(d) => n += d,
            Err(e) if batch::unsupported(&e) => n += chunk.iter().filter(|k| delete_elem(fd, *k)).count(),
            Err(e) => return Err(e).with_context(|| format!("deleting {name} entries (BPF_MAP_DELETE_BATCH)")),
        }
    }
    Ok(n)
}

/// BPF_MAP_DELETE_ELEM of one key; whether it was there.
fn delete_elem<K: aya::Pod>(fd: RawFd, key: &K) -> bool {
    // SAFETY: a key of the map's key size.
    unsafe { sys::delete_elem(fd, (key as *const K).cast()) }.unwrap_or(false)
}

/// The MAC address of `iface` in this network namespace.
pub fn interface_mac(iface: &str) -> Result<[u8; 6]> {
    nix::ifaddrs::getifaddrs()
        .context("listing interfaces")?
        .filter(|a| a.interface_name == iface)
        .find_map(|a| a.address.and_then(|s| s.as_link_addr().and_then(|l| l.addr())))
        .with_context(|| format!("interface {iface} has no MAC address"))
}

/// CLOCK_MONOTONIC_COARSE now, in ns: the clock the XDP program stamps pins with
/// (`bpf_ktime_get_coarse_ns`).
pub fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Batch map operations (BPF_MAP_LOOKUP_BATCH, BPF_MAP_DELETE_BATCH, kernel 5.6+), which aya
/// 0.14 does not wrap.
mod batch {
    use std::{io, mem::size_of, os::fd::RawFd};

    use lb_common::sys::{BPF_MAP_DELETE_BATCH, BPF_MAP_LOOKUP_BATCH, BPF_MAP_UPDATE_BATCH, BatchAttr};
    pub use lb_common::sys::batch_unsupported as unsupported;

    /// Every attribute here holds buffers that outlive the call, of `count` keys (and values)
    /// of the map's sizes.
    fn sys(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
        lb_common::sys::bpf(cmd, attr).map(|_| ())
    }

    /// Every (key, value) of a hash map, `chunk` at a time (more when one bucket needs it).
    pub fn lookup_all<K: aya::Pod, V: aya::Pod>(fd: RawFd, chunk: usize) -> io::Result<Vec<(K, V)>> {
        let mut out = Vec::new();
        lookup_each(fd, chunk, |k: &K, v: &V| out.push((*k, *v)))?;
        Ok(out)
    }

    /// Calls `f` on every (key, value) of a hash map, reading `chunk` entries per syscall (more
    /// when one bucket needs it), so a scan of millions of entries holds one chunk in memory.
    /// Returns how many entries it saw.
    pub fn lookup_each<K: aya::Pod, V: aya::Pod>(fd: RawFd, mut chunk: usize, mut f: impl FnMut(&K, &V)) -> io::Result<usize> {
        let mut seen = 0;
        // The batch position is opaque: for hash maps a bucket index (u32); room for more.
        let (mut token_in, mut token_out) = ([0u8; 8], [0u8; 8]);
        let mut first = true;
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        loop {
            keys.resize(chunk * size_of::<K>(), 0u8);
            values.resize(chunk * size_of::<V>(), 0u8);
            let mut attr = BatchAttr {
                in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
                out_batch: token_out.as_mut_ptr() as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: chunk as u32,
                map_fd: fd as u32,
                ..Default::default()
            };
            let r = sys(BPF_MAP_LOOKUP_BATCH, &mut attr);
            for i in 0..attr.count as usize {
                // SAFETY: the kernel wrote `count` packed keys and values of these Pod types.
                let (k, v) = unsafe {
                    (
                        keys.as_ptr().add(i * size_of::<K>()).cast::<K>().read_unaligned(),
                        values.as_ptr().add(i * size_of::<V>()).cast::<V>().read_unaligned(),
                    )
                };
                f(&k, &v);
            }
            seen += attr.count as usize;
            match r {
                Ok(()) => {}
                // Past the last bucket: done.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(seen),
                // One bucket holds more entries than `chunk`: again from the same place, bigger.
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && attr.count == 0 => {
                    chunk *= 2;
                    continue;
                }
                Err(e) => return Err(e),
            }
            token_in = token_out;
            first = false;
        }
    }

    /// Writes `keys[i]` = `values[i]` (BPF_ANY); returns how many were written.
    pub fn update<K: aya::Pod, V: aya::Pod>(fd: RawFd, keys: &[K], values: &[V]) -> io::Result<usize> {
        assert_eq!(keys.len(), values.len());
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        sys(BPF_MAP_UPDATE_BATCH, &mut attr).map(|()| attr.count as usize)
    }

    /// Deletes `keys` from a hash map, skipping those that are not there; returns how many were.
    pub fn delete<K: aya::Pod>(fd: RawFd, keys: &[K]) -> io::Result<usize> {
        let (mut deleted, mut rest) = (0, keys);
        while !rest.is_empty() {
            let mut attr = BatchAttr {
                keys: rest.as_ptr() as u64,
                count: rest.len() as u32,
                map_fd: fd as u32,
                ..Default::default()
            };
            let r = sys(BPF_MAP_DELETE_BATCH, &mut attr);
            // The kernel stops at the first key it cannot delete; `count` were deleted before it.
            deleted += attr.count as usize;
            match r {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => rest = &rest[(attr.count as usize + 1).min(rest.len())..],
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }
}

/// Makes the key set of `m` equal to `want` (values 1).
fn sync_set<K: aya::Pod + PartialEq>(m: &mut HashMap<&mut MapData, K, u32>, want: &[K]) -> Result<()> {
    let have: Vec<K> = m.keys().filter_map(Result::ok).collect();
    for k in have.iter().filter(|k| !want.contains(k)) {
        ignore_missing(m.remove(k))?;
    }
    for k in want.iter().filter(|k| !have.contains(k)) {
        m.insert(k, 1, 0)?;
    }
    Ok(())
}

/// A delete of a key that is not there is not an error here (removal is idempotent).
/// Refuses pinned state of another layout before any map is opened by name: a map whose key or
/// value changed size would otherwise be reused as it is and the program would fail to load
/// with a verifier message instead of saying what is wrong.
fn check_pinned_layout(dir: &Path) -> Result<()> {
    let path = dir.join(maps::CONFIG);
    if !path.exists() {
        return Ok(());
    }
    let other = |e: &dyn std::fmt::Display| {
        anyhow!("the pinned datapath state under {} was made by another lb version ({e}): {DOWN_ADVICE}", dir.display())
    };
    let data = MapData::from_pin(&path).map_err(|e| other(&e))?;
    let a: Array<MapData, GlobalConfig> = Array::try_from(Map::Array(data)).map_err(|e| other(&e))?;
    let g = a.get(&0, 0).map_err(|e| other(&e))?;
    if g.layout_version != 0 && g.layout_version != LAYOUT_VERSION {
        bail!(
            "the pinned datapath state has layout version {}, this lb uses {LAYOUT_VERSION}: {DOWN_ADVICE}",
            g.layout_version
        );
    }
    Ok(())
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// How many lines of the verifier log a rejection shows (the error is at the end).
const VERIFIER_TAIL_LINES: usize = 20;

/// Turns a program load failure into one line plus the verifier log's tail.
fn describe_load_error(e: ProgramError) -> anyhow::Error {
    match e {
        ProgramError::LoadError { io_error, verifier_log } => {
            anyhow!(verifier_rejection(&io_error, &verifier_log.to_string()))
        }
        other => anyhow!(other).context("loading the XDP program"),
    }
}

fn verifier_rejection(io_error: &std::io::Error, log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    // LB_VERIFIER_LOG_LINES shows more of the log when debugging the XDP program.
    let n = std::env::var("LB_VERIFIER_LOG_LINES").ok().and_then(|v| v.parse().ok()).unwrap_or(VERIFIER_TAIL_LINES);
    let tail = lines[lines.len().saturating_sub(n)..].join("\n");
    format!("the kernel verifier rejected the XDP program ({io_error}); last lines of the verifier log:\n{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_rejection_shows_one_line_then_the_logs_tail() {
        let log: String = (1..=50).map(|i| format!("{i}: insn\n")).collect::<String>() + "invalid access to packet\n\n";
        let msg = verifier_rejection(&std::io::Error::from_raw_os_error(libc::EACCES), &log);
        let lines: Vec<&str> = msg.lines().collect();
        assert!(lines[0].starts_with("the kernel verifier rejected the XDP program (Permission denied"));
        assert_eq!(lines.len(), 1 + VERIFIER_TAIL_LINES);
        assert_eq!(*lines.last().unwrap(), "invalid access to packet");
        assert_eq!(lines[1], "32: insn");
    }
}
