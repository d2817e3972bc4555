// Checkout confirmed by polling (sql/checkouts.sql): an intent opened once
// per key with its quote, confirmed with what the provider says was paid,
// once, whether the application's poll or Stripe's webhook reports it first;
// a status a front end can poll, exact at the expiry instant. Concurrent
// confirms are tested over real connections (tests/client/tests/checkouts.rs).

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;
    use serde_json::json;

    use crate::pgrx_tests::stripe;
    use crate::pgrx_tests::support::*;

    /// A 2.9% + 30¢ card, and account `a` with 100 cents.
    fn setup() {
        run("SELECT * FROM billing.set_topup_fee('usd', 'card', 2.9, 30)");
        grant("a", "usd_cents", 100, ", key => 'g0'");
    }

    /// Open an intent for $10.00 of credit under `key`: its id.
    fn open(key: &str) -> i64 {
        one(&format!(
            "SELECT intent_id FROM billing.open_checkout('a', 'usd_cents', 1000, 'usd', 'card', '{key}')"
        ))
    }

    fn status(intent: i64) -> String {
        one(&format!(
            "SELECT concat_ws(' ', status, credited, note) FROM billing.checkout_status({intent})"
        ))
    }

    fn confirm(intent: i64, payment: &str, paid: i64) -> String {
        one(&format!(
            "SELECT concat_ws(' ', status, credited, available) \
             FROM billing.confirm_checkout({intent}, '{payment}', {paid}, 'usd')"
        ))
    }

    fn intents() -> i64 {
        one("SELECT count(*) FROM billing.checkout_intents")
    }

    #[pg_test]
    fn an_intent_is_opened_once_per_key_with_its_quote() {
        setup();
        assert_eq!(
            one::<String>(
                "SELECT concat_ws(' ', status, credits, credit_minor, fee, total, outcome, \
                        expires_at - now()) \
                 FROM billing.open_checkout('a', 'usd_cents', 1000, 'usd', 'card', 'co_1')"
            ),
            "pending 1000 1000 61 1061 opened 01:00:00"
        );
        assert_eq!(
            one::<String>(
                "SELECT outcome FROM billing.open_checkout('a', 'usd_cents', 1000, 'usd', 'card', 'co_1')"
            ),
            "duplicate"
        );
        // a mills pool buys 10 credits per cent
        run("SELECT billing.define_unit('usd_mills')");
        assert_eq!(
            one::<i64>(
                "SELECT credits FROM billing.open_checkout('a', 'usd_mills', 1000, 'usd', 'card', 'co_2', \
                 credits_per_minor_unit => 10)"
            ),
            10000
        );
        run("SELECT * FROM billing.set_topup_limits('usd', 500, 100000)");
        for (args, state) in [
            ("'a', 'usd_cents', 2000, 'usd', 'card', 'co_1'", "23505"),
            ("'a', 'usd_cents', 499, 'usd', 'card', 'co_3'", "22023"),
            ("'a', 'usd_cents', 1000, 'usd', 'amex', 'co_3'", "22023"),
            ("'a', 'usd_cents', 1000, 'eur', 'card', 'co_3'", "22023"),
            ("'a', 'no_such_unit', 1000, 'usd', 'card', 'co_3'", "42704"),
            ("'a', 'usd_cents', 1000, 'usd', 'card', ''", "22023"),
            (
                "'a', 'usd_cents', 1000, 'usd', 'card', 'co_3', expires_in => '-1 hour'",
                "22023",
            ),
        ] {
            assert_rejected(
                &format!("SELECT * FROM billing.open_checkout({args})"),
                state,
            );
            assert_eq!(intents(), 2, "{args}");
        }
    }

    #[pg_test]
    fn confirming_credits_what_was_paid_once() {
        setup();
        let first = open("co_1");
        assert_eq!(confirm(first, "pi_1", 1061), "paid 1000 1100");
        assert_eq!(
            one::<String>(
                "SELECT concat_ws(' ', kind, amount) FROM billing.grants WHERE key = 'stripe:pi_1'"
            ),
            "topup 1000"
        );
        assert_eq!(confirm(first, "pi_1", 1061), "duplicate 1000 1100");
        let second = open("co_2");
        for (sql, state) in [
            (
                format!("SELECT * FROM billing.confirm_checkout({first}, 'pi_1', 1000, 'usd')"),
                "23505",
            ),
            (
                format!("SELECT * FROM billing.confirm_checkout({first}, 'pi_2', 1061, 'usd')"),
                "23505",
            ),
            (
                format!("SELECT * FROM billing.confirm_checkout({second}, 'pi_1', 1061, 'usd')"),
                "23505",
            ),
            (
                format!("SELECT * FROM billing.confirm_checkout({second}, 'pi_2', 1061, 'eur')"),
                "22023",
            ),
            (
                format!("SELECT * FROM billing.confirm_checkout({second}, 'pi_2', -5, 'usd')"),
                "22023",
            ),
            (
                "SELECT * FROM billing.confirm_checkout(999999, 'pi_2', 1061, 'usd')".to_string(),
                "42704",
            ),
        ] {
            assert_rejected(&sql, state);
        }
        // less than the total: what was paid, net of the worst-case fee
        // (1,000 − ceil(29) − 30 = 941), never the quoted credit
        assert_eq!(confirm(second, "pi_2", 1000), "paid 941 2041");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn the_status_expires_at_its_instant_and_a_late_payment_still_credits() {
        setup();
        let intent = open("co_1");
        assert_eq!(status(intent), "pending");
        run(&format!(
            "UPDATE billing.checkout_intents SET expires_at = now() + interval '1 microsecond' WHERE id = {intent}"
        ));
        assert_eq!(status(intent), "pending", "one microsecond before");
        run(&format!(
            "UPDATE billing.checkout_intents SET expires_at = now() WHERE id = {intent}"
        ));
        assert_eq!(status(intent), "expired");
        assert_eq!(confirm(intent, "pi_1", 1061), "paid 1000 1100");
        let note: String = one(&format!(
            "SELECT note FROM billing.checkout_status({intent})"
        ));
        assert!(note.starts_with("confirmed after it expired at "), "{note}");
        // a failed one, too
        let failed = open("co_2");
        run(&format!(
            "SELECT billing.fail_checkout({failed}, 'canceled by the customer')"
        ));
        assert_eq!(status(failed), "failed canceled by the customer");
        assert_eq!(confirm(failed, "pi_2", 1061), "paid 1000 2100");
        assert_rejected(
            &format!("SELECT billing.fail_checkout({failed}, 'x')"),
            "55000",
        );
        // and an intent of another tenant is not there
        run("SET LOCAL billing.tenant = 'other'");
        assert_eq!(
            one::<i64>(&format!(
                "SELECT count(*) FROM billing.checkout_status({intent})"
            )),
            0
        );
        assert_rejected(
            &format!("SELECT * FROM billing.confirm_checkout({intent}, 'pi_9', 1061, 'usd')"),
            "42704",
        );
    }

    fn session_event(id: &str, cs: &str, pi: &str, metadata: serde_json::Value) -> String {
        stripe::event(
            id,
            "checkout.session.completed",
            stripe::now_unix(),
            stripe::checkout_session(cs, pi, 1061, "usd", metadata),
        )
    }

    #[pg_test]
    fn the_poll_and_the_webhook_credit_a_payment_once_whoever_is_first() {
        stripe::setup();
        setup();
        // the webhook first: its session was attached to the intent (no metadata needed)
        let first = open("co_1");
        run(&format!("SELECT billing.attach_checkout({first}, 'cs_1')"));
        // attached once: the same session again is a no-op, another is refused
        run(&format!("SELECT billing.attach_checkout({first}, 'cs_1')"));
        assert_rejected(
            &format!("SELECT billing.attach_checkout({first}, 'cs_other')"),
            "23505",
        );
        assert_rejected(
            &format!("SELECT billing.attach_checkout({first}, '')"),
            "22023",
        );
        assert_eq!(
            stripe::deliver(&session_event("evt_1", "cs_1", "pi_1", json!({}))),
            "applied|"
        );
        assert_eq!(status(first), "paid 1000");
        assert_eq!(confirm(first, "pi_1", 1061), "duplicate 1000 1100");
        // the PaymentIntent's own event (naming the account) credits nothing more
        let pi = stripe::payment_intent("pi_1", 1061, "usd", "a");
        assert_eq!(
            stripe::deliver(&stripe::event(
                "evt_2",
                "payment_intent.succeeded",
                stripe::now_unix(),
                pi
            )),
            "applied|"
        );
        // the poll first: the webhook names the intent in metadata
        let second = open("co_2");
        assert_eq!(confirm(second, "pi_2", 1061), "paid 1000 2100");
        let event = session_event(
            "evt_3",
            "cs_2",
            "pi_2",
            json!({"checkout_intent": second.to_string()}),
        );
        assert_eq!(stripe::deliver(&event), "applied|");
        // the PaymentIntent's own event first, naming the account and no intent:
        // a plain top-up of what was paid, which the poll then adopts
        let third = open("co_3");
        let pi = stripe::payment_intent("pi_3", 1061, "usd", "a");
        assert_eq!(
            stripe::deliver(&stripe::event(
                "evt_5",
                "payment_intent.succeeded",
                stripe::now_unix(),
                pi
            )),
            "applied|"
        );
        assert_eq!(confirm(third, "pi_3", 1061), "paid 1061 3161");
        assert_eq!(
            status(third),
            "paid 1061 credited by the provider's webhook as a top-up of what was paid"
        );
        assert_eq!(
            one::<String>(
                "SELECT string_agg(kind || ':' || amount, ' ' ORDER BY id) FROM billing.grants"
            ),
            "manual:100 topup:1000 topup:1000 topup:1061"
        );
        // a refund of the first payment takes its credit back
        let refund = stripe::event(
            "evt_4",
            "charge.refunded",
            stripe::now_unix(),
            stripe::charge("pi_1", 1061, 1061, "usd"),
        );
        assert_eq!(stripe::deliver(&refund), "applied|");
        assert_eq!(available("a", "usd_cents"), 2161);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_refund_is_taken_back_in_the_intents_own_credits() {
        stripe::setup();
        setup();
        run("SELECT billing.define_unit('usd_mills')");
        // the endpoint credits usd as usd_cents; this intent buys 10 mills per cent
        let intent: i64 = one(
            "SELECT intent_id FROM billing.open_checkout('a', 'usd_mills', 1000, 'usd', 'card', 'co_mills', \
             credits_per_minor_unit => 10)",
        );
        assert_eq!(
            one::<String>(&format!(
                "SELECT concat_ws(' ', status, credited) FROM billing.confirm_checkout({intent}, 'pi_mills', 1061, 'usd')"
            )),
            "paid 10000"
        );
        let refund = stripe::event(
            "evt_refund_mills",
            "charge.refunded",
            stripe::now_unix(),
            stripe::charge("pi_mills", 1061, 1061, "usd"),
        );
        assert_eq!(stripe::deliver(&refund), "applied|");
        assert_eq!(
            available("a", "usd_mills"),
            0,
            "all 10,000 mills taken back"
        );
        assert_ledger_consistent();
    }
}
