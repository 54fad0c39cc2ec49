//! The route table: which backend a request may reach. A client names a route (a path, a token, a
//! host), never an address; every target here came from the configuration or from a token source
//! the operator controls.
//!
//! Lookup order: exact path, then the `token` query parameter (inline token routes, then token
//! sources with `lookup = "query"`: files, Redis, HTTP APIs, JWTs), then the Host header
//! (`lookup = "host"`: files, then Redis, then APIs), then the any-path route. Redis and APIs are
//! asked only when a request gets that far, so routes that do not use them pay nothing for them. A request that names a token that is not known gets no fallback to the any-path route:
//! it is a client error worth a 404, not a reason to send it somewhere else. Where nothing takes
//! tokens from the query (no inline token route, no query token source), the query is ignored,
//! as websockify ignores it in single-target mode. Host tokens match without case or port.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use http::Request;

use crate::config::{redact, Config, Matcher, RouteOptions, Target, TokenLookup};
use crate::policy::auth::Authenticator;
use crate::policy::jwt::JwtVerifier;
use crate::policy::targets::{self, TargetRule};
use crate::policy::{AddressLimits, PerAddress, Staged};
use crate::slots::{Slot, Slots};
use crate::tls::BackendTls;
use crate::tokens::api::ApiTokens;
use crate::tokens::redis::RedisTokens;
use crate::tokens::{host_key, Answer, TokenSource, Unavailable};

/// A route in service.
#[derive(Debug)]
pub struct Route {
    /// How it was matched, for logs (tokens redacted).
    pub name: String,
    /// Where its sessions go.
    pub target: Target,
    /// Framing, limits.
    pub options: RouteOptions,
    /// TLS towards the backend, when the route asks for it.
    pub backend_tls: Option<BackendTls>,
    /// How its clients authenticate, when they must.
    pub auth: Option<Arc<Authenticator>>,
    /// Its sessions and new sessions per client address, when capped.
    pub per_ip: Option<Arc<PerAddress>>,
    /// Live sessions, for `max_sessions`: shared by every route built from the same
    /// configuration entry, and by its successor after a reload.
    sessions: Slots,
}

/// What the routes built from one configuration entry (a `[[route]]`, or every token of a
/// `[[tokens]]` source) share: connectors, authenticators, and the counts a reload carries over.
#[derive(Debug, Clone, Default)]
struct Shared {
    backend_tls: Option<BackendTls>,
    auth: Option<Arc<Authenticator>>,
    per_ip: Option<Arc<PerAddress>>,
    sessions: Slots,
}

impl Shared {
    /// The shared parts for `options`, reading their files; `previous` is what the same entry
    /// had before a reload: its session count carries over, and so do its counts per client
    /// address, whose new limits go to `staged` (see [`per_ip_table`]).
    fn new(
        options: &RouteOptions,
        previous: Option<&Shared>,
        made: &mut Vec<(crate::tls::BackendTlsSettings, BackendTls)>,
        capacity: usize,
        staged: &mut Vec<Staged>,
    ) -> Result<Shared, String> {
        let backend_tls = backend_tls(options, made).map_err(|e| format!("backend TLS: {e}"))?;
        let auth = options
            .policy
            .auth
            .as_ref()
            .map(|a| a.authenticator().map(Arc::new))
            .transpose()
            .map_err(|e| format!("auth: {e}"))?;
        Ok(Shared {
            backend_tls,
            auth,
            per_ip: per_ip_table(options.policy.per_ip, previous.and_then(|p| p.per_ip.as_ref()), capacity, staged),
            sessions: previous.map(|p| p.sessions.clone()).unwrap_or_default(),
        })
    }
}

/// A table of counts per client address for `limits`, sized for `capacity` addresses (none when
/// unlimited): `previous`, so a reload keeps the counts of the sessions open across it, whatever
/// it changed, with the new limits and size pushed to `staged`. `previous` serves the
/// configuration in force until the reload is done: they change nothing until committed
/// ([`Staged::commit`]), which a reload that fails never does.
pub fn per_ip_table(
    limits: AddressLimits,
    previous: Option<&Arc<PerAddress>>,
    capacity: usize,
    staged: &mut Vec<Staged>,
) -> Option<Arc<PerAddress>> {
    if limits.is_unlimited() {
        return None;
    }
    match previous {
        Some(p) => {
            staged.push(p.stage(limits, capacity));
            Some(p.clone())
        }
        None => Some(PerAddress::new(limits, capacity)),
    }
}

impl Route {
    fn new(name: String, target: Target, options: RouteOptions, shared: &Shared) -> Arc<Route> {
        Arc::new(Route {
            name,
            target,
            options,
            backend_tls: shared.backend_tls.clone(),
            auth: shared.auth.clone(),
            per_ip: shared.per_ip.clone(),
            sessions: shared.sessions.clone(),
        })
    }

    fn shared(&self) -> Shared {
        Shared {
            backend_tls: self.backend_tls.clone(),
            auth: self.auth.clone(),
            per_ip: self.per_ip.clone(),
            sessions: self.sessions.clone(),
        }
    }

