//! The binary as a process: start-up errors, log records of a failed reload, how fast it exits,
//! and the demo's chat server. Each test runs the real `wsbridge` and reads its stderr.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::common::*;

use crate::common::binary::BIN;

/// A running `wsbridge`, killed if the test ends before it exits, and its stderr lines, each
/// with the moment it was read.
struct Process {
    child: Child,
    lines: mpsc::Receiver<(String, Instant)>,
    /// Every line read so far, for failure messages.
    seen: Vec<String>,
}

impl Process {
    fn spawn(args: &[&str]) -> Process {
        let mut child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn wsbridge");
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let (tx, lines) = mpsc::channel(1024);
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                if tx.send((line, Instant::now())).await.is_err() {
                    break;
                }
            }
        });
        Process {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `what`; returns it and when it was read.
    async fn line(&mut self, what: &str) -> (String, Instant) {
        let found = tokio::time::timeout(WAIT, async {
            while let Some((line, at)) = self.lines.recv().await {
                self.seen.push(line.clone());
                if line.contains(what) {
                    return Some((line, at));
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(found)) => found,
            Ok(None) => panic!("wsbridge exited before writing {what:?}:\n{}", self.seen.join("\n")),
            Err(_) => panic!("no line with {what:?} within {WAIT:?}:\n{}", self.seen.join("\n")),
        }
    }

    /// The address of the first "listening" line.
    async fn listening(&mut self) -> std::net::SocketAddr {
        let (line, _) = self.line("listening addr=").await;
        let addr = line.split("listening addr=").nth(1).unwrap().split_whitespace().next().unwrap();
        addr.parse().unwrap()
    }

    async fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("still running").to_string();
        let status = Command::new("kill").args(["-s", signal, &pid]).status().await.unwrap();
        assert!(status.success(), "kill -s {signal} {pid}");
    }
}

/// After "stopped" with nothing open, the process is gone at once: nothing left in the runtime
/// (a blocking-pool thread stuck in a file read, a DNS lookup nobody awaits any more) holds the
/// exit. A token file replaced by a FIFO makes such a thread deterministic: the background
/// re-read blocks in `open()` until a writer comes, which none does, and the bridge says so
/// ("re-read is slow") when a lookup has waited for it as long as it may.
#[tokio::test]
async fn exits_promptly_after_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    let config = dir.path().join("wsbridge.toml");
    std::fs::write(
        &config,
        format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\n\n[[tokens]]\nsource = {:?}\n",
            tokens.to_str().unwrap()
        ),
    )
    .unwrap();
    // Two runtime threads: the request may land on the second, whose runtime ends in its thread.
    for (stuck, threads) in [(false, "1"), (true, "1"), (true, "2")] {
        std::fs::write(&tokens, "t: 127.0.0.1:9\n").unwrap();
        let mut p = Process::spawn(&["--config", config.to_str().unwrap(), "--threads", threads]);
        let addr = p.listening().await;
        if stuck {
            std::fs::remove_file(&tokens).unwrap();
            let made = std::process::Command::new("mkfifo").arg(&tokens).status();
            assert!(made.is_ok_and(|s| s.success()), "mkfifo {}", tokens.display());
            // Each lookup is an event: once the snapshot is due, one starts the re-read that
            // blocks, and a later one waits for it and logs that it is slow.
            let asking = async {
                loop {
                    http_head(addr, &upgrade_request("/?token=t", "")).await;
                }
            };
            tokio::select! {
                _ = p.line("token source re-read is slow") => {}
                _ = asking => {}
            }
        }
        p.signal("TERM").await;
        let (_, stopped) = p.line("stopped clean=true remaining=0").await;
        let status = tokio::time::timeout(Duration::from_secs(5), p.child.wait()).await;
        let took = stopped.elapsed();
        assert!(
            took < Duration::from_millis(500),
            "stuck={stuck} threads={threads}: still running {took:?} after the stopped line ({status:?})"
        );
        let status = status.unwrap().unwrap();
        assert!(status.success(), "stuck={stuck} threads={threads}: {status:?}");
        if stuck {
            std::fs::remove_file(&tokens).unwrap();
        }
    }
}

