//! Refusals beyond REFERRAL.md's own rules, for a careless or hostile provider: duplicate keys
//! in a JSON document, and dates outside plausible ranges.
//!
//! # Duplicate keys
//! `serde_json` keeps the last of two equal keys without a word, so `{"source_ref": "A",
//! "source_ref": "B"}` would be taken as `B` while a human reading the file sees `A`. A pre-pass
//! walks the document and refuses every repeated key as `duplicate_key`, naming its path
//! (`victim.name`, `victim.needs[1].x`). The pass is a streaming visitor: no second tree.
//!
//! # Date ranges (rule `date_out_of_range`, naming the field)
//! - `referred_at`: at most [`MAX_AGE_DAYS`] days before now and at most [`CLOCK_SKEW`] after;
//! - `victim.date_of_birth`: not before [`EARLIEST_DATE`], not after today (UTC);
//! - `offence.date`: not before [`EARLIEST_DATE`], not after the referral's date (plus a day,
//!   for a UK local date just after midnight that is still the previous day in UTC);
//! - `consent.explicit.recorded_at`: not before [`EARLIEST_DATE`], not after `referred_at` plus
//!   [`CLOCK_SKEW`] (consent is recorded before the referral is made).
//!
//! Values that do not parse are left to the format rules (`invalid_date`, `invalid_timestamp`).
//! Pure: `now` is an argument.

use std::collections::HashSet;
use std::fmt;

use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{date, timestamp, FieldError, Referral};

/// Oldest `referred_at` accepted, in days before now.
pub const MAX_AGE_DAYS: i64 = 365;

/// How far a provider's clock may run ahead of this node's.
pub const CLOCK_SKEW: Duration = Duration::minutes(5);

/// No date in a referral is earlier than this (`1900-01-01`).
pub const EARLIEST_DATE: NaiveDate = match NaiveDate::from_ymd_opt(1900, 1, 1) {
    Some(d) => d,
    None => panic!("1900-01-01 is a date"),
};

/// Every repeated key of the JSON document `bytes`, as `duplicate_key` errors. A document that
/// is not valid JSON yields none (the parser reports it).
pub fn duplicate_keys(bytes: &[u8]) -> Vec<FieldError> {
    let mut found = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let walked = Walk {
        path: String::new(),
        found: &mut found,
    }
    .deserialize(&mut de);
    if walked.is_err() {
        return Vec::new();
    }
    found
        .into_iter()
        .map(|path| {
            FieldError::new(
                &path,
                "duplicate_key",
                format!("'{path}' appears more than once; give each field once"),
            )
        })
        .collect()
}

/// Most duplicate paths reported for one document (the rest are the same mistake).
const MAX_REPORTED: usize = 20;

struct Walk<'a> {
    path: String,
    found: &'a mut Vec<String>,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0usize;
        loop {
            let child = Walk {
                path: format!("{}[{i}]", self.path),
                found: &mut *self.found,
            };
            if seq.next_element_seed(child)?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = if self.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.path)
            };
            if !seen.insert(key) {
                if self.found.len() < MAX_REPORTED && !self.found.contains(&path) {
                    self.found.push(path);
                }
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            map.next_value_seed(Walk {
                path,
                found: &mut *self.found,
            })?;
        }
        Ok(())
    }
}

fn out_of_range(field: &str, message: String) -> FieldError {
    FieldError::new(field, "date_out_of_range", message)
}

