// The billing seam of an AI gateway: withBilling(account, meter, op).
//
//   gate      billing.check(account, unit, estimate, meter => meter)   no lock, no write
//   reserve   billing.reserve(..., key => key)                         its own short transaction
//   op(bill)  the provider call, with NO transaction open and no connection held
//   re-check  every `recheckEvery` progress reports: billing.check of what the next chunk
//             needs beyond what is reserved, and a further billing.reserve for it
//   settle    billing.settle(hold, actual, meter, quantity, properties)  one short transaction
//   release   billing.release(hold) on cancellation or provider error
//
// Every statement runs through pool.query (autocommit) or a BEGIN … COMMIT of a few
// milliseconds, so the account's pool row is never locked while the provider streams.

export class BillingRefused extends Error {
  constructor(reason, available, meter) {
    super(`billing refused ${meter}: ${reason} (available ${available})`);
    this.name = 'BillingRefused';
    this.reason = reason;
    this.available = available;
    this.meter = meter;
  }
}

export class AlreadyBilled extends Error {
  constructor(key, holdId, status) {
    super(`request ${key} already has hold ${holdId} (${status}); not calling the provider again`);
    this.name = 'AlreadyBilled';
    this.key = key;
    this.holdId = holdId;
    this.status = status;
  }
}

export class StreamStopped extends Error {
  constructor(reason) {
    super(`stream stopped by billing re-check: ${reason}`);
    this.name = 'StreamStopped';
    this.reason = reason;
  }
}

const INSUFFICIENT = '23514';

function addUsage(a, b, times = 1) {
  const out = { ...a };
  for (const [k, v] of Object.entries(b)) out[k] = (out[k] ?? 0) + v * times;
  return out;
}

/**
 * @param {object} o
 * @param {import('pg').Pool} o.pool
 * @param {string} o.unit            the pool's unit, e.g. 'usd_mills'
 * @param {Record<string, {estimate:number, cost:(u:object)=>number, quantity:(u:object)=>number}>} o.meters
 *        one entry per billing meter (defined in the database with billing.define_meter)
 * @param {number} [o.recheckEvery]  progress reports between re-checks
 * @param {string} [o.ttl]           hold TTL: an abandoned hold stops counting after it
 */
