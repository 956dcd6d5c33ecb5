//! The raw model: what the file says, before judging it. Loose on purpose (see the `config`
//! module docs) so that `validate` reports what is wrong with a value.
//!
//! `read` walks the parsed TOML document into it by hand rather than through serde, so that every
//! value of the wrong type and every unknown field is reported, each with its field path, instead
//! of the first one stopping the read.

use toml::{Table, Value};

use super::validate::FieldError;

/// One field as the file gives it.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) enum Field<T> {
    /// Not in the file: the default applies, or the field is required.
    #[default]
    Absent,
    /// In the file with a value of the wrong type: `read` reported it, nothing else judges it
    /// (not even as missing).
    Wrong,
    Given(T),
}

impl<T> Field<T> {
    /// The value, or `T`'s default when absent; `None` when of the wrong type.
    pub(super) fn or_default(self) -> Option<T>
    where
        T: Default,
    {
        match self {
            Field::Absent => Some(T::default()),
            Field::Wrong => None,
            Field::Given(v) => Some(v),
        }
    }
}

impl Field<String> {
    pub(super) fn as_deref(&self) -> Field<&str> {
        match self {
            Field::Absent => Field::Absent,
            Field::Wrong => Field::Wrong,
            Field::Given(v) => Field::Given(v),
        }
    }
}

/// A list of tables (`[[services]]`); an element that is not a table is `Wrong`.
pub(super) type Tables<T> = Field<Vec<Field<T>>>;

#[derive(Debug, Default)]
pub(super) struct RawConfig {
    pub(super) datapath: Field<RawDatapath>,
    pub(super) control: Field<RawControl>,
    pub(super) services: Tables<RawService>,
    pub(super) announce: Field<RawAnnounce>,
}

#[derive(Debug, Default)]
pub(super) struct RawAnnounce {
    pub(super) table: Field<i64>,
    pub(super) grace: Field<String>,
}

#[derive(Debug, Default)]
pub(super) struct RawDatapath {
    pub(super) interfaces: Field<Vec<Field<String>>>,
    pub(super) mode: Field<String>,
    pub(super) xdp_mode: Field<String>,
    pub(super) affinity_entries: Field<i64>,
    pub(super) flow_entries: Field<i64>,
    pub(super) max_new_pins_per_cpu: Field<i64>,
    pub(super) pin_path: Field<String>,
    pub(super) max_services: Field<i64>,
    pub(super) max_backends: Field<i64>,
    pub(super) maglev_table_size: Field<i64>,
    pub(super) hash_seed: Field<i64>,
}

#[derive(Debug, Default)]
pub(super) struct RawControl {
    pub(super) socket: Field<String>,
    pub(super) metrics: Field<String>,
    pub(super) journal: Field<String>,
    pub(super) journal_max_size: Field<i64>,
    pub(super) journal_events: Field<i64>,
}

#[derive(Debug, Default)]
pub(super) struct RawService {
    pub(super) name: Field<String>,
    pub(super) vip: Field<String>,
    pub(super) port: Field<i64>,
    pub(super) protocol: Field<String>,
    pub(super) affinity: Field<RawAffinity>,
    pub(super) health: Field<RawHealth>,
    pub(super) balance: Field<RawBalance>,
    pub(super) backends: Tables<RawBackend>,
}

#[derive(Debug, Default)]
pub(super) struct RawBalance {
    pub(super) load_bound: Field<f64>,
    pub(super) load: Field<String>,
    pub(super) slow_start: Field<String>,
    pub(super) hot_prefix_share: Field<f64>,
}

#[derive(Debug, Default)]
pub(super) struct RawAffinity {
    pub(super) timeout: Field<String>,
    pub(super) ipv4_prefix: Field<i64>,
    pub(super) ipv6_prefix: Field<i64>,
    pub(super) max_age: Field<String>,
}

#[derive(Debug, Default)]
pub(super) struct RawHealth {
    pub(super) kind: Field<String>,
    pub(super) path: Field<String>,
    pub(super) host: Field<String>,
    pub(super) interval: Field<String>,
    pub(super) timeout: Field<String>,
    pub(super) rise: Field<i64>,
    pub(super) fall: Field<i64>,
}

