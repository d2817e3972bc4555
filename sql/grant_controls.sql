-- Manual grants under control. Credit an operator gives by hand (kinds
-- `manual` and `promo`: goodwill, compensation, promotions) carries who gave
-- it (grants.granted_by, the session's role after any SET ROLE) and why
-- (grants.reason). A tenant's policy for a unit (billing.set_grant_policy)
-- adds, for those kinds:
--   * a reason, required;
--   * a cap per grant and a cap per UTC day for each granting role, over
--     what the role granted and asked approval for that day (a rejected
--     request gives its amount back); concurrent grants by one role queue
--     on its day's counter, so together they never pass the cap;
--   * a second approval above a threshold: the grant waits in
--     billing.grant_approvals, under the id and the key it will have, until
--     another role approves it (billing.approve_grant; not the asker, a
--     member of it such as the login that SET ROLE to it or a superuser,
--     nor a group it is in) or anyone rejects it (billing.reject_grant);
--   * goodwill to an account whose subscription was canceled (it has a
--     canceled subscription and no live one): allowed, sent for approval
--     whatever the amount, or refused.
-- With no policy for the unit, such grants are recorded with who and why
-- and nothing more. Other kinds (plan, topup, reload, refund) come from
-- payments and plans, not from an operator, and are not controlled: only
-- roles with billing_app's privileges may grant them (src/tenancy.rs); a
-- support console's agents are members of billing_support, which may grant
-- by hand, approve and reject, and read.

CREATE TABLE billing.grant_policies (
    tenant_id      text        NOT NULL,
    unit           text        NOT NULL,
    max_per_grant  bigint      CHECK (max_per_grant > 0),
    max_per_day    bigint      CHECK (max_per_day > 0),
    approval_above bigint      CHECK (approval_above >= 0),
    when_canceled  text        NOT NULL DEFAULT 'allow' CHECK (when_canceled IN ('allow', 'approval', 'refuse')),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, unit)
);
SELECT pg_catalog.pg_extension_config_dump('billing.grant_policies', '');

-- What each role granted by hand in a unit on a UTC day (approvals asked
-- for included), where a policy applies: the daily cap's counter.
CREATE TABLE billing.granted_per_day (
    tenant_id text    NOT NULL,
    unit      text    NOT NULL,
    role_id   regrole NOT NULL,
    day       date    NOT NULL,
    granted   bigint  NOT NULL,
    PRIMARY KEY (tenant_id, unit, role_id, day)
);
SELECT pg_catalog.pg_extension_config_dump('billing.granted_per_day', '');

CREATE TABLE billing.grant_approvals (
    -- the id the grant takes when approved
    grant_id     bigint      PRIMARY KEY,
    tenant_id    text        NOT NULL,
    account      text        NOT NULL,
    unit         text        NOT NULL,
    kind         text        NOT NULL,
    priority     integer     NOT NULL,
    amount       bigint      NOT NULL,
    effective_at timestamptz,
    expires_at   timestamptz,
    key          text,
    request_hash bytea       NOT NULL,
    metadata     jsonb       NOT NULL,
    reason       text        NOT NULL,
    -- why a second role must approve: above_threshold, canceled_account
    needs        text        NOT NULL CHECK (needs IN ('above_threshold', 'canceled_account')),
    requested_by regrole     NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    status       text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'rejected')),
    decided_by   regrole,
    decided_at   timestamptz,
    decision     text,
    UNIQUE (tenant_id, key)
);
CREATE INDEX grant_approvals_pending ON billing.grant_approvals (tenant_id, requested_at) WHERE status = 'pending';
SELECT pg_catalog.pg_extension_config_dump('billing.grant_approvals', '');

-- Whether an account's subscription was canceled: it has a canceled one and
-- no live one.
CREATE FUNCTION billing.subscription_canceled(tenant text, account text) RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog
AS $$
#variable_conflict use_column
BEGIN
    RETURN EXISTS (SELECT 1 FROM billing.subscriptions s
                   WHERE s.tenant_id = tenant AND s.account = subscription_canceled.account
                     AND s.status = 'canceled')
       AND NOT billing.has_live_subscription(tenant, account);
END
$$;

