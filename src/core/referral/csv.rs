//! CSV batches (REFERRAL.md): RFC 4180 with a header row, UTF-8 with or without a BOM, CRLF or
//! LF, quoted fields with commas, quotes and newlines; one referral per row, each validated on
//! its own. Rows are numbered from 1 for the first data row (the header is not counted).
//! Errors name the row and the column; the refused rows can be written back as CSV with the
//! same header so a provider can fix and re-drop them.

use serde_json::{Map, Value};

use super::{parse_value, FieldError, Referral};

/// Bounds on a batch.
#[derive(Clone, Debug)]
pub struct CsvLimits {
    pub max_rows: usize,
    pub max_field_bytes: usize,
}

/// One data row.
#[derive(Clone, Debug)]
pub struct CsvRow {
    pub row: u64,
    pub raw: Vec<String>,
    pub parsed: Result<Referral, Vec<FieldError>>,
}

/// A parsed batch.
#[derive(Clone, Debug)]
pub struct CsvBatch {
    pub header: Vec<String>,
    pub rows: Vec<CsvRow>,
}

#[derive(Clone, Copy)]
enum Col {
    Text,
    Bool,
    List,
}

/// Column → JSON path and kind. The column table in `config/csv-columns.md` documents these.
const COLUMNS: &[(&str, &str, Col)] = &[
    ("source_system", "source_system", Col::Text),
    ("source_ref", "source_ref", Col::Text),
    ("referring_org", "referring_org", Col::Text),
    ("referred_at", "referred_at", Col::Text),
    ("residence_area", "residence.area", Col::Text),
    ("residence_postcode", "residence.postcode", Col::Text),
    ("victim_name", "victim.name", Col::Text),
    ("victim_date_of_birth", "victim.date_of_birth", Col::Text),
    ("victim_phone", "victim.phone", Col::Text),
    ("victim_email", "victim.email", Col::Text),
    ("victim_address", "victim.address", Col::Text),
    ("preferred_language", "victim.preferred_language", Col::Text),
    ("needs", "victim.needs", Col::List),
    ("offence_category", "offence.category", Col::Text),
    ("crime_ref", "offence.crime_ref", Col::Text),
    ("offence_date", "offence.date", Col::Text),
    (
        "most_serious_crime",
        "priority.most_serious_crime",
        Col::Bool,
    ),
    (
        "persistently_targeted",
        "priority.persistently_targeted",
        Col::Bool,
    ),
    (
        "vulnerable_or_intimidated",
        "priority.vulnerable_or_intimidated",
        Col::Bool,
    ),
    ("consent_referral", "consent.referral", Col::Bool),
    ("explicit_consent", "consent.explicit.given", Col::Bool),
    (
        "consent_recorded_by",
        "consent.explicit.recorded_by",
        Col::Text,
    ),
    (
        "consent_recorded_at",
        "consent.explicit.recorded_at",
        Col::Text,
    ),
    ("incident", "incident", Col::Text),
    ("notes", "notes", Col::Text),
];

