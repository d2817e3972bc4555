//! Meters and prices. A price may be fractional; the cost of each event is
//! rounded once, half away from zero, to a whole minor unit (0.5 → 1, 2.5 → 3).

use std::str::FromStr;

use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::AnyNumeric;
use rust_decimal::{Decimal, RoundingStrategy};

use crate::db::{self, Sql, TEXT};
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

/// quantity × unit_price, rounded half away from zero; overflow is an error.
pub fn price(quantity: Decimal, unit_price: Decimal) -> Result<i64> {
    let exact = quantity
        .checked_mul(unit_price)
        .ok_or_else(|| BillingError::Overflow(format!("{quantity} × {unit_price}")))?;
    let rounded = exact.round_dp_with_strategy(0, RoundingStrategy::MidpointAwayFromZero);
    i64::try_from(rounded)
        .map_err(|_| BillingError::Overflow(format!("cost {rounded} exceeds bigint")))
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
    /// The cost of one event and the price snapshot recorded with it.
    pub fn cost(&self, quantity: Decimal, given: Option<i64>) -> Result<(i64, Option<Decimal>)> {
        if let Some(cost) = given {
            input::non_negative("cost", cost)?;
            return Ok((cost, None));
        }
        match self.unit_price {
            Some(p) => Ok((price(quantity, p)?, Some(p))),
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

static FIND_METER: Sql = Sql {
    text: "SELECT unit, unit_price::text FROM billing.meters WHERE tenant_id = $1 AND meter = $2 \
           UNION ALL \
           SELECT unit, '1' FROM billing.units WHERE tenant_id = $1 AND unit = $2 \
           LIMIT 1",
    args: &[TEXT, TEXT],
};

/// A meter by name; a unit's own name is a meter that charges 1 per quantity.
pub fn find_meter(client: &mut SpiClient<'_>, tenant: &str, meter: &str) -> Result<Meter> {
    let mut rows = db::write(client, &FIND_METER, &[tenant.into(), meter.into()])?;
    let Some(row) = rows.next() else {
        return Err(BillingError::unknown("meter or unit", meter));
    };
    let price: Option<String> = db::opt(&row, 2)?;
    Ok(Meter {
        name: meter.to_string(),
        unit: db::col(&row, 1)?,
        unit_price: price
            .map(|p| Decimal::from_str(&p))
            .transpose()
            .map_err(|e| BillingError::Internal(format!("stored price: {e}")))?,
    })
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
fn define_unit(unit: &str, description: default!(Option<&str>, "NULL")) -> String {
    (|| -> Result<String> {
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
    meter: &str,
    unit: &str,
    unit_price: default!(Option<AnyNumeric>, "NULL"),
    description: default!(Option<&str>, "NULL"),
) -> String {
    (|| -> Result<String> {
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

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn rounds_half_away_from_zero_once() {
        assert_eq!(price(d("1"), d("0.5")).unwrap(), 1);
        assert_eq!(price(d("5"), d("0.5")).unwrap(), 3);
        assert_eq!(price(d("3"), d("0.333")).unwrap(), 1);
        assert_eq!(price(d("1.5"), d("1")).unwrap(), 2);
        assert_eq!(price(d("1.49"), d("1")).unwrap(), 1);
        assert_eq!(price(d("1000"), d("0.0015")).unwrap(), 2);
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        assert!(matches!(
            price(d("9223372036854775807"), d("2")),
            Err(BillingError::Overflow(_))
        ));
        assert_eq!(price(d("9223372036854775807"), d("1")).unwrap(), i64::MAX);
    }
}
