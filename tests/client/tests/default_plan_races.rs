//! README, "The default (free) plan", under real concurrent sessions: the
//! first uses of an account nobody has seen yet make one pool, one default
//! rule and one month of credit, and strict usage never takes more; an
//! account's first use racing its first subscription leaves no free credit
//! running beside the paid plan, whichever commits first.

use pg_billing_client_tests::{connect, fresh_db, ledger_problems, run_sessions, sqlstate};
use postgres::Client;

const DB: &str = "pgb_default_plan_races";
const SESSIONS: usize = 32;

fn setup() -> Client {
    let mut c = fresh_db(DB);
    c.batch_execute(
        "SELECT billing.define_unit('credits');
         SELECT * FROM billing.define_plan('free', '{\"credits\": {\"amount\": 20}}');
         SELECT * FROM billing.define_plan('basic', '{\"credits\": {\"amount\": 1000}}',
                                           '[{\"price_id\": \"price_basic\", \"interval\": \"month\"}]');
         SELECT * FROM billing.set_default_plan('free');",
    )
    .unwrap();
    c
}

fn count(c: &mut Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

#[test]
fn first_uses_of_a_new_account_make_one_month_and_never_overspend() {
    let mut admin = setup();
    let outcomes = run_sessions(SESSIONS, |i, start| {
        let mut c = connect(DB);
        start.wait();
        match c.execute(
            "SELECT * FROM billing.ingest('newcomer', 'credits', 1, key => $1, cost => 1, strict => true)",
            &[&format!("n{i}")],
        ) {
            Ok(_) => "applied".to_string(),
            Err(e) => sqlstate(&e).unwrap_or_else(|| panic!("{e}")),
        }
    });
    let applied = outcomes.iter().filter(|o| *o == "applied").count();
    let refused = outcomes.iter().filter(|o| *o == "23514").count();
    assert_eq!((applied, refused), (20, SESSIONS - 20), "{outcomes:?}");
    assert_eq!(
        count(
            &mut admin,
            "SELECT count(*) FROM billing.allowances WHERE account = 'newcomer'"
        ),
        1,
        "one default rule"
    );
    assert_eq!(
        count(
            &mut admin,
            "SELECT count(*) FROM billing.grants WHERE account = 'newcomer'"
        ),
        1,
        "one month of credit"
    );
    assert!(ledger_problems(&mut admin).is_empty());
}

/// A first use whose transaction began before another first use made the
/// account (its `now()` is earlier than the account) spends the same month's
/// credit: the race the test above runs, made deterministic.
#[test]
fn a_first_use_dated_before_the_account_was_made_spends_its_month() {
    let mut admin = setup();
    let mut early = connect(DB);
    early
        .batch_execute("BEGIN; SELECT now();")
        .expect("a transaction dated now");
    std::thread::sleep(std::time::Duration::from_millis(20));
    admin
        .execute(
            "SELECT * FROM billing.ingest('latecomer', 'credits', 1, key => 'first', cost => 1, strict => true)",
            &[],
        )
        .unwrap();
    let available: i64 = early
        .query_one(
            "SELECT available FROM billing.ingest('latecomer', 'credits', 1, key => 'earlier', cost => 19, strict => true)",
            &[],
        )
        .expect("the month's credit is spendable by a use dated before the account")
        .get(0);
    early.batch_execute("COMMIT").unwrap();
    assert_eq!(available, 0);
    assert_eq!(
        count(
            &mut admin,
            "SELECT count(*) FROM billing.grants WHERE account = 'latecomer'"
        ),
        1,
        "one month of credit"
    );
    assert!(ledger_problems(&mut admin).is_empty());
}

/// A subscription object as Stripe's API returns it, trimmed to what the
/// projection reads; its period is the calendar month.
fn subscription(id: &str, account: &str) -> String {
    format!(
        r#"{{"object": "subscription", "id": "{id}", "status": "active", "customer": "cus_{account}",
            "metadata": {{"account": "{account}"}}, "cancel_at_period_end": false,
            "items": {{"object": "list", "data": [{{"object": "subscription_item",
                "price": {{"id": "price_basic", "object": "price"}}, "quantity": 1}}]}}}}"#
    )
}

/// Run `sql` with `arg`; a deadlock PostgreSQL broke (40P01) is retried, as
/// a caller would.
fn call(c: &mut Client, sql: &str, arg: &str) {
    for _ in 0..5 {
        match c.execute(sql, &[&arg]) {
            Ok(_) => return,
            Err(e) if sqlstate(&e).as_deref() == Some("40P01") => continue,
            Err(e) => panic!("{sql}: {e:?}"),
        }
    }
    panic!("{sql}: deadlocked five times");
}

#[test]
fn a_first_use_racing_the_first_subscription_leaves_no_free_credit_running() {
    let mut admin = setup();
    for round in 0..8 {
        let account = format!("org_{round}");
        let sub = subscription(&format!("sub_{round}"), &account);
        let (a, s) = (account.clone(), sub.clone());
        run_sessions(2, move |i, start| {
            let mut c = connect(DB);
            start.wait();
            if i == 0 {
                call(
                    &mut c,
                    "SELECT * FROM billing.sync_subscription($1::text::jsonb)",
                    &s,
                );
            } else {
                call(
                    &mut c,
                    "SELECT * FROM billing.ingest($1, 'credits', 1, key => $1 || ':first', cost => 5)",
                    &a,
                );
            }
        });
        let running = count(
            &mut admin,
            &format!(
                "SELECT count(*) FROM billing.allowances WHERE account = '{account}' \
                 AND default_plan IS NOT NULL AND (ends_at IS NULL OR ends_at > now())"
            ),
        );
        let free_left = count(
            &mut admin,
            &format!(
                "SELECT coalesce(sum(billing.grant_remaining(g)), 0)::bigint FROM billing.grants g \
                 WHERE account = '{account}' AND key LIKE 'billing:allowance:%' AND status = 'active'"
            ),
        );
        let available = count(
            &mut admin,
            &format!("SELECT available FROM billing.check('{account}', 'credits')"),
        );
        assert_eq!(
            (running, free_left),
            (0, 0),
            "round {round}: no default rule nor free credit beside the subscription"
        );
        assert_eq!(
            available, 995,
            "round {round}: the plan's 1,000 less the 5 used, whichever came first"
        );
    }
    assert!(ledger_problems(&mut admin).is_empty());
}
