//! The pump: bytes both ways, framing modes, no loss at close, protocol errors.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use wsbridge::config::Framing;

use crate::common::*;

#[tokio::test]
async fn megabytes_both_ways_at_once_byte_exact() {
    let (backend, _) = echo_backend().await;
    let bridge = TestBridge::start(any_path_to(backend)).await;
    let (ws, _) = ws_connect(&bridge.url("/"), None).await;
    let (mut tx, mut rx) = ws.split();
    let data = pattern(8 << 20, 7);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(64 * 1024) {
            tx.send(Message::binary(chunk.to_vec())).await.unwrap();
        }
        tx
    });
    let mut got = Vec::with_capacity(data.len());
    within("8 MiB echoed", async {
        while got.len() < data.len() {
            match rx.next().await.unwrap().unwrap() {
                Message::Binary(b) => got.extend_from_slice(&b),
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
    assert!(got == data, "echoed bytes differ");
    let mut tx = within("writer", writer).await.unwrap();
    tx.send(Message::Close(None)).await.unwrap();
    bridge.stop().await;
}

#[tokio::test]
async fn backend_eof_delivers_everything_then_1000() {
    let data = pattern(3 << 20, 1);
    let backend = source_backend(data.clone()).await;
    let bridge = TestBridge::start(any_path_to(backend)).await;
    let (mut ws, _) = ws_connect(&bridge.url("/"), None).await;
    let (msgs, close) = read_until_close(&mut ws).await;
    let got: Vec<u8> = msgs.into_iter().flat_map(|m| m.into_data().to_vec()).collect();
    assert_eq!(got.len(), data.len());
    assert!(got == data);
    let close = close.expect("close frame");
    assert_eq!(u16::from(close.code), 1000);
    assert_eq!(close.reason.as_str(), "backend closed");
}

/// A backend that answers and hangs up while the client is still uploading (a refusal's
/// message, a line server's `bye`) resets the connection, as the kernel does for a socket closed
/// with bytes unread: the bridge's next write to it fails. What it wrote before still reaches
/// the client, before the close (a clients review: lost in 5 of 20 sessions, with 1011, when the
/// write failed first).
#[tokio::test]
async fn a_backend_that_answers_and_hangs_up_on_an_upload_has_its_answer_delivered() {
    let (backend, mut accepted) = manual_backend().await;
    let bridge = TestBridge::start(any_path_to(backend)).await;
    // The reset is said (a review: reported as a clean 1000 "backend closed" at first).
    answered_then_reset(&bridge.url("/"), &mut accepted, 20, "reset").await;
    bridge.stop().await;
}

/// A backend that stops reading (shuts its reading side: our writes fail) but stays open and
/// says something: the client gets what it said, then 1011 with the write's error, one close
/// timeout after the failed write, with a close handshake (a review: the session ended at that
/// deadline without a close frame, a 1006 for the page).
#[cfg(unix)]
#[tokio::test]
async fn a_backend_that_stops_reading_but_stays_open_gets_its_words_through_then_1011() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (held_tx, _held) = tokio::sync::mpsc::channel::<tokio::net::UnixStream>(1);
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut b = [0u8; 16];
        let _ = s.read(&mut b).await;
        let std = s.into_std().unwrap();
        std.shutdown(std::net::Shutdown::Read).unwrap();
        let mut s = tokio::net::UnixStream::from_std(std).unwrap();
        s.write_all(b"bye\n").await.unwrap();
        // Held open for the test's length.
        let _ = held_tx.send(s).await;
    });
    let mut config = config_with(wsbridge::config::Matcher::AnyPath, wsbridge::config::Target::Unix(path));
    config.timeouts.close = Duration::from_millis(600);
    let bridge = TestBridge::start(config).await;
    let (mut r, mut w) = raw_ws(bridge.addr, "/").await.into_split();
    let writer = tokio::spawn(async move {
        for _ in 0..64 {
            if w.write_all(&frame(0x82, &pattern(64 * 1024, 1), true)).await.is_err() {
                break;
            }
        }
        w
    });
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let mut data = Vec::new();
    let close = within("the close", async {
        loop {
            let (opcode, payload) = read_frame_from(&mut r, &mut buf).await;
            match opcode {
                0x2 => data.extend_from_slice(&payload),
                0x8 => {
                    return (
                        u16::from_be_bytes([payload[0], payload[1]]),
                        String::from_utf8_lossy(&payload[2..]).into_owned(),
                    )
                }
                _ => {}
            }
        }
    })
    .await;
    let took = started.elapsed();
    assert_eq!(data, b"bye\n");
    assert_eq!(close.0, 1011, "{close:?}");
    assert!(close.1.contains("backend write failed"), "{close:?}");
    // The write fails within moments of the start: the deadline is a close timeout after it.
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_millis(600) + LATE,
        "{took:?}"
    );
    writer.abort();
}

