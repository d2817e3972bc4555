-- Tenancy and privileges, applied last, over every table and function.
--
-- Three roles (created if missing; roles are cluster-wide and outlive the
-- extension):
--   billing_reader  reads balances, usage and the ledger of its tenants
--   billing_app     also moves money and records usage for its tenants
--   billing_admin   also configures units, meters, floors, webhooks and
--                   tenants, and may act for any tenant
--   billing_support reads like billing_reader and grants credit by hand
--                   (manual, promo) under the tenant's grant policy, and
--                   approves or rejects such grants
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
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'billing_support') THEN
        CREATE ROLE billing_support NOLOGIN;
    END IF;
END
$$;
GRANT billing_reader TO billing_app;
GRANT billing_reader TO billing_support;
GRANT billing_app TO billing_admin;
GRANT USAGE ON SCHEMA billing TO billing_reader;

-- Secrets stay unreadable: other roles may read every column of
-- webhook_endpoints but the two secrets (column privileges below). This view
-- shows an endpoint's settings with the currencies it credits. Like every
-- view, it runs with the caller's rights, so row-level security filters the
-- rows before any function in the caller's WHERE clause sees them.
CREATE VIEW billing.webhook_endpoint_settings WITH (security_invoker = true, security_barrier = true) AS
SELECT e.name, e.scheme, e.tolerance_seconds, e.signature_header,
       (SELECT jsonb_object_agg(c.currency, jsonb_build_object('unit', c.unit,
                                 'credits_per_minor_unit', c.credits_per_minor_unit))
        FROM billing.webhook_currencies c WHERE c.endpoint_id = e.id) AS currencies,
       coalesce(e.previous_secret_expires_at > now(), false) AS rotating, e.created_at
FROM billing.webhook_endpoints e;

-- Row-level security, enabled and forced on every table. current_tenant()
-- raises for a tenant the role was not granted, so a forged setting reads
-- nothing; it is evaluated once per statement.
DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['accounts', 'units', 'meters', 'pools', 'grants', 'usage_events', 'holds', 'meter_prices',
                             'meter_periods', 'meter_uniques', 'usage_counters', 'allowances',
                             'limits', 'limit_usage', 'guest_conversions',
                             'usage_reports', 'limit_holds',
                             'ledger_entries', 'webhook_endpoints', 'webhook_currencies', 'webhook_events',
                             'webhook_objects', 'webhook_handlers', 'stripe_reversals', 'plans', 'plan_keys', 'plan_prices',
                             'provider_customers', 'subscriptions', 'subscription_conflicts',
                             'subscription_allowances', 'subscription_invoices', 'seats', 'seat_pushes',
                             'subscription_changes', 'invoice_payments', 'default_plans',
                             'topup_fees', 'topup_limits', 'reload_rules', 'reload_requests',
                             'checkout_intents', 'alert_rules', 'alerts', 'grant_policies',
                             'granted_per_day', 'grant_approvals'] LOOP
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
                billing.usage_events, billing.holds, billing.meter_prices, billing.meter_periods,
                billing.meter_uniques, billing.usage_counters, billing.allowances,
                billing.limits, billing.limit_usage, billing.guest_conversions, billing.usage_reports, billing.limit_holds,
                billing.ledger_entries,
                billing.webhook_events,
                billing.webhook_currencies, billing.webhook_objects, billing.webhook_handlers,
                billing.stripe_reversals, billing.grant_balances, billing.ledger, billing.hourly_usage,
                billing.webhook_endpoint_settings,
                billing.plans, billing.plan_keys, billing.plan_prices, billing.provider_customers, billing.subscriptions,
                billing.subscription_conflicts, billing.subscription_allowances, billing.subscription_invoices,
                billing.seats, billing.seat_pushes, billing.subscription_status, billing.subscription_changes, billing.invoice_payments,
                billing.subscription_drift, billing.default_plans, billing.topup_fees, billing.topup_limits,
                billing.reload_rules, billing.reload_requests, billing.checkout_intents,
                billing.alert_rules, billing.alerts, billing.grant_policies, billing.granted_per_day,
                billing.grant_approvals
    TO billing_reader;
