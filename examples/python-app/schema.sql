-- Run once per database, by a role with billing_admin (or a superuser), with
-- billing.tenant set to the app's tenant (db.install does both).

-- The application's own tables.
CREATE SCHEMA IF NOT EXISTS app;

CREATE TABLE IF NOT EXISTS app.users (
    id              text PRIMARY KEY,
    time_zone       text NOT NULL DEFAULT 'UTC',  -- where the user's day starts
    customer_id     text UNIQUE,                  -- the payment provider's customer
    subscription_id text UNIQUE,                  -- the provider's subscription, polled
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- A guest is given its free requests the first time it is seen, and never again
-- (not even after it signed up and comes back signed out).
CREATE TABLE IF NOT EXISTS app.guests (
    id           text PRIMARY KEY,
    first_seen   timestamptz NOT NULL DEFAULT now(),
    converted_to text REFERENCES app.users
);

-- The work each API request does: its answer, stored in the same transaction as its usage.
CREATE TABLE IF NOT EXISTS app.completions (
    request_id text PRIMARY KEY,
    account    text NOT NULL,
    prompt     text NOT NULL CHECK (char_length(prompt) <= 2000),
    answer     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The billing catalogue of the tenant (admin functions).
SELECT billing.define_unit('requests', 'API requests: allowances and bought credit, 1 per call');
SELECT * FROM billing.define_plan('pro', '{"requests": {"amount": 100}}',
    prices => '[{"price_id": "price_pro_monthly", "interval": "month", "amount": 900, "currency": "usd"}]');
-- Top-ups: 1 request per cent, the card fee on top; at least $5, at most $1,000.
SELECT * FROM billing.set_topup_fee('usd', 'card', 2.9, 30);
SELECT * FROM billing.set_topup_limits('usd', min_credit => 500, max_credit => 100000);
