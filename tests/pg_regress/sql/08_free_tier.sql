-- The free-tier flow of an AI app: a guest gets 5 requests, ever; on sign-up
-- the guest becomes an account (without a second free allowance) that gets
-- 20 requests a day; out of requests, the gate says why; a paid plan's
-- period brings its allowance; a spend cap per member holds inside the
-- organisation. Each request is a strict ingest in the app's transaction.
SELECT * FROM billing.define_unit('requests');

-- 1. A guest, known by the app's device key.
SELECT status FROM billing.set_allowance('guest:dev1', 'requests', 5, every => 'never');
SELECT allowed, available, reason FROM billing.check('guest:dev1', 'requests', 1);
SELECT count(*) AS applied FROM generate_series(1, 5) i,
    LATERAL billing.ingest('guest:dev1', 'requests', 1, key => 'guest:dev1:' || i, strict => true);
SELECT allowed, available, reason FROM billing.check('guest:dev1', 'requests', 1);
SELECT * FROM billing.ingest('guest:dev1', 'requests', 1, key => 'guest:dev1:6', strict => true);

-- 2. The guest signs up: the sign-up code gives every new user the guest
-- allowance (unchanged: it is the guest's, already used) and 20 a day.
SELECT unit, moved, status FROM billing.convert_guest('guest:dev1', 'user_1');
SELECT status FROM billing.set_allowance('user_1', 'requests', 5, every => 'never');
SELECT allowed, available FROM billing.check('user_1', 'requests', 1);
SELECT status FROM billing.set_allowance('user_1', 'requests', 20, every => 'day');
SELECT allowed, available FROM billing.check('user_1', 'requests', 1);
SELECT count(*) AS applied FROM billing.ingest_batch(
    (SELECT jsonb_agg(jsonb_build_object('account', 'user_1', 'meter', 'requests', 'quantity', 1,
                                         'key', 'user_1:' || i, 'strict', true))
     FROM generate_series(1, 21) i)) r WHERE r.status = 'applied';
SELECT allowed, available, reason FROM billing.check('user_1', 'requests', 1);
-- the grant of today's window, created by the first request of the day
SELECT kind, amount, remaining, key LIKE 'billing:allowance:%' AS allowance_window
FROM billing.grant_balances WHERE account = 'user_1' ORDER BY grant_id;

-- 3. The user subscribes: the paid period's allowance comes with its invoice.
SELECT plan_key, version, status FROM billing.define_plan('free_tier_pro',
    '{"requests": {"amount": 1000}}', '[{"price_id": "price_free_tier_pro", "interval": "month", "amount": 2000}]');
SELECT outcome, status FROM billing.sync_subscription(jsonb_build_object(
    'object', 'subscription', 'id', 'sub_ft', 'status', 'active', 'customer', 'cus_ft',
    'metadata', jsonb_build_object('account', 'user_1'),
    'items', jsonb_build_object('object', 'list', 'data', jsonb_build_array(jsonb_build_object(
        'object', 'subscription_item', 'id', 'si_ft', 'quantity', 1,
        'price', jsonb_build_object('object', 'price', 'id', 'price_free_tier_pro'),
        'current_period_start', floor(extract(epoch FROM now()))::bigint - 60,
        'current_period_end', floor(extract(epoch FROM now()))::bigint + 30 * 86400)))));
SELECT outcome FROM billing.sync_invoice(jsonb_build_object(
    'object', 'invoice', 'id', 'in_ft', 'status', 'paid', 'amount_paid', 2000, 'currency', 'usd',
    'billing_reason', 'subscription_create',
    'parent', jsonb_build_object('type', 'subscription_details',
                                 'subscription_details', jsonb_build_object('subscription', 'sub_ft')),
    'lines', jsonb_build_object('object', 'list', 'data', jsonb_build_array(jsonb_build_object(
        'object', 'line_item', 'parent', jsonb_build_object('type', 'subscription_item_details'),
        'period', jsonb_build_object('start', floor(extract(epoch FROM now()))::bigint - 60,
                                     'end', floor(extract(epoch FROM now()))::bigint + 30 * 86400))))));
SELECT allowed, available, reason FROM billing.check('user_1', 'requests', 1);
SELECT status, cost FROM billing.ingest('user_1', 'requests', 1, key => 'user_1:paid:1', strict => true);

-- 4. An organisation's shared credit, with a cap per member per day.
SELECT status FROM billing.grant('org_ft', 'usd_mills', 10000, kind => 'topup', key => 'org_ft:topup');
SELECT name, status FROM billing.set_limit('org_ft', 'usd_mills', 'member_daily', 300, per_member => true);
SELECT status, cost FROM billing.ingest('org_ft', 'usd_mills', 1, key => 'org_ft:1', cost => 250,
                                       properties => '{"member": "ana"}', strict => true);
SELECT allowed, reason, resets_at > now() AS resets_later
FROM billing.check('org_ft', 'usd_mills', 100, member => 'ana');
SELECT allowed, reason FROM billing.check('org_ft', 'usd_mills', 100, member => 'ben');
-- strict usage past the cap is refused (in a batch: rejected, the rest apply)
SELECT key, status, cost FROM billing.ingest_batch('[
    {"account": "org_ft", "meter": "usd_mills", "quantity": 1, "key": "org_ft:2", "cost": 100, "strict": true,
     "properties": {"member": "ana"}},
    {"account": "org_ft", "meter": "usd_mills", "quantity": 1, "key": "org_ft:3", "cost": 100, "strict": true,
     "properties": {"member": "ben"}}]');
SELECT name, member, max, used, remaining FROM billing.limits_status('org_ft', 'usd_mills', member => 'ana');

SELECT * FROM billing.verify_ledger();
