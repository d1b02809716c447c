//! `cargo bench --bench targets`: issue 13's targets, measured in one run, each figure printed
//! next to its target with "met" / "NOT met". Nothing is asserted: the machine is shared and
//! the figures are for the closing notes.
//!
//! 1. single-file drops: plain OpenSSH `sftp -b` batch `put` of 2,000 referral JSON files
//!    (≈2 KB each) to a private `sshd` on loopback, then the same 2,000 files dropped by rename
//!    into one area's outbox → the other area's inbox; files/s of each and the ratio
//!    (target ≥ 1.2×). Each side times only moving files that already exist: sftp's are written
//!    to its source folder first, refex's to a folder beside the outbox, from which each is
//!    renamed in (a provider writes its file either way). `REFEX_BENCH_PAIRS` (default 3) pairs
//!    are run, sftp then refex, and the verdict is the median pair's ratio: one pair lasts about
//!    a second a side, and on a shared host one pair's ratio moves by ±15 %. The sftp rows are
//!    skipped with a line saying why when `sshd`/`sftp`/`ssh-keygen` are absent. Then the floor:
//!    one delivery's public-key work timed in this process, and what 1.2× sftp leaves per file
//!    for everything else.
//! 2. drop → inbox latency at a steady 20 drops/s for 15 s (inotify on the inbox): p50 ≤ 20 ms,
//!    p99 ≤ 100 ms.
//! 3. restart with 100,000 envelopes queued: serving (`status --json` answers) within 1 s,
//!    RSS ≤ 150 MB (2 s after serving). `REFEX_BENCH_KEEP=DIR` copies the filled federation
//!    to DIR first, to profile the restart again (`refex run --config DIR/west-midlands/…`).
//! 4. drain after a peer outage: the peer is down while 50 referrals/s are dropped for
//!    `REFEX_BENCH_OUTAGE_SECS` (default 60 s → 3,000 queued; the 10 minutes would
//!    be 30,000), then the peer starts: drain rate (target ≥ 1,000/s) and whether every
//!    enhanced referral arrived before every standard one (inbox `delivery.received_at`).
//!
//! The daemons use the development federation's generated config unchanged (what
//! `refex federation init` writes), so the figures are those of a default deployment.
//! Must not: assert on speed, or touch anything outside its temp dirs.

#![allow(clippy::unwrap_used)]

#[path = "common.rs"]
mod common;
#[path = "../it/harness.rs"]
mod harness;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;

use common::{cpu_ms, idle_percent, machine_ticks, rss_kib};
use harness::{referral, referral_with, wait_until, Federation};

const AREAS: [&str; 2] = ["west-midlands", "london"];

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

/// A referral JSON file of about 2 KB (the notes padded with fake text), as in the issue,
/// referred a minute before the bench started (consent recorded eight minutes before that), as
/// a provider's drop of the day is: on time, the common case. (The test fixtures are referred
/// 15 days back so that deadline tests see late referrals; every file here was then late too,
/// with a deadline record and a warning at each end.)
fn file_2k(source_ref: &str, enhanced: bool) -> Vec<u8> {
    static NOW: std::sync::OnceLock<chrono::DateTime<Utc>> = std::sync::OnceLock::new();
    let now = *NOW.get_or_init(|| Utc::now() - chrono::Duration::minutes(1));
    let at = |t: chrono::DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut v: serde_json::Value =
        serde_json::from_str(&referral_with(source_ref, "london", "burglary", enhanced)).unwrap();
    v["referred_at"] = at(now).into();
    v["consent"]["explicit"]["recorded_at"] = at(now - chrono::Duration::minutes(8)).into();
    let len = v.to_string().len();
    let pad = 2048usize.saturating_sub(len + 1);
    v["notes"] = serde_json::Value::String(format!("Fake note for tests.{}", ".".repeat(pad)));
    v.to_string().into_bytes()
}

fn status(node: &harness::Node) -> Option<serde_json::Value> {
    status_or_error(node).ok()
}

/// `status --json`, or why it did not answer. Exit 2 is "degraded" (a peer down, as in the
/// restart and outage stages) and still carries the JSON.
fn status_or_error(node: &harness::Node) -> Result<serde_json::Value, String> {
    let (code, out, err) = node.cli(&["status", "--json"]);
    if code != 0 && code != 2 {
        return Err(format!("exit {code}: {}", err.trim()));
    }
    serde_json::from_str(&out).map_err(|e| format!("not JSON: {e}"))
}

