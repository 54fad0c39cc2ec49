//! Access policy (issue 12) with real clients: origins, client networks, authentication (bearer,
//! Basic, JWT), caps and rates per client address, the real client address behind trusted
//! proxies and PROXY protocol (inbound and to the backend). Every refusal is checked for its
//! status, its headers, a body that tells nothing of the configuration, and that no backend
//! connection was made.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wsbridge::config::Config;

use crate::common::haproxy::HaProxy;
use crate::common::*;

/// A bridge from the TOML `text` (a `[[listen]]` is added on 127.0.0.1:0 when missing), with
/// `BACKEND` in it replaced by an echo backend's address; returns the bridge and the echo's
/// connection counter.
async fn bridge(text: &str, dir: &Path) -> (TestBridge, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let (backend, accepted) = echo_backend().await;
    let mut text = text.replace("BACKEND", &backend.to_string());
    if !text.contains("[[listen]]") {
        text = format!("[[listen]]\naddr = \"127.0.0.1:0\"\n{text}");
    }
    let config = Config::from_toml(&text, &dir.join("test.toml")).unwrap_or_else(|e| panic!("{e}"));
    (TestBridge::start(config).await, accepted)
}

/// Sends an upgrade for `path` with `extra` header lines; returns the whole answer (a refusal)
/// or its head (a 101, after which the connection is dropped).
async fn ask(addr: SocketAddr, path: &str, extra: &str) -> String {
    within("an answer", async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&upgrade_request(path, extra)).await.unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            out.extend_from_slice(&buf[..n]);
            if n == 0 || (out.starts_with(b"HTTP/1.1 101") && out.windows(4).any(|w| w == b"\r\n\r\n")) {
                break;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
}

/// Asserts a refusal: its status, that its body is `body`, and that it carries `header` (a
/// line start, lowercase) when given.
fn refused(answer: &str, status: u16, body: &str, header: Option<&str>) {
    assert_eq!(status_of(answer), status, "{answer}");
    assert_eq!(
        body_of(answer).trim(),
        format!("{status} {}: {body}", reason_phrase(status)),
        "{answer}"
    );
    if let Some(h) = header {
        assert!(answer.to_ascii_lowercase().contains(&format!("\r\n{h}")), "no {h} in {answer}");
    }
}

fn reason_phrase(status: u16) -> &'static str {
    http::StatusCode::from_u16(status).unwrap().canonical_reason().unwrap()
}

#[tokio::test]
async fn origins_exact_wildcard_and_same_origin() {
    let dir = tempfile::tempdir().unwrap();
    let (b, accepted) = bridge(
        "[[route]]\npath = \"/listed\"\ntarget = \"BACKEND\"\norigins = [\"https://app.example.com\", \"https://*.corp.example\"]\n\
         [[route]]\npath = \"/default\"\ntarget = \"BACKEND\"\n\
         [[route]]\npath = \"/strict\"\ntarget = \"BACKEND\"\norigins = [\"any\"]\nrequire_origin = true\n",
        dir.path(),
    )
    .await;
    for (path, extra) in [
        ("/listed", "Origin: https://evil.example\r\n"),
        ("/listed", "Origin: http://app.example.com\r\n"),
        ("/listed", "Origin: https://corp.example\r\n"),
        ("/listed", "Origin: null\r\n"),
        ("/listed", "Origin: https://app.example.com\r\nOrigin: https://evil.example\r\n"),
        ("/default", "Origin: https://evil.example\r\n"),
        ("/default", "Origin: http://localhost:8080\r\n"),
        ("/strict", ""),
    ] {
        let answer = ask(b.addr, path, extra).await;
        let body = if extra.is_empty() {
            "origin required"
        } else {
            "origin not allowed"
        };
        refused(&answer, 403, body, None);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "a refused request reached the backend");
    for (path, origin) in [
        ("/listed", "https://app.example.com"),
        ("/listed", "https://desk.corp.example"),
        // A file's route without `origins` admits its own origin: the Host's.
        ("/default", "http://localhost"),
        ("/strict", "https://anything.example"),
    ] {
        let answer = ask(b.addr, path, &format!("Origin: {origin}\r\n")).await;
        assert!(answer.starts_with("HTTP/1.1 101"), "{path} {origin}: {answer}");
    }
    // No Origin: a non-browser client, admitted unless the route requires one.
    assert!(ask(b.addr, "/listed", "").await.starts_with("HTTP/1.1 101"));
    b.stop().await;
}

#[tokio::test]
async fn client_networks_allow_and_deny() {
    let dir = tempfile::tempdir().unwrap();
    let (b, accepted) = bridge(
        "[[route]]\npath = \"/lan\"\ntarget = \"BACKEND\"\nallow = [\"10.0.0.0/8\", \"::1\"]\n\
         [[route]]\npath = \"/not-me\"\ntarget = \"BACKEND\"\ndeny = [\"127.0.0.0/8\"]\n\
         [[route]]\npath = \"/me\"\ntarget = \"BACKEND\"\nallow = [\"127.0.0.1\"]\n",
        dir.path(),
    )
    .await;
    refused(&ask(b.addr, "/lan", "").await, 403, "forbidden", None);
    refused(&ask(b.addr, "/not-me", "").await, 403, "forbidden", None);
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
    assert!(ask(b.addr, "/me", "").await.starts_with("HTTP/1.1 101"));
    b.stop().await;
}

