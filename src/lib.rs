//! wsbridge: a WebSocket-to-TCP bridge.
//!
//! Browser JavaScript can open a WebSocket but not a TCP socket; wsbridge accepts WebSocket
//! connections and relays each one to a backend TCP (or unix socket) service chosen by the route the
//! request matches, from an allow-list in the configuration.
//!
//! Data flows one way through the modules:
//!
//! | module | owns |
//! |---|---|
//! | [`cli`] | websockify-compatible arguments → the same [`config::Config`] a TOML file produces |
//! | [`config`] | the TOML model, defaults, validation with file/line/field errors |
//! | [`server`] | accept loops, connection limit, per-connection task and span, phases and deadlines, drain |
//! | [`server::start`] | starting a server as the binary does: open-file limit, runtime threads, binding, reload |
//! | [`slots`] | counted caps (connections, a route's sessions) that keep counting across a reload |
//! | [`http`] | one HTTP request: reading it and answering ([`http::request`]), the upgrade decision ([`http::upgrade`]), static files ([`http::web`]) |
//! | [`routes`] / [`tokens`] | the route table: path, token (inline, websockify token files and socket directories, JWTs, Redis and HTTP APIs under a deadline), host |
//! | [`tls`] | PEM → rustls configs, SNI, certificate reload, client certificates, TLS to backends |
//! | [`backend`] | connecting to a target under a deadline; the backend stream's operations |
//! | [`dns`] | host names resolved for backends and token APIs: one lookup per name at a time |
//! | [`relay`] | the pump: both directions, framing modes, keepalive, idle deadline, close codes |
//! | [`record`] | session recording (websockify's `--record`): a writer task per session, files noVNC's playback reads |
//! | [`frame`] | WebSocket frames: the client's parsed and unmasked in place, our headers |
//! | [`agent`] | agent mode: the `wsbridge agent` process, the server's agent endpoint and registry |
//! | [`demo`] | `wsbridge demo`: a chat server and page, for a first run with no setup |
//! | [`logging`] | the log filter and line format (text or JSON); escaping of peer-controlled text |
//! | [`policy`] | who may open a session: origins, client networks, authentication, caps per client address, the real client address |
//! | [`proxy`] | PROXY protocol v1/v2: read from a load balancer, sent to a backend |
//! | [`signals`] | shutdown and reload requests from the OS: Unix signals, Windows console events |
//! | [`systemd`] | socket activation (passed listening sockets) and the notify protocol (READY, RELOADING, STOPPING) |
//! | `service` | Windows only: running as a Windows service, installing and removing it |
//! | [`platform`] | what differs between Unix and Windows (unix sockets, port sharing, file identity) |
//! | [`admin`] | the admin listener: health, readiness, Prometheus metrics, live sessions |
//! | [`metrics`] | the counters and gauges (per session, never per message), the process metrics, and the live-session table |
//!
//! `main.rs` parses arguments, sets up logging ([`logging::init`]) and signals, and starts the
//! server through [`server::start`], as an embedder would (`examples/embed.rs`).
// No `unsafe` anywhere, except on Windows in the one module that calls WinHTTP for the agent's
// proxy settings (`agent::winhttp`) and the function that asks the console for colours
// (`platform::console_takes_colours`), and on Linux in the functions that ask a socket's send
// queue and acknowledgements (`platform::SendQueue`, `platform::Acks`: an ioctl, a getsockopt):
// each allows it with a SAFETY comment on every block.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod agent;
pub mod backend;
pub mod cli;
pub mod config;
pub mod demo;
pub mod dns;
pub mod frame;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod platform;
pub mod policy;
pub mod proxy;
pub mod record;
pub mod relay;
pub mod routes;
pub mod server;
#[cfg(windows)]
pub mod service;
pub mod signals;
pub mod slots;
pub mod systemd;
pub mod tls;
pub mod tokens;
