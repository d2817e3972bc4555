-- After ALTER EXTENSION pg_billing UPDATE: the new version's calls work on
-- the old data (usage on an old pool, the open hold settled, a grant, the
-- ledger consistent). Any error fails the upgrade test.
\set ON_ERROR_STOP on
-- the upgrade marks every grant 0.1.0 used up (org_2's manual_1 paid 300 of
-- req_3's 450) as exhausted, out of the drain's index, and no other
DO $$
BEGIN
    IF NOT (SELECT exhausted FROM billing.grants WHERE key = 'manual_1') THEN
        RAISE EXCEPTION 'a grant used up before the upgrade is not marked exhausted';
    END IF;
    IF EXISTS (SELECT 1 FROM billing.grants WHERE exhausted <> (remaining <= 0)) THEN
        RAISE EXCEPTION 'after the upgrade, grants % are marked exhausted or not against what they hold',
            (SELECT string_agg(key, ', ') FROM billing.grants WHERE exhausted <> (remaining <= 0));
    END IF;
END
$$;
SELECT * FROM billing.ingest('org_1', 'ai', 1, key => 'after_1', cost => 100);
SELECT * FROM billing.settle((SELECT id FROM billing.holds WHERE key = 'hold_open'), 700, key => 'after_settle');
SELECT * FROM billing.grant('org_2', 'usd_mills', 50, kind => 'promo', key => 'after_promo');
-- priced usage continues its period: the month's total priced once (7 calls
-- at 2.5 before, 3 now: 25 for the 10), less what the 7 were charged
SELECT * FROM billing.ingest('org_1', 'calls', 3, key => 'after_calls');
-- a new account's pool takes the next pool id
SELECT * FROM billing.grant('org_new', 'usd_mills', 10, key => 'after_new');
DO $$
BEGIN
    IF (SELECT cost FROM billing.usage_events WHERE key = 'after_calls')
       <> 25 - (SELECT cost FROM billing.usage_events WHERE key = 'req_2') THEN
        RAISE EXCEPTION 'priced usage after the upgrade cost %, not 25 less the % charged before',
            (SELECT cost FROM billing.usage_events WHERE key = 'after_calls'),
            (SELECT cost FROM billing.usage_events WHERE key = 'req_2');
    END IF;
    IF (SELECT id FROM billing.pools WHERE account = 'org_new')
       <= (SELECT max(id) FROM billing.pools WHERE account <> 'org_new') THEN
        RAISE EXCEPTION 'a new pool reused an id: the pools id sequence did not carry over';
    END IF;
    IF (SELECT status FROM billing.ingest('org_1', 'ai', 1, key => 'req_1', cost => 1234)) <> 'duplicate' THEN
        RAISE EXCEPTION 'a usage key from before the upgrade applied again';
    END IF;
    -- fingerprints stored before the upgrade are whole SHA-256s: a replay
    -- still matches, other parameters under the same key are still refused
    IF (SELECT status FROM billing.grant('org_1', 'usd_mills', 10000, kind => 'topup', key => 'pi_seed_1'))
       <> 'duplicate' THEN
        RAISE EXCEPTION 'a grant key from before the upgrade did not replay';
    END IF;
    BEGIN
        PERFORM billing.grant('org_1', 'usd_mills', 10001, kind => 'topup', key => 'pi_seed_1');
        RAISE EXCEPTION 'a grant key from before the upgrade was reused with another amount';
    EXCEPTION WHEN unique_violation THEN
        NULL;
    END;
    IF EXISTS (SELECT 1 FROM billing.verify_ledger()) THEN
        RAISE EXCEPTION 'verify_ledger after the upgrade: %', (SELECT string_agg(problem, '; ') FROM billing.verify_ledger());
    END IF;
    IF (SELECT available FROM billing."check"('org_1', 'usd_mills'))
       <> 8328 - 100 + 800 - 700 - (SELECT cost FROM billing.usage_events WHERE key = 'after_calls') THEN
        RAISE EXCEPTION 'org_1 has % available after the upgrade', (SELECT available FROM billing."check"('org_1', 'usd_mills'));
    END IF;
END
$$;
