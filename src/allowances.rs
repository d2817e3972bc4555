//! Recurring allowances: free tiers and included quantities that reset on a
//! window (hour, day, week, month in a time zone, or once for a lifetime)
//! with no job running. Each window's credit is a grant of kind `plan`,
//! created when the pool is first locked in the window (`grant_due`, under
//! the pool's lock, keyed `billing:allowance:<rule>:<window start>` so it is
//! created once) and counted by the gate before that (`due_credit`, no
//! write): `check` and a debit see the same credit at every instant. The
//! windows themselves are cut in one place, `billing.allowance_windows`
//! (sql/windows.sql).

use pgrx::datum::TimestampWithTimeZone as Tstz;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use serde_json::json;

use crate::db::{self, Row, Sql, INT4, INT8, TEXT, TSTZ};
use crate::error::{BillingError, OrRaise, Result};
use crate::grants::{self, NewGrant};
use crate::idempotency::Fingerprint;
use crate::input;
use crate::ledger::{Create, PoolLedger};
use crate::tenancy::current_tenant;
use crate::time::{self, Ts};
use crate::windows;

static DUE: Sql = Sql {
    text: "SELECT allowance_id, starts_at, expires_at, amount, priority \
           FROM billing.allowance_due($1, $2)",
    args: &[INT8, TSTZ],
};

static DUE_CREDIT: Sql = Sql {
    text: "SELECT coalesce(sum(amount), 0)::bigint AS due FROM billing.allowance_due($1, $2)",
    args: &[INT8, TSTZ],
};

static ADVANCE: Sql = Sql {
    text: "UPDATE billing.pools SET allowance_next = billing.allowance_next_start(id, $2) \
           WHERE id = $1 RETURNING allowance_next",
    args: &[INT8, TSTZ],
};

/// One window's credit, owed to a pool.
struct Window {
    allowance: i64,
    starts_at: Ts,
    expires_at: Option<Ts>,
    amount: i64,
    priority: i32,
}

/// Grant a locked pool every allowance window it is owed now, and move its
/// next window on.
pub fn grant_due(client: &mut SpiClient<'_>, ledger: &mut PoolLedger) -> Result<()> {
    let at = time::to_sql(ledger.now);
    let windows = db::write(client, &DUE, &[ledger.id.into(), at.into()])?
        .map(|r| {
            let r = Row(&r);
            Ok(Window {
                allowance: r.get("allowance_id")?,
                starts_at: r.get::<Tstz>("starts_at")?.into(),
                expires_at: r.opt::<Tstz>("expires_at")?.map(time::instant),
                amount: r.get("amount")?,
                priority: r.get("priority")?,
            })
        })
        .collect::<Result<Vec<Window>>>()?;
    let granted = !windows.is_empty();
    for w in windows {
        let id = grants::next_grant_id()?;
        let key = format!("billing:allowance:{}:{}", w.allowance, w.starts_at);
        grants::add_to_locked(
            ledger,
            id,
            NewGrant {
                kind: "plan",
                priority: w.priority,
                amount: w.amount,
                effective_at: w.starts_at,
                expires_at: w.expires_at,
                key: Some(&key),
                hash: Fingerprint::new("allowance")
                    .int(w.allowance)
                    .int(w.starts_at)
                    .finish(),
                metadata: json!({"allowance": w.allowance}),
                granted_by: None,
                reason: None,
            },
        )?;
    }
    let next = db::write(client, &ADVANCE, &[ledger.id.into(), at.into()])?
        .next()
        .map(|r| Row(&r).get::<Tstz>("allowance_next"))
        .transpose()?
        .ok_or_else(|| BillingError::Internal("pool vanished".into()))?;
    ledger.allowance_next = time::instant(next);
    // written at once: the caller may return without writing the pool (a
    // replay), and the grant's row must never be without its entry
    if granted {
        ledger.flush(client)?;
    }
    Ok(())
}

/// The allowance credit a pool is owed at `now` and has not received yet:
/// what the gate adds to what the pool's rows say.
pub fn due_credit(pool_id: i64, now: Ts) -> Result<i64> {
    Spi::connect(|client| {
        let rows = db::read(
            client,
            &DUE_CREDIT,
            &[pool_id.into(), time::to_sql(now).into()],
        )?;
        rows.into_iter()
            .next()
            .map(|r| Row(&r).get::<i64>("due"))
            .transpose()
            .map(|d| d.unwrap_or(0))
    })
}

