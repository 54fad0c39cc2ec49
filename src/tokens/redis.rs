//! Tokens in Redis, as websockify's TokenRedis plugin keeps them: the key is the token (after an
//! optional prefix), the value names the target, as `host:port` or as JSON `{"host": "host:port"}`
//! (websockify's two forms; `{"host": "h", "port": 5900}` is taken too). Many bridges share one
//! Redis: a token the web application writes is usable on every one of them at once, and one it
//! deletes stops routing new sessions everywhere (sessions already open are not touched).
//!
//! Every lookup has a deadline ([`RedisTokenSource::lookup_timeout`]) that covers everything it
//! waits for: the lock on the connection, connecting (TLS and `AUTH` included), the read. A Redis
//! that is down, unreachable or hung costs a handshake that deadline at most and answers it 503
//! ([`Unavailable`]), never a hang and never a 404 (a token that may well exist is not called
//! unknown). There is one multiplexed connection per source, made on the first lookup and again
//! after a failure (one connect in flight at a time; a lookup that finds the connection broken
//! tries once more on a new one within its deadline, so a Redis restart costs no handshake).
//!
//! Values are checked strictly, then against the source's allow-list
//! ([`crate::policy::targets`]), so whoever can write to Redis cannot make the bridge an open
//! proxy: a value that is not a `host:port` (too long, a unix socket, a URL, bad JSON) is refused
//! like an unknown token, one naming a target off the list is refused as forbidden, and both are
//! logged with the token's keyed hash, never the token.
//!
//! **Cache.** With `cache_ttl` above zero, an answer naming a target is reused for that long
//! (at most `cache_size` answers; when the cache is full, expired answers are dropped, and a new
//! answer is not kept until there is room). The price: a token deleted from Redis keeps routing
//! new sessions on a bridge that has it cached, for up to `cache_ttl`. Absent tokens are never
//! cached, so a token written a moment ago never waits for a cached "no" to expire; guessing is
//! braked by the per-address failure budget before Redis is asked. The default is no cache:
//! every handshake asks Redis, which answers a lookup in microseconds.
//!
//! **Reads are bounded.** A value is read with `GETRANGE key 0 1024`: whoever can write to Redis
//! cannot make each handshake allocate a 512 MB value. A least-privilege Redis user therefore
//! needs `+getrange` beside `+get`; with `+get` alone the bridge falls back to `GET` (whole values)
//! and warns once.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, RedisError};
use tokio::time::Instant;

pub use super::{Answer, Unavailable};
use crate::config::redis::{RedisCredentials, RedisTokenSource};
use crate::config::{redact, Target};
use crate::policy::targets;

/// The longest value taken: a `host:port`, even as JSON with other fields beside it, is far
/// shorter.
pub const MAX_VALUE_LEN: usize = 1024;

/// How long a source refused `GETRANGE` reads values with `GET` before it asks again.
const GETRANGE_RETRY: Duration = Duration::from_secs(60);

/// A Redis token source in service.
pub struct RedisTokens {
    settings: RedisTokenSource,
    name: String,
    /// Deadlines for the connect and each answer: the lookup's own (its outer deadline is what
    /// counts; these make the client give up the same way on its own).
    connection_config: AsyncConnectionConfig,
    /// The connection in use and what makes a new one. Held while connecting, so one connect is
    /// in flight at a time (lookups wait on it within their deadline).
    connection: tokio::sync::Mutex<Connector>,
    cache: Option<Mutex<Cache>>,
    /// Until when values are read with `GET`, whole: the Redis user was refused `GETRANGE`
    /// (warned about once); tried again after [`GETRANGE_RETRY`], so that granting it takes
    /// effect without a restart.
    whole_values: Mutex<Option<Instant>>,
    /// The warning that Redis is down: once per 10 s, not one a handshake (any client can ask).
    quiet: crate::logging::Quieted,
    /// The CA file as it was read ([`super::stamp`]), to notice a new one at a reload.
    ca_stamp: Option<u64>,
    /// A look at `credentials_file` is under way (on the blocking pool).
    looking: Arc<std::sync::atomic::AtomicBool>,
}

