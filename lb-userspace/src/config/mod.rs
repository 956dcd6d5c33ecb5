//! The TOML configuration: the file read into a raw model, validated once into typed runtime
//! values before anything touches the kernel.
//!
//! The raw model is deliberately loose (every field may be absent or of the wrong type, integers
//! are `i64`, enums, addresses and durations strings) so that validation judges values: every
//! problem in a file is reported at once, each naming its field path
//! (`services[1].backends[0].port`), what is wrong and how to fix it. That includes values of
//! the wrong type and unknown fields, which the walk over the document reports alongside the
//! rest; the checks across fields and services run on whatever validated, so one bad field does
//! not hide an independent problem elsewhere, and a value that failed is not reported again by
//! the rules after it. Only a TOML syntax error stops early, as the one error: it names the table
//! it is in (or the file, before any header), the line and column, and toml's message.
//!
//! Field names are a contract with operators' files: extend, never rename.
//!
//! Four rooms: `raw` (the document as read, and the walk that reads it), `syntax` (where a
//! syntax error is), `model` (the typed values the daemon uses) and `validate` (raw into model,
//! and the errors it reports).

use std::path::Path;

mod model;
mod raw;
mod syntax;
#[cfg(test)]
mod testing;
mod validate;

pub use model::{
    AffinityConfig, AnnounceConfig, BackendConfig, BalanceConfig, LoadKind, BackendState, Config, ControlConfig, DEFAULT_ANNOUNCE_GRACE,
    DEFAULT_METRICS, DEFAULT_PIN_PATH, DEFAULT_SOCKET, DatapathConfig, HealthConfig, JournalConfig, HealthKind, Mode, Protocol,
    ServiceConfig, XdpMode,
};
pub use validate::{ConfigErrors, FieldError};

impl Config {
    /// Parses and validates a config; reports every problem found, not just the first.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        parse_from(text, "config")
    }

    /// Reads, parses and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![FieldError {
                field: path.display().to_string(),
                message: format!("cannot read the config file: {e}"),
            }])
        })?;
        parse_from(&text, &path.display().to_string())
    }
}

/// `origin` names the source in a TOML syntax error before any table header.
fn parse_from(text: &str, origin: &str) -> Result<Config, ConfigErrors> {
    let doc: toml::Table = text.parse().map_err(|e| ConfigErrors(vec![syntax::syntax_error(text, origin, &e)]))?;
    validate::validate(&doc)
}

#[cfg(test)]
mod tests {
    use super::{testing::*, *};

    #[test]
    fn load_reads_a_file_and_names_an_unreadable_one() {
        let dir = std::env::temp_dir().join(format!("lb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("lb.toml");
        std::fs::write(&file, MINIMAL).unwrap();
        assert_eq!(Config::load(&file).unwrap(), Config::parse(MINIMAL).unwrap());
        std::fs::write(&file, "[datapath\n").unwrap();
        let errs = Config::load(&file).unwrap_err().0;
        assert_eq!(errs[0].field, file.display().to_string());
        let missing = dir.join("nope.toml");
        let errs = Config::load(&missing).unwrap_err().0;
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, missing.display().to_string());
        assert!(errs[0].message.contains("cannot read"), "{}", errs[0]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // ---- A syntax error is the one error; a wrong type is judged with the values.

    #[test]
    fn toml_syntax_errors_stop_and_type_errors_do_not() {
        let errs = errors("[datapath\n");
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, "config");
        assert!(errs[0].message.starts_with("TOML syntax error at line 1, column 10: "), "{}", errs[0]);
        let errs = errors(&datapath("max_services = \"many\"\nmode = \"tunnel\""));
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["datapath.max_services", "datapath.mode"], "{}", ConfigErrors(errs.clone()));
        assert_eq!(errs[0].message, "must be an integer, got a string \"many\"");
    }
}
