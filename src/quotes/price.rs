//! What to charge for a top-up so that the card fee is paid on top: the
//! least total, in the currency's minor units, whose net after the worst
//! case of the fee is at least the credit asked for. Pure arithmetic with
//! `rust_decimal`; no database.
//!
//! The fee of a charge of `t` is `ceil(t × percent / 100) + fixed`: a
//! provider rounds its percentage to the minor unit, and rounding up is the
//! worst case, so the credit is covered whichever way it rounds.

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;

/// A card fee: a percentage of the charge (conversion surcharge included)
/// and a fixed amount in minor units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fee {
    pub percent: Decimal,
    pub fixed: i64,
}

/// A top-up's figures, in minor units: the credit granted, the fee it
/// covers, and the total charged (credit + fee).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quote {
    pub credit: i64,
    pub fee: i64,
    pub total: i64,
}

/// A fee's percentage has at most this many decimal places, so every product
/// below is exact in `Decimal` (28 significant digits).
pub const PERCENT_SCALE: u32 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuoteError {
    /// The percentage leaves nothing of a charge (100% or more), is
    /// negative, or has more than `PERCENT_SCALE` decimal places.
    Percent(Decimal),
    /// The fixed fee is negative.
    Fixed(i64),
    /// The credit is not positive.
    Credit(i64),
    /// The total does not fit in a bigint.
    Overflow,
}

impl std::fmt::Display for QuoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuoteError::Percent(p) => write!(
                f,
                "a fee of {p}% must be at least 0 and below 100, with at most {PERCENT_SCALE} decimal places"
            ),
            QuoteError::Fixed(x) => write!(f, "a fixed fee of {x} must not be negative"),
            QuoteError::Credit(c) => write!(f, "a credit of {c} must be positive"),
            QuoteError::Overflow => write!(f, "the total does not fit in a bigint"),
        }
    }
}

impl Fee {
    pub fn validate(&self) -> Result<(), QuoteError> {
        if self.percent < Decimal::ZERO
            || self.percent >= Decimal::ONE_HUNDRED
            || self.percent.normalize().scale() > PERCENT_SCALE
        {
            return Err(QuoteError::Percent(self.percent));
        }
        if self.fixed < 0 {
            return Err(QuoteError::Fixed(self.fixed));
        }
        Ok(())
    }

    /// The worst-case fee of a charge of `total`.
    pub fn of(&self, total: i64) -> Result<i64, QuoteError> {
        let part = (Decimal::from(total) * self.percent / Decimal::ONE_HUNDRED).ceil();
        part.to_i64()
            .and_then(|p| p.checked_add(self.fixed))
            .ok_or(QuoteError::Overflow)
    }

    /// What a charge of `total` leaves after its worst-case fee.
    pub fn net(&self, total: i64) -> Result<i64, QuoteError> {
        Ok(total - self.of(total)?)
    }
}

/// The least total whose net after `fee` covers `credit`.
pub fn quote(credit: i64, fee: Fee) -> Result<Quote, QuoteError> {
    fee.validate()?;
    if credit <= 0 {
        return Err(QuoteError::Credit(credit));
    }
    // the exact solution of t − t·p − fixed = credit, rounded up; the
    // rounding of the fee can leave it a unit short, or a unit over
    let share = Decimal::ONE - fee.percent / Decimal::ONE_HUNDRED;
    let exact = (Decimal::from(credit) + Decimal::from(fee.fixed))
        .checked_div(share)
        .ok_or(QuoteError::Overflow)?;
    let mut total = exact.ceil().to_i64().ok_or(QuoteError::Overflow)?;
    while fee.net(total)? < credit {
        total = total.checked_add(1).ok_or(QuoteError::Overflow)?;
    }
    while total > credit && fee.net(total - 1)? >= credit {
        total -= 1;
    }
    Ok(Quote {
        credit,
        fee: total - credit,
        total,
    })
}

