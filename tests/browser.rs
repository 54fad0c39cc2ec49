//! End to end in a real browser: `wsbridge demo` (a TCP chat server with wsbridge in front of it
//! and the chat page), and Debian's Chromium driven by `tests/browser/chat.mjs` (playwright-core),
//! which types a line on the page and waits for the chat server's broadcast of it to come back:
//! browser -> wsbridge -> TCP chat server -> wsbridge -> browser. Twice: over http:// and ws://,
//! and over https:// and wss:// with a self-signed certificate made with the `openssl` CLI for
//! the occasion (Chromium trusts it through `--ignore-certificate-errors-spki-list`).
//!
//! And the use case wsbridge exists for, with real parts only: noVNC (Debian's `novnc`, served
//! by wsbridge with `--web`) in Chromium, through wsbridge, to a real VNC server (TigerVNC's
//! `Xvnc`, see tests/common/xvnc.rs), driven by `tests/browser/novnc.mjs`: connect, the whole
//! framebuffer at the server's size, a remote resize asked by the page and answered by the
//! server, a clean disconnect; once in forward mode and once across `wsbridge agent`.
//!
//! And a page behind `--web-auth` (`tests/browser/webauth.mjs`): loaded with the password the 401
//! asks for, its WebSocket opens with the same credentials, which Chromium sends again itself.
//!
//! Needs Node.js, `tests/browser/node_modules`, /usr/bin/chromium and `openssl`: `scripts/test.sh`
//! installs them. Without them these tests fail, saying so, unless `WSBRIDGE_SKIP_BROWSER=1` is
//! set, which skips them (always: the variable means "no browser test here"). The noVNC tests
//! also need `Xvnc` and /usr/share/novnc (scripts/test.sh installs them too); without them they
//! say they are skipped.
//!
//! Screenshots of the page go to `$WSBRIDGE_SCREENSHOT` (default `browser-chat.png` in Cargo's
//! target tmpdir); the other tests' to the same name with `-wss`, `-agent`, `-novnc` or
//! `-novnc-agent` before the extension.
// Drives Debian's Chromium with a Unix process group: a Linux-only test target.
#![cfg(unix)]

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// How long the demo may take to print its first line.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the browser script may take. chat.mjs bounds itself to 50 s; this is the backstop.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the demo may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long each `openssl` command may take (it takes milliseconds).
const OPENSSL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for a pipe's reader to see its end once the writer has exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Lines a child wrote, collected in the background, for failure messages.
type Lines = Arc<Mutex<Vec<String>>>;

