//! Reporting from the ledger: balances at any past instant, and the sweep that
//! records expiries for the audit trail (correctness never depends on it).

use pgrx::datum::TimestampWithTimeZone as Tstz;
use pgrx::prelude::*;

use crate::db::{self, Row, Sql, INT4, TEXT, TSTZ};
use crate::error::{BillingError, OrRaise, Result};
use crate::input;
use crate::ledger::{self, pool_rows, Create, Figures, PoolLedger};
use crate::tenancy::current_tenant;
use crate::time::{self, instant};

/// The pool (summed over its lanes) as a check at `as_of` would have seen it, from ledger entries
/// recorded by then: a grant counts at `as_of` if it was spendable then
/// (`grant_state`) and not suspended (its last suspend or resume entry by
/// then), with what remained of it after the entries recorded up to `as_of`.
/// Holds, suspensions and debt are read from `ledger_entries` alone: a debit
/// a usage event carries moves none of them. The pool's entries are summed
/// once for all its grants (MATERIALIZED: inlined, the sum was run again for
/// every grant, so the cost grew with grants × entries).
static BALANCE_AS_OF: Sql = Sql {
    text: "WITH p AS (SELECT id FROM billing.pools WHERE tenant_id = $1 AND account = $2 AND unit = $3), \
                recorded AS MATERIALIZED (SELECT e.grant_id, sum(e.grant_amount)::bigint AS remaining \
                             FROM billing.ledger e JOIN p ON e.pool_id = p.id \
                             WHERE e.grant_id IS NOT NULL AND e.recorded_at <= $4 \
                             GROUP BY e.grant_id) \
           SELECT \
              (SELECT coalesce(sum(r.remaining), 0)::bigint \
               FROM billing.grants g JOIN p ON g.pool_id = p.id \
               LEFT JOIN recorded s ON s.grant_id = g.id \
               CROSS JOIN LATERAL (SELECT coalesce(s.remaining, 0) AS remaining) r \
               WHERE billing.grant_state('active', r.remaining, g.effective_at, g.expires_at, $4) = 'active' \
                 AND coalesce((SELECT e.kind FROM billing.ledger_entries e \
                               WHERE e.grant_id = g.id AND e.kind IN ('suspend', 'resume') \
                                 AND e.recorded_at <= $4 \
                               ORDER BY e.version DESC LIMIT 1), 'resume') = 'resume') AS balance, \
              (SELECT coalesce(sum(e.hold_amount), 0)::bigint \
               FROM billing.ledger_entries e JOIN p ON e.pool_id = p.id JOIN billing.holds h ON h.id = e.hold_id \
               WHERE e.hold_id IS NOT NULL AND $4 < h.expires_at AND e.recorded_at <= $4) AS held, \
              (SELECT coalesce(sum(d.debt_after), 0)::bigint FROM p CROSS JOIN LATERAL \
                 (SELECT e.debt_after FROM billing.ledger_entries e \
                  WHERE e.pool_id = p.id AND e.recorded_at <= $4 \
                  ORDER BY e.version DESC LIMIT 1) d) AS debt",
    args: &[TEXT, TEXT, TEXT, TSTZ],
};

type BalanceRow = (
    name!(as_of, Tstz),
    name!(balance, i64),
    name!(held, i64),
    name!(debt, i64),
    name!(available, i64),
);

