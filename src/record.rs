//! Session recording, websockify's `--record FILE`: the bytes each session carried, both ways and
//! with their times, written to `FILE.N` (N the session's number, as in its log line) in the format
//! websockify writes and noVNC's playback page (`tests/vnc_playback.html`) loads as a script:
//!
//! ```text
//! var VNC_frame_data = [
//! '{0{RFB 003.008\n',
//! '}12}RFB 003.008\n',
//! '{13{\x01\x02',
//! 'EOF'];
//! ```
//!
//! One line per chunk: `'{MS{DATA',` for bytes the backend sent (to the client), `'}MS}DATA',` for
//! a client message's payload (to the backend); MS is milliseconds since the session started, and
//! never goes down. DATA is the bytes as a JavaScript string literal of ASCII, escaped exactly as
//! websockify escapes them (`bytes.decode('latin1').encode('unicode_escape')`, then `'` → `\'`):
//! printable ASCII as itself, `\t` `\n` `\r` `\\` `\'`, every other byte `\xNN` (lowercase hex).
//! One chunk is one read from the backend (in `binary` framing that is one message to the client;
//! in `text` and `lines` framing the recording holds the backend's bytes, not the text messages
//! made of them) and one piece of a client message as it arrived.
//!
//! The relay never waits for the disk: it copies each chunk into a bounded channel to a writer
//! task of the session's own, and what waits there is capped at [`QUEUED_MAX`] bytes. A writer
//! that falls that far behind, a file that would pass its size cap, or a write that fails ends the
//! recording (one warning saying which), not the session: the file gets its trailer, so what was
//! recorded stays a valid recording, and the session goes on unrecorded. A file that cannot be
//! created is a warning and an unrecorded session. Files are created with mode 0600 on Unix
//! (recordings hold keystrokes and passwords), and never overwrite one: if `FILE.N` exists (from
//! an earlier run), `FILE.N.RUN` is used, RUN naming this run (its start time and process id).
//! What waits for all writers together is capped too ([`TOTAL_QUEUED_MAX`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

/// The size cap of a recording file when the configuration sets none.
pub const DEFAULT_MAX_SIZE: u64 = 64 << 20;
/// The most bytes of one session waiting for its writer: past this the recording is cut rather
/// than memory grown or the session slowed. Sixteen of the relay's largest reads.
pub const QUEUED_MAX: usize = 4 << 20;
/// The most bytes waiting for every recording's writer together: a slow disk under thousands of
/// sessions cuts recordings rather than holding [`QUEUED_MAX`] for each of them.
pub const TOTAL_QUEUED_MAX: usize = 64 << 20;
/// Chunks waiting for the writer (small chunks are bounded by count, large ones by bytes).
const CHANNEL: usize = 1024;
/// How many `FILE.N.RUN.k` names are tried when `FILE.N` and `FILE.N.RUN` exist.
const NAME_TRIES: u32 = 100;

/// Bytes waiting for all writers (see [`TOTAL_QUEUED_MAX`]).
static TOTAL_QUEUED: AtomicUsize = AtomicUsize::new(0);

/// The first line of a recording.
pub const HEADER: &[u8] = b"var VNC_frame_data = [\n";
/// The last line of a recording.
pub const TRAILER: &[u8] = b"'EOF'];\n";

/// Where and how much a route records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordConfig {
    /// Files are `prefix.N`, N the session number.
    pub prefix: PathBuf,
    /// The largest a file may grow, trailer included; `None`: no cap.
    pub max_size: Option<u64>,
}

/// Which way a chunk went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the backend to the client: `{`.
    ToClient,
    /// From the client to the backend: `}`.
    FromClient,
}

impl Direction {
    fn marker(self) -> u8 {
        match self {
            Direction::ToClient => b'{',
            Direction::FromClient => b'}',
        }
    }
}

/// A session number for a session that has none (one run without the admin's session table).
pub fn next_number() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// One chunk on its way to the writer.
struct Chunk {
    dir: Direction,
    ms: u64,
    data: Vec<u8>,
}

/// What the relay and the writer share.
#[derive(Default)]
struct Shared {
    /// Bytes of data in the channel.
    queued: AtomicUsize,
    /// The writer stopped (no file, cap reached, a write failed): nothing more is sent.
    stopped: AtomicBool,
    /// The relay cut the recording because the writer fell behind; the writer says so.
    behind: AtomicBool,
}

/// One session's recording, held by the relay. Recording a chunk is a copy into a bounded
/// channel, never a wait.
pub struct Recorder {
    tx: Option<mpsc::Sender<Chunk>>,
    start: Instant,
    shared: Arc<Shared>,
    writer: JoinHandle<()>,
}

