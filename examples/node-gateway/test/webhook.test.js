// The Stripe receiver against the real server, with deliveries signed by the official
// stripe package (stripe.webhooks.generateTestHeaderString) and Stripe's payload shapes.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import Stripe from 'stripe';
import { createWebhookServer } from '../src/webhook-server.js';
import { freshDatabase, q, balance, verifyLedger } from './helpers.js';

const SECRET = 'whsec_node_gateway_test_secret';
const stripe = new Stripe('sk_test_unused_no_network'); // only the offline webhook helpers are used

let db;
let server;
let url;
before(async () => {
  db = await freshDatabase('webhook');
  // once per deployment: Stripe amounts in USD cents credit usd_mills, 10 per cent
  await q(db, `SELECT billing.define_webhook_endpoint('stripe', 'stripe', $1,
                 credit_unit => 'usd_mills', credits_per_minor_unit => 10, currency => 'usd')`, [SECRET]);
  server = createWebhookServer({ pool: db.pool });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  url = `http://127.0.0.1:${server.address().port}/webhooks/stripe`;
});
after(async () => {
  if (server) await new Promise((resolve) => server.close(resolve));
  if (db) {
    assert.deepEqual(await verifyLedger(db), []);
    await db.drop();
  }
});

const now = () => Math.floor(Date.now() / 1000);

// A payment_intent.succeeded event as Stripe sends it (API 2024-06-20 shape, trimmed of nulls).
function paymentIntentSucceeded({ eventId, pi, account, amount, currency = 'usd' }) {
  return {
    id: eventId,
    object: 'event',
    api_version: '2024-06-20',
    created: now(),
    data: {
      object: {
        id: pi,
        object: 'payment_intent',
        amount,
        amount_capturable: 0,
        amount_received: amount,
        capture_method: 'automatic',
        client_secret: `${pi}_secret_test`,
        confirmation_method: 'automatic',
        created: now() - 5,
        currency,
        customer: 'cus_Qtest123',
        description: 'Credit top-up',
        latest_charge: `ch_${pi.slice(3)}`,
        livemode: false,
        metadata: { account },
        payment_method: 'pm_1QtestCard',
        payment_method_types: ['card'],
        status: 'succeeded',
      },
    },
    livemode: false,
    pending_webhooks: 1,
    request: { id: 'req_test123', idempotency_key: 'idem-test-123' },
    type: 'payment_intent.succeeded',
  };
}

function checkoutSessionCompleted({ eventId, pi, account, amount }) {
  return {
    id: eventId,
    object: 'event',
    api_version: '2024-06-20',
    created: now(),
    data: {
      object: {
        id: 'cs_test_a1b2c3',
        object: 'checkout.session',
        amount_subtotal: amount,
        amount_total: amount,
        client_reference_id: account,
        currency: 'usd',
        customer: 'cus_Qtest123',
        livemode: false,
        metadata: {},
        mode: 'payment',
        payment_intent: pi,
        payment_status: 'paid',
        status: 'complete',
      },
    },
    livemode: false,
    pending_webhooks: 1,
    request: { id: null, idempotency_key: null },
    type: 'checkout.session.completed',
  };
}

async function deliver(event, { secret = SECRET, timestamp, body } = {}) {
  const payload = body ?? JSON.stringify(event, null, 2); // Stripe pretty-prints; the bytes are what is signed
  const signature = stripe.webhooks.generateTestHeaderString({
    payload: JSON.stringify(event, null, 2), secret, timestamp,
  });
  const res = await fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json; charset=utf-8', 'stripe-signature': signature, 'user-agent': 'Stripe/1.0 (+https://stripe.com/docs/webhooks)' },
    body: payload,
  });
  return { http: res.status, ...(await res.json()) };
}

async function topupGrants(account) {
  return q(db, `SELECT key, kind, amount, remaining FROM billing.grant_balances WHERE account = $1 ORDER BY grant_id`, [account]);
}

