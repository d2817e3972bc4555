// Stripe events for the tests, built from Stripe's own example objects
// (tests/fixtures/stripe, every field as Stripe sends it) with the fields a
// test is about set, and signed with pgcrypto's HMAC as Stripe signs them.

use pgrx::prelude::*;
use serde_json::{json, Value};

use crate::pgrx_tests::support::*;

pub const SECRET: &str = "whsec_stripe_test";

fn fixture(name: &str) -> Value {
    let text = match name {
        "event" => include_str!("../tests/fixtures/stripe/event.json"),
        "payment_intent" => include_str!("../tests/fixtures/stripe/payment_intent.json"),
        "checkout_session" => include_str!("../tests/fixtures/stripe/checkout_session.json"),
        "charge" => include_str!("../tests/fixtures/stripe/charge.json"),
        "dispute" => include_str!("../tests/fixtures/stripe/dispute.json"),
        "subscription" => include_str!("../tests/fixtures/stripe/subscription.json"),
        "invoice" => include_str!("../tests/fixtures/stripe/invoice.json"),
        other => panic!("no fixture {other}"),
    };
    serde_json::from_str(text).expect("fixture is JSON")
}

fn with(mut object: Value, fields: Value) -> Value {
    for (k, v) in fields.as_object().expect("fields are an object") {
        object[k] = v.clone();
    }
    object
}

/// An event envelope around `object`.
pub fn event(id: &str, kind: &str, created: i64, object: Value) -> String {
    let e = with(
        fixture("event"),
        json!({"id": id, "type": kind, "created": created, "data": {"object": object}}),
    );
    e.to_string()
}

/// A succeeded PaymentIntent that paid `amount` for `account`.
pub fn payment_intent(pi: &str, amount: i64, currency: &str, account: &str) -> Value {
    with(
        fixture("payment_intent"),
        json!({"id": pi, "amount": amount, "amount_received": amount, "currency": currency,
               "status": "succeeded", "metadata": {"account": account}}),
    )
}

/// A completed, paid Checkout Session `cs` whose PaymentIntent `pi` took `amount`.
pub fn checkout_session(cs: &str, pi: &str, amount: i64, currency: &str, metadata: Value) -> Value {
    with(
        fixture("checkout_session"),
        json!({"id": cs, "payment_intent": pi, "amount_total": amount, "amount_subtotal": amount,
               "currency": currency, "payment_status": "paid", "status": "complete",
               "metadata": metadata}),
    )
}

/// A charge of `pi` for `amount`, of which `refunded` has been refunded so far.
pub fn charge(pi: &str, amount: i64, refunded: i64, currency: &str) -> Value {
    with(
        fixture("charge"),
        json!({"id": format!("ch_{pi}"), "payment_intent": pi, "amount": amount,
               "amount_captured": amount, "amount_refunded": refunded,
               "refunded": refunded == amount, "currency": currency}),
    )
}

/// A dispute of `pi`'s charge for `amount`, in `status`.
pub fn dispute(dp: &str, pi: &str, amount: i64, currency: &str, status: &str) -> Value {
    with(
        fixture("dispute"),
        json!({"id": dp, "charge": format!("ch_{pi}"), "payment_intent": pi, "amount": amount,
               "currency": currency, "status": status,
               "is_charge_refundable": false}),
    )
}

/// `account`'s subscription `id` to `price` for `seats`, in `status`, for the
/// billing period [start, end) in unix seconds (on its item, where the newest
/// API versions carry it), not being cancelled; its customer is `cus_<account>`.
#[allow(clippy::too_many_arguments)]
pub fn subscription(
    id: &str,
    account: &str,
    status: &str,
    price: &str,
    seats: i64,
    start: i64,
    end: i64,
) -> Value {
    let mut s = with(
        fixture("subscription"),
        json!({"id": id, "status": status, "customer": format!("cus_{account}"),
               "metadata": {"account": account}, "cancel_at": null, "canceled_at": null,
               "ended_at": null, "cancel_at_period_end": false, "trial_start": null,
               "trial_end": null, "pause_collection": null}),
    );
    let item = &mut s["items"]["data"][0];
    item["price"]["id"] = json!(price);
    item["plan"]["id"] = json!(price);
    item["quantity"] = json!(seats);
    item["current_period_start"] = json!(start);
    item["current_period_end"] = json!(end);
    item["subscription"] = json!(id);
    s
}

/// A renewal invoice of subscription `sub` billing the period [start, end)
/// (its line's period, as Stripe bills a licensed price ahead), in `status`,
/// `amount_paid` paid; the subscription is named where the newest API
/// versions name it.
pub fn invoice(id: &str, sub: &str, status: &str, amount_paid: i64, start: i64, end: i64) -> Value {
    let mut inv = with(
        fixture("invoice"),
        json!({"id": id, "status": status, "amount_paid": amount_paid, "subscription": null,
               "billing_reason": "subscription_cycle",
               "parent": {"type": "subscription_details", "quote_details": null,
                          "subscription_details": {"subscription": sub, "metadata": {}}}}),
    );
    let line = &mut inv["lines"]["data"][0];
    line["period"] = json!({"start": start, "end": end});
    line["parent"] = json!({"type": "subscription_item_details", "invoice_item_details": null,
        "subscription_item_details": {"subscription": sub, "subscription_item": "si_1",
                                      "proration": false, "proration_details": {"credited_items": null},
                                      "invoice_item": null}});
    inv
}

pub fn setup() {
    run("CREATE EXTENSION IF NOT EXISTS pgcrypto");
    run("CREATE OR REPLACE FUNCTION pg_temp.stripe_headers(body text, secret text, t bigint) RETURNS jsonb \
         LANGUAGE sql AS $$ SELECT jsonb_build_object('Stripe-Signature', \
            't=' || t || ',v1=' || encode(hmac(t || '.' || body, secret, 'sha256'), 'hex')) $$");
    run(&format!(
        "SELECT billing.define_webhook_endpoint('stripe', 'stripe', '{SECRET}')"
    ));
}

pub fn now_unix() -> i64 {
    one("SELECT floor(extract(epoch FROM now()))::bigint")
}

/// Deliver a signed event to the `stripe` endpoint: "status|reason or error".
pub fn deliver(body: &str) -> String {
    Spi::get_one_with_args::<String>(
        "SELECT status || '|' || coalesce(reason, '') FROM billing.receive_webhook('stripe', \
         pg_temp.stripe_headers($1, $2, $3), $1)",
        &[body.into(), SECRET.into(), now_unix().into()],
    )
    .expect("receive_webhook")
    .expect("a status")
}
