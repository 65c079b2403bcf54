//! provisiond: turns a paid order into a running, tailnet-joined Hetzner VM.
//!
//! One crate, one binary with roles (see `main.rs`). PostgreSQL is the only state; every part
//! below talks to it through `db` and never holds a transaction across an external call.

pub mod app;
pub mod bench;
pub mod bench_http;
pub mod chaos;
pub mod clients;
pub mod config;
pub mod db;
pub mod demo;
pub mod domain;
pub mod http;
pub mod metrics;
pub mod provision;
pub mod queue;
pub mod secret;
pub mod sim;
pub mod telemetry;
pub mod tls;
pub mod worker;
