//! What the operating system asks of a running wsbridge, the same on every platform: shut down
//! (drain: stop accepting, close sessions with 1001 after flushing) or reload.
//!
//! - Unix: SIGTERM and SIGINT shut down, SIGHUP reloads.
//! - Windows: Ctrl-C, Ctrl-Break, closing the console window and system shutdown all shut down.
//!   There is no reload signal: token files and certificates are watched for changes as on Unix,
//!   and a service's stop request comes from the Service Control Manager (`src/service.rs`).

/// What was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Drain and exit (SIGTERM, SIGINT; Ctrl-C, Ctrl-Break, console closed, system shutdown).
    Shutdown,
    /// Re-read the configuration, tokens and certificates (SIGHUP; never on Windows).
    Reload,
}

/// The platform's signal handlers, installed by [`Signals::new`]: from then on these signals no
/// longer end the process by themselves.
#[derive(Debug)]
pub struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
    #[cfg(windows)]
    ctrl_c: tokio::signal::windows::CtrlC,
    #[cfg(windows)]
    ctrl_break: tokio::signal::windows::CtrlBreak,
    #[cfg(windows)]
    ctrl_close: tokio::signal::windows::CtrlClose,
    #[cfg(windows)]
    ctrl_shutdown: tokio::signal::windows::CtrlShutdown,
}

impl Signals {
    /// Installs the handlers. Call it inside a tokio runtime, before telling anyone (a
    /// supervisor, a test) that the process is up: a signal that arrives before would end the
    /// process without the drain.
    ///
    /// # Errors
    /// The OS refuses a handler.
    pub fn new() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
                hup: signal(SignalKind::hangup())?,
            })
        }
        #[cfg(windows)]
        {
            use tokio::signal::windows::{ctrl_break, ctrl_c, ctrl_close, ctrl_shutdown};
            Ok(Signals {
                ctrl_c: ctrl_c()?,
                ctrl_break: ctrl_break()?,
                ctrl_close: ctrl_close()?,
                ctrl_shutdown: ctrl_shutdown()?,
            })
        }
    }

    /// The next signal. Cancel-safe (a `select!` arm may drop it).
    pub async fn recv(&mut self) -> Signal {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => Signal::Shutdown,
                _ = self.int.recv() => Signal::Shutdown,
                _ = self.hup.recv() => Signal::Reload,
            }
        }
        #[cfg(windows)]
        {
            // Windows ends the process shortly after a close or shutdown event's handler
            // returns (5 s for a closed console): the drain starts at once, within that time.
            tokio::select! {
                _ = self.ctrl_c.recv() => Signal::Shutdown,
                _ = self.ctrl_break.recv() => Signal::Shutdown,
                _ = self.ctrl_close.recv() => Signal::Shutdown,
                _ = self.ctrl_shutdown.recv() => Signal::Shutdown,
            }
        }
    }
}
