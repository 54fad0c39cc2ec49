//! Agent mode end to end: the real server ([`TestBridge`]), a real agent (the library's, in
//! process, dialling the server over real sockets), real TCP services on 127.0.0.1, and real
//! WebSocket clients. The proxy and the "network" between agent and server are real TCP relays
//! of our own (a CONNECT proxy; a relay that can be cut like a dropped network).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use wsbridge::agent::client::{self, AgentConfig, AgentHandle, Backoff, Proxy, ProxySource, State};
use wsbridge::agent::link::{parse_sha256, secret_sha256};
use wsbridge::agent::{AgentDecl, AgentsConfig, EndpointConfig};
use wsbridge::config::{Config, Matcher, RouteConfig, Target};

use crate::common::connect_proxy::ConnectProxy;
use crate::common::lines::Lines;
use crate::common::*;

pub(crate) const SECRET: &str = "0123456789abcdef0123456789abcdef-shop-17";

/// A server with `agents` declared (all with [`SECRET`]), the endpoint `/agent`, and a route
/// `/{service}` to each `(agent, service)`.
pub(crate) fn server_config(agents: &[&str], routes: &[(&str, &str)]) -> Config {
    let mut config = Config::new("test");
    config.agents = AgentsConfig {
        declared: agents
            .iter()
            .map(|a| AgentDecl {
                name: (*a).to_owned(),
                secret_sha256: vec![parse_sha256(&secret_sha256(SECRET)).unwrap()],
            })
            .collect(),
        endpoints: vec![EndpointConfig {
            path: "/agent".into(),
            pool: 4,
        }],
        sources: Vec::new(),
    };
    for (agent, service) in routes {
        let options = config.default_route_options();
        config.routes.push(RouteConfig {
            matcher: Matcher::Path(format!("/{service}")),
            target: Target::Agent {
                agent: (*agent).to_owned(),
                service: (*service).to_owned(),
            },
            options,
        });
    }
    config
}

/// Adds the fleet route `/agents/{agent}/{service}` (any declared agent's services) to `config`.
fn add_fleet_route(config: &mut Config) {
    let options = config.default_route_options();
    config.routes.push(RouteConfig {
        matcher: Matcher::Path("/agents/{agent}/{service}".into()),
        target: Target::Agent {
            agent: "{agent}".into(),
            service: "{service}".into(),
        },
        options,
    });
}

/// An agent dialling `server` (ws://…/agent) with fast retries, serving `services`.
fn agent_config(server: SocketAddr, name: &str, secret: &str, services: &[(&str, Target)]) -> AgentConfig {
    let mut c = AgentConfig::new(format!("ws://{server}/agent").parse().unwrap(), name.into(), secret.into());
    c.services = services.iter().map(|(n, t)| ((*n).to_owned(), t.clone())).collect();
    c.backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(400),
        auth_max: Duration::from_secs(2),
        ..Backoff::default()
    };
    c.connect_timeout = Duration::from_secs(3);
    c
}

async fn connected(handle: &mut AgentHandle) {
    within("the agent to connect", handle.wait_for(|s| *s == State::Connected)).await;
}

async fn start_agent(config: AgentConfig) -> AgentHandle {
    let mut h = client::spawn(config).unwrap();
    connected(&mut h).await;
    h
}

#[tokio::test]
async fn bytes_cross_the_agent_exactly_both_ways_and_the_close_is_clean() {
    let (echo, _) = echo_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let _agent = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))])).await;
    let (ws, _) = ws_connect(&bridge.url("/pos"), None).await;
    let (mut tx, mut rx) = ws.split();
    let data = pattern(3 << 20, 7);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(64 * 1024) {
            tx.send(Message::binary(chunk.to_vec())).await.unwrap();
        }
        tx
    });
    let mut got = Vec::new();
    while got.len() < data.len() {
        got.extend(recv_data(&mut rx).await);
    }
    assert!(got == data, "the echo differs from what was sent");
    let mut tx = within("writer", writer).await.unwrap();
    let bye = tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: 1000.into(),
        reason: "bye".into(),
    };
    tx.send(Message::Close(Some(bye))).await.unwrap();
    let mut ws = tx.reunite(rx).unwrap();
    let (_, close) = read_until_close(&mut ws).await;
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1000), "our close frame echoed");
}

/// A server name whose first address never answers (a black-holed IPv6 route beside a working
/// IPv4 one, common on the networks agents live on): the addresses share the connect deadline,
/// so the agent reaches the server at the next one (a review: it spent the whole deadline on the
/// first at every attempt, and never connected). The agent binary sees a hosts file of the
/// test's, in a mount namespace of its own; needs root and `unshare`, skipped otherwise.
#[tokio::test]
async fn the_agent_reaches_its_server_past_a_first_address_that_never_answers() {
    use crate::common::binary::command_seeing;
    const TEST: &str = "agent::the_agent_reaches_its_server_past_a_first_address_that_never_answers";
    if !can_unshare_mounts() {
        return skip(TEST, "needs root and unshare (a mount namespace for /etc/hosts)");
    }
    let (echo, _) = echo_backend().await;
    // The server on an address of its own on loopback, the hole on 127.0.0.1 at the same port:
    // the C library puts 127.0.0.1 first (the longest prefix shared with the source address).
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let server_ip = std::net::Ipv4Addr::new(127, 88, (nanos >> 8) as u8, (nanos as u8).max(1));
    let (server, port, _hole) = 'bound: {
        for _ in 0..20 {
            let server = TcpListener::bind((server_ip, 0)).await.unwrap();
            let port = server.local_addr().unwrap().port();
            if let Ok(hole) = unanswering(SocketAddr::from(([127, 0, 0, 1], port))).await {
                break 'bound (server, port, hole);
            }
        }
        panic!("no port free on both 127.0.0.1 and {server_ip}");
    };
    let bridge = TestBridge::start_on(server_config(&["shop-17"], &[("shop-17", "pos")]), server).await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, format!("127.0.0.1 bridge.test\n{server_ip} bridge.test\n")).unwrap();
    std::fs::write(dir.path().join("agent.secret"), format!("{SECRET}\n")).unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        format!(
            "[agent]\nserver = \"ws://bridge.test:{port}/agent\"\nname = \"shop-17\"\nsecret_file = \"agent.secret\"\n\
             connect_timeout = \"2s\"\nproxy = \"off\"\n[agent.services]\npos = \"{echo}\"\n"
        ),
    )
    .unwrap();
    let mut command = command_seeing("/etc/hosts", &hosts, &["agent".as_ref(), "--config".as_ref(), file.as_os_str()]);
    command
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let start = Instant::now();
    let (_agent, mut lines) = agent_spawned(command);
    let mut kept = Vec::new();
    log_lines_kept(&mut lines, &mut kept, "agent: connected").await;
    // Its share of the 2 s deadline went to the first address; the whole of it, and the retry
    // after, would be later than this.
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "connected after {:?}: {kept:#?}",
        start.elapsed()
    );
    let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
    send_bin(&mut ws, b"past the hole").await;
    assert_eq!(recv_data(&mut ws).await, b"past the hole");
}

#[tokio::test]
async fn the_browser_close_reaches_the_app_after_every_byte() {
    let (sink, mut received) = sink_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let _agent = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(sink))])).await;
    let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
    let data = pattern(1 << 20, 3);
    for chunk in data.chunks(32 * 1024) {
        send_bin(&mut ws, chunk).await;
    }
    ws.send(Message::Close(None)).await.unwrap();
    let all = within("the app's EOF", received.recv()).await.unwrap();
    assert!(all == data, "the app got {} of {} bytes, or different ones", all.len(), data.len());
}

#[tokio::test]
async fn when_the_app_closes_everything_it_wrote_reaches_the_browser_then_1000() {
    let data = pattern(2 << 20, 9);
    let source = source_backend(data.clone()).await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let _agent = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(source))])).await;
    let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
    let (msgs, close) = read_until_close(&mut ws).await;
    let got: Vec<u8> = msgs.into_iter().flat_map(|m| m.into_data().to_vec()).collect();
    assert!(got == data, "got {} of {} bytes, or different ones", got.len(), data.len());
    let close = close.unwrap();
    assert_eq!(u16::from(close.code), 1000, "{close:?}");
}

/// An app that answers and hangs up while the page is still uploading resets its connection
/// (closed with bytes unread): what it wrote before still reaches the page, through the agent,
/// before the close, and the close says the reset (1011), as in forward mode. (The agent's end
/// mark said it as the app's clean close, 1000, which a page does not reconnect on, when the
/// reset's error went to the agent's write to the app.)
#[tokio::test]
async fn an_app_that_answers_and_hangs_up_on_an_upload_has_its_answer_delivered() {
    let (app, mut accepted) = manual_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let _agent = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(app))])).await;
    answered_then_reset(&bridge.url("/pos"), &mut accepted, 10, "connection reset").await;
}

#[tokio::test]
async fn an_offline_agent_is_named_in_a_1014() {
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    // A raw client: tungstenite's rewrites 1014 (registered after RFC 6455) to 1002.
    let mut s = raw_ws(bridge.addr, "/pos").await;
    assert_eq!(raw_read_close(&mut s).await, (1014, "agent shop-17 is offline".into()));
}

/// A server that has just started (back from a crash, or from more than a minute down) takes
/// pages before its agents are back (a fleet review: three in four sessions to the agent failed
/// with "offline" in the 14 s a balancer sent them before the agent's backoff brought it): a page
/// that comes first waits for the agent, up to the connect deadline, and crosses it.
#[tokio::test]
async fn a_page_that_comes_before_the_agent_to_a_server_just_started_waits_for_it() {
    let (echo, _) = echo_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
    send_bin(&mut ws, b"first").await;
    let _agent = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))])).await;
    assert_eq!(recv_data(&mut ws).await, b"first");
}

#[tokio::test]
async fn a_refused_service_is_named_in_a_1014() {
    let refused = closed_port().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let _agent = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(refused))])).await;
    let mut s = raw_ws(bridge.addr, "/pos").await;
    assert_eq!(raw_read_close(&mut s).await, (1014, "pos: connection refused".into()));
}

/// `/metrics` says why sessions through agents failed, by route, beside the one
/// `backend_connect_failures_total{reason="agent"}` they all count in: offline, a service the
/// agent does not list (from its login, or from its answer), busy at its cap, and its app refused.
#[tokio::test]
async fn the_metrics_say_why_an_agent_could_not_open_a_session() {
    let (echo, _) = echo_backend().await;
    let refused = closed_port().await;
    let mut config = server_config(
        &["shop-17", "shop-18"],
        &[("shop-17", "pos"), ("shop-17", "label"), ("shop-17", "till"), ("shop-18", "scale")],
    );
    config.timeouts.connect = Duration::from_secs(1);
    let bridge = TestBridge::start(config).await;
    let (admin_addr, _admin) = start_admin(&bridge, None).await;
    let mut c = agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(refused)), ("till", tcp(echo))]);
    c.max_sessions.insert("till".into(), 1);
    let _agent = start_agent(c).await;
    let (mut held, _) = ws_connect(&bridge.url("/till"), None).await;
    send_bin(&mut held, b"mine").await;
    assert_eq!(recv_data(&mut held).await, b"mine");
    for (path, reason) in [
        ("/pos", "pos: connection refused"),
        ("/label", "agent shop-17 has no service label"),
        ("/till", "till: busy, at most 1 session at a time"),
        ("/scale", "agent shop-18 is offline"),
    ] {
        let mut s = raw_ws(bridge.addr, path).await;
        assert_eq!(raw_read_close(&mut s).await, (1014, reason.into()));
    }
    let (_, metrics) = admin(admin_addr, "GET", "/metrics", None).await;
    for (route, reason) in [("pos", "app"), ("label", "no_service"), ("till", "busy"), ("scale", "offline")] {
        let counted = format!(r#"wsbridge_agent_open_failures_total{{route="path /{route}",reason="{reason}"}} 1"#);
        assert!(metrics.lines().any(|l| l == counted), "{counted} in:\n{metrics}");
        let all = format!(r#"wsbridge_backend_connect_failures_total{{route="path /{route}",reason="agent"}} 1"#);
        assert!(metrics.lines().any(|l| l == all), "{all} in:\n{metrics}");
    }
}

/// A service the agent does not list is never connected to, whatever the server asks.
#[tokio::test]
async fn the_agent_opens_only_its_own_services() {
    let (echo, accepted) = echo_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos"), ("shop-17", "label")])).await;
    let _agent = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))])).await;
    let mut s = raw_ws(bridge.addr, "/label").await;
    assert_eq!(raw_read_close(&mut s).await, (1014, "agent shop-17 has no service label".into()));
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

/// A service capped at one session (an app that serves one client at a time) takes one, from
/// whichever server it comes: a second page, on the other server, reads why it was refused, and
/// the app never sees that connection. When the first session ends, the place is free again.
#[tokio::test]
async fn a_capped_service_refuses_sessions_past_its_cap_from_every_server() {
    let (echo, accepted) = echo_backend().await;
    let config = server_config(&["shop-17"], &[("shop-17", "pos")]);
    let one = TestBridge::start(config.clone()).await;
    let two = TestBridge::start(config).await;
    let mut c = agent_config(one.addr, "shop-17", SECRET, &[("pos", tcp(echo))]);
    c.more_servers = vec![(format!("ws://{}/agent", two.addr).parse().unwrap(), None, ProxySource::Config)];
    c.max_sessions.insert("pos".into(), 1);
    let mut agent = client::spawn(c).unwrap();
    for state in &mut agent.states {
        within("both connections", state.wait_for(|s| *s == State::Connected))
            .await
            .unwrap();
    }
    let (mut first, _) = ws_connect(&one.url("/pos"), None).await;
    send_bin(&mut first, b"mine").await;
    assert_eq!(recv_data(&mut first).await, b"mine");
    for bridge in [&two, &one] {
        let mut s = raw_ws(bridge.addr, "/pos").await;
        assert_eq!(
            raw_read_close(&mut s).await,
            (1014, "pos: busy, at most 1 session at a time".into())
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "a refused session reached the app");
    // The first session still works, then ends.
    send_bin(&mut first, b"still mine").await;
    assert_eq!(recv_data(&mut first).await, b"still mine");
    let bye = tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: 1000.into(),
        reason: "".into(),
    };
    first.send(Message::Close(Some(bye))).await.unwrap();
    let (_, close) = read_until_close(&mut first).await;
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1000));
    // The agent gives the place back as its side of that session ends, which may be a moment
    // after the page has its close: pages retry until one is let in.
    let mut next = within("a session once the first has ended", async {
        loop {
            let mut s = raw_ws(two.addr, "/pos").await;
            s.write_all(&frame(0x82, b"next", true)).await.unwrap();
            match raw_read_frame(&mut s).await {
                (2, data) => break (s, data),
                (8, payload) => assert_eq!(&payload[2..], b"pos: busy, at most 1 session at a time"),
                other => panic!("unexpected frame {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(next.1, b"next");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    next.0.write_all(&frame(0x88, &1000u16.to_be_bytes(), true)).await.unwrap();
    assert_eq!(raw_read_close(&mut next.0).await.0, 1000);
}

/// One session whose app stops reading, and one whose browser stops reading, on the same agent:
/// a third session keeps flowing meanwhile.
#[tokio::test]
async fn a_stalled_session_does_not_stall_the_others_on_the_same_agent() {
    let (echo, _) = echo_backend().await;
    let (stuck, mut stuck_apps) = manual_backend().await;
    let flood = source_backend(pattern(64 << 20, 1)).await;
    let bridge = TestBridge::start(server_config(
        &["shop-17"],
        &[("shop-17", "echo"), ("shop-17", "stuck"), ("shop-17", "flood")],
    ))
    .await;
    let services = [("echo", tcp(echo)), ("stuck", tcp(stuck)), ("flood", tcp(flood))];
    let _agent = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &services)).await;

    // The app that never reads: the browser's upload is held up.
    let (stuck_ws, _) = ws_connect(&bridge.url("/stuck"), None).await;
    let _app = within("the stuck app's connection", stuck_apps.recv()).await.unwrap();
    let progress = Progress::default();
    let p = progress.clone();
    let mut uploader = tokio::spawn(async move {
        let mut ws = stuck_ws;
        let chunk = vec![0u8; 64 * 1024];
        loop {
            ws.send(Message::binary(chunk.clone())).await?;
            p.mark();
        }
        #[allow(unreachable_code)]
        Ok::<_, tokio_tungstenite::tungstenite::Error>(ws)
    });
    progress.held_up_for(Duration::from_millis(500), &mut uploader).await;
    // The browser that never reads, on a flood from its app.
    let (_flooded, _) = ws_connect(&bridge.url("/flood"), None).await;

    let (mut ws, _) = ws_connect(&bridge.url("/echo"), None).await;
    let start = Instant::now();
    for i in 0..200u32 {
        let msg = pattern(1024, i as u8);
        send_bin(&mut ws, &msg).await;
        let mut got = Vec::new();
        while got.len() < msg.len() {
            got.extend(recv_data(&mut ws).await);
        }
        assert_eq!(got, msg);
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "200 round trips beside two stalled sessions took {took:?}"
    );
    assert!(!uploader.is_finished(), "the stuck upload is still held up, not failed");
    uploader.abort();
}

/// An app that pauses longer than an agent's lowered `ping_interval` + `pong_timeout` (pings
/// made frequent for a NAT) but less than 40 s keeps its session: the stall deadline has that
/// floor (an upgrade-compatibility review: ping 2 s, pong 2 s cut a printer's 8 s pause after
/// 4 s with "dropped the session's link").
#[tokio::test]
async fn an_app_that_pauses_keeps_its_session_whatever_the_agents_ping() {
    let (app, mut apps) = manual_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let mut c = agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(app))]);
    c.ping_interval = Duration::from_millis(300);
    c.pong_timeout = Duration::from_millis(300);
    let _agent = start_agent(c).await;
    let (page, _) = ws_connect(&bridge.url("/pos"), None).await;
    let (mut tx, mut rx) = page.split();
    let mut app = within("the app's connection", apps.recv()).await.unwrap();
    // More than the kernel's buffers on the way hold.
    const TOTAL: usize = 64 << 20;
    let progress = Progress::default();
    let p = progress.clone();
    let mut uploader = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..TOTAL / chunk.len() {
            tx.send(Message::binary(chunk.clone())).await.unwrap();
            p.mark();
        }
        tx
    });
    // The app reads nothing: the upload is held up, past twice the agent's ping + pong.
    progress.held_up_for(Duration::from_millis(1500), &mut uploader).await;
    let mut got = 0;
    let mut buf = vec![0u8; 256 * 1024];
    within("the whole upload at the app", async {
        while got < TOTAL {
            let n = app.read(&mut buf).await.unwrap();
            assert!(n > 0, "the app's connection ended after {got} bytes");
            got += n;
        }
    })
    .await;
    let _tx = within("the upload to finish", uploader).await.unwrap();
    app.write_all(b"done").await.unwrap();
    assert_eq!(recv_data(&mut rx).await, b"done");
}

/// An app that stops reading: its session ends on the agent once the app has taken none of the
/// browser's bytes for the control link's ping interval plus pong deadline (here 1 + 1 s: the
/// page's writes must be seen held up well before it, on a loaded machine too),
/// after the page has left too (its link is not read then, so the agent would never see the
/// server give it up), and the service's place comes back. Before, it was held until the app
/// read or closed.
#[tokio::test]
async fn a_session_whose_app_stops_reading_ends_on_the_agent_and_gives_its_place_back() {
    let (stuck, mut stuck_apps) = manual_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "till")])).await;
    let mut c = agent_config(bridge.addr, "shop-17", SECRET, &[("till", tcp(stuck))]);
    c.max_sessions.insert("till".into(), 1);
    c.ping_interval = Duration::from_secs(1);
    c.pong_timeout = Duration::from_secs(1);
    // Below the 40 s floor, for a test's sake.
    c.app_stall_floor = Duration::ZERO;
    let stall = c.app_stall();
    let _agent = start_agent(c).await;

    let (page, _) = ws_connect(&bridge.url("/till"), None).await;
    let mut app = within("the app's connection", stuck_apps.recv()).await.unwrap();
    let opened = std::time::Instant::now();
    let progress = Progress::default();
    let p = progress.clone();
    let mut uploader = tokio::spawn(async move {
        let mut page = page;
        let chunk = vec![0u8; 64 * 1024];
        loop {
            if page.send(Message::binary(chunk.clone())).await.is_err() {
                return;
            }
            p.mark();
        }
    });
    progress.held_up_for(Duration::from_millis(200), &mut uploader).await;
    // The page leaves (its tab closed) while its bytes wait for the app.
    uploader.abort();
    let _ = uploader.await;

    // The place comes back when the agent ends the session; the app reads nothing meanwhile
    // (reading would let the agent on to the link's end). Pages are refused until then.
    let (admitted, mut next_app) = within("a session once the stuck one has ended", async {
        loop {
            let mut s = raw_ws(bridge.addr, "/till").await;
            tokio::select! {
                (code, reason) = raw_read_close(&mut s) => {
                    assert_eq!((code, reason.as_str()), (1014, "till: busy, at most 1 session at a time"));
                }
                app = stuck_apps.recv() => break (std::time::Instant::now(), app.unwrap()),
            }
        }
    })
    .await;
    // The app never read: the stall began when its buffers filled, after the session opened,
    // and at the latest when the page's uploads were held up.
    assert!(
        admitted - opened + EARLY >= stall,
        "let in {:?} after the stuck session opened, before its stall deadline",
        admitted - opened
    );
    let held = progress.last();
    assert!(
        admitted < held + stall + LATE,
        "let in {:?} after the page was held up",
        admitted - held
    );
    // The stuck session's app connection was closed: it finds the end after what it was sent.
    closed_by_peer(&mut app).await;
    next_app.write_all(b"hello").await.unwrap();
}

