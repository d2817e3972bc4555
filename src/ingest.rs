//! Usage ingest: price an event, drain the pool in order, record what grants
//! could not cover as debt (or reject it, when strict). Idempotent forever by
//! (tenant, key): a replay returns the original outcome and writes nothing.

use std::collections::{BTreeMap, HashMap, HashSet};

use pgrx::datum::TimestampWithTimeZone as Tstz;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{AnyNumeric, JsonB};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::db::{self, Sql, TEXT};
use crate::direct::{self, find_one, Key, Lookup, Sequence, Snapshot, Tuple, Writer};
use crate::error::{BillingError, OrRaise, Result};
use crate::idempotency::{self, Fingerprint};
use crate::input::{self, JsonArg};
use crate::ledger::{
    drains_json, flush_all, flush_checked, CarriedEntries, Create, Drain, EventRows, Flushed,
    PoolLedger,
};
use crate::limits::{self, Limits};
use crate::metering::store::{Metering, Usage};
use crate::metrics;
use crate::pricing::price::PriceError;
use crate::pricing::{self, Charging, Meter};
use crate::tenancy::current_tenant;
use crate::time::{self, Ts};

pub const MAX_BATCH: usize = 50_000;
/// The largest batch accepted, in bytes of jsonb: the batch is read from its
/// text into events, so the backend's memory stays a small multiple of this.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// One usage event as the caller described it, validated.
#[derive(Debug, Clone)]
pub struct Event {
    pub account: String,
    pub meter: String,
    pub quantity: Decimal,
    pub key: String,
    pub occurred_at: Option<Ts>,
    /// The properties object as canonical JSON text (sorted keys).
    pub properties_text: String,
    pub cost: Option<i64>,
    pub strict: bool,
}

impl Event {
    /// Rules that hold whatever the time: checked before anything is read.
    fn validate(&self) -> Result<()> {
        input::account(&self.account)?;
        input::name("meter", &self.meter)?;
        input::event_key("key", &self.key)?;
        if self.quantity.is_sign_negative() {
            return Err(BillingError::invalid("quantity", "must not be negative"));
        }
        if let Some(c) = self.cost {
            input::non_negative("cost", c)?;
        }
        Ok(())
    }

    /// The event as its meter counts and charges it, for a new event
    /// debiting the locked pool row `ledger` (checked only after its key was
    /// looked up, so a replay returns its original outcome forever); its
    /// properties are read once, if its meter or the pool's limits need them.
    /// `incurred`: usage already paid for (a settled hold), recorded even
    /// without the properties its meter asks of new usage (a filter's, a
    /// unique_count's value, which it then does not count).
    pub fn metered<'a>(
        &'a self,
        meter: &'a Meter,
        ledger: &PoolLedger,
        incurred: bool,
    ) -> Result<(Usage<'a>, Charging<'a>)> {
        let now = ledger.now;
        let at = meter.counted_at(self.occurred_at, now)?;
        let properties = if meter.reads_properties(now) || ledger.limited {
            serde_json::from_str(&self.properties_text)
                .map_err(|e| BillingError::Internal(format!("properties: {e}")))?
        } else {
            Value::Null
        };
        if !incurred {
            meter.accepts(&properties)?;
        }
        let charging = meter.charging(now, self.cost)?;
        let exact = match charging {
            Charging::Priced { price, .. } if price.is_additive() => {
                Some(price.event_exact(&properties).map_err(|e| match e {
                    PriceError::Invalid(problem) => BillingError::invalid("properties", problem),
                    other => other.into(),
                })?)
            }
            _ => None,
        };
        let usage = Usage {
            pool_id: ledger.id,
            account: &self.account,
            quantity: self.quantity,
            at,
            unique: match meter.unique_value(&properties) {
                Err(_) if incurred => None,
                value => value?,
            },
            groups: meter.groups(&properties),
            member: limits::member_of(&properties),
            exact,
        };
        Ok((usage, charging))
    }

    /// What must match for a replay: everything the caller said, except strict
    /// (a retry may relax it) and an occurred_at the caller left to default.
    pub fn fingerprint(&self) -> Vec<u8> {
        Fingerprint::new("ingest")
            .text(&self.account)
            .text(&self.meter)
            .text(&self.quantity.normalize().to_string())
            .opt_int(self.occurred_at)
            .text(&self.properties_text)
            .opt_int(self.cost)
            .finish()
    }
}