#[tokio::test]
async fn bearer_tokens_from_header_query_or_subprotocol() {
    let dir = tempfile::tempdir().unwrap();
    let (b, accepted) = bridge(
        "[[route]]\npath = \"/t\"\ntarget = \"BACKEND\"\nauth = { bearer = [\"s3cret-token\"] }\n",
        dir.path(),
    )
    .await;
    for extra in ["", "Authorization: Bearer wrong\r\n", "Sec-WebSocket-Protocol: bearer.s3cret\r\n"] {
        let answer = ask(b.addr, "/t", extra).await;
        refused(&answer, 401, "authentication required", Some("www-authenticate: bearer"));
        assert!(!answer.contains("s3cret"), "{answer}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
    for (path, extra) in [
        ("/t", "Authorization: Bearer s3cret-token\r\n"),
        ("/t?access_token=s3cret-token", ""),
        ("/t", "Sec-WebSocket-Protocol: binary, bearer.s3cret-token\r\n"),
    ] {
        let answer = ask(b.addr, path, extra).await;
        assert!(answer.starts_with("HTTP/1.1 101"), "{extra}: {answer}");
        // The credential is never echoed as the chosen subprotocol.
        assert!(!answer.contains("bearer."), "{answer}");
    }
    // A real client through the subprotocol, as a page would (offering `binary` beside it).
    let (mut ws, chosen) = ws_connect(&b.url("/t"), Some("binary, bearer.s3cret-token")).await;
    assert_eq!(chosen.as_deref(), Some("binary"));
    send_bin(&mut ws, b"hello").await;
    assert_eq!(recv_data(&mut ws).await, b"hello");
    b.stop().await;
}

/// A token removed from a route's `bearer_file` is refused within the re-check time (a second)
/// with no SIGHUP, as a token file's would be; a token added works as soon.
#[tokio::test]
async fn a_bearer_file_edit_is_in_force_without_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bearer.txt");
    std::fs::write(&file, "leaked-token\n").unwrap();
    let (b, _) = bridge(
        "[[route]]\npath = \"/t\"\ntarget = \"BACKEND\"\nauth = { bearer_file = \"bearer.txt\" }\n",
        dir.path(),
    )
    .await;
    let with = |token: &str| format!("Authorization: Bearer {token}\r\n");
    assert!(ask(b.addr, "/t", &with("leaked-token")).await.starts_with("HTTP/1.1 101"));
    std::fs::write(&file, "new-token\n").unwrap();
    let edited = std::time::Instant::now();
    let answer = within("the removed token refused", async {
        loop {
            let answer = ask(b.addr, "/t", &with("leaked-token")).await;
            if !answer.starts_with("HTTP/1.1 101") {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    refused(&answer, 401, "authentication required", Some("www-authenticate: bearer"));
    let took = edited.elapsed();
    assert!(took <= wsbridge::policy::reread::RECHECK + Duration::from_millis(500), "{took:?}");
    assert!(ask(b.addr, "/t", &with("new-token")).await.starts_with("HTTP/1.1 101"));
    b.stop().await;
}

#[tokio::test]
async fn basic_against_an_htpasswd_file_and_failures_slowed_down() {
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("open sesame", 4).unwrap();
    std::fs::write(dir.path().join("users"), format!("alice:{hash}\n")).unwrap();
    let (b, accepted) = bridge(
        "[[route]]\npath = \"/b\"\ntarget = \"BACKEND\"\nauth = { htpasswd = \"users\" }\n",
        dir.path(),
    )
    .await;
    use base64::Engine as _;
    let basic = |user_pass: &str| {
        format!(
            "Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(user_pass)
        )
    };
    let (mut s, _) = raw_upgrade(b.addr, &upgrade_request("/b", &basic("alice:open sesame"))).await;
    s.write_all(&frame(0x82, b"hi", true)).await.unwrap();
    assert_eq!(raw_read_frame(&mut s).await, (0x2, b"hi".to_vec()));
    let before = accepted.load(Ordering::SeqCst);
    assert_eq!(before, 1);
    // Ten failures are answered 401; then the address is slowed down: 429 with Retry-After,
    // even for the right password, until failures are forgiven.
    for _ in 0..10 {
        refused(
            &ask(b.addr, "/b", &basic("alice:guess")).await,
            401,
            "authentication required",
            Some("www-authenticate: basic"),
        );
    }
    let slowed = ask(b.addr, "/b", &basic("alice:open sesame")).await;
    refused(&slowed, 429, "too many failed attempts", Some("retry-after: "));
    assert_eq!(accepted.load(Ordering::SeqCst), before);
    b.stop().await;
}

#[tokio::test]
async fn jwt_hs256_with_claims_checked() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let dir = tempfile::tempdir().unwrap();
    let secret = "a-shared-secret-of-at-least-32-bytes!";
    std::fs::write(dir.path().join("jwt.key"), secret).unwrap();
    let (b, _) = bridge(
        "[[route]]\npath = \"/j\"\ntarget = \"BACKEND\"\nauth = { jwt = { secret_file = \"jwt.key\", audience = [\"vnc\"] } }\n",
        dir.path(),
    )
    .await;
    let now = jsonwebtoken::get_current_timestamp();
    let sign =
        |claims: serde_json::Value| encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes()).unwrap()).unwrap();
    let good = sign(serde_json::json!({"sub": "alice", "aud": "vnc", "exp": now + 60}));
    assert!(ask(b.addr, &format!("/j?access_token={good}"), "")
        .await
        .starts_with("HTTP/1.1 101"));
    for bad in [
        sign(serde_json::json!({"sub": "alice", "aud": "vnc", "exp": now - 120})),
        sign(serde_json::json!({"sub": "alice", "aud": "other", "exp": now + 60})),
        "not-a-jwt".to_owned(),
    ] {
        refused(
            &ask(b.addr, "/j", &format!("Authorization: Bearer {bad}\r\n")).await,
            401,
            "authentication required",
            Some("www-authenticate: bearer"),
        );
    }
    b.stop().await;
}

#[tokio::test]
async fn sessions_and_new_sessions_per_client_address() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _) = bridge(
        "[[route]]\npath = \"/two\"\ntarget = \"BACKEND\"\nmax_sessions_per_ip = 2\n\
         [[route]]\npath = \"/slow\"\ntarget = \"BACKEND\"\nnew_sessions_per_ip = 0.1\nnew_sessions_burst = 2\n",
        dir.path(),
    )
    .await;
    let (first, _) = ws_connect(&b.url("/two"), None).await;
    let (_second, _) = ws_connect(&b.url("/two"), None).await;
    refused(
        &ask(b.addr, "/two", "").await,
        429,
        "too many sessions from your address",
        Some("retry-after: "),
    );
    // A session that ends gives its place back.
    drop(first);
    within("the place given back", async {
        loop {
            if ask(b.addr, "/two", "").await.starts_with("HTTP/1.1 101") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(ask(b.addr, "/slow", "").await.starts_with("HTTP/1.1 101"));
    assert!(ask(b.addr, "/slow", "").await.starts_with("HTTP/1.1 101"));
    let answer = ask(b.addr, "/slow", "").await;
    refused(&answer, 429, "too many new sessions from your address", Some("retry-after: "));
    // Counted by the route that refused (which a 404 has none of).
    assert_eq!(status_of(&ask(b.addr, "/none", "").await), 404);
    let text = b.bridge.metrics().encode();
    for counted in [
        r#"wsbridge_handshakes_refused_total{status="429",reason="address_limit",route="path /two"} 1"#,
        r#"wsbridge_handshakes_refused_total{status="429",reason="rate_limited",route="path /slow"} 1"#,
        r#"wsbridge_handshakes_refused_total{status="404",reason="not_found",route=""} 1"#,
    ] {
        assert!(text.lines().any(|l| l == counted), "{counted} in\n{text}");
    }
    b.stop().await;
}

#[tokio::test]
async fn forwarded_headers_count_only_on_a_listener_that_trusts_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let routes = "[[route]]\npath = \"/r\"\ntarget = \"BACKEND\"\ndeny = [\"203.0.113.0/24\"]\n";
    let (trusting, _) = bridge(
        &format!("[[listen]]\naddr = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n{routes}"),
        dir.path(),
    )
    .await;
    refused(
        &ask(trusting.addr, "/r", "X-Forwarded-For: 203.0.113.9\r\n").await,
        403,
        "forbidden",
        None,
    );
    // Only the header the proxies append to counts (X-Forwarded-For by default): a client's own
    // Forwarded passes through them untouched and names nobody.
    assert!(ask(trusting.addr, "/r", "Forwarded: for=203.0.113.9;proto=https\r\n")
        .await
        .starts_with("HTTP/1.1 101"));
    assert!(ask(trusting.addr, "/r", "X-Forwarded-For: 198.51.100.1\r\n")
        .await
        .starts_with("HTTP/1.1 101"));
    // A client cannot hide behind an address it prepends itself.
    refused(
        &ask(trusting.addr, "/r", "X-Forwarded-For: 198.51.100.1, 203.0.113.9\r\n").await,
        403,
        "forbidden",
        None,
    );
    trusting.stop().await;
    let (rfc, _) = bridge(
        &format!("[[listen]]\naddr = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.0/8\"]\nforwarded_header = \"forwarded\"\n{routes}"),
        dir.path(),
    )
    .await;
    refused(
        &ask(rfc.addr, "/r", "Forwarded: for=203.0.113.9;proto=https\r\n").await,
        403,
        "forbidden",
        None,
    );
    assert!(ask(rfc.addr, "/r", "X-Forwarded-For: 203.0.113.9\r\n")
        .await
        .starts_with("HTTP/1.1 101"));
    rfc.stop().await;
    // Where the peer is not a trusted proxy, the header is the client's own word: ignored.
    let (plain, _) = bridge(routes, dir.path()).await;
    assert!(ask(plain.addr, "/r", "X-Forwarded-For: 203.0.113.9\r\n")
        .await
        .starts_with("HTTP/1.1 101"));
    plain.stop().await;
}

/// Behind a proxy whose X-Forwarded-For the listener believes, `max_connections_per_ip` does not
/// count the proxy (every client behind it shared one allowance: one client's slow requests
/// locked all the others out), while the cap on sessions per address counts each client.
#[tokio::test]
async fn behind_a_trusted_proxy_the_caps_per_address_count_its_clients_not_it() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _) = bridge(
        "[[listen]]\naddr = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n\
         [limits]\nmax_connections_per_ip = 2\nmax_sessions_per_ip = 1\n\
         [[route]]\npath = \"/r\"\ntarget = \"BACKEND\"\n",
        dir.path(),
    )
    .await;
    // Two requests from one client still on their way through the proxy (heads not finished).
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(b.addr).await.unwrap();
        s.write_all(b"GET /r HTTP/1.1\r\nX-Forwarded-For: 198.51.100.7\r\n").await.unwrap();
        slow.push(s);
    }
    // Other clients through the same proxy get their sessions.
    let mut open = Vec::new();
    for client in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
        let extra = format!("X-Forwarded-For: {client}\r\n");
        let mut s = TcpStream::connect(b.addr).await.unwrap();
        s.write_all(&upgrade_request("/r", &extra)).await.unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{client}: {head}");
        open.push(s);
    }
    // Each client's own sessions are still capped.
    refused(
        &ask(b.addr, "/r", "X-Forwarded-For: 198.51.100.1\r\n").await,
        429,
        "too many sessions from your address",
        Some("retry-after: "),
    );
    drop((slow, open));
    b.stop().await;
}

