//! A real HTTP proxy for CONNECT, as an agent behind a corporate proxy meets one: it reads the
//! request head, connects where it says, answers 200 and splices both ways. It records what it
//! was asked, so that a test can tell that (and for which server) it was used.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The most targets a [`ConnectProxy`] keeps (its tunnels are counted past that).
const KEPT: usize = 256;

/// A running CONNECT proxy on 127.0.0.1 (its tasks end with the test's runtime).
pub struct ConnectProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
}

#[derive(Default)]
struct Seen {
    /// The `host:port` of each tunnel it opened, in order (the first [`KEPT`]).
    targets: Vec<String>,
    /// Tunnels opened.
    tunnels: usize,
    /// The last `Proxy-Authorization` line.
    authorization: String,
}

impl ConnectProxy {
    /// Binds port 0 on 127.0.0.1 and serves.
    pub async fn start() -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        let Ok(b) = client.read_u8().await else { return };
                        head.push(b);
                        if head.len() > 8192 {
                            return;
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let Some(target) = head.strip_prefix("CONNECT ").and_then(|r| r.split(' ').next()) else {
                        return;
                    };
                    let auth = head.lines().find(|l| l.to_ascii_lowercase().starts_with("proxy-authorization:"));
                    let Ok(mut server) = TcpStream::connect(target).await else { return };
                    {
                        let mut seen = s.lock().unwrap();
                        seen.tunnels += 1;
                        if seen.targets.len() < KEPT {
                            seen.targets.push(target.to_owned());
                        }
                        if let Some(line) = auth {
                            seen.authorization = line.to_owned();
                        }
                    }
                    client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        ConnectProxy { addr, seen }
    }

    /// Tunnels opened so far.
    pub fn tunnels(&self) -> usize {
        self.seen.lock().unwrap().tunnels
    }

    /// The `host:port` each tunnel was opened to, in order.
    pub fn targets(&self) -> Vec<String> {
        self.seen.lock().unwrap().targets.clone()
    }

    /// The last `Proxy-Authorization` line it was sent (empty if none).
    pub fn authorization(&self) -> String {
        self.seen.lock().unwrap().authorization.clone()
    }
}

/// Answers every request on 127.0.0.1 with `answer` (its head read, the connection then
/// closed), keeping each request's first line: a PAC script's server (WinHTTP's download under
/// Wine), a proxy that refuses every CONNECT.
pub async fn canned_server(answer: String) -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = asked.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (seen, answer) = (seen.clone(), answer.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    let Ok(b) = s.read_u8().await else { return };
                    head.push(b);
                }
                let first = String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_owned();
                seen.lock().unwrap().push(first);
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, asked)
}
