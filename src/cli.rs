//! The command line: websockify-compatible arguments, turned into the same [`Config`] a TOML file
//! produces.
//!
//! `wsbridge [options] [source_addr:]source_port [target_addr:target_port]`, options before or
//! after the positionals (noVNC's launcher puts them after). websockify options that make no sense
//! here are accepted by the parser only to be refused with a message saying what to do instead:
//! an option that is silently ignored is a bug report waiting to happen.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::policy::AuthSettings;
use crate::config::tls::{BackendTlsSettings, CertFiles, MinVersion, TlsSettings};
use crate::config::{
    at_most_a_year, parse_duration, parse_message_size, parse_unix_mode, Config, ConfigError, Framing, Limits, ListenOn, ListenerConfig,
    LogFormat, Matcher, RouteConfig, RouteOptions, Target, Timeouts, TokenFormat, TokenLookup, TokenSourceConfig, DEFAULT_UNIX_MODE,
};
use crate::policy::OriginRule;

/// A fast, hardened WebSocket-to-TCP bridge, websockify-compatible.
///
/// Examples:
///   wsbridge 6080 localhost:5900                      bridge ws://HOST:6080/ to a VNC server
///   wsbridge --web /usr/share/novnc 6080 localhost:5900
///   wsbridge 6080 --token-plugin TokenFile --token-source /etc/wsbridge/tokens
///   wsbridge 6080 --token-plugin TokenRedis --token-source redis.internal:6379 \
///       --token-allow-target 10.0.0.0/8:5900-5999
///   wsbridge 6080 --token-plugin JSONTokenApi \
///       --token-source 'https://api.internal/lookup?token=%s' \
///       --token-allow-target 10.0.0.0/8:5900-5999
///   wsbridge --config wsbridge.toml                   everything a TOML file can say
///   wsbridge check --config wsbridge.toml             validate and print the route table
///   wsbridge demo                                     a chat room in the browser, no setup
///   wsbridge agent --config agent.toml                agent mode: serve local apps to a server
#[derive(Debug, Parser)]
#[command(name = "wsbridge", version, verbatim_doc_comment, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to run; without one, bridge as the positionals and options say.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The bridge's options.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a configuration and print the effective settings and route table (as the file
    /// writes them; tokens as a keyed hash), without binding anything.
    Check {
        /// The TOML file (a server's, or an agent's `[agent]` table).
        #[arg(long, short = 'c', value_name = "FILE", required_unless_present = "file")]
        config: Option<PathBuf>,
        /// The file, without `--config`.
        #[arg(value_name = "FILE", conflicts_with = "config")]
        file: Option<PathBuf>,
        /// Fail (exit 1) when the check warns as well: an empty credentials file (its routes
        /// refuse everyone), a token file's skipped line, a setting that has no effect. For a
        /// deployment's gate, where a warning is a mistake to stop on.
        #[arg(long)]
        strict: bool,
    },
    /// Run a demo: a chat-room TCP backend, wsbridge in front of it, and a web page to chat from.
    Demo {
        /// Address to serve the page and WebSocket on.
        #[arg(long, default_value = "127.0.0.1:6080", value_name = "ADDR")]
        listen: String,
        /// Serve https:// and wss:// too, with this PEM certificate chain (key inside or --key).
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
        /// PEM private key for --cert.
        #[arg(long, value_name = "FILE", requires = "cert")]
        key: Option<PathBuf>,
        /// Agent mode: the page's sessions cross an agent (in this process) that dialled in,
        /// as a `wsbridge agent` on a user's computer would carry them to a desktop app.
        #[arg(long)]
        agent: bool,
    },
    /// Run an agent: dial out from a computer the server cannot reach to a server's agent
    /// endpoint, and carry its sessions to local services (agent mode, see README).
    ///
    /// Example:
    ///   wsbridge agent --server wss://bridge.example.com/agent --name shop-17 \
    ///       --secret-file /etc/wsbridge/agent.secret --service pos=127.0.0.1:9100
    ///   wsbridge agent --config agent.toml
    ///   wsbridge agent --new-secret
    #[command(verbatim_doc_comment)]
    Agent(crate::agent::client::AgentArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) for packaging:
    /// `wsbridge completions bash > /usr/share/bash-completion/completions/wsbridge`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) for packaging: `wsbridge man > wsbridge.1`.
    Man,
}

/// The completion script for `shell`, from the same clap definitions as `--help`.
pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "wsbridge", &mut out);
    out
}

/// The manual page (roff), from the same clap definitions as `--help`.
///
/// # Errors
/// Writing the page failed (it is written to memory, so only on a clap_mangen bug).
pub fn man_page() -> std::io::Result<Vec<u8>> {
    use std::io::Write as _;
    let command = <Cli as clap::CommandFactory>::command();
    let man = clap_mangen::Man::new(command.clone());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    // The examples as they are written, not filled into a paragraph.
    let mut description = Vec::new();
    man.render_description_section(&mut description)?;
    let description = String::from_utf8_lossy(&description).replacen("Examples:\n", "Examples:\n.nf\n", 1) + ".fi\n";
    out.extend_from_slice(description.as_bytes());
    man.render_options_section(&mut out)?;
    // Each command's options in this page (there are no pages of their own to point to).
    for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("wsbridge {}", sub.get_name());
        writeln!(out, ".SH \"{}\"", name.to_uppercase())?;
        if let Some(about) = sub.get_long_about().or(sub.get_about()) {
            writeln!(out, "{}", roff_text(&about.to_string()))?;
        }
        let page = clap_mangen::Man::new(sub.clone().bin_name(name));
        let mut part = Vec::new();
        page.render_synopsis_section(&mut part)?;
        page.render_options_section(&mut part)?;
        out.extend_from_slice(String::from_utf8_lossy(&part).replace(".SH ", ".SS ").as_bytes());
    }
    out.extend_from_slice(
        b".SH \"EXIT STATUS\"\n.TP\n0\nstopped cleanly (SIGTERM or SIGINT), or a command that succeeded\n\
          .TP\n1\na runtime error: a port in use, a failure after start\n\
          .TP\n64\na usage or configuration error (the message names the option, or the file, line and field)\n",
    );
    out.extend_from_slice(
        b".SH SIGNALS\n.TP\nSIGTERM, SIGINT\ndrain: stop accepting, close each session with 1001 after flushing it, exit when \
          drained or when shutdown_grace has passed (a second one skips the rest of a drain_delay)\n\
          .TP\nSIGHUP\nreload the configuration file, its token sources and every certificate; a file that \
          does not parse is logged and the running configuration stays; open sessions are untouched; the \
          log file is looked at for a rotation at once; a file that does not answer (a FIFO, a hung \
          mount) holds only the reload (logged after 5 s; SIGTERM still drains). Token, credentials (bearer_file, htpasswd, JWT \
          keys) and agent files are also re-read without it, by the first request (or metrics scrape) \
          a second after a change\n\
          .SH ENVIRONMENT\n.TP\nRUST_LOG\nthe log filter (tracing's syntax), over \\-v\n\
          .TP\nNO_COLOR\nset and not empty: no colours in log lines on a terminal\n\
          .TP\nNOTIFY_SOCKET, WATCHDOG_USEC, LISTEN_FDS, LISTEN_FDNAMES, JOURNAL_STREAM\nset by systemd: \
          readiness and reload notices, the watchdog, socket activation, journal priorities\n\
          .TP\nHTTPS_PROXY, HTTP_PROXY, NO_PROXY\nwsbridge agent: the proxy to reach its servers through \
          (CONNECT), unless \\-\\-proxy or the file's proxy says otherwise\n\
          .SH FILES\n.TP\n/etc/wsbridge/wsbridge.toml\nthe packaged configuration (wsbridge.service runs \
          wsbridge \\-\\-config with it)\n\
          .TP\n/usr/share/doc/wsbridge/examples/\nthe annotated full configuration and an agent's\n",
    );
    man.render_version_section(&mut out)?;
    Ok(out)
}

/// Text for a roff page: backslashes and hyphens escaped, no line starting with a `.` or `'`
/// (a request), and indented lines (examples) kept as they are written rather than filled.
fn roff_text(text: &str) -> String {
    let mut out = Vec::new();
    let mut kept = false;
    for line in text.lines() {
        let indented = line.starts_with(' ');
        if indented != kept {
            out.push(if indented { ".nf".to_owned() } else { ".fi".to_owned() });
            kept = indented;
        }
        let line = line.replace('\\', "\\e").replace('-', "\\-");
        out.push(match line.starts_with(['.', '\'']) {
            true => format!("\\&{line}"),
            false => line,
        });
    }
    if kept {
        out.push(".fi".to_owned());
    }
    out.join("\n")
}

