//! Log output: the filter from `-v` / `RUST_LOG`, and text lines that a peer's bytes cannot break.
//!
//! Without a terminal (a file, a journal) text lines are written by [`PlainFields`]: the same
//! `name=value` text as tracing-subscriber's default, straight, with control characters in field
//! values escaped.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Sets the process's log output: text lines on stderr (`-v` debug, `-vv` trace, `RUST_LOG` for a
/// filter of one's own), coloured when stderr is a terminal, or JSON objects with `format`.
pub fn init(verbose: u8, format: LogFormat) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(terminal);
    match format {
        LogFormat::Text if terminal => builder.init(),
        LogFormat::Text => builder.fmt_fields(PlainFields).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// The fields of a text log line written to a file or a journal (no colours): the same
/// `name=value` text as tracing-subscriber's default, written straight. The default styles every
/// field name through nu-ansi-term even with colours off, which was an eighth of the user-space
/// instructions of a short session (its one log line has eleven fields).
struct PlainFields;

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for PlainFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        let mut visitor = PlainVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct PlainVisitor<'w> {
    writer: tracing_subscriber::fmt::format::Writer<'w>,
    first: bool,
    result: std::fmt::Result,
}

impl PlainVisitor<'_> {
    fn write(&mut self, field: &tracing::field::Field, value: std::fmt::Arguments<'_>) {
        // `log.*`: where a `log` record came from, which the line already says.
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        use std::fmt::Write;
        let sep = if std::mem::take(&mut self.first) { "" } else { " " };
        let message = field.name() == "message";
        let mut out = Escaping(&mut self.writer, message);
        self.result = match field.name() {
            "message" => write!(out, "{sep}{value}"),
            name => write!(out, "{sep}{name}={value}"),
        };
    }
}

/// Writes through to a log line with control characters escaped (`\n`, `\u{1b}`): a field's
/// value cannot start a line of its own or drive the terminal that shows the log. In the message
/// (our own text, where a configuration error's snippet spans lines) line breaks and tabs stay,
/// as with tracing-subscriber's default, which escapes the rest there too.
struct Escaping<'a, 'w>(&'a mut tracing_subscriber::fmt::format::Writer<'w>, bool);

impl std::fmt::Write for Escaping<'_, '_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let keep = |c: char| self.1 && matches!(c, '\n' | '\r' | '\t');
        let mut rest = s;
        while let Some((i, c)) = rest.char_indices().find(|&(_, c)| c.is_control() && !keep(c)) {
            self.0.write_str(&rest[..i])?;
            write!(self.0, "{}", c.escape_debug())?;
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

impl tracing::field::Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.write(field, format_args!("{value}"));
        } else {
            self.write(field, format_args!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.write(field, format_args!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Write;

    #[test]
    fn log_text_from_the_network_cannot_break_the_line() {
        let mut line = String::new();
        let mut writer = tracing_subscriber::fmt::format::Writer::new(&mut line);
        write!(Escaping(&mut writer, false), "closed: bye\nINFO forged \u{1b}[31mred\ttab é").unwrap();
        assert_eq!(line, "closed: bye\\nINFO forged \\u{1b}[31mred\\ttab é");
        // A message keeps its line breaks (a configuration error's snippet), not the rest.
        let mut line = String::new();
        let mut writer = tracing_subscriber::fmt::format::Writer::new(&mut line);
        write!(Escaping(&mut writer, true), "bad value\n  | x = 1\n\u{1b}[2J").unwrap();
        assert_eq!(line, "bad value\n  | x = 1\n\\u{1b}[2J");
    }
}
