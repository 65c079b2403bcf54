//! Signature checks of inbound webhooks: Stripe's `Stripe-Signature` and the runners'
//! `X-Signature`, plus the admin bearer token. Pure functions over raw bytes, no I/O.
//!
//! Must not: re-serialise a body before checking it (the HMAC is over the exact bytes), compare
//! secrets with `==` (timing), or put a secret, signature or body in an error message.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::time::Duration;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// The most `v1` entries of one `Stripe-Signature` header that are checked.
const MAX_V1: usize = 8;

/// Why a signature was refused. The message is safe to return to the caller and to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing signature header")]
    Missing,
    #[error("unable to extract timestamp and signatures from header")]
    Malformed,
    #[error("no signatures found with expected scheme")]
    NoV1,
    #[error("no signature matches the payload")]
    Mismatch,
    #[error("timestamp outside the tolerance zone")]
    OutsideTolerance,
}

fn mac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    for part in parts {
        mac.update(part);
    }
    mac
}

/// Whether `given_hex` (either case) is the HMAC-SHA256 of `parts` under `key`. Wrong-length or
/// non-hex input is refused before any MAC is computed; the comparison itself is constant-time.
fn hex_matches(key: &[u8], parts: &[&[u8]], given_hex: &str) -> bool {
    if given_hex.len() != 64 {
        return false;
    }
    let Ok(given) = hex::decode(given_hex) else {
        return false;
    };
    mac(key, parts).verify_slice(&given).is_ok()
}

fn within(t: i64, now: i64, tolerance: Duration) -> bool {
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    now.abs_diff(t) <= tolerance.unsigned_abs()
}

/// Verifies a `Stripe-Signature` header (`t=…,v1=…[,v1=…][,v0=…]`) against the raw body.
///
/// Any `v1` may match (several while a secret is rolled); `v0` and unknown schemes are ignored
/// (downgrade protection). Unlike Stripe's libraries, a timestamp too far in the *future* is
/// refused as well: a signature minted ahead of time is as much a replay as an old one.
pub fn verify_stripe(
    header: Option<&str>,
    body: &[u8],
    secret: &str,
    tolerance: Duration,
    now_unix: i64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut timestamp = None;
    let mut v1 = Vec::new();
    for item in header.split(',') {
        let Some((key, value)) = item.trim().split_once('=') else {
            continue;
        };
        match key {
            "t" => timestamp = value.parse::<i64>().ok(),
            // Stripe sends one, or two while a secret rolls; a header stuffed with hundreds
            // must not buy hundreds of HMACs.
            "v1" if v1.len() < MAX_V1 => v1.push(value),
            _ => {}
        }
    }
    let t = timestamp.ok_or(SignatureError::Malformed)?;
    if v1.is_empty() {
        return Err(SignatureError::NoV1);
    }
    let t_text = t.to_string();
    // Check every entry (no early exit) so the time taken does not say which one matched.
    let matched = v1.iter().fold(false, |acc, sig| {
        acc | hex_matches(secret.as_bytes(), &[t_text.as_bytes(), b".", body], sig)
    });
    if !matched {
        return Err(SignatureError::Mismatch);
    }
    if !within(t, now_unix, tolerance) {
        return Err(SignatureError::OutsideTolerance);
    }
    Ok(())
}

/// Verifies a runner callback: `X-Signature` is the hex HMAC-SHA256 of the raw body (the seed's
/// scheme), or of `"{ts}.{body}"` when `X-Signature-Timestamp` is sent (the stricter scheme,
/// which [`verify_runner`]'s caller may require).
pub fn verify_runner(
    signature: Option<&str>,
    timestamp: Option<&str>,
    body: &[u8],
    secret: &str,
    require_timestamp: bool,
    tolerance: Duration,
    now_unix: i64,
) -> Result<(), SignatureError> {
    let signature = signature.ok_or(SignatureError::Missing)?;
    match timestamp {
        None if require_timestamp => Err(SignatureError::Missing),
        None => hex_matches(secret.as_bytes(), &[body], signature)
            .then_some(())
            .ok_or(SignatureError::Mismatch),
        Some(ts) => {
            let t: i64 = ts.trim().parse().map_err(|_| SignatureError::Malformed)?;
            if !hex_matches(
                secret.as_bytes(),
                &[ts.trim().as_bytes(), b".", body],
                signature,
            ) {
                return Err(SignatureError::Mismatch);
            }
            if !within(t, now_unix, tolerance) {
                return Err(SignatureError::OutsideTolerance);
            }
            Ok(())
        }
    }
}