-- Set the tenant's policy for manual and promo grants of `unit` (NULL: no
-- such cap or threshold).
CREATE FUNCTION billing.set_grant_policy(unit text, max_per_grant bigint DEFAULT NULL, max_per_day bigint DEFAULT NULL,
                                         approval_above bigint DEFAULT NULL, when_canceled text DEFAULT 'allow')
RETURNS SETOF billing.grant_policies
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
BEGIN
    IF unit IS NULL OR when_canceled IS NULL THEN
        RAISE EXCEPTION 'unit and when_canceled may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM billing.units u WHERE u.tenant_id = tenant AND u.unit = set_grant_policy.unit) THEN
        RAISE EXCEPTION 'unknown unit "%"', left(unit, 80) USING ERRCODE = 'undefined_object',
            HINT = 'Define it first with billing.define_unit.';
    END IF;
    IF coalesce(max_per_grant, 1) <= 0 OR coalesce(max_per_day, 1) <= 0 OR coalesce(approval_above, 0) < 0 THEN
        RAISE EXCEPTION 'max_per_grant and max_per_day must be positive, approval_above not negative'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF when_canceled NOT IN ('allow', 'approval', 'refuse') THEN
        RAISE EXCEPTION 'when_canceled "%" is not one of allow, approval, refuse', left(when_canceled, 80)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    INSERT INTO billing.grant_policies AS p (tenant_id, unit, max_per_grant, max_per_day, approval_above, when_canceled)
    VALUES (tenant, set_grant_policy.unit, set_grant_policy.max_per_grant, set_grant_policy.max_per_day,
            set_grant_policy.approval_above, set_grant_policy.when_canceled)
    ON CONFLICT ON CONSTRAINT grant_policies_pkey DO UPDATE
        SET max_per_grant = EXCLUDED.max_per_grant, max_per_day = EXCLUDED.max_per_day,
            approval_above = EXCLUDED.approval_above, when_canceled = EXCLUDED.when_canceled, updated_at = now()
    RETURNING p.*;
END
$$;

