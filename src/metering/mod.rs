//! Metering: how events aggregate into counters, which hour and period an
//! event counts in, and what a priced meter charges for it. Pure arithmetic
//! on plain values; the rows live in `store`.
//!
//! The charging rule: a priced meter charges each event what the period's
//! total grew by, the total being the period's aggregate quantity priced by
//! the meter's price and rounded once. The charges of a period therefore add
//! up to its price however its usage is split into events, and a tier is
//! priced as a tier, not per event. A new price version applies from the
//! quantity reached when it took over; what was charged before stays. An
//! event whose caller gave its cost is outside the price: neither charged
//! by it nor counted toward its tiers (the hourly counters count it). A
//! total that falls (a volume tier that makes every unit cheaper, a `last`
//! gauge that drops) charges nothing until it exceeds what was charged: usage
//! never pays a pool back.

pub mod store;

use rust_decimal::Decimal;

use crate::error::{BillingError, Result};
use crate::pricing::price::Price;
use crate::subscriptions::periods::month_start;
use crate::time::Ts;

pub const MICROS_PER_HOUR: i64 = 3_600_000_000;

/// How a meter's events combine into one quantity per hour and per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregation {
    Sum,
    Count,
    Max,
    Last,
    UniqueCount,
}

impl Aggregation {
    pub const LABELS: [&'static str; 5] = ["sum", "count", "max", "last", "unique_count"];

    pub fn parse(label: &str) -> Result<Aggregation> {
        Ok(match label {
            "sum" => Aggregation::Sum,
            "count" => Aggregation::Count,
            "max" => Aggregation::Max,
            "last" => Aggregation::Last,
            "unique_count" => Aggregation::UniqueCount,
            other => {
                return Err(BillingError::invalid(
                    "aggregation",
                    format!("\"{other}\" is not one of {}", Self::LABELS.join(", ")),
                ))
            }
        })
    }

    pub fn label(self) -> &'static str {
        match self {
            Aggregation::Sum => "sum",
            Aggregation::Count => "count",
            Aggregation::Max => "max",
            Aggregation::Last => "last",
            Aggregation::UniqueCount => "unique_count",
        }
    }

    /// Whether an event's aggregate can be counted on a lane of a split pool
    /// with no view of the others: only when lanes' counters simply add up.
    pub fn adds_up(self) -> bool {
        matches!(self, Aggregation::Sum | Aggregation::Count)
    }
}

/// One event as the counters see it.
#[derive(Debug, Clone, Copy)]
pub struct Observation {
    pub quantity: Decimal,
    /// When it counts: its occurred_at, or when it was booked.
    pub at: Ts,
    /// unique_count: whether its value is new in the period.
    pub new_value: bool,
}

/// An aggregate so far: of an hour's counter or of a period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Aggregate {
    pub events: i64,
    pub quantity: Decimal,
    /// `last`: when the value it holds occurred.
    pub last_at: Option<Ts>,
}

impl Aggregate {
    /// The aggregate with one more event.
    pub fn with(self, how: Aggregation, e: &Observation) -> Result<Aggregate> {
        let overflow = || BillingError::Overflow(format!("{} + {}", self.quantity, e.quantity));
        let mut next = self;
        next.events = self
            .events
            .checked_add(1)
            .ok_or_else(|| BillingError::Overflow("event count".into()))?;
        match how {
            Aggregation::Sum => {
                next.quantity = self.quantity.checked_add(e.quantity).ok_or_else(overflow)?
            }
            Aggregation::Count => {
                next.quantity = self
                    .quantity
                    .checked_add(Decimal::ONE)
                    .ok_or_else(overflow)?
            }
            Aggregation::Max => next.quantity = self.quantity.max(e.quantity),
            // the latest occurrence wins, whatever order events arrive in;
            // an event at the same instant as the held one replaces it
            Aggregation::Last => {
                if self.last_at.is_none_or(|t| e.at >= t) {
                    next.quantity = e.quantity;
                    next.last_at = Some(e.at);
                }
            }
            Aggregation::UniqueCount if e.new_value => {
                next.quantity = self
                    .quantity
                    .checked_add(Decimal::ONE)
                    .ok_or_else(overflow)?
            }
            Aggregation::UniqueCount => {}
        }
        Ok(next)
    }
}

