"""A subscription created at the provider, polled, and projected by billing.sync_subscription."""
import db
from conftest import ask, available, signup, new_id, user


def use_up_today(client, uid):
    assert [ask(client, user(uid)).status_code for _ in range(6)] == [200] * 5 + [429]


def test_subscriber_gets_the_plans_allowance(client, admin, stripe):
    uid = new_id()
    signup(client, uid)
    use_up_today(client, uid)

    r = client.post("/billing/subscription", headers=user(uid))
    assert r.status_code == 201
    sub = r.get_json()
    assert (sub["status"], sub["outcome"]) == ("incomplete", "created")
    assert sub["credit_granted"] == 0
    assert sub["pay_url"].startswith("https://invoice.stripe.test/")
    assert client.post("/billing/subscription", headers=user(uid)).status_code == 409

    # not paid yet: polling changes nothing, still refused
    r = client.post("/billing/subscription/refresh", headers=user(uid)).get_json()
    assert (r["status"], r["outcome"]) == ("incomplete", "unchanged")
    assert ask(client, user(uid)).status_code == 429

    stripe.pay_subscription(sub["subscription"])
    r = client.post("/billing/subscription/refresh", headers=user(uid)).get_json()
    assert (r["status"], r["outcome"]) == ("active", "updated")
    assert r["credit_granted"] == 100
    assert available(admin, f"user:{uid}") == 100

    # polled again: the same state, nothing granted twice
    r = client.post("/billing/subscription/refresh", headers=user(uid)).get_json()
    assert (r["outcome"], r["credit_granted"]) == ("unchanged", 0)
    assert available(admin, f"user:{uid}") == 100

    assert ask(client, user(uid)).get_json()["remaining"] == 99
    summary = client.get("/billing", headers=user(uid)).get_json()
    assert summary["available"] == summary["allowance_left"] == 99
    assert summary["subscription"]["plan"] == "pro"
    assert summary["subscription"]["access"] == "open"
    assert (summary["subscription"]["allowance"], summary["subscription"]["allowance_left"]) == (100, 99)

    # the plan's period used up: a subscriber is offered a top-up, not a subscription
    assert all(ask(client, user(uid)).status_code == 200 for _ in range(99))
    r = ask(client, user(uid))
    assert r.status_code == 429
    assert r.get_json()["reason"] == "insufficient_credits"
    assert [a["action"] for a in r.get_json()["actions"]] == ["top_up"]
    assert db.one(admin, "SELECT count(*) AS n FROM billing.usage_events WHERE account = %s",
                  (f"user:{uid}",))["n"] == 5 + 100


def test_a_past_due_subscription_asks_for_a_new_card(client, admin, stripe):
    uid = new_id()
    signup(client, uid)
    use_up_today(client, uid)
    sub = client.post("/billing/subscription", headers=user(uid)).get_json()["subscription"]
    stripe.pay_subscription(sub)
    client.post("/billing/subscription/refresh", headers=user(uid))
    assert ask(client, user(uid)).status_code == 200

    stripe.payment_fails(sub)
    r = client.post("/billing/subscription/refresh", headers=user(uid)).get_json()
    assert (r["status"], r["outcome"]) == ("past_due", "updated")
    # credit_suspended counts grants (granted/revoked are amounts); the amount held back:
    assert r["credit_suspended"] == 1
    assert db.one(admin, """SELECT allowance_left, allowance_suspended FROM billing.subscription_status
                            WHERE account = %s""", (f"user:{uid}",)) == {"allowance_left": 0,
                                                                     "allowance_suspended": 99}

    r = ask(client, user(uid))
    assert r.status_code == 429
    body = r.get_json()
    assert body["reason"] == "subscription_past_due"
    assert [a["action"] for a in body["actions"]] == ["update_payment_method", "top_up"]
    assert available(admin, f"user:{uid}") == 0

    # the card is fixed: the rest of the period comes back
    stripe.subscriptions[sub]["status"] = "active"
    r = client.post("/billing/subscription/refresh", headers=user(uid)).get_json()
    assert r["status"] == "active" and r["credit_resumed"] == 1
    assert available(admin, f"user:{uid}") == 99
    assert ask(client, user(uid)).get_json()["remaining"] == 98


def test_guests_cannot_subscribe(client):
    r = client.post("/billing/subscription", headers={"X-Guest-Id": new_id()})
    assert r.status_code == 403
