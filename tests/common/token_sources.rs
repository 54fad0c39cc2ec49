//! What the tests of token sources looked up per handshake (Redis, an HTTP API) share: their
//! configurations, from a websockify-style command line or a `[[tokens]]` table, and the checks
//! that a token routes.

use std::net::SocketAddr;

use clap::Parser;
use wsbridge::config::Config;

use super::{recv_data, send_bin, ws_connect, TestBridge};

/// The configuration a websockify-style command line makes.
pub fn from_cli(args: &[&str]) -> Config {
    let cli = wsbridge::cli::Cli::try_parse_from(["wsbridge", "127.0.0.1:0"].iter().chain(args)).expect("arguments parse");
    cli.run.into_config().expect("a configuration")
}

/// A configuration file's text with one listener and this `[[tokens]]` table.
pub fn from_toml(tokens: &str, dir: &std::path::Path) -> Config {
    let text = format!("[[listen]]\naddr = \"127.0.0.1:0\"\n\n[[tokens]]\n{tokens}");
    Config::from_toml(&text, &dir.join("wsbridge.toml")).expect("the configuration parses")
}

/// The allow-list rule for exactly this backend.
pub fn only(backend: SocketAddr) -> String {
    format!("{}/32:{}", backend.ip(), backend.port())
}

/// Opens a session with `token` and checks that it reaches the echo backend.
pub async fn echoes(bridge: &TestBridge, token: &str) {
    let (mut ws, _) = ws_connect(&bridge.url(&format!("/websockify?token={token}")), None).await;
    send_bin(&mut ws, b"ping").await;
    assert_eq!(recv_data(&mut ws).await, b"ping", "token {token} reaches the echo backend");
}
