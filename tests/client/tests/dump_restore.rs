//! pg_dump / pg_restore keeps all billing data: every row of every billing
//! table, the identity sequences (no id is handed out twice), idempotency keys
//! and open holds keep working in the restored database.

use std::process::Command;

use pg_billing_client_tests::{connect, dsn, fresh_db, ledger_problems, BILLING_TABLES};
use postgres::Client;

const SOURCE: &str = "pgb_dump_source";
const TARGET: &str = "pgb_dump_target";
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Every row of every billing table (as the superuser, all tenants).
fn snapshot(c: &mut Client) -> Vec<String> {
    BILLING_TABLES
        .iter()
        .map(|t| {
            let row = c
                .query_one(
                    &format!("SELECT count(*)::text || ':' || coalesce(md5(string_agg(x::text, '|' ORDER BY x::text)), '-') FROM billing.{t} x"),
                    &[],
                )
                .unwrap();
            format!("{t}={}", row.get::<_, String>(0))
        })
        .collect()
}

fn figures(c: &mut Client) -> Vec<String> {
    let mut out = Vec::new();
    for tenant in ["default", "b"] {
        c.batch_execute(&format!("SET billing.tenant = '{tenant}'"))
            .unwrap();
        for row in c
            .query(
                "SELECT p.account, p.unit, ch.allowed, ch.available, ch.balance, ch.held, ch.debt, ch.floor, ch.reason \
                 FROM billing.pools p, billing.check(p.account, p.unit) ch \
                 WHERE p.tenant_id = $1 ORDER BY p.account, p.unit",
                &[&tenant],
            )
            .unwrap()
        {
            let cols: Vec<String> = (0..row.len())
                .map(|i| {
                    row.try_get::<_, String>(i)
                        .or_else(|_| row.try_get::<_, i64>(i).map(|v| v.to_string()))
                        .or_else(|_| row.try_get::<_, bool>(i).map(|v| v.to_string()))
                        .unwrap()
                })
                .collect();
            out.push(format!("{tenant}:{}", cols.join(",")));
        }
        assert_eq!(ledger_problems(c), Vec::<String>::new(), "tenant {tenant}");
    }
    c.batch_execute("RESET billing.tenant").unwrap();
    out
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dump_and_restore_reproduce_balances_and_history() {
    let mut c = fresh_db(SOURCE);
    c.batch_execute(
        "SELECT billing.define_meter('ai', 'usd_mills', unit_price => 12.5);
         SELECT * FROM billing.grant('org_1', 'usd_mills', 10000, kind => 'plan', key => 'plan:1',
                                     expires_at => now() + interval '30 days');
         SELECT * FROM billing.grant('org_1', 'usd_mills', 5000, kind => 'topup', key => 'pay:1');
         SELECT * FROM billing.ingest('org_1', 'ai', 7, key => 'e1');
         SELECT * FROM billing.ingest('org_2', 'usd_mills', 1, key => 'e2', cost => 300);
         SELECT * FROM billing.reserve('org_1', 'usd_mills', 2000, key => 'h-open');
         SELECT * FROM billing.settle((SELECT hold_id FROM billing.reserve('org_1', 'usd_mills', 900, key => 'h2')), 850);
         SELECT billing.define_webhook_endpoint('hooks', 'stripe', 'whsec_dump');
         SELECT * FROM billing.receive_webhook('hooks', '{}', '{}');
         SELECT * FROM billing.define_plan('basic', '{\"usd_mills\": {\"amount\": 3000}}',
                                           '[{\"price_id\": \"price_1\", \"interval\": \"month\"}]');
         SELECT * FROM billing.sync_subscription('{\"object\": \"subscription\", \"id\": \"sub_1\",
             \"status\": \"active\", \"customer\": \"cus_1\", \"metadata\": {\"account\": \"org_1\"},
             \"items\": {\"data\": [{\"price\": {\"id\": \"price_1\"}, \"quantity\": 1}]}}');
         SET billing.tenant = 'b';
         SELECT * FROM billing.grant('org_b', 'credits', 42, key => 'b:1');
         SELECT * FROM billing.ingest('org_b', 'credits', 1, key => 'b:e1', cost => 2);
         RESET billing.tenant;",
    )
    .unwrap();
    let before = snapshot(&mut c);
    let figures_before = figures(&mut c);

    let file = std::env::temp_dir().join("pg_billing_dump_test.dump");
    run(Command::new(format!("{PG_BIN}/pg_dump"))
        .args(["-Fc", "-f"])
        .arg(&file)
        .arg(format!("{} dbname={SOURCE}", dsn())));
    let mut admin = connect("postgres");
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {TARGET} WITH (FORCE)"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {TARGET}"))
        .unwrap();
    run(Command::new(format!("{PG_BIN}/pg_restore"))
        .args(["--exit-on-error", "-d"])
        .arg(format!("{} dbname={TARGET}", dsn()))
        .arg(&file));

    let mut r = connect(TARGET);
    assert_eq!(
        snapshot(&mut r),
        before,
        "every billing row restored exactly"
    );
    assert_eq!(
        figures(&mut r),
        figures_before,
        "every balance restored exactly"
    );

    // The restored database keeps working where the source left off.
    let dup: String = r
        .query_one(
            "SELECT status FROM billing.ingest('org_1', 'ai', 7, key => 'e1')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(dup, "duplicate", "idempotency keys survive");
    const MAX_IDS: &str = "SELECT (SELECT max(id) FROM billing.ledger_entries), \
                                  (SELECT max(id) FROM billing.usage_events)";
    let before_ids = c.query_one(MAX_IDS, &[]).unwrap();
    r.batch_execute(
        "SELECT * FROM billing.ingest('org_1', 'ai', 1, key => 'after-restore');
         SELECT * FROM billing.grant('org_1', 'usd_mills', 5, kind => 'manual', key => 'after-restore')",
    )
    .unwrap();
    let after_ids = r.query_one(MAX_IDS, &[]).unwrap();
    for i in 0..2 {
        assert!(
            after_ids.get::<_, i64>(i) > before_ids.get::<_, i64>(i),
            "sequences continue after the restored ids"
        );
    }
    let settled: String = r
        .query_one(
            "SELECT status FROM billing.settle((SELECT id FROM billing.holds WHERE key = 'h-open'), 1500)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(settled, "settled", "an open hold can still be settled");
    assert_eq!(ledger_problems(&mut r), Vec::<String>::new());
    let _ = std::fs::remove_file(file);
}
