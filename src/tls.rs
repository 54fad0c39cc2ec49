//! TLS: terminating `wss://` for clients, and TLS to backends that need it. rustls only, with the
//! `ring` provider passed explicitly everywhere (no process-wide default is relied on).
//!
//! - Certificates are PEM (`rustls-pki-types`' `PemObject`): a chain and a key (PKCS#8, PKCS#1 RSA or
//!   SEC1 EC; RSA, ECDSA or Ed25519), the key possibly in the certificate file. Startup errors name
//!   the file and the problem, including a key that does not match its certificate.
//! - Several certificates can be served by SNI; the first is the default.
//! - [`TlsListener`] holds the server config in force behind a lock and swaps it whole on reload
//!   (SIGHUP, or a change to any file it was loaded from, checked every `watch` interval: certbot
//!   renews through a symlink swap, so the *target's* identity and mtime are compared). A file that
//!   fails to load is reported and the old certificate stays in service; handshakes in progress and
//!   live sessions keep the config they started with.
//! - ws and wss share a port by sniffing the first byte (0x16, a TLS handshake record) unless the
//!   listener is TLS-only (see [`crate::server`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_util::sync::CancellationToken;

// The settings are configuration and live there; re-exported so `wsbridge::tls::TlsSettings` and
// friends keep working for embedders and tests.
pub use crate::config::tls::{BackendTlsSettings, CertFiles, ClientAuth, MinVersion, TlsSettings};

/// The crypto provider: one, chosen here.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS file that could not be used; the message names the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CA file.
    #[error("{}: {problem}", file.display())]
    File {
        /// The file.
        file: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// rustls refused the combination.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn file_error(file: &Path, problem: impl Into<String>) -> TlsError {
    TlsError::File {
        file: file.to_path_buf(),
        problem: problem.into(),
    }
}

fn pem_problem(file: &Path, what: &str, e: rustls_pki_types::pem::Error) -> TlsError {
    use rustls_pki_types::pem::Error as E;
    match e {
        E::Io(io) => file_error(file, format!("cannot read: {io}")),
        E::NoItemsFound => file_error(file, format!("no {what} found (expected a PEM \"BEGIN\" block)")),
        E::MissingSectionEnd { end_marker } => file_error(
            file,
            format!(
                "invalid PEM: no \"-----END {}-----\" line (the file is cut short, half written?)",
                String::from_utf8_lossy(&end_marker)
            ),
        ),
        E::IllegalSectionStart { line } => file_error(
            file,
            format!("invalid PEM: a bad \"BEGIN\" line: {:?}", String::from_utf8_lossy(&line)),
        ),
        other => file_error(file, format!("invalid PEM: {other}")),
    }
}

/// Reads a PEM certificate chain.
///
/// # Errors
/// Unreadable file, invalid PEM, or no certificate in it.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_problem(path, "certificate", e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_problem(path, "certificate", e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate found (expected \"BEGIN CERTIFICATE\")"));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) from a PEM file.
///
/// # Errors
/// Unreadable file, invalid PEM, or no key in it.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            match std::fs::read(path).map(|pem| pem.windows(b"ENCRYPTED PRIVATE KEY".len()).any(|w| w == b"ENCRYPTED PRIVATE KEY")) {
                Ok(true) => file_error(
                    path,
                    "the private key is encrypted (with a passphrase), which wsbridge cannot use: decrypt it to a file \
                 only wsbridge's user can read (openssl pkey -in enc.pem -out key.pem)",
                ),
                _ => file_error(
                    path,
                    "no private key found (expected \"BEGIN PRIVATE KEY\", \"BEGIN RSA PRIVATE KEY\" or \"BEGIN EC PRIVATE KEY\")",
                ),
            }
        }
        other => pem_problem(path, "private key", other),
    })
}

/// The certificate revocation lists in a PEM file (`BEGIN X509 CRL`), at least one.
///
/// # Errors
/// A [`TlsError`] naming the file: unreadable, not PEM, or no list in it.
pub fn load_crls(path: &Path) -> Result<Vec<rustls_pki_types::CertificateRevocationListDer<'static>>, TlsError> {
    let crls = rustls_pki_types::CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| pem_problem(path, "revocation list", e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_problem(path, "revocation list", e))?;
    if crls.is_empty() {
        return Err(file_error(path, "no revocation list found (expected \"BEGIN X509 CRL\")"));
    }
    Ok(crls)
}