#[tokio::test]
async fn proxy_protocol_in_from_the_balancer_and_out_to_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, mut accepted) = manual_backend().await;
    let text = format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\nproxy_protocol = true\n\
         [[route]]\npath = \"/p\"\ntarget = \"{backend}\"\nproxy_protocol = \"v2\"\ndeny = [\"203.0.113.0/24\"]\n"
    );
    let config = Config::from_toml(&text, &dir.path().join("t.toml")).unwrap();
    let b = TestBridge::start(config).await;
    let client: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    for version in [wsbridge::proxy::Version::V1, wsbridge::proxy::Version::V2] {
        let mut s = TcpStream::connect(b.addr).await.unwrap();
        // The balancer's address the client reached (not the bridge's).
        let front: SocketAddr = "192.0.2.1:443".parse().unwrap();
        s.write_all(&wsbridge::proxy::header(version, client, front)).await.unwrap();
        let (mut s, _) = raw_upgrade_on(s, &upgrade_request("/p", "")).await;
        // The backend hears who the client really is, and where it connected, before any byte
        // of the session.
        let mut conn = recv_once_mpsc(&mut accepted).await;
        let seen = within("the backend's PROXY header", wsbridge::proxy::read_addresses(&mut conn))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((seen.client, seen.destination), (client, front), "{version}");
        s.write_all(&frame(0x82, b"ping", true)).await.unwrap();
        let mut got = [0u8; 4];
        within("data after the header", conn.read_exact(&mut got)).await.unwrap();
        assert_eq!(&got, b"ping");
    }
    // The address in the header is the one policy sees.
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(&wsbridge::proxy::header(
        wsbridge::proxy::Version::V2,
        "203.0.113.5:1".parse().unwrap(),
        b.addr,
    ))
    .await
    .unwrap();
    s.write_all(&upgrade_request("/p", "")).await.unwrap();
    let mut answer = String::new();
    within("403", s.read_to_string(&mut answer)).await.unwrap();
    refused(&answer, 403, "forbidden", None);
    // A connection without the header is closed without an HTTP answer.
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(&upgrade_request("/p", "")).await.unwrap();
    let mut rest = Vec::new();
    let _ = within("close", s.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    b.stop().await;
}

