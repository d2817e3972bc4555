-- What an upgrade must keep: every pool's figures, every grant, event, hold
-- and ledger entry, and every key. Written to schema `snap_<:tag>` so the
-- same query before and after can be compared with EXCEPT both ways.
\set ON_ERROR_STOP on
CREATE SCHEMA :tag;
CREATE TABLE :tag.pools AS
    SELECT p.tenant_id, p.account, p.unit, c.allowed, c.available, c.balance, c.debt
    FROM billing.pools p CROSS JOIN LATERAL billing."check"(p.account, p.unit, 0) c;
CREATE TABLE :tag.grants AS
    SELECT id, tenant_id, account, unit, kind, priority, amount, remaining, effective_at, expires_at, status, key
    FROM billing.grants;
CREATE TABLE :tag.events AS SELECT id, tenant_id, account, meter, key, quantity, cost, occurred_at FROM billing.usage_events;
CREATE TABLE :tag.holds AS SELECT id, tenant_id, account, unit, key, amount, status, expires_at FROM billing.holds;
CREATE TABLE :tag.webhooks AS SELECT id, endpoint, provider_event_id, status FROM billing.webhook_events;
