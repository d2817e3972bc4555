\set a random(0, 9999)
SELECT available FROM billing.balance('acct' || :a, 'credits');
