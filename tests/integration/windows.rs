//! The Windows build, run here under Wine: `wsbridge.exe` cross-built for x86_64-pc-windows-gnu
//! in forward mode in front of a Linux TCP backend on 127.0.0.1, with a WebSocket client from the
//! test crossing it; Ctrl-C (Wine turns a SIGINT to the process into the console's CTRL_C_EVENT)
//! draining sessions as SIGTERM does on Linux; unix socket targets refused; Windows paths in a
//! configuration; the service glue under Wine's Service Control Manager; and `wsbridge.exe agent`
//! dialling a Linux server (this process's), in a console and installed as a service.
//!
//! The first test to need it builds the .exe (`cargo build --target x86_64-pc-windows-gnu`, into
//! `<target dir>/windows`, where `scripts/test.sh` builds it beforehand so that the build does
//! not compete with timing tests), and `scripts/windows/wine-prng.sh` builds the
//! `bcryptprimitives.dll` Wine 8 lacks beside it. Where `wine`, MinGW-w64 or the rustup target is
//! missing, each test says so and is skipped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, OnceCell};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::common::connect_proxy::{canned_server, ConnectProxy};
use crate::common::*;

const TARGET: &str = "x86_64-pc-windows-gnu";

/// The bound on building the .exe when `scripts/test.sh` has not (a fresh debug cross-build took
/// 72 s on the project's 2-core machine).
const BUILD_WAIT: Duration = Duration::from_secs(600);

/// The bound on Wine starting the .exe: the first start in a fresh prefix sets the prefix up.
const WINE_WAIT: Duration = Duration::from_secs(120);

/// The cross-built `wsbridge.exe` with the DLL Wine needs beside it, and the Wine prefix to run
/// it in.
struct WindowsBuild {
    exe: PathBuf,
    /// `examples/windows_service.rs`: forward mode as a Windows service.
    service_exe: PathBuf,
    prefix: PathBuf,
}

enum Prepared {
    Ready(WindowsBuild),
    /// What is missing here.
    Skip(String),
    /// The build failed: a real failure of the code.
    Failed(String),
}

static PREPARED: OnceCell<Prepared> = OnceCell::const_new();

/// The .exe, built once per test run; `None` when the test is to be skipped (said on stderr).
async fn windows_build(test: &str) -> Option<&'static WindowsBuild> {
    match PREPARED.get_or_init(prepare).await {
        Prepared::Ready(build) => Some(build),
        Prepared::Skip(reason) => {
            skip(test, reason);
            None
        }
        Prepared::Failed(e) => panic!("{e}"),
    }
}

/// Whether `program args` runs and succeeds.
async fn runs(program: &str, args: &[&str]) -> bool {
    let status = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    matches!(tokio::time::timeout(WAIT, status).await, Ok(Ok(s)) if s.success())
}

async fn prepare() -> Prepared {
    if !runs("wine", &["--version"]).await {
        return Prepared::Skip("wine is not installed (Debian: apt-get install wine wine64; scripts/test.sh does)".into());
    }
    if !runs("x86_64-w64-mingw32-gcc", &["--version"]).await {
        return Prepared::Skip("MinGW-w64 is not installed (Debian: apt-get install gcc-mingw-w64-x86-64)".into());
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let libdir = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", TARGET])
        .output()
        .await;
    let installed = libdir.ok().is_some_and(|o| {
        let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        o.status.success() && std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
    });
    if !installed {
        return Prepared::Skip(format!("the Rust target {TARGET} is not installed (rustup target add {TARGET})"));
    }
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Beside the test's own target directory, never in it: the `cargo test` that runs this holds
    // that one's lock.
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("windows");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let build = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--target",
            TARGET,
            "--bin",
            "wsbridge",
            "--example",
            "windows_service",
        ])
        .arg("--manifest-path")
        .arg(manifest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(BUILD_WAIT, build).await {
        Err(_) => return Prepared::Failed(format!("cargo build --target {TARGET} took longer than {BUILD_WAIT:?}")),
        Ok(Err(e)) => return Prepared::Failed(format!("cargo build --target {TARGET}: {e}")),
        Ok(Ok(o)) if !o.status.success() => {
            return Prepared::Failed(format!(
                "cargo build --target {TARGET} failed:\n{}",
                String::from_utf8_lossy(&o.stderr)
            ))
        }
        Ok(Ok(_)) => {}
    }
    let out = target_dir.join(TARGET).join("debug");
    for dir in [out.clone(), out.join("examples")] {
        let dll = Command::new(manifest_dir.join("scripts/windows/wine-prng.sh"))
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .await;
        match dll {
            Ok(o) if o.status.success() => {}
            other => return Prepared::Failed(format!("scripts/windows/wine-prng.sh {}: {other:?}", dir.display())),
        }
    }
    let build = WindowsBuild {
        exe: out.join("wsbridge.exe"),
        service_exe: out.join("examples").join("windows_service.exe"),
        prefix: target_dir.join("wineprefix"),
    };
    // One start before the tests' own, which run in parallel: it sets the prefix up, once.
    let version = wine(&build, &["--version"]).stderr(Stdio::null()).output();
    match tokio::time::timeout(WINE_WAIT, version).await {
        Ok(Ok(o)) if o.status.success() && String::from_utf8_lossy(&o.stdout).starts_with("wsbridge ") => {}
        other => return Prepared::Failed(format!("wine wsbridge.exe --version: {other:?}")),
    }
    Prepared::Ready(build)
}

/// `wine wsbridge.exe ARGS` in the build's prefix, quiet about Wine itself, killed when dropped.
fn wine(build: &WindowsBuild, args: &[&str]) -> Command {
    wine_run(build, build.exe.as_os_str(), args)
}

/// `wine PROGRAM ARGS` (a path, or a program of Wine's own such as `sc`) in the build's prefix.
fn wine_run(build: &WindowsBuild, program: &std::ffi::OsStr, args: &[&str]) -> Command {
    wine_in(&build.prefix, program, args)
}

