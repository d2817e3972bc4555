// Concurrent streams on one account: reservations and their extensions serialise on the
// account's pool row inside pg_billing, so the streams together never spend more than the
// account holds, even when each outgrows its estimate.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createGateway, BillingRefused } from '../src/gateway.js';
import { meters, UNIT } from '../src/meters.js';
import { streamChat } from '../src/chat.js';
import { fakeProvider } from './fake-provider.js';
import { freshDatabase, grant, balance, holds, usageLog, verifyLedger } from './helpers.js';

let db;
let gateway;
before(async () => {
  db = await freshDatabase('conc');
  gateway = createGateway({ pool: db.pool, unit: UNIT, meters, recheckEvery: 8 });
});
after(async () => {
  if (db) {
    assert.deepEqual(await verifyLedger(db), []);
    await db.drop();
  }
});

async function assertNoOverspend(account, granted, results) {
  const settled = results.filter((r) => r.status === 'fulfilled').map((r) => r.value);
  const spent = settled.reduce((s, r) => s + r.cost, 0);
  const b = await balance(db, account);
  assert.equal(b.debt, 0, 'no debt: nothing was spent that the account did not have');
  assert.equal(b.held, 0, 'every hold is closed');
  assert.ok(b.balance >= 0);
  assert.equal(b.balance, granted - spent, 'balance = granted - the settled costs');
  const h = await holds(db, account);
  assert.ok(h.every((x) => x.status === 'settled' || x.status === 'released'));
  const log = await usageLog(db, account);
  assert.equal(log.reduce((s, e) => s + e.cost, 0), spent);
  assert.ok(log.every((e) => e.debt_created === 0));
  return { spent, settled, balance: b };
}

test('two streams that each want 192 on an account of 300 never overspend', async () => {
  const account = 'org_two';
  await grant(db, account, 300);
  const providers = [fakeProvider({ tokens: 60 }), fakeProvider({ tokens: 60 })];
  const results = await Promise.allSettled(providers.map((provider, i) =>
    streamChat({ gateway, provider, tools: {}, account, prompt: 'hi', key: `req_two_${i}`, estimate: 100 })));

  assert.ok(results.every((r) => r.status === 'fulfilled'), 'both held their estimate and ran');
  const { spent, settled } = await assertNoOverspend(account, 300, results);
  assert.ok(spent <= 300);
  assert.ok(settled.some((r) => r.stopped === 'insufficient_credits'), 'at least one stream was stopped by a re-check');
  assert.ok(spent > 200, 'the extensions used the credit beyond the two estimates');
});

test('five streams on an account that fits three estimates: the others are refused before calling the provider', async () => {
  const account = 'org_five';
  await grant(db, account, 300);
  const providers = Array.from({ length: 5 }, () => fakeProvider({ tokens: 60 }));
  const results = await Promise.allSettled(providers.map((provider, i) =>
    streamChat({ gateway, provider, tools: {}, account, prompt: 'hi', key: `req_five_${i}`, estimate: 100 })));

  const refused = results.filter((r) => r.status === 'rejected');
  assert.ok(refused.every((r) => r.reason instanceof BillingRefused), String(refused.map((r) => r.reason)));
  assert.ok(refused.length >= 2, 'at most three 100-mill reservations fit in 300');
  results.forEach((r, i) => assert.equal(providers[i].calls, r.status === 'fulfilled' ? 1 : 0));
  const { spent } = await assertNoOverspend(account, 300, results);
  assert.ok(spent <= 300);
});