/// A reload whose file never answers (a FIFO in the configuration's place stands for a file on a
/// hung mount) holds neither the serving nor the signals: the log says it is slow 5 s after the
/// SIGHUP, a SIGHUP meanwhile is said and read once more after it, and a SIGTERM drains and exits
/// with the reload unfinished (it used to wait for the file, as did every later signal).
#[cfg(unix)]
#[tokio::test]
async fn a_reload_stuck_on_a_file_holds_neither_sighup_nor_sigterm() {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let (backend, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wsbridge.toml");
    let config = |path: &str| format!("[[listen]]\naddr = \"127.0.0.1:0\"\n\n[[route]]\npath = \"{path}\"\ntarget = \"{backend}\"\n");
    std::fs::write(&file, config("/old")).unwrap();
    let mut p = Process::spawn(&["--config", file.to_str().unwrap(), "--threads", "1"]);
    let addr = p.listening().await;
    let routed = |path: &'static str| async move { status_of(&http_head(addr, &upgrade_request(path, "")).await) == 101 };
    // The configuration turns into a FIFO; the reload that opens it has it once a writer can
    // open its end without waiting (ENXIO until a reader is there). That writer stays open, so
    // the reload waits in its read.
    let fifo_in_place = || {
        std::fs::remove_file(&file).unwrap();
        let made = std::process::Command::new("mkfifo").arg(&file).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo {}", file.display());
    };
    let reader_came = || async {
        let nonblock = rustix::fs::OFlags::NONBLOCK.bits() as i32;
        within("the reload to open the FIFO", async {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            loop {
                tick.tick().await;
                if let Ok(writer) = std::fs::OpenOptions::new().write(true).custom_flags(nonblock).open(&file) {
                    return writer;
                }
            }
        })
        .await
    };

    fifo_in_place();
    let hup = Instant::now();
    p.signal("HUP").await;
    let mut writer = reader_came().await;
    p.signal("HUP").await;
    p.line("SIGHUP during a reload").await;
    let (_, slow) = p.line("reload: still reading the configuration's files").await;
    let waited = slow - hup;
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(7),
        "the slow reload said after {waited:?}, not 5 s"
    );
    assert!(routed("/old").await, "the running configuration serves meanwhile");
    // The second SIGHUP's read finds a regular file with the newest route; the first gets its
    // text through the FIFO when the writer closes.
    let newest = dir.path().join("newest.toml");
    std::fs::write(&newest, config("/newest")).unwrap();
    std::fs::rename(&newest, &file).unwrap();
    writer.write_all(config("/first").as_bytes()).unwrap();
    drop(writer);
    p.line("configuration reloaded").await;
    p.line("configuration reloaded").await;
    assert!(routed("/newest").await && !routed("/first").await && !routed("/old").await);

    // Stuck again, and a shutdown meanwhile: the drain does not wait for the file.
    fifo_in_place();
    p.signal("HUP").await;
    let writer = reader_came().await;
    p.signal("TERM").await;
    p.line("shutting down with a reload unfinished").await;
    p.line("stopped clean=true remaining=0").await;
    let status = within("wsbridge to exit with its reload unfinished", p.child.wait()).await.unwrap();
    assert!(status.success(), "{status:?}");
    drop(writer);
}

/// A certificate file a TOML `[listen.tls]` names that does not exist: the error names the
/// configuration file, the line and the field that name the certificate, as `wsbridge check`
/// does; exit 64.
#[tokio::test]
async fn a_missing_certificate_names_the_config_file_and_the_listener() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wsbridge.toml");
    let cert = dir.path().join("missing/fullchain.pem");
    std::fs::write(
        &config,
        format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\n[listen.tls]\ncert = {:?}\nkey = {:?}\n\n\
             [[route]]\npath = \"/ws\"\ntarget = \"127.0.0.1:9\"\n",
            cert.to_str().unwrap(),
            dir.path().join("missing/privkey.pem").to_str().unwrap()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let cert = cert.to_str().unwrap();
    for args in [&["--config", config][..], &["check", "--config", config][..]] {
        let out = within("wsbridge to exit", Command::new(BIN).args(args).output()).await.unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        let first = err.lines().find(|l| l.contains(cert)).unwrap_or_else(|| panic!("{args:?}: {err}"));
        assert!(
            first.starts_with(&format!("wsbridge: {config}:4: listen[0].tls.cert: {cert}: No such file")),
            "{args:?}: {first}"
        );
    }
}