/// `wine PROGRAM ARGS` in the Wine prefix `prefix`, without the proxy variables of this process's
/// environment (the agent would take them before the Windows settings, and Wine's WinHTTP reads
/// `http_proxy` as its default proxy, which Windows' does not).
fn wine_in(prefix: &Path, program: &std::ffi::OsStr, args: &[&str]) -> Command {
    let mut command = Command::new("wine");
    for var in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "NO_PROXY",
        "no_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        command.env_remove(var);
    }
    command
        .arg(program)
        .args(args)
        .env("WINEPREFIX", prefix)
        .env("WINEDEBUG", "-all")
        // No Mono or Gecko: nothing here needs them, and Wine would offer to download them.
        .env("WINEDLLOVERRIDES", "mscoree,mshtml=")
        .env("RUST_LOG", std::env::var("WSBRIDGE_WINE_LOG").unwrap_or_else(|_| "info".into()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// A Windows path for a Linux one: Wine's drive Z: is the Linux root.
fn z_path(p: &Path) -> String {
    format!("Z:{}", p.display()).replace('/', "\\")
}

/// `wsbridge.exe` running under Wine, and its stderr lines.
struct WinProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl WinProcess {
    fn spawn(build: &WindowsBuild, args: &[&str]) -> WinProcess {
        WinProcess::start(wine(build, args))
    }

    /// Runs `command` (a `wine …` from [`wine_in`]), its stderr read line by line.
    fn start(mut command: Command) -> WinProcess {
        let mut child = command.stdout(Stdio::null()).spawn().expect("spawn wine");
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let (tx, lines) = mpsc::channel(1024);
        // Not to EOF: Wine's own server may keep the pipe open after the .exe has exited.
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                // Shown with a failing test's output.
                eprintln!("wsbridge.exe: {line}");
                if tx.send(line).await.is_err() {
                    break;
                }
            }
        });
        WinProcess {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (up to `wait`) for a stderr line containing `what`.
    async fn line(&mut self, what: &str, wait: Duration) -> String {
        let found = tokio::time::timeout(wait, async {
            while let Some(line) = self.lines.recv().await {
                self.seen.push(line.clone());
                if line.contains(what) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            Ok(None) => panic!("wsbridge.exe exited before writing {what:?}:\n{}", self.seen.join("\n")),
            Err(_) => panic!("no line with {what:?} within {wait:?}:\n{}", self.seen.join("\n")),
        }
    }

    async fn listening(&mut self) -> std::net::SocketAddr {
        let line = self.line("listening addr=", WINE_WAIT).await;
        let addr = line.split("listening addr=").nth(1).unwrap().split_whitespace().next().unwrap();
        addr.parse().unwrap()
    }

    /// Ctrl-C: Wine delivers a SIGINT to the process running the .exe as CTRL_C_EVENT to its
    /// console control handlers (the `wine` process we spawned execs into that process).
    async fn ctrl_c(&self) {
        let pid = self.child.id().expect("still running").to_string();
        let status = Command::new("kill").args(["-s", "INT", &pid]).status().await.unwrap();
        assert!(status.success(), "kill -s INT {pid}");
    }
}

/// A WebSocket session through `wsbridge.exe` to a Linux echo service: 1 MiB of binary messages
/// and a text message cross it both ways byte for byte while both directions run at once, then
/// the client's close is answered and the backend sees its EOF.
#[tokio::test]
async fn forward_mode_under_wine_carries_a_session_byte_exact_both_ways() {
    let test = "windows::forward_mode_under_wine_carries_a_session_byte_exact_both_ways";
    let Some(build) = windows_build(test).await else { return };
    let (backend, mut streams) = manual_backend().await;
    let target = backend.to_string();
    let mut p = WinProcess::spawn(build, &["127.0.0.1:0", &target]);
    let addr = p.listening().await;
    let (ws, _) = ws_connect(&format!("ws://{addr}/"), None).await;
    let mut b = within("backend accept", streams.recv()).await.unwrap();
    // The backend echoes, and keeps what it saw and whether it saw EOF.
    let echo = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = b.read(&mut buf).await.unwrap();
            if n == 0 {
                b.shutdown().await.unwrap();
                return seen;
            }
            seen.extend_from_slice(&buf[..n]);
            b.write_all(&buf[..n]).await.unwrap();
        }
    });
    let (mut tx, mut rx) = ws.split();
    let mut data = pattern(1 << 20, 14);
    let text = "text frames are bytes too: \u{e9}\u{1F600}\n";
    data.extend_from_slice(text.as_bytes());
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent[..1 << 20].chunks(60 * 1024) {
            tx.send(Message::binary(chunk.to_vec())).await.unwrap();
        }
        tx.send(Message::text(text)).await.unwrap();
        tx
    });
    let mut got = Vec::new();
    while got.len() < data.len() {
        got.extend(recv_data(&mut rx).await);
    }
    assert!(got == data, "the bytes that came back differ from those sent ({} bytes)", got.len());
    let mut tx = within("client writer", writer).await.unwrap();
    within(
        "client close",
        tx.send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "done".into(),
        }))),
    )
    .await
    .unwrap();
    let answer = match within("close answer", rx.next()).await {
        Some(Ok(Message::Close(f))) => f,
        other => panic!("expected the answer to our close, got {other:?}"),
    };
    assert_eq!(answer.map(|f| u16::from(f.code)), Some(1000));
    let seen = within("backend EOF", echo).await.unwrap();
    assert!(seen == data, "the backend saw other bytes than were sent ({} bytes)", seen.len());
}