/// Options for bridging (the default command).
#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// `[source_addr:]source_port` to listen on (e.g. 6080, 0.0.0.0:6080, [::]:6080), or
    /// `systemd:NAME`: the sockets systemd passed under that name (socket activation, Linux).
    /// Omitted with --unix-listen.
    #[arg(value_name = "SOURCE")]
    pub source: Option<String>,
    /// `target_addr:target_port` to bridge to (e.g. localhost:5900, [::1]:5900); not needed with a
    /// token source or --unix-target.
    #[arg(value_name = "TARGET")]
    pub target: Option<String>,

    /// Read everything from this TOML file (see config/ for annotated examples).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Serve static files from DIR to plain HTTP requests on the same port (noVNC's web client).
    #[arg(long, value_name = "DIR")]
    pub web: Option<PathBuf>,
    /// List directories that have no index.html (off by default).
    #[arg(long)]
    pub web_listing: bool,
    /// Serve files that symlinks in --web point to outside it (off: 404).
    #[arg(long)]
    pub web_follow_symlinks: bool,
    /// Serve and list hidden files in --web, such as .git/ and .env (off: 404).
    #[arg(long)]
    pub web_dotfiles: bool,
    /// Accepted for websockify compatibility: directory listings are off unless --web-listing.
    #[arg(long)]
    pub file_only: bool,
    /// Static files under --web ask what the WebSocket upgrade asks: --auth-plugin BasicHTTPAuth's
    /// password (a browser prompts for it) or ClientCertCNAuth's certificate names; every request.
    #[arg(long)]
    pub web_auth: bool,

    /// Token plugin (websockify names): TokenFile or ReadOnlyTokenFile, TokenFileName,
    /// UnixDomainSocketDirectory, JWTTokenApi, TokenRedis, JSONTokenApi, or BaseTokenAPI; tokens
    /// from --token-source.
    #[arg(long, value_name = "PLUGIN", value_parser = |s: &str| plugin_name(s, "websockify.token_plugins."))]
    pub token_plugin: Option<String>,
    /// Token file or directory of `TOKEN: HOST:PORT` lines (TokenFile); with TokenFileName, a
    /// directory in which each file's name is a token and its content HOST:PORT; with
    /// UnixDomainSocketDirectory, a directory of unix sockets, each named by its token (not on
    /// Windows); with JWTTokenApi, the key JWTs are checked with (a PEM public key, or a file holding an HMAC
    /// secret); with TokenRedis, host[:port[:db[:password[:namespace]]]] (keys NAMESPACE:TOKEN, values
    /// HOST:PORT or {"host": "HOST:PORT"}; a configuration file keeps the password out of the
    /// command line); with JSONTokenApi or BaseTokenAPI, the URL asked, with %s where the token
    /// goes (http://api.internal/lookup?token=%s; a 2xx answer {"host": …, "port": …}, or
    /// HOST:PORT text for BaseTokenAPI, names the target; 4xx: unknown token).
    #[arg(long, value_name = "FILE|DIR|REDIS|URL")]
    pub token_source: Option<PathBuf>,
    /// With --token-plugin JWTTokenApi, TokenRedis, JSONTokenApi or BaseTokenAPI: a target a token may name, as
    /// ADDRESS-RANGE:PORTS or NAME:PORTS (10.0.0.0/8:5900-5999, vnc.internal:5901); repeatable,
    /// and required: nothing else is reachable.
    #[arg(long, visible_alias = "jwt-allow-target", value_name = "RULE")]
    pub token_allow_target: Vec<String>,
    /// With --token-plugin TokenRedis, JSONTokenApi or BaseTokenAPI: let a value in Redis (an
    /// answer of the API) name any host and port, as websockify does (whoever can write to Redis,
    /// or controls the API, can then reach anything the bridge can); instead of
    /// --token-allow-target.
    #[arg(long)]
    pub token_allow_any_target: bool,
    /// Same as `--token-plugin TokenFile --token-source FILE` (websockify's older option).
    #[arg(long, value_name = "FILE|DIR")]
    pub target_config: Option<PathBuf>,
    /// Take the token from the Host header instead of the `token` query parameter (without its
    /// port; host names match without regard to case).
    #[arg(long)]
    pub host_token: bool,
    /// Bridge to this unix socket instead of a TCP target (not on Windows).
    #[arg(long, value_name = "PATH")]
    pub unix_target: Option<PathBuf>,
    /// Listen on this unix socket instead of TCP (then give only TARGET), for a reverse proxy on
    /// the same machine; a stale socket file there is replaced, any other file is an error. Its
    /// clients count as 127.0.0.1 for per-address caps (a file's `max_connections_per_ip`) and
    /// policies. Not on Windows.
    #[arg(long, value_name = "PATH")]
    pub unix_listen: Option<PathBuf>,
    /// The --unix-listen socket's file mode, in octal (default 600: only wsbridge's user can
    /// connect; 660 lets its group in too, such as the proxy's).
    #[arg(long, value_name = "MODE", requires = "unix_listen")]
    pub unix_listen_mode: Option<String>,

    /// Send a ping every N seconds; a client that does not answer within N seconds is gone
    /// (default: 20). 0: no pings (websockify's meaning of 0). A duration (30s, 1m) works too.
    #[arg(long, value_name = "SECONDS", value_parser = seconds)]
    pub heartbeat: Option<f64>,
    /// Close a session after N seconds with no data either way (pings do not count: a VNC
    /// viewer of a still screen is idle). 0: no idle deadline, as in websockify (whose option of
    /// this name exits the whole server; wsbridge never exits on its own). A duration (10m, 1h)
    /// works too.
    #[arg(long, value_name = "SECONDS", value_parser = seconds)]
    pub idle_timeout: Option<f64>,
    /// Deadline for the backend connect, e.g. 5s, 500ms (more than zero).
    #[arg(long, value_name = "DURATION")]
    pub connect_timeout: Option<String>,
    /// Deadline from accept to a finished WebSocket upgrade, e.g. 10s (more than zero).
    #[arg(long, value_name = "DURATION")]
    pub handshake_timeout: Option<String>,
    /// On SIGTERM, keep accepting for this long after /readyz turned 503 (e.g. 10s), so that a
    /// load balancer sees the 503 and moves new sessions elsewhere first; then close the
    /// listeners and end sessions with 1001. Default: off (close at once).
    #[arg(long, value_name = "DURATION")]
    pub drain_delay: Option<String>,
    /// How backend bytes reach the client: binary (default), text or lines.
    #[arg(long, value_enum, value_name = "MODE")]
    pub framing: Option<FramingArg>,
    /// Largest client message accepted (close 1009 above it), e.g. 1MiB; default: no limit ("off").
    #[arg(long, value_name = "SIZE")]
    pub max_message_size: Option<String>,
    /// Record every session to FILE.N (N: the session number its log line shows), in websockify's
    /// format, which noVNC's playback page reads. Recordings hold what users type, passwords
    /// too: files are created mode 0600 and never overwritten. Off by default.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// Largest recording file, e.g. 16MiB, or off (default: 64MiB); a recording that reaches it
    /// is cut, still a valid file, and the session goes on.
    #[arg(long, value_name = "SIZE", requires = "record")]
    pub record_max_size: Option<String>,
    /// Most concurrent connections (at least 1); more get HTTP 503.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// PEM certificate chain for wss:// (the key may be in the same file). Default, as in
    /// websockify: self.pem in the current directory, when there is one.
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// PEM private key for --cert (PKCS#8, PKCS#1 RSA or SEC1 EC).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Refuse plain ws:// connections (by default ws and wss share the port).
    #[arg(long)]
    pub ssl_only: bool,
    /// Lowest TLS version: tlsv1_2 (default; websockify's `default` is the same) or tlsv1_3.
    #[arg(long, value_name = "VERSION")]
    pub ssl_version: Option<String>,
    /// Require a client certificate signed by --cafile (mTLS).
    #[arg(long)]
    pub verify_client: bool,
    /// CA bundle for client certificates.
    #[arg(long, value_name = "FILE")]
    pub cafile: Option<PathBuf>,
    /// Connect to the target over TLS, verifying its certificate against the system roots.
    #[arg(long)]
    pub ssl_target: bool,
    /// With --ssl-target: verify against this CA bundle instead; a file of one certificate is
    /// also accepted as the backend's own (a self-signed backend certificate, names not checked).
    #[arg(long, value_name = "FILE")]
    pub ssl_target_ca: Option<PathBuf>,
    /// With --ssl-target: the name to verify (default: the target host).
    #[arg(long, value_name = "NAME")]
    pub ssl_target_name: Option<String>,
    /// With --ssl-target: accept any certificate (insecure; for testing only).
    #[arg(long)]
    pub ssl_target_no_verify: bool,
    /// websockify's auth plugins: ClientCertCNAuth (only clients whose certificate CN is in
    /// --auth-source), BasicHTTPAuth (--auth-source USER:PASSWORD) or ExpectOrigin (--auth-source
    /// "ORIGIN ORIGIN…": as --origin, and a request without an Origin is refused too).
    #[arg(long, value_name = "PLUGIN", value_parser = |s: &str| plugin_name(s, "websockify.auth_plugins."))]
    pub auth_plugin: Option<String>,
    /// For --auth-plugin: CN names, USER:PASSWORD or origins, separated by spaces (or commas).
    #[arg(long, value_name = "SOURCE")]
    pub auth_source: Option<String>,
    /// Only web pages from this origin may open sessions (https://app.example.com,
    /// https://*.example.com, same-origin); repeatable. Without it any page can, as with
    /// websockify (a warning says so at start-up).
    #[arg(long, value_name = "ORIGIN")]
    pub origin: Vec<String>,

    /// Runtime threads, each with its own socket per listener (default: one per CPU available to
    /// the process; one when at most two are, since the bridge then shares them with its backend).
    /// Always one on Windows, which cannot share a port between sockets.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Serve the admin endpoints on ADDR (PORT means 127.0.0.1:PORT): /healthz, /readyz (503 once
    /// a drain starts), /metrics (Prometheus) and /sessions (list; DELETE /sessions/ID ends one).
    /// Off by default; loopback only unless a configuration file's [admin] table sets a token.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,

    /// More logging: -v for debug, -vv for trace (wsbridge's own records; the libraries under
    /// it stay at info, as their records can hold secrets). RUST_LOG, when set, wins.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log format: text or json.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormatArg>,
    /// Write the log to FILE instead of stderr, appending, as websockify does (beside --config
    /// too, over its [log] file). On Linux it grows until a rotator (logrotate, copytruncate or
    /// rename) takes it, and goes on in FILE; on Windows, or with [log] max_size, it is set aside
    /// as FILE.old at that size (10 MiB) and a new FILE begun.
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,

    /// websockify options wsbridge does not have; each is refused with what to use instead.
    #[command(flatten)]
    pub refused: Refused,
}

/// `--framing` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum FramingArg {
    /// Binary messages.
    Binary,
    /// UTF-8 text messages.
    Text,
    /// One text message per line.
    Lines,
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormatArg {
    /// Human-readable.
    Text,
    /// JSON lines.
    Json,
}

/// A websockify plugin name as websockify takes it: `TokenFile`, or its class's full name
/// `websockify.token_plugins.TokenFile` (the form much of websockify's documentation uses).
fn plugin_name(s: &str, module: &str) -> Result<String, std::convert::Infallible> {
    Ok(s.strip_prefix(module).unwrap_or(s).to_owned())
}

