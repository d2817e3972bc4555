//! The pool store: pools locked, their grants and holds loaded, handed to the
//! pure [`core`], and what the core computed written back. One set-based path
//! for one pool or many (a single call is a batch of one): the pools are locked
//! and their grants read straight on their indexes (`crate::direct`), and one
//! statement writes usage events, grant remainders, ledger entries and pool
//! rows (expired holds, rare, by another).
//!
//! Every write to a pool goes through [`PoolLedger`], under the pool's row lock
//! (`SELECT … FOR UPDATE`), so concurrent debits serialise on the pool and the
//! floor rule is checked against committed state: zero overspend. Rows are
//! read by column name.

pub mod core;
mod drawn;
mod lanes;
pub mod pool_rows;

/// UNIQUE (tenant_id, account, unit, lane) of billing.pools.
const POOLS_KEY: &std::ffi::CStr = c"pools_tenant_id_account_unit_lane_key";

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use rustc_hash::FxHashMap;
use std::ops::{Deref, DerefMut};

use pgrx::datum::TimestampWithTimeZone as Tstz;
use pgrx::spi::{SpiClient, SpiTupleTable};
use serde_json::json;

use crate::db::{self, Row, Sql, INT4_ARRAY, INT8, INT8_ARRAY, TEXT, TEXT_ARRAY};
use crate::direct::{
    self, EnumType, Key, Lookup, RowAt, Sequence, Snapshot, Tuple, Waiting, Writer,
};
use crate::error::{BillingError, Result};
use crate::metering::store::KeptCounter;
use crate::time::{self, Ts};
use pgrx::pg_sys;

pub use self::core::{cache_valid, Figures};
use self::core::{Booked, Entry, Holds, OpenHold, Pool};
pub use self::core::{Drain, EntryKind, GrantState};
pub use self::drawn::Drawn;

impl From<self::core::Overflow> for BillingError {
    fn from(o: self::core::Overflow) -> Self {
        BillingError::Overflow(o.0)
    }
}

pub fn drains_json(drains: &[Drain]) -> serde_json::Value {
    serde_json::Value::Array(
        drains
            .iter()
            .map(|d| json!({"grant_id": d.grant_id, "amount": d.amount}))
            .collect(),
    )
}

/// A locked pool: where it is, and the core's view of it. A split pool is
/// locked with its lanes (`shares`), whose credit it has collected back;
/// a lane taken alone by a debit knows the rest of the pool only as the
/// figures in `others` (the pool's floor among them), as last written.
pub struct PoolLedger {
    pub id: i64,
    pub tenant: String,
    pub account: String,
    pub unit: String,
    /// On lane 0: how many lanes take debits beside it.
    pub lanes: i32,
    pool: Pool,
    shares: Vec<PoolLedger>,
    /// Each lane share grant of this pool → the grant it is a share of.
    parents: FxHashMap<i64, i64>,
    others: Option<Figures>,
    /// On a lane: the instant its credit stops being what the pool drains
    /// next (the pool row's next change of state by the clock when it was
    /// dealt, e.g. a grant that comes first becoming spendable). The lane's
    /// row is cached no longer than that, so no debit takes it afterwards
    /// until the pool deals again. `Ts::MAX` on a pool's own row.
    next_in_order_until: Ts,
    /// The start of the first allowance window not granted yet (lane 0).
    pub allowance_next: Ts,
    /// Whether limits cap its usage (lane 0).
    pub limited: bool,
    /// Below what available a debit asks for an auto-reload (lane 0; None:
    /// no rule, or one that is waiting on a request or suspended).
    pub reload_below: Option<i64>,
    /// The pool's balance alerts (lane 0): below what available a debit
    /// fires one, and from what available a credit re-arms one.
    pub alerts: AlertBounds,
    /// The hourly usage counter its row keeps, and whether to write it.
    pub counter: Option<KeptCounter>,
    pub counter_changed: bool,
    /// Where its row's current version and its loaded grants' rows are, so
    /// their updates need not search the primary key again.
    rows_at: RowsAt,
    /// What its row has drawn from the grant being drained (`drawn`), and
    /// what the rows of the grants read hold.
    drawn: Drawn,
    stored: FxHashMap<i64, i64>,
}

/// Where a pool row and its grants' rows were last seen in this call.
#[derive(Default)]
struct RowsAt {
    pool: Option<RowAt>,
    grants: FxHashMap<i64, RowAt>,
}

impl Deref for PoolLedger {
    type Target = Pool;
    fn deref(&self) -> &Pool {
        &self.pool
    }
}

impl DerefMut for PoolLedger {
    fn deref_mut(&mut self) -> &mut Pool {
        &mut self.pool
    }
}

/// The lane shares of grant $1 in the lane pools $2, created empty
/// where missing: same kind, priority and window; credit arrives by transfer.
static SHARES_OF_GRANT: Sql = Sql {
    text: "WITH made AS ( \
             INSERT INTO billing.grants (tenant_id, pool_id, account, unit, kind, priority, amount, \
                remaining, exhausted, effective_at, expires_at, request_hash, parent_id) \
             SELECT g.tenant_id, s.pool_id, g.account, g.unit, g.kind, g.priority, g.amount, 0, true, \
                    g.effective_at, g.expires_at, g.request_hash, g.id \
             FROM billing.grants g CROSS JOIN unnest($2::bigint[]) AS s(pool_id) WHERE g.id = $1 \
             ON CONFLICT (parent_id, pool_id) WHERE parent_id IS NOT NULL DO NOTHING \
             RETURNING id, pool_id) \
           SELECT id, pool_id FROM made \
           UNION ALL \
           SELECT id, pool_id FROM billing.grants WHERE parent_id = $1 AND pool_id = ANY($2)",
    args: &[INT8, INT8_ARRAY],
};

static LOAD_OPEN_HOLDS: Sql = Sql {
    text: "SELECT pool_id, id, amount, expires_at FROM billing.holds \
           WHERE pool_id = ANY($1) AND status = 'open'",
    args: &[INT8_ARRAY],
};

static CREATE_UNITS: Sql = Sql {
    text: "INSERT INTO billing.units (tenant_id, unit) SELECT DISTINCT $1, u FROM unnest($2::text[]) u \
           ON CONFLICT DO NOTHING",
    args: &[TEXT, TEXT_ARRAY],
};

static CREATE_POOLS: Sql = Sql {
    text: "WITH k AS (SELECT * FROM unnest($2::text[], $3::text[], $4::int[]) AS k(account, unit, lane)), \
                a AS (INSERT INTO billing.accounts (tenant_id, account) \
                      SELECT DISTINCT $1, account FROM k ON CONFLICT DO NOTHING) \
           INSERT INTO billing.pools (tenant_id, account, unit, lane) \
           SELECT $1, account, unit, lane FROM k \
           ON CONFLICT DO NOTHING \
           RETURNING account, unit, lane",
    args: &[TEXT, TEXT_ARRAY, TEXT_ARRAY, INT4_ARRAY],
};

