-- Windows: the one place that cuts time into the windows of allowances
-- (src/allowances.rs) and limits (src/limits.rs). An hour window is an
-- hour of real time starting on a local hour (so the hour repeated when
-- clocks fall back is two windows); longer ones run between local
-- boundaries. A periodic window runs from one
-- local boundary (midnight, the hour, Monday, the 1st, in the rule's time
-- zone, so a day across a DST change lasts 23 or 25 hours) to the next; the
-- first runs from the rule's start to the next boundary. Each instant lies
-- in exactly one window: a window contains its start and not its end. A
-- window's credit expires keep_periods windows after its start; a 'never'
-- window starts with the rule and lasts until the rule ends.

-- The allowance rule a grant is a window of, from the grant's key
-- (`billing:allowance:<rule>:<window start>`, made by src/allowances.rs,
-- grant_due; `billing:` keys are reserved), or NULL for any other grant.
CREATE FUNCTION billing.allowance_rule_of(key text) RETURNS bigint
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog
AS $$
    SELECT CASE WHEN key LIKE 'billing:allowance:%' THEN split_part(key, ':', 3)::bigint END
$$;

-- The window of a limit that holds `at`: [starts_at, ends_at); 'never' is
-- one window for all time (ends_at NULL: it never resets).
CREATE FUNCTION billing.window_of(every text, time_zone text, at timestamptz)
RETURNS TABLE (starts_at timestamptz, ends_at timestamptz)
LANGUAGE sql STABLE
SET search_path = pg_catalog
AS $$
    SELECT CASE WHEN every = 'never' THEN '-infinity'::timestamptz
                ELSE date_trunc(every, at, time_zone) END,
           CASE WHEN every = 'never' THEN NULL
                -- an hour is 3600 seconds whatever the zone: an hour repeated
                -- when clocks fall back is two windows
                WHEN every = 'hour' THEN date_trunc('hour', at, time_zone) + interval '1 hour'
                ELSE (date_trunc(every, at AT TIME ZONE time_zone) + ('1 ' || every)::interval)
                     AT TIME ZONE time_zone END
$$;

-- The windows of allowance `a` that start in [since, at] and whose credit
-- is still spendable at `at`, oldest first.
CREATE FUNCTION billing.allowance_windows(a billing.allowances, since timestamptz, at timestamptz)
RETURNS TABLE (starts_at timestamptz, expires_at timestamptz)
LANGUAGE sql STABLE
SET search_path = pg_catalog
AS $$
    SELECT a.starts_at, a.ends_at
    WHERE a.every = 'never' AND a.starts_at >= since AND a.starts_at <= at
      AND (a.ends_at IS NULL OR a.ends_at > at)
    UNION ALL
    SELECT w.starts_at, w.expires_at
    FROM (SELECT interval '1 hour' AS step, date_trunc('hour', a.starts_at, a.time_zone) AS base,
                 date_trunc('hour', at, a.time_zone) AS here
          WHERE a.every = 'hour') s
    CROSS JOIN LATERAL generate_series(greatest(s.base, s.here - a.keep_periods * s.step), s.here, s.step) l
    CROSS JOIN LATERAL (
        SELECT CASE WHEN l = s.base THEN a.starts_at ELSE l END AS starts_at,
               l + a.keep_periods * s.step AS expires_at) w
    WHERE w.starts_at >= since AND w.starts_at <= at AND w.expires_at > at
      AND (a.ends_at IS NULL OR w.starts_at < a.ends_at)
    UNION ALL
    SELECT w.starts_at, w.expires_at
    FROM (SELECT ('1 ' || a.every)::interval AS step,
                 date_trunc(a.every, a.starts_at AT TIME ZONE a.time_zone) AS base,
                 date_trunc(a.every, at AT TIME ZONE a.time_zone) AS here
          WHERE a.every IN ('day', 'week', 'month')) s
    CROSS JOIN LATERAL generate_series(greatest(s.base, s.here - a.keep_periods * s.step), s.here, s.step) l
    CROSS JOIN LATERAL (
        SELECT CASE WHEN l = s.base THEN a.starts_at ELSE l AT TIME ZONE a.time_zone END AS starts_at,
               (l + a.keep_periods * s.step) AT TIME ZONE a.time_zone AS expires_at) w
    WHERE w.starts_at >= since AND w.starts_at <= at AND w.expires_at > at
      AND (a.ends_at IS NULL OR w.starts_at < a.ends_at)
    ORDER BY 1