impl Recorder {
    /// Starts recording session `number` under `config` (the file is created by the writer task,
    /// so the session does not wait for it). Must be called within a tokio runtime; the writer's
    /// log lines carry the current span.
    pub fn start(config: &RecordConfig, number: u64) -> Recorder {
        let (tx, rx) = mpsc::channel(CHANNEL);
        let shared = Arc::new(Shared::default());
        let writer = Writer {
            prefix: config.prefix.clone(),
            number,
            max_size: config.max_size,
            shared: shared.clone(),
        };
        let writer = tokio::spawn(writer.run(rx).instrument(tracing::Span::current()));
        Recorder {
            tx: Some(tx),
            start: Instant::now(),
            shared,
            writer,
        }
    }

    /// Records `data` going `dir`, unless the recording has ended. Empty chunks are not recorded.
    pub fn record(&mut self, dir: Direction, data: &[u8]) {
        let Some(tx) = &self.tx else { return };
        if data.is_empty() {
            return;
        }
        if self.shared.stopped.load(Ordering::Relaxed) {
            self.tx = None;
            return;
        }
        let queued = self.shared.queued.load(Ordering::Relaxed);
        if queued + data.len() > QUEUED_MAX {
            return self.fell_behind();
        }
        if !charge(&TOTAL_QUEUED, TOTAL_QUEUED_MAX, data.len()) {
            return self.fell_behind();
        }
        self.shared.queued.fetch_add(data.len(), Ordering::Relaxed);
        let chunk = Chunk {
            dir,
            ms: self.start.elapsed().as_millis() as u64,
            data: data.to_vec(),
        };
        match tx.try_send(chunk) {
            Ok(()) => {}
            Err(e) => {
                TOTAL_QUEUED.fetch_sub(data.len(), Ordering::Relaxed);
                match e {
                    mpsc::error::TrySendError::Full(_) => self.fell_behind(),
                    mpsc::error::TrySendError::Closed(_) => self.tx = None,
                }
            }
        }
    }

    /// The writer is too far behind: the recording ends here (the writer writes what it has, the
    /// trailer, and says why).
    fn fell_behind(&mut self) {
        self.shared.behind.store(true, Ordering::Relaxed);
        self.tx = None;
    }

    /// Ends the recording and waits, at most `wait`, for the writer to finish the file.
    pub async fn finish(mut self, wait: Duration) {
        self.tx = None;
        if tokio::time::timeout(wait, &mut self.writer).await.is_err() {
            // The disk is that slow: the writer finishes on its own.
            tracing::warn!(
                wait_ms = wait.as_millis() as u64,
                "recording still being written as the session ends"
            );
        }
    }
}

/// Adds `len` to `total` unless that would pass `max` (then `total` is left as it was).
fn charge(total: &AtomicUsize, max: usize, len: usize) -> bool {
    if total.fetch_add(len, Ordering::Relaxed) + len > max {
        total.fetch_sub(len, Ordering::Relaxed);
        return false;
    }
    true
}

/// The writer task of one recording.
struct Writer {
    prefix: PathBuf,
    number: u64,
    max_size: Option<u64>,
    shared: Arc<Shared>,
}

/// Why a recording ended before its session did.
enum Cut {
    Cap,
    Behind,
    Failed(io::Error),
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Chunk>) {
        let (file, path) = match create(&self.prefix, self.number).await {
            Ok(f) => f,
            Err(e) => {
                self.shared.stopped.store(true, Ordering::Relaxed);
                let file = name(&self.prefix, &[&self.number.to_string()]);
                return tracing::warn!(file = %file.display(), error = %e, "session not recorded: cannot create the file");
            }
        };
        tracing::debug!(file = %path.display(), "recording the session");
        let mut out = BufWriter::with_capacity(64 * 1024, file);
        let cap = self.max_size.unwrap_or(u64::MAX);
        let mut written = HEADER.len() as u64;
        let mut cut = None;
        let mut line = Vec::new();
        if let Err(e) = out.write_all(HEADER).await {
            cut = Some(Cut::Failed(e));
        }
        while cut.is_none() {
            let Some(chunk) = rx.recv().await else { break };
            self.shared.queued.fetch_sub(chunk.data.len(), Ordering::Relaxed);
            TOTAL_QUEUED.fetch_sub(chunk.data.len(), Ordering::Relaxed);
            line.clear();
            let room = cap.saturating_sub(written + TRAILER.len() as u64);
            if !format_line_within(chunk.dir, chunk.ms, &chunk.data, &mut line, room) {
                // What fits of this chunk is its last line: the recording holds the session's
                // bytes up to the cap, exactly.
                cut = Some(Cut::Cap);
            }
            if line.is_empty() {
                break;
            }
            match out.write_all(&line).await {
                Ok(()) => written += line.len() as u64,
                Err(e) => cut = Some(Cut::Failed(e)),
            }
        }
        // Nothing more is taken: the relay stops copying.
        self.shared.stopped.store(true, Ordering::Relaxed);
        rx.close();
        // What was queued and will not be written leaves the total.
        while let Ok(chunk) = rx.try_recv() {
            TOTAL_QUEUED.fetch_sub(chunk.data.len(), Ordering::Relaxed);
        }
        if cut.is_none() && self.shared.behind.load(Ordering::Relaxed) {
            cut = Some(Cut::Behind);
        }
        let end = async {
            out.write_all(TRAILER).await?;
            out.flush().await
        };
        if let Err(e) = end.await {
            if cut.is_none() {
                cut = Some(Cut::Failed(e));
            }
        }
        let file = path.display();
        match cut {
            None => tracing::debug!(%file, bytes = written + TRAILER.len() as u64, "recording complete"),
            Some(Cut::Cap) => tracing::warn!(
                %file,
                max_size = cap,
                "recording cut: the file reached its size cap (record_max_size); the session goes on unrecorded"
            ),
            Some(Cut::Behind) => tracing::warn!(
                %file,
                queued_max = QUEUED_MAX,
                "recording cut: writing the file fell behind the session; the session goes on unrecorded"
            ),
            Some(Cut::Failed(e)) => {
                tracing::warn!(%file, error = %e, "recording cut: writing the file failed; the session goes on unrecorded")
            }
        }
    }
}

