//! Limits: at most `max` of a pool's unit used per window (a daily spend
//! cap), for the account or for each member of it (the event's `member`
//! property), beside the pool's credit. The rule is the floor's: a strict
//! debit or a reservation is accepted only if what its window has used plus
//! its amount stays at or below the limit, decided under the pool's lock, so
//! concurrent callers never pass it together. Usage that was incurred
//! (non-strict) is recorded even past a limit, which then refuses until its
//! window resets. Windows come from `billing.window_of` (sql/windows.sql).

use std::collections::HashMap;

use pgrx::datum::TimestampWithTimeZone as Tstz;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use serde_json::Value;

use crate::db::{self, Row, Sql, BOOL, INT8, TEXT, TSTZ};
use crate::error::{BillingError, OrRaise, Result};
use crate::input;
use crate::ledger::{Create, PoolLedger};
use crate::tenancy::current_tenant;
use crate::time::{self, Ts};
use crate::windows;

/// One limit as it stands in the window holding an instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitState {
    pub id: i64,
    pub name: String,
    pub max: i64,
    pub used: i64,
    pub window_start: Ts,
    /// None: the window never resets.
    pub resets_at: Option<Ts>,
    /// The member it counts for ('' for the account's own limits).
    pub member: String,
}

impl LimitState {
    /// The floor's rule, for a limit: `amount` more may be used iff used +
    /// amount ≤ max (so a request of 0 at exactly the limit is allowed).
    pub fn allows(&self, amount: i64) -> bool {
        self.used as i128 + amount as i128 <= self.max as i128
    }

    pub fn reached(&self, requested: i64) -> BillingError {
        BillingError::LimitReached {
            name: self.name.clone(),
            max: self.max,
            used: self.used,
            requested,
            window: match self.resets_at {
                Some(t) => format!("in this window, which resets at {}", time::to_sql(t)),
                None => "ever (it never resets)".into(),
            },
        }
    }
}

/// The first of `limits` that `amount` more would pass.
pub fn blocking(limits: &[LimitState], amount: i64) -> Option<&LimitState> {
    limits.iter().find(|l| !l.allows(amount))
}

