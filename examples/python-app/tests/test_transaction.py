"""The gate, the debit and the work are one transaction: a failed request leaves no trace."""
import pytest

import app as api
import db
from conftest import ask, available, completions, guest, new_id, usage_events


def failing_model(prompt):
    raise api.ModelError("the model timed out")


@pytest.mark.parametrize("failure", ["model", "app_write"])
def test_a_request_whose_work_fails_rolls_back_its_usage(make_client, admin, failure):
    gid, rid = new_id(), new_id()
    account = f"guest:{gid}"
    assert ask(make_client(), guest(gid)).get_json()["remaining"] == 2  # a guest with 2 left

    if failure == "model":  # the work raises after the debit
        r = ask(make_client(failing_model), guest(gid), request_id=rid)
        assert r.status_code == 502 and r.get_json()["error"] == "model_failed"
    else:  # the app's own write fails after the debit (the prompt breaks a CHECK constraint)
        r = ask(make_client(), guest(gid), "x" * 2001, request_id=rid)
        assert r.status_code == 500 and r.get_json()["sqlstate"] == "23514"

    # the debit rolled back with the work: still 2 left, one event, one answer
    assert available(admin, account) == 2
    assert usage_events(admin, account) == completions(admin, account) == 1
    assert db.one(admin, "SELECT count(*) AS n FROM billing.usage_events WHERE key = %s",
                  (f"req:{account}:{rid}",))["n"] == 0

    # the retry with the same request id is served and billed once: its key was not used up
    r = ask(make_client(), guest(gid), request_id=rid)
    assert r.status_code == 200 and r.get_json()["remaining"] == 1
    assert usage_events(admin, account) == completions(admin, account) == 2
