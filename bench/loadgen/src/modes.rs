//! Client measurement modes. Each prints JSON lines on stdout:
//! `{"event":"start"}` / `{"event":"end"}` at the edges of the measured
//! window (so the harness can sample the bridge's CPU time there), and one
//! final line with `"type":"result"`.

use std::time::Duration;

use anyhow::{anyhow, Result};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::time::{timeout_at, Instant};
use tokio_tungstenite::tungstenite::Bytes;

use crate::net::{Conn, Target};

/// Extra time past the window before a stalled operation is an error.
const GRACE: Duration = Duration::from_secs(10);
/// Upper bound for closing one session.
const CLOSE_LIMIT: Duration = Duration::from_secs(2);

pub fn emit(v: &Value) {
    println!("{v}");
}

/// Measurement timing: warm-up (not counted) then the counted window.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub warmup: f64,
    pub seconds: f64,
}

/// The measured window: `warmup` after now, lasting `seconds`.
#[derive(Clone, Copy)]
pub struct Window {
    pub start: Instant,
    pub end: Instant,
    pub seconds: f64,
}

impl Window {
    pub fn new(t: Timing) -> Self {
        let start = Instant::now() + Duration::from_secs_f64(t.warmup);
        Window {
            start,
            end: start + Duration::from_secs_f64(t.seconds),
            seconds: t.seconds,
        }
    }

    /// Print the start/end events at the right moments.
    pub fn announce(&self) -> tokio::task::JoinHandle<()> {
        let w = *self;
        tokio::spawn(async move {
            tokio::time::sleep_until(w.start).await;
            emit(&json!({"event": "start"}));
            tokio::time::sleep_until(w.end).await;
            emit(&json!({"event": "end"}));
        })
    }

