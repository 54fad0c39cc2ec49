//! The proxy the system's settings give for a server, for an agent given none of its own (no
//! `proxy` option, no `--proxy`, no HTTPS_PROXY / HTTP_PROXY): on Windows, the settings WinHTTP
//! clients follow, read when the agent starts (its configuration is loaded), and again for a
//! connection whose attempt failed or was lost, before it retries ([`Rereads`]): a laptop that
//! moves between the office's proxy and home's direct route, or a PAC script IT changed, is
//! followed without a restart.
//!
//! For each server, the first of these that names an HTTP proxy for it wins:
//!
//! 1. The Internet Options of the user the agent runs as (`WinHttpGetIEProxyConfigForCurrentUser`).
//!    With "automatically detect settings" (WPAD) or an automatic configuration script (PAC),
//!    WinHTTP is asked for the server's URL (`WinHttpGetProxyForUrl`), and a script's DIRECT
//!    means direct; when that finds nothing, the manual proxy, unless its bypass list names the
//!    server (then direct).
//! 2. The machine's WinHTTP default (`netsh winhttp set proxy`, what a service usually relies
//!    on; `WinHttpGetDefaultProxyConfiguration`), with its bypass list.
//! 3. Otherwise: direct.
//!
//! A setting that names only a SOCKS proxy is passed over with a warning (the agent speaks
//! CONNECT only), and so is one whose entry is not an address. Whatever was passed over, and why
//! (WPAD found nothing, the script could not be fetched, …), is kept in [`WindowsChoice::notes`]
//! for the one start-up log line per server.
//!
//! Reading again is bounded as the start's read is (the same deadline, on a thread of its own:
//! [`windows_again`]), at most once per [`REREAD_EVERY`] per connection, and a read that did not
//! finish in time keeps the route the connection had ([`Rereads::judge`]).
//!
//! Reading WinHTTP is [`super::winhttp`]'s (the crate's only `unsafe`, Windows only); here are the
//! parts that are plain text and choices, so that they are tested on every platform: proxy lists
//! ([`pick`]), bypass lists ([`bypassed`]) and the order above ([`choose`]). [`windows`] runs
//! WinHTTP on a thread of its own under a deadline: a PAC or WPAD lookup can wait on the network.

use super::client::{Proxy, ServerUrl};

/// The user's Internet Options, as WinHTTP reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserSettings {
    /// "Automatically detect settings" (WPAD).
    pub auto_detect: bool,
    /// "Use automatic configuration script": the PAC file's URL.
    pub pac_url: Option<String>,
    /// "Use a proxy server": `host:port`, or a list per scheme (`http=p1:80;https=p2:8080`).
    pub proxy: Option<String>,
    /// Its exceptions: host patterns separated by `;`, `*` wildcards, `<local>`.
    pub bypass: Option<String>,
}

impl UserSettings {
    /// Whether WinHTTP is to be asked for each server's URL (a PAC script, or WPAD to find one).
    pub fn automatic(&self) -> bool {
        self.auto_detect || self.pac_url.is_some()
    }
}

/// A proxy named in the settings, with its bypass list (the machine's WinHTTP default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticSetting {
    /// `host:port`, or a list per scheme.
    pub proxy: String,
    /// Its exceptions, as in [`UserSettings::bypass`].
    pub bypass: Option<String>,
}

/// What WinHTTP answered for a server's URL, from the PAC script (or the one WPAD found).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutoAnswer {
    /// The script's proxies for the URL (a WinHTTP proxy list).
    Proxy(String),
    /// The script says DIRECT.
    Direct,
    /// No answer, and why (no script found, not fetched, no answer in time, …).
    Failed(String),
}

/// Everything read from Windows for one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// The user's Internet Options, or why they could not be read.
    pub user: Result<UserSettings, String>,
    /// WinHTTP's answer for the server's URL, when the user's settings are automatic.
    pub auto: Option<AutoAnswer>,
    /// The machine's WinHTTP default proxy (`None`: direct), or why it could not be read.
    pub machine: Result<Option<StaticSetting>, String>,
    /// Whether part of it did not come in time (the deadline, or WinHTTP's own timeout): what
    /// the settings say could not be told, as opposed to an answer such as "no script found".
    pub late: bool,
}

/// The Windows setting a server's proxy (or its direct connection) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowsSetting {
    /// The user's manual proxy.
    InternetOptions,
    /// The machine's (`netsh winhttp set proxy`).
    WinHttpDefault,
    /// The user's automatic configuration script, at this URL.
    Pac(String),
    /// The script that automatic detection found.
    Wpad,
}

/// `url` for the log: without a query or fragment, and without `user:pass@`.
fn shown_url(url: &str) -> String {
    let bare = url.split(['?', '#']).next().unwrap_or(url);
    match bare.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => bare.to_owned(),
    }
}

impl std::fmt::Display for WindowsSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WindowsSetting::InternetOptions => f.write_str("Internet Options"),
            WindowsSetting::WinHttpDefault => f.write_str("WinHTTP default"),
            // Without its query or credentials (a token in a PAC URL must not reach the log).
            WindowsSetting::Pac(url) => write!(f, "PAC {}", shown_url(url)),
            WindowsSetting::Wpad => f.write_str("WPAD"),
        }
    }
}

/// Which Windows setting decided a server's route, and what was passed over on the way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WindowsChoice {
    /// The setting that decided; `None`: none named a proxy for the server (direct).
    pub setting: Option<WindowsSetting>,
    /// What was passed over or why the route is direct, in the order the settings were read.
    pub notes: Vec<String>,
    /// Whether a setting names a proxy the agent cannot use (only SOCKS, not an address): then
    /// the start-up line is a warning.
    pub warning: bool,
    /// Whether the reading it comes from was late ([`Reading::late`]): read again, it does not
    /// replace a connection's route at once ([`Rereads::judge`]).
    pub late: bool,
    /// Whether the user's settings were read at all: a reading without them (its thread hung or
    /// could not start) says nothing of the route, however often it comes.
    pub informed: bool,
}

