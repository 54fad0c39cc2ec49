//! stderr's log lines, written by a thread of their own: a stderr that stops taking lines (a
//! Windows console with text selected in it, a terminal paused with Ctrl-S, a pipe nobody reads)
//! holds back the log, up to [`LINES`] lines, then drops new ones, and never the thread that
//! logged them (the agent's, and the Windows server's, one thread serves every session: a review
//! saw an agent's sessions cut by its server 35 s into a console that took no lines).
//!
//! A line is appended whole to a buffer, so lines never interleave, and the thread writes what
//! has gathered every [`EVERY`] (sooner once [`BATCH`] lines wait), in one write where stderr
//! takes it: a line costs its logger no system call and no wake-up of another thread (a wake-up a
//! line cost 20 % of the session rate, where each session logs its close). [`flush`] has the
//! buffer written before the process says something on stderr itself or exits, for as long as
//! stderr takes bytes (a slow one too), giving up only when it took none for a second. When lines
//! were dropped, a warning says how many once stderr takes lines again, and
//! `log_lines_dropped_total` counts them. Where the thread cannot be started (a process limit),
//! lines go to stderr directly, as they did before.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// Lines held for a stderr that does not take them before new ones are dropped.
pub const LINES: usize = 10_000;
/// Bytes held at most (a line can be long: a panic's backtrace).
const BYTES: usize = 4 << 20;
/// How often the thread writes what has gathered.
const EVERY: Duration = Duration::from_millis(10);
/// Lines waiting that have the thread write them at once.
const BATCH: usize = 256;
/// How long [`flush`] waits for a stderr that takes nothing before it gives up.
const STUCK: Duration = Duration::from_secs(1);

/// The buffer and the writing thread's state.
struct Shared {
    state: Mutex<State>,
    /// The thread waits on it: lines to write at once (a batch, a flush).
    wanted: Condvar,
    /// Flushes wait on it: bytes written.
    moved: Condvar,
    dropped: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Lines appended and not taken by the thread yet.
    buffer: Vec<u8>,
    buffered: usize,
    /// Lines taken by the thread and not all written yet.
    writing: usize,
    /// Bytes written so far: progress, even within a line, for [`flush`].
    written: u64,
    /// Flushes waiting.
    flushing: usize,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

static SHARED: OnceLock<&'static Shared> = OnceLock::new();

/// Starts the writing thread; `false` if it could not be started (lines then go to stderr
/// directly).
pub fn start() -> bool {
    if SHARED.get().is_some() {
        return true;
    }
    // Lives as long as the process, as the thread does.
    let shared: &'static Shared = Box::leak(Box::new(Shared {
        state: Mutex::new(State::default()),
        wanted: Condvar::new(),
        moved: Condvar::new(),
        dropped: AtomicU64::new(0),
    }));
    let spawned = std::thread::Builder::new()
        .name("wsbridge-log".into())
        .spawn(move || write_lines(shared));
    if spawned.is_err() {
        return false;
    }
    let _ = SHARED.set(shared);
    true
}

/// The writing thread: takes what has gathered and writes it. When lines were dropped, a
/// warning with their number is logged (through the log, so in its format) before the lines
/// taken count as written, so that [`flush`] waits for the warning too.
fn write_lines(shared: &'static Shared) {
    let mut reported = 0;
    loop {
        let (bytes, lines) = {
            let mut s = shared.state();
            while s.buffered == 0 {
                s = shared.wanted.wait_timeout(s, EVERY).unwrap_or_else(|p| p.into_inner()).0;
            }
            if s.buffered < BATCH && s.flushing == 0 {
                // Let more gather (a wake-up a line is what this avoids), unless asked.
                s = shared.wanted.wait_timeout(s, EVERY).unwrap_or_else(|p| p.into_inner()).0;
            }
            let lines = std::mem::take(&mut s.buffered);
            s.writing = lines;
            (std::mem::take(&mut s.buffer), lines)
        };
        write_counted(&bytes, shared);
        let dropped = shared.dropped.load(Ordering::Relaxed);
        if dropped > reported {
            tracing::warn!(
                dropped = dropped - reported,
                "log lines dropped: stderr did not take them (a console with text selected in it, a paused terminal, a pipe nobody reads); counted in log_lines_dropped_total"
            );
            reported = dropped;
        }
        let mut s = shared.state();
        s.writing = s.writing.saturating_sub(lines);
        if s.flushing > 0 {
            shared.moved.notify_all();
        }
    }
}

/// Writes `bytes` to stderr, counting each write's bytes as progress; a stderr that fails (closed,
/// a full disk) loses them.
fn write_counted(bytes: &[u8], shared: &Shared) {
    let stderr = std::io::stderr();
    let mut stderr = stderr.lock();
    let mut rest = bytes;
    while !rest.is_empty() {
        match stderr.write(rest) {
            Ok(0) => return,
            Ok(n) => {
                rest = &rest[n..];
                let mut s = shared.state();
                s.written += n as u64;
                if s.flushing > 0 {
                    shared.moved.notify_all();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// One event's line, appended whole to the buffer when the formatter is done with it.
#[derive(Default)]
pub struct Line(Vec<u8>);

impl std::io::Write for Line {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let Some(shared) = SHARED.get() else {
            let _ = std::io::stderr().lock().write_all(&self.0);
            return;
        };
        let mut s = shared.state();
        if s.buffered + s.writing >= LINES || s.buffer.len() + self.0.len() > BYTES {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        s.buffer.extend_from_slice(&self.0);
        s.buffered += 1;
        if s.buffered == BATCH {
            shared.wanted.notify_one();
        }
    }
}

/// Waits until the lines appended so far are written, as long as stderr takes bytes; `false`
/// when it took none for [`STUCK`] (stderr then cannot take a message either). `true` without
/// [`start`].
pub fn flush() -> bool {
    let Some(shared) = SHARED.get() else { return true };
    let mut s = shared.state();
    s.flushing += 1;
    shared.wanted.notify_one();
    let mut drained = true;
    while s.buffered + s.writing > 0 {
        let before = s.written;
        let (next, waited) = shared.moved.wait_timeout(s, STUCK).unwrap_or_else(|p| p.into_inner());
        s = next;
        if waited.timed_out() && s.written == before {
            drained = false;
            break;
        }
        // The thread may be waiting for more to gather: asked again.
        shared.wanted.notify_one();
    }
    s.flushing -= 1;
    drained
}

/// Lines dropped so far because stderr did not take them.
pub fn dropped() -> u64 {
    SHARED.get().map_or(0, |s| s.dropped.load(Ordering::Relaxed))
}