/// One frame (opcode, payload; a server's frames are unmasked) from `r`; `buf` keeps what was
/// read past it.
async fn read_frame_from<R: tokio::io::AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> (u8, Vec<u8>) {
    loop {
        let head = match buf.get(1).map(|b| b & 0x7f) {
            Some(126) if buf.len() >= 4 => Some((u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)),
            Some(127) if buf.len() >= 10 => Some((u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize, 10)),
            Some(n) if n < 126 => Some((n as usize, 2)),
            _ => None,
        };
        if let Some((len, head)) = head.filter(|(len, head)| buf.len() >= head + len) {
            let frame: Vec<u8> = buf.drain(..head + len).collect();
            return (frame[0] & 0x0f, frame[head..].to_vec());
        }
        let mut chunk = [0u8; 4096];
        let n = r.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the connection ended without a close frame");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn client_close_delivers_everything_then_fin() {
    let (backend, mut received) = sink_backend().await;
    let bridge = TestBridge::start(any_path_to(backend)).await;
    let (mut ws, _) = ws_connect(&bridge.url("/"), None).await;
    let data = pattern(2 << 20, 3);
    for chunk in data.chunks(50_000) {
        send_bin(&mut ws, chunk).await;
    }
    ws.send(Message::Close(None)).await.unwrap();
    // The backend sees all bytes, then EOF (its read_to_end returns).
    let got = within("backend EOF", received.recv()).await.unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data);
    // And the client gets its close answered: an empty close frame echoed as one.
    let (_, close) = read_until_close(&mut ws).await;
    assert_eq!(close, None);
}

#[tokio::test]
async fn text_frames_are_forwarded_and_pings_are_not() {
    let (backend, mut received) = sink_backend().await;
    let bridge = TestBridge::start(any_path_to(backend)).await;
    let (mut ws, _) = ws_connect(&bridge.url("/"), None).await;
    ws.send(Message::Ping("ping-payload".into())).await.unwrap();
    ws.send(Message::text("héllo ")).await.unwrap();
    ws.send(Message::Pong("pong-payload".into())).await.unwrap();
    ws.send(Message::binary(b"world".to_vec())).await.unwrap();
    // The ping is answered with a pong carrying its payload.
    let pong = within("pong", async {
        loop {
            if let Message::Pong(p) = ws.next().await.unwrap().unwrap() {
                return p;
            }
        }
    })
    .await;
    assert_eq!(&pong[..], b"ping-payload");
    ws.send(Message::Close(None)).await.unwrap();
    let got = within("backend EOF", received.recv()).await.unwrap();
    assert_eq!(String::from_utf8(got).unwrap(), "héllo world");
}

#[tokio::test]
async fn lines_framing_both_ways() {
    let (backend, mut streams) = manual_backend().await;
    let mut config = any_path_to(backend);
    config.routes[0].options.framing = Framing::Lines;
    let bridge = TestBridge::start(config).await;
    let (mut ws, _) = ws_connect(&bridge.url("/"), None).await;
    let mut b = within("backend accept", streams.recv()).await.unwrap();
    b.write_all(b"first line\r\nsecond").await.unwrap();
    b.write_all(b" line\nthird").await.unwrap();
    let m1 = within("msg", ws.next()).await.unwrap().unwrap();
    assert_eq!(m1, Message::text("first line"));
    let m2 = within("msg", ws.next()).await.unwrap().unwrap();
    assert_eq!(m2, Message::text("second line"));
    // Client messages get a newline unless they end with one.
    ws.send(Message::text("hello")).await.unwrap();
    ws.send(Message::text("there\n")).await.unwrap();
    let mut buf = vec![0u8; 12];
    within("backend read", b.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"hello\nthere\n");
    // The unfinished line goes out at EOF, then the close.
    b.shutdown().await.unwrap();
    let (msgs, close) = read_until_close(&mut ws).await;
    assert_eq!(msgs, vec![Message::text("third")]);
    assert_eq!(u16::from(close.unwrap().code), 1000);
}

