//! The `refex.referral.v1` model (shared/REFERRAL.md, the provider contract) and its
//! validation, routing and classification. Pure: no I/O, time passed in.
//!
//! Parsing goes through a JSON value first so that every structural problem can be named by
//! its path (`victim.phone`) and all of them reported at once: unknown fields, missing required
//! fields, wrong types. The typed [`Referral`] keeps dates and timestamps as the strings the
//! provider sent (validated), so the inbox receives "the referral object as sent".
//! Error messages never quote personal values (names, contact details, dates of birth, notes);
//! they may quote a postcode's outward code or an enum value.
//! The payload inside an envelope is this struct as CBOR ([`Referral::to_cbor`]).

pub mod bounds;
pub mod csv;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::core::calendar::Calendar;
use crate::core::routing::RoutingTable;
use crate::core::types::{AreaId, PriorityClass};

pub const SCHEMA_V1: &str = "refex.referral.v1";

/// One problem with a referral: which row (CSV), field, rule, and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub row: Option<u64>,
    pub field: String,
    pub rule: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, rule: &str, message: impl Into<String>) -> Self {
        Self {
            row: None,
            field: field.to_owned(),
            rule: rule.to_owned(),
            message: message.into(),
        }
    }
}

/// Offence categories (REFERRAL.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffenceCategory {
    SexualOffence,
    DomesticAbuse,
    HateCrime,
    Fraud,
    Burglary,
    Robbery,
    Theft,
    CriminalDamage,
    Violence,
    ModernSlavery,
    Terrorism,
    HomicideBereaved,
    RoadDeathBereaved,
    Other,
}

