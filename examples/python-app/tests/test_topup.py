"""Top-ups: a checkout quoted with the card fee, confirmed by polling the provider."""
import db
from conftest import ask, available, new_id, signup, user


def broke_user(client):
    uid = new_id()
    signup(client, uid)
    assert [ask(client, user(uid)).status_code for _ in range(6)] == [200] * 5 + [429]
    return uid


def topup_grants(admin, account):
    return db.rows(admin, """SELECT kind, amount, key FROM billing.grant_balances
                             WHERE account = %s AND kind = 'topup'""", (account,))


def test_a_checkout_top_up_lets_requests_through_again(client, admin, stripe):
    uid = broke_user(client)
    r = client.post("/billing/topups", json={"credits": 500, "key": "cart-1"}, headers=user(uid))
    assert r.status_code == 201
    intent = r.get_json()
    # $5.00 of requests, 2.9% + 30c on top: the least total whose net covers 500
    assert (intent["credits"], intent["fee"], intent["total"], intent["status"]) == (500, 46, 546, "pending")
    session = stripe.sessions[db.one(admin, "SELECT provider_session FROM billing.checkout_intents WHERE id = %s",
                                     (intent["intent_id"],))["provider_session"]]
    assert session["amount_total"] == 546
    assert session["metadata"]["checkout_intent"] == str(intent["intent_id"])

    # the customer has not paid yet
    poll = client.get(f"/billing/topups/{intent['intent_id']}", headers=user(uid)).get_json()
    assert (poll["status"], poll["outcome"], poll["credited"], poll["available"]) == ("pending", None, None, 0)
    assert ask(client, user(uid)).status_code == 429

    payment = stripe.pay_session(session["id"])
    poll = client.get(f"/billing/topups/{intent['intent_id']}", headers=user(uid)).get_json()
    assert (poll["status"], poll["outcome"], poll["credited"], poll["available"]) == ("paid", "paid", 500, 500)
    assert topup_grants(admin, f"user:{uid}") == [{"kind": "topup", "amount": 500, "key": f"stripe:{payment}"}]

    r = ask(client, user(uid))
    assert r.status_code == 200 and r.get_json()["remaining"] == 499
    summary = client.get("/billing", headers=user(uid)).get_json()
    assert (summary["available"], summary["credits"], summary["allowance_left"]) == (499, 499, 0)


def test_a_duplicate_confirmation_credits_once(client, admin, stripe):
    uid = broke_user(client)
    intent = client.post("/billing/topups", json={"credits": 1000, "key": "cart-7"}, headers=user(uid)).get_json()
    # the same cart again (a double click): the same intent and the same provider session
    again = client.post("/billing/topups", json={"credits": 1000, "key": "cart-7"}, headers=user(uid))
    assert again.status_code == 200
    assert (again.get_json()["intent_id"], again.get_json()["outcome"]) == (intent["intent_id"], "duplicate")
    assert len(stripe.sessions) == 1
    # the same cart with another amount is another purchase under a used key: refused
    assert client.post("/billing/topups", json={"credits": 900, "key": "cart-7"},
                       headers=user(uid)).status_code == 409

    stripe.pay_session(next(iter(stripe.sessions)))
    url = f"/billing/topups/{intent['intent_id']}"
    first = client.get(url, headers=user(uid)).get_json()
    second = client.get(url, headers=user(uid)).get_json()  # the return page and the poller both confirm
    assert (first["outcome"], first["credited"], first["available"]) == ("paid", 1000, 1000)
    assert (second["outcome"], second["status"], second["credited"], second["available"]) == \
        ("duplicate", "paid", 1000, 1000)
    assert len(topup_grants(admin, f"user:{uid}")) == 1
    assert available(admin, f"user:{uid}") == 1000

    # the provider (wrongly) reporting another payment for this intent is refused, not credited
    stripe.sessions[next(iter(stripe.sessions))]["payment_intent"] = "pi_other_" + new_id()
    r = client.get(url, headers=user(uid))
    assert r.status_code == 409 and r.get_json()["sqlstate"] == "23505"
    assert available(admin, f"user:{uid}") == 1000


def test_a_declined_checkout_credits_nothing(client, admin, stripe):
    uid = broke_user(client)
    intent = client.post("/billing/topups", json={"credits": 500, "key": "cart-x"}, headers=user(uid)).get_json()
    stripe.expire_session(next(iter(stripe.sessions)))  # card declined, the customer gave up

    poll = client.get(f"/billing/topups/{intent['intent_id']}", headers=user(uid)).get_json()
    assert (poll["status"], poll["outcome"], poll["credited"], poll["note"]) == \
        ("failed", "failed", None, "checkout session expired")
    assert client.get(f"/billing/topups/{intent['intent_id']}", headers=user(uid)).get_json()["status"] == "failed"
    assert topup_grants(admin, f"user:{uid}") == []
    assert available(admin, f"user:{uid}") == 0
    assert ask(client, user(uid)).status_code == 429


def test_top_ups_outside_the_limits_or_of_others_are_refused(client, admin):
    uid = broke_user(client)
    r = client.post("/billing/topups", json={"credits": 100, "key": "tiny"}, headers=user(uid))
    assert r.status_code == 400 and r.get_json()["sqlstate"] == "22023"  # below the $5 minimum
    assert db.one(admin, "SELECT count(*) AS n FROM billing.checkout_intents WHERE account = %s",
                  (f"user:{uid}",))["n"] == 0

    intent = client.post("/billing/topups", json={"credits": 500, "key": "mine"}, headers=user(uid)).get_json()
    other = new_id()
    signup(client, other)
    assert client.get(f"/billing/topups/{intent['intent_id']}", headers=user(other)).status_code == 404
    assert client.post("/billing/topups", json={"credits": 500, "key": "g"},
                       headers={"X-Guest-Id": new_id()}).status_code == 403
