\set a random(0, 9999)
\set k random(1, 1000000000000000)
SELECT grant_id FROM billing.grant('acct' || :a, 'credits', 5, kind => 'topup', key => 'g' || :k);
