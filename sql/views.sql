-- Readable views over the ledger, and the invariant check. Views run with the
-- caller's rights (security_invoker), so row-level security applies to them.

-- Grants with their state at this instant; what the lanes of a split
-- pool hold of a grant counts as the grant's.
CREATE VIEW billing.grant_balances WITH (security_invoker = true) AS
SELECT g.id AS grant_id, g.account, g.unit, g.kind, g.priority, g.amount, r.remaining,
       g.effective_at, g.expires_at,
       billing.grant_state(g.status, r.remaining, g.effective_at, g.expires_at, now()) AS state,
       g.key, g.metadata, g.created_at
FROM billing.grants g
CROSS JOIN LATERAL (SELECT billing.grant_remaining(g)
                           + coalesce((SELECT sum(billing.grant_remaining(c)) FROM billing.grants c
                                       WHERE c.parent_id = g.id), 0)::bigint AS remaining) r
WHERE g.parent_id IS NULL;

-- Every ledger entry, with the grant, hold or event it concerns: the rows of
-- ledger_entries and the debits usage events carry themselves (schema.sql,
-- usage_events; their entry_id is NULL). Every reader of entries reads this.
CREATE VIEW billing.ledger WITH (security_invoker = true) AS
SELECT l.* FROM (
    SELECT e.account, e.unit, e.version, e.kind, e.amount, e.balance_after, e.debt_after,
           e.held_after, e.grant_id, e.hold_id, e.event_id, e.effective_at, e.recorded_at,
           e.grant_amount, e.debt_amount, e.hold_amount, e.balance_before, e.pool_id, e.id AS entry_id
    FROM billing.ledger_entries e
    UNION ALL
    SELECT u.account, u.unit, u.entry_version, 'debit'::billing.entry_kind, -u.covered, u.balance_after,
           u.debt_after, u.held_after, u.entry_grant, NULL::bigint, u.id, u.entry_at, u.recorded_at,
           -u.covered, 0::bigint, 0::bigint, u.balance_after + u.covered, u.pool_id, NULL::bigint
    FROM billing.usage_events u
) l
-- an event without an entry of its own (entry_version NULL) is not a row; the
-- test is out here, not on the events' branch, because PostgreSQL merges a
-- UNION ALL branch into the query (and so reads a pool's rows of both tables
-- by index when a query names its pools) only when the branch has no WHERE
WHERE l.version IS NOT NULL;

-- The hourly usage counters (src/metering): the rows of usage_counters, and
-- the counter each pool row keeps (pools.counter_*), which stands for the
-- row of the same key, if there is one, until it is written back there.
-- (Both tests are out here, not in the branches, for the reason given at
-- billing.ledger: a query that names its pools reads them by index.)
CREATE VIEW billing.hourly_usage WITH (security_invoker = true) AS
SELECT u.tenant_id, u.pool_id, u.account, u.meter, u.hour, u.groups, u.events, u.quantity,
       u.last_at, u.cost, u.revised_at
FROM (
    SELECT c.tenant_id, c.pool_id, c.account, c.meter, c.hour, c.groups, c.events, c.quantity,
           c.last_at, c.cost, c.revised_at, true AS written_back
    FROM billing.usage_counters c
    UNION ALL
    SELECT p.tenant_id, p.id, p.account, p.counter_meter, p.counter_hour, p.counter_groups, p.counter_events,
           p.counter_quantity, p.counter_last_at, p.counter_cost, p.counter_revised_at, false
    FROM billing.pools p
) u
WHERE u.meter IS NOT NULL
  AND NOT (u.written_back AND EXISTS (SELECT 1 FROM billing.pools p
                                      WHERE p.id = u.pool_id AND p.counter_meter = u.meter
                                        AND p.counter_hour = u.hour AND p.counter_groups = u.groups));

