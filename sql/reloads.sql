-- Auto-reload: a rule per pool (billing.set_reload), a request written by the
-- debit that takes the pool below the rule's threshold, in the debit's own
-- transaction (billing.request_reload, called by the ledger), announced on
-- the channel billing_reload with NOTIFY, and an application worker that
-- claims requests, charges the card for the request's quote and completes or
-- fails them. A rolled-back debit leaves no request and sends no
-- notification (both are transactional). Tables in sql/schema.sql.

-- Whether a pool's threshold is armed: its rule is active and it has no open
-- request. The one place that sets pools.reload_below; everything that
-- changes a rule or a request calls it.
CREATE FUNCTION billing.arm_reload(pool bigint) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
#variable_conflict use_column
BEGIN
    UPDATE billing.pools p SET reload_below = a.threshold
    FROM (SELECT (SELECT r.threshold FROM billing.reload_rules r
                  WHERE r.pool_id = pool AND r.status = 'active'
                    AND NOT EXISTS (SELECT 1 FROM billing.reload_requests q
                                    WHERE q.pool_id = pool AND q.status IN ('pending', 'claimed')))
                 AS threshold) a
    WHERE p.id = pool AND p.reload_below IS DISTINCT FROM a.threshold;
END
$$;

-- Set (or replace) the auto-reload rule of an account's pool: when a debit
-- leaves available below `threshold`, ask for `reload_amount`, or for enough
-- to bring available back to `reload_to` (exactly one of the two), clamped to
-- [min_amount, max_amount], in whole minor units of `currency` (a minor unit
-- buys `credits_per_minor_unit` credits), charged to a `card_kind` card with
-- the fee on top (billing.quote); at most one request per `min_interval` and
-- `max_per_day` per 24 hours, only while the account has a live
-- subscription if `requires_subscription`; suspended after `max_failures`
-- consecutive failed charges. Setting a rule makes it active again.
CREATE FUNCTION billing.set_reload(
    account text, unit text, threshold bigint, currency text, card_kind text,
    reload_to bigint DEFAULT NULL, reload_amount bigint DEFAULT NULL,
    min_amount bigint DEFAULT 1, max_amount bigint DEFAULT NULL,
    min_interval interval DEFAULT '0', max_per_day integer DEFAULT 10,
    requires_subscription boolean DEFAULT false, converted boolean DEFAULT false,
    credits_per_minor_unit bigint DEFAULT 1, max_failures integer DEFAULT 3)
RETURNS SETOF billing.reload_rules
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
    pool bigint;
    smallest bigint;
