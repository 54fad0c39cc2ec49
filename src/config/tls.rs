//! A listener's and a backend connection's TLS settings, as the configuration states them:
//! plain values (paths, versions, policy), with no rustls in them. [`crate::tls`] turns them into
//! rustls configs; keeping them here lets the configuration be read without the TLS machinery
//! and keeps the imports pointing one way (`tls` → `config`).

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Lowest TLS version accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
pub enum MinVersion {
    /// TLS 1.2 and 1.3 (the default).
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// Whether clients must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A client without a valid certificate is refused during the TLS handshake.
    #[default]
    Required,
    /// A certificate is checked if presented; routes may still require one.
    Optional,
}

/// One certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key; `None`: the key is in the certificate file.
    pub key: Option<PathBuf>,
}

/// A listener's TLS settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The default certificate.
    pub default: CertFiles,
    /// Certificates chosen by SNI name (exact, or `*.example.com`).
    pub sni: Vec<(Vec<String>, CertFiles)>,
    /// Refuse plain connections on this port.
    pub only: bool,
    /// Lowest version.
    pub min_version: MinVersion,
    /// CA bundle for client certificates (mTLS); `None`: no client certificates asked for.
    pub client_ca: Option<PathBuf>,
    /// Required or optional client certificates, with `client_ca`.
    pub client_auth: ClientAuth,
    /// Certificate revocation lists (PEM `X509 CRL`) of the CAs in `client_ca`: a client
    /// certificate they list is refused in the handshake. `None`: no revocation check.
    pub client_crl: Option<PathBuf>,
    /// How often the files are checked for changes; `None`: only on SIGHUP.
    pub watch: Option<Duration>,
}

impl TlsSettings {
    /// Whether only clients with a certificate from `client_ca` get past the handshake.
    pub fn requires_client_certificates(&self) -> bool {
        self.client_ca.is_some() && self.client_auth == ClientAuth::Required
    }

    /// One certificate, the defaults for the rest: plain and TLS both accepted, TLS 1.2 and up,
    /// no client certificates, files checked for changes every
    /// [`DEFAULT_TLS_WATCH`](super::DEFAULT_TLS_WATCH).
    pub fn new(default: CertFiles) -> TlsSettings {
        TlsSettings {
            default,
            sni: Vec::new(),
            only: false,
            min_version: MinVersion::Tls12,
            client_ca: None,
            client_auth: ClientAuth::Required,
            client_crl: None,
            watch: Some(super::DEFAULT_TLS_WATCH),
        }
    }
}

/// TLS towards a backend, as a route asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BackendTlsSettings {
    /// The name to verify (and send as SNI); default: the target's host.
    pub server_name: Option<String>,
    /// CA bundle to verify against; default: the system's roots. A file of one certificate is
    /// also accepted as the backend's own (pinned: a self-signed backend certificate).
    pub ca: Option<PathBuf>,
    /// Accept any certificate. Only when a route says so in so many words.
    pub insecure_skip_verify: bool,
}

/// The PEM labels a private key is read under (PKCS#8, PKCS#1 RSA, SEC1 EC), as
/// [`crate::tls::load_key`] reads them.
const KEY_LABELS: [&str; 3] = [
    "-----BEGIN PRIVATE KEY-----",
    "-----BEGIN RSA PRIVATE KEY-----",
    "-----BEGIN EC PRIVATE KEY-----",
];

/// A file's text, for a look at its PEM labels (not UTF-8: no label will be found).
fn read(path: &Path) -> Result<String, String> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// A certificate file that could not be read or has no certificate in it.
///
/// # Errors
/// Either, with the file's name.
pub(crate) fn check_certs(path: &Path) -> Result<String, String> {
    let text = read(path)?;
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("{}: no certificate in it (expected \"BEGIN CERTIFICATE\")", path.display()));
    }
    Ok(text)
}