/// The rule running on a pool now, or the next one to run, and where a
/// change takes over from it (its start, if it has not started).
/// A rule the tenant's default plan made (sql/subscriptions.sql) gives way
/// at once to one the application sets: it takes over now, and a default
/// rule that began at this very instant covers nothing.
static CURRENT_RULE: Sql = Sql {
    text: "SELECT id, amount, every, time_zone, keep_periods, priority, starts_at, \
                  default_plan IS NOT NULL AS from_default_plan, \
                  CASE WHEN default_plan IS NOT NULL THEN starts_at >= now() \
                       ELSE starts_at > now() END AS pending, \
                  CASE WHEN starts_at > now() THEN starts_at \
                       WHEN default_plan IS NOT NULL THEN now() \
                       ELSE billing.allowance_boundary(every, time_zone, now()) END AS boundary \
           FROM billing.allowances WHERE pool_id = $1 AND (ends_at IS NULL OR ends_at > now()) \
           ORDER BY starts_at DESC LIMIT 1",
    args: &[INT8],
};

static APPLY_DEFAULT_PLAN: Sql = Sql {
    text: "SELECT billing.apply_default_plan($1, $2, $3)",
    args: &[TEXT, TEXT, TEXT],
};

static END_RULE: Sql = Sql {
    text: "UPDATE billing.allowances SET ends_at = $2 WHERE id = $1",
    args: &[INT8, TSTZ],
};

static DROP_PENDING_RULE: Sql = Sql {
    text: "DELETE FROM billing.allowances WHERE id = $1",
    args: &[INT8],
};

static ADD_RULE: Sql = Sql {
    text: "INSERT INTO billing.allowances (tenant_id, pool_id, account, unit, amount, every, time_zone, \
                  keep_periods, priority, starts_at) \
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
    args: &[TEXT, INT8, TEXT, TEXT, INT8, TEXT, TEXT, INT4, INT4, TSTZ],
};

/// A new rule's first window may be owed at once.
static RESTART: Sql = Sql {
    text: "UPDATE billing.pools SET allowance_next = least(allowance_next, $2) WHERE id = $1",
    args: &[INT8, TSTZ],
};

/// An allowance rule as asked for.
#[derive(PartialEq)]
struct Shape {
    amount: i64,
    every: String,
    time_zone: String,
    keep_periods: i32,
    priority: i32,
}

impl Shape {
    fn validate(&self) -> Result<()> {
        input::positive("amount", self.amount)?;
        windows::every(&self.every)?;
        if !(1..=366).contains(&self.keep_periods) {
            return Err(BillingError::invalid(
                "keep_periods",
                "must be between 1 and 366",
            ));
        }
        if !(0..=1000).contains(&self.priority) {
            return Err(BillingError::invalid(
                "priority",
                "must be between 0 and 1000",
            ));
        }
        Ok(())
    }

    fn stored(r: &Row) -> Result<Shape> {
        Ok(Shape {
            amount: r.get("amount")?,
            every: r.get("every")?,
            time_zone: r.get("time_zone")?,
            keep_periods: r.get("keep_periods")?,
            priority: r.get("priority")?,
        })
    }
}

/// A pool's running (or next) rule, as `CURRENT_RULE` reads it.
struct Running {
    id: i64,
    shape: Shape,
    /// It has not started yet (a change drops it).
    pending: bool,
    /// Where a change takes over from it.
    boundary: Ts,
    /// The tenant's default plan made it.
    from_default_plan: bool,
}

fn current_rule(client: &mut SpiClient<'_>, pool_id: i64) -> Result<Option<Running>> {
    db::write(client, &CURRENT_RULE, &[pool_id.into()])?
        .next()
        .map(|r| {
            let r = Row(&r);
            Ok(Running {
                id: r.get("id")?,
                shape: Shape::stored(&r)?,
                pending: r.get("pending")?,
                boundary: r.get::<Tstz>("boundary")?.into(),
                from_default_plan: r.get("from_default_plan")?,
            })
        })
        .transpose()
}

/// End the running rule where the next one takes over; returns that
/// instant. A rule that has not started is dropped, and the next one takes
/// its start (the rule running before it still owns the time until then).
fn end_running(client: &mut SpiClient<'_>, id: i64, pending: bool, boundary: Ts) -> Result<Ts> {
    if pending {
        db::write(client, &DROP_PENDING_RULE, &[id.into()])?;
        return Ok(boundary);
    }
    db::write(
        client,
        &END_RULE,
        &[id.into(), time::to_sql(boundary).into()],
    )?;
    Ok(boundary)
}

type AllowanceRow = (
    name!(allowance_id, Option<i64>),
    name!(starts_at, Option<Tstz>),
    name!(status, String),
);

