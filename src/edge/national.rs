//! `refex demo --areas N`: the national run on one machine.
//!
//! A development federation of the first N of the 43 police areas of England and Wales
//! (`config/areas.toml`), one real `refex run` process per area on 127.0.0.1, every area sending
//! `per_pair` referrals to every other area: one CSV batch per (sender, receiver) pair, dropped the
//! way a provider would (temporary name, then rename). It waits until every inbox holds what it
//! should, then checks every delivery arrived exactly once (each inbox file's `delivery.from_area`
//! and `source_ref`, no repeat, none missing), stops the daemons with SIGTERM and verifies every
//! audit log. It prints the wall time from the first drop to the last arrival, deliveries per
//! second, and per node: peak and current RSS, open QUIC connections, live tasks and threads,
//! and what it costs at rest once every delivery is in (wake-ups and CPU per second).
//! Must not: leave processes behind (each [`Daemon`] is killed when dropped), or report a figure
//! it did not measure.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::Utc;

use crate::core::types::AreaId;
use crate::edge::harness::{count_inbox_files, cpu_secs, inbox_files, Daemon};
use crate::node::settings::Settings;

/// How long the nodes are watched at rest once every delivery is in.
const REST_WINDOW: Duration = Duration::from_secs(5);

/// The 43 areas, as refex area ids.
pub const AREAS_TOML: &str = include_str!("../../config/areas.toml");

/// What the national run does.
#[derive(Clone, Debug)]
pub struct Options {
    /// How many areas (2..=43), taken in the order of `config/areas.toml`.
    pub areas: usize,
    /// Referrals each area sends to each other area.
    pub per_pair: usize,
    /// How long to wait for every delivery before giving up.
    pub limit: Duration,
}

/// The area ids of `config/areas.toml`.
pub fn all_areas() -> Result<Vec<AreaId>> {
    #[derive(serde::Deserialize)]
    struct File {
        areas: Vec<String>,
    }
    let f: File = toml::from_str(AREAS_TOML).context("config/areas.toml")?;
    f.areas
        .iter()
        .map(|a| AreaId::parse(a).map_err(|e| anyhow::anyhow!("config/areas.toml: {e}")))
        .collect()
}

/// One node's figures at the end of the run.
struct NodeFigures {
    area: AreaId,
    peak_rss_kib: u64,
    rss_kib: u64,
    threads: u64,
    connections: Option<u64>,
    tasks: Option<u64>,
    /// User + system CPU seconds since the daemon started.
    cpu_secs: f64,
    store_syncs: u64,
    audit_syncs: u64,
    /// Context switches of its threads alive at the end of the run.
    switches: u64,
}

