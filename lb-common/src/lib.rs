//! Types and constants shared by the XDP program (`lb-ebpf`) and the daemon (`lb-userspace`).
//!
//! Every map key and value is `#[repr(C)]`, `Copy`, has explicit padding fields and a compile-time
//! size check: the verifier and the kernel's hash functions see every byte of a key, so a key must
//! never carry an implicit hole with stale stack bytes in it.
//!
//! Addresses and ports are stored in network byte order, exactly as they sit in the packet, so the
//! datapath compares and copies them without swapping.
#![no_std]

pub mod csum;
pub mod hash;
#[cfg(feature = "sys")]
pub mod sys;

/// Bumped whenever a map's key or value layout, a map's meaning, or a map name changes. Stored in
/// `CONFIG[0].layout_version`; a daemon refuses to adopt pinned state of another version.
pub const LAYOUT_VERSION: u32 = 3;

/// Pin name of the XDP link of interface `ifname` under the pin path is `LINK_PIN_PREFIX` +
/// `ifname`: the attachment outlives the daemon, so a restart never interrupts traffic.
pub const LINK_PIN_PREFIX: &str = "link_";

/// Map names, as the XDP program declares them and as they are pinned under `datapath.pin_path`.
pub mod maps {
    /// Array[1] of [`crate::GlobalConfig`].
    pub const CONFIG: &str = "CONFIG";
    /// Hash [`crate::ServiceKey`] -> [`crate::Service`].
    pub const SERVICES: &str = "SERVICES";
    /// Array[max_backends] of [`crate::Backend`], indexed by backend id.
    pub const BACKENDS: &str = "BACKENDS";
    /// Array[max_services * 2 * maglev_words(maglev_m)] of u64, each holding four 16-bit backend
    /// ids: each service owns two tables (double buffer); `Service::table` names the live one.
    pub const MAGLEV: &str = "MAGLEV";
    /// LRU hash [`crate::AffinityKey`] -> [`crate::AffinityValue`].
    pub const AFFINITY: &str = "AFFINITY";
    /// Hash [`crate::ServiceKey`] (a backend's address, port, protocol) -> [`crate::Reverse`].
    pub const REVERSE: &str = "REVERSE";
    /// Hash u32 (an IPv4 address of the balancer itself, network order) -> u32 (unused, 1):
    /// replies addressed to these are the balancer's own traffic (health checks) and are never
    /// reverse-translated.
    pub const LOCAL_ADDRS: &str = "LOCAL_ADDRS";
    /// Per-CPU array[max_services] of [`crate::Counters`].
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    /// Per-CPU array[max_backends] of [`crate::Counters`].
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    /// Per-CPU array[`crate::stat::COUNT`] of u64, indexed by [`crate::stat`] codes.
    pub const STATS: &str = "STATS";
    /// Hash [`crate::ServiceKey6`] -> [`crate::Service`]: IPv6 services.
    pub const SERVICES6: &str = "SERVICES6";
    /// Hash [`crate::ServiceKey6`] (a backend's address, port, protocol) -> [`crate::Reverse6`].
    pub const REVERSE6: &str = "REVERSE6";
    /// Hash [u32; 4] (an IPv6 address of the balancer itself) -> u32 (unused, 1).
    pub const LOCAL_ADDRS6: &str = "LOCAL_ADDRS6";
    /// Hash [`crate::AddrKey`] -> u32 (`crate::ADDR_F_*`): every VIP and backend address, for
    /// packets without ports (non-first fragments, ICMP) to tell whether they are ours.
    pub const ADDRS: &str = "ADDRS";
    /// LRU hash [`crate::FragKey`] -> [`crate::FragValue`]: how the first fragment of a datagram
    /// was translated, for the fragments that follow it (they carry no ports).
    pub const FRAGS: &str = "FRAGS";
    /// Hash u32 (ifindex) -> [`crate::TxPort`]: the interfaces the program is attached to, the
    /// only ones a frame is redirected to (others, e.g. VLAN or bridge devices, cannot transmit XDP
    /// frames: the kernel forwards to them instead), with their MAC addresses: frames arriving
    /// for another MAC (flooded, or seen in promiscuous mode) are not ours.
    pub const TX_PORTS: &str = "TX_PORTS";
    /// Per-CPU array[`crate::IFACE_CACHE_ENTRIES`] of [`crate::IfaceCacheEntry`]: `TX_PORTS`
    /// entries of ingress interfaces, as this CPU last read them. Not pinned.
    pub const IFACE_CACHE: &str = "IFACE_CACHE";
    /// Hash [u8; 16] (interface name, NUL-padded) -> u32 (`crate::ATTACH_NATIVE` or
    /// `crate::ATTACH_GENERIC`); written and read by the daemon only.
    pub const ATTACH_MODES: &str = "ATTACH_MODES";
    /// Array[`crate::ADDR_FILTER_WORDS`] of u64: a one-hash Bloom filter of every address in
    /// `ADDRS` (bit `crate::addr_filter_bit`), so that traffic which is not ours is told apart
    /// without a hash-map lookup. False positives only cost the lookups it saves.
    pub const ADDR_FILTER: &str = "ADDR_FILTER";
    /// Per-CPU array[`crate::FIB_CACHE_ENTRIES`] of [`crate::FibCacheEntry`]: recent
    /// `bpf_fib_lookup` results by destination (direct-mapped by `crate::hash::addr_hash`).
    /// Not pinned: each loaded program starts with an empty cache.
    pub const FIB_CACHE: &str = "FIB_CACHE";
    /// Per-CPU array[`crate::SVC_CACHE_ENTRIES`] of [`crate::SvcCacheEntry`]: services recently
    /// looked up, by (VIP, port, protocol), valid while `GlobalConfig::svc_epoch` is unchanged.
    /// Not pinned.
    pub const SVC_CACHE: &str = "SVC_CACHE";
    /// LRU hash [`crate::FlowKey`] -> [`crate::FlowValue`]: the backend each established TCP
    /// connection was placed on, so that it stays there while that backend lives, whatever
    /// happens to its client's pin.
    pub const FLOWS: &str = "FLOWS";
    /// Hash [`crate::AffinityKey`] (a prefix's pin key) -> u32 (1): client prefixes split because
    /// they brought more than `balance.hot_prefix_share` of their service's new clients; their
    /// clients are pinned per address. Written by the daemon.
    pub const HOT_PREFIXES: &str = "HOT_PREFIXES";
    /// Per-CPU LRU hash [`crate::AffinityKey`] -> u64: new TCP connections per client prefix, for
    /// services that split hot prefixes (the daemon's measure of "new clients").
    pub const PREFIX_NEW: &str = "PREFIX_NEW";
    /// `lb agent` (its own program, `lb-agent`): ReusePortSockArray of the group's sockets.
    pub const AGENT_SOCKS: &str = "AGENT_SOCKS";
    /// Ring buffer of [`crate::MoveEvent`]: every move of a known client (a pin re-placed onto
    /// another backend), never written on the hit path.
    pub const MOVES: &str = "MOVES";
    /// `lb agent`: LRU hash [`crate::AgentKey`] -> [`crate::AgentPin`], client prefix to socket.
    pub const AGENT_PINS: &str = "AGENT_PINS";
    /// `lb agent`: Array[1] of [`crate::AgentConfig`].
    pub const AGENT_CONFIG: &str = "AGENT_CONFIG";
    /// `lb agent`: per-CPU Array of u64 counters, indexed by `agent_stat`.
    pub const AGENT_STATS: &str = "AGENT_STATS";
    /// `lb agent`: per-CPU Array of u64, per slot: clients placed on that socket.
    pub const AGENT_SLOT_NEW: &str = "AGENT_SLOT_NEW";
}

