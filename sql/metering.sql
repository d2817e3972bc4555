-- Usage reports, read from the hourly counters (billing.hourly_usage)
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
    -- counters are hourly (UTC hours): a zone whose offset is not a whole
    -- number of hours in the range would cut hours in two
    IF EXISTS (
        SELECT 1 FROM generate_series(usage."from", usage."to", interval '1 day') t
        WHERE extract(minute FROM (t AT TIME ZONE usage.time_zone) - (t AT TIME ZONE 'UTC')) <> 0) THEN
        RAISE EXCEPTION 'invalid time_zone: "%" is not a whole number of hours from UTC; counters are hourly', usage.time_zone
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT x.aggregation, x.group_by INTO m FROM billing.meters x
    WHERE x.tenant_id = tenant AND x.meter = usage.meter;
    IF NOT FOUND THEN
        IF NOT EXISTS (SELECT 1 FROM billing.units x WHERE x.tenant_id = tenant AND x.unit = usage.meter) THEN
            RAISE EXCEPTION 'unknown meter "%"', usage.meter USING ERRCODE = 'undefined_object';
        END IF;
        -- (a record takes its field names from a query, not from ROW())
        SELECT 'sum'::text AS aggregation, '{}'::text[] AS group_by INTO m;
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
        JOIN billing.hourly_usage c ON c.pool_id = p.id
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