/// A source's connection, and the client that makes the next one.
struct Connector {
    /// The connection in use with its number; `None` before the first lookup and after a
    /// failure.
    number: u64,
    current: Option<MultiplexedConnection>,
    client: Client,
    /// `credentials_file` as `client` read it ([`super::stamp`]): a new connection after the
    /// file changed (a rotated password) reads it again first.
    credentials_stamp: Option<u64>,
    /// The CA file's certificates as read when the source was made, for a client rebuilt with
    /// new credentials (a CA file that changed makes a new source at a reload instead).
    ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for RedisTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTokens")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl RedisTokens {
    /// A source for `settings`. Nothing is connected yet (Redis may be down while the bridge
    /// starts: its handshakes get 503 until it is up).
    ///
    /// # Errors
    /// The CA file cannot be read or holds no usable certificate, or the client refuses the
    /// settings.
    pub fn new(settings: RedisTokenSource) -> Result<RedisTokens, String> {
        let settings_ca_stamp = settings.server.ca.as_deref().and_then(|ca| super::stamp(ca).ok());
        let credentials_stamp = settings.credentials_file.as_deref().and_then(|f| super::stamp(f).ok());
        let ca_pem = match &settings.server.ca {
            None => None,
            Some(ca) => {
                // Checked here with our PEM reader (named errors); the client reads the same bytes.
                crate::tls::load_roots(ca).map_err(|e| e.to_string())?;
                Some(std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?)
            }
        };
        let client = client(&settings, settings.credentials.as_ref(), ca_pem.as_deref())?;
        let connection_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(settings.lookup_timeout))
            .set_response_timeout(Some(settings.lookup_timeout))
            .set_dns_resolver(SharedLookups);
        let cache = (!settings.cache_ttl.is_zero()).then(|| Mutex::new(Cache::new(settings.cache_size)));
        Ok(RedisTokens {
            name: settings.name(),
            settings,
            connection_config,
            connection: tokio::sync::Mutex::new(Connector {
                number: 0,
                current: None,
                client,
                credentials_stamp,
                ca_pem,
            }),
            cache,
            whole_values: Mutex::new(None),
            quiet: crate::logging::Quieted::new(std::time::Duration::from_secs(10)),
            ca_stamp: settings_ca_stamp,
            looking: Arc::default(),
        })
    }

    /// What the configuration said.
    pub fn settings(&self) -> &RedisTokenSource {
        &self.settings
    }

    /// Whether the CA file (if any) is still the one this source read: a reload that finds it
    /// replaced makes a new source, so that a rotated CA is trusted without a restart.
    pub fn ca_unchanged(&self) -> bool {
        self.settings
            .server
            .ca
            .as_deref()
            .is_none_or(|ca| super::stamp(ca).ok() == self.ca_stamp)
    }

    /// The source's name for logs and route names ([`RedisTokenSource::name`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What Redis says of `token`, within the lookup deadline (or from the cache).
    ///
    /// # Errors
    /// [`Unavailable`] when Redis did not answer in time or answered with an error (logged).
    pub async fn lookup(&self, token: &str) -> Result<Answer, Unavailable> {
        match self.cached(token) {
            Some(target) => Ok(Answer::Target(target)),
            None => self.ask(token).await,
        }
    }

    /// What Redis says of `token`, asked now (the cache not looked at; a target found goes in it).
    ///
    /// # Errors
    /// As [`RedisTokens::lookup`].
    pub async fn ask(&self, token: &str) -> Result<Answer, Unavailable> {
        let deadline = Instant::now() + self.settings.lookup_timeout;
        let value = match self.get(token, deadline).await {
            Ok(v) => v,
            Err(problem) => return Err(Unavailable::logged(&self.name, token, problem, &self.quiet)),
        };
        let value = match value {
            Fetched::Missing => return Ok(Answer::Absent),
            Fetched::NotAString => {
                tracing::warn!(source = %self.name, token = %redact(token), "token key in Redis holds no string, token refused");
                return Ok(Answer::Absent);
            }
            Fetched::Value(v) => v,
        };
        let (host, port) = match parse_value(&value) {
            Ok(t) => t,
            Err(why) => {
                tracing::warn!(source = %self.name, token = %redact(token), "token value in Redis is not usable, token refused: {why}");
                return Ok(Answer::Absent);
            }
        };
        let allowed = (self.settings.allow_targets.as_ref()).is_none_or(|rules| targets::allowed(rules, &host, port));
        let target = Target::Tcp { host, port };
        if !allowed {
            return Ok(Answer::Denied(format!(
                "token {} from {} names {target}, which no allow_targets rule (--token-allow-target) admits",
                redact(token),
                self.name
            )));
        }
        if let Some(cache) = &self.cache {
            let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
            cache.insert(token, target.clone(), self.settings.cache_ttl);
        }
        Ok(Answer::Target(target))
    }

    /// The target `token` names in the cache (`cache_ttl`), if it is there and fresh: what
    /// [`RedisTokens::lookup`] answers without asking Redis.
    pub fn cached(&self, token: &str) -> Option<Target> {
        let cache = self.cache.as_ref()?.lock().unwrap_or_else(PoisonError::into_inner);
        cache.get(token, self.settings.cache_ttl)
    }

    /// The value of `prefix+token` by `deadline`: its first [`MAX_VALUE_LEN`] + 1 bytes
    /// (`GETRANGE`), so that a huge value written to Redis costs the bridge no more than a
    /// target's worth of memory; the whole value (`GET`) when the Redis user may not
    /// `GETRANGE`. A connection found broken is replaced and the command tried once more, if
    /// time is left.
    async fn get(&self, token: &str, deadline: Instant) -> Result<Fetched, String> {
        let key = format!("{}{token}", self.settings.key_prefix);
        let timeout = self.settings.lookup_timeout;
        let late = || format!("no answer within the lookup timeout ({})", crate::config::format_duration(timeout));
        let mut attempts = 0;
        loop {
            let (number, mut connection) = match tokio::time::timeout_at(deadline, self.connection()).await {
                Err(_) => return Err(late()),
                Ok(Err(e)) => return Err(format!("cannot connect to Redis: {e}")),
                Ok(Ok(c)) => c,
            };
            let whole = self.reads_whole();
            let command = if whole {
                let mut get = ::redis::cmd("GET");
                get.arg(&key);
                get
            } else {
                let mut range = ::redis::cmd("GETRANGE");
                range.arg(&key).arg(0).arg(MAX_VALUE_LEN);
                range
            };
            let answer = command.query_async::<Option<Vec<u8>>>(&mut connection);
            match tokio::time::timeout_at(deadline, answer).await {
                // GETRANGE answers an absent key with an empty string: an empty value is taken
                // as no value either way (it names no target).
                Ok(Ok(None)) => return Ok(Fetched::Missing),
                Ok(Ok(Some(value))) if value.is_empty() => return Ok(Fetched::Missing),
                Ok(Ok(Some(value))) => return Ok(Fetched::Value(value)),
                // A key of another type is the operator's mistake, not an outage.
                Ok(Err(e)) if e.code() == Some("WRONGTYPE") => return Ok(Fetched::NotAString),
                // Refused the command itself ("… no permissions to run the 'getrange' command"),
                // not a key outside the user's pattern, which GET would be refused as well.
                Ok(Err(e)) if !whole && e.code() == Some("NOPERM") && e.to_string().to_lowercase().contains("'getrange'") => {
                    let mut until = self.whole_values.lock().unwrap_or_else(PoisonError::into_inner);
                    if until.is_none() {
                        tracing::warn!(
                            source = %self.name,
                            "the Redis user may not GETRANGE: token values are read whole with GET (grant +getrange to bound them at {MAX_VALUE_LEN} bytes)"
                        );
                    }
                    *until = Some(Instant::now() + GETRANGE_RETRY);
                }
                Ok(Err(e)) => {
                    let broken = e.is_unrecoverable_error() || e.is_io_error() || e.is_connection_dropped() || e.is_timeout();
                    if broken {
                        self.discard(number, deadline).await;
                    }
                    attempts += 1;
                    if !(broken && attempts == 1) {
                        return Err(format!(
                            "Redis answered {} with an error: {e}",
                            if whole { "GET" } else { "GETRANGE" }
                        ));
                    }
                    tracing::debug!(source = %self.name, error = %e, "Redis connection broken; trying a new one");
                }
                Err(_) => {
                    // Hung, or slow: the next lookup starts on a new connection.
                    self.discard(number, deadline).await;
                    return Err(late());
                }
            }
        }
    }

    /// Whether values are read whole (`GET`) for now: `GETRANGE` was refused less than
    /// [`GETRANGE_RETRY`] ago.
    fn reads_whole(&self) -> bool {
        let until = *self.whole_values.lock().unwrap_or_else(PoisonError::into_inner);
        until.is_some_and(|t| Instant::now() < t)
    }

    /// The connection in use, or a new one, with its number. The caller bounds the wait.
    async fn connection(&self) -> Result<(u64, MultiplexedConnection), RedisError> {
        let mut connector = self.connection.lock().await;
        if let Some(c) = &connector.current {
            return Ok((connector.number, c.clone()));
        }
        self.reread_credentials(&mut connector).await;
        let c = connector
            .client
            .get_multiplexed_async_connection_with_config(&self.connection_config)
            .await?;
        tracing::debug!(source = %self.name, "connected to Redis");
        connector.number = connector.number.wrapping_add(1);
        connector.current = Some(c.clone());
        Ok((connector.number, c))
    }

    /// A metrics scrape's look at `credentials_file`: read again if it changed, so that a file
    /// fixed (or broken) while the connection lasts shows in `last_reload_successful` (a review:
    /// the alert held after the file was fixed, until Redis dropped the connection). Skipped
    /// while a connect is under way: it reads the file itself.
    pub async fn refresh(&self) {
        if self.settings.credentials_file.is_none() {
            return;
        }
        let Ok(known) = self.connection.try_lock().map(|c| c.credentials_stamp) else {
            return;
        };
        if let Some((stamp, read)) = self.look_at_credentials(known).await {
            // Unless a connect took a newer reading meanwhile.
            if let Ok(mut connector) = self.connection.try_lock() {
                if connector.credentials_stamp == known {
                    self.take_credentials(&mut connector, stamp, read);
                }
            }
        }
    }

    /// Before a new connection: `credentials_file` read again if it changed since (a password
    /// rotated in the file and in Redis: connections made before go on with the old one, as
    /// Redis keeps them, and the next one would fail with it until a reload).
    async fn reread_credentials(&self, connector: &mut Connector) {
        if let Some((stamp, read)) = self.look_at_credentials(connector.credentials_stamp).await {
            self.take_credentials(connector, stamp, read);
        }
    }

    /// `credentials_file`'s stamp and, when it is not `known`, its credentials: looked at off the
    /// runtime's thread (a file on a mount that hangs, or a FIFO put in its place, froze the
    /// bridge during a scrape: an admin review), one look at a time, within
    /// [`super::REREAD_WAIT`]. `None`: unchanged, or no answer in time (the credentials read
    /// before stay; a look that hangs keeps the next ones from starting).
    async fn look_at_credentials(&self, known: Option<u64>) -> Option<(Option<u64>, Result<RedisCredentials, String>)> {
        let file = self.settings.credentials_file.clone()?;
        if self.looking.swap(true, Ordering::AcqRel) {
            // The look before has not come back: its file is still hung, said once per 10 s.
            if let Some(left_out) = self.quiet.take() {
                tracing::warn!(source = %self.name, left_out, file = %file.display(), "Redis credentials file still not read; the credentials read before stay");
            }
            return None;
        }
        /// Lets the next look start when this one ends, however (a panic included).
        struct Done(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let done = Done(self.looking.clone());
        let look = tokio::task::spawn_blocking(move || {
            let _done = done;
            let stamp = super::stamp(&file).ok();
            // Only a regular file is opened: a FIFO (or a device) put in its place would hold the
            // reading thread for good, and with it every later look (a review).
            let read = (stamp != known).then(|| match std::fs::metadata(&file) {
                Ok(m) if !m.is_file() => Err(format!("{}: not a regular file", file.display())),
                _ => RedisCredentials::from_file(&file),
            });
            (stamp, read)
        });
        match tokio::time::timeout(super::REREAD_WAIT, look).await {
            Ok(Ok((stamp, Some(read)))) => Some((stamp, read)),
            Ok(_) => None,
            Err(_) => {
                if let Some(left_out) = self.quiet.take() {
                    tracing::warn!(source = %self.name, left_out, wait = ?super::REREAD_WAIT, "Redis credentials file is slow to read; the credentials read before stay");
                }
                None
            }
        }
    }

    /// Puts credentials read from `credentials_file` (its `stamp`) in force for the next
    /// connection. A file that could not be read or is malformed leaves the credentials as they
    /// were, with a warning, until it changes again; counted as a credentials re-read either way.
    fn take_credentials(&self, connector: &mut Connector, stamp: Option<u64>, read: Result<RedisCredentials, String>) {
        let Some(file) = self.settings.credentials_file.as_deref() else {
            return;
        };
        if stamp == connector.credentials_stamp {
            return;
        }
        connector.credentials_stamp = stamp;
        match read.and_then(|c| client(&self.settings, Some(&c), connector.ca_pem.as_deref())) {
            Ok(c) => {
                connector.client = c;
                crate::metrics::credentials_reloaded(file, true);
                tracing::info!(source = %self.name, file = %file.display(), "Redis credentials file re-read");
            }
            Err(e) => {
                crate::metrics::credentials_reloaded(file, false);
                tracing::warn!(source = %self.name, error = %e, "Redis credentials file not re-read; the credentials read before stay");
            }
        }
    }

    /// Drops connection `number` as the one in use (unless another lookup replaced it already),
    /// waiting for the lock until `deadline` at most (once past it, one try: the lookup is
    /// answered in time, and a broken connection left in place is found and dropped by the next).
    async fn discard(&self, number: u64, deadline: Instant) {
        let lock = tokio::time::timeout_at(deadline, self.connection.lock()).await;
        if let Ok(mut connector) = lock {
            if connector.number == number {
                connector.current = None;
            }
        }
    }
}