    /// Whether a client with this certificate common name may use the route.
    pub fn admits(&self, client_cn: Option<&str>) -> bool {
        match &self.options.client_cn {
            None => true,
            Some(allowed) => client_cn.is_some_and(|cn| allowed.iter().any(|a| a == cn)),
        }
    }

    /// Takes a session slot, or `None` when the route is at its `max_sessions`.
    pub fn try_enter(&self) -> Option<Slot> {
        self.sessions.try_take(self.options.max_sessions.unwrap_or(usize::MAX))
    }
}

/// Why no route matched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Miss {
    /// Nothing is configured for this path.
    #[error("no route for path {0}")]
    Path(String),
    /// Nothing is configured for this path, and the request has no `token` in its query where
    /// tokens are taken from there (noVNC's `path` without its `?token=…`, a common mistake).
    #[error("no route for path {0}, and no token in its query (?token=…)")]
    NoToken(String),
    /// A token was given but no source knows it.
    #[error("unknown token {0}")]
    Token(String),
    /// A token names a target that is not on its source's allow-list (a JWT's claims, a value
    /// in Redis).
    #[error("{0}")]
    Denied(String),
    /// A token source that must be asked could not answer (Redis down or slow): the token may
    /// well exist, so this is no 404.
    #[error("{why}")]
    Unavailable {
        /// What the source said (or that it said nothing in time).
        why: String,
        /// Another source (a Redis, an API) did answer that it does not know the token: the
        /// lookup was a real try at a token.
        checked: bool,
    },
}

/// All routes of one configuration.
#[derive(Debug, Default)]
pub struct RouteTable {
    paths: HashMap<String, Arc<Route>>,
    any_path: Option<Arc<Route>>,
    tokens: HashMap<String, Arc<Route>>,
    sources: Vec<(TokenSource, Shared)>,
    /// Sources whose tokens are JWTs naming their target (websockify's JWTTokenApi).
    jwt_sources: Vec<(JwtTokens, Shared)>,
    /// Sources whose tokens are keys in Redis (websockify's TokenRedis).
    redis_sources: Vec<(RedisSource, Shared)>,
    /// Sources whose tokens are asked of an HTTP API (websockify's JSONTokenApi, BaseTokenAPI).
    api_sources: Vec<(ApiSource, Shared)>,
    /// Agent mode's fleet routes (`/PREFIX/{agent}/{service}`), by prefix.
    agent_templates: Vec<(String, Arc<Route>)>,
    /// The declared agents (inline and in fleet files): a fleet route reaches no other.
    agents: crate::agent::Declared,
    /// New limits for the tables per client address kept from the table before a reload: in
    /// force once the whole new configuration was built ([`RouteTable::commit`]).
    staged: Vec<Staged>,
    /// Where lookups in Redis and API sources are counted and timed ([`RouteTable::observed_by`]).
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// A JWT token source in service: the verifier, and what its tokens may name.
#[derive(Debug)]
struct JwtTokens {
    config: crate::config::TokenSourceConfig,
    verifier: JwtVerifier,
    allow: Vec<TargetRule>,
}

/// A Redis token source in service: its configuration and its client (shared with the table
/// that follows after a reload, while the settings stay the same: its connection and cache go on).
#[derive(Debug)]
struct RedisSource {
    config: crate::config::TokenSourceConfig,
    tokens: Arc<RedisTokens>,
}

/// A token API source in service: its configuration and its client (shared with the table that
/// follows after a reload, while the settings stay the same: its kept connections go on).
#[derive(Debug)]
struct ApiSource {
    config: crate::config::TokenSourceConfig,
    tokens: Arc<ApiTokens>,
}

/// The connector for a route's backend TLS settings; routes with equal settings share one, so
/// the system's CA store (or a CA file) is read once per distinct setting, not once per route.
fn backend_tls(
    options: &RouteOptions,
    made: &mut Vec<(crate::tls::BackendTlsSettings, BackendTls)>,
) -> Result<Option<BackendTls>, crate::tls::TlsError> {
    let Some(settings) = &options.backend_tls else { return Ok(None) };
    if let Some((_, tls)) = made.iter().find(|(s, _)| s == settings) {
        return Ok(Some(tls.clone()));
    }
    let tls = BackendTls::new(settings)?;
    made.push((settings.clone(), tls.clone()));
    Ok(Some(tls))
}

impl RouteTable {
    /// Builds the table, reading every token source. On a reload, `previous` is the table in
    /// service: a route or token source that is still configured (same path or token; same file
    /// and lookup) keeps counting its live sessions against `max_sessions`, and its counts per
    /// client address, whose new limits come into force at [`RouteTable::commit`] (until then
    /// `previous` serves on as it was: a reload that fails later leaves it so).
    ///
    /// # Errors
    /// A token source that cannot be read or a backend TLS setting that cannot be used.
    pub fn from_config(config: &Config, previous: Option<&RouteTable>) -> Result<RouteTable, String> {
        let mut table = RouteTable::default();
        let mut made = Vec::new();
        // Room for every connection's address four times over, so distinct addresses rarely share.
        let capacity = config.limits.max_connections.saturating_mul(4);
        for r in &config.routes {
            let before = previous.and_then(|p| p.route_for(&r.matcher)).map(|r| r.shared());
            let shared = Shared::new(&r.options, before.as_ref(), &mut made, capacity, &mut table.staged)
                .map_err(|e| format!("route {}: {e}", r.matcher))?;
            let route = Route::new(r.matcher.to_string(), r.target.clone(), r.options.clone(), &shared);
            match &r.matcher {
                Matcher::Path(p) => match crate::agent::template_prefix(p, &r.target) {
                    Some(prefix) => table.agent_templates.push((prefix.to_owned(), route)),
                    None => {
                        table.paths.insert(p.clone(), route);
                    }
                },
                Matcher::AnyPath => table.any_path = Some(route),
                Matcher::Token(t) => {
                    table.tokens.insert(t.clone(), route);
                }
            }
        }
        table.agents = crate::agent::Declared::from_config(&config.agents);
        for s in &config.token_sources {
            let before = previous.and_then(|p| {
                let files = p.sources.iter().map(|(old, shared)| (&old.config, shared));
                let redis = p.redis_sources.iter().map(|(old, shared)| (&old.config, shared));
                let api = p.api_sources.iter().map(|(old, shared)| (&old.config, shared));
                files
                    .chain(redis)
                    .chain(api)
                    .find(|(old, _)| {
                        old.lookup == s.lookup
                            && match (&old.api, &s.api) {
                                // By the URL as written: its name leaves query values out and
                                // may carry its place, which moves (a review).
                                (Some(a), Some(b)) => a.url.template == b.url.template,
                                (None, None) => old.path == s.path && old.redis.is_some() == s.redis.is_some(),
                                _ => false,
                            }
                    })
                    .map(|(_, shared)| shared)
            });
            let shared = Shared::new(&s.options, before, &mut made, capacity, &mut table.staged)
                .map_err(|e| format!("token source {}: {e}", s.path.display()))?;
            if let Some(settings) = &s.redis {
                let kept = previous
                    .into_iter()
                    .flat_map(|p| &p.redis_sources)
                    .find(|(old, _)| old.tokens.settings() == settings && old.tokens.ca_unchanged())
                    .map(|(old, _)| old.tokens.clone());
                let tokens = match kept {
                    Some(t) => t,
                    None => Arc::new(RedisTokens::new(settings.clone()).map_err(|e| format!("token source {}: {e}", s.path.display()))?),
                };
                table.redis_sources.push((RedisSource { config: s.clone(), tokens }, shared));
                continue;
            }
            if let Some(settings) = &s.api {
                let kept = previous
                    .into_iter()
                    .flat_map(|p| &p.api_sources)
                    .find(|(old, _)| {
                        old.tokens.settings() == settings && old.tokens.ca_unchanged() && old.tokens.name() == s.path.to_string_lossy()
                    })
                    .map(|(old, _)| old.tokens.clone());
                let tokens = match kept {
                    Some(t) => t,
                    None => Arc::new(
                        ApiTokens::new(settings.clone(), s.path.display().to_string())
                            .map_err(|e| format!("token source {}: {e}", s.path.display()))?,
                    ),
                };
                table.api_sources.push((ApiSource { config: s.clone(), tokens }, shared));
                continue;
            }
            if let Some(jwt) = &s.jwt {
                let verifier = JwtVerifier::new(jwt.jwt.clone()).map_err(|e| format!("JWT token source: {e}"))?;
                let tokens = JwtTokens {
                    config: s.clone(),
                    verifier,
                    allow: jwt.allow_targets.clone(),
                };
                table.jwt_sources.push((tokens, shared));
                continue;
            }
            let source = TokenSource::load(s.clone()).map_err(|e| format!("token source {}: {e}", s.path.display()))?;
            table.sources.push((source, shared));
        }
        Ok(table)
    }

