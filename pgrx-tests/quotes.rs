// Top-up quotes: the card fee paid on top, exact to the minor unit across
// the tenant's fee schedule, within its limits (src/quotes; the arithmetic
// is tested exhaustively in src/quotes/price.rs).

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::support::*;

    fn schedule() {
        for (kind, percent) in [
            ("domestic", "2.9"),
            ("international", "3.9"),
            ("amex_domestic", "3.5"),
            ("amex_international", "4.4"),
        ] {
            run(&format!(
                "SELECT * FROM billing.set_topup_fee('usd', '{kind}', {percent}, 30)"
            ));
        }
        run("SELECT * FROM billing.set_topup_limits('usd', 500, 100000, conversion_percent => 1)");
    }

    /// "credit fee total percent fixed" of a quote.
    fn quote(args: &str) -> String {
        one(&format!(
            "SELECT concat_ws(' ', credit, fee, total, percent, fixed) FROM billing.quote({args})"
        ))
    }

    #[pg_test]
    fn the_fee_is_paid_on_top_exactly() {
        schedule();
        assert_eq!(quote("1000, 'usd', 'domestic'"), "1000 61 1061 2.9 30");
        // 3.9% + 1% conversion: 1,084 leaves 1,084 − ceil(53.116) − 30 = 1,000
        assert_eq!(
            quote("1000, 'usd', 'international', converted => true"),
            "1000 84 1084 4.9 30"
        );
        assert_eq!(
            quote("2500, 'usd', 'amex_domestic'"),
            "2500 122 2622 3.5 30"
        );
        assert_eq!(
            quote("100000, 'usd', 'amex_international'"),
            "100000 4634 104634 4.4 30"
        );
        // setting a fee again replaces it
        run("SELECT * FROM billing.set_topup_fee('usd', 'domestic', 0, 0)");
        assert_eq!(quote("1000, 'usd', 'domestic'"), "1000 0 1000 0 0");
        assert_eq!(one::<i64>("SELECT count(*) FROM billing.topup_fees"), 4);
    }

    #[pg_test]
    fn quotes_outside_the_schedule_or_limits_are_refused() {
        schedule();
        for bad in [
            "499, 'usd', 'domestic'",
            "100001, 'usd', 'domestic'",
            "0, 'usd', 'domestic'",
            "1000, 'usd', 'visa_gold'",
            "1000, 'USD', 'domestic'",
            "1000, 'eur', 'domestic'",
        ] {
            assert_rejected(&format!("SELECT * FROM billing.quote({bad})"), "22023");
        }
        for bad in [
            "billing.set_topup_fee('usd', 'domestic', 100, 30)",
            "billing.set_topup_fee('usd', 'domestic', -1, 30)",
            "billing.set_topup_fee('usd', 'domestic', 2.9, -1)",
            "billing.set_topup_fee('usd', 'Domestic', 2.9, 30)",
            "billing.set_topup_limits('usd', 500, 499)",
            "billing.set_topup_limits('usd', 0, 499)",
            "billing.set_topup_limits('usd', 500, 1000, conversion_percent => 100)",
            "billing.set_topup_fee('usd', 'domestic', 2.90001, 30)",
        ] {
            assert_rejected(&format!("SELECT * FROM {bad}"), "22023");
        }
        assert_eq!(
            quote("1000, 'usd', 'domestic'"),
            "1000 61 1061 2.9 30",
            "a refused change changes nothing"
        );
        // a currency with fees but no limits row: any credit, and a
        // converted card is never quoted as if conversion were free
        run("SELECT * FROM billing.set_topup_fee('eur', 'domestic', 1.5, 25)");
        assert_eq!(
            quote("1000000, 'eur', 'domestic'"),
            "1000000 15254 1015254 1.5 25"
        );
        assert_rejected(
            "SELECT * FROM billing.quote(1000, 'eur', 'domestic', converted => true)",
            "22023",
        );
    }
}
