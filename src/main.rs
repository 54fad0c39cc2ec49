//! The `wsbridge` binary: arguments, signals, exit codes (64: usage or configuration; 1: runtime
//! failure). Starting the server is the library's ([`wsbridge::server::start`]).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser as _;

use wsbridge::agent::client::{AgentArgs, AgentConfig, ProxySource};
use wsbridge::cli::{Cli, Command};
use wsbridge::config::{plural, Config, LogFormat};
use wsbridge::demo::{Demo, DemoError};
use wsbridge::routes::RouteTable;
use wsbridge::server::start::{self, StartError};
use wsbridge::server::{Bridge, BridgeError, Listener};
use wsbridge::signals::Signal;
use wsbridge::systemd::Notifier;

const EX_USAGE: u8 = 64;

/// `eprintln!` that cannot panic: a closed stderr (a pipe whose reader left, `2>&-`) must not
/// turn exit code 64 into a panic's 101.
macro_rules! complain {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        // After the log's lines still on their way to stderr (the process ends after this); not
        // to a stderr that takes nothing (it would hold the exit for good).
        if wsbridge::logging::flush() {
            let _ = writeln!(std::io::stderr(), $($arg)*);
        }
    }};
}

fn main() -> ExitCode {
    // process_start_time_seconds where the system does not say it (Windows).
    wsbridge::metrics::process::started();
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
    let mut verbose = cli.run.verbose;
    if let Some(Command::Agent(args)) = &cli.command {
        verbose = verbose.max(args.verbose);
        if args.install_service || args.uninstall_service || args.run_as_service {
            return agent_service::main(args, verbose);
        }
    }
    let threads = cli.run.threads.unwrap_or_else(start::available_threads);
    let runtime = match start::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            complain!("wsbridge: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = match cli.command {
        Some(Command::Check { config, file, strict }) => match config.or(file) {
            Some(path) => {
                wsbridge::logging::init_warnings();
                runtime.block_on(check(&path, strict))
            }
            // clap requires one of them.
            None => ExitCode::from(64),
        },
        Some(Command::Completions { shell }) => print_bytes(&wsbridge::cli::completions(shell)),
        Some(Command::Man) => match wsbridge::cli::man_page() {
            Ok(page) => print_bytes(&page),
            Err(e) => {
                complain!("wsbridge: cannot write the manual page: {e}");
                ExitCode::from(1)
            }
        },
        Some(Command::Agent(args)) => runtime.block_on(agent(&args, verbose)),
        Some(Command::Demo { listen, cert, key, agent }) => {
            wsbridge::logging::init(verbose, LogFormat::Text);
            let tls = cert.map(|cert| wsbridge::tls::CertFiles { cert, key });
            report(runtime.block_on(demo(&listen, tls, agent)), None)
        }
        None => {
            let config_path = cli.run.config.clone();
            let admin_flag = cli.run.admin.is_some();
            let idle_flag = cli.run.idle_timeout.is_some_and(|s| s > 0.0);
            let config = match cli.run.into_config() {
                Ok(c) => c,
                Err(e) => {
                    complain!("wsbridge: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            if let Some(key) = &config.log_token_key {
                // Before any route is built: every tag in this process's logs is under it.
                wsbridge::config::set_token_key(key);
            }
            match &config.log_file {
                Some(path) => {
                    if let Err(e) = wsbridge::logging::init_file_as(verbose, path, config.log_format, config.log_max_size) {
                        complain!("wsbridge: log file {}: {e}", path.display());
                        return ExitCode::from(EX_USAGE);
                    }
                }
                None => wsbridge::logging::init(verbose, config.log_format),
            }
            for warning in config.warnings() {
                tracing::warn!("{warning}");
            }
            if let Some(idle) = config.timeouts.idle.filter(|_| idle_flag) {
                // websockify's option of this name exits the server when no client came for that
                // long; a script written for it would not expect its viewers cut off.
                tracing::info!(
                    idle = %wsbridge::config::format_duration(idle),
                    "--idle-timeout: a session that moves no data either way for this long is closed (1001); a VNC \
                     viewer of a still screen moves none (websockify's --idle-timeout exits the server instead)"
                );
            }
            // Both unset variables they read: done while this is the process's only thread (the
            // runtime runs on this one and has started nothing yet), as changing the environment
            // requires.
            let systemd = Systemd {
                passed: wsbridge::systemd::take_passed_sockets(),
                notifier: wsbridge::systemd::Notifier::from_env().map(Arc::new),
            };
            report(
                runtime.block_on(run(config, config_path.clone(), threads, systemd, admin_flag)),
                config_path.as_deref(),
            )
        }
    };
    // Dropping the runtime would wait for its blocking-pool threads, and one may be stuck in work
    // nobody awaits any more (a static file that is a FIFO, a DNS lookup of a session that has
    // ended): the server has stopped, so exit now.
    runtime.shutdown_background();
    let _ = wsbridge::logging::flush();
    code
}

/// The exit code for how a run ended, with its error printed once. A listener's unusable file
/// names the configuration file it came from (`path`), as `wsbridge check` does.
fn report(r: anyhow::Result<()>, path: Option<&std::path::Path>) -> ExitCode {
    let Err(e) = r else { return ExitCode::SUCCESS };
    if let Some(start) = e.downcast_ref::<StartError>().filter(|s| s.is_config()) {
        let tls = match start {
            StartError::Listener { source, .. } | StartError::Admin { source, .. } => Some(source),
            _ => None,
        };
        match (path, tls) {
            (Some(path), Some(tls)) => complain!("wsbridge: {}: {start}", at_line(path, tls)),
            (Some(path), None) => complain!("wsbridge: {}: {start}", path.display()),
            (None, _) => complain!("wsbridge: {start}"),
        }
        ExitCode::from(EX_USAGE)
    } else if e.is::<BridgeError>() {
        complain!("wsbridge: {}", e.root_cause());
        ExitCode::from(EX_USAGE)
    } else {
        complain!("wsbridge: {e:#}{}", bind_hint(&e));
        ExitCode::from(1)
    }
}

/// What to do about a port below 1024 that this process may not bind, or a unix socket in a
/// directory that does not exist (`/run/wsbridge` before anything made it).
fn bind_hint(e: &anyhow::Error) -> &'static str {
    match e.downcast_ref::<StartError>() {
        Some(StartError::Bind {
            addr: wsbridge::config::ListenOn::Unix { .. },
            source,
        }) if source.kind() == std::io::ErrorKind::NotFound => {
            " (its directory does not exist: create it first, owned by the user wsbridge runs as; a systemd unit's RuntimeDirectory=wsbridge makes /run/wsbridge)"
        }
        Some(StartError::Bind {
            addr: wsbridge::config::ListenOn::Tcp(addr),
            source,
        }) if source.kind() == std::io::ErrorKind::PermissionDenied && addr.port() < 1024 => {
            " (a port below 1024 needs root or CAP_NET_BIND_SERVICE: run it from the systemd unit, which grants it, or `setcap cap_net_bind_service=+ep` on the binary)"
        }
        _ => "",
    }
}

/// `CONFIG:LINE: KEY` for a TLS file's problem found as it was loaded (a key that does not
/// belong to its certificate), where the configuration names that file; else `CONFIG`.
fn at_line(config: &std::path::Path, e: &wsbridge::tls::TlsError) -> String {
    let named = match e {
        wsbridge::tls::TlsError::File { file, .. } => wsbridge::config::where_named(config, file),
        _ => None,
    };
    match named {
        Some((line, key)) => format!("{}:{line}: {key}", config.display()),
        None => config.display().to_string(),
    }
}

/// Writes generated text (completions, the manual page, `check`'s report) to stdout; a reader
/// that stopped early (`| head`) is not an error.
fn print_bytes(bytes: &[u8]) -> ExitCode {
    use std::io::Write as _;
    match std::io::stdout().write_all(bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            complain!("wsbridge: {e}");
            ExitCode::from(1)
        }
    }
}

