//! Model-based property test of the ledger core.
//!
//! Random sequences of grants, debits (strict or not), holds, settles,
//! releases, voids, revokes, suspensions, resumptions and clock advances run twice: through the core,
//! behind a simulated store that keeps rows and entries exactly as the
//! database layer does (cached figures, hold loading, flushes), and through a
//! small reference model written for obviousness, not speed. After every step
//! the outcomes, balances, debt and every grant's credit agree, the gate's
//! answer (cached or recomputed) agrees, and the ledger invariants hold:
//! entries chain, every grant and hold sums to its row, the pool's booked
//! totals equal its entries, and strict spending never crosses the floor.

use proptest::prelude::*;

use super::*;
use crate::reversal;

const START: Ts = 1_000_000;

#[derive(Debug, Clone)]
enum Op {
    Grant {
        amount: i64,
        priority: i32,
        starts_in: i64,
        lasts: Option<i64>,
    },
    Debit {
        amount: i64,
        strict: bool,
    },
    Reserve {
        amount: i64,
        ttl: i64,
    },
    Settle {
        hold: usize,
        actual: i64,
    },
    Release {
        hold: usize,
    },
    Void {
        grant: usize,
    },
    Revoke {
        grant: usize,
    },
    Suspend {
        grant: usize,
    },
    Resume {
        grant: usize,
    },
    Advance {
        by: i64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1i64..120, prop::sample::select(vec![10, 50, 90]), prop::sample::select(vec![0i64, 0, 0, 5, 20]),
              prop::option::of(1i64..60))
            .prop_map(|(amount, priority, starts_in, lasts)| Op::Grant { amount, priority, starts_in, lasts }),
        4 => (0i64..150, any::<bool>()).prop_map(|(amount, strict)| Op::Debit { amount, strict }),
        2 => (1i64..80, 1i64..40).prop_map(|(amount, ttl)| Op::Reserve { amount, ttl }),
        2 => (0usize..8, 0i64..120).prop_map(|(hold, actual)| Op::Settle { hold, actual }),
        1 => (0usize..8).prop_map(|hold| Op::Release { hold }),
        1 => (0usize..10).prop_map(|grant| Op::Void { grant }),
        1 => (0usize..10).prop_map(|grant| Op::Revoke { grant }),
        1 => (0usize..10).prop_map(|grant| Op::Suspend { grant }),
        1 => (0usize..10).prop_map(|grant| Op::Resume { grant }),
        3 => (0i64..25).prop_map(|by| Op::Advance { by }),
    ]
}

/// What an operation returned, compared between the core and the model.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Granted { repaid: i64 },
    Debited(Debit),
    Rejected,
    Reserved,
    Settled(Debit),
    Released,
    AlreadyExpired,
    Duplicate,
    WrongState,
    Closed { removed: i64, debt: i64 },
    Suspended,
    Resumed { repaid: i64 },
    Nothing,
}

// ----- the store, simulated as the database layer keeps it ---------------------

#[derive(Debug, Clone)]
struct GrantRow {
    id: i64,
    priority: i32,
    amount: i64,
    remaining: i64,
    effective_at: Ts,
    expires_at: Option<Ts>,
    status: &'static str,
}

#[derive(Debug, Clone)]
struct HoldRow {
    id: i64,
    amount: i64,
    expires_at: Ts,
    status: &'static str,
}

struct Store {
    now: Ts,
    floor: i64,
    booked: Booked,
    active_remaining: i64,
    active_held: i64,
    cache_from: Ts,
    cache_until: Ts,
    grants: Vec<GrantRow>,
    holds: Vec<HoldRow>,
    entries: Vec<Entry>,
    next_id: i64,
}

impl Store {
    fn new(floor: i64) -> Store {
        Store {
            now: START,
            floor,
            booked: Booked::default(),
            active_remaining: 0,
            active_held: 0,
            cache_from: Ts::MIN,
            cache_until: Ts::MAX,
            grants: Vec::new(),
            holds: Vec::new(),
            entries: Vec::new(),
            next_id: 1,
        }
    }

