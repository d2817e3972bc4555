//! The ledger's arithmetic, with no database in it: a pool's booked totals,
//! its grants and holds in, decisions and ledger entries out.
//!
//! Every rule of the ledger that is a computation lives here and only here:
//! which grant is spendable at an instant, the drain order, debt and its
//! repayment, expiry of grants and holds, the floor, and `available`. The
//! store (`super`) locks and loads a pool, hands it to [`Pool::open`], calls
//! the operations, and writes back what [`Pool`] reports as changed.
//! See docs/architecture.md, "The ledger core".

use crate::reversal::{Adjustment, GrantFacts};

/// An instant in PostgreSQL microseconds (`TimestampTz`); comparisons are exact.
pub type Ts = i64;

/// What a ledger entry records. The one list of entry kinds: the database's
/// `billing.entry_kind` type is checked against it by a test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// Credit added by a grant.
    Grant,
    /// Credit drained from a grant by usage.
    Debit,
    /// Usage that no grant covered, owed by the account.
    Debt,
    /// Credit drained from a grant to pay debt.
    DebtRepayment,
    /// Credit left on a grant when it expired.
    Expire,
    /// Credit removed by voiding its grant.
    Void,
    /// Credit removed by revoking its grant or reversing its payment.
    Revoke,
    /// A reservation opened.
    Hold,
    /// A reservation closed by charging the actual cost.
    Settle,
    /// A reservation given back.
    Release,
    /// A reservation that reached its expiry.
    HoldExpire,
    /// Removed credit returned to its grant (a reversal lowered).
    Reinstate,
    /// Debt recorded against a grant cancelled (or, once repaid, credited back).
    DebtReversal,
    /// Credit moved between a grant and its share in a lane of the pool.
    Transfer,
    /// A grant stopped being spendable, keeping its credit (a delinquent
    /// subscription's plan credit); no amount moves.
    Suspend,
    /// A suspended grant made spendable again; no amount moves.
    Resume,
}

impl EntryKind {
    pub const ALL: [EntryKind; 16] = [
        EntryKind::Grant,
        EntryKind::Debit,
        EntryKind::Debt,
        EntryKind::DebtRepayment,
        EntryKind::Expire,
        EntryKind::Void,
        EntryKind::Revoke,
        EntryKind::Hold,
        EntryKind::Settle,
        EntryKind::Release,
        EntryKind::HoldExpire,
        EntryKind::Reinstate,
        EntryKind::DebtReversal,
        EntryKind::Transfer,
        EntryKind::Suspend,
        EntryKind::Resume,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Grant => "grant",
            EntryKind::Debit => "debit",
            EntryKind::Debt => "debt",
            EntryKind::DebtRepayment => "debt_repayment",
            EntryKind::Expire => "expire",
            EntryKind::Void => "void",
            EntryKind::Revoke => "revoke",
            EntryKind::Hold => "hold",
            EntryKind::Settle => "settle",
            EntryKind::Release => "release",
            EntryKind::HoldExpire => "hold_expire",
            EntryKind::Reinstate => "reinstate",
            EntryKind::DebtReversal => "debt_reversal",
            EntryKind::Transfer => "transfer",
            EntryKind::Suspend => "suspend",
            EntryKind::Resume => "resume",
        }
    }

    pub fn parse(s: &str) -> Option<EntryKind> {
        EntryKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A bigint total that would overflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overflow(pub String);

/// A running total may grow by `add` only if it still fits a bigint.
fn fits(what: &str, total: i64, add: i64) -> Result<(), Overflow> {
    total
        .checked_add(add)
        .map(|_| ())
        .ok_or_else(|| Overflow(format!("the {what} {total} + {add} exceeds bigint")))
}

/// A grant as the drain sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantState {
    pub id: i64,
    pub priority: i32,
    pub remaining: i64,
    pub effective_at: Ts,
    pub expires_at: Option<Ts>,
    dirty: bool,
    /// Kept in the pool (its credit still counts in the booked remaining)
    /// but never spendable, drained, expired or repaying debt until resumed.
    suspended: bool,
}