/// A move of a known client, as the datapath reports it (`MOVES`): its pin was re-placed from
/// one backend onto another, and why (`move_reason`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MoveEvent {
    /// CLOCK_MONOTONIC ns.
    pub at_ns: u64,
    pub service_id: u32,
    pub from: u32,
    pub to: u32,
    pub reason: u32,
    /// The client's pin key address (masked to the service's prefix).
    pub addr: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<MoveEvent>() == 40);

/// `MoveEvent::reason`.
pub mod move_reason {
    /// Its backend is down (health checks).
    pub const BACKEND_DOWN: u32 = 1;
    /// Its backend was removed (a reload) while its pin stayed.
    pub const BACKEND_REMOVED: u32 = 2;
    /// Its backend was drained with --force.
    pub const DRAIN_FORCE: u32 = 3;
    /// Its pins were flushed (`lb affinity flush`; reported by the daemon).
    pub const FLUSHED: u32 = 4;
    /// Its pin was idle past the timeout.
    pub const EXPIRED: u32 = 5;
    /// Its pin was older than `max_age`.
    pub const MAX_AGE: u32 = 6;

    /// The name of a reason, as in `lb events` and the metrics.
    pub const fn name(r: u32) -> &'static str {
        match r {
            BACKEND_DOWN => "backend_down",
            BACKEND_REMOVED => "backend_removed",
            DRAIN_FORCE => "drain_force",
            FLUSHED => "flushed",
            EXPIRED => "expired",
            MAX_AGE => "max_age",
            _ => "unknown",
        }
    }
}

