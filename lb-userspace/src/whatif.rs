//! What-if: what a reload, a drain or a backend's death would do, computed from the model
//! without touching the datapath. Tables are built as the change would build them
//! (`ServiceRt::desired_table`) and compared slot by slot by backend identity (address and
//! port), never by datapath id; the pins that would move are counted afterwards, outside the
//! daemon lock ([`crate::affinity::count_doomed`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::SystemTime,
};

use crate::{
    api::{Admin, ServiceWhatIf, WhatIf},
    config::Config,
    state::{BackendBalance, BackendRt, Runtime, ServiceRt, admin_from_config},
};

/// Which live pins would move: per service id, all of them (None) or those to these backends.
pub type Doomed = BTreeMap<u32, Option<BTreeSet<u32>>>;

/// The share of slots of `new` whose backend differs from `old`'s, by identity.
fn moved_share(old_svc: &ServiceRt, old: &[u32], new_svc: &ServiceRt, new: &[u32]) -> f64 {
    let who = |s: &ServiceRt, id: u32| s.backends.iter().find(|b| b.id == id).map(|b| (b.config.address, b.config.port));
    let ids = |s: &ServiceRt| -> BTreeMap<u32, Option<(IpAddr, u16)>> { s.backends.iter().map(|b| (b.id, who(s, b.id))).collect() };
    let (a, b) = (ids(old_svc), ids(new_svc));
    let m = old.len().max(new.len());
    if m == 0 {
        return 0.0;
    }
    let differ = (0..m)
        .filter(|&i| {
            let x = old.get(i).and_then(|id| a.get(id).copied().flatten());
            let y = new.get(i).and_then(|id| b.get(id).copied().flatten());
            x != y
        })
        .count();
    differ as f64 / m as f64
}

fn label(b: &BackendRt) -> String {
    SocketAddr::new(b.config.address, b.config.port).to_string()
}

/// What applying `cfg` (already checked as a reload checks it) would do to `rt`.
pub fn reload(rt: &Runtime, cfg: &Config) -> (WhatIf, Doomed) {
    let m = rt.global.maglev_m;
    let mut w = WhatIf { action: "reload".into(), ..Default::default() };
    let mut doomed = Doomed::new();
    for s in &rt.services {
        if !cfg.services.iter().any(|c| c.name == s.config.name) {
            w.services_removed.push(s.config.name.clone());
            doomed.insert(s.entry.id, None);
        }
    }
    for sc in &cfg.services {
        let Some(s) = rt.services.iter().find(|s| s.config.name == sc.name) else {
            w.services_added.push(sc.name.clone());
            continue;
        };
        let mut next = s.without_table();
        next.config = sc.clone();
        let mut report = ServiceWhatIf { service: sc.name.clone(), ..Default::default() };
        let mut gone = BTreeSet::new();
        for b in &s.backends {
            if !sc.backends.iter().any(|c| (c.address, c.port) == (b.config.address, b.config.port)) {
                report.backends_removed.push(label(b));
                gone.insert(b.id);
            }
        }
        next.backends = sc
            .backends
            .iter()
            .enumerate()
            .map(|(j, bc)| match s.backends.iter().find(|b| (b.config.address, b.config.port) == (bc.address, bc.port)) {
                Some(b) => {
                    let mut b = b.clone();
                    if b.config.weight != bc.weight || b.config.state != bc.state {
                        report.backends_reweighted.push(label(&b));
                    }
                    if b.config.state != bc.state {
                        b.admin = admin_from_config(bc.state);
                    }
                    b.config = bc.clone();
                    b
                }
                None => {
                    let b = BackendRt {
                        // Not a datapath id: only told apart from the others for the comparison.
                        id: u32::MAX - j as u32,
                        config: bc.clone(),
                        healthy: true,
                        admin: admin_from_config(bc.state),
                        changed_at: SystemTime::now(),
                        reason: String::new(),
                        balance: BackendBalance::full(),
                    };
                    report.backends_added.push(label(&b));
                    b
                }
            })
            .collect();
        let new_table = next.desired_table(m).0;
        report.slot_share_moved = moved_share(s, &s.table, &next, &new_table);
        if !gone.is_empty() {
            doomed.insert(s.entry.id, Some(gone));
        }
        if report != (ServiceWhatIf { service: sc.name.clone(), ..Default::default() }) {
            w.services.push(report);
        }
    }
    (w, doomed)
}

