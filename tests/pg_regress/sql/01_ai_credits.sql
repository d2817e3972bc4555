-- AI credits: a plan allowance, a promo and a top-up, drained in priority
-- order by provider-priced usage; retries are charged once.
SELECT billing.define_meter('ai_cost', 'usd_mills', description => 'LLM calls at provider cost');

SELECT grant_id, status, kind, priority, amount, remaining, debt_repaid, available
FROM billing.grant('org_ai', 'usd_mills', 10000, kind => 'plan', key => 'sub_1:2026-11',
                   expires_at => now() + interval '20 days');
SELECT grant_id, status, kind, priority, amount, remaining, available
FROM billing.grant('org_ai', 'usd_mills', 5000, kind => 'promo', key => 'promo:welcome',
                   expires_at => now() + interval '10 days');
SELECT grant_id, status, kind, priority, amount, remaining, available
FROM billing.grant('org_ai', 'usd_mills', 25000, kind => 'topup', key => 'pi_3Q');

-- the gate before a call
SELECT * FROM billing.check('org_ai', 'usd_mills', 1200);

-- usage drains plan (10) → promo (50) → top-up (90)
SELECT event_id, status, cost, covered, debt_created, drains, available, entitled
FROM billing.ingest('org_ai', 'ai_cost', 1, key => 'openai:req_1', cost => 9000,
                    properties => '{"model": "gpt-x", "tokens": 1800}');
SELECT event_id, status, cost, covered, drains, available
FROM billing.ingest('org_ai', 'ai_cost', 1, key => 'openai:req_2', cost => 6500);
SELECT event_id, status, cost, covered, drains, available
FROM billing.ingest('org_ai', 'ai_cost', 1, key => 'openai:req_3', cost => 1187);

-- a retried request returns the original outcome and charges nothing
SELECT event_id, status, cost, covered, drains, available
FROM billing.ingest('org_ai', 'ai_cost', 1, key => 'openai:req_2', cost => 6500);
-- the same key with a different cost is refused
SELECT * FROM billing.ingest('org_ai', 'ai_cost', 1, key => 'openai:req_2', cost => 6501);
-- a replayed top-up credits once
SELECT grant_id, status, amount, available
FROM billing.grant('org_ai', 'usd_mills', 25000, kind => 'topup', key => 'pi_3Q');

SELECT grant_id, kind, priority, amount, remaining, state FROM billing.grant_balances
WHERE account = 'org_ai' ORDER BY grant_id;
SELECT version, kind, amount, balance_before, balance_after, grant_id, event_id
FROM billing.ledger WHERE account = 'org_ai' ORDER BY version;
SELECT * FROM billing.verify_ledger();