/// Give a pool an allowance: `amount` every hour, day, week or month
/// (windows start at local boundaries in `time_zone`) or once (`never`),
/// each window's credit spendable for `keep_periods` windows. A pool has
/// one rule at a time: a different one takes over at the running rule's next
/// window boundary (the running window keeps its credit); the same one is
/// `unchanged`.
#[allow(clippy::too_many_arguments)]
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn set_allowance(
    account: Option<&str>,
    unit: Option<&str>,
    amount: Option<i64>,
    every: default!(Option<&str>, "'month'"),
    time_zone: default!(Option<&str>, "'UTC'"),
    keep_periods: default!(Option<i32>, "1"),
    priority: default!(Option<i32>, "10"),
    starts_at: default!(Option<Tstz>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(allowance_id, Option<i64>),
        name!(starts_at, Option<Tstz>),
        name!(status, String),
    ),
> {
    let result = (|| -> Result<AllowanceRow> {
        let (account, unit) = input::pool(account, unit)?;
        let shape = Shape {
            amount: input::required("amount", amount)?,
            every: input::required("every", every)?.to_string(),
            time_zone: input::required("time_zone", time_zone)?.to_string(),
            keep_periods: input::required("keep_periods", keep_periods)?,
            priority: input::required("priority", priority)?,
        };
        shape.validate()?;
        let starts_at = time::opt_from_sql("starts_at", starts_at)?;
        if starts_at.is_some_and(|s| s < time::now()) {
            return Err(BillingError::invalid(
                "starts_at",
                "must not be in the past: an allowance never grants earlier windows",
            ));
        }
        let tenant = current_tenant()?;
        Spi::connect_mut(|client| {
            windows::time_zone(client, &shape.time_zone)?;
            let mut ledger = PoolLedger::open(
                client,
                &tenant,
                account,
                unit,
                Create::UnitAndPoolWithOwnRule,
            )?;
            if ledger.lanes > 0 {
                return Err(BillingError::WrongState(format!(
                    "the {unit} pool of account \"{account}\" is split across lanes: an allowance is granted when the whole pool is locked (billing.set_lanes(…, 0) first)"
                )));
            }
            if let Some(to) = converted_to(client, &tenant, account)? {
                return Err(BillingError::WrongState(format!(
                    "guest \"{account}\" was converted to account \"{to}\": its free allowance moved there, and it gets no other"
                )));
            }
            let from = match current_rule(client, ledger.id)? {
                Some(r) if r.shape == shape && starts_at.is_none() && !r.from_default_plan => {
                    return Ok((Some(r.id), None, "unchanged".to_string()))
                }
                Some(r) => end_running(client, r.id, r.pending, r.boundary)?,
                None => ledger.now,
            };
            let begins = starts_at.map_or(from, |s| s.max(from));
            let id: i64 = db::write(
                client,
                &ADD_RULE,
                &[
                    tenant.as_str().into(),
                    ledger.id.into(),
                    account.into(),
                    unit.into(),
                    shape.amount.into(),
                    shape.every.as_str().into(),
                    shape.time_zone.as_str().into(),
                    shape.keep_periods.into(),
                    shape.priority.into(),
                    time::to_sql(begins).into(),
                ],
            )?
            .next()
            .map(|r| Row(&r).get::<i64>("id"))
            .transpose()?
            .ok_or_else(|| BillingError::Internal("allowance not written".into()))?;
            db::write(
                client,
                &RESTART,
                &[ledger.id.into(), time::to_sql(begins).into()],
            )?;
            ledger.allowance_next = ledger.allowance_next.min(begins);
            if begins <= ledger.now {
                grant_due(client, &mut ledger)?;
            }
            ledger.flush(client)?;
            Ok((Some(id), Some(time::to_sql(begins)), "set".to_string()))
        })
    })();
    TableIterator::once(result.or_raise())
}

/// End a pool's allowance at its next window boundary (the running window
/// keeps its credit; a rule that has not started is dropped).
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn end_allowance(
    account: Option<&str>,
    unit: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(allowance_id, Option<i64>),
        name!(ends_at, Option<Tstz>),
        name!(status, String),
    ),
> {
    let result = (|| -> Result<AllowanceRow> {
        let (account, unit) = input::pool(account, unit)?;
        let tenant = current_tenant()?;
        Spi::connect_mut(|client| {
            let mut ledger = PoolLedger::open(client, &tenant, account, unit, Create::Pool)?;
            let Some(r) = current_rule(client, ledger.id)? else {
                return Ok((None, None, "none".to_string()));
            };
            if r.from_default_plan {
                return Err(BillingError::WrongState(format!(
                    "the {unit} allowance of account \"{account}\" is the tenant's default plan's: it ends when the account subscribes (or set another with billing.set_allowance)"
                )));
            }
            let id = r.id;
            let ends = end_running(client, id, r.pending, r.boundary)?;
            db::write(
                client,
                &ADVANCE,
                &[ledger.id.into(), time::to_sql(ledger.now).into()],
            )?;
            // the tenant's default plan, if any, takes over where it ends
            db::write(
                client,
                &APPLY_DEFAULT_PLAN,
                &[tenant.as_str().into(), account.into(), unit.into()],
            )?;
            ledger.flush(client)?;
            Ok((Some(id), Some(time::to_sql(ends)), "ended".to_string()))
        })
    })();
    TableIterator::once(result.or_raise())
}

static CONVERTED_TO: Sql = Sql {
    text: "SELECT account FROM billing.guest_conversions WHERE tenant_id = $1 AND guest = $2",
    args: &[TEXT, TEXT],
};

/// The account a guest was converted to (billing.convert_guest), if it was.
fn converted_to(client: &SpiClient<'_>, tenant: &str, guest: &str) -> Result<Option<String>> {
    db::read(client, &CONVERTED_TO, &[tenant.into(), guest.into()])?
        .next()
        .map(|r| Row(&r).get::<String>("account"))
        .transpose()
}

static CLAIM_GUEST: Sql = Sql {
    text: "WITH claimed AS (INSERT INTO billing.guest_conversions (tenant_id, guest, account) \
                            VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING account) \
           SELECT account, true AS claimed FROM claimed \
           UNION ALL SELECT account, false FROM billing.guest_conversions \
           WHERE tenant_id = $1 AND guest = $2 AND NOT EXISTS (SELECT 1 FROM claimed)",
    args: &[TEXT, TEXT, TEXT],
};

/// The units in which a guest has allowances, rules or granted windows.
static GUEST_UNITS: Sql = Sql {
    text: "SELECT p.unit FROM billing.pools p WHERE p.tenant_id = $1 AND p.account = $2 AND p.lane = 0 \
             AND EXISTS (SELECT 1 FROM billing.allowances a WHERE a.pool_id = p.id AND a.default_plan IS NULL) \
           ORDER BY p.unit",
    args: &[TEXT, TEXT],
};

/// The guest's allowance credit that is still spendable: what moves.
static GUEST_CREDIT: Sql = Sql {
    text: "SELECT g.id, g.priority, g.expires_at \
           FROM billing.grants g \
           WHERE g.pool_id = $1 AND g.parent_id IS NULL AND g.status = 'active' \
             AND billing.allowance_rule_of(g.key) IS NOT NULL \
             AND (g.expires_at IS NULL OR g.expires_at > now()) \
             AND NOT EXISTS (SELECT 1 FROM billing.allowances a \
                             WHERE a.id = billing.allowance_rule_of(g.key) AND a.default_plan IS NOT NULL) \
           ORDER BY g.id",
    args: &[INT8],
};

static REVOKE: Sql = Sql {
    text: "SELECT removed FROM billing.revoke_unused($1)",
    args: &[INT8],
};

/// The guest's running rules become the account's, windows already
/// granted included, so none is granted again; if the account has a rule
/// of its own, the guest's end at their next boundary (one rule at a time).
static MOVE_RULES: Sql = Sql {
    text: "WITH moved AS (UPDATE billing.allowances a SET pool_id = $2, account = $3, \
                                 ends_at = CASE WHEN EXISTS (SELECT 1 FROM billing.allowances o WHERE o.pool_id = $2 \
                                                  AND o.default_plan IS NULL \
                                                  AND (o.ends_at IS NULL OR o.ends_at > now())) \
                                           THEN least(a.ends_at, billing.allowance_boundary(a.every, a.time_zone, now())) \
                                           ELSE a.ends_at END \
                          WHERE a.pool_id = $1 AND a.default_plan IS NULL \
                            AND (a.ends_at IS NULL OR a.ends_at > now()) RETURNING 1) \
           UPDATE billing.pools p SET allowance_next = CASE WHEN p.id = $1 THEN 'infinity' \
                  ELSE least(p.allowance_next, g.allowance_next) END \
           FROM billing.pools g WHERE g.id = $1 AND p.id IN ($1, $2)",
    args: &[INT8, INT8, TEXT],
};

/// Convert a guest (an account named by the application's key for an
/// anonymous visitor) into `account` on sign-up: the guest's running
/// allowance rules become the account's, with the windows the guest was
/// granted counted as granted (a lifetime allowance is never granted
/// twice), and the unspent credit of its windows moves to the account.
/// Once per guest: again to the same account is `duplicate`, to another 55000.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn convert_guest(
    guest: Option<&str>,
    account: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(unit, Option<String>),
        name!(moved, i64),
        name!(status, String),
    ),
