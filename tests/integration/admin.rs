//! The admin listener against a real bridge: metrics scraped and parsed with a Prometheus
//! text-format parser and checked against what the test did, readiness during a drain, the live
//! sessions and ending one, and the bearer token.

use std::net::SocketAddr;

use futures_util::SinkExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use wsbridge::config::Matcher;

use crate::common::*;

/// Asks `/sessions` until `done` holds of the list (each answer is an event: a session opened,
/// ended, or moved bytes), within the test bound.
async fn sessions_until(addr: SocketAddr, what: &str, done: impl Fn(&[serde_json::Value]) -> bool) -> Vec<serde_json::Value> {
    within(what, async {
        loop {
            let list = sessions(addr, None).await;
            if done(&list) {
                return list;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

/// Waits until the bridge's accept loops run (`/readyz` says 200).
async fn ready(addr: SocketAddr) {
    within("readiness", async {
        while admin(addr, "GET", "/readyz", None).await.0 != 200 {
            tokio::task::yield_now().await;
        }
    })
    .await
}

/// `/metrics`, parsed by prometheus-parse (a text-format parser that is not the encoder's).
async fn scrape(addr: SocketAddr, token: Option<&str>) -> prometheus_parse::Scrape {
    let (status, body) = admin(addr, "GET", "/metrics", token).await;
    assert_eq!(status, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("the text format parses")
}

/// Scrapes until `done` holds of the metrics (each scrape an event: the bridge counts what it
/// did before it answers), within the test bound; returns the scrape that showed it.
async fn scrape_until(addr: SocketAddr, what: &str, done: impl Fn(&prometheus_parse::Scrape) -> bool) -> prometheus_parse::Scrape {
    within(what, async {
        loop {
            let m = scrape(addr, None).await;
            if done(&m) {
                return m;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

/// The value of the sample `metric` whose labels include `labels` (0 when there is none: a
/// label set never seen is not exported).
fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let matching: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{metric}: not a single value: {other:?}"),
        })
        .collect();
    assert!(matching.len() <= 1, "{metric} {labels:?}: {} samples", matching.len());
    matching.first().copied().unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_match_what_the_sessions_and_refusals_did() {
    let (backend, _) = echo_backend().await;
    let bridge = TestBridge::start(config_with(Matcher::Path("/echo".into()), tcp(backend))).await;
    let (admin_addr, _stop) = start_admin(&bridge, None).await;
    ready(admin_addr).await;
    let route = [("route", "path /echo")];

    // Two sessions, each 3000 bytes up and echoed back down, closed by the client.
    let sizes = [1000usize, 2000];
    for (i, size) in sizes.into_iter().enumerate() {
        let (mut ws, _) = ws_connect(&bridge.url("/echo"), None).await;
        let data = pattern(size, i as u8);
        send_bin(&mut ws, &data).await;
        let mut got = Vec::new();
        while got.len() < size {
            got.extend(recv_data(&mut ws).await);
        }
        assert_eq!(got, data);
        let normal = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        within("the client's close", ws.close(Some(normal))).await.unwrap();
        read_until_close(&mut ws).await;
    }
    // Refusals: two upgrades to no route (404), a plain GET on the route (426), an upgrade with
    // the wrong version (426 too, same reason) and one with no Host (400).
    for request in [
        upgrade_request("/nowhere", ""),
        upgrade_request("/elsewhere", ""),
        b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        b"GET /echo HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".to_vec(),
    ] {
        http_raw(bridge.addr, &request).await;
    }
    sessions_until(admin_addr, "both sessions to end", |l| l.is_empty()).await;

    let m = scrape(admin_addr, None).await;
    let total = sizes.iter().sum::<usize>() as f64;
    assert_eq!(value(&m, "wsbridge_sessions_open", &route), 0.0);
    let ended = [
        ("route", "path /echo"),
        ("code", "1000"),
        ("ended_by", "client"),
        ("cause", "close"),
    ];
    assert_eq!(value(&m, "wsbridge_sessions_ended_total", &ended), 2.0);
    let up = [("route", "path /echo"), ("direction", "up")];
    let down = [("route", "path /echo"), ("direction", "down")];
    assert_eq!(value(&m, "wsbridge_session_bytes_total", &up), total);
    assert_eq!(value(&m, "wsbridge_session_bytes_total", &down), total);
    let refused = |status: &str, reason: &str| value(&m, "wsbridge_handshakes_refused_total", &[("status", status), ("reason", reason)]);
    assert_eq!(refused("404", "not_found"), 2.0);
    assert_eq!(refused("426", "not_websocket"), 1.0);
    assert_eq!(refused("400", "bad_request"), 1.0);
    let ok = [("route", "path /echo"), ("outcome", "ok")];
    assert_eq!(value(&m, "wsbridge_backend_connects_total", &ok), 2.0);
    let histogram = m
        .samples
        .iter()
        .find(|s| s.metric == "wsbridge_backend_connect_seconds")
        .expect("the connect histogram");
    match &histogram.value {
        prometheus_parse::Value::Histogram(buckets) => {
            let inf = buckets.iter().find(|b| b.less_than == f64::INFINITY).expect("+Inf bucket");
            assert_eq!(inf.count, 2.0, "{buckets:?}");
        }
        other => panic!("not a histogram: {other:?}"),
    }
    // No client address and no token is a label anywhere.
    let client_ip = "127.0.0.1";
    for s in &m.samples {
        assert!(!format!("{:?}", s.labels).contains(client_ip), "{s:?}");
    }
}

/// `session_bytes_total` of the one route there is, in `direction`.
fn session_bytes(m: &prometheus_parse::Scrape, direction: &str) -> f64 {
    value(m, "wsbridge_session_bytes_total", &[("direction", direction)])
}

/// Scrapes until the session bytes are `(up, down)` (each scrape an event: the relay counts
/// what it moved right after moving it), within the test bound.
async fn session_bytes_until(addr: SocketAddr, up: f64, down: f64) -> prometheus_parse::Scrape {
    scrape_until(addr, "the session bytes on /metrics", |m| {
        (session_bytes(m, "up"), session_bytes(m, "down")) == (up, down)
    })
    .await
}

/// The number after `field=` in a log line.
fn logged(line: &str, field: &str) -> f64 {
    line.split(&format!("{field}="))
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {line:?}"))
}

/// Bytes are counted as they move: a session that is still open shows on `/metrics` what it has
/// moved each way (a long session is no spike at its end), and once it ends the totals are the
/// bytes its log line reports, counted once.
#[tokio::test]
async fn session_bytes_are_counted_while_the_session_runs_and_once() {
    use crate::common::binary::Binary;
    let (backend, _) = echo_backend().await;
    let mut b = Binary::spawn(&["127.0.0.1:0", &backend.to_string(), "--admin", "127.0.0.1:0"]).await;
    let addr = b.admin_addr().await;
    let (mut ws, _) = ws_connect(&format!("ws://{}/", b.addr), None).await;
    let mut moved = 0;
    for (i, size) in [5000usize, 3000].into_iter().enumerate() {
        let data = pattern(size, i as u8);
        send_bin(&mut ws, &data).await;
        let mut got = Vec::new();
        while got.len() < size {
            got.extend(recv_data(&mut ws).await);
        }
        assert_eq!(got, data);
        moved += size;
        // Open still: what it moved so far, each way.
        session_bytes_until(addr, moved as f64, moved as f64).await;
        assert_eq!(sessions(addr, None).await.len(), 1, "the session is open");
    }
    let normal = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    within("the client's close", ws.close(Some(normal))).await.unwrap();
    read_until_close(&mut ws).await;
    let closed = b.line("session closed").await;
    let (up, down) = (logged(&closed, "bytes_up"), logged(&closed, "bytes_down"));
    assert_eq!((up, down), (moved as f64, moved as f64), "{closed}");
    sessions_until(addr, "the session to leave the table", |l| l.is_empty()).await;
    let m = scrape(addr, None).await;
    assert_eq!((session_bytes(&m, "up"), session_bytes(&m, "down")), (up, down), "counted once");
}

#[tokio::test]
async fn a_session_whose_backend_is_down_is_counted() {
    let bridge = TestBridge::start(config_with(Matcher::Path("/down".into()), tcp(closed_port().await))).await;
    let (admin_addr, _stop) = start_admin(&bridge, None).await;
    // A raw client: tungstenite's rewrites 1014 to 1002.
    let mut ws = raw_ws(bridge.addr, "/down").await;
    assert_eq!(raw_read_close(&mut ws).await.0, 1014);
    // Our close answers the bridge's, so it need not wait for the close deadline.
    ws.write_all(&frame(0x88, &1000u16.to_be_bytes(), true)).await.unwrap();
    sessions_until(admin_addr, "the session to end", |l| l.is_empty()).await;
    let m = scrape(admin_addr, None).await;
    assert_eq!(value(&m, "wsbridge_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    let failed = [("route", "path /down"), ("outcome", "failed")];
    assert_eq!(value(&m, "wsbridge_backend_connects_total", &failed), 1.0);
    let refused = [("route", "path /down"), ("reason", "refused")];
    assert_eq!(value(&m, "wsbridge_backend_connect_failures_total", &refused), 1.0);
    let ended = [
        ("route", "path /down"),
        ("code", "1014"),
        ("ended_by", "bridge"),
        ("cause", "unreachable"),
    ];
    assert_eq!(value(&m, "wsbridge_sessions_ended_total", &ended), 1.0);
}

/// `backend_connect_seconds` of `route`: its count and its `+Inf` bucket's (0, 0 when the route
/// has none).
fn connect_counts(m: &prometheus_parse::Scrape, route: &str) -> (f64, f64) {
    let Some(sample) = m
        .samples
        .iter()
        .find(|s| s.metric == "wsbridge_backend_connect_seconds" && s.labels.get("route") == Some(route))
    else {
        return (0.0, 0.0);
    };
    match &sample.value {
        prometheus_parse::Value::Histogram(buckets) => {
            let inf = buckets.iter().find(|b| b.less_than == f64::INFINITY).expect("+Inf bucket");
            let count = m
                .samples
                .iter()
                .find(|s| s.metric == "wsbridge_backend_connect_seconds_count" && s.labels.get("route") == Some(route))
                .map_or(inf.count, |s| match s.value {
                    prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) | prometheus_parse::Value::Gauge(v) => v,
                    _ => inf.count,
                });
            (count, inf.count)
        }
        other => panic!("not a histogram: {other:?}"),
    }
}

/// The connect histogram is per route: a connect on each of two routes, one that works and one
/// to a closed port (failed connects are observed, as before), is one observation each.
#[tokio::test]
async fn backend_connect_seconds_is_per_route() {
    let (backend, _) = echo_backend().await;
    let mut config = config_with(Matcher::Path("/up".into()), tcp(backend));
    let options = config.default_route_options();
    config.routes.push(wsbridge::config::RouteConfig {
        matcher: Matcher::Path("/down".into()),
        target: tcp(closed_port().await),
        options,
    });
    let bridge = TestBridge::start(config).await;
    let (admin_addr, _stop) = start_admin(&bridge, None).await;
    let (mut ws, _) = ws_connect(&bridge.url("/up"), None).await;
    send_bin(&mut ws, b"up").await;
    assert_eq!(recv_data(&mut ws).await, b"up");
    drop(ws);
    // A raw client: tungstenite's rewrites 1014 to 1002.
    let mut down = raw_ws(bridge.addr, "/down").await;
    assert_eq!(raw_read_close(&mut down).await.0, 1014);
    down.write_all(&frame(0x88, &1000u16.to_be_bytes(), true)).await.unwrap();
    sessions_until(admin_addr, "both sessions to end", |l| l.is_empty()).await;
    let m = scrape(admin_addr, None).await;
    assert_eq!(connect_counts(&m, "path /up"), (1.0, 1.0));
    assert_eq!(connect_counts(&m, "path /down"), (1.0, 1.0));
    let failed = [("route", "path /down"), ("outcome", "failed")];
    assert_eq!(value(&m, "wsbridge_backend_connects_total", &failed), 1.0);
}

#[tokio::test]
async fn readyz_turns_503_when_the_drain_starts_before_the_session_closes() {
    let (backend, mut accepted) = manual_backend().await;
    let bridge = TestBridge::start(config_with(Matcher::Path("/last".into()), tcp(backend))).await;
    let (admin_addr, _stop) = start_admin(&bridge, None).await;
    ready(admin_addr).await;
    assert_eq!(admin(admin_addr, "GET", "/healthz", None).await.0, 200);

    let (mut ws, _) = ws_connect(&bridge.url("/last"), None).await;
    let mut server_side = recv_once_stream(&mut accepted).await;
    // The backend's last words reach the bridge (its live count says so) while the client has
    // not read them: they are in flight when the drain starts.
    let words = pattern(10_000, 7);
    server_side.write_all(&words).await.unwrap();
    sessions_until(admin_addr, "the bridge to relay the backend's bytes", |l| {
        l.len() == 1 && l[0]["bytes_down"] == words.len()
    })
    .await;

    bridge.shutdown.cancel();
    let (status, body) = admin(admin_addr, "GET", "/readyz", None).await;
    assert_eq!((status, body.as_str()), (503, "draining\n"));
    // Not ready, and the session is still there: readiness turned first.
    assert_eq!(
        sessions(admin_addr, None).await.len(),
        1,
        "the session closed before /readyz turned"
    );
    assert_eq!(admin(admin_addr, "GET", "/healthz", None).await.0, 200, "the process still serves");

    let (messages, close) = read_until_close(&mut ws).await;
    let got: Vec<u8> = messages.into_iter().flat_map(|m| m.into_data().to_vec()).collect();
    assert_eq!(got, words, "the data in flight is flushed before the close");
    let close = close.expect("a close frame");
    assert_eq!((u16::from(close.code), close.reason.as_str()), (1001, "server shutting down"));
    let _ = ws.flush().await;
    assert!(within("drain", bridge.handle).await.unwrap().clean);
}

/// With a drain delay, `/readyz` says 503 at once while the bridge keeps serving: a session that
/// a balancer sends before its health check has seen the 503 is still taken, open sessions carry
/// on, and only at the end of the delay do the listeners close and the sessions end with 1001.
#[tokio::test]
async fn a_drain_delay_keeps_serving_after_readyz_turned_503_then_closes_at_its_end() {
    let delay = std::time::Duration::from_millis(2000);
    let (backend, _) = echo_backend().await;
    let mut config = config_with(Matcher::Path("/echo".into()), tcp(backend));
    config.timeouts.drain_delay = Some(delay);
    let bridge = TestBridge::start(config).await;
    let (admin_addr, _stop) = start_admin(&bridge, None).await;
    ready(admin_addr).await;
    let (_, metrics) = admin(admin_addr, "GET", "/metrics", None).await;
    assert!(metrics.lines().any(|l| l == "wsbridge_draining 0"), "{metrics}");
    let (mut before, _) = ws_connect(&bridge.url("/echo"), None).await;
    send_bin(&mut before, b"one").await;
    assert_eq!(recv_data(&mut before).await, b"one");

    let started = std::time::Instant::now();
    let drain = tokio::spawn({
        let bridge = bridge.bridge.clone();
        async move { bridge.drain(std::future::pending()).await }
    });
    within("/readyz to say 503", async {
        while admin(admin_addr, "GET", "/readyz", None).await != (503, "draining\n".to_owned()) {
            tokio::task::yield_now().await;
        }
    })
    .await;
    // The metrics say so as /readyz does (a dashboard sees an instance stuck draining).
    let (_, metrics) = admin(admin_addr, "GET", "/metrics", None).await;
    assert!(metrics.lines().any(|l| l == "wsbridge_draining 1"), "{metrics}");
    // Inside the delay: a new session is taken, and both carry data.
    let (mut during, _) = ws_connect(&bridge.url("/echo"), None).await;
    send_bin(&mut during, b"two").await;
    assert_eq!(recv_data(&mut during).await, b"two");
    send_bin(&mut before, b"three").await;
    assert_eq!(recv_data(&mut before).await, b"three");
    assert!(
        started.elapsed() < delay,
        "the checks took the whole delay: {:?}",
        started.elapsed()
    );

    for ws in [&mut before, &mut during] {
        assert_eq!(read_close(ws).await, (1001, "server shutting down".to_owned()));
        // Our close frame answers the bridge's: the drain need not wait for the close deadline.
        let _ = ws.flush().await;
    }
    assert_window("the sessions' 1001", started.elapsed(), delay);
    within("drain() to return", drain).await.unwrap();
    // The listener is closed now.
    let refused = TcpStream::connect(bridge.addr).await;
    assert!(refused.is_err(), "the listener still accepts after the drain delay");
    assert!(within("drain", bridge.handle).await.unwrap().clean);
}

/// What ends the delay early (a second SIGTERM, in the binary) closes at once.
#[tokio::test]
async fn a_drain_delay_cut_short_closes_at_once() {
    let (backend, _) = echo_backend().await;
    let mut config = config_with(Matcher::Path("/echo".into()), tcp(backend));
    config.timeouts.drain_delay = Some(std::time::Duration::from_secs(3600));
    let bridge = TestBridge::start(config).await;
    let (admin_addr, _stop) = start_admin(&bridge, None).await;
    ready(admin_addr).await;
    let (mut ws, _) = ws_connect(&bridge.url("/echo"), None).await;
    let (hurry, hurried) = tokio::sync::oneshot::channel::<()>();
    let drain = tokio::spawn({
        let bridge = bridge.bridge.clone();
        async move {
            bridge
                .drain(async {
                    let _ = hurried.await;
                })
                .await
        }
    });
    within("/readyz to say 503", async {
        while admin(admin_addr, "GET", "/readyz", None).await.0 != 503 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    send_bin(&mut ws, b"still").await;
    assert_eq!(recv_data(&mut ws).await, b"still");
    hurry.send(()).unwrap();
    assert_eq!(read_close(&mut ws).await, (1001, "server shutting down".to_owned()));
    let _ = ws.flush().await;
    within("drain() to return", drain).await.unwrap();
    assert!(within("drain", bridge.handle).await.unwrap().clean);
}

/// The backend side of the next session.
async fn recv_once_stream(accepted: &mut tokio::sync::mpsc::Receiver<tokio::net::TcpStream>) -> tokio::net::TcpStream {
    within("the backend connection", accepted.recv()).await.expect("backend accepted")
}

#[tokio::test]
async fn sessions_lists_the_open_session_and_delete_ends_it_with_1001() {
    let (backend, _) = echo_backend().await;
    let bridge = TestBridge::start(config_with(Matcher::Path("/echo".into()), tcp(backend))).await;
    let (admin_addr, _stop) = start_admin(&bridge, None).await;
    let (mut ws, _) = ws_connect(&bridge.url("/echo"), None).await;
    send_bin(&mut ws, b"twelve bytes").await;
    assert_eq!(recv_data(&mut ws).await, b"twelve bytes");

    let list = sessions_until(admin_addr, "the session's bytes", |l| {
        l.len() == 1 && l[0]["bytes_up"] == 12 && l[0]["bytes_down"] == 12
    })
    .await;
    let s = &list[0];
    assert_eq!(s["route"], "path /echo");
    assert_eq!(s["target"], backend.to_string());
    assert!(s["client"].as_str().unwrap().starts_with("127.0.0.1:"), "{s}");
    assert!(s["age_seconds"].as_f64().unwrap() >= 0.0, "{s}");
    let id = s["id"].as_u64().unwrap();

    assert_eq!(admin(admin_addr, "DELETE", "/sessions/999999", None).await.0, 404);
    let (status, body) = admin(admin_addr, "DELETE", &format!("/sessions/{id}"), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(read_close(&mut ws).await, (1001, "closed by the operator".to_owned()));
    // tungstenite has queued its answer to the bridge's close; this sends it.
    match ws.flush().await {
        Ok(()) | Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed) => {}
        Err(e) => panic!("answering the close: {e}"),
    }
    sessions_until(admin_addr, "the session to end", |l| l.is_empty()).await;
    let m = scrape(admin_addr, None).await;
    let ended = [
        ("route", "path /echo"),
        ("code", "1001"),
        ("ended_by", "operator"),
        ("cause", "operator"),
    ];
    assert_eq!(value(&m, "wsbridge_sessions_ended_total", &ended), 1.0);

    // POST /sessions/ID/close does the same.
    let (mut ws, _) = ws_connect(&bridge.url("/echo"), None).await;
    let list = sessions_until(admin_addr, "the second session", |l| l.len() == 1).await;
    let id = list[0]["id"].as_u64().unwrap();
    assert_eq!(admin(admin_addr, "POST", &format!("/sessions/{id}/close"), None).await.0, 200);
    assert_eq!(read_close(&mut ws).await, (1001, "closed by the operator".to_owned()));
}

#[tokio::test]
async fn the_admin_token_is_required_when_set() {
    let (backend, _) = echo_backend().await;
    let bridge = TestBridge::start(any_path_to(backend)).await;
    let token = "Ahd8-secret";
    let (admin_addr, _stop) = start_admin(&bridge, Some(token)).await;
    for path in ["/metrics", "/sessions"] {
        assert_eq!(admin(admin_addr, "GET", path, None).await.0, 401, "{path} without a token");
        assert_eq!(
            admin(admin_addr, "GET", path, Some("wrong")).await.0,
            401,
            "{path} with a wrong token"
        );
        assert_eq!(admin(admin_addr, "GET", path, Some(token)).await.0, 200, "{path} with the token");
    }
    assert_eq!(admin(admin_addr, "DELETE", "/sessions/1", None).await.0, 401);
    // Balancers probe these without credentials; they tell nothing.
    assert_eq!(admin(admin_addr, "GET", "/healthz", None).await.0, 200);
    assert!(matches!(admin(admin_addr, "GET", "/readyz", None).await.0, 200 | 503));
    // The metrics never show the token.
    let (_, body) = admin(admin_addr, "GET", "/metrics", Some(token)).await;
    assert!(!body.contains(token));
}

#[tokio::test]
async fn unknown_admin_paths_and_methods_get_their_status() {
    let (backend, _) = echo_backend().await;
    let bridge = TestBridge::start(any_path_to(backend)).await;
    let (admin_addr, _stop) = start_admin(&bridge, None).await;
    assert_eq!(admin(admin_addr, "GET", "/nothing", None).await.0, 404);
    assert_eq!(admin(admin_addr, "POST", "/healthz", None).await.0, 405);
    assert_eq!(admin(admin_addr, "DELETE", "/sessions/abc", None).await.0, 404);
    let response = http_raw(admin_addr, b"NOT HTTP\r\n\r\n").await;
    assert_eq!(status_of(&response), 400, "{response}");
}

#[tokio::test]
async fn tls_handshakes_and_the_certificate_expiry_are_exported() {
    use crate::common::pki::*;
    use tokio_rustls::rustls;
    let pki = Pki::new("admin test CA");
    let cert = pki.server("server", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let (backend, _) = echo_backend().await;
    let mut config = any_path_to(backend);
    config.listeners.push(wsbridge::config::ListenerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        web: None,
        web_listing: false,
        web_follow_symlinks: false,
        web_dotfiles: false,
        ipv6_only: None,
        access: Default::default(),
        tls: Some(wsbridge::tls::TlsSettings {
            watch: None,
            ..wsbridge::tls::TlsSettings::new(wsbridge::tls::CertFiles {
                cert: cert.cert.clone(),
                key: Some(cert.key.clone()),
            })
        }),
    });
    let bridge = TestBridge::start(config).await;
    let (admin_addr, _stop) = start_admin(&bridge, None).await;
    ready(admin_addr).await;
    let versions: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

    let stream = tls_connect(bridge.addr, "localhost", client_config(&pki.ca_pem, None, versions))
        .await
        .unwrap();
    let mut ws = wss_over(stream, &format!("wss://localhost:{}/", bridge.addr.port())).await;
    send_bin(&mut ws, b"over TLS").await;
    assert_eq!(recv_data(&mut ws).await, b"over TLS");
    // A client that trusts another CA gives up in the handshake: a failure on the bridge's side.
    let other = Pki::new("another CA");
    assert!(tls_connect(bridge.addr, "localhost", client_config(&other.ca_pem, None, versions))
        .await
        .is_err());

    let m = scrape_until(admin_addr, "the failed handshake to be counted", |m| {
        value(m, "wsbridge_tls_handshakes_total", &[("outcome", "failed")]) >= 1.0
    })
    .await;
    assert_eq!(value(&m, "wsbridge_tls_handshakes_total", &[("outcome", "ok")]), 1.0);
    assert_eq!(value(&m, "wsbridge_tls_handshakes_total", &[("outcome", "failed")]), 1.0);

    let der = rustls_pki_types::pem::PemObject::from_pem_slice(cert.cert_pem.as_bytes());
    let der: rustls_pki_types::CertificateDer<'_> = der.unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    let expected = parsed.validity().not_after.timestamp() as f64 - now;
    let label = cert.cert.display().to_string();
    let got = value(&m, "wsbridge_certificate_expiry_seconds", &[("cert", label.as_str())]);
    assert!((got - expected).abs() < 120.0, "expiry {got} s, the certificate says {expected} s");
}

/// The expiry exported is the certificate's in service, not the file's: a renewal that wrote a
/// new certificate but left the old key beside it fails its reload, the old certificate stays
/// in service, and the metric goes on saying when that one runs out (it said the new file's 30
/// days while clients were shown a certificate that had expired: found by a TLS review). Once a
/// reload puts the new pair in service, its dates are exported.
#[tokio::test]
async fn the_certificate_expiry_is_the_one_in_service() {
    use crate::common::pki::*;
    let pki = Pki::new("admin test CA");
    let old = pki.server_dated("server", &["localhost"], (2019, 1, 1), (2020, 1, 2));
    let (backend, _) = echo_backend().await;
    let mut config = any_path_to(backend);
    config.listeners.push(wsbridge::config::ListenerConfig {
        tls: Some(wsbridge::tls::TlsSettings {
            watch: None,
            ..wsbridge::tls::TlsSettings::new(wsbridge::tls::CertFiles {
                cert: old.cert.clone(),
                key: Some(old.key.clone()),
            })
        }),
        ..wsbridge::config::ListenerConfig::new("127.0.0.1:0".parse().unwrap())
    });
    let bridge = TestBridge::start(config).await;
    let (admin_addr, _stop) = start_admin(&bridge, None).await;
    let label = old.cert.display().to_string();
    let expiry = |m: &prometheus_parse::Scrape| value(m, "wsbridge_certificate_expiry_seconds", &[("cert", label.as_str())]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    let expired_at = 1_577_923_200.0; // 2020-01-02T00:00:00Z
    let m = scrape_until(admin_addr, "the expiry", |m| {
        m.samples.iter().any(|s| s.metric == "wsbridge_certificate_expiry_seconds")
    })
    .await;
    assert!((expiry(&m) - (expired_at - now)).abs() < 120.0, "{}", expiry(&m));
    // Half a renewal: a new certificate (valid for years), its key not written yet.
    let renewer = Pki::new("admin test CA 2");
    let renewed = renewer.server("renewed", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    std::fs::copy(&renewed.cert, &old.cert).unwrap();
    assert!(
        !bridge.bridge.reload_tls().is_empty(),
        "the old key does not match the new certificate"
    );
    let m = scrape_until(admin_addr, "a scrape", |_| true).await;
    assert!(expiry(&m) < 0.0, "the expired certificate is still in service: {}", expiry(&m));
    // The key follows: the new pair is in service, and its dates are exported.
    std::fs::copy(&renewed.key, &old.key).unwrap();
    assert!(bridge.bridge.reload_tls().is_empty());
    let m = scrape_until(admin_addr, "a scrape", |_| true).await;
    assert!(expiry(&m) > 365.0 * 86400.0, "{}", expiry(&m));
}

#[tokio::test]
async fn the_binary_serves_the_admin_endpoints_with_admin_addr() {
    use crate::common::binary::{Binary, BIN};
    let backend = closed_port().await.to_string();
    let b = Binary::spawn(&["127.0.0.1:0", &backend, "--admin", "127.0.0.1:0"]).await;
    let addr = b.admin_addr().await;
    assert_eq!(admin(addr, "GET", "/healthz", None).await.0, 200);
    within("readiness", async {
        while admin(addr, "GET", "/readyz", None).await.0 != 200 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let (status, body) = admin(addr, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    // (backend_connect_seconds is per route now: exported from a route's first session on.)
    assert!(body.contains("# TYPE wsbridge_build_info gauge"), "{body}");

    let help = std::process::Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--admin <ADDR>"), "{help}");
}

/// Unix time now, in seconds.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The process metrics of a real bridge process, unprefixed as every Prometheus client exports
/// them, against what the test sees of that process from outside (/proc/PID): its start within
/// the test's window, its open-file soft limit (the one the bridge raised at start), open
/// descriptors under it and growing by at least one for each WebSocket session held open,
/// resident memory near what the kernel says.
#[tokio::test]
async fn process_metrics_describe_the_bridge_process() {
    use crate::common::binary::{rss, Binary};
    const TEST: &str = "process_metrics_describe_the_bridge_process";
    if !std::path::Path::new("/proc/self/stat").exists() {
        return skip(TEST, "no /proc here: the test reads the bridge's figures from /proc/PID");
    }
    let (backend, _) = echo_backend().await;
    let before = unix_now();
    let b = Binary::spawn(&["127.0.0.1:0", &backend.to_string(), "--admin", "127.0.0.1:0"]).await;
    let after = unix_now();
    let addr = b.admin_addr().await;
    let proc_dir = format!("/proc/{}", b.pid());

    let (status, body) = admin(addr, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    for name in ["process_open_fds", "process_max_fds", "process_start_time_seconds"] {
        assert!(body.contains(&format!("# TYPE {name} gauge")), "{name} unprefixed: {body}");
    }
    assert!(body.contains("# TYPE process_cpu_seconds_total counter"), "{body}");
    let m = scrape(addr, None).await;

    // /proc's start is the boot time (whole seconds) plus clock ticks: up to a second early.
    let start = value(&m, "process_start_time_seconds", &[]);
    assert!(
        start >= before - 2.0 && start <= after + 1.0,
        "started {start}, spawned in [{before}, {after}]"
    );
    let limits = std::fs::read_to_string(format!("{proc_dir}/limits")).unwrap();
    let soft: f64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no open-file limit in {limits}"));
    let max = value(&m, "process_max_fds", &[]);
    assert_eq!(max, soft, "the bridge's soft limit, as /proc/PID/limits says it");
    let open = value(&m, "process_open_fds", &[]);
    assert!(open > 0.0 && open <= max, "open {open}, max {max}");
    let seen = std::fs::read_dir(format!("{proc_dir}/fd")).unwrap().count() as f64;
    // Its own count holds the directory it reads, and the admin connection's descriptor.
    assert!((open - seen).abs() <= 3.0, "open {open}, the test sees {seen}");
    let resident = value(&m, "process_resident_memory_bytes", &[]);
    let kernel = rss(b.pid()).expect("VmRSS") as f64;
    assert!(
        resident > 0.0 && resident > kernel / 2.0 && resident < kernel * 2.0,
        "resident {resident}, VmRSS {kernel}"
    );
    assert!(value(&m, "process_virtual_memory_bytes", &[]) >= resident);
    let cpu = value(&m, "process_cpu_seconds_total", &[]);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    assert!(cpu >= 0.0 && cpu <= (unix_now() - before) * cores + 0.1, "cpu {cpu} s");

    // K sessions held open: a client socket and a backend socket each.
    const K: usize = 20;
    let mut held = Vec::new();
    for _ in 0..K {
        held.push(ws_connect(&format!("ws://{}/", b.addr), None).await.0);
    }
    sessions_until(addr, "the sessions to be open", |l| l.len() == K).await;
    let m = scrape(addr, None).await;
    let grown = value(&m, "process_open_fds", &[]) - open;
    assert!(grown >= K as f64, "{K} sessions open, the descriptors grew by {grown}");
    assert!(value(&m, "process_open_fds", &[]) <= value(&m, "process_max_fds", &[]));
    drop(held);
}

#[tokio::test]
async fn after_sigterm_the_binarys_readyz_says_503_while_a_session_drains() {
    use crate::common::binary::Binary;
    let (backend, mut accepted) = manual_backend().await;
    let mut b = Binary::spawn(&["127.0.0.1:0", &backend.to_string(), "--admin", "127.0.0.1:0"]).await;
    let addr = b.admin_addr().await;
    let (mut ws, _) = ws_connect(&format!("ws://{}/", b.addr), None).await;
    let mut server_side = recv_once_stream(&mut accepted).await;
    server_side.write_all(b"still here").await.unwrap();
    assert_eq!(recv_data(&mut ws).await, b"still here");
    assert_eq!(admin(addr, "GET", "/readyz", None).await.0, 200);

    b.signal("TERM").await;
    b.line("shutting down").await;
    // The session waits for our answer to its close frame: the process is draining, not gone.
    let (status, body) = admin(addr, "GET", "/readyz", None).await;
    assert_eq!((status, body.as_str()), (503, "draining\n"));
    assert_eq!(sessions(addr, None).await.len(), 1);
    assert_eq!(read_close(&mut ws).await, (1001, "server shutting down".to_owned()));
}

/// The binary's `--drain-delay`: after SIGTERM `/readyz` says 503 and sessions still open; a
/// second SIGTERM cuts the (hour-long) delay short and the sessions get their 1001.
#[tokio::test]
async fn the_binarys_drain_delay_serves_on_after_sigterm_and_a_second_sigterm_ends_it() {
    use crate::common::binary::Binary;
    let (backend, _) = echo_backend().await;
    let mut b = Binary::spawn(&["127.0.0.1:0", &backend.to_string(), "--admin", "127.0.0.1:0", "--drain-delay", "1h"]).await;
    let addr = b.admin_addr().await;
    let (mut before, _) = ws_connect(&format!("ws://{}/", b.addr), None).await;
    b.signal("TERM").await;
    b.line("draining").await;
    assert_eq!(admin(addr, "GET", "/readyz", None).await, (503, "draining\n".to_owned()));
    let (mut during, _) = ws_connect(&format!("ws://{}/", b.addr), None).await;
    send_bin(&mut during, b"taken").await;
    assert_eq!(recv_data(&mut during).await, b"taken");

    b.signal("TERM").await;
    b.line("drain delay cut short").await;
    for ws in [&mut before, &mut during] {
        assert_eq!(read_close(ws).await, (1001, "server shutting down".to_owned()));
        let _ = ws.flush().await;
    }
    assert_eq!(b.exit_code().await, 0);
}

#[tokio::test]
async fn refusals_past_the_connection_cap_are_counted() {
    let (backend, _) = echo_backend().await;
    let mut config = any_path_to(backend);
    config.limits.max_connections = 1;
    let bridge = TestBridge::start(config).await;
    let (admin_addr, _stop) = start_admin(&bridge, None).await;
    let (mut ws, _) = ws_connect(&bridge.url("/"), None).await;
    send_bin(&mut ws, b"holding the only slot").await;
    recv_data(&mut ws).await;
    for _ in 0..2 {
        let response = http_raw(bridge.addr, &upgrade_request("/", "")).await;
        assert_eq!(status_of(&response), 503, "{response}");
    }
    let m = scrape(admin_addr, None).await;
    let over = [("status", "503"), ("reason", "connection_limit")];
    assert_eq!(value(&m, "wsbridge_handshakes_refused_total", &over), 2.0);
    assert_eq!(value(&m, "wsbridge_sessions_open", &[("route", "any path")]), 1.0);
}

#[tokio::test]
async fn a_failed_and_a_good_reload_are_counted_with_their_time() {
    let (backend, _) = echo_backend().await;
    let bridge = TestBridge::start(any_path_to(backend)).await;
    let (admin_addr, _stop) = start_admin(&bridge, None).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wsbridge.toml");
    let failed = [("kind", "config"), ("outcome", "failed")];
    let ok = [("kind", "config"), ("outcome", "ok")];
    // The reload counters are the process's (token files are re-read without a bridge): compare
    // before and after, as other tests may reload meanwhile.
    let before = scrape(admin_addr, None).await;
    let reload = |text: &'static str| {
        let (bridge, file) = (bridge.bridge.clone(), file.clone());
        tokio::task::spawn_blocking(move || {
            std::fs::write(&file, text).unwrap();
            wsbridge::server::start::reload(&bridge, Some(&file), 1);
        })
    };
    within("a bad reload", reload("[[listen]]\naddr = \"127.0.0.1:1\"\nnot toml\n"))
        .await
        .unwrap();
    within(
        "a good reload",
        reload("[[listen]]\naddr = \"127.0.0.1:1\"\n[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:1\"\n"),
    )
    .await
    .unwrap();
    let after = scrape(admin_addr, None).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for labels in [&failed, &ok] {
        let counted = value(&after, "wsbridge_reloads_total", labels) - value(&before, "wsbridge_reloads_total", labels);
        assert!(counted >= 1.0, "{labels:?}: {counted}");
        let at = value(&after, "wsbridge_reload_last_timestamp_seconds", labels);
        assert!((now - at).abs() < 60.0, "{labels:?}: last at {at}, now {now}");
    }
}

/// A process's first failed reload is something an alert can see: the failure counter is
/// exported at 0 from the start (a series first seen at 1 has no increase), and
/// `last_reload_successful` says 0 until a reload works again, however long that takes.
#[tokio::test]
async fn the_first_failed_reload_of_a_process_is_visible_to_an_alert() {
    use crate::common::binary::Binary;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wsbridge.toml");
    let good = "[admin]\naddr = \"127.0.0.1:0\"\n[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:9\"\n";
    std::fs::write(&file, good).unwrap();
    let mut b = Binary::spawn(&["--config", file.to_str().unwrap()]).await;
    let addr = b.admin_addr().await;
    let config = [("kind", "config")];
    let failed = [("kind", "config"), ("outcome", "failed")];
    let m = scrape(addr, None).await;
    assert!(m
        .samples
        .iter()
        .any(|s| s.metric == "wsbridge_reloads_total" && s.labels.get("outcome") == Some("failed")));
    assert_eq!(value(&m, "wsbridge_reloads_total", &failed), 0.0);
    assert_eq!(value(&m, "wsbridge_last_reload_successful", &config), 1.0);

    std::fs::write(&file, format!("{good}not toml\n")).unwrap();
    b.signal("HUP").await;
    b.line("reload failed").await;
    let m = scrape(addr, None).await;
    assert_eq!(value(&m, "wsbridge_reloads_total", &failed), 1.0);
    assert_eq!(value(&m, "wsbridge_last_reload_successful", &config), 0.0);

    std::fs::write(&file, good).unwrap();
    b.signal("HUP").await;
    b.line("configuration reloaded").await;
    let m = scrape(addr, None).await;
    assert_eq!(value(&m, "wsbridge_last_reload_successful", &config), 1.0);
    assert_eq!(value(&m, "wsbridge_last_reload_successful", &[("kind", "tokens")]), 1.0);
}

/// A file of a token directory that is a link whose target went away (a Kubernetes volume caught
/// between two versions, a file removed under its link) is an unreadable file: left out with a
/// warning, and `last_reload_successful{kind="tokens"}` at 0 for an alert, as a file the bridge may
/// not read is (a review: its tokens were dropped without a word, the metric at 1). The rest of
/// the directory is read as usual.
#[tokio::test]
async fn a_token_files_link_to_nothing_is_a_failed_reread() {
    use crate::common::binary::Binary;
    let dir = tempfile::tempdir().unwrap();
    let (tokens, versions) = (dir.path().join("tokens"), dir.path().join("v1"));
    std::fs::create_dir_all(&tokens).unwrap();
    std::fs::create_dir_all(&versions).unwrap();
    std::fs::write(tokens.join("desks"), "desk1: 127.0.0.1:9\n").unwrap();
    std::fs::write(versions.join("labs"), "lab1: 127.0.0.1:9\n").unwrap();
    std::os::unix::fs::symlink(versions.join("labs"), tokens.join("labs")).unwrap();
    let file = dir.path().join("wsbridge.toml");
    std::fs::write(
        &file,
        "[admin]\naddr = \"127.0.0.1:0\"\n[[listen]]\naddr = \"127.0.0.1:0\"\n[[tokens]]\nsource = \"tokens\"\n",
    )
    .unwrap();
    let mut b = Binary::spawn(&["--config", file.to_str().unwrap()]).await;
    let addr = b.admin_addr().await;
    let tokens_kind = [("kind", "tokens")];
    assert_eq!(
        value(&scrape(addr, None).await, "wsbridge_last_reload_successful", &tokens_kind),
        1.0
    );
    std::fs::remove_dir_all(&versions).unwrap();
    // Each scrape looks at the token files.
    scrape_until(addr, "the link to nothing to fail the re-read", |m| {
        value(m, "wsbridge_last_reload_successful", &tokens_kind) == 0.0
    })
    .await;
    let line = b.line("labs").await;
    assert!(
        line.contains("WARN") && line.contains("a link to a file that is not there"),
        "{line}"
    );
    // The rest of the directory is in force; the link's tokens are not.
    let desk = http_raw(b.addr, &upgrade_request("/?token=desk1", "")).await;
    assert_ne!(status_of(&desk), 404, "{desk}");
    let lab = http_raw(b.addr, &upgrade_request("/?token=lab1", "")).await;
    assert_eq!(status_of(&lab), 404, "{lab}");
}

/// The token's scheme in any case (RFC 9110: `bearer` is `Bearer`), a HEAD's Content-Length as
/// its GET's, and a wrong token said in the log (an admin review: 401 to `bearer`, a HEAD of
/// length 0, and guesses nowhere to be seen).
#[tokio::test]
async fn the_admin_takes_bearer_in_any_case_answers_head_as_get_and_logs_a_wrong_token() {
    use crate::common::binary::Binary;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wsbridge.toml");
    std::fs::write(
        &file,
        "[admin]\naddr = \"127.0.0.1:0\"\ntoken = \"the-admin-token-0123\"\n[[listen]]\naddr = \"127.0.0.1:0\"\n\
         [[route]]\npath = \"/\"\ntarget = \"127.0.0.1:9\"\n",
    )
    .unwrap();
    let mut b = Binary::spawn(&["--config", file.to_str().unwrap()]).await;
    let addr = b.admin_addr().await;
    let ask = |method: &str, auth: &str| format!("{method} /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n");
    let get = http_raw(addr, ask("GET", "bearer the-admin-token-0123").as_bytes()).await;
    assert_eq!(status_of(&get), 200, "{get}");
    let length = |r: &str| {
        r.lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|n| n.trim().parse::<usize>().ok())
            .unwrap()
    };
    let head = http_raw(addr, ask("HEAD", "BEARER the-admin-token-0123").as_bytes()).await;
    assert_eq!(status_of(&head), 200, "{head}");
    assert!(head.ends_with("\r\n\r\n"), "no body: {head}");
    // Within a few bytes: the metrics move between the two requests.
    assert!(length(&head).abs_diff(length(&get)) < 200, "{} / {}", length(&head), length(&get));
    let wrong = http_raw(addr, ask("GET", "Bearer a-guess").as_bytes()).await;
    assert_eq!(status_of(&wrong), 401, "{wrong}");
    let line = b.line("admin request without the right token").await;
    assert!(
        line.contains("INFO") && line.contains("path=/metrics") && !line.contains("a-guess"),
        "{line}"
    );
}

/// A Redis source's `credentials_file` broken and then fixed while its connection lasts: a
/// scrape reads it again, so the alert rises and falls with the file (a review: it rose only at
/// the next connect, and held after the file was fixed until Redis dropped the connection or a
/// SIGHUP). No Redis is needed: the source connects at its first lookup.
#[tokio::test]
async fn a_scrape_re_reads_a_redis_credentials_file() {
    use crate::common::binary::Binary;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wsbridge.toml");
    let cred = dir.path().join("redis.cred");
    std::fs::write(&cred, "bridge\nbridge-pw\n").unwrap();
    std::fs::write(
        &file,
        "[admin]\naddr = \"127.0.0.1:0\"\n[[listen]]\naddr = \"127.0.0.1:0\"\n[[tokens]]\nallow_targets = [\"127.0.0.1/32:9\"]\n\
         [tokens.redis]\nurl = \"redis://127.0.0.1:9/\"\ncredentials_file = \"redis.cred\"\n",
    )
    .unwrap();
    let b = Binary::spawn(&["--config", file.to_str().unwrap()]).await;
    let addr = b.admin_addr().await;
    let credentials = [("kind", "credentials")];
    assert_eq!(
        value(&scrape(addr, None).await, "wsbridge_last_reload_successful", &credentials),
        1.0
    );
    std::fs::write(&cred, "").unwrap();
    assert_eq!(
        value(&scrape(addr, None).await, "wsbridge_last_reload_successful", &credentials),
        0.0
    );
    std::fs::write(&cred, "bridge\nbridge-pw-2\n").unwrap();
    let m = scrape(addr, None).await;
    assert_eq!(value(&m, "wsbridge_last_reload_successful", &credentials), 1.0);
    assert_eq!(
        value(&m, "wsbridge_reloads_total", &[("kind", "credentials"), ("outcome", "ok")]),
        1.0
    );

    // A FIFO in the file's place (as a file on a mount that hangs, it would hold whoever opens
    // it: an admin review froze the bridge so, and a second review every later re-read) is not
    // opened: the scrape answers at once with the re-read failed, the bridge serves meanwhile,
    // and a good file after it is read.
    std::fs::remove_file(&cred).unwrap();
    let status = std::process::Command::new("mkfifo").arg(&cred).status().unwrap();
    assert!(status.success());
    let started = std::time::Instant::now();
    let m = scrape(addr, None).await;
    assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(value(&m, "wsbridge_last_reload_successful", &credentials), 0.0);
    assert_eq!(admin(addr, "GET", "/healthz", None).await.0, 200);
    std::fs::remove_file(&cred).unwrap();
    std::fs::write(&cred, "bridge\nbridge-pw-3\n").unwrap();
    assert_eq!(
        value(&scrape(addr, None).await, "wsbridge_last_reload_successful", &credentials),
        1.0
    );
    drop(b);
}

/// `wsbridge_config_info` names the file in force and its text's SHA-256, as `sha256sum` prints
/// it (a fleet review: nothing showed which configuration each instance ran, so one that missed a
/// SIGHUP looked like the others): set at start, kept by a failed reload, changed by one that
/// worked.
#[tokio::test]
async fn config_info_says_which_file_is_in_force() {
    use crate::common::binary::Binary;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wsbridge.toml");
    let path = file.to_str().unwrap();
    let sha256sum = |file: &str| {
        let out = std::process::Command::new("sha256sum").arg(file).output().expect("sha256sum");
        String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
    };
    let in_force = |m: &prometheus_parse::Scrape| -> Vec<(String, String)> {
        m.samples
            .iter()
            .filter(|s| s.metric == "wsbridge_config_info")
            .map(|s| {
                (
                    s.labels.get("file").unwrap_or("").to_owned(),
                    s.labels.get("sha256").unwrap_or("").to_owned(),
                )
            })
            .collect()
    };
    let good = "[admin]\naddr = \"127.0.0.1:0\"\n[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:9\"\n";
    std::fs::write(&file, good).unwrap();
    let first = sha256sum(path);
    let mut b = Binary::spawn(&["--config", path]).await;
    let addr = b.admin_addr().await;
    assert_eq!(in_force(&scrape(addr, None).await), [(path.to_owned(), first.clone())]);

    std::fs::write(&file, format!("{good}not toml\n")).unwrap();
    b.signal("HUP").await;
    b.line("reload failed").await;
    assert_eq!(in_force(&scrape(addr, None).await), [(path.to_owned(), first.clone())]);

    std::fs::write(&file, format!("{good}# edited\n")).unwrap();
    let second = sha256sum(path);
    assert_ne!(first, second);
    b.signal("HUP").await;
    b.line("configuration reloaded").await;
    assert_eq!(in_force(&scrape(addr, None).await), [(path.to_owned(), second)]);
}

/// A reload puts a new admin token in force (rotating a leaked one needs no restart), and names
/// each listener change it cannot apply rather than reporting them done.
#[tokio::test]
async fn a_reload_rotates_the_admin_token_and_names_the_listener_changes_it_leaves() {
    use crate::common::binary::Binary;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wsbridge.toml");
    let config = |token: &str, listeners: &str| {
        format!("[admin]\naddr = \"127.0.0.1:0\"\ntoken = \"{token}\"\n{listeners}[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:9\"\n")
    };
    std::fs::write(&file, config("the-first-token", "[[listen]]\naddr = \"127.0.0.1:0\"\n")).unwrap();
    let mut b = Binary::spawn(&["--config", file.to_str().unwrap()]).await;
    let addr = b.admin_addr().await;
    assert_eq!(admin(addr, "GET", "/metrics", Some("the-first-token")).await.0, 200);

    let listeners = "[[listen]]\naddr = \"127.0.0.1:0\"\nproxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\"]\n\
                     [[listen]]\naddr = \"127.0.0.1:1\"\n";
    std::fs::write(&file, config("the-second-token", listeners)).unwrap();
    b.signal("HUP").await;
    let changed = b.line("listener 127.0.0.1:0: ").await;
    assert!(
        changed.contains("WARN") && changed.contains("proxy_protocol, trusted_proxies changed in the file; in force after a restart"),
        "{changed}"
    );
    let added = b.line("listener 127.0.0.1:1: ").await;
    assert!(added.contains("added to the file; it is served after a restart"), "{added}");
    b.line("configuration reloaded").await;
    assert_eq!(admin(addr, "GET", "/metrics", Some("the-first-token")).await.0, 401);
    assert_eq!(admin(addr, "GET", "/metrics", Some("the-second-token")).await.0, 200);

    // [admin] removed, then moved: each said, as a listener's change is (an operations review:
    // nothing but the generic line), and the admin listener serves on as it was.
    std::fs::write(
        &file,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:9\"\n",
    )
    .unwrap();
    b.signal("HUP").await;
    let removed = b.line("admin listener: ").await;
    assert!(
        removed.contains("WARN") && removed.contains("[admin] removed from the file; it serves on"),
        "{removed}"
    );
    std::fs::write(
        &file,
        config("the-second-token", "[[listen]]\naddr = \"127.0.0.1:0\"\n").replace("127.0.0.1:0\"\ntoken", "127.0.0.1:1\"\ntoken"),
    )
    .unwrap();
    b.signal("HUP").await;
    let moved = b.line("admin listener: addr changed").await;
    assert!(
        moved.contains("WARN") && moved.contains("in the file to 127.0.0.1:1; it serves on at 127.0.0.1:0"),
        "{moved}"
    );
    assert_eq!(admin(addr, "GET", "/metrics", Some("the-second-token")).await.0, 200);
}

/// `--admin` beside `--config` wins over the file's address, and a reload reads the file only:
/// a file without `[admin]` is no change waiting for a restart (a review found the warning on
/// every SIGHUP, which a logrotate `postrotate` sends nightly).
#[tokio::test]
async fn a_reload_under_the_admin_flag_does_not_warn_of_the_files_admin() {
    use crate::common::binary::Binary;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wsbridge.toml");
    std::fs::write(
        &file,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:9\"\n",
    )
    .unwrap();
    let mut b = Binary::spawn(&["--config", file.to_str().unwrap(), "--admin", "127.0.0.1:0"]).await;
    let addr = b.admin_addr().await;
    b.signal("HUP").await;
    b.line("configuration reloaded").await;
    assert!(!b.lines().iter().any(|l| l.contains("admin listener:")), "{:#?}", b.lines());
    assert_eq!(admin(addr, "GET", "/healthz", None).await.0, 200);
}

/// The binary on `dir/wsbridge.toml`: an `[admin]` table and a listener, both on port 0, then
/// `rest`; with its admin address.
async fn with_admin(dir: &std::path::Path, rest: &str) -> (crate::common::binary::Binary, SocketAddr) {
    let file = dir.join("wsbridge.toml");
    std::fs::write(
        &file,
        format!("[admin]\naddr = \"127.0.0.1:0\"\n[[listen]]\naddr = \"127.0.0.1:0\"\n{rest}"),
    )
    .unwrap();
    let b = crate::common::binary::Binary::spawn(&["--config", file.to_str().unwrap()]).await;
    let addr = b.admin_addr().await;
    (b, addr)
}

/// A token file changed (here, broken) is re-read when the metrics are scraped, not only when a
/// client looks a token up: the scrape shows the re-read and the log its skipped line, with no
/// traffic at all.
#[tokio::test]
async fn a_scrape_re_reads_a_changed_token_file_without_any_lookup() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.cfg");
    std::fs::write(&tokens, "desk1: 127.0.0.1:5901\n").unwrap();
    let (mut b, addr) = with_admin(dir.path(), "[[tokens]]\nsource = \"tokens.cfg\"\n").await;
    let ok = [("kind", "tokens"), ("outcome", "ok")];
    assert_eq!(value(&scrape(addr, None).await, "wsbridge_reloads_total", &ok), 0.0);
    std::fs::write(&tokens, "desk1: 127.0.0.1:5901\ndesk2 127.0.0.1:5902\n").unwrap();
    scrape_until(addr, "a scrape to re-read the file", |m| {
        value(m, "wsbridge_reloads_total", &ok) >= 1.0
    })
    .await;
    let skipped = b.line("token line skipped").await;
    assert!(skipped.contains("WARN") && skipped.contains("tokens.cfg:2"), "{skipped}");
}

/// A route's credentials file is re-read at a scrape too, with no client at all (a docs check:
/// only a request re-read it, so an edit made at a quiet hour showed nowhere); a file removed
/// (nothing in force, every request refused) holds `last_reload_successful{kind="credentials"}`
/// at 0 until it is back.
#[tokio::test]
async fn a_scrape_re_reads_a_credentials_file_and_a_removed_one_holds_the_alert() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("bearer.txt");
    std::fs::write(&tokens, "first\n").unwrap();
    let route = "[[route]]\npath = \"/t\"\ntarget = \"127.0.0.1:9\"\nauth = { bearer_file = \"bearer.txt\" }\n";
    let (mut b, addr) = with_admin(dir.path(), route).await;
    let ok = [("kind", "credentials"), ("outcome", "ok")];
    let in_force = [("kind", "credentials")];
    assert_eq!(value(&scrape(addr, None).await, "wsbridge_reloads_total", &ok), 0.0);
    std::fs::write(&tokens, "first\nsecond\n").unwrap();
    scrape_until(addr, "a scrape to re-read the file", |m| {
        value(m, "wsbridge_reloads_total", &ok) >= 1.0
    })
    .await;
    b.line("bearer token file re-read").await;
    std::fs::remove_file(&tokens).unwrap();
    scrape_until(addr, "the removed file to show", |m| {
        value(m, "wsbridge_last_reload_successful", &in_force) == 0.0
    })
    .await;
    std::fs::write(&tokens, "third\n").unwrap();
    scrape_until(addr, "the file back", |m| {
        value(m, "wsbridge_last_reload_successful", &in_force) == 1.0
    })
    .await;
}

/// A file of a token directory left out because it cannot be read (here: bytes that are no
/// text; as the service's user, a mode it may not read) holds `last_reload_successful{kind="tokens"}`
/// at 0 until it can be read: its tokens are out of force (a docs check: counted as a success).
#[tokio::test]
async fn a_token_file_left_out_holds_the_alert() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.d");
    std::fs::create_dir(&tokens).unwrap();
    std::fs::write(tokens.join("a"), "desk1: 127.0.0.1:5901\n").unwrap();
    let (mut b, addr) = with_admin(dir.path(), "[[tokens]]\nsource = \"tokens.d\"\n").await;
    let in_force = [("kind", "tokens")];
    std::fs::write(tokens.join("b"), b"desk2: \xff\n").unwrap();
    scrape_until(addr, "the file left out to show", |m| {
        value(m, "wsbridge_last_reload_successful", &in_force) == 0.0
    })
    .await;
    b.line("token file left out").await;
    std::fs::write(tokens.join("b"), "desk2: 127.0.0.1:5902\n").unwrap();
    scrape_until(addr, "the file read", |m| {
        value(m, "wsbridge_last_reload_successful", &in_force) == 1.0
    })
    .await;
}

/// With two token sources, one unreadable keeps `last_reload_successful{kind="tokens"}` at 0
/// however often the other is re-read well: the alert holds until that source is fixed.
#[tokio::test]
async fn one_broken_token_source_holds_the_alert_while_another_reloads_well() {
    use crate::common::binary::Binary;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.cfg"), dir.path().join("b.cfg"));
    std::fs::write(&a, "desk1: 127.0.0.1:5901\n").unwrap();
    std::fs::write(&b, "desk2: 127.0.0.1:5902\n").unwrap();
    let file = dir.path().join("wsbridge.toml");
    std::fs::write(
        &file,
        "[admin]\naddr = \"127.0.0.1:0\"\n[[listen]]\naddr = \"127.0.0.1:0\"\n\
         [[tokens]]\nsource = \"a.cfg\"\n[[tokens]]\nsource = \"b.cfg\"\n",
    )
    .unwrap();
    let mut b_process = Binary::spawn(&["--config", file.to_str().unwrap()]).await;
    let addr = b_process.admin_addr().await;
    let tokens = [("kind", "tokens")];
    let failed = [("kind", "tokens"), ("outcome", "failed")];
    let ok = [("kind", "tokens"), ("outcome", "ok")];
    // a.cfg gone: its re-read fails (its tokens stay in force).
    std::fs::remove_file(&a).unwrap();
    let m = scrape_until(addr, "a's failed re-read", |m| value(m, "wsbridge_reloads_total", &failed) >= 1.0).await;
    assert_eq!(value(&m, "wsbridge_last_reload_successful", &tokens), 0.0);
    // b.cfg re-read well: the alert holds.
    std::fs::write(&b, "desk2: 127.0.0.1:5902\ndesk3: 127.0.0.1:5903\n").unwrap();
    let m = scrape_until(addr, "b's re-read", |m| value(m, "wsbridge_reloads_total", &ok) >= 1.0).await;
    assert_eq!(
        value(&m, "wsbridge_last_reload_successful", &tokens),
        0.0,
        "b's success hid a's failure"
    );
    // a.cfg back: all in force again.
    std::fs::write(&a, "desk1: 127.0.0.1:5901\n").unwrap();
    scrape_until(addr, "a's re-read", |m| value(m, "wsbridge_last_reload_successful", &tokens) == 1.0).await;
    // Broken again, then dropped from the configuration by a reload: it fails no more.
    std::fs::remove_file(&a).unwrap();
    scrape_until(addr, "a's second failure", |m| {
        value(m, "wsbridge_last_reload_successful", &tokens) == 0.0
    })
    .await;
    std::fs::write(
        &file,
        "[admin]\naddr = \"127.0.0.1:0\"\n[[listen]]\naddr = \"127.0.0.1:0\"\n[[tokens]]\nsource = \"b.cfg\"\n",
    )
    .unwrap();
    b_process.signal("HUP").await;
    b_process.line("configuration reloaded").await;
    assert_eq!(value(&scrape(addr, None).await, "wsbridge_last_reload_successful", &tokens), 1.0);
}

#[tokio::test]
async fn admin_connections_are_capped_and_a_silent_one_is_cut_at_the_deadline() {
    let (backend, _) = echo_backend().await;
    let bridge = TestBridge::start(any_path_to(backend)).await;
    let (admin_addr, _stop) = start_admin(&bridge, None).await;
    let started = std::time::Instant::now();
    let mut silent = Vec::new();
    for _ in 0..wsbridge::admin::MAX_CONNECTIONS {
        silent.push(within("connect", tokio::net::TcpStream::connect(admin_addr)).await.unwrap());
    }
    let closed = closed_by_peer(&mut silent[0]).await;
    assert_window("a silent admin connection closed", closed - started, wsbridge::admin::DEADLINE);
}

/// Connections that send nothing take every place (a scanner, or someone who can reach the
/// port and wants the instance out of its balancer): a health probe still gets its answer, the
/// oldest silent connection giving its place up at once.
#[tokio::test]
async fn silent_admin_connections_cannot_keep_the_health_probe_out() {
    let (backend, _) = echo_backend().await;
    let bridge = TestBridge::start(any_path_to(backend)).await;
    let (admin_addr, _stop) = start_admin(&bridge, None).await;
    let mut silent = Vec::new();
    for _ in 0..wsbridge::admin::MAX_CONNECTIONS {
        silent.push(within("connect", tokio::net::TcpStream::connect(admin_addr)).await.unwrap());
    }
    for round in 0..3 {
        let started = std::time::Instant::now();
        let response = http_raw(admin_addr, b"GET /readyz HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_eq!(status_of(&response), 200, "round {round}: {response}");
        // The oldest silent one was closed for it, long before its deadline.
        let closed = closed_by_peer(&mut silent[round]).await;
        assert!(
            closed - started < wsbridge::admin::DEADLINE / 2,
            "round {round}: closed after {:?}",
            closed - started
        );
        // The places stay full of silent connections.
        silent.push(within("connect", tokio::net::TcpStream::connect(admin_addr)).await.unwrap());
    }
}

/// A flood of silent connections from one address evicts its own oldest, not another
/// address's (a balancer's probe, which sends its request at once, or here a quiet neighbour).
#[tokio::test]
async fn a_flood_from_one_address_evicts_its_own_connections() {
    let (backend, _) = echo_backend().await;
    let bridge = TestBridge::start(any_path_to(backend)).await;
    let (admin_addr, _stop) = start_admin(&bridge, None).await;
    let from = |ip: &'static str| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        within("connect", socket.connect(admin_addr)).await.unwrap()
    };
    // The neighbour's is the oldest; the flood takes every other place.
    let neighbour = from("127.0.0.3").await;
    let mut flood = Vec::new();
    for _ in 1..wsbridge::admin::MAX_CONNECTIONS {
        flood.push(from("127.0.0.2").await);
    }
    // One more from the flood: its own oldest goes, the neighbour stays.
    flood.push(from("127.0.0.2").await);
    closed_by_peer(&mut flood[0]).await;
    let mut buf = [0u8; 1];
    assert!(
        matches!(neighbour.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the neighbour's connection was closed"
    );
}

#[tokio::test]
async fn token_routes_are_labelled_by_their_source_and_re_reads_are_counted() {
    use wsbridge::config::{Config, TokenLookup};
    let (backend, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.cfg");
    std::fs::write(&file, format!("secret-alpha: {backend}\n")).unwrap();
    let mut config = Config::new("test");
    add_token_source(&mut config, file.clone(), TokenLookup::Query);
    let bridge = TestBridge::start(config).await;
    let (admin_addr, _stop) = start_admin(&bridge, None).await;
    let before = scrape(admin_addr, None).await;
    let tokens_ok = [("kind", "tokens"), ("outcome", "ok")];

    let (mut ws, _) = ws_connect(&bridge.url("/?token=secret-alpha"), None).await;
    send_bin(&mut ws, b"via a token").await;
    assert_eq!(recv_data(&mut ws).await, b"via a token");
    drop(ws);
    // Editing the file: the source re-reads it when a lookup finds it changed.
    std::fs::write(&file, format!("secret-alpha: {backend}\nsecret-beta: {backend}\n")).unwrap();
    within("the new token to be picked up", async {
        while status_of(&http_head(bridge.addr, &upgrade_request("/?token=secret-beta", "")).await) != 101 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    sessions_until(admin_addr, "the sessions to end", |l| l.is_empty()).await;

    let m = scrape(admin_addr, None).await;
    let route = format!("tokens from {}", file.display());
    let ended = m
        .samples
        .iter()
        .filter(|s| s.metric == "wsbridge_sessions_ended_total" && s.labels.get("route") == Some(route.as_str()))
        .count();
    assert!(ended >= 1, "no session of {route:?} in {:?}", m.samples);
    let up = value(
        &m,
        "wsbridge_session_bytes_total",
        &[("route", route.as_str()), ("direction", "up")],
    );
    assert!(up >= 11.0, "{up}");
    let reread = value(&m, "wsbridge_reloads_total", &tokens_ok) - value(&before, "wsbridge_reloads_total", &tokens_ok);
    assert!(reread >= 1.0, "token re-reads counted: {reread}");
    for s in &m.samples {
        let labels = format!("{:?}", s.labels);
        assert!(!labels.contains("secret-") && !labels.contains('#'), "a token in a label: {s:?}");
    }
}

/// A PROXY protocol listener closes, without an answer, a connection from a sender it does not
/// trust and one whose header is not PROXY; both are counted, with status 0 and their reason.
#[tokio::test]
async fn refused_proxy_headers_are_counted() {
    let (backend, _) = echo_backend().await;
    let mut config = any_path_to(backend);
    let mut listener = wsbridge::config::ListenerConfig::new("127.0.0.1:0".parse().unwrap());
    listener.access.proxy_protocol = true;
    listener.access.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    config.listeners.push(listener);
    let trusting = TestBridge::start(config.clone()).await;
    config.listeners[0].access.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
    let distrusting = TestBridge::start(config).await;
    let (trusting_admin, _stop) = start_admin(&trusting, None).await;
    let (distrusting_admin, _stop2) = start_admin(&distrusting, None).await;

    let mut s = tokio::net::TcpStream::connect(trusting.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    closed_by_peer(&mut s).await;
    let mut s = tokio::net::TcpStream::connect(distrusting.addr).await.unwrap();
    s.write_all(b"PROXY TCP4 192.0.2.1 127.0.0.1 4000 80\r\n").await.unwrap();
    closed_by_peer(&mut s).await;

    let m = scrape(trusting_admin, None).await;
    assert_eq!(
        value(
            &m,
            "wsbridge_handshakes_refused_total",
            &[("status", "0"), ("reason", "proxy_malformed")]
        ),
        1.0
    );
    let m = scrape(distrusting_admin, None).await;
    assert_eq!(
        value(
            &m,
            "wsbridge_handshakes_refused_total",
            &[("status", "0"), ("reason", "proxy_untrusted")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "wsbridge_handshakes_refused_total",
            &[("status", "0"), ("reason", "proxy_malformed")]
        ),
        0.0
    );
}

/// Connections that send no request (or half of one, or half a TLS handshake) within the
/// handshake deadline are counted, as HAProxy and nginx count their 408s: slow-loris attempts
/// and a balancer's misconfigured check show in the metrics.
#[tokio::test]
async fn handshake_timeouts_are_counted() {
    let (backend, _) = echo_backend().await;
    let mut config = any_path_to(backend);
    config.timeouts.handshake = std::time::Duration::from_millis(200);
    let bridge = TestBridge::start(config).await;
    let (admin_addr, _stop) = start_admin(&bridge, None).await;
    let mut silent = tokio::net::TcpStream::connect(bridge.addr).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(bridge.addr).await.unwrap();
    partial.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    closed_by_peer(&mut silent).await;
    closed_by_peer(&mut partial).await;
    let timeouts = [("status", "0"), ("reason", "handshake_timeout")];
    assert_eq!(
        value(&scrape(admin_addr, None).await, "wsbridge_handshakes_refused_total", &timeouts),
        2.0
    );
}

/// Requests a web page makes (a POST from another site, which needs no CORS preflight, and a
/// same-origin read by a page whose name was re-bound to 127.0.0.1) are refused past the health
/// checks, so a page in the operator's browser can neither end sessions nor read who is
/// connected; scrapers, curl and an address typed into the browser are answered.
#[tokio::test]
async fn web_pages_cannot_end_sessions_or_read_them_through_a_loopback_admin() {
    let (backend, _) = echo_backend().await;
    let bridge = TestBridge::start(config_with(Matcher::Path("/echo".into()), tcp(backend))).await;
    let (addr, _stop) = start_admin(&bridge, None).await;
    let (mut ws, _) = ws_connect(&bridge.url("/echo"), None).await;
    let id = sessions_until(addr, "the session", |l| l.len() == 1).await[0]["id"]
        .as_u64()
        .unwrap();
    let ask = |request: String| async move {
        let r = http_raw(addr, request.as_bytes()).await;
        (status_of(&r), body_of(&r).to_owned())
    };
    let port = addr.port();
    // fetch("http://127.0.0.1:PORT/sessions/ID/close", {method: "POST", mode: "no-cors"}).
    let (status, body) = ask(format!(
        "POST /sessions/{id}/close HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: https://evil.example\r\n\
         Sec-Fetch-Site: cross-site\r\nSec-Fetch-Mode: no-cors\r\nContent-Length: 0\r\n\r\n"
    ))
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not for web pages"), "{body}");
    // A page re-bound to 127.0.0.1 reading /sessions as its own origin (no Origin on a GET).
    for headers in ["Sec-Fetch-Site: same-origin\r\nSec-Fetch-Mode: cors\r\n", ""] {
        let (status, body) = ask(format!(
            "GET /sessions HTTP/1.1\r\nHost: rebound.evil.example:{port}\r\n{headers}\r\n"
        ))
        .await;
        assert_eq!(status, 403, "{headers:?}: {body}");
    }
    // The session is untouched.
    send_bin(&mut ws, b"still here").await;
    assert_eq!(recv_data(&mut ws).await, b"still here");
    // curl and Prometheus (Host: the address, or localhost), and an address typed into a browser.
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        "localhost".into(),
    ] {
        let (status, body) = ask(format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n")).await;
        assert_eq!(status, 200, "{host}: {body}");
    }
    let typed = format!("GET /sessions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nSec-Fetch-Site: none\r\nSec-Fetch-Mode: navigate\r\n\r\n");
    assert_eq!(ask(typed).await.0, 200);
    // The health checks tell nothing and change nothing: answered to anyone.
    let probe = "GET /readyz HTTP/1.1\r\nHost: evil.example\r\nOrigin: https://evil.example\r\n\r\n".to_owned();
    assert_eq!(ask(probe).await.0, 200);
    drop(_stop);

    // With a token, a page cannot send it; a scraper may use any name for the host.
    let (addr, _stop) = start_admin(&bridge, Some("the-admin-token")).await;
    let r = http_raw(
        addr,
        format!(
            "GET /metrics HTTP/1.1\r\nHost: wsbridge-1.internal:{}\r\nAuthorization: Bearer the-admin-token\r\n\r\n",
            addr.port()
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&r), 200, "{r}");
}

/// One request over an HTTPS admin connection: its status and body.
async fn admin_over_tls(
    addr: SocketAddr,
    config: std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
    path: &str,
) -> std::io::Result<(u16, String, String)> {
    use tokio::io::AsyncReadExt;
    let mut stream = crate::common::pki::tls_connect(addr, "localhost", config).await?;
    let cn = crate::common::pki::server_cn(&stream);
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    within("an admin answer over TLS", stream.read_to_end(&mut response)).await?;
    let response = String::from_utf8_lossy(&response).into_owned();
    Ok((status_of(&response), body_of(&response).to_owned(), cn))
}

/// `[admin] tls` with `client_ca`: HTTPS only, a client certificate required (and enough off
/// loopback, without a token), a plain request told so; the certificate is rotated by SIGHUP
/// and its expiry exported like a listener's; a changed `tls` waits for a restart, and says so.
#[tokio::test]
async fn the_admin_listener_serves_https_to_clients_with_certificates() {
    use crate::common::binary::{run_to_end, Binary};
    use crate::common::pki::*;
    use tokio_rustls::rustls;
    let pki = Pki::new("admin CA");
    let first = pki.server("admin", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let prometheus = pki.client("prometheus", "prometheus");
    let dir = pki.dir.path();
    let file = dir.join("wsbridge.toml");
    let config = |client_ca: &str| {
        format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:9\"\n\
             [admin]\naddr = \"127.0.0.1:0\"\ntls = {{ cert = \"admin.crt\", key = \"admin.key\"{client_ca} }}\n"
        )
    };
    std::fs::write(&file, config(", client_ca = \"ca.pem\"")).unwrap();
    let (code, out, err) = run_to_end(&["check", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("TLS with") && out.contains("and client certificates"), "{out}");

    let mut b = Binary::spawn(&["--config", file.to_str().unwrap()]).await;
    let addr = b.admin_addr().await;
    let versions: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];
    let with_cert = client_config(&pki.ca_pem, Some(&prometheus), versions);
    let (status, body, cn) = admin_over_tls(addr, with_cert.clone(), "/metrics").await.unwrap();
    assert_eq!((status, cn.as_str()), (200, "localhost"), "{body}");
    let label = first.cert.display().to_string();
    assert!(
        body.lines()
            .any(|l| l.starts_with("wsbridge_certificate_expiry_seconds{") && l.contains(&label)),
        "{body}"
    );
    // What Prometheus' operators check by hand: curl (OpenSSL, not rustls) with the certificate.
    match which("curl") {
        Some(curl) => {
            let resolve = format!("localhost:{}:127.0.0.1", addr.port());
            let url = format!("https://localhost:{}/metrics", addr.port());
            let ca = pki.ca_file();
            let run = |with_cert: bool| {
                let mut c = tokio::process::Command::new(&curl);
                c.args(["-sS", "--max-time", "5", "--resolve", &resolve, "--cacert"]).arg(&ca);
                if with_cert {
                    c.arg("--cert").arg(&prometheus.cert).arg("--key").arg(&prometheus.key);
                }
                c.arg(&url).output()
            };
            let out = within("curl", run(true)).await.unwrap();
            let body = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success() && body.contains("# TYPE wsbridge_build_info gauge"), "{out:?}");
            let out = within("curl without a certificate", run(false)).await.unwrap();
            assert!(!out.status.success(), "answered without a client certificate: {out:?}");
        }
        None => skip(
            "admin::the_admin_listener_serves_https_to_clients_with_certificates (curl)",
            "no curl here",
        ),
    }
    // No client certificate: no answer (the handshake, or the first read, fails).
    let without = admin_over_tls(addr, client_config(&pki.ca_pem, None, versions), "/healthz").await;
    assert!(!matches!(without, Ok((200, ..))), "{without:?}");
    // Plain HTTP: told to use HTTPS.
    let (status, body) = admin(addr, "GET", "/healthz", None).await;
    assert_eq!(status, 400);
    assert!(body.contains("HTTPS only"), "{body}");

    // A new certificate in the same files: served after SIGHUP.
    let second = pki.server("admin", &["localhost", "admin.example"], &rcgen::PKCS_ED25519);
    assert_eq!(second.cert, first.cert);
    b.signal("HUP").await;
    b.line("configuration reloaded").await;
    within("the rotated certificate", async {
        loop {
            let stream = tls_connect(addr, "localhost", with_cert.clone()).await.unwrap();
            let der = &stream.get_ref().1.peer_certificates().unwrap()[0];
            if x509_parser::parse_x509_certificate(der.as_ref())
                .unwrap()
                .1
                .subject_alternative_name()
                .unwrap()
                .is_some_and(|san| san.value.general_names.len() == 2)
            {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;

    // Client certificates dropped from the file: a restart's business, and said so.
    std::fs::write(&file, config("")).unwrap();
    b.signal("HUP").await;
    let waiting = b.line("admin listener: tls changed").await;
    assert!(waiting.contains("WARN") && waiting.contains("after a restart"), "{waiting}");
    let (status, ..) = admin_over_tls(addr, with_cert, "/healthz").await.unwrap();
    assert_eq!(status, 200);
    let without = admin_over_tls(addr, client_config(&pki.ca_pem, None, versions), "/healthz").await;
    assert!(!matches!(without, Ok((200, ..))), "still as started: {without:?}");

    // A key that is not there: `check` and the start name the line and field that name it.
    std::fs::write(&file, config("").replace("admin.key", "missing.key")).unwrap();
    let (code, _, err) = run_to_end(&["check", file.to_str().unwrap()]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains(": admin.tls.key: ") && err.contains("missing.key"), "{err}");
    let (code, _, err) = run_to_end(&["--config", file.to_str().unwrap()]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains(": admin.tls.key: ") && err.contains("missing.key"), "{err}");
}

/// `/metrics` as the operator's tools read it: curl (no OpenMetrics in `Accept`) gets the
/// Prometheus text format, which `promtool check metrics` passes without a lint (it read every
/// counter of the OpenMetrics answer as an untyped metric without help: a review with the real
/// Prometheus); Prometheus's own `Accept` gets OpenMetrics. A configured route's common ends,
/// its `route_full` refusals and the agents' disconnect reasons are there at 0 before anything
/// happened, so that the first rise shows to `rate()` (a series made by its first event has no
/// increase).
#[tokio::test]
async fn the_metrics_pass_promtool_and_openmetrics_goes_to_a_scraper_that_asks() {
    use crate::common::binary::Binary;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wsbridge.toml");
    std::fs::write(
        &file,
        format!(
            "[admin]\naddr = \"127.0.0.1:0\"\n[[listen]]\naddr = \"127.0.0.1:0\"\n\
             [[agent_endpoint]]\npath = \"/agent\"\n\
             [[agent]]\nname = \"shop-17\"\nsecret_sha256 = \"{}\"\n\
             [[route]]\npath = \"/echo\"\ntarget = \"127.0.0.1:9\"\nmax_sessions = 2\n\
             [[route]]\npath = \"/pos\"\ntarget = {{ agent = \"shop-17\", service = \"pos\" }}\n",
            wsbridge::agent::link::secret_sha256("a secret of the test's own")
        ),
    )
    .unwrap();
    let b = Binary::spawn(&["--config", file.to_str().unwrap()]).await;
    let addr = b.admin_addr().await;
    let get = |accept: &str| {
        let accept = match accept {
            "" => String::new(),
            a => format!("Accept: {a}\r\n"),
        };
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n");
        async move {
            let response = http_raw(addr, request.as_bytes()).await;
            assert_eq!(status_of(&response), 200, "{response}");
            let head = response.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
            let kind = head.lines().find_map(|l| l.strip_prefix("content-type: ")).unwrap_or("").to_owned();
            (kind, body_of(&response).to_owned())
        }
    };

    let (kind, text) = get("").await;
    assert_eq!(kind, "text/plain; version=0.0.4; charset=utf-8");
    for series in [
        r#"wsbridge_sessions_ended_total{route="path /echo",code="1014",ended_by="bridge",cause="unreachable"} 0"#,
        r#"wsbridge_sessions_ended_total{route="path /pos",code="1011",ended_by="backend",cause="failed"} 0"#,
        r#"wsbridge_handshakes_refused_total{status="503",reason="route_full",route="path /echo"} 0"#,
        r#"wsbridge_handshakes_refused_total{status="503",reason="connection_limit",route=""} 0"#,
        r#"wsbridge_agent_disconnects_total{reason="lost"} 0"#,
        "# TYPE wsbridge_sessions_ended_total counter",
        "# TYPE wsbridge_config_info gauge",
    ] {
        assert!(text.lines().any(|l| l == series), "no {series} in:\n{text}");
    }
    assert!(
        !text.contains("route_full\",route=\"path /pos\""),
        "/pos has no max_sessions:\n{text}"
    );
    assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
    // `*/*` (curl's) and OpenMetrics refused with q=0 are not asking for it.
    assert_eq!(get("*/*").await.0, kind);
    assert_eq!(get("application/openmetrics-text;q=0, text/plain").await.0, kind);
    // What Prometheus sends with `scrape_protocols: [PrometheusText0.0.4, OpenMetricsText1.0.0]`
    // (the text format ranked first): the text format (a review: OpenMetrics whenever named).
    let text_first = "text/plain;version=0.0.4;q=0.6,application/openmetrics-text;version=1.0.0;escaping=underscores;q=0.5,*/*;q=0.4";
    assert_eq!(get(text_first).await.0, kind);

    match which("promtool") {
        None => skip(
            "admin::the_metrics_pass_promtool_and_openmetrics_goes_to_a_scraper_that_asks",
            "promtool is not installed (Debian's prometheus package; scripts/test.sh installs it): the rest ran",
        ),
        Some(promtool) => {
            let mut child = tokio::process::Command::new(promtool)
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("spawn promtool");
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(text.as_bytes()).await.unwrap();
            drop(stdin);
            let out = within("promtool", child.wait_with_output()).await.unwrap();
            let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success() && said.trim().is_empty(), "promtool: {:?}\n{said}", out.status);
        }
    }

    // What Prometheus 2.42 sends.
    let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
                      text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (kind, om) = get(prometheus).await;
    assert_eq!(kind, "application/openmetrics-text; version=1.0.0; charset=utf-8");
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.lines().any(|l| l == "# TYPE wsbridge_sessions_ended counter"), "{om}");
}
