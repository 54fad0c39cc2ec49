//! Embedding wsbridge in your own tokio program: build a `Config` in code, start it the way the
//! `wsbridge` binary does ([`wsbridge::server::start`]: open-file limit, one socket per runtime
//! thread, serve until cancelled), and stop on Ctrl-C. The binary adds arguments, signals
//! (SIGTERM, SIGHUP reload) and exit codes.
//!
//! ```sh
//! cargo run --example embed -- 127.0.0.1:6080 127.0.0.1:5900
//! ```

use wsbridge::config::{Config, ListenerConfig, Matcher, RouteConfig};
use wsbridge::server::{start, Bridge};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:6080".into());
    let target = args.next().unwrap_or_else(|| "127.0.0.1:5900".into());

    // One listener, one route: every path on `listen` goes to `target`.
    let mut config = Config::new("example");
    config.listeners.push(ListenerConfig::new(listen.parse()?));
    let options = config.default_route_options();
    config.routes.push(RouteConfig {
        matcher: Matcher::AnyPath,
        target: target.parse()?,
        options,
    });
    config.check()?;

    // As many runtime threads as the binary would use: this one, and one more per extra thread.
    let threads = start::available_threads();
    let limit = start::raise_open_file_limit();
    start::fit_open_file_limit(limit, &mut config, threads);
    let bridge = Bridge::new(&config)?;
    let bound = start::bind(&config, threads)?;
    println!("ws://{}/ (every path) -> {target}; Ctrl-C stops", bound.addrs()[0]);

    let token = bridge.shutdown_token();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        token.cancel();
    });
    let drained = bound.serve(&bridge).await?;
    println!("stopped (clean: {})", drained.clean);
    Ok(())
}