/// Creates `prefix.number` (mode 0600 on Unix), websockify's name; if a file of an earlier run
/// has it, `prefix.number.RUN` (RUN: this process's start time and id), then `….RUN.k`: a
/// recording is never overwritten.
async fn create(prefix: &Path, number: u64) -> io::Result<(tokio::fs::File, PathBuf)> {
    static RUN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("{secs}-{}", std::process::id())
    });
    let number = number.to_string();
    let mut last = None;
    for k in 0..=NAME_TRIES + 1 {
        let path = match k {
            0 => name(prefix, &[&number]),
            1 => name(prefix, &[&number, &RUN]),
            k => name(prefix, &[&number, &RUN, &(k - 1).to_string()]),
        };
        let mut options = tokio::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        options.mode(0o600);
        match options.open(&path).await {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::ErrorKind::AlreadyExists.into()))
}

/// `prefix.a.b…`, built on the prefix's own bytes (a path that is not UTF-8 stays itself).
fn name(prefix: &Path, parts: &[&str]) -> PathBuf {
    let mut name = prefix.as_os_str().to_owned();
    for part in parts {
        name.push(".");
        name.push(part);
    }
    PathBuf::from(name)
}

/// Appends one recording line for `data`: `'{MS{DATA',\n` or `'}MS}DATA',\n`.
pub fn format_line(dir: Direction, ms: u64, data: &[u8], out: &mut Vec<u8>) {
    format_line_within(dir, ms, data, out, u64::MAX);
}

/// [`format_line`] in at most `room` bytes: as much of `data` as fits (nothing when not even one
/// byte does). Returns whether all of it did.
fn format_line_within(dir: Direction, ms: u64, data: &[u8], out: &mut Vec<u8>, room: u64) -> bool {
    const END: &[u8] = b"',\n";
    let start = out.len();
    let m = dir.marker();
    out.push(b'\'');
    out.push(m);
    out.extend_from_slice(ms.to_string().as_bytes());
    out.push(m);
    let fixed = (out.len() - start + END.len()) as u64;
    // Escaped, a byte takes at most 4: the whole chunk fits unless it is near the cap.
    let fits = room.saturating_sub(fixed) / 4;
    if fits >= data.len() as u64 {
        escape(data, out);
        out.extend_from_slice(END);
        return true;
    }
    let mut taken = 0;
    for (i, &b) in data.iter().enumerate() {
        let before = out.len();
        escape(std::slice::from_ref(&b), out);
        if (out.len() - start + END.len()) as u64 > room {
            out.truncate(before);
            break;
        }
        taken = i + 1;
    }
    if taken == 0 {
        out.truncate(start);
    } else {
        out.extend_from_slice(END);
    }
    taken == data.len()
}

/// Appends `data` escaped as websockify escapes it (see the module documentation).
pub fn escape(data: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(data.len());
    for &b in data {
        match b {
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\'' => out.extend_from_slice(b"\\'"),
            0x20..=0x7e => out.push(b),
            _ => out.extend_from_slice(&[b'\\', b'x', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]),
        }
    }
}

