// Money through the Stripe projections: only mapped currencies credit, a
// reversal never takes more than was paid nor charges for credit never used,
// a won dispute gives back what it took, once.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::stripe::*;
    use crate::pgrx_tests::support::*;

    const T: i64 = 1_700_000_000;

    fn paid(evt: &str, pi: &str, amount: i64, currency: &str) -> String {
        deliver(&event(
            evt,
            "payment_intent.succeeded",
            T,
            payment_intent(pi, amount, currency, "org_1"),
        ))
    }

    fn refunded(evt: &str, pi: &str, amount: i64, refunded: i64, at: i64) -> String {
        deliver(&event(
            evt,
            "charge.refunded",
            at,
            charge(pi, amount, refunded, "usd"),
        ))
    }

    fn disputed(evt: &str, kind: &str, pi: &str, amount: i64, status: &str, at: i64) -> String {
        deliver(&event(
            evt,
            kind,
            at,
            dispute("dp_1", pi, amount, "usd", status),
        ))
    }

    fn cents() -> String {
        one("SELECT available || '/' || debt FROM billing.check('org_1', 'usd_cents')")
    }

    #[pg_test]
    fn a_payment_in_a_currency_the_endpoint_does_not_map_credits_nothing() {
        setup();
        let before = footprint();
        let jpy = paid("evt_jpy", "pi_jpy", 1000, "jpy");
        assert!(
            jpy.starts_with(
                "failed|22023: currency jpy is not credited by this endpoint (mapped: usd)"
            ),
            "{jpy}"
        );
        let idr = paid("evt_idr", "pi_idr", 16000, "idr");
        assert!(idr.starts_with("failed|22023: currency idr"), "{idr}");
        assert_eq!(footprint(), before, "nothing credited");
        // mapped to a unit of its own, yen for yen, the redelivery credits it
        let per_yen: i64 =
            one("SELECT billing.map_webhook_currency('stripe', 'JPY', 'jpy', unit_exponent => 0)");
        assert_eq!(per_yen, 1);
        assert_eq!(paid("evt_jpy", "pi_jpy", 1000, "jpy"), "applied|");
        assert_eq!(available("org_1", "jpy"), 1000);
        assert_eq!(available("org_1", "usd_cents"), 0);
    }

    #[pg_test]
    fn a_currency_maps_by_the_exponent_of_its_minor_unit() {
        setup();
        let mills: i64 = one(
            "SELECT billing.map_webhook_currency('stripe', 'usd', 'usd_mills', unit_exponent => 3)",
        );
        assert_eq!(mills, 10, "a US cent is 10 mills");
        let fils: i64 = one(
            "SELECT billing.map_webhook_currency('stripe', 'kwd', 'kwd_fils', unit_exponent => 3)",
        );
        assert_eq!(fils, 1, "KWD amounts are already in fils");
        assert_rejected(
            "SELECT billing.map_webhook_currency('stripe', 'kwd', 'kwd_cents', unit_exponent => 2)",
            "22023",
        );
        assert_rejected(
            "SELECT billing.map_webhook_currency('stripe', 'usd', 'usd_mills')",
            "22023",
        );
        assert_rejected(
            "SELECT billing.map_webhook_currency('stripe', 'dollars', 'usd_mills', unit_exponent => 3)",
            "22023",
        );
        assert_rejected(
            "SELECT billing.map_webhook_currency('nope', 'usd', 'usd_mills', unit_exponent => 3)",
            "42704",
        );
        assert_eq!(paid("evt_1", "pi_1", 250, "usd"), "applied|");
        assert_eq!(available("org_1", "usd_mills"), 2500);
        assert_eq!(paid("evt_2", "pi_2", 7, "kwd"), "applied|");
        assert_eq!(available("org_1", "kwd_fils"), 7);
    }

    #[pg_test]
    fn a_refund_in_another_currency_reverses_nothing() {
        setup();
        paid("evt_1", "pi_1", 1000, "usd");
        let body = event(
            "evt_2",
            "charge.refunded",
            T + 1,
            charge("pi_1", 1000, 1000, "eur"),
        );
        assert!(deliver(&body).starts_with("failed|22023: currency eur"));
        assert_eq!(cents(), "1000/0");
    }

    #[pg_test]
    fn a_refund_webhook_after_a_void_takes_back_once() {
        setup();
        paid("evt_1", "pi_1", 1000, "usd");
        run("SELECT * FROM billing.ingest('org_1', 'usd_cents', 1, key => 'use', cost => 300)");
        run("SELECT * FROM billing.void_grant((SELECT id FROM billing.grants WHERE key = 'stripe:pi_1'))");
        assert_eq!(cents(), "-300/300");
        assert_eq!(refunded("evt_2", "pi_1", 1000, 1000, T + 10), "applied|");
        assert_eq!(
            cents(),
            "-300/300",
            "a customer never owes more than they used"
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_won_dispute_reinstates_what_the_dispute_took_once() {
        setup();
        paid("evt_1", "pi_1", 1000, "usd");
        run("SELECT * FROM billing.ingest('org_1', 'usd_cents', 1, key => 'use', cost => 400)");
        assert_eq!(
            disputed(
                "evt_2",
                "charge.dispute.created",
                "pi_1",
                1000,
                "needs_response",
                T + 10
            ),
            "applied|"
        );
        assert_eq!(cents(), "-400/400", "600 unspent taken, the 400 used owed");
        assert_eq!(
            disputed(
                "evt_3",
                "charge.dispute.closed",
                "pi_1",
                1000,
                "won",
                T + 20
            ),
            "applied|"
        );
        assert_eq!(cents(), "600/0", "everything the dispute took is back");
        assert_eq!(
            disputed(
                "evt_4",
                "charge.dispute.funds_reinstated",
                "pi_1",
                1000,
                "won",
                T + 20
            ),
            "applied|"
        );
        assert_eq!(cents(), "600/0", "reinstated once");
        // the dispute's creation redelivered late is older than its closing
        assert!(disputed(
            "evt_5",
            "charge.dispute.created",
            "pi_1",
            1000,
            "needs_response",
            T + 5
        )
        .starts_with("superseded|"));
        assert_eq!(cents(), "600/0");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn an_inquiry_withdraws_no_funds_so_it_takes_nothing() {
        setup();
        paid("evt_1", "pi_1", 1000, "usd");
        // Stripe's own example dispute is an inquiry (warning_needs_response)
        assert_eq!(
            disputed(
                "evt_2",
                "charge.dispute.created",
                "pi_1",
                1000,
                "warning_needs_response",
                T + 10
            ),
            "applied|"
        );
        assert_eq!(cents(), "1000/0");
        assert_eq!(
            disputed(
                "evt_3",
                "charge.dispute.funds_withdrawn",
                "pi_1",
                1000,
                "needs_response",
                T + 20
            ),
            "applied|"
        );
        assert_eq!(
            cents(),
            "0/0",
            "once escalated with funds withdrawn, it takes them"
        );
    }

    #[pg_test]
    fn a_refund_and_a_dispute_together_never_take_back_more_than_was_paid() {
        setup();
        paid("evt_1", "pi_1", 1000, "usd");
        run("SELECT * FROM billing.ingest('org_1', 'usd_cents', 1, key => 'use', cost => 200)");
        assert_eq!(refunded("evt_2", "pi_1", 1000, 600, T + 10), "applied|");
        assert_eq!(cents(), "200/0");
        assert_eq!(
            disputed(
                "evt_3",
                "charge.dispute.created",
                "pi_1",
                1000,
                "lost",
                T + 20
            ),
            "applied|"
        );
        assert_eq!(
            cents(),
            "-200/200",
            "1,000 paid, 1,000 taken back at most: 200 used are owed"
        );
        let total: i64 = one(
            "SELECT sum(-grant_amount + debt_amount)::bigint FROM billing.ledger \
             WHERE grant_id = (SELECT id FROM billing.grants WHERE key = 'stripe:pi_1') \
               AND kind IN ('revoke', 'debt')",
        );
        assert_eq!(total, 1000);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_refund_of_credit_that_already_expired_charges_only_what_was_used() {
        setup();
        // a top-up whose credit expires, credited under the payment's key
        grant(
            "org_1",
            "usd_cents",
            1000,
            ", kind => 'topup', key => 'stripe:pi_x', expires_at => now() + interval '1 day', \
             metadata => '{\"source\": \"stripe\", \"payment\": \"pi_x\"}'",
        );
        run("SELECT * FROM billing.ingest('org_1', 'usd_cents', 1, key => 'use', cost => 300)");
        travel("org_1", "2 days");
        assert_eq!(refunded("evt_1", "pi_x", 1000, 500, T + 10), "applied|");
        assert_eq!(
            cents(),
            "0/0",
            "the 700 that expired unused absorb a 500 refund"
        );
        assert_eq!(refunded("evt_2", "pi_x", 1000, 1000, T + 20), "applied|");
        assert_eq!(
            cents(),
            "-300/300",
            "a full refund: only the 300 used are owed"
        );
        assert_ledger_consistent();
    }
}