/// `lb agent`'s client key: the client address masked to the agent's prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AgentKey {
    pub addr: [u32; 4],
    /// 4 for IPv4, 6 for IPv6 (an IPv4 client and an IPv6 one never share a key).
    pub family: u32,
}
const _: () = assert!(core::mem::size_of::<AgentKey>() == 20);

/// `lb agent`'s pin: the socket (index in `AGENT_SOCKS`) a client prefix goes to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentPin {
    pub index: u32,
    pub _pad: u32,
    /// CLOCK_MONOTONIC ns of the last connection or datagram.
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<AgentPin>() == 16);

/// `lb agent`'s settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentConfig {
    /// IPv4 client mask (network order).
    pub v4_mask: u32,
    /// Slots of `AGENT_SOCKS` in use (0..slots); empty ones are skipped.
    pub slots: u32,
    /// IPv6 client mask, network order words.
    pub v6_mask: [u32; 4],
    /// A pin idle for longer is placed afresh.
    pub timeout_ns: u64,
    pub hash_seed: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<AgentConfig>() == 40);

/// Sockets of `AGENT_SOCKS` (one reuseport group's listening sockets) at most.
pub const AGENT_MAX_SOCKETS: u32 = 256;
/// Default capacity of `AGENT_PINS`.
pub const AGENT_PIN_ENTRIES: u32 = 65536;