/// An event's member: its `member` property, if a string.
pub fn member_of(properties: &Value) -> Option<String> {
    properties
        .get("member")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// The limits of pool $1 that apply at $2 to member $3 (NULL: the
/// account's own only), with what their windows have used.
static LIMITS_AT: Sql = Sql {
    text: "SELECT l.id, l.name, l.max, w.starts_at, w.ends_at, \
                  CASE WHEN l.per_member THEN $3 ELSE '' END AS member, coalesce(u.used, 0) AS used \
           FROM billing.limits l \
           CROSS JOIN LATERAL billing.window_of(l.every, l.time_zone, $2) w \
           LEFT JOIN billing.limit_usage u ON u.limit_id = l.id AND u.window_start = w.starts_at \
                AND u.member = CASE WHEN l.per_member THEN $3 ELSE '' END \
           WHERE l.pool_id = $1 AND (NOT l.per_member OR $3 IS NOT NULL) \
           ORDER BY l.name",
    args: &[INT8, TSTZ, TEXT],
};

static SAVE_USAGE: Sql = Sql {
    text: "INSERT INTO billing.limit_usage AS u (tenant_id, limit_id, window_start, member, used) \
           VALUES ($1, $2, $3, $4, $5) \
           ON CONFLICT ON CONSTRAINT limit_usage_pkey DO UPDATE SET used = EXCLUDED.used",
    args: &[TEXT, INT8, TSTZ, TEXT, INT8],
};

fn read_limits(
    client: &SpiClient<'_>,
    pool_id: i64,
    member: Option<&str>,
    at: Ts,
) -> Result<Vec<LimitState>> {
    db::read(
        client,
        &LIMITS_AT,
        &[pool_id.into(), time::to_sql(at).into(), member.into()],
    )?
    .map(|r| {
        let r = Row(&r);
        Ok(LimitState {
            id: r.get("id")?,
            name: r.get("name")?,
            max: r.get("max")?,
            used: r.get("used")?,
            window_start: time::instant(r.get::<Tstz>("starts_at")?),
            resets_at: r.opt::<Tstz>("ends_at")?.map(time::instant),
            member: r.get("member")?,
        })
    })
    .collect()
}

/// The limits of a pool as the gate sees them now (no write).
pub fn now_for(pool_id: i64, member: Option<&str>, now: Ts) -> Result<Vec<LimitState>> {
    Spi::connect(|client| read_limits(client, pool_id, member, now))
}

/// Where a limit counts: (limit, window start, member).
type LimitKey = (i64, Ts, String);

/// The limits of the pools a call debits, read once per (pool, member) and
/// counted as its debits apply; `save` writes what they used. Each limit's
/// window is kept once, however many members' views include it (an
/// account's own limit applies to every member).
#[derive(Default)]
pub struct Limits {
    /// (pool, member) → the limits that apply to it
    views: HashMap<(i64, Option<String>), Vec<LimitKey>>,
    states: HashMap<LimitKey, LimitState>,
    /// the windows a debit counted in, to write
    counted: Vec<LimitKey>,
}

impl Limits {
    fn view(
        &mut self,
        client: &SpiClient<'_>,
        pool_id: i64,
        member: Option<&str>,
        at: Ts,
    ) -> Result<Vec<LimitKey>> {
        let key = (pool_id, member.map(str::to_string));
        if let Some(keys) = self.views.get(&key) {
            return Ok(keys.clone());
        }
        let mut keys = Vec::new();
        for state in read_limits(client, pool_id, member, at)? {
            let k = (state.id, state.window_start, state.member.clone());
            // a window already counted in by this call keeps what it counted
            self.states.entry(k.clone()).or_insert(state);
            keys.push(k);
        }
        self.views.insert(key, keys.clone());
        Ok(keys)
    }

    /// The limit `amount` more would pass, if any.
    pub fn blocking(
        &mut self,
        client: &SpiClient<'_>,
        pool_id: i64,
        member: Option<&str>,
        amount: i64,
        at: Ts,
    ) -> Result<Option<BillingError>> {
        let keys = self.view(client, pool_id, member, at)?;
        Ok(keys
            .iter()
            .map(|k| &self.states[k])
            .find(|l| !l.allows(amount))
            .map(|l| l.reached(amount)))
    }

    /// Count `amount` used in every limit that applies; returns where it
    /// counted.
    pub fn count(
        &mut self,
        client: &SpiClient<'_>,
        pool_id: i64,
        member: Option<&str>,
        amount: i64,
        at: Ts,
    ) -> Result<Vec<LimitKey>> {
        let keys = self.view(client, pool_id, member, at)?;
        for k in &keys {
            let l = self.states.get_mut(k).expect("read with its view");
            l.used = l
                .used
                .checked_add(amount)
                .ok_or_else(|| BillingError::Overflow(format!("limit {} used", l.name)))?;
            if !self.counted.contains(k) {
                self.counted.push(k.clone());
            }
        }
        Ok(keys)
    }

    pub fn save(&self, client: &mut SpiClient<'_>, tenant: &str) -> Result<()> {
        for k in &self.counted {
            let (id, start, member) = k;
            db::write(
                client,
                &SAVE_USAGE,
                &[
                    tenant.into(),
                    (*id).into(),
                    time::to_sql(*start).into(),
                    member.as_str().into(),
                    self.states[k].used.into(),
                ],
            )?;
        }
        Ok(())
    }
}

static UPSERT_LIMIT: Sql = Sql {
    text: "INSERT INTO billing.limits AS l (tenant_id, pool_id, account, unit, name, max, every, time_zone, per_member) \
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
           ON CONFLICT ON CONSTRAINT limits_key DO UPDATE \
           SET max = EXCLUDED.max, every = EXCLUDED.every, time_zone = EXCLUDED.time_zone, \
               per_member = EXCLUDED.per_member \
           WHERE (l.max, l.every, l.time_zone, l.per_member) \
                 IS DISTINCT FROM (EXCLUDED.max, EXCLUDED.every, EXCLUDED.time_zone, EXCLUDED.per_member) \
           RETURNING l.id, (xmax = 0) AS created",
    args: &[TEXT, INT8, TEXT, TEXT, TEXT, INT8, TEXT, TEXT, BOOL],
};

static FIND_LIMIT: Sql = Sql {
    text: "SELECT id FROM billing.limits WHERE pool_id = $1 AND name = $2",
    args: &[INT8, TEXT],
};

static DROP_LIMIT: Sql = Sql {
    text: "DELETE FROM billing.limits WHERE pool_id = $1 AND name = $2 RETURNING id",
    args: &[INT8, TEXT],
};

static MARK_LIMITED: Sql = Sql {
    text: "UPDATE billing.pools p SET limited = EXISTS (SELECT 1 FROM billing.limits l WHERE l.pool_id = p.id) \
           WHERE p.id = $1",
    args: &[INT8],
};

/// Cap how much of `unit` an account (or each of its members, with
/// `per_member`) may use per window: `max` every hour, day, week or month
/// in `time_zone`, or ever (`never`). Named, so a pool may have several
/// (a daily and a monthly cap); setting a name again changes it at once.
#[allow(clippy::too_many_arguments)]
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn set_limit(
    account: Option<&str>,
    unit: Option<&str>,
    name: Option<&str>,
    max: Option<i64>,
    every: default!(Option<&str>, "'day'"),
    time_zone: default!(Option<&str>, "'UTC'"),
    per_member: default!(Option<bool>, "false"),
) -> TableIterator<
    'static,
    (
        name!(limit_id, i64),
        name!(name, String),
        name!(status, String),
    ),
> {
    let result = (|| -> Result<(i64, String, String)> {
        let (account, unit) = input::pool(account, unit)?;
        let name = input::required("name", name)?;
        let max = input::required("max", max)?;
        let every = input::required("every", every)?;
        let time_zone = input::required("time_zone", time_zone)?;
        let per_member = input::required("per_member", per_member)?;
        input::name("name", name)?;
        input::non_negative("max", max)?;
        windows::every(every)?;
        let tenant = current_tenant()?;
        Spi::connect_mut(|client| {
            windows::time_zone(client, time_zone)?;
            let mut ledger = PoolLedger::open(client, &tenant, account, unit, Create::UnitAndPool)?;
            if ledger.lanes > 0 {
                return Err(BillingError::WrongState(format!(
                    "the {unit} pool of account \"{account}\" is split across lanes: a limit needs every debit to see the whole pool (billing.set_lanes(…, 0) first)"
                )));
            }
            let written = db::write(
                client,
                &UPSERT_LIMIT,
                &[
                    tenant.as_str().into(),
                    ledger.id.into(),
                    account.into(),
                    unit.into(),
                    name.into(),
                    max.into(),
                    every.into(),
                    time_zone.into(),
                    per_member.into(),
                ],
            )?
            .next()
            .map(|r| -> Result<(i64, bool)> {
                let r = Row(&r);
                Ok((r.get("id")?, r.get("created")?))
            })
            .transpose()?;
            let (id, status) = match written {
                Some((id, true)) => (id, "created"),
                Some((id, false)) => (id, "updated"),
                None => {
                    let id = db::write(client, &FIND_LIMIT, &[ledger.id.into(), name.into()])?
                        .next()
                        .map(|r| Row(&r).get::<i64>("id"))
                        .transpose()?
                        .ok_or_else(|| BillingError::Internal("limit vanished".into()))?;
                    (id, "unchanged")
                }
            };
            db::write(client, &MARK_LIMITED, &[ledger.id.into()])?;
            ledger.flush(client)?;
            Ok((id, name.to_string(), status.to_string()))
        })
    })();
    TableIterator::once(result.or_raise())
}

/// Remove a limit by name (what it counted stays in billing.limit_usage).
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn remove_limit(account: Option<&str>, unit: Option<&str>, name: Option<&str>) -> bool {
    (|| -> Result<bool> {
        let (account, unit) = input::pool(account, unit)?;
        let name = input::required("name", name)?;
        input::name("name", name)?;
        let tenant = current_tenant()?;
        Spi::connect_mut(|client| {
            let mut ledger = PoolLedger::open(client, &tenant, account, unit, Create::Pool)?;
            let removed = db::write(client, &DROP_LIMIT, &[ledger.id.into(), name.into()])?
                .next()
                .is_some();
            db::write(client, &MARK_LIMITED, &[ledger.id.into()])?;
            ledger.flush(client)?;
            Ok(removed)
        })
    })()
    .or_raise()
}

static POOL_ID: Sql = Sql {
    text: "SELECT id FROM billing.pools WHERE tenant_id = $1 AND account = $2 AND unit = $3 AND lane = 0",
    args: &[TEXT, TEXT, TEXT],
};

/// Each limit of a pool that applies to `member` (NULL: the account's own):
/// what its window allows, has used and has left, and when it resets.
#[pg_extern(security_definer, stable)]
#[search_path(pg_catalog, billing, pg_temp)]
fn limits_status(
    account: Option<&str>,
    unit: Option<&str>,
    member: default!(Option<&str>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(name, String),
        name!(member, Option<String>),
        name!(max, i64),
        name!(used, i64),
        name!(remaining, i64),
        name!(window_start, Option<Tstz>),
        name!(resets_at, Option<Tstz>),
    ),
> {
    let result = (|| -> Result<Vec<_>> {
        let (account, unit) = input::pool(account, unit)?;
        let tenant = current_tenant()?;
        let now = time::now();
        let pool = Spi::connect(|client| -> Result<Option<i64>> {
            db::read(
                client,
                &POOL_ID,
                &[tenant.as_str().into(), account.into(), unit.into()],
            )?
            .next()
            .map(|r| Row(&r).get::<i64>("id"))
            .transpose()
        })?;
        let Some(pool) = pool else {
            return Ok(Vec::new());
        };
        Ok(now_for(pool, member, now)?
            .into_iter()
            .map(|l| {
                (
                    l.name,
                    Some(l.member).filter(|m| !m.is_empty()),
                    l.max,
                    l.used,
                    (l.max as i128 - l.used as i128).max(0) as i64,
                    (l.window_start != Ts::MIN).then(|| time::to_sql(l.window_start)),
                    l.resets_at.map(time::to_sql),
                )
            })
            .collect())
    })();
    TableIterator::new(result.or_raise())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(max: i64, used: i64) -> LimitState {
        LimitState {
            id: 1,
            name: "daily".into(),
            max,
            used,
            window_start: 0,
            resets_at: Some(86_400_000_000),
            member: String::new(),
        }
    }

    #[test]
    fn a_limit_allows_up_to_its_max_and_not_one_more() {
        assert!(limit(10, 10).allows(0), "0 at exactly the limit is allowed");
        assert!(!limit(10, 10).allows(1));
        assert!(limit(10, 3).allows(7));
        assert!(!limit(10, 3).allows(8));
        assert!(
            !limit(10, 11).allows(0),
            "past it (incurred usage) nothing more"
        );
        assert!(limit(i64::MAX, i64::MAX).allows(0), "no overflow");
    }

    #[test]
    fn the_first_limit_passed_is_the_one_named() {
        let limits = [limit(100, 10), {
            let mut l = limit(20, 15);
            l.name = "hourly".into();
            l
        }];
        assert_eq!(blocking(&limits, 5), None);
        assert_eq!(
            blocking(&limits, 6).map(|l| l.name.as_str()),
            Some("hourly")
        );
    }

    #[test]
    fn a_member_is_the_member_property_when_it_is_a_string() {
        assert_eq!(
            member_of(&serde_json::json!({"member": "u1"})).as_deref(),
            Some("u1")
        );
        assert_eq!(member_of(&serde_json::json!({"member": 1})), None);
        assert_eq!(member_of(&serde_json::json!({})), None);
    }
}
