-- pg_billing quickstart: AI credits for one organisation, in plain SQL.
\pset footer off
\set QUIET on
CREATE EXTENSION IF NOT EXISTS pg_billing;
\set QUIET off

\echo '== 1. A meter: AI calls are charged at the provider cost, in 1/1000 dollar (mills)'
SELECT billing.define_meter('ai_cost', 'usd_mills', description => 'LLM calls at provider cost');
SELECT billing.define_meter('image_gen', 'usd_mills', unit_price => 12.5, description => '12.5 mills per image');

\echo '== 2. Credits in: a monthly plan allowance, a promo that expires, a paid top-up'
SELECT grant_id, kind, priority, amount, expires_at IS NOT NULL AS expires
FROM billing.grant('org_42', 'usd_mills', 10000, kind => 'plan', key => 'sub_1:2026-11',
                   expires_at => date_trunc('month', now()) + interval '1 month');
SELECT grant_id, kind, priority, amount, expires_at IS NOT NULL AS expires
FROM billing.grant('org_42', 'usd_mills', 5000, kind => 'promo', key => 'welcome-promo',
                   expires_at => now() + interval '14 days');
SELECT grant_id, kind, priority, amount, expires_at IS NOT NULL AS expires
FROM billing.grant('org_42', 'usd_mills', 25000, kind => 'topup', key => 'pi_3Q_demo');

\echo '== 3. The gate: may org_42 start a call that could cost 1200 mills?'
SELECT allowed, available, balance, held, debt, reason FROM billing.check('org_42', 'usd_mills', 1200);

SELECT clock_timestamp() AS before_usage \gset

\echo '== 4. Usage: drains the plan first (priority 10), then promo (50), then top-up (90)'
SELECT status, cost, drains, available, entitled
FROM billing.ingest('org_42', 'ai_cost', 1, key => 'openai:req_001', cost => 9500);
SELECT status, cost, drains, available, entitled
FROM billing.ingest('org_42', 'ai_cost', 1, key => 'openai:req_002', cost => 1187);
SELECT status, cost, drains, available
FROM billing.ingest('org_42', 'image_gen', 3, key => 'img:777');

\echo '== 5. The same request retried (a network timeout, a queue redelivery): charged once'
SELECT status, cost, drains, available
FROM billing.ingest('org_42', 'ai_cost', 1, key => 'openai:req_002', cost => 1187);

\echo '== 6. A streaming call: reserve an estimate, settle the actual cost'
SELECT hold_id, status, amount, available FROM billing.reserve('org_42', 'usd_mills', 3000, key => 'stream:abc');
SELECT id AS hold_hold_id FROM billing.holds WHERE key = 'stream:abc' \gset
SELECT allowed, available, balance, held FROM billing.check('org_42', 'usd_mills');
SELECT status, held, actual, drains, available FROM billing.settle(:hold_hold_id, 2210);

\echo '== 7. Strict mode refuses what the credits cannot pay, and writes nothing'
\set ON_ERROR_STOP off
SELECT * FROM billing.ingest('org_42', 'ai_cost', 1, key => 'openai:req_huge', cost => 999999, strict => true);
\set ON_ERROR_STOP on

\echo '== 8. Balance now and before the usage, answered from the ledger'
SELECT balance, held, debt, available FROM billing.balance('org_42', 'usd_mills');
SELECT balance, held, debt, available FROM billing.balance('org_42', 'usd_mills', as_of => :'before_usage');

\echo '== 9. Grants and the append-only ledger'
SELECT grant_id, kind, priority, amount, remaining, state FROM billing.grant_balances ORDER BY grant_id;
SELECT version, kind, amount, balance_after, held_after, grant_id, hold_id, event_id FROM billing.ledger ORDER BY version;

\echo '== 10. A free tier: 20 requests a day, reset at midnight with no job; a per-member cap on spend'
SELECT status FROM billing.set_allowance('user_7', 'ai_requests', 20, every => 'day');
SELECT status, available FROM billing.ingest('user_7', 'ai_requests', 1, key => 'req_1', strict => true);
SELECT name, status FROM billing.set_limit('org_42', 'usd_mills', 'member_daily', 2000, per_member => true);
SELECT allowed, reason, resets_at FROM billing.check('org_42', 'usd_mills', 2500, member => 'ana');

\echo '== 11. A tiered price: the first 100 calls a month included, then 2 mills, then 1 past 10,000'
SELECT billing.define_meter('search', 'usd_mills', price => '{"model": "graduated", "included": 100,
  "tiers": [{"up_to": 10000, "unit_price": 2}, {"up_to": null, "unit_price": 1}]}');
SELECT key, cost FROM billing.ingest_batch('[
  {"account": "org_42", "meter": "search", "quantity": 80, "key": "s1"},
  {"account": "org_42", "meter": "search", "quantity": 30, "key": "s2"}]');
SELECT kind, meter, description, amount FROM billing.invoice_preview('org_42');

\echo '== 12. Invariants: no rows means the ledger is consistent'
SELECT * FROM billing.verify_ledger();
