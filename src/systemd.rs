//! systemd integration: socket activation and the notify protocol (`sd_notify(3)`,
//! `sd_listen_fds(3)`). Linux only; elsewhere no socket is ever passed and notifying does nothing.
//!
//! **Socket activation.** systemd binds the sockets of a `.socket` unit and starts wsbridge with
//! them open as descriptors 3, 4, … and `LISTEN_FDS` (how many), `LISTEN_PID` (the process they are
//! for) and `LISTEN_FDNAMES` (each one's `FileDescriptorName=`, colon-separated; the socket unit's
//! name when none is set). A listener whose address is `systemd:NAME` serves every passed socket
//! named NAME; [`take_passed_sockets`] takes them once, at start, and unsets the variables so that
//! nothing wsbridge starts inherits them. Which listener gets which socket is
//! [`crate::server::start::bind_with`]'s: a name no listener claims, or a listener whose name was
//! not passed, stops the start with an error that names it.
//!
//! **Notify.** With `NOTIFY_SOCKET` set (`Type=notify`), [`Notifier`] sends `READY=1` once every
//! listener is bound and the configuration loaded, `RELOADING=1` (with `MONOTONIC_USEC`) then
//! `READY=1` around a reload, `STOPPING=1` when the drain starts, `STATUS=` lines, and `WATCHDOG=1`
//! when the unit sets `WatchdogSec=`. The socket may be a path or, as systemd allows, an abstract
//! name written `@name`.
//!
//! Why not the `sd-notify` crate: it connects to `NOTIFY_SOCKET` as a path, so an abstract `@name`
//! fails, and its functions that unset the variables are `unsafe`; the protocol is one datagram.
//! Passed descriptors are taken through `listenfd`, which checks each one is a listening socket of
//! the right kind before owning it (that needs `unsafe`, which this crate forbids).

use std::time::Duration;

/// One socket systemd passed.
#[derive(Debug)]
pub struct PassedSocket {
    /// Its `FileDescriptorName=` (from `LISTEN_FDNAMES`; `unknown` without it, as sd_listen_fds).
    pub name: String,
    /// The descriptor it came as (3, 4, …), for messages.
    pub fd: i32,
    /// The socket.
    pub listener: PassedListener,
}

/// A passed listening socket, by kind.
#[derive(Debug)]
pub enum PassedListener {
    /// A TCP socket (`ListenStream=PORT` or `ADDR:PORT`).
    Tcp(std::net::TcpListener),
    /// A unix stream socket (`ListenStream=/path`).
    #[cfg(unix)]
    Unix(std::os::unix::net::UnixListener),
}

/// Why the passed sockets cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_FDS` or `LISTEN_PID` is not a number.
    #[error("socket activation: {var}={value:?} is not a number")]
    NotANumber {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// `LISTEN_FDNAMES` names a different number of sockets than `LISTEN_FDS` counts.
    #[error("socket activation: LISTEN_FDNAMES={names:?} names {count} sockets, but LISTEN_FDS={fds}")]
    Names {
        /// `LISTEN_FDNAMES`.
        names: String,
        /// How many names it has.
        count: usize,
        /// `LISTEN_FDS`.
        fds: u32,
    },
    /// More descriptors than any unit passes.
    #[error("socket activation: LISTEN_FDS={0} is more sockets than wsbridge takes (at most 1024)")]
    TooMany(u32),
    /// A passed descriptor is not a listening TCP or unix stream socket.
    #[error("socket activation: descriptor {fd} (named {name:?}) is not a listening TCP or unix stream socket: {reason}")]
    NotAListener {
        /// The descriptor.
        fd: i32,
        /// Its name.
        name: String,
        /// What the check found.
        reason: std::io::Error,
    },
}

/// Takes the sockets systemd passed this process (none without `LISTEN_FDS`, or when `LISTEN_PID`
/// names another process: they were meant for a parent, as sd_listen_fds ignores them), and
/// unsets `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES`.
///
/// Call it once, before any other thread runs (in `main`, before the runtime starts): it changes
/// the environment, which another thread reading it at the same time could see torn.
///
/// # Errors
/// A variable is malformed or a descriptor is not a listening stream socket; the start should
/// stop then, naming it.
pub fn take_passed_sockets() -> Result<Vec<PassedSocket>, ActivationError> {
    let fds = std::env::var("LISTEN_FDS").ok();
    let pid = std::env::var("LISTEN_PID").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    // listenfd's own convention (systemfd), never systemd's: descriptors start at 3 here.
    std::env::remove_var("LISTEN_FDS_FIRST_FD");
    let taken = take(fds.as_deref(), pid.as_deref(), names.as_deref());
    for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    taken
}