/// The Redis server's name resolved as backends' and the token API's are ([`crate::dns`]): the
/// connects that handshakes start while Redis is unreachable join one lookup, instead of each
/// holding a blocking thread for the resolver's whole timeout (a review: with the name server
/// down, redis-rs's own lookups filled the blocking pool, 512 threads, at one per handshake,
/// and token files, static files and metrics waited behind them).
struct SharedLookups;

impl ::redis::io::AsyncDNSResolver for SharedLookups {
    fn resolve<'a, 'b: 'a>(
        &'a self,
        host: &'b str,
        port: u16,
    ) -> ::redis::RedisFuture<'a, Box<dyn Iterator<Item = std::net::SocketAddr> + Send + 'a>> {
        Box::pin(async move {
            let addrs = crate::dns::resolve(host, port).await.map_err(RedisError::from)?;
            Ok(Box::new(addrs.into_iter()) as Box<dyn Iterator<Item = std::net::SocketAddr> + Send>)
        })
    }
}

/// A client for `settings`' server with `credentials`, trusting `ca_pem` (the CA file's bytes,
/// for `rediss://` with a CA).
///
/// # Errors
/// The client refuses the settings.
fn client(
    settings: &RedisTokenSource,
    credentials: Option<&crate::config::redis::RedisCredentials>,
    ca_pem: Option<&[u8]>,
) -> Result<Client, String> {
    let server = &settings.server;
    let addr = match server.tls {
        false => ConnectionAddr::Tcp(server.host.clone(), server.port),
        true => ConnectionAddr::TcpTls {
            host: server.host.clone(),
            port: server.port,
            insecure: false,
            tls_params: None,
        },
    };
    let mut redis = RedisConnectionInfo::default().set_db(i64::from(server.db));
    if let Some(c) = credentials {
        redis = redis.set_password(&c.password);
        if let Some(user) = &c.username {
            redis = redis.set_username(user);
        }
    }
    let info = addr
        .into_connection_info()
        .map_err(|e| format!("Redis address: {e}"))?
        .set_redis_settings(redis);
    match ca_pem {
        None => Client::open(info),
        Some(pem) => {
            let certificates = ::redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            };
            Client::build_with_tls(info, certificates)
        }
    }
    .map_err(|e| format!("Redis client: {e}"))
}

