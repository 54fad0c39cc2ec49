//! Certificates made at test time (rcgen): a CA, server and client certificates, written to a
//! temporary directory as PEM files, and TLS clients that trust them.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SignatureAlgorithm};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::WebSocketStream;

/// A certificate authority and the directory its files go to.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    serial: std::sync::atomic::AtomicU64,
}

/// A certificate and its key, as PEM text and as files.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Issued {
    /// A TLS acceptor serving this certificate (a test's own TLS server).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::pem::PemObject;
        let chain = rustls::pki_types::CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .map(Result::unwrap)
            .collect();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    /// Writes `cert` and `key` as `dir/file.crt` and `dir/file.key`.
    pub fn write(dir: &std::path::Path, file: &str, cert: &rcgen::Certificate, key: &KeyPair) -> Issued {
        let (cert_path, key_path) = (dir.join(format!("{file}.crt")), dir.join(format!("{file}.key")));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert: cert_path,
            key: key_path,
        }
    }
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Pki {
            dir,
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            serial: 1.into(),
        }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A server certificate for `names` (CN = first name), with a key of `alg`.
    pub fn server(&self, file: &str, names: &[&str], alg: &'static SignatureAlgorithm) -> Issued {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(file, params, alg)
    }

    /// [`Pki::server`] valid only between two dates (year, month, day): an expired one, or one
    /// not valid yet.
    pub fn server_dated(&self, file: &str, names: &[&str], not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> Issued {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        self.issue(file, params, &rcgen::PKCS_ECDSA_P256_SHA256)
    }

    /// A revocation list of this CA that lists `revoked`, written as `dir/file` (valid from 2020
    /// to 2090).
    pub fn crl(&self, file: &str, revoked: &[&Issued]) -> PathBuf {
        let revoked_certs = revoked
            .iter()
            .map(|c| {
                let der = CertificateDer::from_pem_slice(c.cert_pem.as_bytes()).unwrap();
                let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
                rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(parsed.tbs_certificate.raw_serial()),
                    revocation_time: rcgen::date_time_ymd(2020, 1, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                }
            })
            .collect();
        let params = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2020, 1, 1),
            next_update: rcgen::date_time_ymd(2090, 1, 1),
            crl_number: self.serial.fetch_add(1, std::sync::atomic::Ordering::SeqCst).into(),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let path = self.dir.path().join(file);
        std::fs::write(&path, params.signed_by(&self.issuer).unwrap().pem().unwrap()).unwrap();
        path
    }

    /// A client certificate with this common name.
    pub fn client(&self, file: &str, cn: &str) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(file, params, &rcgen::PKCS_ECDSA_P256_SHA256)
    }

    fn issue(&self, file: &str, mut params: CertificateParams, alg: &'static SignatureAlgorithm) -> Issued {
        let serial = self.serial.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        params.serial_number = Some(serial.into());
        let key = KeyPair::generate_for(alg).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued::write(self.dir.path(), file, &cert, &key)
    }
}

/// A TLS client config trusting `ca_pem`, optionally presenting a client certificate.
pub fn client_config(ca_pem: &str, client: Option<&Issued>, versions: &[&'static rustls::SupportedProtocolVersion]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some(c) => {
            let chain = CertificateDer::pem_slice_iter(c.cert_pem.as_bytes()).map(Result::unwrap).collect();
            let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    Arc::new(config)
}

/// A TLS connection to `addr` verifying `name`.
pub async fn tls_connect(addr: std::net::SocketAddr, name: &str, config: Arc<ClientConfig>) -> std::io::Result<TlsStream<TcpStream>> {
    super::within("TLS handshake", async {
        let tcp = TcpStream::connect(addr).await?;
        let connector = tokio_rustls::TlsConnector::from(config);
        connector.connect(ServerName::try_from(name.to_owned()).unwrap(), tcp).await
    })
    .await
}

/// The common name of the certificate the server presented.
pub fn server_cn(stream: &TlsStream<TcpStream>) -> String {
    let der = &stream.get_ref().1.peer_certificates().unwrap()[0];
    wsbridge::tls::common_name(der).unwrap()
}

/// A WebSocket over an established TLS stream.
pub async fn wss_over(stream: TlsStream<TcpStream>, url: &str) -> WebSocketStream<TlsStream<TcpStream>> {
    let req = url.into_client_request().unwrap();
    let (ws, _) = super::within("wss upgrade", tokio_tungstenite::client_async(req, stream))
        .await
        .expect("upgrade");
    ws
}