/// What the caller gets back, for a new event and for every replay of it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub key: String,
    pub event_id: Option<i64>,
    pub status: &'static str,
    pub meter: String,
    pub unit: String,
    pub cost: i64,
    pub covered: i64,
    pub debt_created: i64,
    pub drains: Value,
    pub available: i64,
    pub entitled: bool,
}

type IngestRow = (
    name!(event_id, Option<i64>),
    name!(status, String),
    name!(meter, String),
    name!(unit, String),
    name!(cost, i64),
    name!(covered, i64),
    name!(debt_created, i64),
    name!(drains, JsonB),
    name!(available, i64),
    name!(entitled, bool),
);

type BatchRow = (
    name!(key, String),
    name!(event_id, Option<i64>),
    name!(status, String),
    name!(meter, String),
    name!(unit, String),
    name!(cost, i64),
    name!(covered, i64),
    name!(debt_created, i64),
    name!(drains, JsonB),
    name!(available, i64),
    name!(entitled, bool),
);

impl Outcome {
    fn row(self) -> IngestRow {
        (
            self.event_id,
            self.status.into(),
            self.meter,
            self.unit,
            self.cost,
            self.covered,
            self.debt_created,
            JsonB(self.drains),
            self.available,
            self.entitled,
        )
    }

    fn batch_row(self) -> BatchRow {
        let key = self.key.clone();
        let r = self.row();
        (key, r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7, r.8, r.9)
    }
}

/// Record one usage event. `cost` overrides the meter's price (a provider-billed
/// cost); `strict => true` rejects, writing nothing, when the pool cannot pay.
#[allow(clippy::too_many_arguments)]
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn ingest(
    account: Option<&str>,
    meter: Option<&str>,
    quantity: Option<AnyNumeric>,
    key: default!(Option<&str>, "NULL"),
    occurred_at: default!(Option<Tstz>, "NULL"),
    properties: default!(Option<JsonArg>, "'{}'"),
    cost: default!(Option<i64>, "NULL"),
    strict: default!(Option<bool>, "false"),
) -> TableIterator<
    'static,
    (
        name!(event_id, Option<i64>),
        name!(status, String),
        name!(meter, String),
        name!(unit, String),
        name!(cost, i64),
        name!(covered, i64),
        name!(debt_created, i64),
        name!(drains, JsonB),
        name!(available, i64),
        name!(entitled, bool),
    ),
> {
    let result = (|| -> Result<Outcome> {
        let key = key.ok_or_else(|| {
            BillingError::invalid("key", "is required: usage is idempotent by key")
        })?;
        let properties = input::required("properties", properties)?;
        let event = Event {
            account: input::required("account", account)?.into(),
            meter: input::required("meter", meter)?.into(),
            quantity: pricing::decimal("quantity", &input::required("quantity", quantity)?)?,
            key: key.into(),
            occurred_at: time::opt_from_sql("occurred_at", occurred_at)?,
            properties_text: input::json_object("properties", properties.value("properties")?)?,
            cost,
            strict: input::required("strict", strict)?,
        };
        event.validate()?;
        let mut out = Spi::connect_mut(|client| ingest_events(client, vec![event], true))?;
        Ok(out.remove(0))
    })();
    metrics::count(result.as_ref().map_or("rejected", |o| o.status));
    TableIterator::once(result.or_raise().row())
}

/// Record many usage events in one call: a JSON array of objects with
/// account, meter, quantity, key and optionally occurred_at, properties, cost,
/// strict. One row per event, in input order; a strict event that cannot be
/// paid is returned as `rejected` and the rest still apply.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn ingest_batch(
    events: Option<JsonArg>,
) -> TableIterator<
    'static,
    (
        name!(key, String),
        name!(event_id, Option<i64>),
        name!(status, String),
        name!(meter, String),
        name!(unit, String),
        name!(cost, i64),
        name!(covered, i64),
        name!(debt_created, i64),
        name!(drains, JsonB),
        name!(available, i64),
        name!(entitled, bool),
    ),
