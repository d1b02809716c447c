//! The intake plan: what one outbox file becomes, decided before anything is moved.
//!
//! `plan(format, name, bytes, ctx, now)` parses, validates, routes and classifies every
//! referral of a file and returns a [`Plan`]: the accepted referrals (each with its row), the
//! refused rows (each with its errors and, where the source fields can be read, the
//! `(source_system, source_ref)` a subject key is made from), the CSV of refused rows to write
//! back, and the `NAME.error.json` document. The node then carries the plan out in one fixed
//! order (seal and queue the accepted ones, audit, write the refusals, remove the file), so the
//! path of a referral through the code never climbs back up from the file adapter to the model.
//! Pure: no I/O, no clock (`now` is an argument), no keys (subject keys are made by the caller).

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::json;

use crate::core::referral::bounds::date_ranges;
use crate::core::referral::csv::{column_for, parse_csv_rows, write_rows, CsvLimits};
use crate::core::referral::{classify, parse_json, Classified, Context, FieldError, Referral};

/// How a file's bytes are to be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One referral (`*.json`).
    Json,
    /// A batch, one referral per row (`*.csv`).
    Csv,
}

/// The source fields a subject key is made from, when they could be read.
pub type SourceRef = Option<(String, String)>;

/// One referral that passed every rule, as intake needs it from here on: the envelope's
/// payload (the referral as CBOR, encoded once, here) and the fields intake records, not the
/// parsed referral — a large batch holds one of these per row until its slice is sealed, and
/// the encoded form is smaller (a 50,000-row batch peaked ~17 MB lower, ~340 B a row).
#[derive(Debug)]
pub struct Accepted {
    /// The referral as CBOR ([`Referral::to_cbor`]), sealed as it is.
    pub payload: Vec<u8>,
    pub source_system: String,
    pub source_ref: String,
    /// The day of `referred_at` (validation refuses a referral whose `referred_at` does not parse).
    pub referred_on: Option<NaiveDate>,
    pub class: Classified,
    /// The CSV row (1 = first data row), `None` for a JSON file.
    pub row: Option<u64>,
}

impl Accepted {
    fn new(referral: Referral, class: Classified, row: Option<u64>) -> Self {
        let mut payload = referral.to_cbor();
        // The encoder grows its buffer by doubling; a batch holds many of these.
        payload.shrink_to_fit();
        Self {
            payload,
            referred_on: DateTime::parse_from_rfc3339(&referral.referred_at)
                .ok()
                .map(|d| d.date_naive()),
            source_system: referral.source_system,
            source_ref: referral.source_ref,
            class,
            row,
        }
    }
}

/// One refused row of a batch, or the refused file itself (`row: None`).
#[derive(Debug)]
pub struct Refused {
    pub row: Option<u64>,
    pub errors: Vec<FieldError>,
    pub source: SourceRef,
}

/// What to do with one file.
#[derive(Debug)]
pub enum Plan {
    /// Nothing in the file can be taken: move it whole to `rejected/` with `error_doc`.
    RefuseFile {
        refused: Refused,
        error_doc: Vec<u8>,
    },
    /// Take `accepted`; write the refused rows (if any) back as `rejected_csv` with `error_doc`.
    Take {
        accepted: Vec<Accepted>,
        refused: Vec<Refused>,
        batch: bool,
        /// The refused rows as CSV and their error document; `None` when every row was taken.
        rejected: Option<(Vec<u8>, Vec<u8>)>,
    },
}

/// Plans `bytes` (the content of the outbox file `name`).
pub fn plan(
    format: Format,
    name: &str,
    bytes: &[u8],
    ctx: &Context,
    csv_limits: &CsvLimits,
    now: DateTime<Utc>,
) -> Plan {
    match format {
        Format::Json => plan_json(name, bytes, ctx, now),
        Format::Csv => plan_csv(name, bytes, ctx, csv_limits, now),
    }
}

/// A whole-file refusal for a reason found before the content was read (a pickup refusal).
pub fn refuse_whole(name: &str, errors: Vec<FieldError>, now: DateTime<Utc>) -> Plan {
    let error_doc = error_document(name, now, &errors);
    Plan::RefuseFile {
        refused: Refused {
            row: None,
            errors,
            source: None,
        },
        error_doc,
    }
}

fn plan_json(name: &str, bytes: &[u8], ctx: &Context, now: DateTime<Utc>) -> Plan {
    let (errors, source) = match parse_json(bytes) {
        Err(errors) => (errors, source_of_json(bytes)),
        Ok(referral) => match judge(&referral, ctx, now) {
            Ok(class) => {
                return Plan::Take {
                    accepted: vec![Accepted::new(referral, class, None)],
                    refused: Vec::new(),
                    batch: false,
                    rejected: None,
                }
            }
            Err(errors) => {
                let source = Some((referral.source_system, referral.source_ref));
                (errors, source)
            }
        },
    };
    let error_doc = error_document(name, now, &errors);
    Plan::RefuseFile {
        refused: Refused {
            row: None,
            errors,
            source,
        },
        error_doc,
    }
}

