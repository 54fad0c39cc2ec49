//! websockify-style token sources: files (or a directory of files) of `TOKEN: TARGET` lines.
//!
//! websockify reads its token file on every connection, so operators are used to adding a token by
//! editing the file. wsbridge keeps that promise without reading files per connection: a source
//! checks its files' sizes and modification times at most once per [`RECHECK`], and re-reads only
//! when they changed. Reading happens on the blocking pool, never on a runtime thread.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::{Target, TokenLookup, TokenSourceConfig};

/// How often a token source looks at its files' metadata, at most.
pub const RECHECK: Duration = Duration::from_secs(1);

/// One line of a token file that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    /// The file.
    pub file: PathBuf,
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for BadLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

/// Parses websockify token-file text: `TOKEN: HOST:PORT` or `TOKEN: unix_socket:/path`, one per
/// line, separated by a colon and whitespace; `#` starts a comment line. Bad lines are returned
/// beside the good entries, so one typo does not take every other token down.
pub fn parse_token_text(text: &str, file: &Path, into: &mut HashMap<String, Target>, bad: &mut Vec<BadLine>) {
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut complain = |message: String| {
            bad.push(BadLine {
                file: file.to_path_buf(),
                line: i + 1,
                message,
            })
        };
        // The separator is the first ':' followed by whitespace (a target contains ':' itself).
        let Some(sep) = line
            .char_indices()
            .find(|&(j, c)| c == ':' && line[j + 1..].starts_with(char::is_whitespace))
            .map(|(j, _)| j)
        else {
            complain("expected `TOKEN: HOST:PORT` (a colon and a space after the token)".into());
            continue;
        };
        let (token, target) = (line[..sep].trim(), line[sep + 1..].trim());
        if token.is_empty() {
            complain("empty token".into());
            continue;
        }
        match target.parse::<Target>() {
            Ok(t) => {
                into.insert(token.to_owned(), t);
            }
            Err(e) => complain(e),
        }
    }
}

/// A host name as a `lookup = "host"` token: host names compare without case and a trailing
/// dot (`Desk1.Example.` is `desk1.example`), and an IP literal in its canonical form (`[0::1]`
/// is `::1`), so the file's spelling and the Host header's need not agree.
pub fn host_key(host: &str) -> String {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        return ip.to_string();
    }
    let name = bare.strip_suffix('.').unwrap_or(bare);
    name.to_ascii_lowercase()
}

/// The map as lookups see it: for a Host source, keyed by [`host_key`].
fn keyed(map: HashMap<String, Target>, lookup: TokenLookup) -> HashMap<String, Target> {
    match lookup {
        TokenLookup::Query => map,
        TokenLookup::Host => map.into_iter().map(|(k, v)| (host_key(&k), v)).collect(),
    }
}

/// Reads a token file, or every regular file in a token directory (not recursively).
///
/// # Errors
/// The file or directory cannot be read; bad lines are not errors, they come back in the list.
pub fn read_tokens(path: &Path) -> std::io::Result<(HashMap<String, Target>, Vec<BadLine>)> {
    let mut map = HashMap::new();
    let mut bad = Vec::new();
    for file in files_of(path)? {
        let text = std::fs::read_to_string(&file)?;
        parse_token_text(&text, &file, &mut map, &mut bad);
    }
    Ok((map, bad))
}

fn files_of(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !std::fs::metadata(path)?.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let p = entry.path();
        // Skip editor swap files and dotfiles, as an operator would expect.
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !hidden && std::fs::metadata(&p).map(|m| m.is_file()).unwrap_or(false) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// A fingerprint of the files' names, sizes and modification times.
fn stamp(path: &Path) -> std::io::Result<u64> {
    let mut h = DefaultHasher::new();
    for f in files_of(path)? {
        let m = std::fs::metadata(&f)?;
        f.hash(&mut h);
        m.len().hash(&mut h);
        m.modified().unwrap_or(SystemTime::UNIX_EPOCH).hash(&mut h);
    }
    Ok(h.finish())
}

/// A token source in service: the parsed map and when it was last checked.
#[derive(Debug)]
pub struct TokenSource {
    /// What the configuration said.
    pub config: TokenSourceConfig,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    map: Arc<HashMap<String, Target>>,
    stamp: u64,
    checked: Instant,
}

impl TokenSource {
    /// Loads a source now.
    ///
    /// # Errors
    /// The file or directory cannot be read. Bad lines are logged and skipped.
    pub fn load(config: TokenSourceConfig) -> std::io::Result<TokenSource> {
        let stamp = stamp(&config.path)?;
        let (map, bad) = read_tokens(&config.path)?;
        for b in &bad {
            tracing::warn!(%b, "token line skipped");
        }
        let state = State {
            map: Arc::new(keyed(map, config.lookup)),
            stamp,
            checked: Instant::now(),
        };
        Ok(TokenSource {
            config,
            state: Mutex::new(state),
        })
    }

    /// The target for `token`, re-reading the files first if they changed since the last look
    /// (at most once per [`RECHECK`]). A source that became unreadable keeps its last contents.
    pub async fn lookup(&self, token: &str) -> Option<Target> {
        let mut state = self.state.lock().await;
        if state.checked.elapsed() >= RECHECK {
            state.checked = Instant::now();
            let path = self.config.path.clone();
            let old = state.stamp;
            let fresh = tokio::task::spawn_blocking(move || -> std::io::Result<Option<_>> {
                let now = stamp(&path)?;
                if now == old {
                    return Ok(None);
                }
                Ok(Some((now, read_tokens(&path)?)))
            })
            .await;
            match fresh {
                Ok(Ok(Some((now, (map, bad))))) => {
                    for b in &bad {
                        tracing::warn!(%b, "token line skipped");
                    }
                    tracing::info!(source = %self.config.path.display(), tokens = map.len(), "token source re-read");
                    state.map = Arc::new(keyed(map, self.config.lookup));
                    state.stamp = now;
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(source = %self.config.path.display(), error = %e, "token source unreadable; keeping its last contents")
                }
                Err(e) => tracing::warn!(error = %e, "token source re-read failed"),
            }
        }
        state.map.get(token).cloned()
    }

    /// The current entries, for `wsbridge check`.
    pub async fn entries(&self) -> Arc<HashMap<String, Target>> {
        self.state.lock().await.map.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websockify_format() {
        let text = "# comment\n\ntok1: 127.0.0.1:5900\ntok2:\t[::1]:5901\ntok3: unix_socket:/run/vnc.sock\nbroken line\ntok4: nohostport\n";
        let mut map = HashMap::new();
        let mut bad = Vec::new();
        parse_token_text(text, Path::new("t.cfg"), &mut map, &mut bad);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map["tok1"],
            Target::Tcp {
                host: "127.0.0.1".into(),
                port: 5900
            }
        );
        assert_eq!(
            map["tok2"],
            Target::Tcp {
                host: "::1".into(),
                port: 5901
            }
        );
        assert_eq!(map["tok3"], Target::Unix("/run/vnc.sock".into()));
        assert_eq!(bad.len(), 2);
        assert_eq!(bad[0].line, 6);
        assert_eq!(bad[1].line, 7);
        assert!(bad[1].to_string().starts_with("t.cfg:7: invalid target"), "{}", bad[1]);
    }
}
