-- Writes router/functions.sql: the router's billing.* functions, with the
-- signatures of the pg_billing installed in the database it runs in.
--   psql -X -At -v ON_ERROR_STOP=1 -d <a database with pg_billing> -f router/generate.sql > router/functions.sql
-- Every function an application role may call is listed in `routes` with
-- where its calls run; one that is not is an error here, so a new function
-- cannot be forgotten by the router.
\set ON_ERROR_STOP 1
\set QUIET 1
\pset footer off
SET client_min_messages = warning;

-- route: where a call runs (below); combine: how the router makes one
-- answer of the rows its shards return, a query over %s (the PL/Proxy call,
-- aliased r); none: every row, as it comes.
CREATE TEMP TABLE routes (name text PRIMARY KEY, route text NOT NULL, combine text);
INSERT INTO routes VALUES
    -- one account's: the partition of (tenant, the named argument)
    ('account', 'account:account'), ('grant', 'account:account'), ('check', 'account:account'),
    ('balance', 'account:account'), ('ingest', 'account:account'), ('reserve', 'account:account'),
    ('limits_status', 'account:account'), ('usage', 'account:account'), ('usage_log', 'account:account'),
    ('invoice_preview', 'account:account'), ('simulate_price', 'account:account'),
    ('set_allowance', 'account:account'), ('end_allowance', 'account:account'),
    ('set_limit', 'account:account'), ('remove_limit', 'account:account'),
    ('set_reload', 'account:account'), ('disable_reload', 'account:account'), ('resume_reload', 'account:account'),
    ('open_checkout', 'account:account'), ('set_alert', 'account:account'), ('remove_alert', 'account:account'),
    ('set_floor', 'account:account'), ('set_lanes', 'account:account'), ('set_seats', 'account:account'),
    ('mark_reported', 'account:account'),
    -- an object named by id: the shard that holds it (another shard raises the
    -- extension's own "unknown" error when none does)
    ('approve_grant', 'object:grant'), ('reject_grant', 'object:grant'), ('void_grant', 'object:grant'),
    ('revoke_unused', 'object:grant'), ('suspend_grant', 'object:grant'), ('resume_grant', 'object:grant'),
    ('reverse_grant', 'object:grant'), ('settle', 'object:hold'), ('release', 'object:hold'),
    ('checkout_status', 'object:checkout'), ('attach_checkout', 'object:checkout'),
    ('confirm_checkout', 'object:checkout'), ('fail_checkout', 'object:checkout'),
    ('complete_reload', 'object:reload'), ('fail_reload', 'object:reload'),
    ('ack_alert', 'object:alert'), ('ack_seat_push', 'object:seat_push'),
    -- pure, or reads of the catalogue every shard holds: any one shard
    ('price_lines', 'any'), ('price_total', 'any'), ('quote', 'any'), ('verify_webhook', 'any'),
    ('allowance_periods', 'any'), ('subscription_access', 'any'), ('current_tenant', 'any'),
    ('currency_exponent', 'any'), ('grant_state', 'any'),
    -- catalogue changes: every shard (idempotent: after a failure, run again)
    ('define_unit', 'all'), ('define_meter', 'all'), ('set_price', 'all'), ('disable_meter', 'all'),
    ('enable_meter', 'all'), ('define_webhook_endpoint', 'all'), ('map_webhook_currency', 'all'),
    ('rotate_webhook_secret', 'all'), ('register_webhook_handler', 'all'), ('grant_tenant', 'all'),
    ('revoke_tenant', 'all'), ('define_plan', 'all'), ('retire_plan', 'all'), ('set_topup_fee', 'all'),
    ('set_topup_limits', 'all'), ('set_grant_policy', 'all'), ('remove_grant_policy', 'all'),
    -- a tenant's rows on every shard, gathered
    ('verify_ledger', 'gather'), ('grant_entry_totals', 'gather'), ('usage_to_report', 'gather'),
    ('claim_reloads', 'gather');
INSERT INTO routes VALUES
    -- every shard's part of one figure
    ('metrics', 'gather', 'SELECT metric, tenant, label, sum(value)::bigint FROM %s GROUP BY 1, 2, 3 ORDER BY 1, 2, 3'),
    ('run_periodic', 'gather', 'SELECT task, sum(done)::bigint FROM %s GROUP BY task ORDER BY task'),
    ('sweep', 'gather', 'SELECT sum(r)::bigint FROM %s'),
    ('purge_webhook_events', 'gather', 'SELECT sum(r)::bigint FROM %s'),
    ('set_default_plan', 'all',
     'SELECT plan_id, plan_key, version, sum(accounts)::integer, min(status) FROM %s GROUP BY 1, 2, 3'),
    -- a key the provider has and no shard has is missing here; one a shard
    -- has and the provider has not is missing there
    ('reconcile_usage', 'gather',
     'SELECT key, missing, account, meter, occurred_at, cost FROM %s GROUP BY 1, 2, 3, 4, 5, 6 '
     'HAVING missing = ''there'' OR count(*) = billing_router.shard_count() ORDER BY 1, 2'),
    -- a payment is not credited when no shard credited it; its other
    -- problems come from the shard of the account it credited
    ('reconcile_payments', 'gather',
     'SELECT payment, account, problem, provider_paid, provider_refunded, credited, refunded_here FROM %s '
     'GROUP BY 1, 2, 3, 4, 5, 6, 7 HAVING problem <> ''not_credited'' OR count(*) = billing_router.shard_count() '
     'ORDER BY 1, 3');
INSERT INTO routes VALUES
    -- a webhook delivery: the shard of the account its verified payload names
    ('receive_webhook', 'webhook'),
    -- a provider's subscription or invoice: the shard of the account it names
    -- or whose customer or subscription it is
    ('sync_subscription', 'payload'), ('sync_invoice', 'payload'),
    -- two accounts: only when they are on one shard
    ('convert_guest', 'pair'),
    -- events of many accounts: written by hand in router/router.sql
    ('ingest_batch', 'batch'),
    -- not offered by the router (README, "Sharding"): a trigger on the
    -- application's own table; a lock held for the caller's transaction,
    -- which a routed call does not share; a tenant-wide sum of usage; a
    -- function of a grant's row, which only its shard has
    ('count_seats', 'none'), ('lock_seats', 'none'), ('audit_costs', 'none'),
    ('grant_remaining', 'none');

CREATE TEMP VIEW surface AS
SELECT p.oid, p.proname::text AS name, p.proretset, p.prorettype, p.provolatile, p.pronargs,
       pg_get_function_arguments(p.oid) AS args,
       -- types only: the PL/Proxy function names its arguments $n, as names
       -- such as "from" would be taken for argument references in its SELECT
       -- (a function named by regprocedure does not exist on the router: it
       -- is passed as text and resolved on the shard)
       (SELECT string_agg(CASE WHEN t = 'regprocedure'::regtype THEN 'text' ELSE format_type(t, NULL) END,
                          ', ' ORDER BY i)
        FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a(t, i)) AS arg_types,
       (SELECT string_agg('$' || (i + 1) || CASE WHEN t = 'regprocedure'::regtype THEN '::regprocedure' ELSE '' END,
                          ', ' ORDER BY i)
        FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a(t, i)) AS remote_args,
       pg_get_function_result(p.oid) AS result, p.proargnames, p.proargmodes,
       -- a SQL function PostgreSQL may inline into the calling query
       p.prolang = (SELECT oid FROM pg_language WHERE lanname = 'sql') AND NOT p.prosecdef
           AND p.proconfig IS NULL AS inlinable
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace AND n.nspname = 'billing'
JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
WHERE p.prokind = 'f'
  AND (has_function_privilege('billing_reader', p.oid, 'EXECUTE')
       OR has_function_privilege('billing_support', p.oid, 'EXECUTE')
       OR has_function_privilege('billing_admin', p.oid, 'EXECUTE'));

DO $$
DECLARE
    missing text;
    stale text;
BEGIN
    SELECT string_agg(s.name, ', ' ORDER BY s.name) INTO missing
    FROM surface s WHERE NOT EXISTS (SELECT 1 FROM routes r WHERE r.name = s.name);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'functions with no route: %', missing USING HINT = 'Add them to routes in router/generate.sql.';
    END IF;
    SELECT string_agg(r.name, ', ' ORDER BY r.name) INTO stale
    FROM routes r WHERE NOT EXISTS (SELECT 1 FROM surface s WHERE s.name = r.name);
    IF stale IS NOT NULL THEN
        RAISE EXCEPTION 'routes for functions that do not exist: %', stale;
    END IF;
END
$$;

SELECT format(E'-- Generated by router/generate.sql from pg_billing %s: do not edit.\n'
              '-- Load after router/router.sql; bin/router-test fails when this file is stale.\n', extversion)
FROM pg_extension WHERE extname = 'pg_billing';

-- The types of pg_billing's results the router needs too.
SELECT format(E'CREATE TYPE %s AS ENUM (%s);\n', t.oid::regtype,
              string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder))
