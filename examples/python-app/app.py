"""A small AI-ish API billed by pg_billing: a free tier, a paid plan and top-ups.

Who calls, and what they get (one pg_billing unit, "requests", 1 per call):
  guest       no X-User header; known by its guest_id cookie (or X-Guest-Id): 3 requests, ever
  user        X-User: <id> (a stand-in for a real session): 5 requests a day, in the user's time zone
  subscriber  a user whose "pro" subscription is live: also the plan's 100 requests per period
Signed-in users can buy requests (1 per cent, card fee on top) by a checkout confirmed by polling.

Every API call is ONE transaction: the gate (billing.check), the debit (billing.ingest, strict,
keyed by the request id) and the work (the answer, written to app.completions). If the work
fails, the debit rolls back with it.
"""
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import psycopg
from flask import Flask, abort, g, jsonify, request
from psycopg.types.json import Jsonb
from werkzeug.exceptions import HTTPException

import db

UNIT = "requests"
GUEST_REQUESTS = 3                 # a guest's lifetime allowance
DAILY_REQUESTS = 5                 # a signed-in user's daily allowance
PLAN_PRICE = "price_pro_monthly"   # the provider's price of plan "pro" (schema.sql)
CURRENCY, CARD_KIND = "usd", "card"

# What a refused caller can do, named in the 429 body.
ACTIONS = {
    "sign_up": {"action": "sign_up", "method": "POST", "href": "/signup"},
    "subscribe": {"action": "subscribe", "method": "POST", "href": "/billing/subscription"},
    "top_up": {"action": "top_up", "method": "POST", "href": "/billing/topups"},
    "update_payment_method": {"action": "update_payment_method", "href": "/billing/subscription"},
    "wait": {"action": "wait"},
}
# pg_billing's SQLSTATEs (README "Errors") as HTTP statuses
HTTP_STATUS = {"22023": 400, "22004": 400, "23505": 409, "55000": 409, "55P03": 503}


class ModelError(Exception):
    """The work failed (the model, here)."""


class OverLimit(Exception):
    """A strict debit was refused: another request took the last credit since the gate."""


def echo_model(prompt: str) -> str:
    return f"You said: {prompt}"


@dataclass
class Caller:
    kind: str  # "guest" or "user"
    id: str

    @property
    def account(self) -> str:  # the pg_billing account
        return f"{self.kind}:{self.id}"


def iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts else None


