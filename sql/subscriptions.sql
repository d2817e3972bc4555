-- Plans and subscriptions: the catalogue, the provider's subscription state
-- projected into the database, and the plan credit each paid period opens
-- (docs/architecture.md, "Plans and subscriptions").

-- ----- the plan catalogue ------------------------------------------------------

-- One row per version of a plan. A changed definition is a new version;
-- subscriptions keep the version they bought until they change price.
CREATE TABLE billing.plans (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   text        NOT NULL,
    key         text        NOT NULL,
    version     integer     NOT NULL,
    name        text        NOT NULL,
    -- per unit: {"amount": <per period>, "per_seat": <bool>}
    allowances  jsonb       NOT NULL,
    -- [{"provider", "price_id", "interval", "interval_count", "amount", "currency"}]
    prices      jsonb       NOT NULL,
    priority    integer     NOT NULL,
    floor       bigint,
    trial_days  integer     NOT NULL,
    retired_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, key, version)
);

-- One row per plan key: changes to a key's versions queue on it (a row lock,
-- which no other role can take, unlike an advisory lock).
CREATE TABLE billing.plan_keys (
    tenant_id text NOT NULL,
    key       text NOT NULL,
    PRIMARY KEY (tenant_id, key)
);

-- The plan version a provider price subscribes to: the newest that lists it.
CREATE TABLE billing.plan_prices (
    tenant_id text   NOT NULL,
    provider  text   NOT NULL,
    price_id  text   NOT NULL,
    plan_id   bigint NOT NULL REFERENCES billing.plans (id),
    PRIMARY KEY (tenant_id, provider, price_id)
);

-- ----- subscriptions -----------------------------------------------------------

-- One provider customer per account and one account per provider customer.
CREATE TABLE billing.provider_customers (
    tenant_id  text        NOT NULL,
    provider   text        NOT NULL,
    customer   text        NOT NULL,
    account    text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, provider, customer),
    UNIQUE (tenant_id, provider, account)
);

-- Statuses as providers have them, and what each means for plan credit; a
-- live subscription is held back (`held`) while the provider collects no
-- payment for it or a payment of it is disputed with the funds withdrawn.
CREATE FUNCTION billing.subscription_access(status text, held boolean DEFAULT false) RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog
AS $$
#variable_conflict use_column
BEGIN
    RETURN CASE
        WHEN status IN ('active', 'trialing') AND held THEN 'suspended'
        WHEN status IN ('active', 'trialing') THEN 'open'
        -- held back, not voided: recovery restores the rest of the period
        WHEN status IN ('past_due', 'unpaid', 'incomplete', 'paused') THEN 'suspended'
        WHEN status IN ('canceled', 'incomplete_expired') THEN 'ended'
    END;
END
$$;

-- Whether a subscription holds its account's one live place: it is neither
-- ended nor an `incomplete` checkout (not paid yet, and it may never be).
CREATE FUNCTION billing.subscription_is_live(status text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog
AS $$
#variable_conflict use_column
BEGIN
    RETURN status <> 'incomplete' AND billing.subscription_access(status) <> 'ended';
END
$$;

-- The provider's subscription as last observed. `ends_at` is the one
-- meaning of the provider's cancellation fields: the instant access ends
-- (cancel_at, the period end under cancel_at_period_end, or when it ended);
-- NULL while it renews.
CREATE TABLE billing.subscriptions (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    text        NOT NULL,
    account      text        NOT NULL,
    provider     text        NOT NULL,
    provider_id  text        NOT NULL,
    customer     text,
    status       text        NOT NULL,
    plan_id      bigint      NOT NULL REFERENCES billing.plans (id),
    price_id     text        NOT NULL,
    seats        integer     NOT NULL,
    period_start timestamptz NOT NULL,
    period_end   timestamptz NOT NULL,
    ends_at      timestamptz,
    trial_end    timestamptz,
    -- the provider collects no payment (Stripe's pause_collection)
    collection_paused boolean NOT NULL DEFAULT false,
    -- a dispute of one of its payments has the funds withdrawn
    disputed     boolean     NOT NULL DEFAULT false,
    -- the end of the latest billing period known to be paid (an invoice paid,
    -- or the first period of a subscription that became active)
    paid_through timestamptz,
    -- the provider's time of the state applied (the event's, or the poll's)
    observed_at  timestamptz NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, provider, provider_id),
    FOREIGN KEY (tenant_id, account) REFERENCES billing.accounts (tenant_id, account)
);
-- At most one live subscription per account, whatever the concurrency: an
-- `incomplete` one holds no place, the first to become live takes it.
CREATE UNIQUE INDEX subscriptions_one_live ON billing.subscriptions (tenant_id, account)
    WHERE billing.subscription_is_live(status);
-- An account's subscriptions, whatever their state (its projections, the
-- gate's reason for credit held back, the allowances a new plan replaces):
-- without it each of those scans every subscription of every tenant.
CREATE INDEX subscriptions_by_account ON billing.subscriptions (tenant_id, account);

-- A subscription refused because its account already had a live one (two
-- parallel checkouts): the application refunds or cancels it.
CREATE TABLE billing.subscription_conflicts (
    id                   bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id            text        NOT NULL,
    account              text        NOT NULL,
    provider             text        NOT NULL,
    provider_id          text        NOT NULL,
    -- NULL if it ended before the conflict was recorded
    live_subscription_id bigint,
    status               text        NOT NULL,
    subscription         jsonb       NOT NULL,
    observed_at          timestamptz NOT NULL,
    recorded_at          timestamptz NOT NULL DEFAULT now(),
    -- applied once the live subscription ended, or once it ended itself
    resolved_at          timestamptz,
    UNIQUE (tenant_id, provider, provider_id)
);

-- Every change a projection applied to a subscription, with where the
-- observation came from: a poll that changes something found what no event
-- had delivered (billing.subscription_drift).
CREATE TABLE billing.subscription_changes (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       text        NOT NULL,
    subscription_id bigint      NOT NULL REFERENCES billing.subscriptions (id),
    account         text        NOT NULL,
    source          text        NOT NULL,
    observed_at     timestamptz NOT NULL,
    changes         jsonb       NOT NULL,
    credit          jsonb       NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscription_changes_by_subscription ON billing.subscription_changes (subscription_id, id);

-- Invoices of subscriptions, as last observed: a paid one opens the billing
-- period it bills, also when it arrives before the subscription's renewal.
CREATE TABLE billing.subscription_invoices (
    tenant_id    text        NOT NULL,
    provider     text        NOT NULL,
    invoice_id   text        NOT NULL,
    subscription text        NOT NULL,
    status       text        NOT NULL,
    billing_reason text,
    amount_paid  bigint      NOT NULL,
    currency     text,
    -- its subscription lines (billing.stripe_invoice_lines), and its own
    -- period_end, which pays only an invoice without such lines
    lines        jsonb       NOT NULL DEFAULT '[]',
    period_end   timestamptz,
    -- the payment that paid it (a dispute of it holds the plan credit back)
    payment_intent text,
    observed_at  timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, provider, invoice_id)
);
CREATE INDEX subscription_invoices_by_payment
    ON billing.subscription_invoices (tenant_id, provider, payment_intent) WHERE payment_intent IS NOT NULL;
CREATE INDEX subscription_invoices_by_subscription
    ON billing.subscription_invoices (tenant_id, provider, subscription);

-- Which payment paid an invoice, as Stripe's invoice_payment objects say
-- (newer API versions no longer put it on the invoice); kept for an invoice
-- not seen yet.
CREATE TABLE billing.invoice_payments (
    tenant_id      text        NOT NULL,
    provider       text        NOT NULL,
    invoice_id     text        NOT NULL,
    payment_intent text        NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, provider, invoice_id)
);

-- The plan credit opened for one allowance period of a subscription, per
-- unit: the ceiling it was raised to (never lowered within the period) and
-- the grants that gave it.
CREATE TABLE billing.subscription_allowances (
    id              bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,
    subscription_id bigint      NOT NULL REFERENCES billing.subscriptions (id),
    tenant_id       text        NOT NULL,
    unit            text        NOT NULL,
    starts_at       timestamptz NOT NULL,
    ends_at         timestamptz NOT NULL,
    ceiling         bigint      NOT NULL,
    grant_ids       bigint[]    NOT NULL DEFAULT '{}',
    PRIMARY KEY (subscription_id, unit, starts_at)
);

-- Seats counted from the application's own membership table (count_seats),
-- per account; a per-seat allowance follows the higher of this and the
-- provider's quantity.
CREATE TABLE billing.seats (
    tenant_id  text        NOT NULL,
    account    text        NOT NULL,
    seats      integer     NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, account),
    FOREIGN KEY (tenant_id, account) REFERENCES billing.accounts (tenant_id, account)
);

-- Seat counts the provider must be told about (an outbox): one pending row
-- per account, holding the latest count, until the application's worker
-- pushed it and acknowledged that count.
CREATE TABLE billing.seat_pushes (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id  text        NOT NULL,
    account    text        NOT NULL,
    seats      integer     NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    pushed_at  timestamptz
);
CREATE UNIQUE INDEX seat_pushes_one_pending ON billing.seat_pushes (tenant_id, account) WHERE pushed_at IS NULL;

SELECT pg_catalog.pg_extension_config_dump('billing.subscription_changes', '');
SELECT pg_catalog.pg_extension_config_dump('billing.subscription_changes_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.seats', '');
SELECT pg_catalog.pg_extension_config_dump('billing.seat_pushes', '');
SELECT pg_catalog.pg_extension_config_dump('billing.seat_pushes_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.plans', '');
SELECT pg_catalog.pg_extension_config_dump('billing.plans_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.plan_keys', '');
SELECT pg_catalog.pg_extension_config_dump('billing.plan_prices', '');
SELECT pg_catalog.pg_extension_config_dump('billing.provider_customers', '');
SELECT pg_catalog.pg_extension_config_dump('billing.subscriptions', '');
SELECT pg_catalog.pg_extension_config_dump('billing.subscriptions_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.subscription_conflicts', '');
SELECT pg_catalog.pg_extension_config_dump('billing.subscription_conflicts_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.subscription_allowances', '');
SELECT pg_catalog.pg_extension_config_dump('billing.subscription_allowances_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.subscription_invoices', '');
SELECT pg_catalog.pg_extension_config_dump('billing.invoice_payments', '');

-- Whether a subscription's current billing period is paid for: a trial is
-- free; otherwise an invoice billing it was paid (or, for the first period,
-- the provider activated it), which raised paid_through into the period.
CREATE FUNCTION billing.subscription_paid(s billing.subscriptions) RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog
AS $$
#variable_conflict use_column
BEGIN
    RETURN s.status = 'trialing' OR coalesce(s.paid_through > s.period_start, false);