// ---------------------------------------------------------------------------------------------
// 1. sftp baseline and refex single files

struct Sshd {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(name: &str, extra: &[&str]) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(extra.iter().copied())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A private sshd on a free loopback port: own host key, own authorized key, `-D -f config`.
fn start_sshd() -> Result<Sshd, String> {
    let sshd = which("sshd", &["/usr/sbin", "/sbin"]).ok_or("no sshd on PATH or in /usr/sbin")?;
    which("sftp", &[]).ok_or("no sftp client")?;
    which("ssh-keygen", &[]).ok_or("no ssh-keygen")?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let d = dir.path();
    for key in ["host_key", "client_key"] {
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join(key)))?;
    }
    fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).map_err(|e| e.to_string())?;
    // sshd insists on its privilege-separation directory.
    let _ = fs::create_dir_all("/run/sshd");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let config = d.join("sshd_config");
    fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nAuthorizedKeysFile {auth}\n\
             PidFile {pid}\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             UsePAM no\nPermitRootLogin yes\nSubsystem sftp internal-sftp\nLogLevel ERROR\n",
            host = d.join("host_key").display(),
            auth = d.join("authorized_keys").display(),
            pid = d.join("sshd.pid").display(),
        ),
    )
    .map_err(|e| e.to_string())?;
    let log = fs::File::create(d.join("sshd.log")).map_err(|e| e.to_string())?;
    let child = Command::new(sshd)
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("spawn sshd: {e}"))?;
    let mut s = Sshd { child, dir, port };
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(st)) = s.child.try_wait() {
            let log = fs::read_to_string(s.dir.path().join("sshd.log")).unwrap_or_default();
            return Err(format!("sshd exited ({st}): {}", log.trim()));
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err("sshd did not listen within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(s)
}

/// `sftp -b` one `put` per file into a fresh directory; files/s including the connection.
fn sftp_put(sshd: &Sshd, files: &[(String, Vec<u8>)]) -> Result<f64, String> {
    let d = sshd.dir.path();
    let src = d.join("src");
    let dst = d.join("dst");
    fs::create_dir_all(&src).map_err(|e| e.to_string())?;
    // Every pair puts new files, as the first did.
    let _ = fs::remove_dir_all(&dst);
    fs::create_dir_all(&dst).map_err(|e| e.to_string())?;
    let mut batch = String::new();
    for (name, bytes) in files {
        fs::write(src.join(name), bytes).map_err(|e| e.to_string())?;
        batch.push_str(&format!(
            "put {} {}\n",
            src.join(name).display(),
            dst.join(name).display()
        ));
    }
    fs::write(d.join("batch"), batch).map_err(|e| e.to_string())?;
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".into());
    let start = Instant::now();
    run(Command::new("sftp")
        .arg("-q")
        .arg("-b")
        .arg(d.join("batch"))
        .arg("-i")
        .arg(d.join("client_key"))
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            d.join("known_hosts").display()
        ))
        .arg("-P")
        .arg(sshd.port.to_string())
        .arg(format!("{user}@127.0.0.1")))?;
    let secs = start.elapsed().as_secs_f64();
    let arrived = fs::read_dir(&dst).map(|r| r.count()).unwrap_or(0);
    if arrived != files.len() {
        return Err(format!("sftp put {arrived} of {} files", files.len()));
    }
    Ok(files.len() as f64 / secs)
}