impl GrantState {
    pub fn new(
        id: i64,
        priority: i32,
        remaining: i64,
        effective_at: Ts,
        expires_at: Option<Ts>,
    ) -> Self {
        GrantState {
            id,
            priority,
            remaining,
            effective_at,
            expires_at,
            dirty: false,
            suspended: false,
        }
    }

    /// The grant as its row's status says: a suspended one stays out of
    /// every figure until resumed.
    pub fn with_suspended(mut self, suspended: bool) -> Self {
        self.suspended = suspended;
        self
    }

    /// The one definition of a spendable grant: not suspended, credit left,
    /// effective, and strictly before its expiry.
    pub fn is_active(&self, t: Ts) -> bool {
        !self.suspended
            && self.remaining > 0
            && self.effective_at <= t
            && self.expires_at.is_none_or(|e| t < e)
    }

    /// Whether the clock can change what this grant gives: it holds credit
    /// and is not suspended.
    fn follows_clock(&self) -> bool {
        self.remaining > 0 && !self.suspended
    }

    pub fn is_expired(&self, t: Ts) -> bool {
        self.expires_at.is_some_and(|e| e <= t)
    }

    /// Priority ascending, earliest expiry first (none last), oldest first.
    pub fn drain_order(&self) -> (i32, Ts, i64) {
        (self.priority, self.expires_at.unwrap_or(Ts::MAX), self.id)
    }
}

/// The state of a grant at an instant, as reports show it.
/// Whether a grant's status ends it for good (voided, revoked): nothing is
/// given back to it and it cannot be suspended or resumed. Active and
/// suspended grants are open.
pub fn grant_is_closed(status: &str) -> bool {
    matches!(status, "voided" | "revoked")
}

pub fn grant_state(
    status: &str,
    remaining: i64,
    effective_at: Ts,
    expires_at: Option<Ts>,
    t: Ts,
) -> &'static str {
    let g = GrantState::new(0, 0, remaining, effective_at, expires_at);
    match status {
        "voided" => "voided",
        "revoked" => "revoked",
        "suspended" => "suspended",
        _ if g.is_expired(t) => "expired",
        _ if effective_at > t => "pending",
        _ if remaining == 0 => "exhausted",
        _ => "active",
    }
}

/// An open hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenHold {
    pub id: i64,
    pub amount: i64,
    pub expires_at: Ts,
}

/// What the pool knows of its open holds when it is opened: the cached total
/// (valid until the first hold expires), or the holds themselves.
#[derive(Debug, Clone)]
pub enum Holds {
    Cached { active_held: i64, until: Ts },
    Loaded(Vec<OpenHold>),
}

/// The booked totals of a pool row; they always equal what its entries sum to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Booked {
    pub version: i64,
    pub remaining: i64,
    pub debt: i64,
    pub held: i64,
}

/// Whether a pool's cached spendable figures, written at `from` and exact
/// until `until`, answer for `now`.
pub fn cache_valid(from: Ts, until: Ts, now: Ts) -> bool {
    from <= now && now < until
}

/// One ledger entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub version: i64,
    pub kind: EntryKind,
    pub amount: i64,
    pub grant_amount: i64,
    pub debt_amount: i64,
    pub hold_amount: i64,
    pub balance_before: i64,
    pub balance_after: i64,
    pub debt_after: i64,
    pub held_after: i64,
    pub grant_id: Option<i64>,
    pub hold_id: Option<i64>,
    pub event_id: Option<i64>,
    pub effective_at: Ts,
}

impl Entry {
    /// A debit one grant paid in full, for a usage event, moving no debt
    /// and no hold: all a usage event's row needs to be this entry itself.
    fn is_plain_debit(&self) -> bool {
        self.kind == EntryKind::Debit
            && self.event_id.is_some()
            && self.grant_id.is_some()
            && self.hold_id.is_none()
            && self.debt_amount == 0
            && self.hold_amount == 0
            && self.amount == self.grant_amount
    }
}

