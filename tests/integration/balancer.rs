//! Several wsbridge instances behind the real HAProxy, set up as `examples/haproxy.cfg` and
//! `config/behind-haproxy.toml` say (addresses, ports and check intervals substituted): sessions
//! spread over both; SIGTERM to one turns its `/readyz` to 503, HAProxy takes it out while it
//! still accepts (its drain delay), new sessions go to the other only, its own sessions get
//! their data and then 1001, and the other instance's sessions carry on. The tokens both
//! instances route by come from one shared redis-server, written once and deleted once, as a
//! web application would. Agent mode with one host name and a standby: a draining instance's
//! agent lands on the standby as soon as HAProxy's check moved new connections there. Agent mode
//! with every instance listed in the agent: the real agent reaches each instance by a host name
//! of its own that the example routes by the TLS SNI, and pages on either instance find it.
//! Also: `haproxy -c` on the HAProxy example and `nginx -t` on the nginx one.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::common::binary::Binary;
use crate::common::haproxy::HaProxy;
use crate::common::pki;
use crate::common::redis::Redis;
use crate::common::*;

/// How long a SIGTERMed instance keeps accepting after `/readyz` turned 503: long enough for
/// HAProxy's checks here (every 100 ms, down after one failure) to take it out, with room for a
/// loaded machine, and short enough for a quick test.
const DRAIN_DELAY: Duration = Duration::from_secs(3);

/// Where both instances look tokens up: one real redis-server, written once by the test as a
/// web application would (`SET`, `DEL`), read by both through a `[[tokens]]` table with
/// `[tokens.redis]` whose allow-list admits only loopback targets.
struct Tokens {
    redis: Redis,
    client: ::redis::aio::MultiplexedConnection,
}

impl Tokens {
    /// `None` when there is no redis-server here (the caller skips).
    async fn redis() -> Option<Tokens> {
        let redis = Redis::start(&[]).await?;
        let client = redis.client(0, None).await;
        Some(Tokens { redis, client })
    }

    /// The instances' configuration for this store.
    fn section(&self) -> String {
        format!(
            "[[tokens]]\nlookup = \"query\"\nallow_targets = [\"127.0.0.0/8:1-65535\"]\n\
             [tokens.redis]\nurl = \"{}\"\nkey_prefix = \"vnc:\"\n",
            self.redis.url(0)
        )
    }

    /// Makes `token` route to `target` on every instance.
    async fn put(&self, token: &str, target: SocketAddr) {
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(format!("vnc:{token}")).arg(target.to_string());
        within("SET", cmd.query_async::<()>(&mut self.client.clone())).await.expect("SET");
    }

    /// Removes `token` from the store: new sessions with it are refused everywhere.
    async fn delete(&self, token: &str) {
        let mut cmd = ::redis::cmd("DEL");
        cmd.arg(format!("vnc:{token}"));
        within("DEL", cmd.query_async::<()>(&mut self.client.clone())).await.expect("DEL");
    }
}

/// One wsbridge instance as config/behind-haproxy.toml sets one up.
struct Instance {
    bin: Binary,
    admin: SocketAddr,
}

impl Instance {
    /// Starts an instance whose listener takes PROXY headers from 127.0.0.1 only (HAProxy, and
    /// the test speaking for it), with its admin listener, the drain delay and `tokens`.
    async fn start(dir: &Path, name: &str, tokens: &Tokens) -> Instance {
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(
            &file,
            format!(
                "[[listen]]\naddr = \"127.0.0.1:0\"\nproxy_protocol = true\ntrusted_proxies = [\"127.0.0.1/32\"]\n\n{}\n\
                 [timeouts]\ndrain_delay = \"{}ms\"\n\n[admin]\naddr = \"127.0.0.1:0\"\n",
                tokens.section(),
                DRAIN_DELAY.as_millis()
            ),
        )
        .unwrap();
        Instance::run(&file).await
    }

