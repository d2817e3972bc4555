//! docs/architecture.md, rule 6: under any number of concurrent callers, the sum of accepted
//! strict debits and holds never exceeds what was available above the floor.
//! 32 real sessions hammer one pool with strict debits, reservations and
//! settlements for a few seconds.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use pg_billing_client_tests::{connect, fresh_db, ledger_problems, run_sessions, sqlstate, Rng};

const DB: &str = "pgb_zero_overspend";
const SESSIONS: usize = 32;
const CREDIT: i64 = 20_000;
const FLOOR: i64 = 500;
const RUN_FOR: Duration = Duration::from_secs(4);

#[derive(Default, Debug)]
struct Tally {
    debited: i64,    // accepted strict debits
    settled: i64,    // actual costs of settled holds (never above the hold)
    still_held: i64, // holds left open at the end
    accepted: u64,
    refused: u64,
}

fn session(id: usize, start: &Barrier) -> Tally {
    let mut c = connect(DB);
    c.batch_execute("SET synchronous_commit = off").unwrap();
    let mut rng = Rng::new(id as u64 + 1);
    let mut t = Tally::default();
    start.wait();
    let deadline = Instant::now() + RUN_FOR;
    let mut n = 0;
    while Instant::now() < deadline {
        n += 1;
        let amount = rng.range(1, 60);
        let key = format!("s{id}:{n}");
        if rng.range(0, 1) == 0 {
            let r = c.query_one(
                "SELECT cost FROM billing.ingest('acct', 'credits', 1, key => $1, cost => $2, strict => true)",
                &[&key, &amount],
            );
            match r {
                Ok(row) => {
                    t.debited += row.get::<_, i64>(0);
                    t.accepted += 1;
                }
                Err(e) if sqlstate(&e).as_deref() == Some("23514") => t.refused += 1,
                Err(e) => panic!("ingest: {e}"),
            }
        } else {
            let r = c.query_one(
                "SELECT hold_id FROM billing.reserve('acct', 'credits', $1, key => $2)",
                &[&amount, &key],
            );
            match r {
                Ok(row) => {
                    t.accepted += 1;
                    let hold: i64 = row.get(0);
                    if rng.range(0, 2) == 0 {
                        t.still_held += amount; // left open
                    } else {
                        let actual = rng.range(0, amount);
                        c.query_one(
                            "SELECT status FROM billing.settle($1, $2)",
                            &[&hold, &actual],
                        )
                        .unwrap_or_else(|e| panic!("settle: {e}"));
                        t.settled += actual;
                    }
                }
                Err(e) if sqlstate(&e).as_deref() == Some("23514") => t.refused += 1,
                Err(e) => panic!("reserve: {e}"),
            }
        }
    }
    t
}

#[test]
fn concurrent_strict_debits_and_holds_never_overspend() {
    let mut c = fresh_db(DB);
    c.batch_execute(&format!(
        "SELECT * FROM billing.grant('acct', 'credits', {CREDIT}, kind => 'topup', key => 'fund');
         SELECT billing.set_floor('acct', 'credits', {FLOOR});"
    ))
    .unwrap();

    let results = run_sessions(SESSIONS, session);
    let tallies: Vec<Tally> = results;

    let debited: i64 = tallies.iter().map(|t| t.debited).sum();
    let settled: i64 = tallies.iter().map(|t| t.settled).sum();
    let still_held: i64 = tallies.iter().map(|t| t.still_held).sum();
    let accepted: u64 = tallies.iter().map(|t| t.accepted).sum();
    let refused: u64 = tallies.iter().map(|t| t.refused).sum();
    println!("accepted {accepted}, refused {refused}: debited {debited}, settled {settled}, held {still_held}");

    assert!(
        refused > 0,
        "the pool must run dry during the test, or it proves nothing"
    );
    assert!(
        accepted > 100,
        "too little work was accepted to prove anything"
    );
    let committed = debited + settled + still_held;
    assert!(
        committed <= CREDIT - FLOOR,
        "overspend: {committed} accepted against {} available above the floor",
        CREDIT - FLOOR
    );

    let row = c
        .query_one(
            "SELECT available, balance, held, debt FROM billing.check('acct', 'credits')",
            &[],
        )
        .unwrap();
    let (available, balance, held, debt): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        debt, 0,
        "strict debits and settlements within holds create no debt"
    );
    assert_eq!(
        held, still_held,
        "the database holds exactly what the clients left open"
    );
    assert_eq!(
        balance,
        CREDIT - debited - settled,
        "every accepted debit, and nothing else, was drained"
    );
    assert_eq!(available, CREDIT - committed);
    assert!(available >= FLOOR);

    let row = c
        .query_one(
            "SELECT coalesce(sum(cost) FILTER (WHERE key NOT LIKE 'billing:hold:%'), 0)::bigint, \
                    coalesce(sum(cost) FILTER (WHERE key LIKE 'billing:hold:%'), 0)::bigint \
             FROM billing.usage_events",
            &[],
        )
        .unwrap();
    let (ingested, settled_usage): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(
        ingested, debited,
        "the events recorded are exactly the accepted ones"
    );
    assert_eq!(
        settled_usage, settled,
        "every settlement is recorded as usage, once"
    );
    assert_eq!(ledger_problems(&mut c), Vec::<String>::new());
}