/// The plausible-range checks of the module doc, for a referral whose fields parsed.
pub fn date_ranges(r: &Referral, now: DateTime<Utc>) -> Vec<FieldError> {
    let mut e = Vec::new();
    let referred_at = timestamp(&r.referred_at);
    if let Some(at) = referred_at {
        if at < now - Duration::days(MAX_AGE_DAYS) {
            e.push(out_of_range(
                "referred_at",
                format!("'referred_at' is more than {MAX_AGE_DAYS} days ago"),
            ));
        } else if at > now + CLOCK_SKEW {
            e.push(out_of_range(
                "referred_at",
                format!(
                    "'referred_at' is in the future (more than {} minutes ahead of this node's clock)",
                    CLOCK_SKEW.num_minutes()
                ),
            ));
        }
    }
    let today = now.date_naive();
    if let Some(d) = r.victim.date_of_birth.as_deref().and_then(date) {
        if d < EARLIEST_DATE || d > today {
            e.push(out_of_range(
                "victim.date_of_birth",
                format!("'victim.date_of_birth' must be between {EARLIEST_DATE} and today"),
            ));
        }
    }
    if let Some(d) = r.offence.date.as_deref().and_then(date) {
        let latest = referred_at.map_or(today, |t| t.date_naive()) + Duration::days(1);
        if d < EARLIEST_DATE || d > latest {
            e.push(out_of_range(
                "offence.date",
                format!("'offence.date' must be between {EARLIEST_DATE} and the referral date"),
            ));
        }
    }
    let recorded_at = r
        .consent
        .explicit
        .as_ref()
        .and_then(|x| x.recorded_at.as_deref());
    if let Some(t) = recorded_at.and_then(timestamp) {
        let latest = referred_at.unwrap_or(now) + CLOCK_SKEW;
        if t.date_naive() < EARLIEST_DATE || t > latest {
            e.push(out_of_range(
                "consent.explicit.recorded_at",
                format!(
                    "'consent.explicit.recorded_at' must be between {EARLIEST_DATE} and \
                     'referred_at' (consent is recorded before the referral)"
                ),
            ));
        }
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::referral::parse_json;
    use serde_json::{json, Value};

    fn good() -> Value {
        json!({
            "schema": "refex.referral.v1",
            "source_system": "test-records",
            "source_ref": "R-1",
            "referred_at": "2026-11-20T14:03:00Z",
            "residence": { "area": "london" },
            "victim": { "name": "Test Person", "date_of_birth": "1980-01-01", "phone": "07700 900000" },
            "offence": { "category": "burglary", "date": "2026-11-19" },
            "consent": { "referral": true,
                         "explicit": { "given": true, "recorded_by": "PC 1", "recorded_at": "2026-11-20T13:00:00Z" } }
        })
    }

    fn now() -> DateTime<Utc> {
        "2026-12-02T12:00:00Z".parse().unwrap()
    }

    fn ranges_of(v: &Value) -> Vec<String> {
        // Read without the format rules, which would refuse some of these for other reasons.
        let r: Referral = serde_json::from_value(v.clone()).expect("reads");
        date_ranges(&r, now())
            .into_iter()
            .inspect(|e| assert_eq!(e.rule, "date_out_of_range"))
            .map(|e| e.field)
            .collect()
    }

    /// Only `referred_at` among the dates.
    fn bare() -> Value {
        let mut v = good();
        v["victim"].as_object_mut().unwrap().remove("date_of_birth");
        v["offence"].as_object_mut().unwrap().remove("date");
        v["consent"].as_object_mut().unwrap().remove("explicit");
        v
    }

    fn set(mut v: Value, path: &[&str], new: &str) -> Value {
        let mut cur = &mut v;
        for p in path {
            cur = &mut cur[*p];
        }
        *cur = json!(new);
        v
    }

    #[test]
    fn a_repeated_key_is_refused_naming_its_path() {
        let doc = br#"{"schema": "refex.referral.v1", "source_ref": "A", "source_ref": "B",
            "victim": {"name": "P", "name": "Q", "needs": [{"x": 1, "x": 2}]}}"#;
        let e = parse_json(doc).unwrap_err();
        let fields: Vec<(&str, &str)> = e
            .iter()
            .map(|e| (e.field.as_str(), e.rule.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("source_ref", "duplicate_key"),
                ("victim.name", "duplicate_key"),
                ("victim.needs[0].x", "duplicate_key"),
            ]
        );
    }

    #[test]
    fn equal_keys_in_different_objects_are_not_duplicates() {
        let doc = br#"{"a": {"name": 1}, "b": {"name": 2}, "c": [{"k": 1}, {"k": 2}]}"#;
        assert!(duplicate_keys(doc).is_empty());
        assert!(parse_json(good().to_string().as_bytes()).is_ok());
    }

    #[test]
    fn invalid_json_is_left_to_the_parser() {
        assert!(duplicate_keys(br#"{"a": 1, "a": "#).is_empty());
        assert_eq!(
            parse_json(br#"{"a": 1, "a": "#).unwrap_err()[0].rule,
            "invalid_json"
        );
    }

    #[test]
    fn plausible_dates_pass() {
        assert!(ranges_of(&good()).is_empty());
        // Five minutes of clock skew, and exactly the oldest day allowed.
        assert!(ranges_of(&set(bare(), &["referred_at"], "2026-12-02T12:04:59Z")).is_empty());
        assert!(ranges_of(&set(bare(), &["referred_at"], "2025-12-02T12:00:00Z")).is_empty());
        assert!(ranges_of(&set(good(), &["victim", "date_of_birth"], "1900-01-01")).is_empty());
        // The UK date just after midnight local time is the next UTC day.
        assert!(ranges_of(&set(good(), &["offence", "date"], "2026-11-21")).is_empty());
    }

    #[test]
    fn referred_at_far_in_the_past_or_in_the_future_is_refused() {
        for at in [
            "0000-01-01T00:00:00Z",
            "2025-12-02T11:59:59Z",
            "2026-12-02T12:05:01Z",
            "9999-12-31T23:59:59Z",
        ] {
            assert_eq!(
                ranges_of(&set(bare(), &["referred_at"], at)),
                ["referred_at"],
                "{at}"
            );
        }
    }

    #[test]
    fn dates_of_birth_offences_and_consent_are_bounded() {
        for (path, value) in [
            (&["victim", "date_of_birth"][..], "1899-12-31"),
            (&["victim", "date_of_birth"][..], "2026-12-03"),
            (&["offence", "date"][..], "0001-01-01"),
            (&["offence", "date"][..], "2026-11-22"),
            (
                &["consent", "explicit", "recorded_at"][..],
                "2026-11-20T14:08:01Z",
            ),
            (
                &["consent", "explicit", "recorded_at"][..],
                "1000-01-01T00:00:00Z",
            ),
        ] {
            let field = path.join(".");
            assert_eq!(ranges_of(&set(good(), path, value)), [field], "{value}");
        }
    }
}
