//! Taking money back from a grant when the payment that funded it is refunded,
//! disputed or voided, and giving it back when a dispute is won. Pure
//! arithmetic: the facts of one grant in, the adjustment out.
//!
//! The rule: a reversal of `total` (capped at what the grant gave) takes the
//! grant's unspent credit first; what it cannot take that way becomes debt
//! only for the part the customer actually used and did not pay for, i.e.
//! `debt = total − (amount − consumed)`, never below 0 and never above what
//! was consumed. Credit that expired unused absorbs a reversal before any debt
//! arises, and a customer never owes more than they used. Applying the same
//! total twice changes nothing; a lower total than before (a won dispute)
//! gives the difference back, unless the grant was closed (voided or revoked),
//! which is final.

/// What the ledger says about one grant, in the pool's unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GrantFacts {
    /// What the grant gave.
    pub amount: i64,
    /// What is left of it now (expired credit already recorded as expired).
    pub remaining: i64,
    /// What debits and debt repayments drained from it, less what a reversal
    /// gave back as credit for debt the customer had already repaid.
    pub consumed: i64,
    /// Unspent credit removed by reversals, voids and revokes, less what was returned.
    pub removed: i64,
    /// Debt created against this grant by reversals and voids, less what was returned.
    pub debt: i64,
    /// Voided or revoked: a reversal may still take more, never give back.
    pub closed: bool,
}

/// How to bring a grant to a reversal total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Adjustment {
    /// Unspent credit to remove from the grant.
    pub take_unspent: i64,
    /// Debt to record against the grant.
    pub add_debt: i64,
    /// Removed credit to put back on the grant.
    pub return_unspent: i64,
    /// Debt recorded against the grant to cancel (or, once repaid, to credit back).
    pub return_debt: i64,
}

impl Adjustment {
    pub fn is_none(&self) -> bool {
        *self == Adjustment::default()
    }
}

/// The total a reversal may reach: at most what the grant gave.
pub fn capped_total(facts: &GrantFacts, total: i64) -> i64 {
    total.clamp(0, facts.amount)
}

/// What brings `facts` to a reversal of `total`.
pub fn adjust(facts: &GrantFacts, total: i64) -> Adjustment {
    let total = capped_total(facts, total);
    let consumed = facts.consumed.clamp(0, facts.amount);
    let unconsumed = facts.amount - consumed;
    let want_debt = (total - unconsumed).clamp(0, consumed);
    let want_removed = (total - want_debt).min(facts.removed + facts.remaining);
    let mut a = Adjustment {
        take_unspent: (want_removed - facts.removed).max(0),
        add_debt: (want_debt - facts.debt).max(0),
        ..Adjustment::default()
    };
    if !facts.closed {
        a.return_unspent = (facts.removed - want_removed).max(0);
        a.return_debt = (facts.debt - want_debt).max(0);
    }
    a
}

