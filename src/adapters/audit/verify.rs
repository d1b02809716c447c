//! `verify`: checks the whole log, streaming line by line (memory bounded by the longest line,
//! capped at `MAX_LINE`, plus one entry per checkpoint and per torn-tail note).
//!
//! Rules: every line parses; sequence numbers rise by one (a gap is "missing", two swapped
//! neighbours are "reordered"); each `prev` is the hash of the line before; checkpoint
//! signatures verify (v2 signs the time too); the first record is the genesis or a retention
//! purge's anchor; bytes a `torn_tail` note names (file, offset, and for v2 notes the length and
//! SHA-256 of exactly those bytes) are skipped, any other unterminated line fails; every line of
//! `checkpoints.jsonl` matches a chained checkpoint (so truncation behind a checkpoint shows).
//! The report says how many records follow the last checkpoint: a deleted tail newer than every
//! checkpoint cannot be proven, but the operator sees how much is unsigned.
//! Must not: load a whole file into memory, or trust a torn-tail note that is not in the chain.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use super::log;
use crate::core::audit::{line_hash, Operation, Record, GENESIS};
use crate::crypto::VerifyingKey;

const TORN_OP: &[u8] = b"\"op\":\"torn_tail\"";

/// Longest line `verify` reads (a record is well under 4 KiB).
pub(super) const MAX_LINE: u64 = 1 << 20;

/// What `verify` found in a good log.
#[derive(Debug)]
pub struct VerifyReport {
    pub records: u64,
    pub checkpoints: u64,
    pub files: usize,
    pub torn_acknowledged: usize,
    /// Records after the last signed checkpoint (all of them when there is none).
    pub after_last_checkpoint: u64,
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} records in {} files, {} signed checkpoints, {} record(s) after the last checkpoint",
            self.records, self.files, self.checkpoints, self.after_last_checkpoint
        )?;
        if self.torn_acknowledged > 0 {
            write!(
                f,
                ", {} torn fragment(s) from crashes or failed writes, acknowledged",
                self.torn_acknowledged
            )?;
        }
        Ok(())
    }
}

/// The first thing wrong with a log.
#[derive(Debug)]
pub struct VerifyFailure {
    pub file: String,
    pub line: usize,
    pub seq: Option<u64>,
    pub problem: String,
}

impl fmt::Display for VerifyFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.seq {
            Some(s) => write!(f, "{}:{} (seq {s}): {}", self.file, self.line, self.problem),
            None => write!(f, "{}:{}: {}", self.file, self.line, self.problem),
        }
    }
}

pub(super) fn name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn fail(file: &str, line: usize, seq: Option<u64>, problem: impl Into<String>) -> VerifyFailure {
    VerifyFailure {
        file: file.into(),
        line,
        seq,
        problem: problem.into(),
    }
}

/// A torn-tail note: (file, offset) → (length, sha256) for v2, `None` for a v1 note.
pub(super) type Acks = BTreeMap<(String, u64), Option<(u64, String)>>;

/// Reads one line (without the newline) into `buf`; `Ok(false)` at end of file. A last line
/// without a newline is returned with `complete = false`.
fn next_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<Option<bool>> {
    buf.clear();
    let n = r.by_ref().take(MAX_LINE).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        Ok(Some(true))
    } else {
        Ok(Some(false))
    }
}

/// First pass: every torn-tail note in the files (trusted only once pass two meets it chained).
pub(super) fn torn_notes(files: &[std::path::PathBuf]) -> Result<Acks, VerifyFailure> {
    let mut acks = Acks::new();
    let mut buf = Vec::new();
    for path in files {
        let name = name_of(path);
        let f = File::open(path).map_err(|e| fail(&name, 0, None, e.to_string()))?;
        let mut r = BufReader::new(f);
        while let Some(complete) =
            next_line(&mut r, &mut buf).map_err(|e| fail(&name, 0, None, e.to_string()))?
        {
            if !complete || !buf.windows(TORN_OP.len()).any(|w| w == TORN_OP) {
                continue;
            }
            if let Ok(rec) = serde_json::from_slice::<Record>(&buf) {
                if let (Some(file), Some(offset)) = (rec.file, rec.offset) {
                    let bound = rec.length.zip(rec.fragment_sha256);
                    acks.insert((file, offset), bound);
                }
            }
        }
    }
    Ok(acks)
}

