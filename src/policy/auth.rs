//! Authentication per route: bearer tokens, HTTP Basic (an htpasswd file of bcrypt hashes, or
//! websockify's single `user:pass`), and JWT.
//!
//! Where a credential comes from: the `Authorization` header (`Bearer …`, `Basic …`), the
//! `access_token` or `token` query parameter, or a `Sec-WebSocket-Protocol` entry `bearer.<token>`
//! (browsers cannot set headers on a WebSocket; this is how a page sends one). A failure answers
//! 401 with `WWW-Authenticate` where a browser or client can act on it, never says which part
//! was wrong, and never logs the secret. Token and htpasswd files are read again when they
//! change ([`super::reread`]): removing a line revokes it without a reload.
//!
//! Crates: `subtle` compares secrets in constant time; `bcrypt` verifies htpasswd hashes (on the
//! blocking pool: a cost-10 hash takes tens of milliseconds, which must not stall a runtime
//! thread's sessions), with successful checks remembered for a minute; `jsonwebtoken` verifies
//! JWTs (its pure-Rust crypto backend, so the Windows build needs no C toolchain).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap};
use http::StatusCode;
use subtle::ConstantTimeEq;

use super::reread::{Reread, Sourced};
use super::Refusal;

/// The SHA-256 of a secret: what is kept and compared, so secrets of different lengths compare
/// in the same time and the plain secret is not kept in memory longer than parsing takes.
type Digest = [u8; 32];

fn digest(secret: &[u8]) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, secret);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Whether `candidate` is among `known`, looking at every entry (no early exit).
fn contains(known: &[Digest], candidate: &Digest) -> bool {
    known
        .iter()
        .fold(subtle::Choice::from(0), |found, k| found | k.ct_eq(candidate))
        .into()
}

