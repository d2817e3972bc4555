// Holds: reserve an estimate, settle the actual or release it; an expired
// hold stops counting without any job.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::support::*;

    fn reserve(amount: i64, extra: &str) -> i64 {
        one(&format!(
            "SELECT hold_id FROM billing.reserve('a', 'mills', {amount}{extra})"
        ))
    }

    #[pg_test]
    fn a_hold_reduces_availability_until_settled() {
        let g = grant("a", "mills", 1000, "");
        let h = reserve(400, "");
        assert_eq!(available("a", "mills"), 600);
        assert_eq!(remaining(g), 1000, "a hold drains nothing");
        let row: String = one(&format!(
            "SELECT concat_ws(',', status, held, actual, covered, debt_created, available, entitled) FROM billing.settle({h}, 250)"
        ));
        assert_eq!(row, "settled,400,250,250,0,750,t");
        assert_eq!(remaining(g), 750);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_reservation_beyond_available_is_refused_and_writes_nothing() {
        grant("a", "mills", 100, "");
        reserve(60, "");
        assert_rejected("SELECT * FROM billing.reserve('a', 'mills', 41)", "23514");
        reserve(40, "");
        assert_eq!(available("a", "mills"), 0);
        assert_rejected(
            "SELECT * FROM billing.ingest('a', 'mills', 1, key => 's', cost => 1, strict => true)",
            "23514",
        );
    }

    #[pg_test]
    fn settling_above_the_estimate_records_the_actual_cost() {
        grant("a", "mills", 100, "");
        let h = reserve(50, "");
        let row: String = one(&format!(
            "SELECT concat_ws(',', covered, debt_created, available, entitled) FROM billing.settle({h}, 130)"
        ));
        assert_eq!(row, "100,30,-30,f");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn release_returns_the_reservation() {
        grant("a", "mills", 100, "");
        let h = reserve(70, "");
        let row: String = one(&format!(
            "SELECT concat_ws(',', status, released, available) FROM billing.release({h})"
        ));
        assert_eq!(row, "released,70,100");
        let again: String = one(&format!("SELECT status FROM billing.release({h})"));
        assert_eq!(again, "duplicate");
        assert_rejected(&format!("SELECT * FROM billing.settle({h}, 10)"), "55000");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_settled_hold_cannot_be_released() {
        grant("a", "mills", 100, "");
        let h = reserve(70, "");
        run(&format!("SELECT * FROM billing.settle({h}, 10)"));
        assert_rejected(&format!("SELECT * FROM billing.release({h})"), "55000");
    }

    #[pg_test]
    fn an_expired_hold_stops_counting_without_a_job() {
        grant("a", "mills", 100, "");
        let h = reserve(70, ", ttl => interval '10 minutes'");
        travel("a", "9 minutes 59 seconds");
        assert_eq!(available("a", "mills"), 30);
        travel("a", "1 second");
        assert_eq!(
            available("a", "mills"),
            100,
            "expired exactly at expires_at"
        );
        // the next write records the expiry
        ingest("a", "mills", 1, "e1");
        let status: String = one(&format!("SELECT status FROM billing.holds WHERE id = {h}"));
        assert_eq!(status, "expired");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.ledger WHERE kind = 'hold_expire'"),
            1
        );
        let released: String = one(&format!("SELECT status FROM billing.release({h})"));
        assert_eq!(released, "expired");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn settling_after_expiry_still_records_the_usage() {
        grant("a", "mills", 100, "");
        let h = reserve(70, ", ttl => interval '1 minute'");
        travel("a", "5 minutes");
        let row: String = one(&format!("SELECT concat_ws(',', status, actual, covered, available) FROM billing.settle({h}, 60)"));
        assert_eq!(row, "settled,60,60,40");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn hold_ttl_and_amount_are_validated() {
        grant("a", "mills", 100, "");
        assert_rejected("SELECT * FROM billing.reserve('a', 'mills', 0)", "22023");
        assert_rejected("SELECT * FROM billing.reserve('a', 'mills', -5)", "22023");
        assert_rejected(
            "SELECT * FROM billing.reserve('a', 'mills', 5, ttl => interval '0')",
            "22023",
        );
        assert_rejected(
            "SELECT * FROM billing.reserve('a', 'mills', 5, ttl => interval '1 month')",
            "22023",
        );
        assert_rejected("SELECT * FROM billing.settle(424242, 5)", "42704");
    }
}
