//! The pool ledger: one pool locked, its spendable grants loaded in drain
//! order, every change computed in memory as ledger entries, then written back
//! in a handful of set-based statements.
//!
//! Every write to a pool goes through [`PoolLedger`], under the pool's row lock
//! (`SELECT … FOR UPDATE`), so concurrent debits serialise on the pool and the
//! floor rule is checked against committed state: zero overspend.

use pgrx::spi::SpiClient;
use serde_json::json;

use std::collections::HashMap;

use pgrx::datum::DatumWithOid;

use crate::db::{self, Sql, INT8, INT8_ARRAY, TEXT, TEXT_ARRAY};
use crate::error::{BillingError, Result};
use crate::time::{self, Ts};

/// A grant that still holds credit (remaining > 0), as the drain sees it.
#[derive(Debug, Clone)]
pub struct GrantState {
    pub id: i64,
    pub priority: i32,
    pub remaining: i64,
    pub effective_at: Ts,
    pub expires_at: Option<Ts>,
    dirty: bool,
}

impl GrantState {
    pub fn new(
        id: i64,
        priority: i32,
        remaining: i64,
        effective_at: Ts,
        expires_at: Option<Ts>,
    ) -> Self {
        GrantState {
            id,
            priority,
            remaining,
            effective_at,
            expires_at,
            dirty: false,
        }
    }

    /// Spendable at `t`: effective, and strictly before its expiry.
    pub fn is_active(&self, t: Ts) -> bool {
        self.remaining > 0 && self.effective_at <= t && self.expires_at.is_none_or(|e| t < e)
    }

    fn is_expired(&self, t: Ts) -> bool {
        self.expires_at.is_some_and(|e| e <= t)
    }

    /// DESIGN §2.3: priority ascending, earliest expiry first (none last), oldest first.
    fn drain_order(&self) -> (i32, Ts, i64) {
        (self.priority, self.expires_at.unwrap_or(Ts::MAX), self.id)
    }
}

/// An open hold, loaded when the pool's cached figures are out of date.
#[derive(Debug, Clone)]
struct OpenHold {
    id: i64,
    amount: i64,
    expires_at: Ts,
}

/// One ledger entry, computed in memory.
#[derive(Debug, Clone)]
pub struct Entry {
    pub version: i64,
    pub kind: &'static str,
    pub amount: i64,
    pub grant_amount: i64,
    pub debt_amount: i64,
    pub hold_amount: i64,
    pub balance_before: i64,
    pub balance_after: i64,
    pub debt_after: i64,
    pub held_after: i64,
    pub grant_id: Option<i64>,
    pub hold_id: Option<i64>,
    pub event_id: Option<i64>,
    pub effective_at: Ts,
}

/// A running total may grow by `add` only if it still fits a bigint.
fn fits(what: &str, total: i64, add: i64) -> Result<()> {
    total
        .checked_add(add)
        .map(|_| ())
        .ok_or_else(|| BillingError::Overflow(format!("the {what} {total} + {add} exceeds bigint")))
}

/// How much one grant gave to a debit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    pub grant_id: i64,
    pub amount: i64,
}

pub fn drains_json(drains: &[Drain]) -> serde_json::Value {
    serde_json::Value::Array(
        drains
            .iter()
            .map(|d| json!({"grant_id": d.grant_id, "amount": d.amount}))
            .collect(),
    )
}

/// Result of a debit: what grants covered, and what became debt.
#[derive(Debug, Clone, Default)]
pub struct Debit {
    pub drains: Vec<Drain>,
    pub covered: i64,
    pub uncovered: i64,
}

