//! `refex demo`: the main job, end to end, on one machine.
//!
//! Builds a development federation (four areas) in a temporary directory, starts one real
//! `refex run` process per area (QUIC on 127.0.0.1), drops the shipped sample referrals — single
//! JSON files and a daily CSV batch with two bad rows, `referred_at` set to now — into West
//! Midlands' outbox the way a provider would (temporary name, then rename), waits for each to
//! arrive, shows where each landed and what was refused, stops the daemons with SIGTERM, and
//! verifies every audit log.
//! Must not: leave processes behind (children are killed on any error path).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, SecondsFormat, Utc};

use crate::core::types::AreaId;
use crate::edge::harness::{count_inbox_files, inbox_files, wait_for, Daemon};
use crate::node::settings::Settings;

const AREAS: [&str; 4] = [
    "west-midlands",
    "greater-manchester",
    "london",
    "merseyside",
];

/// Runs the demo in `dir` (or a temporary directory that is removed afterwards): the sample
/// referrals between four areas, or with `national` the national run (`edge::national`).
pub fn run(
    dir: Option<PathBuf>,
    base_port: u16,
    national: Option<crate::edge::national::Options>,
) -> Result<()> {
    let keep = dir.is_some();
    let dir = dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("refex-demo-{}", std::process::id())));
    let result = match national {
        Some(opts) => crate::edge::national::run_in(&dir, base_port, &opts),
        None => run_in(&dir, base_port),
    };
    if keep {
        println!("\nThe federation is kept in {}", dir.display());
    } else {
        let _ = fs::remove_dir_all(&dir);
    }
    result
}

fn run_in(dir: &Path, base_port: u16) -> Result<()> {
    let areas: Vec<AreaId> = AREAS
        .iter()
        .map(|a| AreaId::parse(a))
        .collect::<Result<_, _>>()?;
    println!("1. Development federation in {}", dir.display());
    let configs = crate::edge::federation::init(dir, &areas, base_port)?;
    let settings: Vec<Settings> = configs
        .iter()
        .map(|c| Settings::load(c).map_err(|e| anyhow::anyhow!("{e}")))
        .collect::<Result<_>>()?;
    for s in &settings {
        println!(
            "   {:<20} QUIC {}  outbox {}",
            s.area,
            s.listen,
            s.paths.outbox.display()
        );
    }

    println!("2. Starting one `refex run` per area");
    let mut daemons = start_daemons(dir, &settings, &configs)?;

    let sender = &settings[0];
    let samples = referred_now(Utc::now())?;
    println!(
        "3. Dropping {} sample files into {}'s outbox (referred_at set to now)",
        samples.len(),
        sender.area
    );
    for (name, bytes) in &samples {
        daemons[0].drop_file(name, bytes)?;
        println!("   dropped {name}");
    }

    println!("4. Waiting for the referrals to arrive");
    let expected = expected_deliveries(sender, &samples);
    let count = || {
        settings
            .iter()
            .map(|s| count_inbox_files(&s.paths.inbox))
            .sum::<usize>()
    };
    let bar = crate::edge::progress::counter("   delivered", expected as u64);
    let arrived = wait_for(Duration::from_secs(60), || {
        let n = count();
        bar.set_position(n as u64);
        n >= expected && daemons[0].outbox_files().is_empty()
    });
    bar.finish_and_clear();
    if !arrived {
        bail!("only {} of {expected} referrals arrived", count());
    }
    for s in &settings {
        for f in inbox_files(&s.paths.inbox) {
            let doc: serde_json::Value = serde_json::from_slice(&fs::read(&f)?)?;
            let d = &doc["delivery"];
            println!(
                "   {:<20} ← {:<15} {:<9} due {}  ({})",
                s.area,
                d["from_area"].as_str().unwrap_or("?"),
                d["priority"].as_str().unwrap_or("?"),
                d["due_by"].as_str().unwrap_or("?"),
                f.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            );
        }
    }
    let rejected = sender.paths.outbox.join("rejected");
    for entry in fs::read_dir(&rejected).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".error.json") {
            let doc: serde_json::Value = serde_json::from_slice(&fs::read(entry.path())?)?;
            for e in doc["errors"].as_array().into_iter().flatten() {
                println!(
                    "   refused: {} row {} field {} rule {}: {}",
                    doc["file"].as_str().unwrap_or("?"),
                    e["row"],
                    e["field"].as_str().unwrap_or("?"),
                    e["rule"].as_str().unwrap_or("?"),
                    e["message"].as_str().unwrap_or("")
                );
            }
        }
    }

    println!("5. Stopping the daemons (SIGTERM)");
    let stopped = crate::edge::harness::stop_all(&mut daemons);
    for (d, status) in daemons.iter().zip(stopped) {
        let status = status?;
        println!("  {:<20} stopped ({status})", d.area);
        if !status.success() {
            bail!("{} did not exit cleanly: {status}", d.area);
        }
    }

    println!("6. Verifying every audit log");
    for s in &settings {
        let keys = s.directory.signing_keys(&s.area).unwrap_or_default();
        match crate::adapters::audit::verify(&s.paths.audit, &keys) {
            Ok(report) => println!("   {:<20} OK  {report}", s.area),
            Err(e) => bail!("{}: audit log does not verify: {e}", s.area),
        }
    }
    println!(
        "Demo finished: {expected} referrals delivered exactly once, all audit logs verified."
    );
    Ok(())
}

