//! The `wsbridge` binary: arguments, signals, binding, exit codes (64: usage or
//! configuration; 1: runtime failure).

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use tokio::net::TcpListener;

use wsbridge::cli::{Cli, Command};
use wsbridge::config::{Config, LogFormat};
use wsbridge::routes::RouteTable;
use wsbridge::server::{Bridge, Listener};

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
    let threads = cli
        .run
        .threads
        .unwrap_or_else(|| default_threads(std::thread::available_parallelism().map_or(1, |n| n.get())));
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsbridge: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Some(Command::Check { config }) => runtime.block_on(check(&config)),
        Some(Command::Demo { listen, cert, key }) => {
            wsbridge::logging::init(verbose, LogFormat::Text);
            let tls = cert.map(|cert| wsbridge::tls::CertFiles { cert, key });
            report(runtime.block_on(demo(&listen, tls)))
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
            report(runtime.block_on(run(config, config_path, threads)))
        }
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<ConfigProblem>() || e.downcast_ref::<wsbridge::server::BridgeError>().is_some() => {
            eprintln!("wsbridge: {}", e.root_cause());
            ExitCode::from(EX_USAGE)
        }
        Err(e) => {
            eprintln!("wsbridge: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `wsbridge check`: validate, then print listeners, timeouts and the route table.
async fn check(path: &std::path::Path) -> ExitCode {
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
    ExitCode::SUCCESS
}

/// Marks an error as the configuration's fault (exit code 64).
#[derive(Debug)]
struct ConfigProblem;

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("configuration")
    }
}

/// A single-threaded runtime: each runtime thread runs sessions start to end with no cross-thread
/// wake-ups; more cores get more such threads (see [`run`]).
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// Runtime threads when `--threads` is not given, for `cpus` CPUs this process may run on (as
/// `available_parallelism` counts them: cores, affinity mask and cgroup quota): one per CPU,
/// except on one or two, where one. A bridge with so few CPUs usually shares them with its
/// backend (`wsbridge 6080 localhost:5900`), and on loopback the kernel delivers each segment on
/// the sender's thread: two runtime threads, the backend and the clients then contend for two
/// cores. On a 2-core machine one thread measured better than two on every row but TLS session
/// churn, which is handshake arithmetic and gains 3-11% from the second thread (BENCHMARKS.md,
/// "Runtime threads"); `--threads 2` gives that back. Three or more CPUs keep one thread each:
/// not measured here (the project's machine has two), and what scales where the bridge has the
/// cores to itself.
fn default_threads(cpus: usize) -> usize {
    if cpus <= 2 {
        1
    } else {
        cpus
    }
}

/// Serves `config` on `threads` runtime threads (see [`bind_threads`] and [`serve_threads`]).
async fn run(mut config: Config, path: Option<std::path::PathBuf>, threads: usize) -> anyhow::Result<()> {
    let limit = raise_open_file_limit();
    fit_open_file_limit(limit, &mut config, threads);
    let bridge = Bridge::new(&config)?;
    // Before "listening": a supervisor may send SIGHUP or SIGTERM as soon as it reads that line,
    // and a signal without a handler would end the process.
    spawn_signal_handlers(&bridge, path, threads)?;
    let (sockets, _) = bind_threads(&config, threads)?;
    serve_threads(&bridge, sockets).await
}

/// Descriptors kept aside from sessions besides each thread's own: stdio, token and certificate
/// files being read, the signal pipe, and one for each refusal past the cap that may linger.
const FD_RESERVE: u64 = 32 + wsbridge::server::LINGERING_REFUSALS as u64;

/// Raises the soft limit on open files to the hard limit and returns the limit in force. Shells
/// and systemd start most services with a soft limit of 1,024, which would stop wsbridge near 500
/// sessions (a session holds two descriptors) however high the hard limit is.
fn raise_open_file_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let before = getrlimit(Resource::Nofile);
    let current = before.current.unwrap_or(u64::MAX);
    // The kernel refuses a soft limit above fs.nr_open, even under an unlimited hard limit.
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let wanted = before.maximum.unwrap_or(u64::MAX).min(nr_open);
    if current >= wanted {
        return current;
    }
    let raised = Rlimit {
        current: Some(wanted),
        maximum: before.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::debug!(from = current, to = wanted, "open-file limit raised to the hard limit");
            wanted
        }
        Err(e) => {
            tracing::warn!(error = %e, limit = current, "cannot raise the open-file limit");
            current
        }
    }
}