> {
    let result = (|| -> Result<Vec<Outcome>> {
        let parsed = parse_batch(input::required("events", events.as_ref())?)?;
        if parsed.is_empty() {
            return Ok(Vec::new());
        }
        Spi::connect_mut(|client| ingest_events(client, parsed, false))
    })();
    match &result {
        Ok(outcomes) => outcomes.iter().for_each(|o| metrics::count(o.status)),
        Err(_) => metrics::count("rejected"),
    }
    TableIterator::new(result.or_raise().into_iter().map(Outcome::batch_row))
}

/// Read a batch from its JSON text into events, without building a tree of
/// the whole array: memory stays a small multiple of the batch's size.
fn parse_batch(events: &JsonArg) -> Result<Vec<Event>> {
    if events.size() > MAX_BATCH_BYTES {
        return Err(BillingError::invalid(
            "events",
            format!(
                "is {} bytes; the limit is {MAX_BATCH_BYTES} (split the batch)",
                events.size()
            ),
        ));
    }
    let items = events.with_text(|text| {
        serde_json::from_slice::<Vec<&RawValue>>(text)
            .map_err(|_| BillingError::invalid("events", "must be a JSON array of event objects"))
            .and_then(|items| {
                if items.len() > MAX_BATCH {
                    return Err(BillingError::invalid(
                        "events",
                        format!("at most {MAX_BATCH} events per batch"),
                    ));
                }
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| parse_event(i, item))
                    .collect::<Result<Vec<_>>>()
            })
    })?;
    Ok(items)
}

/// One element of a batch as written; every field is checked by `parse_event`.
#[derive(Deserialize)]
struct BatchItem<'a> {
    account: Option<String>,
    meter: Option<String>,
    #[serde(borrow)]
    quantity: Option<&'a RawValue>,
    key: Option<String>,
    occurred_at: Option<String>,
    properties: Option<Value>,
    #[serde(borrow)]
    cost: Option<&'a RawValue>,
    strict: Option<bool>,
}

fn parse_event(i: usize, item: &RawValue) -> Result<Event> {
    let bad = |what: &str| BillingError::invalid("events", format!("element {i}: {what}"));
    let item: BatchItem = serde_json::from_str(item.get()).map_err(|e| {
        bad(&format!(
            "must be an object of account, meter, quantity, key, occurred_at, properties, cost, strict ({e})"
        ))
    })?;
    let quantity = match item.quantity.map(RawValue::get) {
        None | Some("null") => return Err(bad("quantity is required")),
        Some(raw) => raw
            .trim_matches('"')
            .parse::<Decimal>()
            .map_err(|_| bad("quantity is not a decimal number"))?,
    };
    let cost = match item.cost.map(RawValue::get) {
        None | Some("null") => None,
        Some(raw) => Some(
            raw.parse::<i64>()
                .map_err(|_| bad("cost must be an integer in bigint range"))?,
        ),
    };
    let occurred_at = match item.occurred_at {
        None => None,
        Some(s) => Some(parse_timestamp(&s).map_err(|_| bad("occurred_at is not a timestamp"))?),
    };
    let properties = item
        .properties
        .unwrap_or_else(|| Value::Object(Default::default()));
    let event = Event {
        account: item.account.ok_or_else(|| bad("account is required"))?,
        meter: item.meter.ok_or_else(|| bad("meter is required"))?,
        quantity,
        key: item.key.ok_or_else(|| bad("key is required"))?,
        occurred_at,
        properties_text: input::json_object("properties", &properties)
            .map_err(|e| bad(&e.to_string()))?,
        cost,
        strict: item.strict.unwrap_or(false),
    };
    event.validate().map_err(|e| bad(&e.to_string()))?;
    Ok(event)
}

static PARSE_TIMESTAMP: Sql = Sql {
    text: "SELECT $1::timestamptz",
    args: &[TEXT],
};

fn parse_timestamp(s: &str) -> Result<Ts> {
    let t: Option<Tstz> = Spi::connect(|c| -> Result<Option<Tstz>> {
        Ok(db::read(c, &PARSE_TIMESTAMP, &[s.into()])?
            .first()
            .get_one()?)
    })?;
    time::from_sql(
        "occurred_at",
        t.ok_or_else(|| BillingError::invalid("occurred_at", "is null"))?,
    )
}

