//! VIP announcement for routers (`[announce]`): one blackhole route per announced VIP in a
//! kernel routing table of lb's own, marked with protocol [`ROUTE_PROTOCOL`]. lb writes no
//! routing protocol itself: a routing daemon on the node (BIRD 2: `packaging/bird/node.conf`)
//! learns that table and announces its routes over BGP; routers spread the VIPs' traffic over
//! every node that announces them (ECMP).
//!
//! The routes sit in a table nothing routes by, so they change nothing on the node itself.
//! They stay when the daemon stops (a restart does not withdraw: the datapath keeps running on
//! its pins); `lb down` removes them before it detaches the datapath.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
    sys::AsyncSocket as _,
};
use tokio::sync::watch;

/// Protocol number of lb's routes (`ip route show table N proto 242`).
pub const ROUTE_PROTOCOL: u8 = 242;

/// How often the routes are checked against what they should be, besides every change.
const RESYNC: Duration = Duration::from_secs(5);

/// A netlink connection for [`Announcer::start`] (opened before anything is attached, so that
/// a failure stops the start cleanly).
pub fn connect() -> Result<Handle> {
    let (mut conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
    // Dumps filtered by the kernel (4.20+): only lb's table comes back, not a router's whole
    // routing table every few seconds. Older kernels ignore it and the filter below does it.
    let _ = conn.socket_mut().socket_mut().set_netlink_get_strict_chk(true);
    tokio::spawn(conn);
    Ok(handle)
}

fn message(vip: IpAddr, table: u32) -> RouteMessage {
    let proto = RouteProtocol::Other(ROUTE_PROTOCOL);
    match vip {
        IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(a, 32)
            .table_id(table)
            .protocol(proto)
            .kind(RouteType::BlackHole)
            .build(),
        IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(a, 128)
            .table_id(table)
            .protocol(proto)
            .kind(RouteType::BlackHole)
            .build(),
    }
}

fn table_of(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None })
        .unwrap_or(m.header.table as u32)
}

fn destination(m: &RouteMessage) -> Option<IpAddr> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(rtnetlink::packet_route::route::RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(rtnetlink::packet_route::route::RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })
}

/// The VIPs lb announces in `table` now (its routes there, both families).
async fn current(handle: &Handle, table: u32) -> Result<BTreeSet<IpAddr>> {
    let mut out = BTreeSet::new();
    // Unspecified protocol, scope and type: the kernel filters by table only.
    for dump in [
        RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(table)
            .protocol(RouteProtocol::Unspec)
            .scope(RouteScope::Universe)
            .kind(RouteType::Unspec)
            .build(),
        RouteMessageBuilder::<Ipv6Addr>::new()
            .table_id(table)
            .protocol(RouteProtocol::Unspec)
            .scope(RouteScope::Universe)
            .kind(RouteType::Unspec)
            .build(),
    ] {
        let mut routes = handle.route().get(dump).execute();
        while let Some(r) = routes.try_next().await.context("listing routes")? {
            if table_of(&r) == table && r.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL) {
                out.extend(destination(&r));
            }
        }
    }
    Ok(out)
}

/// Brings the routes of `table` to `want`; returns what is announced afterwards.
async fn sync(handle: &Handle, table: u32, want: &BTreeSet<IpAddr>) -> Result<BTreeSet<IpAddr>> {
    let have = current(handle, table).await?;
    for vip in want.difference(&have) {
        handle
            .route()
            .add(message(*vip, table))
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding the route of VIP {vip} to table {table}"))?;
        tracing::info!(%vip, table, "announcing VIP (route added)");
    }
    for vip in have.difference(want) {
        handle
            .route()
            .del(message(*vip, table))
            .execute()
            .await
            .with_context(|| format!("removing the route of VIP {vip} from table {table}"))?;
        tracing::info!(%vip, table, "withdrawing VIP (route removed)");
    }
    Ok(want.clone())
}

/// Removes every route lb has in `table` (`lb down`, with or without a running daemon).
pub async fn withdraw_all(table: u32) -> Result<usize> {
    let handle = connect()?;
    let have = current(&handle, table).await?;
    sync(&handle, table, &BTreeSet::new()).await?;
    Ok(have.len())
}

/// The announcer task's handle: the daemon sets what should be announced; the task keeps the
/// routes so (retrying on errors, and every few seconds in case someone removed one).
pub struct Announcer {
    pub table: u32,
    pub grace: Duration,
    want: watch::Sender<BTreeSet<IpAddr>>,
    announced: Arc<Mutex<BTreeSet<IpAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Announcer {
    /// Starts the task; it adopts the routes a previous daemon left and first syncs to `want`.
    pub fn start(handle: Handle, table: u32, grace: Duration, want: BTreeSet<IpAddr>) -> Self {
        let (tx, mut rx) = watch::channel(want);
        let announced = Arc::new(Mutex::new(BTreeSet::new()));
        let shown = announced.clone();
        let task = tokio::spawn(async move {
            loop {
                let want = rx.borrow_and_update().clone();
                match sync(&handle, table, &want).await {
                    Ok(now) => *shown.lock().unwrap_or_else(|p| p.into_inner()) = now,
                    Err(e) => tracing::error!(error = %format!("{e:#}"), table, "announcing VIPs"),
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() { break },
                    _ = tokio::time::sleep(RESYNC) => {}
                }
            }
        });
        Self { table, grace, want: tx, announced, task }
    }

    /// Sets the VIPs to announce.
    pub fn set(&self, want: BTreeSet<IpAddr>) {
        self.want.send_if_modified(|cur| {
            if *cur == want {
                false
            } else {
                *cur = want;
                true
            }
        });
    }

    /// What is announced now (as last synced).
    pub fn announced(&self) -> Vec<IpAddr> {
        self.announced.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect()
    }

    /// Stops the task, leaving the routes as they are (restart: the datapath keeps serving).
    pub fn leave(self) {
        self.task.abort();
    }

    /// Stops the task and withdraws every VIP (`lb down`).
    pub async fn withdraw(self) -> Result<usize> {
        self.task.abort();
        withdraw_all(self.table).await
    }
}