/// Lowers `max_connections` to what `limit` open files can hold, with a warning: past that, new
/// connections would fail on descriptors (accepts stall in a back-off, backend connects fail with
/// 1014) instead of getting a prompt 503. A session holds two descriptors; each runtime thread
/// holds a socket per listener, its epoll and its wake-up descriptor.
fn fit_open_file_limit(limit: u64, config: &mut Config, threads: usize) {
    let max_connections = config.limits.max_connections;
    let reserve = FD_RESERVE + threads as u64 * (config.listeners.len() as u64 + 2);
    let sessions = usize::try_from(limit.saturating_sub(reserve) / 2).unwrap_or(usize::MAX);
    if sessions < max_connections {
        tracing::warn!(
            "max_connections lowered from {max_connections} to {sessions}: the open-file limit ({limit}) holds \
             no more sessions; raise it (ulimit -n, LimitNOFILE= in a systemd unit) to allow more"
        );
        config.limits.max_connections = sessions;
    }
}

/// Every listener's sockets, per runtime thread.
type ThreadSockets = Vec<Vec<(Listener, std::net::TcpListener)>>;

/// Reads every listener's files (a bad certificate is a configuration error, reported before any
/// port is taken), then binds one socket per listener for each of `threads` runtime threads, with
/// `SO_REUSEPORT` when there are several so the kernel spreads connections over them. Returns the
/// sockets and each listener's bound address.
fn bind_threads(config: &Config, threads: usize) -> anyhow::Result<(ThreadSockets, Vec<std::net::SocketAddr>)> {
    let mut prepared = Vec::new();
    for l in &config.listeners {
        prepared.push(Listener::prepare(l).map_err(|e| anyhow::Error::new(e).context(ConfigProblem))?);
    }
    // Bind every socket before serving any, so a port in use fails the start, not one thread.
    let threads = threads.max(1);
    let mut per_thread: ThreadSockets = (0..threads).map(|_| Vec::new()).collect();
    let mut addrs = Vec::new();
    for l in &prepared {
        let mut addr = l.config.addr;
        if threads > 1 {
            // SO_REUSEPORT would let us share a port another process holds (a second wsbridge,
            // say) without a word: bind once without it first, so a port in use is an error.
            let probe = Listener::bind_std(addr, false).with_context(|| format!("cannot listen on {}", l.config.addr))?;
            addr = probe.local_addr()?;
        }
        for sockets in per_thread.iter_mut() {
            let socket = Listener::bind_std(addr, threads > 1).with_context(|| format!("cannot listen on {}", l.config.addr))?;
            // Port 0: the first socket picks the port, the others share it.
            addr = socket.local_addr()?;
            sockets.push((l.sibling(), socket));
        }
        let web = l.config.web.as_ref().map(|w| tracing::field::display(w.display()));
        tracing::info!(addr = %addr, tls = l.config.tls.is_some(), web, threads, "listening");
        addrs.push(addr);
    }
    Ok((per_thread, addrs))
}

/// Serves the bound sockets: the first thread's on this runtime, each other thread's on a
/// single-threaded runtime of its own; the bridge state (routes, limits, shutdown, drain) is
/// shared. Returns when every thread has drained.
async fn serve_threads(bridge: &Bridge, per_thread: ThreadSockets) -> anyhow::Result<()> {
    let mut workers = Vec::new();
    let mut own = Vec::new();
    for (i, sockets) in per_thread.into_iter().enumerate() {
        if i == 0 {
            own = sockets;
            continue;
        }
        let bridge = bridge.clone();
        workers.push(
            std::thread::Builder::new()
                .name(format!("wsbridge-{i}"))
                .spawn(move || -> anyhow::Result<()> {
                    runtime()?.block_on(async move {
                        let listeners = attach(sockets)?;
                        bridge.serve(listeners).await;
                        Ok(())
                    })
                })?,
        );
    }
    let drained = bridge.serve(attach(own)?).await;
    for w in workers {
        match w.join() {
            Ok(r) => r?,
            Err(_) => anyhow::bail!("a runtime thread panicked"),
        }
    }
    tracing::info!(clean = drained.clean, remaining = drained.remaining, "stopped");
    Ok(())
}