    /// Lock and load: the grants that hold credit; the open holds only
    /// outside the cached window.
    fn open(&self) -> Pool {
        let grants = self
            .grants
            .iter()
            .filter(|g| g.status == "active" && g.remaining > 0)
            .map(|g| GrantState::new(g.id, g.priority, g.remaining, g.effective_at, g.expires_at))
            .collect();
        let holds = if cache_valid(self.cache_from, self.cache_until, self.now) {
            Holds::Cached {
                active_held: self.active_held,
                until: self.cache_until,
            }
        } else {
            Holds::Loaded(self.open_holds())
        };
        Pool::open(
            self.booked,
            self.floor,
            self.cache_from,
            self.now,
            grants,
            holds,
        )
    }

    fn open_holds(&self) -> Vec<OpenHold> {
        self.holds
            .iter()
            .filter(|h| h.status == "open")
            .map(|h| OpenHold {
                id: h.id,
                amount: h.amount,
                expires_at: h.expires_at,
            })
            .collect()
    }

    fn flush(&mut self, pool: &mut Pool) {
        if !pool.is_changed() {
            return;
        }
        for (id, remaining) in pool.dirty_grants() {
            self.grant_mut(id).remaining = remaining;
        }
        for id in pool.expired_holds() {
            self.hold_mut(*id).status = "expired";
        }
        self.entries.extend(pool.entries().iter().cloned());
        self.booked = pool.booked();
        self.active_remaining = pool.active_remaining();
        self.active_held = pool.active_held();
        self.cache_from = self.now;
        self.cache_until = pool.cache_until();
        pool.written();
    }

    /// The gate: cached figures inside the window, recomputed outside it.
    fn gate(&self) -> Figures {
        if cache_valid(self.cache_from, self.cache_until, self.now) {
            return Figures {
                balance: self.active_remaining,
                held: self.active_held,
                debt: self.booked.debt,
                floor: self.floor,
            };
        }
        self.open().figures()
    }

    fn grant_mut(&mut self, id: i64) -> &mut GrantRow {
        self.grants.iter_mut().find(|g| g.id == id).unwrap()
    }

    fn hold_mut(&mut self, id: i64) -> &mut HoldRow {
        self.holds.iter_mut().find(|h| h.id == id).unwrap()
    }

    fn facts(&self, id: i64) -> reversal::GrantFacts {
        let g = self.grants.iter().find(|g| g.id == id).unwrap();
        grant_facts(
            g.amount,
            g.remaining,
            grant_is_closed(g.status),
            self.entries
                .iter()
                .filter(|e| e.grant_id == Some(id))
                .map(|e| (e.kind, e.grant_amount, e.debt_amount)),
        )
    }

