-- pg_billing_router, shard side: run on every shard database, after
-- CREATE EXTENSION pg_billing, by the extension's owner (a superuser).
--
-- The router calls billing.* here over PL/Proxy's connections, which it
-- opens as the calling role (PL/Proxy adds user=current_user), so every call
-- is authorised on the shard exactly as a direct call would be. What the
-- connection cannot carry is the caller's billing.tenant: the router passes it
-- as the first argument of each call, and these functions set it for that
-- call's transaction (PL/Proxy runs each call in a transaction of its own)
-- before billing.* reads it.
CREATE SCHEMA IF NOT EXISTS billing_router;
REVOKE ALL ON SCHEMA billing_router FROM PUBLIC;
GRANT USAGE ON SCHEMA billing_router TO billing_reader, billing_support, billing_app, billing_admin;

-- Make this shard's ids its own: every sequence of pg_billing draws from
-- [n * 2^48 + 1, (n + 1) * 2^48), so a grant, hold, event or request id names
-- one object across all shards (ids are what the router looks objects up by;
-- n below 32 keeps ids under 2^53, exact in JavaScript). Run it once per
-- shard, n = 0, 1, 2, ..., before any account is used, and again after an
-- upgrade of pg_billing (a new sequence starts at 1): a sequence already in
-- its range keeps its place.
CREATE OR REPLACE FUNCTION billing_router.number_shard(n integer) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    seq regclass;
    lo bigint;
    hi bigint;
    numbered integer := 0;
BEGIN
    IF n IS NULL OR n NOT BETWEEN 0 AND 32766 THEN
        RAISE EXCEPTION 'shard number must be between 0 and 32766, not %', n USING ERRCODE = 'invalid_parameter_value';
    END IF;
    lo := n::bigint * 281474976710656 + 1;
    hi := (n::bigint + 1) * 281474976710656 - 1;
    FOR seq IN SELECT c.oid::regclass FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace
               WHERE ns.nspname = 'billing' AND c.relkind = 'S' ORDER BY 1 LOOP
        IF (SELECT s.seqmin = lo AND s.seqmax = hi FROM pg_sequence s WHERE s.seqrelid = seq) THEN
            CONTINUE;
        END IF;
        IF pg_sequence_last_value(seq) >= lo THEN
            EXECUTE format('ALTER SEQUENCE %s MINVALUE %s MAXVALUE %s START WITH %s', seq, lo, hi, lo);
        ELSE
            EXECUTE format('ALTER SEQUENCE %s MINVALUE %s MAXVALUE %s START WITH %s RESTART', seq, lo, hi, lo);
        END IF;
        numbered := numbered + 1;
    END LOOP;
    RETURN numbered;
END
$$;

