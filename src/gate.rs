//! The gate: may this account spend `amount` now? One indexed read, no write.

use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{AllocatedByRust, IntoDatum, PgTupleDesc};

use crate::db::{self, Row, Sql, TEXT};
use crate::direct;
use crate::error::{BillingError, OrRaise, Result};
use crate::input;
use crate::ledger::{self, pool_rows, Figures, PoolRow};
use crate::tenancy::current_tenant;
use crate::{allowances, limits, pricing, rights, time};
use pgrx::datum::TimestampWithTimeZone as Tstz;

type CheckRow = (
    name!(allowed, bool),
    name!(available, i64),
    name!(balance, i64),
    name!(held, i64),
    name!(debt, i64),
    name!(floor, i64),
    name!(reason, String),
    name!(resets_at, Option<Tstz>),
);

/// Would spending `amount` now keep the pool at or above its floor, and
/// within its limits (for `member`, too)? `available = balance − held −
/// debt`; allowed iff `available − amount ≥ floor` and every limit's window
/// has room for `amount`. A limit that refuses is named in `reason`
/// (`limit:<name>`) with the instant its window resets. With `meter`, the
/// meter the call will use must charge `unit` and be enabled.
///
/// It runs as its caller (see `crate::rights`): an existing pool whose rows
/// answer from their cached windows, with no allowance due and no limit, and
/// a request it allows, are answered from the rows alone; everything else
/// runs as a SECURITY DEFINER function would.
#[pg_extern(stable)]
fn check(
    account: Option<&str>,
    unit: Option<&str>,
    amount: default!(Option<i64>, "0"),
    member: default!(Option<&str>, "NULL"),
    meter: default!(Option<&str>, "NULL"),
) -> pgrx::composite_type!('static, "billing.check_result") {
    let result = (|| -> Result<CheckRow> {
        let account = input::required("account", account)?;
        let unit = input::required("unit", unit)?;
        let amount = input::required("amount", amount)?;
        input::account(account)?;
        input::name("unit", unit)?;
        input::non_negative("amount", amount)?;
        let tenant = current_tenant()?;
        let rows = pool_rows::read(&tenant, account, unit)?;
        if meter.is_none() {
            if let Some(row) = allowed_from_pool_rows(&rows, amount) {
                return Ok(row);
            }
        }
        rights::as_owner(|| {
            if let Some(meter) = meter {
                usable_meter(&tenant, meter, unit)?;
            }
            gate(&tenant, account, unit, &rows, amount, member)
        })
    })();
    check_result(result.or_raise()).or_raise()
}

thread_local! {
    /// billing.check_result's relation and type OIDs, found once per
    /// backend (the relation's is forgotten with its relcache entry, so a
    /// re-created type is found again).
    static CHECK_RESULT: std::cell::Cell<Option<(pg_sys::Oid, pg_sys::Oid)>> =
        const { std::cell::Cell::new(None) };
}

/// A check's row as a `billing.check_result`: one composite value, which
/// costs less per call than a set of records (whose row descriptor is built
/// from the function's catalog entry on every call).
fn check_result(row: CheckRow) -> Result<PgHeapTuple<'static, AllocatedByRust>> {
    let relid = direct::relation(c"check_result")?;
    let oid = match CHECK_RESULT.with(|c| c.get()) {
        Some((rel, oid)) if rel == relid => oid,
        _ => {
            // SAFETY: a catalog lookup inside a transaction.
            let oid = unsafe { pg_sys::get_rel_type_id(relid) };
            CHECK_RESULT.with(|c| c.set(Some((relid, oid))));
            oid
        }
    };
    let tupdesc = PgTupleDesc::for_composite_type_by_oid(oid)
        .ok_or_else(|| BillingError::Internal("billing.check_result is missing".into()))?;
    let (allowed, available, balance, held, debt, floor, reason, resets_at) = row;
    let datums = [
        allowed.into_datum(),
        available.into_datum(),
        balance.into_datum(),
        held.into_datum(),
        debt.into_datum(),
        floor.into_datum(),
        reason.into_datum(),
        resets_at.into_datum(),
    ];
    // SAFETY: one datum per attribute of billing.check_result, of its type.
    unsafe { PgHeapTuple::from_datums(tupdesc, datums) }
        .map_err(|e| BillingError::Internal(format!("check_result: {e}")))
}

/// The meter a call is about to use: it must charge `unit` and be enabled
/// (a retired model is refused here as ingest refuses it).
fn usable_meter(tenant: &str, meter: &str, unit: &str) -> Result<()> {
    input::name("meter", meter)?;
    let found = Spi::connect_mut(|client| pricing::find_meter(client, tenant, meter))?;
    if found.unit != unit {
        return Err(BillingError::invalid(
            "meter",
            format!("\"{meter}\" charges {}, not {unit}", found.unit),
        ));
    }
    found.enabled()
}

/// The gate's answer when it allows `amount` from the pool's rows alone:
/// the pool exists, every row is inside its cached window, no allowance
/// window is due and no limit applies. None means the full gate must decide.
fn allowed_from_pool_rows(rows: &[PoolRow], amount: i64) -> Option<CheckRow> {
    let now = time::now();
    let pool = rows.first()?;
    if pool.limited || pool.allowance_next <= now {
        return None;
    }
    ledger::cached_figures(rows, now)
        .map(|figures| decide(amount, &figures))
        .filter(|row| row.0)
}