/// Hands std sockets to the current runtime.
fn attach(sockets: Vec<(Listener, std::net::TcpListener)>) -> anyhow::Result<Vec<Listener>> {
    sockets
        .into_iter()
        .map(|(l, s)| Ok(l.with_socket(TcpListener::from_std(s)?)))
        .collect()
}

/// SIGTERM/SIGINT: shut down (drain). SIGHUP: [`reload`]; a bad file is reported and the running
/// configuration stays. `threads` is the number of runtime threads, for the open-file fit.
fn spawn_signal_handlers(bridge: &Bridge, path: Option<std::path::PathBuf>, threads: usize) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let token = bridge.shutdown_token();
    let bridge = bridge.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    // Files are read and parsed off the runtime thread, which serves sessions.
                    let (bridge, path) = (bridge.clone(), path.clone());
                    let _ = tokio::task::spawn_blocking(move || reload(&bridge, path.as_deref(), threads)).await;
                }
            }
        }
        tracing::info!("shutting down: no new connections; closing sessions");
        token.cancel();
    });
    Ok(())
}

/// SIGHUP: re-reads the configuration file (if there is one) and the certificates.
fn reload(bridge: &Bridge, path: Option<&std::path::Path>, threads: usize) {
    match path {
        Some(p) => match Config::from_file(p).map_err(anyhow::Error::from).and_then(|mut c| {
            let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
            fit_open_file_limit(limit.unwrap_or(u64::MAX), &mut c, threads);
            bridge.reload(&c).map_err(Into::into)
        }) {
            Ok(()) => {
                tracing::info!(config = %p.display(), "configuration reloaded (listener and log format changes need a restart)");
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"), "reload failed; the running configuration stays"),
        },
        None => tracing::info!("SIGHUP: no configuration file to reload (token files are re-read when they change)"),
    }
    for e in bridge.reload_tls() {
        tracing::error!(error = %e, "certificate reload failed; the previous certificate stays in service");
    }
}

async fn demo(listen: &str, tls: Option<wsbridge::tls::CertFiles>) -> anyhow::Result<()> {
    let addr = listen.parse::<wsbridge::config::ListenAddr>().map_err(anyhow::Error::msg)?.0;
    let chat = TcpListener::bind("127.0.0.1:0").await.context("cannot start the chat server")?;
    let chat_addr = chat.local_addr()?;
    let web = wsbridge::demo::write_web_root().context("cannot write the demo page")?;
    let mut config = wsbridge::demo::config(addr, &web, chat_addr);
    let scheme = if tls.is_some() { "https" } else { "http" };
    config.listeners[0].tls = tls.map(wsbridge::tls::TlsSettings::new);
    raise_open_file_limit();
    let bridge = Bridge::new(&config)?;
    wsbridge::demo::spawn_chat_server(chat, bridge.shutdown_token());
    spawn_signal_handlers(&bridge, None, 1)?;
    let (sockets, addrs) = bind_threads(&config, 1)?;
    let local = addrs[0];
    println!("wsbridge demo: open {scheme}://{local}/ in a browser (two tabs make a conversation).");
    println!(
        "The chat server is plain TCP on {chat_addr}: `nc {} {}` joins the same room.",
        chat_addr.ip(),
        chat_addr.port()
    );
    println!("Press Ctrl-C to stop.");
    let served = serve_threads(&bridge, sockets).await;
    let _ = std::fs::remove_dir_all(&web);
    served
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_runtime_thread_on_small_machines_one_per_cpu_on_larger() {
        let threads: Vec<usize> = [1, 2, 3, 4, 64].into_iter().map(super::default_threads).collect();
        assert_eq!(threads, [1, 1, 3, 4, 64]);
    }
}
