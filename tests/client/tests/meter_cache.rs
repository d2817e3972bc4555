//! Each backend keeps the meters it has read (src/pricing.rs). Over real
//! sessions: a price changed and committed by another session applies to this
//! session's next event; a change rolled back is forgotten; a change in this
//! session's own transaction applies at once; a dropped meter is unknown again.

use pg_billing_client_tests::{connect, fresh_db, ledger_problems, sqlstate};
use postgres::Client;

const DB: &str = "pgb_meter_cache";

fn cost(c: &mut Client, key: &str) -> i64 {
    c.query_one(
        "SELECT cost FROM billing.ingest('a', 'calls', 10, key => $1)",
        &[&key],
    )
    .unwrap()
    .get(0)
}

#[test]
fn every_change_of_a_meter_reaches_every_session() {
    let mut admin = fresh_db(DB);
    admin
        .batch_execute(
            "SELECT billing.grant('a', 'usd_mills', 1000000, kind => 'topup'); \
             SELECT billing.define_meter('calls', 'usd_mills', unit_price => 2)",
        )
        .unwrap();
    let mut app = connect(DB);
    assert_eq!(cost(&mut app, "e1"), 20, "read and cached");
    assert_eq!(cost(&mut app, "e2"), 20, "from the cache");

    // another session changes the price and commits
    admin
        .batch_execute("SELECT billing.define_meter('calls', 'usd_mills', unit_price => 3)")
        .unwrap();
    assert_eq!(
        cost(&mut app, "e3"),
        30,
        "the committed change reached this session"
    );

    // a change in this session's own transaction applies at once; rolled back, it is forgotten
    app.batch_execute("BEGIN").unwrap();
    app.batch_execute("SELECT billing.define_meter('calls', 'usd_mills', unit_price => 7)")
        .unwrap();
    assert_eq!(cost(&mut app, "e4"), 70);
    app.batch_execute("ROLLBACK").unwrap();
    assert_eq!(cost(&mut app, "e5"), 30, "the rolled-back price is gone");

    // another session's uncommitted change is not seen
    admin.batch_execute("BEGIN").unwrap();
    admin
        .batch_execute("SELECT billing.define_meter('calls', 'usd_mills', unit_price => 9)")
        .unwrap();
    assert_eq!(cost(&mut app, "e6"), 30);
    admin.batch_execute("ROLLBACK").unwrap();
    assert_eq!(cost(&mut app, "e7"), 30);

    // a meter deleted (by an administrator's DML) is unknown again
    admin
        .batch_execute(
            "DELETE FROM billing.meter_prices WHERE meter = 'calls'; \
             DELETE FROM billing.meters WHERE meter = 'calls'",
        )
        .unwrap();
    let err = app
        .query_one(
            "SELECT cost FROM billing.ingest('a', 'calls', 10, key => 'e8')",
            &[],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42704"));
    assert!(ledger_problems(&mut admin).is_empty());
}
