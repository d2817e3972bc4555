// The tenant's default (free) plan: every account with no live subscription
// has its allowance each calendar month, before its pool exists too; a live
// subscription (delinquent included) replaces it, counting what was used of
// it, and it returns when the subscription ends.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::stripe::*;
    use crate::pgrx_tests::support::*;

    const DAY: i64 = 86_400;

    fn plans() {
        run("SELECT * FROM billing.define_unit('credits')");
        run(r#"SELECT * FROM billing.define_plan('free', '{"credits": {"amount": 100}}')"#);
        run(
            r#"SELECT * FROM billing.define_plan('basic', '{"credits": {"amount": 1000}}',
                   '[{"price_id": "price_basic_m", "interval": "month", "amount": 2000}]')"#,
        );
    }

    fn set_default(key: &str) -> String {
        one(&format!(
            "SELECT status || ':' || accounts FROM billing.set_default_plan('{key}')"
        ))
    }

    /// Apply Stripe's subscription object `s` as observed now (the poll path).
    fn sync(s: &serde_json::Value) {
        run(&format!(
            "SELECT * FROM billing.sync_subscription('{}'::jsonb)",
            s.to_string().replace('\'', "''")
        ));
    }

    fn credits(account: &str) -> i64 {
        available(account, "credits")
    }

    fn reason(account: &str) -> String {
        one(&format!(
            "SELECT reason FROM billing.check('{account}', 'credits', 1)"
        ))
    }

    /// The amounts of the default rules of `account` running now, oldest first.
    fn default_rules(account: &str) -> String {
        opt::<String>(&format!(
            "SELECT string_agg(amount::text, ',' ORDER BY id) FROM billing.allowances \
             WHERE account = '{account}' AND default_plan IS NOT NULL \
               AND starts_at <= now() AND (ends_at IS NULL OR ends_at > now())"
        ))
        .unwrap_or_default()
    }

    #[pg_test]
    fn every_account_without_a_subscription_has_the_default_plans_monthly_allowance() {
        plans();
        grant("early", "credits", 500, ", kind => 'topup'");
        assert_eq!(
            set_default("free"),
            "set:1",
            "the existing account is brought to it"
        );
        assert_eq!(credits("early"), 600);
        assert_eq!(set_default("free"), "unchanged:0");
        // an account that has never been seen: owed before its pool exists
        assert_eq!(credits("new"), 100);
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.pools WHERE account = 'new'"),
            0
        );
        ingest("new", "credits", 30, "n1");
        assert_eq!(credits("new"), 70);
        let window: String = one(
            "SELECT kind || ':' || amount || ':' || \
                    (expires_at = date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' + interval '1 month') \
             FROM billing.grants WHERE account = 'new'",
        );
        assert_eq!(
            window, "plan:100:true",
            "a plan grant that expires at the month's end (UTC)"
        );
        // a month later: a new window, the old one expired
        travel("new", "32 days");
        assert_eq!(credits("new"), 100);
        ingest("new", "credits", 10, "n2");
        assert_eq!(credits("new"), 90);
        assert_eq!(default_rules("new"), "100");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_live_subscription_replaces_the_default_plan_until_it_ends() {
        plans();
        set_default("free");
        ingest("org_1", "credits", 60, "u1");
        assert_eq!(credits("org_1"), 40);
        let t = now_unix();
        let (start, end) = (t - 10 * DAY, t + 20 * DAY);
        let sub = |status: &str| {
            let s = subscription("sub_1", "org_1", status, "price_basic_m", 1, start, end);
            sync(&s);
        };
        sub("active");
        assert_eq!(
            credits("org_1"),
            940,
            "the plan's 1,000 for the period, less the 60 used of the free month; the free rest is revoked"
        );
        assert_eq!(default_rules("org_1"), "");
        sub("past_due");
        assert_eq!(
            credits("org_1"),
            0,
            "no fallback to the free plan while delinquent"
        );
        assert_eq!(reason("org_1"), "subscription_past_due");
        assert_eq!(default_rules("org_1"), "");
        sub("canceled");
        assert_eq!(credits("org_1"), 100, "the default plan applies again");
        assert_eq!(default_rules("org_1"), "100");
        // a pool made while the subscription was live got no default rule
        sub_on_new_pool();
        assert_ledger_consistent();
    }

    fn sub_on_new_pool() {
        let t = now_unix();
        let s = subscription(
            "sub_2",
            "org_2",
            "active",
            "price_basic_m",
            1,
            t - DAY,
            t + 29 * DAY,
        );
        sync(&s);
        assert_eq!(credits("org_2"), 1000);
        assert_eq!(default_rules("org_2"), "");
        run("SELECT billing.define_unit('tokens')");
        run(
            r#"SELECT * FROM billing.define_plan('free', '{"credits": {"amount": 100}, "tokens": {"amount": 7}}')"#,
        );
        set_default("free");
        assert_eq!(
            available("org_2", "tokens"),
            0,
            "a subscriber's check sees no free tokens"
        );
        grant("org_2", "tokens", 1, ", kind => 'topup'");
        assert_eq!(available("org_2", "tokens"), 1);
        assert_eq!(default_rules("org_2"), "");
    }

    #[pg_test]
    fn an_allowance_the_application_set_takes_precedence() {
        plans();
        run("SELECT * FROM billing.set_allowance('org', 'credits', 5, every => 'day')");
        set_default("free");
        assert_eq!(credits("org"), 5);
        assert_eq!(default_rules("org"), "");
        // set on a pool it makes: no default month beside it
        run("SELECT * FROM billing.set_allowance('guest_1', 'credits', 3, every => 'never')");
        assert_eq!(credits("guest_1"), 3);
        assert_eq!(default_rules("guest_1"), "");
        // set on a pool running the default plan: the application's rule runs from now
        // (the running month's default credit stays, not the default rule)
        ingest("member", "credits", 10, "m1");
        run("SELECT * FROM billing.set_allowance('member', 'credits', 5, every => 'day')");
        assert_eq!(credits("member"), 95);
        assert_eq!(default_rules("member"), "");
        // the default plan's rule is not the application's to end; ending its
        // own hands over to the default plan when it ends
        ingest("other", "credits", 1, "o1");
        assert_rejected(
            "SELECT * FROM billing.end_allowance('other', 'credits')",
            "55000",
        );
        run("SELECT * FROM billing.end_allowance('member', 'credits')");
        let queued: String = one(
            "SELECT amount || ':' || (starts_at = date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' + interval '1 day') \
             FROM billing.allowances WHERE account = 'member' AND default_plan IS NOT NULL AND starts_at > now()",
        );
        assert_eq!(
            queued, "100:true",
            "the default plan takes over when the day's rule ends"
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_unit_the_default_plan_gives_nothing_of_has_no_rule() {
        plans();
        run("SELECT billing.define_unit('tokens')");
        run(
            r#"SELECT * FROM billing.define_plan('free2', '{"credits": {"amount": 100}, "tokens": {"amount": 0}}')"#,
        );
        set_default("free2");
        assert_eq!(available("org", "tokens"), 0);
        grant("org", "tokens", 5, ", kind => 'topup'");
        assert_eq!(available("org", "tokens"), 5);
        assert_eq!(default_rules("org"), "");
        assert_eq!(credits("org"), 100);
        assert_rejected("SELECT * FROM billing.retire_plan('free2')", "55000");
    }

    // The month the account subscribes in is not owed by the default plan,
    // granted or not: here a new month began and no call locked the pool
    // before the subscription's first observation, which is delinquent.
    #[pg_test]
    fn a_subscription_ends_a_month_not_granted_yet() {
        plans();
        set_default("free");
        ingest("org_1", "credits", 10, "u1");
        travel("org_1", "32 days");
        assert_eq!(credits("org_1"), 100, "the new month is owed");
        let t = now_unix();
        let s = subscription(
            "sub_1",
            "org_1",
            "past_due",
            "price_basic_m",
            1,
            t - 10 * DAY,
            t + 20 * DAY,
        );
        sync(&s);
        assert_eq!(credits("org_1"), 0);
        assert_eq!(reason("org_1"), "subscription_past_due");
        ingest("org_1", "credits", 1, "u2");
        assert_eq!(credits("org_1"), -1, "a debit grants no free month either");
        assert_ledger_consistent();
    }

    // A guest converted to an account: the account has the default plan, the
    // guest's free credit stays where it was, and the guest gets no more.
    #[pg_test]
    fn a_converted_guest_leaves_the_default_plan_to_its_account() {
        plans();
        run("SELECT billing.define_unit('tokens')");
        run(
            r#"SELECT * FROM billing.define_plan('free', '{"credits": {"amount": 100}, "tokens": {"amount": 9}}')"#,
        );
        set_default("free");
        run("SELECT * FROM billing.set_allowance('guest', 'credits', 3, every => 'never')");
        ingest("guest", "credits", 1, "g1");
        run("SELECT * FROM billing.convert_guest('guest', 'org')");
        assert_eq!(credits("org"), 102, "its own month and the guest's 2 left");
        assert_eq!(default_rules("org"), "100");
        assert_eq!(
            available("guest", "tokens"),
            0,
            "nothing more for the guest"
        );
        assert_eq!(available("org", "tokens"), 9);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_new_default_version_takes_over_at_the_next_month() {
        plans();
        set_default("free");
        ingest("org", "credits", 10, "u1");
        run(r#"SELECT * FROM billing.define_plan('free', '{"credits": {"amount": 200}}')"#);
        assert_eq!(set_default("free"), "set:1");
        assert_eq!(credits("org"), 90, "the running month keeps its credit");
        let rules: String = one(
            "SELECT string_agg(amount || ':' || coalesce((ends_at = date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' \
                                                             + interval '1 month')::text, 'open') \
                               || ':' || (starts_at > now()), ',' ORDER BY id) \
             FROM billing.allowances WHERE account = 'org'",
        );
        assert_eq!(
            rules, "100:true:false,200:open:true",
            "the new amount from the next month"
        );
        travel("org", "32 days");
        assert_eq!(credits("org"), 200);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_default_plan_must_be_free_of_seats_and_current() {
        plans();
        run(
            r#"SELECT * FROM billing.define_plan('team', '{"credits": {"amount": 10, "per_seat": true}}')"#,
        );
        assert_rejected("SELECT * FROM billing.set_default_plan('team')", "22023");
        assert_rejected("SELECT * FROM billing.set_default_plan('nope')", "22023");
        run("SELECT * FROM billing.retire_plan('free')");
        assert_rejected("SELECT * FROM billing.set_default_plan('free')", "55000");
        assert_eq!(one::<i64>("SELECT count(*) FROM billing.default_plans"), 0);
    }
}
