//! Skipped tests, counted as skipped. libtest has no "skipped" outcome: a test that cannot run
//! here (no Docker engine, not root, a tool missing) returns early and libtest counts it as passed.
//! Such a test calls [`skip`], which appends `test<TAB>reason` to the file named by
//! [`SKIPS_ENV`]; `cargo xtask test` gives every `cargo test` it runs a fresh file and, with
//! [`Tally`], moves those tests from libtest's "passed" to "skipped" in its summary line.

use std::{fs::OpenOptions, io::Write as _, path::Path};

use anyhow::{Context as _, Result};

/// The file a skipped test records itself in (set by `cargo xtask test`; unset, nothing is recorded).
pub const SKIPS_ENV: &str = "LB_TEST_SKIPS";

/// Reports that `test` (its function name) cannot run here and why. The caller returns right
/// after: libtest then counts the test as passed, and `cargo xtask test` counts it as skipped.
/// Panics when the record cannot be written: a skip that went unrecorded would pass for a pass.
pub fn skip(test: &str, reason: &str) {
    eprintln!("skipped: {test}: {reason}");
    if let Some(file) = std::env::var_os(SKIPS_ENV) {
        record(Path::new(&file), test, reason).unwrap_or_else(|e| panic!("{e:#}"));
    }
}

/// Appends one `test<TAB>reason` line (tabs and newlines in either become spaces).
fn record(file: &Path, test: &str, reason: &str) -> Result<()> {
    let clean = |s: &str| s.replace(['\t', '\n', '\r'], " ");
    // One write per line in append mode: tests running in parallel threads do not interleave.
    let line = format!("{}\t{}\n", clean(test), clean(reason));
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .with_context(|| format!("recording the skip of {test} in {} ({SKIPS_ENV})", file.display()))
}

/// Test counts summed over `cargo test` runs, skips taken out of libtest's "passed".
#[derive(Debug, Default, PartialEq)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
    /// `(test, reason)` per skipped test run, in the order recorded.
    pub skipped: Vec<(String, String)>,
}

impl Tally {
    /// Adds one `cargo test` run: its stdout (libtest's `test result:` lines, one per test
    /// binary) and the contents of its skips file.
    pub fn add_run(&mut self, stdout: &str, skips: &str) {
        let (mut passed, mut failed) = (0, 0);
        for (p, f) in stdout.lines().filter_map(result_counts) {
            passed += p;
            failed += f;
        }
        let recorded: Vec<(String, String)> = skips
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| match l.split_once('\t') {
                Some((t, r)) => (t.to_owned(), r.to_owned()),
                None => (l.to_owned(), "no reason recorded".to_owned()),
            })
            .collect();
        // Every skipped test returned normally, so libtest counted it among these passes.
        self.passed += passed.saturating_sub(recorded.len() as u64);
        self.failed += failed;
        self.skipped.extend(recorded);
    }

    /// `xtask: N passed, N failed, N skipped (test: reason; ...)`, each `test: reason` once.
    pub fn summary(&self) -> String {
        let mut line = format!("xtask: {} passed, {} failed, {} skipped", self.passed, self.failed, self.skipped.len());
        let mut reasons: Vec<String> = Vec::new();
        for (test, reason) in &self.skipped {
            let r = format!("{test}: {reason}");
            if !reasons.contains(&r) {
                reasons.push(r);
            }
        }
        if !reasons.is_empty() {
            line.push_str(&format!(" ({})", reasons.join("; ")));
        }
        line
    }
}

/// `(passed, failed)` of a libtest summary line:
/// `test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s`.
fn result_counts(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim_start().strip_prefix("test result: ")?;
    let (_verdict, counts) = rest.split_once(". ")?;
    let (mut passed, mut failed) = (None, None);
    for part in counts.split("; ") {
        match part.split_once(' ') {
            Some((n, "passed")) => passed = n.parse().ok(),
            Some((n, "failed")) => failed = n.parse().ok(),
            _ => {}
        }
    }
    Some((passed?, failed?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `cargo test` printed for a test binary whose second test skipped (libtest: 3 passed).
    const RUN: &str = "\
running 3 tests
test lab_routes_directly ... ok
test container_image_serves ... ok
test parse ... ok

test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.02s

   Doc-tests xtask

running 0 tests

test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s
";

    #[test]
    fn a_skipped_test_is_counted_as_skipped_not_passed() {
        let mut t = Tally::default();
        t.add_run(RUN, "container_image_serves\tno Docker engine\n");
        assert_eq!(
            t,
            Tally { passed: 2, failed: 0, skipped: vec![("container_image_serves".into(), "no Docker engine".into())] }
        );
        assert_eq!(t.summary(), "xtask: 2 passed, 0 failed, 1 skipped (container_image_serves: no Docker engine)");
    }

    #[test]
    fn runs_add_up_and_reasons_are_listed_once() {
        let mut t = Tally::default();
        t.add_run(RUN, "");
        let failing = "test result: FAILED. 7 passed; 2 failed; 1 ignored; 0 measured; 3 filtered out; finished in 1.50s\n";
        t.add_run(failing, "a\tneeds root\nb\tneeds root\n");
        t.add_run(RUN, "a\tneeds root\n\n");
        assert_eq!((t.passed, t.failed, t.skipped.len()), (3 + 5 + 2, 2, 3));
        assert_eq!(t.summary(), "xtask: 10 passed, 2 failed, 3 skipped (a: needs root; b: needs root)");
    }

    #[test]
    fn no_skips_no_parentheses() {
        let mut t = Tally::default();
        assert_eq!(t.summary(), "xtask: 0 passed, 0 failed, 0 skipped");
        t.add_run(RUN, "");
        assert_eq!(t.summary(), "xtask: 3 passed, 0 failed, 0 skipped");
    }

    #[test]
    fn only_libtest_result_lines_count() {
        assert_eq!(result_counts("test result: ok. 12 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 3.1s"), Some((12, 0)));
        assert_eq!(result_counts("test parse ... ok"), None);
        assert_eq!(result_counts("cluster: 40 passed through node 1"), None);
        assert_eq!(result_counts("test result: ok. many passed"), None);
    }

    #[test]
    fn records_append_one_clean_line_per_skip() {
        let file = std::env::temp_dir().join(format!("lb-skips-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&file);
        record(&file, "packaging_unit", "systemd-analyze\tnot\ninstalled").unwrap();
        record(&file, "bird_configs", "bird not installed").unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        let _ = std::fs::remove_file(&file);
        assert_eq!(text, "packaging_unit\tsystemd-analyze not installed\nbird_configs\tbird not installed\n");
        let mut t = Tally::default();
        t.add_run("test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0s", &text);
        assert_eq!(t.summary(), "xtask: 0 passed, 0 failed, 2 skipped (packaging_unit: systemd-analyze not installed; bird_configs: bird not installed)");
    }
}