/// What a lookup found in Redis.
enum Fetched {
    Missing,
    Value(Vec<u8>),
    /// The key holds a list, a hash, …
    NotAString,
}

/// Reads a value as websockify writes it: `host:port`, or JSON `{"host": "host:port"}`, with
/// surrounding whitespace; also `[v6]:port` and `{"host": "h", "port": 5900}` (or `"5900"`).
/// Other JSON fields are ignored. Only TCP targets, as host and port: a unix socket never comes
/// from Redis.
///
/// # Errors
/// What is wrong, without repeating the value.
pub fn parse_value(value: &[u8]) -> Result<(String, u16), String> {
    if value.len() > MAX_VALUE_LEN {
        return Err(format!("more than {MAX_VALUE_LEN} bytes, longer than a target needs"));
    }
    let text = std::str::from_utf8(value).map_err(|_| "not UTF-8".to_owned())?;
    parse_target(text)
}

/// [`parse_value`]'s reading of a value's text, whatever its length: token APIs answer in these
/// forms too ([`super::api`]).
///
/// # Errors
/// What is wrong, without repeating the text.
pub fn parse_target(text: &str) -> Result<(String, u16), String> {
    let text = text.trim();
    let (host, port) = if text.starts_with('{') {
        let json: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let host = json.get("host").and_then(|h| h.as_str()).ok_or("JSON without a \"host\" string")?;
        match json.get("port") {
            None => split(host)?,
            Some(p) => {
                let port = match p {
                    serde_json::Value::Number(n) => n.as_u64().map(|n| n.to_string()),
                    serde_json::Value::String(s) => Some(s.clone()),
                    _ => None,
                }
                .ok_or("\"port\" is neither a number nor a string")?;
                let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
                (bare.to_owned(), port)
            }
        }
    } else {
        if text.starts_with("unix_socket:") || text.starts_with("unix:") {
            return Err("a unix socket: token values name TCP host:port targets only".into());
        }
        split(text)?
    };
    check_host(&host)?;
    let port = port.parse::<u16>().ok().filter(|p| *p != 0).ok_or("the port is not 1-65535")?;
    Ok((host, port))
}

