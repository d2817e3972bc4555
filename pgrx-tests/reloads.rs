// Auto-reload (sql/reloads.sql): a debit that takes a pool below its rule's
// threshold writes one request in its own transaction, priced by the top-up
// quote; the worker claims, completes (a reload grant of what was paid, once
// per payment) or fails it (backoff, then the rule is suspended visibly);
// a manual top-up or resume makes it active again. Rollback and concurrency
// are tested over real connections (tests/client/tests/reloads.rs).

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::stripe;
    use crate::pgrx_tests::support::*;

    /// 1,000 cents of top-up on `a`, a 2.9% + 30¢ card, and a rule that
    /// reloads `a` to 2,000 when it falls below 500 (`extra`: more settings).
    fn funded_with_rule(extra: &str) {
        run("SELECT * FROM billing.set_topup_fee('usd', 'card', 2.9, 30)");
        grant("a", "cents", 1000, ", kind => 'topup', key => 'pi_first'");
        run("SELECT billing.define_meter('calls', 'cents', unit_price => 1)");
        run(&format!(
            "SELECT * FROM billing.set_reload('a', 'cents', 500, 'usd', 'card', reload_to => 2000{extra})"
        ));
    }

    fn spend(amount: i64, key: &str) -> i64 {
        one(&format!(
            "SELECT available FROM billing.ingest('a', 'calls', {amount}, key => '{key}')"
        ))
    }

    fn requests() -> i64 {
        one("SELECT count(*) FROM billing.reload_requests")
    }

    fn armed() -> Option<i64> {
        opt("SELECT reload_below FROM billing.pools WHERE account = 'a' AND lane = 0")
    }

    /// "status credits credit_minor fee total available_at_request" of request `id`.
    fn request(id: i64) -> String {
        one(&format!(
            "SELECT concat_ws(' ', status, credits, credit_minor, fee, total, available_at_request) \
             FROM billing.reload_requests WHERE id = {id}"
        ))
    }

    fn last_request() -> i64 {
        one("SELECT max(id) FROM billing.reload_requests")
    }

    /// Make every open request due now (this transaction's clock does not move).
    fn make_due() {
        run(
            "UPDATE billing.reload_requests SET next_attempt_at = now() - interval '1 second' \
             WHERE status IN ('pending', 'claimed')",
        );
    }

    #[pg_test]
    fn a_debit_below_the_threshold_asks_once_for_what_brings_it_back() {
        funded_with_rule("");
        assert_eq!(armed(), Some(500));
        assert_eq!(spend(400, "e1"), 600);
        assert_eq!(requests(), 0, "still above the threshold");
        assert_eq!(spend(200, "e2"), 400);
        assert_eq!(requests(), 1);
        // 2,000 − 400 = 1,600 cents, and the card fee on top: 1,679 leaves 1,600
        assert_eq!(request(last_request()), "pending 1600 1600 79 1679 400");
        assert_eq!(armed(), None, "disarmed while a request is open");
        // more spending, a hold, and a replayed event: still one request
        spend(100, "e3");
        spend(100, "e3");
        run("SELECT * FROM billing.reserve('a', 'cents', 50, key => 'h1')");
        assert_eq!(requests(), 1);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_fixed_reload_is_clamped_and_asked_in_whole_minor_units() {
        run("SELECT * FROM billing.set_topup_fee('usd', 'card', 0, 0)");
        run("SELECT * FROM billing.grant('a', 'mills', 10000, kind => 'topup')");
        run("SELECT billing.define_meter('calls', 'mills', unit_price => 1)");
        // 1 cent buys 10 mills: 12,345 mills are asked as 1,235 cents = 12,350 mills
        run(
            "SELECT * FROM billing.set_reload('a', 'mills', 5000, 'usd', 'card', \
             reload_amount => 12345, credits_per_minor_unit => 10)",
        );
        run("SELECT * FROM billing.ingest('a', 'calls', 6000, key => 'm1')");
        assert_eq!(request(last_request()), "pending 12350 1235 0 1235 4000");
        // reload_to past the maximum asks for the maximum
        run(
            "SELECT * FROM billing.set_reload('b', 'mills', 5000, 'usd', 'card', \
             reload_to => 1000000, max_amount => 20000, credits_per_minor_unit => 10)",
        );
        run("SELECT * FROM billing.grant('b', 'mills', 6000, kind => 'topup')");
        run("SELECT * FROM billing.ingest('b', 'calls', 2000, key => 'm2')");
        assert_eq!(request(last_request()), "pending 20000 2000 0 2000 4000");
    }

    #[pg_test]
    fn completing_credits_what_was_paid_once_per_payment() {
        funded_with_rule("");
        spend(600, "e1");
        let id = last_request();
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.claim_reloads('w1')"),
            1
        );
        let done = format!("SELECT concat_ws(' ', status, credited, available) FROM billing.complete_reload({id}, 'pi_r1', 1679, 'usd')");
        assert_eq!(one::<String>(&done), "completed 1600 2000");
        let g: i64 = one(&format!(
            "SELECT grant_id FROM billing.reload_requests WHERE id = {id}"
        ));
        assert_eq!(
            one::<String>(&format!(
                "SELECT concat_ws(' ', kind, amount, key) FROM billing.grants WHERE id = {g}"
            )),
            "reload 1600 stripe:pi_r1"
        );
        // the same completion again changes nothing
        assert_eq!(one::<String>(&done), "duplicate 1600 2000");
        assert_eq!(one::<i64>("SELECT count(*) FROM billing.grants"), 2);
        // another amount for it, or its payment for another request, is refused
        assert_rejected(
            &format!("SELECT * FROM billing.complete_reload({id}, 'pi_r1', 1000, 'usd')"),
            "23505",
        );
        assert_eq!(armed(), Some(500), "armed again once closed");
        spend(1600, "e2");
        let second = last_request();
        assert_ne!(second, id);
        assert_rejected(
            &format!("SELECT * FROM billing.complete_reload({second}, 'pi_r1', 1679, 'usd')"),
            "23505",
        );
        assert_rejected(
            &format!("SELECT * FROM billing.complete_reload({second}, 'pi_r2', 1679, 'eur')"),
            "22023",
        );
        assert_rejected(
            &format!("SELECT * FROM billing.complete_reload({second}, 'pi_r2', 0, 'usd')"),
            "22023",
        );
        assert_rejected(
            "SELECT * FROM billing.complete_reload(999999, 'pi_x', 10, 'usd')",
            "42704",
        );
        // a cent short of the total: what was paid, net of the worst-case fee
        // (1,678 − ceil(48.662) − 30 = 1,599), never the quoted credit
        assert_eq!(
            one::<String>(&format!(
                "SELECT concat_ws(' ', status, credited) FROM billing.complete_reload({second}, 'pi_r2', 1678, 'usd')"
            )),
            "completed 1599"
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn failures_back_off_then_suspend_the_rule_visibly_until_a_top_up() {
        funded_with_rule(", max_failures => 2");
        spend(600, "e1");
        let id = last_request();
        run("SELECT * FROM billing.claim_reloads('w1')");
        assert_eq!(
            one::<String>(&format!(
                "SELECT concat_ws(' ', status, attempts, next_attempt_at - now(), rule_status) \
                 FROM billing.fail_reload({id}, 'card_declined')"
            )),
            "pending 1 00:01:00 active"
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.claim_reloads('w1')"),
            0,
            "not due before its backoff"
        );
        make_due();
        run("SELECT * FROM billing.claim_reloads('w1')");
        assert_eq!(
            one::<String>(&format!(
                "SELECT concat_ws(' ', status, attempts, rule_status, rule_reason) \
                 FROM billing.fail_reload({id}, 'insufficient_funds')"
            )),
            "failed 2 suspended 2 failed charges in a row; last: insufficient_funds"
        );
        assert_eq!(armed(), None);
        spend(100, "e2");
        assert_eq!(requests(), 1, "a suspended rule asks for nothing");
        assert_rejected(
            &format!("SELECT * FROM billing.fail_reload({id}, 'again')"),
            "55000",
        );
        // the customer tops up by hand: the rule is active again, and so is its threshold
        grant("a", "cents", 100, ", kind => 'topup', key => 'pi_manual'");
        assert_eq!(
            one::<String>("SELECT concat_ws(' ', status, failures) FROM billing.reload_rules"),
            "active 0"
        );
        assert_eq!(armed(), Some(500));
        spend(10, "e3");
        assert_eq!(requests(), 2);
        // disabled by the application, resumed for a new card
        run("SELECT * FROM billing.disable_reload('a', 'cents')");
        assert_eq!(
            one::<String>("SELECT status FROM billing.reload_rules"),
            "disabled"
        );
        run("SELECT * FROM billing.resume_reload('a', 'cents')");
        assert_eq!(
            one::<String>("SELECT status FROM billing.reload_rules"),
            "active"
        );
        assert_rejected(
            "SELECT * FROM billing.disable_reload('nobody', 'cents')",
            "42704",
        );
    }

    #[pg_test]
    fn an_abandoned_claim_is_claimed_again_after_its_lease() {
        funded_with_rule("");
        spend(600, "e1");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.claim_reloads('w1', lease => '1 minute')"),
            1
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.claim_reloads('w2')"),
            0
        );
        for bad in ["''", "'w3', lease => '0'", "'w3', max_requests => 0"] {
            assert_rejected(
                &format!("SELECT * FROM billing.claim_reloads({bad})"),
                "22023",
            );
        }
        run("UPDATE billing.reload_requests SET lease_until = now() - interval '1 second'");
        assert_eq!(
            one::<String>(
                "SELECT concat_ws(' ', attempt, credits, total) FROM billing.claim_reloads('w2')"
            ),
            "2 1600 1679"
        );
        assert_eq!(
            one::<String>("SELECT claimed_by FROM billing.reload_requests"),
            "w2"
        );
        // w1, whose lease ran out, cannot fail what w2 may be charging now
        let id = last_request();
        assert_rejected(
            &format!("SELECT * FROM billing.fail_reload({id}, 'timeout', worker => 'w1')"),
            "55000",
        );
        assert_eq!(
            one::<String>("SELECT status || ' ' || failures FROM billing.reload_rules"),
            "active 0"
        );
        assert_eq!(
            one::<String>(&format!(
                "SELECT status FROM billing.fail_reload({id}, 'card_declined', worker => 'w2')"
            )),
            "pending"
        );
    }

    /// Complete the last request as paid in full (1,679 for 1,600).
    fn pay_last(payment: &str) {
        run(&format!(
            "SELECT * FROM billing.complete_reload({}, '{payment}', 1679, 'usd')",
            last_request()
        ));
    }

    /// How long after now the last request becomes due.
    fn last_due_in() -> String {
        one(
            "SELECT (next_attempt_at - now())::text FROM billing.reload_requests \
             WHERE id = (SELECT max(id) FROM billing.reload_requests)",
        )
    }

    #[pg_test]
    fn the_interval_and_the_daily_cap_defer_a_request_and_the_subscription_holds_it_back() {
        funded_with_rule(", min_interval => '1 hour', max_per_day => 2");
        spend(600, "e1");
        pay_last("pi_r1");
        // a crossing within the hour: written now, due an hour after the last
        spend(1700, "e2");
        assert_eq!(requests(), 2);
        assert_eq!(last_due_in(), "01:00:00");
        assert_eq!(armed(), None, "disarmed: the deferred request is open");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.claim_reloads('w1')"),
            0,
            "not due yet"
        );
        // the worker completes it when due; a third in the same day waits for the cap
        run("UPDATE billing.reload_requests SET due_at = due_at - interval '1 hour', \
             next_attempt_at = next_attempt_at - interval '1 hour', created_at = created_at - interval '1 hour'");
        pay_last("pi_r2");
        spend(1700, "e3");
        assert_eq!(requests(), 3);
        // two were due in the last 24 hours: the first of them leaves the day in 23 hours
        assert_eq!(last_due_in(), "23:00:00");
        // a rule that needs a live subscription asks for nothing without one
        pay_last("pi_r3");
        run("SELECT * FROM billing.set_reload('a', 'cents', 500, 'usd', 'card', reload_to => 2000, \
             requires_subscription => true)");
        spend(1700, "e4");
        assert_eq!(requests(), 3);
        assert_eq!(
            armed(),
            Some(500),
            "still armed: a debit once subscribed asks"
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_charge_key_survives_an_abandoned_claim_and_changes_after_a_failure() {
        funded_with_rule("");
        spend(600, "e1");
        let id = last_request();
        let key = |worker: &str| -> String {
            one(&format!(
                "SELECT charge_key FROM billing.claim_reloads('{worker}')"
            ))
        };
        let first = key("w1");
        assert_eq!(first, format!("pg_billing_reload_{id}_1"));
        run("UPDATE billing.reload_requests SET lease_until = now() - interval '1 second'");
        assert_eq!(key("w2"), first, "the same charge: the provider dedups it");
        run(&format!(
            "SELECT * FROM billing.fail_reload({id}, 'card_declined')"
        ));
        make_due();
        assert_eq!(key("w2"), format!("pg_billing_reload_{id}_2"));
        // a second payment for a request already paid is credited, once
        run(&format!(
            "SELECT * FROM billing.complete_reload({id}, 'pi_a', 1679, 'usd')"
        ));
        let extra = format!("SELECT concat_ws(' ', status, credited) FROM billing.complete_reload({id}, 'pi_b', 1679, 'usd')");
        assert_eq!(one::<String>(&extra), "extra_payment 1600");
        assert_eq!(one::<String>(&extra), "duplicate 1600");
        assert_eq!(available("a", "cents"), 400 + 1600 + 1600);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn disabling_fails_a_pending_request_and_a_failure_never_revives_a_disabled_rule() {
        funded_with_rule(", max_failures => 1");
        spend(600, "e1");
        let pending = last_request();
        run("SELECT * FROM billing.disable_reload('a', 'cents')");
        assert_eq!(request(pending), "failed 1600 1600 79 1679 400");
        // a claimed request is finished by its worker; its failure ends it
        run("SELECT * FROM billing.resume_reload('a', 'cents')");
        spend(1, "e2");
        let claimed = last_request();
        run("SELECT * FROM billing.claim_reloads('w1')");
        run("SELECT * FROM billing.disable_reload('a', 'cents')");
        assert_eq!(
            one::<String>(&format!(
                "SELECT concat_ws(' ', status, rule_status) FROM billing.fail_reload({claimed}, 'card_declined')"
            )),
            "failed disabled"
        );
        // and a top-up does not turn it back on
        grant("a", "cents", 100, ", kind => 'topup', key => 'pi_manual'");
        assert_eq!(
            one::<String>("SELECT status FROM billing.reload_rules"),
            "disabled"
        );
        assert_eq!(armed(), None);
    }

    #[pg_test]
    fn a_rule_is_vetted_with_what_it_will_ask_for() {
        run("SELECT * FROM billing.set_topup_fee('usd', 'card', 2.9, 30)");
        run("SELECT * FROM billing.set_topup_limits('usd', 500, 5000)");
        grant("a", "cents", 1000, "");
        // reloading to 2,000 below 500 asks at least 1,501: within the limits
        run(
            "SELECT * FROM billing.set_reload('a', 'cents', 500, 'usd', 'card', reload_to => 2000)",
        );
        // a fixed 6,000 never could be charged
        assert_rejected(
            "SELECT * FROM billing.set_reload('a', 'cents', 500, 'usd', 'card', reload_amount => 6000)",
            "22023",
        );
    }

    #[pg_test]
    fn a_rule_that_cannot_be_quoted_any_more_is_suspended_with_the_reason() {
        funded_with_rule("");
        run("SELECT * FROM billing.set_topup_limits('usd', 5000, 100000)");
        spend(600, "e1");
        assert_eq!(requests(), 0);
        assert_eq!(
            one::<String>("SELECT status || ': ' || status_reason FROM billing.reload_rules"),
            "suspended: cannot quote the reload: invalid credit_amount: 1600 is outside the top-up limits in usd: 5000 to 100000"
        );
        assert_eq!(armed(), None);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn bad_rules_are_refused_and_write_nothing() {
        run("SELECT * FROM billing.set_topup_fee('usd', 'card', 2.9, 30)");
        grant("a", "cents", 1000, "");
        for (args, state) in [
            ("500, 'usd', 'card'", "22023"),
            (
                "500, 'usd', 'card', reload_to => 900, reload_amount => 100",
                "22023",
            ),
            ("500, 'usd', 'card', reload_to => 500", "22023"),
            ("500, 'usd', 'card', reload_amount => -1", "22023"),
            (
                "500, 'usd', 'card', reload_amount => 100, max_per_day => 0",
                "22023",
            ),
            ("500, 'usd', 'amex', reload_amount => 100", "22023"),
            ("500, 'eur', 'card', reload_amount => 100", "22023"),
            ("NULL, 'usd', 'card', reload_amount => 100", "22004"),
        ] {
            let sql = format!("SELECT * FROM billing.set_reload('a', 'cents', {args})");
            assert_rejected(&sql, state);
            assert_eq!(one::<i64>("SELECT count(*) FROM billing.reload_rules"), 0);
        }
        assert_rejected(
            "SELECT * FROM billing.set_reload('a', 'no_such_unit', 500, 'usd', 'card', reload_amount => 100)",
            "42704",
        );
    }

    /// A Stripe PaymentIntent of the reload worker's charge: the request's id in its metadata.
    fn reload_payment(pi: &str, amount: i64, request: i64) -> String {
        let mut object = stripe::payment_intent(pi, amount, "usd", "a");
        object["metadata"]["reload_request"] = serde_json::json!(request.to_string());
        stripe::event(
            &format!("evt_{pi}"),
            "payment_intent.succeeded",
            stripe::now_unix(),
            object,
        )
    }

    #[pg_test]
    fn a_reload_charged_through_stripe_credits_once_whoever_reports_it_first() {
        stripe::setup();
        run("SELECT * FROM billing.set_topup_fee('usd', 'card', 2.9, 30)");
        grant(
            "a",
            "usd_cents",
            1000,
            ", kind => 'topup', key => 'pi_first'",
        );
        run("SELECT billing.define_meter('calls', 'usd_cents', unit_price => 1)");
        run("SELECT * FROM billing.set_reload('a', 'usd_cents', 500, 'usd', 'card', reload_to => 2000)");
        let spend = |amount: i64, key: &str| {
            run(&format!(
                "SELECT * FROM billing.ingest('a', 'calls', {amount}, key => '{key}')"
            ))
        };
        // the webhook first, then the worker
        spend(600, "e1");
        let first = last_request();
        assert_eq!(
            stripe::deliver(&reload_payment("pi_rl1", 1679, first)),
            "applied|"
        );
        assert_eq!(
            one::<String>(&format!(
                "SELECT concat_ws(' ', status, payment_ref, amount_paid) FROM billing.reload_requests WHERE id = {first}"
            )),
            "completed pi_rl1 1679"
        );
        assert_eq!(
            one::<String>(&format!(
                "SELECT status FROM billing.complete_reload({first}, 'pi_rl1', 1679, 'usd')"
            )),
            "duplicate"
        );
        // the worker first, then the webhook
        spend(1600, "e2");
        let second = last_request();
        assert_ne!(second, first);
        run(&format!(
            "SELECT * FROM billing.complete_reload({second}, 'pi_rl2', 1679, 'usd')"
        ));
        assert_eq!(
            stripe::deliver(&reload_payment("pi_rl2", 1679, second)),
            "applied|"
        );
        // two reloads of 1,600 and no top-up credited for their payments
        assert_eq!(
            one::<String>(
                "SELECT string_agg(kind || ':' || amount, ' ' ORDER BY id) FROM billing.grants WHERE account = 'a'"
            ),
            "topup:1000 reload:1600 reload:1600"
        );
        assert_eq!(available("a", "usd_cents"), 1000 - 600 + 1600 - 1600 + 1600);
        // refunding the first reload's payment takes its credit back: the 400
        // left of it, and the 1,200 used of it becomes debt
        let refund = stripe::event(
            "evt_refund_rl1",
            "charge.refunded",
            stripe::now_unix(),
            stripe::charge("pi_rl1", 1679, 1679, "usd"),
        );
        assert_eq!(stripe::deliver(&refund), "applied|");
        assert_eq!(available("a", "usd_cents"), 1600 - 1200);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_split_pool_and_a_rule_exclude_each_other() {
        funded_with_rule("");
        assert_rejected("SELECT billing.set_lanes('a', 'cents', 4)", "55000");
        grant("b", "cents", 1000, "");
        run("SELECT billing.set_lanes('b', 'cents', 4)");
        assert_rejected(
            "SELECT * FROM billing.set_reload('b', 'cents', 500, 'usd', 'card', reload_amount => 100)",
            "55000",
        );
        // a disabled rule does not stand in the way
        run("SELECT * FROM billing.disable_reload('a', 'cents')");
        run("SELECT billing.set_lanes('a', 'cents', 4)");
    }
}