/// A reload that fails on a broken file logs the parser's multi-line message readably: one
/// record per line, no `\n` escapes, the snippet's lines intact and in order.
#[tokio::test]
async fn a_failed_reload_logs_one_readable_record_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wsbridge.toml");
    let config = |framing: &str| {
        format!("[[listen]]\naddr = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/ws\"\ntarget = \"127.0.0.1:9\"\nframing = \"{framing}\"\n")
    };
    std::fs::write(&file, config("binary")).unwrap();
    let mut p = Process::spawn(&["--config", file.to_str().unwrap()]);
    p.listening().await;
    std::fs::write(&file, config("morse")).unwrap();
    p.signal("HUP").await;
    let (first, _) = p.line("reload failed").await;
    assert!(first.contains("ERROR") && first.contains(file.to_str().unwrap()), "{first}");
    let mut records = Vec::new();
    while !records.last().is_some_and(|l: &String| l.contains("unknown variant")) {
        records.push(p.line("reload failed: ").await.0);
    }
    let text: Vec<&str> = records.iter().map(|l| l.split("reload failed: ").nth(1).unwrap()).collect();
    assert!(records.iter().all(|l| l.contains("ERROR") && !l.contains("\\n")), "{records:#?}");
    assert!(text[0].contains("line 7"), "{text:#?}");
    // The snippet as the parser wrote it, its caret under the value.
    let value = text.iter().position(|l| *l == "7 | framing = \"morse\"").expect("the snippet line");
    assert_eq!(text[value + 1].trim_end(), "  |           ^^^^^^^", "{text:#?}");
    assert!(text.last().unwrap().contains("unknown variant `morse`"), "{text:#?}");
}

/// Lines from a chat connection, one at a time, each within [`WAIT`].
struct ChatClient {
    read: tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    write: tokio::net::tcp::OwnedWriteHalf,
}

impl ChatClient {
    async fn connect(addr: std::net::SocketAddr) -> ChatClient {
        let (read, write) = tokio::net::TcpStream::connect(addr).await.unwrap().into_split();
        ChatClient {
            read: BufReader::new(read).lines(),
            write,
        }
    }

    async fn line(&mut self) -> String {
        within("a chat line", self.read.next_line())
            .await
            .unwrap()
            .expect("chat server closed")
    }

    /// Reads lines up to the one equal to `want`.
    async fn until(&mut self, want: &str) {
        within(&format!("chat line {want:?}"), async {
            while let Some(line) = self.read.next_line().await.unwrap() {
                if line == want {
                    return;
                }
            }
            panic!("chat server closed before {want:?}");
        })
        .await
    }

    async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.write.write_all(bytes).await.unwrap();
    }
}

/// The bytes waiting in the receive queue of the server end of `client` (from /proc/net/tcp):
/// zero once the server has read what the client sent. `None` if the socket is not listed.
fn server_rx_queue(client: &ChatClient) -> Option<u64> {
    let (local, peer) = (client.write.local_addr().unwrap(), client.write.peer_addr().unwrap());
    let hex = |a: std::net::SocketAddr| match a.ip() {
        std::net::IpAddr::V4(ip) => format!("{:08X}:{:04X}", u32::from_le_bytes(ip.octets()), a.port()),
        std::net::IpAddr::V6(_) => unreachable!("the chat server is on 127.0.0.1"),
    };
    // The server end: its local address is the client's peer and the other way round.
    let (ours, theirs) = (hex(peer), hex(local));
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|row| {
        let f: Vec<&str> = row.split_whitespace().collect();
        (f.get(1) == Some(&ours.as_str()) && f.get(2) == Some(&theirs.as_str()))
            .then(|| u64::from_str_radix(f[4].split(':').nth(1)?, 16).ok())
            .flatten()
    })
}

