//! Session recording (`--record`, a route's `record`): files in websockify's format, read back
//! here with the rules websockify's and noVNC's playback use, and, where they are installed, by
//! websockify's own escaping (python3) and noVNC's playback parsing (node).

use std::path::{Path, PathBuf};

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use wsbridge::record::RecordConfig;

use crate::common::binary::{run_to_end, Binary};
use crate::common::*;

/// One recorded chunk: `true` for data to the client (`{`), its milliseconds, its bytes.
#[derive(Debug, Clone, PartialEq)]
struct Chunk {
    to_client: bool,
    ms: u64,
    data: Vec<u8>,
}

/// Reads a recording as websockify writes it, strictly: the header line, one
/// `'{MS{DATA',` / `'}MS}DATA',` line per chunk with DATA a JavaScript string of printable ASCII
/// and the escapes websockify produces (`\xNN`, `\t`, `\n`, `\r`, `\\`, `\'`), the trailer.
fn parse(file: &[u8]) -> Result<Vec<Chunk>, String> {
    let text = std::str::from_utf8(file).map_err(|e| format!("not UTF-8: {e}"))?;
    let body = text
        .strip_prefix("var VNC_frame_data = [\n")
        .ok_or("no `var VNC_frame_data = [` header")?
        .strip_suffix("'EOF'];\n")
        .ok_or("no `'EOF'];` trailer")?;
    let mut chunks = Vec::new();
    for (n, line) in body.lines().enumerate() {
        let bad = |why: &str| format!("line {}: {why}: {line:?}", n + 2);
        let inner = line
            .strip_prefix('\'')
            .and_then(|l| l.strip_suffix("',"))
            .ok_or_else(|| bad("not '…',"))?;
        let marker = inner.chars().next().ok_or_else(|| bad("empty"))?;
        if marker != '{' && marker != '}' {
            return Err(bad("no direction marker"));
        }
        let rest = &inner[1..];
        let end = rest.find(marker).ok_or_else(|| bad("no second marker"))?;
        let ms = rest[..end].parse().map_err(|_| bad("no milliseconds"))?;
        let mut data = Vec::new();
        let mut bytes = rest[end + 1..].bytes();
        while let Some(b) = bytes.next() {
            match b {
                b'\\' => match bytes.next() {
                    Some(b'x') => {
                        let hex = [bytes.next().unwrap_or(0), bytes.next().unwrap_or(0)];
                        let hex = std::str::from_utf8(&hex).map_err(|_| bad("bad \\x"))?;
                        if hex.bytes().any(|h| h.is_ascii_uppercase()) {
                            return Err(bad("uppercase \\x (websockify writes lowercase)"));
                        }
                        data.push(u8::from_str_radix(hex, 16).map_err(|_| bad("bad \\x"))?);
                    }
                    Some(b't') => data.push(b'\t'),
                    Some(b'n') => data.push(b'\n'),
                    Some(b'r') => data.push(b'\r'),
                    Some(b'\\') => data.push(b'\\'),
                    Some(b'\'') => data.push(b'\''),
                    _ => return Err(bad("an escape websockify does not write")),
                },
                b'\'' => return Err(bad("an unescaped quote")),
                0x20..=0x7e => data.push(b),
                _ => return Err(bad("a raw byte that should be escaped")),
            }
        }
        chunks.push(Chunk {
            to_client: marker == '{',
            ms,
            data,
        });
    }
    Ok(chunks)
}

/// The files in `dir`, by name.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The bytes of every chunk one way, in order.
fn joined(chunks: &[Chunk], to_client: bool) -> Vec<u8> {
    chunks
        .iter()
        .filter(|c| c.to_client == to_client)
        .flat_map(|c| c.data.clone())
        .collect()
}

/// `config` with its one route recording under `prefix`.
fn recording(mut config: wsbridge::config::Config, prefix: PathBuf, max_size: Option<u64>) -> wsbridge::config::Config {
    config.routes[0].options.record = Some(RecordConfig { prefix, max_size });
    config
}