    fn apply(&mut self, op: &Op) -> Outcome {
        let mut pool = self.open();
        match *op {
            Op::Grant {
                amount,
                priority,
                starts_in,
                lasts,
            } => {
                let id = self.take_id();
                let effective_at = self.now + starts_in;
                let expires_at = lasts.map(|l| effective_at + l);
                self.grants.push(GrantRow {
                    id,
                    priority,
                    amount,
                    remaining: amount,
                    effective_at,
                    expires_at,
                    status: "active",
                });
                let grant = GrantState::new(id, priority, amount, effective_at, expires_at);
                let repaid = pool.add_grant(grant).unwrap();
                self.flush(&mut pool);
                Outcome::Granted { repaid }
            }
            Op::Debit { amount, strict } => {
                if strict && !pool.allows(amount) {
                    return Outcome::Rejected; // raised: nothing is written
                }
                let debit = pool.debit(amount).unwrap();
                self.flush(&mut pool);
                Outcome::Debited(debit)
            }
            Op::Reserve { amount, ttl } => {
                if !pool.allows(amount) {
                    return Outcome::Rejected;
                }
                let id = self.take_id();
                let expires_at = self.now + ttl;
                self.holds.push(HoldRow {
                    id,
                    amount,
                    expires_at,
                    status: "open",
                });
                pool.open_hold(id, amount, expires_at).unwrap();
                self.flush(&mut pool);
                Outcome::Reserved
            }
            Op::Settle { hold, actual } => {
                let Some(h) = self.holds.get(hold).cloned() else {
                    return Outcome::Nothing;
                };
                let expired =
                    h.status == "expired" || (h.status == "open" && h.expires_at <= self.now);
                match h.status {
                    "settled" => return Outcome::Duplicate,
                    "released" => return Outcome::WrongState,
                    _ => {}
                }
                if !expired {
                    pool.close_hold(h.id, h.amount, EntryKind::Settle, true);
                }
                pool.current_hold = Some(h.id);
                let debit = pool.debit(actual).unwrap();
                self.flush(&mut pool);
                self.hold_mut(h.id).status = "settled";
                Outcome::Settled(debit)
            }
            Op::Release { hold } => {
                let Some(h) = self.holds.get(hold).cloned() else {
                    return Outcome::Nothing;
                };
                match h.status {
                    "open" if h.expires_at > self.now => {
                        pool.close_hold(h.id, h.amount, EntryKind::Release, true);
                        self.flush(&mut pool);
                        self.hold_mut(h.id).status = "released";
                        Outcome::Released
                    }
                    "open" | "expired" => {
                        self.flush(&mut pool);
                        Outcome::AlreadyExpired
                    }
                    "released" => Outcome::Duplicate,
                    _ => Outcome::WrongState,
                }
            }
            Op::Void { grant } | Op::Revoke { grant } => {
                let Some(id) = self.grants.get(grant).map(|g| g.id) else {
                    return Outcome::Nothing;
                };
                let void = matches!(op, Op::Void { .. });
                self.flush(&mut pool); // the catch-up's entries count in the facts
                let status = self.grants[grant].status;
                if status == if void { "voided" } else { "revoked" } {
                    return Outcome::Duplicate;
                }
                if grant_is_closed(status) {
                    return Outcome::WrongState;
                }
                if status == "suspended" {
                    pool.insert_in_drain_order(self.grant_state(grant));
                }
                let facts = self.facts(id);
                let a = if void {
                    reversal::void(&facts)
                } else {
                    reversal::Adjustment {
                        take_unspent: facts.remaining,
                        ..Default::default()
                    }
                };
                let kind = if void {
                    EntryKind::Void
                } else {
                    EntryKind::Revoke
                };
                pool.adjust_grant(id, &a, kind).unwrap();
                self.flush(&mut pool);
                self.grants[grant].status = if void { "voided" } else { "revoked" };
                Outcome::Closed {
                    removed: a.take_unspent,
                    debt: a.add_debt,
                }
            }
            Op::Suspend { grant } => {
                let Some(id) = self.grants.get(grant).map(|g| g.id) else {
                    return Outcome::Nothing;
                };
                self.flush(&mut pool);
                match self.grants[grant].status {
                    "suspended" => return Outcome::Duplicate,
                    "active" => {}
                    _ => return Outcome::WrongState,
                }
                if !pool.has_grant(id) {
                    // without credit it is not loaded; it is suspended all the same
                    pool.insert_in_drain_order(self.grant_state(grant));
                }
                assert!(pool.suspend(id));
                self.flush(&mut pool);
                self.grants[grant].status = "suspended";
                Outcome::Suspended
            }
            Op::Resume { grant } => {
                let Some(id) = self.grants.get(grant).map(|g| g.id) else {
                    return Outcome::Nothing;
                };
                self.flush(&mut pool);
                match self.grants[grant].status {
                    "active" => return Outcome::Duplicate,
                    "suspended" => {}
                    _ => return Outcome::WrongState,
                }
                pool.insert_in_drain_order(self.grant_state(grant));
                let repaid = pool.resume(id).unwrap();
                self.flush(&mut pool);
                self.grants[grant].status = "active";
                Outcome::Resumed { repaid }
            }
            Op::Advance { by } => {
                self.now += by;
                Outcome::Nothing
            }
        }
    }

    /// A grant's row as the store loads one by id, whatever its status.
    fn grant_state(&self, index: usize) -> GrantState {
        let g = &self.grants[index];
        GrantState::new(g.id, g.priority, g.remaining, g.effective_at, g.expires_at)
            .with_suspended(g.status == "suspended")
    }