/// The full gate on the pool's `rows` (`pool_rows::read`): a pool that
/// exists answers from its rows, brought up to date where their cached
/// windows passed; one that does not is empty if its unit is known.
fn gate(
    tenant: &str,
    account: &str,
    unit: &str,
    rows: &[PoolRow],
    amount: i64,
    member: Option<&str>,
) -> Result<CheckRow> {
    let mut figures = match ledger::figures_now(rows)? {
        Some(figures) => figures,
        None => {
            // a pool not made yet: the default plan's first window is owed to it
            let owed = Spi::connect(|client| {
                unit_is_known(tenant, unit)?;
                default_plan_credit(client, tenant, account, unit)
            })?;
            Figures {
                balance: owed,
                ..Figures::default()
            }
        }
    };
    // an allowance window not granted yet is owed all the same
    let now = time::now();
    if let Some(pool) = rows.first().filter(|p| p.allowance_next <= now) {
        figures.balance = figures
            .balance
            .saturating_add(allowances::due_credit(pool.id, now)?);
    }
    let mut row = decide(amount, &figures);
    let mut refused_by_limit = false;
    if let Some(pool) = rows.first().filter(|p| p.limited && row.0) {
        let limits = limits::now_for(pool.id, member, now)?;
        if let Some(l) = limits::blocking(&limits, amount) {
            refused_by_limit = true;
            row.0 = false;
            row.6 = format!("limit:{}", l.name);
            row.7 = l.resets_at.map(time::to_sql);
        }
    }
    if !row.0 && !refused_by_limit {
        // refused for credit: when the pool's allowance refills, if it has one
        row.7 = rows
            .first()
            .map(|p| p.allowance_next)
            .filter(|next| *next > now && *next < time::Ts::MAX)
            .map(time::to_sql);
        // a subscription holding back the plan credit of this unit says why
        if let Some(why) = Spi::connect(|client| held_back_by(client, tenant, account, unit))? {
            row.6 = why;
        }
    }
    Ok(row)
}

/// The subscription of the account whose plan includes `unit` and whose
/// credit is held back now (`billing.subscription_access` = suspended) or
/// whose current period is not paid yet, as the reason a check names:
/// `subscription_<status>`, or for an active one `subscription_disputed` (a
/// payment disputed, funds withdrawn), `subscription_collection_paused` (the
/// provider collects no payment) or `subscription_renewal_unpaid`. An
/// abandoned `incomplete` checkout speaks only when nothing else is live.
static HELD_BACK_BY: Sql = Sql {
    text: "SELECT CASE WHEN s.status NOT IN ('active', 'trialing') THEN 'subscription_' || s.status \
                       WHEN s.disputed THEN 'subscription_disputed' \
                       WHEN s.collection_paused THEN 'subscription_collection_paused' \
                       ELSE 'subscription_renewal_unpaid' END AS reason \
           FROM billing.subscriptions s JOIN billing.plans pl ON pl.id = s.plan_id \
           WHERE s.tenant_id = $1 AND s.account = $2 AND pl.allowances ? $3 \
             AND (billing.subscription_access(s.status, s.collection_paused OR s.disputed) = 'suspended' \
                  OR (billing.subscription_access(s.status) = 'open' AND NOT billing.subscription_paid(s))) \
             AND (s.status <> 'incomplete' OR NOT EXISTS ( \
                  SELECT 1 FROM billing.subscriptions o WHERE o.tenant_id = s.tenant_id \
                    AND o.account = s.account AND billing.subscription_is_live(o.status))) \
           ORDER BY s.updated_at DESC LIMIT 1",
    args: &[TEXT, TEXT, TEXT],
};

fn held_back_by(
    client: &SpiClient<'_>,
    tenant: &str,
    account: &str,
    unit: &str,
) -> Result<Option<String>> {
    let rows = db::read(
        client,
        &HELD_BACK_BY,
        &[tenant.into(), account.into(), unit.into()],
    )?;
    rows.into_iter()
        .next()
        .map(|r| Row(&r).get::<String>("reason"))
        .transpose()
}

static DEFAULT_PLAN_CREDIT: Sql = Sql {
    text: "SELECT billing.default_plan_credit($1, $2, $3) AS owed",
    args: &[TEXT, TEXT, TEXT],
};

fn default_plan_credit(
    client: &SpiClient<'_>,
    tenant: &str,
    account: &str,
    unit: &str,
) -> Result<i64> {
    db::read(
        client,
        &DEFAULT_PLAN_CREDIT,
        &[tenant.into(), account.into(), unit.into()],
    )?
    .next()
    .map(|r| Row(&r).get::<i64>("owed"))
    .transpose()
    .map(Option::unwrap_or_default)
}

fn unit_is_known(tenant: &str, unit: &str) -> Result<()> {
    match ledger::first_unknown_unit(tenant, &[unit], direct::Snapshot::Query)? {
        Some(_) => Err(BillingError::unknown("unit", unit)),
        None => Ok(()),
    }
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
        None,
    )
}
