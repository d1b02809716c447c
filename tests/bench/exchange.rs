//! `cargo bench --bench exchange`: figures for the closing notes, printed, never asserted.
//!
//! 1. seal → verify → decrypt of one referral (library, per second); then one whole delivery's
//!    public-key work, both ends with the signed receipt (µs of one core), and the deliveries
//!    per second it alone allows on this machine's cores — the floor under every other figure.
//! 2. store durability: one sync per envelope (baseline) vs group commit, envelopes per second
//!    and the ratio.
//! 3. end to end between two real daemons over QUIC on loopback: referrals per second from
//!    outbox drop to the last inbox file, single JSON files and CSV batches, with each daemon's
//!    CPU, syncs and peak RSS.
//! 4. startup with 100,000 envelopes queued: time until the control socket answers, and RSS.
//! 5. intake's plan (parse, validate, route, classify) in this process: time and heap
//!    allocations per referral, for a 100-row CSV batch and a single JSON file. Allocations are
//!    counted exactly (this binary's allocator counts them), so a change shows without noise.
//! 6. stage 3 for one large CSV batch (20,000 rows in one file): what a provider's whole daily
//!    export in one file costs, its peak RSS above all.

#![allow(clippy::unwrap_used)]

#[path = "common.rs"]
mod common;
#[path = "../it/harness.rs"]
mod harness;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use refex::adapters::store::{NewEnvelope, Store};
use refex::core::types::{AreaId, EnvelopeId, PriorityClass};

use common::{cpu_ms, idle_percent, machine_ticks, rss_kib};
use harness::{referral, wait_until, Federation};

/// The system allocator, counting allocations (stage 5 reads the count around its loop).
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed on unchanged to the system allocator; only a counter is added.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A CSV batch of `rows` referrals to London, source refs `PREFIX-0`, `PREFIX-1`, ...
fn csv_batch(prefix: &str, rows: usize) -> String {
    let rows: Vec<(String, &str)> = (0..rows)
        .map(|i| (format!("{prefix}-{i}"), "london"))
        .collect();
    harness::theft_csv("bench", &rows)
}

/// Stage 5: intake's plan of a 100-row CSV batch and of one JSON file, per referral.
fn bench_plan() {
    use refex::core::calendar::Calendar;
    use refex::core::plan::{plan, Format};
    use refex::core::referral::{csv::CsvLimits, Context};
    use refex::core::routing::RoutingTable;
    let routing = RoutingTable::from_toml(include_str!("../../config/postcodes.toml")).unwrap();
    let calendar = Calendar::from_toml(include_str!("../../config/bank-holidays.toml")).unwrap();
    let known = |_: &AreaId| true;
    let ctx = Context {
        routing: &routing,
        calendar: &calendar,
        is_known_area: &known,
    };
    let limits = CsvLimits {
        max_rows: 10_000,
        max_field_bytes: 8192,
    };
    let csv = csv_batch("P", 100);
    let json = referral("P-JSON", "london");
    for (what, format, bytes, per_file) in [
        ("a CSV batch of 100", Format::Csv, csv.as_bytes(), 100),
        ("a single JSON file", Format::Json, json.as_bytes(), 1),
    ] {
        let files = 20_000 / per_file;
        let (allocs, start) = (ALLOCATIONS.load(Ordering::Relaxed), Instant::now());
        for _ in 0..files {
            std::hint::black_box(plan(format, "f", bytes, &ctx, &limits, Utc::now()));
        }
        let n = (files * per_file) as f64;
        println!(
            "plan ({what}): {:.1} µs and {:.1} heap allocations per referral",
            start.elapsed().as_secs_f64() * 1e6 / n,
            (ALLOCATIONS.load(Ordering::Relaxed) - allocs) as f64 / n
        );
    }
}