#[tokio::test]
async fn text_framing_never_splits_code_points() {
    let (backend, mut streams) = manual_backend().await;
    let mut config = any_path_to(backend);
    config.routes[0].options.framing = Framing::Text;
    let bridge = TestBridge::start(config).await;
    let (mut ws, _) = ws_connect(&bridge.url("/"), None).await;
    let mut b = within("backend accept", streams.recv()).await.unwrap();
    let text = "price: 5€, naïve";
    let bytes = text.as_bytes();
    let euro = text.find('€').unwrap() + 1; // inside the euro sign
    b.write_all(&bytes[..euro]).await.unwrap();
    let first = within("msg", ws.next()).await.unwrap().unwrap();
    assert_eq!(first, Message::text("price: 5"));
    b.write_all(&bytes[euro..]).await.unwrap();
    b.shutdown().await.unwrap();
    let (msgs, _) = read_until_close(&mut ws).await;
    let rest: String = msgs.into_iter().map(|m| m.into_text().unwrap().to_string()).collect();
    assert_eq!(format!("price: 5{rest}"), text);
}

#[tokio::test]
async fn protocol_violations_get_1002_and_bad_utf8_1007() {
    let (backend, _) = echo_backend().await;
    let bridge = TestBridge::start(any_path_to(backend)).await;
    let mut bad_reason = vec![0x03, 0xe8];
    bad_reason.extend_from_slice(b"bye \xff");
    let cases: [(&str, Vec<u8>, u16); 6] = [
        ("unmasked frame", frame(0x82, b"unmasked", false), 1002),
        ("RSV1 without an extension", frame(0x80 | 0x40 | 0x02, b"rsv1", true), 1002),
        ("ping over 125 bytes", frame(0x89, &[b'p'; 200], true), 1002),
        ("close code 999", frame(0x88, &[0x03, 0xe7], true), 1002),
        ("invalid UTF-8 in a text message", frame(0x81, b"ok \xff\xfe", true), 1007),
        ("invalid UTF-8 in a close reason", frame(0x88, &bad_reason, true), 1007),
    ];
    for (what, bytes, expected) in cases {
        let mut s = raw_ws(bridge.addr, "/").await;
        s.write_all(&bytes).await.unwrap();
        let (code, reason) = raw_read_close(&mut s).await;
        assert_eq!(code, expected, "{what}: {reason}");
        if what.contains("close reason") {
            assert_eq!(reason, "invalid UTF-8 in close reason");
        }
    }
}

/// What the Autobahn test suite checks of a server's framing, as deterministic cases: each
/// protocol violation gets its close code (1002, or 1007 for UTF-8, split across fragments
/// too), every close code the RFC and IANA register is echoed, every other one is a 1002, and a
/// ping in the middle of a fragmented message is answered before the close.
#[tokio::test]
async fn frames_and_close_codes_as_the_autobahn_suite_checks_them() {
    let (backend, _) = echo_backend().await;
    let bridge = TestBridge::start(any_path_to(backend)).await;
    let close = |code: u16| frame(0x88, &code.to_be_bytes(), true);
    let cat = |frames: &[Vec<u8>]| frames.concat();
    let mut huge = vec![0x82, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 0];
    huge.extend_from_slice(&[1, 2, 3, 4]);
    let violations: Vec<(&str, Vec<u8>, u16)> = vec![
        ("reserved opcode 3", frame(0x83, b"x", true), 1002),
        ("reserved control opcode 11", frame(0x8B, b"", true), 1002),
        ("a ping with FIN clear", frame(0x09, b"p", true), 1002),
        ("a close with FIN clear", frame(0x08, &1000u16.to_be_bytes(), true), 1002),
        ("a continuation with nothing to continue", frame(0x80, b"x", true), 1002),
        (
            "a new message inside a fragmented one",
            cat(&[frame(0x01, b"a", true), frame(0x81, b"b", true)]),
            1002,
        ),
        ("a 64-bit length with its top bit set", huge, 1002),
        ("a close with a 1-byte payload", frame(0x88, &[0x03], true), 1002),
        (
            "invalid UTF-8 across two fragments",
            cat(&[frame(0x01, b"ok \xce", true), frame(0x80, b"\xff", true)]),
            1007,
        ),
        (
            "a truncated code point at the message's end",
            frame(0x81, b"ok \xe2\x82", true),
            1007,
        ),
    ];
    for (what, bytes, expected) in violations {
        let mut s = raw_ws(bridge.addr, "/").await;
        s.write_all(&bytes).await.unwrap();
        let (code, reason) = raw_read_close(&mut s).await;
        assert_eq!(code, expected, "{what}: {reason}");
    }
    for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
        let mut s = raw_ws(bridge.addr, "/").await;
        s.write_all(&close(code)).await.unwrap();
        assert_eq!(raw_read_close(&mut s).await.0, 1002, "close code {code}");
    }
    for code in [
        1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999,
    ] {
        let mut s = raw_ws(bridge.addr, "/").await;
        s.write_all(&close(code)).await.unwrap();
        assert_eq!(raw_read_close(&mut s).await.0, code, "close code {code} echoed");
    }
    let mut s = raw_ws(bridge.addr, "/").await;
    let fragmented = cat(&[
        frame(0x01, b"Hel", true),
        frame(0x89, b"between", true),
        frame(0x80, b"lo", true),
        close(1000),
    ]);
    s.write_all(&fragmented).await.unwrap();
    let mut pongs = Vec::new();
    let code = loop {
        match raw_read_frame(&mut s).await {
            (0x0A, p) => pongs.push(p),
            (0x08, p) => break u16::from_be_bytes([p[0], p[1]]),
            _ => {}
        }
    };
    assert_eq!((pongs, code), (vec![b"between".to_vec()], 1000));
}

