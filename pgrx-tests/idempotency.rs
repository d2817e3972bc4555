// docs/architecture.md, rule 2: every key applies at most once, forever; a replay returns the
// original outcome and writes nothing; the same key with different content is
// an error (SQLSTATE 23505) that writes nothing.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::support::*;

    const INGEST: &str = "SELECT concat_ws(',', event_id, cost, covered, debt_created, drains, available, entitled) \
                          FROM billing.ingest('a', 'mills', 2, key => 'k1', properties => '{\"model\": \"x\"}')";

    #[pg_test]
    fn a_read_only_transaction_answers_replays_but_cannot_lock_or_write_a_pool() {
        grant("a", "mills", 100, "");
        ingest("a", "mills", 10, "e1");
        assert_eq!(sqlstate("SELECT 1"), None); // its helper exists before read-only
        run("SET LOCAL transaction_read_only = on");
        // a replay is answered from its event: it locks nothing
        assert_eq!(
            one::<String>(
                "SELECT status FROM billing.ingest('a', 'mills', 1, key => 'e1', cost => 10)"
            ),
            "duplicate"
        );
        // a new key locks the pool, as SELECT … FOR UPDATE would: refused
        assert_eq!(
            sqlstate("SELECT billing.ingest('a', 'mills', 1, key => 'e2', cost => 10)").as_deref(),
            Some("25006")
        );
        assert_eq!(available("a", "mills"), 90, "the gate still reads");
    }

    #[pg_test]
    fn an_ingest_replay_returns_the_original_outcome() {
        grant("a", "mills", 100, "");
        let first: String = one(INGEST);
        grant("a", "mills", 50, ", kind => 'topup'"); // the pool changes in between
        let before = footprint();
        let replay: String = one(INGEST);
        assert_eq!(
            replay, first,
            "the original outcome, not the current balance"
        );
        assert_eq!(footprint(), before, "a replay writes nothing");
        let status: String = one("SELECT status FROM billing.ingest('a', 'mills', 2, key => 'k1', properties => '{\"model\": \"x\"}')");
        assert_eq!(status, "duplicate");
        assert_eq!(available("a", "mills"), 148);
    }

    #[pg_test]
    fn an_ingest_key_with_different_content_is_an_error() {
        grant("a", "mills", 100, "");
        run(INGEST);
        for changed in [
            "SELECT * FROM billing.ingest('a', 'mills', 3, key => 'k1', properties => '{\"model\": \"x\"}')",
            "SELECT * FROM billing.ingest('b', 'mills', 2, key => 'k1', properties => '{\"model\": \"x\"}')",
            "SELECT * FROM billing.ingest('a', 'mills', 2, key => 'k1', properties => '{\"model\": \"y\"}')",
            "SELECT * FROM billing.ingest('a', 'mills', 2, key => 'k1', properties => '{\"model\": \"x\"}', cost => 9)",
        ] {
            assert_rejected(changed, "23505");
        }
    }

    #[pg_test]
    fn a_key_stores_a_16_byte_fingerprint_that_tells_requests_apart() {
        grant("a", "mills", 100, ", key => 'g1'");
        ingest("a", "mills", 10, "e1");
        run("SELECT * FROM billing.reserve('a', 'mills', 5, key => 'h1')");
        let lengths: String = one("SELECT concat_ws(',', \
                 (SELECT octet_length(request_hash) FROM billing.grants WHERE key = 'g1'), \
                 (SELECT octet_length(request_hash) FROM billing.usage_events WHERE key = 'e1'), \
                 (SELECT octet_length(request_hash) FROM billing.holds WHERE key = 'h1'))");
        assert_eq!(lengths, "16,16,16");
        let status: String =
            one("SELECT status FROM billing.grant('a', 'mills', 100, key => 'g1')");
        assert_eq!(status, "duplicate");
        for changed in [
            "SELECT * FROM billing.grant('a', 'mills', 101, key => 'g1')",
            "SELECT * FROM billing.ingest('a', 'mills', 1, key => 'e1', cost => 11)",
            "SELECT * FROM billing.reserve('a', 'mills', 6, key => 'h1')",
        ] {
            assert_rejected(changed, "23505");
        }
    }

    #[pg_test]
    fn strict_may_differ_on_a_retry() {
        grant("a", "mills", 100, "");
        run("SELECT * FROM billing.ingest('a', 'mills', 1, key => 'k', cost => 10)");
        let status: String = one("SELECT status FROM billing.ingest('a', 'mills', 1, key => 'k', cost => 10, strict => true)");
        assert_eq!(status, "duplicate");
    }

    #[pg_test]
    fn a_rejected_strict_event_does_not_burn_its_key() {
        grant("a", "mills", 10, "");
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'mills', 1, key => 'k', cost => 20, strict => true)",
            "23514",
        );
        grant("a", "mills", 10, ", kind => 'topup'");
        let status: String = one("SELECT status FROM billing.ingest('a', 'mills', 1, key => 'k', cost => 20, strict => true)");
        assert_eq!(status, "applied");
    }

    #[pg_test]
    fn a_grant_replay_returns_the_original_outcome() {
        run("SELECT * FROM billing.define_unit('mills')");
        run("SELECT * FROM billing.ingest('a', 'mills', 1, key => 'e', cost => 30)");
        let q = "SELECT concat_ws(',', grant_id, amount, remaining, debt_repaid, available) \
                 FROM billing.grant('a', 'mills', 100, kind => 'topup', key => 'pi_1')";
        let first: String = one(q);
        ingest("a", "mills", 5, "e2");
        let before = footprint();
        assert_eq!(one::<String>(q), first);
        assert_eq!(footprint(), before);
        assert_eq!(available("a", "mills"), 65, "credited once");
        assert_rejected(
            "SELECT * FROM billing.grant('a', 'mills', 101, kind => 'topup', key => 'pi_1')",
            "23505",
        );
        assert_rejected(
            "SELECT * FROM billing.grant('a', 'mills', 100, kind => 'promo', key => 'pi_1')",
            "23505",
        );
        assert_rejected(
            "SELECT * FROM billing.grant('b', 'mills', 100, kind => 'topup', key => 'pi_1')",
            "23505",
        );
    }

    #[pg_test]
    fn a_hold_replay_returns_the_original_hold() {
        grant("a", "mills", 100, "");
        let q = "SELECT concat_ws(',', hold_id, amount, expires_at, available) FROM billing.reserve('a', 'mills', 40, key => 'h')";
        let first: String = one(q);
        let before = footprint();
        assert_eq!(one::<String>(q), first);
        assert_eq!(footprint(), before);
        assert_eq!(available("a", "mills"), 60);
        assert_rejected(
            "SELECT * FROM billing.reserve('a', 'mills', 41, key => 'h')",
            "23505",
        );
    }

    #[pg_test]
    fn a_settle_replay_returns_the_original_settlement() {
        grant("a", "mills", 100, "");
        let h: i64 = one("SELECT hold_id FROM billing.reserve('a', 'mills', 40)");
        let q = format!("SELECT concat_ws(',', held, actual, covered, drains, available) FROM billing.settle({h}, 30, key => 's1')");
        let first: String = one(&q);
        grant("a", "mills", 500, ", kind => 'topup'");
        let before = footprint();
        assert_eq!(one::<String>(&q), first);
        assert_eq!(footprint(), before);
        assert_rejected(
            &format!("SELECT * FROM billing.settle({h}, 31, key => 's1')"),
            "23505",
        );
        assert_rejected(
            &format!("SELECT * FROM billing.settle({h}, 30, key => 'other')"),
            "23505",
        );
    }

    #[pg_test]
    fn batch_ingest_is_idempotent_within_and_across_calls() {
        grant("a", "mills", 100, "");
        let batch = r#"'[{"account":"a","meter":"mills","quantity":3,"key":"b1"},
                         {"account":"a","meter":"mills","quantity":4,"key":"b2"},
                         {"account":"a","meter":"mills","quantity":3,"key":"b1"}]'"#;
        let rows: String = one(&format!(
            "SELECT string_agg(key || ':' || status || ':' || cost, ',') FROM billing.ingest_batch({batch})"
        ));
        assert_eq!(rows, "b1:applied:3,b2:applied:4,b1:duplicate:3");
        let before = footprint();
        let rows: String = one(&format!(
            "SELECT string_agg(key || ':' || status, ',') FROM billing.ingest_batch({batch})"
        ));
        assert_eq!(rows, "b1:duplicate,b2:duplicate,b1:duplicate");
        assert_eq!(footprint(), before);
        assert_eq!(available("a", "mills"), 93);
        assert_rejected(
            r#"SELECT * FROM billing.ingest_batch('[{"account":"a","meter":"mills","quantity":5,"key":"b2"}]')"#,
            "23505",
        );
        assert_ledger_consistent();
    }
}
