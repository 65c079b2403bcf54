//! The step machine of one daemon-run job: what the GitHub Actions workflow used to do.
//!
//! `key_minted` → `vm_created` → `vm_running` → `network_configured` → done. Every step is
//! idempotent and ends in a fenced checkpoint (a `job_events` row, `current_step` on the job and
//! on its agent instance), so a resumed attempt starts from what an earlier one recorded:
//!
//! - No server can exist for a job that never minted a key (the key checkpoint precedes every
//!   create), so only a resumed attempt looks servers up by label before creating; it adopts
//!   what it finds. A `uniqueness_error` adopts by name; a create whose outcome is unknown looks
//!   again by label. A create is never retried blindly.
//! - The key secret exists only in memory and in the server's user_data. A resumed attempt that
//!   finds no server revokes the old key and mints a new one; one that finds the server keeps it.
//! - Waiting is done by the shared watchers (`watch.rs`), never by polling per job.
//! - A terminal failure (fatal error, deadline, retries spent) rolls back: server deleted (retried
//!   through 429s and 5xx), device deleted, key revoked; the reaper (`reaper.rs`) is the backstop
//!   for anything a crash leaves behind. The rollback runs only after the fenced write that
//!   decided it (the worker's `fail`), while the lease is held, and confirms the lease before
//!   every delete and revoke: a worker whose job was taken over touches nothing.
//!
//! Must not: hold a database transaction across a cloud call (the queue API has none to hold),
//! or write anything after its lease is lost.
//!
//! Layout: `provisioner` (the handler's parts and its failpoint hook), `handler` (what the
//! worker calls), `attempt` (one attempt: checkpoints, stop/deadline checks) with its steps in
//! `create` (`key_minted`, `vm_created`) and `join` (`vm_running`, `network_configured`),
//! `rollback` (with `lease_guard` and the patience of `retry`), `stop` (why an attempt ended),
//! `keys` (revoking a job's keys), `naming` (a job's server name, labels, key description),
//! `settings`, `startup` (the server-type check), `failpoint`, and the shared parts:
//! `cloud_init`, `watch` (batched watchers), `reaper`. Step names are the domain's `Step`.

mod attempt;
pub mod cloud_init;
mod create;
mod failpoint;
mod handler;
mod join;
mod keys;
mod lease_guard;
mod naming;
mod provisioner;
pub mod reaper;
mod retry;
mod rollback;
mod settings;
mod startup;
mod stop;
pub mod watch;

pub use failpoint::Failpoint;
pub use keys::revoke_job_keys;
pub use naming::{MANAGED_BY, job_selector, key_description, server_name};
pub use provisioner::Provisioner;
pub use settings::ProvisionSettings;
pub use startup::{StartupCheckError, usable_regions};