/// Pools this call made get the tenant's default plan (sql/subscriptions.sql).
static ENROLL_NEW_POOLS: Sql = Sql {
    text: "SELECT billing.enroll_new_pools($1, $2, $3)",
    args: &[TEXT, TEXT_ARRAY, TEXT_ARRAY],
};

/// Expired holds are closed, and what they counted in their pools' limits
/// is given back (src/limits.rs).
static EXPIRE_HOLDS: Sql = Sql {
    text: "WITH expired AS (UPDATE billing.holds SET status = 'expired', closed_at = now() \
                            WHERE id = ANY($1) RETURNING id) \
           SELECT billing.give_back_limits(array_agg(id)) FROM expired",
    args: &[INT8_ARRAY],
};

/// Usage events to record with what their pools computed (the caller,
/// ingest or settle, owns them): `write` inserts each, for `tenant`, through `w`.
pub trait EventRows {
    fn count(&self) -> usize;
    /// Each event's row carries its ledger entry if `carried` has one
    /// (`CarriedEntries::set_columns`).
    fn write(&self, tenant: &str, w: &mut Writer, carried: &CarriedEntries) -> Result<()>;
}

/// The ledger entries that usage events carry on their own rows
/// (`core::entries_events_carry`), by event id; `write_entries` leaves them out.
pub struct CarriedEntries<'a>(FxHashMap<i64, &'a Entry>);

impl CarriedEntries<'_> {
    /// The entry columns of event `event_id`'s row: its entry, or NULLs.
    pub fn set_columns(&self, w: &mut Writer, event_id: i64) -> Result<()> {
        let e = self.0.get(&event_id);
        w.set(c"entry_version", e.map(|e| e.version))?
            .set(c"entry_grant", e.and_then(|e| e.grant_id))?
            .set(c"balance_after", e.map(|e| e.balance_after))?
            .set(c"debt_after", e.map(|e| e.debt_after))?
            .set(c"held_after", e.map(|e| e.held_after))?
            .set(c"entry_at", e.map(|e| time::to_sql(e.effective_at)))?;
        Ok(())
    }

    fn carries(&self, e: &Entry) -> bool {
        e.event_id.is_some_and(|id| self.carries_event(id))
    }

    pub fn carries_event(&self, event_id: i64) -> bool {
        self.0.contains_key(&event_id)
    }
}

/// Whether a pool that does not exist yet may be created by this call.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// Create the unit too (a grant introduces a unit).
    UnitAndPool,
    /// Create the pool if the unit is known; an unknown unit is an error.
    Pool,
    /// As `UnitAndPool`, for a pool the caller gives an allowance rule of
    /// its own: a pool made now does not get the tenant's default plan.
    UnitAndPoolWithOwnRule,
}

/// A pool row's spendable figures as of its last write, valid until `until`.
struct CachedFigures {
    active_remaining: i64,
    active_held: i64,
    until: Ts,
}

/// A pool row as read, before its grants are loaded.
struct Locked {
    id: i64,
    lane: i32,
    lanes: i32,
    floor: i64,
    booked: Booked,
    /// The instant it was last brought up to date.
    since: Ts,
    /// The end of its cached window, as written.
    until: Ts,
    /// Its cached spendable figures, when valid now.
    cached: Option<CachedFigures>,
    /// Its grants with credit, when read with the locked version.
    grants: Option<PoolGrants>,
    allowance_next: Ts,
    limited: bool,
    reload_below: Option<i64>,
    alerts: AlertBounds,
    counter: Option<KeptCounter>,
    at: Option<RowAt>,
    drawn: Drawn,
}

/// The columns of a pool row that say where it stands, as stored.
pub struct PoolRow {
    pub id: i64,
    pub lane: i32,
    pub lanes: i32,
    pub floor: i64,
    pub version: i64,
    pub remaining: i64,
    pub debt: i64,
    pub held: i64,
    pub active_remaining: i64,
    pub active_held: i64,
    pub cache_from: Ts,
    pub cache_until: Ts,
    /// The start of the first allowance window not granted yet.
    pub allowance_next: Ts,
    /// Whether limits cap its usage.
    pub limited: bool,
    /// The armed auto-reload threshold (`billing.request_reload`).
    pub reload_below: Option<i64>,
    /// The balance alerts' bounds (`billing.pool_alerts`).
    pub alerts: AlertBounds,
    /// The hourly usage counter it keeps (read when the row is locked).
    pub counter: Option<KeptCounter>,
    /// Where this version of the row is (None when a statement read it).
    pub at: Option<RowAt>,
    /// What it has drawn from its grant being drained.
    pub drawn: Drawn,
}

impl Locked {
    fn from_pool_row(r: &PoolRow, now: Ts) -> Locked {
        let cached = cache_valid(r.cache_from, r.cache_until, now).then_some(CachedFigures {
            active_remaining: r.active_remaining,
            active_held: r.active_held,
            until: r.cache_until,
        });
        Locked {
            id: r.id,
            lane: r.lane,
            lanes: r.lanes,
            floor: r.floor,
            booked: Booked {
                version: r.version,
                remaining: r.remaining,
                debt: r.debt,
                held: r.held,
            },
            since: r.cache_from,
            until: r.cache_until,
            cached,
            grants: None,
            allowance_next: r.allowance_next,
            limited: r.limited,
            reload_below: r.reload_below,
            alerts: r.alerts,
            counter: r.counter.clone(),
            at: r.at,
            drawn: r.drawn,
        }
    }

    /// Its figures from the row alone, inside the row's cached window.
    fn cached_figures(&self) -> Option<Figures> {
        self.cached.as_ref().map(|c| Figures {
            balance: c.active_remaining,
            held: c.active_held,
            debt: self.booked.debt,
            floor: self.floor,
        })
    }
}

/// A pool row to lock: (account, unit, lane).
type PoolKey = (String, String, i32);

impl PoolLedger {
    /// Lock the pool of (tenant, account, unit), creating it as allowed, and
    /// bring it up to date at `now()`: record expiries and repay debt.
    pub fn open(
        client: &mut SpiClient<'_>,
        tenant: &str,
        account: &str,
        unit: &str,
        create: Create,
    ) -> Result<PoolLedger> {
        let key = [(account.to_string(), unit.to_string())];
        let mut pools = Self::open_many(client, tenant, &key, create)?;
        Ok(pools.remove(0))
    }