fn collect<R: AsyncRead + Unpin + Send + 'static>(reader: R, into: Lines) -> JoinHandle<()> {
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
/// timeout): with `group`, its whole process group (node and the Chromium it started, or a shell
/// pipeline).
struct Guard {
    name: &'static str,
    child: Option<Child>,
    pid: u32,
    group: bool,
    /// What it wrote on stderr.
    output: Lines,
    stderr_reader: Option<JoinHandle<()>>,
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
        let stderr_reader = collect(child.stderr.take().unwrap(), output.clone());
        let stdout = child.stdout.take().unwrap();
        (
            Guard {
                name,
                child: Some(child),
                pid,
                group,
                output,
                stderr_reader: Some(stderr_reader),
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

    /// Waits for the child to exit, at most `limit`; the guard then has nothing left to kill, and
    /// `output` has all it wrote on stderr.
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
                if let Some(reader) = self.stderr_reader.take() {
                    let _ = timeout(DRAIN_TIMEOUT, reader).await;
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

/// A command that ran to its end.
struct Finished {
    status: ExitStatus,
    stdout: Lines,
    stderr: Lines,
}

/// Runs `command` in a process group of its own until it exits, at most `limit` (then it and its
/// group are stopped and this panics), collecting what it writes.
async fn run_to_end(name: &'static str, command: Command, limit: Duration) -> Finished {
    let (mut guard, stdout) = Guard::spawn(name, command, true);
    let out: Lines = Arc::default();
    let reader = collect(stdout, out.clone());
    let status = match guard.wait(limit).await {
        Ok(status) => status,
        Err(e) => panic!("{e}\nits stdout:\n{}\nits stderr:\n{}", tail(&out, 20), tail(&guard.output, 20)),
    };
    let _ = timeout(DRAIN_TIMEOUT, reader).await;
    Finished {
        status,
        stdout: out,
        stderr: guard.output.clone(),
    }
}

/// A fresh directory of this test process's own, removed with everything in it when dropped
/// (also when the test fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        use std::os::unix::fs::DirBuilderExt;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let base = std::env::temp_dir();
        // A name left behind by a killed run of an earlier process with the same pid is skipped.
        for _ in 0..100 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("wsbridge-{label}-{}-{n}", std::process::id()));
            // 0700: the private key goes in here.
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return TempDir(path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create {}: {e}", path.display()),
            }
        }
        panic!("cannot create a fresh wsbridge-{label}-* directory in {}", base.display());
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where the browser tests find their tools.
struct Browser {
    root: PathBuf,
    chromium: PathBuf,
}

/// The browser tests' tools, or `None` if `WSBRIDGE_SKIP_BROWSER=1` says to skip them; panics,
/// saying what is missing, if they cannot run here.
fn browser_or_skip(test: &str) -> Option<Browser> {
    if std::env::var("WSBRIDGE_SKIP_BROWSER").as_deref() == Ok("1") {
        println!("{test} skipped: WSBRIDGE_SKIP_BROWSER=1");
        eprintln!("{test} skipped: WSBRIDGE_SKIP_BROWSER=1");
        return None;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let chromium = PathBuf::from(std::env::var_os("CHROMIUM").unwrap_or_else(|| "/usr/bin/chromium".into()));
    let mut missing = Vec::new();
    if !root.join("tests/browser/node_modules/playwright-core/package.json").is_file() {
        missing.push("tests/browser/node_modules (npm ci in tests/browser)".to_string());
    }
    if !chromium.is_file() {
        missing.push(format!("{} (Debian's chromium package)", chromium.display()));
    }
    if !runs("node", "--version") {
        missing.push("node (Node.js on PATH)".to_string());
    }
    assert!(
        missing.is_empty(),
        "the browser test cannot run: missing {}.\nRun `scripts/test.sh` once (it installs them), or set WSBRIDGE_SKIP_BROWSER=1 to skip this test.",
        missing.join(", ")
    );
    Some(Browser { root, chromium })
}

/// Whether `program arg` runs and succeeds.
fn runs(program: &str, arg: &str) -> bool {
    let status = std::process::Command::new(program)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    matches!(status, Ok(s) if s.success())
}

/// The screenshot's path for a test: `$WSBRIDGE_SCREENSHOT`, or `browser-chat.png` in Cargo's
/// target tmpdir, with `suffix` before the extension. Any old one is removed.
fn screenshot_path(suffix: &str) -> PathBuf {
    let base = std::env::var_os("WSBRIDGE_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-chat.png"));
    let path = if suffix.is_empty() {
        base
    } else {
        let mut name = base.file_stem().unwrap_or_else(|| OsStr::new("browser-chat")).to_os_string();
        name.push(suffix);
        if let Some(ext) = base.extension() {
            name.push(".");
            name.push(ext);
        }
        base.with_file_name(name)
    };
    let _ = std::fs::remove_file(&path);
    path
}

/// A running `wsbridge demo`.
struct Demo {
    guard: Guard,
    /// The page's URL, from its first line.
    url: String,
}

/// Starts `wsbridge demo --listen 127.0.0.1:0 EXTRA...` and reads the page's URL, which must
/// start with `scheme://`, from its first line on stdout.
async fn start_demo(extra: &[&OsStr], scheme: &str) -> Demo {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wsbridge"));
    command
        .args(["demo", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "info");
    let (guard, stdout) = Guard::spawn("wsbridge demo", command, false);
    let mut lines = BufReader::new(stdout).lines();
    let first = match timeout(START_TIMEOUT, lines.next_line()).await {
        Ok(Ok(Some(line))) => line,
        Ok(Ok(None)) => panic!(
            "wsbridge demo closed its stdout before printing its URL\nits log:\n{}",
            tail(&guard.output, 40)
        ),
        Ok(Err(e)) => panic!("cannot read wsbridge demo's stdout: {e}"),
        Err(_) => panic!("wsbridge demo printed nothing within {START_TIMEOUT:?}"),
    };
    let prefix = format!("{scheme}://");
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} URL in wsbridge demo's first line: {first:?}"))
        .to_string();
    // Keep draining its stdout, so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Demo { guard, url }
}

/// Runs chat.mjs against the demo's page (trusting the certificate whose SPKI hash is `spki`),
/// checks that it reports a round trip and saved a PNG at `screenshot`, and returns its report.
async fn chat_in_browser(browser: &Browser, demo: &Demo, spki: Option<&str>, screenshot: &Path) -> String {
    let mut command = Command::new("node");
    command.current_dir(&browser.root).arg("tests/browser/chat.mjs");
    if let Some(hash) = spki {
        command.args(["--ignore-spki", hash]);
    }
    command
        .arg(&demo.url)
        .env("WSBRIDGE_SCREENSHOT", screenshot)
        .env("CHROMIUM", &browser.chromium);
    let node = run_to_end("node tests/browser/chat.mjs", command, BROWSER_TIMEOUT).await;
    assert!(
        node.status.success(),
        "chat.mjs failed ({}) against {}\nits stdout:\n{}\nits stderr:\n{}\nwsbridge demo's log:\n{}",
        node.status,
        demo.url,
        tail(&node.stdout, 20),
        tail(&node.stderr, 40),
        tail(&demo.guard.output, 40)
    );
    let report = node.stdout.lock().unwrap().last().cloned().unwrap_or_default();
    assert!(
        report.starts_with(r#"{"ok":true"#) && report.contains(r#""received":"guest-"#),
        "chat.mjs exited 0 but did not report a round trip: {report:?}"
    );
    println!("chat.mjs: {report}");
    let png = std::fs::read(screenshot).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", screenshot.display()));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", screenshot.display());
    println!("screenshot: {}", screenshot.display());
    report
}

/// The raw (still escaped) value of the string field `"name":"..."` in a line of JSON.
fn json_string_field<'a>(json: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("\"{name}\":\"");
    let start = json.find(&key)? + key.len();
    let rest = &json[start..];
    let mut escaped = false;
    for (i, c) in rest.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(&rest[..i]),
            _ => {}
        }
    }
    None
}