    /// Puts into force the new limits of the tables per client address this table kept from the
    /// one before it (see [`RouteTable::from_config`]): for a reload, once all of the new
    /// configuration was built. Nothing to do for a table built without a previous one.
    pub fn commit(&mut self) {
        for s in self.staged.drain(..) {
            s.commit();
        }
    }

    /// Counts and times lookups in Redis and API token sources in `metrics`
    /// (`token_lookups_total`, `token_lookup_seconds`).
    pub fn observed_by(&mut self, metrics: Arc<crate::metrics::Metrics>) {
        self.metrics = Some(metrics);
    }

    /// Exports the series of the routes configured as such (paths, the any-path route, inline
    /// tokens, fleet routes) from now on, before their first session
    /// ([`crate::metrics::Metrics::route_configured`]): once the table is the one in force, not
    /// for a reload that fails after building it.
    pub fn export_configured(&self) {
        let Some(metrics) = &self.metrics else { return };
        let configured = self.paths.values().chain(&self.any_path).chain(self.tokens.values());
        for route in configured.chain(self.agent_templates.iter().map(|(_, r)| r)) {
            metrics.route_configured(&route.name, route.options.max_sessions.is_some());
        }
    }

    /// The route configured with exactly this matcher.
    fn route_for(&self, matcher: &Matcher) -> Option<&Arc<Route>> {
        match matcher {
            Matcher::Path(p) => self.paths.get(p),
            Matcher::AnyPath => self.any_path.as_ref(),
            Matcher::Token(t) => self.tokens.get(t),
        }
    }

