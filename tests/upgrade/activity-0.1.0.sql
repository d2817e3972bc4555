-- Real activity on an installed pg_billing 0.1.0, through its own functions:
-- grants (one expiring), usage priced and by cost, holds open, settled and
-- released, debt and its repayment, a Stripe top-up delivered as a signed
-- webhook and a duplicate delivery. bin/upgrade-test runs it before the upgrade.
\set ON_ERROR_STOP on
CREATE EXTENSION IF NOT EXISTS pgcrypto;
SELECT billing.define_unit('usd_mills');
SELECT billing.define_meter('ai', 'usd_mills');
SELECT billing.define_meter('calls', 'usd_mills', unit_price => 2.5);
SELECT * FROM billing.grant('org_1', 'usd_mills', 10000, kind => 'topup', key => 'pi_seed_1');
SELECT * FROM billing.grant('org_1', 'usd_mills', 500, kind => 'promo', key => 'promo_1',
                            expires_at => now() + interval '30 days');
SELECT * FROM billing.grant('org_2', 'usd_mills', 300, key => 'manual_1');
SELECT * FROM billing.ingest('org_1', 'ai', 1, key => 'req_1', cost => 1234);
SELECT * FROM billing.ingest('org_1', 'calls', 7, key => 'req_2');
SELECT * FROM billing.ingest('org_2', 'ai', 1, key => 'req_3', cost => 450);      -- 150 of debt
SELECT * FROM billing.grant('org_2', 'usd_mills', 1000, kind => 'topup', key => 'pi_seed_2');
SELECT * FROM billing.reserve('org_1', 'usd_mills', 800, key => 'hold_open', ttl => '1 day');
SELECT * FROM billing.reserve('org_1', 'usd_mills', 300, key => 'hold_settled');
SELECT * FROM billing.settle((SELECT id FROM billing.holds WHERE key = 'hold_settled'), 120, key => 'settle_1');
SELECT * FROM billing.reserve('org_2', 'usd_mills', 100, key => 'hold_released');
SELECT * FROM billing.release((SELECT id FROM billing.holds WHERE key = 'hold_released'));
SELECT * FROM billing.set_floor('org_2', 'usd_mills', -200);
-- a Stripe top-up, signed as Stripe signs it, delivered twice
SELECT billing.define_webhook_endpoint('stripe', 'stripe', 'whsec_upgrade_test');
SELECT billing.map_webhook_currency('stripe', 'usd', 'usd_mills', credits_per_minor_unit => 10);
\set body '{"id": "evt_up_1", "object": "event", "type": "payment_intent.succeeded", "created": 1700000000, "data": {"object": {"id": "pi_up_1", "object": "payment_intent", "amount": 2500, "amount_received": 2500, "currency": "usd", "status": "succeeded", "metadata": {"account": "org_3"}}}}'
SELECT status FROM billing.receive_webhook('stripe',
    jsonb_build_object('Stripe-Signature', 't=' || extract(epoch FROM now())::bigint || ',v1=' ||
        encode(hmac(extract(epoch FROM now())::bigint || '.' || :'body', 'whsec_upgrade_test', 'sha256'), 'hex')),
    :'body');
SELECT status FROM billing.receive_webhook('stripe',
    jsonb_build_object('Stripe-Signature', 't=' || extract(epoch FROM now())::bigint || ',v1=' ||
        encode(hmac(extract(epoch FROM now())::bigint || '.' || :'body', 'whsec_upgrade_test', 'sha256'), 'hex')),
    :'body');