#[derive(Debug, Default)]
pub(super) struct RawBackend {
    pub(super) address: Field<String>,
    pub(super) port: Field<i64>,
    pub(super) weight: Field<i64>,
    pub(super) state: Field<String>,
}

// ------------------------------------------------------------------------------------------------
// Reading.

/// Reads the document into the raw model, adding to `errors` every value of the wrong type and
/// every unknown field, in file order.
pub(super) fn read(doc: &Table, errors: &mut Vec<FieldError>) -> RawConfig {
    let mut t = Fields::new(errors, String::new(), doc);
    let raw = RawConfig {
        datapath: t.table("datapath", read_datapath),
        control: t.table("control", read_control),
        services: t.tables("services", read_service),
        announce: t.table("announce", read_announce),
    };
    t.done();
    raw
}

fn read_datapath(t: &mut Fields) -> RawDatapath {
    RawDatapath {
        interfaces: t.strings("interfaces"),
        mode: t.string("mode"),
        xdp_mode: t.string("xdp_mode"),
        affinity_entries: t.int("affinity_entries"),
        flow_entries: t.int("flow_entries"),
        max_new_pins_per_cpu: t.int("max_new_pins_per_cpu"),
        pin_path: t.string("pin_path"),
        max_services: t.int("max_services"),
        max_backends: t.int("max_backends"),
        maglev_table_size: t.int("maglev_table_size"),
        hash_seed: t.int("hash_seed"),
    }
}

fn read_control(t: &mut Fields) -> RawControl {
    RawControl {
        socket: t.string("socket"),
        metrics: t.string("metrics"),
        journal: t.string("journal"),
        journal_max_size: t.int("journal_max_size"),
        journal_events: t.int("journal_events"),
    }
}

fn read_announce(t: &mut Fields) -> RawAnnounce {
    RawAnnounce { table: t.int("table"), grace: t.string("grace") }
}

fn read_service(t: &mut Fields) -> RawService {
    RawService {
        name: t.string("name"),
        vip: t.string("vip"),
        port: t.int("port"),
        protocol: t.string("protocol"),
        affinity: t.table("affinity", read_affinity),
        health: t.table("health", read_health),
        balance: t.table("balance", read_balance),
        backends: t.tables("backends", read_backend),
    }
}

fn read_balance(t: &mut Fields) -> RawBalance {
    RawBalance {
        load_bound: t.number("load_bound"),
        load: t.string("load"),
        slow_start: t.string("slow_start"),
        hot_prefix_share: t.number("hot_prefix_share"),
    }
}

fn read_affinity(t: &mut Fields) -> RawAffinity {
    RawAffinity {
        timeout: t.string("timeout"),
        ipv4_prefix: t.int("ipv4_prefix"),
        ipv6_prefix: t.int("ipv6_prefix"),
        max_age: t.string("max_age"),
    }
}

fn read_health(t: &mut Fields) -> RawHealth {
    RawHealth {
        kind: t.string("kind"),
        path: t.string("path"),
        host: t.string("host"),
        interval: t.string("interval"),
        timeout: t.string("timeout"),
        rise: t.int("rise"),
        fall: t.int("fall"),
    }
}

fn read_backend(t: &mut Fields) -> RawBackend {
    RawBackend { address: t.string("address"), port: t.int("port"), weight: t.int("weight"), state: t.string("state") }
}

/// One TOML table being read. The fields a reader asks for are the table's known fields, so the
/// list of field names is written once, in the `read_*` functions; `done` reports the rest.
struct Fields<'e, 't> {
    errors: &'e mut Vec<FieldError>,
    /// Field path of the table (`services[0].health`), empty for the document.
    path: String,
    table: &'t Table,
    known: Vec<&'static str>,
    /// Where this table's errors start, so its unknown fields are listed before the errors of its
    /// values and sub-tables.
    first_error: usize,
}

