//! README, "Sharding with PL/Proxy": three shard clusters, each running
//! pg_billing, behind a router database (router/router.sql and the generated
//! router/functions.sql) that sends each `billing.*` call to the shard of its
//! account. Through the router: the quickstart's flows, catalogue changes on
//! every shard, calls by id on the shard that holds the object (ids are
//! unique across shards), Stripe deliveries on the shard of the account their
//! payload names or whose payment they report, tenants kept apart, and
//! concurrent strict debits that never overspend; then every shard's ledger
//! verifies.
//!
//! The test starts clusters of its own, so `bin/test` runs it through
//! `bin/router-test` (not with the other client tests): `cargo test -p
//! pg_billing_client_tests --test router -- --ignored`. ROUTER_SESSIONS (16)
//! and ROUTER_ACCOUNTS (6) make the concurrent part longer.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use pg_billing_client_tests::cluster::Cluster;
use pg_billing_client_tests::{
    repo_file, run_sessions, sqlstate, stripe_fixture, stripe_headers, unix_now, Rng,
};
use postgres::{Client, NoTls};
use serde_json::{json, Value};

const DIR: &str = "/tmp/pg_billing_router_test";
const ROUTER_PORT: u16 = 28880;
const SHARDS: u16 = 3;
const SECRET: &str = "whsec_router";
const FUNDS: i64 = 10_000;

struct Deployment {
    router: Cluster,
    shards: Vec<Cluster>,
}

/// The roles of the test, on every cluster (roles are per cluster).
const ROLES: &str = "CREATE ROLE app_acme LOGIN IN ROLE billing_app;
                     CREATE ROLE app_globex LOGIN IN ROLE billing_app;
                     CREATE ROLE ops LOGIN IN ROLE billing_admin;";

fn deploy() -> Deployment {
    let mut connstrs = Vec::new();
    let mut shards = Vec::new();
    for i in 0..SHARDS {
        let port = ROUTER_PORT + 1 + i;
        let shard = Cluster::create(format!("{DIR}/shard{i}"), port);
        shard
            .connect("postgres")
            .batch_execute("CREATE DATABASE app")
            .unwrap();
        let mut c = shard.connect("app");
        c.batch_execute("CREATE EXTENSION pg_billing").unwrap();
        c.batch_execute(&repo_file("router/shard.sql")).unwrap();
        c.batch_execute(&format!("SELECT billing_router.number_shard({i}); {ROLES}"))
            .unwrap();
        connstrs.push(format!("'host=127.0.0.1 port={port} dbname=app'"));
        shards.push(shard);
    }
    let router = Cluster::create(format!("{DIR}/router"), ROUTER_PORT);
    router
        .connect("postgres")
        .batch_execute("CREATE DATABASE app")
        .unwrap();
    let mut r = router.connect("app");
    r.batch_execute(&repo_file("router/router.sql")).unwrap();
    r.batch_execute(&repo_file("router/functions.sql")).unwrap();
    r.batch_execute(ROLES).unwrap();
    r.batch_execute(&format!(
        "SELECT * FROM billing_router.set_shards(ARRAY[{}])",
        connstrs.join(", ")
    ))
    .unwrap();
    Deployment { router, shards }
}

impl Deployment {
    fn router_as(&self, role: &str, tenant: &str) -> Client {
        let mut c = Client::connect(
            &format!(
                "host=127.0.0.1 port={} user={role} dbname=app",
                self.router.port
            ),
            NoTls,
        )
        .unwrap();
        c.batch_execute(&format!("SET billing.tenant = '{tenant}'"))
            .unwrap();
        c
    }

    /// The shard (0-based) the router places an account of `tenant` on.
    fn shard_of(&self, tenant: Option<&str>, account: &str) -> usize {
        let shard: i32 = self
            .router
            .connect("app")
            .query_one(
                "SELECT billing_router.shard_of(billing_router.partition_of($1, $2))",
                &[&tenant, &account],
            )
            .unwrap()
            .get(0);
        shard as usize
    }

    /// One figure read straight from each shard, as its superuser.
    fn per_shard(&self, sql: &str) -> Vec<i64> {
        self.shards
            .iter()
            .map(|s| s.connect("app").query_one(sql, &[]).unwrap().get(0))
            .collect()
    }

