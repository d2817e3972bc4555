//! docs/architecture.md, rule 6: under any number of concurrent callers, the sum of accepted
//! strict debits and holds never exceeds what was available above the floor.
//! 32 real sessions hammer one pool with strict debits, reservations and
//! settlements until the pool runs dry; then the same on a pool split across 16
//! rows (docs/architecture.md, "Split pools"), where debits also race on
//! shared keys (each applies once, whichever lane takes it).

use std::sync::Barrier;
use std::time::{Duration, Instant};

use pg_billing_client_tests::{connect, fresh_db, ledger_problems, run_sessions, sqlstate, Rng};

const SESSIONS: usize = 32;
const FLOOR: i64 = 500;
/// Sessions run until the pool has refused each of them this many times
/// (the pool ran dry), however slow the machine; RUN_AT_MOST only bounds a
/// run that never gets there, and the test then fails saying so.
const REFUSALS_TO_STOP: u64 = 3;
const RUN_AT_MOST: Duration = Duration::from_secs(90);

#[derive(Default, Debug)]
struct Tally {
    retried: u64,    // 40001 from a lane: nothing written
    debited: i64,    // accepted strict debits
    settled: i64,    // actual costs of settled holds (never above the hold)
    still_held: i64, // holds left open at the end
    accepted: u64,
    refused: u64,
}

/// One session's work: strict debits, and holds one time in `hold_every`;
/// with `shared_keys`, one debit in four has a key every session sends.
fn session(db: &str, shared_keys: bool, hold_every: i64, id: usize, start: &Barrier) -> Tally {
    let mut c = connect(db);
    c.batch_execute("SET synchronous_commit = off").unwrap();
    let mut rng = Rng::new(id as u64 + 1);
    let mut t = Tally::default();
    start.wait();
    let deadline = Instant::now() + RUN_AT_MOST;
    let mut n = 0;
    while t.refused < REFUSALS_TO_STOP && Instant::now() < deadline {
        n += 1;
        let mut amount = rng.range(1, 60);
        let mut key = format!("s{id}:{n}");
        if rng.range(1, hold_every) > 1 {
            if shared_keys && n % 4 == 0 {
                // every session sends this one: the same request, so one applies
                key = format!("shared:{n}");
                amount = n % 59 + 1;
            }
            let r = c.query_one(
                "SELECT cost, status FROM billing.ingest('acct', 'credits', 1, key => $1, cost => $2, strict => true)",
                &[&key, &amount],
            );
            match r {
                Ok(row) if row.get::<_, String>(1) == "applied" => {
                    t.debited += row.get::<_, i64>(0);
                    t.accepted += 1;
                }
                Ok(_) => {} // a duplicate of a key another session applied
                Err(e) if sqlstate(&e).as_deref() == Some("23514") => t.refused += 1,
                Err(e) if sqlstate(&e).as_deref() == Some("40001") => t.retried += 1,
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
    never_overspend("pgb_zero_overspend", 0, 20_000);
}

#[test]
fn a_split_pool_never_overspends() {
    // a hold or settlement takes every lane's credit back: mostly debits, the
    // hot path lanes are for
    never_overspend("pgb_zero_overspend_split", 16, 20_000);
}

fn never_overspend(db: &'static str, lanes: i32, credit: i64) {
    let mut c = fresh_db(db);
    c.batch_execute(&format!(
        "SELECT * FROM billing.grant('acct', 'credits', {credit}, kind => 'topup', key => 'fund');
         SELECT billing.set_floor('acct', 'credits', {FLOOR});
         SELECT billing.set_lanes('acct', 'credits', {lanes});"
    ))
    .unwrap();

    let tallies: Vec<Tally> = run_sessions(SESSIONS, move |id, start| {
        session(db, lanes > 0, if lanes > 0 { 10 } else { 2 }, id, start)
    });

    let debited: i64 = tallies.iter().map(|t| t.debited).sum();
    let settled: i64 = tallies.iter().map(|t| t.settled).sum();
    let still_held: i64 = tallies.iter().map(|t| t.still_held).sum();
    let accepted: u64 = tallies.iter().map(|t| t.accepted).sum();
    let refused: u64 = tallies.iter().map(|t| t.refused).sum();
    let retried: u64 = tallies.iter().map(|t| t.retried).sum();
    println!("{db}: accepted {accepted}, refused {refused}, retried {retried}: debited {debited}, settled {settled}, held {still_held}");

    assert!(
        tallies.iter().all(|t| t.refused >= REFUSALS_TO_STOP),
        "the pool must run dry for every session within {RUN_AT_MOST:?}, or the test proves nothing"
    );
    assert!(
        accepted > 100,
        "too little work was accepted to prove anything"
    );
    let committed = debited + settled + still_held;
    assert!(
        committed <= credit - FLOOR,
        "overspend: {committed} accepted against {} available above the floor",
        credit - FLOOR
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
        credit - debited - settled,
        "every accepted debit, and nothing else, was drained"
    );
    assert_eq!(available, credit - committed);
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
    if lanes > 0 {
        let row = c
            .query_one(
                "SELECT count(*) FILTER (WHERE p.lane > 0 AND e.kind = 'debit'), \
                        count(*) FILTER (WHERE e.kind = 'transfer') \
                 FROM billing.ledger e JOIN billing.pools p ON p.id = e.pool_id",
                &[],
            )
            .unwrap();
        let (lane_debits, transfers): (i64, i64) = (row.get(0), row.get(1));
        assert!(
            lane_debits > 100 && transfers > 0,
            "the lanes must have taken debits of their own ({lane_debits}) and been dealt credit ({transfers} transfers)"
        );
    }
    assert_eq!(ledger_problems(&mut c), Vec::<String>::new());
}