/// `AGENT_STATS` indices.
pub mod agent_stat {
    /// A client's pin chose its socket.
    pub const HIT: u32 = 0;
    /// A client was placed (no pin, or an idle one).
    pub const PLACED: u32 = 1;
    /// A pinned client's socket was gone: placed again.
    pub const MOVED: u32 = 2;
    /// No socket could be chosen: the kernel's own spread decided.
    pub const FALLBACK: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// `ADDRS` flags.
pub const ADDR_F_VIP: u32 = 1;
pub const ADDR_F_BACKEND: u32 = 2;

/// Address families as stored in keys.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Capacity of `FRAGS` (datagrams being fragmented at once).
pub const FRAG_ENTRIES: u32 = 8192;

/// Attach modes recorded in `ATTACH_MODES`.
pub const ATTACH_NATIVE: u32 = 1;
pub const ATTACH_GENERIC: u32 = 2;

/// The XDP program's name (the function carrying `#[xdp]`).
pub const PROGRAM_NAME: &str = "lb_xdp";

/// Default capacities. The daemon sets the real ones at load time (`datapath.max_services`,
/// `datapath.max_backends`, `datapath.maglev_table_size`, `datapath.affinity_entries`).
pub const DEFAULT_MAX_SERVICES: u32 = 64;
pub const DEFAULT_MAX_BACKENDS: u32 = 1024;
pub const DEFAULT_MAGLEV_M: u32 = 65537;
pub const DEFAULT_AFFINITY_ENTRIES: u32 = 1 << 20;
pub const DEFAULT_FLOW_ENTRIES: u32 = 1 << 20;
/// Default of `datapath.max_new_pins_per_cpu`: pins and connection entries one CPU may create
/// per second before new clients are placed without being remembered (Katran's flood guard
/// uses the same figure).
pub const DEFAULT_NEW_PINS_PER_CPU: u32 = 125_000;

/// `last_seen` of an affinity entry is refreshed only when it is older than this (or than half the
/// service's timeout, if that is shorter), so that a busy client does not write the same cache line
/// from every CPU on every packet.
pub const LAST_SEEN_REFRESH_NS: u64 = 1_000_000_000;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Global settings, `CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalConfig {
    pub layout_version: u32,
    /// Seed for hashing a client prefix onto a Maglev slot. The same on every node of a cluster,
    /// so that all nodes pick the same backend for a client.
    pub hash_seed: u32,
    /// Maglev table size M (a prime); 0 means the daemon has not configured the datapath yet.
    pub maglev_m: u32,
    pub flags: u32,
    /// Capacities the maps were created with; a daemon adopting pinned maps checks them.
    pub max_services: u32,
    pub max_backends: u32,
    pub affinity_entries: u32,
    /// Bumped by the daemon whenever the redirect targets (`TX_PORTS`) change: FIB cache
    /// entries filled under another epoch are ignored.
    pub fib_epoch: u32,
    /// Bumped by the daemon after every change to `SERVICES`/`SERVICES6`: service cache entries
    /// filled under another epoch are ignored.
    pub svc_epoch: u32,
    /// Capacity of `FLOWS`.
    pub flow_entries: u32,
    /// New pins and connection entries one CPU may write per second (0: no limit). Past it a new
    /// client is still placed (Maglev), just not remembered: a spoofed flood cannot flush the
    /// tables.
    pub new_pins_per_cpu: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<GlobalConfig>() == 48);

/// Slots of `SVC_CACHE` per CPU (a power of two).
pub const SVC_CACHE_ENTRIES: u32 = 256;

/// `SvcCacheEntry::flags`: the entry holds a service.
pub const SVC_F_VALID: u8 = 1;
/// The VIP is IPv6 (part of the tag).
pub const SVC_F_V6: u8 = 2;

/// A `SERVICES`/`SERVICES6` entry as one CPU last read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcCacheEntry {
    /// The key: VIP (network order words; IPv4 uses `addr[0]`), port (network order), protocol.
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
    /// `GlobalConfig::svc_epoch` when filled.
    pub epoch: u32,
    pub svc: Service,
}
const _: () = assert!(core::mem::size_of::<SvcCacheEntry>() == 80);

/// Words of `ADDR_FILTER` (65,536 bits: with a thousand VIP and backend addresses, under 2% of
/// other traffic pays the map lookups the filter saves).
pub const ADDR_FILTER_WORDS: u32 = 1024;

/// (word, bit) of an address in `ADDR_FILTER`.
#[inline(always)]
pub const fn addr_filter_bit(v6: bool, addr: &[u32; 4]) -> (u32, u32) {
    let h = hash::addr_hash(v6, addr) & (ADDR_FILTER_WORDS * 64 - 1);
    (h / 64, h % 64)
}

/// An attached interface in `TX_PORTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxPort {
    pub mac: [u8; 6],
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<TxPort>() == 8);

/// Slots of `IFACE_CACHE` per CPU (a power of two).
pub const IFACE_CACHE_ENTRIES: u32 = 16;

/// `IfaceCacheEntry::flags`: the entry holds a lookup (of an interface in `TX_PORTS`, or not).
pub const IFACE_F_VALID: u32 = 1;
/// The interface is in `TX_PORTS`: `mac` is its address.
pub const IFACE_F_KNOWN: u32 = 2;

/// An ingress interface's `TX_PORTS` entry as one CPU read it, under `GlobalConfig::fib_epoch`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceCacheEntry {
    pub ifindex: u32,
    pub epoch: u32,
    pub flags: u32,
    pub mac: [u8; 6],
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<IfaceCacheEntry>() == 20);
// The datapath compares `mac` as a 32-bit and a 16-bit word.
const _: () = assert!(core::mem::offset_of!(IfaceCacheEntry, mac).is_multiple_of(4));

/// Slots of `FIB_CACHE` per CPU (a power of two).
pub const FIB_CACHE_ENTRIES: u32 = 4096;

/// How long a cached FIB result is used before the next packet looks the route up again: the
/// bound on how long a route or neighbour (MAC) change goes unseen.
pub const FIB_CACHE_TTL_NS: u64 = 250_000_000;

/// `FibCacheEntry::flags`: the entry holds a successful lookup.
pub const FIB_F_VALID: u16 = 1;
/// The destination is IPv6 (part of the tag).
pub const FIB_F_V6: u16 = 2;
/// The next hop is the destination itself (no gateway): what DSR needs.
pub const FIB_F_DIRECT: u16 = 4;
/// The egress interface is in `TX_PORTS` (frames may be redirected there).
pub const FIB_F_ATTACHED: u16 = 8;

/// A cached `bpf_fib_lookup` result for one destination address, as seen from one ingress
/// interface (the kernel's lookup depends on it: per-interface forwarding, `iif` rules).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FibCacheEntry {
    /// Destination address (the tag, with `in_ifindex` and `FIB_F_V6`), network order words;
    /// IPv4 uses `addr[0]`.
    pub addr: [u32; 4],
    /// CLOCK_MONOTONIC_COARSE ns after which the entry is looked up again.
    pub expires_ns: u64,
    /// Ingress interface of the packets the entry is for.
    pub in_ifindex: u32,
    /// Egress interface.
    pub ifindex: u32,
    /// `GlobalConfig::fib_epoch` when filled.
    pub epoch: u32,
    /// The route's MTU: larger packets take the full lookup (which hands them to the kernel,
    /// which sends "fragmentation needed" / "packet too big").
    pub mtu: u16,
    pub flags: u16,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<FibCacheEntry>() == 56);
