//! Request fingerprints. Each idempotent call stores the SHA-256 of its
//! parameters; a replay with the same key must produce the same fingerprint,
//! otherwise it is the error "idempotency key reused with different parameters".

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

    pub fn finish(self) -> Vec<u8> {
        self.0.finalize().to_vec()
    }
}

/// The one key-reuse rule: a replay of `key` must carry the fingerprint stored
/// with its first use; anything else is "idempotency key reused with
/// different parameters", and nothing is written.
pub fn same_request(what: &'static str, key: &str, stored: &[u8], fresh: &[u8]) -> Result<()> {
    if stored == fresh {
        Ok(())
    } else {
        Err(BillingError::KeyReused {
            what,
            key: key.to_string(),
        })
    }
}
