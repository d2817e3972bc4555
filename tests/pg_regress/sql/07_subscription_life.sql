-- A subscription's life, end to end, through the poll path (what an app that
-- cannot receive webhooks calls; webhooks go through the same projection):
-- a trial, its first paid period, an upgrade to a per-seat plan, seats added
-- and removed, a renewal whose payment fails and recovers, eight more paid
-- months, a cancellation at the period end, then the tenant's free plan.
-- Time passes by moving every stored instant back (as a test-only helper
-- does below); the objects carry Stripe's field names.
SELECT * FROM billing.define_unit('life_credits');
SELECT plan_key, version, status FROM billing.define_plan('life_starter',
    '{"life_credits": {"amount": 1000}}', '[{"price_id": "price_life_starter", "interval": "month", "amount": 900}]');
SELECT plan_key, version, status FROM billing.define_plan('life_team',
    '{"life_credits": {"amount": 500, "per_seat": true}}', '[{"price_id": "price_life_team", "interval": "month", "amount": 1500}]');

-- Days are counted from one instant taken at the start, so every object of
-- the scenario agrees on them to the second.
CREATE TEMP TABLE life_clock AS SELECT floor(extract(epoch FROM now()))::bigint AS base;

-- Stripe's subscription object for org_life, its period in days from the start.
CREATE FUNCTION pg_temp.sub(status text, price text, seats integer, from_day integer, to_day integer,
                            extra jsonb DEFAULT '{}') RETURNS jsonb
LANGUAGE sql AS $$
    SELECT jsonb_build_object('object', 'subscription', 'id', 'sub_life', 'status', status,
        'customer', 'cus_life', 'metadata', jsonb_build_object('account', 'org_life'),
        'cancel_at_period_end', false, 'cancel_at', NULL, 'pause_collection', NULL,
        'items', jsonb_build_object('object', 'list', 'data', jsonb_build_array(jsonb_build_object(
            'object', 'subscription_item', 'id', 'si_life', 'quantity', seats,
            'price', jsonb_build_object('object', 'price', 'id', price),
            'current_period_start', (SELECT base FROM life_clock) + from_day * 86400,
            'current_period_end', (SELECT base FROM life_clock) + to_day * 86400)))) || extra
$$;

-- Stripe's invoice of that subscription, billing the period [from_day, to_day).
CREATE FUNCTION pg_temp.inv(id text, status text, paid bigint, from_day integer, to_day integer) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT jsonb_build_object('object', 'invoice', 'id', id, 'status', status, 'amount_paid', paid,
        'billing_reason', 'subscription_cycle', 'currency', 'usd',
        'parent', jsonb_build_object('type', 'subscription_details',
                                     'subscription_details', jsonb_build_object('subscription', 'sub_life')),
        'lines', jsonb_build_object('object', 'list', 'data', jsonb_build_array(jsonb_build_object(
            'object', 'line_item',
            'parent', jsonb_build_object('type', 'subscription_item_details'),
            'period', jsonb_build_object(
                'start', (SELECT base FROM life_clock) + from_day * 86400,
                'end', (SELECT base FROM life_clock) + to_day * 86400)))))
$$;