def create_app(dsn: str, provider, tenant: str = "demo", model=echo_model) -> Flask:
    app = Flask(__name__)

    def conn() -> psycopg.Connection:
        if "conn" not in g:
            g.conn = db.connect(dsn, tenant)
        return g.conn

    @app.teardown_appcontext
    def close_conn(_exc):
        if (c := g.pop("conn", None)) is not None:
            c.close()

    # -- who is calling ------------------------------------------------------------------

    def guest_id() -> str | None:
        return request.headers.get("X-Guest-Id") or request.cookies.get("guest_id")

    def caller(c) -> Caller:
        if request.headers.get("X-User"):
            return signed_in(c)
        gid = guest_id()
        if not gid:
            gid = g.new_guest = uuid.uuid4().hex
        # First sight of this guest: its free requests, once. The row stays after sign-up,
        # so a converted guest coming back signed out gets nothing again. (The app must
        # remember this: billing.set_allowance on a converted guest grants it a new allowance.)
        if db.one(c, "INSERT INTO app.guests (id) VALUES (%s) ON CONFLICT DO NOTHING RETURNING id", (gid,)):
            db.one(c, "SELECT * FROM billing.set_allowance(%s, %s, %s, every => 'never')",
                   (f"guest:{gid}", UNIT, GUEST_REQUESTS))
        return Caller("guest", gid)

    def signed_in(c) -> Caller:
        uid = request.headers.get("X-User")
        if not uid:
            abort(403, "sign up or sign in first")
        if not db.one(c, "SELECT 1 FROM app.users WHERE id = %s", (uid,)):
            abort(401, f"unknown user {uid}")
        return Caller("user", uid)

    @app.after_request
    def set_guest_cookie(resp):
        if "new_guest" in g:
            resp.set_cookie("guest_id", g.new_guest, httponly=True, samesite="Lax")
        return resp

    # -- billing reads -------------------------------------------------------------------

    def check(c, account: str) -> dict:
        return db.one(c, "SELECT * FROM billing.check(%s, %s, 1)", (account, UNIT))

    def subscription(c, account: str) -> dict | None:
        return db.one(c, """SELECT subscription, status, access, plan, period_end, allowance, allowance_left
                            FROM billing.subscription_status WHERE account = %s AND unit = %s""",
                      (account, UNIT))

    def allowance_resets_at(c, account: str) -> datetime | None:
        # check() gives resets_at for limits only; an allowance window's credit is a `plan`
        # grant expiring at the window's end, so the next refill is the earliest such expiry.
        return db.one(c, """SELECT min(expires_at) AS at FROM billing.grant_balances
                            WHERE account = %s AND unit = %s AND kind = 'plan' AND expires_at > now()""",
                      (account, UNIT))["at"]

    def over_limit(c, who: Caller, gate: dict):
        reason = gate["reason"]
        sub = subscription(c, who.account)
        if reason.startswith("subscription_"):   # plan credit held back: past_due, unpaid, paused…
            actions = ["update_payment_method", "top_up"]
        elif reason.startswith("limit:"):        # a spend cap: wait for its window (resets_at)
            actions = ["wait"]
        elif who.kind == "guest":
            actions = ["sign_up"]
        elif sub and sub["access"] == "open":
            actions = ["top_up"]
        else:
            actions = ["subscribe", "top_up"]
        return jsonify(
            error="over_limit", reason=reason, account=who.account, available=gate["available"],
            resets_at=iso(gate["resets_at"] or allowance_resets_at(c, who.account)),
            actions=[ACTIONS[a] for a in actions],
        ), 429

    # -- the API ---------------------------------------------------------------------------

    @app.post("/v1/complete")
    def complete():
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        prompt = str((request.get_json(silent=True) or {}).get("prompt", ""))
        c = conn()
        try:
            with c.transaction():
                who = caller(c)
                done = db.one(c, "SELECT answer FROM app.completions WHERE account = %s AND request_id = %s",
                              (who.account, request_id))
                if done:  # a retry of an answered request: the same answer, not billed again
                    return {"request_id": request_id, "answer": done["answer"], "replayed": True}
                gate = check(c, who.account)
                if not gate["allowed"]:
                    return over_limit(c, who, gate)
                try:
                    usage = db.one(c, """SELECT status, available FROM billing.ingest(%s, %s, 1,
                                             key => %s, strict => true)""",
                                   (who.account, UNIT, f"req:{who.account}:{request_id}"))
                except psycopg.errors.CheckViolation:  # 23514: raced for the last credit
                    raise OverLimit
                answer = model(prompt)  # the work; an exception rolls back the debit too
                c.execute("""INSERT INTO app.completions (request_id, account, prompt, answer)
                             VALUES (%s, %s, %s, %s)""", (request_id, who.account, prompt, answer))
        except OverLimit:
            return over_limit(c, who, check(c, who.account))
        return {"request_id": request_id, "answer": answer, "remaining": usage["available"]}

    @app.post("/signup")
    def signup():
        body = request.get_json(silent=True) or {}
        uid, tz = body.get("user_id"), body.get("time_zone", "UTC")
        if not uid:
            abort(400, "user_id is required")
        account, gid = f"user:{uid}", guest_id()
        c = conn()
        with c.transaction():
            c.execute("INSERT INTO app.users (id, time_zone) VALUES (%s, %s)", (uid, tz))
            converted = []
            if gid:
                # The guest's running allowance and unspent credit move to the account, once
                # (55000 if this guest already became another account: nothing is created).
                converted = db.rows(c, "SELECT unit, moved, status FROM billing.convert_guest(%s, %s)",
                                    (f"guest:{gid}", account))
                c.execute("""INSERT INTO app.guests (id, converted_to) VALUES (%s, %s)
                             ON CONFLICT (id) DO UPDATE SET converted_to = excluded.converted_to""",
                          (gid, uid))
            db.one(c, "SELECT * FROM billing.set_allowance(%s, %s, %s, every => 'day', time_zone => %s)",
                   (account, UNIT, DAILY_REQUESTS, tz))
            gate = check(c, account)
        return {"user": uid, "account": account, "guest": gid, "converted": converted,
                "available": gate["available"]}, 201

    @app.get("/billing")
    def summary():
        c = conn()
        with c.transaction():
            who = caller(c)
            gate = check(c, who.account)
            bought = db.one(c, """SELECT coalesce(sum(remaining), 0)::bigint AS n FROM billing.grant_balances
                                  WHERE account = %s AND unit = %s AND state = 'active'
                                    AND kind IN ('topup', 'reload')""", (who.account, UNIT))["n"]
            sub = subscription(c, who.account)
            resets_at = allowance_resets_at(c, who.account)
        return {
            "account": who.account, "available": gate["available"], "reason": gate["reason"],
            # allowances (plan credit) drain before bought credit, so what is not bought is allowance
            "allowance_left": gate["available"] - bought, "credits": bought,
            "allowance_resets_at": iso(resets_at),
            "subscription": sub and {**sub, "period_end": iso(sub["period_end"])},
        }

    # -- subscription: created at the provider, its state polled and projected -------------

    @app.post("/billing/subscription")
    def subscribe():
        c = conn()
        who = signed_in(c)
        user = db.one(c, "SELECT customer_id, subscription_id FROM app.users WHERE id = %s", (who.id,))
        if user["subscription_id"]:
            abort(409, f"already subscribed ({user['subscription_id']}): POST /billing/subscription/refresh")
        customer = user["customer_id"] or provider.create_customer(metadata={"account": who.account})["id"]
        sub = provider.create_subscription(customer=customer, price=PLAN_PRICE,
                                           metadata={"account": who.account},
                                           idempotency_key=f"subscribe:{who.account}")
        with c.transaction():
            c.execute("UPDATE app.users SET customer_id = %s, subscription_id = %s WHERE id = %s",
                      (customer, sub["id"], who.id))
            synced = sync_subscription(c, sub, datetime.now(timezone.utc))
        return {**synced, "pay_url": sub["latest_invoice"]["hosted_invoice_url"]}, 201

    @app.post("/billing/subscription/refresh")
    def refresh_subscription():
        c = conn()
        who = signed_in(c)
        sub_id = db.one(c, "SELECT subscription_id FROM app.users WHERE id = %s", (who.id,))["subscription_id"]
        if not sub_id:
            abort(404, "no subscription")
        fetched_at = datetime.now(timezone.utc)
        sub = provider.retrieve_subscription(sub_id, expand=["latest_invoice"])  # no transaction open
        return sync_subscription(c, sub, fetched_at)

    def sync_subscription(c, sub: dict, fetched_at: datetime) -> dict:
        row = db.one(c, """SELECT status, outcome, credit_granted, credit_suspended, credit_resumed,
                                  credit_revoked
                           FROM billing.sync_subscription(%s, observed_at => %s, source => 'poll')""",
                     (Jsonb(sub), fetched_at))
        return {"subscription": sub["id"], **row}

    # -- top-up: a checkout confirmed by polling the provider (no webhook) -----------------

    @app.post("/billing/topups")
    def open_topup():
        c = conn()
        who = signed_in(c)
        body = request.get_json(silent=True) or {}
        if not body.get("key"):
            abort(400, "key (the client's cart id) is required")
        intent = db.one(c, "SELECT * FROM billing.open_checkout(%s, %s, %s, %s, %s, key => %s)",
                        (who.account, UNIT, int(body.get("credits", 0)), CURRENCY, CARD_KIND,
                         f"topup:{who.account}:{body['key']}"))
        # The provider's session for the quoted total; its idempotency key makes a retry
        # (or a crash before attach) find the same session.
        session = provider.create_checkout_session(
            amount_total=intent["total"], currency=CURRENCY, client_reference_id=who.account,
            metadata={"checkout_intent": str(intent["intent_id"]), "account": who.account},
            idempotency_key=f"checkout_intent:{intent['intent_id']}")
        c.execute("SELECT billing.attach_checkout(%s, %s)", (intent["intent_id"], session["id"]))
        return {"intent_id": intent["intent_id"], "outcome": intent["outcome"], "status": intent["status"],
                "credits": intent["credits"], "fee": intent["fee"], "total": intent["total"],
                "checkout_url": session["url"]}, 201 if intent["outcome"] == "opened" else 200

    @app.get("/billing/topups/<int:intent_id>")
    def poll_topup(intent_id: int):
        c = conn()
        who = signed_in(c)
        intent = db.one(c, "SELECT account, provider_session FROM billing.checkout_intents WHERE id = %s",
                        (intent_id,))
        if not intent or intent["account"] != who.account:
            abort(404, "no such top-up")
        session = provider.retrieve_checkout_session(intent["provider_session"])  # no transaction open
        outcome = None
        if session["payment_status"] == "paid":
            # what the provider says was paid; credited once whoever confirms (poll, return page)
            outcome = db.one(c, "SELECT status FROM billing.confirm_checkout(%s, %s, %s, %s)",
                             (intent_id, session["payment_intent"], session["amount_total"],
                              session["currency"]))["status"]
        elif session["status"] == "expired":
            outcome = db.one(c, "SELECT billing.fail_checkout(%s, %s) AS status",
                             (intent_id, "checkout session expired"))["status"]
        state = db.one(c, "SELECT status, credits, total, credited, note FROM billing.checkout_status(%s)",
                       (intent_id,))
        return {"intent_id": intent_id, "outcome": outcome, **state,
                "available": check(c, who.account)["available"]}

    # -- errors as JSON ----------------------------------------------------------------------

    @app.errorhandler(HTTPException)
    def http_error(e):
        return jsonify(error=e.name.lower().replace(" ", "_"), message=e.description), e.code

    @app.errorhandler(ModelError)
    def model_error(e):
        return jsonify(error="model_failed", message=str(e)), 502

    @app.errorhandler(psycopg.Error)
    def db_error(e):
        return jsonify(error="database", sqlstate=e.sqlstate, message=e.diag.message_primary,
                       hint=e.diag.message_hint), HTTP_STATUS.get(e.sqlstate, 500)

    return app


if __name__ == "__main__":  # a manual try: PG_BILLING_DSN=… python app.py (a fake provider is in tests/)
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tests"))
    from fake_stripe import FakeStripe
    create_app(os.environ["PG_BILLING_DSN"], FakeStripe()).run(port=5000)
