//! README, "Plans and subscriptions", under real concurrent sessions: two
//! checkouts racing for one account leave one live subscription (the other a
//! recorded conflict); one subscription delivered by many sessions at once is
//! granted once; racing seat changes never grant past the ceiling they set;
//! one provider customer never ends up with two accounts.

use pg_billing_client_tests::{connect, fresh_db, ledger_problems, run_sessions, sqlstate};
use postgres::Client;

const DB: &str = "pgb_subscription_races";
const SESSIONS: usize = 8;

fn setup() -> Client {
    let mut c = fresh_db(DB);
    c.batch_execute(
        "SELECT billing.define_unit('credits');
         SELECT * FROM billing.define_plan('basic', '{\"credits\": {\"amount\": 1000}}',
                                           '[{\"price_id\": \"price_basic\", \"interval\": \"month\"}]');
         SELECT * FROM billing.define_plan('team', '{\"credits\": {\"amount\": 100, \"per_seat\": true}}',
                                           '[{\"price_id\": \"price_team\", \"interval\": \"month\"}]');",
    )
    .unwrap();
    c
}

/// A subscription object as Stripe's API returns it, trimmed to what the
/// projection reads; its period is the calendar month.
fn subscription(id: &str, account: &str, customer: &str, price: &str, seats: i64) -> String {
    format!(
        r#"{{"object": "subscription", "id": "{id}", "status": "active", "customer": "{customer}",
            "metadata": {{"account": "{account}"}}, "cancel_at_period_end": false,
            "items": {{"object": "list", "data": [{{"object": "subscription_item",
                "price": {{"id": "{price}", "object": "price"}}, "quantity": {seats}}}]}}}}"#
    )
}

/// Every session syncs its object at once; returns each outcome (or SQLSTATE).
fn race(objects: Vec<String>) -> Vec<String> {
    let objects = std::sync::Arc::new(objects);
    run_sessions(objects.len(), move |i, start| {
        let mut c = connect(DB);
        start.wait();
        match c.query_one(
            "SELECT outcome FROM billing.sync_subscription($1::text::jsonb)",
            &[&objects[i]],
        ) {
            Ok(row) => row.get::<_, String>(0),
            Err(e) => sqlstate(&e).unwrap_or_else(|| panic!("{e}")),
        }
    })
}

