//! The real `wsbridge` binary as a child process: started with arguments, its "listening" line
//! awaited for the address, its stderr kept as lines to wait on, killed when dropped.

use std::net::SocketAddr;
use std::process::Stdio;

use tokio::process::{Child, Command};

use super::lines::Lines;
use super::within;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_wsbridge");

/// `wsbridge ARGS` in a mount namespace of its own in which `file` stands in for `over` (a hosts
/// file, a resolv.conf): how a test shows one process its own name resolution without touching
/// the machine's. Needs root and `unshare` ([`super::can_unshare_mounts`]).
pub fn command_seeing(over: &str, file: &std::path::Path, args: &[&std::ffi::OsStr]) -> Command {
    let mut command = Command::new("unshare");
    command.args(["--mount", "sh", "-c", "mount --bind \"$1\" \"$2\" && shift 2 && exec \"$@\"", "sh"]);
    command.arg(file).arg(over).arg(BIN).args(args);
    command
}

/// A running `wsbridge`.
pub struct Binary {
    /// The process (killed on drop).
    pub child: Child,
    /// The address of its first listener.
    pub addr: SocketAddr,
    /// Its stderr.
    lines: Lines,
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
        command.args(args);
        Binary::spawn_command(command).await
    }

    /// [`Binary::spawn`] for a command set up by the caller (its working directory, say).
    pub async fn spawn_command(mut command: Command) -> Binary {
        command.stdout(Stdio::null());
        let mut b = Binary::start(command);
        b.addr = b.address_after("listening addr=").await;
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
        let lines = Lines::capture(child.stderr.take().expect("stderr"));
        Binary {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            lines,
        }
    }

    /// Waits for a stderr line containing `needle` (one seen already counts) and returns it.
    pub async fn line(&mut self, needle: &str) -> String {
        self.lines.line(needle).await
    }

    /// The stderr lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.all()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// The admin listener's address (`--admin` or `[admin]`), from its log line.
    pub async fn admin_addr(&self) -> SocketAddr {
        self.address_after("admin endpoints serving addr=").await
    }

    /// Sends `signal` (`TERM`, `HUP`, …) to the process.
    pub async fn signal(&self, signal: &str) {
        let pid = self.pid().to_string();
        let status = Command::new("kill").args(["-s", signal, &pid]).status().await.expect("kill");
        assert!(status.success(), "kill -s {signal} {pid}");
    }

    /// Waits for the process to exit (within the test bound): its exit code (-1 for a signal).
    pub async fn exit_code(&mut self) -> i32 {
        let status = within("wsbridge to exit", self.child.wait()).await.expect("wait");
        status.code().unwrap_or(-1)
    }

    /// The address in the first line with `prefix` (`… prefix=ADDR …`).
    async fn address_after(&self, prefix: &str) -> SocketAddr {
        let line = self.lines.line(prefix).await;
        line.split(prefix)
            .nth(1)
            .and_then(|a| a.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address after {prefix:?} in {line:?}"))
    }
}

/// Runs `wsbridge ARGS` to its exit (bounded by [`super::WAIT`]): its exit code (-1 if a signal
/// ended it), stdout and stderr.
pub async fn run_to_end(args: &[&str]) -> (i32, String, String) {
    let mut command = Command::new(BIN);
    command.args(args);
    command_to_end(command).await
}

/// [`run_to_end`] for a command set up by the caller (its environment, say).
pub async fn command_to_end(mut command: Command) -> (i32, String, String) {
    let out = within("wsbridge to exit", command.output()).await.expect("run wsbridge");
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
