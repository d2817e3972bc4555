//! Meters and their prices. A meter's prices are versions (billing.meter_prices):
//! the version in force when an event is recorded charges it, and the event
//! records which one did. The price models and their rounding are pure
//! arithmetic in `price`; what a priced event is charged (the growth of its
//! period's total, rounded once) is `metering::PeriodCharges`.

pub mod price;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::str::FromStr;

use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::AnyNumeric;
use rust_decimal::Decimal;
use serde_json::Value;

use crate::db::{self, Row, Sql, BOOL, INTERVAL, TEXT, TEXT_ARRAY, TSTZ};
use crate::error::{BillingError, OrRaise, Result};
use crate::input;
use crate::metering::Aggregation;
use crate::tenancy::current_tenant;
use crate::time::Ts;
use pgrx::datum::Interval;
use price::{Price, PriceError};

impl From<PriceError> for BillingError {
    fn from(e: PriceError) -> Self {
        match e {
            PriceError::Invalid(problem) => BillingError::invalid("price", problem),
            PriceError::Overflow(what) => BillingError::Overflow(what),
        }
    }
}

pub fn decimal(field: &'static str, n: &AnyNumeric) -> Result<Decimal> {
    Decimal::from_str(&n.to_string()).map_err(|_| {
        BillingError::invalid(
            field,
            format!("{n} is not a finite number of at most 28 digits"),
        )
    })
}

/// How one event is charged.
#[derive(Debug, Clone, Copy)]
pub enum Charging<'m> {
    /// The caller stated the cost (a provider-billed cost).
    Given(i64),
    /// The meter's price version in force charges it.
    Priced { version: i32, price: &'m Price },
}

/// One price version of a meter.
#[derive(Debug, Clone)]
pub struct PriceVersion {
    pub version: i32,
    pub effective_at: Ts,
    /// None: each event passes its own cost.
    pub price: Option<Price>,
}

/// How events of one meter are measured and charged.
#[derive(Debug, Clone)]
pub struct Meter {
    pub name: String,
    pub unit: String,
    pub aggregation: Aggregation,
    /// unique_count: the property whose distinct values count.
    pub property: Option<String>,
    pub group_by: Vec<String>,
    /// Properties every event must carry, with these values.
    pub filter: Option<serde_json::Map<String, Value>>,
    /// How long after it occurred an event is still counted when it occurred.
    pub lateness: i64,
    /// An event later than that: booked now (true) or refused.
    pub book_late_now: bool,
    /// How far ahead of now an event may say it occurred.
    pub future_skew: i64,
    pub disabled: bool,
    /// By version, ascending.
    pub prices: Vec<PriceVersion>,
}

impl Meter {
    /// The price version in force at `now`, if it has a price.
    pub fn price_at(&self, now: Ts) -> Option<(i32, &Price)> {
        let v = self.prices.iter().rfind(|p| p.effective_at <= now)?;
        v.price.as_ref().map(|p| (v.version, p))
    }