/// The entries that usage events carry on their own rows rather than as rows
/// of `ledger_entries`, by event id: a plain debit that is the only entry
/// its event caused (the common case: one grant pays the whole cost).
pub fn entries_events_carry<'a>(
    entries: impl Iterator<Item = &'a Entry>,
) -> rustc_hash::FxHashMap<i64, &'a Entry> {
    let mut by_event: rustc_hash::FxHashMap<i64, (usize, &'a Entry)> = Default::default();
    for e in entries {
        if let Some(event) = e.event_id {
            by_event.entry(event).or_insert((0, e)).0 += 1;
        }
    }
    by_event
        .into_iter()
        .filter(|(_, (n, e))| *n == 1 && e.is_plain_debit())
        .map(|(event, (_, e))| (event, e))
        .collect()
}

/// How much one grant gave to a debit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    pub grant_id: i64,
    pub amount: i64,
}

/// Result of a debit: what grants covered, and what became debt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Debit {
    pub drains: Vec<Drain>,
    pub covered: i64,
    pub uncovered: i64,
}

/// The figures a check answers with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    /// Σ remaining of the grants spendable now.
    pub balance: i64,
    /// Σ of the holds open now.
    pub held: i64,
    pub debt: i64,
    pub floor: i64,
}

impl Figures {
    /// Σ remaining of active grants − Σ open holds − debt; computed wide and
    /// clamped (each total fits a bigint, their difference may not).
    pub fn available(&self) -> i64 {
        let wide = self.balance as i128 - self.held as i128 - self.debt as i128;
        wide.clamp(i64::MIN as i128, i64::MAX as i128) as i64
    }

    /// The floor rule: `amount` more may be taken iff available − amount ≥ floor.
    pub fn allows(&self, amount: i64) -> bool {
        let wide = self.balance as i128 - self.held as i128 - self.debt as i128;
        wide - amount as i128 >= self.floor as i128
    }

    /// The figures of a pool kept in several rows (a split pool's lanes):
    /// the totals summed, the floor this one's (the pool's own row).
    pub fn plus(self, other: Figures) -> Figures {
        Figures {
            balance: self.balance.saturating_add(other.balance),
            held: self.held.saturating_add(other.held),
            debt: self.debt.saturating_add(other.debt),
            floor: self.floor,
        }
    }
}

/// A pool in memory: every change is computed here as entries; nothing is
/// written until the store flushes what [`Pool::entries`] and the dirty
/// grants say.
#[derive(Debug, Clone)]
pub struct Pool {
    pub floor: i64,
    pub now: Ts,
    version: i64,
    remaining: i64,
    debt: i64,
    held: i64,
    active_held: i64,
    hold_bound: Ts,
    grants: Vec<GrantState>,
    entries: Vec<Entry>,
    expired_holds: Vec<i64>,
    /// Entries written by the current operation name this usage event.
    pub current_event: Option<i64>,
    /// Entries written while settling a hold name it.
    pub current_hold: Option<i64>,
}

impl Pool {
    /// A pool at `now` from its booked totals (brought up to date at `since`),
    /// its grants that hold credit and its holds; what happened by the clock
    /// alone since then is recorded (see `catch_up`).
    pub fn open(
        booked: Booked,
        floor: i64,
        since: Ts,
        now: Ts,
        mut grants: Vec<GrantState>,
        holds: Holds,
    ) -> Pool {
        grants.sort_by_key(GrantState::drain_order);
        let mut pool = Pool {
            floor,
            now,
            version: booked.version,
            remaining: booked.remaining,
            debt: booked.debt,
            held: booked.held,
            active_held: 0,
            hold_bound: Ts::MAX,
            grants,
            entries: Vec::new(),
            expired_holds: Vec::new(),
            current_event: None,
            current_hold: None,
        };
        match holds {
            Holds::Cached { active_held, until } => {
                pool.active_held = active_held;
                pool.hold_bound = until;
            }
            Holds::Loaded(open) => {
                for h in open {
                    if h.expires_at <= now {
                        pool.close_hold(h.id, h.amount, EntryKind::HoldExpire, false);
                    } else {
                        pool.active_held += h.amount;
                        pool.hold_bound = pool.hold_bound.min(h.expires_at);
                    }
                }
            }
        }
        pool.catch_up_from(since);
        pool
    }

