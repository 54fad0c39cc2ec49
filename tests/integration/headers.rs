//! What a request's head decides before any route is looked up (Host, duplicate headers), what
//! the answers tell a client (nothing of the configuration), host and query tokens, and token
//! files as operators edit them.

use std::sync::atomic::Ordering;

use tokio::io::AsyncWriteExt;
use wsbridge::config::{Config, Matcher, RouteConfig, TokenLookup, TokenSourceConfig};

use crate::common::*;

/// `upgrade_request` with its `Host: localhost` line replaced by `host` (a whole line, or "").
fn with_host(path: &str, host: &str) -> Vec<u8> {
    String::from_utf8(upgrade_request(path, ""))
        .unwrap()
        .replace("Host: localhost\r\n", host)
        .into_bytes()
}

#[tokio::test]
async fn refusals_tell_the_client_nothing_of_the_configuration() {
    let (backend, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vnc-tokens.cfg");
    std::fs::write(&file, format!("secret-desk-token: 127.0.0.1:{}\n", backend.port())).unwrap();
    let mut config = Config::new("test");
    let mut options = config.default_route_options();
    options.max_sessions = Some(1);
    config.token_sources.push(TokenSourceConfig {
        jwt: None,
        redis: None,
        api: None,
        path: file.clone(),
        lookup: TokenLookup::Query,
        format: wsbridge::config::TokenFormat::Lines,
        options: options.clone(),
    });
    options.max_sessions = None;
    options.client_cn = Some(vec!["alice".into()]);
    config.routes.push(RouteConfig {
        matcher: Matcher::Path("/mtls-only-route".into()),
        target: tcp(backend),
        options,
    });
    let bridge = TestBridge::start(config).await;
    let a = bridge.addr;
    let (mut held, _) = ws_connect(&bridge.url("/?token=secret-desk-token"), None).await;
    send_bin(&mut held, b"1").await;
    assert_eq!(recv_data(&mut held).await, b"1");

    let answers = [
        (503, "too many sessions", upgrade_request("/?token=secret-desk-token", "")),
        (404, "unknown token", upgrade_request("/?token=secret-desk-tokeX", "")),
        (404, "no such route", upgrade_request("/no-such-secret-path", "")),
        (403, "forbidden", upgrade_request("/mtls-only-route", "")),
    ];
    let dir_name = dir.path().to_str().unwrap();
    for (status, says, request) in answers {
        let r = http_raw(a, &request).await;
        assert_eq!(status_of(&r), status, "{r}");
        let body = body_of(&r);
        assert!(body.contains(says), "{body:?}");
        for leak in [
            "secret",
            "vnc-tokens",
            dir_name,
            "mtls-only-route",
            "alice",
            "chars)",
            "token s",
            "path /",
        ] {
            assert!(!body.contains(leak), "{status} body tells {leak:?}: {body:?}");
        }
    }
    drop(held);
}

#[tokio::test]
async fn host_must_be_there_once_and_header_checks_come_before_the_lookup() {
    let (backend, accepted) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("t1: 127.0.0.1:{}\n", backend.port())).unwrap();
    let mut config = Config::new("test");
    add_token_source(&mut config, file, TokenLookup::Query);
    let bridge = TestBridge::start(config).await;
    let a = bridge.addr;

    let r = http_raw(a, &with_host("/?token=t1", "")).await;
    assert_eq!(status_of(&r), 400, "no Host: {r}");
    let r = http_raw(a, &with_host("/?token=t1", "Host: localhost\r\nHost: evil.example\r\n")).await;
    assert_eq!(status_of(&r), 400, "two Hosts: {r}");
    let twice = upgrade_request("/?token=t1", "Sec-WebSocket-Version: 13\r\n");
    let r = http_raw(a, &twice).await;
    assert_eq!(status_of(&r), 400, "two Sec-WebSocket-Version headers: {r}");
    // A plain HTTP/1.1 request without Host is refused too; HTTP/1.0 has no Host to require.
    assert_eq!(status_of(&http_raw(a, b"GET / HTTP/1.1\r\n\r\n").await), 400);
    assert_eq!(status_of(&http_raw(a, b"GET / HTTP/1.0\r\n\r\n").await), 404);

    // A malformed upgrade is answered for what it is (400), before its token is looked up (which
    // would have made it a 404).
    let bad_key = String::from_utf8(upgrade_request("/?token=unknown", ""))
        .unwrap()
        .replace("dGhlIHNhbXBsZSBub25jZQ==", "short");
    assert_eq!(status_of(&http_raw(a, bad_key.as_bytes()).await), 400);
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
    // The well-formed request still works.
    let (mut ws, _) = ws_connect(&bridge.url("/?token=t1"), None).await;
    send_bin(&mut ws, b"ok").await;
    assert_eq!(recv_data(&mut ws).await, b"ok");
}

