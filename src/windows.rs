//! What allowances and limits share: the kinds of window they count in
//! (cut by sql/windows.sql) and the time zone their windows are local to.

use pgrx::spi::SpiClient;

use crate::db::{self, Sql, TEXT};
use crate::error::{BillingError, Result};
use crate::input;

/// The windows an allowance or a limit may reset on; the CHECK constraints
/// of billing.allowances and billing.limits hold the same list.
const EVERY: [&str; 5] = ["hour", "day", "week", "month", "never"];

pub fn every(every: &str) -> Result<()> {
    if EVERY.contains(&every) {
        return Ok(());
    }
    Err(BillingError::invalid(
        "every",
        format!(
            "\"{}\" is not one of {}",
            input::clip(every),
            EVERY.join(", ")
        ),
    ))
}

static CHECK_TIME_ZONE: Sql = Sql {
    text: "SELECT now() AT TIME ZONE $1 AS local",
    args: &[TEXT],
};

/// A time zone PostgreSQL knows (else its own 22023, naming it).
pub fn time_zone(client: &mut SpiClient<'_>, time_zone: &str) -> Result<()> {
    db::write(client, &CHECK_TIME_ZONE, &[time_zone.into()])?;
    Ok(())
}
