-- Balances at past instants, answered from the ledger.
SELECT clock_timestamp() AS t0 \gset
SELECT pg_sleep(0.01);
SELECT amount FROM billing.grant('org_hist', 'credits', 1000, kind => 'plan');
SELECT pg_sleep(0.01);
SELECT clock_timestamp() AS t1 \gset
SELECT pg_sleep(0.01);
SELECT cost, available FROM billing.ingest('org_hist', 'credits', 400, key => 'h:1');
SELECT pg_sleep(0.01);
SELECT clock_timestamp() AS t2 \gset
SELECT pg_sleep(0.01);
SELECT amount, available FROM billing.reserve('org_hist', 'credits', 500, key => 'h:hold');
SELECT pg_sleep(0.01);
SELECT clock_timestamp() AS t3 \gset
SELECT pg_sleep(0.01);
SELECT cost, debt_created, available FROM billing.ingest('org_hist', 'credits', 900, key => 'h:2');
SELECT pg_sleep(0.01);
SELECT clock_timestamp() AS t4 \gset

SELECT 't0' AS at, balance, held, debt, available FROM billing.balance('org_hist', 'credits', as_of => :'t0')
UNION ALL SELECT 't1', balance, held, debt, available FROM billing.balance('org_hist', 'credits', as_of => :'t1')
UNION ALL SELECT 't2', balance, held, debt, available FROM billing.balance('org_hist', 'credits', as_of => :'t2')
UNION ALL SELECT 't3', balance, held, debt, available FROM billing.balance('org_hist', 'credits', as_of => :'t3')
UNION ALL SELECT 't4', balance, held, debt, available FROM billing.balance('org_hist', 'credits', as_of => :'t4')
UNION ALL SELECT 'now', balance, held, debt, available FROM billing.balance('org_hist', 'credits');
SELECT available, balance, held, debt FROM billing.check('org_hist', 'credits');
SELECT * FROM billing.verify_ledger();