    /// Whether a route is configured for exactly this path.
    pub fn has_exact_path(&self, path: &str) -> bool {
        self.paths.contains_key(path)
    }

    /// Whether an any-path route exists (websockify's single-target mode).
    pub fn has_any_path(&self) -> bool {
        self.any_path.is_some()
    }

    /// The route for a request.
    ///
    /// # Errors
    /// [`Miss`] says what did not match, for the 404 body and the log.
    pub async fn lookup<B>(&self, request: &Request<B>) -> Result<Arc<Route>, Miss> {
        let path = request.uri().path();
        if let Some(r) = self.paths.get(path) {
            return Ok(r.clone());
        }
        for (prefix, template) in &self.agent_templates {
            if let Some((agent, service)) = crate::agent::fill_template(prefix, path) {
                // An undeclared agent is an unknown path, whatever the page put in it.
                if self.agents.secret_sha256(&agent).await.is_none() {
                    return Err(Miss::Path(path.chars().take(200).collect()));
                }
                let target = Target::Agent { agent, service };
                let t = template;
                return Ok(Route::new(t.name.clone(), target, t.options.clone(), &t.shared()));
            }
        }
        // Only where something takes tokens from the query: websockify in single-target mode
        // ignores the query, and noVNC's `/websockify?token=…` must reach that one target.
        let query = if self.takes_query_tokens() { request.uri().query() } else { None };
        if let Some(token) = query_token(query) {
            if let Some(r) = self.tokens.get(&token) {
                return Ok(r.clone());
            }
            // A Redis that cannot answer does not keep a JWT from being checked.
            let unavailable = match self.lookup_sources(TokenLookup::Query, &token).await {
                Ok(Some(r)) => return Ok(r),
                Ok(None) => None,
                Err(Miss::Unavailable { why, checked }) => Some(Miss::Unavailable {
                    why,
                    // Checked against the inline tokens above and the JWT sources below too.
                    checked: checked || !self.tokens.is_empty() || !self.jwt_sources.is_empty(),
                }),
                Err(e) => return Err(e),
            };
            if let Some(r) = self.lookup_jwt(&token).await? {
                return Ok(r);
            }
            return Err(unavailable.unwrap_or_else(|| Miss::Token(redact(&token))));
        }
        if let Some(host) = host_of(request) {
            if let Some(r) = self.lookup_sources(TokenLookup::Host, &host).await? {
                return Ok(r);
            }
            // With host tokens, the miss is the host's (the log said "no route for path /").
            if self.any_path.is_none() && self.takes_host_tokens() {
                return Err(Miss::Token(format!("(host) {}", redact(&host))));
            }
        }
        let shown = || path.chars().take(200).collect();
        match &self.any_path {
            Some(route) => Ok(route.clone()),
            // Tokens are taken from the query, and this one has none (or an empty one).
            None if self.takes_query_tokens() => Err(Miss::NoToken(shown())),
            None => Err(Miss::Path(shown())),
        }
    }

    /// Whether looking `request` up tries a token, a credential whose guesses the brake on
    /// failed attempts charges: the `token` in its query where something takes query tokens, or,
    /// where no path route matches it and it names no such token, its host where a source takes
    /// host tokens (`lookup = "host"`, websockify's `--host-token`).
    pub fn names_token<B>(&self, request: &Request<B>) -> bool {
        let path = request.uri().path();
        if self.paths.contains_key(path)
            || self
                .agent_templates
                .iter()
                .any(|(prefix, _)| crate::agent::fill_template(prefix, path).is_some())
        {
            return false;
        }
        if self.takes_query_tokens() && query_token(request.uri().query()).is_some() {
            return true;
        }
        self.takes_host_tokens() && host_of(request).is_some()
    }

    /// Whether `route` is the any-path route (what a request that names no route, or a host
    /// that is no token, reaches): finding it proves no credential.
    pub fn is_any_path(&self, route: &Arc<Route>) -> bool {
        self.any_path.as_ref().is_some_and(|a| Arc::ptr_eq(a, route))
    }

    /// Whether a token source takes tokens from the Host header (`lookup = "host"`).
    fn takes_host_tokens(&self) -> bool {
        self.sources.iter().any(|(s, _)| s.config.lookup == TokenLookup::Host)
            || self.redis_sources.iter().any(|(s, _)| s.config.lookup == TokenLookup::Host)
            || self.api_sources.iter().any(|(s, _)| s.config.lookup == TokenLookup::Host)
    }

    /// Whether a token in the query can select a route: an inline token route, or a token
    /// source with `lookup = "query"`.
    pub fn takes_query_tokens(&self) -> bool {
        !self.tokens.is_empty()
            || !self.jwt_sources.is_empty()
            || self.sources.iter().any(|(s, _)| s.config.lookup == TokenLookup::Query)
            || self.redis_sources.iter().any(|(s, _)| s.config.lookup == TokenLookup::Query)
            || self.api_sources.iter().any(|(s, _)| s.config.lookup == TokenLookup::Query)
    }

