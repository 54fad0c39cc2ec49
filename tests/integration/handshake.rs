//! HTTP answers before any upgrade, subprotocols, static files.

use std::sync::atomic::Ordering;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsbridge::config::{ListenerConfig, Matcher};

use crate::common::*;

#[tokio::test]
async fn http_errors_are_answered_and_open_no_backend() {
    let (backend, accepted) = echo_backend().await;
    let bridge = TestBridge::start(config_with(Matcher::Path("/vnc".into()), tcp(backend))).await;
    let a = bridge.addr;

    let r = http_raw(a, &upgrade_request("/nope", "")).await;
    assert_eq!(status_of(&r), 404, "{r}");
    assert!(r.contains("no such route") && !r.contains("/nope"), "{r}");

    let r = http_raw(a, b"GET /vnc HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status_of(&r), 426, "{r}");
    assert!(r.to_ascii_lowercase().contains("upgrade: websocket"), "{r}");
    // HEAD: the same answer without its body.
    let r = http_raw(a, b"HEAD /vnc HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status_of(&r), 426, "{r}");
    assert!(r.to_ascii_lowercase().contains("content-length: "), "{r}");
    assert!(r.ends_with("\r\n\r\n"), "a body after the head: {r}");
    let r = http_raw(a, b"HEAD /nope HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status_of(&r), 404, "{r}");
    assert!(r.ends_with("\r\n\r\n"), "a body after the head: {r}");

    let r = http_raw(a, b"POST /vnc HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").await;
    assert_eq!(status_of(&r), 405, "{r}");
    let post_upgrade = String::from_utf8(upgrade_request("/vnc", "")).unwrap().replacen("GET", "POST", 1);
    assert_eq!(status_of(&http_raw(a, post_upgrade.as_bytes()).await), 405);

    let no_key = b"GET /vnc HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n";
    assert_eq!(status_of(&http_raw(a, no_key).await), 400);
    let bad_key = String::from_utf8(upgrade_request("/vnc", ""))
        .unwrap()
        .replace("dGhlIHNhbXBsZSBub25jZQ==", "short");
    assert_eq!(status_of(&http_raw(a, bad_key.as_bytes()).await), 400);
    let no_connection = String::from_utf8(upgrade_request("/vnc", ""))
        .unwrap()
        .replace("Connection: Upgrade\r\n", "");
    assert_eq!(status_of(&http_raw(a, no_connection.as_bytes()).await), 400);

    // An upgrade with a body: its bytes would be read as the first frames after the 101, and by
    // a proxy in front that does not upgrade as its next request (planning list).
    for extra in ["Content-Length: 5\r\n", "Transfer-Encoding: chunked\r\n", "Content-Length: x\r\n"] {
        let mut with_body = upgrade_request("/vnc", extra);
        with_body.extend_from_slice(b"hello");
        let r = http_raw(a, &with_body).await;
        assert_eq!(status_of(&r), 400, "{extra}: {r}");
        assert!(r.contains("a WebSocket upgrade has no body"), "{r}");
    }

    let v12 = String::from_utf8(upgrade_request("/vnc", ""))
        .unwrap()
        .replace("Version: 13", "Version: 12");
    let r = http_raw(a, v12.as_bytes()).await;
    assert_eq!(status_of(&r), 426, "{r}");
    assert!(r.to_ascii_lowercase().contains("sec-websocket-version: 13"), "{r}");

    let huge = format!("GET /vnc HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(33 * 1024));
    assert_eq!(status_of(&http_raw(a, huge.as_bytes()).await), 431);
    let many: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET /vnc HTTP/1.1\r\n{many}\r\n");
    assert_eq!(status_of(&http_raw(a, many.as_bytes()).await), 431);

    assert_eq!(status_of(&http_raw(a, b"NOT HTTP AT ALL\r\n\r\n").await), 400);

    assert_eq!(accepted.load(Ordering::SeqCst), 0, "a rejected request opened a backend connection");
    for zero in ["0", "00", "0, 0"] {
        let r = http_head(a, &upgrade_request("/vnc", &format!("Content-Length: {zero}\r\n"))).await;
        assert_eq!(status_of(&r), 101, "an empty body is none: {zero}: {r}");
    }
    bridge.stop().await;
}

#[tokio::test]
async fn subprotocols() {
    let (backend, _) = echo_backend().await;
    let bridge = TestBridge::start(any_path_to(backend)).await;
    // `binary` anywhere in the list, spacing tolerated: echoed.
    let (_, chosen) = ws_connect(&bridge.url("/"), Some("base64 ,  binary")).await;
    assert_eq!(chosen.as_deref(), Some("binary"));
    // Nothing acceptable offered: no header, and the handshake still succeeds (websockify answers
    // 400 here). A raw request, since tungstenite's client refuses such an answer; browsers take it.
    let request = upgrade_request("/", "Sec-WebSocket-Protocol: chat, superchat\r\n");
    let (mut s, head) = raw_upgrade(bridge.addr, &request).await;
    assert!(!head.to_ascii_lowercase().contains("sec-websocket-protocol"), "{head}");
    s.write_all(&frame(0x82, b"still works", true)).await.unwrap();
    let mut echo = [0u8; 13];
    within("echo", s.read_exact(&mut echo)).await.unwrap();
    assert_eq!(&echo[2..], b"still works");
    // Nothing offered: no header.
    let (_, chosen) = ws_connect(&bridge.url("/"), None).await;
    assert_eq!(chosen, None);
}

#[tokio::test]
async fn route_subprotocols_are_configurable() {
    let (backend, _) = echo_backend().await;
    let mut config = any_path_to(backend);
    config.routes[0].options.subprotocols = vec!["tty".into()];
    let bridge = TestBridge::start(config).await;
    let (_, chosen) = ws_connect(&bridge.url("/"), Some("tty, binary")).await;
    assert_eq!(chosen.as_deref(), Some("tty"), "the client's first acceptable choice wins");
    // `binary` stays accepted whatever else a route names.
    let (_, chosen) = ws_connect(&bridge.url("/"), Some("binary")).await;
    assert_eq!(chosen.as_deref(), Some("binary"));
}

#[tokio::test]
async fn static_files_are_safe() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "<h1>hi</h1>").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/app.js"), "let x = 1;").unwrap();
    let outside = dir.path().parent().unwrap().join(format!("secret-{}", std::process::id()));
    std::fs::write(&outside, "secret").unwrap();

    let (backend, _) = echo_backend().await;
    let mut config = any_path_to(backend);
    let web = Some(dir.path().to_path_buf());
    config.listeners.push(ListenerConfig {
        web,
        ..ListenerConfig::new("127.0.0.1:0".parse().unwrap())
    });
    let bridge = TestBridge::start(config).await;
    let a = bridge.addr;

    let r = http_raw(a, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status_of(&r), 200, "{r}");
    assert!(r.ends_with("<h1>hi</h1>"), "{r}");
    let r = http_raw(a, b"GET /sub/app.js HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(r.contains("javascript") && r.ends_with("let x = 1;"), "{r}");
    let r = http_raw(a, b"HEAD /sub/app.js HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status_of(&r), 200);
    assert!(r.ends_with("\r\n\r\n"), "HEAD has no body: {r}");

    let name = outside.file_name().unwrap().to_str().unwrap();
    for path in [
        format!("/../{name}"),
        format!("/sub/../../{name}"),
        format!("/%2e%2e/{name}"),
        format!("/..%2f{name}"),
    ] {
        let r = http_raw(a, format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await;
        assert!(!r.contains("secret"), "{path} escaped the root: {r}");
        assert_ne!(status_of(&r), 200, "{path}");
    }
    // No listing by default.
    let r = http_raw(a, b"GET /sub/ HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status_of(&r), 404, "{r}");
    // An upgrade on any path still reaches the backend.
    let (mut ws, _) = ws_connect(&bridge.url("/websockify"), Some("binary")).await;
    send_bin(&mut ws, b"x").await;
    assert_eq!(recv_data(&mut ws).await, b"x");
    std::fs::remove_file(outside).unwrap();
}

#[tokio::test]
async fn directory_listing_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/a<b>.txt"), "x").unwrap();
    let (backend, _) = echo_backend().await;
    let mut config = any_path_to(backend);
    config.listeners.push(ListenerConfig {
        web: Some(dir.path().into()),
        web_listing: true,
        ..ListenerConfig::new("127.0.0.1:0".parse().unwrap())
    });
    let bridge = TestBridge::start(config).await;
    let r = http_raw(bridge.addr, b"GET /sub/ HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status_of(&r), 200, "{r}");
    assert!(r.contains("a&lt;b&gt;.txt"), "names are escaped: {r}");
    let r = http_raw(bridge.addr, b"GET /sub/../../ HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_ne!(status_of(&r), 200, "{r}");
}

#[tokio::test]
async fn a_static_file_outlives_the_handshake_deadline() {
    // Reading the request is bounded by the handshake deadline; writing the answer by the write
    // deadline: a large file to a client that starts reading late is not cut.
    let dir = tempfile::tempdir().unwrap();
    let big = pattern(16 << 20, 9);
    std::fs::write(dir.path().join("big.bin"), &big).unwrap();
    let (backend, _) = echo_backend().await;
    let mut config = any_path_to(backend);
    config.timeouts.handshake = std::time::Duration::from_millis(100);
    config.listeners.push(ListenerConfig {
        web: Some(dir.path().into()),
        ..ListenerConfig::new("127.0.0.1:0".parse().unwrap())
    });
    let bridge = TestBridge::start(config).await;
    let mut s = tokio::net::TcpStream::connect(bridge.addr).await.unwrap();
    s.write_all(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    // The slow client of the scenario starts reading only after the handshake deadline has passed
    // for its connection. The bridge's own clock says when: a second connection, accepted after
    // this one, that sends half a request and is dropped at its handshake deadline.
    let mut probe = tokio::net::TcpStream::connect(bridge.addr).await.unwrap();
    probe.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    closed_by_peer(&mut probe).await;
    let mut all = Vec::new();
    within("the whole file", s.read_to_end(&mut all)).await.unwrap();
    let body_at = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(all.len() - body_at, big.len());
    assert!(all[body_at..] == big[..]);
}
