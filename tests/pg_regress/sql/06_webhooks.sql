-- Stripe top-ups through signed webhooks: verified, deduplicated, credited once,
-- refunds reversed; bad deliveries kept with their reason. Signatures are made
-- with pgcrypto's HMAC, independently of pg_billing.
CREATE EXTENSION IF NOT EXISTS pgcrypto;
CREATE FUNCTION pg_temp.signed(body text, secret text DEFAULT 'whsec_demo',
                               t bigint DEFAULT floor(extract(epoch FROM now()))::bigint)
RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('Stripe-Signature',
        't=' || t || ',v1=' || encode(hmac(t || '.' || body, secret, 'sha256'), 'hex'))
$$;
SELECT billing.define_webhook_endpoint('stripe', 'stripe', 'whsec_demo', credit_unit => 'usd_mills',
                                       credits_per_minor_unit => 10);
SELECT name, scheme, tolerance_seconds, currencies, rotating
FROM billing.webhook_endpoint_settings;

\set pi '{"id":"evt_1","type":"payment_intent.succeeded","created":1700000000,"data":{"object":{"id":"pi_A","amount_received":2000,"currency":"usd","metadata":{"account":"org_hook","credits":"1000000"}}}}'
\set cs '{"id":"evt_2","type":"checkout.session.completed","created":1700000005,"data":{"object":{"id":"cs_A","payment_intent":"pi_A","payment_status":"paid","amount_total":2000,"currency":"usd","client_reference_id":"org_hook"}}}'
\set refund '{"id":"evt_3","type":"charge.refunded","created":1700000100,"data":{"object":{"id":"ch_A","payment_intent":"pi_A","amount_refunded":500,"currency":"usd"}}}'

-- $20.00 paid: 2000 cents × 10 = 20000 mills, whatever metadata claims
SELECT status, reason, provider_event_id, event_type, result
FROM billing.receive_webhook('stripe', pg_temp.signed(:'pi'), :'pi');
-- redelivered, and reported again by checkout.session.completed: no second credit
SELECT status, reason, event_type FROM billing.receive_webhook('stripe', pg_temp.signed(:'pi'), :'pi');
SELECT status, result ->> 'credited' AS credited FROM billing.receive_webhook('stripe', pg_temp.signed(:'cs'), :'cs');
SELECT available FROM billing.check('org_hook', 'usd_mills');

-- a $5.00 refund after 17000 mills were spent: 3000 unspent revoked, 2000 as debt
SELECT status FROM billing.ingest('org_hook', 'usd_mills', 1, key => 'spend', cost => 17000);
SELECT status, result FROM billing.receive_webhook('stripe', pg_temp.signed(:'refund'), :'refund');
SELECT available, balance, debt, reason FROM billing.check('org_hook', 'usd_mills');

-- bad deliveries: kept with their reason, no effect
SELECT status, reason FROM billing.receive_webhook('stripe', pg_temp.signed(:'pi', 'whsec_wrong'), :'pi');
SELECT status, reason FROM billing.receive_webhook('stripe',
    pg_temp.signed(:'pi', t => floor(extract(epoch FROM now()))::bigint - 3600), :'pi');
SELECT status, reason FROM billing.receive_webhook('stripe', '{"Stripe-Signature": "t=1,v1=zz"}', :'pi');
SELECT status, reason FROM billing.receive_webhook('stripe', '{}', :'pi');
SELECT status, reason FROM billing.receive_webhook('nowhere', '{}', '{}');

SELECT id, endpoint, status, provider_event_id, event_type, coalesce(reason, error) AS why
FROM billing.webhook_events WHERE endpoint IN ('stripe', 'nowhere') ORDER BY id;
SELECT * FROM billing.verify_ledger();