/// A certificate chain with its key, checked to belong together.
///
/// # Errors
/// A [`TlsError`] naming the file at fault.
pub fn load_certified_key(files: &CertFiles) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = load_certs(&files.cert)?;
    let key_file = files.key.as_deref().unwrap_or(&files.cert);
    let key = load_key(key_file)?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| file_error(key_file, format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(Arc::new(certified)),
        Err(_) => Err(file_error(
            key_file,
            format!("private key does not match the certificate in {}", files.cert.display()),
        )),
    }
}

/// Reads a CA bundle into a root store.
///
/// # Errors
/// Unreadable, invalid, or no usable certificate.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| file_error(path, format!("unusable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// Picks the certificate by SNI name, falling back to the default.
#[derive(Debug)]
struct SniResolver {
    default: Arc<CertifiedKey>,
    by_name: HashMap<String, Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let found = hello.server_name().and_then(|name| {
            let name = name.to_ascii_lowercase();
            self.by_name.get(&name).or_else(|| {
                name.split_once('.')
                    .and_then(|(_, parent)| self.by_name.get(&format!("*.{parent}")))
            })
        });
        Some(found.unwrap_or(&self.default).clone())
    }
}

/// Builds a rustls server config from settings, reading every file.
///
/// # Errors
/// The first file or setting that cannot be used.
pub fn server_config(s: &TlsSettings) -> Result<rustls::ServerConfig, TlsError> {
    built(s).map(|(config, _)| config)
}

/// The certificates a listener's config serves: each file and its leaf's validity.
type Served = Vec<(PathBuf, Option<Validity>)>;

/// A certificate's validity, Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// notBefore.
    pub not_before: i64,
    /// notAfter.
    pub not_after: i64,
}

