// Limits beside credit: a daily spend cap and per-member caps inside a
// shared pool, enforced with the floor's rule (strict usage and
// reservations refused, incurred usage recorded), named by check with the
// instant they reset, and reset by their window with no job.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::support::*;

    fn spend(account: &str, cost: i64, key: &str, extra: &str) -> Option<String> {
        sqlstate(&format!(
            "SELECT * FROM billing.ingest('{account}', 'mills', 1, key => '{key}', cost => {cost}, strict => true{extra})"
        ))
    }

    fn gate(account: &str, amount: i64, member: &str) -> String {
        one(&format!(
            "SELECT allowed || '/' || reason || '/' || coalesce((resets_at = date_trunc('day', now() AT TIME ZONE 'UTC') \
                    AT TIME ZONE 'UTC' + interval '1 day')::text, '-') \
             FROM billing.check('{account}', 'mills', {amount}, member => {member})"
        ))
    }

    #[pg_test]
    fn a_daily_spend_cap_refuses_strict_usage_past_it_and_resets_the_next_day() {
        grant("a", "mills", 10_000, "");
        let status: String =
            one("SELECT status FROM billing.set_limit('a', 'mills', 'daily', 100)");
        assert_eq!(status, "created");
        assert_eq!(spend("a", 60, "e1", ""), None);
        assert_eq!(
            gate("a", 40, "NULL"),
            "true/ok/-",
            "exactly at the cap is allowed"
        );
        assert_eq!(
            gate("a", 41, "NULL"),
            "false/limit:daily/true",
            "named, with tomorrow's reset"
        );
        let err = sqlstate("SELECT * FROM billing.ingest('a', 'mills', 1, key => 'e2', cost => 41, strict => true)");
        assert_eq!(err.as_deref(), Some("23514"));
        // usage already incurred is recorded past the cap, which then refuses
        run("SELECT * FROM billing.ingest('a', 'mills', 1, key => 'e3', cost => 50)");
        assert_eq!(gate("a", 0, "NULL"), "false/limit:daily/true");
        let status: String = one(
            "SELECT max || '/' || used || '/' || remaining FROM billing.limits_status('a', 'mills')",
        );
        assert_eq!(status, "100/110/0");
        assert_eq!(
            available("a", "mills"),
            10_000 - 110,
            "credit is another matter"
        );
        travel("a", "1 day");
        assert_eq!(gate("a", 100, "NULL"), "true/ok/-");
        assert_eq!(spend("a", 100, "e4", ""), None);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn each_member_has_a_cap_inside_the_shared_pool() {
        grant("org", "mills", 10_000, "");
        run("SELECT billing.set_limit('org', 'mills', 'per_user', 50, per_member => true)");
        run("SELECT billing.set_limit('org', 'mills', 'org_daily', 120)");
        let u1 = r#", properties => '{"member": "u1"}'"#;
        let u2 = r#", properties => '{"member": "u2"}'"#;
        let u3 = r#", properties => '{"member": "u3"}'"#;
        assert_eq!(spend("org", 50, "a1", u1), None);
        assert_eq!(spend("org", 1, "a2", u1).as_deref(), Some("23514"));
        assert_eq!(gate("org", 1, "'u1'"), "false/limit:per_user/true");
        assert_eq!(gate("org", 1, "'u2'"), "true/ok/-");
        assert_eq!(spend("org", 50, "b1", u2), None);
        // the organisation's own cap counts every member: 100 used of 120
        assert_eq!(spend("org", 21, "c1", u3).as_deref(), Some("23514"));
        assert_eq!(gate("org", 21, "'u3'"), "false/limit:org_daily/true");
        assert_eq!(spend("org", 20, "c2", u3), None);
        let per_member: String = one(
            "SELECT string_agg(name || ':' || coalesce(member, '-') || ':' || used, ' ' ORDER BY name) \
             FROM billing.limits_status('org', 'mills', member => 'u1')",
        );
        assert_eq!(per_member, "org_daily:-:120 per_user:u1:50");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_reservation_is_refused_past_a_limit_and_a_settlement_counts() {
        grant("a", "mills", 10_000, "");
        run("SELECT billing.set_limit('a', 'mills', 'hourly', 100, every => 'hour')");
        assert_rejected("SELECT * FROM billing.reserve('a', 'mills', 101)", "23514");
        let h: i64 = one("SELECT hold_id FROM billing.reserve('a', 'mills', 100)");
        run(&format!("SELECT * FROM billing.settle({h}, 70)"));
        let used: i64 = one("SELECT used FROM billing.limits_status('a', 'mills')");
        assert_eq!(used, 70);
        assert_rejected("SELECT * FROM billing.reserve('a', 'mills', 31)", "23514");
        // an open reservation counts; released or expired, it is given back
        let h2: i64 = one("SELECT hold_id FROM billing.reserve('a', 'mills', 20)");
        assert_eq!(
            one::<i64>("SELECT used FROM billing.limits_status('a', 'mills')"),
            90
        );
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'mills', 1, key => 'x', cost => 11, strict => true)",
            "23514",
        );
        run(&format!("SELECT * FROM billing.release({h2})"));
        assert_eq!(
            one::<i64>("SELECT used FROM billing.limits_status('a', 'mills')"),
            70
        );
        run("SELECT hold_id FROM billing.reserve('a', 'mills', 30, ttl => '1 minute')");
        assert_eq!(
            one::<i64>("SELECT used FROM billing.limits_status('a', 'mills')"),
            100
        );
        travel("a", "2 minutes");
        // the next call that locks the pool records the expiry and gives the 30 back
        run("SELECT * FROM billing.ingest('a', 'mills', 1, key => 'y', cost => 1, strict => true)");
        let used: i64 = one("SELECT sum(used)::bigint FROM billing.limit_usage");
        assert_eq!(used, 71);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn limits_and_lanes_do_not_mix_and_bad_limits_are_refused() {
        grant("a", "mills", 1000, "");
        run("SELECT billing.set_limit('a', 'mills', 'daily', 100)");
        assert_rejected("SELECT billing.set_lanes('a', 'mills', 4)", "55000");
        grant("b", "mills", 1000, "");
        run("SELECT billing.set_lanes('b', 'mills', 4)");
        assert_rejected(
            "SELECT * FROM billing.set_limit('b', 'mills', 'daily', 100)",
            "55000",
        );
        for call in [
            "billing.set_limit('a', 'mills', 'daily', -1)",
            "billing.set_limit('a', 'mills', 'daily', 5, every => 'fortnight')",
            "billing.set_limit('a', 'mills', 'Daily Cap', 5)",
            "billing.set_limit('a', 'mills', 'daily', 5, time_zone => 'Mars/Olympus')",
        ] {
            assert_rejected(&format!("SELECT * FROM {call}"), "22023");
        }
        let removed: bool = one("SELECT billing.remove_limit('a', 'mills', 'daily')");
        assert!(removed);
        assert_eq!(spend("a", 500, "big", ""), None, "no limit any more");
        run("SELECT billing.set_lanes('a', 'mills', 4)");
    }
}