/// The same files dropped by rename into west-midlands' outbox (from a folder beside it, where
/// they were written before the clock started); files/s until the last is in london's inbox.
fn refex_single(files: &[(String, Vec<u8>)]) -> f64 {
    let mut fed = Federation::new(&AREAS);
    fed.start_all();
    let outbox = fed.node("west-midlands").outbox().to_path_buf();
    let staged = outbox.parent().unwrap().join("bench-staged");
    fs::create_dir_all(&staged).unwrap();
    for (name, bytes) in files {
        fs::write(staged.join(name), bytes).unwrap();
    }
    let cpu = |fed: &Federation| AREAS.map(|a| cpu_ms(fed.node(a).pid()));
    let cpu_before = cpu(&fed);
    let machine_before = machine_ticks();
    let start = Instant::now();
    for (name, _) in files {
        fs::rename(staged.join(name), outbox.join(name)).unwrap();
    }
    wait_until(Duration::from_secs(600), "all referrals to arrive", || {
        fed.node("london").inbox_count() >= files.len()
    });
    let secs = start.elapsed().as_secs_f64();
    let idle = idle_percent(machine_before, machine_ticks());
    let used: Vec<f64> = cpu(&fed)
        .iter()
        .zip(cpu_before)
        .map(|(now, then)| now.saturating_sub(then) as f64 * 1000.0 / files.len() as f64)
        .collect();
    print!(
        "refex {:.0} files/s (CPU per file {}; the machine {idle:.0} % idle)",
        files.len() as f64 / secs,
        AREAS
            .iter()
            .zip(&used)
            .map(|(a, us)| format!("{a} {us:.0} µs"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let rejected = fed.node("west-midlands").rejected_files().len();
    if rejected > 0 {
        print!(" (refex rejected {rejected} of the files: the figure is not comparable)");
    }
    files.len() as f64 / secs
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench_sftp_vs_refex(n: usize, pairs: usize) {
    let files: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| (format!("r{i}.json"), file_2k(&format!("SF-{i}"), false)))
        .collect();
    let avg = files.iter().map(|f| f.1.len()).sum::<usize>() / n;
    println!(
        "single files: {pairs} pairs of {n} files of {avg} bytes, each pair sftp (one `sftp -b` \
         batch put over loopback, connection included) then refex (renamed into an outbox → \
         the peer's inbox: signed, encrypted, durable, receipted); each side times only moving \
         files that already exist"
    );
    let sshd =
        start_sshd().map_err(|e| println!("  sftp: SKIPPED, no sftp baseline in this run: {e}"));
    let (mut sftps, mut refexes, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for pair in 1..=pairs {
        print!("  pair {pair}: ");
        let sftp = sshd.as_ref().ok().and_then(|s| {
            sftp_put(s, &files)
                .map_err(|e| print!("sftp FAILED ({e}); "))
                .ok()
        });
        if let Some(rate) = sftp {
            print!("sftp {rate:.0} files/s, ");
            sftps.push(rate);
        }
        let refex = refex_single(&files);
        refexes.push(refex);
        match sftp {
            Some(rate) => {
                ratios.push(refex / rate);
                println!(": {:.2}x", refex / rate);
            }
            None => println!(),
        }
    }
    let refex = median(refexes);
    println!("refex: median of {pairs} runs {refex:.0} files/s");
    let sftp = (!sftps.is_empty()).then(|| median(sftps));
    if let Some(sftp) = sftp {
        println!("sftp: median of {} runs {sftp:.0} files/s", ratios.len());
        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().copied().fold(0.0, f64::max);
        let ratio = median(ratios);
        println!(
            "  ratio refex / sftp: median pair {ratio:.2}x (pairs {lo:.2}-{hi:.2}x) (target >= 1.2x: {})",
            verdict(ratio >= 1.2)
        );
    }
    // The floor: what the public-key work alone costs on this machine, and what 1.2x sftp
    // leaves for everything else.
    // The federation the bench starts seals version-2 envelopes (a shared HPKE context).
    let us = common::delivery_crypto_us(500, 2);
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as f64;
    println!(
        "  public-key work per delivery, both ends (timed here, one core): {us:.0} µs; alone it \
         allows {:.0} files/s on {cores} cores",
        cores * 1e6 / us
    );
    println!(
        "    per step, µs of one core: {}",
        common::crypto_steps_line(500, 2)
    );
    if let Some(sftp) = sftp {
        let budget = cores * 1e6 / (1.2 * sftp);
        println!(
            "  1.2x sftp = {:.0} files/s: {budget:.0} µs of all cores per file for everything \
             (both daemons, the kernel, this bench), {:.0} µs of it left after the public-key work",
            1.2 * sftp,
            budget - us
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. latency at 20 drops/s

/// Watches `dir` with inotify; for each `*.json` that appears, records (source_ref, when).
fn watch_inbox(dir: PathBuf, seen: Arc<Mutex<HashMap<String, Instant>>>, stop: Arc<Mutex<bool>>) {
    use inotify::{Inotify, WatchMask};
    let mut ino = Inotify::init().unwrap();
    ino.watches()
        .add(&dir, WatchMask::MOVED_TO | WatchMask::CLOSE_WRITE)
        .unwrap();
    let mut buf = [0u8; 64 * 1024];
    while !*stop.lock().unwrap() {
        let events = match ino.read_events(&mut buf) {
            Ok(ev) => ev.collect::<Vec<_>>(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(e) => panic!("inotify: {e}"),
        };
        let now = Instant::now();
        for ev in events {
            let Some(name) = ev.name.map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            if !name.ends_with(".json") || name.starts_with('.') {
                continue;
            }
            let doc: Option<serde_json::Value> = fs::read(dir.join(&name))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(r) = doc.as_ref().and_then(|d| d["source_ref"].as_str()) {
                seen.lock().unwrap().entry(r.to_owned()).or_insert(now);
            }
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn bench_latency(rate: u32, secs: u32) {
    let mut fed = Federation::new(&AREAS);
    fed.start_all();
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let stop = Arc::new(Mutex::new(false));
    let watcher = {
        let (dir, seen, stop) = (
            fed.node("london").inbox().to_owned(),
            seen.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || watch_inbox(dir, seen, stop))
    };
    // Warm-up: one referral so the connection is up before the measured drops.
    fed.node("west-midlands")
        .drop_file("warm.json", referral("LAT-WARM", "london").as_bytes());
    wait_until(Duration::from_secs(60), "the warm-up referral", || {
        seen.lock().unwrap().contains_key("LAT-WARM")
    });
    let n = (rate * secs) as usize;
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut dropped = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let due = start + period * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let r = format!("LAT-{i}");
        fed.node("west-midlands")
            .drop_file(&format!("l{i}.json"), referral(&r, "london").as_bytes());
        dropped.push((r, Instant::now()));
    }
    let achieved = n as f64 / start.elapsed().as_secs_f64();
    wait_until(Duration::from_secs(120), "every latency referral", || {
        seen.lock().unwrap().len() > n
    });
    *stop.lock().unwrap() = true;
    watcher.join().unwrap();
    let seen = seen.lock().unwrap();
    let mut ms: Vec<f64> = dropped
        .iter()
        .map(|(r, t)| seen[r].saturating_duration_since(*t).as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&ms, 0.50), percentile(&ms, 0.99));
    println!(
        "latency: {n} drops by rename at {achieved:.1}/s, drop → inbox file (inotify): p50 {p50:.1} ms (target <= 20 ms: {}), p99 {p99:.1} ms (target <= 100 ms: {}), max {:.1} ms",
        verdict(p50 <= 20.0),
        verdict(p99 <= 100.0),
        ms[ms.len() - 1]
    );
}

// ---------------------------------------------------------------------------------------------
// 3. restart with 100,000 queued

async fn bench_restart(n: u32) {
    let mut fed = Federation::new(&AREAS);
    let wm = fed.node("west-midlands");
    common::fill(wm, n).await;
    if let Ok(keep) = std::env::var("REFEX_BENCH_KEEP") {
        let copied = Command::new("cp")
            .arg("-a")
            .arg(fed.dir.path())
            .arg(&keep)
            .status()
            .is_ok_and(|s| s.success());
        println!("filled federation copied to {keep}: {copied}");
    }
    let start = Instant::now();
    fed.node_mut("west-midlands").start();
    let socket = start.elapsed();
    let mut last_error = String::new();
    let mut answer = None;
    let mut call = Duration::ZERO;
    while start.elapsed() < Duration::from_secs(60) {
        let t = Instant::now();
        let r = status_or_error(fed.node("west-midlands"));
        call = t.elapsed();
        match r {
            Ok(s) => {
                answer = Some(s);
                break;
            }
            Err(e) => last_error = e,
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let serving = start.elapsed();
    let Some(answer) = answer else {
        println!(
            "restart with {n} queued: control socket after {:.3} s, but `status --json` did not answer within 60 s (target serving <= 1 s: NOT met); last error: {last_error}",
            socket.as_secs_f64()
        );
        return;
    };
    let queued = answer["peers"]["london"]["queued"].as_u64().unwrap_or(0);
    let pid = fed.node("west-midlands").pid();
    std::thread::sleep(Duration::from_secs(2));
    let (rss, hwm) = (rss_kib(pid, "VmRSS:"), rss_kib(pid, "VmHWM:"));
    let mb = |kib: u64| kib as f64 * 1024.0 / 1e6;
    println!(
        "restart with {n} queued (status says {queued}, peer down): control socket after {:.3} s, `status --json` answered after {:.3} s (that call itself {:.3} s, CLI start included) (target <= 1 s: {}); RSS {:.0} MB, peak {:.0} MB (target <= 150 MB: {})",
        socket.as_secs_f64(),
        serving.as_secs_f64(),
        call.as_secs_f64(),
        verdict(serving <= Duration::from_secs(1)),
        mb(rss),
        mb(hwm),
        verdict(mb(hwm) <= 150.0)
    );
}

// ---------------------------------------------------------------------------------------------
// 4. drain after an outage

fn bench_drain(rate: u32, secs: u32) {
    let mut fed = Federation::new(&AREAS);
    fed.node_mut("west-midlands").start();
    let n = (rate * secs) as usize;
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let start = Instant::now();
    let mut enhanced = HashSet::new();
    for i in 0..n {
        let due = start + period * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        // One in seven enhanced, as in the restart stage.
        let r = format!("DR-{i}");
        let e = i % 7 == 0;
        if e {
            enhanced.insert(r.clone());
        }
        fed.node("west-midlands")
            .drop_file(&format!("d{i}.json"), file_2k(&r, e).as_slice());
    }
    wait_until(Duration::from_secs(300), "the outbox to be taken", || {
        status(fed.node("west-midlands"))
            .and_then(|s| s["peers"]["london"]["queued"].as_u64())
            .is_some_and(|q| q as usize >= n)
    });
    let outage = start.elapsed().as_secs_f64();
    let peer_start = Instant::now();
    fed.node_mut("london").start();
    let mut first = None;
    wait_until(Duration::from_secs(900), "the backlog to drain", || {
        let have = fed.node("london").inbox_count();
        if have > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        have >= n
    });
    let all = peer_start.elapsed().as_secs_f64();
    let from_first = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(all);
    // Order by the receiver's own clock.
    let mut times: Vec<(chrono::DateTime<Utc>, bool)> = fed
        .node("london")
        .inbox_docs()
        .iter()
        .map(|d| {
            let at = d["delivery"]["received_at"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .unwrap()
                .with_timezone(&Utc);
            (
                at,
                enhanced.contains(d["source_ref"].as_str().unwrap_or("")),
            )
        })
        .collect();
    times.sort();
    let last_enhanced = times.iter().rposition(|t| t.1);
    let standard_before = last_enhanced
        .map(|i| times[..i].iter().filter(|t| !t.1).count())
        .unwrap_or(0);
    let rate_all = n as f64 / all;
    let rate_first = n as f64 / from_first.max(1e-3);
    println!(
        "drain: {n} queued during a {outage:.0} s outage at {rate}/s ({} enhanced; the issue's 10 minutes would be {}); peer started, all in its inbox after {all:.2} s: {rate_all:.0}/s from peer start, {rate_first:.0}/s from the first arrival (target >= 1,000/s: {})",
        enhanced.len(),
        rate as usize * 600,
        verdict(rate_first >= 1000.0)
    );
    let head = times.iter().take(enhanced.len()).filter(|t| t.1).count();
    println!(
        "  enhanced first: {standard_before} standard referrals arrived before the last enhanced one, {head} of the first {} arrivals were enhanced (target: 0 standard first: {})",
        enhanced.len(),
        verdict(standard_before == 0)
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let outage: u32 = std::env::var("REFEX_BENCH_OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "targets bench: {cores} cores, load average {} at start",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    common::use_shipped_daemon();
    // REFEX_BENCH_ONLY=sftp,latency,restart,drain runs only the stages named.
    let only = std::env::var("REFEX_BENCH_ONLY").unwrap_or_default();
    let on = |stage: &str| only.is_empty() || only.split(',').any(|s| s.trim() == stage);
    if on("sftp") {
        let pairs = std::env::var("REFEX_BENCH_PAIRS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&p| p > 0)
            .unwrap_or(3);
        bench_sftp_vs_refex(2_000, pairs);
    }
    if on("latency") {
        bench_latency(20, 15);
    }
    if on("restart") {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(bench_restart(100_000));
    }
    if on("drain") {
        bench_drain(50, outage);
    }
}