    /// Replay what the clock alone did since `since`, instant by instant, as
    /// if someone had watched: at each instant a grant expired or became
    /// spendable, expired credit is gone and debt takes what is spendable at
    /// that instant. Which grant repays debt decides what a later expiry
    /// takes, so the order matters; nothing else changes between those instants.
    fn catch_up_from(&mut self, since: Ts) {
        let mut t = since;
        while let Some(next) = self.next_instant_after(t) {
            self.settle_at(next);
            t = next;
        }
        self.settle_at(self.now);
    }

    /// The first instant after `t`, up to now, at which a grant with credit
    /// becomes spendable or expires.
    fn next_instant_after(&self, t: Ts) -> Option<Ts> {
        self.grants
            .iter()
            .filter(|g| g.follows_clock())
            .flat_map(|g| [Some(g.effective_at), g.expires_at])
            .flatten()
            .filter(|i| *i > t && *i <= self.now)
            .min()
    }

    /// Expire what is due at `t`, then repay debt from what is spendable at `t`.
    fn settle_at(&mut self, t: Ts) {
        self.expire_due(t);
        if self.debt > 0 {
            let debt = self.debt;
            self.take(debt, EntryKind::DebtRepayment, t);
        }
    }

    /// Bring the pool up to now after a change (a reversal's give-back).
    pub fn catch_up(&mut self) {
        self.settle_at(self.now);
    }

    // ----- figures ---------------------------------------------------------

    pub fn figures(&self) -> Figures {
        Figures {
            balance: self.active_remaining(),
            held: self.active_held,
            debt: self.debt,
            floor: self.floor,
        }
    }

    pub fn active_remaining(&self) -> i64 {
        self.grants
            .iter()
            .filter(|g| g.is_active(self.now))
            .map(|g| g.remaining)
            .sum()
    }

    pub fn available(&self) -> i64 {
        self.figures().available()
    }

    pub fn allows(&self, amount: i64) -> bool {
        self.figures().allows(amount)
    }

    pub fn entitled(&self) -> bool {
        self.allows(0)
    }

    pub fn active_held(&self) -> i64 {
        self.active_held
    }

    pub fn booked(&self) -> Booked {
        Booked {
            version: self.version,
            remaining: self.remaining,
            debt: self.debt,
            held: self.held,
        }
    }

    pub fn grant_remaining(&self, grant_id: i64) -> Option<i64> {
        self.grants
            .iter()
            .find(|g| g.id == grant_id)
            .map(|g| g.remaining)
    }

    pub fn has_grant(&self, grant_id: i64) -> bool {
        self.grants.iter().any(|g| g.id == grant_id)
    }

    /// Whether grant `id` is loaded again the next time the pool is locked:
    /// it holds credit and is not suspended.
    pub fn keeps_grant(&self, grant_id: i64) -> bool {
        self.grants
            .iter()
            .any(|g| g.id == grant_id && g.follows_clock())
    }

    /// The instant until which the spendable figures stay exact: the next
    /// time a grant becomes effective or expires, or a hold expires.
    pub fn cache_until(&self) -> Ts {
        let grant_bound = self
            .grants
            .iter()
            .filter(|g| g.follows_clock())
            .filter_map(|g| {
                if g.effective_at > self.now {
                    Some(g.effective_at)
                } else {
                    g.expires_at.filter(|e| *e > self.now)
                }
            })
            .min()
            .unwrap_or(Ts::MAX);
        grant_bound.min(self.hold_bound)
    }

    // ----- what to write ---------------------------------------------------

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn is_changed(&self) -> bool {
        !self.entries.is_empty()
    }

    /// Grants whose remaining changed: (id, remaining).
    pub fn dirty_grants(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        self.grants
            .iter()
            .filter(|g| g.dirty)
            .map(|g| (g.id, g.remaining))
    }