/// Checks the whole log: chain links, sequence, checkpoint signatures, the checkpoints file,
/// torn fragments. Names the first bad record.
pub fn verify(dir: &Path, keys: &[VerifyingKey]) -> Result<VerifyReport, VerifyFailure> {
    let files = log::log_files(dir).map_err(|e| fail("-", 0, None, e.to_string()))?;
    let acks = torn_notes(&files)?;
    let mut used_acks: BTreeSet<(String, u64)> = BTreeSet::new();
    let mut chained_acks: BTreeSet<(String, u64)> = BTreeSet::new();
    let mut prev_hash: Option<String> = None;
    let mut prev_seq: Option<u64> = None;
    let mut prev_at: (String, usize) = ("-".into(), 0);
    let mut first: Option<(u64, String, String, usize)> = None;
    let mut anchors: Vec<(u64, String)> = Vec::new();
    let mut chain_checkpoints: BTreeMap<u64, String> = BTreeMap::new();
    let mut checkpoint_lines: Vec<String> = Vec::new();
    let mut records = 0u64;
    let mut after_last_checkpoint = 0u64;
    let mut buf = Vec::new();
    for path in &files {
        let name = name_of(path);
        let io = |e: std::io::Error| fail(&name, 0, None, e.to_string());
        let mut r = BufReader::new(File::open(path).map_err(io)?);
        let mut offset = 0u64;
        let mut line_no = 0;
        loop {
            if let Some(Some((len, sha))) = acks.get(&(name.clone(), offset)) {
                // The bytes from here on are a noted fragment: they must be exactly those noted.
                let (got_len, got_sha) = log::fragment_digest(path, offset).map_err(io)?;
                if got_len != *len || hex::encode(got_sha) != *sha {
                    return Err(fail(&name, line_no + 1, None, format!("the torn fragment at byte {offset} is not the one the torn_tail note binds ({got_len} bytes, expected {len}): altered")));
                }
                used_acks.insert((name.clone(), offset));
                break;
            }
            let Some(complete) = next_line(&mut r, &mut buf).map_err(io)? else {
                break;
            };
            line_no += 1;
            if !complete {
                // An unterminated last line: only a v1 note (file and offset) may cover it.
                if acks.get(&(name.clone(), offset)) == Some(&None) {
                    used_acks.insert((name.clone(), offset));
                    break;
                }
                return Err(fail(
                    &name,
                    line_no,
                    None,
                    "torn record not acknowledged by a later torn_tail record (truncated or damaged)",
                ));
            }
            let line_len = buf.len() as u64 + 1;
            let rec: Record = serde_json::from_slice(&buf).map_err(|_| {
                fail(
                    &name,
                    line_no,
                    None,
                    "record does not parse (altered or damaged)",
                )
            })?;
            if let (Some(ps), Some(ph)) = (prev_seq, &prev_hash) {
                if rec.seq <= ps {
                    return Err(fail(
                        &name,
                        line_no,
                        Some(rec.seq),
                        format!("out of order: seq {} follows seq {ps} (reordered)", rec.seq),
                    ));
                }
                if rec.seq != ps + 1 {
                    // Two swapped neighbours read as a gap here; look at the next line.
                    let mut next = Vec::new();
                    let swapped = matches!(next_line(&mut r, &mut next), Ok(Some(true)))
                        && serde_json::from_slice::<Record>(&next).is_ok_and(|n| n.seq == ps + 1);
                    let problem = if swapped {
                        format!(
                            "records reordered: seq {} is written before seq {} (swapped)",
                            rec.seq,
                            ps + 1
                        )
                    } else {
                        format!("records {}..={} are missing (removed)", ps + 1, rec.seq - 1)
                    };
                    return Err(fail(&name, line_no, Some(rec.seq), problem));
                }
                if &rec.prev != ph {
                    return Err(fail(
                        &prev_at.0,
                        prev_at.1,
                        Some(ps),
                        "record was altered: the next record's hash link does not match it",
                    ));
                }
            } else {
                first = Some((rec.seq, rec.prev.clone(), name.clone(), line_no));
            }
            after_last_checkpoint += 1;
            match rec.op {
                Operation::Checkpoint => {
                    if !crate::crypto::checkpoint::is_valid(&rec, keys) {
                        return Err(fail(
                            &name,
                            line_no,
                            Some(rec.seq),
                            "checkpoint signature does not verify (forged or altered)",
                        ));
                    }
                    chain_checkpoints.insert(rec.seq, rec.prev.clone());
                    checkpoint_lines.push(String::from_utf8_lossy(&buf).into_owned());
                    after_last_checkpoint = 0;
                }
                Operation::TornTail => {
                    if let (Some(f), Some(o)) = (&rec.file, rec.offset) {
                        chained_acks.insert((f.clone(), o));
                    }
                }
                Operation::Erasure => {
                    if let (Some(s), Some(p)) = (rec.anchor_seq, &rec.anchor_prev) {
                        anchors.push((s, p.clone()));
                    }
                }
                _ => {}
            }
            prev_hash = Some(line_hash(&buf));
            prev_seq = Some(rec.seq);
            prev_at = (name.clone(), line_no);
            records += 1;
            offset += line_len;
        }
    }
    if let Some(bad) = used_acks.iter().find(|a| !chained_acks.contains(*a)) {
        return Err(fail(
            &bad.0,
            0,
            None,
            format!(
                "bytes from offset {} are skipped by a torn_tail note that is not in the chain (forged)",
                bad.1
            ),
        ));
    }
    if let Some((seq, prev, file, line)) = &first {
        let genesis = *seq == 1 && prev == GENESIS;
        if !genesis && !anchors.iter().any(|(s, p)| s == seq && p == prev) {
            return Err(fail(file, *line, Some(*seq), "the log does not start at the first record and no retention purge accounts for it (records removed)"));
        }
    }
    let first_seq = first.as_ref().map(|f| f.0).unwrap_or(1);
    let checkpoints = check_checkpoints_file(
        dir,
        first_seq,
        prev_seq,
        &prev_at,
        &chain_checkpoints,
        &checkpoint_lines,
    )?;
    Ok(VerifyReport {
        records,
        checkpoints,
        files: files.len(),
        torn_acknowledged: used_acks.len(),
        after_last_checkpoint,
    })
}

