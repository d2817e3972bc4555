//! A grant's remaining is its row's less what its pool's row has drawn from
//! it (docs/architecture.md, "The pool store"): readers must see the two as
//! one at every instant, not only once the writers are done. Writer sessions
//! debit pools whose drain moves from grant to grant (and top them up with
//! grants drained first) while reader sessions check, each in one statement,
//! that every grant's remaining sums to its pool's booked remaining and what
//! `check` answers, and that `verify_ledger()` finds nothing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

use pg_billing_client_tests::{connect, fresh_db, ledger_problems, run_sessions, Rng};

const DB: &str = "pgb_consistent_reads";
const WRITERS: usize = 6;
const READERS: usize = 2;
const ACCOUNTS: i64 = 3;
const EVENTS_PER_WRITER: usize = 300;

/// What a session did: debits applied (writers), checks made (readers).
#[derive(Default, Debug)]
struct Done {
    applied: u64,
    checks: u64,
}

fn writer(id: usize, start: &Barrier) -> Done {
    let mut c = connect(DB);
    let mut rng = Rng::new(id as u64 + 7);
    let mut done = Done::default();
    start.wait();
    for n in 0..EVENTS_PER_WRITER {
        let account = format!("acct{}", rng.range(0, ACCOUNTS - 1));
        if n % 50 == 49 {
            // a grant that is drained before the one being drawn from
            c.query_one(
                "SELECT grant_id FROM billing.grant($1, 'credits', 40, kind => 'plan')",
                &[&account],
            )
            .unwrap();
            continue;
        }
        let row = c
            .query_one(
                "SELECT status FROM billing.ingest($1, 'credits', 1, key => $2, cost => $3)",
                &[&account, &format!("w{id}_{n}"), &rng.range(1, 3)],
            )
            .unwrap();
        if row.get::<_, &str>(0) == "applied" {
            done.applied += 1;
        }
    }
    done
}

fn reader(writers_left: &AtomicUsize, start: &Barrier) -> Done {
    let mut c = connect(DB);
    let mut done = Done::default();
    start.wait();
    while writers_left.load(Ordering::SeqCst) > 0 {
        for a in 0..ACCOUNTS {
            let account = format!("acct{a}");
            // one statement, one snapshot: the grants, the pool row and check
            let row = c
                .query_one(
                    "SELECT sum(g.remaining)::bigint,
                            (sum(g.remaining) FILTER (WHERE g.state = 'active'))::bigint,
                            (SELECT remaining FROM billing.pools WHERE account = $1 AND lane = 0),
                            (SELECT balance FROM billing.check($1, 'credits', 0))
                     FROM billing.grant_balances g WHERE g.account = $1",
                    &[&account],
                )
                .unwrap();
            let (grants, active, pool, balance): (i64, i64, i64, i64) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            assert_eq!(
                grants, pool,
                "{account}: its grants' remaining against its pool row's"
            );
            // a grant made by a transaction that began after this statement's
            // is booked, but not effective yet at this statement's instant
            assert_eq!(
                balance, active,
                "{account}: check's balance against its active grants'"
            );
            done.checks += 1;
        }
        assert_eq!(ledger_problems(&mut c), Vec::<String>::new());
    }
    done
}

#[test]
fn grants_and_their_pool_read_as_one_while_debits_move_the_drain() {
    let mut c = fresh_db(DB);
    for a in 0..ACCOUNTS {
        // five grants, drained one after another (priority, then expiry)
        for (kind, expires) in [
            ("promo", "now() + interval '10 days'"),
            ("promo", "now() + interval '20 days'"),
            ("promo", "NULL"),
            ("topup", "NULL"),
            ("topup", "NULL"),
        ] {
            c.execute(
                &format!(
                    "SELECT * FROM billing.grant($1, 'credits', 300, kind => '{kind}', expires_at => {expires})"
                ),
                &[&format!("acct{a}")],
            )
            .unwrap();
        }
    }
    let writers_left = Arc::new(AtomicUsize::new(WRITERS));
    let left = writers_left.clone();
    let done = run_sessions(WRITERS + READERS, move |id, start| {
        if id < WRITERS {
            let d = writer(id, start);
            left.fetch_sub(1, Ordering::SeqCst);
            d
        } else {
            reader(&left, start)
        }
    });
    let applied: u64 = done.iter().map(|d| d.applied).sum();
    let checks: u64 = done.iter().map(|d| d.checks).sum();
    assert!(applied > 1000, "the writers debited ({applied})");
    assert!(checks > 0, "the readers read while the writers wrote");
    assert_eq!(writers_left.load(Ordering::SeqCst), 0);
    // the drain moved across grants: several were written back along the way
    let drawn_from: i64 = c
        .query_one(
            "SELECT count(*) FROM billing.grants g WHERE billing.grant_remaining(g) < g.amount",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        drawn_from > ACCOUNTS,
        "debits drew from several grants of each pool"
    );
    assert_eq!(ledger_problems(&mut c), Vec::<String>::new());
}
