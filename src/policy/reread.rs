//! A credentials file in service (a bearer token file, an htpasswd file, a JWT key file), read
//! again when it changes, on the same timing as token files ([`crate::tokens`]): operators add
//! and revoke credentials by editing the file, and expect that to hold without a SIGHUP.
//!
//! Checks read an immutable snapshot (an `Arc` swapped whole behind a std `RwLock`, held only to
//! clone it); the file is looked at (its size, modification and change times and inode) and read
//! on the blocking pool, one re-read in flight at a time (the token files' own `Rereads`). A
//! snapshot younger than [`REFRESH_AHEAD`] is used as it is; an older one starts a re-read in
//! the background and is still used while it is younger than [`RECHECK`]; a check that finds it
//! older than that (the first after a quiet spell) waits for the re-read, at most
//! [`REREAD_WAIT`], so that an edit is in force for every check that starts [`RECHECK`] after it.
//!
//! A file that no longer parses keeps what was in force (logged, and counted as a failed reload
//! of kind `credentials`); a file removed leaves nothing in force (every credential refused) until
//! one is back, since removing the file of a leaked key is how one revokes it (counted as failed
//! too, so that an alert sees it).

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::SystemTime;

use tokio::time::Instant;

use crate::tokens::Rereads;
pub use crate::tokens::{RECHECK, REFRESH_AHEAD, REREAD_WAIT};

/// What a file holds, read by `read`; `none` is what is in force while the file is gone.
pub struct Reread<T> {
    shared: Arc<Shared<T>>,
}

impl<T> std::fmt::Debug for Reread<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reread").field("path", &self.shared.path).finish_non_exhaustive()
    }
}

type Read<T> = Box<dyn Fn(&Path) -> Result<T, String> + Send + Sync>;

struct Shared<T> {
    path: PathBuf,
    /// What the file is, for the log lines ("htpasswd file").
    what: &'static str,
    read: Read<T>,
    none: Box<dyn Fn() -> T + Send + Sync>,
    snapshot: RwLock<Arc<Snapshot<T>>>,
    /// The re-read in flight, if any, and the checks that wait for one (as token files').
    rereads: Arc<Rereads>,
    /// The warning that a re-read is slow (a file on a mount that hangs): once per 10 s, not
    /// once per request that waited.
    slow: crate::logging::Quieted,
}

struct Snapshot<T> {
    value: Arc<T>,
    /// The file as it was read (`None`: gone).
    stamp: Option<Stamp>,
    /// When the look that produced this snapshot started.
    checked: Instant,
}

/// What tells one version of a file from another without reading it: size, modification time,
/// and on unix the inode and change time (a file renamed over it, or rewritten with its old
/// size and modification time put back, as `cp -p` and `rsync -t` do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    inode: (u64, u64, i64, i64),
}

/// The file's stamp; `Ok(None)` when it is gone.
fn stamp(path: &Path) -> std::io::Result<Option<Stamp>> {
    let m = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    #[cfg(unix)]
    let inode = {
        use std::os::unix::fs::MetadataExt as _;
        (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())
    };
    Ok(Some(Stamp {
        len: m.len(),
        modified: m.modified().ok(),
        #[cfg(unix)]
        inode,
    }))
}

impl<T: Send + Sync + 'static> Reread<T> {
    /// Reads `path` now (the caller is starting or reloading, not serving a request).
    ///
    /// # Errors
    /// What `read` says of the file (which names it).
    pub fn load(
        path: &Path,
        what: &'static str,
        read: impl Fn(&Path) -> Result<T, String> + Send + Sync + 'static,
        none: impl Fn() -> T + Send + Sync + 'static,
    ) -> Result<Reread<T>, String> {
        let checked = Instant::now();
        let stamp = stamp(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let value = read(path)?;
        Ok(Reread {
            shared: Arc::new(Shared {
                path: path.to_path_buf(),
                what,
                read: Box::new(read),
                none: Box::new(none),
                snapshot: RwLock::new(Arc::new(Snapshot {
                    value: Arc::new(value),
                    stamp,
                    checked,
                })),
                rereads: Rereads::new(),
                slow: crate::logging::Quieted::new(std::time::Duration::from_secs(10)),
            }),
        })
    }

    /// What is in force now, without looking at the file (for `wsbridge check`).
    pub fn current(&self) -> Arc<T> {
        self.shared.current().value.clone()
    }

    /// What the file holds, from a look at most [`RECHECK`] old (see the module's
    /// documentation for when this waits).
    pub async fn get(&self) -> Arc<T> {
        let shared = &self.shared;
        let age = || shared.current().checked.elapsed();
        if !shared.rereads.for_lookup(age, || Shared::reread_later(shared)).await {
            if let Some(left_out) = shared.slow.take() {
                tracing::warn!(file = %shared.path.display(), wait = ?REREAD_WAIT, left_out, "{} re-read is slow; checking against its last contents", shared.what);
            }
        }
        shared.current().value.clone()
    }

    /// Looks at the file now, on this thread, and re-reads it if it changed (tests, and callers
    /// outside a runtime).
    pub fn reread_now(&self) {
        let started = Instant::now();
        self.shared.rereads.run_here(|| self.shared.reread(started));
    }
}