/// Offset of `FibCacheEntry::dmac`, which `smac` follows: the datapath copies both into a frame's
/// Ethernet header as three 32-bit words.
pub const FIB_MACS_OFFSET: usize = core::mem::offset_of!(FibCacheEntry, dmac);
const _: () = assert!(FIB_MACS_OFFSET.is_multiple_of(4) && core::mem::offset_of!(FibCacheEntry, smac) == FIB_MACS_OFFSET + 6);

/// (address, port, protocol): a service's VIP, or a backend's endpoint in `REVERSE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// IPv4 address, network order.
    pub addr: u32,
    /// Port, network order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);

impl ServiceKey {
    /// Builds a key from host-order values.
    pub const fn new(addr: u32, port: u16, proto: u8) -> Self {
        Self { addr: addr.to_be(), port: port.to_be(), proto, _pad: 0 }
    }
}

/// (address, port, protocol) of an IPv6 VIP, or of an IPv6 backend in `REVERSE6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey6 {
    /// Address, network order words.
    pub addr: [u32; 4],
    /// Port, network order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey6>() == 20);

/// What a reply from an IPv6 backend is translated back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reverse6 {
    pub vip: [u32; 4],
    pub port: u16,
    pub _pad: u16,
    pub service_id: u32,
    pub backend_id: u32,
    /// See [`Reverse::ifindex`].
    pub ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<Reverse6>() == 32);

/// An address and its family (IPv4 uses `addr[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey {
    pub addr: [u32; 4],
    pub family: u32,
}
const _: () = assert!(core::mem::size_of::<AddrKey>() == 20);

/// Identifies one fragmented datagram: (source, destination, IP identification, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);

/// Direction of a translated datagram in `FragValue::dir`.
pub const FRAG_TO_BACKEND: u32 = 0;
pub const FRAG_TO_CLIENT: u32 = 1;

/// How the first fragment was translated: the new destination (to a backend) or the new source
/// (the VIP, on a reply).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    pub addr: [u32; 4],
    pub dir: u32,
    pub service_id: u32,
    pub backend_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<FragValue>() == 32);

/// A service as the datapath sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Index into `SERVICE_STATS` and the service's region of `MAGLEV`.
    pub id: u32,
    pub flags: u32,
    /// Sliding idle timeout of an affinity entry, in nanoseconds of CLOCK_MONOTONIC.
    pub timeout_ns: u64,
    /// Cap on an affinity entry's total age (0: none).
    pub max_age_ns: u64,
    /// IPv4 client mask (network order) applied before the affinity lookup and the Maglev hash.
    pub v4_mask: u32,
    /// Which of the service's two Maglev tables is live (0 or 1).
    pub table: u32,
    /// IPv6 client mask, network order words.
    pub v6_mask: [u32; 4],
    /// Number of distinct backends in the live table; 0 means no backend can take new clients.
    pub backend_count: u32,
    /// Version of the live table (bumped by every rebuild), for diagnostics.
    pub generation: u32,
}
const _: () = assert!(core::mem::size_of::<Service>() == 56);

/// `GlobalConfig::flags`: direct server return. Only the destination MAC is rewritten (to the
/// backend's, on the same L2 segment); backends hold the VIP themselves and answer clients
/// directly, so there is no reply path.
pub const GLOBAL_F_DSR: u32 = 1;

/// Service flags (`Service::flags`).
/// Every backend is down: the table holds all of them and pins to down backends stay valid
/// ("fail open": routing to a maybe-dead backend beats dropping everything).
pub const SERVICE_F_FAIL_OPEN: u32 = 1;
/// The service splits hot client prefixes (`balance.hot_prefix_share`): a prefix's pin flagged
/// [`PIN_F_SPLIT`] (or, without a pin, a prefix in `HOT_PREFIXES`) sends its clients to pins of
/// their own address, and new connections are counted per prefix (`PREFIX_NEW`).
pub const SERVICE_F_SPLIT_HOT: u32 = 2;

