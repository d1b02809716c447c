//! Small domain types shared by every layer: area ids, envelope ids, priority classes.
//!
//! Owns: the validated forms of identifiers that cross module boundaries. Each type can only be
//! built through a checking constructor, so code that holds one never re-validates it.
//! Must not: do I/O or depend on anything but `serde` and `uuid`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The id of a PCC area, e.g. `west-midlands`.
///
/// Rule: 1 to 63 characters of `a-z`, `0-9` and `-`, starting with a letter and not ending with
/// `-`. The rule keeps area ids safe inside DNS names, URIs, file names and log fields.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AreaId(String);

/// Why a string is not an [`AreaId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not an area id (1-63 of a-z, 0-9, '-', starting with a letter)")]
pub struct BadAreaId(pub String);

impl AreaId {
    /// Checks `s` against the area id rule.
    pub fn parse(s: &str) -> Result<Self, BadAreaId> {
        let ok = (1..=63).contains(&s.len())
            && s.as_bytes()[0].is_ascii_lowercase()
            && !s.ends_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(BadAreaId(s.chars().take(80).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AreaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl FromStr for AreaId {
    type Err = BadAreaId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for AreaId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for AreaId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A 128-bit, time-ordered envelope id (UUID version 7 layout: 48-bit Unix milliseconds, then
/// random bits). Sorting ids sorts them roughly by creation time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EnvelopeId([u8; 16]);

/// Why a string or byte slice is not an [`EnvelopeId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an envelope id (32 hex digits)")]
pub struct BadEnvelopeId;

impl EnvelopeId {
    /// A fresh id for the current time.
    pub fn generate() -> Self {
        Self(*uuid::Uuid::now_v7().as_bytes())
    }

    pub fn from_bytes(b: [u8; 16]) -> Self {
        Self(b)
    }

    pub fn from_slice(b: &[u8]) -> Result<Self, BadEnvelopeId> {
        <[u8; 16]>::try_from(b).map(Self).map_err(|_| BadEnvelopeId)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for EnvelopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl FromStr for EnvelopeId {
    type Err = BadEnvelopeId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 {
            return Err(BadEnvelopeId);
        }
        let v = hex::decode(s).map_err(|_| BadEnvelopeId)?;
        Self::from_slice(&v)
    }
}

impl Serialize for EnvelopeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for EnvelopeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The Victims' Code priority class. `Enhanced` sorts first: it goes first in every queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PriorityClass {
    /// Enhanced rights under the Victims' Code: most serious crime, persistently targeted,
    /// vulnerable or intimidated (every victim under 18).
    Enhanced,
    Standard,
}

impl PriorityClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enhanced => "enhanced",
            Self::Standard => "standard",
        }
    }
}

impl fmt::Display for PriorityClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_ids_follow_the_rule() {
        assert!(AreaId::parse("west-midlands").is_ok());
        assert!(AreaId::parse("a1").is_ok());
        for bad in [
            "",
            "1abc",
            "West",
            "a-",
            "a_b",
            "a/b",
            "a.b",
            &"a".repeat(64),
        ] {
            assert!(AreaId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn envelope_ids_round_trip_and_sort_by_time() {
        let a = EnvelopeId::generate();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = EnvelopeId::generate();
        assert!(a < b);
        assert_eq!(a.to_string().parse::<EnvelopeId>(), Ok(a));
        assert!("zz".parse::<EnvelopeId>().is_err());
    }

    #[test]
    fn enhanced_sorts_before_standard() {
        assert!(PriorityClass::Enhanced < PriorityClass::Standard);
    }
}