impl OffenceCategory {
    pub const ALL: [Self; 14] = [
        Self::SexualOffence,
        Self::DomesticAbuse,
        Self::HateCrime,
        Self::Fraud,
        Self::Burglary,
        Self::Robbery,
        Self::Theft,
        Self::CriminalDamage,
        Self::Violence,
        Self::ModernSlavery,
        Self::Terrorism,
        Self::HomicideBereaved,
        Self::RoadDeathBereaved,
        Self::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SexualOffence => "sexual_offence",
            Self::DomesticAbuse => "domestic_abuse",
            Self::HateCrime => "hate_crime",
            Self::Fraud => "fraud",
            Self::Burglary => "burglary",
            Self::Robbery => "robbery",
            Self::Theft => "theft",
            Self::CriminalDamage => "criminal_damage",
            Self::Violence => "violence",
            Self::ModernSlavery => "modern_slavery",
            Self::Terrorism => "terrorism",
            Self::HomicideBereaved => "homicide_bereaved",
            Self::RoadDeathBereaved => "road_death_bereaved",
            Self::Other => "other",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Victims of sexual or domestic violence and close bereaved relatives: their details travel
    /// only with explicit consent (Victims' Code).
    pub fn requires_explicit_consent(self) -> bool {
        matches!(
            self,
            Self::SexualOffence
                | Self::DomesticAbuse
                | Self::HomicideBereaved
                | Self::RoadDeathBereaved
        )
    }
}

fn is_none_or_empty<T>(v: &Option<Vec<T>>) -> bool {
    v.as_ref().is_none_or(Vec::is_empty)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Residence {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcode: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Victim {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_of_birth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_language: Option<String>,
    #[serde(default, skip_serializing_if = "is_none_or_empty")]
    pub needs: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offence {
    pub category: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crime_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorityFlags {
    #[serde(default)]
    pub most_serious_crime: bool,
    #[serde(default)]
    pub persistently_targeted: bool,
    #[serde(default)]
    pub vulnerable_or_intimidated: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplicitConsent {
    pub given: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_at: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consent {
    pub referral: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explicit: Option<ExplicitConsent>,
}

/// A referral as REFERRAL.md defines it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Referral {
    pub schema: String,
    pub source_system: String,
    pub source_ref: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referring_org: Option<String>,
    pub referred_at: String,
    pub residence: Residence,
    pub victim: Victim,
    pub offence: Offence,
    #[serde(default)]
    pub priority: PriorityFlags,
    pub consent: Consent,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
}

/// Known fields per object path ("" is the top level); anything else is `unknown_field`.
const KNOWN: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "schema",
            "source_system",
            "source_ref",
            "referring_org",
            "referred_at",
            "residence",
            "victim",
            "offence",
            "priority",
            "consent",
            "incident",
            "notes",
        ],
    ),
    ("residence", &["area", "postcode"]),
    (
        "victim",
        &[
            "name",
            "date_of_birth",
            "phone",
            "email",
            "address",
            "preferred_language",
            "needs",
        ],
    ),
    ("offence", &["category", "crime_ref", "date"]),
    (
        "priority",
        &[
            "most_serious_crime",
            "persistently_targeted",
            "vulnerable_or_intimidated",
        ],
    ),
    ("consent", &["referral", "explicit"]),
    ("consent.explicit", &["given", "recorded_by", "recorded_at"]),
];

/// Required fields (paths).
const REQUIRED: &[&str] = &[
    "schema",
    "source_system",
    "source_ref",
    "referred_at",
    "residence",
    "victim",
    "victim.name",
    "offence",
    "offence.category",
    "consent",
    "consent.referral",
];

/// Longest accepted value per field; free text gets more room.
fn max_len(path: &str) -> usize {
    match path {
        "notes" => 4000,
        "victim.address" => 500,
        "victim.name" | "referring_org" => 200,
        _ => 100,
    }
}

fn get<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .filter(|v| !v.is_null())
}

/// Reports every key of `obj` (at `path`, which it extends in place and restores) that the
/// schema does not know. The path is one buffer for the whole walk: a valid referral (most of
/// them) allocates nothing here, where a string per key was ~19 allocations a CSV row.
fn walk_unknown(obj: &Map<String, Value>, path: &mut String, errors: &mut Vec<FieldError>) {
    let known = KNOWN
        .iter()
        .find(|(p, _)| *p == path.as_str())
        .map(|(_, k)| *k)
        .unwrap_or(&[]);
    for (k, v) in obj {
        if !known.contains(&k.as_str()) {
            unknown_field(path, k, errors);
            continue;
        }
        let Value::Object(o) = v else { continue };
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(k);
        walk_unknown(o, path, errors);
        path.truncate(len);
    }
}

fn unknown_field(path: &str, key: &str, errors: &mut Vec<FieldError>) {
    let child = if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    };
    errors.push(FieldError::new(
        &child,
        "unknown_field",
        format!("'{child}' is not a field of {SCHEMA_V1} (check the spelling)"),
    ));
}

/// Parses and validates one JSON referral, reporting every problem found.
pub fn parse_json(bytes: &[u8]) -> Result<Referral, Vec<FieldError>> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        vec![FieldError::new(
            "-",
            "invalid_json",
            format!(
                "not valid JSON (line {}, column {}): {}",
                e.line(),
                e.column(),
                e.classify_message()
            ),
        )]
    })?;
    let duplicates = bounds::duplicate_keys(bytes);
    if !duplicates.is_empty() {
        return Err(duplicates);
    }
    parse_value(value)
}

trait ClassifyMessage {
    fn classify_message(&self) -> &'static str;
}

impl ClassifyMessage for serde_json::Error {
    fn classify_message(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Eof => "the file ends too early",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Io => "read error",
            serde_json::error::Category::Data => "unexpected value",
        }
    }
}

