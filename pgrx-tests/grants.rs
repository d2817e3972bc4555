// Grants, debt and its repayment (docs/architecture.md, rule 7), void and revoke.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::support::*;

    #[pg_test]
    fn uncovered_usage_becomes_debt_and_the_next_grant_repays_it_first() {
        grant("a", "mills", 100, ", kind => 'plan'");
        let row: String = one(
            "SELECT concat_ws(',', cost, covered, debt_created, available, entitled) \
                               FROM billing.ingest('a', 'mills', 1, key => 'e1', cost => 130)",
        );
        assert_eq!(row, "130,100,30,-30,f", "the usage is recorded in full");
        let g: String = one("SELECT concat_ws(',', remaining, debt_repaid, available) \
                             FROM billing.grant('a', 'mills', 50, kind => 'topup')");
        assert_eq!(g, "20,30,20", "the grant pays the 30 of debt first");
        let repayment: String = one(
            "SELECT kind || ':' || grant_amount || ':' || debt_amount || ':' || amount \
                                     FROM billing.ledger WHERE kind = 'debt_repayment'",
        );
        assert_eq!(
            repayment, "debt_repayment:-30:-30:0",
            "repayment moves credit to debt, net zero"
        );
        assert_eq!(one::<i64>("SELECT debt FROM billing.pools"), 0);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_grant_smaller_than_the_debt_is_consumed_whole() {
        run("SELECT * FROM billing.define_unit('mills')");
        run("SELECT * FROM billing.ingest('a', 'mills', 1, key => 'e1', cost => 80)");
        let g: String = one("SELECT concat_ws(',', remaining, debt_repaid, available) FROM billing.grant('a', 'mills', 50)");
        assert_eq!(g, "0,50,-30");
        assert!(!one::<bool>(
            "SELECT allowed FROM billing.check('a', 'mills')"
        ));
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_future_grant_repays_debt_when_it_becomes_effective() {
        run("SELECT * FROM billing.define_unit('mills')");
        run("SELECT * FROM billing.ingest('a', 'mills', 1, key => 'e1', cost => 40)");
        let g = grant(
            "a",
            "mills",
            100,
            ", effective_at => now() + interval '1 day'",
        );
        assert_eq!(remaining(g), 100, "not effective: it cannot pay yet");
        assert_eq!(available("a", "mills"), -40);
        travel("a", "1 day");
        assert_eq!(
            available("a", "mills"),
            60,
            "the gate is exact before any write"
        );
        ingest("a", "mills", 0, "e2");
        assert_eq!(remaining(g), 60, "the first write records the repayment");
        assert_eq!(one::<i64>("SELECT debt FROM billing.pools"), 0);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn revoke_unused_shrinks_a_grant_to_what_was_consumed() {
        let g = grant("a", "mills", 100, ", kind => 'topup'");
        ingest("a", "mills", 35, "e1");
        let row: String = one(&format!("SELECT concat_ws(',', status, removed, consumed, debt_created, available) FROM billing.revoke_unused({g})"));
        assert_eq!(row, "revoked,65,35,0,0");
        assert_eq!(remaining(g), 0);
        let again: String = one(&format!("SELECT status FROM billing.revoke_unused({g})"));
        assert_eq!(again, "duplicate", "revoking twice changes nothing");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.ledger WHERE kind = 'revoke'"),
            1
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn void_reverses_a_grant_and_its_spent_part_becomes_debt() {
        let g = grant("a", "mills", 100, ", kind => 'promo'");
        let other = grant("a", "mills", 10, ", kind => 'topup'");
        ingest("a", "mills", 60, "e1");
        let row: String = one(&format!("SELECT concat_ws(',', status, removed, consumed, debt_created, available) FROM billing.void_grant({g})"));
        assert_eq!(
            row, "voided,40,60,60,-50",
            "the other grant repays 10 of the 60 at once"
        );
        assert_eq!(remaining(other), 0);
        assert_eq!(
            one::<String>(&format!("SELECT status FROM billing.grants WHERE id = {g}")),
            "voided"
        );
        assert_rejected(
            &format!("SELECT * FROM billing.revoke_unused({g})"),
            "55000",
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn closing_an_unknown_grant_is_an_error() {
        assert_rejected("SELECT * FROM billing.void_grant(424242)", "42704");
        assert_rejected("SELECT * FROM billing.revoke_unused(424242)", "42704");
    }

    #[pg_test]
    fn conservation_holds_across_every_kind_of_entry() {
        let plan = grant(
            "a",
            "mills",
            500,
            ", kind => 'plan', expires_at => now() + interval '1 day'",
        );
        let topup = grant("a", "mills", 300, ", kind => 'topup'");
        let promo = grant("a", "mills", 200, ", kind => 'promo'");
        ingest("a", "mills", 450, "e1");
        run("SELECT * FROM billing.reserve('a', 'mills', 100, key => 'h1')");
        run(&format!("SELECT * FROM billing.revoke_unused({promo})"));
        travel("a", "1 day");
        ingest("a", "mills", 900, "e2");
        run(&format!("SELECT * FROM billing.void_grant({topup})"));
        grant("a", "mills", 2000, ", kind => 'topup'");
        let _ = plan;
        // Σ granted − Σ debits − Σ expired − Σ revoked − Σ voided = Σ remaining
        let lhs: i64 = one("SELECT sum(amount)::bigint FROM billing.grants");
        let out: i64 = one("SELECT (-sum(grant_amount) FILTER (WHERE kind <> 'grant'))::bigint FROM billing.ledger");
        let rem: i64 = one("SELECT sum(billing.grant_remaining(g))::bigint FROM billing.grants g");
        assert_eq!(lhs - out, rem);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn tenant_grants_are_validated_and_granting_twice_changes_nothing() {
        run("CREATE ROLE tenant_test_role NOLOGIN");
        assert_rejected(
            "SELECT billing.grant_tenant('bad tenant!', 'tenant_test_role')",
            "22023",
        );
        assert_rejected(
            "SELECT billing.grant_tenant('acme', 'no_such_role_xyz')",
            "42704",
        );
        run("SELECT billing.grant_tenant('acme', 'tenant_test_role')");
        run("SELECT billing.grant_tenant('acme', 'tenant_test_role')");
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM billing.tenant_roles WHERE role_id = 'tenant_test_role'::regrole"
            ),
            1
        );
        assert!(one::<bool>(
            "SELECT billing.revoke_tenant('acme', 'tenant_test_role')"
        ));
        assert!(!one::<bool>(
            "SELECT billing.revoke_tenant('acme', 'tenant_test_role')"
        ));
    }
}
