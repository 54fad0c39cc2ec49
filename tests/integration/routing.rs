//! Which backend a request reaches: paths, tokens (inline and websockify token files), Host,
//! unix sockets, IPv6, and the caps that refuse before an upgrade.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsbridge::config::{Config, Matcher, RouteConfig, Target, TokenLookup};

use crate::common::*;

/// A backend that answers every connection with `name` and closes.
async fn named_backend(name: &str) -> std::net::SocketAddr {
    source_backend(name.as_bytes().to_vec()).await
}

/// Retries an upgrade to `path` until it gets 101: for effects that come into force a little later
/// (a token file re-read, a session slot given back), polled every 50 ms within the test bound.
async fn until_upgraded(addr: std::net::SocketAddr, path: &str, what: &str) {
    within(what, async {
        while status_of(&http_head(addr, &upgrade_request(path, "")).await) != 101 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

async fn first_message(url: &str) -> String {
    let (mut ws, _) = ws_connect(url, None).await;
    String::from_utf8(recv_data(&mut ws).await).unwrap()
}

#[tokio::test]
async fn exact_paths_route_to_their_targets() {
    let (a, b) = (named_backend("A").await, named_backend("B").await);
    let mut config = config_with(Matcher::Path("/a".into()), tcp(a));
    let options = config.default_route_options();
    config.routes.push(RouteConfig {
        matcher: Matcher::Path("/b".into()),
        target: tcp(b),
        options,
    });
    let bridge = TestBridge::start(config).await;
    assert_eq!(first_message(&bridge.url("/a")).await, "A");
    assert_eq!(first_message(&bridge.url("/b?x=1")).await, "B");
    assert_eq!(status_of(&http_raw(bridge.addr, &upgrade_request("/a/", "")).await), 404);
}

#[tokio::test]
async fn websockify_token_file_like_novnc() {
    let (a, b) = (named_backend("A").await, named_backend("B").await);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.cfg");
    std::fs::write(
        &file,
        format!(
            "# vnc hosts\nalpha: 127.0.0.1:{}\nbeta:\t127.0.0.1:{}\nbroken line\n",
            a.port(),
            b.port()
        ),
    )
    .unwrap();
    let mut config = Config::new("test");
    add_token_source(&mut config, file.clone(), TokenLookup::Query);
    let bridge = TestBridge::start(config).await;

    // noVNC puts the token in its `path` setting: /websockify?token=…
    assert_eq!(first_message(&bridge.url("/websockify?token=alpha")).await, "A");
    assert_eq!(first_message(&bridge.url("/?token=beta")).await, "B");
    let r = http_raw(bridge.addr, &upgrade_request("/websockify?token=gamma", "")).await;
    assert_eq!(status_of(&r), 404, "{r}");
    assert!(
        r.contains("unknown token") && !r.contains("gamma"),
        "the token is not echoed whole: {r}"
    );
    assert_eq!(status_of(&http_raw(bridge.addr, &upgrade_request("/websockify", "")).await), 404);

    // Editing the file, as websockify users do, takes effect without a restart.
    let c = named_backend("C").await;
    std::fs::write(&file, format!("alpha: 127.0.0.1:{}\ngamma: 127.0.0.1:{}\n", a.port(), c.port())).unwrap();
    until_upgraded(bridge.addr, "/websockify?token=gamma", "the new token picked up").await;
    assert_eq!(first_message(&bridge.url("/websockify?token=gamma")).await, "C");
}

/// A query that names its token twice, or spelled otherwise than `token` (`to%6Ben`, `TOKEN`),
/// is refused with 400 before any lookup: a proxy in front that decides which user may use
/// which token reads such a query otherwise (nginx's `$arg_token` ignores case and does not
/// decode names, and takes `TOKEN=beta` in `?TOKEN=beta&token=alpha`), and the session would
/// reach a target the proxy did not allow. Found by an HTTP attack review: the bridge routed
/// `?to%6Ben=beta&token=alpha` to beta where nginx saw alpha. One `token` still routes, a
/// `token` inside another parameter's value is no token, and the same holds for
/// `access_token`, a bearer credential.
#[tokio::test]
async fn a_query_that_names_its_token_ambiguously_is_refused() {
    let (a, b) = (named_backend("A").await, named_backend("B").await);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.cfg");
    std::fs::write(&file, format!("alpha: 127.0.0.1:{}\nbeta: 127.0.0.1:{}\n", a.port(), b.port())).unwrap();
    let mut config = Config::new("test");
    add_token_source(&mut config, file, TokenLookup::Query);
    let bridge = TestBridge::start(config).await;
    for query in [
        "to%6Ben=beta&token=alpha",
        "TOKEN=beta&token=alpha",
        "token=alpha&token=beta",
        "Token=beta",
        "access_token=x&ACCESS_TOKEN=y&token=alpha",
    ] {
        let r = http_raw(bridge.addr, &upgrade_request(&format!("/websockify?{query}"), "")).await;
        assert_eq!(status_of(&r), 400, "{query}: {r}");
        assert!(r.contains("more than once, or spelled otherwise"), "{query}: {r}");
    }
    assert_eq!(first_message(&bridge.url("/websockify?token=alpha")).await, "A");
    assert_eq!(
        first_message(&bridge.url("/websockify?path=x%26token%3Dalpha&token=beta")).await,
        "B"
    );
}

#[tokio::test]
async fn token_directory_and_inline_tokens() {
    let (a, b) = (named_backend("A").await, named_backend("B").await);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("one"), format!("t1: 127.0.0.1:{}\n", a.port())).unwrap();
    std::fs::write(dir.path().join("two"), format!("t2: 127.0.0.1:{}\n", b.port())).unwrap();
    let mut config = config_with(Matcher::Token("inline-secret".into()), tcp(b));
    add_token_source(&mut config, dir.path().into(), TokenLookup::Query);
    let bridge = TestBridge::start(config).await;
    assert_eq!(first_message(&bridge.url("/?token=t1")).await, "A");
    assert_eq!(first_message(&bridge.url("/?token=t2")).await, "B");
    assert_eq!(first_message(&bridge.url("/any/path?token=inline-secret")).await, "B");
}

#[tokio::test]
async fn host_token() {
    let a = named_backend("A").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hosts");
    std::fs::write(&file, format!("vnc1.example.com: 127.0.0.1:{}\n", a.port())).unwrap();
    let mut config = Config::new("test");
    add_token_source(&mut config, file, TokenLookup::Host);
    let bridge = TestBridge::start(config).await;
    let req = String::from_utf8(upgrade_request("/", ""))
        .unwrap()
        .replace("Host: localhost", "Host: vnc1.example.com:6080");
    // Upgraded, and to the backend the host names.
    let mut s = raw_ws_request(bridge.addr, req.as_bytes()).await;
    assert_eq!(raw_read_frame(&mut s).await, (0x2, b"A".to_vec()));
    // An unknown host is an unknown token, not a missing route (as the answer and log said).
    let r = http_raw(bridge.addr, &upgrade_request("/", "")).await;
    assert_eq!(status_of(&r), 404, "{r}");
    assert!(r.contains("unknown token") && !r.contains("localhost"), "{r}");
}

/// A host name that is a token is a credential like one in the query: names guessed in the Host
/// header are charged to the address (ten, then 429), found ones cost nothing, and where an
/// any-path route takes every other host nothing is charged (the hosts reaching it are not
/// guesses but the bridge's ordinary name).
#[tokio::test]
async fn host_names_guessed_are_braked_like_tokens() {
    let a = named_backend("A").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hosts");
    std::fs::write(&file, format!("vnc1.example.com: 127.0.0.1:{}\n", a.port())).unwrap();
    let with_host = |host: &str| {
        String::from_utf8(upgrade_request("/", ""))
            .unwrap()
            .replace("Host: localhost", &format!("Host: {host}"))
    };
    let ask = |addr, host: String| async move { http_raw(addr, host.as_bytes()).await };

    let mut config = Config::new("test");
    add_token_source(&mut config, file.clone(), TokenLookup::Host);
    let bridge = TestBridge::start(config).await;
    // The right name, many times over: never charged.
    for _ in 0..12 {
        let mut s = raw_ws_request(bridge.addr, with_host("vnc1.example.com").as_bytes()).await;
        assert_eq!(raw_read_frame(&mut s).await, (0x2, b"A".to_vec()));
    }
    for i in 0..10 {
        let r = ask(bridge.addr, with_host(&format!("vnc{}.example.com", i + 2))).await;
        assert_eq!(status_of(&r), 404, "guess {i}: {r}");
    }
    let r = ask(bridge.addr, with_host("vnc99.example.com")).await;
    assert_eq!(status_of(&r), 429, "{r}");
    assert!(r.to_ascii_lowercase().contains("retry-after: "), "{r}");
    assert!(body_of(&r).contains("too many failed attempts"), "{r}");

    // Beside an any-path route, every other host reaches it, uncharged.
    let b = named_backend("B").await;
    let mut config = config_with(Matcher::AnyPath, tcp(b));
    add_token_source(&mut config, file, TokenLookup::Host);
    let bridge = TestBridge::start(config).await;
    for i in 0..15 {
        let mut s = raw_ws_request(bridge.addr, with_host(&format!("bridge{i}.example.com")).as_bytes()).await;
        assert_eq!(raw_read_frame(&mut s).await, (0x2, b"B".to_vec()), "host {i}");
    }
    let mut s = raw_ws_request(bridge.addr, with_host("VNC1.example.com:443").as_bytes()).await;
    assert_eq!(raw_read_frame(&mut s).await, (0x2, b"A".to_vec()));
}

#[tokio::test]
async fn unix_socket_target() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backend.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).await.unwrap();
                s.write_all(&buf[..n]).await.unwrap();
            });
        }
    });
    let bridge = TestBridge::start(config_with(Matcher::AnyPath, Target::Unix(path))).await;
    let (mut ws, _) = ws_connect(&bridge.url("/"), None).await;
    send_bin(&mut ws, b"over a unix socket").await;
    assert_eq!(recv_data(&mut ws).await, b"over a unix socket");
}