    /// How an event recorded at `now` (with the caller's cost, if given) is charged.
    pub fn charging(&self, now: Ts, given: Option<i64>) -> Result<Charging<'_>> {
        if let Some(cost) = given {
            input::non_negative("cost", cost)?;
            return Ok(Charging::Given(cost));
        }
        match self.price_at(now) {
            Some((version, price)) => Ok(Charging::Priced { version, price }),
            None => Err(BillingError::invalid(
                "cost",
                format!(
                    "meter \"{}\" has no price; pass the event's cost",
                    self.name
                ),
            )),
        }
    }

    /// Whether an event with a given cost may be taken by one lane of a
    /// split pool alone: its counters must add up across lanes (a given
    /// cost keeps it out of the price's period total).
    pub fn fits_a_lane(&self) -> bool {
        self.aggregation.adds_up()
    }

    /// Whether this meter's events need their properties read (to filter,
    /// group, count distinct values or price by a cost card).
    pub fn reads_properties(&self, now: Ts) -> bool {
        self.filter.is_some()
            || !self.group_by.is_empty()
            || self.property.is_some()
            || self.price_at(now).is_some_and(|(_, p)| p.is_additive())
    }

    /// A disabled meter refuses new usage (a hold reserved before it was
    /// disabled still settles: that usage was incurred).
    pub fn enabled(&self) -> Result<()> {
        if self.disabled {
            return Err(BillingError::WrongState(format!(
                "meter \"{}\" is disabled: it records no new usage (billing.enable_meter turns it back on)",
                self.name
            )));
        }
        Ok(())
    }

    /// A filter refuses events without the properties it names.
    pub fn accepts(&self, properties: &Value) -> Result<()> {
        if let Some(filter) = &self.filter {
            for (name, want) in filter {
                if properties.get(name) != Some(want) {
                    return Err(BillingError::invalid(
                        "properties",
                        format!(
                            "meter \"{}\" counts only events whose \"{name}\" is {want}",
                            self.name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The values of the group_by properties, as the canonical JSON object
    /// a counter is keyed by (a missing property is null).
    pub fn groups(&self, properties: &Value) -> String {
        if self.group_by.is_empty() {
            return "{}".into();
        }
        let map: serde_json::Map<String, Value> = self
            .group_by
            .iter()
            .map(|g| (g.clone(), properties.get(g).cloned().unwrap_or(Value::Null)))
            .collect();
        Value::Object(map).to_string()
    }

    /// unique_count: the value of the counted property, as text.
    pub fn unique_value(&self, properties: &Value) -> Result<Option<String>> {
        let Some(property) = &self.property else {
            return Ok(None);
        };
        match properties.get(property) {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(Some(v.to_string())),
            _ => Err(BillingError::invalid(
                "properties",
                format!(
                    "meter \"{}\" counts distinct values of \"{property}\": each event must carry it as a string or number",
                    self.name
                ),
            )),
        }
    }

    /// When an event stated to occur at `occurred` (now if None) counts:
    /// when it occurred, within the meter's lateness and future skew; an
    /// older one is booked now if the meter says so, else refused.
    pub fn counted_at(&self, occurred: Option<Ts>, now: Ts) -> Result<Ts> {
        let Some(t) = occurred else { return Ok(now) };
        if t > now.saturating_add(self.future_skew) {
            return Err(BillingError::invalid(
                "occurred_at",
                format!(
                    "is more than {} ahead of now (meter \"{}\")",
                    duration(self.future_skew),
                    self.name
                ),
            ));
        }
        if t >= now.saturating_sub(self.lateness) {
            return Ok(t);
        }
        if self.book_late_now {
            return Ok(now);
        }
        Err(BillingError::invalid(
            "occurred_at",
            format!(
                "is more than {} ago: meter \"{}\" accepts events up to that late (late_events => 'current_period' books them now)",
                duration(self.lateness),
                self.name
            ),
        ))
    }
}

/// A span of microseconds as a person reads it.
fn duration(micros: i64) -> String {
    let seconds = micros / 1_000_000;
    match seconds {
        s if s % 3600 == 0 => format!("{} hours", s / 3600),
        s if s % 60 == 0 => format!("{} minutes", s / 60),
        s => format!("{s} seconds"),
    }
}

static FIND_METER: Sql = Sql {
    text: "SELECT m.unit, m.aggregation, m.property, m.group_by, m.filter::text AS filter, \
                  (extract(epoch FROM m.lateness) * 1000000)::bigint AS lateness, \
                  m.late_events, (extract(epoch FROM m.future_skew) * 1000000)::bigint AS future_skew, \
                  m.disabled_at IS NOT NULL AS disabled, \
                  (SELECT coalesce(jsonb_agg(jsonb_build_array(p.version, \
                              ((extract(epoch FROM p.effective_at) - 946684800) * 1000000)::bigint, \
                              p.price) ORDER BY p.version), '[]')::text \
                   FROM billing.meter_prices p \
                   WHERE p.tenant_id = m.tenant_id AND p.meter = m.meter) AS prices \
           FROM billing.meters m WHERE m.tenant_id = $1 AND m.meter = $2 \
           UNION ALL \
           SELECT unit, 'sum', NULL, '{}', NULL, 172800000000, 'reject', 300000000, false, \
                  '[[1, -9223372036854775808, {\"model\": \"per_unit\", \"unit_price\": \"1\"}]]' \
           FROM billing.units WHERE tenant_id = $1 AND unit = $2 \
           LIMIT 1",
    args: &[TEXT, TEXT],
};

/// A meter's price versions from their stored JSON: [[version, effective_at, price], …].
fn stored_prices(text: &str) -> Result<Vec<PriceVersion>> {
    let bad = |e: String| BillingError::Internal(format!("stored meter price: {e}"));
    let rows: Vec<(i32, i64, Value)> =
        serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    rows.into_iter()
        .map(|(version, effective_at, price)| {
            let price = match price {
                Value::Null => None,
                v => Some(Price::from_json(&v).map_err(|e| bad(e.to_string()))?),
            };
            Ok(PriceVersion {
                version,
                effective_at,
                price,
            })
        })
        .collect()
}

fn stored_meter(name: &str, row: &Row) -> Result<Meter> {
    let filter: Option<String> = row.opt("filter")?;
    let filter = match filter.map(|f| serde_json::from_str::<Value>(&f)) {
        Some(Ok(Value::Object(map))) => Some(map),
        Some(_) => return Err(BillingError::Internal("stored meter filter".into())),
        None => None,
    };
    let aggregation: String = row.get("aggregation")?;
    let late: String = row.get("late_events")?;
    let prices: String = row.get("prices")?;
    Ok(Meter {
        name: name.to_string(),
        unit: row.get("unit")?,
        aggregation: Aggregation::parse(&aggregation)?,
        property: row.opt("property")?,
        group_by: row.get("group_by")?,
        filter,
        lateness: row.get("lateness")?,
        book_late_now: late == "current_period",
        future_skew: row.get("future_skew")?,
        disabled: row.get("disabled")?,
        prices: stored_prices(&prices)?,
    })
}

/// A meter by name; a unit's own name is a meter that charges 1 per quantity.
pub fn find_meter(client: &mut SpiClient<'_>, tenant: &str, meter: &str) -> Result<Meter> {
    let key = (tenant.to_string(), meter.to_string());
    if let Some(m) = METERS.with(|c| c.borrow().get(&key).cloned()) {
        return Ok(m);
    }
    // The tables to watch are known before the read; a meter read while an
    // invalidation arrived is returned but not cached.
    if METER_TABLES.with(Cell::get).is_none() {
        METER_TABLES.with(|t| t.set(Some(meter_tables())));
    }
    let generation = INVALIDATIONS.with(Cell::get);
    let mut rows = db::write(client, &FIND_METER, &[tenant.into(), meter.into()])?;
    let Some(row) = rows.next() else {
        return Err(BillingError::unknown("meter or unit", meter));
    };
    let found = stored_meter(meter, &Row(&row))?;
    if INVALIDATIONS.with(Cell::get) != generation {
        return Ok(found);
    }
    METERS.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() >= MAX_CACHED_METERS {
            c.clear();
        }
        c.insert(key, found.clone());
    });
    Ok(found)
}

// ----- the meter cache ---------------------------------------------------------

const MAX_CACHED_METERS: usize = 10_000;

thread_local! {
    /// Meters this backend has read, by (tenant, meter name): an ingest then
    /// needs no lookup. A change of billing.meters or billing.units sends a
    /// relcache invalidation of the table (their triggers call
    /// `forget_cached_meters`); PostgreSQL delivers it to this backend locally
    /// after the changing command, to every other backend before its next
    /// transaction, and locally again if the change rolls back, and each
    /// delivery empties the cache. So a cached meter is never one another
    /// transaction has since changed, nor one that was rolled back.
    static METERS: RefCell<HashMap<(String, String), Meter>> = RefCell::new(HashMap::new());
    /// The OIDs of the tables whose invalidation empties METERS, set before
    /// the first meter is read.
    static METER_TABLES: Cell<Option<[pg_sys::Oid; 3]>> = const { Cell::new(None) };
    /// How many times METERS was emptied.
    static INVALIDATIONS: Cell<u64> = const { Cell::new(0) };
}

/// Registered once per backend (`_PG_init`).
pub fn watch_meter_changes() {
    // SAFETY: called from _PG_init; the callback only empties thread-local state.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(
            Some(on_relcache_invalidation),
            pg_sys::Datum::from(0),
        )
    }
}

/// A relcache invalidation of billing.meters or billing.units, or of all
/// relations, empties the meter cache. A relcache callback may run where the
/// catalogs cannot be read (at transaction abort, for one), so it compares
/// with the tables' OIDs remembered when the cache was filled, and forgets
/// them too: a re-created extension's tables are looked up afresh.
#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let watched = METER_TABLES.with(Cell::get);
    if relid == pg_sys::InvalidOid || watched.is_some_and(|t| t.contains(&relid)) {
        METERS.with(|c| c.borrow_mut().clear());
        METER_TABLES.with(|t| t.set(None));
        INVALIDATIONS.with(|n| n.set(n.get().wrapping_add(1)));
    }
}

/// The OIDs of billing.meters, billing.units and billing.meter_prices
/// (InvalidOid for a missing one). Reads the catalogs: only inside a transaction, never from a callback.
fn meter_tables() -> [pg_sys::Oid; 3] {
    // SAFETY: catalog lookups by name inside a transaction; a missing schema
    // or table is InvalidOid.
    unsafe {
        let schema = pg_sys::get_namespace_oid(c"billing".as_ptr(), true);
        [c"meters", c"units", c"meter_prices"]
            .map(|t| pg_sys::get_relname_relid(t.as_ptr(), schema))
    }
}

/// Invalidate a meter table's relcache entry in every backend (called by the
/// tables' triggers, so every change empties every meter cache).
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn forget_cached_meters(relation: Option<pg_sys::Oid>) {
    if let Some(relid) = relation {
        if meter_tables().contains(&relid) {
            // SAFETY: relid names an existing table of the billing schema.
            unsafe { pg_sys::CacheInvalidateRelcacheByRelid(relid) }
        }
    }
}

static UPSERT_UNIT: Sql = Sql {
    text: "INSERT INTO billing.units (tenant_id, unit, description) VALUES ($1, $2, $3) \
           ON CONFLICT (tenant_id, unit) DO UPDATE SET description = coalesce(EXCLUDED.description, units.description)",
    args: &[TEXT, TEXT, TEXT],
};

/// Declare a unit that pools may count (grants also declare their unit).
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn define_unit(unit: Option<&str>, description: default!(Option<&str>, "NULL")) -> String {
    (|| -> Result<String> {
        let unit = input::required("unit", unit)?;
        input::name("unit", unit)?;
        let tenant = current_tenant()?;
        Spi::connect_mut(|c| -> Result<()> {
            db::write(
                c,
                &UPSERT_UNIT,
                &[tenant.as_str().into(), unit.into(), description.into()],
            )?;
            Ok(())
        })?;
        Ok(unit.to_string())
    })()
    .or_raise()
}

static LOCK_METER: Sql = Sql {
    text:
        "INSERT INTO billing.meters AS m (tenant_id, meter, unit, aggregation, property, group_by, \
                  filter, lateness, late_events, future_skew, description) \
           VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, $10, $11) \
           ON CONFLICT ON CONSTRAINT meters_pkey DO UPDATE SET meter = m.meter \
           RETURNING (xmax = 0) AS created, m.unit, m.aggregation, m.property, m.group_by, \
                     EXISTS (SELECT 1 FROM billing.hourly_usage c \
                             WHERE c.tenant_id = m.tenant_id AND c.meter = m.meter) AS used",
    args: &[
        TEXT, TEXT, TEXT, TEXT, TEXT, TEXT_ARRAY, TEXT, INTERVAL, TEXT, INTERVAL, TEXT,
    ],
};

static UPDATE_METER: Sql = Sql {
    text: "UPDATE billing.meters SET unit = $3, aggregation = $4, property = $5, group_by = $6, \
                  filter = $7::jsonb, lateness = $8, late_events = $9, future_skew = $10, description = $11 \
           WHERE tenant_id = $1 AND meter = $2",
    args: &[
        TEXT, TEXT, TEXT, TEXT, TEXT, TEXT_ARRAY, TEXT, INTERVAL, TEXT, INTERVAL, TEXT,
    ],
};

/// A new price version unless the latest one has this price; the version
/// that applies afterwards is returned either way.
static ADD_PRICE: Sql = Sql {
    text: "WITH latest AS (SELECT version, effective_at, price FROM billing.meter_prices \
                           WHERE tenant_id = $1 AND meter = $2 ORDER BY version DESC LIMIT 1), \
                added AS (INSERT INTO billing.meter_prices (tenant_id, meter, version, effective_at, price) \
                          SELECT $1, $2, coalesce((SELECT version FROM latest), 0) + 1, \
                                 coalesce($4, now()), $3::jsonb \
                          WHERE NOT EXISTS (SELECT 1 FROM latest WHERE latest.price IS NOT DISTINCT FROM $3::jsonb) \
                          RETURNING version, effective_at, 'created' AS status) \
           SELECT version, effective_at, status FROM added \
           UNION ALL SELECT version, effective_at, 'unchanged' FROM latest WHERE NOT EXISTS (SELECT 1 FROM added)",
    args: &[TEXT, TEXT, TEXT, TSTZ],
};

static LATEST_PRICE_AT: Sql = Sql {
    text: "SELECT max(effective_at) AS effective_at FROM billing.meter_prices WHERE tenant_id = $1 AND meter = $2",
    args: &[TEXT, TEXT],
};

static SET_DISABLED: Sql = Sql {
    text: "UPDATE billing.meters SET disabled_at = CASE WHEN $3 THEN coalesce(disabled_at, now()) END \
           WHERE tenant_id = $1 AND meter = $2 RETURNING meter",
    args: &[TEXT, TEXT, BOOL],
};

/// A meter's settings, validated.
struct MeterSettings {
    aggregation: Aggregation,
    property: Option<String>,
    group_by: Vec<String>,
    filter: Option<String>,
    lateness: Interval,
    late_events: String,
    future_skew: Interval,
}

const MAX_GROUP_BY: usize = 4;
const MAX_LATENESS_MICROS: i64 = 35 * 24 * 3_600_000_000;
const MAX_FUTURE_SKEW_MICROS: i64 = 24 * 3_600_000_000;

/// An interval of days, hours and less, within [0, max].
fn span(field: &'static str, v: Interval, max: i64) -> Result<Interval> {
    if v.months() != 0 {
        return Err(BillingError::invalid(
            field,
            "must be stated in days, hours or less (months have no fixed length)",
        ));
    }
    let micros = i64::from(v.days())
        .checked_mul(86_400_000_000)
        .and_then(|d| d.checked_add(v.micros()));
    match micros {
        Some(m) if (0..=max).contains(&m) => Ok(v),
        _ => Err(BillingError::invalid(
            field,
            format!("must lie between 0 and {}", duration(max)),
        )),
    }
}

impl MeterSettings {
    #[allow(clippy::too_many_arguments)]
    fn validate(
        aggregation: &str,
        property: Option<&str>,
        group_by: Vec<Option<String>>,
        filter: Option<&Value>,
        lateness: Interval,
        late_events: &str,
        future_skew: Interval,
    ) -> Result<MeterSettings> {
        let aggregation = Aggregation::parse(aggregation)?;
        match (aggregation, property) {
            (Aggregation::UniqueCount, None) => {
                return Err(BillingError::invalid(
                    "property",
                    "is required for unique_count: the property whose distinct values count",
                ))
            }
            (Aggregation::UniqueCount, Some(p)) => input::name("property", p)?,
            (_, Some(_)) => {
                return Err(BillingError::invalid(
                    "property",
                    "applies to unique_count only",
                ))
            }
            _ => {}
        }
        let group_by: Vec<String> = group_by
            .into_iter()
            .map(|g| input::required("group_by", g))
            .collect::<Result<_>>()?;
        for g in &group_by {
            input::name("group_by", g)?;
        }
        if group_by.len() > MAX_GROUP_BY {
            return Err(BillingError::invalid(
                "group_by",
                format!("at most {MAX_GROUP_BY} properties"),
            ));
        }
        let filter = match filter {
            None => None,
            Some(f) => {
                let text = input::json_object("filter", f)?;
                if f.as_object().is_some_and(|m| m.is_empty()) {
                    None
                } else {
                    Some(text)
                }
            }
        };
        if !["reject", "current_period"].contains(&late_events) {
            return Err(BillingError::invalid(
                "late_events",
                "must be 'reject' or 'current_period'",
            ));
        }
        Ok(MeterSettings {
            aggregation,
            property: property.map(str::to_string),
            group_by,
            filter,
            lateness: span("lateness", lateness, MAX_LATENESS_MICROS)?,
            late_events: late_events.to_string(),
            future_skew: span("future_skew", future_skew, MAX_FUTURE_SKEW_MICROS)?,
        })
    }
}

/// A price as stored: canonical JSON, or None for "each event passes its cost".
fn stored_price(unit_price: Option<&AnyNumeric>, price: Option<&Value>) -> Result<Option<String>> {
    let price = match (unit_price, price) {
        (Some(_), Some(_)) => {
            return Err(BillingError::invalid(
                "price",
                "give unit_price or price, not both",
            ))
        }
        (Some(p), None) => {
            let p = decimal("unit_price", p)?;
            if p.is_sign_negative() {
                return Err(BillingError::invalid("unit_price", "must not be negative"));
            }
            Price {
                model: price::Model::PerUnit { unit_price: p },
                included: Decimal::ZERO,
                rounding: price::Rounding::HalfUp,
            }
        }
        (None, Some(v)) => Price::from_json(v)?,
        (None, None) => return Ok(None),
    };
    Ok(Some(price.to_json().to_string()))
}

fn set_price_version(
    c: &mut SpiClient<'_>,
    tenant: &str,
    meter: &str,
    price: Option<String>,
    effective_at: Option<pgrx::datum::TimestampWithTimeZone>,
) -> Result<(i32, pgrx::datum::TimestampWithTimeZone, String)> {
    if let Some(at) = effective_at {
        let at = crate::time::from_sql("effective_at", at)?;
        let latest = db::write(c, &LATEST_PRICE_AT, &[tenant.into(), meter.into()])?
            .next()
            .map(|r| Row(&r).opt::<pgrx::datum::TimestampWithTimeZone>("effective_at"))
            .transpose()?
            .flatten()
            .map(crate::time::instant);
        if at < crate::time::now() || latest.is_some_and(|l| at <= l) {
            return Err(BillingError::invalid(
                "effective_at",
                "must be now or later, and after the meter's latest price version: a price never changes what was charged",
            ));
        }
    }
    let mut rows = db::write(
        c,
        &ADD_PRICE,
        &[
            tenant.into(),
            meter.into(),
            price.into(),
            effective_at.into(),
        ],
    )?;
    let row = rows
        .next()
        .ok_or_else(|| BillingError::Internal("no price version".into()))?;
    let row = Row(&row);
    Ok((
        row.get("version")?,
        row.get("effective_at")?,
        row.get("status")?,
    ))
}

/// Declare or change a meter: the unit it charges, its price (`unit_price`
/// per quantity, or a `price` model; neither: every event passes its own
/// cost), how its events aggregate and group, what they must carry, and how
/// late they may arrive. A new price is a new version from now on; its
/// aggregation, property and group_by cannot change once it counted usage.
#[allow(clippy::too_many_arguments)]
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn define_meter(
    meter: Option<&str>,
    unit: Option<&str>,
    unit_price: default!(Option<AnyNumeric>, "NULL"),
    description: default!(Option<&str>, "NULL"),
    aggregation: default!(Option<&str>, "'sum'"),
    property: default!(Option<&str>, "NULL"),
    group_by: default!(Option<Vec<Option<String>>>, "'{}'"),
    filter: default!(Option<pgrx::JsonB>, "NULL"),
    lateness: default!(Option<Interval>, "'48 hours'"),
    late_events: default!(Option<&str>, "'reject'"),
    future_skew: default!(Option<Interval>, "'5 minutes'"),
    price: default!(Option<pgrx::JsonB>, "NULL"),
) -> String {
    (|| -> Result<String> {
        let meter = input::required("meter", meter)?;
        let unit = input::required("unit", unit)?;
        input::name("meter", meter)?;
        input::name("unit", unit)?;
        let settings = MeterSettings::validate(
            input::required("aggregation", aggregation)?,
            property,
            input::required("group_by", group_by)?,
            filter.as_ref().map(|f| &f.0),
            input::required("lateness", lateness)?,
            input::required("late_events", late_events)?,
            input::required("future_skew", future_skew)?,
        )?;
        let price = stored_price(unit_price.as_ref(), price.as_ref().map(|p| &p.0))?;
        let tenant = current_tenant()?;
        Spi::connect_mut(|c| -> Result<()> {
            db::write(
                c,
                &UPSERT_UNIT,
                &[
                    tenant.as_str().into(),
                    unit.into(),
                    Option::<&str>::None.into(),
                ],
            )?;
            let args = || -> Vec<pgrx::datum::DatumWithOid<'_>> {
                vec![
                    tenant.as_str().into(),
                    meter.into(),
                    unit.into(),
                    settings.aggregation.label().into(),
                    settings.property.clone().into(),
                    settings.group_by.clone().into(),
                    settings.filter.clone().into(),
                    settings.lateness.into(),
                    settings.late_events.as_str().into(),
                    settings.future_skew.into(),
                    description.into(),
                ]
            };
            let mut rows = db::write(c, &LOCK_METER, &args())?;
            let row = rows
                .next()
                .ok_or_else(|| BillingError::Internal("meter not written".into()))?;
            let row = Row(&row);
            let created: bool = row.get("created")?;
            let counted_the_same = row.get::<String>("unit")? == unit
                && row.get::<String>("aggregation")? == settings.aggregation.label()
                && row.opt::<String>("property")? == settings.property
                && row.get::<Vec<String>>("group_by")? == settings.group_by;
            if !created && !counted_the_same && row.get::<bool>("used")? {
                return Err(BillingError::WrongState(format!(
                    "meter \"{meter}\" has counted usage: its unit, aggregation, property and group_by stay; define a new meter to count differently"
                )));
            }
            db::write(c, &UPDATE_METER, &args())?;
            set_price_version(c, &tenant, meter, price, None)?;
            Ok(())
        })?;
        Ok(meter.to_string())
    })()
    .or_raise()
}

