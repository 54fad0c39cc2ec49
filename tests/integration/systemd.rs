//! systemd without systemd: the binary gets listening sockets as descriptors 3.. with
//! `LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES` as systemd sets them, and a datagram socket of the
//! test's as `NOTIFY_SOCKET`, read the way systemd reads it. Also `--unix-listen`.
//!
//! Descriptors reach the child without `unsafe`: the test hands the sockets over as the child's
//! stdin and stdout, and a `sh` wrapper moves them to 3 and 4 and sets `LISTEN_PID` to its own pid
//! before it `exec`s wsbridge (the pid stays the same across `exec`, as systemd's fork does).

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Stdio;

use futures_util::StreamExt as _;
use tokio::net::UnixDatagram;
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message;

use crate::common::binary::{Binary, BIN};
use crate::common::{echo_backend, pattern, recv_data, send_bin, within};

/// Moves stdin to descriptor 3 and stdout to 4 (when `fds` is 2), points both at /dev/null, sets
/// `LISTEN_PID` to the shell's pid and execs `$0 "$@"`.
fn wrapper(fds: usize) -> String {
    let moves = match fds {
        1 => "exec 3<&0 0</dev/null",
        2 => "exec 3<&0 4>&1 0</dev/null 1>/dev/null",
        _ => unreachable!("the wrapper passes one or two sockets"),
    };
    format!("{moves}; LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"")
}

/// wsbridge ARGS started by systemd's rules with `sockets` as descriptors 3.. named `names`.
fn activated(sockets: Vec<OwnedFd>, names: &str, args: &[&str]) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(wrapper(sockets.len()))
        .arg(BIN)
        .args(args)
        .env("LISTEN_FDS", sockets.len().to_string())
        .env("LISTEN_FDNAMES", names)
        .env_remove("NOTIFY_SOCKET");
    let mut sockets = sockets.into_iter();
    command.stdin(Stdio::from(sockets.next().expect("one socket")));
    command.stdout(sockets.next().map_or_else(Stdio::null, Stdio::from));
    command
}

/// A configuration file in `dir` with `listen` tables and one route for every path to `target`.
fn config_file(dir: &Path, listeners: &[&str], target: std::net::SocketAddr) -> std::path::PathBuf {
    let mut text = String::new();
    for l in listeners {
        text.push_str(&format!("[[listen]]\naddr = \"{l}\"\norigins = [\"*\"]\n\n"));
    }
    text.push_str(&format!("[[route]]\npath = \"*\"\ntarget = \"{target}\"\n"));
    let path = dir.join("wsbridge.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A WebSocket session on `ws` that sends `len` bytes and reads them back through the echo
/// backend, byte for byte.
async fn echo_through<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, len: usize, seed: u8)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let data = pattern(len, seed);
    send_bin(ws, &data).await;
    let mut back = Vec::new();
    while back.len() < data.len() {
        back.extend(recv_data(ws).await);
    }
    assert!(back == data, "{} bytes came back, not the {} sent", back.len(), data.len());
}

async fn signal(b: &Binary, name: &str) {
    let status = Command::new("kill")
        .args(["-s", name, &b.pid().to_string()])
        .status()
        .await
        .unwrap();
    assert!(status.success(), "kill -s {name}");
}

#[tokio::test]
async fn passed_sockets_serve_the_listeners_that_name_them() {
    let (backend, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), &["systemd:public", "systemd:internal"], backend);
    // Bound by the "service manager" (the test); wsbridge never binds these ports.
    let public = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let internal = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (public_addr, internal_addr) = (public.local_addr().unwrap(), internal.local_addr().unwrap());
    // The names in the other order from the listeners: the names decide, not the order.
    let command = activated(
        vec![OwnedFd::from(internal), OwnedFd::from(public)],
        "internal:public",
        // Two runtime threads share each passed socket.
        &["--config", config.to_str().unwrap(), "--threads", "2"],
    );
    let mut b = Binary::start(command);
    let line = b.line("systemd=public").await;
    assert!(line.contains(&format!("addr={public_addr}")) && line.contains("fd=4"), "{line}");
    let line = b.line("systemd=internal").await;
    assert!(line.contains(&format!("addr={internal_addr}")) && line.contains("fd=3"), "{line}");
    for (i, addr) in [public_addr, internal_addr].into_iter().enumerate() {
        let (mut ws, _) = crate::common::ws_connect(&format!("ws://{addr}/"), None).await;
        echo_through(&mut ws, 100_000, i as u8).await;
    }
    signal(&b, "TERM").await;
    let status = within("wsbridge to exit", b.child.wait()).await.unwrap();
    assert!(status.success(), "{status:?}: {:?}", b.lines());
}

