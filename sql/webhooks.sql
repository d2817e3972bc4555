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
    created_at                 timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

-- What a payment in each currency credits: the pool unit, and the credits per
-- minor unit of the currency (provider amounts are in minor units: cents for
-- USD, yen for JPY, fils for KWD). A payment, refund or dispute in a currency
-- with no row here credits or reverses nothing; its event is recorded as
-- failed with the reason.
CREATE TABLE billing.webhook_currencies (
    endpoint_id            bigint NOT NULL REFERENCES billing.webhook_endpoints (id),
    tenant_id              text   NOT NULL,
    currency               text   NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    unit                   text   NOT NULL,
    credits_per_minor_unit bigint NOT NULL CHECK (credits_per_minor_unit > 0),
    PRIMARY KEY (endpoint_id, currency),
    FOREIGN KEY (tenant_id, unit) REFERENCES billing.units (tenant_id, unit)
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
-- same object is superseded instead of overwriting newer state. Each row is
-- also the lock that serialises deliveries concerning its object (or, keyed
-- 'event:<id>', an event that names no object; 'payment:<id>', the reversals
-- of one payment): a row lock only pg_billing can take, so no other role can
-- stall the intake, as it could by holding an advisory lock.
-- No foreign key to the endpoint: a row is made only by a delivery whose
-- own inbox row (which has one) names the same endpoint, in the same
-- transaction, so the inbox's key already keeps the endpoint; checking it
-- again was a statement of its own on every new object.
CREATE TABLE billing.webhook_objects (
    endpoint_id       bigint      NOT NULL,
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
    currency    text        NOT NULL,
    amount      bigint      NOT NULL CHECK (amount >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (endpoint_id, payment, source)
);

SELECT pg_catalog.pg_extension_config_dump('billing.webhook_endpoints', '');
SELECT pg_catalog.pg_extension_config_dump('billing.webhook_currencies', '');
SELECT pg_catalog.pg_extension_config_dump('billing.webhook_events', '');
SELECT pg_catalog.pg_extension_config_dump('billing.webhook_objects', '');
SELECT pg_catalog.pg_extension_config_dump('billing.webhook_handlers', '');
SELECT pg_catalog.pg_extension_config_dump('billing.stripe_reversals', '');
SELECT pg_catalog.pg_extension_config_dump('billing.webhook_endpoints_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.webhook_events_id_seq', '');

-- ----- configuration ---------------------------------------------------------

-- The exponent of a currency's minor unit as payment providers count amounts
-- (Stripe's zero-decimal and three-decimal currencies; every other currency 2).
CREATE FUNCTION billing.currency_exponent(currency text) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog
AS $$
    SELECT CASE
        WHEN lower(currency) = ANY (ARRAY['bif', 'clp', 'djf', 'gnf', 'jpy', 'kmf', 'krw', 'mga', 'pyg',
                                          'rwf', 'ugx', 'vnd', 'vuv', 'xaf', 'xof', 'xpf']) THEN 0
        WHEN lower(currency) = ANY (ARRAY['bhd', 'jod', 'kwd', 'omr', 'tnd']) THEN 3
        ELSE 2 END
$$;

-- Map payments in `currency` to credits in `unit`: either the unit's own
-- exponent (usd_mills: 3, so 10 credits per US cent; jpy: 0, so 1 per yen),
-- or credits_per_minor_unit directly (an allowance sold for money).
CREATE FUNCTION billing.map_webhook_currency(endpoint text, currency text, unit text,
                                             unit_exponent integer DEFAULT NULL,
                                             credits_per_minor_unit bigint DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    ep bigint;
    per_minor bigint := credits_per_minor_unit;
BEGIN
    IF endpoint IS NULL OR currency IS NULL OR unit IS NULL THEN
        RAISE EXCEPTION 'endpoint, currency and unit must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF currency !~ '^[A-Za-z]{3}$' THEN
        RAISE EXCEPTION 'invalid currency "%": an ISO 4217 code such as usd', left(currency, 40)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    currency := lower(currency);
    IF (unit_exponent IS NULL) = (per_minor IS NULL) THEN
        RAISE EXCEPTION 'give exactly one of unit_exponent and credits_per_minor_unit'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF unit_exponent IS NOT NULL THEN
        IF unit_exponent NOT BETWEEN billing.currency_exponent(currency) AND 18 THEN
            RAISE EXCEPTION 'invalid unit_exponent %: % amounts have % decimals, so a unit needs % to 18',
                unit_exponent, currency, billing.currency_exponent(currency), billing.currency_exponent(currency)
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'A credit cannot be a fraction of the currency''s minor unit.';
        END IF;
        per_minor := (10::numeric ^ (unit_exponent - billing.currency_exponent(currency)))::bigint;
    ELSIF per_minor <= 0 THEN
        RAISE EXCEPTION 'invalid credits_per_minor_unit %: must be greater than 0', per_minor
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT e.id INTO ep FROM billing.webhook_endpoints e
    WHERE e.tenant_id = billing.current_tenant() AND e.name = endpoint;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown webhook endpoint "%"', left(endpoint, 80) USING ERRCODE = 'undefined_object';
    END IF;
    PERFORM billing.define_unit(unit);
    INSERT INTO billing.webhook_currencies AS c (endpoint_id, tenant_id, currency, unit, credits_per_minor_unit)
    VALUES (ep, billing.current_tenant(), currency, unit, per_minor)
    ON CONFLICT ON CONSTRAINT webhook_currencies_pkey DO UPDATE
    SET unit = EXCLUDED.unit, credits_per_minor_unit = EXCLUDED.credits_per_minor_unit;
    RETURN per_minor;
END
$$;

CREATE FUNCTION billing.define_webhook_endpoint(
    name text, scheme text, secret text,
    tolerance_seconds integer DEFAULT 300,
    signature_header text DEFAULT 'x-signature',
    credit_unit text DEFAULT 'usd_cents',
    credits_per_minor_unit bigint DEFAULT 1,
    currency text DEFAULT 'usd')
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF name IS NULL OR scheme IS NULL OR secret IS NULL OR tolerance_seconds IS NULL
       OR signature_header IS NULL OR credit_unit IS NULL OR credits_per_minor_unit IS NULL
       OR currency IS NULL THEN
        RAISE EXCEPTION 'webhook endpoint settings must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF scheme = 'standard' AND secret !~ '^(whsec_)?[A-Za-z0-9+/]+={0,2}$' THEN
        RAISE EXCEPTION 'invalid secret: a Standard Webhooks secret is whsec_<base64>'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO billing.webhook_endpoints AS e
        (tenant_id, name, scheme, secret, tolerance_seconds, signature_header)
    VALUES (billing.current_tenant(), define_webhook_endpoint.name, define_webhook_endpoint.scheme,
            define_webhook_endpoint.secret, define_webhook_endpoint.tolerance_seconds,
            lower(define_webhook_endpoint.signature_header))
    ON CONFLICT (tenant_id, name) DO UPDATE
    SET scheme = EXCLUDED.scheme, secret = EXCLUDED.secret, tolerance_seconds = EXCLUDED.tolerance_seconds,
        signature_header = EXCLUDED.signature_header;
    PERFORM billing.map_webhook_currency(define_webhook_endpoint.name, define_webhook_endpoint.currency,
        define_webhook_endpoint.credit_unit,
        credits_per_minor_unit => define_webhook_endpoint.credits_per_minor_unit);
    RETURN name;
EXCEPTION WHEN check_violation OR string_data_right_truncation THEN
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
DECLARE until timestamptz;
BEGIN
    IF name IS NULL OR new_secret IS NULL OR keep_previous_for IS NULL THEN
        RAISE EXCEPTION 'name, new_secret and keep_previous_for must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF new_secret = '' OR keep_previous_for < interval '0' OR keep_previous_for > interval '30 days' THEN
        RAISE EXCEPTION 'invalid rotation: the new secret is not empty and the previous one is kept 0 to 30 days'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    until := now() + keep_previous_for;
    UPDATE billing.webhook_endpoints e
    SET previous_secret = e.secret, previous_secret_expires_at = until, secret = new_secret
    WHERE e.tenant_id = billing.current_tenant() AND e.name = rotate_webhook_secret.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown webhook endpoint "%"', left(name, 80) USING ERRCODE = 'undefined_object';
    END IF;
    RETURN until;
END
$$;

-- An application's handler runs with its owner's rights (see
-- billing.run_webhook_handler), so it may be any permanent function of the
-- right shape; a temporary one is refused, as it would run code that
-- another session planted.
CREATE FUNCTION billing.register_webhook_handler(event_type text, handler regprocedure, endpoint text DEFAULT '*')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF event_type IS NULL OR handler IS NULL OR endpoint IS NULL THEN
        RAISE EXCEPTION 'event_type, handler and endpoint must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_proc p WHERE p.oid = handler
                   AND p.prorettype = 'jsonb'::regtype AND p.pronargs = 1
                   AND p.proargtypes[0] = 'billing.webhook_events'::regtype) THEN
        RAISE EXCEPTION 'a webhook handler takes (billing.webhook_events) and returns jsonb'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_proc p WHERE p.oid = handler
               AND (p.pronamespace = pg_catalog.pg_my_temp_schema()
                    OR pg_catalog.pg_is_other_temp_schema(p.pronamespace))) THEN
        RAISE EXCEPTION '% is a temporary (pg_temp) function; a webhook handler must be a permanent function',
            handler USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO billing.webhook_handlers AS h (tenant_id, endpoint, event_type, handler)
    VALUES (billing.current_tenant(), register_webhook_handler.endpoint, register_webhook_handler.event_type,
            register_webhook_handler.handler)
    ON CONFLICT (tenant_id, endpoint, event_type) DO UPDATE SET handler = EXCLUDED.handler;
END
$$;

-- Delete deliveries that changed nothing (rejected, duplicate, failed) older
-- than `older_than`, in the session's tenant or, with all_tenants, in every
-- tenant. Applied and superseded events stay: they are the record of what was
-- applied and hold each event id once, forever. Returns how many were deleted.
CREATE FUNCTION billing.purge_webhook_events(older_than interval DEFAULT '30 days',
                                             all_tenants boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
    n bigint;
BEGIN
    IF older_than IS NULL OR all_tenants IS NULL THEN
        RAISE EXCEPTION 'older_than and all_tenants must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF older_than < interval '0' THEN
        RAISE EXCEPTION 'invalid older_than %: must not be negative', older_than
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    WITH gone AS (
        DELETE FROM billing.webhook_events e
        WHERE e.status IN ('rejected', 'duplicate', 'failed') AND e.received_at < now() - older_than
          AND (all_tenants OR e.tenant_id = tenant)
        RETURNING 1)
    SELECT count(*) INTO n FROM gone;
    RETURN n;
END
$$;

-- ----- intake ----------------------------------------------------------------

-- billing.lock_webhook_object (src/webhooks/intake.rs) queues the deliveries
-- concerning one object.

-- The longest prefix of `s` of at most `max_bytes` bytes, cut at a
-- character boundary (left() counts characters, which may be 4 bytes each).
CREATE FUNCTION billing.clip_bytes(s text, max_bytes integer) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT
SET search_path = pg_catalog
AS $$
DECLARE n integer := max_bytes;
BEGIN
    WHILE octet_length(left(s, n)) > max_bytes LOOP
        n := n - greatest((octet_length(left(s, n)) - max_bytes + 3) / 4, 1);
    END LOOP;
    RETURN left(s, n);
END
$$;

-- What a delivery that failed verification keeps: a sample of at most 2 KiB
-- of its body and of its headers, so an unauthenticated sender cannot fill
-- the disk.
CREATE FUNCTION billing.webhook_sample(ev billing.webhook_events) RETURNS billing.webhook_events
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    limit_bytes constant integer := 2048;
    h text;
BEGIN
    ev.endpoint := left(ev.endpoint, 100);
    ev.body := billing.clip_bytes(ev.body, limit_bytes);
    IF octet_length(ev.headers::text) > limit_bytes THEN
        -- escaping inside the JSON string makes the text longer: clip until it fits
        h := billing.clip_bytes(ev.headers::text, limit_bytes - 20);
        WHILE octet_length(jsonb_build_object('truncated', h)::text) > limit_bytes LOOP
            h := billing.clip_bytes(h, octet_length(h) - (octet_length(jsonb_build_object('truncated', h)::text) - limit_bytes));
        END LOOP;
        ev.headers := jsonb_build_object('truncated', h);
    END IF;
    RETURN ev;
END
$$;

-- billing.webhook_intake_decide (src/webhooks/intake.rs) verifies,
-- deduplicates, orders and applies one new delivery, and returns the row to
-- store, with its status and reason.
CREATE FUNCTION billing.webhook_event_intake() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
BEGIN
    -- A row that arrives already decided is a restore (pg_restore copies the
    -- inbox as it was); application roles can only insert endpoint, headers
    -- and body, so for them status is always 'received'.
    IF NEW.status <> 'received' THEN
        RETURN NEW;
    END IF;
    NEW := billing.webhook_intake_decide(NEW);
    -- What did not change anything keeps a sample: a delivery that failed
    -- verification, a duplicate, and a failure already on record (the first
    -- keeps its full body for forensics).
    -- (A condition with a query in it is planned on every call, so the
    -- query runs only for a failure.)
    IF NEW.status IN ('rejected', 'duplicate') THEN
        RETURN billing.webhook_sample(NEW);
    END IF;
    IF NEW.status = 'failed' THEN
        IF EXISTS (SELECT 1 FROM billing.webhook_events e WHERE e.endpoint_id = NEW.endpoint_id
                   AND e.provider_event_id = NEW.provider_event_id AND e.status = 'failed') THEN
            RETURN billing.webhook_sample(NEW);
        END IF;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER webhook_events_intake BEFORE INSERT ON billing.webhook_events
    FOR EACH ROW EXECUTE FUNCTION billing.webhook_event_intake();

-- The inbox is append-only, but for the retention of deliveries that changed
-- nothing (billing.purge_webhook_events): only rejected, duplicate and failed
-- rows may be deleted, and only the owner has DELETE at all.
CREATE FUNCTION billing.webhook_events_guard() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
BEGIN
    IF TG_OP = 'DELETE' AND OLD.status IN ('rejected', 'duplicate', 'failed') THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'billing.webhook_events is append-only: % of % deliveries is not allowed', TG_OP,
        coalesce(OLD.status, 'any')
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Deliveries that changed nothing are removed with billing.purge_webhook_events().';
END
$$;

CREATE TRIGGER webhook_events_append_only BEFORE UPDATE OR DELETE ON billing.webhook_events
    FOR EACH ROW EXECUTE FUNCTION billing.webhook_events_guard();
CREATE TRIGGER webhook_events_no_truncate BEFORE TRUNCATE ON billing.webhook_events
    FOR EACH STATEMENT EXECUTE FUNCTION billing.reject_ledger_change();

-- Receive one delivery: what an HTTP handler calls with the request's headers
-- and raw body. Never raises for what a sender controls; the status says what
-- happened.
CREATE FUNCTION billing.receive_webhook(endpoint text, headers jsonb, body text)
RETURNS TABLE (webhook_event_id bigint, status text, reason text, provider_event_id text,
               event_type text, result jsonb)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF receive_webhook.endpoint IS NULL THEN
        RAISE EXCEPTION 'endpoint must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    RETURN QUERY
    INSERT INTO billing.webhook_events AS e (endpoint, headers, body)
    VALUES (receive_webhook.endpoint, coalesce(receive_webhook.headers, '{}'), coalesce(receive_webhook.body, ''))
    RETURNING e.id, e.status, coalesce(e.reason, e.error), e.provider_event_id, e.event_type, e.result;
END
$$;

-- ----- built-in Stripe projections -------------------------------------------

-- The credits `amount` minor units of `currency` buy at an endpoint, and the
-- unit they are in; a currency the endpoint does not map is an error that the
-- intake records on the event.
CREATE FUNCTION billing.stripe_credits(endpoint_id bigint, currency text, amount bigint,
                                       OUT unit text, OUT credits bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, billing, pg_temp
AS $$
#variable_conflict use_variable
DECLARE per_minor bigint;
BEGIN
    SELECT c.unit, c.credits_per_minor_unit INTO unit, per_minor FROM billing.webhook_currencies c
    WHERE c.endpoint_id = stripe_credits.endpoint_id AND c.currency = lower(stripe_credits.currency);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'currency % is not credited by this endpoint (mapped: %)', coalesce(currency, 'missing'),
            (SELECT coalesce(string_agg(c.currency, ', ' ORDER BY c.currency), 'none')
             FROM billing.webhook_currencies c WHERE c.endpoint_id = stripe_credits.endpoint_id)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Map the currency with billing.map_webhook_currency(); nothing was credited.';
    END IF;
    IF amount::numeric * per_minor > 9223372036854775807 THEN
        RAISE EXCEPTION 'amount % % is beyond bigint in %', amount, currency, unit
            USING ERRCODE = 'numeric_value_out_of_range';
    END IF;
    credits := amount * per_minor;
END
$$;

-- A paid top-up is credited by billing.stripe_credit_topup (src/webhooks/topup.rs).
-- These are the payments it hands on, which buy something else than plain
-- credits.

-- A subscription's checkout: its payments buy the plan, not credits. The
-- checkout says whose customer it is (Stripe does not copy
-- client_reference_id onto the subscription), so the subscription's events
-- find the account (`account`, the one the checkout names).
CREATE FUNCTION billing.stripe_subscription_checkout(ev billing.webhook_events, account text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE obj jsonb := ev.payload #> '{data,object}';
BEGIN
    IF account IS NOT NULL AND jsonb_typeof(obj -> 'customer') = 'string' THEN
        PERFORM billing.account(account);
        INSERT INTO billing.provider_customers (tenant_id, provider, customer, account)
        VALUES (ev.tenant_id, 'stripe', obj ->> 'customer', account) ON CONFLICT DO NOTHING;
    END IF;
    RETURN jsonb_build_object('credited', false, 'customer', obj ->> 'customer', 'account', account,
        'why', 'a subscription checkout: its plan credit comes with the subscription');
END
$$;

-- The payment of a checkout intent (polled by the application, or reported
-- here first) or of an auto-reload request (the worker put the request's id
-- in the payment's metadata) is credited through what it pays for (`quote`,
-- 'checkout_intent' or 'reload_request', of id `id`): once, whichever
-- report comes first, as what was paid. The caller holds the payment's lock.
CREATE FUNCTION billing.stripe_quoted_payment(ev billing.webhook_events, quote text, id bigint,
                                              payment text, paid bigint) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    currency text := ev.payload #>> '{data,object,currency}';
    r record;
BEGIN
    IF quote = 'checkout_intent' THEN
        SELECT c.status = 'paid' AS credited, c.intent_id AS quote_id, c.grant_id, c.credited AS amount INTO r
        FROM billing.confirm_checkout(id, payment, paid, currency) c;
    ELSE
        SELECT c.status = 'completed' AS credited, c.request_id AS quote_id, c.grant_id, c.credited AS amount INTO r
        FROM billing.complete_reload(id, payment, paid, currency) c;
    END IF;
    -- a refund or dispute that arrived before the payment applies now
    PERFORM billing.stripe_apply_reversals(ev.endpoint_id, payment);
    RETURN jsonb_build_object('credited', r.credited, quote, r.quote_id, 'grant_id', r.grant_id,
                              'amount', r.amount, 'payment', payment);
END
$$;

-- Money the provider took back from a payment: a refund (the charge's
-- cumulative amount_refunded) or a dispute (its amount while the funds are
-- withdrawn: needs_response, under_review, lost; 0 once won or reinstated,
-- for an inquiry (warning_*), which withdraws nothing, and when prevented,
-- which Stripe settles with a refund). Recorded per payment and source, so it also applies if it
-- arrives before the payment, and brought to the grant as one total.
CREATE FUNCTION billing.stripe_reverse_payment(ev billing.webhook_events) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    obj jsonb := ev.payload #> '{data,object}';
    v_payment text := obj ->> 'payment_intent';
    v_source text;
    v_amount bigint;
    v_status text := obj ->> 'status';
    v_subscription boolean;
BEGIN
    IF v_payment IS NULL THEN
        RAISE EXCEPTION '% for % names no payment_intent', ev.event_type, obj ->> 'id'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- a subscription's payment bought its plan, not credits (whatever the
    -- currency); a top-up's currency must be one the endpoint credits
    v_subscription := EXISTS (SELECT 1 FROM billing.subscription_invoices i
                              WHERE i.tenant_id = ev.tenant_id AND i.provider = 'stripe'
                                AND i.payment_intent = v_payment);
    IF NOT v_subscription AND billing.quoted_payment_per_minor(ev.tenant_id, v_payment) IS NULL THEN
        PERFORM billing.stripe_credits(ev.endpoint_id, obj ->> 'currency', 0);
    END IF;
    IF ev.event_type = 'charge.refunded' THEN
        v_source := 'refunds';
        v_amount := (obj ->> 'amount_refunded')::bigint;
    ELSE
        v_source := 'dispute:' || (obj ->> 'id');
        v_amount := CASE
            WHEN ev.event_type = 'charge.dispute.funds_reinstated' OR v_status = 'won' THEN 0
            -- an inquiry (warning_*) withdraws nothing; a prevented dispute is settled by a refund
            WHEN v_status LIKE 'warning%' OR v_status = 'prevented' THEN 0
            ELSE (obj ->> 'amount')::bigint END;
    END IF;
    -- the payment's lock is its own object's row (one row, not two, for a
    -- delivery about the payment itself)
    PERFORM billing.lock_webhook_object(ev.endpoint_id, ev.tenant_id, v_payment);
    INSERT INTO billing.stripe_reversals AS r (endpoint_id, tenant_id, payment, source, currency, amount)
    VALUES (ev.endpoint_id, ev.tenant_id, v_payment, v_source, lower(obj ->> 'currency'), greatest(v_amount, 0))
    ON CONFLICT (endpoint_id, payment, source) DO UPDATE
    -- refunds only grow; a dispute's events arrive in order (older ones are
    -- superseded), so its latest state is the one that counts
    SET amount = CASE WHEN r.source = 'refunds' THEN greatest(r.amount, EXCLUDED.amount) ELSE EXCLUDED.amount END,
        currency = EXCLUDED.currency, updated_at = now();
    IF v_subscription THEN
        -- a dispute holds the subscription's plan credit back; a refund leaves it alone
        RETURN jsonb_build_object('payment', v_payment, 'subscription_payment', true,
            'subscription', CASE WHEN v_source <> 'refunds'
                                 THEN billing.stripe_subscription_dispute(ev.tenant_id, v_payment) END);
    END IF;
    RETURN billing.stripe_apply_reversals(ev.endpoint_id, v_payment);
END
$$;

-- Bring the grant funded by `payment` to everything reversed so far: the sum
-- of its sources in credits, which reverse_grant caps at what the grant gave.
-- The caller holds the payment's lock.
CREATE FUNCTION billing.stripe_apply_reversals(endpoint_id bigint, payment text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, billing, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    g billing.grants;
    total bigint := 0;
    per_minor bigint;
    s record;
    r record;
BEGIN
    -- a checkout intent's or reload request's payment is taken back in its own credits per minor unit
    per_minor := billing.quoted_payment_per_minor(billing.current_tenant(), stripe_apply_reversals.payment);
    FOR s IN SELECT * FROM billing.stripe_reversals x
             WHERE x.endpoint_id = stripe_apply_reversals.endpoint_id AND x.payment = stripe_apply_reversals.payment LOOP
        total := total + coalesce(s.amount * per_minor,
            (billing.stripe_credits(stripe_apply_reversals.endpoint_id, s.currency, s.amount)).credits);
    END LOOP;
    IF NOT FOUND THEN
        RETURN NULL; -- nothing was ever taken back from this payment
    END IF;
    SELECT * INTO g FROM billing.grants
    WHERE tenant_id = billing.current_tenant() AND key = billing.payment_key(stripe_apply_reversals.payment);
    IF g.id IS NULL THEN
        RETURN jsonb_build_object('payment', stripe_apply_reversals.payment, 'reversed', 0, 'pending', total,
                                  'why', 'the payment has not been credited yet');
    END IF;
    SELECT * INTO r FROM billing.reverse_grant(g.id, total);
    RETURN jsonb_build_object('payment', stripe_apply_reversals.payment, 'grant_id', g.id, 'status', r.status,
                              'total_reversed', r.total, 'revoked', r.revoked, 'debt_created', r.debt_created,
                              'reinstated', r.reinstated);
END
$$;
