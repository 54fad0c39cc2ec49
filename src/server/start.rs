//! Starting a server the way the `wsbridge` binary does, for the binary and for embedders alike:
//! the open-file limit, runtime threads, one socket per listener for each thread (a unix socket,
//! or the sockets systemd passed, shared by the threads: [`bind_with`]), serving until the
//! bridge's shutdown token is cancelled, and reloading on request.
//!
//! ```no_run
//! # async fn f(mut config: wsbridge::config::Config) -> Result<(), Box<dyn std::error::Error>> {
//! use wsbridge::server::{start, Bridge};
//! let threads = start::available_threads();
//! let limit = start::raise_open_file_limit();
//! start::fit_open_file_limit(limit, &mut config, threads);
//! let bridge = Bridge::new(&config)?;
//! let bound = start::bind(&config, threads)?; // every port taken, or an error
//! println!("listening on {:?}", bound.addrs());
//! let drained = bound.serve(&bridge).await?; // until bridge.shutdown_token() is cancelled
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::path::Path;

use tokio::net::TcpListener;

use super::{Bridge, BridgeError, Drained, Listener, LINGERING_REFUSALS};
use crate::config::{Config, ListenOn};
use crate::tls::TlsError;

/// Why a server could not start or stopped with an error. [`StartError::is_config`] tells the
/// configuration's fault (the binary exits 64) from the machine's (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener's files (certificate, key, CA) cannot be used.
    #[error("listener {addr}: {source}")]
    Listener {
        /// The listener's configured address.
        addr: ListenOn,
        /// What is wrong with its files.
        #[source]
        source: TlsError,
    },
    /// The admin listener's TLS files (certificate, key, CA) cannot be used.
    #[error("admin listener {addr}: {source}")]
    Admin {
        /// The admin listener's configured address.
        addr: SocketAddr,
        /// What is wrong with its files.
        #[source]
        source: TlsError,
    },
    /// A port cannot be bound (in use, not local, no permission).
    #[error("cannot listen on {addr}")]
    Bind {
        /// The listener's configured address.
        addr: ListenOn,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
    /// The sockets systemd passed and the `systemd:NAME` listeners do not match.
    #[error("{0}")]
    Activation(String),
    /// The runtime or a socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A runtime thread panicked.
    #[error("a runtime thread panicked")]
    Panicked,
}

impl StartError {
    /// The configuration's fault (a file to fix), not the machine's.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            StartError::Listener { .. } | StartError::Admin { .. } | StartError::Activation(_)
        )
    }
}

/// A single-threaded runtime: each runtime thread runs sessions start to end with no cross-thread
/// wake-ups; more cores get more such threads (see [`bind`]). When it has served, end it with
/// `shutdown_background`, not a drop: a drop waits for every blocking-pool thread, and one may be
/// stuck in work nobody awaits any more (a static file that is a FIFO, a DNS lookup).
///
/// # Errors
/// The OS refuses what the runtime needs (an epoll descriptor, say).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// [`default_threads`] for the CPUs this process may run on.
pub fn available_threads() -> usize {
    if !crate::platform::PORT_SHARING {
        return 1;
    }
    default_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Runtime threads when `--threads` is not given, for `cpus` CPUs this process may run on (as
/// `available_parallelism` counts them: cores, affinity mask and cgroup quota): one per CPU,
/// except on one or two, where one. A bridge with so few CPUs usually shares them with its
/// backend (`wsbridge 6080 localhost:5900`), and on loopback the kernel delivers each segment on
/// the sender's thread: two runtime threads, the backend and the clients then contend for two
/// cores. On a 2-core machine one thread measured better than two on every row but TLS session
/// churn, which is handshake arithmetic and gains 3-11% from the second thread (BENCHMARKS.md,
/// "Runtime threads"); `--threads 2` gives that back. Three or more CPUs keep one thread each:
/// not measured here (the project's machine has two), and what scales where the bridge has the
/// cores to itself.
pub fn default_threads(cpus: usize) -> usize {
    if cpus <= 2 {
        1
    } else {
        cpus
    }
}

/// Descriptors kept aside from sessions besides each thread's own: stdio, token and certificate
/// files being read, the signal pipe, and one for each refusal past the cap that may linger.
const FD_RESERVE: u64 = 32 + LINGERING_REFUSALS as u64;

/// Raises the soft limit on open files to the hard limit and returns the limit in force. Shells
/// and systemd start most services with a soft limit of 1,024, which would stop wsbridge near 500
/// sessions (a session holds two descriptors) however high the hard limit is.
#[cfg(unix)]
pub fn raise_open_file_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let before = getrlimit(Resource::Nofile);
    let current = before.current.unwrap_or(u64::MAX);
    // The kernel refuses a soft limit above fs.nr_open, even under an unlimited hard limit.
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let wanted = before.maximum.unwrap_or(u64::MAX).min(nr_open);
    if current >= wanted {
        return current;
    }
    let raised = Rlimit {
        current: Some(wanted),
        maximum: before.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::debug!(from = current, to = wanted, "open-file limit raised to the hard limit");
            wanted
        }
        Err(e) => {
            tracing::warn!(error = %e, limit = current, "cannot raise the open-file limit");
            current
        }
    }
}