/// `AffinityValue::flags`: this prefix is split; its clients use pins of their own address.
pub const PIN_F_SPLIT: u32 = 1;
/// Capacity of `HOT_PREFIXES` and `PREFIX_NEW`.
pub const HOT_PREFIX_ENTRIES: u32 = 4096;

/// Backend state flags (`Backend::flags`).
/// Healthy (or not health-checked) and not force-drained: its pins are valid.
pub const BACKEND_F_UP: u16 = 1;
/// Draining: takes no new clients (it is left out of the Maglev table); its pins stay valid while
/// it is up.
pub const BACKEND_F_DRAINING: u16 = 2;
/// Force-drained: its pins are re-selected at the client's next packet (BACKEND_F_UP is clear).
pub const BACKEND_F_FORCED: u16 = 4;
/// Health checks say down (BACKEND_F_UP is clear); kept so a restarted daemon knows why.
pub const BACKEND_F_HEALTH_DOWN: u16 = 8;
/// The slot is in use (an all-zero slot is free).
pub const BACKEND_F_IN_USE: u16 = 0x8000;

/// A backend, `BACKENDS[id]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Address, network order words; IPv4 uses `addr[0]`.
    pub addr: [u32; 4],
    /// Port, network order.
    pub port: u16,
    pub flags: u16,
    /// The service this backend belongs to.
    pub service_id: u32,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 24);

/// Affinity table key: a service and a client prefix (address masked to the service's prefix).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    pub service_id: u32,
    /// Masked client address, network order words; IPv4 uses `addr[0]`, the rest stay 0.
    pub addr: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 20);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    /// `PIN_F_*`: set by the daemon on a prefix's pin.
    pub flags: u32,
    /// CLOCK_MONOTONIC ns of the last packet (refreshed at most every `LAST_SEEN_REFRESH_NS`).
    pub last_seen_ns: u64,
    /// CLOCK_MONOTONIC ns when the pin was made.
    pub created_ns: u64,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 24);

/// Connection table key: one TCP connection of a client to a service (the service stands for
/// the VIP, port and protocol; the client's full address and port for the rest).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub service_id: u32,
    /// Client address, unmasked, network order words; IPv4 uses `addr[0]`, the rest stay 0.
    pub addr: [u32; 4],
    /// Client port, network order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 24);

/// Where a connection was placed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub backend_id: u32,
    /// `flow_ticks(now)` when the connection last refreshed its client's pin (at most every
    /// `LAST_SEEN_REFRESH_NS`, or half the service's timeout): a live connection keeps its
    /// client's pin alive.
    pub stamp: u32,
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 8);

/// Ticks of `FlowValue::stamp`: CLOCK_MONOTONIC ns / 2^20 (about a millisecond), wrapping
/// (compare with `wrapping_sub`).
#[inline(always)]
pub const fn flow_ticks(ns: u64) -> u32 {
    (ns >> 20) as u32
}

/// What a reply from a backend is translated back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reverse {
    /// VIP, network order.
    pub vip: u32,
    /// Service port, network order.
    pub port: u16,
    pub _pad: u16,
    pub service_id: u32,
    pub backend_id: u32,
    /// The interface the balancer's route to the backend leaves by: the backend side. Only
    /// packets arriving there are replies; a backend's source address arriving anywhere else is
    /// spoofed and dropped (`stat::DROP_REPLY_SIDE`). 0: no route to the backend is known, so
    /// nothing from it is translated.
    pub ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<Reverse>() == 20);

/// Per service and per backend counters (per CPU in the maps; userspace sums them and reports
/// them as they are, so the field names are also the status/JSON names).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct Counters {
    /// Packets forwarded toward this service/backend (client to backend direction).
    pub packets: u64,
    pub bytes: u64,
    /// Affinity entries created (a client got a backend from the Maglev table).
    pub new_pins: u64,
    /// Packets whose client had a live affinity entry.
    pub hits: u64,
    /// Affinity entries found past the idle timeout (or max age) and re-selected.
    pub expired: u64,
    /// Affinity entries pointing at a backend that can no longer take traffic, re-selected.
    pub failovers: u64,
    /// Reply packets translated back to the VIP.
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// TCP connections given a connection entry (their handshake completed, or their entry was
    /// lost and is written again).
    pub conns: u64,
    /// Established connections moved away because their backend went down, was removed or was
    /// force-drained (counted on the backend they left).
    pub moved: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 80);

