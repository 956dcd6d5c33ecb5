//! The one place that loads the XDP program, attaches it, pins its maps and writes them. Every
//! map access of the daemon goes through [`Datapath`]'s typed methods.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{ProgramError, Xdp, XdpMode as AyaXdpMode, xdp::XdpLinkId},
};
use lb_common::{
    AffinityKey, AffinityValue, Backend, Counters, GlobalConfig, LAYOUT_VERSION, PROGRAM_NAME,
    Reverse, Service, ServiceKey, maps, stat,
};
use serde::Serialize;

use crate::config::{DatapathConfig, XdpMode};

/// The compiled XDP object, built by build.rs (aya-build) for bpfel-unknown-none.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// Every map the daemon pins, by name.
pub const ALL_MAPS: [&str; 10] = [
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
];

/// Map capacities, fixed at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub max_services: u32,
    pub max_backends: u32,
    pub maglev_m: u32,
    pub affinity_entries: u32,
}

impl Capacity {
    pub fn from_config(d: &DatapathConfig) -> Self {
        Self {
            max_services: d.max_services,
            max_backends: d.max_backends,
            maglev_m: d.maglev_table_size,
            affinity_entries: d.affinity_entries,
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

#[derive(Debug)]
pub struct Attachment {
    pub interface: String,
    pub mode: AttachMode,
    link: XdpLinkId,
}

pub struct Datapath {
    ebpf: Ebpf,
    cap: Capacity,
    attachments: Vec<Attachment>,
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
            .map_max_entries(maps::MAGLEV, maglev_entries)
            .map_max_entries(maps::AFFINITY, cap.affinity_entries);
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
        Ok(Self { ebpf, cap, attachments: Vec::new() })
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

    /// Attaches to `iface`: native first then generic for `auto`, or exactly as asked.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<AttachMode> {
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
                    self.attachments.push(Attachment { interface: iface.to_string(), mode: *mode, link });
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

    /// Detaches from every interface (also done when the Datapath is dropped).
    pub fn detach_all(&mut self) {
        let links: Vec<XdpLinkId> = self.attachments.drain(..).map(|a| a.link).collect();
        for link in links {
            if let Err(e) = self.program().detach(link) {
                tracing::warn!(error = %e, "detaching XDP");
            }
        }
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

    pub fn write_global(&mut self, g: GlobalConfig) -> Result<()> {
        let mut a: Array<&mut MapData, GlobalConfig> = Array::try_from(self.map_mut(maps::CONFIG)?)?;
        a.set(0, g, 0).context("writing CONFIG")
    }

    /// Refuses state written by an incompatible layout (reused pins from another version).
    pub fn check_layout(&self) -> Result<()> {
        let g = self.read_global()?;
        if g.layout_version != 0 && g.layout_version != LAYOUT_VERSION {
            bail!(
                "pinned datapath state has layout version {}, this lb uses {}: remove the pins \
                 under datapath.pin_path (they hold the old affinity table) and start again",
                g.layout_version,
                LAYOUT_VERSION
            );
        }
        Ok(())
    }

    pub fn write_service(&mut self, key: ServiceKey, svc: Service) -> Result<()> {
        let mut m: HashMap<&mut MapData, ServiceKey, Service> =
            HashMap::try_from(self.map_mut(maps::SERVICES)?)?;
        m.insert(key, svc, 0).with_context(|| format!("writing SERVICES entry of service {}", svc.id))
    }

    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        let mut m: HashMap<&mut MapData, ServiceKey, Service> =
            HashMap::try_from(self.map_mut(maps::SERVICES)?)?;
        m.remove(key).context("removing SERVICES entry")
    }

    pub fn services(&self) -> Result<Vec<(ServiceKey, Service)>> {
        let m: HashMap<&MapData, ServiceKey, Service> = HashMap::try_from(self.map(maps::SERVICES)?)?;
        m.iter().collect::<Result<Vec<_>, _>>().context("reading SERVICES")
    }

    pub fn write_backend(&mut self, id: u32, b: Backend) -> Result<()> {
        let mut a: Array<&mut MapData, Backend> = Array::try_from(self.map_mut(maps::BACKENDS)?)?;
        a.set(id, b, 0).with_context(|| format!("writing BACKENDS[{id}]"))
    }

    pub fn read_backend(&self, id: u32) -> Result<Backend> {
        let a: Array<&MapData, Backend> = Array::try_from(self.map(maps::BACKENDS)?)?;
        a.get(&id, 0).with_context(|| format!("reading BACKENDS[{id}]"))
    }

    pub fn write_reverse(&mut self, key: ServiceKey, r: Reverse) -> Result<()> {
        let mut m: HashMap<&mut MapData, ServiceKey, Reverse> =
            HashMap::try_from(self.map_mut(maps::REVERSE)?)?;
        m.insert(key, r, 0).context("writing REVERSE")
    }

    /// Writes one of a service's two Maglev tables with a single copy through a memory mapping
    /// of the array (the map is BPF_F_MMAPABLE).
    pub fn write_maglev(&mut self, service_id: u32, table: u32, entries: &[u32]) -> Result<()> {
        let m = self.cap.maglev_m;
        if entries.len() != m as usize {
            bail!("Maglev table of service {service_id} has {} entries, expected {m}", entries.len());
        }
        if service_id >= self.cap.max_services {
            bail!("service id {service_id} >= datapath.max_services {}", self.cap.max_services);
        }
        // Array maps round each element up to 8 bytes (kernel/bpf/arraymap.c: elem_size), and
        // the memory mapping shows that layout: a u32 slot sits every 8 bytes.
        const STRIDE: usize = 8;
        let total = self.cap.max_services as usize * 2 * m as usize * STRIDE;
        let Map::Array(data) = self.map(maps::MAGLEV)? else {
            bail!("MAGLEV is not an array map");
        };
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: mapping a BPF_F_MMAPABLE array of exactly `total` bytes, shared, read-write;
        // every write below stays inside it, and it is unmapped before returning.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error()).context("mmap of the MAGLEV map");
            }
            let first = lb_common::maglev_index(service_id, table, m, 0) as usize;
            let base = (p as *mut u8).add(first * STRIDE);
            for (i, id) in entries.iter().enumerate() {
                (base.add(i * STRIDE) as *mut u32).write(*id);
            }
            libc::munmap(p, total);
        }
        Ok(())
    }

    /// Reads one Maglev slot (diagnostics and tests).
    pub fn read_maglev(&self, service_id: u32, table: u32, slot: u32) -> Result<u32> {
        let a: Array<&MapData, u32> = Array::try_from(self.map(maps::MAGLEV)?)?;
        a.get(&lb_common::maglev_index(service_id, table, self.cap.maglev_m, slot), 0)
            .context("reading MAGLEV")
    }

    /// Replaces the set of the balancer's own addresses.
    pub fn set_local_addrs(&mut self, addrs: &[Ipv4Addr]) -> Result<()> {
        let mut m: HashMap<&mut MapData, u32, u32> = HashMap::try_from(self.map_mut(maps::LOCAL_ADDRS)?)?;
        let want: Vec<u32> = addrs.iter().map(|a| u32::from_ne_bytes(a.octets())).collect();
        let have: Vec<u32> = m.keys().filter_map(Result::ok).collect();
        for k in have.iter().filter(|k| !want.contains(k)) {
            let _ = m.remove(k);
        }
        for k in want.iter().filter(|k| !have.contains(k)) {
            m.insert(*k, 1, 0).context("writing LOCAL_ADDRS")?;
        }
        Ok(())
    }

    pub fn affinity_entries(&self) -> Result<Vec<(AffinityKey, AffinityValue)>> {
        let m: HashMap<&MapData, AffinityKey, AffinityValue> =
            HashMap::try_from(self.map(maps::AFFINITY)?)?;
        m.iter().collect::<Result<Vec<_>, _>>().context("reading AFFINITY")
    }

    pub fn write_affinity(&mut self, k: AffinityKey, v: AffinityValue) -> Result<()> {
        let mut m: HashMap<&mut MapData, AffinityKey, AffinityValue> =
            HashMap::try_from(self.map_mut(maps::AFFINITY)?)?;
        m.insert(k, v, 0).context("writing AFFINITY")
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

impl Drop for Datapath {
    fn drop(&mut self) {
        self.detach_all();
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
    let tail = lines[lines.len().saturating_sub(VERIFIER_TAIL_LINES)..].join("\n");
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
