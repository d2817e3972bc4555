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
