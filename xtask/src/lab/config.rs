//! The balancer config the lab writes: [`LabSpec::config_toml`] and the lab's config file.

use std::fmt::Write as _;
use std::fs;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use super::topology::{HealthKind, LabOptions, LabSpec, backend_addr6};
use super::{LAB_ROOT, Lab, VIP, VIP_HTTP_PORT, VIP_UDP_PORT, VIP6};

/// A duration as humantime text lb parses: `30m`-style whole seconds as `1800s`, else
/// milliseconds, microseconds or nanoseconds.
fn duration_text(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns.is_multiple_of(1_000_000_000) {
        format!("{}s", d.as_secs())
    } else if ns.is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else if ns.is_multiple_of(1_000) {
        format!("{}us", d.as_micros())
    } else {
        format!("{ns}ns")
    }
}

impl LabSpec {
    /// The balancer config of a lab of this size: services `web` (TCP :80, HTTP health checks,
    /// 30 min affinity) and `dns` (UDP :53, no health checks) on the VIP, every backend in
    /// both, `interfaces` as the XDP interfaces, `socket` as the control socket and `bpf` next
    /// to the socket as the pin path. Needs no lab (for `lb check` tests).
    pub fn config_toml(&self, interfaces: &[String], socket: &Path) -> String {
        let pin_path = socket.parent().unwrap_or(Path::new(LAB_ROOT)).join("bpf");
        self.config_toml_with(interfaces, socket, &pin_path, &LabOptions::default())
    }

    /// [`LabSpec::config_toml`] with an explicit pin path and `options`. With
    /// [`LabOptions::ipv6`] the IPv6 services `web6` and `dns6` follow; with
    /// [`LabOptions::dsr`] the mode is `dsr` and the backends are written at their DSR addresses
    /// with the service ports.
    pub fn config_toml_with(
        &self,
        interfaces: &[String],
        socket: &Path,
        pin_path: &Path,
        options: &LabOptions,
    ) -> String {
        let ifs: Vec<String> = interfaces.iter().map(|s| toml_str(s)).collect();
        let backends = options.backends.unwrap_or(self.backends);
        let (http_port, udp_port) = options.backend_ports();
        let mut s = String::new();
        let _ = write!(
            s,
            "# Written by the xtask lab.\n\
             [datapath]\n\
             interfaces = [{ifs}]\n\
             mode = \"{mode}\"\n\
             xdp_mode = \"auto\"\n\
             affinity_entries = 65536\n\
             # Outside /sys: lb runs under `nsenter --net` and mounts a bpffs here itself.\n\
             pin_path = {pin}\n\
             max_services = 8\n\
             maglev_table_size = 65537\n",
            ifs = ifs.join(", "),
            mode = if options.dsr { "dsr" } else { "nat" },
            pin = toml_str(&pin_path.to_string_lossy()),
        );
        if let Some(seed) = options.hash_seed {
            let _ = writeln!(s, "hash_seed = {seed}");
        }
        let _ = write!(
            s,
            "\n[control]\n\
             socket = {sock}\n",
            sock = toml_str(&socket.to_string_lossy()),
        );
        let service = |s: &mut String, name: &str, vip: IpAddr, port: u16, proto: &str| {
            let _ = write!(
                s,
                "\n[[services]]\n\
                 name = \"{name}\"\n\
                 vip = \"{vip}\"\n\
                 port = {port}\n\
                 protocol = \"{proto}\"\n"
            );
        };
        let affinity = |s: &mut String, default_timeout: Option<&str>, v6_prefix: Option<u8>| {
            let timeout = options
                .affinity_timeout
                .map(duration_text)
                .or(default_timeout.map(str::to_owned));
            if timeout.is_none() && options.affinity_max_age.is_none() && v6_prefix.is_none() {
                return;
            }
            s.push_str("[services.affinity]\n");
            if let Some(t) = timeout {
                let _ = writeln!(s, "timeout = \"{t}\"");
            }
            if let Some(a) = options.affinity_max_age {
                let _ = writeln!(s, "max_age = \"{}\"", duration_text(a));
            }
            if let Some(p) = v6_prefix {
                let _ = writeln!(s, "ipv6_prefix = {p}");
            }
        };
        let health = |s: &mut String| {
            let h = &options.health;
            let _ = writeln!(s, "[services.health]\nkind = \"{}\"", h.kind.as_str());
            if h.kind == HealthKind::Http {
                let _ = writeln!(s, "path = {}", toml_str(&h.path));
            }
            for (key, value) in [("interval", h.interval), ("timeout", h.timeout)] {
                if let Some(v) = value {
                    let _ = writeln!(s, "{key} = \"{}\"", duration_text(v));
                }
            }
            for (key, value) in [("rise", h.rise), ("fall", h.fall)] {
                if let Some(v) = value {
                    let _ = writeln!(s, "{key} = {v}");
                }
            }
        };
        let backend_list = |s: &mut String, port: u16, v6: bool| {
            for i in 1..=backends {
                let address = if v6 {
                    IpAddr::V6(backend_addr6(i))
                } else {
                    IpAddr::V4(options.backend_addr(i))
                };
                let _ = write!(
                    s,
                    "[[services.backends]]\naddress = \"{address}\"\nport = {port}\n"
                );
                if options.draining.contains(&i) {
                    s.push_str("state = \"draining\"\n");
                }
            }
        };
        service(&mut s, "web", IpAddr::V4(VIP), VIP_HTTP_PORT, "tcp");
        affinity(&mut s, Some("30m"), None);
        health(&mut s);
        backend_list(&mut s, http_port, false);
        service(&mut s, "dns", IpAddr::V4(VIP), VIP_UDP_PORT, "udp");
        affinity(&mut s, None, None);
        s.push_str("[services.health]\nkind = \"none\"\n");
        backend_list(&mut s, udp_port, false);
        if let Some(v6) = options.ipv6 {
            service(&mut s, "web6", IpAddr::V6(VIP6), VIP_HTTP_PORT, "tcp");
            affinity(&mut s, Some("30m"), v6.affinity_prefix);
            health(&mut s);
            backend_list(&mut s, http_port, true);
            service(&mut s, "dns6", IpAddr::V6(VIP6), VIP_UDP_PORT, "udp");
            affinity(&mut s, None, v6.affinity_prefix);
            s.push_str("[services.health]\nkind = \"none\"\n");
            backend_list(&mut s, udp_port, true);
        }
        s
    }
}

