//! Counters and period charges under real concurrency: the first events of
//! a new account, sent by many sessions at once, leave exactly one counter
//! row per key; counters equal a recomputation from the events; and the sum
//! charged by a tiered price is the price of the period's total, rounded
//! once, whatever the interleaving.

use pg_billing_client_tests::{connect, fresh_db, ledger_problems, run_sessions};

const DB: &str = "pgb_metering_races";
const SESSIONS: usize = 16;
const EVENTS: usize = 25;

#[test]
fn racing_first_events_leave_one_counter_per_key_and_charge_the_period_price() {
    let mut admin = fresh_db(DB);
    admin
        .batch_execute(
            r#"SELECT billing.grant('new_org', 'usd_mills', 100000000, kind => 'topup');
               SELECT billing.define_meter('calls', 'usd_mills', group_by => '{model}', price => '{
                 "model": "graduated", "included": 100, "tiers": [
                   {"up_to": 1000, "unit_price": "0.7"},
                   {"up_to": null, "unit_price": "0.3", "flat_price": 5}]}')"#,
        )
        .unwrap();
    // the account's pool exists (the grant), its counters and period do not
    run_sessions(SESSIONS, |i, start| {
        let mut c = connect(DB);
        start.wait();
        for n in 0..EVENTS {
            let model = ["a", "b", "c"][(i + n) % 3];
            c.execute(
                "SELECT * FROM billing.ingest('new_org', 'calls', $1::text::numeric, key => $2, \
                 properties => jsonb_build_object('model', $3::text))",
                &[
                    &format!("{}", 1 + (i * 7 + n) % 5),
                    &format!("s{i}:{n}"),
                    &model,
                ],
            )
            .unwrap();
        }
    });
    assert!(ledger_problems(&mut admin).is_empty());
    let row = admin
        .query_one(
            "SELECT (SELECT count(*) FROM billing.hourly_usage), \
                    (SELECT count(DISTINCT (pool_id, meter, hour, groups)) FROM billing.hourly_usage), \
                    (SELECT count(DISTINCT (date_trunc('hour', occurred_at), properties ->> 'model')) FROM billing.usage_events), \
                    (SELECT sum(quantity)::text FROM billing.usage_events), \
                    (SELECT sum(cost)::bigint FROM billing.usage_events), \
                    (SELECT count(*) FROM billing.meter_periods)",
            &[],
        )
        .unwrap();
    let (rows, keys, expected_keys): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(rows, keys, "one row per counter key");
    assert_eq!(rows, expected_keys, "a counter per hour and model");
    let total: String = row.get(3);
    let charged: i64 = row.get(4);
    let periods: i64 = row.get(5);
    assert_eq!(periods, 1, "one period row for the pool and meter");
    // the period's price: the first 100 included, then of the billable
    // b = q − 100: 1000 × 0.7, and past the tier 5 + (b − 1000) × 0.3, rounded once
    let q: i64 = total.parse().unwrap();
    let b = q - 100;
    assert!(b > 1000, "the test crosses the tier: {q}");
    let exact_tenths = 1000 * 7 + 50 + (b - 1000) * 3;
    let price = (exact_tenths + 5) / 10;
    assert_eq!(charged, price, "{q} calls");
    let available: i64 = admin
        .query_one(
            "SELECT available FROM billing.check('new_org', 'usd_mills')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(available, 100_000_000 - price);
}
