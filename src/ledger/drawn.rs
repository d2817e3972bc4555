//! A debit of one grant writes its pool's row, not the grant's: the pool row
//! keeps what has been drawn from the grant being drained since that grant's
//! row was last written (`pools.drawn_grant`, `pools.drawn`), so a grant's
//! remaining is its row's less what its pool's row has drawn from it
//! (`billing.grant_remaining`). The rule for which grant rows a flush writes
//! lives here, pure; the store (`super`) reads and writes the rows.

/// What a pool row has drawn from one grant since that grant's row was written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drawn {
    pub grant: Option<i64>,
    pub amount: i64,
}

impl Drawn {
    /// What grant `id`'s row counts beyond its remaining.
    pub fn from(&self, id: i64) -> i64 {
        if self.grant == Some(id) {
            self.amount
        } else {
            0
        }
    }
}

/// A grant a flush finds changed, in drain order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Changed {
    pub id: i64,
    /// What it has left now.
    pub remaining: i64,
    /// What its row holds (None: its row was not read).
    pub stored: Option<i64>,
    /// Whether a debit may take from it again (not suspended, credit left),
    /// so its row is read whenever its pool is locked.
    pub drawable: bool,
}

/// What a flush writes: grant rows (id, remaining), and what the pool row
/// draws afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub writes: Vec<(i64, i64)>,
    pub drawn: Drawn,
}

/// The grant rows a flush of `changed` writes, given what the pool row drew
/// (`drawn`, from a grant whose row holds `drawn_stored`). One changed grant
/// whose remaining only fell below its row's, and which a debit may take from
/// again, is left unwritten and becomes the one drawn (the one drawn already,
/// if it is among them; else the first in drain order). Every other change
/// is written; so is the grant drawn before when another takes its place.
pub fn plan(changed: &[Changed], drawn: Drawn, drawn_stored: i64) -> Plan {
    let fell = |c: &&Changed| c.drawable && c.stored.is_some_and(|s| c.remaining <= s);
    let candidate = changed
        .iter()
        .filter(fell)
        .find(|c| Some(c.id) == drawn.grant)
        .or_else(|| changed.iter().find(fell));
    let mut writes: Vec<(i64, i64)> = changed
        .iter()
        .filter(|c| Some(c.id) != candidate.map(|k| k.id))
        .map(|c| (c.id, c.remaining))
        .collect();
    let drawn_changed = drawn
        .grant
        .is_some_and(|g| changed.iter().any(|c| c.id == g));
    let drawn = match candidate {
        Some(c) => {
            if let Some(g) = drawn.grant {
                if g != c.id && drawn.amount != 0 && !drawn_changed {
                    // the grant drawn before: its row takes what was drawn from it
                    writes.push((g, drawn_stored - drawn.amount));
                }
            }
            Drawn {
                grant: Some(c.id),
                amount: c.stored.unwrap_or(c.remaining) - c.remaining,
            }
        }
        None if drawn_changed => Drawn::default(),
        None => drawn,
    };
    Plan { writes, drawn }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed(id: i64, remaining: i64, stored: i64) -> Changed {
        Changed {
            id,
            remaining,
            stored: Some(stored),
            drawable: remaining > 0,
        }
    }

    fn drawn(grant: i64, amount: i64) -> Drawn {
        Drawn {
            grant: Some(grant),
            amount,
        }
    }

    #[test]
    fn a_debit_of_one_grant_writes_no_grant_row() {
        let p = plan(&[changed(1, 90, 100)], Drawn::default(), 0);
        assert_eq!(p.writes, vec![]);
        assert_eq!(p.drawn, drawn(1, 10));
    }

    #[test]
    fn the_next_debit_of_the_same_grant_adds_to_what_is_drawn() {
        // the row still holds 100; 10 were drawn, now 25 in all
        let p = plan(&[changed(1, 75, 100)], drawn(1, 10), 100);
        assert_eq!(p.writes, vec![]);
        assert_eq!(p.drawn, drawn(1, 25));
    }

    #[test]
    fn a_grant_emptied_is_written_and_the_next_one_is_drawn() {
        // grant 1 (row 100, 60 drawn) gives its last 40; grant 2 gives 5
        let p = plan(&[changed(1, 0, 100), changed(2, 45, 50)], drawn(1, 60), 100);
        assert_eq!(p.writes, vec![(1, 0)]);
        assert_eq!(p.drawn, drawn(2, 5));
    }

    #[test]
    fn the_grant_drawn_before_is_written_back_when_another_takes_its_place() {
        // grant 2 changed alone (grant 1 untouched, 30 drawn from its row of 100)
        let p = plan(&[changed(2, 45, 50)], drawn(1, 30), 100);
        assert_eq!(p.writes, vec![(1, 70)]);
        assert_eq!(p.drawn, drawn(2, 5));
    }

    #[test]
    fn a_grant_that_gained_is_written_and_the_drawn_one_stays() {
        // a refund into grant 3; grant 1 keeps what was drawn from it
        let p = plan(&[changed(3, 80, 50)], drawn(1, 30), 100);
        assert_eq!(p.writes, vec![(3, 80)]);
        assert_eq!(p.drawn, drawn(1, 30));
    }

    #[test]
    fn the_drawn_grant_changed_otherwise_is_written_whole() {
        // grant 1 (row 100, 30 drawn) gets 50 back: 120 left, more than its row
        let p = plan(&[changed(1, 120, 100)], drawn(1, 30), 100);
        assert_eq!(p.writes, vec![(1, 120)]);
        assert_eq!(p.drawn, Drawn::default());
    }

    #[test]
    fn a_suspended_or_unread_grant_is_never_drawn() {
        let suspended = Changed {
            drawable: false,
            ..changed(1, 90, 100)
        };
        let unread = Changed {
            stored: None,
            ..changed(2, 40, 0)
        };
        let p = plan(&[suspended, unread], Drawn::default(), 0);
        assert_eq!(p.writes, vec![(1, 90), (2, 40)]);
        assert_eq!(p.drawn, Drawn::default());
    }

    #[test]
    fn the_grant_drawn_already_is_preferred() {
        // grant 2 comes first in drain order, but grant 1 is drawn already
        let p = plan(
            &[changed(2, 40, 50), changed(1, 70, 100)],
            drawn(1, 20),
            100,
        );
        assert_eq!(p.writes, vec![(2, 40)]);
        assert_eq!(p.drawn, drawn(1, 30));
    }
}