// ----- the shared path -------------------------------------------------------

/// A new event, ready to be written once its pool's entries are computed.
struct NewEvent<'e> {
    id: i64,
    event: &'e Event,
    unit: String,
    pool_id: i64,
    price_version: Option<i32>,
    /// When its counters count it, if not when it occurred.
    booked_at: Option<Ts>,
    hash: Vec<u8>,
    outcome: Outcome,
}

/// A fresh usage event id: for a new event of `ingest`, and for usage
/// recorded outside it (a settled hold) whose ledger entries must name it
/// before it is written.
pub fn allocate_event_id() -> Result<i64> {
    event_ids()?.next()
}

/// Where usage event ids come from.
fn event_ids() -> Result<Sequence> {
    Sequence::named(c"usage_events_id_seq")
}

/// Write a pool's changes together with usage charged outside `ingest` (a
/// settled hold: its cost is the settlement, already debited under `id`), in
/// the same table and statement as ingested events, so every usage report
/// includes it.
pub fn flush_with_usage(
    client: &mut SpiClient<'_>,
    ledger: &mut PoolLedger,
    id: i64,
    event: Event,
    outcome: Outcome,
) -> Result<()> {
    let new = [NewEvent {
        id,
        hash: event.fingerprint(),
        unit: outcome.unit.clone(),
        event: &event,
        pool_id: ledger.id,
        price_version: None,
        booked_at: None,
        outcome,
    }];
    flush_all(client, std::slice::from_mut(ledger), Some(&NewEvents(&new)))
}

/// Where each input event's outcome comes from.
enum Slot {
    Pending,
    Done(Outcome),
    New(usize),
    RepeatOfNew(usize),
}

