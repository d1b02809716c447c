//! SIGHUP reloads the peer directory and postcode table, all or nothing, between real daemons;
//! an envelope signed with a key the receiver does not list yet is retried, not lost.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use crate::harness::{referral, wait_until, Federation, Node};

const WAIT: Duration = Duration::from_secs(30);
/// The receiver's one log line per `unknown_signing_key` refusal.
const REFUSED: &str = "envelope refused until the directory lists its signing key";

/// Points `node` at its own copies of the directory and postcode files, returning their paths.
fn own_files(fed: &Federation, node: &Node) -> (PathBuf, PathBuf) {
    let (dir, pc) = (
        fed.dir.path().join(format!("{}-directory.toml", node.area)),
        fed.dir.path().join(format!("{}-postcodes.toml", node.area)),
    );
    fs::copy(fed.dir.path().join("directory.toml"), &dir).unwrap();
    fs::copy(fed.dir.path().join("postcodes.toml"), &pc).unwrap();
    let text = fs::read_to_string(&node.config).unwrap();
    let text = text
        .replace(
            "directory = \"../directory.toml\"",
            &format!("directory = \"{}\"", dir.display()),
        )
        .replace(
            "postcodes = \"../postcodes.toml\"",
            &format!("postcodes = \"{}\"", pc.display()),
        );
    fs::write(&node.config, text).unwrap();
    (dir, pc)
}

/// The directory text without the `[[area]]` table of `area`.
fn without_area(directory: &str, area: &str) -> String {
    directory
        .split("\n[[area]]")
        .filter(|t| !t.contains(&format!("id = \"{area}\"")))
        .collect::<Vec<_>>()
        .join("\n[[area]]")
}

fn count(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn an_area_added_by_sighup_routes_and_a_broken_directory_is_refused_whole() {
    let mut fed = Federation::new(&["west-midlands", "london"]);
    let wm = &fed.nodes[0];
    let (dir, pc) = own_files(&fed, wm);
    let full_dir = fs::read_to_string(&dir).unwrap();
    let full_pc = fs::read_to_string(&pc).unwrap();
    fs::write(&dir, without_area(&full_dir, "london")).unwrap();
    let pc_text: String = full_pc
        .lines()
        .filter(|l| !l.contains("\"london\""))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(&pc, pc_text).unwrap();
    fed.start_all();
    let wm = fed.node("west-midlands");
    let london = fed.node("london");

    // (b) A broken directory: one ERROR naming the file, the old directory still in use.
    fs::write(&dir, "version = 1\n[[area]]\nid = \"kent\"\n").unwrap();
    wm.hangup();
    wait_until(WAIT, "the reload to be refused", || {
        count(&wm.log_text(), "reload refused") == 1
    });
    let log = wm.log_text();
    let line = log.lines().find(|l| l.contains("reload refused")).unwrap();
    assert!(line.contains("ERROR") || line.starts_with("<3>"), "{line}");
    assert!(line.contains("west-midlands-directory.toml"), "{line}");
    wm.drop_file("local.json", referral("RL-1", "west-midlands").as_bytes());
    wait_until(WAIT, "local delivery after the refused reload", || {
        wm.inbox_files().len() == 1
    });

    // (a) The area added to the directory and postcodes: a referral to it routes and arrives.
    fs::write(&dir, &full_dir).unwrap();
    fs::write(&pc, &full_pc).unwrap();
    wm.hangup();
    wait_until(WAIT, "the reload to succeed", || {
        wm.log_text().contains("area added to the directory")
    });
    wm.drop_file("to-london.json", referral("RL-2", "london").as_bytes());
    wait_until(WAIT, "the referral in london's inbox", || {
        london.inbox_files().len() == 1
    });
    assert_eq!(london.inbox_docs()[0]["source_ref"], "RL-2");
    assert_eq!(count(&wm.log_text(), "reload refused"), 1, "one ERROR only");
    fed.stop_all_and_verify();
}

#[test]
fn an_envelope_signed_with_a_key_not_yet_listed_is_retried_and_delivered_after_reload() {
    let mut fed = Federation::with_config(
        &["west-midlands", "london"],
        "[delivery]\nretry_initial_ms = 200\nretry_max_ms = 1000\n",
    );
    let london = &fed.nodes[1];
    let (dir, _) = own_files(&fed, london);
    let full_dir = fs::read_to_string(&dir).unwrap();
    // London lists a different signing key for west-midlands (its own): a rotation it has
    // not been told about yet.
    let key_of = |area: &str| {
        let t = full_dir
            .split("\n[[area]]")
            .find(|t| t.contains(&format!("id = \"{area}\"")))
            .unwrap();
        let at = t.find("signing_keys = [\"").unwrap() + 17;
        t[at..at + 64].to_owned()
    };
    let (wm_key, london_key) = (key_of("west-midlands"), key_of("london"));
    let stale = full_dir.replacen(
        &format!("signing_keys = [\"{wm_key}\"]"),
        &format!("signing_keys = [\"{london_key}\"]"),
        1,
    );
    assert_ne!(stale, full_dir);
    fs::write(&dir, &stale).unwrap();
    fed.start_all();
    let (wm, london) = (fed.node("west-midlands"), fed.node("london"));
    wm.drop_file("to-london.json", referral("RK-1", "london").as_bytes());
    // Five refusals within a few seconds span at most two minutes, and each minute gives at
    // most two records (its first refusal, then one aggregated record with a count), so the
    // records are fewer than the refusals. (Four could split 2 + 2 across a minute boundary:
    // four records for four refusals, seen once in CI.)
    wait_until(WAIT, "london to refuse the unknown key (retried)", || {
        count(&london.log_text(), REFUSED) >= 5
    });
    assert!(london.inbox_files().is_empty());
    // The rotation: both keys listed, then the reload.
    let both = full_dir.replacen(
        &format!("signing_keys = [\"{wm_key}\"]"),
        &format!("signing_keys = [\"{london_key}\", \"{wm_key}\"]"),
        1,
    );
    fs::write(&dir, &both).unwrap();
    london.hangup();
    wait_until(WAIT, "the retried envelope in london's inbox", || {
        london.inbox_files().len() == 1
    });
    // (c) The old key removed: delivery continues with the new one alone.
    fs::write(&dir, &full_dir).unwrap();
    london.hangup();
    wait_until(WAIT, "the second reload", || {
        count(&london.log_text(), "postcode table reloaded") == 2
    });
    wm.drop_file("to-london-2.json", referral("RK-2", "london").as_bytes());
    wait_until(WAIT, "the second referral in london's inbox", || {
        london.inbox_files().len() == 2
    });
    fed.stop_all_and_verify();
    let audit = &fed.node("london").settings.paths.audit;
    let mut lines = Vec::new();
    for f in fs::read_dir(audit).unwrap() {
        lines.extend(
            fs::read_to_string(f.unwrap().path())
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("\"reason\":\"unknown_signing_key\""))
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        );
    }
    let refused = count(&fed.node("london").log_text(), REFUSED);
    let recorded: u64 = lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["count"].as_u64().unwrap_or(1)
        })
        .sum();
    assert!(lines.iter().any(|l| l.contains("\"count\":")), "{lines:?}");
    assert!(
        lines.len() < refused,
        "aggregated: {} records for {refused} refusals: {lines:?}",
        lines.len()
    );
    assert_eq!(
        recorded as usize, refused,
        "every refusal counted: {lines:?}"
    );
}
