//! Agents from files, for fleets of hundreds or thousands: `[[agents]] source = "fleet.d/"`, a
//! file or a directory of files of `NAME: SHA256HEX` lines (`#` comments, blank lines), re-read
//! when they change, as token files are: the files' names, sizes and modification times are
//! looked at no more than once per [`RECHECK`], on the blocking pool, and a re-read waits at most
//! [`REREAD_WAIT`] before the last snapshot answers. In a directory, hidden files and the
//! backups editors and package managers leave ([`crate::tokens::is_skipped`]) are not read, and a
//! file that cannot be read while serving is left out, named in a warning (its agents are not
//! declared), rather than holding back the re-read of the others (an agent removed from another
//! file would stay in); at start and on a reload it is an error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{timeout, Instant};
use tracing::warn;

use super::link;

/// A snapshot older than this is checked against the files before it answers.
pub const RECHECK: Duration = Duration::from_secs(1);
/// The longest a login waits for a re-read before the last snapshot answers.
pub const REREAD_WAIT: Duration = Duration::from_secs(1);

/// One `[[agents]]` source in service.
#[derive(Debug)]
pub struct FleetSource {
    path: PathBuf,
    state: tokio::sync::Mutex<State>,
}

#[derive(Debug)]
struct State {
    checked: Instant,
    stamp: u64,
    agents: Arc<Hashes>,
    /// Raised at each look at the files that succeeded (a read, or their stamp found
    /// unchanged), not at one that failed or timed out: two answers of different generations
    /// come from two good looks.
    generation: u64,
}

impl FleetSource {
    /// Reads the source now.
    ///
    /// # Errors
    /// A file that cannot be read, or a bad line (`file:line: what`).
    pub fn load(path: &Path) -> Result<FleetSource, String> {
        let (stamp, agents, unreadable) = read(path)?;
        if let Some(e) = unreadable.into_iter().next() {
            return Err(e);
        }
        Ok(FleetSource {
            path: path.to_path_buf(),
            state: tokio::sync::Mutex::new(State {
                checked: Instant::now(),
                stamp,
                agents: Arc::new(agents),
                generation: 0,
            }),
        })
    }

    /// The SHA-256s of `name`'s secrets (one per line that lists it), if the files declare it
    /// (as they are now, within [`RECHECK`]), and the answer's generation (see `State`).
    pub async fn get(&self, name: &str) -> (Option<Vec<[u8; 32]>>, u64) {
        // One re-read at a time; logins meanwhile wait for it (at most REREAD_WAIT).
        let mut state = self.state.lock().await;
        if state.checked.elapsed() >= RECHECK {
            let (path, old) = (self.path.clone(), state.stamp);
            let reread = tokio::task::spawn_blocking(move || match stamp(&path) {
                Ok(s) if s == old => Ok(None),
                _ => read(&path).map(Some),
            });
            match timeout(REREAD_WAIT, reread).await {
                Ok(Ok(Ok(Some((stamp, agents, unreadable))))) => {
                    for e in unreadable {
                        warn!(source = %self.path.display(), error = %e, "agents file left out: it cannot be read, so the agents it lists are not declared");
                    }
                    state.stamp = stamp;
                    state.agents = Arc::new(agents);
                    state.generation += 1;
                }
                Ok(Ok(Ok(None))) => state.generation += 1,
                Ok(Ok(Err(e))) => warn!(source = %self.path.display(), error = %e, "agents source not re-read; the last one read stays"),
                _ => warn!(source = %self.path.display(), "agents source not re-read in time; the last one read answers"),
            }
            state.checked = Instant::now();
        }
        (state.agents.get(name).cloned(), state.generation)
    }
}

use crate::tokens::{files_of, stamp};

/// The names a source declares now, read at once (for start-up checks, off the data path).
///
/// # Errors
/// As [`FleetSource::load`].
pub fn names(path: &Path) -> Result<Vec<String>, String> {
    let (_, agents, unreadable) = read(path)?;
    if let Some(e) = unreadable.into_iter().next() {
        return Err(e);
    }
    let mut names: Vec<String> = agents.into_keys().collect();
    names.sort();
    Ok(names)
}

/// Each declared agent's secret hashes.
type Hashes = HashMap<String, Vec<[u8; 32]>>;

