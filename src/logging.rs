//! Log output: the filter from `-v` / `RUST_LOG`, and text lines that a peer's bytes cannot break.
//!
//! Without a terminal (a file, a journal) text lines are written by `PlainFields`: the same
//! `name=value` text as tracing-subscriber's default, straight, with control characters in field
//! values escaped.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

mod stderr;

/// The filter without `RUST_LOG`: info, and with `-v`/`-vv` debug/trace for wsbridge's own
/// records only. The libraries under it (tungstenite, rustls, hyper, redis) write whole requests
/// and frames at debug and trace: an agent's `Authorization: Bearer` secret, a page's token, the
/// payload; wsbridge's own records never hold them. `RUST_LOG` still reaches them when asked.
fn default_filter(verbose: u8) -> &'static str {
    match verbose {
        0 => "info",
        1 => "info,wsbridge=debug",
        _ => "info,wsbridge=trace",
    }
}

/// A log line that anyone who can connect can cause (a failed TLS handshake, a refused PROXY
/// header, a refusal past the connection cap, a token source down), written at most once per
/// `every` with the number of its kind left out since (those at debug): a flood is counted in
/// the metrics, not written out one line each.
#[derive(Debug)]
pub struct Quieted {
    every: std::time::Duration,
    last: std::sync::Mutex<Option<tokio::time::Instant>>,
    left_out: std::sync::atomic::AtomicU64,
}

