//! JWT verification (HS256, RS256, ES256, EdDSA and their siblings), with keys from a PEM file,
//! a JWKS file or a shared-secret file, re-read when the file changes ([`super::reread`]).
//!
//! A token is checked against keys of the family its `alg` names (and the `kid` it names, for a
//! JWKS), never with an algorithm the configuration or the key does not allow (no `none`, no
//! HMAC with a public key). `exp` (unless a route says it may be absent), `nbf`, `iss` and `aud`
//! are checked with a configurable clock skew.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};

use super::auth::{unauthorized, Authenticated};
use super::reread::Reread;
use super::Refusal;

/// Where a verifier's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A PEM public key (RSA, EC P-256/P-384 or Ed25519) or certificate, or a private key, whose
    /// public half is used (as websockify does).
    Pem(PathBuf),
    /// A JSON Web Key Set.
    Jwks(PathBuf),
    /// A shared secret for HS256/384/512: the file's bytes, surrounding white space trimmed; and
    /// when those bytes are base64url (or base64) text, what they decode to as well, which is
    /// the key websockify's JWTTokenApi uses (it reads the file as a JWK `k` value), so that
    /// tokens minted for websockify are accepted.
    Secret(PathBuf),
}

impl KeySource {
    fn path(&self) -> &Path {
        match self {
            KeySource::Pem(p) | KeySource::Jwks(p) | KeySource::Secret(p) => p,
        }
    }
}

/// A route's JWT settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSettings {
    /// The verification keys.
    pub keys: KeySource,
    /// Algorithms accepted; empty: the keys' usual one (HS256, RS256, ES256, EdDSA).
    pub algorithms: Vec<Algorithm>,
    /// Accepted issuers (`iss`); empty: not checked.
    pub issuers: Vec<String>,
    /// Accepted audiences (`aud`); empty: a token naming an audience is refused.
    pub audiences: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Whether a token must have `exp` (websockify's JWTTokenApi tokens may not).
    pub require_exp: bool,
}

/// A JWT verifier in service.
#[derive(Debug)]
pub struct JwtVerifier(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    settings: JwtSettings,
    /// The keys, read again when their file changes; none while it is gone.
    keys: Reread<Keys>,
}

/// Verification keys, each with its `kid` when a JWKS gave one.
type Keys = Vec<(Option<String>, DecodingKey)>;

/// The claims wsbridge reads.
#[derive(Debug, serde::Deserialize)]
struct Claims {
    sub: Option<String>,
    host: Option<String>,
    port: Option<serde_json::Value>,
}

impl JwtVerifier {
    /// Reads the keys.
    ///
    /// # Errors
    /// The key file cannot be read or holds no usable key, or the algorithms do not fit it.
    pub fn new(settings: JwtSettings) -> Result<JwtVerifier, String> {
        let read = {
            let settings = settings.clone();
            move |_: &Path| load(&settings)
        };
        let keys = Reread::load(settings.keys.path(), "JWT key file", read, Vec::new)?;
        Ok(JwtVerifier(Arc::new(Inner { settings, keys })))
    }

    /// For `wsbridge check`.
    pub fn describe(&self) -> String {
        let s = &self.0.settings;
        let algs: Vec<String> = s.algorithms.iter().map(|a| format!("{a:?}")).collect();
        format!(
            "jwt (keys {}, algorithms {}, issuers {:?}, audiences {:?}, leeway {}s{})",
            s.keys.path().display(),
            if algs.is_empty() { "by key".into() } else { algs.join(",") },
            s.issuers,
            s.audiences,
            s.leeway.as_secs(),
            if s.require_exp { "" } else { ", exp optional" }
        )
    }

