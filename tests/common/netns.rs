//! Two hosts on a link of the test's own (network namespaces, as root): the near one runs the
//! code under test, the far one a peer that can go dark (packets sent to it vanish, nothing
//! answers, no reset ever comes) without touching the machine's own network. Callers skip without
//! it ([`Link::new`] says so).
//!
//! The namespaces are joined by a veth pair, `10.9.0.1` near and `10.9.0.2` far, with fixed
//! link-layer neighbours (no ARP to fail). [`Link::far_goes_dark`] takes the far address away: what
//! the near host sends still crosses the link, and the far host, which no longer has the address
//! and forwards nothing, drops it, as a host that lost power or a link cut further along would.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

/// The near host's address.
pub const NEAR: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 9, 0, 1));
/// The far host's address.
pub const FAR: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 9, 0, 2));

/// Two namespaces and the link between them, deleted when dropped.
pub struct Link {
    near: String,
    far: String,
}

impl Link {
    /// A new link for `test`, or `None` after saying the test is skipped (not root, no `ip`, no
    /// network namespaces or veth in this kernel or container).
    pub fn new(test: &str) -> Option<Link> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let root = std::fs::read_to_string("/proc/self/status")
            .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")));
        if !root || super::which("ip").is_none() {
            super::skip(test, "needs root and `ip` (iproute2) for network namespaces");
            return None;
        }
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = format!("wsbt-{}-{n}", std::process::id());
        let (near, far) = (format!("{base}-n"), format!("{base}-f"));
        let mut made = Link {
            near: String::new(),
            far: String::new(),
        };
        for (name, slot) in [(near, &mut made.near), (far, &mut made.far)] {
            let out = Command::new("ip").args(["netns", "add", &name]).output();
            if !out.as_ref().is_ok_and(|o| o.status.success()) {
                super::skip(test, &format!("`ip netns add` failed: {out:?}"));
                return None;
            }
            *slot = name;
        }
        let veth = ip(&[
            "-n", &made.near, "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", &made.far,
        ]);
        if !veth {
            super::skip(test, "no veth interfaces in this kernel");
            return None;
        }
        for (ns, dev, mine, mac, theirs, their_mac) in [
            (&made.near, "v0", NEAR, "02:00:00:09:00:01", FAR, "02:00:00:09:00:02"),
            (&made.far, "v1", FAR, "02:00:00:09:00:02", NEAR, "02:00:00:09:00:01"),
        ] {
            for args in [
                vec!["link", "set", "lo", "up"],
                vec!["link", "set", dev, "address", mac],
                vec!["addr", "add", &format!("{mine}/24"), "dev", dev],
                vec!["link", "set", dev, "up"],
                vec![
                    "neigh",
                    "replace",
                    &theirs.to_string(),
                    "lladdr",
                    their_mac,
                    "dev",
                    dev,
                    "nud",
                    "permanent",
                ],
            ] {
                let args: Vec<&str> = ["-n", ns.as_str()].into_iter().chain(args.iter().map(|a| &**a)).collect();
                assert!(ip(&args), "ip {args:?} failed");
            }
        }
        Some(made)
    }

    /// Runs `test` to its end on a thread of its own in the near namespace (so the bridge's and the
    /// client's sockets are the near host's), on a single-threaded runtime; a panic in it fails
    /// the caller.
    pub fn run_near<F, Fut>(&self, test: F)
    where
        F: FnOnce() -> Fut + Send,
        Fut: std::future::Future<Output = ()>,
    {
        std::thread::scope(|scope| {
            scope.spawn(|| {
                // From here this thread's sockets are the near host's; the thread is the test's
                // own and ends with it (libtest's may run the next test).
                enter(&self.near);
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(test());
            });
        });
    }

    /// A listener on the far host (`FAR`, an ephemeral port), for any thread to use.
    pub fn listen_far(&self) -> std::net::TcpListener {
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(&self.far);
                let listener = std::net::TcpListener::bind((FAR, 0)).expect("bind on the far host");
                listener.set_nonblocking(true).unwrap();
                listener
            })
            .join()
            .unwrap()
        })
    }

    /// The far host goes dark: what is sent to it is dropped on arrival, unanswered. Its
    /// connections stay open.
    pub fn far_goes_dark(&self) {
        let args = ["-n", &self.far, "addr", "del", &format!("{FAR}/24"), "dev", "v1"];
        assert!(ip(&args), "ip {args:?} failed");
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for name in [&self.near, &self.far] {
            if !name.is_empty() {
                let _ = Command::new("ip").args(["netns", "del", name]).output();
            }
        }
    }
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).output().is_ok_and(|o| o.status.success())
}

fn enter(name: &str) {
    let file = std::fs::File::open(format!("/run/netns/{name}")).expect("the namespace's file");
    rustix::thread::move_into_link_name_space(std::os::fd::AsFd::as_fd(&file), Some(rustix::thread::LinkNameSpaceType::Network))
        .expect("setns");
}