    /// The store wrote this grant's row with its current remaining (a new
    /// grant is inserted once, with what it became), so flushing leaves it.
    pub fn grant_row_written(&mut self, grant_id: i64) {
        if let Some(g) = self.grants.iter_mut().find(|g| g.id == grant_id) {
            g.dirty = false;
        }
    }

    /// Holds closed by reaching their expiry.
    pub fn expired_holds(&self) -> &[i64] {
        &self.expired_holds
    }

    /// Forget what was written, keeping the pool's state for further work.
    pub fn written(&mut self) {
        for g in &mut self.grants {
            g.dirty = false;
        }
        // the drain loads only spendable-status grants with credit
        self.grants.retain(|g| g.follows_clock());
        self.entries.clear();
        self.expired_holds.clear();
    }

    // ----- operations ------------------------------------------------------

    #[allow(clippy::too_many_arguments)] // one argument per column of an entry
    fn push(
        &mut self,
        kind: EntryKind,
        grant_amount: i64,
        debt_amount: i64,
        hold_amount: i64,
        grant_id: Option<i64>,
        hold_id: Option<i64>,
        effective_at: Ts,
    ) {
        let before = self.remaining - self.debt;
        self.remaining += grant_amount;
        self.debt += debt_amount;
        self.held += hold_amount;
        self.version += 1;
        self.entries.push(Entry {
            version: self.version,
            kind,
            amount: grant_amount - debt_amount,
            grant_amount,
            debt_amount,
            hold_amount,
            balance_before: before,
            balance_after: self.remaining - self.debt,
            debt_after: self.debt,
            held_after: self.held,
            grant_id,
            hold_id: hold_id.or(self.current_hold),
            event_id: self.current_event,
            effective_at,
        });
    }

    fn expire_due(&mut self, t: Ts) {
        for i in 0..self.grants.len() {
            let g = &self.grants[i];
            if g.follows_clock() && g.is_expired(t) {
                let (id, amount, at) = (g.id, g.remaining, g.expires_at.unwrap_or(t));
                self.take_from_grant(i, amount);
                self.push(EntryKind::Expire, -amount, 0, 0, Some(id), None, at);
            }
        }
    }

    fn take_from_grant(&mut self, index: usize, amount: i64) {
        let g = &mut self.grants[index];
        g.remaining -= amount;
        g.dirty = true;
    }

    /// Take up to `amount` from the grants spendable at `t`, in drain order.
    fn take(&mut self, amount: i64, kind: EntryKind, t: Ts) -> Vec<Drain> {
        let mut left = amount;
        let mut drains = Vec::new();
        for i in 0..self.grants.len() {
            if left == 0 {
                break;
            }
            if !self.grants[i].is_active(t) {
                continue;
            }
            let part = left.min(self.grants[i].remaining);
            let id = self.grants[i].id;
            self.take_from_grant(i, part);
            left -= part;
            let debt_change = if kind == EntryKind::DebtRepayment {
                -part
            } else {
                0
            };
            self.push(kind, -part, debt_change, 0, Some(id), None, t);
            drains.push(Drain {
                grant_id: id,
                amount: part,
            });
        }
        drains
    }

    /// Debit `amount`: drain active grants in order, the rest becomes debt.
    /// The caller decides beforehand whether the floor allows it (strict).
    pub fn debit(&mut self, amount: i64) -> Result<Debit, Overflow> {
        if amount == 0 {
            return Ok(Debit::default());
        }
        let coverable = self.active_remaining().min(amount);
        let uncovered = amount - coverable;
        fits("debt", self.debt, uncovered)?;
        let drains = self.take(amount, EntryKind::Debit, self.now);
        let covered: i64 = drains.iter().map(|d| d.amount).sum();
        if uncovered > 0 {
            self.push(EntryKind::Debt, 0, uncovered, 0, None, None, self.now);
        }
        Ok(Debit {
            drains,
            covered,
            uncovered,
        })
    }

