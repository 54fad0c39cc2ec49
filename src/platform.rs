//! What differs between Unix and Windows, in one place, so the rest of the crate reads the same on
//! both: unix sockets (a stand-in type on Windows that can never be connected), sharing a port
//! between runtime threads, a file's identity for change detection, the open-file limit and a
//! private directory. Everything Unix-only is refused on Windows with a message that says so
//! ([`UNIX_SOCKETS_UNAVAILABLE`]); nothing else is lost.

use std::path::Path;

/// What a configuration, a command line or a token file that names a unix socket is told on Windows.
pub const UNIX_SOCKETS_UNAVAILABLE: &str = "unix socket targets are not available on Windows";

#[cfg(unix)]
pub use tokio::net::unix::{ReadHalf as UnixReadHalf, WriteHalf as UnixWriteHalf};
#[cfg(unix)]
pub use tokio::net::UnixStream;

#[cfg(windows)]
pub use windows::{UnixReadHalf, UnixStream, UnixWriteHalf};

/// A client connection's send queue, as the kernel counts it: what the relay asks, when a client
/// seems to have stopped reading, to tell a client that reads slowly behind a full socket from
/// one that reads nothing. Such a socket says it can take more only once a good part of its
/// buffer (autotuned to megabytes) is free, which at a slow reader's pace comes after the pong
/// deadline; its queue shrinking as the client acknowledges what it read shows the reading at
/// once. Linux only (`SIOCOUTQ`); elsewhere nothing is known and the relay goes by writes alone.
#[derive(Debug, Clone, Copy)]
pub struct SendQueue {
    #[cfg(target_os = "linux")]
    fd: Option<std::os::fd::RawFd>,
}

impl SendQueue {
    /// Nothing known (a test's stream, a platform without the call).
    pub const NONE: SendQueue = SendQueue {
        #[cfg(target_os = "linux")]
        fd: None,
    };

    /// The queue of `socket` (a TCP or unix stream), for as long as the connection it belongs to
    /// is open: only the code that owns that connection asks, while it owns it (a session's
    /// relay for its client or backend, an agent's session for its data link). Crate-only: the
    /// descriptor is kept as a number, which the caller must not let outlive its socket (a
    /// review: as a public safe function, an embedder could ask after closing it).
    #[cfg(unix)]
    pub(crate) fn of(socket: &impl std::os::fd::AsRawFd) -> SendQueue {
        #[cfg(target_os = "linux")]
        return SendQueue {
            fd: Some(socket.as_raw_fd()),
        };
        #[cfg(not(target_os = "linux"))]
        {
            let _ = socket;
            SendQueue::NONE
        }
    }

    /// The queue of `socket` (Windows: nothing known).
    #[cfg(windows)]
    pub(crate) fn of<T>(_socket: &T) -> SendQueue {
        SendQueue::NONE
    }

    /// Bytes written to the socket that the peer has not acknowledged yet (sent or not):
    /// `None` when not known. It shrinks only as the peer acknowledges, whatever is written.
    #[allow(unsafe_code)]
    #[deny(clippy::undocumented_unsafe_blocks)]
    pub fn unacknowledged(&self) -> Option<u64> {
        #[cfg(target_os = "linux")]
        {
            use rustix::ioctl::{ioctl, Getter};
            /// SIOCOUTQ (the same number as TIOCOUTQ): an `int`, the bytes in the send queue.
            const SIOCOUTQ: rustix::ioctl::Opcode = 0x5411;
            let fd = self.fd?;
            // SAFETY: `fd` is the socket of the connection this queue was taken from (`of`), and
            // only the code that owns that connection calls this, while it owns it (`of`'s
            // contract): the descriptor is open and is that socket for the whole borrow. SIOCOUTQ on a socket
            // writes one `int` into the argument it is given, which is what `Getter<_, c_int>`
            // passes (a pointer to its own `c_int`) and reads back; it reads nothing else.
            let queued = unsafe {
                let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
                ioctl(fd, Getter::<SIOCOUTQ, std::ffi::c_int>::new())
            };
            queued.ok().and_then(|n| u64::try_from(n).ok())
        }
        #[cfg(not(target_os = "linux"))]
        None
    }
}

/// A backend socket's acknowledgements, as the kernel counts them (TCP_INFO): what the relay asks
/// while data it wrote may be waiting for the backend, to tell a backend host that went dark (no
/// acknowledgement at all: powered off, cut off, its address gone) from a live backend that only
/// reads slowly or not at all (its kernel acknowledges all it was sent, and shuts its window).
/// Keepalive covers a quiet connection; with data in flight the kernel itself keeps retransmitting
/// for about 15 minutes (`tcp_retries2`), and `TCP_USER_TIMEOUT` cannot tell the two apart (since
/// Linux 5.11 it also ends a connection whose peer keeps its window shut, answering every probe).
/// Linux only; elsewhere nothing is known and the kernel's own retransmission limit applies. The
/// socket is held as [`SendQueue`] holds one, with the same contract.
#[derive(Debug, Clone, Copy)]
pub struct Acks(SendQueue);

