//! README, "Manual grants under control", over real connections: grants by
//! hand from one role racing for its daily cap never pass it together, and
//! a support tool that logs in once and switches to each agent's role with
//! SET ROLE gets a second agent's approval, never its own.

use pg_billing_client_tests::{fresh_db, ledger_problems, login, run_sessions, sqlstate};
use postgres::Client;

const DB: &str = "pgb_grant_controls";

fn setup() -> Client {
    let mut admin = fresh_db(DB);
    admin
        .batch_execute(
            "DROP ROLE IF EXISTS pgb_agent; DROP ROLE IF EXISTS pgb_support;
             DROP ROLE IF EXISTS pgb_alice; DROP ROLE IF EXISTS pgb_bob;
             CREATE ROLE pgb_agent LOGIN IN ROLE billing_support;
             CREATE ROLE pgb_alice IN ROLE billing_support; CREATE ROLE pgb_bob IN ROLE billing_support;
             CREATE ROLE pgb_support LOGIN;
             GRANT pgb_alice, pgb_bob TO pgb_support;
             SELECT billing.grant_tenant('default', 'billing_support');
             SELECT billing.define_unit('cents');",
        )
        .unwrap();
    admin
}

fn total(c: &mut Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

#[test]
fn concurrent_grants_by_one_role_never_pass_its_daily_cap() {
    let mut admin = setup();
    admin
        .batch_execute("SELECT * FROM billing.set_grant_policy('cents', max_per_day => 1000)")
        .unwrap();
    // eight grants of 300 on two accounts: the pools do not queue them, the
    // role's day does
    let outcomes = run_sessions(8, |i, start| {
        let mut c = login(DB, "pgb_agent", "default");
        start.wait();
        match c.execute(
            "SELECT * FROM billing.grant($1, 'cents', 300, reason => 'outage credit')",
            &[&format!("acct{}", i % 2)],
        ) {
            Ok(_) => "applied".to_string(),
            Err(e) => sqlstate(&e).unwrap_or_else(|| panic!("{e}")),
        }
    });
    let applied = outcomes.iter().filter(|o| *o == "applied").count();
    let refused = outcomes.iter().filter(|o| *o == "42501").count();
    assert_eq!((applied, refused), (3, 5), "{outcomes:?}");
    assert_eq!(
        total(&mut admin, "SELECT sum(amount)::bigint FROM billing.grants"),
        900
    );
    assert_eq!(
        total(
            &mut admin,
            "SELECT sum(granted)::bigint FROM billing.granted_per_day"
        ),
        900,
        "refused grants count nothing"
    );
    assert!(ledger_problems(&mut admin).is_empty());
}

#[test]
fn a_support_tool_gets_a_second_agents_approval_never_its_own() {
    let mut admin = setup();
    admin
        .batch_execute("SELECT * FROM billing.set_grant_policy('cents', approval_above => 500)")
        .unwrap();
    let mut tool = login(DB, "pgb_support", "default");
    tool.batch_execute("SET ROLE pgb_alice").unwrap();
    let row = tool
        .query_one(
            "SELECT grant_id, status FROM billing.grant('org_1', 'cents', 2000, key => 'ticket-77', \
             reason => 'double charge on ticket 77')",
            &[],
        )
        .unwrap();
    let (id, status): (i64, String) = (row.get(0), row.get(1));
    assert_eq!(status, "pending_approval");
    let approve = |c: &mut Client| -> Result<String, String> {
        c.query_one("SELECT status FROM billing.approve_grant($1)", &[&id])
            .map(|r| r.get(0))
            .map_err(|e| sqlstate(&e).unwrap_or_default())
    };
    assert_eq!(approve(&mut tool), Err("42501".into()), "alice's own");
    tool.batch_execute("RESET ROLE").unwrap();
    assert_eq!(
        approve(&mut tool),
        Err("42501".into()),
        "the login that can act as alice"
    );
    assert_eq!(total(&mut admin, "SELECT count(*) FROM billing.grants"), 0);
    tool.batch_execute("SET ROLE pgb_bob").unwrap();
    assert_eq!(approve(&mut tool), Ok("applied".into()));
    let who: String = admin
        .query_one(
            "SELECT g.granted_by::text || ' ' || a.decided_by::text || ' ' || g.reason \
             FROM billing.grants g JOIN billing.grant_approvals a ON a.grant_id = g.id",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(who, "pgb_alice pgb_bob double charge on ticket 77");
    assert_eq!(
        total(
            &mut admin,
            "SELECT available FROM billing.check('org_1', 'cents')"
        ),
        2000
    );
    assert!(ledger_problems(&mut admin).is_empty());
}
