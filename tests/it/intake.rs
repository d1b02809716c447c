//! Provider intake as systems really produce it, the audit trail's privacy, and the CLI a data
//! protection officer uses — all against real daemons.

use std::fs;
use std::io::Write;
use std::time::Duration;

use crate::harness::{
    audit_records, referral, referred_at, referred_at_minus, wait_until, Federation,
};

const WAIT: Duration = Duration::from_secs(60);
const FAST: &str = "[intake]\nsettle_ms = 300\nrescan_ms = 1000\n";
const AREAS: [&str; 3] = ["west-midlands", "greater-manchester", "london"];

const HEADER: &str = "source_system,source_ref,referred_at,residence_area,residence_postcode,victim_name,victim_phone,offence_category,consent_referral,explicit_consent,consent_recorded_by,consent_recorded_at,notes";

#[test]
fn a_batch_with_good_and_bad_rows_lands_row_by_row_and_lists_the_bad_ones() {
    let mut fed = Federation::with_config(&AREAS, FAST);
    fed.start_all();
    let (at, consent) = (referred_at(), referred_at_minus(60));
    let rows = [
        format!("batch,B-1,{at},greater-manchester,,Test Person,0,theft,yes,,,,"),
        format!("batch,B-2,{at},,SE1 7PB,Test Person,0,burglary,yes,,,,\"flat 2, rear\""),
        format!("batch,B-3,{at},,ZZ9 9ZZ,Test Person,0,theft,yes,,,,"),
        format!("batch,B-4,{at},west-midlands,,Test Person,0,fraud,yes,,,,\"two\nlines\""),
        format!("batch,B-5,{at},london,,Test Person,0,domestic_abuse,yes,,,,"),
        format!("batch,B-6,{at},london,,Test Person,0,domestic_abuse,yes,yes,PC 1,{consent},"),
        format!("batch,B-7,{at},london,,Test Person,,theft,no,,,,"),
    ];
    let csv = format!("\u{feff}{HEADER}\r\n{}\r\n", rows.join("\r\n"));
    fed.node("west-midlands")
        .drop_file("daily.csv", csv.as_bytes());

    let count = |a: &str| fed.node(a).inbox_files().len();
    wait_until(WAIT, "the good rows to arrive", || {
        count("greater-manchester") == 1 && count("london") == 2 && count("west-midlands") == 1
    });
    let wm = fed.node("west-midlands");
    wait_until(WAIT, "the batch to leave the outbox", || {
        wm.outbox_files().is_empty()
    });
    let refs = |a: &str| {
        let mut v: Vec<String> = fed
            .node(a)
            .inbox_docs()
            .iter()
            .map(|d| d["source_ref"].as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(refs("greater-manchester"), ["B-1"]);
    assert_eq!(refs("london"), ["B-2", "B-6"]);
    assert_eq!(refs("west-midlands"), ["B-4"]);
    assert_eq!(
        fed.node("west-midlands").inbox_docs()[0]["notes"],
        "two\nlines",
        "embedded newline kept"
    );

    let rejected = fs::read_to_string(wm.outbox().join("rejected/daily.csv")).unwrap();
    assert!(rejected.starts_with(HEADER), "refused rows keep the header");
    for (r, present) in [
        ("B-3", true),
        ("B-5", true),
        ("B-7", true),
        ("B-1", false),
        ("B-6", false),
    ] {
        assert_eq!(
            rejected.contains(&format!(",{r},")),
            present,
            "{r} in rejected rows: {rejected}"
        );
    }
    let errors: serde_json::Value = serde_json::from_slice(
        &fs::read(wm.outbox().join("rejected/daily.csv.error.json")).unwrap(),
    )
    .unwrap();
    let listed: Vec<(u64, String, String)> = errors["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["row"].as_u64().unwrap(),
                e["field"].as_str().unwrap().to_owned(),
                e["rule"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        listed.contains(&(3, "residence_postcode".into(), "unknown_area".into())),
        "{listed:?}"
    );
    assert!(
        listed.contains(&(
            5,
            "explicit_consent".into(),
            "explicit_consent_required".into()
        )),
        "{listed:?}"
    );
    assert!(
        listed
            .iter()
            .any(|(row, _, rule)| *row == 7 && rule == "consent_declined"),
        "{listed:?}"
    );
    assert!(
        listed
            .iter()
            .any(|(row, _, rule)| *row == 7 && rule == "contact_required"),
        "{listed:?}"
    );
}

#[test]
fn a_file_written_slowly_in_place_is_delivered_once_and_never_refused_as_half_written() {
    let mut fed = Federation::with_config(&["west-midlands", "london"], FAST);
    fed.start_all();
    let text = referral("SLOW-1", "london");
    let path = fed.node("west-midlands").outbox().join("slow.json");
    let mut f = fs::File::create(&path).unwrap();
    // Pauses longer than the settle window while the writer keeps the file open (as sftp/SMB do).
    for chunk in text.as_bytes().chunks(text.len() / 4 + 1) {
        f.write_all(chunk).unwrap();
        f.flush().unwrap();
        std::thread::sleep(Duration::from_millis(700));
    }
    drop(f);
    wait_until(WAIT, "the referral to arrive", || {
        fed.node("london").inbox_files().len() == 1
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(fed.node("london").inbox_files().len(), 1);
    assert!(
        fed.node("west-midlands").rejected_files().is_empty(),
        "never refused as half-written"
    );
}

#[test]
fn the_same_file_dropped_twice_is_delivered_once() {
    let mut fed = Federation::with_config(&["west-midlands", "london"], FAST);
    fed.start_all();
    let text = referral("TWICE-1", "london");
    for _ in 0..2 {
        fed.node("west-midlands")
            .drop_file("again.json", text.as_bytes());
        wait_until(WAIT, "the file to be taken", || {
            fed.node("west-midlands").outbox_files().is_empty()
        });
    }
    wait_until(WAIT, "the referral to arrive", || {
        fed.node("london").inbox_files().len() == 1
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(fed.node("london").inbox_files().len(), 1);
    assert!(fed
        .node("west-midlands")
        .log_text()
        .contains("duplicate not sent again"));
}

/// Every file under `dir`, as bytes.
fn all_bytes(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(all_bytes(&p));
        } else if let Ok(b) = fs::read(&p) {
            out.push((p.display().to_string(), b));
        }
    }
    out
}

#[test]
fn no_personal_data_reaches_audit_files_logs_or_the_senders_state() {
    let mut fed = Federation::with_config(&AREAS, FAST);
    fed.start_all();
    fed.node("west-midlands")
        .drop_file("p.json", referral("PRIV-1", "london").as_bytes());
    wait_until(WAIT, "the referral to arrive", || {
        fed.node("london").inbox_files().len() == 1
    });
    for n in &mut fed.nodes {
        n.stop();
    }
    let personal = [
        "Testy McTestface",
        "07700 900999",
        "1980-01-01",
        "1 Test Street",
        "testy@example.org",
        "Fake note",
    ];
    let mut places = Vec::new();
    for n in &fed.nodes {
        places.extend(all_bytes(&n.settings.paths.audit));
        places.push((n.log.display().to_string(), fs::read(&n.log).unwrap()));
    }
    places.extend(all_bytes(&fed.node("west-midlands").settings.paths.state));
    assert!(places.len() > 8, "the places searched exist");
    for (file, bytes) in &places {
        for p in personal {
            assert!(
                !bytes.windows(p.len()).any(|w| w == p.as_bytes()),
                "'{p}' found in {file}"
            );
        }
    }
    // The referral itself did arrive whole: the check above is not vacuous.
    assert!(fs::read_to_string(&fed.node("london").inbox_files()[0])
        .unwrap()
        .contains("Testy McTestface"));
}

#[test]
fn audit_search_report_and_check_config_work_for_operators() {
    let mut fed = Federation::with_config(&AREAS, FAST);
    fed.start_all();
    let wm = fed.node("west-midlands");
    wm.drop_file("a.json", referral("DPO-1", "london").as_bytes());
    wm.drop_file("b.json", referral("DPO-2", "greater-manchester").as_bytes());
    wait_until(WAIT, "both to arrive", || {
        fed.node("london").inbox_files().len() == 1
            && fed.node("greater-manchester").inbox_files().len() == 1
    });
    wait_until(WAIT, "both receipts", || {
        let (_, out, _) = fed.node("west-midlands").cli(&[
            "audit",
            "search",
            "--source-system",
            "test-records",
            "--source-ref",
            "DPO-1",
            "--json",
        ]);
        out.contains("\"op\":\"receipt\"")
    });

    let (code, out, err) = wm.cli(&[
        "audit",
        "search",
        "--source-system",
        "test-records",
        "--source-ref",
        "DPO-1",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let ops: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["op"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    for op in ["collection", "disclosure", "receipt", "erasure"] {
        assert!(ops.iter().any(|o| o == op), "{op} missing from {ops:?}");
    }
    let other = out.lines().count();
    let (_, out2, _) = wm.cli(&[
        "audit",
        "search",
        "--source-system",
        "test-records",
        "--source-ref",
        "DPO-2",
        "--json",
    ]);
    assert!(
        out.lines().all(|l| !out2.contains(l)),
        "no record of one subject appears for the other"
    );
    assert!(other > 0);
    // Without naming the system: every system in the log is tried; the earlier searches show up
    // as consultations of this subject.
    let (code, out3, err) = wm.cli(&["audit", "search", "--source-ref", "DPO-1", "--json"]);
    assert_eq!(code, 0, "{err}");
    // One consultation per subject matched, not one per system in the log.
    let consultations = |o: &str| o.matches("\"op\":\"consultation\"").count();
    let (_, out4, _) = wm.cli(&["audit", "search", "--source-ref", "DPO-1", "--json"]);
    assert_eq!(consultations(&out4), consultations(&out3) + 1, "{out4}");
    // The table for people: a header and one line per record.
    let (code, table, err) = wm.cli(&["audit", "search", "--source-ref", "DPO-1"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        table.starts_with("time") && table.contains("from -> to") && table.contains("receipt"),
        "{table}"
    );
    assert_eq!(table.lines().count(), out4.lines().count() + 2, "{table}");
    assert!(
        out3.contains("\"op\":\"consultation\""),
        "the earlier search was recorded as a consultation"
    );
    assert!(
        out3.lines().count() > out.lines().count(),
        "the consultations are listed too"
    );

    let today = chrono::Utc::now().date_naive().to_string();
    let (code, out, err) = wm.cli(&[
        "audit",
        "report",
        "--from",
        "2026-01-01",
        "--to",
        &today,
        "--csv",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(",west-midlands,london,standard,burglary,-,1"),
        "{out}"
    );
    assert!(
        out.contains(",west-midlands,greater-manchester,standard,burglary,-,1"),
        "{out}"
    );

    // A broken config: every problem named, exit 78.
    let config = wm.config.clone();
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace("[intake]", "[intake]\nsetle_ms = 5\nmax_csv_rows = -1");
    fs::write(&config, text).unwrap();
    let (code, _, err) = wm.cli(&["check-config"]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("intake.setle_ms: unknown key") && err.contains("intake.max_csv_rows"),
        "{err}"
    );
}

/// Issue 10.7: a hard link, a name with a control character and a JSON document with a repeated
/// key are each refused into `rejected/` with their rule; the name is never logged raw; a good
/// file dropped after them is still delivered.
#[test]
fn hostile_provider_files_are_refused_with_their_rule_and_a_good_one_still_arrives() {
    let mut fed = Federation::with_config(&["west-midlands", "london"], FAST);
    fed.start_all();
    let wm = fed.node("west-midlands");
    let outbox = wm.outbox();
    let elsewhere = outbox.parent().unwrap().join("not-the-outbox.json");
    fs::write(&elsewhere, referral("LINKED-1", "london")).unwrap();
    fs::hard_link(&elsewhere, outbox.join("linked.json")).unwrap();
    wm.drop_file(
        "bad\nname\u{1b}[2J.json",
        referral("CTRL-1", "london").as_bytes(),
    );
    let dup = referral("DUP-1", "london").replacen('{', "{\"source_ref\": \"DUP-0\",", 1);
    wm.drop_file("dup.json", dup.as_bytes());

    let rejected = outbox.join("rejected");
    let rule_of = |name: &str| -> Option<(String, String)> {
        let doc: serde_json::Value =
            serde_json::from_slice(&fs::read(rejected.join(format!("{name}.error.json"))).ok()?)
                .ok()?;
        let e = &doc["errors"][0];
        Some((
            e["field"].as_str()?.to_owned(),
            e["rule"].as_str()?.to_owned(),
        ))
    };
    let expected = [
        ("linked.json", ("file", "hard_link")),
        ("bad_name_[2J.json", ("file", "control_character_in_name")),
        ("dup.json", ("source_ref", "duplicate_key")),
    ];
    wait_until(WAIT, "the three refusals in rejected/", || {
        expected.iter().all(|(name, _)| rule_of(name).is_some())
    });
    for (name, (field, rule)) in expected {
        assert_eq!(rule_of(name), Some((field.into(), rule.into())), "{name}");
        assert!(rejected.join(name).exists(), "{name} moved to rejected/");
    }
    assert_eq!(
        fs::read_to_string(&elsewhere).unwrap(),
        referral("LINKED-1", "london"),
        "the linked original is untouched"
    );
    let log = wm.log_text();
    assert!(
        !log.contains("bad\nname"),
        "a raw newline from a file name reached the log"
    );
    assert!(
        !log.contains('\u{1b}'),
        "a raw escape from a file name reached the log"
    );
    assert!(
        log.contains(r"bad\u{a}name\u{1b}[2J.json"),
        "the name is logged escaped"
    );

    wm.drop_file("good.json", referral("GOOD-1", "london").as_bytes());
    wait_until(WAIT, "the good referral to arrive", || {
        fed.node("london").inbox_files().len() == 1
    });
    assert_eq!(fed.node("london").inbox_docs()[0]["source_ref"], "GOOD-1");
    assert!(wm.outbox_files().is_empty(), "{:?}", wm.outbox_files());
}

/// Issue 10.7: a file whose name is not UTF-8 is renamed to its escaped form and refused with
/// `name_not_utf8` into `rejected/`, audited, and never logged raw; a temporary name that is
/// not UTF-8 is left alone; a good file dropped beside it is still delivered.
#[test]
fn a_name_that_is_not_utf8_is_refused_with_its_rule_and_a_good_file_beside_it_arrives() {
    use std::os::unix::ffi::OsStrExt;
    let raw = |b: &[u8]| std::ffi::OsStr::from_bytes(b).to_owned();
    let mut fed = Federation::with_config(&["west-midlands", "london"], FAST);
    fed.start_all();
    let wm = fed.node("west-midlands");
    let outbox = wm.outbox();
    let tmp = outbox.join(".latin1.tmp");
    fs::write(&tmp, referral("LATIN1-1", "london")).unwrap();
    fs::rename(&tmp, outbox.join(raw(b"r\xe9f\xe9rence-1.json"))).unwrap();
    let temporary = outbox.join(raw(b"r\xe9f-2.json.part"));
    fs::write(&temporary, b"half written").unwrap();
    wm.drop_file("good.json", referral("GOOD-1", "london").as_bytes());

    let name = r"r\xe9f\xe9rence-1.json.not-utf8";
    let rejected = outbox.join("rejected");
    wait_until(WAIT, "the refusal in rejected/", || {
        rejected.join(format!("{name}.error.json")).exists()
    });
    let doc: serde_json::Value =
        serde_json::from_slice(&fs::read(rejected.join(format!("{name}.error.json"))).unwrap())
            .unwrap();
    assert_eq!(doc["errors"][0]["field"], "file", "{doc}");
    assert_eq!(doc["errors"][0]["rule"], "name_not_utf8", "{doc}");
    assert!(
        doc.to_string().contains(r"r\\xe9f\\xe9rence-1.json"),
        "{doc}"
    );
    assert_eq!(
        fs::read_to_string(rejected.join(name)).unwrap(),
        referral("LATIN1-1", "london"),
        "the refused file itself is in rejected/"
    );
    wait_until(WAIT, "the good referral to arrive", || {
        fed.node("london").inbox_files().len() == 1
    });
    assert_eq!(fed.node("london").inbox_docs()[0]["source_ref"], "GOOD-1");
    wait_until(WAIT, "the refusal audited", || {
        audit_records(&wm.settings.paths.audit)
            .iter()
            .any(|r| r["op"] == "refusal" && r["reason"] == "name_not_utf8")
    });
    let left: Vec<_> = fs::read_dir(outbox)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "rejected")
        .collect();
    assert_eq!(
        left,
        [temporary.file_name().unwrap()],
        "only the temporary name is left"
    );
    // `read_to_string` fails on a log holding raw bytes that are not UTF-8.
    let log = fs::read_to_string(&wm.log).expect("the log is UTF-8 throughout");
    assert!(
        log.contains(r"r\\xe9f\\xe9rence-1.json"),
        "the new name is logged escaped"
    );
}
