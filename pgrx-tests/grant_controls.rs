// Manual grants under control (sql/grant_controls.sql): who and why kept on
// every grant by hand; a tenant's policy caps each grant and each role's day,
// sends grants above a threshold to a second role for approval, and says what
// goodwill to a canceled account does. Concurrent grants against one day's
// cap run over real connections (tests/client/tests/grant_controls.rs).

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::stripe;
    use crate::pgrx_tests::support::*;

    /// Two support agents and a lead who is a member of agent_a (support
    /// roles: billing_support), and the application's role (billing_app),
    /// acting for the default tenant, each switched to with SET LOCAL ROLE.
    fn agents() {
        run("SELECT billing.define_unit('cents')");
        for role in ["agent_a", "agent_b", "lead_a"] {
            run(&format!("CREATE ROLE {role} IN ROLE billing_support"));
        }
        run("CREATE ROLE app_role IN ROLE billing_app");
        run("GRANT agent_a TO lead_a");
        run("SELECT billing.grant_tenant('default', 'billing_support')");
        run("SELECT billing.grant_tenant('default', 'billing_app')");
    }

    fn as_role(role: &str, sql: &str) -> String {
        run(&format!("SET LOCAL ROLE {role}"));
        let out = one::<String>(sql);
        run("RESET ROLE");
        out
    }

    fn rejected_as(role: &str, sql: &str, state: &str) {
        run(&format!("SET LOCAL ROLE {role}"));
        assert_rejected(sql, state);
        run("RESET ROLE");
    }

    fn by_hand(amount: i64, extra: &str) -> String {
        format!(
            "SELECT status || ':' || grant_id FROM billing.grant('a', 'cents', {amount}{extra})"
        )
    }

    fn status(sql: &str) -> String {
        sql.split(':').next().unwrap_or_default().to_string()
    }

    fn grants_of_a() -> i64 {
        one("SELECT count(*) FROM billing.grants WHERE account = 'a'")
    }

    #[pg_test]
    fn a_grant_by_hand_keeps_who_gave_it_and_why() {
        agents();
        as_role(
            "agent_a",
            &by_hand(100, ", key => 'sorry-1', reason => 'outage on the 3rd'"),
        );
        assert_eq!(
            one::<String>("SELECT granted_by::text || '|' || reason FROM billing.grants WHERE key = 'sorry-1'"),
            "agent_a|outage on the 3rd"
        );
        // the reason belongs to the request: a replay must carry it
        assert_eq!(
            status(&as_role(
                "agent_a",
                &by_hand(100, ", key => 'sorry-1', reason => 'outage on the 3rd'")
            )),
            "duplicate"
        );
        rejected_as(
            "agent_a",
            "SELECT * FROM billing.grant('a', 'cents', 100, key => 'sorry-1', reason => 'another story')",
            "23505",
        );
        rejected_as(
            "agent_a",
            &format!(
                "SELECT * FROM billing.grant('a', 'cents', 1, reason => '{}')",
                "x".repeat(1001)
            ),
            "22023",
        );
        // with no policy a reason is not required
        as_role("agent_a", &by_hand(5, ""));
        assert_eq!(available("a", "cents"), 105);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_policy_requires_a_reason_and_caps_each_grant_by_hand() {
        agents();
        run("SELECT * FROM billing.set_grant_policy('cents', max_per_grant => 1000)");
        rejected_as("agent_a", &by_hand(100, ""), "22023");
        rejected_as("agent_a", &by_hand(100, ", reason => E' \\t\\n'"), "22023");
        rejected_as("agent_a", &by_hand(1001, ", reason => 'big'"), "42501");
        rejected_as(
            "agent_a",
            &by_hand(1001, ", kind => 'promo', reason => 'big'"),
            "42501",
        );
        assert_eq!(grants_of_a(), 0, "a refused grant writes nothing");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.granted_per_day"),
            0
        );
        as_role("agent_a", &by_hand(1000, ", reason => 'at the cap'"));
        // credit that comes from a payment is not given by hand: the
        // application's role grants it, uncontrolled; a support role may not
        for kind in ["topup", "reload", "refund", "plan"] {
            rejected_as(
                "agent_a",
                &by_hand(5000, &format!(", kind => '{kind}', reason => 'r'")),
                "42501",
            );
        }
        as_role("app_role", &by_hand(5000, ", kind => 'topup'"));
        assert_eq!(available("a", "cents"), 6000);
        // an unknown unit, a bad setting
        assert_rejected("SELECT * FROM billing.set_grant_policy('nope')", "42704");
        assert_rejected(
            "SELECT * FROM billing.set_grant_policy('cents', max_per_day => 0)",
            "22023",
        );
        assert_rejected(
            "SELECT * FROM billing.set_grant_policy('cents', when_canceled => 'maybe')",
            "22023",
        );
        assert!(one::<bool>("SELECT billing.remove_grant_policy('cents')"));
        as_role("agent_a", &by_hand(5000, ""));
        assert_ledger_consistent();
    }

    #[pg_test]
    fn each_role_has_its_own_daily_cap() {
        agents();
        run("SELECT * FROM billing.set_grant_policy('cents', max_per_day => 1000)");
        as_role("agent_a", &by_hand(600, ", reason => 'r'"));
        rejected_as("agent_a", &by_hand(500, ", reason => 'r'"), "42501");
        as_role("agent_a", &by_hand(400, ", kind => 'promo', reason => 'r'"));
        rejected_as("agent_a", &by_hand(1, ", reason => 'r'"), "42501");
        // another role's day is its own
        as_role("agent_b", &by_hand(1000, ", reason => 'r'"));
        assert_eq!(available("a", "cents"), 2000);
        assert_eq!(
            one::<String>(
                "SELECT string_agg(role_id::text || ':' || granted, ' ' ORDER BY role_id::text) \
                 FROM billing.granted_per_day"
            ),
            "agent_a:1000 agent_b:1000"
        );
        // the next UTC day starts from nothing
        run("UPDATE billing.granted_per_day SET day = day - 1");
        as_role("agent_a", &by_hand(1000, ", reason => 'r'"));
        assert_ledger_consistent();
    }

    #[pg_test]
    fn above_the_threshold_a_grant_waits_for_another_role() {
        agents();
        run("SELECT * FROM billing.set_grant_policy('cents', approval_above => 500, max_per_day => 2000)");
        as_role("agent_a", &by_hand(500, ", reason => 'at the threshold'"));
        let asked = as_role(
            "agent_a",
            &by_hand(800, ", key => 'big-1', reason => 'enterprise outage'"),
        );
        assert_eq!(status(&asked), "pending_approval");
        let id: i64 = asked.split(':').nth(1).unwrap().parse().unwrap();
        assert_eq!(
            available("a", "cents"),
            500,
            "nothing credited while it waits"
        );
        assert_eq!(
            status(&as_role(
                "agent_a",
                &by_hand(800, ", key => 'big-1', reason => 'enterprise outage'")
            )),
            "pending_approval",
            "a replay waits too"
        );
        rejected_as(
            "agent_a",
            "SELECT * FROM billing.grant('a', 'cents', 900, key => 'big-1', reason => 'enterprise outage')",
            "23505",
        );
        // not by the role that asked, a member of it, a group it is in (its
        // tenant is granted: membership alone refuses), or a superuser
        let approve = format!("SELECT status FROM billing.approve_grant({id})");
        rejected_as("agent_a", &approve, "42501");
        rejected_as("lead_a", &approve, "42501");
        rejected_as("billing_support", &approve, "42501");
        assert_rejected(&approve, "42501");
        // another tenant has no such grant
        run("SET LOCAL billing.tenant = 'other'");
        assert_rejected(&approve, "42704");
        assert_rejected(
            &format!("SELECT * FROM billing.reject_grant({id})"),
            "42704",
        );
        run("RESET billing.tenant");
        assert_eq!(as_role("agent_b", &approve), "applied");
        assert_eq!(available("a", "cents"), 1300);
        assert_eq!(as_role("agent_b", &approve), "duplicate");
        assert_eq!(
            status(&as_role(
                "agent_a",
                &by_hand(800, ", key => 'big-1', reason => 'enterprise outage'")
            )),
            "duplicate"
        );
        assert_eq!(
            one::<String>(&format!(
                "SELECT g.granted_by::text || '|' || a.decided_by::text || '|' || a.status \
                 FROM billing.grants g JOIN billing.grant_approvals a ON a.grant_id = g.id WHERE g.id = {id}"
            )),
            "agent_a|agent_b|approved"
        );
        assert_rejected(
            &format!("SELECT * FROM billing.reject_grant({id})"),
            "55000",
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_rejected_grant_is_never_applied_and_gives_its_day_back() {
        agents();
        run("SELECT * FROM billing.set_grant_policy('cents', approval_above => 100, max_per_day => 1000)");
        let asked = as_role("agent_a", &by_hand(900, ", key => 'big-2', reason => 'r'"));
        let id: i64 = asked.split(':').nth(1).unwrap().parse().unwrap();
        rejected_as("agent_a", &by_hand(200, ", reason => 'r'"), "42501");
        assert_eq!(
            as_role(
                "agent_b",
                &format!("SELECT status || ':' || decision FROM billing.reject_grant({id}, 'not an outage')")
            ),
            "rejected:not an outage"
        );
        assert_rejected(
            &format!("SELECT * FROM billing.approve_grant({id})"),
            "55000",
        );
        assert_eq!(
            status(&as_role(
                "agent_a",
                &by_hand(900, ", key => 'big-2', reason => 'r'")
            )),
            "rejected",
            "a replay of its key answers as it ended"
        );
        assert_eq!(grants_of_a(), 0);
        // its 900 no longer counts on agent_a's day
        assert_eq!(
            status(&as_role("agent_a", &by_hand(100, ", reason => 'r'"))),
            "applied"
        );
        assert_rejected("SELECT * FROM billing.approve_grant(424242)", "42704");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn goodwill_to_a_canceled_account_follows_the_policy() {
        agents();
        run(
            r#"SELECT * FROM billing.define_plan('basic', '{"cents": {"amount": 1000}}',
                   '[{"price_id": "price_basic", "interval": "month", "amount": 2000}]')"#,
        );
        let t = stripe::now_unix();
        let s = stripe::subscription(
            "sub_1",
            "a",
            "canceled",
            "price_basic",
            1,
            t - 86_400 * 40,
            t - 86_400 * 10,
        );
        run(&format!(
            "SELECT * FROM billing.sync_subscription('{}'::jsonb)",
            s.to_string().replace('\'', "''")
        ));
        run("SELECT * FROM billing.set_grant_policy('cents', when_canceled => 'refuse')");
        rejected_as("agent_a", &by_hand(10, ", reason => 'come back'"), "55000");
        // a payment is not goodwill
        as_role("app_role", &by_hand(10, ", kind => 'topup'"));
        run("SELECT * FROM billing.set_grant_policy('cents', when_canceled => 'approval')");
        assert_eq!(
            status(&as_role("agent_a", &by_hand(10, ", reason => 'come back'"))),
            "pending_approval",
            "whatever the amount"
        );
        assert_eq!(
            one::<String>("SELECT needs FROM billing.grant_approvals"),
            "canceled_account"
        );
        // an account that never subscribed is not canceled
        assert_eq!(
            one::<String>(
                "SELECT status FROM billing.grant('b', 'cents', 10, reason => 'welcome')"
            ),
            "applied"
        );
        assert_ledger_consistent();
    }
}
