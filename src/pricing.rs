//! Meters and prices. A price may be fractional. Each event's cost is charged
//! in whole minor units with its sub-unit remainder carried, per pool and
//! meter, to the next event: the event is charged `round(carry + exact)`,
//! rounding half up, and what is left (in [-0.5, 0.5)) becomes the new carry.
//! The sum charged for a pool and meter is therefore always the exact sum of
//! its events rounded once, however the usage is split into events: a
//! thousand one-token events cost what one thousand-token event costs.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::str::FromStr;

use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::AnyNumeric;
use rust_decimal::{Decimal, RoundingStrategy};

use crate::db::{self, Row, Sql, INT8_ARRAY, TEXT, TEXT_ARRAY};
use crate::error::{BillingError, OrRaise, Result};
use crate::input;
use crate::tenancy::current_tenant;

pub fn decimal(field: &'static str, n: &AnyNumeric) -> Result<Decimal> {
    Decimal::from_str(&n.to_string()).map_err(|_| {
        BillingError::invalid(
            field,
            format!("{n} is not a finite number of at most 28 digits"),
        )
    })
}

/// quantity × unit_price, exactly: a product that does not fit a bigint, or
/// that would need more than 28 decimal digits to be exact, is an error
/// rather than a rounded figure.
pub fn exact_cost(quantity: Decimal, unit_price: Decimal) -> Result<Decimal> {
    let product = quantity
        .checked_mul(unit_price)
        .ok_or_else(|| BillingError::Overflow(format!("{quantity} × {unit_price}")))?;
    if product.scale() < quantity.scale() + unit_price.scale() && !product.is_zero() {
        return Err(BillingError::invalid(
            "quantity",
            format!("{quantity} × {unit_price} needs more than 28 digits; round the quantity"),
        ));
    }
    Ok(product)
}

/// Charge an exact cost against the carried remainder of earlier events:
/// whole units charged (rounding half up) and the new carry.
pub fn charge(exact: Decimal, carry: Decimal) -> Result<(i64, Decimal)> {
    let owed = exact
        .checked_add(carry)
        .filter(|sum| sum.scale() >= exact.scale().max(carry.scale()) || sum.is_zero())
        .ok_or_else(|| BillingError::Overflow(format!("{exact} + {carry}")))?;
    let whole = owed.round_dp_with_strategy(0, RoundingStrategy::MidpointAwayFromZero);
    // owed ≥ -0.5, and -0.5 rounds away from zero to -1: half up means 0 there
    let whole = if whole.is_sign_negative() {
        Decimal::ZERO
    } else {
        whole
    };
    let charged = i64::try_from(whole)
        .map_err(|_| BillingError::Overflow(format!("cost {whole} exceeds bigint")))?;
    Ok((charged, owed - whole))
}

/// How one event is charged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cost {
    /// The caller stated the cost (a provider-billed cost).
    Given(i64),
    /// The meter's price applies: the exact cost and the price snapshot.
    Priced { exact: Decimal, unit_price: Decimal },
}

/// How an event of one meter is charged.
#[derive(Debug, Clone)]
pub struct Meter {
    pub name: String,
    pub unit: String,
    /// None: the caller supplies each event's cost.
    pub unit_price: Option<Decimal>,
}

impl Meter {
    /// How an event of `quantity` (with the caller's cost, if given) is charged.
    pub fn cost(&self, quantity: Decimal, given: Option<i64>) -> Result<Cost> {
        if let Some(cost) = given {
            input::non_negative("cost", cost)?;
            return Ok(Cost::Given(cost));
        }
        match self.unit_price {
            Some(p) => Ok(Cost::Priced {
                exact: exact_cost(quantity, p)?,
                unit_price: p,
            }),
            None => Err(BillingError::invalid(
                "cost",
                format!(
                    "meter \"{}\" has no price; pass the event's cost",
                    self.name
                ),
            )),
        }
    }
}

/// The carried remainders of the pools and meters a call charges, read and
/// written under the pools' locks.
#[derive(Default)]
pub struct Carries {
    /// (pool, meter) → (carry, changed by this call)
    carries: HashMap<(i64, String), (Decimal, bool)>,
}

static LOAD_CARRIES: Sql = Sql {
    text: "SELECT c.pool_id, c.meter, c.carry::text AS carry \
           FROM unnest($1::bigint[], $2::text[]) AS k(pool_id, meter) \
           JOIN billing.meter_carries c ON c.pool_id = k.pool_id AND c.meter = k.meter",
    args: &[INT8_ARRAY, TEXT_ARRAY],
};

