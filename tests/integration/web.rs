//! Static files under `--web`: no way out of the root (`..` in any spelling, symlinks leading
//! out), no hidden files, listing links that are URL-encoded; and the options that allow
//! symlinks and hidden files for those who want them.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use wsbridge::config::{Config, ListenerConfig};

use crate::common::*;

/// A web root `base/www` with plain files, hidden ones and symlinks in and out, and a secret
/// beside it in `base/outside`.
fn web_tree(base: &Path) -> PathBuf {
    let www = base.join("www");
    let outside = base.join("outside");
    std::fs::create_dir_all(www.join("sub")).unwrap();
    std::fs::create_dir_all(www.join(".git")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), "SECRET_OUTSIDE").unwrap();
    std::fs::write(www.join("index.html"), "<h1>hi</h1>").unwrap();
    std::fs::write(www.join("sub/app.js"), "let x = 1;").unwrap();
    std::fs::write(www.join("sub/.hidden.js"), "SECRET_HIDDEN").unwrap();
    std::fs::write(www.join(".env"), "SECRET_ENV").unwrap();
    std::fs::write(www.join(".git/config"), "SECRET_GIT").unwrap();
    symlink("sub/app.js", www.join("inside-link.js")).unwrap();
    symlink("sub", www.join("inside-dir")).unwrap();
    symlink("../outside/secret.txt", www.join("outside-link.txt")).unwrap();
    symlink(&outside, www.join("outside-dir")).unwrap();
    symlink(".env", www.join("env-link.txt")).unwrap();
    www
}

async fn web_bridge(www: &Path, listing: bool, follow_symlinks: bool, dotfiles: bool) -> TestBridge {
    let mut config = web_config(www).await;
    let web = &mut config.listeners[0];
    (web.web_listing, web.web_follow_symlinks, web.web_dotfiles) = (listing, follow_symlinks, dotfiles);
    TestBridge::start(config).await
}

/// A bridge's configuration whose listener serves `www` and whose route takes any path to an echo
/// backend (`wsbridge --web DIR PORT TARGET`), to adjust before it starts.
async fn web_config(www: &Path) -> Config {
    let (backend, _) = echo_backend().await;
    let mut config = any_path_to(backend);
    config.listeners.push(ListenerConfig {
        web: Some(www.to_path_buf()),
        ..ListenerConfig::new("127.0.0.1:0".parse().unwrap())
    });
    config
}