/// What [`take_passed_sockets`] reads, from the variables' values.
fn take(fds: Option<&str>, pid: Option<&str>, names: Option<&str>) -> Result<Vec<PassedSocket>, ActivationError> {
    let Some(fds) = fds else { return Ok(Vec::new()) };
    let number = |var, value: &str| {
        value.trim().parse::<u32>().map_err(|_| ActivationError::NotANumber {
            var,
            value: value.to_owned(),
        })
    };
    let count = number("LISTEN_FDS", fds)?;
    // systemd sets LISTEN_PID in the child it starts; one that names another process (or is
    // missing) means the variables were inherited from a parent and are not ours.
    let ours = match pid {
        Some(p) => number("LISTEN_PID", p)? == std::process::id(),
        None => false,
    };
    if !ours || count == 0 {
        if count > 0 {
            tracing::warn!(
                LISTEN_FDS = count,
                LISTEN_PID = pid.unwrap_or(""),
                "socket activation: the passed sockets are for another process; ignored"
            );
        }
        return Ok(Vec::new());
    }
    if count > 1024 {
        return Err(ActivationError::TooMany(count));
    }
    let names: Vec<String> = match names {
        Some(n) => n.split(':').map(str::to_owned).collect(),
        None => vec!["unknown".to_owned(); count as usize],
    };
    if names.len() != count as usize {
        return Err(ActivationError::Names {
            names: names.join(":"),
            count: names.len(),
            fds: count,
        });
    }
    adopt(names)
}

/// Owns descriptors 3.. as the listening sockets `names` describe.
#[cfg(target_os = "linux")]
fn adopt(names: Vec<String>) -> Result<Vec<PassedSocket>, ActivationError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    // listenfd reads LISTEN_FDS and LISTEN_PID again (both checked above) and unsets them.
    let mut fds = listenfd::ListenFd::from_env();
    let mut passed = Vec::new();
    for (i, name) in names.into_iter().enumerate() {
        let fd = 3 + i as i32;
        let not_a_listener = |reason| ActivationError::NotAListener {
            fd,
            name: name.clone(),
            reason,
        };
        let listener = match fds.take_tcp_listener(i) {
            Ok(Some(l)) => PassedListener::Tcp(l),
            Ok(None) => return Err(not_a_listener(std::io::Error::other("not passed"))),
            Err(tcp) => match fds.take_unix_listener(i) {
                Ok(Some(l)) => PassedListener::Unix(l),
                Ok(None) => return Err(not_a_listener(tcp)),
                Err(_) => return Err(not_a_listener(tcp)),
            },
        };
        // A connected socket (a socket unit with Accept=yes) would fail every accept.
        let listening = match &listener {
            PassedListener::Tcp(l) => socket2::SockRef::from(l).is_listener(),
            PassedListener::Unix(l) => socket2::SockRef::from(l).is_listener(),
        };
        if !listening.map_err(not_a_listener)? {
            return Err(not_a_listener(std::io::Error::other(
                "a connected socket, not a listening one (Accept=yes in the socket unit: use Accept=no)",
            )));
        }
        let nonblocking = match &listener {
            PassedListener::Tcp(l) => l.set_nonblocking(true),
            PassedListener::Unix(l) => l.set_nonblocking(true),
        };
        nonblocking.map_err(not_a_listener)?;
        passed.push(PassedSocket { name, fd, listener });
    }
    Ok(passed)
}

/// No socket activation off Linux.
#[cfg(not(target_os = "linux"))]
fn adopt(names: Vec<String>) -> Result<Vec<PassedSocket>, ActivationError> {
    if !names.is_empty() {
        tracing::warn!("socket activation is systemd's, on Linux only: LISTEN_FDS ignored");
    }
    Ok(Vec::new())
}

/// The service manager's notify socket (`NOTIFY_SOCKET`), when there is one.
#[derive(Debug)]
pub struct Notifier {
    #[cfg(target_os = "linux")]
    socket: std::os::unix::net::UnixDatagram,
    #[cfg(target_os = "linux")]
    addr: std::os::unix::net::SocketAddr,
    /// `WATCHDOG_USEC`: the service manager expects `WATCHDOG=1` at least this often.
    watchdog: Option<Duration>,
}