impl<'e, 't> Fields<'e, 't> {
    fn new(errors: &'e mut Vec<FieldError>, path: String, table: &'t Table) -> Self {
        let first_error = errors.len();
        Fields { errors, path, table, known: Vec::new(), first_error }
    }

    fn path(&self, key: &str) -> String {
        if self.path.is_empty() { key.to_owned() } else { format!("{}.{key}", self.path) }
    }

    fn wrong<T>(&mut self, field: String, expected: &str, got: &Value) -> Field<T> {
        self.errors.push(FieldError { field, message: format!("must be {expected}, got {}", describe(got)) });
        Field::Wrong
    }

    /// The value at `key`, known from now on.
    fn get(&mut self, key: &'static str) -> Option<&'t Value> {
        self.known.push(key);
        self.table.get(key)
    }

    fn string(&mut self, key: &'static str) -> Field<String> {
        match self.get(key) {
            None => Field::Absent,
            Some(Value::String(s)) => Field::Given(s.clone()),
            Some(v) => self.wrong(self.path(key), "a string", v),
        }
    }

    fn int(&mut self, key: &'static str) -> Field<i64> {
        match self.get(key) {
            None => Field::Absent,
            Some(Value::Integer(i)) => Field::Given(*i),
            Some(v) => self.wrong(self.path(key), "an integer", v),
        }
    }

    /// A number: a float, or an integer taken as one (`load_bound = 2`).
    fn number(&mut self, key: &'static str) -> Field<f64> {
        match self.get(key) {
            None => Field::Absent,
            Some(Value::Float(f)) => Field::Given(*f),
            Some(Value::Integer(i)) => Field::Given(*i as f64),
            Some(v) => self.wrong(self.path(key), "a number", v),
        }
    }

    /// An array of strings; each element of the wrong type is reported on its own.
    fn strings(&mut self, key: &'static str) -> Field<Vec<Field<String>>> {
        match self.get(key) {
            None => Field::Absent,
            Some(Value::Array(items)) => Field::Given(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Value::String(s) => Field::Given(s.clone()),
                        v => self.wrong(format!("{}[{i}]", self.path(key)), "a string", v),
                    })
                    .collect(),
            ),
            Some(v) => self.wrong(self.path(key), "an array of strings", v),
        }
    }

    /// A sub-table (`[services.health]` or an inline `{ ... }`), read by `read`.
    fn table<T>(&mut self, key: &'static str, read: fn(&mut Fields) -> T) -> Field<T> {
        match self.get(key) {
            None => Field::Absent,
            Some(Value::Table(table)) => Field::Given(self.nested(self.path(key), table, read)),
            Some(v) => self.wrong(self.path(key), "a table", v),
        }
    }

    /// An array of tables (`[[services]]` or an inline `[{ ... }]`), each read by `read`.
    fn tables<T>(&mut self, key: &'static str, read: fn(&mut Fields) -> T) -> Tables<T> {
        match self.get(key) {
            None => Field::Absent,
            Some(Value::Array(items)) => Field::Given(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let path = format!("{}[{i}]", self.path(key));
                        match v {
                            Value::Table(table) => Field::Given(self.nested(path, table, read)),
                            v => self.wrong(path, "a table", v),
                        }
                    })
                    .collect(),
            ),
            Some(v) => self.wrong(self.path(key), "an array of tables", v),
        }
    }

    fn nested<T>(&mut self, path: String, table: &Table, read: fn(&mut Fields) -> T) -> T {
        let mut t = Fields::new(self.errors, path, table);
        let value = read(&mut t);
        t.done();
        value
    }

    /// Reports every field of the table that no reader asked for.
    fn done(self) {
        let unknown: Vec<FieldError> = self
            .table
            .keys()
            .filter(|k| !self.known.contains(&k.as_str()))
            .map(|k| FieldError {
                field: self.path(k),
                message: format!("unknown field; expected one of {}", self.known.join(", ")),
            })
            .collect();
        self.errors.splice(self.first_error..self.first_error, unknown);
    }
}

