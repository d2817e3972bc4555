-- Usage reports, read from the hourly counters (billing.usage_counters)
-- rather than from events: a month of one account's usage is at most 744
-- counter rows per group, however many events it had.

-- Usage of one account and meter from `from` to `to`, per hour, day, week
-- or month in `time_zone` (any zone whose offset is a whole number of
-- hours, as counters are hourly), optionally per values of some of the
-- meter's group_by properties. Every period of the range is a row, with 0
-- when nothing was used; with groups, every group seen in the range gets
-- every period. quantity combines the hours as the meter aggregates: sum,
-- count and unique_count add up (unique_count counts the values first seen
-- in their calendar month, UTC, during the period), max takes the largest,
-- last the latest.
CREATE FUNCTION billing.usage(
    account text, meter text, "from" timestamptz, "to" timestamptz,
    granularity text DEFAULT 'day', group_by text[] DEFAULT '{}', time_zone text DEFAULT 'UTC')
RETURNS TABLE (period_start timestamptz, period_end timestamptz, groups jsonb,
               events bigint, quantity numeric, cost bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
    m record;
    step interval;
    periods bigint;
BEGIN
    IF usage.account IS NULL OR usage.meter IS NULL OR usage."from" IS NULL OR usage."to" IS NULL
       OR usage.granularity IS NULL OR usage.group_by IS NULL OR usage.time_zone IS NULL THEN
        RAISE EXCEPTION 'account, meter, from, to, granularity, group_by and time_zone must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF usage.granularity NOT IN ('hour', 'day', 'week', 'month') THEN
        RAISE EXCEPTION 'invalid granularity: "%" is not one of hour, day, week, month', usage.granularity
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF usage."to" <= usage."from" OR NOT isfinite(usage."from") OR NOT isfinite(usage."to") THEN
        RAISE EXCEPTION 'invalid range: "to" must follow "from", both finite'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_timezone_names z WHERE z.name = usage.time_zone)
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_timezone_abbrevs z WHERE z.abbrev = usage.time_zone) THEN
        RAISE EXCEPTION 'invalid time_zone: "%" is not a time zone PostgreSQL knows', usage.time_zone
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT x.aggregation, x.group_by INTO m FROM billing.meters x
    WHERE x.tenant_id = tenant AND x.meter = usage.meter;
    IF NOT FOUND THEN
        IF NOT EXISTS (SELECT 1 FROM billing.units x WHERE x.tenant_id = tenant AND x.unit = usage.meter) THEN
            RAISE EXCEPTION 'unknown meter "%"', usage.meter USING ERRCODE = 'undefined_object';
        END IF;
        m := ROW('sum'::text, '{}'::text[]);
    END IF;
    IF NOT usage.group_by <@ m.group_by THEN
        RAISE EXCEPTION 'invalid group_by: meter "%" counts by %', usage.meter,
            CASE WHEN cardinality(m.group_by) = 0 THEN 'no property' ELSE array_to_string(m.group_by, ', ') END
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    step := ('1 ' || usage.granularity)::interval;
    periods := (extract(epoch FROM usage."to" - usage."from") / extract(epoch FROM step))::bigint;
    IF periods > 10000 THEN
        RAISE EXCEPTION 'invalid range: % periods of a %; at most 10000', periods, usage.granularity
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH counted AS (
        SELECT date_trunc(usage.granularity, c.hour AT TIME ZONE usage.time_zone) AS local_start,
               coalesce((SELECT jsonb_object_agg(g, c.groups::jsonb -> g) FROM unnest(usage.group_by) g),
                        '{}'::jsonb) AS groups,
               c.events, c.quantity, c.last_at, c.cost
        FROM billing.pools p
        JOIN billing.usage_counters c ON c.pool_id = p.id
        WHERE p.tenant_id = tenant AND p.account = usage.account AND c.meter = usage.meter
          AND c.hour >= date_trunc('hour', usage."from") AND c.hour < usage."to"
    ), summed AS (
        SELECT c.local_start, c.groups, sum(c.events)::bigint AS events, sum(c.cost)::bigint AS cost,
               CASE m.aggregation
                   WHEN 'max' THEN max(c.quantity)
                   WHEN 'last' THEN (array_agg(c.quantity ORDER BY c.last_at DESC))[1]
                   ELSE sum(c.quantity) END AS quantity
        FROM counted c GROUP BY c.local_start, c.groups
    ), slots AS (
        SELECT s AS local_start
        FROM generate_series(date_trunc(usage.granularity, usage."from" AT TIME ZONE usage.time_zone),
                             usage."to" AT TIME ZONE usage.time_zone - interval '1 microsecond', step) s
    ), groups_seen AS (
        SELECT DISTINCT s.groups FROM summed s
        UNION SELECT '{}'::jsonb WHERE NOT EXISTS (SELECT 1 FROM summed)
    )
    SELECT sl.local_start AT TIME ZONE usage.time_zone, (sl.local_start + step) AT TIME ZONE usage.time_zone,
           g.groups, coalesce(s.events, 0), coalesce(s.quantity, 0), coalesce(s.cost, 0)
    FROM slots sl CROSS JOIN groups_seen g
    LEFT JOIN summed s ON s.local_start = sl.local_start AND s.groups = g.groups
    ORDER BY sl.local_start, g.groups::text;
END
$$;

-- One account's calls, newest first: what each used and cost, with its
-- properties (member: the property per-member reports and limits read),
-- including calls settled through holds; only_meter narrows it to one
-- meter. Keyset-paged: pass the last
-- event_id of a page as before_id for the next one.
CREATE FUNCTION billing.usage_log(
    account text, only_meter text DEFAULT NULL, before_id bigint DEFAULT NULL, page_size integer DEFAULT 50)
RETURNS TABLE (event_id bigint, occurred_at timestamptz, recorded_at timestamptz, meter text,
               quantity numeric, unit text, cost bigint, covered bigint, debt_created bigint,
               member text, via text, key text, price_version integer, properties jsonb)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
BEGIN
    IF usage_log.account IS NULL OR usage_log.page_size IS NULL THEN
        RAISE EXCEPTION 'account and page_size must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF usage_log.page_size NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'invalid page_size: % is not between 1 and 1000', usage_log.page_size
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    SELECT e.id, e.occurred_at, e.recorded_at, e.meter, e.quantity, e.unit, e.cost, e.covered,
           e.debt_created, e.properties ->> 'member',
           CASE WHEN e.key LIKE 'billing:hold:%' THEN 'hold' ELSE 'ingest' END, e.key,
           e.price_version, e.properties
    FROM billing.pools p
    CROSS JOIN LATERAL (
        SELECT u.* FROM billing.usage_events u
        WHERE u.pool_id = p.id AND (usage_log.before_id IS NULL OR u.id < usage_log.before_id)
          AND (usage_log.only_meter IS NULL OR u.meter = usage_log.only_meter)
        ORDER BY u.id DESC LIMIT usage_log.page_size) e
    WHERE p.tenant_id = tenant AND p.account = usage_log.account
    ORDER BY e.id DESC LIMIT usage_log.page_size;
END
$$;
