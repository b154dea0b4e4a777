//! The `ElevenLabs-Signature` header: `t=<unix seconds>,v0=<hex HMAC-SHA256
//! of "<t>.<raw body>">`, keyed with the whole secret string as UTF-8, as the
//! official SDKs compute it. Several `v0` values (ElevenLabs' own rotation)
//! and several secrets (ours) are accepted; comparisons are constant-time.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The SDKs' default: older signatures are replays or badly delayed.
pub const DEFAULT_TOLERANCE_SECS: i64 = 30 * 60;
/// A clock skew we accept from ElevenLabs; further ahead is refused.
pub const MAX_FUTURE_SECS: i64 = 5 * 60;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing ElevenLabs-Signature header")]
    Missing,
    #[error("malformed ElevenLabs-Signature header: expected t=<unix seconds>,v0=<hex>")]
    Malformed,
    #[error("signature timestamp is older than the tolerance")]
    Expired,
    #[error("signature timestamp is in the future")]
    FromTheFuture,
    #[error("signature does not match")]
    Mismatch,
}

/// A parsed header: the timestamp and every `v0` signature it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeader {
    pub timestamp: i64,
    pub signatures: Vec<[u8; 32]>,
}

impl SignatureHeader {
    /// Strict: exactly one `t`, at least one `v0` of 64 hex digits, nothing
    /// else but other scheme versions (ignored, as the SDKs do).
    pub fn parse(header: &str) -> Result<Self, SignatureError> {
        let mut timestamp = None;
        let mut signatures = Vec::new();
        for part in header.split(',') {
            let (key, value) = part
                .trim()
                .split_once('=')
                .ok_or(SignatureError::Malformed)?;
            match key {
                "t" => {
                    if timestamp.is_some()
                        || value.is_empty()
                        || !value.bytes().all(|b| b.is_ascii_digit())
                    {
                        return Err(SignatureError::Malformed);
                    }
                    timestamp = Some(
                        value
                            .parse::<i64>()
                            .map_err(|_| SignatureError::Malformed)?,
                    );
                }
                "v0" => {
                    let mut signature = [0_u8; 32];
                    hex::decode_to_slice(value, &mut signature)
                        .map_err(|_| SignatureError::Malformed)?;
                    signatures.push(signature);
                }
                key if key.starts_with('v') && key.len() > 1 => {}
                _ => return Err(SignatureError::Malformed),
            }
        }
        match timestamp {
            Some(timestamp) if !signatures.is_empty() => Ok(Self {
                timestamp,
                signatures,
            }),
            _ => Err(SignatureError::Malformed),
        }
    }
}

/// How old a valid signature was, so the caller can count stale ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedSignature {
    pub age_secs: i64,
}