fn bench_crypto() {
    let n = 2_000;
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    // Version 1 (an HPKE key per envelope) is the baseline; 2 shares one context.
    for (version, what) in [(1, "v1, own HPKE key"), (2, "v2, shared context")] {
        let c = common::DeliveryCrypto::new(version);
        let start = Instant::now();
        for _ in 0..n {
            c.envelope();
        }
        let per_sec = n as f64 / start.elapsed().as_secs_f64();
        println!(
            "crypto ({what}): seal+verify+decrypt of a {}-byte referral: {per_sec:.0}/s",
            c.payload.len()
        );
        let us = common::delivery_crypto_us(n, version);
        println!(
            "crypto ({what}): one whole delivery (seal, sign, verify, open; receipt sign and \
             verify): {us:.0} µs of one core; alone it caps {cores} cores at {:.0} deliveries/s",
            cores as f64 * 1e6 / us
        );
        println!(
            "crypto ({what}): per step, µs of one core: {}",
            common::crypto_steps_line(n, version)
        );
    }
}

async fn bench_store() {
    let to: AreaId = "london".parse().unwrap();
    let env = |i: u32| {
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(&i.to_be_bytes());
        (
            NewEnvelope {
                id: EnvelopeId::generate(),
                to: to.clone(),
                priority: PriorityClass::Standard,
                due_by: Utc::now(),
                created: Utc::now(),
                sealed: vec![0u8; 2048],
                digest: [0; 32],
                subject_key: None,
            },
            key,
        )
    };
    let n = 1_000u32;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let start = Instant::now();
    for i in 0..n {
        let (e, k) = env(i);
        let id = store.enqueue(e, &k).unwrap().id();
        store.release(&[id]).unwrap();
        store.durable().await.unwrap();
    }
    let one_by_one = n as f64 / start.elapsed().as_secs_f64();
    let syncs_one = store.sync_count();

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let store = store.clone();
        let (e, k) = env(i);
        tasks.push(tokio::spawn(async move {
            let id = store.enqueue(e, &k).unwrap().id();
            store.release(&[id]).unwrap();
            store.durable().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let grouped = n as f64 / start.elapsed().as_secs_f64();
    println!(
        "store: durable enqueue, one sync per envelope {one_by_one:.0}/s ({syncs_one} syncs) vs group commit {grouped:.0}/s ({} syncs): {:.1}x",
        store.sync_count(),
        grouped / one_by_one
    );
}

fn bench_end_to_end(n: usize, batch: usize) {
    let mut fed = Federation::with_config(
        &["west-midlands", "london"],
        &format!(
            "[intake]\nsettle_ms = 50\nrescan_ms = 1000\n{}",
            std::env::var("REFEX_BENCH_EXTRA").unwrap_or_default()
        ),
    );
    fed.start_all();
    let syncs = |fed: &Federation, area: &str| -> (u64, u64, u64) {
        let (_, out, _) = fed.node(area).cli(&["status", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        (
            v["syncs"]["store"].as_u64().unwrap_or(0),
            v["syncs"]["audit"].as_u64().unwrap_or(0),
            v["syncs"]["inbox_dir"].as_u64().unwrap_or(0),
        )
    };
    let before = [syncs(&fed, "west-midlands"), syncs(&fed, "london")];
    let cpu = |fed: &Federation, area: &str| cpu_ms(fed.node(area).pid());
    let cpu_before = [cpu(&fed, "west-midlands"), cpu(&fed, "london")];
    let machine_before = machine_ticks();
    let start = Instant::now();
    if batch == 1 {
        for i in 0..n {
            fed.node("west-midlands").drop_file(
                &format!("r{i}.json"),
                referral(&format!("E2E-{i}"), "london").as_bytes(),
            );
        }
    } else {
        for b in 0..n / batch {
            let csv = csv_batch(&format!("B-{b}"), batch);
            fed.node("west-midlands")
                .drop_file(&format!("b{b}.csv"), csv.as_bytes());
        }
    }
    wait_until(Duration::from_secs(600), "all referrals to arrive", || {
        fed.node("london").inbox_count() >= n
    });
    let secs = start.elapsed().as_secs_f64();
    let idle = idle_percent(machine_before, machine_ticks());
    let cpu_used = [
        cpu(&fed, "west-midlands").saturating_sub(cpu_before[0]),
        cpu(&fed, "london").saturating_sub(cpu_before[1]),
    ];
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let what = if batch == 1 {
        "single JSON files".to_owned()
    } else {
        format!("CSV batches of {batch}")
    };
    println!(
        "end to end: {n} referrals as {what}: {secs:.2} s, {:.0} referrals/s",
        n as f64 / secs
    );
    let per_ref = |ms: u64| ms as f64 * 1000.0 / n as f64;
    println!(
        "  CPU per referral ({what}): sender {:.0} µs + receiver {:.0} µs (user + system, until the last inbox file; {cores} cores give {:.0} µs per referral at this rate, {idle:.0} % of them idle)",
        per_ref(cpu_used[0]),
        per_ref(cpu_used[1]),
        cores as f64 * 1e6 * secs / n as f64
    );
    // Sampled once every inbox file is there: the last receipts may still be on their way.
    let per = |now: (u64, u64, u64), then: (u64, u64, u64)| {
        (
            (now.0 - then.0) as f64 / n as f64,
            (now.1 - then.1) as f64 / n as f64,
            (now.2 - then.2) as f64 / n as f64,
        )
    };
    let (ws, wa, _) = per(syncs(&fed, "west-midlands"), before[0]);
    let (ls, la, ld) = per(syncs(&fed, "london"), before[1]);
    println!(
        "  syncs per referral ({what}): sender {ws:.2} store + {wa:.2} audit, receiver {ls:.2} store + {la:.2} audit + {ld:.2} inbox directory (+ 1 inbox file each)"
    );
    let peak = |area: &str| rss_kib(fed.node(area).pid(), "VmHWM:") as f64 / 1024.0;
    println!(
        "  peak RSS ({what}): sender {:.1} MiB, receiver {:.1} MiB",
        peak("west-midlands"),
        peak("london")
    );
}

async fn bench_startup(n: u32) {
    let mut fed = Federation::new(&["west-midlands", "london"]);
    let wm = fed.node("west-midlands");
    common::fill(wm, n).await;
    let start = Instant::now();
    fed.node_mut("west-midlands").start();
    let serving = start.elapsed();
    let pid = fed.node("west-midlands").pid();
    std::thread::sleep(Duration::from_secs(2));
    println!(
        "startup with {n} envelopes queued: control socket up after {:.2} s; RSS {} MiB (peak {} MiB) with the peer down",
        serving.as_secs_f64(),
        rss_kib(pid, "VmRSS:") / 1024,
        rss_kib(pid, "VmHWM:") / 1024
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    // REFEX_BENCH_ONLY=crypto,store,single,csv,startup,plan,bigcsv runs only the stages named.
    let only = std::env::var("REFEX_BENCH_ONLY").unwrap_or_default();
    let on = |stage: &str| only.is_empty() || only.split(',').any(|s| s.trim() == stage);
    if ["single", "csv", "startup", "bigcsv"].iter().any(|s| on(s)) {
        common::use_shipped_daemon();
    }
    // A bar of the seven stages on a terminal only; the figures stay plain lines.
    let bar = refex::edge::progress::counter("bench stages", 7);
    if on("crypto") {
        bench_crypto();
    }
    bar.inc(1);
    if on("store") {
        rt.block_on(bench_store());
    }
    bar.inc(1);
    // REFEX_BENCH_SCALE=k runs k times as many referrals end to end (longer, steadier figures,
    // and long enough to profile).
    let scale: usize = std::env::var("REFEX_BENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    if on("single") {
        bench_end_to_end(1_000 * scale, 1);
    }
    bar.inc(1);
    if on("csv") {
        bench_end_to_end(2_000 * scale, 100);
    }
    bar.inc(1);
    if on("startup") {
        rt.block_on(bench_startup(100_000));
    }
    bar.inc(1);
    if on("plan") {
        bench_plan();
    }
    bar.inc(1);
    if on("bigcsv") {
        bench_end_to_end(20_000, 20_000);
    }
    bar.finish_and_clear();
}