    /// Lock the pool of a grant or hold of this tenant: `find` takes ($1 id,
    /// $2 tenant) and returns (account, unit); no row is an unknown `what`.
    pub fn open_owner_of(
        client: &mut SpiClient<'_>,
        tenant: &str,
        find: &'static Sql,
        id: i64,
        what: &'static str,
    ) -> Result<PoolLedger> {
        let mut rows = db::write(client, find, &[id.into(), tenant.into()])?;
        let Some(row) = rows.next() else {
            return Err(BillingError::unknown(what, id.to_string()));
        };
        let row = Row(&row);
        let (account, unit): (String, String) = (row.get("account")?, row.get("unit")?);
        Self::open(client, tenant, &account, &unit, Create::Pool)
    }

    /// Lock the pools of `keys` (account, unit), creating the missing ones as
    /// allowed, load them, and bring each up to date at `now()`. A split
    /// pool is locked with its lanes and takes their credit back, so every
    /// operation sees the whole pool. Returned in the order of `keys`.
    pub fn open_many(
        client: &mut SpiClient<'_>,
        tenant: &str,
        keys: &[(String, String)],
        create: Create,
    ) -> Result<Vec<PoolLedger>> {
        let mut pools = Self::open_many_with_lanes(client, tenant, keys, create)?;
        for pool in pools.iter_mut() {
            pool.collect_shares()?;
        }
        Ok(pools)
    }

    /// As `open_many`, but a split pool keeps its lanes' credit where it is:
    /// for a debit that one of them may pay (`take_lane_paying`); anything
    /// else must `collect_shares` first.
    pub fn open_many_with_lanes(
        client: &mut SpiClient<'_>,
        tenant: &str,
        keys: &[(String, String)],
        create: Create,
    ) -> Result<Vec<PoolLedger>> {
        let what = match keys {
            [(account, unit)] => format!("the {unit} pool of account \"{account}\""),
            _ => format!("one of the {} pools of this batch", keys.len()),
        };
        let keys: Vec<PoolKey> = keys
            .iter()
            .map(|(a, u)| (a.clone(), u.clone(), 0))
            .collect();
        let mut pools = Self::open_rows(client, tenant, &keys, create, &what)?;
        for pool in pools.iter_mut().filter(|p| p.lanes > 0) {
            let lanes: Vec<PoolKey> = (1..=pool.lanes)
                .map(|s| (pool.account.clone(), pool.unit.clone(), s))
                .collect();
            pool.shares = Self::open_rows(client, tenant, &lanes, Create::Pool, &what)?;
        }
        remember_split(tenant, &pools);
        Ok(pools)
    }

    /// A lane of this (locked, split) pool that can pay `cost` alone, taken
    /// out to be debited like one locked by `lock_share`: the pool and its
    /// other lanes stay as they are (whatever they computed is not written).
    pub fn take_lane_paying(&mut self, cost: i64) -> Option<PoolLedger> {
        let i = self
            .shares
            .iter()
            .position(|l| l.now < l.next_in_order_until && l.allows(cost))?;
        let mut lane = self.shares.swap_remove(i);
        lane.others = Some(self.pool_figures());
        Some(lane)
    }

    /// Lock and load pool rows (pools or lanes), creating missing ones.
    fn open_rows(
        client: &mut SpiClient<'_>,
        tenant: &str,
        keys: &[PoolKey],
        create: Create,
        what: &str,
    ) -> Result<Vec<PoolLedger>> {
        let now = time::now();
        let mut found = Self::lock(tenant, keys, now, what)?;
        if found.len() < keys.len() {
            let missing: Vec<PoolKey> = keys
                .iter()
                .filter(|k| !found.contains_key(*k))
                .cloned()
                .collect();
            // creating a pool waits for another transaction creating the same one
            Self::create(client, tenant, &missing, create, what)?;
            found.extend(Self::lock(tenant, &missing, now, what)?);
        }
        let mut locked = Vec::with_capacity(keys.len());
        for k in keys {
            let l = found
                .remove(k)
                .ok_or_else(|| BillingError::Internal("pool vanished after creation".into()))?;
            locked.push((k, l));
        }
        let stale: Vec<i64> = locked
            .iter()
            .filter(|(_, l)| l.cached.is_none())
            .map(|(_, l)| l.id)
            .collect();
        let mut holds = load_open_holds(client, &stale)?;
        let mut ledgers: Vec<PoolLedger> = locked
            .into_iter()
            .map(|((account, unit, _), mut l)| {
                let holds = match l.cached.take() {
                    Some(c) => Holds::Cached {
                        active_held: c.active_held,
                        until: c.until,
                    },
                    None => Holds::Loaded(holds.remove(&l.id).unwrap_or_default()),
                };
                let grants = l.grants.take().unwrap_or_default();
                PoolLedger::from_locked(tenant, account, unit, l, now, grants, holds)
            })
            .collect();
        for ledger in ledgers.iter_mut().filter(|l| l.allowance_next <= now) {
            crate::allowances::grant_due(client, ledger)?;
        }
        Ok(ledgers)
    }

    fn from_locked(
        tenant: &str,
        account: &str,
        unit: &str,
        l: Locked,
        now: Ts,
        grants: PoolGrants,
        holds: Holds,
    ) -> PoolLedger {
        PoolLedger {
            id: l.id,
            next_in_order_until: if l.lane > 0 { l.until } else { Ts::MAX },
            tenant: tenant.to_string(),
            account: account.to_string(),
            unit: unit.to_string(),
            lanes: l.lanes,
            pool: Pool::open(l.booked, l.floor, l.since, now, grants.grants, holds),
            shares: Vec::new(),
            parents: grants.parents,
            others: None,
            allowance_next: if l.lane == 0 {
                l.allowance_next
            } else {
                Ts::MAX
            },
            limited: l.limited,
            reload_below: if l.lane == 0 { l.reload_below } else { None },
            alerts: if l.lane == 0 {
                l.alerts
            } else {
                AlertBounds::default()
            },
            counter: l.counter,
            counter_changed: false,
            rows_at: RowsAt {
                pool: l.at,
                grants: grants.at,
            },
            drawn: l.drawn,
            stored: grants.stored,
        }
    }