/// Both directions, binary messages with every byte value and a text message with quotes and
/// backslashes: the file parses back to exactly the bytes each way, with the right markers,
/// times that never go down, each echo recorded after the message it answers, mode 0600; and
/// websockify's escaping and noVNC's playback parser (when python3 and node are here) agree
/// with it byte for byte.
#[tokio::test]
async fn both_directions_parse_back_byte_exact_as_websockify_and_novnc_read_them() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, _) = echo_backend().await;
    let prefix = dir.path().join("rec");
    let bridge = TestBridge::start(recording(any_path_to(backend), prefix, Some(16 << 20))).await;
    let (mut ws, _) = ws_connect(&bridge.url("/"), None).await;
    let all: Vec<u8> = (0..=255u8).collect();
    let text = "it's a \\ \"text\" frame, héllo\r\n\t{}";
    send_bin(&mut ws, &all).await;
    let mut echoed = Vec::new();
    while echoed.len() < all.len() {
        echoed.extend(recv_data(&mut ws).await);
    }
    ws.send(Message::text(text)).await.unwrap();
    while echoed.len() < all.len() + text.len() {
        echoed.extend(recv_data(&mut ws).await);
    }
    let big = pattern(300 * 1024, 9);
    send_bin(&mut ws, &big).await;
    while echoed.len() < all.len() + text.len() + big.len() {
        echoed.extend(recv_data(&mut ws).await);
    }
    ws.send(Message::Close(None)).await.unwrap();
    let _ = read_until_close(&mut ws).await;
    // The drain waits for the session, which waits for its recording to be written.
    bridge.stop().await;

    assert_eq!(files(dir.path()), ["rec.1"]);
    let path = dir.path().join("rec.1");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let file = std::fs::read(&path).unwrap();
    let chunks = parse(&file).unwrap();
    let mut sent = all.clone();
    sent.extend_from_slice(text.as_bytes());
    sent.extend_from_slice(&big);
    let up = joined(&chunks, false);
    let first_diff = up.iter().zip(&sent).position(|(a, b)| a != b);
    assert!(
        up == sent,
        "the client's bytes differ in the recording: {} of {}, first difference at {first_diff:?}",
        up.len(),
        sent.len()
    );
    assert!(joined(&chunks, true) == sent, "the backend's bytes differ in the recording");
    assert!(chunks.windows(2).all(|w| w[0].ms <= w[1].ms), "times go down");
    // Ping-pong: the first chunk is the client's, and each echo comes after what it echoes.
    assert!(!chunks[0].to_client);
    let first_echo = chunks.iter().position(|c| c.to_client).unwrap();
    let text_at = chunks.iter().position(|c| !c.to_client && c.data.starts_with(b"it's")).unwrap();
    assert!(
        first_echo < text_at,
        "the echo of the first message is recorded after the second message"
    );

    websockify_writes_the_same(&chunks, &file).await;
    novnc_reads_the_same(&path, &joined(&chunks, true), chunks.iter().filter(|c| !c.to_client).count()).await;
}

/// websockify's own expression, run by python3, formats the parsed chunks into the same file.
async fn websockify_writes_the_same(chunks: &[Chunk], file: &[u8]) {
    const TEST: &str = "record::both_directions_parse_back_byte_exact_as_websockify_and_novnc_read_them (python3)";
    // From websockify/websockifyserver.py: the header (handle_websocket), send_frames and
    // recv_frames' lines, and the trailer (finish).
    let script = r#"
import sys
out = sys.stdout
out.write("var VNC_frame_data = [\n")
for line in sys.stdin:
    d, ms, hexdata = line.split()
    buf = bytes.fromhex(hexdata[1:])
    bufstr = buf.decode('latin1').encode('unicode_escape').decode('ascii').replace("'", "\\'")
    if d == '{':
        out.write("'{{{0}{{{1}',\n".format(ms, bufstr))
    else:
        out.write("'}}{0}}}{1}',\n".format(ms, bufstr))
out.write("'EOF'];\n")
"#;
    let input: String = chunks
        .iter()
        .map(|c| {
            let hex: String = c.data.iter().map(|b| format!("{b:02x}")).collect();
            format!("{} {} x{hex}\n", if c.to_client { '{' } else { '}' }, c.ms)
        })
        .collect();
    let Some(out) = run_with_stdin("python3", &["-c", script], input.as_bytes()).await else {
        return skip(TEST, "python3 is not installed");
    };
    assert!(out == file, "websockify's escaping gives a different file");
}

