// What a sender controls can neither raise nor fill the disk; retention is
// an admin function; the intake takes no lock another role can hold.
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::stripe::{deliver, now_unix, setup, SECRET};
    use crate::pgrx_tests::support::*;

    fn stored(id_sql: &str) -> (i64, i64) {
        let row: String = one(&format!(
            "SELECT octet_length(body) || ',' || octet_length(headers::text) FROM billing.webhook_events WHERE id = ({id_sql})"
        ));
        let (b, h) = row.split_once(',').unwrap();
        (b.parse().unwrap(), h.parse().unwrap())
    }

    #[pg_test]
    fn an_event_time_out_of_range_is_a_rejection_not_an_error() {
        setup();
        // 1e400 is beyond a double: compared as a numeric, not cast first
        for created in [
            "1e20",
            "-5",
            "99999999999999",
            "1e400",
            "-1e400",
            "253402300799.5",
        ] {
            let body = format!(r#"{{"id":"evt_t","type":"x","created":{created}}}"#);
            for _ in 0..2 {
                assert_eq!(
                    deliver(&body),
                    "rejected|unparseable body: created is out of range"
                );
            }
        }
    }

    /// What a sharding router asks before it reads whose a delivery is: the
    /// intake's own check, recording nothing.
    fn verified(body: &str, signed: &str) -> String {
        Spi::get_one_with_args::<String>(
            "SELECT v.valid || '|' || coalesce(v.event_id, '') || '|' || coalesce(v.reason, '') \
             FROM billing.webhook_endpoints e, \
                  billing.verify_delivery(e, pg_temp.stripe_headers($2, $3, $4), $1) v \
             WHERE e.name = 'stripe'",
            &[body.into(), signed.into(), SECRET.into(), now_unix().into()],
        )
        .unwrap()
        .unwrap()
    }

    #[pg_test]
    fn verify_delivery_is_the_intake_s_check_and_records_nothing() {
        setup();
        let body = r#"{"id":"evt_v","type":"x"}"#;
        assert_eq!(verified(body, body), "true||");
        assert_eq!(
            verified(r#"{"id":"evt_v","type":"y"}"#, body),
            "false||bad signature: no signature matches the endpoint's secrets"
        );
        let big = format!(r#"{{"id":"evt_big","pad":"{}"}}"#, "x".repeat(1024 * 1024));
        assert_eq!(
            verified(&big, &big),
            "false||too large: body over 1 MiB or headers over 64 KiB"
        );
        let inbox: i64 = one("SELECT count(*) FROM billing.webhook_events");
        assert_eq!(inbox, 0);
    }

    #[pg_test]
    fn an_event_time_at_the_bounds_is_kept_exactly() {
        setup();
        for (i, (created, time)) in [
            ("0", "1970-01-01 00:00:00+00"),
            ("253402300799", "9999-12-31 23:59:59+00"),
            ("1700000000.25", "2023-11-14 22:13:20.25+00"),
        ]
        .iter()
        .enumerate()
        {
            let body = format!(r#"{{"id":"evt_b{i}","type":"x","created":{created}}}"#);
            assert_eq!(deliver(&body), "applied|no handler for x");
            let kept: String = one(&format!(
                "SELECT event_time AT TIME ZONE 'UTC' || '+00' FROM billing.webhook_events \
                 WHERE provider_event_id = 'evt_b{i}'"
            ));
            assert_eq!(&kept, time, "created {created}");
        }
    }

    #[pg_test]
    fn deliveries_that_fail_verification_keep_a_bounded_sample() {
        setup();
        let big = format!(r#"{{"id":"evt_big","pad":"{}"}}"#, "x".repeat(3_000_000));
        let headers = format!(r#"{{"x-junk": "{}"}}"#, "h".repeat(60_000));
        let unknown: i64 = Spi::get_one_with_args(
            "SELECT webhook_event_id FROM billing.receive_webhook($1, $2::jsonb, $3)",
            &[
                "z".repeat(10_000).as_str().into(),
                headers.as_str().into(),
                big.as_str().into(),
            ],
        )
        .unwrap()
        .unwrap();
        let (body, headers) = stored(&unknown.to_string());
        assert_eq!(body, 2048);
        assert!(headers <= 2048, "headers kept: {headers} bytes");
        // multi-byte characters: the sample is cut by bytes, at a character boundary
        for (chars, quotes) in [("漢", r#"{"x": "\"\"\"\""}"#), ("😀", r#"{"y": "\u0001"}"#)] {
            let id: i64 = Spi::get_one_with_args(
                "SELECT webhook_event_id FROM billing.receive_webhook('nowhere', \
                 (SELECT jsonb_object_agg(i::text, $2::jsonb) FROM generate_series(1, 500) i), repeat($1, 3000))",
                &[chars.into(), quotes.into()],
            )
            .unwrap()
            .unwrap();
            let (body, headers) = stored(&id.to_string());
            assert!(
                body <= 2048 && body > 2040,
                "{chars}: body kept {body} bytes"
            );
            assert!(headers <= 2048, "{chars}: headers kept {headers} bytes");
        }
        let name_len: i32 = one(&format!(
            "SELECT length(endpoint) FROM billing.webhook_events WHERE id = {unknown}"
        ));
        assert_eq!(name_len, 100);
        let mib = format!(r#"{{"id":"evt_sig","pad":"{}"}}"#, "x".repeat(1_000_000));
        let bad_sig: i64 = Spi::get_one_with_args(
            "SELECT webhook_event_id FROM billing.receive_webhook('stripe', '{\"Stripe-Signature\": \"t=1,v1=00\"}', $1)",
            &[mib.as_str().into()],
        )
        .unwrap()
        .unwrap();
        assert_eq!(stored(&bad_sig.to_string()).0, 2048);
        // a verified event keeps its body; its replays keep a sample
        let body = format!(
            r#"{{"id":"evt_ok","type":"x","created":{},"pad":"{}"}}"#,
            now_unix(),
            "p".repeat(5000)
        );
        assert_eq!(deliver(&body), "applied|no handler for x");
        assert!(deliver(&body).starts_with("duplicate|"));
        let (applied, duplicate): (i64, i64) = (
            stored("SELECT id FROM billing.webhook_events WHERE status = 'applied'").0,
            stored("SELECT id FROM billing.webhook_events WHERE status = 'duplicate'").0,
        );
        assert_eq!((applied > 5000, duplicate), (true, 2048));
    }

    #[pg_test]
    fn a_repeated_failure_keeps_only_a_sample() {
        setup();
        let body = format!(
            r#"{{"id":"evt_f","type":"payment_intent.succeeded","created":{},"pad":"{}","data":{{"object":{{"id":"pi_f","amount_received":10,"currency":"jpy","metadata":{{"account":"a"}}}}}}}}"#,
            now_unix(),
            "p".repeat(5000)
        );
        assert!(deliver(&body).starts_with("failed|22023: currency jpy"));
        assert!(deliver(&body).starts_with("failed|"));
        let sizes: String = one(
            "SELECT string_agg(octet_length(body)::text, ',' ORDER BY id) FROM billing.webhook_events",
        );
        let sizes: Vec<i64> = sizes.split(',').map(|s| s.parse().unwrap()).collect();
        assert!(sizes[0] > 5000 && sizes[1] == 2048, "{sizes:?}");
    }

    #[pg_test]
    fn an_admin_purges_old_deliveries_that_changed_nothing() {
        setup();
        let now = now_unix();
        let ok = format!(r#"{{"id":"evt_1","type":"x","created":{now}}}"#);
        deliver(&ok);
        deliver(&ok); // duplicate
        run("SELECT * FROM billing.receive_webhook('nowhere', '{}', 'x')"); // rejected
        run("SET LOCAL session_replication_role = replica");
        run("UPDATE billing.webhook_events SET received_at = received_at - interval '40 days'");
        run("SET LOCAL session_replication_role = origin");
        run("SELECT * FROM billing.receive_webhook('nowhere', '{}', 'y')"); // recent
        let purged: i64 = one("SELECT billing.purge_webhook_events(interval '30 days')");
        assert_eq!(purged, 2, "the old duplicate and the old rejection");
        let left: String =
            one("SELECT string_agg(status, ',' ORDER BY id) FROM billing.webhook_events");
        assert_eq!(left, "applied,rejected");
        assert_rejected(
            "DELETE FROM billing.webhook_events WHERE status = 'applied'",
            "42501",
        );
        assert_rejected(
            "SELECT billing.purge_webhook_events(interval '-1 day')",
            "22023",
        );
        run("CREATE ROLE purge_app NOLOGIN");
        run("GRANT billing_app TO purge_app");
        run("SELECT billing.grant_tenant('default', 'purge_app')");
        run("SET LOCAL ROLE purge_app");
        assert_rejected("SELECT billing.purge_webhook_events()", "42501");
        assert_rejected("DELETE FROM billing.webhook_events", "42501");
        run("RESET ROLE");
        let _ = SECRET;
    }

    #[pg_test]
    fn a_temporary_function_cannot_be_registered_as_a_handler() {
        setup();
        run("CREATE FUNCTION pg_temp.planted(ev billing.webhook_events) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$");
        assert_rejected(
            "SELECT billing.register_webhook_handler('x', 'pg_temp.planted(billing.webhook_events)')",
            "22023",
        );
    }

    #[pg_test]
    fn no_pg_billing_function_takes_an_advisory_lock() {
        let uses: i64 = one(
            "SELECT count(*) FROM pg_proc WHERE pronamespace = 'billing'::regnamespace \
             AND prosrc ILIKE '%advisory%'",
        );
        assert_eq!(uses, 0, "another role could hold it and stall the intake");
    }
}