    /// Record a new grant; it pays debt first when spendable. Returns what it repaid.
    pub fn add_grant(&mut self, grant: GrantState) -> Result<i64, Overflow> {
        let (id, amount) = (grant.id, grant.remaining);
        fits("pool balance", self.remaining, amount)?;
        self.insert_in_drain_order(grant);
        self.push(EntryKind::Grant, amount, 0, 0, Some(id), None, self.now);
        let before = self.grant_remaining(id).unwrap_or(0);
        self.catch_up();
        Ok(before - self.grant_remaining(id).unwrap_or(0))
    }

    /// Bring a grant without credit into the pool (the drain loads only
    /// grants with credit), so credit can return to it.
    pub fn insert_in_drain_order(&mut self, grant: GrantState) {
        let pos = self
            .grants
            .iter()
            .position(|g| g.drain_order() > grant.drain_order())
            .unwrap_or(self.grants.len());
        self.grants.insert(pos, grant);
    }

    /// Take up to `amount` of a grant's remaining credit back, as a `kind`
    /// entry (void, revoke); returns what was taken.
    pub fn take_unspent(&mut self, grant_id: i64, amount: i64, kind: EntryKind) -> i64 {
        let Some(i) = self.grants.iter().position(|g| g.id == grant_id) else {
            return 0;
        };
        let part = self.grants[i].remaining.min(amount);
        if part > 0 {
            self.take_from_grant(i, part);
            self.push(kind, -part, 0, 0, Some(grant_id), None, self.now);
        }
        part
    }

    /// Give back what a reversal took from a grant: `unspent` credit returns
    /// to the grant (reinstate); `debt` recorded against it is cancelled while
    /// the pool still owes it, and what was already repaid returns to the
    /// grant as credit (debt_reversal). The grant must be in the pool (see
    /// `insert_in_drain_order`). Credit returned past the grant's expiry
    /// expires at the next catch-up.
    pub fn give_back(&mut self, grant_id: i64, unspent: i64, debt: i64) {
        let Some(i) = self.grants.iter().position(|g| g.id == grant_id) else {
            return;
        };
        if unspent > 0 {
            self.take_from_grant(i, -unspent);
            self.push(
                EntryKind::Reinstate,
                unspent,
                0,
                0,
                Some(grant_id),
                None,
                self.now,
            );
        }
        if debt > 0 {
            let cancelled = debt.min(self.debt);
            let credited = debt - cancelled;
            self.take_from_grant(i, -credited);
            self.push(
                EntryKind::DebtReversal,
                credited,
                -cancelled,
                0,
                Some(grant_id),
                None,
                self.now,
            );
        }
    }

    /// Turn `amount` into debt without a grant's credit (a voided grant's spent part).
    pub fn add_debt(&mut self, amount: i64, grant_id: Option<i64>) -> Result<(), Overflow> {
        fits("debt", self.debt, amount)?;
        if amount > 0 {
            self.push(EntryKind::Debt, 0, amount, 0, grant_id, None, self.now);
        }
        Ok(())
    }

    /// Book a reversal's adjustment on a grant (loaded if it gives anything
    /// back); `take_kind` names the removal entry.
    pub fn adjust_grant(
        &mut self,
        grant_id: i64,
        a: &Adjustment,
        take_kind: EntryKind,
    ) -> Result<(), Overflow> {
        self.take_unspent(grant_id, a.take_unspent, take_kind);
        self.add_debt(a.add_debt, Some(grant_id))?;
        self.give_back(grant_id, a.return_unspent, a.return_debt);
        self.catch_up();
        Ok(())
    }

    /// Move `amount` of credit into (positive) or out of (negative) a grant
    /// of this pool, from or to its share in another lane of the pool.
    /// Returns false, moving nothing, if the grant is not in the pool (the
    /// store loads it first).
    pub fn transfer(&mut self, grant_id: i64, amount: i64) -> Result<bool, Overflow> {
        let Some(i) = self.grants.iter().position(|g| g.id == grant_id) else {
            return Ok(false);
        };
        fits("pool balance", self.remaining, amount)?;
        self.take_from_grant(i, -amount);
        self.push(
            EntryKind::Transfer,
            amount,
            0,
            0,
            Some(grant_id),
            None,
            self.now,
        );
        Ok(true)
    }