/// The CSV column for a JSON path (for error messages), or the path itself.
pub fn column_for(path: &str) -> String {
    COLUMNS
        .iter()
        .find(|(_, p, _)| *p == path)
        .map(|(c, ..)| (*c).to_owned())
        .unwrap_or_else(|| match path {
            "consent.explicit" => "explicit_consent".into(),
            "victim" => "victim_phone/victim_email/victim_address".into(),
            "residence" => "residence_area/residence_postcode".into(),
            other => other.to_owned(),
        })
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Some(true),
        "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

fn set(obj: &mut Map<String, Value>, path: &str, v: Value) {
    let mut parts = path.split('.').peekable();
    let mut cur = obj;
    while let Some(p) = parts.next() {
        if parts.peek().is_none() {
            cur.insert(p.to_owned(), v);
            return;
        }
        let next = cur
            .entry(p.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(m) = next else { return };
        cur = m;
    }
}

fn row_to_referral(
    header: &[usize],
    raw: &[String],
    row: u64,
    limits: &CsvLimits,
) -> Result<Referral, Vec<FieldError>> {
    let mut obj = Map::new();
    obj.insert("schema".into(), Value::String(super::SCHEMA_V1.into()));
    let mut errors = Vec::new();
    for (i, cell) in raw.iter().enumerate() {
        let Some(&(column, path, kind)) = header.get(i).and_then(|c| COLUMNS.get(*c)) else {
            continue;
        };
        if cell.len() > limits.max_field_bytes {
            errors.push(FieldError {
                row: Some(row),
                field: column.into(),
                rule: "too_long".into(),
                message: format!("cell is longer than {} bytes", limits.max_field_bytes),
            });
            continue;
        }
        if cell.trim().is_empty() {
            continue;
        }
        let value = match kind {
            Col::Text => Value::String(cell.trim().to_owned()),
            Col::List => Value::Array(
                cell.split(';')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::String(s.into()))
                    .collect(),
            ),
            Col::Bool => match parse_bool(cell) {
                Some(b) => Value::Bool(b),
                None => {
                    errors.push(FieldError {
                        row: Some(row),
                        field: column.into(),
                        rule: "invalid_boolean".into(),
                        message: "use true/false, yes/no or 1/0".into(),
                    });
                    continue;
                }
            },
        };
        set(&mut obj, path, value);
    }
    // `explicit_consent` without a value but with recorder columns still forms the object.
    if let Some(Value::Object(c)) = obj.get_mut("consent") {
        if let Some(Value::Object(x)) = c.get_mut("explicit") {
            x.entry("given").or_insert(Value::Bool(false));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    parse_value(Value::Object(obj)).map_err(|es| {
        es.into_iter()
            .map(|mut e| {
                e.row = Some(row);
                e.field = column_for(&e.field);
                e.message = e
                    .message
                    .replace("victim.phone", "victim_phone")
                    .replace("victim.email", "victim_email")
                    .replace("victim.address", "victim_address");
                e
            })
            .collect()
    })
}

/// Parses a batch. File-level problems (encoding, header, size) refuse the whole file;
/// row-level problems are reported per row.
pub fn parse_csv(bytes: &[u8], limits: &CsvLimits) -> Result<CsvBatch, Vec<FieldError>> {
    let mut rows = Vec::new();
    let header = parse_csv_rows(bytes, limits, |_, row| rows.push(row))?;
    Ok(CsvBatch { header, rows })
}

/// [`parse_csv`] handing each row to `each` (with the header) as it is read, instead of
/// collecting them, so a caller that keeps less of a row than the row itself (intake's plan)
/// never holds a large batch twice. Returns the header; on a file-level problem, which may come
/// after rows were handed over, the error (the caller then drops what it kept).
pub fn parse_csv_rows(
    bytes: &[u8],
    limits: &CsvLimits,
    mut each: impl FnMut(&[String], CsvRow),
) -> Result<Vec<String>, Vec<FieldError>> {
    let file_err = |rule: &str, msg: String| {
        vec![FieldError {
            row: None,
            field: "file".into(),
            rule: rule.into(),
            message: msg,
        }]
    };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        file_err(
            "invalid_encoding",
            format!("not UTF-8 (first bad byte at offset {})", e.valid_up_to()),
        )
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = ::csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| file_err("invalid_csv", format!("header row unreadable: {e}")))?
        .iter()
        .map(|h| h.trim().to_owned())
        .collect();
    let mut errors = Vec::new();
    let mut index = Vec::new();
    for h in &header {
        match COLUMNS.iter().position(|(c, ..)| c == h) {
            Some(i) if index.contains(&i) => errors.push(FieldError {
                row: None,
                field: h.clone(),
                rule: "duplicate_column".into(),
                message: format!("column '{h}' appears twice"),
            }),
            Some(i) => index.push(i),
            None => errors.push(FieldError {
                row: None,
                field: h.chars().take(60).collect(),
                rule: "unknown_column".into(),
                message: "not a column of the refex CSV format (names are exact)".into(),
            }),
        }
    }
    for required in [
        "source_system",
        "source_ref",
        "referred_at",
        "victim_name",
        "offence_category",
        "consent_referral",
    ] {
        if !header.iter().any(|h| h == required) {
            errors.push(FieldError {
                row: None,
                field: required.into(),
                rule: "missing_column".into(),
                message: format!("required column '{required}' is missing"),
            });
        }
    }
    if !header
        .iter()
        .any(|h| h == "residence_area" || h == "residence_postcode")
    {
        errors.push(FieldError {
            row: None,
            field: "residence_area".into(),
            rule: "missing_column".into(),
            message: "a residence_area or residence_postcode column is required".into(),
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut rows = 0usize;
    for (i, record) in reader.records().enumerate() {
        let row = i as u64 + 1;
        // Blank rows count too: 60,000 empty lines are as much work as 60,000 referrals.
        if i >= limits.max_rows {
            return Err(file_err(
                "too_many_rows",
                format!("more than {} rows; split the batch", limits.max_rows),
            ));
        }
        let record = record.map_err(|e| file_err("invalid_csv", format!("row {row}: {e}")))?;
        let raw: Vec<String> = record.iter().map(str::to_owned).collect();
        if raw.iter().all(|c| c.trim().is_empty()) {
            continue;
        }
        let parsed = if raw.len() != header.len() {
            Err(vec![FieldError {
                row: Some(row),
                field: "-".into(),
                rule: "wrong_field_count".into(),
                message: format!(
                    "row has {} fields, the header has {}",
                    raw.len(),
                    header.len()
                ),
            }])
        } else {
            row_to_referral(&index, &raw, row, limits)
        };
        rows += 1;
        each(&header, CsvRow { row, raw, parsed });
    }
    if rows == 0 {
        return Err(file_err(
            "empty_batch",
            "the batch has a header but no referral rows".into(),
        ));
    }
    Ok(header)
}

/// A cell as it may be written back for a person to open in a spreadsheet: one that a
/// spreadsheet would run as a formula (`= + - @`, tab or CR first) gets a leading `'`
/// (OWASP, "CSV injection").
pub fn formula_safe(cell: &str) -> std::borrow::Cow<'_, str> {
    match cell.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => format!("'{cell}").into(),
        _ => cell.into(),
    }
}

/// Writes rows back as CSV with the batch's header (for `rejected/`), formula-safe.
pub fn write_rows(header: &[String], rows: &[CsvRow]) -> Vec<u8> {
    let mut w = ::csv::WriterBuilder::new()
        .flexible(true)
        .terminator(::csv::Terminator::CRLF)
        .from_writer(Vec::new());
    let _ = w.write_record(header);
    for r in rows {
        let _ = w.write_record(r.raw.iter().map(|c| formula_safe(c).into_owned()));
    }
    w.into_inner().unwrap_or_default()
}
