//! Tests of the referral model: one per validation rule, routing and classification, CSV edge
//! cases, the inbox document and the shipped samples.

use chrono::{TimeZone, Utc};
use serde_json::{json, Value};

use super::csv::{parse_csv, write_rows, CsvLimits};
use super::*;

fn good() -> Value {
    json!({
        "schema": "refex.referral.v1",
        "source_system": "test-records",
        "source_ref": "R-1",
        "referred_at": "2026-11-20T14:03:00Z",
        "residence": { "area": "london" },
        "victim": { "name": "Test Person", "date_of_birth": "1980-01-01", "phone": "07700 900000" },
        "offence": { "category": "burglary" },
        "consent": { "referral": true }
    })
}

fn rules_of(v: Value) -> Vec<(String, String)> {
    match parse_json(v.to_string().as_bytes()) {
        Ok(_) => vec![],
        Err(e) => e.into_iter().map(|e| (e.field, e.rule)).collect(),
    }
}

fn with(mut v: Value, path: &str, new: Value) -> Value {
    let mut cur = &mut v;
    let parts: Vec<&str> = path.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        cur = cur.get_mut(*p).unwrap();
    }
    let last = parts[parts.len() - 1];
    if new.is_null() {
        cur.as_object_mut().unwrap().remove(last);
    } else {
        cur[last] = new;
    }
    v
}

fn has(v: Value, field: &str, rule: &str) {
    let r = rules_of(v);
    assert!(
        r.iter().any(|(f, ru)| f == field && ru == rule),
        "expected {field}/{rule}, got {r:?}"
    );
}

#[test]
fn a_good_referral_parses() {
    assert!(rules_of(good()).is_empty());
}

#[test]
fn invalid_json_is_refused() {
    let e = parse_json(b"{\"schema\": ").unwrap_err();
    assert_eq!(e[0].rule, "invalid_json");
}

#[test]
fn every_missing_required_field_is_named() {
    let r = rules_of(with(
        with(good(), "source_ref", Value::Null),
        "victim.name",
        Value::Null,
    ));
    assert!(
        r.contains(&("source_ref".into(), "required".into())),
        "{r:?}"
    );
    assert!(
        r.contains(&("victim.name".into(), "required".into())),
        "{r:?}"
    );
}

#[test]
fn unknown_fields_are_refused_with_their_path() {
    has(
        with(good(), "victim.phnoe", json!("0")),
        "victim.phnoe",
        "unknown_field",
    );
    has(with(good(), "extra", json!(1)), "extra", "unknown_field");
    // Three levels down, then siblings after it: each path is exact (the walk shares one
    // path buffer and must restore it after every object).
    let explicit = json!({ "given": true, "recorded_by": "PC 1", "witness": "x" });
    let v = with(good(), "consent.explicit", explicit);
    let v = with(v, "victim.nickname", json!("x"));
    let v = with(v, "zz", json!(1));
    let unknown: Vec<String> = rules_of(v)
        .into_iter()
        .filter(|(_, rule)| rule == "unknown_field")
        .map(|(field, _)| field)
        .collect();
    assert_eq!(
        unknown,
        ["consent.explicit.witness", "victim.nickname", "zz"],
        "{unknown:?}"
    );
}

#[test]
fn wrong_types_are_named() {
    has(
        with(good(), "consent.referral", json!("yes")),
        "consent.referral",
        "invalid_type",
    );
}

#[test]
fn the_schema_must_be_v1() {
    has(
        with(good(), "schema", json!("refex.referral.v2")),
        "schema",
        "wrong_schema",
    );
}

#[test]
fn timestamps_must_be_rfc3339_and_dates_iso() {
    has(
        with(good(), "referred_at", json!("20/11/2026")),
        "referred_at",
        "invalid_timestamp",
    );
    has(
        with(good(), "victim.date_of_birth", json!("01/01/1980")),
        "victim.date_of_birth",
        "invalid_date",
    );
    has(
        with(good(), "offence.date", json!("2026-13-01")),
        "offence.date",
        "invalid_date",
    );
    assert!(
        rules_of(with(
            good(),
            "referred_at",
            json!("2026-11-20T14:03:00+01:00")
        ))
        .is_empty(),
        "offsets are fine"
    );
}

#[test]
fn categories_are_enumerated() {
    has(
        with(good(), "offence.category", json!("shoplifting")),
        "offence.category",
        "unknown_category",
    );
}

