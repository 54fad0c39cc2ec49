//! The backend side of a session: connecting to a [`Target`] under the connect deadline, and the
//! few operations the relay needs on the stream.
//!
//! The relay uses the stream through `&self` (readiness, then a non-blocking read or write), so
//! both directions share one socket without a lock or a split, and a read buffer is taken only when
//! the socket is readable.

use std::io;
use std::net::Shutdown;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::{TcpStream, UnixStream};
use tokio::time::timeout;

use crate::config::Target;
use crate::tls::BackendTls;
use rustls_pki_types::ServerName;

/// A connected backend stream.
#[derive(Debug)]
pub enum Backend {
    /// TCP.
    Tcp(TcpStream),
    /// A unix stream socket.
    Unix(UnixStream),
}

/// Why a backend could not be reached. The `Display` text is what the client reads in the close
/// frame (code 1014), so it stays short and says nothing about the target's address.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The host name did not resolve.
    #[error("backend unreachable: cannot resolve host")]
    Resolve(#[source] io::Error),
    /// Every address refused or failed.
    #[error("backend unreachable: {}", describe(.0))]
    Connect(#[source] io::Error),
    /// The connect deadline passed.
    #[error("backend unreachable: connect timed out after {0:?}")]
    Timeout(Duration),
    /// The TLS handshake with the backend failed (its certificate did not verify, for one).
    #[error("backend TLS failed: {0}")]
    Tls(#[source] io::Error),
}

impl Backend {
    /// Connects to `target`, trying every resolved address in order, then the TLS handshake when
    /// `tls` is given, all within `deadline`.
    ///
    /// A TLS backend is handed to the relay as one end of a socket pair, with a task copying
    /// between the other end and the TLS stream: the relay keeps a single code path, and the extra
    /// copy is only paid by routes that ask for TLS.
    ///
    /// # Errors
    /// [`ConnectError`] with the last failure.
    pub async fn connect(target: &Target, deadline: Duration, tls: Option<&BackendTls>) -> Result<Backend, ConnectError> {
        let attempt = async {
            match target {
                Target::Unix(path) => UnixStream::connect(path).await.map(Backend::Unix).map_err(ConnectError::Connect),
                Target::Tcp { host, port } => {
                    let addrs = tokio::net::lookup_host((host.as_str(), *port))
                        .await
                        .map_err(ConnectError::Resolve)?;
                    let mut last = io::Error::new(io::ErrorKind::NotFound, "host resolved to no address");
                    for addr in addrs {
                        match TcpStream::connect(addr).await {
                            Ok(s) => {
                                // Small messages (keystrokes, VNC input) must not wait for Nagle.
                                s.set_nodelay(true).map_err(ConnectError::Connect)?;
                                return match tls {
                                    None => Ok(Backend::Tcp(s)),
                                    Some(tls) => wrap_tls(s, host, tls).await,
                                };
                            }
                            Err(e) => last = e,
                        }
                    }
                    Err(ConnectError::Connect(last))
                }
            }
        };
        timeout(deadline, attempt).await.unwrap_or(Err(ConnectError::Timeout(deadline)))
    }

    /// Waits until a read may succeed (data, EOF or an error).
    ///
    /// Through `poll_read_ready`, which keeps the waker in the socket's registration: the future
    /// holds no waiter node of its own, so a waiting session stays small.
    ///
    /// # Errors
    /// The socket failed.
    pub async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| match self {
            Backend::Tcp(s) => s.poll_read_ready(cx),
            Backend::Unix(s) => s.poll_read_ready(cx),
        })
        .await
    }

    /// Reads what is waiting into `buf` without blocking.
    ///
    /// # Errors
    /// `WouldBlock` when readiness was spurious; any other error is fatal for the session.
    pub fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Backend::Tcp(s) => s.try_read_buf(buf),
            Backend::Unix(s) => s.try_read_buf(buf),
        }
    }

    /// Writes all of `data`.
    ///
    /// # Errors
    /// The socket failed.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = self.write_some(&[io::IoSlice::new(data)]).await?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Writes all of `a` then all of `b`, in one system call when the socket takes them.
    ///
    /// # Errors
    /// The socket failed.
    pub async fn write_all_parts(&self, a: &[u8], b: &[u8]) -> io::Result<()> {
        let n = self.write_some(&[io::IoSlice::new(a), io::IoSlice::new(b)]).await?;
        if n >= a.len() {
            return self.write_all(&b[n - a.len()..]).await;
        }
        self.write_all(&a[n..]).await?;
        self.write_all(b).await
    }

    async fn write_some(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        loop {
            std::future::poll_fn(|cx| match self {
                Backend::Tcp(s) => s.poll_write_ready(cx),
                Backend::Unix(s) => s.poll_write_ready(cx),
            })
            .await?;
            let r = match self {
                Backend::Tcp(s) => s.try_write_vectored(bufs),
                Backend::Unix(s) => s.try_write_vectored(bufs),
            };
            match r {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends EOF (FIN) to the backend; it may still send to us.
    ///
    /// # Errors
    /// The socket failed (already closed by the peer is not worth reporting).
    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Backend::Tcp(s) => socket2::SockRef::from(s).shutdown(Shutdown::Write),
            Backend::Unix(s) => socket2::SockRef::from(s).shutdown(Shutdown::Write),
        }
    }
}

async fn wrap_tls(tcp: TcpStream, host: &str, tls: &BackendTls) -> Result<Backend, ConnectError> {
    let name = match &tls.server_name {
        Some(n) => n.clone(),
        None => ServerName::try_from(host.to_owned()).map_err(|e| ConnectError::Tls(io::Error::new(io::ErrorKind::InvalidInput, e)))?,
    };
    let mut stream = tls.connector.connect(name, tcp).await.map_err(ConnectError::Tls)?;
    let (ours, mut theirs) = UnixStream::pair().map_err(ConnectError::Connect)?;
    tokio::spawn(async move {
        // Ends when both directions have ended: EOF is passed on as a shutdown, and a relay that
        // drops its end makes the writes towards it fail.
        if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut theirs).await {
            tracing::debug!(error = %e, "backend TLS stream ended");
        }
    });
    Ok(Backend::Unix(ours))
}

/// A short lower-case description of an I/O error for close reasons and logs
/// ("connection refused" rather than "Connection refused (os error 111)").
pub fn describe(e: &io::Error) -> String {
    use io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => "connection refused".into(),
        K::ConnectionReset => "connection reset".into(),
        K::ConnectionAborted => "connection aborted".into(),
        K::BrokenPipe => "broken pipe".into(),
        K::TimedOut => "timed out".into(),
        K::NotFound => "no such socket".into(),
        K::PermissionDenied => "permission denied".into(),
        K::HostUnreachable => "host unreachable".into(),
        K::NetworkUnreachable => "network unreachable".into(),
        K::AddrNotAvailable => "address not available".into(),
        _ => e.to_string(),
    }
}