/// Ingest events in order. Pools are locked in (account, unit) order so two
/// batches never deadlock; within a pool, events apply in input order.
/// `raise_rejection`: a strict event that cannot be paid raises (single form).
fn ingest_events(
    client: &mut SpiClient<'_>,
    events: Vec<Event>,
    raise_rejection: bool,
) -> Result<Vec<Outcome>> {
    let tenant = current_tenant()?;
    // A replay of keys that are all recorded is answered from their events
    // alone: no pool is locked, nothing is written, and the transaction
    // takes no id (so its commit waits for no WAL flush). Keys not all
    // recorded yet are looked up again after the pools' locks.
    let mut all_recorded = true;
    let stored = find_stored(&tenant, keys_of(&events), |_| {
        all_recorded = false;
        Ok(false)
    })?;
    if all_recorded {
        return replay_of(&events, &stored);
    }
    let mut meters: HashMap<String, Meter> = HashMap::new();
    let mut by_pool: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        if !meters.contains_key(&e.meter) {
            let m = pricing::find_meter(client, &tenant, &e.meter)?;
            meters.insert(e.meter.clone(), m);
        }
        let m = &meters[&e.meter];
        by_pool
            .entry((e.account.clone(), m.unit.clone()))
            .or_default()
            .push(i);
    }

    let mut slots: Vec<Slot> = events.iter().map(|_| Slot::Pending).collect();
    let mut new_events: Vec<NewEvent> = Vec::new();
    let mut in_batch: HashMap<&str, (Vec<u8>, usize)> = HashMap::new();
    let pool_keys: Vec<(String, String)> = by_pool.keys().cloned().collect();
    let lane_cost = match &events[..] {
        [e] => e.cost.filter(|_| meters[&e.meter].fits_a_lane()),
        _ => None,
    };
    let mut ledgers = lock_pools(client, &tenant, &pool_keys, lane_cost)?;
    let on_share = ledgers.iter().any(|l| l.is_lane());
    // After the locks: any concurrent ingest of these keys has committed.
    let (stored, new_ids) = find_events(&tenant, &events)?;
    let mut metering = Metering::new(&tenant);
    let mut limits = Limits::default();
    for ledger in &ledgers {
        metering.know_pool(ledger);
    }
    for (ledger, indexes) in ledgers.iter_mut().zip(by_pool.into_values()) {
        let unit = ledger.unit.clone();
        for i in indexes {
            let event = &events[i];
            let hash = event.fingerprint();
            if let Some((stored_hash, outcome)) = stored.get(&event.key) {
                idempotency::same_request("usage event", &event.key, stored_hash, &hash)?;
                slots[i] = Slot::Done(outcome.clone());
                continue;
            }
            if let Some((first_hash, n)) = in_batch.get(event.key.as_str()) {
                idempotency::same_request("usage event", &event.key, first_hash, &hash)?;
                slots[i] = Slot::RepeatOfNew(*n);
                continue;
            }
            let meter = &meters[&event.meter];
            meter.enabled()?;
            let (usage, charging) = event.metered(meter, ledger, false)?;
            let prepared = metering.prepare(meter, &usage, charging)?;
            let cost = prepared.cost;
            let limit_reached = if ledger.limited {
                limits.blocking(client, ledger.id, usage.member.as_deref(), cost, ledger.now)?
            } else {
                None
            };
            let mut outcome = rejected(event, &unit, cost, ledger);
            if on_share && !ledger.allows(cost) {
                // its figures were written after this transaction began
                return Err(BillingError::Retry(format!(
                    "the lane of the {unit} pool of account \"{}\" this debit took holds credit that was not spendable yet when its transaction began",
                    event.account
                )));
            }
            if event.strict && (!ledger.allows(cost) || limit_reached.is_some()) {
                if raise_rejection {
                    return Err(match limit_reached {
                        Some(reached) if ledger.allows(cost) => reached,
                        _ => ledger.insufficient(cost),
                    });
                }
                slots[i] = Slot::Done(outcome);
                continue;
            }
            if ledger.limited {
                limits.count(client, ledger.id, usage.member.as_deref(), cost, ledger.now)?;
            }
            let price_version = prepared.version;
            metering.commit(meter, prepared, ledger.now)?;
            let n = new_events.len();
            let id = new_ids[event.key.as_str()];
            ledger.current_event = Some(id);
            let debit = ledger.debit(cost)?;
            outcome.status = "applied";
            outcome.covered = debit.covered;
            outcome.debt_created = debit.uncovered;
            outcome.drains = drains_json(&ledger.grant_drains(&debit.drains));
            outcome.available = ledger.pool_available();
            outcome.entitled = ledger.pool_entitled();
            new_events.push(NewEvent {
                id,
                event,
                unit: unit.clone(),
                pool_id: ledger.id,
                price_version,
                booked_at: (usage.at != event.occurred_at.unwrap_or(ledger.now))
                    .then_some(usage.at),
                hash: hash.clone(),
                outcome,
            });
            in_batch.insert(event.key.as_str(), (hash, n));
            slots[i] = Slot::New(n);
        }
        ledger.current_event = None;
        ledger.deal_shares(client)?;
    }

    metering.keep_counters(&mut ledgers, time::now());
    let flushed = flush_checked(
        client,
        &mut ledgers,
        Some(&NewEvents(&new_events)),
        on_share,
    )?;
    if flushed == Flushed::KeyTaken {
        // a debit on another lane recorded this key first: answer as a
        // replay, having written nothing
        return replay(&tenant, &events);
    }
    metering.save()?;
    limits.save(client, &tenant)?;
    slots
        .into_iter()
        .map(|slot| match slot {
            Slot::Done(o) => Ok(o),
            Slot::New(n) => {
                let mut o = new_events[n].outcome.clone();
                o.event_id = Some(new_events[n].id);
                Ok(o)
            }
            Slot::RepeatOfNew(n) => {
                let mut o = new_events[n].outcome.clone();
                o.event_id = Some(new_events[n].id);
                o.status = "duplicate";
                Ok(o)
            }
            Slot::Pending => Err(BillingError::Internal("event without outcome".into())),
        })
        .collect()
}

