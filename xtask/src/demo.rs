//! `cargo xtask run`: a lab (8 client addresses, 3 backends) with `lb` running, a table that shows
//! session affinity at work, and the commands to poke it by hand. Ctrl-C (or SIGTERM/SIGHUP) stops
//! the daemon and removes every namespace.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::lab::{Lab, LabSpec, VIP_HTTP_PORT, VIP_UDP_PORT};

const REQUESTS_PER_CLIENT: usize = 3;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs the demo until Ctrl-C/SIGTERM; everything it made is gone when it returns, also on error.
pub fn run(lb_bin: &Path) -> Result<()> {
    let (tx, stop) = mpsc::channel();
    // Installed before anything is created, so a signal never skips the lab's cleanup.
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .context("installing the Ctrl-C/SIGTERM handler")?;

    println!("Creating the lab: 8 client addresses, 3 backends ...");
    let mut lab = Lab::create(LabSpec {
        clients: 8,
        backends: 3,
    })?;
    if stopped(&stop) {
        return finish(lab);
    }
    println!(
        "Starting {} in namespace {} (log: {}) ...",
        lb_bin.display(),
        lab.ns_lb(),
        lab.log_path().display()
    );
    lab.start_lb(lb_bin)?;
    println!();

    show_affinity(&lab, &stop);
    if stopped(&stop) {
        return finish(lab);
    }
    print_hints(&lab, lb_bin);

    loop {
        match stop.recv_timeout(Duration::from_millis(500)) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        if let Ok(Some(status)) = lab.lb_exit_status() {
            let tail = lab.lb_log_tail(30);
            drop(lab);
            bail!("lb exited on its own ({status}); lab removed. Last lines of its log:\n{tail}");
        }
    }
    finish(lab)
}

fn stopped(stop: &Receiver<()>) -> bool {
    stop.try_recv().is_ok()
}

fn finish(mut lab: Lab) -> Result<()> {
    println!("\nStopping lb and removing the lab ...");
    let stopped = lab.stop_lb();
    let prefix = lab.prefix().to_owned();
    drop(lab);
    match stopped {
        Ok(Some(status)) if !status.success() => println!("lb exited with {status}"),
        Ok(_) => {}
        Err(e) => println!("{e:#}"),
    }
    println!("Done: namespaces {prefix}-* and /run/lb-lab/{prefix} removed.");
    Ok(())
}

/// From every client address: three HTTP requests and one UDP query to the VIP.
fn show_affinity(lab: &Lab, stop: &Receiver<()>) {
    let vip = lab.vip();
    let http = SocketAddrV4::new(vip, VIP_HTTP_PORT);
    let udp = SocketAddrV4::new(vip, VIP_UDP_PORT);
    let vip_udp = SocketAddr::V4(udp);
    println!(
        "Session affinity: {REQUESTS_PER_CLIENT} separate HTTP connections to {http} and one UDP query to {udp} per client"
    );
    println!(
        "{:<13} {:<11} {:<11} {:<11} {:<7} udp :53",
        "client", "request 1", "request 2", "request 3", "sticky"
    );
    let mut per_backend = vec![0u32; lab.spec().backends as usize + 1];
    for client in lab.client_addrs() {
        if stop.try_recv().is_ok() {
            println!("interrupted");
            return;
        }
        let answers: Vec<Result<String>> = (0..REQUESTS_PER_CLIENT)
            .map(|_| {
                lab.http_get(client, http, REQUEST_TIMEOUT)
                    .map(|b| b.trim().to_owned())
            })
            .collect();
        let cells: Vec<String> = answers
            .iter()
            .map(|a| match a {
                Ok(b) => b.clone(),
                Err(_) => "FAILED".to_owned(),
            })
            .collect();
        let sticky = match &answers[..] {
            [Ok(first), rest @ ..] if rest.iter().all(|a| a.as_ref().ok() == Some(first)) => {
                if let Some(i) = first
                    .strip_prefix("backend-")
                    .and_then(|n| n.parse::<usize>().ok())
                    && i < per_backend.len()
                {
                    per_backend[i] += 1;
                }
                "yes"
            }
            _ => "NO",
        };
        let udp_cell = match lab.udp_query(client, udp, REQUEST_TIMEOUT) {
            Ok((body, from)) if from == vip_udp => body.trim().to_owned(),
            Ok((body, from)) => format!("{} (reply from {from}, not the VIP!)", body.trim()),
            Err(_) => "FAILED".to_owned(),
        };
        println!(
            "{:<13} {:<11} {:<11} {:<11} {:<7} {}",
            client.to_string(),
            cells[0],
            cells[1],
            cells[2],
            sticky,
            udp_cell
        );
        for e in answers.iter().filter_map(|a| a.as_ref().err()) {
            println!("    {e:#}");
        }
    }
    let spread: Vec<String> = (1..per_backend.len())
        .map(|i| format!("backend-{i}: {}", per_backend[i]))
        .collect();
    println!("Sticky clients per backend: {}\n", spread.join(", "));
}

fn print_hints(lab: &Lab, lb_bin: &Path) {
    let cl = lab.ns_client();
    let first = lab.client_addrs()[0];
    let vip = lab.vip();
    let lb = lb_bin.display();
    let sock = lab.socket_path().display();
    println!("Poke it by hand (as root, from another terminal):");
    println!("  ip netns exec {cl} curl --interface {first} http://{vip}/");
    println!("  ip netns exec {cl} curl --interface {first} http://{vip}/   # again: same backend");
    println!("  {lb} --socket {sock} status");
    println!("  tail -f {}", lab.log_path().display());
    println!(
        "  ip -n {} -d link show eth0                       # the attached XDP program",
        lab.ns_lb()
    );
    println!(
        "  client addresses: {} .. {}; backends: {} .. {}; namespaces: {}-*",
        first,
        lab.client_addrs().last().copied().unwrap_or(first),
        lab.backend_addr(1),
        lab.backend_addr(lab.spec().backends),
        lab.prefix()
    );
    println!("\nPress Ctrl-C to stop lb and remove the lab.");
}
