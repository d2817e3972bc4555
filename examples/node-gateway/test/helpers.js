// A fresh database per test file, with pg_billing and the gateway's meters.
import { readFile } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { pgConfig } from '../src/dsn.js';

export const APP_NAME = 'node-gateway'; // the application's pool, as pg_stat_activity shows it

export function baseConfig() {
  const dsn = process.env.PG_BILLING_TEST_DSN;
  if (!dsn) throw new Error('PG_BILLING_TEST_DSN is not set (e.g. "host=127.0.0.1 port=28842 user=postgres")');
  const cfg = pgConfig(dsn);
  return { database: 'postgres', ...cfg };
}

export async function freshDatabase(tag) {
  const base = baseConfig();
  // test.sh sets PGB_NODE_RUN so that it can drop whatever a failed or killed run left behind
  const run = /^[a-z0-9]+$/.test(process.env.PGB_NODE_RUN ?? '') ? process.env.PGB_NODE_RUN : 'adhoc';
  const name = `pgb_node_${run}_${tag}_${process.pid}_${randomBytes(3).toString('hex')}`;
  const admin = new pg.Client(base);
  await admin.connect();
  await admin.query(`CREATE DATABASE ${name}`);
  await admin.end();
  const config = { ...base, database: name };
  const setup = new pg.Client(config);
  await setup.connect();
  await setup.query('CREATE EXTENSION pg_billing');
  await setup.query(await readFile(new URL('../src/billing-setup.sql', import.meta.url), 'utf8'));
  await setup.end();
  const pool = new pg.Pool({ ...config, application_name: APP_NAME, max: 10 });
  return {
    name,
    config,
    pool,
    // another session: a test's own probes and a concurrent consumer, never the app's pool
    async client() {
      const c = new pg.Client({ ...config, application_name: 'test-probe' });
      await c.connect();
      return c;
    },
    async drop() {
      // a seam that leaked a checked-out client must not hang the run: FORCE drops its session
      await Promise.race([pool.end(), new Promise((resolve) => setTimeout(resolve, 3000).unref())]);
      const a = new pg.Client(base);
      await a.connect();
      await a.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      await a.end();
    },
  };
}

const num = (row) => Object.fromEntries(Object.entries(row).map(([k, v]) => [k, typeof v === 'string' && /^-?\d+$/.test(v) ? Number(v) : v]));

export async function q(db, sql, params = []) {
  return (await db.pool.query(sql, params)).rows.map(num);
}

export async function grant(db, account, amount) {
  await q(db, `SELECT * FROM billing.grant($1, 'usd_mills', $2, kind => 'topup', key => 'seed:' || $1)`, [account, amount]);
}

export async function balance(db, account) {
  const [b] = await q(db, `SELECT balance, held, debt, available FROM billing.balance($1, 'usd_mills')`, [account]);
  return b;
}

export async function holds(db, account) {
  return q(db, 'SELECT id, key, amount, status, settled_amount FROM billing.holds WHERE account = $1 ORDER BY id', [account]);
}

export async function usageLog(db, account) {
  return q(db, 'SELECT meter, quantity, cost, covered, debt_created, via, key, properties FROM billing.usage_log($1) ORDER BY event_id', [account]);
}

export async function ledgerKinds(db, account) {
  return (await q(db, 'SELECT kind, amount FROM billing.ledger WHERE account = $1 ORDER BY version', [account]));
}

export async function verifyLedger(db) {
  return q(db, 'SELECT * FROM billing.verify_ledger()');
}

// Drop every database of one test.sh run (see test/cleanup.js).
export async function dropRunDatabases(run) {
  const a = new pg.Client(baseConfig());
  await a.connect();
  const { rows } = await a.query(
    `SELECT datname FROM pg_database WHERE datname LIKE 'pgb\\_node\\_' || $1 || '\\_%'`, [run]);
  for (const { datname } of rows) await a.query(`DROP DATABASE IF EXISTS "${datname}" WITH (FORCE)`);
  await a.end();
  return rows.map((r) => r.datname);
}
