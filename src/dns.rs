//! Host names resolved for backends and token APIs: one lookup per name and port at a time.
//!
//! The system's resolver (`getaddrinfo`, through [`tokio::net::lookup_host`]) blocks a thread of
//! tokio's blocking pool for each lookup, and a lookup cannot be cancelled: when the DNS server
//! does not answer, each one holds its thread for the resolver's whole timeout (5 s per try and
//! server by default), long after the session that asked gave up at its connect deadline. A
//! lookup per session would then fill the pool (512 threads), and with it everything else that
//! runs there (static files, token files, reloads). Here the sessions that need a name while its
//! lookup runs wait for that lookup instead of starting their own, each under its own deadline,
//! so a DNS outage holds a thread per name every 5 s at most (a lookup is joined that
//! long; a newcomer after it asks again, so pages do not wait out an old lookup's resolver
//! timeout once the DNS server is back). Nothing is cached past the lookup: the next one after
//! it asks the resolver again, as each session did before (its answers follow DNS changes,
//! `/etc/hosts` and nsswitch as every program's on the machine do).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// A lookup's outcome, shared by its waiters: the addresses, or the error's kind and message.
type Outcome = Result<Arc<[SocketAddr]>, (io::ErrorKind, Arc<str>)>;

/// Where a waiter learns a lookup's outcome (`None` while it runs).
type Waiting = watch::Receiver<Option<Outcome>>;

/// A name and a port.
type Key = (Box<str>, u16);

/// The lookups running, by name and port: when each started, and where its outcome comes.
static RUNNING: LazyLock<Mutex<HashMap<Key, (Instant, Waiting)>>> = LazyLock::new(Mutex::default);

/// How long a running lookup is joined: after that a newcomer asks the resolver again (the
/// DNS server may be back while an old lookup still waits out the resolver's timeout, 5 s per
/// try and server), so an outage holds a thread per name every this long at most.
const JOIN_FOR: Duration = Duration::from_secs(5);

/// The addresses `host` (a name, or an IP address literal, in brackets or not) resolves to for
/// `port`, in the resolver's order. A literal needs no lookup; a name joins the lookup of the same
/// name and port that is running, or starts one (a task of its own, which ends when the resolver
/// answers whoever still waits). Bound it with the caller's deadline: a lookup may take as long
/// as the resolver does.
///
/// # Errors
/// The resolver's error (an unknown name, no DNS server answering), or the runtime the lookup
/// ran on stopped.
pub async fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if let Ok(ip) = literal.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let ask = || {
        join_or_start(host, port, |host, port| async move {
            tokio::net::lookup_host((host.as_ref(), port)).await.map(Iterator::collect)
        })
    };
    let mut waiting = ask();
    if waiting.wait_for(Option::is_some).await.is_err() {
        // The lookup joined was dropped with the runtime it ran on (another runtime thread's,
        // which ended): asked again, here.
        waiting = ask();
    }
    let outcome = waiting
        .wait_for(Option::is_some)
        .await
        .map_err(|_| io::Error::other("the lookup stopped with its runtime"))?;
    match outcome.as_ref() {
        Some(Ok(addrs)) => Ok(addrs.to_vec()),
        Some(Err((kind, message))) => Err(io::Error::new(*kind, message.to_string())),
        None => Err(io::Error::other("the lookup ended without an answer")),
    }
}

/// The receiver of the running lookup of `host`:`port`, or of a new one that `lookup` does:
/// when none runs, when the one running began more than [`JOIN_FOR`] ago, or when it will never
/// answer (its task was dropped with its runtime).
fn join_or_start<F, L>(host: &str, port: u16, lookup: L) -> Waiting
where
    L: FnOnce(Box<str>, u16) -> F,
    F: std::future::Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'static,
{
    let key: Key = (host.into(), port);
    let mut running = RUNNING.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((started, waiting)) = running.get(&key) {
        // `has_changed` fails once the lookup's sender is gone, answered or not.
        if started.elapsed() < JOIN_FOR && waiting.has_changed().is_ok() {
            return waiting.clone();
        }
    }
    let (done, waiting) = watch::channel(None);
    running.insert(key.clone(), (Instant::now(), waiting.clone()));
    drop(running);
    let asked = lookup(key.0.clone(), port);
    let entry = Entry {
        key,
        waiting: waiting.clone(),
    };
    tokio::spawn(async move {
        let outcome = asked.await.map(Arc::from).map_err(|e| (e.kind(), Arc::from(e.to_string())));
        // Out of the table first: whoever comes after the answer asks the resolver again.
        drop(entry);
        let _ = done.send(Some(outcome));
    });
    waiting
}

