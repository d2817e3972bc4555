//! Allowance periods: how a provider's billing period is cut into the
//! periods a plan's allowance is granted for. Pure arithmetic on UTC
//! instants (`Ts`, PostgreSQL's microseconds since 2000-01-01 00:00 UTC);
//! nothing here reads the database or the session's time zone.
//!
//! The rule: a billing period of at most one calendar month (monthly,
//! weekly, 28-day cycles, however the provider rolls a month end) is one
//! allowance period. A longer one (annual, quarterly) is cut into monthly
//! periods anchored on its start, each starting on the start's day of the
//! month (the month's last day when it has fewer days: 31 January → 28 or
//! 29 February, and back to 31 March) at the start's time of day; the last
//! one runs to the end of the billing period, however the provider rolled it
//! (an anniversary on 29 February ends on 28 February or 1 March: still 12
//! periods). So a year always yields 12 allowances and never a 12-month lump.

use crate::time::Ts;

const MICROS_PER_DAY: i64 = 86_400_000_000;
/// Days from 1970-01-01 to 2000-01-01, PostgreSQL's epoch.
const PG_EPOCH_DAYS: i64 = 10_957;
/// A billing period longer than this many months is refused: no provider
/// bills so, and the periods of one are created at once.
pub const MAX_MONTHS: i64 = 120;

/// Why a billing period cannot be cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeriodError {
    Empty,
    TooLong,
    Infinite,
}

impl std::fmt::Display for PeriodError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeriodError::Empty => write!(f, "the period ends at or before its start"),
            PeriodError::TooLong => write!(f, "the period is longer than {MAX_MONTHS} months"),
            PeriodError::Infinite => write!(f, "the period's bounds must be finite"),
        }
    }
}