/// noVNC's playback (tests/playback-ui.js) loads the file as a script and converts its frames;
/// the same conversion, run by node, gives the bytes sent to the client.
async fn novnc_reads_the_same(path: &Path, to_client: &[u8], from_client: usize) {
    const TEST: &str = "record::both_directions_parse_back_byte_exact_as_websockify_and_novnc_read_them (node)";
    // The loop from noVNC's tests/playback-ui.js (enableUI), binary encoding.
    let script = r#"
const vm = require('vm');
const fs = require('fs');
const ctx = {};
vm.runInNewContext(fs.readFileSync(process.argv[1], 'latin1'), ctx);
const frames = ctx.VNC_frame_data;
for (let i = 0; i < frames.length; i++) {
    let frame = frames[i];
    if (frame === "EOF") { frames.splice(i); break; }
    let dataIdx = frame.indexOf('{', 1) + 1;
    let time = parseInt(frame.slice(1, dataIdx - 1));
    let u8 = new Uint8Array(frame.length - dataIdx);
    for (let j = 0; j < frame.length - dataIdx; j++) { u8[j] = frame.charCodeAt(dataIdx + j); }
    frames[i] = { fromClient: frame[0] === '}', timestamp: time, data: u8 };
}
const down = Buffer.concat(frames.filter(f => !f.fromClient).map(f => Buffer.from(f.data)));
let last = 0;
for (const f of frames.filter(f => !f.fromClient)) {
    if (!(f.timestamp >= last)) { throw new Error("bad timestamp " + f.timestamp); }
    last = f.timestamp;
}
process.stdout.write(JSON.stringify({ fromClient: frames.filter(f => f.fromClient).length, down: down.toString('hex') }));
"#;
    let path = path.to_str().unwrap();
    let Some(out) = run_with_stdin("node", &["-e", script, path], b"").await else {
        return skip(TEST, "node is not installed");
    };
    let out = String::from_utf8(out).unwrap();
    let hex: String = to_client.iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        out.contains(&format!("\"down\":\"{hex}\"")),
        "noVNC reads other bytes to the client"
    );
    assert!(out.contains(&format!("\"fromClient\":{from_client},")), "{out}");
}

/// Runs `program args` with `input` on stdin: its stdout, or `None` if it is not installed.
/// Fails the test if it fails.
async fn run_with_stdin(program: &str, args: &[&str], input: &[u8]) -> Option<Vec<u8>> {
    use tokio::io::AsyncWriteExt;
    let mut child = match tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("{program}: {e}"),
    };
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = tokio::spawn(async move { stdin.write_all(&input).await });
    let out = within(program, child.wait_with_output()).await.unwrap();
    within("stdin written", writer).await.unwrap().unwrap();
    assert!(out.status.success(), "{program} failed: {}", String::from_utf8_lossy(&out.stderr));
    Some(out.stdout)
}

/// A recording that reaches its cap (`record_max_size` in a TOML file, through the binary) is
/// cut: the file stays within the cap, still ends with the trailer and parses, holds the start of
/// what the backend sent, and one warning says so; the session carries every byte to its end.
#[tokio::test]
async fn the_size_cap_cuts_the_file_cleanly_and_the_session_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(2 << 20, 5);
    let backend = source_backend(data.clone()).await;
    let config = dir.path().join("wsbridge.toml");
    std::fs::write(
        &config,
        format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/vnc\"\ntarget = \"{backend}\"\nrecord = \"rec/vnc\"\nrecord_max_size = \"16KiB\"\n"
        ),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("rec")).unwrap();
    let mut bridge = Binary::spawn(&["--config", config.to_str().unwrap()]).await;
    let (mut ws, _) = ws_connect(&format!("ws://{}/vnc", bridge.addr), None).await;
    let (msgs, close) = read_until_close(&mut ws).await;
    let got: Vec<u8> = msgs.into_iter().flat_map(|m| m.into_data().to_vec()).collect();
    assert!(got == data, "the session lost bytes: {} of {}", got.len(), data.len());
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1000));
    // The session's line comes once its recording is written.
    let closed = bridge.line("session closed").await;
    assert!(closed.contains("session=1"), "{closed}");
    let cut: Vec<String> = bridge.lines().into_iter().filter(|l| l.contains("recording cut")).collect();
    assert_eq!(cut.len(), 1, "{cut:?}");
    assert!(cut[0].contains("size cap") && cut[0].contains("vnc.1"), "{}", cut[0]);

    let file = std::fs::read(dir.path().join("rec/vnc.1")).unwrap();
    assert!(file.len() <= 16 * 1024, "{} bytes, over the cap", file.len());
    let chunks = parse(&file).unwrap();
    let down = joined(&chunks, true);
    assert!(
        !down.is_empty() && data.starts_with(&down),
        "the recording is not the start of the stream"
    );
}

