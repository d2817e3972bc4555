-- Tenancy and privileges, applied last, over every table and function.
--
-- Three roles (created if missing; roles are cluster-wide and outlive the
-- extension):
--   billing_reader  reads balances, usage and the ledger of its tenants
--   billing_app     also moves money and records usage for its tenants
--   billing_admin   also configures units, meters, floors, webhooks and
--                   tenants, and may act for any tenant
-- A login role acts for a tenant when it has the privileges of a role that
-- billing.grant_tenant(tenant, role) named (see src/tenancy.rs).

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'billing_reader') THEN
        CREATE ROLE billing_reader NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'billing_app') THEN
        CREATE ROLE billing_app NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'billing_admin') THEN
        CREATE ROLE billing_admin NOLOGIN;
    END IF;
END
$$;
GRANT billing_reader TO billing_app;
GRANT billing_app TO billing_admin;
GRANT USAGE ON SCHEMA billing TO billing_reader;

-- Secrets stay unreadable: no role but the owner reads webhook_endpoints;
-- this view shows everything but the secrets, for the session's tenant.
CREATE VIEW billing.webhook_endpoint_settings AS
SELECT name, scheme, tolerance_seconds, signature_header, credit_unit, credits_per_minor_unit,
       previous_secret IS NOT NULL AND previous_secret_expires_at > now() AS rotating, created_at
FROM billing.webhook_endpoints WHERE tenant_id = billing.current_tenant();

-- Row-level security, enabled and forced on every table. current_tenant()
-- raises for a tenant the role was not granted, so a forged setting reads
-- nothing; it is evaluated once per statement.
DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['accounts', 'units', 'meters', 'pools', 'grants', 'usage_events', 'holds',
                             'ledger_entries', 'webhook_endpoints', 'webhook_events', 'webhook_objects',
                             'webhook_handlers', 'stripe_reversals'] LOOP
        EXECUTE format('ALTER TABLE billing.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE billing.%I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_isolation ON billing.%I '
                       'USING (tenant_id = (SELECT billing.current_tenant()))', t);
        EXECUTE format('REVOKE ALL ON billing.%I FROM PUBLIC', t);
    END LOOP;
END
$$;
ALTER TABLE billing.tenant_roles ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.tenant_roles FORCE ROW LEVEL SECURITY;
CREATE POLICY admins_only ON billing.tenant_roles
    USING (pg_catalog.pg_has_role(current_user, 'billing_admin', 'USAGE'));
REVOKE ALL ON billing.tenant_roles FROM PUBLIC;

GRANT SELECT ON billing.accounts, billing.units, billing.meters, billing.pools, billing.grants,
                billing.usage_events, billing.holds, billing.ledger_entries, billing.webhook_events,
                billing.webhook_objects, billing.webhook_handlers, billing.stripe_reversals,
                billing.grant_balances, billing.ledger, billing.webhook_endpoint_settings
    TO billing_reader;
GRANT SELECT ON billing.tenant_roles TO billing_admin;
-- The plain-INSERT interface of the webhook inbox: these three columns only.
GRANT INSERT (endpoint, headers, body) ON billing.webhook_events TO billing_app;

-- ----- tenants ---------------------------------------------------------------

CREATE FUNCTION billing.grant_tenant(tenant text, role name) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
BEGIN
    IF tenant !~ '^[A-Za-z0-9_.:-]{1,63}$' THEN
        RAISE EXCEPTION 'invalid tenant "%"', left(tenant, 80) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = role) THEN
        RAISE EXCEPTION 'unknown role "%"', role USING ERRCODE = 'undefined_object';
    END IF;
    INSERT INTO billing.tenant_roles (tenant_id, role_name) VALUES (tenant, role) ON CONFLICT DO NOTHING;
END
$$;

CREATE FUNCTION billing.revoke_tenant(tenant text, role name) RETURNS boolean
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
    WITH d AS (DELETE FROM billing.tenant_roles r WHERE r.tenant_id = tenant AND r.role_name = role RETURNING 1)
    SELECT count(*) > 0 FROM d
$$;

-- ----- who may call what -----------------------------------------------------

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA billing FROM PUBLIC;
-- needed by every querying role: row-level security calls it
GRANT EXECUTE ON FUNCTION billing.current_tenant() TO PUBLIC;
GRANT EXECUTE ON FUNCTION
    billing."check"(text, text, bigint),
    billing.balance(text, text, timestamptz),
    billing.verify_ledger(),
    billing.verify_webhook(text, text, jsonb, text, text, integer, text)
    TO billing_reader;
GRANT EXECUTE ON FUNCTION
    billing."grant"(text, text, bigint, text, integer, timestamptz, timestamptz, text, jsonb),
    billing.void_grant(bigint),
    billing.revoke_unused(bigint),
    billing.reverse_grant(bigint, bigint),
    billing.ingest(text, text, numeric, text, timestamptz, jsonb, bigint, boolean),
    billing.ingest_batch(jsonb),
    billing.reserve(text, text, bigint, text, interval, jsonb),
    billing.settle(bigint, bigint, text),
    billing.release(bigint),
    billing.account(text, text, jsonb),
    billing.receive_webhook(text, jsonb, text)
    TO billing_app;
GRANT EXECUTE ON FUNCTION
    billing.define_unit(text, text),
    billing.define_meter(text, text, numeric, text),
    billing.set_floor(text, text, bigint),
    billing.sweep(integer),
    billing.define_webhook_endpoint(text, text, text, integer, text, text, bigint),
    billing.rotate_webhook_secret(text, text, interval),
    billing.register_webhook_handler(text, regprocedure, text),
    billing.grant_tenant(text, name),
    billing.revoke_tenant(text, name)
    TO billing_admin;