CREATE FUNCTION billing.remove_grant_policy(unit text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
BEGIN
    IF unit IS NULL THEN
        RAISE EXCEPTION 'unit may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    DELETE FROM billing.grant_policies p
    WHERE p.tenant_id = billing.current_tenant() AND p.unit = remove_grant_policy.unit;
    RETURN FOUND;
END
$$;

-- Called by billing.grant (src/grants.rs) for a new manual or promo grant,
-- under its pool's lock: refuses what the unit's policy forbids (raising, so
-- nothing is written), counts the amount on `role`'s day, and returns why a
-- second role must approve it, or NULL when it may be applied now.
CREATE FUNCTION billing.grant_control(tenant text, account text, unit text, amount bigint, reason text, role regrole)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    p billing.grant_policies;
    canceled boolean;
    today bigint;
BEGIN
    SELECT * INTO p FROM billing.grant_policies x WHERE x.tenant_id = tenant AND x.unit = grant_control.unit;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF reason IS NULL OR reason !~ '[^[:space:]]' THEN
        RAISE EXCEPTION 'a manual or promo grant of % needs a reason in tenant "%"', unit, tenant
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass reason => ''…''; it is kept with the grant.';
    END IF;
    IF amount > p.max_per_grant THEN
        RAISE EXCEPTION 'role "%" may grant at most % % in one manual or promo grant, not %', role, p.max_per_grant, unit, amount
            USING ERRCODE = 'insufficient_privilege', HINT = 'The tenant''s grant policy caps each grant (billing.set_grant_policy).';
    END IF;
    canceled := billing.subscription_canceled(tenant, account);
    IF canceled AND p.when_canceled = 'refuse' THEN
        RAISE EXCEPTION 'account "%" canceled its subscription: the tenant''s policy refuses manual and promo grants to it', account
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    INSERT INTO billing.granted_per_day AS d (tenant_id, unit, role_id, day, granted)
    VALUES (tenant, grant_control.unit, role, (now() AT TIME ZONE 'UTC')::date, amount)
    ON CONFLICT ON CONSTRAINT granted_per_day_pkey DO UPDATE SET granted = d.granted + EXCLUDED.granted
    RETURNING d.granted INTO today;
    IF today > p.max_per_day THEN
        RAISE EXCEPTION 'role "%" may grant at most % % a day by hand; it granted % today, and % more would pass it',
            role, p.max_per_day, unit, today - amount, amount
            USING ERRCODE = 'insufficient_privilege', HINT = 'The cap resets at midnight UTC (billing.set_grant_policy).';
    END IF;
    RETURN CASE WHEN canceled AND p.when_canceled = 'approval' THEN 'canceled_account'
                WHEN amount > p.approval_above THEN 'above_threshold' END;
END
$$;

-- Grant request `grant_id` of `tenant`, locked; 42704 if there is none.
CREATE FUNCTION billing.locked_grant_approval(tenant text, grant_id bigint) RETURNS billing.grant_approvals
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
DECLARE a billing.grant_approvals;
BEGIN
    SELECT * INTO a FROM billing.grant_approvals x
    WHERE x.tenant_id = tenant AND x.grant_id = locked_grant_approval.grant_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no grant % waits for approval', grant_id USING ERRCODE = 'undefined_object';
    END IF;
    RETURN a;
END
$$;

-- The pending grant `grant_id`, locked, now approved by `approver`, for
-- billing.approve_grant (src/grants.rs) to apply; `already` when it was
-- approved before (the grant exists).
CREATE FUNCTION billing.approve_pending_grant(tenant text, grant_id bigint, approver regrole)
RETURNS TABLE (already boolean, account text, unit text, kind text, priority integer, amount bigint,
               effective_at timestamptz, expires_at timestamptz, key text, request_hash bytea, metadata jsonb,
               reason text, requested_by regrole)
LANGUAGE plpgsql
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    a billing.grant_approvals;
BEGIN
    a := billing.locked_grant_approval(tenant, grant_id);
    IF a.status = 'rejected' THEN
        RAISE EXCEPTION 'grant % was rejected by "%": it cannot be approved', grant_id, a.decided_by
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Ask for it again with another key.';
    END IF;
    IF a.status = 'pending' THEN
        -- not the asker under another name: a role it can become (a group it
        -- is in) or one that can become it (a login that SET ROLE to it, a
        -- superuser), whether or not membership inherits
        IF pg_has_role(approver, a.requested_by, 'MEMBER') OR pg_has_role(a.requested_by, approver, 'MEMBER') THEN
            RAISE EXCEPTION 'grant % was asked for by "%": "%" is that role or a member or group of it; another role approves it',
                grant_id, a.requested_by, approver
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        UPDATE billing.grant_approvals x SET status = 'approved', decided_by = approver, decided_at = now()
        WHERE x.grant_id = a.grant_id;
    END IF;
    RETURN QUERY SELECT a.status = 'approved', a.account, a.unit, a.kind, a.priority, a.amount, a.effective_at,
                        a.expires_at, a.key, a.request_hash, a.metadata, a.reason, a.requested_by;
END
$$;

-- Reject a pending grant (any role of the tenant may; the one who asked for
-- it withdraws it so): it is never applied, and its amount no longer counts
-- on its role's day. Rejecting again returns the first decision.
CREATE FUNCTION billing.reject_grant(grant_id bigint, reason text DEFAULT NULL)
RETURNS SETOF billing.grant_approvals
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
    a billing.grant_approvals;
BEGIN
    IF grant_id IS NULL THEN
        RAISE EXCEPTION 'grant_id may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    a := billing.locked_grant_approval(tenant, grant_id);
    IF a.status = 'approved' THEN
        RAISE EXCEPTION 'grant % was approved by "%" and applied: void it instead', grant_id, a.decided_by
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'billing.void_grant takes back what is unspent.';
    END IF;
    IF a.status = 'pending' THEN
        UPDATE billing.grant_approvals x
        SET status = 'rejected', decided_by = billing.calling_role(), decided_at = now(), decision = reject_grant.reason
        WHERE x.grant_id = a.grant_id;
        UPDATE billing.granted_per_day d SET granted = d.granted - a.amount
        WHERE d.tenant_id = tenant AND d.unit = a.unit AND d.role_id = a.requested_by
          AND d.day = (a.requested_at AT TIME ZONE 'UTC')::date;
    END IF;
    RETURN QUERY SELECT * FROM billing.grant_approvals x WHERE x.grant_id = a.grant_id;
END
$$;
