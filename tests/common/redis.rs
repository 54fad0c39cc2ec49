//! A real `redis-server` (Debian's package, installed by scripts/test.sh) on a loopback port of
//! its own, for the tests of Redis token sources and of bridges sharing one Redis.
//!
//! Redis cannot take `--port 0`, so a free port is found by binding 127.0.0.1:0 and letting it
//! go; should another process take it meanwhile, Redis says so on its log and exits, and the
//! start is tried again on another port. Readiness is Redis's own log line ("Ready to accept
//! connections"), read from its stdout as it comes: no polling, no sleep. Nothing is saved to
//! disk (`--save ''`, `--appendonly no`), and the process is killed when the value is dropped.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use super::within;

/// Where Debian puts the binary; `redis-server` on the PATH otherwise.
pub fn binary() -> Option<PathBuf> {
    let debian = PathBuf::from("/usr/bin/redis-server");
    if debian.is_file() {
        return Some(debian);
    }
    std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("redis-server")).find(|p| p.is_file()))
}

/// A running redis-server.
pub struct Redis {
    child: Option<Child>,
    /// The plain TCP port (0 when only TLS is served).
    pub port: u16,
    /// The TLS port, when started with [`Redis::start_tls`].
    pub tls_port: Option<u16>,
    /// The arguments after the ports, for a restart.
    extra: Vec<String>,
}

impl Redis {
    /// Starts redis-server on a free loopback port with `extra` arguments (`--requirepass pw`,
    /// say). `None` when there is no redis-server here: the caller skips its test.
    pub async fn start(extra: &[&str]) -> Option<Redis> {
        binary()?;
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        for _ in 0..5 {
            let port = free_port();
            if let Some(child) = spawn(&port_args(port, None), &extra).await {
                return Some(Redis {
                    child: Some(child),
                    port,
                    tls_port: None,
                    extra,
                });
            }
        }
        panic!("redis-server did not start on five free ports in a row");
    }

    /// Starts redis-server with a plain port (for the test's own client) and a TLS port with this
    /// certificate and key (clients are not asked for certificates).
    pub async fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Option<Redis> {
        binary()?;
        let extra: Vec<String> = [
            "--tls-cert-file",
            &cert.display().to_string(),
            "--tls-key-file",
            &key.display().to_string(),
            "--tls-auth-clients",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for _ in 0..5 {
            let (port, tls) = (free_port(), free_port());
            if port == tls {
                continue;
            }
            if let Some(child) = spawn(&port_args(port, Some(tls)), &extra).await {
                return Some(Redis {
                    child: Some(child),
                    port,
                    tls_port: Some(tls),
                    extra,
                });
            }
        }
        panic!("redis-server did not start with TLS on five pairs of free ports");
    }

    /// `redis://127.0.0.1:PORT/DB`.
    pub fn url(&self, db: u32) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    /// A connection for the test to write and delete keys with (`password` for `--requirepass`).
    pub async fn client(&self, db: u32, password: Option<&str>) -> redis::aio::MultiplexedConnection {
        let mut info = redis::RedisConnectionInfo::default().set_db(i64::from(db));
        if let Some(p) = password {
            info = info.set_password(p);
        }
        let info = redis::IntoConnectionInfo::into_connection_info(redis::ConnectionAddr::Tcp("127.0.0.1".into(), self.port))
            .unwrap()
            .set_redis_settings(info);
        let client = redis::Client::open(info).unwrap();
        within("a connection to redis-server", client.get_multiplexed_async_connection())
            .await
            .expect("connect to redis-server")
    }

    /// Kills the server (SIGKILL) and waits for it to be gone: its port refuses connections.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("kill redis-server");
            within("redis-server to exit", child.wait()).await.expect("wait for redis-server");
        }
    }

    /// Starts the server again on the same ports, empty (nothing was saved).
    pub async fn restart(&mut self) {
        self.kill().await;
        let args = port_args(self.port, self.tls_port);
        let child = spawn(&args, &self.extra)
            .await
            .unwrap_or_else(|| panic!("redis-server did not start again on port {}", self.port));
        self.child = Some(child);
    }

    /// Stops the process (SIGSTOP) without closing anything: connections and connects hang, as
    /// with a Redis that is stuck or unreachable. [`Redis::resume`] lets it go on.
    pub fn pause(&self) {
        self.signal(rustix::process::Signal::STOP).expect("SIGSTOP to redis-server");
    }

    /// Lets a [`Redis::pause`]d server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal(rustix::process::Signal::CONT).expect("SIGCONT to redis-server");
    }

    fn signal(&self, signal: rustix::process::Signal) -> Result<(), String> {
        let id = self.child.as_ref().and_then(Child::id).ok_or("redis-server is not running")?;
        let pid = rustix::process::Pid::from_raw(id as i32).ok_or("no pid")?;
        rustix::process::kill_process(pid, signal).map_err(|e| e.to_string())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // A paused server must be able to die (the kill on drop follows).
        let _ = self.signal(rustix::process::Signal::CONT);
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe");
    probe.local_addr().unwrap().port()
}

fn port_args(port: u16, tls: Option<u16>) -> Vec<String> {
    let mut args = vec!["--port".to_owned(), port.to_string()];
    if let Some(tls) = tls {
        args.extend(["--tls-port".to_owned(), tls.to_string()]);
    }
    args
}

/// Spawns redis-server and waits for "Ready to accept connections" on its log; `None` when it
/// exits first (its port was taken: the caller tries another).
async fn spawn(ports: &[String], extra: &[String]) -> Option<Child> {
    let mut child = Command::new(binary()?)
        .args(ports)
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--logfile", ""])
        .args(["--dir", &std::env::temp_dir().display().to_string()])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn redis-server");
    let stdout = child.stdout.take().expect("piped stdout");
    let (ready_tx, ready_rx) = oneshot::channel();
    // Reads the log to its end (so the pipe never fills), telling once when Redis is ready.
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("Ready to accept connections") {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(Ok(()));
                }
            } else if ready.is_some() {
                seen.push(line);
            }
        }
        if let Some(tx) = ready.take() {
            let _ = tx.send(Err(seen.join("\n")));
        }
    });
    match tokio::time::timeout(Duration::from_secs(10), ready_rx).await {
        Ok(Ok(Ok(()))) => Some(child),
        Ok(Ok(Err(log))) if log.contains("Address already in use") => None,
        Ok(Ok(Err(log))) => panic!("redis-server exited before it was ready:\n{log}"),
        Ok(Err(_)) => panic!("redis-server's log reader ended"),
        Err(_) => panic!("redis-server was not ready within 10 s"),
    }
}
