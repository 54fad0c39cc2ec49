//! The `[admin]` table (and `--admin ADDR`): where the admin listener binds and the bearer token
//! it asks for. Loopback unless the operator says otherwise, and never off loopback without a
//! token: `/sessions` shows who is connected where and can end sessions.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Ctx};

/// The admin listener's settings.
#[derive(Clone)]
pub struct AdminConfig {
    /// Address to bind (a bare port means 127.0.0.1).
    pub addr: SocketAddr,
    /// Bearer token `/metrics` and `/sessions` require (`/healthz` and `/readyz` never do:
    /// balancers probe them, and they tell nothing).
    pub token: Option<String>,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a credential: say only whether there is one.
        f.debug_struct("AdminConfig")
            .field("addr", &self.addr)
            .field("token", &self.token.is_some())
            .finish()
    }
}

impl AdminConfig {
    /// Checks the address against the token: off loopback, a token is required.
    ///
    /// # Errors
    /// The message for the `addr` field.
    pub fn check(&self) -> Result<(), String> {
        if !self.addr.ip().is_loopback() && self.token.is_none() {
            return Err(format!(
                "{} is not a loopback address: the admin listener lists sessions and can end them, so off loopback it \
                 needs a `token` (or `token_file`); or bind 127.0.0.1",
                self.addr
            ));
        }
        Ok(())
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
                Some(t)
            }
            (None, Some(f)) => {
                let span = f.span();
                let path = ctx.resolve(f.get_ref());
                let t = match std::fs::read_to_string(&path) {
                    Ok(t) => t.trim().to_owned(),
                    Err(e) => return ctx.invalid(span, "admin.token_file".into(), format!("{}: {e}", path.display())),
                };
                if t.is_empty() {
                    return ctx.invalid(span, "admin.token_file".into(), format!("{} is empty", path.display()));
                }
                Some(t)
            }
            (None, None) => None,
        };
        let admin = AdminConfig { addr, token };
        admin.check().or_else(|m| ctx.invalid(addr_span, "admin.addr".into(), m))?;
        Ok(admin)
    }
}
