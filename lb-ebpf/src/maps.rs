//! Every map of the XDP program, one line each on what it holds. Names are `lb_common::maps`
//! constants; the daemon resizes them at load time and pins them itself (by name) under
//! `datapath.pin_path`.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    ADDR_FILTER_WORDS, AddrKey, AffinityKey, AffinityValue, Backend, Counters, DEFAULT_AFFINITY_ENTRIES,
    DEFAULT_FLOW_ENTRIES, FlowKey, FlowValue, HOT_PREFIX_ENTRIES,
    DEFAULT_MAGLEV_M, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES, FIB_CACHE_ENTRIES, FRAG_ENTRIES,
    FibCacheEntry, FragKey, IFACE_CACHE_ENTRIES, IfaceCacheEntry, SVC_CACHE_ENTRIES, SvcCacheEntry, TxPort, FragValue, GlobalConfig, Reverse, Reverse6, Service, ServiceKey, ServiceKey6, stat,
};

/// Global settings (layout version, Maglev M, client hash seed), one entry.
#[map(name = "CONFIG")]
pub static CONFIG: Array<GlobalConfig> = Array::with_max_entries(1, 0);

/// (VIP, port, protocol) -> service.
#[map(name = "SERVICES")]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// (IPv6 VIP, port, protocol) -> service.
#[map(name = "SERVICES6")]
pub static SERVICES6: HashMap<ServiceKey6, Service> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// (IPv6 backend address, port, protocol) -> (VIP, port): reply translation.
#[map(name = "REVERSE6")]
pub static REVERSE6: HashMap<ServiceKey6, Reverse6> = HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// The balancer's own IPv6 addresses.
#[map(name = "LOCAL_ADDRS6")]
pub static LOCAL_ADDRS6: HashMap<[u32; 4], u32> = HashMap::with_max_entries(256, 0);

/// Every VIP and backend address (`ADDR_F_*`): ours-or-not for packets without ports.
#[map(name = "ADDRS")]
pub static ADDRS: HashMap<AddrKey, u32> = HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Bloom filter (one hash) of every `ADDRS` address: a packet whose source and destination bits
/// are both clear is not ours, found without a hash-map lookup.
#[map(name = "ADDR_FILTER")]
pub static ADDR_FILTER: Array<u64> = Array::with_max_entries(ADDR_FILTER_WORDS, 0);

/// Recent FIB lookups by destination, per CPU (no write sharing, no torn reads).
#[map(name = "FIB_CACHE")]
pub static FIB_CACHE: PerCpuArray<FibCacheEntry> = PerCpuArray::with_max_entries(FIB_CACHE_ENTRIES, 0);

/// Recent service lookups by (VIP, port, protocol), per CPU; `CONFIG.svc_epoch` retires them.
#[map(name = "SVC_CACHE")]
pub static SVC_CACHE: PerCpuArray<SvcCacheEntry> = PerCpuArray::with_max_entries(SVC_CACHE_ENTRIES, 0);

/// First fragment's translation, for the later fragments of the same datagram.
#[map(name = "FRAGS")]
pub static FRAGS: LruHashMap<FragKey, FragValue> = LruHashMap::with_max_entries(FRAG_ENTRIES, 0);

/// Backend id -> backend (address, port, state).
#[map(name = "BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Two Maglev tables per service (double buffer), four 16-bit backend ids per word:
/// `maglev_index(service, table, m, slot)` -> word. Memory-mappable: the daemon writes a whole
/// table with one copy, not M syscalls.
#[map(name = "MAGLEV")]
pub static MAGLEV: Array<u64> = Array::with_max_entries(
    DEFAULT_MAX_SERVICES * 2 * lb_common::maglev_words(DEFAULT_MAGLEV_M),
    BPF_F_MMAPABLE,
);

/// (service, client prefix) -> (backend, last seen, created): the sticky-session table. LRU with
/// the common free list (fewer early evictions than per-CPU lists on small machines).
#[map(name = "AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(DEFAULT_AFFINITY_ENTRIES, 0);

/// (service, client address, client port) -> (backend, pin refresh stamp): every established TCP
/// connection, so that it stays on its backend while that backend lives, whatever happens to its
/// client's pin. Written at the client's first packet after its SYN, never by a SYN.
#[map(name = "FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);

/// Client prefixes the daemon split (their clients are pinned per address), for when the
/// prefix's own pin is gone. Read only when a service splits hot prefixes and has no pin.
#[map(name = "HOT_PREFIXES")]
pub static HOT_PREFIXES: HashMap<AffinityKey, u32> = HashMap::with_max_entries(HOT_PREFIX_ENTRIES, 0);

/// Moves of known clients (`lb_common::MoveEvent`), read by the daemon's journal. Written only
/// when a pin is re-placed onto another backend.
#[map(name = "MOVES")]
pub static MOVES: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// New TCP connections per client prefix (per CPU), for services that split hot prefixes.
#[map(name = "PREFIX_NEW")]
pub static PREFIX_NEW: LruPerCpuHashMap<AffinityKey, u64> = LruPerCpuHashMap::with_max_entries(HOT_PREFIX_ENTRIES, 0);

/// (backend address, port, protocol) -> (VIP, port, backend side): reply translation in NAT mode.
#[map(name = "REVERSE")]
pub static REVERSE: HashMap<ServiceKey, Reverse> = HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// The balancer's own IPv4 addresses: replies to them are its own traffic, never translated.
#[map(name = "LOCAL_ADDRS")]
pub static LOCAL_ADDRS: HashMap<u32, u32> = HashMap::with_max_entries(256, 0);

/// Per-service counters, by service id.
#[map(name = "SERVICE_STATS")]
pub static SERVICE_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Per-backend counters, by backend id.
#[map(name = "BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Interfaces the program is attached to (ifindex -> MAC): the only redirect targets, and the
/// MAC a frame arriving on one must be for.
#[map(name = "TX_PORTS")]
pub static TX_PORTS: HashMap<u32, TxPort> = HashMap::with_max_entries(64, 0);

/// This CPU's copies of ingress interfaces' `TX_PORTS` entries (`CONFIG.fib_epoch` retires them).
#[map(name = "IFACE_CACHE")]
pub static IFACE_CACHE: PerCpuArray<IfaceCacheEntry> = PerCpuArray::with_max_entries(IFACE_CACHE_ENTRIES, 0);

/// Interface name (NUL-padded) -> how the daemon attached there (`lb_common::ATTACH_*`). Read by
/// the daemon only: a restarted daemon learns the modes of the links it adopts.
#[map(name = "ATTACH_MODES")]
pub static ATTACH_MODES: HashMap<[u8; 16], u32> = HashMap::with_max_entries(64, 0);

/// Per-CPU scratch space holding the parsed packet (`parse::Meta`) while a packet is processed.
/// Keeping it in a map value rather than on the stack keeps the stack small, and because the
/// verifier does not track map contents, the out-of-line stages are verified once for every kind
/// of packet instead of once per combination of parsed values.
#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<crate::parse::Meta> = PerCpuArray::with_max_entries(1, 0);

/// Verdict and reason counters, by `lb_common::stat` code.
#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);
