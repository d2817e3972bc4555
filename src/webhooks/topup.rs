//! The built-in Stripe projection of a paid top-up (`checkout.session.completed`,
//! `payment_intent.succeeded`). A paid top-up credits the account once,
//! whichever event reports it first: the grant key is the payment's
//! (`billing.payment_key`). The amount is what was paid (`amount_total`,
//! `amount_received`) in a currency the endpoint maps, never anything from
//! metadata.
//!
//! What the event says is read without the database (`read_event`); the
//! rest is one lock, two index probes and the grant. The payments that are
//! not plain top-ups (a subscription's checkout, a checkout intent's or an
//! auto-reload's charge) go to their SQL projections in sql/webhooks.sql.

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{AllocatedByRust, JsonB};
use serde_json::{json, Value};

use crate::db::{self, Row, Sql, INT8, TEXT};
use crate::direct::{self, Key, Snapshot};
use crate::error::{BillingError, OrRaise, Result};
use crate::grants;
use crate::input;
use crate::tenancy::current_tenant;

/// What a payment event asks of the projection, from the event alone.
#[derive(Debug, PartialEq)]
pub enum Reading<'a> {
    /// A subscription's checkout: its payments buy the plan, not credits.
    SubscriptionCheckout,
    /// Not a paid top-up; the reason the result gives.
    NotCredited(&'static str),
    /// A payment: its amount paid (as the event gives it) and its id.
    Paid {
        paid: Option<&'a Value>,
        payment: Option<String>,
    },
}

/// `obj ->> field` as PostgreSQL reads it: a string's text, any other
/// value's JSON text, nothing for null or a missing field.
fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn field<'a>(obj: &'a Value, name: &str) -> Option<&'a Value> {
    obj.get(name)
}

fn metadata<'a>(obj: &'a Value, name: &str) -> Option<&'a Value> {
    obj.get("metadata")?.get(name)
}

/// The account a Stripe object names: its metadata.account, else (a
/// Checkout Session) its client_reference_id.
pub fn named_account(obj: &Value) -> Option<String> {
    text(metadata(obj, "account")).or_else(|| text(field(obj, "client_reference_id")))
}

/// `named_account` for SQL (a sharding router finds a delivery's account
/// with it); NULL when the object names none.
#[pg_extern(immutable, parallel_safe)]
fn stripe_named_account(obj: crate::input::JsonArg) -> Option<String> {
    obj.value("obj").map(named_account).or_raise()
}

/// What `event_type`'s object `obj` is: a subscription's checkout, a payment
/// that credits nothing (a subscription invoice's, an unpaid session), or a
/// payment to credit.
pub fn read_event<'a>(event_type: Option<&str>, obj: &'a Value) -> Reading<'a> {
    if text(field(obj, "mode")).as_deref() == Some("subscription") {
        return Reading::SubscriptionCheckout;
    }
    // an invoice's payment without an account to credit is a subscription's
    // (a one-off top-up invoice names its account in metadata)
    if event_type == Some("payment_intent.succeeded")
        && text(metadata(obj, "account")).is_none()
        && (text(field(obj, "invoice")).is_some()
            || text(field(obj, "description")).is_some_and(|d| d.starts_with("Subscription ")))
    {
        return Reading::NotCredited("the payment of a subscription invoice, not a top-up");
    }
    if event_type == Some("checkout.session.completed") {
        if text(field(obj, "payment_status")).as_deref() != Some("paid") {
            return Reading::NotCredited("checkout session is not paid");
        }
        return Reading::Paid {
            paid: field(obj, "amount_total"),
            payment: text(field(obj, "payment_intent")).or_else(|| text(field(obj, "id"))),
        };
    }
    Reading::Paid {
        paid: field(obj, "amount_received"),
        payment: text(field(obj, "id")),
    }
}

/// `(value)::bigint` as the SQL projection cast it: an integer as is, and
/// any other value through PostgreSQL's own bigint input, which raises its
/// own error for what is not one.
fn bigint(v: Option<&Value>) -> Option<i64> {
    if let Some(n) = v.and_then(Value::as_i64) {
        return Some(n);
    }
    let text = std::ffi::CString::new(text(v)?).unwrap_or_default();
    // SAFETY: int8in reads a C string and returns an int8 or raises.
    unsafe { pgrx::direct_function_call::<i64>(pg_sys::int8in, &[Some(text.as_ptr().into())]) }
}

/// The built-in handler of the two event types of a paid top-up.
pub const TOPUP_SIGNATURE: &std::ffi::CStr = c"billing.stripe_credit_topup(billing.webhook_events)";