static SAVE_CARRIES: Sql = Sql {
    text: "INSERT INTO billing.meter_carries AS c (tenant_id, pool_id, meter, carry) \
           SELECT $1, k.pool_id, k.meter, k.carry::numeric \
           FROM unnest($2::bigint[], $3::text[], $4::text[]) AS k(pool_id, meter, carry) \
           ON CONFLICT (pool_id, meter) DO UPDATE SET carry = EXCLUDED.carry",
    args: &[TEXT, INT8_ARRAY, TEXT_ARRAY, TEXT_ARRAY],
};

impl Carries {
    /// The carries of (pool, meter) pairs; a pair never charged carries 0.
    pub fn load(client: &mut SpiClient<'_>, pairs: Vec<(i64, String)>) -> Result<Carries> {
        if pairs.is_empty() {
            return Ok(Carries::default());
        }
        let (pools, meters): (Vec<i64>, Vec<String>) = pairs.into_iter().unzip();
        let mut carries = HashMap::new();
        for row in db::write(client, &LOAD_CARRIES, &[pools.into(), meters.into()])? {
            let row = Row(&row);
            let carry: String = row.get("carry")?;
            let carry = Decimal::from_str(&carry)
                .map_err(|e| BillingError::Internal(format!("stored carry: {e}")))?;
            carries.insert((row.get("pool_id")?, row.get("meter")?), (carry, false));
        }
        Ok(Carries { carries })
    }

    /// What an event of exact cost `exact` is charged in this pool and meter;
    /// `commit` records the new carry (only for an event that applies).
    pub fn charge(&self, pool: i64, meter: &str, exact: Decimal) -> Result<(i64, Decimal)> {
        let carry = self
            .carries
            .get(&(pool, meter.to_string()))
            .map_or(Decimal::ZERO, |(carry, _)| *carry);
        charge(exact, carry)
    }

    pub fn commit(&mut self, pool: i64, meter: &str, carry: Decimal) {
        self.carries
            .insert((pool, meter.to_string()), (carry, true));
    }

    pub fn save(&self, client: &mut SpiClient<'_>, tenant: &str) -> Result<()> {
        let changed: Vec<(&(i64, String), &Decimal)> = self
            .carries
            .iter()
            .filter(|(_, (_, changed))| *changed)
            .map(|(k, (carry, _))| (k, carry))
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        let pools: Vec<i64> = changed.iter().map(|((p, _), _)| *p).collect();
        let meters: Vec<&str> = changed.iter().map(|((_, m), _)| m.as_str()).collect();
        let carries: Vec<String> = changed.iter().map(|(_, c)| c.to_string()).collect();
        db::write(
            client,
            &SAVE_CARRIES,
            &[tenant.into(), pools.into(), meters.into(), carries.into()],
        )?;
        Ok(())
    }
}

static FIND_METER: Sql = Sql {
    text: "SELECT unit, unit_price::text AS unit_price FROM billing.meters WHERE tenant_id = $1 AND meter = $2 \
           UNION ALL \
           SELECT unit, '1' FROM billing.units WHERE tenant_id = $1 AND unit = $2 \
           LIMIT 1",
    args: &[TEXT, TEXT],
};

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
    let row = Row(&row);
    let price: Option<String> = row.opt("unit_price")?;
    let found = Meter {
        name: meter.to_string(),
        unit: row.get("unit")?,
        unit_price: price
            .map(|p| Decimal::from_str(&p))
            .transpose()
            .map_err(|e| BillingError::Internal(format!("stored price: {e}")))?,
    };
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
    static METER_TABLES: Cell<Option<[pg_sys::Oid; 2]>> = const { Cell::new(None) };
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