fn split(s: &str) -> Result<(String, String), String> {
    crate::config::split_target(s)
        .map(|(h, p)| (h.to_owned(), p.to_owned()))
        .ok_or_else(|| "expected host:port (or [IPv6]:port)".to_owned())
}

/// A host to connect to: an IP address, or a DNS name (letters, digits, `-`, `.`, `_`).
fn check_host(host: &str) -> Result<(), String> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let name = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && !host.starts_with(['-', '.']);
    match name {
        true => Ok(()),
        false => Err("the host is neither an IP address nor a host name".into()),
    }
}

/// Recent answers naming a target, bounded in number.
struct Cache {
    entries: HashMap<String, (Instant, Target)>,
    capacity: usize,
    /// When expired entries were last dropped: at most once per TTL, so a full cache of fresh
    /// entries does not cost every insert a scan.
    swept: Instant,
}

impl Cache {
    fn new(capacity: usize) -> Cache {
        Cache {
            entries: HashMap::new(),
            capacity,
            swept: Instant::now(),
        }
    }

    fn get(&self, token: &str, ttl: Duration) -> Option<Target> {
        self.entries.get(token).filter(|(at, _)| at.elapsed() < ttl).map(|(_, t)| t.clone())
    }

    fn insert(&mut self, token: &str, target: Target, ttl: Duration) {
        let now = Instant::now();
        if self.entries.len() >= self.capacity && !self.entries.contains_key(token) && now.duration_since(self.swept) >= ttl {
            self.entries.retain(|_, (at, _)| now.duration_since(*at) < ttl);
            self.swept = now;
        }
        if self.entries.len() < self.capacity || self.entries.contains_key(token) {
            self.entries.insert(token.to_owned(), (now, target));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Target {
        Target::Tcp { host: host.into(), port }
    }

    #[test]
    fn values_as_websockify_writes_them() {
        let ok = |v: &str| {
            let (host, port) = parse_value(v.as_bytes()).unwrap();
            Target::Tcp { host, port }
        };
        // websockify's test cases (TokenRedisTestCase), with real ports.
        assert_eq!(ok("{\"host\": \"remote_host:5900\"}"), tcp("remote_host", 5900));
        assert_eq!(ok(" {\"host\": \"remote_host:5900\"} "), tcp("remote_host", 5900));
        assert_eq!(ok("remote_host:5900"), tcp("remote_host", 5900));
        assert_eq!(ok(" remote_host:5900 \n"), tcp("remote_host", 5900));
        // Beyond websockify: IPv6, host and port apart, other fields beside.
        assert_eq!(ok("[::1]:5901"), tcp("::1", 5901));
        assert_eq!(ok("::1:5904"), tcp("::1", 5904));
        assert_eq!(ok("{\"host\": \"[::1]:5901\"}"), tcp("::1", 5901));
        assert_eq!(ok("{\"host\": \"10.0.0.7\", \"port\": 5902}"), tcp("10.0.0.7", 5902));
        assert_eq!(ok("{\"host\": \"::1\", \"port\": \"5903\"}"), tcp("::1", 5903));
        assert_eq!(ok("{\"host\": \"vnc.internal:1\", \"user\": \"alice\"}"), tcp("vnc.internal", 1));
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        for (bad, says) in [
            ("{\"host\": \"remote_host:5900\"   ", "invalid JSON"),
            ("{\"hots\": \"h:1\"}", "\"host\""),
            ("{\"host\": 5}", "\"host\""),
            ("{\"host\": \"h\", \"port\": true}", "\"port\""),
            ("{\"host\": \"h:1:2\"}", "host:port"),
            ("remote_host:remote_port", "1-65535"),
            ("h:0", "1-65535"),
            ("h:70000", "1-65535"),
            ("nohostport", "host:port"),
            ("unix_socket:/run/x.sock", "unix socket"),
            ("unix:/run/x.sock", "unix socket"),
            ("user@h:1", "host name"),
            ("h/x:1", "host name"),
            ("h h:1", "host name"),
            (":1", "host name"),
            ("-h:1", "host name"),
        ] {
            let e = parse_value(bad.as_bytes()).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        assert!(parse_value(&[b'a'; MAX_VALUE_LEN + 1]).unwrap_err().contains("bytes"));
        assert!(parse_value(&[0xff, b':', b'1']).unwrap_err().contains("UTF-8"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_forgets_after_its_ttl_and_holds_at_most_its_size() {
        let ttl = Duration::from_secs(1);
        let mut cache = Cache::new(2);
        cache.insert("a", tcp("h", 1), ttl);
        cache.insert("b", tcp("h", 2), ttl);
        cache.insert("c", tcp("h", 3), ttl);
        assert_eq!(cache.entries.len(), 2, "full: c is not kept");
        assert_eq!(cache.get("a", ttl), Some(tcp("h", 1)));
        assert_eq!(cache.get("c", ttl), None);
        // An update of a cached token is kept even when full.
        cache.insert("a", tcp("h", 9), ttl);
        assert_eq!(cache.get("a", ttl), Some(tcp("h", 9)));
        tokio::time::advance(ttl).await;
        assert_eq!(cache.get("a", ttl), None, "expired");
        cache.insert("c", tcp("h", 3), ttl);
        assert_eq!(cache.entries.len(), 1, "the expired entries were dropped to make room");
        assert_eq!(cache.get("c", ttl), Some(tcp("h", 3)));
    }
}