/// No limit to raise on this platform (Windows): [`u64::MAX`].
#[cfg(not(unix))]
pub fn raise_open_file_limit() -> u64 {
    u64::MAX
}

/// Lowers `max_connections` to what `limit` open files can hold, with a warning: past that, new
/// connections would fail on descriptors (accepts stall in a back-off, backend connects fail with
/// 1014) instead of getting a prompt 503. A session holds two descriptors; each runtime thread
/// holds a socket per listener, its epoll and its wake-up descriptor. The default trimmed by
/// less than a tenth (10,000 to 9,950 under a hard limit of 20,000) is said at info: nobody
/// asked for that figure, and a warning at every start under such a limit taught newcomers to
/// skip the warnings (two reviews met it first thing).
pub fn fit_open_file_limit(limit: u64, config: &mut Config, threads: usize) {
    let max_connections = config.limits.max_connections;
    let reserve = FD_RESERVE + threads as u64 * (config.listeners.len() as u64 + 2);
    let sessions = usize::try_from(limit.saturating_sub(reserve) / 2).unwrap_or(usize::MAX);
    if sessions < max_connections {
        // Once per change, not at every reload that finds the same limit again.
        static SAID: std::sync::Mutex<Option<(usize, usize)>> = std::sync::Mutex::new(None);
        let mut said = SAID.lock().unwrap_or_else(|p| p.into_inner());
        if *said != Some((max_connections, sessions)) {
            *said = Some((max_connections, sessions));
            let default = crate::config::Limits::default().max_connections;
            if max_connections == default && sessions >= default - default / 10 {
                tracing::info!(
                    "max_connections {sessions}, not the default {max_connections}: the open-file limit ({limit}) holds \
                     no more sessions (ulimit -n, LimitNOFILE= in a systemd unit)"
                );
            } else {
                tracing::warn!(
                    "max_connections lowered from {max_connections} to {sessions}: the open-file limit ({limit}) holds \
                     no more sessions; raise it (ulimit -n, LimitNOFILE= in a systemd unit) to allow more"
                );
            }
        }
        config.limits.max_connections = sessions;
    }
}

/// Every listener of a configuration bound for each runtime thread, ready to [`Bound::serve`].
#[derive(Debug)]
pub struct Bound {
    /// Every listener's sockets, per runtime thread.
    per_thread: Vec<Vec<(Listener, StdSocket)>>,
    /// Each TCP socket's bound address, in the configuration's order.
    addrs: Vec<SocketAddr>,
    /// Unix socket files this process created, with their identity: removed after the drain if
    /// they are still ours.
    unix_files: Vec<(std::path::PathBuf, (u64, u64))>,
}

/// A bound socket not yet handed to a runtime.
#[derive(Debug)]
enum StdSocket {
    Tcp(std::net::TcpListener),
    #[cfg(unix)]
    Unix(std::os::unix::net::UnixListener),
}

impl StdSocket {
    /// Another descriptor for the same socket, for another runtime thread (sockets passed by
    /// systemd and unix sockets cannot be bound again with `SO_REUSEPORT`: the threads share one
    /// accept queue).
    fn try_clone(&self) -> std::io::Result<StdSocket> {
        Ok(match self {
            StdSocket::Tcp(s) => StdSocket::Tcp(s.try_clone()?),
            #[cfg(unix)]
            StdSocket::Unix(s) => StdSocket::Unix(s.try_clone()?),
        })
    }
}

/// [`bind_with`] without passed sockets: a `systemd:NAME` listener is an error.
///
/// # Errors
/// As [`bind_with`].
pub fn bind(config: &Config, threads: usize) -> Result<Bound, StartError> {
    bind_with(config, threads, Vec::new())
}

