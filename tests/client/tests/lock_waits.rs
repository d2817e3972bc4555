//! A billing call inside the application's transaction holds the account's
//! pool until that transaction ends. Over real sessions: another debit of the
//! same account waits at most the bound (the session's lock_timeout, else
//! billing.lock_timeout) and then fails with 55P03 saying what to do, having
//! written nothing; other accounts never wait; with the bound at 0 it waits
//! until the holder commits; and the recommended pattern (reserve in a short
//! transaction, do the slow work outside, settle) blocks nobody.

use std::thread;
use std::time::{Duration, Instant};

use pg_billing_client_tests::{connect, fresh_db, ledger_problems};
use postgres::Client;

const DB: &str = "pgb_lock_waits";

const INGEST: &str = "SELECT status FROM billing.ingest('a', 'usd_cents', 1, key => $1, cost => 1)";

/// An ingest of account `a` from its own session; the SQLSTATE and message
/// if it failed, and how long it took.
fn timed_ingest(c: &mut Client, key: &str) -> (Result<String, (String, String)>, Duration) {
    let start = Instant::now();
    let r = c.query_one(INGEST, &[&key]).map(|r| r.get(0)).map_err(|e| {
        let db = e.as_db_error().expect("a database error");
        (
            db.code().code().to_string(),
            format!("{} HINT: {}", db.message(), db.hint().unwrap_or("")),
        )
    });
    (r, start.elapsed())
}

fn events(c: &mut Client) -> i64 {
    c.query_one("SELECT count(*) FROM billing.usage_events", &[])
        .unwrap()
        .get(0)
}

#[test]
fn a_pool_held_by_an_open_transaction_bounds_every_wait() {
    let mut setup = fresh_db(DB);
    setup
        .batch_execute(
            "SELECT billing.grant('a', 'usd_cents', 1000, kind => 'topup'); \
             SELECT billing.grant('b', 'usd_cents', 1000, kind => 'topup');",
        )
        .unwrap();
    // The application ingests, then goes on with slow work in the same transaction.
    let mut holder = connect(DB);
    holder.batch_execute("BEGIN").unwrap();
    holder.query_one(INGEST, &[&"held"]).unwrap();

    // billing.lock_timeout bounds the wait of a session that sets no lock_timeout
    let mut waiter = connect(DB);
    waiter
        .batch_execute("SET billing.lock_timeout = 300")
        .unwrap();
    let (r, took) = timed_ingest(&mut waiter, "w1");
    let (code, message) = r.expect_err("the pool is held");
    assert_eq!(code, "55P03");
    assert!(
        message.contains("usd_cents pool of account \"a\"") && message.contains("reserve"),
        "{message}"
    );
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_millis(2000),
        "waited {took:?}"
    );

    // the session's own lock_timeout wins when set
    waiter
        .batch_execute("SET billing.lock_timeout = 60000; SET lock_timeout = 200")
        .unwrap();
    let (r, took) = timed_ingest(&mut waiter, "w2");
    assert_eq!(r.unwrap_err().0, "55P03");
    assert!(took < Duration::from_millis(2000), "waited {took:?}");

    // the default bound is 5 s, not forever
    waiter
        .batch_execute("RESET billing.lock_timeout; RESET lock_timeout")
        .unwrap();
    let (r, took) = timed_ingest(&mut waiter, "w3");
    assert_eq!(r.unwrap_err().0, "55P03");
    assert!(
        took >= Duration::from_millis(4900) && took < Duration::from_millis(8000),
        "waited {took:?}"
    );

    // another account never waits
    let (r, took) = {
        let start = Instant::now();
        let r = waiter.query_one(
            "SELECT status FROM billing.ingest('b', 'usd_cents', 1, key => 'b1', cost => 1)",
            &[],
        );
        (r, start.elapsed())
    };
    assert_eq!(r.unwrap().get::<_, String>(0), "applied");
    assert!(took < Duration::from_millis(1000), "waited {took:?}");

    // with the bound at 0 the wait lasts until the holder commits
    waiter
        .batch_execute("SET billing.lock_timeout = 0")
        .unwrap();
    let committer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(1500));
        holder.batch_execute("COMMIT").unwrap();
    });
    let (r, took) = timed_ingest(&mut waiter, "w4");
    committer.join().unwrap();
    assert_eq!(r.unwrap(), "applied");
    assert!(took >= Duration::from_millis(1400), "waited {took:?}");

    // the refused calls wrote nothing: held, b1, w4
    assert_eq!(events(&mut setup), 3);
    assert!(ledger_problems(&mut setup).is_empty());
}