    fn take_id(&mut self) -> i64 {
        self.next_id += 1;
        self.next_id
    }

    /// Every invariant of the ledger, checked on the stored rows.
    fn check_invariants(&self) {
        let mut before = (0i64, 0i64, 0i64);
        for (n, e) in self.entries.iter().enumerate() {
            assert_eq!(e.version, n as i64 + 1, "versions run 1..n without gaps");
            assert_eq!(e.balance_before, before.0, "balance_before chains: {e:?}");
            assert_eq!(e.balance_before + e.amount, e.balance_after);
            assert_eq!(e.amount, e.grant_amount - e.debt_amount);
            assert_eq!(e.debt_after, before.1 + e.debt_amount, "debt chains");
            assert_eq!(e.held_after, before.2 + e.hold_amount, "held chains");
            assert!(e.debt_after >= 0 && e.held_after >= 0);
            assert!(e.grant_amount == 0 || e.grant_id.is_some());
            before = (e.balance_after, e.debt_after, e.held_after);
        }
        for g in &self.grants {
            let sum: i64 = self
                .entries
                .iter()
                .filter(|e| e.grant_id == Some(g.id))
                .map(|e| e.grant_amount)
                .sum();
            assert_eq!(sum, g.remaining, "grant {} sums to its remaining", g.id);
            assert!(g.remaining >= 0 && g.remaining <= g.amount);
            assert!(!grant_is_closed(g.status) || g.remaining == 0);
        }
        for h in &self.holds {
            let sum: i64 = self
                .entries
                .iter()
                .filter(|e| e.hold_id == Some(h.id))
                .map(|e| e.hold_amount)
                .sum();
            let open = if h.status == "open" { h.amount } else { 0 };
            assert_eq!(
                sum, open,
                "hold {} ({}) sums to its open amount",
                h.id, h.status
            );
        }
        // conservation: granted − debited − expired − removed + returned = Σ remaining
        let by_kind = |kinds: &[EntryKind]| -> i64 {
            self.entries
                .iter()
                .filter(|e| kinds.contains(&e.kind))
                .map(|e| e.grant_amount)
                .sum()
        };
        let granted: i64 = self
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::Grant)
            .map(|e| e.grant_amount)
            .sum();
        let total_remaining: i64 = self.grants.iter().map(|g| g.remaining).sum();
        assert_eq!(
            granted
                + by_kind(&[EntryKind::Debit, EntryKind::DebtRepayment])
                + by_kind(&[EntryKind::Expire])
                + by_kind(&[EntryKind::Void, EntryKind::Revoke])
                + by_kind(&[EntryKind::Reinstate, EntryKind::DebtReversal]),
            total_remaining
        );
        let last = self.entries.last();
        assert_eq!(self.booked.version, self.entries.len() as i64);
        assert_eq!(self.booked.remaining, total_remaining);
        assert_eq!(self.booked.debt, last.map_or(0, |e| e.debt_after));
        assert_eq!(self.booked.held, last.map_or(0, |e| e.held_after));
        assert_eq!(
            last.map_or(0, |e| e.balance_after),
            self.booked.remaining - self.booked.debt
        );
    }
}

// ----- the reference model ------------------------------------------------------

#[derive(Debug, Clone)]
struct MGrant {
    priority: i32,
    remaining: i64,
    effective_at: Ts,
    expires_at: Option<Ts>,
    status: &'static str,
    /// What usage and debt repayment took from it.
    used: i64,
}

#[derive(Debug, Clone)]
struct MHold {
    amount: i64,
    expires_at: Ts,
    status: &'static str,
}

/// The rules, written directly: a grant is spendable while it has credit, is
/// effective and is not yet expired; spending takes the spendable grants by
/// (priority, expiry with none last, age); what they cannot give is debt,
/// which the next spendable credit repays first.
struct Model {
    now: Ts,
    floor: i64,
    debt: i64,
    grants: Vec<(i64, MGrant)>,
    holds: Vec<MHold>,
}

impl Model {
    fn spendable(&self, g: &MGrant) -> bool {
        g.status == "active"
            && g.remaining > 0
            && g.effective_at <= self.now
            && g.expires_at.is_none_or(|e| self.now < e)
    }

