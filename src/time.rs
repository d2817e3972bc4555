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

/// Microseconds in a day.
const DAY_US: i64 = 86_400_000_000;
/// Days from 0000-03-01 (the proleptic Gregorian year 0) to 2000-01-01,
/// PostgreSQL's epoch for `TimestampTz`.
const PG_EPOCH_DAYS: i64 = 730_425;

/// An instant as ISO 8601 text in UTC that `timestamptz` input reads back
/// exactly under any `DateStyle` and `TimeZone` (for instants passed to a
/// statement inside JSON); the infinities as PostgreSQL spells them.
pub fn iso_utc(t: Ts) -> String {
    match t {
        Ts::MAX => return "infinity".into(),
        Ts::MIN => return "-infinity".into(),
        _ => {}
    }
    let days = t.div_euclid(DAY_US);
    let us = t.rem_euclid(DAY_US);
    let (year, month, day) = civil_from_days(days + PG_EPOCH_DAYS);
    let (secs, micros) = (us / 1_000_000, us % 1_000_000);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    // year 0 and before are 1 BC and before
    let (y, era) = if year > 0 {
        (year, "")
    } else {
        (1 - year, " BC")
    };
    format!("{y:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}.{micros:06}+00{era}")
}

/// (year, month, day) of a count of days since 0000-03-01, proleptic
/// Gregorian (the era arithmetic of H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097); // day of era, 0..146096
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365; // 0..399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // from March 1st, 0..365
    let mp = (5 * doy + 2) / 153; // month from March, 0..11
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = era * 400 + yoe + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000_000;

    #[test]
    fn instants_read_as_iso_text_in_utc() {
        assert_eq!(iso_utc(0), "2000-01-01 00:00:00.000000+00");
        assert_eq!(iso_utc(-1), "1999-12-31 23:59:59.999999+00");
        assert_eq!(
            iso_utc(59 * DAY_US + 13 * H + 1),
            "2000-02-29 13:00:00.000001+00"
        );
        assert_eq!(iso_utc(60 * DAY_US), "2000-03-01 00:00:00.000000+00");
        // 2026-11-29 03:29:07.117438 UTC, as PostgreSQL stores it
        assert_eq!(
            iso_utc(849_238_147_117_438),
            "2026-11-29 03:29:07.117438+00"
        );
        // 2100 is not a leap year
        let mar_1_2100 = (36_525 + 31 + 28) * DAY_US;
        assert_eq!(iso_utc(mar_1_2100), "2100-03-01 00:00:00.000000+00");
        assert_eq!(iso_utc(mar_1_2100 - 1), "2100-02-28 23:59:59.999999+00");
        // 0001-01-01 and the day before it, 1 BC (a leap year)
        let jan_1_1 = -730_119 * DAY_US;
        assert_eq!(iso_utc(jan_1_1), "0001-01-01 00:00:00.000000+00");
        assert_eq!(iso_utc(jan_1_1 - 1), "0001-12-31 23:59:59.999999+00 BC");
        assert_eq!(
            iso_utc(jan_1_1 - 307 * DAY_US),
            "0001-02-29 00:00:00.000000+00 BC"
        );
        assert_eq!(iso_utc(Ts::MAX), "infinity");
        assert_eq!(iso_utc(Ts::MIN), "-infinity");
    }
}