/// Validates a JSON value as a referral (shared by JSON files and CSV rows).
pub fn parse_value(value: Value) -> Result<Referral, Vec<FieldError>> {
    let Value::Object(obj) = &value else {
        return Err(vec![FieldError::new(
            "-",
            "invalid_json",
            "a referral must be a JSON object",
        )]);
    };
    let mut errors = Vec::new();
    walk_unknown(obj, &mut String::new(), &mut errors);
    for path in REQUIRED {
        if get(&value, path).is_none() {
            let parent_missing = path
                .rsplit_once('.')
                .is_some_and(|(p, _)| get(&value, p).is_none());
            if !parent_missing {
                errors.push(FieldError::new(
                    path,
                    "required",
                    format!("'{path}' is required"),
                ));
            }
        }
    }
    // Types, field by field, so each wrong type is named.
    for (path, kind) in TYPES {
        if let Some(v) = get(&value, path) {
            let ok = match kind {
                Kind::Str => v.is_string(),
                Kind::Bool => v.is_boolean(),
                Kind::Obj => v.is_object(),
                Kind::StrList => v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
            };
            if !ok {
                errors.push(FieldError::new(
                    path,
                    "invalid_type",
                    format!("'{path}' must be {}", kind.describe()),
                ));
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let referral: Referral = serde_json::from_value(value).map_err(|e| {
        vec![FieldError::new(
            "-",
            "invalid_type",
            format!("structure not as specified: {e}"),
        )]
    })?;
    let errors = validate(&referral);
    if errors.is_empty() {
        Ok(referral)
    } else {
        Err(errors)
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Bool,
    Obj,
    StrList,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Self::Str => "text",
            Self::Bool => "true or false",
            Self::Obj => "an object",
            Self::StrList => "a list of text",
        }
    }
}

const TYPES: &[(&str, Kind)] = &[
    ("schema", Kind::Str),
    ("source_system", Kind::Str),
    ("source_ref", Kind::Str),
    ("referring_org", Kind::Str),
    ("referred_at", Kind::Str),
    ("residence", Kind::Obj),
    ("residence.area", Kind::Str),
    ("residence.postcode", Kind::Str),
    ("victim", Kind::Obj),
    ("victim.name", Kind::Str),
    ("victim.date_of_birth", Kind::Str),
    ("victim.phone", Kind::Str),
    ("victim.email", Kind::Str),
    ("victim.address", Kind::Str),
    ("victim.preferred_language", Kind::Str),
    ("victim.needs", Kind::StrList),
    ("offence", Kind::Obj),
    ("offence.category", Kind::Str),
    ("offence.crime_ref", Kind::Str),
    ("offence.date", Kind::Str),
    ("priority", Kind::Obj),
    ("priority.most_serious_crime", Kind::Bool),
    ("priority.persistently_targeted", Kind::Bool),
    ("priority.vulnerable_or_intimidated", Kind::Bool),
    ("consent", Kind::Obj),
    ("consent.referral", Kind::Bool),
    ("consent.explicit", Kind::Obj),
    ("consent.explicit.given", Kind::Bool),
    ("consent.explicit.recorded_by", Kind::Str),
    ("consent.explicit.recorded_at", Kind::Str),
    ("incident", Kind::Str),
    ("notes", Kind::Str),
];

fn timestamp(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|d| d.with_timezone(&Utc))
}

fn date(s: &str) -> Option<NaiveDate> {
    (s.len() == 10)
        .then(|| NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
        .flatten()
}

/// The rule checks on a structurally valid referral.
pub fn validate(r: &Referral) -> Vec<FieldError> {
    let mut e = Vec::new();
    if r.schema != SCHEMA_V1 {
        e.push(FieldError::new(
            "schema",
            "wrong_schema",
            format!("schema must be '{SCHEMA_V1}'"),
        ));
    }
    for (path, v) in [
        ("source_system", &r.source_system),
        ("source_ref", &r.source_ref),
        ("victim.name", &r.victim.name),
    ] {
        if v.trim().is_empty() {
            e.push(FieldError::new(
                path,
                "required",
                format!("'{path}' must not be empty"),
            ));
        }
    }
    let texts: [(&str, Option<&String>); 15] = [
        ("source_system", Some(&r.source_system)),
        ("source_ref", Some(&r.source_ref)),
        ("referring_org", r.referring_org.as_ref()),
        ("residence.area", r.residence.area.as_ref()),
        ("residence.postcode", r.residence.postcode.as_ref()),
        ("victim.name", Some(&r.victim.name)),
        ("victim.phone", r.victim.phone.as_ref()),
        ("victim.email", r.victim.email.as_ref()),
        ("victim.address", r.victim.address.as_ref()),
        (
            "victim.preferred_language",
            r.victim.preferred_language.as_ref(),
        ),
        ("offence.crime_ref", r.offence.crime_ref.as_ref()),
        (
            "consent.explicit.recorded_by",
            r.consent
                .explicit
                .as_ref()
                .and_then(|x| x.recorded_by.as_ref()),
        ),
        ("incident", r.incident.as_ref()),
        ("notes", r.notes.as_ref()),
        ("offence.category", Some(&r.offence.category)),
    ];
    for (path, v) in texts {
        if let Some(v) = v {
            if v.chars().count() > max_len(path) {
                e.push(FieldError::new(
                    path,
                    "too_long",
                    format!("'{path}' is longer than {} characters", max_len(path)),
                ));
            }
        }
    }
    if let Some(needs) = &r.victim.needs {
        if needs.len() > 20 || needs.iter().any(|n| n.chars().count() > 100) {
            e.push(FieldError::new(
                "victim.needs",
                "too_long",
                "at most 20 needs of at most 100 characters each",
            ));
        }
    }
    let referred_at = timestamp(&r.referred_at);
    if referred_at.is_none() {
        e.push(FieldError::new(
            "referred_at",
            "invalid_timestamp",
            "must be an RFC 3339 timestamp, e.g. 2026-11-20T14:03:00Z",
        ));
    }
    match (&r.residence.area, &r.residence.postcode) {
        (None, None) => e.push(FieldError::new(
            "residence",
            "residence_required",
            "give residence.area or residence.postcode",
        )),
        (Some(a), _) if AreaId::parse(a).is_err() => e.push(FieldError::new(
            "residence.area",
            "invalid_area_id",
            "an area id is lower case letters, digits and '-', e.g. west-midlands",
        )),
        _ => {}
    }
    if let Some(dob) = &r.victim.date_of_birth {
        match date(dob) {
            None => e.push(FieldError::new(
                "victim.date_of_birth",
                "invalid_date",
                "must be a date YYYY-MM-DD",
            )),
            Some(d) if referred_at.is_some_and(|t| d > t.date_naive()) => e.push(FieldError::new(
                "victim.date_of_birth",
                "date_of_birth_in_future",
                "date of birth is after the referral date",
            )),
            _ => {}
        }
    }
    let no_contact = [&r.victim.phone, &r.victim.email, &r.victim.address]
        .iter()
        .all(|c| c.as_ref().is_none_or(|s| s.trim().is_empty()));
    if no_contact {
        e.push(FieldError::new(
            "victim",
            "contact_required",
            "give at least one of victim.phone, victim.email, victim.address",
        ));
    }
    let category = OffenceCategory::parse(&r.offence.category);
    if category.is_none() {
        let allowed: Vec<&str> = OffenceCategory::ALL.iter().map(|c| c.as_str()).collect();
        e.push(FieldError::new(
            "offence.category",
            "unknown_category",
            format!("must be one of: {}", allowed.join(", ")),
        ));
    }
    if let Some(d) = &r.offence.date {
        if date(d).is_none() {
            e.push(FieldError::new(
                "offence.date",
                "invalid_date",
                "must be a date YYYY-MM-DD",
            ));
        }
    }
    if let Some(x) = &r.consent.explicit {
        if let Some(at) = &x.recorded_at {
            if timestamp(at).is_none() {
                e.push(FieldError::new(
                    "consent.explicit.recorded_at",
                    "invalid_timestamp",
                    "must be an RFC 3339 timestamp",
                ));
            }
        }
    }
    if !r.consent.referral {
        e.push(FieldError::new(
            "consent.referral",
            "consent_declined",
            "the victim declined referral; it must not be sent",
        ));
    } else if category.is_some_and(OffenceCategory::requires_explicit_consent) {
        let explicit = r.consent.explicit.as_ref().is_some_and(|x| {
            x.given
                && x.recorded_by.as_ref().is_some_and(|b| !b.trim().is_empty())
                && x.recorded_at.is_some()
        });
        if !explicit {
            e.push(FieldError::new(
                "consent.explicit",
                "explicit_consent_required",
                format!(
                    "a {} referral travels only with explicit consent: consent.explicit.given true, recorded_by and recorded_at",
                    r.offence.category
                ),
            ));
        }
    }
    e
}

/// Routing and scheduling facts derived from a valid referral.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Classified {
    pub to: AreaId,
    pub priority: PriorityClass,
    pub due_by: DateTime<Utc>,
    pub category: OffenceCategory,
    pub incident: Option<String>,
}

/// What classification needs from configuration.
pub struct Context<'a> {
    pub routing: &'a RoutingTable,
    pub calendar: &'a Calendar,
    pub is_known_area: &'a (dyn Fn(&AreaId) -> bool + Sync),
}