    fn available(&self) -> i128 {
        let credit: i64 = self
            .grants
            .iter()
            .filter(|(_, g)| self.spendable(g))
            .map(|(_, g)| g.remaining)
            .sum();
        let held: i64 = self
            .holds
            .iter()
            .filter(|h| h.status == "open")
            .map(|h| h.amount)
            .sum();
        credit as i128 - held as i128 - self.debt as i128
    }

    fn allows(&self, amount: i64) -> bool {
        self.available() - amount as i128 >= self.floor as i128
    }

    /// Time passes: expired credit is gone, expired holds are closed, and
    /// debt takes whatever is spendable now.
    fn pass_time(&mut self) {
        let now = self.now;
        for (_, g) in &mut self.grants {
            // a suspended grant's expiry is recorded once it is resumed or closed
            if g.status != "suspended" && g.expires_at.is_some_and(|e| e <= now) {
                g.remaining = 0;
            }
        }
        for h in &mut self.holds {
            if h.status == "open" && h.expires_at <= now {
                h.status = "expired";
            }
        }
        self.repay();
    }

    fn take(&mut self, amount: i64) -> Vec<Drain> {
        let mut order: Vec<usize> = (0..self.grants.len())
            .filter(|i| self.spendable(&self.grants[*i].1))
            .collect();
        order.sort_by_key(|i| {
            let (id, g) = &self.grants[*i];
            (g.priority, g.expires_at.unwrap_or(Ts::MAX), *id)
        });
        let mut left = amount;
        let mut drains = Vec::new();
        for i in order {
            if left == 0 {
                break;
            }
            let (id, g) = &mut self.grants[i];
            let part = left.min(g.remaining);
            g.remaining -= part;
            g.used += part;
            left -= part;
            drains.push(Drain {
                grant_id: *id,
                amount: part,
            });
        }
        drains
    }

    fn repay(&mut self) -> i64 {
        let repaid: i64 = self.take(self.debt).iter().map(|d| d.amount).sum();
        self.debt -= repaid;
        repaid
    }

    fn spend(&mut self, amount: i64) -> Debit {
        if amount == 0 {
            return Debit::default();
        }
        let drains = self.take(amount);
        let covered: i64 = drains.iter().map(|d| d.amount).sum();
        self.debt += amount - covered;
        Debit {
            drains,
            covered,
            uncovered: amount - covered,
        }
    }

