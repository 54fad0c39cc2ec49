//! The real `wsbridge` binary as a child process: started with arguments, its "listening" line
//! awaited for the address, its stderr kept as lines to wait on, killed when dropped.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;

use super::within;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_wsbridge");

/// A running `wsbridge`.
pub struct Binary {
    /// The process (killed on drop).
    pub child: Child,
    /// The address of its first listener.
    pub addr: SocketAddr,
    /// Every stderr line so far (bounded: past 100,000 lines the oldest half is dropped).
    lines: Arc<Mutex<Vec<String>>>,
    more: Arc<Notify>,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Binary {
    /// Starts `wsbridge ARGS` with `RUST_LOG` unset and waits for its "listening" line.
    pub async fn spawn(args: &[&str]) -> Binary {
        let mut command = Command::new(BIN);
        command.args(args).stdout(Stdio::null());
        let mut b = Binary::start(command);
        let line = b.line("listening addr=").await;
        let addr = line.split("listening addr=").nth(1).unwrap().split_whitespace().next().unwrap();
        b.addr = addr.parse().expect("listening address");
        b
    }

    /// Starts `command` (the binary, or a wrapper that runs it) with `RUST_LOG` unset and its
    /// stderr kept as lines, without waiting for anything; stdin and stdout are the caller's to
    /// set. `addr` stays 0.0.0.0:0.
    pub fn start(mut command: Command) -> Binary {
        let mut child = command
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn wsbridge");
        let mut reader = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let more = Arc::new(Notify::new());
        let (l, m) = (lines.clone(), more.clone());
        // Drained all the time, so the child never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = reader.next_line().await {
                let mut v = l.lock().unwrap();
                if v.len() >= 100_000 {
                    v.drain(..50_000);
                }
                v.push(line);
                drop(v);
                m.notify_waiters();
            }
            m.notify_waiters();
        });
        Binary {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            lines,
            more,
        }
    }

    /// Waits for a stderr line containing `needle` (one seen already counts) and returns it.
    pub async fn line(&mut self, needle: &str) -> String {
        let (lines, more) = (self.lines.clone(), self.more.clone());
        within(&format!("a log line with {needle:?}"), async move {
            loop {
                // Registered before the look, so a line that arrives in between wakes us.
                let notified = more.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(l) = lines.lock().unwrap().iter().find(|l| l.contains(needle)) {
                    return l.clone();
                }
                notified.await;
            }
        })
        .await
    }

    /// The stderr lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }
}

/// Runs `wsbridge ARGS` to its exit (bounded by [`super::WAIT`]): its exit code (-1 if a signal
/// ended it), stdout and stderr.
pub async fn run_to_end(args: &[&str]) -> (i32, String, String) {
    let out = within("wsbridge to exit", Command::new(BIN).args(args).output())
        .await
        .expect("run wsbridge");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Resident memory of a process now (`VmRSS` in /proc/PID/status), in bytes; `None` where there
/// is no /proc.
pub fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}
