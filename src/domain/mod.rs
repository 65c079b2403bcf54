//! The domain: job states, who executes a job, which status changes are legal, the step names
//! and their UI mapping, and what an identifier may look like. No I/O, no async; every other
//! part depends on it and it depends on none.
//!
//! Layout: `job` (status, executor, transitions, identifier rules), `step` (progress steps).

mod job;
mod step;

pub use job::{Executor, JobStatus, UnknownVariant, valid_business_key, valid_region_name};
pub use step::{Step, StepState, UiStep, derive as ui_steps};
