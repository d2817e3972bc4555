//! The rows metering keeps: a priced meter's charges per pool and period
//! (`meter_periods`), the distinct values a unique_count meter has seen
//! (`meter_uniques`), and the hourly counters reports read
//! (`usage_counters`). Read and written straight (`direct`), under the lock
//! of the pool row the event debits: every writer of a key holds that lock,
//! so each key has exactly one row and reads see the last writer's.
//!
//! An event is first `prepare`d (what it would be charged, nothing kept),
//! then `commit`ted if it applies; `save` writes what changed.

use std::collections::HashMap;

use rustc_hash::FxHashMap;
use std::str::FromStr;

use pgrx::datum::TimestampWithTimeZone as Tstz;
use pgrx::AnyNumeric;
use rust_decimal::Decimal;

use super::{hour_of, period_of, Aggregate, Observation, PeriodCharges, MICROS_PER_HOUR};
use crate::direct::{find_one, Key, Sequence, Snapshot, Tuple, Writer};
use crate::error::{BillingError, Result};
use crate::ledger::PoolLedger;
use crate::pricing::{Charging, Meter};
use crate::time::{self, Ts};

type PeriodKey = (i64, String, Ts);
type UniqueKey = (i64, String, Ts, String);
type CounterKey = (i64, String, Ts, String);

struct PeriodRow {
    id: Option<i64>,
    charges: PeriodCharges,
    changed: bool,
}

#[derive(Clone)]
struct CounterRow {
    id: Option<i64>,
    account: String,
    aggregate: Aggregate,
    cost: i64,
    revised_at: Option<Ts>,
    changed: bool,
}

/// The hourly counter a pool row keeps (`pools.counter_*`, schema.sql): the
/// counter of one key, updated with the pool row every event of the pool
/// writes anyway, instead of in a `usage_counters` row of its own. It stands
/// for the row of the same key until it is written back there, when a
/// counter of a later hour takes its place (`Metering::keep_counters`).
#[derive(Debug, Clone, PartialEq)]
pub struct KeptCounter {
    pub meter: String,
    pub hour: Ts,
    pub groups: String,
    pub aggregate: Aggregate,
    pub cost: i64,
    pub revised_at: Option<Ts>,
}

impl KeptCounter {
    /// From a pool row read straight (`direct`).
    pub fn from_tuple(t: &Tuple) -> Result<Option<KeptCounter>> {
        let Some(meter) = t.opt::<String>(c"counter_meter")? else {
            return Ok(None);
        };
        let (aggregate, cost, revised_at) = counted(
            t,
            [
                c"counter_events",
                c"counter_quantity",
                c"counter_last_at",
                c"counter_cost",
                c"counter_revised_at",
            ],
        )?;
        Ok(Some(KeptCounter {
            meter,
            hour: t.get::<i64>(c"counter_hour")?,
            groups: t.get(c"counter_groups")?,
            aggregate,
            cost,
            revised_at,
        }))
    }

    /// Set the pool row's counter columns to `kept` (NULLs for none).
    pub fn set_columns(kept: Option<&KeptCounter>, w: &mut Writer) -> Result<()> {
        let quantity = kept.map(|k| to_numeric(k.aggregate.quantity)).transpose()?;
        w.set(c"counter_meter", kept.map(|k| k.meter.as_str()))?
            .set(c"counter_hour", kept.map(|k| time::to_sql(k.hour)))?
            .set(c"counter_groups", kept.map(|k| k.groups.as_str()))?
            .set(c"counter_events", kept.map(|k| k.aggregate.events))?
            .set(c"counter_quantity", quantity)?
            .set(
                c"counter_last_at",
                kept.and_then(|k| k.aggregate.last_at).map(time::to_sql),
            )?
            .set(c"counter_cost", kept.map(|k| k.cost))?
            .set(
                c"counter_revised_at",
                kept.and_then(|k| k.revised_at).map(time::to_sql),
            )?;
        Ok(())
    }

    fn key(&self, pool_id: i64) -> CounterKey {
        (pool_id, self.meter.clone(), self.hour, self.groups.clone())
    }
}

