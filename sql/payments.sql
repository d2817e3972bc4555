-- Money in from a quoted charge (an auto-reload request, a checkout intent):
-- the rules both share, in one place.

-- A payment reported by the application or the provider: a reference, a
-- positive amount and a currency, or a clear error.
CREATE FUNCTION billing.require_payment(payment_ref text, amount_paid bigint, currency text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog
AS $$
BEGIN
    IF payment_ref IS NULL OR amount_paid IS NULL OR currency IS NULL THEN
        RAISE EXCEPTION 'payment_ref, amount_paid and currency may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF btrim(payment_ref) = '' OR length(payment_ref) > 255 THEN
        RAISE EXCEPTION 'payment_ref must be 1 to 255 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF amount_paid <= 0 THEN
        RAISE EXCEPTION 'amount_paid must be positive, got %', amount_paid USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- billing.payment_key (src/webhooks/topup.rs) names the grant a payment credits.

-- Credits per minor unit of the checkout intent or reload request that
-- `payment` paid, if any (a refund of it is taken back in those).
CREATE FUNCTION billing.quoted_payment_per_minor(tenant text, payment text) RETURNS bigint
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog
AS $$
#variable_conflict use_column
BEGIN
    RETURN coalesce(
        (SELECT i.credits_per_minor_unit FROM billing.checkout_intents i
         WHERE i.tenant_id = tenant AND i.payment_ref = payment),
        (SELECT q.credits_per_minor_unit FROM billing.reload_requests q
         WHERE q.tenant_id = tenant AND q.payment_ref = payment));
END
$$;

-- Credit a payment of `amount_paid` against its quote (fee_percent +
-- fee_fixed, quoted at `total` for `credit_minor`): the quoted credit when the
-- quoted total was paid, otherwise what was paid net of the worst-case fee
-- (billing.paid_credit), in credits of the pool (`per_minor` each), as a
-- grant of `kind` keyed by billing.payment_key, so a payment credits once
-- whoever reports it. Nothing is granted when the fee takes it all. A
-- payment the Stripe projection already credited as a plain top-up (its own
-- event named the account and came first) is adopted, not credited again.
CREATE FUNCTION billing.grant_payment(account text, unit text, kind text, payment_ref text, amount_paid bigint,
    currency text, fee_percent numeric, fee_fixed bigint, total bigint, credit_minor bigint, per_minor bigint,
    metadata jsonb)
RETURNS TABLE (grant_id bigint, status text, credited bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
DECLARE
    minor bigint := billing.paid_credit(amount_paid, fee_percent, fee_fixed, total, credit_minor);
    plain billing.grants;
BEGIN
    SELECT * INTO plain FROM billing.grants x
    WHERE x.tenant_id = billing.current_tenant() AND x.key = billing.payment_key(payment_ref)
      AND NOT (x.metadata ? 'checkout_intent' OR x.metadata ? 'reload_request');
    IF FOUND THEN
        RETURN QUERY SELECT plain.id, 'adopted'::text, plain.amount;
        RETURN;
    END IF;
    IF minor <= 0 THEN
        RETURN QUERY SELECT NULL::bigint, 'uncredited'::text, 0::bigint;
        RETURN;
    END IF;
    RETURN QUERY SELECT g.grant_id, g.status, g.amount
        FROM billing."grant"(account, unit, minor * per_minor, kind => kind, key => billing.payment_key(payment_ref),
             metadata => metadata || jsonb_build_object('amount_paid', amount_paid, 'currency', currency)) g;
END
$$;