/// Handle a paid top-up event (the intake's built-in handler for the two
/// event types); returns what was credited, or why not.
#[pg_extern(requires = ["webhooks"])]
#[search_path(pg_catalog, billing, pg_temp)]
fn stripe_credit_topup(
    ev: Option<pgrx::composite_type!("billing.webhook_events")>,
) -> Option<JsonB> {
    input::required("ev", ev).and_then(credit_topup).or_raise()
}

/// `stripe_credit_topup` of an event row.
pub fn credit_topup(ev: PgHeapTuple<'_, AllocatedByRust>) -> Result<Option<JsonB>> {
    let attr = |name: &str| BillingError::Internal(format!("event row: {name}"));
    let payload: Option<JsonB> = ev.get_by_name("payload").map_err(|_| attr("payload"))?;
    let event_type: Option<String> = ev
        .get_by_name("event_type")
        .map_err(|_| attr("event_type"))?;
    let endpoint: i64 = ev
        .get_by_name("endpoint_id")
        .map_err(|_| attr("endpoint_id"))?
        .ok_or_else(|| attr("endpoint_id"))?;
    let payload = payload.map(|p| p.0).unwrap_or(Value::Null);
    let obj = payload
        .pointer("/data/object")
        .cloned()
        .unwrap_or(Value::Null);
    let result = match read_event(event_type.as_deref(), &obj) {
        Reading::SubscriptionCheckout => {
            let account = named_account(&obj);
            return elsewhere(SUBSCRIPTION_CHECKOUT, ev, vec![account.into()]);
        }
        Reading::NotCredited(why) => json!({"credited": false, "why": why}),
        Reading::Paid { paid, payment } => {
            let paid = bigint(paid);
            let payable = paid.filter(|p| *p > 0).zip(payment.clone());
            if let Some((paid, payment)) = &payable {
                let paid = *paid;
                let quote = match checkout_intent(&obj)? {
                    Some(intent) => Some(("checkout_intent", intent)),
                    None => bigint(metadata(&obj, "reload_request")).map(|r| ("reload_request", r)),
                };
                if let Some((quote, id)) = quote {
                    lock_payment(endpoint, &current_tenant()?, payment)?;
                    let args = vec![quote.into(), id.into(), payment.clone().into(), paid.into()];
                    return elsewhere(QUOTED_PAYMENT, ev, args);
                }
            }
            let account = named_account(&obj).ok_or_else(|| {
                BillingError::invalid(
                    "payment",
                    "no account to credit: set metadata.account or client_reference_id on the payment",
                )
            })?;
            let (paid, payment) = payable.ok_or_else(|| {
                BillingError::invalid(
                    "payment",
                    format!(
                        "payment {} has no positive amount paid",
                        payment.as_deref().unwrap_or("?")
                    ),
                )
            })?;
            let currency = text(field(&obj, "currency"));
            Spi::connect_mut(|c| credit(c, endpoint, &account, &payment, paid, currency))?
        }
    };
    Ok(Some(JsonB(result)))
}

/// `checkout_intent` for SQL (a sharding router finds a delivery's account
/// through it); NULL when the object pays no intent.
#[pg_extern(stable)]
fn stripe_checkout_intent(obj: input::JsonArg) -> Option<i64> {
    obj.value("obj").and_then(checkout_intent).or_raise()
}

/// The checkout intent a Stripe payment or checkout session pays, if any:
/// named in its metadata, the intent its session was attached to, or the
/// intent already paid by this PaymentIntent.
fn checkout_intent(obj: &Value) -> Result<Option<i64>> {
    if let Some(id) = bigint(metadata(obj, "checkout_intent")) {
        return Ok(Some(id));
    }
    let index = match text(field(obj, "object")).as_deref() {
        Some("checkout.session") => c"checkout_intents_session",
        Some("payment_intent") => c"checkout_intents_payment",
        _ => return Ok(None),
    };
    let Some(id) = text(field(obj, "id")) else {
        return Ok(None);
    };
    let tenant = current_tenant()?;
    direct::find_one(
        c"checkout_intents",
        index,
        &[Key::Text(&tenant), Key::Text(&id)],
        Snapshot::New,
        |t| t.get::<i64>(c"id"),
    )
}