impl Lab {
    /// Replaces the options and rewrites the config file with them ([`Lab::rewrite_config`]);
    /// a running lb sees the change on reload (e.g. `signal_lb(Signal::SIGHUP)`).
    pub fn set_options(&mut self, options: LabOptions) -> Result<()> {
        options.check(self.spec.backends)?;
        ensure!(
            self.options.same_topology(&options),
            "LabOptions.ipv6 (its addresses), vlan and dsr are fixed when the lab is created"
        );
        self.options = options;
        self.rewrite_config()
    }

    /// Writes [`Lab::render_config`] for every current interface to the config file.
    pub fn rewrite_config(&self) -> Result<()> {
        self.write_config(&self.render_config(&self.interfaces()))
    }

    /// The lab's balancer config (see [`LabSpec::config_toml_with`]) with this lab's control
    /// socket, pin path and options, naming `interfaces` as the XDP interfaces.
    pub fn render_config(&self, interfaces: &[String]) -> String {
        self.render_config_with(interfaces, &self.options)
    }

    /// [`Lab::render_config`] with other options.
    pub fn render_config_with(&self, interfaces: &[String], options: &LabOptions) -> String {
        self.spec
            .config_toml_with(interfaces, &self.socket, &self.pin_path, options)
    }

    /// Replaces the config file (for tests that need a variant of [`Lab::render_config`]). The
    /// new file is renamed into place, so a reloading lb never reads half of it.
    pub fn write_config(&self, text: &str) -> Result<()> {
        let tmp = self.config.with_extension("toml.new");
        fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &self.config)
            .with_context(|| format!("renaming {} to {}", tmp.display(), self.config.display()))
    }
}

/// TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::{Ipv4Addr, Ipv6Addr};

    use crate::lab::{
        DSR_MAX_CLIENTS, ETH_P_8021AD, ETH_P_8021Q, Ipv6Options, VlanOptions, backend_addr,
        client_prefix6,
    };

    #[test]
    fn config_names_every_backend_and_interface() {
        // Pure rendering; no kernel needed.
        let spec = LabSpec {
            clients: 2,
            backends: 3,
        };
        let cfg = spec.config_toml(&spec.interfaces(), Path::new("/run/lb-lab/x/lb.sock"));
        assert!(
            cfg.contains(r#"interfaces = ["eth0", "eth1", "eth2", "eth3"]"#),
            "{cfg}"
        );
        assert!(cfg.contains(r#"socket = "/run/lb-lab/x/lb.sock""#), "{cfg}");
        assert!(cfg.contains(r#"pin_path = "/run/lb-lab/x/bpf""#), "{cfg}");
        assert_eq!(cfg.matches("[[services]]").count(), 2, "{cfg}");
        assert_eq!(cfg.matches("[[services.backends]]").count(), 6, "{cfg}");
        assert!(
            cfg.contains("address = \"10.200.13.2\"\nport = 5353"),
            "{cfg}"
        );
        // Only today's fields, so an lb without the newer ones parses it.
        for absent in ["max_age", "state", "hash_seed", "interval", "rise", "fall"] {
            assert!(
                !cfg.contains(absent),
                "{absent} in the default config:\n{cfg}"
            );
        }
        assert!(
            cfg.contains("[services.affinity]\ntimeout = \"30m\"\n[services.health]\nkind = \"http\"\npath = \"/healthz\"\n"),
            "{cfg}"
        );
        assert_eq!(cfg.matches("[services.affinity]").count(), 1, "{cfg}");
        assert_eq!(backend_addr(2), Ipv4Addr::new(10, 200, 12, 2));
        assert_eq!(toml_str("a\"b\\c"), r#""a\"b\\c""#);
    }

    #[test]
    fn options_are_rendered_when_set() {
        let spec = LabSpec {
            clients: 1,
            backends: 2,
        };
        let options = LabOptions::default()
            .with_health_timing(Duration::from_millis(200), Duration::from_millis(100), 2, 3)
            .with_affinity_timeout(Duration::from_secs(5))
            .with_affinity_max_age(Duration::from_millis(1500))
            .with_draining(3)
            .with_hash_seed(42)
            .with_backends(3);
        options.check(spec.backends).unwrap();
        let cfg = spec.config_toml_with(
            &spec.interfaces(),
            Path::new("/s/lb.sock"),
            Path::new("/p/bpf"),
            &options,
        );
        assert!(cfg.contains("pin_path = \"/p/bpf\"\n"), "{cfg}");
        assert!(
            cfg.contains("maglev_table_size = 65537\nhash_seed = 42\n"),
            "{cfg}"
        );
        assert!(
            cfg.contains("kind = \"http\"\npath = \"/healthz\"\ninterval = \"200ms\"\ntimeout = \"100ms\"\nrise = 2\nfall = 3\n"),
            "{cfg}"
        );
        assert_eq!(
            cfg.matches("[services.affinity]\ntimeout = \"5s\"\nmax_age = \"1500ms\"\n")
                .count(),
            2,
            "{cfg}"
        );
        assert_eq!(cfg.matches("[[services.backends]]").count(), 6, "{cfg}");
        assert_eq!(
            cfg.matches("address = \"10.200.13.2\"\nport = 8080\nstate = \"draining\"\n")
                .count(),
            1,
            "{cfg}"
        );
        assert_eq!(cfg.matches("state = ").count(), 2, "{cfg}");

        let tcp = LabOptions::default().with_health_kind(HealthKind::Tcp);
        let cfg = spec.config_toml_with(&spec.interfaces(), Path::new("/s"), Path::new("/p"), &tcp);
        assert!(
            cfg.contains("kind = \"tcp\"\n[[services.backends]]"),
            "{cfg}"
        );
        assert!(!cfg.contains("/healthz"), "{cfg}");

        assert!(LabOptions::default().with_draining(3).check(2).is_err());
        assert!(LabOptions::default().with_backends(0).check(2).is_err());
        assert!(LabOptions::default().with_backends(51).check(2).is_err());
        assert_eq!(duration_text(Duration::from_secs(1800)), "1800s");
        assert_eq!(duration_text(Duration::from_micros(1500)), "1500us");
        assert_eq!(duration_text(Duration::from_nanos(7)), "7ns");
    }

    #[test]
    fn topology_options_are_rendered() {
        let spec = LabSpec {
            clients: 2,
            backends: 2,
        };
        let v6 = LabOptions::default().with_ipv6(Ipv6Options {
            client_prefixes: 3,
            addrs_per_prefix: 2,
            affinity_prefix: Some(56),
        });
        v6.check_topology(&spec).unwrap();
        let cfg = spec.config_toml_with(&spec.interfaces(), Path::new("/s"), Path::new("/p"), &v6);
        assert_eq!(cfg.matches("[[services]]").count(), 4, "{cfg}");
        assert!(
            cfg.contains("name = \"web6\"\nvip = \"2001:db8:ffff::1\"\nport = 80\nprotocol = \"tcp\"\n[services.affinity]\ntimeout = \"30m\"\nipv6_prefix = 56\n[services.health]\nkind = \"http\""),
            "{cfg}"
        );
        assert!(
            cfg.contains("name = \"dns6\"\nvip = \"2001:db8:ffff::1\"\nport = 53\nprotocol = \"udp\"\n[services.affinity]\nipv6_prefix = 56\n[services.health]\nkind = \"none\"\n[[services.backends]]\naddress = \"2001:db8:b:1::2\"\nport = 5353\n"),
            "{cfg}"
        );
        assert_eq!(
            cfg.matches("ipv6_prefix").count(),
            2,
            "only the IPv6 services: {cfg}"
        );
        assert_eq!(
            backend_addr6(2),
            "2001:db8:b:2::2".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            client_prefix6(12),
            "2001:db8:c:c::".parse::<Ipv6Addr>().unwrap()
        );

        let dsr = LabOptions::default().with_dsr();
        dsr.check_topology(&spec).unwrap();
        let cfg =
            spec.config_toml_with(&["eth0".to_owned()], Path::new("/s"), Path::new("/p"), &dsr);
        assert!(
            cfg.contains("interfaces = [\"eth0\"]\nmode = \"dsr\"\n"),
            "{cfg}"
        );
        assert!(
            cfg.contains("address = \"10.200.1.202\"\nport = 80\n"),
            "{cfg}"
        );
        assert!(
            cfg.contains("address = \"10.200.1.201\"\nport = 53\n"),
            "{cfg}"
        );
        assert!(!cfg.contains("8080") && !cfg.contains("5353"), "{cfg}");

        let vlan = VlanOptions {
            client_vid: 100,
            client_outer_vid: Some(20),
            backend_vid: None,
        };
        assert_eq!(
            vlan.client_tags(),
            vec![(ETH_P_8021AD, 20), (ETH_P_8021Q, 100)]
        );
        for (what, bad) in [
            ("dsr with vlan", dsr.clone().with_vlan(vlan)),
            (
                "vid 0",
                LabOptions::default().with_vlan(VlanOptions {
                    client_vid: 0,
                    ..vlan
                }),
            ),
            (
                "vid 4095",
                LabOptions::default().with_vlan(VlanOptions {
                    backend_vid: Some(4095),
                    ..vlan
                }),
            ),
            (
                "no /64s",
                LabOptions::default().with_ipv6(Ipv6Options {
                    client_prefixes: 0,
                    ..Ipv6Options::default()
                }),
            ),
        ] {
            assert!(bad.check_topology(&spec).is_err(), "{what}");
        }
        let many = LabSpec {
            clients: DSR_MAX_CLIENTS + 1,
            backends: 1,
        };
        assert!(dsr.check_topology(&many).is_err());
        // Topology is fixed at creation; config-only fields may change.
        assert!(!LabOptions::default().same_topology(&dsr));
        assert!(v6.same_topology(&v6.clone().with_hash_seed(3)));
    }
}