/// (year, month 1..=12, day 1..=31) of a day count since 1970-01-01
/// (Howard Hinnant's `civil_from_days`, proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a civil date (`days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `t` plus `months` calendar months in UTC: the same day of the month (the
/// month's last day when it has fewer) at the same time of day.
pub fn add_months(t: Ts, months: i64) -> Ts {
    let days = t.div_euclid(MICROS_PER_DAY) + PG_EPOCH_DAYS;
    let time_of_day = t.rem_euclid(MICROS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    let index = year * 12 + i64::from(month) - 1 + months;
    let (year, month) = (index.div_euclid(12), (index.rem_euclid(12) + 1) as u32);
    let day = day.min(days_in_month(year, month));
    (days_from_civil(year, month, day) - PG_EPOCH_DAYS) * MICROS_PER_DAY + time_of_day
}

/// The start of the calendar month (UTC) that holds `t`.
pub fn month_start(t: Ts) -> Ts {
    let days = t.div_euclid(MICROS_PER_DAY) + PG_EPOCH_DAYS;
    let (year, month, _) = civil_from_days(days);
    (days_from_civil(year, month, 1) - PG_EPOCH_DAYS) * MICROS_PER_DAY
}

/// The allowance periods of the billing period [start, end), in order; they
/// cover it exactly, without gaps or overlaps.
pub fn allowance_periods(start: Ts, end: Ts) -> Result<Vec<(Ts, Ts)>, PeriodError> {
    if start == Ts::MIN || end == Ts::MAX || start == Ts::MAX || end == Ts::MIN {
        return Err(PeriodError::Infinite);
    }
    if end <= start {
        return Err(PeriodError::Empty);
    }
    // whole months from the anchor that fit in the period, at least one
    let mut months = 1;
    while add_months(start, months + 1) <= end {
        months += 1;
        if months > MAX_MONTHS {
            return Err(PeriodError::TooLong);
        }
    }
    Ok((0..months)
        .map(|k| {
            let from = add_months(start, k);
            let to = if k + 1 == months {
                end
            } else {
                add_months(start, k + 1)
            };
            (from, to)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UTC instant from its parts, as PostgreSQL stores it.
    fn at(year: i64, month: u32, day: u32, hour: i64) -> Ts {
        (days_from_civil(year, month, day) - PG_EPOCH_DAYS) * MICROS_PER_DAY + hour * 3_600_000_000
    }

    fn date(t: Ts) -> (i64, u32, u32) {
        civil_from_days(t.div_euclid(MICROS_PER_DAY) + PG_EPOCH_DAYS)
    }

    #[test]
    fn the_epochs_line_up() {
        assert_eq!(at(2000, 1, 1, 0), 0, "PostgreSQL's epoch");
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        for days in -800_000..800_000 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn months_keep_the_day_and_time_or_take_the_last_day() {
        let jan31 = at(2027, 1, 31, 9);
        assert_eq!(add_months(jan31, 1), at(2027, 2, 28, 9));
        assert_eq!(
            add_months(jan31, 2),
            at(2027, 3, 31, 9),
            "anchored, not chained"
        );
        assert_eq!(
            add_months(at(2028, 1, 31, 9), 1),
            at(2028, 2, 29, 9),
            "leap year"
        );
        assert_eq!(add_months(at(2028, 2, 29, 0), 12), at(2029, 2, 28, 0));
        assert_eq!(add_months(at(2028, 2, 29, 0), 48), at(2032, 2, 29, 0));
        assert_eq!(add_months(at(2027, 12, 15, 23), 1), at(2028, 1, 15, 23));
        assert_eq!(add_months(at(2027, 3, 31, 0), -1), at(2027, 2, 28, 0));
        assert_eq!(
            add_months(at(1999, 12, 31, 0), 2),
            at(2000, 2, 29, 0),
            "before the epoch"
        );
    }

    #[test]
    fn a_monthly_period_is_one_allowance_however_the_month_end_rolls() {
        for (start, end) in [
            (at(2027, 1, 1, 0), at(2027, 2, 1, 0)),
            (at(2027, 1, 31, 0), at(2027, 2, 28, 0)),
            (at(2027, 1, 31, 0), at(2027, 3, 1, 0)), // rolled past February
            (at(2027, 2, 28, 0), at(2027, 3, 31, 0)),
            (at(2027, 2, 1, 0), at(2027, 3, 1, 0)),  // 28 days
            (at(2027, 5, 3, 0), at(2027, 5, 31, 0)), // a 28-day cycle
            (at(2027, 5, 3, 0), at(2027, 5, 10, 0)), // weekly
            (at(2027, 5, 3, 12), at(2027, 5, 3, 13)),
        ] {
            assert_eq!(allowance_periods(start, end), Ok(vec![(start, end)]));
        }
    }

    #[test]
    fn a_year_is_twelve_monthly_allowances_anchored_on_its_start() {
        let start = at(2027, 1, 31, 8);
        let periods = allowance_periods(start, at(2028, 1, 31, 8)).unwrap();
        assert_eq!(periods.len(), 12);
        let starts: Vec<(i64, u32, u32)> = periods.iter().map(|p| date(p.0)).collect();
        assert_eq!(starts[1], (2027, 2, 28));
        assert_eq!(starts[2], (2027, 3, 31));
        assert_eq!(starts[3], (2027, 4, 30));
        for w in periods.windows(2) {
            assert_eq!(w[0].1, w[1].0, "no gap, no overlap");
        }
        assert_eq!(periods[11].1, at(2028, 1, 31, 8));
    }

    #[test]
    fn an_anniversary_on_29_february_gets_twelve_whichever_way_it_rolls() {
        let start = at(2028, 2, 29, 0);
        for end in [at(2029, 2, 28, 0), at(2029, 3, 1, 0)] {
            let periods = allowance_periods(start, end).unwrap();
            assert_eq!(periods.len(), 12, "ending {:?}", date(end));
            assert_eq!(date(periods[11].0), (2029, 1, 29));
            assert_eq!(periods[11].1, end, "the last one runs to the period's end");
        }
        let quarter = allowance_periods(at(2027, 11, 30, 0), at(2028, 2, 29, 0)).unwrap();
        assert_eq!(
            quarter.iter().map(|p| date(p.0)).collect::<Vec<_>>(),
            vec![(2027, 11, 30), (2027, 12, 30), (2028, 1, 30)]
        );
    }

    #[test]
    fn bad_periods_are_refused() {
        let t = at(2027, 1, 1, 0);
        assert_eq!(allowance_periods(t, t), Err(PeriodError::Empty));
        assert_eq!(allowance_periods(t, t - 1), Err(PeriodError::Empty));
        assert_eq!(allowance_periods(Ts::MIN, t), Err(PeriodError::Infinite));
        assert_eq!(allowance_periods(t, Ts::MAX), Err(PeriodError::Infinite));
        assert_eq!(
            allowance_periods(t, add_months(t, MAX_MONTHS + 1)),
            Err(PeriodError::TooLong)
        );
        assert_eq!(
            allowance_periods(t, add_months(t, MAX_MONTHS)).map(|p| p.len()),
            Ok(MAX_MONTHS as usize)
        );
    }
}
