//! The worker against a real pg_billing (PG_BILLING_TEST_DSN), each test in its own database.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::{connect, eventually, spawn_worker, TestDb};
use reload_worker::{claim, fake::FakeProvider, PaymentProvider, Stats};
use tokio::time::{sleep, Instant};

const SECOND: Duration = Duration::from_secs(1);

/// The quote of a reload of `credit` cents: (credit, fee, total).
async fn quote(db: &TestDb, credit: i64) -> (i64, i64, i64) {
    let row = db
        .client
        .query_one(
            "SELECT credit, fee, total FROM billing.quote($1, 'usd', 'domestic')",
            &[&credit],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

async fn request_status(db: &TestDb, id: i64) -> String {
    db.text(
        "SELECT status FROM billing.reload_requests WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debit_crossing_the_threshold_wakes_the_worker_which_reloads_to_the_target() {
    let db = TestDb::create("notify").await;
    db.account("org_1", 1000, 500, 2000).await;
    let provider = Arc::new(FakeProvider::new());
    // it never polls in this test: only a notification can wake it
    let worker = spawn_worker(
        db.worker("w1", 30 * SECOND, Duration::from_secs(3600)),
        provider.clone(),
    );
    eventually("the worker is listening and idle", 20 * SECOND, || async {
        Stats::get(&worker.stats.idle) >= 1
    })
    .await;
    assert_eq!(
        db.i64("SELECT count(*) FROM billing.reload_requests", &[])
            .await,
        0
    );

    let started = Instant::now();
    assert_eq!(db.debit("org_1", 600, "call_1").await, 400);
    let id = db.i64("SELECT id FROM billing.reload_requests", &[]).await;
    eventually("the request is completed", 20 * SECOND, || async {
        request_status(&db, id).await == "completed"
    })
    .await;
    assert!(
        started.elapsed() < 5 * SECOND,
        "woken promptly: {:?}",
        started.elapsed()
    );
    assert!(Stats::get(&worker.stats.woken_by_notify) >= 1);
    assert_eq!(Stats::get(&worker.stats.woken_by_poll), 0);

    // the request asked for what brings 400 back to 2,000, quoted with the fee on top
    let (credit, fee, total) = quote(&db, 1600).await;
    assert_eq!((credit, fee, total), (1600, 79, 1679));
    let r = db
        .client
        .query_one(
            "SELECT credits, total, attempts, claimed_by, payment_ref, amount_paid, grant_id
             FROM billing.reload_requests WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 1600);
    assert_eq!(r.get::<_, i64>(1), total);
    assert_eq!(r.get::<_, i32>(2), 1);
    assert_eq!(r.get::<_, String>(3), "w1");

    // charged once, the quoted total, under the request's charge key
    let ledger = provider.ledger();
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    let paid = &ledger[0];
    assert_eq!(paid.key, format!("pg_billing_reload_{id}_1"));
    assert_eq!(
        (paid.charge.amount, paid.charge.currency.as_str()),
        (total, "usd")
    );
    assert_eq!((paid.account.as_str(), paid.reload_request), ("org_1", id));
    assert_eq!(provider.calls(), vec![paid.key.clone()]);
    assert_eq!(r.get::<_, String>(4), paid.charge.id);
    assert_eq!(r.get::<_, i64>(5), total);

    // one grant of kind reload for the quoted credit, keyed by the payment
    let grant_id: i64 = r.get(6);
    let g = db
        .client
        .query_one(
            "SELECT kind, amount, key, (metadata->>'reload_request')::bigint FROM billing.grants WHERE id = $1",
            &[&grant_id],
        )
        .await
        .unwrap();
    assert_eq!(g.get::<_, String>(0), "reload");
    assert_eq!(g.get::<_, i64>(1), 1600);
    assert_eq!(g.get::<_, String>(2), format!("stripe:{}", paid.charge.id));
    assert_eq!(g.get::<_, i64>(3), id);
    assert_eq!(
        db.i64(
            "SELECT count(*) FROM billing.grants WHERE kind = 'reload'",
            &[]
        )
        .await,
        1
    );
    assert_eq!(
        db.available("org_1").await,
        2000,
        "back at the reload target"
    );

    // completing re-armed the threshold: the next crossing reloads again
    assert_eq!(db.debit("org_1", 1700, "call_2").await, 300);
    eventually("the second request is completed", 20 * SECOND, || async {
        db.i64(
            "SELECT count(*) FROM billing.reload_requests WHERE status = 'completed'",
            &[],
        )
        .await
            == 2
    })
    .await;
    assert_eq!(db.available("org_1").await, 2000);
    assert_eq!(provider.ledger().len(), 2);
    assert_eq!(provider.ledger()[1].charge.amount, quote(&db, 1700).await.2);
    assert_eq!(Stats::get(&worker.stats.woken_by_poll), 0);
    assert_eq!(db.ledger_problems().await, Vec::<String>::new());
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_workers_over_many_accounts_never_charge_or_credit_twice() {
    const ACCOUNTS: usize = 24;
    const WORKERS: usize = 4;
    const APPS: usize = 4;
    const DEBITS: usize = 80; // per app
    const DEBIT: i64 = 400;
    let db = TestDb::create("concurrent").await;
    for i in 0..ACCOUNTS {
        db.account(&format!("acct_{i}"), 2000, 500, 2000).await;
    }
    // every 7th call fails with an unknown outcome, half of them after taking the money
    let provider = Arc::new(
        FakeProvider::new()
            .with_latency(Duration::from_millis(5))
            .failing_every(7),
    );
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let mut cfg = db.worker(&format!("w{w}"), 2 * SECOND, Duration::from_millis(200));
            cfg.batch = 3;
            spawn_worker(cfg, provider.clone())
        })
        .collect();

    // applications debiting the accounts at the same time, each on its own connection
    let apps: Vec<_> = (0..APPS)
        .map(|a| {
            let cfg = db.cfg.clone();
            tokio::spawn(async move {
                let c = connect(&cfg).await;
                let mut debited: HashMap<String, i64> = HashMap::new();
                for k in 0..DEBITS {
                    let account = format!("acct_{}", (a * 7 + k * 5) % ACCOUNTS);
                    let row = c
                        .query_one(
                            "SELECT cost FROM billing.ingest($1, 'calls', $2::bigint, key => $3)",
                            &[&account, &DEBIT, &format!("app{a}_{k}")],
                        )
                        .await
                        .unwrap();
                    *debited.entry(account).or_default() += row.get::<_, i64>(0);
                }
                debited
            })
        })
        .collect();
    let mut debited: HashMap<String, i64> = HashMap::new();
    for app in apps {
        for (account, cost) in app.await.unwrap() {
            *debited.entry(account).or_default() += cost;
        }
    }
    eventually("every request is closed", 60 * SECOND, || async {
        db.i64(
            "SELECT count(*) FROM billing.reload_requests WHERE status IN ('pending', 'claimed')",
            &[],
        )
        .await
            == 0
    })
    .await;
    for w in workers {
        w.stop().await;
    }

    let requests = db
        .client
        .query(
            "SELECT id, account, credits, total, charge_attempt, payment_ref, amount_paid, claimed_by, status
             FROM billing.reload_requests ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert!(
        requests.len() >= ACCOUNTS,
        "every account crossed at least once: {}",
        requests.len()
    );
    let by_key: HashMap<String, _> = provider
        .ledger()
        .into_iter()
        .map(|c| (c.key.clone(), c))
        .collect();
    assert_eq!(
        by_key.len(),
        provider.ledger().len(),
        "one payment per charge key"
    );
    assert_eq!(
        provider.ledger().len(),
        requests.len(),
        "one payment per request"
    );
    let mut reloaded: HashMap<String, i64> = HashMap::new();
    let mut claimers = HashSet::new();
    for r in &requests {
        let (id, account, credits, total): (i64, String, i64, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        assert_eq!(r.get::<_, String>(8), "completed", "request {id}");
        let key = format!("pg_billing_reload_{id}_{}", r.get::<_, i32>(4));
        let paid = by_key
            .get(&key)
            .unwrap_or_else(|| panic!("request {id} was never charged"));
        assert_eq!(
            (paid.account.as_str(), paid.charge.amount),
            (account.as_str(), total)
        );
        assert_eq!(
            r.get::<_, String>(5),
            paid.charge.id,
            "completed with its own payment"
        );
        assert_eq!(r.get::<_, i64>(6), total);
        *reloaded.entry(account).or_default() += credits;
        claimers.insert(r.get::<_, String>(7));
    }
    eprintln!(
        "{} requests, {} provider calls, {} keys replayed, claimed by {claimers:?}",
        requests.len(),
        provider.calls().len(),
        provider.replayed_keys().len()
    );
    assert!(
        claimers.len() >= 2,
        "the workers shared the work: {claimers:?}"
    );
    // lost responses were retried with the same key and answered with the original charge
    let replayed = provider.replayed_keys();
    assert!(
        replayed.iter().any(|k| by_key.contains_key(k)),
        "no charge was replayed: the test lost its point"
    );

    // credited exactly once per completed request: one reload grant each, keyed by its payment
    assert_eq!(
        db.i64(
            "SELECT count(*) FROM billing.reload_requests q
             JOIN billing.grants g ON g.id = q.grant_id AND g.kind = 'reload' AND g.amount = q.credits
              AND g.key = 'stripe:' || q.payment_ref",
            &[]
        )
        .await,
        requests.len() as i64
    );
    assert_eq!(
        db.i64(
            "SELECT count(*) FROM billing.grants WHERE kind = 'reload'",
            &[]
        )
        .await,
        requests.len() as i64
    );
    for i in 0..ACCOUNTS {
        let account = format!("acct_{i}");
        let expected = 2000 + reloaded.get(&account).copied().unwrap_or(0)
            - debited.get(&account).copied().unwrap_or(0);
        assert_eq!(db.available(&account).await, expected, "{account}");
    }
    assert_eq!(db.ledger_problems().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_card_backs_off_then_suspends_the_rule_and_credits_nothing() {
    let db = TestDb::create("declined").await;
    db.account("org_d", 1000, 500, 2000).await;
    let provider = Arc::new(FakeProvider::new());
    provider.decline("org_d", "card_declined");
    let worker = spawn_worker(
        db.worker("w1", 5 * SECOND, Duration::from_millis(100)),
        provider.clone(),
    );
    assert_eq!(db.debit("org_d", 600, "call_1").await, 400);
    let id = db.i64("SELECT id FROM billing.reload_requests", &[]).await;

    for failure in 1..=3i64 {
        eventually("the charge is declined and failed", 20 * SECOND, || async {
            db.i64(
                "SELECT count(*) FROM billing.reload_requests WHERE id = $1 AND attempts = $2 AND status <> 'claimed'",
                &[&id, &(failure as i32)],
            )
            .await
                == 1
        })
        .await;
        let r = db
            .client
            .query_one(
                "SELECT q.status, q.failure_reason, extract(epoch FROM q.next_attempt_at - now())::float8,
                        r.status, r.status_reason, r.failures
                 FROM billing.reload_requests q JOIN billing.reload_rules r USING (pool_id) WHERE q.id = $1",
                &[&id],
            )
            .await
            .unwrap();
        assert_eq!(
            r.get::<_, Option<String>>(1).as_deref(),
            Some("card_declined")
        );
        // a new charge key for every attempt after a failure (a decline is replayed per key)
        let keys: Vec<String> = (1..=failure)
            .map(|n| format!("pg_billing_reload_{id}_{n}"))
            .collect();
        assert_eq!(provider.calls(), keys);
        if failure < 3 {
            assert_eq!(r.get::<_, String>(0), "pending");
            assert_eq!(
                (r.get::<_, String>(3).as_str(), r.get::<_, i32>(5)),
                ("active", failure as i32)
            );
            // backoff: a minute, then two
            let backoff = 60.0 * 2f64.powi(failure as i32 - 1);
            let wait: f64 = r.get(2);
            assert!(
                wait > backoff - 10.0 && wait <= backoff,
                "retry in {wait}s, expected {backoff}s"
            );
            if failure == 1 {
                // the worker keeps polling but does not retry before it is due
                let polls = Stats::get(&worker.stats.woken_by_poll);
                eventually("three more polls", 20 * SECOND, || async {
                    Stats::get(&worker.stats.woken_by_poll) >= polls + 3
                })
                .await;
                assert_eq!(provider.calls().len(), 1);
                assert_eq!(
                    db.i64("SELECT attempts::bigint FROM billing.reload_requests", &[])
                        .await,
                    1
                );
            }
            // the test's clock: make the retry due now
            db.client
                .execute(
                    "UPDATE billing.reload_requests SET next_attempt_at = now() WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap();
        } else {
            assert_eq!(r.get::<_, String>(0), "failed");
            assert_eq!(r.get::<_, String>(3), "suspended");
            assert_eq!(
                r.get::<_, Option<String>>(4).as_deref(),
                Some("3 failed charges in a row; last: card_declined")
            );
        }
    }
    // the reason is visible where the app reads it
    assert_eq!(
        db.text(
            "SELECT status_reason FROM billing.reload_rules WHERE account = 'org_d'",
            &[]
        )
        .await
        .as_deref(),
        Some("3 failed charges in a row; last: card_declined")
    );
    // nothing charged, nothing credited, and a suspended rule asks for nothing more
    assert!(provider.ledger().is_empty());
    assert_eq!(
        db.i64(
            "SELECT count(*) FROM billing.grants WHERE kind = 'reload'",
            &[]
        )
        .await,
        0
    );
    assert_eq!(db.debit("org_d", 100, "call_2").await, 300);
    sleep(Duration::from_millis(300)).await;
    assert_eq!(
        db.i64("SELECT count(*) FROM billing.reload_requests", &[])
            .await,
        1
    );
    assert_eq!(provider.calls().len(), 3);
    assert_eq!(Stats::get(&worker.stats.failed), 3);
    assert_eq!(Stats::get(&worker.stats.completed), 0);
    assert_eq!(db.available("org_d").await, 300);
    assert_eq!(db.ledger_problems().await, Vec::<String>::new());
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_after_charging_is_finished_by_another_with_the_same_key() {
    let db = TestDb::create("crash").await;
    db.account("org_c", 1000, 500, 2000).await;
    let provider = Arc::new(FakeProvider::new());
    assert_eq!(db.debit("org_c", 600, "call_1").await, 400);
    let id = db.i64("SELECT id FROM billing.reload_requests", &[]).await;

    // the doomed worker: claims for one second, charges, and dies before completing
    let claimed_at = Instant::now();
    let original = {
        let doomed = connect(&db.cfg).await;
        let claims = claim(&doomed, "doomed", SECOND, 10).await.unwrap();
        assert_eq!(claims.len(), 1);
        assert_eq!((claims[0].request_id, claims[0].attempt), (id, 1));
        provider.charge(&claims[0].charge_request()).await.unwrap()
    }; // connection dropped here
    let key = format!("pg_billing_reload_{id}_1");
    assert_eq!(request_status(&db, id).await, "claimed");
    assert_eq!(
        db.available("org_c").await,
        400,
        "charged but not credited yet"
    );

    let rescuer = spawn_worker(
        db.worker("rescuer", 5 * SECOND, Duration::from_millis(100)),
        provider.clone(),
    );
    eventually("the rescuer completes the request", 20 * SECOND, || async {
        request_status(&db, id).await == "completed"
    })
    .await;
    assert!(
        claimed_at.elapsed() >= SECOND,
        "re-claimed only after the lease ran out"
    );

    let r = db
        .client
        .query_one(
            "SELECT attempts, claimed_by, payment_ref, amount_paid, total FROM billing.reload_requests WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(
        (r.get::<_, i32>(0), r.get::<_, String>(1).as_str()),
        (2, "rescuer")
    );
    // the same key again: the provider answered with the original charge, no second payment
    assert_eq!(provider.calls(), vec![key.clone(), key.clone()]);
    assert_eq!(provider.ledger().len(), 1);
    assert_eq!(r.get::<_, String>(2), original.id);
    assert_eq!(r.get::<_, i64>(3), original.amount);
    assert_eq!(r.get::<_, i64>(4), original.amount);
    assert_eq!(
        db.i64(
            "SELECT count(*) FROM billing.grants WHERE kind = 'reload'",
            &[]
        )
        .await,
        1
    );
    assert_eq!(db.available("org_c").await, 2000);
    assert_eq!(Stats::get(&rescuer.stats.completed), 1);

    // the doomed worker comes back and completes with what it charged: a duplicate, no credit
    let status = db
        .text(
            "SELECT status FROM billing.complete_reload($1, $2, $3, $4)",
            &[&id, &original.id, &original.amount, &original.currency],
        )
        .await;
    assert_eq!(status.as_deref(), Some("duplicate"));
    assert_eq!(db.available("org_c").await, 2000);
    assert_eq!(db.ledger_problems().await, Vec::<String>::new());
    rescuer.stop().await;
}
