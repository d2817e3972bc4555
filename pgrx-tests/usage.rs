// Usage as recorded: priced events carry their sub-unit remainders so that
// splitting usage never lowers what it costs; a settled hold is a usage event
// like any other; a missing quantity is refused, never defaulted.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::support::*;

    fn total(account: &str) -> i64 {
        one(&format!(
            "SELECT coalesce(sum(cost), 0)::bigint FROM billing.usage_events WHERE account = '{account}'"
        ))
    }

    #[pg_test]
    fn instants_are_stored_exactly_whatever_the_sessions_date_style_and_time_zone() {
        run("SET LOCAL DateStyle = 'SQL, DMY'");
        run("SET LOCAL TimeZone = 'Asia/Kolkata'");
        grant(
            "a",
            "mills",
            100,
            ", effective_at => now() - interval '1 day', expires_at => '2031-02-03 04:05:06.789012+00'",
        );
        run(
            "SELECT billing.ingest('a', 'mills', 1, key => 'e1', cost => 1, \
                occurred_at => now() - interval '7 hours 8.000009 seconds')",
        );
        assert!(one::<bool>(
            "SELECT occurred_at = now() - interval '7 hours 8.000009 seconds' \
             FROM billing.usage_events WHERE key = 'e1'"
        ));
        assert!(one::<bool>(
            "SELECT bool_and(effective_at = now()) FROM billing.ledger WHERE kind = 'debit'"
        ));
        assert!(one::<bool>(
            "SELECT cache_until = '2031-02-03 04:05:06.789012+00'::timestamptz \
             FROM billing.pools WHERE account = 'a'"
        ));
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_thousand_one_token_events_cost_what_one_thousand_token_event_costs() {
        run("SELECT billing.define_meter('tokens', 'mills', unit_price => 0.4)");
        grant("split", "mills", 10_000, "");
        grant("whole", "mills", 10_000, "");
        run("SELECT count(*) FROM generate_series(1, 1000) i, \
             LATERAL billing.ingest('split', 'tokens', 1, key => 'split:' || i)");
        run("SELECT * FROM billing.ingest('whole', 'tokens', 1000, key => 'whole')");
        assert_eq!((total("split"), total("whole")), (400, 400));
        assert_eq!(available("split", "mills"), 9_600);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn random_splits_single_and_batched_cost_the_exact_total_rounded_once() {
        run("SELECT billing.define_meter('tokens', 'mills', unit_price => 0.0137)");
        let mut seed: u64 = 0x5eed_2026;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..6 {
            let account = format!("acct{round}");
            grant(&account, "mills", 1_000_000, "");
            let mut tokens = 0u64;
            let mut batch = Vec::new();
            for i in 0..(5 + next(60)) {
                let q = next(5000);
                tokens += q;
                if next(2) == 0 {
                    run(&format!(
                        "SELECT * FROM billing.ingest('{account}', 'tokens', {q}, key => '{account}:{i}')"
                    ));
                } else {
                    batch.push(format!(
                        r#"{{"account":"{account}","meter":"tokens","quantity":{q},"key":"{account}:{i}"}}"#
                    ));
                }
            }
            run(&format!(
                "SELECT * FROM billing.ingest_batch('[{}]')",
                batch.join(",")
            ));
            let exact: i64 = one(&format!("SELECT round({tokens} * 0.0137)::bigint"));
            let charged = total(&account);
            assert_eq!(
                charged, exact,
                "{tokens} tokens: the exact total rounded once"
            );
            let period_adds_up: bool = one(&format!(
                "SELECT c.quantity = {tokens} AND c.charged = {charged} \
                 FROM billing.meter_periods c JOIN billing.pools p ON p.id = c.pool_id \
                 WHERE p.account = '{account}' AND c.meter = 'tokens'"
            ));
            assert!(
                period_adds_up,
                "the period holds every token and what they were charged"
            );
        }
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_strict_event_refused_counts_nothing_and_a_replay_charges_nothing() {
        run("SELECT billing.define_meter('tokens', 'mills', unit_price => 0.4)");
        grant("a", "mills", 1, "");
        run("SELECT * FROM billing.ingest('a', 'tokens', 1, key => 'k1')");
        run("SELECT * FROM billing.ingest('a', 'tokens', 1, key => 'k1')");
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'tokens', 10, key => 'k2', strict => true)",
            "23514",
        );
        let counted: String = one("SELECT quantity || '/' || charged FROM billing.meter_periods");
        assert_eq!(
            counted, "1/0",
            "one token counted, 0.4 not yet a whole mill"
        );
        assert_eq!(total("a"), 0);
        run("SELECT * FROM billing.ingest('a', 'tokens', 1, key => 'k3')");
        assert_eq!(total("a"), 1, "0.4 + 0.4 rounds to one mill");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn verify_ledger_reports_a_period_charge_that_does_not_add_up() {
        run("SELECT billing.define_meter('tokens', 'mills', unit_price => 0.4)");
        grant("a", "mills", 100, "");
        run("SELECT * FROM billing.ingest('a', 'tokens', 1, key => 'k1')");
        run("SELECT * FROM billing.ingest('a', 'tokens', 1, key => 'k2')");
        run("UPDATE billing.meter_periods SET charged = 5");
        let problem: String = one("SELECT problem FROM billing.verify_ledger()");
        assert!(
            problem.starts_with("meter tokens, period from"),
            "{problem}"
        );
    }

    #[pg_test]
    fn a_quantity_is_never_defaulted() {
        grant("a", "mills", 100, "");
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'mills', NULL, key => 'k')",
            "22004",
        );
        assert_rejected(
            r#"SELECT * FROM billing.ingest_batch('[{"account":"a","meter":"mills","key":"k","cost":5}]')"#,
            "22023",
        );
        assert_rejected(
            r#"SELECT * FROM billing.ingest_batch('[{"account":"a","meter":"mills","key":"k","quantity":null}]')"#,
            "22023",
        );
        assert_eq!(
            sqlstate("SELECT * FROM billing.ingest('a', 'mills', key => 'k', cost => 5)")
                .as_deref(),
            Some("42883"),
            "there is no form of ingest without a quantity"
        );
    }

    #[pg_test]
    fn keys_in_pg_billings_own_namespace_are_refused() {
        grant("a", "mills", 100, "");
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'mills', 1, key => 'billing:hold:1')",
            "22023",
        );
    }

    #[pg_test]
    fn a_settled_hold_is_a_usage_event() {
        run("SELECT billing.define_meter('gpt', 'mills')");
        grant("a", "mills", 1000, "");
        let h: i64 = one(
            "SELECT hold_id FROM billing.reserve('a', 'mills', 300, key => 'h', metadata => '{\"model\": \"x\"}')",
        );
        let settle = format!(
            "SELECT concat_ws(',', status, actual, covered, event_id) FROM billing.settle({h}, 250, \
             meter => 'gpt', quantity => 1234, properties => '{{\"member\": \"u1\"}}')"
        );
        let first: String = one(&settle);
        let event_id: i64 = one("SELECT id FROM billing.usage_events");
        assert_eq!(first, format!("settled,250,250,{event_id}"));
        let event: String = one(
            "SELECT concat_ws(',', key, meter, unit, quantity, cost, covered, debt_created, properties ->> 'member', \
                              drains ->> 0 IS NOT NULL) FROM billing.usage_events",
        );
        assert_eq!(
            event,
            format!("billing:hold:{h},gpt,mills,1234,250,250,0,u1,t")
        );
        let tagged: i64 = one(&format!(
            "SELECT count(*) FROM billing.ledger WHERE kind = 'debit' AND event_id = {event_id} AND hold_id = {h}"
        ));
        assert_eq!(tagged, 1, "the debit names the event and the hold");
        let before = footprint();
        assert_eq!(
            one::<String>(&settle),
            format!("duplicate,250,250,{event_id}")
        );
        assert_eq!(footprint(), before);
        assert_rejected(
            &format!("SELECT * FROM billing.settle({h}, 250, meter => 'gpt', quantity => 1)"),
            "23505",
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_hold_settled_without_a_meter_is_usage_of_its_unit() {
        grant("a", "mills", 1000, "");
        let h: i64 = one(
            "SELECT hold_id FROM billing.reserve('a', 'mills', 300, metadata => '{\"model\": \"x\"}')",
        );
        run(&format!("SELECT * FROM billing.settle({h}, 120)"));
        let event: String = one(
            "SELECT concat_ws(',', meter, quantity, cost, properties ->> 'model') FROM billing.usage_events",
        );
        assert_eq!(
            event, "mills,120,120,x",
            "quantity = cost at 1 per unit; the hold's metadata"
        );
    }

    /// A unit used as its own meter (no define_meter) reports its usage like
    /// any meter: summed, by no property.
    #[pg_test]
    fn the_usage_of_a_unit_used_as_its_meter_is_reported() {
        grant("a", "mills", 1000, "");
        run("SELECT * FROM billing.ingest('a', 'mills', 1, key => 'u1', cost => 70)");
        run("SELECT * FROM billing.ingest('a', 'mills', 1, key => 'u2', cost => 5)");
        let reported: String = one(
            "SELECT concat_ws(',', sum(events), sum(quantity), sum(cost)) \
             FROM billing.usage('a', 'mills', now() - interval '1 hour', now() + interval '1 hour', 'hour')",
        );
        assert_eq!(reported, "2,2,75");
        assert_rejected(
            "SELECT * FROM billing.usage('a', 'mills', now() - interval '1 hour', now(), 'hour', '{model}')",
            "22023",
        );
    }

    #[pg_test]
    fn a_settlement_names_a_meter_of_the_holds_unit_and_its_quantity() {
        run("SELECT billing.define_meter('other', 'credits')");
        grant("a", "mills", 1000, "");
        let h: i64 = one("SELECT hold_id FROM billing.reserve('a', 'mills', 300)");
        assert_rejected(
            &format!("SELECT * FROM billing.settle({h}, 10, meter => 'other', quantity => 1)"),
            "22023",
        );
        assert_rejected(
            &format!("SELECT * FROM billing.settle({h}, 10, meter => 'mills')"),
            "22004",
        );
        assert_rejected(
            &format!("SELECT * FROM billing.settle({h}, 10, meter => 'nope', quantity => 1)"),
            "42704",
        );
    }

    // A batch's stored events are matched to its keys by key, whatever order
    // the plan returns them in (here a hash join, which does not keep the
    // keys' order): replays stay replays and new events get their own ids.
    #[pg_test]
    fn a_batch_matches_stored_events_by_key_whatever_the_plan() {
        run("SET LOCAL enable_nestloop = off");
        run("SET LOCAL enable_mergejoin = off");
        grant("a", "mills", 1000, "");
        for k in ["k1", "k3", "k5"] {
            ingest("a", "mills", 1, k);
        }
        let statuses: String = one(
            "SELECT string_agg(key || ':' || status, ',' ORDER BY n) FROM billing.ingest_batch(\
             (SELECT jsonb_agg(jsonb_build_object('account', 'a', 'meter', 'mills', 'quantity', 1, \
                     'key', 'k' || i, 'cost', 1) ORDER BY i DESC) FROM generate_series(1, 6) i)) \
             WITH ORDINALITY AS r(key, event_id, status, meter, unit, cost, covered, debt_created, \
                                  drains, available, entitled, n)",
        );
        assert_eq!(
            statuses,
            "k6:applied,k5:duplicate,k4:applied,k3:duplicate,k2:applied,k1:duplicate"
        );
        let distinct: i64 = one("SELECT count(DISTINCT id) FROM billing.usage_events");
        assert_eq!(distinct, 6);
        // keys are looked up in key order, but new events are numbered in
        // input order, the order a pool applies them in
        let by_id: String = one(
            "SELECT string_agg(key, ',' ORDER BY id) FROM billing.usage_events WHERE key IN ('k2', 'k4', 'k6')",
        );
        assert_eq!(by_id, "k6,k4,k2");
        assert_ledger_consistent();
    }
}
