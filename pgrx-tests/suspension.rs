// Suspended grants (docs/architecture.md, "Suspended grants"): credit kept but
// not spendable, as a delinquent subscription's plan credit; resumed, the
// rest of it is spendable again.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::support::*;

    fn suspend(grant_id: i64) -> String {
        one(&format!(
            "SELECT concat_ws(',', status, remaining, available) FROM billing.suspend_grant({grant_id})"
        ))
    }

    fn resume(grant_id: i64) -> String {
        one(&format!(
            "SELECT concat_ws(',', status, remaining, available) FROM billing.resume_grant({grant_id})"
        ))
    }

    #[pg_test]
    fn suspended_credit_is_not_spent_and_comes_back_when_resumed() {
        run("SELECT * FROM billing.define_unit('mills')");
        let plan = grant("a", "mills", 100, ", kind => 'plan'");
        let topup = grant("a", "mills", 40, ", kind => 'topup'");
        ingest("a", "mills", 30, "e1");
        assert_eq!(remaining(plan), 70, "the plan credit is drained first");
        assert_eq!(suspend(plan), "suspended,70,40");
        assert_eq!(available("a", "mills"), 40, "the gate sees it at once");
        assert_eq!(
            ingest("a", "mills", 25, "e2"),
            format!(r#"[{{"amount": 25, "grant_id": {topup}}}]"#),
            "usage drains around the suspended grant"
        );
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'mills', 1, key => 'e3', cost => 16, strict => true)",
            "23514",
        );
        assert_eq!(
            remaining(plan),
            70,
            "what was used stays used, the rest is kept"
        );
        assert_eq!(suspend(plan), "duplicate,70,15");
        assert_eq!(resume(plan), "active,70,85");
        assert_eq!(resume(plan), "duplicate,70,85");
        ingest("a", "mills", 10, "e4");
        assert_eq!(remaining(plan), 60, "spendable again, first in drain order");
        let kinds: String = one(&format!(
            "SELECT string_agg(kind::text, ',' ORDER BY version) FROM billing.ledger \
             WHERE grant_id = {plan} AND kind IN ('suspend', 'resume')"
        ));
        assert_eq!(
            kinds, "suspend,resume",
            "each change is one entry; replays add none"
        );
        let moved: i64 = one(&format!(
            "SELECT sum(abs(amount) + abs(grant_amount))::bigint FROM billing.ledger \
             WHERE grant_id = {plan} AND kind IN ('suspend', 'resume')"
        ));
        assert_eq!(moved, 0, "suspension moves no amount");
        assert_eq!(
            one::<String>(&format!(
                "SELECT state FROM billing.grant_balances WHERE grant_id = {plan}"
            )),
            "active"
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_suspended_grant_shows_as_suspended_and_not_in_past_balances() {
        run("SELECT * FROM billing.define_unit('mills')");
        let plan = grant("a", "mills", 100, ", kind => 'plan'");
        grant("a", "mills", 5, ", kind => 'topup'");
        run("SELECT pg_sleep(0.01)");
        let before: String = one("SELECT clock_timestamp()::text");
        run("SELECT pg_sleep(0.01)");
        suspend(plan);
        assert_eq!(
            one::<String>(&format!(
                "SELECT state || ',' || remaining FROM billing.grant_balances WHERE grant_id = {plan}"
            )),
            "suspended,100"
        );
        let at = |t: &str| -> String {
            one(&format!(
                "SELECT concat_ws(',', balance, available) FROM billing.balance('a', 'mills', as_of => {t})"
            ))
        };
        assert_eq!(
            at(&format!("'{before}'")),
            "105,105",
            "before it was suspended"
        );
        assert_eq!(at("NULL"), "5,5", "now");
        assert_eq!(at("clock_timestamp()"), "5,5");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_resumed_grant_repays_debt_first_and_expires_if_its_time_passed() {
        run("SELECT * FROM billing.define_unit('mills')");
        let plan = grant(
            "a",
            "mills",
            100,
            ", kind => 'plan', expires_at => now() + interval '1 month'",
        );
        suspend(plan);
        ingest("a", "mills", 30, "e1");
        assert_eq!(
            available("a", "mills"),
            -30,
            "usage while suspended is debt"
        );
        let repaid = resume(plan);
        assert_eq!(repaid, "active,70,70", "its credit repays the debt first");
        assert_eq!(one::<i64>("SELECT debt FROM billing.pools"), 0);

        suspend(plan);
        travel("a", "1 month");
        assert_eq!(
            remaining(plan),
            70,
            "kept while suspended: nothing spends or expires it"
        );
        assert_eq!(resume(plan), "active,0,0", "resumed after its expiry: gone");
        let expired: i64 = one(&format!(
            "SELECT -grant_amount FROM billing.ledger WHERE grant_id = {plan} AND kind = 'expire'"
        ));
        assert_eq!(expired, 70, "its expiry is in the ledger");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_suspended_grant_can_be_voided_or_revoked_and_a_closed_one_not_suspended() {
        run("SELECT * FROM billing.define_unit('mills')");
        let plan = grant("a", "mills", 100, ", kind => 'plan'");
        let promo = grant("a", "mills", 50, ", kind => 'promo'");
        ingest("a", "mills", 30, "e1");
        suspend(plan);
        suspend(promo);
        let revoked: String = one(&format!(
            "SELECT concat_ws(',', status, removed, consumed, debt_created, available) \
             FROM billing.revoke_unused({plan})"
        ));
        assert_eq!(revoked, "revoked,70,30,0,0");
        let voided: String = one(&format!(
            "SELECT concat_ws(',', status, removed, available) FROM billing.void_grant({promo})"
        ));
        assert_eq!(voided, "voided,50,0");
        assert_rejected(
            &format!("SELECT * FROM billing.resume_grant({plan})"),
            "55000",
        );
        assert_rejected(
            &format!("SELECT * FROM billing.suspend_grant({promo})"),
            "55000",
        );
        assert_rejected("SELECT * FROM billing.suspend_grant(999999)", "42704");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn suspending_a_grant_of_a_split_pool_takes_its_lanes_share_too() {
        run("SELECT * FROM billing.define_unit('mills')");
        let plan = grant("a", "mills", 1000, ", kind => 'plan'");
        run("SELECT * FROM billing.set_lanes('a', 'mills', 4)");
        ingest("a", "mills", 10, "e1");
        assert_eq!(suspend(plan), "suspended,990,0");
        assert_eq!(available("a", "mills"), 0);
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'mills', 1, key => 'e2', cost => 1, strict => true)",
            "23514",
        );
        let in_lanes: i64 = one(&format!(
            "SELECT coalesce(sum(billing.grant_remaining(g)), 0)::bigint FROM billing.grants g WHERE parent_id = {plan}"
        ));
        assert_eq!(in_lanes, 0, "no lane keeps a share of suspended credit");
        assert_eq!(resume(plan), "active,990,990");
        ingest("a", "mills", 10, "e3");
        assert_eq!(available("a", "mills"), 980);
        assert_ledger_consistent();
    }
}