/// Give a meter a new price version from `effective_at` (now, or a later
/// instant: a scheduled change). The same price as the latest version is
/// `unchanged`. Events keep the version that charged them.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn set_price(
    meter: Option<&str>,
    price: Option<pgrx::JsonB>,
    effective_at: default!(Option<pgrx::datum::TimestampWithTimeZone>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(meter, String),
        name!(version, i32),
        name!(effective_at, pgrx::datum::TimestampWithTimeZone),
        name!(status, String),
    ),
> {
    let result = (|| -> Result<(String, i32, pgrx::datum::TimestampWithTimeZone, String)> {
        let meter = input::required("meter", meter)?;
        input::name("meter", meter)?;
        let price = input::required("price", price)?;
        let stored = match &price.0 {
            Value::Null => None,
            v => stored_price(None, Some(v))?,
        };
        let tenant = current_tenant()?;
        let (version, at, status) = Spi::connect_mut(|c| {
            find_meter(c, &tenant, meter)?;
            set_price_version(c, &tenant, meter, stored, effective_at)
        })?;
        Ok((meter.to_string(), version, at, status))
    })()
    .or_raise();
    TableIterator::once(result)
}

fn set_disabled(meter: Option<&str>, disabled: bool) -> Result<String> {
    let meter = input::required("meter", meter)?;
    input::name("meter", meter)?;
    let tenant = current_tenant()?;
    Spi::connect_mut(|c| {
        let found = db::write(
            c,
            &SET_DISABLED,
            &[tenant.as_str().into(), meter.into(), disabled.into()],
        )?
        .next()
        .is_some();
        if !found {
            return Err(BillingError::unknown("meter", meter));
        }
        Ok(meter.to_string())
    })
}