/// Item 10: a line that arrives in pieces, with another member's message broadcast while its
/// first piece sits in the chat server, reaches the room whole. The first piece is known to be
/// in the server (not in a socket) when the server end's receive queue is empty again.
#[tokio::test]
async fn a_chat_line_in_pieces_survives_a_broadcast_in_between() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let chat = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    wsbridge::demo::spawn_chat_server(listener, shutdown.clone());
    let mut a = ChatClient::connect(chat).await;
    a.until("* guest-1 joined").await;
    let mut b = ChatClient::connect(chat).await;
    b.until("* guest-2 joined").await;
    a.until("* guest-2 joined").await;

    a.send(b"hel").await;
    // On loopback the piece is in the server end's queue when the write returns; the queue
    // empties when the chat server reads it.
    within("the chat server to read the first piece", async {
        while server_rx_queue(&a).expect("the server end in /proc/net/tcp") != 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    b.send(b"hi\n").await;
    assert_eq!(a.line().await, "guest-2: hi");
    a.send(b"lo\n").await;
    assert_eq!(b.line().await, "guest-2: hi");
    assert_eq!(b.line().await, "guest-1: hello");
    shutdown.cancel();
}

/// Item 18: the command the demo prints for a terminal joins the room, on a machine with bash
/// and nothing else (no nc).
#[tokio::test]
async fn the_demo_prints_a_terminal_command_that_joins_the_chat() {
    let mut demo = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(demo.stdout.take().unwrap()).lines();
    let command = within("the demo's join command", async {
        while let Some(line) = out.next_line().await.unwrap() {
            if let Some(command) = line.trim_start().strip_prefix("bash -c ") {
                return format!("bash -c {command}");
            }
        }
        panic!("the demo printed no bash command");
    })
    .await;
    assert!(command.starts_with("bash -c 'exec 3<>/dev/tcp/127.0.0.1/"), "{command}");
    // As a user would paste it into a shell.
    let mut shell = Command::new("sh")
        .args(["-c", &command])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut heard = BufReader::new(shell.stdout.take().unwrap()).lines();
    let welcome = within("the welcome", heard.next_line()).await.unwrap().unwrap();
    assert!(welcome.starts_with("* welcome, you are guest-"), "{welcome}");
    let me = welcome.rsplit(' ').next().unwrap().to_owned();
    let mut said = shell.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut said, b"hello from bash\n").await.unwrap();
    let want = format!("{me}: hello from bash");
    within("the line back from the room", async {
        while heard.next_line().await.unwrap().expect("the terminal command ended") != want {}
    })
    .await;
    // Ctrl-D leaves.
    drop(said);
    let status = within("the terminal command to exit", shell.wait()).await.unwrap();
    assert!(status.success(), "{status:?}");
    // SIGTERM, not the kill on drop: the demo removes its web root as it exits.
    let pid = demo.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-s", "TERM", &pid]).status().await.unwrap().success());
    assert!(within("the demo to exit", demo.wait()).await.unwrap().success());
}

