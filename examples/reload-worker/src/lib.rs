//! The auto-reload worker an application runs beside pg_billing (README, "Auto-reload").
//!
//! A debit that takes a pool below its rule's threshold writes a reload request and
//! announces it with `NOTIFY billing_reload`. This worker `LISTEN`s on that channel, and
//! polls now and then (backoff retries become due, a lease runs out, a notification was
//! missed while disconnected). Each round it:
//!
//! 1. claims due requests with `billing.claim_reloads` (`SKIP LOCKED`, under a lease);
//! 2. charges the card for the request's quoted `total`, with the request's `charge_key` as
//!    the provider's idempotency key (it stays the same across re-claims, so a worker that
//!    died after charging and the one that re-claims cannot charge twice);
//! 3. completes the request with the payment's id and the amount actually taken
//!    (`billing.complete_reload`), or fails it with the decline's reason
//!    (`billing.fail_reload`: retried with backoff, the rule suspended after `max_failures`).
//!
//! A charge whose outcome is unknown (timeout, provider unavailable) is neither completed nor
//! failed: failing would change the charge key while the money may have been taken. The
//! claim is left to run out and the request is re-claimed and charged again with the same
//! key, which the provider answers with the original charge.

pub mod fake;

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{sleep, timeout, Instant};
use tokio_postgres::{AsyncMessage, Client, NoTls};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// What the worker asks the payment provider to charge.
#[derive(Clone, Debug)]
pub struct ChargeRequest {
    /// The provider's idempotency key (Stripe's `Idempotency-Key`): `claim_reloads`' charge_key.
    pub idempotency_key: String,
    pub account: String,
    /// In minor units of `currency`: the request's quoted total, card fee included.
    pub amount: i64,
    pub currency: String,
    /// For the payment's metadata (`metadata.reload_request` with Stripe).
    pub reload_request: i64,
}

/// A payment the provider took.
#[derive(Clone, Debug, PartialEq)]
pub struct Charge {
    pub id: String,
    pub amount: i64,
    pub currency: String,
}

#[derive(Clone, Debug)]
pub enum ChargeError {
    /// The card was declined: a definite "no", the request is failed with this reason.
    Declined(String),
    /// Unknown outcome (network, timeout, provider down): retried later with the same key.
    Unavailable(String),
}

/// A payment provider (Stripe, Adyen, …). It must honour idempotency keys: a key that
/// charged once answers that charge again, whoever asks.
pub trait PaymentProvider: Send + Sync + 'static {
    fn charge(
        &self,
        req: &ChargeRequest,
    ) -> impl Future<Output = Result<Charge, ChargeError>> + Send;
}

/// One claimed reload request (a row of `billing.claim_reloads`).
#[derive(Clone, Debug)]
pub struct Claim {
    pub request_id: i64,
    pub account: String,
    pub unit: String,
    pub credits: i64,
    pub currency: String,
    pub total: i64,
    pub attempt: i32,
    pub charge_key: String,
    /// The worker that claimed it: a failure is reported in its name, so a
    /// worker whose lease ran out cannot fail what another one holds since.
    pub worker: String,
}

impl Claim {
    pub fn charge_request(&self) -> ChargeRequest {
        ChargeRequest {
            idempotency_key: self.charge_key.clone(),
            account: self.account.clone(),
            amount: self.total,
            currency: self.currency.clone(),
            reload_request: self.request_id,
        }
    }
}

/// What became of a claimed request.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Charged and completed; `status` is complete_reload's (completed, duplicate, extra_payment).
    Completed {
        status: String,
        payment: String,
        credited: i64,
    },
    /// Declined and failed; the rule's status after it (active, or suspended).
    Failed { reason: String, rule_status: String },
    /// Outcome unknown, or the lease ran out before charging: left for a later claim.
    Deferred(String),
    /// The charge went through but billing refused to complete it (logged; retried after the lease).
    Refused(String),
}