async fn recv_once_mpsc(rx: &mut tokio::sync::mpsc::Receiver<TcpStream>) -> TcpStream {
    within("a backend connection", rx.recv()).await.expect("backend listener ended")
}

#[tokio::test]
async fn the_command_line_admits_any_origin_and_says_so_until_origin_narrows_it() {
    let (backend, _) = echo_backend().await;
    let target = backend.to_string();
    let mut open = binary::Binary::spawn(&["127.0.0.1:0", &target]).await;
    open.line("any web page can open sessions").await;
    assert!(ask(open.addr, "/", "Origin: https://evil.example\r\n")
        .await
        .starts_with("HTTP/1.1 101"));
    let mut narrowed = binary::Binary::spawn(&["127.0.0.1:0", &target, "--origin", "https://app.example"]).await;
    refused(
        &ask(narrowed.addr, "/", "Origin: https://evil.example\r\n").await,
        403,
        "origin not allowed",
        None,
    );
    assert!(ask(narrowed.addr, "/", "Origin: https://app.example\r\n")
        .await
        .starts_with("HTTP/1.1 101"));
    // The refusal's log line names the origin and the route.
    let line = narrowed.line("http request answered").await;
    assert!(
        line.contains("evil.example") && line.contains("any path") && line.contains("status=403"),
        "{line}"
    );
    assert!(!narrowed.lines().iter().any(|l| l.contains("any web page can open sessions")));
    // websockify's ExpectOrigin maps onto the same list.
    let expect = binary::Binary::spawn(&[
        "127.0.0.1:0",
        &target,
        "--auth-plugin",
        "ExpectOrigin",
        "--auth-source",
        "https://a.example https://b.example",
    ])
    .await;
    assert!(ask(expect.addr, "/", "Origin: https://b.example\r\n")
        .await
        .starts_with("HTTP/1.1 101"));
    refused(
        &ask(expect.addr, "/", "Origin: https://c.example\r\n").await,
        403,
        "origin not allowed",
        None,
    );
    // And, as websockify's plugin, it refuses a request with no Origin at all (found by a
    // newcomer's side-by-side run: 101 here, 403 from websockify); --origin alone does not.
    refused(&ask(expect.addr, "/", "").await, 403, "origin required", None);
    assert!(ask(narrowed.addr, "/", "").await.starts_with("HTTP/1.1 101"));
}

/// The real HAProxy in front, sending PROXY v2 (`send-proxy-v2`): the session's log line and the
/// backend (through the PROXY header wsbridge sends it) both see the client's own address, not
/// HAProxy's.
#[tokio::test]
async fn behind_the_real_haproxy_the_log_and_the_backend_see_the_client() {
    let test = "policy::behind_the_real_haproxy_the_log_and_the_backend_see_the_client";
    let Some(haproxy) = HaProxy::installed() else {
        return skip(test, "haproxy is not installed (scripts/test.sh installs Debian's haproxy)");
    };
    let dir = tempfile::tempdir().unwrap();
    let (backend, mut accepted) = manual_backend().await;
    let config = dir.path().join("w.toml");
    std::fs::write(
        &config,
        format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\nproxy_protocol = true\n\
             [[route]]\npath = \"/vnc\"\ntarget = \"{backend}\"\nproxy_protocol = \"v1\"\n"
        ),
    )
    .unwrap();
    let mut bridge = binary::Binary::spawn(&["--config", config.to_str().unwrap()]).await;
    let cfg = format!(
        "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend fe\n  bind fd@0\n  default_backend be\n\
         backend be\n  server wsbridge {} send-proxy-v2\n",
        bridge.addr
    );
    let haproxy = HaProxy::start(&haproxy, dir.path(), &cfg);
    let front_addr = haproxy.front;
    let s = TcpStream::connect(front_addr).await.unwrap();
    let me = s.local_addr().unwrap();
    let (mut s, _) = raw_upgrade_on(s, &upgrade_request("/vnc", "")).await;
    let mut conn = recv_once_mpsc(&mut accepted).await;
    let seen = within("the backend's PROXY header", wsbridge::proxy::read_header(&mut conn))
        .await
        .unwrap();
    assert_eq!(seen, Some(me), "the backend sees the client, not HAProxy");
    s.write_all(&frame(0x82, b"hello", true)).await.unwrap();
    let mut got = [0u8; 5];
    within("data", conn.read_exact(&mut got)).await.unwrap();
    assert_eq!(&got, b"hello");
    drop((conn, s));
    let line = bridge.line("session closed").await;
    assert!(line.contains(&format!("client={me}")), "{line}");
    assert!(line.contains("via=127.0.0.1:"), "{line}");
    assert!(line.contains(&format!("backend={backend}")), "{line}");
}

