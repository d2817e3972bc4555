// Meters as billing engineers define them: price models charged per period
// (the period's total rounded once), price versions snapshotted on events,
// aggregations, group_by counters and the usage report read from them,
// late and early events, filters, and disabled meters.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::support::*;

    fn costs(account: &str) -> String {
        one(&format!(
            "SELECT string_agg(cost::text, ',' ORDER BY id) FROM billing.usage_events WHERE account = '{account}'"
        ))
    }

    fn ingest_q(account: &str, meter: &str, quantity: &str, key: &str, extra: &str) -> i64 {
        one(&format!(
            "SELECT cost FROM billing.ingest('{account}', '{meter}', {quantity}, key => '{key}'{extra})"
        ))
    }

    const TIERS: &str = r#"{"model": "graduated", "tiers": [
        {"up_to": 1000, "unit_price": 0},
        {"up_to": 10000, "unit_price": "0.5", "flat_price": 100},
        {"up_to": null, "unit_price": "0.4"}]}"#;

    #[pg_test]
    fn graduated_tiers_charge_each_event_what_the_period_total_grew_by() {
        run(&format!(
            "SELECT billing.define_meter('calls', 'mills', price => '{TIERS}')"
        ));
        grant("a", "mills", 1_000_000, "");
        // 1000 free; the 1001st enters tier 2: 100 flat + 0.5 → 100.5 → 101
        assert_eq!(ingest_q("a", "calls", "1000", "e1", ""), 0);
        assert_eq!(ingest_q("a", "calls", "1", "e2", ""), 101);
        // up to 10000: 100 + 9000 × 0.5 = 4600 in all
        assert_eq!(ingest_q("a", "calls", "8999", "e3", ""), 4600 - 101);
        // one past: 4600.4 → 4600
        assert_eq!(ingest_q("a", "calls", "1", "e4", ""), 0);
        assert_eq!(ingest_q("a", "calls", "1", "e5", ""), 1, "4600.8 → 4601");
        let period: String =
            one("SELECT quantity || '/' || charged || '/' || version FROM billing.meter_periods");
        assert_eq!(period, "10002/4601/1");
        let versions: String =
            one("SELECT string_agg(DISTINCT price_version::text, ',') FROM billing.usage_events");
        assert_eq!(
            versions, "1",
            "each event records the version that priced it"
        );
        assert_eq!(available("a", "mills"), 1_000_000 - 4601);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_new_price_version_prices_what_follows_and_leaves_earlier_events_as_they_were() {
        run("SELECT billing.define_meter('img', 'mills', unit_price => 2)");
        grant("a", "mills", 10_000, "");
        assert_eq!(ingest_q("a", "img", "5", "e1", ""), 10);
        let same: String = one(
            r#"SELECT status FROM billing.set_price('img', '{"model": "per_unit", "unit_price": "2.0"}')"#,
        );
        assert_eq!(same, "unchanged", "2.0 is the price already in force");
        let v: i32 = one(
            r#"SELECT version FROM billing.set_price('img', '{"model": "per_unit", "unit_price": 3}')"#,
        );
        assert_eq!(v, 2);
        assert_eq!(ingest_q("a", "img", "5", "e2", ""), 15);
        assert_eq!(costs("a"), "10,15");
        let snap: String = one(
            "SELECT string_agg(price_version::text, ',' ORDER BY id) FROM billing.usage_events",
        );
        assert_eq!(snap, "1,2");
        let stored: String =
            one("SELECT price::text FROM billing.meter_prices WHERE meter = 'img' AND version = 2");
        assert_eq!(
            stored,
            r#"{"model": "per_unit", "included": "0", "rounding": "half_up", "unit_price": "3"}"#
        );
        // a scheduled change applies from its instant, never before
        run(
            r#"SELECT billing.set_price('img', '{"model": "per_unit", "unit_price": 7}', now() + interval '1 day')"#,
        );
        assert_eq!(ingest_q("a", "img", "1", "e3", ""), 3);
        assert_rejected(
            r#"SELECT billing.set_price('img', '{"model": "per_unit", "unit_price": 8}', now() - interval '1 second')"#,
            "22023",
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_bad_price_is_refused_and_writes_nothing() {
        let before = footprint();
        for price in [
            r#"{"model": "per_unit", "unit_price": -1}"#,
            r#"{"model": "graduated", "tiers": [{"up_to": 10, "unit_price": 1}]}"#,
            r#"{"model": "per_unit", "unit_price": 1, "rounding": "banker"}"#,
            r#"{"model": "per_unit", "unitprice": 1}"#,
        ] {
            assert_rejected(
                &format!("SELECT billing.define_meter('m', 'mills', price => '{price}')"),
                "22023",
            );
        }
        assert_rejected(
            r#"SELECT billing.define_meter('m', 'mills', unit_price => 1, price => '{"model": "per_unit", "unit_price": 1}')"#,
            "22023",
        );
        assert_rejected(
            "SELECT billing.define_meter('m', 'mills', aggregation => 'unique_count')",
            "22023",
        );
        assert_rejected(
            "SELECT billing.define_meter('m', 'mills', lateness => '1 month')",
            "22023",
        );
        assert_rejected(
            "SELECT billing.define_meter('m', 'mills', late_events => 'later')",
            "22023",
        );
        assert_eq!(footprint(), before);
    }

    #[pg_test]
    fn a_disabled_meter_refuses_usage_naming_it_and_keeps_its_history() {
        run("SELECT billing.define_meter('gpt3', 'mills', unit_price => 1)");
        grant("a", "mills", 100, "");
        ingest_q("a", "gpt3", "4", "e1", "");
        run("SELECT billing.disable_meter('gpt3')");
        let err = sqlstate("SELECT * FROM billing.ingest('a', 'gpt3', 1, key => 'e2')");
        assert_eq!(err.as_deref(), Some("55000"));
        // a replay of what it recorded still answers as it did
        assert_eq!(
            one::<String>("SELECT status FROM billing.ingest('a', 'gpt3', 4, key => 'e1')"),
            "duplicate"
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.usage_events WHERE meter = 'gpt3'"),
            1
        );
        // the gate refuses it too, naming it, when the call says which meter it will use
        assert_eq!(
            sqlstate("SELECT * FROM billing.check('a', 'mills', 1, meter => 'gpt3')").as_deref(),
            Some("55000")
        );
        assert_rejected(
            "SELECT * FROM billing.check('a', 'credits', 1, meter => 'gpt3')",
            "22023",
        );
        run("SELECT billing.enable_meter('gpt3')");
        let allowed: bool =
            one("SELECT allowed FROM billing.check('a', 'mills', 1, meter => 'gpt3')");
        assert!(allowed);
        assert_eq!(ingest_q("a", "gpt3", "1", "e2", ""), 1);
        assert_rejected("SELECT billing.disable_meter('nope')", "42704");
    }

    #[pg_test]
    fn events_count_when_they_occurred_within_the_lateness_window() {
        run("SELECT billing.define_meter('calls', 'mills', unit_price => 1)");
        grant("a", "mills", 1000, "");
        // an hour late: counted in its own hour, which is marked revised
        ingest_q(
            "a",
            "calls",
            "1",
            "late",
            ", occurred_at => now() - interval '1 hour'",
        );
        let revised: bool = one(
            "SELECT revised_at = now() AND hour = date_trunc('hour', (now() - interval '1 hour') AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' \
             FROM billing.hourly_usage WHERE hour < date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
        );
        assert!(revised);
        // beyond 48 hours: refused, naming the meter and the window
        let err = sqlstate(
            "SELECT * FROM billing.ingest('a', 'calls', 1, key => 'old', occurred_at => now() - interval '49 hours')",
        );
        assert_eq!(err.as_deref(), Some("22023"));
        // more than 5 minutes ahead: refused
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'calls', 1, key => 'ahead', occurred_at => now() + interval '6 minutes')",
            "22023",
        );
        // a meter that books late events now
        run("SELECT billing.define_meter('calls', 'mills', unit_price => 1, late_events => 'current_period', lateness => '1 hour')");
        ingest_q(
            "a",
            "calls",
            "1",
            "old",
            ", occurred_at => now() - interval '49 hours'",
        );
        let booked: bool = one(
            "SELECT booked_at = now() AND occurred_at = now() - interval '49 hours' FROM billing.usage_events WHERE key = 'old'",
        );
        assert!(
            booked,
            "the event keeps when it occurred and records when it counts"
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.hourly_usage"),
            2,
            "the late hour and the current one"
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn counters_group_by_properties_and_the_report_fills_empty_periods() {
        run("SELECT billing.define_meter('tokens', 'mills', group_by => '{model,member}')");
        grant("org", "mills", 1_000_000, "");
        for (i, (model, member, q, hours_ago)) in [
            ("a", "u1", 10, 0),
            ("a", "u2", 20, 0),
            ("b", "u1", 5, 0),
            ("a", "u1", 1, 30),
        ]
        .iter()
        .enumerate()
        {
            run(&format!(
                "SELECT * FROM billing.ingest('org', 'tokens', {q}, key => 'k{i}', cost => {q}, \
                 occurred_at => now() - interval '{hours_ago} hours', \
                 properties => '{{\"model\": \"{model}\", \"member\": \"{member}\", \"other\": {i}}}')"
            ));
        }
        assert_eq!(one::<i64>("SELECT count(*) FROM billing.hourly_usage"), 4);
        // per day over three days ending today: the empty day shows 0
        let days: String = one(
            "SELECT string_agg(events || ':' || quantity || ':' || cost, ' ' ORDER BY period_start) \
             FROM billing.usage('org', 'tokens', date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' - interval '2 days', \
                                date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' + interval '1 day')",
        );
        let yesterday_or_before: i64 = one(
            "SELECT CASE WHEN date_trunc('day', (now() - interval '30 hours') AT TIME ZONE 'UTC') \
                          = date_trunc('day', now() AT TIME ZONE 'UTC') - interval '1 day' THEN 1 ELSE 2 END",
        );
        let expected = if yesterday_or_before == 1 {
            "0:0:0 1:1:1 3:35:35"
        } else {
            "1:1:1 0:0:0 3:35:35"
        };
        assert_eq!(days, expected);
        // per model this hour
        let by_model: String = one(
            "SELECT string_agg(groups::text || '=' || quantity, ' ' ORDER BY groups::text) \
             FROM billing.usage('org', 'tokens', now() - interval '1 minute', now(), 'hour', '{model}') \
             WHERE events > 0",
        );
        assert_eq!(by_model, r#"{"model": "a"}=30 {"model": "b"}=5"#);
        assert_rejected(
            "SELECT * FROM billing.usage('org', 'tokens', now() - interval '1 day', now(), 'hour', '{other}')",
            "22023",
        );
        assert_rejected(
            "SELECT * FROM billing.usage('org', 'tokens', now() - interval '1 day', now(), 'fortnight')",
            "22023",
        );
        assert_rejected(
            "SELECT * FROM billing.usage('org', 'tokens', now() - interval '1 day', now(), 'day', time_zone => 'Asia/Kolkata')",
            "22023",
        );
        assert_rejected(
            "SELECT * FROM billing.usage('org', 'nope', now() - interval '1 day', now())",
            "42704",
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn max_last_and_unique_count_aggregate_as_named() {
        run("SELECT billing.define_meter('seats_peak', 'mills', aggregation => 'max', unit_price => 10)");
        run("SELECT billing.define_meter('storage', 'mills', aggregation => 'last')");
        run("SELECT billing.define_meter('users', 'mills', aggregation => 'unique_count', property => 'user', unit_price => 100)");
        grant("a", "mills", 100_000, "");
        let peak: Vec<i64> = ["3", "2", "5"]
            .iter()
            .enumerate()
            .map(|(i, q)| ingest_q("a", "seats_peak", q, &format!("p{i}"), ""))
            .collect();
        assert_eq!(peak, vec![30, 0, 20], "a max meter charges its peak once");
        for (i, (q, ago)) in [("7", 10), ("9", 20), ("4", 5)].iter().enumerate() {
            run(&format!(
                "SELECT * FROM billing.ingest('a', 'storage', {q}, key => 's{i}', cost => 0, \
                 occurred_at => now() - interval '{ago} seconds')"
            ));
        }
        let users: Vec<i64> = ["alice", "bob", "alice", "carol", "bob"]
            .iter()
            .enumerate()
            .map(|(i, u)| {
                ingest_q(
                    "a",
                    "users",
                    "1",
                    &format!("u{i}"),
                    &format!(", properties => '{{\"user\": \"{u}\"}}'"),
                )
            })
            .collect();
        assert_eq!(users, vec![100, 100, 0, 100, 0]);
        let month =
            "date_trunc('month', now()), date_trunc('month', now()) + interval '1 month', 'month'";
        let q = |meter: &str| -> String {
            one(&format!(
                "SELECT quantity::text FROM billing.usage('a', '{meter}', {month}) WHERE events > 0"
            ))
        };
        assert_eq!(q("seats_peak"), "5");
        assert_eq!(
            q("storage"),
            "4",
            "the latest occurrence, not the last to arrive"
        );
        assert_eq!(q("users"), "3");
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'users', 1, key => 'u9')",
            "22023",
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn an_ai_cost_card_prices_tokens_by_model_and_rounds_the_period_once() {
        run(
            r#"SELECT billing.define_meter('llm', 'usd_mills', aggregation => 'count', group_by => '{model}', price => '{
            "model": "cost_card", "by": "model", "rates": {
              "gpt-4o": {"input_tokens": "0.0025", "output_tokens": "0.01", "cached_tokens": "0.00125"},
              "mini": {"input_tokens": "0.00015", "output_tokens": "0.0006"}}}')"#,
        );
        grant("a", "usd_mills", 100_000, "");
        // 1200 × 0.0025 + 300 × 0.01 + 400 × 0.00125 = 3 + 3 + 0.5 = 6.5 → 7
        let c1 = ingest_q(
            "a",
            "llm",
            "1",
            "c1",
            r#", properties => '{"model": "gpt-4o", "input_tokens": 1200, "output_tokens": 300, "cached_tokens": 400}'"#,
        );
        // + 0.5 exactly: 7.0 in all, so nothing more
        let c2 = ingest_q(
            "a",
            "llm",
            "1",
            "c2",
            r#", properties => '{"model": "gpt-4o", "cached_tokens": 400}'"#,
        );
        assert_eq!((c1, c2), (7, 0));
        // 10000 × 0.00015 + 1000 × 0.0006 = 1.5 + 0.6 = 2.1: 9.1 → 9
        let c3 = ingest_q(
            "a",
            "llm",
            "1",
            "c3",
            r#", properties => '{"model": "mini", "input_tokens": 10000, "output_tokens": 1000}'"#,
        );
        assert_eq!(c3, 2);
        let err = sqlstate(
            r#"SELECT * FROM billing.ingest('a', 'llm', 1, key => 'c4', properties => '{"model": "claude"}')"#,
        );
        assert_eq!(err.as_deref(), Some("22023"), "an unknown model is refused");
        let by_model: String = one(
            "SELECT string_agg(groups ->> 'model' || '=' || events || '/' || cost, ' ' ORDER BY groups::text) \
             FROM billing.usage('a', 'llm', now() - interval '1 minute', now(), 'hour', '{model}') WHERE events > 0",
        );
        assert_eq!(by_model, "gpt-4o=2/7 mini=1/2");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_filter_refuses_events_without_its_properties() {
        run(
            r#"SELECT billing.define_meter('eu_calls', 'mills', unit_price => 1, filter => '{"region": "eu"}')"#,
        );
        grant("a", "mills", 100, "");
        ingest_q(
            "a",
            "eu_calls",
            "1",
            "e1",
            r#", properties => '{"region": "eu"}'"#,
        );
        assert_rejected(
            r#"SELECT * FROM billing.ingest('a', 'eu_calls', 1, key => 'e2', properties => '{"region": "us"}')"#,
            "22023",
        );
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'eu_calls', 1, key => 'e3')",
            "22023",
        );
    }

    #[pg_test]
    fn how_a_meter_counts_cannot_change_once_it_counted() {
        run("SELECT billing.define_meter('calls', 'mills', unit_price => 1)");
        run("SELECT billing.define_meter('calls', 'mills', aggregation => 'max', unit_price => 1)");
        grant("a", "mills", 100, "");
        ingest_q("a", "calls", "1", "e1", "");
        assert_rejected(
            "SELECT billing.define_meter('calls', 'mills', aggregation => 'sum', unit_price => 1)",
            "55000",
        );
        // its price and description may change
        run("SELECT billing.define_meter('calls', 'mills', aggregation => 'max', unit_price => 2, description => 'x')");
    }

    /// Where each hourly counter is: (meter, hours ago, events) of the
    /// counter the pool row keeps, then of each usage_counters row.
    fn counter_homes() -> String {
        const AGO: &str = "extract(hour FROM date_trunc('hour', now()) - h)::int";
        one(&format!(
            "SELECT concat_ws(' | ', \
               (SELECT string_agg(counter_meter || ':' || {} || ':' || counter_events, ',') \
                FROM billing.pools CROSS JOIN LATERAL (SELECT counter_hour AS h) x WHERE counter_meter IS NOT NULL), \
               (SELECT string_agg(meter || ':' || {} || ':' || events, ',' ORDER BY meter, hour) \
                FROM billing.usage_counters CROSS JOIN LATERAL (SELECT hour AS h) x))",
            AGO, AGO
        ))
    }

    /// Every stored instant of usage moves back an hour (test only).
    fn an_hour_passes() {
        run("SET LOCAL session_replication_role = replica");
        run("UPDATE billing.usage_events SET occurred_at = occurred_at - interval '1 hour', \
                 recorded_at = recorded_at - interval '1 hour', entry_at = entry_at - interval '1 hour'");
        run("UPDATE billing.usage_counters SET hour = hour - interval '1 hour'");
        run("UPDATE billing.pools SET counter_hour = counter_hour - interval '1 hour'");
        run("SET LOCAL session_replication_role = origin");
    }

    // The current hour's counter of one meter is kept on the pool row every
    // event updates anyway; another meter's, or another hour's, is a row of
    // its own; once its hour has ended, the kept counter goes back to its
    // row and the current hour's takes its place. Reports and verify read both.
    #[pg_test]
    fn the_pool_row_keeps_the_current_hours_counter() {
        run("SELECT billing.define_meter('calls', 'mills', unit_price => 1)");
        run("SELECT billing.define_meter('files', 'mills', unit_price => 2)");
        grant("a", "mills", 1000, "");
        ingest_q("a", "calls", "1", "c1", "");
        ingest_q("a", "calls", "1", "c2", "");
        assert_eq!(counter_homes(), "calls:0:2");
        ingest_q("a", "files", "1", "f1", "");
        ingest_q(
            "a",
            "calls",
            "1",
            "late",
            ", occurred_at => now() - interval '3 hours'",
        );
        assert_eq!(counter_homes(), "calls:0:2 | calls:3:1,files:0:1");
        assert_ledger_consistent();
        an_hour_passes();
        ingest_q("a", "files", "1", "f2", "");
        assert_eq!(
            counter_homes(),
            "files:0:1 | calls:4:1,calls:1:2,files:1:1",
            "the ended hour's counter went back to a row"
        );
        ingest_q("a", "calls", "1", "c3", "");
        ingest_q("a", "files", "1", "f3", "");
        assert_eq!(
            counter_homes(),
            "files:0:2 | calls:4:1,calls:1:2,calls:0:1,files:1:1"
        );
        let report: String = one(
            "SELECT string_agg(meter || ':' || events, ',' ORDER BY meter) FROM (\
               SELECT meter, sum(events) AS events FROM billing.hourly_usage GROUP BY meter) x",
        );
        assert_eq!(report, "calls:4,files:3");
        let today: i64 = one(
            "SELECT sum(events)::bigint FROM billing.usage('a', 'files', now() - interval '1 day', now() + interval '1 hour')",
        );
        assert_eq!(today, 3);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn verify_ledger_reports_a_counter_that_differs_from_its_events() {
        run("SELECT billing.define_meter('calls', 'mills', unit_price => 1)");
        grant("a", "mills", 100, "");
        ingest_q("a", "calls", "3", "e1", "");
        // an earlier hour's counter is a row of usage_counters
        ingest_q(
            "a",
            "calls",
            "2",
            "e2",
            ", occurred_at => now() - interval '2 hours'",
        );
        assert_ledger_consistent();
        run("UPDATE billing.usage_counters SET quantity = 4");
        let problem: String = one("SELECT problem FROM billing.verify_ledger()");
        assert!(problem.starts_with("meter calls, hour"), "{problem}");
        run("UPDATE billing.usage_counters SET quantity = 2");
        assert_ledger_consistent();
        // the current hour's is kept on the pool row
        run("UPDATE billing.pools SET counter_quantity = 4 WHERE counter_meter = 'calls'");
        let problem: String = one("SELECT problem FROM billing.verify_ledger()");
        assert!(problem.contains("quantity 4"), "{problem}");
    }

    #[pg_test]
    fn the_usage_log_pages_newest_first_through_ingested_and_settled_calls() {
        run("SELECT billing.define_meter('calls', 'mills')");
        grant("a", "mills", 10_000, "");
        for i in 0..5 {
            run(&format!(
                "SELECT * FROM billing.ingest('a', 'calls', 1, key => 'c{i}', cost => {i}, \
                 properties => '{{\"member\": \"u{}\"}}')",
                i % 2
            ));
        }
        let h: i64 = one("SELECT hold_id FROM billing.reserve('a', 'mills', 100)");
        run(&format!(
            "SELECT * FROM billing.settle({h}, 42, meter => 'calls', quantity => 3)"
        ));
        grant("b", "mills", 10, "");
        run("SELECT * FROM billing.ingest('b', 'calls', 1, key => 'other', cost => 1)");
        let page = |before: &str| -> String {
            one(&format!(
                "SELECT string_agg(concat_ws('/', cost, coalesce(member, '-'), via), ' ' ORDER BY event_id DESC) \
                 FROM billing.usage_log('a', before_id => {before}, page_size => 4)"
            ))
        };
        assert_eq!(
            page("NULL"),
            "42/-/hold 4/u0/ingest 3/u1/ingest 2/u0/ingest"
        );
        let last: i64 = one(
            "SELECT min(event_id) FROM (SELECT event_id FROM billing.usage_log('a', page_size => 4)) p",
        );
        assert_eq!(page(&last.to_string()), "1/u1/ingest 0/u0/ingest");
        assert_rejected(
            "SELECT * FROM billing.usage_log('a', page_size => 0)",
            "22023",
        );
    }

    #[pg_test]
    fn price_lines_show_each_tier_and_add_up_to_the_exact_total() {
        let lines: String = one(&format!(
            "SELECT string_agg(description || ' = ' || amount, '; ' ORDER BY line) \
             FROM billing.price_lines('{TIERS}', 10001)"
        ));
        assert_eq!(
            lines,
            "tier 1 (0 to 1000] = 0; tier 2 (1000 to 10000] = 4500; tier 2 (1000 to 10000], flat = 100; tier 3 (above 10000) = 0.4"
        );
        assert_eq!(
            one::<i64>(&format!("SELECT billing.price_total('{TIERS}', 10001)")),
            4600
        );
    }

    #[pg_test]
    fn an_invoice_preview_prices_tiers_credits_and_what_is_due_and_its_lines_add_up() {
        run(&format!(
            "SELECT billing.define_meter('calls', 'mills', price => '{TIERS}')"
        ));
        run("SELECT billing.define_meter('ai', 'mills')");
        grant("a", "mills", 3000, ", kind => 'plan'");
        grant("a", "mills", 1000, ", kind => 'topup'");
        ingest_q("a", "calls", "9000", "c1", "");
        ingest_q("a", "calls", "1001", "c2", "");
        ingest_q("a", "ai", "1", "x1", ", cost => 250");
        let lines: String = one(
            "SELECT string_agg(concat_ws('|', kind, coalesce(meter, '-'), description, amount), E'\n' ORDER BY line) \
             FROM billing.invoice_preview('a')",
        );
        assert_eq!(
            lines,
            [
                "usage|ai|costs passed with its events|250",
                "usage|calls|tier 1 (0 to 1000]|0",
                "usage|calls|tier 2 (1000 to 10000]|4500",
                "usage|calls|tier 2 (1000 to 10000], flat|100",
                "usage|calls|tier 3 (above 10000)|0.4",
                "adjustment|calls|rounded once for the period, and any earlier price version|-0.4",
            ]
            .join("\n")
                + "\n"
                + &one::<String>(
                    "SELECT string_agg(concat_ws('|', 'credit', '-', format('paid from grant %s (%s)', id, kind), -(amount - remaining)), E'\n' ORDER BY id) \
                     FROM billing.grants WHERE account = 'a'"
                )
                + "\ndue|-|due|850"
        );
        let adds_up: bool = one(
            "SELECT sum(amount) FILTER (WHERE kind <> 'due') = sum(amount) FILTER (WHERE kind = 'due') \
             FROM billing.invoice_preview('a')",
        );
        assert!(adds_up, "the amount due is the sum of the lines");
        let debt: i64 = one("SELECT debt FROM billing.check('a', 'mills')");
        assert_eq!(debt, 850, "what credits did not pay became debt");
        let projected: bool = one(
            "SELECT sum(amount) FILTER (WHERE kind <> 'due') = sum(amount) FILTER (WHERE kind = 'due') \
                    AND bool_and(kind <> 'credit') \
             FROM billing.invoice_preview('a', projected => true)",
        );
        assert!(projected);
        let sim: String = one(
            r#"SELECT concat_ws('/', quantity, charged, simulated, difference)
               FROM billing.simulate_price('a', 'calls', '{"model": "per_unit", "unit_price": "0.5"}')"#,
        );
        assert_eq!(sim, "10001/4600/5001/401");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.meter_prices WHERE meter = 'calls'"),
            1,
            "a simulation changes nothing"
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn postpaid_usage_is_reported_as_deltas_once_per_key() {
        run("SELECT billing.define_meter('calls', 'mills')");
        grant("a", "mills", 1000, "");
        for i in 0..3 {
            run(&format!(
                "SELECT * FROM billing.ingest('a', 'calls', 10, key => 'c{i}', cost => 1)"
            ));
        }
        let pending = || -> String {
            one(
                "SELECT coalesce(string_agg(concat_ws('/', account, meter, quantity, reported, delta), ' '), '-') \
                 FROM billing.usage_to_report()",
            )
        };
        assert_eq!(pending(), "a/calls/30/0/30");
        let key: String = one("SELECT report_key FROM billing.usage_to_report()");
        let mark = |q: i64, key: &str, shadow: bool| -> String {
            one(&format!(
                "SELECT status FROM billing.mark_reported('a', 'calls', \
                 (SELECT period_start FROM billing.usage_period(now())), {q}, '{key}', shadow => {shadow})"
            ))
        };
        assert_eq!(mark(30, &key, true), "would_mark");
        assert_eq!(pending(), "a/calls/30/0/30", "shadow mode marks nothing");
        assert_eq!(mark(30, &key, false), "marked");
        assert_eq!(pending(), "-");
        assert_eq!(mark(30, &key, false), "duplicate", "a retried push");
        run("SELECT * FROM billing.ingest('a', 'calls', 5, key => 'c9', cost => 1)");
        assert_eq!(pending(), "a/calls/35/30/5", "only the delta is new");
        assert_eq!(mark(20, "old", false), "stale");
        assert_rejected(
            "SELECT * FROM billing.mark_reported('a', 'calls', now(), 1, 'k')",
            "22023",
        );
    }

    #[pg_test]
    fn a_settled_hold_is_recorded_under_its_meter_even_without_the_properties_new_usage_needs() {
        run("SELECT billing.define_meter('users', 'mills', aggregation => 'unique_count', property => 'user')");
        run(r#"SELECT billing.define_meter('eu', 'mills', filter => '{"region": "eu"}')"#);
        grant("a", "mills", 1000, "");
        for meter in ["users", "eu"] {
            let h: i64 = one("SELECT hold_id FROM billing.reserve('a', 'mills', 100)");
            let status: String = one(&format!(
                "SELECT status FROM billing.settle({h}, 40, meter => '{meter}', quantity => 1)"
            ));
            assert_eq!(status, "settled", "{meter}: the cost was incurred");
        }
        let counted: String = one(
            "SELECT string_agg(meter || ':' || events || ':' || quantity, ' ' ORDER BY meter) FROM billing.hourly_usage",
        );
        assert_eq!(
            counted, "eu:1:1 users:1:0",
            "no value, no distinct value counted"
        );
        assert_ledger_consistent();
    }
}