/// Checks that the page's status line, as chat.mjs reports it, says it connected to `scheme://`.
fn assert_connected(report: &str, scheme: &str) {
    let status = json_string_field(report, "status").unwrap_or_else(|| panic!("no status in chat.mjs's report: {report:?}"));
    assert!(
        status.starts_with(&format!("connected to {scheme}://")),
        "the page's status line is {status:?}, not `connected to {scheme}://...`"
    );
}

/// SIGTERMs the demo and checks that it exits cleanly, in time.
async fn stop_demo(mut demo: Demo) {
    let pid = demo.guard.pid;
    assert!(
        send_signal("TERM", &pid.to_string()),
        "cannot send SIGTERM to wsbridge demo (pid {pid})"
    );
    let status = demo.guard.wait(STOP_TIMEOUT).await.unwrap_or_else(|e| panic!("{e} after SIGTERM"));
    assert!(
        status.success(),
        "wsbridge demo exited with {status} after SIGTERM\nits log:\n{}",
        tail(&demo.guard.output, 40)
    );
}

/// Runs an `openssl` command (`program` with `args`) in `dir`, bounded, and returns its stdout.
async fn openssl(name: &'static str, dir: &Path, program: &str, args: &[&str]) -> String {
    let mut command = Command::new(program);
    command.current_dir(dir).args(args);
    let done = run_to_end(name, command, OPENSSL_TIMEOUT).await;
    assert!(
        done.status.success(),
        "{name} failed ({}): is openssl installed? (scripts/test.sh installs it)\nits stderr:\n{}",
        done.status,
        tail(&done.stderr, 20)
    );
    let stdout = done.stdout.lock().unwrap().join("\n");
    stdout
}

