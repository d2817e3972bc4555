// Mid-stream re-checks: every 8 tokens the seam asks billing.check whether the next chunk is
// still covered, reserving more when the stream outgrows its estimate, and stops the stream
// cleanly (settling what was used) when the answer is no.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createGateway } from '../src/gateway.js';
import { meters, UNIT } from '../src/meters.js';
import { streamChat } from '../src/chat.js';
import { fakeProvider } from './fake-provider.js';
import { freshDatabase, q, grant, balance, holds, usageLog, verifyLedger } from './helpers.js';

let db;
let gateway;
before(async () => {
  db = await freshDatabase('recheck');
  gateway = createGateway({ pool: db.pool, unit: UNIT, meters, recheckEvery: 8 });
});
after(async () => {
  if (db) {
    assert.deepEqual(await verifyLedger(db), []);
    await db.drop();
  }
});

const tools = {};

test('another consumer drains the account (held credit included): the stream stops at the next re-check', async () => {
  const account = 'org_drained';
  await grant(db, account, 1000);
  const other = await db.client();
  const provider = fakeProvider({
    tokens: 40,
    onToken: async (i) => {
      // a non-strict ingest records its whole cost: it takes the credit behind our hold too
      if (i === 10) await other.query(`SELECT * FROM billing.ingest($1, 'chat', 1, key => 'batch_job', cost => 1000)`, [account]);
    },
  });
  const r = await streamChat({ gateway, provider, tools, account, prompt: 'hi', key: 'req_drained' });
  await other.end();

  assert.equal(r.stopped, 'insufficient_credits');
  assert.equal(provider.delivered, 16, 'stopped at the re-check after token 16, not at 40');
  assert.equal(provider.finished, 0);
  assert.equal(provider.aborted + provider.closed, 1, 'the provider stream was ended');
  assert.deepEqual(r.usage, { input_tokens: 12, output_tokens: 16 });
  assert.equal(r.cost, 12 + 16 * 3); // 60: what was used is settled, not lost
  assert.equal(r.settlement.status, 'settled');
  assert.equal(Number(r.settlement.debt_created), 60, 'the credit behind the hold was gone: the usage became debt');
  assert.deepEqual((await holds(db, account)).map((h) => [h.status, h.settled_amount]), [['settled', 60]]);
  assert.deepEqual(await balance(db, account), { balance: 0, held: 0, debt: 60, available: -60 });
});

test('a stream that outgrows its estimate reserves more as it goes, and settles the actual', async () => {
  const account = 'org_extend';
  await grant(db, account, 1000);
  const provider = fakeProvider({ tokens: 60 });
  const r = await streamChat({ gateway, provider, tools, account, prompt: 'hi', key: 'req_extend', estimate: 100 });

  assert.equal(r.stopped, null);
  assert.equal(provider.finished, 1);
  assert.equal(r.cost, 12 + 60 * 3); // 192 > the 100 estimated
  const h = await holds(db, account);
  assert.equal(h[0].status, 'settled');
  assert.equal(h[0].settled_amount, 192);
  assert.ok(h.length > 1, 'extension holds were taken');
  assert.ok(h.slice(1).every((x) => x.status === 'released' && x.key.startsWith('req_extend:ext:')));
  assert.ok(h.reduce((s, x) => s + x.amount, 0) >= 192, 'the reservations covered the actual cost');
  assert.deepEqual(await balance(db, account), { balance: 808, held: 0, debt: 0, available: 808 });
});

test('when the rest of the account is spent by someone else, the stream stops at its reservation: no debt', async () => {
  const account = 'org_capped';
  await grant(db, account, 1000);
  const other = await db.client();
  const provider = fakeProvider({
    tokens: 60,
    onToken: async (i) => {
      // a strict debit of everything not held: the hold's 100 stay ours
      if (i === 10) await other.query(`SELECT * FROM billing.ingest($1, 'chat', 1, key => 'rival', cost => 900, strict => true)`, [account]);
    },
  });
  const r = await streamChat({ gateway, provider, tools, account, prompt: 'hi', key: 'req_capped', estimate: 100 });
  await other.end();

  // re-checks at 8 (projected 60) and 16 (84) fit the 100 held; at 24 the next chunk needs 108
  assert.equal(r.stopped, 'insufficient_credits');
  assert.equal(provider.delivered, 24);
  assert.equal(r.cost, 12 + 24 * 3); // 84, within the hold
  assert.equal(Number(r.settlement.debt_created), 0);
  assert.deepEqual((await holds(db, account)).map((h) => [h.amount, h.status, h.settled_amount]), [[100, 'settled', 84]]);
  assert.deepEqual(await balance(db, account), { balance: 16, held: 0, debt: 0, available: 16 });
  const log = await usageLog(db, account);
  assert.deepEqual(log.map((e) => [e.meter, e.cost, e.via]), [['chat', 900, 'ingest'], ['chat', 84, 'hold']]);
});
