// verify_ledger is the oracle of many tests: prove it reports each kind of damage.
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::support::*;

    fn problems() -> String {
        opt::<String>(
            "SELECT string_agg(problem, '; ' ORDER BY problem) FROM billing.verify_ledger()",
        )
        .unwrap_or_default()
    }

    fn tamper(sql: &str) {
        run("SET LOCAL session_replication_role = replica");
        run(sql);
        run("SET LOCAL session_replication_role = origin");
    }

    #[pg_test]
    fn verify_ledger_reports_every_kind_of_damage() {
        let g = grant("a", "mills", 100, "");
        ingest("a", "mills", 30, "e1");
        run("SELECT * FROM billing.reserve('a', 'mills', 10)");
        assert_eq!(problems(), "");

        tamper("UPDATE billing.ledger_entries SET balance_before = balance_before + 1, balance_after = balance_after + 1 WHERE version = 2");
        assert!(
            problems().contains("balance_before does not chain"),
            "{}",
            problems()
        );
        tamper("UPDATE billing.ledger_entries SET balance_before = balance_before - 1, balance_after = balance_after - 1 WHERE version = 2");
        assert_eq!(problems(), "");

        tamper(&format!(
            "UPDATE billing.grants SET remaining = remaining + 5 WHERE id = {g}"
        ));
        let p = problems();
        assert!(
            p.contains(&format!(
                "grant {g}: remaining 75 but its entries sum to 70"
            )),
            "{p}"
        );
        assert!(p.contains("pool totals"), "{p}");
        tamper(&format!(
            "UPDATE billing.grants SET remaining = remaining - 5 WHERE id = {g}"
        ));

        tamper("UPDATE billing.holds SET status = 'released'");
        assert!(problems().contains("its entries hold 10"), "{}", problems());
        tamper("UPDATE billing.holds SET status = 'open'");

        tamper("UPDATE billing.ledger_entries SET event_id = 999999 WHERE event_id IS NOT NULL");
        assert!(
            problems().contains("names a missing usage event 999999"),
            "{}",
            problems()
        );
        tamper("UPDATE billing.ledger_entries SET event_id = (SELECT id FROM billing.usage_events) WHERE event_id = 999999");
        assert_eq!(problems(), "");
        tamper("DELETE FROM billing.ledger_entries WHERE version = 2");
        assert!(problems().contains("version gap"), "{}", problems());
    }
}