/// One delivery about a payment at a time, whichever event type reports it:
/// the lock is the payment's own object row (the SQL projections take it
/// too). A delivery about the PaymentIntent itself already holds it since
/// its intake, so it takes no second row and no second lock; one about
/// another object (a checkout session, a charge) takes it after its own, so
/// no two deliveries wait for each other in opposite orders.
fn lock_payment(endpoint: i64, tenant: &str, payment: &str) -> Result<()> {
    super::intake::lock_unless_held(endpoint, tenant, payment)
}

/// The projections of the payments that are not plain top-ups (rare: run
/// unprepared, their arguments' types taken from the values).
const SUBSCRIPTION_CHECKOUT: &str = "SELECT billing.stripe_subscription_checkout($1, $2)";
const QUOTED_PAYMENT: &str = "SELECT billing.stripe_quoted_payment($1, $2, $3, $4, $5)";

/// Run the SQL projection `sql` on the event (its `$1`) and `args`.
fn elsewhere(
    sql: &'static str,
    ev: PgHeapTuple<'_, AllocatedByRust>,
    args: Vec<DatumWithOid<'_>>,
) -> Result<Option<JsonB>> {
    let type_oid = ev
        .composite_type_oid()
        .ok_or_else(|| BillingError::Internal("event row has no type".into()))?;
    // SAFETY: the datum is the composite the statement's $1 is.
    let mut all = vec![unsafe { DatumWithOid::new(ev, type_oid) }];
    all.extend(args);
    Spi::connect_mut(|c| Ok(c.update(sql, Some(1), &all)?.first().get_one::<JsonB>()?))
}

/// The unit and credits `paid` minor units of `currency` buy at `endpoint`:
/// read from the endpoint's mapping when it maps the currency and the
/// product fits; otherwise `billing.stripe_credits` raises the error that
/// says why.
fn credits_for(
    c: &SpiClient<'_>,
    endpoint: i64,
    currency: Option<String>,
    paid: i64,
) -> Result<(String, i64)> {
    if let Some(code) = currency.as_deref().filter(|c| c.is_ascii()) {
        let mapped = direct::find_one(
            c"webhook_currencies",
            c"webhook_currencies_pkey",
            &[Key::Int8(endpoint), Key::Text(&code.to_ascii_lowercase())],
            Snapshot::Query,
            |t| {
                Ok((
                    t.get::<String>(c"unit")?,
                    t.get::<i64>(c"credits_per_minor_unit")?,
                ))
            },
        )?;
        if let Some((unit, credits)) = mapped.and_then(|(u, per)| Some((u, paid.checked_mul(per)?)))
        {
            return Ok((unit, credits));
        }
    }
    let row = db::read(
        c,
        &CREDITS,
        &[endpoint.into(), currency.into(), paid.into()],
    )?
    .next()
    .ok_or_else(|| BillingError::Internal("stripe_credits returned no row".into()))?;
    Ok((Row(&row).get("unit")?, Row(&row).get("credits")?))
}

static CREDITS: Sql = Sql {
    text: "SELECT unit, credits FROM billing.stripe_credits($1, $2, $3)",
    args: &[INT8, TEXT, INT8],
};

/// The grant key of a payment: the one a Stripe top-up is credited under,
/// so a payment credits once whichever path reports it first (this
/// projection, a checkout intent, a reload request).
#[pg_extern(immutable, parallel_safe)]
pub fn payment_key(payment_ref: &str) -> String {
    format!("stripe:{payment_ref}")
}

static APPLY_REVERSALS: Sql = Sql {
    text: "SELECT billing.stripe_apply_reversals($1, $2) AS result",
    args: &[INT8, TEXT],
};

/// Credit `paid` minor units of `currency` paid under `payment` to
/// `account`, once; a refund or dispute that arrived first applies now.
fn credit(
    c: &mut SpiClient<'_>,
    endpoint: i64,
    account: &str,
    payment: &str,
    paid: i64,
    currency: Option<String>,
) -> Result<Value> {
    let tenant = current_tenant()?;
    let (unit, amount) = credits_for(c, endpoint, currency, paid)?;
    lock_payment(endpoint, &tenant, payment)?;
    let key = payment_key(payment);
    // already credited through a checkout intent or a reload request (whose
    // own report came first): that was the credit
    if let Some(id) = credited_through_quote(&tenant, &key)? {
        return Ok(
            json!({"credited": false, "grant_id": id, "payment": payment,
                         "why": "credited through its checkout intent or reload request"}),
        );
    }
    // the same for every event type that reports this payment, so it credits once
    let metadata = json!({"source": "stripe", "payment": payment});
    let g = grants::topup(c, account, &unit, amount, &key, &metadata)?;
    if reversed(endpoint, payment)? {
        db::write(c, &APPLY_REVERSALS, &[endpoint.into(), payment.into()])?;
    }
    Ok(
        json!({"credited": g.status == "applied", "grant_id": g.grant_id, "account": account,
              "amount": g.amount, "unit": unit, "payment": payment}),
    )
}

