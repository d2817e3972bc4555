// Helpers shared by the #[pg_test] suites. Each test runs inside one
// transaction, so now() is fixed for its whole duration; `travel` moves a
// pool's timestamps back to simulate the clock moving forward.

use pgrx::prelude::*;

/// Run a statement, panicking with the database's message if it fails.
pub fn run(sql: &str) {
    Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
}

pub fn one<T: FromDatum + IntoDatum>(sql: &str) -> T {
    Spi::get_one::<T>(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .unwrap_or_else(|| panic!("{sql}: returned NULL"))
}

pub fn opt<T: FromDatum + IntoDatum>(sql: &str) -> Option<T> {
    Spi::get_one::<T>(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The SQLSTATE a statement fails with (its writes rolled back), or None.
pub fn sqlstate(sql: &str) -> Option<String> {
    // created once per session, so that it also works after SET ROLE
    run(
        "DO $d$ BEGIN IF to_regprocedure('pg_temp.sqlstate_of(text)') IS NULL THEN \
         CREATE FUNCTION pg_temp.sqlstate_of(q text) RETURNS text LANGUAGE plpgsql AS $$ \
         BEGIN EXECUTE q; RETURN NULL; EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE; END $$; \
         GRANT EXECUTE ON FUNCTION pg_temp.sqlstate_of(text) TO PUBLIC; END IF; END $d$",
    );
    Spi::get_one_with_args::<String>("SELECT pg_temp.sqlstate_of($1)", &[sql.into()])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Assert that `sql` fails with `state`, and that it wrote nothing anywhere
/// in the billing schema.
pub fn assert_rejected(sql: &str, state: &str) {
    let before = footprint();
    assert_eq!(sqlstate(sql).as_deref(), Some(state), "{sql}");
    assert_eq!(footprint(), before, "{sql} must write nothing");
}

/// A fingerprint of every billing row, to prove a call wrote nothing.
pub fn footprint() -> String {
    one::<String>(
        "SELECT concat_ws('|', \
            (SELECT count(*) FROM billing.accounts), (SELECT count(*) FROM billing.units), \
            (SELECT count(*) FROM billing.pools), (SELECT coalesce(sum(version), 0) FROM billing.pools), \
            (SELECT count(*) FROM billing.grants), (SELECT coalesce(sum(billing.grant_remaining(g)), 0) FROM billing.grants g), \
            (SELECT count(*) FROM billing.usage_events), (SELECT count(*) FROM billing.holds), \
            (SELECT count(*) FROM billing.ledger))",
    )
}

pub fn available(account: &str, unit: &str) -> i64 {
    one(&format!(
        "SELECT available FROM billing.check('{account}', '{unit}')"
    ))
}

pub fn grant(account: &str, unit: &str, amount: i64, extra: &str) -> i64 {
    one(&format!(
        "SELECT grant_id FROM billing.grant('{account}', '{unit}', {amount}{extra})"
    ))
}

pub fn remaining(grant_id: i64) -> i64 {
    one(&format!(
        "SELECT billing.grant_remaining(g) FROM billing.grants g WHERE g.id = {grant_id}"
    ))
}

pub fn ingest(account: &str, meter: &str, cost: i64, key: &str) -> String {
    one(&format!(
        "SELECT drains::text FROM billing.ingest('{account}', '{meter}', 1, key => '{key}', cost => {cost})"
    ))
}

/// docs/architecture.md, rule 8, must hold after every test.
pub fn assert_ledger_consistent() {
    let problems = opt::<String>("SELECT string_agg(problem, '; ') FROM billing.verify_ledger()");
    assert_eq!(problems, None, "ledger invariants violated");
    // rule 10: the balance now, read from the pool's rows, is what the
    // ledger sums to up to this instant (every entry this transaction wrote
    // is recorded by the clock's now)
    let differ = opt::<String>(
        "SELECT string_agg(format('%s %s: %s, ledger %s', p.account, p.unit, n, l), '; ') \
         FROM billing.pools p, \
              LATERAL (SELECT (b.balance, b.held, b.debt, b.available)::text AS n \
                       FROM billing.balance(p.account, p.unit) b) now_, \
              LATERAL (SELECT (b.balance, b.held, b.debt, b.available)::text AS l \
                       FROM billing.balance(p.account, p.unit, as_of => clock_timestamp()) b) ledger_ \
         WHERE p.tenant_id = billing.current_tenant() AND p.lane = 0 AND n <> l",
    );
    assert_eq!(differ, None, "balance now differs from the ledger's sum");
}

/// Simulate `interval` passing for one account: every instant stored for its
/// pools moves back by `interval`, as if now() had moved forward by it.
pub fn travel(account: &str, interval: &str) {
    let shift = format!("'{interval}'::interval");
    run("SET LOCAL session_replication_role = replica"); // the ledger refuses UPDATE otherwise
    run(&format!(
        "UPDATE billing.grants SET effective_at = effective_at - {shift}, \
             expires_at = expires_at - {shift}, created_at = created_at - {shift} WHERE account = '{account}'"
    ));
    // an allowance window's grant is keyed by the window's start (in
    // microseconds since 2000-01-01 UTC): it moves with it
    run(&format!(
        "UPDATE billing.grants SET key = 'billing:allowance:' || split_part(key, ':', 3) || ':' || \
             (extract(epoch FROM ('2000-01-01 UTC'::timestamptz + split_part(key, ':', 4)::bigint * interval '1 microsecond' \
                                  - {shift}) - '2000-01-01 UTC'::timestamptz) * 1000000)::bigint \
         WHERE account = '{account}' AND key LIKE 'billing:allowance:%'"
    ));
    run(&format!(
        "UPDATE billing.holds SET expires_at = expires_at - {shift}, created_at = created_at - {shift} \
         WHERE account = '{account}'"
    ));
    run(&format!(
        "UPDATE billing.pools SET cache_from = cache_from - {shift}, cache_until = cache_until - {shift}, \
             allowance_next = allowance_next - {shift} WHERE account = '{account}'"
    ));
    run(&format!(
        "UPDATE billing.ledger_entries SET effective_at = effective_at - {shift}, \
             recorded_at = recorded_at - {shift} WHERE account = '{account}'"
    ));
    // the ledger entries usage events carry (schema.sql, usage_events)
    run(&format!(
        "UPDATE billing.usage_events SET entry_at = entry_at - {shift}, \
             recorded_at = recorded_at - {shift} WHERE account = '{account}' AND entry_version IS NOT NULL"
    ));
    run(&format!(
        "UPDATE billing.allowances SET starts_at = starts_at - {shift}, ends_at = ends_at - {shift} \
         WHERE account = '{account}'"
    ));
    for table in ["limit_usage", "limit_holds"] {
        run(&format!(
            "UPDATE billing.{table} SET window_start = window_start - {shift} \
             WHERE limit_id IN (SELECT id FROM billing.limits WHERE account = '{account}')"
        ));
    }
    run("SET LOCAL session_replication_role = origin");
}
