//! Top-up quotes: the tenant's card fee schedule and top-up limits (data,
//! per currency), and `billing.quote`, the total to charge so that the card
//! fee is paid on top of the credit. The arithmetic is `price` (pure).

pub mod price;

use std::str::FromStr;

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::AnyNumeric;
use rust_decimal::Decimal;

use crate::db::{self, Row, Sql, INT8, TEXT};
use crate::error::{BillingError, OrRaise, Result};
use crate::input;
use crate::pricing;
use crate::tenancy::current_tenant;

use self::price::{Fee, Quote, QuoteError};

impl From<QuoteError> for BillingError {
    fn from(e: QuoteError) -> Self {
        match e {
            QuoteError::Overflow => BillingError::Overflow(e.to_string()),
            QuoteError::Percent(_) => BillingError::invalid("percent", e.to_string()),
            QuoteError::Fixed(_) => BillingError::invalid("fixed", e.to_string()),
            QuoteError::Credit(_) => BillingError::invalid("credit_amount", e.to_string()),
        }
    }
}

/// A currency as providers name it: three lowercase letters (`usd`).
fn currency(c: Option<&str>) -> Result<&str> {
    let c = input::required("currency", c)?;
    if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(BillingError::invalid(
            "currency",
            format!("\"{c}\" is not a three-letter lowercase currency code (usd, eur, …)"),
        ));
    }
    Ok(c)
}

/// Write one row of the schedule (an insert, or the replacement of its values).
fn upsert(sql: &'static Sql, args: &[DatumWithOid<'_>]) -> Result<()> {
    Spi::connect_mut(|client| db::write(client, sql, args).map(|_| ()))
}

static SET_FEE: Sql = Sql {
    text: "INSERT INTO billing.topup_fees (tenant_id, currency, card_kind, percent, fixed) \
           VALUES ($1, $2, $3, $4::numeric, $5) \
           ON CONFLICT (tenant_id, currency, card_kind) \
           DO UPDATE SET percent = EXCLUDED.percent, fixed = EXCLUDED.fixed, updated_at = now()",
    args: &[TEXT, TEXT, TEXT, TEXT, INT8],
};

/// The fee a card of `card_kind` costs on a charge in `currency`:
/// `percent` of the charge (rounded up to the minor unit) plus `fixed` minor
/// units. Setting it again replaces it.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn set_topup_fee(
    currency: Option<&str>,
    card_kind: Option<&str>,
    percent: Option<AnyNumeric>,
    fixed: Option<i64>,
) -> TableIterator<
    'static,
    (
        name!(currency, String),
        name!(card_kind, String),
        name!(percent, AnyNumeric),
        name!(fixed, i64),
    ),
> {
    let result = (|| -> Result<(String, String, AnyNumeric, i64)> {
        let currency = self::currency(currency)?;
        let card_kind = input::required("card_kind", card_kind)?;
        input::name("card_kind", card_kind)?;
        let percent = input::required("percent", percent)?;
        let fee = Fee {
            percent: pricing::decimal("percent", &percent)?,
            fixed: input::required("fixed", fixed)?,
        };
        fee.validate()?;
        let tenant = current_tenant()?;
        upsert(
            &SET_FEE,
            &[
                tenant.as_str().into(),
                currency.into(),
                card_kind.into(),
                fee.percent.to_string().as_str().into(),
                fee.fixed.into(),
            ],
        )?;
        Ok((
            currency.to_string(),
            card_kind.to_string(),
            percent,
            fee.fixed,
        ))
    })();
    TableIterator::once(result.or_raise())
}

static SET_LIMITS: Sql = Sql {
    text: "INSERT INTO billing.topup_limits (tenant_id, currency, min_credit, max_credit, conversion_percent) \
           VALUES ($1, $2, $3, $4, $5::numeric) \
           ON CONFLICT (tenant_id, currency) \
           DO UPDATE SET min_credit = EXCLUDED.min_credit, max_credit = EXCLUDED.max_credit, \
                         conversion_percent = EXCLUDED.conversion_percent, updated_at = now()",
    args: &[TEXT, TEXT, INT8, INT8, TEXT],
};

