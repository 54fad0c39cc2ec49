//! A child process's output as lines to wait on: read all the time (so the child never blocks on
//! a full pipe), kept (bounded), and waited for by content.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::Notify;

/// The lines of one stream of a child (its stderr, usually).
#[derive(Clone)]
pub struct Lines {
    /// Every line so far (bounded: past 100,000 lines the oldest half is dropped).
    lines: Arc<Mutex<Vec<String>>>,
    more: Arc<Notify>,
}

impl Lines {
    /// Starts reading `stream` line by line on a task of its own.
    pub fn capture(stream: impl AsyncRead + Unpin + Send + 'static) -> Lines {
        let mut reader = BufReader::new(stream).lines();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let more = Arc::new(Notify::new());
        let (l, m) = (lines.clone(), more.clone());
        tokio::spawn(async move {
            while let Ok(Some(line)) = reader.next_line().await {
                let mut v = l.lock().unwrap();
                if v.len() >= 100_000 {
                    v.drain(..50_000);
                }
                v.push(line);
                drop(v);
                m.notify_waiters();
            }
            m.notify_waiters();
        });
        Lines { lines, more }
    }

    /// Waits for a line containing `needle` (one seen already counts) and returns it.
    pub async fn line(&self, needle: &str) -> String {
        let (lines, more) = (self.lines.clone(), self.more.clone());
        let all = self.lines.clone();
        let found = tokio::time::timeout(super::WAIT, async move {
            loop {
                // Registered before the look, so a line that arrives in between wakes us.
                let notified = more.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(l) = lines.lock().unwrap().iter().find(|l| l.contains(needle)) {
                    return l.clone();
                }
                notified.await;
            }
        })
        .await;
        match found {
            Ok(line) => line,
            Err(_) => panic!(
                "timed out after {:?} waiting for a line with {needle:?}; the lines so far:\n{}",
                super::WAIT,
                all.lock().unwrap().join("\n")
            ),
        }
    }

    /// The lines so far.
    pub fn all(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}
