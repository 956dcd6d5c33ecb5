//! Control of the `lb` process: `lb run` in the balancer namespace, the CLI, signals, logs.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::system::output_timeout;
use super::{CMD_TIMEOUT, LB_DOWN_TIMEOUT, LB_START_TIMEOUT, LB_STOP_GRACE, Lab, NETNS_DIR};

impl Lab {
    /// `nsenter --net=/run/netns/<lb-ns> <lb_bin> run --config <cfg>` with `RUST_LOG=info`
    /// (unless set), `NO_COLOR=1` and stdin from /dev/null; the caller picks stdout/stderr.
    /// nsenter execs lb in place (same pid) and changes only the network namespace, so lb's
    /// mounts and pins are this process's.
    pub fn lb_run_command(&self, lb_bin: &Path) -> Command {
        let mut cmd = self.nsenter_lb(lb_bin);
        cmd.args(&self.lb_args)
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            // The log goes to a file that test failures print: no colour escapes.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        cmd
    }

    /// `nsenter --net=/run/netns/<lb-ns> -- <lb_bin>`.
    fn nsenter_lb(&self, lb_bin: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!(
            "--net={}",
            Path::new(NETNS_DIR).join(self.ns_lb()).display()
        ))
        .arg("--")
        .arg(lb_bin);
        cmd
    }

    /// Runs `<lb_bin> --socket <sock> <args>` from the root namespace (the control socket is a
    /// path, reachable from anywhere), with a 30 s limit.
    pub fn lb_cli(&self, lb_bin: &Path, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(lb_bin);
        cmd.arg("--socket").arg(&self.socket).args(args);
        output_timeout(&mut cmd, CMD_TIMEOUT)
    }

    /// Runs `<lb_bin> down --config <cfg>` in the balancer namespace (detaches and removes what
    /// a stopped lb left pinned), with a 15 s limit; the caller judges the exit status.
    pub fn lb_down(&self, lb_bin: &Path) -> Result<Output> {
        let mut cmd = self.nsenter_lb(lb_bin);
        cmd.arg("down")
            .arg("--config")
            .arg(&self.config)
            .env("NO_COLOR", "1");
        output_timeout(&mut cmd, LB_DOWN_TIMEOUT)
    }

    /// Global options for the next `lb run` ([`Lab::start_lb`], [`Lab::lb_run_command`]).
    pub fn set_lb_args(&mut self, args: &[&str]) {
        self.lb_args = args.iter().map(|a| a.to_string()).collect();
    }

    /// Remembers `lb_bin` for the `lb down` on drop (done by [`Lab::start_lb`] already; for
    /// tests that start lb with [`Lab::lb_run_command`] themselves).
    pub fn set_lb_bin(&mut self, lb_bin: &Path) {
        self.lb_bin = Some(lb_bin.to_owned());
    }

    /// Whether `lb` was started by [`Lab::start_lb`] and not yet stopped (it may have exited).
    pub fn lb_started(&self) -> bool {
        self.lb.is_some()
    }

    /// The pid of the `lb` started by [`Lab::start_lb`] (nsenter execs it in place), unless it
    /// was stopped or reaped since; it may have exited.
    pub fn lb_pid(&self) -> Option<u32> {
        self.lb.as_ref().map(Child::id)
    }

    /// Sends `signal` to the running lb (e.g. `SIGHUP` to reload).
    pub fn signal_lb(&self, signal: Signal) -> Result<()> {
        let pid = self
            .lb_pid()
            .with_context(|| format!("lb is not running in lab {}", self.prefix))?;
        kill(Pid::from_raw(pid as i32), signal)
            .with_context(|| format!("sending {signal} to lb (pid {pid})"))
    }

    /// Starts `lb run` in the balancer namespace (output appended to [`Lab::log_path`]) and
    /// waits until `lb status` answers, polling every 50 ms for up to 20 s. On timeout or an
    /// early exit the daemon is stopped and the error carries the last 30 lines of its log.
    pub fn start_lb(&mut self, lb_bin: &Path) -> Result<()> {
        ensure!(
            self.lb.is_none(),
            "lb is already running in lab {}",
            self.prefix
        );
        ensure!(
            lb_bin.is_file(),
            "lb binary {} does not exist (build it with `cargo build --release -p lb-userspace`)",
            lb_bin.display()
        );
        self.lb_bin = Some(lb_bin.to_owned());
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let log2 = log
            .try_clone()
            .with_context(|| format!("duplicating {}", self.log.display()))?;
        let child = self
            .lb_run_command(lb_bin)
            .stdout(log)
            .stderr(log2)
            .spawn()
            .with_context(|| {
                format!(
                    "spawning `nsenter --net={NETNS_DIR}/{} {} run`",
                    self.ns_lb(),
                    lb_bin.display()
                )
            })?;
        self.lb = Some(child);

        let started = Instant::now();
        let mut last_status;
        let err = loop {
            if let Some(child) = self.lb.as_mut() {
                match child.try_wait() {
                    Ok(Some(status)) => break anyhow!("lb run exited early with {status}"),
                    Ok(None) => {}
                    Err(e) => break anyhow!(e).context("waiting for lb run"),
                }
            }
            match self.lb_cli(lb_bin, &["status"]) {
                Ok(out) if out.status.success() => return Ok(()),
                Ok(out) => {
                    last_status = format!(
                        "{}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )
                }
                Err(e) => last_status = format!("{e:#}"),
            }
            if started.elapsed() >= LB_START_TIMEOUT {
                break anyhow!(
                    "`lb status` did not succeed within {LB_START_TIMEOUT:?} (last: {last_status})"
                );
            }
            thread::sleep(Duration::from_millis(50));
        };
        let stopped = self.stop_lb();
        let mut err = err.context(format!(
            "starting lb in {} with {}; last 30 lines of {}:\n{}",
            self.ns_lb(),
            self.config.display(),
            self.log.display(),
            self.lb_log_tail(30)
        ));
        if let Err(e) = stopped {
            err = err.context(format!("also failed to stop it: {e:#}"));
        }
        Err(err)
    }

    /// Stops `lb` if [`Lab::start_lb`] started it: SIGTERM, then SIGKILL after 5 s. Returns its
    /// exit status (`None` if it was not running). An error means SIGKILL was needed or waiting
    /// failed; the process is gone either way.
    pub fn stop_lb(&mut self) -> Result<Option<ExitStatus>> {
        let Some(mut child) = self.lb.take() else {
            return Ok(None);
        };
        if let Some(status) = child.try_wait().context("checking on lb")? {
            return Ok(Some(status));
        }
        let pid = Pid::from_raw(child.id() as i32);
        // nsenter execs lb in place, so the child's pid is lb's.
        kill(pid, Signal::SIGTERM).with_context(|| format!("sending SIGTERM to lb (pid {pid})"))?;
        let deadline = Instant::now() + LB_STOP_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().context("waiting for lb")? {
                return Ok(Some(status));
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let status = child.wait().context("waiting for lb after SIGKILL")?;
        bail!("lb (pid {pid}) ignored SIGTERM for {LB_STOP_GRACE:?} and was killed ({status})")
    }

    /// Restarts the running lb: SIGTERM, wait for its exit (SIGKILL after 5 s counts as a
    /// failure, as does an unsuccessful exit status), start `lb_bin` again and wait until
    /// `lb status` answers. Returns the time from SIGTERM until the new daemon answered. The
    /// log gets a marker line between the two runs.
    pub fn restart_lb(&mut self, lb_bin: &Path) -> Result<Duration> {
        if let Some(status) = self.lb_exit_status()? {
            bail!(
                "lb had already exited ({status}) before the restart; last 30 lines of {}:\n{}",
                self.log.display(),
                self.lb_log_tail(30)
            );
        }
        ensure!(
            self.lb.is_some(),
            "lb is not running in lab {}",
            self.prefix
        );
        let sent = Instant::now();
        let status = self.stop_lb().context("stopping lb for a restart")?;
        if let Some(status) = status
            && !status.success()
        {
            bail!(
                "lb exited with {status} on SIGTERM; last 30 lines of {}:\n{}",
                self.log.display(),
                self.lb_log_tail(30)
            );
        }
        let stopped_after = sent.elapsed();
        if let Ok(mut log) = OpenOptions::new().append(true).open(&self.log) {
            let _ = writeln!(
                log,
                "--- lab: lb stopped {stopped_after:?} after SIGTERM; starting it again ---"
            );
        }
        self.start_lb(lb_bin).context("starting lb again")?;
        Ok(sent.elapsed())
    }

    /// If `lb` was started and has exited since, reaps it and returns its exit status
    /// (afterwards [`Lab::lb_started`] is false); `None` while it runs or if never started.
    pub fn lb_exit_status(&mut self) -> Result<Option<ExitStatus>> {
        let Some(child) = self.lb.as_mut() else {
            return Ok(None);
        };
        let status = child.try_wait().context("checking on lb")?;
        if status.is_some() {
            self.lb = None;
        }
        Ok(status)
    }

    /// Everything `lb run` has written so far ("" if nothing).
    pub fn lb_log(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` lines of [`Lab::lb_log`].
    pub fn lb_log_tail(&self, n: usize) -> String {
        let log = self.lb_log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}