    /// Runs the configuration `file` and waits until the instance is ready.
    async fn run(file: &Path) -> Instance {
        let bin = Binary::spawn(&["--config", file.to_str().unwrap()]).await;
        let admin = bin.admin_addr().await;
        within("the instance's readiness", async {
            while admin_get(admin, "/readyz").await.0 != 200 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        Instance { bin, admin }
    }

    /// The ids of its live sessions, by the client address each came from.
    async fn sessions(&self) -> Vec<(u64, String)> {
        sessions(self.admin, None)
            .await
            .iter()
            .map(|s| (s["id"].as_u64().unwrap(), s["client"].as_str().unwrap().to_owned()))
            .collect()
    }

    /// The status of an upgrade for `path` sent straight to the instance, as HAProxy sends it
    /// (PROXY v2 header first): which instance answers is the test's choice, not the balancer's.
    /// Each comes from a client address of its own (198.18.0.0/15, in the header): refusals for
    /// an unknown token count against their address (the brake on guessing), and a test that
    /// asks until a token is known must not be braked for asking.
    async fn upgrade_status(&self, path: &str) -> u16 {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % (1 << 17);
        let client = SocketAddr::from(([198, 18 + (n >> 16) as u8, (n >> 8) as u8, n as u8], 40000));
        let mut s = within("connect", TcpStream::connect(self.bin.addr)).await.unwrap();
        let mut request = wsbridge::proxy::header(wsbridge::proxy::Version::V2, client, self.bin.addr);
        request.extend_from_slice(&upgrade_request(path, ""));
        s.write_all(&request).await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        within("the answer's status line", async {
            while !head.ends_with(b"\r\n") && s.read(&mut byte).await.unwrap() == 1 {
                head.push(byte[0]);
            }
        })
        .await;
        status_of(&String::from_utf8_lossy(&head))
    }
}

/// `GET path` on an admin listener: status and body.
async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    admin(addr, "GET", path, None).await
}

/// examples/haproxy.cfg in front of `instances` (named wsbridge1, wsbridge2 there): its frontend
/// on the test's socket, the stats socket in `dir`, logs on stderr, no chroot or user switch,
/// and checks every 100 ms that take a server out after one failure.
fn haproxy_config(dir: &Path, instances: [&Instance; 2]) -> String {
    let example = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/haproxy.cfg")).unwrap();
    let stats = HaProxy::stats_path(dir);
    // (what, into what, how many times the example has it)
    let mut subs = vec![
        ("    log /dev/log local0\n", "    log stderr format raw local0 info\n".to_owned(), 1),
        (
            "    chroot /var/lib/haproxy\n    user haproxy\n    group haproxy\n",
            String::new(),
            1,
        ),
        // The global cap and the frontend's: HAProxy wants two descriptors per connection, more
        // than a test process may have.
        ("maxconn 20000", "maxconn 1000".to_owned(), 2),
        (
            "stats socket /run/haproxy/admin.sock",
            format!("stats socket {}", stats.display()),
            1,
        ),
        ("    bind :443\n", "    bind fd@0\n".to_owned(), 1),
        ("inter 2s fall 2 rise 2", "inter 100ms fall 1 rise 1".to_owned(), 1),
    ];
    for (i, (example_addr, instance)) in ["10.0.0.11", "10.0.0.12"].iter().zip(instances).enumerate() {
        // The agents' backend of each instance (`use_backend` by the TLS SNI) goes to the same
        // instance.
        subs.push((
            if i == 0 {
                "server agents-on-1 10.0.0.11:6080\n"
            } else {
                "server agents-on-2 10.0.0.12:6080\n"
            },
            format!("server agents-on-{} {}\n", i + 1, instance.bin.addr),
            1,
        ));
        subs.push((
            if i == 0 {
                "server wsbridge1 10.0.0.11:6080 check port 9100"
            } else {
                "server wsbridge2 10.0.0.12:6080 check port 9100"
            },
            format!(
                "server wsbridge{} {} check port {}",
                i + 1,
                instance.bin.addr,
                instance.admin.port()
            ),
            1,
        ));
        assert!(example.contains(example_addr));
    }
    subs.into_iter().fold(example, |text, (from, to, times)| {
        assert_eq!(
            text.matches(from).count(),
            times,
            "examples/haproxy.cfg no longer has {from:?} {times} time(s): update this test with it"
        );
        text.replace(from, &to)
    })
}

/// A session through the balancer on `path`, checked with one echo: by the time it answers, the
/// instance that took it lists it. Returns the client and its address as the instances see it.
async fn session(front: SocketAddr, path: &str) -> (Ws, String) {
    let (mut ws, _) = ws_connect(&format!("ws://{front}{path}"), None).await;
    let me = match ws.get_ref() {
        MaybeTlsStream::Plain(s) => s.local_addr().unwrap().to_string(),
        _ => unreachable!("plain ws://"),
    };
    send_bin(&mut ws, b"hello").await;
    assert_eq!(recv_data(&mut ws).await, b"hello");
    (ws, me)
}

#[tokio::test]
async fn behind_haproxy_a_drained_instance_hands_new_sessions_to_the_other_and_ends_its_own_after_their_data() {
    let test = "balancer::behind_haproxy_a_drained_instance_hands_new_sessions_to_the_other_and_ends_its_own_after_their_data";
    let Some(haproxy) = HaProxy::installed() else {
        return skip(test, "haproxy is not installed (scripts/test.sh installs Debian's haproxy)");
    };
    let dir = tempfile::tempdir().unwrap();
    let (echo, _) = echo_backend().await;
    let Some(tokens) = Tokens::redis().await else {
        return skip(
            test,
            "no redis-server here (Debian package redis-server; scripts/test.sh installs it)",
        );
    };
    tokens.put("desk-7", echo).await;
    let mut one = Instance::start(dir.path(), "one", &tokens).await;
    let two = Instance::start(dir.path(), "two", &tokens).await;
    let balancer = HaProxy::start(&haproxy, dir.path(), &haproxy_config(dir.path(), [&one, &two]));
    let path = "/websockify?token=desk-7";

    // leastconn: the second session goes to the instance without one. One token, written once,
    // routes on both.
    let (first, first_addr) = session(balancer.front, path).await;
    let (second, second_addr) = session(balancer.front, path).await;
    let (on_one, on_two) = (one.sessions().await, two.sessions().await);
    assert_eq!((on_one.len(), on_two.len()), (1, 1), "one session each: {on_one:?} {on_two:?}");
    // The instances see the clients' own addresses (PROXY v2), so each session is known by it.
    let (mut leaving, mut staying, staying_id) = if on_one[0].1 == first_addr {
        (first, second, on_two[0].0)
    } else {
        assert_eq!(on_one[0].1, second_addr, "{on_one:?}");
        (second, first, on_two[0].0)
    };
    let states = balancer.server_states("wsbridge").await;
    assert_eq!((states["wsbridge1"], states["wsbridge2"]), (2, 2), "both up: {states:?}");

    // A token put in the store routes on every instance; deleted, it is refused on every one.
    // Asked of each instance directly (as HAProxy would), so that both answer.
    tokens.put("desk-8", echo).await;
    for instance in [&one, &two] {
        within("the new token to route", async {
            while instance.upgrade_status("/?token=desk-8").await != 101 {
                tokio::task::yield_now().await;
            }
        })
        .await;
    }
    tokens.delete("desk-8").await;
    for instance in [&one, &two] {
        within("the deleted token to be refused", async {
            while instance.upgrade_status("/?token=desk-8").await == 101 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert_eq!(instance.upgrade_status("/?token=desk-8").await, 404);
    }
    // The sessions those upgrades opened end as their clients went away.
    for instance in [&one, &two] {
        within("the probes' sessions to end", async {
            while instance.sessions().await.len() != 1 {
                tokio::task::yield_now().await;
            }
        })
        .await;
    }

    // Data on its way through instance one's session, then SIGTERM.
    let data = pattern(256 * 1024, 3);
    send_bin(&mut leaving, &data).await;
    let started = Instant::now();
    one.bin.signal("TERM").await;
    let reading = tokio::spawn(async move {
        let (messages, close) = read_until_close(&mut leaving).await;
        let _ = leaving.flush().await;
        (messages, close, started.elapsed())
    });
    one.bin.line("draining").await;
    assert_eq!(admin_get(one.admin, "/readyz").await, (503, "draining\n".to_owned()));
    let down = balancer.line("Server wsbridge/wsbridge1 is DOWN").await;
    assert!(down.contains("503"), "taken out for its 503: {down}");
    let states = balancer.server_states("wsbridge").await;
    assert_eq!((states["wsbridge1"], states["wsbridge2"]), (0, 2), "{states:?}");

    // New sessions go to instance two only, while instance one would still take them.
    let mut new = Vec::new();
    for _ in 0..3 {
        new.push(session(balancer.front, path).await);
    }
    assert!(
        started.elapsed() < DRAIN_DELAY,
        "the checks took the whole drain delay ({:?}): nothing shows that HAProxy, not a closed port, moved the sessions",
        started.elapsed()
    );
    assert_eq!(one.sessions().await.len(), 1, "a new session went to the draining instance");
    let on_two = two.sessions().await;
    for (_, addr) in &new {
        assert!(on_two.iter().any(|(_, c)| c == addr), "{addr} not on instance two: {on_two:?}");
    }

    // Instance one's session: everything echoed, then 1001 at the end of the delay.
    let (messages, close, at) = within("instance one's session to end", reading).await.unwrap();
    let got: Vec<u8> = messages.into_iter().flat_map(|m| m.into_data().to_vec()).collect();
    assert!(got == data, "{} of {} bytes came back before the close", got.len(), data.len());
    let close = close.expect("a close frame");
    assert_eq!((u16::from(close.code), close.reason.as_str()), (1001, "server shutting down"));
    assert_window("instance one's 1001 after SIGTERM", at, DRAIN_DELAY);
    assert_eq!(one.bin.exit_code().await, 0, "{:?}", one.bin.lines());

    // Instance two's sessions carry on, the first one untouched since before the drain.
    send_bin(&mut staying, b"still here").await;
    assert_eq!(recv_data(&mut staying).await, b"still here");
    for (ws, _) in &mut new {
        send_bin(ws, b"and here").await;
        assert_eq!(recv_data(ws).await, b"and here");
    }
    let on_two = two.sessions().await;
    assert!(on_two.iter().any(|(id, _)| *id == staying_id), "{on_two:?}");
    assert_eq!(on_two.len(), 4, "{on_two:?}");
}

/// `haproxy -c` passes examples/haproxy.cfg as it is.
#[tokio::test]
async fn the_haproxy_example_is_valid() {
    let test = "balancer::the_haproxy_example_is_valid";
    let Some(haproxy) = HaProxy::installed() else {
        return skip(test, "haproxy is not installed (scripts/test.sh installs Debian's haproxy)");
    };
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/haproxy.cfg");
    let out = tokio::process::Command::new(haproxy)
        .arg("-c")
        .arg("-f")
        .arg(&example)
        .output()
        .await
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("[WARNING]") && !text.contains("[ALERT]"), "{text}");
}

/// `nginx -t` passes examples/nginx.conf with its certificate, pid and log paths pointed at this
/// test's files (nginx -t opens them).
#[tokio::test]
async fn the_nginx_example_is_valid() {
    let test = "balancer::the_nginx_example_is_valid";
    let Some(nginx) = which("nginx") else {
        return skip(test, "nginx is not installed (scripts/test.sh installs Debian's nginx)");
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = crate::common::pki::Pki::new("test CA");
    let cert = pki.server("bridge.example.com", &["bridge.example.com"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let example = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nginx.conf")).unwrap();
    let d = dir.path().display();
    let subs = [
        ("/etc/ssl/certs/bridge.example.com.pem", cert.cert.display().to_string()),
        ("/etc/ssl/private/bridge.example.com.key", cert.key.display().to_string()),
        ("pid /run/nginx.pid;", format!("pid {d}/nginx.pid;")),
        ("/var/log/nginx/error.log", format!("{d}/error.log")),
        ("/var/log/nginx/access.log", format!("{d}/access.log")),
    ];
    let config = subs.into_iter().fold(example, |text, (from, to)| {
        assert_eq!(text.matches(from).count(), 1, "examples/nginx.conf: {from:?}");
        text.replacen(from, &to, 1)
    });
    let file = dir.path().join("nginx.conf");
    std::fs::write(&file, config).unwrap();
    let out = tokio::process::Command::new(nginx)
        .arg("-t")
        .arg("-c")
        .arg(&file)
        .arg("-e")
        .arg(dir.path().join("error.log"))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("test is successful"), "{text}");
}

/// The agent instances' drain delay: room for the agent's first try to come before HAProxy's
/// check took the instance out (a 503) and its next one (2-3 s later) to land on the standby.
const AGENT_DRAIN_DELAY: Duration = Duration::from_secs(6);

/// An agent server as README "Agents and several instances" sets one up: agent `shop-17` (its
/// secret `secret`), its endpoint and a route `/pos` to its service `pos`, with `drain_delay` and
/// an admin listener; on the listener and admin addresses `at` (an instance restarted where its
/// balancer knows it), or on free ports. `listener` is the rest of its `[[listen]]` table (the
/// PROXY protocol, TLS), empty for a plain listener that agents and pages reach through a
/// balancer without PROXY headers.
async fn agent_instance(
    dir: &Path,
    name: &str,
    secret: &str,
    at: Option<(SocketAddr, SocketAddr)>,
    listener: &str,
    drain_delay: Duration,
) -> Instance {
    let file = dir.join(format!("{name}.toml"));
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let (listen, admin) = at.unwrap_or((any, any));
    std::fs::write(
        &file,
        format!(
            "[[listen]]\naddr = \"{listen}\"\n{listener}\n[[agent_endpoint]]\npath = \"/agent\"\n\n\
             [[agent]]\nname = \"shop-17\"\nsecret_sha256 = \"{}\"\n\n\
             [[route]]\npath = \"/pos\"\ntarget = {{ agent = \"shop-17\", service = \"pos\" }}\n\n\
             [timeouts]\ndrain_delay = \"{}ms\"\n\n[admin]\naddr = \"{admin}\"\n",
            wsbridge::agent::link::secret_sha256(secret),
            drain_delay.as_millis()
        ),
    )
    .unwrap();
    Instance::run(&file).await
}

/// Whether `instance` lists agent `shop-17` as connected (its admin `/agents`).
async fn has_agent(instance: &Instance) -> bool {
    let (status, body) = admin_get(instance.admin, "/agents").await;
    assert_eq!(status, 200, "{body}");
    body.contains("\"shop-17\"")
}

/// One host name for pages and agents, routed by the real HAProxy to one instance with a
/// standby (`backup`). When the instance starts to drain it asks the agent to move: the agent
/// tries again through HAProxy and lands on the standby as soon as HAProxy's health check has
/// taken the instance out, long before the drain delay ends, so a page that HAProxy sends to the
/// standby finds the agent there; the page already on the draining instance goes on until the
/// delay ends, then gets its 1001. When the instance is back and HAProxy sends new connections
/// to it again, the agent follows by itself (its quick looks after a move), nobody asking.
#[tokio::test]
async fn behind_haproxy_with_a_standby_an_agent_moves_at_a_drain_and_follows_the_instance_back() {
    let test = "balancer::behind_haproxy_with_a_standby_an_agent_moves_at_a_drain_and_follows_the_instance_back";
    let Some(haproxy) = HaProxy::installed() else {
        return skip(test, "haproxy is not installed (scripts/test.sh installs Debian's haproxy)");
    };
    let dir = tempfile::tempdir().unwrap();
    let secret = "0123456789abcdef0123456789abcdef-standby";
    let mut one = agent_instance(dir.path(), "one", secret, None, "", AGENT_DRAIN_DELAY).await;
    let two = agent_instance(dir.path(), "two", secret, None, "", AGENT_DRAIN_DELAY).await;
    let config = format!(
        "global\n    log stderr format raw local0 info\n    stats socket {}\n\
         defaults\n    mode tcp\n    log global\n    timeout connect 2s\n    timeout client 1m\n    timeout server 1m\n\
         frontend front\n    bind fd@0\n    default_backend wsbridge\n\
         backend wsbridge\n    option httpchk\n    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host wsbridge\n\
         \x20   http-check expect status 200\n    default-server inter 100ms fall 1 rise 1\n\
         \x20   server one {} check port {}\n    server two {} check port {} backup\n",
        HaProxy::stats_path(dir.path()).display(),
        one.bin.addr,
        one.admin.port(),
        two.bin.addr,
        two.admin.port()
    );
    let balancer = HaProxy::start(&haproxy, dir.path(), &config);
    let (echo, _) = echo_backend().await;
    let mut agent_config = wsbridge::agent::client::AgentConfig::new(
        format!("ws://{}/agent", balancer.front).parse().unwrap(),
        "shop-17".into(),
        secret.into(),
    );
    agent_config.services = [("pos".to_owned(), tcp(echo))].into_iter().collect();
    // Only the quick looks after leaving an instance can explain a follow within the test.
    agent_config.balancer_check = Some(Duration::from_secs(600));
    let mut agent = wsbridge::agent::client::spawn(agent_config).unwrap();
    within(
        "the agent to connect",
        agent.wait_for(|s| *s == wsbridge::agent::client::State::Connected),
    )
    .await;
    assert!(
        has_agent(&one).await && !has_agent(&two).await,
        "the agent is on the active instance"
    );
    let (mut before, _) = session(balancer.front, "/pos").await;

    let started = Instant::now();
    one.bin.signal("TERM").await;
    one.bin.line("draining").await;
    balancer.line("Server wsbridge/one is DOWN").await;
    within("the agent to reach the standby", async {
        while !has_agent(&two).await {
            tokio::task::yield_now().await;
        }
    })
    .await;
    within("the agent to let the draining instance go", async {
        while has_agent(&one).await {
            tokio::task::yield_now().await;
        }
    })
    .await;
    // A page HAProxy now sends to the standby finds the agent there.
    let (mut after, _) = session(balancer.front, "/pos").await;
    assert!(
        started.elapsed() < AGENT_DRAIN_DELAY,
        "the agent took the whole drain delay ({:?}) to move",
        started.elapsed()
    );
    send_bin(&mut before, b"still on one").await;
    assert_eq!(recv_data(&mut before).await, b"still on one");
    let (_, close) = read_until_close(&mut before).await;
    // Our answer to its close frame goes out, so that the instance need not wait for it.
    let _ = before.flush().await;
    assert_eq!(
        close.map(|c| u16::from(c.code)),
        Some(1001),
        "the draining instance's page at its end"
    );
    assert_eq!(one.bin.exit_code().await, 0, "{:?}", one.bin.lines());
    send_bin(&mut after, b"on two").await;
    assert_eq!(recv_data(&mut after).await, b"on two");

    // The instance is back where HAProxy knows it (a restart). The agent, on the standby since
    // the move, looks where new connections go at most 5 s apart (x 1.25, spread) and follows
    // (its ordinary looks are 600 s apart).
    let one = agent_instance(dir.path(), "one", secret, Some((one.bin.addr, one.admin)), "", AGENT_DRAIN_DELAY).await;
    balancer.line("Server wsbridge/one is UP").await;
    let up = Instant::now();
    let poll = Duration::from_millis(20);
    within("the agent to follow HAProxy back", async {
        while !has_agent(&one).await {
            tokio::time::sleep(poll).await;
        }
    })
    .await;
    assert!(
        up.elapsed() < Duration::from_millis(6250) + Duration::from_secs(3),
        "the agent followed {:?} after the instance was up",
        up.elapsed()
    );
    within("the agent to let the standby go", async {
        while has_agent(&two).await {
            tokio::time::sleep(poll).await;
        }
    })
    .await;
    let (mut back, _) = session(balancer.front, "/pos").await;
    send_bin(&mut back, b"on one again").await;
    assert_eq!(recv_data(&mut back).await, b"on one again");
    send_bin(&mut after, b"still on two").await;
    assert_eq!(recv_data(&mut after).await, b"still on two");
}

/// The name pages use, on every instance's certificate.
const PAGES: &str = "wsbridge.example.com";

/// A page through the balancer: a wss:// session on `/pos` to `front` with SNI and Host
/// [`PAGES`], checked with one echo through the agent. Returns it and its address as the
/// instances see it (PROXY v2).
async fn page(front: SocketAddr, ca_pem: &str) -> (WebSocketStream<TlsStream<TcpStream>>, String) {
    let versions = &[&tokio_rustls::rustls::version::TLS13];
    let stream = pki::tls_connect(front, PAGES, pki::client_config(ca_pem, None, versions))
        .await
        .expect("TLS to the balancer's front");
    let me = stream.get_ref().0.local_addr().unwrap().to_string();
    let mut ws = pki::wss_over(stream, &format!("wss://{PAGES}/pos")).await;
    // An instance the agent is not connected to closes with 1014 "agent shop-17 is offline"
    // (in its log), which tungstenite shows as 1002 "Protocol violation" (1014 is newer than
    // RFC 6455).
    send_bin(&mut ws, b"hello").await;
    assert_eq!(recv_data(&mut ws).await, b"hello", "the echo through the agent");
    (ws, me)
}

/// Instance `n` (1 or 2) for agents that list every instance: as config/behind-haproxy.toml sets
/// one up (PROXY v2 from HAProxy only, the admin listener for its checks), with TLS on its
/// listener, its certificate naming the pages' name and its agents' one, `agents-N.example.com`.
async fn sni_instance(dir: &Path, pki: &pki::Pki, n: u8, secret: &str) -> Instance {
    let agents = format!("agents-{n}.example.com");
    let cert = pki.server(&format!("instance{n}"), &[PAGES, &agents], &rcgen::PKCS_ECDSA_P256_SHA256);
    let listener = format!(
        "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1/32\"]\n[listen.tls]\ncert = {:?}\nkey = {:?}\n",
        cert.cert.to_str().unwrap(),
        cert.key.to_str().unwrap()
    );
    agent_instance(dir, &format!("instance{n}"), secret, None, &listener, DRAIN_DELAY).await
}

/// README "Agents and several instances", the layout for agents that can list every instance:
/// the real agent lists `agents-1.example.com` and `agents-2.example.com` (resolved to 127.0.0.1
/// through an /etc/hosts of its own), which examples/haproxy.cfg routes by the TLS SNI to one
/// instance each (`wsbridge1_agents`, `wsbridge2_agents`); so it is connected to both, and pages,
/// which HAProxy spreads over both (leastconn), reach it whichever instance they land on. At a
/// drain, new pages go to the other instance and find the agent there, while the draining one's
/// pages carry on through the agent until the end of its delay (then 1001). Needs root and `unshare` (a
/// mount namespace for the agent's /etc/hosts); skipped otherwise.
#[tokio::test]
async fn behind_haproxy_an_agent_on_every_instance_by_sni_serves_pages_on_any() {
    let test = "balancer::behind_haproxy_an_agent_on_every_instance_by_sni_serves_pages_on_any";
    let Some(haproxy) = HaProxy::installed() else {
        return skip(test, "haproxy is not installed (scripts/test.sh installs Debian's haproxy)");
    };
    if !can_unshare_mounts() {
        return skip(test, "needs root and unshare (a mount namespace for the agent's /etc/hosts)");
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::Pki::new("test CA");
    let secret = "0123456789abcdef0123456789abcdef-sni";
    let mut one = sni_instance(dir.path(), &pki, 1, secret).await;
    let two = sni_instance(dir.path(), &pki, 2, secret).await;
    let balancer = HaProxy::start(&haproxy, dir.path(), &haproxy_config(dir.path(), [&one, &two]));

    // The agent: the real binary with the server list README gives, in a mount namespace whose
    // /etc/hosts sends both names to the balancer's front.
    let (echo, _) = echo_backend().await;
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost agents-1.example.com agents-2.example.com\n").unwrap();
    std::fs::write(dir.path().join("agent.secret"), format!("{secret}\n")).unwrap();
    let port = balancer.front.port();
    let agent_file = dir.path().join("agent.toml");
    std::fs::write(
        &agent_file,
        format!(
            "[agent]\nserver = [\"wss://agents-1.example.com:{port}/agent\", \"wss://agents-2.example.com:{port}/agent\"]\n\
             name = \"shop-17\"\nsecret_file = \"agent.secret\"\nca_file = {:?}\nproxy = \"off\"\n\n\
             [agent.services]\npos = \"{echo}\"\n",
            pki.ca_file().to_str().unwrap()
        ),
    )
    .unwrap();
    let mut command = crate::common::binary::command_seeing(
        "/etc/hosts",
        &hosts,
        &["agent".as_ref(), "--config".as_ref(), agent_file.as_os_str()],
    );
    command.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null());
    let agent = Binary::start(command);
    let poll = Duration::from_millis(20);
    for (n, instance) in [(1, &one), (2, &two)] {
        tokio::time::timeout(WAIT, async {
            while !has_agent(instance).await {
                tokio::time::sleep(poll).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the agent never reached instance {n}: {:#?}", agent.lines()));
    }

    // Pages, held open: leastconn spreads them over both instances, and each finds the agent.
    let ca = pki.ca_pem.clone();
    let mut pages = Vec::new();
    for _ in 0..4 {
        pages.push(page(balancer.front, &ca).await);
    }
    let (on_one, on_two) = (one.sessions().await, two.sessions().await);
    assert_eq!((on_one.len(), on_two.len()), (2, 2), "two pages each: {on_one:?} {on_two:?}");
    for (_, me) in &pages {
        assert!(
            on_one.iter().chain(&on_two).any(|(_, c)| c == me),
            "{me} on neither instance: {on_one:?} {on_two:?}"
        );
    }
    let (mut on_one_pages, mut on_two_pages): (Vec<_>, Vec<_>) = pages.into_iter().partition(|(_, me)| on_one.iter().any(|(_, c)| c == me));

    // SIGTERM instance one: once HAProxy's check took it out, new pages go to instance two and
    // find the agent there; instance one's pages carry on through the agent until its delay ends.
    let started = Instant::now();
    one.bin.signal("TERM").await;
    one.bin.line("draining").await;
    balancer.line("Server wsbridge/wsbridge1 is DOWN").await;
    let mut new = Vec::new();
    for _ in 0..3 {
        new.push(page(balancer.front, &ca).await);
    }
    assert!(
        started.elapsed() < DRAIN_DELAY,
        "the checks took the whole drain delay ({:?}): nothing shows that HAProxy, not a closed port, moved the pages",
        started.elapsed()
    );
    let on_two = two.sessions().await;
    for (_, me) in &new {
        assert!(on_two.iter().any(|(_, c)| c == me), "{me} not on instance two: {on_two:?}");
    }
    assert_eq!(one.sessions().await.len(), 2, "a new page went to the draining instance");
    for (ws, _) in &mut on_one_pages {
        send_bin(ws, b"still on one").await;
        assert_eq!(recv_data(ws).await, b"still on one");
    }
    for (ws, _) in &mut on_one_pages {
        let close = within("instance one's pages to end", async {
            loop {
                if let Message::Close(f) = ws.next().await.expect("a close frame").expect("read") {
                    return f;
                }
            }
        })
        .await;
        // Our answer to its close frame goes out, so that the instance need not wait for it.
        let _ = ws.flush().await;
        assert_eq!(
            close.map(|c| u16::from(c.code)),
            Some(1001),
            "the draining instance's pages at its end"
        );
        assert_window("instance one's 1001 after SIGTERM", started.elapsed(), DRAIN_DELAY);
    }
    assert_eq!(one.bin.exit_code().await, 0, "{:?}", one.bin.lines());

    // Instance two's pages, from before the drain and after it, carry on through the agent.
    let on_two: Vec<String> = two.sessions().await.into_iter().map(|(_, c)| c).collect();
    assert_eq!(on_two.len(), 5, "{on_two:?}");
    for (ws, me) in on_two_pages.iter_mut().chain(&mut new) {
        assert!(on_two.contains(me), "{me} not on instance two: {on_two:?}");
        send_bin(ws, b"on two").await;
        assert_eq!(recv_data(ws).await, b"on two");
    }
}
