//! Logging: human-readable on a terminal, JSON otherwise (under systemd, journald gets one JSON
//! object per line). `RUST_LOG` filters; default `info`. Logs go to stderr so that command
//! output on stdout stays machine-readable.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

pub fn init() {
    init_with_default("info");
}

/// [`init`] with another filter when `RUST_LOG` is unset.
pub fn init_with_default(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let json = match std::env::var("PROVISIOND_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless; ignore it.
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
