//! `provisiond bench …`: measurements reported in BENCHMARKS.md. Never run by tests.
//!
//! Each benchmark creates a scratch database on the configured server (`tools::scratch`), so it
//! never touches real jobs, and drops it afterwards. Layout: `queue` (claim throughput and
//! pickup latency, no-op handler), `http` (signed webhooks and heartbeats through the server),
//! `provision` (the step machine against the simulator), `fleet` (several `serve` processes
//! sharing one project's request budget), `common` (the `pgbench -N` baseline).

mod common;
pub mod fleet;
pub mod http;
pub mod provision;
pub mod queue;