fn plan_csv(
    name: &str,
    bytes: &[u8],
    ctx: &Context,
    limits: &CsvLimits,
    now: DateTime<Utc>,
) -> Plan {
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    let mut bad_rows = Vec::new();
    // Each row is judged as it is read and taken apart, not copied: an accepted row's referral
    // moves into the plan and the rest of the row is let go, so a large batch is not held as
    // rows and as a plan at once (a refused row is kept whole, for `rejected/`).
    let header = parse_csv_rows(bytes, limits, |header, mut row| {
        let parsed = std::mem::replace(&mut row.parsed, Err(Vec::new()));
        let outcome = parsed.and_then(|r| judge(&r, ctx, now).map(|c| (r, c)));
        match outcome {
            Ok((referral, class)) => accepted.push(Accepted::new(referral, class, Some(row.row))),
            Err(mut errors) => {
                for err in &mut errors {
                    err.row = Some(row.row);
                    if err.field.contains('.') {
                        err.field = column_for(&err.field);
                    }
                }
                refused.push(Refused {
                    row: Some(row.row),
                    errors,
                    source: source_of_row(header, &row.raw),
                });
                bad_rows.push(row);
            }
        }
    });
    let header = match header {
        Ok(h) => h,
        Err(errors) => {
            let error_doc = error_document(name, now, &errors);
            return Plan::RefuseFile {
                refused: Refused {
                    row: None,
                    errors,
                    source: None,
                },
                error_doc,
            };
        }
    };
    let rejected = (!bad_rows.is_empty()).then(|| {
        let all: Vec<FieldError> = refused.iter().flat_map(|r| r.errors.clone()).collect();
        (
            write_rows(&header, &bad_rows),
            error_document(name, now, &all),
        )
    });
    Plan::Take {
        accepted,
        refused,
        batch: true,
        rejected,
    }
}

/// Classifies a parsed referral and checks its dates against `now` (every problem reported).
fn judge(r: &Referral, ctx: &Context, now: DateTime<Utc>) -> Result<Classified, Vec<FieldError>> {
    let ranges = date_ranges(r, now);
    match classify(r, ctx) {
        Ok(class) if ranges.is_empty() => Ok(class),
        Ok(_) => Err(ranges),
        Err(mut errors) => {
            errors.extend(ranges);
            Err(errors)
        }
    }
}

/// The `NAME.error.json` document of REFERRAL.md.
pub fn error_document(file: &str, now: DateTime<Utc>, errors: &[FieldError]) -> Vec<u8> {
    let doc = json!({
        "file": file,
        "refused_at": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "errors": errors,
    });
    serde_json::to_vec_pretty(&doc).unwrap_or_default()
}

/// The source fields of a refused JSON file, when they can be read at all.
fn source_of_json(bytes: &[u8]) -> SourceRef {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let system = v.get("source_system")?.as_str()?;
    let reference = v.get("source_ref")?.as_str()?;
    Some((system.to_owned(), reference.to_owned()))
}

