-- A streaming AI call: reserve an estimate, settle the actual, release
-- what was not used; the reservation is exact under the floor rule.
SELECT grant_id, available FROM billing.grant('org_stream', 'usd_mills', 5000, kind => 'topup');

SELECT hold_id, status, amount, available FROM billing.reserve('org_stream', 'usd_mills', 3000, key => 'call:1');
SELECT allowed, available, balance, held FROM billing.check('org_stream', 'usd_mills', 2000);
SELECT allowed, available, balance, held FROM billing.check('org_stream', 'usd_mills', 2001);
-- a second reservation that would cross the floor is refused
SELECT * FROM billing.reserve('org_stream', 'usd_mills', 2001, key => 'call:2');
SELECT hold_id, status, amount, available FROM billing.reserve('org_stream', 'usd_mills', 1500, key => 'call:2');
-- replaying a reservation returns the same hold
SELECT hold_id, status, amount, available FROM billing.reserve('org_stream', 'usd_mills', 1500, key => 'call:2');

-- the first call cost less than estimated, the second more
SELECT * FROM billing.settle(1, 2210, key => 'settle:1');
SELECT * FROM billing.settle(2, 2400, key => 'settle:2');
SELECT * FROM billing.settle(1, 2210, key => 'settle:1');
SELECT * FROM billing.settle(1, 9999);

-- a cancelled call releases its hold
SELECT hold_id, status, amount FROM billing.reserve('org_stream', 'usd_mills', 100, key => 'call:3');
SELECT * FROM billing.release(3);
SELECT * FROM billing.release(3);
SELECT * FROM billing.release(1);

SELECT id AS hold_id, status, amount, settled_amount FROM billing.holds WHERE account = 'org_stream' ORDER BY hold_id;
SELECT version, kind, amount, balance_after, debt_after, held_after, grant_id, hold_id
FROM billing.ledger WHERE account = 'org_stream' ORDER BY version;
SELECT * FROM billing.verify_ledger();