impl std::fmt::Display for WindowsChoice {
    /// `Windows settings (Internet Options)`, then each note after a `; `.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.setting {
            Some(s) => write!(f, "Windows settings ({s})")?,
            None => f.write_str("Windows settings (none)")?,
        }
        for note in &self.notes {
            write!(f, "; {note}")?;
        }
        Ok(())
    }
}

/// What a WinHTTP proxy list holds for one kind of URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listed {
    /// The proxy to reach it through.
    Proxy(Proxy),
    /// Only SOCKS proxies, which the agent cannot use.
    SocksOnly,
    /// Nothing for this scheme.
    Nothing,
    /// The entry for it is not an HTTP proxy's address (why).
    Invalid(String),
}

/// The proxy a WinHTTP proxy list gives for a `wss://` (`tls`) or `ws://` server: the list's
/// `https=` entry or `http=` entry, else its entry without a scheme (`host:port`, which is for
/// every scheme); the first of each counts. Entries are separated by `;` or white space; `socks=`
/// entries (and `socks://…` ones) are passed over; a missing port is 80.
pub fn pick(list: &str, tls: bool) -> Listed {
    let want = if tls { "https" } else { "http" };
    let mut for_scheme = None;
    let mut for_all = None;
    let mut socks = false;
    for entry in list.split(|c: char| c == ';' || c.is_whitespace()).filter(|e| !e.is_empty()) {
        match entry.split_once('=') {
            Some((scheme, value)) => {
                let scheme = scheme.to_ascii_lowercase();
                if scheme.starts_with("socks") {
                    socks = true;
                } else if scheme == want && for_scheme.is_none() {
                    for_scheme = Some(value);
                }
            }
            None if entry.to_ascii_lowercase().starts_with("socks") && entry.contains("://") => socks = true,
            None => {
                for_all.get_or_insert(entry);
            }
        }
    }
    match for_scheme.or(for_all) {
        // `[http://]host[:port]`, the host a name or an IP address (checked by the parse).
        Some(entry) => match entry.parse::<Proxy>() {
            Ok(p) => Listed::Proxy(p),
            Err(e) => Listed::Invalid(e),
        },
        None if socks => Listed::SocksOnly,
        None => Listed::Nothing,
    }
}

/// Whether a WinHTTP bypass list names the server. Entries are separated by `;` (or white space
/// or commas). An entry is a host pattern where `*` stands for any characters (`*.corp.example`,
/// `10.*`, `[fe80::*]`), compared without regard to case, optionally with a scheme in front
/// (`https://…`, for `wss://` servers only; `http://…` for `ws://`) and a port after it (`:8443`,
/// then only that port). `<local>` names host names without a dot (not IP addresses). Entries
/// that are not patterns match nothing.
pub fn bypassed(list: &str, server: &ServerUrl) -> bool {
    list.split(|c: char| c == ';' || c == ',' || c.is_whitespace())
        .filter(|e| !e.is_empty())
        .any(|e| entry_matches(e, server))
}

fn entry_matches(entry: &str, server: &ServerUrl) -> bool {
    let host = server.host.trim_end_matches('.');
    if entry.eq_ignore_ascii_case("<local>") {
        return !host.contains('.') && !host.contains(':');
    }
    let rest = match entry.split_once("://") {
        Some((scheme, rest)) => {
            let secure = match scheme.to_ascii_lowercase().as_str() {
                "https" | "wss" => true,
                "http" | "ws" => false,
                _ => return false,
            };
            if secure != server.tls {
                return false;
            }
            rest
        }
        None => entry,
    };
    let rest = rest.trim_end_matches('/');
    let (pattern, port) = if let Some(inside) = rest.strip_prefix('[') {
        // A bracketed IPv6 literal (or pattern), maybe with a port.
        let Some((addr, after)) = inside.split_once(']') else {
            return false;
        };
        match after {
            "" => (addr, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (addr, Some(port)),
                None => return false,
            },
        }
    } else {
        match rest.matches(':').count() {
            // host:port
            1 => rest.split_once(':').map_or((rest, None), |(h, p)| (h, Some(p))),
            // A host, or an IPv6 literal without brackets (which cannot have a port).
            _ => (rest, None),
        }
    };
    match port {
        None | Some("*") => {}
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p == server.port => {}
            _ => return false,
        },
    }
    let pattern = pattern.trim_end_matches('.');
    !pattern.is_empty() && wildcard_match(&pattern.to_ascii_lowercase(), &host.to_ascii_lowercase())
}

/// Whether `text` matches `pattern`, where `*` stands for any run of characters (also none).
fn wildcard_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut i, mut j) = (0, 0);
    // Where the last `*` was, and the text position it is tried up to.
    let mut star: Option<(usize, usize)> = None;
    while j < t.len() {
        if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && p[i] == t[j] {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            // Let the last `*` take one more character.
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == b'*')
}

/// The URL WinHTTP is asked about for a server: `https://` for `wss://`, `http://` for `ws://`
/// (WinHTTP knows only those, and PAC scripts are written for them; browsers ask the same way).
pub fn lookup_url(server: &ServerUrl) -> String {
    let scheme = if server.tls { "https" } else { "http" };
    format!("{scheme}://{}{}", server.authority(), server.path)
}

