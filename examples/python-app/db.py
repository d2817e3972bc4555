"""Database helpers: one psycopg 3 connection per HTTP request, rows as dicts.

Connections are in autocommit mode; every unit of work that must commit or roll
back as one is an explicit ``with conn.transaction():`` block.
"""
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

SCHEMA = Path(__file__).with_name("schema.sql")


def connect(dsn: str, tenant: str) -> psycopg.Connection:
    """A connection acting for ``tenant`` (pg_billing reads the billing.tenant setting)."""
    return psycopg.connect(dsn, autocommit=True, row_factory=dict_row,
                           options=f"-c billing.tenant={tenant}")


def one(conn: psycopg.Connection, query: str, params=()) -> dict | None:
    return conn.execute(query, params).fetchone()


def rows(conn: psycopg.Connection, query: str, params=()) -> list[dict]:
    return conn.execute(query, params).fetchall()


def install(admin_dsn: str, tenant: str, app_role: str | None = None) -> None:
    """Creates the app's tables and the tenant's billing catalogue (schema.sql), as an
    admin; with ``app_role``, lets that role (which needs billing_app) run the app."""
    with connect(admin_dsn, tenant) as conn, conn.transaction():
        conn.execute(SCHEMA.read_text())
        if app_role:
            role = sql.Identifier(app_role)
            for stmt in ("GRANT billing_app TO {}",
                         "GRANT USAGE ON SCHEMA app TO {}",
                         "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA app TO {}"):
                conn.execute(sql.SQL(stmt).format(role))
            conn.execute("SELECT billing.grant_tenant(%s, %s)", (tenant, app_role))