> {
    let result = (|| -> Result<Vec<(Option<String>, i64, String)>> {
        let guest = input::required("guest", guest)?;
        let account = input::required("account", account)?;
        input::account(guest)?;
        input::account(account)?;
        if guest == account {
            return Err(BillingError::invalid(
                "account",
                "must differ from the guest",
            ));
        }
        let tenant = current_tenant()?;
        Spi::connect_mut(|client| {
            let (owner, claimed): (String, bool) = db::write(
                client,
                &CLAIM_GUEST,
                &[tenant.as_str().into(), guest.into(), account.into()],
            )?
            .next()
            .map(|r| -> Result<(String, bool)> {
                let r = Row(&r);
                Ok((r.get("account")?, r.get("claimed")?))
            })
            .transpose()?
            .ok_or_else(|| BillingError::Internal("guest conversion not recorded".into()))?;
            if !claimed {
                if owner != account {
                    return Err(BillingError::WrongState(format!(
                        "guest \"{guest}\" was converted to account \"{owner}\" already"
                    )));
                }
                return Ok(vec![(None, 0, "duplicate".to_string())]);
            }
            let units: Vec<String> = db::write(
                client,
                &GUEST_UNITS,
                &[tenant.as_str().into(), guest.into()],
            )?
            .map(|r| Row(&r).get::<String>("unit"))
            .collect::<Result<_>>()?;
            let mut out = Vec::new();
            for unit in units {
                let moved = convert_pool(client, &tenant, guest, account, &unit)?;
                out.push((Some(unit), moved, "converted".to_string()));
            }
            // the default plan is the account's now, never the guest's too
            // (its credit does not move: the account's pools have their own),
            // and gives way to the rules that moved
            for who in [guest, account] {
                db::write(
                    client,
                    &APPLY_DEFAULT_PLAN,
                    &[tenant.as_str().into(), who.into(), None::<&str>.into()],
                )?;
            }
            Ok(out)
        })
    })();
    TableIterator::new(result.or_raise())
}

