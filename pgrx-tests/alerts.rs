// Balance alerts (sql/alerts.sql): one alert per crossing, in the debit's
// own transaction, re-armed when a credit brings the pool back; zero and debt
// rules; acknowledgement. Rollback is tested over real connections
// (tests/client/tests/alerts.rs).

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::support::*;

    fn setup() {
        grant("a", "cents", 1000, "");
        run("SELECT billing.define_meter('calls', 'cents', unit_price => 1)");
    }

    fn spend(amount: i64, key: &str) {
        run(&format!(
            "SELECT * FROM billing.ingest('a', 'calls', {amount}, key => '{key}')"
        ));
    }

    /// "name:available" of every alert fired, oldest first.
    fn fired() -> String {
        opt::<String>(
            "SELECT string_agg(name || ':' || available, ' ' ORDER BY id) FROM billing.alerts",
        )
        .unwrap_or_default()
    }

    #[pg_test]
    fn an_alert_fires_once_per_crossing_and_rearms_when_credit_comes_back() {
        setup();
        run("SELECT * FROM billing.set_alert('a', 'cents', 'low', 'low_balance', 500)");
        spend(400, "e1");
        assert_eq!(fired(), "", "600 is not below 500");
        spend(200, "e2");
        assert_eq!(fired(), "low:400");
        spend(100, "e3");
        run("SELECT * FROM billing.reserve('a', 'cents', 50)");
        assert_eq!(fired(), "low:400", "once per crossing");
        // a credit that does not bring it back leaves it disarmed
        grant("a", "cents", 50, "");
        spend(10, "e4");
        assert_eq!(fired(), "low:400");
        // back to 500 or more re-arms it; the next crossing fires again
        grant("a", "cents", 1000, "");
        assert!(one::<bool>(
            "SELECT armed FROM billing.alert_rules WHERE name = 'low'"
        ));
        spend(1000, "e5");
        assert_eq!(fired(), "low:400 low:290");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn zero_and_debt_alerts_fire_at_their_own_conditions() {
        setup();
        run("SELECT * FROM billing.set_alert('a', 'cents', 'empty', 'zero')");
        run("SELECT * FROM billing.set_alert('a', 'cents', 'owes', 'debt')");
        spend(999, "e1");
        assert_eq!(fired(), "");
        spend(1, "e2");
        assert_eq!(fired(), "empty:0", "at 0, not yet in debt");
        spend(30, "e3");
        assert_eq!(fired(), "empty:0 owes:-30");
        assert_eq!(
            one::<i64>("SELECT debt FROM billing.alerts WHERE name = 'owes'"),
            30
        );
        // a top-up pays the debt and re-arms both
        grant("a", "cents", 100, "");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.alert_rules WHERE armed"),
            2
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn alerts_are_acknowledged_once_and_rules_can_be_replaced_or_removed() {
        setup();
        run("SELECT * FROM billing.set_alert('a', 'cents', 'low', 'low_balance', 500)");
        spend(600, "e1");
        let id: i64 = one("SELECT id FROM billing.alerts");
        assert_eq!(
            one::<String>(&format!(
                "SELECT acknowledged_by FROM billing.ack_alert({id}, 'ops')"
            )),
            "ops"
        );
        assert_eq!(
            one::<String>(&format!(
                "SELECT acknowledged_by FROM billing.ack_alert({id}, 'someone else')"
            )),
            "ops",
            "the first acknowledgement stays"
        );
        assert_rejected("SELECT * FROM billing.ack_alert(999999)", "42704");
        // replacing a rule re-arms it; the pool keeps the highest armed threshold
        run("SELECT * FROM billing.set_alert('a', 'cents', 'low', 'low_balance', 300)");
        run("SELECT * FROM billing.set_alert('a', 'cents', 'lower', 'low_balance', 100)");
        assert_eq!(
            one::<i64>("SELECT alert_below FROM billing.pools WHERE account = 'a'"),
            300
        );
        assert!(one::<bool>(
            "SELECT billing.remove_alert('a', 'cents', 'low')"
        ));
        assert!(!one::<bool>(
            "SELECT billing.remove_alert('a', 'cents', 'low')"
        ));
        assert_eq!(
            one::<i64>("SELECT alert_below FROM billing.pools WHERE account = 'a'"),
            100
        );
        for (args, state) in [
            ("'a', 'cents', 'x', 'low_balance'", "22023"),
            ("'a', 'cents', 'x', 'zero', 5", "22023"),
            ("'a', 'cents', 'x', 'sometimes'", "22023"),
            ("'a', 'cents', 'bad name', 'zero'", "22023"),
            ("'a', 'no_such_unit', 'x', 'zero'", "42704"),
        ] {
            assert_rejected(&format!("SELECT * FROM billing.set_alert({args})"), state);
        }
        // a split pool and an alert exclude each other
        assert_rejected("SELECT billing.set_lanes('a', 'cents', 4)", "55000");
        grant("b", "cents", 1000, "");
        run("SELECT billing.set_lanes('b', 'cents', 4)");
        assert_rejected(
            "SELECT * FROM billing.set_alert('b', 'cents', 'low', 'zero')",
            "55000",
        );
    }
}