pub struct PoolLedger {
    pub id: i64,
    pub tenant: String,
    pub account: String,
    pub unit: String,
    pub floor: i64,
    pub now: Ts,
    version: i64,
    remaining: i64,
    debt: i64,
    held: i64,
    active_held: i64,
    hold_bound: Ts,
    grants: Vec<GrantState>,
    entries: Vec<Entry>,
    closed_holds: Vec<(i64, &'static str)>,
    /// Entries written by the current operation are tagged with this event.
    pub current_event: Option<i64>,
    /// Entries written while settling a hold are tagged with it.
    pub current_hold: Option<i64>,
}

static LOCK_POOL: Sql = Sql {
    text: "SELECT id, floor, version, remaining, debt, held, active_held, \
                  (cache_from <= now() AND now() < cache_until) AS cache_valid, cache_until \
           FROM billing.pools WHERE tenant_id = $1 AND account = $2 AND unit = $3 FOR UPDATE",
    args: &[TEXT, TEXT, TEXT],
};

static LOAD_GRANTS: Sql = Sql {
    text: "SELECT id, priority, remaining, effective_at, expires_at FROM billing.grants \
           WHERE pool_id = $1 AND status = 'active' AND remaining > 0 \
           ORDER BY priority, expires_at NULLS LAST, id",
    args: &[INT8],
};

static LOAD_GRANT: Sql = Sql {
    text:
        "SELECT id, priority, remaining, effective_at, expires_at FROM billing.grants WHERE id = $1",
    args: &[INT8],
};

static LOAD_OPEN_HOLDS: Sql = Sql {
    text: "SELECT id, amount, expires_at FROM billing.holds WHERE pool_id = $1 AND status = 'open'",
    args: &[INT8],
};

pub static UNIT_EXISTS: Sql = Sql {
    text: "SELECT 1 FROM billing.units WHERE tenant_id = $1 AND unit = $2",
    args: &[TEXT, TEXT],
};

static CREATE_UNIT: Sql = Sql {
    text: "INSERT INTO billing.units (tenant_id, unit) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    args: &[TEXT, TEXT],
};

static CREATE_POOL: Sql = Sql {
    text: "WITH a AS (INSERT INTO billing.accounts (tenant_id, account) VALUES ($1, $2) \
                      ON CONFLICT DO NOTHING) \
           INSERT INTO billing.pools (tenant_id, account, unit) VALUES ($1, $2, $3) \
           ON CONFLICT DO NOTHING",
    args: &[TEXT, TEXT, TEXT],
};

static UPDATE_GRANTS: Sql = Sql {
    text: "UPDATE billing.grants g SET remaining = u.remaining \
           FROM unnest($1::bigint[], $2::bigint[]) AS u(id, remaining) WHERE g.id = u.id",
    args: &[INT8_ARRAY, INT8_ARRAY],
};

static CLOSE_HOLDS: Sql = Sql {
    text: "UPDATE billing.holds h SET status = u.status, closed_at = now() \
           FROM unnest($1::bigint[], $2::text[]) AS u(id, status) WHERE h.id = u.id",
    args: &[INT8_ARRAY, TEXT_ARRAY],
};

static INSERT_ENTRIES: Sql = Sql {
    text: "INSERT INTO billing.ledger_entries (tenant_id, pool_id, account, unit, version, kind, \
              amount, grant_amount, debt_amount, hold_amount, balance_before, balance_after, \
              debt_after, held_after, grant_id, hold_id, event_id, effective_at) \
           SELECT e.* FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[], \
              $6::text[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], \
              $12::bigint[], $13::bigint[], $14::bigint[], $15::bigint[], $16::bigint[], $17::bigint[], \
              $18::timestamptz[]) AS e",
    args: &[
        TEXT_ARRAY,
        INT8_ARRAY,
        TEXT_ARRAY,
        TEXT_ARRAY,
        INT8_ARRAY,
        TEXT_ARRAY,
        INT8_ARRAY,
        INT8_ARRAY,
        INT8_ARRAY,
        INT8_ARRAY,
        INT8_ARRAY,
        INT8_ARRAY,
        INT8_ARRAY,
        INT8_ARRAY,
        INT8_ARRAY,
        INT8_ARRAY,
        INT8_ARRAY,
        pgrx::pg_sys::TIMESTAMPTZARRAYOID,
    ],
};

static UPDATE_POOL: Sql = Sql {
    text: "UPDATE billing.pools SET version = $2, remaining = $3, debt = $4, held = $5, \
              active_remaining = $6, active_held = $7, cache_from = $8, cache_until = $9, \
              updated_at = now() \
           WHERE id = $1",
    args: &[
        INT8,
        INT8,
        INT8,
        INT8,
        INT8,
        INT8,
        INT8,
        pgrx::pg_sys::TIMESTAMPTZOID,
        pgrx::pg_sys::TIMESTAMPTZOID,
    ],
};

static UPDATE_POOLS: Sql = Sql {
    text: "UPDATE billing.pools p SET version = u.version, remaining = u.remaining, debt = u.debt, \
              held = u.held, active_remaining = u.active_remaining, active_held = u.active_held, \
              cache_from = u.cache_from, cache_until = u.cache_until, updated_at = now() \
           FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], \
                       $6::bigint[], $7::bigint[], $8::timestamptz[], $9::timestamptz[]) \
                AS u(id, version, remaining, debt, held, active_remaining, active_held, cache_from, cache_until) \
           WHERE p.id = u.id",
    args: &[
        INT8_ARRAY,
        INT8_ARRAY,
        INT8_ARRAY,
        INT8_ARRAY,
        INT8_ARRAY,
        INT8_ARRAY,
        INT8_ARRAY,
        pgrx::pg_sys::TIMESTAMPTZARRAYOID,
        pgrx::pg_sys::TIMESTAMPTZARRAYOID,
    ],
};

/// A batch's pools, locked in one statement, in one order for every batch.
static LOCK_POOLS: Sql = Sql {
    text: "SELECT p.id, p.floor, p.version, p.remaining, p.debt, p.held, p.active_held, \
                  (p.cache_from <= now() AND now() < p.cache_until) AS cache_valid, p.cache_until, \
                  p.account, p.unit \
           FROM billing.pools p \
           JOIN unnest($2::text[], $3::text[]) AS k(account, unit) \
             ON p.tenant_id = $1 AND p.account = k.account AND p.unit = k.unit \
           ORDER BY p.account, p.unit FOR UPDATE OF p",
    args: &[TEXT, TEXT_ARRAY, TEXT_ARRAY],
};

static CREATE_POOLS: Sql = Sql {
    text: "WITH k AS (SELECT * FROM unnest($2::text[], $3::text[]) AS k(account, unit)), \
                a AS (INSERT INTO billing.accounts (tenant_id, account) \
                      SELECT DISTINCT $1, account FROM k ON CONFLICT DO NOTHING) \
           INSERT INTO billing.pools (tenant_id, account, unit) SELECT $1, account, unit FROM k \
           ON CONFLICT DO NOTHING",
    args: &[TEXT, TEXT_ARRAY, TEXT_ARRAY],
};

static LOAD_GRANTS_MANY: Sql = Sql {
    text: "SELECT id, priority, remaining, effective_at, expires_at, pool_id FROM billing.grants \
           WHERE pool_id = ANY($1) AND status = 'active' AND remaining > 0 \
           ORDER BY pool_id, priority, expires_at NULLS LAST, id",
    args: &[INT8_ARRAY],
};

static LOAD_OPEN_HOLDS_MANY: Sql = Sql {
    text: "SELECT id, amount, expires_at, pool_id FROM billing.holds \
           WHERE pool_id = ANY($1) AND status = 'open'",
    args: &[INT8_ARRAY],
};

/// Whether a pool that does not exist yet may be created by this call.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// Create the unit too (a grant introduces a unit).
    UnitAndPool,
    /// Create the pool if the unit is known; an unknown unit is an error.
    Pool,
}

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
        let mut ledger = match Self::lock(client, tenant, account, unit)? {
            Some(l) => l,
            None => {
                match create {
                    Create::UnitAndPool => {
                        db::write(client, &CREATE_UNIT, &[tenant.into(), unit.into()])?;
                    }
                    Create::Pool => {
                        if db::read(client, &UNIT_EXISTS, &[tenant.into(), unit.into()])?.is_empty()
                        {
                            return Err(BillingError::unknown("unit", unit));
                        }
                    }
                }
                db::write(
                    client,
                    &CREATE_POOL,
                    &[tenant.into(), account.into(), unit.into()],
                )?;
                Self::lock(client, tenant, account, unit)?
                    .ok_or_else(|| BillingError::Internal("pool vanished after creation".into()))?
            }
        };
        ledger.load_grants(client)?;
        ledger.catch_up();
        Ok(ledger)
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
        let (account, unit): (String, String) = (db::col(&row, 1)?, db::col(&row, 2)?);
        Self::open(client, tenant, &account, &unit, Create::Pool)
    }

    fn lock(
        client: &mut SpiClient<'_>,
        tenant: &str,
        account: &str,
        unit: &str,
    ) -> Result<Option<PoolLedger>> {
        let mut rows = db::write(
            client,
            &LOCK_POOL,
            &[tenant.into(), account.into(), unit.into()],
        )?;
        let Some(row) = rows.next() else {
            return Ok(None);
        };
        let (mut ledger, cache_valid) = Self::from_lock_row(&row, tenant, account, unit)?;
        if !cache_valid {
            ledger.load_holds(client)?;
        }
        Ok(Some(ledger))
    }

    /// A locked pool row (columns 1-9 of LOCK_POOL / LOCK_POOLS), and whether
    /// its cached figures are valid now.
    fn from_lock_row(
        row: &pgrx::spi::SpiHeapTupleData<'_>,
        tenant: &str,
        account: &str,
        unit: &str,
    ) -> Result<(PoolLedger, bool)> {
        let cache_valid: bool = db::col(row, 8)?;
        let cache_until: pgrx::datum::TimestampWithTimeZone = db::col(row, 9)?;
        let ledger = PoolLedger {
            id: db::col(row, 1)?,
            tenant: tenant.to_string(),
            account: account.to_string(),
            unit: unit.to_string(),
            floor: db::col(row, 2)?,
            now: time::now(),
            version: db::col(row, 3)?,
            remaining: db::col(row, 4)?,
            debt: db::col(row, 5)?,
            held: db::col(row, 6)?,
            active_held: db::col(row, 7)?,
            hold_bound: if cache_until.is_finite() {
                cache_until.into()
            } else {
                Ts::MAX
            },
            grants: Vec::new(),
            entries: Vec::new(),
            closed_holds: Vec::new(),
            current_event: None,
            current_hold: None,
        };
        Ok((ledger, cache_valid))
    }

    /// Lock the pools of a batch, in one order for every batch so that two
    /// batches never deadlock, creating the missing ones; each brought up to
    /// date as `open` does. Returned in the order of `keys` (account, unit).
    pub fn open_many(
        client: &mut SpiClient<'_>,
        tenant: &str,
        keys: &[(String, String)],
    ) -> Result<Vec<PoolLedger>> {
        let mut found = Self::lock_many(client, tenant, keys)?;
        if found.len() < keys.len() {
            let missing: Vec<(String, String)> = keys
                .iter()
                .filter(|k| !found.contains_key(*k))
                .cloned()
                .collect();
            let (accounts, units): (Vec<String>, Vec<String>) = missing.iter().cloned().unzip();
            db::write_once(
                client,
                &CREATE_POOLS,
                &[tenant.into(), accounts.into(), units.into()],
            )?;
            found.extend(Self::lock_many(client, tenant, &missing)?);
        }
        let mut ledgers = Vec::with_capacity(keys.len());
        let mut stale_holds = Vec::new();
        for k in keys {
            let (ledger, cache_valid) = found
                .remove(k)
                .ok_or_else(|| BillingError::Internal("pool vanished after creation".into()))?;
            if !cache_valid {
                stale_holds.push(ledger.id);
            }
            ledgers.push(ledger);
        }
        let position: HashMap<i64, usize> =
            ledgers.iter().enumerate().map(|(i, l)| (l.id, i)).collect();
        let ids: Vec<i64> = ledgers.iter().map(|l| l.id).collect();
        for row in db::write_once(client, &LOAD_GRANTS_MANY, &[ids.into()])? {
            let pool: i64 = db::col(&row, 6)?;
            ledgers[position[&pool]].grants.push(grant_from_row(&row)?);
        }
        if !stale_holds.is_empty() {
            let mut holds: HashMap<i64, Vec<OpenHold>> = HashMap::new();
            for row in db::write_once(client, &LOAD_OPEN_HOLDS_MANY, &[stale_holds.clone().into()])?
            {
                let pool: i64 = db::col(&row, 4)?;
                holds.entry(pool).or_default().push(hold_from_row(&row)?);
            }
            for id in stale_holds {
                ledgers[position[&id]].apply_open_holds(holds.remove(&id).unwrap_or_default());
            }
        }
        for l in &mut ledgers {
            l.catch_up();
        }
        Ok(ledgers)
    }

    fn lock_many(
        client: &mut SpiClient<'_>,
        tenant: &str,
        keys: &[(String, String)],
    ) -> Result<HashMap<(String, String), (PoolLedger, bool)>> {
        let (accounts, units): (Vec<String>, Vec<String>) = keys.iter().cloned().unzip();
        let mut found = HashMap::new();
        for row in db::write_once(
            client,
            &LOCK_POOLS,
            &[tenant.into(), accounts.into(), units.into()],
        )? {
            let (account, unit): (String, String) = (db::col(&row, 10)?, db::col(&row, 11)?);
            let pool = Self::from_lock_row(&row, tenant, &account, &unit)?;
            found.insert((account, unit), pool);
        }
        Ok(found)
    }

    fn load_grants(&mut self, client: &mut SpiClient<'_>) -> Result<()> {
        for row in db::write(client, &LOAD_GRANTS, &[self.id.into()])? {
            self.grants.push(grant_from_row(&row)?);
        }
        Ok(())
    }

    /// Bring one grant of this pool into memory even when nothing is left of
    /// it (the drain loads only grants with credit), so credit can return to it.
    pub fn load_grant(&mut self, client: &mut SpiClient<'_>, grant_id: i64) -> Result<()> {
        if self.grants.iter().any(|g| g.id == grant_id) {
            return Ok(());
        }
        let row = db::write(client, &LOAD_GRANT, &[grant_id.into()])?
            .next()
            .ok_or_else(|| BillingError::Internal(format!("grant {grant_id} vanished")))?;
        self.insert_in_drain_order(grant_from_row(&row)?);
        Ok(())
    }

    fn insert_in_drain_order(&mut self, grant: GrantState) {
        let pos = self
            .grants
            .iter()
            .position(|g| g.drain_order() > grant.drain_order())
            .unwrap_or(self.grants.len());
        self.grants.insert(pos, grant);
    }

    /// Outside the cached window: recompute the active held total from the open
    /// holds, and record the expiry of the holds whose time has passed.
    fn load_holds(&mut self, client: &mut SpiClient<'_>) -> Result<()> {
        let holds = db::write(client, &LOAD_OPEN_HOLDS, &[self.id.into()])?
            .map(|row| hold_from_row(&row))
            .collect::<Result<Vec<_>>>()?;
        self.apply_open_holds(holds);
        Ok(())
    }

    fn apply_open_holds(&mut self, holds: Vec<OpenHold>) {
        self.active_held = 0;
        self.hold_bound = Ts::MAX;
        for h in holds {
            if h.expires_at <= self.now {
                self.close_hold(h.id, h.amount, "hold_expire", false);
            } else {
                self.active_held += h.amount;
                self.hold_bound = self.hold_bound.min(h.expires_at);
            }
        }
    }

    /// Record expiries that are due and let spendable grants repay debt.
    pub fn catch_up(&mut self) {
        self.expire_due();
        self.repay_debt();
    }

    /// An in-memory pool for unit tests of the drain rules.
    #[cfg(any(test, feature = "pg_test"))]
    pub fn in_memory(now: Ts, grants: Vec<GrantState>, debt: i64) -> PoolLedger {
        let remaining = grants.iter().map(|g| g.remaining).sum();
        let mut l = PoolLedger {
            id: 0,
            tenant: "default".into(),
            account: "test".into(),
            unit: "credits".into(),
            floor: 0,
            now,
            version: 0,
            remaining,
            debt,
            held: 0,
            active_held: 0,
            hold_bound: Ts::MAX,
            grants,
            entries: Vec::new(),
            closed_holds: Vec::new(),
            current_event: None,
            current_hold: None,
        };
        l.grants.sort_by_key(GrantState::drain_order);
        l
    }

    // ----- figures ---------------------------------------------------------

    /// Σ remaining of the grants spendable now.
    pub fn active_remaining(&self) -> i64 {
        self.grants
            .iter()
            .filter(|g| g.is_active(self.now))
            .map(|g| g.remaining)
            .sum()
    }

    /// DESIGN §2.5: Σ remaining of active grants − Σ open holds − debt.
    /// Computed wide and clamped: each total fits a bigint, their difference may not.
    pub fn available(&self) -> i64 {
        let wide = self.active_remaining() as i128 - self.active_held as i128 - self.debt as i128;
        wide.clamp(i64::MIN as i128, i64::MAX as i128) as i64
    }

    /// Whether `amount` more may be taken without crossing the floor.
    pub fn allows(&self, amount: i64) -> bool {
        let available =
            self.active_remaining() as i128 - self.active_held as i128 - self.debt as i128;
        available - amount as i128 >= self.floor as i128
    }

    pub fn entitled(&self) -> bool {
        self.allows(0)
    }

    pub fn grant_remaining(&self, grant_id: i64) -> Option<i64> {
        self.grants
            .iter()
            .find(|g| g.id == grant_id)
            .map(|g| g.remaining)
    }

    pub fn insufficient(&self, requested: i64) -> BillingError {
        BillingError::InsufficientCredits {
            unit: self.unit.clone(),
            available: self.available(),
            requested,
            floor: self.floor,
        }
    }

    // ----- entries ---------------------------------------------------------

    #[allow(clippy::too_many_arguments)] // one argument per column of an entry
    fn push(
        &mut self,
        kind: &'static str,
        grant_amount: i64,
        debt_amount: i64,
        hold_amount: i64,
        grant_id: Option<i64>,
        hold_id: Option<i64>,
        effective_at: Ts,
    ) {
        let before = self.remaining - self.debt;
        self.remaining += grant_amount;
        self.debt += debt_amount;
        self.held += hold_amount;
        self.version += 1;
        self.entries.push(Entry {
            version: self.version,
            kind,
            amount: grant_amount - debt_amount,
            grant_amount,
            debt_amount,
            hold_amount,
            balance_before: before,
            balance_after: self.remaining - self.debt,
            debt_after: self.debt,
            held_after: self.held,
            grant_id,
            hold_id: hold_id.or(self.current_hold),
            event_id: self.current_event,
            effective_at,
        });
    }

    fn expire_due(&mut self) {
        let now = self.now;
        for i in 0..self.grants.len() {
            let g = &self.grants[i];
            if g.remaining > 0 && g.is_expired(now) {
                let (id, amount, at) = (g.id, g.remaining, g.expires_at.unwrap_or(now));
                self.take_from_grant(i, amount);
                self.push("expire", -amount, 0, 0, Some(id), None, at);
            }
        }
    }

    fn take_from_grant(&mut self, index: usize, amount: i64) {
        let g = &mut self.grants[index];
        g.remaining -= amount;
        g.dirty = true;
    }

    /// Take up to `amount` from the active grants in drain order.
    fn take(&mut self, amount: i64, kind: &'static str) -> Vec<Drain> {
        let mut left = amount;
        let mut drains = Vec::new();
        for i in 0..self.grants.len() {
            if left == 0 {
                break;
            }
            if !self.grants[i].is_active(self.now) {
                continue;
            }
            let part = left.min(self.grants[i].remaining);
            let id = self.grants[i].id;
            self.take_from_grant(i, part);
            left -= part;
            let debt_change = if kind == "debt_repayment" { -part } else { 0 };
            self.push(kind, -part, debt_change, 0, Some(id), None, self.now);
            drains.push(Drain {
                grant_id: id,
                amount: part,
            });
        }
        drains
    }

    /// DESIGN §2.7: outstanding debt is paid first from whatever becomes spendable.
    pub fn repay_debt(&mut self) -> i64 {
        if self.debt == 0 {
            return 0;
        }
        let debt = self.debt;
        self.take(debt, "debt_repayment")
            .iter()
            .map(|d| d.amount)
            .sum()
    }

    /// Debit `amount`: drain active grants in order, the rest becomes debt.
    /// The caller decides beforehand whether the floor allows it (strict).
    pub fn debit(&mut self, amount: i64) -> Result<Debit> {
        if amount == 0 {
            return Ok(Debit::default());
        }
        let coverable = self.active_remaining().min(amount);
        let uncovered = amount - coverable;
        fits("debt", self.debt, uncovered)?;
        let drains = self.take(amount, "debit");
        let covered: i64 = drains.iter().map(|d| d.amount).sum();
        if uncovered > 0 {
            self.push("debt", 0, uncovered, 0, None, None, self.now);
        }
        Ok(Debit {
            drains,
            covered,
            uncovered,
        })
    }

    /// Record a grant already inserted as a row; it pays debt first when spendable.
    pub fn add_grant(&mut self, grant: GrantState) -> Result<i64> {
        let (id, amount) = (grant.id, grant.remaining);
        fits("pool balance", self.remaining, amount)?;
        self.insert_in_drain_order(grant);
        self.push("grant", amount, 0, 0, Some(id), None, self.now);
        let before = self.grant_remaining(id).unwrap_or(0);
        self.repay_debt();
        Ok(before - self.grant_remaining(id).unwrap_or(0))
    }

    /// Take up to `amount` of a grant's remaining credit back, as a `kind`
    /// entry (`void`, `revoke`); returns what was taken.
    pub fn take_unspent(&mut self, grant_id: i64, amount: i64, kind: &'static str) -> i64 {
        let Some(i) = self.grants.iter().position(|g| g.id == grant_id) else {
            return 0;
        };
        let part = self.grants[i].remaining.min(amount);
        if part > 0 {
            self.take_from_grant(i, part);
            self.push(kind, -part, 0, 0, Some(grant_id), None, self.now);
        }
        part
    }

    /// Give back what a reversal took from a grant (it was lowered, as when
    /// a dispute is won): `unspent` credit returns to the grant (`reinstate`);
    /// `debt` recorded against it is cancelled while the pool still owes it,
    /// and what was already repaid returns to the grant as credit
    /// (`debt_reversal`). The grant must be loaded (see `load_grant`).
    /// Credit returned past the grant's expiry expires at the next catch-up.
    pub fn give_back(&mut self, grant_id: i64, unspent: i64, debt: i64) {
        let Some(i) = self.grants.iter().position(|g| g.id == grant_id) else {
            return;
        };
        if unspent > 0 {
            self.take_from_grant(i, -unspent);
            self.push("reinstate", unspent, 0, 0, Some(grant_id), None, self.now);
        }
        if debt > 0 {
            let cancelled = debt.min(self.debt);
            let credited = debt - cancelled;
            self.take_from_grant(i, -credited);
            self.push(
                "debt_reversal",
                credited,
                -cancelled,
                0,
                Some(grant_id),
                None,
                self.now,
            );
        }
    }

    /// Turn `amount` into debt without a grant (a voided grant's spent part).
    pub fn add_debt(&mut self, amount: i64, grant_id: Option<i64>) -> Result<()> {
        fits("debt", self.debt, amount)?;
        if amount > 0 {
            self.push("debt", 0, amount, 0, grant_id, None, self.now);
        }
        Ok(())
    }

    pub fn open_hold(&mut self, hold_id: i64, amount: i64, expires_at: Ts) -> Result<()> {
        fits("held total", self.held, amount)?;
        self.active_held += amount;
        self.hold_bound = self.hold_bound.min(expires_at);
        self.push("hold", 0, 0, amount, None, Some(hold_id), self.now);
        Ok(())
    }

    /// Close an open hold; `active` says whether it still counted against availability.
    pub fn close_hold(&mut self, hold_id: i64, amount: i64, kind: &'static str, active: bool) {
        if active {
            self.active_held -= amount;
        }
        self.push(kind, 0, 0, -amount, None, Some(hold_id), self.now);
        // Settle and release update their hold row themselves, with their outcome.
        if kind == "hold_expire" {
            self.closed_holds.push((hold_id, "expired"));
        }
    }

    /// Replace placeholder event references (batch slots) with real event ids.
    pub fn map_event_ids(&mut self, id_of: impl Fn(i64) -> i64) {
        for e in &mut self.entries {
            e.event_id = e.event_id.map(&id_of);
        }
    }

    // ----- writing back ----------------------------------------------------

    /// The instant until which the figures written to the pool stay exact.
    fn cache_until(&self) -> Ts {
        let grant_bound = self
            .grants
            .iter()
            .filter(|g| g.remaining > 0)
            .filter_map(|g| {
                if g.effective_at > self.now {
                    Some(g.effective_at)
                } else {
                    g.expires_at.filter(|e| *e > self.now)
                }
            })
            .min()
            .unwrap_or(Ts::MAX);
        grant_bound.min(self.hold_bound)
    }

    /// Write grants, holds, entries and the pool row. Nothing is written before this.
    pub fn flush(&mut self, client: &mut SpiClient<'_>) -> Result<()> {
        flush_all(client, std::slice::from_mut(self))
    }

    /// Forget what was written, keeping the pool's state for further work.
    fn written(&mut self) {
        for g in &mut self.grants {
            g.dirty = false;
        }
        self.grants.retain(|g| g.remaining > 0);
        self.entries.clear();
        self.closed_holds.clear();
    }
}

