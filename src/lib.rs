//! pg_billing: usage billing and prepaid credits inside PostgreSQL.
//!
//! The SQL surface lives in schema `billing`. Each domain has its own module;
//! every error leaves through [`error::BillingError`], which maps it to a SQLSTATE.

// pgrx needs each result row type spelled out inline in the #[pg_extern]
// signature (a type alias is not accepted), which clippy finds complex.
#![allow(clippy::type_complexity)]

use pgrx::prelude::*;

mod accounts;
mod allowances;
mod db;
mod direct;
mod error;
mod gate;
mod grants;
mod holds;
mod idempotency;
mod ingest;
mod input;
mod ledger;
mod limits;
mod metering;
mod metrics;
mod pricing;
mod quotes;
mod reloads;
mod reporting;
mod reversal;
mod rights;
mod signatures;
mod subscriptions;
mod tenancy;
mod time;
mod webhooks;
mod windows;

::pgrx::pg_module_magic!(name, version);

/// Runs when a backend first loads pg_billing: registers its settings.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    metrics::init();
    db::define_settings();
    pricing::watch_meter_changes();
    direct::watch_column_changes();
    webhooks::watch_function_changes();
}

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!(
    "../sql/webhooks.sql",
    name = "webhooks",
    requires = ["schema"]
);
extension_sql_file!(
    "../sql/subscriptions.sql",
    name = "subscriptions",
    requires = [
        "schema",
        "webhooks",
        "views",
        tenancy::current_tenant_sql,
        subscriptions::allowance_periods
    ]
);
extension_sql_file!(
    "../sql/views.sql",
    name = "views",
    requires = [
        "schema",
        "webhooks",
        tenancy::current_tenant_sql,
        reporting::grant_state
    ]
);
extension_sql_file!(
    "../sql/windows.sql",
    name = "windows",
    requires = ["schema"]
);
extension_sql_file!(
    "../sql/metering.sql",
    name = "metering",
    requires = ["schema", "views", tenancy::current_tenant_sql]
);
extension_sql_file!(
    "../sql/payments.sql",
    name = "payments",
    requires = ["schema", quotes::paid_credit, grants::grant_credits]
);
extension_sql_file!(
    "../sql/reloads.sql",
    name = "reloads",
    requires = [
        "schema",
        "subscriptions",
        "payments",
        tenancy::current_tenant_sql,
        reloads::unsplit_pool,
        quotes::quote,
        gate::check
    ]
);
extension_sql_file!(
    "../sql/alerts.sql",
    name = "alerts",
    requires = ["schema", tenancy::current_tenant_sql, reloads::unsplit_pool]
);
extension_sql_file!(
    "../sql/checkouts.sql",
    name = "checkouts",
    requires = [
        "schema",
        "payments",
        tenancy::current_tenant_sql,
        quotes::quote,
        accounts::account,
        gate::check
    ]
);
extension_sql_file!(
    "../sql/reconcile.sql",
    name = "reconcile",
    requires = [
        "schema",
        "webhooks",
        "payments",
        tenancy::current_tenant_sql
    ]
);
extension_sql_file!(
    "../sql/grant_controls.sql",
    name = "grant_controls",
    requires = [
        "schema",
        "subscriptions",
        tenancy::current_tenant_sql,
        tenancy::calling_role
    ]
);
extension_sql_file!(
    "../sql/metrics.sql",
    name = "metrics",
    requires = [
        "schema",
        "webhooks",
        "checkouts",
        "alerts",
        "grant_controls",
        metrics::usage_answers
    ]
);
extension_sql_file!("../sql/security.sql", name = "security", finalize);

/// The `#[pg_test]` suites, one file per rule, in pgrx-tests/.
#[cfg(any(test, feature = "pg_test"))]
#[path = "../pgrx-tests/mod.rs"]
mod pgrx_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    /// Each test runs in a transaction that is rolled back, on accounts,
    /// units and keys other tests use too: run in parallel (bin/test runs
    /// them one at a time), a test may wait for another's rows until that
    /// test ends, however long it runs. Lock waits have their own client
    /// test (tests/client/tests/lock_waits.rs).
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["billing.lock_timeout = 0"]
    }
}