/// Ctrl-C under Wine drains as SIGTERM does on Linux: the session closes with 1001 "server shutting
/// down", everything the client sent before it reaches the backend with no hole, the backend gets
/// its EOF, and the process logs a clean stop and exits 0.
#[tokio::test]
async fn ctrl_c_under_wine_closes_sessions_with_1001_after_their_data() {
    let test = "windows::ctrl_c_under_wine_closes_sessions_with_1001_after_their_data";
    let Some(build) = windows_build(test).await else { return };
    let (backend, mut streams) = manual_backend().await;
    let target = backend.to_string();
    let mut p = WinProcess::spawn(build, &["127.0.0.1:0", &target]);
    let addr = p.listening().await;
    let (ws, _) = ws_connect(&format!("ws://{addr}/"), None).await;
    let (mut tx, mut rx) = ws.split();
    let mut b = within("backend accept", streams.recv()).await.unwrap();
    let data = pattern(8 << 20, 9);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        let mut ok = 0usize;
        for chunk in sent.chunks(64 * 1024) {
            if tx.send(Message::binary(chunk.to_vec())).await.is_err() {
                break;
            }
            ok += chunk.len();
        }
        ok
    });
    // Some data through, then Ctrl-C while the rest is on its way.
    let mut first = vec![0u8; 1 << 20];
    within("first MiB", b.read_exact(&mut first)).await.unwrap();
    p.ctrl_c().await;
    let close = within("close frame", async {
        loop {
            match rx.next().await {
                Some(Ok(Message::Close(f))) => return f,
                Some(Ok(_)) => {}
                other => panic!("stream ended without a close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("a close frame with a code");
    assert_eq!((u16::from(close.code), close.reason.as_str()), (1001, "server shutting down"));
    let mut rest = Vec::new();
    within("backend EOF", b.read_to_end(&mut rest)).await.unwrap();
    let mut got = first;
    got.extend(rest);
    let sent_ok = within("client writer", writer).await.unwrap();
    assert!(
        got.len() >= sent_ok,
        "the backend got {} bytes, the client sent {sent_ok}",
        got.len()
    );
    assert!(
        got == data[..got.len()],
        "the backend's bytes are not a prefix of what the client sent: a hole"
    );
    drop(rx);
    p.line("stopped clean=true remaining=0", WAIT).await;
    let status = within("exit", p.child.wait()).await.unwrap();
    assert!(status.success(), "{status:?}");
}

/// A configuration naming a unix socket target, and `--unix-target`, are refused on Windows with
/// that reason (exit 64), the configuration's error with its file, line and field.
#[tokio::test]
async fn unix_socket_targets_are_refused_on_windows() {
    let test = "windows::unix_socket_targets_are_refused_on_windows";
    let Some(build) = windows_build(test).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("unix.toml");
    std::fs::write(
        &config,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/vnc\"\ntarget = \"unix:/run/vnc.sock\"\n",
    )
    .unwrap();
    let config = z_path(&config);
    let run = wine(build, &["check", "--config", &config]).output();
    let out = tokio::time::timeout(WINE_WAIT, run).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("unix socket targets are not available on Windows"), "{stderr}");
    assert!(stderr.contains("unix.toml") && stderr.contains("line 6"), "{stderr}");
    let run = wine(build, &["6080", "--unix-target", "/run/vnc.sock"]).output();
    let out = tokio::time::timeout(WINE_WAIT, run).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("--unix-target: unix socket targets are not available on Windows"),
        "{stderr}"
    );
}

/// Windows paths in a configuration: an absolute `Z:\…` certificate and a key relative to the
/// configuration's directory, written with backslashes, are both found (`check` reads them).
#[tokio::test]
async fn windows_paths_in_a_configuration_resolve() {
    let test = "windows::windows_paths_in_a_configuration_resolve";
    let Some(build) = windows_build(test).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::create_dir(dir.path().join("abs")).unwrap();
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    std::fs::write(dir.path().join("abs/c.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("certs/k.pem"), key.serialize_pem()).unwrap();
    let config = dir.path().join("w.toml");
    let cert_path = z_path(&dir.path().join("abs/c.pem"));
    std::fs::write(
        &config,
        format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\n[listen.tls]\ncert = '{cert_path}'\nkey = 'certs\\k.pem'\n\n\
             [[route]]\npath = \"/\"\ntarget = \"127.0.0.1:9\"\n"
        ),
    )
    .unwrap();
    let run = wine(build, &["check", "--config", &z_path(&config)]).output();
    let out = tokio::time::timeout(WINE_WAIT, run).await.unwrap().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(": OK"), "{stdout}");
    // The broken twin: a key that is not there is reported with the path it resolved to.
    std::fs::remove_file(dir.path().join("certs/k.pem")).unwrap();
    let run = wine(build, &["check", "--config", &z_path(&config)]).output();
    let out = tokio::time::timeout(WINE_WAIT, run).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("certs\\k.pem"), "{stderr}");
}

/// The service glue (`src/service.rs`) under Wine's Service Control Manager, through
/// `examples/windows_service.rs`: installed with `service::install`, started with `sc start`, a
/// session through it byte-exact both ways, `sc stop` draining it (1001 after the data, a clean
/// stop), then `service::uninstall`.
#[tokio::test]
async fn the_service_glue_runs_under_wines_service_control_manager() {
    let test = "windows::the_service_glue_runs_under_wines_service_control_manager";
    let Some(build) = windows_build(test).await else { return };
    // Wine ends its services with the last ordinary process of the prefix: one runs meanwhile.
    let mut keeper = WinProcess::spawn(build, &["127.0.0.1:0", "127.0.0.1:9"]);
    keeper.listening().await;
    let (backend, _) = echo_backend().await;
    let reports = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let report = reports.local_addr().unwrap().to_string();
    let name = format!("wsbridge-test-{}", std::process::id());

    /// Uninstalls the service if the test ends early, so that no service is left in the prefix.
    struct Installed<'a>(&'a WindowsBuild, &'a str, bool);
    impl Drop for Installed<'_> {
        fn drop(&mut self) {
            if self.2 {
                let _ = std::process::Command::new("wine")
                    .arg(&self.0.service_exe)
                    .args(["uninstall", self.1])
                    .env("WINEPREFIX", &self.0.prefix)
                    .env("WINEDEBUG", "-all")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
    let service = |args: &[&str]| wine_run(build, build.service_exe.as_os_str(), args).output();
    let sc = |args: &[&str]| wine_run(build, "sc".as_ref(), args).output();
    let ok = |what: &str, out: std::process::Output| {
        assert!(
            out.status.success(),
            "{what}: {:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };

    let target = backend.to_string();
    ok(
        "install",
        within("install", service(&["install", &name, &report, &target])).await.unwrap(),
    );
    let mut installed = Installed(build, &name, true);
    ok("sc start", within("sc start", sc(&["start", &name])).await.unwrap());
    let (reported, _) = tokio::time::timeout(WINE_WAIT, reports.accept())
        .await
        .expect("the service's report")
        .unwrap();
    let mut reported = BufReader::new(reported).lines();
    let url = within("the service's address", reported.next_line()).await.unwrap().unwrap();
    assert!(url.starts_with("ws://127.0.0.1:"), "{url}");

    let (mut ws, _) = ws_connect(&url, None).await;
    let data = pattern(200_000, 3);
    send_bin(&mut ws, &data).await;
    let mut got = Vec::new();
    while got.len() < data.len() {
        got.extend(recv_data(&mut ws).await);
    }
    assert!(got == data, "the echo differs from what was sent");

    ok("sc stop", within("sc stop", sc(&["stop", &name])).await.unwrap());
    assert_eq!(read_close(&mut ws).await, (1001, "server shutting down".to_owned()));
    let _ = ws.flush().await;
    let stopped = within("the service's last word", reported.next_line()).await.unwrap();
    assert_eq!(stopped.as_deref(), Some("stopped (clean: true)"));

    ok("uninstall", within("uninstall", service(&["uninstall", &name])).await.unwrap());
    installed.2 = false;
    drop(installed);
    drop(keeper);
}

/// The agent's secret in the Wine tests.
use crate::agent::SECRET as AGENT_SECRET;

/// A Linux server (in this process) with the agent endpoint `/agent`, the agent `shop-17` and the
/// route `/pos` to its service `pos`.
async fn agent_server() -> TestBridge {
    TestBridge::start(crate::agent::server_config(&["shop-17"], &[("shop-17", "pos")])).await
}

/// An agent configuration for `wsbridge.exe agent` in `dir`: the server's `/agent`, its secret in
/// a file named relative to the configuration (resolved the Windows way), the service `pos` on
/// `pos` (a Linux TCP service on 127.0.0.1).
fn agent_toml(dir: &Path, server: std::net::SocketAddr, pos: std::net::SocketAddr) -> PathBuf {
    agent_toml_with(dir, server, pos, "secrets\\agent.secret")
}

/// [`agent_toml`] with the secret file's path as written in the file (`secret_path`, relative).
fn agent_toml_with(dir: &Path, server: std::net::SocketAddr, pos: std::net::SocketAddr, secret_path: &str) -> PathBuf {
    write_agent_toml(dir, &[format!("ws://{server}/agent")], pos, secret_path, "")
}

/// An agent configuration in `dir` for the server URLs `servers`, with `extra` lines in its
/// `[agent]` table.
fn write_agent_toml(dir: &Path, servers: &[String], pos: std::net::SocketAddr, secret_path: &str, extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("secrets")).unwrap();
    std::fs::write(dir.join("secrets/agent.secret"), format!("{AGENT_SECRET}\n")).unwrap();
    let config = dir.join("agent.toml");
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    std::fs::write(
        &config,
        format!(
            "[agent]\nserver = [{}]\nname = \"shop-17\"\nsecret_file = '{secret_path}'\n\
             retry_max = \"1s\"\n{extra}\n[agent.services]\npos = \"{pos}\"\n",
            servers.join(", ")
        ),
    )
    .unwrap();
    config
}

/// A browser-side session on the server's `/pos`, across the agent to the echo service: 1 MiB
/// of binary messages and a text message cross byte for byte while both directions run, then
/// our close is answered with 1000.
async fn session_through_the_agent(url: &str) {
    let (ws, _) = ws_connect(url, None).await;
    let (mut tx, mut rx) = ws.split();
    let mut data = pattern(1 << 20, 17);
    let text = "through the agent: \u{e9}\u{1F600}\n";
    data.extend_from_slice(text.as_bytes());
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent[..1 << 20].chunks(60 * 1024) {
            tx.send(Message::binary(chunk.to_vec())).await.unwrap();
        }
        tx.send(Message::text(text)).await.unwrap();
        tx
    });
    let mut got = Vec::new();
    while got.len() < data.len() {
        got.extend(recv_data(&mut rx).await);
    }
    assert!(got == data, "the bytes that came back differ from those sent ({} bytes)", got.len());
    let mut tx = within("client writer", writer).await.unwrap();
    let bye = CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    };
    within("client close", tx.send(Message::Close(Some(bye)))).await.unwrap();
    let answer = loop {
        match within("close answer", rx.next()).await {
            Some(Ok(Message::Close(f))) => break f,
            Some(Ok(_)) => {}
            other => panic!("expected the answer to our close, got {other:?}"),
        }
    };
    assert_eq!(answer.map(|f| u16::from(f.code)), Some(1000));
}

/// `wsbridge.exe agent` under Wine dials a Linux wsbridge server, carries a browser's session to
/// a Linux echo service byte-exact both ways with a clean close, and Ctrl-C ends it cleanly
/// (its stop logged, exit 0).
#[tokio::test]
async fn the_agent_under_wine_carries_a_session_and_stops_on_ctrl_c() {
    let test = "windows::the_agent_under_wine_carries_a_session_and_stops_on_ctrl_c";
    let Some(build) = windows_build(test).await else { return };
    let (echo, _) = echo_backend().await;
    let bridge = agent_server().await;
    let dir = tempfile::tempdir().unwrap();
    let config = agent_toml(dir.path(), bridge.addr, echo);
    let mut p = WinProcess::spawn(build, &["agent", "--config", &z_path(&config)]);
    p.line("agent: connected", WINE_WAIT).await;
    session_through_the_agent(&bridge.url("/pos")).await;
    p.ctrl_c().await;
    p.line("agent: stopped", WAIT).await;
    let status = within("exit", p.child.wait()).await.unwrap();
    assert!(status.success(), "{status:?}");
}

/// `wsbridge.exe agent --install-service` under Wine's Service Control Manager: installed with
/// its configuration and log file, started with `sc start`, its log in the file it was given,
/// a session through it byte-exact both ways, `sc stop` ending it cleanly, then
/// `--uninstall-service`.
#[tokio::test]
async fn the_agent_runs_as_a_service_under_wine() {
    let test = "windows::the_agent_runs_as_a_service_under_wine";
    let Some(build) = windows_build(test).await else { return };
    // Wine ends its services with the last ordinary process of the prefix: one runs meanwhile.
    let mut keeper = WinProcess::spawn(build, &["127.0.0.1:0", "127.0.0.1:9"]);
    keeper.listening().await;
    let (echo, _) = echo_backend().await;
    let bridge = agent_server().await;
    let dir = tempfile::tempdir().unwrap();
    let config = agent_toml(dir.path(), bridge.addr, echo);
    let log = dir.path().join("logs").join("agent.log");
    std::fs::create_dir(dir.path().join("logs")).unwrap();

    /// Uninstalls the service if the test ends early: an automatic service left in the prefix
    /// would start with every later Wine session of it.
    struct Installed<'a>(&'a WindowsBuild, bool);
    impl Drop for Installed<'_> {
        fn drop(&mut self) {
            if self.1 {
                let _ = std::process::Command::new("wine")
                    .arg(&self.0.exe)
                    .args(["agent", "--uninstall-service"])
                    .env("WINEPREFIX", &self.0.prefix)
                    .env("WINEDEBUG", "-all")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
    let sc = |args: &[&str]| wine_run(build, "sc".as_ref(), args).output();
    let ok = |what: &str, out: std::process::Output| {
        assert!(
            out.status.success(),
            "{what}: {:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let (config_z, log_z) = (z_path(&config), z_path(&log));
    // A setting given as a flag would not reach the service: refused, with where to put it.
    let flagged = wine(
        build,
        &["agent", "--install-service", "--config", &config_z, "--max-sessions", "pos=1"],
    )
    .output();
    let flagged = tokio::time::timeout(WINE_WAIT, flagged).await.unwrap().unwrap();
    let said = String::from_utf8_lossy(&flagged.stderr);
    assert_eq!(flagged.status.code(), Some(64), "{said}");
    assert!(
        said.contains("--max-sessions: a service takes its settings from --config FILE only"),
        "{said}"
    );
    let install = wine(build, &["agent", "--install-service", "--config", &config_z, "--log-file", &log_z]).output();
    let said = ok("install", tokio::time::timeout(WINE_WAIT, install).await.unwrap().unwrap());
    let mut installed = Installed(build, true);
    assert!(said.contains("installed the service wsbridge-agent"), "{said}");
    ok("sc start", within("sc start", sc(&["start", "wsbridge-agent"])).await.unwrap());
    file_line(&log, "agent: connected", WINE_WAIT).await;
    session_through_the_agent(&bridge.url("/pos")).await;
    ok("sc stop", within("sc stop", sc(&["stop", "wsbridge-agent"])).await.unwrap());
    file_line(&log, "agent: stopped", WAIT).await;
    // Started again, then removed while it runs: --uninstall-service returns once it has
    // stopped, so that installing again right after (an upgrade) works (it said "stopped and
    // removed" while the service still ran, and the install after it failed: "marked for delete").
    ok(
        "sc start again",
        within("sc start", sc(&["start", "wsbridge-agent"])).await.unwrap(),
    );
    let uninstall = wine(build, &["agent", "--uninstall-service"]).output();
    let said = ok("uninstall", tokio::time::timeout(WINE_WAIT, uninstall).await.unwrap().unwrap());
    assert!(said.contains("is stopped and removed"), "{said}");
    let install = wine(build, &["agent", "--install-service", "--config", &config_z, "--log-file", &log_z]).output();
    ok(
        "install right after the uninstall",
        tokio::time::timeout(WINE_WAIT, install).await.unwrap().unwrap(),
    );
    // Installed twice: the second says what to do (it said "Service exists (os error 1073)").
    let twice = wine(build, &["agent", "--install-service", "--config", &config_z, "--log-file", &log_z]).output();
    let twice = tokio::time::timeout(WINE_WAIT, twice).await.unwrap().unwrap();
    let said = String::from_utf8_lossy(&twice.stderr);
    assert_eq!(twice.status.code(), Some(1), "{said}");
    assert!(
        said.contains("is installed already: `wsbridge.exe agent --uninstall-service` first"),
        "{said}"
    );
    // A service that cannot start (its secret file gone) says why in its log and in its exit
    // code, which `sc query` shows (it left no trace at all).
    std::fs::rename(dir.path().join("secrets/agent.secret"), dir.path().join("secrets/away")).unwrap();
    let _ = within("sc start", sc(&["start", "wsbridge-agent"])).await.unwrap();
    file_line(&log, "the service cannot start", WINE_WAIT).await;
    let query = within("sc query", async {
        loop {
            let out = sc(&["query", "wsbridge-agent"]).await.unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.contains("STOPPED") {
                return text;
            }
        }
    })
    .await;
    assert!(
        query
            .lines()
            .any(|l| l.contains("SERVICE_EXIT_CODE") && l.split_whitespace().nth(2) == Some("64")),
        "{query}"
    );
    let uninstall = wine(build, &["agent", "--uninstall-service"]).output();
    ok("uninstall", tokio::time::timeout(WINE_WAIT, uninstall).await.unwrap().unwrap());
    installed.1 = false;
    // Gone: starting it again is refused.
    let again = within("sc start after uninstall", sc(&["start", "wsbridge-agent"])).await.unwrap();
    assert!(!again.status.success(), "the service still starts after --uninstall-service");
    // Removing it again is no failure (an uninstall script run twice).
    let uninstall = wine(build, &["agent", "--uninstall-service"]).output();
    let said = ok(
        "uninstall again",
        tokio::time::timeout(WINE_WAIT, uninstall).await.unwrap().unwrap(),
    );
    assert!(said.contains("is not installed: nothing to remove"), "{said}");
    drop(installed);
    drop(keeper);
}

/// A Wine prefix of one test's own, for settings in its registry that no other test may see:
/// created fresh (Wine sets a prefix up at its first program: 6-10 s here), with the values of
/// `reg` (a `.reg` file's text) imported by that first program. Its wineserver and whatever still
/// runs in it are stopped, and the directory removed, when it is dropped.
struct OwnPrefix {
    dir: tempfile::TempDir,
}

impl OwnPrefix {
    async fn new(reg: &str) -> OwnPrefix {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("settings.reg");
        std::fs::write(&file, reg).unwrap();
        let prefix = OwnPrefix { dir };
        let import = wine_in(&prefix.path(), "reg".as_ref(), &["import", &z_path(&file)]).output();
        let out = tokio::time::timeout(WINE_WAIT, import)
            .await
            .expect("a fresh Wine prefix and reg import within WINE_WAIT")
            .unwrap();
        assert!(
            out.status.success(),
            "wine reg import: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        prefix
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("prefix")
    }
}

impl Drop for OwnPrefix {
    fn drop(&mut self) {
        // Killed, then waited for (at most 10 s: coreutils' timeout), so that the server is not
        // still writing its registry into the prefix while the directory is removed.
        for args in [&["wineserver", "-k"][..], &["timeout", "10", "wineserver", "-w"][..]] {
            let _ = std::process::Command::new(args[0])
                .args(&args[1..])
                .env("WINEPREFIX", self.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Where Internet Options keep a user's proxy settings (`DefaultConnectionSettings`) and
/// `netsh winhttp set proxy` the machine's (`WinHttpSettings`).
const USER_CONNECTIONS: &str = r"HKEY_CURRENT_USER\Software\Microsoft\Windows\CurrentVersion\Internet Settings\Connections";
const MACHINE_CONNECTIONS: &str = r"HKEY_LOCAL_MACHINE\Software\Microsoft\Windows\CurrentVersion\Internet Settings\Connections";

/// `DefaultConnectionSettings` flags: direct, a manual proxy, a PAC script, automatic detection.
const DIRECT: u32 = 1;
const MANUAL_PROXY: u32 = 2;
const PAC_SCRIPT: u32 = 4;

/// Internet Options' `DefaultConnectionSettings`, as WinHTTP reads it (Wine's and Windows'):
/// version 0x46, a change counter, the flags, then the proxy list, the bypass list and the PAC
/// script's URL, each a 32-bit little-endian length and its bytes. (Windows writes more after
/// those, which WinHTTP does not read.)
fn user_settings(flags: u32, proxy: &str, bypass: &str, pac: &str) -> Vec<u8> {
    let mut blob = [0x46u32, 1, flags].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    for text in [proxy, bypass, pac] {
        blob.extend((text.len() as u32).to_le_bytes());
        blob.extend(text.as_bytes());
    }
    blob
}

/// The machine's WinHTTP default as `netsh winhttp set proxy` writes it (`WinHttpSettings`):
/// 0x18, 0, flags (a named proxy), then the proxy list and the bypass list as above.
fn machine_settings(proxy: &str, bypass: &str) -> Vec<u8> {
    let mut blob = [0x18u32, 0, MANUAL_PROXY].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    for text in [proxy, bypass] {
        blob.extend((text.len() as u32).to_le_bytes());
        blob.extend(text.as_bytes());
    }
    blob
}

/// A `.reg` file that sets the user's Internet Options (`DefaultConnectionSettings`, as the
/// dialog writes it) to `settings` ([`user_settings`]).
fn internet_options(settings: Vec<u8>) -> String {
    reg_file(&[(USER_CONNECTIONS, "DefaultConnectionSettings", settings)])
}

/// A `.reg` file setting each (key, value name, bytes) as REG_BINARY.
fn reg_file(values: &[(&str, &str, Vec<u8>)]) -> String {
    let mut text = String::from("Windows Registry Editor Version 5.00\r\n");
    for (key, name, bytes) in values {
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        text.push_str(&format!("\r\n[{key}]\r\n\"{name}\"=hex:{}\r\n", hex.join(",")));
    }
    text
}

/// Serves `script` as the PAC file ([`canned_server`]).
async fn pac_server(script: String) -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    canned_server(format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/x-ns-proxy-autoconfig\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{script}",
        script.len()
    ))
    .await
}

/// A server that takes connections and never answers: a PAC URL whose server hangs. It holds the
/// first few connections open (the rest are dropped) until the test's runtime ends.
async fn silent_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            if held.len() < 16 {
                held.push(s);
            }
        }
    });
    addr
}

/// A proxy that answers every CONNECT with 403 (a proxy of a network the computer has left, or
/// one that refuses this agent), keeping what it was asked ([`canned_server`]).
async fn refusing_proxy() -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    canned_server("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()).await
}

/// `wsbridge.exe agent --config CONFIG` started in `prefix` (its own registry: the settings the
/// test wrote there).
fn agent_in(prefix: &OwnPrefix, build: &WindowsBuild, config: &Path) -> WinProcess {
    WinProcess::start(wine_in(
        &prefix.path(),
        build.exe.as_os_str(),
        &["agent", "--config", &z_path(config)],
    ))
}

/// Stops the agent (Ctrl-C) and checks that it exits cleanly.
async fn stop_agent(mut p: WinProcess) {
    p.ctrl_c().await;
    let status = within("exit", p.child.wait()).await.unwrap();
    assert!(status.success(), "{status:?}");
}

/// The agent's connections up (to `through`, and to `direct` if given), a session through each
/// server byte for byte, and the proxy saw the control link and the data links to `through` and
/// nothing else; then a clean stop.
async fn through_the_proxy_to_one_server_only(mut p: WinProcess, proxy: &ConnectProxy, through: &TestBridge, direct: Option<&TestBridge>) {
    for _ in 0..1 + usize::from(direct.is_some()) {
        p.line("agent: connected", WINE_WAIT).await;
    }
    session_through_the_agent(&through.url("/pos")).await;
    if let Some(direct) = direct {
        session_through_the_agent(&direct.url("/pos")).await;
    }
    let targets = proxy.targets();
    assert!(targets.len() >= 2, "{targets:?}");
    assert!(targets.iter().all(|t| *t == through.addr.to_string()), "{targets:?}");
    stop_agent(p).await;
}

/// `wsbridge.exe agent` with no proxy option and no proxy in its environment follows the
/// Internet Options of its user, set in its prefix's registry: a manual proxy per scheme (ws://
/// takes the `http=` entry; `https=` and `socks=` are not for it) and the bypass list `<local>`.
/// Of its two servers, the one at 127.0.0.1 is reached through the test's CONNECT proxy, the one
/// named `localhost` (a name without a dot) directly; it says so at start, and a session crosses
/// each, byte for byte.
#[tokio::test]
async fn the_agent_under_wine_follows_the_internet_options_proxy_and_bypass_list() {
    let test = "windows::the_agent_under_wine_follows_the_internet_options_proxy_and_bypass_list";
    let Some(build) = windows_build(test).await else { return };
    let proxy = ConnectProxy::start().await;
    let (echo, _) = echo_backend().await;
    let (through, direct) = (agent_server().await, agent_server().await);
    let list = format!("socks=127.0.0.1:9;http={};https=127.0.0.1:9", proxy.addr);
    let settings = user_settings(DIRECT | MANUAL_PROXY, &list, "<local>", "");
    let prefix = OwnPrefix::new(&internet_options(settings)).await;
    let dir = tempfile::tempdir().unwrap();
    let servers = [
        format!("ws://{}/agent", through.addr),
        format!("ws://localhost:{}/agent", direct.addr.port()),
    ];
    let config = write_agent_toml(dir.path(), &servers, echo, "secrets\\agent.secret", "");
    let mut p = agent_in(&prefix, build, &config);
    let via = p.line("agent: reaching the server through a proxy", WINE_WAIT).await;
    let says = format!(
        "server={} proxy={} from=\"Windows settings (Internet Options)\"",
        servers[0], proxy.addr
    );
    assert!(via.ends_with(&says), "{via}");
    let not = p.line("agent: reaching the server directly", WAIT).await;
    let says = format!(
        "server={} from=\"Windows settings (Internet Options); its bypass list names localhost\"",
        servers[1]
    );
    assert!(not.ends_with(&says), "{not}");
    through_the_proxy_to_one_server_only(p, &proxy, &through, Some(&direct)).await;
}

/// With nothing in the user's Internet Options but the default (automatic detection, which finds
/// no script here), the agent takes the machine's WinHTTP default (`netsh winhttp set proxy`,
/// what a service's account usually relies on), and says which.
#[tokio::test]
async fn the_agent_under_wine_falls_back_to_the_winhttp_default_proxy() {
    let test = "windows::the_agent_under_wine_falls_back_to_the_winhttp_default_proxy";
    let Some(build) = windows_build(test).await else { return };
    let proxy = ConnectProxy::start().await;
    let (echo, _) = echo_backend().await;
    let bridge = agent_server().await;
    let settings = machine_settings(&proxy.addr.to_string(), "*.example.com;<local>");
    let prefix = OwnPrefix::new(&reg_file(&[(MACHINE_CONNECTIONS, "WinHttpSettings", settings)])).await;
    let dir = tempfile::tempdir().unwrap();
    let config = agent_toml(dir.path(), bridge.addr, echo);
    let mut p = agent_in(&prefix, build, &config);
    let via = p.line("agent: reaching the server through a proxy", WINE_WAIT).await;
    let says = format!(
        "server=ws://{}/agent proxy={} from=\"Windows settings (WinHTTP default)",
        bridge.addr, proxy.addr
    );
    assert!(via.contains(&says), "{via}");
    through_the_proxy_to_one_server_only(p, &proxy, &bridge, None).await;
}

/// Internet Options naming a PAC script (served by the test over HTTP on 127.0.0.1): Wine's
/// WinHTTP downloads it and runs it for each server's URL (`http://…` for `ws://`). Its answer
/// decides: the server at 127.0.0.1 through the test's proxy, `localhost` DIRECT.
#[tokio::test]
async fn the_agent_under_wine_follows_a_pac_script() {
    let test = "windows::the_agent_under_wine_follows_a_pac_script";
    let Some(build) = windows_build(test).await else { return };
    let proxy = ConnectProxy::start().await;
    let (echo, _) = echo_backend().await;
    let (through, direct) = (agent_server().await, agent_server().await);
    let script = format!(
        "function FindProxyForURL(url, host) {{\n\
         \x20 if (host == \"localhost\") return \"DIRECT\";\n\
         \x20 if (shExpMatch(url, \"http://127.0.0.1:*\")) return \"PROXY {}; DIRECT\";\n\
         \x20 return \"PROXY 127.0.0.1:9\";\n}}\n",
        proxy.addr
    );
    let (pac, served) = pac_server(script).await;
    let pac_url = format!("http://{pac}/proxy.pac");
    let settings = user_settings(DIRECT | PAC_SCRIPT, "", "", &pac_url);
    let prefix = OwnPrefix::new(&internet_options(settings)).await;
    let dir = tempfile::tempdir().unwrap();
    let servers = [
        format!("ws://{}/agent", through.addr),
        format!("ws://localhost:{}/agent", direct.addr.port()),
    ];
    let config = write_agent_toml(dir.path(), &servers, echo, "secrets\\agent.secret", "");
    let mut p = agent_in(&prefix, build, &config);
    let via = p.line("agent: reaching the server through a proxy", WINE_WAIT).await;
    let says = format!(
        "server={} proxy={} from=\"Windows settings (PAC {pac_url})\"",
        servers[0], proxy.addr
    );
    assert!(via.ends_with(&says), "{via}");
    let not = p.line("agent: reaching the server directly", WAIT).await;
    let says = format!(
        "server={} from=\"Windows settings (PAC {pac_url}); the script says DIRECT\"",
        servers[1]
    );
    assert!(not.ends_with(&says), "{not}");
    assert!(!served.lock().unwrap().is_empty());
    through_the_proxy_to_one_server_only(p, &proxy, &through, Some(&direct)).await;
}

/// A PAC script whose server never answers holds the agent's start for its `connect_timeout`
/// (here 2 s), not for WinHTTP's own timeouts (Wine's wait 30 s for the answer): then the manual
/// proxy of the same Internet Options is used, and the start-up line says why.
#[tokio::test]
async fn a_pac_server_that_hangs_under_wine_delays_the_agent_only_for_its_connect_timeout() {
    let test = "windows::a_pac_server_that_hangs_under_wine_delays_the_agent_only_for_its_connect_timeout";
    let Some(build) = windows_build(test).await else { return };
    let proxy = ConnectProxy::start().await;
    let (echo, _) = echo_backend().await;
    let bridge = agent_server().await;
    let pac_url = format!("http://{}/proxy.pac", silent_server().await);
    let settings = user_settings(DIRECT | MANUAL_PROXY | PAC_SCRIPT, &proxy.addr.to_string(), "", &pac_url);
    let prefix = OwnPrefix::new(&internet_options(settings)).await;
    let dir = tempfile::tempdir().unwrap();
    let servers = [format!("ws://{}/agent", bridge.addr)];
    let config = write_agent_toml(dir.path(), &servers, echo, "secrets\\agent.secret", "connect_timeout = \"2s\"\n");
    let started = std::time::Instant::now();
    let mut p = agent_in(&prefix, build, &config);
    let via = p.line("agent: reaching the server through a proxy", WINE_WAIT).await;
    let took = started.elapsed();
    let says = format!(
        "server={} proxy={} from=\"Windows settings (Internet Options); PAC {pac_url}: no answer within 2s\"",
        servers[0], proxy.addr
    );
    assert!(via.ends_with(&says), "{via}");
    // Not Wine's 30 s: WinHTTP's own failure would read "could not be downloaded" anyway.
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(25), "{took:?}");
    p.line("agent: connected", WINE_WAIT).await;
    session_through_the_agent(&bridge.url("/pos")).await;
    assert!(proxy.targets().iter().all(|t| *t == bridge.addr.to_string()));
    stop_agent(p).await;
}

/// Internet Options that change while the agent runs: it starts with a manual proxy that refuses
/// every CONNECT (403, a proxy of the network the laptop has left), so every attempt fails. Then
/// the prefix's registry names the test's real proxy (`reg import` of what the dialog writes,
/// through the same wineserver as the agent's). Before a retry the agent reads the settings
/// again, says once what changed (the new proxy and the old one), and connects through the new
/// proxy: no restart. A session crosses byte for byte, and the new proxy saw the control link and
/// the data links.
#[tokio::test]
async fn the_agent_under_wine_follows_internet_options_that_change_while_it_runs() {
    let test = "windows::the_agent_under_wine_follows_internet_options_that_change_while_it_runs";
    let Some(build) = windows_build(test).await else { return };
    let proxy = ConnectProxy::start().await;
    let (refusing, refused) = refusing_proxy().await;
    let (echo, _) = echo_backend().await;
    let bridge = agent_server().await;
    let settings = |proxy: &str| internet_options(user_settings(DIRECT | MANUAL_PROXY, proxy, "", ""));
    let prefix = OwnPrefix::new(&settings(&refusing.to_string())).await;
    let dir = tempfile::tempdir().unwrap();
    let config = agent_toml(dir.path(), bridge.addr, echo);
    let started = std::time::Instant::now();
    let mut p = agent_in(&prefix, build, &config);
    let via = p.line("agent: reaching the server through a proxy", WINE_WAIT).await;
    assert!(
        via.ends_with(&format!("proxy={refusing} from=\"Windows settings (Internet Options)\"")),
        "{via}"
    );
    let failed = p.line("agent: not connected; retrying", WINE_WAIT).await;
    assert!(
        failed.contains(&format!(
            "the proxy {refusing} (Windows settings (Internet Options)) answered 403 to CONNECT"
        )),
        "{failed}"
    );
    assert!(!failed.contains("restart"), "{failed}");
    assert!(refused.lock().unwrap().iter().any(|l| l.starts_with("CONNECT ")));
    // The settings change while it runs.
    let file = dir.path().join("changed.reg");
    std::fs::write(&file, settings(&proxy.addr.to_string())).unwrap();
    let import = wine_in(&prefix.path(), "reg".as_ref(), &["import", &z_path(&file)]).output();
    let out = tokio::time::timeout(WINE_WAIT, import).await.expect("wine reg import").unwrap();
    assert!(out.status.success(), "wine reg import: {out:?}");
    // Read again within its floor (10 s) and a retry of at most 1 s (`retry_max`), plus
    // Wine's time to run it.
    let changed = p.line("agent: the Windows proxy settings changed", Duration::from_secs(40)).await;
    let says = format!(
        "proxy={} from=\"Windows settings (Internet Options)\" was=\"through {refusing} (from Windows settings (Internet Options))\"",
        proxy.addr
    );
    assert!(changed.ends_with(&says), "{changed}");
    through_the_proxy_to_one_server_only(p, &proxy, &bridge, None).await;
    eprintln!("{test}: {:?} from the agent's start", started.elapsed());
}

/// Off Windows, the agent's service flags are refused with what to do instead (exit 64).
#[cfg(unix)]
#[tokio::test]
async fn the_agents_service_flags_are_refused_off_windows() {
    for flag in ["--install-service", "--uninstall-service", "--service-mode"] {
        let run = Command::new(crate::common::binary::BIN)
            .args(["agent", flag, "--config", "config/agent.toml"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .output();
        let out = within(flag, run).await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{flag}: {stderr}");
        assert!(
            stderr.contains(&format!("agent {flag}: Windows services exist only on Windows")),
            "{flag}: {stderr}"
        );
    }
}

/// `wsbridge agent --log-file FILE` (a console agent here on Linux; the service's log on Windows
/// is the same code): its log lines go to the file, not to stderr, through a session and its stop.
#[cfg(unix)]
#[tokio::test]
async fn the_agents_log_file_gets_its_log_lines() {
    let (echo, _) = echo_backend().await;
    let bridge = agent_server().await;
    let dir = tempfile::tempdir().unwrap();
    let config = agent_toml_with(dir.path(), bridge.addr, echo, "secrets/agent.secret");
    let log = dir.path().join("agent.log");
    let mut child = Command::new(crate::common::binary::BIN)
        .arg("agent")
        .arg("--config")
        .arg(&config)
        .arg("--log-file")
        .arg(&log)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    file_line(&log, "agent: connected", WAIT).await;
    session_through_the_agent(&bridge.url("/pos")).await;
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-s", "TERM", &pid]).status().await.unwrap().success());
    file_line(&log, "agent: stopped", WAIT).await;
    let mut stderr = String::new();
    within("stderr", child.stderr.take().unwrap().read_to_string(&mut stderr))
        .await
        .unwrap();
    let status = within("exit", child.wait()).await.unwrap();
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(stderr.is_empty(), "log lines on stderr as well: {stderr}");
    let text = std::fs::read_to_string(&log).unwrap();
    let closed = text
        .lines()
        .find(|l| l.contains("agent: session closed service=pos app=127.0.0.1:"));
    assert!(
        closed.is_some_and(|l| l.contains(" bytes_up=1048602 bytes_down=1048602 ")),
        "{text}"
    );
}
