// The seam end to end: completed, cancelled and failed streams, the floor, tool calls,
// idempotency, and no transaction held open while the provider streams.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { createGateway, BillingRefused, AlreadyBilled } from '../src/gateway.js';
import { meters, UNIT } from '../src/meters.js';
import { streamChat } from '../src/chat.js';
import { fakeProvider, ProviderError } from './fake-provider.js';
import { freshDatabase, q, grant, balance, holds, usageLog, ledgerKinds, verifyLedger, APP_NAME } from './helpers.js';

let db;
let gateway;
before(async () => {
  db = await freshDatabase('stream');
  gateway = createGateway({ pool: db.pool, unit: UNIT, meters, recheckEvery: 8 });
});
after(async () => {
  if (db) {
    assert.deepEqual(await verifyLedger(db), [], 'ledger invariants hold after every test');
    await db.drop();
  }
});

const noTools = { search: async () => { throw new Error('no tool expected'); } };

test('a completed stream: balance = before - actual cost, hold settled, usage recorded', async () => {
  const account = 'org_complete';
  await grant(db, account, 10000);
  let midStream;
  const provider = fakeProvider({
    tokens: 20, inputTokens: 12,
    onToken: async (i) => { if (i === 10) midStream = await balance(db, account); },
  });
  const r = await streamChat({ gateway, provider, tools: noTools, account, prompt: 'hi', key: 'req_complete' });

  assert.equal(provider.calls, 1);
  assert.equal(provider.finished, 1);
  assert.equal(r.stopped, null);
  assert.equal(r.value.text.trim().split(' ').length, 20);
  assert.deepEqual(r.usage, { input_tokens: 12, output_tokens: 20 });
  assert.equal(r.cost, 12 * 1 + 20 * 3); // 72 mills

  // while streaming, the estimate was held and nothing was debited yet
  assert.deepEqual(midStream, { balance: 10000, held: 600, debt: 0, available: 9400 });
  // afterwards: before - actual, nothing held
  assert.deepEqual(await balance(db, account), { balance: 9928, held: 0, debt: 0, available: 9928 });
  assert.deepEqual(await holds(db, account), [
    { id: r.holdId, key: 'req_complete', amount: 600, status: 'settled', settled_amount: 72 },
  ]);
  const log = await usageLog(db, account);
  assert.equal(log.length, 1);
  assert.deepEqual(
    { meter: log[0].meter, quantity: log[0].quantity, cost: log[0].cost, via: log[0].via, key: log[0].key },
    { meter: 'chat', quantity: 32, cost: 72, via: 'hold', key: `billing:hold:${r.holdId}` });
  assert.deepEqual(log[0].properties, { model: 'fake-1', input_tokens: 12, output_tokens: 20 });
  assert.deepEqual((await ledgerKinds(db, account)).map((e) => `${e.kind}:${e.amount}`),
    ['grant:10000', 'hold:0', 'settle:0', 'debit:-72']);
});

test('no transaction is open and the pool row is not locked while the provider streams', async () => {
  const account = 'org_nolock';
  await grant(db, account, 10000);
  const probe = await db.client();
  await probe.query("SET lock_timeout = '150ms'");
  const seen = {};
  const provider = fakeProvider({
    tokens: 16,
    onToken: async (i) => {
      if (i !== 8) return;
      const { rows } = await probe.query(
        `SELECT count(*)::int AS open_xacts FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = $1 AND xact_start IS NOT NULL`, [APP_NAME]);
      seen.openXacts = rows[0].open_xacts;
      // another consumer debits the same account, refusing to wait more than 150 ms for its pool row
      const d = await probe.query(
        `SELECT status, available FROM billing.ingest($1, 'usd_mills', 5, key => 'probe:nolock', cost => 5, strict => true)`,
        [account]);
      seen.debit = d.rows[0].status;
    },
  });
  const r = await streamChat({ gateway, provider, tools: noTools, account, prompt: 'hi', key: 'req_nolock' });
  assert.equal(seen.openXacts, 0, 'no session of the app pool is inside a transaction mid-stream');
  assert.equal(seen.debit, 'applied', 'a concurrent debit with lock_timeout 150ms went through mid-stream');
  assert.equal(r.cost, 12 + 16 * 3);
  assert.equal((await balance(db, account)).balance, 10000 - 5 - r.cost);

  // control: the probe does detect a pool row held by an open transaction
  const holder = await db.client();
  await holder.query('BEGIN');
  await holder.query(`SELECT * FROM billing.reserve($1, 'usd_mills', 10)`, [account]);
  await assert.rejects(
    probe.query(`SELECT * FROM billing.ingest($1, 'usd_mills', 5, key => 'probe:locked', cost => 5, strict => true)`, [account]),
    (err) => err.code === '55P03');
  await holder.query('ROLLBACK');
  await holder.end();
  await probe.end();
});

test('a cancelled stream releases its hold and charges nothing', async () => {
  const account = 'org_cancel';
  await grant(db, account, 10000);
  const ac = new AbortController();
  const provider = fakeProvider({ tokens: 50, onToken: (i) => { if (i === 7) ac.abort(); } });
  await assert.rejects(
    streamChat({ gateway, provider, tools: noTools, account, prompt: 'hi', key: 'req_cancel', signal: ac.signal }),
    (err) => err.name === 'AbortError');

  assert.equal(provider.aborted, 1);
  assert.ok(provider.delivered < 50);
  assert.deepEqual(await balance(db, account), { balance: 10000, held: 0, debt: 0, available: 10000 });
  const h = await holds(db, account);
  assert.deepEqual(h.map((x) => [x.status, x.settled_amount]), [['released', null]]);
  assert.deepEqual(await usageLog(db, account), []);
  assert.deepEqual((await ledgerKinds(db, account)).map((e) => `${e.kind}:${e.amount}`),
    ['grant:10000', 'hold:0', 'release:0']);
});