/// One event as metering needs it.
pub struct Usage<'a> {
    pub pool_id: i64,
    pub account: &'a str,
    pub quantity: Decimal,
    /// When it counts (`Meter::counted_at`).
    pub at: Ts,
    /// unique_count: the value of the counted property.
    pub unique: Option<String>,
    /// The counter's group key (`Meter::groups`).
    pub groups: String,
    /// The member limits count it for (its `member` property).
    pub member: Option<String>,
    /// An additive price's exact cost of this event.
    pub exact: Option<Decimal>,
}

/// What an event would do, not yet kept.
pub struct Prepared {
    pub cost: i64,
    /// The price version that charged it (None: its cost was given).
    pub version: Option<i32>,
    period: Option<(PeriodKey, PeriodCharges)>,
    unique: Option<(UniqueKey, bool)>,
    counter: CounterKey,
    account: String,
    observation: Observation,
}

pub struct Metering {
    tenant: String,
    periods: HashMap<PeriodKey, PeriodRow>,
    /// value → whether this call saw it first (and must write it)
    uniques: HashMap<UniqueKey, bool>,
    counters: HashMap<CounterKey, CounterRow>,
    /// The counter each locked pool row keeps, as locked (`know_pool`).
    kept: FxHashMap<i64, Option<KeptCounter>>,
    /// Kept counters that another took the place of, to write back.
    evicted: Vec<(i64, String, KeptCounter)>,
}

/// The values of a (pool, meter, instant, text) key, the leading columns of
/// the indexes of meter_uniques and usage_counters.
fn index_keys(key: &(i64, String, Ts, String)) -> [Key<'_>; 4] {
    [
        Key::Int8(key.0),
        Key::Text(&key.1),
        Key::Tstz(key.2),
        Key::Text(&key.3),
    ]
}

