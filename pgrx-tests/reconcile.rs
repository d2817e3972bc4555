// Reconciliation with the provider's records (sql/reconcile.sql).

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::stripe;
    use crate::pgrx_tests::support::*;

    /// "key:missing" of a reconciliation, in its order.
    fn report(args: &str) -> String {
        opt::<String>(&format!(
            "SELECT string_agg(key || ':' || missing, ' ') FROM billing.reconcile_usage({args})"
        ))
        .unwrap_or_default()
    }

    #[pg_test]
    fn orphan_usage_is_found_on_both_sides() {
        grant("a", "cents", 1000, "");
        grant("b", "cents", 1000, "");
        run("SELECT billing.define_meter('calls', 'cents', unit_price => 1)");
        run("SELECT billing.define_meter('chat', 'cents', unit_price => 1)");
        for (account, meter, key, at) in [
            ("a", "calls", "req_1", "50 minutes"),
            ("a", "calls", "req_2", "30 minutes"),
            ("b", "chat", "req_3", "1 microsecond"),
            // the end of the period is not in it
            ("a", "calls", "req_4", "0"),
        ] {
            run(&format!(
                "SELECT * FROM billing.ingest('{account}', '{meter}', 1, key => '{key}', \
                 occurred_at => now() - interval '{at}', cost => 5)"
            ));
        }
        let period = "now() - interval '1 hour', now()";
        // the provider saw req_1, req_3 (twice) and req_9; it never saw req_2
        assert_eq!(
            report(&format!("'{{req_1,req_3,req_3,req_9,NULL}}', {period}")),
            "req_9:here req_2:there"
        );
        assert_eq!(
            report(&format!("'{{req_1}}', {period}, only_meter => 'chat'")),
            "req_3:there"
        );
        assert_eq!(
            report(&format!("'{{}}', {period}, only_account => 'a'")),
            "req_1:there req_2:there"
        );
        assert_eq!(
            one::<String>(&format!(
                "SELECT concat_ws(' ', account, meter, cost) FROM billing.reconcile_usage('{{}}', {period}) \
                 WHERE key = 'req_3'"
            )),
            "b chat 5"
        );
        // a key re-ingested after the report is no longer missing
        run("SELECT * FROM billing.ingest('a', 'calls', 1, key => 'req_9', occurred_at => now() - interval '10 minutes', cost => 5)");
        assert_eq!(
            report(&format!("'{{req_1,req_3,req_9}}', {period}")),
            "req_2:there"
        );
        assert_rejected(
            "SELECT * FROM billing.reconcile_usage('{}', now(), now() - interval '1 hour')",
            "22023",
        );
    }

    #[pg_test]
    fn payments_that_drifted_from_the_providers_list_are_reported() {
        stripe::setup();
        let paid = |pi: &str, amount: i64| {
            let object = stripe::payment_intent(pi, amount, "usd", "a");
            let event = stripe::event(
                &format!("evt_{pi}"),
                "payment_intent.succeeded",
                stripe::now_unix(),
                object,
            );
            assert_eq!(stripe::deliver(&event), "applied|");
        };
        paid("pi_1", 1000);
        paid("pi_2", 500);
        let refund = stripe::event(
            "evt_refund_1",
            "charge.refunded",
            stripe::now_unix(),
            stripe::charge("pi_1", 1000, 300, "usd"),
        );
        assert_eq!(stripe::deliver(&refund), "applied|");
        let drift = |list: &str, epsilon: i64| -> String {
            opt::<String>(&format!(
                "SELECT string_agg(concat_ws(':', payment, problem, credited, refunded_here), ' ') \
                 FROM billing.reconcile_payments('{list}', {epsilon})"
            ))
            .unwrap_or_default()
        };
        // the provider agrees on pi_1 (300 refunded) and pi_2: no drift
        assert_eq!(
            drift(
                r#"[{"payment": "pi_1", "account": "a", "paid": 1000, "refunded": 300},
                    {"payment": "pi_2", "account": "a", "paid": 500}]"#,
                0
            ),
            ""
        );
        // a payment never credited here, one credited to another account,
        // and a refund of 500 where 300 was recorded (outside and inside epsilon)
        let list = r#"[{"payment": "pi_1", "account": "a", "paid": 1000, "refunded": 500},
                       {"payment": "pi_2", "account": "b", "paid": 500},
                       {"payment": "pi_3", "account": "a", "paid": 700}]"#;
        assert_eq!(
            drift(list, 0),
            "pi_1:refund_drift:1000:300 pi_2:other_account:500:0 pi_3:not_credited:0"
        );
        assert_eq!(
            drift(list, 200),
            "pi_2:other_account:500:0 pi_3:not_credited:0"
        );
        assert_rejected("SELECT * FROM billing.reconcile_payments('{}', 0)", "22023");
    }
}