#[tokio::test]
async fn host_tokens_match_without_case_or_port() {
    let (backend, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hosts");
    let p = backend.port();
    std::fs::write(
        &file,
        format!("desk1.example: 127.0.0.1:{p}\nDESK2.Example: 127.0.0.1:{p}\n[0:0::0:1]: 127.0.0.1:{p}\n"),
    )
    .unwrap();
    let mut config = Config::new("test");
    add_token_source(&mut config, file, TokenLookup::Host);
    let bridge = TestBridge::start(config).await;
    for host in [
        "Desk1.Example:6080",
        "desk1.example",
        "DESK1.EXAMPLE.",
        "desk2.example:443",
        "[::1]:6080",
        "[::1]",
    ] {
        let mut s = raw_ws_request(bridge.addr, &with_host("/", &format!("Host: {host}\r\n"))).await;
        s.write_all(&frame(0x82, b"hi", true)).await.unwrap();
        assert_eq!(raw_read_frame(&mut s).await, (0x2, b"hi".to_vec()), "{host}");
    }
    for host in ["desk3.example", "desk1.example.org", "desk1.example:port"] {
        let r = http_raw(bridge.addr, &with_host("/", &format!("Host: {host}\r\n"))).await;
        assert_eq!(status_of(&r), 404, "{host}: {r}");
    }
}

#[tokio::test]
async fn single_target_mode_ignores_a_token_in_the_query() {
    // noVNC with `path = websockify?token=…` in front of `wsbridge 6080 localhost:5900`, as
    // websockify does: the query is not looked at.
    let (backend, _) = echo_backend().await;
    let bridge = TestBridge::start(any_path_to(backend)).await;
    let (mut ws, _) = ws_connect(&bridge.url("/websockify?token=abc"), None).await;
    send_bin(&mut ws, b"through").await;
    assert_eq!(recv_data(&mut ws).await, b"through");
}

#[tokio::test]
async fn websockify_wrap_mode_is_refused_by_name() {
    let out = within(
        "wsbridge to exit",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_wsbridge"))
            .args(["127.0.0.1:0", "--", "vncserver", ":1"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("wrap mode"), "{stderr}");
    assert!(stderr.contains("start the backend"), "{stderr}");
}

#[tokio::test]
async fn a_token_revoked_in_the_file_does_not_live_on_in_its_backups() {
    let (backend, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let p = backend.port();
    std::fs::write(dir.path().join("tokens"), format!("live: 127.0.0.1:{p}\n")).unwrap();
    // What editors and package managers leave beside a file that once held `revoked`.
    for copy in [
        "tokens~",
        "#tokens#",
        "tokens.bak",
        ".tokens.swp",
        "tokens.dpkg-old",
        "tokens.dpkg-dist",
        "tokens.rpmnew",
    ] {
        std::fs::write(dir.path().join(copy), format!("live: 127.0.0.1:{p}\nrevoked: 127.0.0.1:{p}\n")).unwrap();
    }
    let mut config = Config::new("test");
    add_token_source(&mut config, dir.path().into(), TokenLookup::Query);
    let bridge = TestBridge::start(config).await;
    let r = http_raw(bridge.addr, &upgrade_request("/?token=revoked", "")).await;
    assert_eq!(status_of(&r), 404, "{r}");
    let (mut ws, _) = ws_connect(&bridge.url("/?token=live"), None).await;
    send_bin(&mut ws, b"live").await;
    assert_eq!(recv_data(&mut ws).await, b"live");
}