/// The grant under `key` if a checkout intent or a reload request made it.
fn credited_through_quote(tenant: &str, key: &str) -> Result<Option<i64>> {
    let found = direct::find_one(
        c"grants",
        c"grants_tenant_id_key_key",
        &[Key::Text(tenant), Key::Text(key)],
        Snapshot::New,
        |t| Ok((t.get::<i64>(c"id")?, t.get::<JsonB>(c"metadata")?)),
    )?;
    Ok(found
        .filter(|(_, m)| {
            m.0.get("checkout_intent").is_some() || m.0.get("reload_request").is_some()
        })
        .map(|(id, _)| id))
}

/// Whether the provider took money back from `payment` before it was credited.
fn reversed(endpoint: i64, payment: &str) -> Result<bool> {
    let found = direct::find_one(
        c"stripe_reversals",
        c"stripe_reversals_pkey",
        &[Key::Int8(endpoint), Key::Text(payment)],
        Snapshot::New,
        |_| Ok(()),
    )?;
    Ok(found.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(v: Value) -> Value {
        v
    }

    #[test]
    fn a_subscription_checkout_is_not_a_top_up() {
        let obj = session(json!({"mode": "subscription", "amount_total": 900}));
        assert_eq!(
            read_event(Some("checkout.session.completed"), &obj),
            Reading::SubscriptionCheckout
        );
    }

    #[test]
    fn a_subscription_invoice_payment_credits_nothing() {
        let by_invoice = json!({"invoice": "in_1", "amount_received": 900, "id": "pi_1"});
        let by_description = json!({"description": "Subscription creation", "id": "pi_1"});
        for obj in [by_invoice, by_description] {
            assert_eq!(
                read_event(Some("payment_intent.succeeded"), &obj),
                Reading::NotCredited("the payment of a subscription invoice, not a top-up")
            );
        }
        // a one-off invoice that names its account is a top-up
        let named = json!({"invoice": "in_1", "metadata": {"account": "org_1"}, "id": "pi_1"});
        assert!(matches!(
            read_event(Some("payment_intent.succeeded"), &named),
            Reading::Paid { .. }
        ));
    }

    #[test]
    fn an_unpaid_session_credits_nothing() {
        let obj = json!({"payment_status": "unpaid", "amount_total": 900});
        assert_eq!(
            read_event(Some("checkout.session.completed"), &obj),
            Reading::NotCredited("checkout session is not paid")
        );
    }

    #[test]
    fn a_session_pays_its_total_under_its_payment_intent() {
        let obj = json!({"id": "cs_1", "payment_status": "paid", "amount_total": 900,
                         "payment_intent": "pi_1", "amount_subtotal": 5});
        assert_eq!(
            read_event(Some("checkout.session.completed"), &obj),
            Reading::Paid {
                paid: Some(&json!(900)),
                payment: Some("pi_1".into())
            }
        );
        // a session without a PaymentIntent is its own payment
        let own = json!({"id": "cs_1", "payment_status": "paid", "amount_total": 900});
        assert!(matches!(
            read_event(Some("checkout.session.completed"), &own),
            Reading::Paid { payment: Some(p), .. } if p == "cs_1"
        ));
    }

    #[test]
    fn a_payment_intent_pays_what_it_received_not_its_amount() {
        let obj = json!({"id": "pi_1", "amount": 5000, "amount_received": 900});
        assert_eq!(
            read_event(Some("payment_intent.succeeded"), &obj),
            Reading::Paid {
                paid: Some(&json!(900)),
                payment: Some("pi_1".into())
            }
        );
    }

    #[test]
    fn the_account_is_the_metadata_s_then_the_client_reference() {
        let both = json!({"metadata": {"account": "org_1"}, "client_reference_id": "org_2"});
        assert_eq!(named_account(&both).as_deref(), Some("org_1"));
        let reference = json!({"metadata": {}, "client_reference_id": "org_2"});
        assert_eq!(named_account(&reference).as_deref(), Some("org_2"));
        let null = json!({"metadata": {"account": null}});
        assert_eq!(named_account(&null), None);
        // a number is read as its text, as ->> reads it
        let number = json!({"metadata": {"account": 42}});
        assert_eq!(named_account(&number).as_deref(), Some("42"));
    }
}
