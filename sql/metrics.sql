-- Counters an operator graphs (billing.metrics), one row per metric, tenant
-- and label, cheap enough to scrape every few seconds with a custom query of
-- postgres_exporter. Open work (alerts, holds, approvals, checkouts, reload
-- requests) is counted from small or partially indexed sets; pools in debt
-- and the debt owed scan the pools (one pass, no lock); usage events and
-- ledger entries written come from PostgreSQL's own table statistics (all
-- tenants, since the statistics were last reset). Webhook deliveries are
-- counted as kept: rejected ones are a bounded sample. Usage events answered
-- (applied, duplicate, rejected) are counted in shared memory when pg_billing
-- is preloaded (src/metrics.rs).
CREATE FUNCTION billing.metrics()
RETURNS TABLE (metric text, tenant text, label text, value bigint)
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
    SELECT 'usage_events_written', NULL, NULL, s.n_tup_ins
    FROM pg_catalog.pg_stat_user_tables s WHERE s.relid = 'billing.usage_events'::regclass
    UNION ALL
    SELECT 'ledger_entries_written', NULL, NULL, s.n_tup_ins
    FROM pg_catalog.pg_stat_user_tables s WHERE s.relid = 'billing.ledger_entries'::regclass
    UNION ALL
    SELECT 'usage_events_answered', NULL, a.outcome, a.events FROM billing.usage_answers() a
    UNION ALL
    SELECT 'webhook_deliveries', w.tenant_id, w.status, count(*) FROM billing.webhook_events w GROUP BY 2, 3
    UNION ALL
    SELECT 'reload_requests', r.tenant_id, r.status, count(*) FROM billing.reload_requests r GROUP BY 2, 3
    UNION ALL
    SELECT 'alerts_open', a.tenant_id, a.kind, count(*) FROM billing.alerts a
    WHERE a.acknowledged_at IS NULL GROUP BY 2, 3
    UNION ALL
    SELECT 'accounts_in_debt', p.tenant_id, p.unit, count(DISTINCT p.account) FROM billing.pools p
    WHERE p.debt > 0 GROUP BY 2, 3
    UNION ALL
    SELECT 'debt_owed', p.tenant_id, p.unit, sum(p.debt)::bigint FROM billing.pools p
    WHERE p.debt > 0 GROUP BY 2, 3
    UNION ALL
    SELECT 'holds_open', h.tenant_id, h.unit, count(*) FROM billing.holds h
    WHERE h.status = 'open' GROUP BY 2, 3
    UNION ALL
    SELECT 'grant_approvals_pending', g.tenant_id, g.unit, count(*) FROM billing.grant_approvals g
    WHERE g.status = 'pending' GROUP BY 2, 3
    UNION ALL
    SELECT 'checkouts_pending', c.tenant_id, c.unit, count(*) FROM billing.checkout_intents c
    WHERE c.status = 'pending' GROUP BY 2, 3
    ORDER BY 1, 2, 3
$$;