impl CertFiles {
    /// Whether the files can be read and hold a certificate and a private key, so that a
    /// mistake is reported at the line that names the file. Whether the key belongs to the
    /// certificate (and what else is in the blocks) is [`crate::tls`]'s to find as it loads
    /// them: PEM parsing lives there, and imports point from `tls` to `config`.
    ///
    /// # Errors
    /// The field under the table (`cert`, `key`) and what is wrong.
    pub(super) fn check(&self) -> Result<(), (&'static str, String)> {
        let cert = check_certs(&self.cert).map_err(|m| ("cert", m))?;
        let Some(key_file) = &self.key else {
            if !KEY_LABELS.iter().any(|l| cert.contains(l)) {
                return Err((
                    "cert",
                    format!(
                        "{}: no private key in it: name the key's file with `key = \"…\"`, or append the key to this file",
                        self.cert.display()
                    ),
                ));
            }
            return Ok(());
        };
        let key = read(key_file).map_err(|m| ("key", m))?;
        if key.contains("ENCRYPTED PRIVATE KEY") {
            return Err((
                "key",
                format!(
                    "{}: the private key is encrypted (with a passphrase), which wsbridge cannot use: decrypt it to a \
                     file only wsbridge's user can read (openssl pkey -in enc.pem -out key.pem)",
                    key_file.display()
                ),
            ));
        }
        if !KEY_LABELS.iter().any(|l| key.contains(l)) {
            return Err((
                "key",
                format!(
                    "{}: no private key in it (expected \"BEGIN PRIVATE KEY\", \"BEGIN RSA PRIVATE KEY\" or \"BEGIN EC PRIVATE KEY\")",
                    key_file.display()
                ),
            ));
        }
        Ok(())
    }
}

impl TlsSettings {
    /// [`CertFiles::check`] for the default certificate and every SNI one, and the client CA
    /// file readable with a certificate in it.
    ///
    /// # Errors
    /// The field under `tls` (`cert`, `sni[1].key`, `client_ca`) and what is wrong.
    pub(super) fn check_files(&self) -> Result<(), (String, String)> {
        self.default.check().map_err(|(f, m)| (f.to_owned(), m))?;
        for (j, (_, files)) in self.sni.iter().enumerate() {
            files.check().map_err(|(f, m)| (format!("sni[{j}].{f}"), m))?;
        }
        if let Some(ca) = &self.client_ca {
            check_certs(ca).map_err(|m| ("client_ca".to_owned(), m))?;
        }
        if let Some(crl) = &self.client_crl {
            let text = read(crl).map_err(|m| ("client_crl".to_owned(), m))?;
            if self.client_ca.is_none() {
                return Err((
                    "client_crl".to_owned(),
                    "revocation lists are for client certificates: add client_ca".to_owned(),
                ));
            }
            if !text.contains("-----BEGIN X509 CRL-----") {
                return Err((
                    "client_crl".to_owned(),
                    format!("{}: no revocation list in it (expected \"BEGIN X509 CRL\")", crl.display()),
                ));
            }
        }
        Ok(())
    }
}

impl BackendTlsSettings {
    /// The table as the file writes it, for `wsbridge check`: `{ server_name = "…", ca = "…" }`
    /// with what is set, and `insecure_skip_verify = true` in plain sight where it is.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(name) = &self.server_name {
            parts.push(format!("server_name = {}", super::toml_str(name)));
        }
        if let Some(ca) = &self.ca {
            parts.push(format!("ca = {}", super::toml_str(&ca.display().to_string())));
        }
        if self.insecure_skip_verify {
            parts.push("insecure_skip_verify = true".to_owned());
        }
        match parts.is_empty() {
            true => "{}".to_owned(),
            false => format!("{{ {} }}", parts.join(", ")),
        }
    }

    /// The CA file readable with a certificate in it.
    ///
    /// # Errors
    /// The field under `backend_tls` (`ca`) and what is wrong.
    pub(super) fn check_files(&self) -> Result<(), (&'static str, String)> {
        match &self.ca {
            Some(ca) => check_certs(ca).map(drop).map_err(|m| ("ca", m)),
            None => Ok(()),
        }
    }
}
