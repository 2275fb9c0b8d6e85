//! Completion callbacks: what a delivery sends, how it is signed, and what a failed try leads
//! to.
//!
//! A job whose spec gave a `callback_url` is POSTed there once it is final (succeeded, failed
//! or cancelled), as the JSON job object that `GET /v1/jobs/{id}` answers. The store writes
//! the delivery's outbox row in the same transaction as the job's final state, and the
//! dispatcher's delivery task (`crate::dispatch`) claims due rows, sends them with
//! [`deliver`], and records what [`after_failure`] decides: delivery is at least once, retried
//! with backoff until `--callback-retry-secs` after the job finished.
//!
//! # The signature
//!
//! Every delivery carries `Offload-Signature: t=<unix seconds>,v1=<hex>`, where `<hex>` is
//! HMAC-SHA256, keyed with the server's `--callback-secret`, of the bytes
//! `<t>.<body>`: the timestamp as decimal digits, a full stop, and the request body exactly
//! as sent. A receiver recomputes it over the raw body, compares in constant time, and
//! refuses a `t` too far from its own clock (replays); [`verify`] does exactly that. Without a
//! secret the server sends no callbacks and refuses specs that ask for one (422): an unsigned
//! callback could not be told from a forged one.
//!
//! The URL must pass the same address rules as `http_get` ([`AddressRules`]): checked at
//! submit (a 422), and resolved and checked again at each try, the connection pinned to the
//! checked address. Redirects are not followed; any 2xx answer is a delivery, anything else
//! (or no answer within `--callback-timeout-ms`) a failed try.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::clock::Micros;
use crate::config::Settings;
use crate::dispatch::RetryPolicy;
use crate::store::{CallbackOutcome, Delivery};
use crate::task::{AddressError, AddressRules};

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "Offload-Signature";
/// The longest wait between two tries.
const BACKOFF_CAP: Duration = Duration::from_secs(3600);

/// How callbacks are sent, from the settings; none without a secret.
#[derive(Clone, Debug)]
pub struct CallbackOptions {
    pub secret: Arc<str>,
    pub rules: Arc<AddressRules>,
    /// How long after the job finished a callback is still tried.
    pub retry_for: Duration,
    pub backoff: RetryPolicy,
    /// Time limit of one request.
    pub timeout: Duration,
}

impl CallbackOptions {
    pub fn from_settings(settings: &Settings) -> Option<Self> {
        let secret = settings.callback_secret.as_deref()?;
        let base = Duration::from_millis(settings.callback_backoff_ms);
        Some(CallbackOptions {
            secret: secret.into(),
            rules: Arc::new(AddressRules::new(settings)),
            retry_for: Duration::from_secs(settings.callback_retry_secs),
            backoff: RetryPolicy {
                base,
                max: BACKOFF_CAP.max(base),
            },
            timeout: Duration::from_millis(settings.callback_timeout_ms),
        })
    }

    /// How long one try may take in all: resolving the host, then the request.
    pub fn try_limit(&self) -> Duration {
        self.timeout * 2
    }

    /// How long a claimed callback is held by its claimer before another may try it: one
    /// try's limit and a margin.
    pub fn lease(&self) -> Duration {
        self.try_limit() + Duration::from_secs(5)
    }
}

/// `t=<t>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

/// Why a signature was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the header is not `t=<unix seconds>,v1=<hex>`")]
    Malformed,
    #[error("the timestamp is further than the tolerance from now")]
    Stale,
    #[error("no v1 signature matches the body")]
    Mismatch,
}

