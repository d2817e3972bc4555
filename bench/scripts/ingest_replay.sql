-- A replayed key (bench/setup.sql ingests r0..r9999) except with probability
-- :fresh % (pgbench -D fresh=N), when the key is new.
\set a random(0, 9999)
\set r random(1, 100)
\if :r <= :fresh
\set k random(1, 1000000000000000)
SELECT event_id FROM billing.ingest('acct' || :a, 'credits', 1, key => 'e' || :k, cost => 1);
\else
\set d random(0, 9999)
SELECT event_id FROM billing.ingest('acct' || :d, 'credits', 1, key => 'r' || :d, cost => 1);
\endif
