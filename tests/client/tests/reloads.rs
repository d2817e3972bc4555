//! README, "Auto-reload", over real connections: the request is written in
//! the debit's own transaction (a rollback leaves none and announces none;
//! a commit announces it on `billing_reload`), concurrent debits that all
//! cross the threshold write exactly one, and concurrent workers claim
//! disjoint requests.

use std::collections::HashSet;
use std::time::Duration;

use fallible_iterator::FallibleIterator;
use pg_billing_client_tests::{connect, fresh_db, ledger_problems, run_sessions};
use postgres::Client;

const DB: &str = "pgb_reloads";
const SESSIONS: usize = 16;

/// `accounts` accounts with 1,000 cents each and a rule: below 500, reload to 2,000.
fn setup(accounts: usize) -> Client {
    let mut c = fresh_db(DB);
    c.batch_execute("SELECT * FROM billing.set_topup_fee('usd', 'card', 2.9, 30)")
        .unwrap();
    for i in 0..accounts {
        c.batch_execute(&format!(
            "SELECT * FROM billing.grant('r{i}', 'cents', 1000, kind => 'topup', key => 'pi_{i}');
             SELECT * FROM billing.set_reload('r{i}', 'cents', 500, 'usd', 'card', reload_to => 2000);"
        ))
        .unwrap();
    }
    c.batch_execute("SELECT billing.define_meter('calls', 'cents', unit_price => 1)")
        .unwrap();
    c
}

fn count(c: &mut Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

/// The notifications `c` has received within `wait`.
fn notifications(c: &mut Client, wait: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let mut inbox = c.notifications();
    let mut it = inbox.timeout_iter(wait);
    while let Some(n) = it.next().unwrap() {
        assert_eq!(n.channel(), "billing_reload");
        got.push(n.payload().to_string());
    }
    got
}

#[test]
fn a_rolled_back_debit_leaves_no_request_and_a_committed_one_announces_it() {
    let mut admin = setup(1);
    let mut worker = connect(DB);
    worker.batch_execute("LISTEN billing_reload").unwrap();

    let mut app = connect(DB);
    let mut tx = app.transaction().unwrap();
    tx.execute(
        "SELECT * FROM billing.ingest('r0', 'calls', 600, key => 'u1')",
        &[],
    )
    .unwrap();
    let seen: i64 = tx
        .query_one("SELECT count(*) FROM billing.reload_requests", &[])
        .unwrap()
        .get(0);
    assert_eq!(seen, 1, "written in the debit's transaction");
    tx.rollback().unwrap();
    assert_eq!(
        count(&mut admin, "SELECT count(*) FROM billing.reload_requests"),
        0
    );
    assert_eq!(
        notifications(&mut worker, Duration::from_millis(500)),
        Vec::<String>::new()
    );

    app.execute(
        "SELECT * FROM billing.ingest('r0', 'calls', 600, key => 'u1')",
        &[],
    )
    .unwrap();
    let id = count(&mut admin, "SELECT id FROM billing.reload_requests");
    let got = notifications(&mut worker, Duration::from_secs(2));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        got[0],
        id.to_string(),
        "the payload is the request's id alone"
    );
    assert!(ledger_problems(&mut admin).is_empty());
}

#[test]
fn concurrent_debits_that_all_cross_the_threshold_write_one_request() {
    let mut admin = setup(1);
    // each debit takes 40: the 13th leaves 480, below 500, and all later ones stay below
    run_sessions(SESSIONS, |i, start| {
        let mut c = connect(DB);
        start.wait();
        for k in 0..2 {
            c.execute(
                "SELECT * FROM billing.ingest('r0', 'calls', 40, key => $1)",
                &[&format!("s{i}_{k}")],
            )
            .unwrap();
        }
    });
    assert_eq!(
        count(
            &mut admin,
            "SELECT available FROM billing.check('r0', 'cents')"
        ),
        1000 - 40 * 2 * SESSIONS as i64
    );
    assert_eq!(
        count(&mut admin, "SELECT count(*) FROM billing.reload_requests"),
        1
    );
    // it asks for what the crossing debit left: 2,000 − 480 = 1,520
    assert_eq!(
        count(&mut admin, "SELECT credits FROM billing.reload_requests"),
        1520
    );
    assert!(ledger_problems(&mut admin).is_empty());
}

#[test]
fn concurrent_workers_claim_disjoint_requests() {
    const ACCOUNTS: usize = 24;
    let mut admin = setup(ACCOUNTS);
    for i in 0..ACCOUNTS {
        admin
            .execute(
                "SELECT * FROM billing.ingest($1, 'calls', 600, key => $2)",
                &[&format!("r{i}"), &format!("c{i}")],
            )
            .unwrap();
    }
    assert_eq!(
        count(
            &mut admin,
            "SELECT count(*) FROM billing.reload_requests WHERE status = 'pending'"
        ),
        ACCOUNTS as i64
    );
    let claimed = run_sessions(4, |w, start| {
        let mut c = connect(DB);
        start.wait();
        let mut mine = Vec::new();
        loop {
            let rows = c
                .query(
                    "SELECT request_id FROM billing.claim_reloads($1, max_requests => 2)",
                    &[&format!("w{w}")],
                )
                .unwrap();
            if rows.is_empty() {
                break;
            }
            mine.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
        }
        mine
    });
    let all: Vec<i64> = claimed.iter().flatten().copied().collect();
    let distinct: HashSet<i64> = all.iter().copied().collect();
    assert_eq!(
        all.len(),
        ACCOUNTS,
        "each request claimed once: {claimed:?}"
    );
    assert_eq!(distinct.len(), ACCOUNTS);
    assert_eq!(
        count(&mut admin, "SELECT count(*) FROM billing.reload_requests WHERE status = 'claimed' AND attempts = 1"),
        ACCOUNTS as i64
    );
}