/// Checks an `Offload-Signature` header against the raw body, as a receiver should: the
/// HMAC compared in constant time, and `t` within `tolerance_secs` of `now_secs`. Several
/// `v1=` entries are allowed (one matching is enough), so a sender may sign with an old and a
/// new secret while a receiver rotates.
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now_secs: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let mut t = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = Some(v.parse::<i64>().map_err(|_| SignatureError::Malformed)?),
            Some(("v1", v)) => signatures.push(decode_hex(v).ok_or(SignatureError::Malformed)?),
            _ => {}
        }
    }
    let t = t.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if (now_secs - t).abs() > tolerance_secs {
        return Err(SignatureError::Stale);
    }
    let matches = |sig: &[u8]| {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.verify_slice(sig).is_ok()
    };
    if signatures.iter().any(|s| matches(s)) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The policy for a failed try, in one place: try again after the backoff (base × 2^(try-1),
/// jittered, capped at an hour) while that still falls inside the retry window that opened
/// when the job finished; else give up.
pub fn after_failure(
    options: &CallbackOptions,
    attempt: u32,
    since: Micros,
    now: Micros,
    error: String,
) -> CallbackOutcome {
    let at = now.plus(options.backoff.backoff(attempt));
    if at > since.plus(options.retry_for) {
        CallbackOutcome::Failed { error }
    } else {
        CallbackOutcome::Retry { error, at }
    }
}

/// Sends one delivery: the job object, signed, to its callback URL. `Ok` on a 2xx answer;
/// otherwise what went wrong, for `last_error`.
pub async fn deliver(options: &CallbackOptions, delivery: &Delivery) -> Result<(), String> {
    let job = &delivery.job;
    let Some(callback) = &job.callback else {
        return Err("the job has no callback URL".into());
    };
    // Checked again: the rules may have changed since the submit (a restart with others).
    let url = options.rules.check("callback_url", &callback.url)?;
    let body = serde_json::to_vec(job).map_err(|e| format!("encoding the job: {e}"))?;
    let t = Micros::now().0.div_euclid(1_000_000);
    let send = async {
        let client = options
            .rules
            .client(&url, options.timeout)
            .await
            .map_err(|e| match e {
                AddressError::Unresolved(m) | AddressError::Refused(m) => m,
            })?;
        let response = client
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(
                reqwest::header::USER_AGENT,
                concat!("offload/", env!("CARGO_PKG_VERSION")),
            )
            .header(SIGNATURE_HEADER, sign(options.secret.as_bytes(), t, &body))
            .header("Offload-Job-Id", job.id.to_string())
            .body(body)
            .send()
            .await
            .map_err(|e| format!("POST failed: {e}"))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the receiver answered {status}"))
        }
    };
    tokio::time::timeout(options.try_limit(), send)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer within {} ms",
                options.try_limit().as_millis()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_and_a_changed_body_or_secret_does_not() {
        let header = sign(b"s3cret", 1_700_000_000, b"{\"a\":1}");
        assert!(header.starts_with("t=1700000000,v1="));
        assert_eq!(
            verify(b"s3cret", &header, b"{\"a\":1}", 1_700_000_010, 300),
            Ok(())
        );
        assert_eq!(
            verify(b"s3cret", &header, b"{\"a\":2}", 1_700_000_010, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"other", &header, b"{\"a\":1}", 1_700_000_010, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"s3cret", &header, b"{\"a\":1}", 1_700_001_000, 300),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(b"s3cret", "v1=abc", b"", 0, 300),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently: Python's hmac.new(b"key", b'1700000000.{"a":1}', sha256).
        assert_eq!(
            sign(b"key", 1_700_000_000, b"{\"a\":1}"),
            "t=1700000000,v1=a438e398bfafc57e4396bb7fc2304422f0f768e965d073ca313cb52e22e6ad03"
        );
    }

    #[test]
    fn a_failed_try_is_retried_inside_the_window_then_given_up() {
        let options = CallbackOptions {
            secret: "s".into(),
            rules: Arc::new(AddressRules::new(&Settings::with_data_dir("/tmp"))),
            retry_for: Duration::from_secs(10),
            backoff: RetryPolicy {
                base: Duration::from_secs(1),
                max: BACKOFF_CAP,
            },
            timeout: Duration::from_secs(1),
        };
        let since = Micros(1_000_000_000);
        match after_failure(&options, 1, since, since, "500".into()) {
            CallbackOutcome::Retry { at, error } => {
                assert!(at > since && at <= since.plus(Duration::from_secs(1)));
                assert_eq!(error, "500");
            }
            other => panic!("{other:?}"),
        }
        let late = since.plus(Duration::from_secs(9));
        assert_eq!(
            after_failure(&options, 5, since, late, "500".into()),
            CallbackOutcome::Failed {
                error: "500".into()
            }
        );
    }
}
