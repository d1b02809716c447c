//! Small text helpers shared by the wire format and the file adapters.
//! Must not: allocate where a borrow serves.

/// The longest prefix of `s` that is at most `max` bytes and ends on a char boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Longest outside string, in bytes of its escaped form, written into one log field.
pub const LOG_TEXT_MAX: usize = 200;

/// Text from outside (a provider's file name, a peer's message) made safe for one log field:
/// control characters (C0, DEL, C1) and bidirectional overrides become `\u{..}`, a backslash
/// becomes `\\`, so a name cannot end a log line, fake another, or move the terminal's cursor; at
/// most [`LOG_TEXT_MAX`] bytes are written, then `…`. Formats lazily: no allocation.
pub fn escape_for_log(s: &str) -> ForLog<'_> {
    ForLog(s)
}

/// See [`escape_for_log`].
pub struct ForLog<'a>(&'a str);

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl std::fmt::Display for ForLog<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        let mut written = 0;
        for c in self.0.chars() {
            let mut buf = [0u8; 16];
            let piece: &str = if c == '\\' {
                "\\\\"
            } else if needs_escape(c) {
                let mut w = Cursor {
                    buf: &mut buf,
                    len: 0,
                };
                let _ = write!(w, "\\u{{{:x}}}", u32::from(c));
                let len = w.len;
                std::str::from_utf8(&buf[..len]).unwrap_or("?")
            } else {
                c.encode_utf8(&mut buf)
            };
            if written + piece.len() > LOG_TEXT_MAX {
                return f.write_str("…");
            }
            f.write_str(piece)?;
            written += piece.len();
        }
        Ok(())
    }
}

/// A fixed buffer to format one escape into without allocating.
struct Cursor<'a> {
    buf: &'a mut [u8; 16],
    len: usize,
}

impl std::fmt::Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            return Err(std::fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_text_cannot_break_or_fake_a_log_line() {
        let name =
            "a.json\n2026-12-02T10:00:00Z ERROR refex: fake line\u{1b}[2J\r\u{7f}\u{9b}\u{202e}";
        let shown = escape_for_log(name).to_string();
        assert_eq!(
            shown,
            "a.json\\u{a}2026-12-02T10:00:00Z ERROR refex: fake line\\u{1b}[2J\\u{d}\\u{7f}\\u{9b}\\u{202e}"
        );
        assert!(!shown.chars().any(needs_escape), "{shown}");
        // A name that already looks escaped stays distinguishable from a real control char.
        assert_eq!(escape_for_log("a\\u{a}").to_string(), "a\\\\u{a}");
        assert_eq!(
            escape_for_log("plain-name_1.json").to_string(),
            "plain-name_1.json"
        );
    }

    #[test]
    fn outside_text_in_logs_is_length_bounded() {
        let long = "é".repeat(1000);
        let shown = escape_for_log(&long).to_string();
        assert!(shown.len() <= LOG_TEXT_MAX + "…".len(), "{}", shown.len());
        assert!(shown.ends_with('…'));
        let escapes = "\u{1b}".repeat(100);
        let shown = escape_for_log(&escapes).to_string();
        assert!(shown.len() <= LOG_TEXT_MAX + "…".len());
        assert!(shown.starts_with("\\u{1b}"));
    }

    #[test]
    fn truncation_never_splits_a_character() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abcdef", 3), "abc");
        // "é" is two bytes: cutting at 2 would split it.
        assert_eq!(truncate("aé", 2), "a");
        assert_eq!(truncate("", 0), "");
    }
}
