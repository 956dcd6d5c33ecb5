//! The raw model: what the file says, before judging it. Loose on purpose (see the `config`
//! module docs) so that `validate`, not serde, reports what is wrong with a value.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) datapath: RawDatapath,
    #[serde(default)]
    pub(super) control: RawControl,
    #[serde(default)]
    pub(super) services: Vec<RawService>,
    pub(super) announce: Option<RawAnnounce>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnnounce {
    pub(super) table: Option<i64>,
    pub(super) grace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDatapath {
    pub(super) interfaces: Option<Vec<String>>,
    pub(super) mode: Option<String>,
    pub(super) xdp_mode: Option<String>,
    pub(super) affinity_entries: Option<i64>,
    pub(super) flow_entries: Option<i64>,
    pub(super) max_new_pins_per_cpu: Option<i64>,
    pub(super) pin_path: Option<String>,
    pub(super) max_services: Option<i64>,
    pub(super) max_backends: Option<i64>,
    pub(super) maglev_table_size: Option<i64>,
    pub(super) hash_seed: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawControl {
    pub(super) socket: Option<String>,
    pub(super) metrics: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub(super) name: Option<String>,
    pub(super) vip: Option<String>,
    pub(super) port: Option<i64>,
    pub(super) protocol: Option<String>,
    #[serde(default)]
    pub(super) affinity: RawAffinity,
    #[serde(default)]
    pub(super) health: RawHealth,
    #[serde(default)]
    pub(super) backends: Vec<RawBackend>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAffinity {
    pub(super) timeout: Option<String>,
    pub(super) ipv4_prefix: Option<i64>,
    pub(super) ipv6_prefix: Option<i64>,
    pub(super) max_age: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) kind: Option<String>,
    pub(super) path: Option<String>,
    pub(super) host: Option<String>,
    pub(super) interval: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) rise: Option<i64>,
    pub(super) fall: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) address: Option<String>,
    pub(super) port: Option<i64>,
    pub(super) weight: Option<i64>,
    pub(super) state: Option<String>,
}

#[cfg(test)]
mod tests {
    use crate::config::testing::*;

    // ---- TOML-level errors: one error, toml's own message.

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        for (text, name) in [
            (datapath("colour = 1"), "colour"),
            (service("vipp = \"1.2.3.4\""), "vipp"),
            (backend("wieght = 3"), "wieght"),
            (service("[services.affinity]\nprefix = 24"), "prefix"),
            (service("[services.health]\nretries = 3"), "retries"),
            (format!("{MINIMAL}\n[control]\nsockett = \"/x\""), "sockett"),
            (format!("{MINIMAL}\n[announce]\ntable = 7\ngrase = \"1s\""), "grase"),
            (format!("{MINIMAL}\n[extra]\n"), "extra"),
        ] {
            let errs = errors(&text);
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert!(errs[0].message.contains(&format!("unknown field `{name}`")), "{}", errs[0]);
            assert!(errs[0].message.contains("line"), "toml's message names the line: {}", errs[0]);
        }
    }
}
