//! `wsbridge demo`: something useful with no setup. A line-protocol chat server on a loopback TCP
//! port (every line from one client goes to all), wsbridge in front of it with `lines` framing on
//! `/chat`, and a page served by wsbridge to chat from the browser.
//!
//! The chat server is an ordinary TCP service: `nc 127.0.0.1 PORT` joins the same room, which is
//! the point of the demo.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Framing, ListenerConfig, Matcher, RouteConfig, Target};

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
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Option<String> {
    buf.clear();
    // Bounded: a longer line is cut, and its rest is read as the next one.
    let n = (&mut *r).take(MAX_LINE as u64).read_until(b'\n', buf).await.ok()?;
    if n == 0 {
        return None;
    }
    buf.truncate(MAX_LINE);
    Some(String::from_utf8_lossy(buf).into_owned())
}

/// Writes the demo page into a fresh directory under the system temp dir, for the static-file
/// server to serve. The caller removes it.
///
/// # Errors
/// The directory cannot be created or written.
pub fn write_web_root() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    // A fresh directory only we can write: create (not reuse) it, mode 0700, with a name that is
    // not just the pid, so nobody can plant a page in it beforehand.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("wsbridge-demo-{}-{nanos:08x}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    std::fs::write(dir.join("index.html"), INDEX_HTML)?;
    Ok(dir)
}

/// The demo's configuration: `listen` serving `web` and routing `/chat` to the chat server.
pub fn config(listen: SocketAddr, web: &Path, chat: SocketAddr) -> Config {
    let mut config = Config::new("demo");
    config.listeners.push(ListenerConfig {
        addr: listen,
        web: Some(web.to_path_buf()),
        web_listing: false,
        web_follow_symlinks: false,
        web_dotfiles: false,
        tls: None,
    });
    let mut options = config.default_route_options();
    options.framing = Framing::Lines;
    options.max_message_size = MAX_LINE;
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
