//! The real HAProxy (Debian's `haproxy`) as a child process in front of bridges a test started.
//!
//! Its frontend listens on a socket the test bound and hands over as HAProxy's stdin (`bind
//! fd@0` in the configuration): no port is picked and given up, and connections queue there
//! before HAProxy is up. Its stderr is kept as lines (with `-db`, server state changes are
//! written there: `Server BACKEND/NAME is DOWN, reason: …`), and its stats socket answers
//! `show servers state`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use super::lines::Lines;
use super::within;

/// A running HAProxy (killed on drop).
pub struct HaProxy {
    child: Child,
    /// Where its frontend (`bind fd@0`) accepts.
    pub front: SocketAddr,
    /// Its stats socket, when the configuration has `stats socket` at [`HaProxy::stats_path`].
    stats: PathBuf,
    lines: Lines,
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl HaProxy {
    /// The `haproxy` executable, `None` when it is not installed (the caller skips).
    pub fn installed() -> Option<PathBuf> {
        super::which("haproxy")
    }

    /// Where a configuration written into `dir` puts its stats socket (`stats socket PATH`), for
    /// [`HaProxy::command`].
    pub fn stats_path(dir: &Path) -> PathBuf {
        dir.join("haproxy.sock")
    }

    /// Writes `config` to `dir/haproxy.cfg` and runs `haproxy -db -f` on it; its frontend binds
    /// `fd@0`, a socket bound here on 127.0.0.1.
    pub fn start(haproxy: &Path, dir: &Path, config: &str) -> HaProxy {
        assert!(config.contains("bind fd@0"), "the frontend must bind fd@0:\n{config}");
        let file = dir.join("haproxy.cfg");
        std::fs::write(&file, config).unwrap();
        let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = front.local_addr().unwrap();
        let mut child = Command::new(haproxy)
            .arg("-db")
            .arg("-f")
            .arg(&file)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(front)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn haproxy");
        let lines = Lines::capture(child.stderr.take().expect("stderr"));
        HaProxy {
            child,
            front: addr,
            stats: HaProxy::stats_path(dir),
            lines,
        }
    }

    /// Waits for a stderr line containing `needle` (one seen already counts) and returns it.
    pub async fn line(&self, needle: &str) -> String {
        self.lines.line(needle).await
    }

    /// The stderr lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.all()
    }

    /// One command on the stats socket, and its answer. HAProxy must be serving (a session
    /// through it has been answered: the socket is bound before anything is served).
    pub async fn command(&self, command: &str) -> String {
        within(&format!("haproxy's answer to {command:?}"), async {
            let mut s = tokio::net::UnixStream::connect(&self.stats).await.expect("the stats socket");
            s.write_all(format!("{command}\n").as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        })
        .await
    }

    /// The operational state of each server of `backend` (`show servers state`): 0 stopped
    /// (down), 1 starting, 2 running, 3 stopping.
    pub async fn server_states(&self, backend: &str) -> HashMap<String, u32> {
        let answer = self.command(&format!("show servers state {backend}")).await;
        // Lines: a version, a `#` header, then `be_id be_name srv_id srv_name srv_addr
        // srv_op_state …` per server.
        answer
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() > 5 && f[1] == backend).then(|| (f[3].to_owned(), f[5].parse().expect("srv_op_state")))
            })
            .collect()
    }
}
