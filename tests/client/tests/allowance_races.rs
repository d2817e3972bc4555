//! A window's allowance is granted once however many sessions use the pool
//! first in it, and strict usage never takes more than the window gives.

use pg_billing_client_tests::{connect, fresh_db, ledger_problems, run_sessions, sqlstate};

const DB: &str = "pgb_allowance_races";
const SESSIONS: usize = 32;

#[test]
fn racing_first_uses_of_a_window_grant_it_once_and_never_overspend() {
    let mut admin = fresh_db(DB);
    admin
        .batch_execute(
            "SELECT billing.set_allowance('org', 'requests', 20, every => 'day');
             -- a day passes: today's window is owed and not granted yet
             SET session_replication_role = replica;
             UPDATE billing.grants SET effective_at = effective_at - interval '1 day',
                    expires_at = expires_at - interval '1 day';
             UPDATE billing.ledger_entries SET effective_at = effective_at - interval '1 day',
                    recorded_at = recorded_at - interval '1 day';
             UPDATE billing.pools SET cache_from = cache_from - interval '1 day',
                    cache_until = cache_until - interval '1 day',
                    allowance_next = allowance_next - interval '1 day';
             UPDATE billing.allowances SET starts_at = starts_at - interval '1 day';
             SET session_replication_role = origin;",
        )
        .unwrap();
    let owed: i64 = admin
        .query_one(
            "SELECT available FROM billing.check('org', 'requests')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(owed, 20, "owed before it is granted");
    let outcomes = run_sessions(SESSIONS, |i, start| {
        let mut c = connect(DB);
        start.wait();
        match c.execute(
            "SELECT * FROM billing.ingest('org', 'requests', 1, key => $1, strict => true)",
            &[&format!("r{i}")],
        ) {
            Ok(_) => "applied".to_string(),
            Err(e) => sqlstate(&e).unwrap_or_else(|| panic!("{e}")),
        }
    });
    let applied = outcomes.iter().filter(|o| *o == "applied").count();
    let refused = outcomes.iter().filter(|o| *o == "23514").count();
    assert_eq!((applied, refused), (20, SESSIONS - 20), "{outcomes:?}");
    let windows: i64 = admin
        .query_one(
            "SELECT count(*) FROM billing.grants WHERE key LIKE 'billing:allowance:%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(windows, 2, "yesterday's window and today's, each once");
    assert!(ledger_problems(&mut admin).is_empty());
}
