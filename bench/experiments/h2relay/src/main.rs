//! h2relay: throwaway prototype. WebSocket sessions multiplexed over ONE HTTP/2 connection
//! between a "server" (accepts browsers' WebSockets, runs h2::client toward the agent) and an
//! "agent" (dials the server, runs h2::server, connects each stream to a local TCP app).
//!
//!   h2relay server --listen 127.0.0.1:P --agent-listen 127.0.0.1:P2 [h2 opts]
//!   h2relay agent  --server 127.0.0.1:P2 --app 127.0.0.1:A       [h2 opts]
//!
//! h2 opts: --stream-window BYTES (1 MiB) --conn-window BYTES (32 MiB)
//!          --frame-size BYTES (64 KiB) --send-buf BYTES (1 MiB) --read-buf BYTES (64 KiB)
//!          --no-mallopt (keep glibc's default trim/mmap thresholds)
//!          --coalesce BYTES (server: copy ready WS messages into one DATA frame up to BYTES; 0 = off)
//!          --no-gather (agent: one write per DATA frame instead of one writev per ready batch)

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, SinkExt, StreamExt};
use h2::{RecvStream, SendStream};
use std::future::poll_fn;
use std::io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

#[derive(Clone, Copy, Debug)]
struct Opts {
    stream_window: u32,
    conn_window: u32,
    frame_size: u32,
    send_buf: usize,
    read_buf: usize,
    gather: bool,
    coalesce: usize,
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn num(args: &[String], name: &str, default: u64) -> u64 {
    arg(args, name).map(|v| v.parse().expect(name)).unwrap_or(default)
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let opts = Opts {
        stream_window: num(&args, "--stream-window", 1 << 20) as u32,
        conn_window: num(&args, "--conn-window", 32 << 20) as u32,
        frame_size: num(&args, "--frame-size", 64 << 10) as u32,
        send_buf: num(&args, "--send-buf", 1 << 20) as usize,
        read_buf: num(&args, "--read-buf", 64 << 10) as usize,
        coalesce: num(&args, "--coalesce", 0) as usize,
        gather: !args.iter().any(|a| a == "--no-gather"),
    };
    // glibc malloc: keep freed memory instead of trimming/unmapping it after every 64 KiB+ frame
    // buffer (the bulk rows' page faults otherwise dominate). --no-mallopt to compare.
    if !args.iter().any(|a| a == "--no-mallopt") {
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
            libc::mallopt(libc::M_TOP_PAD, 16 << 20);
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    match args.get(1).map(String::as_str) {
        Some("server") => {
            let listen = arg(&args, "--listen").expect("--listen");
            let agent_listen = arg(&args, "--agent-listen").expect("--agent-listen");
            local.block_on(&rt, server(listen, agent_listen, opts))
        }
        Some("agent") => {
            let srv = arg(&args, "--server").expect("--server");
            let app = arg(&args, "--app").expect("--app");
            local.block_on(&rt, agent(srv, app, opts))
        }
        _ => {
            eprintln!("usage: h2relay server --listen A --agent-listen B | agent --server B --app C");
            std::process::exit(2)
        }
    }
}

fn h2err(e: h2::Error) -> io::Error {
    io::Error::other(e)
}

/// Sends `data` on `tx`, never more than the flow-control capacity h2 assigned (so at most the
/// stream window is buffered inside h2 per stream).
async fn send_flow(tx: &mut SendStream<Bytes>, mut data: Bytes) -> io::Result<()> {
    while !data.is_empty() {
        let mut cap = tx.capacity();
        if cap == 0 {
            tx.reserve_capacity(data.len());
            cap = match poll_fn(|cx| tx.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(h2err(e)),
                None => return Err(io::Error::other("stream closed")),
            };
            if cap == 0 {
                continue;
            }
        }
        let chunk = data.split_to(cap.min(data.len()));
        tx.send_data(chunk, false).map_err(h2err)?;
    }
    Ok(())
}

// ------------------------------------------------------------------ server side

async fn server(listen: String, agent_listen: String, o: Opts) -> io::Result<()> {
    let al = TcpListener::bind(&agent_listen).await?;
    let wl = TcpListener::bind(&listen).await?;
    eprintln!("h2relay server: waiting for the agent on {agent_listen}, WebSockets on {listen}");
    let (tcp, peer) = al.accept().await?;
    tcp.set_nodelay(true)?;
    let (send_req, conn) = h2::client::Builder::new()
        .initial_window_size(o.stream_window)
        .initial_connection_window_size(o.conn_window)
        .max_frame_size(o.frame_size)
        .max_send_buffer_size(o.send_buf)
        .max_concurrent_streams(1000)
        .max_concurrent_reset_streams(1000)
        .enable_push(false)
        .handshake::<_, Bytes>(tcp)
        .await
        .map_err(h2err)?;
    eprintln!("h2relay server: agent {peer} connected");
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.await {
            eprintln!("h2 connection ended: {e}");
        }
        std::process::exit(1);
    });
    loop {
        let (tcp, _) = wl.accept().await?;
        let _ = tcp.set_nodelay(true);
        let sr = send_req.clone();
        tokio::task::spawn_local(async move {
            if let Err(e) = ws_session(tcp, sr, o.coalesce).await {
                let _ = e; // sessions ending abruptly are normal under load tests
            }
        });
    }
}

