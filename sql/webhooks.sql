-- Signed provider webhooks, verified, deduplicated and applied inside the
-- database. The application passes headers and the raw body to
-- billing.receive_webhook(), or INSERTs them into billing.webhook_events; the
-- intake trigger does the rest in the same transaction.

CREATE TABLE billing.webhook_endpoints (
    id                         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id                  text        NOT NULL,
    name                       text        NOT NULL CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    scheme                     text        NOT NULL CHECK (scheme IN ('stripe', 'standard', 'generic')),
    secret                     text        NOT NULL CHECK (secret <> ''),
    previous_secret            text,
    previous_secret_expires_at timestamptz,
    tolerance_seconds          integer     NOT NULL DEFAULT 300 CHECK (tolerance_seconds BETWEEN 1 AND 86400),
    signature_header           text        NOT NULL DEFAULT 'x-signature',
    -- Stripe credit handlers: the pool unit credited, per minor unit of currency paid
    credit_unit                text        NOT NULL DEFAULT 'usd_cents',
    credits_per_minor_unit     bigint      NOT NULL DEFAULT 1 CHECK (credits_per_minor_unit > 0),
    created_at                 timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

-- The inbox: every delivery, kept with its outcome. A rejected delivery is kept
-- for forensics and has no side effect; 'applied' and 'superseded' rows hold the
-- (endpoint, provider event id) pair once, forever.
CREATE TABLE billing.webhook_events (
    id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id         text        NOT NULL, -- set by the intake trigger
    endpoint          text        NOT NULL,
    endpoint_id       bigint      REFERENCES billing.webhook_endpoints (id),
    headers           jsonb       NOT NULL DEFAULT '{}',
    body              text        NOT NULL,
    payload           jsonb,
    provider_event_id text,
    event_type        text,
    object_id         text,
    event_time        timestamptz,
    signed_at         timestamptz,
    status            text        NOT NULL DEFAULT 'received'
                      CHECK (status IN ('received', 'applied', 'duplicate', 'rejected', 'failed', 'superseded')),
    reason            text,
    error             text,
    result            jsonb,
    received_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE UNIQUE INDEX webhook_events_once ON billing.webhook_events (endpoint_id, provider_event_id)
    WHERE status IN ('applied', 'superseded');
CREATE INDEX webhook_events_by_time ON billing.webhook_events (tenant_id, received_at);

-- Per provider object, the newest event time applied: an older event for the
-- same object is superseded instead of overwriting newer state.
CREATE TABLE billing.webhook_objects (
    endpoint_id       bigint      NOT NULL REFERENCES billing.webhook_endpoints (id),
    object_id         text        NOT NULL,
    tenant_id         text        NOT NULL,
    newest_event_time timestamptz NOT NULL,
    newest_event_id   bigint      NOT NULL,
    PRIMARY KEY (endpoint_id, object_id)
);

-- An application's own handlers: (endpoint or '*', event type) → a function
-- taking the verified event row and returning jsonb.
CREATE TABLE billing.webhook_handlers (
    tenant_id  text         NOT NULL,
    endpoint   text         NOT NULL DEFAULT '*',
    event_type text         NOT NULL,
    handler    regprocedure NOT NULL,
    PRIMARY KEY (tenant_id, endpoint, event_type)
);

-- Money the provider took back from a payment (refunds, disputes), per source,
-- so a reversal that arrives before its payment still applies when it lands.
CREATE TABLE billing.stripe_reversals (
    endpoint_id bigint      NOT NULL REFERENCES billing.webhook_endpoints (id),
    tenant_id   text        NOT NULL,
    payment     text        NOT NULL,
    source      text        NOT NULL,
    amount      bigint      NOT NULL CHECK (amount >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (endpoint_id, payment, source)
);

SELECT pg_catalog.pg_extension_config_dump('billing.webhook_endpoints', '');
SELECT pg_catalog.pg_extension_config_dump('billing.webhook_events', '');
SELECT pg_catalog.pg_extension_config_dump('billing.webhook_objects', '');
SELECT pg_catalog.pg_extension_config_dump('billing.webhook_handlers', '');
SELECT pg_catalog.pg_extension_config_dump('billing.stripe_reversals', '');
SELECT pg_catalog.pg_extension_config_dump('billing.webhook_endpoints_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.webhook_events_id_seq', '');

-- ----- configuration ---------------------------------------------------------

CREATE FUNCTION billing.define_webhook_endpoint(
    name text, scheme text, secret text,
    tolerance_seconds integer DEFAULT 300,
    signature_header text DEFAULT 'x-signature',
    credit_unit text DEFAULT 'usd_cents',
    credits_per_minor_unit bigint DEFAULT 1)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF scheme = 'standard' AND secret !~ '^(whsec_)?[A-Za-z0-9+/]+={0,2}$' THEN
        RAISE EXCEPTION 'invalid secret: a Standard Webhooks secret is whsec_<base64>'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM billing.define_unit(define_webhook_endpoint.credit_unit);
    INSERT INTO billing.webhook_endpoints AS e
        (tenant_id, name, scheme, secret, tolerance_seconds, signature_header, credit_unit, credits_per_minor_unit)
    VALUES (billing.current_tenant(), define_webhook_endpoint.name, define_webhook_endpoint.scheme,
            define_webhook_endpoint.secret, define_webhook_endpoint.tolerance_seconds,
            lower(define_webhook_endpoint.signature_header), define_webhook_endpoint.credit_unit,
            define_webhook_endpoint.credits_per_minor_unit)
    ON CONFLICT (tenant_id, name) DO UPDATE
    SET scheme = EXCLUDED.scheme, secret = EXCLUDED.secret, tolerance_seconds = EXCLUDED.tolerance_seconds,
        signature_header = EXCLUDED.signature_header, credit_unit = EXCLUDED.credit_unit,
        credits_per_minor_unit = EXCLUDED.credits_per_minor_unit;
    RETURN name;
EXCEPTION WHEN check_violation THEN
    RAISE EXCEPTION 'invalid webhook endpoint: %', SQLERRM USING ERRCODE = 'invalid_parameter_value',
        HINT = 'name is a lowercase identifier; scheme is stripe, standard or generic; the secret is not empty.';
END
$$;

-- Replace the secret; the old one keeps verifying for keep_previous_for.
CREATE FUNCTION billing.rotate_webhook_secret(name text, new_secret text,
                                              keep_previous_for interval DEFAULT '24 hours')
RETURNS timestamptz
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
#variable_conflict use_column
DECLARE until timestamptz := now() + keep_previous_for;
BEGIN
    UPDATE billing.webhook_endpoints e
    SET previous_secret = e.secret, previous_secret_expires_at = until, secret = new_secret
    WHERE e.tenant_id = billing.current_tenant() AND e.name = rotate_webhook_secret.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown webhook endpoint "%"', name USING ERRCODE = 'undefined_object';
    END IF;
    RETURN until;
END
$$;

CREATE FUNCTION billing.register_webhook_handler(event_type text, handler regprocedure, endpoint text DEFAULT '*')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_proc p WHERE p.oid = handler
                   AND p.prorettype = 'jsonb'::regtype AND p.pronargs = 1
                   AND p.proargtypes[0] = 'billing.webhook_events'::regtype) THEN
        RAISE EXCEPTION 'a webhook handler takes (billing.webhook_events) and returns jsonb'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO billing.webhook_handlers AS h (tenant_id, endpoint, event_type, handler)
    VALUES (billing.current_tenant(), register_webhook_handler.endpoint, register_webhook_handler.event_type,
            register_webhook_handler.handler)
    ON CONFLICT (tenant_id, endpoint, event_type) DO UPDATE SET handler = EXCLUDED.handler;
END
$$;

-- ----- intake ----------------------------------------------------------------

CREATE FUNCTION billing.webhook_event_intake() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    ep billing.webhook_endpoints;
    v record;
    newest timestamptz;
    handler regprocedure;
    applied_id bigint;
BEGIN
    -- A row that arrives already decided is a restore (pg_restore copies the
    -- inbox as it was); application roles can only insert endpoint, headers
    -- and body, so for them status is always 'received'.
    IF NEW.status <> 'received' THEN
        RETURN NEW;
    END IF;
    -- whatever the caller put in the other columns is ignored
    NEW.tenant_id := billing.current_tenant();
    NEW.status := 'rejected';
    NEW.payload := NULL; NEW.provider_event_id := NULL; NEW.event_type := NULL; NEW.object_id := NULL;
    NEW.event_time := NULL; NEW.signed_at := NULL; NEW.reason := NULL; NEW.error := NULL; NEW.result := NULL;
    NEW.received_at := clock_timestamp();
    NEW.headers := coalesce(NEW.headers, '{}');

    SELECT * INTO ep FROM billing.webhook_endpoints e WHERE e.tenant_id = NEW.tenant_id AND e.name = NEW.endpoint;
    IF NOT FOUND THEN
        NEW.reason := 'unknown endpoint'; RETURN NEW;
    END IF;
    NEW.endpoint_id := ep.id;
    IF octet_length(NEW.body) > 1048576 OR octet_length(NEW.headers::text) > 65536 THEN
        NEW.reason := 'too large: body over 1 MiB or headers over 64 KiB';
        NEW.body := left(NEW.body, 4096); -- keep a sample, not the flood
        RETURN NEW;
    END IF;

    SELECT * INTO v FROM billing.verify_webhook(ep.scheme, ep.secret, NEW.headers, NEW.body,
        CASE WHEN ep.previous_secret_expires_at > now() THEN ep.previous_secret END,
        ep.tolerance_seconds, ep.signature_header);
    IF NOT v.valid THEN
        NEW.reason := v.reason; RETURN NEW;
    END IF;
    NEW.signed_at := v.signed_at;

    BEGIN
        NEW.payload := NEW.body::jsonb;
    EXCEPTION WHEN others THEN
        NEW.reason := 'unparseable body: not JSON'; RETURN NEW;
    END;
    IF jsonb_typeof(NEW.payload) <> 'object' THEN
        NEW.payload := NULL; NEW.reason := 'unparseable body: not a JSON object'; RETURN NEW;
    END IF;
    NEW.provider_event_id := coalesce(v.event_id, NEW.payload ->> 'id');
    IF NEW.provider_event_id IS NULL OR length(NEW.provider_event_id) > 255 THEN
        NEW.reason := 'unparseable body: no event id'; RETURN NEW;
    END IF;
    NEW.event_type := left(NEW.payload ->> 'type', 255);
    NEW.object_id := left(coalesce(NEW.payload #>> '{data,object,id}', NEW.payload #>> '{data,id}'), 255);
    NEW.event_time := CASE WHEN jsonb_typeof(NEW.payload -> 'created') = 'number'
                           THEN to_timestamp((NEW.payload ->> 'created')::numeric::double precision)
                           ELSE v.signed_at END;

    -- One delivery of an event at a time; the loser of a race sees the winner's row.
    PERFORM pg_advisory_xact_lock(hashtextextended('billing.webhook:' || ep.id || ':' || NEW.provider_event_id, 0));
    SELECT e.id INTO applied_id FROM billing.webhook_events e
    WHERE e.endpoint_id = ep.id AND e.provider_event_id = NEW.provider_event_id AND e.status IN ('applied', 'superseded');
    IF FOUND THEN
        NEW.status := 'duplicate'; NEW.reason := 'already received as webhook event ' || applied_id;
        RETURN NEW;
    END IF;

    IF NEW.object_id IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('billing.webhook-object:' || ep.id || ':' || NEW.object_id, 0));
        SELECT o.newest_event_time INTO newest FROM billing.webhook_objects o
        WHERE o.endpoint_id = ep.id AND o.object_id = NEW.object_id;
        IF newest IS NOT NULL AND NEW.event_time < newest THEN
            NEW.status := 'superseded';
            NEW.reason := format('older than the newest event applied to %s (%s)', NEW.object_id, newest);
            RETURN NEW;
        END IF;
    END IF;

    handler := billing.webhook_handler_for(NEW, ep.scheme);
    IF handler IS NULL THEN
        NEW.status := 'applied'; NEW.reason := 'no handler for ' || coalesce(NEW.event_type, 'untyped events');
    ELSE
        BEGIN
            EXECUTE format('SELECT %s($1)', handler::regproc) INTO NEW.result USING NEW;
            NEW.status := 'applied';
        EXCEPTION WHEN others THEN
            -- the handler's side effects are rolled back with this block; a redelivery may succeed
            NEW.status := 'failed';
            NEW.error := SQLSTATE || ': ' || SQLERRM;
            RETURN NEW;
        END;
    END IF;
    IF NEW.object_id IS NOT NULL THEN
        INSERT INTO billing.webhook_objects AS o (endpoint_id, object_id, tenant_id, newest_event_time, newest_event_id)
        VALUES (ep.id, NEW.object_id, NEW.tenant_id, NEW.event_time, NEW.id)
        ON CONFLICT (endpoint_id, object_id) DO UPDATE
        SET newest_event_time = EXCLUDED.newest_event_time, newest_event_id = EXCLUDED.newest_event_id
        WHERE o.newest_event_time <= EXCLUDED.newest_event_time;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER webhook_events_intake BEFORE INSERT ON billing.webhook_events
    FOR EACH ROW EXECUTE FUNCTION billing.webhook_event_intake();
CREATE TRIGGER webhook_events_append_only BEFORE UPDATE OR DELETE ON billing.webhook_events
    FOR EACH ROW EXECUTE FUNCTION billing.reject_ledger_change();
CREATE TRIGGER webhook_events_no_truncate BEFORE TRUNCATE ON billing.webhook_events
    FOR EACH STATEMENT EXECUTE FUNCTION billing.reject_ledger_change();

-- Receive one delivery: what an HTTP handler calls with the request's headers
-- and raw body. Never raises for a bad delivery; the status says what happened.
CREATE FUNCTION billing.receive_webhook(endpoint text, headers jsonb, body text)
RETURNS TABLE (webhook_event_id bigint, status text, reason text, provider_event_id text,
               event_type text, result jsonb)
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
    INSERT INTO billing.webhook_events (endpoint, headers, body)
    VALUES (receive_webhook.endpoint, coalesce(receive_webhook.headers, '{}'), coalesce(receive_webhook.body, ''))
    RETURNING id, status, coalesce(reason, error), provider_event_id, event_type, result
$$;

-- ----- built-in Stripe projections -------------------------------------------

-- A paid top-up credits the account once, whichever event reports it first:
-- the grant key is the PaymentIntent id. The amount is what was paid
-- (amount_total / amount_received), never anything from metadata.
CREATE FUNCTION billing.stripe_credit_topup(ev billing.webhook_events) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    ep billing.webhook_endpoints;
    obj jsonb := ev.payload #> '{data,object}';
    paid bigint;
    payment text;
    account text;
    g record;
BEGIN
    SELECT * INTO ep FROM billing.webhook_endpoints WHERE id = ev.endpoint_id;
    IF ev.event_type = 'checkout.session.completed' THEN
        IF obj ->> 'payment_status' IS DISTINCT FROM 'paid' THEN
            RETURN jsonb_build_object('credited', false, 'why', 'checkout session is not paid');
        END IF;
        paid := (obj ->> 'amount_total')::bigint;
        payment := coalesce(obj ->> 'payment_intent', obj ->> 'id');
    ELSE
        paid := (obj ->> 'amount_received')::bigint;
        payment := obj ->> 'id';
    END IF;
    account := coalesce(obj #>> '{metadata,account}', obj ->> 'client_reference_id');
    IF account IS NULL THEN
        RAISE EXCEPTION 'no account to credit: set metadata.account or client_reference_id on the payment'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF paid IS NULL OR paid <= 0 OR payment IS NULL THEN
        RAISE EXCEPTION 'payment % has no positive amount paid', coalesce(payment, '?')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO g FROM billing."grant"(account, ep.credit_unit, paid * ep.credits_per_minor_unit,
        kind => 'topup', key => 'stripe:' || payment,
        -- the same for every event type that reports this payment, so it credits once
        metadata => jsonb_build_object('source', 'stripe', 'payment', payment));
    PERFORM billing.stripe_apply_reversals(ev.endpoint_id, payment);
    RETURN jsonb_build_object('credited', g.status = 'applied', 'grant_id', g.grant_id, 'account', account,
                              'amount', g.amount, 'payment', payment);
END
$$;

-- A refund (cumulative amount_refunded of the charge) or a dispute takes the
-- money back from the grant the payment funded: its unspent part first, the
-- rest as debt. Recorded per payment, so it also applies if it arrives first.
CREATE FUNCTION billing.stripe_reverse_payment(ev billing.webhook_events) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    obj jsonb := ev.payload #> '{data,object}';
    v_payment text := obj ->> 'payment_intent';
    v_source text;
    v_amount bigint;
BEGIN
    IF v_payment IS NULL THEN
        RAISE EXCEPTION '% for % names no payment_intent', ev.event_type, obj ->> 'id'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF ev.event_type = 'charge.refunded' THEN
        v_source := 'refunds';
        v_amount := (obj ->> 'amount_refunded')::bigint;
    ELSE
        v_source := 'dispute:' || (obj ->> 'id');
        v_amount := (obj ->> 'amount')::bigint;
    END IF;
    INSERT INTO billing.stripe_reversals AS r (endpoint_id, tenant_id, payment, source, amount)
    VALUES (ev.endpoint_id, ev.tenant_id, v_payment, v_source, greatest(v_amount, 0))
    ON CONFLICT (endpoint_id, payment, source) DO UPDATE
    SET amount = greatest(r.amount, EXCLUDED.amount), updated_at = now();
    RETURN billing.stripe_apply_reversals(ev.endpoint_id, v_payment);
END
$$;

-- Bring the grant funded by `payment` in line with everything reversed so far.
CREATE FUNCTION billing.stripe_apply_reversals(endpoint_id bigint, payment text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, billing, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    mult bigint;
    g billing.grants;
    target bigint;
    done bigint;
    r record;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('billing.stripe-payment:' || stripe_apply_reversals.endpoint_id || ':' || stripe_apply_reversals.payment, 0));
    SELECT credits_per_minor_unit INTO mult FROM billing.webhook_endpoints e WHERE e.id = stripe_apply_reversals.endpoint_id;
    SELECT coalesce(sum(amount), 0) * mult INTO target FROM billing.stripe_reversals s
    WHERE s.endpoint_id = stripe_apply_reversals.endpoint_id AND s.payment = stripe_apply_reversals.payment;
    IF target = 0 THEN
        RETURN jsonb_build_object('payment', stripe_apply_reversals.payment, 'reversed', 0);
    END IF;
    SELECT * INTO g FROM billing.grants WHERE tenant_id = billing.current_tenant() AND key = 'stripe:' || stripe_apply_reversals.payment;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('payment', stripe_apply_reversals.payment, 'reversed', 0, 'pending', target,
                                  'why', 'the payment has not been credited yet');
    END IF;
    SELECT coalesce(sum(-e.grant_amount) FILTER (WHERE e.kind = 'revoke'), 0)
         + coalesce(sum(e.debt_amount) FILTER (WHERE e.kind = 'debt'), 0)
    INTO done FROM billing.ledger_entries e WHERE e.grant_id = g.id;
    target := least(target, g.amount);
    IF target <= done THEN
        RETURN jsonb_build_object('payment', stripe_apply_reversals.payment, 'grant_id', g.id, 'reversed', 0, 'total_reversed', done);
    END IF;
    SELECT * INTO r FROM billing.reverse_grant(g.id, target - done);
    RETURN jsonb_build_object('payment', stripe_apply_reversals.payment, 'grant_id', g.id, 'reversed', target - done,
                              'revoked', r.revoked, 'debt_created', r.debt_created, 'total_reversed', target);
END
$$;

-- The handler for an event: the application's (endpoint-specific first), else
-- a built-in Stripe projection, else none.
CREATE FUNCTION billing.webhook_handler_for(ev billing.webhook_events, scheme text)
RETURNS regprocedure
LANGUAGE sql STABLE
SET search_path = pg_catalog, billing, pg_temp
AS $$
    SELECT coalesce(
        (SELECT h.handler FROM billing.webhook_handlers h
         WHERE h.tenant_id = ev.tenant_id AND h.event_type = ev.event_type AND h.endpoint IN (ev.endpoint, '*')
         ORDER BY h.endpoint = '*' LIMIT 1),
        CASE WHEN scheme = 'stripe' THEN
            CASE ev.event_type
                WHEN 'checkout.session.completed' THEN 'billing.stripe_credit_topup(billing.webhook_events)'::regprocedure
                WHEN 'payment_intent.succeeded' THEN 'billing.stripe_credit_topup(billing.webhook_events)'::regprocedure
                WHEN 'charge.refunded' THEN 'billing.stripe_reverse_payment(billing.webhook_events)'::regprocedure
                WHEN 'charge.dispute.created' THEN 'billing.stripe_reverse_payment(billing.webhook_events)'::regprocedure
            END
        END)
$$;
