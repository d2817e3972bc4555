// Operator counters (sql/metrics.sql): open work and debt per tenant and
// label, PostgreSQL's own counts of rows written.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::support::*;

    /// "tenant:label:value" of one metric, in order.
    fn metric(name: &str) -> String {
        opt::<String>(&format!(
            "SELECT string_agg(concat_ws(':', tenant, label, value), ' ' ORDER BY tenant, label) \
             FROM billing.metrics() WHERE metric = '{name}'"
        ))
        .unwrap_or_default()
    }

    #[pg_test]
    fn the_counters_say_what_is_open_and_owed_per_tenant() {
        for tenant in ["default", "other"] {
            run(&format!("SET LOCAL billing.tenant = '{tenant}'"));
            grant("a", "cents", 100, "");
            run("SELECT billing.define_meter('calls', 'cents', unit_price => 1)");
            ingest("a", "calls", 150, "owes"); // 50 of debt
        }
        run("SET LOCAL billing.tenant = 'default'");
        grant("b", "cents", 1000, "");
        run("SELECT * FROM billing.set_alert('b', 'cents', 'low', 'low_balance', 900)");
        run("SELECT * FROM billing.reserve('b', 'cents', 200)");
        run("SELECT * FROM billing.reserve('b', 'cents', 100)");
        run("SELECT * FROM billing.release((SELECT max(id) FROM billing.holds))");
        assert_eq!(metric("accounts_in_debt"), "default:cents:1 other:cents:1");
        assert_eq!(metric("debt_owed"), "default:cents:50 other:cents:50");
        assert_eq!(metric("holds_open"), "default:cents:1");
        assert_eq!(metric("alerts_open"), "default:low_balance:1");
        assert_eq!(metric("grant_approvals_pending"), "");
        // this server does not preload pg_billing: no usage answers are kept
        // (counted in shared memory; tests/client/tests/metrics.rs preloads)
        assert_eq!(metric("usage_events_answered"), "");
        // rows written are PostgreSQL's statistics: present, never negative
        assert!(one::<bool>(
            "SELECT value >= 0 FROM billing.metrics() WHERE metric = 'usage_events_written'"
        ));
        // an application's role reads no other tenant's counters
        assert!(!one::<bool>(
            "SELECT has_function_privilege('billing_app', 'billing.metrics()', 'EXECUTE')"
        ));
        assert!(one::<bool>(
            "SELECT has_function_privilege('pg_monitor', 'billing.metrics()', 'EXECUTE')"
        ));
    }
}