    fn assert_ledgers_verify(&self) {
        for (i, s) in self.shards.iter().enumerate() {
            let mut c = s.connect("app");
            let tenants: Vec<String> = c
                .query("SELECT DISTINCT tenant_id FROM billing.pools", &[])
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            assert!(!tenants.is_empty(), "shard {i} holds pools");
            for t in tenants {
                c.batch_execute(&format!("SET billing.tenant = '{t}'"))
                    .unwrap();
                let problems: Vec<String> = c
                    .query("SELECT problem FROM billing.verify_ledger()", &[])
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                assert_eq!(problems, Vec::<String>::new(), "shard {i}, tenant {t}");
            }
        }
    }
}

/// An account name of `tenant` that the router places on shard `want`.
fn account_on(d: &Deployment, tenant: Option<&str>, prefix: &str, want: usize) -> String {
    (0..1000)
        .map(|i| format!("{prefix}_{i}"))
        .find(|a| d.shard_of(tenant, a) == want)
        .expect("an account on that shard")
}

/// Stripe's example event around `object`, as it is delivered now.
fn event(id: &str, kind: &str, object: Value) -> String {
    let mut e = stripe_fixture("event");
    e["id"] = json!(id);
    e["type"] = json!(kind);
    e["created"] = json!(unix_now());
    e["data"] = json!({ "object": object });
    e.to_string()
}

