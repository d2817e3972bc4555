// docs/architecture.md, rule 3: a debit drains active grants by priority, then earliest expiry
// (no expiry last), then oldest first; inactive grants are never drained.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::support::*;

    #[pg_test]
    fn drains_by_priority_then_expiry_then_age() {
        let topup = grant("a", "mills", 100, ", kind => 'topup'");
        let promo_late = grant(
            "a",
            "mills",
            100,
            ", kind => 'promo', expires_at => now() + interval '20 days'",
        );
        let promo_never = grant("a", "mills", 100, ", kind => 'promo'");
        let promo_soon = grant(
            "a",
            "mills",
            100,
            ", kind => 'promo', expires_at => now() + interval '10 days'",
        );
        let plan = grant("a", "mills", 100, ", kind => 'plan'");
        let promo_soon_younger = grant(
            "a",
            "mills",
            100,
            ", kind => 'promo', expires_at => now() + interval '10 days'",
        );

        let drains = ingest("a", "mills", 450, "e1");
        let expected = format!(
            r#"[{{"amount": 100, "grant_id": {plan}}}, {{"amount": 100, "grant_id": {promo_soon}}}, {{"amount": 100, "grant_id": {promo_soon_younger}}}, {{"amount": 100, "grant_id": {promo_late}}}, {{"amount": 50, "grant_id": {promo_never}}}]"#
        );
        assert_eq!(drains, expected);
        assert_eq!(remaining(promo_never), 50);
        assert_eq!(remaining(topup), 100);
        assert_eq!(available("a", "mills"), 150);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn explicit_priority_overrides_the_kind_default() {
        let topup_first = grant("a", "mills", 10, ", kind => 'topup', priority => 1");
        let plan = grant("a", "mills", 10, ", kind => 'plan'");
        ingest("a", "mills", 15, "e1");
        assert_eq!(remaining(topup_first), 0);
        assert_eq!(remaining(plan), 5);
    }

    #[pg_test]
    fn one_ledger_entry_per_grant_drained() {
        let g1 = grant("a", "mills", 30, ", kind => 'plan'");
        let g2 = grant("a", "mills", 30, ", kind => 'topup'");
        let event: i64 =
            one("SELECT event_id FROM billing.ingest('a', 'mills', 1, key => 'e1', cost => 45)");
        let entries: String = one(&format!(
            "SELECT string_agg(kind || ':' || grant_id || ':' || amount, ',' ORDER BY version) \
             FROM billing.ledger WHERE event_id = {event}"
        ));
        assert_eq!(entries, format!("debit:{g1}:-30,debit:{g2}:-15"));
        assert_ledger_consistent();
    }

    // A debit one grant paid in full is carried by its usage event: one row,
    // no row of ledger_entries, the same entry in billing.ledger, and a
    // replay answers its drains (a lane's share named by its grant).
    #[pg_test]
    fn an_event_paid_by_one_grant_carries_its_entry() {
        let g = grant("a", "mills", 100, "");
        let first = ingest("a", "mills", 30, "k1");
        assert_eq!(first, format!("[{{\"amount\": 30, \"grant_id\": {g}}}]"));
        let row: String = one(
            "SELECT concat_ws(',', entry_version, entry_grant, balance_after, debt_after, held_after, \
                    drains IS NULL, (SELECT count(*) FROM billing.ledger_entries e WHERE e.event_id = u.id)) \
             FROM billing.usage_events u WHERE key = 'k1'",
        );
        assert_eq!(row, format!("2,{g},70,0,0,t,0"));
        let entry: String = one(
            "SELECT concat_ws(',', version, kind, amount, grant_amount, balance_before, balance_after, entry_id IS NULL) \
             FROM billing.ledger WHERE event_id = (SELECT id FROM billing.usage_events WHERE key = 'k1')",
        );
        assert_eq!(entry, "2,debit,-30,-30,100,70,t");
        assert_eq!(
            ingest("a", "mills", 30, "k1"),
            first,
            "a replay answers the drains"
        );
        let b = grant("b", "mills", 1000, "");
        run("SELECT billing.set_lanes('b', 'mills', 2)");
        ingest("b", "mills", 10, "k0"); // the pool deals its lanes their shares
        let on_lane = ingest("b", "mills", 10, "k2");
        assert!(
            one::<i32>("SELECT p.lane::int FROM billing.usage_events u JOIN billing.pools p ON p.id = u.pool_id WHERE key = 'k2'") > 0,
            "a lane paid it"
        );
        assert_eq!(on_lane, format!("[{{\"amount\": 10, \"grant_id\": {b}}}]"));
        assert_eq!(ingest("b", "mills", 10, "k2"), on_lane);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn pending_and_voided_grants_are_never_drained() {
        let pending = grant(
            "a",
            "mills",
            100,
            ", kind => 'plan', effective_at => now() + interval '1 day'",
        );
        let voided = grant("a", "mills", 100, ", kind => 'plan'");
        run(&format!("SELECT * FROM billing.void_grant({voided})"));
        let topup = grant("a", "mills", 100, ", kind => 'topup'");
        ingest("a", "mills", 40, "e1");
        assert_eq!(remaining(pending), 100);
        assert_eq!(remaining(voided), 0);
        assert_eq!(remaining(topup), 60);
        assert_eq!(
            available("a", "mills"),
            60,
            "the pending grant is not spendable yet"
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn usage_in_a_unit_meter_and_a_priced_meter() {
        grant("a", "mills", 1000, "");
        run("SELECT billing.define_meter('images', 'mills', unit_price => 2.5)");
        let cost: i64 = one("SELECT cost FROM billing.ingest('a', 'images', 3, key => 'i1')");
        assert_eq!(cost, 8, "3 × 2.5 = 7.5 rounds half away from zero to 8");
        let cost: i64 = one("SELECT cost FROM billing.ingest('a', 'mills', 7, key => 'u1')");
        assert_eq!(cost, 7, "a unit used as a meter charges 1 per quantity");
        let cost: i64 =
            one("SELECT cost FROM billing.ingest('a', 'images', 3, key => 'i2', cost => 5)");
        assert_eq!(cost, 5, "an explicit cost overrides the price");
        let snapshot: Option<String> = opt(
            "SELECT p.price ->> 'unit_price' FROM billing.usage_events e \
                 JOIN billing.meter_prices p ON p.meter = e.meter AND p.version = e.price_version \
                 WHERE e.key = 'i1'",
        );
        assert_eq!(
            snapshot.as_deref(),
            Some("2.5"),
            "the price used is recorded with the event"
        );
        assert_eq!(available("a", "mills"), 1000 - 8 - 7 - 5);
    }

    #[pg_test]
    fn price_changes_apply_to_later_events_only() {
        grant("a", "mills", 1000, "");
        run("SELECT billing.define_meter('images', 'mills', unit_price => 2)");
        run("SELECT * FROM billing.ingest('a', 'images', 1, key => 'i1')");
        run("SELECT billing.define_meter('images', 'mills', unit_price => 3)");
        run("SELECT * FROM billing.ingest('a', 'images', 1, key => 'i2')");
        let costs: String =
            one("SELECT string_agg(cost::text, ',' ORDER BY id) FROM billing.usage_events");
        assert_eq!(costs, "2,3");
        let replay: i64 = one("SELECT cost FROM billing.ingest('a', 'images', 1, key => 'i1')");
        assert_eq!(
            replay, 2,
            "a replay returns the original charge, not a re-price"
        );
    }

    /// (row's remaining, what the grant has left, whether its row is where it was at `ctid`).
    fn grant_row(id: i64, ctid: &str) -> String {
        one(&format!(
            "SELECT concat_ws(',', g.remaining, billing.grant_remaining(g), g.ctid::text = '{ctid}') \
             FROM billing.grants g WHERE g.id = {id}"
        ))
    }

    fn ctid(id: i64) -> String {
        one(&format!(
            "SELECT ctid::text FROM billing.grants WHERE id = {id}"
        ))
    }

    fn drawn(account: &str) -> String {
        one(&format!(
            "SELECT concat_ws(',', coalesce(drawn_grant, 0), drawn) FROM billing.pools \
             WHERE account = '{account}' AND lane = 0"
        ))
    }

    #[pg_test]
    fn a_debit_of_one_grant_writes_its_pool_row_and_not_the_grant_s() {
        let topup = grant("a", "mills", 100, ", kind => 'topup'");
        let at = ctid(topup);
        ingest("a", "mills", 10, "e1");
        ingest("a", "mills", 10, "e2");
        assert_eq!(
            grant_row(topup, &at),
            "100,80,t",
            "the grant's row is not written"
        );
        assert_eq!(drawn("a"), format!("{topup},20"));
        assert_eq!(remaining(topup), 80);
        assert_eq!(
            one::<i64>(&format!(
                "SELECT remaining FROM billing.grant_balances WHERE grant_id = {topup}"
            )),
            80
        );
        assert_eq!(available("a", "mills"), 80);
        assert_ledger_consistent();

        // a grant drained first arrives: the one drawn before is written back once
        let plan = grant("a", "mills", 50, ", kind => 'plan'");
        let plan_at = ctid(plan);
        ingest("a", "mills", 5, "e3");
        assert_eq!(grant_row(topup, &at), "80,80,f");
        assert_eq!(grant_row(plan, &plan_at), "50,45,t");
        assert_eq!(drawn("a"), format!("{plan},5"));
        assert_ledger_consistent();

        // a debit that empties it writes it, and draws from the next
        ingest("a", "mills", 50, "e4");
        assert_eq!(grant_row(plan, &plan_at), "0,0,f");
        assert_eq!(drawn("a"), format!("{topup},5"));
        assert_eq!(remaining(topup), 75);
        assert_eq!(available("a", "mills"), 75);
        assert_ledger_consistent();

        // suspended while drawn from: still what it has left, and written back
        // when another grant is drawn (its row is no longer read with the pool)
        run(&format!("SELECT * FROM billing.suspend_grant({topup})"));
        assert_eq!(remaining(topup), 75);
        assert_eq!(available("a", "mills"), 0);
        let promo = grant("a", "mills", 30, ", kind => 'promo'");
        ingest("a", "mills", 10, "e5");
        assert_eq!(
            one::<String>(&format!(
                "SELECT concat_ws(',', remaining, status) FROM billing.grants WHERE id = {topup}"
            )),
            "75,suspended"
        );
        assert_eq!(drawn("a"), format!("{promo},10"));
        run(&format!("SELECT * FROM billing.resume_grant({topup})"));
        assert_eq!(available("a", "mills"), 95);
        assert_ledger_consistent();

        // voided while drawn from: it keeps nothing, and what was spent of it
        // (10 + 10 + 5 + 5) becomes debt
        ingest("a", "mills", 25, "e6");
        assert_eq!(remaining(topup), 70);
        assert_eq!(
            one::<String>(&format!(
                "SELECT concat_ws(',', removed, consumed, debt_created) FROM billing.void_grant({topup})"
            )),
            "70,30,30"
        );
        assert_eq!(remaining(topup), 0);
        assert_eq!(available("a", "mills"), -30);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_debit_reads_only_the_grants_that_have_credit() {
        // an account that used up forty grants (reloads, say) and has one left
        for i in 0..40 {
            grant(
                "a",
                "mills",
                1,
                &format!(", kind => 'topup', priority => 1, key => 'small{i}'"),
            );
        }
        let big = grant("a", "mills", 1000, ", kind => 'topup'");
        for i in 0..41 {
            ingest("a", "mills", 1, &format!("use{i}"));
        }
        assert_eq!(
            one::<String>(
                "SELECT concat_ws(',', count(*) FILTER (WHERE exhausted), \
                                      count(*) FILTER (WHERE NOT exhausted)) FROM billing.grants"
            ),
            "40,1",
            "each grant used up is marked so when its row is written"
        );
        assert_eq!(remaining(big), 999);

        let read_before = drain_order_entries_read();
        ingest("a", "mills", 5, "after");
        assert_eq!(
            drain_order_entries_read() - read_before,
            1,
            "the debit read the one grant with credit, not the forty used up"
        );
        assert_eq!(remaining(big), 994);
        assert_eq!(available("a", "mills"), 994);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn credit_given_back_to_a_used_up_grant_is_drained_again() {
        let first = grant("a", "mills", 100, ", kind => 'topup', priority => 1");
        let other = grant("a", "mills", 1000, ", kind => 'topup'");
        // a dispute takes its unspent credit: it has nothing left
        run(&format!(
            "SELECT * FROM billing.reverse_grant({first}, 100)"
        ));
        assert_eq!(remaining(first), 0);
        assert!(one::<bool>(&format!(
            "SELECT exhausted FROM billing.grants WHERE id = {first}"
        )));
        // the dispute is won: the credit comes back, and is drained first again
        run(&format!("SELECT * FROM billing.reverse_grant({first}, 0)"));
        assert!(!one::<bool>(&format!(
            "SELECT exhausted FROM billing.grants WHERE id = {first}"
        )));
        let drains = ingest("a", "mills", 30, "e1");
        assert_eq!(
            drains,
            format!(r#"[{{"amount": 30, "grant_id": {first}}}]"#)
        );
        assert_eq!(remaining(first), 70);
        assert_eq!(remaining(other), 1000);
        assert_ledger_consistent();
    }

    /// Grants read through the drain-order index in this transaction (live
    /// rows: an entry left by a row's earlier version, which PostgreSQL
    /// removes once no transaction can see that version, finds nothing).
    fn drain_order_entries_read() -> i64 {
        one("SELECT pg_stat_get_xact_tuples_fetched('billing.grants_drain_order'::regclass)")
    }
}
