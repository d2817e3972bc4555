-- Checkout confirmed by polling (no webhook needed): the application opens
-- an intent (idempotent by its own key, quoted with the card fee on top),
-- creates the provider's checkout session for the intent's total and
-- attaches the session's id, then confirms the intent with the payment the
-- provider reports when it polls (or when the user returns). The Stripe
-- projection confirms the same intent when a webhook for it arrives (by the
-- intent in the payment's metadata, or by the attached session), so a
-- payment credits once whoever reports it, as a top-up keyed by the payment.
-- Table in sql/schema.sql.

-- The intent's status as a reader sees it: a pending intent past its expiry
-- is expired, exactly at that instant, with no job.
CREATE FUNCTION billing.checkout_state(status text, expires_at timestamptz) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog
AS $$
    SELECT CASE WHEN status = 'pending' AND expires_at <= now() THEN 'expired' ELSE status END
$$;

CREATE FUNCTION billing.open_checkout(
    account text, unit text, credit_amount bigint, currency text, card_kind text, key text,
    expires_in interval DEFAULT '1 hour', converted boolean DEFAULT false,
    credits_per_minor_unit bigint DEFAULT 1)
RETURNS TABLE (intent_id bigint, status text, credits bigint, credit_minor bigint, fee bigint, total bigint,
               expires_at timestamptz, outcome text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
    i billing.checkout_intents;
    q record;
BEGIN
    IF account IS NULL OR unit IS NULL OR credit_amount IS NULL OR open_checkout.currency IS NULL
       OR card_kind IS NULL OR key IS NULL OR expires_in IS NULL OR converted IS NULL
       OR credits_per_minor_unit IS NULL THEN
        RAISE EXCEPTION 'the arguments of open_checkout may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF btrim(key) = '' OR length(key) > 255 OR expires_in <= '0' OR expires_in > '30 days'
       OR credits_per_minor_unit <= 0 THEN
        RAISE EXCEPTION 'key must be 1 to 255 characters, expires_in between 0 and 30 days, credits_per_minor_unit positive'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO i FROM billing.checkout_intents x WHERE x.tenant_id = tenant AND x.key = open_checkout.key;
    IF FOUND THEN
        IF (i.account, i.unit, i.credit_minor, i.currency, i.card_kind, i.converted, i.credits_per_minor_unit)
           IS DISTINCT FROM (open_checkout.account, open_checkout.unit, credit_amount, open_checkout.currency,
                             card_kind, converted, open_checkout.credits_per_minor_unit) THEN
            RAISE EXCEPTION 'idempotency key reused with different parameters: checkout intent % (key %)', i.id, key
                USING ERRCODE = 'unique_violation',
                      HINT = 'Use a new key for a new checkout; a retry must repeat the original parameters exactly.';
        END IF;
        RETURN QUERY SELECT i.id, billing.checkout_state(i.status, i.expires_at), i.credits, i.credit_minor,
            i.fee, i.total, i.expires_at, 'duplicate'::text;
        RETURN;
    END IF;
    -- the unit must exist (a checkout buys credits of a known unit); the
    -- account is made if new, and the quote refuses what the schedule and
    -- the limits refuse
    IF NOT EXISTS (SELECT 1 FROM billing.units u WHERE u.tenant_id = tenant AND u.unit = open_checkout.unit) THEN
        RAISE EXCEPTION 'unknown unit %', unit USING ERRCODE = 'undefined_object',
            HINT = 'Grant credits in the unit first, or create it with billing.define_unit().';
    END IF;
    SELECT * INTO q FROM billing.quote(credit_amount, open_checkout.currency, card_kind, converted);
    PERFORM billing.account(account);
    INSERT INTO billing.checkout_intents AS x (tenant_id, account, unit, key, currency, card_kind, converted,
        credits_per_minor_unit, credits, credit_minor, fee, total, fee_percent, fee_fixed, expires_at)
    VALUES (tenant, open_checkout.account, open_checkout.unit, open_checkout.key, open_checkout.currency,
        card_kind, converted, open_checkout.credits_per_minor_unit, q.credit * open_checkout.credits_per_minor_unit,
        q.credit, q.fee, q.total, q.percent, q.fixed, now() + expires_in)
    ON CONFLICT ON CONSTRAINT checkout_intents_tenant_id_key_key DO NOTHING
    RETURNING * INTO i;
    IF NOT FOUND THEN
        -- the same key opened by a call that committed meanwhile: answered as a retry
        RETURN QUERY SELECT * FROM billing.open_checkout(account, unit, credit_amount, open_checkout.currency,
            card_kind, key, expires_in, converted, open_checkout.credits_per_minor_unit);
        RETURN;
    END IF;
    RETURN QUERY SELECT i.id, i.status, i.credits, i.credit_minor, i.fee, i.total, i.expires_at,
        'opened'::text;
END
$$;

-- An intent of the caller's tenant, locked.
CREATE FUNCTION billing.locked_checkout(intent bigint) RETURNS billing.checkout_intents
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
DECLARE i billing.checkout_intents;
BEGIN
    IF intent IS NULL THEN
        RAISE EXCEPTION 'intent may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO i FROM billing.checkout_intents x
    WHERE x.id = intent AND x.tenant_id = billing.current_tenant() FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no checkout intent %', intent USING ERRCODE = 'undefined_object';
    END IF;
    RETURN i;
END
$$;

-- The provider's checkout session made for the intent: attached once (the
-- same again is a no-op; another is refused), so its webhook finds the intent.
CREATE FUNCTION billing.attach_checkout(intent bigint, provider_session text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE i billing.checkout_intents;
BEGIN
    IF provider_session IS NULL THEN
        RAISE EXCEPTION 'provider_session may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    i := billing.locked_checkout(intent);
    IF btrim(provider_session) = '' OR length(provider_session) > 255 THEN
        RAISE EXCEPTION 'provider_session must be 1 to 255 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF i.provider_session IS NOT NULL AND i.provider_session <> attach_checkout.provider_session THEN
        RAISE EXCEPTION 'checkout intent % is attached to session %', i.id, i.provider_session
            USING ERRCODE = 'unique_violation';
    END IF;
    UPDATE billing.checkout_intents x SET provider_session = attach_checkout.provider_session, updated_at = now()
    WHERE x.id = i.id AND x.provider_session IS NULL;
    RETURN provider_session;
END
$$;

-- The provider reports the intent paid: credit what was paid
-- (billing.grant_payment) once. Confirming again with the same payment
-- answers the same; another payment or amount is refused. An expired or
-- failed intent confirmed late is still credited (the money was taken), and
-- says why.
CREATE FUNCTION billing.confirm_checkout(intent bigint, payment_ref text, amount_paid bigint, currency text)
RETURNS TABLE (intent_id bigint, status text, grant_id bigint, credited bigint, available bigint, note text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    i billing.checkout_intents;
    g record;
    late text;
BEGIN
    PERFORM billing.require_payment(payment_ref, amount_paid, currency);
    i := billing.locked_checkout(intent);
    IF i.status = 'paid' THEN
        IF i.payment_ref = confirm_checkout.payment_ref AND i.amount_paid = confirm_checkout.amount_paid
           AND i.currency = confirm_checkout.currency THEN
            RETURN QUERY SELECT i.id, 'duplicate'::text, i.grant_id,
                coalesce((SELECT x.amount FROM billing.grants x WHERE x.id = i.grant_id), 0),
                (SELECT c.available FROM billing."check"(i.account, i.unit) c), i.status_reason;
            RETURN;
        END IF;
        RAISE EXCEPTION 'idempotency key reused with different parameters: checkout intent % was paid by payment % of % %',
            i.id, i.payment_ref, i.amount_paid, i.currency USING ERRCODE = 'unique_violation';
    END IF;
    IF i.currency <> confirm_checkout.currency THEN
        RAISE EXCEPTION 'checkout intent % was quoted in %, not %', i.id, i.currency, confirm_checkout.currency
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT 1 FROM billing.checkout_intents x
               WHERE x.tenant_id = i.tenant_id AND x.payment_ref = confirm_checkout.payment_ref) THEN
        RAISE EXCEPTION 'payment % already paid another checkout intent', payment_ref USING ERRCODE = 'unique_violation';
    END IF;
    late := CASE WHEN i.status = 'failed' THEN format('confirmed after it failed (%s)', i.status_reason)
                 WHEN i.expires_at <= now() THEN format('confirmed after it expired at %s', i.expires_at) END;
    SELECT * INTO g FROM billing.grant_payment(i.account, i.unit, 'topup', payment_ref, amount_paid, currency,
        i.fee_percent, i.fee_fixed, i.total, i.credit_minor, i.credits_per_minor_unit,
        jsonb_build_object('checkout_intent', i.id));
    late := concat_ws('; ', late,
        CASE WHEN g.status = 'adopted' THEN 'credited by the provider''s webhook as a top-up of what was paid'
             WHEN g.credited = 0 THEN 'the amount paid does not cover the card fee' END);
    UPDATE billing.checkout_intents x SET status = 'paid', payment_ref = confirm_checkout.payment_ref,
        amount_paid = confirm_checkout.amount_paid, grant_id = g.grant_id, status_reason = nullif(late, ''),
        paid_at = now(), updated_at = now()
    WHERE x.id = i.id;
    RETURN QUERY SELECT i.id, 'paid'::text, g.grant_id, g.credited,
        (SELECT c.available FROM billing."check"(i.account, i.unit) c), nullif(late, '');
END
$$;

-- The provider reports the checkout failed or abandoned. A payment that
-- still arrives is credited by confirm_checkout.
CREATE FUNCTION billing.fail_checkout(intent bigint, reason text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE i billing.checkout_intents;
BEGIN
    IF reason IS NULL THEN
        RAISE EXCEPTION 'reason may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    i := billing.locked_checkout(intent);
    IF i.status = 'paid' THEN
        RAISE EXCEPTION 'checkout intent % is paid', i.id USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE billing.checkout_intents x SET status = 'failed', status_reason = left(reason, 500), updated_at = now()
    WHERE x.id = i.id;
    RETURN 'failed';
END
$$;

-- What a front end polls: one primary-key read.
CREATE FUNCTION billing.checkout_status(intent bigint)
RETURNS TABLE (intent_id bigint, status text, credits bigint, total bigint, currency text,
               expires_at timestamptz, paid_at timestamptz, credited bigint, note text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
    SELECT i.id, billing.checkout_state(i.status, i.expires_at), i.credits, i.total, i.currency, i.expires_at,
           i.paid_at, (SELECT g.amount FROM billing.grants g WHERE g.id = i.grant_id), i.status_reason
    FROM billing.checkout_intents i
    WHERE i.id = intent AND i.tenant_id = billing.current_tenant()
$$;

-- billing.stripe_checkout_intent (src/webhooks/topup.rs) names the intent a
-- Stripe payment or checkout session pays.