/// Credentials given in the configuration itself, or in a file read again when it changes.
#[derive(Debug)]
pub enum Sourced<T> {
    /// Written in the configuration: changed by a reload.
    Inline(Arc<T>),
    /// In a file.
    File(Reread<T>),
}

impl<T: Send + Sync + 'static> Sourced<T> {
    /// What is in force for a check starting now ([`Reread::get`]).
    pub async fn get(&self) -> Arc<T> {
        match self {
            Sourced::Inline(v) => v.clone(),
            Sourced::File(f) => f.get().await,
        }
    }

    /// What is in force, without looking at a file.
    pub fn current(&self) -> Arc<T> {
        match self {
            Sourced::Inline(v) => v.clone(),
            Sourced::File(f) => f.current(),
        }
    }
}

impl<T: Send + Sync + 'static> Shared<T> {
    fn current(&self) -> Arc<Snapshot<T>> {
        self.snapshot.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// A re-read of `this`, for [`Rereads`] to run.
    fn reread_later(this: &Arc<Shared<T>>) -> impl FnOnce() + Send + 'static {
        let (this, started) = (this.clone(), Instant::now());
        move || this.reread(started)
    }

    /// Looks at the file and replaces the snapshot (its `checked` time at least).
    fn reread(&self, started: Instant) {
        let old = self.current();
        let path = self.path.display();
        let (value, stamp) = match stamp(&self.path) {
            Ok(now) if now == old.stamp => (old.value.clone(), old.stamp),
            Ok(None) => {
                tracing::warn!(file = %path, "{} gone: every credential it held is refused until it is back", self.what);
                // Counted as failed: nothing is in force, and an alert on
                // last_reload_successful{kind="credentials"} should see it until it is back.
                crate::metrics::credentials_reloaded(&self.path, false);
                (Arc::new((self.none)()), None)
            }
            Ok(Some(now)) => match (self.read)(&self.path) {
                Ok(value) => {
                    tracing::info!(file = %path, "{} re-read", self.what);
                    crate::metrics::credentials_reloaded(&self.path, true);
                    (Arc::new(value), Some(now))
                }
                // Once per change of the file, not per look: the new stamp is kept.
                Err(e) => {
                    tracing::error!(error = %e, "{} re-read failed; what it held before stays in force", self.what);
                    crate::metrics::credentials_reloaded(&self.path, false);
                    (old.value.clone(), Some(now))
                }
            },
            Err(e) => {
                // Unreadable (permissions, a hung mount's error): kept, and looked at again.
                tracing::warn!(file = %path, error = %e, "{} cannot be looked at; what it held before stays in force", self.what);
                (old.value.clone(), old.stamp)
            }
        };
        *self.snapshot.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(Snapshot {
            value,
            stamp,
            checked: started,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &Path) -> Result<Vec<String>, String> {
        let text = crate::platform::read_text(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if text.contains("broken") {
            return Err(format!("{}: broken", path.display()));
        }
        Ok(text.lines().map(str::to_owned).collect())
    }

    fn load(path: &Path) -> Reread<Vec<String>> {
        Reread::load(path, "test file", lines, Vec::new).unwrap()
    }

    /// An edit is in force for the first check that starts [`RECHECK`] after it, without
    /// waiting for a check to start the re-read first; a broken file keeps what was in force,
    /// a removed one leaves nothing.
    #[tokio::test(start_paused = true)]
    async fn an_edit_is_in_force_within_the_recheck_time() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "a\n").unwrap();
        let r = load(&file);
        assert_eq!(*r.get().await, ["a"]);

        std::fs::write(&file, "b\n").unwrap();
        tokio::time::advance(RECHECK).await;
        assert_eq!(*r.get().await, ["b"], "the first check past RECHECK waits for the re-read");

        std::fs::write(&file, "broken\n").unwrap();
        tokio::time::advance(RECHECK).await;
        assert_eq!(*r.get().await, ["b"], "a broken file keeps what was in force");

        std::fs::remove_file(&file).unwrap();
        tokio::time::advance(RECHECK).await;
        assert!(r.get().await.is_empty(), "nothing once the file is gone");

        std::fs::write(&file, "c\n").unwrap();
        tokio::time::advance(RECHECK).await;
        assert_eq!(*r.get().await, ["c"]);
    }

    /// A file renamed over the old one with the same size and modification time (`cp -p`,
    /// `rsync -t`) is still told apart.
    #[cfg(unix)]
    #[tokio::test(start_paused = true)]
    async fn a_file_renamed_over_with_its_old_times_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let (file, new) = (dir.path().join("f"), dir.path().join("f.new"));
        std::fs::write(&file, "a\n").unwrap();
        let r = load(&file);
        std::fs::write(&new, "z\n").unwrap();
        let times = std::fs::metadata(&file).unwrap().modified().unwrap();
        std::fs::File::options()
            .write(true)
            .open(&new)
            .unwrap()
            .set_modified(times)
            .unwrap();
        std::fs::rename(&new, &file).unwrap();
        tokio::time::advance(RECHECK).await;
        assert_eq!(*r.get().await, ["z"]);
    }
}
