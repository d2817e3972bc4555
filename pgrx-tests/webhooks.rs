// Signed webhooks end to end: signatures made with pgcrypto's HMAC (an
// implementation independent of ours), delivered through receive_webhook and
// plain INSERT, deduplicated, ordered, and applied by the Stripe projections.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::support::*;

    const SECRET: &str = "whsec_stripe_test";

    fn setup() {
        run("CREATE EXTENSION IF NOT EXISTS pgcrypto");
        run("CREATE OR REPLACE FUNCTION pg_temp.stripe_headers(body text, secret text, t bigint) RETURNS jsonb \
             LANGUAGE sql AS $$ SELECT jsonb_build_object('Stripe-Signature', \
                't=' || t || ',v1=' || encode(hmac(t || '.' || body, secret, 'sha256'), 'hex')) $$");
        run("CREATE OR REPLACE FUNCTION pg_temp.std_headers(id text, t bigint, body text, secret text) RETURNS jsonb \
             LANGUAGE sql AS $$ SELECT jsonb_build_object('webhook-id', id, 'webhook-timestamp', t::text, \
                'webhook-signature', 'v1,' || encode(hmac(convert_to(id || '.' || t || '.' || body, 'UTF8'), \
                decode(substr(secret, 7), 'base64'), 'sha256'), 'base64')) $$");
        run(&format!(
            "SELECT billing.define_webhook_endpoint('stripe', 'stripe', '{SECRET}')"
        ));
    }

    fn now_unix() -> i64 {
        one("SELECT floor(extract(epoch FROM now()))::bigint")
    }

    /// Deliver `body` to the stripe endpoint signed at `t` with `secret`; returns "status|reason".
    fn deliver_signed(body: &str, secret: &str, t: i64) -> String {
        let body = body.replace('\'', "''");
        one(&format!(
            "SELECT status || '|' || coalesce(reason, '') FROM billing.receive_webhook('stripe', \
             pg_temp.stripe_headers('{body}', '{secret}', {t}), '{body}')"
        ))
    }

    fn deliver(body: &str) -> String {
        deliver_signed(body, SECRET, now_unix())
    }

    fn pi_succeeded(evt: &str, pi: &str, amount: i64, created: i64) -> String {
        format!(
            r#"{{"id":"{evt}","type":"payment_intent.succeeded","created":{created},"data":{{"object":{{"id":"{pi}","amount_received":{amount},"currency":"usd","metadata":{{"account":"org_1"}}}}}}}}"#
        )
    }

    fn checkout_completed(evt: &str, pi: &str, amount: i64, created: i64) -> String {
        format!(
            r#"{{"id":"{evt}","type":"checkout.session.completed","created":{created},"data":{{"object":{{"id":"cs_{pi}","payment_intent":"{pi}","payment_status":"paid","amount_total":{amount},"currency":"usd","client_reference_id":"org_1","metadata":{{"account":"org_1","credits":"999999"}}}}}}}}"#
        )
    }

    fn refunded(evt: &str, pi: &str, refunded: i64, created: i64) -> String {
        format!(
            r#"{{"id":"{evt}","type":"charge.refunded","created":{created},"data":{{"object":{{"id":"ch_{pi}","payment_intent":"{pi}","amount_refunded":{refunded},"currency":"usd"}}}}}}"#
        )
    }

    fn cents() -> i64 {
        available("org_1", "usd_cents")
    }

    #[pg_test]
    fn a_top_up_credits_once_through_replays_and_two_event_types() {
        setup();
        assert_eq!(
            deliver(&pi_succeeded("evt_1", "pi_1", 2500, 1_700_000_000)),
            "applied|"
        );
        assert!(
            deliver(&pi_succeeded("evt_1", "pi_1", 2500, 1_700_000_000)).starts_with("duplicate|")
        );
        assert_eq!(
            deliver(&checkout_completed("evt_2", "pi_1", 2500, 1_700_000_001)),
            "applied|"
        );
        assert_eq!(cents(), 2500, "one payment, one credit");
        assert_eq!(one::<i64>("SELECT count(*) FROM billing.grants"), 1);
        // the payment's lock is its own object's row: one row per object,
        // each remembering the newest event applied to it (the session's
        // delivery locked pi_1 without changing what pi_1 remembers)
        assert_eq!(
            one::<String>(
                "SELECT string_agg(object_id || '@' || extract(epoch FROM newest_event_time)::bigint, ',' \
                 ORDER BY object_id) FROM billing.webhook_objects"
            ),
            "cs_pi_1@1700000001,pi_1@1700000000"
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_payment_intent_s_delivery_locks_its_row_once() {
        setup();
        assert_eq!(
            deliver(&pi_succeeded("evt_1", "pi_1", 2500, 1_700_000_000)),
            "applied|"
        );
        // the intake made pi_1's row; the top-up's lock of the payment is
        // that row, already held: locking it again from the handler's
        // subtransaction would leave its lock on the row's next version
        // (a multixact in xmax) when the delivery records its newest event
        assert_eq!(
            one::<String>(
                "SELECT xmax::text FROM billing.webhook_objects WHERE object_id = 'pi_1'"
            ),
            "0"
        );
        assert_eq!(cents(), 2500);
    }

    #[pg_test]
    fn the_amount_credited_is_what_was_paid_not_what_metadata_claims() {
        setup();
        let body = r#"{"id":"evt_m","type":"checkout.session.completed","created":1700000000,"data":{"object":{"id":"cs_m","payment_intent":"pi_m","payment_status":"paid","amount_total":500,"currency":"usd","client_reference_id":"org_1","metadata":{"account":"org_1","amount":"100000","amount_total":"100000"}}}}"#;
        assert_eq!(deliver(body), "applied|");
        assert_eq!(cents(), 500);
        let unpaid = r#"{"id":"evt_u","type":"checkout.session.completed","created":1700000000,"data":{"object":{"id":"cs_u","payment_intent":"pi_u","payment_status":"unpaid","amount_total":900,"client_reference_id":"org_1"}}}"#;
        assert_eq!(deliver(unpaid), "applied|");
        assert_eq!(cents(), 500, "an unpaid session credits nothing");
    }

    #[pg_test]
    fn a_refund_takes_back_the_unspent_part_then_records_debt() {
        setup();
        deliver(&pi_succeeded("evt_1", "pi_1", 1000, 1_700_000_000));
        run("SELECT * FROM billing.ingest('org_1', 'usd_cents', 1, key => 'use', cost => 700)");
        assert_eq!(
            deliver(&refunded("evt_2", "pi_1", 400, 1_700_000_100)),
            "applied|"
        );
        assert_eq!(
            cents(),
            -100,
            "of 400 refunded, the 300 unspent are revoked and 100 become debt"
        );
        let debt: i64 = one("SELECT debt FROM billing.check('org_1', 'usd_cents')");
        assert_eq!(debt, 100);
        // the same refund grows to the full amount: only the difference is reversed
        assert_eq!(
            deliver(&refunded("evt_3", "pi_1", 1000, 1_700_000_200)),
            "applied|"
        );
        assert_eq!(
            one::<i64>("SELECT debt FROM billing.check('org_1', 'usd_cents')"),
            700
        );
        // an older refund event for the charge arriving late changes nothing
        assert!(deliver(&refunded("evt_4", "pi_1", 400, 1_700_000_150)).starts_with("superseded|"));
        assert_eq!(
            one::<i64>("SELECT debt FROM billing.check('org_1', 'usd_cents')"),
            700
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_refund_before_its_payment_still_ends_right() {
        setup();
        let r = deliver(&refunded("evt_r", "pi_9", 300, 1_700_000_100));
        assert_eq!(r, "applied|");
        assert_eq!(one::<i64>("SELECT count(*) FROM billing.grants"), 0);
        deliver(&pi_succeeded("evt_p", "pi_9", 1000, 1_700_000_000));
        assert_eq!(
            cents(),
            700,
            "the payment lands already reduced by the earlier refund"
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_dispute_reverses_the_disputed_amount() {
        setup();
        deliver(&pi_succeeded("evt_1", "pi_1", 1000, 1_700_000_000));
        let dispute = r#"{"id":"evt_d","type":"charge.dispute.created","created":1700000300,"data":{"object":{"id":"dp_1","charge":"ch_pi_1","payment_intent":"pi_1","amount":1000,"currency":"usd","status":"needs_response"}}}"#;
        assert_eq!(deliver(dispute), "applied|");
        assert_eq!(cents(), 0);
    }

    #[pg_test]
    fn rejected_deliveries_are_kept_and_have_no_side_effect() {
        setup();
        let body = pi_succeeded("evt_1", "pi_1", 2500, 1_700_000_000);
        let now = now_unix();
        let before = footprint();
        assert!(deliver_signed(&body, "wrong_secret", now).starts_with("rejected|bad signature"));
        assert!(deliver_signed(&body, SECRET, now - 301).starts_with("rejected|stale"));
        assert!(deliver_signed(&body, SECRET, now + 301).starts_with("rejected|future"));
        let esc = body.replace('\'', "''");
        for (headers, reason) in [
            ("'{}'", "missing header"),
            (r#"'{"Stripe-Signature": ""}'"#, "malformed header"),
            (
                r#"'{"Stripe-Signature": "v1=00"}'"#,
                "malformed header: Stripe-Signature has no t=",
            ),
            (
                r#"'{"Stripe-Signature": "t=soon,v1=00"}'"#,
                "malformed header: Stripe-Signature t is not",
            ),
            (
                r#"'{"Stripe-Signature": "t=1700000000,v1=xyz"}'"#,
                "malformed header: v1 is not hex",
            ),
            (
                "jsonb_build_object('Stripe-Signature', repeat('t', 9000))",
                "too large",
            ),
        ] {
            let got: String = one(&format!(
                "SELECT status || '|' || reason FROM billing.receive_webhook('stripe', {headers}, '{esc}')"
            ));
            assert!(
                got.starts_with(&format!("rejected|{reason}")),
                "{headers}: {got}"
            );
        }
        let unknown: String =
            one("SELECT status || '|' || reason FROM billing.receive_webhook('nope', '{}', '{}')");
        assert_eq!(unknown, "rejected|unknown endpoint");
        let not_json = deliver_signed("not json", SECRET, now);
        assert_eq!(not_json, "rejected|unparseable body: not JSON");
        let no_id = deliver_signed(r#"{"type":"x"}"#, SECRET, now);
        assert_eq!(no_id, "rejected|unparseable body: no event id");
        assert_eq!(
            footprint(),
            before,
            "no rejected delivery touched the ledger"
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.webhook_events WHERE status = 'rejected'"),
            12
        );
    }

    #[pg_test]
    fn a_rotated_secret_keeps_verifying_until_it_expires() {
        setup();
        run("SELECT billing.rotate_webhook_secret('stripe', 'whsec_new', interval '1 hour')");
        let now = now_unix();
        assert_eq!(
            deliver_signed(&pi_succeeded("evt_1", "pi_1", 10, 1), "whsec_new", now),
            "applied|"
        );
        assert_eq!(
            deliver_signed(&pi_succeeded("evt_2", "pi_2", 10, 1), SECRET, now),
            "applied|"
        );
        run("UPDATE billing.webhook_endpoints SET previous_secret_expires_at = now()");
        assert!(
            deliver_signed(&pi_succeeded("evt_3", "pi_3", 10, 1), SECRET, now)
                .starts_with("rejected|bad signature")
        );
    }

    #[pg_test]
    fn a_plain_insert_is_verified_and_applied_by_the_trigger() {
        setup();
        run("CREATE ROLE hook_app NOLOGIN");
        run("GRANT billing_app TO hook_app");
        run("SELECT billing.grant_tenant('default', 'hook_app')");
        let body = pi_succeeded("evt_1", "pi_1", 1200, 1_700_000_000).replace('\'', "''");
        let headers: String = one(&format!(
            "SELECT pg_temp.stripe_headers('{body}', '{SECRET}', {})::text",
            now_unix()
        ));
        run("SET LOCAL ROLE hook_app");
        // an application role cannot decide an event's status or id itself
        assert_rejected(
            &format!(
                "INSERT INTO billing.webhook_events (endpoint, headers, body, status, provider_event_id) \
                 VALUES ('stripe', '{headers}', '{body}', 'applied', 'forged')"
            ),
            "42501",
        );
        run(&format!(
            "INSERT INTO billing.webhook_events (endpoint, headers, body) VALUES ('stripe', '{headers}', '{body}')"
        ));
        assert_rejected(
            "UPDATE billing.webhook_events SET status = 'rejected'",
            "42501",
        );
        assert_rejected("DELETE FROM billing.webhook_events", "42501");
        run("RESET ROLE");
        let row: String =
            one("SELECT status || '|' || provider_event_id FROM billing.webhook_events");
        assert_eq!(row, "applied|evt_1", "the trigger verified and applied it");
        assert_eq!(cents(), 1200);
        assert_rejected(
            "UPDATE billing.webhook_events SET status = 'rejected'",
            "42501",
        );
        assert_rejected("TRUNCATE billing.webhook_events", "42501");
    }

    const STD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    /// A Standard Webhooks endpoint `app` whose subscription events
    /// `project` (a function of schema app, given its body) applies to
    /// app.subscriptions.
    fn standard_endpoint(project: &str) {
        setup();
        run(&format!(
            "SELECT billing.define_webhook_endpoint('app', 'standard', '{STD_SECRET}')"
        ));
        run("CREATE SCHEMA app");
        run("CREATE TABLE app.subscriptions (id text PRIMARY KEY, status text)");
        run(&format!(
            "CREATE FUNCTION app.project(ev billing.webhook_events) RETURNS jsonb {project}"
        ));
        for kind in ["created", "updated"] {
            run(&format!("SELECT billing.register_webhook_handler('subscription.{kind}', 'app.project(billing.webhook_events)')"));
        }
    }

    /// Deliver message `id`, a subscription event about `object`, to `app`; its status.
    fn send_standard(id: &str, kind: &str, object: &str, status: &str, created: i64) -> String {
        let now = now_unix();
        let body = format!(
            r#"{{"type":"subscription.{kind}","created":{created},"data":{{"object":{{"id":"{object}","status":"{status}"}}}}}}"#
        );
        one(&format!(
            "SELECT status FROM billing.receive_webhook('app', pg_temp.std_headers('{id}', {now}, '{body}', '{STD_SECRET}'), '{body}')"
        ))
    }

    #[pg_test]
    fn standard_webhooks_with_an_application_handler_and_out_of_order_updates() {
        standard_endpoint(
            "LANGUAGE sql AS $$ \
             INSERT INTO app.subscriptions VALUES (ev.payload #>> '{data,object,id}', ev.payload #>> '{data,object,status}') \
             ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status RETURNING jsonb_build_object('status', status) $$",
        );
        let send = |id: &str, kind: &str, status: &str, created: i64| {
            send_standard(id, kind, "sub_1", status, created)
        };
        // the update arrives before the create
        assert_eq!(send("msg_2", "updated", "active", 200), "applied");
        assert_eq!(send("msg_1", "created", "incomplete", 100), "superseded");
        assert_eq!(send("msg_2", "updated", "active", 200), "duplicate");
        let status: String = one("SELECT status FROM app.subscriptions WHERE id = 'sub_1'");
        assert_eq!(
            status, "active",
            "the older create did not overwrite the newer state"
        );
    }

    #[pg_test]
    fn a_failed_delivery_about_a_new_object_leaves_no_newest_event_behind() {
        standard_endpoint(
            "LANGUAGE plpgsql AS $$ \
             BEGIN IF ev.payload #>> '{data,object,status}' = 'broken' THEN RAISE EXCEPTION 'cannot project'; END IF; \
                   INSERT INTO app.subscriptions VALUES (ev.payload #>> '{data,object,id}', ev.payload #>> '{data,object,status}') \
                   ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status; RETURN '{}'; END $$",
        );
        let send = |id: &str, kind: &str, status: &str, created: i64| {
            send_standard(id, kind, "sub_9", status, created)
        };
        // the first delivery about sub_9 makes its object row, then fails
        assert_eq!(send("msg_2", "updated", "broken", 200), "failed");
        assert_eq!(
            one::<String>("SELECT newest_event_time::text || '|' || newest_event_id FROM billing.webhook_objects WHERE object_id = 'sub_9'"),
            "-infinity|0",
            "a failed event is not the object's newest"
        );
        // so an older event is not superseded by it
        assert_eq!(send("msg_1", "created", "incomplete", 100), "applied");
        assert!(
            one::<bool>(
                "SELECT newest_event_time = to_timestamp(100) AND newest_event_id = \
                         (SELECT id FROM billing.webhook_events WHERE provider_event_id = 'msg_1') \
                         FROM billing.webhook_objects WHERE object_id = 'sub_9'"
            ),
            "the applied event is the object's newest"
        );
        // and an applied first delivery is recorded as the newest at once
        assert_eq!(send("msg_3", "created", "active", 300), "applied");
        assert_eq!(send("msg_4", "created", "active", 250), "superseded");
    }

    #[pg_test]
    fn a_failing_handler_rolls_back_and_a_redelivery_can_succeed() {
        setup();
        run("CREATE SCHEMA app");
        run("CREATE TABLE app.flags (ok boolean)");
        run("INSERT INTO app.flags VALUES (false)");
        run("CREATE FUNCTION app.flaky(ev billing.webhook_events) RETURNS jsonb LANGUAGE plpgsql AS $$ \
             BEGIN PERFORM billing.\"grant\"('org_1', 'usd_cents', 5, key => 'flaky:' || ev.provider_event_id); \
                   IF NOT (SELECT ok FROM app.flags) THEN RAISE EXCEPTION 'downstream unavailable'; END IF; \
                   RETURN '{}'; END $$");
        run("SELECT billing.register_webhook_handler('thing.happened', 'app.flaky(billing.webhook_events)', 'stripe')");
        let body = r#"{"id":"evt_f","type":"thing.happened","created":1700000000}"#;
        let first = deliver(body);
        assert_eq!(first, "failed|P0001: downstream unavailable");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.grants"),
            0,
            "the handler's grant was rolled back"
        );
        run("UPDATE app.flags SET ok = true");
        assert_eq!(deliver(body), "applied|");
        assert_eq!(cents(), 5);
        assert!(deliver(body).starts_with("duplicate|"));
    }

    #[pg_test]
    fn secrets_are_not_in_the_settings_view() {
        setup();
        let cols: String = one("SELECT string_agg(attname, ',') FROM pg_attribute \
             WHERE attrelid = 'billing.webhook_endpoint_settings'::regclass AND attnum > 0");
        assert!(!cols.contains("secret"), "{cols}");
        let public_select: bool =
            one("SELECT has_table_privilege('public', 'billing.webhook_endpoints', 'SELECT')");
        assert!(!public_select);
    }

    #[pg_test]
    fn webhook_configuration_is_validated() {
        setup();
        assert_rejected(
            "SELECT billing.define_webhook_endpoint('x', 'paypal', 's')",
            "22023",
        );
        assert_rejected(
            "SELECT billing.define_webhook_endpoint('Bad Name', 'stripe', 's')",
            "22023",
        );
        assert_rejected(
            "SELECT billing.define_webhook_endpoint('x', 'stripe', '')",
            "22023",
        );
        assert_rejected(
            "SELECT billing.define_webhook_endpoint('x', 'standard', 'whsec_!!!')",
            "22023",
        );
        assert_rejected(
            "SELECT billing.define_webhook_endpoint('x', 'stripe', 's', tolerance_seconds => 0)",
            "22023",
        );
        assert_rejected("SELECT billing.rotate_webhook_secret('nope', 's')", "42704");
        assert_rejected(
            "SELECT billing.register_webhook_handler('x', 'billing.sweep(integer)')",
            "22023",
        );
        // defining an endpoint again updates it in place
        run(&format!("SELECT billing.define_webhook_endpoint('stripe', 'stripe', '{SECRET}', tolerance_seconds => 60)"));
        let row: String =
            one("SELECT count(*) || ':' || max(tolerance_seconds) FROM billing.webhook_endpoints");
        assert_eq!(row, "1:60");
        let unknown: String = one(
            "SELECT valid || ':' || reason FROM billing.verify_webhook('paypal', 's', '{}', '{}')",
        );
        assert!(unknown.starts_with("false:"), "{unknown}");
    }
}
