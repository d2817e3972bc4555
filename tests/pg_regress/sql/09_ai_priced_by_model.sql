-- An AI product priced from token counts by model (a cost card), counted
-- per model and member, reported per model without reading events, and
-- repriced mid-period without touching what was already charged.
SELECT billing.define_meter('llm_calls', 'ai_mills', aggregation => 'count', group_by => '{model,member}',
    price => '{"model": "cost_card", "by": "model", "rates": {
        "big": {"input_tokens": "0.0025", "output_tokens": "0.01", "cached_tokens": "0.00125"},
        "small": {"input_tokens": "0.00015", "output_tokens": "0.0006"}}}');
SELECT status, amount FROM billing.grant('org_llm', 'ai_mills', 100000, kind => 'topup', key => 'org_llm:topup');

-- each call: its cost is what the period's total, rounded once, grew by
-- (c1: 6.5 → 7; c2: +4 → 10.5, 11; c3: +2.1 → 12.6, 13; c4: +0.75 → 13.35, 13; c5: +3.25 → 16.6, 17)
SELECT r.key, r.cost, r.available
FROM (VALUES ('c1', 'big', 'ana', 1200, 300, 400), ('c2', 'big', 'ben', 800, 200, 0),
             ('c3', 'small', 'ana', 10000, 1000, 0), ('c4', 'small', 'ana', 3000, 500, 0),
             ('c5', 'big', 'ana', 100, 50, 2000)) c(key, model, member, input, output, cached),
     LATERAL (SELECT c.key, i.cost, i.available FROM billing.ingest('org_llm', 'llm_calls', 1, key => c.key,
                 properties => jsonb_build_object('model', c.model, 'member', c.member, 'input_tokens', c.input,
                                                  'output_tokens', c.output, 'cached_tokens', c.cached)) i) r
ORDER BY r.key;

-- an unknown model is refused, naming the models the card prices
SELECT * FROM billing.ingest('org_llm', 'llm_calls', 1, key => 'c6', properties => '{"model": "huge"}');

-- this month (UTC) per model, and per model and member (from the hourly counters)
SELECT groups, events, quantity, cost
FROM billing.usage('org_llm', 'llm_calls', date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
                   (date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC',
                   'month', '{model}')
ORDER BY groups::text;
SELECT groups, events, cost
FROM billing.usage('org_llm', 'llm_calls', date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
                   (date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC',
                   'month', '{model,member}')
ORDER BY groups::text;

-- the big model gets cheaper: later calls use version 2, earlier ones keep version 1
SELECT meter, version, status FROM billing.set_price('llm_calls', '{"model": "cost_card", "by": "model", "rates": {
        "big": {"input_tokens": "0.002", "output_tokens": "0.008", "cached_tokens": "0.001"},
        "small": {"input_tokens": "0.00015", "output_tokens": "0.0006"}}}');
SELECT cost FROM billing.ingest('org_llm', 'llm_calls', 1, key => 'c7',
    properties => '{"model": "big", "member": "ben", "input_tokens": 1000, "output_tokens": 100}');
SELECT key, cost, price_version, member, via FROM billing.usage_log('org_llm', page_size => 10) ORDER BY event_id;

-- a retired model: disabled, its history stays
SELECT billing.disable_meter('llm_calls');
SELECT * FROM billing.ingest('org_llm', 'llm_calls', 1, key => 'c8', properties => '{"model": "small"}');
SELECT count(*) AS events FROM billing.usage_log('org_llm');

SELECT * FROM billing.verify_ledger();
