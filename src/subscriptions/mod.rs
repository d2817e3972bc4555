//! Plans and subscriptions. The projection of a provider's subscription
//! object, its state machine and the plan credit it opens are SQL
//! (`sql/subscriptions.sql`), over the ledger's own calls; how a billing
//! period is cut into allowance periods is arithmetic, here (`periods`).

use pgrx::datum::TimestampWithTimeZone as Tstz;
use pgrx::prelude::*;

use crate::error::{BillingError, OrRaise};
use crate::input;
use crate::time;

pub mod periods;

/// The allowance periods of the billing period [period_start, period_end):
/// one for a period of at most a calendar month, monthly ones anchored on
/// its start for a longer one (see `periods`).
#[pg_extern(immutable, parallel_safe)]
fn allowance_periods(
    period_start: Option<Tstz>,
    period_end: Option<Tstz>,
) -> TableIterator<'static, (name!(starts_at, Tstz), name!(ends_at, Tstz))> {
    let result = (|| {
        let start = time::from_sql(
            "period_start",
            input::required("period_start", period_start)?,
        )?;
        let end = time::from_sql("period_end", input::required("period_end", period_end)?)?;
        periods::allowance_periods(start, end)
            .map_err(|e| BillingError::invalid("period", e.to_string()))
    })();
    let rows: Vec<(Tstz, Tstz)> = result
        .or_raise()
        .into_iter()
        .map(|(s, e)| (time::to_sql(s), time::to_sql(e)))
        .collect();
    TableIterator::new(rows)
}