/// Log lines name a client one way: `ip:port` when the bridge saw its port (a direct client, on a
/// listener that trusts a proxy too), the bare IP when a trusted proxy's X-Forwarded-For named it;
/// and each session's lines name the backend address it reached (a name can have several).
#[tokio::test]
async fn the_log_names_the_client_one_way_and_the_backend_address_reached() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, _accepted) = echo_backend().await;
    let config = dir.path().join("w.toml");
    std::fs::write(
        &config,
        format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
             [[route]]\npath = \"/vnc\"\ntarget = \"localhost:{}\"\n",
            backend.port()
        ),
    )
    .unwrap();
    let mut bridge = binary::Binary::spawn(&["--config", config.to_str().unwrap()]).await;
    let s = TcpStream::connect(bridge.addr).await.unwrap();
    let me = s.local_addr().unwrap();
    let (s, _) = raw_upgrade_on(s, &upgrade_request("/vnc", "")).await;
    drop(s);
    let line = bridge.line("session closed").await;
    assert!(line.contains(&format!("client={me} ")), "a direct client with its port: {line}");
    assert!(line.contains(&format!("backend={backend}")), "{line}");
    let s = TcpStream::connect(bridge.addr).await.unwrap();
    let (s, _) = raw_upgrade_on(s, &upgrade_request("/vnc", "X-Forwarded-For: 2001:db8::9\r\n")).await;
    drop(s);
    // (At the info level a session's one line is its close.)
    let line = bridge.line("session=2 ").await;
    assert!(line.contains("session closed"), "{line}");
    assert!(line.contains("client=2001:db8::9 "), "a forwarded client, its port unknown: {line}");
    assert!(line.contains(&format!("backend={backend}")), "{line}");
}

