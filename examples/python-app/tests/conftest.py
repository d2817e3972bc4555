"""One fresh database per test run on the server named by PG_BILLING_TEST_DSN (a superuser):
pg_billing created in it, the app's schema and catalogue installed, and an application role
with billing_app only (not a superuser) that the app connects as. All dropped at the end."""
import os
import uuid

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

import db
from app import create_app
from fake_stripe import FakeStripe

TENANT = "demo"


@pytest.fixture(scope="session")
def database():
    server = os.environ.get("PG_BILLING_TEST_DSN")
    if not server:
        pytest.exit("set PG_BILLING_TEST_DSN (e.g. 'host=127.0.0.1 port=28841 user=postgres')", returncode=2)
    name = f"pgb_pyapp_{uuid.uuid4().hex[:12]}"  # the database and the app's role
    password = uuid.uuid4().hex
    with psycopg.connect(server, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        c.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))
    admin = make_conninfo(server, dbname=name)
    try:
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute("CREATE EXTENSION pg_billing")
        db.install(admin, TENANT, app_role=name)
        yield {"admin": admin, "app": make_conninfo(server, dbname=name, user=name, password=password)}
        with db.connect(admin, TENANT) as c:  # the ledger's invariants held through every test
            assert db.rows(c, "SELECT * FROM billing.verify_ledger()") == []
    finally:
        with psycopg.connect(server, autocommit=True) as c:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            c.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def stripe():
    return FakeStripe()


@pytest.fixture
def make_client(database, stripe):
    def make(model=None):
        kwargs = {"model": model} if model else {}
        app = create_app(database["app"], stripe, tenant=TENANT, **kwargs)
        app.testing = True
        return app.test_client()
    return make


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture
def admin(database):
    """A superuser connection to the test database, to check what the app did."""
    with db.connect(database["admin"], TENANT) as c:
        yield c


# -- helpers the tests share ------------------------------------------------------------------

def new_id() -> str:
    return uuid.uuid4().hex[:12]


def guest(gid: str) -> dict:
    return {"X-Guest-Id": gid}


def user(uid: str) -> dict:
    return {"X-User": uid}


def ask(client, who: dict, prompt: str = "hello", request_id: str | None = None):
    headers = {**who, "X-Request-Id": request_id or new_id()}
    return client.post("/v1/complete", json={"prompt": prompt}, headers=headers)


def signup(client, uid: str, gid: str | None = None, time_zone: str = "UTC"):
    return client.post("/signup", json={"user_id": uid, "time_zone": time_zone},
                       headers=guest(gid) if gid else {})


def available(admin, account: str) -> int:
    return db.one(admin, "SELECT available FROM billing.balance(%s, 'requests')", (account,))["available"]


def usage_events(admin, account: str) -> int:
    return db.one(admin, "SELECT count(*) AS n FROM billing.usage_events WHERE account = %s", (account,))["n"]


def completions(admin, account: str) -> int:
    return db.one(admin, "SELECT count(*) AS n FROM app.completions WHERE account = %s", (account,))["n"]
