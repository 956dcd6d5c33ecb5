//! Keeps the next hop of every backend resolved, so that `bpf_fib_lookup` finds its MAC address
//! from the first packet: in DSR mode a missing neighbour entry means a drop (`drop_fib`: the
//! packet cannot go to the kernel), in NAT mode a detour through the kernel (`pass_fib`).
//!
//! For each backend the keeper asks the route (`ip route get`) for the egress interface and the
//! next hop (the gateway, or the backend on a connected network) and makes the kernel hold a
//! *managed* neighbour entry for it (`NTF_EXT_MANAGED`, Linux 5.16+): the kernel resolves such an
//! entry at once and keeps re-probing it by itself, without traffic and without health checks
//! (`ip neigh add ADDR dev DEV managed`).
//!
//! Ownership is written into the kernel: lb's entries carry the neighbour protocol
//! [`PROTOCOL`] (`ip neigh show` prints `proto 242`), so a restarted daemon adopts what the
//! previous one made, and removes the entries no backend needs any more. An operator's entries
//! are never changed: a PERMANENT (or NOARP) entry stays as it is, and so does a managed entry
//! without lb's protocol. A dynamic entry the kernel learnt is turned into a managed one of lb's
//! (the kernel keeps its MAC address meanwhile).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use anyhow::{Context as _, Result};
use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle,
    packet_route::{
        AddressFamily,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage, NeighbourState},
        route::RouteProtocol,
    },
};
use tokio::sync::watch;

/// The neighbour protocol that marks lb's entries (the number lb's VIP routes carry too).
pub const PROTOCOL: u8 = crate::announce::ROUTE_PROTOCOL;

/// How often routes and entries are checked again besides every change of the backend set:
/// a route change moves a backend to another next hop.
const RESYNC: Duration = Duration::from_secs(5);

/// `lo` has this ifindex in every network namespace (LOOPBACK_IFINDEX); a backend on the
/// balancer itself needs no neighbour.
const LOOPBACK_IFINDEX: u32 = 1;

/// A next hop: the address to resolve on one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hop {
    pub ifindex: u32,
    pub addr: IpAddr,
}

impl std::fmt::Display for Hop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} on ifindex {}", self.addr, self.ifindex)
    }
}

/// A neighbour entry as the kernel has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub hop: Hop,
    pub state: NeighbourState,
    pub managed: bool,
    /// Marked with [`PROTOCOL`].
    pub ours: bool,
}

impl Entry {
    /// Set by hand (or by another daemon) to a fixed answer: never lb's to change or remove.
    fn fixed(&self) -> bool {
        matches!(self.state, NeighbourState::Permanent | NeighbourState::Noarp)
    }
}

/// What one pass does to the kernel's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// No entry yet: create a managed one.
    Add(Hop),
    /// A dynamic entry: make it managed (and lb's), keeping its MAC address.
    Convert(Hop),
    /// lb's entry that no backend needs any more.
    Remove(Hop),
}

/// The operations that bring `table` to managed entries for `want`. Removals only when
/// `may_remove` (a pass whose route lookups all answered: a failed lookup is not a gone backend).
pub fn plan(want: &BTreeSet<Hop>, table: &[Entry], may_remove: bool) -> Vec<Op> {
    let by_hop: BTreeMap<Hop, &Entry> = table.iter().map(|e| (e.hop, e)).collect();
    let mut ops = Vec::new();
    for h in want {
        match by_hop.get(h) {
            None => ops.push(Op::Add(*h)),
            Some(e) if e.fixed() || e.managed => {}
            Some(_) => ops.push(Op::Convert(*h)),
        }
    }
    if may_remove {
        ops.extend(
            table
                .iter()
                .filter(|e| e.ours && e.managed && !e.fixed() && !want.contains(&e.hop))
                .map(|e| Op::Remove(e.hop)),
        );
    }
    ops
}

/// A netlink connection for the keeper.
pub fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Every IPv4 and IPv6 neighbour entry of this network namespace.
pub async fn entries(handle: &Handle) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut dump = handle.neighbours().get().execute();
    while let Some(m) = dump.try_next().await.context("dumping the neighbour table")? {
        if let Some(e) = entry(&m) {
            out.push(e);
        }
    }
    Ok(out)
}

