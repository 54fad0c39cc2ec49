//! End to end in a real browser: `wsbridge demo` (a TCP chat server with wsbridge in front of it
//! and the chat page), and Debian's Chromium driven by `tests/browser/chat.mjs` (playwright-core),
//! which types a line on the page and waits for the chat server's broadcast of it to come back:
//! browser -> wsbridge -> TCP chat server -> wsbridge -> browser.
//!
//! Needs Node.js, `tests/browser/node_modules` and /usr/bin/chromium: `scripts/test.sh` installs
//! them. Without them this test fails, saying so, unless `WSBRIDGE_SKIP_BROWSER=1` is set, which
//! skips it (always: the variable means "no browser test here").

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::time::timeout;

/// How long the demo may take to print its first line.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the browser script may take. chat.mjs bounds itself to 50 s; this is the backstop.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the demo may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Lines a child wrote, collected in the background, for failure messages.
type Lines = Arc<Mutex<Vec<String>>>;

fn collect<R: AsyncRead + Unpin + Send + 'static>(reader: R, into: Lines) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            into.lock().unwrap().push(line);
        }
    })
}

fn tail(lines: &Lines, n: usize) -> String {
    let lines = lines.lock().unwrap();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// Sends `signal` to `target` (a pid, or `-PGID` for a process group) with kill(1): no unsafe.
fn send_signal(signal: &str, target: &str) -> bool {
    std::process::Command::new("kill")
        .args([&format!("-{signal}"), "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A running child that is killed if the test ends without stopping it (a failed assertion, a
/// timeout): with `group`, its whole process group (node and the Chromium it started).
struct Guard {
    name: &'static str,
    child: Option<Child>,
    pid: u32,
    group: bool,
    output: Lines,
}

impl Guard {
    fn spawn(name: &'static str, mut command: Command, group: bool) -> (Guard, tokio::process::ChildStdout) {
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        if group {
            command.process_group(0);
        }
        let mut child = command.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let pid = child.id().expect("a child just spawned has a pid");
        let output: Lines = Arc::default();
        collect(child.stderr.take().unwrap(), output.clone());
        let stdout = child.stdout.take().unwrap();
        (
            Guard {
                name,
                child: Some(child),
                pid,
                group,
                output,
            },
            stdout,
        )
    }

    fn target(&self) -> String {
        if self.group {
            format!("-{}", self.pid)
        } else {
            self.pid.to_string()
        }
    }

    /// Waits for the child to exit, at most `limit`; the guard then has nothing left to kill.
    async fn wait(&mut self, limit: Duration) -> Result<ExitStatus, String> {
        let target = self.target();
        let child = self.child.as_mut().expect("waited for twice");
        match timeout(limit, child.wait()).await {
            Ok(Ok(status)) => {
                self.child = None;
                if self.group {
                    // Anything the child left behind in its group goes too.
                    send_signal("KILL", &target);
                }
                Ok(status)
            }
            Ok(Err(e)) => Err(format!("cannot wait for {}: {e}", self.name)),
            Err(_) => {
                // Ask it to stop first (chat.mjs then closes its browser, which playwright runs in
                // a process group of its own), a bounded while; the guard's drop kills the rest.
                send_signal("TERM", &target);
                if let Ok(Ok(_)) = timeout(Duration::from_secs(10), child.wait()).await {
                    self.child = None;
                }
                Err(format!("{} did not exit within {limit:?}", self.name))
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.group {
                send_signal("KILL", &self.target());
            }
            // SIGKILL; tokio reaps it in the background.
            let _ = child.start_kill();
            if std::thread::panicking() && !self.output.lock().unwrap().is_empty() {
                eprintln!("--- last lines {} wrote on stderr ---\n{}", self.name, tail(&self.output, 40));
            }
        }
    }
}

/// Why the browser test cannot run here, if it cannot.
fn missing_prerequisites(root: &Path, chromium: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    if !root.join("tests/browser/node_modules/playwright-core/package.json").is_file() {
        missing.push("tests/browser/node_modules (npm ci in tests/browser)".to_string());
    }
    if !chromium.is_file() {
        missing.push(format!("{} (Debian's chromium package)", chromium.display()));
    }
    let node = std::process::Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(node, Ok(s) if s.success()) {
        missing.push("node (Node.js on PATH)".to_string());
    }
    missing
}

#[tokio::test]
async fn demo_chat_round_trip_in_chromium() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let chromium = PathBuf::from(std::env::var_os("CHROMIUM").unwrap_or_else(|| "/usr/bin/chromium".into()));

    if std::env::var("WSBRIDGE_SKIP_BROWSER").as_deref() == Ok("1") {
        println!("browser test skipped: WSBRIDGE_SKIP_BROWSER=1");
        eprintln!("browser test skipped: WSBRIDGE_SKIP_BROWSER=1");
        return;
    }
    let missing = missing_prerequisites(&root, &chromium);
    assert!(
        missing.is_empty(),
        "the browser test cannot run: missing {}.\nRun `scripts/test.sh` once (it installs them), or set WSBRIDGE_SKIP_BROWSER=1 to skip this test.",
        missing.join(", ")
    );

    // The demo: its first line on stdout names the page's URL.
    let mut demo_cmd = Command::new(env!("CARGO_BIN_EXE_wsbridge"));
    demo_cmd.args(["demo", "--listen", "127.0.0.1:0"]).env("RUST_LOG", "info");
    let (mut demo, demo_stdout) = Guard::spawn("wsbridge demo", demo_cmd, false);
    let mut demo_lines = BufReader::new(demo_stdout).lines();
    let first = match timeout(START_TIMEOUT, demo_lines.next_line()).await {
        Ok(Ok(Some(line))) => line,
        Ok(Ok(None)) => panic!("wsbridge demo closed its stdout before printing its URL"),
        Ok(Err(e)) => panic!("cannot read wsbridge demo's stdout: {e}"),
        Err(_) => panic!("wsbridge demo printed nothing within {START_TIMEOUT:?}"),
    };
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no http:// URL in wsbridge demo's first line: {first:?}"))
        .to_string();
    // Keep draining its stdout, so that it never blocks on a full pipe.
    let demo_out: Lines = Arc::default();
    tokio::spawn({
        let demo_out = demo_out.clone();
        async move {
            while let Ok(Some(line)) = demo_lines.next_line().await {
                demo_out.lock().unwrap().push(line);
            }
        }
    });

    // The browser.
    let screenshot = std::env::var_os("WSBRIDGE_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-chat.png"));
    let _ = std::fs::remove_file(&screenshot);
    let mut node_cmd = Command::new("node");
    node_cmd
        .current_dir(&root)
        .arg("tests/browser/chat.mjs")
        .arg(&url)
        .env("WSBRIDGE_SCREENSHOT", &screenshot)
        .env("CHROMIUM", &chromium);
    let (mut node, node_stdout) = Guard::spawn("node tests/browser/chat.mjs", node_cmd, true);
    let node_out: Lines = Arc::default();
    let reader = collect(node_stdout, node_out.clone());
    let status = match node.wait(BROWSER_TIMEOUT).await {
        Ok(status) => status,
        Err(e) => panic!("{e}\nits stdout:\n{}\nits stderr:\n{}", tail(&node_out, 20), tail(&node.output, 20)),
    };
    let _ = timeout(Duration::from_secs(5), reader).await;
    let stdout = tail(&node_out, 20);
    let stderr = tail(&node.output, 40);
    assert!(
        status.success(),
        "chat.mjs failed ({status}) against {url}\nits stdout:\n{stdout}\nits stderr:\n{stderr}\nwsbridge demo's log:\n{}",
        tail(&demo.output, 40)
    );
    let result = node_out.lock().unwrap().last().cloned().unwrap_or_default();
    assert!(
        result.starts_with(r#"{"ok":true"#) && result.contains(r#""received":"guest-"#),
        "chat.mjs exited 0 but did not report a round trip: {result:?}"
    );
    println!("chat.mjs: {result}");
    let png = std::fs::read(&screenshot).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", screenshot.display()));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", screenshot.display());
    println!("screenshot: {}", screenshot.display());

    // A clean stop on SIGTERM.
    assert!(
        send_signal("TERM", &demo.pid.to_string()),
        "cannot send SIGTERM to wsbridge demo (pid {})",
        demo.pid
    );
    let status = demo.wait(STOP_TIMEOUT).await.unwrap_or_else(|e| panic!("{e} after SIGTERM"));
    assert!(
        status.success(),
        "wsbridge demo exited with {status} after SIGTERM\nits log:\n{}",
        tail(&demo.output, 40)
    );
}