/// The OIDs of billing.meters and billing.units (InvalidOid for a missing
/// one). Reads the catalogs: only inside a transaction, never from a callback.
fn meter_tables() -> [pg_sys::Oid; 2] {
    // SAFETY: catalog lookups by name inside a transaction; a missing schema
    // or table is InvalidOid.
    unsafe {
        let schema = pg_sys::get_namespace_oid(c"billing".as_ptr(), true);
        [c"meters", c"units"].map(|t| pg_sys::get_relname_relid(t.as_ptr(), schema))
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

static UPSERT_METER: Sql = Sql {
    text: "INSERT INTO billing.meters (tenant_id, meter, unit, unit_price, description) \
           VALUES ($1, $2, $3, $4::numeric, $5) \
           ON CONFLICT (tenant_id, meter) DO UPDATE \
           SET unit = EXCLUDED.unit, unit_price = EXCLUDED.unit_price, description = EXCLUDED.description",
    args: &[TEXT, TEXT, TEXT, TEXT, TEXT],
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

/// Declare or change a meter: the unit it charges and its price per quantity
/// (NULL: every event passes its own cost). Changing a price affects later events only.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn define_meter(
    meter: Option<&str>,
    unit: Option<&str>,
    unit_price: default!(Option<AnyNumeric>, "NULL"),
    description: default!(Option<&str>, "NULL"),
) -> String {
    (|| -> Result<String> {
        let meter = input::required("meter", meter)?;
        let unit = input::required("unit", unit)?;
        input::name("meter", meter)?;
        input::name("unit", unit)?;
        let price = unit_price
            .as_ref()
            .map(|p| decimal("unit_price", p))
            .transpose()?;
        if price.is_some_and(|p| p.is_sign_negative()) {
            return Err(BillingError::invalid("unit_price", "must not be negative"));
        }
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
            db::write(
                c,
                &UPSERT_METER,
                &[
                    tenant.as_str().into(),
                    meter.into(),
                    unit.into(),
                    price.map(|p| p.to_string()).into(),
                    description.into(),
                ],
            )?;
            Ok(())
        })?;
        Ok(meter.to_string())
    })()
    .or_raise()
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use proptest::prelude::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn once(q: &str, p: &str) -> i64 {
        charge(exact_cost(d(q), d(p)).unwrap(), Decimal::ZERO)
            .unwrap()
            .0
    }

    #[test]
    fn a_first_event_rounds_half_up_once() {
        assert_eq!(once("1", "0.5"), 1);
        assert_eq!(once("5", "0.5"), 3);
        assert_eq!(once("3", "0.333"), 1);
        assert_eq!(once("1.5", "1"), 2);
        assert_eq!(once("1.49", "1"), 1);
        assert_eq!(once("1000", "0.0015"), 2);
        assert_eq!(once("0", "7"), 0);
    }

    #[test]
    fn remainders_carry_so_splitting_costs_the_same() {
        // 0.4 mills per token: one 1,000-token event, or 1,000 one-token events
        let (one, _) = charge(exact_cost(d("1000"), d("0.4")).unwrap(), Decimal::ZERO).unwrap();
        let mut carry = Decimal::ZERO;
        let mut split = 0;
        for _ in 0..1000 {
            let (c, next) = charge(exact_cost(d("1"), d("0.4")).unwrap(), carry).unwrap();
            split += c;
            carry = next;
        }
        assert_eq!((one, split), (400, 400));
        assert_eq!(carry, Decimal::ZERO);
    }

    #[test]
    fn the_carry_stays_within_half_a_unit() {
        let mut carry = Decimal::ZERO;
        for q in ["0.5", "0.5", "0.49", "0.01", "2.5", "0", "0.3"] {
            let (c, next) = charge(d(q), carry).unwrap();
            assert!(c >= 0);
            assert!(next >= d("-0.5") && next < d("0.5"), "{q}: {next}");
            carry = next;
        }
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        assert!(matches!(
            exact_cost(d("9223372036854775807"), d("2")).and_then(|e| charge(e, Decimal::ZERO)),
            Err(BillingError::Overflow(_))
        ));
        assert_eq!(once("9223372036854775807", "1"), i64::MAX);
    }

    proptest! {
        /// However a usage total is split into events, the sum charged is the
        /// exact total rounded once: never lower by a unit, never higher.
        #[test]
        fn splitting_never_changes_the_total(
            price_millis in 1u32..5_000,
            parts in proptest::collection::vec(0u32..10_000, 1..200),
        ) {
            let price = Decimal::new(price_millis as i64, 4);
            let total: u64 = parts.iter().map(|p| *p as u64).sum();
            let whole = charge(exact_cost(Decimal::from(total), price).unwrap(), Decimal::ZERO).unwrap().0;
            let mut carry = Decimal::ZERO;
            let mut split = 0;
            for p in &parts {
                let (c, next) = charge(exact_cost(Decimal::from(*p), price).unwrap(), carry).unwrap();
                prop_assert!(c >= 0);
                split += c;
                carry = next;
            }
            prop_assert_eq!(split, whole);
            prop_assert_eq!(Decimal::from(split) + carry, exact_cost(Decimal::from(total), price).unwrap());
        }
    }
}