fn deliver(c: &mut Client, body: &str, headers: &str) -> (String, Option<String>) {
    let row = c
        .query_one(
            "SELECT status, reason FROM billing.receive_webhook('stripe', $1::text::jsonb, $2)",
            &[&headers, &body],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

fn available(c: &mut Client, account: &str, unit: &str) -> i64 {
    c.query_one(
        "SELECT available FROM billing.\"check\"($1, $2)",
        &[&account, &unit],
    )
    .unwrap()
    .get(0)
}

#[test]
#[ignore = "starts four clusters of its own: run by bin/router-test"]
fn billing_through_a_router_over_three_shards() {
    let d = deploy();
    let mut ops = d.router_as("postgres", "default");
    setup_refusals(&d);

    // catalogue changes reach every shard
    ops.batch_execute(
        "SELECT billing.define_unit('usd_mills', 'mills');
         SELECT billing.define_unit('ai_requests', 'requests');
         SELECT billing.define_meter('ai_cost', 'usd_mills');
         SELECT billing.define_meter('image_gen', 'usd_mills', unit_price => 12);",
    )
    .unwrap();
    assert_eq!(
        d.per_shard("SELECT count(*) FROM billing.meters"),
        vec![2; SHARDS as usize]
    );

    quickstart(&d, &mut ops);
    calls_by_id(&d, &mut ops);
    batches_across_shards(&d, &mut ops);
    webhooks(&d, &mut ops);
    standard_webhooks(&d, &mut ops);
    subscriptions(&d, &mut ops);
    two_accounts(&d, &mut ops);
    tenants(&d, &mut ops);
    zero_overspend(&d, &mut ops);

    let gathered: i64 = ops
        .query_one("SELECT count(*) FROM billing.verify_ledger()", &[])
        .unwrap()
        .get(0);
    assert_eq!(gathered, 0, "verify_ledger through the router");
    d.assert_ledgers_verify();
}

/// The router's own setup refuses what would misplace accounts, and writes
/// nothing: placing partitions again, no shard at all, a shard number out of
/// range.
fn setup_refusals(d: &Deployment) {
    let mut r = d.router.connect("app");
    for (sql, state) in [
        (
            "SELECT * FROM billing_router.set_shards(ARRAY['host=127.0.0.1 port=1 dbname=app'])",
            "55000",
        ),
        ("SELECT * FROM billing_router.set_shards('{}')", "22023"),
    ] {
        let e = r.query(sql, &[]).unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some(state), "{sql}: {e}");
    }
    let placed: i64 = r
        .query_one("SELECT count(*) FROM billing_router.partitions", &[])
        .unwrap()
        .get(0);
    assert_eq!(placed, 64);
    let mut shard = d.shards[1].connect("app");
    for n in ["-1", "32767", "NULL"] {
        let e = shard
            .query_one(&format!("SELECT billing_router.number_shard({n})"), &[])
            .unwrap_err();
        assert_eq!(
            sqlstate(&e).as_deref(),
            Some("22023"),
            "number_shard({n}): {e}"
        );
    }
    let renumbered: i32 = shard
        .query_one("SELECT billing_router.number_shard(1)", &[])
        .unwrap()
        .get(0);
    assert_eq!(renumbered, 0, "numbering again changes nothing");
}

/// The quickstart's flows for one account, answered as on one server.
fn quickstart(d: &Deployment, c: &mut Client) {
    let home = d.shard_of(None, "org_42");
    c.batch_execute(
        "SELECT * FROM billing.grant('org_42', 'usd_mills', 10000, kind => 'plan', key => 'sub_1:2026-11',
                                     expires_at => now() + interval '1 month');
         SELECT * FROM billing.grant('org_42', 'usd_mills', 5000, kind => 'promo', key => 'welcome-promo',
                                     expires_at => now() + interval '14 days');
         SELECT * FROM billing.grant('org_42', 'usd_mills', 25000, kind => 'topup', key => 'pi_3Q_demo');",
    )
    .unwrap();
    let grants = d.per_shard("SELECT count(*) FROM billing.grants WHERE account = 'org_42'");
    let mut expected = vec![0; SHARDS as usize];
    expected[home] = 3;
    assert_eq!(grants, expected, "org_42's grants are on its shard only");

    let gate = c
        .query_one(
            "SELECT allowed, available FROM billing.\"check\"('org_42', 'usd_mills', 1200)",
            &[],
        )
        .unwrap();
    assert_eq!(
        (gate.get::<_, bool>(0), gate.get::<_, i64>(1)),
        (true, 40_000)
    );

    // drains the plan first, then the promo; a retried key is charged once
    let drained: i32 = c
        .query_one(
            "SELECT jsonb_array_length(drains)::int FROM billing.ingest('org_42', 'ai_cost', 1, key => 'openai:req_001', cost => 9500)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(drained, 1, "the plan alone pays it");
    for _ in 0..2 {
        c.query_one(
            "SELECT 1 FROM billing.ingest('org_42', 'ai_cost', 1, key => 'openai:req_002', cost => 1187)",
            &[],
        )
        .unwrap();
    }
    c.query_one(
        "SELECT 1 FROM billing.ingest('org_42', 'image_gen', 3, key => 'img:777')",
        &[],
    )
    .unwrap();
    assert_eq!(
        available(c, "org_42", "usd_mills"),
        40_000 - 9500 - 1187 - 36
    );

    // a hold and its settlement: the settle goes by hold id to org_42's shard
    let hold: i64 = c
        .query_one(
            "SELECT hold_id FROM billing.reserve('org_42', 'usd_mills', 3000, key => 'stream:abc')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(hold >> 48, home as i64, "ids carry their shard's range");
    let held: i64 = c
        .query_one(
            "SELECT held FROM billing.balance('org_42', 'usd_mills')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(held, 3000);
    let settled: String = c
        .query_one("SELECT status FROM billing.settle($1, 2210)", &[&hold])
        .unwrap()
        .get(0);
    assert_eq!(settled, "settled");
    let after = 40_000 - 9500 - 1187 - 36 - 2210;
    assert_eq!(available(c, "org_42", "usd_mills"), after);

    // strict refuses with the shard's own SQLSTATE and writes nothing
    let e = c
        .query_one(
            "SELECT 1 FROM billing.ingest('org_42', 'ai_cost', 1, key => 'openai:req_huge', cost => 999999, strict => true)",
            &[],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("23514"), "{e}");
    assert_eq!(available(c, "org_42", "usd_mills"), after);
    assert_eq!(
        d.per_shard("SELECT count(*) FROM billing.usage_events WHERE key = 'openai:req_huge'"),
        vec![0; SHARDS as usize]
    );

    // a free tier and a per-member limit
    c.batch_execute(
        "SELECT * FROM billing.set_allowance('user_7', 'ai_requests', 20, every => 'day')",
    )
    .unwrap();
    let left: i64 = c
        .query_one(
            "SELECT available FROM billing.ingest('user_7', 'ai_requests', 1, key => 'req_1', strict => true)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 19);
    c.batch_execute(
        "SELECT * FROM billing.set_limit('org_42', 'usd_mills', 'member_daily', 2000, per_member => true)",
    )
    .unwrap();
    let reason: String = c
        .query_one(
            "SELECT reason FROM billing.\"check\"('org_42', 'usd_mills', 2500, member => 'ana')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(reason, "limit:member_daily");
    let lines: i64 = c
        .query_one(
            "SELECT count(*) FROM billing.invoice_preview('org_42') WHERE kind = 'usage'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(lines >= 2, "usage lines of ai_cost and image_gen");
}

/// Calls that name an object by id alone run on the shard that holds it; an id
/// no shard holds is pg_billing's own 42704.
fn calls_by_id(d: &Deployment, c: &mut Client) {
    let far = account_on(
        d,
        None,
        "voided",
        (d.shard_of(None, "") + 1) % SHARDS as usize,
    );
    let grant: i64 = c
        .query_one(
            "SELECT grant_id FROM billing.grant($1, 'usd_mills', 700, kind => 'promo', key => 'g:' || $1)",
            &[&far],
        )
        .unwrap()
        .get(0);
    let voided = c
        .query_one(
            "SELECT status, removed FROM billing.void_grant($1)",
            &[&grant],
        )
        .unwrap();
    assert_eq!(
        (voided.get::<_, String>(0), voided.get::<_, i64>(1)),
        ("voided".into(), 700)
    );
    assert_eq!(available(c, &far, "usd_mills"), 0);
    let e = c
        .query_one("SELECT 1 FROM billing.void_grant(4242)", &[])
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42704"), "{e}");
}

/// A batch over accounts of every shard: each shard ingests its own events,
/// and the rows come back in input order.
fn batches_across_shards(d: &Deployment, c: &mut Client) {
    let accounts: Vec<String> = (0..SHARDS as usize)
        .map(|s| account_on(d, None, "batch", s))
        .collect();
    for a in &accounts {
        c.query_one(
            "SELECT 1 FROM billing.grant($1, 'usd_mills', 1000, kind => 'topup', key => 'fund:' || $1)",
            &[a],
        )
        .unwrap();
    }
    let events: Vec<Value> = (0..30)
        .map(|i| {
            json!({"account": accounts[i % accounts.len()], "meter": "ai_cost", "quantity": 1,
                   "key": format!("batch:{i}"), "cost": i + 1})
        })
        .collect();
    let batch = Value::Array(events).to_string();
    let rows = c
        .query(
            "SELECT key, status, cost FROM billing.ingest_batch($1::text::jsonb)",
            &[&batch],
        )
        .unwrap();
    let got: Vec<(String, String, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let want: Vec<(String, String, i64)> = (0..30)
        .map(|i| (format!("batch:{i}"), "applied".into(), i as i64 + 1))
        .collect();
    assert_eq!(got, want);
    for (s, a) in accounts.iter().enumerate() {
        let spent: i64 = (0..30)
            .filter(|i| i % SHARDS as usize == s)
            .map(|i| i + 1)
            .sum::<usize>() as i64;
        assert_eq!(available(c, a, "usd_mills"), 1000 - spent, "{a}");
    }
    let replay = c
        .query(
            "SELECT DISTINCT status FROM billing.ingest_batch($1::text::jsonb)",
            &[&batch],
        )
        .unwrap();
    assert_eq!(replay.len(), 1);
    assert_eq!(replay[0].get::<_, String>(0), "duplicate");
    let e = c
        .query(
            "SELECT * FROM billing.ingest_batch('[{\"meter\": \"ai_cost\"}]')",
            &[],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("22023"), "{e}");
}

/// Signed Stripe deliveries (Stripe's example objects): a payment lands on the
/// shard of the account it names; its refund, which names only the payment,
/// follows it there; a forged delivery is kept, rejected, on the tenant's home
/// shard.
fn webhooks(d: &Deployment, c: &mut Client) {
    c.batch_execute(&format!(
        "SELECT billing.define_webhook_endpoint('stripe', 'stripe', '{SECRET}', credit_unit => 'usd_mills',
                                                credits_per_minor_unit => 10)"
    ))
    .unwrap();
    let home = d.shard_of(None, "");
    let buyer = account_on(d, None, "buyer", (home + 1) % SHARDS as usize);
    let mut session = stripe_fixture("checkout_session");
    for (k, v) in [
        ("id", json!("cs_router_1")),
        ("payment_intent", json!("pi_router_1")),
        ("amount_total", json!(500)),
        ("currency", json!("usd")),
        ("payment_status", json!("paid")),
        ("status", json!("complete")),
        ("mode", json!("payment")),
        ("client_reference_id", json!(buyer)),
        ("metadata", json!({})),
    ] {
        session[k] = v;
    }
    let paid = event("evt_router_paid", "checkout.session.completed", session);
    let headers = stripe_headers(&paid, SECRET);
    assert_eq!(deliver(c, &paid, &headers).0, "applied");
    assert_eq!(deliver(c, &paid, &headers).0, "duplicate");
    assert_eq!(available(c, &buyer, "usd_mills"), 5000);

    let mut charge = stripe_fixture("charge");
    for (k, v) in [
        ("id", json!("ch_router_1")),
        ("payment_intent", json!("pi_router_1")),
        ("amount", json!(500)),
        ("amount_captured", json!(500)),
        ("amount_refunded", json!(200)),
        ("refunded", json!(false)),
        ("currency", json!("usd")),
        ("metadata", json!({})),
    ] {
        charge[k] = v;
    }
    let refund = event("evt_router_refund", "charge.refunded", charge);
    let (status, reason) = deliver(c, &refund, &stripe_headers(&refund, SECRET));
    assert_eq!(status, "applied", "{reason:?}");
    assert_eq!(available(c, &buyer, "usd_mills"), 3000);
    let mut expected = vec![0; SHARDS as usize];
    expected[(home + 1) % SHARDS as usize] = 2;
    assert_eq!(
        d.per_shard("SELECT count(*) FROM billing.webhook_events WHERE status = 'applied'"),
        expected,
        "both deliveries applied on the buyer's shard"
    );

    let (status, _) = deliver(c, &paid, &stripe_headers(&paid, "whsec_forged"));
    assert_eq!(status, "rejected");
    let mut expected = vec![0; SHARDS as usize];
    expected[home] = 1;
    assert_eq!(
        d.per_shard("SELECT count(*) FROM billing.webhook_events WHERE status = 'rejected'"),
        expected,
        "the forged delivery is kept on the home shard"
    );
}

/// The headers of a Standard Webhooks delivery of `body` (webhook-id,
/// webhook-timestamp, webhook-signature: v1,<base64 HMAC-SHA256 of
/// "id.timestamp.body" under the secret's base64 key after "whsec_">).
fn standard_headers(id: &str, body: &str, secret: &str) -> String {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.decode(secret.trim_start_matches("whsec_")).unwrap();
    let t = unix_now();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{t}.{body}").as_bytes());
    let sig = b64.encode(mac.finalize().into_bytes());
    json!({"webhook-id": id, "webhook-timestamp": t.to_string(), "webhook-signature": format!("v1,{sig}")})
        .to_string()
}

/// A Standard Webhooks delivery (an application's own events and handler,
/// registered through the router on every shard) goes to the shard of the
/// account its data names.
fn standard_webhooks(d: &Deployment, c: &mut Client) {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    for s in &d.shards {
        s.connect("app")
            .batch_execute(
                "CREATE FUNCTION public.credit_added(ev billing.webhook_events) RETURNS jsonb LANGUAGE sql AS $$
                     SELECT to_jsonb(g) FROM billing.\"grant\"(ev.payload #>> '{data,account}', 'usd_mills',
                         (ev.payload #>> '{data,amount}')::bigint, kind => 'topup',
                         key => 'std:' || ev.provider_event_id) g $$",
            )
            .unwrap();
    }
    c.batch_execute(&format!(
        "SELECT billing.define_webhook_endpoint('app', 'standard', '{secret}');
         SELECT billing.register_webhook_handler('credit.added', 'public.credit_added(billing.webhook_events)', 'app');"
    ))
    .unwrap();
    let home = d.shard_of(None, "");
    let owner = account_on(d, None, "std", (home + 1) % SHARDS as usize);
    let body = json!({"type": "credit.added", "timestamp": "2026-11-29T20:00:00Z",
                      "data": {"account": owner, "amount": 250}})
    .to_string();
    let row = c
        .query_one(
            "SELECT status, reason FROM billing.receive_webhook('app', $1::text::jsonb, $2)",
            &[&standard_headers("msg_router_1", &body, secret), &body],
        )
        .unwrap();
    assert_eq!(
        row.get::<_, String>(0),
        "applied",
        "{:?}",
        row.get::<_, Option<String>>(1)
    );
    assert_eq!(available(c, &owner, "usd_mills"), 250);
    let mut expected = vec![0; SHARDS as usize];
    expected[(home + 1) % SHARDS as usize] = 1;
    assert_eq!(
        d.per_shard("SELECT count(*) FROM billing.webhook_events WHERE endpoint = 'app' AND status = 'applied'"),
        expected,
        "applied on the shard of the account the data names"
    );
}

/// Stripe's subscription object, for `account` (named in its metadata or not).
fn subscription(id: &str, customer: &str, metadata: Value, status: &str) -> Value {
    let now = unix_now() as i64;
    let mut s = stripe_fixture("subscription");
    for (k, v) in [
        ("id", json!(id)),
        ("status", json!(status)),
        ("customer", json!(customer)),
        ("metadata", metadata),
        ("cancel_at", Value::Null),
        ("canceled_at", Value::Null),
        ("ended_at", Value::Null),
        ("cancel_at_period_end", json!(false)),
        ("trial_start", Value::Null),
        ("trial_end", Value::Null),
        ("pause_collection", Value::Null),
    ] {
        s[k] = v;
    }
    let item = &mut s["items"]["data"][0];
    item["price"]["id"] = json!("price_basic_m");
    item["plan"]["id"] = json!("price_basic_m");
    item["quantity"] = json!(1);
    item["current_period_start"] = json!(now - 60);
    item["current_period_end"] = json!(now + 30 * 86_400);
    item["subscription"] = json!(id);
    s
}

/// A polled subscription goes to the shard of the account it names; a later
/// poll that names only its customer, and an invoice that names only the
/// subscription, follow it there.
fn subscriptions(d: &Deployment, c: &mut Client) {
    c.batch_execute(
        r#"SELECT * FROM billing.define_plan('basic', '{"usd_mills": {"amount": 1000}}',
                                           '[{"price_id": "price_basic_m", "interval": "month", "amount": 2000}]')"#,
    )
    .unwrap();
    let home = d.shard_of(None, "");
    let owner = account_on(d, None, "subscriber", (home + 2) % SHARDS as usize);
    let sync = |c: &mut Client, s: &Value| -> (String, String) {
        let row = c
            .query_one(
                "SELECT outcome, account FROM billing.sync_subscription($1::text::jsonb)",
                &[&s.to_string()],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    let first = subscription(
        "sub_router_1",
        "cus_router_1",
        json!({"account": owner}),
        "active",
    );
    assert_eq!(sync(c, &first), ("created".into(), owner.clone()));
    assert_eq!(available(c, &owner, "usd_mills"), 1000, "the plan's credit");
    let later = subscription("sub_router_1", "cus_router_1", json!({}), "past_due");
    assert_eq!(sync(c, &later), ("updated".into(), owner.clone()));
    let mut invoice = stripe_fixture("invoice");
    for (k, v) in [
        ("id", json!("in_router_1")),
        ("status", json!("open")),
        ("amount_paid", json!(0)),
        ("customer", json!("cus_other")),
        ("subscription", Value::Null),
        (
            "parent",
            json!({"type": "subscription_details", "quote_details": null,
                   "subscription_details": {"subscription": "sub_router_1", "metadata": {}}}),
        ),
    ] {
        invoice[k] = v;
    }
    let subscription_of: String = c
        .query_one(
            "SELECT subscription FROM billing.sync_invoice($1::text::jsonb)",
            &[&invoice.to_string()],
        )
        .unwrap()
        .get(0);
    assert_eq!(subscription_of, "sub_router_1");
    let mut expected = vec![0; SHARDS as usize];
    expected[(home + 2) % SHARDS as usize] = 1;
    assert_eq!(
        d.per_shard("SELECT count(*) FROM billing.subscriptions"),
        expected
    );
}

/// convert_guest moves a guest's allowance to an account in one transaction:
/// only when both are on one shard.
fn two_accounts(d: &Deployment, c: &mut Client) {
    let guest = account_on(d, None, "guest", 0);
    let member = account_on(d, None, "member", 0);
    let elsewhere = account_on(d, None, "member", 1);
    c.query_one(
        "SELECT 1 FROM billing.set_allowance($1, 'ai_requests', 5, every => 'never')",
        &[&guest],
    )
    .unwrap();
    let e = c
        .query(
            "SELECT * FROM billing.convert_guest($1, $2)",
            &[&guest, &elsewhere],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{e}");
    let status: String = c
        .query_one(
            "SELECT status FROM billing.convert_guest($1, $2)",
            &[&guest, &member],
        )
        .unwrap()
        .get(0);
    assert_eq!(status, "converted");
    assert_eq!(
        available(c, &member, "ai_requests"),
        5,
        "the guest's allowance moved"
    );
}

/// Each call acts on the shard for the tenant the router session set, and the
/// shard decides whether the calling role may.
fn tenants(d: &Deployment, ops: &mut Client) {
    ops.batch_execute(
        "SELECT billing.grant_tenant('acme', 'app_acme'); SELECT billing.grant_tenant('globex', 'app_globex');",
    )
    .unwrap();
    let mut acme = d.router_as("app_acme", "acme");
    acme.batch_execute(
        "SELECT * FROM billing.grant('org_1', 'usd_mills', 300, kind => 'topup', key => 'acme:1')",
    )
    .unwrap();
    assert_eq!(available(&mut acme, "org_1", "usd_mills"), 300);
    let shard = d.shard_of(Some("acme"), "org_1");
    let tenants: Vec<String> = d.shards[shard]
        .connect("app")
        .query(
            "SELECT DISTINCT tenant_id FROM billing.grants WHERE account = 'org_1'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tenants, vec!["acme".to_string()]);

    let mut intruder = d.router_as("app_globex", "acme");
    let e = intruder
        .query_one(
            "SELECT available FROM billing.\"check\"('org_1', 'usd_mills')",
            &[],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{e}");
    // units are a tenant's own: globex has none yet
    let mut globex = d.router_as("app_globex", "globex");
    let e = globex
        .query_one(
            "SELECT available FROM billing.\"check\"('org_1', 'usd_mills')",
            &[],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42704"), "{e}");
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sessions through the router debit accounts on every shard with strict
/// debits until each refuses: what each account accepted never exceeds its
/// funds, and is exactly what its shard debited.
fn zero_overspend(d: &Deployment, c: &mut Client) {
    let sessions = env_or("ROUTER_SESSIONS", 16);
    let n = env_or("ROUTER_ACCOUNTS", 6).max(SHARDS as usize);
    let accounts: Vec<String> = (0..n)
        .map(|i| account_on(d, None, &format!("hot{i}"), i % SHARDS as usize))
        .collect();
    for a in &accounts {
        c.query_one(
            "SELECT 1 FROM billing.grant($1, 'usd_mills', $2, kind => 'topup', key => 'fund:' || $1)",
            &[a, &FUNDS],
        )
        .unwrap();
    }
    let port = d.router.port;
    let shared = accounts.clone();
    let tallies = run_sessions(sessions, move |id, start: &Barrier| {
        let mut c = Client::connect(
            &format!("host=127.0.0.1 port={port} user=postgres dbname=app"),
            NoTls,
        )
        .unwrap();
        let mut rng = Rng::new(id as u64 + 11);
        let mut accepted = vec![0i64; shared.len()];
        let mut refused = vec![0u32; shared.len()];
        start.wait();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut k = 0;
        while refused.iter().any(|&r| r < 2) {
            assert!(
                Instant::now() < deadline,
                "the accounts did not run dry in 120 s"
            );
            k += 1;
            let i = rng.range(0, shared.len() as i64 - 1) as usize;
            let cost = rng.range(1, 60);
            let r = c.query_one(
                "SELECT status FROM billing.ingest($1, 'ai_cost', 1, key => $2, cost => $3, strict => true)",
                &[&shared[i], &format!("s{id}:{k}"), &cost],
            );
            match r {
                Ok(row) => {
                    assert_eq!(row.get::<_, String>(0), "applied");
                    accepted[i] += cost;
                }
                Err(e) if sqlstate(&e).as_deref() == Some("23514") => refused[i] += 1,
                Err(e) => panic!("ingest through the router: {e}"),
            }
        }
        accepted
    });
    for (i, a) in accounts.iter().enumerate() {
        let total: i64 = tallies.iter().map(|t| t[i]).sum();
        assert!(total <= FUNDS, "{a}: accepted {total} of {FUNDS}");
        assert!(total > FUNDS - 60, "{a}: ran dry at {total} of {FUNDS}");
        assert_eq!(available(c, a, "usd_mills"), FUNDS - total, "{a}");
    }
    let events = d.per_shard("SELECT count(*) FROM billing.usage_events WHERE key LIKE 's%:%'");
    assert!(
        events.iter().all(|&e| e > 0),
        "every shard took debits: {events:?}"
    );
}
