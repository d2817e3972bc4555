\set a random(0, 9999)
SELECT balance FROM bench.accounts WHERE id = :a;