#[test]
fn a_contact_route_is_required() {
    has(
        with(good(), "victim.phone", Value::Null),
        "victim",
        "contact_required",
    );
}

#[test]
fn a_residence_is_required_and_area_ids_are_checked() {
    has(
        with(good(), "residence", json!({})),
        "residence",
        "residence_required",
    );
    has(
        with(good(), "residence.area", json!("West Midlands")),
        "residence.area",
        "invalid_area_id",
    );
}

#[test]
fn overlong_fields_are_refused() {
    has(
        with(good(), "source_ref", json!("x".repeat(101))),
        "source_ref",
        "too_long",
    );
    has(
        with(good(), "notes", json!("x".repeat(4001))),
        "notes",
        "too_long",
    );
}

#[test]
fn a_date_of_birth_after_the_referral_is_refused() {
    has(
        with(good(), "victim.date_of_birth", json!("2027-01-01")),
        "victim.date_of_birth",
        "date_of_birth_in_future",
    );
}

#[test]
fn a_declined_referral_is_refused() {
    has(
        with(good(), "consent.referral", json!(false)),
        "consent.referral",
        "consent_declined",
    );
}

#[test]
fn the_four_sensitive_categories_need_explicit_consent() {
    for c in [
        "sexual_offence",
        "domestic_abuse",
        "homicide_bereaved",
        "road_death_bereaved",
    ] {
        let v = with(good(), "offence.category", json!(c));
        has(v.clone(), "consent.explicit", "explicit_consent_required");
        let half = with(v.clone(), "consent.explicit", json!({"given": true}));
        has(half, "consent.explicit", "explicit_consent_required");
        let full = with(
            v,
            "consent.explicit",
            json!({"given": true, "recorded_by": "PC 1", "recorded_at": "2026-11-20T13:00:00Z"}),
        );
        assert!(rules_of(full).is_empty(), "{c} with explicit consent");
    }
    assert!(rules_of(with(good(), "offence.category", json!("fraud"))).is_empty());
}

fn ctx_parts() -> (RoutingTable, Calendar) {
    let routing =
        RoutingTable::from_toml("[prefixes]\n\"B\" = \"west-midlands\"\n\"SE\" = \"london\"\n")
            .unwrap();
    (
        routing,
        Calendar::from_toml(include_str!("../../../config/bank-holidays.toml")).unwrap(),
    )
}

fn classify_value(v: Value) -> Result<Classified, Vec<FieldError>> {
    let (routing, calendar) = ctx_parts();
    let known = |a: &AreaId| ["west-midlands", "london"].contains(&a.as_str());
    let r: Referral = serde_json::from_value(v).unwrap();
    classify(
        &r,
        &Context {
            routing: &routing,
            calendar: &calendar,
            is_known_area: &known,
        },
    )
}

#[test]
fn the_area_wins_over_the_postcode_and_unknown_areas_are_refused() {
    let v = with(
        good(),
        "residence",
        json!({"area": "london", "postcode": "B1 1AA"}),
    );
    assert_eq!(classify_value(v).unwrap().to.as_str(), "london");
    let v = with(good(), "residence", json!({"postcode": "b1 1aa"}));
    assert_eq!(classify_value(v).unwrap().to.as_str(), "west-midlands");
    let e = classify_value(with(good(), "residence", json!({"postcode": "ZZ9 9ZZ"}))).unwrap_err();
    assert_eq!(
        (e[0].field.as_str(), e[0].rule.as_str()),
        ("residence.postcode", "unknown_area")
    );
    assert!(
        e[0].message.contains("ZZ9") && !e[0].message.contains("9ZZ"),
        "only the district is quoted"
    );
    let e = classify_value(with(good(), "residence", json!({"area": "kent"}))).unwrap_err();
    assert_eq!(e[0].rule, "unknown_area");
}

#[test]
fn priority_is_enhanced_for_flags_or_under_18() {
    assert_eq!(
        classify_value(good()).unwrap().priority,
        PriorityClass::Standard
    );
    let flagged = with(
        good(),
        "priority",
        json!({"vulnerable_or_intimidated": true}),
    );
    assert_eq!(
        classify_value(flagged).unwrap().priority,
        PriorityClass::Enhanced
    );
    // Born 2008-11-21: 17 on 2026-11-20, 18 on 2026-11-21.
    let child = with(good(), "victim.date_of_birth", json!("2008-11-21"));
    assert_eq!(
        classify_value(child.clone()).unwrap().priority,
        PriorityClass::Enhanced
    );
    let adult = with(child, "referred_at", json!("2026-11-21T09:00:00Z"));
    assert_eq!(
        classify_value(adult).unwrap().priority,
        PriorityClass::Standard
    );
}