/// The credentials a request carries, as found (not yet checked).
#[derive(Default)]
pub struct Credentials {
    /// A bearer token (or JWT): header, query or subprotocol.
    pub bearer: Option<String>,
    /// A user and password from `Authorization: Basic`.
    pub basic: Option<(String, String)>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("bearer", &self.bearer.is_some())
            .field("basic_user", &self.basic.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// The prefix of a `Sec-WebSocket-Protocol` entry that carries a bearer token.
pub const BEARER_SUBPROTOCOL: &str = "bearer.";

impl Credentials {
    /// Finds the credentials in a request's headers and query; the query's `token` parameter
    /// counts only when `token_in_query` (where it does not pick a route), `access_token` always.
    pub fn of(headers: &HeaderMap, query: Option<&str>, token_in_query: bool) -> Credentials {
        let mut found = Credentials::default();
        for value in headers.get_all(header::AUTHORIZATION).iter().filter_map(|v| v.to_str().ok()) {
            let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
            if scheme.eq_ignore_ascii_case("bearer") && found.bearer.is_none() {
                found.bearer = Some(rest.trim().to_owned());
            } else if scheme.eq_ignore_ascii_case("basic") && found.basic.is_none() {
                found.basic = decode_basic(rest.trim());
            }
        }
        if found.bearer.is_none() {
            found.bearer = headers
                .get_all(header::SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .find_map(|p| p.strip_prefix(BEARER_SUBPROTOCOL))
                .map(str::to_owned);
        }
        if found.bearer.is_none() {
            if let Some(q) = query {
                let pairs: Vec<_> = form_urlencoded::parse(q.as_bytes()).collect();
                let names: &[&str] = if token_in_query {
                    &["access_token", "token"]
                } else {
                    &["access_token"]
                };
                found.bearer = names
                    .iter()
                    .find_map(|name| pairs.iter().find(|(k, _)| k == name))
                    .map(|(_, v)| v.clone().into_owned());
            }
        }
        found
    }
}

impl Credentials {
    /// Whether the request carries none.
    pub fn is_empty(&self) -> bool {
        self.bearer.is_none() && self.basic.is_none()
    }
}

fn decode_basic(b64: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

/// How a route authenticates its clients.
#[derive(Debug)]
pub enum Authenticator {
    /// One of a list of bearer tokens.
    Bearer(Sourced<BearerTokens>),
    /// HTTP Basic.
    Basic(Sourced<BasicUsers>),
    /// A JWT signed by a configured key.
    Jwt(super::jwt::JwtVerifier),
}

impl Authenticator {
    /// Checks a request's credentials. Blocking work (bcrypt) runs on the blocking pool.
    ///
    /// # Errors
    /// 401 with the same public text whatever was wrong; the detail names the reason for the
    /// log (never the secret).
    pub async fn check(&self, creds: &Credentials) -> Result<Authenticated, Refusal> {
        match self {
            Authenticator::Bearer(b) => b.get().await.check(creds.bearer.as_deref()),
            Authenticator::Basic(b) => b.get().await.check(creds.basic.as_ref()).await,
            Authenticator::Jwt(j) => j.check(creds.bearer.as_deref()).await,
        }
    }

    /// Brings a credentials file up to date now if it is due ([`super::reread::Reread::get`]),
    /// as a check would: a metrics scrape asks, so that an edit (or a broken file) is seen in
    /// the log and `reloads_total{kind="credentials"}` without waiting for a client.
    pub async fn refresh(&self) {
        match self {
            Authenticator::Bearer(b) => drop(b.get().await),
            Authenticator::Basic(b) => drop(b.get().await),
            Authenticator::Jwt(j) => j.refresh().await,
        }
    }

    /// The `WWW-Authenticate` challenge for a 401.
    pub fn challenge(&self) -> &'static str {
        match self {
            Authenticator::Basic(_) => "Basic realm=\"wsbridge\", charset=\"UTF-8\"",
            _ => "Bearer realm=\"wsbridge\"",
        }
    }

    /// For `wsbridge check`: what kind, and from where (no secret).
    pub fn describe(&self) -> String {
        match self {
            Authenticator::Bearer(b) => {
                let b = b.current();
                format!(
                    "bearer ({}{})",
                    crate::config::plural(b.tokens.len(), "token"),
                    b.from.as_ref().map(|p| format!(" from {}", p.display())).unwrap_or_default()
                )
            }
            Authenticator::Basic(b) => {
                let b = b.current();
                format!(
                    "basic ({} users{})",
                    b.users.len(),
                    b.from.as_ref().map(|p| format!(" from {}", p.display())).unwrap_or_default()
                )
            }
            Authenticator::Jwt(j) => j.describe(),
        }
    }
}

/// Who a request authenticated as, for the session's log line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Authenticated {
    /// The user (Basic), the JWT's `sub`, or nothing for an anonymous bearer token.
    pub subject: Option<String>,
    /// Claims that name a target (websockify's JWTTokenApi `host` and `port`).
    pub target: Option<(String, u16)>,
}

/// 401 with a text that does not say which part was wrong.
pub(crate) fn unauthorized(detail: impl Into<String>) -> Refusal {
    Refusal {
        status: StatusCode::UNAUTHORIZED,
        public: "authentication required",
        detail: detail.into(),
        retry_after: None,
    }
}

/// A list of bearer tokens, kept as digests.
#[derive(Debug)]
pub struct BearerTokens {
    tokens: Vec<Digest>,
    from: Option<PathBuf>,
}

impl BearerTokens {
    /// Tokens given inline.
    ///
    /// # Errors
    /// An empty token, or none.
    pub fn new(tokens: &[String]) -> Result<BearerTokens, String> {
        if tokens.iter().any(|t| t.trim().is_empty()) {
            return Err("a bearer token must not be empty".into());
        }
        if tokens.is_empty() {
            return Err("no bearer token".into());
        }
        Ok(BearerTokens {
            tokens: tokens.iter().map(|t| digest(t.trim().as_bytes())).collect(),
            from: None,
        })
    }

    /// Tokens given inline, in service.
    ///
    /// # Errors
    /// As [`BearerTokens::new`].
    pub fn inline(tokens: &[String]) -> Result<Sourced<BearerTokens>, String> {
        Ok(Sourced::Inline(Arc::new(BearerTokens::new(tokens)?)))
    }

    /// Tokens from a file, in service: read again when it changes ([`Reread`]).
    ///
    /// # Errors
    /// As [`BearerTokens::from_file`].
    pub fn watched(path: &Path) -> Result<Sourced<BearerTokens>, String> {
        let from = path.to_path_buf();
        let none = move || BearerTokens {
            tokens: Vec::new(),
            from: Some(from.clone()),
        };
        Ok(Sourced::File(Reread::load(
            path,
            "bearer token file",
            BearerTokens::from_file,
            none,
        )?))
    }

    /// Tokens from a file, one per line (`#` comments and blank lines skipped). A file with no
    /// token is how an operator revokes the last one: every request is refused (a warning says
    /// so), not an error that would keep the revoked token in force.
    ///
    /// # Errors
    /// The file cannot be read.
    pub fn from_file(path: &Path) -> Result<BearerTokens, String> {
        let text = crate::platform::read_text(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let tokens: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect();
        if tokens.is_empty() {
            tracing::warn!(file = %path.display(), "bearer token file holds no token: every request it guards is refused");
            return Ok(BearerTokens {
                tokens: Vec::new(),
                from: Some(path.to_path_buf()),
            });
        }
        let mut b = BearerTokens::new(&tokens).map_err(|e| format!("{}: {e}", path.display()))?;
        b.from = Some(path.to_path_buf());
        Ok(b)
    }

    fn check(&self, bearer: Option<&str>) -> Result<Authenticated, Refusal> {
        let Some(token) = bearer else {
            return Err(unauthorized("no bearer token"));
        };
        if contains(&self.tokens, &digest(token.as_bytes())) {
            Ok(Authenticated::default())
        } else {
            Err(unauthorized("bearer token not valid"))
        }
    }
}

/// HTTP Basic users: bcrypt hashes from an htpasswd file, or websockify's plain `user:pass`.
#[derive(Debug)]
pub struct BasicUsers {
    users: HashMap<String, Password>,
    /// What an unknown user's password is checked against: the same work as a known user's (a
    /// bcrypt hash at the cost of one of the file's users, or a digest), so that the answer's
    /// time does not tell which users exist. One per user; an unknown name always gets the same
    /// one, chosen by a keyed hash of the name, so that with users of several costs an unknown
    /// name answers in the time of one of them, every time. Never a match: the user is unknown.
    unknown: Vec<Password>,
    /// Keys the choice of an unknown name's stand-in.
    choose: std::collections::hash_map::RandomState,
    from: Option<PathBuf>,
    /// Checks that passed recently, by digest of user and password: a client that reconnects
    /// (noVNC does, often) is not charged a bcrypt hash each time. Bounded; cleared when full.
    verified: Mutex<HashMap<Digest, Instant>>,
}

#[derive(Debug)]
enum Password {
    Bcrypt(String),
    Plain(Digest),
}

/// bcrypt checks that may run at once, over the whole process.
static BCRYPT: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// How long a passed bcrypt check is remembered.
const VERIFIED_FOR: Duration = Duration::from_secs(60);
/// The most remembered checks.
const VERIFIED_MAX: usize = 4096;

impl BasicUsers {
    /// websockify's `BasicHTTPAuth` source: `user:pass`.
    ///
    /// # Errors
    /// No colon, or an empty user.
    pub fn single(user_pass: &str) -> Result<BasicUsers, String> {
        let (user, pass) = user_pass
            .split_once(':')
            .filter(|(u, _)| !u.is_empty())
            .ok_or("expected USER:PASSWORD")?;
        Ok(BasicUsers {
            users: HashMap::from([(user.to_owned(), Password::Plain(digest(pass.as_bytes())))]),
            unknown: vec![Password::Plain(digest(b""))],
            choose: Default::default(),
            from: None,
            verified: Mutex::default(),
        })
    }

    /// websockify's `BasicHTTPAuth` source, in service.
    ///
    /// # Errors
    /// As [`BasicUsers::single`].
    pub fn inline(user_pass: &str) -> Result<Sourced<BasicUsers>, String> {
        Ok(Sourced::Inline(Arc::new(BasicUsers::single(user_pass)?)))
    }

    /// An htpasswd file, in service: read again when it changes ([`Reread`]); while it is gone,
    /// no user.
    ///
    /// # Errors
    /// As [`BasicUsers::htpasswd`].
    pub fn watched(path: &Path) -> Result<Sourced<BasicUsers>, String> {
        let from = path.to_path_buf();
        let none = move || BasicUsers {
            users: HashMap::new(),
            unknown: Vec::new(),
            choose: Default::default(),
            from: Some(from.clone()),
            verified: Mutex::default(),
        };
        Ok(Sourced::File(Reread::load(path, "htpasswd file", BasicUsers::htpasswd, none)?))
    }

    /// An htpasswd file of bcrypt hashes (`htpasswd -B`): `user:$2y$…` lines; one with no
    /// user (the last one revoked) refuses every request.
    ///
    /// # Errors
    /// The file cannot be read, or a line is not `user:bcrypt-hash` (named with its number;
    /// other htpasswd hash kinds, MD5 `$apr1$`, SHA-1 `{SHA}` and crypt, are weak and refused).
    pub fn htpasswd(path: &Path) -> Result<BasicUsers, String> {
        let text = crate::platform::read_text(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = || format!("{}:{}", path.display(), i + 1);
            let (user, hash) = line.split_once(':').ok_or_else(|| format!("{}: expected USER:HASH", at()))?;
            let cost = hash.get(4..6).and_then(|c| c.parse::<u32>().ok());
            if !(hash.starts_with("$2y$") || hash.starts_with("$2b$") || hash.starts_with("$2a$")) {
                return Err(format!(
                    "{}: user {user:?} does not have a bcrypt hash (make it with `htpasswd -B`); MD5, SHA-1 and crypt hashes are refused",
                    at()
                ));
            }
            // A hash bcrypt cannot check (a cost outside 4-31, cut short) is a mistake in the
            // file, not a user who can never log in; and it would leave the stand-in for unknown
            // users unmade.
            if !cost.is_some_and(|c| (4..=31).contains(&c)) || hash.len() != 60 {
                return Err(format!(
                    "{}: user {user:?}: not a bcrypt hash (`$2y$COST$` and 53 more characters)",
                    at()
                ));
            }
            if users.insert(user.to_owned(), Password::Bcrypt(hash.to_owned())).is_some() {
                return Err(format!("{}: user {user:?} is listed twice", at()));
            }
        }
        if users.is_empty() {
            // The last user revoked: every request is refused, as for a file removed.
            tracing::warn!(file = %path.display(), "htpasswd file holds no user: every request it guards is refused");
        }
        // A stand-in at each user's cost (`$2y$12$…`: 12), for an unknown user's check.
        let unknown = users
            .values()
            .filter_map(|p| match p {
                Password::Bcrypt(h) => h.get(4..6)?.parse::<u32>().ok(),
                Password::Plain(_) => None,
            })
            .map(|cost| Password::Bcrypt(dummy_hash(cost)))
            .collect();
        Ok(BasicUsers {
            users,
            unknown,
            choose: Default::default(),
            from: Some(path.to_path_buf()),
            verified: Mutex::default(),
        })
    }

    async fn check(&self, basic: Option<&(String, String)>) -> Result<Authenticated, Refusal> {
        let Some((user, pass)) = basic else {
            return Err(unauthorized("no Basic credentials"));
        };
        // An unknown user's password is checked as a known one's would be (see `unknown`).
        let (password, known) = match self.users.get(user) {
            Some(p) => (p, true),
            None => {
                use std::hash::BuildHasher as _;
                let i = self.choose.hash_one(user) as usize % self.unknown.len().max(1);
                match self.unknown.get(i) {
                    Some(stand_in) => (stand_in, false),
                    None => return Err(unauthorized(format!("Basic credentials of user {:?} not valid", clip(user)))),
                }
            }
        };
        let ok = known
            & match password {
                Password::Plain(d) => bool::from(d.ct_eq(&digest(pass.as_bytes()))),
                Password::Bcrypt(hash) => {
                    let key = digest(format!("{user}\0{pass}").as_bytes());
                    let remembered = {
                        let v = self.verified.lock().unwrap_or_else(|p| p.into_inner());
                        v.get(&key).is_some_and(|at| at.elapsed() < VERIFIED_FOR)
                    };
                    if remembered {
                        true
                    } else {
                        let (hash, pass) = (hash.clone(), pass.clone());
                        // A few hashes at a time: each is tens of milliseconds of CPU, and a burst of
                        // logins must not take every core from the sessions.
                        let _permit = BCRYPT.acquire().await;
                        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(pass, &hash).unwrap_or(false))
                            .await
                            .unwrap_or(false);
                        if ok && known {
                            let mut v = self.verified.lock().unwrap_or_else(|p| p.into_inner());
                            if v.len() >= VERIFIED_MAX {
                                v.clear();
                            }
                            v.insert(key, Instant::now());
                        }
                        ok
                    }
                }
            };
        if ok {
            Ok(Authenticated {
                subject: Some(user.clone()),
                target: None,
            })
        } else {
            Err(unauthorized(format!("Basic credentials of user {:?} not valid", clip(user))))
        }
    }
}

/// A bcrypt hash of nothing useful at `cost`, checked for unknown users (made once per cost: a
/// file re-read does not pay for it again).
fn dummy_hash(cost: u32) -> String {
    static HASHES: Mutex<Vec<(u32, String)>> = Mutex::new(Vec::new());
    let mut hashes = HASHES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, h)) = hashes.iter().find(|(c, _)| *c == cost) {
        return h.clone();
    }
    let h = bcrypt::hash("wsbridge: an unknown user", cost).unwrap_or_default();
    hashes.push((cost, h.clone()));
    h
}

fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn credentials_come_from_header_subprotocol_or_query() {
        let c = Credentials::of(&headers(&[("authorization", "Bearer abc")]), None, true);
        assert_eq!(c.bearer.as_deref(), Some("abc"));
        let c = Credentials::of(&headers(&[("sec-websocket-protocol", "binary, bearer.xyz")]), None, true);
        assert_eq!(c.bearer.as_deref(), Some("xyz"));
        let c = Credentials::of(&HeaderMap::new(), Some("a=1&access_token=q%2B1"), true);
        assert_eq!(c.bearer.as_deref(), Some("q+1"));
        let c = Credentials::of(&headers(&[("authorization", "Basic YWxpY2U6czNjcjN0OmV4dHJh")]), None, true);
        assert_eq!(c.basic, Some(("alice".into(), "s3cr3t:extra".into())));
        assert!(format!("{c:?}").contains("alice") && !format!("{c:?}").contains("s3cr3t"));
    }

    #[tokio::test]
    async fn bearer_tokens() {
        let a = Authenticator::Bearer(BearerTokens::inline(&["t0k3n".into(), "other".into()]).unwrap());
        let with = |t: Option<&str>| Credentials {
            bearer: t.map(str::to_owned),
            basic: None,
        };
        assert!(a.check(&with(Some("t0k3n"))).await.is_ok());
        assert!(a.check(&with(Some("other"))).await.is_ok());
        for bad in [None, Some(""), Some("t0k3"), Some("t0k3n ")] {
            let r = a.check(&with(bad)).await.unwrap_err();
            assert_eq!((r.status, r.public), (StatusCode::UNAUTHORIZED, "authentication required"));
            assert!(!r.detail.contains("t0k3"), "{}", r.detail);
        }
        assert!(BearerTokens::new(&[" ".into()]).is_err());
    }

    #[tokio::test]
    async fn basic_against_htpasswd_and_a_single_user() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("htpasswd");
        let hash = bcrypt::hash("s3cr3t", 4).unwrap();
        std::fs::write(&file, format!("# users\nalice:{hash}\n")).unwrap();
        let a = Authenticator::Basic(BasicUsers::watched(&file).unwrap());
        let with = |u: &str, p: &str| Credentials {
            bearer: None,
            basic: Some((u.into(), p.into())),
        };
        assert_eq!(a.check(&with("alice", "s3cr3t")).await.unwrap().subject.as_deref(), Some("alice"));
        // Remembered: the second check does not hash again (and still passes).
        assert!(a.check(&with("alice", "s3cr3t")).await.is_ok());
        for (u, p) in [("alice", "wrong"), ("bob", "s3cr3t"), ("", "")] {
            let r = a.check(&with(u, p)).await.unwrap_err();
            assert_eq!(r.status, StatusCode::UNAUTHORIZED);
            assert!(!r.detail.contains("s3cr3t") && !r.detail.contains("wrong"), "{}", r.detail);
        }
        assert_eq!(a.challenge(), "Basic realm=\"wsbridge\", charset=\"UTF-8\"");
        std::fs::write(&file, "bob:$apr1$abc$def\n").unwrap();
        let e = BasicUsers::htpasswd(&file).unwrap_err();
        assert!(e.contains(":1:") && e.contains("htpasswd -B"), "{e}");
        let single = Authenticator::Basic(BasicUsers::inline("admin:pw").unwrap());
        assert!(single.check(&with("admin", "pw")).await.is_ok());
        assert!(single.check(&with("admin", "pw2")).await.is_err());
        // An unknown user with the password the single user's stand-in digest is of: refused.
        assert!(single.check(&with("nobody", "")).await.is_err());
    }

    /// A line removed from a bearer token file or an htpasswd file is refused within
    /// [`super::super::reread::RECHECK`], without a reload (an operations review: both were read
    /// only at start and by SIGHUP, so a leaked credential removed from its file stayed valid);
    /// a remembered Basic check does not outlive its user's line.
    #[tokio::test(start_paused = true)]
    async fn credentials_removed_from_their_file_are_refused_without_a_reload() {
        use super::super::reread::RECHECK;
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("bearer");
        std::fs::write(&tokens, "leaked\nkept\n").unwrap();
        let bearer = Authenticator::Bearer(BearerTokens::watched(&tokens).unwrap());
        let token = |t: &str| Credentials {
            bearer: Some(t.into()),
            basic: None,
        };
        assert!(bearer.check(&token("leaked")).await.is_ok());
        std::fs::write(&tokens, "kept\n").unwrap();
        tokio::time::advance(RECHECK).await;
        assert!(bearer.check(&token("leaked")).await.is_err(), "removed from the file");
        assert!(bearer.check(&token("kept")).await.is_ok());
        assert_eq!(bearer.describe(), format!("bearer (1 token from {})", tokens.display()));
        // The last one revoked, leaving a comment: nothing in force (a review: a file with no
        // token failed to parse and kept the revoked one).
        std::fs::write(&tokens, "# revoked\n").unwrap();
        tokio::time::advance(RECHECK).await;
        assert!(bearer.check(&token("kept")).await.is_err(), "the file holds no token");

        let file = dir.path().join("htpasswd");
        let (alice, bob) = (bcrypt::hash("a-pass", 4).unwrap(), bcrypt::hash("b-pass", 4).unwrap());
        std::fs::write(&file, format!("alice:{alice}\nbob:{bob}\n")).unwrap();
        let basic = Authenticator::Basic(BasicUsers::watched(&file).unwrap());
        let user = |u: &str, p: &str| Credentials {
            bearer: None,
            basic: Some((u.into(), p.into())),
        };
        assert!(basic.check(&user("alice", "a-pass")).await.is_ok());
        std::fs::write(&file, format!("bob:{bob}\n")).unwrap();
        tokio::time::advance(RECHECK).await;
        assert!(basic.check(&user("alice", "a-pass")).await.is_err(), "removed, though remembered");
        assert!(basic.check(&user("bob", "b-pass")).await.is_ok());
        std::fs::write(&file, "# nobody\n").unwrap();
        tokio::time::advance(RECHECK).await;
        assert!(basic.check(&user("bob", "b-pass")).await.is_err(), "the file holds no user");
        std::fs::write(&file, format!("bob:{bob}\n")).unwrap();
        tokio::time::advance(RECHECK).await;
        assert!(basic.check(&user("bob", "b-pass")).await.is_ok());
        std::fs::remove_file(&file).unwrap();
        tokio::time::advance(RECHECK).await;
        assert!(basic.check(&user("bob", "b-pass")).await.is_err(), "no user while the file is gone");
    }

    /// An unknown user's password is checked as a known user's would be, so the answer's time
    /// does not tell which users exist (an auth review measured 4.8 ms for an unknown user
    /// against 167 ms for a known one at cost 10: the stand-in hash was cost 5 whatever the
    /// file's; and a bcrypt for an unknown user beside the single user's plain digest): a bcrypt
    /// hash at the cost of one of the file's users (the same one for a name, every time: with
    /// users of several costs, a review found one stand-in at the highest told the others'
    /// users apart), or a digest for the command line's single user.
    #[test]
    fn unknown_users_cost_what_known_ones_do() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("htpasswd");
        let (low, high) = (bcrypt::hash("a", 4).unwrap(), bcrypt::hash("b", 6).unwrap());
        std::fs::write(&file, format!("alice:{low}\ncarol:{high}\n")).unwrap();
        let users = BasicUsers::htpasswd(&file).unwrap();
        // One stand-in per user, at that user's cost.
        let mut costs: Vec<&str> = users
            .unknown
            .iter()
            .map(|p| match p {
                Password::Bcrypt(h) => &h[..7],
                Password::Plain(_) => "plain",
            })
            .collect();
        costs.sort_unstable();
        assert_eq!(costs, ["$2b$04$", "$2b$06$"]);
        let single = BasicUsers::single("admin:pw").unwrap();
        assert!(matches!(single.unknown[..], [Password::Plain(_)]));
        // A hash bcrypt cannot check (cost 99, cut short) is refused at load: it made the
        // stand-in empty, an unknown user answered in no time (a review).
        for bad in [format!("$2y$99${}", "a".repeat(53)), "$2y$10$short".to_owned()] {
            std::fs::write(&file, format!("alice:{low}\ncarol:{bad}\n")).unwrap();
            let e = BasicUsers::htpasswd(&file).unwrap_err();
            assert!(e.contains(":2:") && e.contains("not a bcrypt hash"), "{e}");
        }
    }
}