/// Checks the header against the raw body with any of `secrets`, at `now`.
/// The signature is checked before the timestamp, so a forged header learns
/// nothing about our clock.
pub fn verify_signature(
    header: Option<&str>,
    body: &[u8],
    secrets: &[&str],
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<VerifiedSignature, SignatureError> {
    let header = SignatureHeader::parse(header.ok_or(SignatureError::Missing)?)?;
    let mut matched = false;
    for secret in secrets {
        for signature in &header.signatures {
            // Every combination is checked, so timing does not reveal which
            // secret or which position matched.
            matched |= mac_for(secret, header.timestamp, body)
                .verify_slice(signature)
                .is_ok();
        }
    }
    if !matched {
        return Err(SignatureError::Mismatch);
    }
    let age_secs = now_unix - header.timestamp;
    if age_secs > tolerance_secs {
        return Err(SignatureError::Expired);
    }
    if -age_secs > MAX_FUTURE_SECS {
        return Err(SignatureError::FromTheFuture);
    }
    Ok(VerifiedSignature { age_secs })
}

fn mac_for(secret: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The header value ElevenLabs would send, for tests, the demo and the
/// load generator.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let digest = mac_for(secret, timestamp, body).finalize().into_bytes();
    format!("t={timestamp},v0={}", hex::encode(digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SDK_BODY: &[u8] = br#"{"event_type": "speech.completed", "id": "123456"}"#;
    const SDK_HEADER: &str =
        "t=1600000000,v0=f8a0d1dc33ee963cb54d2f31514555995e93313c9d2042c030adbb82b87fae13";

    #[test]
    fn the_official_sdk_vector_verifies() {
        let verified = verify_signature(
            Some(SDK_HEADER),
            SDK_BODY,
            &["test_secret"],
            1_600_000_010,
            DEFAULT_TOLERANCE_SECS,
        );
        assert_eq!(verified, Ok(VerifiedSignature { age_secs: 10 }));
        assert_eq!(sign("test_secret", 1_600_000_000, SDK_BODY), SDK_HEADER);
    }

    #[test]
    fn a_changed_body_secret_or_timestamp_fails() {
        let now = 1_600_000_000;
        assert_eq!(
            verify_signature(
                Some(SDK_HEADER),
                b"{}",
                &["test_secret"],
                now,
                DEFAULT_TOLERANCE_SECS
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(
                Some(SDK_HEADER),
                SDK_BODY,
                &["other_secret"],
                now,
                DEFAULT_TOLERANCE_SECS
            ),
            Err(SignatureError::Mismatch)
        );
        let moved = SDK_HEADER.replace("t=1600000000", "t=1600000001");
        assert_eq!(
            verify_signature(
                Some(&moved),
                SDK_BODY,
                &["test_secret"],
                now,
                DEFAULT_TOLERANCE_SECS
            ),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn old_and_future_timestamps_are_refused() {
        let t = 1_600_000_000;
        let verify = |now| {
            verify_signature(
                Some(SDK_HEADER),
                SDK_BODY,
                &["test_secret"],
                now,
                DEFAULT_TOLERANCE_SECS,
            )
        };
        assert!(verify(t + DEFAULT_TOLERANCE_SECS).is_ok());
        assert_eq!(
            verify(t + DEFAULT_TOLERANCE_SECS + 1),
            Err(SignatureError::Expired)
        );
        assert!(verify(t - MAX_FUTURE_SECS).is_ok());
        assert_eq!(
            verify(t - MAX_FUTURE_SECS - 1),
            Err(SignatureError::FromTheFuture)
        );
    }

    #[test]
    fn rotation_accepts_either_secret_and_any_v0() {
        let t = 1_700_000_000;
        let with_new = sign("new_secret_0123456789abcdef0123456789", t, b"body");
        let old_v0 = sign("old_secret", t, b"body");
        let both = format!("{with_new},{}", old_v0.split_once(',').unwrap().1);
        for secrets in [
            &["old_secret"][..],
            &["new_secret_0123456789abcdef0123456789"],
            &["x", "old_secret"],
        ] {
            assert!(
                verify_signature(Some(&both), b"body", secrets, t, DEFAULT_TOLERANCE_SECS).is_ok()
            );
        }
    }

    #[test]
    fn malformed_headers_are_refused_clearly() {
        let sig = "0".repeat(64);
        for header in [
            "",
            "garbage",
            "t=1600000000",
            &format!("v0={sig}"),
            &format!("t=abc,v0={sig}"),
            &format!("t=-5,v0={sig}"),
            &format!("t=1,t=2,v0={sig}"),
            "t=1600000000,v0=zz",
            &format!("t=1600000000,v0={}", "0".repeat(63)),
            &format!("t=1600000000,x=1,v0={sig}"),
        ] {
            assert_eq!(
                verify_signature(
                    Some(header),
                    SDK_BODY,
                    &["s"],
                    1_600_000_000,
                    DEFAULT_TOLERANCE_SECS
                ),
                Err(SignatureError::Malformed),
                "{header:?}"
            );
        }
        assert_eq!(
            verify_signature(None, SDK_BODY, &["s"], 0, DEFAULT_TOLERANCE_SECS),
            Err(SignatureError::Missing)
        );
    }

    /// A fuzz-like loop: random and mutated headers never panic, and
    /// whatever parses re-serialises to something that parses the same.
    #[test]
    fn random_and_mutated_headers_never_panic() {
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"tv0=,1234567890abcdefABCDEF -\xc3\xa9x";
        for round in 0..5_000 {
            let mut header: Vec<u8> = if round % 2 == 0 {
                SDK_HEADER.as_bytes().to_vec()
            } else {
                (0..(next() % 150))
                    .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                    .collect()
            };
            for _ in 0..(next() % 6) {
                if header.is_empty() {
                    break;
                }
                let at = (next() % header.len() as u64) as usize;
                match next() % 3 {
                    0 => header[at] = alphabet[(next() % alphabet.len() as u64) as usize],
                    1 => header.truncate(at),
                    _ => header.insert(at, b','),
                }
            }
            let Ok(text) = std::str::from_utf8(&header) else {
                continue;
            };
            if let Ok(parsed) = SignatureHeader::parse(text) {
                let rebuilt = std::iter::once(format!("t={}", parsed.timestamp))
                    .chain(
                        parsed
                            .signatures
                            .iter()
                            .map(|s| format!("v0={}", hex::encode(s))),
                    )
                    .collect::<Vec<_>>()
                    .join(",");
                assert_eq!(SignatureHeader::parse(&rebuilt), Ok(parsed), "{text:?}");
            }
            let _ = verify_signature(
                Some(text),
                SDK_BODY,
                &["test_secret"],
                1_600_000_000,
                DEFAULT_TOLERANCE_SECS,
            );
        }
    }
}