/// Item 18: `examples/embed.rs` does what it says: every path on its listener goes to the target,
/// and Ctrl-C stops it. Cargo builds examples for `cargo test --all-targets` (scripts/test.sh)
/// but not for `--test integration` alone: then this test is skipped, saying so.
#[tokio::test]
async fn the_embed_example_routes_every_path() {
    let example = std::path::Path::new(BIN).with_file_name("examples").join("embed");
    if !example.exists() {
        return skip(
            "the_embed_example_routes_every_path",
            &format!("{} is not built (cargo test --all-targets builds it)", example.display()),
        );
    }
    let (backend, _) = echo_backend().await;
    let mut embed = Command::new(&example)
        .args(["127.0.0.1:0", &backend.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(embed.stdout.take().unwrap()).lines();
    let first = within("the example's first line", out.next_line()).await.unwrap().unwrap();
    let addr = first
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("{first}"));
    for path in ["/", "/ws", "/websockify", "/any/other/path"] {
        let (mut ws, _) = ws_connect(&format!("ws://{addr}{path}"), None).await;
        send_bin(&mut ws, path.as_bytes()).await;
        assert_eq!(recv_data(&mut ws).await, path.as_bytes(), "{path}");
    }
    let pid = embed.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-s", "INT", &pid]).status().await.unwrap().success());
    let last = within("the example's last line", out.next_line()).await.unwrap();
    assert_eq!(last.as_deref(), Some("stopped (clean: true)"));
    assert!(within("the example to exit", embed.wait()).await.unwrap().success());
}

/// Item 17: scripts/test.sh ends on one line over every target, `N passed, N failed, N skipped`,
/// from scripts/test-summary.sh: the targets' `test result:` lines summed, tests that printed
/// the skip line (tests/common's convention, once however often printed) and #[ignore]d ones
/// counted as skipped, not passed. Fed a log of the shape `cargo test -- --show-output` writes.
#[tokio::test]
async fn the_test_summary_counts_every_target_and_the_skipped() {
    let log = "\
     Running unittests src/lib.rs (target/debug/deps/wsbridge-0123)

running 3 tests
test a ... ok
test b ... ignored
test c ... ok

successes:

successes:
    a
    c

test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s

     Running tests/integration/main.rs (target/debug/deps/integration-4567)

running 6 tests
test routing::ipv6 ... ok
test process::embed ... ok
test relay::x ... FAILED

successes:

---- routing::ipv6 stdout ----
ipv6_listener_and_target skipped: no IPv6 loopback here

---- process::embed stdout ----
the_embed_example_routes_every_path skipped: examples/embed is not built
* 3 lines skipped

failures:

---- relay::x stdout ----
thread 'relay::x' panicked at tests/integration/relay.rs:1:1

test result: FAILED. 5 passed; 1 failed; 0 ignored; 0 measured; 81 filtered out; finished in 2.05s

     Running tests/browser.rs (target/debug/deps/browser-89ab)

---- demo_chat_round_trip_in_chromium stdout ----
demo_chat_round_trip_in_chromium skipped: WSBRIDGE_SKIP_BROWSER=1
demo_chat_round_trip_in_chromium skipped: WSBRIDGE_SKIP_BROWSER=1

test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s

     Running unittests examples/embed.rs (target/debug/examples/embed-cdef)

running 0 tests

test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s
";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cargo-test.log");
    std::fs::write(&file, log).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-summary.sh");
    let out = within("test-summary.sh", Command::new("bash").arg(script).arg(&file).output())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    // 9 reported passed, of which 3 skipped themselves; 1 ignored.
    assert_eq!(stdout, "6 passed, 1 failed, 4 skipped\n");
}

/// Item 19: what the README's quick start says of listen addresses holds: a bare port listens on
/// every interface, an address on that one only.
#[tokio::test]
async fn a_bare_port_listens_on_every_interface_and_an_address_on_that_one() {
    let mut p = Process::spawn(&["0", "127.0.0.1:9"]);
    let addr = p.listening().await;
    assert_eq!(addr.ip(), std::net::Ipv4Addr::UNSPECIFIED, "{addr}");
    let mut p = Process::spawn(&["127.0.0.1:0", "127.0.0.1:9"]);
    let addr = p.listening().await;
    assert_eq!(addr.ip(), std::net::Ipv4Addr::LOCALHOST, "{addr}");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(readme.contains("listens on every interface") && readme.contains("wsbridge 127.0.0.1:6080"));
    assert!(
        readme.contains("cargo install --path ."),
        "the README says how to put wsbridge on the PATH"
    );
}

/// Item 19: the licenses Cargo.toml names are in the repository, as the README says.
#[test]
fn the_licenses_cargo_toml_names_are_in_the_repository() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(manifest.contains("license = \"MIT OR Apache-2.0\""), "Cargo.toml's license changed");
    for (file, heading) in [
        ("LICENSE-MIT", "MIT License"),
        (
            "LICENSE-APACHE",
            "Apache License\n                           Version 2.0, January 2004",
        ),
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(text.contains(heading), "{file} is not the standard text");
    }
    let mit = std::fs::read_to_string(root.join("LICENSE-MIT")).unwrap();
    assert!(mit.contains("Copyright (c) the wsbridge developers"), "{mit}");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.contains("(LICENSE-APACHE)") && readme.contains("(LICENSE-MIT)"));
}

