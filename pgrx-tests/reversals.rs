// Taking money back from a grant (refunds, disputes, voids) and giving it
// back (a won dispute): capped at what the grant gave, idempotent by total,
// never more debt than what the customer used (src/reversal.rs).

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::support::*;

    fn reverse(g: i64, total: i64) -> String {
        one(&format!(
            "SELECT concat_ws(',', status, total, revoked, debt_created, reinstated, available) \
             FROM billing.reverse_grant({g}, {total})"
        ))
    }

    fn debt(account: &str) -> i64 {
        one(&format!(
            "SELECT debt FROM billing.check('{account}', 'mills')"
        ))
    }

    #[pg_test]
    fn reverse_grant_validates_its_input() {
        let g = grant("a", "mills", 100, ", kind => 'topup'");
        assert_rejected(
            &format!("SELECT * FROM billing.reverse_grant({g}, -5)"),
            "22023",
        );
        assert_rejected(
            &format!("SELECT * FROM billing.reverse_grant({g}, NULL)"),
            "22004",
        );
        assert_rejected("SELECT * FROM billing.reverse_grant(NULL, 5)", "22004");
        assert_rejected("SELECT * FROM billing.reverse_grant(424242, 5)", "42704");
    }

    #[pg_test]
    fn unspent_credit_goes_first_and_the_rest_of_what_was_used_becomes_debt() {
        let g = grant("a", "mills", 100, ", kind => 'topup'");
        ingest("a", "mills", 70, "e1");
        assert_eq!(reverse(g, 50), "applied,50,30,20,0,-20");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_retried_reversal_reverses_once_and_the_total_is_capped_at_the_grant() {
        let g = grant("a", "mills", 100, ", kind => 'topup'");
        ingest("a", "mills", 20, "e1");
        assert_eq!(reverse(g, 60), "applied,60,60,0,0,20");
        let before = footprint();
        assert_eq!(reverse(g, 60), "unchanged,60,0,0,0,20", "a retry");
        assert_eq!(footprint(), before, "a retry writes nothing");
        // far beyond the grant: capped at its 100, and debt only for the 20 used
        assert_eq!(reverse(g, 1_000_000), "applied,100,20,20,0,-20");
        assert_eq!(debt("a"), 20, "a customer never owes more than they used");
        assert_eq!(reverse(g, 1_000_000), "unchanged,100,0,0,0,-20");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn void_then_refund_takes_back_once() {
        let g = grant("a", "mills", 1000, ", kind => 'topup'");
        ingest("a", "mills", 300, "e1");
        run(&format!("SELECT * FROM billing.void_grant({g})"));
        assert_eq!(debt("a"), 300);
        assert_eq!(reverse(g, 1000), "unchanged,1000,0,0,0,-300");
        assert_eq!(debt("a"), 300, "the refund finds the void took it all");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn refund_then_void_takes_only_the_rest() {
        let g = grant("a", "mills", 1000, ", kind => 'topup'");
        ingest("a", "mills", 300, "e1");
        assert_eq!(reverse(g, 500), "applied,500,500,0,0,200");
        let row: String = one(&format!(
            "SELECT concat_ws(',', status, removed, consumed, debt_created, available) FROM billing.void_grant({g})"
        ));
        assert_eq!(row, "voided,200,300,300,-300");
        assert_eq!(debt("a"), 300);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn revoke_then_refund_of_the_same_money_takes_nothing_more() {
        let g = grant("a", "mills", 1000, ", kind => 'topup'");
        ingest("a", "mills", 300, "e1");
        run(&format!("SELECT * FROM billing.revoke_unused({g})"));
        assert_eq!(reverse(g, 700), "unchanged,700,0,0,0,0");
        // the whole payment refunded after all: the 300 used are owed
        assert_eq!(reverse(g, 1000), "applied,1000,0,300,0,-300");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn credit_that_expired_unused_absorbs_a_refund_before_any_debt() {
        let g = grant(
            "a",
            "mills",
            1000,
            ", kind => 'topup', expires_at => now() + interval '1 day'",
        );
        ingest("a", "mills", 300, "e1");
        travel("a", "2 days");
        assert_eq!(reverse(g, 700), "unchanged,700,0,0,0,0");
        assert_eq!(debt("a"), 0, "700 expired unused: nothing is owed");
        assert_eq!(reverse(g, 1000), "applied,1000,0,300,0,-300");
        let untouched = grant(
            "b",
            "mills",
            500,
            ", kind => 'topup', expires_at => now() + interval '1 day'",
        );
        travel("b", "2 days");
        assert_eq!(reverse(untouched, 500), "unchanged,500,0,0,0,0");
        assert_eq!(debt("b"), 0, "never spent, never owed");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_lower_total_gives_back_what_was_taken() {
        let g = grant("a", "mills", 1000, ", kind => 'topup'");
        ingest("a", "mills", 600, "e1");
        assert_eq!(reverse(g, 1000), "applied,1000,400,600,0,-600");
        assert_eq!(reverse(g, 0), "applied,0,0,0,1000,400", "a won dispute");
        assert_eq!(remaining(g), 400);
        assert_eq!(debt("a"), 0);
        assert_eq!(reverse(g, 0), "unchanged,0,0,0,0,400", "once");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn debt_repaid_in_between_comes_back_as_credit() {
        let g = grant("a", "mills", 1000, ", kind => 'topup'");
        ingest("a", "mills", 1000, "e1");
        assert_eq!(reverse(g, 1000), "applied,1000,0,1000,0,-1000");
        grant("a", "mills", 1000, ", kind => 'topup'"); // repays the debt
        assert_eq!(available("a", "mills"), 0);
        assert_eq!(reverse(g, 0), "applied,0,0,0,1000,1000");
        assert_eq!(remaining(g), 1000, "the repaid debt returns to the grant");
        // and the whole payment refunded after all takes it again
        assert_eq!(reverse(g, 1000), "applied,1000,1000,0,0,0");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_voided_grant_gives_nothing_back() {
        let g = grant("a", "mills", 1000, ", kind => 'topup'");
        ingest("a", "mills", 300, "e1");
        run(&format!("SELECT * FROM billing.void_grant({g})"));
        assert_eq!(reverse(g, 0), "unchanged,0,0,0,0,-300");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn credit_given_back_after_the_grant_expired_expires() {
        let g = grant(
            "a",
            "mills",
            1000,
            ", kind => 'topup', expires_at => now() + interval '1 day'",
        );
        assert_eq!(reverse(g, 1000), "applied,1000,1000,0,0,0");
        travel("a", "2 days");
        assert_eq!(reverse(g, 0), "applied,0,0,0,1000,0");
        assert_eq!(remaining(g), 0);
        assert_eq!(
            one::<i64>(&format!(
                "SELECT count(*) FROM billing.ledger WHERE grant_id = {g} AND kind = 'expire'"
            )),
            1
        );
        assert_ledger_consistent();
    }
}