/// Sends `pings` numbered pings and a close in one write; the pongs' payloads that come back
/// before the close's echo.
async fn pongs(s: &mut tokio::net::TcpStream, pings: usize) -> Vec<String> {
    let mut bytes = Vec::new();
    for i in 0..pings {
        bytes.extend(frame(0x89, format!("payload-{i}").as_bytes(), true));
    }
    bytes.extend(frame(0x88, &1000u16.to_be_bytes(), true));
    s.write_all(&bytes).await.unwrap();
    let mut got = Vec::new();
    loop {
        match raw_read_frame(s).await {
            (0x0A, p) => got.push(String::from_utf8(p).unwrap()),
            (0x08, _) => return got,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Every ping gets its pong, in order, even when several arrive in one read (Autobahn's case
/// 2.10); past 16 waiting at once the oldest are given up (RFC 6455 §5.5.3 asks only for the
/// latest), so a flood of pings costs bounded memory.
#[tokio::test]
async fn each_ping_gets_its_pong_and_a_flood_is_bounded() {
    let (backend, _) = echo_backend().await;
    let bridge = TestBridge::start(any_path_to(backend)).await;
    let mut s = raw_ws(bridge.addr, "/").await;
    let got = pongs(&mut s, 10).await;
    assert_eq!(got, (0..10).map(|i| format!("payload-{i}")).collect::<Vec<_>>());
    let mut s = raw_ws(bridge.addr, "/").await;
    let got = pongs(&mut s, 100).await;
    // The 100 arrive in one segment and are read at once (16 pongs back here), or in a few
    // reads: either way older ones were given up, the rest in order, the last one answered.
    assert!((16..100).contains(&got.len()), "{got:?}");
    assert_eq!(got.last().map(String::as_str), Some("payload-99"));
    let numbers: Vec<usize> = got.iter().map(|p| p["payload-".len()..].parse().unwrap()).collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
}

#[tokio::test]
async fn too_big_message_is_closed_with_1009() {
    let (backend, _) = echo_backend().await;
    let mut config = any_path_to(backend);
    config.routes[0].options.max_message_size = Some(1000);
    let bridge = TestBridge::start(config).await;
    let (mut ws, _) = ws_connect(&bridge.url("/"), None).await;
    // Fits: echoed.
    send_bin(&mut ws, &[1u8; 1000]).await;
    assert_eq!(recv_data(&mut ws).await.len(), 1000);
    // One byte over: 1009.
    send_bin(&mut ws, &[1u8; 1001]).await;
    let (code, reason) = read_close(&mut ws).await;
    assert_eq!(code, 1009);
    assert!(reason.contains("too big"), "{reason}");
}

/// A client cut off with 1009 in the middle of a message far over the limit may still be
/// sending megabytes of it: the bridge reads and drops them until the client closes (within the
/// close timeout), rather than resetting the connection after 64 KiB, which made Chromium and
/// Node drop the 1009 they had received and report 1006 (a clients review: in 2-8 of 10 pages).
#[tokio::test]
async fn a_client_cut_off_with_1009_can_finish_sending_and_read_its_close() {
    let (backend, _) = echo_backend().await;
    let mut config = any_path_to(backend);
    config.routes[0].options.max_message_size = Some(1 << 20);
    let bridge = TestBridge::start(config).await;
    let (mut r, mut w) = raw_ws(bridge.addr, "/").await.into_split();
    let message = frame(0x82, &pattern(8 << 20, 5), true);
    let writer = tokio::spawn(async move {
        w.write_all(&message).await?;
        w.shutdown().await
    });
    let mut got = Vec::new();
    within("the close and the end of the connection", r.read_to_end(&mut got))
        .await
        .unwrap();
    let sent = within("the writer", writer).await.unwrap();
    assert!(sent.is_ok(), "the whole message could be sent: {sent:?}");
    assert_eq!(got[0], 0x88, "a close frame: {:?}", &got[..got.len().min(16)]);
    assert_eq!(u16::from_be_bytes([got[2], got[3]]), 1009);
}

#[tokio::test]
async fn early_frames_sent_with_the_request_are_not_lost() {
    let (backend, mut received) = sink_backend().await;
    let bridge = TestBridge::start(any_path_to(backend)).await;
    // The request head and the first frames in one write: the bridge must keep what followed the head.
    let mut bytes = upgrade_request("/", "");
    bytes.extend(frame(0x82, b"early bird", true));
    bytes.extend(frame(0x88, &[0x03, 0xe8], true));
    let mut s = tokio::net::TcpStream::connect(bridge.addr).await.unwrap();
    s.write_all(&bytes).await.unwrap();
    let got = within("backend EOF", received.recv()).await.unwrap();
    assert_eq!(got, b"early bird");
}

#[tokio::test]
async fn fragments_and_control_frames_split_byte_by_byte() {
    let (backend, mut received) = sink_backend().await;
    let bridge = TestBridge::start(any_path_to(backend)).await;
    let mut s = raw_ws(bridge.addr, "/").await;
    s.set_nodelay(true).unwrap();
    let mut bytes = Vec::new();
    bytes.extend(frame(0x02, b"abc", true)); // binary, not final
    bytes.extend(frame(0x89, b"between", true)); // a ping between fragments
    bytes.extend(frame(0x00, b"def", true));
    bytes.extend(frame(0x80, b"ghi", true));
    bytes.extend(frame(0x01, "h\u{e9}".as_bytes(), true)); // text split inside a code point...
    bytes.extend(frame(0x80, "llo \u{20ac}".as_bytes(), true));
    bytes.extend(frame(0x88, &4000u16.to_be_bytes(), true));
    for b in &bytes {
        s.write_all(std::slice::from_ref(b)).await.unwrap();
    }
    assert_eq!(raw_read_frame(&mut s).await, (0xA, b"between".to_vec()), "the ping's pong");
    assert_eq!(raw_read_close(&mut s).await.0, 4000, "the client's close code echoed");
    let got = within("backend EOF", received.recv()).await.unwrap();
    assert_eq!(got, "abcdefghih\u{e9}llo \u{20ac}".as_bytes());
}

#[tokio::test]
async fn a_message_is_passed_on_before_it_ends() {
    // The bridge carries bytes: the first fragment of a message reaches the backend (and its echo
    // comes back) while the rest of the message has not been sent.
    let (backend, _) = echo_backend().await;
    let bridge = TestBridge::start(any_path_to(backend)).await;
    let mut s = raw_ws(bridge.addr, "/").await;
    s.write_all(&frame(0x02, b"first half ", true)).await.unwrap();
    assert_eq!(raw_read_frame(&mut s).await, (0x2, b"first half ".to_vec()));
    s.write_all(&frame(0x80, b"second half", true)).await.unwrap();
    assert_eq!(raw_read_frame(&mut s).await, (0x2, b"second half".to_vec()));
}

#[tokio::test]
async fn close_frame_after_a_backend_failure_is_still_seen() {
    // The backend is gone; the client's next read holds data (which fails to reach the backend)
    // and then its close frame: the bridge must parse past the failure and see it. The close
    // timeout is far beyond the test's bound, so only the close frame can end the session in time.
    let (backend, mut streams) = manual_backend().await;
    let mut config = any_path_to(backend);
    config.timeouts.close = Duration::from_secs(600);
    let bridge = TestBridge::start(config).await;
    let mut s = raw_ws(bridge.addr, "/").await;
    drop(within("backend accept", streams.recv()).await.unwrap());
    assert_eq!(raw_read_close(&mut s).await.0, 1000, "backend closed");
    let mut burst = Vec::new();
    for i in 0..50u8 {
        burst.extend(frame(0x82, &[i; 10], true));
    }
    burst.extend(frame(0x88, &1000u16.to_be_bytes(), true));
    s.write_all(&burst).await.unwrap();
    let mut rest = Vec::new();
    within("bridge to close the connection", s.read_to_end(&mut rest)).await.unwrap();
}

#[tokio::test]
async fn lines_framing_ends_each_client_message_with_one_newline() {
    // A message's newline goes after its last fragment, once; one that ends with a newline
    // (in a fragment of its own or not) gets none added; an empty message is an empty line.
    let (backend, mut received) = sink_backend().await;
    let mut config = any_path_to(backend);
    config.routes[0].options.framing = Framing::Lines;
    let bridge = TestBridge::start(config).await;
    let mut s = raw_ws(bridge.addr, "/").await;
    let mut bytes = Vec::new();
    bytes.extend(frame(0x01, b"ab", true));
    bytes.extend(frame(0x80, b"c", true));
    bytes.extend(frame(0x01, b"de\n", true));
    bytes.extend(frame(0x80, b"", true));
    bytes.extend(frame(0x02, b"f", true));
    bytes.extend(frame(0x00, b"\n", true));
    bytes.extend(frame(0x80, b"", true));
    bytes.extend(frame(0x81, b"", true));
    bytes.extend(frame(0x88, &1000u16.to_be_bytes(), true));
    s.write_all(&bytes).await.unwrap();
    let got = within("backend EOF", received.recv()).await.unwrap();
    assert_eq!(String::from_utf8(got).unwrap(), "abc\nde\nf\n\n");
}

/// A backend that resets its connection (an error, a login refused) after a line it did not end
/// with a newline, or in the middle of a character: in `lines` and `text` framing that last
/// piece still reaches the page before the 1011, as a clean close delivers it before the 1000.
/// (A line-protocol review: the "Access denied" line, held for its newline, was dropped.)
#[tokio::test]
async fn what_the_backend_wrote_before_its_reset_is_delivered_in_every_framing() {
    for (framing, expected) in [
        (Framing::Lines, &["line1", "Goodbye \u{fffd}"][..]),
        (Framing::Text, &["line1\nGoodbye ", "\u{fffd}"][..]),
    ] {
        let (backend, mut streams) = manual_backend().await;
        let mut config = any_path_to(backend);
        config.routes[0].options.framing = framing;
        let bridge = TestBridge::start(config).await;
        let (mut ws, _) = ws_connect(&bridge.url("/"), None).await;
        let mut b = within("backend accept", streams.recv()).await.unwrap();
        // The last bytes are the first two of a three-byte character (€).
        b.write_all(b"line1\nGoodbye \xe2\x82").await.unwrap();
        b.set_zero_linger().unwrap();
        drop(b);
        let (messages, close) = read_until_close(&mut ws).await;
        let texts: Vec<String> = messages
            .into_iter()
            .map(|m| match m {
                Message::Text(t) => t.to_string(),
                other => panic!("{framing:?}: {other:?}"),
            })
            .collect();
        assert_eq!(texts.concat(), expected.concat(), "{framing:?}");
        if framing == Framing::Lines {
            assert_eq!(texts, expected, "{framing:?}: one message per line");
        }
        let close = close.expect("a close frame");
        assert_eq!(u16::from(close.code), 1011, "{framing:?}: {close:?}");
    }
}

#[tokio::test]
async fn backend_reset_gives_1011_with_reason() {
    let (backend, mut streams) = manual_backend().await;
    let bridge = TestBridge::start(any_path_to(backend)).await;
    let (mut ws, _) = ws_connect(&bridge.url("/"), None).await;
    let b = within("backend accept", streams.recv()).await.unwrap();
    // Closing with SO_LINGER 0 sends a reset, not a FIN.
    b.set_zero_linger().unwrap();
    drop(b);
    let (code, reason) = read_close(&mut ws).await;
    assert_eq!(code, 1011, "{reason}");
    assert!(reason.starts_with("backend read failed"), "{reason}");
}