/// The cases an operator gets wrong, each a prompt exit 64 with a message that names it.
#[tokio::test]
async fn socket_activation_mistakes_are_named() {
    let (backend, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), &["systemd:web"], backend);
    let config = config.to_str().unwrap();
    let run = |command: Command| async move {
        let mut command = command;
        let out = within("wsbridge to exit", command.stderr(Stdio::piped()).output()).await.unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let socket = || OwnedFd::from(std::net::TcpListener::bind("127.0.0.1:0").unwrap());

    // A socket no listener names.
    let (code, err) = run(activated(vec![socket()], "admin", &["--config", config])).await;
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("descriptor 3 named \"admin\"") && err.contains("addr = \"systemd:admin\""),
        "{err}"
    );
    // A listener whose socket was not passed.
    let mut plain = Command::new(BIN);
    plain.args(["--config", config]).env_remove("LISTEN_FDS").env_remove("LISTEN_PID");
    let (code, err) = run(plain).await;
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("listener systemd:web: systemd passed no socket named \"web\""),
        "{err}"
    );
    // Malformed variables.
    let mut bad = activated(vec![socket()], "web", &["--config", config]);
    bad.env("LISTEN_FDS", "one");
    let (code, err) = run(bad).await;
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("LISTEN_FDS=\"one\" is not a number"), "{err}");
    let (code, err) = run(activated(vec![socket(), socket()], "web", &["--config", config])).await;
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("LISTEN_FDNAMES=\"web\" names 1 sockets, but LISTEN_FDS=2"), "{err}");
    // A descriptor that is not a listening stream socket (a UDP socket here).
    let udp = OwnedFd::from(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
    let (code, err) = run(activated(vec![udp], "web", &["--config", config])).await;
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("descriptor 3 (named \"web\") is not a listening TCP or unix stream socket"),
        "{err}"
    );
    // A connected TCP socket (what a socket unit with Accept=yes passes).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let connected = OwnedFd::from(std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap());
    let (code, err) = run(activated(vec![connected], "web", &["--config", config])).await;
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("a connected socket, not a listening one (Accept=yes"), "{err}");
}

/// Reads the next notification, skipping the watchdog's pings (counted in `pings`).
async fn next_notification(socket: &UnixDatagram, pings: &mut usize) -> String {
    within("a notification", async {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = socket.recv(&mut buf).await.unwrap();
            let text = String::from_utf8(buf[..n].to_vec()).unwrap();
            if text == "WATCHDOG=1\n" {
                *pings += 1;
                continue;
            }
            return text;
        }
    })
    .await
}

#[tokio::test]
async fn the_notify_socket_hears_ready_reloading_and_stopping() {
    let (backend, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), &["127.0.0.1:0"], backend);
    let notify_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&notify_path).unwrap();
    let mut command = Command::new(BIN);
    command
        .args(["--config", config.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &notify_path)
        // WatchdogSec=200ms: a ping at least every 100 ms.
        .env("WATCHDOG_USEC", "200000")
        .env_remove("LISTEN_FDS")
        .stdout(Stdio::null());
    let mut b = Binary::start(command);
    let mut pings = 0;

    let ready = next_notification(&socket, &mut pings).await;
    assert_eq!(ready, "READY=1\nSTATUS=serving 1 listener, 0 connections open\n");
    // READY=1 means bound: the listening line came first and the port takes connections.
    let line = b.line("listening addr=").await;
    let addr = line.split("listening addr=").nth(1).unwrap().split_whitespace().next().unwrap();
    let (mut ws, _) = crate::common::ws_connect(&format!("ws://{addr}/"), None).await;
    echo_through(&mut ws, 1000, 1).await;

    signal(&b, "HUP").await;
    let reloading = next_notification(&socket, &mut pings).await;
    let mut lines = reloading.lines();
    assert_eq!(lines.next(), Some("RELOADING=1"), "{reloading}");
    let usec: u128 = lines
        .next()
        .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("MONOTONIC_USEC after RELOADING=1: {reloading}"));
    assert!(usec > 0);
    let ready = next_notification(&socket, &mut pings).await;
    assert!(ready.starts_with("READY=1\nSTATUS=reloaded"), "{ready}");
    b.line("configuration reloaded").await;

    // A reload that fails says so in `systemctl status`, not "reloaded".
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{good}\nnot toml\n")).unwrap();
    signal(&b, "HUP").await;
    assert!(next_notification(&socket, &mut pings).await.starts_with("RELOADING=1"));
    let ready = next_notification(&socket, &mut pings).await;
    assert!(
        ready.starts_with("READY=1\nSTATUS=reload failed, the previous configuration serves"),
        "{ready}"
    );

    signal(&b, "TERM").await;
    let stopping = next_notification(&socket, &mut pings).await;
    assert_eq!(stopping, "STOPPING=1\nSTATUS=draining: 1 connection open\n");
    // The session is closed with 1001 and the process exits.
    let (code, _) = crate::common::read_close(&mut ws).await;
    assert_eq!(code, 1001);
    drop(ws);
    let status = within("wsbridge to exit", b.child.wait()).await.unwrap();
    assert!(status.success(), "{status:?}");
    assert!(pings >= 1, "no WATCHDOG=1 with WATCHDOG_USEC set");
}