/// Lock the pools of a call. A call of one event of a given cost
/// (`lane_cost`) on a split pool is paid by one lane if one can:
/// first a lane locked alone, leaving the others to concurrent debits; else,
/// with the whole pool locked, any lane that can (all were busy a moment
/// ago). Otherwise the pool takes its lanes' credit back.
fn lock_pools(
    client: &mut SpiClient<'_>,
    tenant: &str,
    keys: &[(String, String)],
    lane_cost: Option<i64>,
) -> Result<Vec<PoolLedger>> {
    let lane_cost = match (keys, lane_cost) {
        ([(account, unit)], Some(cost)) => {
            if let Some(lane) = PoolLedger::lock_share(tenant, account, unit, cost)? {
                return Ok(vec![lane]);
            }
            Some(cost)
        }
        _ => None,
    };
    let mut pools = PoolLedger::open_many_with_lanes(client, tenant, keys, Create::Pool)?;
    if let (Some(cost), [pool]) = (lane_cost, &mut pools[..]) {
        if let Some(lane) = pool.take_lane_paying(cost) {
            return Ok(vec![lane]);
        }
    }
    for pool in pools.iter_mut() {
        pool.collect_shares()?;
    }
    Ok(pools)
}

/// The outcome of events whose keys are all recorded: a replay of each.
fn replay(tenant: &str, events: &[Event]) -> Result<Vec<Outcome>> {
    let stored = find_stored(tenant, keys_of(events), |_| Ok(false))?;
    replay_of(events, &stored)
}

/// The outcome of events whose keys are all in `stored`: a replay of each.
fn replay_of(events: &[Event], stored: &Stored) -> Result<Vec<Outcome>> {
    events
        .iter()
        .map(|event| {
            let (stored_hash, outcome) = stored.get(&event.key).ok_or_else(|| {
                BillingError::Internal(format!("usage event {} vanished", event.key))
            })?;
            idempotency::same_request(
                "usage event",
                &event.key,
                stored_hash,
                &event.fingerprint(),
            )?;
            Ok(outcome.clone())
        })
        .collect()
}

fn rejected(event: &Event, unit: &str, cost: i64, ledger: &PoolLedger) -> Outcome {
    Outcome {
        key: event.key.clone(),
        event_id: None,
        status: "rejected",
        meter: event.meter.clone(),
        unit: unit.to_string(),
        cost,
        covered: 0,
        debt_created: 0,
        drains: Value::Array(vec![]),
        available: ledger.pool_available(),
        entitled: ledger.pool_entitled(),
    }
}

fn keys_of(events: &[Event]) -> impl Iterator<Item = &str> {
    events.iter().map(|e| e.key.as_str())
}

/// Each stored key's fingerprint and outcome.
type Stored = HashMap<String, (Vec<u8>, Outcome)>;

/// Every distinct key of a call with its stored event, if any, and a fresh
/// id for each key not stored (the id of the event it becomes).
fn find_events(tenant: &str, events: &[Event]) -> Result<(Stored, HashMap<String, i64>)> {
    // looked up in key order (neighbours in the index), numbered in input
    // order (a pool's events are applied, and its usage log runs, in that order)
    let mut by_key: Vec<&str> = keys_of(events).collect();
    by_key.sort_unstable();
    let found = find_stored(tenant, by_key.into_iter(), |_| Ok(true))?;
    let ids = event_ids()?;
    let mut new_ids: HashMap<String, i64> = HashMap::new();
    for e in events {
        if !found.contains_key(&e.key) && !new_ids.contains_key(&e.key) {
            new_ids.insert(e.key.clone(), ids.next()?);
        }
    }
    Ok((found, new_ids))
}

/// Every distinct key of a call with its stored event. Each distinct key
/// not stored is passed to `missing`, which says whether to look on. Looked
/// up straight in the (tenant, key) index with a new snapshot, so an event a
/// concurrent call committed while this one waited for its pool is found.
fn find_stored<'k>(
    tenant: &str,
    keys: impl Iterator<Item = &'k str>,
    mut missing: impl FnMut(&str) -> Result<bool>,
) -> Result<Stored> {
    let mut found: Stored = HashMap::new();
    let mut not_found: HashSet<&str> = HashSet::new();
    let mut lookup = Lookup::open(
        c"usage_events",
        c"usage_events_tenant_id_key_key",
        2,
        Snapshot::New,
    )?;
    for key in keys {
        if found.contains_key(key) || not_found.contains(key) {
            continue;
        }
        match lookup
            .find(&[Key::Text(tenant), Key::Text(key)], stored_event)?
            .pop()
        {
            Some((hash, mut outcome, carried_grant)) => {
                if let Some(grant) = carried_grant {
                    outcome.drains = carried_drains(grant, outcome.covered)?;
                }
                found.insert(key.to_string(), (hash, outcome));
            }
            None => {
                not_found.insert(key);
                if !missing(key)? {
                    break;
                }
            }
        }
    }
    lookup.close();
    Ok(found)
}

