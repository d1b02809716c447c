//! Progress for long CLI work (`audit verify`, `state backup`, `demo`), drawn with indicatif on
//! stderr only when stderr is a terminal. Off a terminal (scripts, journald, tests) nothing is
//! drawn: the commands stay line-oriented and print only their result lines.
//! Must not: write escape codes to anything that is not a terminal.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// True when progress is drawn (stderr is a terminal and `REFEX_NO_PROGRESS` is unset).
pub fn enabled() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("REFEX_NO_PROGRESS").is_none()
}

/// A spinner with elapsed time for work of unknown length; hidden off a terminal.
pub fn spinner(what: &str) -> ProgressBar {
    if !enabled() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner().with_message(what.to_owned());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// A bar counting to `len`; hidden off a terminal.
pub fn counter(what: &str, len: u64) -> ProgressBar {
    if !enabled() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len).with_message(what.to_owned());
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_a_terminal_nothing_is_drawn() {
        // cargo test captures stderr (not a terminal), as CI and journald do.
        if std::io::stderr().is_terminal() {
            return;
        }
        assert!(!enabled());
        assert!(spinner("x").is_hidden());
        assert!(counter("x", 10).is_hidden());
    }
}