    /// Checks a token.
    ///
    /// # Errors
    /// 401, with the reason in the detail (never the token).
    pub async fn check(&self, token: Option<&str>) -> Result<Authenticated, Refusal> {
        let this = &self.0;
        let Some(token) = token else {
            return Err(unauthorized("no JWT"));
        };
        let header = jsonwebtoken::decode_header(token).map_err(|e| unauthorized(format!("JWT not valid: {e}")))?;
        let alg = header.alg;
        if !this.allows(alg) {
            return Err(unauthorized(format!("JWT algorithm {alg:?} not allowed")));
        }
        let keys = this.keys.get().await;
        let mut validation = Validation::new(alg);
        validation.leeway = this.settings.leeway.as_secs();
        validation.validate_nbf = true;
        validation.required_spec_claims.clear();
        if this.settings.require_exp {
            validation.required_spec_claims.insert("exp".into());
        }
        if !this.settings.issuers.is_empty() {
            validation.set_issuer(&this.settings.issuers);
            validation.required_spec_claims.insert("iss".into());
        }
        // With no audience configured, `aud` stays checked: a token minted for another service
        // (it names an audience) is refused.
        if !this.settings.audiences.is_empty() {
            validation.set_audience(&this.settings.audiences);
            validation.required_spec_claims.insert("aud".into());
        }
        let mut last = String::from("no key for its algorithm or kid");
        for (kid, key) in keys.iter() {
            if key.family() != alg.family() || (header.kid.is_some() && kid.is_some() && header.kid != *kid) {
                continue;
            }
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => {
                    let c = data.claims;
                    let port = c.port.as_ref().and_then(|p| match p {
                        serde_json::Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                        serde_json::Value::String(s) => s.parse().ok(),
                        _ => None,
                    });
                    return Ok(Authenticated {
                        subject: c.sub,
                        target: c.host.zip(port),
                    });
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(unauthorized(format!("JWT not valid: {last}")))
    }

    /// Brings the keys up to date if they are due ([`Reread::get`]).
    pub async fn refresh(&self) {
        drop(self.0.keys.get().await);
    }

    /// Looks at the key file now and re-reads it if it changed.
    pub fn reload_now(&self) {
        self.0.keys.reread_now();
    }
}

impl Inner {
    fn allows(&self, alg: Algorithm) -> bool {
        if self.settings.algorithms.is_empty() {
            matches!(alg, Algorithm::HS256 | Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA)
        } else {
            self.settings.algorithms.contains(&alg)
        }
    }
}

/// The public key (SPKI, as PEM) of the private key in `pem` (PKCS#8, PKCS#1 RSA or SEC1 EC), if
/// it holds one.
fn public_half(pem: &[u8]) -> Option<String> {
    use base64::Engine as _;
    use rustls_pki_types::pem::PemObject;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(pem).ok()?;
    let signing = crate::tls::provider().key_provider.load_private_key(key).ok()?;
    let spki = signing.public_key()?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(spki.as_ref());
    let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).ok()?);
        out.push('\n');
    }
    out.push_str("-----END PUBLIC KEY-----\n");
    Some(out)
}

/// The HMAC key websockify's JWTTokenApi takes from a secret file's `text` (a JWK `k` value,
/// base64url; base64's `+` and `/`, and padding, accepted as jwcrypto accepts them), when it
/// decodes to at least 32 bytes.
fn websockify_secret(text: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let text: Vec<u8> = text
        .iter()
        .filter(|c| **c != b'=')
        .map(|c| match c {
            b'+' => b'-',
            b'/' => b'_',
            c => *c,
        })
        .collect();
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).ok()?;
    (decoded.len() >= 32).then_some(decoded)
}