/// What [`Acks::silence`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Silence {
    /// Data sent and not acknowledged yet. (Not probes of a shut window: the peer's kernel
    /// answers them at most one per 500 ms and they back off to two minutes apart, so a live
    /// peer's last answer is often older than any limit worth setting, with a probe out; a
    /// peer whose window stays shut once its host is gone is left to the kernel's own limit.)
    pub waiting: bool,
    /// Since the peer's last acknowledgement (of anything: data, a window probe, a keepalive).
    pub since_ack: std::time::Duration,
}

impl Acks {
    /// Nothing known (unix sockets, an agent's link, a platform without TCP_INFO).
    pub const NONE: Acks = Acks(SendQueue::NONE);

    /// The acknowledgements of `socket` (a TCP stream), for as long as the connection is open:
    /// only the code that owns that connection asks, while it owns it ([`SendQueue::of`]'s
    /// contract).
    #[cfg(unix)]
    pub(crate) fn of(socket: &impl std::os::fd::AsRawFd) -> Acks {
        Acks(SendQueue::of(socket))
    }

    /// The acknowledgements of `socket` (Windows: nothing known).
    #[cfg(windows)]
    pub(crate) fn of<T>(socket: &T) -> Acks {
        Acks(SendQueue::of(socket))
    }

    /// Whether anything is known (else [`Acks::silence`] is always `None`).
    pub fn known(&self) -> bool {
        #[cfg(target_os = "linux")]
        return self.0.fd.is_some();
        #[cfg(not(target_os = "linux"))]
        false
    }

    /// Bytes in the send queue, sent or not (`SIOCOUTQ`; 0 when not known): data held back by a
    /// shut window is there and not in flight, and goes when the window opens, with no write of
    /// the caller's. Asked only when nothing is in flight ([`Silence::waiting`]).
    pub fn queued(&self) -> u64 {
        self.0.unacknowledged().unwrap_or(0)
    }

    /// What waits for the peer, and how long it has been silent; `None` when not known.
    #[allow(unsafe_code)]
    #[deny(clippy::undocumented_unsafe_blocks)]
    pub fn silence(&self) -> Option<Silence> {
        #[cfg(target_os = "linux")]
        {
            use std::mem::{offset_of, size_of};
            let fd = self.0.fd?;
            // SAFETY: all-zero bytes are a valid `tcp_info` (integers only).
            let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
            let mut len = libc::socklen_t::try_from(size_of::<libc::tcp_info>()).ok()?;
            // SAFETY: `fd` is the socket of the connection this was taken from (`of`), and only
            // the code that owns that connection calls this, while it owns it (`SendQueue::of`'s
            // contract): the descriptor is open and is that socket. getsockopt writes at most
            // `len` bytes (the size of `info`, which it points to and which lives across the
            // call) and stores in `len` how many it wrote; both pointers are to locals of the
            // right types.
            let rc = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, std::ptr::addr_of_mut!(info).cast(), &mut len) };
            // Every field read here is in the struct's first version (Linux 2.6), but a kernel
            // that wrote fewer bytes than they need is not trusted with them.
            let needed = offset_of!(libc::tcp_info, tcpi_last_ack_recv) + size_of::<u32>();
            if rc != 0 || usize::try_from(len).ok()? < needed {
                return None;
            }
            Some(Silence {
                waiting: info.tcpi_unacked > 0,
                since_ack: std::time::Duration::from_millis(u64::from(info.tcpi_last_ack_recv)),
            })
        }
        #[cfg(not(target_os = "linux"))]
        None
    }
}

/// A text file operators write (a secret, token, credentials or fleet file, a configuration), as
/// Windows editors and shells save them too: a UTF-8 byte-order mark (Notepad before 1903,
/// PowerShell 5.1's `Out-File -Encoding utf8`) is left out, and UTF-16 with its mark (PowerShell
/// 5.1's `>`) is decoded, on every platform, since such files are copied between them. Anything
/// else must be UTF-8.
///
/// # Errors
/// The file cannot be read, or is neither (`InvalidData`, saying to save it as UTF-8).
pub fn read_text(path: &Path) -> std::io::Result<String> {
    decode_text(std::fs::read(path)?).map_err(|m| std::io::Error::new(std::io::ErrorKind::InvalidData, m))
}