fn under_18(dob: NaiveDate, on: NaiveDate) -> bool {
    let mut age = on.year() - dob.year();
    if (on.month(), on.day()) < (dob.month(), dob.day()) {
        age -= 1;
    }
    age < 18
}

/// Routes (area id wins over postcode; unknown → refused), classifies priority, computes due_by.
pub fn classify(r: &Referral, ctx: &Context) -> Result<Classified, Vec<FieldError>> {
    let mut errors = validate(r);
    if !errors.is_empty() {
        return Err(errors);
    }
    let to = match (&r.residence.area, &r.residence.postcode) {
        (Some(a), _) => match AreaId::parse(a) {
            Ok(id) if (ctx.is_known_area)(&id) => Some(id),
            _ => {
                errors.push(FieldError::new(
                    "residence.area",
                    "unknown_area",
                    format!("area '{a}' is not in the peer directory"),
                ));
                None
            }
        },
        (None, Some(p)) => match ctx.routing.resolve(p) {
            Some(id) if (ctx.is_known_area)(id) => Some(id.clone()),
            _ => {
                let outward = RoutingTable::outward_code(p).unwrap_or_else(|| "?".into());
                errors.push(FieldError::new(
                    "residence.postcode",
                    "unknown_area",
                    format!("postcode district '{outward}' matches no area in the routing table"),
                ));
                None
            }
        },
        (None, None) => None,
    };
    let (Some(to), Some(referred_at), Some(category)) = (
        to,
        timestamp(&r.referred_at),
        OffenceCategory::parse(&r.offence.category),
    ) else {
        return Err(errors);
    };
    let child = r
        .victim
        .date_of_birth
        .as_deref()
        .and_then(date)
        .is_some_and(|d| under_18(d, referred_at.date_naive()));
    let flags = &r.priority;
    let enhanced = flags.most_serious_crime
        || flags.persistently_targeted
        || flags.vulnerable_or_intimidated
        || child;
    Ok(Classified {
        to,
        priority: if enhanced {
            PriorityClass::Enhanced
        } else {
            PriorityClass::Standard
        },
        due_by: ctx.calendar.due_by(referred_at),
        category,
        incident: r.incident.clone(),
    })
}

