//! TOML syntax errors, located for an operator: the field path of the table the error is in
//! (`services[1].backends[0]`), worked out from the `[table]` and `[[array]]` headers before
//! the error's line, and the line and column.

use std::collections::HashMap;

use super::validate::FieldError;

/// The one error a syntax error gives; `origin` (the file, or `config`) stands for the field when
/// the error comes before any table header.
pub(super) fn syntax_error(text: &str, origin: &str, e: &toml::de::Error) -> FieldError {
    let message = e.message().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
    let Some(at) = e.span().map(|s| s.start.min(text.len())).filter(|&at| text.is_char_boundary(at)) else {
        return FieldError { field: origin.to_owned(), message: format!("TOML syntax error: {message}") };
    };
    let line_start = text[..at].rfind('\n').map_or(0, |n| n + 1);
    let line = text[..line_start].matches('\n').count() + 1;
    let column = text[line_start..at].chars().count() + 1;
    FieldError {
        field: table_path(&text[..line_start]).unwrap_or_else(|| origin.to_owned()),
        message: format!("TOML syntax error at line {line}, column {column}: {message}"),
    }
}

/// The field path of the table the last header of `text` opens, `None` if `text` has no header.
/// `text` is whole lines that toml already read without error, so a light scan is enough: it
/// skips strings, comments and brackets inside values, and takes a `[` that starts a line as a
/// header.
fn table_path(text: &str) -> Option<String> {
    let b = text.as_bytes();
    // Entries so far of each array of tables, by its key path.
    let mut entries: HashMap<Vec<String>, usize> = HashMap::new();
    let mut current = None;
    let mut depth = 0usize;
    let mut line_start = true;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\n' => line_start = true,
            b' ' | b'\t' | b'\r' => {}
            b'#' => i = find(b, i, b"\n").saturating_sub(1),
            b'"' | b'\'' => {
                i = skip_string(b, i) - 1;
                line_start = false;
            }
            b'[' if line_start && depth == 0 => {
                let array = b.get(i + 1) == Some(&b'[');
                let (keys, end) = header_keys(b, i + 1 + usize::from(array));
                i = find(b, end, b"\n").saturating_sub(1);
                line_start = false;
                if keys.is_empty() {
                    // Not a header after all (toml read it, so this does not happen).
                } else if array {
                    *entries.entry(keys.clone()).or_default() += 1;
                    // Arrays inside the previous entry start again in this one.
                    entries.retain(|k, _| k.len() <= keys.len() || !k.starts_with(&keys));
                }
                if !keys.is_empty() {
                    current = Some(render(&keys, &entries));
                }
            }
            c => {
                match c {
                    b'[' | b'{' => depth += 1,
                    b']' | b'}' => depth = depth.saturating_sub(1),
                    _ => {}
                }
                line_start = false;
            }
        }
        i += 1;
    }
    current
}

/// `services.backends` as `services[1].backends[0]`: each array of tables with its last entry.
fn render(keys: &[String], entries: &HashMap<Vec<String>, usize>) -> String {
    let mut path = String::new();
    for (n, key) in keys.iter().enumerate() {
        if n > 0 {
            path.push('.');
        }
        path.push_str(key);
        if let Some(count) = entries.get(&keys[..=n]) {
            path.push_str(&format!("[{}]", count - 1));
        }
    }
    path
}

/// The index of the first `pat` at or after `from`, or the end of `b`.
fn find(b: &[u8], from: usize, pat: &[u8]) -> usize {
    (from..b.len()).find(|&i| b[i..].starts_with(pat)).unwrap_or(b.len())
}

/// The index just past the string (basic, literal, or either multi-line form) starting at `at`.
fn skip_string(b: &[u8], at: usize) -> usize {
    let q = b[at];
    let basic = q == b'"';
    let triple = [q, q, q];
    let close: &[u8] = if b[at..].starts_with(&triple) { &triple } else { &triple[..1] };
    let mut i = at + close.len();
    while i < b.len() {
        if basic && b[i] == b'\\' {
            i += 2;
        } else if b[i..].starts_with(close) {
            // A multi-line string may end in up to two quotes of its own: `""""` ends after all.
            i += close.len();
            while close.len() == 3 && b.get(i) == Some(&q) {
                i += 1;
            }
            return i;
        } else if close.len() == 1 && b[i] == b'\n' {
            return i;
        } else {
            i += 1;
        }
    }
    b.len()
}

/// The dotted keys of a header whose first key starts at or after `at`, and the index after them;
/// no keys if it is not a header.
fn header_keys(b: &[u8], mut i: usize) -> (Vec<String>, usize) {
    let mut keys = Vec::new();
    loop {
        while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
            i += 1;
        }
        let start = i;
        let key = match b.get(i) {
            Some(&q @ (b'"' | b'\'')) => {
                i = skip_string(b, i);
                let inner = b.get(start + 1..i.saturating_sub(1)).unwrap_or_default();
                if b.get(i.wrapping_sub(1)) != Some(&q) {
                    return (Vec::new(), i);
                }
                inner
            }
            _ => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'-') {
                    i += 1;
                }
                &b[start..i]
            }
        };
        if i == start {
            return (Vec::new(), i);
        }
        keys.push(String::from_utf8_lossy(key).into_owned());
        while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
            i += 1;
        }
        match b.get(i) {
            Some(b'.') => i += 1,
            Some(b']') => return (keys, i),
            _ => return (Vec::new(), i),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::table_path;
    use crate::config::testing::*;

    #[test]
    fn a_syntax_error_names_its_table_and_line() {
        let errs = errors("[datapath\n");
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, "config");
        assert!(
            errs[0].message.starts_with("TOML syntax error at line 1, column 10: invalid table header"),
            "{}",
            errs[0]
        );

        // Line 22 of two_services is `port = 5353` in services[1].backends[0].
        let text = two_services("");
        assert_eq!(text.lines().nth(21), Some("port = 5353"));
        let text = edit(&text, &[("port = 5353", "port = ")]);
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "services[1].backends[0]");
        assert!(errs[0].message.starts_with("TOML syntax error at line 22, column 8: "), "{}", errs[0]);
        assert!(!errs[0].message.contains('\n'), "one line: {}", errs[0]);

        let errs = errors(&service("[services.health]\nkind = \"tcp\"\nkind = \"http\""));
        assert_eq!(errs[0].field, "services[0].health");
        assert!(errs[0].message.contains("duplicate key `kind`"), "{}", errs[0]);
    }

    #[test]
    fn table_paths_follow_headers_not_values() {
        assert_eq!(table_path("a = 1\n"), None);
        assert_eq!(table_path("[datapath]\n"), Some("datapath".into()));
        let text = "[[services]]\n[[services.backends]]\n[[services.backends]]\n[[services]]\n[services.health]\n";
        assert_eq!(table_path(text), Some("services[1].health".into()));
        let text = format!("{text}[[ services . \"backends\" ]] # comment\n");
        assert_eq!(table_path(&text), Some("services[1].backends[0]".into()));
        // Brackets in values, strings and comments open no table.
        let text =
            "[datapath]\ninterfaces = [\n[\"x\"],\n  \"[y]\",\n]\n# [z]\ns = \"\"\"\n[w]\n\"\"\"\nt = '''\n[v]'''\n";
        assert_eq!(table_path(text), Some("datapath".into()));
    }
}
