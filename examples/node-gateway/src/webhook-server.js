// A Stripe webhook receiver: the raw body, untouched, and the headers go to
// billing.receive_webhook, which verifies the signature, deduplicates the event and
// applies it (a top-up credits the account) in one transaction. No JSON parsing here:
// re-serialising the body would break the signature.
import http from 'node:http';

const MAX_BODY = 1024 * 1024 + 1; // pg_billing rejects bodies over 1 MiB itself; stop reading past that

// applied, duplicate and superseded are final: Stripe must stop retrying.
// rejected (bad signature, stale, malformed) will never verify: 400.
// failed (the handler raised, rolled back) may succeed on redelivery: 500 so Stripe retries.
const HTTP_STATUS = { applied: 200, duplicate: 200, superseded: 200, rejected: 400, failed: 500 };

function readBody(req, limit) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > limit) {
        reject(Object.assign(new Error('body too large'), { status: 413 }));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function send(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

/**
 * @param {object} o
 * @param {import('pg').Pool} o.pool
 * @param {Record<string,string>} [o.routes]  URL path → billing webhook endpoint name
 */
export function createWebhookServer({ pool, routes = { '/webhooks/stripe': 'stripe' } }) {
  return http.createServer(async (req, res) => {
    const endpoint = routes[req.url];
    if (!endpoint) return send(res, 404, { error: 'not found' });
    if (req.method !== 'POST') return send(res, 405, { error: 'POST only' });
    let raw;
    try {
      raw = await readBody(req, MAX_BODY);
    } catch (err) {
      return send(res, err.status ?? 400, { error: err.message });
    }
    try {
      // node lower-cases header names; pg_billing finds stripe-signature in the JSON
      const { rows } = await pool.query(
        `SELECT webhook_event_id, status, reason, provider_event_id, event_type, result
         FROM billing.receive_webhook($1, $2::jsonb, $3)`,
        [endpoint, JSON.stringify(req.headers), raw.toString('utf8')]);
      const r = rows[0];
      return send(res, HTTP_STATUS[r.status] ?? 500, {
        status: r.status, reason: r.reason, event: r.provider_event_id, webhook_event_id: Number(r.webhook_event_id),
        result: r.result, // what the handler did (e.g. {credited, grant_id, amount}); for logs, Stripe ignores it
      });
    } catch (err) {
      // a body PostgreSQL cannot store as text (a NUL byte) will never verify
      if (err.code === '22021' || err.code === '22P05') return send(res, 400, { error: 'body is not valid text' });
      return send(res, 500, { error: 'webhook intake failed' });
    }
  });
}
