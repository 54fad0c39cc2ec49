//! wss://: certificates and their errors, ws and wss on one port, TLS-only listeners, reload,
//! client certificates, TLS to backends. Certificates are generated per test (rcgen).

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::Message;
use wsbridge::config::{Config, ListenerConfig, Matcher, RouteConfig};
use wsbridge::server::Listener;
use wsbridge::tls::{BackendTlsSettings, CertFiles, ClientAuth, MinVersion, TlsError, TlsSettings};

use crate::common::pki::*;
use crate::common::*;

const BOTH: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

fn settings(cert: &Issued) -> TlsSettings {
    TlsSettings {
        watch: None,
        ..TlsSettings::new(CertFiles {
            cert: cert.cert.clone(),
            key: Some(cert.key.clone()),
        })
    }
}

fn tls_config(backend: std::net::SocketAddr, tls: TlsSettings) -> Config {
    let mut config = any_path_to(backend);
    config.listeners.push(ListenerConfig {
        tls: Some(tls),
        ..ListenerConfig::new("127.0.0.1:0".parse().unwrap())
    });
    config
}

#[tokio::test]
async fn wss_end_to_end_byte_exact_and_ws_on_the_same_port() {
    let pki = Pki::new("test CA");
    let cert = pki.server("server", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let (backend, _) = echo_backend().await;
    let bridge = TestBridge::start(tls_config(backend, settings(&cert))).await;

    let stream = tls_connect(bridge.addr, "localhost", client_config(&pki.ca_pem, None, BOTH))
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), None, "no ALPN offered, none chosen");
    let mut ws = wss_over(stream, &format!("wss://localhost:{}/", bridge.addr.port())).await;
    let data = pattern(1_000_000, 2);
    let mut got = Vec::new();
    within("echo", async {
        // Sent whole before reading: 1 MB fits in what the sockets on the way buffer.
        for chunk in data.chunks(100_000) {
            ws.send(Message::binary(chunk.to_vec())).await.unwrap();
        }
        while got.len() < data.len() {
            got.extend(futures_util::StreamExt::next(&mut ws).await.unwrap().unwrap().into_data());
        }
    })
    .await;
    assert!(got == data);

    // Plain ws:// on the same port still works.
    let (mut plain, _) = ws_connect(&bridge.url("/"), None).await;
    send_bin(&mut plain, b"plain").await;
    assert_eq!(recv_data(&mut plain).await, b"plain");
}

#[tokio::test]
async fn alpn_http11_is_chosen() {
    let pki = Pki::new("test CA");
    let cert = pki.server("server", &["localhost"], &rcgen::PKCS_ED25519);
    let (backend, _) = echo_backend().await;
    let bridge = TestBridge::start(tls_config(backend, settings(&cert))).await;
    let mut config = (*client_config(&pki.ca_pem, None, BOTH)).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let stream = tls_connect(bridge.addr, "localhost", std::sync::Arc::new(config)).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
}