    /// The first grant in drain order that is spendable now: (id, remaining).
    pub fn head_grant(&self) -> Option<(i64, i64)> {
        self.grants
            .iter()
            .find(|g| g.is_active(self.now))
            .map(|g| (g.id, g.remaining))
    }

    /// Grants holding credit, in drain order: (id, remaining).
    pub fn credited_grants(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        self.grants
            .iter()
            .filter(|g| g.remaining > 0)
            .map(|g| (g.id, g.remaining))
    }

    pub fn grant(&self, grant_id: i64) -> Option<&GrantState> {
        self.grants.iter().find(|g| g.id == grant_id)
    }

    /// Stop a grant of the pool from being spent, keeping its credit; false
    /// if it is not in the pool or already suspended.
    pub fn suspend(&mut self, grant_id: i64) -> bool {
        let Some(g) = self.grants.iter_mut().find(|g| g.id == grant_id) else {
            return false;
        };
        if g.suspended {
            return false;
        }
        g.suspended = true;
        self.push(EntryKind::Suspend, 0, 0, 0, Some(grant_id), None, self.now);
        true
    }

    /// Make a suspended grant of the pool spendable again (the store brings
    /// it into the pool first): what the clock did meanwhile applies now (its
    /// expiry if it passed) and its credit repays debt first. Returns what it
    /// repaid, or None if it is not in the pool.
    pub fn resume(&mut self, grant_id: i64) -> Option<i64> {
        let g = self.grants.iter_mut().find(|g| g.id == grant_id)?;
        g.suspended = false;
        self.push(EntryKind::Resume, 0, 0, 0, Some(grant_id), None, self.now);
        let debt_before = self.debt;
        self.catch_up();
        Some(debt_before - self.debt)
    }

    pub fn open_hold(&mut self, hold_id: i64, amount: i64, expires_at: Ts) -> Result<(), Overflow> {
        fits("held total", self.held, amount)?;
        self.active_held += amount;
        self.hold_bound = self.hold_bound.min(expires_at);
        self.push(EntryKind::Hold, 0, 0, amount, None, Some(hold_id), self.now);
        Ok(())
    }

    /// Close an open hold; `active` says whether it still counted against availability.
    pub fn close_hold(&mut self, hold_id: i64, amount: i64, kind: EntryKind, active: bool) {
        if active {
            self.active_held -= amount;
        }
        self.push(kind, 0, 0, -amount, None, Some(hold_id), self.now);
        if kind == EntryKind::HoldExpire {
            self.expired_holds.push(hold_id);
        }
    }
}

/// A grant's reversal facts from its row and every entry that names it: the
/// one place that says which entry kinds consume, remove or owe.
pub fn grant_facts<'a>(
    amount: i64,
    remaining: i64,
    closed: bool,
    entries: impl IntoIterator<Item = (EntryKind, i64, i64)> + 'a,
) -> GrantFacts {
    let mut f = GrantFacts {
        amount,
        remaining,
        closed,
        ..GrantFacts::default()
    };
    for (kind, grant_amount, debt_amount) in entries {
        match kind {
            EntryKind::Debit | EntryKind::DebtRepayment => f.consumed -= grant_amount,
            EntryKind::Void | EntryKind::Revoke | EntryKind::Reinstate => f.removed -= grant_amount,
            EntryKind::Debt => f.debt += debt_amount,
            EntryKind::DebtReversal => {
                f.consumed -= grant_amount;
                f.debt += debt_amount - grant_amount;
            }
            EntryKind::Grant
            | EntryKind::Expire
            | EntryKind::Hold
            | EntryKind::Settle
            | EntryKind::Release
            | EntryKind::HoldExpire
            | EntryKind::Suspend
            | EntryKind::Resume
            // a grant's facts include its lane shares', where transfers cancel out
            | EntryKind::Transfer => {}
        }
    }
    f
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod model_tests;
