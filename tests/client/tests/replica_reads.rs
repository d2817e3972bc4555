//! README, "Reads on replicas": `check` and `balance` answer on a real
//! streaming replica (a hot standby of a cluster of the test's own), with the
//! primary's figures once it has replayed the primary's writes, as the
//! application role; a debit there is refused (25006) and the primary stays
//! the one place that enforces the floor.

use std::thread::sleep;
use std::time::{Duration, Instant};

use pg_billing_client_tests::cluster::Cluster;
use pg_billing_client_tests::sqlstate;
use postgres::Client;

const PRIMARY_DIR: &str = "/tmp/pg_billing_replica_primary";
const REPLICA_DIR: &str = "/tmp/pg_billing_replica_standby";
const PRIMARY_PORT: u16 = 28870;
const REPLICA_PORT: u16 = 28871;

fn figures(c: &mut Client) -> String {
    c.query_one(
        "SELECT concat_ws(' ', c.allowed, c.available, c.debt, b.balance, b.held) \
         FROM billing.\"check\"('org_1', 'cents', 100) c, billing.balance('org_1', 'cents') b",
        &[],
    )
    .unwrap()
    .get(0)
}

/// Wait until the replica has replayed everything the primary wrote so far.
fn caught_up(primary: &mut Client, replica: &mut Client) {
    let lsn: String = primary
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .unwrap()
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !replica
        .query_one(
            "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
            &[&lsn],
        )
        .unwrap()
        .get::<_, bool>(0)
    {
        assert!(
            Instant::now() < deadline,
            "the replica did not catch up in 30 s"
        );
        sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_gate_and_balances_answer_on_a_hot_standby() {
    let primary = Cluster::create(PRIMARY_DIR, PRIMARY_PORT);
    let mut p = primary.connect("postgres");
    p.batch_execute("CREATE DATABASE app;").unwrap();
    let mut p = primary.connect("app");
    p.batch_execute(
        "CREATE EXTENSION pg_billing;
         CREATE ROLE app_reader LOGIN IN ROLE billing_reader;
         SELECT billing.grant_tenant('default', 'app_reader');
         SELECT * FROM billing.grant('org_1', 'cents', 1000, key => 'pi_1');
         SELECT billing.define_meter('calls', 'cents', unit_price => 1);
         SELECT * FROM billing.ingest('org_1', 'calls', 300, key => 'u1');
         SELECT * FROM billing.reserve('org_1', 'cents', 200, key => 'h1');",
    )
    .unwrap();
    let replica = Cluster::replica_of(&primary, REPLICA_DIR, REPLICA_PORT);
    let mut r = replica.connect("app");
    caught_up(&mut p, &mut r);
    assert!(
        r.query_one("SELECT pg_is_in_recovery()", &[])
            .unwrap()
            .get::<_, bool>(0),
        "a hot standby"
    );
    assert_eq!(figures(&mut r), figures(&mut p));
    assert_eq!(figures(&mut r), "t 500 0 700 200");

    // a write on the primary reaches the replica's answers once replayed
    p.batch_execute("SELECT * FROM billing.ingest('org_1', 'calls', 450, key => 'u2')")
        .unwrap();
    caught_up(&mut p, &mut r);
    assert_eq!(figures(&mut r), "f 50 0 250 200", "50 left: 100 is refused");

    // as the application's reader role too (tenant check, row-level security)
    let mut reader = Client::connect(
        &format!("host=127.0.0.1 port={REPLICA_PORT} user=app_reader dbname=app"),
        postgres::NoTls,
    )
    .unwrap();
    assert_eq!(figures(&mut reader), "f 50 0 250 200");

    // the replica records nothing: a debit is for the primary
    let err = r
        .execute(
            "SELECT * FROM billing.ingest('org_1', 'calls', 1, key => 'u3')",
            &[],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("25006"), "{err:?}");
    drop(replica);
}
