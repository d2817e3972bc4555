-- Reconciliation with the provider's own records, so drift is found and
-- fixed through the normal idempotent paths.

-- Orphan usage: given the provider's request ids for a period (the usage
-- event keys the application sends), the ones with no usage event here
-- (missing 'here': re-ingest them with the same key, which is safe to repeat)
-- and the events here in [period_start, period_end) that the provider does
-- not list (missing 'there'), optionally of one meter or account.
CREATE FUNCTION billing.reconcile_usage(provider_keys text[], period_start timestamptz, period_end timestamptz,
    only_meter text DEFAULT NULL, only_account text DEFAULT NULL)
RETURNS TABLE (key text, missing text, account text, meter text, occurred_at timestamptz, cost bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
BEGIN
    IF provider_keys IS NULL OR period_start IS NULL OR period_end IS NULL THEN
        RAISE EXCEPTION 'provider_keys, period_start and period_end may not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF cardinality(provider_keys) > 1000000 OR period_end <= period_start THEN
        RAISE EXCEPTION 'at most 1,000,000 keys per call, and period_end after period_start'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    SELECT p.k, 'here'::text, NULL::text, NULL::text, NULL::timestamptz, NULL::bigint
    FROM (SELECT DISTINCT u.k FROM unnest(provider_keys) AS u(k) WHERE u.k IS NOT NULL) p
    WHERE NOT EXISTS (SELECT 1 FROM billing.usage_events e WHERE e.tenant_id = tenant AND e.key = p.k)
    UNION ALL
    SELECT e.key, 'there'::text, e.account, e.meter, e.occurred_at, e.cost
    FROM billing.usage_events e
    LEFT JOIN (SELECT DISTINCT u.k FROM unnest(provider_keys) AS u(k)) p ON p.k = e.key
    WHERE e.tenant_id = tenant AND e.occurred_at >= period_start AND e.occurred_at < period_end
      AND (only_meter IS NULL OR e.meter = only_meter)
      AND (only_account IS NULL OR e.account = only_account)
      AND p.k IS NULL
    ORDER BY 2, 1;
END
$$;

-- Payments: the provider's list of payments (a JSON array of
-- {"payment", "account", "paid", "refunded"}, amounts in minor units, e.g.
-- from Stripe's list of PaymentIntents and their charges) against the
-- ledger. Only drift is returned: a payment with no credit here
-- (`not_credited`: confirm it, or have the provider re-send its event; the
-- payment's key makes either safe), credited to another account
-- (`other_account`), or refunded by more or less than the refunds recorded
-- here by more than `epsilon` (`refund_drift`: re-send the refund's event).
CREATE FUNCTION billing.reconcile_payments(provider_payments jsonb, epsilon bigint DEFAULT 0)
RETURNS TABLE (payment text, account text, problem text, provider_paid bigint, provider_refunded bigint,
               credited bigint, refunded_here bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
BEGIN
    IF provider_payments IS NULL OR epsilon IS NULL THEN
        RAISE EXCEPTION 'provider_payments and epsilon may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF jsonb_typeof(provider_payments) <> 'array' OR jsonb_array_length(provider_payments) > 1000000 OR epsilon < 0 THEN
        RAISE EXCEPTION 'provider_payments must be an array of at most 1,000,000 {"payment", "account", "paid", "refunded"}, epsilon not negative'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH p AS (
        SELECT x.payment, x.account, coalesce(x.paid, 0) AS paid, coalesce(x.refunded, 0) AS refunded
        FROM jsonb_to_recordset(provider_payments) AS x(payment text, account text, paid bigint, refunded bigint)
        WHERE x.payment IS NOT NULL),
    here AS (
        SELECT p.*, g.account AS credited_account, g.amount AS credited,
               coalesce((SELECT sum(r.amount) FROM billing.stripe_reversals r
                         WHERE r.tenant_id = tenant AND r.payment = p.payment AND r.source = 'refunds'), 0)::bigint
                   AS refunded_here
        FROM p LEFT JOIN billing.grants g ON g.tenant_id = tenant AND g.key = billing.payment_key(p.payment))
    SELECT h.payment, h.account,
           CASE WHEN h.credited IS NULL THEN 'not_credited'
                WHEN h.account IS DISTINCT FROM h.credited_account THEN 'other_account'
                ELSE 'refund_drift' END,
           h.paid, h.refunded, h.credited, h.refunded_here
    FROM here h
    WHERE h.credited IS NULL OR h.account IS DISTINCT FROM h.credited_account
       OR abs(h.refunded - h.refunded_here) > epsilon
    ORDER BY 1;
END
$$;

-- Cost audit: the provider's invoice (a JSON array of {"meter",
-- "period_start", "period_end", "cost"}, cost in the meter's unit; periods
-- in whole UTC hours, as usage is counted, read in UTC when they carry no
-- offset) against the cost recorded here for
-- each meter and period, from the hourly counters. Every line is returned
-- with its drift (recorded − invoiced); a drift beyond the tolerance, either
-- way (the larger of `tolerance` and `tolerance_percent` of the invoiced
-- cost), raises one alert (kind cost_drift, one per meter and period,
-- announced with NOTIFY billing_alert) whose id the line carries.
CREATE FUNCTION billing.audit_costs(invoice jsonb, tolerance_percent numeric DEFAULT 1, tolerance bigint DEFAULT 0)
RETURNS TABLE (meter text, unit text, period_start timestamptz, period_end timestamptz, recorded bigint,
               invoiced bigint, drift bigint, alert_id bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
SET TimeZone = 'UTC'
AS $$
-- a column named like an output (the conflict target's period_start) is the column
#variable_conflict use_column
DECLARE
    tenant text := billing.current_tenant();
    line record;
    m billing.meters;
    allowed bigint;
BEGIN
    IF invoice IS NULL OR tolerance_percent IS NULL OR tolerance IS NULL THEN
        RAISE EXCEPTION 'invoice, tolerance_percent and tolerance may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF jsonb_typeof(invoice) <> 'array' OR jsonb_array_length(invoice) > 100000
       OR tolerance_percent < 0 OR tolerance_percent > 100 OR tolerance < 0 THEN
        RAISE EXCEPTION 'invoice must be an array of at most 100,000 {"meter", "period_start", "period_end", "cost"}; tolerance_percent between 0 and 100, tolerance not negative'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR line IN
        SELECT x.meter, x.period_start, x.period_end, x.cost
        FROM jsonb_to_recordset(invoice) AS x(meter text, period_start timestamptz, period_end timestamptz, cost bigint)
    LOOP
        IF line.meter IS NULL OR line.period_start IS NULL OR line.period_end IS NULL OR line.cost IS NULL
           OR line.cost < 0 OR line.period_end <= line.period_start
           OR date_trunc('hour', line.period_start) <> line.period_start
           OR date_trunc('hour', line.period_end) <> line.period_end THEN
            RAISE EXCEPTION 'invoice line % is not {"meter", "period_start", "period_end", "cost"} with a cost not negative and a period of whole hours', line
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT * INTO m FROM billing.meters x WHERE x.tenant_id = tenant AND x.meter = line.meter;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'unknown meter "%"', left(line.meter, 80) USING ERRCODE = 'undefined_object';
        END IF;
        meter := line.meter;
        unit := m.unit;
        period_start := line.period_start;
        period_end := line.period_end;
        invoiced := line.cost;
        SELECT coalesce(sum(c.cost), 0)::bigint INTO recorded FROM billing.hourly_usage c
        WHERE c.tenant_id = tenant AND c.meter = line.meter
          AND c.hour >= line.period_start AND c.hour < line.period_end;
        drift := recorded - invoiced;
        allowed := greatest(tolerance, ceil(invoiced * tolerance_percent / 100)::bigint);
        alert_id := NULL;
        IF abs(drift) > allowed THEN
            INSERT INTO billing.alerts (tenant_id, unit, name, kind, threshold, period_start, period_end, details)
            VALUES (tenant, m.unit, line.meter, 'cost_drift', allowed, line.period_start, line.period_end,
                    jsonb_build_object('recorded', recorded, 'invoiced', invoiced, 'drift', drift))
            ON CONFLICT (tenant_id, name, period_start, period_end) WHERE kind = 'cost_drift' DO NOTHING
            RETURNING id INTO alert_id;
            IF alert_id IS NULL THEN
                SELECT a.id INTO alert_id FROM billing.alerts a
                WHERE a.tenant_id = tenant AND a.kind = 'cost_drift' AND a.name = line.meter
                  AND a.period_start = line.period_start AND a.period_end = line.period_end;
            ELSE
                PERFORM pg_notify('billing_alert', alert_id::text);
            END IF;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;