    fn contains(&self, t: Instant) -> bool {
        t >= self.start && t < self.end
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Dir {
    /// Client sends, backend (sink) reads
    Up,
    /// Backend (source) writes, client reads
    Down,
}

fn payload(size: usize) -> Bytes {
    Bytes::from((0..size).map(|i| b'a' + (i % 26) as u8).collect::<Vec<u8>>())
}

fn new_hist() -> Histogram<u64> {
    // Nanoseconds, 1 ns .. 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("histogram bounds")
}

fn hist_json(h: &Histogram<u64>) -> Value {
    let us = |ns: u64| ns as f64 / 1000.0;
    json!({
        "p50_us": us(h.value_at_quantile(0.50)),
        "p99_us": us(h.value_at_quantile(0.99)),
        "p999_us": us(h.value_at_quantile(0.999)),
        "max_us": us(h.max()),
        "mean_us": h.mean() / 1000.0,
    })
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// Bulk transfer over one session.
pub async fn throughput(target: &Target, dir: Dir, msg_size: usize, timing: Timing) -> Result<Value> {
    let mut conn = target.connect().await?;
    let w = Window::new(timing);
    let announcer = w.announce();
    let mut bytes = 0u64;
    let deadline = w.end + GRACE;
    match dir {
        Dir::Up => {
            let data = payload(msg_size);
            loop {
                if Instant::now() >= w.end {
                    break;
                }
                timeout_at(deadline, conn.send(&data))
                    .await
                    .map_err(|_| anyhow!("send stalled"))??;
                if w.contains(Instant::now()) {
                    bytes += msg_size as u64;
                }
            }
        }
        Dir::Down => {
            let mut buf = vec![0u8; msg_size.max(64 * 1024)];
            loop {
                let n = timeout_at(deadline, conn.recv_some(&mut buf))
                    .await
                    .map_err(|_| anyhow!("receive stalled"))??;
                let t = Instant::now();
                if t >= w.end {
                    break;
                }
                if t >= w.start {
                    bytes += n as u64;
                }
            }
        }
    }
    announcer.await?;
    drop(conn);
    let mb_s = bytes as f64 / 1e6 / w.seconds;
    let dir = format!("{dir:?}").to_lowercase();
    Ok(json!({"type": "result", "mode": "throughput", "dir": dir, "msg_size": msg_size,
              "bytes": bytes, "seconds": w.seconds, "mb_per_s": mb_s}))
}

/// Open `n` sessions, `batch` at a time; each proves itself live with one
/// echo of `msg_size` bytes. Returns the open sessions, the number that
/// failed, and the first error. Once more than `n / 20 + 10` have failed, the
/// rest are not attempted (counted as failed), so a bridge that cannot hold
/// them is not waited on for every connect timeout.
pub async fn open_many(target: &Target, n: usize, batch: usize, msg_size: usize) -> (Vec<Conn>, usize, Option<String>) {
    let data = payload(msg_size);
    let max_failures = n / 20 + 10;
    let failures = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Result<Conn>> = futures_util::stream::iter(0..n)
        .map(|_| {
            let data = data.clone();
            let failures = &failures;
            async move {
                if failures.load(std::sync::atomic::Ordering::Relaxed) > max_failures {
                    return Err(anyhow!("not attempted: too many failures"));
                }
                let r = async {
                    let mut c = target.connect().await?;
                    let mut buf = vec![0u8; msg_size.clamp(64, 64 * 1024)];
                    tokio::time::timeout(crate::net::CONNECT_TIMEOUT, c.echo(&data, &mut buf))
                        .await
                        .map_err(|_| anyhow!("first echo timed out"))??;
                    anyhow::Ok(c)
                }
                .await;
                if r.is_err() {
                    failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                r
            }
        })
        .buffer_unordered(batch.max(1))
        .collect()
        .await;
    let mut conns = Vec::with_capacity(n);
    let mut failed = 0;
    let mut first_error = None;
    for r in results {
        match r {
            Ok(c) => conns.push(c),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    (conns, failed, first_error)
}

/// Request/response: each session sends `msg_size` bytes and awaits the echo.
pub async fn echo(target: &Target, sessions: usize, msg_size: usize, timing: Timing, batch: usize) -> Result<Value> {
    let (conns, failed, err) = open_many(target, sessions, batch, msg_size).await;
    if failed > 0 {
        return Err(anyhow!(
            "{failed} of {sessions} sessions failed to open: {}",
            err.unwrap_or_default()
        ));
    }
    let w = Window::new(timing);
    let announcer = w.announce();
    let data = payload(msg_size);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let data = data.clone();
            tokio::spawn(async move {
                let mut hist = new_hist();
                let mut buf = vec![0u8; msg_size.clamp(64, 64 * 1024)];
                let mut error = None;
                loop {
                    let s = Instant::now();
                    if s >= w.end {
                        break;
                    }
                    match timeout_at(w.end + GRACE, conn.echo(&data, &mut buf)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            error = Some(format!("{e:#}"));
                            break;
                        }
                        Err(_) => {
                            error = Some("echo stalled".to_string());
                            break;
                        }
                    }
                    if s >= w.start {
                        let ns = s.elapsed().as_nanos().max(1) as u64;
                        hist.saturating_record(ns);
                    }
                }
                (hist, error)
            })
        })
        .collect();
    let mut hist = new_hist();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (h, e) = t.await?;
        hist.add(&h)?;
        if let Some(e) = e {
            errors += 1;
            first_error.get_or_insert(e);
        }
    }
    announcer.await?;
    let n = hist.len();
    let base = json!({"type": "result", "mode": "echo", "sessions": sessions,
        "msg_size": msg_size, "round_trips": n, "seconds": w.seconds,
        "rate": n as f64 / w.seconds, "errors": errors, "first_error": first_error});
    Ok(merge(base, hist_json(&hist)))
}

/// Session churn: `concurrency` workers each loop open, one echo, close.
pub async fn sessions(target: &Target, concurrency: usize, msg_size: usize, timing: Timing) -> Result<Value> {
    let w = Window::new(timing);
    let announcer = w.announce();
    let data = payload(msg_size);
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let data = data.clone();
            let target = target.clone();
            tokio::spawn(async move {
                let mut hist = new_hist();
                let mut buf = vec![0u8; msg_size.clamp(64, 64 * 1024)];
                let (mut errors, mut close_errors, mut close_replies) = (0u64, 0u64, 0u64);
                let mut first_error = None;
                while Instant::now() < w.end && errors < 1000 {
                    let s = Instant::now();
                    let r = timeout_at(w.end + GRACE, async {
                        let mut c = target.connect().await?;
                        c.echo(&data, &mut buf).await?;
                        anyhow::Ok(c)
                    })
                    .await
                    .map_err(|_| anyhow!("session stalled"))
                    .and_then(|r| r);
                    match r {
                        Ok(c) => {
                            match c.close(CLOSE_LIMIT).await {
                                Ok(true) => close_replies += 1,
                                Ok(false) => {}
                                Err(e) => {
                                    close_errors += 1;
                                    first_error.get_or_insert_with(|| format!("close: {e:#}"));
                                }
                            }
                            if s >= w.start {
                                hist.saturating_record(s.elapsed().as_nanos().max(1) as u64);
                            }
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("{e:#}"));
                        }
                    }
                }
                (hist, errors, close_errors, close_replies, first_error)
            })
        })
        .collect();
    let mut hist = new_hist();
    let (mut errors, mut close_errors, mut close_replies) = (0, 0, 0);
    let mut first_error = None;
    for t in tasks {
        let (h, e, ce, cr, fe) = t.await?;
        hist.add(&h)?;
        errors += e;
        close_errors += ce;
        close_replies += cr;
        if first_error.is_none() {
            first_error = fe;
        }
    }
    announcer.await?;
    let n = hist.len();
    let base = json!({"type": "result", "mode": "sessions", "concurrency": concurrency,
        "sessions": n, "seconds": w.seconds, "rate": n as f64 / w.seconds,
        "errors": errors, "close_errors": close_errors, "close_replies": close_replies,
        "first_error": first_error});
    Ok(merge(base, hist_json(&hist)))
}

