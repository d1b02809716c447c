//! Nothing lost, nothing duplicated: real sender and receiver processes are killed with SIGKILL
//! at random moments and at each named crash point, restarted, and at the end every referral
//! dropped must be in the receiving inbox exactly once, the outbox empty, no temporary files
//! left, and both audit chains must verify.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::harness::{referral, theft_csv, wait_until, Federation};

const FAST: &str = crate::harness::FAST_CRASH_CONFIG;

/// A small deterministic generator (xorshift), seeded and printed so a failing run can be
/// repeated with REFEX_TORTURE_SEED.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = std::env::var("REFEX_TORTURE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("torture seed: REFEX_TORTURE_SEED={seed}");
        Self(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A CSV batch of `refs` to `area` (REFERRAL.md columns).
fn csv_batch(refs: &[String], area: &str) -> String {
    let mut out = String::from(
        "source_system,source_ref,referred_at,residence_area,victim_name,victim_phone,offence_category,consent_referral\r\n",
    );
    let at = crate::harness::referred_at();
    for r in refs {
        out.push_str(&format!(
            "test-records,{r},{at},{area},\"Test, Person\",07700 900999,theft,yes\r\n"
        ));
    }
    out
}

/// Checks the end state: every expected source_ref exactly once, nothing left behind.
fn assert_exactly_once(fed: &mut Federation, expected: &[String], limit: Duration) {
    let london = fed.node("london");
    wait_until(limit, "every referral to arrive", || {
        london.inbox_files().len() >= expected.len()
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut deliveries: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for doc in london.inbox_docs() {
        let r = doc["source_ref"].as_str().unwrap_or("?").to_owned();
        *seen.entry(r.clone()).or_default() += 1;
        deliveries
            .entry(r)
            .or_default()
            .push(doc["delivery"].to_string());
    }
    let dupes: Vec<_> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(r, _)| (r, &deliveries[r]))
        .collect();
    assert!(
        dupes.is_empty(),
        "duplicated (with their delivery records): {dupes:?}"
    );
    let missing: Vec<_> = expected.iter().filter(|r| !seen.contains_key(*r)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    assert_eq!(seen.len(), expected.len(), "unexpected extra referrals");

    let wm = fed.node("west-midlands");
    wait_until(limit, "the outbox to empty", || {
        wm.outbox_files().is_empty()
    });
    assert!(
        wm.rejected_files().is_empty(),
        "refused: {:?}",
        wm.rejected_files()
    );
    for node in &mut fed.nodes {
        if node.is_running() {
            assert!(
                node.stop().success(),
                "{} did not exit 0 on SIGTERM",
                node.area
            );
        }
        let (code, out, err) = node.cli(&["audit", "verify"]);
        assert_eq!(code, 0, "{}: audit verify: {out}{err}", node.area);
        let leftovers: Vec<_> = std::fs::read_dir(node.inbox())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.') || n.ends_with(".tmp"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "{}: temporary files left: {leftovers:?}",
            node.area
        );
    }
    crate::history::check_nodes(expected, fed.node("west-midlands"), fed.node("london"))
        .assert(&crate::history::required_under_crashes());
}

/// Streams `total` referrals (a mix of single files and CSV batches) while killing a random side
/// `kills` times; returns after the end-state checks.
fn torture(kills: usize, total: usize, limit: Duration) {
    let mut fed = Federation::with_config(&["west-midlands", "london"], FAST);
    fed.start_all();
    let mut rng = Rng::new();
    let mut expected = Vec::new();
    let mut dropped_files = 0;
    let mut kills_done = 0;
    let mut next_kill = Instant::now() + Duration::from_millis(200 + rng.below(800));
    while expected.len() < total || kills_done < kills {
        if expected.len() < total {
            let n = expected.len();
            if rng.below(4) == 0 {
                let refs: Vec<String> = (0..(1 + rng.below(40) as usize).min(total - n))
                    .map(|i| format!("T-{}", n + i))
                    .collect();
                fed.node("west-midlands").drop_file(
                    &format!("batch-{dropped_files}.csv"),
                    csv_batch(&refs, "london").as_bytes(),
                );
                expected.extend(refs);
            } else {
                let r = format!("T-{n}");
                fed.node("west-midlands").drop_file(
                    &format!("single-{dropped_files}.json"),
                    referral(&r, "london").as_bytes(),
                );
                expected.push(r);
            }
            dropped_files += 1;
        }
        if Instant::now() >= next_kill && kills_done < kills {
            let victim = if rng.below(2) == 0 {
                "west-midlands"
            } else {
                "london"
            };
            let node = fed.node_mut(victim);
            node.kill();
            kills_done += 1;
            std::thread::sleep(Duration::from_millis(rng.below(300)));
            node.start();
            next_kill = Instant::now() + Duration::from_millis(100 + rng.below(900));
        }
        std::thread::sleep(Duration::from_millis(rng.below(20)));
    }
    eprintln!(
        "torture: {kills_done} kills, {} referrals in {dropped_files} files",
        expected.len()
    );
    assert_exactly_once(&mut fed, &expected, limit);
}

#[test]
fn random_kills_of_either_side_lose_and_duplicate_nothing() {
    torture(12, 300, Duration::from_secs(120));
}

#[test]
#[ignore = "long soak: cargo test --release --test it -- --ignored torture_long"]
fn torture_long() {
    torture(200, 5_000, Duration::from_secs(900));
}

#[test]
fn a_crash_at_each_dangerous_point_loses_and_duplicates_nothing() {
    // (point, which side crashes there)
    let points = [
        ("intake_after_store", "west-midlands"),
        ("intake_before_delete", "west-midlands"),
        ("receiver_after_stage", "london"),
        ("receiver_after_seen", "london"),
        ("receiver_before_reply", "london"),
        ("sender_before_receipt_stored", "west-midlands"),
    ];
    let mut fed = Federation::with_config(&["west-midlands", "london"], FAST);
    fed.start_all();
    let mut expected = Vec::new();
    for (i, (point, side)) in points.iter().enumerate() {
        let node = fed.node_mut(side);
        node.stop();
        node.extra_env = vec![("REFEX_CRASH_AT".into(), point.to_string())];
        node.start();
        let r = format!("CP-{i}");
        fed.node("west-midlands")
            .drop_file(&format!("cp-{i}.json"), referral(&r, "london").as_bytes());
        expected.push(r);
        let node = fed.node_mut(side);
        wait_until(
            Duration::from_secs(30),
            &format!("the crash at {point}"),
            || node.log_text().contains(&format!("aborting at {point}")),
        );
        node.kill();
        node.extra_env.clear();
        node.start();
    }
    assert_exactly_once(&mut fed, &expected, Duration::from_secs(60));
}

#[test]
fn a_crash_between_the_slices_of_a_batch_loses_and_duplicates_nothing() {
    // 25 rows carried out in slices of 10: the sender dies before the second slice's release,
    // after the first slice was released (and perhaps sent). Taken again, the first slice's
    // rows are logged duplicates and the rest go once.
    let config = FAST.replacen("[intake]\n", "[intake]\nparallel_referrals = 10\n", 1);
    let mut fed = Federation::with_config(&["west-midlands", "london"], &config);
    fed.start_all();
    let rows: Vec<(String, &str)> = (0..25).map(|i| (format!("SL-{i}"), "london")).collect();
    let point = "intake_before_release";
    let node = fed.node_mut("west-midlands");
    node.stop();
    node.extra_env = vec![("REFEX_CRASH_AT".into(), format!("{point}:2"))];
    node.start();
    fed.node("west-midlands")
        .drop_file("sliced.csv", theft_csv("test-slices", &rows).as_bytes());
    let node = fed.node_mut("west-midlands");
    wait_until(Duration::from_secs(30), "the crash between slices", || {
        node.log_text().contains(&format!("aborting at {point}"))
    });
    node.kill();
    node.extra_env.clear();
    node.start();
    let expected: Vec<String> = rows.into_iter().map(|(r, _)| r).collect();
    assert_exactly_once(&mut fed, &expected, Duration::from_secs(60));
}