#[tokio::test]
async fn ipv6_listener_and_target() {
    // Only a machine without IPv6 loopback skips this; any other failure to bind fails the test.
    let backend_listener = match tokio::net::TcpListener::bind("[::1]:0").await {
        Ok(l) => l,
        // EADDRNOTAVAIL: no ::1 (IPv6 disabled on lo); EAFNOSUPPORT (97 on Linux): no IPv6 at all.
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable || e.raw_os_error() == Some(97) => {
            skip("ipv6_listener_and_target", &format!("no IPv6 loopback here ({e})"));
            return;
        }
        Err(e) => panic!("binding [::1]:0: {e}"),
    };
    let backend = backend_listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend_listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let config = config_with(Matcher::AnyPath, format!("[::1]:{}", backend.port()).parse().unwrap());
    let listener = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
    let bridge = TestBridge::start_on(config, listener).await;
    assert_eq!(bridge.url("/"), format!("ws://[::1]:{}/", bridge.addr.port()));
    let (mut ws, _) = ws_connect(&bridge.url("/"), None).await;
    send_bin(&mut ws, b"v6").await;
    assert_eq!(recv_data(&mut ws).await, b"v6");
    drop(ws);
    assert!(bridge.stop().await.clean);

    // A websockify token file writes an IPv6 target without brackets (it splits at the last
    // colon): the same backend through one.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.cfg");
    std::fs::write(&file, format!("v6: ::1:{}\n", backend.port())).unwrap();
    let mut config = Config::new("test");
    add_token_source(&mut config, file, TokenLookup::Query);
    let bridge = TestBridge::start(config).await;
    let (mut ws, _) = ws_connect(&bridge.url("/websockify?token=v6"), None).await;
    send_bin(&mut ws, b"v6 by token").await;
    assert_eq!(recv_data(&mut ws).await, b"v6 by token");
}

