//! The `wsbridge` binary: arguments, signals, exit codes (64: usage or configuration; 1: runtime
//! failure). Starting the server is the library's ([`wsbridge::server::start`]).

use std::process::ExitCode;

use clap::Parser as _;

use wsbridge::agent::client::{AgentArgs, AgentConfig};
use wsbridge::cli::{Cli, Command};
use wsbridge::config::{Config, LogFormat};
use wsbridge::demo::{Demo, DemoError};
use wsbridge::routes::RouteTable;
use wsbridge::server::start::{self, StartError};
use wsbridge::server::{Bridge, BridgeError, Listener};
use wsbridge::signals::Signal;

const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    // clap would exit with 2 on a usage error; wsbridge's usage errors are all 64 (EX_USAGE).
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let verbose = cli.run.verbose;
    let threads = cli.run.threads.unwrap_or_else(start::available_threads);
    let runtime = match start::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsbridge: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = match cli.command {
        Some(Command::Check { config }) => runtime.block_on(check(&config)),
        Some(Command::Agent(args)) => runtime.block_on(agent(&args, verbose)),
        Some(Command::Demo { listen, cert, key, agent }) => {
            wsbridge::logging::init(verbose, LogFormat::Text);
            let tls = cert.map(|cert| wsbridge::tls::CertFiles { cert, key });
            report(runtime.block_on(demo(&listen, tls, agent)), None)
        }
        None => {
            let config_path = cli.run.config.clone();
            let config = match cli.run.into_config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("wsbridge: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            wsbridge::logging::init(verbose, config.log_format);
            for warning in config.warnings() {
                tracing::warn!("{warning}");
            }
            report(runtime.block_on(run(config, config_path.clone(), threads)), config_path.as_deref())
        }
    };
    // Dropping the runtime would wait for its blocking-pool threads, and one may be stuck in work
    // nobody awaits any more (a static file that is a FIFO, a DNS lookup of a session that has
    // ended): the server has stopped, so exit now.
    runtime.shutdown_background();
    code
}

/// The exit code for how a run ended, with its error printed once. A listener's unusable file
/// names the configuration file it came from (`path`), as `wsbridge check` does.
fn report(r: anyhow::Result<()>, path: Option<&std::path::Path>) -> ExitCode {
    let Err(e) = r else { return ExitCode::SUCCESS };
    if let Some(start) = e.downcast_ref::<StartError>().filter(|s| s.is_config()) {
        match path {
            Some(path) => eprintln!("wsbridge: {}: {start}", path.display()),
            None => eprintln!("wsbridge: {start}"),
        }
        ExitCode::from(EX_USAGE)
    } else if e.is::<BridgeError>() {
        eprintln!("wsbridge: {}", e.root_cause());
        ExitCode::from(EX_USAGE)
    } else {
        eprintln!("wsbridge: {e:#}");
        ExitCode::from(1)
    }
}

