//! Price models for usage billing.
//!
//! A price turns what a period used into money in two steps: first an exact
//! decimal total, then that total rounded once, by the price's own rule, into
//! whole minor units of the pool's currency (an `i64`). Rounding only at the
//! end means a bill never drifts by the accumulated error of rounding each
//! step.
//!
//! Every step is exact. A figure that would not fit, or that would need more
//! than the 28 significant digits a `Decimal` holds, is an error rather than a
//! wrapped or silently rounded number: a bill that is refused can be fixed,
//! one that is quietly wrong may never be noticed. Quantities, prices and
//! totals are never negative.
//!
//! Prices are stored as JSON. Parsing is strict (unknown keys, negative or
//! unparsable numbers are errors) so that a typo can never silently change
//! what a customer pays, and [`Price::to_json`] writes one canonical form so
//! that equal prices have equal JSON.

use std::collections::BTreeMap;
use std::fmt;

use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{Map, Value};

type Result<T> = std::result::Result<T, PriceError>;

/// The per-property rates of one value of a cost card's `by` property.
type Rate = BTreeMap<String, Decimal>;

/// How a price's exact total becomes whole minor units. Totals are never
/// negative, so "up" and "down" need no rule for the sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rounding {
    /// To the nearest whole unit, an exact half going up (`"half_up"`). The
    /// default, because it is the rounding people check a bill against.
    #[default]
    HalfUp,
    /// Up to the next whole unit, the ceiling (`"up"`): any usage at all
    /// costs at least one unit.
    Up,
    /// Down to the whole unit below, the floor (`"down"`): a customer is never
    /// charged for a fraction they did not fully use.
    Down,
}

/// One band of a tiered price.
///
/// `up_to` is inclusive: the tier holds the quantity above the previous
/// tier's `up_to` (above 0 for the first tier) up to and including its own,
/// so with `up_to` 1000 then 10000, unit 1000 is in the first tier and unit
/// 1001 in the second. Bounds are positive and strictly increasing. `None`
/// means no upper bound; only the last tier may, and must, have it, so that
/// every quantity has a price. Prices are never negative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    pub up_to: Option<Decimal>,
    pub unit_price: Decimal,
    /// Charged once when a quantity reaches into the tier; 0 when not given.
    pub flat_price: Decimal,
}

/// How a billable quantity is priced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Model {
    /// quantity × unit_price.
    PerUnit { unit_price: Decimal },
    /// ceil(quantity / size) packages × price: a started package is a whole
    /// package. size > 0; a quantity of 0 buys no package.
    Package { size: Decimal, price: Decimal },
    /// Each unit is priced in the tier it falls in, and each tier the
    /// quantity reaches into (exceeds the previous tier's `up_to`) adds its
    /// flat price once. A quantity of 0 reaches no tier and costs 0;
    /// fractional quantities are priced by the fraction in each tier.
    Graduated { tiers: Vec<Tier> },
    /// Every unit is priced at the tier the whole quantity falls in (the
    /// first whose `up_to` ≥ quantity, else the open last tier), plus that
    /// tier's flat price; a quantity of 0 costs 0. Crossing into a cheaper
    /// tier can lower the total; that is what volume pricing means.
    Volume { tiers: Vec<Tier> },
    /// An AI cost card: the event property named `by` (e.g. "model") picks a
    /// rate, which maps other event properties (e.g. "input_tokens") to a
    /// price per unit. Each event is priced on its own from its properties,
    /// so the `included` allowance of a card must be 0.
    CostCard {
        by: String,
        rates: BTreeMap<String, BTreeMap<String, Decimal>>,
    },
}

/// A price: a model, an allowance of free units, and a rounding rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    pub model: Model,
    /// Units of each period that cost nothing: the billable quantity is
    /// max(0, quantity − included). Must be 0 for a cost card, which has no
    /// period quantity for an allowance to come off.
    pub included: Decimal,
    pub rounding: Rounding,
}

/// Why a price could not be read or could not price a quantity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PriceError {
    /// A bad price definition or input; the message says what and how to fix it.
    Invalid(String),
    /// A figure too large to hold, or too finely divided to hold exactly.
    Overflow(String),
}

impl fmt::Display for PriceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PriceError::Invalid(message) | PriceError::Overflow(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for PriceError {}

fn invalid(message: impl Into<String>) -> PriceError {
    PriceError::Invalid(message.into())
}

impl Price {
    /// Reads a price from its JSON definition, e.g.
    /// `{"model": "per_unit", "unit_price": "0.008", "included": 1000}`.
    /// Numbers may be JSON numbers or numeric strings; `included` defaults to
    /// 0, `rounding` to `"half_up"`, a tier's `flat_price` to 0. Unknown keys
    /// are an error so that a misspelt field cannot silently fall back to a
    /// default.
    pub fn from_json(value: &Value) -> Result<Price> {
        let object = value.as_object().ok_or_else(|| {
            invalid(format!(
                "a price must be a JSON object, got {}",
                shown(value)
            ))
        })?;
        let kind = model_kind(object)?;
        let allowed: Vec<&str> = COMMON_KEYS.iter().chain(kind.keys()).copied().collect();
        reject_unknown_keys(object, &allowed, &format!("a {} price", kind.name()))?;
        let price = Price {
            model: parse_model(kind, object)?,
            included: optional_decimal(object, "", "included")?,
            rounding: parse_rounding(object)?,
        };
        price.validate()?;
        Ok(price)
    }

    /// The canonical JSON of the price: every decimal a string in normalized
    /// form and every default written out, so that equal prices have equal
    /// JSON and `from_json(to_json(p)) == p`.
    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        object.insert("model".into(), Value::from(self.model.kind().name()));
        insert_model_fields(&self.model, &mut object);
        object.insert("included".into(), decimal_json(self.included));
        object.insert("rounding".into(), Value::from(self.rounding.name()));
        Value::Object(object)
    }

    /// Checks the rules a definition must keep; [`Price::from_json`] calls it,
    /// and pricing calls it again because the fields are public.
    pub fn validate(&self) -> Result<()> {
        require_non_negative("included", self.included)?;
        match &self.model {
            Model::PerUnit { unit_price } => require_non_negative("unit_price", *unit_price),
            Model::Package { size, price } => validate_package(*size, *price),
            Model::Graduated { tiers } | Model::Volume { tiers } => validate_tiers(tiers),
            Model::CostCard { by, rates } => validate_cost_card(by, rates, self.included),
        }
    }

    /// The exact total of a period whose aggregate quantity is `quantity`
    /// (≥ 0), after the `included` allowance. A cost card prices events, not
    /// quantities, so it is an error here; use [`Price::event_exact`].
    pub fn exact(&self, quantity: Decimal) -> Result<Decimal> {
        self.validate()?;
        require_non_negative("quantity", quantity)?;
        let billable = self.billable(quantity)?;
        match &self.model {
            Model::PerUnit { unit_price } => exact_mul(billable, *unit_price),
            Model::Package { size, price } => package_total(billable, *size, *price),
            Model::Graduated { tiers } => graduated_total(billable, tiers),
            Model::Volume { tiers } => volume_total(billable, tiers),
            Model::CostCard { .. } => Err(invalid(
                "a cost_card prices each event from its properties, not a period's quantity; \
                 use event_exact for each event",
            )),
        }
    }

    /// The exact cost of one event under a cost card. `properties` must be an
    /// object whose `by` property is a string naming a known rate; the cost
    /// is `Σ properties[name] × rate` over the rate's entries. A rated property
    /// that is missing counts 0 (the event did not use it); one that is
    /// present must be a non-negative number or numeric string. Properties
    /// without a rate are ignored: events carry more than what is billed.
    pub fn event_exact(&self, properties: &Value) -> Result<Decimal> {
        let Model::CostCard { by, rates } = &self.model else {
            return Err(invalid(format!(
                "only a cost_card prices single events; a {} price prices a period's \
                 quantity with exact",
                self.model.kind().name()
            )));
        };
        self.validate()?;
        event_cost(by, rates, properties)
    }

    /// Rounds an exact total once, by the price's rule, into whole units.
    /// A negative total is an error (totals are never negative), and one
    /// beyond `i64` is an overflow.
    pub fn rounded(&self, exact: Decimal) -> Result<i64> {
        require_non_negative("total", exact)?;
        let whole = exact.round_dp_with_strategy(0, self.rounding.strategy());
        i64::try_from(whole).map_err(|_| {
            PriceError::Overflow(format!(
                "a total of {whole} does not fit in a 64-bit integer of minor units"
            ))
        })
    }

    /// The whole-unit total of a period: `rounded(exact(quantity))`.
    pub fn total(&self, quantity: Decimal) -> Result<i64> {
        self.rounded(self.exact(quantity)?)
    }

    /// The lines of an invoice for a period whose aggregate quantity is
    /// `quantity`: the included quantity (free), then each tier reached (or
    /// the packages, or the units), each with its exact amount. They add up
    /// to `exact(quantity)`. A cost card prices events, so it has none here.
    pub fn lines(&self, quantity: Decimal) -> Result<Vec<Line>> {
        self.validate()?;
        require_non_negative("quantity", quantity)?;
        let mut lines = Vec::new();
        if !self.included.is_zero() {
            lines.push(Line::new(
                "included",
                quantity.min(self.included),
                Decimal::ZERO,
            )?);
        }
        let billable = self.billable(quantity)?;
        match &self.model {
            Model::PerUnit { unit_price } => {
                lines.push(Line::new("per unit", billable, *unit_price)?);
            }
            Model::Package { size, price } if !billable.is_zero() => {
                let n = packages_needed(billable, *size)?;
                let what = format!("packages of {}", size.normalize());
                lines.push(Line::new(&what, n, *price)?);
            }
            Model::Package { .. } => {}
            Model::Graduated { tiers } => {
                for (i, (lower, tier)) in with_lower_bounds(tiers).enumerate() {
                    if billable <= lower {
                        break;
                    }
                    let top = tier.up_to.map_or(billable, |up_to| billable.min(up_to));
                    let what = tier_name(i, lower, tier);
                    lines.push(Line::new(&what, exact_sub(top, lower)?, tier.unit_price)?);
                    if !tier.flat_price.is_zero() {
                        lines.push(Line::new(
                            &format!("{what}, flat"),
                            Decimal::ONE,
                            tier.flat_price,
                        )?);
                    }
                }
            }
            Model::Volume { tiers } if !billable.is_zero() => {
                let tier = volume_tier(billable, tiers)?;
                let i = tiers.iter().position(|t| t == tier).unwrap_or(0);
                let lower = if i == 0 {
                    Decimal::ZERO
                } else {
                    tiers[i - 1].up_to.unwrap_or_default()
                };
                let what = format!("{}, every unit", tier_name(i, lower, tier));
                lines.push(Line::new(&what, billable, tier.unit_price)?);
                if !tier.flat_price.is_zero() {
                    lines.push(Line::new(
                        &format!("{what}, flat"),
                        Decimal::ONE,
                        tier.flat_price,
                    )?);
                }
            }
            Model::Volume { .. } => {}
            Model::CostCard { .. } => {}
        }
        Ok(lines)
    }

    /// Whether a period's cost is the sum of its events' costs. True only for
    /// a cost card: tiers, packages and allowances make the other models
    /// depend on the period's aggregate quantity, so they must be priced once
    /// per period, never event by event.
    pub fn is_additive(&self) -> bool {
        matches!(self.model, Model::CostCard { .. })
    }

    /// max(0, quantity − included).
    fn billable(&self, quantity: Decimal) -> Result<Decimal> {
        if quantity <= self.included {
            Ok(Decimal::ZERO)
        } else {
            exact_sub(quantity, self.included)
        }
    }
}