export function createGateway({ pool, unit, meters, recheckEvery = 8, ttl = '10 minutes' }) {
  async function one(sql, params) {
    const { rows } = await pool.query(sql, params);
    return rows[0];
  }

  async function reserve(account, amount, key, metadata) {
    try {
      return await one(
        `SELECT hold_id, status, amount FROM billing.reserve($1, $2, $3, key => $4, ttl => $5::interval,
                                                              metadata => $6::jsonb)`,
        [account, unit, amount, key, ttl, JSON.stringify(metadata)]);
    } catch (err) {
      if (err.code === INSUFFICIENT) return null; // would cross the floor: nothing was written
      throw err;
    }
  }

  async function releaseAll(holds) {
    const client = await pool.connect();
    try {
      await client.query('BEGIN');
      for (const h of holds) await client.query('SELECT status FROM billing.release($1)', [h.id]);
      await client.query('COMMIT');
    } catch (err) {
      await client.query('ROLLBACK').catch(() => {});
      throw err;
    } finally {
      client.release();
    }
  }

  async function settle(holds, meter, actual, quantity, properties) {
    // The extension holds are given back and the first hold is settled for the whole actual
    // cost, in one transaction: the pool stays locked from the first release to the commit,
    // so nobody else can take what the extensions reserved in between.
    const client = await pool.connect();
    try {
      await client.query('BEGIN');
      for (const h of holds.slice(1)) await client.query('SELECT status FROM billing.release($1)', [h.id]);
      const { rows } = await client.query(
        `SELECT hold_id, status, held, actual, covered, debt_created, available, entitled, event_id
         FROM billing.settle($1, $2, meter => $3, quantity => $4, properties => $5::jsonb)`,
        [holds[0].id, actual, meter, quantity, JSON.stringify(properties)]);
      await client.query('COMMIT');
      return rows[0];
    } catch (err) {
      await client.query('ROLLBACK').catch(() => {});
      throw err;
    } finally {
      client.release();
    }
  }

  /**
   * Run `op(bill)` under a hold on `account` for `meter`.
   * bill.signal        aborted on caller cancellation or when a re-check fails
   * bill.progress(d)   add usage (e.g. {output_tokens: 1}); resolves false once billing stopped the stream
   * bill.report(u)     the provider's final usage (replaces the running count)
   * bill.tool(m, op)   a nested withBilling on the same account for a tool meter
   * Resolves { value, stopped, usage, cost, holdId, settlement }.
   */
  async function withBilling(account, meterName, op, opts = {}) {
    const meter = meters[meterName];
    if (!meter) throw new Error(`unknown meter ${meterName}`);
    const { key, signal, properties = {}, usage: initialUsage = {} } = opts;
    if (!key) throw new Error('withBilling needs an idempotency key (the request id)');
    const estimate = opts.estimate ?? meter.estimate;
    signal?.throwIfAborted();

    // 1. the floor, before anything is written or called
    const gate = await one(
      'SELECT allowed, available, reason FROM billing.check($1, $2, $3, meter => $4)',
      [account, unit, estimate, meterName]);
    if (!gate.allowed) throw new BillingRefused(gate.reason, Number(gate.available), meterName);

    // 2. the reservation, committed before the provider is called
    const metadata = { meter: meterName, request: key, ...properties };
    const first = await reserve(account, estimate, key, metadata);
    if (!first) throw new BillingRefused('insufficient_credits', null, meterName); // lost a race after check
    if (first.status === 'duplicate') {
      const h = await one('SELECT status FROM billing.holds WHERE id = $1', [first.hold_id]);
      throw new AlreadyBilled(key, Number(first.hold_id), h.status);
    }
    const holds = [{ id: Number(first.hold_id), amount: Number(first.amount) }];
    let reserved = holds[0].amount;

    const ctl = new AbortController();
    const onCallerAbort = () => ctl.abort(signal.reason);
    signal?.addEventListener('abort', onCallerAbort, { once: true });

    let running = { ...initialUsage };
    let lastDelta = {};
    let reported = null;
    let ticks = 0;
    let tools = 0;
    let stopped = null;

    const stop = (reason) => {
      if (!stopped) {
        stopped = reason;
        ctl.abort(new StreamStopped(reason));
      }
      return false;
    };

    async function recheck() {
      // what the next chunk would bring the cost to, and how much of that is not reserved yet
      const projected = meter.cost(addUsage(running, lastDelta, recheckEvery));
      const need = Math.max(0, projected - reserved);
      const c = await one(
        'SELECT allowed, reason FROM billing.check($1, $2, $3, meter => $4)',
        [account, unit, need, meterName]);
      if (!c.allowed) return stop(c.reason); // drained (or in debt) since the hold was taken
      if (need > 0) {
        const ext = await reserve(account, need, `${key}:ext:${holds.length}`, metadata);
        if (!ext) return stop('insufficient_credits');
        holds.push({ id: Number(ext.hold_id), amount: Number(ext.amount) });
        reserved += Number(ext.amount);
      }
      return true;
    }

    const bill = {
      signal: ctl.signal,
      holdId: holds[0].id,
      get stopped() { return stopped; },
      async progress(delta) {
        if (stopped) return false;
        running = addUsage(running, delta);
        lastDelta = delta;
        ticks += 1;
        if (ticks % recheckEvery !== 0) return true;
        return recheck();
      },
      report(usage) { reported = { ...usage }; },
      tool(toolMeter, toolOp, toolOpts = {}) {
        tools += 1;
        return withBilling(account, toolMeter, toolOp,
          { ...toolOpts, key: `${key}:tool:${tools}`, signal: ctl.signal });
      },
    };

    let value;
    try {
      try {
        value = await op(bill);
      } catch (err) {
        if (!stopped) throw err; // cancellation or provider error: release below
        // billing stopped the stream; the provider's abort error is expected
      }
      if (!stopped && signal?.aborted) throw signal.reason; // cancelled after the provider finished
    } catch (err) {
      try {
        await releaseAll(holds);
      } catch (releaseErr) {
        err.releaseError = releaseErr; // the holds expire at their TTL
      }
      throw err;
    } finally {
      signal?.removeEventListener('abort', onCallerAbort);
    }

    // 3. settle what was used: the provider's report, or the running count if billing stopped it
    const usage = (!stopped && reported) ? reported : running;
    const cost = meter.cost(usage);
    const settlement = await settle(holds, meterName, cost, meter.quantity(usage), { ...properties, ...usage });
    return { value, stopped, usage, cost, holdId: holds[0].id, holds: holds.map((h) => h.id), settlement };
  }

  return { withBilling };
}