impl Quieted {
    /// A line written at most once per `every`.
    pub const fn new(every: std::time::Duration) -> Quieted {
        Quieted {
            every,
            last: std::sync::Mutex::new(None),
            left_out: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(lines left out since the last one)` when a line may be written now.
    pub fn take(&self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|at| now.duration_since(at) < self.every) {
            self.left_out.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.left_out.swap(0, std::sync::atomic::Ordering::Relaxed))
    }
}

/// [`Quieted`] for each of a bounded set of keys (an agent's services: each is listed in its
/// configuration): one key's flood does not hide another's first line.
#[derive(Debug)]
pub struct QuietedBy {
    every: std::time::Duration,
    keys: std::sync::Mutex<std::collections::BTreeMap<String, (tokio::time::Instant, u64)>>,
}

impl QuietedBy {
    /// A line per key written at most once per `every`.
    pub const fn new(every: std::time::Duration) -> QuietedBy {
        QuietedBy {
            every,
            keys: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    /// [`Quieted::take`] for `key`'s lines. The caller bounds the keys.
    pub fn take(&self, key: &str) -> Option<u64> {
        let now = tokio::time::Instant::now();
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        match keys.get_mut(key) {
            Some((at, left_out)) if now.duration_since(*at) < self.every => {
                *left_out += 1;
                None
            }
            Some((at, left_out)) => {
                *at = now;
                Some(std::mem::take(left_out))
            }
            None => {
                keys.insert(key.to_owned(), (now, 0));
                Some(0)
            }
        }
    }
}

/// Sets the process's log output: text lines on stderr (`-v` debug, `-vv` trace, `RUST_LOG` for a
/// filter of one's own), coloured when stderr is a terminal, or JSON objects with `format`.
///
/// # Panics
/// If the process already has a global tracing subscriber (a program embedding the library sets
/// up its own logging instead of calling this).
pub fn init(verbose: u8, format: LogFormat) {
    let filter = env_filter(default_filter(verbose));
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Lines go to stderr from a thread of their own (see `stderr`); where it cannot be started,
    // straight to stderr.
    stderr::start();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(stderr::Line::default)
        .with_ansi(terminal && colours());
    let text = tracing_subscriber::fmt::format().with_timer(UtcMicros);
    let journal = Journal(stderr_is_the_journal());
    match format {
        // Plain fields on a terminal too: tracing's default writes a `%` field as it is, and a
        // peer's text (an agent's server's drain reason, a path) could move the cursor, clear
        // the screen or start a forged line there. The level keeps its colour.
        LogFormat::Text if terminal => builder.event_format(text).fmt_fields(PlainFields).init(),
        LogFormat::Text => builder.event_format(journal.over(text)).fmt_fields(PlainFields).init(),
        LogFormat::Json => builder
            .event_format(journal.over(text.json().flatten_event(true)))
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .init(),
    }
    log_panics();
}

/// Log lines dropped so far because stderr did not take them (see [`stderr`]):
/// `log_lines_dropped_total`.
pub fn lines_dropped() -> u64 {
    stderr::dropped()
}

/// Writes the log lines still queued for stderr, for as long as stderr takes them, before the
/// process says something on stderr itself or exits; `false` when stderr took nothing for a
/// second (it will not take a message either). Nothing to do (`true`) without [`init`].
pub fn flush() -> bool {
    stderr::flush()
}

/// Whether log lines on a terminal may be coloured: not with `NO_COLOR` set (no-color.org), and
/// on Windows only where the console takes the colours' escape sequences (a Windows 10 console
/// does once asked to; without asking it printed them as text).
fn colours() -> bool {
    if std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()) {
        return false;
    }
    crate::platform::console_takes_colours()
}

/// `wsbridge check`'s log: warnings and errors (a token file's skipped lines, a duplicate token:
/// what the bridge would log at start), on stderr beside the check's report on stdout, without
/// timestamps; `RUST_LOG` may add more, not take them away. Each is counted
/// ([`warnings_logged`]), for `check --strict`.
pub fn init_warnings() {
    use tracing_subscriber::filter::{FilterExt as _, LevelFilter};
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    // Warnings whatever RUST_LOG says: they are what a check is for (a review: RUST_LOG=error
    // left `--strict` failing with no warning shown).
    let filter = env_filter("warn").or(LevelFilter::WARN);
    let text = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .fmt_fields(PlainFields)
        .with_filter(filter);
    // Its own filter: `RUST_LOG=error` (or `off`) hides warnings from stderr, not from the count
    // (a review: `check --strict` passed an empty credentials file under such a RUST_LOG).
    let count = CountWarnings.with_filter(LevelFilter::WARN);
    tracing_subscriber::registry().with(text).with(count).init();
}

/// `RUST_LOG`'s filter, or `default` where it is unset, empty or malformed (an empty one, as
/// `RUST_LOG=${RUST_LOG}` in a compose file leaves it, logged nothing at all).
fn env_filter(default: &str) -> EnvFilter {
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(v).unwrap_or_else(|_| EnvFilter::new(default)),
        _ => EnvFilter::new(default),
    }
}

/// The warnings and errors logged since [`init_warnings`].
pub fn warnings_logged() -> usize {
    WARNINGS.load(std::sync::atomic::Ordering::Relaxed)
}

static WARNINGS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts the events at warning level or above.
struct CountWarnings;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountWarnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() <= tracing::Level::WARN {
            WARNINGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Whether stderr is systemd's journal (`StandardError=journal`, a unit's default): systemd sets
/// `JOURNAL_STREAM` to the device and inode of the stream it connected, and a process whose
/// stderr was redirected since (or that inherited the variable) has another.
fn stderr_is_the_journal() -> bool {
    #[cfg(unix)]
    {
        let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
            return false;
        };
        let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
            return false;
        };
        let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
            return false;
        };
        rustix::fs::fstat(std::io::stderr()).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
    }
    #[cfg(not(unix))]
    false
}

/// Under the journal, each record starts with its syslog priority (`<3>` error, `<4>` warning,
/// `<6>` info, `<7>` debug and trace), which journald takes as the entry's priority and strips
/// (sd-daemon(3)): `journalctl -p warning` then shows the warnings and errors, which without it
/// all sit at the unit's default priority, info.
#[derive(Clone, Copy)]
struct Journal(bool);

impl Journal {
    fn over<F>(self, format: F) -> Prioritised<F> {
        Prioritised { journal: self.0, format }
    }
}

/// A record format with [`Journal`]'s prefix when stderr is the journal.
struct Prioritised<F> {
    journal: bool,
    format: F,
}

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for Prioritised<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        if self.journal {
            let priority = match *event.metadata().level() {
                tracing::Level::ERROR => 3,
                tracing::Level::WARN => 4,
                tracing::Level::INFO => 6,
                _ => 7,
            };
            write!(writer, "<{priority}>")?;
        }
        self.format.format_event(ctx, writer, event)
    }
}

/// Sets the process's log output to text lines in the file `path` (a Windows service has no
/// stderr), kept bounded: see [`LogFile`]. The filter is [`init`]'s.
///
/// # Errors
/// The file cannot be opened for appending.
///
/// # Panics
/// As [`init`].
pub fn init_file(verbose: u8, path: &std::path::Path) -> std::io::Result<()> {
    init_file_as(verbose, path, LogFormat::Text, Some(LogFile::LIMIT))
}

/// [`init_file`] in `format`: text lines, or JSON objects one a line (the server's `--log-file`
/// with `--log-format json`), set aside at `max_size` bytes (`None`: never, for a rotator).
///
/// # Errors
/// The file cannot be opened for appending.
///
/// # Panics
/// As [`init`].
pub fn init_file_as(verbose: u8, path: &std::path::Path, format: LogFormat, max_size: Option<u64>) -> std::io::Result<()> {
    let filter = env_filter(default_filter(verbose));
    let file = LogFile::open(path, max_size.unwrap_or(u64::MAX))?;
    let builder = tracing_subscriber::fmt()
        .with_timer(UtcMicros)
        .with_env_filter(filter)
        .with_writer(SharedLogFile(std::sync::Mutex::new(file)))
        .with_ansi(false);
    match format {
        LogFormat::Text => builder.fmt_fields(PlainFields).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    log_panics();
    Ok(())
}

/// The log file as the subscriber's writer: one line at a time under its lock. A lock poisoned
/// by a panic (none is expected: the writes are plain file writes) is taken anyway rather than
/// silencing the log from then on.
struct SharedLogFile(std::sync::Mutex<LogFile>);

/// [`SharedLogFile`]'s lock for one line; while it is held, the thread is writing the log
/// ([`WRITING_LOG`]).
struct LogFileLine<'a>(std::sync::MutexGuard<'a, LogFile>);

thread_local! {
    /// Whether this thread is writing a line of the log file: a panic then cannot be logged
    /// there (the lock is this thread's), and goes to the previous hook (stderr) instead.
    static WRITING_LOG: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SharedLogFile {
    type Writer = LogFileLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        WRITING_LOG.with(|w| w.set(true));
        LogFileLine(self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

impl std::io::Write for LogFileLine<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl Drop for LogFileLine<'_> {
    fn drop(&mut self) {
        WRITING_LOG.with(|w| w.set(false));
    }
}

/// Sends panics to the log instead of stderr alone: a panic in a connection's task (a bug) ends
/// that task only, tokio catching it while the bridge or agent goes on, and its report belongs
/// with the other lines, in the same format, with the task's span (which connection), where a
/// journal or a Windows service's log file keeps it (a service has no stderr). With
/// `RUST_BACKTRACE` set, the backtrace is in the line too. Where the log would not take it (a
/// `RUST_LOG` that leaves errors of this module out, or a panic while this thread writes the log
/// file), the previous hook reports it (stderr).
fn log_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if WRITING_LOG.with(std::cell::Cell::get) || !tracing::enabled!(tracing::Level::ERROR) {
            return previous(info);
        }
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_owned());
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        let thread = std::thread::current().name().unwrap_or("unnamed").to_owned();
        let backtrace = std::backtrace::Backtrace::capture();
        match backtrace.status() {
            std::backtrace::BacktraceStatus::Captured => tracing::error!(
                panic = %message, %location, %thread, %backtrace,
                "panic (a bug, please report it): the task it happened in has ended"
            ),
            _ => tracing::error!(
                panic = %message, %location, %thread,
                "panic (a bug, please report it): the task it happened in has ended"
            ),
        }
        // Written now: a panic on the main thread ends the process, and the line is the one
        // that says why. (Not from the writing thread itself, which would wait for itself.)
        if thread != "wsbridge-log" {
            let _ = flush();
        }
    }));
}

/// A log file that stays bounded without a log rotator (Windows has none for a service's file):
/// once it has `limit` bytes it is renamed to `FILE.old`, replacing the one before, and a new
/// one is started, so the two never hold much more than twice `limit`.
///
/// It also gets along with a rotator (logrotate) that works on the file behind its back: opened
/// for appending, its lines land at the end after a `copytruncate` (and the truncation is seen
/// before the file would be set aside, so it is not set aside early); and within a second of a
/// line written after FILE was renamed or removed (logrotate's default `create`), FILE is
/// opened anew, so nothing goes on growing in the renamed file or in a deleted one.
pub struct LogFile {
    path: std::path::PathBuf,
    file: std::fs::File,
    size: u64,
    limit: u64,
    /// How often a write looks whether FILE is still the file being written.
    recheck: std::time::Duration,
    /// When it last looked.
    checked: std::time::Instant,
    /// Opening FILE anew failed, and the file being written says so (once until it works).
    reopen_failed: bool,
}

/// Set by [`look_at_log_file_now`]: the next line looks whether the log file was moved away,
/// whatever the time since the last look.
static LOOK_NOW: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// After a rotator moved the log file away (logrotate's `postrotate`, by SIGHUP): the next line
/// goes to the new FILE, not up to a second more to the renamed one (which `compress` without
/// `delaycompress` may be packing meanwhile).
pub fn look_at_log_file_now() {
    LOOK_NOW.store(true, std::sync::atomic::Ordering::Relaxed);
}

impl LogFile {
    /// The size at which the file is set aside.
    pub const LIMIT: u64 = 10 << 20;

    /// Opens `path` for appending (created if missing).
    ///
    /// # Errors
    /// It cannot be opened.
    pub fn open(path: &std::path::Path, limit: u64) -> std::io::Result<LogFile> {
        LogFile::open_checking(path, limit, std::time::Duration::from_secs(1))
    }

    /// [`LogFile::open`], looking whether FILE was moved away at most every `recheck`.
    fn open_checking(path: &std::path::Path, limit: u64, recheck: std::time::Duration) -> std::io::Result<LogFile> {
        if path.is_dir() {
            // Windows says "Access denied", which sends one looking at permissions.
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "is a directory: name a file in it",
            ));
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(LogFile {
            path: path.to_path_buf(),
            file,
            size,
            limit,
            recheck,
            checked: std::time::Instant::now(),
            reopen_failed: false,
        })
    }

    /// `FILE.old`.
    pub fn old_path(path: &std::path::Path) -> std::path::PathBuf {
        let mut old = path.as_os_str().to_owned();
        old.push(".old");
        old.into()
    }

    /// Sets the full file aside and starts a new one; on failure keeps writing to the old one
    /// (a log line is not worth stopping the agent for).
    fn rotate(&mut self) {
        let old = LogFile::old_path(&self.path);
        // The rename replaces the previous `.old` (on Windows too: std's rename replaces an
        // existing file). It is not removed first: where the rename fails (on Windows, a log
        // viewer holding FILE open without FILE_SHARE_DELETE) the previous `.old` stays, rather
        // than being lost while FILE goes on growing (a Windows review). Reopened after.
        // FILE itself may be gone (a rename that left no new file after it): nothing to set
        // aside, and `.old`, if it is what is being written, is not removed.
        let renamed = match std::fs::metadata(&self.path) {
            Ok(_) => std::fs::rename(&self.path, &old),
            Err(e) => Err(e),
        };
        match std::fs::OpenOptions::new().create(true).append(true).open(&self.path) {
            Ok(file) => {
                if renamed.is_ok() || self.moved() {
                    self.size = 0;
                    self.file = file;
                } else {
                    // Not set aside (a directory wsbridge may not write to): it goes on
                    // growing, tried again only after another `limit`, not at every line.
                    self.size = 0;
                }
            }
            // Set aside but no new FILE (out of descriptors, say): lines go on to `.old`, which the
            // next try leaves in place (FILE is gone), and `moved` opens FILE within a second.
            Err(_) => self.size = 0,
        }
    }

    /// Whether FILE is no longer the file being written: removed, or (on Unix, where a file's
    /// identity can be told) another file there now. A rotator renamed it away.
    fn moved(&self) -> bool {
        let there = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) => return e.kind() == std::io::ErrorKind::NotFound,
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt as _;
            if let Ok(ours) = self.file.metadata() {
                return (there.dev(), there.ino()) != (ours.dev(), ours.ino());
            }
        }
        let _ = there;
        false
    }

    /// Opens FILE anew after a rotator moved the one being written away; on failure keeps
    /// writing where it was, and says so there once (a rotator's `create` with an owner this
    /// process cannot write as, say), since that file is the one an operator reads now.
    fn reopen(&mut self) {
        match std::fs::OpenOptions::new().create(true).append(true).open(&self.path) {
            Ok(file) => {
                self.size = file.metadata().map_or(0, |m| m.len());
                self.file = file;
                self.reopen_failed = false;
            }
            Err(e) if !self.reopen_failed => {
                self.reopen_failed = true;
                let line = format!(
                    "wsbridge: the log file {} was moved away and cannot be opened anew ({e}); logging goes on here until it can\n",
                    self.path.display()
                );
                let _ = std::io::Write::write_all(&mut self.file, line.as_bytes());
            }
            Err(_) => {}
        }
    }
}

impl std::io::Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.checked.elapsed() >= self.recheck || LOOK_NOW.swap(false, std::sync::atomic::Ordering::Relaxed) {
            self.checked = std::time::Instant::now();
            if self.moved() {
                self.reopen();
            }
        }
        if self.size > 0 && self.size + buf.len() as u64 > self.limit {
            // Truncated behind our back (logrotate's copytruncate): counted from what is there.
            self.size = self.file.metadata().map_or(self.size, |m| m.len());
            if self.size > 0 && self.size + buf.len() as u64 > self.limit {
                self.rotate();
            }
        }
        let n = self.file.write(buf)?;
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Timestamps as tracing-subscriber's default writes them, RFC 3339 in UTC to the microsecond
/// (`2026-12-06T05:38:04.770753Z`), with the part up to the second formatted once a second per
/// thread: the default's calendar arithmetic and formatting were about 4 % of the user-space
/// instructions of a short session. A clock set before 1970 gets the default's own formatting.
struct UtcMicros;

impl tracing_subscriber::fmt::time::FormatTime for UtcMicros {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        thread_local! {
            static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
        }
        let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) else {
            return tracing_subscriber::fmt::time::SystemTime.format_time(w);
        };
        let secs = now.as_secs();
        let fraction = fraction(now.subsec_micros());
        let fraction = std::str::from_utf8(&fraction).map_err(|_| std::fmt::Error)?;
        SECOND.with(|second| {
            let mut second = second.borrow_mut();
            if second.1.is_empty() || second.0 != secs {
                *second = (secs, civil_time(secs));
            }
            w.write_str(&second.1)?;
            w.write_str(fraction)
        })
    }
}

/// `.uuuuuuZ` for `micros` below a million.
fn fraction(micros: u32) -> [u8; 8] {
    let mut out = *b".000000Z";
    let mut rest = micros;
    for digit in out[1..7].iter_mut().rev() {
        *digit = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    out
}

/// `YYYY-MM-DDTHH:MM:SS` in UTC for seconds since the Unix epoch (the proleptic Gregorian
/// calendar; days to a date by Howard Hinnant's `civil_from_days`).
fn civil_time(secs: u64) -> String {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    // RFC 3339 stops at year 9999; like tracing-subscriber, a sign marks a year past it.
    let sign = if year > 9999 { "+" } else { "" };
    format!(
        "{sign}{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rest / 3_600,
        rest / 60 % 60,
        rest % 60
    )
}

/// The fields of a text log line (no colours; escaped as [`Escaping`] says): the same
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

    /// A field recorded again on a span replaces its value, as in JSON (tracing-subscriber's
    /// default appends another `name=value`): a kept-alive connection behind a proxy that reuses
    /// its connections records each request's `client`, and its lines named every earlier
    /// client of the connection as `client=` too, the first of them first.
    fn add_fields(
        &self,
        current: &'w mut tracing_subscriber::fmt::FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> std::fmt::Result {
        let mut names = Names(Vec::new());
        fields.record(&mut names);
        if !current.fields.is_empty() {
            current.fields = without(&current.fields, &names.0);
        }
        if !current.fields.is_empty() {
            current.fields.push(' ');
        }
        self.format_fields(current.as_writer(), fields)
    }
}

/// The names of the fields a record holds.
struct Names(Vec<&'static str>);

impl tracing::field::Visit for Names {
    fn record_debug(&mut self, field: &tracing::field::Field, _: &dyn std::fmt::Debug) {
        self.0.push(field.name());
    }
}

/// Span fields as [`PlainFields`] wrote them, without those named `names`.
fn without(fields: &str, names: &[&str]) -> String {
    let mut kept = String::with_capacity(fields.len());
    let mut rest = fields;
    while !rest.is_empty() {
        let end = field_end(rest);
        let field = &rest[..end];
        let name = field.split_once('=').map_or(field, |(name, _)| name);
        if !names.contains(&name) {
            if !kept.is_empty() {
                kept.push(' ');
            }
            kept.push_str(field);
        }
        rest = &rest[end..];
        rest = rest.strip_prefix(' ').unwrap_or(rest);
    }
    kept
}

/// Where the first `name=value` of `fields` ends: after the closing quote of a quoted value (a
/// string, written with `{:?}`: `\"` and `\\` escaped inside), else before the first space that
/// another `name=` follows (a value written with `%` may hold spaces).
fn field_end(fields: &str) -> usize {
    let bytes = fields.as_bytes();
    let value = fields.find('=').map_or(fields.len(), |i| i + 1);
    if bytes.get(value) == Some(&b'"') {
        let mut i = value + 1;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' => i += 2,
                b'"' => return i + 1,
                _ => i += 1,
            }
        }
        return fields.len();
    }
    let mut at = value;
    while let Some(space) = fields[at..].find(' ') {
        let next = &fields[at + space + 1..];
        let name = next
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.'))
            .count();
        if name > 0 && next.as_bytes().get(name) == Some(&b'=') {
            return at + space;
        }
        at += space + 1;
    }
    fields.len()
}

struct PlainVisitor<'w> {
    writer: tracing_subscriber::fmt::format::Writer<'w>,
    first: bool,
    result: std::fmt::Result,
}

