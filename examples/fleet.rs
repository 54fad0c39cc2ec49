//! A fleet of agents in one process, for measuring a server with many agents (bench/fleet.py):
//! N agents named PREFIX-0 … PREFIX-(N-1), all with one secret and one service, dialling one
//! server. Prints a JSON line whenever the number of connected agents has changed (looked at
//! every 50 ms), `{"connected": K, "of": N, "t": SECONDS}`, and stops all of them (as SIGTERM
//! stops one) when its standard input closes.
//!
//! ```sh
//! cargo build --profile profiling --example fleet
//! target/profiling/examples/fleet --server ws://127.0.0.1:6080/agent --agents 1000 \
//!     --secret-file agent.secret --service app=127.0.0.1:9100 [--prefix shop] [--ca-file ca.pem] \
//!     [--balancer-check SECONDS|off]
//! ```

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use wsbridge::agent::client::{self, AgentConfig, State};

fn usage() -> ! {
    eprintln!(
        "usage: fleet --server URL --agents N --secret-file FILE --service NAME=ADDR [--prefix P] [--ca-file FILE] \
         [--balancer-check SECONDS|off]"
    );
    std::process::exit(64)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut server, mut agents, mut secret, mut service, mut prefix) = (None, 0usize, None, None, "shop".to_owned());
    let mut ca_file = None;
    let mut balancer_check = AgentConfig::new("ws://x/agent".parse()?, String::new(), String::new()).balancer_check;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--server" => server = Some(value),
            "--agents" => agents = value.parse().unwrap_or_else(|_| usage()),
            "--secret-file" => secret = Some(std::fs::read_to_string(value)?.trim().to_owned()),
            "--service" => service = Some(value),
            "--prefix" => prefix = value,
            "--ca-file" => ca_file = Some(std::path::PathBuf::from(value)),
            "--balancer-check" if value == "off" => balancer_check = None,
            "--balancer-check" => balancer_check = Some(Duration::from_secs_f64(value.parse().unwrap_or_else(|_| usage()))),
            _ => usage(),
        }
    }
    let (Some(server), Some(secret), Some((name, addr))) = (server, secret, service.as_deref().and_then(|s| s.split_once('='))) else {
        usage()
    };
    // Five descriptors per agent (the control link and a pool of four).
    wsbridge::server::start::raise_open_file_limit();
    let start = Instant::now();
    let mut handles = Vec::with_capacity(agents);
    for i in 0..agents {
        let mut config = AgentConfig::new(server.parse()?, format!("{prefix}-{i}"), secret.clone());
        config.services.insert(name.to_owned(), addr.parse()?);
        config.ca_file = ca_file.clone();
        config.balancer_check = balancer_check;
        handles.push(client::spawn(config)?);
    }
    let mut stdin_closed = Box::pin(async {
        let mut buf = [0u8; 64];
        while tokio::io::stdin().read(&mut buf).await.is_ok_and(|n| n > 0) {}
    });
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut shown = usize::MAX;
    loop {
        tokio::select! {
            _ = &mut stdin_closed => break,
            _ = tick.tick() => {
                let connected = handles.iter().filter(|h| *h.state.borrow() == State::Connected).count();
                if connected != shown {
                    shown = connected;
                    println!(
                        "{{\"connected\": {connected}, \"of\": {agents}, \"t\": {:.3}}}",
                        start.elapsed().as_secs_f64()
                    );
                }
            }
        }
    }
    for h in &handles {
        h.shutdown.cancel();
    }
    for h in handles {
        let _ = h.task.await;
    }
    Ok(())
}