#[test]
fn due_by_is_two_working_days() {
    assert_eq!(
        classify_value(good()).unwrap().due_by,
        Utc.with_ymd_and_hms(2026, 11, 24, 14, 3, 0).unwrap()
    );
}

#[test]
fn the_referral_survives_cbor_and_the_inbox_document_carries_everything() {
    let r = parse_json(good().to_string().as_bytes()).unwrap();
    assert_eq!(Referral::from_cbor(&r.to_cbor()).unwrap(), r);
    let d = Delivery {
        envelope_id: "ab".repeat(16),
        from_area: "west-midlands".into(),
        to_area: "london".into(),
        received_at: Utc::now(),
        priority: PriorityClass::Standard,
        due_by: Utc::now(),
    };
    let doc: Value = serde_json::from_slice(&inbox_document(&r, &d)).unwrap();
    assert_eq!(doc["delivery"]["from_area"], "west-midlands");
    assert_eq!(doc["victim"]["name"], "Test Person");
    let mut without = doc.clone();
    without.as_object_mut().unwrap().remove("delivery");
    assert_eq!(without, serde_json::to_value(&r).unwrap());
}

const HEADER: &str = "source_system,source_ref,referred_at,residence_area,victim_name,victim_phone,offence_category,consent_referral,notes";

fn limits() -> CsvLimits {
    CsvLimits {
        max_rows: 20_000,
        max_field_bytes: 8192,
    }
}

#[test]
fn csv_with_bom_crlf_embedded_newlines_and_quotes_parses() {
    let text = format!(
        "\u{feff}{HEADER}\r\ns,1,2026-11-20T08:00:00Z,london,\"Person, Test\",0,theft,yes,\"line one\r\nline \"\"two\"\"\"\r\n"
    );
    let b = parse_csv(text.as_bytes(), &limits()).unwrap();
    assert_eq!(b.rows.len(), 1);
    let r = b.rows[0].parsed.as_ref().unwrap();
    assert_eq!(r.victim.name, "Person, Test");
    assert_eq!(r.notes.as_deref(), Some("line one\r\nline \"two\""));
}

#[test]
fn ragged_and_bad_rows_are_refused_alone() {
    let text = format!("{HEADER}\ns,1,2026-11-20T08:00:00Z,london,P,0,theft,yes,\ns,2,2026-11-20T08:00:00Z,london,P\ns,3,2026-11-20T08:00:00Z,london,P,0,theft,maybe,\n");
    let b = parse_csv(text.as_bytes(), &limits()).unwrap();
    assert!(b.rows[0].parsed.is_ok());
    let e2 = b.rows[1].parsed.as_ref().unwrap_err();
    assert_eq!(
        (e2[0].row, e2[0].rule.as_str()),
        (Some(2), "wrong_field_count")
    );
    let e3 = b.rows[2].parsed.as_ref().unwrap_err();
    assert_eq!(
        (e3[0].row, e3[0].field.as_str(), e3[0].rule.as_str()),
        (Some(3), "consent_referral", "invalid_boolean")
    );
}

#[test]
fn unknown_duplicate_and_missing_columns_refuse_the_file() {
    let e = parse_csv(b"source_system,source_ref,colour\n", &limits()).unwrap_err();
    assert!(e
        .iter()
        .any(|e| e.rule == "unknown_column" && e.field == "colour"));
    assert!(e
        .iter()
        .any(|e| e.rule == "missing_column" && e.field == "victim_name"));
    let dup = format!("{HEADER},notes\n");
    assert!(parse_csv(dup.as_bytes(), &limits())
        .unwrap_err()
        .iter()
        .any(|e| e.rule == "duplicate_column"));
    assert_eq!(
        parse_csv(&[0xff, 0xfe, 0x00], &limits()).unwrap_err()[0].rule,
        "invalid_encoding"
    );
}

