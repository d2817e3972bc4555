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
use std::str::FromStr;

use pgrx::datum::TimestampWithTimeZone as Tstz;
use pgrx::AnyNumeric;
use rust_decimal::Decimal;

use super::{hour_of, period_of, Aggregate, Observation, PeriodCharges, MICROS_PER_HOUR};
use crate::direct::{find_one, Key, Sequence, Snapshot, Tuple, Writer};
use crate::error::{BillingError, Result};
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

struct CounterRow {
    id: Option<i64>,
    account: String,
    aggregate: Aggregate,
    cost: i64,
    revised_at: Option<Ts>,
    changed: bool,
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
}

fn numeric(t: &Tuple, column: &std::ffi::CStr) -> Result<Decimal> {
    let n: AnyNumeric = t.get(column)?;
    Decimal::from_str(&n.to_string())
        .map_err(|e| BillingError::Internal(format!("stored quantity: {e}")))
}

fn to_numeric(d: Decimal) -> Result<AnyNumeric> {
    AnyNumeric::try_from(d.to_string().as_str())
        .map_err(|e| BillingError::Internal(format!("quantity {d}: {e}")))
}

fn instant(t: &Tuple, column: &std::ffi::CStr) -> Result<Option<Ts>> {
    Ok(t.opt::<Tstz>(column)?.map(time::instant))
}

impl Metering {
    pub fn new(tenant: &str) -> Metering {
        Metering {
            tenant: tenant.to_string(),
            periods: HashMap::new(),
            uniques: HashMap::new(),
            counters: HashMap::new(),
        }
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
        let keys = [
            Key::Int8(key.0),
            Key::Text(&key.1),
            Key::Tstz(key.2),
            Key::Text(&key.3),
        ];
        let found = find_one(
            c"meter_uniques",
            c"meter_uniques_pkey",
            &keys,
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
        if !self.counters.contains_key(&key) {
            let keys = [
                Key::Int8(key.0),
                Key::Text(&key.1),
                Key::Tstz(key.2),
                Key::Text(&key.3),
            ];
            let found = find_one(
                c"usage_counters",
                c"usage_counters_key",
                &keys,
                Snapshot::New,
                |t| {
                    Ok(CounterRow {
                        id: Some(t.get(c"id")?),
                        account: t.get(c"account")?,
                        aggregate: Aggregate {
                            events: t.get(c"events")?,
                            quantity: numeric(t, c"quantity")?,
                            last_at: instant(t, c"last_at")?,
                        },
                        cost: t.get(c"cost")?,
                        revised_at: instant(t, c"revised_at")?,
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
                Some(id) => w.update(c"meter_periods_pkey", id)?,
                None => {
                    w.set(c"id", ids.next()?)?
                        .set(c"tenant_id", self.tenant.as_str())?
                        .set(c"pool_id", *pool)?
                        .set(c"meter", meter.as_str())?
                        .set(c"period_start", time::to_sql(*period))?;
                    w.insert()?
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
        let changed: Vec<_> = self.counters.iter().filter(|(_, r)| r.changed).collect();
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
                Some(id) => w.update(c"usage_counters_pkey", id)?,
                None => {
                    w.set(c"id", ids.next()?)?
                        .set(c"tenant_id", self.tenant.as_str())?
                        .set(c"pool_id", *pool)?
                        .set(c"account", row.account.as_str())?
                        .set(c"meter", meter.as_str())?
                        .set(c"hour", time::to_sql(*hour))?
                        .set(c"groups", groups.as_str())?;
                    w.insert()?
                }
            }
        }
        w.close();
        Ok(())
    }
}