impl Notifier {
    /// The notify socket named by `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket),
    /// with the watchdog interval from `WATCHDOG_USEC` (when `WATCHDOG_PID` is unset or ours).
    /// Unsets those variables, so that nothing wsbridge starts inherits them; call it once,
    /// before other threads run, as [`take_passed_sockets`]. `None` without `NOTIFY_SOCKET`, or
    /// off Linux; an unusable one is logged.
    pub fn from_env() -> Option<Notifier> {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(var);
        }
        let watchdog = usec
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0)
            .filter(|_| pid.is_none_or(|p| p.parse::<u32>().ok() == Some(std::process::id())))
            .map(Duration::from_micros);
        Notifier::new(&socket?, watchdog)
    }

    #[cfg(target_os = "linux")]
    fn new(path: &std::ffi::OsStr, watchdog: Option<Duration>) -> Option<Notifier> {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let bytes = path.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name),
            None => SocketAddr::from_pathname(path),
        };
        // Non-blocking: a service manager that does not read must not stall the runtime thread
        // that sends (a send that would block is logged and dropped).
        let made = addr.and_then(|addr| {
            let socket = UnixDatagram::unbound()?;
            socket.set_nonblocking(true)?;
            Ok((socket, addr))
        });
        match made {
            Ok((socket, addr)) => Some(Notifier { socket, addr, watchdog }),
            Err(e) => {
                tracing::warn!(NOTIFY_SOCKET = %path.to_string_lossy(), error = %e, "cannot use the notify socket; systemd will not hear that wsbridge is ready");
                None
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn new(_path: &std::ffi::OsStr, _watchdog: Option<Duration>) -> Option<Notifier> {
        None
    }

    /// Sends `lines` (`KEY=VALUE` lines) in one datagram; a failure is logged, never fatal (the
    /// service manager may have gone; the bridge serves on).
    pub fn send(&self, lines: &str) {
        #[cfg(target_os = "linux")]
        if let Err(e) = self.socket.send_to_addr(lines.as_bytes(), &self.addr) {
            tracing::warn!(error = %e, "notify socket: cannot send {:?}", lines.lines().next().unwrap_or(""));
        }
        #[cfg(not(target_os = "linux"))]
        let _ = lines;
    }

    /// `READY=1` with a status line: every listener is bound and the configuration loaded (or
    /// reloaded).
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}\n", one_line(status)));
    }

    /// `RELOADING=1` with the monotonic time systemd requires beside it (`Type=notify-reload`
    /// refuses a reload without it), and a status line. [`Notifier::ready`] ends the reload.
    pub fn reloading(&self) {
        let mut lines = String::from("RELOADING=1\n");
        if let Some(usec) = monotonic_usec() {
            lines.push_str(&format!("MONOTONIC_USEC={usec}\n"));
        }
        lines.push_str("STATUS=reloading the configuration\n");
        self.send(&lines);
    }

    /// `STOPPING=1`: the drain has started.
    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={}\n", one_line(status)));
    }

    /// A `STATUS=` line alone.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}\n", one_line(status)));
    }

    /// How often `WATCHDOG=1` must be sent (`WatchdogSec=`), if the unit asks for it.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }
}

/// A status text on one line (the protocol is one `KEY=VALUE` per line).
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares `MONOTONIC_USEC` with.
fn monotonic_usec() -> Option<u128> {
    #[cfg(target_os = "linux")]
    {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let usec = u128::try_from(t.tv_sec).ok()? * 1_000_000 + u128::try_from(t.tv_nsec).ok()? / 1_000;
        Some(usec)
    }
    #[cfg(not(target_os = "linux"))]
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid() -> String {
        std::process::id().to_string()
    }

    #[test]
    fn no_listen_fds_is_no_socket() {
        assert!(take(None, None, None).unwrap().is_empty());
    }

    #[test]
    fn sockets_for_another_process_are_ignored() {
        assert!(take(Some("2"), Some("1"), Some("a:b")).unwrap().is_empty());
        assert!(take(Some("2"), None, None).unwrap().is_empty());
    }

    #[test]
    fn malformed_variables_are_named() {
        let e = take(Some("two"), Some(&pid()), None).unwrap_err().to_string();
        assert_eq!(e, "socket activation: LISTEN_FDS=\"two\" is not a number");
        let e = take(Some("1"), Some("me"), None).unwrap_err().to_string();
        assert_eq!(e, "socket activation: LISTEN_PID=\"me\" is not a number");
        let e = take(Some("2"), Some(&pid()), Some("web")).unwrap_err().to_string();
        assert_eq!(e, "socket activation: LISTEN_FDNAMES=\"web\" names 1 sockets, but LISTEN_FDS=2");
        let e = take(Some("5000"), Some(&pid()), None).unwrap_err().to_string();
        assert!(e.contains("LISTEN_FDS=5000"), "{e}");
    }

    #[test]
    fn status_lines_stay_one_line() {
        assert_eq!(one_line("a\nb\r\nc"), "a b  c");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn notifications_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("wsbridge-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::new(std::ffi::OsStr::new(&format!("@{name}")), None).unwrap();
        n.ready("serving 1 listener");
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving 1 listener\n");
        n.reloading();
        let len = server.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..len]).unwrap();
        assert!(text.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{text}");
    }
}