/// Stop a meter recording usage (a retired model): ingest and settle refuse
/// it, naming it; its events, counters and prices stay.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn disable_meter(meter: Option<&str>) -> String {
    set_disabled(meter, true).or_raise()
}

/// Let a disabled meter record usage again.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn enable_meter(meter: Option<&str>) -> String {
    set_disabled(meter, false).or_raise()
}

fn price_arg(price: Option<pgrx::JsonB>) -> Result<Price> {
    Ok(Price::from_json(&input::required("price", price)?.0)?)
}

fn quantity_arg(quantity: Option<AnyNumeric>) -> Result<Decimal> {
    decimal("quantity", &input::required("quantity", quantity)?)
}

/// The invoice lines of `price` for a period's aggregate `quantity`: each
/// tier, package or unit line with its exact amount (no rounding; the lines
/// add up to the exact total). Reads nothing.
#[pg_extern(immutable, parallel_safe)]
fn price_lines(
    price: Option<pgrx::JsonB>,
    quantity: Option<AnyNumeric>,
) -> TableIterator<
    'static,
    (
        name!(line, i32),
        name!(description, String),
        name!(quantity, AnyNumeric),
        name!(unit_price, AnyNumeric),
        name!(amount, AnyNumeric),
    ),
> {
    let result = (|| -> Result<Vec<_>> {
        let lines = price_arg(price)?.lines(quantity_arg(quantity)?)?;
        let numeric = |d: Decimal| {
            AnyNumeric::try_from(d.to_string().as_str())
                .map_err(|e| BillingError::Internal(format!("{d}: {e}")))
        };
        lines
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                Ok((
                    i as i32 + 1,
                    l.description,
                    numeric(l.quantity)?,
                    numeric(l.unit_price)?,
                    numeric(l.amount)?,
                ))
            })
            .collect()
    })();
    TableIterator::new(result.or_raise())
}

/// What `price` charges for a period's aggregate `quantity`, rounded once
/// by its rule. Reads nothing.
#[pg_extern(immutable, parallel_safe)]
fn price_total(price: Option<pgrx::JsonB>, quantity: Option<AnyNumeric>) -> i64 {
    (|| -> Result<i64> { Ok(price_arg(price)?.total(quantity_arg(quantity)?)?) })().or_raise()
}