/// A TCP relay standing for the network between agent and server: `cut` stops every byte both
/// ways on the connections it carries, without closing anything, as a dropped network or a dead
/// NAT mapping does; connections made after the cut pass (the network is back). It also stands
/// for a balancer in front of instances: each new connection goes where `send_to` said last (a
/// health check that saw a drain switches it), or in turn to two (`spread`).
struct Network {
    addr: SocketAddr,
    generation: Arc<std::sync::Mutex<CancellationToken>>,
    to: Arc<std::sync::Mutex<SocketAddr>>,
    /// Where each new connection goes after `to`, in turn, if anywhere: a balancer that spreads
    /// connections (`spread`).
    and: Arc<std::sync::Mutex<Option<SocketAddr>>>,
    /// Connections it sent to each server so far.
    sent: Arc<std::sync::Mutex<std::collections::HashMap<SocketAddr, usize>>>,
}

impl Network {
    fn cut(&self) {
        let mut current = self.generation.lock().unwrap();
        current.cancel();
        *current = CancellationToken::new();
    }

    /// New connections go to `server` from now on.
    fn send_to(&self, server: SocketAddr) {
        *self.to.lock().unwrap() = server;
        *self.and.lock().unwrap() = None;
    }

    /// New connections go to `one` and `other` in turn from now on (round robin).
    fn spread(&self, one: SocketAddr, other: SocketAddr) {
        *self.to.lock().unwrap() = one;
        *self.and.lock().unwrap() = Some(other);
    }

    /// Connections sent to `server` so far.
    fn sent_to(&self, server: SocketAddr) -> usize {
        self.sent.lock().unwrap().get(&server).copied().unwrap_or(0)
    }
}

async fn network_to(server: SocketAddr) -> Network {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let generation = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
    let to = Arc::new(std::sync::Mutex::new(server));
    let and = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    let sent = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let (g, target, next, counts) = (generation.clone(), to.clone(), and.clone(), sent.clone());
    tokio::spawn(async move {
        while let Ok((mut a, _)) = listener.accept().await {
            let c = g.lock().unwrap().clone();
            let server = {
                let mut to = target.lock().unwrap();
                let server = *to;
                let mut then = next.lock().unwrap();
                if let Some(other) = *then {
                    *then = Some(server);
                    *to = other;
                }
                server
            };
            *counts.lock().unwrap().entry(server).or_insert(0) += 1;
            tokio::spawn(async move {
                let Ok(mut b) = TcpStream::connect(server).await else { return };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                    _ = c.cancelled() => {
                        // Hold both sockets open, silent, for the rest of the test.
                        std::future::pending::<()>().await;
                    }
                }
            });
        }
    });
    Network {
        addr,
        generation,
        to,
        and,
        sent,
    }
}

#[tokio::test]
async fn sessions_end_within_the_keepalive_deadline_when_the_agent_is_lost() {
    let (echo, _) = echo_backend().await;
    let mut config = server_config(&["shop-17"], &[("shop-17", "pos")]);
    config.timeouts.ping_interval = Some(Duration::from_millis(500));
    config.timeouts.pong_timeout = Duration::from_millis(1000);
    let bridge = TestBridge::start(config).await;
    let network = network_to(bridge.addr).await;
    let _agent = start_agent(agent_config(network.addr, "shop-17", SECRET, &[("pos", tcp(echo))])).await;
    let mut sessions = Vec::new();
    for i in 0..3u8 {
        let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
        send_bin(&mut ws, &[i; 10]).await;
        assert_eq!(recv_data(&mut ws).await, vec![i; 10]);
        sessions.push(ws);
    }
    network.cut();
    let cut = Instant::now();
    // Every session read at once: a client that is not read cannot answer the bridge's pings.
    let readers: Vec<_> = sessions
        .into_iter()
        .map(|mut ws| tokio::spawn(async move { read_close(&mut ws).await }))
        .collect();
    for reader in readers {
        let (code, reason) = reader.await.unwrap();
        assert_eq!((code, reason.as_str()), (1011, "backend read failed: agent shop-17 lost"));
    }
    // Found by the missed pong: after the pong timeout, at most a ping interval later.
    let took = cut.elapsed();
    assert!(
        took + EARLY >= Duration::from_millis(1000) && took < Duration::from_millis(1500) + LATE,
        "sessions ended {took:?} after the cut; the deadline is 0.5 s + 1 s"
    );
}

#[tokio::test]
async fn the_agent_reconnects_after_the_server_restarts() {
    let (echo, _) = echo_backend().await;
    let config = server_config(&["shop-17"], &[("shop-17", "pos")]);
    let bridge = TestBridge::start(config.clone()).await;
    let addr = bridge.addr;
    let mut agent = start_agent(agent_config(addr, "shop-17", SECRET, &[("pos", tcp(echo))])).await;
    // The server's drain tells the agent to go; the control link does not hold the shutdown.
    let drained = bridge.stop().await;
    assert!(drained.clean, "{drained:?}");
    within("the agent to notice", agent.wait_for(|s| matches!(s, State::Retrying { .. }))).await;
    let listener = within("the port again", async {
        loop {
            if let Ok(l) = TcpListener::bind(addr).await {
                return l;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let bridge = TestBridge::start_on(config, listener).await;
    connected(&mut agent).await;
    let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
    send_bin(&mut ws, b"again").await;
    assert_eq!(recv_data(&mut ws).await, b"again");
}

#[tokio::test]
async fn a_second_agent_with_the_same_name_wins_and_the_first_is_told() {
    let first_app = source_backend(b"first".to_vec()).await;
    let second_app = source_backend(b"second".to_vec()).await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let mut first = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(first_app))])).await;
    let _second = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(second_app))])).await;
    within(
        "the first agent to be replaced",
        first.wait_for(|s| matches!(s, State::Retrying { reason, .. } if reason.contains("another agent connected"))),
    )
    .await;
    let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
    let (msgs, _) = read_until_close(&mut ws).await;
    let got: Vec<u8> = msgs.into_iter().flat_map(|m| m.into_data().to_vec()).collect();
    assert_eq!(got, b"second");
}

#[tokio::test]
async fn a_wrong_secret_backs_off_without_spinning() {
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let (echo, _) = echo_backend().await;
    let mut config = agent_config(bridge.addr, "shop-17", "not-the-secret", &[("pos", tcp(echo))]);
    config.backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(400),
        auth_max: Duration::from_secs(60),
        ..Backoff::default()
    };
    let mut agent = client::spawn(config).unwrap();
    within(
        "the refusal",
        agent.wait_for(|s| matches!(s, State::Retrying { reason, .. } if reason.contains("refused this agent's name or secret"))),
    )
    .await;
    let window = Duration::from_secs(3);
    let before = agent.attempts.load(Ordering::SeqCst);
    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    let start = Instant::now();
    while start.elapsed() < window {
        ticks.tick().await;
    }
    let attempts = agent.attempts.load(Ordering::SeqCst) - before;
    // Doubling from 0.1 s with jitter in [cap/4, cap]: at most ~7 in 3 s; a spin makes thousands.
    assert!((1..=8).contains(&attempts), "{attempts} attempts in {window:?}");
    agent.shutdown.cancel();
    within("the agent to stop", agent.task).await.unwrap().unwrap();
}

/// Slowed down (429), an agent waits at least the server's Retry-After before its next try,
/// however short its own backoff: it does not keep knocking and keep the brake on.
#[tokio::test]
async fn a_slowed_agent_waits_for_the_servers_retry_after() {
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let link = "GET /agent HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: wsbridge-agent-link\r\n\
                X-Wsbridge-Agent: shop-17\r\nAuthorization: Bearer wrong\r\n\r\n";
    let retry_after = within("the brake", async {
        loop {
            let answer = http_raw(bridge.addr, link.as_bytes()).await;
            if status_of(&answer) == 429 {
                let line = answer
                    .lines()
                    .find(|l| l.to_ascii_lowercase().starts_with("retry-after:"))
                    .expect("a Retry-After");
                return Duration::from_secs(line[12..].trim().parse().unwrap());
            }
        }
    })
    .await;
    assert!(retry_after >= Duration::from_secs(1), "{retry_after:?}");
    let (echo, _) = echo_backend().await;
    let mut config = agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))]);
    config.backoff = Backoff {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(20),
        auth_max: Duration::from_secs(60),
        ..Backoff::default()
    };
    let mut agent = client::spawn(config).unwrap();
    let seen = std::sync::Mutex::new(None);
    within(
        "the agent to be slowed down",
        agent.wait_for(|s| match s {
            State::Retrying { reason, after } if reason.contains("slowing down") => {
                *seen.lock().unwrap() = Some(*after);
                true
            }
            _ => false,
        }),
    )
    .await;
    let after = seen.lock().unwrap().expect("a retry delay");
    assert!(after >= retry_after, "retrying in {after:?}, before the server's {retry_after:?}");
    agent.shutdown.cancel();
    within("the agent to stop", agent.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn the_endpoint_answers_one_generic_401_and_slows_repeated_failures() {
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let link = |name: &str, secret: &str| {
        format!(
            "GET /agent HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: wsbridge-agent-link\r\nX-Wsbridge-Agent: {name}\r\nAuthorization: Bearer {secret}\r\n\r\n"
        )
    };
    let unknown = http_raw(bridge.addr, link("shop-99", SECRET).as_bytes()).await;
    let wrong = http_raw(bridge.addr, link("shop-17", "wrong").as_bytes()).await;
    assert_eq!(status_of(&unknown), 401);
    assert!(body_of(&unknown).contains("unauthorized"), "{unknown}");
    assert_eq!(body_of(&unknown), body_of(&wrong), "one answer for both");
    assert_eq!(status_of(&wrong), 401);
    // A browser's WebSocket on the endpoint is not an agent handshake; nor is a plain GET.
    let browser = http_raw(bridge.addr, &upgrade_request("/agent", "")).await;
    assert_eq!(status_of(&browser), 400);
    // And an agent's link on a browser route is not an upgrade there.
    let on_route = http_raw(bridge.addr, link("shop-17", SECRET).replace("/agent", "/pos").as_bytes()).await;
    assert_ne!(status_of(&on_route), 101);
    // The brake counts per address and agent: the unknown name's try was not shop-17's.
    for _ in 0..4 {
        http_raw(bridge.addr, link("shop-17", "wrong").as_bytes()).await;
    }
    let slowed = http_raw(bridge.addr, link("shop-17", SECRET).as_bytes()).await;
    assert_eq!(status_of(&slowed), 429, "{slowed}");
}

/// Two agents behind one address (a shop's guest Wi-Fi, a carrier's NAT): wrong secrets for
/// one, and logins as names no agent has, from that address slow down that agent's logins and
/// those names', alike, not the other agent's, which logs in at once with its secret.
#[tokio::test]
async fn wrong_secrets_for_one_agent_do_not_slow_down_another_behind_the_same_address() {
    use wsbridge::agent::registry::BRAKE_BURST;
    let (echo, _) = echo_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17", "shop-18"], &[("shop-18", "pos")])).await;
    let link = |name: &str, secret: &str| {
        format!(
            "GET /agent HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: wsbridge-agent-link\r\nX-Wsbridge-Agent: {name}\r\nAuthorization: Bearer {secret}\r\n\r\n"
        )
    };
    for name in ["shop-17", "shop-99"] {
        for _ in 0..BRAKE_BURST {
            let r = http_raw(bridge.addr, link(name, "wrong").as_bytes()).await;
            assert_eq!(status_of(&r), 401, "{name}: {r}");
        }
        let r = http_raw(bridge.addr, link(name, "wrong").as_bytes()).await;
        assert_eq!(status_of(&r), 429, "{name}'s guesses are slowed: {r}");
    }
    // shop-17's own logins from there wait, even with its secret...
    let r = http_raw(bridge.addr, link("shop-17", SECRET).as_bytes()).await;
    assert_eq!(status_of(&r), 429, "{r}");
    // A name no agent has and a declared one answer alike (a wrong secret for either: 401):
    // which names exist cannot be read from the brake.
    for name in ["shop-98", "shop-18"] {
        let r = http_raw(bridge.addr, link(name, "wrong").as_bytes()).await;
        assert_eq!(body_of(&r), "401 Unauthorized: unauthorized\n", "{name}: {r}");
    }
    // ...but shop-18 logs in at once, and its pages go through.
    let _agent = logs_in_at_once(agent_config(bridge.addr, "shop-18", SECRET, &[("pos", tcp(echo))])).await;
    let (mut page, _) = ws_connect(&bridge.url("/pos"), None).await;
    send_bin(&mut page, b"through shop-18").await;
    assert_eq!(recv_data(&mut page).await, b"through shop-18");
}

#[tokio::test]
async fn the_brake_counts_the_real_client_behind_a_trusted_proxy() {
    // The balancer in front (127.0.0.1, trusted) forwards agents from many addresses: one
    // address's failures must not slow the others down, as they would if the brake counted the
    // balancer.
    let mut config = server_config(&["shop-17"], &[("shop-17", "pos")]);
    config
        .listeners
        .push(wsbridge::config::ListenerConfig::new("127.0.0.1:0".parse().unwrap()));
    config.listeners[0].access.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    let bridge = TestBridge::start(config).await;
    let link = |from: &str, secret: &str| {
        format!(
            "GET /agent HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: wsbridge-agent-link\r\nX-Forwarded-For: {from}\r\nX-Wsbridge-Agent: shop-17\r\nAuthorization: Bearer {secret}\r\n\r\n"
        )
    };
    for _ in 0..wsbridge::agent::registry::BRAKE_BURST {
        assert_eq!(
            status_of(&http_raw(bridge.addr, link("203.0.113.7", "wrong").as_bytes()).await),
            401
        );
    }
    let slowed = http_raw(bridge.addr, link("203.0.113.7", "wrong").as_bytes()).await;
    assert_eq!(status_of(&slowed), 429, "{slowed}");
    let other = http_raw(bridge.addr, link("203.0.113.8", "wrong").as_bytes()).await;
    assert_eq!(
        status_of(&other),
        401,
        "another client behind the same proxy is not slowed: {other}"
    );
}

/// A logged-in agent's connections stop counting against its address (agents behind one NAT
/// share it with the pages there) but stay connections under `max_connections`: its control
/// link, and its data links while they wait in the pool (each one is a descriptor). Past its
/// cap, an address gets places for agents' logins, nothing else.
#[tokio::test]
async fn a_logged_in_agent_counts_as_connections_but_not_against_its_address() {
    let (echo, _) = echo_backend().await;
    let mut config = server_config(&["shop-17"], &[("shop-17", "pos")]);
    config.limits.max_connections_per_ip = Some(2);
    let bridge = TestBridge::start(config).await;
    let _agent = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))])).await;
    idle_links(&bridge, "shop-17", 4).await;
    assert_eq!(bridge.bridge.connections(), 5, "the control link and the 4 idle links");
    // Two pages from the agent's own address get in: its 5 connections do not count there.
    let (mut a, _) = ws_connect(&bridge.url("/pos"), None).await;
    let (mut b, _) = ws_connect(&bridge.url("/pos"), None).await;
    for (ws, what) in [(&mut a, b"page a".as_slice()), (&mut b, b"page b".as_slice())] {
        send_bin(ws, what).await;
        assert_eq!(recv_data(ws).await, what);
    }
    // A third is over the address's cap, which still holds for everything but agents.
    let third = http_raw(bridge.addr, &upgrade_request("/pos", "")).await;
    assert_eq!(status_of(&third), 429, "{third}");
    // The two pages fill the allowance; the links the pool asked for in place of theirs still
    // log in (on the places past the cap, its pool's worth more since the agent is connected
    // from that address), and the pool is full again.
    idle_links(&bridge, "shop-17", 4).await;
}

/// A shop behind one NAT: its pages fill `max_connections_per_ip`, then its agent restarts (an
/// update, a reboot), so no agent is connected from there. Its first control link still logs
/// in, on one of the few places past the cap for agents' logins; its pool fills; a page through
/// it works once a page's place frees; and a plain page past the cap still gets the 429.
#[tokio::test]
async fn an_agents_first_login_gets_in_while_pages_fill_its_address() {
    let (echo, _) = echo_backend().await;
    let mut config = server_config(&["shop-17"], &[("shop-17", "pos")]);
    add_echo_route(&mut config, echo);
    config.limits.max_connections_per_ip = Some(2);
    let bridge = TestBridge::start(config).await;
    let (mut a, _) = ws_connect(&bridge.url("/echo"), None).await;
    let (mut b, _) = ws_connect(&bridge.url("/echo"), None).await;
    for (ws, what) in [(&mut a, b"page a".as_slice()), (&mut b, b"page b".as_slice())] {
        send_bin(ws, what).await;
        assert_eq!(recv_data(ws).await, what);
    }
    let before = http_raw(bridge.addr, &upgrade_request("/echo", "")).await;
    assert_eq!(status_of(&before), 429, "{before}");
    // The agent starts from the same address, over its cap, with none of its own there yet.
    let _agent = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))])).await;
    idle_links(&bridge, "shop-17", 4).await;
    // The cap still holds for pages, on the agent's route and on the others.
    for path in ["/pos", "/echo"] {
        let third = http_raw(bridge.addr, &upgrade_request(path, "")).await;
        assert_eq!(status_of(&third), 429, "{path}: {third}");
    }
    // A page leaves; a page through the agent takes its place.
    b.close(None).await.unwrap();
    read_until_close(&mut b).await;
    connections_become(&bridge, 1 + 4 + 1).await;
    let (mut c, _) = ws_connect(&bridge.url("/pos"), None).await;
    send_bin(&mut c, b"through the agent").await;
    assert_eq!(recv_data(&mut c).await, b"through the agent");
}

/// The places past `max_connections_per_ip` for agents' logins are few: beyond them a
/// connection is refused at once as before; on them, anything but an agent's login gets the
/// same 429 (and metric) once its head is read; each place is given back when its connection
/// ends; and an address whose failed logins as names no agent has spent the brake gets none.
#[tokio::test]
async fn past_its_cap_an_address_gets_a_few_places_to_log_in_agents_and_no_more() {
    use wsbridge::agent::registry::{ADDRESS_BRAKE_BURST, BRAKE_BURST};
    use wsbridge::server::AGENT_LOGINS_PAST_CAP;
    let (echo, _) = echo_backend().await;
    let mut config = server_config(&["shop-17"], &[]);
    add_echo_route(&mut config, echo);
    config.limits.max_connections_per_ip = Some(2);
    let bridge = TestBridge::start(config).await;
    let (admin_addr, _admin) = start_admin(&bridge, None).await;
    let _pages = [
        ws_connect(&bridge.url("/echo"), None).await,
        ws_connect(&bridge.url("/echo"), None).await,
    ];
    let link = |secret: &str| {
        format!(
            "/agent HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: wsbridge-agent-link\r\nX-Wsbridge-Agent: shop-17\r\nAuthorization: Bearer {secret}\r\n\r\n"
        )
    };
    // Past the cap, connections whose heads are still coming: each takes a place (with its
    // connection slot: no wait between the two).
    let mut waiting = Vec::new();
    for n in 1..=AGENT_LOGINS_PAST_CAP {
        let mut s = TcpStream::connect(bridge.addr).await.unwrap();
        s.write_all(b"GET ").await.unwrap();
        waiting.push(s);
        connections_become(&bridge, 2 + n).await;
    }
    // One more is refused at once, before it sends anything, as without these places.
    let at_once = refused_at_accept(&bridge).await;
    assert_eq!(status_of(&at_once), 429, "{at_once}");
    assert!(at_once.contains("too many connections from your address"), "{at_once}");
    // On a place: a page's request gets the same answer once read; so does a request on the
    // agent endpoint's path that is not an agent's login; an agent's login reaches the endpoint
    // (its secret proven, 409: no control link is connected); the last one closes before its
    // request (refused too: every connection past the cap but an agent's login is, once).
    let mut answers = Vec::new();
    let rest = [
        String::from_utf8(upgrade_request("/echo", "")).unwrap()["GET ".len()..].to_owned(),
        String::from_utf8(upgrade_request("/agent", "")).unwrap()["GET ".len()..].to_owned(),
        link(SECRET),
    ];
    for (mut s, rest) in waiting.drain(..rest.len()).zip(rest) {
        s.write_all(rest.as_bytes()).await.unwrap();
        let mut answer = String::new();
        within("the answer", s.read_to_string(&mut answer)).await.unwrap();
        answers.push(answer);
    }
    assert_eq!(answers[0], at_once, "the page past the cap");
    assert_eq!(answers[1], at_once, "not an agent's login");
    assert_eq!(status_of(&answers[2]), 409, "{}", answers[2]);
    drop(waiting);
    // Every place is given back (the pages' two connections remain), so an agent's login past
    // the cap gets one again.
    connections_become(&bridge, 2).await;
    let again = http_raw(bridge.addr, format!("GET {}", link(SECRET)).as_bytes()).await;
    assert_eq!(status_of(&again), 409, "{again}");
    let (_, metrics) = admin(admin_addr, "GET", "/metrics", None).await;
    let counted = r#"wsbridge_handshakes_refused_total{status="429",reason="address_limit",route=""} 4"#;
    assert!(metrics.lines().any(|l| l == counted), "{metrics}");
    // Failed logins on these places are slowed as any are: wrong secrets for an agent, at its
    // login (its brake is per address and agent: the address keeps its places for the others
    // behind it)...
    for _ in 0..BRAKE_BURST {
        let failed = http_raw(bridge.addr, format!("GET {}", link("wrong")).as_bytes()).await;
        assert_eq!(status_of(&failed), 401, "{failed}");
    }
    let slowed = http_raw(bridge.addr, format!("GET {}", link("wrong")).as_bytes()).await;
    assert_eq!(status_of(&slowed), 429, "{slowed}");
    assert!(
        slowed.contains("too many failed attempts"),
        "the endpoint's 429, on a place: {slowed}"
    );
    // ...and failures across names: once they spent the address's budget (the pair's refusals
    // cost it nothing) the address gets no place past its cap, refused at once, before anything
    // is read.
    let mut failures = BRAKE_BURST;
    loop {
        let unknown = link("wrong").replace("shop-17", &format!("made-up-{failures}"));
        let answer = http_raw(bridge.addr, format!("GET {unknown}").as_bytes()).await;
        if status_of(&answer) == 429 {
            break;
        }
        assert_eq!(status_of(&answer), 401, "{answer}");
        failures += 1;
        assert!(failures <= ADDRESS_BRAKE_BURST, "never braked");
    }
    assert_eq!(failures, ADDRESS_BRAKE_BURST, "the address's budget, across names");
    let braked = refused_at_accept(&bridge).await;
    assert_eq!(braked, at_once);
}