#[tokio::test]
async fn unix_listen_relays_byte_exact_both_ways() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let (backend, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ws.sock");
    // A stale socket file, as a killed run leaves it: replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_socket());
    let mut command = Command::new(BIN);
    command
        .args([
            "--unix-listen",
            path.to_str().unwrap(),
            "--unix-listen-mode",
            "660",
            &backend.to_string(),
        ])
        .stdout(Stdio::null());
    let mut b = Binary::start(command);
    let line = b.line("listening addr=").await;
    assert!(
        line.contains(&format!("addr=unix:{}", path.display())) && line.contains("mode=0660"),
        "{line}"
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);

    let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    let (ws, _) = within(
        "upgrade over the unix socket",
        tokio_tungstenite::client_async("ws://localhost/", stream),
    )
    .await
    .expect("upgrade");
    // Both ways at once: the whole pattern goes up while the echo comes down.
    let data = pattern(1 << 20, 7);
    let (mut tx, mut rx) = ws.split();
    let up = async {
        for chunk in data.chunks(64 * 1024) {
            send_bin(&mut tx, chunk).await;
        }
        tx
    };
    let down = async {
        let mut back = Vec::new();
        while back.len() < data.len() {
            back.extend(recv_data(&mut rx).await);
        }
        back
    };
    let (tx, back) = tokio::join!(up, down);
    assert!(back == data, "{} bytes came back, not the {} sent", back.len(), data.len());

    signal(&b, "TERM").await;
    let mut ws = tx.reunite(rx).unwrap();
    let code = within("a close frame", async {
        loop {
            match ws.next().await.expect("a close frame").expect("read") {
                Message::Close(f) => return f.map(|f| u16::from(f.code)),
                Message::Binary(_) | Message::Text(_) => panic!("data after the echo"),
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(code, Some(1001));
    drop(ws);
    let status = within("wsbridge to exit", b.child.wait()).await.unwrap();
    assert!(status.success(), "{status:?}");
    // The session's record names the unix client as such.
    let line = b.line("session closed").await;
    assert!(line.contains("client=unix"), "{line}");
    assert!(!path.exists(), "the socket file is removed at exit");

    // A path that is some other file is never removed.
    std::fs::write(&path, "not a socket").unwrap();
    let out = within(
        "wsbridge to exit",
        Command::new(BIN)
            .args(["--unix-listen", path.to_str().unwrap(), &backend.to_string()])
            .output(),
    )
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("exists and is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
}

/// The example units are ones systemd accepts: `systemd-analyze verify`, with ExecStart pointed
/// at the binary under test (verify checks that it exists).
#[tokio::test]
async fn the_example_units_verify() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let dir = tempfile::tempdir().unwrap();
    let units = ["wsbridge.socket", "wsbridge.service", "agent/wsbridge-agent.service"];
    for unit in units {
        let text = std::fs::read_to_string(examples.join(unit)).unwrap();
        let name = Path::new(unit).file_name().unwrap();
        std::fs::write(dir.path().join(name), text.replace("/usr/bin/wsbridge", BIN)).unwrap();
    }
    let verify = Command::new("systemd-analyze")
        // The manual page is not installed where the tests run.
        .args(["verify", "--man=no"])
        .args(units.map(|u| dir.path().join(Path::new(u).file_name().unwrap())))
        .output();
    let out = match within("systemd-analyze verify", verify).await {
        Ok(out) => out,
        Err(e) => return crate::common::skip("the_example_units_verify", &format!("no systemd-analyze here ({e})")),
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
}

/// A unix client counts as 127.0.0.1: a route's `allow` networks see that address, and with
/// `trusted_proxies = ["127.0.0.1/32"]` the X-Forwarded-For of the proxy in front names the
/// client instead.
#[tokio::test]
async fn unix_clients_count_as_loopback_for_policy() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (backend, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ws.sock");
    let config = dir.path().join("wsbridge.toml");
    std::fs::write(
        &config,
        format!(
            "[[listen]]\naddr = \"unix:{}\"\norigins = [\"*\"]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\n\
             [[route]]\npath = \"/local\"\ntarget = \"{backend}\"\nallow = [\"127.0.0.0/8\"]\n\n\
             [[route]]\npath = \"/office\"\ntarget = \"{backend}\"\nallow = [\"10.0.0.0/8\"]\n",
            path.display()
        ),
    )
    .unwrap();
    let mut command = Command::new(BIN);
    command.args(["--config", config.to_str().unwrap()]).stdout(Stdio::null());
    let mut b = Binary::start(command);
    b.line("listening addr=unix:").await;
    let status = |route: &'static str, extra: &'static str| {
        let path = path.clone();
        async move {
            let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
            s.write_all(&crate::common::upgrade_request(route, extra)).await.unwrap();
            let mut head = vec![0u8; 12];
            within("the status line", s.read_exact(&mut head)).await.unwrap();
            crate::common::status_of(&String::from_utf8_lossy(&head))
        }
    };
    assert_eq!(status("/local", "").await, 101);
    assert_eq!(status("/office", "").await, 403);
    assert_eq!(status("/office", "X-Forwarded-For: 10.1.2.3\r\n").await, 101);
    assert_eq!(status("/local", "X-Forwarded-For: 10.1.2.3\r\n").await, 403);
}

/// `wsbridge agent` under `Type=notify` (examples/agent/wsbridge-agent.service): READY=1 once
/// started, a STATUS= line at each change of its connections (one server up, one that cannot be
/// reached), STOPPING=1 at SIGTERM. Its secret comes from --secret-file as the unit passes it (a
/// systemd credential), in place of the file's secret_file, which this process could not read.
#[tokio::test]
async fn the_agent_tells_systemd_how_its_connections_are() {
    use crate::agent::{server_config, SECRET};
    let (echo, _) = echo_backend().await;
    let bridge = crate::common::TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let closed = crate::common::closed_port().await;
    let dir = tempfile::tempdir().unwrap();
    let credential = dir.path().join("credential");
    std::fs::write(&credential, format!("{SECRET}\n")).unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nserver = [\"ws://{}/agent\", \"ws://{closed}/agent\"]\nname = \"shop-17\"\n\
             secret_file = \"not-readable-here.secret\"\nproxy = \"off\"\n[agent.services]\npos = \"{echo}\"\n",
            bridge.addr
        ),
    )
    .unwrap();
    let notify_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&notify_path).unwrap();
    let mut command = Command::new(BIN);
    command
        .args([
            "agent",
            "--config",
            config.to_str().unwrap(),
            "--secret-file",
            credential.to_str().unwrap(),
        ])
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null());
    let mut b = Binary::start(command);
    let mut pings = 0;
    let up = format!("ws://{}/agent", bridge.addr);
    let down = format!("ws://{closed}/agent");
    let ready = next_notification(&socket, &mut pings).await;
    assert_eq!(
        ready,
        format!("READY=1\nSTATUS=agent shop-17: connected to 0 of 2 servers; {up}: connecting; {down}: connecting\n")
    );
    // Status lines follow the connections until one is up and the other waits to retry.
    let settled = within("the status to settle", async {
        loop {
            let status = next_notification(&socket, &mut pings).await;
            assert!(status.starts_with("STATUS=agent shop-17: "), "{status}");
            if status.contains("connected to 1 of 2 servers; ") && status.contains(&format!("{down}: retrying in ")) {
                return status;
            }
        }
    })
    .await;
    assert!(settled.contains("cannot reach the server"), "{settled}");
    let (mut ws, _) = crate::common::ws_connect(&bridge.url("/pos"), None).await;
    send_bin(&mut ws, b"through the service").await;
    assert_eq!(recv_data(&mut ws).await, b"through the service");
    drop(ws);
    // WatchdogSec=200ms: pings at least every 100 ms while it runs (the first at start).
    within("three watchdog pings", async {
        while pings < 3 {
            let n = next_notification_or_ping(&socket, &mut pings).await;
            assert!(n.as_deref().is_none_or(|n| n.starts_with("STATUS=")), "{n:?}");
        }
    })
    .await;
    signal(&b, "TERM").await;
    let stopping = within("STOPPING=1", async {
        loop {
            let n = next_notification(&socket, &mut pings).await;
            if n.starts_with("STOPPING=1") {
                return n;
            }
        }
    })
    .await;
    assert_eq!(stopping, "STOPPING=1\nSTATUS=stopping: live sessions finish\n");
    let status = within("the agent to exit", b.child.wait()).await.unwrap();
    assert!(status.success(), "{status:?}");
    // After STOPPING=1 no status line replaced its status (only pings may follow).
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = socket.try_recv(&mut buf) {
        assert_eq!(&buf[..n], b"WATCHDOG=1\n", "{}", String::from_utf8_lossy(&buf[..n]));
    }
}

/// One datagram: `None` for a watchdog ping (counted in `pings`), else its text.
async fn next_notification_or_ping(socket: &UnixDatagram, pings: &mut usize) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let n = socket.recv(&mut buf).await.unwrap();
    let text = String::from_utf8(buf[..n].to_vec()).unwrap();
    if text == "WATCHDOG=1\n" {
        *pings += 1;
        return None;
    }
    Some(text)
}
