//! Client connections: raw TCP or WebSocket (ws:// or wss://), behind one
//! byte-oriented interface so that every mode measures the same client code
//! against every bridge.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::WebSocketStream;

/// Upper bound for establishing one session (TCP + TLS + WebSocket handshake).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Anything a WebSocket can run over: plain TCP or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How to reach the system under test.
#[derive(Clone)]
pub struct Target {
    url: String,
    host: String,
    port: u16,
    raw: bool,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    protocol: Option<String>,
}

/// Command-line options shared by every client mode.
#[derive(clap::Args, Clone, Debug)]
pub struct TargetArgs {
    /// ws://host:port/path, wss://host:port/path, or tcp://host:port with --raw-tcp
    #[arg(long)]
    pub url: String,
    /// Speak plain TCP instead of WebSocket (measures the no-bridge / TCP-relay ceiling
    /// with the same client code)
    #[arg(long)]
    pub raw_tcp: bool,
    /// For wss://: trust this PEM CA / self-signed certificate
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Offer this WebSocket subprotocol (none by default)
    #[arg(long)]
    pub protocol: Option<String>,
}

impl Target {
    pub fn new(args: &TargetArgs) -> Result<Self> {
        let uri: Uri = args.url.parse().context("parsing --url")?;
        let scheme = uri.scheme_str().unwrap_or("");
        let host = uri
            .host()
            .ok_or_else(|| anyhow!("--url has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let (default_port, tls) = match (scheme, args.raw_tcp) {
            ("tcp", true) | ("ws", true) => (0, false),
            ("ws", false) => (80, false),
            ("wss", false) => (443, true),
            (s, raw) => bail!("unsupported scheme {s:?} (raw_tcp={raw}): use ws, wss or tcp+--raw-tcp"),
        };
        let port = uri.port_u16().unwrap_or(default_port);
        if port == 0 {
            bail!("--url needs a port");
        }
        let tls = if tls {
            let config = client_tls_config(args.ca.as_deref())?;
            let name = ServerName::try_from(host.clone()).context("TLS server name")?;
            Some((TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(Target {
            url: args.url.clone(),
            host,
            port,
            raw: args.raw_tcp,
            tls,
            protocol: args.protocol.clone(),
        })
    }

    /// Open one session, bounded by [`CONNECT_TIMEOUT`].
    pub async fn connect(&self) -> Result<Conn> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.connect_inner())
            .await
            .map_err(|_| anyhow!("connect timed out after {CONNECT_TIMEOUT:?}"))?
    }

    async fn connect_inner(&self) -> Result<Conn> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("TCP connect to {}:{}", self.host, self.port))?;
        tcp.set_nodelay(true)?;
        if self.raw {
            return Ok(Conn::Raw(tcp));
        }
        let io: Box<dyn Io> = match &self.tls {
            Some((connector, name)) => Box::new(connector.connect(name.clone(), tcp).await.context("TLS handshake")?),
            None => Box::new(tcp),
        };
        let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(self.url.as_str())?;
        if let Some(p) = &self.protocol {
            request.headers_mut().insert("Sec-WebSocket-Protocol", p.parse()?);
        }
        let config = WebSocketConfig::default()
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        let (ws, _resp) = tokio_tungstenite::client_async_with_config(request, io, Some(config))
            .await
            .context("WebSocket handshake")?;
        Ok(Conn::Ws(Box::new(ws)))
    }
}

/// One open session.
pub enum Conn {
    Raw(TcpStream),
    Ws(Box<WebSocketStream<Box<dyn Io>>>),
}

impl Conn {
    /// Send `payload` as one unit: one binary WebSocket message, or one write.
    pub async fn send(&mut self, payload: &Bytes) -> Result<()> {
        match self {
            Conn::Raw(s) => s.write_all(payload).await?,
            Conn::Ws(ws) => ws.send(Message::Binary(payload.clone())).await?,
        }
        Ok(())
    }

    /// Receive whatever arrives next; returns the number of payload bytes
    /// (0 for control frames). Errors on EOF / close.
    pub async fn recv_some(&mut self, buf: &mut [u8]) -> Result<usize> {
        match self {
            Conn::Raw(s) => {
                let n = s.read(buf).await?;
                if n == 0 {
                    bail!("peer closed the connection");
                }
                Ok(n)
            }
            Conn::Ws(ws) => match ws.next().await {
                Some(Ok(Message::Binary(b))) => Ok(b.len()),
                Some(Ok(Message::Text(t))) => Ok(t.len()),
                Some(Ok(Message::Close(c))) => bail!("peer sent close: {c:?}"),
                Some(Ok(_)) => Ok(0),
                Some(Err(e)) => Err(e.into()),
                None => bail!("peer closed the connection"),
            },
        }
    }

    /// Receive exactly `n` payload bytes, however the bridge splits them into
    /// messages.
    pub async fn recv_exact(&mut self, n: usize, buf: &mut [u8]) -> Result<()> {
        let mut got = 0;
        while got < n {
            got += self.recv_some(buf).await?;
        }
        if got != n {
            bail!("expected {n} bytes, got {got}");
        }
        Ok(())
    }

    /// One round trip: send `payload`, wait for the same number of bytes back.
    pub async fn echo(&mut self, payload: &Bytes, buf: &mut [u8]) -> Result<()> {
        self.send(payload).await?;
        self.recv_exact(payload.len(), buf).await
    }

    /// Close the session, bounded in time: a WebSocket Close frame (if any),
    /// then FIN, then wait until the peer has closed too (EOF, reset, or its
    /// Close frame followed by EOF). Bridges differ here: some answer the
    /// Close frame, some reset, some only react to the FIN; all of these count
    /// as closed. Returns whether the peer sent a Close frame; an error only if
    /// the peer did not close within `limit`.
    pub async fn close(self, limit: Duration) -> Result<bool> {
        let fut = async move {
            match self {
                Conn::Raw(mut s) => {
                    s.shutdown().await?;
                    let mut b = [0u8; 1024];
                    while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
                    anyhow::Ok(false)
                }
                Conn::Ws(mut ws) => {
                    let mut got_close = false;
                    if ws.close(None).await.is_ok() {
                        let _ = ws.get_mut().shutdown().await;
                        while let Some(m) = ws.next().await {
                            match m {
                                Ok(Message::Close(_)) => got_close = true,
                                Ok(_) => {}
                                Err(_) => break,
                            }
                        }
                    }
                    Ok(got_close)
                }
            }
        };
        tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| anyhow!("peer did not close within {limit:?}"))?
    }
}

/// The wss:// client configuration: the server's certificate must chain to `ca` (run.py passes
/// the certificate from `gencert`), so the TLS work measured is a real verification.
fn client_tls_config(ca: Option<&std::path::Path>) -> Result<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?;
    let ca = ca.ok_or_else(|| anyhow!("wss:// needs --ca FILE (e.g. the cert.pem of `loadgen gencert`)"))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).context("reading --ca")? {
        roots.add(cert?)?;
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// Write a self-signed certificate for localhost / 127.0.0.1 / ::1 into
/// `dir` as cert.pem and key.pem.
pub fn gencert(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let certified = rcgen::generate_simple_self_signed(names)?;
    std::fs::write(dir.join("cert.pem"), certified.cert.pem())?;
    std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem())?;
    Ok(())
}