impl WindowsChoice {
    /// `setting`'s proxy list for `server` with its bypass list: `Some` when it decides (a proxy,
    /// or direct because the bypass list names the server), `None` (with a note) when it names
    /// nothing the agent can use for it.
    fn try_static(&mut self, server: &ServerUrl, setting: WindowsSetting, list: &str, bypass: Option<&str>) -> Option<Option<Proxy>> {
        match pick(list, server.tls) {
            Listed::Proxy(p) => {
                self.setting = Some(setting);
                if bypass.is_some_and(|b| bypassed(b, server)) {
                    self.notes.push(format!("its bypass list names {}", server.host));
                    return Some(None);
                }
                Some(Some(p))
            }
            unusable => {
                self.passed_over(&setting, &unusable, list, server.tls);
                None
            }
        }
    }

    /// Notes why `setting`'s `list` gave no proxy; a warning when it names one the agent cannot
    /// use.
    fn passed_over(&mut self, setting: &WindowsSetting, listed: &Listed, list: &str, tls: bool) {
        let note = match listed {
            Listed::Proxy(_) => return,
            Listed::SocksOnly => {
                self.warning = true;
                format!("{setting}: only a SOCKS proxy ({list}), which the agent cannot use (it needs an HTTP proxy with CONNECT)")
            }
            Listed::Nothing => format!("{setting}: no proxy for {} ({list})", if tls { "https" } else { "http" }),
            Listed::Invalid(e) => {
                self.warning = true;
                format!("{setting}: {e}")
            }
        };
        self.notes.push(note);
    }
}

/// The proxy for `server` from what was read of the Windows settings, in the order the module
/// documentation gives, with the setting that decided and the notes on the way.
pub fn choose(server: &ServerUrl, reading: &Reading) -> (Option<Proxy>, WindowsChoice) {
    let mut choice = WindowsChoice {
        late: reading.late,
        informed: reading.user.is_ok(),
        ..WindowsChoice::default()
    };
    match &reading.user {
        Err(e) => choice.notes.push(format!("Internet Options not read: {e}")),
        Ok(user) => {
            if user.automatic() {
                let setting = match &user.pac_url {
                    Some(url) => WindowsSetting::Pac(url.clone()),
                    None => WindowsSetting::Wpad,
                };
                match &reading.auto {
                    Some(AutoAnswer::Proxy(list)) => match pick(list, server.tls) {
                        Listed::Proxy(p) => {
                            choice.setting = Some(setting);
                            return (Some(p), choice);
                        }
                        unusable => choice.passed_over(&setting, &unusable, list, server.tls),
                    },
                    Some(AutoAnswer::Direct) => {
                        choice.setting = Some(setting);
                        choice.notes.push("the script says DIRECT".into());
                        return (None, choice);
                    }
                    Some(AutoAnswer::Failed(e)) => choice.notes.push(format!("{setting}: {e}")),
                    None => choice.notes.push(format!("{setting}: not asked")),
                }
            }
            if let Some(list) = &user.proxy {
                if let Some(decided) = choice.try_static(server, WindowsSetting::InternetOptions, list, user.bypass.as_deref()) {
                    return (decided, choice);
                }
                // A manual proxy per protocol with none for this one (`http=p:80` only, for a
                // wss:// server): Windows programs go directly, not to the machine's default.
                if matches!(pick(list, server.tls), Listed::Nothing) {
                    choice.setting = Some(WindowsSetting::InternetOptions);
                    return (None, choice);
                }
            }
        }
    }
    match &reading.machine {
        Err(e) => choice.notes.push(format!("WinHTTP default not read: {e}")),
        Ok(None) => {}
        Ok(Some(s)) => {
            if let Some(decided) = choice.try_static(server, WindowsSetting::WinHttpDefault, &s.proxy, s.bypass.as_deref()) {
                return (decided, choice);
            }
        }
    }
    (None, choice)
}

/// A connection reads the Windows settings again at most once per this (from the start of one
/// read to the next; the start's read counts). The backoff alone spaces attempts 7.5-30 s apart
/// once it has grown, but its first retries come within 1, 2, 4 s, and `retry_max` may be set
/// lower (the tests' 1 s): a PAC download or a WPAD lookup (DHCP, DNS) before each of those would
/// be traffic to IT's servers from every agent of a fleet whose server is down, for nothing. With
/// this floor a connection starts at most one lookup per 10 s (the longest one may take), and a
/// computer that moved still finds its new route at its first failure after it (the last read
/// is long past), or within 10 s of it when it moves during an outage.
pub const REREAD_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Late readings in a row that keep a connection's route ([`Rereads::judge`]); the one after
/// them is taken as it stands, as at start (a script's server that hangs counts as failed). A
/// timeout at the office is a hiccup; one that lasts has no answer to wait for: a laptop at home
/// whose PAC host name resolves to an office address that never answers would otherwise keep the
/// office's proxy for ever.
pub const LATE_READS_KEPT: u32 = 2;

/// What a connection's reading the Windows settings again means for its route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It was late, with fewer than [`LATE_READS_KEPT`] late ones right before it: the route
    /// stays.
    Late,
    /// The same route: the same proxy, or direct again (the setting that decided, or the notes,
    /// may differ).
    Same,
    /// Another proxy, or direct instead of a proxy, or the other way round.
    Changed,
}

