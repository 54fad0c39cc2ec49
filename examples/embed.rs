//! Embedding wsbridge in your own tokio program: build a `Config` in code, bind, serve, and stop
//! on Ctrl-C. The binary does the same with more ceremony (signals, reload, one runtime per core, or one on 1-2 CPUs).
//!
//! ```sh
//! cargo run --example embed -- 127.0.0.1:6080 127.0.0.1:5900
//! ```

use wsbridge::config::{Config, ListenerConfig, Matcher, RouteConfig};
use wsbridge::server::{Bridge, Listener};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:6080".into());
    let target = args.next().unwrap_or_else(|| "127.0.0.1:5900".into());

    // One listener, one route: every path on `listen` goes to `target`.
    let mut config = Config::new("example");
    config.listeners.push(ListenerConfig {
        addr: listen.parse()?,
        web: None,
        web_listing: false,
        web_follow_symlinks: false,
        web_dotfiles: false,
        tls: None,
    });
    let options = config.default_route_options();
    config.routes.push(RouteConfig {
        matcher: Matcher::Path("/ws".into()),
        target: target.parse()?,
        options,
    });
    config.check()?;

    let bridge = Bridge::new(&config)?;
    let listener = Listener::prepare(&config.listeners[0])?.bind().await?;
    println!("ws://{}/ws -> {target}; Ctrl-C stops", listener.local_addr()?);

    let token = bridge.shutdown_token();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        token.cancel();
    });
    let drained = bridge.serve(vec![listener]).await;
    println!("stopped (clean: {})", drained.clean);
    Ok(())
}
