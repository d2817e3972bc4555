//! README, "Balance alerts", over real connections: the alert is written in
//! the debit's own transaction (a rollback fires nothing and announces
//! nothing), and concurrent debits that all cross fire it once.

use std::time::Duration;

use fallible_iterator::FallibleIterator;
use pg_billing_client_tests::{connect, fresh_db, run_sessions};

const DB: &str = "pgb_alerts";

#[test]
fn an_alert_fires_once_in_the_debits_transaction() {
    let mut admin = fresh_db(DB);
    admin
        .batch_execute(
            "SELECT * FROM billing.grant('a', 'cents', 1000);
             SELECT billing.define_meter('calls', 'cents', unit_price => 1);
             SELECT * FROM billing.set_alert('a', 'cents', 'low', 'low_balance', 500);",
        )
        .unwrap();
    let mut listener = connect(DB);
    listener.batch_execute("LISTEN billing_alert").unwrap();
    let count = |c: &mut postgres::Client| -> i64 {
        c.query_one("SELECT count(*) FROM billing.alerts", &[])
            .unwrap()
            .get(0)
    };

    let mut app = connect(DB);
    let mut tx = app.transaction().unwrap();
    tx.execute(
        "SELECT * FROM billing.ingest('a', 'calls', 600, key => 'r1')",
        &[],
    )
    .unwrap();
    tx.rollback().unwrap();
    assert_eq!(count(&mut admin), 0);

    // 16 sessions each taking 40 at once: one of them crosses 500, once
    run_sessions(16, |i, start| {
        let mut c = connect(DB);
        start.wait();
        c.execute(
            "SELECT * FROM billing.ingest('a', 'calls', 40, key => $1)",
            &[&format!("s{i}")],
        )
        .unwrap();
    });
    assert_eq!(count(&mut admin), 1);
    let id: i64 = admin
        .query_one("SELECT id FROM billing.alerts", &[])
        .unwrap()
        .get(0);
    let mut inbox = listener.notifications();
    let got: Vec<String> = inbox
        .timeout_iter(Duration::from_secs(2))
        .map(|n| Ok(n.payload().to_string()))
        .collect()
        .unwrap();
    assert_eq!(
        got,
        vec![id.to_string()],
        "announced once, after the commit"
    );
}
