//! A listener's and a backend connection's TLS settings, as the configuration states them:
//! plain values (paths, versions, policy), with no rustls in them. [`crate::tls`] turns them into
//! rustls configs; keeping them here lets the configuration be read without the TLS machinery
//! and keeps the imports pointing one way (`tls` → `config`).

use std::path::PathBuf;
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