/// A self-signed certificate for localhost and 127.0.0.1 in `dir` (cert.pem, key.pem), and the
/// base64 SHA-256 of its SubjectPublicKeyInfo, which Chromium's
/// `--ignore-certificate-errors-spki-list` takes.
async fn self_signed_certificate(dir: &Path) -> (PathBuf, PathBuf, String) {
    #[rustfmt::skip]
    let req = [
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "key.pem", "-out", "cert.pem", "-days", "2", "-subj", "/CN=localhost",
        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        "-addext", "basicConstraints=critical,CA:FALSE",
    ];
    openssl("openssl req", dir, "openssl", &req).await;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    assert!(
        cert.is_file() && key.is_file(),
        "openssl req made no cert.pem and key.pem in {}",
        dir.display()
    );

    let pipeline = "openssl x509 -pubkey -noout -in cert.pem | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64";
    let hash = openssl("the SPKI hash pipeline", dir, "sh", &["-c", pipeline])
        .await
        .trim()
        .to_string();
    // sh has no pipefail: a failing stage shows as a hash of nothing, or as no hash at all.
    const SHA256_OF_NOTHING: &str = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
    assert!(
        hash.len() == 44 && hash.ends_with('=') && hash.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)),
        "`{pipeline}` printed {hash:?}, not a base64 SHA-256"
    );
    assert_ne!(hash, SHA256_OF_NOTHING, "a stage of `{pipeline}` failed: it hashed nothing");
    (cert, key, hash)
}

#[tokio::test]
async fn demo_chat_round_trip_in_chromium() {
    let Some(browser) = browser_or_skip("demo_chat_round_trip_in_chromium") else {
        return;
    };
    let demo = start_demo(&[], "http").await;
    let report = chat_in_browser(&browser, &demo, None, &screenshot_path("")).await;
    assert_connected(&report, "ws");
    stop_demo(demo).await;
}

#[tokio::test]
async fn demo_chat_round_trip_in_chromium_over_wss() {
    let Some(browser) = browser_or_skip("demo_chat_round_trip_in_chromium_over_wss") else {
        return;
    };
    assert!(
        runs("openssl", "version"),
        "the wss:// browser test cannot run: missing openssl.\nRun `scripts/test.sh` once (it installs it), or set WSBRIDGE_SKIP_BROWSER=1 to skip this test."
    );
    let dir = TempDir::new("browser-wss");
    let (cert, key, spki) = self_signed_certificate(dir.path()).await;
    let args = [OsStr::new("--cert"), cert.as_os_str(), OsStr::new("--key"), key.as_os_str()];
    let demo = start_demo(&args, "https").await;
    let report = chat_in_browser(&browser, &demo, Some(&spki), &screenshot_path("-wss")).await;
    assert_connected(&report, "wss");
    stop_demo(demo).await;
}