/// The credit, in minor units, of a charge quoted as `quoted` for which
/// `paid` was actually paid: the quoted credit when the quoted total was
/// paid; otherwise what was paid, net of the worst-case fee (less than the
/// quoted credit when less was paid, since the quote is the least total that
/// covers it), and nothing when the fee takes it all.
pub fn credit_for_paid(paid: i64, fee: Fee, quoted: Quote) -> Result<i64, QuoteError> {
    if paid == quoted.total {
        return Ok(quoted.credit);
    }
    Ok(fee.net(paid)?.max(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn fee(percent: &str, fixed: i64) -> Fee {
        Fee {
            percent: Decimal::from_str(percent).unwrap(),
            fixed,
        }
    }

    #[test]
    fn a_reload_credits_the_quote_when_paid_in_full_and_what_was_paid_net_otherwise() {
        let card = fee("2.9", 30);
        let q = quote(1000, card).unwrap();
        assert_eq!(credit_for_paid(q.total, card, q).unwrap(), 1000);
        // one cent less: the net of what was paid, below the credit asked for
        let short = credit_for_paid(q.total - 1, card, q).unwrap();
        assert!(short < 1000, "{short}");
        assert_eq!(short, (q.total - 1) - card.of(q.total - 1).unwrap());
        // more than the total: the net of it, at least the credit
        assert!(credit_for_paid(q.total + 100, card, q).unwrap() >= 1000);
        // the fixed fee takes all of a tiny payment
        assert_eq!(credit_for_paid(20, card, q).unwrap(), 0);
    }

    #[test]
    fn ten_dollars_at_2_9_percent_and_30_cents() {
        let q = quote(1000, fee("2.9", 30)).unwrap();
        assert_eq!(
            q,
            Quote {
                credit: 1000,
                fee: 61,
                total: 1061
            }
        );
        // the card fee of 1,061: ceil(30.769) + 30 = 61, leaving exactly 1,000
        assert_eq!(fee("2.9", 30).of(1061).unwrap(), 61);
        assert_eq!(
            fee("2.9", 30).of(1060).unwrap(),
            61,
            "one cent less leaves 999"
        );
    }

    // Every schedule of the issue, with the +1% conversion surcharge, over
    // every credit from 1 cent to $100: the total covers the credit after
    // the worst-case fee, and one unit less would not.
    #[test]
    fn each_total_is_the_least_that_covers_the_credit() {
        for (percent, fixed) in [
            ("2.9", 30),
            ("3.9", 30),
            ("3.5", 30),
            ("4.4", 30),
            ("4.5", 30),
            ("4.9", 30),
            ("5.4", 30),
            ("0", 0),
            ("0", 25),
            ("1.5", 0),
            ("99.9", 0),
        ] {
            let f = fee(percent, fixed);
            for credit in 1..=10_000 {
                let q = quote(credit, f).unwrap();
                assert_eq!(q.credit + q.fee, q.total);
                assert!(
                    q.total - f.of(q.total).unwrap() >= credit,
                    "{percent}% + {fixed}: {q:?}"
                );
                assert!(
                    q.total - 1 - f.of(q.total - 1).unwrap() < credit,
                    "{percent}% + {fixed}: {} would do for {credit}",
                    q.total - 1
                );
            }
        }
    }

    #[test]
    fn no_fee_charges_the_credit() {
        assert_eq!(quote(1234, fee("0", 0)).unwrap().total, 1234);
    }

    #[test]
    fn bad_fees_and_credits_are_refused() {
        assert_eq!(quote(0, fee("2.9", 30)), Err(QuoteError::Credit(0)));
        assert_eq!(quote(-5, fee("2.9", 30)), Err(QuoteError::Credit(-5)));
        assert!(matches!(
            quote(100, fee("100", 0)),
            Err(QuoteError::Percent(_))
        ));
        assert!(matches!(
            quote(100, fee("-1", 0)),
            Err(QuoteError::Percent(_))
        ));
        assert_eq!(quote(100, fee("1", -1)), Err(QuoteError::Fixed(-1)));
        assert_eq!(
            quote(i64::MAX - 10, fee("2.9", 30)),
            Err(QuoteError::Overflow)
        );
        // a percentage with more places than the arithmetic keeps exact
        assert!(matches!(
            quote(100, fee("2.90001", 0)),
            Err(QuoteError::Percent(_))
        ));
        assert_eq!(
            quote(100, fee("2.9000", 0)).unwrap().total,
            103,
            "trailing zeros are no places"
        );
        // the largest percentage below 100 overflows cleanly, never panics
        assert_eq!(
            quote(i64::MAX / 2, fee("99.9999", 0)),
            Err(QuoteError::Overflow)
        );
    }
}
