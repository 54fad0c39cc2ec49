//! wsbridge's forward mode as a Windows service, on the library's `service` module, as
//! `wsbridge agent --install-service` / `--uninstall-service` / `--service-mode` do for the agent.
//! Windows only (elsewhere it says so and exits 64). tests/integration/windows.rs runs it under
//! Wine's Service Control Manager.
//!
//! ```text
//! windows_service.exe install NAME REPORT TARGET   create the service NAME (needs administrator rights)
//! windows_service.exe uninstall NAME               stop and delete it
//! windows_service.exe run NAME REPORT TARGET       what the SCM starts: bridge 127.0.0.1:0 -> TARGET
//! ```
//!
//! `run` listens on a free port of 127.0.0.1 and reports it by connecting to REPORT (a TCP
//! `host:port`) and writing `ws://ADDR/` there: a service has no console to print to. A stop
//! request from the SCM drains the bridge as Ctrl-C does (sessions get 1001 after their data).

#[cfg(windows)]
fn main() -> std::process::ExitCode {
    use std::process::ExitCode;
    use wsbridge::service::{self, ServiceSpec};

    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["install", name, report, target] => {
            let executable = match std::env::current_exe() {
                Ok(exe) => exe,
                Err(e) => {
                    eprintln!("windows_service: cannot find this program: {e}");
                    return ExitCode::from(1);
                }
            };
            service::install(&ServiceSpec {
                name: name.to_string(),
                display_name: format!("wsbridge example ({name})"),
                description: "wsbridge forward mode, the library's service example".into(),
                executable,
                arguments: ["run", name, report, target].iter().map(Into::into).collect(),
                // Started by `sc start` only: a test's leftover must not start with every later
                // Wine session of the prefix (an agent's service is automatic).
                automatic: false,
            })
            .map(|warnings| warnings.iter().for_each(|w| eprintln!("windows_service: warning: {w}")))
        }
        ["uninstall", name] => service::uninstall(name, std::time::Duration::from_secs(30)).map(drop),
        ["run", name, report, target] => {
            let (report, target) = (report.to_string(), target.to_string());
            let body = move |stop| serve(&report, &target, stop).map_err(|message| service::Failure { code: 1, message });
            // The bridge's default shutdown grace (10 s) and a margin: what the SCM is told a stop takes.
            service::run(name, Box::new(body), std::time::Duration::from_secs(15))
        }
        _ => {
            eprintln!("usage: windows_service.exe install NAME REPORT TARGET | uninstall NAME | run NAME REPORT TARGET");
            return ExitCode::from(64);
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("windows_service: {e}");
            ExitCode::from(1)
        }
    }
}

/// The service's body: forward mode on 127.0.0.1:0 until `stop`, then the drain.
#[cfg(windows)]
fn serve(report: &str, target: &str, stop: tokio_util::sync::CancellationToken) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    use wsbridge::config::{Config, ListenerConfig, Matcher, RouteConfig};
    use wsbridge::server::{start, Bridge};

    let runtime = start::runtime().map_err(|e| e.to_string())?;
    let served = runtime.block_on(async {
        let mut config = Config::new("windows_service example");
        config
            .listeners
            .push(ListenerConfig::new("127.0.0.1:0".parse().map_err(|e| format!("{e}"))?));
        let options = config.default_route_options();
        config.routes.push(RouteConfig {
            matcher: Matcher::AnyPath,
            target: target.parse()?,
            options,
        });
        config.check().map_err(|e| e.to_string())?;
        let bridge = Bridge::new(&config).map_err(|e| e.to_string())?;
        let bound = start::bind(&config, 1).map_err(|e| e.to_string())?;
        let mut to = tokio::net::TcpStream::connect(report).await.map_err(|e| format!("{report}: {e}"))?;
        to.write_all(format!("ws://{}/\n", bound.addrs()[0]).as_bytes())
            .await
            .map_err(|e| format!("{report}: {e}"))?;
        let token = bridge.shutdown_token();
        tokio::spawn(async move {
            stop.cancelled().await;
            token.cancel();
        });
        let drained = bound.serve(&bridge).await.map_err(|e| e.to_string())?;
        let _ = to.write_all(format!("stopped (clean: {})\n", drained.clean).as_bytes()).await;
        Ok::<(), String>(())
    });
    runtime.shutdown_background();
    if let Err(e) = &served {
        // No console: the error goes where the address went.
        if let Ok(mut s) = std::net::TcpStream::connect(report) {
            use std::io::Write;
            let _ = writeln!(s, "error: {e}");
        }
    }
    served
}

#[cfg(not(windows))]
fn main() -> std::process::ExitCode {
    eprintln!("windows_service: a Windows service example; build it with --target x86_64-pc-windows-gnu");
    std::process::ExitCode::from(64)
}