/// `wsbridge check`: validate, then print listeners, timeouts and the route table.
async fn check(path: &std::path::Path, strict: bool) -> ExitCode {
    use std::fmt::Write as _;
    // Written at once at the end: a reader that stops early (`| head`) is no error.
    let mut out = String::new();
    macro_rules! say {
        ($($line:tt)*) => {{
            let _ = writeln!(out, $($line)*);
        }};
    }
    if wsbridge::agent::client::is_agent_file(path) {
        return match load_agent_config(path.to_owned(), |path| AgentConfig::from_file(&path)).await {
            Ok(c) => {
                let servers: Vec<String> = c.servers().map(ToString::to_string).collect();
                say!("{}: OK (agent {} for {})", path.display(), c.name, servers.join(", "));
                for (name, target) in &c.services {
                    match c.max_sessions.get(name) {
                        Some(max) => say!("service {name:<20} -> {target} (at most {max} at a time)"),
                        None => say!("service {name:<20} -> {target}"),
                    }
                }
                for (server, proxy, from) in c.connections() {
                    match proxy {
                        Some(p) => say!("server {server} through the proxy {p} (from {from})"),
                        None if *from == ProxySource::Unset => say!("server {server} directly ({from})"),
                        None => say!("server {server} directly (from {from})"),
                    }
                }
                match c.balancer_check {
                    Some(every) => say!("balancer check every {every:?} (where the server URL leads a new connection)"),
                    None => say!("balancer check off"),
                }
                let d = wsbridge::config::format_duration;
                // As the [agent] table writes them (a compat review: the stall deadline below
                // follows ping_interval, and nothing showed it).
                say!(
                    "connect_timeout = \"{}\", ping_interval = \"{}\", pong_timeout = \"{}\", retry_max = \"{}\"",
                    d(c.connect_timeout),
                    d(c.ping_interval),
                    d(c.pong_timeout),
                    d(c.backoff.max)
                );
                say!(
                    "(an app that takes none of a page's bytes for {} (ping_interval + pong_timeout, at least 40s) has its session ended)",
                    d(c.app_stall())
                );
                if c.connections().any(|(_, _, from)| matches!(from, ProxySource::Windows(_))) {
                    // Internet Options are per account: the service's (LocalService) are usually
                    // empty, where an administrator's console has its own.
                    say!(
                        "(the Windows settings of the account running this check; the service reads those of LocalService, \
                         then the machine's WinHTTP default)"
                    );
                }
                checked(path, &out, 0, strict)
            }
            Err(e) => {
                complain!("wsbridge: {e}");
                ExitCode::from(EX_USAGE)
            }
        };
    }
    let config = match Config::from_file(path) {
        Ok(c) => c,
        Err(e) => {
            complain!("wsbridge: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if let Some(key) = &config.log_token_key {
        wsbridge::config::set_token_key(key);
    }
    let table = match RouteTable::from_config(&config, None) {
        Ok(t) => t,
        Err(e) => {
            complain!("wsbridge: {}: {e}", path.display());
            return ExitCode::from(EX_USAGE);
        }
    };
    for l in &config.listeners {
        if let Err(e) = Listener::prepare(l) {
            complain!("wsbridge: {}: listener {}: {e}", at_line(path, &e), l.addr);
            return ExitCode::from(EX_USAGE);
        }
        // Its files read as the bridge will read them (an htpasswd file that is not there).
        if let Some(Err(e)) = l.access.web_auth.as_ref().map(wsbridge::http::WebGuard::new) {
            complain!("wsbridge: {}: listener {}: web_auth: {e}", path.display(), l.addr);
            return ExitCode::from(EX_USAGE);
        }
    }
    if let Some(Err(e)) = config
        .admin
        .as_ref()
        .and_then(|a| a.tls.clone())
        .map(wsbridge::tls::TlsListener::load)
    {
        complain!("wsbridge: {}: admin listener: {e}", at_line(path, &e));
        return ExitCode::from(EX_USAGE);
    }
    say!("{}: OK", path.display());
    let warnings = config.warnings();
    for warning in &warnings {
        say!("warning: {warning}");
    }
    out.push_str(&config.describe());
    out.push_str(&table.describe().await);
    out.push_str(&config.agents.describe());
    checked(path, &out, warnings.len(), strict)
}

/// `check`'s end: the report, and with `--strict` a failure if anything warned (`noted`: the
/// report's own warnings; the log's are counted as they were written).
fn checked(path: &std::path::Path, report: &str, noted: usize, strict: bool) -> ExitCode {
    let printed = print_bytes(report.as_bytes());
    let warnings = noted + wsbridge::logging::warnings_logged();
    if strict && warnings > 0 {
        let warnings = plural(warnings, "warning");
        complain!("wsbridge: {}: {warnings}, an error with --strict", path.display());
        return ExitCode::from(1);
    }
    printed
}

/// What systemd handed this process: passed listening sockets and the notify socket.
struct Systemd {
    passed: Result<Vec<wsbridge::systemd::PassedSocket>, wsbridge::systemd::ActivationError>,
    notifier: Option<Arc<Notifier>>,
}

/// Serves `config` on `threads` runtime threads until SIGTERM or SIGINT, on the sockets systemd
/// passed for its `systemd:NAME` listeners, telling systemd (`NOTIFY_SOCKET`) when it is ready,
/// reloading and stopping.
async fn run(
    mut config: Config,
    path: Option<std::path::PathBuf>,
    threads: usize,
    systemd: Systemd,
    admin_flag: bool,
) -> anyhow::Result<()> {
    let passed = systemd.passed.map_err(|e| StartError::Activation(e.to_string()))?;
    let notifier = systemd.notifier;
    let limit = start::raise_open_file_limit();
    start::fit_open_file_limit(limit, &mut config, threads);
    let bridge = Bridge::new(&config)?;
    if admin_flag {
        bridge.admin_address_from_flag();
    }
    // Before "listening": a supervisor may send SIGHUP or SIGTERM as soon as it reads that line,
    // and a signal without a handler would end the process.
    spawn_signal_handlers(&bridge, path, threads, notifier.clone())?;
    let bound = start::bind_with(&config, threads, passed)?;
    if !config.agents.endpoints.is_empty() {
        // The id agents log for this process (where they are, where they move from and to).
        tracing::info!(instance = bridge.agents().instance(), "agent endpoint: this instance's id");
    }
    // Stopped only after the drain: /readyz answers 503 all through it.
    let admin_stop = tokio_util::sync::CancellationToken::new();
    let _admin = admin_stop.clone().drop_guard();
    if let Some(admin) = &config.admin {
        wsbridge::admin::Admin::spawn(&bridge, admin, admin_stop).await?;
    }
    if let Some(n) = &notifier {
        // Every socket is bound (connections queue from here) and the configuration loaded.
        n.ready(&status(&bridge, config.listeners.len()));
        spawn_status(n.clone(), &bridge, config.listeners.len());
    }
    bound.serve(&bridge).await?;
    Ok(())
}

/// The one-line status systemd shows (`systemctl status`).
fn status(bridge: &Bridge, listeners: usize) -> String {
    if bridge.shutdown_token().is_cancelled() {
        draining_status(bridge)
    } else {
        format!(
            "serving {}, {} open",
            plural(listeners, "listener"),
            plural(bridge.connections(), "connection")
        )
    }
}

/// The status line from the start of a drain.
fn draining_status(bridge: &Bridge) -> String {
    format!("draining: {} open", plural(bridge.connections(), "connection"))
}

/// Keeps systemd's status line current (every 10 s, when the count changed) and, when the unit
/// sets `WatchdogSec=`, sends `WATCHDOG=1` at half that interval from the thread that serves
/// (a stalled runtime stops the pings, and systemd restarts it).
fn spawn_status(notifier: Arc<Notifier>, bridge: &Bridge, listeners: usize) {
    let bridge = bridge.clone();
    let watchdog = notifier.watchdog();
    tokio::spawn(async move {
        let every = watchdog.map_or(std::time::Duration::from_secs(10), |w| {
            (w / 2).min(std::time::Duration::from_secs(10))
        });
        let mut tick = tokio::time::interval(every);
        let mut last_status = std::time::Instant::now();
        let mut shown = status(&bridge, listeners);
        loop {
            tick.tick().await;
            if watchdog.is_some() {
                notifier.send("WATCHDOG=1\n");
            }
            if last_status.elapsed() >= std::time::Duration::from_secs(10) {
                last_status = std::time::Instant::now();
                let now = status(&bridge, listeners);
                if now != shown {
                    notifier.status(&now);
                    shown = now;
                }
            }
        }
    });
}

/// How long a reload reads files before the log says it is still at it.
const RELOAD_SLOW: std::time::Duration = std::time::Duration::from_secs(5);

/// SIGTERM/SIGINT (Windows: Ctrl-C, Ctrl-Break, console closed, system shutdown): shut down
/// (drain), telling systemd `STOPPING=1` first. SIGHUP: [`start::reload`] between `RELOADING=1`
/// and `READY=1`; a bad file is reported and the running configuration stays. `threads` is the
/// number of runtime threads, for the open-file fit.
fn spawn_signal_handlers(
    bridge: &Bridge,
    path: Option<std::path::PathBuf>,
    threads: usize,
    notifier: Option<Arc<Notifier>>,
) -> anyhow::Result<()> {
    let mut signals = wsbridge::signals::Signals::new()?;
    let bridge = bridge.clone();
    tokio::spawn(async move {
        // A SIGHUP that came while a reload was reading files: one more reload after it, since
        // the files may have changed after they were read.
        let mut again = false;
        loop {
            if !again && signals.recv().await == Signal::Shutdown {
                break;
            }
            again = false;
            if let Some(n) = &notifier {
                n.reloading();
            }
            // A rotator's postrotate may send it: the log file is looked at by the next line,
            // not within a second.
            wsbridge::logging::look_at_log_file_now();
            // Files are read and parsed off the runtime thread, which serves sessions. One that
            // never answers (a FIFO put in a file's place, a hung network mount) holds this
            // reload, not the signals: SIGTERM still drains, and the process exits without it.
            let (b, p) = (bridge.clone(), path.clone());
            let mut reload = tokio::task::spawn_blocking(move || start::reload(&b, p.as_deref(), threads));
            let slow = tokio::time::sleep(RELOAD_SLOW);
            tokio::pin!(slow);
            let mut said_slow = false;
            let reloaded = loop {
                tokio::select! {
                    r = &mut reload => break Some(r),
                    signal = signals.recv() => match signal {
                        Signal::Shutdown => break None,
                        Signal::Reload if !again => {
                            again = true;
                            tracing::info!("SIGHUP during a reload: the configuration is read once more after it");
                        }
                        Signal::Reload => {
                            tracing::info!("SIGHUP during a reload: one more reload is already queued after it");
                        }
                    },
                    () = &mut slow, if !said_slow => {
                        said_slow = true;
                        tracing::warn!(
                            waited = %wsbridge::config::format_duration(RELOAD_SLOW),
                            "reload: still reading the configuration's files (one that does not answer, such as a \
                             FIFO or a file on a hung network mount, holds the reload; the running configuration \
                             serves meanwhile, and SIGTERM still shuts down)"
                        );
                    }
                }
            };
            let Some(reloaded) = reloaded else {
                tracing::warn!("shutting down with a reload unfinished: it will not be put in force");
                break;
            };
            if let Some(n) = &notifier {
                // Ready again, with the new configuration or (it is logged) the old one.
                let open = plural(bridge.connections(), "connection");
                n.ready(&match reloaded {
                    Ok(Some(true)) => format!("reloaded; {open} open"),
                    _ => format!("reload failed, the previous configuration serves (see the log); {open} open"),
                });
            }
        }
        if let Some(n) = &notifier {
            n.stopping(&draining_status(&bridge));
        }
        // /readyz turns 503 now; with a drain delay the listeners accept on until a balancer has
        // seen it. A second SIGTERM/SIGINT (an impatient operator, a supervisor's stop timeout)
        // skips the rest of the delay; reloads during the drain are pointless and ignored.
        let hurry = async move { while signals.recv().await != Signal::Shutdown {} };
        bridge.drain(hurry).await;
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
        DemoError::Start(StartError::Bind { addr, source }) if source.kind() == std::io::ErrorKind::AddrInUse => {
            anyhow::anyhow!(
                "cannot listen on {addr}: {source} (another program has the port: `wsbridge demo --listen 127.0.0.1:PORT` takes another)"
            )
        }
        DemoError::Start(e) => anyhow::Error::new(e),
        e => anyhow::Error::new(e),
    })?;
    // Before the lines a user (or a test) waits for: a signal without a handler would end the
    // process without the drain.
    spawn_signal_handlers(demo.bridge(), None, 1, None)?;
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

/// Loads an agent's configuration off the runtime's thread: on Windows that asks the system for
/// the proxy, which can wait on the network (a PAC script's download, WPAD; bounded by the
/// agent's `connect_timeout`).
async fn load_agent_config<T: Send + 'static>(
    input: T,
    load: fn(T) -> Result<AgentConfig, wsbridge::config::ConfigError>,
) -> Result<AgentConfig, String> {
    match tokio::task::spawn_blocking(move || load(input)).await {
        Ok(loaded) => loaded.map_err(|e| e.to_string()),
        Err(e) => Err(format!("reading the agent's configuration: {e}")),
    }
}

/// `wsbridge agent`: runs until SIGTERM or SIGINT, then lets live sessions finish (64 on a bad
/// configuration).
async fn agent(args: &AgentArgs, verbose: u8) -> ExitCode {
    if args.new_secret {
        let made = match &args.secret_file {
            Some(path) => wsbridge::agent::client::write_new_secret(path),
            None => wsbridge::agent::client::new_secret_text(),
        };
        return match made {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            // A file there already or a directory that is not (the command line's mistakes,
            // as a configuration error is): 64; the machine's failures (no randomness, a full
            // disk): 1.
            Err(e) => {
                complain!("wsbridge: {e}");
                match e.kind() {
                    std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::NotFound => ExitCode::from(EX_USAGE),
                    _ => ExitCode::from(1),
                }
            }
        };
    }
    let config = match load_agent_config(args.clone(), |args| AgentConfig::from_args(&args)).await {
        Ok(c) => c,
        Err(e) => {
            complain!("wsbridge: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if let Some(path) = &args.log_file {
        if let Err(e) = wsbridge::logging::init_file(verbose, path) {
            complain!("wsbridge: --log-file {}: {e}", path.display());
            return ExitCode::from(EX_USAGE);
        }
    } else {
        wsbridge::logging::init(verbose, LogFormat::Text);
    }
    // Unsets the variables it reads: done while this is the process's only thread (nothing has
    // been spawned yet), as changing the environment requires.
    let notifier = Notifier::from_env().map(Arc::new);
    // A session holds two descriptors (the link and the app's connection): shells and systemd
    // start services at a soft limit of 1,024, about 500 sessions.
    wsbridge::server::start::raise_open_file_limit();
    let servers: Vec<String> = config.servers().map(ToString::to_string).collect();
    let name = config.name.clone();
    let handle = match wsbridge::agent::client::spawn(config) {
        Ok(h) => h,
        Err(e) => {
            complain!("wsbridge: agent: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let Ok(mut signals) = wsbridge::signals::Signals::new() else {
        complain!("wsbridge: cannot install signal handlers");
        return ExitCode::from(1);
    };
    if let Some(n) = &notifier {
        // Ready once started: an agent that cannot reach its server yet keeps trying, and the
        // status line says so.
        let status = wsbridge::agent::client::status_line(&name, &servers, &handle.states);
        n.ready(&status);
        let states = handle.states.clone();
        spawn_agent_status(n.clone(), name, servers, states, status, handle.shutdown.clone());
    }
    let shutdown = handle.shutdown.clone();
    tokio::spawn(async move {
        // SIGHUP (Unix) has nothing to reload in an agent: only a shutdown ends the wait.
        while signals.recv().await != wsbridge::signals::Signal::Shutdown {}
        tracing::info!("agent: shutting down: closing the control link; live sessions finish");
        if let Some(n) = &notifier {
            n.stopping("stopping: live sessions finish");
        }
        shutdown.cancel();
        // A second one (an impatient operator's Ctrl-C, a supervisor's stop timeout) ends the
        // drain now, the same on every platform, and says so (on Windows the console's default
        // handler ended the process silently).
        while signals.recv().await != wsbridge::signals::Signal::Shutdown {}
        tracing::warn!("agent: a second shutdown signal: exiting now; sessions still open are cut");
        let _ = wsbridge::logging::flush();
        std::process::exit(0);
    });
    let failed = match handle.task.await {
        Ok(Ok(())) => return ExitCode::SUCCESS,
        Ok(Err(e)) => e,
        Err(e) => e.to_string(),
    };
    complain!("wsbridge: agent: {failed}");
    ExitCode::from(1)
}

/// Tells systemd each change of the agent's connections (`STATUS=`; `shown` is the one sent
/// with READY=1), until the agent starts stopping (then the STOPPING=1 line stays), and sends
/// `WATCHDOG=1` at half the interval the unit sets with `WatchdogSec=`, from the runtime's
/// thread, until the agent has stopped.
fn spawn_agent_status(
    notifier: Arc<Notifier>,
    name: String,
    servers: Vec<String>,
    mut states: Vec<tokio::sync::watch::Receiver<wsbridge::agent::client::State>>,
    mut shown: String,
    stopping: tokio_util::sync::CancellationToken,
) {
    let watchdog = notifier.watchdog();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(watchdog.map_or(std::time::Duration::from_secs(3600), |w| w / 2));
        loop {
            let changed = {
                let any = futures_util::future::select_all(states.iter_mut().map(|s| Box::pin(s.changed())));
                tokio::select! {
                    _ = tick.tick() => None,
                    (r, _, _) = any => Some(r.is_ok()),
                }
            };
            match changed {
                None if watchdog.is_some() => notifier.send("WATCHDOG=1\n"),
                None => {}
                // The agent has stopped.
                Some(false) => return,
                // Stopping: the STOPPING=1 line's status stays.
                Some(true) if stopping.is_cancelled() => {}
                Some(true) => {
                    let now = wsbridge::agent::client::status_line(&name, &servers, &states);
                    if now != shown {
                        notifier.status(&now);
                        shown = now;
                    }
                }
            }
        }
    });
}

/// `wsbridge agent --install-service`, `--uninstall-service` and the hidden `--service-mode` the
/// installed service runs with: Windows only; elsewhere refused (exit 64).
mod agent_service {
    use std::process::ExitCode;

    use wsbridge::agent::client::AgentArgs;

    use super::EX_USAGE;

    #[cfg(not(windows))]
    pub fn main(args: &AgentArgs, _verbose: u8) -> ExitCode {
        let flag = match (args.install_service, args.uninstall_service) {
            (true, _) => "--install-service",
            (_, true) => "--uninstall-service",
            _ => "--service-mode",
        };
        complain!("wsbridge: agent {flag}: Windows services exist only on Windows; here run `wsbridge agent --config FILE` under systemd or another supervisor");
        ExitCode::from(EX_USAGE)
    }

    /// The service's key name (`sc start wsbridge-agent`).
    #[cfg(windows)]
    const NAME: &str = "wsbridge-agent";

    /// The service's exit codes (`sc query` shows them as `SERVICE_EXIT_CODE`; the README lists
    /// them): the agent failed while running; its log file could not be opened (nothing else
    /// says why then); its configuration is unusable (as `wsbridge agent` exits 64).
    #[cfg(windows)]
    const FAILED: u32 = 1;
    #[cfg(windows)]
    const NO_LOG_FILE: u32 = 2;
    #[cfg(windows)]
    const BAD_CONFIG: u32 = 64;

    /// How long `--uninstall-service` waits for a running service to stop: its drain (the
    /// agent's shutdown grace) and a margin.
    #[cfg(windows)]
    const UNINSTALL_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

    #[cfg(windows)]
    pub fn main(args: &AgentArgs, verbose: u8) -> ExitCode {
        use wsbridge::service::{self, Failure};
        if args.uninstall_service {
            return match service::uninstall(NAME, UNINSTALL_WAIT) {
                Ok(true) => {
                    complain!("wsbridge: the service {NAME} is stopped and removed");
                    ExitCode::SUCCESS
                }
                Ok(false) => {
                    complain!(
                        "wsbridge: the service {NAME} is still stopping after {}s (live sessions finishing); it is removed once stopped",
                        UNINSTALL_WAIT.as_secs()
                    );
                    ExitCode::SUCCESS
                }
                // Nothing to remove is what was asked for (an uninstall script run twice).
                Err(e) if e.os_code() == Some(1060) => {
                    complain!("wsbridge: the service {NAME} is not installed: nothing to remove");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    complain!("wsbridge: agent --uninstall-service: {e}{}", admin_hint(&e));
                    ExitCode::from(1)
                }
            };
        }
        let (config_path, log_file) = match paths(args) {
            Ok(p) => p,
            Err(e) => {
                complain!("wsbridge: agent: {e}");
                return ExitCode::from(EX_USAGE);
            }
        };
        if args.install_service {
            // A configuration that would not run is refused now, not at the service's first start.
            let config = match wsbridge::agent::client::AgentConfig::from_args(args) {
                Ok(c) => c,
                Err(e) => {
                    complain!("wsbridge: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            if let Some(dir) = log_file.parent().filter(|d| !d.is_dir()) {
                complain!(
                    "wsbridge: agent --install-service: the log file's directory {} does not exist: create it, and let the service's account write it (see the README, \"Windows\")",
                    dir.display()
                );
                return ExitCode::from(EX_USAGE);
            }
            if log_file.is_dir() {
                complain!(
                    "wsbridge: agent --install-service: --log-file {} is a directory: name a file in it, as {}",
                    log_file.display(),
                    log_file.join("wsbridge-agent.log").display()
                );
                return ExitCode::from(EX_USAGE);
            }
            return install(args, &config_path, &log_file, &config.name, verbose);
        }
        // A service has no console: whatever stops it from starting goes to its log, and to the
        // SCM as its exit code, which `sc query` shows even when the log cannot be opened (a
        // Windows review: a service that could not read its files left no trace).
        // The log first (where the rest is said), then the configuration.
        let config = wsbridge::logging::init_file(verbose, &log_file)
            .map_err(|e| Failure {
                code: NO_LOG_FILE,
                message: format!("{}: {e}", log_file.display()),
            })
            .and_then(|()| {
                wsbridge::agent::client::AgentConfig::from_args(args).map_err(|e| Failure {
                    code: BAD_CONFIG,
                    message: e.to_string(),
                })
            });
        let stopping = config.as_ref().map_or(std::time::Duration::ZERO, |c| c.shutdown_grace) + std::time::Duration::from_secs(5);
        let body = Box::new(move |stop: tokio_util::sync::CancellationToken| match config {
            Ok(config) => run(config, stop).map_err(|message| Failure { code: FAILED, message }),
            Err(f) => {
                tracing::error!(code = f.code, "agent: the service cannot start: {}", f.message);
                Err(f)
            }
        });
        match service::run(NAME, body, stopping) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                complain!("wsbridge: agent --service-mode: {e}");
                tracing::error!(error = %e, "the service ended");
                ExitCode::from(1)
            }
        }
    }

    /// The absolute configuration file (the service does not start in the directory it was
    /// installed from) and log file (`--log-file`, or wsbridge-agent.log beside the
    /// configuration). The service takes every setting from the file: other flags are refused.
    #[cfg(windows)]
    fn paths(args: &AgentArgs) -> Result<(std::path::PathBuf, std::path::PathBuf), String> {
        let given = [
            (!args.servers.is_empty(), "--server"),
            (args.name.is_some(), "--name"),
            (args.secret_file.is_some(), "--secret-file"),
            (!args.services.is_empty(), "--service"),
            (args.ca_file.is_some(), "--ca-file"),
            (args.proxy.is_some(), "--proxy"),
            (!args.max_sessions.is_empty(), "--max-sessions"),
        ];
        if let Some((_, flag)) = given.iter().find(|(set, _)| *set) {
            return Err(format!(
                "{flag}: a service takes its settings from --config FILE only; put it there"
            ));
        }
        let config = args
            .config
            .as_deref()
            .ok_or("--config FILE is needed: a service reads its settings from a file")?;
        let absolute = |p: &std::path::Path| std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()));
        let config = absolute(config)?;
        let log_file = match &args.log_file {
            Some(p) => absolute(p)?,
            None => config.with_file_name("wsbridge-agent.log"),
        };
        Ok((config, log_file))
    }

    #[cfg(windows)]
    fn install(args: &AgentArgs, config: &std::path::Path, log_file: &std::path::Path, agent: &str, verbose: u8) -> ExitCode {
        let executable = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => {
                complain!("wsbridge: cannot find this program: {e}");
                return ExitCode::from(1);
            }
        };
        let spec = wsbridge::service::ServiceSpec {
            name: NAME.into(),
            display_name: format!("wsbridge agent ({agent})"),
            description: "Carries a wsbridge server's sessions to the services on this computer".into(),
            executable,
            arguments: {
                let mut arguments: Vec<std::ffi::OsString> = vec![
                    "agent".into(),
                    "--service-mode".into(),
                    "--config".into(),
                    config.into(),
                    "--log-file".into(),
                    log_file.into(),
                ];
                // What the command line may add to the file's settings goes on the service's
                // (a review: -v and --balancer-check were accepted here and then dropped).
                if verbose > 0 {
                    arguments.push(format!("-{}", "v".repeat(verbose.into())).into());
                }
                if let Some(check) = &args.balancer_check {
                    arguments.extend(["--balancer-check".into(), check.into()]);
                }
                arguments
            },
            automatic: true,
        };
        match wsbridge::service::install(&spec) {
            Ok(warnings) => {
                for warning in warnings {
                    complain!("wsbridge: warning: {warning}");
                }
                complain!(
                    "wsbridge: installed the service {NAME} (started with Windows, restarted on failure; `sc start {NAME}` starts it now); it logs to {}",
                    log_file.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) if e.os_code() == Some(1073) => {
                complain!(
                    "wsbridge: agent --install-service: the service {NAME} is installed already: `wsbridge.exe agent --uninstall-service` first, then install it again to change its settings"
                );
                ExitCode::from(1)
            }
            Err(e) => {
                complain!("wsbridge: agent --install-service: {e}{}", admin_hint(&e));
                ExitCode::from(1)
            }
        }
    }

    /// What to do about the Service Control Manager's "access denied": (un)installing a
    /// service takes an administrator's console.
    #[cfg(windows)]
    fn admin_hint(e: &wsbridge::service::ServiceError) -> &'static str {
        match e.os_code() {
            Some(5) => " (run it from a console started as administrator)",
            _ => "",
        }
    }

    /// The service's body: the agent until the SCM's stop, then its drain (live sessions finish
    /// within the agent's shutdown grace).
    #[cfg(windows)]
    fn run(config: wsbridge::agent::client::AgentConfig, stop: tokio_util::sync::CancellationToken) -> Result<(), String> {
        let runtime = wsbridge::server::start::runtime().map_err(|e| format!("cannot start the runtime: {e}"))?;
        let outcome = runtime.block_on(async {
            let handle = wsbridge::agent::client::spawn(config).map_err(|e| format!("agent: {e}"))?;
            let shutdown = handle.shutdown.clone();
            tokio::spawn(async move {
                stop.cancelled().await;
                tracing::info!("agent: service stop: closing the control link; live sessions finish");
                shutdown.cancel();
            });
            handle
                .task
                .await
                .map_err(|e| format!("agent: {e}"))?
                .map_err(|e| format!("agent: {e}"))?;
            tracing::info!("agent: stopped");
            Ok(())
        });
        runtime.shutdown_background();
        outcome
    }
}