fn entry(m: &NeighbourMessage) -> Option<Entry> {
    if !matches!(m.header.family, AddressFamily::Inet | AddressFamily::Inet6) {
        return None;
    }
    let mut addr = None;
    let (mut managed, mut ours) = (false, false);
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => addr = Some(IpAddr::V4(*a)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => addr = Some(IpAddr::V6(*a)),
            NeighbourAttribute::ExtFlags(f) => managed = f.contains(NeighbourExtFlags::Managed),
            NeighbourAttribute::Protocol(p) => ours = u8::from(*p) == PROTOCOL,
            _ => {}
        }
    }
    Some(Entry { hop: Hop { ifindex: m.header.ifindex, addr: addr? }, state: m.header.state, managed, ours })
}

/// Creates (or, `replace`, converts) lb's managed entry for `hop`: state NUD_NONE, as
/// `ip neigh replace ADDR dev DEV managed` sends; the kernel starts resolving it at once.
async fn add(handle: &Handle, hop: Hop, replace: bool) -> Result<()> {
    let mut req = handle.neighbours().add(hop.ifindex, hop.addr).state(NeighbourState::None);
    let attrs = &mut req.message_mut().attributes;
    attrs.push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
    attrs.push(NeighbourAttribute::Protocol(RouteProtocol::from(PROTOCOL)));
    let req = if replace { req.replace() } else { req };
    req.execute().await.with_context(|| format!("adding a managed neighbour entry for {hop}"))
}

async fn remove(handle: &Handle, hop: Hop) -> Result<()> {
    let mut m = NeighbourMessage::default();
    m.header.family = if hop.addr.is_ipv6() { AddressFamily::Inet6 } else { AddressFamily::Inet };
    m.header.ifindex = hop.ifindex;
    m.attributes.push(NeighbourAttribute::Destination(match hop.addr {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }));
    handle.neighbours().del(m).execute().await.with_context(|| format!("removing the neighbour entry for {hop}"))
}

/// Removes every managed entry lb made in this network namespace (`lb down`). Returns how many.
pub async fn remove_all(handle: &Handle) -> Result<usize> {
    let table = entries(handle).await?;
    let mut n = 0;
    for op in plan(&BTreeSet::new(), &table, true) {
        if let Op::Remove(hop) = op {
            remove(handle, hop).await?;
            n += 1;
        }
    }
    Ok(n)
}

/// The routes to `addrs`, looked up on a blocking thread (routes.rs asks synchronously).
async fn routes(addrs: Vec<IpAddr>) -> Result<Vec<(IpAddr, Result<Option<crate::routes::Egress>>)>> {
    tokio::task::spawn_blocking(move || addrs.into_iter().map(|a| (a, crate::routes::egress(a))).collect())
        .await
        .context("looking up the backends' routes")
}

/// The backends' sides as the routes say now: the egress ifindex, 0 without a route. A backend
/// whose lookup failed is left out (its side is not known, not changed).
pub type Sides = BTreeMap<IpAddr, u32>;

/// One keeper's memory between passes: what it has logged, so that a lasting problem is said
/// once, not every 5 s.
#[derive(Default)]
struct Pass {
    kept: BTreeSet<Hop>,
    failing: BTreeSet<Hop>,
    no_route: BTreeSet<IpAddr>,
}

impl Pass {
    /// Resolves the routes of `want`, brings the neighbour table to them, returns the sides.
    async fn run(&mut self, handle: &Handle, want: &BTreeSet<IpAddr>) -> Result<Sides> {
        let mut sides = Sides::new();
        let mut hops = BTreeSet::new();
        let mut complete = true;
        for (addr, r) in routes(want.iter().copied().collect()).await? {
            match r {
                Ok(Some(e)) => {
                    self.no_route.remove(&addr);
                    sides.insert(addr, e.ifindex);
                    if e.ifindex != LOOPBACK_IFINDEX {
                        hops.insert(Hop { ifindex: e.ifindex, addr: e.via });
                    }
                }
                Ok(None) => {
                    if self.no_route.insert(addr) {
                        tracing::warn!(backend = %addr, "no route to the backend: no neighbour entry is kept for it");
                    }
                    sides.insert(addr, 0);
                }
                Err(e) => {
                    complete = false;
                    tracing::warn!(backend = %addr, error = %format!("{e:#}"), "looking up the route to a backend");
                }
            }
        }
        let table = entries(handle).await?;
        // The hops whose entry is lb's managed one after this pass (the others are an operator's).
        let mut ours: BTreeSet<Hop> = table.iter().filter(|e| e.ours && e.managed && !e.fixed()).map(|e| e.hop).collect();
        for op in plan(&hops, &table, complete) {
            let (hop, r) = match op {
                Op::Add(h) => (h, add(handle, h, false).await),
                Op::Convert(h) => (h, add(handle, h, true).await),
                Op::Remove(h) => (h, remove(handle, h).await),
            };
            match r {
                Ok(()) if matches!(op, Op::Remove(_)) => {
                    tracing::info!(next_hop = %hop.addr, ifindex = hop.ifindex, "neighbour entry no longer needed by a backend: removed");
                }
                Ok(()) => {
                    self.failing.remove(&hop);
                    ours.insert(hop);
                }
                Err(e) => {
                    if self.failing.insert(hop) {
                        tracing::warn!(next_hop = %hop.addr, ifindex = hop.ifindex, error = %format!("{e:#}"), "cannot keep a neighbour entry resolved");
                    }
                }
            }
        }
        for h in hops.iter().filter(|h| ours.contains(h)) {
            if self.kept.insert(*h) {
                tracing::info!(next_hop = %h.addr, ifindex = h.ifindex, "next hop of a backend kept resolved (managed neighbour entry)");
            }
        }
        self.kept.retain(|h| hops.contains(h) && ours.contains(h));
        Ok(sides)
    }
}