    fn apply(&mut self, op: &Op, ids: &[i64]) -> Outcome {
        self.pass_time();
        match *op {
            Op::Grant {
                amount,
                priority,
                starts_in,
                lasts,
            } => {
                let effective_at = self.now + starts_in;
                let id = *ids.last().unwrap();
                self.grants.push((
                    id,
                    MGrant {
                        priority,
                        remaining: amount,
                        effective_at,
                        expires_at: lasts.map(|l| effective_at + l),
                        status: "active",
                        used: 0,
                    },
                ));
                let before = amount;
                self.repay();
                let after = self.grants.last().unwrap().1.remaining;
                Outcome::Granted {
                    repaid: before - after,
                }
            }
            Op::Debit { amount, strict } => {
                if strict && !self.allows(amount) {
                    return Outcome::Rejected;
                }
                Outcome::Debited(self.spend(amount))
            }
            Op::Reserve { amount, ttl } => {
                if !self.allows(amount) {
                    return Outcome::Rejected;
                }
                self.holds.push(MHold {
                    amount,
                    expires_at: self.now + ttl,
                    status: "open",
                });
                Outcome::Reserved
            }
            Op::Settle { hold, actual } => {
                let Some(h) = self.holds.get_mut(hold) else {
                    return Outcome::Nothing;
                };
                match h.status {
                    "settled" => return Outcome::Duplicate,
                    "released" => return Outcome::WrongState,
                    _ => h.status = "settled",
                }
                Outcome::Settled(self.spend(actual))
            }
            Op::Release { hold } => {
                let Some(h) = self.holds.get_mut(hold) else {
                    return Outcome::Nothing;
                };
                match h.status {
                    "open" => {
                        h.status = "released";
                        Outcome::Released
                    }
                    "expired" => Outcome::AlreadyExpired,
                    "released" => Outcome::Duplicate,
                    _ => Outcome::WrongState,
                }
            }
            Op::Void { grant } | Op::Revoke { grant } => {
                let void = matches!(op, Op::Void { .. });
                let Some((_, g)) = self.grants.get_mut(grant) else {
                    return Outcome::Nothing;
                };
                if g.status == if void { "voided" } else { "revoked" } {
                    return Outcome::Duplicate;
                }
                if grant_is_closed(g.status) {
                    return Outcome::WrongState;
                }
                // A void takes back everything the grant gave: its credit, and
                // what was spent from it becomes debt. A revoke takes the credit.
                let removed = g.remaining;
                let debt = if void { g.used } else { 0 };
                g.remaining = 0;
                g.status = if void { "voided" } else { "revoked" };
                self.debt += debt;
                self.repay();
                Outcome::Closed { removed, debt }
            }
            Op::Suspend { grant } => {
                let Some((_, g)) = self.grants.get_mut(grant) else {
                    return Outcome::Nothing;
                };
                match g.status {
                    "suspended" => Outcome::Duplicate,
                    "active" => {
                        g.status = "suspended";
                        Outcome::Suspended
                    }
                    _ => Outcome::WrongState,
                }
            }
            Op::Resume { grant } => {
                let Some((_, g)) = self.grants.get_mut(grant) else {
                    return Outcome::Nothing;
                };
                match g.status {
                    "active" => Outcome::Duplicate,
                    "suspended" => {
                        g.status = "active";
                        let debt = self.debt;
                        self.pass_time();
                        Outcome::Resumed {
                            repaid: debt - self.debt,
                        }
                    }
                    _ => Outcome::WrongState,
                }
            }
            Op::Advance { by } => {
                // time passes one instant at a time
                for _ in 0..by {
                    self.now += 1;
                    self.pass_time();
                }
                Outcome::Nothing
            }
        }
    }
}