fn grant_from_row(row: &pgrx::spi::SpiHeapTupleData<'_>) -> Result<GrantState> {
    let effective_at: pgrx::datum::TimestampWithTimeZone = db::col(row, 4)?;
    let expires_at: Option<pgrx::datum::TimestampWithTimeZone> = db::opt(row, 5)?;
    Ok(GrantState::new(
        db::col(row, 1)?,
        db::col(row, 2)?,
        db::col(row, 3)?,
        effective_at.into(),
        expires_at.map(Into::into),
    ))
}

fn hold_from_row(row: &pgrx::spi::SpiHeapTupleData<'_>) -> Result<OpenHold> {
    let expires_at: pgrx::datum::TimestampWithTimeZone = db::col(row, 3)?;
    Ok(OpenHold {
        id: db::col(row, 1)?,
        amount: db::col(row, 2)?,
        expires_at: expires_at.into(),
    })
}

fn sql_instant(t: Ts) -> pgrx::datum::TimestampWithTimeZone {
    if t == Ts::MAX {
        pgrx::datum::TimestampWithTimeZone::positive_infinity()
    } else {
        time::to_sql(t)
    }
}

/// The columns of INSERT_ENTRIES for some entries, each with its pool.
fn entry_columns<'a>(entries: &[(&'a PoolLedger, &'a Entry)]) -> Vec<DatumWithOid<'a>> {
    let text = |f: fn(&PoolLedger) -> &str| -> Vec<&'a str> {
        entries.iter().map(|(l, _)| f(l)).collect()
    };
    let ints = |f: fn(&Entry) -> i64| -> Vec<i64> { entries.iter().map(|(_, e)| f(e)).collect() };
    let opts = |f: fn(&Entry) -> Option<i64>| -> Vec<Option<i64>> {
        entries.iter().map(|(_, e)| f(e)).collect()
    };
    vec![
        text(|l| &l.tenant).into(),
        entries
            .iter()
            .map(|(l, _)| l.id)
            .collect::<Vec<i64>>()
            .into(),
        text(|l| &l.account).into(),
        text(|l| &l.unit).into(),
        ints(|x| x.version).into(),
        entries
            .iter()
            .map(|(_, e)| e.kind)
            .collect::<Vec<&str>>()
            .into(),
        ints(|x| x.amount).into(),
        ints(|x| x.grant_amount).into(),
        ints(|x| x.debt_amount).into(),
        ints(|x| x.hold_amount).into(),
        ints(|x| x.balance_before).into(),
        ints(|x| x.balance_after).into(),
        ints(|x| x.debt_after).into(),
        ints(|x| x.held_after).into(),
        opts(|x| x.grant_id).into(),
        opts(|x| x.hold_id).into(),
        opts(|x| x.event_id).into(),
        entries
            .iter()
            .map(|(_, e)| time::to_sql(e.effective_at))
            .collect::<Vec<_>>()
            .into(),
    ]
}

