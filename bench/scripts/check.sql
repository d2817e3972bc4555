\set a random(0, 9999)
SELECT allowed FROM billing.check('acct' || :a, 'credits', 1);
