//! stderr's log lines, written by a thread of their own: a stderr that stops taking lines (a
//! Windows console with text selected in it, a terminal paused with Ctrl-S, a pipe nobody reads)
//! holds back the log, up to [`LINES`] lines, then drops new ones, and never the thread that
//! logged them (the agent's, and the Windows server's, one thread serves every session: a review
//! saw an agent's sessions cut by its server 35 s into a console that took no lines).
//!
//! Lines are queued whole, one per event, so they never interleave. [`flush`] waits for the
//! queue to empty before the process says something on stderr itself or exits, for as long as
//! stderr takes lines (a slow one too), giving up only when it took none for a second. When lines
//! were dropped, a warning says how many once stderr takes lines again, and
//! `log_lines_dropped_total` counts them.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

/// Lines held for a stderr that does not take them before new ones are dropped: about 3 MB at
/// 300 bytes a line.
pub const LINES: usize = 10_000;

/// How long [`flush`] waits for a stderr that takes nothing before it gives up.
const STUCK: Duration = Duration::from_secs(1);

/// The queue to the writing thread.
struct Queue {
    lines: SyncSender<Vec<u8>>,
    progress: Mutex<Progress>,
    /// Signalled after each line written.
    moved: Condvar,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Progress {
    /// Lines queued and not written yet.
    pending: usize,
    /// Lines written so far.
    written: u64,
}

static QUEUE: OnceLock<Queue> = OnceLock::new();

/// Starts the writing thread; `false` if it could not be started (lines then go to stderr
/// directly, as they did before).
pub fn start() -> bool {
    if QUEUE.get().is_some() {
        return true;
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(LINES);
    let queue = Queue {
        lines: tx,
        progress: Mutex::new(Progress::default()),
        moved: Condvar::new(),
        dropped: AtomicU64::new(0),
    };
    if QUEUE.set(queue).is_err() {
        return true;
    }
    std::thread::Builder::new()
        .name("wsbridge-log".into())
        .spawn(move || write_lines(&rx))
        .is_ok()
}

/// The writing thread: each line whole, then, when the queue is empty again after lines were
/// dropped, a warning with their number (through the log, so in its format).
fn write_lines(rx: &Receiver<Vec<u8>>) {
    let Some(queue) = QUEUE.get() else { return };
    let mut reported = 0;
    for line in rx {
        let _ = std::io::stderr().lock().write_all(&line);
        let pending = {
            let mut p = queue.progress.lock().unwrap_or_else(|p| p.into_inner());
            p.pending = p.pending.saturating_sub(1);
            p.written += 1;
            p.pending
        };
        queue.moved.notify_all();
        let dropped = queue.dropped.load(Ordering::Relaxed);
        if pending == 0 && dropped > reported {
            tracing::warn!(
                dropped = dropped - reported,
                "log lines dropped: stderr did not take them (a console with text selected in it, a paused terminal, a pipe nobody reads); counted in log_lines_dropped_total"
            );
            reported = dropped;
        }
    }
}

/// One event's line, queued whole when the formatter is done with it.
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
        let line = std::mem::take(&mut self.0);
        let Some(queue) = QUEUE.get() else {
            let _ = std::io::stderr().lock().write_all(&line);
            return;
        };
        queue.progress.lock().unwrap_or_else(|p| p.into_inner()).pending += 1;
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = queue.lines.try_send(line) {
            let mut p = queue.progress.lock().unwrap_or_else(|p| p.into_inner());
            p.pending = p.pending.saturating_sub(1);
            queue.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Waits until the lines queued so far are written, as long as stderr takes lines; `false` when
/// it took none for [`STUCK`] (stderr then cannot take a message either). `true` without
/// [`start`].
pub fn flush() -> bool {
    let Some(queue) = QUEUE.get() else { return true };
    let mut p = queue.progress.lock().unwrap_or_else(|p| p.into_inner());
    while p.pending > 0 {
        let before = p.written;
        let (next, waited) = queue.moved.wait_timeout(p, STUCK).unwrap_or_else(|p| p.into_inner());
        p = next;
        if waited.timed_out() && p.written == before {
            return false;
        }
    }
    true
}

/// Lines dropped so far because stderr did not take them.
pub fn dropped() -> u64 {
    QUEUE.get().map_or(0, |q| q.dropped.load(Ordering::Relaxed))
}
