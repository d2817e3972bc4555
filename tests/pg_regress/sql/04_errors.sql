-- Bad calls fail with a specific SQLSTATE and a message that says what to do.
\set VERBOSITY default
CREATE FUNCTION pg_temp.state(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN EXECUTE q; RETURN 'ok';
EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE || ' ' || SQLERRM;
END $$;

SELECT q, pg_temp.state(q) FROM (VALUES
  ($$SELECT * FROM billing.grant('org_err', 'usd_mills', 0)$$),
  ($$SELECT * FROM billing.grant('org_err', 'usd_mills', 10, kind => 'gift')$$),
  ($$SELECT * FROM billing.grant('org_err', 'USD', 10)$$),
  ($$SELECT * FROM billing.grant('', 'usd_mills', 10)$$),
  ($$SELECT * FROM billing.grant('org_err', 'usd_mills', 10, expires_at => now() - interval '1 day')$$),
  ($$SELECT * FROM billing.ingest('org_err', 'usd_mills', 1)$$),
  ($$SELECT * FROM billing.ingest('org_err', 'no_such_meter', 1, key => 'k')$$),
  ($$SELECT * FROM billing.ingest('org_err', 'usd_mills', -2, key => 'k')$$),
  ($$SELECT * FROM billing.ingest('org_err', 'usd_mills', 1, key => 'k', cost => 10, strict => true)$$),
  ($$SELECT * FROM billing.check('org_err', 'no_such_unit')$$),
  ($$SELECT * FROM billing.check('org_err', 'usd_mills', -1)$$),
  ($$SELECT * FROM billing.reserve('org_err', 'usd_mills', 10)$$),
  ($$SELECT * FROM billing.settle(999999, 10)$$),
  ($$SELECT * FROM billing.void_grant(999999)$$),
  ($$SELECT * FROM billing.ingest('org_err', 'usd_mills', NULL, key => 'k')$$),
  ($$SELECT * FROM billing.check(NULL, 'usd_mills')$$),
  ($$SELECT * FROM billing.ingest_batch('[{"account":"org_err","meter":"usd_mills","key":"b"}]')$$),
  ($$SELECT * FROM billing.ingest('org_err', 'usd_mills', 1, key => 'billing:hold:1', cost => 1)$$),
  ($$UPDATE billing.ledger_entries SET amount = 0$$),
  ($$DELETE FROM billing.usage_events$$),
  ($$TRUNCATE billing.ledger_entries CASCADE$$)
) AS t(q);

-- the error carries a hint
SELECT * FROM billing.ingest('org_err', 'usd_mills', 1, key => 'k', cost => 10, strict => true);
-- and none of these calls wrote anything for org_err
SELECT count(*) AS pools FROM billing.pools WHERE account = 'org_err';
SELECT count(*) AS events FROM billing.usage_events WHERE account = 'org_err';
