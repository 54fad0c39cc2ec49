//! The real binary: websockify-style invocation, SIGTERM drain, exit codes, `check`, and every
//! example configuration in `config/`.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::common::*;

use crate::common::binary::{run_to_end, BIN};

/// Kills the child if the test fails before it exits.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// The binary's log lines, for tests that wait on one; lines nobody reads are dropped once 256
/// are queued.
type Logs = tokio::sync::mpsc::Receiver<String>;

/// Starts the binary and waits for its "listening" log line; returns the child, the address and
/// its log lines (those before "listening" included).
async fn spawn_bridge(args: &[&str]) -> (Running, std::net::SocketAddr, Logs) {
    spawn_bridge_under(&[], args).await
}

/// [`spawn_bridge`] run through `wrapper` (e.g. `prlimit --nofile=…`).
async fn spawn_bridge_under(wrapper: &[&str], args: &[&str]) -> (Running, std::net::SocketAddr, Logs) {
    let (program, args) = match wrapper {
        [] => (BIN, args.to_vec()),
        [program, rest @ ..] => (*program, [rest, &[BIN], args].concat()),
    };
    let mut child = Command::new(program)
        .args(args)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let (tx, logs) = tokio::sync::mpsc::channel(256);
    let addr = within("listening line", async {
        let mut before = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            let _ = tx.try_send(line.clone());
            if let Some(rest) = line.split("listening addr=").nth(1) {
                return rest.split_whitespace().next().unwrap().parse().unwrap();
            }
            before.push(line);
        }
        panic!("wsbridge exited before listening:\n{}", before.join("\n"));
    })
    .await;
    // Keep draining stderr so the child never blocks on a full pipe.
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.try_send(line);
        }
    });
    (Running(child), addr, logs)
}

/// Waits for the next log line that contains `what`; returns it.
async fn log_line(logs: &mut Logs, what: &str) -> String {
    within(&format!("a log line with {what:?}"), async {
        loop {
            match logs.recv().await {
                Some(line) if line.contains(what) => return line,
                Some(_) => {}
                None => panic!("wsbridge exited before logging {what:?}"),
            }
        }
    })
    .await
}

/// Whether util-linux's `prlimit` runs here (the open-file tests start the binary through it);
/// reports `test` skipped when it does not.
async fn prlimit_works(test: &str) -> bool {
    match Command::new("prlimit").args(["--nofile=256:", "true"]).status().await {
        Ok(s) if s.success() => true,
        Ok(s) => {
            skip(test, &format!("`prlimit --nofile=256: true` failed here: {s}"));
            false
        }
        Err(e) => {
            skip(test, &format!("cannot run prlimit (util-linux): {e}"));
            false
        }
    }
}