/// `wsbridge check` shows every route's policy in the file's words, secrets left out.
#[tokio::test]
async fn check_shows_each_routes_policy_without_its_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("w.toml");
    std::fs::write(
        &file,
        "[[listen]]\naddr = \"127.0.0.1:0\"\ntrusted_proxies = [\"10.0.0.0/8\"]\n\
         [limits]\nmax_sessions_per_ip = 20\n\
         [[route]]\npath = \"/vnc\"\ntarget = \"127.0.0.1:5900\"\norigins = [\"https://*.example.com\"]\n\
         allow = [\"192.0.2.0/24\"]\ndeny = [\"192.0.2.9\"]\nauth = { bearer = [\"do-not-print-me\"] }\n\
         new_sessions_per_ip = 2\nproxy_protocol = \"v2\"\n",
    )
    .unwrap();
    let out = tokio::process::Command::new(binary::BIN)
        .args(["check", "--config", file.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for want in [
        "trusted_proxies = [\"10.0.0.0/8\"]",
        "max_sessions_per_ip = 20",
        "origins = [\"https://*.example.com\"]",
        "allow = [\"192.0.2.0/24\"]",
        "deny = [\"192.0.2.9/32\"]",
        "auth = { bearer = <1 token> }",
        "new_sessions_per_ip = 2, new_sessions_burst = 2",
        "proxy_protocol = \"v2\"",
        "policy    origins = [\"same-origin\"]",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
    assert!(!text.contains("do-not-print-me"), "{text}");
}

/// websockify's JWTTokenApi: `?token=` is a JWT whose `host` and `port` claims name the target,
/// but only a target on the source's allow-list; a valid token naming anything else is 403 and
/// reaches nothing.
#[tokio::test]
async fn jwt_tokens_name_their_target_only_within_the_allow_list() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let dir = tempfile::tempdir().unwrap();
    let secret = "a-shared-secret-of-at-least-32-bytes!";
    std::fs::write(dir.path().join("jwt.key"), secret).unwrap();
    let (allowed, _) = echo_backend().await;
    let (off_list, mut reached) = manual_backend().await;
    let text = format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n\
         [[tokens]]\njwt = {{ secret_file = \"jwt.key\", require_exp = false }}\nallow_targets = [\"127.0.0.1:{}\"]\n",
        allowed.port()
    );
    let config = Config::from_toml(&text, &dir.path().join("w.toml")).unwrap();
    let b = TestBridge::start(config).await;
    let key = EncodingKey::from_secret(secret.as_bytes()).unwrap();
    let token = |claims: serde_json::Value| encode(&Header::default(), &claims, &key).unwrap();
    let good = token(serde_json::json!({"host": "127.0.0.1", "port": allowed.port()}));
    let (mut ws, _) = ws_connect(&b.url(&format!("/websockify?token={good}")), None).await;
    send_bin(&mut ws, b"via jwt").await;
    assert_eq!(recv_data(&mut ws).await, b"via jwt");
    for claims in [
        serde_json::json!({"host": "127.0.0.1", "port": off_list.port()}),
        serde_json::json!({"host": "localhost", "port": allowed.port()}),
        serde_json::json!({"sub": "no target"}),
    ] {
        refused(
            &ask(b.addr, &format!("/?token={}", token(claims)), "").await,
            403,
            "forbidden",
            None,
        );
    }
    let forged = encode(
        &Header::default(),
        &serde_json::json!({"host": "127.0.0.1", "port": off_list.port()}),
        &EncodingKey::from_secret(b"another secret of at least 32 bytes").unwrap(),
    )
    .unwrap();
    refused(&ask(b.addr, &format!("/?token={forged}"), "").await, 404, "unknown token", None);
    assert!(reached.try_recv().is_err(), "a token reached a target off the allow-list");
    b.stop().await;
}

/// The same from websockify's command line: `--token-plugin JWTTokenApi --token-source KEY`,
/// with the allow-list it needs.
#[tokio::test]
async fn jwt_token_api_on_the_command_line() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let dir = tempfile::tempdir().unwrap();
    let secret = "a-shared-secret-of-at-least-32-bytes!";
    let key_file = dir.path().join("jwt.key");
    std::fs::write(&key_file, secret).unwrap();
    let (allowed, _) = echo_backend().await;
    let key = key_file.to_str().unwrap();
    let refused_start = tokio::process::Command::new(binary::BIN)
        .args(["127.0.0.1:0", "--token-plugin", "JWTTokenApi", "--token-source", key])
        .output()
        .await
        .unwrap();
    assert_eq!(refused_start.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&refused_start.stderr).contains("--jwt-allow-target"));
    let rule = format!("127.0.0.0/8:{}", allowed.port());
    let b = binary::Binary::spawn(&[
        "127.0.0.1:0",
        "--token-plugin",
        "JWTTokenApi",
        "--token-source",
        key,
        "--jwt-allow-target",
        &rule,
    ])
    .await;
    let token = encode(
        &Header::default(),
        &serde_json::json!({"host": "127.0.0.1", "port": allowed.port()}),
        &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap();
    let (mut ws, _) = ws_connect(&format!("ws://{}/websockify?token={token}", b.addr), None).await;
    send_bin(&mut ws, b"cli jwt").await;
    assert_eq!(recv_data(&mut ws).await, b"cli jwt");
}

/// A key file made for websockify: its JWTTokenApi reads the text as a JWK `k` value, so the HMAC
/// key is the text base64url-decoded, and tokens minted for it are signed with that. The same
/// file and tokens work here; the file's bytes as they stand still do too.
#[tokio::test]
async fn jwt_token_api_takes_websockifys_key_files() {
    use base64::Engine as _;
    use jsonwebtoken::{encode, EncodingKey, Header};
    let dir = tempfile::tempdir().unwrap();
    let raw_key: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect();
    let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw_key);
    let key_file = dir.path().join("jwt.key");
    std::fs::write(&key_file, format!("{text}\n")).unwrap();
    let (allowed, _) = echo_backend().await;
    let rule = format!("127.0.0.1:{}", allowed.port());
    let b = binary::Binary::spawn(&[
        "127.0.0.1:0",
        "--token-plugin",
        "JWTTokenApi",
        "--token-source",
        key_file.to_str().unwrap(),
        "--jwt-allow-target",
        &rule,
    ])
    .await;
    let claims = serde_json::json!({"host": "127.0.0.1", "port": allowed.port().to_string()});
    for (what, key) in [("websockify's key", &raw_key[..]), ("the file's bytes", text.as_bytes())] {
        let token = encode(&Header::default(), &claims, &EncodingKey::from_secret(key).unwrap()).unwrap();
        let (mut ws, _) = ws_connect(&format!("ws://{}/websockify?token={token}", b.addr), None).await;
        send_bin(&mut ws, what.as_bytes()).await;
        assert_eq!(recv_data(&mut ws).await, what.as_bytes());
    }
    let mut other = raw_key.clone();
    other[0] ^= 1;
    let forged = encode(&Header::default(), &claims, &EncodingKey::from_secret(&other).unwrap()).unwrap();
    refused(&ask(b.addr, &format!("/?token={forged}"), "").await, 404, "unknown token", None);
}