/// Cross-site WebSocket hijacking in Chromium: the demo's own page opens its WebSocket, a page
/// from another origin is refused (the demo's routes admit their own origin only), and the
/// demo's log says so with a 403. The demo runs with its agent: the other page's try at the
/// agent endpoint (with the agents' control protocol, as a page trying to brake the agents
/// behind its visitor's address would) is refused as a browser's, with a 403 of its own.
#[tokio::test]
async fn demo_refuses_a_page_from_another_origin_in_chromium() {
    let Some(browser) = browser_or_skip("demo_refuses_a_page_from_another_origin_in_chromium") else {
        return;
    };
    let demo = start_demo(&[OsStr::new("--agent")], "http").await;
    let mut command = Command::new("node");
    command
        .current_dir(&browser.root)
        .arg("tests/browser/origin.mjs")
        .args(["--agent-path", "/agent"])
        .arg(&demo.url)
        .env("CHROMIUM", &browser.chromium);
    let node = run_to_end("node tests/browser/origin.mjs", command, BROWSER_TIMEOUT).await;
    assert!(
        node.status.success(),
        "origin.mjs failed ({})\nits stdout:\n{}\nits stderr:\n{}\nwsbridge demo's log:\n{}",
        node.status,
        tail(&node.stdout, 20),
        tail(&node.stderr, 40),
        tail(&demo.guard.output, 40)
    );
    let report = node.stdout.lock().unwrap().last().cloned().unwrap_or_default();
    assert!(report.starts_with(r#"{"ok":true"#), "{report}");
    println!("origin.mjs: {report}");
    let log = tail(&demo.guard.output, 200);
    assert!(
        log.lines().any(|l| l.contains("status=403") && l.contains("is not allowed")),
        "no 403 for the other origin in the demo's log:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("status=403") && l.contains("agent endpoint: a browser's request")),
        "no 403 for the agent endpoint in the demo's log:\n{log}"
    );
    stop_demo(demo).await;
}

/// `wsbridge demo --agent`: the page's sessions cross an agent (in the demo's process, dialled
/// in on /agent) to the chat server, and back.
#[tokio::test]
async fn demo_chat_round_trip_in_chromium_through_an_agent() {
    let Some(browser) = browser_or_skip("demo_chat_round_trip_in_chromium_through_an_agent") else {
        return;
    };
    let demo = start_demo(&[OsStr::new("--agent")], "http").await;
    let report = chat_in_browser(&browser, &demo, None, &screenshot_path("-agent")).await;
    assert_connected(&report, "ws");
    let log = demo.guard.output.clone();
    stop_demo(demo).await;
    // The only way from /chat to the chat server is the agent's: its sessions are logged with it.
    let log = log.lock().unwrap().join("\n");
    assert!(log.contains("agent connected"), "the agent never connected:\n{log}");
    assert!(
        log.contains("target=\"agent demo-agent service chat\"") && log.contains("session closed"),
        "no session crossed the agent:\n{log}"
    );
}

/// Where Debian's novnc package puts noVNC's files.
const NOVNC: &str = "/usr/share/novnc";
/// The VNC desktop: its size and name, which the page must show.
const VNC_GEOMETRY: (u32, u32) = (800, 600);
const VNC_DESKTOP: &str = "wsbridge-novnc-test";
/// novnc.mjs's own bound (it takes about 3 s).
const NOVNC_SCRIPT_SECONDS: &str = "25";

/// What the noVNC tests run: the browser's tools and Xvnc.
struct VncTools {
    browser: Browser,
    xvnc: PathBuf,
}

/// The noVNC tests' tools, or `None` (said so) if they are to be skipped: `WSBRIDGE_SKIP_BROWSER=1`,
/// or no Xvnc or noVNC here. A missing browser fails, as for the other browser tests.
fn vnc_or_skip(test: &str) -> Option<VncTools> {
    let browser = browser_or_skip(test)?;
    let Some(xvnc) = common::xvnc::Xvnc::installed() else {
        common::skip(test, "no Xvnc (Debian's tigervnc-standalone-server; scripts/test.sh installs it)");
        return None;
    };
    if !Path::new(NOVNC).join("vnc.html").is_file() {
        common::skip(test, &format!("no {NOVNC}/vnc.html (Debian's novnc; scripts/test.sh installs it)"));
        return None;
    }
    Some(VncTools { browser, xvnc })
}

/// Runs novnc.mjs on `url` (noVNC's vnc.html as wsbridge serves it) and returns its report;
/// fails the test with `context()` (the logs of the parts) unless the page went through every
/// step and saved a PNG at `screenshot`.
async fn novnc_in_browser(browser: &Browser, url: &str, screenshot: &Path, context: &dyn Fn() -> String) -> serde_json::Value {
    let (w, h) = VNC_GEOMETRY;
    let mut command = Command::new("node");
    command
        .current_dir(&browser.root)
        .arg("tests/browser/novnc.mjs")
        .args(["--geometry", &format!("{w}x{h}"), "--desktop", VNC_DESKTOP])
        .args(["--timeout", NOVNC_SCRIPT_SECONDS])
        .arg(url)
        .env("WSBRIDGE_SCREENSHOT", screenshot)
        .env("CHROMIUM", &browser.chromium);
    let node = run_to_end("node tests/browser/novnc.mjs", command, BROWSER_TIMEOUT).await;
    assert!(
        node.status.success(),
        "novnc.mjs failed ({}) on {url}\nits stdout:\n{}\nits stderr:\n{}\n{}",
        node.status,
        tail(&node.stdout, 20),
        tail(&node.stderr, 40),
        context()
    );
    let line = node.stdout.lock().unwrap().last().cloned().unwrap_or_default();
    println!("novnc.mjs: {line}");
    let report: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("novnc.mjs's last line is not its JSON report ({e}): {line:?}"));
    assert_eq!(report["ok"], true, "novnc.mjs exited 0 without reporting success: {line}");
    assert_eq!(report["status"], format!("Connected (unencrypted) to {VNC_DESKTOP}"), "{line}");
    assert_eq!(report["framebuffer"]["size"], format!("{w}x{h}"), "{line}");
    assert_eq!(report["disconnected"], "Disconnected", "{line}");
    let png = std::fs::read(screenshot).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", screenshot.display()));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", screenshot.display());
    println!("screenshot: {}", screenshot.display());
    report
}

