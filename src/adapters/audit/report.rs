//! The weekly (or daily) return for the MoJ and PCC: counts by period, source and destination
//! area, priority class, offence category and incident, from the aggregate `tally.json`.
//! Rendered as a text table, CSV, or an SVG bar chart (hand-written, no dependencies).
//! No personal data exists in the tally, so none can appear here.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use chrono::{Datelike, NaiveDate};

use super::AuditError;

/// One row of the return.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Row {
    pub period: String,
    pub from: String,
    pub to: String,
    pub priority: String,
    pub category: String,
    pub incident: String,
    pub count: u64,
}

/// The return for a date range.
#[derive(Debug)]
pub struct Report {
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub by_week: bool,
    pub rows: Vec<Row>,
}

/// Builds the return for `[from, to]` from the tally in `dir`.
pub fn report(
    dir: &Path,
    from: NaiveDate,
    to: NaiveDate,
    by_week: bool,
) -> Result<Report, AuditError> {
    let path = dir.join("tally.json");
    let tally: BTreeMap<String, u64> = match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|_| AuditError::Corrupt("tally.json does not parse".into()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => return Err(AuditError::io(&path, e)),
    };
    let mut grouped: BTreeMap<(String, String, String, String, String, String), u64> =
        BTreeMap::new();
    for (key, n) in tally {
        let parts: Vec<&str> = key.split('|').collect();
        let [day, f, t, p, c, i] = parts.as_slice() else {
            continue;
        };
        let Ok(day) = NaiveDate::parse_from_str(day, "%Y-%m-%d") else {
            continue;
        };
        if day < from || day > to {
            continue;
        }
        let period = if by_week {
            let monday =
                day - chrono::Duration::days(i64::from(day.weekday().num_days_from_monday()));
            format!("week of {monday}")
        } else {
            day.to_string()
        };
        *grouped
            .entry((
                period,
                f.to_string(),
                t.to_string(),
                p.to_string(),
                c.to_string(),
                i.to_string(),
            ))
            .or_default() += n;
    }
    let rows = grouped
        .into_iter()
        .map(
            |((period, from, to, priority, category, incident), count)| Row {
                period,
                from,
                to,
                priority,
                category,
                incident,
                count,
            },
        )
        .collect();
    Ok(Report {
        from,
        to,
        by_week,
        rows,
    })
}

impl Report {
    pub fn total(&self) -> u64 {
        self.rows.iter().map(|r| r.count).sum()
    }

    fn totals_by(&self, f: impl Fn(&Row) -> &str) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for r in &self.rows {
            *m.entry(f(r).to_owned()).or_default() += r.count;
        }
        m
    }

    /// A plain-text table with totals per dimension.
    pub fn to_table(&self) -> String {
        let mut out = format!(
            "Referrals {} to {} (by {})\n\n",
            self.from,
            self.to,
            if self.by_week { "week" } else { "day" }
        );
        let _ = writeln!(
            out,
            "{:<22} {:<20} {:<20} {:<9} {:<20} {:<12} {:>6}",
            "period", "from", "to", "priority", "category", "incident", "count"
        );
        for r in &self.rows {
            let _ = writeln!(
                out,
                "{:<22} {:<20} {:<20} {:<9} {:<20} {:<12} {:>6}",
                r.period, r.from, r.to, r.priority, r.category, r.incident, r.count
            );
        }
        type Pick = fn(&Row) -> &str;
        let sections: [(&str, Pick); 6] = [
            ("period", |r| r.period.as_str()),
            ("destination area", |r| r.to.as_str()),
            ("source area", |r| r.from.as_str()),
            ("priority", |r| r.priority.as_str()),
            ("offence category", |r| r.category.as_str()),
            ("incident", |r| r.incident.as_str()),
        ];
        for (title, f) in sections {
            let _ = writeln!(out, "\nby {title}:");
            for (k, n) in self.totals_by(f) {
                let _ = writeln!(out, "  {k:<30} {n:>6}");
            }
        }
        let _ = writeln!(out, "\ntotal: {}", self.total());
        out
    }

    /// CSV: one line per (period, from, to, priority, category, incident).
    pub fn to_csv(&self) -> String {
        let mut out = String::from("period,from_area,to_area,priority,category,incident,count\n");
        for r in &self.rows {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{}",
                r.period,
                r.from,
                r.to,
                r.priority,
                r.category,
                csv_safe(&r.incident),
                r.count
            );
        }
        out
    }

    /// An SVG bar chart of referrals per period, split by priority class.
    pub fn to_svg(&self) -> String {
        let mut periods: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for r in &self.rows {
            let e = periods.entry(r.period.clone()).or_default();
            if r.priority == "enhanced" {
                e.0 += r.count;
            } else {
                e.1 += r.count;
            }
        }
        let max = periods
            .values()
            .map(|(a, b)| a + b)
            .max()
            .unwrap_or(1)
            .max(1);
        let (bar, gap, height) = (40u64, 30u64, 200u64);
        let width = 80 + periods.len() as u64 * (bar + gap);
        let mut out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n\
             <title>Referrals {} to {}</title>\n<text x=\"10\" y=\"15\">Referrals per {} (dark: enhanced, light: standard)</text>\n",
            height + 80,
            self.from,
            self.to,
            if self.by_week { "week" } else { "day" }
        );
        for (i, (period, (enh, std))) in periods.iter().enumerate() {
            let x = 60 + i as u64 * (bar + gap);
            let h_enh = enh * height / max;
            let h_std = std * height / max;
            let base = 30 + height;
            let _ = writeln!(
                out,
                "<rect x=\"{x}\" y=\"{}\" width=\"{bar}\" height=\"{h_std}\" fill=\"#9ecae1\"/>",
                base - h_std
            );
            let _ = writeln!(
                out,
                "<rect x=\"{x}\" y=\"{}\" width=\"{bar}\" height=\"{h_enh}\" fill=\"#3182bd\"/>",
                base - h_std - h_enh
            );
            let _ = writeln!(
                out,
                "<text x=\"{x}\" y=\"{}\">{}</text>",
                base - h_std - h_enh - 4,
                enh + std
            );
            let label = period.trim_start_matches("week of ");
            let _ = writeln!(
                out,
                "<text x=\"{x}\" y=\"{}\" transform=\"rotate(30 {x} {})\">{}</text>",
                base + 14,
                base + 14,
                xml(label)
            );
        }
        out.push_str("</svg>\n");
        out
    }
}

fn csv_safe(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