/// Opens one session (proved live by an echo) and checks that a second upgrade gets 503 with a
/// complete answer; returns the first session.
async fn second_session_refused(bridge: &TestBridge) -> Ws {
    let (mut first, _) = ws_connect(&bridge.url("/"), None).await;
    send_bin(&mut first, b"1").await;
    recv_data(&mut first).await;
    let r = http_raw(bridge.addr, &upgrade_request("/", "")).await;
    assert_eq!(status_of(&r), 503, "{r}");
    assert!(r.to_ascii_lowercase().contains("retry-after:"), "{r}");
    body_of(&r);
    first
}

#[tokio::test]
async fn route_session_cap_answers_503() {
    let (backend, _) = echo_backend().await;
    let mut config = any_path_to(backend);
    config.routes[0].options.max_sessions = Some(1);
    let bridge = TestBridge::start(config).await;
    let first = second_session_refused(&bridge).await;
    // The slot comes back when the session ends.
    drop(first);
    until_upgraded(bridge.addr, "/", "the slot released").await;
}

#[tokio::test]
async fn connection_cap_answers_503() {
    let (backend, _) = echo_backend().await;
    let mut config = any_path_to(backend);
    config.limits.max_connections = 1;
    let bridge = TestBridge::start(config).await;
    let _first = second_session_refused(&bridge).await;
}