/// The value of `key=VALUE` in a log line (tracing's text format; quotes kept).
fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}

/// The number in `key=N` of a log line.
fn log_number(line: &str, key: &str) -> u64 {
    log_field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}=N in {line:?}"))
}

/// Checks a `session closed` line of wsbridge's against the browser's report: the page ended
/// the session (noVNC's rfb.disconnect() sends a close frame without a code, which reads 1005;
/// 1000 would be as normal), and wsbridge carried exactly the bytes the browser sent and
/// received, each way.
fn assert_session_matches(line: &str, report: &serde_json::Value) {
    assert_eq!(log_field(line, "ended_by"), Some("client"), "{line}");
    let code = log_field(line, "code");
    assert!(matches!(code, Some("1005" | "1000")), "the session did not end normally: {line}");
    let bytes = |key: &str| {
        report[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no {key} in novnc.mjs's report: {report}"))
    };
    assert_eq!(
        log_number(line, "bytes_up"),
        bytes("bytesOut"),
        "bytes up: {line}\nthe browser's report: {report}"
    );
    assert_eq!(
        log_number(line, "bytes_down"),
        bytes("bytesIn"),
        "bytes down: {line}\nthe browser's report: {report}"
    );
}

/// Checks that Xvnc saw one client (the page), which left in order: noVNC's close reached it
/// as the end of its connection, not as a broken one.
async fn assert_one_clean_vnc_client(xvnc: &common::xvnc::Xvnc) {
    // Xvnc logs `closing PATH: REASON`, then `Connections: closed: PATH`; it wraps long lines.
    xvnc.line("Connections: closed:").await;
    let log = xvnc.log().split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        log.contains(": Clean disconnection"),
        "Xvnc saw the connection end otherwise; its log:\n{}",
        xvnc.log()
    );
    assert_eq!(
        xvnc.count("Connections: accepted"),
        1,
        "Xvnc should have seen the page's connection only; its log:\n{}",
        xvnc.log()
    );
}

/// No warning or error of wsbridge's about a connection (the start-up ones, such as the command
/// line's any-origin warning, are not about one).
fn assert_no_connection_warnings(name: &str, lines: &[String]) {
    let bad: Vec<&String> = lines
        .iter()
        .filter(|l| (l.contains(" WARN ") || l.contains(" ERROR ")) && l.contains("conn{"))
        .collect();
    assert!(bad.is_empty(), "{name} warned about a connection:\n{}", lines.join("\n"));
}

/// SIGTERMs a wsbridge process and checks that it exits with 0.
async fn stop_binary(name: &str, mut process: common::binary::Binary) {
    process.signal("TERM").await;
    let code = process.exit_code().await;
    assert_eq!(
        code,
        0,
        "{name} exited with {code} after SIGTERM; its log:\n{}",
        process.lines().join("\n")
    );
}