async fn get(bridge: &TestBridge, path: &str) -> String {
    http_raw(bridge.addr, format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await
}

#[tokio::test]
async fn nothing_outside_the_root_or_hidden_is_served() {
    let base = tempfile::tempdir().unwrap();
    let www = web_tree(base.path());
    let bridge = web_bridge(&www, false, false, false).await;
    for path in [
        "/../outside/secret.txt",
        "/sub/../../outside/secret.txt",
        "/%2e%2e/outside/secret.txt",
        "/%2E%2E/outside/secret.txt",
        "/..%2foutside%2fsecret.txt",
        "/%2e%2e%2foutside%2fsecret.txt",
        "/sub%2f..%2f..%2foutside/secret.txt",
        "/outside-link.txt",
        "/outside-dir/secret.txt",
        "/outside-dir/",
        "/.env",
        "/%2eenv",
        "/.git/config",
        "/.git/",
        "/sub/.hidden.js",
        "/env-link.txt",
    ] {
        let r = get(&bridge, path).await;
        assert_eq!(status_of(&r), 404, "{path}: {r}");
        assert!(!r.contains("SECRET"), "{path} served a secret: {r}");
    }
    // `..` is refused, not normalised, even where it would stay inside the root.
    assert_eq!(status_of(&get(&bridge, "/sub/../index.html").await), 404);
    // Plain files, and symlinks that stay inside the root, are served.
    for (path, body) in [
        ("/", "<h1>hi</h1>"),
        ("/sub/app.js", "let x = 1;"),
        ("/inside-link.js", "let x = 1;"),
        ("/inside-dir/app.js", "let x = 1;"),
    ] {
        let r = get(&bridge, path).await;
        assert_eq!(status_of(&r), 200, "{path}: {r}");
        assert!(r.ends_with(body), "{path}: {r}");
    }
}

#[tokio::test]
async fn listings_leave_out_what_is_not_served_and_encode_their_links() {
    let base = tempfile::tempdir().unwrap();
    let www = web_tree(base.path());
    std::fs::remove_file(www.join("index.html")).unwrap();
    std::fs::write(www.join("sub/a b#c?.txt"), "x").unwrap();
    let bridge = web_bridge(&www, true, false, false).await;
    let r = get(&bridge, "/").await;
    assert_eq!(status_of(&r), 200, "{r}");
    for hidden in [".env", ".git", "outside-link", "outside-dir", "env-link"] {
        assert!(!r.contains(hidden), "the listing shows {hidden}: {r}");
    }
    assert!(r.contains(r#"<a href="./inside-dir/">inside-dir/</a>"#), "{r}");
    let r = get(&bridge, "/sub/").await;
    assert!(r.contains(r#"<a href="./a%20b%23c%3F.txt">a b#c?.txt</a>"#), "{r}");
    assert!(!r.contains(".hidden"), "{r}");
    // The link works.
    assert_eq!(status_of(&get(&bridge, "/sub/a%20b%23c%3F.txt").await), 200);
    // Directories that are not served are not listed either.
    for path in ["/outside-dir/", "/.git/", "/%2e%2e/"] {
        let r = get(&bridge, path).await;
        assert_eq!(status_of(&r), 404, "{path}: {r}");
        assert!(!r.contains("secret"), "{path}: {r}");
    }
}

#[tokio::test]
async fn symlinks_and_hidden_files_are_served_when_the_listener_allows_them() {
    let base = tempfile::tempdir().unwrap();
    let www = web_tree(base.path());
    let bridge = web_bridge(&www, false, true, true).await;
    for (path, body) in [
        ("/outside-link.txt", "SECRET_OUTSIDE"),
        ("/outside-dir/secret.txt", "SECRET_OUTSIDE"),
        ("/.env", "SECRET_ENV"),
        ("/env-link.txt", "SECRET_ENV"),
    ] {
        let r = get(&bridge, path).await;
        assert_eq!(status_of(&r), 200, "{path}: {r}");
        assert!(r.ends_with(body), "{path}: {r}");
    }
    // Still no `..`.
    assert_eq!(status_of(&get(&bridge, "/%2e%2e/outside/secret.txt").await), 404);
}

#[test]
fn the_options_have_toml_names() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("www")).unwrap();
    let file = dir.path().join("w.toml");
    std::fs::write(
        &file,
        "[[listen]]\naddr = \"127.0.0.1:6080\"\nweb = \"www\"\nweb_follow_symlinks = true\nweb_dotfiles = true\n\n[[route]]\npath = \"*\"\ntarget = \"localhost:5900\"\n",
    )
    .unwrap();
    let config = Config::from_file(&file).unwrap();
    assert!(config.listeners[0].web_follow_symlinks && config.listeners[0].web_dotfiles);
}

/// A FIFO or a device in the web root (or, with symlinks followed, reached through one) is not
/// found: opening a FIFO with no writer waits forever and /dev/zero never ends. The answer comes
/// at once, and a regular file is still served after them.
#[tokio::test]
async fn fifos_and_devices_are_not_served() {
    let base = tempfile::tempdir().unwrap();
    let www = web_tree(base.path());
    let made = std::process::Command::new("mkfifo").arg(www.join("pipe")).status().unwrap();
    assert!(made.success(), "mkfifo failed");
    symlink("/dev/zero", www.join("zero")).unwrap();
    for follow_symlinks in [false, true] {
        let bridge = web_bridge(&www, false, follow_symlinks, false).await;
        for path in ["/pipe", "/zero"] {
            let answer = get(&bridge, path).await;
            assert!(
                answer.starts_with("HTTP/1.1 404"),
                "{path} (follow_symlinks {follow_symlinks}): {answer:.200}"
            );
        }
        assert!(get(&bridge, "/sub/app.js").await.ends_with("let x = 1;"));
    }
}

/// Reads from `s` (after what `got` holds already) until the whole answer to `request` is there;
/// returns it and leaves what follows in `got`.
async fn next_response(s: &mut tokio::net::TcpStream, request: &[u8], got: &mut Vec<u8>) -> String {
    use tokio::io::AsyncReadExt;
    within("an answer", async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if let Some(n) = response_len(request, got) {
                let rest = got.split_off(n);
                return String::from_utf8(std::mem::replace(got, rest)).unwrap();
            }
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the connection closed in the middle of an answer: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
}

/// A new connection to `addr` that sent `request` and read its answer (the connection stays
/// open, kept alive or not).
async fn asked(addr: std::net::SocketAddr, request: &[u8]) -> (tokio::net::TcpStream, String) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let answer = next_response(&mut s, request, &mut Vec::new()).await;
    (s, answer)
}

/// A connection whose static file was answered stays open for the next request (keep-alive), as
/// websockify's does: a noVNC page's 60 files do not each cost a new connection (and over wss://
/// a TLS handshake). Requests sent without waiting (pipelined) are answered in order; `Connection:
/// close` is honoured; an HTTP/1.0 request, or one answered with an error, closes.
#[tokio::test]
async fn static_files_keep_the_connection_for_the_next_request() {
    use tokio::io::AsyncWriteExt;
    let base = tempfile::tempdir().unwrap();
    let www = web_tree(base.path());
    let bridge = web_bridge(&www, true, false, false).await;
    let mut s = tokio::net::TcpStream::connect(bridge.addr).await.unwrap();
    let mut got = Vec::new();
    let index: &[u8] = b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n";
    let app: &[u8] = b"GET /sub/app.js HTTP/1.1\r\nHost: x\r\n\r\n";
    let head: &[u8] = b"HEAD /sub/app.js HTTP/1.1\r\nHost: x\r\n\r\n";
    let missing: &[u8] = b"GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n";
    for (request, status, body) in [(index, 200, "<h1>hi</h1>"), (app, 200, "let x = 1;"), (missing, 404, "not found")] {
        s.write_all(request).await.unwrap();
        let r = next_response(&mut s, request, &mut got).await;
        assert_eq!(status_of(&r), status, "{r}");
        assert!(r.ends_with(body) || r.ends_with(&format!("{body}\n")), "{r}");
        assert!(!r.to_ascii_lowercase().contains("connection: close"), "{r}");
    }
    // Three at once, the middle one a HEAD (no body: the next answer follows its head).
    s.write_all(&[index, head, app].concat()).await.unwrap();
    for (request, body) in [(index, "<h1>hi</h1>"), (head, ""), (app, "let x = 1;")] {
        let r = next_response(&mut s, request, &mut got).await;
        assert_eq!(status_of(&r), 200, "{r}");
        assert!(r.ends_with(&format!("\r\n\r\n{body}")), "{r}");
    }
    // The client says it is done: answered with `Connection: close`, then the end.
    let last: &[u8] = b"GET /sub/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    s.write_all(last).await.unwrap();
    let r = next_response(&mut s, last, &mut got).await;
    assert!(r.contains("Connection: close") && r.contains("app.js"), "{r}");
    closed_by_peer(&mut s).await;

    for (request, status) in [
        (&b"GET /index.html HTTP/1.0\r\n\r\n"[..], 200),
        (&b"POST /index.html HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"[..], 405),
    ] {
        let (mut s, r) = asked(bridge.addr, request).await;
        assert_eq!(status_of(&r), status, "{r}");
        assert!(r.contains("Connection: close"), "{r}");
        closed_by_peer(&mut s).await;
    }
}

/// A kept-alive connection may carry a WebSocket upgrade after its static files (the page and its
/// session on one connection); one left idle is closed at the handshake deadline after its last
/// answer, and at once when the bridge shuts down.
#[tokio::test]
async fn a_kept_alive_connection_upgrades_or_is_closed_when_idle() {
    use tokio::io::AsyncWriteExt;
    let base = tempfile::tempdir().unwrap();
    let www = web_tree(base.path());
    let mut config = web_config(&www).await;
    config.timeouts.handshake = std::time::Duration::from_millis(600);
    let bridge = TestBridge::start(config).await;
    let index: &[u8] = b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n";

    let (s, r) = asked(bridge.addr, index).await;
    assert_eq!(status_of(&r), 200);
    let (mut s, response) = raw_upgrade_on(s, &upgrade_request("/", "")).await;
    assert_eq!(status_of(&response), 101, "{response}");
    s.write_all(&frame(0x82, b"same connection", true)).await.unwrap();
    assert_eq!(raw_read_frame(&mut s).await, (2, b"same connection".to_vec()));

    let (mut idle, r) = asked(bridge.addr, index).await;
    assert_eq!(status_of(&r), 200);
    let answered = std::time::Instant::now();
    let closed = closed_by_peer(&mut idle).await;
    assert_window(
        "the idle connection's close",
        closed - answered,
        std::time::Duration::from_millis(600),
    );

    let (mut idle, r) = asked(bridge.addr, index).await;
    assert_eq!(status_of(&r), 200);
    drop(s);
    let stopping = std::time::Instant::now();
    bridge.stop().await;
    let closed = closed_by_peer(&mut idle).await;
    assert!(closed - stopping < std::time::Duration::from_millis(500), "{:?}", closed - stopping);
}

/// A kept-alive connection's next request is served under the configuration in force when it
/// comes: a route removed by a reload meanwhile is not reached through a connection opened
/// before it.
#[tokio::test]
async fn a_kept_alive_connection_follows_a_reload() {
    use tokio::io::AsyncWriteExt;
    let base = tempfile::tempdir().unwrap();
    let www = web_tree(base.path());
    let config = web_config(&www).await;
    let bridge = TestBridge::start(config).await;
    let index: &[u8] = b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n";
    let (mut s, r) = asked(bridge.addr, index).await;
    assert_eq!(status_of(&r), 200);
    let mut got = Vec::new();

    let mut reloaded = bridge.config.clone();
    reloaded.routes[0].matcher = wsbridge::config::Matcher::Path("/other".into());
    bridge.bridge.reload(&reloaded).unwrap();
    let upgrade = upgrade_request("/", "");
    s.write_all(&upgrade).await.unwrap();
    let r = next_response(&mut s, &upgrade, &mut got).await;
    assert_eq!(status_of(&r), 404, "{r}");
}

/// Idle kept-alive connections never take the places a page's WebSocket needs: past half its
/// address's `max_connections_per_ip` a connection's static answer says `Connection: close`.
/// Browsers open the WebSocket on a connection of its own, after loading the page over several.
#[tokio::test]
async fn kept_alive_connections_leave_their_address_room_for_the_websocket() {
    use tokio::io::AsyncWriteExt;
    let base = tempfile::tempdir().unwrap();
    let www = web_tree(base.path());
    let mut config = web_config(&www).await;
    config.limits.max_connections_per_ip = Some(6);
    let bridge = TestBridge::start(config).await;
    let index: &[u8] = b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n";
    // A browser's six connections for the page's files, opened at once.
    let mut page = Vec::new();
    for _ in 0..6 {
        page.push(tokio::net::TcpStream::connect(bridge.addr).await.unwrap());
    }
    let mut kept = Vec::new();
    for mut s in page {
        s.write_all(index).await.unwrap();
        let r = next_response(&mut s, index, &mut Vec::new()).await;
        assert_eq!(status_of(&r), 200, "{r}");
        match r.contains("Connection: close") {
            true => closed_by_peer(&mut s).await,
            false => {
                kept.push(s);
                continue;
            }
        };
    }
    assert!(kept.len() < 3, "{} idle connections kept of a cap of 6", kept.len());
    let (mut ws, _) = ws_connect(&bridge.url("/"), None).await;
    send_bin(&mut ws, b"room").await;
    assert_eq!(recv_data(&mut ws).await, b"room");
}

/// A request that says twice how long its body is (one of them 0) is not kept alive: its
/// body could be read as a request of its own.
#[tokio::test]
async fn a_request_with_two_lengths_closes_its_connection() {
    use tokio::io::AsyncWriteExt;
    let base = tempfile::tempdir().unwrap();
    let www = web_tree(base.path());
    let bridge = web_bridge(&www, true, false, false).await;
    let mut s = tokio::net::TcpStream::connect(bridge.addr).await.unwrap();
    let body = b"GET /sub/app.js HTTP/1.1\r\nHost: x\r\n\r\n";
    let request = format!(
        "GET /index.html HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(&[request.as_bytes(), body].concat()).await.unwrap();
    let mut got = Vec::new();
    let r = next_response(&mut s, request.as_bytes(), &mut got).await;
    assert!(r.contains("Connection: close"), "{r}");
    closed_by_peer(&mut s).await;
}

/// A draining instance keeps no connection for another request: the next goes where the
/// balancer sends it.
#[tokio::test]
async fn a_draining_bridge_keeps_no_connection_alive() {
    use tokio::io::AsyncWriteExt;
    let base = tempfile::tempdir().unwrap();
    let www = web_tree(base.path());
    let mut config = web_config(&www).await;
    config.timeouts.drain_delay = Some(std::time::Duration::from_secs(30));
    let bridge = TestBridge::start(config).await;
    let index: &[u8] = b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut s = tokio::net::TcpStream::connect(bridge.addr).await.unwrap();
    s.write_all(index).await.unwrap();
    let r = next_response(&mut s, index, &mut Vec::new()).await;
    assert!(!r.contains("Connection: close"), "not draining yet: {r}");
    let b = bridge.bridge.clone();
    let draining = tokio::spawn(async move { b.drain(std::future::pending()).await });
    within("the drain to start", async {
        while bridge.bridge.is_ready() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    s.write_all(index).await.unwrap();
    let r = next_response(&mut s, index, &mut Vec::new()).await;
    assert!(r.contains("Connection: close"), "{r}");
    closed_by_peer(&mut s).await;
    draining.abort();
}