    /// Lock the pool rows of `keys` (`SELECT … FOR UPDATE`, straight on the
    /// pools' unique index), in one order for every caller, (account, unit,
    /// lane) in byte order, so two calls never deadlock; then read their
    /// grants with credit with a new snapshot, which sees what each lock's
    /// previous holder committed. Rows that do not exist are not returned.
    fn lock(
        tenant: &str,
        keys: &[PoolKey],
        now: Ts,
        what: &str,
    ) -> Result<HashMap<PoolKey, Locked>> {
        let mut order: Vec<&PoolKey> = keys.iter().collect();
        order.sort();
        order.dedup();
        let mut found: HashMap<PoolKey, Locked> = HashMap::new();
        db::waiting_for(what, || -> Result<()> {
            let mut pools = Lookup::open_for_update(c"pools", POOLS_KEY, 4)?;
            for k in order {
                let (account, unit, lane) = k;
                let lane = i16::try_from(*lane)
                    .map_err(|_| BillingError::Internal(format!("lane {lane} out of range")))?;
                let key = [
                    Key::Text(tenant),
                    Key::Text(account),
                    Key::Text(unit),
                    Key::Int2(lane),
                ];
                for row in pools.find_locked(&key, pool_rows::locked_pool_row)? {
                    found.insert(k.clone(), Locked::from_pool_row(&row, now));
                }
            }
            pools.close();
            Ok(())
        })?;
        // in id order: neighbours in the grants' drain-order index
        let mut ids: Vec<(i64, Drawn)> = found.values().map(|l| (l.id, l.drawn)).collect();
        ids.sort_unstable_by_key(|(id, _)| *id);
        let mut grants = load_grants(&ids, Snapshot::New)?;
        for l in found.values_mut() {
            l.grants = Some(grants.remove(&l.id).unwrap_or_default());
        }
        Ok(found)
    }