/// Counters a worker keeps (for logs and tests).
#[derive(Debug, Default)]
pub struct Stats {
    /// Times the worker went idle, waiting for a notification or the poll timer.
    pub idle: AtomicU64,
    pub woken_by_notify: AtomicU64,
    pub woken_by_poll: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub deferred: AtomicU64,
    pub refused: AtomicU64,
    pub reconnects: AtomicU64,
}

impl Stats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::SeqCst)
    }
}

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub pg: tokio_postgres::Config,
    /// Recorded as the claim's `claimed_by`.
    pub name: String,
    /// `billing.tenant` to act for (None: the role's default).
    pub tenant: Option<String>,
    /// How long a claim is ours. A charge is never started, nor waited for, past it.
    pub lease: Duration,
    /// Requests claimed at once.
    pub batch: i32,
    /// How often to look for due requests without a notification.
    pub poll_every: Duration,
    pub stats: Arc<Stats>,
}

impl WorkerConfig {
    pub fn new(pg: tokio_postgres::Config, name: impl Into<String>) -> Self {
        WorkerConfig {
            pg,
            name: name.into(),
            tenant: None,
            lease: Duration::from_secs(300),
            batch: 10,
            poll_every: Duration::from_secs(30),
            stats: Arc::default(),
        }
    }
}

/// Claim up to `max` due requests for `lease`.
pub async fn claim(
    client: &Client,
    worker: &str,
    lease: Duration,
    max: i32,
) -> Result<Vec<Claim>, Error> {
    let rows = client
        .query(
            "SELECT request_id, account, unit, credits, currency, total, attempt, charge_key
             FROM billing.claim_reloads($1, lease => $2::float8 * interval '1 second', max_requests => $3)",
            &[&worker, &lease.as_secs_f64(), &max],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Claim {
            request_id: r.get(0),
            account: r.get(1),
            unit: r.get(2),
            credits: r.get(3),
            currency: r.get(4),
            total: r.get(5),
            attempt: r.get(6),
            charge_key: r.get(7),
            worker: worker.to_string(),
        })
        .collect())
}

/// Charge one claimed request and complete or fail it, before `deadline` (the lease's end).
pub async fn settle<P: PaymentProvider>(
    client: &Client,
    provider: &P,
    claim: &Claim,
    deadline: Instant,
) -> Result<Outcome, Error> {
    let Some(left) = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
    else {
        return Ok(Outcome::Deferred(
            "the lease ran out before charging".into(),
        ));
    };
    let charged = match timeout(left, provider.charge(&claim.charge_request())).await {
        Ok(result) => result,
        Err(_) => Err(ChargeError::Unavailable(
            "the charge outlasted the lease".into(),
        )),
    };
    match charged {
        Ok(charge) => {
            let done = client
                .query_one(
                    "SELECT status, credited FROM billing.complete_reload($1, $2, $3, $4)",
                    &[
                        &claim.request_id,
                        &charge.id,
                        &charge.amount,
                        &charge.currency,
                    ],
                )
                .await;
            refused_or(done, |row| Outcome::Completed {
                status: row.get(0),
                payment: charge.id.clone(),
                credited: row.get::<_, Option<i64>>(1).unwrap_or(0),
            })
        }
        Err(ChargeError::Declined(reason)) => {
            let done = client
                .query_one(
                    "SELECT rule_status FROM billing.fail_reload($1, $2, worker => $3)",
                    &[&claim.request_id, &reason, &claim.worker],
                )
                .await;
            refused_or(done, |row| Outcome::Failed {
                reason: reason.clone(),
                rule_status: row.get(0),
            })
        }
        Err(ChargeError::Unavailable(why)) => Ok(Outcome::Deferred(why)),
    }
}