/// What any page can make its browser send to the agent endpoint, cross-site: `new
/// WebSocket("ws://bridge/agent", ["wsbridge-agent.v1"])` (its `Origin` included, which agents
/// never send), with no credentials (a page cannot set headers), or for the test's sake
/// wrong ones (`wrong`).
fn browsers_request(wrong: bool) -> Vec<u8> {
    let credentials = match wrong {
        true => "X-Wsbridge-Agent: shop-17\r\nAuthorization: Bearer wrong\r\n",
        false => "",
    };
    upgrade_request(
        "/agent",
        &format!("Origin: https://elsewhere.example\r\nSec-WebSocket-Protocol: wsbridge-agent.v1\r\n{credentials}"),
    )
}

/// Starts an agent and waits for it to connect, failing if it has to wait for anything first
/// (the brake's 429 holds it back for a second or more: a state seen here).
async fn logs_in_at_once(config: AgentConfig) -> AgentHandle {
    let mut agent = client::spawn(config).unwrap();
    within("the agent to connect", async {
        loop {
            match agent.state.borrow_and_update().clone() {
                State::Connected => return,
                State::Retrying { reason, .. } => panic!("the agent had to retry: {reason}"),
                _ => {}
            }
            agent.state.changed().await.unwrap();
        }
    })
    .await;
    agent
}

/// A browser's request on the agent endpoint (any page can send one, cross-site, from a shop's
/// network) is refused with a 403 that says why, and is not counted as a failed login; nor is
/// an agent's request with no secret (it guesses none). However many came from the shop's
/// address, its agent logs in at once: they cannot hold its logins back with the brake.
#[tokio::test]
async fn a_browsers_request_on_the_endpoint_is_refused_and_never_brakes_its_address() {
    use wsbridge::agent::registry::BRAKE_BURST;
    let (echo, _) = echo_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let mut answers = Vec::new();
    for _ in 0..BRAKE_BURST * 2 {
        answers.push(http_raw(bridge.addr, &browsers_request(false)).await);
        answers.push(http_raw(bridge.addr, &browsers_request(true)).await);
    }
    let no_secret = upgrade_request(
        "/agent",
        "Sec-WebSocket-Protocol: wsbridge-agent.v1\r\nX-Wsbridge-Agent: shop-17\r\n",
    );
    let mut unauthorized = Vec::new();
    for _ in 0..BRAKE_BURST * 2 {
        unauthorized.push(http_raw(bridge.addr, &no_secret).await);
    }
    let _agent = logs_in_at_once(agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))])).await;
    for answer in &answers {
        assert_eq!(status_of(answer), 403, "{answer}");
        assert_eq!(body_of(answer), "403 Forbidden: agent endpoint: not for browsers\n");
    }
    for answer in &unauthorized {
        assert_eq!(status_of(answer), 401, "{answer}");
    }
}

/// Past `max_connections_per_ip`, a browser's request on the agent endpoint is no agent's
/// login: it gets the address's 429 once read, as a page does, and counts as no failed login,
/// so the address is never refused its places to log in agents at accept for it.
#[tokio::test]
async fn past_its_cap_a_browsers_request_on_the_endpoint_leaves_the_agents_logins_alone() {
    use wsbridge::agent::registry::BRAKE_BURST;
    let (echo, _) = echo_backend().await;
    let mut config = server_config(&["shop-17"], &[("shop-17", "pos")]);
    add_echo_route(&mut config, echo);
    config.limits.max_connections_per_ip = Some(2);
    let bridge = TestBridge::start(config).await;
    let _pages = [
        ws_connect(&bridge.url("/echo"), None).await,
        ws_connect(&bridge.url("/echo"), None).await,
    ];
    let page_past_cap = http_raw(bridge.addr, &upgrade_request("/echo", "")).await;
    assert_eq!(status_of(&page_past_cap), 429, "{page_past_cap}");
    let mut answers = Vec::new();
    for _ in 0..BRAKE_BURST * 2 {
        answers.push(http_raw(bridge.addr, &browsers_request(false)).await);
        answers.push(http_raw(bridge.addr, &browsers_request(true)).await);
    }
    let _agent = logs_in_at_once(agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))])).await;
    for answer in &answers {
        assert_eq!(*answer, page_past_cap);
    }
}

/// A server's configuration file in `dir` for the binary: agent `shop-17` (secret [`SECRET`]) on
/// `/agent`, and the route `/pos` to its service `pos`.
fn shop_17_server_file(dir: &std::path::Path) -> std::path::PathBuf {
    let file = dir.join("server.toml");
    std::fs::write(
        &file,
        format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\n[[agent_endpoint]]\npath = \"/agent\"\n\
             [[agent]]\nname = \"shop-17\"\nsecret_sha256 = \"{}\"\n\
             [[route]]\npath = \"/pos\"\ntarget = {{ agent = \"shop-17\", service = \"pos\" }}\n",
            secret_sha256(SECRET)
        ),
    )
    .unwrap();
    file
}

/// When an agent closes its control link it says why (shutting down, or connected elsewhere):
/// the server's log line says it too.
#[tokio::test]
async fn the_server_logs_why_an_agent_left() {
    use crate::common::binary::Binary;
    let dir = tempfile::tempdir().unwrap();
    let file = shop_17_server_file(dir.path());
    let mut server = Binary::spawn(&["--config", file.to_str().unwrap()]).await;
    let (echo, _) = echo_backend().await;
    let agent = start_agent(agent_config(server.addr, "shop-17", SECRET, &[("pos", tcp(echo))])).await;
    server.line("agent connected").await;
    agent.shutdown.cancel();
    within("the agent to stop", agent.task).await.unwrap().unwrap();
    let line = server.line("agent disconnected").await;
    assert!(line.contains("reason=\"agent shutting down\""), "{line}");
}

/// A connection that sends nothing: the answer the bridge gives it at once.
async fn refused_at_accept(bridge: &TestBridge) -> String {
    let mut s = TcpStream::connect(bridge.addr).await.unwrap();
    let mut answer = String::new();
    within("an answer at accept", s.read_to_string(&mut answer)).await.unwrap();
    answer
}

/// Adds the forward route `/echo` to `echo`.
fn add_echo_route(config: &mut Config, echo: SocketAddr) {
    let options = config.default_route_options();
    config.routes.push(RouteConfig {
        matcher: Matcher::Path("/echo".into()),
        target: tcp(echo),
        options,
    });
}

/// An agent's data link counts as a connection while it waits in the pool; in a session it
/// counts as its page's backend, as in forward mode, covered by the page's connection.
#[tokio::test]
async fn an_agents_link_counts_as_a_connection_while_idle_not_while_in_a_session() {
    let (echo, _) = echo_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let _agent = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))])).await;
    idle_links(&bridge, "shop-17", 4).await;
    assert_eq!(bridge.bridge.connections(), 5, "the control link and the 4 idle links");
    let (mut a, _) = ws_connect(&bridge.url("/pos"), None).await;
    let (mut b, _) = ws_connect(&bridge.url("/pos"), None).await;
    for ws in [&mut a, &mut b] {
        send_bin(ws, b"echo").await;
        assert_eq!(recv_data(ws).await, b"echo");
    }
    // The control link, the pool topped up to 4, and the two pages.
    idle_links(&bridge, "shop-17", 4).await;
    assert_eq!(bridge.bridge.connections(), 7);
    // The pages leave; their links come back to the pool and count again.
    for mut ws in [a, b] {
        ws.close(None).await.unwrap();
        read_until_close(&mut ws).await;
    }
    idle_links(&bridge, "shop-17", 6).await;
    within("the pages' connections to end", async {
        while bridge.bridge.connections() != 7 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn the_agent_reaches_the_server_through_a_connect_proxy() {
    let (echo, _) = echo_backend().await;
    let proxy = ConnectProxy::start().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let mut config = agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))]);
    config.proxy = Some(format!("http://agent:pw@{}", proxy.addr).parse::<Proxy>().unwrap());
    let _agent = start_agent(config).await;
    let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
    send_bin(&mut ws, b"via the proxy").await;
    assert_eq!(recv_data(&mut ws).await, b"via the proxy");
    // The control link and at least the session's data link went through it, to the server.
    assert!(proxy.tunnels() >= 2);
    assert!(
        proxy.targets().iter().all(|t| *t == bridge.addr.to_string()),
        "{:?}",
        proxy.targets()
    );
    assert_eq!(proxy.authorization(), "Proxy-Authorization: Basic YWdlbnQ6cHc=");
}

/// A server for agent `shop-17` with one listener, TLS with a certificate for `localhost` from
/// the returned CA.
async fn tls_server() -> (TestBridge, pki::Pki) {
    let pki = pki::Pki::new("agent test CA");
    let server = pki.server("server", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let mut config = server_config(&["shop-17"], &[("shop-17", "pos")]);
    config.listeners.push(wsbridge::config::ListenerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        web: None,
        web_listing: false,
        web_follow_symlinks: false,
        web_dotfiles: false,
        ipv6_only: None,
        access: Default::default(),
        tls: Some(wsbridge::config::tls::TlsSettings::new(wsbridge::config::tls::CertFiles {
            cert: server.cert.clone(),
            key: Some(server.key.clone()),
        })),
    });
    (TestBridge::start(config).await, pki)
}

#[tokio::test]
async fn the_agent_verifies_the_server_certificate() {
    let (echo, _) = echo_backend().await;
    let (bridge, pki) = tls_server().await;
    let url = format!("wss://localhost:{}/agent", bridge.addr.port());
    // Without the CA, the system's roots do not know this server: refused, retried.
    let mut untrusted = agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))]);
    untrusted.server = url.parse().unwrap();
    let mut h = client::spawn(untrusted).unwrap();
    within(
        "the certificate refusal",
        h.wait_for(|s| matches!(s, State::Retrying { reason, .. } if reason.contains("certificate") || reason.contains("Certificate"))),
    )
    .await;
    h.shutdown.cancel();
    // With the CA file: connected over TLS, and sessions cross.
    let mut trusted = agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))]);
    trusted.server = url.parse().unwrap();
    trusted.ca_file = Some(pki.ca_file());
    let _agent = start_agent(trusted).await;
    let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
    send_bin(&mut ws, b"over tls").await;
    assert_eq!(recv_data(&mut ws).await, b"over tls");
}

/// Over wss:// links as over plain ones, a link goes back to the pool after its session and
/// carries the next: sessions one after another take no new TLS handshake each.
#[tokio::test]
async fn links_over_wss_carry_session_after_session() {
    let (echo, _) = echo_backend().await;
    let (bridge, pki) = tls_server().await;
    let mut config = agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))]);
    config.server = format!("wss://localhost:{}/agent", bridge.addr.port()).parse().unwrap();
    config.ca_file = Some(pki.ca_file());
    let _agent = start_agent(config).await;
    idle_links(&bridge, "shop-17", 4).await;
    const SESSIONS: u64 = 10;
    for i in 0..SESSIONS {
        let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
        let data = pattern(50_000, i as u8);
        send_bin(&mut ws, &data).await;
        let mut got = Vec::new();
        while got.len() < data.len() {
            got.extend_from_slice(&recv_data(&mut ws).await);
        }
        assert!(got == data, "session {i}: {} bytes back of {}, or others", got.len(), data.len());
        ws.send(Message::Close(None)).await.unwrap();
        read_until_close(&mut ws).await;
        // Back in the pool: the four, and the one asked for when the first session took one.
        idle_links(&bridge, "shop-17", 5).await;
    }
    let list = bridge.bridge.agents().list();
    assert_eq!(
        (list[0].links_dialled, list[0].links_returned),
        (5, SESSIONS),
        "links dialled, and sessions after which a link went back"
    );
}

/// config/agent-server.toml and config/agent.toml are a working pair: loaded as shipped (the
/// secret read from agent.secret beside them), with only the addresses swapped for test ones.
#[tokio::test]
async fn the_example_configs_are_a_working_pair() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let server = Config::from_file(&dir.join("agent-server.toml")).unwrap();
    assert_eq!(server.listeners[0].addr, "127.0.0.1:6080".parse().unwrap());
    let mut agent = AgentConfig::from_file(&dir.join("agent.toml")).unwrap();
    assert_eq!(agent.server, "ws://127.0.0.1:6080/agent".parse().unwrap());
    assert_eq!(agent.name, "shop-17");
    assert_eq!(agent.services["pos"], "127.0.0.1:9100".parse().unwrap());
    let (echo, _) = echo_backend().await;
    let bridge = TestBridge::start(server).await;
    agent.server.port = bridge.addr.port();
    agent.services.insert("pos".into(), tcp(echo));
    agent.proxy = None;
    let _agent = start_agent(agent).await;
    let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
    send_bin(&mut ws, b"paired").await;
    assert_eq!(recv_data(&mut ws).await, b"paired");
}

/// `wsbridge demo --agent`, through the library: the page's `/chat` sessions cross the demo's
/// agent to the chat server.
#[tokio::test]
async fn the_demo_in_agent_mode_carries_the_chat_across_its_agent() {
    let demo = wsbridge::demo::Demo::start_with_agent("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    assert!(demo.agent_mode());
    let url = demo.url().replace("http://", "ws://") + "chat";
    let shutdown = demo.bridge().shutdown_token();
    let serving = tokio::spawn(demo.serve());
    let (mut ws, _) = within("the demo's chat", async {
        // The agent dials in as the demo starts; until then the route answers 1014 offline.
        loop {
            let (mut ws, _) = ws_connect(&url, None).await;
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.starts_with("* welcome") => return (ws, t),
                _ => tokio::task::yield_now().await,
            }
        }
    })
    .await;
    ws.send(Message::text("hello over the agent")).await.unwrap();
    within("the line back from the room", async {
        loop {
            if let Some(Ok(Message::Text(t))) = ws.next().await {
                if t.ends_with(": hello over the agent") {
                    return;
                }
            }
        }
    })
    .await;
    drop(ws);
    shutdown.cancel();
    within("the demo to stop", serving).await.unwrap().unwrap();
}

use crate::common::binary::{command_to_end, run_to_end, BIN};

/// `wsbridge agent ARGS` at info level, with no proxy from the environment, its stderr piped.
fn agent_command(args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(BIN);
    command
        .arg("agent")
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    command
}

/// The `wsbridge agent` binary, with its stderr lines sent to the test.
fn agent_binary(args: &[&str]) -> (tokio::process::Child, tokio::sync::mpsc::Receiver<String>) {
    agent_spawned(agent_command(args))
}

/// `command` ([`agent_command`]'s) started, with its stderr lines sent to the test.
fn agent_spawned(mut command: tokio::process::Command) -> (tokio::process::Child, tokio::sync::mpsc::Receiver<String>) {
    use tokio::io::AsyncBufReadExt;
    let mut child = command.spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.send(line).await;
        }
    });
    (child, rx)
}

/// The arguments of `wsbridge agent` as shop-17 dialling `bridge` and serving `pos` = `echo`,
/// its secret in a file in `dir`.
fn shop_17_args(bridge: &TestBridge, echo: std::net::SocketAddr, dir: &std::path::Path) -> Vec<String> {
    let secret = dir.join("agent.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    [
        "--server",
        &format!("ws://{}/agent", bridge.addr),
        "--name",
        "shop-17",
        "--secret-file",
        secret.to_str().unwrap(),
        "--service",
        &format!("pos={echo}"),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Reads lines into `kept` up to the first with `what`.
async fn log_lines_kept(lines: &mut tokio::sync::mpsc::Receiver<String>, kept: &mut Vec<String>, what: &str) {
    within(&format!("the agent to log {what:?}"), async {
        loop {
            let line = lines.recv().await.expect("the agent's stderr ended");
            let found = line.contains(what);
            kept.push(line);
            if found {
                return;
            }
        }
    })
    .await;
}

async fn log_line(lines: &mut tokio::sync::mpsc::Receiver<String>, what: &str) -> String {
    within(&format!("the agent to log {what:?}"), async {
        loop {
            let line = lines.recv().await.expect("the agent's stderr ended");
            if line.contains(what) {
                return line;
            }
        }
    })
    .await
}

/// `wsbridge agent -vv` logs its own work in detail, not the libraries': tungstenite's trace
/// records hold the whole upgrade request, its `Authorization: Bearer` secret with it.
#[tokio::test]
async fn the_agents_trace_log_does_not_hold_its_secret() {
    let (echo, _) = echo_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let dir = tempfile::tempdir().unwrap();
    let mut args = shop_17_args(&bridge, echo, dir.path());
    args.push("-vv".to_owned());
    let mut command = agent_command(&args.iter().map(String::as_str).collect::<Vec<_>>());
    command.env_remove("RUST_LOG");
    let (mut child, mut lines) = agent_spawned(command);
    let mut seen = Vec::new();
    // A session crosses the agent (a data link dialled, with its secret), then the agent stops.
    log_lines_kept(&mut lines, &mut seen, "agent: connected").await;
    let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
    send_bin(&mut ws, b"traced").await;
    assert_eq!(recv_data(&mut ws).await, b"traced");
    ws.close(None).await.unwrap();
    log_lines_kept(&mut lines, &mut seen, "agent: session closed").await;
    // The app's address it reached, as the server's lines name the backend's; and the server's
    // id of the session (its first), to join the two logs.
    let closed = seen.last().unwrap();
    assert!(closed.contains(&format!("service=pos app={echo} ")), "{closed}");
    assert!(closed.contains(" session{session=1}: "), "{closed}");
    child.start_kill().unwrap();
    within("the agent's log to end", async {
        while let Some(line) = lines.recv().await {
            seen.push(line);
        }
    })
    .await;
    assert!(
        seen.iter().any(|l| l.contains(" DEBUG ") && l.contains(" wsbridge::")),
        "no record of its own past info: {seen:#?}"
    );
    for line in &seen {
        assert!(!line.contains(SECRET), "the secret in the log: {line}");
        assert!(
            !line.contains(" tungstenite") && !line.contains(" rustls"),
            "a library's record: {line}"
        );
    }
}

/// The agent binary serving shop-17's `pos` to a bridge, with a page's session through it that
/// has carried a message, draining after a SIGTERM (it said so); the bridge and the agent's
/// files live as long as it.
struct DrainingAgent {
    child: tokio::process::Child,
    lines: tokio::sync::mpsc::Receiver<String>,
    ws: Ws,
    _bridge: TestBridge,
    _dir: tempfile::TempDir,
}

async fn agent_binary_draining_a_session() -> DrainingAgent {
    let (echo, _) = echo_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let dir = tempfile::tempdir().unwrap();
    let args = shop_17_args(&bridge, echo, dir.path());
    let (child, mut lines) = agent_binary(&args.iter().map(String::as_str).collect::<Vec<_>>());
    log_line(&mut lines, "agent: connected").await;
    let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
    send_bin(&mut ws, b"before").await;
    assert_eq!(recv_data(&mut ws).await, b"before");
    signal(&child, "TERM").await;
    log_line(&mut lines, "agent: shutting down").await;
    DrainingAgent {
        child,
        lines,
        ws,
        _bridge: bridge,
        _dir: dir,
    }
}

/// Sends `signal` (`TERM`, `INT`) to `child`.
async fn signal(child: &tokio::process::Child, signal: &str) {
    let pid = child.id().expect("running").to_string();
    let status = tokio::process::Command::new("kill")
        .args(["-s", signal, &pid])
        .status()
        .await
        .unwrap();
    assert!(status.success(), "kill -s {signal} {pid}");
}

#[tokio::test]
async fn the_agent_binary_lets_its_session_finish_after_sigterm_then_exits() {
    // Bound whole: the bridge and the agent's files live to the end of the test.
    let mut agent = agent_binary_draining_a_session().await;
    // The live session goes on after SIGTERM...
    send_bin(&mut agent.ws, b"after").await;
    assert_eq!(recv_data(&mut agent.ws).await, b"after");
    assert!(agent.child.try_wait().unwrap().is_none(), "the agent exited with a session open");
    // ...and once it ends, the agent exits at once, not at the end of its 10 s grace.
    agent.ws.close(None).await.unwrap();
    let closed = Instant::now();
    let status = within("the agent to exit", agent.child.wait()).await.unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        closed.elapsed() < Duration::from_secs(3),
        "exited {:?} after its last session",
        closed.elapsed()
    );
}

/// A second SIGTERM/SIGINT during the drain ends it now, and the log says so (on Windows the
/// console's default handler ended the process silently; on Linux it was ignored).
#[tokio::test]
async fn a_second_signal_ends_the_agents_drain_at_once() {
    // Bound whole: the bridge and the agent's files live to the end of the test.
    let mut agent = agent_binary_draining_a_session().await;
    let second = Instant::now();
    signal(&agent.child, "INT").await;
    log_line(&mut agent.lines, "agent: a second shutdown signal: exiting now").await;
    // Well before the 10 s grace the open session would otherwise get.
    let status = within("the agent to exit", agent.child.wait()).await.unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        second.elapsed() < Duration::from_secs(3),
        "exited {:?} after the second signal",
        second.elapsed()
    );
    let (_, close) = read_until_close(&mut agent.ws).await;
    assert_ne!(
        close.map(|c| u16::from(c.code)),
        Some(1000),
        "the session was cut, not closed cleanly"
    );
}

#[tokio::test]
async fn new_secret_prints_a_secret_and_its_server_line() {
    let (code, text, _) = run_to_end(&["agent", "--new-secret"]).await;
    assert_eq!(code, 0);
    let secret = text.lines().next().unwrap();
    assert_eq!(secret.len(), 64, "{text}");
    assert!(text.contains(&format!("secret_sha256 = \"{}\"", secret_sha256(secret))), "{text}");
}