/// noVNC, served by wsbridge itself, to a real VNC server: `wsbridge --web /usr/share/novnc
/// 127.0.0.1:0 --unix-target SOCKET` as a noVNC user types it (websockify's command line), and
/// the page opened as they open it (`vnc.html?autoconnect=true`: host, port and the path
/// `websockify` are the page's defaults).
#[tokio::test]
async fn novnc_shows_a_real_vnc_desktop_through_wsbridge() {
    let test = "novnc_shows_a_real_vnc_desktop_through_wsbridge";
    let Some(tools) = vnc_or_skip(test) else {
        return;
    };
    let dir = TempDir::new("novnc");
    let xvnc = common::xvnc::Xvnc::start(&tools.xvnc, dir.path(), VNC_GEOMETRY, VNC_DESKTOP).await;
    let socket = xvnc.socket.to_str().expect("a UTF-8 temporary path").to_owned();
    let mut bridge = common::binary::Binary::spawn(&["--web", NOVNC, "127.0.0.1:0", "--unix-target", &socket]).await;

    let url = format!("http://{}/vnc.html?autoconnect=true", bridge.addr);
    let context = || format!("wsbridge's log:\n{}\nXvnc's log:\n{}", bridge.lines().join("\n"), xvnc.log());
    let report = novnc_in_browser(&tools.browser, &url, &screenshot_path("-novnc"), &context).await;
    assert_eq!(report["websocket"], format!("ws://{}/websockify", bridge.addr));

    let closed = bridge.line("session closed").await;
    println!("wsbridge: {closed}");
    assert!(closed.contains(&format!("target=unix:{socket}")), "{closed}");
    assert_session_matches(&closed, &report);
    assert_one_clean_vnc_client(&xvnc).await;
    let lines = bridge.lines();
    assert_eq!(
        lines.iter().filter(|l| l.contains("session closed")).count(),
        1,
        "{}",
        lines.join("\n")
    );
    assert_no_connection_warnings("wsbridge", &lines);

    stop_binary("wsbridge", bridge).await;
    xvnc.stop().await;
}