/// A lookup's place in [`RUNNING`], taken out when its task ends, answered or dropped (with its
/// runtime), unless a newer lookup of the name has taken it since.
struct Entry {
    key: Key,
    waiting: Waiting,
}

impl Drop for Entry {
    fn drop(&mut self) {
        let mut running = RUNNING.lock().unwrap_or_else(PoisonError::into_inner);
        if running.get(&self.key).is_some_and(|(_, w)| w.same_channel(&self.waiting)) {
            running.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn waiters_share_the_running_lookup_and_the_next_one_asks_again() {
        static ASKED: AtomicUsize = AtomicUsize::new(0);
        let (answer, answered) = tokio::sync::oneshot::channel::<()>();
        let answered = Arc::new(tokio::sync::Mutex::new(Some(answered)));
        let ask = |answered: Arc<tokio::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>>| {
            move |_: Box<str>, port: u16| async move {
                ASKED.fetch_add(1, Ordering::SeqCst);
                if let Some(answered) = answered.lock().await.take() {
                    let _ = answered.await;
                }
                Ok(vec![SocketAddr::from(([192, 0, 2, 1], port))])
            }
        };
        // A name no test resolves for real: the table is the process's.
        let name = "shared-lookup.test.invalid";
        let waiters: Vec<_> = (0..50).map(|_| join_or_start(name, 1, ask(answered.clone()))).collect();
        assert_eq!(ASKED.load(Ordering::SeqCst), 0, "not asked before its task runs");
        tokio::task::yield_now().await;
        assert_eq!(ASKED.load(Ordering::SeqCst), 1, "fifty waiters, one lookup");
        answer.send(()).unwrap();
        for mut w in waiters {
            let got = tokio::time::timeout(Duration::from_secs(5), w.wait_for(Option::is_some)).await;
            let addrs = got.unwrap().unwrap().clone().unwrap().unwrap();
            assert_eq!(addrs[..], [SocketAddr::from(([192, 0, 2, 1], 1))]);
        }
        // Answered: the next asks again (no answer is kept).
        let mut again = join_or_start(name, 1, ask(answered.clone()));
        tokio::time::timeout(Duration::from_secs(5), again.wait_for(Option::is_some))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ASKED.load(Ordering::SeqCst), 2);
    }

    /// A lookup whose runtime stops before it answers (a bridge's runtime thread ending its
    /// drain, an embedder's) leaves no entry that would fail every later lookup of the name.
    #[test]
    fn a_lookup_dropped_with_its_runtime_is_asked_again() {
        let name = "dropped-lookup.test.invalid";
        let hangs = |_: Box<str>, _: u16| std::future::pending::<io::Result<Vec<SocketAddr>>>();
        let first = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut orphan = first.block_on(async {
            let w = join_or_start(name, 1, hangs);
            // Its task started and waits for the resolver.
            tokio::task::yield_now().await;
            w
        });
        drop(first);
        let second = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        second.block_on(async {
            assert!(orphan.wait_for(Option::is_some).await.is_err(), "its waiters hear it is gone");
            let answers = |_: Box<str>, port: u16| async move { Ok(vec![SocketAddr::from(([192, 0, 2, 7], port))]) };
            let mut w = join_or_start(name, 1, answers);
            let got = tokio::time::timeout(Duration::from_secs(5), w.wait_for(Option::is_some)).await;
            let addrs = got.unwrap().unwrap().clone().unwrap().unwrap();
            assert_eq!(addrs[..], [SocketAddr::from(([192, 0, 2, 7], 1))]);
        });
    }

    #[tokio::test]
    async fn literals_need_no_lookup_and_errors_keep_their_kind() {
        assert_eq!(
            resolve("[::1]", 5).await.unwrap(),
            [SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], 5))]
        );
        assert_eq!(resolve("127.0.0.1", 6).await.unwrap(), [SocketAddr::from(([127, 0, 0, 1], 6))]);
        let failing = |_: Box<str>, _: u16| async { Err(io::Error::new(io::ErrorKind::NotFound, "no such name")) };
        let mut w = join_or_start("failing.test.invalid", 1, failing);
        let outcome = w.wait_for(Option::is_some).await.unwrap().clone().unwrap();
        assert_eq!(outcome.unwrap_err().0, io::ErrorKind::NotFound);
    }
}