/// With --secret-file the secret goes to a new file, its owner's only, and only the server's
/// line is printed; an existing file is not replaced (it may be a running agent's).
#[tokio::test]
async fn new_secret_writes_a_new_secret_file_and_prints_the_server_line() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.secret");
    let path = file.to_str().unwrap();
    let (code, text, err) = run_to_end(&["agent", "--new-secret", "--secret-file", path]).await;
    assert_eq!(code, 0, "{err}");
    let written = std::fs::read_to_string(&file).unwrap();
    let secret = written.strip_suffix('\n').unwrap();
    assert_eq!(secret.len(), 64, "{written:?}");
    assert!(!text.contains(secret), "the secret printed: {text}");
    assert!(text.contains(&format!("secret_sha256 = \"{}\"", secret_sha256(secret))), "{text}");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    // A usage mistake, as the manual's EXIT STATUS says of them: 64 (a newcomer's run found 1).
    let (code, _, err) = run_to_end(&["agent", "--new-secret", "--secret-file", path]).await;
    assert_eq!(code, 64);
    assert!(err.contains("exists already"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), written, "the existing secret kept");
    let nowhere = dir.path().join("not-made").join("agent.secret");
    let (code, _, err) = run_to_end(&["agent", "--new-secret", "--secret-file", nowhere.to_str().unwrap()]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("its directory does not exist: create it first"), "{err}");
}

#[tokio::test]
async fn check_names_the_file_line_and_field_of_an_agent_mistake() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("agent.secret"), "s\n").unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "[agent]\nserver = \"ws://127.0.0.1:6080/agent\"\nname = \"shop-17\"\nsecret_file = \"agent.secret\"\n\n[agent.services]\npos = \"127.0.0.1\"\n",
    )
    .unwrap();
    let (code, _, err) = run_to_end(&["check", "--config", file.to_str().unwrap()]).await;
    assert_eq!(code, 64);
    assert!(
        err.contains("agent.toml:7: agent.services.pos: ") && err.contains("expected HOST:PORT"),
        "{err}"
    );
    std::fs::write(&file, "[agent]\nserver = \"ftp://x/agent\"\nname = \"shop-17\"\nsecret_file = \"agent.secret\"\n[agent.services]\npos = \"127.0.0.1:1\"\n").unwrap();
    let (code, _, err) = run_to_end(&["agent", "--config", file.to_str().unwrap()]).await;
    assert_eq!(code, 64);
    assert!(err.contains("agent.toml:2: agent.server:"), "{err}");
}

/// A server that stays away: the agent retries, and says so once, not once per attempt.
#[tokio::test]
async fn a_repeated_failure_is_logged_once() {
    let closed = closed_port().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("agent.secret");
    std::fs::write(&secret, "s\n").unwrap();
    let server = format!("ws://{closed}/agent");
    let mut child = tokio::process::Command::new(BIN)
        .args(["agent", "--server", &server, "--name", "shop-17", "--service", "pos=127.0.0.1:1"])
        .arg("--secret-file")
        .arg(&secret)
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stderr.take().unwrap()));
    let (mut warned, mut again) = (0, 0);
    // Backoff from 1 s: a few attempts in this window.
    let window = tokio::time::sleep(Duration::from_millis(3500));
    tokio::pin!(window);
    loop {
        tokio::select! {
            _ = &mut window => break,
            line = lines.next_line() => {
                let line = line.unwrap().expect("the agent exited");
                warned += usize::from(line.contains("agent: not connected; retrying"));
                again += usize::from(line.contains("connecting again"));
            }
        }
    }
    child.kill().await.unwrap();
    assert!(again >= 1, "no retry in the window");
    assert_eq!(warned, 1, "the same failure was warned about {warned} times");
}

#[tokio::test]
async fn an_agent_serves_a_unix_socket_service() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("label.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "label")])).await;
    let _agent = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &[("label", Target::Unix(path))])).await;
    let (mut ws, _) = ws_connect(&bridge.url("/label"), None).await;
    send_bin(&mut ws, b"^XA^FDhello^XZ").await;
    assert_eq!(recv_data(&mut ws).await, b"^XA^FDhello^XZ");
}

/// One route for a fleet: `/agents/{agent}/{service}` reaches any declared agent's services,
/// and nothing else.
#[tokio::test]
async fn a_fleet_route_reaches_declared_agents_by_path_and_nothing_else() {
    let app17 = source_backend(b"shop-17's pos".to_vec()).await;
    let app18 = source_backend(b"shop-18's pos".to_vec()).await;
    let mut config = server_config(&["shop-17", "shop-18"], &[]);
    add_fleet_route(&mut config);
    let bridge = TestBridge::start(config).await;
    let _a17 = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(app17))])).await;
    let _a18 = start_agent(agent_config(bridge.addr, "shop-18", SECRET, &[("pos", tcp(app18))])).await;
    for shop in ["shop-17", "shop-18"] {
        let (mut ws, _) = ws_connect(&bridge.url(&format!("/agents/{shop}/pos")), None).await;
        let (msgs, _) = read_until_close(&mut ws).await;
        let got: Vec<u8> = msgs.into_iter().flat_map(|m| m.into_data().to_vec()).collect();
        assert_eq!(got, format!("{shop}'s pos").as_bytes());
    }
    // An undeclared agent is an unknown path: 404 before any upgrade.
    for path in [
        "/agents/shop-99/pos",
        "/agents/shop-17",
        "/agents/shop-17/pos/more",
        "/agents/%2e%2e/pos",
    ] {
        let answer = http_raw(bridge.addr, &upgrade_request(path, "")).await;
        assert_eq!(status_of(&answer), 404, "{path}: {answer}");
    }
    // A declared agent, a service it does not list: the page reads why.
    let mut s = raw_ws(bridge.addr, "/agents/shop-18/label").await;
    assert_eq!(raw_read_close(&mut s).await, (1014, "agent shop-18 has no service label".into()));
}

/// A fleet file: agents log in with the secrets it lists, and one added to it later is let in
/// (the file is re-read when it changes), with no reload.
#[tokio::test]
async fn agents_from_a_fleet_file_log_in_and_new_ones_are_seen() {
    let (echo, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet");
    std::fs::write(&fleet, format!("shop-17: {}\n", secret_sha256(SECRET))).unwrap();
    let mut config = server_config(&[], &[]);
    config.agents.sources.push(fleet.clone());
    add_fleet_route(&mut config);
    let bridge = TestBridge::start(config).await;
    let _a17 = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))])).await;
    let (mut ws, _) = ws_connect(&bridge.url("/agents/shop-17/pos"), None).await;
    send_bin(&mut ws, b"from the fleet").await;
    assert_eq!(recv_data(&mut ws).await, b"from the fleet");
    // Not in the file yet: refused, retrying; then added: let in at its next attempt.
    let mut a18 = client::spawn(agent_config(bridge.addr, "shop-18", SECRET, &[("pos", tcp(echo))])).unwrap();
    within(
        "shop-18's refusal",
        a18.wait_for(|s| matches!(s, State::Retrying { reason, .. } if reason.contains("refused"))),
    )
    .await;
    let answer = http_raw(bridge.addr, &upgrade_request("/agents/shop-18/pos", "")).await;
    assert_eq!(status_of(&answer), 404, "not declared yet: {answer}");
    std::fs::write(&fleet, format!("shop-17: {h}\nshop-18: {h}\n", h = secret_sha256(SECRET))).unwrap();
    connected(&mut a18).await;
    let (mut ws, _) = ws_connect(&bridge.url("/agents/shop-18/pos"), None).await;
    send_bin(&mut ws, b"new shop").await;
    assert_eq!(recv_data(&mut ws).await, b"new shop");
}

/// A backend that writes to each connection for as long as it is open: a session that is
/// always busy.
async fn endless_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let chunk = vec![7u8; 64 * 1024];
                while s.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    addr
}

/// A page that reads everything until the close: the bytes it got so far (`got`) and, at the
/// end, the close frame.
fn reading_page(ws: Ws, got: tokio::sync::watch::Sender<usize>) -> tokio::task::JoinHandle<(u16, String)> {
    tokio::spawn(async move {
        let mut ws = ws;
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Close(f)) => return f.map_or((1005, String::new()), |f| (f.code.into(), f.reason.to_string())),
                Ok(m) => {
                    got.send_modify(|n| *n += m.len());
                }
                Err(e) => return (0, e.to_string()),
            }
        }
        (0, "no close frame".into())
    })
}

/// A reload that gives a connected agent another secret (its old one leaked, say) revokes it:
/// its control link closes, every session through it ends at once with 1011, a busy one too,
/// and its next login with the old secret is refused.
#[tokio::test]
async fn a_reload_that_changes_an_agents_secret_ends_its_connection_and_sessions() {
    let (echo, _) = echo_backend().await;
    let endless = endless_backend().await;
    let config = server_config(&["shop-17"], &[("shop-17", "pos"), ("shop-17", "feed")]);
    let bridge = TestBridge::start(config).await;
    let mut agent = start_agent(agent_config(
        bridge.addr,
        "shop-17",
        SECRET,
        &[("pos", tcp(echo)), ("feed", tcp(endless))],
    ))
    .await;
    let (mut idle, _) = ws_connect(&bridge.url("/pos"), None).await;
    send_bin(&mut idle, b"before").await;
    assert_eq!(recv_data(&mut idle).await, b"before");
    let (feed, _) = ws_connect(&bridge.url("/feed"), None).await;
    let (got, mut progress) = tokio::sync::watch::channel(0);
    let busy = reading_page(feed, got);
    within("the feed's first megabytes", progress.wait_for(|n| *n >= 4 << 20))
        .await
        .unwrap();

    let mut rotated = bridge.config.clone();
    rotated.agents.declared[0].secret_sha256 = vec![parse_sha256(&secret_sha256("the new secret of shop-17, not the leaked one")).unwrap()];
    bridge.bridge.reload(&rotated).unwrap();
    let why = (1011, "backend read failed: agent shop-17 is no longer allowed".to_owned());
    assert_eq!(within("the busy session's end", busy).await.unwrap(), why);
    let (_, close) = read_until_close(&mut idle).await;
    let close = close.unwrap();
    assert_eq!((u16::from(close.code), close.reason.to_string()), why);
    within(
        "the old secret's refusal",
        agent.wait_for(|s| matches!(s, State::Retrying { reason, .. } if reason.contains("refused"))),
    )
    .await;
    let mut s = raw_ws(bridge.addr, "/pos").await;
    assert_eq!(raw_read_close(&mut s).await, (1014, "agent shop-17 is offline".into()));
}

/// A revoked agent's session whose page reads nothing ends too, at the close deadline after the
/// reload (its close frame cannot get through), not at its idle or lifetime deadline: the relay
/// waits on the page there and would never read or write the link again.
#[tokio::test]
async fn a_revoked_agents_session_ends_even_while_its_page_reads_nothing() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let mut config = server_config(&["shop-17"], &[("shop-17", "feed")]);
    config.timeouts.close = Duration::from_secs(1);
    let bridge = TestBridge::start(config).await;
    let _agent = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &[("feed", tcp(app))])).await;
    let mut page = raw_ws(bridge.addr, "/feed").await;
    let (mut s, _) = within("the app's connection", listener.accept()).await.unwrap();
    // The app writes until the page, which reads nothing, holds everything up.
    let progress = Progress::default();
    let p = progress.clone();
    let mut app_writes = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        loop {
            if let Err(e) = s.write_all(&chunk).await {
                return (Instant::now(), e);
            }
            p.mark();
        }
    });
    progress.held_up_for(Duration::from_millis(500), &mut app_writes).await;

    let mut rotated = bridge.config.clone();
    rotated.agents.declared[0].secret_sha256 = vec![parse_sha256(&secret_sha256("the new secret of shop-17, not the leaked one")).unwrap()];
    let revoked = Instant::now();
    bridge.bridge.reload(&rotated).unwrap();
    // The app's connection is closed once the server let the session go, at the close deadline.
    let (closed, e) = within("the app's connection to be closed", app_writes).await.unwrap();
    assert_window("the session's end", closed - revoked, Duration::from_secs(1));
    assert!(
        matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe),
        "the app's write: {e}"
    );
    // The page finds its connection closed behind what it had not read.
    closed_by_peer(&mut page).await;
}

/// A planned rotation: the server lists the new secret's hash beside the old one, the agent
/// comes back with the new secret (replacing its old connection, whose session goes on), and
/// the old hash goes: then, and only then, what still runs on the old secret ends.
#[tokio::test]
async fn a_secret_is_rotated_without_a_cut_and_then_the_old_one_revoked() {
    let (echo, _) = echo_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    const NEW: &str = "the rotated secret of shop-17, 32 bytes or more";
    let hash = |secret: &str| parse_sha256(&secret_sha256(secret)).unwrap();
    let mut old = agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))]);
    // Once replaced, the old process stays away for the rest of the test (a real rotation
    // restarts it with the new secret instead).
    old.backoff = Backoff {
        initial: Duration::from_secs(60),
        max: Duration::from_secs(60),
        auth_max: Duration::from_secs(60),
        ..Backoff::default()
    };
    let _old = start_agent(old).await;
    let (mut on_old, _) = ws_connect(&bridge.url("/pos"), None).await;
    send_bin(&mut on_old, b"one").await;
    assert_eq!(recv_data(&mut on_old).await, b"one");

    let mut both = bridge.config.clone();
    both.agents.declared[0].secret_sha256 = vec![hash(NEW), hash(SECRET)];
    bridge.bridge.reload(&both).unwrap();
    send_bin(&mut on_old, b"two").await;
    assert_eq!(recv_data(&mut on_old).await, b"two", "the old secret is still listed: no cut");
    let _new = start_agent(agent_config(bridge.addr, "shop-17", NEW, &[("pos", tcp(echo))])).await;
    // A data link with the old secret, still listed, is not the new connection's.
    let old_link = format!(
        "GET /agent HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: wsbridge-agent-link\r\nX-Wsbridge-Agent: shop-17\r\nAuthorization: Bearer {SECRET}\r\n\r\n"
    );
    assert_eq!(status_of(&http_raw(bridge.addr, old_link.as_bytes()).await), 409);
    let (mut on_new, _) = ws_connect(&bridge.url("/pos"), None).await;
    send_bin(&mut on_new, b"new").await;
    assert_eq!(recv_data(&mut on_new).await, b"new");
    send_bin(&mut on_old, b"three").await;
    assert_eq!(recv_data(&mut on_old).await, b"three", "a replaced connection's session goes on");

    let mut only_new = bridge.config.clone();
    only_new.agents.declared[0].secret_sha256 = vec![hash(NEW)];
    bridge.bridge.reload(&only_new).unwrap();
    let (_, close) = read_until_close(&mut on_old).await;
    let close = close.unwrap();
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (1011, "backend read failed: agent shop-17 is no longer allowed")
    );
    send_bin(&mut on_new, b"still").await;
    assert_eq!(recv_data(&mut on_new).await, b"still", "the new secret's connection is untouched");
}

/// An agent taken out of a fleet file while connected is revoked within two pings (here every
/// 200 ms, and at least a second apart), not at its next login, which may be weeks away.
#[tokio::test]
async fn an_agent_removed_from_a_fleet_file_is_disconnected_within_two_pings() {
    let (echo, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet");
    let line = |name: &str| format!("{name}: {}\n", secret_sha256(SECRET));
    std::fs::write(&fleet, format!("{}{}", line("shop-17"), line("shop-18"))).unwrap();
    let mut config = server_config(&[], &[]);
    config.agents.sources.push(fleet.clone());
    config.timeouts.ping_interval = Some(Duration::from_millis(200));
    add_fleet_route(&mut config);
    let bridge = TestBridge::start(config).await;
    let mut a17 = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))])).await;
    let _a18 = start_agent(agent_config(bridge.addr, "shop-18", SECRET, &[("pos", tcp(echo))])).await;
    let (mut open, _) = ws_connect(&bridge.url("/agents/shop-17/pos"), None).await;
    send_bin(&mut open, b"before").await;
    assert_eq!(recv_data(&mut open).await, b"before");
    std::fs::write(&fleet, line("shop-18")).unwrap();
    let (_, close) = read_until_close(&mut open).await;
    let close = close.unwrap();
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (1011, "backend read failed: agent shop-17 is no longer allowed")
    );
    within(
        "shop-17's refusal",
        a17.wait_for(|s| matches!(s, State::Retrying { reason, .. } if reason.contains("refused"))),
    )
    .await;
    // The agent still in the file is untouched.
    let (mut ws, _) = ws_connect(&bridge.url("/agents/shop-18/pos"), None).await;
    send_bin(&mut ws, b"still here").await;
    assert_eq!(recv_data(&mut ws).await, b"still here");
}

/// Agents behind one address share the login brake: one slowed down by another's failures
/// retries with the network backoff (here 0.4 s at most) or, when longer, at the server's
/// Retry-After (at most one brake refill, and a spread of up to a second), not with the refused
/// secret's backoff, and gets in.
#[tokio::test]
async fn an_agent_slowed_down_by_the_brake_is_not_treated_as_refused() {
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let wrong = "GET /agent HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: wsbridge-agent-link\r\nX-Wsbridge-Agent: shop-17\r\nAuthorization: Bearer wrong\r\n\r\n";
    for _ in 0..5 {
        assert_eq!(status_of(&http_raw(bridge.addr, wrong.as_bytes()).await), 401);
    }
    let (echo, _) = echo_backend().await;
    let mut config = agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))]);
    config.backoff = Backoff {
        initial: Duration::from_millis(400),
        max: Duration::from_millis(400),
        auth_max: Duration::from_secs(300),
        ..Backoff::default()
    };
    let mut agent = client::spawn(config).unwrap();
    let mut slowed = 0;
    within("the agent to get past the brake", async {
        loop {
            let state = agent.state.borrow_and_update().clone();
            match state {
                State::Connected => return,
                State::Retrying { reason, after } => {
                    assert!(reason.contains("slowing down"), "{reason}");
                    // Past the server's Retry-After, spread by up to half the after-drain delay.
                    let spread = Backoff::default().after_drain / 2;
                    let longest = (wsbridge::agent::registry::BRAKE_REFILL + spread).max(Duration::from_millis(400));
                    assert!(after <= longest, "retrying after {after:?}");
                    slowed += 1;
                }
                _ => {}
            }
            agent.state.changed().await.unwrap();
        }
    })
    .await;
    assert!(slowed >= 1, "slowed down {slowed} times");
}

/// A server shutting down tells its agents to reconnect elsewhere (drain), and they do at once:
/// the backoff starts over, as after a connection that worked.
#[tokio::test]
async fn a_draining_server_tells_its_agents_to_reconnect() {
    let (echo, _) = echo_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let mut config = agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))]);
    // Slow enough that the drain's state is still there when the test looks.
    config.backoff.initial = Duration::from_secs(2);
    config.backoff.max = Duration::from_secs(2);
    let mut agent = start_agent(config).await;
    let drained = bridge.stop().await;
    assert!(drained.clean, "{drained:?}");
    within(
        "the agent to be told",
        agent.wait_for(|s| matches!(s, State::Retrying { reason, .. } if reason == "the server is draining: reconnecting")),
    )
    .await;
}

