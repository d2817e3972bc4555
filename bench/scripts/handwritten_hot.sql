\set k random(1, 1000000000000000)
BEGIN;
SELECT balance FROM bench.accounts WHERE id = 0 FOR UPDATE;
INSERT INTO bench.hw_events (tenant_id, key, account, cost) VALUES ('default', 'h' || :k, 0, 1) ON CONFLICT DO NOTHING;
UPDATE bench.accounts SET balance = balance - 1 WHERE id = 0;
INSERT INTO bench.hw_entries (account, event_key, amount) VALUES (0, 'h' || :k, -1);
END;
