//! The gate: may this account spend `amount` now? One indexed read, no write.

use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::db::{self, Sql, TEXT};
use crate::error::{BillingError, OrRaise, Result};
use crate::input;
use crate::ledger::UNIT_EXISTS;
use crate::tenancy::current_tenant;

/// Inside the pool's cached window the figures come from the pool row alone;
/// outside it (a grant or hold changed state by the clock since the last
/// write) they are recomputed from the grants and holds, exactly, at now().
static CHECK_POOL: Sql = Sql {
    text: "SELECT p.floor, p.debt, \
              CASE WHEN p.cache_from <= now() AND now() < p.cache_until THEN p.active_remaining \
                   ELSE (SELECT coalesce(sum(g.remaining), 0)::bigint FROM billing.grants g \
                         WHERE g.pool_id = p.id AND g.status = 'active' AND g.remaining > 0 AND g.effective_at <= now() \
                           AND (g.expires_at IS NULL OR now() < g.expires_at)) END, \
              CASE WHEN p.cache_from <= now() AND now() < p.cache_until THEN p.active_held \
                   ELSE (SELECT coalesce(sum(h.amount), 0)::bigint FROM billing.holds h \
                         WHERE h.pool_id = p.id AND h.status = 'open' AND now() < h.expires_at) END \
           FROM billing.pools p WHERE p.tenant_id = $1 AND p.account = $2 AND p.unit = $3",
    args: &[TEXT, TEXT, TEXT],
};

type CheckRow = (
    name!(allowed, bool),
    name!(available, i64),
    name!(balance, i64),
    name!(held, i64),
    name!(debt, i64),
    name!(floor, i64),
    name!(reason, String),
);

/// Would spending `amount` now keep the pool at or above its floor?
/// `available = balance − held − debt`; allowed iff `available − amount ≥ floor`.
#[pg_extern(security_definer, stable)]
#[search_path(pg_catalog, billing, pg_temp)]
fn check(
    account: Option<&str>,
    unit: Option<&str>,
    amount: default!(Option<i64>, "0"),
) -> TableIterator<
    'static,
    (
        name!(allowed, bool),
        name!(available, i64),
        name!(balance, i64),
        name!(held, i64),
        name!(debt, i64),
        name!(floor, i64),
        name!(reason, String),
    ),
> {
    let result = (|| -> Result<CheckRow> {
        let account = input::required("account", account)?;
        let unit = input::required("unit", unit)?;
        let amount = input::required("amount", amount)?;
        input::account(account)?;
        input::name("unit", unit)?;
        input::non_negative("amount", amount)?;
        let tenant = current_tenant()?;
        Spi::connect(|client| gate(client, &tenant, account, unit, amount))
    })();
    TableIterator::once(result.or_raise())
}

fn gate(
    client: &SpiClient<'_>,
    tenant: &str,
    account: &str,
    unit: &str,
    amount: i64,
) -> Result<CheckRow> {
    let mut rows = db::read(
        client,
        &CHECK_POOL,
        &[tenant.into(), account.into(), unit.into()],
    )?;
    let (floor, debt, balance, held) = match rows.next() {
        Some(row) => (
            db::col(&row, 1)?,
            db::col(&row, 2)?,
            db::col(&row, 3)?,
            db::col(&row, 4)?,
        ),
        None => {
            if db::read(client, &UNIT_EXISTS, &[tenant.into(), unit.into()])?.is_empty() {
                return Err(BillingError::unknown("unit", unit));
            }
            (0, 0, 0, 0)
        }
    };
    Ok(decide(amount, floor, debt, balance, held))
}

fn decide(amount: i64, floor: i64, debt: i64, balance: i64, held: i64) -> CheckRow {
    let available = balance - held - debt;
    let allowed = (available as i128) - (amount as i128) >= floor as i128;
    let reason = if allowed {
        "ok"
    } else if debt > 0 {
        "in_debt"
    } else {
        "insufficient_credits"
    };
    (
        allowed,
        available,
        balance,
        held,
        debt,
        floor,
        reason.into(),
    )
}