#[tokio::test]
async fn caps_count_live_sessions_across_a_reload() {
    let (backend, _) = echo_backend().await;
    let mut config = any_path_to(backend);
    config.routes[0].options.max_sessions = Some(1);
    let bridge = TestBridge::start(config).await;
    let mut config = bridge.config.clone();
    let first = second_session_refused(&bridge).await;

    // Same route after a reload: the open session still holds its slot.
    bridge.bridge.reload(&config).unwrap();
    let _first = second_session_refused_behind(&bridge, first).await;

    // A reload can raise a cap, and lower the connection cap below what is open.
    config.routes[0].options.max_sessions = Some(2);
    bridge.bridge.reload(&config).unwrap();
    let (mut second, _) = ws_connect(&bridge.url("/"), None).await;
    send_bin(&mut second, b"2").await;
    assert_eq!(recv_data(&mut second).await, b"2");
    config.limits.max_connections = 1;
    bridge.bridge.reload(&config).unwrap();
    let r = http_raw(bridge.addr, &upgrade_request("/", "")).await;
    assert_eq!(status_of(&r), 503, "{r}");
    assert!(body_of(&r).contains("too many connections"), "{r}");
}

/// A request is served under the configuration in force when its head is complete, not the one
/// its connection was accepted under: a reload while it is on its way (up to the handshake
/// deadline) that moves its route leaves it none, as a new connection's.
#[tokio::test]
async fn a_request_under_way_across_a_reload_is_served_by_the_new_configuration() {
    let (backend, _) = echo_backend().await;
    let bridge = TestBridge::start(config_with(Matcher::Path("/old".into()), tcp(backend))).await;
    let request = upgrade_request("/old", "");
    let first_line = request.iter().position(|&b| b == b'\n').unwrap() + 1;
    let mut s = within("connect", tokio::net::TcpStream::connect(bridge.addr)).await.unwrap();
    s.write_all(&request[..first_line]).await.unwrap();
    connections_become(&bridge, 1).await;

    let mut config = bridge.config.clone();
    config.routes[0].matcher = Matcher::Path("/new".into());
    bridge.bridge.reload(&config).unwrap();
    s.write_all(&request[first_line..]).await.unwrap();
    let head = within("the answer", read_head(&mut s)).await;
    assert_eq!(status_of(&head), 404, "{head}");

    let (mut ws, _) = ws_connect(&bridge.url("/new"), None).await;
    send_bin(&mut ws, b"moved").await;
    assert_eq!(recv_data(&mut ws).await, b"moved");
}

/// A reload that changes the caps per client address (and the size of their tables, with
/// `max_connections`) counts the sessions open across it against the new caps: lowered to what
/// is open, they refuse the next one at once.
#[tokio::test]
async fn caps_per_address_count_live_sessions_across_a_reload_that_changes_them() {
    let (backend, _) = echo_backend().await;
    let mut config = any_path_to(backend);
    config.routes[0].options.policy.per_ip.max_sessions = Some(3);
    config.limits.max_connections_per_ip = Some(5);
    let bridge = TestBridge::start(config).await;
    let mut open = Vec::new();
    for i in 0..2u8 {
        let (mut ws, _) = ws_connect(&bridge.url("/"), None).await;
        send_bin(&mut ws, &[i]).await;
        assert_eq!(recv_data(&mut ws).await, [i]);
        open.push(ws);
    }
    let refused = |why: &'static str| async move {
        let r = http_raw(bridge.addr, &upgrade_request("/", "")).await;
        assert_eq!(status_of(&r), 429, "{r}");
        assert!(body_of(&r).contains(why), "{r}");
    };

    let mut config = bridge.config.clone();
    config.routes[0].options.policy.per_ip.max_sessions = Some(2);
    config.limits.max_connections *= 4;
    bridge.bridge.reload(&config).unwrap();
    refused("too many sessions from your address").await;

    config.routes[0].options.policy.per_ip.max_sessions = Some(10);
    config.limits.max_connections_per_ip = Some(2);
    config.limits.max_connections /= 8;
    bridge.bridge.reload(&config).unwrap();
    refused("too many connections from your address").await;

    for (i, ws) in open.iter_mut().enumerate() {
        send_bin(ws, b"still here").await;
        assert_eq!(recv_data(ws).await, b"still here", "session {i}");
    }
    // Given back to the tables they moved to: a third fits again once one ends.
    drop(open.pop());
    until_upgraded(bridge.addr, "/", "a place back").await;
}

