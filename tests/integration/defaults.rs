//! The defaults a new user gets (issue 11), run through the real binary started websockify-style
//! (`wsbridge 127.0.0.1:0 HOST:PORT`, nothing else): no message size limit where the relay
//! streams, keepalive that releases a vanished client's backend, and frame-level trace lines
//! with `-vv`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::common::binary::Binary;
use crate::common::*;

/// The peak resident memory of a process (`VmHWM` in /proc/PID/status), in bytes; `None` where
/// there is no /proc.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Reads `expected.len()` bytes from `backend`, comparing as they come (nothing of the size of
/// the messages is kept on this side either); returns where the first difference was.
async fn expect_stream(mut backend: TcpStream, expected: Arc<Vec<u8>>) -> Result<(), String> {
    let mut at = 0;
    let mut buf = vec![0u8; 1 << 16];
    while at < expected.len() {
        let n = backend.read(&mut buf).await.map_err(|e| format!("backend read at {at}: {e}"))?;
        if n == 0 {
            return Err(format!("backend EOF after {at} of {} bytes", expected.len()));
        }
        let want = &expected[at..(at + n).min(expected.len())];
        if &buf[..want.len()] != want || n > want.len() {
            return Err(format!("bytes differ at or after offset {at}"));
        }
        at += n;
    }
    Ok(())
}

/// Valid UTF-8 of `len` bytes mixing 1-, 2-, 3- and 4-byte code points (a 10-byte period).
fn utf8_text(len: usize) -> Vec<u8> {
    let unit = "aé€😀".as_bytes();
    let mut text: Vec<u8> = unit.iter().copied().cycle().take(len - len % unit.len()).collect();
    text.resize(len, b'.');
    assert!(std::str::from_utf8(&text).is_ok());
    text
}

/// Issue 11, item 1: with default settings a 64 MiB binary message and a 64 MiB text message (in
/// frames of 1 MiB + 7 bytes, so frames, and the bridge's 256 KiB reads, end inside code points)
/// reach the backend byte-exact, and the bridge's peak memory grows by far less than one message
/// (it streams; the old default closed with 1009 above 1 MiB).
///
/// Memory is the bridge process's own `VmHWM`: the bridge runs as a child, so the test's 64 MiB
/// buffers are not counted, and a peak catches a buffer that was freed again before the end
/// (which a reading of current RSS would miss). No allocator hook is needed in either process.
#[tokio::test]
async fn large_messages_stream_through_with_bounded_bridge_memory() {
    const SIZE: usize = 64 << 20;
    // Generous for allocator slack and the per-thread scratch buffer; a bridge that held one
    // message (or a good part of one) would pass it many times over.
    const BOUND: u64 = 8 << 20;
    let (backend, mut streams) = manual_backend().await;
    let target = backend.to_string();
    let bridge = Binary::spawn(&["127.0.0.1:0", &target]).await;
    let pid = bridge.pid();
    let Some(before) = peak_rss(pid) else {
        return skip(
            "defaults::large_messages_stream_through_with_bounded_bridge_memory",
            "no /proc/PID/status here",
        );
    };

    let binary = pattern(SIZE, 11);
    let text = utf8_text(SIZE);
    let expected: Arc<Vec<u8>> = Arc::new([binary.as_slice(), text.as_slice()].concat());
    let mut wire = frame(0x82, &binary, true);
    drop(binary);
    let chunk = (1 << 20) + 7;
    let pieces = text.len().div_ceil(chunk);
    for (i, piece) in text.chunks(chunk).enumerate() {
        let opcode = if i == 0 { 0x01 } else { 0x00 };
        let fin = if i + 1 == pieces { 0x80 } else { 0 };
        wire.extend(frame(fin | opcode, piece, true));
    }
    drop(text);

    let mut client = raw_ws(bridge.addr, "/").await;
    let b = within("backend accept", streams.recv()).await.unwrap();
    let check = tokio::spawn(expect_stream(b, expected));
    let (result, sent) = tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(check, client.write_all(&wire)) })
        .await
        .expect("two 64 MiB messages did not pass in 60 s");
    if let Err(e) = result.unwrap() {
        // Say what the client heard (1009 "message too big" on the old default).
        let close = tokio::time::timeout(Duration::from_secs(1), raw_read_close(&mut client)).await;
        panic!("{e}; the client's upload: {sent:?}; it heard {close:?}");
    }
    let after = peak_rss(pid).unwrap();
    eprintln!("bridge peak memory: {} KiB, then {} KiB", before >> 10, after >> 10);
    assert!(
        after.saturating_sub(before) < BOUND,
        "the bridge's peak memory grew by {} KiB (from {} KiB) carrying two {} MiB messages",
        (after - before) >> 10,
        before >> 10,
        SIZE >> 20
    );
}

