//! Helpers for client-level tests: each test gets its own fresh database with
//! pg_billing installed, on the server named by `PG_BILLING_TEST_DSN`
//! (bin/test starts one). Tests talk to it over real connections.

pub mod cluster;

use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use postgres::{Client, NoTls};
use sha2::Sha256;

/// The server to test against, without a database name.
pub fn dsn() -> String {
    std::env::var("PG_BILLING_TEST_DSN").expect(
        "PG_BILLING_TEST_DSN is not set: run the client tests through bin/test, which starts a server",
    )
}

pub fn connect(db: &str) -> Client {
    Client::connect(&format!("{} dbname={db}", dsn()), NoTls)
        .unwrap_or_else(|e| panic!("connect to {db}: {e}"))
}

/// Drop and recreate `db` with pg_billing installed; returns a connection to it.
pub fn fresh_db(db: &str) -> Client {
    let mut admin = connect("postgres");
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .expect("drop database");
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .expect("create database");
    let mut c = connect(db);
    c.batch_execute("CREATE EXTENSION pg_billing")
        .expect("create extension");
    c
}

/// docs/architecture.md, rule 8, checked by the extension itself: no row means consistent.
pub fn ledger_problems(c: &mut Client) -> Vec<String> {
    c.query("SELECT problem FROM billing.verify_ledger()", &[])
        .expect("verify_ledger")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A connection to `db` as login role `role`, acting for `tenant`.
pub fn login(db: &str, role: &str, tenant: &str) -> Client {
    let mut c = Client::connect(&format!("{} dbname={db} user={role}", dsn()), NoTls)
        .unwrap_or_else(|e| panic!("login {role}: {e}"));
    c.batch_execute(&format!("SET billing.tenant = '{tenant}'"))
        .unwrap();
    c
}

/// Run `sql`: "ok", or the SQLSTATE it failed with. A lost connection (a
/// crashed backend) panics.
pub fn attempt(c: &mut Client, sql: &str) -> String {
    match c.batch_execute(sql) {
        Ok(()) => "ok".into(),
        Err(e) => {
            sqlstate(&e).unwrap_or_else(|| panic!("{sql}: no SQLSTATE (backend crashed?): {e}"))
        }
    }
}

/// Seconds since the Unix epoch, as providers stamp their events.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The `Stripe-Signature` header Stripe sends with `body`, signed now with
/// `secret`: `t=<time>,v1=<hex HMAC-SHA256 of "<time>.<body>">`.
pub fn stripe_signature(body: &str, secret: &str) -> String {
    let t = unix_now();
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The headers of a Stripe delivery of `body`, as JSON text.
pub fn stripe_headers(body: &str, secret: &str) -> String {
    serde_json::json!({ "Stripe-Signature": stripe_signature(body, secret) }).to_string()
}

/// A file of the repository, by its path from the repository's root.
pub fn repo_file(path: &str) -> String {
    let full = format!("{}/../../{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {full}: {e}"))
}

/// Stripe's own example object `name` (tests/fixtures/stripe/NAME.json),
/// every field as Stripe sends it; a test sets the fields it is about.
pub fn stripe_fixture(name: &str) -> serde_json::Value {
    serde_json::from_str(&repo_file(&format!("tests/fixtures/stripe/{name}.json")))
        .unwrap_or_else(|e| panic!("tests/fixtures/stripe/{name}.json: {e}"))
}

/// SQLSTATE of a failed statement, if the server sent one.
pub fn sqlstate(e: &postgres::Error) -> Option<String> {
    e.code().map(|c| c.code().to_string())
}

/// A small deterministic generator, so runs are reproducible by seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in lo..=hi.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as i64
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// Every table of the billing schema, for tests that sweep them all.
pub const BILLING_TABLES: &[&str] = &[
    "accounts",
    "units",
    "meters",
    "pools",
    "grants",
    "usage_events",
    "holds",
    "ledger_entries",
    "webhook_endpoints",
    "webhook_events",
    "webhook_objects",
    "webhook_handlers",
    "stripe_reversals",
    "tenant_roles",
    "meter_prices",
    "meter_periods",
    "meter_uniques",
    "usage_counters",
    "allowances",
    "limits",
    "limit_usage",
    "guest_conversions",
    "usage_reports",
    "limit_holds",
    "webhook_currencies",
    "plans",
    "plan_keys",
    "plan_prices",
    "provider_customers",
    "subscriptions",
    "subscription_conflicts",
    "subscription_allowances",
    "subscription_invoices",
    "seats",
    "seat_pushes",
    "subscription_changes",
    "invoice_payments",
    "default_plans",
    "topup_fees",
    "topup_limits",
    "reload_rules",
    "reload_requests",
    "checkout_intents",
    "alert_rules",
    "alerts",
    "grant_policies",
    "granted_per_day",
    "grant_approvals",
];

/// Run `n` sessions at once, each on its own thread and connection, released
/// together by a barrier so they really overlap; returns their results in order.
pub fn run_sessions<T, F>(n: usize, session: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize, &std::sync::Barrier) -> T + Send + Sync + 'static,
{
    let start = std::sync::Arc::new(std::sync::Barrier::new(n));
    let session = std::sync::Arc::new(session);
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (start, session) = (start.clone(), session.clone());
            std::thread::spawn(move || session(i, &start))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("session panicked"))
        .collect()
}
