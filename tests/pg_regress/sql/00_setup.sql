-- Installs the extension for the scenarios that follow (they share one database).
CREATE EXTENSION pg_billing;
SELECT extname, extrelocatable, nspname
FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE extname = 'pg_billing';
-- every billing table has row-level security enabled and forced
SELECT relname, relrowsecurity, relforcerowsecurity
FROM pg_class WHERE relnamespace = 'billing'::regnamespace AND relkind = 'r' ORDER BY relname;
