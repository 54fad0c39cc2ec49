//! `wsbridge demo`: something useful with no setup. A line-protocol chat server on a loopback TCP
//! port (every line from one client goes to all), wsbridge in front of it with `lines` framing on
//! `/chat`, and a page served by wsbridge to chat from the browser.
//!
//! The chat server is an ordinary TCP service: any TCP client joins the same room (the demo
//! prints a [`join_command`] that needs only bash), which is the point of the demo.
//!
//! With `--agent` ([`Demo::start_with_agent`]) the chat server is reached the agent-mode way: the
//! bridge's `/chat` route targets the service `chat` of an agent, and an agent in the same process
//! dials the bridge's `/agent` endpoint and carries the page's sessions to the chat server, as a
//! `wsbridge agent` on a user's computer would carry them to a desktop app.
//!
//! [`Demo::start`] sets it all up through [`crate::server::start`], as the binary serves a
//! configuration; `main.rs` adds signals and the lines it prints.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Framing, ListenerConfig, Matcher, RouteConfig, Target};
use crate::server::start::{self, Bound, StartError};
use crate::server::{Bridge, BridgeError, Drained};
use crate::tls::TlsSettings;

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The chat server's port on loopback.
    #[error("cannot start the chat server")]
    Chat(#[source] std::io::Error),
    /// The page's directory.
    #[error("cannot write the demo page")]
    Page(#[source] std::io::Error),
    /// The demo's configuration is unusable (a bad listen address or certificate, say).
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    /// Binding the listener.
    #[error(transparent)]
    Start(#[from] StartError),
}

/// `wsbridge demo`, started: the chat server runs, the page is written, the listener is bound.
/// [`Demo::serve`] serves it until the bridge's shutdown token is cancelled.
#[derive(Debug)]
pub struct Demo {
    bridge: Bridge,
    bound: Bound,
    chat: SocketAddr,
    tls: bool,
    /// The in-process agent of `--agent`, stopped when the demo ends.
    agent: Option<crate::agent::client::AgentHandle>,
    /// Removed when the demo ends, however it ends.
    _web: WebRoot,
}

/// The page's directory, removed on drop.
#[derive(Debug)]
struct WebRoot(PathBuf);

impl Drop for WebRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Demo {
    /// Starts the chat server on a loopback port, writes the page, and binds `listen` (one
    /// runtime thread: a demo). With `tls`, the page and the chat are served over TLS.
    ///
    /// # Errors
    /// The chat server's port or the page's directory cannot be had; the certificate cannot be
    /// used; `listen` cannot be bound.
    pub async fn start(listen: SocketAddr, tls: Option<TlsSettings>) -> Result<Demo, DemoError> {
        Demo::start_inner(listen, tls, false).await
    }

    /// [`Demo::start`] in agent mode: the page's sessions cross an agent (see the module doc).
    ///
    /// # Errors
    /// As [`Demo::start`]; also the system's random source failing (the agent's secret).
    pub async fn start_with_agent(listen: SocketAddr, tls: Option<TlsSettings>) -> Result<Demo, DemoError> {
        Demo::start_inner(listen, tls, true).await
    }

    async fn start_inner(listen: SocketAddr, tls: Option<TlsSettings>, agent: bool) -> Result<Demo, DemoError> {
        let chat = TcpListener::bind("127.0.0.1:0").await.map_err(DemoError::Chat)?;
        let chat_addr = chat.local_addr().map_err(DemoError::Chat)?;
        let web = WebRoot(write_web_root().map_err(DemoError::Page)?);
        let mut config = config(listen, &web.0, chat_addr);
        let secret = match agent {
            true => {
                let secret = crate::agent::link::new_secret().map_err(DemoError::Chat)?;
                agent_mode(&mut config, &secret);
                Some(secret)
            }
            false => None,
        };
        let with_tls = tls.is_some();
        config.listeners[0].tls = tls;
        start::raise_open_file_limit();
        let bridge = Bridge::new(&config)?;
        let bound = start::bind(&config, 1)?;
        spawn_chat_server(chat, bridge.shutdown_token());
        let agent = match secret {
            None => None,
            Some(secret) => {
                // Plain ws:// over loopback to the bound port: the agent is in this process
                // (a TLS listener takes plain connections too unless it is TLS-only).
                let port = bound.addrs()[0].port();
                let server = format!("ws://127.0.0.1:{port}/agent")
                    .parse()
                    .map_err(|e: String| DemoError::Chat(std::io::Error::other(e)))?;
                let mut c = crate::agent::client::AgentConfig::new(server, DEMO_AGENT.into(), secret);
                // Loopback, in this process: no proxy, and the log says so (not "from the proxy
                // option", which the demo has none of).
                c.proxy_source = crate::agent::client::ProxySource::Off;
                c.services.insert(
                    "chat".into(),
                    Target::Tcp {
                        host: chat_addr.ip().to_string(),
                        port: chat_addr.port(),
                    },
                );
                Some(crate::agent::client::spawn(c).map_err(|e| DemoError::Chat(std::io::Error::other(e)))?)
            }
        };
        Ok(Demo {
            bridge,
            bound,
            chat: chat_addr,
            tls: with_tls,
            agent,
            _web: web,
        })
    }

    /// The bridge, for signal handlers: cancelling its shutdown token stops the demo.
    pub fn bridge(&self) -> &Bridge {
        &self.bridge
    }

    /// The page's address, for a browser.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/", self.bound.addrs()[0])
    }

    /// The chat server's address (plain TCP on loopback).
    pub fn chat_addr(&self) -> SocketAddr {
        self.chat
    }

    /// Serves until the bridge's shutdown token is cancelled, then drains and removes the page.
    ///
    /// # Errors
    /// See [`Bound::serve`].
    pub async fn serve(self) -> Result<Drained, StartError> {
        let drained = self.bound.serve(&self.bridge).await;
        if let Some(agent) = self.agent {
            agent.shutdown.cancel();
            let _ = agent.task.await;
        }
        drained
    }

    /// Whether the page's sessions cross an agent (`--agent`).
    pub fn agent_mode(&self) -> bool {
        self.agent.is_some()
    }
}

/// The name of `--agent`'s agent.
pub const DEMO_AGENT: &str = "demo-agent";

/// Turns the demo's `/chat` route into an agent route: the agent [`DEMO_AGENT`] with `secret`,
/// dialling `/agent`, serving `chat`.
fn agent_mode(config: &mut Config, secret: &str) {
    use crate::agent::{link, AgentDecl, EndpointConfig};
    let Some(secret_sha256) = link::parse_sha256(&link::secret_sha256(secret)) else {
        return;
    };
    config.agents.declared.push(AgentDecl {
        name: DEMO_AGENT.into(),
        secret_sha256: vec![secret_sha256],
    });
    config.agents.endpoints.push(EndpointConfig {
        path: "/agent".into(),
        pool: crate::agent::DEFAULT_POOL,
    });
    for r in &mut config.routes {
        r.target = Target::Agent {
            agent: DEMO_AGENT.into(),
            service: "chat".into(),
        };
    }
}

/// The demo page, built into the binary.
pub const INDEX_HTML: &str = include_str!("../assets/demo/index.html");

/// Longest chat line; longer ones are cut (the room is bounded like everything else).
const MAX_LINE: usize = 4096;
/// Lines a slow member may fall behind before it skips some.
const ROOM_BACKLOG: usize = 256;

/// Starts the chat server on `listener` and returns at once; it stops with `shutdown`.
pub fn spawn_chat_server(listener: TcpListener, shutdown: CancellationToken) {
    let (room, _) = broadcast::channel::<String>(ROOM_BACKLOG);
    let next_id = AtomicU64::new(1);
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "chat server accept failed");
                        continue;
                    }
                },
            };
            let name = format!("guest-{}", next_id.fetch_add(1, Ordering::Relaxed));
            tokio::spawn(member(stream, name, room.clone(), shutdown.clone()));
        }
    });
}