    /// Brings the token files ([`TokenSource::refresh`]) and the routes' credentials files
    /// ([`Authenticator::refresh`]) up to date, one after the other.
    pub async fn refresh_files(&self) {
        for (source, _) in &self.sources {
            source.refresh().await;
        }
        for (source, _) in &self.jwt_sources {
            source.verifier.refresh().await;
        }
        for (source, _) in &self.redis_sources {
            source.tokens.refresh().await;
        }
        // Each authenticator once, however many routes share it.
        let mut seen: Vec<usize> = Vec::new();
        let shared = self
            .sources
            .iter()
            .map(|(_, s)| s)
            .chain(self.jwt_sources.iter().map(|(_, s)| s))
            .chain(self.redis_sources.iter().map(|(_, s)| s))
            .chain(self.api_sources.iter().map(|(_, s)| s))
            .filter_map(|s| s.auth.as_ref());
        let routes = self
            .paths
            .values()
            .chain(self.any_path.iter())
            .chain(self.tokens.values())
            .chain(self.agent_templates.iter().map(|(_, r)| r))
            .filter_map(|r| r.auth.as_ref());
        for auth in shared.chain(routes) {
            let at = Arc::as_ptr(auth) as usize;
            if !seen.contains(&at) {
                seen.push(at);
                auth.refresh().await;
            }
        }
    }

    /// The route a JWT token names, if one of the JWT sources verifies it: its `host` and
    /// `port` claims, which must be on that source's allow-list.
    ///
    /// # Errors
    /// [`Miss::Denied`] for a valid token naming a target off the list (or none).
    async fn lookup_jwt(&self, token: &str) -> Result<Option<Arc<Route>>, Miss> {
        for (source, shared) in &self.jwt_sources {
            let Ok(claims) = source.verifier.check(Some(token)).await else {
                continue;
            };
            let name = format!("JWT token {}", redact(token));
            let Some((host, port)) = claims.target else {
                return Err(Miss::Denied(format!("{name} names no host and port")));
            };
            if !targets::allowed(&source.allow, &host, port) {
                return Err(Miss::Denied(format!(
                    "{name} names {host}:{port}, which no allow_targets rule (--token-allow-target) admits"
                )));
            }
            let target = Target::Tcp {
                host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
                port,
            };
            return Ok(Some(Route::new(name, target, source.config.options.clone(), shared)));
        }
        Ok(None)
    }

    /// The route `token` names in the file sources, then the Redis sources, then the API
    /// sources, taking tokens by `lookup`.
    ///
    /// # Errors
    /// [`Miss::Denied`] for a value in Redis or an API's answer naming a target off its
    /// allow-list; [`Miss::Unavailable`] when a Redis or API source could not answer and no other
    /// source knows the token.
    async fn lookup_sources(&self, lookup: TokenLookup, token: &str) -> Result<Option<Arc<Route>>, Miss> {
        let mut unavailable: Option<Unavailable> = None;
        // Whether any source answered that it does not know the token.
        let mut checked = false;
        for (source, shared) in self.sources.iter().filter(|(s, _)| s.config.lookup == lookup) {
            match source.lookup(token).await {
                Ok(Some(target)) => {
                    let name = format!("token {} from {}", redact(token), source.config.path.display());
                    return Ok(Some(Route::new(name, target, source.config.options.clone(), shared)));
                }
                Ok(None) => checked = true,
                // A socket directory that hangs.
                Err(e) => {
                    checked |= e.answered;
                    unavailable = Some(e);
                }
            }
        }
        // Asked in order, Redis first, as the configuration lists them.
        let redis = (self.redis_sources.iter())
            .filter(|(s, _)| s.config.lookup == lookup)
            .map(|(s, shared)| (AskedSource::Redis(&s.tokens), &s.config, shared));
        let api = (self.api_sources.iter())
            .filter(|(s, _)| s.config.lookup == lookup)
            .map(|(s, shared)| (AskedSource::Api(&s.tokens), &s.config, shared));
        for (source, config, shared) in redis.chain(api) {
            let started = tokio::time::Instant::now();
            // A Redis source's cache answers without asking: counted as such, not timed (its
            // microseconds would hide a Redis slowing down in the histogram).
            let cached = match source {
                AskedSource::Redis(r) => r.cached(token),
                AskedSource::Api(_) => None,
            };
            let from_cache = cached.is_some();
            let answer = match (cached, source) {
                (Some(target), _) => Ok(Answer::Target(target)),
                (None, AskedSource::Redis(r)) => r.ask(token).await,
                (None, AskedSource::Api(a)) => a.lookup(token).await,
            };
            if let Some(metrics) = &self.metrics {
                let outcome = match &answer {
                    _ if from_cache => "cached",
                    Ok(Answer::Target(_)) => "found",
                    Ok(Answer::Absent) => "unknown",
                    Ok(Answer::Denied(_)) => "denied",
                    Err(_) => "unavailable",
                };
                let took = (!from_cache).then(|| started.elapsed());
                metrics.token_lookup(&config.path.to_string_lossy(), outcome, took);
            }
            match answer {
                Ok(Answer::Target(target)) => {
                    // The source's name as configured: two API sources whose URLs differ only in
                    // query values carry their place in it (a review: they shared a label).
                    let name = format!("token {} from {}", redact(token), config.path.display());
                    return Ok(Some(Route::new(name, target, config.options.clone(), shared)));
                }
                Ok(Answer::Absent) => checked = true,
                Ok(Answer::Denied(why)) => return Err(Miss::Denied(why)),
                Err(e) => {
                    checked |= e.answered;
                    unavailable = Some(e);
                }
            }
        }
        match unavailable {
            Some(e) => Err(Miss::Unavailable {
                why: e.to_string(),
                checked,
            }),
            None => Ok(None),
        }
    }