/// The drains of an event that carries its debit (schema.sql, usage_events):
/// its grant paid the whole cost; a lane's share is named by its grant.
fn carried_drains(grant: i64, covered: i64) -> Result<Value> {
    let parent = find_one(
        c"grants",
        c"grants_pkey",
        &[Key::Int8(grant)],
        Snapshot::New,
        |t| t.opt::<i64>(c"parent_id"),
    )?
    .flatten();
    Ok(drains_json(&[Drain {
        grant_id: parent.unwrap_or(grant),
        amount: covered,
    }]))
}

/// A stored event: its request fingerprint, the outcome a replay returns,
/// and the grant of the debit it carries, whose drain it does not store.
fn stored_event(t: &Tuple) -> Result<(Vec<u8>, Outcome, Option<i64>)> {
    let drains: Option<JsonB> = t.opt(c"drains")?;
    let carried_grant = match drains {
        Some(_) => None,
        None => Some(t.get(c"entry_grant")?),
    };
    let outcome = Outcome {
        key: t.get(c"key")?,
        event_id: Some(t.get(c"id")?),
        status: "duplicate",
        meter: t.get(c"meter")?,
        unit: t.get(c"unit")?,
        cost: t.get(c"cost")?,
        covered: t.get(c"covered")?,
        debt_created: t.get(c"debt_created")?,
        drains: drains.map_or(Value::Null, |d| d.0),
        available: t.get(c"available_after")?,
        entitled: t.get(c"entitled_after")?,
    };
    Ok((t.get(c"request_hash")?, outcome, carried_grant))
}

/// New events, written with their pools' changes (see ledger::EventRows).
struct NewEvents<'a, 'e>(&'a [NewEvent<'e>]);

impl EventRows for NewEvents<'_, '_> {
    fn count(&self) -> usize {
        self.0.len()
    }

    fn write(&self, tenant: &str, w: &mut Writer, carried: &CarriedEntries) -> Result<()> {
        let now = time::now();
        for n in self.0 {
            let quantity = AnyNumeric::try_from(n.event.quantity.to_string().as_str())
                .map_err(|e| BillingError::Internal(format!("quantity: {e}")))?;
            w.set(c"id", n.id)?
                .set(c"tenant_id", tenant)?
                .set(c"key", n.event.key.as_str())?
                .set(c"account", n.event.account.as_str())?
                .set(c"meter", n.event.meter.as_str())?
                .set(c"unit", n.unit.as_str())?
                .set(c"pool_id", n.pool_id)?
                .set(c"quantity", quantity)?
                .set(c"price_version", n.price_version)?
                .set(c"cost", n.outcome.cost)?
                .set(c"covered", n.outcome.covered)?
                .set(c"debt_created", n.outcome.debt_created)?
                .set(c"strict", n.event.strict)?
                // a carried debit's drain is its entry (`stored_event` rebuilds it)
                .set(
                    c"drains",
                    (!carried.carries_event(n.id)).then(|| JsonB(n.outcome.drains.clone())),
                )?
                .set(c"available_after", n.outcome.available)?
                .set(c"entitled_after", n.outcome.entitled)?
                .set(
                    c"occurred_at",
                    time::to_sql(n.event.occurred_at.unwrap_or(now)),
                )?
                .set(c"booked_at", n.booked_at.map(time::to_sql))?
                .set(c"recorded_at", time::clock_now())?
                .set_made(c"properties", || direct::jsonb(&n.event.properties_text))?
                .set(c"request_hash", n.hash.as_slice())?;
            carried.set_columns(w, n.id)?;
            w.insert()?;
        }
        Ok(())
    }
}
