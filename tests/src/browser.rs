//! A headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
//! JSON messages ended by NUL on fds 3 and 4), so the test needs no port of its own and the
//! browser can live in a lab namespace. Just what the status page tests use: open a URL,
//! evaluate an expression, take a screenshot.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    os::fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _, OwnedFd},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::{Value, json};

/// Where Debian's `chromium` package puts the browser.
pub const CHROMIUM: &str = "/usr/bin/chromium";

pub struct Browser {
    child: Child,
    to: File,
    from: mpsc::Receiver<Value>,
    next: u64,
    session: String,
    profile: PathBuf,
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe2")
}

impl Browser {
    /// Starts Chromium (in network namespace `netns`, if given) with one blank page of
    /// `width` x `height` CSS pixels; its log goes to `log`.
    pub fn start(netns: Option<&str>, width: u32, height: u32, log: &Path) -> Result<Self> {
        let profile = std::env::temp_dir().join(format!("lb-chromium-{}-{}", std::process::id(), crate::monotonic_ns()));
        let (child_in, our_out) = pipe()?;
        let (our_in, child_out) = pipe()?;
        let (cin, cout) = (child_in.as_raw_fd(), child_out.as_raw_fd());
        let log = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(CHROMIUM);
        cmd.args([
            "--headless",
            // As root, in a container: no sandbox (it needs user namespaces and setuid helpers).
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--window-size={width},{height}"))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Out of the way of 3 and 4 first, whatever numbers the pipes got.
                let a = libc::fcntl(cin, libc::F_DUPFD, 10);
                let b = libc::fcntl(cout, libc::F_DUPFD, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = match netns {
            Some(ns) => xtask::lab::in_netns(ns, || cmd.spawn())?.context("starting chromium")?,
            None => cmd.spawn().context("starting chromium")?,
        };
        drop((child_in, child_out));
        let (tx, from) = mpsc::channel();
        let reader = unsafe { File::from_raw_fd(our_in.into_raw_fd()) };
        std::thread::spawn(move || {
            let mut r = BufReader::new(reader);
            loop {
                let mut buf = Vec::new();
                match r.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        buf.pop_if(|b| *b == 0);
                        if let Ok(v) = serde_json::from_slice::<Value>(&buf)
                            && tx.send(v).is_err()
                        {
                            break;
                        }
                    }
                }
            }
        });
        let to = unsafe { File::from_raw_fd(our_out.into_raw_fd()) };
        let mut b = Browser { child, to, from, next: 0, session: String::new(), profile };
        let targets = b.call(None, "Target.getTargets", json!({}))?;
        let page = targets["targetInfos"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["targetId"].as_str())
            .map(str::to_owned);
        let page = match page {
            Some(p) => p,
            None => b.call(None, "Target.createTarget", json!({ "url": "about:blank" }))?["targetId"]
                .as_str()
                .context("Target.createTarget: no targetId")?
                .to_owned(),
        };
        let attached = b.call(None, "Target.attachToTarget", json!({ "targetId": page, "flatten": true }))?;
        b.session = attached["sessionId"].as_str().context("Target.attachToTarget: no sessionId")?.to_owned();
        b.page("Page.enable", json!({}))?;
        b.page("Emulation.setDeviceMetricsOverride", json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }))?;
        Ok(b)
    }

    /// One DevTools call (on the page's session, or the browser's with `None`); its result.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Result<Value> {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg)?;
        bytes.push(0);
        self.to.write_all(&bytes).with_context(|| format!("{method}: writing to chromium"))?;
        loop {
            let v = self.from.recv_timeout(Duration::from_secs(30)).map_err(|_| anyhow!("{method}: chromium did not answer within 30 s"))?;
            if v["id"].as_u64() != Some(id) {
                continue; // an event, or a late answer
            }
            if let Some(e) = v.get("error") {
                bail!("{method}: {e}");
            }
            return Ok(v["result"].clone());
        }
    }

    fn page(&mut self, method: &str, params: Value) -> Result<Value> {
        let s = self.session.clone();
        self.call(Some(&s), method, params)
    }

    /// Opens `url` in the page.
    pub fn open(&mut self, url: &str) -> Result<()> {
        let r = self.page("Page.navigate", json!({ "url": url }))?;
        if let Some(e) = r.get("errorText").and_then(Value::as_str) {
            bail!("opening {url}: {e}");
        }
        Ok(())
    }

    /// The value of a JavaScript expression in the page (promises awaited).
    pub fn eval(&mut self, expr: &str) -> Result<Value> {
        let r = self.page("Runtime.evaluate", json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }))?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("evaluating {expr}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// A PNG of the whole page.
    pub fn screenshot(&mut self) -> Result<Vec<u8>> {
        let r = self.page("Page.captureScreenshot", json!({ "format": "png", "captureBeyondViewport": true }))?;
        decode_base64(r["data"].as_str().context("Page.captureScreenshot: no data")?)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.call(None, "Browser.close", json!({}));
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Standard base64 (with padding), as DevTools sends binary data.
pub fn decode_base64(s: &str) -> Result<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c).with_context(|| format!("not base64: {:?}", c as char))? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_decodes() {
        assert_eq!(super::decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(super::decode_base64("aGk=").unwrap(), b"hi");
        assert_eq!(super::decode_base64("YWJj").unwrap(), b"abc");
        assert!(super::decode_base64("a$==").is_err());
    }
}