    /// The effective route table as text, for `wsbridge check`, options in the configuration's
    /// own words (see [`RouteOptions::describe`]). Tokens are shown redacted.
    pub async fn describe(&self) -> String {
        let mut out = String::new();
        let mut paths: Vec<_> = self.paths.values().collect();
        paths.sort_by(|a, b| a.name.cmp(&b.name));
        let templates = self.agent_templates.iter().map(|(_, r)| r);
        let routes = paths
            .into_iter()
            .chain(templates)
            .chain(self.tokens.values())
            .chain(self.any_path.iter());
        for r in routes {
            let _ = writeln!(out, "{:<40} -> {:<28} {}", r.name, r.target.to_string(), r.options.describe());
        }
        for (s, _) in &self.jwt_sources {
            let rules: Vec<String> = s.allow.iter().map(|r| format!("{:?}", r.to_string())).collect();
            let _ = writeln!(
                out,
                "JWT token source ({}): allow_targets = [{}], {}",
                s.verifier.describe(),
                rules.join(", "),
                s.config.options.describe()
            );
        }
        for (s, _) in &self.redis_sources {
            let _ = writeln!(
                out,
                "Redis token source {}: {}, lookup = \"{}\", {}",
                s.tokens.name(),
                s.tokens.settings().describe(),
                s.config.lookup,
                s.config.options.describe()
            );
        }
        for (s, _) in &self.api_sources {
            let _ = writeln!(
                out,
                "token API source {}: {}, lookup = \"{}\", {}",
                s.config.path.display(),
                s.tokens.settings().describe(),
                s.config.lookup,
                s.config.options.describe()
            );
        }
        for (s, _) in &self.sources {
            let entries = s.entries().await;
            // The format is said only when it is not the default lines.
            let format = match s.config.format {
                crate::config::TokenFormat::Lines => String::new(),
                other => format!(", format = \"{other}\""),
            };
            let _ = writeln!(
                out,
                "token source {} ({}): lookup = \"{}\"{format}, {}",
                s.config.path.display(),
                crate::config::plural(entries.len(), "token"),
                s.config.lookup,
                s.config.options.describe()
            );
            // Ordered by target and tag: an order by token would say something about the tokens.
            let mut list: Vec<_> = entries.iter().map(|(token, target)| (target.to_string(), redact(token))).collect();
            list.sort();
            for (target, tag) in list {
                let _ = writeln!(out, "  token {tag:<34} -> {target}");
            }
        }
        out
    }
}

/// A token source asked per lookup.
enum AskedSource<'a> {
    Redis(&'a RedisTokens),
    Api(&'a ApiTokens),
}

/// The `token` query parameter, percent-decoded.
pub fn query_token(query: Option<&str>) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
}

/// The credentials a query may carry: a route's `token`, and `token` or `access_token` as a
/// bearer credential.
const QUERY_CREDENTIALS: [&str; 2] = ["token", "access_token"];

/// The name of a credential the query names ambiguously, if any: more than once, or spelled
/// otherwise than exactly (`to%6Ben`, `TOKEN`, `Token`). The bridge reads the first exact name
/// after percent-decoding; a proxy in front that decides who may use which token (nginx's
/// `$arg_token`, which ignores case and does not decode names, HAProxy's `url_param`) may read
/// another parameter of the same query, and the session would go where the proxy did not
/// allow. Such a request is refused (400) instead: no client needs to send one.
pub fn ambiguous_credential(query: Option<&str>) -> Option<&'static str> {
    let query = query?;
    let mut seen = [0usize; QUERY_CREDENTIALS.len()];
    for part in query.split('&') {
        let raw = part.split('=').next().unwrap_or(part);
        let decoded = form_urlencoded::parse(part.as_bytes()).next().map(|(k, _)| k);
        for (i, name) in QUERY_CREDENTIALS.into_iter().enumerate() {
            let named = raw.eq_ignore_ascii_case(name) || decoded.as_deref().is_some_and(|d| d.eq_ignore_ascii_case(name));
            if named {
                seen[i] += 1;
                if raw != name || seen[i] > 1 {
                    return Some(name);
                }
            }
        }
    }
    None
}