impl PlainVisitor<'_> {
    fn write(&mut self, field: &tracing::field::Field, value: std::fmt::Arguments<'_>) {
        use std::fmt::Write;
        if !self.skip(field) {
            let message = field.name() == "message";
            self.result = self
                .name(field)
                .and_then(|()| write!(Escaping(&mut self.writer, message), "{value}"));
        }
    }

    /// A number or a boolean: nothing in it to escape.
    fn write_plain(&mut self, field: &tracing::field::Field, value: impl std::fmt::Display) {
        if !self.skip(field) {
            self.result = self.name(field).and_then(|()| write!(self.writer, "{value}"));
        }
    }

    /// A field's value: as it is when it is one word, else quoted.
    fn value(&mut self, field: &tracing::field::Field, text: &str) {
        if one_word(text) {
            self.write(field, format_args!("{text}"));
        } else {
            self.write(field, format_args!("{text:?}"));
        }
    }

    /// After an error, and `log.*`: where a `log` record came from, which the line already says.
    fn skip(&self, field: &tracing::field::Field) -> bool {
        self.result.is_err() || field.name().starts_with("log.")
    }

    /// The separator and `name=` before a field's value (nothing before the message's).
    fn name(&mut self, field: &tracing::field::Field) -> std::fmt::Result {
        if !std::mem::take(&mut self.first) {
            self.writer.write_char(' ')?;
        }
        match field.name() {
            "message" => Ok(()),
            name => {
                self.writer.write_str(name)?;
                self.writer.write_char('=')
            }
        }
    }
}