impl Rounding {
    const ALL: [Rounding; 3] = [Rounding::HalfUp, Rounding::Up, Rounding::Down];

    fn name(self) -> &'static str {
        match self {
            Rounding::HalfUp => "half_up",
            Rounding::Up => "up",
            Rounding::Down => "down",
        }
    }

    fn from_name(name: &str) -> Option<Rounding> {
        Rounding::ALL.into_iter().find(|rule| rule.name() == name)
    }

    /// Half up is "midpoint away from zero", which for non-negative totals is
    /// the same thing (not banker's rounding, which would send 2.5 to 2).
    fn strategy(self) -> RoundingStrategy {
        match self {
            Rounding::HalfUp => RoundingStrategy::MidpointAwayFromZero,
            Rounding::Up => RoundingStrategy::ToPositiveInfinity,
            Rounding::Down => RoundingStrategy::ToNegativeInfinity,
        }
    }
}

// ---------------------------------------------------------------------------
// Exact arithmetic: a `Decimal` operation silently rounds when its exact
// result needs more than 28 significant digits, so each operation here checks
// that the scale it kept is the scale the exact result needs.

/// a × b, exactly. Operands are normalized first so that trailing zeros do
/// not count against the 28 digits.
fn exact_mul(a: Decimal, b: Decimal) -> Result<Decimal> {
    let (a, b) = (a.normalize(), b.normalize());
    if a.is_zero() || b.is_zero() {
        return Ok(Decimal::ZERO);
    }
    let product = a
        .checked_mul(b)
        .ok_or_else(|| too_large(format!("{a} × {b}")))?;
    // An exact product has the sum of the operands' scales; fewer means
    // digits were rounded away (a product that underflowed to 0 included).
    if product.scale() < a.scale() + b.scale() {
        return Err(too_precise(format!("{a} × {b}")));
    }
    Ok(product)
}

/// a + b, exactly.
fn exact_add(a: Decimal, b: Decimal) -> Result<Decimal> {
    let (a, b) = (a.normalize(), b.normalize());
    let sum = a
        .checked_add(b)
        .ok_or_else(|| too_large(format!("{a} + {b}")))?;
    keep_exact(sum, a.scale().max(b.scale()), || format!("{a} + {b}"))
}

/// a − b, exactly.
fn exact_sub(a: Decimal, b: Decimal) -> Result<Decimal> {
    let (a, b) = (a.normalize(), b.normalize());
    let difference = a
        .checked_sub(b)
        .ok_or_else(|| too_large(format!("{a} − {b}")))?;
    keep_exact(difference, a.scale().max(b.scale()), || {
        format!("{a} − {b}")
    })
}

/// A sum or difference is exact at the larger operand scale; a smaller
/// scale means its last digits were rounded away.
fn keep_exact(result: Decimal, needed_scale: u32, what: impl Fn() -> String) -> Result<Decimal> {
    if result.scale() < needed_scale {
        Err(too_precise(what()))
    } else {
        Ok(result)
    }
}

fn too_large(what: String) -> PriceError {
    PriceError::Overflow(format!(
        "{what} is beyond the largest amount a price can work with (about 7.9e28)"
    ))
}

fn too_precise(what: String) -> PriceError {
    PriceError::Overflow(format!(
        "{what} needs more than 28 significant digits to be exact; use a smaller \
         quantity or a price with fewer decimal places"
    ))
}

/// One line of an invoice: `quantity` at `unit_price`, exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub description: String,
    pub quantity: Decimal,
    pub unit_price: Decimal,
    pub amount: Decimal,
}

impl Line {
    fn new(description: &str, quantity: Decimal, unit_price: Decimal) -> Result<Line> {
        Ok(Line {
            description: description.to_string(),
            quantity: quantity.normalize(),
            unit_price: unit_price.normalize(),
            amount: exact_mul(quantity, unit_price)?.normalize(),
        })
    }
}

/// "tier 2 (1000–10000]" as an invoice names it: units above `lower` up to
/// and including its `up_to`.
fn tier_name(i: usize, lower: Decimal, tier: &Tier) -> String {
    match tier.up_to {
        Some(up_to) => format!(
            "tier {} ({} to {}]",
            i + 1,
            lower.normalize(),
            up_to.normalize()
        ),
        None => format!("tier {} (above {})", i + 1, lower.normalize()),
    }
}

// ---------------------------------------------------------------------------
// The models.

/// ceil(quantity / size) × price; a quantity of 0 buys no package.
fn package_total(quantity: Decimal, size: Decimal, price: Decimal) -> Result<Decimal> {
    if quantity.is_zero() {
        return Ok(Decimal::ZERO);
    }
    exact_mul(packages_needed(quantity, size)?, price)
}

/// The fewest whole packages of `size` that hold `quantity` (> 0). Decimal
/// division rounds at 28 digits, which can hide a remainder (6 plus 1e-28,
/// divided by 3, rounds to exactly 2), so the quotient is only a first guess,
/// corrected by exact multiplication.
fn packages_needed(quantity: Decimal, size: Decimal) -> Result<Decimal> {
    let guess = quantity
        .checked_div(size)
        .ok_or_else(|| too_large(format!("{quantity} ÷ {size}")))?
        .ceil();
    let mut count = guess.max(Decimal::ONE);
    while count > Decimal::ONE && holds(count - Decimal::ONE, size, quantity)? {
        count -= Decimal::ONE;
    }
    while !holds(count, size, quantity)? {
        count = exact_add(count, Decimal::ONE)?;
    }
    Ok(count)
}

fn holds(count: Decimal, size: Decimal, quantity: Decimal) -> Result<bool> {
    Ok(exact_mul(count, size)? >= quantity)
}

/// Σ over tiers of (units of the quantity in the tier × unit_price), plus the
/// flat price of each tier the quantity reaches into, i.e. exceeds the
/// previous tier's `up_to` (0 for the first, so a quantity of 0 costs 0,
/// flat prices included). Units in a tier are min(quantity, up_to) − lower,
/// which allows fractional quantities.
fn graduated_total(quantity: Decimal, tiers: &[Tier]) -> Result<Decimal> {
    let mut total = Decimal::ZERO;
    for (lower, tier) in with_lower_bounds(tiers) {
        if quantity <= lower {
            break;
        }
        let top = tier.up_to.map_or(quantity, |up_to| quantity.min(up_to));
        let units = exact_sub(top, lower)?;
        total = exact_add(total, tier_charge(tier, units)?)?;
    }
    Ok(total)
}

