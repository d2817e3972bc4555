\set a random(0, 9999)
\set k random(1, 1000000000000000)
BEGIN;
SELECT balance FROM bench.accounts WHERE id = :a FOR UPDATE;
INSERT INTO bench.hw_events (tenant_id, key, account, cost) VALUES ('default', 'e' || :k, :a, 1) ON CONFLICT DO NOTHING;
UPDATE bench.accounts SET balance = balance - 1 WHERE id = :a;
INSERT INTO bench.hw_entries (account, event_key, amount) VALUES (:a, 'e' || :k, -1);
END;
