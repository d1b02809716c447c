//! The secure exchange core between real daemons: routing, local delivery, backlog, identity.

use std::time::Duration;

use chrono::Utc;
use refex::adapters::transport::{Limits, PeerAddr, TlsIdentity, Transport};
use refex::core::envelope::{Header, Reply, CONTENT_TYPE_REFERRAL_V1};
use refex::core::referral::parse_json;
use refex::core::types::{EnvelopeId, PriorityClass};
use refex::crypto::{self, KemPublicKey, SigningKey};

use crate::harness::{referral, wait_until, Federation};

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn referrals_for_other_areas_and_the_local_area_arrive_exactly_once() {
    let mut fed = Federation::new(&["west-midlands", "greater-manchester", "london"]);
    fed.start_all();
    let wm = fed.node("west-midlands");
    wm.drop_file(
        "to-gm.json",
        referral("EX-1", "greater-manchester").as_bytes(),
    );
    wm.drop_file("to-london.json", referral("EX-2", "london").as_bytes());
    wm.drop_file("local.json", referral("EX-3", "west-midlands").as_bytes());

    for (area, source_ref) in [
        ("greater-manchester", "EX-1"),
        ("london", "EX-2"),
        ("west-midlands", "EX-3"),
    ] {
        let node = fed.node(area);
        wait_until(WAIT, &format!("a referral in {area}'s inbox"), || {
            node.inbox_files().len() == 1
        });
        let doc = &node.inbox_docs()[0];
        assert_eq!(doc["source_ref"], source_ref);
        assert_eq!(doc["delivery"]["from_area"], "west-midlands");
        assert_eq!(doc["delivery"]["to_area"], area);
        assert_eq!(
            doc["victim"]["name"], "Testy McTestface",
            "the referral travels whole"
        );
    }
    wait_until(WAIT, "the outbox to empty", || {
        fed.node("west-midlands").outbox_files().is_empty()
    });
    std::thread::sleep(Duration::from_millis(500));
    for node in &fed.nodes {
        assert_eq!(node.inbox_files().len(), 1, "{} has a duplicate", node.area);
    }
    for node in &mut fed.nodes {
        assert!(node.stop().success(), "{} did not exit 0", node.area);
        let (code, out, err) = node.cli(&["audit", "verify"]);
        assert_eq!(code, 0, "{}: audit verify failed: {out}{err}", node.area);
    }
}

#[test]
fn a_peer_started_late_still_receives_its_backlog() {
    let mut fed = Federation::new(&["west-midlands", "london"]);
    fed.node_mut("west-midlands").start();
    for i in 0..5 {
        fed.node("west-midlands").drop_file(
            &format!("r{i}.json"),
            referral(&format!("LATE-{i}"), "london").as_bytes(),
        );
    }
    wait_until(WAIT, "intake to take every file", || {
        fed.node("west-midlands").outbox_files().is_empty()
    });
    assert!(fed.node("london").inbox_files().is_empty());
    fed.node_mut("london").start();
    wait_until(WAIT, "the backlog to drain", || {
        fed.node("london").inbox_files().len() == 5
    });
}

/// Seals a referral from `from` to `to` with `signer`, as a node would.
fn seal(fed: &Federation, from: &str, to: &str, signer: &SigningKey, source_ref: &str) -> Vec<u8> {
    let r = parse_json(referral(source_ref, to).as_bytes()).expect("valid referral");
    let payload = r.to_cbor();
    let header = Header {
        v: 1,
        id: EnvelopeId::generate(),
        from: from.parse().unwrap(),
        to: to.parse().unwrap(),
        created: Utc::now(),
        priority: PriorityClass::Standard,
        due_by: Utc::now(),
        content_type: CONTENT_TYPE_REFERRAL_V1.into(),
        payload_len: payload.len() as u64,
    };
    let recipient: KemPublicKey = fed
        .node(to)
        .settings
        .directory
        .get(&to.parse().unwrap())
        .unwrap()
        .encryption_key;
    crypto::seal(header, &payload, signer, &recipient, None)
        .expect("seal")
        .to_bytes()
}

fn client(fed: &Federation, area: &str) -> Transport {
    let s = &fed.node(area).settings;
    let tls =
        TlsIdentity::load(&s.keys.tls_ca, &s.keys.tls_cert, &s.keys.tls_key, None).expect("tls");
    Transport::bind("127.0.0.1:0".parse().unwrap(), &tls, Limits::default()).expect("bind")
}