/// Reads the keys a source names and checks the algorithms fit them.
fn load(settings: &JwtSettings) -> Result<Keys, String> {
    let path = settings.keys.path();
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let keys = match &settings.keys {
        KeySource::Secret(_) => {
            let secret = bytes.trim_ascii();
            if secret.len() < 32 {
                return Err(format!("{}: an HMAC secret needs at least 32 bytes", path.display()));
            }
            let mut keys = vec![(
                None,
                DecodingKey::from_secret(secret).map_err(|e| format!("{}: {e}", path.display()))?,
            )];
            // websockify's key: the text as a JWK `k`, base64url. Only a strict decoding of at
            // least 32 bytes, so this key is as hard to guess as the text it comes from.
            if let Some(decoded) = websockify_secret(secret) {
                keys.push((
                    None,
                    DecodingKey::from_secret(&decoded).map_err(|e| format!("{}: {e}", path.display()))?,
                ));
            }
            keys
        }
        KeySource::Pem(_) => {
            // A private key verifies with its public half, as in websockify (jwcrypto), whose
            // users often give the file the tokens are signed with; read as it stands, a
            // private key would be taken for a public one and refuse every token.
            let public = public_half(&bytes);
            let pem = public.as_deref().map_or(&bytes[..], str::as_bytes);
            let key = DecodingKey::from_rsa_pem(pem)
                .or_else(|_| DecodingKey::from_ec_pem(pem))
                .or_else(|_| DecodingKey::from_ed_pem(pem))
                .map_err(|_| format!("{}: not a PEM RSA, EC or Ed25519 key", path.display()))?;
            vec![(None, key)]
        }
        KeySource::Jwks(_) => {
            let set: jsonwebtoken::jwk::JwkSet =
                serde_json::from_slice(&bytes).map_err(|e| format!("{}: not a JWK set: {e}", path.display()))?;
            let mut keys = Vec::new();
            for jwk in &set.keys {
                match DecodingKey::from_jwk(jwk) {
                    Ok(k) => keys.push((jwk.common.key_id.clone(), k)),
                    Err(e) => {
                        tracing::warn!(file = %path.display(), kid = jwk.common.key_id.as_deref().unwrap_or("(none)"), error = %e, "JWK skipped")
                    }
                }
            }
            if keys.is_empty() {
                return Err(format!("{}: no usable key in the set", path.display()));
            }
            keys
        }
    };
    for alg in &settings.algorithms {
        if !keys.iter().any(|(_, k)| k.family() == alg.family()) {
            return Err(format!("{}: no key for algorithm {alg:?}", path.display()));
        }
    }
    if matches!(settings.keys, KeySource::Secret(_)) && settings.algorithms.iter().any(|a| a.family() != AlgorithmFamily::Hmac) {
        return Err("a shared secret verifies only HS256/HS384/HS512".into());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn settings(keys: KeySource) -> JwtSettings {
        JwtSettings {
            keys,
            algorithms: Vec::new(),
            issuers: vec!["https://issuer.example".into()],
            audiences: vec!["wsbridge".into()],
            leeway: Duration::from_secs(5),
            require_exp: true,
        }
    }

    fn claims(extra: serde_json::Value) -> serde_json::Value {
        let mut c = serde_json::json!({
            "sub": "alice", "iss": "https://issuer.example", "aud": "wsbridge", "exp": now() + 60,
        });
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        c
    }

    #[tokio::test]
    async fn hs256_with_the_claims_checked() {
        let dir = tempfile::tempdir().unwrap();
        let secret = "0123456789abcdef0123456789abcdef";
        std::fs::write(dir.path().join("s"), format!("{secret}\n")).unwrap();
        let v = JwtVerifier::new(settings(KeySource::Secret(dir.path().join("s")))).unwrap();
        let key = EncodingKey::from_secret(secret.as_bytes()).unwrap();
        let sign = |c: serde_json::Value| encode(&Header::default(), &c, &key).unwrap();
        let ok = v
            .check(Some(&sign(claims(serde_json::json!({"host": "10.0.0.5", "port": "5901"})))))
            .await
            .unwrap();
        assert_eq!(ok.subject.as_deref(), Some("alice"));
        assert_eq!(ok.target, Some(("10.0.0.5".into(), 5901)));
        for (bad, why) in [
            (claims(serde_json::json!({"exp": now() - 60})), "expired"),
            (claims(serde_json::json!({"nbf": now() + 60})), "not yet valid"),
            (claims(serde_json::json!({"iss": "https://evil.example"})), "issuer"),
            (claims(serde_json::json!({"aud": "other"})), "audience"),
        ] {
            let r = v.check(Some(&sign(bad))).await.unwrap_err();
            assert_eq!(r.status, http::StatusCode::UNAUTHORIZED, "{why}");
        }
        let mut no_exp = claims(serde_json::json!({}));
        no_exp.as_object_mut().unwrap().remove("exp");
        assert!(v.check(Some(&sign(no_exp))).await.is_err(), "exp is required by default");
        let wrong_key = encode(
            &Header::default(),
            &claims(serde_json::json!({})),
            &EncodingKey::from_secret(b"another secret of 32 bytes......").unwrap(),
        )
        .unwrap();
        assert!(v.check(Some(&wrong_key)).await.is_err());
        assert!(v.check(Some("not.a.jwt")).await.is_err());
        assert!(v.check(None).await.is_err());
        // alg=none is never accepted.
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(&claims(serde_json::json!({})).to_string())
        );
        assert!(v.check(Some(&none)).await.is_err());
    }

    fn b64(s: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    #[tokio::test]
    async fn es256_from_pem_and_a_jwks_with_kids() {
        let dir = tempfile::tempdir().unwrap();
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::write(dir.path().join("pub.pem"), kp.public_key_pem()).unwrap();
        let v = JwtVerifier::new(settings(KeySource::Pem(dir.path().join("pub.pem")))).unwrap();
        let key = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
        let token = encode(&Header::new(Algorithm::ES256), &claims(serde_json::json!({})), &key).unwrap();
        assert!(v.check(Some(&token)).await.is_ok());
        // An HS256 token "signed" with the public key's bytes: the classic confusion, refused.
        let confused = encode(
            &Header::default(),
            &claims(serde_json::json!({})),
            &EncodingKey::from_secret(kp.public_key_pem().as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(v.check(Some(&confused)).await.is_err());
        let pem = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
        let mut jwk = serde_json::to_value(&pem).unwrap();
        jwk["kid"] = "k1".into();
        std::fs::write(dir.path().join("jwks.json"), serde_json::json!({ "keys": [jwk] }).to_string()).unwrap();
        let v = JwtVerifier::new(settings(KeySource::Jwks(dir.path().join("jwks.json")))).unwrap();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("k1".into());
        assert!(v
            .check(Some(&encode(&header, &claims(serde_json::json!({})), &key).unwrap()))
            .await
            .is_ok());
        header.kid = Some("k2".into());
        assert!(v
            .check(Some(&encode(&header, &claims(serde_json::json!({})), &key).unwrap()))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn with_no_audience_configured_a_token_for_another_audience_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let secret = "0123456789abcdef0123456789abcdef";
        std::fs::write(dir.path().join("s"), secret).unwrap();
        let v = JwtVerifier::new(JwtSettings {
            audiences: Vec::new(),
            ..settings(KeySource::Secret(dir.path().join("s")))
        })
        .unwrap();
        let key = EncodingKey::from_secret(secret.as_bytes()).unwrap();
        let sign = |c: serde_json::Value| encode(&Header::default(), &c, &key).unwrap();
        let mut no_aud = claims(serde_json::json!({}));
        no_aud.as_object_mut().unwrap().remove("aud");
        assert!(v.check(Some(&sign(no_aud))).await.is_ok());
        assert!(v.check(Some(&sign(claims(serde_json::json!({"aud": "billing"}))))).await.is_err());
    }

    #[tokio::test]
    async fn eddsa_and_rs256_from_pem() {
        let dir = tempfile::tempdir().unwrap();
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        std::fs::write(dir.path().join("ed.pem"), kp.public_key_pem()).unwrap();
        let v = JwtVerifier::new(settings(KeySource::Pem(dir.path().join("ed.pem")))).unwrap();
        let key = EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes()).unwrap();
        let token = encode(&Header::new(Algorithm::EdDSA), &claims(serde_json::json!({})), &key).unwrap();
        assert!(v.check(Some(&token)).await.is_ok());
        // RSA keys come from the openssl command (rcgen makes no RSA keys with ring).
        let rsa = dir.path().join("rsa.pem");
        let made = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
            .arg(&rsa)
            .stderr(std::process::Stdio::null())
            .status();
        if !made.is_ok_and(|s| s.success()) {
            // Counted as skipped by scripts/test.sh, like the integration tests' skips.
            return eprintln!("policy::jwt::tests::eddsa_and_rs256_from_pem skipped: no openssl to make an RSA key");
        }
        let public = dir.path().join("rsa.pub.pem");
        let extracted = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&rsa)
            .arg("-out")
            .arg(&public)
            .status()
            .unwrap();
        assert!(extracted.success());
        let v = JwtVerifier::new(settings(KeySource::Pem(public))).unwrap();
        let key = EncodingKey::from_rsa_pem(&std::fs::read(&rsa).unwrap()).unwrap();
        let token = encode(&Header::new(Algorithm::RS256), &claims(serde_json::json!({})), &key).unwrap();
        assert!(v.check(Some(&token)).await.is_ok());
        // RS256 only by default for an RSA key: PS256 (not listed) is refused.
        let ps = encode(&Header::new(Algorithm::PS256), &claims(serde_json::json!({})), &key).unwrap();
        assert!(v.check(Some(&ps)).await.is_err());
    }

    #[tokio::test]
    async fn a_changed_key_file_is_read_again_and_a_broken_one_keeps_the_old_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s");
        let (a, b) = ("a".repeat(32), "b".repeat(40));
        std::fs::write(&file, &a).unwrap();
        let v = JwtVerifier::new(settings(KeySource::Secret(file.clone()))).unwrap();
        let sign = |s: &str| {
            encode(
                &Header::default(),
                &claims(serde_json::json!({})),
                &EncodingKey::from_secret(s.as_bytes()).unwrap(),
            )
            .unwrap()
        };
        assert!(v.check(Some(&sign(&a))).await.is_ok());
        std::fs::write(&file, &b).unwrap();
        v.reload_now();
        assert!(v.check(Some(&sign(&b))).await.is_ok());
        assert!(v.check(Some(&sign(&a))).await.is_err());
        std::fs::write(&file, "short").unwrap();
        v.reload_now();
        assert!(v.check(Some(&sign(&b))).await.is_ok(), "a broken file keeps the keys in force");
        // A file removed (a leaked key revoked so) leaves no key in force, until one is back
        // (an auth review: its tokens were still accepted).
        std::fs::remove_file(&file).unwrap();
        v.reload_now();
        assert!(v.check(Some(&sign(&b))).await.is_err(), "no key once the file is gone");
        std::fs::write(&file, &a).unwrap();
        v.reload_now();
        assert!(v.check(Some(&sign(&a))).await.is_ok());
    }
}