$$;

-- What pool `pool` is owed at `at` and has not received: the windows of its
-- rules from its allowance_next on.
CREATE FUNCTION billing.allowance_due(pool bigint, at timestamptz)
RETURNS TABLE (allowance_id bigint, starts_at timestamptz, expires_at timestamptz, amount bigint,
               priority integer)
LANGUAGE sql STABLE
SET search_path = pg_catalog
AS $$
    SELECT a.id, w.starts_at, w.expires_at, a.amount, a.priority
    FROM billing.pools p
    JOIN billing.allowances a ON a.pool_id = p.id
    CROSS JOIN LATERAL billing.allowance_windows(a, p.allowance_next, at) w
    WHERE p.id = pool AND p.allowance_next <= at AND a.starts_at <= at
      AND (a.ends_at IS NULL OR a.ends_at > p.allowance_next)
    ORDER BY w.starts_at, a.id
$$;

-- The start of the first window of pool `pool`'s rules after `at`;
-- infinity when none will start.
CREATE FUNCTION billing.allowance_next_start(pool bigint, at timestamptz)
RETURNS timestamptz
LANGUAGE sql STABLE
SET search_path = pg_catalog
AS $$
    SELECT coalesce(min(n.starts_at), 'infinity')
    FROM billing.allowances a
    CROSS JOIN LATERAL (
        SELECT CASE WHEN a.starts_at > at THEN a.starts_at
                    WHEN a.every = 'never' THEN NULL
                    ELSE (SELECT w.ends_at FROM billing.window_of(a.every, a.time_zone, at) w) END AS starts_at) n
    WHERE a.pool_id = pool AND (a.ends_at IS NULL OR n.starts_at < a.ends_at)
$$;

-- The first window boundary after `at` of a rule of this shape: where a
-- changed rule takes over, so the window running at `at` keeps its credit
-- ('never': at once).
CREATE FUNCTION billing.allowance_boundary(every text, time_zone text, at timestamptz)
RETURNS timestamptz
LANGUAGE sql STABLE
SET search_path = pg_catalog
AS $$
    SELECT coalesce(w.ends_at, at) FROM billing.window_of(every, time_zone, at) w
$$;

-- Give back what holds counted in their pools' limits (released or
-- expired: nothing was used).
CREATE FUNCTION billing.give_back_limits(holds bigint[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
#variable_conflict use_column
BEGIN
    WITH released AS (DELETE FROM billing.limit_holds h WHERE h.hold_id = ANY(holds) RETURNING h.*),
         total AS (SELECT r.limit_id, r.window_start, r.member, sum(r.amount) AS amount
                   FROM released r GROUP BY 1, 2, 3)
    UPDATE billing.limit_usage u SET used = u.used - t.amount FROM total t
    WHERE u.limit_id = t.limit_id AND u.window_start = t.window_start AND u.member = t.member;
END
$$;

-- A settled hold: its actual cost replaces what it counted in its pool's
-- limits, in the windows where it counted; returns how many limits it
-- counted in (0: it counts like any usage, now).
CREATE FUNCTION billing.settle_limits(hold bigint, actual bigint) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
#variable_conflict use_column
DECLARE
    counted bigint;
BEGIN
    WITH settled AS (DELETE FROM billing.limit_holds h WHERE h.hold_id = hold RETURNING h.*),
         changed AS (UPDATE billing.limit_usage u SET used = u.used + actual - s.amount FROM settled s
                     WHERE u.limit_id = s.limit_id AND u.window_start = s.window_start AND u.member = s.member
                     RETURNING 1)
    SELECT count(*) INTO counted FROM settled;
    RETURN counted;
END
$$;