BEGIN
    IF threshold IS NULL OR currency IS NULL OR card_kind IS NULL OR min_amount IS NULL
       OR min_interval IS NULL OR max_per_day IS NULL OR requires_subscription IS NULL
       OR converted IS NULL OR credits_per_minor_unit IS NULL OR max_failures IS NULL THEN
        RAISE EXCEPTION 'threshold, currency, card_kind and the settings may not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF (reload_to IS NULL) = (reload_amount IS NULL) THEN
        RAISE EXCEPTION 'give exactly one of reload_to and reload_amount'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF reload_to IS NOT NULL AND reload_to <= threshold THEN
        RAISE EXCEPTION 'reload_to (%) must be above the threshold (%)', reload_to, threshold
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF reload_amount <= 0 OR min_amount <= 0 OR max_amount < min_amount OR min_interval < '0'
       OR max_per_day <= 0 OR credits_per_minor_unit <= 0 OR max_failures <= 0 THEN
        RAISE EXCEPTION 'amounts, max_per_day, credits_per_minor_unit and max_failures must be positive, max_amount at least min_amount, min_interval not negative'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    pool := billing.unsplit_pool(account, unit);
    -- the smallest charge the rule can ask for must be quotable now (fee set,
    -- within the currency's top-up limits): refused here, not at the first debit
    -- (a fixed amount, or what the first crossing below the threshold asks)
    smallest := greatest(min_amount, coalesce(reload_amount, reload_to - threshold + 1));
    smallest := least(smallest, coalesce(max_amount, smallest));
    PERFORM billing.quote((smallest + credits_per_minor_unit - 1) / credits_per_minor_unit,
                          currency, card_kind, converted);
    INSERT INTO billing.reload_rules AS r (tenant_id, account, unit, pool_id, threshold, reload_to,
        reload_amount, min_amount, max_amount, min_interval, max_per_day, requires_subscription,
        currency, card_kind, converted, credits_per_minor_unit, max_failures)
    VALUES (tenant, set_reload.account, set_reload.unit, pool, set_reload.threshold, set_reload.reload_to,
        set_reload.reload_amount, set_reload.min_amount, set_reload.max_amount, set_reload.min_interval,
        set_reload.max_per_day, set_reload.requires_subscription, set_reload.currency, set_reload.card_kind,
        set_reload.converted, set_reload.credits_per_minor_unit, set_reload.max_failures)
    ON CONFLICT ON CONSTRAINT reload_rules_pkey DO UPDATE SET
        threshold = EXCLUDED.threshold, reload_to = EXCLUDED.reload_to,
        reload_amount = EXCLUDED.reload_amount, min_amount = EXCLUDED.min_amount,
        max_amount = EXCLUDED.max_amount, min_interval = EXCLUDED.min_interval,
        max_per_day = EXCLUDED.max_per_day, requires_subscription = EXCLUDED.requires_subscription,
        currency = EXCLUDED.currency, card_kind = EXCLUDED.card_kind, converted = EXCLUDED.converted,
        credits_per_minor_unit = EXCLUDED.credits_per_minor_unit, max_failures = EXCLUDED.max_failures,
        status = 'active', status_reason = NULL, failures = 0, updated_at = now();
    PERFORM billing.arm_reload(pool);
    RETURN QUERY SELECT * FROM billing.reload_rules r
                 WHERE r.tenant_id = tenant AND r.account = set_reload.account AND r.unit = set_reload.unit;
END
$$;

-- Change a rule's status: 'disabled' by the application (its user turned
-- auto-reload off), 'active' again (a new card, a manual top-up), or
-- 'suspended' with the reason the application shows.
CREATE FUNCTION billing.set_reload_status(pool bigint, new_status text, reason text) RETURNS SETOF billing.reload_rules
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
BEGIN
    UPDATE billing.reload_rules r SET status = new_status, status_reason = reason,
        failures = CASE WHEN new_status = 'active' THEN 0 ELSE r.failures END, updated_at = now()
    WHERE r.pool_id = pool;
    PERFORM billing.arm_reload(pool);
    RETURN QUERY SELECT * FROM billing.reload_rules r WHERE r.pool_id = pool;
END
$$;

CREATE FUNCTION billing.rule_pool(account text, unit text) RETURNS bigint
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog
AS $$
DECLARE pool bigint;
BEGIN
    IF account IS NULL OR unit IS NULL THEN
        RAISE EXCEPTION 'account and unit may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT r.pool_id INTO pool FROM billing.reload_rules r
    WHERE r.tenant_id = billing.current_tenant() AND r.account = rule_pool.account AND r.unit = rule_pool.unit;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account "%" has no auto-reload rule for %', account, unit
            USING ERRCODE = 'undefined_object', HINT = 'Set one with billing.set_reload().';
    END IF;
    RETURN pool;
END
$$;

-- Turn a pool's auto-reload off. A pending request is failed (nothing is
-- charged after the customer said no); one a worker has claimed may be
-- charging already, and is finished by it (its failure is not retried).
CREATE FUNCTION billing.disable_reload(account text, unit text) RETURNS SETOF billing.reload_rules
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE pool bigint := billing.rule_pool(account, unit);
BEGIN
    RETURN QUERY SELECT * FROM billing.set_reload_status(pool, 'disabled', 'disabled by the application');
    UPDATE billing.reload_requests x SET status = 'failed', failure_reason = 'auto-reload disabled',
        closed_at = now(), updated_at = now()
    WHERE x.pool_id = pool AND x.status = 'pending';
END
$$;

-- Make a suspended or disabled rule active again (say, the customer added a new card).
CREATE FUNCTION billing.resume_reload(account text, unit text) RETURNS SETOF billing.reload_rules
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
    -- (a pool split since the rule was disabled may not take it back)
    SELECT r.* FROM billing.unsplit_pool(account, unit) p,
                    billing.set_reload_status(billing.rule_pool(account, unit), 'active', NULL) r
$$;

