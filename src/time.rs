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