#[cfg(test)]
mod tests {
    /// The budget all recorders share: bytes are admitted up to the cap, never past it, and a
    /// refused chunk leaves the count as it was.
    #[test]
    fn the_shared_budget_admits_up_to_its_cap() {
        let total = AtomicUsize::new(0);
        assert!(charge(&total, 100, 60));
        assert!(charge(&total, 100, 40));
        assert!(!charge(&total, 100, 1), "past the cap");
        assert_eq!(total.load(Ordering::Relaxed), 100);
        total.fetch_sub(50, Ordering::Relaxed);
        assert!(!charge(&total, 100, 51));
        assert!(charge(&total, 100, 50));
    }

    use super::*;

    /// What websockify writes for the 256 byte values (Python 3:
    /// `bytes(range(256)).decode('latin1').encode('unicode_escape').decode('ascii').replace("'", "\\'")`).
    #[test]
    fn escapes_as_websockify_does() {
        let mut out = Vec::new();
        escape(&(0..=255u8).collect::<Vec<_>>(), &mut out);
        let mut expected = String::new();
        for b in 0..=255u8 {
            match b {
                0x09 => expected.push_str("\\t"),
                0x0a => expected.push_str("\\n"),
                0x0d => expected.push_str("\\r"),
                b'\\' => expected.push_str("\\\\"),
                b'\'' => expected.push_str("\\'"),
                0x20..=0x7e => expected.push(char::from(b)),
                _ => expected.push_str(&format!("\\x{b:02x}")),
            }
        }
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        let mut line = Vec::new();
        format_line(Direction::FromClient, 42, b"a'b", &mut line);
        assert_eq!(line, b"'}42}a\\'b',\n");
        // Near the cap, a chunk is cut between two escaped bytes, never inside one.
        for room in 0..20u64 {
            let mut line = Vec::new();
            let all = format_line_within(Direction::ToClient, 5, b"ab\xff\n", &mut line, room);
            assert!(line.len() as u64 <= room, "{room}");
            let full: &[u8] = b"'{5{ab\\xff\\n',\n";
            assert_eq!(all, line == full, "{room}");
            if !line.is_empty() {
                let cut = &line[..line.len() - 3];
                assert!(
                    full.starts_with(cut) && line.ends_with(b"',\n"),
                    "{room}: {}",
                    String::from_utf8_lossy(&line)
                );
                // After `a`, `b`, `\xff` or `\n`.
                assert!([5, 6, 10, 12].contains(&cut.len()), "{room}: {}", String::from_utf8_lossy(&line));
            }
        }
    }

    /// A writer that cannot keep up (it never runs while the session records: one thread, no
    /// await) cuts the recording at [`QUEUED_MAX`]; the file still ends with the trailer, holds
    /// what was queued before the cut, and the relay's memory for it stayed bounded.
    #[tokio::test]
    async fn a_writer_that_falls_behind_cuts_the_recording_not_the_session() {
        let dir = tempfile::tempdir().unwrap();
        let config = RecordConfig {
            prefix: dir.path().join("rec"),
            max_size: None,
        };
        let mut r = Recorder::start(&config, 7);
        let chunk = vec![b'x'; 256 * 1024];
        for _ in 0..64 {
            r.record(Direction::ToClient, &chunk);
        }
        assert!(r.tx.is_none(), "the recording was not cut");
        assert!(r.shared.queued.load(Ordering::Relaxed) <= QUEUED_MAX);
        r.finish(Duration::from_secs(10)).await;
        let text = std::fs::read(dir.path().join("rec.7")).unwrap();
        assert!(text.starts_with(HEADER) && text.ends_with(TRAILER));
        let lines = text.split(|&b| b == b'\n').filter(|l| l.starts_with(b"'{")).count();
        assert_eq!(lines, QUEUED_MAX / chunk.len());
    }

    /// An existing file is never overwritten; a name of this run's is used, created 0600, and
    /// however many runs came before, there is one.
    #[tokio::test]
    async fn an_existing_recording_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rec.3"), "old").unwrap();
        let (_, path) = create(&dir.path().join("rec"), 3).await.unwrap();
        let run = path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .strip_prefix("rec.3.")
            .unwrap()
            .to_owned();
        assert!(run.ends_with(&format!("-{}", std::process::id())), "{}", path.display());
        assert_eq!(std::fs::read(dir.path().join("rec.3")).unwrap(), b"old");
        // 150 earlier runs' rec.3.X files do not matter; a second rec.3 in this run gets .1.
        for i in 0..150 {
            std::fs::write(dir.path().join(format!("rec.3.{i}")), "older").unwrap();
        }
        let (_, again) = create(&dir.path().join("rec"), 3).await.unwrap();
        assert_eq!(again, dir.path().join(format!("rec.3.{run}.1")));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