/// websockify's JWTTokenApi takes a private key as `--token-source` too (the file the tokens are
/// signed with, often) and verifies with its public half. So does wsbridge, for PKCS#8, SEC1 and
/// PKCS#1 keys; a private RSA key used to be taken for a public one and every token refused.
#[tokio::test]
async fn jwt_token_api_verifies_with_a_private_keys_public_half() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let dir = tempfile::tempdir().unwrap();
    let (allowed, _) = echo_backend().await;
    let rule = format!("127.0.0.1:{}", allowed.port());
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .unwrap()
        .serialize_pem();
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap().serialize_pem();
    let mut keys = vec![
        (
            "EC PKCS#8",
            ec.clone(),
            Algorithm::ES256,
            EncodingKey::from_ec_pem(ec.as_bytes()).unwrap(),
        ),
        (
            "Ed25519 PKCS#8",
            ed.clone(),
            Algorithm::EdDSA,
            EncodingKey::from_ed_pem(ed.as_bytes()).unwrap(),
        ),
    ];
    // RSA (PKCS#8 and PKCS#1) and SEC1 EC keys come from the openssl command.
    let openssl = |args: &[&str]| {
        std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        "rsa8.pem",
    ]) && openssl(&["rsa", "-in", "rsa8.pem", "-traditional", "-out", "rsa1.pem"])
        && openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sec1.pem"])
        && openssl(&["pkcs8", "-topk8", "-nocrypt", "-in", "sec1.pem", "-out", "sec1-as-pkcs8.pem"])
    {
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
        let rsa = EncodingKey::from_rsa_pem(read("rsa8.pem").as_bytes()).unwrap();
        keys.push(("RSA PKCS#8", read("rsa8.pem"), Algorithm::RS256, rsa.clone()));
        keys.push(("RSA PKCS#1", read("rsa1.pem"), Algorithm::RS256, rsa));
        let sec1 = read("sec1.pem");
        assert!(sec1.contains("BEGIN EC PRIVATE KEY"), "{sec1}");
        // jsonwebtoken signs with PKCS#8 only: the same key converted.
        let signing = EncodingKey::from_ec_pem(read("sec1-as-pkcs8.pem").as_bytes()).unwrap();
        keys.push(("EC SEC1", sec1, Algorithm::ES256, signing));
    } else {
        skip(
            "policy::jwt_token_api_verifies_with_a_private_keys_public_half (RSA and SEC1 keys)",
            "no openssl to make them",
        );
    }
    for (what, pem, alg, signing) in keys {
        let file = dir.path().join("signing.pem");
        std::fs::write(&file, pem).unwrap();
        let b = binary::Binary::spawn(&[
            "127.0.0.1:0",
            "--token-plugin",
            "JWTTokenApi",
            "--token-source",
            file.to_str().unwrap(),
            "--jwt-allow-target",
            &rule,
        ])
        .await;
        let claims = serde_json::json!({"host": "127.0.0.1", "port": allowed.port()});
        let token = encode(&Header::new(alg), &claims, &signing).unwrap();
        let (mut ws, _) = ws_connect(&format!("ws://{}/websockify?token={token}", b.addr), None).await;
        send_bin(&mut ws, what.as_bytes()).await;
        assert_eq!(recv_data(&mut ws).await, what.as_bytes(), "{what}");
    }
}

/// The attacks a review found, each closed: guesses in parallel, a budget spent by clients that
/// sent no credentials, tokens guessed in the query, a PROXY header from a peer that is not the
/// balancer, and DNS rebinding against same-origin.
#[tokio::test]
async fn guesses_in_parallel_tokens_guessed_and_rebinding_are_stopped() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("right", 4).unwrap();
    std::fs::write(dir.path().join("users"), format!("alice:{hash}\n")).unwrap();
    std::fs::write(dir.path().join("tokens"), "known: 127.0.0.1:9\n").unwrap();
    let (b, _) = bridge(
        "[[route]]\npath = \"/b\"\ntarget = \"BACKEND\"\nauth = { htpasswd = \"users\" }\n\
         [[route]]\npath = \"/same\"\ntarget = \"BACKEND\"\n[[tokens]]\nsource = \"tokens\"\n",
        dir.path(),
    )
    .await;
    let basic = |p: &str| {
        format!(
            "Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(format!("alice:{p}"))
        )
    };
    // A client without credentials is asked for them, not charged: fifteen of those, then the
    // right password still works.
    for _ in 0..15 {
        refused(
            &ask(b.addr, "/b", "").await,
            401,
            "authentication required",
            Some("www-authenticate: basic"),
        );
    }
    assert!(ask(b.addr, "/b", &basic("right")).await.starts_with("HTTP/1.1 101"));
    // Twenty wrong guesses at once: the budget (ten) is taken before each check, so no more
    // than ten are checked, whatever the timing.
    let wrong = basic("wrong");
    let guesses: Vec<_> = (0..20).map(|_| ask(b.addr, "/b", &wrong)).collect();
    let answers = futures_util::future::join_all(guesses).await;
    let checked = answers.iter().filter(|a| status_of(a) == 401).count();
    let slowed = answers.iter().filter(|a| status_of(a) == 429).count();
    assert_eq!((checked, slowed), (10, 10), "{answers:?}");
    b.stop().await;

    // Tokens guessed in the query are charged like passwords.
    let (b, _) = bridge(
        "[[tokens]]\nsource = \"tokens\"\n[[route]]\npath = \"/same\"\ntarget = \"BACKEND\"\n",
        dir.path(),
    )
    .await;
    for i in 0..10 {
        refused(&ask(b.addr, &format!("/?token=guess{i}"), "").await, 404, "unknown token", None);
    }
    refused(
        &ask(b.addr, "/?token=guess10", "").await,
        429,
        "too many failed attempts",
        Some("retry-after: "),
    );
    // Same-origin over plain ws://: a name in Host proves nothing (DNS rebinding), an address does.
    let port = b.addr.port();
    let rebinding = format!("Origin: http://evil.example:{port}\r\n");
    let request = format!(
        "GET /same HTTP/1.1\r\nHost: evil.example:{port}\r\n{rebinding}Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    refused(&http_raw(b.addr, request.as_bytes()).await, 403, "origin not allowed", None);
    b.stop().await;

    // A PROXY header from a peer outside trusted_proxies is not believed: the connection is closed.
    let text = "[[listen]]\naddr = \"127.0.0.1:0\"\nproxy_protocol = true\ntrusted_proxies = [\"192.0.2.0/24\"]\n\
                [[route]]\npath = \"/p\"\ntarget = \"127.0.0.1:9\"\n";
    let b = TestBridge::start(Config::from_toml(text, &dir.path().join("p.toml")).unwrap()).await;
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    let _ = s
        .write_all(&wsbridge::proxy::header(
            wsbridge::proxy::Version::V2,
            "198.51.100.1:1".parse().unwrap(),
            b.addr,
        ))
        .await;
    let _ = s.write_all(&upgrade_request("/p", "")).await;
    let mut rest = Vec::new();
    let _ = within("close", s.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    b.stop().await;
}

/// Every kind of refusal, through the real binary: the status the client gets, a log line that
/// names the route and the reason, no backend connection, and no secret in any log line.
#[tokio::test]
async fn each_refusal_is_logged_with_its_route_and_reason_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, accepted) = echo_backend().await;
    let file = dir.path().join("w.toml");
    std::fs::write(
        &file,
        format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\n\
             [[route]]\npath = \"/net\"\ntarget = \"{backend}\"\ndeny = [\"127.0.0.0/8\"]\n\
             [[route]]\npath = \"/origin\"\ntarget = \"{backend}\"\norigins = [\"https://app.example\"]\n\
             [[route]]\npath = \"/auth\"\ntarget = \"{backend}\"\nauth = {{ bearer = [\"the-real-secret\"] }}\n\
             [[route]]\npath = \"/rate\"\ntarget = \"{backend}\"\nnew_sessions_per_ip = 0.01\nnew_sessions_burst = 1\n"
        ),
    )
    .unwrap();
    let mut b = binary::Binary::spawn(&["--config", file.to_str().unwrap()]).await;
    refused(&ask(b.addr, "/net", "").await, 403, "forbidden", None);
    let line = b.line("path /net").await;
    assert!(line.contains("status=403") && line.contains("denied network"), "{line}");
    refused(
        &ask(b.addr, "/origin", "Origin: https://evil.example\r\n").await,
        403,
        "origin not allowed",
        None,
    );
    let line = b.line("path /origin").await;
    assert!(line.contains("status=403") && line.contains("evil.example"), "{line}");
    refused(
        &ask(b.addr, "/auth", "Authorization: Bearer a-wrong-guess\r\n").await,
        401,
        "authentication required",
        Some("www-authenticate: bearer"),
    );
    let line = b.line("path /auth").await;
    assert!(line.contains("status=401") && line.contains("not valid"), "{line}");
    // The first new session on /rate is admitted (and dropped), the second is over the rate.
    assert!(ask(b.addr, "/rate", "").await.starts_with("HTTP/1.1 101"));
    refused(
        &ask(b.addr, "/rate", "").await,
        429,
        "too many new sessions from your address",
        Some("retry-after: "),
    );
    let line = b.line("rate of new sessions").await;
    assert!(line.contains("status=429") && line.contains("path /rate"), "{line}");
    // Only the one admitted session reached the backend (counted once its connect is done).
    within("the admitted session's backend connection", async {
        while accepted.load(Ordering::SeqCst) < 1 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let logs = b.lines().join("\n");
    assert!(
        !logs.contains("the-real-secret") && !logs.contains("a-wrong-guess"),
        "a secret in the log:\n{logs}"
    );
}

/// A listener's `origins` is the default of the routes it serves that set none; a route's own
/// list wins over it.
#[tokio::test]
async fn a_listeners_origins_are_its_routes_default() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _) = bridge(
        "[[listen]]\naddr = \"127.0.0.1:0\"\norigins = [\"https://app.example\"]\n\
         [[route]]\npath = \"/inherits\"\ntarget = \"BACKEND\"\n\
         [[route]]\npath = \"/own\"\ntarget = \"BACKEND\"\norigins = [\"https://other.example\"]\n",
        dir.path(),
    )
    .await;
    assert!(ask(b.addr, "/inherits", "Origin: https://app.example\r\n")
        .await
        .starts_with("HTTP/1.1 101"));
    refused(
        &ask(b.addr, "/inherits", "Origin: https://other.example\r\n").await,
        403,
        "origin not allowed",
        None,
    );
    // Not the file's same-origin default either: the listener's list replaces it.
    refused(
        &ask(b.addr, "/inherits", "Origin: http://localhost\r\n").await,
        403,
        "origin not allowed",
        None,
    );
    assert!(ask(b.addr, "/own", "Origin: https://other.example\r\n")
        .await
        .starts_with("HTTP/1.1 101"));
    refused(
        &ask(b.addr, "/own", "Origin: https://app.example\r\n").await,
        403,
        "origin not allowed",
        None,
    );
    b.stop().await;
}