/// Whether an `Authorization` header carries `Bearer <token>`. Constant-time in the token's
/// content (its length may leak, which says nothing useful about a random token).
pub fn bearer_matches(authorization: Option<&str>, token: &str) -> bool {
    let Some(given) = authorization.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    bool::from(given.trim().as_bytes().ct_eq(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Stripe's published test vector, recomputed with `openssl dgst -sha256 -hmac` before use.
    const VECTOR_BODY: &[u8] = br#"{"id":"evt_test_webhook","object":"event"}"#;
    const VECTOR_SIG: &str = "88a022085c6bdb887b02cb26ff76dd681234d9675c0f22844059f55552a8883a";
    const T: i64 = 1_492_774_577;
    const TOL: Duration = Duration::from_secs(300);

    #[test]
    fn stripe_vector_and_schemes() {
        let ok = |h: &str, now| verify_stripe(Some(h), VECTOR_BODY, "whsec_test_secret", TOL, now);
        assert_eq!(ok(&format!("t={T},v1={VECTOR_SIG}"), T), Ok(()));
        assert_eq!(
            ok(&format!("t={T},v1={}", VECTOR_SIG.to_uppercase()), T),
            Ok(())
        );
        assert_eq!(
            ok(&format!("t={T},v1={},v1={VECTOR_SIG}", "0".repeat(64)), T),
            Ok(())
        );
        assert_eq!(
            ok(&format!("t={T},v0={VECTOR_SIG}"), T),
            Err(SignatureError::NoV1)
        );
        assert_eq!(
            ok(&format!("t={T},v1={VECTOR_SIG}"), T + 301),
            Err(SignatureError::OutsideTolerance)
        );
        assert_eq!(
            ok(&format!("t={T},v1={VECTOR_SIG}"), T - 301),
            Err(SignatureError::OutsideTolerance)
        );
        assert_eq!(
            ok(&format!("v1={VECTOR_SIG}"), T),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            ok(&format!("t={T},v1={}", &VECTOR_SIG[1..]), T),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn runner_vector_plain_and_timestamped() {
        // The runner protocol's example vector (key `runner_secret`), recomputed with openssl.
        let body = br#"{"job_id":"job_123","status":"ok"}"#;
        let sig = "4322529ef6beb3e84b5b520e29ed3684038e1e3c74b4575ca809c97af42ca317";
        let v = |s: &str, ts: Option<&str>, req| {
            verify_runner(Some(s), ts, body, "runner_secret", req, TOL, T)
        };
        assert_eq!(v(sig, None, false), Ok(()));
        assert_eq!(v(&sig.to_uppercase(), None, false), Ok(()));
        assert_eq!(v(sig, None, true), Err(SignatureError::Missing));
        assert_eq!(v(&sig[..62], None, false), Err(SignatureError::Mismatch));
        let ts = T.to_string();
        let timed = hex::encode(
            mac(b"runner_secret", &[ts.as_bytes(), b".", body])
                .finalize()
                .into_bytes(),
        );
        assert_eq!(v(&timed, Some(&ts), true), Ok(()));
        assert_eq!(v(sig, Some(&ts), false), Err(SignatureError::Mismatch));
        let old = (T - 301).to_string();
        let old_sig = hex::encode(
            mac(b"runner_secret", &[old.as_bytes(), b".", body])
                .finalize()
                .into_bytes(),
        );
        assert_eq!(
            v(&old_sig, Some(&old), false),
            Err(SignatureError::OutsideTolerance)
        );
    }

    #[test]
    fn bearer() {
        assert!(bearer_matches(Some("Bearer s3cret"), "s3cret"));
        assert!(!bearer_matches(Some("Bearer s3cre"), "s3cret"));
        assert!(!bearer_matches(Some("s3cret"), "s3cret"));
        assert!(!bearer_matches(None, "s3cret"));
    }
}
