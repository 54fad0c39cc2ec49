//! The `[admin]` table (and `--admin ADDR`): where the admin listener binds, the bearer token
//! it asks for, and its TLS. Loopback unless the operator says otherwise, and never off loopback
//! without a token or required client certificates: `/sessions` shows who is connected where and
//! can end sessions.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::tls::TlsSettings;
use super::{ConfigError, Ctx, RawTls};

/// The admin listener's settings.
#[derive(Clone)]
pub struct AdminConfig {
    /// Address to bind (a bare port means 127.0.0.1).
    pub addr: SocketAddr,
    /// Bearer token `/metrics` and `/sessions` require (`/healthz` and `/readyz` never do:
    /// balancers probe them, and they tell nothing).
    pub token: Option<String>,
    /// TLS on the admin listener (always TLS only: plain requests are not answered); its
    /// certificate files reload as a listener's do.
    pub tls: Option<TlsSettings>,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a credential: say only whether there is one.
        f.debug_struct("AdminConfig")
            .field("addr", &self.addr)
            .field("token", &self.token.is_some())
            .field("tls", &self.tls)
            .finish()
    }
}

impl AdminConfig {
    /// Checks the address against the credentials: off loopback, a token or required client
    /// certificates.
    ///
    /// # Errors
    /// The message for the `addr` field.
    pub fn check(&self) -> Result<(), String> {
        if !self.addr.ip().is_loopback() && self.token.is_none() && !self.requires_client_certificates() {
            return Err(format!(
                "{} is not a loopback address: the admin listener lists sessions and can end them, so off loopback it \
                 needs a `token` (or `token_file`), or `tls` with `client_ca` (client certificates required); or bind \
                 127.0.0.1",
                self.addr
            ));
        }
        Ok(())
    }

    /// Whether only clients with a certificate from `tls.client_ca` get an answer.
    pub fn requires_client_certificates(&self) -> bool {
        self.tls.as_ref().is_some_and(TlsSettings::requires_client_certificates)
    }
}