/// Writes through to a log line with control and Unicode format characters escaped (`\n`,
/// `\u{1b}`, `\u{202e}`): a field's value cannot start a line of its own, drive the terminal
/// that shows the log, or turn the rest of the line around. In the message
/// (our own text, where a configuration error's snippet spans lines) line breaks and tabs stay,
/// as with tracing-subscriber's default, which escapes the rest there too.
struct Escaping<'a, 'w>(&'a mut tracing_subscriber::fmt::format::Writer<'w>, bool);

impl std::fmt::Write for Escaping<'_, '_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        // Printable ASCII, nearly every piece of a line, goes through whole.
        if s.bytes().all(|b| matches!(b, b' '..=b'~')) {
            return self.0.write_str(s);
        }
        let keep = |c: char| self.1 && matches!(c, '\n' | '\r' | '\t');
        let mut rest = s;
        while let Some((i, c)) = rest.char_indices().find(|&(_, c)| unseen(c) && !keep(c)) {
            self.0.write_str(&rest[..i])?;
            match c.is_control() {
                true => write!(self.0, "{}", c.escape_debug())?,
                false => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
            }
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

impl tracing::field::Visit for PlainVisitor<'_> {
    /// A `&str` value, written by the same rule as a `%display` one (below): `route=/pos`,
    /// `reason="agent shutting down"`, so that one value reads the same whichever way a line
    /// passed it (an agent's instance id read `instance="668d…"` on the server and
    /// `instance=668d…` on the agent).
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.write(field, format_args!("{value}"));
        } else {
            self.value(field, value);
        }
    }

    /// A `%display` or `?debug` value: written as it is when it is one word, quoted (as Rust
    /// quotes a string) when it holds a space, `=`, a quote or nothing, so that a value a peer
    /// chose (an agent's name, an Origin, a proxy's error text) cannot add fields of its own to a
    /// logfmt parser, nor pass for another value (`"shop-17"`, quotes and all, is not `shop-17`).
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            return self.write(field, format_args!("{value:?}"));
        }
        self.value(field, &format!("{value:?}"));
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.write_plain(field, value);
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.write_plain(field, value);
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.write_plain(field, value);
    }
}