/// Make-before-break: an instance that starts to drain asks its agents to move at once, while
/// it still serves. The agent connects again (the draining instance answers 503 until the
/// balancer sends it to the other one), then lets its old control link go: it is on the other
/// instance before the drain delay ends, and the sessions on the old one go on until it does.
#[tokio::test]
async fn a_draining_instance_moves_its_agents_before_its_sessions_end() {
    let (echo, _) = echo_backend().await;
    let mut config = server_config(&["shop-17"], &[("shop-17", "pos")]);
    config.timeouts.drain_delay = Some(Duration::from_secs(60));
    let a = TestBridge::start(config).await;
    let b = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let balancer = network_to(a.addr).await;
    let mut agent = start_agent(agent_config(balancer.addr, "shop-17", SECRET, &[("pos", tcp(echo))])).await;
    idle_links(&a, "shop-17", 4).await;
    let (mut page, _) = ws_connect(&a.url("/pos"), None).await;
    send_bin(&mut page, b"before").await;
    assert_eq!(recv_data(&mut page).await, b"before");

    let hurry = CancellationToken::new();
    let drain = {
        let (bridge, hurry) = (a.bridge.clone(), hurry.clone());
        tokio::spawn(async move { bridge.drain(hurry.cancelled_owned()).await })
    };
    // Asked to move, the agent tries again; the balancer still sends it to a, which refuses.
    within(
        "the draining instance to refuse the agent",
        agent.wait_for(|s| matches!(s, State::Moving { reason } if reason.contains("503") && reason.contains("draining"))),
    )
    .await;
    // Meanwhile a still has the agent: a page the balancer still sends there is served.
    assert!(a.bridge.agents().idle_links("shop-17").is_some(), "a still has the agent");
    let (mut late, _) = ws_connect(&a.url("/pos"), None).await;
    send_bin(&mut late, b"late").await;
    assert_eq!(recv_data(&mut late).await, b"late");
    // The balancer's health check has seen the drain: new connections go to b.
    balancer.send_to(b.addr);
    connected(&mut agent).await;
    idle_links(&b, "shop-17", 4).await;
    within("the agent to let a go", async {
        while a.bridge.agents().idle_links("shop-17").is_some() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    assert!(!drain.is_finished(), "a's drain delay still runs");
    // The session on a goes on; pages reach the agent on b.
    send_bin(&mut page, b"after").await;
    assert_eq!(recv_data(&mut page).await, b"after");
    let (mut fresh, _) = ws_connect(&b.url("/pos"), None).await;
    send_bin(&mut fresh, b"on b").await;
    assert_eq!(recv_data(&mut fresh).await, b"on b");
    send_bin(&mut late, b"later").await;
    assert_eq!(recv_data(&mut late).await, b"later");
    hurry.cancel();
    within("a's drain", drain).await.unwrap();
    assert_eq!(read_close(&mut page).await.0, 1001, "a's session ends when a shuts down");
    assert_eq!(read_close(&mut late).await.0, 1001);
}

/// After a failover the operator moves the agents back: `POST /agents/move` on the instance
/// they are on (the standby) makes them connect again through the balancer, which sends them to
/// the instance that returned, and let the standby go; a session on the standby goes on. One
/// agent by name too, and a name not connected here is a 404.
#[tokio::test]
async fn the_operator_moves_agents_to_where_the_balancer_sends_them() {
    let (echo, _) = echo_backend().await;
    let a = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let b = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let balancer = network_to(b.addr).await;
    let _agent = start_agent(agent_config(balancer.addr, "shop-17", SECRET, &[("pos", tcp(echo))])).await;
    idle_links(&b, "shop-17", 4).await;
    let (mut page, _) = ws_connect(&b.url("/pos"), None).await;
    send_bin(&mut page, b"on b").await;
    assert_eq!(recv_data(&mut page).await, b"on b");
    let (admin_b, _guard) = start_admin(&b, Some("t")).await;
    assert_eq!(
        admin(admin_b, "POST", "/agents/move", None).await.0,
        401,
        "the admin token is needed"
    );
    assert_eq!(admin(admin_b, "POST", "/agents/shop-99/move", Some("t")).await.0, 404);

    // a is back: the balancer sends new connections there.
    balancer.send_to(a.addr);
    let (status, body) = admin(admin_b, "POST", "/agents/shop-17/move", Some("t")).await;
    assert_eq!((status, body.trim()), (200, r#"{"asked":1}"#));
    idle_links(&a, "shop-17", 4).await;
    within("the agent to let b go", async {
        while b.bridge.agents().idle_links("shop-17").is_some() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    send_bin(&mut page, b"still on b").await;
    assert_eq!(recv_data(&mut page).await, b"still on b");
    let (mut fresh, _) = ws_connect(&a.url("/pos"), None).await;
    send_bin(&mut fresh, b"on a").await;
    assert_eq!(recv_data(&mut fresh).await, b"on a");
    // With nobody connected, moving all asks none.
    let (status, body) = admin(admin_b, "POST", "/agents/move", Some("t")).await;
    assert_eq!((status, body.trim()), (200, r#"{"asked":0}"#));
}

/// The way back after a failover without the operator: every `balancer_check` the agent looks
/// where its URL leads a new connection (a control link that leaves before its hello). While
/// that is where it is, looking changes nothing; once the balancer sends new connections to
/// another instance, the agent moves there by itself, make-before-break, its page on the
/// instance it leaves going on.
#[tokio::test]
async fn an_agent_follows_its_balancer_to_another_instance_by_itself() {
    let (echo, _) = echo_backend().await;
    let a = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let b = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let balancer = network_to(b.addr).await;
    let mut config = agent_config(balancer.addr, "shop-17", SECRET, &[("pos", tcp(echo))]);
    let every = Duration::from_millis(200);
    config.balancer_check = Some(every);
    let mut agent = start_agent(config).await;
    idle_links(&b, "shop-17", 4).await;
    let (mut page, _) = ws_connect(&b.url("/pos"), None).await;
    send_bin(&mut page, b"on b").await;
    assert_eq!(recv_data(&mut page).await, b"on b");

    // Three looks while the balancer sends to b (a fourth begun: the third has ended): the
    // agent stays as it was.
    looks(&agent, 4).await;
    assert_eq!(agent.attempts.load(Ordering::SeqCst), 1, "a look is not a connection attempt");
    assert!(!agent.state.has_changed().unwrap(), "{:?}", *agent.state.borrow());
    assert_eq!(b.bridge.agents().idle_links("shop-17"), Some(4));
    assert!(a.bridge.agents().idle_links("shop-17").is_none());

    // a is back, and the balancer sends new connections there.
    balancer.send_to(a.addr);
    let switched = Instant::now();
    idle_links(&a, "shop-17", 4).await;
    within("the agent to let b go", async {
        while b.bridge.agents().idle_links("shop-17").is_some() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    // Its next look, at most 1.25 x `every` away, and a login on loopback (on a loaded host).
    assert!(
        switched.elapsed() < every * 5 / 4 + Duration::from_secs(3),
        "the agent followed after {:?}",
        switched.elapsed()
    );
    assert_eq!(agent.attempts.load(Ordering::SeqCst), 2, "one attempt more: the move");
    connected(&mut agent).await;
    send_bin(&mut page, b"still on b").await;
    assert_eq!(recv_data(&mut page).await, b"still on b");
    let (mut fresh, _) = ws_connect(&a.url("/pos"), None).await;
    send_bin(&mut fresh, b"on a").await;
    assert_eq!(recv_data(&mut fresh).await, b"on a");
}

/// After its connection left an instance the agent looks every 5 s (its ordinary looks here are
/// 600 s apart), and goes on doing so when a later connection lands on the same instance again
/// (an operator's move before the balancer has the other instance up): it still follows the
/// balancer back to the instance it left within a quick look.
#[tokio::test]
async fn quick_looks_go_on_when_the_agent_lands_on_the_same_instance_again() {
    let (echo, _) = echo_backend().await;
    let a = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let b = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let balancer = network_to(a.addr).await;
    let mut config = agent_config(balancer.addr, "shop-17", SECRET, &[("pos", tcp(echo))]);
    config.balancer_check = Some(Duration::from_secs(600));
    config.fast_check = Duration::from_millis(500);
    let mut agent = start_agent(config).await;
    idle_links(&a, "shop-17", 4).await;
    let (admin_a, _guard_a) = start_admin(&a, Some("t")).await;
    let (admin_b, _guard_b) = start_admin(&b, Some("t")).await;

    // a goes away (the balancer sends to b), the operator moves the agent there...
    balancer.send_to(b.addr);
    assert_eq!(admin(admin_a, "POST", "/agents/move", Some("t")).await.0, 200);
    idle_links(&b, "shop-17", 4).await;
    // ...and moves it again too soon: it lands on b again.
    assert_eq!(admin(admin_b, "POST", "/agents/move", Some("t")).await.0, 200);
    within("the second move", async {
        while agent.attempts.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    connected(&mut agent).await;
    idle_links(&b, "shop-17", 4).await;

    // a is back: a quick look (at most 625 ms away, the 500 ms spread by a quarter) finds it,
    // not an ordinary one (600 s).
    balancer.send_to(a.addr);
    let back = Instant::now();
    idle_links(&a, "shop-17", 4).await;
    assert!(
        back.elapsed() < Duration::from_millis(625) + Duration::from_secs(3),
        "{:?}",
        back.elapsed()
    );
}

/// A server URL whose connections end before any answer (a balancer with no server up) is
/// said to be that, not a bare protocol error.
#[tokio::test]
async fn a_connection_that_ends_before_any_answer_is_named_as_such() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            drop(s);
        }
    });
    let mut agent = client::spawn(agent_config(addr, "shop-17", SECRET, &[("pos", tcp(addr))])).unwrap();
    within(
        "the agent's reason",
        agent.wait_for(|s| matches!(s, State::Retrying { reason, .. } if reason.contains("closed before the server answered"))),
    )
    .await;
    agent.shutdown.cancel();
}

/// Waits until `agent` has begun `n` looks where its URL leads.
async fn looks(agent: &AgentHandle, n: u64) {
    within(&format!("{n} looks"), async {
        while agent.looks.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
}

/// Behind a balancer that spreads connections over two instances (a misconfiguration for agent
/// mode: its data links reach the wrong one, 421), looks that land on the other instance do not
/// move the agent: it would only hop back and forth.
#[tokio::test]
async fn an_agent_behind_a_balancer_that_spreads_connections_does_not_hop() {
    let (echo, _) = echo_backend().await;
    let a = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let b = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let balancer = network_to(a.addr).await;
    balancer.spread(a.addr, b.addr);
    let mut config = agent_config(balancer.addr, "shop-17", SECRET, &[("pos", tcp(echo))]);
    config.balancer_check = Some(Duration::from_millis(100));
    let agent = start_agent(config).await;
    looks(&agent, 1).await;
    let before = balancer.sent_to(b.addr);
    // Six looks ended, half of them through b as the connections take turns.
    looks(&agent, 7).await;
    assert!(balancer.sent_to(b.addr) >= before + 2, "looks reached b");
    assert_eq!(agent.attempts.load(Ordering::SeqCst), 1, "no move");
    assert!(a.bridge.agents().idle_links("shop-17").is_some(), "still on a");
    assert!(b.bridge.agents().idle_links("shop-17").is_none());
}

/// A balancer whose new connections keep changing instance (two instances failing their health
/// checks in turn, say) would have an agent hop after it for ever, each move a new login and a
/// new pool: after more than three follows within two minutes its looks are no longer quick.
/// Here quick looks are 100 ms apart and the ordinary ones 3 s: after an operator's move (quick
/// looks from then on) the agent follows four times, each within a quick look of the balancer's
/// change, and the fifth time only at an ordinary look, at least 2.25 s after it landed; every
/// page opened on the way goes on meanwhile.
#[tokio::test]
async fn an_agent_whose_balancer_keeps_changing_instance_looks_quickly_no_more() {
    /// Opens a page on `on` (the agent is on it) and waits until the agent's pool there is whole
    /// again: the link that replaces the page's is dialled before the balancer changes (after,
    /// it would reach the other instance: a 421, and a connection that no longer follows).
    async fn open_page(on: &TestBridge, pages: &mut Vec<Ws>) {
        let (mut page, _) = ws_connect(&on.url("/pos"), None).await;
        send_bin(&mut page, b"hello").await;
        assert_eq!(recv_data(&mut page).await, b"hello");
        idle_links(on, "shop-17", 4).await;
        pages.push(page);
    }
    /// Every page opened so far still crosses the agent.
    async fn all_echo(pages: &mut [Ws], what: &[u8]) {
        for page in pages {
            send_bin(page, what).await;
            assert_eq!(recv_data(page).await, what);
        }
    }
    /// Waits until the agent is on `to` (its pool full there) and has let `from` go.
    async fn on(to: &TestBridge, from: &TestBridge) {
        idle_links(to, "shop-17", 4).await;
        within("the agent to let the other instance go", async {
            while from.bridge.agents().idle_links("shop-17").is_some() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
    }

    let (echo, _) = echo_backend().await;
    let a = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let b = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let (admin_a, _guard) = start_admin(&a, Some("t")).await;
    let balancer = network_to(a.addr).await;
    let mut config = agent_config(balancer.addr, "shop-17", SECRET, &[("pos", tcp(echo))]);
    let every = Duration::from_secs(3);
    config.balancer_check = Some(every);
    config.fast_check = Duration::from_millis(100);
    let mut agent = start_agent(config).await;
    idle_links(&a, "shop-17", 4).await;
    let mut pages = Vec::new();
    open_page(&a, &mut pages).await;

    // The operator moves the agent to b (a move the server asked for: quick looks after it,
    // and not a follow). Its first connection's ordinary looks are 2.25 s away at the soonest.
    balancer.send_to(b.addr);
    let (status, body) = admin(admin_a, "POST", "/agents/move", Some("t")).await;
    assert_eq!((status, body.trim()), (200, r#"{"asked":1}"#));
    on(&b, &a).await;
    assert_eq!(agent.attempts.load(Ordering::SeqCst), 2);
    open_page(&b, &mut pages).await;

    // Four follows, each at a quick look.
    let mut fourth = Instant::now();
    for follow in 1..=4u64 {
        let (to, from) = match follow % 2 {
            1 => (&a, &b),
            _ => (&b, &a),
        };
        // The connection looks quickly: two looks (finding where it is: nothing changes) well
        // within an ordinary one's time (at least 4.5 s for two).
        let (before, since) = (agent.looks.load(Ordering::SeqCst), Instant::now());
        looks(&agent, before + 2).await;
        assert!(
            since.elapsed() < every * 3 / 4,
            "before follow {follow}: two looks took {:?}, not quick ones",
            since.elapsed()
        );
        // The balancer changes: the next quick look follows it.
        balancer.send_to(to.addr);
        let changed = Instant::now();
        fourth = changed;
        on(to, from).await;
        assert!(
            changed.elapsed() < every * 3 / 4,
            "follow {follow} after {:?}: not at a quick look",
            changed.elapsed()
        );
        assert_eq!(agent.attempts.load(Ordering::SeqCst), 2 + follow, "one attempt per follow");
        all_echo(&mut pages, format!("after follow {follow}").as_bytes()).await;
        open_page(to, &mut pages).await;
    }

    // Damped: the fifth follow waits for the connection's first ordinary look, 0.75 to 1.25 x
    // `every` after it landed (after `fourth`), and that one look is all it made.
    let looked = agent.looks.load(Ordering::SeqCst);
    balancer.send_to(a.addr);
    let changed = Instant::now();
    on(&a, &b).await;
    assert!(
        fourth.elapsed() >= every * 3 / 4,
        "the fifth follow came {:?} after the fourth began: looks were still quick",
        fourth.elapsed()
    );
    assert!(
        changed.elapsed() < every * 5 / 4 + Duration::from_secs(3),
        "the fifth follow came {:?} after the balancer changed",
        changed.elapsed()
    );
    assert_eq!(agent.looks.load(Ordering::SeqCst) - looked, 1, "one look, the ordinary one");
    assert_eq!(agent.attempts.load(Ordering::SeqCst), 7);
    connected(&mut agent).await;
    all_echo(&mut pages, b"after the fifth follow").await;
    open_page(&a, &mut pages).await;
}

/// A control link as an agent of hello version 2 (before `move`) opens it, by hand: logged in
/// as shop-17 with [`SECRET`], its hello sent, the server's first `want` read.
async fn older_control_link(server: SocketAddr) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>> {
    older_control_link_of(server, "shop-17").await
}

/// [`older_control_link`] for the agent `name`.
async fn older_control_link_of(
    server: SocketAddr,
    name: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{server}/agent").into_client_request().unwrap();
    let h = request.headers_mut();
    h.insert("sec-websocket-protocol", "wsbridge-agent.v1".parse().unwrap());
    h.insert("x-wsbridge-agent", name.parse().unwrap());
    h.insert("authorization", format!("Bearer {SECRET}").parse().unwrap());
    let (mut control, _) = within("the control link", tokio_tungstenite::connect_async(request)).await.unwrap();
    let hello = format!(r#"{{"type":"hello","name":"{name}","services":["pos"],"version":2}}"#);
    control.send(Message::text(hello)).await.unwrap();
    let want = within("want", control.next()).await.unwrap().unwrap();
    assert!(want.to_text().unwrap().contains("\"want\""), "{want:?}");
    control
}

/// An agent from before `move` (hello version 2) is not asked to move: it serves through the
/// drain delay and is told `drain` when the sessions end, as before. Meanwhile the draining
/// instance answers new control links 503 with a Retry-After and still takes data links for
/// the control links it has.
#[tokio::test]
async fn a_draining_instance_refuses_new_control_links_and_drains_older_agents_at_the_end() {
    let mut config = server_config(&["shop-17"], &[("shop-17", "pos")]);
    config.timeouts.drain_delay = Some(Duration::from_secs(60));
    let bridge = TestBridge::start(config).await;
    let mut control = older_control_link(bridge.addr).await;

    let hurry = CancellationToken::new();
    let drain = {
        let (b, hurry) = (bridge.bridge.clone(), hurry.clone());
        tokio::spawn(async move { b.drain(hurry.cancelled_owned()).await })
    };
    within("the drain to start", async {
        while !bridge.bridge.is_draining() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let another = format!(
        "GET /agent HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: wsbridge-agent.v1\r\nX-Wsbridge-Agent: shop-17\r\nAuthorization: Bearer {SECRET}\r\n\r\n"
    );
    let refused = http_raw(bridge.addr, another.as_bytes()).await;
    assert_eq!(status_of(&refused), 503, "{refused}");
    assert!(refused.to_ascii_lowercase().contains("retry-after: 2"), "{refused}");
    assert!(refused.contains("draining"), "{refused}");
    let link = format!(
        "GET /agent HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: wsbridge-agent-link\r\nX-Wsbridge-Agent: shop-17\r\nAuthorization: Bearer {SECRET}\r\n\r\n"
    );
    let (_link, head) = raw_upgrade(bridge.addr, link.as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 101"), "a data link is still taken: {head}");

    hurry.cancel();
    // The first message after the drain began is `drain`: no `move` came before it.
    let told = within("drain", async {
        loop {
            match control.next().await {
                Some(Ok(Message::Text(t))) => return t.to_string(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("before the drain message: {other:?}"),
            }
        }
    })
    .await;
    assert!(told.contains("\"drain\""), "{told}");
    within("the drain", drain).await.unwrap();
}

/// A network drop: the agent finds its control link dead by the missed pong, reconnects once
/// the network is back, and sessions cross it again.
#[tokio::test]
async fn the_agent_survives_a_network_drop() {
    let (echo, _) = echo_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let network = network_to(bridge.addr).await;
    let mut config = agent_config(network.addr, "shop-17", SECRET, &[("pos", tcp(echo))]);
    config.ping_interval = Duration::from_millis(300);
    config.pong_timeout = Duration::from_millis(600);
    let mut agent = start_agent(config).await;
    network.cut();
    within(
        "the agent to find its link dead",
        agent.wait_for(|s| matches!(s, State::Retrying { reason, .. } if reason.contains("no pong"))),
    )
    .await;
    connected(&mut agent).await;
    let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
    send_bin(&mut ws, b"back again").await;
    assert_eq!(recv_data(&mut ws).await, b"back again");
}

/// What the server sent on one connection.
type Tap = Arc<std::sync::Mutex<Vec<u8>>>;

/// What the server sent on each connection from the agent, in the order they came.
struct Taps(Arc<std::sync::Mutex<Vec<Tap>>>);

impl Taps {
    /// How many `open pos` lines (`open pos session=N` to this agent) went down each
    /// connection (the control link's count is 0).
    fn opens_per_link(&self) -> Vec<usize> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|t| occurrences(&t.lock().unwrap(), b"open pos"))
            .collect()
    }
}

/// A TCP relay between agent and server that keeps, for each connection through it, what the
/// server sent on it.
async fn tapped_network_to(server: SocketAddr) -> (SocketAddr, Taps) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let taps = Arc::new(std::sync::Mutex::new(Vec::new()));
    let t = taps.clone();
    tokio::spawn(async move {
        while let Ok((a, _)) = listener.accept().await {
            let tap = Arc::new(std::sync::Mutex::new(Vec::new()));
            t.lock().unwrap().push(tap.clone());
            tokio::spawn(async move {
                let Ok(b) = TcpStream::connect(server).await else { return };
                let (mut ar, mut aw) = a.into_split();
                let (mut br, mut bw) = b.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut ar, &mut bw).await;
                    let _ = bw.shutdown().await;
                });
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match br.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            tap.lock().unwrap().extend_from_slice(&buf[..n]);
                            if aw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = aw.shutdown().await;
                let _ = up.await;
            });
        }
    });
    (addr, Taps(taps))
}

/// How many times `needle` occurs in `hay`.
fn occurrences(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// Waits until agent `name` has `n` idle data links at the server.
async fn idle_links(bridge: &TestBridge, name: &str, n: usize) {
    let agents = bridge.bridge.agents();
    within(&format!("{n} idle links"), async {
        while agents.idle_links(name) != Some(n) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
}

/// A data link in chunks carries one session after another, each with exactly its own bytes and
/// its own half-close, whichever side ends first; each goes back to the pool, so sessions that
/// follow each other dial no new link (the pool of 4 gets its one top-up, at the first take).
#[tokio::test]
async fn one_link_carries_session_after_session_without_mixing_them() {
    let (app, mut accepted) = manual_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let (network, taps) = tapped_network_to(bridge.addr).await;
    let _agent = start_agent(agent_config(network, "shop-17", SECRET, &[("pos", tcp(app))])).await;
    const SESSIONS: u8 = 12;
    idle_links(&bridge, "shop-17", 4).await;
    for i in 0..SESSIONS {
        let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
        let mut conn = within("the app's connection", accepted.recv()).await.unwrap();
        if i % 2 == 0 {
            // The app ends first: all it wrote reaches the browser, then 1000; the browser's
            // close then reaches the app as EOF.
            let data = pattern(100_000 + usize::from(i), i);
            conn.write_all(&data).await.unwrap();
            conn.shutdown().await.unwrap();
            let (msgs, close) = read_until_close(&mut ws).await;
            let got: Vec<u8> = msgs.into_iter().flat_map(|m| m.into_data().to_vec()).collect();
            assert!(
                got == data,
                "session {i}: the browser got {} of {} bytes, or others",
                got.len(),
                data.len()
            );
            assert_eq!(close.map(|c| u16::from(c.code)), Some(1000), "session {i}");
            // The browser answers the close (its reply goes out with the next read).
            within("the bridge's FIN", async { while let Some(Ok(_)) = ws.next().await {} }).await;
            let mut rest = Vec::new();
            within("the app's EOF", conn.read_to_end(&mut rest)).await.unwrap();
            assert!(rest.is_empty(), "session {i}: the app got {} bytes it was not sent", rest.len());
        } else {
            // The browser ends first: every byte it sent reaches the app, then EOF.
            let data = pattern(70_000 + usize::from(i), i);
            for piece in data.chunks(16 * 1024) {
                send_bin(&mut ws, piece).await;
            }
            ws.send(Message::Close(None)).await.unwrap();
            let mut got = Vec::new();
            within("the app's EOF", conn.read_to_end(&mut got)).await.unwrap();
            assert!(
                got == data,
                "session {i}: the app got {} of {} bytes, or others",
                got.len(),
                data.len()
            );
            drop(conn);
            let (msgs, _) = read_until_close(&mut ws).await;
            assert!(msgs.is_empty(), "session {i}: the browser got bytes no app sent");
        }
        // Back in the pool: the four, and the one asked for when the first session took one.
        idle_links(&bridge, "shop-17", 5).await;
    }
    // The control link and five data links, each `open` down one of them.
    let per_link = taps.opens_per_link();
    assert_eq!(per_link.len(), 1 + 5, "connections from the agent: {per_link:?}");
    assert_eq!(per_link.iter().sum::<usize>(), usize::from(SESSIONS), "{per_link:?}");
}

/// An agent of the protocol before chunks (it offers none when it dials a link) still works: its
/// links are raw, and each carries one session, ended with the TCP half-close. So does a link
/// whose agent offered chunks but answers a plain `ok` (a proxy on the way dropped the server's
/// answer from the 101, so the agent never saw it): chunks need the agent's `ok chunks` too.
#[tokio::test]
async fn an_agent_that_offers_no_chunks_gets_raw_links_used_once() {
    for offer in [false, true] {
        let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
        let _control = older_control_link(bridge.addr).await;
        let mut link = TcpStream::connect(bridge.addr).await.unwrap();
        let offered = if offer { "X-Wsbridge-Link-Framing: chunks\r\n" } else { "" };
        link.write_all(
            format!(
                "GET /agent HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: wsbridge-agent-link\r\nX-Wsbridge-Agent: shop-17\r\n{offered}Authorization: Bearer {SECRET}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let head = read_head(&mut link).await.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert_eq!(
            head.contains("x-wsbridge-link-framing: chunks"),
            offer,
            "chunks are answered when offered, only then: {head}"
        );
        let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
        let mut open = [0u8; 9];
        within("open", link.read_exact(&mut open)).await.unwrap();
        assert_eq!(&open, b"open pos\n");
        link.write_all(b"ok\nhello").await.unwrap();
        assert_eq!(recv_data(&mut ws).await, b"hello");
        send_bin(&mut ws, b"raw bytes").await;
        let mut got = [0u8; 9];
        within("the browser's bytes", link.read_exact(&mut got)).await.unwrap();
        assert_eq!(&got, b"raw bytes", "offered chunks: {offer}");
        link.shutdown().await.unwrap();
        let (_, close) = read_until_close(&mut ws).await;
        assert_eq!(close.map(|c| u16::from(c.code)), Some(1000));
        within("the bridge's FIN", async { while let Some(Ok(_)) = ws.next().await {} }).await;
        // Used once: the server closes its end after the session, with nothing more on it.
        let mut rest = Vec::new();
        within("the link's EOF", link.read_to_end(&mut rest)).await.unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    }
}

/// An app that goes on sending after the browser left does not keep the two ends busy: the
/// server reads on for the agent's end mark only so far, then closes the link, and the agent
/// closes the app's connection long before its 5 s of grace would run out. The next session
/// gets a link of its own.
#[tokio::test]
async fn an_app_that_goes_on_sending_after_the_browser_left_loses_its_link() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let (closed_tx, mut closed) = tokio::sync::mpsc::channel::<Instant>(4);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let block = vec![b'x'; 16 * 1024];
                while s.write_all(&block).await.is_ok() {}
                let _ = closed_tx.send(Instant::now()).await;
            });
        }
    });
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let _agent = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(app))])).await;
    let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
    assert!(!recv_data(&mut ws).await.is_empty());
    ws.send(Message::Close(None)).await.unwrap();
    let left = Instant::now();
    read_until_close(&mut ws).await;
    let cut = within("the app's connection closed", closed.recv()).await.unwrap();
    assert!(
        cut.duration_since(left) < Duration::from_secs(3),
        "the app was cut off {:?} after the browser left (its grace is 5 s)",
        cut.duration_since(left)
    );
    let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
    assert!(!recv_data(&mut ws).await.is_empty(), "the next session carries the app's bytes");
}

/// A server that lets the agent in (its hello answered with `want`) and drops the connection at
/// once, again and again (it crashes as agents arrive, or a middlebox cuts upgraded
/// connections): the agent backs off as after any other failure, instead of starting again
/// from the first step each time because it was connected.
#[tokio::test]
async fn an_agent_backs_off_from_a_server_that_drops_it_as_soon_as_it_is_in() {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    let (echo, _) = echo_backend().await;
    let mut config = agent_config(server, "shop-17", SECRET, &[("pos", tcp(echo))]);
    config.backoff.max = Duration::from_millis(3200);
    let mut agent = client::spawn(config).unwrap();
    let mut dropped = None;
    let mut gaps = Vec::new();
    for _ in 0..5 {
        let (s, _) = within("the control link", listener.accept()).await.unwrap();
        if let Some(t) = dropped {
            gaps.push(Instant::now() - t);
        }
        #[allow(clippy::result_large_err)]
        let answer = |_: &Request, mut response: Response| {
            response
                .headers_mut()
                .insert("sec-websocket-protocol", "wsbridge-agent.v1".parse().unwrap());
            Ok(response)
        };
        let mut control = within("the control handshake", tokio_tungstenite::accept_hdr_async(s, answer))
            .await
            .unwrap();
        within("hello", control.next()).await.unwrap().unwrap();
        control.send(Message::text(r#"{"type":"want","links":0}"#)).await.unwrap();
        connected(&mut agent).await;
        drop(control);
        dropped = Some(Instant::now());
    }
    // Four failures in a row: the fifth attempt waits at least a quarter of 100 ms x 2^3.
    // Starting again from the first step, each would wait at most 100 ms.
    assert!(gaps[3] >= Duration::from_millis(200), "the gaps between attempts: {gaps:?}");
    agent.shutdown.cancel();
}

/// Something between the agent and the server that adds an `Origin` to its requests (a proxy
/// configured for browsers): the server refuses them as a browser's (403), and the agent says
/// that, not that its secret was refused.
#[tokio::test]
async fn an_agent_whose_requests_gain_an_origin_on_the_way_says_so() {
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let between = listener.local_addr().unwrap();
    let server = bridge.addr;
    tokio::spawn(async move {
        while let Ok((mut agent, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut line = Vec::new();
                while !line.ends_with(b"\r\n") {
                    line.push(agent.read_u8().await?);
                }
                let mut up = TcpStream::connect(server).await?;
                up.write_all(&line).await?;
                up.write_all(b"Origin: https://proxy.example\r\n").await?;
                tokio::io::copy_bidirectional(&mut agent, &mut up).await.map(|_| ())
            });
        }
    });
    let (echo, _) = echo_backend().await;
    let mut agent = client::spawn(agent_config(between, "shop-17", SECRET, &[("pos", tcp(echo))])).unwrap();
    let seen = std::sync::Mutex::new(String::new());
    within(
        "the agent's reason",
        agent.wait_for(|s| match s {
            State::Retrying { reason, .. } => {
                *seen.lock().unwrap() = reason.clone();
                true
            }
            _ => false,
        }),
    )
    .await;
    let reason = seen.into_inner().unwrap();
    assert!(
        reason.contains("for a browser's (403 Forbidden: agent endpoint: not for browsers)") && reason.contains("adds an Origin header"),
        "{reason}"
    );
    assert!(!reason.contains("secret"), "{reason}");
    agent.shutdown.cancel();
}

/// A new agent on a server from before chunks (its 101 does not answer the offer): the agent
/// answers a plain `ok`, carries the session's raw bytes, and dials a link in place of the one
/// it was sent `open` on, as agents did before. The old server is played by this test, by the
/// protocol it spoke (a control WebSocket, `want`, a raw link).
#[tokio::test]
async fn an_agent_on_a_server_without_chunks_uses_raw_links() {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    let (echo, _) = echo_backend().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    let _agent = client::spawn(agent_config(server, "shop-17", SECRET, &[("pos", tcp(echo))])).unwrap();
    let (s, _) = within("the control link", listener.accept()).await.unwrap();
    // The callback's error type (an HTTP response) is tungstenite's, not ours to shrink.
    #[allow(clippy::result_large_err)]
    let answer = |_: &Request, mut response: Response| {
        response
            .headers_mut()
            .insert("sec-websocket-protocol", "wsbridge-agent.v1".parse().unwrap());
        Ok(response)
    };
    let mut control = within("the control handshake", tokio_tungstenite::accept_hdr_async(s, answer))
        .await
        .unwrap();
    let hello = within("hello", control.next()).await.unwrap().unwrap();
    assert!(hello.to_text().unwrap().contains("\"hello\""), "{hello:?}");
    control.send(Message::text(r#"{"type":"want","links":1}"#)).await.unwrap();
    let (mut link, _) = within("a data link", listener.accept()).await.unwrap();
    let head = read_head(&mut link).await.to_ascii_lowercase();
    assert!(head.contains("x-wsbridge-link-framing: chunks"), "the agent offers chunks: {head}");
    link.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: wsbridge-agent-link\r\nConnection: Upgrade\r\n\r\nopen pos\n")
        .await
        .unwrap();
    let mut ok = [0u8; 3];
    within("ok", link.read_exact(&mut ok)).await.unwrap();
    assert_eq!(&ok, b"ok\n");
    // The agent replaces a raw link it is sent `open` on.
    let replacement = tokio::spawn(async move { listener.accept().await.map(|(s, _)| s) });
    link.write_all(b"raw bytes").await.unwrap();
    let mut got = [0u8; 9];
    within("the echo", link.read_exact(&mut got)).await.unwrap();
    assert_eq!(&got, b"raw bytes", "raw, with no chunk header");
    within("the replacement link", replacement).await.unwrap().unwrap();
    // Our FIN ends the session: the app's EOF comes back as the agent's FIN, nothing after it.
    link.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("the link's EOF", link.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty(), "{rest:?}");
}

/// The admin's `/agents` lists the connected agents (name, address, since when, services, idle
/// links, links dialled and returned) and `/metrics` counts them; an agent that stops leaves both,
/// and the running totals of links stay.
#[tokio::test]
async fn the_admin_lists_connected_agents_and_counts_them() {
    let (echo, _) = echo_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let (admin_addr, _admin) = start_admin(&bridge, None).await;
    let (status, body) = admin(admin_addr, "GET", "/agents", None).await;
    assert_eq!((status, body.trim()), (200, "[]"));
    let agent = start_agent(agent_config(
        bridge.addr,
        "shop-17",
        SECRET,
        &[("pos", tcp(echo)), ("label", tcp(echo))],
    ))
    .await;
    idle_links(&bridge, "shop-17", 4).await;
    let (status, body) = admin(admin_addr, "GET", "/agents", None).await;
    assert_eq!(status, 200, "{body}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(list.len(), 1, "{body}");
    let a = &list[0];
    assert_eq!(a["name"], "shop-17");
    assert!(a["client"].as_str().unwrap().starts_with("127.0.0.1:"), "{body}");
    assert_eq!(a["services"], serde_json::json!(["label", "pos"]));
    assert_eq!(a["idle_links"], 4);
    assert_eq!(a["instance"], bridge.bridge.agents().instance(), "{body}");
    let since = a["connected_since"].as_f64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(since <= now && since > now - 60.0, "connected_since {since}, now {now}");
    let (_, metrics) = admin(admin_addr, "GET", "/metrics", None).await;
    assert!(metrics.lines().any(|l| l == "wsbridge_agents_connected 1"), "{metrics}");
    assert!(metrics.lines().any(|l| l == "wsbridge_agent_connections_total 1"), "{metrics}");
    assert!(metrics.lines().any(|l| l == "wsbridge_agent_idle_links 4"), "{metrics}");
    // The control link and the idle links are connections, under max_connections.
    assert!(metrics.lines().any(|l| l == "wsbridge_connections_open 5"), "{metrics}");
    let max = format!("wsbridge_connections_max {}", bridge.bridge.max_connections());
    assert!(metrics.lines().any(|l| l == max), "{metrics}");
    assert_eq!((&a["links_dialled"], &a["links_returned"]), (&4.into(), &0.into()), "{body}");
    // A session takes a link (the pool asks for one more) and gives it back.
    let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
    send_bin(&mut ws, b"once").await;
    assert_eq!(recv_data(&mut ws).await, b"once");
    ws.send(Message::Close(None)).await.unwrap();
    read_until_close(&mut ws).await;
    idle_links(&bridge, "shop-17", 5).await;
    let (_, body) = admin(admin_addr, "GET", "/agents", None).await;
    let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (&list[0]["links_dialled"], &list[0]["links_returned"]),
        (&5.into(), &1.into()),
        "{body}"
    );
    agent.shutdown.cancel();
    within("the agent to stop", agent.task).await.unwrap().unwrap();
    within("the agent gone from the list", async {
        while admin(admin_addr, "GET", "/agents", None).await.1.trim() != "[]" {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let (_, metrics) = admin(admin_addr, "GET", "/metrics", None).await;
    assert!(metrics.lines().any(|l| l == "wsbridge_agents_connected 0"), "{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"wsbridge_agent_disconnects_total{reason="closed"} 1"#),
        "{metrics}"
    );
    assert!(metrics.lines().any(|l| l == "wsbridge_agent_idle_links 0"), "{metrics}");
    // The totals are counters: they outlive the agent's connection.
    assert!(metrics.lines().any(|l| l == "wsbridge_agent_links_dialled_total 5"), "{metrics}");
    assert!(metrics.lines().any(|l| l == "wsbridge_agent_links_returned_total 1"), "{metrics}");
}

/// An app that resets its connection mid-session: the agent ends the session's side with the
/// reset mark, and the page reads the 1011 a TCP backend's reset gives (before the mark the agent
/// dropped the link: "agent shop-17 dropped the session's link"; a raw link would have looked like
/// the app's clean close, 1000).
#[tokio::test]
async fn an_app_reset_mid_session_reaches_the_page_as_1011() {
    let (app, mut accepted) = manual_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let _agent = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(app))])).await;
    let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
    let mut conn = within("the app's connection", accepted.recv()).await.unwrap();
    conn.write_all(b"hello").await.unwrap();
    assert_eq!(recv_data(&mut ws).await, b"hello");
    // SO_LINGER 0: the close sends a reset (at once: nothing is left to send).
    socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO)).unwrap();
    drop(conn);
    let (code, reason) = read_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1011, "backend read failed: connection reset"));
}

/// Under a steady load of sessions the pool settles: links come back and are taken again, and a
/// pool running low asks for a few at a time rather than one per take or per waiting session
/// (those arrive after the links have come back, and were closed as surplus: a new link, and
/// over wss:// a TLS handshake, per session or so).
#[tokio::test]
async fn a_steady_load_of_sessions_dials_few_links() {
    let (echo, _) = echo_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let (network, taps) = tapped_network_to(bridge.addr).await;
    let _agent = start_agent(agent_config(network, "shop-17", SECRET, &[("pos", tcp(echo))])).await;
    idle_links(&bridge, "shop-17", 4).await;
    const AT_ONCE: usize = 10;
    const ROUNDS: usize = 10;
    for round in 0..ROUNDS {
        let sessions: Vec<_> = (0..AT_ONCE)
            .map(|i| {
                let url = bridge.url("/pos");
                tokio::spawn(async move {
                    let (mut ws, _) = ws_connect(&url, None).await;
                    let data = pattern(100, (round * AT_ONCE + i) as u8);
                    send_bin(&mut ws, &data).await;
                    assert_eq!(recv_data(&mut ws).await, data);
                    ws.send(Message::Close(None)).await.unwrap();
                    read_until_close(&mut ws).await;
                })
            })
            .collect();
        for s in sessions {
            within("a session", s).await.unwrap();
        }
    }
    let per_link = taps.opens_per_link();
    let links = per_link.len() - 1;
    assert_eq!(per_link.iter().sum::<usize>(), AT_ONCE * ROUNDS);
    // About the sessions at once (and links still on their way back), the pool's 4, and what
    // a pool running low has on its way: 24 here. (A link asked for at every take below the
    // pool's size and for every waiting session made it 101, one a session, most never used.)
    assert!(
        links <= 3 * AT_ONCE,
        "{} sessions, {AT_ONCE} at a time, dialled {links} links: {per_link:?}",
        AT_ONCE * ROUNDS
    );
}

/// Several instances: an agent given two servers keeps a connection to each, so a page reaches
/// the app through either. One draining (and gone) leaves the other serving, its open session
/// included; when it is back, the agent is on both again.
#[tokio::test]
async fn an_agent_with_two_servers_serves_pages_on_each_and_outlives_one() {
    let (echo, _) = echo_backend().await;
    let config = server_config(&["shop-17"], &[("shop-17", "pos")]);
    let one = TestBridge::start(config.clone()).await;
    let two = TestBridge::start(config.clone()).await;
    let one_addr = one.addr;
    let mut agent_config = agent_config(one.addr, "shop-17", SECRET, &[("pos", tcp(echo))]);
    agent_config.more_servers = vec![(format!("ws://{}/agent", two.addr).parse().unwrap(), None, ProxySource::Config)];
    // Slow enough that the drain's state is still there when the test looks.
    agent_config.backoff.initial = Duration::from_secs(2);
    agent_config.backoff.max = Duration::from_secs(2);
    let mut agent = client::spawn(agent_config).unwrap();
    assert_eq!(agent.states.len(), 2);
    for state in &mut agent.states {
        within("both connections", state.wait_for(|s| *s == State::Connected))
            .await
            .unwrap();
    }
    for bridge in [&one, &two] {
        let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
        send_bin(&mut ws, bridge.addr.to_string().as_bytes()).await;
        assert_eq!(recv_data(&mut ws).await, bridge.addr.to_string().as_bytes());
    }
    // A session on the second instance, open while the first goes away.
    let (mut open, _) = ws_connect(&two.url("/pos"), None).await;
    send_bin(&mut open, b"before").await;
    assert_eq!(recv_data(&mut open).await, b"before");
    // Watched from before the drain, so that the state is seen however long the stop takes.
    let mut first = agent.states[0].clone();
    let told = tokio::spawn(async move {
        first
            .wait_for(|s| matches!(s, State::Retrying { reason, .. } if reason.contains("draining")))
            .await
            .map(|_| ())
    });
    let drained = one.stop().await;
    assert!(drained.clean, "{drained:?}");
    within("the first connection to be told", told).await.unwrap().unwrap();
    assert_eq!(*agent.states[1].borrow(), State::Connected, "the second connection stays up");
    send_bin(&mut open, b"during").await;
    assert_eq!(recv_data(&mut open).await, b"during");
    let (mut fresh, _) = ws_connect(&two.url("/pos"), None).await;
    send_bin(&mut fresh, b"new session").await;
    assert_eq!(recv_data(&mut fresh).await, b"new session");
    // The first instance is back on its port: the agent is on both again.
    let listener = within("the port again", async {
        loop {
            if let Ok(l) = TcpListener::bind(one_addr).await {
                return l;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let one = TestBridge::start_on(config, listener).await;
    within("the first connection again", agent.states[0].wait_for(|s| *s == State::Connected))
        .await
        .unwrap();
    let (mut ws, _) = ws_connect(&one.url("/pos"), None).await;
    send_bin(&mut ws, b"back").await;
    assert_eq!(recv_data(&mut ws).await, b"back");
    // SIGTERM's equivalent ends both connections (once the pages have gone: live sessions get
    // their grace).
    drop((ws, open, fresh));
    agent.shutdown.cancel();
    within("the agent to stop", agent.task).await.unwrap().unwrap();
    for state in &agent.states {
        assert_eq!(*state.borrow(), State::Stopped);
    }
}

/// `wsbridge agent --server A --server B`: the binary connects to both, and each log line of a
/// connection names its server.
#[tokio::test]
async fn the_agent_binary_takes_several_servers() {
    let (echo, _) = echo_backend().await;
    let config = server_config(&["shop-17"], &[("shop-17", "pos")]);
    let one = TestBridge::start(config.clone()).await;
    let two = TestBridge::start(config).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("agent.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let (one_url, two_url) = (format!("ws://{}/agent", one.addr), format!("ws://{}/agent", two.addr));
    let service = format!("pos={echo}");
    let mut child = agent_command(&["--name", "shop-17", "--server", &one_url, "--server", &two_url])
        .args(["--service", &service, "--secret-file", secret.to_str().unwrap()])
        .spawn()
        .unwrap();
    let lines = Lines::capture(child.stderr.take().unwrap());
    for bridge in [&one, &two] {
        let line = lines
            .line(&format!(
                "server{{url=ws://{}/agent}}: wsbridge::agent::client: agent: connected",
                bridge.addr
            ))
            .await;
        assert!(line.contains("agent=shop-17"), "{line}");
        let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
        send_bin(&mut ws, b"via the binary").await;
        assert_eq!(recv_data(&mut ws).await, b"via the binary");
    }
    child.kill().await.unwrap();
}

/// A proxy that cannot be reached is said as the proxy's, with where it came from: "cannot reach
/// the server: connection refused" sent a Windows admin looking at the server (a review).
#[tokio::test]
async fn a_proxy_that_cannot_be_reached_is_named_in_the_agents_log() {
    let closed = closed_port().await;
    let line = first_failure_through(&format!("http://{closed}")).await;
    assert!(
        line.contains(&format!("reason=\"cannot reach the server: the proxy {closed} (--proxy): ")),
        "{line}"
    );
}

/// The agent binary's first "not connected" line when it dials ws://192.0.2.1:6080/agent
/// through `proxy` (`--proxy`); the agent is stopped.
async fn first_failure_through(proxy: &str) -> String {
    let (echo, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("agent.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let service = format!("pos={echo}");
    let mut child = agent_command(&["--name", "shop-17", "--server", "ws://192.0.2.1:6080/agent", "--proxy", proxy])
        .args(["--service", &service, "--secret-file", secret.to_str().unwrap()])
        .spawn()
        .unwrap();
    let lines = Lines::capture(child.stderr.take().unwrap());
    let line = lines.line("not connected; retrying").await;
    child.kill().await.unwrap();
    line
}

/// A proxy that refuses CONNECT is named, with what its answer usually means: 403 to a port
/// other than 443 (squid's default allows CONNECT to 443 only), 407 without credentials or with
/// wrong ones (a review with squid: "the proxy answered 403 to CONNECT" alone).
#[tokio::test]
async fn a_proxy_that_refuses_connect_is_named_with_what_to_do() {
    use crate::common::connect_proxy::canned_server;
    let refusal = |status: &str| format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let (forbidding, _) = canned_server(refusal("403 Forbidden")).await;
    let (asking, _) = canned_server(refusal("407 Proxy Authentication Required")).await;
    for (proxy, said) in [
        (
            format!("http://{forbidding}"),
            format!(
                "the proxy {forbidding} (--proxy) answered 403 to CONNECT 192.0.2.1:6080: it does not let this computer \
                 through to 192.0.2.1:6080; many proxies allow CONNECT to port 443 only"
            ),
        ),
        (
            format!("HTTP://{asking}"),
            format!("the proxy {asking} (--proxy) answered 407 to CONNECT 192.0.2.1:6080: it asks for a user and password"),
        ),
        (
            format!("http://agent:wrong@{asking}"),
            "answered 407 to CONNECT 192.0.2.1:6080: it refused the user and password in the proxy's URL".to_owned(),
        ),
    ] {
        let line = first_failure_through(&proxy).await;
        assert!(line.contains(&said), "{proxy}: {line}");
        assert!(!line.contains("wrong"), "the password shown: {line}");
    }
}

/// `wsbridge check` shows a service's cap, and the agent's timings with the deadline for an app
/// that stops reading which follows them (a compat review: an agent.toml whose ping_interval was
/// lowered for a NAT changed meaning, and nothing showed it); `--max-sessions` is checked
/// against the services.
#[tokio::test]
async fn check_shows_a_services_session_cap() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("agent.secret"), "s\n").unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "[agent]\nname = \"shop-17\"\nsecret_file = \"agent.secret\"\nserver = \"ws://127.0.0.1:6080/agent\"\n\
         ping_interval = \"2s\"\npong_timeout = \"2s\"\n\n\
         [agent.services]\ntill = { target = \"127.0.0.1:9200\", max_sessions = 1 }\npos = \"127.0.0.1:9100\"\n",
    )
    .unwrap();
    let (code, out, err) = run_to_end(&["check", "--config", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("-> 127.0.0.1:9200 (at most 1 at a time)"), "{out}");
    assert!(out.lines().any(|l| l.ends_with("-> 127.0.0.1:9100")), "{out}");
    assert!(
        out.contains("connect_timeout = \"10s\", ping_interval = \"2s\", pong_timeout = \"2s\", retry_max = \"30s\"")
            && out.contains("none of a page's bytes for 40s"),
        "{out}"
    );
    let (code, _, err) = run_to_end(&["agent", "--config", file.to_str().unwrap(), "--max-sessions", "label=1"]).await;
    assert_eq!(code, 64);
    assert!(err.contains("--max-sessions") && err.contains("no such service"), "{err}");
}

/// `wsbridge check` warns of an agent declared both in an `[[agent]]` table and in a fleet file:
/// the table's hash is the one used, so a rotation written in the file would do nothing.
#[tokio::test]
async fn check_warns_of_an_agent_declared_in_a_table_and_a_fleet_file() {
    let dir = tempfile::tempdir().unwrap();
    let hash = secret_sha256(SECRET);
    std::fs::write(dir.path().join("fleet"), format!("shop-17: {hash}\nshop-18: {hash}\n")).unwrap();
    let file = dir.path().join("server.toml");
    std::fs::write(
        &file,
        format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\n[[agent_endpoint]]\npath = \"/agent\"\n[[agents]]\nsource = \"fleet\"\n\
             [[agent]]\nname = \"shop-17\"\nsecret_sha256 = \"{hash}\"\n[[route]]\npath = \"/pos\"\n\
             target = {{ agent = \"shop-17\", service = \"pos\" }}\n"
        ),
    )
    .unwrap();
    let (code, out, err) = run_to_end(&["check", "--config", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let warnings: Vec<&str> = out.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(warnings.len(), 1, "{out}");
    assert!(
        warnings[0].starts_with("warning: agent shop-17 is declared in an [[agent]] table and in "),
        "{out}"
    );
}

/// `server` in an `[agent]` table is one URL or a list; a mistake in a list names its element.
#[tokio::test]
async fn an_agent_file_takes_a_list_of_servers_and_names_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("agent.secret"), "s\n").unwrap();
    let file = dir.path().join("agent.toml");
    let write = |server: &str| {
        std::fs::write(
            &file,
            format!("[agent]\nname = \"shop-17\"\nsecret_file = \"agent.secret\"\nserver = {server}\n\n[agent.services]\npos = \"127.0.0.1:1\"\n"),
        )
        .unwrap();
    };
    let check_args = ["check", "--config", file.to_str().unwrap()];
    let check = || run_to_end(&check_args);
    write(r#"["wss://a.example.com/agent", "wss://b.example.com:8443/agent"]"#);
    let (code, out, err) = check().await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("for wss://a.example.com:443/agent, wss://b.example.com:8443/agent"),
        "{out}"
    );
    let config = AgentConfig::from_file(&file).unwrap();
    let servers: Vec<String> = config.servers().map(|s| s.authority()).collect();
    assert_eq!(servers, ["a.example.com:443", "b.example.com:8443"]);
    for (server, wanted) in [
        (
            r#"["wss://a.example.com/agent", "ftp://b/agent"]"#,
            "agent.toml:4: agent.server[1]: ",
        ),
        // A list over several lines: the element's own line.
        (
            "[\n  \"wss://a.example.com/agent\",\n  \"ftp://b/agent\",\n]",
            "agent.toml:6: agent.server[1]: ",
        ),
        (
            r#"["wss://a.example.com/agent", 7]"#,
            "agent.toml:4: agent.server[1]: a URL such as",
        ),
        (r#"[]"#, "agent.toml:4: agent.server: list at least one"),
        (
            r#"["wss://a.example.com/agent", "wss://a.example.com:443/agent"]"#,
            "agent.toml:4: agent.server[1]: wss://a.example.com:443/agent is listed twice",
        ),
    ] {
        write(server);
        let (code, _, err) = check().await;
        assert_eq!(code, 64, "{server}: {err}");
        assert!(err.contains(wanted), "{server}: {err}");
    }
}

/// Two of an agent's URLs that reach the same instance (here: directly, and through a relay):
/// the second connection sees the instance's id in its `101` and goes away before its hello, so
/// the first is never replaced, and the agent says why.
#[tokio::test]
async fn two_urls_that_reach_one_instance_keep_one_connection() {
    let (echo, _) = echo_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let relay = network_to(bridge.addr).await;
    let mut config = agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))]);
    let second = format!("ws://{}/agent", relay.addr);
    config.more_servers = vec![(second.parse().unwrap(), None, ProxySource::Config)];
    let mut agent = client::spawn(config).unwrap();
    // Whichever connection comes second is told so; the first stays connected.
    let [a, b] = &mut agent.states[..] else { unreachable!() };
    let (first, other) = within("one connection up", async {
        tokio::select! {
            r = a.wait_for(|s| *s == State::Connected) => { r.unwrap(); (0, 1) }
            r = b.wait_for(|s| *s == State::Connected) => { r.unwrap(); (1, 0) }
        }
    })
    .await;
    let said = within(
        "the other to find the same instance",
        agent.states[other].wait_for(|s| matches!(s, State::Retrying { reason, .. } if reason.contains("reaches the same instance as"))),
    )
    .await
    .unwrap()
    .clone();
    let State::Retrying { reason, .. } = said else { unreachable!() };
    let urls = [format!("ws://{}/agent", bridge.addr), second];
    assert_eq!(
        reason,
        format!(
            "{} reaches the same instance as {}, which this agent is connected to already",
            urls[other], urls[first]
        )
    );
    assert!(!agent.states[first].has_changed().unwrap(), "the first connection was not replaced");
    assert_eq!(*agent.states[first].borrow(), State::Connected);
    let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
    send_bin(&mut ws, b"one instance").await;
    assert_eq!(recv_data(&mut ws).await, b"one instance");
}

/// A URL that reaches several instances (a balancer that spreads connections) sends an agent's
/// control link to one instance and its data links to another. The data links name their
/// control link's instance, so the other instance, where the agent is connected too (through
/// its own URL), refuses them (421) instead of pooling links its sessions cannot use.
#[tokio::test]
async fn a_data_link_that_reaches_another_instance_is_refused_there() {
    let (echo, _) = echo_backend().await;
    let config = server_config(&["shop-17"], &[("shop-17", "pos")]);
    let one = TestBridge::start(config.clone()).await;
    let two = TestBridge::start(config).await;
    // The "balancer": its first connection (the control link) to instance two, the rest to one.
    let balancer = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let balancer_addr = balancer.local_addr().unwrap();
    let (closed_tx, mut closed) = tokio::sync::watch::channel(0usize);
    let closed_tx = Arc::new(closed_tx);
    let (to_one, to_two) = (one.addr, two.addr);
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut a, _)) = balancer.accept().await {
            let to = if std::mem::take(&mut first) { to_two } else { to_one };
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                if let Ok(mut b) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
                closed_tx.send_modify(|n| *n += 1);
            });
        }
    });
    let mut config = agent_config(one.addr, "shop-17", SECRET, &[("pos", tcp(echo))]);
    config.more_servers = vec![(format!("ws://{balancer_addr}/agent").parse().unwrap(), None, ProxySource::Config)];
    let mut agent = client::spawn(config).unwrap();
    for state in &mut agent.states {
        within("both connections", state.wait_for(|s| *s == State::Connected))
            .await
            .unwrap();
    }
    // Instance one has the pool of the connection to it (4 links), and refused the 4 links of
    // the connection to instance two that the balancer sent it.
    idle_links(&one, "shop-17", 4).await;
    within("the balancer's data links to end", closed.wait_for(|n| *n >= 4))
        .await
        .unwrap();
    assert_eq!(one.bridge.agents().idle_links("shop-17"), Some(4));
    assert_eq!(one.bridge.agents().link_totals().0, 4, "instance one took in links it cannot use");
    assert_eq!(two.bridge.agents().link_totals().0, 0);
    // Sessions on instance one are unaffected.
    let (mut ws, _) = ws_connect(&one.url("/pos"), None).await;
    send_bin(&mut ws, b"instance one").await;
    assert_eq!(recv_data(&mut ws).await, b"instance one");
}