/// billing refusing a call (an SQL error; the connection is fine) is an outcome to log, and
/// the request is claimed again after the lease; a lost connection is the session's error.
fn refused_or(
    result: Result<tokio_postgres::Row, tokio_postgres::Error>,
    outcome: impl FnOnce(&tokio_postgres::Row) -> Outcome,
) -> Result<Outcome, Error> {
    match result {
        Ok(row) => Ok(outcome(&row)),
        Err(e) => match e.as_db_error() {
            Some(db) => Ok(Outcome::Refused(format!(
                "{} {}",
                db.code().code(),
                db.message()
            ))),
            None => Err(e.into()),
        },
    }
}

/// One round: claim a batch of due requests and settle each. Returns what became of them.
pub async fn process_once<P: PaymentProvider>(
    client: &Client,
    provider: &P,
    cfg: &WorkerConfig,
) -> Result<Vec<(Claim, Outcome)>, Error> {
    // a little before the server's lease_until: what we do after it, another worker may too
    let deadline = Instant::now() + cfg.lease.mul_f64(0.9);
    let claims = claim(client, &cfg.name, cfg.lease, cfg.batch).await?;
    let mut done = Vec::with_capacity(claims.len());
    for c in claims {
        let outcome = settle(client, provider, &c, deadline).await?;
        let counter = match &outcome {
            Outcome::Completed { .. } => &cfg.stats.completed,
            Outcome::Failed { .. } => &cfg.stats.failed,
            Outcome::Deferred(_) => &cfg.stats.deferred,
            Outcome::Refused(why) => {
                eprintln!(
                    "[{}] request {}: billing refused: {why}",
                    cfg.name, c.request_id
                );
                &cfg.stats.refused
            }
        };
        counter.fetch_add(1, Ordering::SeqCst);
        done.push((c, outcome));
    }
    Ok(done)
}

/// Run until `shutdown` resolves: listen, drain what is due, wait for a notification or the
/// poll timer, repeat; reconnect after a lost connection. A round in progress is finished
/// before shutting down (stopping mid-charge would be safe too: the lease and the key).
pub async fn run_worker<P: PaymentProvider>(
    cfg: WorkerConfig,
    provider: Arc<P>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        match session(&cfg, &*provider, shutdown.as_mut()).await {
            Ok(()) => return Ok(()),
            Err(e) => eprintln!("[{}] session ended: {e}; reconnecting", cfg.name),
        }
        cfg.stats.reconnects.fetch_add(1, Ordering::SeqCst);
        tokio::select! {
            _ = shutdown.as_mut() => return Ok(()),
            _ = sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// One connection's life. Ok when shut down, Err when the connection failed.
async fn session<P: PaymentProvider, S: Future<Output = ()>>(
    cfg: &WorkerConfig,
    provider: &P,
    mut shutdown: Pin<&mut S>,
) -> Result<(), Error> {
    let (client, mut connection) = cfg.pg.connect(NoTls).await?;
    // drive the connection ourselves to see its notifications; the channel closes with it
    let (wake_tx, mut wake) = mpsc::unbounded_channel::<()>();
    let driver = tokio::spawn(async move {
        while let Some(message) = poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    let _ = wake_tx.send(()); // the payload is a request id; we claim whatever is due
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    let _abort = AbortOnDrop(driver);

    if let Some(tenant) = &cfg.tenant {
        client
            .execute("SELECT set_config('billing.tenant', $1, false)", &[tenant])
            .await?;
    }
    client.batch_execute("LISTEN billing_reload").await?;
    loop {
        // drain: a full batch means there may be more
        while process_once(&client, provider, cfg).await?.len() == cfg.batch as usize {}
        cfg.stats.idle.fetch_add(1, Ordering::SeqCst);
        tokio::select! {
            _ = shutdown.as_mut() => return Ok(()),
            woke = wake.recv() => {
                woke.ok_or("connection closed")?;
                while wake.try_recv().is_ok() {} // one round serves them all
                cfg.stats.woken_by_notify.fetch_add(1, Ordering::SeqCst);
            }
            _ = sleep(cfg.poll_every) => {
                cfg.stats.woken_by_poll.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
