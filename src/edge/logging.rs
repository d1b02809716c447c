//! Logging setup.
//!
//! Logs: `tracing` to stderr (journald adds timestamps under systemd), human or JSON, filtered
//! by `RUST_LOG` (default `info`). Field names are stable: `peer`, `envelope_id`, `file`, `row`.
//! No log line carries personal data: referral content never reaches a log call.
//!
//! Output rules: ANSI colour only when stderr is a terminal (and `NO_COLOR` is unset) — never in
//! a file, a pipe or the journal. When stderr is the journal (systemd sets `JOURNAL_STREAM` to
//! the `device:inode` of the stream it connected; we compare it with stderr's own, as
//! sd_journal_stream_fd(3) says to), every line starts with the sd-daemon(3) priority prefix
//! `<N>` (error 3, warn 4, info 6, debug and trace 7), which journald strips and records as the
//! entry's PRIORITY, so `journalctl -p err` shows the errors. Lines printed before the
//! subscriber exists (configuration problems) use [`eprint_error`] for the same effect.
//! Must not: be imported by `node` or below (they only emit `tracing` events).

use std::io::{self, IsTerminal, Write};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::node::settings::LogFormat;

/// How stderr is to be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Output {
    /// ANSI colour codes.
    pub ansi: bool,
    /// sd-daemon `<N>` priority prefixes.
    pub journal: bool,
}

impl Output {
    /// Decides from the real stderr and environment.
    pub fn detect() -> Self {
        let journal = std::env::var("JOURNAL_STREAM")
            .ok()
            .is_some_and(|v| stderr_is_stream(&v));
        Self {
            ansi: !journal && io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
            journal,
        }
    }
}

/// Whether `journal_stream` (`"<dev>:<ino>"`) names the file stderr is connected to.
fn stderr_is_stream(journal_stream: &str) -> bool {
    let Some((dev, ino)) = journal_stream.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match rustix::fs::fstat(io::stderr()) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

/// The sd-daemon priority of a tracing level.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Writes each line it is given with a `<N>` prefix (N fixed per event).
pub struct PrefixWriter<W> {
    inner: W,
    prefix: Option<[u8; 3]>,
    at_line_start: bool,
}

impl<W: Write> Write for PrefixWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(prefix) = self.prefix else {
            return self.inner.write(buf);
        };
        // One contiguous buffer per call keeps a line whole when several threads log.
        let mut out = Vec::with_capacity(buf.len() + 8);
        for &b in buf {
            if self.at_line_start {
                out.extend_from_slice(&prefix);
                self.at_line_start = false;
            }
            out.push(b);
            if b == b'\n' {
                self.at_line_start = true;
            }
        }
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A `MakeWriter` that prefixes each event's lines with its journald priority when asked to.
pub struct JournalAware<M> {
    make: M,
    journal: bool,
}

impl<M> JournalAware<M> {
    pub fn new(make: M, journal: bool) -> Self {
        Self { make, journal }
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for JournalAware<M> {
    type Writer = PrefixWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        self.writer(6)
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        self.writer(priority(meta.level()))
    }
}

impl<'a, M: MakeWriter<'a>> JournalAware<M> {
    fn writer(&'a self, prio: u8) -> PrefixWriter<M::Writer> {
        PrefixWriter {
            inner: self.make.make_writer(),
            prefix: self.journal.then_some([b'<', b'0' + prio, b'>']),
            at_line_start: true,
        }
    }
}

/// Builds the subscriber for `format` and `output`, writing through `make`.
pub fn subscriber<M>(
    format: LogFormat,
    output: Output,
    filter: EnvFilter,
    make: M,
) -> tracing::Dispatch
where
    M: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(output.ansi)
        .with_writer(JournalAware::new(make, output.journal));
    match format {
        LogFormat::Human => tracing::Dispatch::new(builder.finish()),
        LogFormat::Json => tracing::Dispatch::new(builder.json().finish()),
    }
}

/// Installs the global subscriber (once; later calls are ignored).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let dispatch = subscriber(format, Output::detect(), filter, io::stderr);
    let _ = tracing::dispatcher::set_global_default(dispatch);
}

/// Prints an error line to stderr before (or instead of) the subscriber: with priority 3
/// under journald, so configuration problems reach `journalctl -p err`.
pub fn eprint_error(line: &str) {
    eprint_with(line, 3);
}

/// Prints a warning line to stderr (priority 4 under journald).
pub fn eprint_warning(line: &str) {
    eprint_with(line, 4);
}

fn eprint_with(line: &str, prio: u8) {
    let mut w = PrefixWriter {
        inner: io::stderr().lock(),
        prefix: Output::detect()
            .journal
            .then_some([b'<', b'0' + prio, b'>']),
        at_line_start: true,
    };
    let _ = w.write_all(format!("{line}\n").as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn emit(format: LogFormat, output: Output) -> String {
        let buf = Buf::default();
        let out = buf.clone();
        let dispatch = subscriber(format, output, EnvFilter::new("debug"), move || out.clone());
        tracing::dispatcher::with_default(&dispatch, || {
            tracing::error!(peer = "london", "audit volume full");
            tracing::warn!("peer unreachable");
            tracing::info!("started");
            tracing::debug!("detail");
        });
        let text = buf.0.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn under_journald_each_line_carries_its_priority_and_no_ansi() {
        for format in [LogFormat::Human, LogFormat::Json] {
            let text = emit(
                format,
                Output {
                    ansi: false,
                    journal: true,
                },
            );
            let prefixes: Vec<&str> = text.lines().map(|l| &l[..3]).collect();
            assert_eq!(prefixes, ["<3>", "<4>", "<6>", "<7>"], "{text}");
            assert!(!text.contains('\x1b'), "{text}");
            assert!(text.lines().next().unwrap().contains("audit volume full"));
        }
    }

    #[test]
    fn off_a_terminal_there_is_no_ansi_and_no_prefix() {
        let text = emit(
            LogFormat::Human,
            Output {
                ansi: false,
                journal: false,
            },
        );
        assert_eq!(text.lines().count(), 4);
        assert!(!text.contains('\x1b'), "{text}");
        assert!(!text.contains("<3>"), "{text}");
    }

    #[test]
    fn with_ansi_the_codes_do_appear() {
        // The converse, so the assertion above can fail.
        let text = emit(
            LogFormat::Human,
            Output {
                ansi: true,
                journal: false,
            },
        );
        assert!(text.contains('\x1b'), "{text}");
    }

    #[test]
    fn a_multi_line_message_is_prefixed_on_every_line() {
        let buf = Buf::default();
        let mut w = PrefixWriter {
            inner: buf.clone(),
            prefix: Some(*b"<3>"),
            at_line_start: true,
        };
        w.write_all(b"first\nsecond\n").unwrap();
        w.write_all(b"third\n").unwrap();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text, "<3>first\n<3>second\n<3>third\n");
    }

    #[test]
    fn journal_stream_must_name_stderr_itself() {
        let st = rustix::fs::fstat(io::stderr()).unwrap();
        let mine = format!("{}:{}", st.st_dev, st.st_ino);
        assert!(stderr_is_stream(&mine));
        assert!(!stderr_is_stream(&format!(
            "{}:{}",
            st.st_dev,
            st.st_ino + 1
        )));
        assert!(!stderr_is_stream("garbage"));
    }

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::TRACE), 7);
    }
}
