//! README, "Checkout confirmed by polling", over real connections: the
//! application's polls (several at once, as a front end retrying) and
//! Stripe's webhook for the same payment, all at the same moment, credit the
//! payment once.

use pg_billing_client_tests::{
    connect, fresh_db, ledger_problems, run_sessions, stripe_fixture, stripe_headers, unix_now,
};
use serde_json::json;

const DB: &str = "pgb_checkouts";
const SECRET: &str = "whsec_checkouts";
const POLLS: usize = 8;
const WEBHOOKS: usize = 4;

/// Stripe's own example event and Checkout Session (tests/fixtures/stripe),
/// completed and paid for `intent`.
fn session_completed(intent: i64) -> String {
    let mut session = stripe_fixture("checkout_session");
    for (k, v) in [
        ("id", json!("cs_poll_1")),
        ("payment_intent", json!("pi_poll_1")),
        ("amount_total", json!(1061)),
        ("currency", json!("usd")),
        ("payment_status", json!("paid")),
        ("status", json!("complete")),
        ("metadata", json!({"checkout_intent": intent.to_string()})),
    ] {
        session[k] = v;
    }
    let mut event = stripe_fixture("event");
    event["id"] = json!("evt_poll_1");
    event["type"] = json!("checkout.session.completed");
    event["created"] = json!(unix_now());
    event["data"] = json!({"object": session});
    event.to_string()
}

#[test]
fn polls_and_webhooks_at_once_credit_a_payment_once() {
    let mut admin = fresh_db(DB);
    admin
        .batch_execute(&format!(
            "SELECT * FROM billing.set_topup_fee('usd', 'card', 2.9, 30);
             SELECT billing.define_unit('usd_cents');
             SELECT billing.define_webhook_endpoint('stripe', 'stripe', '{SECRET}');"
        ))
        .unwrap();
    let intent: i64 = admin
        .query_one(
            "SELECT intent_id FROM billing.open_checkout('buyer', 'usd_cents', 1000, 'usd', 'card', 'co_1')",
            &[],
        )
        .unwrap()
        .get(0);
    let body = session_completed(intent);
    let answers = run_sessions(POLLS + WEBHOOKS, move |i, start| {
        let mut c = connect(DB);
        start.wait();
        if i < POLLS {
            c.query_one(
                "SELECT status FROM billing.confirm_checkout($1, 'pi_poll_1', 1061, 'usd')",
                &[&intent],
            )
            .unwrap()
            .get::<_, String>(0)
        } else {
            c.query_one(
                "SELECT status FROM billing.receive_webhook('stripe', $1::text::jsonb, $2)",
                &[&stripe_headers(&body, SECRET), &body],
            )
            .unwrap()
            .get::<_, String>(0)
        }
    });
    let polls = &answers[..POLLS];
    let hooks = &answers[POLLS..];
    assert!(
        polls.iter().all(|a| a == "paid" || a == "duplicate"),
        "{answers:?}"
    );
    // one delivery applies, the redeliveries of the same event are duplicates
    assert_eq!(
        hooks.iter().filter(|a| *a == "applied").count(),
        1,
        "{answers:?}"
    );
    let grants: i64 = admin
        .query_one(
            "SELECT count(*) FROM billing.grants WHERE account = 'buyer'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(grants, 1, "one credit: {answers:?}");
    let available: i64 = admin
        .query_one(
            "SELECT available FROM billing.check('buyer', 'usd_cents')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(available, 1000);
    assert!(ledger_problems(&mut admin).is_empty());
}