async fn member(stream: TcpStream, name: String, room: broadcast::Sender<String>, shutdown: CancellationToken) {
    let mut inbox = room.subscribe();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    if write.write_all(format!("* welcome, you are {name}\n").as_bytes()).await.is_err() {
        return;
    }
    let _ = room.send(format!("* {name} joined"));
    let mut buf = Vec::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            said = read_line(&mut lines, &mut buf) => match said {
                Some(text) if !text.trim().is_empty() => { let _ = room.send(format!("{name}: {}", text.trim_end())); }
                Some(_) => {}
                None => break,
            },
            heard = inbox.recv() => match heard {
                Ok(line) => if write.write_all(format!("{line}\n").as_bytes()).await.is_err() { break },
                Err(broadcast::error::RecvError::Lagged(n)) => { let _ = write.write_all(format!("* {n} lines skipped\n").as_bytes()).await; }
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    let _ = room.send(format!("* {name} left"));
}

/// One line (lossy UTF-8, at most [`MAX_LINE`] bytes kept), or `None` at EOF or error.
///
/// Cancel-safe, as the member's `select!` needs: the bytes of a line read before a cancellation
/// stay in `buf` (which holds only the line being read), and the next call goes on from them.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Option<String> {
    // Bounded: a longer line is cut, and its rest is read as the next one. The room left is
    // counted from what `buf` already holds, so the bound survives a cancellation too.
    let room = MAX_LINE.saturating_sub(buf.len());
    let n = (&mut *r).take(room as u64).read_until(b'\n', buf).await.ok()?;
    if n == 0 && buf.is_empty() {
        return None;
    }
    let line = String::from_utf8_lossy(buf).into_owned();
    buf.clear();
    Some(line)
}

