//! The command line through the real binary: which zeros are refused (exit 64) and which mean
//! "off" as they do in websockify, and what `wsbridge check` prints.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::common::*;

use crate::common::binary::{run_to_end, BIN};

fn example(name: &str) -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name)
        .display()
        .to_string()
}

#[tokio::test]
async fn zeros_that_would_break_the_bridge_exit_64() {
    let full = example("full.toml");
    for (args, want) in [
        (&["--handshake-timeout", "0"][..], "--handshake-timeout: must be greater than zero"),
        (&["--connect-timeout", "0"][..], "--connect-timeout: must be greater than zero"),
        (&["--max-connections", "0"][..], "--max-connections: must be at least 1"),
        (&["--threads", "0"][..], "--threads: must be at least 1"),
        (&["--max-message-size", "1"][..], "--max-message-size: must be at least 125 bytes"),
    ] {
        let (code, _, err) = run_to_end(&[&["127.0.0.1:0", "127.0.0.1:5900"][..], args].concat()).await;
        assert_eq!(code, 64, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let (code, _, err) = run_to_end(&["--config", &full, "--threads", "0"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--threads: must be at least 1"), "{err}");
}

#[tokio::test]
async fn websockify_zeros_mean_off_and_the_bridge_serves() {
    // With websockify's defaults given out loud, as launch scripts do (`--timeout 0`,
    // `--ssl-version default`, the latter without a certificate too).
    let (backend, _) = echo_backend().await;
    let target = backend.to_string();
    let mut child = Command::new(BIN)
        .args([
            "127.0.0.1:0",
            &target,
            "--heartbeat",
            "0",
            "--idle-timeout",
            "0",
            "--timeout",
            "0",
            "--ssl-version",
            "default",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr: std::net::SocketAddr = within("the listening line", async {
        let mut before = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("listening addr=").nth(1) {
                return rest.split_whitespace().next().unwrap().parse().unwrap();
            }
            before.push(line);
        }
        panic!("wsbridge exited instead of serving:\n{}", before.join("\n"));
    })
    .await;
    // Keep draining stderr so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let (mut ws, _) = ws_connect(&format!("ws://{addr}/websockify"), Some("binary")).await;
    send_bin(&mut ws, b"zero is off").await;
    assert_eq!(recv_data(&mut ws).await, b"zero is off");
    child.start_kill().unwrap();
    within("exit after kill", child.wait()).await.unwrap();
}

/// `wsbridge check FILE` is `wsbridge check --config FILE`; both at once, or neither, is a usage
/// error (64) that says so.
#[tokio::test]
async fn check_takes_the_file_with_or_without_config() {
    let minimal = example("minimal.toml");
    let with_flag = run_to_end(&["check", "--config", &minimal]).await;
    assert_eq!(with_flag.0, 0, "{}", with_flag.2);
    assert_eq!(run_to_end(&["check", &minimal]).await, with_flag);
    let (code, _, err) = run_to_end(&["check"]).await;
    assert_eq!(code, 64);
    assert!(err.contains("--config <FILE>"), "{err}");
    let (code, _, err) = run_to_end(&["check", "--config", &minimal, &example("full.toml")]).await;
    assert_eq!(code, 64);
    assert!(err.contains("cannot be used with"), "{err}");
}

#[tokio::test]
async fn check_prints_the_configurations_words_and_tells_tokens_apart() {
    let full = example("full.toml");
    let (code, out, err) = run_to_end(&["check", "--config", &full]).await;
    assert_eq!(code, 0, "{err}");
    for debug in ["Some(", "None", "{ ", "Query", "Binary", "Lines", "1048576"] {
        assert!(!out.contains(debug), "Rust debug notation {debug:?} in:\n{out}");
    }
    for words in [
        "connect = \"5s\"",
        "max_lifetime = \"off\"",
        "max_connections = 10000",
        "lookup = \"query\"",
        "framing = \"lines\"",
        "subprotocols = [\"binary\"]",
        "max_sessions = 50",
        "addr = \"[::1]:6081\"",
        "addr = \"unix:/run/wsbridge/wsbridge.sock\", mode = \"0660\"",
        "admin     addr = \"127.0.0.1:9100\" (token: none)",
    ] {
        assert!(out.contains(words), "{words:?} missing in:\n{out}");
    }
    // tokens.cfg holds desk1 and desk2: same length, same first characters.
    for secret in ["desk", "kiosk:", "s3cret"] {
        assert!(!out.contains(secret), "{secret:?} shown in:\n{out}");
    }
    let tags: Vec<&str> = out
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("token #"))
        .map(|rest| rest.split_whitespace().next().unwrap())
        .collect();
    let distinct: std::collections::HashSet<_> = tags.iter().collect();
    assert_eq!(tags.len(), 4, "the inline token and tokens.cfg's three:\n{out}");
    assert_eq!(distinct.len(), tags.len(), "two tokens redacted alike:\n{out}");
}

/// `[log] token_key_file`: the tag that stands for a token is the same in `wsbridge check`, in a
/// running bridge's session lines and in the next process (a key per process made them differ),
/// and is what the README's openssl command computes from the token and the key.
#[tokio::test]
async fn a_shared_token_key_tags_a_token_alike_in_every_process() {
    use crate::common::binary::Binary;
    let (backend, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let key = "5f2b0c1e9a8d7c6b5a4f3e2d1c0b9a88";
    std::fs::write(dir.path().join("token-key"), format!("{key}\n")).unwrap();
    std::fs::write(dir.path().join("tokens.cfg"), format!("desk1: {backend}\n")).unwrap();
    let file = dir.path().join("wsbridge.toml");
    std::fs::write(
        &file,
        "[log]\ntoken_key_file = \"token-key\"\n[[listen]]\naddr = \"127.0.0.1:0\"\n[[tokens]]\nsource = \"tokens.cfg\"\n",
    )
    .unwrap();
    let tag_in = |out: &str| {
        let at = out.find("token #").unwrap_or_else(|| panic!("no tag in:\n{out}")) + "token #".len();
        out[at..at + 12].to_owned()
    };
    let (code, out, err) = run_to_end(&["check", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let tag = tag_in(&out);
    let (_, again, _) = run_to_end(&["check", file.to_str().unwrap()]).await;
    assert_eq!(tag_in(&again), tag, "another process, the same tag");
    let hmac = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes()), b"desk1");
    let expected: String = hmac.as_ref()[..6].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(tag, expected);
    // The README's way to find a token's tag.
    let openssl = std::process::Command::new("sh")
        .args([
            "-c",
            "printf %s \"$1\" | openssl dgst -sha256 -hmac \"$(cat \"$2\")\" | sed 's/.*= //' | cut -c1-12",
        ])
        .args(["sh", "desk1"])
        .arg(dir.path().join("token-key"))
        .output();
    match openssl {
        Ok(o) if o.status.success() && !o.stdout.is_empty() => assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), tag),
        _ => skip(
            "cli::a_shared_token_key_tags_a_token_alike_in_every_process (openssl)",
            "no openssl here",
        ),
    }

    let mut b = Binary::spawn(&["--config", file.to_str().unwrap()]).await;
    // Upgraded, then gone: the session ends and is logged.
    drop(raw_ws(b.addr, "/websockify?token=desk1").await);
    let line = b.line("session closed").await;
    assert_eq!(tag_in(&line), tag, "{line}");
    assert!(!line.contains("desk1"), "{line}");

    std::fs::write(dir.path().join("token-key"), "short\n").unwrap();
    let (code, _, err) = run_to_end(&["check", file.to_str().unwrap()]).await;
    assert_eq!(code, 64);
    assert!(
        err.contains("wsbridge.toml:2: log.token_key_file:") && err.contains("5 characters; a key needs at least 16"),
        "{err}"
    );
}

#[tokio::test]
async fn the_listening_line_names_the_web_root_plainly() {
    let web = tempfile::tempdir().unwrap();
    let dir = web.path().display().to_string();
    let mut child = Command::new(BIN)
        .args(["127.0.0.1:0", "127.0.0.1:5900", "--web", &dir])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = within("the listening line", async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("listening") {
                return line;
            }
        }
        panic!("wsbridge exited before listening");
    })
    .await;
    child.start_kill().unwrap();
    assert!(line.contains(&format!("web={dir}")) && !line.contains("Some("), "{line}");
}

/// Completions and the manual page come from the same clap definitions as `--help`: every
/// option is in them (a new option cannot be left out of the packaged docs).
#[tokio::test]
async fn completions_and_the_manual_page_name_every_option() {
    let run = |args: &'static [&'static str]| async move {
        let out = tokio::process::Command::new(BIN).args(args).output().await.unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let bash = run(&["completions", "bash"]).await;
    let man = run(&["man"]).await;
    assert!(bash.contains("complete -F") && bash.contains("wsbridge"), "{bash}");
    assert!(man.starts_with(".ie") || man.contains(".TH wsbridge"), "{man}");
    for option in [
        "--origin",
        "--token-allow-target",
        "--token-allow-any-target",
        "--heartbeat",
        "--admin",
        "--web-dotfiles",
    ] {
        assert!(bash.contains(option), "{option} not in the bash completions");
        // roff escapes '-' as '\-'.
        assert!(man.contains(&option.replace('-', "\\-")), "{option} not in the manual page");
    }
    const OTHERS: [&[&str]; 4] = [
        &["completions", "zsh"],
        &["completions", "fish"],
        &["completions", "powershell"],
        &["completions", "elvish"],
    ];
    for args in OTHERS {
        assert!(run(args).await.contains("wsbridge"), "{args:?}");
    }
}

#[tokio::test]
async fn plugins_by_their_websockify_class_names() {
    // websockify takes a plugin's full class name as well as its short one, and much of its
    // documentation spells it so.
    use crate::common::binary::Binary;
    let backend = source_backend(b"through the token".to_vec()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("desk: {backend}\n")).unwrap();
    let bridge = Binary::spawn(&[
        "127.0.0.1:0",
        "--token-plugin",
        "websockify.token_plugins.TokenFile",
        "--token-source",
        file.to_str().unwrap(),
        "--auth-plugin=websockify.auth_plugins.BasicHTTPAuth",
        "--auth-source=user:secret",
    ])
    .await;
    let request = upgrade_request("/websockify?token=desk", "Authorization: Basic dXNlcjpzZWNyZXQ=\r\n");
    let mut s = raw_ws_request(bridge.addr, &request).await;
    within("the backend's bytes in a frame", async {
        let mut got = Vec::new();
        while !got.windows(17).any(|w| w == b"through the token") {
            let mut buf = [0u8; 64];
            let n = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await.unwrap();
            assert_ne!(n, 0, "closed before the backend's bytes: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let r = http_raw(bridge.addr, &upgrade_request("/websockify?token=desk", "")).await;
    assert_eq!(status_of(&r), 401, "the auth plugin is in force: {r}");
}

/// websockify's TokenFileName through the binary: a directory whose file names are the tokens,
/// by the plugin's full name; anything but a directory is refused at start (64) in websockify's
/// words, and `wsbridge check` says which format a `[[tokens]]` source has.
#[tokio::test]
async fn token_file_name_plugin_takes_a_directory_of_targets() {
    use crate::common::binary::Binary;
    let backend = source_backend(b"through the file name".to_vec()).await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    std::fs::write(tokens.join("desk1"), format!("{backend}\n")).unwrap();
    let bridge = Binary::spawn(&[
        "127.0.0.1:0",
        "--token-plugin",
        "websockify.token_plugins.TokenFileName",
        "--token-source",
        tokens.to_str().unwrap(),
    ])
    .await;
    let mut s = raw_ws_request(bridge.addr, &upgrade_request("/websockify?token=desk1", "")).await;
    within("the backend's bytes in a frame", async {
        let mut got = Vec::new();
        while !got.windows(21).any(|w| w == b"through the file name") {
            let mut buf = [0u8; 64];
            let n = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await.unwrap();
            assert_ne!(n, 0, "closed before the backend's bytes: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let r = http_raw(bridge.addr, &upgrade_request("/websockify?token=tokens/desk1", "")).await;
    assert_eq!(status_of(&r), 404, "{r}");

    let file = tokens.join("desk1");
    let listed = backend.to_string();
    a_directory_plugin_takes_a_directory_only("TokenFileName", "file-names", dir.path(), &tokens, &file, &listed).await;
}

/// `--web-auth` without an auth plugin is refused at start (64), as websockify refuses it,
/// saying which plugins it takes; so is a file's `web_auth` whose file cannot be read.
#[tokio::test]
async fn web_auth_without_an_auth_plugin_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run_to_end(&["127.0.0.1:0", "127.0.0.1:5900", "--web", dir.path().to_str().unwrap(), "--web-auth"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--web-auth needs --auth-plugin BasicHTTPAuth"), "{err}");
    // A file's web_auth naming an htpasswd file that is not there: `check` and the start both
    // refuse it (64), naming the listener's field and the file.
    std::fs::create_dir(dir.path().join("www")).unwrap();
    let toml = dir.path().join("w.toml");
    std::fs::write(
        &toml,
        "[[listen]]\naddr = \"127.0.0.1:0\"\nweb = \"www\"\nweb_auth = { htpasswd = \"missing\" }\n\
         [[route]]\npath = \"/vnc\"\ntarget = \"127.0.0.1:5900\"\n",
    )
    .unwrap();
    let toml = toml.to_str().unwrap();
    for args in [&["check", toml][..], &["--config", toml]] {
        let (code, _, err) = run_to_end(args).await;
        assert_eq!(code, 64, "{args:?}: {err}");
        assert!(err.contains("web_auth") && err.contains("missing"), "{args:?}: {err}");
    }
}

/// `wsbridge --log-file FILE` (websockify's): the start-up line and a session's line are
/// appended to FILE, after what it held, and nothing goes to stderr; a file that cannot be
/// opened stops the start (64) with its name. In a configuration file, `[log] file`, relative to
/// the file.
#[tokio::test]
async fn the_log_file_gets_the_start_up_and_session_lines() {
    use tokio::io::AsyncReadExt;
    let (backend, _) = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("wsbridge.log");
    std::fs::write(&log, "an earlier line\n").unwrap();
    let mut child = Command::new(BIN)
        .args(["127.0.0.1:0", &backend.to_string(), "--log-file"])
        .arg(&log)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let listening = file_line(&log, "listening addr=", WAIT).await;
    let addr: std::net::SocketAddr = listening
        .split("listening addr=")
        .nth(1)
        .and_then(|a| a.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {listening:?}"));
    let (mut ws, _) = ws_connect(&format!("ws://{addr}/"), None).await;
    send_bin(&mut ws, b"logged").await;
    assert_eq!(recv_data(&mut ws).await, b"logged");
    drop(ws);
    let closed = file_line(&log, "session closed", WAIT).await;
    assert!(
        closed.contains("bytes_up=6") && closed.contains(&format!("target={backend}")),
        "{closed}"
    );
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-s", "TERM", &pid]).status().await.unwrap().success());
    let status = within("exit", child.wait()).await.unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).await.unwrap();
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(stderr.is_empty(), "log lines on stderr as well: {stderr}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.starts_with("an earlier line\n"), "not appended: {text}");
    assert!(!text.contains("panic"), "{text}");

    let nowhere = dir.path().join("no-such-dir/wsbridge.log");
    let (code, _, err) = run_to_end(&["127.0.0.1:0", "127.0.0.1:5900", "--log-file", nowhere.to_str().unwrap()]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains(&format!("log file {}", nowhere.display())), "{err}");

    let toml = dir.path().join("w.toml");
    std::fs::create_dir(dir.path().join("logs")).unwrap();
    std::fs::write(
        &toml,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:5900\"\n[log]\nfile = \"logs/w.log\"\n",
    )
    .unwrap();
    let config = wsbridge::config::Config::from_file(&toml).unwrap();
    assert_eq!(config.log_file, Some(dir.path().join("logs/w.log")));
    // A directory that does not exist: `wsbridge check` says so at the line, as the start
    // would (an operations review: check said OK, the start failed).
    std::fs::write(
        &toml,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:5900\"\n[log]\nfile = \"nowhere/w.log\"\n",
    )
    .unwrap();
    let (code, _, err) = run_to_end(&["check", "--config", toml.to_str().unwrap()]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("w.toml:7: log.file: ") && err.contains("no such directory"), "{err}");
}

/// websockify's UnixDomainSocketDirectory through the binary: a directory of sockets named by
/// their tokens, by the plugin's full name; anything but a directory is refused at start (64),
/// and `wsbridge check` says the format of a `[[tokens]]` source.
#[tokio::test]
async fn unix_domain_socket_directory_plugin_takes_a_directory_of_sockets() {
    use crate::common::binary::Binary;
    let dir = tempfile::tempdir().unwrap();
    let socks = dir.path().join("socks");
    std::fs::create_dir(&socks).unwrap();
    let listener = tokio::net::UnixListener::bind(socks.join("desk1")).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = tokio::io::AsyncWriteExt::write_all(&mut s, b"through the socket").await;
        }
    });
    let bridge = Binary::spawn(&[
        "127.0.0.1:0",
        "--token-plugin",
        "websockify.token_plugins.UnixDomainSocketDirectory",
        "--token-source",
        socks.to_str().unwrap(),
    ])
    .await;
    let mut s = raw_ws_request(bridge.addr, &upgrade_request("/websockify?token=desk1", "")).await;
    within("the backend's bytes in a frame", async {
        let mut got = Vec::new();
        while !got.windows(18).any(|w| w == b"through the socket") {
            let mut buf = [0u8; 64];
            let n = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await.unwrap();
            assert_ne!(n, 0, "closed before the backend's bytes: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;

    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    let listed = format!("unix:{}", socks.join("desk1").display());
    a_directory_plugin_takes_a_directory_only("UnixDomainSocketDirectory", "unix-sockets", dir.path(), &socks, &file, &listed).await;
}

/// A token plugin whose source is a directory (`plugin` on the command line, `format` in a
/// file): a file (`file`) or nothing as its source is refused before listening (64, naming it);
/// in a file, `wsbridge check` lists the directory `source` (one entry, leading to `listed`) and
/// refuses `file` with file, line and field. `scratch` takes the missing path and the file.
async fn a_directory_plugin_takes_a_directory_only(
    plugin: &str,
    format: &str,
    scratch: &std::path::Path,
    source: &std::path::Path,
    file: &std::path::Path,
    listed: &str,
) {
    for path in [file.to_path_buf(), scratch.join("missing")] {
        let (code, _, err) = run_to_end(&["127.0.0.1:0", "--token-plugin", plugin, "--token-source", path.to_str().unwrap()]).await;
        assert_eq!(code, 64, "{err}");
        assert!(err.contains(&format!("--token-source {}", path.display())), "{err}");
        if path == file {
            assert!(err.contains(&format!("{plugin} plugin requires a directory")), "{err}");
        }
    }
    let toml = scratch.join("bridge.toml");
    let text = |source: &std::path::Path| {
        format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\n\n[[tokens]]\nsource = {:?}\nformat = \"{format}\"\n",
            source.display().to_string()
        )
    };
    std::fs::write(&toml, text(source)).unwrap();
    let (code, out, err) = run_to_end(&["check", toml.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let heading = format!(
        "token source {} (1 token): lookup = \"query\", format = \"{format}\"",
        source.display()
    );
    assert!(out.contains(&heading) && out.contains(&format!("-> {listed}")), "{out}");
    std::fs::write(&toml, text(file)).unwrap();
    let (code, _, err) = run_to_end(&["check", toml.to_str().unwrap()]).await;
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("bridge.toml:6: tokens[0].format") && err.contains("needs a directory"),
        "{err}"
    );
}

/// A configuration mistake found after parsing (a certificate or a bearer file that is not
/// there, a certificate with no key) names the file, the line and the field as a parse error
/// does, and exits 64, at a start as in `wsbridge check`.
#[tokio::test]
async fn a_missing_file_is_named_at_the_line_that_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path();
    let toml = scratch.join("w.toml");
    std::fs::write(
        scratch.join("cert-only.pem"),
        "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let route = "[[route]]\npath = \"/vnc\"\ntarget = \"127.0.0.1:5900\"\n";
    for (text, want) in [
        (
            format!("[[listen]]\naddr = \"127.0.0.1:0\"\n[listen.tls]\ncert = \"/nonexistent/fullchain.pem\"\nkey = \"/nonexistent/privkey.pem\"\n{route}"),
            "w.toml:4: listen[0].tls.cert: /nonexistent/fullchain.pem: No such file or directory",
        ),
        (
            format!("[[listen]]\naddr = \"127.0.0.1:0\"\n[listen.tls]\ncert = \"cert-only.pem\"\n{route}"),
            "w.toml:4: listen[0].tls.cert: ",
        ),
        (
            format!("[[listen]]\naddr = \"127.0.0.1:0\"\n{route}auth = {{ bearer_file = \"nope.txt\" }}\n"),
            "w.toml:6: route[0].auth.bearer_file: ",
        ),
    ] {
        std::fs::write(&toml, &text).unwrap();
        for args in [&["check", "--config"][..], &["--config"][..]] {
            let (code, _, err) = run_to_end(&[args, &[toml.to_str().unwrap()][..]].concat()).await;
            assert_eq!(code, 64, "{args:?} {text}: {err}");
            assert!(err.contains(want), "{args:?} {text}: {err}");
        }
    }
}

/// An agent's file given to the server, and a server's to the agent, say which command runs it.
#[tokio::test]
async fn a_file_for_the_other_side_says_which_command_runs_it() {
    let (code, _, err) = run_to_end(&["--config", &example("agent.toml")]).await;
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("agent.toml:") && err.contains("run it with `wsbridge agent --config FILE`"),
        "{err}"
    );
    let (code, _, err) = run_to_end(&["agent", "--config", &example("minimal.toml")]).await;
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("minimal.toml:") && err.contains("run it with `wsbridge --config FILE`"),
        "{err}"
    );
}

/// `wsbridge check` shows a route's `backend_tls`, and above all `insecure_skip_verify = true`.
#[tokio::test]
async fn check_shows_backend_tls() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("w.toml");
    std::fs::write(
        &toml,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/vnc\"\ntarget = \"127.0.0.1:5900\"\nbackend_tls = { server_name = \"vnc.internal\", insecure_skip_verify = true }\n",
    )
    .unwrap();
    let (code, out, err) = run_to_end(&["check", toml.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("backend_tls = { server_name = \"vnc.internal\", insecure_skip_verify = true }"),
        "{out}"
    );
}

/// `check --strict`, a deployment's gate: a file that checks with warnings (here a credentials
/// file left empty by a pipeline that renders secrets, whose route would refuse everyone) fails
/// it, naming the file and the count; `check` alone passes it with the warning; a file without
/// warnings passes either way.
#[tokio::test]
async fn check_strict_fails_on_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wsbridge.toml");
    let tokens = dir.path().join("bearer.txt");
    std::fs::write(
        &file,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:9\"\n\
         auth = { bearer_file = \"bearer.txt\" }\n",
    )
    .unwrap();
    std::fs::write(&tokens, "").unwrap();
    let path = file.to_str().unwrap();
    let (code, out, err) = run_to_end(&["check", path]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("holds no token"), "{err}");
    let (code, out, err) = run_to_end(&["check", "--strict", path]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains(&format!("{path}: 1 warning, an error with --strict")), "{err}");
    assert!(out.contains(": OK"), "the report is still printed: {out}");
    // A RUST_LOG that hides warnings does not open the gate (a review: it did).
    for hidden in ["error", "off"] {
        let mut command = Command::new(BIN);
        command.args(["check", "--strict", path]).env("RUST_LOG", hidden);
        let (code, out, err) = crate::common::binary::command_to_end(command).await;
        assert_eq!(code, 1, "RUST_LOG={hidden}: {out}{err}");
        // ... and the warning is shown all the same: it is what a check is for.
        assert!(err.contains("holds no token"), "RUST_LOG={hidden}: {err}");
    }
    std::fs::write(&tokens, "s3cret-token-for-the-gate\n").unwrap();
    let (code, out, err) = run_to_end(&["check", "--strict", path]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(!err.contains("warning"), "{err}");
}

/// Whether this machine has IPv6 loopback (containers may not): the caller skips otherwise.
fn ipv6_loopback(test: &str) -> bool {
    let up = std::net::TcpListener::bind("[::1]:0").is_ok();
    if !up {
        skip(test, "no IPv6 loopback on this machine");
    }
    up
}

/// One echo through the bridge at `host:port`.
async fn echo_through(host: &str, port: u16) {
    use futures_util::SinkExt as _;
    let (mut ws, _) = ws_connect(&format!("ws://{host}:{port}/"), None).await;
    ws.send(tokio_tungstenite::tungstenite::Message::binary(b"hi".to_vec()))
        .await
        .unwrap();
    assert_eq!(recv_data(&mut ws).await, b"hi", "through {host}");
    ws.close(None).await.unwrap();
}

/// `wsbridge [::]:PORT TARGET` serves IPv4 clients too, as websockify's does (a drop-in review:
/// the socket was IPv6 only, so a client of 127.0.0.1 was refused, where `--help` and the
/// `--prefer-ipv6` refusal suggest `[::]:6080`); they are logged as themselves, not as
/// `::ffff:127.0.0.1`.
#[tokio::test]
async fn an_ipv6_any_address_takes_ipv4_clients_too() {
    use crate::common::binary::Binary;
    if !ipv6_loopback("cli::an_ipv6_any_address_takes_ipv4_clients_too") {
        return;
    }
    let (echo, _) = echo_backend().await;
    let mut b = Binary::spawn(&["[::]:0", &echo.to_string()]).await;
    let port = b.addr.port();
    echo_through("127.0.0.1", port).await;
    echo_through("[::1]", port).await;
    b.line("client=127.0.0.1:").await;
    b.line("client=[::1]:").await;
    assert!(!b.lines().iter().any(|l| l.contains("::ffff:")), "{:#?}", b.lines());
    b.signal("TERM").await;
    assert_eq!(b.exit_code().await, 0);
}

/// An IPv4 client of a `[::]` listener is named as IPv4 in the PROXY header a backend gets too
/// (a review: `PROXY TCP6 ::ffff:127.0.0.1 ::ffff:127.0.0.1 …`, which an IPv4 allow-list at the
/// backend does not match).
#[tokio::test]
async fn an_ipv4_client_of_an_ipv6_any_address_is_ipv4_in_the_backends_proxy_header() {
    use crate::common::binary::Binary;
    use tokio::io::AsyncReadExt as _;
    if !ipv6_loopback("cli::an_ipv4_client_of_an_ipv6_any_address_is_ipv4_in_the_backends_proxy_header") {
        return;
    }
    let (backend, mut accepted) = manual_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wsbridge.toml");
    std::fs::write(
        &file,
        format!("[[listen]]\naddr = \"[::]:0\"\n[[route]]\npath = \"/\"\ntarget = \"{backend}\"\nproxy_protocol = \"v1\"\n"),
    )
    .unwrap();
    let mut b = Binary::spawn(&["--config", file.to_str().unwrap()]).await;
    let (ws, _) = ws_connect(&format!("ws://127.0.0.1:{}/", b.addr.port()), None).await;
    let mut s = within("the backend connection", accepted.recv()).await.unwrap();
    let mut line = Vec::new();
    within("the PROXY line", async {
        while !line.ends_with(b"\r\n") {
            line.push(s.read_u8().await.unwrap());
        }
    })
    .await;
    let line = String::from_utf8(line).unwrap();
    assert!(line.starts_with("PROXY TCP4 127.0.0.1 127.0.0.1 "), "{line:?}");
    drop((ws, s));
    b.signal("TERM").await;
    assert_eq!(b.exit_code().await, 0);
}

/// `[::]:P` while another program holds `0.0.0.0:P` (a v4/v6 split over two services, from
/// when `[::]` took IPv6 only): the start fails, saying what to set, and `ipv6_only = true`
/// starts it for IPv6 clients (a review: a quiet fall-back to IPv6 only depended on which
/// program started first, and held for good once taken).
#[tokio::test]
async fn an_ipv6_any_address_beside_another_programs_ipv4_listener_needs_ipv6_only() {
    use crate::common::binary::Binary;
    if !ipv6_loopback("cli::an_ipv6_any_address_beside_another_programs_ipv4_listener_needs_ipv6_only") {
        return;
    }
    let (echo, _) = echo_backend().await;
    let other = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = other.local_addr().unwrap().port();
    let (code, _, err) = run_to_end(&[&format!("[::]:{port}"), &echo.to_string()]).await;
    assert_eq!(code, 1, "{err}");
    // The command line has no ipv6_only: what it can do is said (a review).
    assert!(
        err.contains(&format!(
            "use another port, or [::]:{port} with ipv6_only = true in a configuration file"
        )),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wsbridge.toml");
    std::fs::write(
        &file,
        format!("[[listen]]\naddr = \"[::]:{port}\"\n[[route]]\npath = \"/\"\ntarget = \"{echo}\"\n"),
    )
    .unwrap();
    let (code, _, err) = run_to_end(&["--config", file.to_str().unwrap()]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("set ipv6_only = true on this listener"), "{err}");
    let file = dir.path().join("wsbridge.toml");
    std::fs::write(
        &file,
        format!("[[listen]]\naddr = \"[::]:{port}\"\nipv6_only = true\n[[route]]\npath = \"/\"\ntarget = \"{echo}\"\n"),
    )
    .unwrap();
    let mut b = Binary::spawn(&["--config", file.to_str().unwrap()]).await;
    echo_through("[::1]", port).await;
    b.signal("TERM").await;
    assert_eq!(b.exit_code().await, 0);
    let (code, _, err) = run_to_end(&["check", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    drop(other);
    std::fs::write(
        &file,
        "[[listen]]\naddr = \"0.0.0.0:6080\"\nipv6_only = true\n[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:9\"\n",
    )
    .unwrap();
    let (code, _, err) = run_to_end(&["check", file.to_str().unwrap()]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("ipv6_only is for an IPv6 address"), "{err}");
    // Both families asked for on a specific IPv6 address, which takes IPv6 alone (a review: it
    // started, logged ipv4=true and refused IPv4 clients).
    std::fs::write(
        &file,
        "[[listen]]\naddr = \"[::1]:6080\"\nipv6_only = false\n[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:9\"\n",
    )
    .unwrap();
    let (code, _, err) = run_to_end(&["check", file.to_str().unwrap()]).await;
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("wsbridge.toml:3: listen[0].ipv6_only") && err.contains("only on [::]"),
        "{err}"
    );
    // Both families asked for on a port whose IPv4 side another listener here takes: refused at
    // check, not at the bind with advice that does not fit (a review).
    std::fs::write(
        &file,
        "[[listen]]\naddr = \"0.0.0.0:6080\"\n[[listen]]\naddr = \"[::]:6080\"\nipv6_only = false\n\
         [[route]]\npath = \"/\"\ntarget = \"127.0.0.1:9\"\n",
    )
    .unwrap();
    let (code, _, err) = run_to_end(&["check", file.to_str().unwrap()]).await;
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("listen[1].ipv6_only: ipv6_only = false takes IPv4 on port 6080 too"),
        "{err}"
    );
}

/// A file with `0.0.0.0:P` and `[::]:P` (how dual stack was written before `[::]` took both)
/// still starts: each listener takes its own family.
#[tokio::test]
async fn ipv4_and_ipv6_any_address_listeners_of_one_port_both_bind() {
    use crate::common::binary::Binary;
    if !ipv6_loopback("cli::ipv4_and_ipv6_any_address_listeners_of_one_port_both_bind") {
        return;
    }
    let (echo, _) = echo_backend().await;
    let port = std::net::TcpListener::bind("[::]:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wsbridge.toml");
    std::fs::write(
        &file,
        format!(
            "[[listen]]\naddr = \"0.0.0.0:{port}\"\n[[listen]]\naddr = \"[::]:{port}\"\n\
             [[route]]\npath = \"/\"\ntarget = \"{echo}\"\n"
        ),
    )
    .unwrap();
    let mut b = Binary::spawn(&["--config", file.to_str().unwrap()]).await;
    b.line(&format!("listening addr=[::]:{port}")).await;
    echo_through("127.0.0.1", port).await;
    echo_through("[::1]", port).await;
    b.signal("TERM").await;
    assert_eq!(b.exit_code().await, 0);
}

/// `--idle-timeout` from websockify's command line means something else here: said at start, in
/// words a VNC user recognises (a drop-in review: a still noVNC screen was cut off after N
/// seconds with "Disconnected", where websockify kept it and exited once no client was left).
#[tokio::test]
async fn the_idle_timeout_flag_says_what_it_closes() {
    use crate::common::binary::Binary;
    let (echo, _) = echo_backend().await;
    let mut b = Binary::spawn(&["127.0.0.1:0", &echo.to_string(), "--idle-timeout", "600"]).await;
    let line = b.line("--idle-timeout:").await;
    assert!(line.contains("VNC viewer of a still screen") && line.contains("idle=10m"), "{line}");
    b.signal("TERM").await;
    assert_eq!(b.exit_code().await, 0);
}

/// An empty `RUST_LOG` (what `RUST_LOG=${RUST_LOG}` in a compose file gives) is no filter that
/// hides everything: the bridge logs as without it (a review: not even "listening").
#[tokio::test]
async fn an_empty_rust_log_logs_as_an_unset_one() {
    let (echo, _) = echo_backend().await;
    let mut command = Command::new(BIN);
    command.args(["127.0.0.1:0", &echo.to_string()]).env("RUST_LOG", "");
    command.stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    within("the listening line", async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("listening addr=") {
                return;
            }
        }
        panic!("stderr ended without a listening line");
    })
    .await;
    child.kill().await.unwrap();
}