test('a provider error releases the hold and charges nothing', async () => {
  const account = 'org_fail';
  await grant(db, account, 10000);
  const provider = fakeProvider({ tokens: 30, failAt: 5 });
  await assert.rejects(
    streamChat({ gateway, provider, tools: noTools, account, prompt: 'hi', key: 'req_fail' }),
    ProviderError);
  assert.equal(provider.calls, 1);
  assert.equal(provider.delivered, 5);
  assert.deepEqual(await balance(db, account), { balance: 10000, held: 0, debt: 0, available: 10000 });
  assert.deepEqual((await holds(db, account)).map((x) => x.status), ['released']);
  assert.deepEqual(await usageLog(db, account), []);
});

test('an account below the floor is refused before any provider call', async () => {
  const account = 'org_floor';
  await grant(db, account, 1000);
  await q(db, `SELECT billing.set_floor($1, 'usd_mills', 500)`, [account]); // keep 500 back
  const provider = fakeProvider();
  await assert.rejects(
    streamChat({ gateway, provider, tools: noTools, account, prompt: 'hi', key: 'req_floor' }),
    (err) => err instanceof BillingRefused && err.reason === 'insufficient_credits' && err.available === 1000);
  assert.equal(provider.calls, 0, 'the provider was never called');
  assert.deepEqual(await holds(db, account), [], 'no hold was taken');

  // an account in debt is refused the same way, whatever the estimate
  const debtor = 'org_debtor';
  await grant(db, debtor, 100);
  await q(db, `SELECT * FROM billing.ingest($1, 'chat', 1, key => 'old_call', cost => 300)`, [debtor]);
  await assert.rejects(
    streamChat({ gateway, provider, tools: noTools, account: debtor, prompt: 'hi', key: 'req_debtor', estimate: 1 }),
    (err) => err instanceof BillingRefused && err.reason === 'in_debt');
  assert.equal(provider.calls, 0);
  assert.deepEqual(await holds(db, debtor), []);
});

test('a retried request id never calls the provider twice', async () => {
  const account = 'org_retry';
  await grant(db, account, 10000);
  const provider = fakeProvider({ tokens: 4 });
  const first = await streamChat({ gateway, provider, tools: noTools, account, prompt: 'hi', key: 'req_retry' });
  await assert.rejects(
    streamChat({ gateway, provider, tools: noTools, account, prompt: 'hi', key: 'req_retry' }),
    (err) => err instanceof AlreadyBilled && err.holdId === first.holdId && err.status === 'settled');
  assert.equal(provider.calls, 1);
  assert.equal((await balance(db, account)).balance, 10000 - first.cost);
});

test('tool calls re-enter the seam and are billed under their own meter', async () => {
  const account = 'org_tools';
  await grant(db, account, 10000);
  let toolHeld;
  const tools = {
    search: async (args, { signal }) => {
      toolHeld = await balance(db, account); // chat hold (600) + tool hold (50) while the tool runs
      await sleep(5, undefined, { signal });
      return [`result for ${args.q}`];
    },
  };
  const provider = fakeProvider({ tokens: 10, toolCallAt: 4 });
  const r = await streamChat({ gateway, provider, tools, account, prompt: 'weather', key: 'req_tools' });

  assert.deepEqual(r.value.toolResults, [{ name: 'search', ok: true, result: ['result for weather'] }]);
  assert.equal(toolHeld.held, 600 + 50);
  assert.equal(r.cost, 12 + 10 * 3);
  assert.equal((await balance(db, account)).balance, 10000 - 42 - 40);
  assert.deepEqual((await holds(db, account)).map((h) => [h.key, h.amount, h.status, h.settled_amount]), [
    ['req_tools', 600, 'settled', 42],
    ['req_tools:tool:1', 50, 'settled', 40],
  ]);
  assert.deepEqual((await usageLog(db, account)).map((e) => [e.meter, e.quantity, e.cost]).sort(), [
    ['chat', 22, 42],
    ['tool_search', 1, 40],
  ]);
});

test("a tool's own gate refuses it when the chat's hold leaves too little; the chat still completes", async () => {
  const account = 'org_tools_poor';
  await grant(db, account, 640); // the chat holds 600; the tool needs 50
  let toolRan = false;
  const tools = { search: async () => { toolRan = true; return []; } };
  const provider = fakeProvider({ tokens: 10, toolCallAt: 2 });
  const r = await streamChat({ gateway, provider, tools, account, prompt: 'weather', key: 'req_tools_poor' });
  assert.equal(toolRan, false, 'the tool never ran');
  assert.deepEqual(r.value.toolResults, [{ name: 'search', ok: false, refused: 'insufficient_credits' }]);
  assert.equal((await balance(db, account)).balance, 640 - 42);
  assert.deepEqual((await holds(db, account)).map((h) => [h.key, h.status]), [['req_tools_poor', 'settled']]);
});