/// Runs the national federation in `dir` (created; it must not hold a federation already).
pub fn run_in(dir: &Path, base_port: u16, opts: &Options) -> Result<()> {
    let all = all_areas()?;
    if opts.areas < 2 || opts.areas > all.len() {
        bail!("--areas must be between 2 and {}", all.len());
    }
    if opts.per_pair == 0 || opts.per_pair > 10_000 {
        bail!("--per-pair must be between 1 and 10000 (one CSV batch per pair)");
    }
    let areas = &all[..opts.areas];
    let n = areas.len();
    let expected = n * (n - 1) * opts.per_pair;
    println!(
        "1. National federation of {n} areas in {} ({} referrals per pair, {expected} deliveries)",
        dir.display(),
        opts.per_pair
    );
    let configs = crate::edge::federation::init(dir, areas, base_port)?;
    let settings: Vec<Settings> = configs
        .iter()
        .map(|c| Settings::load(c).map_err(|e| anyhow::anyhow!("{e}")))
        .collect::<Result<_>>()?;

    println!("2. Starting one `refex run` per area");
    let started = Instant::now();
    let mut daemons = crate::edge::demo::start_daemons(dir, &settings, &configs)?;
    println!(
        "   {n} daemons serving after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Made before the clock starts: the run measures refex, not this generator.
    let batches: Vec<(usize, String, Vec<u8>)> = (0..n)
        .flat_map(|s| (0..n).filter(move |&d| d != s).map(move |d| (s, d)))
        .map(|(s, d)| {
            let name = format!("national-{}-to-{}.csv", areas[s], areas[d]);
            (s, name, batch(s, d, &areas[d], opts.per_pair))
        })
        .collect();
    println!(
        "3. Dropping {} CSV batches ({} per area)",
        batches.len(),
        n - 1
    );
    let lo_before = loopback_tx();
    let t0 = Instant::now();
    for (s, name, bytes) in &batches {
        daemons[*s].drop_file(name, bytes)?;
    }
    let dropped = t0.elapsed();

    println!("4. Waiting for {expected} deliveries");
    let bar = crate::edge::progress::counter("   delivered", expected as u64);
    let count = || {
        settings
            .iter()
            .map(|s| count_inbox_files(&s.paths.inbox))
            .sum::<usize>()
    };
    let mut last_report = Instant::now();
    let wall = loop {
        let got = count();
        bar.set_position(got as u64);
        if got >= expected {
            break t0.elapsed();
        }
        if t0.elapsed() > opts.limit {
            bar.finish_and_clear();
            bail!(
                "only {got} of {expected} deliveries after {:?}; logs in {}",
                opts.limit,
                dir.display()
            );
        }
        if !crate::edge::progress::enabled() && last_report.elapsed() > Duration::from_secs(10) {
            println!(
                "   {got} of {expected} after {:.0} s",
                t0.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    bar.finish_and_clear();
    let lo_sent = loopback_tx()
        .zip(lo_before)
        .map(|((a, p), (b, q))| (a.saturating_sub(b), p.saturating_sub(q)));

    let figures: Vec<NodeFigures> = daemons.iter().map(node_figures).collect::<Result<_>>()?;

    println!("5. Checking every delivery arrived exactly once");
    check_exactly_once(&settings, areas, opts.per_pair)?;
    for d in &daemons {
        if !d.outbox_files().is_empty() {
            bail!("{}: files left in the outbox", d.area);
        }
        if !d.rejected_files().is_empty() {
            bail!("{}: files refused; see its outbox/rejected/", d.area);
        }
    }

    println!(
        "6. Measuring the nodes at rest for {} s",
        REST_WINDOW.as_secs()
    );
    let (rest, rest_packets) = at_rest(&daemons, REST_WINDOW);

    println!("7. Stopping the daemons (SIGTERM) and verifying every audit log");
    let stopped = crate::edge::harness::stop_all(&mut daemons);
    for (d, status) in daemons.iter().zip(stopped) {
        let status = status?;
        if !status.success() {
            bail!("{} did not exit cleanly: {status}", d.area);
        }
    }
    for s in &settings {
        let keys = s.directory.signing_keys(&s.area).unwrap_or_default();
        crate::adapters::audit::verify(&s.paths.audit, &keys)
            .map_err(|e| anyhow::anyhow!("{}: audit log does not verify: {e}", s.area))?;
    }

    print_figures(&figures, &rest);
    let n_rest = rest.len().max(1) as f64;
    println!(
        "   at rest (every delivery in, {} s): per node {:.0} wake-ups/s and {:.1} ms of CPU per \
         second on average{}",
        REST_WINDOW.as_secs(),
        rest.iter().map(|r| r.0).sum::<f64>() / n_rest,
        rest.iter().map(|r| r.1).sum::<f64>() / n_rest,
        rest_packets.map_or(String::new(), |p| format!(
            ", {:.0} loopback packets/s (keep-alives and their acknowledgements)",
            p / n_rest
        ))
    );
    let mib = |k: u64| k as f64 / 1024.0;
    let total: u64 = figures.iter().map(|f| f.peak_rss_kib).sum();
    let largest = figures
        .iter()
        .max_by_key(|f| f.peak_rss_kib)
        .map(|f| (f.area.to_string(), f.peak_rss_kib))
        .unwrap_or_default();
    let cpu: f64 = figures.iter().map(|f| f.cpu_secs).sum();
    let syncs: u64 = figures.iter().map(|f| f.store_syncs + f.audit_syncs).sum();
    println!(
        "   per delivery (both ends): {:.2} ms CPU, {:.2} store+audit syncs",
        cpu * 1000.0 / expected as f64,
        syncs as f64 / expected as f64
    );
    let switches: u64 = figures.iter().map(|f| f.switches).sum();
    println!(
        "   context switches (every thread of every node alive at the end): {:.1} per delivery",
        switches as f64 / expected as f64
    );
    if let Some((bytes, packets)) = lo_sent {
        println!(
            "   sent on loopback during the run (every process on lo, QUIC and UDP headers \
             included): {:.0} bytes and {:.1} packets per delivery",
            bytes as f64 / expected as f64,
            packets as f64 / expected as f64
        );
    }
    println!(
        "National run: {n} areas, {expected} deliveries exactly once in {:.1} s \
         ({:.0} deliveries/s; drops took {:.2} s); peak RSS {:.0} MiB in all, largest node \
         {} {:.1} MiB; all audit logs verified.",
        wall.as_secs_f64(),
        expected as f64 / wall.as_secs_f64(),
        dropped.as_secs_f64(),
        mib(total),
        largest.0,
        mib(largest.1),
    );
    Ok(())
}

/// One (sender, receiver) batch: `rows` referrals for `to`, each with a source_ref naming the
/// pair and its number (so the check can tell a missing one from a repeat). Fake values only.
fn batch(from: usize, to: usize, to_area: &AreaId, rows: usize) -> Vec<u8> {
    let now = Utc::now();
    let referred =
        (now - chrono::Duration::minutes(5)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let offence = (now - chrono::Duration::days(1)).format("%Y-%m-%d");
    let mut out = String::from(
        "source_system,source_ref,referring_org,referred_at,residence_area,residence_postcode,\
         victim_name,victim_date_of_birth,victim_phone,victim_email,victim_address,\
         preferred_language,needs,offence_category,crime_ref,offence_date,most_serious_crime,\
         persistently_targeted,vulnerable_or_intimidated,consent_referral,explicit_consent,\
         consent_recorded_by,consent_recorded_at,incident,notes\n",
    );
    for k in 0..rows {
        // Every tenth referral is enhanced, so both priority classes travel.
        let enhanced = if k % 10 == 0 { "yes" } else { "no" };
        out.push_str(&format!(
            "national-demo,{},Demo Police,{referred},{to_area},,Demo Person,1970-01-01,\
             07700 900000,,,en,,theft,DEMO-{from}-{to},{offence},{enhanced},no,no,yes,,,,,\n",
            source_ref(from, to, k)
        ));
    }
    out.into_bytes()
}

fn source_ref(from: usize, to: usize, k: usize) -> String {
    format!("NAT-{from}-{to}-{k}")
}

/// Every inbox holds, from every other area, each of its `per_pair` referrals once.
fn check_exactly_once(settings: &[Settings], areas: &[AreaId], per_pair: usize) -> Result<()> {
    let index: BTreeMap<&str, usize> = areas
        .iter()
        .enumerate()
        .map(|(i, a)| (a.as_str(), i))
        .collect();
    for (to, s) in settings.iter().enumerate() {
        let mut seen: BTreeMap<String, u32> = BTreeMap::new();
        for f in inbox_files(&s.paths.inbox) {
            let doc: serde_json::Value = serde_json::from_slice(&fs::read(&f)?)
                .with_context(|| format!("{}", f.display()))?;
            let from = doc["delivery"]["from_area"].as_str().unwrap_or_default();
            let r = doc["source_ref"].as_str().unwrap_or_default();
            let Some(&fi) = index.get(from) else {
                bail!(
                    "{}: {} comes from unknown area '{from}'",
                    s.area,
                    f.display()
                );
            };
            if !r.starts_with(&format!("NAT-{fi}-{to}-")) {
                bail!(
                    "{}: {} carries '{r}', not one sent to it",
                    s.area,
                    f.display()
                );
            }
            *seen.entry(r.to_owned()).or_default() += 1;
        }
        for (r, times) in &seen {
            if *times > 1 {
                bail!("{}: {r} delivered {times} times", s.area);
            }
        }
        for from in (0..areas.len()).filter(|&f| f != to) {
            for k in 0..per_pair {
                if !seen.contains_key(&source_ref(from, to, k)) {
                    bail!(
                        "{}: {} from {} never arrived",
                        s.area,
                        source_ref(from, to, k),
                        areas[from]
                    );
                }
            }
        }
    }
    Ok(())
}

/// Bytes and packets sent on the loopback interface so far by every process, when Linux says
/// (a packet is one send: quinn hands the kernel one datagram, or several at once with GSO).
fn loopback_tx() -> Option<(u64, u64)> {
    let read = |what: &str| -> Option<u64> {
        fs::read_to_string(format!("/sys/class/net/lo/statistics/{what}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some((read("tx_bytes")?, read("tx_packets")?))
}

/// Context switches, voluntary and not, of the threads of `pid` alive now (a blocking-pool
/// thread that has ended took its count with it, so this is a lower bound).
fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// What each node costs with nothing to do (every delivery done): context switches per second
/// (every wake-up of a thread: timers firing, keep-alives arriving, periodic work) and CPU
/// milliseconds per second, over `window` (CPU time is counted in clock ticks, 10 ms each, so a
/// node's figure is coarse; their average is not); and the loopback packets per second of all
/// of them. tokio keeps no count of armed timers, so this measures what they cost instead.
fn at_rest(daemons: &[Daemon], window: Duration) -> (Vec<(f64, f64)>, Option<f64>) {
    let pids: Vec<Option<u32>> = daemons.iter().map(Daemon::pid).collect();
    let read = |pid: &Option<u32>| pid.map_or((0, 0.0), |p| (context_switches(p), cpu_secs(p)));
    let before: Vec<_> = pids.iter().map(read).collect();
    let lo_before = loopback_tx();
    let start = Instant::now();
    std::thread::sleep(window);
    let after: Vec<_> = pids.iter().map(read).collect();
    let secs = start.elapsed().as_secs_f64();
    let packets = loopback_tx()
        .zip(lo_before)
        .map(|((_, p), (_, q))| p.saturating_sub(q) as f64 / secs);
    let rates = before
        .iter()
        .zip(&after)
        .map(|((s0, c0), (s1, c1))| {
            (
                s1.saturating_sub(*s0) as f64 / secs,
                (c1 - c0).max(0.0) * 1000.0 / secs,
            )
        })
        .collect();
    (rates, packets)
}

/// Reads `/proc/PID/status` and asks the daemon's control socket for its runtime counts.
fn node_figures(d: &Daemon) -> Result<NodeFigures> {
    let pid = d
        .pid()
        .with_context(|| format!("{} is not running", d.area))?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("{}: /proc/{pid}/status", d.area))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let reply = control_status(&d.settings.control_socket).unwrap_or_default();
    let runtime = &reply["runtime"];
    Ok(NodeFigures {
        area: d.area.clone(),
        peak_rss_kib: field("VmHWM:"),
        rss_kib: field("VmRSS:"),
        threads: field("Threads:"),
        connections: runtime["connections"].as_u64(),
        tasks: runtime["tasks"].as_u64(),
        cpu_secs: cpu_secs(pid),
        store_syncs: reply["syncs"]["store"].as_u64().unwrap_or(0),
        audit_syncs: reply["syncs"]["audit"].as_u64().unwrap_or(0),
        switches: context_switches(pid),
    })
}

fn control_status(socket: &Path) -> Option<serde_json::Value> {
    let req = crate::node::control::Request::new("status");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(crate::node::control::call_within(
        socket,
        &req,
        crate::node::control::ANSWER_LIMIT,
    ))
    .ok()
}

/// One row per node; `rest` is each node's wake-ups and CPU milliseconds per second at rest.
fn print_figures(figures: &[NodeFigures], rest: &[(f64, f64)]) {
    let mib = |k: u64| k as f64 / 1024.0;
    let opt = |v: Option<u64>| v.map_or("?".to_owned(), |v| v.to_string());
    println!(
        "   {:<20} {:>9} {:>9} {:>11} {:>6} {:>8} {:>8} {:>11} {:>11} {:>14} {:>12}",
        "area",
        "peak MiB",
        "now MiB",
        "connections",
        "tasks",
        "threads",
        "CPU s",
        "store syncs",
        "audit syncs",
        "rest wakeups/s",
        "rest CPU ms/s"
    );
    for (f, (wakeups, cpu_ms)) in figures.iter().zip(rest) {
        println!(
            "   {:<20} {:>9.1} {:>9.1} {:>11} {:>6} {:>8} {:>8.1} {:>11} {:>11} {:>14.0} {:>12.1}",
            f.area,
            mib(f.peak_rss_kib),
            mib(f.rss_kib),
            opt(f.connections),
            opt(f.tasks),
            f.threads,
            f.cpu_secs,
            f.store_syncs,
            f.audit_syncs,
            wakeups,
            cpu_ms
        );
    }
}