/// Every line of `checkpoints.jsonl` must match a chained checkpoint.
fn check_checkpoints_file(
    dir: &Path,
    first_seq: u64,
    last_seq: Option<u64>,
    last_at: &(String, usize),
    chain: &BTreeMap<u64, String>,
    chain_lines: &[String],
) -> Result<u64, VerifyFailure> {
    let name = "checkpoints.jsonl";
    let Ok(f) = File::open(dir.join(name)) else {
        return Ok(0);
    };
    let mut r = BufReader::new(f);
    let mut buf = Vec::new();
    let mut checkpoints = 0;
    let mut i = 0;
    while let Some(_complete) =
        next_line(&mut r, &mut buf).map_err(|e| fail(name, i, None, e.to_string()))?
    {
        i += 1;
        let Ok(cp) = serde_json::from_slice::<Record>(&buf) else {
            // A crash while appending leaves a fragment, sealed by the next run with a
            // newline. It is accepted only as the start of a checkpoint the chain holds
            // whole (the chain is written first), so nothing can be added this way.
            let l = String::from_utf8_lossy(&buf);
            if !l.is_empty() && chain_lines.iter().any(|c| c.starts_with(&*l)) {
                continue;
            }
            return Err(fail(name, i, None, "checkpoint does not parse"));
        };
        if cp.seq < first_seq {
            continue;
        }
        match chain.get(&cp.seq) {
            Some(head) if head == &cp.prev => checkpoints += 1,
            Some(_) => {
                return Err(fail(
                    name,
                    i,
                    Some(cp.seq),
                    "the log's checkpoint differs from the one recorded (altered)",
                ))
            }
            None if last_seq.is_none_or(|s| cp.seq > s) => {
                return Err(fail(
                    &last_at.0,
                    last_at.1,
                    last_seq,
                    format!(
                        "log truncated: checkpoint seq {} is missing from the end of the log",
                        cp.seq
                    ),
                ));
            }
            None => {
                return Err(fail(
                    name,
                    i,
                    Some(cp.seq),
                    "checkpoint missing from the log (removed)",
                ))
            }
        }
    }
    Ok(checkpoints)
}