/// quantity × unit_price + flat_price of the first tier whose `up_to` is at
/// least the quantity (the open last tier holds the rest). A quantity of 0
/// costs 0: nothing was used, so not even the flat price is due.
fn volume_total(quantity: Decimal, tiers: &[Tier]) -> Result<Decimal> {
    if quantity.is_zero() {
        return Ok(Decimal::ZERO);
    }
    tier_charge(volume_tier(quantity, tiers)?, quantity)
}

fn volume_tier(quantity: Decimal, tiers: &[Tier]) -> Result<&Tier> {
    tiers
        .iter()
        .find(|tier| tier.up_to.is_none_or(|up_to| quantity <= up_to))
        .or(tiers.last())
        .ok_or_else(|| invalid(NO_TIERS))
}

/// units × unit_price + flat_price.
fn tier_charge(tier: &Tier, units: Decimal) -> Result<Decimal> {
    exact_add(exact_mul(units, tier.unit_price)?, tier.flat_price)
}

/// Each tier with the bound it starts above: 0 for the first, the previous
/// tier's `up_to` for the rest. Only the last tier is open, and its `up_to`
/// is never a lower bound, so skipping open bounds keeps the pairs aligned.
fn with_lower_bounds(tiers: &[Tier]) -> impl Iterator<Item = (Decimal, &Tier)> {
    let lowers = std::iter::once(Decimal::ZERO).chain(tiers.iter().filter_map(|tier| tier.up_to));
    lowers.zip(tiers)
}

/// The most rate names an error lists, so that a large card does not flood
/// a log line.
const MAX_LISTED_VALUES: usize = 20;

fn event_cost(by: &str, rates: &BTreeMap<String, Rate>, properties: &Value) -> Result<Decimal> {
    let object = properties.as_object().ok_or_else(|| {
        invalid(format!(
            "event properties must be a JSON object, got {}",
            shown(properties)
        ))
    })?;
    let rate = rate_of_event(by, rates, object)?;
    rate.iter().try_fold(Decimal::ZERO, |cost, (name, price)| {
        exact_add(cost, exact_mul(event_amount(object, name)?, *price)?)
    })
}

/// The rate named by the event's `by` property.
fn rate_of_event<'a>(
    by: &str,
    rates: &'a BTreeMap<String, Rate>,
    object: &Map<String, Value>,
) -> Result<&'a Rate> {
    let value = match object.get(by) {
        Some(Value::String(value)) => value,
        Some(other) => {
            return Err(invalid(format!(
                "event property \"{by}\" must be a string naming a rate, got {}",
                shown(other)
            )))
        }
        None => {
            return Err(invalid(format!(
                "the event has no \"{by}\" property, which the cost card needs to choose a \
                 rate; known values: {}",
                known_values(rates)
            )))
        }
    };
    rates.get(value).ok_or_else(|| {
        invalid(format!(
            "the cost card has no rate for {by} \"{}\"; known values: {}; add a rate for \
             it or correct the event",
            shortened(value),
            known_values(rates)
        ))
    })
}

/// The amount of a rated property in an event; a missing one was not used.
fn event_amount(object: &Map<String, Value>, name: &str) -> Result<Decimal> {
    match object.get(name) {
        None => Ok(Decimal::ZERO),
        Some(value) => non_negative_decimal(&format!("event property \"{name}\""), value),
    }
}

fn known_values(rates: &BTreeMap<String, Rate>) -> String {
    let listed: Vec<String> = rates
        .keys()
        .take(MAX_LISTED_VALUES)
        .map(|value| format!("\"{}\"", shortened(value)))
        .collect();
    let unlisted = rates.len().saturating_sub(MAX_LISTED_VALUES);
    if unlisted == 0 {
        listed.join(", ")
    } else {
        format!("{} and {unlisted} more", listed.join(", "))
    }
}

// ---------------------------------------------------------------------------
// Validation.

const NO_TIERS: &str = "tiers must list at least one tier, the last with \"up_to\": null";

fn require_non_negative(field: &str, value: Decimal) -> Result<()> {
    if value < Decimal::ZERO {
        Err(invalid(format!(
            "{field} must be a non-negative number, got {value}"
        )))
    } else {
        Ok(())
    }
}

fn validate_package(size: Decimal, price: Decimal) -> Result<()> {
    if size <= Decimal::ZERO {
        return Err(invalid(format!(
            "package_size must be greater than 0, got {size}"
        )));
    }
    require_non_negative("package_price", price)
}

/// At least one tier; prices ≥ 0; bounds positive and strictly increasing;
/// only the last tier open-ended, and it must be.
fn validate_tiers(tiers: &[Tier]) -> Result<()> {
    let last = tiers
        .len()
        .checked_sub(1)
        .ok_or_else(|| invalid(NO_TIERS))?;
    let mut previous: Option<Decimal> = None;
    for (index, tier) in tiers.iter().enumerate() {
        require_non_negative(&format!("tiers[{index}].unit_price"), tier.unit_price)?;
        require_non_negative(&format!("tiers[{index}].flat_price"), tier.flat_price)?;
        match (tier.up_to, index == last) {
            (None, true) => {}
            (Some(_), true) => return Err(last_tier_bounded(index)),
            (None, false) => return Err(open_tier_not_last(index)),
            (Some(up_to), false) => check_bound(index, up_to, previous)?,
        }
        previous = tier.up_to;
    }
    Ok(())
}

fn check_bound(index: usize, up_to: Decimal, previous: Option<Decimal>) -> Result<()> {
    if up_to <= Decimal::ZERO {
        return Err(invalid(format!(
            "tiers[{index}].up_to must be greater than 0, got {up_to}"
        )));
    }
    match previous {
        Some(previous) if up_to <= previous => Err(invalid(format!(
            "tiers[{index}].up_to ({up_to}) must be greater than tiers[{}].up_to \
             ({previous}); list tiers in increasing order of up_to",
            index - 1
        ))),
        _ => Ok(()),
    }
}

fn last_tier_bounded(index: usize) -> PriceError {
    invalid(format!(
        "the last tier (tiers[{index}]) must have \"up_to\": null so that every quantity \
         has a price; add an open-ended tier after it"
    ))
}

fn open_tier_not_last(index: usize) -> PriceError {
    invalid(format!(
        "tiers[{index}].up_to is null, but only the last tier may be open-ended; give it \
         an upper bound or move it last"
    ))
}

fn validate_cost_card(by: &str, rates: &BTreeMap<String, Rate>, included: Decimal) -> Result<()> {
    if by.is_empty() {
        return Err(invalid(
            "by must name the event property that chooses a rate, e.g. \"model\"",
        ));
    }
    if rates.is_empty() {
        return Err(invalid(
            "rates must hold at least one rate, e.g. {\"gpt-4o\": {\"input_tokens\": \"0.0025\"}}",
        ));
    }
    if !included.is_zero() {
        return Err(invalid(format!(
            "included must be 0 for a cost_card, got {included}: a card prices each event \
             on its own, so there is no period quantity for an allowance to come off"
        )));
    }
    for (value, rate) in rates {
        for (name, price) in rate {
            require_non_negative(&format!("rates[\"{value}\"].{name}"), *price)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// JSON.

/// The model names as written in JSON, and the keys each one takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    PerUnit,
    Package,
    Graduated,
    Volume,
    CostCard,
}

const COMMON_KEYS: [&str; 3] = ["model", "included", "rounding"];
const TIER_KEYS: [&str; 3] = ["up_to", "unit_price", "flat_price"];

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::PerUnit,
        Kind::Package,
        Kind::Graduated,
        Kind::Volume,
        Kind::CostCard,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::PerUnit => "per_unit",
            Kind::Package => "package",
            Kind::Graduated => "graduated",
            Kind::Volume => "volume",
            Kind::CostCard => "cost_card",
        }
    }

    fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.name() == name)
    }

    fn keys(self) -> &'static [&'static str] {
        match self {
            Kind::PerUnit => &["unit_price"],
            Kind::Package => &["package_size", "package_price"],
            Kind::Graduated | Kind::Volume => &["tiers"],
            Kind::CostCard => &["by", "rates"],
        }
    }
}

impl Model {
    fn kind(&self) -> Kind {
        match self {
            Model::PerUnit { .. } => Kind::PerUnit,
            Model::Package { .. } => Kind::Package,
            Model::Graduated { .. } => Kind::Graduated,
            Model::Volume { .. } => Kind::Volume,
            Model::CostCard { .. } => Kind::CostCard,
        }
    }
}