impl Validity {
    fn of(key: &CertifiedKey) -> Option<Validity> {
        let (_, cert) = x509_parser::parse_x509_certificate(key.cert.first()?.as_ref()).ok()?;
        Some(Validity {
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

/// [`server_config`], and the certificates it serves.
fn built(s: &TlsSettings) -> Result<(rustls::ServerConfig, Served), TlsError> {
    let default = load_certified_key(&s.default)?;
    let mut served = vec![(s.default.cert.clone(), Validity::of(&default))];
    let mut by_name = HashMap::new();
    for (names, files) in &s.sni {
        let key = load_certified_key(files)?;
        served.push((files.cert.clone(), Validity::of(&key)));
        for n in names {
            by_name.insert(n.to_ascii_lowercase(), key.clone());
        }
    }
    let versions: &[&rustls::SupportedProtocolVersion] = match s.min_version {
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider()).with_protocol_versions(versions)?;
    let builder = match &s.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider());
            // Revocation: each client certificate's issuer must have its list here (a CA of
            // client_ca without one refuses its clients: no list is no proof of good standing);
            // the CAs themselves are the operator's own, so only the client's certificate is
            // looked up. A list past its next update is still used: the file is re-read when it
            // changes (with the certificates).
            let verifier = match &s.client_crl {
                Some(file) => verifier.with_crls(load_crls(file)?).only_check_end_entity_revocation(),
                None => verifier,
            };
            let verifier = match s.client_auth {
                ClientAuth::Required => verifier.build(),
                ClientAuth::Optional => verifier.allow_unauthenticated().build(),
            }
            .map_err(|e| match (e, &s.client_crl) {
                (rustls::server::VerifierBuilderError::InvalidCrl(e), Some(crl)) => {
                    file_error(crl, format!("not a revocation list rustls can use: {e:?}"))
                }
                (e, _) => file_error(ca, format!("cannot verify clients with it: {e}")),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniResolver { default, by_name }));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Resumption by stateless tickets, so that any number of clients resume (a page that
    // reconnects, a fleet of agents after a network blip) at a fraction of a full handshake's
    // cost: rustls' default remembers the last 256 sessions in memory and no more. Keys are random
    // per config and rotated every 6 hours; a reload makes a new config, so a session is never
    // resumed past a change of certificate or client CA. TLS 1.3 resumption keeps forward secrecy
    // (rustls resumes with a fresh key exchange only); a TLS 1.2 ticket holds the session's master
    // secret under the ticket key, for up to its 12 hours' life.
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok((config, served))
}

/// Warns of each certificate put in service that clients will refuse for its dates: expired,
/// or not valid yet (a clock that is wrong, or a certificate issued for later).
fn warn_of_dates(served: &Served) {
    let now = unix_now();
    for (file, validity) in served {
        match validity {
            Some(v) if v.not_after < now => tracing::warn!(
                cert = %file.display(),
                expired_seconds_ago = now - v.not_after,
                "TLS certificate in service has expired: clients will refuse it"
            ),
            Some(v) if v.not_before > now => tracing::warn!(
                cert = %file.display(),
                valid_in_seconds = v.not_before - now,
                "TLS certificate in service is not valid yet: clients will refuse it (is this machine's clock right?)"
            ),
            _ => {}
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A file's identity and version: device, inode, size, modification time.
type FileStamp = (u64, u64, u64, SystemTime);

/// The identity of every file a listener's config was read from, to notice replacements.
fn files_stamp(s: &TlsSettings) -> Vec<Option<FileStamp>> {
    let mut files: Vec<&Path> = vec![&s.default.cert];
    files.extend(s.default.key.as_deref());
    for (_, f) in &s.sni {
        files.push(&f.cert);
        files.extend(f.key.as_deref());
    }
    files.extend(s.client_ca.as_deref());
    files.extend(s.client_crl.as_deref());
    files
        .into_iter()
        .map(|f| {
            // metadata() follows symlinks: a swapped link shows as a different file.
            std::fs::metadata(f).ok().map(|m| {
                let (dev, ino) = crate::platform::file_identity(&m);
                (dev, ino, m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH))
            })
        })
        .collect()
}

/// A listener's TLS in service.
#[derive(Debug)]
pub struct TlsListener {
    /// The settings the files were read with.
    pub settings: TlsSettings,
    current: RwLock<Arc<rustls::ServerConfig>>,
    /// The certificates `current` serves, with their dates.
    served: RwLock<Served>,
    stamp: Mutex<Vec<Option<FileStamp>>>,
}

impl TlsListener {
    /// Reads the files.
    ///
    /// # Errors
    /// A [`TlsError`] naming the file and the problem.
    pub fn load(settings: TlsSettings) -> Result<TlsListener, TlsError> {
        let stamp = files_stamp(&settings);
        let (config, served) = built(&settings)?;
        warn_of_dates(&served);
        Ok(TlsListener {
            settings,
            current: RwLock::new(Arc::new(config)),
            served: RwLock::new(served),
            stamp: Mutex::new(stamp),
        })
    }

    /// Each certificate in service (its file) and the seconds left before its notAfter (less
    /// than 0 once expired): what clients are shown now, whatever the files hold since (a
    /// renewal whose reload failed leaves the old certificate in service).
    pub fn expiry(&self) -> Vec<(PathBuf, i64)> {
        let now = unix_now();
        let served = self.served.read().unwrap_or_else(|p| p.into_inner());
        served
            .iter()
            .filter_map(|(file, v)| v.map(|v| (file.clone(), v.not_after - now)))
            .collect()
    }

    /// Puts a config in service with the certificates it serves.
    fn serve(&self, config: rustls::ServerConfig, served: Served) {
        warn_of_dates(&served);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        *self.served.write().unwrap_or_else(|p| p.into_inner()) = served;
    }

    /// An acceptor with the config in force now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Re-reads the files and swaps the config in. On error the old config stays.
    ///
    /// # Errors
    /// The new files cannot be used.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamp = files_stamp(&self.settings);
        let (config, served) = built(&self.settings)?;
        self.serve(config, served);
        *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) = stamp;
        Ok(())
    }

    /// Reloads when any file changed since the last load; reports a failed reload once per change.
    fn reload_if_changed(&self) {
        let now = files_stamp(&self.settings);
        {
            let mut seen = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == now {
                return;
            }
            // Remember this state even if loading fails, so a broken file is reported once.
            *seen = now;
        }
        match built(&self.settings) {
            Ok((config, served)) => {
                self.serve(config, served);
                crate::metrics::certificate_reloaded(&self.settings.default.cert, self.settings.default.key.as_deref(), true, true);
                tracing::info!(cert = %self.settings.default.cert.display(), "TLS certificate files changed: reloaded");
            }
            Err(e) => {
                crate::metrics::certificate_reloaded(&self.settings.default.cert, self.settings.default.key.as_deref(), false, true);
                tracing::error!(error = %e, "TLS certificate files changed but cannot be used; the previous certificate stays in service")
            }
        }
    }

    /// Checks the files every `settings.watch` until `shutdown`.
    pub fn spawn_watcher(self: &Arc<Self>, shutdown: CancellationToken) {
        let Some(every) = self.settings.watch else { return };
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        let me = me.clone();
                        // File reads and key parsing are blocking work.
                        let _ = tokio::task::spawn_blocking(move || me.reload_if_changed()).await;
                    }
                }
            }
        });
    }
}

