// The in-database test suites, run by `cargo pgrx test`. Each suite file holds a
// `#[pg_schema] mod tests`, the schema pgrx calls the tests in.

mod alerts;
mod allowances;
mod checkouts;
mod default_plan;
mod drain;
mod expiry;
mod gate;
mod grant_controls;
mod grants;
mod history;
mod holds;
mod idempotency;
mod input;
mod lanes;
mod limits;
mod metering;
mod metrics;
mod nulls;
mod quotes;
mod reconcile;
mod reloads;
mod reversals;
mod stripe;
mod stripe_money;
mod subscriptions;
pub mod support;
mod suspension;
mod usage;
mod verify;
mod webhook_hardening;
mod webhooks;