test('a signed payment_intent.succeeded credits the top-up once; a redelivery is a no-op', async () => {
  const account = 'org_paid';
  const ev = paymentIntentSucceeded({ eventId: 'evt_3QpaidA1', pi: 'pi_3QpaidA1', account, amount: 2500 });

  const first = await deliver(ev);
  assert.deepEqual([first.http, first.status, first.event], [200, 'applied', 'evt_3QpaidA1']);
  assert.deepEqual([first.result.credited, first.result.amount, first.result.account], [true, 25000, account]);
  assert.deepEqual(await topupGrants(account), [{ key: 'stripe:pi_3QpaidA1', kind: 'topup', amount: 25000, remaining: 25000 }]);
  assert.equal((await balance(db, account)).available, 25000); // $25.00 = 2500 cents = 25000 mills

  // Stripe redelivers the same event (new signature, new timestamp): 200, nothing credited
  const again = await deliver(ev);
  assert.deepEqual([again.http, again.status], [200, 'duplicate']);
  assert.equal((await balance(db, account)).available, 25000);

  // the same payment reported by its Checkout Session: applied, but the payment is already credited
  const cs = await deliver(checkoutSessionCompleted({ eventId: 'evt_1QcsA1', pi: 'pi_3QpaidA1', account, amount: 2500 }));
  assert.deepEqual([cs.http, cs.status], [200, 'applied']);
  assert.equal(cs.result.credited, false);
  assert.equal(cs.result.grant_id, first.result.grant_id);
  assert.equal((await topupGrants(account)).length, 1);
  assert.equal((await balance(db, account)).available, 25000);

  const rows = await q(db, `SELECT status, count(*)::int AS n FROM billing.webhook_events GROUP BY status ORDER BY status`);
  assert.deepEqual(rows.filter((r) => r.status !== 'rejected'), [{ status: 'applied', n: 2 }, { status: 'duplicate', n: 1 }]);
});

test('a bad signature, a tampered body and a stale delivery are rejected with 400 and credit nothing', async () => {
  const account = 'org_forged';
  const ev = paymentIntentSucceeded({ eventId: 'evt_3QforgedB2', pi: 'pi_3QforgedB2', account, amount: 990000 });

  const forged = await deliver(ev, { secret: 'whsec_not_the_endpoint_secret' });
  assert.equal(forged.http, 400);
  assert.equal(forged.status, 'rejected');
  assert.match(forged.reason, /bad signature/);

  const tampered = await deliver(ev, {
    body: JSON.stringify({ ...ev, data: { object: { ...ev.data.object, amount_received: 99999999 } } }, null, 2),
  });
  assert.equal(tampered.http, 400);
  assert.equal(tampered.status, 'rejected');
  assert.match(tampered.reason, /bad signature/);

  const stale = await deliver(ev, { timestamp: now() - 3600 });
  assert.equal(stale.http, 400);
  assert.equal(stale.status, 'rejected');
  assert.match(stale.reason, /stale/);

  assert.deepEqual(await topupGrants(account), []);
  assert.deepEqual(await balance(db, account), { balance: 0, held: 0, debt: 0, available: 0 });
  const reasons = await q(db, `SELECT status, reason FROM billing.webhook_events WHERE provider_event_id = $1 OR id = ANY($2)`,
    ['evt_3QforgedB2', [forged.webhook_event_id, tampered.webhook_event_id, stale.webhook_event_id]]);
  assert.equal(reasons.length, 3);
  assert.ok(reasons.every((r) => r.status === 'rejected' && r.reason), JSON.stringify(reasons));

  // a rejected event id is not burnt: the genuine delivery still applies afterwards
  const genuine = await deliver(paymentIntentSucceeded({ eventId: 'evt_3QforgedB2', pi: 'pi_3QforgedB2', account, amount: 500 }));
  assert.deepEqual([genuine.http, genuine.status], [200, 'applied']);
  assert.equal((await balance(db, account)).available, 5000);
});

test('a payment in a currency the endpoint does not map fails (500: Stripe retries) and credits nothing', async () => {
  const account = 'org_yen';
  const r = await deliver(paymentIntentSucceeded({ eventId: 'evt_3QyenC3', pi: 'pi_3QyenC3', account, amount: 5000, currency: 'jpy' }));
  assert.equal(r.http, 500);
  assert.equal(r.status, 'failed');
  assert.match(r.reason ?? '', /jpy/);
  assert.deepEqual(await topupGrants(account), []);
});