-- The entries of some grants (or lane shares), summed by kind: the rows of
-- ledger_entries that name them, and one 'debit' row per grant for the
-- debits usage events carry, which is what those rows leave unexplained of
-- its remaining (Σ grant_amount of a grant's entries = its remaining, rule 8).
-- Read from the grants' own rows and entries, never by scanning a pool's events.
CREATE FUNCTION billing.grant_entry_totals(grant_ids bigint[])
RETURNS TABLE (grant_id bigint, kind billing.entry_kind, grant_amount bigint, debt_amount bigint)
LANGUAGE sql STABLE
SET search_path = pg_catalog, billing
AS $$
    SELECT e.grant_id, e.kind, sum(e.grant_amount)::bigint, sum(e.debt_amount)::bigint
    FROM billing.ledger_entries e WHERE e.grant_id = ANY (grant_ids)
    GROUP BY e.grant_id, e.kind
    UNION ALL
    SELECT g.id, 'debit', c.carried, 0
    FROM billing.grants g
    CROSS JOIN LATERAL (SELECT billing.grant_remaining(g) - coalesce(sum(e.grant_amount), 0)::bigint AS carried
                        FROM billing.ledger_entries e WHERE e.grant_id = g.id) c
    WHERE g.id = ANY (grant_ids) AND c.carried <> 0
$$;

-- docs/architecture.md, rule 8, for every pool of the current tenant: returns one row per
-- violation, so an empty result means the ledger is consistent.
--   * entries chain: versions 1..n without gaps, balance_before = previous balance_after
--   * per grant: Σ grant_amount of its entries = its remaining
--     (Σ granted − Σ debits − Σ expired − Σ revoked − Σ voided = Σ remaining),
--     and no grant whose row holds credit is marked exhausted
--   * per hold: Σ hold_amount of its entries = its amount while open, 0 once closed
--   * the pool's cached totals equal what the entries sum to
--   * every grant, hold and event an entry names exists, in the entry's pool
--   * every hourly usage counter equals what its events add up to, and no
--     counter lacks events nor events a counter (src/metering)
--   * per pool, priced meter and period, what its price charged equals
--     what its priced events were charged
--   * every row rule of the tables written per event (which carry no CHECK
--     constraints nor foreign keys, see schema.sql): amounts in range, entries
--     balanced, every event and entry in an existing pool
--   * split pools (docs/architecture.md, "Split pools"): a share of a grant
--     sits on a lane of the grant's own pool with the grant's kind, priority
--     and window; transfers between a grant and its shares net to zero; a
--     grant and its shares hold no more than its amount, and nothing once it
--     is closed; a lane holds no holds and owes no debt
CREATE FUNCTION billing.verify_ledger()
RETURNS TABLE (pool_id bigint, account text, unit text, problem text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, billing
AS $$
WITH tenant_pools AS (
    SELECT * FROM billing.pools WHERE tenant_id = billing.current_tenant()
), chain AS (
    SELECT e.pool_id, e.version, e.balance_before, e.balance_after,
           lag(e.balance_after, 1, 0::bigint) OVER w AS prev_after,
           lag(e.debt_after, 1, 0::bigint) OVER w + e.debt_amount AS expect_debt, e.debt_after,
           lag(e.held_after, 1, 0::bigint) OVER w + e.hold_amount AS expect_held, e.held_after,
           row_number() OVER w AS n
    FROM billing.ledger e JOIN tenant_pools p ON p.id = e.pool_id
    WINDOW w AS (PARTITION BY e.pool_id ORDER BY e.version)
), grant_sums AS (
    SELECT e.grant_id, sum(e.grant_amount) AS total
    FROM billing.ledger e JOIN tenant_pools p ON p.id = e.pool_id
    WHERE e.grant_id IS NOT NULL GROUP BY e.grant_id
), metered AS (
    -- each event where its counters count it (src/metering)
    SELECT u.id, u.pool_id, u.account, u.unit, u.meter, u.quantity, u.cost, u.price_version,
           t.at, date_trunc('hour', t.at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hour,
           date_trunc('month', t.at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS period,
           coalesce(m.aggregation, 'sum') AS aggregation, u.properties ->> m.property AS value,
           coalesce((SELECT jsonb_object_agg(g, coalesce(u.properties -> g, 'null'::jsonb))
                     FROM unnest(m.group_by) g), '{}'::jsonb) AS groups
    FROM billing.usage_events u JOIN tenant_pools p ON p.id = u.pool_id
    CROSS JOIN LATERAL (SELECT coalesce(u.booked_at, u.occurred_at) AS at) t
    LEFT JOIN billing.meters m ON m.tenant_id = u.tenant_id AND m.meter = u.meter
), recount AS (
    SELECT f.pool_id, min(f.account) AS account, min(f.unit) AS unit, f.meter, f.hour, f.groups,
           count(*) AS events, sum(f.cost) AS cost,
           CASE min(f.aggregation)
               WHEN 'sum' THEN sum(f.quantity)
               WHEN 'count' THEN count(*)::numeric
               WHEN 'max' THEN max(f.quantity)
               WHEN 'last' THEN (array_agg(f.quantity ORDER BY f.at DESC, f.id DESC))[1]
               ELSE count(*) FILTER (WHERE f.first_seen AND f.value IS NOT NULL)::numeric END AS quantity
    FROM (SELECT m.*, row_number() OVER (PARTITION BY m.pool_id, m.meter, m.period, m.value
                                         ORDER BY m.id) = 1 AS first_seen
          FROM metered m) f
    GROUP BY f.pool_id, f.meter, f.hour, f.groups
)
SELECT c.pool_id, p.account, p.unit,
       format('entry version %s: %s', c.version,
              CASE WHEN c.version <> c.n THEN 'version gap'
                   WHEN c.balance_before <> c.prev_after THEN 'balance_before does not chain'
                   WHEN c.debt_after <> c.expect_debt THEN 'debt_after does not chain'
                   ELSE 'held_after does not chain' END)
FROM chain c JOIN tenant_pools p ON p.id = c.pool_id
WHERE c.version <> c.n OR c.balance_before <> c.prev_after
   OR c.debt_after <> c.expect_debt OR c.held_after <> c.expect_held
UNION ALL
SELECT g.pool_id, g.account, g.unit,
       format('grant %s: remaining %s but its entries sum to %s', g.id, r.remaining, coalesce(s.total, 0))
FROM billing.grants g JOIN tenant_pools p ON p.id = g.pool_id
CROSS JOIN LATERAL (SELECT billing.grant_remaining(g) AS remaining) r
LEFT JOIN grant_sums s ON s.grant_id = g.id
WHERE r.remaining <> coalesce(s.total, 0)
UNION ALL
SELECT g.pool_id, g.account, g.unit,
       format('grant %s: marked exhausted, but its row holds %s, which the drain would skip', g.id, g.remaining)
FROM billing.grants g JOIN tenant_pools p ON p.id = g.pool_id
WHERE g.exhausted AND g.remaining > 0
UNION ALL
SELECT h.pool_id, h.account, h.unit,
       format('hold %s (%s): its entries hold %s', h.id, h.status, coalesce(s.total, 0))
FROM billing.holds h JOIN tenant_pools p ON p.id = h.pool_id
LEFT JOIN LATERAL (SELECT sum(e.hold_amount) AS total FROM billing.ledger_entries e WHERE e.hold_id = h.id) s ON true
WHERE coalesce(s.total, 0) <> CASE WHEN h.status = 'open' THEN h.amount ELSE 0 END
UNION ALL
SELECT e.pool_id, e.account, e.unit, format('entry version %s names a missing %s', e.version,
       CASE WHEN e.grant_id IS NOT NULL AND g.id IS NULL THEN 'grant ' || e.grant_id
            WHEN e.hold_id IS NOT NULL AND h.id IS NULL THEN 'hold ' || e.hold_id
            ELSE 'usage event ' || e.event_id END)
FROM billing.ledger e JOIN tenant_pools p ON p.id = e.pool_id
LEFT JOIN billing.grants g ON g.id = e.grant_id AND g.pool_id = e.pool_id
LEFT JOIN billing.holds h ON h.id = e.hold_id AND h.pool_id = e.pool_id
LEFT JOIN billing.usage_events u ON u.id = e.event_id AND u.pool_id = e.pool_id
WHERE (e.grant_id IS NOT NULL AND g.id IS NULL) OR (e.hold_id IS NOT NULL AND h.id IS NULL)
   OR (e.event_id IS NOT NULL AND u.id IS NULL)
UNION ALL
SELECT p.id, p.account, p.unit,
       format('pool totals (version %s, remaining %s, debt %s, held %s) differ from the ledger (%s, %s, %s, %s)',
              p.version, p.remaining, p.debt, p.held,
              coalesce(l.version, 0), coalesce(gr.total, 0), coalesce(l.debt_after, 0), coalesce(l.held_after, 0))
FROM tenant_pools p
LEFT JOIN LATERAL (SELECT e.version, e.debt_after, e.held_after, e.balance_after FROM billing.ledger e
                   WHERE e.pool_id = p.id ORDER BY e.version DESC LIMIT 1) l ON true
LEFT JOIN LATERAL (SELECT sum(billing.grant_remaining(g)) AS total FROM billing.grants g WHERE g.pool_id = p.id) gr ON true
WHERE p.version <> coalesce(l.version, 0) OR p.remaining <> coalesce(gr.total, 0)
   OR p.debt <> coalesce(l.debt_after, 0) OR p.held <> coalesce(l.held_after, 0)
   OR coalesce(l.balance_after, 0) <> p.remaining - p.debt
UNION ALL
SELECT coalesce(r.pool_id, c.pool_id), coalesce(r.account, c.account), coalesce(r.unit, p.unit),
       format('meter %s, hour %s, groups %s: the counter (%s events, quantity %s, cost %s) differs from its events (%s, %s, %s)',
              coalesce(r.meter, c.meter), coalesce(r.hour, c.hour), coalesce(r.groups, c.groups::jsonb),
              c.events, c.quantity, c.cost, r.events, r.quantity, r.cost)
FROM recount r
FULL JOIN (SELECT c.* FROM billing.hourly_usage c JOIN tenant_pools p ON p.id = c.pool_id) c
  ON c.pool_id = r.pool_id AND c.meter = r.meter AND c.hour = r.hour AND c.groups::jsonb = r.groups
LEFT JOIN tenant_pools p ON p.id = c.pool_id
WHERE r.pool_id IS NULL OR c.pool_id IS NULL
   OR (c.events, c.quantity, c.cost) IS DISTINCT FROM (r.events, r.quantity, r.cost)
UNION ALL
SELECT coalesce(r.pool_id, c.pool_id), p.account, p.unit,
       format('meter %s, period from %s: %s charged by its price, but its events were charged %s',
              coalesce(r.meter, c.meter), coalesce(r.period, c.period_start), c.charged, r.charged)
FROM (SELECT m.pool_id, m.meter, m.period, sum(m.cost) AS charged FROM metered m
      WHERE m.price_version IS NOT NULL GROUP BY 1, 2, 3) r
FULL JOIN (SELECT c.* FROM billing.meter_periods c JOIN tenant_pools p ON p.id = c.pool_id) c
  ON c.pool_id = r.pool_id AND c.meter = r.meter AND c.period_start = r.period
JOIN tenant_pools p ON p.id = coalesce(r.pool_id, c.pool_id)
WHERE coalesce(c.charged, 0) <> coalesce(r.charged, 0)
UNION ALL
SELECT g.pool_id, g.account, g.unit, format('grant %s: %s', g.id, r.rule)
FROM billing.grants g JOIN tenant_pools p ON p.id = g.pool_id
CROSS JOIN LATERAL (SELECT billing.grant_remaining(g) AS remaining) gr
CROSS JOIN LATERAL (VALUES
    (g.amount <= 0, 'amount is not positive'),
    (gr.remaining < 0 OR gr.remaining > g.amount, 'remaining is outside 0..amount'),
    (g.expires_at <= g.effective_at, 'expires_at does not follow effective_at'),
    (g.status NOT IN ('active', 'suspended', 'voided', 'revoked'), 'unknown status ' || g.status),
    (g.status IN ('voided', 'revoked') AND gr.remaining <> 0, 'closed but keeps credit')) r(broken, rule)
WHERE r.broken
UNION ALL
SELECT u.pool_id, u.account, u.unit, format('usage event %s: %s', u.id, r.rule)
FROM billing.usage_events u JOIN tenant_pools p ON p.id = u.pool_id
CROSS JOIN LATERAL (VALUES
    (u.quantity < 0, 'negative quantity'),
    (u.cost < 0 OR u.covered < 0 OR u.debt_created < 0, 'negative amount'),
    (u.covered + u.debt_created <> u.cost, 'covered + debt_created differs from cost'),
    (u.entry_version IS NOT NULL AND (u.debt_created <> 0 OR u.covered <= 0 OR u.entry_grant IS NULL
                                      OR u.balance_after IS NULL OR u.debt_after IS NULL
                                      OR u.held_after IS NULL OR u.entry_at IS NULL),
     'carries a ledger entry that is not a whole debit of one grant'),
    ((u.entry_version IS NULL) = (u.drains IS NULL), 'has both its drains and a ledger entry, or neither')) r(broken, rule)
WHERE r.broken
UNION ALL
SELECT u.pool_id, u.account, u.unit, format('usage event %s: carries its debit and has entries too', u.id)
FROM billing.usage_events u JOIN tenant_pools p ON p.id = u.pool_id
JOIN (SELECT DISTINCT e.pool_id, e.event_id FROM billing.ledger_entries e JOIN tenant_pools p ON p.id = e.pool_id
      WHERE e.event_id IS NOT NULL) x ON x.pool_id = u.pool_id AND x.event_id = u.id
WHERE u.entry_version IS NOT NULL
UNION ALL
SELECT e.pool_id, e.account, e.unit, format('entry version %s: %s', e.version, r.rule)
FROM billing.ledger e JOIN tenant_pools p ON p.id = e.pool_id
CROSS JOIN LATERAL (VALUES
    (e.balance_before + e.amount <> e.balance_after, 'balance_before + amount differs from balance_after'),
    (e.amount <> e.grant_amount - e.debt_amount, 'amount differs from grant_amount - debt_amount'),
    (e.grant_amount <> 0 AND e.grant_id IS NULL, 'moves credit without naming a grant'),
    (e.debt_after < 0 OR e.held_after < 0, 'negative debt or held total')) r(broken, rule)
WHERE r.broken
UNION ALL
SELECT p.id, p.account, p.unit, 'pool: a negative booked total'
FROM tenant_pools p WHERE p.remaining < 0 OR p.debt < 0 OR p.held < 0
UNION ALL
SELECT p.id, p.account, p.unit, format('pool: draws %s from grant %s, which is not its own or has less', p.drawn, p.drawn_grant)
FROM tenant_pools p
WHERE p.drawn < 0 OR (p.drawn > 0 AND NOT EXISTS (SELECT 1 FROM billing.grants g
                                                  WHERE g.id = p.drawn_grant AND g.pool_id = p.id
                                                    AND g.remaining >= p.drawn))
UNION ALL
SELECT p.id, p.account, p.unit, format('lane %s: %s', p.lane, r.rule)
FROM tenant_pools p
CROSS JOIN LATERAL (VALUES
    (p.held <> 0, 'holds credit on hold'),
    (p.debt <> 0, 'owes debt')) r(broken, rule)
WHERE p.lane > 0 AND r.broken
UNION ALL
SELECT c.pool_id, c.account, c.unit, format('share %s of grant %s: %s', c.id, c.parent_id, r.rule)
FROM billing.grants c JOIN tenant_pools p ON p.id = c.pool_id
LEFT JOIN billing.grants g ON g.id = c.parent_id
LEFT JOIN billing.pools gp ON gp.id = g.pool_id
CROSS JOIN LATERAL (VALUES
    (g.id IS NULL, 'the grant is missing'),
    (p.lane = 0 OR gp.lane <> 0 OR gp.account <> p.account OR gp.unit <> p.unit,
     'not on a lane of the grant''s pool'),
    (g.kind <> c.kind OR g.priority <> c.priority OR g.effective_at <> c.effective_at
        OR g.expires_at IS DISTINCT FROM c.expires_at, 'differs from the grant in kind, priority or window'),
    (g.status <> 'active' AND billing.grant_remaining(c) <> 0, 'keeps credit of a grant that is not spendable (closed or suspended)')) r(broken, rule)
WHERE c.parent_id IS NOT NULL AND r.broken IS NOT FALSE
UNION ALL
SELECT g.pool_id, g.account, g.unit, format('grant %s: %s', g.id, r.rule)
FROM billing.grants g JOIN tenant_pools p ON p.id = g.pool_id
CROSS JOIN LATERAL (SELECT coalesce(sum(billing.grant_remaining(c)), 0) AS remaining, count(*) AS n
                    FROM billing.grants c WHERE c.parent_id = g.id) shares
CROSS JOIN LATERAL (SELECT coalesce(sum(e.grant_amount), 0) AS net
                    FROM billing.ledger_entries e
                    WHERE e.kind = 'transfer'
                      AND (e.grant_id = g.id OR e.grant_id IN (SELECT c.id FROM billing.grants c
                                                               WHERE c.parent_id = g.id))) t
CROSS JOIN LATERAL (VALUES
    (billing.grant_remaining(g) + shares.remaining > g.amount, 'it and its lanes'' shares hold more than its amount'),
    (t.net <> 0, 'transfers to and from its lanes'' shares do not net to zero')) r(broken, rule)
WHERE g.parent_id IS NULL AND shares.n > 0 AND r.broken
UNION ALL
SELECT x.pool_id, x.account, x.unit, x.what || ' names a missing pool'
FROM (SELECT u.pool_id, u.account, u.unit, 'usage event ' || u.id AS what
      FROM billing.usage_events u WHERE u.tenant_id = billing.current_tenant()
      UNION ALL
      SELECT e.pool_id, e.account, e.unit, 'entry version ' || e.version
      FROM billing.ledger_entries e WHERE e.tenant_id = billing.current_tenant()
      UNION ALL
      SELECT g.pool_id, g.account, g.unit, 'grant ' || g.id
      FROM billing.grants g WHERE g.tenant_id = billing.current_tenant()) x
WHERE NOT EXISTS (SELECT 1 FROM billing.pools p WHERE p.id = x.pool_id)
$$;
