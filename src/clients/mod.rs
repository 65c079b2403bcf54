//! HTTP clients for the Hetzner Cloud and Tailscale APIs (issue #3).
//!
//! Owns the wire protocol of both services: requests, lenient response models, error
//! classification, retries of idempotent calls (through the one loop in [`retry`]), and
//! Hetzner's per-project rate budget. Must not know about jobs, the database or the step
//! machine, and must never retry a non-idempotent call (server create, auth-key create) on its
//! own: the caller resolves an unknown outcome by looking the resource up.

mod call_metrics;
pub mod hetzner;
pub mod rate_budget;
pub mod retry;
pub mod tailscale;