-- Act for `tenant` until this transaction ends (no tenant given: the
-- session's own). A routed call with no argument reads it as a FROM item the
-- billing.* call depends on laterally, so it is set before that call starts.
CREATE OR REPLACE FUNCTION billing_router.within(tenant text) RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    IF tenant IS NOT NULL THEN
        PERFORM pg_catalog.set_config('billing.tenant', tenant, true);
    END IF;
    RETURN true;
END
$$;

-- The same for a routed call with arguments: the router passes its first
-- argument through this, as an initplan the call evaluates before it starts.
CREATE OR REPLACE FUNCTION billing_router.within_arg(tenant text, first anyelement) RETURNS anyelement
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    PERFORM billing_router.within(tenant);
    RETURN first;
END
$$;

-- The tenant this call acts for, once pg_billing has accepted the calling
-- role for it (42501 otherwise): what the functions below, which read past
-- row-level security, may then read.
CREATE OR REPLACE FUNCTION billing_router.checked_tenant(tenant text) RETURNS text
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    PERFORM billing_router.within(tenant);
    RETURN billing.current_tenant();
END
$$;

-- The account of the object an id names (a grant or a pending grant, a hold,
-- a checkout intent, a reload request, an alert, a seat push) when it is on
-- this shard in `tenant`; no row otherwise. The router asks every shard, then
-- sends the call to the account's.
CREATE OR REPLACE FUNCTION billing_router.owner_of(tenant text, kind text, id bigint) RETURNS SETOF text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t text;
BEGIN
    t := billing_router.checked_tenant(tenant);
    RETURN QUERY
    SELECT o.account FROM (SELECT CASE kind
        WHEN 'grant' THEN coalesce((SELECT g.account FROM billing.grants g WHERE g.id = owner_of.id AND g.tenant_id = t),
                                   (SELECT a.account FROM billing.grant_approvals a
                                    WHERE a.grant_id = owner_of.id AND a.tenant_id = t))
        WHEN 'hold' THEN (SELECT h.account FROM billing.holds h WHERE h.id = owner_of.id AND h.tenant_id = t)
        WHEN 'checkout' THEN (SELECT c.account FROM billing.checkout_intents c WHERE c.id = owner_of.id AND c.tenant_id = t)
        WHEN 'reload' THEN (SELECT r.account FROM billing.reload_requests r WHERE r.id = owner_of.id AND r.tenant_id = t)
        WHEN 'alert' THEN (SELECT a.account FROM billing.alerts a WHERE a.id = owner_of.id AND a.tenant_id = t)
        WHEN 'seat_push' THEN (SELECT s.account FROM billing.seat_pushes s WHERE s.id = owner_of.id AND s.tenant_id = t)
    END AS account) o
    WHERE o.account IS NOT NULL;
END
$$;

-- Whose a provider's object is, for the router to send it to that account's
-- shard: `named` is the account the object names (as the Stripe projection
-- reads it, billing.stripe_named_account; in other schemes' data also
-- `account`), the same on every shard; `owner` is the account this shard knows
-- the object by (a reload request or checkout intent it created, a provider
-- customer or subscription it mapped, a payment it credited), found on that
-- account's shard only. The caller has checked the tenant.
CREATE OR REPLACE FUNCTION billing_router.object_owner(t text, obj jsonb, scheme text)
RETURNS TABLE (named text, owner text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    request bigint;
    payment text;
    subscription text;
BEGIN
    IF jsonb_typeof(obj) IS DISTINCT FROM 'object' THEN
        RETURN;
    END IF;
    named := coalesce(billing.stripe_named_account(obj),
                      CASE WHEN scheme <> 'stripe' THEN obj ->> 'account' END);
    IF named IS NULL AND scheme = 'stripe' THEN
        IF obj #>> '{metadata,reload_request}' ~ '^[0-9]{1,18}$' THEN
            request := (obj #>> '{metadata,reload_request}')::bigint;
        END IF;
        payment := coalesce(billing.stripe_id(obj -> 'payment_intent'),
                            CASE WHEN obj ->> 'object' = 'payment_intent' THEN obj ->> 'id' END);
        subscription := coalesce(billing.stripe_invoice_subscription(obj),
                                 CASE WHEN obj ->> 'object' = 'subscription' THEN obj ->> 'id' END);
        owner := coalesce(
            (SELECT r.account FROM billing.reload_requests r WHERE r.tenant_id = t AND r.id = request),
            (SELECT c.account FROM billing.checkout_intents c
             WHERE c.tenant_id = t AND c.id = billing.stripe_checkout_intent(obj)),
            (SELECT c.account FROM billing.provider_customers c
             WHERE c.tenant_id = t AND c.provider = 'stripe' AND c.customer = billing.stripe_id(obj -> 'customer')),
            (SELECT s.account FROM billing.subscriptions s
             WHERE s.tenant_id = t AND s.provider = 'stripe' AND s.provider_id = subscription),
            (SELECT g.account FROM billing.grants g WHERE g.tenant_id = t AND g.key = billing.payment_key(payment)));
    END IF;
    RETURN NEXT;
END
$$;

-- The owner of a provider's object given to billing.sync_subscription or
-- billing.sync_invoice (a poll of the provider's API).
CREATE OR REPLACE FUNCTION billing_router.payload_owner(tenant text, obj jsonb, provider text)
RETURNS TABLE (named text, owner text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t text;
BEGIN
    t := billing_router.checked_tenant(tenant);
    RETURN QUERY SELECT * FROM billing_router.object_owner(t, obj, provider);
END
$$;

-- The owner of a webhook delivery's object, when the delivery verifies
-- (billing.verify_delivery, as the intake checks it); no row otherwise: the router then
-- sends it to the tenant's home shard, which records why it was rejected.
CREATE OR REPLACE FUNCTION billing_router.webhook_owner(tenant text, endpoint text, headers jsonb, body text)
RETURNS TABLE (named text, owner text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t text;
    ep billing.webhook_endpoints;
    v record;
    payload jsonb;
BEGIN
    t := billing_router.checked_tenant(tenant);
    SELECT * INTO ep FROM billing.webhook_endpoints e WHERE e.tenant_id = t AND e.name = endpoint;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT * INTO v FROM billing.verify_delivery(ep, coalesce(headers, '{}'), coalesce(body, ''));
    IF NOT v.valid THEN
        RETURN;
    END IF;
    BEGIN
        payload := body::jsonb;
    EXCEPTION WHEN others THEN
        RETURN;
    END;
    RETURN QUERY SELECT * FROM billing_router.object_owner(t,
        CASE WHEN jsonb_typeof(payload #> '{data,object}') = 'object' THEN payload #> '{data,object}'
             ELSE payload -> 'data' END, ep.scheme);
END
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA billing_router FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing_router.within(text), billing_router.within_arg(text, anyelement),
    billing_router.owner_of(text, text, bigint),
    billing_router.payload_owner(text, jsonb, text), billing_router.webhook_owner(text, text, jsonb, text)
    TO billing_reader, billing_support;
