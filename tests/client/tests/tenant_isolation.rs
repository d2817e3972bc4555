//! README, "Tenants and roles": tenant A's roles, holding tenant B's ids, read none of B's rows
//! and change nothing of B's — through tables, views and every function,
//! including by setting billing.tenant to B or by SET ROLE.

use pg_billing_client_tests::{attempt, fresh_db, sqlstate, BILLING_TABLES};
use postgres::Client;

const DB: &str = "pgb_tenant_isolation";
/// Tenant B's subscription of `shared_name` (no period: the calendar month).
const SUBSCRIPTION_B: &str = r#"{"object": "subscription", "id": "sub_b", "status": "active",
    "customer": "cus_b", "metadata": {"account": "shared_name"},
    "items": {"data": [{"price": {"id": "price_b"}, "quantity": 1}]}}"#;

fn login(role: &str, tenant: &str) -> Client {
    pg_billing_client_tests::login(DB, role, tenant)
}

/// Everything tenant B owns, as text, read by the superuser.
fn footprint_of_b(admin: &mut Client) -> String {
    admin.batch_execute("SET billing.tenant = 'b'").unwrap();
    let mut out = String::new();
    for t in BILLING_TABLES {
        let row = admin
            .query_one(
                &format!("SELECT coalesce(md5(string_agg(x::text, '|' ORDER BY x::text)), '-') FROM billing.{t} x WHERE tenant_id = 'b'"),
                &[],
            )
            .unwrap();
        out.push_str(&format!("{t}:{} ", row.get::<_, String>(0)));
    }
    out
}

fn setup(admin: &mut Client) -> (i64, i64) {
    admin
        .batch_execute(
            "DROP ROLE IF EXISTS pgb_app_a; DROP ROLE IF EXISTS pgb_app_b; DROP ROLE IF EXISTS pgb_reader_a;
             CREATE ROLE pgb_app_a LOGIN; CREATE ROLE pgb_app_b LOGIN; CREATE ROLE pgb_reader_a LOGIN;
             GRANT billing_app TO pgb_app_a, pgb_app_b; GRANT billing_reader TO pgb_reader_a;
             SELECT billing.grant_tenant('a', 'pgb_app_a'); SELECT billing.grant_tenant('b', 'pgb_app_b');
             SELECT billing.grant_tenant('a', 'pgb_reader_a');
             SET billing.tenant = 'b';
             SELECT billing.define_meter('ai', 'usd', unit_price => 2);
             SELECT billing.define_webhook_endpoint('hooks', 'stripe', 'whsec_b_secret');
             SELECT * FROM billing.define_plan('pro', '{\"usd\": {\"amount\": 500}}',
                                               '[{\"price_id\": \"price_b\", \"interval\": \"month\"}]');",
        )
        .unwrap();
    let mut b = login("pgb_app_b", "b");
    let grant: i64 = b
        .query_one(
            "SELECT grant_id FROM billing.grant('shared_name', 'usd', 1000, key => 'pay_b')",
            &[],
        )
        .unwrap()
        .get(0);
    b.batch_execute("SELECT * FROM billing.ingest('shared_name', 'ai', 3, key => 'evt_b')")
        .unwrap();
    let hold: i64 = b
        .query_one(
            "SELECT hold_id FROM billing.reserve('shared_name', 'usd', 100, key => 'hold_b')",
            &[],
        )
        .unwrap()
        .get(0);
    b.batch_execute("SELECT * FROM billing.receive_webhook('hooks', '{}', '{}')")
        .unwrap();
    b.batch_execute(&format!(
        "SELECT * FROM billing.sync_subscription('{SUBSCRIPTION_B}')"
    ))
    .unwrap();
    admin
        .batch_execute("SET billing.tenant = 'a'; SELECT billing.define_unit('usd');")
        .unwrap();
    let mut a = login("pgb_app_a", "a");
    a.batch_execute("SELECT * FROM billing.grant('shared_name', 'usd', 50, key => 'pay_a')")
        .unwrap();
    (grant, hold)
}