-- `days` pass: every stored instant moves back (test only).
CREATE FUNCTION pg_temp.days_pass(days integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE d interval := make_interval(days => days);
BEGIN
    PERFORM set_config('session_replication_role', 'replica', true); -- the ledger refuses UPDATE otherwise
    UPDATE billing.grants SET effective_at = effective_at - d, expires_at = expires_at - d,
        created_at = created_at - d, closed_at = closed_at - d;
    UPDATE billing.pools SET cache_from = cache_from - d, cache_until = cache_until - d,
        counter_hour = counter_hour - d, counter_last_at = counter_last_at - d,
        counter_revised_at = counter_revised_at - d;
    UPDATE billing.ledger_entries SET effective_at = effective_at - d, recorded_at = recorded_at - d;
    UPDATE billing.usage_events SET occurred_at = occurred_at - d, recorded_at = recorded_at - d, entry_at = entry_at - d,
        booked_at = booked_at - d;
    UPDATE billing.usage_counters SET hour = hour - d, last_at = last_at - d, revised_at = revised_at - d;
    -- a period is a calendar month, so moved events regroup: the scenario's
    -- meters charge 1 per unit, and each period charged what its events did
    DELETE FROM billing.meter_periods;
    INSERT INTO billing.meter_periods (tenant_id, pool_id, meter, period_start, quantity, version,
                                       switch_quantity, exact, base, charged)
    SELECT tenant_id, pool_id, meter,
           date_trunc('month', coalesce(booked_at, occurred_at) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
           sum(quantity), max(price_version), 0, 0, 0, sum(cost)
    FROM billing.usage_events WHERE price_version IS NOT NULL GROUP BY 1, 2, 3, 4;
    UPDATE billing.subscriptions SET period_start = period_start - d, period_end = period_end - d,
        ends_at = ends_at - d, trial_end = trial_end - d, paid_through = paid_through - d,
        observed_at = observed_at - d;
    UPDATE billing.subscription_allowances SET starts_at = starts_at - d, ends_at = ends_at - d;
    UPDATE billing.subscription_invoices SET period_end = period_end - d, observed_at = observed_at - d,
        lines = (SELECT coalesce(jsonb_agg(l || jsonb_build_object('end', (l ->> 'end')::timestamptz - d)), '[]')
                 FROM jsonb_array_elements(lines) l);
    PERFORM set_config('session_replication_role', 'origin', true);
END
$$;

-- What the account sees now.
CREATE FUNCTION pg_temp.state(amount bigint DEFAULT 0)
RETURNS TABLE (status text, access text, plan text, seats integer, allowance bigint, allowance_left bigint,
               allowed boolean, available bigint, reason text)
LANGUAGE sql AS $$
    SELECT s.status, s.access, s.plan, s.seats, s.allowance, s.allowance_left, c.allowed, c.available, c.reason
    FROM billing.subscription_status s, billing."check"('org_life', 'life_credits', amount) c
    WHERE s.subscription = 'sub_life'
$$;

-- 1. A 14-day trial of the starter plan: its allowance, for free.
SELECT outcome, status, credit_granted, credit_suspended, credit_resumed, credit_revoked FROM billing.sync_subscription(pg_temp.sub('trialing', 'price_life_starter', 1, 0, 14));
SELECT cost, available FROM billing.ingest('org_life', 'life_credits', 1, key => 'life:1', cost => 300);
SELECT * FROM pg_temp.state();

-- 2. The trial ends; the first invoice is paid: the first paid period opens.
SELECT pg_temp.days_pass(14);
SELECT outcome, status, credit_granted, credit_suspended, credit_resumed, credit_revoked FROM billing.sync_subscription(pg_temp.sub('active', 'price_life_starter', 1, 0, 30));
SELECT * FROM pg_temp.state();
SELECT outcome, credit_granted, credit_suspended, credit_resumed, credit_revoked FROM billing.sync_invoice(pg_temp.inv('in_life_1', 'paid', 900, 0, 30));
SELECT * FROM pg_temp.state();

-- 3. Ten days in, 800 used, an upgrade to the team plan with 2 seats (500
-- each: no more than the starter's 1000), then 2 seats more.
SELECT pg_temp.days_pass(10);
SELECT cost, available FROM billing.ingest('org_life', 'life_credits', 1, key => 'life:2', cost => 800);
SELECT outcome, credit_granted, credit_suspended, credit_resumed, credit_revoked FROM billing.sync_subscription(pg_temp.sub('active', 'price_life_team', 2, -10, 20));
SELECT outcome, credit_granted, credit_suspended, credit_resumed, credit_revoked FROM billing.sync_subscription(pg_temp.sub('active', 'price_life_team', 4, -10, 20));
SELECT * FROM pg_temp.state();

-- 4. The renewal: the new period starts, its payment fails.
SELECT pg_temp.days_pass(20);
SELECT outcome, credit_granted, credit_suspended, credit_resumed, credit_revoked FROM billing.sync_subscription(pg_temp.sub('active', 'price_life_team', 4, 0, 30));
SELECT outcome, credit_granted, credit_suspended, credit_resumed, credit_revoked FROM billing.sync_invoice(pg_temp.inv('in_life_2', 'open', 0, 0, 30));
SELECT outcome, credit_granted, credit_suspended, credit_resumed, credit_revoked FROM billing.sync_subscription(pg_temp.sub('past_due', 'price_life_team', 4, 0, 30));
SELECT * FROM pg_temp.state(1);

-- 5. Two days later the retry succeeds: the period opens with the team's allowance.
SELECT pg_temp.days_pass(2);
SELECT outcome, credit_granted, credit_suspended, credit_resumed, credit_revoked FROM billing.sync_invoice(pg_temp.inv('in_life_2', 'paid', 6000, -2, 28));
SELECT outcome, credit_granted, credit_suspended, credit_resumed, credit_revoked FROM billing.sync_subscription(pg_temp.sub('active', 'price_life_team', 4, -2, 28));
SELECT * FROM pg_temp.state();

-- 6. A seat is removed: the running period keeps its allowance.
SELECT outcome, credit_granted, credit_suspended, credit_resumed, credit_revoked FROM billing.sync_subscription(pg_temp.sub('active', 'price_life_team', 3, -2, 28));
SELECT * FROM pg_temp.state();

-- 6b. Eight more months, each renewed and paid on time, each using 1,200
-- of its 1,500 (3 seats of 500): every month opens its allowance whole, and
-- what a month left expires with it.
CREATE TEMP TABLE life_months (month integer, status text, allowance bigint, used bigint,
                               allowance_left bigint, available bigint);
DO $$
BEGIN
    FOR m IN 1..8 LOOP
        PERFORM pg_temp.days_pass(30);
        PERFORM billing.sync_subscription(pg_temp.sub('active', 'price_life_team', 3, -2, 28));
        PERFORM billing.sync_invoice(pg_temp.inv('in_life_month_' || m, 'paid', 4500, -2, 28));
        PERFORM billing.ingest('org_life', 'life_credits', 1, key => 'life:month:' || m, cost => 1200);
        INSERT INTO life_months
        SELECT m, s.status, s.allowance, s.allowance_used, s.allowance_left, c.available
        FROM billing.subscription_status s, billing."check"('org_life', 'life_credits') c
        WHERE s.subscription = 'sub_life';
    END LOOP;
END
$$;
SELECT * FROM life_months ORDER BY month;

-- 7. Cancelled at the period end: kept until then; then it ends.
SELECT outcome, changes ->> 'ends_at' IS NOT NULL AS ends_at_set, credit_granted, credit_revoked
FROM billing.sync_subscription(pg_temp.sub('active', 'price_life_team', 3, -2, 28, '{"cancel_at_period_end": true}'));
SELECT * FROM pg_temp.state();
SELECT pg_temp.days_pass(28);
SELECT outcome, status, credit_granted, credit_suspended, credit_resumed, credit_revoked FROM billing.sync_subscription(pg_temp.sub('canceled', 'price_life_team', 3, -28, 0));
SELECT * FROM pg_temp.state();

-- 8. The tenant's free plan applies from then on (and never while the subscription lived).
SELECT plan_key, version, status FROM billing.define_plan('life_free', '{"life_credits": {"amount": 100}}');
SELECT plan_key, accounts, status FROM billing.set_default_plan('life_free');
SELECT allowed, available, reason FROM billing."check"('org_life', 'life_credits', 100);

-- The periodic work records the expiry of the last period's unused credit.
SELECT task, done > 0 AS did_something FROM billing.run_periodic() ORDER BY task;

-- The whole life in the ledger and in the subscription's history.
SELECT e.kind, count(*) AS entries, sum(e.grant_amount) AS credit_moved
FROM billing.ledger e JOIN billing.pools p ON p.id = e.pool_id
WHERE p.account = 'org_life' GROUP BY e.kind ORDER BY e.kind;
SELECT source, (SELECT string_agg(k, ',' ORDER BY k) FROM jsonb_object_keys(changes) k) AS changed, credit
FROM billing.subscription_changes c JOIN billing.subscriptions s ON s.id = c.subscription_id
WHERE s.provider_id = 'sub_life' ORDER BY c.id;
SELECT * FROM billing.verify_ledger();
