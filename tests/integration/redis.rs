//! Tokens in Redis (websockify's TokenRedis) against a real redis-server on a loopback port of its
//! own (tests/common/redis.rs): the command-line and TOML forms, writes and deletes taking effect
//! at once, Redis down, hung, restarted, over TLS, the allow-list, and the cache.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::redis::Redis;
use crate::common::token_sources::{echoes, from_cli, from_toml, only};
use crate::common::*;

/// The lookup deadline the outage tests set (short, so the tests are quick; far above a loopback
/// Redis's answer time, so a healthy one never misses it).
const LOOKUP_TIMEOUT: Duration = Duration::from_millis(400);

/// Starts redis-server with `extra`, or says why the test is skipped.
async fn redis_or_skip(test: &str, extra: &[&str]) -> Option<Redis> {
    let redis = Redis::start(extra).await;
    if redis.is_none() {
        skip(
            test,
            "no redis-server here (Debian package redis-server; scripts/test.sh installs it)",
        );
    }
    redis
}

/// The status an upgrade with `?token=` gets.
async fn status_for(bridge: &TestBridge, token: &str) -> u16 {
    status_of(&http_head(bridge.addr, &upgrade_request(&format!("/websockify?token={token}"), "")).await)
}

async fn set(c: &mut ::redis::aio::MultiplexedConnection, key: &str, value: &str) {
    let mut cmd = ::redis::cmd("SET");
    cmd.arg(key).arg(value);
    within("SET", cmd.query_async::<()>(c)).await.expect("SET");
}

/// `(calls, rejected_calls)` of `command` since Redis started, from `INFO commandstats`
/// (`rejected_calls` is there from Redis 7.0; 0 before).
async fn command_calls(c: &mut ::redis::aio::MultiplexedConnection, command: &str) -> (u64, u64) {
    let mut info = ::redis::cmd("INFO");
    info.arg("commandstats");
    let text: String = within("INFO", info.query_async(c)).await.expect("INFO");
    let prefix = format!("cmdstat_{command}:");
    let Some(line) = text.lines().find_map(|l| l.strip_prefix(&prefix)) else {
        return (0, 0);
    };
    let field = |name: &str| {
        line.split(',')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .map_or(0, |v| v.parse().unwrap())
    };
    (field("calls"), field("rejected_calls"))
}

async fn del(c: &mut ::redis::aio::MultiplexedConnection, key: &str) {
    let mut cmd = ::redis::cmd("DEL");
    cmd.arg(key);
    within("DEL", cmd.query_async::<()>(c)).await.expect("DEL");
}

