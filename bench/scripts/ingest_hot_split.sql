\set k random(1, 1000000000000000)
SELECT event_id FROM billing.ingest('hot_split', 'credits', 1, key => 'h' || :k, cost => 1);