/// The certificate (with its key, or --key) used without --cert when it exists in the current
/// directory: websockify's default.
const DEFAULT_CERT: &str = "self.pem";

/// websockify options that are parsed so that they can be refused clearly.
#[derive(Debug, Args, Default)]
pub struct Refused {
    #[arg(long, short = 'D', hide = true)]
    daemon: bool,
    #[arg(long, hide = true)]
    run_once: bool,
    #[arg(long, hide = true)]
    timeout: Option<String>,
    #[arg(long, hide = true)]
    traffic: bool,
    #[arg(long, hide = true)]
    inetd: bool,
    #[arg(long, hide = true)]
    libserver: bool,
    #[arg(long, hide = true)]
    wrap_mode: Option<String>,
    #[arg(long, short = '6', hide = true)]
    prefer_ipv6: bool,
    #[arg(long, hide = true, value_name = "PASSWORD", num_args = 0..=1, default_missing_value = "")]
    key_password: Option<String>,
    #[arg(long, hide = true)]
    syslog: Option<String>,
    #[arg(long, hide = true)]
    legacy_syslog: bool,
    #[arg(long, hide = true)]
    ssl_ciphers: Option<String>,
    /// websockify's wrap mode: `wsbridge 6080 -- vncserver :1`.
    #[arg(last = true, hide = true, value_name = "COMMAND")]
    wrap: Vec<String>,
}

impl Refused {
    /// The first refused option given, with what to use instead.
    fn check(&self) -> Result<(), String> {
        let found: &[(bool, &str, &str)] = &[
            (
                self.daemon,
                "--daemon",
                "run wsbridge under systemd or another supervisor; it logs to stderr",
            ),
            (
                self.run_once,
                "--run-once",
                "wsbridge serves until SIGTERM; use a supervisor to stop it",
            ),
            (
                // 0 is websockify's default (serve for ever), which is what wsbridge does.
                self.timeout.as_deref().is_some_and(|t| t.trim().parse::<f64>() != Ok(0.0)),
                "--timeout",
                "wsbridge serves until SIGTERM (its --idle-timeout closes sessions that move no data, it does not exit)",
            ),
            (self.traffic, "--traffic", "use -vv (or RUST_LOG=wsbridge=trace) to see every frame"),
            (
                self.inetd,
                "--inetd",
                "let wsbridge bind its own port, or pass it a socket by systemd socket activation (SOURCE systemd:NAME)",
            ),
            (self.libserver, "--libserver", "wsbridge has one HTTP server; nothing to choose"),
            (
                self.wrap_mode.is_some(),
                "--wrap-mode",
                "wsbridge does not run programs; start the backend separately",
            ),
            (
                self.prefer_ipv6,
                "--prefer-ipv6",
                "give an IPv6 listen address such as [::]:6080; targets try every resolved address",
            ),
            (
                self.key_password.is_some(),
                "--key-password",
                "give an unencrypted key file readable only by wsbridge's user (openssl pkey -in enc.pem -out key.pem)",
            ),
            (
                self.syslog.is_some(),
                "--syslog",
                "wsbridge logs to stderr, which journald or your supervisor forwards (or to a file: --log-file FILE)",
            ),
            (
                self.legacy_syslog,
                "--legacy-syslog",
                "wsbridge logs to stderr, which journald or your supervisor forwards (or to a file: --log-file FILE)",
            ),
            (
                !self.wrap.is_empty(),
                "-- COMMAND (websockify's wrap mode)",
                "wsbridge does not run programs: start the backend separately (a systemd unit, say) and give its address as TARGET",
            ),
            (
                self.ssl_ciphers.is_some(),
                "--ssl-ciphers",
                "rustls offers only safe cipher suites; use --ssl-version tlsv1_3 to narrow further",
            ),
        ];
        match found.iter().find(|(given, _, _)| *given) {
            Some((_, name, instead)) => Err(format!("{name} is not supported: {instead}")),
            None => Ok(()),
        }
    }
}

