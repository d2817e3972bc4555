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

    /// "meter:recorded:invoiced:drift:alerted" of a cost audit, in its order.
    fn audit(invoice: &str, tolerance: &str) -> String {
        one::<String>(&format!(
            "SELECT string_agg(concat_ws(':', meter, recorded, invoiced, drift, alert_id IS NOT NULL), ' ') \
             FROM billing.audit_costs('{invoice}'{tolerance})"
        ))
    }

    #[pg_test]
    fn a_cost_audit_raises_one_alert_per_drifting_meter_and_period() {
        grant("a", "cents", 100_000, "");
        run("SELECT billing.define_meter('gpt', 'cents', unit_price => 1)");
        run("SELECT billing.define_meter('claude', 'cents', unit_price => 1)");
        // two hours ago and in the last hour (the hour that just ended)
        let hour = "date_trunc('hour', now())";
        for (meter, cost, at) in [
            ("gpt", 1000, "90 minutes"),
            ("gpt", 1000, "30 minutes"),
            ("claude", 400, "30 minutes"),
        ] {
            run(&format!(
                "SELECT * FROM billing.ingest('a', '{meter}', 1, key => '{meter}{at}', cost => {cost}, \
                 occurred_at => {hour} - interval '{at}')"
            ));
        }
        let start: String = one(&format!("SELECT ({hour} - interval '2 hours')::text"));
        let end: String = one(&format!("SELECT {hour}::text"));
        let line = |meter: &str, cost: i64| {
            format!(
                r#"{{"meter": "{meter}", "period_start": "{start}", "period_end": "{end}", "cost": {cost}}}"#
            )
        };
        // gpt: 2,000 here, 2,015 invoiced: within 1%; claude: 400 here, 450 invoiced: 12.5% off
        let invoice = format!("[{}, {}]", line("gpt", 2015), line("claude", 450));
        assert_eq!(
            audit(&invoice, ""),
            "gpt:2000:2015:-15:f claude:400:450:-50:t"
        );
        let fired =
            "SELECT string_agg(concat_ws(':', name, kind, threshold, details->>'drift'), ' ') \
                     FROM billing.alerts";
        assert_eq!(one::<String>(fired), "claude:cost_drift:5:-50");
        // auditing the period again raises nothing new; recorded above the
        // invoice is drift too
        let invoice = format!("[{}, {}]", line("gpt", 1500), line("claude", 450));
        assert_eq!(
            audit(&invoice, ", tolerance_percent => 0, tolerance => 10"),
            "gpt:2000:1500:500:t claude:400:450:-50:t"
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.alerts WHERE kind = 'cost_drift'"),
            2
        );
        // an alert is acknowledged like a balance alert
        let id: i64 = one("SELECT min(id) FROM billing.alerts");
        run(&format!("SELECT * FROM billing.ack_alert({id}, 'ops')"));
        // periods are UTC hours whatever the session's time zone (India is
        // 5:30 ahead: its hours are not UTC hours)
        run("SET LOCAL TimeZone = 'Asia/Kolkata'");
        assert_eq!(
            audit(&invoice, ", tolerance_percent => 0, tolerance => 10"),
            "gpt:2000:1500:500:t claude:400:450:-50:t"
        );
        assert_rejected(
            r#"SELECT * FROM billing.audit_costs('[{"meter": "gpt", "period_start": "2026-01-01 01:00+05:30", "period_end": "2026-01-01 03:00+05:30", "cost": 1}]')"#,
            "22023",
        );
        run("RESET TimeZone");
        // bad lines write nothing
        for (bad, state) in [
            (format!(r#"[{{"meter": "nope", "period_start": "{start}", "period_end": "{end}", "cost": 1}}]"#), "42704"),
            (format!(r#"[{{"meter": "gpt", "period_start": "{start}", "period_end": "{start}", "cost": 1}}]"#), "22023"),
            (format!(r#"[{{"meter": "gpt", "period_start": "{start}", "period_end": "{end}", "cost": -1}}]"#), "22023"),
            (r#"[{"meter": "gpt", "period_start": "2026-01-01 00:30+00", "period_end": "2026-01-01 02:00+00", "cost": 1}]"#.to_string(), "22023"),
            (format!(r#"[{{"meter": "gpt", "period_start": "{start}", "cost": 1}}]"#), "22023"),
            ("{}".to_string(), "22023"),
        ] {
            assert_rejected(&format!("SELECT * FROM billing.audit_costs('{bad}')"), state);
        }
        assert_rejected(
            &format!(
                "SELECT * FROM billing.audit_costs('[{}]', tolerance_percent => 101)",
                line("gpt", 1)
            ),
            "22023",
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM billing.alerts"), 2);
    }
}