fn peer(fed: &Federation, area: &str) -> PeerAddr {
    let e = fed
        .node(area)
        .settings
        .directory
        .get(&area.parse().unwrap())
        .unwrap()
        .clone();
    PeerAddr {
        area: e.id,
        addr: e.address,
        server_name: e.server_name,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_re_sent_envelope_gets_the_original_receipt_and_no_second_inbox_file() {
    let mut fed = Federation::new(&["west-midlands", "london"]);
    fed.node_mut("london").start();
    let signer = SigningKey::load(&fed.node("west-midlands").settings.keys.signing_key).unwrap();
    let envelope = seal(&fed, "west-midlands", "london", &signer, "RESEND-1");
    let t = client(&fed, "west-midlands");
    let first = t
        .request(&peer(&fed, "london"), &envelope)
        .await
        .expect("first send");
    let second = t
        .request(&peer(&fed, "london"), &envelope)
        .await
        .expect("second send");
    assert!(
        matches!(Reply::decode(&first).unwrap(), Reply::Receipt(_)),
        "first send not accepted"
    );
    assert_eq!(first, second, "a re-send must return the original receipt");
    assert_eq!(fed.node("london").inbox_files().len(), 1);
    t.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_with_area_a_certificate_signing_as_area_b_is_refused() {
    let mut fed = Federation::new(&["west-midlands", "greater-manchester", "london"]);
    fed.node_mut("london").start();
    // The attacker holds west-midlands' TLS certificate and greater-manchester's signing key.
    let gm_signer =
        SigningKey::load(&fed.node("greater-manchester").settings.keys.signing_key).unwrap();
    let forged = seal(
        &fed,
        "greater-manchester",
        "london",
        &gm_signer,
        "IMPERSONATE-1",
    );
    let t = client(&fed, "west-midlands");
    let reply = t
        .request(&peer(&fed, "london"), &forged)
        .await
        .expect("transport works");
    match Reply::decode(&reply).unwrap() {
        Reply::Refused {
            code, permanent, ..
        } => {
            assert_eq!(code, "sender_mismatch");
            assert!(permanent);
        }
        other => panic!("impersonation accepted: {other:?}"),
    }
    assert!(fed.node("london").inbox_files().is_empty());
    t.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_with_a_certificate_from_another_ca_is_refused() {
    let mut fed = Federation::new(&["west-midlands", "london"]);
    fed.node_mut("london").start();
    // Another federation with the same area names but its own CA.
    let rogue = Federation::new(&["west-midlands", "london"]);
    let signer = SigningKey::load(&rogue.node("west-midlands").settings.keys.signing_key).unwrap();
    let envelope = seal(&fed, "west-midlands", "london", &signer, "ROGUE-1");
    // It trusts the real CA (so the client side does not stop first) but presents its own cert.
    let (real, fake) = (
        &fed.node("london").settings.keys,
        &rogue.node("west-midlands").settings.keys,
    );
    let tls = TlsIdentity::load(&real.tls_ca, &fake.tls_cert, &fake.tls_key, None).expect("tls");
    let t = Transport::bind("127.0.0.1:0".parse().unwrap(), &tls, Limits::default()).expect("bind");
    let result = t.request(&peer(&fed, "london"), &envelope).await;
    assert!(
        result.is_err(),
        "a foreign-CA client got an answer: {result:?}"
    );
    assert!(fed.node("london").inbox_files().is_empty());
    t.close().await;
}

#[test]
fn sighup_reloads_certificates_without_dropping_queued_work() {
    let mut fed = Federation::new(&["west-midlands", "london"]);
    fed.node_mut("west-midlands").start();
    fed.node("west-midlands")
        .drop_file("q.json", referral("HUP-1", "london").as_bytes());
    wait_until(WAIT, "the file to be queued", || {
        fed.node("west-midlands").outbox_files().is_empty()
    });
    fed.node("west-midlands").hangup();
    wait_until(WAIT, "the reload", || {
        fed.node("west-midlands")
            .log_text()
            .contains("TLS certificate and key reloaded")
    });
    fed.node_mut("london").start();
    wait_until(WAIT, "the queued referral to arrive", || {
        fed.node("london").inbox_files().len() == 1
    });
}

/// A federation part-way through adopting version-2 envelopes: london's directory entry does
/// not say it opens them yet, west-midlands' does. Each side seals what the other's entry
/// says, both open both, and every referral arrives once.
#[test]
fn areas_seal_each_peer_the_envelope_version_its_directory_entry_names() {
    let fed = Federation::new(&["west-midlands", "london"]);
    let path = fed.dir.path().join("directory.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let blocks: Vec<String> = text
        .split("[[area]]")
        .map(|b| {
            if b.contains("id = \"london\"") {
                b.replace("envelope_version = 2\n", "")
            } else {
                b.to_owned()
            }
        })
        .collect();
    let edited = blocks.join("[[area]]");
    assert_eq!(edited.matches("envelope_version = 2").count(), 1);
    std::fs::write(&path, edited).unwrap();
    let mut fed = fed;
    fed.start_all();
    for i in 0..3 {
        fed.node("west-midlands").drop_file(
            &format!("v1-{i}.json"),
            referral(&format!("MIX-WM-{i}"), "london").as_bytes(),
        );
        fed.node("london").drop_file(
            &format!("v2-{i}.json"),
            referral(&format!("MIX-LON-{i}"), "west-midlands").as_bytes(),
        );
    }
    for area in ["west-midlands", "london"] {
        wait_until(WAIT, &format!("three referrals in {area}'s inbox"), || {
            fed.node(area).inbox_files().len() == 3
        });
    }
    let contexts = |area: &str| {
        let (code, v) = fed.node(area).status_json();
        assert_eq!(code, 0, "{v}");
        let c = &v["hpke_contexts"];
        (c["sealed"].as_u64().unwrap(), c["opened"].as_u64().unwrap())
    };
    // west-midlands sealed version 1 to london (no shared context) and opened london's
    // version-2 envelopes (one context for all three); london the other way round.
    assert_eq!(contexts("west-midlands"), (0, 1));
    assert_eq!(contexts("london"), (1, 0));
}
