//! A real VNC server: TigerVNC's `Xvnc` (Debian's `tigervnc-standalone-server`, installed by
//! scripts/test.sh), for the noVNC browser tests.
//!
//! Nothing is picked that another process could take: Xvnc chooses a free X display itself
//! (`-displayfd`, where it writes the number once it is ready, which is the readiness signal: it
//! writes it after its extensions, VNC's listener among them, are set up), and serves VNC only on
//! a unix socket in the caller's directory (`-rfbunixpath`, `-rfbport -1`: no TCP port at all).
//! The X root window keeps the classic black and white stipple (`-retro`) and has no cursor
//! (`-nocursor`: Xvnc would draw it into the framebuffer), so the whole framebuffer is one 4x4
//! tile of black and white pixels repeated: a canvas showing it shows real framebuffer data, all
//! of it. Xvnc runs in a process group of its own, stopped
//! with SIGTERM by [`Xvnc::stop`] (it then removes its lock file and X socket), and killed with
//! its group if the value is dropped first (a failed test).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::lines::Lines;
use super::within;

/// A running Xvnc.
pub struct Xvnc {
    child: Option<Child>,
    pid: u32,
    /// The X display it chose (`:N`).
    pub display: u32,
    /// Its VNC socket.
    pub socket: PathBuf,
    /// Its log (stderr): connections, their ends, encoder statistics.
    lines: Lines,
}

impl Xvnc {
    /// The `Xvnc` executable, `None` when it is not installed (the caller skips).
    pub fn installed() -> Option<PathBuf> {
        super::which("Xvnc")
    }

    /// Starts `xvnc` serving VNC on `dir/vnc.sock` without authentication, its desktop
    /// `width`x`height` at depth 24 and named `desktop`, and waits (bounded) until it is ready.
    pub async fn start(xvnc: &Path, dir: &Path, (width, height): (u32, u32), desktop: &str) -> Xvnc {
        let socket = dir.join("vnc.sock");
        let mut command = Command::new(xvnc);
        command
            // The display number goes to stdout (fd 1) when the server is ready.
            .args(["-displayfd", "1", "-nolisten", "tcp", "-rfbport", "-1", "-rfbunixpath"])
            .arg(&socket)
            .args(["-SecurityTypes", "None", "-depth", "24", "-retro", "-nocursor"])
            .args(["-geometry", &format!("{width}x{height}"), "-desktop", desktop])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", xvnc.display()));
        let pid = child.id().expect("a child just spawned has a pid");
        let lines = Lines::capture(child.stderr.take().expect("piped stderr"));
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let mut xvnc = Xvnc {
            child: Some(child),
            pid,
            display: 0,
            socket,
            lines,
        };
        let first = within("Xvnc to write its display number (-displayfd)", stdout.next_line()).await;
        xvnc.display = match first {
            Ok(Some(line)) => line
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("Xvnc wrote {line:?}, not a display number")),
            _ => panic!("Xvnc exited before it was ready; its log:\n{}", xvnc.log()),
        };
        // It writes nothing more there; read on anyway, so that it never writes into a closed pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
        assert!(
            xvnc.socket.exists(),
            "Xvnc is ready on :{} but its VNC socket {} is not there; its log:\n{}",
            xvnc.display,
            xvnc.socket.display(),
            xvnc.log()
        );
        xvnc
    }

    /// Waits for a log line containing `needle` (one seen already counts) and returns it.
    pub async fn line(&self, needle: &str) -> String {
        self.lines.line(needle).await
    }

    /// Its log so far, one string.
    pub fn log(&self) -> String {
        self.lines.all().join("\n")
    }

    /// How many log lines so far contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines.all().iter().filter(|l| l.contains(needle)).count()
    }

    /// Stops it with SIGTERM and checks that it exits, with status 0, within the test bound.
    pub async fn stop(mut self) {
        let mut child = self.child.take().expect("running");
        signal_group(self.pid, rustix::process::Signal::TERM);
        let status = within("Xvnc to exit after SIGTERM", child.wait()).await.expect("wait for Xvnc");
        assert!(
            status.success(),
            "Xvnc exited with {status} after SIGTERM; its log:\n{}",
            self.log()
        );
    }
}

impl Drop for Xvnc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_group(self.pid, rustix::process::Signal::KILL);
            // tokio reaps it in the background.
            let _ = child.start_kill();
        }
    }
}

/// Sends `signal` to the process group `pgid` (Xvnc's own: it was started as its leader).
fn signal_group(pgid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pgid).ok().and_then(rustix::process::Pid::from_raw) {
        // ESRCH once it is gone: nothing left to signal.
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}