/// The least and the most a top-up in `currency` may credit (minor units),
/// and the surcharge a card pays when its currency is converted (a percent
/// of the charge, added to its card kind's).
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn set_topup_limits(
    currency: Option<&str>,
    min_credit: Option<i64>,
    max_credit: Option<i64>,
    conversion_percent: default!(Option<AnyNumeric>, "0"),
) -> TableIterator<
    'static,
    (
        name!(currency, String),
        name!(min_credit, i64),
        name!(max_credit, i64),
        name!(conversion_percent, AnyNumeric),
    ),
> {
    let result = (|| -> Result<(String, i64, i64, AnyNumeric)> {
        let currency = self::currency(currency)?;
        let min = input::required("min_credit", min_credit)?;
        let max = input::required("max_credit", max_credit)?;
        input::positive("min_credit", min)?;
        if max < min {
            return Err(BillingError::invalid(
                "max_credit",
                format!("{max} is below min_credit {min}"),
            ));
        }
        let conversion = input::required("conversion_percent", conversion_percent)?;
        let surcharge = pricing::decimal("conversion_percent", &conversion)?;
        Fee {
            percent: surcharge,
            fixed: 0,
        }
        .validate()
        .map_err(|_| {
            BillingError::invalid(
                "conversion_percent",
                format!("{surcharge}% must be at least 0 and below 100"),
            )
        })?;
        let tenant = current_tenant()?;
        upsert(
            &SET_LIMITS,
            &[
                tenant.as_str().into(),
                currency.into(),
                min.into(),
                max.into(),
                surcharge.to_string().as_str().into(),
            ],
        )?;
        Ok((currency.to_string(), min, max, conversion))
    })();
    TableIterator::once(result.or_raise())
}

/// A card kind's fee in a currency, with the currency's limits if set.
static SCHEDULE: Sql = Sql {
    text: "SELECT f.percent::text AS percent, f.fixed, l.min_credit, l.max_credit, \
                  l.conversion_percent::text AS conversion_percent, \
                  (SELECT string_agg(k.card_kind, ', ' ORDER BY k.card_kind) FROM billing.topup_fees k \
                   WHERE k.tenant_id = $1 AND k.currency = $2) AS kinds \
           FROM (SELECT 1) one \
           LEFT JOIN billing.topup_fees f ON f.tenant_id = $1 AND f.currency = $2 AND f.card_kind = $3 \
           LEFT JOIN billing.topup_limits l ON l.tenant_id = $1 AND l.currency = $2",
    args: &[TEXT, TEXT, TEXT],
};

type QuoteRow = (
    name!(currency, String),
    name!(card_kind, String),
    name!(credit, i64),
    name!(fee, i64),
    name!(total, i64),
    name!(percent, AnyNumeric),
    name!(fixed, i64),
);

/// What to charge a card of `card_kind` for a top-up that credits
/// `credit_amount` (minor units of `currency`): the least total whose net,
/// after the worst case of the tenant's fee for that card (its percent, plus
/// the conversion surcharge when `converted`, rounded up to the minor unit,
/// and its fixed part), covers the credit exactly. A credit outside the
/// currency's limits, or a card kind without a fee, is refused (22023)
/// before any payment. The credit granted is the credit, never the total.
#[pg_extern(security_definer, stable)]
#[search_path(pg_catalog, billing, pg_temp)]
fn quote(
    credit_amount: Option<i64>,
    currency: Option<&str>,
    card_kind: Option<&str>,
    converted: default!(Option<bool>, "false"),
) -> TableIterator<
    'static,
    (
        name!(currency, String),
        name!(card_kind, String),
        name!(credit, i64),
        name!(fee, i64),
        name!(total, i64),
        name!(percent, AnyNumeric),
        name!(fixed, i64),
    ),