/// `wsbridge check`: validate, then print listeners, timeouts and the route table.
async fn check(path: &std::path::Path) -> ExitCode {
    if wsbridge::agent::client::is_agent_file(path) {
        return match AgentConfig::from_file(path) {
            Ok(c) => {
                println!(
                    "{}: OK (agent {} for {}://{}{})",
                    path.display(),
                    c.name,
                    if c.server.tls { "wss" } else { "ws" },
                    c.server.authority(),
                    c.server.path
                );
                for (name, target) in &c.services {
                    println!("service {name:<20} -> {target}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("wsbridge: {e}");
                ExitCode::from(EX_USAGE)
            }
        };
    }
    let config = match Config::from_file(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wsbridge: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let table = match RouteTable::from_config(&config, None) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("wsbridge: {}: {e}", path.display());
            return ExitCode::from(EX_USAGE);
        }
    };
    for l in &config.listeners {
        if let Err(e) = Listener::prepare(l) {
            eprintln!("wsbridge: {}: listener {}: {e}", path.display(), l.addr);
            return ExitCode::from(EX_USAGE);
        }
    }
    println!("{}: OK", path.display());
    print!("{}", config.describe());
    print!("{}", table.describe().await);
    print!("{}", config.agents.describe());
    ExitCode::SUCCESS
}

/// Serves `config` on `threads` runtime threads until SIGTERM or SIGINT.
async fn run(mut config: Config, path: Option<std::path::PathBuf>, threads: usize) -> anyhow::Result<()> {
    let limit = start::raise_open_file_limit();
    start::fit_open_file_limit(limit, &mut config, threads);
    let bridge = Bridge::new(&config)?;
    // Before "listening": a supervisor may send SIGHUP or SIGTERM as soon as it reads that line,
    // and a signal without a handler would end the process.
    spawn_signal_handlers(&bridge, path, threads)?;
    let bound = start::bind(&config, threads)?;
    // Stopped only after the drain: /readyz answers 503 all through it.
    let admin_stop = tokio_util::sync::CancellationToken::new();
    let _admin = admin_stop.clone().drop_guard();
    if let Some(admin) = &config.admin {
        wsbridge::admin::Admin::spawn(&bridge, admin, admin_stop)
            .await
            .map_err(|source| StartError::Bind { addr: admin.addr, source })?;
    }
    bound.serve(&bridge).await?;
    Ok(())
}

/// SIGTERM/SIGINT (Windows: Ctrl-C, Ctrl-Break, console closed, system shutdown): shut down
/// (drain). SIGHUP: [`start::reload`]; a bad file is reported and the running configuration
/// stays. `threads` is the number of runtime threads, for the open-file fit.
fn spawn_signal_handlers(bridge: &Bridge, path: Option<std::path::PathBuf>, threads: usize) -> anyhow::Result<()> {
    let mut signals = wsbridge::signals::Signals::new()?;
    let token = bridge.shutdown_token();
    let bridge = bridge.clone();
    tokio::spawn(async move {
        loop {
            match signals.recv().await {
                Signal::Shutdown => break,
                Signal::Reload => {
                    // Files are read and parsed off the runtime thread, which serves sessions.
                    let (bridge, path) = (bridge.clone(), path.clone());
                    let _ = tokio::task::spawn_blocking(move || start::reload(&bridge, path.as_deref(), threads)).await;
                }
            }
        }
        tracing::info!("shutting down: no new connections; closing sessions");
        token.cancel();
    });
    Ok(())
}

/// `wsbridge demo`: [`Demo`] with signals, and what to open printed once it can be used.
async fn demo(listen: &str, tls: Option<wsbridge::tls::CertFiles>, agent: bool) -> anyhow::Result<()> {
    let addr = listen.parse::<wsbridge::config::ListenAddr>().map_err(anyhow::Error::msg)?.0;
    // Unwrapped, so that `report` finds a configuration error (exit 64) as on a normal run.
    let tls = tls.map(wsbridge::tls::TlsSettings::new);
    let started = match agent {
        true => Demo::start_with_agent(addr, tls).await,
        false => Demo::start(addr, tls).await,
    };
    let demo = started.map_err(|e| match e {
        DemoError::Bridge(e) => anyhow::Error::new(e),
        DemoError::Start(e) => anyhow::Error::new(e),
        e => anyhow::Error::new(e),
    })?;
    // Before the lines a user (or a test) waits for: a signal without a handler would end the
    // process without the drain.
    spawn_signal_handlers(demo.bridge(), None, 1)?;
    println!("wsbridge demo: open {} in a browser (two tabs make a conversation).", demo.url());
    if demo.agent_mode() {
        println!(
            "Agent mode: the page's sessions cross the agent {} (dialled in on /agent) to the chat server.",
            wsbridge::demo::DEMO_AGENT
        );
    }
    let chat = demo.chat_addr();
    println!("The chat server is plain TCP on {chat}; join the same room from a terminal with:");
    println!("    {}", wsbridge::demo::join_command(chat));
    println!("Press Ctrl-C to stop.");
    demo.serve().await?;
    Ok(())
}

/// `wsbridge agent`: runs until SIGTERM or SIGINT, then lets live sessions finish (64 on a bad
/// configuration).
async fn agent(args: &AgentArgs, verbose: u8) -> ExitCode {
    if args.new_secret {
        return match wsbridge::agent::client::new_secret_text() {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("wsbridge: {e}");
                ExitCode::from(1)
            }
        };
    }
    let config = match AgentConfig::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wsbridge: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    wsbridge::logging::init(verbose, LogFormat::Text);
    let handle = match wsbridge::agent::client::spawn(config) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("wsbridge: agent: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let Ok(mut signals) = wsbridge::signals::Signals::new() else {
        eprintln!("wsbridge: cannot install signal handlers");
        return ExitCode::from(1);
    };
    let shutdown = handle.shutdown.clone();
    tokio::spawn(async move {
        // SIGHUP (Unix) has nothing to reload in an agent: only a shutdown ends the wait.
        while signals.recv().await != wsbridge::signals::Signal::Shutdown {}
        tracing::info!("agent: shutting down: closing the control link; live sessions finish");
        shutdown.cancel();
    });
    let _ = handle.task.await;
    ExitCode::SUCCESS
}