/// Move one unit's allowance from the guest to the account; returns the
/// credit moved.
fn convert_pool(
    client: &mut SpiClient<'_>,
    tenant: &str,
    guest: &str,
    account: &str,
    unit: &str,
) -> Result<i64> {
    // locked (the windows it is owed granted) and written, before its
    // credit is revoked by another call
    let mut from = PoolLedger::open(client, tenant, guest, unit, Create::Pool)?;
    from.flush(client)?;
    let credit: Vec<(i64, i32, Option<Ts>)> = db::write(client, &GUEST_CREDIT, &[from.id.into()])?
        .map(|r| -> Result<(i64, i32, Option<Ts>)> {
            let r = Row(&r);
            Ok((
                r.get("id")?,
                r.get("priority")?,
                r.opt::<Tstz>("expires_at")?.map(time::instant),
            ))
        })
        .collect::<Result<_>>()?;
    let mut moved = 0;
    let mut to = PoolLedger::open(client, tenant, account, unit, Create::Pool)?;
    for (grant_id, priority, expires_at) in credit {
        let removed: i64 = db::write(client, &REVOKE, &[grant_id.into()])?
            .next()
            .map(|r| Row(&r).get::<i64>("removed"))
            .transpose()?
            .unwrap_or(0);
        if removed == 0 {
            continue;
        }
        let key = format!("billing:guest:{grant_id}");
        let id = grants::next_grant_id()?;
        let now = to.now;
        grants::add_to_locked(
            &mut to,
            id,
            NewGrant {
                kind: "plan",
                priority,
                amount: removed,
                effective_at: now,
                expires_at,
                key: Some(&key),
                hash: Fingerprint::new("guest")
                    .int(grant_id)
                    .int(removed)
                    .finish(),
                metadata: json!({"guest": guest, "grant": grant_id}),
                granted_by: None,
                reason: None,
            },
        )?;
        moved += removed;
    }
    to.flush(client)?;
    db::write(
        client,
        &MOVE_RULES,
        &[from.id.into(), to.id.into(), account.into()],
    )?;
    Ok(moved)
}