impl Counters {
    /// Adds another CPU's counters into this one.
    pub fn add(&mut self, o: &Counters) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.new_pins += o.new_pins;
        self.hits += o.hits;
        self.expired += o.expired;
        self.failovers += o.failovers;
        self.reply_packets += o.reply_packets;
        self.reply_bytes += o.reply_bytes;
        self.conns += o.conns;
        self.moved += o.moved;
    }
}

/// Verdict and reason counters: indices into `STATS`.
pub mod stat {
    /// Not ours (not IPv4, not to a VIP, not a reply from a backend): passed untouched.
    pub const PASS_NOT_OURS: u32 = 0;
    /// Too short or malformed to tell whether it is ours: passed untouched (the kernel drops it).
    pub const PASS_MALFORMED: u32 = 1;
    /// To a VIP or from a backend, but malformed (bad IHL, truncated L4 header): dropped.
    pub const DROP_MALFORMED: u32 = 2;
    /// To a VIP whose service has no backend that can take a new client: dropped.
    pub const DROP_NO_BACKEND: u32 = 3;
    /// Rewritten and sent back out of the interface it came in on.
    pub const TX: u32 = 4;
    /// Rewritten and redirected to another interface.
    pub const REDIRECT: u32 = 5;
    /// Rewritten and passed to the kernel, which forwards it (next hop not resolved yet).
    pub const PASS_FIB: u32 = 6;
    /// Rewritten, but the FIB says the destination is unreachable/blackholed: dropped.
    pub const DROP_FIB: u32 = 7;
    /// A fragment of ours that cannot be forwarded (no L4 header in a first fragment).
    pub const DROP_FRAGMENT: u32 = 8;
    /// An internal inconsistency (a map entry missing that the daemon should have written).
    pub const ABORTED: u32 = 9;
    /// Reply from a backend translated back to the VIP (counted besides its forwarding verdict).
    pub const REPLY: u32 = 10;
    /// Packets to a VIP (counted besides their forwarding verdict).
    pub const TO_VIP: u32 = 11;
    /// A VLAN-tagged frame, rewritten and passed to the kernel because it must leave through
    /// another interface (the kernel's VLAN devices re-tag it).
    pub const PASS_VLAN: u32 = 12;
    /// A non-first fragment translated like its first fragment (counted besides the verdict).
    pub const FRAGMENT: u32 = 13;
    /// A non-first fragment of ours whose first fragment was not seen: dropped.
    pub const DROP_FRAG_UNPLACED: u32 = 14;
    /// An echo request to a VIP, answered by the balancer (XDP_TX).
    pub const ICMP_ECHO: u32 = 15;
    /// An ICMP error about a VIP flow, sent on to the flow's backend (counted besides the verdict).
    pub const ICMP_ERROR: u32 = 16;
    /// A frame for another MAC address than the ingress interface's (flooded by a switch, or
    /// seen in promiscuous mode): passed untouched, the kernel drops it.
    pub const PASS_OTHER_MAC: u32 = 17;
    /// A TCP SYN to a VIP: placed (its client's pin, else Maglev) without writing any state, so a
    /// spoofed-source SYN flood creates and evicts nothing (counted besides the verdict).
    pub const SYN: u32 = 18;
    /// A TCP connection entry written: the client's first packet after its SYN (counted besides
    /// the verdict).
    pub const CONN_NEW: u32 = 19;
    /// An established connection moved off a backend that is down, removed or force-drained
    /// (counted besides the verdict).
    pub const CONN_MOVED: u32 = 20;
    /// A new pin or connection entry not written: this CPU already wrote
    /// `GlobalConfig::new_pins_per_cpu` in this second (counted besides the verdict).
    pub const GUARDED: u32 = 21;
    /// A packet with a backend's source address that arrived on an interface the backend is not
    /// reached by (spoofed, or a routing loop): not translated, dropped.
    pub const DROP_REPLY_SIDE: u32 = 22;
    /// Number of codes.
    pub const COUNT: u32 = 23;

    /// The codes counted beside a packet's verdict (events), not as its verdict: every packet
    /// counts exactly one code outside this list.
    pub const EVENT_NAMES: [&str; 8] = ["to_vip", "reply", "fragment", "icmp_error", "syn", "conn_new", "conn_moved", "guarded"];