/// The file's servers are checked even when `--server` replaces them.
#[tokio::test]
async fn a_bad_server_in_the_file_is_refused_even_with_server_flags() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("agent.secret"), "s\n").unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "[agent]\nname = \"shop-17\"\nsecret_file = \"agent.secret\"\nserver = \"ftp://x/agent\"\n[agent.services]\npos = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    let (code, _, err) = run_to_end(&["agent", "--config", file.to_str().unwrap(), "--server", "ws://127.0.0.1:1/agent"]).await;
    assert_eq!(code, 64);
    assert!(err.contains("agent.toml:4: agent.server: "), "{err}");
}

/// After a drain the server is likely restarting: the agent tries it again at most
/// `after_drain` apart, whatever its growing backoff would say, so it is back as soon as the
/// instance is.
#[tokio::test]
async fn after_a_drain_the_agent_retries_at_the_short_interval() {
    let (echo, _) = echo_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let mut config = agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))]);
    config.backoff = Backoff {
        initial: Duration::from_secs(5),
        max: Duration::from_secs(30),
        auth_max: Duration::from_secs(60),
        after_drain: Duration::from_millis(100),
        drain_window: Duration::from_secs(60),
    };
    let mut agent = start_agent(config).await;
    let drained = bridge.stop().await;
    assert!(drained.clean, "{drained:?}");
    // The retry after the drain, then three failed attempts at the gone server: none waits
    // longer than 100 ms (the backoff alone would wait 1.25-5 s, then 2.5-10 s, ...).
    let mut delays = Vec::new();
    within("four retries", async {
        while delays.len() < 4 {
            agent.state.changed().await.unwrap();
            if let State::Retrying { after, reason } = &*agent.state.borrow_and_update() {
                delays.push((*after, reason.clone()));
            }
        }
    })
    .await;
    assert!(delays[0].1.contains("draining"), "{delays:?}");
    assert!(delays.iter().all(|(after, _)| *after <= Duration::from_millis(100)), "{delays:?}");
}

