//! A fake payment provider for the tests and the demo binary. Like Stripe, it keeps the
//! first outcome of each idempotency key and answers it again for the same key (the same
//! charge, or the same decline), so a key never charges twice; the same key with another
//! amount is refused. Its ledger is the money it actually took.
//!
//! It can decline an account's card, answer slowly, and fail every n-th call with an unknown
//! outcome: alternately before anything was charged, and after the charge went through (the
//! response lost on the way back, the case idempotency keys exist for).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{Charge, ChargeError, ChargeRequest, PaymentProvider};

/// One payment the provider took.
#[derive(Clone, Debug)]
pub struct ChargeRecord {
    pub charge: Charge,
    pub key: String,
    pub account: String,
    pub reload_request: i64,
}

pub struct FakeProvider {
    latency: Duration,
    /// makes charge ids unique across runs (a payment id completes one request, ever)
    run: u64,
    state: Mutex<State>,
}

impl Default for FakeProvider {
    fn default() -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        FakeProvider {
            latency: Duration::ZERO,
            run: now.as_micros() as u64,
            state: Mutex::default(),
        }
    }
}

#[derive(Default)]
struct State {
    /// key → the first outcome, and the amount and currency it was asked for
    saved: HashMap<String, (Result<Charge, String>, i64, String)>,
    ledger: Vec<ChargeRecord>,
    /// every call's key, in order
    calls: Vec<String>,
    declining: HashMap<String, String>,
    fail_every: u64,
}

impl FakeProvider {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every call takes this long (a network round trip).
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Every n-th call fails with an unknown outcome, alternately before and after charging.
    pub fn failing_every(self, n: u64) -> Self {
        self.state.lock().unwrap().fail_every = n;
        self
    }

    /// The account's card is declined with `reason`.
    pub fn decline(&self, account: &str, reason: &str) {
        self.state
            .lock()
            .unwrap()
            .declining
            .insert(account.into(), reason.into());
    }

    /// The money taken, one record per payment.
    pub fn ledger(&self) -> Vec<ChargeRecord> {
        self.state.lock().unwrap().ledger.clone()
    }

    /// Every call's idempotency key, in order (replays included).
    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Keys that were asked more than once.
    pub fn replayed_keys(&self) -> HashSet<String> {
        let calls = self.calls();
        let mut seen = HashSet::new();
        calls
            .into_iter()
            .filter(|k| !seen.insert(k.clone()))
            .collect()
    }

    fn charge_now(&self, req: &ChargeRequest) -> Result<Charge, ChargeError> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(req.idempotency_key.clone());
        let n = s.calls.len() as u64;
        if let Some((outcome, amount, currency)) = s.saved.get(&req.idempotency_key) {
            if (*amount, currency) != (req.amount, &req.currency) {
                return Err(ChargeError::Declined(format!(
                    "idempotency_error: key {} was used for {amount} {currency}",
                    req.idempotency_key
                )));
            }
            return outcome.clone().map_err(ChargeError::Declined);
        }
        let fault = s.fail_every > 0 && n.is_multiple_of(s.fail_every);
        if fault && (n / s.fail_every) % 2 == 1 {
            return Err(ChargeError::Unavailable(
                "connection reset before the charge".into(),
            ));
        }
        let outcome = match s.declining.get(&req.account) {
            Some(reason) => Err(reason.clone()),
            None => {
                let charge = Charge {
                    id: format!("ch_fake_{:x}_{}", self.run, s.ledger.len() + 1),
                    amount: req.amount,
                    currency: req.currency.clone(),
                };
                s.ledger.push(ChargeRecord {
                    charge: charge.clone(),
                    key: req.idempotency_key.clone(),
                    account: req.account.clone(),
                    reload_request: req.reload_request,
                });
                Ok(charge)
            }
        };
        s.saved.insert(
            req.idempotency_key.clone(),
            (outcome.clone(), req.amount, req.currency.clone()),
        );
        if fault {
            return Err(ChargeError::Unavailable(
                "timed out; the charge went through".into(),
            ));
        }
        outcome.map_err(ChargeError::Declined)
    }
}

impl PaymentProvider for FakeProvider {
    async fn charge(&self, req: &ChargeRequest) -> Result<Charge, ChargeError> {
        tokio::time::sleep(self.latency).await;
        self.charge_now(req)
    }
}
