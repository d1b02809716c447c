//! The weekly (or daily) return for the MoJ and PCC, computed from the chained records only —
//! so every figure is covered by `verify` (nothing outside the hash chain is read):
//! referrals sent, from `tally` records, by intake date (the record's time) with source and
//! destination area, priority, offence category and incident, and again by referral date
//! (`referred`); on time vs late at intake (`late`); refusals by rule (`refusal` records'
//! reason); deadline records (`late_at_intake`, `deadline_missed`, `late_arrival` reasons); and
//! what this area received (`collection` records whose actor is a peer).
//! Rendered as a text table, CSV, or an SVG bar chart (hand-written, no dependencies).
//! No personal data exists in these records' counted fields, so none can appear here.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use chrono::{Datelike, NaiveDate};

use super::AuditError;
use crate::core::audit::{Operation, Outcome};

/// Reasons of deadline records the report counts.
pub const DEADLINE_REASONS: [&str; 3] = ["late_at_intake", "deadline_missed", "late_arrival"];

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
#[derive(Debug, Default)]
pub struct Report {
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub by_week: bool,
    /// Referrals sent, by intake period.
    pub rows: Vec<Row>,
    /// Referrals sent, by the period of their referral date (those referred in the range).
    pub by_referral: BTreeMap<String, u64>,
    /// Referrals received from peers, by period of arrival (category is not known here: `-`).
    pub received: Vec<Row>,
    /// Refusals in the range, by rule.
    pub refused: BTreeMap<String, u64>,
    /// Referrals sent in the range on time / late at intake / without a known deadline.
    pub on_time: u64,
    pub late: u64,
    pub late_unknown: u64,
    /// Deadline records in the range, by reason.
    pub deadlines: BTreeMap<String, u64>,
}

fn day_of(time: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(time.get(..10)?, "%Y-%m-%d").ok()
}

fn period(day: NaiveDate, by_week: bool) -> String {
    if by_week {
        let monday = day - chrono::Duration::days(i64::from(day.weekday().num_days_from_monday()));
        format!("week of {monday}")
    } else {
        day.to_string()
    }
}

type Key = (String, String, String, String, String, String);

fn rows(m: BTreeMap<Key, u64>) -> Vec<Row> {
    m.into_iter()
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
        .collect()
}