    fn create(
        client: &mut SpiClient<'_>,
        tenant: &str,
        keys: &[PoolKey],
        create: Create,
        what: &str,
    ) -> Result<()> {
        let (accounts, units, lanes) = key_columns(keys);
        if let Some(u) = first_unknown_unit(tenant, &units, Snapshot::New)? {
            if create == Create::Pool {
                return Err(BillingError::unknown("unit", u));
            }
            db::write(
                client,
                &CREATE_UNITS,
                &[tenant.into(), units.clone().into()],
            )?;
        }
        let made = db::write_waiting_for(
            client,
            &CREATE_POOLS,
            &[tenant.into(), accounts.into(), units.into(), lanes.into()],
            what,
        )?
        .map(|r| {
            let r = Row(&r);
            Ok((
                r.get::<String>("account")?,
                r.get::<String>("unit")?,
                r.get::<i32>("lane")?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
        let (accounts, units): (Vec<String>, Vec<String>) = made
            .into_iter()
            .filter(|(_, _, lane)| *lane == 0)
            .map(|(a, u, _)| (a, u))
            .unzip();
        if !accounts.is_empty()
            && create != Create::UnitAndPoolWithOwnRule
            && has_default_plan(tenant)?
        {
            db::write(
                client,
                &ENROLL_NEW_POOLS,
                &[tenant.into(), accounts.into(), units.into()],
            )?;
        }
        Ok(())
    }

    /// For a debit of `cost` on a split pool: one lane that can pay it
    /// alone, locked while the pool's other lanes stay free for other
    /// debits. None when the pool is not split (as far as this backend
    /// knows) or no lane can pay it: then open the whole pool. First a free
    /// lane is taken, passing by those other debits hold; if every lane that
    /// can pay is held, this backend waits for one of them (`lanes::to_try`).
    /// Each try runs in a subtransaction, so a try that fails holds no lane
    /// afterwards (a lane found emptied once locked stays locked otherwise).
    pub fn lock_share(
        tenant: &str,
        account: &str,
        unit: &str,
        cost: i64,
    ) -> Result<Option<PoolLedger>> {
        if !known_split(tenant, account, unit) {
            return Ok(None);
        }
        for waiting in [Waiting::Skip, Waiting::Block] {
            let share = db::attempt(|| Self::try_share(tenant, account, unit, cost, waiting))?;
            if share.is_some() {
                return Ok(share);
            }
        }
        Ok(None)
    }

    /// The pool's rows are read with a new snapshot, straight from the
    /// pools' unique index; the lane to take is locked there and checked
    /// again in the version locked (what `SELECT … FOR UPDATE` rechecks).
    /// The rest of the pool is known by its rows as read: their cached
    /// figures, and the pool's floor.
    fn try_share(
        tenant: &str,
        account: &str,
        unit: &str,
        cost: i64,
        waiting: Waiting,
    ) -> Result<Option<PoolLedger>> {
        let what = format!("a lane of the {unit} pool of account \"{account}\"");
        let now = time::now();
        let taken = db::waiting_for(&what, || -> Result<Option<(PoolRow, Figures)>> {
            let mut pools = Lookup::open_for_update(c"pools", POOLS_KEY, 3)?;
            let key = [Key::Text(tenant), Key::Text(account), Key::Text(unit)];
            let rows = pools.find(&key, pool_rows::pool_row)?;
            // SAFETY: a backend's own process id.
            let pid = unsafe { pg_sys::MyProcPid };
            let mut taken = None;
            for i in lanes::to_try(&rows, cost, now, waiting, pid) {
                let Some(at) = rows[i].at else { continue };
                let Some(row) = pools.lock_found(at, waiting, pool_rows::locked_pool_row)? else {
                    continue;
                };
                // emptied meanwhile: the subtransaction's rollback frees it
                if lanes::pays_alone(&row, cost, now) {
                    taken = Some((row, lanes::others(&rows, i)?));
                }
                break;
            }
            pools.close();
            Ok(taken)
        })?;
        let Some((row, others)) = taken else {
            return Ok(None);
        };
        // a lane holds no holds; its cached total is exact until cache_until
        let holds = Holds::Cached {
            active_held: row.active_held,
            until: row.cache_until,
        };
        let locked = Locked::from_pool_row(&row, now);
        let grants = load_grants(&[(locked.id, locked.drawn)], Snapshot::New)?
            .remove(&locked.id)
            .unwrap_or_default();
        let mut share = PoolLedger::from_locked(tenant, account, unit, locked, now, grants, holds);
        share.others = Some(others);
        Ok(Some(share))
    }

    /// Bring one grant of this pool into memory even when nothing is left of
    /// it or it is suspended (the drain loads only spendable-status grants
    /// with credit), so credit can return to it or it can be resumed.
    pub fn load_grant(&mut self, grant_id: i64) -> Result<()> {
        if self.pool.has_grant(grant_id) {
            return Ok(());
        }
        let mut lookup = Lookup::open(c"grants", c"grants_pkey", 1, Snapshot::New)?;
        let row = lookup
            .find(&[Key::Int8(grant_id)], |t| {
                let (pool, parent, grant, at) = grant_row(t)?;
                let suspended = t.get::<String>(c"status")? == SUSPENDED;
                Ok((pool, parent, grant.with_suspended(suspended), at))
            })?
            .pop();
        lookup.close();
        let (_, parent, mut grant, at) =
            row.ok_or_else(|| BillingError::Internal(format!("grant {grant_id} vanished")))?;
        self.stored.insert(grant_id, grant.remaining);
        grant.remaining -= self.drawn.from(grant_id);
        self.rows_at.grants.insert(grant_id, at);
        if let Some(parent) = parent {
            self.parents.insert(grant_id, parent);
        }
        self.pool.insert_in_drain_order(grant);
        Ok(())
    }

    /// Move `amount` into (or, negative, out of) one of this pool's grants.
    fn transfer(&mut self, grant_id: i64, amount: i64) -> Result<()> {
        if self.pool.transfer(grant_id, amount)? {
            Ok(())
        } else {
            Err(BillingError::Internal(format!(
                "grant {grant_id} is not loaded in pool {}",
                self.id
            )))
        }
    }

    /// Take every lane's credit back to the grants it is a share of, so
    /// the pool's own drain order, holds, debt and floor apply to all of it.
    pub fn collect_shares(&mut self) -> Result<()> {
        if self.shares.is_empty() {
            return Ok(());
        }
        let mut shares = std::mem::take(&mut self.shares);
        for share in shares.iter_mut() {
            let credited: Vec<(i64, i64)> = share.credited_grants().collect();
            for (grant, amount) in credited {
                let parent = *share.parents.get(&grant).ok_or_else(|| {
                    BillingError::Internal(format!("lane grant {grant} has no parent"))
                })?;
                self.load_grant(parent)?;
                share.transfer(grant, -amount)?;
                self.transfer(parent, amount)?;
            }
        }
        self.shares = shares;
        self.pool.catch_up();
        Ok(())
    }

    /// Deal part of the first grant in drain order to each lane, so that
    /// the next debits can take it in parallel. Only spendable credit above
    /// the floor is dealt, and only of that one grant: a lane then drains
    /// exactly what the pool would drain next, and what all lanes and the
    /// pool hold stays at or above the floor whatever they accept.
    pub fn deal_shares(&mut self, client: &mut SpiClient<'_>) -> Result<()> {
        if self.shares.is_empty() {
            return Ok(());
        }
        let Some((head, remaining)) = self.pool.head_grant() else {
            return Ok(());
        };
        let above_floor = (self.available() as i128 - self.floor as i128).max(0);
        let dealt = (remaining as i128).min(above_floor);
        let share = (dealt / (self.shares.len() as i128 + 1)) as i64;
        if share == 0 {
            return Ok(());
        }
        let pools: Vec<i64> = self.shares.iter().map(|s| s.id).collect();
        let mut share_ids: FxHashMap<i64, i64> = FxHashMap::default();
        for row in db::write(client, &SHARES_OF_GRANT, &[head.into(), pools.into()])? {
            let row = Row(&row);
            share_ids.insert(row.get("pool_id")?, row.get("id")?);
        }
        let head_state = self
            .pool
            .grant(head)
            .cloned()
            .ok_or_else(|| BillingError::Internal("head grant vanished".into()))?;
        let mut shares = std::mem::take(&mut self.shares);
        for lane in shares.iter_mut() {
            let id = *share_ids.get(&lane.id).ok_or_else(|| {
                BillingError::Internal(format!("no share of grant {head} in pool {}", lane.id))
            })?;
            if !lane.pool.has_grant(id) {
                let mut g = head_state.clone();
                g.id = id;
                g.remaining = 0;
                lane.pool.insert_in_drain_order(g);
                lane.parents.insert(id, head);
            }
            self.transfer(head, -share)?;
            lane.transfer(id, share)?;
        }
        let in_order_until = self.pool.cache_until();
        for lane in shares.iter_mut() {
            lane.next_in_order_until = in_order_until;
        }
        self.shares = shares;
        Ok(())
    }

    /// A lane of a split pool, locked alone for a debit.
    pub fn is_lane(&self) -> bool {
        self.others.is_some()
    }

    /// The drains of a debit as the grants the caller knows: a lane's
    /// share is reported as the grant it is a share of.
    pub fn grant_drains(&self, drains: &[Drain]) -> Vec<Drain> {
        drains
            .iter()
            .map(|d| Drain {
                grant_id: self.parents.get(&d.grant_id).copied().unwrap_or(d.grant_id),
                amount: d.amount,
            })
            .collect()
    }

    /// The whole pool's figures: this row, the lanes it holds, and (for a
    /// lane locked alone) the rest of the pool as last written.
    fn pool_figures(&self) -> Figures {
        let own = self.figures();
        let pool = self.others.map_or(own, |rest| rest.plus(own));
        self.shares
            .iter()
            .fold(pool, |f, lane| f.plus(lane.figures()))
    }

    /// Whether this change spent credit (a debit, debt or a hold), on the
    /// pool or its lanes.
    fn spent(&self) -> bool {
        std::iter::once(self)
            .chain(self.shares.iter())
            .flat_map(|l| l.entries().iter())
            .any(|e| matches!(e.kind, EntryKind::Debit | EntryKind::Debt | EntryKind::Hold))
    }

    pub fn pool_available(&self) -> i64 {
        self.pool_figures().available()
    }

    /// Whether the whole pool is at or above its floor.
    pub fn pool_entitled(&self) -> bool {
        self.pool_figures().allows(0)
    }

    pub fn insufficient(&self, requested: i64) -> BillingError {
        BillingError::InsufficientCredits {
            unit: self.unit.clone(),
            available: self.pool_available(),
            requested,
            floor: self.floor,
        }
    }

    /// Write what this pool computed. Nothing is written before this.
    pub fn flush(&mut self, client: &mut SpiClient<'_>) -> Result<()> {
        flush_all(client, std::slice::from_mut(self), None)
    }
}

/// The (account, unit, lane) columns of pool keys.
fn key_columns(keys: &[PoolKey]) -> (Vec<&str>, Vec<&str>, Vec<i32>) {
    let mut columns = (Vec::new(), Vec::new(), Vec::new());
    for (account, unit, lane) in keys {
        columns.0.push(account.as_str());
        columns.1.push(unit.as_str());
        columns.2.push(*lane);
    }
    columns
}

thread_local! {
    /// The pools this backend last saw split: a debit tries a lane of
    /// these first. Only a hint: a stale entry costs one statement, and a
    /// pool split since is found split when it is next locked.
    static SPLIT: RefCell<HashSet<(String, String, String)>> = RefCell::new(HashSet::new());
}

fn known_split(tenant: &str, account: &str, unit: &str) -> bool {
    SPLIT.with(|s| {
        let s = s.borrow();
        !s.is_empty() && s.contains(&(tenant.to_string(), account.to_string(), unit.to_string()))
    })
}

fn remember_split(tenant: &str, pools: &[PoolLedger]) {
    SPLIT.with(|s| {
        let mut s = s.borrow_mut();
        for p in pools {
            if p.lanes == 0 && s.is_empty() {
                continue;
            }
            let key = (tenant.to_string(), p.account.clone(), p.unit.clone());
            if p.lanes > 0 {
                s.insert(key);
            } else {
                s.remove(&key);
            }
        }
    });
}

/// The first of `units` the tenant has not defined, if any: read with the
/// query's snapshot by the gate, with a new one after a lock.
pub fn first_unknown_unit<'u>(
    tenant: &str,
    units: &[&'u str],
    snapshot: Snapshot,
) -> Result<Option<&'u str>> {
    let mut lookup = Lookup::open(c"units", c"units_pkey", 2, snapshot)?;
    let mut unknown = None;
    for unit in units {
        if lookup
            .find(&[Key::Text(tenant), Key::Text(unit)], |_| Ok(()))?
            .is_empty()
        {
            unknown = Some(*unit);
            break;
        }
    }
    lookup.close();
    Ok(unknown)
}

/// Whether the tenant has a default plan, which every new pool of its
/// units runs (`billing.enroll_new_pools`).
fn has_default_plan(tenant: &str) -> Result<bool> {
    let found = direct::find_one(
        c"default_plans",
        c"default_plans_pkey",
        &[Key::Text(tenant)],
        Snapshot::New,
        |_| Ok(()),
    )?;
    Ok(found.is_some())
}

/// The status of a grant whose credit is kept but not spendable.
pub const SUSPENDED: &str = "suspended";

/// A grant row: (its pool, the grant it is a lane share of, its state, where the row is).
fn grant_row(t: &Tuple) -> Result<(i64, Option<i64>, GrantState, RowAt)> {
    Ok((
        t.get(c"pool_id")?,
        t.opt(c"parent_id")?,
        GrantState::new(
            t.get(c"id")?,
            t.get(c"priority")?,
            t.get(c"remaining")?,
            // a timestamptz is its microseconds, as `Ts`
            t.get::<i64>(c"effective_at")?,
            t.opt::<i64>(c"expires_at")?,
        ),
        t.at(),
    ))
}

/// A pool's grants with credit, and which of them are lane shares of which grant.
#[derive(Default)]
struct PoolGrants {
    grants: Vec<GrantState>,
    parents: FxHashMap<i64, i64>,
    /// Where each grant's row is, when read from the table.
    at: FxHashMap<i64, RowAt>,
    /// What each grant's row holds.
    stored: FxHashMap<i64, i64>,
}

impl PoolGrants {
    /// From the grants as read from their rows to what they have left:
    /// less what the pool's row has drawn from its grant being drained.
    fn draw_down(&mut self, drawn: Drawn) {
        for g in self.grants.iter_mut() {
            self.stored.insert(g.id, g.remaining);
            g.remaining -= drawn.from(g.id);
        }
        self.grants.retain(|g| g.remaining > 0);
    }
}

/// The grants with credit of `pools`, from the index of open grants in
/// drain order: with a new snapshot after a lock (it sees what the lock's
/// previous holder committed), with the query's for a pure read.
fn load_grants(pools: &[(i64, Drawn)], snapshot: Snapshot) -> Result<FxHashMap<i64, PoolGrants>> {
    let mut by_pool: FxHashMap<i64, PoolGrants> = FxHashMap::default();
    if pools.is_empty() {
        return Ok(by_pool);
    }
    let mut lookup = Lookup::open(c"grants", c"grants_drain_order", 1, snapshot)?;
    for (pool, _) in pools {
        for (pool, parent, grant, at) in lookup.find(&[Key::Int8(*pool)], grant_row)? {
            if grant.remaining <= 0 {
                continue;
            }
            let entry = by_pool.entry(pool).or_default();
            entry.at.insert(grant.id, at);
            if let Some(parent) = parent {
                entry.parents.insert(grant.id, parent);
            }
            entry.grants.push(grant);
        }
    }
    lookup.close();
    for (pool, drawn) in pools {
        if let Some(grants) = by_pool.get_mut(pool) {
            grants.draw_down(*drawn);
        }
    }
    Ok(by_pool)
}

fn load_open_holds(
    client: &mut SpiClient<'_>,
    pools: &[i64],
) -> Result<FxHashMap<i64, Vec<OpenHold>>> {
    if pools.is_empty() {
        return Ok(FxHashMap::default());
    }
    holds_by_pool(db::write(
        client,
        &LOAD_OPEN_HOLDS,
        &[pools.to_vec().into()],
    )?)
}

fn holds_by_pool(rows: SpiTupleTable<'_>) -> Result<FxHashMap<i64, Vec<OpenHold>>> {
    let mut by_pool: FxHashMap<i64, Vec<OpenHold>> = FxHashMap::default();
    for row in rows {
        let row = Row(&row);
        let expires_at: Tstz = row.get("expires_at")?;
        by_pool
            .entry(row.get("pool_id")?)
            .or_default()
            .push(OpenHold {
                id: row.get("id")?,
                amount: row.get("amount")?,
                expires_at: expires_at.into(),
            });
    }
    Ok(by_pool)
}

/// The figures of a pool at `now`, for the gate, summed over its rows
/// (`pool_rows::read`; a split pool has one per lane, and the floor is the
/// pool's): None if it has no row. Each row answers inside its cached window
/// from the row alone, with no statement run; outside it, its grants and open
/// holds are read and it is brought up to date in memory, exactly as a write
/// would, and nothing is written.
pub fn figures_now(rows: &[PoolRow]) -> Result<Option<Figures>> {
    let now = time::now();
    let mut total: Option<Figures> = None;
    for row in rows {
        // the pool's own row comes first (index order): its floor is the pool's
        let f = row_figures_now(Locked::from_pool_row(row, now), now)?;
        total = Some(total.map_or(f, |t| t.plus(f)));
    }
    Ok(total)
}

/// The pool's figures now from its rows alone, when every row is inside its
/// cached window (the common case, and the only one that needs no statement);
/// None when the pool has no row or a row's window has passed.
pub fn cached_figures(rows: &[PoolRow], now: Ts) -> Option<Figures> {
    let mut total: Option<Figures> = None;
    for row in rows {
        let f = Locked::from_pool_row(row, now).cached_figures()?;
        total = Some(total.map_or(f, |t| t.plus(f)));
    }
    total
}

fn row_figures_now(l: Locked, now: Ts) -> Result<Figures> {
    if let Some(f) = l.cached_figures() {
        return Ok(f);
    }
    // the pool row and its holds are read with the query's snapshot: so are its grants
    let grants = load_grants(&[(l.id, l.drawn)], Snapshot::Query)?
        .remove(&l.id)
        .unwrap_or_default()
        .grants;
    let holds = pgrx::spi::Spi::connect(|client| -> Result<_> {
        let args = [vec![l.id].into()];
        let mut holds = holds_by_pool(db::read(client, &LOAD_OPEN_HOLDS, &args)?)?;
        Ok(holds.remove(&l.id).unwrap_or_default())
    })?;
    let pool = Pool::open(
        l.booked,
        l.floor,
        l.since,
        now,
        grants,
        Holds::Loaded(holds),
    );
    Ok(pool.figures())
}

/// Whether a flush wrote everything, or nothing because one of its usage
/// events was recorded meanwhile by another transaction (see `flush_checked`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    All,
    KeyTaken,
}

/// `flush_checked` where no other transaction can record the events' keys
/// meanwhile (the pool's lock is held).
pub fn flush_all(
    client: &mut SpiClient<'_>,
    ledgers: &mut [PoolLedger],
    events: Option<&dyn EventRows>,
) -> Result<()> {
    match flush_checked(client, ledgers, events, false)? {
        Flushed::All => Ok(()),
        Flushed::KeyTaken => Err(BillingError::Internal(
            "a usage event key was recorded by another transaction while its pool was locked"
                .into(),
        )),
    }
}

/// Write what the given pools (and the lanes they hold) computed, and the
/// usage events that caused it, straight into the tables (`direct::Writer`):
/// the events first, then ledger entries, grant remainders and pool rows;
/// expired holds, which are rare, by a statement. A key recorded meanwhile
/// raises 23505 unless the caller can answer with the recorded event
/// (`key_race_possible`: a debit that locked one lane of a pool, where two
/// debits of one key may run at once): then the events are written in a
/// subtransaction, nothing is written if one of them is taken, and the
/// answer is `KeyTaken`.
pub fn flush_checked(
    client: &mut SpiClient<'_>,
    ledgers: &mut [PoolLedger],
    events: Option<&dyn EventRows>,
    key_race_possible: bool,
) -> Result<Flushed> {
    let all: Vec<&PoolLedger> = ledgers
        .iter()
        .flat_map(|l| std::iter::once(l).chain(l.shares.iter()))
        .collect();
    let changed: Vec<&PoolLedger> = all
        .iter()
        .copied()
        .filter(|l| l.is_changed() || l.counter_changed)
        .collect();
    let events = events.filter(|e| e.count() > 0);
    if changed.is_empty() && events.is_none() {
        return Ok(Flushed::All);
    }
    let tenant = ledgers
        .first()
        .map(|l| l.tenant.clone())
        .ok_or_else(|| BillingError::Internal("events without a pool".into()))?;
    let carried = CarriedEntries(self::core::entries_events_carry(
        changed.iter().flat_map(|l| l.entries().iter()),
    ));
    if let Some(events) = events {
        let write = || -> Result<()> {
            let mut w = Writer::open(c"usage_events")?;
            events.write(&tenant, &mut w, &carried)?;
            w.close();
            Ok(())
        };
        // a key another transaction is recording: wait as for any row, bounded
        let what = "a usage event key another transaction is recording";
        if key_race_possible {
            if !db::waiting_for(what, || db::attempt_unless_key_taken(write))? {
                if direct::snapshot_isolation() {
                    // this transaction's snapshot cannot see the event recorded meanwhile
                    return Err(BillingError::Retry(
                        "a debit of the same key on another lane of this pool committed after this transaction's snapshot".into(),
                    ));
                }
                return Ok(Flushed::KeyTaken);
            }
        } else {
            db::waiting_for(what, write)?;
        }
    }
    let expired: Vec<i64> = changed
        .iter()
        .flat_map(|l| l.expired_holds().iter().copied())
        .collect();
    if !expired.is_empty() {
        db::write(client, &EXPIRE_HOLDS, &[expired.into()])?;
    }
    write_entries(&tenant, &changed, &carried)?;
    let mut moved = write_grants(&changed)?;
    moved.pools = write_pools(&changed, &moved.plans)?;
    watch_balances(client, ledgers)?;
    for l in ledgers.iter_mut() {
        l.written(&moved);
        for s in l.shares.iter_mut() {
            s.written(&moved);
        }
    }
    Ok(Flushed::All)
}

/// The pools' balance rules, in the change's own transaction (a change that
/// rolls back leaves nothing): spending that takes a pool below its armed
/// auto-reload threshold asks for a reload (`billing.request_reload`, which
/// decides by the rule whether and how much); spending below its alerts'
/// lower bound, or a credit up to their upper bound, fires or re-arms them
/// (`billing.pool_alerts`). The bounds are kept on the pool row only while
/// something waits on them, so this costs a statement once per crossing, not
/// once per change (except while a reload rule needs a live subscription the
/// account lacks: then each debit below the threshold asks).
fn watch_balances(client: &mut SpiClient<'_>, ledgers: &[PoolLedger]) -> Result<()> {
    for l in ledgers {
        if l.reload_below.is_none() && l.alerts == AlertBounds::default() {
            continue;
        }
        let figures = l.pool_figures();
        let available = figures.available();
        let spent = l.spent();
        if spent && l.reload_below.is_some_and(|t| available < t) {
            db::write(client, &REQUEST_RELOAD, &[l.id.into(), available.into()])?;
        }
        let fell = spent && l.alerts.below.is_some_and(|t| available < t);
        let rose = !spent && l.alerts.above.is_some_and(|t| available >= t);
        if fell || rose {
            db::write(
                client,
                &POOL_ALERTS,
                &[l.id.into(), available.into(), figures.debt.into()],
            )?;
        }
    }
    Ok(())
}

/// The bounds of a pool's balance alerts, kept on its row by
/// `billing.arm_alerts`: a debit that leaves available below `below`
/// fires the armed alerts it crossed; a credit that brings it to `above` or
/// more re-arms those it passed. None: no alert waits on that side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AlertBounds {
    pub below: Option<i64>,
    pub above: Option<i64>,
}

static POOL_ALERTS: Sql = Sql {
    text: "SELECT billing.pool_alerts($1, $2, $3)",
    args: &[INT8, INT8, INT8],
};

static REQUEST_RELOAD: Sql = Sql {
    text: "SELECT billing.request_reload($1, $2)",
    args: &[INT8, INT8],
};

/// The ledger entries of some pools that no usage event carries.
fn write_entries(tenant: &str, pools: &[&PoolLedger], carried: &CarriedEntries) -> Result<()> {
    let entries: Vec<(&PoolLedger, &Entry)> = pools
        .iter()
        .flat_map(|l| l.entries().iter().map(move |e| (*l, e)))
        .filter(|(_, e)| !carried.carries(e))
        .collect();
    if entries.is_empty() {
        return Ok(());
    }
    let ids = Sequence::named(c"ledger_entries_id_seq")?;
    let kinds = EnumType::named(c"entry_kind")?;
    let mut w = Writer::open(c"ledger_entries")?;
    for (l, e) in entries {
        w.set(c"id", ids.next()?)?
            .set(c"tenant_id", tenant)?
            .set(c"pool_id", l.id)?
            .set(c"account", l.account.as_str())?
            .set(c"unit", l.unit.as_str())?
            .set(c"version", e.version)?
            .set_made(c"kind", || entry_kind_datum(&kinds, e.kind))?
            .set(c"amount", e.amount)?
            .set(c"grant_amount", e.grant_amount)?
            .set(c"debt_amount", e.debt_amount)?
            .set(c"hold_amount", e.hold_amount)?
            .set(c"balance_before", e.balance_before)?
            .set(c"balance_after", e.balance_after)?
            .set(c"debt_after", e.debt_after)?
            .set(c"held_after", e.held_after)?
            .set(c"grant_id", e.grant_id)?
            .set(c"hold_id", e.hold_id)?
            .set(c"event_id", e.event_id)?
            .set(c"effective_at", time::to_sql(e.effective_at))?
            .set(c"recorded_at", time::clock_now())?;
        w.insert()?;
    }
    w.close();
    Ok(())
}

/// Where a flush left the rows it updated: grant id or pool id → place.
#[derive(Default)]
struct Moved {
    grants: FxHashMap<i64, RowAt>,
    pools: FxHashMap<i64, RowAt>,
    /// Pool id → the grant rows it wrote and what its row draws now.
    plans: FxHashMap<i64, drawn::Plan>,
}

impl PoolLedger {
    /// Grant `id`'s row was inserted at `at` with its current remaining, so
    /// flushing leaves it.
    pub fn grant_inserted(&mut self, id: i64, at: RowAt) {
        self.pool.grant_row_written(id);
        self.rows_at.grants.insert(id, at);
        self.stored
            .insert(id, self.pool.grant_remaining(id).unwrap_or_default());
    }

