//! stderr's log lines, written by a thread of their own: a stderr that stops taking lines (a
//! Windows console with text selected in it, a terminal paused with Ctrl-S, a pipe nobody reads)
//! holds back the log, up to [`LINES`] lines, then drops new ones, and never the thread that
//! logged them (the agent's, and the Windows server's, one thread serves every session: a review
//! saw an agent's sessions cut by its server 35 s into a console that took no lines).
//!
//! Lines are queued whole, one per event, so they never interleave. [`flush`] waits for the
//! queue to empty before the process says something on stderr itself or exits, for as long as
//! stderr takes bytes (a slow one too), giving up only when it took none for a second. When lines
//! were dropped, a warning says how many once stderr takes lines again, and
//! `log_lines_dropped_total` counts them. Where the thread cannot be started (a process limit),
//! lines go to stderr directly, as they did before.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

/// Lines held for a stderr that does not take them before new ones are dropped: about 3 MB at
/// 300 bytes a line.
pub const LINES: usize = 10_000;

/// How long [`flush`] waits for a stderr that takes nothing before it gives up.
const STUCK: Duration = Duration::from_secs(1);

/// The queue to the writing thread.
struct Queue {
    lines: SyncSender<Vec<u8>>,
    shared: Arc<Shared>,
}

/// What the writing thread and the loggers share.
#[derive(Default)]
struct Shared {
    progress: Mutex<Progress>,
    /// Signalled at each write that took bytes.
    moved: Condvar,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Progress {
    /// Lines queued and not all written yet.
    pending: usize,
    /// Bytes written so far: progress, even within a line, for [`flush`].
    bytes: u64,
}

impl Shared {
    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }
}

static QUEUE: OnceLock<Queue> = OnceLock::new();

/// Starts the writing thread; `false` if it could not be started (lines then go to stderr
/// directly).
pub fn start() -> bool {
    if QUEUE.get().is_some() {
        return true;
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(LINES);
    let shared = Arc::new(Shared::default());
    let theirs = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("wsbridge-log".into())
        .spawn(move || write_lines(&rx, &theirs));
    if spawned.is_err() {
        return false;
    }
    let _ = QUEUE.set(Queue { lines: tx, shared });
    true
}

/// The writing thread: each line whole. When the queue is about to be empty after lines were
/// dropped, a warning with their number is logged (through the log, so in its format) before
/// the last line counts as written, so that [`flush`] waits for the warning too.
fn write_lines(rx: &Receiver<Vec<u8>>, shared: &Shared) {
    let mut reported = 0;
    for line in rx {
        write_counted(&line, shared);
        let last = shared.progress().pending == 1;
        let dropped = shared.dropped.load(Ordering::Relaxed);
        if last && dropped > reported {
            tracing::warn!(
                dropped = dropped - reported,
                "log lines dropped: stderr did not take them (a console with text selected in it, a paused terminal, a pipe nobody reads); counted in log_lines_dropped_total"
            );
            reported = dropped;
        }
        let mut p = shared.progress();
        p.pending = p.pending.saturating_sub(1);
        drop(p);
        shared.moved.notify_all();
    }
}

/// Writes `line` to stderr, counting each write's bytes as progress; a stderr that fails (closed,
/// a full disk) loses the line.
fn write_counted(line: &[u8], shared: &Shared) {
    let stderr = std::io::stderr();
    let mut stderr = stderr.lock();
    let mut rest = line;
    while !rest.is_empty() {
        match stderr.write(rest) {
            Ok(0) => return,
            Ok(n) => {
                rest = &rest[n..];
                shared.progress().bytes += n as u64;
                shared.moved.notify_all();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
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
        queue.shared.progress().pending += 1;
        match queue.lines.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                queue.shared.progress().pending -= 1;
                queue.shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
            // The thread is gone (it never ends by itself): straight to stderr.
            Err(TrySendError::Disconnected(line)) => {
                queue.shared.progress().pending -= 1;
                let _ = std::io::stderr().lock().write_all(&line);
            }
        }
    }
}

/// Waits until the lines queued so far are written, as long as stderr takes bytes; `false` when
/// it took none for [`STUCK`] (stderr then cannot take a message either). `true` without
/// [`start`].
pub fn flush() -> bool {
    let Some(queue) = QUEUE.get() else { return true };
    let shared = &queue.shared;
    let mut p = shared.progress();
    while p.pending > 0 {
        let before = p.bytes;
        let (next, waited) = shared.moved.wait_timeout(p, STUCK).unwrap_or_else(|p| p.into_inner());
        p = next;
        if waited.timed_out() && p.bytes == before {
            return false;
        }
    }
    true
}

/// Lines dropped so far because stderr did not take them.
pub fn dropped() -> u64 {
    QUEUE.get().map_or(0, |q| q.shared.dropped.load(Ordering::Relaxed))
}