GRANT SELECT (id, tenant_id, name, scheme, previous_secret_expires_at, tolerance_seconds, signature_header,
              created_at)
    ON billing.webhook_endpoints TO billing_reader;
GRANT SELECT ON billing.tenant_roles TO billing_admin;
-- The plain-INSERT interface of the webhook inbox: these three columns only.
GRANT INSERT (endpoint, headers, body) ON billing.webhook_events TO billing_app;

-- ----- tenants ---------------------------------------------------------------

-- Checks a change of tenant grants and returns the role: the tenant must be
-- a valid name and the role an existing role named exactly `role` (no case
-- folding). Grants of roles that were dropped grant nothing already (roles are
-- kept by OID); each change of tenant grants also removes them.
CREATE FUNCTION billing.tenant_grant_role(tenant text, role name) RETURNS regrole
LANGUAGE plpgsql
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE id oid;
BEGIN
    IF tenant IS NULL OR role IS NULL THEN
        RAISE EXCEPTION 'tenant and role must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF tenant !~ '^[A-Za-z0-9_.:-]{1,63}$' THEN
        RAISE EXCEPTION 'invalid tenant "%"', left(tenant, 80) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT r.oid INTO id FROM pg_catalog.pg_roles r WHERE r.rolname = role;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown role "%"', role USING ERRCODE = 'undefined_object';
    END IF;
    DELETE FROM billing.tenant_roles r WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles x WHERE x.oid = r.role_id);
    RETURN id::regrole;
END
$$;

CREATE FUNCTION billing.grant_tenant(tenant text, role name) RETURNS void
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
    INSERT INTO billing.tenant_roles (tenant_id, role_id) VALUES (tenant, billing.tenant_grant_role(tenant, role))
    ON CONFLICT DO NOTHING
$$;

CREATE FUNCTION billing.revoke_tenant(tenant text, role name) RETURNS boolean
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
    WITH r AS (SELECT billing.tenant_grant_role(tenant, role) AS id),
         d AS (DELETE FROM billing.tenant_roles t USING r WHERE t.tenant_id = tenant AND t.role_id = r.id RETURNING 1)
    SELECT count(*) > 0 FROM d
$$;

-- ----- who may call what -----------------------------------------------------

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA billing FROM PUBLIC;
-- needed by every querying role: row-level security calls it
GRANT EXECUTE ON FUNCTION billing.current_tenant(), billing.currency_exponent(text),
    billing.grant_state(text, bigint, timestamptz, timestamptz, timestamptz) TO PUBLIC;
GRANT EXECUTE ON FUNCTION
    billing."check"(text, text, bigint, text, text),
    billing.limits_status(text, text, text),
    billing.balance(text, text, timestamptz),
    billing.usage(text, text, timestamptz, timestamptz, text, text[], text),
    billing.usage_log(text, text, bigint, integer),
    billing.invoice_preview(text, timestamptz, boolean),
    billing.simulate_price(text, text, jsonb, timestamptz),
    billing.usage_to_report(timestamptz, text, integer),
    billing.price_lines(jsonb, numeric),
    billing.price_total(jsonb, numeric),
    billing.verify_ledger(),
    billing.grant_entry_totals(bigint[]),
    billing.grant_remaining(billing.grants),
    billing.quote(bigint, text, text, boolean),
    billing.checkout_status(bigint),
    billing.reconcile_usage(text[], timestamptz, timestamptz, text, text),
    billing.reconcile_payments(jsonb, bigint),
    billing.verify_webhook(text, text, jsonb, text, text, integer, text),
    billing.allowance_periods(timestamptz, timestamptz),
    billing.subscription_access(text, boolean)
    TO billing_reader;