/// The same page, its session across an agent: a wsbridge server (noVNC's files and an agent
/// endpoint, from a configuration file) whose `/websockify` route names the service `vnc` of
/// the agent `desk`, and a `wsbridge agent` process that dialled in and serves `vnc` = Xvnc's
/// socket. noVNC asks for no compression (`compression=0`), so the framebuffer updates that
/// cross the agent's link are tens of KiB rather than a few hundred bytes.
#[tokio::test]
async fn novnc_shows_a_real_vnc_desktop_through_an_agent() {
    let test = "novnc_shows_a_real_vnc_desktop_through_an_agent";
    let Some(tools) = vnc_or_skip(test) else {
        return;
    };
    let dir = TempDir::new("novnc-agent");
    let xvnc = common::xvnc::Xvnc::start(&tools.xvnc, dir.path(), VNC_GEOMETRY, VNC_DESKTOP).await;

    // A secret and its server line, as an operator makes them.
    let (code, out, err) = common::binary::run_to_end(&["agent", "--new-secret"]).await;
    assert_eq!(code, 0, "wsbridge agent --new-secret: {err}");
    let secret = out.lines().next().expect("a secret on the first line");
    let hash_line = out
        .lines()
        .find(|l| l.starts_with("secret_sha256 = "))
        .unwrap_or_else(|| panic!("no secret_sha256 line in {out:?}"));
    let secret_file = dir.path().join("agent.secret");
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\nweb = \"{NOVNC}\"\n\n\
             [[agent_endpoint]]\npath = \"/agent\"\n\n\
             [[agent]]\nname = \"desk\"\n{hash_line}\n\n\
             [[route]]\npath = \"/websockify\"\ntarget = {{ agent = \"desk\", service = \"vnc\" }}\n"
        ),
    )
    .unwrap();
    let mut server = common::binary::Binary::spawn(&["--config", config.to_str().unwrap()]).await;

    let mut command = Command::new(common::binary::BIN);
    command
        .arg("agent")
        .args([
            "--server",
            &format!("ws://{}/agent", server.addr),
            "--name",
            "desk",
            "--proxy",
            "off",
        ])
        .arg("--secret-file")
        .arg(&secret_file)
        .arg(format!("--service=vnc=unix:{}", xvnc.socket.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let mut agent = common::binary::Binary::start(command);
    agent.line("agent: connected").await;
    server.line("agent connected").await;

    let url = format!("http://{}/vnc.html?autoconnect=true&compression=0", server.addr);
    let context = || {
        format!(
            "the server's log:\n{}\nthe agent's log:\n{}\nXvnc's log:\n{}",
            server.lines().join("\n"),
            agent.lines().join("\n"),
            xvnc.log()
        )
    };
    let report = novnc_in_browser(&tools.browser, &url, &screenshot_path("-novnc-agent"), &context).await;
    assert_eq!(report["websocket"], format!("ws://{}/websockify", server.addr));

    let closed = server.line("session closed").await;
    println!("wsbridge: {closed}");
    assert!(closed.contains("target=\"agent desk service vnc\""), "{closed}");
    assert_session_matches(&closed, &report);
    // The agent's side of the session: the same bytes each way, between its link and Xvnc.
    let agent_closed = agent.line("agent: session").await;
    println!("wsbridge agent: {agent_closed}");
    assert!(agent_closed.contains("agent: session closed"), "{agent_closed}");
    assert_eq!(
        log_number(&agent_closed, "bytes_up"),
        log_number(&closed, "bytes_up"),
        "{agent_closed}\n{closed}"
    );
    assert_eq!(
        log_number(&agent_closed, "bytes_down"),
        log_number(&closed, "bytes_down"),
        "{agent_closed}\n{closed}"
    );
    assert_one_clean_vnc_client(&xvnc).await;
    assert_no_connection_warnings("the server", &server.lines());
    let warned: Vec<String> = agent
        .lines()
        .into_iter()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(warned.is_empty(), "the agent warned:\n{}", warned.join("\n"));

    stop_binary("wsbridge agent", agent).await;
    stop_binary("wsbridge", server).await;
    xvnc.stop().await;
}

/// `wsbridge --web DIR --web-auth --auth-plugin BasicHTTPAuth` in Chromium: without the password
/// the page is a 401 that makes a browser prompt; with it (playwright's `httpCredentials`, the
/// browser's answer to the prompt) the page loads, and its WebSocket, which asks for the same
/// password, opens and echoes: Chromium sends the credentials it was asked for with the same
/// origin's WebSocket handshake.
#[tokio::test]
async fn a_page_behind_web_auth_and_its_websocket_in_chromium() {
    let Some(browser) = browser_or_skip("a_page_behind_web_auth_and_its_websocket_in_chromium") else {
        return;
    };
    let www = TempDir::new("webauth");
    std::fs::write(
        www.path().join("index.html"),
        "<!doctype html><title>behind a password</title><p>hi",
    )
    .unwrap();
    let (backend, _) = common::echo_backend().await;
    let target = backend.to_string();
    let web = www.path().to_str().unwrap();
    let bridge = common::binary::Binary::spawn(&[
        "--web",
        web,
        "--web-auth",
        "--auth-plugin",
        "BasicHTTPAuth",
        "--auth-source",
        "alice:s3cret",
        "127.0.0.1:0",
        &target,
    ])
    .await;
    let url = format!("http://{}/index.html", bridge.addr);
    let refused = common::http_raw(bridge.addr, b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(refused.starts_with("HTTP/1.1 401") && refused.contains("Basic realm="), "{refused}");
    let mut command = Command::new("node");
    command
        .current_dir(&browser.root)
        .arg("tests/browser/webauth.mjs")
        .args(["--user", "alice", "--password", "s3cret", "--timeout", "40"])
        .arg(&url)
        .env("CHROMIUM", &browser.chromium);
    let node = run_to_end("node tests/browser/webauth.mjs", command, BROWSER_TIMEOUT).await;
    assert!(
        node.status.success(),
        "webauth.mjs failed ({})\nits stdout:\n{}\nits stderr:\n{}\nwsbridge's log:\n{}",
        node.status,
        tail(&node.stdout, 20),
        tail(&node.stderr, 40),
        bridge.lines().join("\n")
    );
    let report = node.stdout.lock().unwrap().last().cloned().unwrap_or_default();
    assert!(report.contains(r#""title":"behind a password""#), "{report}");
    println!("webauth.mjs: {report}");
}
