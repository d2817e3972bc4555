"""An in-memory stand-in for the payment provider, returning objects shaped like Stripe's API
(2025 versions: the billing period on the subscription item, the invoice's subscription under
parent.subscription_details). Tests drive what the customer does with the methods at the end."""
import copy
import time
import uuid


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class FakeStripe:
    PRICES = {"price_pro_monthly": {"unit_amount": 900, "currency": "usd", "interval": "month"}}

    def __init__(self):
        self.customers, self.subscriptions, self.invoices, self.sessions = {}, {}, {}, {}
        self.idempotent = {}  # idempotency key -> the object it created (Stripe's Idempotency-Key)
        self.calls = []

    # -- what the app calls --------------------------------------------------------------

    def create_customer(self, *, metadata: dict) -> dict:
        cus = {"id": _id("cus"), "object": "customer", "metadata": dict(metadata)}
        self.customers[cus["id"]] = cus
        return copy.deepcopy(cus)

    def create_subscription(self, *, customer: str, price: str, metadata: dict, idempotency_key: str) -> dict:
        """payment_behavior=default_incomplete: incomplete until its first invoice is paid."""
        self.calls.append(("create_subscription", idempotency_key))
        if idempotency_key in self.idempotent:
            return self.retrieve_subscription(self.idempotent[idempotency_key], expand=["latest_invoice"])
        p, now = self.PRICES[price], int(time.time())
        sub_id, item_id, start, end = _id("sub"), _id("si"), now, now + 30 * 86400
        inv = {
            "id": _id("in"), "object": "invoice", "status": "open", "customer": customer,
            "billing_reason": "subscription_create", "currency": p["currency"],
            "amount_due": p["unit_amount"], "amount_paid": 0, "collection_method": "charge_automatically",
            "hosted_invoice_url": "https://invoice.stripe.test/i/" + uuid.uuid4().hex,
            "period_start": start, "period_end": start,
            "parent": {"type": "subscription_details", "subscription_details": {"subscription": sub_id}},
            "lines": {"object": "list", "has_more": False, "data": [{
                "id": _id("il"), "object": "line_item", "amount": p["unit_amount"], "currency": p["currency"],
                "period": {"start": start, "end": end},
                "pricing": {"type": "price_details", "price_details": {"price": price}},
                "parent": {"type": "subscription_item_details", "subscription_item_details": {
                    "subscription": sub_id, "subscription_item": item_id, "proration": False}}}]},
        }
        sub = {
            "id": sub_id, "object": "subscription", "status": "incomplete", "customer": customer,
            "metadata": dict(metadata), "currency": p["currency"], "collection_method": "charge_automatically",
            "cancel_at_period_end": False, "cancel_at": None, "canceled_at": None, "ended_at": None,
            "pause_collection": None, "created": now, "start_date": now, "livemode": False,
            "latest_invoice": inv["id"],
            "items": {"object": "list", "has_more": False, "data": [{
                "id": item_id, "object": "subscription_item", "quantity": 1, "subscription": sub_id,
                "current_period_start": start, "current_period_end": end,
                "price": {"id": price, "object": "price", "type": "recurring", "currency": p["currency"],
                          "unit_amount": p["unit_amount"],
                          "recurring": {"interval": p["interval"], "interval_count": 1}}}]},
        }
        self.invoices[inv["id"]], self.subscriptions[sub_id] = inv, sub
        self.idempotent[idempotency_key] = sub_id
        return self.retrieve_subscription(sub_id, expand=["latest_invoice"])

    def retrieve_subscription(self, sub_id: str, expand=()) -> dict:
        self.calls.append(("retrieve_subscription", sub_id))
        sub = copy.deepcopy(self.subscriptions[sub_id])
        if "latest_invoice" in expand:
            sub["latest_invoice"] = copy.deepcopy(self.invoices[sub["latest_invoice"]])
        return sub

    def create_checkout_session(self, *, amount_total: int, currency: str, client_reference_id: str,
                                metadata: dict, idempotency_key: str) -> dict:
        self.calls.append(("create_checkout_session", idempotency_key))
        if idempotency_key in self.idempotent:
            return self.retrieve_checkout_session(self.idempotent[idempotency_key])
        cs = {
            "id": _id("cs_test"), "object": "checkout.session", "mode": "payment", "status": "open",
            "payment_status": "unpaid", "amount_total": amount_total, "currency": currency,
            "client_reference_id": client_reference_id, "metadata": dict(metadata), "payment_intent": None,
            "url": "https://checkout.stripe.test/c/pay/" + uuid.uuid4().hex,
            "created": int(time.time()), "expires_at": int(time.time()) + 86400,
        }
        self.sessions[cs["id"]] = cs
        self.idempotent[idempotency_key] = cs["id"]
        return copy.deepcopy(cs)

    def retrieve_checkout_session(self, session_id: str) -> dict:
        self.calls.append(("retrieve_checkout_session", session_id))
        return copy.deepcopy(self.sessions[session_id])

    # -- what the customer (the test) does at the provider ----------------------------------

    def pay_session(self, session_id: str) -> str:
        cs = self.sessions[session_id]
        cs.update(status="complete", payment_status="paid", payment_intent=_id("pi"))
        return cs["payment_intent"]

    def expire_session(self, session_id: str) -> None:
        """The card was declined and the customer gave up: the session expires unpaid."""
        self.sessions[session_id].update(status="expired")

    def pay_subscription(self, sub_id: str) -> None:
        sub = self.subscriptions[sub_id]
        inv = self.invoices[sub["latest_invoice"]]
        inv.update(status="paid", amount_paid=inv["amount_due"], payment_intent=_id("pi"))
        sub["status"] = "active"

    def payment_fails(self, sub_id: str) -> None:
        """A charge of the subscription failed: Stripe marks it past_due."""
        self.subscriptions[sub_id]["status"] = "past_due"
