-- Balance alerts: named rules on a pool (billing.set_alert). A debit that
-- leaves the pool below an armed rule fires it: one row in billing.alerts, in
-- the debit's own transaction (a rolled-back debit fires nothing), announced
-- with NOTIFY billing_alert (the alert's id). The rule is then disarmed until
-- a credit brings the pool back (billing.pool_alerts), so it fires once per
-- crossing. An application or a pg_cron job reads billing.alerts and
-- acknowledges them (billing.ack_alert). Tables in sql/schema.sql.

-- Whether a rule's condition holds for a pool with `available` and `debt`.
CREATE FUNCTION billing.alert_crossed(kind text, threshold bigint, available bigint, debt bigint) RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog
AS $$
    SELECT CASE kind WHEN 'debt' THEN debt > 0 ELSE available < threshold END
$$;

-- The one place that keeps a pool's alert bounds: the highest threshold of
-- its armed rules (a debit below it may fire one) and the lowest of its
-- disarmed ones (a credit reaching it may re-arm one).
CREATE FUNCTION billing.arm_alerts(pool bigint) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
#variable_conflict use_column
BEGIN
    UPDATE billing.pools p SET alert_below = b.below, alert_above = b.above
    FROM (SELECT max(r.threshold) FILTER (WHERE r.armed) AS below,
                 min(r.threshold) FILTER (WHERE NOT r.armed) AS above
          FROM billing.alert_rules r WHERE r.pool_id = pool) b
    WHERE p.id = pool AND (p.alert_below, p.alert_above) IS DISTINCT FROM (b.below, b.above);
END
$$;

-- Called by the ledger, in the change's transaction and under its pool lock,
-- when a debit leaves `available` below the pool's alert_below, or a credit
-- brings it to alert_above or more (`debt`: the pool's after the change): fire the armed rules now crossed, re-arm
-- the disarmed ones no longer crossed. Returns how many alerts fired.
CREATE FUNCTION billing.pool_alerts(pool bigint, available bigint, debt bigint) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    r billing.alert_rules;
    fired integer := 0;
    alert bigint;
BEGIN
    FOR r IN SELECT * FROM billing.alert_rules x WHERE x.pool_id = pool ORDER BY x.id FOR UPDATE LOOP
        IF r.armed AND billing.alert_crossed(r.kind, r.threshold, available, debt) THEN
            INSERT INTO billing.alerts (tenant_id, account, unit, rule_id, name, kind, threshold, available, debt)
            VALUES (r.tenant_id, r.account, r.unit, r.id, r.name, r.kind, r.threshold, available, debt)
            RETURNING id INTO alert;
            UPDATE billing.alert_rules x SET armed = false WHERE x.id = r.id;
            -- any role may LISTEN: the payload is the id alone
            PERFORM pg_notify('billing_alert', alert::text);
            fired := fired + 1;
        ELSIF NOT r.armed AND NOT billing.alert_crossed(r.kind, r.threshold, available, debt) THEN
            UPDATE billing.alert_rules x SET armed = true WHERE x.id = r.id;
        END IF;
    END LOOP;
    PERFORM billing.arm_alerts(pool);
    RETURN fired;
END
$$;

-- Set (or replace) a named alert on an account's pool: `low_balance` below
-- `threshold`, `zero` at or below 0, `debt` when the account owes. A new or
-- replaced rule is armed: the next debit that leaves the pool in its
-- condition fires it.
CREATE FUNCTION billing.set_alert(account text, unit text, name text, kind text, threshold bigint DEFAULT NULL)
RETURNS SETOF billing.alert_rules
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
    pool bigint;
    bound bigint;
BEGIN
    IF account IS NULL OR unit IS NULL OR name IS NULL OR kind IS NULL THEN
        RAISE EXCEPTION 'account, unit, name and kind may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF name !~ '^[A-Za-z0-9_.:-]{1,63}$' THEN
        RAISE EXCEPTION 'invalid alert name %: letters, digits and _ . : -, at most 63', name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    bound := CASE kind WHEN 'low_balance' THEN threshold WHEN 'zero' THEN 1 WHEN 'debt' THEN 0 END;
    IF kind NOT IN ('low_balance', 'zero', 'debt') THEN
        RAISE EXCEPTION '"%" is not one of low_balance, zero, debt', kind USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (kind = 'low_balance') <> (threshold IS NOT NULL) THEN
        RAISE EXCEPTION 'a low_balance alert needs a threshold, and only it takes one'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    pool := billing.unsplit_pool(account, unit);
    INSERT INTO billing.alert_rules AS r (tenant_id, account, unit, pool_id, name, kind, threshold)
    VALUES (tenant, set_alert.account, set_alert.unit, pool, set_alert.name, set_alert.kind, bound)
    ON CONFLICT ON CONSTRAINT alert_rules_tenant_id_account_unit_name_key
    DO UPDATE SET kind = EXCLUDED.kind, threshold = EXCLUDED.threshold, armed = true;
    PERFORM billing.arm_alerts(pool);
    RETURN QUERY SELECT * FROM billing.alert_rules r
                 WHERE r.tenant_id = tenant AND r.account = set_alert.account AND r.unit = set_alert.unit
                   AND r.name = set_alert.name;
END
$$;

-- Remove a named alert (its fired alerts go with it).
CREATE FUNCTION billing.remove_alert(account text, unit text, name text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE pool bigint;
BEGIN
    IF account IS NULL OR unit IS NULL OR name IS NULL THEN
        RAISE EXCEPTION 'account, unit and name may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    DELETE FROM billing.alert_rules r
    WHERE r.tenant_id = billing.current_tenant() AND r.account = remove_alert.account
      AND r.unit = remove_alert.unit AND r.name = remove_alert.name
    RETURNING r.pool_id INTO pool;
    IF pool IS NULL THEN
        RETURN false;
    END IF;
    PERFORM billing.arm_alerts(pool);
    RETURN true;
END
$$;

-- Acknowledge an alert (once; acknowledging again keeps the first).
CREATE FUNCTION billing.ack_alert(alert bigint, by_whom text DEFAULT NULL) RETURNS SETOF billing.alerts
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
BEGIN
    IF alert IS NULL THEN
        RAISE EXCEPTION 'alert may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    UPDATE billing.alerts a SET acknowledged_at = now(),
        acknowledged_by = coalesce(by_whom, session_user::text)
    WHERE a.id = alert AND a.tenant_id = billing.current_tenant() AND a.acknowledged_at IS NULL;
    RETURN QUERY SELECT * FROM billing.alerts a WHERE a.id = alert AND a.tenant_id = billing.current_tenant();
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no alert %', alert USING ERRCODE = 'undefined_object';
    END IF;
END
$$;
