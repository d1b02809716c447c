//! Postcode routing: the configured postcode-prefix table, longest prefix wins. Pure.
//!
//! Table format (TOML, `config/postcodes.toml`):
//! ```toml
//! [prefixes]
//! "B" = "west-midlands"      # a postcode area (letters only)
//! "SK17" = "derbyshire"      # an outward code (district)
//! "SK1 1" = "greater-manchester"  # a sector (outward code + space + digit)
//! ```
//! Matching: the postcode and prefixes are upper-cased with all spaces removed; the longest
//! prefix that matches wins. Matching respects UK postcode structure so that nothing is ever
//! guessed: a letters-only prefix matches only the postcode's whole leading letter run ("B"
//! matches "B1 1AA" but not "BA1 1AA" — Bath is not Birmingham), and a prefix that ends in a
//! digit of the outward code matches only the whole outward code ("WA1" does not match
//! "WA10 1AA"). A sector prefix ("SK1 1") matches outward code + the first inward digit.
//! No match → the referral is refused, never routed by guess.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::core::types::AreaId;

/// Why a routing table is unusable.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("postcode table: {0}")]
    Parse(String),
    #[error("postcode table: prefix '{0}' is not a postcode area, district or sector")]
    BadPrefix(String),
    #[error("postcode table: prefix '{prefix}': {reason}")]
    BadArea { prefix: String, reason: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    prefixes: BTreeMap<String, String>,
}

/// A postcode split into its parts (normalised, no spaces).
struct Parts {
    area: String,
    outward: String,
    sector: Option<String>,
}

fn normalise(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_whitespace())
        .flat_map(char::to_uppercase)
        .collect()
}

/// Splits a full postcode (or a prefix) into area letters, outward code and sector.
/// A full postcode's inward code is always digit + two letters, so the outward code is
/// everything before the last three characters.
fn parts(postcode: &str) -> Option<Parts> {
    let p = normalise(postcode);
    if p.len() < 5 || p.len() > 7 || !p.is_ascii() {
        return None;
    }
    let (outward, inward) = p.split_at(p.len() - 3);
    let inb = inward.as_bytes();
    if !(inb[0].is_ascii_digit() && inb[1].is_ascii_alphabetic() && inb[2].is_ascii_alphabetic()) {
        return None;
    }
    let area: String = outward
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect();
    if area.is_empty() || area.len() > 2 || !outward.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    Some(Parts {
        area,
        outward: outward.to_owned(),
        sector: Some(format!("{outward}{}", &inward[..1])),
    })
}

/// What a table key matches.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Area(String),
    Outward(String),
    Sector(String),
}

fn parse_prefix(raw: &str) -> Option<Key> {
    let trimmed = raw.trim().to_uppercase();
    if trimmed.is_empty()
        || !trimmed
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == ' ')
    {
        return None;
    }
    if let Some((out, sector)) = trimmed.split_once(' ') {
        let sector = sector.trim();
        let valid = sector.len() == 1
            && sector.chars().all(|c| c.is_ascii_digit())
            && out.chars().next()?.is_ascii_alphabetic();
        return valid.then(|| Key::Sector(format!("{out}{sector}")));
    }
    if trimmed.chars().all(|c| c.is_ascii_alphabetic()) {
        return (trimmed.len() <= 2).then_some(Key::Area(trimmed));
    }
    let letters = trimmed
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .count();
    ((1..=2).contains(&letters) && trimmed.len() <= 4).then_some(Key::Outward(trimmed))
}

/// The routing table.
#[derive(Clone, Debug, Default)]
pub struct RoutingTable {
    entries: BTreeMap<Key, AreaId>,
}

impl RoutingTable {
    pub fn from_toml(s: &str) -> Result<Self, RoutingError> {
        let f: File = toml::from_str(s).map_err(|e| RoutingError::Parse(e.to_string()))?;
        let mut entries = BTreeMap::new();
        for (prefix, area) in f.prefixes {
            let key =
                parse_prefix(&prefix).ok_or_else(|| RoutingError::BadPrefix(prefix.clone()))?;
            let area = AreaId::parse(&area).map_err(|e| RoutingError::BadArea {
                prefix: prefix.clone(),
                reason: e.to_string(),
            })?;
            entries.insert(key, area);
        }
        Ok(Self { entries })
    }

    /// The area for `postcode`, or `None` (never a guess).
    pub fn resolve(&self, postcode: &str) -> Option<&AreaId> {
        let p = parts(postcode)?;
        if let Some(s) = &p.sector {
            if let Some(a) = self.entries.get(&Key::Sector(s.clone())) {
                return Some(a);
            }
        }
        self.entries
            .get(&Key::Outward(p.outward))
            .or_else(|| self.entries.get(&Key::Area(p.area)))
    }

    pub fn areas(&self) -> impl Iterator<Item = &AreaId> {
        self.entries.values()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The outward code of a postcode, safe to quote in an error (not personal on its own).
    pub fn outward_code(postcode: &str) -> Option<String> {
        parts(postcode).map(|p| p.outward)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RoutingTable {
        RoutingTable::from_toml(
            r#"[prefixes]
"B" = "west-midlands"
"M" = "greater-manchester"
"WA1" = "cheshire"
"SK17" = "derbyshire"
"SK1 1" = "greater-manchester"
"SK" = "cheshire"
"#,
        )
        .unwrap()
    }

    fn route(p: &str) -> Option<String> {
        table().resolve(p).map(ToString::to_string)
    }

    #[test]
    fn the_longest_prefix_wins() {
        assert_eq!(
            route("SK1 1AA").as_deref(),
            Some("greater-manchester"),
            "sector beats area"
        );
        assert_eq!(
            route("SK17 6AA").as_deref(),
            Some("derbyshire"),
            "district beats area"
        );
        assert_eq!(
            route("SK2 5AA").as_deref(),
            Some("cheshire"),
            "area as the fallback"
        );
    }

    #[test]
    fn spaces_and_case_are_ignored() {
        assert_eq!(route("b33 8th").as_deref(), Some("west-midlands"));
        assert_eq!(route("  M1   1AE ").as_deref(), Some("greater-manchester"));
    }

    #[test]
    fn an_area_prefix_does_not_swallow_another_area() {
        assert_eq!(route("BA1 1AA"), None, "Bath is not Birmingham");
        assert_eq!(route("BS1 4DJ"), None);
        assert_eq!(route("B1 1AA").as_deref(), Some("west-midlands"));
    }

    #[test]
    fn a_district_prefix_does_not_swallow_a_longer_district() {
        assert_eq!(route("WA1 1AA").as_deref(), Some("cheshire"));
        assert_eq!(route("WA10 1AA"), None);
    }

    #[test]
    fn malformed_postcodes_and_prefixes_are_refused() {
        assert_eq!(route("not a postcode"), None);
        assert_eq!(route("B1"), None);
        assert!(RoutingTable::from_toml("[prefixes]\n\"B-1\" = \"x\"\n").is_err());
        assert!(RoutingTable::from_toml("[prefixes]\n\"B\" = \"Not An Area\"\n").is_err());
    }

    #[test]
    fn the_shipped_example_table_parses() {
        let t = RoutingTable::from_toml(include_str!("../../config/postcodes.toml")).unwrap();
        assert!(t.len() > 10);
        assert_eq!(
            t.resolve("B1 1AA").map(AreaId::as_str),
            Some("west-midlands")
        );
        assert_eq!(t.resolve("SW1A 1AA").map(AreaId::as_str), Some("london"));
    }
}
