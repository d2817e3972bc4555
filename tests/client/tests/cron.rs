//! README, "Periodic work with pg_cron", in a real cluster: bin/test starts
//! the server with pg_cron preloaded, and billing.run_periodic scheduled in
//! the billing database runs on the minute and records the expiry of a grant
//! whose time passed (which nothing but the periodic work writes: balances
//! are exact without it).

use std::thread::sleep;
use std::time::{Duration, Instant};

use pg_billing_client_tests::{connect, fresh_db, ledger_problems};

const DB: &str = "pgb_cron";
const JOB: &str = "pgb_cron_periodic";

#[test]
fn pg_cron_runs_the_periodic_work_in_the_billing_database() {
    let mut cron = connect("postgres");
    cron.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_cron")
        .expect("pg_cron is preloaded by bin/test (shared_preload_libraries)");
    cron.execute(
        "SELECT cron.unschedule(jobid) FROM cron.job WHERE jobname = $1",
        &[&JOB],
    )
    .unwrap();
    let mut db = fresh_db(DB);
    db.batch_execute(
        "SELECT * FROM billing.grant('a', 'cents', 100, key => 'short', expires_at => now() + interval '1 second');
         SELECT * FROM billing.grant('a', 'cents', 50, key => 'long');",
    )
    .unwrap();
    sleep(Duration::from_millis(1500));
    let expiries = |db: &mut postgres::Client| -> i64 {
        db.query_one(
            "SELECT count(*) FROM billing.ledger_entries WHERE kind = 'expire'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(expiries(&mut db), 0, "nothing has recorded the expiry yet");
    let available: i64 = db
        .query_one("SELECT available FROM billing.check('a', 'cents')", &[])
        .unwrap()
        .get(0);
    assert_eq!(available, 50, "the balance is exact without the job");

    let job: i64 = cron
        .query_one(
            "SELECT cron.schedule_in_database($1, '* * * * *', 'SELECT * FROM billing.run_periodic(1000)', $2)",
            &[&JOB, &DB],
        )
        .unwrap()
        .get(0);
    // the next minute's run, and a little more
    let deadline = Instant::now() + Duration::from_secs(75);
    let mut runs = Vec::new();
    while Instant::now() < deadline {
        runs = cron
            .query(
                "SELECT status, return_message FROM cron.job_run_details WHERE jobid = $1 AND status <> 'running'",
                &[&job],
            )
            .unwrap()
            .iter()
            .map(|r| format!("{}: {}", r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect();
        if !runs.is_empty() {
            break;
        }
        sleep(Duration::from_millis(500));
    }
    cron.execute("SELECT cron.unschedule($1::bigint)", &[&job])
        .unwrap();
    assert!(!runs.is_empty(), "pg_cron ran the job within 75 s");
    assert!(runs[0].starts_with("succeeded"), "{runs:?}");
    assert_eq!(
        expiries(&mut db),
        1,
        "the periodic work recorded the expiry"
    );
    assert!(ledger_problems(&mut db).is_empty());
}