/// The files' stamp, the agents they declare, and the files of a directory that could not be
/// read (each `file: what`), left out.
fn read(path: &Path) -> Result<(u64, Hashes, Vec<String>), String> {
    let at = |e: std::io::Error| format!("{}: {e}", path.display());
    let before = stamp(path).map_err(at)?;
    let mut agents = HashMap::new();
    let mut unreadable = Vec::new();
    let files = files_of(path).map_err(at)?;
    let directory = files.first().is_some_and(|f| f != path);
    for file in files {
        let text = match crate::platform::read_text(&file) {
            Ok(text) => text,
            // Removed since the directory was listed (a link to nothing is there, unreadable).
            Err(e) if directory && e.kind() == std::io::ErrorKind::NotFound && !crate::tokens::is_there(&file) => continue,
            Err(e) if directory => {
                unreadable.push(format!("{}: {}", file.display(), crate::tokens::dangling_said(e)));
                continue;
            }
            Err(e) => return Err(format!("{}: {e}", file.display())),
        };
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |what: &str| format!("{}:{}: {what}", file.display(), i + 1);
            let (name, hash) = line.split_once(':').ok_or_else(|| bad("expected NAME: SHA256HEX"))?;
            let name = name.trim();
            if !link::valid_name(name) {
                return Err(bad("an agent name is 1-64 of A-Z a-z 0-9 . _ -"));
            }
            let digest = link::parse_sha256(hash).ok_or_else(|| bad("the secret's SHA-256 is 64 hex digits"))?;
            // A name on several lines (a rotation: the new secret's and the old one's) logs in
            // with any of them.
            let hashes: &mut Vec<[u8; 32]> = agents.entry(name.to_owned()).or_default();
            if hashes.len() == super::MAX_SECRETS {
                return Err(bad(&format!("{name} is listed more than {} times", super::MAX_SECRETS)));
            }
            hashes.push(digest);
        }
    }
    Ok((before, agents, unreadable))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[tokio::test]
    async fn a_fleet_directory_is_read_and_re_read_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("shops"), format!("# the shops\nshop-17: {HASH}\n")).unwrap();
        std::fs::write(dir.path().join("shops~"), format!("shop-99: {HASH}\n")).unwrap();
        let source = FleetSource::load(dir.path()).unwrap();
        assert!(source.get("shop-17").await.0.is_some());
        assert!(source.get("shop-99").await.0.is_none(), "a backup file is not read");
        std::fs::write(dir.path().join("labs"), format!("lab-1: {HASH}\n")).unwrap();
        // Pretend the snapshot is old rather than wait for it to be.
        source.state.lock().await.checked = Instant::now() - RECHECK;
        assert!(source.get("lab-1").await.0.is_some(), "a new file is read");
        // A name on two lines (a rotation) logs in with either; more than four are refused.
        let other = "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed";
        std::fs::write(dir.path().join("labs"), format!("lab-1: {HASH}\nlab-1: {other}\n")).unwrap();
        source.state.lock().await.checked = Instant::now() - RECHECK;
        assert_eq!(source.get("lab-1").await.0.map(|h| h.len()), Some(2));
        std::fs::write(dir.path().join("labs"), format!("lab-1: {HASH}\n").repeat(5)).unwrap();
        let e = FleetSource::load(dir.path()).unwrap_err();
        assert!(e.ends_with("labs:5: lab-1 is listed more than 4 times"), "{e}");
        std::fs::remove_file(dir.path().join("labs")).unwrap();
        std::fs::write(dir.path().join("bad"), "lab-2 no colon\n").unwrap();
        let e = FleetSource::load(dir.path()).unwrap_err();
        assert!(e.ends_with("bad:1: expected NAME: SHA256HEX"), "{e}");
    }

    /// A fleet file saved by a Windows editor (a byte-order mark before its first name) declares
    /// that name: the mark read as part of it refused the whole file.
    #[tokio::test]
    async fn a_fleet_file_with_a_byte_order_mark_declares_its_first_agent() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fleet.txt");
        std::fs::write(&file, [&b"\xEF\xBB\xBF"[..], format!("shop-17: {HASH}\r\n").as_bytes()].concat()).unwrap();
        let source = FleetSource::load(&file).unwrap();
        assert!(source.get("shop-17").await.0.is_some());
    }

    /// A file of a fleet directory that cannot be read is left out of a re-read, not the whole
    /// directory: an agent removed from another file is no longer declared (an operations
    /// review: it stayed connected until the unreadable file was fixed). At start, an error.
    #[tokio::test]
    async fn an_unreadable_file_in_a_fleet_directory_does_not_hold_back_the_others() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), format!("removed: {HASH}\n")).unwrap();
        std::fs::write(dir.path().join("b"), format!("kept: {HASH}\n")).unwrap();
        let source = FleetSource::load(dir.path()).unwrap();
        // Unreadable as the service's user: root reads any mode, so bytes that are no text.
        std::fs::write(dir.path().join("c"), b"added: \xff\n").unwrap();
        std::fs::remove_file(dir.path().join("a")).unwrap();
        source.state.lock().await.checked = Instant::now() - RECHECK;
        assert!(source.get("removed").await.0.is_none(), "removed from the directory");
        assert!(source.get("kept").await.0.is_some());
        let e = FleetSource::load(dir.path()).unwrap_err();
        assert!(e.starts_with(&dir.path().join("c").display().to_string()), "{e}");
    }
}
