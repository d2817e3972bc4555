//! Which lane of a split pool a debit takes alone: pure rules over the
//! pool's rows as read, tested without a database. The store locks the lane
//! chosen and checks it again in the version locked (`PoolLedger::lock_share`).

use super::{Figures, PoolRow};
use crate::direct::Waiting;
use crate::error::{BillingError, Result};
use crate::time::Ts;

/// Whether lane row `row` can pay `cost` alone at `now`: a lane (not the
/// pool's own row) inside its cached window whose spendable figures cover it.
pub fn pays_alone(row: &PoolRow, cost: i64, now: Ts) -> bool {
    row.lane > 0
        && now < row.cache_until
        && i128::from(row.active_remaining) - i128::from(row.active_held) - i128::from(row.debt)
            >= i128::from(cost)
}

/// The lanes of a pool (`rows`: its own row and its lanes, as read) to try
/// for a debit of `cost`, in order, each with the figures of the rest of the
/// pool: the other rows' cached figures and the pool's floor. Skipping
/// (`Waiting::Skip`): every lane that can pay, in lane order, for the first
/// one free. Waiting: only the lane this backend (`pid`) waits for, so
/// waiting backends spread over the lanes.
pub fn to_try(
    rows: &[PoolRow],
    cost: i64,
    now: Ts,
    waiting: Waiting,
    pid: i32,
) -> Result<Vec<(usize, Figures)>> {
    let waited = match waiting {
        Waiting::Skip => None,
        Waiting::Block => {
            let lanes = rows.iter().find(|r| r.lane == 0).map_or(0, |r| r.lanes);
            Some(1 + pid.rem_euclid(lanes.max(1)))
        }
    };
    rows.iter()
        .enumerate()
        .filter(|(_, r)| waited.is_none_or(|lane| r.lane == lane))
        .filter(|(_, r)| pays_alone(r, cost, now))
        .map(|(i, _)| Ok((i, others(rows, i)?)))
        .collect()
}

/// What the rows of a pool other than `rows[taken]` hold, by their cached
/// figures as written, with the pool's floor (its own row's).
fn others(rows: &[PoolRow], taken: usize) -> Result<Figures> {
    let overflow = || BillingError::Overflow("the figures of a split pool's other lanes".into());
    let mut f = Figures {
        floor: rows.iter().find(|r| r.lane == 0).map_or(0, |r| r.floor),
        ..Figures::default()
    };
    for r in rows
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != taken)
        .map(|(_, r)| r)
    {
        f.balance = f
            .balance
            .checked_add(r.active_remaining)
            .ok_or_else(overflow)?;
        f.held = f.held.checked_add(r.active_held).ok_or_else(overflow)?;
        f.debt = f.debt.checked_add(r.debt).ok_or_else(overflow)?;
    }
    Ok(f)
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
        let tried: Vec<usize> = to_try(&pool(), 20, NOW, Waiting::Skip, 7)
            .unwrap()
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        // lane 1 has 5; lane 2 has 30 less 10 held: exactly 20
        assert_eq!(tried, vec![2, 3]);
    }

    #[test]
    fn the_rest_of_the_pool_is_every_other_row_with_the_pool_s_floor() {
        let tried = to_try(&pool(), 20, NOW, Waiting::Skip, 7).unwrap();
        let (_, others) = tried[0];
        assert_eq!(
            others,
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
        let tried = to_try(&pool(), 1, NOW, Waiting::Block, 7).unwrap();
        assert_eq!(tried.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![2]);
        // pid 8: lane 3
        let tried = to_try(&pool(), 1, NOW, Waiting::Block, 8).unwrap();
        assert_eq!(tried.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![3]);
        // its lane cannot pay: nothing to wait for
        assert!(to_try(&pool(), 35, NOW, Waiting::Block, 7)
            .unwrap()
            .is_empty());
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
        assert!(to_try(&rows, 20, NOW, Waiting::Skip, 7).is_err());
    }
}