/// The hour an instant counts in.
pub fn hour_of(t: Ts) -> Ts {
    t - t.rem_euclid(MICROS_PER_HOUR)
}

/// The period a priced meter charges in: the calendar month (UTC).
pub fn period_of(t: Ts) -> Ts {
    month_start(t)
}

/// The state of a priced meter's charges in one pool and period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodCharges {
    pub aggregate: Aggregate,
    /// The price version in force since `switch_quantity` (0: none yet).
    pub version: i32,
    pub switch_quantity: Decimal,
    /// Additive prices: the exact sum of events since the version took over.
    pub exact: Decimal,
    /// Charged before the version took over.
    pub base: i64,
    pub charged: i64,
}

impl PeriodCharges {
    pub fn new() -> PeriodCharges {
        PeriodCharges {
            aggregate: Aggregate::default(),
            version: 0,
            switch_quantity: Decimal::ZERO,
            exact: Decimal::ZERO,
            base: 0,
            charged: 0,
        }
    }

    /// Count an event priced by version `version` of `price` and return
    /// what it is charged. `event_exact`: an additive price's exact cost of
    /// this event.
    pub fn charge(
        &mut self,
        how: Aggregation,
        event: &Observation,
        (version, price): (i32, &Price),
        event_exact: Option<Decimal>,
    ) -> Result<i64> {
        let before = self.aggregate.quantity;
        self.aggregate = self.aggregate.with(how, event)?;
        if version != self.version {
            self.version = version;
            self.base = self.charged;
            self.switch_quantity = before;
            self.exact = Decimal::ZERO;
        }
        let segment = if price.is_additive() {
            let exact = event_exact.ok_or_else(|| {
                BillingError::Internal("an additive price needs the event's exact cost".into())
            })?;
            self.exact = self
                .exact
                .checked_add(exact)
                .ok_or_else(|| BillingError::Overflow(format!("{} + {exact}", self.exact)))?;
            price.rounded(self.exact)?
        } else {
            let now = price.total(self.aggregate.quantity)?;
            let then = price.total(self.switch_quantity)?;
            now.checked_sub(then)
                .ok_or_else(|| BillingError::Overflow(format!("{now} - {then}")))?
        };
        let target = self
            .base
            .checked_add(segment)
            .ok_or_else(|| BillingError::Overflow(format!("{} + {segment}", self.base)))?;
        let charge = target.saturating_sub(self.charged).max(0);
        self.charged += charge;
        Ok(charge)
    }
}

impl Default for PeriodCharges {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn at(q: &str, t: Ts) -> Observation {
        Observation {
            quantity: d(q),
            at: t,
            new_value: true,
        }
    }

    fn price(v: serde_json::Value) -> Price {
        Price::from_json(&v).unwrap()
    }

    fn run(how: Aggregation, p: &Price, quantities: &[&str]) -> (Vec<i64>, PeriodCharges) {
        let mut s = PeriodCharges::new();
        let charges = quantities
            .iter()
            .enumerate()
            .map(|(i, q)| s.charge(how, &at(q, i as Ts), (1, p), None).unwrap())
            .collect();
        (charges, s)
    }

    #[test]
    fn aggregations_combine_as_named() {
        let events = [("3", 10), ("7", 5), ("2", 20), ("5", 15)];
        let fold = |how| {
            events.iter().fold(Aggregate::default(), |a, (q, t)| {
                a.with(how, &at(q, *t)).unwrap()
            })
        };
        assert_eq!(fold(Aggregation::Sum).quantity, d("17"));
        assert_eq!(fold(Aggregation::Count).quantity, d("4"));
        assert_eq!(fold(Aggregation::Max).quantity, d("7"));
        // the latest occurrence (t = 20), not the last to arrive
        let last = fold(Aggregation::Last);
        assert_eq!((last.quantity, last.last_at), (d("2"), Some(20)));
        assert_eq!(fold(Aggregation::Sum).events, 4);
        let seen = Aggregate::default()
            .with(Aggregation::UniqueCount, &at("1", 0))
            .unwrap()
            .with(
                Aggregation::UniqueCount,
                &Observation {
                    new_value: false,
                    ..at("1", 1)
                },
            )
            .unwrap();
        assert_eq!((seen.quantity, seen.events), (d("1"), 2));
    }

