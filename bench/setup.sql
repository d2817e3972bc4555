-- The benchmark database: 10,000 funded accounts, the baselines' tables and
-- 300,000 signed Stripe events (bench/run and bench/profile load it).
CREATE EXTENSION pg_billing;
SELECT billing.define_unit('credits');
SELECT count(*) FROM generate_series(0, 9999) i,
    LATERAL billing.grant('acct' || i, 'credits', 1000000000000, kind => 'topup');
SELECT * FROM billing.grant('hot', 'credits', 1000000000000, kind => 'topup');
-- the same hot account, split across 8 lanes that concurrent debits take in parallel
SELECT * FROM billing.grant('hot_split', 'credits', 1000000000000, kind => 'topup');
SELECT billing.set_lanes('hot_split', 'credits', 8);
CREATE SCHEMA bench;
CREATE TABLE bench.events (tenant_id text, key text, account text, cost bigint, PRIMARY KEY (tenant_id, key));
CREATE TABLE bench.accounts (id int PRIMARY KEY, balance bigint);
INSERT INTO bench.accounts SELECT i, 1000000000000 FROM generate_series(0, 9999) i;
-- the application's own ledger: events, balances (above) and entries, written
-- by the four-statement transaction of bench/scripts/handwritten.sql
CREATE TABLE bench.hw_events (tenant_id text, key text, account int, cost bigint, PRIMARY KEY (tenant_id, key));
CREATE TABLE bench.hw_entries (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, account int NOT NULL,
    event_key text NOT NULL, amount bigint NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
-- keys r0..r9999, replayed by the duplicate-key workloads
SELECT count(*) FROM generate_series(0, 9999) i,
    LATERAL billing.ingest('acct' || i, 'credits', 1, key => 'r' || i, cost => 1);
-- an application role, as production calls come in (the benchmarks otherwise run as superuser)
DROP ROLE IF EXISTS pgb_bench_app;
CREATE ROLE pgb_bench_app LOGIN;
GRANT billing_app TO pgb_bench_app;
SELECT billing.grant_tenant('default', 'pgb_bench_app');
CREATE TABLE bench.copy_target (tenant_id text, key text, account text, meter text, cost bigint);
-- 300,000 signed Stripe top-up events over the 10,000 accounts, signed now
-- (bench/run delivers a third of them in each round)
CREATE EXTENSION pgcrypto;
SELECT billing.define_webhook_endpoint('bench', 'stripe', 'whsec_bench', tolerance_seconds => 86400);
CREATE TABLE bench.hooks (id int PRIMARY KEY, headers jsonb, body text);
INSERT INTO bench.hooks
SELECT i, jsonb_build_object('Stripe-Signature', 't=' || t || ',v1=' || encode(hmac(t || '.' || b, 'whsec_bench', 'sha256'), 'hex')), b
FROM generate_series(1, 300000) i,
     LATERAL (SELECT floor(extract(epoch FROM now()))::bigint AS t,
                     format('{"id":"evt_%s","type":"payment_intent.succeeded","created":1700000000,"data":{"object":{"id":"pi_%s","amount_received":%s,"currency":"usd","metadata":{"account":"acct%s"}}}}',
                            i, i, 100 + i % 900, i % 10000) AS b) x;
VACUUM ANALYZE;