fn count(c: &mut Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

#[test]
fn parallel_checkouts_leave_one_live_subscription_and_one_allowance() {
    let mut c = setup();
    for round in 0..5 {
        let account = format!("org_{round}");
        let objects = (0..SESSIONS)
            .map(|i| {
                subscription(
                    &format!("sub_{round}_{i}"),
                    &account,
                    &format!("cus_{round}"),
                    "price_basic",
                    1,
                )
            })
            .collect();
        let outcomes = race(objects);
        assert_eq!(
            outcomes.iter().filter(|o| *o == "created").count(),
            1,
            "round {round}: {outcomes:?}"
        );
        assert_eq!(
            outcomes.iter().filter(|o| *o == "conflict").count(),
            SESSIONS - 1,
            "round {round}: {outcomes:?}"
        );
        let live = count(
            &mut c,
            &format!("SELECT count(*) FROM billing.subscriptions WHERE account = '{account}'"),
        );
        assert_eq!(live, 1);
        let conflicts = count(
            &mut c,
            &format!(
                "SELECT count(*) FROM billing.subscription_conflicts WHERE account = '{account}'"
            ),
        );
        assert_eq!(
            conflicts,
            SESSIONS as i64 - 1,
            "each loser recorded for a refund"
        );
        let credit = count(
            &mut c,
            &format!("SELECT available FROM billing.check('{account}', 'credits')"),
        );
        assert_eq!(credit, 1000, "one allowance");
    }
    assert_eq!(ledger_problems(&mut c), Vec::<String>::new());
}

#[test]
fn one_subscription_delivered_by_many_sessions_is_granted_once() {
    let mut c = setup();
    for round in 0..5 {
        let account = format!("org_{round}");
        let object = subscription(
            &format!("sub_{round}"),
            &account,
            &format!("cus_{round}"),
            "price_basic",
            1,
        );
        let outcomes = race(vec![object; SESSIONS]);
        assert_eq!(
            outcomes.iter().filter(|o| *o == "created").count(),
            1,
            "round {round}: {outcomes:?}"
        );
        assert!(
            outcomes
                .iter()
                .all(|o| ["created", "unchanged", "stale"].contains(&o.as_str())),
            "round {round}: {outcomes:?}"
        );
        let credit = count(
            &mut c,
            &format!("SELECT available FROM billing.check('{account}', 'credits')"),
        );
        assert_eq!(credit, 1000, "granted once");
    }
    assert_eq!(ledger_problems(&mut c), Vec::<String>::new());
}

#[test]
fn racing_seat_changes_grant_exactly_up_to_the_ceiling_they_set() {
    let mut c = setup();
    c.batch_execute(&format!(
        "SELECT * FROM billing.sync_subscription('{}')",
        subscription("sub_t", "org_t", "cus_t", "price_team", 1)
    ))
    .unwrap();
    for round in 0..5 {
        let objects = (0..SESSIONS)
            .map(|i| {
                subscription(
                    "sub_t",
                    "org_t",
                    "cus_t",
                    "price_team",
                    (round * SESSIONS + i + 1) as i64,
                )
            })
            .collect();
        let outcomes = race(objects);
        assert!(
            outcomes
                .iter()
                .all(|o| ["updated", "unchanged", "stale"].contains(&o.as_str())),
            "round {round}: {outcomes:?}"
        );
        let (ceiling, granted, seats): (i64, i64, i32) = {
            let row = c
                .query_one(
                    "SELECT a.ceiling, (SELECT sum(g.amount) FROM billing.grants g WHERE g.id = ANY (a.grant_ids))::bigint, \
                            s.seats \
                     FROM billing.subscription_allowances a JOIN billing.subscriptions s ON s.id = a.subscription_id",
                    &[],
                )
                .unwrap();
            (row.get(0), row.get(1), row.get(2))
        };
        assert_eq!(
            granted, ceiling,
            "round {round}: the grants add up to the ceiling, nothing twice"
        );
        assert!(
            ceiling >= 100 * seats as i64,
            "round {round}: the ceiling covers the seats applied last"
        );
        assert!(
            ceiling <= 100 * ((round + 1) * SESSIONS) as i64,
            "round {round}: never above a seat count that was sent"
        );
    }
    assert_eq!(ledger_problems(&mut c), Vec::<String>::new());
}

#[test]
fn one_customer_never_gets_two_accounts() {
    let mut c = setup();
    for round in 0..5 {
        let objects = (0..SESSIONS)
            .map(|i| {
                subscription(
                    &format!("sub_{round}_{i}"),
                    &format!("org_{round}_{i}"),
                    &format!("cus_shared_{round}"),
                    "price_basic",
                    1,
                )
            })
            .collect();
        let outcomes = race(objects);
        assert_eq!(
            outcomes.iter().filter(|o| *o == "created").count(),
            1,
            "round {round}: {outcomes:?}"
        );
        assert!(
            outcomes
                .iter()
                .all(|o| o == "created" || o == "55000" || o == "23505"),
            "round {round}: the others are refused: {outcomes:?}"
        );
        let mapped = count(
            &mut c,
            &format!("SELECT count(*) FROM billing.provider_customers WHERE customer = 'cus_shared_{round}'"),
        );
        assert_eq!(mapped, 1);
        let subs = count(
            &mut c,
            &format!(
                "SELECT count(*) FROM billing.subscriptions WHERE customer = 'cus_shared_{round}'"
            ),
        );
        assert_eq!(subs, 1);
    }
    assert_eq!(ledger_problems(&mut c), Vec::<String>::new());
}

#[test]
fn concurrent_member_adds_lose_no_seat() {
    let mut c = setup();
    c.batch_execute(
        "CREATE TABLE members (org text, user_id text, pending boolean NOT NULL DEFAULT false);
         CREATE TRIGGER billing_seats AFTER INSERT OR UPDATE OR DELETE ON members
             FOR EACH ROW EXECUTE FUNCTION billing.count_seats('org', 'user_id', 'NOT pending');
         INSERT INTO members VALUES ('org_m', 'owner');",
    )
    .unwrap();
    c.batch_execute(&format!(
        "SELECT * FROM billing.sync_subscription('{}')",
        subscription("sub_m", "org_m", "cus_m", "price_team", 1)
    ))
    .unwrap();
    const ADDS: usize = 5;
    run_sessions(SESSIONS, |i, start| {
        let mut s = connect(DB);
        start.wait();
        for n in 0..ADDS {
            s.execute(
                "INSERT INTO members (org, user_id) VALUES ('org_m', $1)",
                &[&format!("u{i}_{n}")],
            )
            .unwrap();
        }
    });
    let seats = count(
        &mut c,
        "SELECT seats::bigint FROM billing.seats WHERE account = 'org_m'",
    );
    let expected = (SESSIONS * ADDS + 1) as i64;
    assert_eq!(seats, expected, "every member counted once");
    let credit = count(
        &mut c,
        "SELECT available FROM billing.check('org_m', 'credits')",
    );
    assert_eq!(
        credit,
        100 * expected,
        "the allowance followed every seat, granted once each"
    );
    let pending = count(
        &mut c,
        "SELECT count(*) FROM billing.seat_pushes WHERE pushed_at IS NULL AND account = 'org_m'",
    );
    assert_eq!(pending, 1, "one pending push with the latest count");
    assert_eq!(ledger_problems(&mut c), Vec::<String>::new());
}
