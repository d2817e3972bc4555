//! Accounts and pool settings.

use pgrx::datum::{DatumWithOid, TimestampWithTimeZone as Tstz};
use pgrx::prelude::*;
use pgrx::JsonB;

use crate::db::{self, Sql, INT4, INT8, JSONB, TEXT};
use crate::error::{BillingError, OrRaise, Result};
use crate::input::{self, JsonArg};
use crate::ledger::{Create, PoolLedger};
use crate::tenancy::current_tenant;
use crate::time::Ts;

static UPSERT_ACCOUNT: Sql = Sql {
    text: "INSERT INTO billing.accounts (tenant_id, account, name, metadata) \
           VALUES ($1, $2, $3, coalesce($4, '{}')) \
           ON CONFLICT (tenant_id, account) DO UPDATE \
           SET name = coalesce(EXCLUDED.name, accounts.name), \
               metadata = CASE WHEN $4 IS NULL THEN accounts.metadata ELSE EXCLUDED.metadata END \
           RETURNING account, name, metadata, created_at",
    args: &[TEXT, TEXT, TEXT, JSONB],
};

type AccountRow = (
    name!(account, String),
    name!(name, Option<String>),
    name!(metadata, JsonB),
    name!(created_at, Tstz),
);

/// Create or update an account (accounts are also created on first use).
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn account(
    account: Option<&str>,
    name: default!(Option<&str>, "NULL"),
    metadata: default!(Option<JsonArg>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(account, String),
        name!(name, Option<String>),
        name!(metadata, JsonB),
        name!(created_at, Tstz),
    ),
> {
    let result = (|| -> Result<AccountRow> {
        let account = input::required("account", account)?;
        input::account(account)?;
        let metadata = match &metadata {
            Some(m) => {
                let v = m.value("metadata")?;
                input::json_object("metadata", v)?;
                Some(JsonB(v.clone()))
            }
            None => None,
        };
        let tenant = current_tenant()?;
        Spi::connect_mut(|client| {
            let rows = db::write(
                client,
                &UPSERT_ACCOUNT,
                &[
                    tenant.as_str().into(),
                    account.into(),
                    name.into(),
                    metadata.into(),
                ],
            )?;
            let row = rows.first();
            Ok((
                row.get(1)?.unwrap_or_default(),
                row.get(2)?,
                row.get(3)?.unwrap_or(JsonB(serde_json::json!({}))),
                row.get(4)?.unwrap_or(Tstz::positive_infinity()),
            ))
        })
    })();
    TableIterator::once(result.or_raise())
}

static SET_FLOOR: Sql = Sql {
    text: "UPDATE billing.pools SET floor = $2, updated_at = now() WHERE id = $1",
    args: &[INT8, INT8],
};

static SET_LANES: Sql = Sql {
    text: "UPDATE billing.pools SET lanes = $2, updated_at = now() WHERE id = $1",
    args: &[INT8, INT4],
};

/// The most lanes a pool may have.
const MAX_LANES: i32 = 64;

/// Set the floor of a pool: spending must leave `available ≥ floor`. A
/// negative floor is a credit line; the default is 0.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn set_floor(account: Option<&str>, unit: Option<&str>, floor: Option<i64>) -> i64 {
    (|| -> Result<i64> {
        let floor = input::required("floor", floor)?;
        set_pool(account, unit, &SET_FLOOR, floor.into(), |_| Ok(()))?;
        Ok(floor)
    })()
    .or_raise()
}

/// Split a hot pool's balance across `lanes` rows beside the pool, which
/// concurrent debits of a given cost take in parallel (0: not split). The
/// floor, drain order and zero overspend stay exact; each lane holds a
/// share of the first grant in drain order only. Returns the new number of lanes.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn set_lanes(account: Option<&str>, unit: Option<&str>, lanes: Option<i32>) -> i32 {
    (|| -> Result<i32> {
        let lanes = input::required("lanes", lanes)?;
        if !(0..=MAX_LANES).contains(&lanes) {
            return Err(BillingError::invalid(
                "lanes",
                format!("{lanes} is not between 0 and {MAX_LANES}"),
            ));
        }
        set_pool(account, unit, &SET_LANES, lanes.into(), |ledger| {
            if (ledger.limited || ledger.allowance_next != Ts::MAX) && lanes > 0 {
                return Err(BillingError::WrongState(format!(
                    "the {} pool of account \"{}\" has limits or an allowance: they need every debit to see the whole pool, so it cannot be split",
                    ledger.unit, ledger.account
                )));
            }
            if lanes > 0 {
                // asked with the pool locked: a rule set meanwhile has committed
                crate::reloads::refuse_split(ledger)?;
            }
            Ok(())
        })?;
        Ok(lanes)
    })()
    .or_raise()
}

/// Change a setting of a pool (`update` takes its id and the value), if
/// `allowed` says the locked pool may take it. A split pool's lanes give
/// their credit back first: it was dealt under the old settings (above the
/// old floor, across the old lanes).
fn set_pool(
    account: Option<&str>,
    unit: Option<&str>,
    update: &'static Sql,
    value: DatumWithOid<'static>,
    allowed: impl Fn(&PoolLedger) -> Result<()>,
) -> Result<()> {
    let (account, unit) = input::pool(account, unit)?;
    let tenant = current_tenant()?;
    Spi::connect_mut(|client| {
        let mut ledger = PoolLedger::open(client, &tenant, account, unit, Create::Pool)?;
        allowed(&ledger)?;
        ledger.flush(client)?;
        db::write(client, update, &[ledger.id.into(), value])?;
        Ok(())
    })
}
