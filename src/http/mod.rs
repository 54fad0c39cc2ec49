//! The HTTP side of a connection: read one request head (bounded in size and time), decide what it
//! is, and answer it.
//!
//! Every outcome is decided here, before any backend is touched:
//! - a WebSocket upgrade on a known route gets `101` and becomes a session ([`Upgrade`]);
//! - a missing `Host` (HTTP/1.1) or two of them get `400`, whatever the request;
//! - an upgrade with no route gets `404`, a bad method `405`, malformed upgrade headers `400`, a
//!   `Sec-WebSocket-Version` other than 13 gets `426` naming 13, a head over [`MAX_HEAD`] gets `431`;
//!   every check that needs only the head runs before the route lookup;
//! - a client whose certificate's common name the route does not list gets `403`, a route at its
//!   `max_sessions` `503`: the bodies say what the client may know, the log line says which route;
//! - a plain request on a route gets `426`; with a `web` directory, plain GET/HEAD requests get static
//!   files (see [`web`]: `..` in any spelling, hidden files and symlinks out of the directory get
//!   `404`), otherwise `404`. Where the listener has a `web_auth` ([`WebGuard`]), each of them
//!   must pass it first, with the answers and brake an upgrade's authentication has. A static answer may keep the connection for the next request
//!   ([`Outcome::Answered`]'s `next`, read with [`read_request_after`]); every other answer closes it.
//!
//! The files, each below its users (no two import each other):
//!
//! | file | owns |
//! |---|---|
//! | [`progress`] | the answer's write deadline, pushed back by each write that moves bytes |
//! | [`request`] | reading a request head (httparse), writing a short answer, lingering after it |
//! | [`web`] | static files and directory listings under a listener's `web` directory |
//! | [`upgrade`] | the decision: upgrade checks, route lookup, subprotocol, the `101` |
//!
//! Parsing is `httparse`'s; the answers are written here because a bridge needs only a handful of
//! fixed responses and must control exactly when the connection becomes a WebSocket.

pub mod progress;
pub mod request;
pub mod upgrade;
pub mod web;

pub use progress::Progress;
pub use request::{read_request, read_request_after, Head, Rejection, MAX_HEAD, MAX_HEADERS};
pub use upgrade::{choose_subprotocol, respond, write_switching, Context, Outcome, Upgrade};
pub use web::{Web, WebGuard, WebRoot};