/// The demo's page directory goes when the demo does, also when it cannot start (here: a
/// certificate that does not exist, exit 64).
#[tokio::test]
async fn a_demo_that_cannot_start_leaves_no_page_behind() {
    let mut demo = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0", "--cert", "/nonexistent/cert.pem"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = demo.id().unwrap();
    let mut err = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut demo.stderr.take().unwrap(), &mut err)
        .await
        .unwrap();
    let status = within("the demo to exit", demo.wait()).await.unwrap();
    assert_eq!(status.code(), Some(64), "{err}");
    assert!(err.contains("/nonexistent/cert.pem: cannot read"), "{err}");
    let prefix = format!("wsbridge-demo-{pid}-");
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// `wsbridge ARGS` with `RUST_LOG` as given (unset with `None`), whose stderr the test reads
/// itself (or leaves unread): the child, its stderr, and the address in the first line with each
/// of `prefixes` (`listening addr=`, …), read in the order the lines come. Its stdout is piped,
/// for a look at what it says there (nothing).
async fn spawn_reading(
    args: &[&str],
    rust_log: Option<&str>,
    prefixes: &[&str],
) -> (Child, BufReader<tokio::process::ChildStderr>, Vec<String>) {
    let mut command = Command::new(BIN);
    command.args(args);
    match rust_log {
        Some(filter) => command.env("RUST_LOG", filter),
        None => command.env_remove("RUST_LOG"),
    };
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut found: Vec<Option<String>> = vec![None; prefixes.len()];
    within("the listening lines", async {
        let mut line = String::new();
        while found.iter().any(Option::is_none) {
            line.clear();
            assert!(stderr.read_line(&mut line).await.unwrap() > 0, "stderr ended");
            for (prefix, slot) in prefixes.iter().zip(&mut found) {
                if let (None, Some(rest)) = (&slot, line.split(prefix).nth(1)) {
                    *slot = rest.split_whitespace().next().map(str::to_owned);
                }
            }
        }
    })
    .await;
    (child, stderr, found.into_iter().map(Option::unwrap).collect())
}

/// A stderr that stops taking lines (a Windows console with text selected in it, a terminal
/// paused with Ctrl-S, a pipe nobody reads) holds back the log, not the sessions: at `-vv` every
/// frame is a line, and a session echoes 5,000 messages (some 20,000 lines) while nobody reads
/// the 64 KiB pipe; the lines past the 10,000 held are dropped and counted; read again, the log
/// goes on. (The log was written on the threads that serve the sessions: they stopped at the
/// pipe's first 64 KiB.)
#[tokio::test]
async fn a_stderr_nobody_reads_holds_back_the_log_not_the_sessions() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (backend, _) = echo_backend().await;
    let args = ["-vv", "127.0.0.1:0", &backend.to_string(), "--admin", "127.0.0.1:0"];
    let (_child, mut stderr, found) = spawn_reading(&args, None, &["listening addr=", "admin endpoints serving addr="]).await;
    let (addr, admin) = (&found[0], &found[1]);
    let mut line = String::new();
    // From here on nobody reads stderr until the session is done.
    let (mut ws, _) = ws_connect(&format!("ws://{addr}/"), None).await;
    let message = vec![b'x'; 100];
    within("5,000 echoes while stderr is not read", async {
        for _ in 0..5_000 {
            ws.send(Message::binary(message.clone())).await.unwrap();
            match ws.next().await {
                Some(Ok(Message::Binary(got))) => assert_eq!(got.len(), message.len()),
                other => panic!("echo: {other:?}"),
            }
        }
    })
    .await;
    ws.close(None).await.unwrap();
    // Past the 10,000 lines held, lines were dropped, and counted.
    let scrape = http_raw(admin.parse().unwrap(), b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
    let dropped: u64 = scrape
        .lines()
        .find_map(|l| l.strip_prefix("wsbridge_log_lines_dropped_total "))
        .unwrap_or_else(|| panic!("no log_lines_dropped_total in {scrape}"))
        .trim()
        .parse()
        .unwrap();
    assert!(dropped > 0, "{scrape}");
    // Read again: the log goes on (the held lines first; this session's close may have been
    // dropped), and the next session's lines come.
    // The drop is said too, with the number dropped, once stderr took the held lines.
    let reading = tokio::spawn(async move {
        let (mut said, mut next) = (false, false);
        while !(said && next) {
            line.clear();
            assert!(stderr.read_line(&mut line).await.unwrap() > 0, "stderr ended");
            said |=
                line.contains("WARN wsbridge::logging::stderr: log lines dropped: stderr did not take them") && line.contains(" dropped=");
            next |= line.contains("session=2 ") && line.contains("session closed");
        }
    });
    let (mut ws, _) = ws_connect(&format!("ws://{addr}/"), None).await;
    ws.close(None).await.unwrap();
    within("the next session's close in the log", reading).await.unwrap();
}