/// What the demo prints for joining the chat from a terminal: bash's `/dev/tcp` (stock Debian
/// and most Linux systems have bash; `nc` and `telnet` are often not installed). It prints what
/// the room says and sends what is typed; Ctrl-D or Ctrl-C leaves.
pub fn join_command(chat: SocketAddr) -> String {
    format!(
        "bash -c 'exec 3<>/dev/tcp/{}/{}; cat <&3 & cat >&3; kill $!'",
        chat.ip(),
        chat.port()
    )
}

/// Writes the demo page into a fresh directory under the system temp dir, for the static-file
/// server to serve. The caller removes it.
///
/// # Errors
/// The directory cannot be created or written.
pub fn write_web_root() -> std::io::Result<PathBuf> {
    // A fresh directory only we can write: create (not reuse) it, mode 0700, with a name that is
    // not just the pid, so nobody can plant a page in it beforehand.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("wsbridge-demo-{}-{nanos:08x}", std::process::id()));
    crate::platform::create_private_dir(&dir)?;
    std::fs::write(dir.join("index.html"), INDEX_HTML)?;
    Ok(dir)
}

/// The demo's configuration: `listen` serving `web` and routing `/chat` to the chat server.
pub fn config(listen: SocketAddr, web: &Path, chat: SocketAddr) -> Config {
    let mut config = Config::new("demo");
    config.listeners.push(ListenerConfig {
        web: Some(web.to_path_buf()),
        ..ListenerConfig::new(listen)
    });
    let mut options = config.default_route_options();
    options.framing = Framing::Lines;
    options.max_message_size = Some(MAX_LINE);
    config.routes.push(RouteConfig {
        matcher: Matcher::Path("/chat".into()),
        target: Target::Tcp {
            host: chat.ip().to_string(),
            port: chat.port(),
        },
        options,
    });
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_join_command_needs_only_bash() {
        let command = join_command("127.0.0.1:40131".parse().unwrap());
        assert_eq!(command, "bash -c 'exec 3<>/dev/tcp/127.0.0.1/40131; cat <&3 & cat >&3; kill $!'");
        assert!(!command.contains("nc "), "{command}");
    }
}
