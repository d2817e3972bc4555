//! Auto-reload: the pool side. The rules, requests and the worker's calls
//! are SQL (`sql/reloads.sql`); a debit that leaves a pool below its armed
//! threshold asks for a request in its own transaction
//! (`ledger::watch_balances`).

use pgrx::prelude::*;

use crate::db::{self, Row, Sql, TEXT};
use crate::error::{BillingError, OrRaise, Result};
use crate::input;
use crate::ledger::{Create, PoolLedger};
use crate::tenancy::current_tenant;

/// The pool a reload rule or a balance alert is set on, made if missing (its
/// unit must be known): its id. A split pool is refused: a debit on one lane
/// does not see the whole pool's available, which their thresholds are about.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn unsplit_pool(account: Option<&str>, unit: Option<&str>) -> i64 {
    (|| -> Result<i64> {
        let (account, unit) = input::pool(account, unit)?;
        let tenant = current_tenant()?;
        Spi::connect_mut(|client| {
            let ledger = PoolLedger::open(client, &tenant, account, unit, Create::Pool)?;
            if ledger.lanes > 0 {
                return Err(BillingError::WrongState(format!(
                    "the {unit} pool of account \"{account}\" is split across lanes: an auto-reload or a balance alert needs every debit to see the whole pool (billing.set_lanes(…, 0) first)"
                )));
            }
            Ok(ledger.id)
        })
    })()
    .or_raise()
}

static HAS_RULE: Sql = Sql {
    text: "SELECT EXISTS (SELECT 1 FROM billing.reload_rules r \
                          WHERE r.tenant_id = $1 AND r.account = $2 AND r.unit = $3 \
                            AND r.status <> 'disabled') \
               OR EXISTS (SELECT 1 FROM billing.alert_rules a \
                          WHERE a.tenant_id = $1 AND a.account = $2 AND a.unit = $3) AS ruled",
    args: &[TEXT, TEXT, TEXT],
};

/// A pool with an auto-reload rule or a balance alert may not be split (see `unsplit_pool`);
/// asked while the pool is locked, so a rule set meanwhile is seen.
pub fn refuse_split(pool: &PoolLedger) -> Result<()> {
    let (tenant, account, unit) = (&pool.tenant, &pool.account, &pool.unit);
    let ruled = Spi::connect(|client| -> Result<bool> {
        let rows = db::read(
            client,
            &HAS_RULE,
            &[
                tenant.as_str().into(),
                account.as_str().into(),
                unit.as_str().into(),
            ],
        )?;
        rows.into_iter()
            .next()
            .map(|r| Row(&r).get::<bool>("ruled"))
            .transpose()
            .map(Option::unwrap_or_default)
    })?;
    if ruled {
        return Err(BillingError::WrongState(format!(
            "the {unit} pool of account \"{account}\" has an auto-reload rule or a balance alert: a debit on one lane would not see the whole pool's available (billing.disable_reload or billing.remove_alert first)"
        )));
    }
    Ok(())
}

/// Whether the pool's auto-reload rule is suspended (a payment failed, or
/// its requests ran out), which a top-up re-arms (`billing.reload_after_topup`).
/// A pool without a rule has none to re-arm, so most top-ups skip the call.
pub fn suspended_rule(pool: i64) -> Result<bool> {
    let status = crate::direct::find_one(
        c"reload_rules",
        c"reload_rules_of_pool",
        &[crate::direct::Key::Int8(pool)],
        crate::direct::Snapshot::New,
        |t| t.get::<String>(c"status"),
    )?;
    Ok(status.as_deref() == Some("suspended"))
}