/// Reads every listener's files (a bad certificate is a configuration error, reported before any
/// port is taken), then binds one socket per listener for each of `threads` runtime threads, with
/// `SO_REUSEPORT` when there are several so the kernel spreads connections over them. A unix
/// socket listener binds its path once (see [`bind_unix`]); a `systemd:NAME` listener takes every
/// socket in `passed` named NAME. The threads share such a socket.
///
/// # Errors
/// A listener's files cannot be used ([`StartError::Listener`]), a port or path cannot be bound
/// ([`StartError::Bind`]), or the passed sockets and the `systemd:` listeners do not match one to
/// one by name ([`StartError::Activation`]); nothing stays bound then.
pub fn bind_with(config: &Config, threads: usize, passed: Vec<crate::systemd::PassedSocket>) -> Result<Bound, StartError> {
    let mut prepared = Vec::new();
    for l in &config.listeners {
        prepared.push(Listener::prepare(l).map_err(|source| StartError::Listener {
            addr: l.addr.clone(),
            source,
        })?);
    }
    let mut passed: Vec<Option<crate::systemd::PassedSocket>> = passed.into_iter().map(Some).collect();
    // Every passed socket must be some listener's: one that is not would be held open and never
    // served, and a connection to it would hang.
    for p in passed.iter().flatten() {
        let claimed = config.listeners.iter().any(|l| l.addr == ListenOn::Systemd(p.name.clone()));
        if !claimed {
            return Err(StartError::Activation(format!(
                "systemd passed descriptor {} named {:?}, which no listener takes: add a listener with addr = \"systemd:{}\" (FileDescriptorName= in the socket unit sets the name)",
                p.fd, p.name, p.name
            )));
        }
    }
    // Bind every socket before serving any, so a port in use fails the start, not one thread.
    let threads = crate::platform::runtime_threads(threads);
    let mut per_thread: Vec<Vec<_>> = (0..threads).map(|_| Vec::new()).collect();
    let mut addrs = Vec::new();
    // Only unix sockets add to it.
    #[cfg_attr(not(unix), allow(unused_mut))]
    let mut unix_files = Vec::new();
    for l in &prepared {
        let bind_error = |source| StartError::Bind {
            addr: l.config.addr.clone(),
            source,
        };
        let web = l.config.web.as_ref().map(|w| tracing::field::display(w.display()));
        let tls = l.config.tls.is_some();
        match &l.config.addr {
            ListenOn::Tcp(configured) => {
                let configured = *configured;
                let mut addr = configured;
                let dual_stack = l.config.dual_stack(&config.listeners);
                // The port's IPv4 side in use (another program serving it, or a connection of
                // this host's from that port): said, with what to set. Not a quiet fall-back to
                // IPv6 only, which would depend on which program started first and last for good
                // (a review).
                // What to do, where it can be done: the command line has no ipv6_only (a review), and
                // the port's IPv4 side is the other program's (0.0.0.0 here would not bind either).
                let advice = match config.text_sha256 {
                    Some(_) => "set ipv6_only = true on this listener (IPv6 clients only), or use another port".to_owned(),
                    None => format!(
                        "use another port, or [::]:{} with ipv6_only = true in a configuration file (IPv6 clients only)",
                        configured.port()
                    ),
                };
                let bind_error = |source: std::io::Error| match dual_stack && source.kind() == std::io::ErrorKind::AddrInUse {
                    true => bind_error(std::io::Error::new(
                        source.kind(),
                        format!(
                            "{source} ({} takes IPv4 clients too: if another program serves IPv4 on this port, {advice})",
                            configured.ip(),
                        ),
                    )),
                    false => bind_error(source),
                };
                if threads > 1 {
                    // SO_REUSEPORT would let us share a port another process holds (a second
                    // wsbridge, say) without a word: bind once without it first, so a port in use
                    // is an error.
                    let probe = Listener::bind_std(addr, false, dual_stack).map_err(bind_error)?;
                    addr = probe.local_addr()?;
                }
                for sockets in per_thread.iter_mut() {
                    let socket = Listener::bind_std(addr, threads > 1, dual_stack).map_err(bind_error)?;
                    // Port 0: the first socket picks the port, the others share it.
                    addr = socket.local_addr()?;
                    sockets.push((l.sibling(), StdSocket::Tcp(socket)));
                }
                let ipv4 = dual_stack.then_some(true);
                tracing::info!(addr = %addr, ipv4, tls, web, threads, "listening");
                addrs.push(addr);
            }
            #[cfg(unix)]
            ListenOn::Unix { path, mode } => {
                let socket = bind_unix(path, *mode).map_err(bind_error)?;
                if let Ok(m) = std::fs::symlink_metadata(path) {
                    unix_files.push((path.clone(), crate::platform::file_identity(&m)));
                }
                share(&mut per_thread, l, StdSocket::Unix(socket)).map_err(bind_error)?;
                tracing::info!(addr = %l.config.addr, mode = %format_args!("{mode:04o}"), web, threads, "listening");
            }
            #[cfg(not(unix))]
            ListenOn::Unix { .. } => {
                return Err(bind_error(std::io::Error::other(crate::platform::UNIX_SOCKETS_UNAVAILABLE)));
            }
            ListenOn::Systemd(name) => {
                let mine: Vec<_> = passed
                    .iter_mut()
                    .filter(|p| p.as_ref().is_some_and(|p| &p.name == name))
                    .filter_map(Option::take)
                    .collect();
                if mine.is_empty() {
                    return Err(StartError::Activation(format!(
                        "listener systemd:{name}: systemd passed no socket named {name:?} (LISTEN_FDNAMES names each socket: FileDescriptorName= in the socket unit, else the unit's name; is wsbridge started by its socket unit?)"
                    )));
                }
                for p in mine {
                    let (socket, shown) = match p.listener {
                        crate::systemd::PassedListener::Tcp(s) => {
                            let a = s.local_addr()?;
                            addrs.push(a);
                            (StdSocket::Tcp(s), a.to_string())
                        }
                        #[cfg(unix)]
                        crate::systemd::PassedListener::Unix(s) => {
                            if tls {
                                return Err(StartError::Activation(format!(
                                    "listener systemd:{name}: descriptor {} is a unix socket, and TLS is for TCP listeners",
                                    p.fd
                                )));
                            }
                            let a = s.local_addr()?;
                            let shown = match a.as_pathname() {
                                Some(path) => format!("unix:{}", path.display()),
                                None => "unix:(unnamed)".to_owned(),
                            };
                            (StdSocket::Unix(s), shown)
                        }
                    };
                    share(&mut per_thread, l, socket).map_err(bind_error)?;
                    tracing::info!(addr = %shown, systemd = %name, fd = p.fd, tls, web, threads, "listening");
                }
            }
        }
    }
    Ok(Bound {
        per_thread,
        addrs,
        unix_files,
    })
}