/// Builds the return for `[from, to]` from the chained records in `dir` (one streaming pass).
pub fn report(
    dir: &Path,
    from: NaiveDate,
    to: NaiveDate,
    by_week: bool,
) -> Result<Report, AuditError> {
    let mut r = Report {
        from,
        to,
        by_week,
        ..Report::default()
    };
    let mut sent: BTreeMap<Key, u64> = BTreeMap::new();
    let mut received: BTreeMap<Key, u64> = BTreeMap::new();
    let in_range = |d: NaiveDate| d >= from && d <= to;
    let s = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    super::for_each_record(dir, |rec, _| {
        let Some(day) = day_of(&rec.time) else {
            return;
        };
        let priority = rec
            .priority
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into());
        match rec.op {
            Operation::Tally => {
                if let Some(referred) = rec.referred.as_deref().and_then(day_of) {
                    if in_range(referred) {
                        *r.by_referral.entry(period(referred, by_week)).or_default() += 1;
                    }
                }
                if !in_range(day) {
                    return;
                }
                match rec.late {
                    Some(true) => r.late += 1,
                    Some(false) => r.on_time += 1,
                    None => r.late_unknown += 1,
                }
                let key = (
                    period(day, by_week),
                    s(&rec.from),
                    s(&rec.to),
                    priority,
                    s(&rec.category),
                    s(&rec.incident),
                );
                *sent.entry(key).or_default() += 1;
            }
            _ if !in_range(day) => {}
            Operation::Refusal => {
                *r.refused.entry(s(&rec.reason)).or_default() += rec.count.unwrap_or(1);
            }
            Operation::Collection
                if rec.actor.as_deref().is_some_and(|a| a.starts_with("peer:"))
                    && rec.outcome == Some(Outcome::Ok)
                    && rec.reason.as_deref() != Some("duplicate") =>
            {
                let key = (
                    period(day, by_week),
                    s(&rec.from),
                    s(&rec.to),
                    priority,
                    "-".into(),
                    "-".into(),
                );
                *received.entry(key).or_default() += 1;
            }
            _ => {}
        }
        if let Some(reason) = rec.reason.as_deref() {
            if in_range(day) && DEADLINE_REASONS.contains(&reason) && rec.op != Operation::Refusal {
                *r.deadlines.entry(reason.to_owned()).or_default() += 1;
            }
        }
    })?;
    r.rows = rows(sent);
    r.received = rows(received);
    Ok(r)
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
        let _ = writeln!(out, "\ntotal sent: {}", self.total());
        let _ = writeln!(out, "\nsent, by referral date (referred in the range):");
        for (k, n) in &self.by_referral {
            let _ = writeln!(out, "  {k:<30} {n:>6}");
        }
        let _ = writeln!(
            out,
            "\nat intake: {} on time, {} late, {} without a deadline",
            self.on_time, self.late, self.late_unknown
        );
        let _ = writeln!(out, "\nreceived from other areas:");
        for r in &self.received {
            let _ = writeln!(
                out,
                "  {:<22} {:<20} -> {:<20} {:<9} {:>6}",
                r.period, r.from, r.to, r.priority, r.count
            );
        }
        let _ = writeln!(
            out,
            "  total received: {}",
            self.received.iter().map(|r| r.count).sum::<u64>()
        );
        let _ = writeln!(out, "\nrefused, by rule:");
        for (k, n) in &self.refused {
            let _ = writeln!(out, "  {k:<30} {n:>6}");
        }
        let _ = writeln!(out, "\ndeadline records:");
        for (k, n) in &self.deadlines {
            let _ = writeln!(out, "  {k:<30} {n:>6}");
        }
        out
    }

    /// CSV: one line per (measure, period, from, to, priority, category, incident); `sent`
    /// rows first (by intake date), then `received`, `sent_by_referral_date`, `refused`.
    pub fn to_csv(&self) -> String {
        let mut out =
            String::from("measure,period,from_area,to_area,priority,category,incident,count\n");
        for (measure, rows) in [("sent", &self.rows), ("received", &self.received)] {
            for r in rows {
                let _ = writeln!(
                    out,
                    "{measure},{},{},{},{},{},{},{}",
                    r.period,
                    r.from,
                    r.to,
                    r.priority,
                    r.category,
                    csv_safe(&r.incident),
                    r.count
                );
            }
        }
        for (p, n) in &self.by_referral {
            let _ = writeln!(out, "sent_by_referral_date,{p},-,-,-,-,-,{n}");
        }
        for (rule, n) in &self.refused {
            let _ = writeln!(out, "refused,-,-,-,-,{},-,{n}", csv_safe(rule));
        }
        out
    }

    /// An SVG bar chart per period: sent by intake date, sent by referral date, received; with
    /// title, labelled axes, y ticks, a legend, and a width sized to the number of periods.
    pub fn to_svg(&self) -> String {
        let mut periods: BTreeMap<String, [u64; 3]> = BTreeMap::new();
        for r in &self.rows {
            periods.entry(r.period.clone()).or_default()[0] += r.count;
        }
        for (p, n) in &self.by_referral {
            periods.entry(p.clone()).or_default()[1] += n;
        }
        for r in &self.received {
            periods.entry(r.period.clone()).or_default()[2] += r.count;
        }
        let series = [
            ("sent (by intake date)", "#3182bd"),
            ("sent (by referral date)", "#9ecae1"),
            ("received", "#e6550d"),
        ];
        let max = periods.values().flatten().copied().max().unwrap_or(0);
        let step = nice_step(max);
        let top = (max.div_ceil(step)).max(1) * step;
        let (bar, gap, plot_h) = (22u64, 26u64, 240u64);
        let (left, plot_top) = (70u64, 60u64);
        let group = 3 * bar + gap;
        let title = format!(
            "Referrals per {}, {} to {}",
            if self.by_week { "week" } else { "day" },
            self.from,
            self.to
        );
        let plot_w = (periods.len().max(1) as u64) * group + gap;
        let width = (left + plot_w + 30)
            .max(title.len() as u64 * 9 + 40)
            .max(560);
        let base = plot_top + plot_h;
        let height = base + 120;
        let mut out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <title>{}</title>\n<rect width=\"{width}\" height=\"{height}\" fill=\"white\"/>\n\
             <text x=\"{}\" y=\"28\" font-size=\"16\" font-weight=\"bold\" text-anchor=\"middle\">{}</text>\n",
            xml(&title),
            width / 2,
            xml(&title)
        );
        // Y axis with ticks and grid lines.
        let mut v = 0;
        while v <= top {
            let y = base - v * plot_h / top;
            let _ = writeln!(out, "<line x1=\"{left}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#ddd\"/>\n<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v}</text>", left + plot_w, left - 6, y + 4);
            v += step;
        }
        let _ = writeln!(out, "<line x1=\"{left}\" y1=\"{plot_top}\" x2=\"{left}\" y2=\"{base}\" stroke=\"black\"/>\n<line x1=\"{left}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"black\"/>", left + plot_w);
        let _ = writeln!(out, "<text x=\"18\" y=\"{}\" transform=\"rotate(-90 18 {})\" text-anchor=\"middle\">referrals</text>", plot_top + plot_h / 2, plot_top + plot_h / 2);
        for (i, (p, counts)) in periods.iter().enumerate() {
            let x0 = left + gap + i as u64 * group;
            for (j, n) in counts.iter().enumerate() {
                let h = n * plot_h / top;
                let x = x0 + j as u64 * bar;
                let _ = writeln!(
                    out,
                    "<rect x=\"{x}\" y=\"{}\" width=\"{bar}\" height=\"{h}\" fill=\"{}\"/>",
                    base - h,
                    series[j].1
                );
                if *n > 0 {
                    let _ = writeln!(out, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"10\">{n}</text>", x + bar / 2, base - h - 3);
                }
            }
            let label = p.trim_start_matches("week of ");
            let _ = writeln!(
                out,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                x0 + 3 * bar / 2,
                base + 16,
                xml(label)
            );
        }
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            left + plot_w / 2,
            base + 38,
            if self.by_week {
                "week beginning"
            } else {
                "day"
            }
        );
        let mut lx = left;
        for (name, colour) in series {
            let _ = writeln!(out, "<rect x=\"{lx}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{colour}\"/>\n<text x=\"{}\" y=\"{}\">{name}</text>", base + 58, lx + 16, base + 69);
            lx += 16 + name.len() as u64 * 7 + 20;
        }
        let _ = writeln!(out, "<text x=\"{left}\" y=\"{}\" font-size=\"11\">refused: {}   late at intake: {}   on time: {}</text>", base + 96, self.refused.values().sum::<u64>(), self.late, self.on_time);
        out.push_str("</svg>\n");
        out
    }
}

/// A round tick step giving at most about 5 ticks up to `max`.
fn nice_step(max: u64) -> u64 {
    let mut step = 1;
    loop {
        for m in [1, 2, 5] {
            if max <= step * m * 5 {
                return step * m;
            }
        }
        step *= 10;
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