/// Open `n` idle sessions and keep them until a signal arrives and either
/// stdin closes or, if given, `hold_seconds` pass.
pub async fn hold(target: &Target, n: usize, batch: usize, msg_size: usize, hold_seconds: Option<f64>) -> Result<Value> {
    let t0 = Instant::now();
    let (conns, failed, first_error) = open_many(target, n, batch, msg_size).await;
    let open_s = t0.elapsed().as_secs_f64();
    emit(&json!({"event": "ready", "sessions": conns.len(), "failed": failed,
                 "first_error": first_error, "open_seconds": open_s}));
    wait_for_release(hold_seconds).await?;
    // Still alive after the hold? Each session echoes once more, then closes.
    let held = conns.len();
    let probe = payload(64);
    let ends: Vec<(bool, bool)> = futures_util::stream::iter(conns)
        .map(|mut c| {
            let probe = probe.clone();
            async move {
                let mut buf = [0u8; 64];
                let alive = matches!(tokio::time::timeout(CLOSE_LIMIT, c.echo(&probe, &mut buf)).await, Ok(Ok(())));
                (alive, c.close(CLOSE_LIMIT).await.is_ok())
            }
        })
        .buffer_unordered(batch.max(1))
        .collect()
        .await;
    let alive = ends.iter().filter(|e| e.0).count();
    let closed_ok = ends.iter().filter(|e| e.1).count();
    Ok(json!({"type": "result", "mode": "hold", "requested": n, "sessions": held,
              "failed": failed, "first_error": first_error, "open_seconds": open_s,
              "alive_after_hold": alive, "closed_cleanly": closed_ok, "msg_size": msg_size}))
}

async fn wait_for_release(hold_seconds: Option<f64>) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // With a time limit, stdin is not watched (it may be /dev/null in CI).
    let release = async {
        match hold_seconds {
            Some(s) => tokio::time::sleep(Duration::from_secs_f64(s)).await,
            None => {
                let mut stdin = tokio::io::stdin();
                let mut b = [0u8; 256];
                while matches!(stdin.read(&mut b).await, Ok(n) if n > 0) {}
            }
        }
    };
    tokio::select! {
        _ = release => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