/// The request's host, without its port, as host tokens are kept ([`host_key`]: case folded, an
/// IP literal in its canonical form): the URI's of an absolute-form request (`GET http://a/`),
/// which RFC 9112 §3.2.2 has a server use instead of `Host`, else the Host header's. `None`
/// when there is neither or it is not `host[:port]` / `[v6][:port]`.
fn host_of<B>(request: &Request<B>) -> Option<String> {
    let value = match request.uri().authority() {
        // Userinfo is no part of the host (`http://user@desk1/`).
        Some(authority) => authority.as_str().rsplit_once('@').map_or(authority.as_str(), |(_, host)| host),
        None => request.headers().get(http::header::HOST)?.to_str().ok()?.trim(),
    };
    let is_port = |p: &str| p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    let host = match value.strip_prefix('[') {
        Some(rest) => {
            let (v6, after) = rest.split_once(']')?;
            if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
                return None;
            }
            v6
        }
        None => match value.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') && is_port(port) => host,
            // An unbracketed IPv6 literal, or a port that is not one.
            Some(_) => return None,
            None => value,
        },
    };
    (!host.is_empty()).then(|| host_key(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_from_query() {
        assert_eq!(query_token(Some("a=1&token=x%2By&b=2")).as_deref(), Some("x+y"));
        assert_eq!(query_token(Some("a=1")), None);
        assert_eq!(query_token(None), None);
        // The spellings a proxy in front reads otherwise (nginx's $arg_token ignores case and
        // does not decode names) are refused; one exact name each is not.
        for q in [
            "token=a&token=b",
            "to%6Ben=b&token=a",
            "TOKEN=b&token=a",
            "Token=a",
            "access_token=a&access%5Ftoken=b",
            "a=1&tok%65n=x",
        ] {
            assert!(ambiguous_credential(Some(q)).is_some(), "{q}");
        }
        for q in [
            "token=a&access_token=b",
            "a=1&token=x%2By",
            "tokens=1&token=a&xtoken=2",
            "path=x%26token%3Db&token=a",
            "",
        ] {
            assert_eq!(ambiguous_credential(Some(q)), None, "{q}");
        }
        assert_eq!(ambiguous_credential(None), None);
    }

    #[test]
    fn host_names_match_without_case_or_port() {
        let host = |h: &str| host_of(&Request::builder().header("host", h).body(()).unwrap());
        assert_eq!(host("Desk1.Example:6080").as_deref(), Some("desk1.example"));
        assert_eq!(host("DESK1.example.").as_deref(), Some("desk1.example"));
        assert_eq!(host("desk1.example:").as_deref(), Some("desk1.example"));
        assert_eq!(host("[::1]:6080").as_deref(), Some("::1"));
        assert_eq!(host("[0:0::0:1]").as_deref(), Some("::1"));
        assert_eq!(host("[FE80::A]:1").as_deref(), Some("fe80::a"));
        assert_eq!(host("10.0.0.1:6080").as_deref(), Some("10.0.0.1"));
        for bad in ["::1", "a:b:c", "[::1]x", "host:port", "[::1]:123456", ""] {
            assert_eq!(host(bad), None, "{bad:?}");
        }
        // An absolute-form request: its URI's host, not the Host header's (RFC 9112 §3.2.2).
        let absolute = |uri: &str| host_of(&Request::builder().uri(uri).header("host", "other").body(()).unwrap());
        assert_eq!(absolute("http://Desk1.Example:6080/websockify").as_deref(), Some("desk1.example"));
        assert_eq!(absolute("http://user@desk2/").as_deref(), Some("desk2"));
        assert_eq!(absolute("http://[::1]:6080/").as_deref(), Some("::1"));
        assert_eq!(absolute("/websockify").as_deref(), Some("other"));
    }

    /// noVNC's `path` without its `?token=…` (a drop-in review: logged as "no route for path
    /// /websockify", which sent the user looking at the path): where tokens come from the query,
    /// a request with none says so; where nothing takes tokens, the path is the miss.
    #[tokio::test]
    async fn a_missing_query_token_is_said_as_such() {
        let mut config = Config::new("test");
        let options = config.default_route_options();
        config.routes.push(crate::config::RouteConfig {
            matcher: Matcher::Path("/vnc".into()),
            target: "127.0.0.1:1".parse().unwrap(),
            options: options.clone(),
        });
        let request = |uri: &str| Request::builder().uri(uri).body(()).unwrap();
        let paths = RouteTable::from_config(&config, None).unwrap();
        let miss = paths.lookup(&request("/websockify")).await.unwrap_err();
        assert_eq!(miss.to_string(), "no route for path /websockify");
        config.routes.push(crate::config::RouteConfig {
            matcher: Matcher::Token("desk1".into()),
            target: "127.0.0.1:2".parse().unwrap(),
            options,
        });
        let tokens = RouteTable::from_config(&config, None).unwrap();
        for uri in ["/websockify", "/websockify?path=x"] {
            let miss = tokens.lookup(&request(uri)).await.unwrap_err();
            assert!(matches!(miss, Miss::NoToken(_)), "{uri}: {miss:?}");
            assert_eq!(
                miss.to_string(),
                "no route for path /websockify, and no token in its query (?token=…)"
            );
        }
        assert_eq!(tokens.lookup(&request("/vnc")).await.unwrap().name, "path /vnc");
    }

    #[tokio::test]
    async fn the_query_is_ignored_where_nothing_takes_tokens_from_it() {
        let mut config = Config::new("test");
        let options = config.default_route_options();
        config.routes.push(crate::config::RouteConfig {
            matcher: Matcher::AnyPath,
            target: "127.0.0.1:1".parse().unwrap(),
            options: options.clone(),
        });
        let request = Request::builder().uri("/websockify?token=abc").body(()).unwrap();
        let single = RouteTable::from_config(&config, None).unwrap();
        assert_eq!(single.lookup(&request).await.unwrap().name, "any path");
        // With a token route beside it, a token that is not known is a 404, not the fallback.
        config.routes.push(crate::config::RouteConfig {
            matcher: Matcher::Token("known".into()),
            target: "127.0.0.1:2".parse().unwrap(),
            options,
        });
        let with_tokens = RouteTable::from_config(&config, None).unwrap();
        assert!(matches!(with_tokens.lookup(&request).await, Err(Miss::Token(_))));
    }

    #[test]
    fn routes_with_equal_backend_tls_share_one_connector() {
        let mut config = Config::new("test");
        let mut options = config.default_route_options();
        options.backend_tls = Some(crate::tls::BackendTlsSettings {
            insecure_skip_verify: true,
            ..Default::default()
        });
        for path in ["/a", "/b"] {
            config.routes.push(crate::config::RouteConfig {
                matcher: Matcher::Path(path.into()),
                target: "127.0.0.1:1".parse().unwrap(),
                options: options.clone(),
            });
        }
        options.backend_tls.as_mut().unwrap().server_name = Some("other.example".into());
        config.routes.push(crate::config::RouteConfig {
            matcher: Matcher::Path("/c".into()),
            target: "127.0.0.1:1".parse().unwrap(),
            options,
        });
        let table = RouteTable::from_config(&config, None).unwrap();
        let connector = |p: &str| table.paths[p].backend_tls.as_ref().unwrap().connector.config().clone();
        assert!(Arc::ptr_eq(&connector("/a"), &connector("/b")));
        assert!(!Arc::ptr_eq(&connector("/a"), &connector("/c")));
    }

    #[test]
    fn a_rebuilt_table_keeps_counting_the_sessions_of_routes_still_configured() {
        let mut config = Config::new("test");
        let mut options = config.default_route_options();
        options.max_sessions = Some(1);
        for matcher in [Matcher::Path("/kept".into()), Matcher::Path("/dropped".into())] {
            config.routes.push(crate::config::RouteConfig {
                matcher,
                target: "127.0.0.1:1".parse().unwrap(),
                options: options.clone(),
            });
        }
        let old = RouteTable::from_config(&config, None).unwrap();
        let _kept = old.paths["/kept"].try_enter().unwrap();
        let _dropped = old.paths["/dropped"].try_enter().unwrap();
        // The reloaded file renames /dropped to /new: a new route, with its own count.
        config.routes[1].matcher = Matcher::Path("/new".into());
        let new = RouteTable::from_config(&config, Some(&old)).unwrap();
        assert!(new.paths["/kept"].try_enter().is_none(), "the live session still counts");
        assert!(new.paths["/new"].try_enter().is_some());
    }

    #[tokio::test]
    async fn a_token_source_keeps_its_count_across_a_rebuild() {
        let file = std::env::temp_dir().join(format!("wsbridge-route-tokens-{}", std::process::id()));
        std::fs::write(&file, "a: 127.0.0.1:1\n").unwrap();
        let mut config = Config::new("test");
        let mut options = config.default_route_options();
        options.max_sessions = Some(1);
        for lookup in [TokenLookup::Query, TokenLookup::Host] {
            config.token_sources.push(crate::config::TokenSourceConfig {
                jwt: None,
                redis: None,
                api: None,
                path: file.clone(),
                lookup,
                format: crate::config::TokenFormat::Lines,
                options: options.clone(),
            });
        }
        let by_query = Request::builder().uri("/?token=a").body(()).unwrap();
        let by_host = Request::builder().uri("/").header("host", "a:6080").body(()).unwrap();
        let old = RouteTable::from_config(&config, None).unwrap();
        let _held = old.lookup(&by_query).await.unwrap().try_enter().unwrap();
        let new = RouteTable::from_config(&config, Some(&old)).unwrap();
        // The query source is still at its cap; the host source, same file, has its own count.
        assert!(new.lookup(&by_query).await.unwrap().try_enter().is_none());
        assert!(new.lookup(&by_host).await.unwrap().try_enter().is_some());
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn a_redis_source_keeps_its_client_across_a_rebuild_while_its_settings_stay() {
        let mut config = Config::new("test");
        let options = config.default_route_options();
        let mut settings = crate::config::redis::parse_websockify_source("127.0.0.1:1").unwrap();
        settings.allow_targets = None;
        config.token_sources.push(crate::config::TokenSourceConfig {
            path: settings.name().into(),
            jwt: None,
            redis: Some(settings),
            api: None,
            lookup: TokenLookup::Query,
            format: crate::config::TokenFormat::Lines,
            options,
        });
        let old = RouteTable::from_config(&config, None).unwrap();
        assert!(old.takes_query_tokens());
        let same = RouteTable::from_config(&config, Some(&old)).unwrap();
        assert!(Arc::ptr_eq(&old.redis_sources[0].0.tokens, &same.redis_sources[0].0.tokens));
        // Another key prefix is another source: a client of its own.
        config.token_sources[0].redis.as_mut().unwrap().key_prefix = "ns:".into();
        let other = RouteTable::from_config(&config, Some(&same)).unwrap();
        assert!(!Arc::ptr_eq(&same.redis_sources[0].0.tokens, &other.redis_sources[0].0.tokens));
    }
}