fn model_kind(object: &Map<String, Value>) -> Result<Kind> {
    let names = quoted_list(Kind::ALL.iter().map(|kind| kind.name()));
    match object.get("model") {
        Some(Value::String(name)) => Kind::from_name(name).ok_or_else(|| {
            invalid(format!(
                "model must be one of {names}, got \"{}\"",
                shortened(name)
            ))
        }),
        Some(other) => Err(invalid(format!(
            "model must be one of {names}, got {}",
            shown(other)
        ))),
        None => Err(invalid(format!(
            "a price needs a \"model\": one of {names}"
        ))),
    }
}

fn parse_model(kind: Kind, object: &Map<String, Value>) -> Result<Model> {
    Ok(match kind {
        Kind::PerUnit => Model::PerUnit {
            unit_price: required_decimal(object, "", "unit_price")?,
        },
        Kind::Package => Model::Package {
            size: required_decimal(object, "", "package_size")?,
            price: required_decimal(object, "", "package_price")?,
        },
        Kind::Graduated => Model::Graduated {
            tiers: parse_tiers(object)?,
        },
        Kind::Volume => Model::Volume {
            tiers: parse_tiers(object)?,
        },
        Kind::CostCard => Model::CostCard {
            by: parse_by(object)?,
            rates: parse_rates(object)?,
        },
    })
}

fn parse_tiers(object: &Map<String, Value>) -> Result<Vec<Tier>> {
    let tiers =
        match object.get("tiers") {
            Some(Value::Array(tiers)) => tiers,
            _ => return Err(invalid(
                "tiers must be an array of tiers like {\"up_to\": 1000, \"unit_price\": \"0.5\"}, \
                 the last with \"up_to\": null",
            )),
        };
    tiers
        .iter()
        .enumerate()
        .map(|(index, tier)| parse_tier(index, tier))
        .collect()
}

fn parse_tier(index: usize, value: &Value) -> Result<Tier> {
    let place = format!("tiers[{index}]");
    let object = value
        .as_object()
        .ok_or_else(|| invalid(format!("{place} must be an object, got {}", shown(value))))?;
    reject_unknown_keys(object, &TIER_KEYS, &place)?;
    Ok(Tier {
        up_to: parse_up_to(object, &place)?,
        unit_price: required_decimal(object, &place, "unit_price")?,
        flat_price: optional_decimal(object, &place, "flat_price")?,
    })
}

/// A missing or null `up_to` is an open tier; validation then allows it only
/// last.
fn parse_up_to(object: &Map<String, Value>, place: &str) -> Result<Option<Decimal>> {
    match object.get("up_to") {
        None | Some(Value::Null) => Ok(None),
        Some(value) => non_negative_decimal(&field_name(place, "up_to"), value).map(Some),
    }
}

fn parse_by(object: &Map<String, Value>) -> Result<String> {
    match object.get("by") {
        Some(Value::String(by)) if !by.is_empty() => Ok(by.clone()),
        _ => Err(invalid(
            "by must be a non-empty string naming the event property that chooses a rate, \
             e.g. \"model\"",
        )),
    }
}

fn parse_rates(object: &Map<String, Value>) -> Result<BTreeMap<String, Rate>> {
    let rates = object
        .get("rates")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            invalid(
                "rates must be an object of rates, e.g. \
             {\"gpt-4o\": {\"input_tokens\": \"0.0025\", \"output_tokens\": \"0.01\"}}",
            )
        })?;
    rates
        .iter()
        .map(|(value, rate)| Ok((value.clone(), parse_rate(value, rate)?)))
        .collect()
}

fn parse_rate(value: &str, rate: &Value) -> Result<Rate> {
    let place = format!("rates[\"{}\"]", shortened(value));
    let entries = rate.as_object().ok_or_else(|| {
        invalid(format!(
            "{place} must be an object of property name to price per unit, got {}",
            shown(rate)
        ))
    })?;
    entries
        .iter()
        .map(|(name, price)| {
            Ok((
                name.clone(),
                non_negative_decimal(&field_name(&place, name), price)?,
            ))
        })
        .collect()
}

fn parse_rounding(object: &Map<String, Value>) -> Result<Rounding> {
    let names = quoted_list(Rounding::ALL.iter().map(|rule| rule.name()));
    match object.get("rounding") {
        None => Ok(Rounding::default()),
        Some(Value::String(name)) => Rounding::from_name(name).ok_or_else(|| {
            invalid(format!(
                "rounding must be one of {names}, got \"{}\"",
                shortened(name)
            ))
        }),
        Some(other) => Err(invalid(format!(
            "rounding must be one of {names}, got {}",
            shown(other)
        ))),
    }
}

fn reject_unknown_keys(object: &Map<String, Value>, allowed: &[&str], place: &str) -> Result<()> {
    match object.keys().find(|key| !allowed.contains(&key.as_str())) {
        Some(key) => Err(invalid(format!(
            "unknown key \"{}\" in {place}; allowed keys: {}",
            shortened(key),
            allowed.join(", ")
        ))),
        None => Ok(()),
    }
}

fn required_decimal(object: &Map<String, Value>, place: &str, key: &str) -> Result<Decimal> {
    let field = field_name(place, key);
    let value = object
        .get(key)
        .ok_or_else(|| invalid(format!("{field} is required")))?;
    non_negative_decimal(&field, value)
}

/// A decimal that defaults to 0 when absent.
fn optional_decimal(object: &Map<String, Value>, place: &str, key: &str) -> Result<Decimal> {
    match object.get(key) {
        None => Ok(Decimal::ZERO),
        Some(value) => non_negative_decimal(&field_name(place, key), value),
    }
}

/// A non-negative decimal from a JSON number or numeric string, normalized.
/// A JSON number is read from its text, never through a float, so 0.1 is
/// exactly 0.1; a number that needs more than 28 digits is refused rather
/// than rounded.
fn non_negative_decimal(field: &str, value: &Value) -> Result<Decimal> {
    let parsed = match value {
        Value::Number(number) => decimal_from_text(&number.to_string()),
        Value::String(text) => decimal_from_text(text),
        _ => None,
    };
    match parsed {
        Some(number) if number >= Decimal::ZERO => Ok(number.normalize()),
        _ => Err(invalid(format!(
            "{field} must be a non-negative number (at most 28 significant digits), got {}",
            shown(value)
        ))),
    }
}

/// Plain decimal text ("0.008"), else exponent form ("1.5e-7", "1e+20").
fn decimal_from_text(text: &str) -> Option<Decimal> {
    Decimal::from_str_exact(text)
        .or_else(|_| Decimal::from_scientific(text))
        .ok()
}

fn field_name(place: &str, key: &str) -> String {
    if place.is_empty() {
        key.to_string()
    } else {
        format!("{place}.{key}")
    }
}

fn insert_model_fields(model: &Model, object: &mut Map<String, Value>) {
    match model {
        Model::PerUnit { unit_price } => {
            object.insert("unit_price".into(), decimal_json(*unit_price));
        }
        Model::Package { size, price } => {
            object.insert("package_size".into(), decimal_json(*size));
            object.insert("package_price".into(), decimal_json(*price));
        }
        Model::Graduated { tiers } | Model::Volume { tiers } => {
            object.insert("tiers".into(), tiers.iter().map(tier_json).collect());
        }
        Model::CostCard { by, rates } => {
            object.insert("by".into(), Value::from(by.as_str()));
            object.insert("rates".into(), rates_json(rates));
        }
    }
}

fn tier_json(tier: &Tier) -> Value {
    let mut object = Map::new();
    object.insert("up_to".into(), tier.up_to.map_or(Value::Null, decimal_json));
    object.insert("unit_price".into(), decimal_json(tier.unit_price));
    object.insert("flat_price".into(), decimal_json(tier.flat_price));
    Value::Object(object)
}

fn rates_json(rates: &BTreeMap<String, Rate>) -> Value {
    let rate_json = |rate: &Rate| -> Value {
        let entries = rate
            .iter()
            .map(|(name, price)| (name.clone(), decimal_json(*price)));
        Value::Object(entries.collect())
    };
    let entries = rates
        .iter()
        .map(|(value, rate)| (value.clone(), rate_json(rate)));
    Value::Object(entries.collect())
}

/// Normalized text, so that 1.50 and 1.5 (equal prices) are written alike.
fn decimal_json(value: Decimal) -> Value {
    Value::String(value.normalize().to_string())
}