/// The source fields of a refused CSV row, when its source columns are present.
fn source_of_row(header: &[String], raw: &[String]) -> SourceRef {
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .and_then(|i| raw.get(i))
            .filter(|v| !v.is_empty())
            .cloned()
    };
    Some((col("source_system")?, col("source_ref")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::calendar::Calendar;
    use crate::core::routing::RoutingTable;
    use crate::core::types::AreaId;

    fn with_ctx<T>(f: impl FnOnce(&Context) -> T) -> T {
        let routing = RoutingTable::from_toml(include_str!("../../config/postcodes.toml")).unwrap();
        let calendar =
            Calendar::from_toml(include_str!("../../config/bank-holidays.toml")).unwrap();
        let known = |_: &AreaId| true;
        f(&Context {
            routing: &routing,
            calendar: &calendar,
            is_known_area: &known,
        })
    }

    fn limits() -> CsvLimits {
        CsvLimits {
            max_rows: 100,
            max_field_bytes: 8192,
        }
    }

    fn now() -> DateTime<Utc> {
        "2026-11-20T15:00:00Z".parse().unwrap()
    }

    #[test]
    fn the_sample_batch_plans_its_good_rows_and_lists_the_bad_ones_with_their_source() {
        let bytes = include_bytes!("../../config/samples/daily-2026-11-20.csv");
        let plan = with_ctx(|ctx| plan(Format::Csv, "daily.csv", bytes, ctx, &limits(), now()));
        let Plan::Take {
            accepted,
            refused,
            batch,
            rejected,
        } = plan
        else {
            panic!("the sample batch is taken");
        };
        assert!(batch);
        assert!(!accepted.is_empty());
        assert_eq!(refused.len(), 2, "the sample has two bad rows");
        assert!(refused
            .iter()
            .all(|r| r.row.is_some() && !r.errors.is_empty()));
        let (csv, doc) = rejected.expect("bad rows are written back");
        let csv = String::from_utf8(csv).unwrap();
        assert_eq!(csv.lines().count(), 3, "header and two rows: {csv}");
        let doc: serde_json::Value = serde_json::from_slice(&doc).unwrap();
        assert_eq!(doc["file"], "daily.csv");
        assert_eq!(doc["refused_at"], "2026-11-20T15:00:00Z");
    }

    #[test]
    fn an_accepted_referral_is_held_as_the_payload_of_the_referral_it_was_parsed_from() {
        let bytes = include_bytes!("../../config/samples/burglary-greater-manchester.json");
        let plan = with_ctx(|ctx| plan(Format::Json, "b.json", bytes, ctx, &limits(), now()));
        let Plan::Take { accepted, .. } = plan else {
            panic!("the sample is taken");
        };
        let [a] = &accepted[..] else {
            panic!("one referral");
        };
        let parsed = parse_json(bytes).unwrap();
        assert_eq!(
            a.payload,
            parsed.to_cbor(),
            "sealed as it would have been encoded"
        );
        assert_eq!(
            Referral::from_cbor(&a.payload).unwrap().to_cbor(),
            a.payload
        );
        assert_eq!(
            (a.source_system.as_str(), a.source_ref.as_str()),
            (parsed.source_system.as_str(), parsed.source_ref.as_str())
        );
        let day = DateTime::parse_from_rfc3339(&parsed.referred_at).unwrap();
        assert_eq!(a.referred_on, Some(day.date_naive()));
        assert_eq!(a.payload.capacity(), a.payload.len(), "held without slack");
    }

    #[test]
    fn a_json_file_that_breaks_a_rule_is_refused_whole_and_keeps_its_source_reference() {
        let mut v: serde_json::Value = serde_json::from_slice(include_bytes!(
            "../../config/samples/burglary-greater-manchester.json"
        ))
        .unwrap();
        v["consent"]["referral"] = serde_json::Value::Bool(false);
        let bytes = serde_json::to_vec(&v).unwrap();
        let plan = with_ctx(|ctx| plan(Format::Json, "x.json", &bytes, ctx, &limits(), now()));
        let Plan::RefuseFile { refused, error_doc } = plan else {
            panic!("refused");
        };
        assert_eq!(refused.row, None);
        let (system, _) = refused.source.expect("source fields readable");
        assert_eq!(system, v["source_system"].as_str().unwrap());
        let doc: serde_json::Value = serde_json::from_slice(&error_doc).unwrap();
        assert!(!doc["errors"].as_array().unwrap().is_empty());
    }

    #[test]
    fn good_rows_before_a_file_level_error_are_not_taken_the_batch_is_refused_whole() {
        // Rows are judged as they are read: the 100 before the error (one row more than the
        // limit) were already accepted when it came, and must not survive into the plan.
        let sample = include_str!("../../config/samples/daily-2026-11-20.csv");
        let (header, rest) = sample.split_once('\n').unwrap();
        let good = rest.lines().next().unwrap();
        let rows = std::iter::repeat_n(good, 101)
            .collect::<Vec<_>>()
            .join("\n");
        let csv = format!("{header}\n{rows}\n");
        let within = format!("{header}\n{}\n", rows.split_once('\n').unwrap().1);
        let plan_of = |csv: &str| {
            with_ctx(|ctx| plan(Format::Csv, "b.csv", csv.as_bytes(), ctx, &limits(), now()))
        };
        let Plan::Take { accepted, .. } = plan_of(&within) else {
            panic!("100 good rows are taken");
        };
        assert_eq!(accepted.len(), 100);
        let Plan::RefuseFile { refused, .. } = plan_of(&csv) else {
            panic!("101 rows: the batch is refused whole, no row taken");
        };
        assert_eq!(refused.row, None);
        assert_eq!(
            refused.errors[0].rule, "too_many_rows",
            "{:?}",
            refused.errors
        );
    }

    #[test]
    fn unreadable_json_is_refused_without_a_source() {
        let plan = with_ctx(|ctx| plan(Format::Json, "x.json", b"{", ctx, &limits(), now()));
        assert!(matches!(
            plan,
            Plan::RefuseFile {
                refused: Refused { source: None, .. },
                ..
            }
        ));
    }
}
