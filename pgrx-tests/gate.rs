// docs/architecture.md, rule 5: available = Σ active remaining − open holds − debt;
// check(amount) allows iff available − amount ≥ floor. The gate writes nothing.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::support::*;

    fn allowed(amount: i64) -> bool {
        one(&format!(
            "SELECT allowed FROM billing.check('a', 'mills', {amount})"
        ))
    }

    #[pg_test]
    fn zero_at_exactly_the_floor_is_allowed_one_more_is_not() {
        grant("a", "mills", 100, "");
        assert!(allowed(100));
        assert!(!allowed(101));
        ingest("a", "mills", 100, "e1");
        assert_eq!(available("a", "mills"), 0);
        assert!(allowed(0), "a request of 0 at exactly the floor is allowed");
        assert!(!allowed(1));
        let reason: String = one("SELECT reason FROM billing.check('a', 'mills', 1)");
        assert_eq!(reason, "insufficient_credits");
    }

    #[pg_test]
    fn check_finds_each_pool_whatever_the_collation_of_its_key() {
        // the gate scans the pools' unique index itself: its keys must
        // compare as the index orders them. Under ICU "und" case and accents
        // sort apart from C's byte order ('a' < 'A' < 'b' < 'B' < 'é').
        // (a view over the column must go first; the test's transaction is rolled back)
        run("ALTER EXTENSION pg_billing DROP VIEW billing.hourly_usage");
        run("DROP VIEW billing.hourly_usage");
        run("ALTER TABLE billing.pools ALTER COLUMN account TYPE text COLLATE \"und-x-icu\"");
        run("ALTER TABLE billing.pools ALTER COLUMN unit TYPE text COLLATE \"und-x-icu\"");
        let accounts = ["a", "A", "b", "B", "é", "E", "a b", "a-b", "ab", "AB"];
        for (i, account) in accounts.iter().enumerate() {
            grant(account, "mills", 100 + i as i64, "");
            grant(account, "mills_b", 1000 + i as i64, "");
        }
        for (i, account) in accounts.iter().enumerate() {
            assert_eq!(available(account, "mills"), 100 + i as i64, "{account}");
            assert_eq!(available(account, "mills_b"), 1000 + i as i64, "{account}");
        }
        assert_eq!(available("c", "mills"), 0);
    }

    #[pg_test]
    fn a_negative_floor_is_a_credit_line() {
        grant("a", "mills", 100, "");
        run("SELECT billing.set_floor('a', 'mills', -50)");
        assert!(allowed(150));
        assert!(!allowed(151));
        let rejected = sqlstate("SELECT * FROM billing.ingest('a', 'mills', 1, key => 'e1', cost => 151, strict => true)");
        assert_eq!(rejected.as_deref(), Some("23514"));
        run("SELECT * FROM billing.ingest('a', 'mills', 1, key => 'e2', cost => 150, strict => true)");
        let (avail, debt): (Option<i64>, Option<i64>) =
            Spi::get_two("SELECT available, debt FROM billing.check('a', 'mills')").unwrap();
        assert_eq!((avail, debt), (Some(-50), Some(50)));
        assert!(allowed(0), "exactly at the floor");
        assert!(!allowed(1));
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_positive_floor_keeps_a_reserve() {
        grant("a", "mills", 100, "");
        run("SELECT billing.set_floor('a', 'mills', 30)");
        assert!(allowed(70));
        assert!(!allowed(71));
    }

    #[pg_test]
    fn check_reports_every_figure() {
        grant("a", "mills", 1000, "");
        run("SELECT * FROM billing.reserve('a', 'mills', 300)");
        let row: String = one("SELECT concat_ws(',', allowed, available, balance, held, debt, floor, reason) FROM billing.check('a', 'mills', 700)");
        assert_eq!(row, "t,700,1000,300,0,0,ok");
    }

    #[pg_test]
    fn check_writes_nothing() {
        grant(
            "a",
            "mills",
            100,
            ", expires_at => now() + interval '1 hour'",
        );
        travel("a", "2 hours"); // outside the cached window: the slow path
        let before = footprint();
        let pool_before: String = one("SELECT row(p.*)::text FROM billing.pools p");
        assert_eq!(available("a", "mills"), 0);
        assert!(!allowed(1));
        assert_eq!(footprint(), before);
        assert_eq!(
            one::<String>("SELECT row(p.*)::text FROM billing.pools p"),
            pool_before
        );
    }

    #[pg_test]
    fn unknown_account_in_a_known_unit_has_nothing_and_writes_nothing() {
        grant("a", "mills", 100, "");
        let before = footprint();
        let row: String = one("SELECT concat_ws(',', allowed, available, reason) FROM billing.check('nobody', 'mills', 1)");
        assert_eq!(row, "f,0,insufficient_credits");
        assert!(one::<bool>(
            "SELECT allowed FROM billing.check('nobody', 'mills', 0)"
        ));
        assert_eq!(footprint(), before);
    }

    #[pg_test]
    fn unknown_unit_is_an_error() {
        assert_rejected("SELECT * FROM billing.check('a', 'nope')", "42704");
    }

    #[pg_test]
    fn debt_makes_the_pool_not_entitled() {
        grant("a", "mills", 10, "");
        let entitled: bool =
            one("SELECT entitled FROM billing.ingest('a', 'mills', 1, key => 'e1', cost => 25)");
        assert!(!entitled);
        let row: String = one("SELECT concat_ws(',', allowed, available, balance, debt, reason) FROM billing.check('a', 'mills')");
        assert_eq!(row, "f,-15,0,15,in_debt");
    }
}
