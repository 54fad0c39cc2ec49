//! loadgen: load generator for the WebSocket-to-TCP bridge benchmark.
//!
//! `loadgen backend echo|sink|source` serves TCP; the client modes
//! (`throughput`, `echo`, `hold`, `sessions`) drive a bridge over ws://,
//! wss:// or, with `--raw-tcp`, plain TCP. Output is JSON lines.

mod backend;
mod modes;
mod net;
mod smoke;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use serde_json::json;

use modes::{Dir, Timing};
use net::{Target, TargetArgs};

#[derive(Parser)]
#[command(version, about = "Load generator for WebSocket-to-TCP bridges")]
struct Cli {
    /// Tokio worker threads (1 = single-threaded runtime)
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone, Copy, Debug)]
struct TimingArgs {
    /// Length of the measured window, seconds
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Warm-up before the window starts (not counted), seconds
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
}

impl From<TimingArgs> for Timing {
    fn from(t: TimingArgs) -> Self {
        Timing {
            warmup: t.warmup,
            seconds: t.seconds,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// TCP backend: prints the bound port as the first stdout line, then serves
    Backend {
        kind: backend::Kind,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
    /// Bulk transfer over one session; reports MB/s (1 MB = 10^6 bytes)
    Throughput {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, value_enum)]
        dir: Dir,
        #[arg(long, default_value_t = 65536)]
        msg_size: usize,
        #[command(flatten)]
        timing: TimingArgs,
    },
    /// Request/response echo; reports rate and latency percentiles
    Echo {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 1)]
        sessions: usize,
        #[arg(long, default_value_t = 64)]
        msg_size: usize,
        #[command(flatten)]
        timing: TimingArgs,
        /// Sessions opened in parallel while connecting
        #[arg(long, default_value_t = 100)]
        batch: usize,
    },
    /// Open N sessions (one echo each), print a "ready" event, hold them idle
    /// until stdin closes or SIGTERM/SIGINT (or --hold-seconds), then echo
    /// once more on each (reported as alive_after_hold) and close
    Hold {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long)]
        sessions: usize,
        /// Size of the one message each session echoes before going idle
        #[arg(long, default_value_t = 64)]
        msg_size: usize,
        /// Sessions opened in parallel
        #[arg(long, default_value_t = 200)]
        batch: usize,
        /// Release after this many seconds instead of waiting for stdin EOF
        #[arg(long)]
        hold_seconds: Option<f64>,
    },
    /// Session churn: open, one echo, close, `concurrency` at a time
    Sessions {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
        #[arg(long, default_value_t = 64)]
        msg_size: usize,
        #[command(flatten)]
        timing: TimingArgs,
    },
    /// Write a self-signed cert.pem/key.pem for localhost, 127.0.0.1 and ::1
    Gencert {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Self-test: every mode for a fraction of a second against in-process
    /// TCP and WebSocket backends (no bridge needed). Exits non-zero on failure.
    Smoke,
}

fn main() {
    let cli = Cli::parse();
    // Many sessions need many descriptors: soft limit up to the hard limit.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("loadgen: cannot raise RLIMIT_NOFILE: {e}");
    }
    let rt = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");
    let code = match rt.block_on(run(cli.cmd)) {
        Ok(()) => 0,
        Err(e) => {
            modes::emit(&json!({"type": "error", "error": format!("{e:#}")}));
            eprintln!("loadgen: {e:#}");
            1
        }
    };
    // A pending blocking stdin read must not delay exit.
    rt.shutdown_background();
    std::process::exit(code);
}

async fn run(cmd: Cmd) -> Result<()> {
    let result = match cmd {
        Cmd::Backend { kind, listen } => return backend::run(kind, &listen).await,
        Cmd::Gencert { dir } => return net::gencert(&dir),
        Cmd::Smoke => return smoke::run().await,
        Cmd::Throughput {
            target,
            dir,
            msg_size,
            timing,
        } => modes::throughput(&Target::new(&target)?, dir, msg_size, timing.into()).await?,
        Cmd::Echo {
            target,
            sessions,
            msg_size,
            timing,
            batch,
        } => modes::echo(&Target::new(&target)?, sessions, msg_size, timing.into(), batch).await?,
        Cmd::Hold {
            target,
            sessions,
            msg_size,
            batch,
            hold_seconds,
        } => modes::hold(&Target::new(&target)?, sessions, batch, msg_size, hold_seconds).await?,
        Cmd::Sessions {
            target,
            concurrency,
            msg_size,
            timing,
        } => modes::sessions(&Target::new(&target)?, concurrency, msg_size, timing.into()).await?,
    };
    modes::emit(&result);
    Ok(())
}