#[test]
fn tenant_a_cannot_read_or_change_tenant_b() {
    let mut admin = fresh_db(DB);
    let (b_grant, b_hold) = setup(&mut admin);
    let before = footprint_of_b(&mut admin);
    let mut a = login("pgb_app_a", "a");

    // Reading: no row of B through any table or view.
    for t in BILLING_TABLES {
        let r = match a.query_one(
            &format!("SELECT count(*) FROM billing.{t} WHERE tenant_id = 'b'"),
            &[],
        ) {
            Ok(row) => row.get::<_, i64>(0),
            Err(e) if sqlstate(&e).as_deref() == Some("42501") => 0, // not readable at all
            Err(e) => panic!("{t}: {e}"),
        };
        assert_eq!(r, 0, "{t} showed rows of tenant b");
    }
    for (view, probe) in [
        ("grant_balances", format!("grant_id = {b_grant}")),
        (
            "ledger",
            format!("grant_id = {b_grant} OR hold_id = {b_hold}"),
        ),
        ("webhook_endpoint_settings", "name = 'hooks'".to_string()),
    ] {
        let n: i64 = a
            .query_one(
                &format!("SELECT count(*) FROM billing.{view} WHERE {probe}"),
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{view} showed tenant b's {probe}");
    }
    let secret = attempt(&mut a, "SELECT secret FROM billing.webhook_endpoints");
    assert_eq!(secret, "42501", "webhook secrets are not readable");

    // Acting with B's ids, from tenant A: B's objects do not exist here.
    for call in [
        format!("SELECT * FROM billing.void_grant({b_grant})"),
        format!("SELECT * FROM billing.revoke_unused({b_grant})"),
        format!("SELECT * FROM billing.reverse_grant({b_grant}, 1)"),
        format!("SELECT * FROM billing.settle({b_hold}, 1)"),
        format!("SELECT * FROM billing.release({b_hold})"),
    ] {
        assert_eq!(attempt(&mut a, &call), "42704", "{call}");
    }
    // B's subscription object, from A: A has no plan for B's price, and B's
    // subscription, customer and plan credit stay B's.
    assert_eq!(
        attempt(
            &mut a,
            &format!("SELECT * FROM billing.sync_subscription('{SUBSCRIPTION_B}')")
        ),
        "22023"
    );
    // Same account name, same keys: tenant A's own namespace, nothing of B's.
    assert_eq!(
        attempt(
            &mut a,
            "SELECT * FROM billing.ingest('shared_name', 'usd', 1, key => 'evt_b', cost => 5)"
        ),
        "ok"
    );
    assert_eq!(
        attempt(
            &mut a,
            "SELECT * FROM billing.grant('shared_name', 'usd', 7, key => 'pay_b')"
        ),
        "ok"
    );
    let hook = a
        .query_one(
            "SELECT status || ':' || reason FROM billing.receive_webhook('hooks', '{}', '{}')",
            &[],
        )
        .unwrap()
        .get::<_, String>(0);
    assert_eq!(hook, "rejected:unknown endpoint", "B's endpoint is not A's");

    // Changing the setting reaches nothing.
    a.batch_execute("SET billing.tenant = 'b'").unwrap();
    for call in [
        "SELECT billing.current_tenant()",
        "SELECT * FROM billing.check('shared_name', 'usd')",
        "SELECT * FROM billing.balance('shared_name', 'usd')",
        "SELECT * FROM billing.grant('shared_name', 'usd', 1)",
        "SELECT * FROM billing.ingest('shared_name', 'usd', 1, key => 'x', cost => 1)",
        "SELECT * FROM billing.reserve('shared_name', 'usd', 1)",
        "SELECT count(*) FROM billing.grants",
        "SELECT count(*) FROM billing.ledger",
        "SELECT * FROM billing.verify_ledger()",
        "SELECT * FROM billing.receive_webhook('hooks', '{}', '{}')",
        "SELECT * FROM billing.sync_subscription('{}')",
        "SELECT count(*) FROM billing.subscription_status",
    ] {
        assert_eq!(attempt(&mut a, call), "42501", "{call} as tenant b");
    }
    a.batch_execute("SET billing.tenant = 'a'").unwrap();

    // No direct writes, no admin functions, no role switching.
    for t in BILLING_TABLES {
        for dml in [
            format!("INSERT INTO billing.{t} (tenant_id) VALUES ('b')"),
            format!("UPDATE billing.{t} SET tenant_id = 'a'"),
            format!("DELETE FROM billing.{t}"),
        ] {
            assert_eq!(attempt(&mut a, &dml), "42501", "{dml}");
        }
    }
    for call in [
        "SELECT billing.define_unit('x')",
        "SELECT billing.define_meter('x', 'usd')",
        "SELECT billing.set_floor('shared_name', 'usd', -1000000)",
        "SELECT billing.define_webhook_endpoint('mine', 'stripe', 's')",
        "SELECT billing.rotate_webhook_secret('hooks', 's')",
        "SELECT billing.register_webhook_handler('x', 'billing.sweep(integer)')",
        "SELECT billing.grant_tenant('b', 'pgb_app_a')",
        "SELECT billing.sweep()",
        "SELECT * FROM billing.define_plan('x', '{}')",
        "SELECT * FROM billing.retire_plan('pro')",
        "SET ROLE pgb_app_b",
        "SET ROLE billing_admin",
        "SET SESSION AUTHORIZATION pgb_app_b",
    ] {
        assert_eq!(attempt(&mut a, call), "42501", "{call}");
    }

    // A reader reads its tenant and writes nothing.
    let mut reader = login("pgb_reader_a", "a");
    assert_eq!(
        attempt(
            &mut reader,
            "SELECT * FROM billing.check('shared_name', 'usd')"
        ),
        "ok"
    );
    assert_eq!(
        attempt(&mut reader, "SELECT count(*) FROM billing.ledger"),
        "ok"
    );
    assert_eq!(
        attempt(
            &mut reader,
            "SELECT * FROM billing.ingest('shared_name', 'usd', 1, key => 'r', cost => 1)"
        ),
        "42501"
    );
    assert_eq!(
        attempt(
            &mut reader,
            "SELECT * FROM billing.grant('shared_name', 'usd', 1)"
        ),
        "42501"
    );

    assert_eq!(footprint_of_b(&mut admin), before, "tenant b changed");
    let b_balance: i64 = {
        admin.batch_execute("SET billing.tenant = 'b'").unwrap();
        admin
            .query_one(
                "SELECT balance FROM billing.check('shared_name', 'usd')",
                &[],
            )
            .unwrap()
            .get(0)
    };
    assert_eq!(
        b_balance,
        1000 + 500 - 6,
        "its top-up and its plan credit, less its usage"
    );
}
