//! The gate: may this account spend `amount` now? One indexed read, no write.

use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::db;
use crate::error::{BillingError, OrRaise, Result};
use crate::input;
use crate::ledger::{self, Figures, KNOWN_UNITS, READ_POOL};
use crate::tenancy::current_tenant;

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
    let rows = db::read(
        client,
        &READ_POOL,
        &[tenant.into(), account.into(), unit.into()],
    )?;
    let figures = match ledger::figures_now(client, rows)? {
        Some(figures) => figures,
        None => {
            let known = db::read(client, &KNOWN_UNITS, &[tenant.into(), vec![unit].into()])?;
            if ledger::first_unknown_unit(known, &[unit])?.is_some() {
                return Err(BillingError::unknown("unit", unit));
            }
            Figures::default()
        }
    };
    Ok(decide(amount, &figures))
}

fn decide(amount: i64, f: &Figures) -> CheckRow {
    let allowed = f.allows(amount);
    let reason = if allowed {
        "ok"
    } else if f.debt > 0 {
        "in_debt"
    } else {
        "insufficient_credits"
    };
    (
        allowed,
        f.available(),
        f.balance,
        f.held,
        f.debt,
        f.floor,
        reason.into(),
    )
}
