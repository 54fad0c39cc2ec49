//! Integration tests: real bridge, real TCP backends, real WebSocket clients, all on 127.0.0.1
//! with ephemeral ports. One test binary (faster to build and link than one per file).
//! They run on Linux (unix sockets, rlimits, symlinks); the Windows build is tested from here,
//! under Wine (`windows`).
#![cfg(unix)]

#[path = "../common/mod.rs"]
mod common;

mod abuse;
mod admin;
mod agent;
mod balancer;
mod binary;
mod cli;
mod defaults;
mod handshake;
mod headers;
mod lifecycle;
mod policy;
mod process;
mod record;
mod redis;
mod relay;
mod routing;
mod systemd;
mod tls;
mod tokenapi;
mod web;
mod windows;
