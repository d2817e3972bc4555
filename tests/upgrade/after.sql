-- After ALTER EXTENSION pg_billing UPDATE: the new version's calls work on
-- the old data (usage on an old pool, the open hold settled, a grant, the
-- ledger consistent). Any error fails the upgrade test.
\set ON_ERROR_STOP on
SELECT * FROM billing.ingest('org_1', 'ai', 1, key => 'after_1', cost => 100);
SELECT * FROM billing.settle((SELECT id FROM billing.holds WHERE key = 'hold_open'), 700, key => 'after_settle');
SELECT * FROM billing.grant('org_2', 'usd_mills', 50, kind => 'promo', key => 'after_promo');
-- a replay of a key used before the upgrade is still a duplicate
DO $$
BEGIN
    IF (SELECT status FROM billing.ingest('org_1', 'ai', 1, key => 'req_1', cost => 1234)) <> 'duplicate' THEN
        RAISE EXCEPTION 'a usage key from before the upgrade applied again';
    END IF;
    IF EXISTS (SELECT 1 FROM billing.verify_ledger()) THEN
        RAISE EXCEPTION 'verify_ledger after the upgrade: %', (SELECT string_agg(problem, '; ') FROM billing.verify_ledger());
    END IF;
    IF (SELECT available FROM billing."check"('org_1', 'usd_mills')) <> 8328 - 100 + 800 - 700 THEN
        RAISE EXCEPTION 'org_1 has % available after the upgrade', (SELECT available FROM billing."check"('org_1', 'usd_mills'));
    END IF;
END
$$;
