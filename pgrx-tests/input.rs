// Bad input gets a specific SQLSTATE and writes nothing.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::support::*;

    #[pg_test]
    fn amounts_must_be_positive_and_fit_a_bigint() {
        grant("a", "mills", 100, "");
        assert_rejected("SELECT * FROM billing.grant('a', 'mills', 0)", "22023");
        assert_rejected("SELECT * FROM billing.grant('a', 'mills', -1)", "22023");
        assert_rejected(
            "SELECT * FROM billing.grant('a', 'mills', 9223372036854775807)",
            "22003",
        );
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'mills', 1, key => 'k', cost => -1)",
            "22023",
        );
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'mills', -1, key => 'k')",
            "22023",
        );
        assert_rejected("SELECT * FROM billing.check('a', 'mills', -1)", "22023");
        assert_rejected("SELECT * FROM billing.settle(1, -1)", "22023");
    }

    #[pg_test]
    fn a_cost_that_overflows_is_an_error_not_a_wrap() {
        run("SELECT billing.define_meter('tokens', 'mills', unit_price => 1000)");
        grant("a", "mills", 100, "");
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'tokens', 9223372036854776, key => 'k')",
            "22003",
        );
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'tokens', 1e40, key => 'k')",
            "22023",
        );
        run("SELECT * FROM billing.ingest('a', 'mills', 1, key => 'd1', cost => 9223372036854775807)");
        assert_rejected("SELECT * FROM billing.ingest('a', 'mills', 1, key => 'd2', cost => 9223372036854775807)", "22003");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn keys_accounts_and_names_are_validated() {
        grant("a", "mills", 100, "");
        let long = "x".repeat(256);
        assert_rejected("SELECT * FROM billing.ingest('a', 'mills', 1)", "22023"); // no key
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'mills', 1, key => '')",
            "22023",
        );
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'mills', 1, key => '   ')",
            "22023",
        );
        assert_rejected(
            &format!("SELECT * FROM billing.ingest('a', 'mills', 1, key => '{long}')"),
            "22023",
        );
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'mills', 1, key => E'k\\n1')",
            "22023",
        );
        assert_rejected("SELECT * FROM billing.grant('', 'mills', 1)", "22023");
        assert_rejected(
            &format!(
                "SELECT * FROM billing.grant('{}', 'mills', 1)",
                "a".repeat(129)
            ),
            "22023",
        );
        assert_rejected("SELECT * FROM billing.grant('a', 'Mills', 1)", "22023");
        assert_rejected("SELECT * FROM billing.grant('a', 'usd mills', 1)", "22023");
        assert_rejected(
            "SELECT * FROM billing.grant('a', 'mills''; DROP TABLE billing.grants; --', 1)",
            "22023",
        );
        assert_rejected(
            "SELECT * FROM billing.grant('a', 'mills', 1, kind => 'gift')",
            "22023",
        );
        assert_rejected(
            "SELECT * FROM billing.grant('a', 'mills', 1, priority => -1)",
            "22023",
        );
        // an account id may be any printable text, including quotes and unicode
        run("SELECT * FROM billing.grant('o''brien ☃', 'mills', 1)");
        assert_eq!(available("o''brien ☃", "mills"), 1);
    }

    #[pg_test]
    fn unknown_meters_and_units_are_errors() {
        grant("a", "mills", 100, "");
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'nope', 1, key => 'k')",
            "42704",
        );
        assert_rejected("SELECT * FROM billing.reserve('a', 'nope', 1)", "42704");
        assert_rejected("SELECT * FROM billing.set_floor('a', 'nope', 1)", "42704");
        run("SELECT billing.define_meter('calls', 'mills')");
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'calls', 1, key => 'k')",
            "22023",
        ); // no price, no cost
    }

    #[pg_test]
    fn windows_and_timestamps_are_validated() {
        assert_rejected(
            "SELECT * FROM billing.grant('a', 'mills', 1, expires_at => now())",
            "22023",
        );
        assert_rejected(
            "SELECT * FROM billing.grant('a', 'mills', 1, expires_at => now() - interval '1 day')",
            "22023",
        );
        assert_rejected(
            "SELECT * FROM billing.grant('a', 'mills', 1, effective_at => now() + interval '2 days', expires_at => now() + interval '1 day')",
            "22023",
        );
        assert_rejected(
            "SELECT * FROM billing.grant('a', 'mills', 1, expires_at => 'infinity')",
            "22023",
        );
        grant("a", "mills", 100, "");
        assert_rejected("SELECT * FROM billing.ingest('a', 'mills', 1, key => 'k', occurred_at => now() + interval '1 hour')", "22023");
        assert_rejected("SELECT * FROM billing.ingest('a', 'mills', 1, key => 'k', occurred_at => now() - interval '400 days')", "22023");
    }

    #[pg_test]
    fn json_must_be_a_bounded_object() {
        grant("a", "mills", 100, "");
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'mills', 1, key => 'k', properties => '[1]')",
            "22023",
        );
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'mills', 1, key => 'k', properties => jsonb_build_object('x', repeat('y', 20000)))",
            "22023",
        );
        assert_rejected(
            "SELECT * FROM billing.grant('a', 'mills', 1, metadata => '\"text\"')",
            "22023",
        );
        assert_rejected("SELECT * FROM billing.ingest_batch('{}')", "22023");
        assert_rejected(
            r#"SELECT * FROM billing.ingest_batch('[{"account":"a","meter":"mills"}]')"#,
            "22023",
        );
        assert_rejected(
            r#"SELECT * FROM billing.ingest_batch('[{"account":"a","meter":"mills","key":"k","cost":-1}]')"#,
            "22023",
        );
    }

    #[pg_test]
    fn json_nested_beyond_the_parser_limit_is_a_clear_error() {
        grant("a", "mills", 100, "");
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let obj = format!("{{\"x\": {deep}}}");
        assert_rejected(
            &format!(
                "SELECT * FROM billing.ingest('a', 'mills', 1, key => 'k', properties => '{obj}')"
            ),
            "22023",
        );
        assert_rejected(
            &format!("SELECT * FROM billing.grant('a', 'mills', 1, metadata => '{obj}')"),
            "22023",
        );
        assert_rejected(
            &format!("SELECT * FROM billing.reserve('a', 'mills', 1, metadata => '{obj}')"),
            "22023",
        );
        assert_rejected(
            &format!("SELECT * FROM billing.account('a', metadata => '{obj}')"),
            "22023",
        );
        assert_rejected(
            &format!("SELECT * FROM billing.ingest_batch('{deep}')"),
            "22023",
        );
    }

    #[pg_test]
    fn a_bad_event_in_a_batch_writes_nothing_at_all() {
        grant("a", "mills", 100, "");
        assert_rejected(
            r#"SELECT * FROM billing.ingest_batch('[{"account":"a","meter":"mills","key":"ok","quantity":1},
                                                   {"account":"a","meter":"nope","key":"bad","quantity":1}]')"#,
            "42704",
        );
    }

    #[pg_test]
    fn the_tenant_setting_is_validated() {
        run("SET LOCAL billing.tenant = 'bad tenant!'");
        assert_rejected("SELECT * FROM billing.grant('a', 'mills', 1)", "22023");
        run("SET LOCAL billing.tenant = ''");
        grant("a", "mills", 1, "");
        assert_eq!(
            one::<String>("SELECT tenant_id FROM billing.grants"),
            "default"
        );
    }

    #[pg_test]
    fn ledger_rows_cannot_be_updated_or_deleted() {
        grant("a", "mills", 100, "");
        ingest("a", "mills", 1, "k");
        assert_rejected("UPDATE billing.ledger_entries SET amount = 0", "42501");
        assert_rejected("DELETE FROM billing.ledger_entries", "42501");
        assert_rejected("UPDATE billing.usage_events SET cost = 0", "42501");
        assert_rejected("DELETE FROM billing.usage_events", "42501");
    }
}
