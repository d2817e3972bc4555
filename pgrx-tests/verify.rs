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

        // version 2, the debit of e1, is carried by its usage event
        tamper("UPDATE billing.usage_events SET balance_after = balance_after + 1 WHERE entry_version = 2");
        assert!(
            problems().contains("entry version 2: balance_before does not chain"),
            "{}",
            problems()
        );
        tamper("UPDATE billing.usage_events SET balance_after = balance_after - 1 WHERE entry_version = 2");
        assert_eq!(problems(), "");
        tamper("UPDATE billing.ledger_entries SET balance_before = balance_before + 1, balance_after = balance_after + 1 WHERE version = 3");
        assert!(
            problems().contains("entry version 3: balance_before does not chain"),
            "{}",
            problems()
        );
        tamper("UPDATE billing.ledger_entries SET balance_before = balance_before - 1, balance_after = balance_after - 1 WHERE version = 3");
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

        tamper("UPDATE billing.ledger_entries SET event_id = 999999 WHERE version = 3");
        assert!(
            problems().contains("names a missing usage event 999999"),
            "{}",
            problems()
        );
        tamper("UPDATE billing.ledger_entries SET event_id = NULL WHERE event_id = 999999");
        assert_eq!(problems(), "");
        tamper("UPDATE billing.usage_events SET entry_grant = 999999 WHERE entry_version = 2");
        let p = problems();
        assert!(
            p.contains("entry version 2 names a missing grant 999999"),
            "{p}"
        );
        assert!(
            p.contains(&format!(
                "grant {g}: remaining 70 but its entries sum to 100"
            )),
            "{p}"
        );
        tamper(&format!(
            "UPDATE billing.usage_events SET entry_grant = {g} WHERE entry_version = 2"
        ));
        assert_eq!(problems(), "");
        // an event that no longer carries its debit leaves a gap
        tamper("UPDATE billing.usage_events SET entry_version = NULL WHERE entry_version = 2");
        assert!(problems().contains("version gap"), "{}", problems());
    }

    // The tables written per event carry no CHECK constraints; verify_ledger
    // holds their row rules instead.
    #[pg_test]
    fn verify_ledger_checks_the_row_rules() {
        let g = grant("a", "mills", 100, "");
        let e: i64 =
            one("SELECT event_id FROM billing.ingest('a', 'mills', 1, key => 'e1', cost => 30)");
        assert_eq!(problems(), "");
        tamper(&format!(
            "UPDATE billing.grants SET status = 'voided' WHERE id = {g}"
        ));
        assert!(
            problems().contains("closed but keeps credit"),
            "{}",
            problems()
        );
        tamper(&format!(
            "UPDATE billing.grants SET status = 'active' WHERE id = {g}"
        ));
        // a grant with credit hidden from the drain
        reported(
            &format!("UPDATE billing.grants SET exhausted = true WHERE id = {g}"),
            &format!("grant {g}: marked exhausted, but its row holds 100"),
            &format!("UPDATE billing.grants SET exhausted = false WHERE id = {g}"),
        );
        tamper(&format!(
            "UPDATE billing.usage_events SET covered = 29 WHERE id = {e}"
        ));
        assert!(
            problems().contains("covered + debt_created differs from cost"),
            "{}",
            problems()
        );
        tamper(&format!(
            "UPDATE billing.usage_events SET covered = 30 WHERE id = {e}"
        ));
        tamper("UPDATE billing.ledger_entries SET amount = amount + 1, balance_after = balance_after + 1 WHERE version = 1");
        assert!(
            problems().contains("amount differs from grant_amount - debt_amount"),
            "{}",
            problems()
        );
        tamper("UPDATE billing.ledger_entries SET amount = amount - 1, balance_after = balance_after - 1 WHERE version = 1");
        assert_eq!(problems(), "");
        // the debit e1 carries must be a whole debit of one grant
        assert_eq!(
            one::<i64>(&format!(
                "SELECT entry_version FROM billing.usage_events WHERE id = {e}"
            )),
            2
        );
        tamper(&format!(
            "UPDATE billing.usage_events SET debt_created = 1, cost = 31 WHERE id = {e}"
        ));
        assert!(
            problems().contains("carries a ledger entry that is not a whole debit of one grant"),
            "{}",
            problems()
        );
        tamper(&format!(
            "UPDATE billing.usage_events SET debt_created = 0, cost = 30 WHERE id = {e}"
        ));
        assert_eq!(problems(), "");
        tamper(&format!(
            "UPDATE billing.usage_events SET drains = '[]' WHERE id = {e}"
        ));
        assert!(
            problems().contains("has both its drains and a ledger entry, or neither"),
            "{}",
            problems()
        );
        tamper(&format!(
            "UPDATE billing.usage_events SET drains = NULL WHERE id = {e}"
        ));
        tamper(&format!(
            "UPDATE billing.ledger_entries SET event_id = {e} WHERE version = 1"
        ));
        assert!(
            problems().contains("carries its debit and has entries too"),
            "{}",
            problems()
        );
        tamper("UPDATE billing.ledger_entries SET event_id = NULL WHERE version = 1");
        assert_eq!(problems(), "");
        tamper(&format!(
            "UPDATE billing.usage_events SET pool_id = -1 WHERE id = {e}"
        ));
        assert!(
            problems().contains(&format!("usage event {e} names a missing pool")),
            "{}",
            problems()
        );
        tamper(&format!(
            "UPDATE billing.usage_events SET pool_id = (SELECT id FROM billing.pools LIMIT 1) WHERE id = {e}"
        ));
        let g: i64 = one("SELECT min(id) FROM billing.grants");
        tamper(&format!(
            "UPDATE billing.grants SET pool_id = -1 WHERE id = {g}"
        ));
        assert!(
            problems().contains(&format!("grant {g} names a missing pool")),
            "{}",
            problems()
        );
    }

    /// Tamper with `change`, expect `problem` reported, then `undo` and expect none.
    fn reported(change: &str, problem: &str, undo: &str) {
        tamper(change);
        assert!(problems().contains(problem), "{problem}: {}", problems());
        tamper(undo);
        assert_eq!(problems(), "", "after undoing: {change}");
    }

    #[pg_test]
    fn verify_ledger_checks_the_lanes_of_a_split_pool() {
        let g = grant("a", "mills", 1000, "");
        run("SELECT billing.set_lanes('a', 'mills', 2)");
        ingest("a", "mills", 10, "e1");
        ingest("a", "mills", 10, "e2");
        assert_eq!(problems(), "");
        assert!(
            one::<i64>(&format!(
                "SELECT count(*) FROM billing.grants WHERE parent_id = {g}"
            )) == 2
        );
        let share = format!("(SELECT min(id) FROM billing.grants WHERE parent_id = {g})");
        reported(
            "UPDATE billing.pools SET debt = 1 WHERE lane = 1",
            "lane 1: owes debt",
            "UPDATE billing.pools SET debt = 0 WHERE lane = 1",
        );
        reported(
            "UPDATE billing.pools SET held = 1 WHERE lane = 2",
            "lane 2: holds credit on hold",
            "UPDATE billing.pools SET held = 0 WHERE lane = 2",
        );
        reported(
            &format!("UPDATE billing.grants SET priority = 1 WHERE id = {share}"),
            "differs from the grant in kind, priority or window",
            &format!("UPDATE billing.grants SET priority = (SELECT priority FROM billing.grants WHERE id = {g}) WHERE id = {share}"),
        );
        let lane_pool: i64 = one(&format!(
            "SELECT pool_id FROM billing.grants WHERE id = {share}"
        ));
        reported(
            &format!("UPDATE billing.grants SET pool_id = (SELECT pool_id FROM billing.grants WHERE id = {g}) WHERE id = {share}"),
            "not on a lane of the grant's pool",
            &format!("UPDATE billing.grants SET pool_id = {lane_pool} WHERE id = {share}"),
        );
        reported(
            &format!("UPDATE billing.grants SET amount = 20 WHERE id = {g}"),
            "its lanes' shares hold more than its amount",
            &format!("UPDATE billing.grants SET amount = 1000 WHERE id = {g}"),
        );
        reported(
            &format!("UPDATE billing.ledger_entries SET grant_amount = grant_amount + 1, amount = amount + 1 \
                      WHERE kind = 'transfer' AND grant_id = {g}"),
            "transfers to and from its lanes' shares do not net to zero",
            &format!("UPDATE billing.ledger_entries SET grant_amount = grant_amount - 1, amount = amount - 1 \
                      WHERE kind = 'transfer' AND grant_id = {g}"),
        );
        tamper(&format!(
            "UPDATE billing.grants SET status = 'voided' WHERE id = {g}"
        ));
        assert!(
            problems().contains("keeps credit of a grant that is not spendable"),
            "{}",
            problems()
        );
    }

    // One list of entry kinds: the database's type and the core's enum agree.
    #[pg_test]
    fn entry_kinds_have_one_list() {
        let labels: String = one(
            "SELECT string_agg(enumlabel, ',' ORDER BY enumsortorder) FROM pg_enum \
             WHERE enumtypid = 'billing.entry_kind'::regtype",
        );
        let core: Vec<&str> = crate::ledger::EntryKind::ALL
            .iter()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(labels, core.join(","));
    }
}