/// A void: everything the grant gave is taken back, as a reversal of its
/// whole amount (unspent credit removed, what was used becomes debt).
pub fn void(facts: &GrantFacts) -> Adjustment {
    adjust(facts, facts.amount)
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn facts(amount: i64, remaining: i64, consumed: i64) -> GrantFacts {
        GrantFacts {
            amount,
            remaining,
            consumed,
            ..GrantFacts::default()
        }
    }

    /// Apply an adjustment the way the ledger does, for chained cases.
    fn applied(mut f: GrantFacts, a: Adjustment, pool_debt: &mut i64) -> GrantFacts {
        f.remaining -= a.take_unspent;
        f.removed += a.take_unspent;
        f.debt += a.add_debt;
        *pool_debt += a.add_debt;
        f.remaining += a.return_unspent;
        f.removed -= a.return_unspent;
        f.debt -= a.return_debt;
        let cancelled = a.return_debt.min(*pool_debt);
        *pool_debt -= cancelled;
        let credited = a.return_debt - cancelled;
        f.remaining += credited;
        f.consumed -= credited;
        f
    }

    #[test]
    fn unspent_credit_goes_first_then_debt_for_what_was_used() {
        let f = facts(1000, 300, 700);
        let a = adjust(&f, 400);
        assert_eq!((a.take_unspent, a.add_debt), (300, 100));
        let a = adjust(&f, 1000);
        assert_eq!((a.take_unspent, a.add_debt), (300, 700));
    }

    #[test]
    fn the_total_is_capped_at_what_the_grant_gave() {
        let f = facts(100, 100, 0);
        assert_eq!(adjust(&f, 1_000_000).take_unspent, 100);
        assert_eq!(adjust(&f, 1_000_000).add_debt, 0);
        assert_eq!(adjust(&f, -5), Adjustment::default());
    }

    #[test]
    fn the_same_total_twice_changes_nothing() {
        let mut debt = 0;
        let f = applied(
            facts(1000, 300, 700),
            adjust(&facts(1000, 300, 700), 400),
            &mut debt,
        );
        assert!(adjust(&f, 400).is_none());
        let g = applied(f, adjust(&f, 1000), &mut debt);
        assert_eq!(debt, 700);
        assert!(adjust(&g, 1000).is_none());
    }

    #[test]
    fn void_then_refund_takes_back_once() {
        let mut debt = 0;
        let f = facts(1000, 700, 300);
        let mut voided = applied(f, void(&f), &mut debt);
        voided.closed = true;
        assert_eq!(debt, 300, "the void turns what was used into debt");
        assert!(adjust(&voided, 1000).is_none(), "the refund finds it taken");
    }

    #[test]
    fn refund_then_void_adds_only_the_rest() {
        let mut debt = 0;
        let f = facts(1000, 700, 300);
        let refunded = applied(f, adjust(&f, 500), &mut debt);
        assert_eq!((refunded.remaining, debt), (200, 0));
        let v = void(&refunded);
        assert_eq!((v.take_unspent, v.add_debt), (200, 300));
    }

    #[test]
    fn expired_credit_absorbs_a_refund_before_any_debt() {
        // 1000 paid, 300 used, 700 expired unused: remaining 0
        let f = facts(1000, 0, 300);
        assert_eq!(adjust(&f, 500), Adjustment::default());
        assert_eq!(adjust(&f, 1000).add_debt, 300);
        let unused = facts(1000, 0, 0);
        assert!(
            adjust(&unused, 1000).is_none(),
            "nothing used, nothing owed"
        );
    }

    #[test]
    fn a_won_dispute_gives_back_what_the_dispute_took() {
        let mut debt = 0;
        let f = facts(1000, 400, 600);
        let disputed = applied(f, adjust(&f, 1000), &mut debt);
        assert_eq!((disputed.remaining, debt), (0, 600));
        let won = applied(disputed, adjust(&disputed, 0), &mut debt);
        assert_eq!((won.remaining, debt), (400, 0));
        assert_eq!(won, f);
    }

    #[test]
    fn a_won_dispute_after_the_debt_was_repaid_credits_it_back() {
        let mut debt = 0;
        let f = facts(1000, 0, 1000);
        let disputed = applied(f, adjust(&f, 1000), &mut debt);
        debt = 0; // another top-up repaid the debt
        let won = applied(disputed, adjust(&disputed, 0), &mut debt);
        assert_eq!((won.remaining, won.consumed, debt), (1000, 0, 0));
        // and a later refund of the whole payment takes it again
        let a = adjust(&won, 1000);
        assert_eq!((a.take_unspent, a.add_debt), (1000, 0));
    }

    #[test]
    fn a_closed_grant_never_gives_back() {
        let mut f = facts(1000, 0, 300);
        f.removed = 700;
        f.debt = 300;
        f.closed = true;
        assert!(adjust(&f, 0).is_none());
    }

    /// Exhaustive over small grants: every invariant of the rule holds.
    #[test]
    fn invariants_hold_for_every_small_case() {
        for amount in 1..=6 {
            for consumed in 0..=amount {
                for remaining in 0..=(amount - consumed) {
                    for first in 0..=amount + 1 {
                        for second in 0..=amount + 1 {
                            let f = facts(amount, remaining, consumed);
                            let mut debt = 0;
                            let g = applied(f, adjust(&f, first), &mut debt);
                            let h = applied(g, adjust(&g, second), &mut debt);
                            let direct = applied(f, adjust(&f, second), &mut 0);
                            let total = second.min(amount);
                            assert!(h.remaining >= 0 && h.remaining <= amount);
                            assert!(h.debt <= consumed, "owes at most what was used");
                            assert!(h.removed + h.debt <= total, "never more than the total");
                            assert_eq!(
                                (h.remaining, h.debt, h.removed),
                                (direct.remaining, direct.debt, direct.removed),
                                "the path to a total does not matter: {f:?} {first} {second}"
                            );
                            assert!(adjust(&h, second).is_none());
                        }
                    }
                }
            }
        }
    }
}