/// Parses an admin address: `PORT` (on 127.0.0.1), `IP:PORT` or `[IPv6]:PORT`.
///
/// # Errors
/// A message naming the expected forms.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse()
        .map_err(|_| format!("invalid admin address {s:?}: expected PORT, IP:PORT or [IPv6]:PORT"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    addr: Spanned<String>,
    token: Option<Spanned<String>>,
    token_file: Option<Spanned<PathBuf>>,
    tls: Option<Spanned<RawTls>>,
}

impl RawAdmin {
    pub(super) fn resolve(self, ctx: &Ctx<'_>) -> Result<AdminConfig, ConfigError> {
        let addr_span = self.addr.span();
        let addr = parse_addr(self.addr.get_ref()).or_else(|m| ctx.invalid(addr_span.clone(), "admin.addr".into(), m))?;
        let token = match (self.token, self.token_file) {
            (Some(_), Some(f)) => return ctx.invalid(f.span(), "admin.token_file".into(), "give `token` or `token_file`, not both"),
            (Some(t), None) => {
                let span = t.span();
                let t = t.into_inner();
                if t.trim().is_empty() {
                    return ctx.invalid(span, "admin.token".into(), "empty token");
                }
                if let Err(m) = sendable(&t) {
                    return ctx.invalid(span, "admin.token".into(), m);
                }
                Some(t)
            }
            (None, Some(f)) => {
                let span = f.span();
                let path = ctx.resolve(f.get_ref());
                let t = match crate::platform::read_text(&path) {
                    Ok(t) => t.trim().to_owned(),
                    Err(e) => return ctx.invalid(span, "admin.token_file".into(), format!("{}: {e}", path.display())),
                };
                if t.is_empty() {
                    return ctx.invalid(span, "admin.token_file".into(), format!("{} is empty", path.display()));
                }
                if let Err(m) = sendable(&t) {
                    return ctx.invalid(span, "admin.token_file".into(), format!("{}: {m}", path.display()));
                }
                Some(t)
            }
            (None, None) => None,
        };
        let tls = match self.tls {
            Some(t) => {
                let span = t.span();
                let t = t.into_inner();
                if t.only == Some(false) {
                    return ctx.invalid(
                        span,
                        "admin.tls.only".into(),
                        "the admin listener with `tls` is TLS only: leave `only` out",
                    );
                }
                if !t.sni.is_empty() {
                    return ctx.invalid(
                        span,
                        "admin.tls.sni".into(),
                        "the admin listener has one certificate: leave `sni` out",
                    );
                }
                let tls = TlsSettings {
                    only: true,
                    ..t.resolve(ctx)
                };
                if let Err((field, message)) = tls.check_files() {
                    return ctx.invalid(span, format!("admin.tls.{field}"), message);
                }
                Some(tls)
            }
            None => None,
        };
        let admin = AdminConfig { addr, token, tls };
        admin.check().or_else(|m| ctx.invalid(addr_span, "admin.addr".into(), m))?;
        Ok(admin)
    }
}

/// Whether a token can be matched as sent in `Authorization: Bearer …`: ASCII without control
/// characters (spaces and tabs inside are kept), nothing to trim at either end (an admin review:
/// a token with a leading space or a non-ASCII letter never matched, so the operator was locked
/// out while `wsbridge check` passed the file).
fn sendable(token: &str) -> Result<(), &'static str> {
    let fits = token.bytes().all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic());
    match fits && token.trim() == token {
        true => Ok(()),
        false => Err("a token must be ASCII without control characters, nor spaces at either end (it is sent in an Authorization header)"),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, ConfigError};

    fn parse(admin: &str) -> Result<Config, ConfigError> {
        let text = format!("[[listen]]\naddr = \"127.0.0.1:1\"\n\n[[route]]\npath = \"/a\"\ntarget = \"h:1\"\n\n[admin]\n{admin}");
        Config::from_toml(&text, Path::new("test.toml"))
    }

    #[test]
    fn off_by_default_and_loopback_for_a_bare_port() {
        let none = Config::from_toml(
            "[[listen]]\naddr = \"127.0.0.1:1\"\n[[route]]\npath = \"/a\"\ntarget = \"h:1\"\n",
            Path::new("t.toml"),
        );
        assert!(none.unwrap().admin.is_none());
        let admin = parse("addr = \"9100\"\n").unwrap().admin.unwrap();
        assert_eq!(admin.addr, "127.0.0.1:9100".parse().unwrap());
        assert!(admin.token.is_none());
    }

    #[test]
    fn off_loopback_needs_a_token_and_the_error_names_file_line_and_field() {
        let e = parse("addr = \"0.0.0.0:9100\"\n").unwrap_err().to_string();
        assert!(
            e.starts_with("test.toml:9: admin.addr: 0.0.0.0:9100 is not a loopback address"),
            "{e}"
        );
        assert!(e.contains("token"), "{e}");
        let admin = parse("addr = \"0.0.0.0:9100\"\ntoken = \"s3cret\"\n").unwrap().admin.unwrap();
        assert_eq!(admin.token.as_deref(), Some("s3cret"));
        assert!(!format!("{admin:?}").contains("s3cret"), "the token stays out of Debug");
    }

    #[test]
    fn tls_is_https_only_and_client_certificates_stand_in_for_a_token_off_loopback() {
        let dir = crate::config::tests::pem_files(&["a.crt", "ca.pem"], &["a.key", "a.crt"]);
        let at = |name: &str| format!("{:?}", dir.path().join(name).display().to_string());
        let parse = |admin: &str| {
            parse(
                &admin
                    .replace("\"a.crt\"", &at("a.crt"))
                    .replace("\"a.key\"", &at("a.key"))
                    .replace("\"ca.pem\"", &at("ca.pem")),
            )
        };
        let admin = parse("addr = \"9100\"\ntls = { cert = \"a.crt\", key = \"a.key\" }\n")
            .unwrap()
            .admin
            .unwrap();
        let tls = admin.tls.as_ref().unwrap();
        assert!(tls.only, "HTTPS only");
        assert_eq!(tls.default.cert, dir.path().join("a.crt"));
        assert!(!admin.requires_client_certificates());
        // Off loopback: required client certificates are enough; optional ones are not.
        let certs = "addr = \"0.0.0.0:9100\"\ntls = { cert = \"a.crt\", client_ca = \"ca.pem\" }\n";
        assert!(parse(certs).unwrap().admin.unwrap().requires_client_certificates());
        let optional = "addr = \"0.0.0.0:9100\"\ntls = { cert = \"a.crt\", client_ca = \"ca.pem\", client_auth = \"optional\" }\n";
        let e = parse(optional).unwrap_err().to_string();
        assert!(
            e.contains("admin.addr: 0.0.0.0:9100 is not a loopback address") && e.contains("client_ca"),
            "{e}"
        );
        let e = parse("addr = \"9100\"\ntls = { cert = \"a.crt\", only = false }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("test.toml:10: admin.tls.only: the admin listener with `tls` is TLS only"),
            "{e}"
        );
        let e = parse("addr = \"9100\"\n[admin.tls]\ncert = \"a.crt\"\n[[admin.tls.sni]]\nnames = [\"x\"]\ncert = \"x.crt\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("admin.tls.sni: the admin listener has one certificate"), "{e}");
        let e = parse("addr = \"9100\"\ntls = { cert = \"a.crt\", kee = \"a.key\" }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `kee`"), "{e}");
        // A file that is not there, or holds no key, is named at its line (the key's own
        // checks are the TLS loader's).
        let e = parse("addr = \"9100\"\n[admin.tls]\ncert = \"a.crt\"\nkey = \"nope.key\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("test.toml:12: admin.tls.key: nope.key: "), "{e}");
        let e = parse("addr = \"9100\"\n[admin.tls]\ncert = \"ca.pem\"\n").unwrap_err().to_string();
        assert!(
            e.starts_with("test.toml:11: admin.tls.cert: ") && e.contains("no private key in it"),
            "{e}"
        );
    }

    /// A token that could never match what a client sends is refused at load, naming the field.
    #[test]
    fn a_token_must_be_sendable_in_a_header() {
        // As TOML writes them.
        for token in [
            r#"" leading-space-token""#,
            r#""trailing-tab\t""#,
            r#""t\u00f6k\u00e9n-0123""#,
            r#""bell\u0007""#,
        ] {
            let e = parse(&format!("addr = \"9100\"\ntoken = {token}\n")).unwrap_err().to_string();
            assert!(e.contains("admin.token: a token must be ASCII"), "{token:?}: {e}");
        }
        // Spaces inside match as sent (they worked before the check came): kept.
        let admin = parse("addr = \"9100\"\ntoken = \"two words\"\n").unwrap().admin.unwrap();
        assert_eq!(admin.token.as_deref(), Some("two words"));
    }

    #[test]
    fn token_file_is_read_trimmed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin-token");
        std::fs::write(&file, "from-a-file\n").unwrap();
        let admin = parse(&format!("addr = \"[::]:9100\"\ntoken_file = {:?}\n", file.display().to_string()))
            .unwrap()
            .admin
            .unwrap();
        assert_eq!(admin.token.as_deref(), Some("from-a-file"));
        let e = parse("addr = \"9100\"\ntoken_file = \"/nonexistent/admin-token\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("test.toml:10: admin.token_file: /nonexistent/admin-token"), "{e}");
        let e = parse("addr = \"9100\"\ntoken = \"a\"\ntoken_file = \"b\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("admin.token_file: give `token` or `token_file`, not both"), "{e}");
        let e = parse("addr = \"9100\"\nsecret = \"a\"\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `secret`"), "{e}");
        let e = parse("addr = \"somewhere\"\n").unwrap_err().to_string();
        assert!(e.starts_with("test.toml:9: admin.addr: invalid admin address"), "{e}");
    }
}