GRANT EXECUTE ON FUNCTION
    billing."grant"(text, text, bigint, text, integer, timestamptz, timestamptz, text, jsonb, text),
    billing.approve_grant(bigint),
    billing.reject_grant(bigint, text),
    billing.audit_costs(jsonb, numeric, bigint),
    billing.void_grant(bigint),
    billing.revoke_unused(bigint),
    billing.suspend_grant(bigint),
    billing.resume_grant(bigint),
    billing.reverse_grant(bigint, bigint),
    billing.ingest(text, text, numeric, text, timestamptz, jsonb, bigint, boolean),
    billing.ingest_batch(jsonb),
    billing.reserve(text, text, bigint, text, interval, jsonb),
    billing.settle(bigint, bigint, text, text, numeric, jsonb),
    billing.release(bigint),
    billing.account(text, text, jsonb),
    billing.receive_webhook(text, jsonb, text),
    billing.sync_subscription(jsonb, timestamptz, text, text),
    billing.sync_invoice(jsonb, timestamptz, text),
    billing.lock_seats(text),
    billing.set_seats(text, integer),
    billing.ack_seat_push(bigint, integer),
    billing.count_seats(),
    billing.set_allowance(text, text, bigint, text, text, integer, integer, timestamptz),
    billing.end_allowance(text, text),
    billing.set_limit(text, text, text, bigint, text, text, boolean),
    billing.remove_limit(text, text, text),
    billing.convert_guest(text, text),
    billing.mark_reported(text, text, timestamptz, numeric, text, boolean),
    billing.set_reload(text, text, bigint, text, text, bigint, bigint, bigint, bigint, interval, integer,
                       boolean, boolean, bigint, integer),
    billing.disable_reload(text, text),
    billing.resume_reload(text, text),
    billing.claim_reloads(text, interval, integer),
    billing.complete_reload(bigint, text, bigint, text),
    billing.fail_reload(bigint, text, boolean, text),
    billing.open_checkout(text, text, bigint, text, text, text, interval, boolean, bigint),
    billing.attach_checkout(bigint, text),
    billing.confirm_checkout(bigint, text, bigint, text),
    billing.fail_checkout(bigint, text),
    billing.set_alert(text, text, text, text, bigint),
    billing.remove_alert(text, text, text),
    billing.ack_alert(bigint, text)
    TO billing_app;
GRANT EXECUTE ON FUNCTION
    billing.define_unit(text, text),
    billing.define_meter(text, text, numeric, text, text, text, text[], jsonb, interval, text, interval, jsonb),
    billing.set_price(text, jsonb, timestamptz),
    billing.disable_meter(text),
    billing.enable_meter(text),
    billing.set_floor(text, text, bigint),
    billing.set_lanes(text, text, integer),
    billing.sweep(integer),
    billing.define_webhook_endpoint(text, text, text, integer, text, text, bigint, text),
    billing.map_webhook_currency(text, text, text, integer, bigint),
    billing.purge_webhook_events(interval, boolean),
    billing.rotate_webhook_secret(text, text, interval),
    billing.register_webhook_handler(text, regprocedure, text),
    billing.grant_tenant(text, name),
    billing.revoke_tenant(text, name),
    billing.define_plan(text, jsonb, jsonb, text, integer, bigint, integer),
    billing.run_periodic(integer),
    billing.retire_plan(text),
    billing.set_default_plan(text),
    billing.set_topup_fee(text, text, numeric, bigint),
    billing.set_topup_limits(text, bigint, bigint, numeric),
    billing.set_grant_policy(text, bigint, bigint, bigint, text),
    billing.remove_grant_policy(text),
    billing.metrics()
    TO billing_admin;
-- an operator's monitoring role (postgres_exporter's) reads the counters of every tenant
GRANT EXECUTE ON FUNCTION billing.metrics() TO pg_monitor;
GRANT EXECUTE ON FUNCTION
    billing."grant"(text, text, bigint, text, integer, timestamptz, timestamptz, text, jsonb, text),
    billing.approve_grant(bigint),
    billing.reject_grant(bigint, text)
    TO billing_support;