impl Referral {
    /// The idempotency key: the same source system and reference is the same referral.
    pub fn idempotency_key(&self) -> String {
        format!("{}\u{1f}{}", self.source_system, self.source_ref)
    }

    pub fn to_cbor(&self) -> Vec<u8> {
        serde_cbor::to_vec(self).unwrap_or_default()
    }

    pub fn from_cbor(b: &[u8]) -> Result<Self, serde_cbor::Error> {
        serde_cbor::from_slice(b)
    }
}

/// The `delivery` object added to a referral in the inbox.
#[derive(Clone, Debug, Serialize)]
pub struct Delivery {
    pub envelope_id: String,
    pub from_area: String,
    pub to_area: String,
    pub received_at: DateTime<Utc>,
    pub priority: PriorityClass,
    pub due_by: DateTime<Utc>,
}

/// The inbox file: the referral as sent plus `delivery`, pretty JSON.
pub fn inbox_document(r: &Referral, d: &Delivery) -> Vec<u8> {
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    if let Value::Object(o) = &mut v {
        let d = serde_json::json!({
            "envelope_id": d.envelope_id,
            "from_area": d.from_area,
            "to_area": d.to_area,
            "received_at": d.received_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "priority": d.priority,
            "due_by": d.due_by.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        });
        o.insert("delivery".into(), d);
    }
    let mut out = serde_json::to_vec_pretty(&v).unwrap_or_default();
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests;