/// `--record FILE` on the websockify-style command line: one file per session, numbered as the
/// session's log line; relative names are the working directory's.
#[tokio::test]
async fn each_session_gets_its_own_file_numbered_as_its_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, _) = echo_backend().await;
    let prefix = dir.path().join("session");
    let mut bridge = Binary::spawn(&["127.0.0.1:0", &backend.to_string(), "--record", prefix.to_str().unwrap()]).await;
    for i in 1..=3u8 {
        let (mut ws, _) = ws_connect(&format!("ws://{}/", bridge.addr), None).await;
        send_bin(&mut ws, &[i; 3]).await;
        assert_eq!(recv_data(&mut ws).await, [i; 3]);
        ws.send(Message::Close(None)).await.unwrap();
        let _ = read_until_close(&mut ws).await;
        bridge
            .line(&format!("session={i} backend={backend}}}: wsbridge::server: session closed"))
            .await;
        let chunks = parse(&std::fs::read(dir.path().join(format!("session.{i}"))).unwrap()).unwrap();
        assert_eq!((joined(&chunks, false), joined(&chunks, true)), (vec![i; 3], vec![i; 3]));
    }
    assert_eq!(files(dir.path()), ["session.1", "session.2", "session.3"]);
}

/// Off by default: a route that does not ask has no recording, and `wsbridge check` shows a
/// route's recording only when it has one.
#[tokio::test]
async fn nothing_is_recorded_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wsbridge.toml");
    std::fs::write(
        &config,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/a\"\ntarget = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    let parsed = wsbridge::config::Config::from_file(&config).unwrap();
    assert_eq!(parsed.routes[0].options.record, None);
    assert_eq!(wsbridge::config::Config::new("test").default_route_options().record, None);
    let (code, out, err) = run_to_end(&["check", "--config", config.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("record"), "{out}");

    std::fs::write(
        &config,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/a\"\ntarget = \"127.0.0.1:1\"\nrecord = \"vnc\"\n",
    )
    .unwrap();
    let (code, out, err) = run_to_end(&["check", "--config", config.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let expected = format!("record = \"{}\", record_max_size = \"64MiB\"", dir.path().join("vnc").display());
    assert!(out.contains(&expected), "{out}");
}

/// A recording directory that does not exist, or a cap without a recording, is a configuration
/// error naming the file, line and field.
#[tokio::test]
async fn bad_recording_settings_are_configuration_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wsbridge.toml");
    let head = "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/a\"\ntarget = \"127.0.0.1:1\"\n";
    for (extra, field, message) in [
        ("record = \"missing/vnc\"\n", "route[0].record", "is not a directory"),
        ("record_max_size = \"1MiB\"\n", "route[0].record_max_size", "needs `record`"),
    ] {
        std::fs::write(&config, format!("{head}{extra}")).unwrap();
        let (code, _, err) = run_to_end(&["check", "--config", config.to_str().unwrap()]).await;
        assert_eq!(code, 64, "{err}");
        assert!(
            err.contains("wsbridge.toml") && err.contains(field) && err.contains(message),
            "{err}"
        );
    }
    let (code, _, err) = run_to_end(&["6080", "h:1", "--record", dir.path().join("missing/vnc").to_str().unwrap()]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--record") && err.contains("is not a directory"), "{err}");
    // A directory this process cannot write to (under systemd's DynamicUser, any but its own
    // StateDirectory=): said at start, not once per session as "session not recorded" (an
    // operations review). /proc takes no files, whoever asks (these tests may run as root).
    if cfg!(target_os = "linux") {
        std::fs::write(&config, format!("{head}record = \"/proc/vnc\"\n")).unwrap();
        let (code, _, err) = run_to_end(&["check", "--config", config.to_str().unwrap()]).await;
        assert_eq!(code, 64, "{err}");
        assert!(
            err.contains("route[0].record") && err.contains("recordings cannot be written there"),
            "{err}"
        );
    }
}

/// A file that cannot be created (its directory went away after the configuration was checked)
/// is one warning, and the session runs unrecorded, every byte delivered.
#[tokio::test]
async fn a_file_that_cannot_be_created_leaves_the_session_unrecorded() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, _) = echo_backend().await;
    let rec = dir.path().join("rec");
    std::fs::create_dir(&rec).unwrap();
    let prefix = rec.join("vnc");
    let mut bridge = Binary::spawn(&["127.0.0.1:0", &backend.to_string(), "--record", prefix.to_str().unwrap()]).await;
    std::fs::remove_dir(&rec).unwrap();
    let (mut ws, _) = ws_connect(&format!("ws://{}/", bridge.addr), None).await;
    let data = pattern(100_000, 3);
    send_bin(&mut ws, &data).await;
    let mut echoed = Vec::new();
    while echoed.len() < data.len() {
        echoed.extend(recv_data(&mut ws).await);
    }
    assert!(echoed == data);
    let line = bridge.line("session not recorded").await;
    assert!(line.contains("cannot create the file") && line.contains("vnc.1"), "{line}");
    ws.send(Message::Close(None)).await.unwrap();
    let _ = read_until_close(&mut ws).await;
    bridge.line("session closed").await;
    assert!(!rec.exists());
}