/// HTTPS_PROXY applies to each wss:// server the agent lists, unless NO_PROXY names its host;
/// `wsbridge check` says which goes through which proxy, and which setting said so.
#[tokio::test]
async fn the_environments_proxy_is_resolved_for_each_server() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("agent.secret"), "s\n").unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "[agent]\nname = \"shop-17\"\nsecret_file = \"agent.secret\"\n\
         server = [\"wss://agents-1.example.com/agent\", \"wss://agents-2.internal.example/agent\"]\n\
         [agent.services]\npos = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(["check", "--config", file.to_str().unwrap()])
        .env("HTTPS_PROXY", "http://proxy.example.com:3128")
        .env("NO_PROXY", "internal.example")
        .env_remove("https_proxy")
        .env_remove("no_proxy");
    let (code, text, err) = command_to_end(command).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("server wss://agents-1.example.com:443/agent through the proxy proxy.example.com:3128 (from HTTPS_PROXY)"),
        "{text}"
    );
    assert!(
        text.contains("server wss://agents-2.internal.example:443/agent directly (from NO_PROXY)"),
        "{text}"
    );
    // With nothing set, check says so too (on Windows it would ask the system's settings).
    let mut command = tokio::process::Command::new(BIN);
    command.args(["check", "--config", file.to_str().unwrap()]);
    for var in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"] {
        command.env_remove(var);
    }
    let (code, text, err) = command_to_end(command).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("server wss://agents-1.example.com:443/agent directly (no proxy setting)"),
        "{text}"
    );
    // Two URLs, each its own instance: no balancer checks unless asked.
    assert!(text.contains("\nbalancer check off\n"), "{text}");
}

/// A data link for shop-17 dialled by hand (raw: no chunks offered), its 101 read.
async fn link_by_hand(server: SocketAddr) -> TcpStream {
    let request = format!(
        "GET /agent HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: wsbridge-agent-link\r\nX-Wsbridge-Agent: shop-17\r\nAuthorization: Bearer {SECRET}\r\n\r\n"
    );
    raw_upgrade(server, request.as_bytes()).await.0
}

/// The next text message on a control link by hand (pings passed over).
async fn control_message(control: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>) -> String {
    within("a control message", async {
        loop {
            match control.next().await {
                Some(Ok(Message::Text(t))) => return t.to_string(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("on the control link: {other:?}"),
            }
        }
    })
    .await
}

/// A page waits for a data link while the agent's pool is empty (a burst took every link), and
/// meanwhile the agent connects again to this instance (its network changed; a move that landed
/// here again): the page takes the newer connection's first link, well before the connect
/// deadline, instead of waiting for links of the replaced connection until the deadline.
#[tokio::test]
async fn a_page_waiting_for_a_link_takes_the_first_of_the_agents_newer_connection() {
    let (echo, _) = echo_backend().await;
    let mut config = server_config(&["shop-17"], &[("shop-17", "pos")]);
    config.timeouts.connect = Duration::from_secs(3);
    let bridge = TestBridge::start(config).await;
    // By hand: an agent that dialled no link yet.
    let mut first = older_control_link(bridge.addr).await;
    let (mut page, _) = ws_connect(&bridge.url("/pos"), None).await;
    send_bin(&mut page, b"across").await;
    // Its session waits for a link: it asks for one.
    let want = control_message(&mut first).await;
    assert!(want.contains("\"want\""), "{want}");
    let replaced = Instant::now();
    let _second = older_control_link(bridge.addr).await;
    let mut link = link_by_hand(bridge.addr).await;
    let mut open = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(3), link.read_exact(&mut open))
        .await
        .expect("no open on the newer connection's link before the connect deadline")
        .unwrap();
    assert_eq!(&open, b"open pos\n");
    // The agent's part, by hand: the service connected, bytes across both ways.
    let mut app = TcpStream::connect(echo).await.unwrap();
    link.write_all(b"ok\n").await.unwrap();
    let relay = tokio::spawn(async move {
        let _ = tokio::io::copy_bidirectional(&mut link, &mut app).await;
    });
    assert_eq!(recv_data(&mut page).await, b"across");
    let took = replaced.elapsed();
    assert!(took < Duration::from_secs(1), "the page waited {took:?} after the replacement");
    drop(page);
    relay.abort();
}

/// A page waiting for a data link while the agent's connection is lost reads at once that the
/// agent is offline, not at the connect deadline.
#[tokio::test]
async fn a_page_waiting_for_a_link_hears_at_once_that_the_agent_was_lost() {
    let mut config = server_config(&["shop-17"], &[("shop-17", "pos")]);
    config.timeouts.connect = Duration::from_secs(3);
    let bridge = TestBridge::start(config).await;
    let mut control = older_control_link(bridge.addr).await;
    let mut page = raw_ws(bridge.addr, "/pos").await;
    let want = control_message(&mut control).await;
    assert!(want.contains("\"want\""), "{want}");
    // The connection breaks without a close frame.
    let lost = Instant::now();
    drop(control);
    assert_eq!(raw_read_close(&mut page).await, (1014, "agent shop-17 is offline".into()));
    let took = lost.elapsed();
    assert!(took < Duration::from_secs(1), "the page read it {took:?} after the loss");
}

/// Something between the agent and the server (a NAT, a proxy's read timeout) cut the idle data
/// links, more of them than a burst's worth, while the control link stays: a page passes over
/// every closed one and takes the next live link the agent dials, instead of reading that a
/// connected agent is offline.
#[tokio::test]
async fn a_page_passes_over_every_idle_link_found_closed() {
    let (echo, _) = echo_backend().await;
    let mut config = server_config(&["shop-17"], &[("shop-17", "pos")]);
    config.timeouts.connect = Duration::from_secs(3);
    let bridge = TestBridge::start(config).await;
    let mut control = older_control_link(bridge.addr).await;
    let mut cut = Vec::new();
    for _ in 0..12 {
        cut.push(link_by_hand(bridge.addr).await);
    }
    idle_links(&bridge, "shop-17", 12).await;
    drop(cut);
    let (mut page, _) = ws_connect(&bridge.url("/pos"), None).await;
    send_bin(&mut page, b"across").await;
    // Every link it found closed is asked for again (this agent replaces the links it is sent
    // `open` on, and never saw these `open`s).
    let want = control_message(&mut control).await;
    assert!(want.contains("\"want\""), "{want}");
    let mut link = link_by_hand(bridge.addr).await;
    let mut open = [0u8; 9];
    within("open on the live link", async {
        tokio::select! {
            r = link.read_exact(&mut open) => r.map(|_| ()).unwrap(),
            m = page.next() => panic!("the page ended before the live link was opened: {m:?}"),
        }
    })
    .await;
    assert_eq!(&open, b"open pos\n");
    let mut app = TcpStream::connect(echo).await.unwrap();
    link.write_all(b"ok\n").await.unwrap();
    let relay = tokio::spawn(async move {
        let _ = tokio::io::copy_bidirectional(&mut link, &mut app).await;
    });
    assert_eq!(recv_data(&mut page).await, b"across");
    drop(page);
    relay.abort();
}