/// What changing one backend of `s` with `f` would do (a drain, a death): its table as it would
/// be, and its pins that would move (`moves`: the backend's pins move).
pub fn one_backend(rt: &Runtime, s: &ServiceRt, id: u32, action: &str, moves: bool, f: impl FnOnce(&mut BackendRt)) -> (WhatIf, Doomed) {
    let m = rt.global.maglev_m;
    let mut next = s.without_table();
    if let Some(b) = next.backends.iter_mut().find(|b| b.id == id) {
        f(b);
    }
    let new_table = next.desired_table(m).0;
    let report = ServiceWhatIf {
        service: s.config.name.clone(),
        slot_share_moved: moved_share(s, &s.table, &next, &new_table),
        ..Default::default()
    };
    let mut doomed = Doomed::new();
    if moves {
        doomed.insert(s.entry.id, Some(BTreeSet::from([id])));
    }
    (WhatIf { action: action.into(), services: vec![report], ..Default::default() }, doomed)
}

/// A drain (`force`: pins move too) of backend `id` of `s`.
pub fn drain(rt: &Runtime, s: &ServiceRt, id: u32, force: bool) -> (WhatIf, Doomed) {
    let action = if force { "drain --force" } else { "drain" };
    one_backend(rt, s, id, action, force, |b| b.admin = if force { Admin::Forced } else { Admin::Draining })
}

/// Backend `id` of `s` going down (its clients fail over).
pub fn down(rt: &Runtime, s: &ServiceRt, id: u32) -> (WhatIf, Doomed) {
    let up = s.backends.iter().find(|b| b.id == id).is_some_and(|b| b.healthy && b.admin != Admin::Forced);
    one_backend(rt, s, id, "down", up, |b| b.healthy = false)
}

/// Fills in the pins counted by [`crate::affinity::count_doomed`].
pub fn with_pins(mut w: WhatIf, rt_names: &BTreeMap<u32, String>, counted: &BTreeMap<u32, u64>) -> WhatIf {
    for (id, n) in counted {
        let Some(name) = rt_names.get(id) else { continue };
        w.pins_moved += n;
        match w.services.iter_mut().find(|s| &s.service == name) {
            Some(s) => s.pins_moved += n,
            None => w.services.push(ServiceWhatIf { service: name.clone(), pins_moved: *n, slot_share_moved: 1.0, ..Default::default() }),
        }
    }
    w
}

/// A what-if as text.
pub fn render(w: &WhatIf) -> String {
    use std::fmt::Write as _;
    let mut o = format!("dry run of {}: nothing was changed\n", w.action);
    if !w.services_added.is_empty() {
        let _ = writeln!(o, "  services added: {}", w.services_added.join(", "));
    }
    if !w.services_removed.is_empty() {
        let _ = writeln!(o, "  services removed (every pin moves): {}", w.services_removed.join(", "));
    }
    for s in &w.services {
        let _ = write!(o, "  service {}:", s.service);
        for (what, list) in [("added", &s.backends_added), ("removed", &s.backends_removed), ("re-weighted", &s.backends_reweighted)] {
            if !list.is_empty() {
                let _ = write!(o, " backends {what} {};", list.join(", "));
            }
        }
        let _ = writeln!(
            o,
            " {} live pin(s) would move; {:.1} % of the Maglev slots change backend (the share of new clients placed differently)",
            s.pins_moved,
            s.slot_share_moved * 100.0
        );
    }
    let _ = writeln!(o, "in all {} live pin(s) would move", w.pins_moved);
    o
}