    /// Names of the codes, by index, for status output and metrics.
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_ours",
        "pass_malformed",
        "drop_malformed",
        "drop_no_backend",
        "tx",
        "redirect",
        "pass_fib",
        "drop_fib",
        "drop_fragment",
        "aborted",
        "reply",
        "to_vip",
        "pass_vlan",
        "fragment",
        "drop_frag_unplaced",
        "icmp_echo",
        "icmp_error",
        "pass_other_mac",
        "syn",
        "conn_new",
        "conn_moved",
        "guarded",
        "drop_reply_side",
    ];
}

/// Backend ids in a Maglev table are 16 bits wide, four to a 64-bit array element: array map
/// elements are 8-byte aligned anyway, and this keeps a 65537-slot table at 128 KiB.
pub const MAGLEV_IDS_PER_WORD: u32 = 4;
/// The largest backend id a Maglev table can hold.
pub const MAX_BACKEND_ID: u32 = u16::MAX as u32;

/// Number of 64-bit words of one Maglev table of `m` slots.
#[inline(always)]
pub const fn maglev_words(m: u32) -> u32 {
    m.div_ceil(MAGLEV_IDS_PER_WORD)
}

/// Index in the `MAGLEV` array of the word holding `slot` of `service_id`'s table `table`.
#[inline(always)]
pub const fn maglev_index(service_id: u32, table: u32, m: u32, slot: u32) -> u32 {
    (service_id * 2 + (table & 1)) * maglev_words(m) + slot / MAGLEV_IDS_PER_WORD
}

/// The backend id of `slot` inside its word.
#[inline(always)]
pub const fn maglev_slot_id(word: u64, slot: u32) -> u32 {
    ((word >> ((slot % MAGLEV_IDS_PER_WORD) * 16)) & 0xffff) as u32
}

/// IPv4 mask for a prefix length, network order (`prefix` is clamped to 32).
#[inline(always)]
pub const fn v4_mask(prefix: u32) -> u32 {
    let p = if prefix > 32 { 32 } else { prefix };
    let host = if p == 0 { 0 } else { u32::MAX << (32 - p) };
    host.to_be()
}

/// IPv6 mask for a prefix length, as network order words (`prefix` is clamped to 128).
pub const fn v6_mask(prefix: u32) -> [u32; 4] {
    let p = if prefix > 128 { 128 } else { prefix };
    let mut out = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        let bits = p as i64 - (i as i64) * 32;
        out[i] = if bits >= 32 {
            u32::MAX.to_be()
        } else if bits <= 0 {
            0
        } else {
            (u32::MAX << (32 - bits as u32)).to_be()
        };
        i += 1;
    }
    out
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], Copy, made only of integers, with explicit padding.
    unsafe impl aya::Pod for GlobalConfig {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AgentKey {}
    unsafe impl aya::Pod for MoveEvent {}
    unsafe impl aya::Pod for AgentPin {}
    unsafe impl aya::Pod for AgentConfig {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for Reverse {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for ServiceKey6 {}
    unsafe impl aya::Pod for Reverse6 {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for FibCacheEntry {}
    unsafe impl aya::Pod for SvcCacheEntry {}
    unsafe impl aya::Pod for TxPort {}
    unsafe impl aya::Pod for IfaceCacheEntry {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(v4_mask(32), u32::MAX);
        assert_eq!(v4_mask(0), 0);
        assert_eq!(v4_mask(24).to_ne_bytes(), [255, 255, 255, 0]);
        assert_eq!(v4_mask(33), u32::MAX);
        let m = v6_mask(64);
        assert_eq!(m, [u32::MAX, u32::MAX, 0, 0]);
        let m = v6_mask(56);
        assert_eq!(m[1].to_ne_bytes(), [255, 255, 255, 0]);
        assert_eq!(v6_mask(0), [0; 4]);
        assert_eq!(v6_mask(128), [u32::MAX; 4]);
    }

    #[test]
    fn maglev_regions_do_not_overlap() {
        let m = 7; // two words per table
        assert_eq!(maglev_words(m), 2);
        assert_eq!(maglev_index(0, 0, m, 3), 0);
        assert_eq!(maglev_index(0, 0, m, 6), 1);
        assert_eq!(maglev_index(0, 1, m, 0), 2);
        assert_eq!(maglev_index(1, 0, m, 0), 4);
        assert_eq!(maglev_index(1, 1, m, 5), 7);
    }

    #[test]
    fn maglev_ids_unpack() {
        let word: u64 = 0x0004_0003_0002_0001;
        assert_eq!([0, 1, 2, 3, 4, 5].map(|s| maglev_slot_id(word, s)), [1, 2, 3, 4, 1, 2]);
    }
}