/// Starts one `refex run` per area (its log in `dir/AREA.log`), each serving before the next
/// starts. Each daemon is killed when dropped, so an error on any path leaves none behind.
pub(crate) fn start_daemons(
    dir: &Path,
    settings: &[Settings],
    configs: &[PathBuf],
) -> Result<Vec<Daemon>> {
    let exe = std::env::current_exe().context("cannot find the refex binary")?;
    // More daemons than cores (the national run: 43 on two): each has a slice of a core, its
    // threads seldom allocate at the same moment, and glibc's second arena (the systemd unit's
    // MALLOC_ARENA_MAX=2, for a node alone on its host) only holds memory. National 43 × 50,
    // five alternating pairs: 1,086-1,105 MiB in all against 1,109-1,115, the same wall time;
    // a node alone and busy loses ~5 % of its single-file rate with one arena.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let one_arena = settings.len() > cores;
    let mut daemons: Vec<Daemon> = settings
        .iter()
        .zip(configs)
        .map(|(s, config)| {
            let log = dir.join(format!("{}.log", s.area));
            let mut d = Daemon::new(exe.clone(), config.clone(), s.clone(), log);
            if one_arena {
                // Overrides the unit's value, which the harness gives every daemon (MALLOC_ENV).
                d.extra_env
                    .push(("MALLOC_ARENA_MAX".to_owned(), "1".to_owned()));
            }
            d
        })
        .collect();
    for d in &mut daemons {
        d.start()?;
    }
    Ok(daemons)
}

/// The shipped samples as if referred just now. Their `referred_at` is a fixed day (they are
/// the bytes providers are shown), so dropped as they are every referral would be past its due
/// time before it left (a WARN at intake and a late arrival at the other end), and a year on
/// older than intake accepts. Only valid `referred_at` values change: a row refused for another
/// field is refused as before.
fn referred_now(now: DateTime<Utc>) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let at = now.to_rfc3339_opts(SecondsFormat::Secs, true);
    let valid = |v: &str| DateTime::parse_from_rfc3339(v).is_ok();
    crate::core::samples::SAMPLES
        .iter()
        .map(|&(name, bytes)| {
            let out = if name.ends_with(".csv") {
                let mut r = ::csv::Reader::from_reader(bytes);
                let header = r.headers()?.clone();
                let col = header.iter().position(|h| h == "referred_at");
                let mut w = ::csv::Writer::from_writer(Vec::new());
                w.write_record(&header)?;
                for row in r.records() {
                    let row = row?;
                    w.write_record(row.iter().enumerate().map(|(i, v)| {
                        if Some(i) == col && valid(v) {
                            at.as_str()
                        } else {
                            v
                        }
                    }))?;
                }
                w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?
            } else {
                let mut doc: serde_json::Value = serde_json::from_slice(bytes)?;
                if doc["referred_at"].as_str().is_some_and(valid) {
                    doc["referred_at"] = at.clone().into();
                }
                serde_json::to_vec_pretty(&doc)?
            };
            Ok((name, out))
        })
        .collect::<Result<_>>()
        .with_context(|| "a shipped sample does not parse")
}

/// How many inbox files the samples should produce: every sample referral that validates and
/// routes with the sender's own configuration.
fn expected_deliveries(sender: &Settings, samples: &[(&str, Vec<u8>)]) -> usize {
    let known = |a: &AreaId| sender.directory.contains(a);
    let ctx = crate::core::referral::Context {
        routing: &sender.routing,
        calendar: &sender.calendar,
        is_known_area: &known,
    };
    let routes =
        |r: &crate::core::referral::Referral| crate::core::referral::classify(r, &ctx).is_ok();
    samples
        .iter()
        .map(|(name, bytes)| {
            if name.ends_with(".csv") {
                let limits = crate::core::referral::csv::CsvLimits {
                    max_rows: 10_000,
                    max_field_bytes: 8192,
                };
                crate::core::referral::csv::parse_csv(bytes, &limits)
                    .map(|b| {
                        b.rows
                            .iter()
                            .filter(|r| r.parsed.as_ref().is_ok_and(routes))
                            .count()
                    })
                    .unwrap_or(0)
            } else {
                usize::from(crate::core::referral::parse_json(bytes).is_ok_and(|r| routes(&r)))
            }
        })
        .sum()
}
