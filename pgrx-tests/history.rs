// docs/architecture.md, rule 10: balance(account, unit, as_of) answers from the ledger for any
// past instant.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::support::*;

    fn mark() -> String {
        run("SELECT pg_sleep(0.002)");
        let t: String = one("SELECT clock_timestamp()::text");
        run("SELECT pg_sleep(0.002)");
        t
    }

    fn balance_at(t: &str) -> String {
        one(&format!(
            "SELECT concat_ws(',', balance, held, debt, available) FROM billing.balance('a', 'mills', as_of => '{t}')"
        ))
    }

    #[pg_test]
    fn past_balances_replay_the_ledger() {
        let t0 = mark();
        grant("a", "mills", 100, ", kind => 'plan'");
        let t1 = mark();
        ingest("a", "mills", 30, "e1");
        let t2 = mark();
        let h: i64 = one("SELECT hold_id FROM billing.reserve('a', 'mills', 50)");
        let t3 = mark();
        ingest("a", "mills", 90, "e2");
        let t4 = mark();
        grant("a", "mills", 40, ", kind => 'topup'");
        let t5 = mark();
        run(&format!("SELECT * FROM billing.release({h})"));

        assert_eq!(balance_at(&t0), "0,0,0,0");
        assert_eq!(balance_at(&t1), "100,0,0,100");
        assert_eq!(balance_at(&t2), "70,0,0,70");
        assert_eq!(balance_at(&t3), "70,50,0,20");
        assert_eq!(balance_at(&t4), "0,50,20,-70");
        assert_eq!(balance_at(&t5), "20,50,0,-30");
        let now: String = one("SELECT concat_ws(',', balance, held, debt, available) FROM billing.balance('a', 'mills')");
        assert_eq!(now, "20,0,0,20");
        let check: String = one("SELECT concat_ws(',', balance, held, debt, available) FROM billing.check('a', 'mills')");
        assert_eq!(check, now, "the present balance and the gate agree");
    }

    #[pg_test]
    fn the_balance_now_reads_no_ledger_entry_however_long_the_history() {
        grant("a", "mills", 100, "");
        for i in 0..20 {
            ingest("a", "mills", 1, &format!("e{i}"));
        }
        run("SELECT * FROM billing.reserve('a', 'mills', 5)");
        let before = ledger_scans();
        let now: String = one(
            "SELECT concat_ws(',', balance, held, debt, available) FROM billing.balance('a', 'mills')",
        );
        assert_eq!(now, "80,5,0,75");
        assert_eq!(ledger_scans(), before, "the pool's rows answer it");
        let summed: String = one("SELECT concat_ws(',', balance, held, debt, available) \
             FROM billing.balance('a', 'mills', as_of => clock_timestamp())");
        assert_eq!(summed, now);
        assert!(
            ledger_scans() > before,
            "a past instant is summed from the ledger"
        );
    }

    #[pg_test]
    fn a_past_balance_reads_the_pool_s_entries_once_however_many_grants() {
        for i in 0..20 {
            grant("a", "mills", 10, &format!(", key => 'g{i}'"));
        }
        for i in 0..30 {
            ingest("a", "mills", 3, &format!("e{i}"));
        }
        let before = event_scans();
        let past: String = one("SELECT concat_ws(',', balance, held, debt, available) \
             FROM billing.balance('a', 'mills', as_of => clock_timestamp())");
        assert_eq!(past, "110,0,0,110");
        assert_eq!(
            event_scans() - before,
            1,
            "one scan of the pool's events, not one per grant"
        );
    }

    /// Scans of the usage events' index by pool in this transaction.
    fn event_scans() -> i64 {
        one("SELECT pg_stat_get_xact_numscans('billing.usage_events_by_pool'::regclass)")
    }

    /// Scans of the tables that hold ledger entries, and of their indexes, in this transaction.
    fn ledger_scans() -> i64 {
        one(
            "SELECT sum(pg_stat_get_xact_numscans(c.oid))::bigint FROM pg_class c \
             WHERE c.oid IN ('billing.usage_events'::regclass, 'billing.ledger_entries'::regclass) \
                OR c.oid IN (SELECT indexrelid FROM pg_index \
                             WHERE indrelid IN ('billing.usage_events'::regclass, 'billing.ledger_entries'::regclass))",
        )
    }

    #[pg_test]
    fn past_balances_respect_expiry_at_the_exact_instant() {
        let g = grant(
            "a",
            "mills",
            100,
            ", expires_at => now() + interval '1 hour'",
        );
        let exp: String = one(&format!(
            "SELECT expires_at::text FROM billing.grants WHERE id = {g}"
        ));
        let before: String = one(&format!(
            "SELECT ('{exp}'::timestamptz - interval '1 microsecond')::text"
        ));
        assert_eq!(balance_at(&before), "100,0,0,100");
        assert_eq!(balance_at(&exp), "0,0,0,0");
    }
}
