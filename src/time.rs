//! Time is the database's: decisions use the transaction's `now()`. Instants
//! are handled as PostgreSQL microseconds (`TimestampTz`) so comparisons are exact.

use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys;

use crate::error::{BillingError, Result};

pub type Ts = i64;

/// `now()`: the start of the current transaction.
pub fn now() -> Ts {
    // SAFETY: always valid inside a transaction, which every SQL call is.
    unsafe { pg_sys::GetCurrentTransactionStartTimestamp() }
}

pub fn to_sql(ts: Ts) -> TimestampWithTimeZone {
    TimestampWithTimeZone::try_from(ts).expect("finite timestamps convert")
}

/// A caller-supplied instant, which must be finite.
pub fn from_sql(field: &'static str, ts: TimestampWithTimeZone) -> Result<Ts> {
    if !ts.is_finite() {
        return Err(BillingError::invalid(field, "must be a finite timestamp"));
    }
    Ok(ts.into())
}

pub fn opt_from_sql(field: &'static str, ts: Option<TimestampWithTimeZone>) -> Result<Option<Ts>> {
    ts.map(|t| from_sql(field, t)).transpose()
}

/// The instant a stored timestamptz holds; the infinities as the extremes.
pub fn instant(t: TimestampWithTimeZone) -> Ts {
    if t.is_finite() {
        t.into()
    } else if t == TimestampWithTimeZone::positive_infinity() {
        Ts::MAX
    } else {
        Ts::MIN
    }
}

/// An instant to store; `Ts::MAX` (no bound) as infinity.
pub fn sql_instant(t: Ts) -> TimestampWithTimeZone {
    if t == Ts::MAX {
        TimestampWithTimeZone::positive_infinity()
    } else {
        to_sql(t)
    }
}

/// `clock_timestamp()`: the instant a row is recorded at.
pub fn clock_now() -> TimestampWithTimeZone {
    // SAFETY: reads the system clock.
    to_sql(unsafe { pg_sys::GetCurrentTimestamp() })
}