#[test]
fn reserving_outside_the_slow_work_blocks_nobody() {
    let mut setup = fresh_db(&format!("{DB}_pattern"));
    setup
        .batch_execute("SELECT billing.grant('a', 'usd_cents', 1000, kind => 'topup')")
        .unwrap();
    let db = format!("{DB}_pattern");
    let mut app = connect(&db);
    // reserve in a short transaction; the slow work runs outside any transaction
    let hold: i64 = app
        .query_one(
            "SELECT hold_id FROM billing.reserve('a', 'usd_cents', 50, key => 'r1')",
            &[],
        )
        .unwrap()
        .get(0);
    let mut other = connect(&db);
    other
        .batch_execute("SET billing.lock_timeout = 200")
        .unwrap();
    let slow_work = thread::spawn(move || {
        thread::sleep(Duration::from_millis(1000));
        app.query_one("SELECT status FROM billing.settle($1, 42)", &[&hold])
            .unwrap()
            .get::<_, String>(0)
    });
    for i in 0..20 {
        let (r, took) = timed_ingest(&mut other, &format!("o{i}"));
        assert_eq!(r.unwrap(), "applied");
        assert!(took < Duration::from_millis(200), "waited {took:?}");
    }
    assert_eq!(slow_work.join().unwrap(), "settled");
    let available: i64 = setup
        .query_one("SELECT available FROM billing.check('a', 'usd_cents')", &[])
        .unwrap()
        .get(0);
    assert_eq!(available, 1000 - 20 - 42);
    assert!(ledger_problems(&mut setup).is_empty());
}