#[test]
fn csv_errors_name_the_column() {
    let text = format!("{HEADER}\ns,1,2026-11-20T08:00:00Z,london,P,,theft,yes,\n");
    let b = parse_csv(text.as_bytes(), &limits()).unwrap();
    let e = b.rows[0].parsed.as_ref().unwrap_err();
    assert_eq!(e[0].rule, "contact_required");
    assert!(e[0].field.contains("victim_phone"), "{e:?}");
}

#[test]
fn a_ten_thousand_row_batch_parses_and_the_row_limit_holds() {
    let mut text = format!("{HEADER}\n");
    for i in 0..10_000 {
        text.push_str(&format!(
            "s,R{i},2026-11-20T08:00:00Z,london,P,0,theft,1,\n"
        ));
    }
    let b = parse_csv(text.as_bytes(), &limits()).unwrap();
    assert_eq!(b.rows.len(), 10_000);
    assert!(b.rows.iter().all(|r| r.parsed.is_ok()));
    let small = CsvLimits {
        max_rows: 9_999,
        max_field_bytes: 8192,
    };
    assert_eq!(
        parse_csv(text.as_bytes(), &small).unwrap_err()[0].rule,
        "too_many_rows"
    );
}

#[test]
fn refused_rows_are_written_back_with_the_header() {
    let text =
        format!("{HEADER}\ns,1,2026-11-20T08:00:00Z,london,\"P, Q\",0,theft,no,\"multi\nline\"\n");
    let b = parse_csv(text.as_bytes(), &limits()).unwrap();
    let out = write_rows(&b.header, &b.rows[..1]);
    let again = parse_csv(&out, &limits()).unwrap();
    assert_eq!(again.header, b.header);
    assert_eq!(again.rows[0].raw, b.rows[0].raw);
}

#[test]
fn the_shipped_samples_are_what_they_claim() {
    for (name, bytes) in crate::core::samples::SAMPLES {
        if name.ends_with(".json") {
            assert!(
                parse_json(bytes).is_ok(),
                "{name}: {:?}",
                parse_json(bytes).err()
            );
        } else {
            let b = parse_csv(bytes, &limits()).unwrap();
            assert_eq!(b.rows.len(), 8, "{name}");
            let bad: Vec<u64> = b
                .rows
                .iter()
                .filter(|r| r.parsed.is_err())
                .map(|r| r.row)
                .collect();
            assert_eq!(
                bad,
                vec![5],
                "only the sexual offence without explicit consent fails validation"
            );
            assert!(
                b.rows[5].raw[10].contains('\n'),
                "a quoted field with an embedded newline"
            );
        }
    }
}

#[test]
fn the_json_schema_file_matches_the_model() {
    let schema: Value =
        serde_json::from_str(include_str!("../../../config/referral.schema.json")).unwrap();
    let cats: Vec<&str> = schema["properties"]["offence"]["properties"]["category"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let ours: Vec<&str> = OffenceCategory::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(cats, ours);
    let top: Vec<&str> = schema["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let known = KNOWN.iter().find(|(p, _)| p.is_empty()).unwrap().1;
    assert_eq!(top.len(), known.len());
    assert!(top.iter().all(|k| known.contains(k)));
}

#[test]
fn a_batch_of_only_blank_rows_is_refused_as_empty_and_blank_rows_count_toward_the_limit() {
    let limits = CsvLimits {
        max_rows: 3,
        max_field_bytes: 1024,
    };
    let sample = include_str!("../../../config/samples/daily-2026-11-20.csv");
    let header = format!("{}\r\n", sample.lines().next().unwrap());
    let blank_row = format!("{}\r\n", ",".repeat(header.matches(',').count()));
    let blank = format!("{header}{blank_row}{blank_row}");
    let errs = parse_csv(blank.as_bytes(), &limits).unwrap_err();
    assert_eq!(errs[0].rule, "empty_batch", "{errs:?}");
    let many = format!("{header}{}", blank_row.repeat(4));
    let errs = parse_csv(many.as_bytes(), &limits).unwrap_err();
    assert_eq!(errs[0].rule, "too_many_rows", "{errs:?}");
}

#[test]
fn cells_written_back_cannot_run_as_spreadsheet_formulas() {
    use crate::core::referral::csv::formula_safe;
    for bad in ["=HYPERLINK(\"x\")", "@SUM(A1)", "+1", "-1", "\tx", "\rx"] {
        assert!(formula_safe(bad).starts_with('\''), "{bad:?}");
    }
    assert_eq!(formula_safe("Testtown"), "Testtown");
    assert_eq!(formula_safe(""), "");
}