async fn ws_session(
    tcp: TcpStream,
    send_req: h2::client::SendRequest<Bytes>,
    coalesce: usize,
) -> io::Result<()> {
    let ws = tokio_tungstenite::accept_async(tcp).await.map_err(io::Error::other)?;
    let mut sr = send_req.ready().await.map_err(h2err)?;
    let req = http::Request::post("http://agent/session").body(()).unwrap();
    let (resp, mut tx) = sr.send_request(req, false).map_err(h2err)?;
    let resp = resp.await.map_err(h2err)?;
    let mut rx: RecvStream = resp.into_body();
    let (mut ws_tx, mut ws_rx) = ws.split();

    let up = async {
        'outer: while let Some(msg) = ws_rx.next().await {
            let mut payload: Bytes = match msg.map_err(io::Error::other)? {
                Message::Binary(b) => b,
                Message::Text(t) => Bytes::from(t),
                Message::Close(_) => break,
                _ => continue,
            };
            if coalesce > 0 {
                // Copy the messages already readable into one DATA frame (fewer frames/writevs).
                let mut buf: Option<BytesMut> = None;
                while buf.as_ref().map_or(payload.len(), |b| b.len()) < coalesce {
                    let more = match ws_rx.next().now_or_never() {
                        Some(Some(m)) => match m.map_err(io::Error::other)? {
                            Message::Binary(b) => b,
                            Message::Text(t) => Bytes::from(t),
                            Message::Close(_) => {
                                let p = buf.map_or(payload, |b| b.freeze());
                                send_flow(&mut tx, p).await?;
                                break 'outer;
                            }
                            _ => continue,
                        },
                        _ => break,
                    };
                    let b = buf.get_or_insert_with(|| {
                        let mut b = BytesMut::with_capacity(coalesce + more.len());
                        b.extend_from_slice(&payload);
                        b
                    });
                    b.extend_from_slice(&more);
                }
                if let Some(b) = buf {
                    payload = b.freeze();
                }
            }
            send_flow(&mut tx, payload).await?;
        }
        let _ = tx.send_data(Bytes::new(), true);
        Ok::<_, io::Error>(())
    };
    let down = async {
        while let Some(chunk) = rx.data().await {
            let chunk = chunk.map_err(h2err)?;
            let n = chunk.len();
            ws_tx.send(Message::Binary(chunk)).await.map_err(io::Error::other)?;
            let _ = rx.flow_control().release_capacity(n);
        }
        let _ = ws_tx.close().await;
        Ok::<_, io::Error>(())
    };
    // Either direction ending ends the session (simple close handling for a prototype).
    let r = tokio::select! {
        r = up => r,
        r = down => r,
    };
    // Flushes tungstenite's queued close reply (or sends our close) before dropping.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), ws_tx.close()).await;
    r
}

