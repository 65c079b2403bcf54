//! provisiond: turns a paid order into a running, tailnet-joined Hetzner VM.
//!
//! One crate, one binary with roles (see `main.rs`). PostgreSQL is the only state; every part
//! below talks to it through `db` and never holds a transaction across an external call.
//!
//! Layers (docs/ARCHITECTURE.md), each importing only from the ones below it:
//! `tools` (the commands for people: CLI bodies, demo, benchmarks, chaos) → `app` (the wiring
//! of `serve`) → `http` → `queue` ← `worker` → `provision` → `clients`; `config`, `secret`,
//! `metrics`, `telemetry`, `tls`, `db` beneath them; `domain` at the bottom, with no I/O. `sim`
//! stands apart: it imports none of the clients it stands in for, and they import nothing of it.

pub mod app;
pub mod clients;
pub mod config;
pub mod db;
pub mod domain;
pub mod http;
pub mod metrics;
pub mod provision;
pub mod queue;
pub mod secret;
pub mod sim;
pub mod telemetry;
pub mod tls;
pub mod tools;
pub mod worker;
