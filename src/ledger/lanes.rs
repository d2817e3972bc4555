//! Which lane of a split pool a debit takes alone: pure rules over the
//! pool's rows as read, tested without a database. The store locks the lane
//! chosen and checks it again in the version locked (`PoolLedger::lock_share`).

use super::{Figures, PoolRow};
use crate::direct::Waiting;
use crate::error::{BillingError, Result};
use crate::time::Ts;

/// A row's cached figures as written, whatever its window; a lane keeps
/// no floor of its own (the pool's is on its own row).
fn as_written(row: &PoolRow) -> Figures {
    Figures {
        balance: row.active_remaining,
        held: row.active_held,
        debt: row.debt,
        floor: 0,
    }
}

/// Whether lane row `row` can pay `cost` alone at `now`: a lane (not the
/// pool's own row) inside its cached window whose spendable figures cover it.
pub fn pays_alone(row: &PoolRow, cost: i64, now: Ts) -> bool {
    row.lane > 0 && now < row.cache_until && as_written(row).allows(cost)
}

/// The lanes of a pool (`rows`: its own row and its lanes, as read) to try
/// for a debit of `cost`, in order, as positions in `rows`. Skipping
/// (`Waiting::Skip`): every lane that can pay, in lane order, for the first
/// one free. Waiting: only the lane this backend (`pid`) waits for, so
/// waiting backends spread over the lanes.
pub fn to_try(rows: &[PoolRow], cost: i64, now: Ts, waiting: Waiting, pid: i32) -> Vec<usize> {
    let waited = match waiting {
        Waiting::Skip => None,
        Waiting::Block => {
            let lanes = own_row(rows).map_or(0, |r| r.lanes);
            Some(1 + pid.rem_euclid(lanes.max(1)))
        }
    };
    rows.iter()
        .enumerate()
        .filter(|(_, r)| waited.is_none_or(|lane| r.lane == lane))
        .filter(|(_, r)| pays_alone(r, cost, now))
        .map(|(i, _)| i)
        .collect()
}

/// What the rows of a pool other than `rows[taken]` hold, by their cached
/// figures as written, with the pool's floor (its own row's).
pub fn others(rows: &[PoolRow], taken: usize) -> Result<Figures> {
    let overflow = || BillingError::Overflow("the figures of a split pool's other lanes".into());
    let mut f = Figures {
        floor: own_row(rows).map_or(0, |r| r.floor),
        ..Figures::default()
    };
    for (_, r) in rows.iter().enumerate().filter(|(i, _)| *i != taken) {
        let w = as_written(r);
        f.balance = f.balance.checked_add(w.balance).ok_or_else(overflow)?;
        f.held = f.held.checked_add(w.held).ok_or_else(overflow)?;
        f.debt = f.debt.checked_add(w.debt).ok_or_else(overflow)?;
    }
    Ok(f)
}

/// The pool's own row (lane 0) among its rows.
fn own_row(rows: &[PoolRow]) -> Option<&PoolRow> {
    rows.iter().find(|r| r.lane == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{AlertBounds, Drawn};

    const NOW: Ts = 1_000;

    fn row(lane: i32, remaining: i64, held: i64, debt: i64, until: Ts) -> PoolRow {
        PoolRow {
            id: 100 + i64::from(lane),
            lane,
            lanes: if lane == 0 { 3 } else { 0 },
            floor: if lane == 0 { -50 } else { 0 },
            version: 1,
            remaining,
            debt,
            held,
            active_remaining: remaining,
            active_held: held,
            cache_from: 0,
            cache_until: until,
            allowance_next: Ts::MAX,
            limited: false,
            reload_below: None,
            alerts: AlertBounds::default(),
            counter: None,
            at: None,
            drawn: Drawn::default(),
        }
    }

    fn pool() -> Vec<PoolRow> {
        vec![
            row(0, 7, 0, 0, Ts::MAX),
            row(1, 5, 0, 0, 2_000),
            row(2, 30, 10, 0, 2_000),
            row(3, 40, 0, 0, 2_000),
        ]
    }

    #[test]
    fn skipping_tries_every_lane_that_can_pay_in_lane_order() {
        // lane 1 has 5; lane 2 has 30 less 10 held: exactly 20
        assert_eq!(to_try(&pool(), 20, NOW, Waiting::Skip, 7), vec![2, 3]);
    }

    #[test]
    fn the_rest_of_the_pool_is_every_other_row_with_the_pool_s_floor() {
        assert_eq!(
            others(&pool(), 2).unwrap(),
            Figures {
                balance: 7 + 5 + 40,
                held: 0,
                debt: 0,
                floor: -50
            }
        );
    }

    #[test]
    fn a_waiting_backend_waits_for_its_own_lane_only() {
        // 3 lanes: pid 7 waits for lane 1 + 7 % 3 = 2
        assert_eq!(to_try(&pool(), 1, NOW, Waiting::Block, 7), vec![2]);
        // pid 8: lane 3
        assert_eq!(to_try(&pool(), 1, NOW, Waiting::Block, 8), vec![3]);
        // its lane cannot pay: nothing to wait for
        assert!(to_try(&pool(), 35, NOW, Waiting::Block, 7).is_empty());
    }

    #[test]
    fn a_lane_past_its_cached_window_or_in_debt_does_not_pay_alone() {
        let mut rows = pool();
        assert!(pays_alone(&rows[3], 40, NOW));
        assert!(!pays_alone(&rows[3], 40, 2_000));
        rows[3].debt = 1;
        assert!(!pays_alone(&rows[3], 40, NOW));
        // the pool's own row never does
        assert!(!pays_alone(&rows[0], 1, NOW));
    }

    #[test]
    fn others_figures_that_overflow_are_an_error() {
        let mut rows = pool();
        rows[0].active_remaining = i64::MAX;
        assert!(others(&rows, 2).is_err());
    }
}