/// `first` (still open) keeps the route's only slot: another upgrade gets 503.
async fn second_session_refused_behind(bridge: &TestBridge, mut first: Ws) -> Ws {
    let r = http_raw(bridge.addr, &upgrade_request("/", "")).await;
    assert_eq!(status_of(&r), 503, "{r}");
    assert!(body_of(&r).contains("too many sessions"), "{r}");
    send_bin(&mut first, b"still here").await;
    assert_eq!(recv_data(&mut first).await, b"still here");
    first
}

#[tokio::test]
async fn a_flood_past_the_connection_cap_gets_its_answers() {
    // 100 refusals at once: the first 64 linger, the rest are answered without waiting; every
    // client must still read a whole 503.
    let (backend, _) = echo_backend().await;
    let mut config = any_path_to(backend);
    config.limits.max_connections = 1;
    let bridge = TestBridge::start(config).await;
    let (mut first, _) = ws_connect(&bridge.url("/"), None).await;
    send_bin(&mut first, b"1").await;
    recv_data(&mut first).await;
    let mut clients = Vec::new();
    for _ in 0..100 {
        let mut s = tokio::net::TcpStream::connect(bridge.addr).await.unwrap();
        s.write_all(&upgrade_request("/", "")).await.unwrap();
        clients.push(s);
    }
    for (i, mut s) in clients.into_iter().enumerate() {
        let mut r = Vec::new();
        within("a refusal", s.read_to_end(&mut r)).await.unwrap();
        let r = String::from_utf8_lossy(&r);
        assert_eq!(status_of(&r), 503, "client {i}: {r}");
        assert!(body_of(&r).contains("too many connections"), "client {i}: {r}");
    }
}

/// A reload that fails (here a token source, after the route, cannot be read) changes nothing:
/// the route's cap per client address it would have lowered stays as it was, as the error says
/// ("the previous configuration is still in force"). The next reload that works puts its own
/// caps in force.
#[tokio::test]
async fn a_failed_reload_leaves_the_caps_per_address_as_they_were() {
    let (backend, _) = echo_backend().await;
    let mut config = any_path_to(backend);
    config.routes[0].options.policy.per_ip.max_sessions = Some(2);
    let bridge = TestBridge::start(config).await;
    let session = |i: u8| {
        let url = bridge.url("/");
        async move {
            let (mut ws, _) = ws_connect(&url, None).await;
            send_bin(&mut ws, &[i]).await;
            assert_eq!(recv_data(&mut ws).await, [i]);
            ws
        }
    };
    let refused = || async {
        let r = http_raw(bridge.addr, &upgrade_request("/", "")).await;
        assert_eq!(status_of(&r), 429, "{r}");
        assert!(body_of(&r).contains("too many sessions from your address"), "{r}");
    };
    let first = session(1).await;

    let dir = tempfile::tempdir().unwrap();
    let mut broken = bridge.config.clone();
    broken.routes[0].options.policy.per_ip.max_sessions = Some(1);
    broken.limits.max_connections *= 4;
    let options = broken.default_route_options();
    broken.token_sources.push(wsbridge::config::TokenSourceConfig {
        jwt: None,
        redis: None,
        api: None,
        path: dir.path().join("missing"),
        lookup: TokenLookup::Query,
        format: wsbridge::config::TokenFormat::Lines,
        options,
    });
    assert!(bridge.bridge.reload(&broken).is_err(), "the token file is missing");
    // Still a cap of 2: one more session, not two.
    let second = session(2).await;
    refused().await;

    // A reload that works after it: its own cap, not the failed one's.
    let mut config = bridge.config.clone();
    config.routes[0].options.policy.per_ip.max_sessions = Some(3);
    bridge.bridge.reload(&config).unwrap();
    let third = session(3).await;
    refused().await;
    drop((first, second, third));
}