/// Issue 11, item 2: with default settings a client that goes silent after the handshake (reads
/// nothing, answers no ping, its TCP connection stays up) has its backend released by the pong
/// deadline: ping at 20 s, no pong by 40 s. Not before 40 s (minus a little for timer
/// granularity), not after 45 s. A client idle as long that answers pings (tungstenite does as
/// it reads) keeps its session past that point, both ways.
#[tokio::test]
async fn a_vanished_client_releases_its_backend_within_45_s_by_default() {
    let (backend, mut streams) = manual_backend().await;
    let target = backend.to_string();
    let bridge = Binary::spawn(&["127.0.0.1:0", &target]).await;
    let url = format!("ws://{}/", bridge.addr);

    let (healthy, _) = ws_connect(&url, None).await;
    let mut healthy_backend = within("backend accept", streams.recv()).await.unwrap();
    let (mut healthy_tx, mut healthy_rx) = healthy.split();
    let reader = tokio::spawn(async move {
        let mut pings = 0u32;
        loop {
            match healthy_rx.next().await {
                Some(Ok(Message::Ping(_))) => pings += 1,
                other => return (pings, other),
            }
        }
    });

    let start = Instant::now();
    let (silent, _) = ws_connect(&url, None).await;
    let mut silent_backend = within("backend accept", streams.recv()).await.unwrap();
    // Held and never polled: the kernel acknowledges what arrives, nothing answers it.
    let _silent = silent;

    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(50), silent_backend.read_to_end(&mut rest)).await;
    let elapsed = start.elapsed();
    assert!(ended.is_ok(), "the silent client's backend was still held after {elapsed:?}");
    assert!(
        elapsed >= Duration::from_millis(39_500) && elapsed <= Duration::from_secs(45),
        "the silent client's backend was released after {elapsed:?}, outside 40..45 s"
    );

    // The healthy client, idle as long, is still connected both ways.
    healthy_backend.write_all(b"still here").await.unwrap();
    let (pings, got) = within("the healthy client's message", reader).await.unwrap();
    assert!(
        matches!(&got, Some(Ok(Message::Binary(d))) if d.as_ref() == b"still here"),
        "{got:?} after {pings} pings"
    );
    assert!(pings >= 1, "the healthy client was never pinged");
    futures_util::SinkExt::send(&mut healthy_tx, Message::binary(b"and back".to_vec()))
        .await
        .unwrap();
    let mut got = [0u8; 8];
    within("the healthy client's upload", healthy_backend.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(&got, b"and back");
}

/// Issue 11, item 9: `-vv` shows every frame, both ways (direction, opcode, length), and the
/// backend's reads and writes, never a payload.
#[tokio::test]
async fn trace_level_shows_frames_without_payload() {
    let (backend, _) = echo_backend().await;
    let target = backend.to_string();
    let mut bridge = Binary::spawn(&["-vv", "127.0.0.1:0", &target]).await;
    let marker = b"SECRET-PAYLOAD-4f1d9c";
    let (mut ws, _) = ws_connect(&format!("ws://{}/", bridge.addr), None).await;
    send_bin(&mut ws, marker).await;
    assert_eq!(recv_data(&mut ws).await, marker);
    futures_util::SinkExt::close(&mut ws).await.unwrap();
    let len = format!("len={}", marker.len());
    let wanted = [
        ["client->bridge", "opcode=binary", "fin=true", &len],
        ["bridge->backend", "write", &len, ""],
        ["backend->bridge", "read", &len, ""],
        ["bridge->client", "opcode=binary", &len, ""],
        ["client->bridge", "opcode=close", "len=0", ""],
        ["bridge->client", "opcode=close", "len=0", ""],
    ];
    bridge.line("session closed").await;
    let seen = bridge.lines();
    let secret = String::from_utf8_lossy(marker);
    for line in &seen {
        assert!(!line.contains(&*secret), "a log line holds the payload: {line}");
    }
    for want in wanted {
        assert!(
            seen.iter().any(|l| l.contains("TRACE") && want.iter().all(|w| l.contains(w))),
            "no trace line with {want:?} in:\n{}",
            seen.join("\n")
        );
    }
}