async fn kill(child: &Running, signal: &str) {
    let pid = child.0.id().unwrap().to_string();
    let status = Command::new("kill").args(["-s", signal, &pid]).status().await.unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn websockify_style_run_and_sigterm_drain() {
    let (backend, _) = echo_backend().await;
    let target = format!("127.0.0.1:{}", backend.port());
    // Options after the positionals, as noVNC's launcher writes them.
    let (mut child, addr, _) = spawn_bridge(&["127.0.0.1:0", &target, "--heartbeat", "30"]).await;
    let (mut ws, chosen) = ws_connect(&format!("ws://{addr}/websockify"), Some("binary")).await;
    assert_eq!(chosen.as_deref(), Some("binary"));
    send_bin(&mut ws, b"through the binary").await;
    assert_eq!(recv_data(&mut ws).await, b"through the binary");

    kill(&child, "TERM").await;
    assert_eq!(read_close(&mut ws).await, (1001, "server shutting down".to_owned()));
    drop(ws);
    let status = within("exit after SIGTERM", child.0.wait()).await.unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn sighup_reloads_the_config_file_and_keeps_the_old_one_when_the_new_is_broken() {
    let (backend, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wsbridge.toml");
    let config = |path: &str, framing: &str| {
        format!("[[listen]]\naddr = \"127.0.0.1:0\"\n\n[[route]]\npath = \"{path}\"\ntarget = \"{backend}\"\nframing = \"{framing}\"\n")
    };
    std::fs::write(&file, config("/old", "binary")).unwrap();
    let (child, addr, mut logs) = spawn_bridge(&["--config", file.to_str().unwrap(), "--threads", "2"]).await;
    let (mut live, _) = ws_connect(&format!("ws://{addr}/old"), None).await;
    send_bin(&mut live, b"before").await;
    assert_eq!(recv_data(&mut live).await, b"before");

    // The route moves: new connections see the new table, the live session carries on.
    std::fs::write(&file, config("/new", "binary")).unwrap();
    kill(&child, "HUP").await;
    log_line(&mut logs, "configuration reloaded").await;
    assert_eq!(status_of(&http_raw(addr, &upgrade_request("/old", "")).await), 404);
    let (mut fresh, _) = ws_connect(&format!("ws://{addr}/new"), None).await;
    send_bin(&mut fresh, b"new").await;
    assert_eq!(recv_data(&mut fresh).await, b"new");
    send_bin(&mut live, b"after").await;
    assert_eq!(recv_data(&mut live).await, b"after");

    // A broken file is reported with its name, line and field, and the running table stays.
    std::fs::write(&file, config("/newer", "morse")).unwrap();
    kill(&child, "HUP").await;
    let error = log_line(&mut logs, "reload failed").await;
    // One record per line of the parser's message (process.rs checks them).
    assert!(error.contains(file.to_str().unwrap()), "{error}");
    log_line(&mut logs, "unknown variant `morse`").await;
    assert_eq!(status_of(&http_head(addr, &upgrade_request("/new", "")).await), 101);
    assert_eq!(status_of(&http_raw(addr, &upgrade_request("/newer", "")).await), 404);
    send_bin(&mut live, b"still").await;
    assert_eq!(recv_data(&mut live).await, b"still");
}

#[tokio::test]
async fn a_low_soft_open_file_limit_is_raised_to_the_hard_one() {
    let (backend, _) = echo_backend().await;
    let target = backend.to_string();
    // A soft limit of 64 descriptors would hold fewer than 30 sessions; the hard limit (the test
    // process's, unchanged) is the room wsbridge raises it into.
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    if hard.is_some_and(|h| h < 256) {
        let reason = format!("hard open-file limit {hard:?} leaves no room above 64");
        skip("a_low_soft_open_file_limit_is_raised_to_the_hard_one", &reason);
        return;
    }
    if !prlimit_works("a_low_soft_open_file_limit_is_raised_to_the_hard_one").await {
        return;
    }
    let (_child, addr, mut logs) = spawn_bridge_under(
        &["prlimit", "--nofile=64:"],
        &["127.0.0.1:0", &target, "--max-connections", "100", "--threads", "1"],
    )
    .await;
    while let Ok(line) = logs.try_recv() {
        assert!(!line.contains("open-file limit"), "{line}");
    }
    let mut sessions = Vec::new();
    for i in 0..40u8 {
        let (mut ws, _) = ws_connect(&format!("ws://{addr}/"), None).await;
        send_bin(&mut ws, &[i]).await;
        assert_eq!(recv_data(&mut ws).await, [i]);
        sessions.push(ws);
    }
}

/// `wsbridge agent` raises its soft open-file limit too (a session through it holds two
/// descriptors; services start at 1,024).
#[tokio::test]
async fn the_agent_raises_a_low_soft_open_file_limit_to_the_hard_one() {
    let test = "the_agent_raises_a_low_soft_open_file_limit_to_the_hard_one";
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    if hard.is_some_and(|h| h < 256) {
        skip(test, &format!("hard open-file limit {hard:?} leaves no room above 64"));
        return;
    }
    if !prlimit_works(test).await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("agent.secret");
    std::fs::write(&secret, "s\n").unwrap();
    let server = format!("ws://{}/agent", closed_port().await);
    let mut command = Command::new("prlimit");
    command
        .args(["--nofile=64:", BIN, "agent", "--server", &server, "--name", "n", "--proxy", "off"])
        .args(["--service", "pos=127.0.0.1:1", "--secret-file", secret.to_str().unwrap()])
        .stdout(Stdio::null());
    // prlimit runs the agent in its own process (exec): its pid is the agent's.
    let mut agent = crate::common::binary::Binary::start(command);
    // Logged once the agent runs, after the raise.
    agent.line("agent: connecting").await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.pid())).unwrap();
    let open_files = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let [soft, hard]: [&str; 2] = open_files
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    assert_eq!(soft, hard, "{open_files}");
    assert_ne!(soft, "64", "{open_files}");
}

#[tokio::test]
async fn an_open_file_limit_below_max_connections_lowers_the_cap() {
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    if hard.is_some_and(|h| h < 256) {
        let reason = format!("hard open-file limit {hard:?} is below the 256 this test sets");
        skip("an_open_file_limit_below_max_connections_lowers_the_cap", &reason);
        return;
    }
    if !prlimit_works("an_open_file_limit_below_max_connections_lowers_the_cap").await {
        return;
    }
    let (backend, _) = echo_backend().await;
    let target = backend.to_string();
    let args = ["127.0.0.1:0", &target, "--threads", "1"];
    let (_child, addr, mut logs) = spawn_bridge_under(&["prlimit", "--nofile=256:256"], &args).await;
    let warning = log_line(&mut logs, "max_connections lowered").await;
    // 256, less 99 kept aside (32, 64 for refusals that linger, and a listener socket, epoll and
    // wake-up for the one thread), is room for 78 two-descriptor sessions.
    assert!(
        warning.contains("WARN") && warning.contains("from 10000 to 78") && warning.contains("open-file limit (256)"),
        "{warning}"
    );
    // 78 sessions work; the next connection gets a prompt 503, not a stalled accept.
    let mut sessions = Vec::new();
    for i in 0..78u8 {
        let (mut ws, _) = ws_connect(&format!("ws://{addr}/"), None).await;
        send_bin(&mut ws, &[i]).await;
        assert_eq!(recv_data(&mut ws).await, [i]);
        sessions.push(ws);
    }
    let r = http_raw(addr, &upgrade_request("/", "")).await;
    assert_eq!(status_of(&r), 503, "{r}");
    assert!(body_of(&r).contains("too many connections"), "{r}");
    drop(sessions);

    // The default trimmed by less than a tenth (a hard limit of 20,000, as on the project's
    // machines) is said at info: no warning at every start that nobody can act on.
    if hard.is_some_and(|h| h < 20_000) {
        return skip(
            "an_open_file_limit_below_max_connections_lowers_the_cap",
            &format!("the rest: hard open-file limit {hard:?} is below the 20000 it sets"),
        );
    }
    let (_child, _, mut logs) = spawn_bridge_under(&["prlimit", "--nofile=20000:20000"], &args).await;
    let said = log_line(&mut logs, "max_connections").await;
    assert!(
        said.contains(" INFO ") && said.contains("max_connections 9950, not the default 10000"),
        "{said}"
    );
}

#[tokio::test]
async fn usage_errors_exit_64_with_a_clear_message() {
    let (code, _, err) = run_to_end(&["6080", "localhost:5900", "--daemon"]).await;
    assert_eq!(code, 64);
    assert!(err.contains("--daemon is not supported") && err.contains("systemd"), "{err}");
    let (code, _, err) = run_to_end(&["6080"]).await;
    assert_eq!(code, 64);
    assert!(err.contains("missing TARGET"), "{err}");
    let (code, _, err) = run_to_end(&["6080", "nohost"]).await;
    assert_eq!(code, 64);
    assert!(err.contains("HOST:PORT"), "{err}");
    // What the argument parser itself rejects is a usage error too (clap alone would exit 2).
    let (code, _, err) = run_to_end(&["6080", "localhost:5900", "--no-such-option"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--no-such-option"), "{err}");
    let (code, _, err) = run_to_end(&["6080", "localhost:5900", "--threads", "many"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("many"), "{err}");
    // Every websockify option is refused by name, with what to do instead.
    for (args, instead) in [
        (&["--key-password", "x"][..], "unencrypted key"),
        (&["--key-password"][..], "unencrypted key"),
        (&["-6"][..], "IPv6 listen address"),
    ] {
        let (code, _, err) = run_to_end(&[&["6080", "localhost:5900"][..], args].concat()).await;
        assert_eq!(code, 64, "{args:?}: {err}");
        assert!(err.contains("is not supported") && err.contains(instead), "{args:?}: {err}");
    }
    // --unix-listen takes SOURCE's place (websockify's form): a SOURCE beside it is refused.
    let (code, _, err) = run_to_end(&["6080", "localhost:5900", "--unix-listen", "/run/x.sock"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("give only TARGET"), "{err}");
    let (code, _, err) = run_to_end(&["localhost:5900", "--unix-listen-mode", "0600"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--unix-listen"), "{err}");
    let (code, _, err) = run_to_end(&["localhost:5900", "--unix-listen", "/run/x.sock", "--unix-listen-mode", "999"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--unix-listen-mode") && err.contains("octal"), "{err}");
    let (code, out, _) = run_to_end(&["--help"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("--config"), "{out}");
    assert!(out.contains("--unix-listen") && out.contains("systemd:NAME"), "{out}");
    let (code, out, _) = run_to_end(&["--version"]).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("wsbridge "), "{out}");
}

#[tokio::test]
async fn bad_config_file_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/x\"\ntarget = \"127.0.0.1:5900\"\nframing = \"morse\"\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    for args in [vec!["--config", f], vec!["check", "--config", f]] {
        let (code, _, err) = run_to_end(&args).await;
        assert_eq!(code, 64, "{err}");
        assert!(
            err.contains(f) && err.contains("line 7") && err.contains("framing") && err.contains("morse"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn port_in_use_is_a_runtime_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    // With one runtime thread and with several (where SO_REUSEPORT would otherwise share the
    // port with its holder without a word).
    for threads in ["1", "2"] {
        let (code, _, err) = run_to_end(&[&addr, "127.0.0.1:5900", "--threads", threads]).await;
        assert_eq!(code, 1, "--threads {threads}: {err}");
        assert!(err.contains(&format!("cannot listen on {addr}")), "--threads {threads}: {err}");
    }
    // The demo's port (6080 unless told) taken: the message says how to take another (a
    // newcomer's run: it did not, and the README did not either).
    let (code, _, err) = run_to_end(&["demo", "--listen", &addr]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("cannot listen on {addr}")) && err.contains("`wsbridge demo --listen 127.0.0.1:PORT` takes another"),
        "{err}"
    );
}

/// `--unix-listen` in a directory that does not exist (the README's /run/wsbridge, before
/// anything made it) says so and what makes it (a newcomer's run: `No such file or directory`).
#[cfg(unix)]
#[tokio::test]
async fn a_unix_socket_in_a_missing_directory_says_to_make_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("not-made").join("ws.sock");
    let (code, _, err) = run_to_end(&["--unix-listen", socket.to_str().unwrap(), "127.0.0.1:5900"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("its directory does not exist: create it first") && err.contains("RuntimeDirectory="),
        "{err}"
    );
}

/// Every config/*.toml passes `check`, in a copy of the directory where the one file an
/// operator must make first is made: the admin token of config/behind-haproxy.toml (no secret of
/// that kind ships).
#[tokio::test]
async fn every_example_config_checks() {
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    assert!(!shipped.join("admin-token").exists(), "config/admin-token must not ship");
    // config/ and, beside it, the assets the examples name (`../assets/demo`).
    let root = tempfile::tempdir().unwrap();
    let copy = root.path().join("config");
    std::fs::create_dir(&copy).unwrap();
    std::os::unix::fs::symlink(shipped.join("../assets"), root.path().join("assets")).unwrap();
    for entry in std::fs::read_dir(&shipped).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, copy.join(path.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(copy.join("admin-token"), "made-by-the-operator-0123456789abcdef\n").unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(&copy).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, out, err) = run_to_end(&["check", "--config", path.to_str().unwrap()]).await;
            assert_eq!(code, 0, "{}: {err}", path.display());
            assert!(out.contains(": OK") && out.contains("->"), "{}: {out}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 3, "expected the example configs in config/");
}

#[tokio::test]
async fn websockify_tls_options() {
    let pki = crate::common::pki::Pki::new("test CA");
    let cert = pki.server("server", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let (backend, _) = echo_backend().await;
    let target = format!("127.0.0.1:{}", backend.port());
    let (c, k) = (cert.cert.to_str().unwrap(), cert.key.to_str().unwrap());
    let (_child, addr, _) = spawn_bridge(&[
        "127.0.0.1:0",
        &target,
        "--cert",
        c,
        "--key",
        k,
        "--ssl-only",
        "--ssl-version",
        "tlsv1_3",
    ])
    .await;
    let config = crate::common::pki::client_config(&pki.ca_pem, None, &[&tokio_rustls::rustls::version::TLS13]);
    let stream = crate::common::pki::tls_connect(addr, "localhost", config).await.unwrap();
    let mut ws = crate::common::pki::wss_over(stream, "wss://localhost/").await;
    send_bin(&mut ws, b"wss").await;
    assert_eq!(recv_data(&mut ws).await, b"wss");
    // Plain is refused on a --ssl-only port.
    assert_eq!(status_of(&http_raw(addr, &upgrade_request("/", "")).await), 400);
}

/// A wss:// client whose connection is cut (TCP closed, no TLS close_notify: a laptop's lid, a
/// proxy restarting) is logged as cut, not with rustls's text and its manual's link (a review
/// with squid: every agent behind a restarted proxy logged it, on both sides).
#[tokio::test]
async fn a_wss_client_cut_off_is_logged_as_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = crate::common::pki::Pki::new("test CA");
    let cert = pki.server("server", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let (backend, _) = echo_backend().await;
    let target = backend.to_string();
    let (c, k) = (cert.cert.to_str().unwrap(), cert.key.to_str().unwrap());
    let (_child, addr, mut logs) = spawn_bridge(&["127.0.0.1:0", &target, "--cert", c, "--key", k]).await;
    let config = crate::common::pki::client_config(&pki.ca_pem, None, &[&tokio_rustls::rustls::version::TLS13]);
    let mut stream = crate::common::pki::tls_connect(addr, "localhost", config).await.unwrap();
    stream.write_all(&upgrade_request("/", "")).await.unwrap();
    let mut head = [0u8; 12];
    within("the 101", stream.read_exact(&mut head)).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    // The TCP connection closed under the TLS session: no close_notify.
    let (tcp, _) = stream.into_inner();
    drop(tcp);
    let closed = log_line(&mut logs, "session closed").await;
    assert!(
        closed.contains("code=1006 reason=\"client connection failed: connection cut (TLS ended without close_notify)\""),
        "{closed}"
    );
}

#[tokio::test]
async fn tls_option_errors_exit_64() {
    let (code, _, err) = run_to_end(&["127.0.0.1:0", "127.0.0.1:1", "--cert", "/nonexistent/cert.pem"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("/nonexistent/cert.pem: cannot read"), "{err}");
    let (code, _, err) = run_to_end(&["6080", "127.0.0.1:1", "--key", "k.pem"]).await;
    assert_eq!(code, 64);
    assert!(err.contains("need --cert"), "{err}");
    let (code, _, err) = run_to_end(&["6080", "127.0.0.1:1", "--cert", "c.pem", "--ssl-version", "tlsv1_1"]).await;
    assert_eq!(code, 64);
    assert!(err.contains("tlsv1_1 is not supported"), "{err}");
    let (code, _, err) = run_to_end(&["6080", "127.0.0.1:1", "--cert", "c.pem", "--verify-client"]).await;
    assert_eq!(code, 64);
    assert!(err.contains("--verify-client needs --cafile"), "{err}");
}

#[tokio::test]
async fn the_session_log_line_names_the_session_and_how_it_ended() {
    // Logs to a pipe (no colours): the plain field writer, same layout as on a terminal.
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    let (backend, _) = echo_backend().await;
    let target = format!("127.0.0.1:{}", backend.port());
    let (_child, addr, mut logs) = spawn_bridge(&["127.0.0.1:0", &target]).await;
    let (mut ws, _) = ws_connect(&format!("ws://{addr}/"), None).await;
    send_bin(&mut ws, b"hello").await;
    assert_eq!(recv_data(&mut ws).await, b"hello");
    let bye = CloseFrame {
        code: CloseCode::Normal,
        // What a client writes there reaches the log: it must not start a line or colour it.
        reason: "bye\n\u{1b}[31mforged".into(),
    };
    within("close", ws.close(Some(bye))).await.unwrap();
    let line = log_line(&mut logs, "session closed").await;
    let expected = [
        " INFO conn{client=127.0.0.1:".to_owned(),
        format!(" listener={addr} route=\"any path\" target={target} session=1 backend={target}}}: wsbridge::server: session closed "),
        "framing=binary code=1000 reason=\"bye\\n\\u{1b}[31mforged\" ended_by=client bytes_up=5 bytes_down=5 duration_ms=".to_owned(),
    ];
    for part in &expected {
        assert!(line.contains(part.as_str()), "{part:?} not in\n{line}");
    }
    assert!(!line.contains('\x1b'), "colours in a log that is not a terminal: {line:?}");
}

/// `[log] format = "json"`: the session line's fields are plain JSON values, the reason a
/// string as the client sent it (not a quoted Rust debug string inside a string).
#[tokio::test]
async fn json_logs_hold_the_session_line_as_plain_fields() {
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    let (backend, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("w.toml");
    std::fs::write(
        &file,
        format!("[log]\nformat = \"json\"\n[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\ntarget = \"{backend}\"\n"),
    )
    .unwrap();
    let mut child = Running(
        Command::new(BIN)
            .args(["--config", file.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStderr>>;
    async fn next(lines: &mut Lines, message: &str) -> serde_json::Value {
        within(message, async {
            loop {
                let line = lines.next_line().await.unwrap().expect("wsbridge exited");
                let json: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
                if json["message"] == message {
                    return json;
                }
            }
        })
        .await
    }
    let listening = next(&mut lines, "listening").await;
    let addr = listening["addr"].as_str().unwrap_or_else(|| panic!("{listening}")).to_owned();
    let (mut ws, _) = ws_connect(&format!("ws://{addr}/"), None).await;
    send_bin(&mut ws, b"hello").await;
    assert_eq!(recv_data(&mut ws).await, b"hello");
    let bye = CloseFrame {
        code: CloseCode::Normal,
        reason: "see you later".into(),
    };
    within("close", ws.close(Some(bye))).await.unwrap();
    let line = next(&mut lines, "session closed").await;
    assert_eq!(line["reason"], "see you later", "{line}");
    assert_eq!(line["ended_by"], "client", "{line}");
    assert_eq!(line["span"]["target"], backend.to_string().as_str(), "{line}");
    assert_eq!(line["bytes_up"], 5, "{line}");
}

/// A PROXY protocol listener with no trusted_proxies believes whoever reaches it: the bridge
/// says so at start, and not when the balancers are listed.
#[tokio::test]
async fn proxy_protocol_without_trusted_proxies_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("w.toml");
    let route = "[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:5900\"\n";
    let warning = "proxy_protocol without trusted_proxies";
    std::fs::write(&file, format!("[[listen]]\naddr = \"127.0.0.1:0\"\nproxy_protocol = true\n{route}")).unwrap();
    let mut open = crate::common::binary::Binary::spawn(&["--config", file.to_str().unwrap()]).await;
    let line = open.line(warning).await;
    assert!(line.contains("WARN") && line.contains("list the balancers"), "{line}");
    std::fs::write(
        &file,
        format!("[[listen]]\naddr = \"127.0.0.1:0\"\nproxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\"]\n{route}"),
    )
    .unwrap();
    let trusting = crate::common::binary::Binary::spawn(&["--config", file.to_str().unwrap()]).await;
    assert!(!trusting.lines().iter().any(|l| l.contains(warning)), "{:?}", trusting.lines());
}

/// Under systemd's journal (stderr the stream `JOURNAL_STREAM` names) each record starts with
/// its syslog priority, which journald takes and strips, so `journalctl -p warning` finds the
/// warnings; on any other stderr (a variable inherited by a process whose stderr is a file, a
/// pipe) lines are as ever.
#[cfg(unix)]
#[tokio::test]
async fn under_the_journal_records_carry_their_priority() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("w.toml");
    // A start-up warning, and the info line that says where it listens.
    std::fs::write(
        &config,
        "[[listen]]\naddr = \"127.0.0.1:0\"\nproxy_protocol = true\n[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:9\"\n",
    )
    .unwrap();
    for journal in [true, false] {
        let log = dir.path().join(format!("stderr-{journal}"));
        let file = std::fs::File::create(&log).unwrap();
        let meta = file.metadata().unwrap();
        let stream = match journal {
            true => format!("{}:{}", meta.dev(), meta.ino()),
            false => format!("{}:{}", meta.dev(), meta.ino() + 1),
        };
        let _child = Running(
            Command::new(BIN)
                .args(["--config", config.to_str().unwrap()])
                .env("RUST_LOG", "info")
                .env("JOURNAL_STREAM", stream)
                .stdout(Stdio::null())
                .stderr(file)
                .kill_on_drop(true)
                .spawn()
                .unwrap(),
        );
        let listening = file_line(&log, "listening addr=", WAIT).await;
        let warning = file_line(&log, "proxy_protocol without trusted_proxies", WAIT).await;
        match journal {
            true => {
                assert!(listening.starts_with("<6>") && listening.contains(" INFO "), "{listening}");
                assert!(warning.starts_with("<4>") && warning.contains(" WARN "), "{warning}");
            }
            false => assert!(!listening.starts_with('<') && !warning.starts_with('<'), "{listening}\n{warning}"),
        }
    }
}

/// The bridge at its connection cap says so in a warning (then once a minute; each refusal is
/// counted in handshakes_refused_total), not only at debug.
#[tokio::test]
async fn the_connection_cap_reached_is_a_warning() {
    let (backend, _) = echo_backend().await;
    let target = backend.to_string();
    let (_child, addr, mut logs) = spawn_bridge(&["127.0.0.1:0", &target, "--max-connections", "1"]).await;
    let (mut ws, _) = ws_connect(&format!("ws://{addr}/"), None).await;
    send_bin(&mut ws, b"the only place").await;
    assert_eq!(recv_data(&mut ws).await, b"the only place");
    for _ in 0..3 {
        assert_eq!(status_of(&http_raw(addr, &upgrade_request("/", "")).await), 503);
    }
    let line = log_line(&mut logs, "connection limit reached").await;
    assert!(line.contains(" WARN ") && line.contains("max_connections=1"), "{line}");
}

/// On a terminal (stderr a tty, colours on), a log line's fields are escaped as in a file: a
/// client's close reason with an escape sequence and a line break (its text is the client's
/// own) neither clears the operator's screen nor starts a forged line. Run under util-linux's
/// `script`, which gives the binary a terminal; skipped without it.
#[tokio::test]
async fn on_a_terminal_a_clients_text_cannot_forge_lines_or_move_the_cursor() {
    let test = "binary::on_a_terminal_a_clients_text_cannot_forge_lines_or_move_the_cursor";
    if which("script").is_none() {
        return skip(test, "no util-linux script here (a terminal for the binary)");
    }
    let (echo, _) = echo_backend().await;
    let mut child = Command::new("script")
        .args(["-qec", &format!("exec {BIN} 127.0.0.1:0 {echo}"), "/dev/null"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr: std::net::SocketAddr = within("the listening line", async {
        while let Some(line) = lines.next_line().await.unwrap() {
            // Colours (tracing's styles) taken out: `ESC [ … m`.
            let mut plain = String::new();
            let mut parts = line.split('\u{1b}');
            plain.push_str(parts.next().unwrap_or_default());
            for part in parts {
                plain.push_str(part.split_once('m').map_or(part, |(_, rest)| rest));
            }
            if let Some(rest) = plain.split("addr=").nth(1).filter(|_| plain.contains("listening")) {
                return rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        }
        panic!("no listening line on the terminal");
    })
    .await;
    let (mut ws, _) = ws_connect(&format!("ws://{addr}/"), None).await;
    let forged = "\u{1b}[2J\nFORGED ERROR wsbridge: secret=xyz";
    let close = tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: forged.into(),
    };
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Close(Some(close))).await.unwrap();
    let mut seen = Vec::new();
    within("the session's line", async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.contains("session closed");
            seen.push(line);
            if done {
                return;
            }
        }
    })
    .await;
    let text = seen.join("\n");
    assert!(text.contains("FORGED"), "the reason is logged: {text:?}");
    assert!(!text.contains("\u{1b}[2J"), "an escape sequence reached the terminal: {text:?}");
    assert!(!seen.iter().any(|l| l.starts_with("FORGED")), "a forged line: {text:?}");
    // Killing `script` does not take the binary with it (the terminal's hang-up is a SIGHUP, a
    // reload: every run of this test left one running): it is stopped by its own pid.
    let script = child.id().unwrap();
    let children = std::fs::read_to_string(format!("/proc/{script}/task/{script}/children")).unwrap_or_default();
    for pid in children.split_whitespace() {
        let _ = Command::new("kill").args(["-KILL", pid]).status().await;
    }
    drop(child);
}

/// A closed stderr (a pipe whose reader left, `2>&-`, a supervisor gone) does not turn a refused
/// configuration's exit code 64 into a panic's 101: the message is lost, the exit code is not
/// (found by a newcomer: `eprintln!` panics on EPIPE). Also for `wsbridge check`.
#[tokio::test]
async fn a_closed_stderr_keeps_the_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[listen]]\naddr = \"127.0.0.1:0\"\nadress = 1\n").unwrap();
    let bad = bad.to_str().unwrap();
    for args in [&["--config", bad][..], &["check", bad][..]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let status = Command::new(BIN).args(args).stdout(Stdio::null()).stderr(writer).status();
        let status = within("wsbridge to exit", status).await.unwrap();
        assert_eq!(status.code(), Some(64), "{args:?}");
    }
}

/// `wsbridge check` says what the bridge would warn of when it starts: a token file's lines that
/// are skipped (found by a newcomer: check printed OK and "(1 tokens)" for a file of which two
/// lines of three were broken, and said nothing). They go to stderr, the report to stdout; the
/// exit code stays 0, as the bridge starts with such a file.
#[tokio::test]
async fn check_shows_the_warnings_of_a_token_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tokens.cfg"),
        "desk1: 127.0.0.1:5901\nno colon here\ndesk2: 127.0.0.1:notaport\n",
    )
    .unwrap();
    let config = dir.path().join("bridge.toml");
    std::fs::write(
        &config,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n\n[[tokens]]\nsource = \"tokens.cfg\"\n",
    )
    .unwrap();
    let (code, out, err) = run_to_end(&["check", config.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(": OK"), "{out}");
    let skipped: Vec<&str> = err.lines().filter(|l| l.contains("WARN") && l.contains("tokens.cfg:")).collect();
    assert_eq!(skipped.len(), 2, "{err}");
    assert!(skipped[0].contains("tokens.cfg:2") && skipped[1].contains("tokens.cfg:3"), "{err}");
}

/// The manual page holds what `--help` says of every command (the agent's options included: it
/// pointed to pages such as wsbridge-agent(1) that nothing made), its examples as written (not
/// filled into a paragraph), and the exit codes.
#[tokio::test]
async fn the_manual_page_holds_every_command_and_the_exit_codes() {
    let (code, man, err) = run_to_end(&["man"]).await;
    assert_eq!(code, 0, "{err}");
    for needle in [
        ".SH \"WSBRIDGE AGENT\"",
        "\\-\\-secret\\-file",
        "\\-\\-new\\-secret",
        ".SH \"WSBRIDGE CHECK\"",
        ".SH \"EXIT STATUS\"",
        ".SH SIGNALS\n.TP\nSIGTERM, SIGINT\n",
        ".TP\nSIGHUP\nreload",
        ".SH ENVIRONMENT\n",
        ".SH FILES\n",
        "Examples:\n.nf\n",
    ] {
        assert!(man.contains(needle), "{needle:?} not in the manual page");
    }
    assert!(!man.contains("wsbridge\\-agent(1)"), "a page that is not made");
}

/// A key that does not belong to its certificate is found only as the files are loaded (by
/// rustls), after the file was parsed; the error still names the configuration file, the line
/// and the key that names the file, for `wsbridge check` and at start alike (exit 64).
#[tokio::test]
async fn a_key_that_does_not_match_its_certificate_is_named_at_its_line() {
    use crate::common::pki::Pki;
    let pki = Pki::new("test CA");
    // a.crt and a.key, b.crt and b.key in the directory.
    pki.server("a", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    pki.server("b", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let config = pki.dir.path().join("bridge.toml");
    std::fs::write(
        &config,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n\n[listen.tls]\ncert = \"a.crt\"\n# the renewed key\nkey = \"b.key\"\n\n[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    for args in [&["check", config][..], &["--config", config][..]] {
        let (code, _, err) = run_to_end(args).await;
        assert_eq!(code, 64, "{args:?}: {err}");
        assert!(
            err.contains(&format!("{config}:7: key: ")) && err.contains("private key does not match the certificate"),
            "{args:?}: {err}"
        );
    }
}

/// A port below 1024 this process may not bind: exit 1, and the message says what grants it (an
/// operations review: `Permission denied (os error 13)` alone). Run as root, the binary is
/// started as `nobody` with setpriv.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_privileged_port_refused_says_what_grants_it() {
    let test = "a_privileged_port_refused_says_what_grants_it";
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start").unwrap_or_default();
    if !root || start.trim().parse::<u32>().map_or(true, |p| p <= 80) {
        return skip(test, "needs root (to drop to nobody) and port 80 privileged");
    }
    let Some(setpriv) = which("setpriv") else {
        return skip(test, "no setpriv here");
    };
    let mut command = Command::new(setpriv);
    command.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        BIN,
        "127.0.0.1:80",
        "127.0.0.1:1",
    ]);
    let (code, _, err) = crate::common::binary::command_to_end(command).await;
    if code == 126 || code == 127 || err.contains("failed to execute") {
        return skip(test, &format!("nobody cannot run the test binary here: {err}"));
    }
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("Permission denied") && err.contains("CAP_NET_BIND_SERVICE"), "{err}");
}
