//! `loadgen smoke`: run every mode briefly against in-process backends (raw
//! TCP, ws:// and wss://), so the tool can be checked without any bridge.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use crate::backend::{self, Kind};
use crate::modes::{self, Dir, Timing};
use crate::net::{Target, TargetArgs};

const TIMING: Timing = Timing { warmup: 0.1, seconds: 0.3 };

async fn listener() -> Result<(TcpListener, u16)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    Ok((l, port))
}

/// A WebSocket server with the same behaviours as the TCP backends.
async fn ws_server(kind: Kind, l: TcpListener, tls: Option<TlsAcceptor>) {
    while let Ok((sock, _)) = l.accept().await {
        let _ = sock.set_nodelay(true);
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                Some(acc) => {
                    if let Ok(s) = acc.accept(sock).await {
                        let _ = ws_serve(kind, s).await;
                    }
                }
                None => {
                    let _ = ws_serve(kind, sock).await;
                }
            }
        });
    }
}

async fn ws_serve<S: AsyncRead + AsyncWrite + Unpin>(kind: Kind, s: S) -> Result<()> {
    let mut ws = tokio_tungstenite::accept_async(s).await?;
    match kind {
        Kind::Echo => {
            while let Some(m) = ws.next().await {
                // A received Close is answered by tungstenite on the next poll.
                if let m @ Message::Binary(_) = m? {
                    ws.send(m).await?;
                }
            }
        }
        Kind::Sink => while ws.next().await.transpose()?.is_some() {},
        Kind::Source => {
            let data = Bytes::from(vec![7u8; 64 * 1024]);
            loop {
                ws.send(Message::Binary(data.clone())).await?;
            }
        }
    }
    Ok(())
}

fn target(url: String, raw: bool, ca: Option<std::path::PathBuf>) -> Result<Target> {
    Target::new(&TargetArgs {
        url,
        raw_tcp: raw,
        ca,
        protocol: None,
    })
}

fn check(name: &str, v: &Value, key: &str) -> Result<()> {
    modes::emit(&serde_json::json!({"smoke": name, "result": v}));
    let ok = v[key].as_f64().unwrap_or(0.0) > 0.0
        && v["errors"].as_u64().unwrap_or(0) == 0
        && v["close_errors"].as_u64().unwrap_or(0) == 0
        && v["failed"].as_u64().unwrap_or(0) == 0;
    if !ok {
        bail!("smoke {name}: bad result {v}");
    }
    Ok(())
}

pub async fn run() -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("loadgen-smoke-{}", std::process::id()));
    crate::net::gencert(&tmp)?;
    let r = run_all(&tmp).await;
    let _ = std::fs::remove_dir_all(&tmp);
    r?;
    println!("smoke: all modes passed");
    Ok(())
}

async fn run_all(certdir: &std::path::Path) -> Result<()> {
    let certs: Vec<_> = rustls::pki_types::pem::PemObject::pem_file_iter(certdir.join("cert.pem"))?.collect::<Result<_, _>>()?;
    let key = rustls::pki_types::pem::PemObject::from_pem_file(certdir.join("key.pem"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("server cert")?;
    let acceptor = TlsAcceptor::from(Arc::new(server));

    let mut ports = Vec::new();
    for kind in [Kind::Echo, Kind::Sink, Kind::Source] {
        let (l, tcp) = listener().await?;
        tokio::spawn(backend::serve_forever(kind, l));
        let (l, ws) = listener().await?;
        tokio::spawn(ws_server(kind, l, None));
        let (l, wss) = listener().await?;
        tokio::spawn(ws_server(kind, l, Some(acceptor.clone())));
        ports.push((tcp, ws, wss));
    }
    let [echo, sink, source] = [ports[0], ports[1], ports[2]];
    let ca = Some(certdir.join("cert.pem"));
    let flavours = [
        ("tcp", sink.0, source.0, echo.0),
        ("ws", sink.1, source.1, echo.1),
        ("wss", sink.2, source.2, echo.2),
    ];
    for (scheme, sink, source, echo) in flavours {
        let raw = scheme == "tcp";
        let t = |port: u16| target(format!("{scheme}://127.0.0.1:{port}/"), raw, ca.clone());
        let v = modes::throughput(&t(sink)?, Dir::Up, 65536, TIMING).await?;
        check(&format!("{scheme} throughput up"), &v, "mb_per_s")?;
        let v = modes::throughput(&t(source)?, Dir::Down, 65536, TIMING).await?;
        check(&format!("{scheme} throughput down"), &v, "mb_per_s")?;
        let v = modes::echo(&t(echo)?, 4, 64, TIMING, 4).await?;
        check(&format!("{scheme} echo"), &v, "rate")?;
        let v = modes::sessions(&t(echo)?, 4, 64, TIMING).await?;
        check(&format!("{scheme} sessions"), &v, "rate")?;
        let v = modes::hold(&t(echo)?, 20, 10, 65536, Some(0.05)).await?;
        check(&format!("{scheme} hold"), &v, "sessions")?;
        if v["alive_after_hold"] != v["sessions"] || v["closed_cleanly"] != v["sessions"] {
            bail!("smoke {scheme} hold: not every session echoed and closed after the hold: {v}");
        }
    }
    Ok(())
}