-- A successful manual top-up makes a rule suspended by failed charges
-- active again (the customer paid by hand; the card may work again). Called
-- by billing.grant for a new grant of kind topup.
CREATE FUNCTION billing.reload_after_topup(pool bigint) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
#variable_conflict use_column
BEGIN
    PERFORM billing.set_reload_status(pool, 'active', NULL)
    FROM billing.reload_rules r WHERE r.pool_id = pool AND r.status = 'suspended';
END
$$;

-- Called by the ledger, in the debit's transaction and under its pool lock,
-- when a debit leaves `available` below the pool's armed threshold: write
-- the pool's one open request if the rule allows one now, notify, and disarm
-- the threshold while it is open. Returns the request's id, or NULL.
CREATE FUNCTION billing.request_reload(pool bigint, available bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    r billing.reload_rules;
    credits bigint;
    minor bigint;
    q record;
    new_id bigint;
    due timestamptz;
BEGIN
    SELECT * INTO r FROM billing.reload_rules x WHERE x.pool_id = pool AND x.status = 'active';
    IF NOT FOUND OR EXISTS (SELECT 1 FROM billing.reload_requests x
                            WHERE x.pool_id = pool AND x.status IN ('pending', 'claimed')) THEN
        PERFORM billing.arm_reload(pool);
        RETURN NULL;
    END IF;
    -- no live subscription when the rule needs one: nothing (the threshold
    -- stays armed, so a debit after the subscription starts asks)
    IF r.requires_subscription AND NOT billing.has_live_subscription(r.tenant_id, r.account) THEN
        RETURN NULL;
    END IF;
    -- too soon after the last request, or the day's cap reached: the request
    -- is written now, due when the rule allows (so a pool that stops being
    -- debited still gets it), and the threshold is disarmed meanwhile
    due := greatest(now(),
        (SELECT max(x.due_at) + r.min_interval FROM billing.reload_requests x WHERE x.pool_id = pool),
        (SELECT d.due_at + interval '1 day' FROM billing.reload_requests d
         WHERE d.pool_id = pool AND d.due_at > now() - interval '1 day'
         ORDER BY d.due_at DESC OFFSET r.max_per_day - 1 LIMIT 1));
    BEGIN
        credits := coalesce(r.reload_amount, r.reload_to - available);
        credits := greatest(credits, r.min_amount);
        credits := least(credits, coalesce(r.max_amount, credits));
        -- whole minor units of the currency: the credit granted when paid in full
        minor := (credits + r.credits_per_minor_unit - 1) / r.credits_per_minor_unit;
        SELECT * INTO q FROM billing.quote(minor, r.currency, r.card_kind, r.converted);
    EXCEPTION WHEN invalid_parameter_value OR numeric_value_out_of_range THEN
        -- the fee schedule or the limits changed since the rule was set, or
        -- the amount is beyond any charge: say so, and never fail the debit
        PERFORM billing.set_reload_status(pool, 'suspended', 'cannot quote the reload: ' || SQLERRM);
        RETURN NULL;
    END;
    INSERT INTO billing.reload_requests (tenant_id, account, unit, pool_id, available_at_request,
        credits, currency, card_kind, credits_per_minor_unit, credit_minor, fee, total, fee_percent, fee_fixed,
        due_at, next_attempt_at)
    VALUES (r.tenant_id, r.account, r.unit, pool, available, minor * r.credits_per_minor_unit,
        r.currency, r.card_kind, r.credits_per_minor_unit, q.credit, q.fee, q.total, q.percent, q.fixed,
        due, due)
    ON CONFLICT (pool_id) WHERE status IN ('pending', 'claimed') DO NOTHING
    RETURNING id INTO new_id;
    PERFORM billing.arm_reload(pool);
    IF new_id IS NOT NULL THEN
        -- any role may LISTEN: the payload is the id alone, which only a
        -- worker of the tenant can claim
        PERFORM pg_notify('billing_reload', new_id::text);
    END IF;
    RETURN new_id;
END
$$;

-- The worker takes up to `max_requests` requests that are due (pending and
-- past their backoff, or claimed by a worker whose lease ran out), skipping
-- those another worker is taking, and holds them for `lease`.
CREATE FUNCTION billing.claim_reloads(worker text, lease interval DEFAULT '5 minutes', max_requests integer DEFAULT 10)
RETURNS TABLE (request_id bigint, account text, unit text, credits bigint, currency text, card_kind text,
               total bigint, fee bigint, credit_minor bigint, attempt integer, lease_until timestamptz,
               charge_key text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
BEGIN
    IF worker IS NULL OR lease IS NULL OR max_requests IS NULL THEN
        RAISE EXCEPTION 'worker, lease and max_requests may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF worker = '' OR lease <= '0' OR max_requests <= 0 THEN
        RAISE EXCEPTION 'worker must be named, lease and max_requests positive'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH due AS (
        SELECT x.id FROM billing.reload_requests x
        WHERE x.tenant_id = billing.current_tenant()
          AND x.status IN ('pending', 'claimed') AND x.next_attempt_at <= now()
          AND (x.status = 'pending' OR x.lease_until <= clock_timestamp())
        ORDER BY x.next_attempt_at, x.id
        LIMIT max_requests
        FOR UPDATE SKIP LOCKED)
    UPDATE billing.reload_requests x SET status = 'claimed', claimed_by = worker,
        lease_until = clock_timestamp() + lease, attempts = x.attempts + 1, updated_at = now()
    FROM due WHERE x.id = due.id
    RETURNING x.id, x.account, x.unit, x.credits, x.currency, x.card_kind, x.total, x.fee,
              x.credit_minor, x.attempts, x.lease_until,
              'pg_billing_reload_' || x.id || '_' || x.charge_attempt;
END
$$;

-- A request the caller may close: it exists in the caller's tenant, locked.
CREATE FUNCTION billing.locked_reload_request(request bigint) RETURNS billing.reload_requests
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
DECLARE q billing.reload_requests;
BEGIN
    SELECT * INTO q FROM billing.reload_requests x
    WHERE x.id = request AND x.tenant_id = billing.current_tenant() FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no reload request %', request USING ERRCODE = 'undefined_object';
    END IF;
    RETURN q;
END
$$;

-- The card was charged: credit what was paid (billing.paid_credit: the
-- quoted credit when the quoted total was paid, otherwise what was paid net
-- of the worst-case fee) as a grant of kind reload keyed by the payment
-- reference, once. Completing again with the same payment answers the same;
-- with another payment, or another amount, is refused. A request failed
-- earlier whose payment went through after all is completed the same way.
CREATE FUNCTION billing.complete_reload(request bigint, payment_ref text, amount_paid bigint, currency text)
RETURNS TABLE (request_id bigint, status text, grant_id bigint, credited bigint, available bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    q billing.reload_requests;
    g record;
BEGIN
    IF request IS NULL THEN
        RAISE EXCEPTION 'request may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM billing.require_payment(payment_ref, amount_paid, currency);
    q := billing.locked_reload_request(request);
    IF q.status = 'completed' THEN
        IF q.payment_ref = complete_reload.payment_ref AND q.amount_paid = complete_reload.amount_paid
           AND q.currency = complete_reload.currency THEN
            RETURN QUERY SELECT q.id, 'duplicate'::text, q.grant_id,
                (SELECT g2.amount FROM billing.grants g2 WHERE g2.id = q.grant_id),
                (SELECT c.available FROM billing."check"(q.account, q.unit) c);
            RETURN;
        END IF;
        IF q.payment_ref = complete_reload.payment_ref OR q.currency <> complete_reload.currency THEN
            RAISE EXCEPTION 'idempotency key reused with different parameters: reload request % was completed by payment % of % %',
                q.id, q.payment_ref, q.amount_paid, q.currency USING ERRCODE = 'unique_violation';
        END IF;
        -- a second charge for a request already paid (a worker charged without
        -- the request's charge_key): the money was taken, so it is credited too,
        -- once per payment (the grant's key)
        SELECT * INTO g FROM billing.grant_payment(q.account, q.unit, 'reload', payment_ref, amount_paid,
            currency, q.fee_percent, q.fee_fixed, q.total, q.credit_minor, q.credits_per_minor_unit,
            jsonb_build_object('reload_request', q.id, 'extra_payment', true));
        RETURN QUERY SELECT q.id, CASE WHEN g.status = 'duplicate' THEN 'duplicate' ELSE 'extra_payment' END,
            g.grant_id, g.credited, (SELECT c.available FROM billing."check"(q.account, q.unit) c);
        RETURN;
    END IF;
    IF q.currency <> complete_reload.currency THEN
        RAISE EXCEPTION 'reload request % was quoted in %, not %', q.id, q.currency, complete_reload.currency
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT 1 FROM billing.reload_requests x
               WHERE x.tenant_id = q.tenant_id AND x.payment_ref = complete_reload.payment_ref) THEN
        RAISE EXCEPTION 'payment % already completed another reload request', payment_ref
            USING ERRCODE = 'unique_violation';
    END IF;
    -- a charge that went through ends the run of failures (the rule's row
    -- before the pool's, as disable_reload and fail_reload take them)
    UPDATE billing.reload_rules r SET failures = 0, updated_at = now() WHERE r.pool_id = q.pool_id AND r.failures > 0;
    SELECT * INTO g FROM billing.grant_payment(q.account, q.unit, 'reload', payment_ref, amount_paid,
        currency, q.fee_percent, q.fee_fixed, q.total, q.credit_minor, q.credits_per_minor_unit,
        jsonb_build_object('reload_request', q.id));
    UPDATE billing.reload_requests x SET status = 'completed', payment_ref = complete_reload.payment_ref,
        amount_paid = complete_reload.amount_paid, grant_id = g.grant_id, lease_until = NULL,
        failure_reason = CASE WHEN g.credited > 0 THEN NULL ELSE 'the amount paid does not cover the card fee' END,
        closed_at = now(), updated_at = now()
    WHERE x.id = q.id;
    PERFORM billing.arm_reload(q.pool_id);
    RETURN QUERY SELECT q.id, 'completed'::text, g.grant_id, g.credited,
        (SELECT c.available FROM billing."check"(q.account, q.unit) c);
END
$$;

-- The charge failed: try again later (backoff doubling from a minute, at
-- most six hours) unless `retry` is false, and count the failure against the
-- rule, which is suspended, with the reason, after max_failures in a row.
CREATE FUNCTION billing.fail_reload(request bigint, reason text, retry boolean DEFAULT true, worker text DEFAULT NULL)
RETURNS TABLE (request_id bigint, status text, attempts integer, next_attempt_at timestamptz,
               rule_status text, rule_reason text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    q billing.reload_requests;
    r billing.reload_rules;
BEGIN
    IF request IS NULL OR reason IS NULL OR btrim(reason) = '' OR retry IS NULL THEN
        RAISE EXCEPTION 'request_id, a reason and retry are required' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    q := billing.locked_reload_request(request);
    IF q.status NOT IN ('pending', 'claimed') THEN
        RAISE EXCEPTION 'reload request % is %', q.id, q.status USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    -- a worker whose lease ran out reports nothing for the worker that
    -- claimed it since, whose charge (under the same key) may still succeed
    IF worker IS NOT NULL AND q.status = 'claimed' AND q.claimed_by IS DISTINCT FROM worker THEN
        RAISE EXCEPTION 'reload request % is claimed by worker "%" now (its lease ran out for "%"): that worker completes or fails it',
            q.id, q.claimed_by, worker
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    -- counted against an active rule only; a rule disabled or suspended
    -- meanwhile asks for no more charges, so the request ends here
    UPDATE billing.reload_rules x SET failures = x.failures + 1, updated_at = now()
    WHERE x.pool_id = q.pool_id AND x.status = 'active' RETURNING * INTO r;
    IF NOT FOUND THEN
        retry := false;
    ELSIF r.failures >= r.max_failures THEN
        PERFORM billing.set_reload_status(q.pool_id, 'suspended',
            format('%s failed charges in a row; last: %s', r.failures, left(reason, 500)));
        retry := false;
    END IF;
    UPDATE billing.reload_requests x SET
        status = CASE WHEN retry THEN 'pending' ELSE 'failed' END,
        next_attempt_at = CASE WHEN retry
            THEN now() + least(interval '1 minute' * power(2, least(greatest(x.attempts, 1) - 1, 12)), interval '6 hours')
            ELSE x.next_attempt_at END,
        charge_attempt = x.charge_attempt + CASE WHEN retry THEN 1 ELSE 0 END,
        claimed_by = NULL, lease_until = NULL, failure_reason = left(reason, 500),
        closed_at = CASE WHEN retry THEN NULL ELSE now() END, updated_at = now()
    WHERE x.id = q.id
    RETURNING * INTO q;
    PERFORM billing.arm_reload(q.pool_id);
    RETURN QUERY SELECT q.id, q.status, q.attempts, q.next_attempt_at, x.status, x.status_reason
                 FROM billing.reload_rules x WHERE x.pool_id = q.pool_id;
END
$$;