/// [`read_text`]'s decoding of a file's bytes.
///
/// # Errors
/// What is wrong with them.
pub fn decode_text(bytes: Vec<u8>) -> Result<String, String> {
    const SAVE: &str = "save it as UTF-8 (or ASCII)";
    let utf16 = |rest: &[u8], unit: fn([u8; 2]) -> u16| {
        if !rest.len().is_multiple_of(2) {
            return Err(format!("UTF-16 text cut in the middle of a character: {SAVE}"));
        }
        let units: Vec<u16> = rest.chunks_exact(2).map(|c| unit([c[0], c[1]])).collect();
        String::from_utf16(&units).map_err(|_| format!("not valid UTF-16 text: {SAVE}"))
    };
    match bytes.as_slice() {
        [0xEF, 0xBB, 0xBF, rest @ ..] => String::from_utf8(rest.to_vec()).map_err(|e| not_utf8(&e, 3)),
        [0xFF, 0xFE, rest @ ..] => utf16(rest, u16::from_le_bytes),
        [0xFE, 0xFF, rest @ ..] => utf16(rest, u16::from_be_bytes),
        _ => String::from_utf8(bytes).map_err(|e| not_utf8(&e, 0)),
    }
}

/// What a file that is not UTF-8 is told (where, by byte offset from its start).
fn not_utf8(e: &std::string::FromUtf8Error, skipped: usize) -> String {
    format!(
        "not UTF-8 text (byte {} is not): save it as UTF-8 (or ASCII)",
        e.utf8_error().valid_up_to() + skipped
    )
}

/// Whether several sockets of this process can accept on one port (`SO_REUSEPORT`), which is how
/// each runtime thread gets its own. Windows has no such option: its `SO_REUSEADDR` would let
/// another process take the port as well, so there one runtime thread serves every listener.
pub const PORT_SHARING: bool = cfg!(unix);

/// The runtime threads [`crate::server::start::bind`] can use for `wanted`: all of them where
/// ports can be shared ([`PORT_SHARING`]), else one, with a warning when more were asked for.
pub fn runtime_threads(wanted: usize) -> usize {
    if PORT_SHARING {
        return wanted.max(1);
    }
    if wanted > 1 {
        tracing::warn!(wanted, "one runtime thread on this platform: sockets cannot share a port here");
    }
    1
}

/// Sets the options a listening socket needs before `bind`. On Unix `SO_REUSEADDR` (a restart
/// binds at once despite connections in TIME_WAIT) and, when `share` is set, `SO_REUSEPORT` (one
/// socket per runtime thread on one port, the kernel spreads connections over them). On Windows
/// neither: there `SO_REUSEADDR` would let any other process bind the same port and take
/// connections, and a port in TIME_WAIT does not block a new listener anyway. Windows' default
/// then lets only a process of the same user that sets `SO_REUSEADDR` share the port;
/// `SO_EXCLUSIVEADDRUSE` would close that too, but socket2 does not offer it and a raw
/// `setsockopt` would need `unsafe`.
///
/// # Errors
/// The OS refuses an option.
pub fn prepare_listening_socket(socket: &socket2::Socket, share: bool) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        socket.set_reuse_address(true)?;
        if share {
            socket.set_reuse_port(true)?;
        }
    }
    #[cfg(not(unix))]
    let _ = (socket, share);
    Ok(())
}

/// A file's identity, to notice a replaced file (a renamed-over certificate, a swapped symlink)
/// even when its size and modification time look the same: device and inode on Unix; on Windows
/// (where the volume and file index need an unstable API) the creation time, which a file
/// written anew and renamed into place brings with it.
pub fn file_identity(m: &std::fs::Metadata) -> (u64, u64) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        (m.dev(), m.ino())
    }
    #[cfg(windows)]
    {
        use std::os::windows::fs::MetadataExt;
        (m.creation_time(), 0)
    }
}

/// The soft limit on open files in force, if the platform has one (Windows has no such limit
/// on sockets).
pub fn open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        rustix::process::getrlimit(rustix::process::Resource::Nofile).current
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Whether stderr, a terminal, takes colours' escape sequences. On Windows a console does from
/// Windows 10 on, once asked to (virtual terminal processing; Windows Terminal always does): asked
/// here, and no colours where it says no. Elsewhere terminals do.
pub fn console_takes_colours() -> bool {
    #[cfg(windows)]
    #[allow(unsafe_code)]
    #[deny(clippy::undocumented_unsafe_blocks)]
    {
        use windows_sys::Win32::System::Console::{
            GetConsoleMode, GetStdHandle, SetConsoleMode, CONSOLE_MODE, ENABLE_VIRTUAL_TERMINAL_PROCESSING, STD_ERROR_HANDLE,
        };
        // SAFETY: GetStdHandle takes a constant and returns a handle (or null / invalid, which
        // the next call fails on); it hands over no ownership, and nothing here closes it.
        let handle = unsafe { GetStdHandle(STD_ERROR_HANDLE) };
        let mut mode: CONSOLE_MODE = 0;
        // SAFETY: `mode` is a live, writable CONSOLE_MODE for the call's duration; a handle
        // that is not a console's makes the call fail (0), which is answered below.
        if unsafe { GetConsoleMode(handle, &mut mode) } == 0 {
            return false;
        }
        if mode & ENABLE_VIRTUAL_TERMINAL_PROCESSING != 0 {
            return true;
        }
        // SAFETY: the same handle, a console's (GetConsoleMode took it); the mode is a plain
        // bit set, refused (0) by consoles older than Windows 10.
        unsafe { SetConsoleMode(handle, mode | ENABLE_VIRTUAL_TERMINAL_PROCESSING) != 0 }
    }
    #[cfg(not(windows))]
    {
        true
    }
}