/// At exit the log's held lines are all written to a stderr that takes them slowly (a slow
/// console, an ssh link): a drain's last lines were cut after a second, and a full queue made the
/// writer's library print on stdout. Some 3,000 lines are held (at -vv, a session's frames while
/// nobody reads stderr), SIGTERM comes, and stderr is then read at about 160 KB/s: the last line,
/// `stopped`, arrives, the exit is 0, and stdout stays empty.
#[tokio::test]
async fn at_exit_a_slow_stderr_gets_every_held_line() {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::AsyncReadExt as _;
    use tokio_tungstenite::tungstenite::Message;
    let (backend, _) = echo_backend().await;
    let (mut child, mut stderr, found) = spawn_reading(&["-vv", "127.0.0.1:0", &backend.to_string()], None, &["listening addr="]).await;
    let addr = &found[0];
    let mut stdout = child.stdout.take().unwrap();
    let (mut ws, _) = ws_connect(&format!("ws://{addr}/"), None).await;
    within("800 echoes while stderr is not read", async {
        for _ in 0..800 {
            ws.send(Message::binary(vec![b'x'; 100])).await.unwrap();
            assert!(matches!(ws.next().await, Some(Ok(Message::Binary(_)))));
        }
    })
    .await;
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-s", "TERM", &pid]).status().await.unwrap().success());
    // A slow reader: 8 KiB, then a pause, until stderr ends.
    let mut text = Vec::new();
    let mut chunk = vec![0u8; 8 * 1024];
    let read = async {
        loop {
            match stderr.read(&mut chunk).await.unwrap() {
                0 => break,
                n => text.extend_from_slice(&chunk[..n]),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read).await.expect("stderr to end");
    let status = within("the exit", child.wait()).await.unwrap();
    let text = String::from_utf8_lossy(&text);
    let lines = text.lines().count();
    assert!(lines > 2_000, "{lines} lines: the held ones were to come");
    assert!(
        text.lines().last().unwrap_or_default().contains("stopped clean="),
        "{lines} lines, the last: {:?}",
        text.lines().last()
    );
    assert_eq!(status.code(), Some(0));
    let mut out = String::new();
    stdout.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "", "nothing on stdout");
}

/// At `RUST_LOG=warn` a session's warning still names its connection (client, route, target,
/// session id): the connection's span is enabled at every level (it was at info, and the line
/// came without it).
#[tokio::test]
async fn a_warning_keeps_its_connections_fields_at_warn_level() {
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let filter = Some("warn,wsbridge::server::start=info");
    let (_child, mut stderr, found) = spawn_reading(&["127.0.0.1:0", &refused.to_string()], filter, &["listening addr="]).await;
    let addr = &found[0];
    let mut line = String::new();
    let mut next_line = async || {
        line.clear();
        assert!(stderr.read_line(&mut line).await.unwrap() > 0, "stderr ended");
        line.clone()
    };
    let _ = http_raw(addr.parse().unwrap(), &upgrade_request("/", "")).await;
    let failed = within("the session's warning", async {
        loop {
            let l = next_line().await;
            if l.contains("session failed") {
                break l;
            }
        }
    })
    .await;
    assert!(failed.contains(" WARN conn{client=127.0.0.1:"), "{failed}");
    assert!(failed.contains(&format!("target={refused} session=1}}:")), "{failed}");
}