/// Any host can send wrong secrets: past the brake, its refusals are one warning (when the
/// brake turns on), each of them a line at debug and counted in the metrics, not a warning
/// each.
#[tokio::test]
async fn wrong_secrets_past_the_brake_are_one_warning_not_one_each() {
    use crate::common::binary::Binary;
    let dir = tempfile::tempdir().unwrap();
    let file = shop_17_server_file(dir.path());
    let server = Binary::spawn(&["--config", file.to_str().unwrap(), "--admin", "127.0.0.1:0", "-v"]).await;
    let admin_addr = server.admin_addr().await;
    let wrong = "GET /agent HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: wsbridge-agent-link\r\nX-Wsbridge-Agent: shop-17\r\nAuthorization: Bearer wrong\r\n\r\n";
    let (mut refused, mut slowed) = (0, 0);
    for _ in 0..50 {
        match status_of(&http_raw(server.addr, wrong.as_bytes()).await) {
            401 => refused += 1,
            429 => slowed += 1,
            other => panic!("answered {other}"),
        }
    }
    // 5 tries, and one more per 2 s.
    assert!(slowed >= 40, "{refused} × 401, {slowed} × 429");
    let brake = "too many failed logins from this address";
    let slowed_lines = |lines: &[String]| lines.iter().filter(|l| l.contains(brake) && l.contains("status=429")).count();
    // Each refusal's line comes once its answer is out.
    within("a line for each 429", async {
        while slowed_lines(&server.lines()) < slowed {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let lines = server.lines();
    let warned: Vec<&String> = lines.iter().filter(|l| l.contains("WARN") && l.contains(brake)).collect();
    assert_eq!(warned.len(), 1, "{warned:#?}");
    assert!(
        !warned[0].contains("status=429"),
        "the warning is the brake's, not a refusal's: {}",
        warned[0]
    );
    let debug = lines
        .iter()
        .filter(|l| l.contains("DEBUG") && l.contains(brake) && l.contains("status=429"));
    assert_eq!(debug.count(), slowed, "each 429 at debug");
    let logins = lines.iter().filter(|l| l.contains("WARN") && l.contains("login refused"));
    assert_eq!(logins.count(), refused, "each failed login still warned of");
    let (_, metrics) = admin(admin_addr, "GET", "/metrics", None).await;
    let counted =
        format!(r#"wsbridge_handshakes_refused_total{{status="429",reason="rate_limited",route="agent endpoint /agent"}} {slowed}"#);
    assert!(metrics.lines().any(|l| l == counted), "{counted} in:\n{metrics}");
    // The failed logins themselves are counted as a browser's failed authentication is, with the endpoint as their route.
    let counted =
        format!(r#"wsbridge_handshakes_refused_total{{status="401",reason="unauthenticated",route="agent endpoint /agent"}} {refused}"#);
    assert!(metrics.lines().any(|l| l == counted), "{counted} in:\n{metrics}");
}

/// A server (or whoever sits in its place) that pings the agent's control link and never reads
/// its pongs: the agent keeps a bounded write buffer (the waiting pong replaced by the latest),
/// not one pong per ping. 300,000 pings (37 MB) grew the agent by about 30 MB before.
#[tokio::test]
async fn a_server_that_pings_and_never_reads_costs_the_agent_bounded_memory() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("agent.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let mut command = tokio::process::Command::new(BIN);
    command.args(["agent", "--server", &format!("ws://{server}/agent"), "--name", "shop-17"]);
    command.arg("--secret-file").arg(&secret).args(["--service", "pos=127.0.0.1:9"]);
    command.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null());
    command.stderr(std::process::Stdio::null()).kill_on_drop(true);
    let agent = command.spawn().unwrap();
    let pid = agent.id().unwrap();
    // The upgrade, answered as a server would; then only pings, and nothing read.
    let mut s = a_servers_upgrade(&listener).await;
    let mut ping = vec![0x89, 125];
    ping.extend_from_slice(&[b'p'; 125]);
    let batch = ping.repeat(1000);
    // Fills what the kernel buffers between us first, then settles the agent's baseline.
    for _ in 0..20 {
        within("pings", s.write_all(&batch)).await.unwrap();
    }
    let before = crate::common::binary::rss(pid).expect("the agent's VmRSS");
    for _ in 0..300 {
        // Written: the agent has read all but what the kernel buffers.
        within("pings", s.write_all(&batch)).await.unwrap();
    }
    let after = crate::common::binary::rss(pid).expect("the agent's VmRSS");
    let grown = after.saturating_sub(before);
    assert!(grown < 8 << 20, "the agent grew by {} KiB over 300,000 pings", grown >> 10);
    drop(agent);
}

/// The next control link an agent dials to `listener`, its upgrade answered as a server would
/// (101, the agent's subprotocol); what follows is the test's to say.
async fn a_servers_upgrade(listener: &TcpListener) -> TcpStream {
    let (mut s, _) = within("the agent's control link", listener.accept()).await.unwrap();
    let head = read_head(&mut s).await;
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {name} in {head}"))
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(header("sec-websocket-key").as_bytes());
    let protocol = header("sec-websocket-protocol");
    let protocol = protocol.split(',').next().unwrap().trim().to_owned();
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
    );
    s.write_all(answer.as_bytes()).await.unwrap();
    s
}

/// A server that tells the agent to drain (or to move) as soon as each connection is made, for
/// ever: the first is followed at once (a rolling deploy drains one instance after another),
/// the ones after it are backed off from as connections lost at once are, not followed about
/// every 100 ms without end (50-60 connections in 30 s before).
#[tokio::test]
async fn a_server_that_drains_every_connection_at_once_is_backed_off_from() {
    for message in [r#"{"type":"drain","reason":"again"}"#, r#"{"type":"move","reason":"again"}"#] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut config = agent_config(listener.local_addr().unwrap(), "shop-17", SECRET, &[]);
        config.backoff = Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(2),
            auth_max: Duration::from_secs(2),
            after_drain: Duration::from_millis(100),
            drain_window: Duration::from_secs(60),
        };
        let _agent = client::spawn(config).unwrap();
        let text = |m: &str| {
            let mut f = vec![0x81, m.len() as u8];
            f.extend_from_slice(m.as_bytes());
            f
        };
        let mut dialled = Vec::new();
        let mut links = Vec::new();
        while dialled.len() < 6 {
            let mut s = a_servers_upgrade(&listener).await;
            dialled.push(Instant::now());
            s.write_all(&text(r#"{"type":"want","links":0}"#)).await.unwrap();
            s.write_all(&text(message)).await.unwrap();
            // Kept open: a moving agent's old link serves until it is connected again.
            links.push(s);
        }
        let gaps: Vec<Duration> = dialled.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps[0] < Duration::from_millis(100) + LATE, "the first followed soon: {gaps:?}");
        // The fifth time in a row: at least 0.25 x the backoff's fourth step (1.6 s: the first
        // was followed at once, uncounted), 400 ms, where following at once is ~100 ms. (It
        // said 450 ms, a fifth step's, and failed once in CI at 408 ms, jitter 0.255.)
        assert!(gaps[4] >= Duration::from_millis(390), "{message}: still followed at once: {gaps:?}");
    }
}

/// An instance that answers "draining" (503) for long is tried quickly only for the drain
/// window after the first such answer, then with the growing backoff: each 503 started the window
/// again, and an instance that drains for long (or a hostile one that says so for good) was asked
/// every second or two without end (a hostile-server review).
#[tokio::test]
async fn a_long_drain_is_retried_quickly_only_for_its_window() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = agent_config(listener.local_addr().unwrap(), "shop-17", SECRET, &[]);
    config.backoff = Backoff {
        initial: Duration::from_millis(400),
        max: Duration::from_secs(2),
        auth_max: Duration::from_secs(2),
        after_drain: Duration::from_millis(50),
        drain_window: Duration::from_millis(500),
    };
    let _agent = client::spawn(config).unwrap();
    let started = Instant::now();
    let mut tries = Vec::new();
    let body = wsbridge::agent::link::DRAINING;
    within("tries for 2.5 s", async {
        while started.elapsed() < Duration::from_millis(2500) {
            let Ok(Ok((mut s, _))) = tokio::time::timeout(Duration::from_secs(3), listener.accept()).await else {
                break;
            };
            tries.push(started.elapsed());
            let _ = read_head(&mut s).await;
            let answer = format!(
                "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(answer.as_bytes()).await;
        }
    })
    .await;
    let gaps: Vec<Duration> = tries.windows(2).map(|w| w[1] - w[0]).collect();
    let quick = tries.iter().filter(|t| **t < Duration::from_millis(450)).count();
    assert!(quick >= 4, "quick retries in the window: {tries:?}");
    // Past the window: the backoff (at least a quarter of 400 ms and growing), not 25-50 ms.
    let late: Vec<&Duration> = gaps
        .iter()
        .zip(&tries[1..])
        .filter(|(_, t)| **t > Duration::from_millis(1200))
        .map(|(g, _)| g)
        .collect();
    assert!(
        !late.is_empty() && late.iter().all(|g| **g >= Duration::from_millis(100)),
        "{tries:?}"
    );
    assert!(tries.len() < 30, "{} tries in 2.5 s: {tries:?}", tries.len());
}

/// A server that answers every data link by asking for a service the agent does not list (or
/// one at its cap) gets its `err`, and no new link in its place: the agent dials what the
/// server asks for with `want`, not one link after another without end (about 2,500 a second
/// before, each refused link replaced at once).
#[tokio::test]
async fn a_server_that_asks_every_link_for_nothing_gets_no_endless_links() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (echo, _) = echo_backend().await;
    let _agent = client::spawn(agent_config(
        listener.local_addr().unwrap(),
        "shop-17",
        SECRET,
        &[("pos", tcp(echo))],
    ))
    .unwrap();
    let mut control = a_servers_upgrade(&listener).await;
    control
        .write_all(&[&[0x81, 25][..], br#"{"type":"want","links":1}"#].concat())
        .await
        .unwrap();
    // Each data link: a 101 without chunks (a raw link, which the pool would replace), and at
    // once an `open` for a service the agent does not have.
    let answer_link = |mut s: TcpStream| async move {
        let head = read_head(&mut s).await;
        if !head.ends_with("\r\n\r\n") {
            return None;
        }
        let upgrade = format!("Upgrade: {}", wsbridge::agent::link::LINK_TOKEN);
        assert!(head.contains(&upgrade));
        s.write_all(format!("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n{upgrade}\r\n\r\nopen nope\n").as_bytes())
            .await
            .unwrap();
        let mut rest = String::new();
        let _ = s.read_to_string(&mut rest).await;
        Some(rest)
    };
    let (first, _) = within("the data link asked for", listener.accept()).await.unwrap();
    let refused = within("the agent's answer", answer_link(first)).await;
    assert!(
        refused.is_some_and(|r| r.starts_with("err nope: no such service")),
        "the allow-list's answer"
    );
    // Half a second in which a replacing agent dialled hundreds more.
    let mut more = 0;
    while let Ok(Ok((s, _))) = tokio::time::timeout(Duration::from_millis(500), listener.accept()).await {
        more += 1;
        tokio::spawn(answer_link(s));
        assert!(more < 3, "the agent dials link after link for a server that asks them for nothing");
    }
}

/// A server that asks for links again and again and leaves each one unused (a broken or hostile
/// one: it closes it, asks it for a service the agent does not have, or runs one session on it
/// and closes it) has the agent dial a bounded burst, then about 64 a second: a hostile-server
/// review measured 3,700 dials a second (1,150 TLS handshakes, 1,000 CONNECTs through a proxy),
/// as `want` bounded only how many were open at once; reviews of budgets that gave a place back
/// for a used link, 3,000 and 5,000 a second with an `open` on each link.
#[tokio::test]
async fn a_server_that_leaves_every_link_it_asks_for_unused_is_dialled_slowly() {
    for answer in ["", "open nosuch\n", "open pos\n"] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (echo, _) = echo_backend().await;
        let agent = client::spawn(agent_config(
            listener.local_addr().unwrap(),
            "shop-17",
            SECRET,
            &[("pos", tcp(echo))],
        ))
        .unwrap();
        let mut control = a_servers_upgrade(&listener).await;
        let asking = tokio::spawn(async move {
            let want = [&[0x81, 26][..], br#"{"type":"want","links":64}"#].concat();
            // Bounded: the test ends within WAIT.
            for _ in 0..4000 {
                if control.write_all(&want).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        let serve = |mut s: TcpStream| {
            tokio::spawn(async move {
                let _ = read_head(&mut s).await;
                let head = format!("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n{answer}");
                let _ = s.write_all(head.as_bytes()).await;
                // The agent's answer, if any; then the link is closed.
                let mut buf = [0u8; 256];
                let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
            })
        };
        let mut dialled = 0usize;
        let burst = Instant::now();
        within("the agent's burst of links", async {
            while dialled < 1024 {
                let (s, _) = listener.accept().await.unwrap();
                dialled += 1;
                serve(s);
            }
        })
        .await;
        // The burst is spent: in the next second, the refill's 64, and what refilled while
        // the burst was being accepted (a loaded machine takes longer over it).
        let refilled = burst.elapsed().as_secs_f64() * 64.0;
        let mut more = 0;
        let until = Instant::now() + Duration::from_secs(1);
        while let Ok(Ok((s, _))) = tokio::time::timeout_at(until.into(), listener.accept()).await {
            more += 1;
            serve(s);
        }
        asking.abort();
        drop(agent);
        assert!(
            (more as f64) <= 64.0 + refilled + 32.0,
            "{answer:?}: {more} links dialled in a second after the burst (refilled {refilled:.0})"
        );
    }
}

/// A control link's login with the secret but no hello (a stolen secret used to open
/// connections, not to serve) is no agent yet: it keeps its place under its address's cap until
/// its hello, or the handshake deadline. Found by a hostile-agent review: such links were let go
/// of the cap at their login, and one address held 394 connections with a cap of 40 (every
/// other page got 503 at `max_connections`). Past the cap and its few places for agents' logins,
/// more are refused at once; the real agent, whose hello comes at once, logs in as before.
#[tokio::test]
async fn control_links_that_send_no_hello_stay_under_their_addresss_cap() {
    use wsbridge::server::AGENT_LOGINS_PAST_CAP;
    let (echo, _) = echo_backend().await;
    let mut config = server_config(&["shop-17"], &[("shop-17", "pos")]);
    config.limits.max_connections_per_ip = Some(4);
    let bridge = TestBridge::start(config).await;
    let login = format!(
        "GET /agent HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: wsbridge-agent.v1\r\nX-Wsbridge-Agent: shop-17\r\nAuthorization: Bearer {SECRET}\r\n\r\n"
    );
    let mut silent = Vec::new();
    let mut statuses = Vec::new();
    for _ in 0..24 {
        let mut s = TcpStream::connect(bridge.addr).await.unwrap();
        s.write_all(login.as_bytes()).await.unwrap();
        statuses.push(status_of(&read_head(&mut s).await));
        silent.push(s);
    }
    let let_in = statuses.iter().filter(|s| **s == 101).count();
    assert_eq!(let_in, 4 + AGENT_LOGINS_PAST_CAP, "{statuses:?}");
    assert!(statuses.iter().all(|s| matches!(s, 101 | 429)), "{statuses:?}");
    assert_eq!(bridge.bridge.connections(), let_in);
    // Those places come back with their connections; the agent logs in and serves.
    drop(silent);
    connections_become(&bridge, 0).await;
    let _agent = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))])).await;
    idle_links(&bridge, "shop-17", 4).await;
    let (mut page, _) = ws_connect(&bridge.url("/pos"), None).await;
    send_bin(&mut page, b"through the agent").await;
    assert_eq!(recv_data(&mut page).await, b"through the agent");
}

/// An agent that logs in again and again and never answers a close frame: each login replaces
/// the one before, which waits for the agent's answer to its close up to the close deadline.
/// Such waits are bounded (`MAX_CLOSING_REPLACED` at once per agent name; beyond it a replaced
/// link is closed at once), so the agent's connections do not grow with its logins (an agent's
/// connections are not counted under its address's cap). The replaced links within the bound
/// still get the close frame with its reason, and so does another agent's meanwhile: the bound
/// is each name's (one global bound let one agent take every place, a review found).
#[tokio::test]
async fn an_agent_that_logs_in_again_and_again_holds_a_bounded_number_of_connections() {
    use wsbridge::agent::registry::MAX_CLOSING_REPLACED;
    let mut config = server_config(&["shop-17", "shop-18"], &[("shop-17", "pos")]);
    config.timeouts.close = Duration::from_secs(60);
    let bridge = TestBridge::start(config).await;
    let mut links = Vec::new();
    for _ in 0..MAX_CLOSING_REPLACED + 16 {
        links.push(older_control_link(bridge.addr).await);
    }
    // The latest is the agent's connection; of the ones it replaced, the bound's worth wait.
    connections_become(&bridge, 1 + MAX_CLOSING_REPLACED).await;
    let mut first = links.remove(0);
    assert_eq!(
        close_reason(&mut first).await.as_deref(),
        Some("replaced by a newer connection of this agent")
    );
    // Another agent, replaced meanwhile, still gets the reason (and so backs off).
    let mut older = older_control_link_of(bridge.addr, "shop-18").await;
    let _newer = older_control_link_of(bridge.addr, "shop-18").await;
    assert_eq!(
        close_reason(&mut older).await.as_deref(),
        Some("replaced by a newer connection of this agent")
    );
}

/// The reason of the close frame a control link gets, what comes before it passed over.
async fn close_reason(ws: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>) -> Option<String> {
    within("the close frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| f.reason.to_string()),
                Some(Ok(_)) => {}
                other => panic!("before the close frame: {other:?}"),
            }
        }
    })
    .await
}

/// Someone behind an agent's address (the shop's guest Wi-Fi) sends logins under made-up names
/// with wrong secrets until the address's login budget is spent. The agent connected from
/// there keeps its pool: its data links are charged to its own (address, name) budget only,
/// so its pages do not find it offline while it is connected. A wrong secret for it from
/// there is still slowed, at that budget's rate, but its own links, which carry its connection's
/// link key, are not; a new control link from the address waits for the address's budget
/// (README, Authentication).
#[tokio::test]
async fn failed_logins_from_an_agents_address_do_not_keep_its_links_out() {
    use wsbridge::agent::registry::{ADDRESS_BRAKE_BURST, BRAKE_BURST};
    let (echo, _) = echo_backend().await;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let agent = start_agent(agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(echo))])).await;
    idle_links(&bridge, "shop-17", 4).await;
    let link = |name: &str, secret: &str| {
        format!(
            "GET /agent HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: wsbridge-agent-link\r\nX-Wsbridge-Agent: {name}\r\nAuthorization: Bearer {secret}\r\n\r\n"
        )
    };
    for i in 0..ADDRESS_BRAKE_BURST {
        let answer = http_raw(bridge.addr, link(&format!("made-up-{i}"), "wrong").as_bytes()).await;
        assert_eq!(status_of(&answer), 401, "{answer}");
    }
    let braked = http_raw(bridge.addr, link("made-up-x", "wrong").as_bytes()).await;
    assert_eq!(status_of(&braked), 429, "the address's budget is spent: {braked}");
    // The connected agent's data link (its secret, its name) still logs in.
    let (_link, head) = raw_upgrade(bridge.addr, link("shop-17", SECRET).as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // Pages through it, many, so that its pool is refilled meanwhile.
    for i in 0..8u8 {
        let (mut page, _) = ws_connect(&bridge.url("/pos"), None).await;
        send_bin(&mut page, &[i]).await;
        assert_eq!(recv_data(&mut page).await, [i]);
    }
    assert_eq!(*agent.state.borrow(), State::Connected);
    // Wrong secrets for it are slowed at its own budget's rate.
    for _ in 0..BRAKE_BURST {
        let answer = http_raw(bridge.addr, link("shop-17", "wrong").as_bytes()).await;
        assert_eq!(status_of(&answer), 401, "{answer}");
    }
    let answer = http_raw(bridge.addr, link("shop-17", "wrong").as_bytes()).await;
    assert_eq!(status_of(&answer), 429, "{answer}");
    // ... while the agent's own links, which carry its connection's link key, are still taken:
    // pages held open, three times its pool's worth, each needing a new link, with a wrong try
    // as shop-17 between them (a review: with the pair's budget kept spent so, every page past
    // the 4 idle links timed out).
    let mut held = Vec::new();
    for i in 0..12u8 {
        let wrong = http_raw(bridge.addr, link("shop-17", "wrong").as_bytes()).await;
        assert!(matches!(status_of(&wrong), 401 | 429), "{wrong}");
        let (mut page, _) = ws_connect(&bridge.url("/pos"), None).await;
        send_bin(&mut page, &[i]).await;
        assert_eq!(recv_data(&mut page).await, [i]);
        held.push(page);
    }
}

/// A data link's link key spares it the brake only beside its connection's secret: the key alone
/// (a header a proxy's log may show) opens nothing, and a key of another connection (stale after
/// a reconnect) neither. A review found that the key alone got a 101, and the next page's
/// session.
#[tokio::test]
async fn a_link_key_alone_opens_no_data_link() {
    use wsbridge::agent::registry::BRAKE_BURST;
    let bridge = TestBridge::start(server_config(&["shop-17"], &[("shop-17", "pos")])).await;
    let key = "ab".repeat(32);
    let mut control = {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://{}/agent", bridge.addr).into_client_request().unwrap();
        let h = request.headers_mut();
        h.insert("sec-websocket-protocol", "wsbridge-agent.v1".parse().unwrap());
        h.insert("x-wsbridge-agent", "shop-17".parse().unwrap());
        h.insert("authorization", format!("Bearer {SECRET}").parse().unwrap());
        let (mut control, _) = within("the control link", tokio_tungstenite::connect_async(request)).await.unwrap();
        let hello = format!(r#"{{"type":"hello","name":"shop-17","services":["pos"],"version":3,"link_key":"{key}"}}"#);
        control.send(Message::text(hello)).await.unwrap();
        control
    };
    let want = within("want", control.next()).await.unwrap().unwrap();
    assert!(want.to_text().unwrap().contains("\"want\""), "{want:?}");
    let link = |key: &str, secret: &str| {
        format!(
            "GET /agent HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: wsbridge-agent-link\r\nX-Wsbridge-Agent: shop-17\r\nX-Wsbridge-Link-Key: {key}\r\nAuthorization: Bearer {secret}\r\n\r\n"
        )
    };
    for _ in 0..BRAKE_BURST {
        let r = http_raw(bridge.addr, link(&key, "wrong").as_bytes()).await;
        assert_eq!(status_of(&r), 401, "the key with a wrong secret: {r}");
    }
    let r = http_raw(bridge.addr, link(&key, "wrong").as_bytes()).await;
    assert_eq!(status_of(&r), 429, "{r}");
    let r = http_raw(bridge.addr, link(&"cd".repeat(32), SECRET).as_bytes()).await;
    assert_eq!(status_of(&r), 429, "another key is no key: the brake holds: {r}");
    let (_link, head) = raw_upgrade(bridge.addr, link(&key, SECRET).as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 101"), "the key and the secret, braked or not: {head}");
}

/// The agent's side of a server host that goes dark while the app sends (a screen update
/// stream, say): the app's bytes wait unacknowledged on the agent's data link, which keepalive
/// does not probe, and the kernel would retransmit for some 15 minutes, holding the app's
/// connection (a one-viewer app's only place) all that while. The agent ends the session once
/// the link's host has acknowledged nothing for its keepalive deadline (ping interval + pong
/// timeout) and half of it more, and closes the app's connection. The server and the agent are
/// two hosts on a link of the test's own (network namespaces); needs root, skipped otherwise.
#[cfg(target_os = "linux")]
#[test]
fn the_agent_ends_a_session_whose_server_host_went_dark_while_its_app_sends() {
    let Some(link) = crate::common::netns::Link::new("agent::the_agent_ends_a_session_whose_server_host_went_dark_while_its_app_sends")
    else {
        return;
    };
    let far = link.listen_far();
    link.run_near(|| async {
        let (app, mut accepted) = manual_backend().await;
        let listener = TcpListener::from_std(far).unwrap();
        let bridge = TestBridge::start_on(server_config(&["shop-17"], &[("shop-17", "pos")]), listener).await;
        let mut config = agent_config(bridge.addr, "shop-17", SECRET, &[("pos", tcp(app))]);
        config.ping_interval = Duration::from_millis(500);
        config.pong_timeout = Duration::from_millis(1000);
        let _agent = start_agent(config).await;
        let (mut ws, _) = ws_connect(&bridge.url("/pos"), None).await;
        let mut app_side = within("the app's connection", accepted.recv()).await.unwrap();
        // The app streams to the page; the page reads the first of it.
        app_side.write_all(&[1u8; 1024]).await.unwrap();
        assert!(!recv_data(&mut ws).await.is_empty());
        link.far_goes_dark();
        let dark = std::time::Instant::now();
        let ended = within("the app's connection to be closed", async {
            let chunk = [2u8; 16 * 1024];
            let mut buf = [0u8; 1024];
            let (mut from_agent, mut to_agent) = app_side.split();
            loop {
                tokio::select! {
                    r = to_agent.write_all(&chunk) => if r.is_err() { break },
                    r = from_agent.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { break },
                }
            }
            std::time::Instant::now()
        })
        .await;
        let took = ended - dark;
        // The deadline (0.5 s + 1 s), then half of it seen in flight: not before, not long after.
        assert!(
            took + EARLY >= Duration::from_millis(1500) && took < Duration::from_millis(2250) + LATE,
            "the app's connection closed {took:?} after the server's host went dark"
        );
        drop(ws);
    });
}