/// A debit that waits for a lane of a split pool runs in a subtransaction of
/// its own; when the wait times out inside the application's PL/pgSQL
/// exception block, the block catches it with its own subtransaction current,
/// and the transaction goes on and commits what the handler did.
#[test]
fn a_lane_wait_that_times_out_inside_an_exception_block_leaves_the_transaction_whole() {
    const DB: &str = "pgb_lane_waits";
    let mut setup = fresh_db(DB);
    setup
        .batch_execute(
            "SELECT billing.grant('hot', 'usd_cents', 100000, kind => 'topup'); \
             SELECT billing.grant('other', 'usd_cents', 10, kind => 'topup'); \
             SELECT billing.set_lanes('hot', 'usd_cents', 2);",
        )
        .unwrap();
    let mut app = connect(DB);
    // this session's first debit locks the whole pool, deals, and learns it is split
    app.query_one(
        "SELECT status FROM billing.ingest('hot', 'usd_cents', 1, key => 'first', cost => 1)",
        &[],
    )
    .unwrap();
    let mut holder = connect(DB);
    holder
        .batch_execute("BEGIN; SELECT 1 FROM billing.pools WHERE account = 'hot' FOR UPDATE")
        .unwrap();
    app.batch_execute(
        "DO $$ BEGIN \
           SET LOCAL lock_timeout = '200ms'; \
           BEGIN \
             PERFORM billing.ingest('hot', 'usd_cents', 1, key => 'blocked', cost => 1); \
           EXCEPTION WHEN lock_not_available THEN \
             PERFORM billing.ingest('other', 'usd_cents', 1, key => 'instead', cost => 1); \
           END; \
         END $$",
    )
    .expect("the exception block catches the lane wait and the transaction commits");
    holder.batch_execute("COMMIT").unwrap();
    let keys: Vec<String> = setup
        .query("SELECT key FROM billing.usage_events ORDER BY key", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(keys, ["first", "instead"]);
    app.query_one(
        "SELECT status FROM billing.ingest('hot', 'usd_cents', 1, key => 'later', cost => 1)",
        &[],
    )
    .unwrap();
    assert_eq!(ledger_problems(&mut setup), Vec::<String>::new());
}

/// The lane of its pool that paid the usage event of `key` (0: the pool's own row).
fn lane_that_paid(c: &mut Client, key: &str) -> i16 {
    c.query_one(
        "SELECT p.lane FROM billing.usage_events e JOIN billing.pools p ON p.id = e.pool_id \
         WHERE e.key = $1",
        &[&key],
    )
    .unwrap()
    .get(0)
}

/// Block until another session of this database waits for a lock.
fn until_someone_waits(c: &mut Client) {
    let waiting = "SELECT count(*) FROM pg_stat_activity \
                   WHERE datname = current_database() AND wait_event_type = 'Lock'";
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.query_one(waiting, &[]).unwrap().get::<_, i64>(0) == 0 {
        assert!(Instant::now() < deadline, "nobody waited for a lock");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A debit of a split pool whose every lane that could pay is held waits
/// for its lane; if the holder leaves too little on it, the debit is checked
/// again on what the holder committed and paid by the whole pool, not
/// overdrawn from the lane, and it holds that lane no longer than the try.
#[test]
fn a_debit_that_waited_for_a_lane_another_debit_emptied_pays_from_the_whole_pool() {
    const DB: &str = "pgb_lane_emptied";
    let mut setup = fresh_db(DB);
    setup
        .batch_execute(
            "SELECT billing.grant('hot', 'usd_cents', 1000, kind => 'topup'); \
             SELECT billing.set_lanes('hot', 'usd_cents', 1);",
        )
        .unwrap();
    let debit = "SELECT status FROM billing.ingest('hot', 'usd_cents', 1, key => $1, cost => $2)";
    // each session's first debit locks the whole pool, deals about half of
    // what is left to the lane, and learns that the pool is split
    let mut holder = connect(DB);
    holder.query_one(debit, &[&"holder warm", &1i64]).unwrap();
    let mut waiter_warm = connect(DB);
    waiter_warm
        .query_one(debit, &[&"waiter warm", &1i64])
        .unwrap();
    holder.batch_execute("BEGIN").unwrap();
    holder.query_one(debit, &[&"holder", &400i64]).unwrap();
    assert_eq!(
        lane_that_paid(&mut holder, "holder"),
        1,
        "the lane paid the holder"
    );
    let waiter = thread::spawn(move || {
        let mut c = waiter_warm;
        c.batch_execute("SET lock_timeout = '10s'").unwrap();
        let status: String = c.query_one(debit, &[&"waiter", &200i64]).unwrap().get(0);
        status
    });
    until_someone_waits(&mut setup);
    holder.batch_execute("COMMIT").unwrap();
    assert_eq!(waiter.join().unwrap(), "applied");
    assert_eq!(
        lane_that_paid(&mut setup, "waiter"),
        0,
        "the lane kept less than 200 after the holder's debit: the whole pool paid"
    );
    let (available, debt): (i64, i64) = {
        let r = setup
            .query_one(
                "SELECT available, debt FROM billing.check('hot', 'usd_cents')",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((available, debt), (1000 - 1 - 1 - 400 - 200, 0));
    assert_eq!(ledger_problems(&mut setup), Vec::<String>::new());
}

/// A fresh database whose account `a` holds 1,000 usd_cents.
fn funded_db(db: &str) -> Client {
    let mut c = fresh_db(db);
    c.batch_execute("SELECT billing.grant('a', 'usd_cents', 1000, kind => 'topup')")
        .unwrap();
    c
}

/// A debit that waited for the pool decides on what the holder committed:
/// the holder's strict debit of 600 commits while the waiter's strict debit
/// of 500 of the same 1,000 waits, so the waiter is refused (23514).
#[test]
fn a_debit_that_waited_for_the_pool_sees_what_the_holder_committed() {
    let db = "pgb_lock_waits_commit";
    let mut setup = funded_db(db);
    let strict = "SELECT status FROM billing.ingest('a', 'usd_cents', 1, key => $1, cost => $2, strict => true)";
    let mut holder = connect(db);
    holder.batch_execute("BEGIN").unwrap();
    holder.query_one(strict, &[&"first", &600i64]).unwrap();
    let waiter = thread::spawn(move || {
        let mut c = connect(db);
        c.batch_execute("SET lock_timeout = '10s'").unwrap();
        c.query_one(strict, &[&"second", &500i64])
            .map(|r| r.get::<_, String>(0))
            .map_err(|e| pg_billing_client_tests::sqlstate(&e))
    });
    // commit only once the waiter is waiting for the pool
    until_someone_waits(&mut setup);
    holder.batch_execute("COMMIT").unwrap();
    assert_eq!(
        waiter.join().unwrap(),
        Err(Some("23514".to_string())),
        "400 were left when the waiter got the pool"
    );
    let available: i64 = setup
        .query_one("SELECT available FROM billing.check('a', 'usd_cents')", &[])
        .unwrap()
        .get(0);
    assert_eq!(available, 400);
    assert_eq!(ledger_problems(&mut setup), Vec::<String>::new());
}

/// Under REPEATABLE READ, a debit of a pool another transaction changed
/// after this one's snapshot fails with 40001, as `SELECT … FOR UPDATE`
/// does, and writes nothing; without such a change it applies.
#[test]
fn under_repeatable_read_a_pool_changed_since_the_snapshot_is_a_serialization_failure() {
    let db = "pgb_lock_waits_rr";
    let mut setup = funded_db(db);
    let mut rr = connect(db);
    rr.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
        .unwrap();
    setup.query_one(INGEST, &[&"other"]).unwrap();
    let err = rr
        .query_one(INGEST, &[&"mine"])
        .expect_err("changed since the snapshot");
    assert_eq!(
        pg_billing_client_tests::sqlstate(&err).as_deref(),
        Some("40001")
    );
    rr.batch_execute("ROLLBACK").unwrap();
    assert_eq!(events(&mut setup), 1, "only the other transaction's event");

    rr.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
        .unwrap();
    assert_eq!(
        rr.query_one(INGEST, &[&"mine"])
            .unwrap()
            .get::<_, String>(0),
        "applied"
    );
    rr.batch_execute("COMMIT").unwrap();
    assert_eq!(events(&mut setup), 2);
    assert_eq!(ledger_problems(&mut setup), Vec::<String>::new());
}