/// Write what the given pools computed: grant remainders, expired holds,
/// ledger entries and pool rows, a few set-based statements for all of them.
/// One pool (a single call) uses the cached plans; many (a batch) are planned
/// for the call.
pub fn flush_all(client: &mut SpiClient<'_>, ledgers: &mut [PoolLedger]) -> Result<()> {
    let many = ledgers.len() > 1;
    let run = |client: &mut SpiClient<'_>,
               sql: &'static Sql,
               args: &[pgrx::datum::DatumWithOid<'_>]|
     -> Result<()> {
        if many {
            db::write_once(client, sql, args)?;
        } else {
            db::write(client, sql, args)?;
        }
        Ok(())
    };
    let changed: Vec<&PoolLedger> = ledgers.iter().filter(|l| !l.entries.is_empty()).collect();
    if changed.is_empty() {
        return Ok(());
    }
    let (ids, remaining): (Vec<i64>, Vec<i64>) = changed
        .iter()
        .flat_map(|l| {
            l.grants
                .iter()
                .filter(|g| g.dirty)
                .map(|g| (g.id, g.remaining))
        })
        .unzip();
    if !ids.is_empty() {
        run(client, &UPDATE_GRANTS, &[ids.into(), remaining.into()])?;
    }
    let (ids, statuses): (Vec<i64>, Vec<String>) = changed
        .iter()
        .flat_map(|l| l.closed_holds.iter().map(|(id, s)| (*id, s.to_string())))
        .unzip();
    if !ids.is_empty() {
        run(client, &CLOSE_HOLDS, &[ids.into(), statuses.into()])?;
    }
    let entries: Vec<(&PoolLedger, &Entry)> = changed
        .iter()
        .flat_map(|l| l.entries.iter().map(move |e| (*l, e)))
        .collect();
    for chunk in entries.chunks(db::WRITE_CHUNK) {
        run(client, &INSERT_ENTRIES, &entry_columns(chunk))?;
    }
    if let [l] = changed.as_slice() {
        db::write(
            client,
            &UPDATE_POOL,
            &[
                l.id.into(),
                l.version.into(),
                l.remaining.into(),
                l.debt.into(),
                l.held.into(),
                l.active_remaining().into(),
                l.active_held.into(),
                time::to_sql(l.now).into(),
                sql_instant(l.cache_until()).into(),
            ],
        )?;
    } else {
        let pools =
            |f: fn(&PoolLedger) -> i64| -> Vec<i64> { changed.iter().map(|l| f(l)).collect() };
        run(
            client,
            &UPDATE_POOLS,
            &[
                pools(|l| l.id).into(),
                pools(|l| l.version).into(),
                pools(|l| l.remaining).into(),
                pools(|l| l.debt).into(),
                pools(|l| l.held).into(),
                pools(|l| l.active_remaining()).into(),
                pools(|l| l.active_held).into(),
                changed
                    .iter()
                    .map(|l| time::to_sql(l.now))
                    .collect::<Vec<_>>()
                    .into(),
                changed
                    .iter()
                    .map(|l| sql_instant(l.cache_until()))
                    .collect::<Vec<_>>()
                    .into(),
            ],
        )?;
    }
    for l in ledgers.iter_mut() {
        l.written();
    }
    Ok(())
}