/// Whether a field's text reads as one logfmt value without quotes.
fn one_word(text: &str) -> bool {
    !text.is_empty() && !text.chars().any(|c| c.is_whitespace() || unseen(c) || matches!(c, '"' | '='))
}

/// A character that changes how a line looks without showing itself: a control character, or
/// a Unicode format character (Cf: bidirectional overrides and isolates, zero-width spaces and
/// joiners, the byte-order mark, the soft hyphen), which a client's close reason or path could
/// use to show the rest of a line reversed in a terminal or a log viewer. Written escaped
/// (`\u{202e}`), as Rust's `{:?}` writes them.
fn unseen(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{ad}' | '\u{61c}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}')
}

/// A client's address as log lines and the admin's session list show it: `ip:port`, or the bare
/// IP when its port is not known (a client that a trusted proxy's X-Forwarded-For named: port 0).
pub struct Client(pub std::net::SocketAddr);

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.port() {
            0 => self.0.ip().fmt(f),
            _ => self.0.fmt(f),
        }
    }
}

/// An error and its sources, joined by ": " (a binding's own text is often only its kind, e.g.
/// windows-service's "IO error in winapi call", with the OS error as its source).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    /// A log's output kept for a test to read.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// What `f` logs, as the text format writes it to a file (no colours; no time, for the
    /// tests to compare).
    fn logged(f: impl FnOnce()) -> String {
        let out = Buffer::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .without_time()
            .fmt_fields(super::PlainFields)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        out.text()
    }

    /// Each key has its own budget: one key's lines left out do not hide another's first.
    #[tokio::test(start_paused = true)]
    async fn each_key_is_quieted_on_its_own() {
        let q = super::QuietedBy::new(std::time::Duration::from_secs(10));
        assert_eq!(q.take("pos"), Some(0));
        assert_eq!(q.take("pos"), None);
        assert_eq!(q.take("slow"), Some(0), "another service's first line");
        assert_eq!(q.take("pos"), None);
        tokio::time::advance(std::time::Duration::from_secs(10)).await;
        assert_eq!(q.take("pos"), Some(2), "with the two left out");
        assert_eq!(q.take("slow"), Some(0));
    }

    /// A value a peer chose cannot add fields to a line: a value with spaces, `=` or quotes is
    /// quoted, and so is one that looks quoted already; one word and a number stay as they are;
    /// a `&str` value reads as the same `%` one does.
    #[test]
    fn a_value_cannot_forge_fields_and_reads_the_same_passed_either_way() {
        let text = logged(|| {
            let forged = "ghost status=200 reason=\"login ok\" client=10.0.0.1:1";
            tracing::warn!(agent = %forged, status = 401u16, "login refused");
            tracing::warn!(agent = %"shop-17", path = %"C:\\wsb\\agent.toml", "plain");
            tracing::warn!(agent = %"\"shop-17\"", empty = %"", "quotes a peer sent stay theirs");
            tracing::warn!(tail = %"\"x\" y=\"z\"", "quotes at both ends are not enough");
            tracing::warn!(n = %4.5, "{} formatted", "message");
            tracing::warn!(
                agent = "shop-17",
                reason = "agent shutting down",
                agent2 = forged,
                empty = "",
                "as &str"
            );
        });
        let lines: Vec<&str> = text
            .lines()
            .map(|l| l.trim_start_matches(" WARN wsbridge::logging::tests: "))
            .collect();
        let expected = [
            r#"login refused agent="ghost status=200 reason=\"login ok\" client=10.0.0.1:1" status=401"#,
            r#"plain agent=shop-17 path=C:\wsb\agent.toml"#,
            r#"quotes a peer sent stay theirs agent="\"shop-17\"" empty="""#,
            r#"quotes at both ends are not enough tail="\"x\" y=\"z\"""#,
            r#"message formatted n=4.5"#,
            r#"as &str agent=shop-17 reason="agent shutting down" agent2="ghost status=200 reason=\"login ok\" client=10.0.0.1:1" empty="""#,
        ];
        assert_eq!(lines, expected, "{text}");
    }

    /// A span field recorded again replaces the one before, wherever it stands and whatever the
    /// values around it hold (quoted strings with spaces, `=` and escaped quotes; a `%` value
    /// with spaces); the others stay as they were, in their order.
    #[test]
    fn a_span_field_recorded_again_replaces_its_value() {
        let text = logged(|| {
            let span = tracing::info_span!(
                "conn",
                client = tracing::field::Empty,
                via = %"10.0.0.1:40672",
                route = "a \"b\" client=c d",
                target = tracing::field::Empty,
            );
            let _entered = span.enter();
            for client in ["192.0.2.1", "192.0.2.2", "192.0.2.3"] {
                span.record("client", tracing::field::display(client));
                tracing::info!("request");
            }
            span.record("target", tracing::field::display("the app: port 9100"));
            span.record("client", tracing::field::display("192.0.2.4"));
            tracing::info!("last");
        });
        let lines: Vec<&str> = text.lines().collect();
        let expected = [
            r#"conn{via=10.0.0.1:40672 route="a \"b\" client=c d" client=192.0.2.1}: wsbridge::logging::tests: request"#,
            r#"conn{via=10.0.0.1:40672 route="a \"b\" client=c d" client=192.0.2.2}: wsbridge::logging::tests: request"#,
            r#"conn{via=10.0.0.1:40672 route="a \"b\" client=c d" client=192.0.2.3}: wsbridge::logging::tests: request"#,
            r#"conn{via=10.0.0.1:40672 route="a \"b\" client=c d" target="the app: port 9100" client=192.0.2.4}: wsbridge::logging::tests: last"#,
        ];
        assert_eq!(lines.len(), expected.len(), "{text}");
        for (line, expected) in lines.iter().zip(expected) {
            assert!(line.ends_with(expected), "{line}\n{expected}");
        }
    }

    #[test]
    fn chain_joins_an_error_with_its_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot start the service")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("access denied"));
        assert_eq!(super::chain(&e), "cannot start the service: access denied");
        assert_eq!(super::chain(&std::io::Error::other("alone")), "alone");
    }

    use super::*;
    use std::fmt::Write;

    /// The log file's writer takes a lock poisoned by a panic anyway (the log goes on), and says
    /// while a line is being written that this thread writes the log (a panic then goes to
    /// stderr rather than wait for its own lock).
    #[test]
    fn the_log_files_writer_survives_a_poisoned_lock_and_marks_its_lines() {
        use tracing_subscriber::fmt::MakeWriter as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.log");
        let shared = std::sync::Arc::new(SharedLogFile(std::sync::Mutex::new(LogFile::open(&path, LogFile::LIMIT).unwrap())));
        let poisoner = shared.clone();
        let _ = std::thread::spawn(move || {
            let _held = poisoner.0.lock().unwrap();
            std::panic::resume_unwind(Box::new("poisoned on purpose"));
        })
        .join();
        assert!(shared.0.is_poisoned());
        {
            let mut line = shared.make_writer();
            assert!(WRITING_LOG.with(std::cell::Cell::get));
            std::io::Write::write_all(&mut line, b"after the poison\n").unwrap();
        }
        assert!(!WRITING_LOG.with(std::cell::Cell::get));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "after the poison\n");
    }

    #[test]
    fn timestamps_read_as_the_default_formatter_writes_them() {
        let seconds = [
            0,
            951_782_400,
            951_868_800,
            4_107_542_400,
            1_796_520_484,
            253_402_300_799,
            253_402_300_800,
        ];
        let dates = seconds.map(civil_time);
        let want = [
            "1970-01-01T00:00:00",
            "2000-02-29T00:00:00",
            "2000-03-01T00:00:00",
            "2100-03-01T00:00:00",
            "2026-12-06T01:28:04",
            "9999-12-31T23:59:59",
            "+10000-01-01T00:00:00",
        ];
        assert_eq!(dates, want);
        assert_eq!(
            [0, 5, 770_753, 999_999].map(fraction),
            [*b".000000Z", *b".000005Z", *b".770753Z", *b".999999Z"]
        );
        // Now, beside tracing-subscriber's own (retried if a second turns between the two).
        use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
        for _ in 0..3 {
            let (mut ours, mut theirs) = (String::new(), String::new());
            UtcMicros
                .format_time(&mut tracing_subscriber::fmt::format::Writer::new(&mut ours))
                .unwrap();
            SystemTime
                .format_time(&mut tracing_subscriber::fmt::format::Writer::new(&mut theirs))
                .unwrap();
            assert_eq!(ours.len(), theirs.len(), "{ours} / {theirs}");
            assert!(ours.ends_with('Z') && ours.as_bytes()[19] == b'.', "{ours}");
            if ours[..19] == theirs[..19] {
                return;
            }
        }
        panic!("our timestamps' date and time never matched tracing-subscriber's");
    }

    #[test]
    fn a_log_file_is_set_aside_at_its_limit_and_stays_bounded() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.log");
        let mut log = LogFile::open(&path, 100).unwrap();
        for i in 0..30 {
            log.write_all(format!("line {i:02} of the log.\n").as_bytes()).unwrap();
        }
        drop(log);
        let now = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(LogFile::old_path(&path)).unwrap();
        assert!(now.len() <= 100 && old.len() <= 100, "{} and {} bytes", now.len(), old.len());
        assert!(now.ends_with("line 29 of the log.\n"), "{now}");
        // Nothing lost across the last rotation: the old file ends where the new one begins.
        let first: u32 = now[5..7].parse().unwrap();
        assert!(old.ends_with(&format!("line {:02} of the log.\n", first - 1)), "{old}\n--\n{now}");
        // Reopened, it counts what is already there.
        let mut log = LogFile::open(&path, 100).unwrap();
        log.write_all(&[b'x'; 90]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), [b'x'; 90]);
    }

    /// A rotator working on the file behind its back (logrotate): after a `copytruncate` the
    /// lines go on at the start of the emptied file, which is not set aside early; after a
    /// rename (logrotate's `create`) or a removal, FILE is opened anew at the next check, and
    /// the renamed file gets nothing more.
    #[test]
    fn a_log_file_follows_a_rotator_that_truncates_or_renames_it() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wsbridge.log");
        let mut log = LogFile::open_checking(&path, 100, std::time::Duration::ZERO).unwrap();
        log.write_all(&[b'a'; 80]).unwrap();
        // copytruncate: copied elsewhere, then emptied in place.
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
        log.write_all(&[b'b'; 30]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), [b'b'; 30], "appended at the new end");
        assert!(!LogFile::old_path(&path).exists(), "set aside early");
        // create: renamed away (and a new FILE made, or not).
        let rotated = dir.path().join("wsbridge.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.write_all(b"after the rename\n").unwrap();
        assert_eq!(std::fs::read(&rotated).unwrap(), [b'b'; 30], "the renamed file got more");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "after the rename\n");
        std::fs::remove_file(&path).unwrap();
        log.write_all(b"after the removal\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "after the removal\n");
    }

    /// A SIGHUP (logrotate's `postrotate`) has the next line look whether FILE was moved away,
    /// not up to a second later (an operations review: lines written to the renamed file in that
    /// second were lost to `compress` without `delaycompress`); a FILE that cannot be opened anew
    /// is said once in the file being written.
    /// A directory named as the log file says so (on Windows opening it said "Access denied").
    #[test]
    fn a_directory_for_a_log_file_is_said_to_be_one() {
        let dir = tempfile::tempdir().unwrap();
        let e = LogFile::open(dir.path(), 1 << 20).map(|_| ()).unwrap_err();
        assert_eq!(e.to_string(), "is a directory: name a file in it");
    }

    #[test]
    fn a_log_file_is_looked_at_when_asked_and_a_failed_reopen_is_said() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wsbridge.log");
        let mut log = LogFile::open_checking(&path, 1 << 20, std::time::Duration::from_secs(3600)).unwrap();
        log.write_all(b"before\n").unwrap();
        let rotated = dir.path().join("wsbridge.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        look_at_log_file_now();
        log.write_all(b"after\n").unwrap();
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "before\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "after\n");

        // Moved away again, and FILE cannot be made (here a directory is in its place).
        std::fs::rename(&path, &rotated).unwrap();
        std::fs::create_dir(&path).unwrap();
        look_at_log_file_now();
        log.write_all(b"one\n").unwrap();
        look_at_log_file_now();
        log.write_all(b"two\n").unwrap();
        let text = std::fs::read_to_string(&rotated).unwrap();
        assert_eq!(text.matches("cannot be opened anew").count(), 1, "{text}");
        assert!(text.ends_with("one\ntwo\n"), "{text}");
    }

    /// FILE gone when it is to be set aside (a rotator renamed it and made no new one, or the
    /// last set-aside found no descriptor for a new one): nothing is renamed or removed, what is
    /// being written stays, and the lines go on in a new FILE.
    #[test]
    fn a_log_file_gone_when_it_is_set_aside_loses_nothing() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wsbridge.log");
        let mut log = LogFile::open_checking(&path, 100, std::time::Duration::from_secs(3600)).unwrap();
        log.write_all(&[b'a'; 80]).unwrap();
        let rotated = dir.path().join("wsbridge.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.write_all(&[b'b'; 30]).unwrap();
        assert_eq!(std::fs::read(&rotated).unwrap(), [b'a'; 80]);
        assert_eq!(std::fs::read(&path).unwrap(), [b'b'; 30]);
        assert!(!LogFile::old_path(&path).exists());
    }

    /// A set-aside that fails (here `FILE.old` is a directory, which no rename replaces; as
    /// well a directory wsbridge may not write to) loses nothing: the lines go on in FILE, which
    /// grows past the limit, and the next try comes only after another limit's worth.
    #[test]
    fn a_log_file_that_cannot_be_set_aside_loses_nothing() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wsbridge.log");
        let old = LogFile::old_path(&path);
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("kept"), "not ours").unwrap();
        let mut log = LogFile::open(&path, 100).unwrap();
        let lines: Vec<String> = (0..30).map(|i| format!("line {i:02} of the log.\n")).collect();
        for line in &lines {
            log.write_all(line.as_bytes()).unwrap();
        }
        drop(log);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), lines.concat(), "every line, in order");
        assert_eq!(std::fs::read_to_string(old.join("kept")).unwrap(), "not ours");
    }

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
        // Nor can it turn the rest of the line around or hide in it (a close reason with U+202E
        // showed the line reversed in a terminal: a review), one word or not.
        let text = logged(|| {
            tracing::warn!(reason = "ab\u{202e}cd", path = %"/a\u{200b}b", two = "two words\u{2066}", "x\u{feff}y é");
        });
        assert!(
            text.ends_with(
                r#"x\u{feff}y é reason="ab\u{202e}cd" path="/a\u{200b}b" two="two words\u{2066}"
"#
            ),
            "{text:?}"
        );
    }
}
