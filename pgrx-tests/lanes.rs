// docs/architecture.md, "Split pools": a hot pool split across lanes keeps the
// drain order, the floor, expiry and every ledger invariant exact; readers
// see one pool. (Concurrency: the client test zero_overspend, split pool.)

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::support::*;

    fn lane_credit(account: &str) -> i64 {
        one(&format!(
            "SELECT coalesce(sum(remaining), 0)::bigint FROM billing.pools \
             WHERE account = '{account}' AND lane > 0"
        ))
    }

    /// A grant's remaining as readers see it, its lanes' shares included.
    fn grant_remaining(grant_id: i64) -> i64 {
        one(&format!(
            "SELECT remaining FROM billing.grant_balances WHERE grant_id = {grant_id}"
        ))
    }

    /// Splitting a pool is a pool setting, as its floor is: the tenant's
    /// admin role may, its application role may not.
    #[pg_test]
    fn an_admin_splits_a_pool_and_the_application_may_not() {
        grant("a", "mills", 1000, ", kind => 'topup'");
        run("CREATE ROLE lanes_admin IN ROLE billing_admin");
        run("CREATE ROLE lanes_app IN ROLE billing_app");
        run("SELECT billing.grant_tenant('default', 'lanes_admin')");
        run("SELECT billing.grant_tenant('default', 'lanes_app')");
        run("SET LOCAL ROLE lanes_app");
        assert_rejected("SELECT billing.set_lanes('a', 'mills', 4)", "42501");
        run("SET LOCAL ROLE lanes_admin");
        assert_eq!(one::<i32>("SELECT billing.set_lanes('a', 'mills', 4)"), 4);
        run("RESET ROLE");
        assert_eq!(
            one::<i16>("SELECT lanes FROM billing.pools WHERE account = 'a' AND lane = 0"),
            4
        );
    }

    #[pg_test]
    fn lanes_take_the_first_grant_in_drain_order_and_readers_see_one_pool() {
        let promo = grant("a", "mills", 1000, ", kind => 'promo'");
        let topup = grant("a", "mills", 500, ", kind => 'topup'");
        assert_eq!(one::<i32>("SELECT billing.set_lanes('a', 'mills', 4)"), 4);

        // the first debit locks the pool, then deals the promo's credit to the lanes
        assert_eq!(
            ingest("a", "mills", 10, "e1"),
            format!(r#"[{{"amount": 10, "grant_id": {promo}}}]"#)
        );
        assert_eq!(
            lane_credit("a"),
            4 * (990 / 5),
            "each lane holds a fifth of the promo"
        );
        assert_eq!(
            remaining(promo),
            990 - 4 * 198,
            "the rest stays in the pool"
        );
        // a lane pays the next one; the drain names the grant, not the lane's share
        assert_eq!(
            ingest("a", "mills", 10, "e2"),
            format!(r#"[{{"amount": 10, "grant_id": {promo}}}]"#)
        );
        assert_eq!(lane_credit("a"), 4 * 198 - 10);
        assert_eq!(available("a", "mills"), 1480);
        assert_eq!(
            one::<i64>("SELECT available FROM billing.balance('a', 'mills')"),
            1480
        );
        assert_eq!(grant_remaining(promo), 980);
        assert_eq!(grant_remaining(topup), 500);
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.grant_balances"),
            2,
            "the lanes' shares are not grants of their own"
        );

        // a plan grant comes first in drain order: the lanes give the promo back
        let plan = grant("a", "mills", 100, ", kind => 'plan'");
        assert_eq!(lane_credit("a"), 0);
        assert_eq!(
            ingest("a", "mills", 30, "e3"),
            format!(r#"[{{"amount": 30, "grant_id": {plan}}}]"#)
        );
        assert_eq!(grant_remaining(promo), 980);
        assert_eq!(available("a", "mills"), 1550);
        // a replay answers from the event, whichever row paid it
        assert_eq!(
            ingest("a", "mills", 10, "e2"),
            format!(r#"[{{"amount": 10, "grant_id": {promo}}}]"#)
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn lanes_hold_only_credit_above_the_floor() {
        grant("a", "mills", 1000, ", kind => 'topup'");
        run("SELECT billing.set_floor('a', 'mills', 900)");
        run("SELECT billing.set_lanes('a', 'mills', 4)");
        ingest("a", "mills", 50, "e1");
        assert_eq!(
            lane_credit("a"),
            4 * (50 / 5),
            "only what is above the floor is dealt"
        );
        assert_eq!(available("a", "mills"), 950);
        // strict debits stop exactly at the floor, lanes or not
        for i in 0..5 {
            run(&format!(
                "SELECT billing.ingest('a', 'mills', 1, key => 's{i}', cost => 10, strict => true)"
            ));
        }
        assert_eq!(available("a", "mills"), 900);
        assert_rejected(
            "SELECT billing.ingest('a', 'mills', 1, key => 'over', cost => 1, strict => true)",
            "23514",
        );
        // credit dealt above a floor that is then raised comes back to the pool
        run("SELECT billing.set_floor('a', 'mills', 0)");
        ingest("a", "mills", 1, "e2");
        assert!(lane_credit("a") > 0);
        run("SELECT billing.set_floor('a', 'mills', 899)");
        assert_eq!(lane_credit("a"), 0);
        assert_rejected(
            "SELECT billing.ingest('a', 'mills', 1, key => 'over2', cost => 1, strict => true)",
            "23514",
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_lanes_share_expires_with_its_grant() {
        let promo = grant(
            "a",
            "mills",
            1000,
            ", kind => 'promo', expires_at => now() + interval '10 days'",
        );
        run("SELECT billing.set_lanes('a', 'mills', 2)");
        ingest("a", "mills", 10, "e1");
        assert!(lane_credit("a") > 0);
        travel("a", "11 days");
        assert_eq!(available("a", "mills"), 0, "the lanes' shares expired too");
        // a debit now finds nothing to drain: all of it is debt
        assert_eq!(ingest("a", "mills", 5, "e2"), "[]");
        assert_eq!(
            one::<i64>("SELECT debt FROM billing.check('a', 'mills')"),
            5
        );
        assert_eq!(lane_credit("a"), 0);
        assert_eq!(grant_remaining(promo), 0);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_grant_that_becomes_spendable_ahead_of_the_lanes_share_is_drained_first() {
        let topup = grant("a", "mills", 1000, ", kind => 'topup'");
        let promo = grant(
            "a",
            "mills",
            500,
            ", kind => 'promo', effective_at => now() + interval '1 day'",
        );
        run("SELECT billing.set_lanes('a', 'mills', 4)");
        // the promo is not spendable yet: the lanes are dealt the top-up
        assert_eq!(
            ingest("a", "mills", 10, "e1"),
            format!(r#"[{{"amount": 10, "grant_id": {topup}}}]"#)
        );
        let dealt = lane_credit("a");
        assert!(dealt > 0);
        assert_eq!(
            ingest("a", "mills", 10, "e2"),
            format!(r#"[{{"amount": 10, "grant_id": {topup}}}]"#)
        );
        assert_eq!(lane_credit("a"), dealt - 10, "a lane paid it");

        // once the promo is spendable it comes first, whatever the lanes hold
        travel("a", "2 days");
        assert_eq!(
            ingest("a", "mills", 10, "e3"),
            format!(r#"[{{"amount": 10, "grant_id": {promo}}}]"#)
        );
        assert_eq!(
            ingest("a", "mills", 10, "e4"),
            format!(r#"[{{"amount": 10, "grant_id": {promo}}}]"#),
            "the lanes now hold the promo"
        );
        assert_eq!(grant_remaining(promo), 480);
        assert_eq!(grant_remaining(topup), 980);
        assert_eq!(available("a", "mills"), 1460);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn voiding_or_unsplitting_takes_the_lanes_credit_back() {
        let g = grant("a", "mills", 1000, ", kind => 'topup'");
        let h = grant("b", "mills", 1000, ", kind => 'topup'");
        run("SELECT billing.set_lanes('a', 'mills', 3)");
        run("SELECT billing.set_lanes('b', 'mills', 3)");
        ingest("a", "mills", 100, "a1");
        ingest("b", "mills", 100, "b1");
        assert!(lane_credit("a") > 0 && lane_credit("b") > 0);

        run(&format!("SELECT billing.void_grant({g})"));
        assert_eq!(lane_credit("a"), 0);
        assert_eq!(grant_remaining(g), 0);
        assert_eq!(
            one::<i64>("SELECT balance FROM billing.check('a', 'mills')"),
            0
        );

        assert_eq!(one::<i32>("SELECT billing.set_lanes('b', 'mills', 0)"), 0);
        assert_eq!(lane_credit("b"), 0);
        assert_eq!(remaining(h), 900, "all of it is back in the pool's own row");
        assert_eq!(available("b", "mills"), 900);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn set_lanes_validates_its_input() {
        grant("a", "mills", 10, "");
        assert_rejected("SELECT billing.set_lanes('a', 'mills', 65)", "22023");
        assert_rejected("SELECT billing.set_lanes('a', 'mills', -1)", "22023");
        assert_rejected("SELECT billing.set_lanes('a', 'nope', 2)", "42704");
        assert_rejected("SELECT billing.set_lanes('a', 'mills', NULL)", "22004");
        // a lane's share is not a grant: it cannot be voided
        run("SELECT billing.set_lanes('a', 'mills', 1)");
        ingest("a", "mills", 1, "e1");
        let share: i64 = one("SELECT id FROM billing.grants WHERE parent_id IS NOT NULL");
        assert_rejected(&format!("SELECT billing.void_grant({share})"), "42704");
    }
}