-- The calendar month (UTC) holding `at`: the period priced meters charge in.
CREATE FUNCTION billing.usage_period(at timestamptz)
RETURNS TABLE (period_start timestamptz, period_end timestamptz)
LANGUAGE sql STABLE
SET search_path = pg_catalog
AS $$
    SELECT date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
           (date_trunc('month', at AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC'
$$;

-- An invoice for one account's period (the calendar month, UTC, holding
-- period_at): per meter, the lines of its price at the period's quantity
-- (each tier, package or unit, exactly) and an adjustment to what was
-- charged (rounding once, earlier price versions); usage whose cost was
-- passed in; the plan fee of a live subscription; the credit each grant
-- paid; and, per unit, what is due: the sum of every other line of that
-- unit. With projected, a period in progress is priced at the quantities
-- its usage so far would reach at its end, at the same pace (no credits).
CREATE FUNCTION billing.invoice_preview(account text, period_at timestamptz DEFAULT now(),
                                        projected boolean DEFAULT false)
RETURNS TABLE (line integer, kind text, description text, meter text, unit text,
               quantity numeric, unit_price numeric, amount numeric)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
    ps timestamptz;
    pe timestamptz;
    pace numeric := 1;
BEGIN
    IF invoice_preview.account IS NULL OR invoice_preview.period_at IS NULL OR invoice_preview.projected IS NULL THEN
        RAISE EXCEPTION 'account, period_at and projected must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT p.period_start, p.period_end INTO ps, pe FROM billing.usage_period(invoice_preview.period_at) p;
    IF invoice_preview.projected AND now() > ps AND now() < pe THEN
        pace := extract(epoch FROM pe - ps) / extract(epoch FROM now() - ps);
    END IF;
    RETURN QUERY
    WITH pools AS (
        SELECT p.id, p.unit FROM billing.pools p
        WHERE p.tenant_id = tenant AND p.account = invoice_preview.account
    ), counted AS (
        SELECT c.meter, p.unit, sum(c.events) AS events, sum(c.cost) AS cost
        FROM pools p JOIN billing.hourly_usage c ON c.pool_id = p.id
        WHERE c.hour >= ps AND c.hour < pe
        GROUP BY c.meter, p.unit
    ), priced AS (
        SELECT mp.meter, p.unit, mp.quantity * pace AS quantity, mp.charged, pr.price
        FROM pools p JOIN billing.meter_periods mp ON mp.pool_id = p.id AND mp.period_start = ps
        JOIN billing.meter_prices pr ON pr.tenant_id = tenant AND pr.meter = mp.meter AND pr.version = mp.version
    ), tier_lines AS (
        SELECT 1 AS part, pc.meter, pc.unit, l.line AS n, 'usage'::text AS kind, l.description,
               l.quantity, l.unit_price, l.amount
        FROM priced pc CROSS JOIN LATERAL billing.price_lines(pc.price, pc.quantity) l
        WHERE pc.price ->> 'model' <> 'cost_card'
    ), priced_totals AS (
        SELECT pc.meter, pc.unit,
               CASE WHEN pc.price ->> 'model' = 'cost_card' THEN round(pc.charged * pace)
                    WHEN pace <> 1 THEN billing.price_total(pc.price, pc.quantity)::numeric
                    ELSE pc.charged END AS total,
               pc.price ->> 'model' = 'cost_card' AS by_card
        FROM priced pc
    ), adjustments AS (
        SELECT 2 AS part, t.meter, t.unit, 1 AS n,
               CASE WHEN t.by_card THEN 'usage' ELSE 'adjustment' END AS kind,
               CASE WHEN t.by_card THEN 'priced per event by its cost card, rounded once for the period'
                    ELSE 'rounded once for the period, and any earlier price version' END AS description,
               NULL::numeric AS quantity, NULL::numeric AS unit_price,
               t.total - coalesce((SELECT sum(tl.amount) FROM tier_lines tl
                                   WHERE tl.meter = t.meter AND tl.unit = t.unit), 0) AS amount
        FROM priced_totals t
    ), passed_in AS (
        SELECT 3 AS part, c.meter, c.unit, 1 AS n, 'usage'::text AS kind,
               'costs passed with its events' AS description, c.events * pace AS quantity, NULL::numeric,
               round((c.cost - coalesce(pc.charged, 0)) * pace) AS amount
        FROM counted c LEFT JOIN priced pc ON pc.meter = c.meter AND pc.unit = c.unit
        WHERE c.cost - coalesce(pc.charged, 0) <> 0
    ), plan_fee AS (
        SELECT 4 AS part, NULL::text AS meter, lower(pr ->> 'currency') AS unit, 1 AS n, 'plan_fee'::text AS kind,
               format('plan %s, %s', pl.key, pr ->> 'interval') AS description, 1::numeric AS quantity,
               (pr ->> 'amount')::numeric AS unit_price, (pr ->> 'amount')::numeric AS amount
        FROM billing.subscriptions s
        JOIN billing.plans pl ON pl.id = s.plan_id
        CROSS JOIN LATERAL jsonb_array_elements(pl.prices) pr
        WHERE s.tenant_id = tenant AND s.account = invoice_preview.account
          AND billing.subscription_is_live(s.status) AND pr ->> 'price_id' = s.price_id
          AND s.period_start < pe AND s.period_end > ps
    ), credits AS (
        SELECT 5 AS part, NULL::text AS meter, p.unit, min(g.id)::integer AS n, 'credit'::text AS kind,
               format('paid from grant %s (%s)', g.id, g.kind) AS description, NULL::numeric, NULL::numeric,
               sum(e.grant_amount)::numeric AS amount
        FROM pools p JOIN billing.ledger e ON e.pool_id = p.id
        JOIN billing.grants g ON g.id = coalesce((SELECT x.parent_id FROM billing.grants x WHERE x.id = e.grant_id), e.grant_id)
        WHERE NOT invoice_preview.projected AND e.kind IN ('debit', 'debt_repayment')
          AND e.effective_at >= ps AND e.effective_at < pe AND e.grant_id IS NOT NULL
        GROUP BY p.unit, g.id, g.kind
    ), body AS (
        SELECT * FROM tier_lines UNION ALL SELECT * FROM adjustments a WHERE a.amount <> 0
        UNION ALL SELECT * FROM passed_in UNION ALL SELECT * FROM plan_fee UNION ALL SELECT * FROM credits
    ), due AS (
        SELECT 6 AS part, NULL::text AS meter, b.unit, 1 AS n, 'due'::text AS kind,
               CASE WHEN invoice_preview.projected THEN 'projected for the period' ELSE 'due' END AS description,
               NULL::numeric, NULL::numeric, sum(b.amount) AS amount
        FROM body b GROUP BY b.unit
    )
    SELECT (row_number() OVER (ORDER BY x.unit, x.part > 3, x.meter, x.part, x.n))::integer, x.kind, x.description,
           x.meter, x.unit, trim_scale(x.quantity), trim_scale(x.unit_price), trim_scale(x.amount)
    FROM (SELECT * FROM body UNION ALL SELECT * FROM due) x
    ORDER BY x.unit, x.part > 3, x.meter, x.part, x.n;
END
$$;

-- What an account's usage of a meter in a period (the calendar month, UTC,
-- holding period_at) would cost with a proposed price, beside what it was
-- charged. Changes nothing.
CREATE FUNCTION billing.simulate_price(account text, meter text, price jsonb, period_at timestamptz DEFAULT now())
RETURNS TABLE (quantity numeric, charged bigint, simulated bigint, difference bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ps timestamptz;
    pe timestamptz;
    q numeric;
    c bigint;
    s bigint;
BEGIN
    IF simulate_price.price IS NULL OR simulate_price.period_at IS NULL THEN
        RAISE EXCEPTION 'price and period_at must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT p.period_start, p.period_end INTO ps, pe FROM billing.usage_period(simulate_price.period_at) p;
    SELECT u.quantity, u.cost INTO q, c
    FROM billing.usage(simulate_price.account, simulate_price.meter, ps, pe, 'month') u LIMIT 1;
    s := billing.price_total(simulate_price.price, q);
    RETURN QUERY SELECT q, c, s, s - c;
END
$$;

-- Postpaid usage for the payment provider: per account and meter with usage
-- in the period (the calendar month, UTC, holding period_at), the quantity
-- so far, what the provider was last told, the delta, and the key to send
-- the report with (the provider's idempotency key: a retried push of the
-- same delta is the same report). A worker pushes the delta (or, for a
-- max or last meter, the quantity) and then marks it (mark_reported);
-- reading this changes nothing, so a worker in shadow mode only reads.
CREATE FUNCTION billing.usage_to_report(period_at timestamptz DEFAULT now(), only_meter text DEFAULT NULL,
                                        max_rows integer DEFAULT 1000)
RETURNS TABLE (account text, customer text, meter text, period_start timestamptz, quantity numeric,
               reported numeric, delta numeric, report_key text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
    ps timestamptz;
    pe timestamptz;
BEGIN
    IF usage_to_report.period_at IS NULL OR usage_to_report.max_rows IS NULL THEN
        RAISE EXCEPTION 'period_at and max_rows must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF usage_to_report.max_rows NOT BETWEEN 1 AND 100000 THEN
        RAISE EXCEPTION 'invalid max_rows: % is not between 1 and 100000', usage_to_report.max_rows
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT p.period_start, p.period_end INTO ps, pe FROM billing.usage_period(usage_to_report.period_at) p;
    RETURN QUERY
    WITH used AS (
        SELECT DISTINCT p.account, c.meter
        FROM billing.pools p JOIN billing.hourly_usage c ON c.pool_id = p.id
        WHERE p.tenant_id = tenant AND c.hour >= ps AND c.hour < pe
          AND (usage_to_report.only_meter IS NULL OR c.meter = usage_to_report.only_meter)
    ), totals AS (
        SELECT u.account, u.meter, t.quantity
        FROM used u CROSS JOIN LATERAL billing.usage(u.account, u.meter, ps, pe, 'month') t
    )
    SELECT t.account, pc.customer, t.meter, ps, t.quantity, coalesce(r.reported, 0),
           t.quantity - coalesce(r.reported, 0),
           format('billing:report:%s:%s:%s:%s', t.account, t.meter,
                  to_char(ps AT TIME ZONE 'UTC', 'YYYY-MM'), trim_scale(t.quantity))
    FROM totals t
    LEFT JOIN billing.usage_reports r ON r.tenant_id = tenant AND r.account = t.account
         AND r.meter = t.meter AND r.period_start = ps
    LEFT JOIN billing.provider_customers pc ON pc.tenant_id = tenant AND pc.account = t.account
    WHERE t.quantity IS DISTINCT FROM r.reported
    ORDER BY t.account, t.meter
    LIMIT usage_to_report.max_rows;
END
$$;

-- Record that the provider now has `quantity` of an account's meter for the
-- period starting period_start, reported under `report_key`: once per key
-- (again: duplicate), never backwards (a lower quantity than recorded:
-- stale). With shadow, only says what it would do.
CREATE FUNCTION billing.mark_reported(account text, meter text, period_start timestamptz, quantity numeric,
                                      report_key text, shadow boolean DEFAULT false)
RETURNS TABLE (status text, reported numeric)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
    r billing.usage_reports;
BEGIN
    IF mark_reported.account IS NULL OR mark_reported.meter IS NULL OR mark_reported.period_start IS NULL
       OR mark_reported.quantity IS NULL OR mark_reported.report_key IS NULL OR mark_reported.shadow IS NULL THEN
        RAISE EXCEPTION 'account, meter, period_start, quantity, report_key and shadow must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF mark_reported.quantity < 0 THEN
        RAISE EXCEPTION 'invalid quantity: must not be negative' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF mark_reported.period_start <> (SELECT p.period_start FROM billing.usage_period(mark_reported.period_start) p) THEN
        RAISE EXCEPTION 'invalid period_start: % does not start a period (the 1st of a month, UTC)', mark_reported.period_start
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO r FROM billing.usage_reports x
    WHERE x.tenant_id = tenant AND x.account = mark_reported.account AND x.meter = mark_reported.meter
      AND x.period_start = mark_reported.period_start
    FOR UPDATE;
    IF FOUND AND r.report_key = mark_reported.report_key THEN
        RETURN QUERY SELECT 'duplicate'::text, r.reported;
        RETURN;
    END IF;
    IF FOUND AND mark_reported.quantity <= r.reported THEN
        RETURN QUERY SELECT 'stale'::text, r.reported;
        RETURN;
    END IF;
    IF mark_reported.shadow THEN
        RETURN QUERY SELECT 'would_mark'::text, mark_reported.quantity;
        RETURN;
    END IF;
    INSERT INTO billing.usage_reports AS x (tenant_id, account, meter, period_start, reported, report_key)
    VALUES (tenant, mark_reported.account, mark_reported.meter, mark_reported.period_start,
            mark_reported.quantity, mark_reported.report_key)
    ON CONFLICT ON CONSTRAINT usage_reports_pkey DO UPDATE
    SET reported = EXCLUDED.reported, report_key = EXCLUDED.report_key, reported_at = now()
    WHERE x.reported < EXCLUDED.reported;
    RETURN QUERY SELECT 'marked'::text, mark_reported.quantity;
END
$$;
