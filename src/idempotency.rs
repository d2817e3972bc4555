//! Request fingerprints. Each idempotent call stores a fingerprint of its
//! parameters, the first 16 bytes of their SHA-256; a replay with the same
//! key must produce the same fingerprint, otherwise it is the error
//! "idempotency key reused with different parameters".

use sha2::{Digest, Sha256};

use crate::error::{BillingError, Result};

pub struct Fingerprint(Sha256);

impl Fingerprint {
    pub fn new(operation: &str) -> Self {
        let mut h = Sha256::new();
        h.update(operation.as_bytes());
        Fingerprint(h)
    }

    /// Length-prefixed, so ("ab","c") and ("a","bc") differ.
    pub fn text(mut self, s: &str) -> Self {
        self.0.update((s.len() as u64).to_le_bytes());
        self.0.update(s.as_bytes());
        self
    }

    pub fn int(mut self, v: i64) -> Self {
        self.0.update(v.to_le_bytes());
        self
    }

    pub fn opt_int(self, v: Option<i64>) -> Self {
        match v {
            Some(v) => self.text("some").int(v),
            None => self.text("none"),
        }
    }

    /// The fingerprint stored with the key: 128 bits tell two requests
    /// apart as surely as 256 (a collision is a caller's own two requests
    /// under one key), and every usage event, grant and hold stores one, so
    /// each row and its log record are 16 bytes smaller.
    pub fn finish(self) -> Vec<u8> {
        self.0.finalize()[..FINGERPRINT_BYTES].to_vec()
    }
}

const FINGERPRINT_BYTES: usize = 16;

/// The one key-reuse rule: a replay of `key` must carry the fingerprint stored
/// with its first use; anything else is "idempotency key reused with
/// different parameters", and nothing is written. A fingerprint stored
/// before 0.2.0 is the whole SHA-256, whose first 16 bytes are the same
/// request's fingerprint now.
pub fn same_request(what: &'static str, key: &str, stored: &[u8], fresh: &[u8]) -> Result<()> {
    if stored.get(..FINGERPRINT_BYTES) == Some(fresh) {
        Ok(())
    } else {
        Err(BillingError::KeyReused {
            what,
            key: key.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(amount: i64) -> Fingerprint {
        Fingerprint::new("grant").text("org_1").int(amount)
    }

    #[test]
    fn a_fingerprint_is_the_first_16_bytes_of_the_sha256() {
        let whole = Sha256::new()
            .chain_update(b"grant")
            .chain_update(5u64.to_le_bytes())
            .chain_update(b"org_1")
            .chain_update(7i64.to_le_bytes())
            .finalize();
        assert_eq!(request(7).finish(), whole[..16].to_vec());
    }

    #[test]
    fn a_replay_matches_and_other_parameters_do_not() {
        let stored = request(7).finish();
        assert!(same_request("grant", "k", &stored, &request(7).finish()).is_ok());
        let err = same_request("grant", "k", &stored, &request(8).finish()).unwrap_err();
        assert!(matches!(err, BillingError::KeyReused { what: "grant", .. }));
    }

    #[test]
    fn a_whole_sha256_stored_before_0_2_0_still_matches_its_replay() {
        let legacy = request(7).0.finalize().to_vec();
        assert_eq!(legacy.len(), 32);
        assert!(same_request("grant", "k", &legacy, &request(7).finish()).is_ok());
        assert!(same_request("grant", "k", &legacy, &request(8).finish()).is_err());
    }

    #[test]
    fn a_stored_fingerprint_shorter_than_16_bytes_matches_nothing() {
        let fresh = request(7).finish();
        assert!(same_request("grant", "k", &fresh[..8], &fresh).is_err());
        assert!(same_request("grant", "k", &[], &fresh).is_err());
    }
}