    #[test]
    fn hours_and_periods_start_where_they_should() {
        let hour = MICROS_PER_HOUR;
        assert_eq!(hour_of(0), 0);
        assert_eq!(hour_of(hour - 1), 0);
        assert_eq!(hour_of(hour), hour);
        assert_eq!(hour_of(-1), -hour);
        // 2000-02-01 00:00 UTC is 31 days after the epoch
        let feb = 31 * 24 * hour;
        assert_eq!(period_of(feb - 1), 0);
        assert_eq!(period_of(feb), feb);
    }

    #[test]
    fn graduated_tiers_charge_what_the_period_total_grew_by() {
        let p = price(json!({"model": "graduated", "tiers": [
            {"up_to": 10, "unit_price": 0},
            {"up_to": null, "unit_price": "2.5"}]}));
        // 8 free; 12: 2 at 2.5 = 5; 13: 3 at 2.5 = 7.5, rounded once to 8
        let (charges, s) = run(Aggregation::Sum, &p, &["8", "4", "1"]);
        assert_eq!(charges, vec![0, 5, 3]);
        assert_eq!(s.charged, 8);
        assert_eq!(s.charged, p.total(d("13")).unwrap());
    }

    #[test]
    fn splitting_usage_never_changes_the_period_price() {
        let p = price(json!({"model": "per_unit", "unit_price": "0.4", "included": 3}));
        let (one, _) = run(Aggregation::Sum, &p, &["1000"]);
        let (split, s) = run(Aggregation::Sum, &p, &["1"; 1000]);
        assert_eq!(one.iter().sum::<i64>(), 399);
        assert_eq!(split.iter().sum::<i64>(), 399);
        assert_eq!(s.charged, 399);
    }

    #[test]
    fn a_falling_total_charges_nothing_until_it_is_passed() {
        // 10 at 1 each = 10; 11 at 0.5 each = 5.5 → 6; 25 at 0.5 = 12.5 → 13
        let p = price(json!({"model": "volume", "tiers": [
            {"up_to": 10, "unit_price": 1},
            {"up_to": null, "unit_price": "0.5"}]}));
        let (charges, s) = run(Aggregation::Sum, &p, &["10", "1", "14"]);
        assert_eq!(charges, vec![10, 0, 3]);
        assert_eq!(s.charged, 13);
    }

    #[test]
    fn a_new_version_prices_only_what_follows_it() {
        let old = price(json!({"model": "per_unit", "unit_price": 2}));
        let new = price(json!({"model": "per_unit", "unit_price": 3}));
        let mut s = PeriodCharges::new();
        let c1 = s
            .charge(Aggregation::Sum, &at("5", 0), (1, &old), None)
            .unwrap();
        let c2 = s
            .charge(Aggregation::Sum, &at("5", 1), (2, &new), None)
            .unwrap();
        let c3 = s
            .charge(Aggregation::Sum, &at("1", 2), (2, &new), None)
            .unwrap();
        assert_eq!((c1, c2, c3), (10, 15, 3));
        assert_eq!((s.base, s.switch_quantity, s.charged), (10, d("5"), 28));
    }

    #[test]
    fn a_cost_card_rounds_the_period_sum_once() {
        let p = price(json!({"model": "cost_card", "by": "model",
            "rates": {"m": {"input_tokens": "0.4"}}}));
        let mut s = PeriodCharges::new();
        let mut total = 0;
        for i in 0..10 {
            let exact = p
                .event_exact(&json!({"model": "m", "input_tokens": 1}))
                .unwrap();
            total += s
                .charge(Aggregation::Count, &at("1", i), (1, &p), Some(exact))
                .unwrap();
        }
        assert_eq!((total, s.charged, s.aggregate.quantity), (4, 4, d("10")));
    }

    #[test]
    fn a_max_meter_charges_its_peak() {
        let p = price(json!({"model": "per_unit", "unit_price": 10}));
        let (charges, s) = run(Aggregation::Max, &p, &["3", "2", "5", "5"]);
        assert_eq!(charges, vec![30, 0, 20, 0]);
        assert_eq!(s.charged, 50);
    }
}