// ------------------------------------------------------------------ agent side

/// Writes every chunk (one writev per call, as many chunks as the kernel takes), clears `chunks`.
async fn write_all_vectored<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    chunks: &mut Vec<Bytes>,
) -> io::Result<()> {
    use bytes::Buf;
    let mut i = 0;
    while i < chunks.len() {
        let slices: Vec<io::IoSlice> = chunks[i..].iter().map(|c| io::IoSlice::new(c)).collect();
        let mut n = w.write_vectored(&slices).await?;
        drop(slices);
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let l = chunks[i].len();
            if n >= l {
                n -= l;
                i += 1;
            } else {
                chunks[i].advance(n);
                n = 0;
            }
        }
    }
    chunks.clear();
    Ok(())
}

async fn agent(server: String, app: String, o: Opts) -> io::Result<()> {
    let tcp = TcpStream::connect(&server).await?;
    tcp.set_nodelay(true)?;
    let mut conn = h2::server::Builder::new()
        .initial_window_size(o.stream_window)
        .initial_connection_window_size(o.conn_window)
        .max_frame_size(o.frame_size)
        .max_send_buffer_size(o.send_buf)
        .max_concurrent_streams(1000)
        .max_concurrent_reset_streams(1000)
        .handshake::<_, Bytes>(tcp)
        .await
        .map_err(h2err)?;
    eprintln!("h2relay agent: connected to {server}, app {app}");
    // The accept loop drives the connection (this task is the connection's driver).
    while let Some(r) = conn.accept().await {
        let (req, respond) = r.map_err(h2err)?;
        let app = app.clone();
        tokio::task::spawn_local(async move {
            let _ = agent_stream(req, respond, app, o).await;
        });
    }
    eprintln!("h2relay agent: connection closed");
    Ok(())
}

async fn agent_stream(
    req: http::Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    app: String,
    o: Opts,
) -> io::Result<()> {
    let app_tcp = match TcpStream::connect(&app).await {
        Ok(t) => t,
        Err(e) => {
            let resp = http::Response::builder().status(502).body(()).unwrap();
            let _ = respond.send_response(resp, true);
            return Err(e);
        }
    };
    app_tcp.set_nodelay(true)?;
    let resp = http::Response::builder().status(200).body(()).unwrap();
    let mut tx = respond.send_response(resp, false).map_err(h2err)?;
    let mut rx = req.into_body();
    let (mut ar, mut aw) = app_tcp.into_split();

    let gather = o.gather;
    let to_app = async {
        let mut chunks: Vec<Bytes> = Vec::with_capacity(64);
        while let Some(chunk) = rx.data().await {
            chunks.push(chunk.map_err(h2err)?);
            // Gather the DATA frames already received for this stream into one writev.
            let mut total = chunks[0].len();
            let mut eof = false;
            while gather && chunks.len() < 64 && total < (4 << 20) {
                match rx.data().now_or_never() {
                    Some(Some(c)) => {
                        let c = c.map_err(h2err)?;
                        total += c.len();
                        chunks.push(c);
                    }
                    Some(None) => {
                        eof = true;
                        break;
                    }
                    None => break,
                }
            }
            write_all_vectored(&mut aw, &mut chunks).await?;
            let _ = rx.flow_control().release_capacity(total);
            if eof {
                break;
            }
        }
        let _ = aw.shutdown().await;
        Ok::<_, io::Error>(())
    };
    let from_app = async {
        let mut buf = BytesMut::with_capacity(o.read_buf);
        loop {
            if buf.capacity() < o.read_buf / 2 {
                buf.reserve(o.read_buf);
            }
            let n = ar.read_buf(&mut buf).await?;
            if n == 0 {
                break;
            }
            send_flow(&mut tx, buf.split().freeze()).await?;
        }
        let _ = tx.send_data(Bytes::new(), true);
        Ok::<_, io::Error>(())
    };
    tokio::select! {
        r = to_app => r,
        r = from_app => r,
    }
}