/// A value as an error message shows it: its type, and the value when it is short.
fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("a string {s:?}"),
        Value::Integer(i) => format!("an integer {i}"),
        Value::Float(f) => format!("a float {f}"),
        Value::Boolean(b) => format!("a boolean {b}"),
        Value::Datetime(d) => format!("a datetime {d}"),
        Value::Array(_) => "an array".to_owned(),
        Value::Table(_) => "a table".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::*;

    // ---- the shape of the file: every wrong type and unknown field, each by its field path.

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        for (text, field) in [
            (datapath("colour = 1"), "datapath.colour"),
            (service("vipp = \"1.2.3.4\""), "services[0].vipp"),
            (backend("wieght = 3"), "services[0].backends[0].wieght"),
            (service("[services.affinity]\nprefix = 24"), "services[0].affinity.prefix"),
            (service("[services.health]\nretries = 3"), "services[0].health.retries"),
            (format!("{MINIMAL}\n[control]\nsockett = \"/x\""), "control.sockett"),
            (format!("{MINIMAL}\n[announce]\ntable = 7\ngrase = \"1s\""), "announce.grase"),
            (format!("{MINIMAL}\n[extra]\n"), "extra"),
        ] {
            let errs = errors(&text);
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert_eq!(errs[0].field, field);
            assert!(errs[0].message.starts_with("unknown field; expected one of "), "{}", errs[0]);
        }
        rejects(
            &service("vipp = \"1.2.3.4\""),
            "services[0].vipp",
            "expected one of name, vip, port, protocol, affinity, health, balance, backends",
        );
        rejects(&format!("{MINIMAL}\n[extra]\n"), "extra", "expected one of datapath, control, services, announce");
    }

    #[test]
    fn wrong_types_are_reported_once_each() {
        rejects(
            &datapath("max_services = \"many\""),
            "datapath.max_services",
            "must be an integer, got a string \"many\"",
        );
        rejects_minimal(
            &[("port = 80", "port = \"80\"")],
            "services[0].port",
            "must be an integer, got a string \"80\"",
        );
        rejects(&backend("weight = 1.5"), "services[0].backends[0].weight", "must be an integer, got a float 1.5");
        rejects(&backend("state = true"), "services[0].backends[0].state", "must be a string, got a boolean true");
        rejects_minimal(
            &[("interfaces = [\"eth0\"]", "interfaces = \"eth0\"")],
            "datapath.interfaces",
            "must be an array of strings, got a string \"eth0\"",
        );
        rejects_minimal(
            &[("[\"eth0\"]", "[\"eth0\", 7]")],
            "datapath.interfaces[1]",
            "must be a string, got an integer 7",
        );
        rejects(&service("health = 3"), "services[0].health", "must be a table, got an integer 3");
        rejects(&format!("announce = []\n{MINIMAL}"), "announce", "must be a table, got an array");
        // A required field of the wrong type is not also "required", nor judged as a value.
        for (edits, field) in [
            (&[("port = 80", "port = \"80\"")][..], "services[0].port"),
            (&[("vip = \"10.0.0.100\"", "vip = 10")], "services[0].vip"),
            (&[("interfaces = [\"eth0\"]", "interfaces = 0")], "datapath.interfaces"),
            (
                &[("[[services.backends]]\naddress = \"10.1.0.11\"\nport = 8080\n", "backends = 1\n")],
                "services[0].backends",
            ),
        ] {
            let errs = errors(&edit(MINIMAL, edits));
            assert_eq!(errs.iter().filter(|e| e.field == field).count(), 1, "{}", crate::config::ConfigErrors(errs));
        }
    }

    #[test]
    fn inline_tables_read_like_headers() {
        let text = r#"
datapath = { interfaces = ["eth0"] }
[[services]]
name = "web"
vip = "10.0.0.100"
port = 80
health = { kind = "none" }
backends = [{ address = "10.1.0.11", port = 8080 }, { address = "10.1.0.12", port = 8080, colour = 1 }]
"#;
        let errs = errors(text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "services[0].backends[1].colour");
        assert!(crate::config::Config::parse(&text.replace(", colour = 1", "")).is_ok());
    }
}