END
$$;

-- Whether a provider can move a subscription from `was` to `becomes`: an
-- ended subscription never lives again, and one that was paid for never
-- returns to `incomplete`. An observation that would do either is older
-- than the one applied, whatever its timestamp says (events of the same
-- second arrive in any order).
CREATE FUNCTION billing.subscription_can_become(was text, becomes text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE STRICT
SET search_path = pg_catalog
AS $$
#variable_conflict use_column
BEGIN
    RETURN NOT (billing.subscription_access(was) = 'ended' AND was <> becomes)
       AND NOT (becomes = 'incomplete' AND was <> 'incomplete');
END
$$;

-- ----- defining plans ---------------------------------------------------------

CREATE FUNCTION billing.define_plan(
    key text,
    allowances jsonb,
    prices jsonb DEFAULT '[]',
    name text DEFAULT NULL,
    priority integer DEFAULT 10,
    floor bigint DEFAULT NULL,
    trial_days integer DEFAULT 0)
RETURNS TABLE (plan_id bigint, plan_key text, version integer, status text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
    a record;
    p jsonb;
    clean_allowances jsonb := '{}';
    clean_prices jsonb := '[]';
    latest billing.plans;
    other text;
    made billing.plans;
BEGIN
    IF key IS NULL OR allowances IS NULL OR prices IS NULL OR priority IS NULL OR trial_days IS NULL THEN
        RAISE EXCEPTION 'key, allowances, prices, priority and trial_days may not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF key !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$' THEN
        RAISE EXCEPTION 'invalid plan key %: letters, digits and _ . : - , at most 100', key
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(allowances) <> 'object' THEN
        RAISE EXCEPTION 'allowances must be an object of unit -> {"amount": n, "per_seat": bool}'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR a IN SELECT e.key AS unit, e.value FROM jsonb_each(allowances) e ORDER BY e.key LOOP
        IF jsonb_typeof(a.value) <> 'object' OR jsonb_typeof(a.value -> 'amount') <> 'number'
           OR (a.value ->> 'amount') !~ '^[0-9]{1,18}$'
           OR coalesce(jsonb_typeof(a.value -> 'per_seat'), 'boolean') <> 'boolean'
           OR EXISTS (SELECT 1 FROM jsonb_object_keys(a.value) k WHERE k NOT IN ('amount', 'per_seat')) THEN
            RAISE EXCEPTION 'allowance of %: expected {"amount": <whole number >= 0>, "per_seat": <bool>}, got %',
                a.unit, a.value USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF NOT EXISTS (SELECT 1 FROM billing.units u WHERE u.tenant_id = tenant AND u.unit = a.unit) THEN
            RAISE EXCEPTION 'unknown unit %', a.unit USING ERRCODE = 'undefined_object',
                HINT = 'Create it with billing.define_unit() first.';
        END IF;
        clean_allowances := clean_allowances || jsonb_build_object(a.unit, jsonb_build_object(
            'amount', (a.value ->> 'amount')::bigint,
            'per_seat', coalesce((a.value ->> 'per_seat')::boolean, false)));
    END LOOP;
    IF clean_allowances = '{}' THEN
        RAISE EXCEPTION 'a plan needs an allowance in at least one unit' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(prices) <> 'array' THEN
        RAISE EXCEPTION 'prices must be an array of {"price_id", "interval", "interval_count", "amount", "currency"}'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR p IN SELECT e FROM jsonb_array_elements(prices) e LOOP
        IF jsonb_typeof(p) <> 'object' OR jsonb_typeof(p -> 'price_id') <> 'string'
           OR length(p ->> 'price_id') NOT BETWEEN 1 AND 255
           OR coalesce(p ->> 'interval', '') NOT IN ('day', 'week', 'month', 'year')
           OR coalesce(p ->> 'interval_count', '1') !~ '^[1-9][0-9]{0,2}$'
           OR coalesce(p ->> 'amount', '0') !~ '^[0-9]{1,18}$'
           OR coalesce(p ->> 'currency', 'usd') !~ '^[a-z]{3}$'
           OR coalesce(p ->> 'provider', 'stripe') !~ '^[a-z0-9_]{1,50}$' THEN
            RAISE EXCEPTION 'price %: expected {"price_id": text, "interval": day|week|month|year, "interval_count": 1.., "amount": minor units, "currency": iso code, "provider": "stripe"}',
                p USING ERRCODE = 'invalid_parameter_value';
        END IF;
        clean_prices := clean_prices || jsonb_build_array(jsonb_build_object(
            'provider', coalesce(p ->> 'provider', 'stripe'), 'price_id', p ->> 'price_id',
            'interval', p ->> 'interval', 'interval_count', coalesce((p ->> 'interval_count')::integer, 1),
            'amount', coalesce((p ->> 'amount')::bigint, 0), 'currency', coalesce(p ->> 'currency', 'usd')));
    END LOOP;
    IF priority NOT BETWEEN 0 AND 1000 THEN
        RAISE EXCEPTION 'priority must be between 0 and 1000' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF trial_days NOT BETWEEN 0 AND 730 THEN
        RAISE EXCEPTION 'trial_days must be between 0 and 730' USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- one definition of a plan key at a time
    INSERT INTO billing.plan_keys AS k (tenant_id, key) VALUES (tenant, define_plan.key)
    ON CONFLICT ON CONSTRAINT plan_keys_pkey DO UPDATE SET key = k.key;
    SELECT * INTO latest FROM billing.plans pl WHERE pl.tenant_id = tenant AND pl.key = define_plan.key
    ORDER BY pl.version DESC LIMIT 1;
    IF FOUND AND latest.retired_at IS NOT NULL THEN
        RAISE EXCEPTION 'plan % is retired', key USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'A retired plan keeps serving its subscriptions; define a plan under a new key.';
    END IF;
    SELECT pl.key INTO other FROM billing.plan_prices pp JOIN billing.plans pl ON pl.id = pp.plan_id
    JOIN jsonb_array_elements(clean_prices) np ON np ->> 'provider' = pp.provider AND np ->> 'price_id' = pp.price_id
    WHERE pp.tenant_id = tenant AND pl.key <> define_plan.key LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'a price of this definition already belongs to plan %', other
            USING ERRCODE = 'invalid_parameter_value', HINT = 'A provider price maps to exactly one plan.';
    END IF;
    IF latest.id IS NOT NULL
       AND latest.name = coalesce(define_plan.name, key) AND latest.allowances = clean_allowances
       AND latest.prices = clean_prices AND latest.priority = define_plan.priority
       AND latest.floor IS NOT DISTINCT FROM define_plan.floor AND latest.trial_days = define_plan.trial_days THEN
        RETURN QUERY SELECT latest.id, latest.key, latest.version, 'unchanged'::text;
        RETURN;
    END IF;
    INSERT INTO billing.plans AS pl (tenant_id, key, version, name, allowances, prices, priority, floor, trial_days)
    VALUES (tenant, key, coalesce(latest.version, 0) + 1, coalesce(name, key), clean_allowances, clean_prices,
            priority, floor, trial_days)
    RETURNING pl.* INTO made;
    INSERT INTO billing.plan_prices AS pp (tenant_id, provider, price_id, plan_id)
    SELECT tenant, np ->> 'provider', np ->> 'price_id', made.id FROM jsonb_array_elements(clean_prices) np
    ON CONFLICT (tenant_id, provider, price_id) DO UPDATE SET plan_id = excluded.plan_id;
    RETURN QUERY SELECT made.id, made.key, made.version, 'created'::text;
END
$$;

CREATE FUNCTION billing.retire_plan(key text)
RETURNS TABLE (plan_key text, versions integer, retired_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
    n integer;
    at timestamptz;
BEGIN
    IF key IS NULL THEN
        RAISE EXCEPTION 'key may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM 1 FROM billing.plan_keys k WHERE k.tenant_id = tenant AND k.key = retire_plan.key FOR UPDATE;
    SELECT count(*), min(pl.retired_at) INTO n, at FROM billing.plans pl
    WHERE pl.tenant_id = tenant AND pl.key = retire_plan.key;
    IF n = 0 THEN
        RAISE EXCEPTION 'unknown plan %', key USING ERRCODE = 'undefined_object';
    END IF;
    IF at IS NULL AND EXISTS (SELECT 1 FROM billing.default_plans d JOIN billing.plans pl ON pl.id = d.plan_id
                              WHERE d.tenant_id = tenant AND pl.key = retire_plan.key) THEN
        RAISE EXCEPTION 'plan % is the tenant''s default plan', key USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'Make another plan the default first (billing.set_default_plan).';
    END IF;
    IF at IS NULL THEN
        at := now();
        UPDATE billing.plans pl SET retired_at = at WHERE pl.tenant_id = tenant AND pl.key = retire_plan.key;
    END IF;
    RETURN QUERY SELECT key, n, at;
END
$$;

-- ----- the projection of a provider's subscription -----------------------------

-- The id a Stripe field names, whether it holds the id or the expanded object.
CREATE FUNCTION billing.stripe_id(v jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog
AS $$
#variable_conflict use_column
BEGIN
    RETURN CASE jsonb_typeof(v) WHEN 'string' THEN v #>> '{}' WHEN 'object' THEN v ->> 'id' END;
END
$$;

-- The price of a Stripe subscription item (`plan` in the oldest API versions).
CREATE FUNCTION billing.stripe_item_price(item jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog
AS $$
#variable_conflict use_column
BEGIN
    RETURN coalesce(item #>> '{price,id}', item #>> '{plan,id}');
END
$$;

-- An observation of the provider's state must not come from the future (time
-- is the database's): it would make every later observation stale.
CREATE FUNCTION billing.check_observed_at(observed_at timestamptz) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog
AS $$
BEGIN
    IF observed_at > now() + interval '5 minutes' OR NOT isfinite(observed_at) THEN
        RAISE EXCEPTION 'observed_at % is in the future', observed_at
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass the time the object was fetched from the provider, or leave it out (now()).';
    END IF;
END
$$;

-- A Stripe timestamp field (seconds since the epoch) as an instant.
CREATE FUNCTION billing.stripe_instant(v jsonb) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog
AS $$
#variable_conflict use_column
BEGIN
    RETURN CASE WHEN jsonb_typeof(v) = 'number' AND (v #>> '{}')::numeric BETWEEN 0 AND 253402300799
                THEN to_timestamp((v #>> '{}')::double precision) END;
END
$$;

-- The subscription a Stripe invoice bills (newer API versions: its parent's
-- subscription_details; older ones: `subscription`), or NULL.
CREATE FUNCTION billing.stripe_invoice_subscription(inv jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, billing
AS $$
#variable_conflict use_column
BEGIN
    RETURN coalesce(billing.stripe_id(inv #> '{parent,subscription_details,subscription}'),
                    billing.stripe_id(inv -> 'subscription'));
END
$$;

-- The subscription lines of a Stripe invoice, as what the paid gate needs of
-- each: its price (newer API versions: pricing.price_details.price; older:
-- price.id), the end of the period it bills, and whether it is a proration.
CREATE FUNCTION billing.stripe_invoice_lines(inv jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, billing
AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'price', coalesce(l #>> '{pricing,price_details,price}', billing.stripe_item_price(l)),
               'end', billing.stripe_instant(l #> '{period,end}'),
               'proration', coalesce(l #>> '{parent,subscription_item_details,proration}', l ->> 'proration',
                                     'false') = 'true')), '[]')
    FROM jsonb_array_elements(CASE WHEN jsonb_typeof(inv #> '{lines,data}') = 'array'
                                   THEN inv #> '{lines,data}' ELSE '[]' END) l
    WHERE l #>> '{parent,type}' = 'subscription_item_details' OR jsonb_typeof(l -> 'subscription') = 'string'
$$;

-- How far a paid invoice pays a subscription on `price`: the latest end of
-- its lines for that price that are not prorations (a renewal's lines bill
-- the new period, while the invoice's own period_end is the previous one's
-- end; a proration of a mid-period change or an add-on on another interval
-- pays no period of the plan); an invoice without subscription lines pays to
-- its period_end (`otherwise`).
CREATE FUNCTION billing.invoice_paid_through(lines jsonb, price text, otherwise timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog
AS $$
    SELECT CASE WHEN jsonb_array_length(lines) = 0 THEN otherwise
                ELSE (SELECT max((l ->> 'end')::timestamptz) FROM jsonb_array_elements(lines) l
                      WHERE NOT (l ->> 'proration')::boolean
                        AND (price IS NULL OR l ->> 'price' IS NULL OR l ->> 'price' = price)) END
$$;

-- The PaymentIntent that paid a Stripe invoice: `payment_intent` (older API
-- versions), or the first of its `payments` (newer ones).
CREATE FUNCTION billing.stripe_invoice_payment(inv jsonb) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, billing
AS $$
    SELECT coalesce(
        billing.stripe_id(inv -> 'payment_intent'),
        (SELECT billing.stripe_id(p #> '{payment,payment_intent}')
         FROM jsonb_array_elements(CASE WHEN jsonb_typeof(inv #> '{payments,data}') = 'array'
                                        THEN inv #> '{payments,data}' ELSE '[]' END) p
         WHERE p #> '{payment,payment_intent}' IS NOT NULL LIMIT 1))
$$;

-- A dispute of `payment` (recorded in stripe_reversals by the dispute
-- projection): if it paid a subscription's invoice, the subscription's plan
-- credit is held back while a dispute has the funds withdrawn, and comes back
-- when it is won (a refund leaves the subscription alone). Returns what it did
-- to the credit, or NULL if the payment is no subscription's.
CREATE FUNCTION billing.stripe_subscription_dispute(tenant text, payment text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    s billing.subscriptions;
    withdrawn boolean;
    given jsonb;
BEGIN
    SELECT x.* INTO s FROM billing.subscription_invoices i
    JOIN billing.subscriptions x ON x.tenant_id = i.tenant_id AND x.provider = i.provider
                                AND x.provider_id = i.subscription
    WHERE i.tenant_id = tenant AND i.provider = 'stripe' AND i.payment_intent = payment
    LIMIT 1 FOR UPDATE OF x;
    IF s.id IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT coalesce(bool_or(r.amount > 0), false) INTO withdrawn FROM billing.stripe_reversals r
    WHERE r.tenant_id = tenant AND r.payment = stripe_subscription_dispute.payment AND r.source LIKE 'dispute:%';
    IF withdrawn = s.disputed THEN
        RETURN '{}'::jsonb;
    END IF;
    UPDATE billing.subscriptions x SET disputed = withdrawn, updated_at = now() WHERE x.id = s.id
    RETURNING x.* INTO s;
    given := billing.subscription_credit(s);
    PERFORM billing.record_subscription_change(s, 'dispute', now(),
        jsonb_build_object('disputed', jsonb_build_array(NOT withdrawn, withdrawn)), given);
    RETURN given;
END
$$;

-- Revoke what is unused of some plan grants (a voided one gives nothing) and
-- return what they consumed, counted under each pool's lock (lane shares
-- included).
CREATE FUNCTION billing.revoke_plan_grants(grant_ids bigint[]) RETURNS bigint
LANGUAGE sql
SET search_path = pg_catalog, billing, pg_temp
AS $$
    SELECT coalesce(sum(r.consumed), 0)::bigint
    FROM unnest(grant_ids) AS gid(id)
    JOIN billing.grants gr ON gr.id = gid.id AND gr.status IN ('active', 'suspended', 'revoked')
    CROSS JOIN LATERAL billing.revoke_unused(gr.id) r
$$;

-- Close every other plan allowance of (account, unit) still running at `at`:
-- its unused credit is revoked, and what was used of it is returned, to count
-- against the allowance that replaces it (an upgrade, a plan or interval
-- switch, a cancellation and resubscription in one period).
CREATE FUNCTION billing.close_overlapping_allowances(tenant text, account text, unit text,
                                                    keep_subscription bigint, keep_start timestamptz,
                                                    at timestamptz)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    used bigint := 0;
    a record;
BEGIN
    FOR a IN
        SELECT sa.grant_ids
        FROM billing.subscription_allowances sa
        JOIN billing.subscriptions s ON s.id = sa.subscription_id
        WHERE s.tenant_id = tenant AND s.account = close_overlapping_allowances.account
          AND sa.unit = close_overlapping_allowances.unit
          AND NOT (sa.subscription_id = keep_subscription AND sa.starts_at = keep_start)
          AND sa.starts_at <= at AND at < sa.ends_at
        ORDER BY sa.id
    LOOP
        used := used + billing.revoke_plan_grants(a.grant_ids);
    END LOOP;
    -- the default plan's window running now (billing.apply_default_plan)
    used := used + billing.revoke_plan_grants(ARRAY(
        SELECT g.id FROM billing.allowances da
        JOIN billing.grants g ON g.pool_id = da.pool_id AND g.parent_id IS NULL
                             AND billing.allowance_rule_of(g.key) = da.id
        WHERE da.tenant_id = tenant AND da.account = close_overlapping_allowances.account
          AND da.unit = close_overlapping_allowances.unit AND da.default_plan IS NOT NULL
          -- (a window granted by a transaction that began after this one is
          -- still this month's: its effective_at may be later than now())
          AND (g.expires_at IS NULL OR greatest(at, now()) < g.expires_at)
        ORDER BY g.id));
    RETURN used;
END
$$;

-- Bring a subscription's plan credit to what its state says, and report it:
--   open       every allowance period of the billing period that has not
--              ended (and starts before access ends) holds the plan's
--              allowance, raised at once to a higher one (an upgrade, a seat
--              added) and never lowered within it; suspended credit resumes
--   suspended  its plan credit is held back (not voided)
--   ended      its unused plan credit is revoked; what was used stays used
CREATE FUNCTION billing.subscription_credit(s billing.subscriptions) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    plan billing.plans;
    access text := billing.subscription_access(s.status, s.collection_paused OR s.disputed);
    p record;
    u record;
    a billing.subscription_allowances;
    target bigint;
    counted integer;
    give bigint;
    used bigint;
    g record;
    granted bigint := 0;
    suspended integer := 0;
    resumed integer := 0;
    revoked bigint := 0;
    made record;
BEGIN
    SELECT * INTO plan FROM billing.plans pl WHERE pl.id = s.plan_id;
    SELECT coalesce(max(x.seats), 0) INTO counted FROM billing.seats x
    WHERE x.tenant_id = s.tenant_id AND x.account = s.account;
    FOR g IN
        SELECT gr.id, gr.status, gr.expires_at, sa.starts_at
        FROM billing.subscription_allowances sa
        CROSS JOIN LATERAL unnest(sa.grant_ids) AS gid(id)
        JOIN billing.grants gr ON gr.id = gid.id
        WHERE sa.subscription_id = s.id AND gr.status IN ('active', 'suspended')
          -- a suspended grant keeps its credit past its expiry until resumed
          AND (gr.status = 'suspended' OR gr.expires_at IS NULL OR gr.expires_at > now())
        ORDER BY gr.id
    LOOP
        IF g.status = 'suspended' AND g.expires_at <= now() THEN
            -- its time passed while held back: resuming records its expiry
            PERFORM billing.resume_grant(g.id);
        ELSIF access = 'ended' OR (s.ends_at IS NOT NULL AND g.starts_at >= s.ends_at) THEN
            SELECT r.removed INTO made FROM billing.revoke_unused(g.id) r;
            revoked := revoked + made.removed;
        ELSIF access = 'suspended' AND g.status = 'active' THEN
            PERFORM billing.suspend_grant(g.id);
            suspended := suspended + 1;
        ELSIF access = 'open' AND g.status = 'suspended' THEN
            PERFORM billing.resume_grant(g.id);
            resumed := resumed + 1;
        END IF;
    END LOOP;
    -- allowance periods that had not started when access ended were never
    -- used (their grants were revoked above): back to nothing, so a
    -- reactivation opens them afresh
    UPDATE billing.subscription_allowances sa SET ceiling = 0
    WHERE sa.subscription_id = s.id AND sa.starts_at > now() AND sa.ceiling > 0
      AND (access = 'ended' OR sa.starts_at >= s.ends_at);
    -- a billing period is paid for once an invoice billing it is paid; a trial is free
    IF access = 'open' AND billing.subscription_paid(s) THEN
        FOR p IN
            SELECT ap.starts_at, ap.ends_at FROM billing.allowance_periods(s.period_start, s.period_end) ap
            WHERE ap.ends_at > now() AND (s.ends_at IS NULL OR ap.starts_at < s.ends_at)
            ORDER BY ap.starts_at
        LOOP
            FOR u IN
                SELECT e.key AS unit, (e.value ->> 'amount')::bigint AS amount,
                       (e.value ->> 'per_seat')::boolean AS per_seat
                FROM jsonb_each(plan.allowances) e ORDER BY e.key
            LOOP
                target := u.amount * CASE WHEN u.per_seat THEN greatest(s.seats, counted) ELSE 1 END;
                SELECT * INTO a FROM billing.subscription_allowances sa
                WHERE sa.subscription_id = s.id AND sa.unit = u.unit AND sa.starts_at = p.starts_at FOR UPDATE;
                IF NOT FOUND THEN
                    used := billing.close_overlapping_allowances(s.tenant_id, s.account, u.unit, s.id,
                                                                 p.starts_at, p.starts_at);
                    INSERT INTO billing.subscription_allowances AS sa
                        (subscription_id, tenant_id, unit, starts_at, ends_at, ceiling)
                    VALUES (s.id, s.tenant_id, u.unit, p.starts_at, p.ends_at, target)
                    RETURNING sa.* INTO a;
                    give := target - least(used, target);
                ELSIF target > a.ceiling THEN
                    give := target - a.ceiling;
                    UPDATE billing.subscription_allowances sa SET ceiling = target WHERE sa.id = a.id;
                ELSE
                    give := 0;
                END IF;
                IF give > 0 THEN
                    SELECT r.grant_id INTO made FROM billing."grant"(s.account, u.unit, give,
                        kind => 'plan', priority => plan.priority,
                        effective_at => p.starts_at, expires_at => p.ends_at,
                        -- the n-th grant of this allowance period
                        key => format('billing:plan:%s:%s', a.id, cardinality(a.grant_ids) + 1),
                        metadata => jsonb_build_object('subscription', s.provider_id, 'plan', plan.key,
                                                       'plan_version', plan.version, 'ceiling', target)) r;
                    UPDATE billing.subscription_allowances sa SET grant_ids = sa.grant_ids || made.grant_id
                    WHERE sa.id = a.id;
                    granted := granted + give;
                END IF;
            END LOOP;
        END LOOP;
    END IF;
    -- a plan's credit line (its floor) holds while its access is open
    IF plan.floor IS NOT NULL THEN
        FOR u IN SELECT e.key AS unit FROM jsonb_each(plan.allowances) e ORDER BY e.key LOOP
            PERFORM billing.set_floor(s.account, u.unit,
                CASE WHEN access = 'open' AND billing.subscription_paid(s) THEN plan.floor ELSE 0 END);
        END LOOP;
    END IF;
    -- the default plan runs while, and only while, the account has no live subscription
    PERFORM billing.apply_default_plan(s.tenant_id, s.account);
    RETURN jsonb_build_object('granted', granted, 'suspended', suspended, 'resumed', resumed, 'revoked', revoked);
END
$$;

-- Keep a change applied to a subscription's state or credit in its history.
CREATE FUNCTION billing.record_subscription_change(s billing.subscriptions, source text, observed_at timestamptz,
                                                  changes jsonb, credit jsonb) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, billing, pg_temp
AS $$
    INSERT INTO billing.subscription_changes (tenant_id, subscription_id, account, source, observed_at, changes, credit)
    SELECT s.tenant_id, s.id, s.account, source, observed_at, changes, credit
    WHERE changes <> '{}' OR credit <> '{"granted": 0, "resumed": 0, "revoked": 0, "suspended": 0}'
$$;

-- A subscription moving to another account: the plan credit its old account
-- holds for allowance periods that have not ended is revoked there (what it
-- used stays used, in that account's history), and each such period's
-- ceiling becomes what was used, so the new account gets the rest of the
-- allowance, never a second one.
CREATE FUNCTION billing.move_subscription_credit(s billing.subscriptions) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    a record;
BEGIN
    FOR a IN
        SELECT sa.id, sa.grant_ids FROM billing.subscription_allowances sa
        WHERE sa.subscription_id = s.id AND sa.ends_at > now()
        ORDER BY sa.unit, sa.starts_at FOR UPDATE
    LOOP
        UPDATE billing.subscription_allowances sa SET ceiling = billing.revoke_plan_grants(a.grant_ids)
        WHERE sa.id = a.id;
    END LOOP;
END
$$;

-- What a projection did to plan credit, as the columns its callers read:
-- granted and revoked are amounts; suspended and resumed count grants.
CREATE FUNCTION billing.credit_figures(credit jsonb, OUT credit_granted bigint, OUT credit_suspended integer,
                                       OUT credit_resumed integer, OUT credit_revoked bigint)
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog
AS $$
    SELECT coalesce((credit ->> 'granted')::bigint, 0), coalesce((credit ->> 'suspended')::integer, 0),
           coalesce((credit ->> 'resumed')::integer, 0), coalesce((credit ->> 'revoked')::bigint, 0)
$$;

-- A subscription refused because its account has another live one: kept,
-- newest observation first, for the application to refund, and applied by
-- itself once the live one ends.
CREATE FUNCTION billing.record_subscription_conflict(tenant text, who text, provider text, provider_id text,
                                                    state text, subscription jsonb, observed_at timestamptz)
RETURNS TABLE (subscription_id bigint, account text, status text, outcome text, changes jsonb,
               credit_granted bigint, credit_suspended integer, credit_resumed integer, credit_revoked bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, billing, pg_temp
AS $$
#variable_conflict use_variable
DECLARE live bigint;
BEGIN
    SELECT s.id INTO live FROM billing.subscriptions s
    WHERE s.tenant_id = tenant AND s.account = who AND billing.subscription_is_live(s.status);
    INSERT INTO billing.subscription_conflicts AS c (tenant_id, account, provider, provider_id,
        live_subscription_id, status, subscription, observed_at)
    VALUES (tenant, who, provider, provider_id, live, state, subscription, observed_at)
    ON CONFLICT ON CONSTRAINT subscription_conflicts_tenant_id_provider_provider_id_key DO UPDATE
        SET status = excluded.status, subscription = excluded.subscription, observed_at = excluded.observed_at,
            live_subscription_id = excluded.live_subscription_id, recorded_at = now(), resolved_at = NULL
        WHERE c.observed_at <= excluded.observed_at;
    RETURN QUERY SELECT NULL::bigint, who, state, 'conflict'::text,
        jsonb_build_object('live_subscription_id', live), f.* FROM billing.credit_figures('{}') f;
END
$$;

-- The plan version a new subscription (or a change of price) buys: the
-- newest version listing the price, which must not be retired unless the
-- subscription has ended anyway.
CREATE FUNCTION billing.plan_for_price(tenant text, provider text, price text, subscription text, status text)
RETURNS billing.plans
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE plan billing.plans;
BEGIN
    SELECT pl.* INTO plan FROM billing.plan_prices pp JOIN billing.plans pl ON pl.id = pp.plan_id
    WHERE pp.tenant_id = tenant AND pp.provider = plan_for_price.provider AND pp.price_id = price;
    IF plan.retired_at IS NOT NULL AND billing.subscription_access(status) <> 'ended' THEN
        RAISE EXCEPTION 'subscription %: plan % is retired and accepts no new subscription', subscription, plan.key
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RETURN plan;
END
$$;

-- The provider's subscription object (what a webhook carries and what a poll
-- of the provider's API returns), applied once: the same object again
-- changes nothing, an older observation than the one applied is `stale`.
-- Returns what changed in the subscription and in its plan credit.
CREATE FUNCTION billing.sync_subscription(
    subscription jsonb,
    observed_at timestamptz DEFAULT now(),
    provider text DEFAULT 'stripe',
    source text DEFAULT 'poll')
RETURNS TABLE (subscription_id bigint, account text, status text, outcome text, changes jsonb,
               credit_granted bigint, credit_suspended integer, credit_resumed integer, credit_revoked bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
    obj jsonb := subscription;
    v_id text;
    v_status text;
    v_customer text;
    v_item jsonb;
    v_price text;
    v_seats integer;
    v_start timestamptz;
    v_end timestamptz;
    v_ends timestamptz;
    v_trial timestamptz;
    v_account text;
    v_paused boolean;
    v_invoiced boolean;
    v_paid timestamptz;
    v_moving boolean;
    mapped text;
    plan billing.plans;
    old billing.subscriptions;
    cur billing.subscriptions;
    waiting record;
    diff jsonb := '{}';
    given jsonb;
BEGIN
    IF subscription IS NULL OR observed_at IS NULL OR provider IS NULL OR source IS NULL THEN
        RAISE EXCEPTION 'subscription, observed_at, provider and source may not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF source NOT IN ('poll', 'webhook', 'retry') THEN
        RAISE EXCEPTION 'source must be poll or webhook, not %', source USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF provider <> 'stripe' THEN
        RAISE EXCEPTION 'unknown provider %: subscription objects of stripe are understood', provider
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM billing.check_observed_at(observed_at);
    IF octet_length(subscription::text) > 262144 THEN
        RAISE EXCEPTION 'subscription object over 256 KiB' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(obj) <> 'object' OR obj ->> 'object' IS DISTINCT FROM 'subscription'
       OR jsonb_typeof(obj -> 'id') <> 'string' OR length(obj ->> 'id') NOT BETWEEN 1 AND 255 THEN
        RAISE EXCEPTION 'not a Stripe subscription object (expected "object": "subscription" and an id)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_id := obj ->> 'id';
    v_status := obj ->> 'status';
    IF billing.subscription_access(v_status) IS NULL THEN
        RAISE EXCEPTION 'subscription %: unknown status %', v_id, coalesce(v_status, 'missing')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_customer := billing.stripe_id(obj -> 'customer');
    IF length(v_customer) > 255 OR length(obj #>> '{metadata,account}') > 255 THEN
        RAISE EXCEPTION 'subscription %: customer or metadata.account longer than 255 characters', v_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_paused := coalesce(jsonb_typeof(obj -> 'pause_collection') = 'object', false);
    v_invoiced := obj ->> 'collection_method' IS NOT DISTINCT FROM 'send_invoice';
    -- the item whose price is a plan's; others (add-ons) are not plans
    SELECT i INTO v_item FROM jsonb_array_elements(coalesce(obj #> '{items,data}', '[]')) WITH ORDINALITY AS x(i, n)
    WHERE EXISTS (SELECT 1 FROM billing.plan_prices pp
                  WHERE pp.tenant_id = tenant AND pp.provider = sync_subscription.provider
                    AND pp.price_id = billing.stripe_item_price(x.i))
    ORDER BY x.n LIMIT 1;
    IF v_item IS NULL THEN
        RAISE EXCEPTION 'subscription %: no price maps to a plan (prices: %)', v_id,
            coalesce((SELECT string_agg(billing.stripe_item_price(i), ', ')
                      FROM jsonb_array_elements(coalesce(obj #> '{items,data}', '[]')) i), 'none')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'List the price in billing.define_plan(prices => ...); nothing was changed.';
    END IF;
    v_price := billing.stripe_item_price(v_item);
    -- what is known paid for that price: its invoices seen so far, an expanded paid latest_invoice
    SELECT max(billing.invoice_paid_through(i.lines, v_price, i.period_end)) INTO v_paid
    FROM billing.subscription_invoices i
    WHERE i.tenant_id = tenant AND i.provider = sync_subscription.provider AND i.subscription = v_id
      AND i.status = 'paid';
    IF jsonb_typeof(obj -> 'latest_invoice') = 'object' AND obj #>> '{latest_invoice,status}' = 'paid' THEN
        v_paid := greatest(v_paid, billing.invoice_paid_through(
            billing.stripe_invoice_lines(obj -> 'latest_invoice'), v_price,
            billing.stripe_instant(obj #> '{latest_invoice,period_end}')));
    END IF;
    IF jsonb_typeof(v_item -> 'quantity') = 'number' THEN
        IF (v_item ->> 'quantity') !~ '^[0-9]{1,9}$' THEN
            RAISE EXCEPTION 'subscription %: quantity % is not a seat count', v_id, v_item -> 'quantity'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        v_seats := (v_item ->> 'quantity')::integer;
    END IF;
    IF v_seats = 0 AND billing.subscription_access(v_status) <> 'ended' THEN
        RAISE EXCEPTION 'subscription %: a paid subscription with 0 seats', v_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_seats := greatest(coalesce(v_seats, 1), 1);
    -- the period: the subscription's (older API versions) or its item's (newer
    -- ones); without one, the calendar month (UTC) of the observation
    v_start := coalesce(billing.stripe_instant(obj -> 'current_period_start'),
                        billing.stripe_instant(v_item -> 'current_period_start'));
    v_end := coalesce(billing.stripe_instant(obj -> 'current_period_end'),
                      billing.stripe_instant(v_item -> 'current_period_end'));
    IF v_start IS NULL OR v_end IS NULL OR v_end <= v_start THEN
        v_start := date_trunc('month', observed_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
        v_end := (date_trunc('month', observed_at AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC';
    END IF;
    v_trial := billing.stripe_instant(obj -> 'trial_end');
    v_ends := CASE
        WHEN billing.subscription_access(v_status) = 'ended'
            THEN coalesce(billing.stripe_instant(obj -> 'ended_at'), billing.stripe_instant(obj -> 'canceled_at'),
                          observed_at)
        WHEN billing.stripe_instant(obj -> 'cancel_at') IS NOT NULL THEN billing.stripe_instant(obj -> 'cancel_at')
        WHEN (obj ->> 'cancel_at_period_end')::boolean THEN v_end
    END;

    -- whose it is: the account the subscription names, else its customer's
    IF v_customer IS NOT NULL THEN
        SELECT pc.account INTO mapped FROM billing.provider_customers pc
        WHERE pc.tenant_id = tenant AND pc.provider = sync_subscription.provider AND pc.customer = v_customer;
    END IF;
    v_account := coalesce(obj #>> '{metadata,account}', mapped);
    IF v_account IS NULL THEN
        RAISE EXCEPTION 'subscription %: no account: set metadata.account on the subscription, or map its customer', v_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The projections of one account's subscriptions queue on its row, taken
    -- before the subscription's own (every projection takes them in this
    -- order): two first observations of one subscription, or two checkouts,
    -- would otherwise race their inserts into a deadlock.
    PERFORM billing.account(v_account);
    PERFORM 1 FROM billing.accounts a WHERE a.tenant_id = tenant AND a.account = v_account FOR NO KEY UPDATE;
    SELECT * INTO old FROM billing.subscriptions s
    WHERE s.tenant_id = tenant AND s.provider = sync_subscription.provider AND s.provider_id = v_id FOR UPDATE;
    IF old.id IS NOT NULL AND (old.observed_at > sync_subscription.observed_at
                               OR NOT billing.subscription_can_become(old.status, v_status)) THEN
        RETURN QUERY SELECT old.id, old.account, old.status, 'stale'::text,
            jsonb_build_object('applied_observation', old.observed_at), f.* FROM billing.credit_figures('{}') f;
        RETURN;
    END IF;
    -- the subscription moves to another account (its customer with it)
    v_moving := old.id IS NOT NULL AND old.account <> v_account;
    IF v_moving AND old.customer IS DISTINCT FROM v_customer THEN
        RAISE EXCEPTION 'subscription % moves from account % to %, and from customer % to %: one at a time',
            v_id, old.account, v_account, old.customer, v_customer
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF v_customer IS NOT NULL AND NOT v_moving THEN
        -- claimed first, checked after: a concurrent claim of the customer or
        -- the account waits here, then the check sees whichever committed
        INSERT INTO billing.provider_customers (tenant_id, provider, customer, account)
        VALUES (tenant, sync_subscription.provider, v_customer, v_account) ON CONFLICT DO NOTHING;
        SELECT pc.account INTO mapped FROM billing.provider_customers pc
        WHERE pc.tenant_id = tenant AND pc.provider = sync_subscription.provider AND pc.customer = v_customer;
        IF mapped IS DISTINCT FROM v_account THEN
            RAISE EXCEPTION 'subscription %: customer % belongs to account %, not %', v_id, v_customer, mapped, v_account
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'One provider customer per account: nothing was changed.';
        END IF;
        SELECT pc.customer INTO mapped FROM billing.provider_customers pc
        WHERE pc.tenant_id = tenant AND pc.provider = sync_subscription.provider AND pc.account = v_account;
        IF mapped IS DISTINCT FROM v_customer THEN
            RAISE EXCEPTION 'subscription %: account % is customer %, not %', v_id, v_account, mapped, v_customer
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'One provider customer per account: nothing was changed.';
        END IF;
    END IF;

    IF old.id IS NULL THEN
        plan := billing.plan_for_price(tenant, sync_subscription.provider, v_price, v_id, v_status);
        BEGIN
            -- a subscription first seen active has paid its first period (the
            -- provider activates it once its first invoice is paid), unless it
            -- is invoiced to be paid later (collection_method send_invoice)
            INSERT INTO billing.subscriptions AS s (tenant_id, account, provider, provider_id, customer, status,
                plan_id, price_id, seats, period_start, period_end, ends_at, trial_end, collection_paused,
                paid_through, observed_at)
            VALUES (tenant, v_account, sync_subscription.provider, v_id, v_customer, v_status, plan.id, v_price,
                    v_seats, v_start, v_end, v_ends, v_trial, v_paused,
                    CASE WHEN v_status = 'active' AND NOT v_invoiced THEN greatest(v_paid, v_end) ELSE v_paid END,
                    sync_subscription.observed_at)
            ON CONFLICT ON CONSTRAINT subscriptions_tenant_id_provider_provider_id_key DO NOTHING
            RETURNING s.* INTO cur;
        EXCEPTION WHEN unique_violation THEN
            -- the one-live index: the account has another live subscription
            RETURN QUERY SELECT * FROM billing.record_subscription_conflict(tenant, v_account,
                sync_subscription.provider, v_id, v_status, obj, sync_subscription.observed_at);
            RETURN;
        END;
        IF cur.id IS NULL THEN
            -- another session created it meanwhile: apply this observation over it
            SELECT * INTO old FROM billing.subscriptions s
            WHERE s.tenant_id = tenant AND s.provider = sync_subscription.provider AND s.provider_id = v_id
            FOR UPDATE;
        END IF;
    END IF;
    IF old.id IS NOT NULL THEN
        -- the plan version it bought, kept until its price changes
        IF old.price_id = v_price THEN
            SELECT * INTO plan FROM billing.plans pl WHERE pl.id = old.plan_id;
        ELSE
            plan := billing.plan_for_price(tenant, sync_subscription.provider, v_price, v_id, v_status);
        END IF;
        SELECT coalesce(jsonb_object_agg(d.field, jsonb_build_array(d.was, d.now)), '{}') INTO diff
        FROM (VALUES ('status', to_jsonb(old.status), to_jsonb(v_status)),
                     ('plan', to_jsonb(old.plan_id), to_jsonb(plan.id)),
                     ('seats', to_jsonb(old.seats), to_jsonb(v_seats)),
                     ('period_start', to_jsonb(old.period_start), to_jsonb(v_start)),
                     ('period_end', to_jsonb(old.period_end), to_jsonb(v_end)),
                     ('ends_at', to_jsonb(old.ends_at), to_jsonb(v_ends)),
                     ('customer', to_jsonb(old.customer), to_jsonb(v_customer)),
                     ('account', to_jsonb(old.account), to_jsonb(v_account)),
                     ('collection_paused', to_jsonb(old.collection_paused), to_jsonb(v_paused))) d(field, was, now)
        WHERE d.was IS DISTINCT FROM d.now;
        BEGIN
            IF v_moving THEN
                IF v_customer IS NOT NULL THEN
                    IF EXISTS (SELECT 1 FROM billing.provider_customers o
                               WHERE o.tenant_id = tenant AND o.provider = sync_subscription.provider
                                 AND o.account = v_account AND o.customer <> v_customer) THEN
                        RAISE EXCEPTION 'subscription %: account % is another customer''s', v_id, v_account
                            USING ERRCODE = 'object_not_in_prerequisite_state',
                                  HINT = 'One provider customer per account: nothing was changed.';
                    END IF;
                    UPDATE billing.provider_customers pc SET account = v_account
                    WHERE pc.tenant_id = tenant AND pc.provider = sync_subscription.provider
                      AND pc.customer = v_customer;
                END IF;
                PERFORM billing.move_subscription_credit(old);
            END IF;
            UPDATE billing.subscriptions s SET account = v_account, status = v_status, plan_id = plan.id,
                price_id = v_price,
                seats = v_seats, period_start = v_start, period_end = v_end, ends_at = v_ends, trial_end = v_trial,
                collection_paused = v_paused, customer = v_customer,
                -- the first period of one that was never active yet (incomplete, a trial) is paid once active
                paid_through = CASE WHEN v_status = 'active' AND NOT v_invoiced AND old.paid_through IS NULL
                                         AND old.status = 'incomplete'
                                    THEN greatest(v_paid, v_end)
                                    ELSE greatest(old.paid_through, v_paid) END,
                observed_at = sync_subscription.observed_at, updated_at = now()
            WHERE s.id = old.id
            RETURNING s.* INTO cur;
        EXCEPTION WHEN unique_violation THEN
            -- an incomplete checkout paid while the account has another live subscription
            RETURN QUERY SELECT * FROM billing.record_subscription_conflict(tenant, v_account,
                sync_subscription.provider, v_id, v_status, obj, sync_subscription.observed_at);
            RETURN;
        END;
    ELSE
        diff := jsonb_build_object('created', true);
    END IF;
    -- applied: a conflict recorded for it earlier is settled
    UPDATE billing.subscription_conflicts c SET resolved_at = now()
    WHERE c.tenant_id = tenant AND c.provider = sync_subscription.provider AND c.provider_id = v_id
      AND c.resolved_at IS NULL;
    given := billing.subscription_credit(cur);
    IF old.account IS DISTINCT FROM cur.account AND old.account IS NOT NULL THEN
        -- moved: the account it left may have the default plan again
        PERFORM billing.apply_default_plan(tenant, old.account);
    END IF;
    PERFORM billing.record_subscription_change(cur, sync_subscription.source, sync_subscription.observed_at,
                                               diff, given);
    RETURN QUERY SELECT cur.id, cur.account, cur.status,
        CASE WHEN old.id IS NULL THEN 'created' WHEN diff = '{}' THEN 'unchanged' ELSE 'updated' END,
        diff, f.* FROM billing.credit_figures(given) f;
    IF billing.subscription_access(cur.status) = 'ended' THEN
        -- its place is free: a subscription refused for it applies now (one
        -- that still cannot, e.g. its plan retired meanwhile, stays recorded)
        FOR waiting IN
            SELECT c.subscription, c.observed_at, c.provider FROM billing.subscription_conflicts c
            WHERE c.tenant_id = tenant AND c.account = cur.account AND c.resolved_at IS NULL
            ORDER BY c.observed_at, c.id
        LOOP
            BEGIN
                PERFORM 1 FROM billing.sync_subscription(waiting.subscription, waiting.observed_at, waiting.provider,
                                                         'retry');
            EXCEPTION WHEN others THEN
                NULL;
            END;
        END LOOP;
    END IF;
END
$$;

-- ----- Stripe's subscription events ------------------------------------------

-- customer.subscription.*: the event's object is the subscription as of the
-- event, applied through the same projection as a poll.
CREATE FUNCTION billing.stripe_subscription_event(ev billing.webhook_events) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE r record;
BEGIN
    SELECT * INTO r FROM billing.sync_subscription(ev.payload #> '{data,object}', ev.event_time, 'stripe', 'webhook');
    RETURN to_jsonb(r);
END
$$;

-- The provider's invoice object (an invoice event's, or a poll's): recorded
-- per invoice, newest observation first; a paid one opens the billing period
-- it bills for its subscription (a renewal opens with no allowance until it
-- is paid; a $0 invoice is paid). An invoice of no subscription is ignored.
CREATE FUNCTION billing.sync_invoice(
    invoice jsonb,
    observed_at timestamptz DEFAULT now(),
    provider text DEFAULT 'stripe')
RETURNS TABLE (invoice_id text, subscription text, status text, outcome text, paid_through timestamptz,
               credit_granted bigint, credit_suspended integer, credit_resumed integer, credit_revoked bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    tenant text := billing.current_tenant();
    v_id text;
    v_sub text;
    v_status text;
    v_paid bigint;
    v_end timestamptz;
    v_own_end timestamptz;
    v_payment text;
    changed integer;
    given jsonb;
    v_lines jsonb;
    s billing.subscriptions;
BEGIN
    IF invoice IS NULL OR observed_at IS NULL OR provider IS NULL THEN
        RAISE EXCEPTION 'invoice, observed_at and provider may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF provider <> 'stripe' THEN
        RAISE EXCEPTION 'unknown provider %: invoice objects of stripe are understood', provider
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM billing.check_observed_at(observed_at);
    IF jsonb_typeof(invoice) <> 'object' OR invoice ->> 'object' IS DISTINCT FROM 'invoice'
       OR jsonb_typeof(invoice -> 'id') <> 'string' OR length(invoice ->> 'id') NOT BETWEEN 1 AND 255
       OR octet_length(invoice::text) > 262144 THEN
        RAISE EXCEPTION 'not a Stripe invoice object (expected "object": "invoice" and an id, at most 256 KiB)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_id := invoice ->> 'id';
    v_sub := billing.stripe_invoice_subscription(invoice);
    v_status := coalesce(invoice ->> 'status', 'draft');
    IF v_sub IS NULL OR length(v_sub) > 255 THEN
        RETURN QUERY SELECT v_id, NULL::text, v_status, 'ignored'::text, NULL::timestamptz, f.*
                     FROM billing.credit_figures('{}') f;
        RETURN;
    END IF;
    IF v_status NOT IN ('draft', 'open', 'paid', 'uncollectible', 'void') THEN
        RAISE EXCEPTION 'invoice %: unknown status %', v_id, v_status USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_paid := CASE WHEN (invoice ->> 'amount_paid') ~ '^[0-9]{1,18}$' THEN (invoice ->> 'amount_paid')::bigint ELSE 0 END;
    -- the subscription first (if known), as every projection of it does
    SELECT * INTO s FROM billing.subscriptions x
    WHERE x.tenant_id = tenant AND x.provider = sync_invoice.provider AND x.provider_id = v_sub FOR UPDATE;
    v_lines := billing.stripe_invoice_lines(invoice);
    v_own_end := billing.stripe_instant(invoice -> 'period_end');
    v_payment := left(billing.stripe_invoice_payment(invoice), 255);
    v_end := billing.invoice_paid_through(v_lines, s.price_id, v_own_end);
    INSERT INTO billing.subscription_invoices AS i (tenant_id, provider, invoice_id, subscription, status,
        billing_reason, amount_paid, currency, lines, period_end, payment_intent, observed_at)
    VALUES (tenant, provider, v_id, v_sub, v_status, left(invoice ->> 'billing_reason', 100), v_paid,
            left(invoice ->> 'currency', 10), v_lines, v_own_end,
            coalesce(v_payment,
                     (SELECT p.payment_intent FROM billing.invoice_payments p
                      WHERE p.tenant_id = tenant AND p.provider = sync_invoice.provider AND p.invoice_id = v_id)),
            observed_at)
    ON CONFLICT ON CONSTRAINT subscription_invoices_pkey DO UPDATE
        SET status = excluded.status, amount_paid = excluded.amount_paid, lines = excluded.lines,
            period_end = excluded.period_end, payment_intent = coalesce(excluded.payment_intent, i.payment_intent),
            observed_at = excluded.observed_at
        -- a paid invoice stays paid; otherwise the newest observation wins
        WHERE i.status <> 'paid' AND i.observed_at <= excluded.observed_at;
    GET DIAGNOSTICS changed = ROW_COUNT;
    IF changed = 0 AND v_payment IS NOT NULL THEN
        -- a paid invoice stays as it was, but learns the payment that paid it
        UPDATE billing.subscription_invoices i SET payment_intent = v_payment
        WHERE i.tenant_id = tenant AND i.provider = sync_invoice.provider AND i.invoice_id = v_id
          AND i.payment_intent IS NULL;
    END IF;
    IF s.id IS NOT NULL AND v_payment IS NOT NULL THEN
        -- a dispute of its payment that arrived first holds the credit back now
        PERFORM billing.stripe_subscription_dispute(tenant, v_payment);
        SELECT * INTO s FROM billing.subscriptions x WHERE x.id = s.id;
    END IF;
    IF s.id IS NULL OR v_status <> 'paid' OR changed = 0 OR v_end IS NULL OR s.paid_through >= v_end THEN
        RETURN QUERY SELECT v_id, v_sub, v_status,
            CASE WHEN changed = 0 THEN 'unchanged' WHEN s.id IS NULL THEN 'recorded' ELSE 'updated' END,
            s.paid_through, f.* FROM billing.credit_figures('{}') f;
        RETURN;
    END IF;
    UPDATE billing.subscriptions x SET paid_through = greatest(x.paid_through, v_end), updated_at = now()
    WHERE x.id = s.id
    RETURNING x.* INTO s;
    given := billing.subscription_credit(s);
    PERFORM billing.record_subscription_change(s, 'invoice', observed_at,
        jsonb_build_object('paid_through', jsonb_build_array(NULL, s.paid_through), 'invoice', v_id), given);
    RETURN QUERY SELECT v_id, v_sub, v_status, 'updated'::text, s.paid_through, f.*
                 FROM billing.credit_figures(given) f;
END
$$;

-- invoice_payment.paid: which PaymentIntent paid an invoice (a dispute of it
-- then holds the subscription's plan credit back).
CREATE FUNCTION billing.stripe_invoice_payment_event(ev billing.webhook_events) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    obj jsonb := ev.payload #> '{data,object}';
    v_invoice text := billing.stripe_id(obj -> 'invoice');
    v_payment text := billing.stripe_id(obj #> '{payment,payment_intent}');
BEGIN
    IF v_invoice IS NULL OR v_payment IS NULL OR length(v_invoice) > 255 OR length(v_payment) > 255 THEN
        RETURN jsonb_build_object('recorded', false, 'why', 'no invoice or no PaymentIntent');
    END IF;
    INSERT INTO billing.invoice_payments (tenant_id, provider, invoice_id, payment_intent)
    VALUES (ev.tenant_id, 'stripe', v_invoice, v_payment) ON CONFLICT DO NOTHING;
    UPDATE billing.subscription_invoices i SET payment_intent = v_payment
    WHERE i.tenant_id = ev.tenant_id AND i.provider = 'stripe' AND i.invoice_id = v_invoice
      AND i.payment_intent IS NULL;
    RETURN jsonb_build_object('recorded', true, 'invoice', v_invoice, 'payment_intent', v_payment,
                              'subscription', billing.stripe_subscription_dispute(ev.tenant_id, v_payment));
END
$$;

-- invoice.*: the event's invoice, through the same projection as a poll.
CREATE FUNCTION billing.stripe_invoice_event(ev billing.webhook_events) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE r record;
BEGIN
    SELECT * INTO r FROM billing.sync_invoice(ev.payload #> '{data,object}', ev.event_time, 'stripe');
    RETURN to_jsonb(r);
END
$$;

-- ----- seats -------------------------------------------------------------------

-- Lock the seat count of `account` for this transaction (created at 0 if
-- missing, with the account): counts of one account are made one at a time,
-- each after the previous one committed, so concurrent adds lose nothing.
CREATE FUNCTION billing.lock_seats(account text) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    tenant text := billing.current_tenant();
    n integer;
BEGIN
    IF account IS NULL THEN
        RAISE EXCEPTION 'account may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM billing.account(account);
    INSERT INTO billing.seats AS x (tenant_id, account, seats) VALUES (tenant, account, 0)
    ON CONFLICT ON CONSTRAINT seats_pkey DO UPDATE SET seats = x.seats
    RETURNING x.seats INTO n;
    RETURN n;
END
$$;

-- Set the seat count of `account`: a change is queued for the provider and
-- raises the per-seat allowance of its live subscription at once (never
-- lowers it within a period; while delinquent, it applies on recovery).
CREATE FUNCTION billing.set_seats(account text, seats integer)
RETURNS TABLE (seat_account text, seat_count integer, changed boolean,
               credit_granted bigint, credit_suspended integer, credit_resumed integer, credit_revoked bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    tenant text := billing.current_tenant();
    was integer;
    given jsonb;
    sub billing.subscriptions;
BEGIN
    IF set_seats.seats IS NULL THEN
        RAISE EXCEPTION 'seats may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF set_seats.seats < 0 THEN
        RAISE EXCEPTION 'seats must not be negative' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    was := billing.lock_seats(set_seats.account);
    IF was = set_seats.seats THEN
        RETURN QUERY SELECT set_seats.account, set_seats.seats, false, f.* FROM billing.credit_figures('{}') f;
        RETURN;
    END IF;
    UPDATE billing.seats x SET seats = set_seats.seats, updated_at = now()
    WHERE x.tenant_id = tenant AND x.account = set_seats.account;
    INSERT INTO billing.seat_pushes AS q (tenant_id, account, seats)
    VALUES (tenant, set_seats.account, set_seats.seats)
    ON CONFLICT (tenant_id, account) WHERE pushed_at IS NULL
    DO UPDATE SET seats = excluded.seats, updated_at = now();
    SELECT * INTO sub FROM billing.subscriptions x
    WHERE x.tenant_id = tenant AND x.account = set_seats.account AND billing.subscription_is_live(x.status)
    FOR UPDATE;
    IF sub.id IS NULL THEN
        RETURN QUERY SELECT set_seats.account, set_seats.seats, true, f.* FROM billing.credit_figures('{}') f;
        RETURN;
    END IF;
    given := billing.subscription_credit(sub);
    PERFORM billing.record_subscription_change(sub, 'seats', now(),
        jsonb_build_object('seats_counted', jsonb_build_array(was, set_seats.seats)), given);
    RETURN QUERY SELECT set_seats.account, set_seats.seats, true, f.* FROM billing.credit_figures(given) f;
END
$$;

-- The worker pushed seat count `seats` of push `id` to the provider: done,
-- unless the count changed meanwhile (then it stays pending with the new one).
CREATE FUNCTION billing.ack_seat_push(id bigint, seats integer) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
#variable_conflict use_variable
DECLARE done integer;
BEGIN
    IF id IS NULL OR seats IS NULL THEN
        RAISE EXCEPTION 'id and seats may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    UPDATE billing.seat_pushes q SET pushed_at = now()
    WHERE q.id = ack_seat_push.id AND q.tenant_id = billing.current_tenant()
      AND q.seats = ack_seat_push.seats AND q.pushed_at IS NULL;
    GET DIAGNOSTICS done = ROW_COUNT;
    RETURN done = 1;
END
$$;

-- A row trigger for the application's membership table:
--   CREATE TRIGGER billing_seats AFTER INSERT OR UPDATE OR DELETE ON app.members
--       FOR EACH ROW EXECUTE FUNCTION billing.count_seats('org_id', 'user_id', 'status <> ''pending''');
-- counts, per account, the distinct members whose rows meet the condition
-- (owners and bots count if the condition says so; a member twice counts
-- once), and sets the account's seats. It runs with the rights of whoever
-- changes the table (not pg_billing's): the condition is the table owner's
-- SQL, evaluated as that user.
CREATE FUNCTION billing.count_seats() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    account_column text := TG_ARGV[0];
    member_column text := TG_ARGV[1];
    condition text := coalesce(nullif(TG_ARGV[2], ''), 'true');
    account_type text;
    touched text[] := '{}';
    a text;
    n integer;
BEGIN
    IF TG_NARGS < 2 OR TG_LEVEL <> 'ROW' OR TG_WHEN <> 'AFTER' THEN
        RAISE EXCEPTION 'billing.count_seats(account_column, member_column [, condition]) is an AFTER ... FOR EACH ROW trigger'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT format_type(t.atttypid, t.atttypmod) INTO account_type FROM pg_catalog.pg_attribute t
    WHERE t.attrelid = TG_RELID AND t.attname = account_column AND NOT t.attisdropped;
    IF account_type IS NULL THEN
        RAISE EXCEPTION 'billing.count_seats: % has no column %', TG_TABLE_NAME, account_column
            USING ERRCODE = 'undefined_column';
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        touched := touched || (to_jsonb(OLD) ->> account_column);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        touched := touched || (to_jsonb(NEW) ->> account_column);
    END IF;
    FOR a IN SELECT DISTINCT x FROM unnest(touched) x WHERE x IS NOT NULL ORDER BY x LOOP
        PERFORM billing.lock_seats(a);
        EXECUTE format('SELECT count(DISTINCT %I)::integer FROM %I.%I WHERE %I = $1::%s AND (%s)',
                       member_column, TG_TABLE_SCHEMA, TG_TABLE_NAME, account_column, account_type, condition)
            INTO n USING a;
        PERFORM billing.set_seats(a, n);
    END LOOP;
    RETURN NULL;
END
$$;

-- ----- reads -------------------------------------------------------------------

-- Each subscription with its plan, period and the plan credit of the
-- allowance period running now, per unit.
CREATE VIEW billing.subscription_status WITH (security_invoker = true) AS
SELECT s.account, s.provider_id AS subscription, s.status,
       billing.subscription_access(s.status, s.collection_paused OR s.disputed) AS access,
       pl.key AS plan, pl.version AS plan_version, s.seats, s.period_start, s.period_end, s.ends_at,
       sa.unit, sa.starts_at AS allowance_starts_at, sa.ends_at AS allowance_ends_at, sa.ceiling AS allowance,
       coalesce(u.used, 0) AS allowance_used, coalesce(g.remaining, 0) AS allowance_left,
       coalesce(g.suspended, 0) AS allowance_suspended, s.observed_at, s.updated_at
FROM billing.subscriptions s
JOIN billing.plans pl ON pl.id = s.plan_id
LEFT JOIN billing.subscription_allowances sa ON sa.subscription_id = s.id
     AND sa.starts_at <= now() AND now() < sa.ends_at
-- what the lanes of a split pool hold of a grant counts as the grant's
LEFT JOIN LATERAL (
    SELECT sum(r.remaining) FILTER (WHERE gr.status = 'active')::bigint AS remaining,
           sum(r.remaining) FILTER (WHERE gr.status = 'suspended')::bigint AS suspended
    FROM unnest(sa.grant_ids) AS gid(id) JOIN billing.grants gr ON gr.id = gid.id
    CROSS JOIN LATERAL (SELECT billing.grant_remaining(gr)
                               + coalesce((SELECT sum(billing.grant_remaining(c)) FROM billing.grants c
                                           WHERE c.parent_id = gr.id), 0) AS remaining) r) g ON true
LEFT JOIN LATERAL (
    SELECT -sum(e.grant_amount)::bigint AS used
    FROM billing.grant_entry_totals(ARRAY(SELECT gid.id FROM unnest(sa.grant_ids) AS gid(id)
                                          UNION ALL
                                          SELECT c.id FROM billing.grants c WHERE c.parent_id = ANY (sa.grant_ids))) e
    WHERE e.kind IN ('debit', 'debt_repayment')) u ON true;

-- What polls (a reconciliation pull, or an app that cannot receive webhooks)
-- found changed that no event had delivered, per field: the drift between
-- the provider and the database that the pull corrected.
CREATE VIEW billing.subscription_drift WITH (security_invoker = true) AS
SELECT c.account, s.provider_id AS subscription, c.observed_at, d.key AS field,
       d.value ->> 0 AS was, d.value ->> 1 AS became, c.recorded_at
FROM billing.subscription_changes c
JOIN billing.subscriptions s ON s.id = c.subscription_id
CROSS JOIN LATERAL jsonb_each(c.changes) d
WHERE c.source = 'poll' AND d.key <> 'created';

-- ----- periodic work (pg_cron, or by hand) ---------------------------------------

-- ----- the default plan ----------------------------------------------------------

-- A tenant's default (free) plan: every account with no live subscription
-- has its allowance of each unit every calendar month (UTC), as an
-- allowance rule of its pool made by billing.apply_default_plan and granted
-- lazily like any other (exact at the boundary, no job). A live
-- subscription, a delinquent one included (no silent fallback to the free
-- plan), ends it; when the subscription ends, it applies again from then.
-- An allowance the application sets on a pool itself takes precedence, and
-- a pool split across lanes has none (the two refuse each other).
CREATE TABLE billing.default_plans (
    tenant_id text        PRIMARY KEY,
    plan_id   bigint      NOT NULL REFERENCES billing.plans (id),
    set_at    timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('billing.default_plans', '');

-- Whether an account holds its one live place (billing.subscription_is_live),
-- read through the index that keeps it one.
CREATE FUNCTION billing.has_live_subscription(tenant text, account text) RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog
AS $$
#variable_conflict use_column
BEGIN
    RETURN EXISTS (SELECT 1 FROM billing.subscriptions s
                   WHERE s.tenant_id = tenant AND s.account = has_live_subscription.account
                     AND billing.subscription_is_live(s.status));
END
$$;

-- Whether an account has no claim to the default plan of its own: it has a
-- live subscription, or it was a guest converted to another account (whose
-- own pools have the plan).
CREATE FUNCTION billing.default_plan_excluded(tenant text, account text) RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog
AS $$
#variable_conflict use_column
BEGIN
    RETURN billing.has_live_subscription(tenant, account)
        OR EXISTS (SELECT 1 FROM billing.guest_conversions c
                   WHERE c.tenant_id = tenant AND c.guest = default_plan_excluded.account);
END
$$;

-- What the default plan gives an account of `unit` each month now (0 when
-- excluded). The gate counts it for a pool that does not exist yet: its
-- first window is owed as soon as the pool is made.
CREATE FUNCTION billing.default_plan_credit(tenant text, account text, unit text) RETURNS bigint
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog
AS $$
#variable_conflict use_column
BEGIN
    RETURN coalesce((SELECT greatest((pl.allowances -> unit ->> 'amount')::bigint, 0)
                     FROM billing.default_plans d JOIN billing.plans pl ON pl.id = d.plan_id
                     WHERE d.tenant_id = tenant
                       AND NOT billing.default_plan_excluded(tenant, account)), 0);
END
$$;

-- Bring an account's default-plan rules to what its state says (one unit
-- with `only_unit`); the one place that decides them. Not excluded (above):
-- each pool (lane 0, not split) of a unit the plan gives a positive amount
-- runs the plan's rule, unless the application set a rule of its own there
-- (after that rule ends, if it ends); a rule of another plan or amount
-- hands over at its month's boundary (the running month keeps its credit,
-- as set_allowance does). Excluded: no default rule runs. With a live
-- subscription, under each pool's lock, the running window's unused credit
-- is revoked and the rule ends where that window starts, so the window is
-- not owed even if it was never granted (what was used of it counts against
-- the paid allowance, billing.close_overlapping_allowances); a converted
-- guest's rule ends at its boundary. Returns how many rules started or ended.
CREATE FUNCTION billing.apply_default_plan(tenant text, account text, only_unit text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    plan billing.plans;
    excluded boolean := billing.default_plan_excluded(tenant, account);
    -- (asked again only of an excluded account: the common case probes once)
    live boolean := excluded AND billing.has_live_subscription(tenant, account);
    r record;
    p record;
    amount bigint;
    window_start timestamptz;
    starts timestamptz;
    changed integer := 0;
BEGIN
    SELECT pl.* INTO plan FROM billing.default_plans d JOIN billing.plans pl ON pl.id = d.plan_id
    WHERE d.tenant_id = tenant;
    IF plan.id IS NULL THEN
        RETURN 0;
    END IF;
    FOR r IN
        SELECT a.* FROM billing.allowances a
        WHERE a.tenant_id = tenant AND a.account = apply_default_plan.account
          AND a.default_plan IS NOT NULL AND (a.ends_at IS NULL OR a.ends_at > now())
          AND (only_unit IS NULL OR a.unit = only_unit)
        ORDER BY a.unit COLLATE "C", a.id
    LOOP
        amount := (plan.allowances -> r.unit ->> 'amount')::bigint;
        CONTINUE WHEN NOT excluded AND r.default_plan = plan.id AND r.amount = amount
            -- and no rule of the application's runs open-ended beside it (one moved in)
            AND NOT EXISTS (SELECT 1 FROM billing.allowances o
                            WHERE o.pool_id = r.pool_id AND o.default_plan IS NULL AND o.ends_at IS NULL);
        IF live THEN
            -- no window is granted meanwhile: the pool is locked as a debit locks it
            PERFORM 1 FROM billing.pools po WHERE po.id = r.pool_id FOR UPDATE;
            PERFORM billing.revoke_unused(g.id)
            FROM billing.grants g
            WHERE g.pool_id = r.pool_id AND g.parent_id IS NULL AND g.status IN ('active', 'suspended')
              AND billing.allowance_rule_of(g.key) = r.id
              AND (g.expires_at IS NULL OR g.expires_at > now());
            SELECT w.starts_at INTO window_start FROM billing.window_of(r.every, r.time_zone, now()) w;
            IF r.starts_at >= window_start THEN
                -- it began in this window, which is gone: it covers nothing
                DELETE FROM billing.allowances a WHERE a.id = r.id;
            ELSE
                UPDATE billing.allowances a SET ends_at = window_start WHERE a.id = r.id;
            END IF;
        ELSIF r.starts_at > now() THEN
            DELETE FROM billing.allowances a WHERE a.id = r.id;
        ELSE
            UPDATE billing.allowances a SET ends_at = billing.allowance_boundary(a.every, a.time_zone, now())
            WHERE a.id = r.id;
        END IF;
        changed := changed + 1;
    END LOOP;
    IF excluded THEN
        RETURN changed;
    END IF;
    FOR p IN
        SELECT po.id, po.unit, (plan.allowances -> po.unit ->> 'amount')::bigint AS amount
        FROM billing.pools po
        WHERE po.tenant_id = tenant AND po.account = apply_default_plan.account AND po.lane = 0
          AND po.lanes = 0 AND (only_unit IS NULL OR po.unit = only_unit)
          AND (plan.allowances -> po.unit ->> 'amount')::bigint > 0
          -- one rule at a time: none runs open-ended (the application's, or this plan's)
          AND NOT EXISTS (SELECT 1 FROM billing.allowances a WHERE a.pool_id = po.id AND a.ends_at IS NULL)
        ORDER BY po.unit COLLATE "C"
    LOOP
        -- after the rules that hand over later, or now; a pool that never had
        -- a rule (a new account) is in this calendar month's window from its
        -- start, so a first use whose transaction began just before the one
        -- that made the account (and waited for it) spends the same month
        SELECT coalesce(max(a.ends_at),
                        CASE WHEN EXISTS (SELECT 1 FROM billing.allowances o WHERE o.pool_id = p.id)
                             THEN now()
                             ELSE (SELECT w.starts_at FROM billing.window_of('month', 'UTC', now()) w) END)
        INTO starts FROM billing.allowances a
        WHERE a.pool_id = p.id AND a.ends_at > now();
        INSERT INTO billing.allowances (tenant_id, pool_id, account, unit, amount, every, time_zone,
                                        keep_periods, priority, starts_at, default_plan)
        VALUES (tenant, p.id, apply_default_plan.account, p.unit, p.amount, 'month', 'UTC', 1,
                plan.priority, starts, plan.id);
        UPDATE billing.pools po SET allowance_next = least(po.allowance_next, starts) WHERE po.id = p.id;
        changed := changed + 1;
    END LOOP;
    RETURN changed;
END
$$;

-- Pools just made (lane 0; src/ledger, PoolLedger::create, which calls this
-- only when the tenant has a default plan) get the default plan. Their
-- accounts are taken as a subscription's projection takes them (a share lock
-- against its update lock), so either sees the other's work: a subscription
-- that went live meanwhile, or the pools and rules made here.
CREATE FUNCTION billing.enroll_new_pools(tenant text, accounts text[], units text[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    x record;
BEGIN
    PERFORM 1 FROM billing.accounts a
    WHERE a.tenant_id = tenant AND a.account = ANY (accounts)
    ORDER BY a.account COLLATE "C" FOR SHARE;
    FOR x IN
        SELECT k.account, k.unit FROM unnest(accounts, units) AS k(account, unit)
        ORDER BY k.account COLLATE "C", k.unit COLLATE "C"
    LOOP
        PERFORM billing.apply_default_plan(tenant, x.account, x.unit);
    END LOOP;
END
$$;

-- Make plan `key` (its latest version) the tenant's default plan, and bring
-- every account to it: a plan whose allowance is per seat is refused
-- (members never multiply a free allowance), and so is a retired one.
CREATE FUNCTION billing.set_default_plan(key text)
RETURNS TABLE (plan_id bigint, plan_key text, version integer, accounts integer, status text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
    plan billing.plans;
    previous bigint;
    n integer := 0;
    acct record;
BEGIN
    IF key IS NULL THEN
        RAISE EXCEPTION 'key may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM 1 FROM billing.plan_keys k WHERE k.tenant_id = tenant AND k.key = set_default_plan.key FOR UPDATE;
    SELECT pl.* INTO plan FROM billing.plans pl WHERE pl.tenant_id = tenant AND pl.key = set_default_plan.key
    ORDER BY pl.version DESC LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown plan "%"', key USING ERRCODE = 'invalid_parameter_value',
            HINT = 'define it first with billing.define_plan';
    END IF;
    IF plan.retired_at IS NOT NULL THEN
        RAISE EXCEPTION 'plan "%" is retired', key USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_each(plan.allowances) e WHERE (e.value ->> 'per_seat')::boolean) THEN
        RAISE EXCEPTION 'plan "%" has a per-seat allowance: a default plan''s allowance is the account''s, whatever its members', key
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- pools of its units made meanwhile wait (their foreign key's share lock
    -- on the unit) until this commits, and then enroll themselves; those
    -- made before are committed by the time the loop below reads them
    PERFORM 1 FROM billing.units u
    WHERE u.tenant_id = tenant AND u.unit IN (SELECT jsonb_object_keys(plan.allowances))
    ORDER BY u.unit COLLATE "C" FOR UPDATE;
    SELECT d.plan_id INTO previous FROM billing.default_plans d WHERE d.tenant_id = tenant FOR UPDATE;
    IF previous = plan.id THEN
        RETURN QUERY SELECT plan.id, plan.key, plan.version, 0, 'unchanged'::text;
        RETURN;
    END IF;
    INSERT INTO billing.default_plans AS d (tenant_id, plan_id) VALUES (tenant, plan.id)
    ON CONFLICT (tenant_id) DO UPDATE SET plan_id = EXCLUDED.plan_id, set_at = now();
    FOR acct IN
        SELECT DISTINCT po.account COLLATE "C" AS account FROM billing.pools po
        WHERE po.tenant_id = tenant AND po.lane = 0
        ORDER BY 1
    LOOP
        IF billing.apply_default_plan(tenant, acct.account) > 0 THEN
            n := n + 1;
        END IF;
    END LOOP;
    RETURN QUERY SELECT plan.id, plan.key, plan.version, n, 'set'::text;
END
$$;


-- One pass of the periodic work, across all tenants, at most `batch` items of
-- each kind; idempotent, and safe to run in several sessions at once (rows
-- another run holds are skipped). Correctness of check and ingest never
-- depends on it:
--   expiries     expiry entries of grants and holds whose time passed (sweep)
--   renewals     a subscription whose period ended and whose next one is
--                already paid (its invoice arrived, its update did not)
--                moves to the paid period and opens its allowance
--   held_back    plan credit held back past its period's end is expired
CREATE FUNCTION billing.run_periodic(batch integer DEFAULT 100)
RETURNS TABLE (task text, done bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    s billing.subscriptions;
    g record;
    renewed bigint := 0;
    expired bigint := 0;
    acting text := current_setting('billing.tenant', true);
BEGIN
    IF batch IS NULL THEN
        RAISE EXCEPTION 'batch may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    RETURN QUERY SELECT 'expiries'::text, billing.sweep(batch);
    FOR s IN
        SELECT * FROM billing.subscriptions x
        WHERE billing.subscription_access(x.status, x.collection_paused OR x.disputed) = 'open'
          AND x.period_end <= now() AND x.paid_through > x.period_end
          AND (x.ends_at IS NULL OR x.ends_at > x.period_end)
        ORDER BY x.id LIMIT batch FOR UPDATE SKIP LOCKED
    LOOP
        PERFORM set_config('billing.tenant', s.tenant_id, true);
        -- observed now: a poll fetched before this renewal is older
        UPDATE billing.subscriptions x SET period_start = s.period_end, period_end = s.paid_through,
            observed_at = greatest(x.observed_at, now()), updated_at = now()
        WHERE x.id = s.id
        RETURNING x.* INTO s;
        PERFORM billing.record_subscription_change(s, 'periodic', now(),
            jsonb_build_object('period_start', jsonb_build_array(NULL, s.period_start),
                               'period_end', jsonb_build_array(NULL, s.period_end)),
            billing.subscription_credit(s));
        renewed := renewed + 1;
    END LOOP;
    RETURN QUERY SELECT 'renewals'::text, renewed;
    FOR g IN
        SELECT gr.id, x.tenant_id FROM billing.subscription_allowances sa
        JOIN billing.subscriptions x ON x.id = sa.subscription_id
        CROSS JOIN LATERAL unnest(sa.grant_ids) AS gid(id)
        JOIN billing.grants gr ON gr.id = gid.id
        WHERE gr.status = 'suspended' AND gr.expires_at <= now()
        ORDER BY gr.id LIMIT batch
        FOR UPDATE OF x SKIP LOCKED
    LOOP
        PERFORM set_config('billing.tenant', g.tenant_id, true);
        PERFORM billing.resume_grant(g.id);
        expired := expired + 1;
    END LOOP;
    RETURN QUERY SELECT 'held_back'::text, expired;
    PERFORM set_config('billing.tenant', coalesce(acting, ''), true);
END
$$;
