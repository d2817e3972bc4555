\set k random(1, 1000000000000000)
SELECT count(*) FROM billing.ingest_batch((SELECT jsonb_agg(jsonb_build_object('account', 'acct' || (i % 10000), 'meter', 'credits', 'quantity', 1, 'key', 'b' || :k || '_' || i, 'cost', (i % 7) + 1)) FROM generate_series(1, 10000) i));