/// Gives `socket` to the first runtime thread and a duplicate descriptor of it to each other.
fn share(per_thread: &mut [Vec<(Listener, StdSocket)>], l: &Listener, socket: StdSocket) -> std::io::Result<()> {
    for sockets in per_thread.iter_mut().skip(1) {
        sockets.push((l.sibling(), socket.try_clone()?));
    }
    if let Some(first) = per_thread.first_mut() {
        first.push((l.sibling(), socket));
    }
    Ok(())
}

/// Binds a unix stream socket at `path` with file mode `mode`. A socket file already there is
/// what a previous run that did not get to remove it left behind: it is removed, but only if it
/// is a socket (never a file someone put there) and a connect to it is refused (nothing listens:
/// a second wsbridge on the same path is an error, as a port in use is; a socket this process
/// may not connect to is someone else's and stays).
///
/// The file gets `mode` as bind creates it (the umask is set for the bind, at start-up before
/// anything is served): no window with a wider mode, and no chmod by path afterwards.
///
/// # Errors
/// The path is in use, is not a socket, or cannot be bound.
#[cfg(unix)]
pub fn bind_unix(path: &Path, mode: u32) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another process accepts connections on this socket",
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "removing a stale socket file");
                std::fs::remove_file(path)?;
            }
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("a socket file is there and a connect to it failed ({e}): not removed"),
                ))
            }
        },
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket (not removed)",
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    use rustix::fs::Mode;
    let before = rustix::process::umask(Mode::from_raw_mode(!mode & 0o777));
    let bound = std::os::unix::net::UnixListener::bind(path);
    rustix::process::umask(before);
    let socket = bound?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

