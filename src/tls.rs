//! The process's TLS crypto provider: rustls on ring.
//!
//! reqwest is built with `rustls-no-provider`, so it uses whatever provider the process has
//! installed; without one, building a client panics. Every constructor of an HTTP client in this
//! crate calls [`install_crypto_provider`] first, and so must a test that builds its own
//! `reqwest::Client`. Why ring and not aws-lc-rs (reqwest's default): the same TLS 1.2/1.3
//! suites for our two APIs, and a fraction of aws-lc-sys's C build time (BENCHMARKS.md).

use std::sync::Once;

/// Installs ring as the process-wide rustls provider. Idempotent and cheap after the first call;
/// a provider someone else installed first is left in place.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err means another provider was installed first: that one serves just as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A plain `reqwest::Client`, after installing the provider: for benchmarks, the demo and tests.
pub fn http_client() -> reqwest::Client {
    install_crypto_provider();
    reqwest::Client::new()
}