/// A connection's reading of the Windows settings again, before its retries: when the next may
/// start, and how many late ones came in a row.
#[derive(Debug, Clone)]
pub struct Rereads {
    /// When the last read started (at first: when the connection started, just after the
    /// start's read).
    last: std::time::Instant,
    /// Late readings in a row.
    late: u32,
    /// Set while a read's WinHTTP thread still runs (it may outlive the read's deadline): no
    /// other starts meanwhile, so a WinHTTP that hangs through an outage holds one thread, not
    /// one per retry.
    busy: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Rereads {
    /// For a connection whose route was read from the settings just before `now`.
    pub fn new(now: std::time::Instant) -> Rereads {
        Rereads {
            last: now,
            late: 0,
            busy: std::sync::Arc::default(),
        }
    }

    /// Whether a read may start at `now`: [`REREAD_EVERY`] or more after the last one started,
    /// and the last one's thread has ended. If so, it counts as started.
    pub fn start(&mut self, now: std::time::Instant) -> bool {
        if now.saturating_duration_since(self.last) < REREAD_EVERY || self.busy.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        self.last = now;
        true
    }

    /// The flag a read's thread holds while it runs ([`windows_again`]).
    pub fn busy(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.busy.clone()
    }

    /// The connection's route worked (it connected): late readings count again from none.
    pub fn connected(&mut self) {
        self.late = 0;
    }

    /// What a reading that gives `proxy` (`None`: direct) with `choice` means for a connection
    /// that reaches its server through `was`: a late one keeps the route, unless the
    /// [`LATE_READS_KEPT`] before it were late too; a timely one decides.
    pub fn judge(&mut self, was: Option<&Proxy>, proxy: Option<&Proxy>, choice: &WindowsChoice) -> Verdict {
        if choice.late && !choice.informed {
            // Not even the settings came: nothing to go by, however often.
            return Verdict::Late;
        }
        if choice.late {
            self.late = self.late.saturating_add(1);
            if self.late <= LATE_READS_KEPT {
                return Verdict::Late;
            }
        } else {
            self.late = 0;
        }
        match was == proxy {
            true => Verdict::Same,
            false => Verdict::Changed,
        }
    }
}

/// The proxy the Windows settings give for `server` now ([`windows`] for one server), read on a
/// thread of its own so that the caller's runtime goes on: the answer comes within `wait` (at
/// most 10 s) on the receiver, which errs if no thread could be started. Dropping the receiver
/// leaves the thread to end by itself: nothing waits for it (a shutdown, the process's end).
#[cfg(windows)]
pub fn windows_again(
    server: &ServerUrl,
    wait: std::time::Duration,
    busy: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Option<tokio::sync::oneshot::Receiver<(Option<Proxy>, WindowsChoice)>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let servers = [server.clone()];
    busy.store(true, std::sync::atomic::Ordering::Release);
    let busy_too = busy.clone();
    // On failure the closure, and `tx` with it, is dropped: the receiver errs at once.
    let spawned = std::thread::Builder::new().name("windows-proxy-again".into()).spawn(move || {
        let wait = wait.min(MOST_WAIT);
        let readings = read_windows(&servers, wait, Some(Busy(busy_too)));
        if let Some(found) = readings.iter().zip(&servers).map(|(r, s)| choose(s, r)).next() {
            let _ = tx.send(found);
        }
    });
    if spawned.is_err() {
        busy.store(false, std::sync::atomic::Ordering::Release);
    }
    Some(rx)
}

/// Clears its flag when dropped: held by the thread that reads WinHTTP ([`Rereads::busy`]).
#[cfg(windows)]
struct Busy(std::sync::Arc<std::sync::atomic::AtomicBool>);

#[cfg(windows)]
impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Off Windows there are no Windows settings to read again (the environment's proxy variables
/// are the process's own, read at start).
#[cfg(not(windows))]
pub fn windows_again(
    _server: &ServerUrl,
    _wait: std::time::Duration,
    _busy: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Option<tokio::sync::oneshot::Receiver<(Option<Proxy>, WindowsChoice)>> {
    None
}

/// A WinHTTP error code in words, for the log (the ones asking for a proxy meets).
pub fn winhttp_error(code: u32) -> String {
    let what = match code {
        12002 => "timed out",
        12005 => "the URL is not valid",
        12006 => "the URL's scheme is not http or https",
        12007 => "the name could not be resolved",
        12015 => "the login to fetch the script failed",
        12029 => "cannot connect",
        12166 => "the proxy auto-config script failed",
        12167 => "the proxy auto-config script could not be downloaded",
        12178 => "the auto-proxy service failed",
        12180 => "no proxy auto-config script found",
        _ => return format!("error {code}"),
    };
    format!("{what} (error {code})")
}

/// The longest the agent's start waits for the Windows settings, whatever `connect_timeout`
/// says: the Service Control Manager gives a service 30 s to start, and the settings are read
/// before it is told the service runs. A connection's retry waits for a read again no longer
/// either.
#[cfg(windows)]
const MOST_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The Windows settings' proxy for each of `servers`, read on a thread of its own: the answers
/// that are not in within `wait` (at most [`MOST_WAIT`]; a PAC download or WPAD lookup that
/// hangs) count as failed, and the thread is left behind to end by itself. WinHTTP's own
/// timeouts, set to `wait` on the agent's session, bound its requests but not necessarily the
/// whole lookup (Wine downloads a PAC script on a session of its own, with its own 30 s
/// timeouts): the thread may outlive the deadline; it frees what it holds, and its results go
/// nowhere.
#[cfg(windows)]
pub fn windows(servers: &[ServerUrl], wait: std::time::Duration) -> Vec<(Option<Proxy>, WindowsChoice)> {
    let wait = wait.min(MOST_WAIT);
    read_windows(servers, wait, None)
        .iter()
        .zip(servers)
        .map(|(reading, server)| choose(server, reading))
        .collect()
}

/// What the WinHTTP thread reads, within `wait`; `busy`, if given, is held by that thread until
/// it ends (which may be after `wait`).
#[cfg(windows)]
fn read_windows(servers: &[ServerUrl], wait: std::time::Duration, busy: Option<Busy>) -> Vec<Reading> {
    use super::winhttp;
    use std::sync::mpsc::{sync_channel, RecvTimeoutError};

    enum Read {
        Settings(Result<UserSettings, String>, Result<Option<StaticSetting>, String>),
        /// A server's answer, and whether it is WinHTTP's timeout.
        Auto(usize, AutoAnswer, bool),
    }
    let mut readings = vec![
        Reading {
            user: Err("no answer".into()),
            auto: None,
            machine: Err("no answer".into()),
            late: false,
        };
        servers.len()
    ];
    // Room for everything the thread sends: it never waits on us, even once we stop listening.
    let deadline = std::time::Instant::now() + wait;
    let (tx, rx) = sync_channel(servers.len() + 1);
    let urls: Vec<String> = servers.iter().map(lookup_url).collect();
    let spawned = std::thread::Builder::new().name("windows-proxy".into()).spawn(move || {
        let _busy = busy;
        let user = winhttp::user_settings().map_err(winhttp_error);
        let machine = winhttp::default_setting().map_err(winhttp_error);
        let automatic = user.as_ref().ok().filter(|u| u.automatic()).cloned();
        if tx.send(Read::Settings(user, machine)).is_err() {
            return;
        }
        let Some(user) = automatic else { return };
        for (i, url) in urls.iter().enumerate() {
            let (answer, late) = match winhttp::proxy_for_url(url, user.auto_detect, user.pac_url.as_deref(), wait) {
                Ok(Some(list)) => (AutoAnswer::Proxy(list), false),
                Ok(None) => (AutoAnswer::Direct, false),
                // ERROR_WINHTTP_TIMEOUT: the script's server or WPAD's did not answer in time.
                Err(code) => (AutoAnswer::Failed(winhttp_error(code)), code == 12002),
            };
            if tx.send(Read::Auto(i, answer, late)).is_err() {
                return;
            }
        }
    });
    if let Err(e) = spawned {
        for r in &mut readings {
            r.user = Err(format!("no thread to read them on: {e}"));
            r.machine = Err(format!("no thread to read it on: {e}"));
            r.late = true;
        }
        return readings;
    }
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok(Read::Settings(user, machine)) => {
                for r in &mut readings {
                    r.user = user.clone();
                    r.machine = machine.clone();
                }
            }
            Ok(Read::Auto(i, answer, late)) => {
                readings[i].auto = Some(answer);
                readings[i].late |= late;
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                let late = format!("no answer within {wait:?}");
                for r in &mut readings {
                    match &r.user {
                        Ok(u) if u.automatic() && r.auto.is_none() => {
                            r.auto = Some(AutoAnswer::Failed(late.clone()));
                            r.late = true;
                        }
                        Ok(_) => {}
                        Err(_) => {
                            r.user = Err(late.clone());
                            r.machine = Err(late.clone());
                            r.late = true;
                        }
                    }
                }
                break;
            }
        }
    }
    readings
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn server(url: &str) -> ServerUrl {
        url.parse().unwrap()
    }

    fn proxy(list: &str, tls: bool) -> Option<String> {
        match pick(list, tls) {
            Listed::Proxy(p) => Some(format!("{}:{}", p.host, p.port)),
            _ => None,
        }
    }

    #[test]
    fn a_proxy_list_gives_the_entry_for_the_scheme_or_the_one_for_all() {
        // One proxy for every scheme, with or without a port or http://.
        assert_eq!(proxy("proxy.corp:8080", true).as_deref(), Some("proxy.corp:8080"));
        assert_eq!(proxy("proxy.corp:8080", false).as_deref(), Some("proxy.corp:8080"));
        assert_eq!(proxy("proxy.corp", true).as_deref(), Some("proxy.corp:80"));
        assert_eq!(proxy("http://proxy.corp:3128/", true).as_deref(), Some("proxy.corp:3128"));
        assert_eq!(proxy("  proxy.corp:8080 ", true).as_deref(), Some("proxy.corp:8080"));
        // Per scheme, as Internet Options writes it when each has its own.
        let list = "http=p1:80;https=p2:8080;ftp=p3:21;socks=p4:1080";
        assert_eq!(proxy(list, true).as_deref(), Some("p2:8080"));
        assert_eq!(proxy(list, false).as_deref(), Some("p1:80"));
        assert_eq!(proxy("HTTPS=P2:8080", true).as_deref(), Some("P2:8080"));
        // Separated by white space too; the first entry for a scheme counts.
        assert_eq!(proxy("https=a:1 https=b:2", true).as_deref(), Some("a:1"));
        // The scheme's own entry before the one for all, wherever they are.
        assert_eq!(proxy("all:3128;https=mine:8080", true).as_deref(), Some("mine:8080"));
        assert_eq!(proxy("all:3128;https=mine:8080", false).as_deref(), Some("all:3128"));
        // IPv6 literals.
        assert_eq!(proxy("https=[fd00::1]:8080", true).as_deref(), Some("fd00::1:8080"));
        assert_eq!(proxy("[::1]:3128", false).as_deref(), Some("::1:3128"));
        // A PAC answer: a list of proxies, the first counts.
        assert_eq!(proxy("p1:8080; p2:8080", true).as_deref(), Some("p1:8080"));
    }

    #[test]
    fn a_proxy_list_without_a_usable_entry_says_why() {
        assert_eq!(pick("http=p1:80", true), Listed::Nothing);
        assert_eq!(pick("", true), Listed::Nothing);
        assert_eq!(pick(" ; ;", false), Listed::Nothing);
        assert_eq!(pick("socks=p4:1080", true), Listed::SocksOnly);
        assert_eq!(pick("socks5://p4:1080", false), Listed::SocksOnly);
        assert_eq!(pick("http=p1:80;socks=p4:1080", true), Listed::SocksOnly);
        for garbage in [
            "https=",
            "https=:8080",
            "https=p:port",
            "https=p:0",
            "https=https://p:443",
            "https=p@@:1/x",
        ] {
            assert!(
                matches!(pick(garbage, true), Listed::Invalid(_)),
                "{garbage}: {:?}",
                pick(garbage, true)
            );
        }
        assert!(
            matches!(pick("ex ample:80", true), Listed::Proxy(_)),
            "white space separates entries"
        );
        assert!(matches!(pick("pr%xy:80", true), Listed::Invalid(_)));
    }

    #[test]
    fn bypass_patterns_match_hosts_with_wildcards_ports_and_local() {
        let s = server("wss://bridge.corp.example/agent");
        assert!(bypassed("bridge.corp.example", &s));
        assert!(bypassed("BRIDGE.Corp.Example", &s), "case");
        assert!(bypassed("*.corp.example", &s));
        assert!(bypassed("*.example", &s));
        assert!(bypassed("bridge.*", &s));
        assert!(bypassed("*corp*", &s));
        assert!(bypassed("*", &s));
        assert!(bypassed("other.example;*.corp.example", &s), "a later entry");
        assert!(bypassed("other.example, *.corp.example", &s), "commas and spaces");
        assert!(!bypassed("corp.example", &s), "a domain names itself, not its hosts");
        assert!(!bypassed("*.bridge.corp.example", &s));
        assert!(!bypassed("bridge.corp", &s));
        assert!(!bypassed("<local>", &s), "it has dots");
        assert!(!bypassed("", &s));
        // Ports and schemes.
        assert!(bypassed("bridge.corp.example:443", &s));
        assert!(bypassed("bridge.corp.example:*", &s));
        assert!(!bypassed("bridge.corp.example:8443", &s));
        assert!(!bypassed("bridge.corp.example:x", &s));
        assert!(bypassed("https://*.corp.example", &s));
        assert!(bypassed("wss://*.corp.example:443", &s));
        assert!(!bypassed("http://*.corp.example", &s), "for ws:// servers");
        assert!(!bypassed("ftp://*.corp.example", &s));
        assert!(bypassed(
            "http://bridge.corp.example",
            &server("ws://bridge.corp.example:6080/agent")
        ));
        // <local>: names without a dot.
        assert!(bypassed("<local>", &server("wss://bridge/agent")));
        assert!(bypassed("<LOCAL>;*.corp", &server("ws://bridge:6080/agent")));
        assert!(
            !bypassed("<local>", &server("ws://[::1]:6080/agent")),
            "an IPv6 address is not a local name"
        );
        assert!(!bypassed("<local>", &server("ws://127.0.0.1:6080/agent")));
    }

    #[test]
    fn bypass_patterns_match_addresses() {
        let v4 = server("ws://10.1.2.3:6080/agent");
        assert!(bypassed("10.*", &v4));
        assert!(bypassed("10.1.2.*:6080", &v4));
        assert!(bypassed("10.1.2.3", &v4));
        assert!(!bypassed("10.1.2.30", &v4));
        assert!(!bypassed("110.*", &v4));
        assert!(!bypassed("10.0.0.0/8", &v4), "not a pattern WinHTTP knows");
        let v6 = server("wss://[fd00::1:5]/agent");
        assert!(bypassed("[fd00::1:5]", &v6));
        assert!(bypassed("fd00::1:5", &v6), "without brackets (and so without a port)");
        assert!(bypassed("[FD00::*]:443", &v6));
        assert!(bypassed("fd00::*", &v6));
        assert!(!bypassed("[fd00::1:5]:8443", &v6));
        assert!(!bypassed("[fd00::1:5", &v6), "garbage");
        assert!(!bypassed("[fd00::1:5]x", &v6), "garbage");
        assert!(!bypassed("fd00::2", &v6));
    }

    #[test]
    fn wildcards_backtrack() {
        assert!(wildcard_match("a*b*c", "axxbyyc"));
        assert!(wildcard_match("a*b*c", "abbbc"));
        assert!(wildcard_match("*.a.b", "x.y.a.b"));
        assert!(!wildcard_match("*.a.b", "a.b"));
        assert!(!wildcard_match("a*b", "ac"));
        assert!(wildcard_match("**", ""));
        assert!(!wildcard_match("", "a"));
    }

    fn user(auto_detect: bool, pac: Option<&str>, proxy: Option<&str>, bypass: Option<&str>) -> Result<UserSettings, String> {
        Ok(UserSettings {
            auto_detect,
            pac_url: pac.map(str::to_owned),
            proxy: proxy.map(str::to_owned),
            bypass: bypass.map(str::to_owned),
        })
    }

    fn route(reading: &Reading, url: &str) -> (Option<String>, String) {
        let (p, choice) = choose(&server(url), reading);
        (p.map(|p| format!("{}:{}", p.host, p.port)), choice.to_string())
    }

    #[test]
    fn the_users_manual_proxy_with_its_bypass_list() {
        let reading = Reading {
            user: user(false, None, Some("http=p1:80;https=p2:8080"), Some("<local>;*.corp")),
            auto: None,
            machine: Ok(Some(StaticSetting {
                proxy: "machine:3128".into(),
                bypass: None,
            })),
            late: false,
        };
        let (p, says) = route(&reading, "wss://bridge.example.com/agent");
        assert_eq!(
            (p.as_deref(), says.as_str()),
            (Some("p2:8080"), "Windows settings (Internet Options)")
        );
        let (p, _) = route(&reading, "ws://bridge.example.com/agent");
        assert_eq!(p.as_deref(), Some("p1:80"));
        let (p, says) = route(&reading, "wss://bridge.corp/agent");
        assert_eq!(
            (p, says.as_str()),
            (None, "Windows settings (Internet Options); its bypass list names bridge.corp")
        );
    }

    #[test]
    fn pac_and_wpad_answers_come_first_and_fall_back_to_the_manual_proxy() {
        let pac = "http://wpad.corp/proxy.pac";
        let mut reading = Reading {
            user: user(true, Some(pac), Some("manual:8080"), Some("*.corp")),
            auto: Some(AutoAnswer::Proxy("scripted:3128".into())),
            machine: Ok(None),
            late: false,
        };
        let (p, says) = route(&reading, "wss://bridge.corp/agent");
        // The bypass list is the manual proxy's, not the script's.
        assert_eq!(
            (p.as_deref(), says.as_str()),
            (Some("scripted:3128"), "Windows settings (PAC http://wpad.corp/proxy.pac)")
        );
        reading.auto = Some(AutoAnswer::Direct);
        let (p, says) = route(&reading, "wss://bridge.example.com/agent");
        assert_eq!(
            (p, says.as_str()),
            (None, "Windows settings (PAC http://wpad.corp/proxy.pac); the script says DIRECT")
        );
        reading.auto = Some(AutoAnswer::Failed(winhttp_error(12167)));
        let (p, says) = route(&reading, "wss://bridge.example.com/agent");
        assert_eq!(p.as_deref(), Some("manual:8080"));
        assert_eq!(
            says,
            "Windows settings (Internet Options); PAC http://wpad.corp/proxy.pac: the proxy auto-config script could not be downloaded (error 12167)"
        );
        reading.user = user(true, None, None, None);
        reading.auto = Some(AutoAnswer::Failed(winhttp_error(12180)));
        let (p, says) = route(&reading, "wss://bridge.example.com/agent");
        assert_eq!(
            (p, says.as_str()),
            (
                None,
                "Windows settings (none); WPAD: no proxy auto-config script found (error 12180)"
            )
        );
        reading.auto = Some(AutoAnswer::Proxy("socks=s:1080".into()));
        let (p, choice) = choose(&server("wss://bridge.example.com/agent"), &reading);
        assert!(p.is_none() && choice.warning, "{choice}");
    }

    #[test]
    fn the_machines_default_when_the_user_has_nothing_usable() {
        let machine = Ok(Some(StaticSetting {
            proxy: "machine:3128".into(),
            bypass: Some("*.internal".into()),
        }));
        // A service's account: automatic detection on (the default), and it finds nothing.
        let reading = Reading {
            user: user(true, None, None, None),
            auto: Some(AutoAnswer::Failed(winhttp_error(12180))),
            machine: machine.clone(),
            late: false,
        };
        let (p, says) = route(&reading, "wss://bridge.example.com/agent");
        assert_eq!(p.as_deref(), Some("machine:3128"));
        assert_eq!(
            says,
            "Windows settings (WinHTTP default); WPAD: no proxy auto-config script found (error 12180)"
        );
        let (p, says) = route(&reading, "wss://bridge.internal/agent");
        assert_eq!(p, None);
        assert!(says.ends_with("; its bypass list names bridge.internal"), "{says}");
        // The user's setting names only SOCKS: passed over, with a warning.
        let reading = Reading {
            user: user(false, None, Some("socks=s:1080"), None),
            auto: None,
            machine: machine.clone(),
            late: false,
        };
        let (p, choice) = choose(&server("wss://bridge.example.com/agent"), &reading);
        assert_eq!(p.map(|p| p.host), Some("machine".into()));
        assert!(choice.warning);
        assert!(
            choice.to_string().contains("Internet Options: only a SOCKS proxy (socks=s:1080)"),
            "{choice}"
        );
        // Neither could be read: direct, saying why.
        let reading = Reading {
            user: Err(winhttp_error(5)),
            auto: None,
            machine: Err("no answer within 10s".into()),
            late: false,
        };
        let (p, says) = route(&reading, "wss://bridge.example.com/agent");
        assert_eq!(p, None);
        assert_eq!(
            says,
            "Windows settings (none); Internet Options not read: error 5; WinHTTP default not read: no answer within 10s"
        );
        // Nothing set anywhere.
        let reading = Reading {
            user: user(false, None, None, None),
            auto: None,
            machine: Ok(None),
            late: false,
        };
        assert_eq!(route(&reading, "wss://b/agent"), (None, "Windows settings (none)".into()));
        // A manual proxy for http only: a wss:// server goes directly, as Windows programs
        // do, not to the machine's default.
        let reading = Reading {
            user: user(false, None, Some("http=p1:80"), None),
            auto: None,
            machine,
            late: false,
        };
        let (p, says) = route(&reading, "wss://bridge.example.com/agent");
        assert_eq!(p, None);
        assert!(says.starts_with("Windows settings (Internet Options)"), "{says}");
        assert_eq!(route(&reading, "ws://bridge.example.com/agent").0.as_deref(), Some("p1:80"));
    }

    /// A PAC URL in the log: no query, fragment or credentials.
    #[test]
    fn a_pac_url_is_logged_without_its_secrets() {
        let shown = |u: &str| WindowsSetting::Pac(u.into()).to_string();
        assert_eq!(shown("http://u:p@pac.corp/proxy.pac?token=abc#x"), "PAC http://pac.corp/proxy.pac");
        assert_eq!(shown("http://pac.corp:8080/p.pac"), "PAC http://pac.corp:8080/p.pac");
        assert_eq!(shown("https://u@pac.corp"), "PAC https://pac.corp");
        assert_eq!(shown("file://C:/x.pac?a"), "PAC file://C:/x.pac");
    }

    #[test]
    fn the_settings_are_read_again_at_most_every_ten_seconds() {
        let t0 = std::time::Instant::now();
        let mut r = Rereads::new(t0);
        // The start's read counts: a failure right after it reads nothing again.
        assert!(!r.start(t0 + Duration::from_millis(300)));
        assert!(!r.start(t0 + Duration::from_millis(9_999)));
        assert!(r.start(t0 + REREAD_EVERY));
        // From that read's start on.
        assert!(!r.start(t0 + REREAD_EVERY + Duration::from_secs(1)));
        assert!(!r.start(t0 + REREAD_EVERY * 2 - Duration::from_millis(1)));
        assert!(r.start(t0 + REREAD_EVERY * 2 + Duration::from_secs(25)));
        // A clock that went backwards (an instant from before) starts nothing.
        assert!(!r.start(t0));
    }

    fn proxy_at(s: &str) -> Proxy {
        s.parse().unwrap()
    }

    /// A choice from a reading whose settings came (late or not).
    fn read_as(setting: Option<WindowsSetting>, late: bool) -> WindowsChoice {
        WindowsChoice {
            setting,
            late,
            informed: true,
            ..WindowsChoice::default()
        }
    }

    /// A reading in which not even the settings came (WinHTTP's thread hung or did not start)
    /// keeps the route however often it comes; a connection that connected starts the count of
    /// late readings again; a read whose thread still runs keeps the next from starting.
    #[test]
    fn a_reading_without_the_settings_never_changes_the_route() {
        let office = proxy_at("proxy.corp:8080");
        let nothing = WindowsChoice {
            late: true,
            ..WindowsChoice::default()
        };
        let reading = Reading {
            user: Err("no answer within 10s".into()),
            auto: None,
            machine: Err("no answer within 10s".into()),
            late: true,
        };
        let (proxy, chosen) = choose(&server("wss://bridge.example.com/agent"), &reading);
        assert!(proxy.is_none() && chosen.late && !chosen.informed, "{chosen:?}");
        let t0 = std::time::Instant::now();
        let mut r = Rereads::new(t0);
        for _ in 0..5 {
            assert_eq!(r.judge(Some(&office), None, &nothing), Verdict::Late);
        }
        let late = read_as(None, true);
        for _ in 0..LATE_READS_KEPT {
            assert_eq!(r.judge(Some(&office), None, &late), Verdict::Late);
        }
        r.connected();
        assert_eq!(r.judge(Some(&office), None, &late), Verdict::Late, "counted from none again");

        let later = t0 + REREAD_EVERY;
        r.busy().store(true, std::sync::atomic::Ordering::Release);
        assert!(!r.start(later), "the last read's thread still runs");
        r.busy().store(false, std::sync::atomic::Ordering::Release);
        assert!(r.start(later));
        assert!(!r.start(later + REREAD_EVERY / 2));
    }

    #[test]
    fn a_reading_again_changes_the_route_only_when_it_names_another() {
        let (office, other) = (proxy_at("proxy.corp:8080"), proxy_at("proxy2.corp:8080"));
        let manual = read_as(Some(WindowsSetting::InternetOptions), false);
        let mut r = Rereads::new(std::time::Instant::now());
        assert_eq!(r.judge(Some(&office), Some(&office), &manual), Verdict::Same);
        // Same proxy from another setting: the same route.
        let pac = read_as(Some(WindowsSetting::Pac("http://pac.corp/p.pac".into())), false);
        assert_eq!(r.judge(Some(&office), Some(&office), &pac), Verdict::Same);
        assert_eq!(r.judge(None, None, &read_as(None, false)), Verdict::Same);
        // Home: direct now; the office again; another proxy.
        assert_eq!(r.judge(Some(&office), None, &read_as(None, false)), Verdict::Changed);
        assert_eq!(r.judge(None, Some(&office), &manual), Verdict::Changed);
        assert_eq!(r.judge(Some(&office), Some(&other), &manual), Verdict::Changed);
        // The port counts.
        assert_eq!(
            r.judge(Some(&office), Some(&proxy_at("proxy.corp:3128")), &manual),
            Verdict::Changed
        );
    }

    #[test]
    fn a_late_reading_keeps_the_route_until_lateness_lasts() {
        let office = proxy_at("proxy.corp:8080");
        // The PAC script's server did not answer in time: the manual proxy's fallback says direct.
        let late = read_as(None, true);
        let timely = read_as(None, false);
        let mut r = Rereads::new(std::time::Instant::now());
        for _ in 0..LATE_READS_KEPT {
            assert_eq!(r.judge(Some(&office), None, &late), Verdict::Late);
        }
        // One more in a row: nothing to wait for, taken as at start.
        assert_eq!(r.judge(Some(&office), None, &late), Verdict::Changed);
        assert_eq!(r.judge(None, None, &late), Verdict::Same);
        // A timely reading starts the count again.
        assert_eq!(
            r.judge(None, Some(&office), &read_as(Some(WindowsSetting::Wpad), false)),
            Verdict::Changed
        );
        assert_eq!(r.judge(Some(&office), None, &late), Verdict::Late);
        assert_eq!(r.judge(Some(&office), None, &timely), Verdict::Changed);
        assert_eq!(r.judge(None, Some(&office), &read_as(None, true)), Verdict::Late);
        // A late reading that names the same route keeps it too (nothing to replace).
        assert_eq!(r.judge(Some(&office), Some(&office), &read_as(None, true)), Verdict::Late);
    }

    #[test]
    fn a_late_reading_says_so_in_its_choice() {
        let reading = Reading {
            user: user(true, Some("http://pac.corp/p.pac"), Some("manual:8080"), None),
            auto: Some(AutoAnswer::Failed("no answer within 10s".into())),
            machine: Ok(None),
            late: true,
        };
        let (p, choice) = choose(&server("wss://bridge.example.com/agent"), &reading);
        assert_eq!(p.map(|p| p.host).as_deref(), Some("manual"));
        assert!(choice.late);
        assert_eq!(
            choice.to_string(),
            "Windows settings (Internet Options); PAC http://pac.corp/p.pac: no answer within 10s"
        );
        let reading = Reading { late: false, ..reading };
        assert!(!choose(&server("wss://bridge.example.com/agent"), &reading).1.late);
    }

    #[test]
    fn winhttp_is_asked_about_http_urls() {
        assert_eq!(lookup_url(&server("wss://b.example:8443/agent")), "https://b.example:8443/agent");
        assert_eq!(lookup_url(&server("ws://[::1]:6080/agent?x=1")), "http://[::1]:6080/agent?x=1");
    }
}