/// A source in websockify's TokenFileName format: a directory whose file names are the tokens.
fn add_file_names_source(config: &mut Config, dir: &std::path::Path) {
    add_token_source(config, dir.into(), TokenLookup::Query);
    config.token_sources.last_mut().unwrap().format = wsbridge::config::TokenFormat::FileNames;
}

#[tokio::test]
async fn token_file_names_route_by_name_and_never_leave_the_directory() {
    let (a, b) = (named_backend("A").await, named_backend("B").await);
    let outside = named_backend("OUTSIDE").await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("tokens");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("desk1"), format!("127.0.0.1:{}\n", a.port())).unwrap();
    std::fs::write(dir.join("desk2"), format!("  127.0.0.1:{}  \n", b.port())).unwrap();
    // Files a token must not reach: beside the directory, below it, hidden, a backup copy.
    for f in [root.path().join("x"), dir.join("sub").join("x"), dir.join(".x"), dir.join("x.bak")] {
        std::fs::write(f, format!("127.0.0.1:{}\n", outside.port())).unwrap();
    }
    let mut config = Config::new("test");
    add_file_names_source(&mut config, &dir);
    let bridge = TestBridge::start(config).await;

    assert_eq!(first_message(&bridge.url("/websockify?token=desk1")).await, "A");
    assert_eq!(first_message(&bridge.url("/?token=desk2")).await, "B");
    // Each unknown token is charged to the address as a guess (ten at once), so nine of them.
    for token in [
        "desk3",
        "../x",
        "..%2Fx",
        "sub/x",
        "..",
        ".x",
        "x.bak",
        "%2Fdesk1",
        "tokens%2Fdesk1",
    ] {
        let r = http_raw(bridge.addr, &upgrade_request(&format!("/websockify?token={token}"), "")).await;
        assert_eq!(status_of(&r), 404, "{token}: {r}");
    }
}

#[tokio::test]
async fn a_token_file_name_added_while_running_is_picked_up() {
    let a = named_backend("A").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("desk1"), format!("127.0.0.1:{}\n", a.port())).unwrap();
    let mut config = Config::new("test");
    add_file_names_source(&mut config, dir.path());
    let bridge = TestBridge::start(config).await;
    assert_eq!(first_message(&bridge.url("/?token=desk1")).await, "A");

    // A file added while running is a token within a second, as an edited token file is. Polled
    // every 150 ms, not 50: every miss is charged to the address as a guess (ten at once), and
    // the re-read starts once the snapshot is half a second old.
    let c = named_backend("C").await;
    std::fs::write(dir.path().join("desk3"), format!("127.0.0.1:{}", c.port())).unwrap();
    within("the new file picked up", async {
        loop {
            let r = http_head(bridge.addr, &upgrade_request("/websockify?token=desk3", "")).await;
            match status_of(&r) {
                101 => break,
                404 => tokio::time::sleep(Duration::from_millis(150)).await,
                _ => panic!("{r}"),
            }
        }
    })
    .await;
    assert_eq!(first_message(&bridge.url("/websockify?token=desk3")).await, "C");
}

#[tokio::test]
async fn token_file_names_from_toml_and_by_host() {
    let a = named_backend("A").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Desk1.Example.com"), format!("127.0.0.1:{}\n", a.port())).unwrap();
    let text = format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n\n[[tokens]]\nsource = {:?}\nformat = \"file-names\"\n\n\
         [[tokens]]\nsource = {:?}\nformat = \"file-names\"\nlookup = \"host\"\n",
        dir.path().display().to_string(),
        dir.path().display().to_string()
    );
    let config = Config::from_toml(&text, std::path::Path::new("test.toml")).unwrap();
    let bridge = TestBridge::start(config).await;
    assert_eq!(first_message(&bridge.url("/?token=Desk1.Example.com")).await, "A");
    let req = String::from_utf8(upgrade_request("/", ""))
        .unwrap()
        .replace("Host: localhost", "Host: desk1.example.COM:6080");
    assert_eq!(status_of(&http_head(bridge.addr, req.as_bytes()).await), 101);
    let req = String::from_utf8(upgrade_request("/", ""))
        .unwrap()
        .replace("Host: localhost", "Host: desk2.example.com");
    assert_eq!(status_of(&http_head(bridge.addr, req.as_bytes()).await), 404);
}

