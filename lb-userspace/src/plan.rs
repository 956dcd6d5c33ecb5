//! Turns a validated [`Config`] into the exact contents of the datapath maps, and writes them.

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use lb_common::{
    BACKEND_F_UP, Backend, GlobalConfig, LAYOUT_VERSION, Reverse, Service, ServiceKey, v4_mask,
    v6_mask,
};

use crate::{
    config::{BackendConfig, Config, ServiceConfig},
    datapath::Datapath,
    maglev::{self, MaglevBackend},
};

/// A backend with the datapath id it was given.
#[derive(Clone, Debug)]
pub struct PlannedBackend {
    pub id: u32,
    pub config: BackendConfig,
    pub entry: Backend,
}

#[derive(Clone, Debug)]
pub struct PlannedService {
    pub config: ServiceConfig,
    pub key: ServiceKey,
    pub entry: Service,
    pub backends: Vec<PlannedBackend>,
    /// The Maglev table (backend ids), `maglev_table_size` long.
    pub table: Vec<u32>,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub global: GlobalConfig,
    pub services: Vec<PlannedService>,
}

impl Plan {
    /// Service ids follow config order; backend ids are handed out in order across services.
    pub fn new(cfg: &Config) -> Self {
        let m = cfg.datapath.maglev_table_size;
        let mut next_backend = 0u32;
        let services = cfg
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let id = i as u32;
                let backends: Vec<PlannedBackend> = s
                    .backends
                    .iter()
                    .map(|b| {
                        let bid = next_backend;
                        next_backend += 1;
                        PlannedBackend {
                            id: bid,
                            config: b.clone(),
                            entry: Backend {
                                addr: [u32::from_ne_bytes(b.address.octets()), 0, 0, 0],
                                port: b.port.to_be(),
                                flags: BACKEND_F_UP,
                                service_id: id,
                            },
                        }
                    })
                    .collect();
                let inputs: Vec<MaglevBackend> = backends
                    .iter()
                    .map(|b| MaglevBackend {
                        addr: IpAddr::V4(b.config.address),
                        port: b.config.port,
                        weight: b.config.weight,
                        id: b.id,
                    })
                    .collect();
                let table = maglev::build(&inputs, m);
                PlannedService {
                    key: ServiceKey::new(u32::from(s.vip), s.port, s.protocol.number()),
                    entry: Service {
                        id,
                        flags: 0,
                        timeout_ns: s.affinity.timeout.as_nanos().min(u64::MAX as u128) as u64,
                        max_age_ns: 0,
                        v4_mask: v4_mask(s.affinity.ipv4_prefix as u32),
                        table: 0,
                        v6_mask: v6_mask(s.affinity.ipv6_prefix as u32),
                        backend_count: backends.len() as u32,
                        _pad: 0,
                    },
                    config: s.clone(),
                    backends,
                    table,
                }
            })
            .collect();
        Self {
            global: GlobalConfig {
                layout_version: LAYOUT_VERSION,
                hash_seed: cfg.datapath.hash_seed,
                maglev_m: m,
                flags: 0,
            },
            services,
        }
    }

    /// Writes the whole plan. Order matters for packets arriving meanwhile: global settings,
    /// backends, reverse entries and Maglev tables first, the service entry (which makes the VIP
    /// live and names its table) last.
    pub fn apply(&self, dp: &mut Datapath) -> Result<()> {
        dp.write_global(self.global)?;
        for s in &self.services {
            for b in &s.backends {
                dp.write_backend(b.id, b.entry)?;
                dp.write_reverse(
                    ServiceKey { addr: b.entry.addr[0], port: b.entry.port, proto: s.key.proto, _pad: 0 },
                    Reverse { vip: s.key.addr, port: s.key.port, _pad: 0, service_id: s.entry.id, backend_id: b.id },
                )?;
            }
            dp.write_maglev(s.entry.id, s.entry.table, &s.table)
                .with_context(|| format!("writing the Maglev table of service {}", s.config.name))?;
            dp.write_service(s.key, s.entry)?;
        }
        Ok(())
    }
}
