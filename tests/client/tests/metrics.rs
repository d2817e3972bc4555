//! README, "Metrics for an operator", over real connections: with pg_billing
//! preloaded (bin/test's server), every usage event answered is counted by
//! outcome, a rejection too, though it writes nothing and its transaction
//! rolls back.

use std::collections::HashMap;

use pg_billing_client_tests::fresh_db;
use postgres::Client;

const DB: &str = "pgb_metrics";

fn answered(c: &mut Client) -> HashMap<String, i64> {
    c.query(
        "SELECT label, value FROM billing.metrics() WHERE metric = 'usage_events_answered'",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[test]
fn usage_events_are_counted_by_outcome() {
    let mut c = fresh_db(DB);
    c.batch_execute(
        "SELECT * FROM billing.grant('a', 'cents', 100);
         SELECT billing.define_meter('calls', 'cents', unit_price => 1);",
    )
    .unwrap();
    let before = answered(&mut c);
    assert_eq!(
        before.len(),
        3,
        "kept when preloaded: applied, duplicate, rejected ({before:?})"
    );
    let ingest =
        "SELECT * FROM billing.ingest('a', 'calls', $1::bigint, key => $2, strict => true)";
    c.execute(ingest, &[&10i64, &"e1"]).unwrap();
    c.execute(ingest, &[&10i64, &"e1"]).unwrap(); // a replay
    assert!(
        c.execute(ingest, &[&1000i64, &"e2"]).is_err(),
        "refused: 23514"
    );
    c.execute(
        "SELECT * FROM billing.ingest_batch('[{\"account\": \"a\", \"meter\": \"calls\", \"quantity\": 5, \"key\": \"b1\"},
          {\"account\": \"a\", \"meter\": \"calls\", \"quantity\": 500, \"key\": \"b2\", \"strict\": true}]')",
        &[],
    )
    .unwrap();
    let after = answered(&mut c);
    let grew = |outcome: &str| after[outcome] - before[outcome];
    assert_eq!(
        (grew("applied"), grew("duplicate"), grew("rejected")),
        (2, 1, 2)
    );
}