> {
    let result = (|| -> Result<QuoteRow> {
        let credit = input::required("credit_amount", credit_amount)?;
        input::positive("credit_amount", credit)?;
        let currency = self::currency(currency)?;
        let card_kind = input::required("card_kind", card_kind)?;
        input::name("card_kind", card_kind)?;
        let converted = input::required("converted", converted)?;
        let tenant = current_tenant()?;
        let (fee, limits) = Spi::connect(|client| {
            let rows = db::read(
                client,
                &SCHEDULE,
                &[tenant.as_str().into(), currency.into(), card_kind.into()],
            )?;
            let row = rows
                .into_iter()
                .next()
                .ok_or_else(|| BillingError::Internal("no schedule row".into()))?;
            let r = Row(&row);
            let Some(percent) = r.opt::<String>("percent")? else {
                let kinds: Option<String> = r.opt("kinds")?;
                return Err(BillingError::invalid(
                    "card_kind",
                    match kinds {
                        Some(k) => format!(
                            "no fee is set for \"{card_kind}\" cards in {currency} (set: {k})"
                        ),
                        None => {
                            format!("no top-up fee is set in {currency} (billing.set_topup_fee)")
                        }
                    },
                ));
            };
            let surcharge = match (converted, r.opt::<String>("conversion_percent")?) {
                (false, _) => Decimal::ZERO,
                (true, Some(p)) => parse_percent(&p)?,
                // a converted card's worst case is unknown: never quote it as none
                (true, None) => {
                    return Err(BillingError::invalid(
                        "converted",
                        format!(
                            "no currency conversion surcharge is set in {currency} (billing.set_topup_limits)"
                        ),
                    ))
                }
            };
            let fee = Fee {
                percent: parse_percent(&percent)? + surcharge,
                fixed: r.get("fixed")?,
            };
            let limits: Option<(i64, i64)> = match (r.opt("min_credit")?, r.opt("max_credit")?) {
                (Some(min), Some(max)) => Some((min, max)),
                _ => None,
            };
            Ok((fee, limits))
        })?;
        if let Some((min, max)) = limits {
            if credit < min || credit > max {
                return Err(BillingError::invalid(
                    "credit_amount",
                    format!("{credit} is outside the top-up limits in {currency}: {min} to {max}"),
                ));
            }
        }
        let Quote {
            credit,
            fee: charged,
            total,
        } = price::quote(credit, fee)?;
        let percent = AnyNumeric::try_from(fee.percent.to_string().as_str())
            .map_err(|e| BillingError::Internal(format!("percent: {e}")))?;
        Ok((
            currency.to_string(),
            card_kind.to_string(),
            credit,
            charged,
            total,
            percent,
            fee.fixed,
        ))
    })();
    TableIterator::once(result.or_raise())
}

fn parse_percent(text: &str) -> Result<Decimal> {
    Decimal::from_str(text)
        .map_err(|e| BillingError::Internal(format!("stored percent {text}: {e}")))
}

/// The credit (minor units) that a charge quoted at `quoted_total` for
/// `quoted_credit`, under a fee of `percent` + `fixed`, buys when `paid` was
/// actually paid (`price::credit_for_paid`). Used by `billing.complete_reload`.
#[pg_extern(immutable)]
fn paid_credit(
    paid: i64,
    percent: AnyNumeric,
    fixed: i64,
    quoted_total: i64,
    quoted_credit: i64,
) -> i64 {
    (|| -> Result<i64> {
        let fee = Fee {
            percent: parse_percent(&percent.to_string())?,
            fixed,
        };
        let quoted = Quote {
            credit: quoted_credit,
            fee: quoted_total - quoted_credit,
            total: quoted_total,
        };
        Ok(price::credit_for_paid(paid, fee, quoted)?)
    })()
    .or_raise()
}