/// The handshakes the bridge counted as refused for this reason.
fn refused(bridge: &TestBridge, reason: &str) -> u64 {
    let text = bridge.bridge.metrics().encode();
    let prefix = "wsbridge_handshakes_refused_total{";
    text.lines()
        .filter(|l| l.starts_with(prefix) && l.contains(&format!("reason=\"{reason}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test]
async fn websockify_command_line_form_with_plain_and_json_values() {
    let Some(redis) = redis_or_skip("websockify_command_line_form_with_plain_and_json_values", &[]).await else {
        return;
    };
    let (echo, _) = echo_backend().await;
    let source = format!("127.0.0.1:{}", redis.port);
    let config = from_cli(&[
        "--token-plugin",
        "TokenRedis",
        "--token-source",
        &source,
        "--token-allow-target",
        &only(echo),
    ]);
    let bridge = TestBridge::start(config).await;
    let mut c = redis.client(0, None).await;
    set(&mut c, "plain", &format!("{echo}")).await;
    set(&mut c, "json", &format!(" {{\"host\": \"{echo}\"}} ")).await;
    set(
        &mut c,
        "apart",
        &format!("{{\"host\": \"{}\", \"port\": {}}}", echo.ip(), echo.port()),
    )
    .await;
    for token in ["plain", "json", "apart"] {
        echoes(&bridge, token).await;
    }
    assert_eq!(status_for(&bridge, "missing").await, 404, "an absent key is an unknown token");
    bridge.stop().await;
}

#[tokio::test]
async fn websockify_form_with_database_password_and_namespace() {
    let test = "websockify_form_with_database_password_and_namespace";
    let Some(redis) = redis_or_skip(test, &["--requirepass", "s3cr:et"]).await else {
        return;
    };
    let (echo, _) = echo_backend().await;
    // The password holds a colon: quoted, as websockify's parse_source_args takes it.
    let source = format!("127.0.0.1:{}:3:\"s3cr:et\":\"app:vnc\"", redis.port);
    let config = from_cli(&[
        "--token-plugin",
        "TokenRedis",
        "--token-source",
        &source,
        "--token-allow-target",
        &only(echo),
    ]);
    let bridge = TestBridge::start(config).await;
    let mut db3 = redis.client(3, Some("s3cr:et")).await;
    let mut db0 = redis.client(0, Some("s3cr:et")).await;
    set(&mut db3, "app:vnc:desk", &echo.to_string()).await;
    echoes(&bridge, "desk").await;
    // Not in the namespace, or in another database: unknown.
    set(&mut db3, "other", &echo.to_string()).await;
    set(&mut db0, "app:vnc:other", &echo.to_string()).await;
    assert_eq!(status_for(&bridge, "other").await, 404);
    bridge.stop().await;

    // A wrong password: Redis refuses, so the bridge cannot tell whether the token exists: 503.
    let source = format!("127.0.0.1:{}:3:wrong:\"app:vnc\"", redis.port);
    let config = from_cli(&[
        "--token-plugin",
        "TokenRedis",
        "--token-source",
        &source,
        "--token-allow-target",
        &only(echo),
    ]);
    let bridge = TestBridge::start(config).await;
    assert_eq!(status_for(&bridge, "desk").await, 503);
    assert_eq!(refused(&bridge, "token_source_unavailable"), 1);
    bridge.stop().await;
}

/// redis-server arguments for a password on the default user ("admin-pw") and a least-privilege
/// user "bridge" (password "bridge-pw") with the key pattern and commands given.
fn bridge_user<'a>(keys: &'a str, commands: &[&'a str]) -> Vec<&'a str> {
    let mut acl = vec!["--requirepass", "admin-pw", "--user", "bridge", "on", ">bridge-pw", keys];
    acl.extend_from_slice(commands);
    acl
}

/// A TOML token source that reads `redis` as the user of [`bridge_user`] (its credentials in
/// `dir/redis.cred`), keys under `vnc:`, targets limited to `echo`.
fn as_bridge_user(dir: &std::path::Path, redis: &Redis, echo: SocketAddr) -> String {
    std::fs::write(dir.join("redis.cred"), "bridge\nbridge-pw\n").unwrap();
    format!(
        "allow_targets = [\"{}\"]\n[tokens.redis]\nurl = \"{}\"\ncredentials_file = \"redis.cred\"\nkey_prefix = \"vnc:\"\n",
        only(echo),
        redis.url(0)
    )
}

#[tokio::test]
async fn toml_source_with_a_credentials_file_and_a_least_privilege_user() {
    let test = "toml_source_with_a_credentials_file_and_a_least_privilege_user";
    // An ACL user that may only GET keys under vnc: , beside the default one.
    let Some(redis) = redis_or_skip(test, &bridge_user("~vnc:*", &["+get"])).await else {
        return;
    };
    let (echo, accepted) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let config = from_toml(&as_bridge_user(dir.path(), &redis, echo), dir.path());
    let shown = format!("{config:?}");
    assert!(!shown.contains("bridge-pw"), "the password is not in Debug: {shown}");
    // What `wsbridge check` prints: the source, its settings, whether credentials are set.
    let table = wsbridge::routes::RouteTable::from_config(&config, None).unwrap().describe().await;
    let url = redis.url(0);
    let line = format!("Redis token source {url} keys vnc:*: url = \"{url}\", credentials: user and password");
    assert!(table.contains(&line) && !table.contains("bridge-pw"), "{table}");
    let bridge = TestBridge::start(config).await;
    let mut admin = redis.client(0, Some("admin-pw")).await;
    set(&mut admin, "vnc:t1", &echo.to_string()).await;
    echoes(&bridge, "t1").await;
    assert_eq!(status_for(&bridge, "t2").await, 404);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    // This user may GET but not GETRANGE: refused once (counted by Redis 7 and later), then
    // values are read with GET.
    let (ranges, refused) = command_calls(&mut admin, "getrange").await;
    assert!(ranges == 0 && refused <= 1, "GETRANGE calls {ranges}, refused {refused}");
    assert_eq!(command_calls(&mut admin, "get").await, (2, 0));
    bridge.stop().await;
}

/// A password rotated in `credentials_file` and in Redis (a fleet review: connections made
/// before went on, and once Redis dropped them (a failover, `CLIENT KILL`) every token
/// handshake got 503 "authentication failed" until a SIGHUP): a new connection reads the file
/// again when it changed.
#[tokio::test]
async fn a_rotated_redis_password_is_read_from_its_file_at_the_next_connect() {
    let test = "a_rotated_redis_password_is_read_from_its_file_at_the_next_connect";
    let Some(redis) = redis_or_skip(test, &bridge_user("~vnc:*", &["+get", "+getrange"])).await else {
        return;
    };
    let (echo, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let bridge = TestBridge::start(from_toml(&as_bridge_user(dir.path(), &redis, echo), dir.path())).await;
    let mut admin = redis.client(0, Some("admin-pw")).await;
    set(&mut admin, "vnc:t1", &echo.to_string()).await;
    echoes(&bridge, "t1").await;
    // The rotation: the file first, then Redis; then the bridge's connection is dropped.
    std::fs::write(dir.path().join("redis.cred"), "bridge\nbridge-pw-2\n").unwrap();
    let mut rotate = ::redis::cmd("ACL");
    rotate.arg("SETUSER").arg("bridge").arg("resetpass").arg(">bridge-pw-2");
    within("ACL SETUSER", rotate.query_async::<()>(&mut admin))
        .await
        .expect("ACL SETUSER");
    let mut kill = ::redis::cmd("CLIENT");
    kill.arg("KILL").arg("USER").arg("bridge");
    let killed: u64 = within("CLIENT KILL", kill.query_async(&mut admin)).await.expect("CLIENT KILL");
    assert_eq!(killed, 1, "the bridge's one connection");
    // The first lookup may find the dropped connection (503) and let it go; the next connects
    // with the file's new password.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(status_for(&bridge, "t1").await);
        if statuses.last() == Some(&101) {
            break;
        }
    }
    assert_eq!(statuses.last(), Some(&101), "statuses after the rotation: {statuses:?}");
    echoes(&bridge, "t1").await;
    bridge.stop().await;
}

/// A user refused a key (outside its key pattern) is not refused GETRANGE: a token that makes
/// such a key is answered 503 like any Redis error, and the source goes on bounding its reads
/// (a client must not be able to switch it to whole-value GET with a token of its choosing).
#[tokio::test]
async fn a_key_the_user_may_not_read_does_not_switch_the_source_to_get() {
    let test = "a_key_the_user_may_not_read_does_not_switch_the_source_to_get";
    let Some(redis) = redis_or_skip(test, &bridge_user("~vnc:a*", &["+get", "+getrange"])).await else {
        return;
    };
    let (echo, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let bridge = TestBridge::start(from_toml(&as_bridge_user(dir.path(), &redis, echo), dir.path())).await;
    let mut admin = redis.client(0, Some("admin-pw")).await;
    set(&mut admin, "vnc:a1", &echo.to_string()).await;
    assert_eq!(status_for(&bridge, "b1").await, 503, "a key outside the user's pattern");
    echoes(&bridge, "a1").await;
    let (ranges, _) = command_calls(&mut admin, "getrange").await;
    assert_eq!((ranges, command_calls(&mut admin, "get").await), (1, (0, 0)));
    bridge.stop().await;
}

#[tokio::test]
async fn a_written_token_routes_at_once_and_a_deleted_one_stops_at_once() {
    let test = "a_written_token_routes_at_once_and_a_deleted_one_stops_at_once";
    let Some(redis) = redis_or_skip(test, &[]).await else {
        return;
    };
    let (echo, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = format!("allow_targets = [\"{}\"]\nredis = {{ url = \"{}\" }}\n", only(echo), redis.url(0));
    let bridge = TestBridge::start(from_toml(&tokens, dir.path())).await;
    let mut c = redis.client(0, None).await;
    assert_eq!(status_for(&bridge, "fresh").await, 404);
    // Written by "the web application": the very next handshake uses it (the 404 just before
    // was not cached).
    set(&mut c, "fresh", &echo.to_string()).await;
    echoes(&bridge, "fresh").await;
    // A session open when its token is deleted goes on; new sessions are refused at once.
    let (mut open, _) = ws_connect(&bridge.url("/websockify?token=fresh"), None).await;
    del(&mut c, "fresh").await;
    assert_eq!(status_for(&bridge, "fresh").await, 404);
    send_bin(&mut open, b"still here").await;
    assert_eq!(recv_data(&mut open).await, b"still here");
    drop(open);
    bridge.stop().await;
}

#[tokio::test]
async fn targets_off_the_allow_list_and_bad_values_never_reach_a_backend() {
    let test = "targets_off_the_allow_list_and_bad_values_never_reach_a_backend";
    let Some(redis) = redis_or_skip(test, &[]).await else {
        return;
    };
    let (allowed, _) = echo_backend().await;
    let (elsewhere, accepted) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = format!(
        "allow_targets = [\"{}\"]\nredis = {{ url = \"{}\" }}\n",
        only(allowed),
        redis.url(0)
    );
    let bridge = TestBridge::start(from_toml(&tokens, dir.path())).await;
    let mut c = redis.client(0, None).await;
    set(&mut c, "off-list", &elsewhere.to_string()).await;
    set(&mut c, "off-list-json", &format!("{{\"host\": \"{elsewhere}\"}}")).await;
    // Another port of the allowed host, and the allowed port under another name.
    set(&mut c, "other-port", &format!("{}:{}", allowed.ip(), elsewhere.port())).await;
    set(&mut c, "by-name", &format!("localhost:{}", allowed.port())).await;
    for token in ["off-list", "off-list-json", "other-port", "by-name"] {
        assert_eq!(status_for(&bridge, token).await, 403, "{token}");
    }
    for (token, value) in [
        ("unix", "unix_socket:/run/wsbridge-test.sock".to_owned()),
        ("url", format!("http://{allowed}/")),
        ("broken-json", format!("{{\"host\": \"{allowed}\"")),
        ("huge", format!("{allowed}{}", " ".repeat(4 << 20))),
        ("no-port", "127.0.0.1".to_owned()),
    ] {
        set(&mut c, token, &value).await;
        assert_eq!(status_for(&bridge, token).await, 404, "{token}: {value:.60}");
    }
    // A key of another type.
    let mut lpush = ::redis::cmd("LPUSH");
    lpush.arg("a-list").arg(allowed.to_string());
    within("LPUSH", lpush.query_async::<()>(&mut c)).await.unwrap();
    assert_eq!(status_for(&bridge, "a-list").await, 404);
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no connection to a target off the list"
    );
    assert_eq!(refused(&bridge, "forbidden"), 4);
    // Every lookup read at most 1 KiB of its value (GETRANGE), never a value whole (GET): the
    // 4 MiB one (4,096 times what a lookup reads) cost the bridge no more than the others.
    let (ranges, _) = command_calls(&mut c, "getrange").await;
    assert_eq!((ranges, command_calls(&mut c, "get").await), (4 + 5 + 1, (0, 0)));
    bridge.stop().await;
}

/// A bridge with one Redis source on `redis` allowing `echo`, with [`LOOKUP_TIMEOUT`].
async fn outage_bridge(redis: &Redis, echo: SocketAddr, dir: &std::path::Path) -> TestBridge {
    let timeout = format!("{}ms", LOOKUP_TIMEOUT.as_millis());
    let tokens = format!(
        "allow_targets = [\"{}\"]\nredis = {{ url = \"{}\", lookup_timeout = \"{timeout}\" }}\n",
        only(echo),
        redis.url(0)
    );
    TestBridge::start(from_toml(&tokens, dir)).await
}

#[tokio::test]
async fn a_hung_redis_answers_503_at_the_lookup_deadline_and_recovers() {
    let test = "a_hung_redis_answers_503_at_the_lookup_deadline_and_recovers";
    let Some(redis) = redis_or_skip(test, &[]).await else {
        return;
    };
    let (echo, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let bridge = outage_bridge(&redis, echo, dir.path()).await;
    let mut c = redis.client(0, None).await;
    set(&mut c, "desk", &echo.to_string()).await;
    echoes(&bridge, "desk").await;
    // Stopped: the connection in use gets no answer, and so does a new one.
    redis.pause();
    for round in ["on the connection in use", "on a new connection"] {
        let started = Instant::now();
        let response = http_head(bridge.addr, &upgrade_request("/websockify?token=desk", "")).await;
        let took = started.elapsed();
        assert_eq!(status_of(&response), 503, "{round}: {response}");
        assert!(
            response.contains("Retry-After: 1") || response.contains("retry-after: 1"),
            "{response}"
        );
        assert_window(&format!("503 {round}"), took, LOOKUP_TIMEOUT);
    }
    // Routes that do not use Redis are not held up meanwhile: a request with no token is
    // answered at once.
    let started = Instant::now();
    assert_eq!(status_of(&http_head(bridge.addr, &upgrade_request("/", "")).await), 404);
    assert!(started.elapsed() < LOOKUP_TIMEOUT, "took {:?}", started.elapsed());
    assert_eq!(refused(&bridge, "token_source_unavailable"), 2);
    redis.resume();
    echoes(&bridge, "desk").await;
    bridge.stop().await;
}

#[tokio::test]
async fn redis_killed_mid_way_answers_503_at_once_and_a_restart_is_picked_up() {
    let test = "redis_killed_mid_way_answers_503_at_once_and_a_restart_is_picked_up";
    let Some(mut redis) = redis_or_skip(test, &[]).await else {
        return;
    };
    let (echo, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let bridge = outage_bridge(&redis, echo, dir.path()).await;
    let mut c = redis.client(0, None).await;
    set(&mut c, "desk", &echo.to_string()).await;
    let (mut open, _) = ws_connect(&bridge.url("/websockify?token=desk"), None).await;
    redis.kill().await;
    // Refused connections: no need to wait for the deadline, and none waited past it.
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(status_for(&bridge, "desk").await, 503);
        assert!(started.elapsed() < LOOKUP_TIMEOUT + LATE, "took {:?}", started.elapsed());
    }
    // The open session does not depend on Redis.
    send_bin(&mut open, b"during").await;
    assert_eq!(recv_data(&mut open).await, b"during");
    drop(open);
    // Restarted (empty: nothing was saved), the token written again: the next handshake works.
    redis.restart().await;
    let mut c = redis.client(0, None).await;
    set(&mut c, "desk", &echo.to_string()).await;
    echoes(&bridge, "desk").await;
    // And a restart while the bridge holds a connection costs no handshake either.
    redis.restart().await;
    let mut c = redis.client(0, None).await;
    set(&mut c, "desk", &echo.to_string()).await;
    echoes(&bridge, "desk").await;
    assert_eq!(refused(&bridge, "token_source_unavailable"), 3);
    bridge.stop().await;
}

#[tokio::test]
async fn tokens_from_redis_over_tls() {
    let test = "tokens_from_redis_over_tls";
    let pki = crate::common::pki::Pki::new("redis test CA");
    let cert = pki.server("redis", &["127.0.0.1"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let Some(redis) = Redis::start_tls(&cert.cert, &cert.key).await else {
        return skip(
            test,
            "no redis-server here (Debian package redis-server; scripts/test.sh installs it)",
        );
    };
    let tls_port = redis.tls_port.unwrap();
    let (echo, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = redis.client(0, None).await;
    set(&mut c, "secure", &echo.to_string()).await;
    let with_ca = format!(
        "allow_targets = [\"{}\"]\nredis = {{ url = \"rediss://127.0.0.1:{tls_port}/0\", ca = \"{}\" }}\n",
        only(echo),
        pki.ca_file().display()
    );
    let bridge = TestBridge::start(from_toml(&with_ca, dir.path())).await;
    echoes(&bridge, "secure").await;
    bridge.stop().await;
    // Without the CA, the certificate is not trusted (the system's roots do not know it): 503,
    // never an unverified connection.
    let without = format!(
        "allow_targets = [\"{}\"]\nredis = {{ url = \"rediss://127.0.0.1:{tls_port}/0\" }}\n",
        only(echo)
    );
    let bridge = TestBridge::start(from_toml(&without, dir.path())).await;
    assert_eq!(status_for(&bridge, "secure").await, 503);
    bridge.stop().await;
}

#[tokio::test]
async fn cached_answers_last_their_ttl_and_absent_ones_are_never_cached() {
    let test = "cached_answers_last_their_ttl_and_absent_ones_are_never_cached";
    let Some(redis) = redis_or_skip(test, &[]).await else {
        return;
    };
    let ttl = Duration::from_millis(4000);
    let (echo, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = format!(
        "allow_targets = [\"{}\"]\nredis = {{ url = \"{}\", cache_ttl = \"{}ms\" }}\n",
        only(echo),
        redis.url(0),
        ttl.as_millis()
    );
    let bridge = TestBridge::start(from_toml(&tokens, dir.path())).await;
    let mut c = redis.client(0, None).await;
    // Absent, then written: usable at once (the "no" was not cached).
    assert_eq!(status_for(&bridge, "desk").await, 404);
    set(&mut c, "desk", &echo.to_string()).await;
    let asked = Instant::now();
    echoes(&bridge, "desk").await;
    let answered = Instant::now();
    // Deleted: still routed from the cache until the TTL has passed since Redis was asked...
    del(&mut c, "desk").await;
    assert_eq!(status_for(&bridge, "desk").await, 101, "cached");
    // (Two seconds before: the bridge cached the answer after `asked`, and a loaded machine may
    // take a while to serve the probe.)
    tokio::time::sleep_until((asked + ttl - Duration::from_secs(2)).into()).await;
    assert_eq!(status_for(&bridge, "desk").await, 101, "still cached just before the TTL");
    // ...and refused once it has.
    tokio::time::sleep_until((answered + ttl + Duration::from_millis(50)).into()).await;
    assert_eq!(status_for(&bridge, "desk").await, 404, "expired");
    // The metrics count the cache's answers apart and time only those Redis gave: unknown,
    // found, two from the cache, unknown.
    let text = bridge.bridge.metrics().encode();
    let source = redis.url(0);
    for (outcome, n) in [("unknown", 2), ("found", 1), ("cached", 2)] {
        let line = format!(r#"wsbridge_token_lookups_total{{source="{source}",outcome="{outcome}"}} {n}"#);
        assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
    }
    let timed = format!(r#"wsbridge_token_lookup_seconds_count{{source="{source}"}} 3"#);
    assert!(text.lines().any(|l| l == timed), "{timed} in:\n{text}");
    bridge.stop().await;
}

#[tokio::test]
async fn a_jwt_source_beside_a_redis_that_is_down_still_routes_its_tokens() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let test = "a_jwt_source_beside_a_redis_that_is_down_still_routes_its_tokens";
    let Some(mut redis) = redis_or_skip(test, &[]).await else {
        return;
    };
    let (echo, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = "a-shared-secret-of-at-least-32-bytes!";
    std::fs::write(dir.path().join("jwt.key"), secret).unwrap();
    let tokens = format!(
        "allow_targets = [\"{0}\"]\nredis = {{ url = \"{1}\" }}\n\n\
         [[tokens]]\njwt = {{ secret_file = \"jwt.key\", require_exp = false }}\nallow_targets = [\"{0}\"]\n",
        only(echo),
        redis.url(0)
    );
    let bridge = TestBridge::start(from_toml(&tokens, dir.path())).await;
    redis.kill().await;
    let key = EncodingKey::from_secret(secret.as_bytes()).unwrap();
    let claims = serde_json::json!({"host": echo.ip().to_string(), "port": echo.port()});
    let jwt = encode(&Header::default(), &claims, &key).unwrap();
    echoes(&bridge, &jwt).await;
    // Any other token may be in Redis: 503, not 404.
    assert_eq!(status_for(&bridge, "desk").await, 503);
    bridge.stop().await;
}

/// While Redis is down, guessing at the tokens checked before it (a token file's) is still
/// charged to the address: the 503s do not give the tries back, and the brake's 429 comes after
/// its burst of ten, as it would with Redis up.
#[tokio::test]
async fn guesses_while_redis_is_down_are_still_braked() {
    let dir = tempfile::tempdir().unwrap();
    let (echo, _) = echo_backend().await;
    let file = dir.path().join("tokens.cfg");
    std::fs::write(&file, format!("known: {echo}\n")).unwrap();
    let down = closed_port().await;
    let tokens = format!(
        "allow_targets = [\"{}\"]\nredis = {{ url = \"redis://{down}/0\" }}\n\n[[tokens]]\nsource = {:?}\n",
        only(echo),
        file.to_str().unwrap()
    );
    let bridge = TestBridge::start(from_toml(&tokens, dir.path())).await;
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for i in 0..11 {
            v.push(status_for(&bridge, &format!("guess-{i}")).await);
        }
        v
    };
    assert_eq!(statuses[..10], [503; 10], "{statuses:?}");
    assert_eq!(statuses[10], 429, "{statuses:?}");
    bridge.stop().await;
}

/// Where Redis is the only source of tokens, a lookup that found it down checked the token
/// against nothing: not charged, so a page retrying through an outage (every second, as the
/// 503's Retry-After asks) is let in as soon as Redis is back, not slowed down by the brake.
#[tokio::test]
async fn retries_through_a_redis_outage_are_not_braked_when_redis_is_the_only_source() {
    let test = "retries_through_a_redis_outage_are_not_braked_when_redis_is_the_only_source";
    let Some(mut redis) = redis_or_skip(test, &[]).await else {
        return;
    };
    let (echo, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let bridge = outage_bridge(&redis, echo, dir.path()).await;
    redis.kill().await;
    for i in 0..15 {
        assert_eq!(status_for(&bridge, "desk").await, 503, "try {i}");
    }
    redis.restart().await;
    let mut c = redis.client(0, None).await;
    set(&mut c, "desk", &echo.to_string()).await;
    echoes(&bridge, "desk").await;
    bridge.stop().await;
}

/// A Redis source named by a host name while the name server does not answer: the connects that
/// handshakes start (one after another, each when the one before gave up) join one lookup of
/// the name, as backends' do, instead of each holding a thread of the blocking pool for the
/// resolver's whole timeout (a review: 512 threads after some 500 handshakes, and token files,
/// static files and metrics stalled behind them). Counted as queries at a name server that never
/// answers; needs root and unshare (a mount namespace for resolv.conf, port 53).
#[tokio::test]
async fn connects_to_a_redis_named_while_dns_does_not_answer_share_one_lookup() {
    use crate::common::binary::{command_seeing, Binary};
    const TEST: &str = "redis::connects_to_a_redis_named_while_dns_does_not_answer_share_one_lookup";
    if !can_unshare_mounts() {
        return skip(TEST, "needs root and unshare (a mount namespace for resolv.conf, port 53)");
    }
    let Some(dns) = SilentNameServer::start(TEST, 54).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wsbridge.toml");
    std::fs::write(
        &file,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[tokens]]\nallow_targets = [\"127.0.0.1:1-65535\"]\n\
         [tokens.redis]\nurl = \"redis://redis.dns-black-hole.test:6379/0\"\nlookup_timeout = \"200ms\"\n",
    )
    .unwrap();
    let b = Binary::spawn_command(command_seeing(
        "/etc/resolv.conf",
        &dns.resolv,
        &["--config".as_ref(), file.as_os_str()],
    ))
    .await;
    for i in 0..8 {
        let answer = http_head(b.addr, &upgrade_request(&format!("/websockify?token=desk-{i}"), "")).await;
        assert_eq!(status_of(&answer), 503, "{answer}");
    }
    // Eight connects in about 1.6 s, within one lookup's joining time: its queries (one per
    // address family) have arrived by now; eight lookups' would be sixteen.
    let asked = *dns.queries.borrow();
    assert!((1..=4).contains(&asked), "{asked} DNS queries for 8 connects");
}