fn run(floor: i64, ops: &[Op]) -> std::result::Result<(), TestCaseError> {
    let mut store = Store::new(floor);
    let mut model = Model {
        now: START,
        floor,
        debt: 0,
        grants: Vec::new(),
        holds: Vec::new(),
    };
    let mut ids = Vec::new();
    for (step, op) in ops.iter().enumerate() {
        model.pass_time();
        let strict_and_allowed = match *op {
            Op::Debit {
                amount,
                strict: true,
            }
            | Op::Reserve { amount, .. } => model.allows(amount),
            _ => false,
        };
        let core = store.apply(op);
        if matches!(op, Op::Grant { .. }) {
            ids.push(store.next_id);
        }
        let reference = model.apply(op, &ids);
        prop_assert_eq!(&core, &reference, "step {}: {:?}", step, op);
        if strict_and_allowed {
            prop_assert!(
                model.available() >= model.floor as i128,
                "strict spending crossed the floor"
            );
        }
        store.check_invariants();
        model.pass_time();
        let pool = store.open();
        prop_assert_eq!(
            pool.available() as i128,
            model.available(),
            "available after step {}",
            step
        );
        prop_assert_eq!(pool.booked().debt, model.debt, "debt after step {}", step);
        prop_assert_eq!(
            store.gate().available() as i128,
            model.available(),
            "gate after step {}",
            step
        );
        prop_assert_eq!(store.gate().allows(0), model.allows(0));
        for (id, g) in &model.grants {
            let row = store.grants.iter().find(|r| r.id == *id).unwrap();
            let credit = match row.status {
                "active" => pool.grant_remaining(*id).unwrap_or(0),
                "suspended" => row.remaining,
                _ => 0,
            };
            prop_assert_eq!(credit, g.remaining, "grant {} after step {}", id, step);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn the_core_agrees_with_the_model(floor in prop::sample::select(vec![0i64, 0, -40, 25]),
                                      ops in prop::collection::vec(op(), 1..60)) {
        run(floor, &ops)?;
    }
}

#[test]
fn entry_kinds_round_trip() {
    for k in EntryKind::ALL {
        assert_eq!(EntryKind::parse(k.as_str()), Some(k));
    }
    assert_eq!(EntryKind::parse("nope"), None);
}

#[test]
fn a_grant_expires_exactly_at_its_instant() {
    let g = GrantState::new(1, 10, 5, 0, Some(100));
    assert!(g.is_active(99));
    assert!(!g.is_active(100));
    assert_eq!(grant_state("active", 5, 0, Some(100), 100), "expired");
    assert_eq!(grant_state("active", 5, 50, None, 49), "pending");
    assert_eq!(grant_state("active", 0, 0, None, 1), "exhausted");
    assert_eq!(grant_state("voided", 0, 0, None, 1), "voided");
}

#[test]
fn floor_allows_zero_at_the_floor_and_not_one_more() {
    let f = Figures {
        balance: 10,
        held: 3,
        debt: 2,
        floor: 5,
    };
    assert_eq!(f.available(), 5);
    assert!(f.allows(0));
    assert!(!f.allows(1));
    let wide = Figures {
        balance: i64::MAX,
        held: 0,
        debt: 0,
        floor: i64::MIN,
    };
    assert!(wide.allows(i64::MAX));
}

#[test]
fn ties_break_by_age_and_inactive_grants_are_skipped() {
    let now = 1_000_000;
    let grants = vec![
        GrantState::new(3, 50, 10, 0, Some(now + 5)),
        GrantState::new(2, 50, 10, 0, Some(now + 5)),
        GrantState::new(1, 50, 10, 0, None),
        GrantState::new(4, 10, 10, 0, None),
        GrantState::new(5, 10, 10, now + 1, None), // not effective yet
        GrantState::new(6, 10, 10, 0, Some(now)),  // expired exactly now
    ];
    let booked = Booked {
        version: 0,
        remaining: 60,
        debt: 0,
        held: 0,
    };
    let mut pool = Pool::open(booked, 0, now - 1, now, grants, Holds::Loaded(vec![]));
    assert_eq!(pool.entries().len(), 1, "the expiry of grant 6 is recorded");
    assert_eq!(pool.entries()[0].kind, EntryKind::Expire);
    let debit = pool.debit(35).unwrap();
    let order: Vec<(i64, i64)> = debit
        .drains
        .iter()
        .map(|d| (d.grant_id, d.amount))
        .collect();
    assert_eq!(order, vec![(4, 10), (2, 10), (3, 10), (1, 5)]);
    assert_eq!(debit.uncovered, 0);
    assert_eq!(pool.available(), 5);
    assert_eq!(
        pool.cache_until(),
        now + 1,
        "grant 5 becomes spendable next"
    );
}

#[test]
fn an_event_carries_its_entry_only_when_one_grant_paid_it_all() {
    let now = 1_000_000;
    let grants = vec![
        GrantState::new(1, 10, 10, 0, None),
        GrantState::new(2, 50, 10, 0, None),
    ];
    let booked = Booked {
        version: 2,
        remaining: 20,
        debt: 0,
        held: 0,
    };
    let mut pool = Pool::open(
        booked,
        i64::MIN,
        now - 1,
        now,
        grants,
        Holds::Loaded(vec![]),
    );
    pool.current_event = Some(100);
    pool.debit(4).unwrap(); // grant 1 alone
    pool.current_event = Some(101);
    pool.debit(10).unwrap(); // grants 1 and 2
    pool.current_event = Some(102);
    pool.debit(12).unwrap(); // grant 2, then debt
    pool.current_event = Some(103);
    pool.debit(0).unwrap(); // nothing to record
    pool.current_event = None;
    pool.debit(1).unwrap(); // not a usage event's
    let carried = entries_events_carry(pool.entries().iter());
    assert_eq!(carried.keys().copied().collect::<Vec<_>>(), vec![100]);
    let e = carried[&100];
    assert_eq!((e.version, e.grant_id, e.amount), (3, Some(1), -4));
    assert_eq!(
        pool.entries()
            .iter()
            .filter(|e| e.event_id == Some(101))
            .count(),
        2
    );
}