/// Balance, holds, debt and available of a pool at `as_of` (default: now).
#[pg_extern(security_definer, stable)]
#[search_path(pg_catalog, billing, pg_temp)]
fn balance(
    account: Option<&str>,
    unit: Option<&str>,
    as_of: default!(Option<Tstz>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(as_of, Tstz),
        name!(balance, i64),
        name!(held, i64),
        name!(debt, i64),
        name!(available, i64),
    ),
> {
    let result = (|| -> Result<BalanceRow> {
        let account = input::required("account", account)?;
        let unit = input::required("unit", unit)?;
        input::account(account)?;
        input::name("unit", unit)?;
        let tenant = current_tenant()?;
        match as_of {
            None => balance_now(&tenant, account, unit),
            Some(at) => balance_at(&tenant, account, unit, at),
        }
    })();
    TableIterator::once(result.or_raise())
}

/// The balance now, from the pool's rows as `check` reads them (one indexed
/// read, however long the pool's history); a pool that does not exist has
/// nothing. The ledger's sum up to now gives the same figures (a pgrx
/// support check compares the two after every test).
fn balance_now(tenant: &str, account: &str, unit: &str) -> Result<BalanceRow> {
    let rows = pool_rows::read(tenant, account, unit)?;
    let f = ledger::figures_now(&rows)?.unwrap_or_default();
    Ok((
        time::to_sql(time::now()),
        f.balance,
        f.held,
        f.debt,
        f.available(),
    ))
}

/// The balance at a past (or future) instant, summed from the ledger.
fn balance_at(tenant: &str, account: &str, unit: &str, at: Tstz) -> Result<BalanceRow> {
    Spi::connect(|client| {
        let rows = db::read(
            client,
            &BALANCE_AS_OF,
            &[tenant.into(), account.into(), unit.into(), Some(at).into()],
        )?;
        let row = rows
            .into_iter()
            .next()
            .ok_or_else(|| BillingError::Internal("balance: no row".into()))?;
        let row = Row(&row);
        let f = Figures {
            balance: row.get("balance")?,
            held: row.get("held")?,
            debt: row.get("debt")?,
            floor: 0,
        };
        Ok((at, f.balance, f.held, f.debt, f.available()))
    })
}

/// Pools with a grant or hold whose time has passed. `NOT exhausted` (implied
/// by credit left) lets the grants be read through the drain-order index.
static POOLS_DUE: Sql = Sql {
    text: "SELECT DISTINCT p.tenant_id, p.account, p.unit FROM billing.pools p \
           WHERE EXISTS (SELECT 1 FROM billing.grants g WHERE g.pool_id = p.id AND g.status = 'active' \
                         AND NOT g.exhausted AND billing.grant_remaining(g) > 0 AND g.expires_at <= now()) \
              OR EXISTS (SELECT 1 FROM billing.holds h WHERE h.pool_id = p.id AND h.status = 'open' \
                         AND h.expires_at <= now()) \
           ORDER BY p.tenant_id, p.account, p.unit LIMIT $1",
    args: &[INT4],
};

/// Record expiry entries for grants and holds whose time has passed, in at
/// most `max_pools` pools, across all tenants. Suitable for pg_cron. A
/// suspended grant is expired when it is resumed (`run_periodic` does so
/// for plan credit held back past its period).
/// Returns how many pools were brought up to date.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn sweep(max_pools: default!(Option<i32>, "1000")) -> i64 {
    let max_pools = input::required("max_pools", max_pools).or_raise();
    Spi::connect_mut(|client| -> Result<i64> {
        let due: Vec<(String, String, String)> =
            db::write(client, &POOLS_DUE, &[max_pools.max(0).into()])?
                .map(|r| {
                    let r = Row(&r);
                    Ok((r.get("tenant_id")?, r.get("account")?, r.get("unit")?))
                })
                .collect::<Result<_>>()?;
        for (tenant, account, unit) in &due {
            PoolLedger::open(client, tenant, account, unit, Create::Pool)?.flush(client)?;
        }
        Ok(due.len() as i64)
    })
    .or_raise()
}

/// The state of a grant at instant `at` (pending, active, exhausted,
/// expired, voided, revoked): the ledger core's rule, for views and reports.
#[pg_extern(immutable, parallel_safe)]
#[search_path(pg_catalog, billing, pg_temp)]
fn grant_state(
    status: Option<&str>,
    remaining: Option<i64>,
    effective_at: Option<Tstz>,
    expires_at: Option<Tstz>,
    at: Option<Tstz>,
) -> Option<&'static str> {
    Some(crate::ledger::core::grant_state(
        status?,
        remaining?,
        instant(effective_at?),
        expires_at.map(instant),
        instant(at?),
    ))
}
