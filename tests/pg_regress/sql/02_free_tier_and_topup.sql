-- A free tier of 100 requests a month in a countable unit; usage past it
-- becomes debt, the user is blocked, and a top-up pays the debt first.
SELECT billing.define_unit('ai_requests', 'one AI request');
SELECT grant_id, kind, amount, available
FROM billing.grant('org_free', 'ai_requests', 100, kind => 'plan', key => 'free:org_free:2026-11',
                   expires_at => date_trunc('month', now()) + interval '1 month');

-- 95 requests, in one batch
SELECT count(*) AS events, sum(cost) AS charged, min(status) AS status
FROM billing.ingest_batch((SELECT jsonb_agg(jsonb_build_object(
         'account', 'org_free', 'meter', 'ai_requests', 'quantity', 1, 'key', 'req:' || i))
       FROM generate_series(1, 95) i));
SELECT allowed, available, reason FROM billing.check('org_free', 'ai_requests', 5);
SELECT allowed, available, reason FROM billing.check('org_free', 'ai_requests', 6);

-- the app gates strictly: request 101 is refused
SELECT key, status, cost, covered, available, entitled
FROM billing.ingest_batch((SELECT jsonb_agg(jsonb_build_object(
         'account', 'org_free', 'meter', 'ai_requests', 'quantity', 1, 'key', 'req:' || i, 'strict', true))
       FROM generate_series(96, 101) i));

-- a usage that already happened (the provider billed it) is recorded as debt
SELECT status, cost, covered, debt_created, available, entitled
FROM billing.ingest('org_free', 'ai_requests', 3, key => 'late:1');
SELECT allowed, available, balance, debt, reason FROM billing.check('org_free', 'ai_requests');

-- a top-up repays the debt first
SELECT kind, amount, remaining, debt_repaid, available
FROM billing.grant('org_free', 'ai_requests', 50, kind => 'topup', key => 'pack:50');
SELECT allowed, available, balance, debt, reason FROM billing.check('org_free', 'ai_requests');
SELECT version, kind, amount, balance_after, debt_after FROM billing.ledger
WHERE account = 'org_free' AND version > 95 ORDER BY version;
SELECT * FROM billing.verify_ledger();
