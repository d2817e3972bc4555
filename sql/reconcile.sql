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
