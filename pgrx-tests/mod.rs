// The in-database test suites, run by `cargo pgrx test`. Each suite file holds a
// `#[pg_schema] mod tests`, the schema pgrx calls the tests in.

mod drain;
mod expiry;
mod gate;
mod grants;
mod history;
mod holds;
mod idempotency;
mod input;
pub mod support;
mod verify;
mod webhooks;