impl Bound {
    /// Each TCP socket's bound address, in the configuration's order (port 0 resolved; unix
    /// sockets have none, a `systemd:` listener one per passed TCP socket).
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Serves the bound sockets until `bridge`'s shutdown token is cancelled, then drains: the
    /// first thread's sockets on the calling runtime, each other thread's on a single-threaded
    /// runtime of its own ([`runtime`]); the bridge state (routes, limits, shutdown, drain) is
    /// shared. Returns when every thread has drained.
    ///
    /// # Errors
    /// A runtime thread could not start, or panicked.
    pub async fn serve(mut self, bridge: &Bridge) -> Result<Drained, StartError> {
        let mut workers = Vec::new();
        let mut own = Vec::new();
        for (i, sockets) in std::mem::take(&mut self.per_thread).into_iter().enumerate() {
            if i == 0 {
                own = sockets;
                continue;
            }
            let bridge = bridge.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("wsbridge-{i}"))
                    .spawn(move || -> Result<(), StartError> {
                        let runtime = runtime()?;
                        let served = runtime.block_on(async move {
                            let listeners = attach(sockets)?;
                            bridge.serve(listeners).await;
                            Ok(())
                        });
                        // Not a drop, which would wait for blocking-pool threads that may be stuck
                        // in work nobody awaits (a static file that is a FIFO, say).
                        runtime.shutdown_background();
                        served
                    })?,
            );
        }
        let drained = bridge.serve(attach(own)?).await;
        for w in workers {
            match w.join() {
                Ok(r) => r?,
                Err(_) => return Err(StartError::Panicked),
            }
        }
        for (path, identity) in &self.unix_files {
            // Only the file this process created: another process may have bound the path since.
            let ours = std::fs::symlink_metadata(path).is_ok_and(|m| crate::platform::file_identity(&m) == *identity);
            if ours {
                let _ = std::fs::remove_file(path);
            }
        }
        tracing::info!(clean = drained.clean, remaining = drained.remaining, "stopped");
        Ok(drained)
    }
}

/// Hands std sockets to the current runtime.
fn attach(sockets: Vec<(Listener, StdSocket)>) -> std::io::Result<Vec<Listener>> {
    sockets
        .into_iter()
        .map(|(l, s)| match s {
            StdSocket::Tcp(s) => Ok(l.with_socket(TcpListener::from_std(s)?)),
            #[cfg(unix)]
            StdSocket::Unix(s) => Ok(l.with_unix_socket(tokio::net::UnixListener::from_std(s)?)),
        })
        .collect()
}

/// Reloads (SIGHUP): re-reads the configuration file, if there is one, fitted to the open-file
/// limit for `threads` runtime threads, then every listener's certificates. A bad file is logged
/// and the running configuration stays. Blocking: files are read and parsed here, so call it off
/// the runtime threads (`spawn_blocking`). Returns whether all of it was put in force (false: a
/// bad file or certificate, logged, and the previous one still serves); `None` if a shutdown
/// began while the files were read, and nothing was put in force.
pub fn reload(bridge: &Bridge, path: Option<&Path>, threads: usize) -> Option<bool> {
    let config_ok = match path {
        Some(p) => match read_for_reload(bridge, p)?.map_err(BridgeError::from).and_then(|mut c| {
            let limit = crate::platform::open_file_limit();
            fit_open_file_limit(limit.unwrap_or(u64::MAX), &mut c, threads);
            bridge.reload(&c)?;
            // What start-up warns of, a reload that brings it warns of too.
            for warning in c.warnings() {
                tracing::warn!("{warning}");
            }
            for waiting in bridge.waiting_for_restart(&c) {
                tracing::warn!("{waiting}");
            }
            if c.log_token_key.as_ref() != crate::config::token_key_in_force() {
                tracing::warn!(
                    "[log] token_key_file: a different key in the file; tokens are tagged under the one the process \
                     started with until a restart"
                );
            }
            Ok(())
        }) {
            Ok(()) => {
                bridge.metrics().config_reloaded(true);
                tracing::info!(
                    config = %p.display(),
                    "configuration reloaded (listener, log and admin address changes need a restart)"
                );
                true
            }
            Err(e) => {
                bridge.metrics().config_reloaded(false);
                // A configuration error carries a TOML snippet over several lines: one record per
                // line keeps it readable (a field would show `\n`s) and every record one line.
                tracing::error!(config = %p.display(), "reload failed; the running configuration stays:");
                for line in crate::logging::chain(&e).lines() {
                    tracing::error!("reload failed: {line}");
                }
                false
            }
        },
        None => {
            tracing::info!("SIGHUP: no configuration file to reload (token files are re-read when they change)");
            true
        }
    };
    let failed = bridge.reload_tls();
    for e in &failed {
        tracing::error!(error = %e, "certificate reload failed; the previous certificate stays in service");
    }
    Some(config_ok && failed.is_empty())
}

/// The configuration file read for a reload; `None` when a shutdown began while it was being
/// read (its files were slow to answer): a draining bridge keeps what it has.
fn read_for_reload(bridge: &Bridge, path: &Path) -> Option<Result<Config, crate::config::ConfigError>> {
    let read = Config::from_file(path);
    (!bridge.is_draining()).then_some(read)
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_runtime_thread_on_small_machines_one_per_cpu_on_larger() {
        let threads: Vec<usize> = [1, 2, 3, 4, 64].into_iter().map(super::default_threads).collect();
        assert_eq!(threads, [1, 1, 3, 4, 64]);
    }
}