#[tokio::test]
async fn tls_only_refuses_plain_promptly() {
    let pki = Pki::new("test CA");
    let cert = pki.server("server", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let (backend, accepted) = echo_backend().await;
    let mut tls = settings(&cert);
    tls.only = true;
    let bridge = TestBridge::start(tls_config(backend, tls)).await;
    let r = http_raw(bridge.addr, &upgrade_request("/", "")).await;
    assert_eq!(status_of(&r), 400, "{r}");
    assert!(body_of(&r).contains("TLS only"), "{r}");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    // wss still works.
    wss_echo(bridge.addr, client_config(&pki.ca_pem, None, BOTH), b"x").await;
}

#[tokio::test]
async fn silent_client_on_a_tls_port_is_dropped_at_the_deadline() {
    let pki = Pki::new("test CA");
    let cert = pki.server("server", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let (backend, _) = echo_backend().await;
    let mut config = tls_config(backend, settings(&cert));
    config.timeouts.handshake = Duration::from_millis(200);
    let bridge = TestBridge::start(config).await;
    // Nothing at all, or the first bytes of a ClientHello and then nothing: dropped (EOF or a
    // reset) at the deadline, which runs from the accept (after our clock starts); neither at
    // once nor left hanging.
    for (what, sent) in [("a silent client", &[][..]), ("a stalled TLS handshake", &[0x16, 0x03, 0x01][..])] {
        let start = std::time::Instant::now();
        let mut s = tokio::net::TcpStream::connect(bridge.addr).await.unwrap();
        s.write_all(sent).await.unwrap();
        let closed = closed_by_peer(&mut s).await;
        assert_window(&format!("the drop of {what}"), closed - start, Duration::from_millis(200));
    }
}

fn load_err(cert: &Path, key: Option<&Path>) -> String {
    let config = ListenerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        web: None,
        web_listing: false,
        web_follow_symlinks: false,
        web_dotfiles: false,
        ipv6_only: None,
        access: Default::default(),
        tls: Some(TlsSettings {
            watch: None,
            ..TlsSettings::new(CertFiles {
                cert: cert.into(),
                key: key.map(Into::into),
            })
        }),
    };
    let err: TlsError = Listener::prepare(&config).unwrap_err();
    err.to_string()
}

#[tokio::test]
async fn certificate_errors_name_the_file_and_the_problem() {
    let pki = Pki::new("test CA");
    let a = pki.server("a", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let b = pki.server("b", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let d = pki.dir.path();
    let missing = d.join("missing.pem");
    let e = load_err(&missing, None);
    assert!(e.starts_with(&format!("{}: cannot read", missing.display())), "{e}");
    let empty = d.join("empty.pem");
    std::fs::write(&empty, "nothing here\n").unwrap();
    let e = load_err(&empty, Some(&a.key));
    assert_eq!(
        e,
        format!("{}: no certificate found (expected \"BEGIN CERTIFICATE\")", empty.display())
    );
    let e = load_err(&a.cert, None);
    assert!(e.starts_with(&format!("{}: no private key found", a.cert.display())), "{e}");
    let e = load_err(&a.cert, Some(&b.key));
    assert_eq!(
        e,
        format!(
            "{}: private key does not match the certificate in {}",
            b.key.display(),
            a.cert.display()
        )
    );
    let garbage = d.join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n").unwrap();
    let e = load_err(&garbage, Some(&a.key));
    assert!(e.starts_with(&format!("{}: invalid PEM", garbage.display())), "{e}");
    // A key half written (a reload while it is being copied): said in words, not as bytes.
    let half = d.join("half.key");
    let key = std::fs::read_to_string(&a.key).unwrap();
    std::fs::write(&half, &key[..key.len() / 2]).unwrap();
    let e = load_err(&a.cert, Some(&half));
    assert!(
        e.contains("invalid PEM: no \"-----END PRIVATE KEY-----\" line (the file is cut short"),
        "{e}"
    );
    // A key with a passphrase (openssl's `-aes256`): said so, with how to decrypt it.
    let encrypted = d.join("encrypted.key");
    let out = std::process::Command::new("openssl")
        .args(["pkcs8", "-topk8", "-v2", "aes256", "-passout", "pass:secret", "-in"])
        .arg(&a.key)
        .arg("-out")
        .arg(&encrypted)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let e = load_err(&a.cert, Some(&encrypted));
    assert!(
        e.starts_with(&format!("{}: the private key is encrypted", encrypted.display())) && e.contains("openssl pkey"),
        "{e}"
    );
}

#[tokio::test]
async fn key_formats_and_key_inside_the_cert_file() {
    let pki = Pki::new("test CA");
    let (backend, _) = echo_backend().await;
    let mut cases = Vec::new();
    // PKCS#8 ECDSA and Ed25519, the key in the certificate file (websockify's --cert alone).
    for (name, alg) in [("ecdsa", &rcgen::PKCS_ECDSA_P256_SHA256), ("ed25519", &rcgen::PKCS_ED25519)] {
        let c = pki.server(name, &["localhost"], alg);
        let combined = pki.dir.path().join(format!("{name}-combined.pem"));
        std::fs::write(&combined, format!("{}{}", c.cert_pem, c.key_pem)).unwrap();
        cases.push((name.to_string(), CertFiles { cert: combined, key: None }));
    }
    // PKCS#1 RSA and SEC1 EC keys, as openssl writes them.
    for (name, genkey) in [
        ("rsa-pkcs1", "openssl genrsa -traditional -out {k} 2048"),
        ("ec-sec1", "openssl ecparam -name prime256v1 -genkey -noout -out {k}"),
    ] {
        let key = pki.dir.path().join(format!("{name}.key"));
        let cert = pki.dir.path().join(format!("{name}.crt"));
        let sh = |cmd: String| {
            let out = std::process::Command::new("sh").arg("-c").arg(&cmd).output().expect("sh");
            assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
        };
        sh(genkey.replace("{k}", key.to_str().unwrap()));
        sh(format!("openssl req -new -x509 -key {} -out {} -days 2 -subj /CN=localhost -addext subjectAltName=DNS:localhost -addext basicConstraints=critical,CA:FALSE", key.display(), cert.display()));
        let first_line = std::fs::read_to_string(&key).unwrap().lines().next().unwrap().to_owned();
        assert!(
            first_line.contains("RSA PRIVATE KEY") || first_line.contains("EC PRIVATE KEY"),
            "{first_line}"
        );
        cases.push((name.to_string(), CertFiles { cert, key: Some(key) }));
    }
    for (name, files) in cases {
        let mut tls = settings(&pki.server("unused", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256));
        tls.default = files.clone();
        let bridge = TestBridge::start(tls_config(backend, tls)).await;
        let ca = if name.starts_with("rsa") || name.starts_with("ec-") {
            std::fs::read_to_string(&files.cert).unwrap()
        } else {
            pki.ca_pem.clone()
        };
        wss_echo(bridge.addr, client_config(&ca, None, BOTH), name.as_bytes()).await;
    }
}

#[tokio::test]
async fn certificate_swap_is_picked_up_and_open_sessions_keep_working() {
    let pki = Pki::new("test CA");
    let first = pki.server("first", &["localhost", "first.test"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let second = pki.server("second", &["localhost", "second.test"], &rcgen::PKCS_ECDSA_P256_SHA256);
    // certbot's layout: live/ holds symlinks that are swapped to new files.
    let live = pki.dir.path().join("live");
    std::fs::create_dir(&live).unwrap();
    std::os::unix::fs::symlink(&first.cert, live.join("fullchain.pem")).unwrap();
    std::os::unix::fs::symlink(&first.key, live.join("privkey.pem")).unwrap();
    let (backend, _) = echo_backend().await;
    let mut tls = settings(&first);
    tls.default = CertFiles {
        cert: live.join("fullchain.pem"),
        key: Some(live.join("privkey.pem")),
    };
    tls.watch = Some(Duration::from_millis(50));
    let bridge = TestBridge::start(tls_config(backend, tls)).await;
    let client = client_config(&pki.ca_pem, None, BOTH);

    let stream = tls_connect(bridge.addr, "localhost", client.clone()).await.unwrap();
    assert_eq!(server_cn(&stream), "localhost");
    assert_eq!(
        stream.get_ref().1.peer_certificates().unwrap()[0].as_ref(),
        der_of(&first.cert_pem).as_slice()
    );
    let mut open = wss_over(stream, "wss://localhost/").await;

    // Swap both links atomically (rename over), as certbot does.
    for (name, target) in [("fullchain.pem", &second.cert), ("privkey.pem", &second.key)] {
        let tmp = live.join(format!("{name}.new"));
        std::os::unix::fs::symlink(target, &tmp).unwrap();
        std::fs::rename(&tmp, live.join(name)).unwrap();
    }
    let second_der = der_of(&second.cert_pem);
    within("the new certificate in service", async {
        loop {
            let s = tls_connect(bridge.addr, "localhost", client.clone()).await.unwrap();
            if s.get_ref().1.peer_certificates().unwrap()[0].as_ref() == second_der.as_slice() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await; // polling for the watcher's reload
        }
    })
    .await;
    // The session opened before the swap is untouched.
    send_bin(&mut open, b"still here").await;
    assert_eq!(recv_data(&mut open).await, b"still here");

    // A broken replacement is refused and the working certificate stays in service.
    std::fs::write(&second.cert, "not a certificate").unwrap();
    let errors = bridge.bridge.reload_tls();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].to_string().contains("no certificate found"), "{}", errors[0]);
    let s = tls_connect(bridge.addr, "localhost", client.clone()).await.unwrap();
    assert_eq!(s.get_ref().1.peer_certificates().unwrap()[0].as_ref(), second_der.as_slice());
}

/// A client resumes its session by ticket however many other clients came since (rustls'
/// default in-memory cache forgets all but the last 256 sessions), and not past a reload of the
/// certificate files.
#[tokio::test]
async fn sessions_resume_by_ticket_after_many_others_but_not_past_a_reload() {
    let pki = Pki::new("test CA");
    let cert = pki.server("server", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let (backend, _) = echo_backend().await;
    let bridge = TestBridge::start(tls_config(backend, settings(&cert))).await;
    // One client with its own resumption store; each session echoes once, which also reads the
    // tickets the server sends after the handshake.
    let client = client_config(&pki.ca_pem, None, BOTH);
    let session = |client: std::sync::Arc<rustls::ClientConfig>| async move {
        let stream = tls_connect(bridge.addr, "localhost", client).await.unwrap();
        let kind = stream.get_ref().1.handshake_kind();
        let mut ws = wss_over(stream, "wss://localhost/").await;
        send_bin(&mut ws, b"hello").await;
        assert_eq!(recv_data(&mut ws).await, b"hello");
        kind
    };
    assert_eq!(session(client.clone()).await, Some(rustls::HandshakeKind::Full));
    assert_eq!(session(client.clone()).await, Some(rustls::HandshakeKind::Resumed));
    // 300 other clients, 10 at a time: 600 tickets, well past a 256-session cache.
    for _ in 0..30 {
        let others: Vec<_> = (0..10).map(|_| session(client_config(&pki.ca_pem, None, BOTH))).collect();
        for kind in futures_util::future::join_all(others).await {
            assert_eq!(kind, Some(rustls::HandshakeKind::Full));
        }
    }
    assert_eq!(session(client.clone()).await, Some(rustls::HandshakeKind::Resumed));
    // New keys with the reloaded files: a full handshake, then resumption again.
    assert!(bridge.bridge.reload_tls().is_empty());
    assert_eq!(session(client.clone()).await, Some(rustls::HandshakeKind::Full));
    assert_eq!(session(client).await, Some(rustls::HandshakeKind::Resumed));
}

/// The DER bytes of a PEM certificate.
fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

#[tokio::test]
async fn sni_selects_the_certificate() {
    let pki = Pki::new("test CA");
    let default = pki.server("default", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let a = pki.server("a", &["a.test"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let b = pki.server("b", &["b.test", "*.b.test"], &rcgen::PKCS_ED25519);
    let (backend, _) = echo_backend().await;
    let mut tls = settings(&default);
    tls.sni = vec![
        (
            vec!["a.test".into()],
            CertFiles {
                cert: a.cert.clone(),
                key: Some(a.key.clone()),
            },
        ),
        (
            vec!["b.test".into(), "*.b.test".into()],
            CertFiles {
                cert: b.cert.clone(),
                key: Some(b.key.clone()),
            },
        ),
    ];
    let bridge = TestBridge::start(tls_config(backend, tls)).await;
    let client = client_config(&pki.ca_pem, None, BOTH);
    for (name, cn) in [
        ("localhost", "localhost"),
        ("a.test", "a.test"),
        ("b.test", "b.test"),
        ("x.b.test", "b.test"),
    ] {
        let s = tls_connect(bridge.addr, name, client.clone())
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(server_cn(&s), cn);
    }
}

#[tokio::test]
async fn minimum_version_tls13() {
    let pki = Pki::new("test CA");
    let cert = pki.server("server", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let (backend, _) = echo_backend().await;
    let mut tls = settings(&cert);
    tls.min_version = MinVersion::Tls13;
    let bridge = TestBridge::start(tls_config(backend, tls)).await;
    let tls12 = client_config(&pki.ca_pem, None, &[&rustls::version::TLS12]);
    assert!(tls_connect(bridge.addr, "localhost", tls12).await.is_err());
    let s = tls_connect(bridge.addr, "localhost", client_config(&pki.ca_pem, None, BOTH))
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
}

#[tokio::test]
async fn client_certificates_required_and_cn_allow_list() {
    let pki = Pki::new("test CA");
    let other = Pki::new("other CA");
    let cert = pki.server("server", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let alice = pki.client("alice", "alice");
    let bob = pki.client("bob", "bob");
    let mallory = other.client("mallory", "alice");
    let (backend, _) = echo_backend().await;
    let mut tls = settings(&cert);
    tls.client_ca = Some(pki.ca_file());
    let mut config = tls_config(backend, tls);
    config.routes[0].options.client_cn = Some(vec!["alice".into()]);
    let bridge = TestBridge::start(config).await;

    // Alice: certificate from the CA, CN on the list.
    wss_echo(bridge.addr, client_config(&pki.ca_pem, Some(&alice), BOTH), b"hi").await;

    // Bob: valid certificate, CN not on the route's list: 403 before the upgrade.
    let mut s = tls_connect(bridge.addr, "localhost", client_config(&pki.ca_pem, Some(&bob), BOTH))
        .await
        .unwrap();
    s.write_all(&upgrade_request("/", "")).await.unwrap();
    let mut r = String::new();
    within("403", s.read_to_string(&mut r)).await.unwrap();
    assert_eq!(status_of(&r), 403, "{r}");
    assert!(
        r.contains("forbidden") && !r.contains("alice"),
        "the body does not tell the allow-list: {r}"
    );

    // Plain ws:// on the same port cannot go around the client-certificate requirement.
    let r = http_raw(bridge.addr, &upgrade_request("/", "")).await;
    assert_eq!(status_of(&r), 400, "{r}");

    // No certificate, or one from another CA: the TLS handshake fails.
    for client in [
        client_config(&pki.ca_pem, None, BOTH),
        client_config(&pki.ca_pem, Some(&mallory), BOTH),
    ] {
        assert!(tls_refused(bridge.addr, client).await);
    }
}

#[tokio::test]
async fn optional_client_certificates() {
    let pki = Pki::new("test CA");
    let other = Pki::new("other CA");
    let cert = pki.server("server", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let alice = pki.client("alice", "alice");
    let bob = pki.client("bob", "bob");
    // Alice's name, from a CA the bridge does not trust.
    let mallory = other.client("mallory", "alice");
    let (backend, _) = echo_backend().await;
    let mut tls = settings(&cert);
    tls.client_ca = Some(pki.ca_file());
    tls.client_auth = ClientAuth::Optional;
    let mut config = tls_config(backend, tls);
    // Beside the open any-path route, one for Alice only.
    let mut options = config.default_route_options();
    options.client_cn = Some(vec!["alice".into()]);
    config.routes.push(RouteConfig {
        matcher: Matcher::Path("/alice".into()),
        target: tcp(backend),
        options,
    });
    let bridge = TestBridge::start(config).await;
    let anonymous = client_config(&pki.ca_pem, None, BOTH);

    // The open route: anyone, with or without a certificate.
    wss_echo(bridge.addr, anonymous.clone(), b"anonymous").await;
    wss_echo(bridge.addr, client_config(&pki.ca_pem, Some(&bob), BOTH), b"bob").await;

    // Alice's route: her certificate is let through (101, then the echo)...
    let stream = tls_connect(bridge.addr, "localhost", client_config(&pki.ca_pem, Some(&alice), BOTH))
        .await
        .unwrap();
    let mut ws = wss_over(stream, "wss://localhost/alice").await;
    send_bin(&mut ws, b"alice").await;
    assert_eq!(recv_data(&mut ws).await, b"alice");
    // ...another name, or none, gets 403 before the upgrade, and the backend is not reached.
    for (who, client) in [
        ("bob", client_config(&pki.ca_pem, Some(&bob), BOTH)),
        ("anonymous", anonymous.clone()),
    ] {
        let r = wss_raw(bridge.addr, client, &upgrade_request("/alice", "")).await;
        assert_eq!(status_of(&r), 403, "{who}: {r}");
    }

    // A certificate presented is verified even where none is required: one from another CA ends
    // the TLS handshake.
    assert!(
        tls_refused(bridge.addr, client_config(&pki.ca_pem, Some(&mallory), BOTH)).await,
        "a client certificate from an untrusted CA was accepted"
    );
    // The bridge still serves after these refusals.
    wss_echo(bridge.addr, anonymous, b"still serving").await;
}

/// Sends `request` over wss:// to `addr` (name "localhost") with `client`, and returns the whole
/// answer (for refusals, after which the bridge closes).
async fn wss_raw(addr: std::net::SocketAddr, client: std::sync::Arc<rustls::ClientConfig>, request: &[u8]) -> String {
    let mut s = tls_connect(addr, "localhost", client).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut r = String::new();
    within("the answer", s.read_to_string(&mut r)).await.unwrap();
    r
}

/// Whether the bridge refuses the TLS handshake of `client`: the handshake fails, or (TLS 1.3,
/// where the client's certificate is checked after the client considers the handshake done) the
/// first read fails or finds the connection closed instead of an answer.
async fn tls_refused(addr: std::net::SocketAddr, client: std::sync::Arc<rustls::ClientConfig>) -> bool {
    let attempt = async {
        let mut s = tls_connect(addr, "localhost", client).await?;
        s.write_all(&upgrade_request("/", "")).await?;
        let mut buf = [0u8; 16];
        s.read(&mut buf).await
    };
    matches!(within("the refusal", attempt).await, Err(_) | Ok(0))
}

/// Opens wss:// to `addr` (name "localhost") with `client`, and checks that `payload` comes back.
async fn wss_echo(addr: std::net::SocketAddr, client: std::sync::Arc<rustls::ClientConfig>, payload: &[u8]) {
    let stream = tls_connect(addr, "localhost", client).await.unwrap();
    let mut ws = wss_over(stream, "wss://localhost/").await;
    send_bin(&mut ws, payload).await;
    assert_eq!(recv_data(&mut ws).await, payload);
}

const RESET: &[u8] = b"reset now";
const TRUNCATE: &[u8] = b"close without close_notify";

/// A TLS echo backend with `cert`. A read of exactly `RESET` makes it reset the connection
/// (no close_notify, no FIN) instead.
async fn tls_echo_backend(cert: &Issued) -> std::net::SocketAddr {
    let acceptor = cert.acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(s).await else { return };
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if &buf[..n] == RESET {
                        let _ = s.get_ref().0.set_zero_linger();
                        return;
                    }
                    if &buf[..n] == TRUNCATE {
                        return; // dropped: a FIN without close_notify
                    }
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A bridge whose one route goes to `backend` over TLS with these settings.
async fn bridge_to_tls_backend(backend: std::net::SocketAddr, name: Option<&str>, ca: Option<PathBuf>, insecure: bool) -> TestBridge {
    let mut config = any_path_to(backend);
    config.routes[0].options.backend_tls = Some(BackendTlsSettings {
        server_name: name.map(str::to_owned),
        ca,
        insecure_skip_verify: insecure,
    });
    TestBridge::start(config).await
}

#[tokio::test]
async fn tls_backend_endings_give_the_codes_tcp_ones_do() {
    // A reset is a failure (1011); closing without TLS close_notify, as many servers do, is a
    // plain end (1000) once everything it sent was delivered.
    let pki = Pki::new("backend CA");
    let cert = pki.server("vnc.internal", &["vnc.internal"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let backend = tls_echo_backend(&cert).await;
    let bridge = bridge_to_tls_backend(backend, Some("vnc.internal"), Some(pki.ca_file()), false).await;
    for (ending, want_code, want_reason) in [(RESET, 1011, "backend read failed"), (TRUNCATE, 1000, "backend closed")] {
        let (mut ws, _) = ws_connect(&bridge.url("/"), None).await;
        send_bin(&mut ws, b"echo first").await;
        assert_eq!(recv_data(&mut ws).await, b"echo first");
        send_bin(&mut ws, ending).await;
        let (code, reason) = read_close(&mut ws).await;
        assert_eq!(code, want_code, "{reason}");
        assert!(reason.starts_with(want_reason), "{reason}");
    }
}

/// A backend's self-signed certificate made the usual way (`openssl req -x509`, which marks it as
/// a CA), written as PEM files like [`Pki`]'s.
fn self_signed_ca_marked(dir: &Path, names: &[&str]) -> Issued {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, names[0]);
    let cert = params.self_signed(&key).unwrap();
    Issued::write(dir, names[0], &cert, &key)
}

#[tokio::test]
async fn backend_self_signed_certificate_is_trusted_by_naming_it() {
    // `--ssl-target --ssl-target-ca backend.pem` with the backend's own self-signed certificate,
    // which `openssl req -x509` marks as a CA: WebPKI alone refuses it (CaUsedAsEndEntity).
    let dir = tempfile::tempdir().unwrap();
    let cert = self_signed_ca_marked(dir.path(), &["vnc.internal"]);
    let other = self_signed_ca_marked(dir.path(), &["other.internal"]);
    let backend = tls_echo_backend(&cert).await;

    // Pinned: accepted, whatever name the route connects by (the file says which certificate).
    for name in [Some("vnc.internal"), None] {
        let bridge = bridge_to_tls_backend(backend, name, Some(cert.cert.clone()), false).await;
        let (mut ws, _) = ws_connect(&bridge.url("/"), None).await;
        send_bin(&mut ws, b"to a self-signed backend").await;
        assert_eq!(recv_data(&mut ws).await, b"to a self-signed backend");
    }

    // Another self-signed certificate in the file: refused, as before.
    let bridge = bridge_to_tls_backend(backend, Some("vnc.internal"), Some(other.cert.clone()), false).await;
    let mut s = raw_ws(bridge.addr, "/").await;
    let (code, reason) = raw_read_close(&mut s).await;
    assert_eq!((code, reason.as_str()), (1014, "backend TLS failed: certificate not accepted"));

    // A bundle of several certificates pins none of them: each would stand for every route
    // that uses the bundle, whatever its name (here the backend's own, and another's).
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, format!("{}{}", cert.cert_pem, other.cert_pem)).unwrap();
    let bridge = bridge_to_tls_backend(backend, Some("vnc.internal"), Some(bundle), false).await;
    let mut s = raw_ws(bridge.addr, "/").await;
    let (code, reason) = raw_read_close(&mut s).await;
    assert_eq!((code, reason.as_str()), (1014, "backend TLS failed: certificate not accepted"));
}

#[tokio::test]
async fn backend_tls_is_verified() {
    let pki = Pki::new("backend CA");
    let wrong = Pki::new("wrong CA");
    let cert = pki.server("backend", &["vnc.internal"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let backend = tls_echo_backend(&cert).await;

    // Verified against the right CA, with the name the certificate carries.
    let bridge = bridge_to_tls_backend(backend, Some("vnc.internal"), Some(pki.ca_file()), false).await;
    let (mut ws, _) = ws_connect(&bridge.url("/"), None).await;
    send_bin(&mut ws, b"over TLS to the backend").await;
    assert_eq!(recv_data(&mut ws).await, b"over TLS to the backend");
    // The client's close is answered through the TLS backend path too.
    ws.send(Message::Close(None)).await.unwrap();
    assert_eq!(read_until_close(&mut ws).await.1, None);

    // The wrong CA: refused, and the client is told why.
    let bridge = bridge_to_tls_backend(backend, Some("vnc.internal"), Some(wrong.ca_file()), false).await;
    let mut s = raw_ws(bridge.addr, "/").await;
    let (code, reason) = raw_read_close(&mut s).await;
    assert_eq!(code, 1014);
    assert_eq!(reason, "backend TLS failed: certificate not accepted");

    // A name the certificate does not carry: refused too.
    let bridge = bridge_to_tls_backend(backend, None, Some(pki.ca_file()), false).await;
    let mut s = raw_ws(bridge.addr, "/").await;
    let (code, reason) = raw_read_close(&mut s).await;
    assert_eq!((code, reason.as_str()), (1014, "backend TLS failed: certificate not accepted"));

    // Only when the route says so in so many words is verification off.
    let bridge = bridge_to_tls_backend(backend, None, None, true).await;
    let (mut ws, _) = ws_connect(&bridge.url("/"), None).await;
    send_bin(&mut ws, b"unverified").await;
    assert_eq!(recv_data(&mut ws).await, b"unverified");
}

#[tokio::test]
async fn self_pem_in_the_working_directory_is_the_default_certificate() {
    // websockify's --cert defaults to ./self.pem (its README has users make one there), so
    // `websockify --ssl-only 6080 localhost:5900` run beside it serves wss://.
    use crate::common::binary::{command_to_end, Binary, BIN};
    let pki = Pki::new("self.pem CA");
    let cert = pki.server("server", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("self.pem"), format!("{}{}", cert.cert_pem, cert.key_pem)).unwrap();
    let (backend, _) = echo_backend().await;
    let args = ["127.0.0.1:0", &backend.to_string(), "--ssl-only"].map(str::to_owned);
    let mut command = tokio::process::Command::new(BIN);
    command.current_dir(dir.path()).args(&args);
    let bridge = Binary::spawn_command(command).await;
    let tls = tls_connect(
        bridge.addr,
        "localhost",
        client_config(&pki.ca_pem, None, &[&rustls::version::TLS13]),
    )
    .await
    .unwrap();
    let mut ws = wss_over(tls, &format!("wss://localhost:{}/", bridge.addr.port())).await;
    send_bin(&mut ws, b"over self.pem").await;
    assert_eq!(recv_data(&mut ws).await, b"over self.pem");

    // Without one, --ssl-only says what it needs, naming both.
    let empty = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(BIN);
    command.current_dir(empty.path()).args(&args);
    let (code, _, err) = command_to_end(command).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("need --cert FILE (or self.pem in the current directory"), "{err}");
}

/// A client certificate made the way many how-tos make one (`openssl x509 -req` without an
/// `-extfile`: X.509 version 1) is refused by rustls's verifier, which reads version 3 only;
/// websockify (OpenSSL) accepts it. The handshake fails, and the log line says why in plain words
/// and how to issue one that works (found by a newcomer's side-by-side run: the line read only
/// `UnsupportedCertVersion`). README lists it among the differences from websockify.
#[tokio::test]
async fn a_version_1_client_certificate_is_refused_with_a_reason_that_says_what_to_do() {
    let pki = Pki::new("test CA");
    let server = pki.server("server", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let dir = pki.dir.path();
    let sh = |cmd: &str| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(dir)
            .output()
            .expect("sh");
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    };
    sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca1.key -out ca1.pem -days 2 -subj /CN=v1-ca");
    sh("openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout v1.key -out v1.csr -subj /CN=alice");
    sh("openssl x509 -req -in v1.csr -CA ca1.pem -CAkey ca1.key -CAcreateserial -out v1.pem -days 2");
    let text = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(dir.join("v1.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("Version: 1"), "openssl made no version 1 certificate here: {text}");
    let (backend, _) = echo_backend().await;
    let (target, ca) = (backend.to_string(), dir.join("ca1.pem"));
    let mut bridge = binary::Binary::spawn(&[
        "--cert",
        server.cert.to_str().unwrap(),
        "--key",
        server.key.to_str().unwrap(),
        "--verify-client",
        "--cafile",
        ca.to_str().unwrap(),
        "127.0.0.1:0",
        &target,
    ])
    .await;
    // OpenSSL's client, as rustls's will not even send such a certificate.
    let client = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &bridge.addr.to_string(),
            "-servername",
            "localhost",
            "-cert",
        ])
        .arg(dir.join("v1.pem"))
        .arg("-key")
        .arg(dir.join("v1.key"))
        .stdin(std::process::Stdio::null())
        .output();
    within("openssl s_client", client).await.unwrap();
    // The handshake failed, for this reason.
    let line = bridge.line("TLS handshake failed").await;
    assert!(line.contains("X.509 version 1") && line.contains("-extfile"), "{line}");
}

/// A certificate put in service that clients will refuse for its dates is warned of at start
/// (and at each reload that puts one in service): expired, or not valid yet. It started
/// silently before (found by a TLS review); the expiry metric was the only sign.
#[tokio::test]
async fn an_expired_or_future_certificate_is_warned_of_at_start() {
    let pki = Pki::new("test CA");
    let (backend, _) = echo_backend().await;
    let target = backend.to_string();
    for (cert, words) in [
        (pki.server_dated("old", &["localhost"], (2019, 1, 1), (2020, 1, 2)), "has expired"),
        (
            pki.server_dated("future", &["localhost"], (2090, 1, 1), (2091, 1, 1)),
            "is not valid yet",
        ),
    ] {
        let mut bridge = binary::Binary::spawn(&[
            "--cert",
            cert.cert.to_str().unwrap(),
            "--key",
            cert.key.to_str().unwrap(),
            "127.0.0.1:0",
            &target,
        ])
        .await;
        let line = bridge.line("TLS certificate in service").await;
        assert!(line.contains("WARN") && line.contains(words), "{line}");
    }
}

/// `client_crl`: a client certificate on the CA's revocation list is refused in the handshake,
/// others get through; a new list is put in service by a reload (SIGHUP, or the files watched),
/// as certificates are. Without it a leaked client certificate could only be shut out by
/// replacing the CA (found by a TLS review).
#[tokio::test]
async fn a_revoked_client_certificate_is_refused() {
    let pki = Pki::new("test CA");
    let cert = pki.server("server", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let alice = pki.client("alice", "alice");
    let bob = pki.client("bob", "bob");
    let crl = pki.crl("clients.crl", &[&bob]);
    let (backend, _) = echo_backend().await;
    let mut tls = settings(&cert);
    tls.client_ca = Some(pki.ca_file());
    tls.client_crl = Some(crl.clone());
    let bridge = TestBridge::start(tls_config(backend, tls)).await;
    wss_echo(bridge.addr, client_config(&pki.ca_pem, Some(&alice), BOTH), b"alice").await;
    assert!(
        tls_refused(bridge.addr, client_config(&pki.ca_pem, Some(&bob), BOTH)).await,
        "bob is revoked"
    );
    // Alice's certificate leaks: the CA's next list names her too.
    let next = pki.crl("next.crl", &[&bob, &alice]);
    std::fs::copy(&next, &crl).unwrap();
    assert!(bridge.bridge.reload_tls().is_empty());
    assert!(
        tls_refused(bridge.addr, client_config(&pki.ca_pem, Some(&alice), BOTH)).await,
        "alice is revoked now"
    );
}

/// A revocation list from a file that is not one, or without `client_ca`, is a configuration
/// error at the line that names it.
#[test]
fn client_crl_mistakes_name_the_field() {
    let pki = Pki::new("test CA");
    let cert = pki.server("server", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let dir = pki.dir.path();
    let toml = |extra: &str| {
        format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\n[listen.tls]\ncert = {:?}\nkey = {:?}\n{extra}\n[[route]]\npath = \"/\"\ntarget = \"h:1\"\n",
            cert.cert.display().to_string(),
            cert.key.display().to_string()
        )
    };
    let parse = |text: String| wsbridge::config::Config::from_toml(&text, &dir.join("bridge.toml")).map(drop);
    let e = parse(toml("client_crl = \"ca.pem\"")).unwrap_err().to_string();
    assert!(
        e.contains(":6: listen[0].tls.client_crl: revocation lists are for client certificates: add client_ca"),
        "{e}"
    );
    let e = parse(toml("client_ca = \"ca.pem\"\nclient_crl = \"ca.pem\""))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(":7: listen[0].tls.client_crl:") && e.contains("no revocation list in it"),
        "{e}"
    );
    let crl = pki.crl("ok.crl", &[]);
    parse(toml(&format!(
        "client_ca = \"ca.pem\"\nclient_crl = {:?}",
        crl.display().to_string()
    )))
    .unwrap();
}

/// Routes that admit client certificates by `client_cn`, served by listeners that trust
/// different client CAs: a CN either CA issues passes on every such route, which the operator
/// is warned of (`wsbridge check` and start); one CA, or no `client_cn`, is not warned of.
#[test]
fn client_cn_under_several_client_cas_is_warned_of() {
    let pki = Pki::new("our CA");
    let partner = Pki::new("a partner's CA");
    let cert = pki.server("server", &["localhost"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let listener = |port: u16, ca: &Path| {
        format!(
            "[[listen]]\naddr = \"127.0.0.1:{port}\"\n[listen.tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
            cert.cert.display().to_string(),
            cert.key.display().to_string(),
            ca.display().to_string()
        )
    };
    let route = |cn: bool| {
        format!(
            "[[route]]\npath = \"/\"\ntarget = \"h:1\"\n{}",
            if cn { "client_cn = [\"alice\"]\n" } else { "" }
        )
    };
    let warnings = |text: String| {
        wsbridge::config::Config::from_toml(&text, &pki.dir.path().join("w.toml"))
            .unwrap()
            .warnings()
            .join("\n")
    };
    let two_cas = format!("{}{}", listener(1, &pki.ca_file()), listener(2, &partner.ca_file()));
    let w = warnings(format!("{two_cas}{}", route(true)));
    assert!(
        w.contains("routes admit client certificates by client_cn, and the listeners trust 2 client CAs"),
        "{w}"
    );
    assert!(!warnings(format!("{two_cas}{}", route(false))).contains("client_cn"));
    let one_ca = format!("{}{}", listener(1, &pki.ca_file()), listener(2, &pki.ca_file()));
    assert!(!warnings(format!("{one_ca}{}", route(true))).contains("client_cn"));
}