/// A failed TLS handshake's error for the log, with what to do where the library's words do not
/// say it: a client certificate in X.509 version 1 (what `openssl x509 -req` makes without an
/// `-extfile`, accepted by websockify's OpenSSL) is refused by rustls's verifier, which reads
/// version 3 only, and said as `UnsupportedCertVersion`.
pub fn handshake_failure(e: &std::io::Error) -> String {
    let text = e.to_string();
    if text.contains("UnsupportedCertVersion") {
        return format!(
            "{text} (the client's certificate is X.509 version 1, which is not accepted: issue it as version 3, e.g. \
             `openssl x509 -req … -extfile <(printf 'basicConstraints=CA:FALSE')`)"
        );
    }
    if text.contains("UnknownIssuer") {
        return format!("{text} (the certificate was not issued by a CA in the listener's client_ca)");
    }
    text
}

/// The subject common name of a DER certificate.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    Some(cn)
}

/// A ready connector for a route's backend TLS.
#[derive(Clone)]
pub struct BackendTls {
    /// The connector.
    pub connector: tokio_rustls::TlsConnector,
    /// The name from the settings, if one was given.
    pub server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl BackendTls {
    /// Builds the client config.
    ///
    /// # Errors
    /// An unreadable CA file, a bad server name, or no system roots.
    pub fn new(s: &BackendTlsSettings) -> Result<BackendTls, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
        let config = if s.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
                .with_no_client_auth()
        } else {
            let (roots, pinned) = match &s.ca {
                // Pinned only when the file is that one certificate: in a bundle of several, any
                // of them would otherwise be taken for any route's backend.
                Some(ca) => (load_roots(ca)?, load_certs(ca).map(|c| if c.len() == 1 { c } else { Vec::new() })?),
                None => {
                    let found = rustls_native_certs::load_native_certs();
                    let mut roots = RootCertStore::empty();
                    roots.add_parsable_certificates(found.certs);
                    if roots.is_empty() {
                        return Err(file_error(
                            Path::new("system certificate store"),
                            "no CA certificates found; give the route a `ca` file",
                        ));
                    }
                    (roots, Vec::new())
                }
            };
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| file_error(s.ca.as_deref().unwrap_or(Path::new("system certificate store")), e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(CaOrPinned { webpki, pinned }))
                .with_no_client_auth()
        };
        let server_name = match &s.server_name {
            Some(n) => {
                Some(ServerName::try_from(n.clone()).map_err(|e| file_error(Path::new("backend_tls.server_name"), format!("{n:?}: {e}")))?)
            }
            None => None,
        };
        Ok(BackendTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }
}

/// The backend's certificate is verified against the CA file (or the system roots) as usual, and,
/// when the CA file holds that one certificate and nothing else, it is accepted as it stands
/// (pinned): a backend's self-signed certificate, given as the CA file, works whatever its
/// extensions say. (In a bundle of several certificates nothing is pinned: each would stand for
/// every route using the bundle, whatever its name.)
/// `openssl req -x509` marks the certificates it makes as CAs, and WebPKI refuses a CA
/// certificate as a server's own (`CaUsedAsEndEntity`), so without this the usual way to make
/// a backend's certificate could not be trusted by naming it. A pinned certificate is still
/// checked for its validity period; its names are not, because the file says exactly which
/// certificate (and so which key) the backend must hold, which is what a name check proves.
#[derive(Debug)]
struct CaOrPinned {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    /// The CA file's certificate when it is its only one, as DER: a backend presenting it is
    /// accepted (empty otherwise).
    pinned: Vec<CertificateDer<'static>>,
}

impl ServerCertVerifier for CaOrPinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let err = match self.webpki.verify_server_cert(end_entity, intermediates, name, ocsp, now) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if !self.pinned.iter().any(|p| p.as_ref() == end_entity.as_ref()) {
            return Err(err);
        }
        let (_, cert) = x509_parser::parse_x509_certificate(end_entity.as_ref())
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
        let at = i64::try_from(now.as_secs())
            .ok()
            .and_then(|s| x509_parser::time::ASN1Time::from_timestamp(s).ok());
        match at {
            Some(at) if cert.validity().is_valid_at(at) => Ok(ServerCertVerified::assertion()),
            _ => Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Expired)),
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Accepts any server certificate (signatures are still checked, so the handshake is sound).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
