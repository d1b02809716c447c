//! The working-day calendar for `due_by`: weekends and configured bank holidays are not working
//! days. Pure: time is passed in.
//!
//! Rule (REFERRAL.md): `due_by` = `referred_at` + 2 working days, on UTC calendar dates. A
//! referral made on a working day at time T is due at T on the second following working day
//! (Fri 14:03 → Tue 14:03). One made on a non-working day starts the clock at 00:00 of the next
//! working day (Sat 10:00 → Tue 00:00, i.e. by the end of Monday + 1 working day).
//! File format (`config/bank-holidays.toml`): `dates = ["YYYY-MM-DD", …]`.

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, Utc, Weekday};
use serde::Deserialize;

/// Why a bank-holiday file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum CalendarError {
    #[error("bank holidays: {0}")]
    Parse(String),
}

/// Working days.
#[derive(Clone, Debug, Default)]
pub struct Calendar {
    holidays: BTreeSet<NaiveDate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    dates: Vec<String>,
}

impl Calendar {
    pub fn new(holidays: impl IntoIterator<Item = NaiveDate>) -> Self {
        Self {
            holidays: holidays.into_iter().collect(),
        }
    }

    pub fn from_toml(s: &str) -> Result<Self, CalendarError> {
        let f: File = toml::from_str(s).map_err(|e| CalendarError::Parse(e.to_string()))?;
        let mut holidays = BTreeSet::new();
        for d in f.dates {
            let date = NaiveDate::parse_from_str(&d, "%Y-%m-%d")
                .map_err(|_| CalendarError::Parse(format!("'{d}' is not YYYY-MM-DD")))?;
            holidays.insert(date);
        }
        Ok(Self { holidays })
    }

    pub fn is_working_day(&self, d: NaiveDate) -> bool {
        !matches!(d.weekday(), Weekday::Sat | Weekday::Sun) && !self.holidays.contains(&d)
    }

    fn next_working_day(&self, mut d: NaiveDate) -> NaiveDate {
        // Bounded: no calendar has a year of holidays.
        for _ in 0..366 {
            d += Duration::days(1);
            if self.is_working_day(d) {
                return d;
            }
        }
        d
    }

    /// `referred_at` + 2 working days (see the module doc).
    pub fn due_by(&self, referred_at: DateTime<Utc>) -> DateTime<Utc> {
        let (mut day, time) = if self.is_working_day(referred_at.date_naive()) {
            (referred_at.date_naive(), referred_at.time())
        } else {
            (
                self.next_working_day(referred_at.date_naive()),
                NaiveTime::MIN,
            )
        };
        for _ in 0..2 {
            day = self.next_working_day(day);
        }
        day.and_time(time).and_utc()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn shipped() -> Calendar {
        Calendar::from_toml(include_str!("../../config/bank-holidays.toml")).unwrap()
    }

    #[test]
    fn a_friday_referral_is_due_on_tuesday() {
        assert_eq!(
            shipped().due_by(at("2026-11-20T14:03:00Z")),
            at("2026-11-24T14:03:00Z")
        );
    }

    #[test]
    fn a_midweek_referral_is_due_two_days_later() {
        assert_eq!(
            shipped().due_by(at("2026-11-17T09:00:00Z")),
            at("2026-11-19T09:00:00Z")
        );
    }

    #[test]
    fn a_weekend_referral_starts_the_clock_on_monday() {
        assert_eq!(
            shipped().due_by(at("2026-11-21T10:00:00Z")),
            at("2026-11-25T00:00:00Z")
        );
    }

    #[test]
    fn bank_holidays_are_skipped_across_the_year_end() {
        // Thu 24 Dec 2026 → Fri 25 (holiday), Mon 28 (substitute), Tue 29, Wed 30.
        assert_eq!(
            shipped().due_by(at("2026-12-24T12:00:00Z")),
            at("2026-12-30T12:00:00Z")
        );
        // Thu 31 Dec 2026 → Fri 1 Jan 2027 (holiday) → Mon 4, Tue 5.
        assert_eq!(
            shipped().due_by(at("2026-12-31T16:00:00Z")),
            at("2027-01-05T16:00:00Z")
        );
        // Easter 2027: Thu 25 Mar → Good Friday 26, Easter Monday 29 → Tue 30, Wed 31.
        assert_eq!(
            shipped().due_by(at("2027-03-25T08:00:00Z")),
            at("2027-03-31T08:00:00Z")
        );
    }

    #[test]
    fn a_referral_on_a_bank_holiday_starts_the_next_working_day() {
        // Mon 31 Aug 2026 (holiday) → clock starts Tue 1 Sep → Thu 3 Sep 00:00.
        assert_eq!(
            shipped().due_by(at("2026-08-31T11:00:00Z")),
            at("2026-09-03T00:00:00Z")
        );
    }

    #[test]
    fn the_shipped_file_has_both_years_and_bad_dates_are_refused() {
        let c = shipped();
        assert!(!c.is_working_day(NaiveDate::from_ymd_opt(2027, 12, 28).unwrap()));
        assert!(c.is_working_day(NaiveDate::from_ymd_opt(2027, 12, 29).unwrap()));
        assert!(Calendar::from_toml("dates = [\"2026-13-01\"]").is_err());
    }
}
