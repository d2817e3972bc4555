//! docs/architecture.md, rule 2: the same 10,000 keys ingested concurrently from 8 sessions
//! (each in its own order, some one by one, some in batches) are applied
//! exactly once.

use std::collections::HashMap;
use std::sync::Barrier;

use pg_billing_client_tests::{connect, fresh_db, ledger_problems, run_sessions, Rng};

const DB: &str = "pgb_idempotent_ingest";
const KEYS: usize = 10_000;
const SESSIONS: usize = 8;
const ACCOUNTS: usize = 50;

fn account_of(k: usize) -> String {
    format!("acct{}", k % ACCOUNTS)
}

/// One key in seven costs nothing: such an event changes no balance, and must
/// still be applied exactly once (its write touches the pool row all the same).
fn cost_of(k: usize) -> i64 {
    (k % 7) as i64
}

/// Returns, per key, how many times this session saw it `applied`.
fn session(id: usize, start: &Barrier) -> HashMap<usize, u32> {
    let mut c = connect(DB);
    c.batch_execute("SET synchronous_commit = off").unwrap();
    let mut order: Vec<usize> = (0..KEYS).collect();
    Rng::new(id as u64 + 100).shuffle(&mut order);
    let mut applied = HashMap::new();
    start.wait();
    if id.is_multiple_of(2) {
        for &k in &order {
            let row = c
                .query_one(
                    "SELECT status FROM billing.ingest($1, 'credits', 1, key => $2, cost => $3)",
                    &[&account_of(k), &format!("k{k}"), &cost_of(k)],
                )
                .unwrap_or_else(|e| panic!("ingest k{k}: {e}"));
            if row.get::<_, &str>(0) == "applied" {
                *applied.entry(k).or_insert(0) += 1;
            }
        }
    } else {
        for chunk in order.chunks(250) {
            let events: Vec<String> = chunk
                .iter()
                .map(|&k| {
                    format!(
                        r#"{{"account":"{}","meter":"credits","quantity":1,"key":"k{k}","cost":{}}}"#,
                        account_of(k),
                        cost_of(k)
                    )
                })
                .collect();
            let json = format!("[{}]", events.join(","));
            for row in c
                .query(
                    "SELECT key, status FROM billing.ingest_batch($1::text::jsonb)",
                    &[&json],
                )
                .unwrap_or_else(|e| panic!("batch: {e}"))
            {
                if row.get::<_, &str>(1) == "applied" {
                    let k: usize = row.get::<_, &str>(0)[1..].parse().unwrap();
                    *applied.entry(k).or_insert(0) += 1;
                }
            }
        }
    }
    applied
}

#[test]
fn the_same_keys_from_eight_sessions_apply_exactly_once() {
    let mut c = fresh_db(DB);
    for a in 0..ACCOUNTS {
        c.execute(
            "SELECT * FROM billing.grant($1, 'credits', 100000, kind => 'topup')",
            &[&format!("acct{a}")],
        )
        .unwrap();
    }
    let results = run_sessions(SESSIONS, session);
    let mut applied: HashMap<usize, u32> = HashMap::new();
    for result in results {
        for (k, n) in result {
            *applied.entry(k).or_insert(0) += n;
        }
    }
    for k in 0..KEYS {
        assert_eq!(
            applied.get(&k).copied().unwrap_or(0),
            1,
            "key k{k} applied {:?} times",
            applied.get(&k)
        );
    }

    let (events, charged): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT count(*), sum(cost)::bigint FROM billing.usage_events",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(events, KEYS as i64);
    let expected: i64 = (0..KEYS).map(cost_of).sum();
    assert_eq!(charged, expected);
    for a in 0..ACCOUNTS {
        let acct = format!("acct{a}");
        let want: i64 = 100_000
            - (0..KEYS)
                .filter(|k| k % ACCOUNTS == a)
                .map(cost_of)
                .sum::<i64>();
        let got: i64 = c
            .query_one(
                "SELECT available FROM billing.check($1, 'credits')",
                &[&acct],
            )
            .unwrap()
            .get(0);
        assert_eq!(
            got, want,
            "{acct} was charged a key more than once, or not at all"
        );
    }
    assert_eq!(ledger_problems(&mut c), Vec::<String>::new());
}

/// A replay of recorded keys is answered from their events: it waits for no
/// pool lock, writes nothing and takes no transaction id. A call with one key
/// not recorded yet locks its pools as any new event does.
#[test]
fn a_replay_locks_no_pool_and_writes_nothing() {
    let db = "pgb_replay_no_lock";
    let mut c = fresh_db(db);
    c.batch_execute(
        "SELECT * FROM billing.grant('a', 'credits', 100, kind => 'topup');
         SELECT * FROM billing.ingest('a', 'credits', 1, key => 'k1', cost => 3);
         SELECT * FROM billing.ingest('a', 'credits', 1, key => 'k2', cost => 4);",
    )
    .unwrap();
    // another transaction holds the pool
    let mut holder = connect(db);
    holder
        .batch_execute("BEGIN; SELECT 1 FROM billing.pools WHERE account = 'a' FOR UPDATE")
        .unwrap();

    let mut s = connect(db);
    s.batch_execute("SET lock_timeout = '2s'; BEGIN").unwrap();
    let row = s
        .query_one(
            "SELECT status, event_id, available FROM billing.ingest('a', 'credits', 1, key => 'k1', cost => 3)",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "duplicate");
    assert_eq!(
        row.get::<_, i64>(2),
        97,
        "the original outcome's available figure"
    );
    let statuses: Vec<String> = s
        .query(
            "SELECT status FROM billing.ingest_batch('[{\"account\":\"a\",\"meter\":\"credits\",\"quantity\":1,\"key\":\"k2\",\"cost\":4},
                                                     {\"account\":\"a\",\"meter\":\"credits\",\"quantity\":1,\"key\":\"k1\",\"cost\":3}]')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(statuses, ["duplicate", "duplicate"]);
    let xid: Option<String> = s
        .query_one("SELECT pg_current_xact_id_if_assigned()::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        xid, None,
        "a replay wrote nothing, so took no transaction id"
    );
    // the same key with other parameters is still refused
    let err = s
        .query_one(
            "SELECT status FROM billing.ingest('a', 'credits', 1, key => 'k1', cost => 5)",
            &[],
        )
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("23505"));
    s.batch_execute("ROLLBACK; BEGIN").unwrap();
    // a key not recorded yet waits for the pool, here until lock_timeout
    let err = s
        .query(
            "SELECT status FROM billing.ingest_batch('[{\"account\":\"a\",\"meter\":\"credits\",\"quantity\":1,\"key\":\"k1\",\"cost\":3},
                                                     {\"account\":\"a\",\"meter\":\"credits\",\"quantity\":1,\"key\":\"k3\",\"cost\":1}]')",
            &[],
        )
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("55P03"));
    s.batch_execute("ROLLBACK").unwrap();
    holder.batch_execute("ROLLBACK").unwrap();
    assert_eq!(ledger_problems(&mut c), Vec::<String>::new());
}
