// docs/architecture.md, rule 4: a grant is spendable strictly before its expires_at, exactly,
// at every instant, with no sweeper job.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::support::*;

    #[pg_test]
    fn spendable_one_microsecond_before_expiry() {
        grant(
            "a",
            "mills",
            100,
            ", expires_at => now() + interval '1 microsecond'",
        );
        assert_eq!(available("a", "mills"), 100);
        let allowed: bool = one("SELECT allowed FROM billing.check('a', 'mills', 100)");
        assert!(allowed);
    }

    #[pg_test]
    fn not_spendable_at_the_expiry_instant() {
        let g = grant(
            "a",
            "mills",
            100,
            ", expires_at => now() + interval '1 hour'",
        );
        grant("a", "mills", 7, ", kind => 'topup'");
        travel("a", "1 hour"); // now() == expires_at
        assert!(one::<bool>(&format!(
            "SELECT expires_at = now() FROM billing.grants WHERE id = {g}"
        )));
        assert_eq!(
            available("a", "mills"),
            7,
            "check excludes the grant at its expiry instant"
        );
        let drains = ingest("a", "mills", 5, "e1");
        assert!(
            !drains.contains(&format!("\"grant_id\": {g}")),
            "expired grant drained: {drains}"
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn still_spendable_one_microsecond_before_the_instant() {
        let g = grant(
            "a",
            "mills",
            100,
            ", expires_at => now() + interval '1 hour'",
        );
        travel("a", "59 minutes 59.999999 seconds");
        assert_eq!(available("a", "mills"), 100);
        let drains = ingest("a", "mills", 5, "e1");
        assert!(drains.contains(&format!("\"grant_id\": {g}")));
    }

    #[pg_test]
    fn the_first_write_after_expiry_records_it_in_the_ledger() {
        let g = grant(
            "a",
            "mills",
            100,
            ", expires_at => now() + interval '1 day'",
        );
        ingest("a", "mills", 30, "e1");
        travel("a", "2 days");
        grant("a", "mills", 10, ", kind => 'topup'");
        let expired: String = one(&format!(
            "SELECT kind || ':' || amount || ':' || (effective_at = (SELECT expires_at FROM billing.grants WHERE id = {g})) \
             FROM billing.ledger WHERE grant_id = {g} AND kind = 'expire'"
        ));
        assert_eq!(
            expired, "expire:-70:true",
            "expiry entry carries the grant's expiry instant"
        );
        assert_eq!(remaining(g), 0);
        assert_eq!(available("a", "mills"), 10);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn the_sweep_records_expiries_without_changing_balances() {
        grant(
            "a",
            "mills",
            100,
            ", expires_at => now() + interval '1 day'",
        );
        grant("a", "mills", 5, ", kind => 'topup'");
        travel("a", "1 day");
        let before = available("a", "mills");
        assert_eq!(before, 5, "exact before the sweep");
        let swept: i64 = one("SELECT billing.sweep()");
        assert_eq!(swept, 1);
        assert_eq!(
            available("a", "mills"),
            before,
            "the sweep changes no balance"
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.ledger WHERE kind = 'expire'"),
            1
        );
        assert_eq!(
            one::<i64>("SELECT billing.sweep()"),
            0,
            "nothing left to sweep"
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_pending_grant_becomes_spendable_at_its_effective_instant() {
        grant(
            "a",
            "mills",
            100,
            ", effective_at => now() + interval '1 hour'",
        );
        assert_eq!(available("a", "mills"), 0);
        travel("a", "59 minutes");
        assert_eq!(available("a", "mills"), 0);
        travel("a", "1 minute");
        assert_eq!(available("a", "mills"), 100);
    }
}