impl RunArgs {
    /// The configuration these arguments describe: a `--config` file, or the websockify-style
    /// positionals and options.
    ///
    /// # Errors
    /// A message for the user (usage errors are exit code 64).
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let admin = self
            .admin
            .as_deref()
            .map(crate::config::admin::parse_addr)
            .transpose()
            .map_err(usage)?;
        let mut config = self.into_config_without_admin()?;
        if let Some(addr) = admin {
            // Beside --config, the address wins and the file's token and TLS stay.
            let (token, tls) = config.admin.take().map_or((None, None), |a| (a.token, a.tls));
            let admin = crate::config::admin::AdminConfig { addr, token, tls };
            admin.check().map_err(|m| usage(format!("--admin: {m}")))?;
            config.admin = Some(admin);
        }
        Ok(config)
    }

    fn into_config_without_admin(mut self) -> Result<Config, ConfigError> {
        self.refused.check().map_err(usage)?;
        if self.unix_listen.is_some() && self.config.is_none() {
            // websockify's form: `--unix-listen PATH TARGET`, with no SOURCE.
            if self.target.is_some() {
                return Err(usage(
                    "--unix-listen replaces SOURCE: give only TARGET (wsbridge --unix-listen PATH HOST:PORT)".into(),
                ));
            }
            self.target = self.source.take();
        }
        if self.threads == Some(0) {
            return Err(usage("--threads: must be at least 1".into()));
        }
        if let Some(path) = &self.config {
            return self.config_file(path);
        }
        let mut config = Config::new("command line");
        // websockify admits every origin; so does its command line here (with a warning at
        // start-up, see `Config::warnings`), unless --origin narrows it.
        config.default_origins = vec![OriginRule::Any];
        config.listeners.push(self.listener()?);
        self.apply_limits(&mut config.limits)?;
        self.apply_timeouts(&mut config.timeouts)?;
        if let Some(f) = self.log_format {
            config.log_format = log_format(f);
        }
        config.log_file = self.log_file.clone();
        let mut options = config.default_route_options();
        self.apply_route_options(&mut options, &config.listeners[0])?;
        self.add_target(&mut config, options)?;
        config.check()?;
        Ok(config)
    }

    /// `--config FILE`: everything comes from the file; beside it only the options that are not
    /// in a file (-v, --log-format, --threads) are accepted.
    fn config_file(&self, path: &Path) -> Result<Config, ConfigError> {
        // Every field named, none left to `..`: a new option does not compile until it is
        // put on one side or the other.
        let RunArgs {
            source,
            target,
            config: _,
            web,
            web_listing,
            web_follow_symlinks,
            web_dotfiles,
            file_only,
            web_auth,
            token_plugin,
            token_source,
            token_allow_target,
            token_allow_any_target,
            target_config,
            host_token,
            unix_target,
            unix_listen,
            unix_listen_mode,
            heartbeat,
            idle_timeout,
            connect_timeout,
            handshake_timeout,
            drain_delay,
            framing,
            max_message_size,
            record,
            record_max_size,
            max_connections,
            cert,
            key,
            ssl_only,
            ssl_version,
            verify_client,
            cafile,
            ssl_target,
            ssl_target_ca,
            ssl_target_name,
            ssl_target_no_verify,
            auth_plugin,
            auth_source,
            origin,
            threads: _,
            admin: _,
            verbose: _,
            log_format: _,
            log_file: _,
            refused: _,
        } = self;
        let listener_or_route_options = [
            source.is_some(),
            target.is_some(),
            web.is_some(),
            *web_listing,
            *web_follow_symlinks,
            *web_dotfiles,
            *file_only,
            *web_auth,
            token_plugin.is_some(),
            token_source.is_some(),
            !token_allow_target.is_empty(),
            *token_allow_any_target,
            target_config.is_some(),
            *host_token,
            unix_target.is_some(),
            unix_listen.is_some(),
            unix_listen_mode.is_some(),
            heartbeat.is_some(),
            idle_timeout.is_some(),
            connect_timeout.is_some(),
            handshake_timeout.is_some(),
            drain_delay.is_some(),
            framing.is_some(),
            max_message_size.is_some(),
            record.is_some(),
            record_max_size.is_some(),
            max_connections.is_some(),
            cert.is_some(),
            key.is_some(),
            *ssl_only,
            ssl_version.is_some(),
            *verify_client,
            cafile.is_some(),
            *ssl_target,
            ssl_target_ca.is_some(),
            ssl_target_name.is_some(),
            *ssl_target_no_verify,
            auth_plugin.is_some(),
            auth_source.is_some(),
            !origin.is_empty(),
        ]
        .contains(&true);
        if listener_or_route_options {
            return Err(usage(
                "--config takes everything from the file; only -v, --log-format, --log-file, --threads and --admin go beside it (put the rest in the file)"
                    .into(),
            ));
        }
        let mut config = Config::from_file(path)?;
        if let Some(f) = self.log_format {
            config.log_format = log_format(f);
        }
        if let Some(file) = &self.log_file {
            config.log_file = Some(file.clone());
        }
        Ok(config)
    }

    /// The one listener: SOURCE, its TLS and its static files.
    fn listener(&self) -> Result<ListenerConfig, ConfigError> {
        let addr = match &self.unix_listen {
            Some(path) => {
                let mode = match &self.unix_listen_mode {
                    Some(m) => parse_unix_mode(m).map_err(|e| usage(format!("--unix-listen-mode: {e}")))?,
                    None => DEFAULT_UNIX_MODE,
                };
                if cfg!(windows) {
                    return Err(usage("--unix-listen: unix socket listeners are not available on Windows".into()));
                }
                ListenOn::Unix { path: path.clone(), mode }
            }
            None => {
                let source = self.source.clone().ok_or_else(|| {
                    usage("missing SOURCE: give [source_addr:]source_port, or --config FILE (try `wsbridge demo` for a quick look)".into())
                })?;
                websockify_source(&source).parse::<ListenOn>().map_err(usage)?
            }
        };
        if matches!(addr, ListenOn::Unix { .. }) && (self.cert.is_some() || self.ssl_only) {
            return Err(usage(
                "--unix-listen: TLS is for TCP listeners; let the proxy in front of the unix socket terminate TLS".into(),
            ));
        }
        let tls = self.tls_settings().map_err(usage)?;
        if let Some(web) = &self.web {
            if !web.is_dir() {
                return Err(usage(format!("--web {}: not a directory", web.display())));
            }
        }
        let access = crate::config::policy::ListenerAccess {
            web_auth: self.web_auth()?,
            ..Default::default()
        };
        Ok(ListenerConfig {
            addr,
            web: self.web.clone(),
            web_listing: self.web_listing,
            web_follow_symlinks: self.web_follow_symlinks,
            web_dotfiles: self.web_dotfiles,
            ipv6_only: None,
            access,
            tls,
        })
    }

    /// `--web-auth`: the static files ask what the upgrade does, as websockify's do. It needs
    /// --web and an auth plugin that a page load can pass (websockify refuses it without one).
    fn web_auth(&self) -> Result<Option<crate::config::policy::WebAuth>, ConfigError> {
        if !self.web_auth {
            return Ok(None);
        }
        if self.web.is_none() {
            return Err(usage("--web-auth protects the files of --web DIR: give --web".into()));
        }
        let source = self.auth_source.clone();
        let mut web = crate::config::policy::WebAuth::default();
        match self.auth_plugin.as_deref() {
            None => {
                return Err(usage(
                    "--web-auth needs --auth-plugin BasicHTTPAuth (a password, which the browser asks for) or ClientCertCNAuth \
                     (client certificates): it applies the upgrade's check to the static files"
                        .into(),
                ))
            }
            Some("ExpectOrigin") => {
                return Err(usage(
                    "--web-auth with --auth-plugin ExpectOrigin would refuse every page load (browsers send no Origin when \
                     they load a page): use BasicHTTPAuth or ClientCertCNAuth, or leave --web-auth out"
                        .into(),
                ))
            }
            Some("BasicHTTPAuth") => web.auth = source.map(AuthSettings::BasicUser),
            Some("ClientCertCNAuth") => {
                web.client_cn = source.map(|names| names.split([' ', ',']).filter(|n| !n.is_empty()).map(str::to_owned).collect())
            }
            // Refused with the plugin's own message (see `client_cn`).
            Some(_) => {}
        }
        Ok(Some(web))
    }

    /// --max-connections and --max-message-size.
    fn apply_limits(&self, limits: &mut Limits) -> Result<(), ConfigError> {
        if let Some(n) = self.max_connections {
            if n == 0 {
                return Err(usage(
                    "--max-connections: must be at least 1 (0 would refuse every connection)".into(),
                ));
            }
            limits.max_connections = n;
        }
        if let Some(s) = &self.max_message_size {
            limits.max_message_size = parse_message_size(s).map_err(|e| usage(format!("--max-message-size: {e}")))?;
        }
        Ok(())
    }

    /// --heartbeat, --idle-timeout (websockify's seconds) and --connect-timeout,
    /// --handshake-timeout, --drain-delay (durations as the TOML file writes them).
    fn apply_timeouts(&self, timeouts: &mut Timeouts) -> Result<(), ConfigError> {
        if let Some(h) = self.heartbeat {
            match seconds_or_off("--heartbeat", h)? {
                Some(d) => {
                    timeouts.ping_interval = Some(d);
                    timeouts.pong_timeout = d;
                }
                None => timeouts.ping_interval = None,
            }
        }
        if let Some(i) = self.idle_timeout {
            timeouts.idle = seconds_or_off("--idle-timeout", i)?;
        }
        if let Some(c) = &self.connect_timeout {
            timeouts.connect = positive_duration("--connect-timeout", c)?;
        }
        if let Some(h) = &self.handshake_timeout {
            timeouts.handshake = positive_duration("--handshake-timeout", h)?;
        }
        if let Some(d) = &self.drain_delay {
            timeouts.drain_delay = match d.trim() {
                "off" => None,
                d => Some(parse_duration(d).map_err(|e| usage(format!("--drain-delay: {e}")))?).filter(|d| !d.is_zero()),
            };
        }
        Ok(())
    }

    /// The route's framing, backend TLS and client-certificate allow-list.
    fn apply_route_options(&self, options: &mut RouteOptions, listener: &ListenerConfig) -> Result<(), ConfigError> {
        if let Some(f) = self.framing {
            options.framing = match f {
                FramingArg::Binary => Framing::Binary,
                FramingArg::Text => Framing::Text,
                FramingArg::Lines => Framing::Lines,
            };
        }
        options.backend_tls = self.backend_tls_settings().map_err(usage)?;
        options.client_cn = self.client_cn(listener)?;
        if let Some(prefix) = &self.record {
            let max_size = match &self.record_max_size {
                Some(m) => Some(crate::config::parse_message_size(m).map_err(|e| usage(format!("--record-max-size: {e}")))?),
                None => None,
            };
            options.record = Some(
                crate::config::record_settings(prefix.clone(), max_size)
                    .map_err(|(field, e)| usage(format!("--{}: {e}", field.replace('_', "-"))))?,
            );
        }
        let mut origins = self
            .origin
            .iter()
            .map(|o| o.parse::<OriginRule>().map_err(|e| usage(format!("--origin: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        match (self.auth_plugin.as_deref(), &self.auth_source) {
            (Some("ExpectOrigin"), Some(list)) => {
                for o in list.split([' ', ',']).filter(|o| !o.is_empty()) {
                    origins.push(o.parse().map_err(|e| usage(format!("--auth-source: {e}")))?);
                }
                // websockify's plugin refuses a request without an Origin too.
                options.policy.require_origin = true;
            }
            (Some("ExpectOrigin"), None) => return Err(usage("--auth-plugin ExpectOrigin needs --auth-source \"ORIGIN …\"".into())),
            (Some("BasicHTTPAuth"), Some(user_pass)) => {
                crate::policy::auth::BasicUsers::single(user_pass).map_err(|e| usage(format!("--auth-source: {e}")))?;
                options.policy.auth = Some(AuthSettings::BasicUser(user_pass.clone()));
            }
            (Some("BasicHTTPAuth"), None) => return Err(usage("--auth-plugin BasicHTTPAuth needs --auth-source USER:PASSWORD".into())),
            _ => {}
        }
        if !origins.is_empty() {
            options.policy.origins = Some(origins);
        }
        Ok(())
    }

    /// websockify's ClientCertCNAuth: the common names allowed, when asked for.
    fn client_cn(&self, listener: &ListenerConfig) -> Result<Option<Vec<String>>, ConfigError> {
        Ok(match (self.auth_plugin.as_deref(), &self.auth_source) {
            (None, None) | (Some("ExpectOrigin" | "BasicHTTPAuth"), _) => None,
            (Some("ClientCertCNAuth"), Some(names)) => {
                if listener.tls.as_ref().and_then(|t| t.client_ca.as_ref()).is_none() {
                    return Err(usage(
                        "--auth-plugin ClientCertCNAuth needs client certificates: add --cert, --verify-client and --cafile".into(),
                    ));
                }
                Some(names.split([' ', ',']).filter(|n| !n.is_empty()).map(str::to_owned).collect())
            }
            (Some("ClientCertCNAuth"), None) => return Err(usage("--auth-plugin ClientCertCNAuth needs --auth-source \"CN1 CN2\"".into())),
            (None, Some(_)) => return Err(usage("--auth-source needs --auth-plugin".into())),
            (Some(other), _) => {
                return Err(usage(format!(
                    "--auth-plugin {other} is not supported: ClientCertCNAuth, BasicHTTPAuth and ExpectOrigin are; bearer tokens, \
                     htpasswd files and JWTs are set per route in a configuration file (auth = {{ … }})"
                )))
            }
        })
    }

    /// The token file or directory from --token-plugin/--token-source or --target-config.
    fn token_source(&self) -> Result<Option<PathBuf>, ConfigError> {
        Ok(match (self.token_plugin.as_deref(), &self.token_source, &self.target_config) {
            (_, Some(_), Some(_)) => return Err(usage("give --token-source or --target-config, not both".into())),
            (
                None
                | Some(
                    "TokenFile" | "ReadOnlyTokenFile" | "TokenFileName" | "UnixDomainSocketDirectory" | "JWTTokenApi" | "TokenRedis"
                    | "JSONTokenApi" | "BaseTokenAPI",
                ),
                Some(s),
                None,
            )
            | (None, None, Some(s)) => {
                Some(s.clone())
            }
            (Some("JWTTokenApi"), None, None) => return Err(usage("--token-plugin JWTTokenApi needs --token-source KEYFILE".into())),
            (Some("TokenRedis"), None, _) => {
                return Err(usage(
                    "--token-plugin TokenRedis needs --token-source host[:port[:db[:password[:namespace]]]]".into(),
                ))
            }
            (Some("TokenFile" | "ReadOnlyTokenFile"), None, None) => return Err(usage("--token-plugin TokenFile needs --token-source FILE|DIR".into())),
            (Some("TokenFileName"), None, _) => return Err(usage("--token-plugin TokenFileName needs --token-source DIR".into())),
            (Some(plugin @ ("JSONTokenApi" | "BaseTokenAPI")), None, _) => {
                return Err(usage(format!(
                    "--token-plugin {plugin} needs --token-source URL, with %s where the token goes (http://api.internal/lookup?token=%s)"
                )))
            }
            (Some("UnixDomainSocketDirectory"), None, _) => {
                return Err(usage("--token-plugin UnixDomainSocketDirectory needs --token-source DIR".into()))
            }
            (Some(other), _, _) => {
                return Err(usage(format!(
                    "--token-plugin {other} is not supported: use TokenFile with --token-source (a file or directory of `TOKEN: HOST:PORT` lines), TokenFileName, UnixDomainSocketDirectory, JWTTokenApi, TokenRedis, JSONTokenApi or BaseTokenAPI"
                )))
            }
            (None, None, None) => None,
        })
    }

    /// Where sessions go: exactly one of TARGET, --unix-target and a token source, with `options`.
    fn add_target(self, config: &mut Config, options: RouteOptions) -> Result<(), ConfigError> {
        let token_source = self.token_source()?;
        let targets = [self.target.is_some(), self.unix_target.is_some(), token_source.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if targets != 1 {
            return Err(usage(if targets == 0 {
                "missing TARGET: give target_addr:target_port, --unix-target PATH or --token-source FILE".into()
            } else {
                "give only one of TARGET, --unix-target and --token-source".into()
            }));
        }
        let jwt = self.jwt_token_source(token_source.as_deref())?;
        let redis = self.redis_token_source(token_source.as_deref())?;
        let api = self.api_token_source(token_source.as_deref())?;
        let format = match self.token_plugin.as_deref() {
            Some("TokenFileName") => TokenFormat::FileNames,
            Some("UnixDomainSocketDirectory") if cfg!(windows) => {
                return Err(usage(format!(
                    "--token-plugin UnixDomainSocketDirectory: {}",
                    crate::platform::UNIX_SOCKETS_UNAVAILABLE
                )))
            }
            Some("UnixDomainSocketDirectory") => TokenFormat::UnixSockets,
            _ => TokenFormat::Lines,
        };
        if let Some(path) = token_source {
            let path = match (&redis, &api) {
                (Some(r), _) => PathBuf::from(r.name()),
                (_, Some(a)) => PathBuf::from(a.name()),
                _ => match std::fs::metadata(&path) {
                    Err(e) => return Err(usage(format!("--token-source {}: {e}", path.display()))),
                    Ok(m) if format == TokenFormat::FileNames && !m.is_dir() => {
                        return Err(usage(format!(
                            "--token-source {}: {}: give the directory whose file names are the tokens",
                            path.display(),
                            crate::tokens::FILE_NAMES_NEED_A_DIRECTORY
                        )))
                    }
                    Ok(m) if format == TokenFormat::UnixSockets && !m.is_dir() => {
                        return Err(usage(format!(
                            "--token-source {}: {}: give the directory whose unix sockets are named by their tokens",
                            path.display(),
                            crate::tokens::SOCKETS_NEED_A_DIRECTORY
                        )))
                    }
                    Ok(_) => path,
                },
            };
            let lookup = if self.host_token { TokenLookup::Host } else { TokenLookup::Query };
            if jwt.is_some() && self.host_token {
                return Err(usage(
                    "--host-token does not go with JWTTokenApi: its tokens come from ?token=".into(),
                ));
            }
            config.token_sources.push(TokenSourceConfig {
                path,
                jwt,
                redis,
                api,
                lookup,
                format,
                options,
            });
        } else {
            if self.host_token {
                return Err(usage("--host-token needs --token-source".into()));
            }
            let target = match (self.target, self.unix_target) {
                (Some(t), _) => t.parse::<Target>().map_err(usage)?,
                (None, Some(_)) if self.ssl_target => return Err(usage("--ssl-target is for TCP targets, not --unix-target".into())),
                (None, Some(_)) if cfg!(windows) => {
                    return Err(usage(format!("--unix-target: {}", crate::platform::UNIX_SOCKETS_UNAVAILABLE)))
                }
                (None, Some(p)) => Target::Unix(p),
                (None, None) => unreachable!("counted above"),
            };
            config.routes.push(RouteConfig {
                matcher: Matcher::AnyPath,
                target,
                options,
            });
        }
        Ok(())
    }
}

impl RunArgs {
    /// websockify's JWTTokenApi: tokens are JWTs checked with the key in `key` (a PEM public key,
    /// else a file holding an HMAC secret), naming a target on --jwt-allow-target. As in
    /// websockify, `exp` is checked when present and not required.
    fn jwt_token_source(&self, key: Option<&Path>) -> Result<Option<crate::config::policy::JwtTokenSource>, ConfigError> {
        if self.token_plugin.as_deref() != Some("JWTTokenApi") {
            if !self.token_allow_target.is_empty() && !self.plugin_answers_with_targets() {
                return Err(usage(
                    "--token-allow-target (--jwt-allow-target) goes with --token-plugin JWTTokenApi, TokenRedis, JSONTokenApi or BaseTokenAPI"
                        .into(),
                ));
            }
            return Ok(None);
        }
        if self.token_allow_any_target {
            return Err(usage(
                "--token-allow-any-target is for TokenRedis; a JWTTokenApi token may name only targets on --jwt-allow-target".into(),
            ));
        }
        let Some(key) = key else { return Ok(None) };
        if self.token_allow_target.is_empty() {
            return Err(usage(
                "--token-plugin JWTTokenApi needs --jwt-allow-target RULE (e.g. 10.0.0.0/8:5900-5999): a token may name only targets listed there"
                    .into(),
            ));
        }
        let allow_targets = self.allow_targets()?;
        let text = std::fs::read(key).map_err(|e| usage(format!("--token-source {}: {e}", key.display())))?;
        let keys = if text.windows(10).any(|w| w == b"-----BEGIN") {
            crate::policy::jwt::KeySource::Pem(key.to_path_buf())
        } else {
            crate::policy::jwt::KeySource::Secret(key.to_path_buf())
        };
        Ok(Some(crate::config::policy::JwtTokenSource {
            jwt: crate::policy::jwt::JwtSettings {
                keys,
                algorithms: Vec::new(),
                issuers: Vec::new(),
                audiences: Vec::new(),
                leeway: crate::config::policy::DEFAULT_JWT_LEEWAY,
                require_exp: false,
            },
            allow_targets,
        }))
    }

    /// --token-allow-target's rules.
    fn allow_targets(&self) -> Result<Vec<crate::policy::targets::TargetRule>, ConfigError> {
        self.token_allow_target
            .iter()
            .map(|r| r.parse().map_err(|e| usage(format!("--token-allow-target: {e}"))))
            .collect()
    }

    /// websockify's TokenRedis: `source` is `host[:port[:db[:password[:namespace]]]]`, and the
    /// values may name only targets on --token-allow-target, unless --token-allow-any-target.
    fn redis_token_source(&self, source: Option<&Path>) -> Result<Option<crate::config::redis::RedisTokenSource>, ConfigError> {
        if self.token_plugin.as_deref() != Some("TokenRedis") {
            if self.token_allow_any_target && !self.plugin_answers_with_targets() {
                return Err(usage(
                    "--token-allow-any-target goes with --token-plugin TokenRedis, JSONTokenApi or BaseTokenAPI".into(),
                ));
            }
            return Ok(None);
        }
        let Some(source) = source else { return Ok(None) };
        let text = source.to_str().ok_or_else(|| usage("--token-source: not UTF-8".into()))?;
        let mut redis = crate::config::redis::parse_websockify_source(text).map_err(|e| usage(format!("--token-source: {e}")))?;
        redis.allow_targets = self.answers_allowed("TokenRedis", "a value in Redis", "can write to Redis")?;
        Ok(Some(redis))
    }

    /// Whether the token plugin's tokens name their targets, which then must be on
    /// --token-allow-target (JWTTokenApi), or on it unless --token-allow-any-target (TokenRedis,
    /// JSONTokenApi, BaseTokenAPI).
    fn plugin_answers_with_targets(&self) -> bool {
        matches!(
            self.token_plugin.as_deref(),
            Some("JWTTokenApi" | "TokenRedis" | "JSONTokenApi" | "BaseTokenAPI")
        )
    }

    /// The allow-list of a source whose answers name targets: --token-allow-target's rules, or
    /// any target with --token-allow-any-target; one of them is required.
    fn answers_allowed(&self, plugin: &str, what: &str, who: &str) -> Result<Option<Vec<crate::policy::targets::TargetRule>>, ConfigError> {
        match (self.token_allow_target.is_empty(), self.token_allow_any_target) {
            (false, false) => Ok(Some(self.allow_targets()?)),
            (true, true) => Ok(None),
            (false, true) => Err(usage("give --token-allow-target or --token-allow-any-target, not both".into())),
            (true, false) => Err(usage(format!(
                "--token-plugin {plugin} needs --token-allow-target RULE (e.g. 10.0.0.0/8:5900-5999), repeatable: {what} \
                 may name only targets listed there, so that whoever {who} cannot reach anything else; \
                 --token-allow-any-target lets it name any, as websockify does"
            ))),
        }
    }

    /// websockify's JSONTokenApi (JSON answers) and BaseTokenAPI (`host:port` text): `source`
    /// is the URL with `%s` where the token goes, and the answers may name only targets on
    /// --token-allow-target, unless --token-allow-any-target.
    fn api_token_source(&self, source: Option<&Path>) -> Result<Option<crate::config::api::ApiTokenSource>, ConfigError> {
        use crate::config::api::{ApiFormat, ApiTokenSource};
        let (plugin, format) = match self.token_plugin.as_deref() {
            Some("JSONTokenApi") => ("JSONTokenApi", ApiFormat::Json),
            Some("BaseTokenAPI") => ("BaseTokenAPI", ApiFormat::Text),
            _ => return Ok(None),
        };
        let Some(source) = source else { return Ok(None) };
        let text = source.to_str().ok_or_else(|| usage("--token-source: not UTF-8".into()))?;
        let url = text.parse().map_err(|e| usage(format!("--token-source: {e}")))?;
        let mut api = ApiTokenSource::new(url, format);
        api.allow_targets = self.answers_allowed(plugin, "an answer of the API", "controls the API's answers")?;
        Ok(Some(api))
    }

    /// --ssl-version, with websockify's `default` (its default value: the TLS library's
    /// minimum, here TLS 1.2) read as not given.
    fn ssl_version(&self) -> Option<&str> {
        self.ssl_version.as_deref().filter(|v| *v != "default")
    }

    /// The listener's TLS from --cert/--key/--ssl-only/--ssl-version/--verify-client/--cafile.
    fn tls_settings(&self) -> Result<Option<TlsSettings>, String> {
        // websockify's --cert defaults to `self.pem` in the current directory, used when it exists
        // (its README has users make one there with `openssl req … -out self.pem -keyout
        // self.pem`); not for a unix socket listener, where TLS is refused.
        let default_cert = Path::new(DEFAULT_CERT);
        let default_cert = (self.unix_listen.is_none() && default_cert.is_file()).then(|| default_cert.to_path_buf());
        let Some(cert) = self.cert.as_ref().or(default_cert.as_ref()) else {
            if self.key.is_some() || self.ssl_only || self.verify_client || self.cafile.is_some() || self.ssl_version().is_some() {
                return Err(format!(
                    "--key, --ssl-only, --ssl-version, --verify-client and --cafile need --cert FILE (or {DEFAULT_CERT} in the current directory, as in websockify)"
                ));
            }
            return Ok(None);
        };
        let min_version = match self.ssl_version() {
            None | Some("tlsv1_2") => MinVersion::Tls12,
            Some("tlsv1_3") => MinVersion::Tls13,
            Some(v @ ("tlsv1" | "tlsv1_1")) => {
                return Err(format!(
                    "--ssl-version {v} is not supported: TLS below 1.2 is insecure; use tlsv1_2"
                ))
            }
            Some(other) => return Err(format!("--ssl-version {other}: expected tlsv1_2 or tlsv1_3")),
        };
        if self.cafile.is_some() && !self.verify_client {
            return Err("--cafile is for client certificates: add --verify-client".into());
        }
        let client_ca = match (self.verify_client, &self.cafile) {
            (true, None) => return Err("--verify-client needs --cafile FILE (the CA that signs client certificates)".into()),
            (true, Some(ca)) => Some(ca.clone()),
            (false, _) => None,
        };
        Ok(Some(TlsSettings {
            only: self.ssl_only,
            min_version,
            client_ca,
            ..TlsSettings::new(CertFiles {
                cert: cert.clone(),
                key: self.key.clone(),
            })
        }))
    }

    /// The target's TLS from --ssl-target and its companions.
    fn backend_tls_settings(&self) -> Result<Option<BackendTlsSettings>, String> {
        if !self.ssl_target {
            if self.ssl_target_ca.is_some() || self.ssl_target_name.is_some() || self.ssl_target_no_verify {
                return Err("--ssl-target-ca, --ssl-target-name and --ssl-target-no-verify need --ssl-target".into());
            }
            return Ok(None);
        }
        Ok(Some(BackendTlsSettings {
            server_name: self.ssl_target_name.clone(),
            ca: self.ssl_target_ca.clone(),
            insecure_skip_verify: self.ssl_target_no_verify,
        }))
    }
}

/// websockify's seconds (--heartbeat, --idle-timeout), where 0 means off as it does there, so that
/// flags copied from a websockify setup keep working.
fn seconds_or_off(name: &str, v: f64) -> Result<Option<Duration>, ConfigError> {
    if v == 0.0 {
        return Ok(None);
    }
    let d = Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| usage(format!("{name}: expected a positive number of seconds, or 0 for off")))?;
    at_most_a_year(d).map(Some).map_err(|e| usage(format!("{name}: {e}")))
}

/// A deadline that cannot be off (--connect-timeout, --handshake-timeout): zero would fail every
/// connection, so it is refused, as the TOML file refuses it.
fn positive_duration(name: &str, s: &str) -> Result<Duration, ConfigError> {
    match parse_duration(s) {
        Ok(d) if d.is_zero() => Err(usage(format!("{name}: must be greater than zero"))),
        Ok(d) => Ok(d),
        Err(e) => Err(usage(format!("{name}: {e}"))),
    }
}

/// A usage error: the command line is wrong (exit code 64).
fn usage(message: String) -> ConfigError {
    ConfigError::Invalid {
        file: "command line".into(),
        line: None,
        field: "arguments".into(),
        message,
    }
}

fn log_format(f: LogFormatArg) -> LogFormat {
    match f {
        LogFormatArg::Text => LogFormat::Text,
        LogFormatArg::Json => LogFormat::Json,
    }
}

/// `--heartbeat` / `--idle-timeout`: seconds, as websockify takes them (`600`, `0.5`), or a
/// duration as a configuration file writes one (`10m`).
fn seconds(s: &str) -> Result<f64, String> {
    if let Ok(n) = s.trim().parse::<f64>() {
        return Ok(n);
    }
    crate::config::parse_duration(s)
        .map(|d| d.as_secs_f64())
        .map_err(|_| format!("expected seconds (600, 0.5) or a duration (10m, 30s, 1h), not {s:?}"))
}

/// SOURCE as websockify reads it: split at its last colon, so an IPv6 address may go without
/// brackets (`::1:6080` is `[::1]:6080`), as it may in TARGET.
fn websockify_source(source: &str) -> std::borrow::Cow<'_, str> {
    match source.rsplit_once(':') {
        Some((host, port)) if host.parse::<std::net::Ipv6Addr>().is_ok() && port.parse::<u16>().is_ok() => {
            format!("[{host}]:{port}").into()
        }
        _ => source.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--idle-timeout` and `--heartbeat` take seconds, as websockify's, or a duration; anything
    /// else is refused with what to write (it said "invalid float literal").
    #[test]
    fn seconds_or_a_duration() {
        let c = config(&["6080", "h:1", "--idle-timeout", "10m", "--heartbeat", "30"]).unwrap();
        assert_eq!(c.timeouts.idle, Some(Duration::from_secs(600)));
        assert_eq!(c.timeouts.ping_interval, Some(Duration::from_secs(30)));
        let c = config(&["6080", "h:1", "--idle-timeout", "600", "--heartbeat", "1m"]).unwrap();
        assert_eq!(c.timeouts.idle, Some(Duration::from_secs(600)));
        let e = config(&["6080", "h:1", "--idle-timeout", "ten"]).unwrap_err();
        assert!(e.contains("expected seconds (600, 0.5) or a duration (10m, 30s, 1h)"), "{e}");
    }

    /// SOURCE may be an IPv6 address without brackets, split at its last colon, as websockify
    /// and TARGET take it (a newcomer's side-by-side run: websockify took `::1:6080`, wsbridge
    /// refused it).
    #[test]
    fn an_ipv6_source_may_go_without_brackets() {
        for source in ["::1:6080", "[::1]:6080"] {
            let c = config(&[source, "h:1"]).unwrap();
            assert_eq!(c.listeners[0].addr, ListenOn::Tcp("[::1]:6080".parse().unwrap()), "{source}");
        }
        let c = config(&["127.0.0.1:6080", "h:1"]).unwrap();
        assert_eq!(c.listeners[0].addr, ListenOn::Tcp("127.0.0.1:6080".parse().unwrap()));
        // Split at the last colon, as websockify does: `:::6080` is every address's port 6080.
        let c = config(&[":::6080", "h:1"]).unwrap();
        assert_eq!(c.listeners[0].addr, ListenOn::Tcp("[::]:6080".parse().unwrap()));
    }

    fn config(args: &[&str]) -> Result<Config, String> {
        let cli = Cli::try_parse_from(std::iter::once("wsbridge").chain(args.iter().copied())).map_err(|e| e.to_string())?;
        cli.run.into_config().map_err(|e| e.to_string())
    }

    /// `wsbridge agent -v`: the agent's own verbosity (before the subcommand, `-v` would make
    /// `agent` a positional of the bridge's command line).
    #[test]
    fn the_agent_takes_v_for_its_logging() {
        let cli = Cli::try_parse_from(["wsbridge", "agent", "-vv", "--config", "agent.toml"]).unwrap();
        match cli.command {
            Some(Command::Agent(args)) => assert_eq!(args.verbose, 2),
            _ => panic!("not the agent"),
        }
    }

    #[test]
    fn unix_listen_and_systemd_sources() {
        let c = config(&["--unix-listen", "/run/ws.sock", "localhost:5900"]).unwrap();
        assert_eq!(
            c.listeners[0].addr,
            ListenOn::Unix {
                path: "/run/ws.sock".into(),
                mode: 0o600
            }
        );
        assert_eq!(
            c.routes[0].target,
            Target::Tcp {
                host: "localhost".into(),
                port: 5900
            }
        );
        let c = config(&[
            "--unix-listen",
            "/run/ws.sock",
            "--unix-listen-mode",
            "0660",
            "--unix-target",
            "/run/vnc.sock",
        ])
        .unwrap();
        assert!(matches!(c.listeners[0].addr, ListenOn::Unix { mode: 0o660, .. }));
        let e = config(&["--unix-listen", "/run/ws.sock", "h:1", "--cert", "c.pem"]).unwrap_err();
        assert!(e.contains("TLS is for TCP listeners"), "{e}");
        let e = config(&["--unix-listen", "/run/ws.sock", "--config", "x.toml"]).unwrap_err();
        assert!(e.contains("--config takes everything from the file"), "{e}");
        let c = config(&["systemd:web", "h:1"]).unwrap();
        assert_eq!(c.listeners[0].addr, ListenOn::Systemd("web".into()));
    }

    #[test]
    fn admin_address_on_the_command_line() {
        let c = config(&["6080", "h:1", "--admin", "9100"]).unwrap();
        assert_eq!(c.admin.unwrap().addr, "127.0.0.1:9100".parse().unwrap());
        assert!(config(&["6080", "h:1"]).unwrap().admin.is_none(), "off by default");
        let e = config(&["6080", "h:1", "--admin", "0.0.0.0:9100"]).unwrap_err();
        assert!(e.contains("--admin: 0.0.0.0:9100 is not a loopback address"), "{e}");
        let e = config(&["6080", "h:1", "--admin", "nowhere"]).unwrap_err();
        assert!(e.contains("invalid admin address"), "{e}");
    }

    #[test]
    fn websockify_positionals() {
        let c = config(&["6080", "localhost:5900"]).unwrap();
        assert_eq!(c.listeners[0].addr, "0.0.0.0:6080".parse().unwrap());
        assert_eq!(c.routes[0].matcher, Matcher::AnyPath);
        assert_eq!(
            c.routes[0].target,
            Target::Tcp {
                host: "localhost".into(),
                port: 5900
            }
        );
        let c = config(&["[::1]:6080", "[::1]:5900", "--heartbeat", "15", "-v"]).unwrap();
        assert_eq!(c.listeners[0].addr, "[::1]:6080".parse().unwrap());
        assert_eq!(c.timeouts.ping_interval, Some(std::time::Duration::from_secs(15)));
        let e = config(&["6080", "h:1", "--heartbeat", "1e12"]).unwrap_err();
        assert!(e.contains("--heartbeat") && e.contains("more than a year"), "{e}");
    }

    #[test]
    fn options_after_positionals() {
        let c = config(&["127.0.0.1:6080", "--unix-target", "/tmp/vnc.sock", "--idle-timeout", "30"]).unwrap();
        assert_eq!(c.routes[0].target, Target::Unix("/tmp/vnc.sock".into()));
        assert_eq!(c.timeouts.idle, Some(std::time::Duration::from_secs(30)));
    }

    #[test]
    fn refused_options_say_what_instead() {
        let e = config(&["6080", "h:1", "--daemon"]).unwrap_err();
        assert!(e.contains("--daemon is not supported") && e.contains("systemd"), "{e}");
        let e = config(&["6080", "h:1", "--timeout", "60"]).unwrap_err();
        assert!(e.contains("--timeout is not supported") && e.contains("--idle-timeout"), "{e}");
        assert!(config(&["6080", "h:1", "--timeout", "0"]).is_ok());
        // websockify's default --ssl-version, with or without a certificate.
        assert!(config(&["6080", "h:1", "--ssl-version", "default"]).is_ok());
        let c = config(&["6080", "h:1", "--cert", "c.pem", "--ssl-version", "default"]).unwrap();
        assert_eq!(c.listeners[0].tls.as_ref().unwrap().min_version, MinVersion::Tls12);
        let e = config(&["6080", "--token-plugin", "TokenMagic", "--token-source", "x"]).unwrap_err();
        assert!(e.contains("TokenMagic is not supported") && e.contains("TokenRedis"), "{e}");
    }

    #[test]
    fn json_token_api_and_base_token_api_take_a_url_and_an_allow_list() {
        use crate::config::api::ApiFormat;
        let url = "http://api.internal/lookup?token=%s";
        for (plugin, format) in [
            ("JSONTokenApi", ApiFormat::Json),
            ("websockify.token_plugins.JSONTokenApi", ApiFormat::Json),
            ("BaseTokenAPI", ApiFormat::Text),
            ("websockify.token_plugins.BaseTokenAPI", ApiFormat::Text),
        ] {
            let c = config(&[
                "6080",
                "--token-plugin",
                plugin,
                "--token-source",
                url,
                "--token-allow-target",
                "10.0.0.0/8:5900",
            ])
            .unwrap();
            let s = &c.token_sources[0];
            let api = s.api.as_ref().unwrap();
            assert_eq!((api.format, api.url.template.as_str()), (format, url), "{plugin}");
            assert_eq!(api.allow_targets.as_ref().unwrap()[0].to_string(), "10.0.0.0/8:5900");
            assert_eq!(s.path, Path::new(url));
            assert!(s.redis.is_none() && s.jwt.is_none());
        }
        let c = config(&[
            "6080",
            "--token-plugin",
            "JSONTokenApi",
            "--token-source",
            url,
            "--token-allow-any-target",
            "--host-token",
        ])
        .unwrap();
        let s = &c.token_sources[0];
        assert!(s.api.as_ref().unwrap().allow_targets.is_none());
        assert_eq!(s.lookup, TokenLookup::Host);
        for (args, says) in [
            (
                vec!["--token-plugin", "JSONTokenApi", "--token-source", url],
                "JSONTokenApi needs --token-allow-target",
            ),
            (
                vec![
                    "--token-plugin",
                    "BaseTokenAPI",
                    "--token-source",
                    url,
                    "--token-allow-target",
                    "10.0.0.0/8:1",
                    "--token-allow-any-target",
                ],
                "not both",
            ),
            (vec!["--token-plugin", "JSONTokenApi"], "JSONTokenApi needs --token-source URL"),
            (
                vec![
                    "--token-plugin",
                    "JSONTokenApi",
                    "--token-source",
                    "http://h/lookup",
                    "--token-allow-any-target",
                ],
                "has no %s",
            ),
            (
                vec![
                    "--token-plugin",
                    "BaseTokenAPI",
                    "--token-source",
                    "redis.internal:6379",
                    "--token-allow-any-target",
                ],
                "not an http:// or https:// URL",
            ),
        ] {
            let e = config(&[&["6080"][..], &args].concat()).unwrap_err();
            assert!(e.contains(says), "{args:?}: {e}");
        }
    }

    #[test]
    #[cfg(unix)]
    fn unix_domain_socket_directory_takes_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        for plugin in ["UnixDomainSocketDirectory", "websockify.token_plugins.UnixDomainSocketDirectory"] {
            let c = config(&["6080", "--token-plugin", plugin, "--token-source", d]).unwrap();
            let s = &c.token_sources[0];
            assert_eq!((s.format, s.lookup), (TokenFormat::UnixSockets, TokenLookup::Query));
        }
        let file = dir.path().join("desk1");
        std::fs::write(&file, "").unwrap();
        let e = config(&[
            "6080",
            "--token-plugin",
            "UnixDomainSocketDirectory",
            "--token-source",
            file.to_str().unwrap(),
        ])
        .unwrap_err();
        assert!(
            e.contains("UnixDomainSocketDirectory plugin requires a directory") && e.contains("desk1"),
            "{e}"
        );
        let e = config(&["6080", "--token-plugin", "UnixDomainSocketDirectory"]).unwrap_err();
        assert!(e.contains("UnixDomainSocketDirectory needs --token-source DIR"), "{e}");
    }

    #[test]
    fn token_file_name_takes_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        for plugin in ["TokenFileName", "websockify.token_plugins.TokenFileName"] {
            let c = config(&["6080", "--token-plugin", plugin, "--token-source", d]).unwrap();
            let s = &c.token_sources[0];
            assert_eq!((s.format, s.lookup), (TokenFormat::FileNames, TokenLookup::Query));
        }
        let c = config(&["6080", "--token-plugin", "TokenFileName", "--token-source", d, "--host-token"]).unwrap();
        assert_eq!(c.token_sources[0].lookup, TokenLookup::Host);
        let c = config(&["6080", "--token-plugin", "TokenFile", "--token-source", d]).unwrap();
        assert_eq!(c.token_sources[0].format, TokenFormat::Lines);
        let file = dir.path().join("desk1");
        std::fs::write(&file, "127.0.0.1:1").unwrap();
        let e = config(&["6080", "--token-plugin", "TokenFileName", "--token-source", file.to_str().unwrap()]).unwrap_err();
        assert!(
            e.contains("TokenFileName plugin requires a directory") && e.contains("desk1"),
            "{e}"
        );
        let e = config(&["6080", "--token-plugin", "TokenFileName"]).unwrap_err();
        assert!(e.contains("TokenFileName needs --token-source DIR"), "{e}");
    }

    #[test]
    fn token_redis_as_websockify_spells_it_with_an_allow_list() {
        let redis = |extra: &[&str]| {
            config(
                &[
                    &[
                        "6080",
                        "--token-plugin",
                        "TokenRedis",
                        "--token-source",
                        "redis.internal:6380:2:pw:vnc",
                    ][..],
                    extra,
                ]
                .concat(),
            )
        };
        let c = redis(&[
            "--token-allow-target",
            "10.0.0.0/8:5900-5999",
            "--jwt-allow-target",
            "vnc.internal:5901",
        ])
        .unwrap();
        let s = &c.token_sources[0];
        let r = s.redis.as_ref().unwrap();
        assert_eq!(r.server.to_string(), "redis://redis.internal:6380/2");
        assert_eq!(r.credentials.as_ref().unwrap().password, "pw");
        assert_eq!(r.key_prefix, "vnc:");
        assert_eq!(r.allow_targets.as_ref().unwrap().len(), 2);
        assert_eq!(s.lookup, TokenLookup::Query);
        assert!(
            !s.path.to_string_lossy().contains("pw"),
            "the name holds no password: {}",
            s.path.display()
        );
        let c = redis(&["--token-allow-any-target", "--host-token"]).unwrap();
        assert_eq!(c.token_sources[0].redis.as_ref().unwrap().allow_targets, None);
        assert_eq!(c.token_sources[0].lookup, TokenLookup::Host);
        for (args, want) in [
            (&[][..], "needs --token-allow-target"),
            (&["--token-allow-target", "10.0.0.0/8:1", "--token-allow-any-target"], "not both"),
            (&["--token-allow-target", "nonsense"], "--token-allow-target: invalid target rule"),
        ] {
            let e = redis(args).unwrap_err();
            assert!(e.contains(want), "{args:?}: {e}");
        }
        let e = config(&[
            "6080",
            "--token-plugin",
            "TokenRedis",
            "--token-source",
            "h:port",
            "--token-allow-any-target",
        ])
        .unwrap_err();
        assert!(e.contains("--token-source: port (field 2) is not 1-65535"), "{e}");
        let e = config(&["6080", "--token-plugin", "TokenRedis"]).unwrap_err();
        assert!(e.contains("needs --token-source host[:port"), "{e}");
        let e = config(&["6080", "--token-source", "t.cfg", "--token-allow-any-target"]).unwrap_err();
        assert!(e.contains("goes with --token-plugin TokenRedis"), "{e}");
        let e = config(&["6080", "h:1", "--token-allow-target", "10.0.0.0/8:1"]).unwrap_err();
        assert!(
            e.contains("goes with --token-plugin JWTTokenApi, TokenRedis, JSONTokenApi or BaseTokenAPI"),
            "{e}"
        );
    }

    #[test]
    fn config_file_takes_no_route_options_beside_it() {
        for extra in [
            &["--idle-timeout", "5"][..],
            &["--ssl-target-name", "x"],
            &["--ssl-target-ca", "ca.pem"],
            &["--ssl-target-no-verify"],
            &["--auth-source", "alice"],
            &["--file-only"],
            &["--web-auth"],
        ] {
            let e = config(&[&["--config", "w.toml"][..], extra].concat()).unwrap_err();
            assert!(
                e.contains("only -v, --log-format, --log-file, --threads and --admin"),
                "{extra:?}: {e}"
            );
        }
        let e = config(&["6080", "h:1", "--max-message-size", "100"]).unwrap_err();
        assert!(e.contains("at least 125 bytes"), "{e}");
    }

    /// `--web-auth` puts the upgrade's check (BasicHTTPAuth's password, ClientCertCNAuth's
    /// names) on the static files; without --web, without an auth plugin, or with one a page
    /// load cannot pass (ExpectOrigin), it is refused, as websockify refuses the first two.
    #[test]
    fn web_auth_takes_the_upgrades_check() {
        use crate::config::policy::WebAuth;
        let dir = tempfile::tempdir().unwrap();
        let web = ["--web", dir.path().to_str().unwrap(), "--web-auth"];
        let with = |extra: &[&str]| config(&[&["6080", "h:1"][..], &web, extra].concat());
        let c = with(&["--auth-plugin", "BasicHTTPAuth", "--auth-source", "alice:pw"]).unwrap();
        let basic = Some(AuthSettings::BasicUser("alice:pw".into()));
        assert_eq!(
            c.listeners[0].access.web_auth,
            Some(WebAuth {
                auth: basic.clone(),
                client_cn: None
            })
        );
        assert_eq!(c.routes[0].options.policy.auth, basic);
        let tls = ["--cert", "c.pem", "--verify-client", "--cafile", "ca.pem"];
        let c = with(&[&tls[..], &["--auth-plugin", "ClientCertCNAuth", "--auth-source", "alice bob"]].concat()).unwrap();
        assert_eq!(
            c.listeners[0].access.web_auth,
            Some(WebAuth {
                auth: None,
                client_cn: Some(vec!["alice".into(), "bob".into()])
            })
        );
        // Without --web-auth the files stay public, whatever protects the upgrade.
        let c = config(&[
            "6080",
            "h:1",
            "--web",
            web[1],
            "--auth-plugin",
            "BasicHTTPAuth",
            "--auth-source",
            "a:b",
        ])
        .unwrap();
        assert_eq!(c.listeners[0].access.web_auth, None);
        for (args, want) in [
            (
                &[
                    "6080",
                    "h:1",
                    "--web-auth",
                    "--auth-plugin",
                    "BasicHTTPAuth",
                    "--auth-source",
                    "a:b",
                ][..],
                "give --web",
            ),
            (
                &["6080", "h:1", "--web", web[1], "--web-auth"],
                "--web-auth needs --auth-plugin BasicHTTPAuth",
            ),
            (
                &[
                    "6080",
                    "h:1",
                    "--web",
                    web[1],
                    "--web-auth",
                    "--auth-plugin",
                    "ExpectOrigin",
                    "--auth-source",
                    "https://a.example",
                ],
                "would refuse every page load",
            ),
            (
                &["6080", "h:1", "--web", web[1], "--web-auth", "--auth-plugin", "BasicHTTPAuth"],
                "needs --auth-source USER:PASSWORD",
            ),
        ] {
            let e = config(args).unwrap_err();
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }

    #[test]
    fn client_cn_allow_list_from_websockify_auth_options() {
        let tls = ["--cert", "c.pem", "--verify-client", "--cafile", "ca.pem"];
        let with = |extra: &[&str]| config(&[&["6080", "h:1"][..], &tls, extra].concat());
        let c = with(&["--auth-plugin", "ClientCertCNAuth", "--auth-source", "alice, bob  carol,"]).unwrap();
        assert_eq!(
            c.routes[0].options.client_cn.as_deref(),
            Some(&["alice".to_owned(), "bob".into(), "carol".into()][..])
        );
        assert_eq!(config(&["6080", "h:1"]).unwrap().routes[0].options.client_cn, None);
        let refusals = [
            (
                &["--auth-plugin", "ClientCertCNAuth", "--auth-source", "a"][..],
                false,
                "needs client certificates",
            ),
            (&["--auth-plugin", "ClientCertCNAuth"], true, "needs --auth-source"),
            (&["--auth-source", "a"], true, "needs --auth-plugin"),
            (
                &["--auth-plugin", "JWTAuth", "--auth-source", "a"],
                true,
                "JWTAuth is not supported",
            ),
            (
                &["--auth-plugin", "BasicHTTPAuth", "--auth-source", "nocolon"],
                true,
                "USER:PASSWORD",
            ),
        ];
        for (args, certs, want) in refusals {
            let e = if certs {
                with(args)
            } else {
                config(&[&["6080", "h:1"][..], args].concat())
            }
            .unwrap_err();
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }

    #[test]
    fn ssl_target_options_map_to_backend_tls() {
        let c = config(&[
            "6080",
            "h:1",
            "--ssl-target",
            "--ssl-target-ca",
            "ca.pem",
            "--ssl-target-name",
            "db.internal",
        ])
        .unwrap();
        let tls = c.routes[0].options.backend_tls.clone().unwrap();
        assert_eq!(tls.ca.as_deref(), Some(std::path::Path::new("ca.pem")));
        assert_eq!(tls.server_name.as_deref(), Some("db.internal"));
        assert!(!tls.insecure_skip_verify);
        let c = config(&["6080", "h:1", "--ssl-target", "--ssl-target-no-verify"]).unwrap();
        assert!(c.routes[0].options.backend_tls.as_ref().unwrap().insecure_skip_verify);
        assert_eq!(config(&["6080", "h:1"]).unwrap().routes[0].options.backend_tls, None);
        let e = config(&["6080", "h:1", "--ssl-target-name", "x"]).unwrap_err();
        assert!(e.contains("need --ssl-target"), "{e}");
        let e = config(&["6080", "--unix-target", "/run/x.sock", "--ssl-target"]).unwrap_err();
        assert!(e.contains("not --unix-target"), "{e}");
    }

    #[test]
    fn zero_is_off_where_websockify_means_off() {
        let c = config(&["6080", "h:1", "--heartbeat", "0", "--idle-timeout", "0"]).unwrap();
        assert_eq!(c.timeouts.ping_interval, None, "--heartbeat 0 switches pings off");
        assert_eq!(c.timeouts.idle, None, "--idle-timeout 0 is no idle deadline");
        // Off wins over an earlier default of pings on.
        let mut args = RunArgs {
            heartbeat: Some(0.0),
            ..RunArgs::default()
        };
        let mut timeouts = Timeouts {
            ping_interval: Some(Duration::from_secs(20)),
            ..Timeouts::default()
        };
        args.apply_timeouts(&mut timeouts).unwrap();
        assert_eq!(timeouts.ping_interval, None);
        args.heartbeat = Some(7.0);
        args.apply_timeouts(&mut timeouts).unwrap();
        assert_eq!(
            (timeouts.ping_interval, timeouts.pong_timeout),
            (Some(Duration::from_secs(7)), Duration::from_secs(7))
        );
        for (flag, value) in [("--heartbeat", "-1"), ("--idle-timeout", "NaN"), ("--heartbeat", "1e-12")] {
            let e = config(&["6080", "h:1", &format!("{flag}={value}")]).unwrap_err();
            assert!(e.contains(flag) && e.contains("0 for off"), "{flag} {value}: {e}");
        }
    }

    #[test]
    fn zero_is_refused_where_it_would_break_the_bridge() {
        for (args, want) in [
            (&["--handshake-timeout", "0"][..], "--handshake-timeout: must be greater than zero"),
            (
                &["--handshake-timeout", "0ms"][..],
                "--handshake-timeout: must be greater than zero",
            ),
            (&["--connect-timeout", "0s"][..], "--connect-timeout: must be greater than zero"),
            (&["--max-connections", "0"][..], "--max-connections: must be at least 1"),
            (&["--threads", "0"][..], "--threads: must be at least 1"),
            (&["--max-message-size", "0"][..], "--max-message-size: must be at least 125 bytes"),
            (&["--max-message-size", "100"][..], "--max-message-size: must be at least 125 bytes"),
        ] {
            let e = config(&[&["6080", "h:1"][..], args].concat()).unwrap_err();
            assert!(e.contains(want), "{args:?}: {e}");
        }
        let e = config(&["--config", "w.toml", "--threads", "0"]).unwrap_err();
        assert!(e.contains("--threads: must be at least 1"), "{e}");
        let c = config(&[
            "6080",
            "h:1",
            "--max-connections",
            "1",
            "--handshake-timeout",
            "1ms",
            "--threads",
            "1",
        ])
        .unwrap();
        assert_eq!((c.limits.max_connections, c.timeouts.handshake), (1, Duration::from_millis(1)));
    }

    #[test]
    fn drain_delay_is_a_duration_or_off() {
        let c = config(&["6080", "h:1"]).unwrap();
        assert_eq!(c.timeouts.drain_delay, None, "off by default");
        let c = config(&["6080", "h:1", "--drain-delay", "10s"]).unwrap();
        assert_eq!(c.timeouts.drain_delay, Some(Duration::from_secs(10)));
        for off in ["0", "off"] {
            let c = config(&["6080", "h:1", "--drain-delay", off]).unwrap();
            assert_eq!(c.timeouts.drain_delay, None, "{off}");
        }
        let e = config(&["6080", "h:1", "--drain-delay", "soon"]).unwrap_err();
        assert!(e.contains("--drain-delay: invalid duration"), "{e}");
        let e = config(&["--config", "w.toml", "--drain-delay", "5s"]).unwrap_err();
        assert!(e.contains("--config takes everything from the file"), "{e}");
    }

    #[test]
    fn missing_target() {
        let e = config(&["6080"]).unwrap_err();
        assert!(e.contains("missing TARGET"), "{e}");
        let e = config(&["6080", "h:1", "--unix-target", "/x"]).unwrap_err();
        assert!(e.contains("only one of"), "{e}");
    }
}
