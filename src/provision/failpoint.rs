//! Failpoints: a hook the tests and the chaos drills inject to stop an attempt or a rollback dead
//! at a named point, as a killed process would. An injected closure (library API: only code
//! that builds a `Provisioner` itself can install one), not a config key, an environment
//! variable or a cargo feature: nothing `provisiond serve` reads can turn one on, and the tests
//! that use it exercise the same build that ships (docs/DECISIONS.md).
//!
//! Points: `before_key`, `after_key`, `before_create`, `after_create`,
//! `after_checkpoint:<step>`, `rollback:<what>`.

use std::sync::Arc;

/// A test and chaos hook: called with a point's name at every step boundary; `true` makes the
/// attempt stop dead there, writing nothing more, as if the process had died.
pub type Failpoint = Arc<dyn Fn(&str) -> bool + Send + Sync>;
