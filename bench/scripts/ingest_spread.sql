\set a random(0, 9999)
\set k random(1, 1000000000000000)
SELECT event_id FROM billing.ingest('acct' || :a, 'credits', 1, key => 'e' || :k, cost => 1);