    /// Its rows were written as `moved` says: forget what was written,
    /// remember where the rows are now.
    fn written(&mut self, moved: &Moved) {
        self.pool.written();
        self.counter_changed = false;
        if let Some(at) = moved.pools.get(&self.id) {
            self.rows_at.pool = Some(*at);
        }
        for (id, at) in self.rows_at.grants.iter_mut() {
            if let Some(new) = moved.grants.get(id) {
                *at = *new;
            }
        }
        if let Some(plan) = moved.plans.get(&self.id) {
            self.stored.extend(plan.writes.iter().copied());
            self.drawn = plan.drawn;
        }
    }

    /// Which of its changed grants' rows to write, and what its row draws
    /// then (`drawn::plan`).
    fn grant_writes(&self) -> Result<drawn::Plan> {
        let changed: Vec<drawn::Changed> = self
            .dirty_grants()
            .map(|(id, remaining)| drawn::Changed {
                id,
                remaining,
                stored: self.stored.get(&id).copied(),
                drawable: self.pool.keeps_grant(id),
            })
            .collect();
        let drawn_stored = match self.drawn.grant {
            Some(g) if self.drawn.amount != 0 => match self.stored.get(&g) {
                Some(stored) => *stored,
                // a grant drawn from and then suspended: its row is not read with the pool
                None => stored_remaining(g)?,
            },
            _ => 0,
        };
        Ok(drawn::plan(&changed, self.drawn, drawn_stored))
    }
}

/// What grant `id`'s row holds, read after its pool's lock.
fn stored_remaining(id: i64) -> Result<i64> {
    direct::find_one(
        c"grants",
        c"grants_pkey",
        &[Key::Int8(id)],
        Snapshot::New,
        |t| t.get::<i64>(c"remaining"),
    )?
    .ok_or_else(|| BillingError::Internal(format!("grant {id} vanished")))
}

/// Set what a grant's row holds, and with it whether the grant is used up:
/// the drain-order index holds only grants that are not (schema.sql), so the
/// two change together in every write of a grant's remaining.
pub fn set_grant_remaining(grants: &mut Writer, remaining: i64) -> Result<()> {
    grants
        .set(c"remaining", remaining)?
        .set(c"exhausted", remaining <= 0)?;
    Ok(())
}

/// The remainders of the grants some pools changed, but for the one each
/// pool's row keeps drawing from (`drawn::plan`).
fn write_grants(pools: &[&PoolLedger]) -> Result<Moved> {
    let mut moved = Moved::default();
    let mut dirty: Vec<(i64, i64, Option<RowAt>)> = Vec::new();
    for l in pools {
        let plan = l.grant_writes()?;
        dirty.extend(
            plan.writes
                .iter()
                .map(|&(id, remaining)| (id, remaining, l.rows_at.grants.get(&id).copied())),
        );
        moved.plans.insert(l.id, plan);
    }
    if dirty.is_empty() {
        return Ok(moved);
    }
    let mut grants = Writer::open(c"grants")?;
    for (id, remaining, at) in dirty {
        set_grant_remaining(&mut grants, remaining)?;
        moved
            .grants
            .insert(id, grants.update(c"grants_pkey", id, at)?);
    }
    grants.close();
    Ok(moved)
}

/// The booked totals and cached figures of some pool rows; where each row is now.
fn write_pools(
    pools: &[&PoolLedger],
    plans: &FxHashMap<i64, drawn::Plan>,
) -> Result<FxHashMap<i64, RowAt>> {
    let mut moved = FxHashMap::default();
    if pools.is_empty() {
        return Ok(moved);
    }
    let now = time::to_sql(time::now());
    let mut w = Writer::open(c"pools")?;
    for l in pools {
        let booked = l.booked();
        w.set(c"version", booked.version)?
            .set(c"remaining", booked.remaining)?
            .set(c"debt", booked.debt)?
            .set(c"held", booked.held)?
            .set(c"active_remaining", l.active_remaining())?
            .set(c"active_held", l.active_held())?
            .set(c"cache_from", now)?
            .set(
                c"cache_until",
                time::sql_instant(l.cache_until().min(l.next_in_order_until)),
            )?
            .set(c"updated_at", now)?;
        let drawn = plans.get(&l.id).map_or(l.drawn, |p| p.drawn);
        w.set(c"drawn_grant", drawn.grant)?
            .set(c"drawn", drawn.amount)?;
        if l.counter_changed {
            KeptCounter::set_columns(l.counter.as_ref(), &mut w)?;
        }
        moved.insert(l.id, w.update(c"pools_pkey", l.id, l.rows_at.pool)?);
    }
    w.close();
    Ok(moved)
}

/// An entry kind as a value of the `billing.entry_kind` enum.
fn entry_kind_datum(kinds: &EnumType, kind: EntryKind) -> Result<pgrx::pg_sys::Datum> {
    let label = std::ffi::CString::new(kind.as_str()).expect("kinds have no NUL");
    kinds.value(&label)
}