fn quoted_list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names
        .map(|name| format!("\"{name}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The most characters of an input an error message repeats.
const MAX_SHOWN_CHARS: usize = 60;

/// A JSON value as an error message shows it, cut short if long.
fn shown(value: &Value) -> String {
    shortened(&value.to_string())
}

fn shortened(text: &str) -> String {
    match text.char_indices().nth(MAX_SHOWN_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// Exactly the decimal written; a test value that would not fit fails.
    fn d(text: &str) -> Decimal {
        Decimal::from_str_exact(text).unwrap()
    }

    fn price(definition: Value) -> Price {
        Price::from_json(&definition).unwrap()
    }

    fn invalid_message(definition: Value) -> String {
        match Price::from_json(&definition) {
            Err(PriceError::Invalid(message)) => message,
            other => panic!("expected Invalid for {definition}, got {other:?}"),
        }
    }

    fn is_overflow<T>(result: Result<T>) -> bool {
        matches!(result, Err(PriceError::Overflow(_)))
    }

    fn per_unit(unit_price: &str) -> Price {
        price(json!({"model": "per_unit", "unit_price": unit_price}))
    }

    /// 1..=1000 free; 1001..=10000 at 0.5 with a flat 100; the rest at 0.4.
    fn graduated() -> Price {
        price(json!({"model": "graduated", "tiers": [
            {"up_to": 1000, "unit_price": 0},
            {"up_to": 10000, "unit_price": "0.5", "flat_price": 100},
            {"up_to": null, "unit_price": "0.4"}
        ]}))
    }

    /// 1..=1000 at 1; 1001..=10000 at 0.8 with a flat 50; the rest at 0.5.
    fn volume() -> Price {
        price(json!({"model": "volume", "tiers": [
            {"up_to": 1000, "unit_price": 1},
            {"up_to": 10000, "unit_price": "0.8", "flat_price": 50},
            {"up_to": null, "unit_price": "0.5"}
        ]}))
    }

    fn package() -> Price {
        price(json!({"model": "package", "package_size": 1000, "package_price": 5}))
    }

    fn card() -> Price {
        price(json!({"model": "cost_card", "by": "model", "rates": {
            "gpt-4o": {"input_tokens": "0.0025", "output_tokens": "0.01", "cached_tokens": "0.00125"},
            "gpt-4o-mini": {"input_tokens": "0.00015", "output_tokens": "0.0006"}
        }}))
    }

    fn with_rounding(mut price: Price, rounding: Rounding) -> Price {
        price.rounding = rounding;
        price
    }

    // --- per unit ---

    #[test]
    fn per_unit_zero_quantity_costs_nothing() {
        assert_eq!(per_unit("0.008").exact(d("0")).unwrap(), d("0"));
        assert_eq!(per_unit("0.008").total(d("0")).unwrap(), 0);
    }

    #[test]
    fn per_unit_multiplies_exactly_and_rounds_once() {
        // 1234 × 0.008 = 9.872 → 10
        assert_eq!(per_unit("0.008").exact(d("1234")).unwrap(), d("9.872"));
        assert_eq!(per_unit("0.008").total(d("1234")).unwrap(), 10);
        // 0.1 as a JSON number is exactly 0.1, not the nearest float
        let tenth = price(json!({"model": "per_unit", "unit_price": 0.1}));
        assert_eq!(tenth.exact(d("3")).unwrap(), d("0.3"));
    }

    #[test]
    fn per_unit_very_large_quantity_is_exact() {
        // 10^15 × 0.008 = 8 × 10^12
        assert_eq!(
            per_unit("0.008").total(d("1000000000000000")).unwrap(),
            8_000_000_000_000
        );
        // 10^15 + 1 at 0.000001 = 1000000000.000001
        assert_eq!(
            per_unit("0.000001").exact(d("1000000000000001")).unwrap(),
            d("1000000000.000001")
        );
    }

    #[test]
    fn per_unit_total_beyond_i64_is_overflow() {
        // 10^19 > i64::MAX ≈ 9.22 × 10^18
        assert!(is_overflow(per_unit("1").total(d("10000000000000000000"))));
        assert_eq!(
            per_unit("1").total(d("9223372036854775807")).unwrap(),
            i64::MAX
        );
    }

    #[test]
    fn per_unit_product_beyond_decimal_is_overflow() {
        assert!(is_overflow(
            per_unit("2").exact(d("70000000000000000000000000000"))
        ));
    }

    #[test]
    fn per_unit_product_needing_more_than_28_digits_is_an_error_not_a_rounded_number() {
        // exactly 1524157875323883565142509777.75007... needs 35 digits
        let result = per_unit("1234567890123.4567").exact(d("1234567890123456.789"));
        assert!(matches!(result, Err(PriceError::Overflow(_))), "{result:?}");
        // a product too small to hold is not silently 0
        let tiny = per_unit("0.000000000000001");
        assert!(is_overflow(tiny.exact(d("0.000000000000001"))));
    }

    #[test]
    fn trailing_zeros_do_not_count_against_precision() {
        let price = per_unit("1.00000000000000000000");
        assert_eq!(
            price.exact(d("12345678.900000000")).unwrap(),
            d("12345678.9")
        );
    }

    #[test]
    fn negative_quantity_is_invalid() {
        assert!(matches!(
            per_unit("1").exact(d("-1")),
            Err(PriceError::Invalid(message)) if message.contains("quantity")
        ));
    }

    // --- package ---

    #[test]
    fn package_zero_quantity_buys_no_package() {
        assert_eq!(package().total(d("0")).unwrap(), 0);
    }

    #[test]
    fn package_exactly_at_size_is_one_package_and_past_it_two() {
        assert_eq!(package().total(d("1")).unwrap(), 5);
        assert_eq!(package().total(d("1000")).unwrap(), 5);
        assert_eq!(package().total(d("1001")).unwrap(), 10);
        assert_eq!(package().total(d("1000.001")).unwrap(), 10);
        assert_eq!(package().total(d("2000")).unwrap(), 10);
    }

    #[test]
    fn package_of_fractional_size() {
        let half =
            price(json!({"model": "package", "package_size": "0.5", "package_price": "1.25"}));
        // 1.5 / 0.5 = 3 packages; a hair more needs a fourth
        assert_eq!(half.exact(d("1.5")).unwrap(), d("3.75"));
        assert_eq!(half.exact(d("1.5000001")).unwrap(), d("5"));
    }

    #[test]
    fn package_remainder_hidden_by_division_rounding_still_counts() {
        // (6 + 10^-28) / 3 rounds to exactly 2 at 28 digits, but 2 packages
        // of 3 do not hold it
        let three = price(json!({"model": "package", "package_size": 3, "package_price": 1}));
        assert_eq!(
            three.exact(d("6.0000000000000000000000000001")).unwrap(),
            d("3")
        );
        assert_eq!(three.exact(d("6")).unwrap(), d("2"));
        let seven = price(json!({"model": "package", "package_size": 7, "package_price": 1}));
        assert_eq!(
            seven.exact(d("7.0000000000000000000000000001")).unwrap(),
            d("2")
        );
    }

    #[test]
    fn package_very_large_quantity() {
        // 10^15 / 1000 = 10^12 packages × 5
        assert_eq!(
            package().total(d("1000000000000000")).unwrap(),
            5_000_000_000_000
        );
        assert_eq!(
            package().total(d("1000000000000001")).unwrap(),
            5_000_000_000_005
        );
    }

    #[test]
    fn package_overflow() {
        let huge = price(
            json!({"model": "package", "package_size": 1, "package_price": "10000000000000000000"}),
        );
        assert!(is_overflow(huge.total(d("1"))));
        // 10^25 / 10^-7 = 10^32 packages, beyond any decimal
        let tiny =
            price(json!({"model": "package", "package_size": "0.0000001", "package_price": 1}));
        assert!(is_overflow(tiny.exact(d("10000000000000000000000000"))));
    }

    // --- graduated ---

    #[test]
    fn graduated_at_and_past_each_boundary() {
        let price = graduated();
        assert_eq!(price.exact(d("0")).unwrap(), d("0"));
        assert_eq!(price.exact(d("1")).unwrap(), d("0"));
        assert_eq!(price.exact(d("1000")).unwrap(), d("0"));
        // 100 flat + 1 × 0.5
        assert_eq!(price.exact(d("1001")).unwrap(), d("100.5"));
        // 100 flat + 0.5 × 0.5
        assert_eq!(price.exact(d("1000.5")).unwrap(), d("100.25"));
        // 100 flat + 9000 × 0.5
        assert_eq!(price.exact(d("10000")).unwrap(), d("4600"));
        // 4600 + 1 × 0.4
        assert_eq!(price.exact(d("10001")).unwrap(), d("4600.4"));
        // 4600 + 0.5 × 0.4
        assert_eq!(price.exact(d("10000.5")).unwrap(), d("4600.2"));
        assert_eq!(price.total(d("1001")).unwrap(), 101);
    }

    #[test]
    fn graduated_first_tier_flat_is_charged_once_any_quantity_is_used() {
        let price = price(json!({"model": "graduated", "tiers": [
            {"up_to": 10, "unit_price": 1, "flat_price": 5},
            {"up_to": null, "unit_price": "0.5"}
        ]}));
        assert_eq!(price.exact(d("0")).unwrap(), d("0"));
        // 5 flat + 0.5 × 1
        assert_eq!(price.exact(d("0.5")).unwrap(), d("5.5"));
        // 5 flat + 10 × 1
        assert_eq!(price.exact(d("10")).unwrap(), d("15"));
        // 15 + 2 × 0.5 (the open tier has no flat)
        assert_eq!(price.exact(d("12")).unwrap(), d("16"));
    }

    #[test]
    fn graduated_single_open_tier_is_per_unit() {
        let price =
            price(json!({"model": "graduated", "tiers": [{"up_to": null, "unit_price": 2}]}));
        assert_eq!(price.exact(d("7.5")).unwrap(), d("15"));
    }

    #[test]
    fn graduated_very_large_quantity() {
        // 4600 + (10^15 − 10000) × 0.4 = 400000000000600
        assert_eq!(
            graduated().total(d("1000000000000000")).unwrap(),
            400_000_000_000_600
        );
    }

    #[test]
    fn graduated_overflow() {
        // 4600 + (10^20 − 10000) × 0.4 ≈ 4 × 10^19 > i64::MAX
        assert!(is_overflow(graduated().total(d("100000000000000000000"))));
        // (50000000000000000000000.000001 − 10000) × 0.4 needs 30 digits:
        // refused, not rounded
        assert!(is_overflow(
            graduated().exact(d("50000000000000000000000.000001"))
        ));
    }

    // --- volume ---

    #[test]
    fn volume_at_and_past_each_boundary() {
        let price = volume();
        assert_eq!(price.exact(d("0")).unwrap(), d("0"));
        assert_eq!(price.exact(d("1")).unwrap(), d("1"));
        assert_eq!(price.exact(d("1000")).unwrap(), d("1000"));
        // 1001 × 0.8 + 50
        assert_eq!(price.exact(d("1001")).unwrap(), d("850.8"));
        // 1000.5 × 0.8 + 50
        assert_eq!(price.exact(d("1000.5")).unwrap(), d("850.4"));
        // 10000 × 0.8 + 50
        assert_eq!(price.exact(d("10000")).unwrap(), d("8050"));
        // 10001 × 0.5
        assert_eq!(price.exact(d("10001")).unwrap(), d("5000.5"));
        assert_eq!(price.total(d("10001")).unwrap(), 5001);
    }

    #[test]
    fn volume_total_drops_when_crossing_into_a_cheaper_tier() {
        let price = volume();
        assert!(price.total(d("1001")).unwrap() < price.total(d("1000")).unwrap());
        assert!(price.total(d("10001")).unwrap() < price.total(d("10000")).unwrap());
    }

    #[test]
    fn volume_zero_quantity_skips_flat_price() {
        let price = price(json!({"model": "volume", "tiers": [
            {"up_to": null, "unit_price": 1, "flat_price": 9}
        ]}));
        assert_eq!(price.exact(d("0")).unwrap(), d("0"));
        assert_eq!(price.exact(d("0.25")).unwrap(), d("9.25"));
    }

    #[test]
    fn volume_very_large_quantity_and_overflow() {
        // 10^15 × 0.5
        assert_eq!(
            volume().total(d("1000000000000000")).unwrap(),
            500_000_000_000_000
        );
        // 10^20 × 0.5 > i64::MAX
        assert!(is_overflow(volume().total(d("100000000000000000000"))));
        // the largest decimal × 0.5 needs 30 digits
        assert!(is_overflow(volume().exact(Decimal::MAX)));
    }

    // --- included ---

    #[test]
    fn included_below_at_and_above() {
        let price = price(json!({"model": "per_unit", "unit_price": 2, "included": 100}));
        assert_eq!(price.exact(d("50")).unwrap(), d("0"));
        assert_eq!(price.exact(d("100")).unwrap(), d("0"));
        assert_eq!(price.exact(d("101")).unwrap(), d("2"));
        assert_eq!(price.exact(d("100.5")).unwrap(), d("1"));
    }

    #[test]
    fn included_comes_off_before_tiers_and_packages() {
        let mut tiered = graduated();
        tiered.included = d("1000");
        // 2001 − 1000 = 1001 billable → 100.5
        assert_eq!(tiered.exact(d("2001")).unwrap(), d("100.5"));
        assert_eq!(tiered.exact(d("2000")).unwrap(), d("0"));
        let mut packaged = package();
        packaged.included = d("500");
        assert_eq!(packaged.total(d("500")).unwrap(), 0);
        assert_eq!(packaged.total(d("1500")).unwrap(), 5);
        assert_eq!(packaged.total(d("1501")).unwrap(), 10);
        let mut by_volume = volume();
        by_volume.included = d("10");
        // 1011 − 10 = 1001 billable → 850.8
        assert_eq!(by_volume.exact(d("1011")).unwrap(), d("850.8"));
    }

    #[test]
    fn negative_included_is_invalid() {
        let message =
            invalid_message(json!({"model": "per_unit", "unit_price": 1, "included": -5}));
        assert!(message.contains("included"), "{message}");
    }

    // --- rounding ---

    #[test]
    fn each_rounding_rule_on_half_just_below_half_and_a_sliver() {
        let cases = [
            (
                Rounding::HalfUp,
                [
                    ("0.5", 1),
                    ("0.4999", 0),
                    ("0.0001", 0),
                    ("2.5", 3),
                    ("7", 7),
                ],
            ),
            (
                Rounding::Up,
                [
                    ("0.5", 1),
                    ("0.4999", 1),
                    ("0.0001", 1),
                    ("2.5", 3),
                    ("7", 7),
                ],
            ),
            (
                Rounding::Down,
                [
                    ("0.5", 0),
                    ("0.4999", 0),
                    ("0.0001", 0),
                    ("2.5", 2),
                    ("7", 7),
                ],
            ),
        ];
        for (rule, expectations) in cases {
            let price = with_rounding(per_unit("1"), rule);
            for (exact, whole) in expectations {
                assert_eq!(price.rounded(d(exact)).unwrap(), whole, "{rule:?} {exact}");
                assert_eq!(price.total(d(exact)).unwrap(), whole, "{rule:?} {exact}");
            }
        }
    }

    #[test]
    fn rounding_is_read_from_json() {
        for (name, rule) in [
            ("half_up", Rounding::HalfUp),
            ("up", Rounding::Up),
            ("down", Rounding::Down),
        ] {
            let price = price(json!({"model": "per_unit", "unit_price": 1, "rounding": name}));
            assert_eq!(price.rounding, rule);
        }
        let message =
            invalid_message(json!({"model": "per_unit", "unit_price": 1, "rounding": "nearest"}));
        assert!(
            message.contains("half_up") && message.contains("nearest"),
            "{message}"
        );
    }

    #[test]
    fn rounded_rejects_negative_and_overflows_beyond_i64() {
        let price = per_unit("1");
        assert!(matches!(
            price.rounded(d("-0.5")),
            Err(PriceError::Invalid(_))
        ));
        assert!(is_overflow(price.rounded(d("9223372036854775807.5"))));
        let down = with_rounding(per_unit("1"), Rounding::Down);
        assert_eq!(down.rounded(d("9223372036854775807.5")).unwrap(), i64::MAX);
    }

    // --- cost card ---

    #[test]
    fn cost_card_prices_a_known_model() {
        let event = json!({"model": "gpt-4o", "input_tokens": 1000, "output_tokens": 500, "cached_tokens": 200});
        // 1000 × 0.0025 + 500 × 0.01 + 200 × 0.00125 = 2.5 + 5 + 0.25
        assert_eq!(card().event_exact(&event).unwrap(), d("7.75"));
        assert_eq!(card().rounded(d("7.75")).unwrap(), 8);
    }

    #[test]
    fn cost_card_unknown_model_lists_known_values() {
        let error = card()
            .event_exact(&json!({"model": "gpt-5", "input_tokens": 1}))
            .unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, PriceError::Invalid(_)));
        assert!(message.contains("\"gpt-5\""), "{message}");
        assert!(message.contains("\"gpt-4o\", \"gpt-4o-mini\""), "{message}");
    }

    #[test]
    fn cost_card_lists_at_most_twenty_known_values() {
        let rates: Map<String, Value> = (0..25)
            .map(|n| (format!("m{n:02}"), json!({"tokens": 1})))
            .collect();
        let big = price(json!({"model": "cost_card", "by": "model", "rates": rates}));
        let message = big
            .event_exact(&json!({"model": "nope"}))
            .unwrap_err()
            .to_string();
        assert!(message.contains("\"m19\""), "{message}");
        assert!(!message.contains("\"m20\""), "{message}");
        assert!(message.contains("and 5 more"), "{message}");
    }

    #[test]
    fn cost_card_missing_property_counts_zero_and_unrated_property_is_ignored() {
        let event = json!({"model": "gpt-4o", "output_tokens": 100, "latency_ms": 950});
        // 100 × 0.01
        assert_eq!(card().event_exact(&event).unwrap(), d("1"));
        assert_eq!(
            card().event_exact(&json!({"model": "gpt-4o"})).unwrap(),
            d("0")
        );
    }

    #[test]
    fn cost_card_rejects_negative_and_non_numeric_properties() {
        let negative = card().event_exact(&json!({"model": "gpt-4o", "input_tokens": -1}));
        assert!(matches!(negative, Err(PriceError::Invalid(m)) if m.contains("input_tokens")));
        let text = card().event_exact(&json!({"model": "gpt-4o", "input_tokens": "lots"}));
        assert!(matches!(text, Err(PriceError::Invalid(_))));
        let null = card().event_exact(&json!({"model": "gpt-4o", "input_tokens": null}));
        assert!(matches!(null, Err(PriceError::Invalid(_))));
    }

    #[test]
    fn cost_card_accepts_numeric_strings() {
        let event = json!({"model": "gpt-4o-mini", "input_tokens": "2000", "output_tokens": "1e3"});
        // 2000 × 0.00015 + 1000 × 0.0006 = 0.3 + 0.6
        assert_eq!(card().event_exact(&event).unwrap(), d("0.9"));
    }

    #[test]
    fn cost_card_needs_the_by_property_as_a_string() {
        for event in [
            json!({"input_tokens": 1}),
            json!({"model": 4}),
            json!(["gpt-4o"]),
        ] {
            assert!(
                matches!(card().event_exact(&event), Err(PriceError::Invalid(_))),
                "{event}"
            );
        }
    }

    #[test]
    fn cost_card_event_overflow() {
        // 12345678901234567890.123456789 × 0.0025 needs 33 digits
        let event = json!({"model": "gpt-4o", "input_tokens": "12345678901234567890.123456789"});
        assert!(is_overflow(card().event_exact(&event)));
        let huge = price(json!({"model": "cost_card", "by": "model", "rates": {"big": {"a": 2}}}));
        let event = json!({"model": "big", "a": "70000000000000000000000000000"});
        assert!(is_overflow(huge.event_exact(&event)));
    }

    #[test]
    fn cost_card_and_quantity_prices_do_not_mix() {
        assert!(matches!(card().exact(d("1")), Err(PriceError::Invalid(_))));
        assert!(matches!(card().total(d("1")), Err(PriceError::Invalid(_))));
        assert!(matches!(
            per_unit("1").event_exact(&json!({"model": "gpt-4o"})),
            Err(PriceError::Invalid(_))
        ));
        assert!(card().is_additive());
        for other in [per_unit("1"), package(), graduated(), volume()] {
            assert!(!other.is_additive());
        }
    }

    #[test]
    fn cost_card_with_included_is_invalid() {
        let message = invalid_message(json!({"model": "cost_card", "by": "model", "included": 10,
            "rates": {"gpt-4o": {"input_tokens": 1}}}));
        assert!(message.contains("included"), "{message}");
        let mut built = card();
        built.included = d("1");
        assert!(matches!(
            built.event_exact(&json!({"model": "gpt-4o"})),
            Err(PriceError::Invalid(_))
        ));
    }

    // --- parsing ---

    #[test]
    fn parses_each_example() {
        assert_eq!(
            per_unit("0.008").model,
            Model::PerUnit {
                unit_price: d("0.008")
            }
        );
        assert_eq!(
            package().model,
            Model::Package {
                size: d("1000"),
                price: d("5")
            }
        );
        let tiers = vec![
            Tier {
                up_to: Some(d("1000")),
                unit_price: d("0"),
                flat_price: d("0"),
            },
            Tier {
                up_to: Some(d("10000")),
                unit_price: d("0.5"),
                flat_price: d("100"),
            },
            Tier {
                up_to: None,
                unit_price: d("0.4"),
                flat_price: d("0"),
            },
        ];
        assert_eq!(graduated().model, Model::Graduated { tiers });
        assert!(matches!(volume().model, Model::Volume { tiers } if tiers.len() == 3));
        let card = price(json!({"model": "cost_card", "by": "model",
            "rates": {"gpt-4o": {"input_tokens": "0.0025", "output_tokens": "0.01"}}}));
        let rate = BTreeMap::from([
            ("input_tokens".to_string(), d("0.0025")),
            ("output_tokens".to_string(), d("0.01")),
        ]);
        assert_eq!(
            card.model,
            Model::CostCard {
                by: "model".into(),
                rates: BTreeMap::from([("gpt-4o".to_string(), rate)])
            }
        );
        for parsed in [per_unit("1"), package(), graduated(), volume(), card] {
            assert_eq!(parsed.included, d("0"));
            assert_eq!(parsed.rounding, Rounding::HalfUp);
        }
    }

    #[test]
    fn numbers_may_be_json_numbers_or_strings_in_either_notation() {
        for unit_price in [
            json!(0.001),
            json!(1e-3),
            json!("0.001"),
            json!("1e-3"),
            json!("1.0E-3"),
        ] {
            let parsed = price(json!({"model": "per_unit", "unit_price": unit_price}));
            assert_eq!(
                parsed.model,
                Model::PerUnit {
                    unit_price: d("0.001")
                },
                "{unit_price}"
            );
        }
        let big = price(json!({"model": "per_unit", "unit_price": 1e20}));
        assert_eq!(
            big.model,
            Model::PerUnit {
                unit_price: d("100000000000000000000")
            }
        );
    }

    #[test]
    fn unparsable_or_too_precise_numbers_are_rejected_not_rounded() {
        for unit_price in [
            json!("NaN"),
            json!("inf"),
            json!(""),
            json!(true),
            json!(null),
            json!("0.12345678901234567890123456789"),
        ] {
            let message = invalid_message(json!({"model": "per_unit", "unit_price": unit_price}));
            assert!(
                message.contains("unit_price must be a non-negative number"),
                "{message}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let message = invalid_message(json!({"model": "per_unit", "unit_prise": 1}));
        assert!(message.contains("\"unit_prise\""), "{message}");
        // a key of another model is unknown too
        let message = invalid_message(json!({"model": "per_unit", "unit_price": 1, "tiers": []}));
        assert!(message.contains("\"tiers\""), "{message}");
        let message = invalid_message(json!({"model": "graduated", "tiers": [
            {"up_to": null, "unit_price": 1, "flatprice": 2}
        ]}));
        assert!(
            message.contains("\"flatprice\"") && message.contains("tiers[0]"),
            "{message}"
        );
    }

    #[test]
    fn missing_or_unknown_model_is_rejected() {
        assert!(invalid_message(json!({"unit_price": 1})).contains("per_unit"));
        assert!(invalid_message(json!({"model": "tiered"})).contains("\"tiered\""));
        assert!(invalid_message(json!("per_unit")).contains("object"));
        assert!(invalid_message(json!({"model": "per_unit"})).contains("unit_price is required"));
    }

    #[test]
    fn tiers_not_strictly_increasing_are_rejected() {
        let decreasing = invalid_message(json!({"model": "graduated", "tiers": [
            {"up_to": 1000, "unit_price": 1},
            {"up_to": 500, "unit_price": 1},
            {"up_to": null, "unit_price": 1}
        ]}));
        assert!(decreasing.contains("tiers[1].up_to"), "{decreasing}");
        let equal = invalid_message(json!({"model": "volume", "tiers": [
            {"up_to": 1000, "unit_price": 1},
            {"up_to": 1000, "unit_price": 1},
            {"up_to": null, "unit_price": 1}
        ]}));
        assert!(equal.contains("tiers[1].up_to"), "{equal}");
        let zero = invalid_message(json!({"model": "graduated", "tiers": [
            {"up_to": 0, "unit_price": 1},
            {"up_to": null, "unit_price": 1}
        ]}));
        assert!(
            zero.contains("tiers[0].up_to must be greater than 0"),
            "{zero}"
        );
    }

    #[test]
    fn last_tier_must_be_open_ended_and_only_it() {
        let bounded = invalid_message(json!({"model": "graduated", "tiers": [
            {"up_to": 1000, "unit_price": 1},
            {"up_to": 2000, "unit_price": 1}
        ]}));
        assert!(
            bounded.contains("tiers[1]") && bounded.contains("null"),
            "{bounded}"
        );
        let open_middle = invalid_message(json!({"model": "volume", "tiers": [
            {"up_to": null, "unit_price": 1},
            {"up_to": null, "unit_price": 1}
        ]}));
        assert!(open_middle.contains("tiers[0].up_to"), "{open_middle}");
        let empty = invalid_message(json!({"model": "graduated", "tiers": []}));
        assert!(empty.contains("at least one tier"), "{empty}");
    }

    #[test]
    fn negative_prices_are_rejected_naming_the_field() {
        let tier = invalid_message(json!({"model": "graduated", "tiers": [
            {"up_to": 10, "unit_price": 1},
            {"up_to": null, "unit_price": "-0.4"}
        ]}));
        assert!(
            tier.contains("tiers[1].unit_price must be a non-negative number"),
            "{tier}"
        );
        assert!(tier.contains("-0.4"), "{tier}");
        let flat = invalid_message(json!({"model": "volume", "tiers": [
            {"up_to": null, "unit_price": 1, "flat_price": -1}
        ]}));
        assert!(flat.contains("tiers[0].flat_price"), "{flat}");
        let rate = invalid_message(json!({"model": "cost_card", "by": "model",
            "rates": {"gpt-4o": {"input_tokens": "-0.0025"}}}));
        assert!(rate.contains("rates[\"gpt-4o\"].input_tokens"), "{rate}");
        assert!(
            invalid_message(json!({"model": "per_unit", "unit_price": -1})).contains("unit_price")
        );
        assert!(invalid_message(
            json!({"model": "package", "package_size": 10, "package_price": -1})
        )
        .contains("package_price"));
    }

    #[test]
    fn package_size_must_be_positive() {
        let message =
            invalid_message(json!({"model": "package", "package_size": 0, "package_price": 1}));
        assert!(
            message.contains("package_size must be greater than 0"),
            "{message}"
        );
    }

    #[test]
    fn cost_card_definition_is_checked() {
        let rates = json!({"gpt-4o": {"input_tokens": 1}});
        assert!(
            invalid_message(json!({"model": "cost_card", "by": "", "rates": rates})).contains("by")
        );
        assert!(invalid_message(json!({"model": "cost_card", "rates": rates})).contains("by"));
        assert!(
            invalid_message(json!({"model": "cost_card", "by": "model", "rates": {}}))
                .contains("at least one rate")
        );
        assert!(invalid_message(
            json!({"model": "cost_card", "by": "model", "rates": {"gpt-4o": 1}})
        )
        .contains("rates[\"gpt-4o\"]"));
    }

    #[test]
    fn to_json_is_canonical() {
        let written = graduated().to_json();
        assert_eq!(
            written,
            json!({"model": "graduated", "included": "0", "rounding": "half_up", "tiers": [
                {"up_to": "1000", "unit_price": "0", "flat_price": "0"},
                {"up_to": "10000", "unit_price": "0.5", "flat_price": "100"},
                {"up_to": null, "unit_price": "0.4", "flat_price": "0"}
            ]})
        );
        // equal prices written with different scales have equal JSON
        let plain = per_unit("1.5");
        let padded = Price {
            model: Model::PerUnit {
                unit_price: d("1.500"),
            },
            included: d("0.00"),
            rounding: Rounding::HalfUp,
        };
        assert_eq!(plain, padded);
        assert_eq!(plain.to_json(), padded.to_json());
        assert_eq!(
            plain.to_json(),
            json!({"model": "per_unit", "unit_price": "1.5", "included": "0", "rounding": "half_up"})
        );
    }

    #[test]
    fn json_round_trip_of_each_example() {
        let mut examples = vec![per_unit("0.008"), package(), graduated(), volume(), card()];
        examples.push(price(
            json!({"model": "package", "package_size": "2.5", "package_price": "0.10",
            "included": "1e3", "rounding": "up"}),
        ));
        for price in examples {
            let written = price.to_json();
            assert_eq!(Price::from_json(&written).unwrap(), price, "{written}");
            assert_eq!(Price::from_json(&written).unwrap().to_json(), written);
        }
    }

    #[test]
    fn error_display_is_the_message() {
        let error = PriceError::Invalid("unit_price is required".into());
        assert_eq!(error.to_string(), "unit_price is required");
        let boxed: Box<dyn std::error::Error> = Box::new(PriceError::Overflow("too big".into()));
        assert_eq!(boxed.to_string(), "too big");
    }

    #[test]
    fn hand_built_invalid_price_is_refused_when_pricing() {
        let unsorted = Price {
            model: Model::Graduated {
                tiers: vec![
                    Tier {
                        up_to: Some(d("10")),
                        unit_price: d("1"),
                        flat_price: d("0"),
                    },
                    Tier {
                        up_to: Some(d("5")),
                        unit_price: d("1"),
                        flat_price: d("0"),
                    },
                    Tier {
                        up_to: None,
                        unit_price: d("1"),
                        flat_price: d("0"),
                    },
                ],
            },
            included: d("0"),
            rounding: Rounding::HalfUp,
        };
        assert!(matches!(
            unsorted.exact(d("7")),
            Err(PriceError::Invalid(_))
        ));
    }

    // --- properties ---

    /// A decimal with up to 3 decimal places below `max_units`.
    fn decimal_below(max_units: u64) -> impl Strategy<Value = Decimal> {
        (0..max_units * 1000).prop_map(|mills| Decimal::new(mills as i64, 3))
    }

    /// 1 to 5 tiers, the last open, each bound `step` above the previous
    /// one, with random prices and flat prices.
    fn tier_lists(steps: impl Strategy<Value = Decimal>) -> impl Strategy<Value = Vec<Tier>> {
        let tier = (steps, 0i64..100_000, 0u32..5, 0i64..1_000);
        prop::collection::vec(tier, 1..6).prop_map(|raw| {
            let mut bound = Decimal::ZERO;
            let last = raw.len() - 1;
            raw.into_iter()
                .enumerate()
                .map(|(index, (step, price, scale, flat))| {
                    bound += step;
                    Tier {
                        up_to: (index != last).then_some(bound),
                        unit_price: Decimal::new(price, scale),
                        flat_price: Decimal::new(flat, 2),
                    }
                })
                .collect()
        })
    }

    /// Steps of 0.1 to 10000 in tenths.
    fn fractional_steps() -> impl Strategy<Value = Decimal> {
        (1i64..100_000).prop_map(|tenths| Decimal::new(tenths, 1))
    }

    /// Whole steps of 1 to 50 units.
    fn whole_steps() -> impl Strategy<Value = Decimal> {
        (1i64..=50).prop_map(Decimal::from)
    }

    fn graduated_price(tiers: Vec<Tier>, included: Decimal, rounding: Rounding) -> Price {
        Price {
            model: Model::Graduated { tiers },
            included,
            rounding,
        }
    }

    fn roundings() -> impl Strategy<Value = Rounding> {
        prop::sample::select(Rounding::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn graduated_json_round_trip(tiers in tier_lists(fractional_steps()), included in decimal_below(1000), rounding in roundings()) {
            let price = graduated_price(tiers.clone(), included, rounding);
            let written = price.to_json();
            prop_assert_eq!(Price::from_json(&written).unwrap(), price.clone());
            let volume = Price { model: Model::Volume { tiers }, ..price };
            prop_assert_eq!(Price::from_json(&volume.to_json()).unwrap(), volume);
        }

        #[test]
        fn invoice_lines_add_up_to_the_exact_total(
            tiers in tier_lists(fractional_steps()),
            included in decimal_below(1000),
            quantity in decimal_below(100_000),
        ) {
            for price in [
                graduated_price(tiers.clone(), included, Rounding::HalfUp),
                Price { model: Model::Volume { tiers: tiers.clone() }, included, rounding: Rounding::HalfUp },
            ] {
                let sum: Decimal = price.lines(quantity).unwrap().iter().map(|l| l.amount).sum();
                prop_assert_eq!(sum, price.exact(quantity).unwrap());
            }
        }

        #[test]
        fn graduated_total_is_monotone_in_quantity(
            tiers in tier_lists(fractional_steps()),
            a in decimal_below(1_000_000),
            b in decimal_below(1_000_000),
            rounding in roundings(),
        ) {
            let price = graduated_price(tiers, Decimal::ZERO, rounding);
            let (low, high) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(price.exact(low).unwrap() <= price.exact(high).unwrap());
            prop_assert!(price.total(low).unwrap() <= price.total(high).unwrap());
        }

        #[test]
        fn graduated_whole_quantity_is_priced_unit_by_unit(tiers in tier_lists(whole_steps()), quantity in 0u64..300) {
            // unit n lies in the first tier whose up_to ≥ n, and a tier's flat
            // price comes with its first unit
            let price = graduated_price(tiers.clone(), Decimal::ZERO, Rounding::HalfUp);
            let mut expected = Decimal::ZERO;
            let mut entered = vec![false; tiers.len()];
            for unit in (1..=quantity).map(Decimal::from) {
                let index = tiers.iter().position(|t| t.up_to.is_none_or(|u| unit <= u)).unwrap();
                expected += tiers[index].unit_price;
                if !entered[index] {
                    entered[index] = true;
                    expected += tiers[index].flat_price;
                }
            }
            prop_assert_eq!(price.exact(Decimal::from(quantity)).unwrap(), expected);
        }

        #[test]
        fn package_count_is_the_ceiling(quantity in 1u64..1_000_000, size in 1u64..5_000) {
            let price = Price {
                model: Model::Package { size: Decimal::from(size), price: Decimal::ONE },
                included: Decimal::ZERO,
                rounding: Rounding::HalfUp,
            };
            prop_assert_eq!(price.total(Decimal::from(quantity)).unwrap() as u64, quantity.div_ceil(size));
        }
    }
}