/// The running keeper: a task that passes over the backends after every change and every
/// [`RESYNC`].
pub struct Keeper {
    want: watch::Sender<BTreeSet<IpAddr>>,
    task: tokio::task::JoinHandle<()>,
    handle: Handle,
}

impl Keeper {
    /// Starts keeping the next hops of `want` (backend addresses); `on_sides` gets the sides
    /// every pass found.
    pub fn start(handle: Handle, want: BTreeSet<IpAddr>, on_sides: impl Fn(&Sides) + Send + 'static) -> Keeper {
        let (tx, mut rx) = watch::channel(want);
        let h = handle.clone();
        let task = tokio::spawn(async move {
            let mut pass = Pass::default();
            let mut tick = tokio::time::interval(RESYNC);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    r = rx.changed() => if r.is_err() { break },
                }
                let want = rx.borrow_and_update().clone();
                match pass.run(&h, &want).await {
                    Ok(sides) => on_sides(&sides),
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "keeping the backends' neighbour entries"),
                }
            }
        });
        Keeper { want: tx, task, handle }
    }

    /// The backend addresses now (a pass follows at once when they changed).
    pub fn set(&self, want: BTreeSet<IpAddr>) {
        self.want.send_if_modified(|w| {
            let changed = *w != want;
            *w = want;
            changed
        });
    }

    /// Stops keeping; the entries stay (a restarted daemon adopts them).
    pub fn leave(self) {
        self.task.abort();
    }

    /// Stops keeping and removes every entry lb made (`lb down`). Returns how many.
    pub async fn remove_all(self) -> Result<usize> {
        self.task.abort();
        let _ = self.task.await;
        remove_all(&self.handle).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(last: u8) -> Hop {
        Hop { ifindex: 2, addr: IpAddr::from([10, 0, 0, last]) }
    }

    fn e(last: u8, state: NeighbourState, managed: bool, ours: bool) -> Entry {
        Entry { hop: hop(last), state, managed, ours }
    }

    #[test]
    fn plan_adds_converts_and_leaves_the_operators_entries() {
        let want: BTreeSet<Hop> = [1, 2, 3, 4, 5, 6].map(hop).into();
        let table = [
            e(2, NeighbourState::Reachable, false, false),
            e(3, NeighbourState::Permanent, false, false),
            // An entry of lb's that an operator made permanent later.
            e(4, NeighbourState::Permanent, false, true),
            e(5, NeighbourState::Reachable, true, false),
            e(6, NeighbourState::Stale, true, true),
        ];
        assert_eq!(plan(&want, &table, true), [Op::Add(hop(1)), Op::Convert(hop(2))]);
    }

    #[test]
    fn plan_removes_only_lbs_managed_entries_no_longer_wanted() {
        let want: BTreeSet<Hop> = [hop(1)].into();
        let table = [
            e(1, NeighbourState::Reachable, true, true),
            e(2, NeighbourState::Reachable, true, true),
            e(3, NeighbourState::Failed, true, true),
            e(4, NeighbourState::Permanent, false, true),
            e(5, NeighbourState::Reachable, true, false),
            e(6, NeighbourState::Reachable, false, false),
            // Another interface: another hop.
            Entry { hop: Hop { ifindex: 3, addr: hop(1).addr }, state: NeighbourState::Reachable, managed: true, ours: true },
        ];
        let other_if = Hop { ifindex: 3, addr: hop(1).addr };
        assert_eq!(plan(&want, &table, true), [Op::Remove(hop(2)), Op::Remove(hop(3)), Op::Remove(other_if)]);
        assert_eq!(plan(&want, &table, false), [], "a pass with a failed route lookup removes nothing");
    }
}
