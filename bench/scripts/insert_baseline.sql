\set a random(0, 9999)
\set k random(1, 1000000000000000)
INSERT INTO bench.events (tenant_id, key, account, cost) VALUES ('default', 'e' || :k, 'acct' || :a, 1) ON CONFLICT DO NOTHING;