/// An hourly counter's figures (aggregate, cost, revised_at) from a row
/// whose columns for events, quantity, last_at, cost and revised_at are named `columns`.
fn counted(
    t: &Tuple,
    columns: [&'static std::ffi::CStr; 5],
) -> Result<(Aggregate, i64, Option<Ts>)> {
    let [events, quantity, last_at, cost, revised_at] = columns;
    let aggregate = Aggregate {
        events: t.get(events)?,
        quantity: numeric(t, quantity)?,
        last_at: instant(t, last_at)?,
    };
    Ok((aggregate, t.get(cost)?, instant(t, revised_at)?))
}

fn numeric(t: &Tuple, column: &'static std::ffi::CStr) -> Result<Decimal> {
    decimal(&t.get::<AnyNumeric>(column)?)
}

fn decimal(n: &AnyNumeric) -> Result<Decimal> {
    Decimal::from_str(&n.to_string())
        .map_err(|e| BillingError::Internal(format!("stored quantity: {e}")))
}

fn to_numeric(d: Decimal) -> Result<AnyNumeric> {
    AnyNumeric::try_from(d.to_string().as_str())
        .map_err(|e| BillingError::Internal(format!("quantity {d}: {e}")))
}

fn instant(t: &Tuple, column: &'static std::ffi::CStr) -> Result<Option<Ts>> {
    Ok(t.opt::<Tstz>(column)?.map(time::instant))
}

impl Metering {
    pub fn new(tenant: &str) -> Metering {
        Metering {
            tenant: tenant.to_string(),
            periods: HashMap::new(),
            uniques: HashMap::new(),
            counters: HashMap::new(),
            kept: FxHashMap::default(),
            evicted: Vec::new(),
        }
    }

    /// A pool whose events this call counts, locked, with the counter its
    /// row keeps: every pool an event is counted in must be known first.
    pub fn know_pool(&mut self, ledger: &PoolLedger) {
        self.kept.insert(ledger.id, ledger.counter.clone());
    }

    /// What an event of `meter` would be charged and count.
    pub fn prepare(
        &mut self,
        meter: &Meter,
        usage: &Usage,
        charging: Charging,
    ) -> Result<Prepared> {
        let period = period_of(usage.at);
        let unique = match &usage.unique {
            Some(v) => {
                let key = (usage.pool_id, meter.name.clone(), period, v.clone());
                let new = self.is_new(&key)?;
                Some((key, new))
            }
            None => None,
        };
        let observation = Observation {
            quantity: usage.quantity,
            at: usage.at,
            new_value: unique.as_ref().is_some_and(|(_, new)| *new),
        };
        let (cost, version, period) = match charging {
            Charging::Given(cost) => (cost, None, None),
            Charging::Priced { version, price } => {
                let key = (usage.pool_id, meter.name.clone(), period);
                let mut charges = self.period(&key)?.charges.clone();
                let cost = charges.charge(
                    meter.aggregation,
                    &observation,
                    (version, price),
                    usage.exact,
                )?;
                (cost, Some(version), Some((key, charges)))
            }
        };
        Ok(Prepared {
            cost,
            version,
            period,
            unique,
            counter: (
                usage.pool_id,
                meter.name.clone(),
                hour_of(usage.at),
                usage.groups.clone(),
            ),
            account: usage.account.to_string(),
            observation,
        })
    }

    /// Keep what a prepared event does: it applied, charged `cost`.
    pub fn commit(&mut self, meter: &Meter, p: Prepared, now: Ts) -> Result<()> {
        if let Some((key, charges)) = p.period {
            let row = self.period(&key)?;
            row.charges = charges;
            row.changed = true;
        }
        if let Some((key, true)) = p.unique {
            self.uniques.insert(key, true);
        }
        let counter = self.counter(p.counter, &p.account)?;
        counter.aggregate = counter.aggregate.with(meter.aggregation, &p.observation)?;
        counter.cost = counter
            .cost
            .checked_add(p.cost)
            .ok_or_else(|| BillingError::Overflow("counter cost".into()))?;
        let hour_ended = hour_of(p.observation.at) + MICROS_PER_HOUR <= now;
        if hour_ended {
            counter.revised_at = Some(now);
        }
        counter.changed = true;
        Ok(())
    }

    /// Whether `key`'s value is new in its period: neither stored nor seen
    /// earlier in this call.
    fn is_new(&mut self, key: &UniqueKey) -> Result<bool> {
        if self.uniques.contains_key(key) {
            return Ok(false);
        }
        let found = find_one(
            c"meter_uniques",
            c"meter_uniques_pkey",
            &index_keys(key),
            Snapshot::New,
            |_| Ok(()),
        )?;
        if found.is_none() {
            return Ok(true);
        }
        self.uniques.insert(key.clone(), false);
        Ok(false)
    }

    fn period(&mut self, key: &PeriodKey) -> Result<&mut PeriodRow> {
        if !self.periods.contains_key(key) {
            let keys = [Key::Int8(key.0), Key::Text(&key.1), Key::Tstz(key.2)];
            let found = find_one(
                c"meter_periods",
                c"meter_periods_key",
                &keys,
                Snapshot::New,
                |t| {
                    Ok(PeriodRow {
                        id: Some(t.get(c"id")?),
                        charges: PeriodCharges {
                            aggregate: Aggregate {
                                events: 0,
                                quantity: numeric(t, c"quantity")?,
                                last_at: instant(t, c"last_at")?,
                            },
                            version: t.get(c"version")?,
                            switch_quantity: numeric(t, c"switch_quantity")?,
                            exact: numeric(t, c"exact")?,
                            base: t.get(c"base")?,
                            charged: t.get(c"charged")?,
                        },
                        changed: false,
                    })
                },
            )?;
            let row = found.unwrap_or(PeriodRow {
                id: None,
                charges: PeriodCharges::new(),
                changed: false,
            });
            self.periods.insert(key.clone(), row);
        }
        Ok(self.periods.get_mut(key).expect("inserted above"))
    }

    fn counter(&mut self, key: CounterKey, account: &str) -> Result<&mut CounterRow> {
        let kept = match self.kept.get(&key.0) {
            Some(kept) => kept.as_ref().filter(|k| k.key(key.0) == key),
            None => {
                return Err(BillingError::Internal(format!(
                    "usage counted in pool {} before it was known",
                    key.0
                )))
            }
        };
        if let (Some(k), false) = (kept, self.counters.contains_key(&key)) {
            let row = CounterRow {
                id: None,
                account: account.to_string(),
                aggregate: k.aggregate,
                cost: k.cost,
                revised_at: k.revised_at,
                changed: false,
            };
            self.counters.insert(key.clone(), row);
        }
        if !self.counters.contains_key(&key) {
            let found = find_one(
                c"usage_counters",
                c"usage_counters_key",
                &index_keys(&key),
                Snapshot::New,
                |t| {
                    let (aggregate, cost, revised_at) = counted(
                        t,
                        [c"events", c"quantity", c"last_at", c"cost", c"revised_at"],
                    )?;
                    Ok(CounterRow {
                        id: Some(t.get(c"id")?),
                        account: t.get(c"account")?,
                        aggregate,
                        cost,
                        revised_at,
                        changed: false,
                    })
                },
            )?;
            let row = found.unwrap_or(CounterRow {
                id: None,
                account: account.to_string(),
                aggregate: Aggregate::default(),
                cost: 0,
                revised_at: None,
                changed: false,
            });
            self.counters.insert(key.clone(), row);
        }
        Ok(self.counters.get_mut(&key).expect("inserted above"))
    }

    /// Decide which counter each known pool row keeps, before the pools
    /// are written: the one it kept, if this call changed it; else, if it
    /// keeps none or one of an hour that has ended, a counter of the current
    /// hour this call changed (the one it kept is written back by `save`).
    /// Every other changed counter is written to its row by `save`; so at
    /// most one counter per pool and hour moves between the two homes.
    pub fn keep_counters(&mut self, ledgers: &mut [PoolLedger], now: Ts) {
        let this_hour = hour_of(now);
        let mut changed_this_hour = self.changed_in_hour(this_hour);
        for l in ledgers.iter_mut() {
            let Some(kept) = self.kept.get(&l.id) else {
                continue;
            };
            let keep = match kept {
                Some(k) if self.counters.get(&k.key(l.id)).is_some_and(|r| r.changed) => {
                    Some(k.key(l.id))
                }
                Some(k) if k.hour >= this_hour => None,
                _ => changed_this_hour.remove(&l.id),
            };
            let Some(key) = keep else {
                continue;
            };
            if let Some(k) = kept.as_ref().filter(|k| k.key(l.id) != key) {
                self.evicted.push((l.id, l.account.clone(), k.clone()));
            }
            let row = self.counters.get_mut(&key).expect("chosen among them");
            row.changed = false; // written with the pool row
            l.counter = Some(KeptCounter {
                meter: key.1.clone(),
                hour: key.2,
                groups: key.3.clone(),
                aggregate: row.aggregate,
                cost: row.cost,
                revised_at: row.revised_at,
            });
            l.counter_changed = true;
        }
    }

    /// For each pool, the least key among the counters of `hour` this call
    /// changed: found in one pass, where a pass per pool made a batch over
    /// many pools quadratic.
    fn changed_in_hour(&self, hour: Ts) -> FxHashMap<i64, CounterKey> {
        let mut least: FxHashMap<i64, CounterKey> = FxHashMap::default();
        for (key, _) in self
            .counters
            .iter()
            .filter(|(key, r)| key.2 == hour && r.changed)
        {
            match least.get_mut(&key.0) {
                Some(k) if *k <= *key => {}
                Some(k) => *k = key.clone(),
                None => {
                    least.insert(key.0, key.clone());
                }
            }
        }
        least
    }

    /// Write every row this call changed.
    pub fn save(self) -> Result<()> {
        self.save_periods()?;
        self.save_uniques()?;
        self.save_counters()
    }

    fn save_periods(&self) -> Result<()> {
        let changed: Vec<_> = self.periods.iter().filter(|(_, r)| r.changed).collect();
        if changed.is_empty() {
            return Ok(());
        }
        let ids = Sequence::named(c"meter_periods_id_seq")?;
        let mut w = Writer::open(c"meter_periods")?;
        for ((pool, meter, period), row) in changed {
            let c = &row.charges;
            w.set(c"quantity", to_numeric(c.aggregate.quantity)?)?
                .set(c"last_at", c.aggregate.last_at.map(time::to_sql))?
                .set(c"version", c.version)?
                .set(c"switch_quantity", to_numeric(c.switch_quantity)?)?
                .set(c"exact", to_numeric(c.exact)?)?
                .set(c"base", c.base)?
                .set(c"charged", c.charged)?;
            match row.id {
                Some(id) => {
                    w.update(c"meter_periods_pkey", id, None)?;
                }
                None => {
                    w.set(c"id", ids.next()?)?
                        .set(c"tenant_id", self.tenant.as_str())?
                        .set(c"pool_id", *pool)?
                        .set(c"meter", meter.as_str())?
                        .set(c"period_start", time::to_sql(*period))?;
                    w.insert()?;
                }
            }
        }
        w.close();
        Ok(())
    }

    fn save_uniques(&self) -> Result<()> {
        let new: Vec<_> = self.uniques.iter().filter(|(_, new)| **new).collect();
        if new.is_empty() {
            return Ok(());
        }
        let mut w = Writer::open(c"meter_uniques")?;
        for ((pool, meter, period, value), _) in new {
            w.set(c"tenant_id", self.tenant.as_str())?
                .set(c"pool_id", *pool)?
                .set(c"meter", meter.as_str())?
                .set(c"period_start", time::to_sql(*period))?
                .set(c"value", value.as_str())?;
            w.insert()?;
        }
        w.close();
        Ok(())
    }

    fn save_counters(&self) -> Result<()> {
        let mut changed: Vec<(CounterKey, CounterRow)> = self
            .counters
            .iter()
            .filter(|(_, r)| r.changed)
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect();
        for (key, _) in &changed {
            let kept = self.kept.get(&key.0).and_then(Option::as_ref);
            if kept.is_some_and(|k| k.key(key.0) == *key) {
                // its row would be written and still be stood for by the pool's
                return Err(BillingError::Internal(
                    "a counter its pool row keeps was written to usage_counters (keep_counters was not called)".into(),
                ));
            }
        }
        for (pool, account, k) in &self.evicted {
            let key = k.key(*pool);
            let id = find_one(
                c"usage_counters",
                c"usage_counters_key",
                &index_keys(&key),
                Snapshot::New,
                |t| t.get::<i64>(c"id"),
            )?;
            let row = CounterRow {
                id,
                account: account.clone(),
                aggregate: k.aggregate,
                cost: k.cost,
                revised_at: k.revised_at,
                changed: true,
            };
            changed.push((key, row));
        }
        if changed.is_empty() {
            return Ok(());
        }
        let ids = Sequence::named(c"usage_counters_id_seq")?;
        let mut w = Writer::open(c"usage_counters")?;
        for ((pool, meter, hour, groups), row) in changed {
            let a = &row.aggregate;
            w.set(c"events", a.events)?
                .set(c"quantity", to_numeric(a.quantity)?)?
                .set(c"last_at", a.last_at.map(time::to_sql))?
                .set(c"cost", row.cost)?
                .set(c"revised_at", row.revised_at.map(time::to_sql))?;
            match row.id {
                Some(id) => {
                    w.update(c"usage_counters_pkey", id, None)?;
                }
                None => {
                    w.set(c"id", ids.next()?)?
                        .set(c"tenant_id", self.tenant.as_str())?
                        .set(c"pool_id", pool)?
                        .set(c"account", row.account.as_str())?
                        .set(c"meter", meter.as_str())?
                        .set(c"hour", time::to_sql(hour))?
                        .set(c"groups", groups.as_str())?;
                    w.insert()?;
                }
            }
        }
        w.close();
        Ok(())
    }
}