FROM pg_type t
JOIN pg_namespace n ON n.oid = t.typnamespace AND n.nspname = 'billing'
JOIN pg_enum e ON e.enumtypid = t.oid
GROUP BY t.oid ORDER BY t.oid::regtype::text;
SELECT format(E'CREATE TYPE %s AS (%s);\n', t.oid::regtype,
              string_agg(format('%I %s', a.attname, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY a.attnum))
FROM pg_type t
JOIN pg_namespace n ON n.oid = t.typnamespace AND n.nspname = 'billing'
JOIN pg_attribute a ON a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
-- (a table's row type too: here it is a type of its own)
WHERE t.typtype = 'c' AND t.oid IN (SELECT prorettype FROM surface s JOIN routes r USING (name) WHERE r.route <> 'none')
GROUP BY t.oid ORDER BY t.oid::regtype::text;

-- For each routed function: billing_router.<name>(router_tenant, args...),
-- the PL/Proxy function that runs it on its shard(s) as the caller, setting
-- the caller's tenant first; and billing.<name>(args...) with pg_billing's
-- own signature, which passes the session's tenant to it.
WITH f AS (
    SELECT s.*, r.route, r.combine,
           split_part(r.route, ':', 1) AS kind, split_part(r.route, ':', 2) AS target,
           -- $2..$n+1: the arguments after router_tenant
           (SELECT string_agg('$' || i, ', ' ORDER BY i) FROM generate_series(1, s.pronargs) i) AS local_args,
           CASE WHEN s.result LIKE 'TABLE(%' OR s.result LIKE 'SETOF %' THEN s.result
                ELSE 'SETOF ' || s.result END AS set_result
    FROM surface s JOIN routes r USING (name)
    WHERE r.route NOT IN ('batch', 'none')
), placed AS (
    SELECT f.*,
           CASE f.kind
               WHEN 'account' THEN format('billing_router.partition_of($1, $%s)',
                                          array_position(f.proargnames, f.target) + 1)
               WHEN 'object' THEN format('billing_router.partition_of_object($1, %L, $2)', f.target)
               WHEN 'webhook' THEN 'billing_router.partition_of_delivery($1, $2, $3, $4)'
               WHEN 'payload' THEN 'billing_router.partition_of_payload($1, $2, $4)'
               WHEN 'pair' THEN 'billing_router.partition_of_pair($1, $2, $3)'
               WHEN 'any' THEN 'ANY'
               ELSE 'ALL' END AS run_on
    FROM f
)
-- The shard sets the caller's tenant before the call starts: as an argument's
-- initplan (evaluated before the function runs), or, for a function with no
-- argument or one PostgreSQL could inline, as a FROM item the call depends on
-- laterally.
SELECT format(E'CREATE FUNCTION billing_router.%I(text%s) RETURNS %s\n'
              'LANGUAGE plproxy AS $f$\n'
              '    CLUSTER ''billing'';\n'
              '    RUN ON %s;\n'
              '    %s\n'
              '$f$;\n'
              'CREATE FUNCTION billing.%I(%s) RETURNS %s\n'
              'LANGUAGE sql %s AS $f$\n'
              '    %s\n'
              '$f$;\n',
              p.name, CASE WHEN p.pronargs > 0 THEN ', ' || p.arg_types ELSE '' END, p.set_result,
              p.run_on,
              CASE WHEN p.pronargs = 0 OR p.inlinable
                   THEN format(E'SELECT pgb_r.* FROM billing_router.within($1) pgb_w,\n'
                               '        LATERAL (SELECT * FROM billing.%I(%s) WHERE pgb_w OFFSET 0) pgb_r;',
                               p.name, coalesce(p.remote_args, ''))
                   ELSE format('SELECT pgb_r.* FROM billing.%I((SELECT billing_router.within_arg($1, $2))%s) pgb_r;',
                               p.name, regexp_replace(p.remote_args, '^\$2', '')) END,
              p.name, replace(p.args, ' regprocedure', ' text'), p.result,
              CASE p.provolatile WHEN 'i' THEN 'STABLE' WHEN 's' THEN 'STABLE' ELSE 'VOLATILE' END,
              format(coalesce(p.combine, CASE WHEN p.kind = 'all' AND NOT p.proretset THEN 'SELECT * FROM %s LIMIT 1'
                                              ELSE 'SELECT * FROM %s' END),
                     format('billing_router.%I(billing_router.tenant()%s) AS r', p.name,
                            CASE WHEN p.pronargs > 0 THEN ', ' || p.local_args ELSE '' END)))
FROM placed p
ORDER BY p.name, p.arg_types;

-- Who may call: the calls run on the shards as the calling role, where
-- pg_billing decides what each role may do.
SELECT E'REVOKE ALL ON ALL FUNCTIONS IN SCHEMA billing, billing_router, plproxy FROM PUBLIC;\n'
       'GRANT USAGE ON SCHEMA billing, billing_router, plproxy TO billing_reader, billing_support;\n'
       'GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA billing, billing_router, plproxy TO billing_reader, billing_support;';