/// A unix-socket backend at `path` that answers every connection with `name` and closes.
fn named_unix_backend(path: &std::path::Path, name: &'static str) {
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(name.as_bytes()).await;
        }
    });
}

/// A source in websockify's UnixDomainSocketDirectory format: a directory of sockets named by
/// their tokens.
fn add_socket_directory(config: &mut Config, dir: &std::path::Path) {
    add_token_source(config, dir.into(), TokenLookup::Query);
    config.token_sources.last_mut().unwrap().format = wsbridge::config::TokenFormat::UnixSockets;
}

#[tokio::test]
async fn a_socket_directory_routes_tokens_to_their_sockets_and_nothing_else() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("socks");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    named_unix_backend(&dir.join("desk1"), "A");
    // What a token must not reach: a regular file, a socket beside the directory, one below it,
    // a hidden one.
    std::fs::write(dir.join("file"), "not a socket").unwrap();
    named_unix_backend(&root.path().join("x"), "OUTSIDE");
    named_unix_backend(&dir.join("sub").join("x"), "BELOW");
    named_unix_backend(&dir.join(".hidden"), "HIDDEN");
    let mut config = Config::new("test");
    add_socket_directory(&mut config, &dir);
    let bridge = TestBridge::start(config).await;

    assert_eq!(first_message(&bridge.url("/websockify?token=desk1")).await, "A");
    // Each unknown token is charged to the address as a guess (ten at once): eight misses here.
    for token in ["file", "missing", "../x", "..%2Fx", "sub/x", "sub%2Fx", ".hidden"] {
        let r = http_raw(bridge.addr, &upgrade_request(&format!("/websockify?token={token}"), "")).await;
        assert_eq!(status_of(&r), 404, "{token}: {r}");
    }

    // Looked up on every connection: a socket that appears is reachable by the very next
    // handshake, and one that goes is unknown at once (no re-read to wait for).
    named_unix_backend(&dir.join("desk2"), "B");
    assert_eq!(first_message(&bridge.url("/?token=desk2")).await, "B");
    std::fs::remove_file(dir.join("desk2")).unwrap();
    let r = http_raw(bridge.addr, &upgrade_request("/?token=desk2", "")).await;
    assert_eq!(status_of(&r), 404, "{r}");
}

/// A socket directory that is gone (moved, unmounted) or cannot be looked in is a source that is
/// unavailable (503, Retry-After), not a directory without the page's socket: its tokens are not
/// answered "unknown" (a review: every token was a silent 404, charged to the page's address as
/// a guess). Back where it was, it serves again at once.
#[tokio::test]
async fn a_socket_directory_that_is_gone_is_unavailable_not_empty() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("socks");
    std::fs::create_dir_all(&dir).unwrap();
    named_unix_backend(&dir.join("desk1"), "A");
    let mut config = Config::new("test");
    add_socket_directory(&mut config, &dir);
    let bridge = TestBridge::start(config).await;
    assert_eq!(first_message(&bridge.url("/websockify?token=desk1")).await, "A");
    // A name longer than a file name can be is unknown, not the directory's trouble (a review:
    // any client made a healthy directory answer 503 with ENAMETOOLONG).
    let long = "x".repeat(300);
    let r = http_raw(bridge.addr, &upgrade_request(&format!("/websockify?token={long}"), "")).await;
    assert_eq!(status_of(&r), 404, "{r}");

    let away = root.path().join("socks.away");
    std::fs::rename(&dir, &away).unwrap();
    for token in ["desk1", "desk2"] {
        let r = http_raw(bridge.addr, &upgrade_request(&format!("/websockify?token={token}"), "")).await;
        assert_eq!(status_of(&r), 503, "{token}: {r}");
        assert!(r.contains("token source unavailable"), "{r}");
    }
    std::fs::rename(&away, &dir).unwrap();
    assert_eq!(first_message(&bridge.url("/websockify?token=desk1")).await, "A");
    let r = http_raw(bridge.addr, &upgrade_request("/websockify?token=desk2", "")).await;
    assert_eq!(status_of(&r), 404, "{r}");
}