/// Creates the directory `dir` (not reusing one that exists) that only this user can write: mode
/// 0700 on Unix; on Windows it inherits the ACL of its parent, the user's own temp directory.
///
/// # Errors
/// It exists already, or cannot be created.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(dir)
    }
    #[cfg(not(unix))]
    {
        std::fs::DirBuilder::new().create(dir)
    }
}

/// The unix-socket types on Windows: uninhabited, so code that matches on a unix backend compiles
/// and its arms are provably never reached; connecting fails with [`UNIX_SOCKETS_UNAVAILABLE`]
/// (configurations and command lines are refused earlier; this is for a token file's line).
#[cfg(windows)]
mod windows {
    use std::convert::Infallible;
    use std::io;
    use std::marker::PhantomData;
    use std::path::Path;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::UNIX_SOCKETS_UNAVAILABLE;

    /// A unix stream socket, which Windows builds never have.
    #[derive(Debug)]
    pub enum UnixStream {}

    impl UnixStream {
        /// Always fails: there are no unix sockets here.
        ///
        /// # Errors
        /// Always, [`io::ErrorKind::Unsupported`].
        pub async fn connect(_path: impl AsRef<Path>) -> io::Result<UnixStream> {
            Err(io::Error::new(io::ErrorKind::Unsupported, UNIX_SOCKETS_UNAVAILABLE))
        }

        /// The two directions (never called: there is no value to call it on).
        pub fn split(&mut self) -> (UnixReadHalf<'_>, UnixWriteHalf<'_>) {
            match *self {}
        }
    }

    /// The read side of a [`UnixStream`] (uninhabited).
    #[derive(Debug)]
    pub struct UnixReadHalf<'a>(Infallible, PhantomData<&'a ()>);

    /// The write side of a [`UnixStream`] (uninhabited).
    #[derive(Debug)]
    pub struct UnixWriteHalf<'a>(Infallible, PhantomData<&'a ()>);

    impl tokio::io::AsyncRead for UnixReadHalf<'_> {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut tokio::io::ReadBuf<'_>) -> Poll<io::Result<()>> {
            match self.0 {}
        }
    }

    impl tokio::io::AsyncWrite for UnixWriteHalf<'_> {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
            match self.0 {}
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            match self.0 {}
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            match self.0 {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::decode_text;

    /// What Windows editors and shells save reads as the text they were given; anything else
    /// that is not UTF-8 is refused with what to do.
    #[test]
    fn text_files_saved_with_a_byte_order_mark_or_as_utf16_read_as_their_text() {
        let text = "s3cret-é\r\n";
        let utf16 = |le: bool| {
            let mut out = if le { vec![0xFF, 0xFE] } else { vec![0xFE, 0xFF] };
            for unit in text.encode_utf16() {
                out.extend(if le { unit.to_le_bytes() } else { unit.to_be_bytes() });
            }
            out
        };
        let bom = [&[0xEF, 0xBB, 0xBF][..], text.as_bytes()].concat();
        for bytes in [text.as_bytes().to_vec(), bom, utf16(true), utf16(false)] {
            assert_eq!(decode_text(bytes).unwrap(), text);
        }
        // Latin-1, a UTF-16 file cut short, UTF-16 without its mark.
        let latin1 = decode_text(b"caf\xe9\n".to_vec()).unwrap_err();
        assert_eq!(latin1, "not UTF-8 text (byte 3 is not): save it as UTF-8 (or ASCII)");
        assert!(decode_text(vec![0xFF, 0xFE, b'a']).unwrap_err().contains("save it as UTF-8"));
        assert!(decode_text(vec![0xFF, 0xFE, 0x00, 0xD8]).unwrap_err().contains("not valid UTF-16"));
        assert!(decode_text(vec![b'a', 0, b'b', 0, 0xFF]).is_err());
    }
}
