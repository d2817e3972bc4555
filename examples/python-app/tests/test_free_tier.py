"""Guests, sign-up and the daily allowance."""
from datetime import datetime

import db
from conftest import ask, available, completions, guest, new_id, signup, usage_events, user


def test_guest_gets_three_requests_then_429_says_sign_up(client, admin):
    gid = new_id()
    remaining = [ask(client, guest(gid)).get_json()["remaining"] for _ in range(3)]
    assert remaining == [2, 1, 0]

    r = ask(client, guest(gid))
    assert r.status_code == 429
    body = r.get_json()
    assert body["error"] == "over_limit"
    assert body["reason"] == "insufficient_credits"
    assert body["account"] == f"guest:{gid}"
    assert body["available"] == 0
    assert body["resets_at"] is None  # a guest's allowance is for life
    assert [a["action"] for a in body["actions"]] == ["sign_up"]
    assert body["actions"][0]["href"] == "/signup"

    # three answered, three billed, the refused one neither
    assert completions(admin, f"guest:{gid}") == 3
    assert usage_events(admin, f"guest:{gid}") == 3
    assert available(admin, f"guest:{gid}") == 0


def test_a_new_visitor_gets_a_guest_cookie(client):
    first = client.post("/v1/complete", json={"prompt": "hi"})
    assert first.status_code == 200 and first.get_json()["remaining"] == 2
    cookie = client.get_cookie("guest_id")
    assert cookie is not None
    # the test client sends the cookie back: the same guest, one request fewer
    assert client.post("/v1/complete", json={"prompt": "hi"}).get_json()["remaining"] == 1
    assert client.get("/billing").get_json()["account"] == f"guest:{cookie.value}"


def test_a_retried_request_is_answered_again_and_billed_once(client, admin):
    gid, rid = new_id(), new_id()
    first = ask(client, guest(gid), "same", request_id=rid)
    again = ask(client, guest(gid), "same", request_id=rid)
    assert first.status_code == again.status_code == 200
    assert again.get_json() == {"request_id": rid, "answer": first.get_json()["answer"], "replayed": True}
    assert usage_events(admin, f"guest:{gid}") == 1
    assert available(admin, f"guest:{gid}") == 2


def test_sign_up_converts_the_guest_without_a_second_free_allowance(client, admin):
    gid, uid = new_id(), new_id()
    assert ask(client, guest(gid)).status_code == 200
    assert ask(client, guest(gid)).status_code == 200  # 1 of the guest's 3 left

    r = signup(client, uid, gid)
    assert r.status_code == 201
    body = r.get_json()
    assert body["converted"] == [{"unit": "requests", "moved": 1, "status": "converted"}]
    assert body["available"] == 1 + 5  # the guest's unspent request + today's 5, nothing more
    assert db.one(admin, "SELECT account FROM billing.guest_conversions WHERE guest = %s",
                  (f"guest:{gid}",))["account"] == f"user:{uid}"

    # the same device signed out again: the guest got its free requests once, ever
    r = ask(client, guest(gid))
    assert r.status_code == 429
    assert r.get_json()["available"] == 0
    assert db.one(admin, """SELECT count(*) AS n FROM billing.grant_balances
                            WHERE account = %s AND state = 'active'""", (f"guest:{gid}",))["n"] == 0

    # the user has 6
    assert [ask(client, user(uid)).status_code for _ in range(7)] == [200] * 6 + [429]

    # the guest became this user: it cannot become another one (55000), nothing is created
    other = new_id()
    r = signup(client, other, gid)
    assert r.status_code == 409
    assert r.get_json()["sqlstate"] == "55000"
    assert db.one(admin, "SELECT count(*) AS n FROM app.users WHERE id = %s", (other,))["n"] == 0
    assert ask(client, user(other)).status_code == 401


def test_daily_allowance_exhausted_says_when_it_resets(client, admin):
    uid = new_id()
    assert signup(client, uid, time_zone="Europe/Paris").status_code == 201
    assert [ask(client, user(uid)).get_json()["remaining"] for _ in range(5)] == [4, 3, 2, 1, 0]

    r = ask(client, user(uid))
    assert r.status_code == 429
    body = r.get_json()
    assert body["reason"] == "insufficient_credits"
    assert [a["action"] for a in body["actions"]] == ["subscribe", "top_up"]

    # Time travel is not possible through billing's functions (time is the database's), so:
    # the reset the app reports is the next midnight in Paris, and it is when today's window
    # credit expires in the ledger.
    midnight = db.one(admin, """SELECT (date_trunc('day', now() AT TIME ZONE 'Europe/Paris') + interval '1 day')
                                       AT TIME ZONE 'Europe/Paris' AS at""")["at"]
    assert datetime.fromisoformat(body["resets_at"]) == midnight
    window = db.one(admin, """SELECT amount, remaining, expires_at FROM billing.grant_balances
                              WHERE account = %s AND key LIKE 'billing:allowance:%%'""", (f"user:{uid}",))
    assert window == {"amount": 5, "remaining": 0, "expires_at": midnight}

    summary = client.get("/billing", headers=user(uid)).get_json()
    assert summary["available"] == summary["allowance_left"] == summary["credits"] == 0
    assert datetime.fromisoformat(summary["allowance_resets_at"]) == midnight
    assert summary["subscription"] is None

    assert completions(admin, f"user:{uid}") == usage_events(admin, f"user:{uid}") == 5


def test_unknown_user_and_bad_sign_ups_are_refused(client, admin):
    assert ask(client, user("nobody-" + new_id())).status_code == 401
    assert client.post("/signup", json={}).status_code == 400
    uid = new_id()
    r = signup(client, uid, time_zone="Mars/Olympus_Mons")
    assert r.status_code == 400 and r.get_json()["sqlstate"] == "22023"
    assert db.one(admin, "SELECT count(*) AS n FROM app.users WHERE id = %s", (uid,))["n"] == 0
    assert signup(client, uid).status_code == 201
    assert signup(client, uid).status_code == 409  # taken