/// New /64s of one IPv6 /48 guessing a bearer token are held to the /48's budget (100), and
/// reaching the any-path route beside host tokens first proves nothing: a review found that the
/// any-path fallback of a host that is no token counted as a token found, and every /64 that
/// asked for it was let past the /48's budget on every route (400 of 400 guesses got 401).
#[tokio::test]
async fn new_64s_of_one_48_are_held_to_its_budget_whatever_they_reached_before() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hosts"), "desk1.example: 127.0.0.1:9\n").unwrap();
    let (b, _) = bridge(
        "[[listen]]\naddr = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n\
         [[route]]\npath = \"/admin\"\ntarget = \"BACKEND\"\nauth = { bearer = [\"the-right-token-0123456789\"] }\n\
         [[route]]\npath = \"*\"\ntarget = \"BACKEND\"\n\
         [[tokens]]\nsource = \"hosts\"\nlookup = \"host\"\n",
        dir.path(),
    )
    .await;
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..130u32 {
        let from = format!("X-Forwarded-For: 2001:db8:1:{i:x}::1\r\n");
        // The any-path route (101 while the /48's budget lasts: the host is looked up as a
        // token, and given back when it is none).
        let reached = ask(b.addr, "/anything", &from).await;
        assert!(matches!(status_of(&reached), 101 | 429), "{reached}");
        let guess = ask(b.addr, "/admin", &format!("{from}Authorization: Bearer wrong-{i}\r\n")).await;
        *statuses.entry(status_of(&guess)).or_insert(0) += 1;
    }
    assert_eq!(statuses, std::collections::BTreeMap::from([(401, 100), (429, 30)]));
    // Another /48 is not slowed.
    let other = ask(
        b.addr,
        "/admin",
        "X-Forwarded-For: 2001:db8:2::1\r\nAuthorization: Bearer wrong\r\n",
    )
    .await;
    assert_eq!(status_of(&other), 401, "{other}");
}
