-- pg_billing 0.1.0 -> 0.2.0: ALTER EXTENSION pg_billing UPDATE. Proven by
-- bin/upgrade-test (part of bin/test): a 0.1.0 database with real activity,
-- upgraded, keeps every balance, grant, event, hold and delivery, and has
-- the schema of a fresh 0.2.0 install. Until 0.2.0 is released, a change to
-- its schema goes into this file too (the test fails otherwise).
--
-- Takes a 0.1.0 database, with its data, to the 0.2.0 schema:
--   1. drop what 0.1.0 defined around its tables: views, policies, triggers
--      and every function (the library changed, so every C function is
--      created again from the 0.2.0 definitions; plain SQL functions too,
--      which is simpler than sorting out the changed ones);
--   2. alter the sixteen 0.1.0 tables in place (pools is rebuilt, to keep
--      0.2.0's column order; the other tables' new columns come last in a
--      fresh install too) and create the new ones of the bootstrap section;
--   3. move the data: meters.unit_price becomes price versions
--      (meter_prices), each priced event records its version
--      (usage_events.price_version), priced usage becomes per-period charges
--      (meter_periods, where 0.2.0 keeps what 0.1.0 kept in meter_carries),
--      and every event is counted in the hourly counters (usage_counters);
--   4. everything else as the 0.2.0 install script has it (functions, views,
--      triggers, new tables, policies, privileges).

\echo Use "ALTER EXTENSION pg_billing UPDATE TO '0.2.0'" to load this file. \quit

-- ===== 1. what 0.1.0 defined around its tables ===============================

DROP VIEW billing.webhook_endpoint_settings;
DROP VIEW billing.ledger;
DROP VIEW billing.grant_balances;

DROP POLICY tenant_isolation ON billing.accounts;
DROP POLICY tenant_isolation ON billing.units;
DROP POLICY tenant_isolation ON billing.meters;
DROP POLICY tenant_isolation ON billing.pools;
DROP POLICY tenant_isolation ON billing.grants;
DROP POLICY tenant_isolation ON billing.usage_events;
DROP POLICY tenant_isolation ON billing.holds;
DROP POLICY tenant_isolation ON billing.meter_carries;
DROP POLICY tenant_isolation ON billing.ledger_entries;
DROP POLICY tenant_isolation ON billing.webhook_endpoints;
DROP POLICY tenant_isolation ON billing.webhook_currencies;
DROP POLICY tenant_isolation ON billing.webhook_events;
DROP POLICY tenant_isolation ON billing.webhook_objects;
DROP POLICY tenant_isolation ON billing.webhook_handlers;
DROP POLICY tenant_isolation ON billing.stripe_reversals;
DROP POLICY admins_only ON billing.tenant_roles;

DROP TRIGGER ledger_entries_append_only ON billing.ledger_entries;
DROP TRIGGER ledger_entries_no_truncate ON billing.ledger_entries;
DROP TRIGGER usage_events_append_only ON billing.usage_events;
DROP TRIGGER usage_events_no_truncate ON billing.usage_events;
DROP TRIGGER webhook_events_intake ON billing.webhook_events;
DROP TRIGGER webhook_events_append_only ON billing.webhook_events;
DROP TRIGGER webhook_events_no_truncate ON billing.webhook_events;

-- every 0.1.0 function (callers before callees does not matter: plpgsql and
-- C functions record no dependencies on the functions they call)
DROP FUNCTION billing.account(text, text, jsonb);
DROP FUNCTION billing.balance(text, text, timestamptz);
DROP FUNCTION billing."check"(text, text, bigint);
DROP FUNCTION billing.clip_bytes(text, integer);
DROP FUNCTION billing.currency_exponent(text);
DROP FUNCTION billing.current_tenant();
DROP FUNCTION billing.define_meter(text, text, numeric, text);
DROP FUNCTION billing.define_unit(text, text);
DROP FUNCTION billing.define_webhook_endpoint(text, text, text, integer, text, text, bigint, text);
DROP FUNCTION billing."grant"(text, text, bigint, text, integer, timestamptz, timestamptz, text, jsonb);
DROP FUNCTION billing.grant_tenant(text, name);
DROP FUNCTION billing.ingest(text, text, numeric, text, timestamptz, jsonb, bigint, boolean);
DROP FUNCTION billing.ingest_batch(jsonb);
DROP FUNCTION billing.lock_webhook_object(bigint, text, text);
DROP FUNCTION billing.map_webhook_currency(text, text, text, integer, bigint);
DROP FUNCTION billing.purge_webhook_events(interval, boolean);
DROP FUNCTION billing.receive_webhook(text, jsonb, text);
DROP FUNCTION billing.register_webhook_handler(text, regprocedure, text);
DROP FUNCTION billing.reject_ledger_change();
DROP FUNCTION billing.release(bigint);
DROP FUNCTION billing.reserve(text, text, bigint, text, interval, jsonb);
DROP FUNCTION billing.reverse_grant(bigint, bigint);
DROP FUNCTION billing.revoke_tenant(text, name);
DROP FUNCTION billing.revoke_unused(bigint);
DROP FUNCTION billing.rotate_webhook_secret(text, text, interval);
DROP FUNCTION billing.run_webhook_handler(oid, billing.webhook_events);
DROP FUNCTION billing.set_floor(text, text, bigint);
DROP FUNCTION billing.settle(bigint, bigint, text, text, numeric, jsonb);
DROP FUNCTION billing.stripe_apply_reversals(bigint, text);
DROP FUNCTION billing.stripe_credit_topup(billing.webhook_events);
DROP FUNCTION billing.stripe_credits(bigint, text, bigint);
DROP FUNCTION billing.stripe_reverse_payment(billing.webhook_events);
DROP FUNCTION billing.sweep(integer);
DROP FUNCTION billing.tenant_grant_role(text, name);
DROP FUNCTION billing.verify_ledger();
DROP FUNCTION billing.verify_webhook(text, text, jsonb, text, text, integer, text);
DROP FUNCTION billing.void_grant(bigint);
DROP FUNCTION billing.webhook_event_intake();
DROP FUNCTION billing.webhook_events_guard();
DROP FUNCTION billing.webhook_handler_for(billing.webhook_events, text);
DROP FUNCTION billing.webhook_intake_decide(billing.webhook_events);
DROP FUNCTION billing.webhook_sample(billing.webhook_events);

-- ===== 2. the bootstrap tables ===============================================

-- What billing.check answers (src/gate.rs).
CREATE TYPE billing.check_result AS (
    allowed   boolean,
    available bigint,
    balance   bigint,
    held      bigint,
    debt      bigint,
    floor     bigint,
    reason    text,
    resets_at timestamptz
);

-- What a ledger entry records: the one list, mirrored by EntryKind in
-- src/ledger/core.rs (a test compares them).
CREATE TYPE billing.entry_kind AS ENUM (
    'grant', 'debit', 'debt', 'debt_repayment', 'expire', 'void', 'revoke',
    'hold', 'settle', 'release', 'hold_expire', 'reinstate', 'debt_reversal', 'transfer',
    'suspend', 'resume');

-- meters: how usage is measured; the price moves to meter_prices (below).
ALTER TABLE billing.meters
    ADD COLUMN aggregation text        NOT NULL DEFAULT 'sum'
               CHECK (aggregation IN ('sum', 'count', 'max', 'last', 'unique_count')),
    ADD COLUMN property    text,
    ADD COLUMN group_by    text[]      NOT NULL DEFAULT '{}',
    ADD COLUMN filter      jsonb,
    ADD COLUMN lateness    interval    NOT NULL DEFAULT '48 hours',
    ADD COLUMN late_events text        NOT NULL DEFAULT 'reject' CHECK (late_events IN ('reject', 'current_period')),
    ADD COLUMN future_skew interval    NOT NULL DEFAULT '5 minutes',
    ADD COLUMN disabled_at timestamptz,
    ADD CONSTRAINT meters_check CHECK ((aggregation = 'unique_count') = (property IS NOT NULL));

-- A meter's prices, one row per version, never changed: an event records
-- the version it was charged by. The version in force at an instant is the
-- last one effective by then; a NULL price means each event passes its own
-- cost. The price's JSON is canonical (src/pricing/price.rs).
CREATE TABLE billing.meter_prices (
    tenant_id    text        NOT NULL,
    meter        text        NOT NULL,
    version      integer     NOT NULL,
    effective_at timestamptz NOT NULL,
    price        jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, meter, version),
    FOREIGN KEY (tenant_id, meter) REFERENCES billing.meters (tenant_id, meter)
);

-- pools: rebuilt in 0.2.0's column order rather than altered (ALTER TABLE
-- would append the new columns): there the columns a debit writes sit side
-- by side, so the log of an update on the same page, which keeps only the
-- bytes between the unchanged prefix and suffix, stays small. grants and
-- holds are pointed at the new table; ids, the id sequence's position and
-- every figure are kept.
ALTER TABLE billing.grants DROP CONSTRAINT grants_pool_id_fkey;
ALTER TABLE billing.holds DROP CONSTRAINT holds_pool_id_fkey;
-- 0.2.0 keeps no foreign key from events, entries or carries to their pool
ALTER TABLE billing.usage_events DROP CONSTRAINT usage_events_pool_id_fkey;
ALTER TABLE billing.ledger_entries DROP CONSTRAINT ledger_entries_pool_id_fkey;
ALTER TABLE billing.meter_carries DROP CONSTRAINT meter_carries_pool_id_fkey;
ALTER TABLE billing.pools RENAME TO pools_0_1_0;
ALTER INDEX billing.pools_pkey RENAME TO pools_0_1_0_pkey;
-- its constraints' names go with it, so the new table's are the same as a fresh install's
ALTER TABLE billing.pools_0_1_0 DROP CONSTRAINT pools_tenant_id_account_unit_key,
    DROP CONSTRAINT pools_tenant_id_account_fkey, DROP CONSTRAINT pools_tenant_id_unit_fkey;
ALTER SEQUENCE billing.pools_id_seq RENAME TO pools_0_1_0_id_seq;
CREATE TABLE billing.pools (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id        text        NOT NULL,
    account          text        NOT NULL,
    unit             text        NOT NULL,
    lane           smallint    NOT NULL DEFAULT 0,
    -- on lane 0: how many lanes take debits beside it (0: not split)
    lanes          smallint    NOT NULL DEFAULT 0,
    floor            bigint      NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- the start of the first allowance window not granted yet (infinity:
    -- none); on lane 0 (src/allowances.rs)
    allowance_next   timestamptz NOT NULL DEFAULT 'infinity',
    -- on lane 0: whether limits cap its usage (src/limits.rs)
    limited          boolean     NOT NULL DEFAULT false,
    -- on lane 0: the auto-reload threshold while its rule is armed (active,
    -- no request open): a debit leaving available below it calls
    -- billing.request_reload (sql/reloads.sql); NULL otherwise
    reload_below     bigint,
    -- on lane 0: the bounds of its balance alerts (sql/alerts.sql): a debit
    -- leaving available below alert_below fires the armed alerts it
    -- crossed; a credit bringing it to alert_above or more re-arms those it
    -- passed (NULL: no alert waits on that side)
    alert_below      bigint,
    alert_above      bigint,
    -- The hourly usage counter of one (meter, hour, groups) key, kept on
    -- the pool row that every event of the pool updates anyway instead of in
    -- a row of usage_counters of its own; written back to usage_counters
    -- when another hour's counter takes its place. billing.hourly_usage
    -- reads both. Its key (NULL: none), and the instant a late event last
    -- revised it; its figures are below.
    counter_meter    text,
    counter_hour     timestamptz,
    counter_groups   text,
    counter_revised_at timestamptz,
    debt             bigint      NOT NULL DEFAULT 0,
    held             bigint      NOT NULL DEFAULT 0,
    active_held      bigint      NOT NULL DEFAULT 0,
    cache_until      timestamptz NOT NULL DEFAULT 'infinity',
    -- The grant being drained, whose row does not count the last `drawn`
    -- taken from it: a debit of one grant writes its pool row and not the
    -- grant's. Its remaining is billing.grant_remaining(g); a change of any
    -- other grant, or of this one by anything but a debit, writes it back.
    drawn_grant      bigint,
    -- What every debit changes, side by side at the end: the log of an
    -- update on the same page keeps only the bytes between the unchanged
    -- prefix and suffix.
    version          bigint      NOT NULL DEFAULT 0,
    remaining        bigint      NOT NULL DEFAULT 0,
    active_remaining bigint      NOT NULL DEFAULT 0,
    cache_from       timestamptz NOT NULL DEFAULT '-infinity',
    updated_at       timestamptz NOT NULL DEFAULT now(),
    counter_events   bigint,
    counter_quantity numeric,
    counter_cost     bigint,
    counter_last_at  timestamptz,
    drawn            bigint      NOT NULL DEFAULT 0,
    UNIQUE (tenant_id, account, unit, lane),
    FOREIGN KEY (tenant_id, account) REFERENCES billing.accounts (tenant_id, account),
    FOREIGN KEY (tenant_id, unit) REFERENCES billing.units (tenant_id, unit)
) WITH (fillfactor = 70);
INSERT INTO billing.pools (id, tenant_id, account, unit, floor, created_at, version, remaining,
                           active_remaining, cache_from, updated_at, debt, held, active_held, cache_until)
OVERRIDING SYSTEM VALUE
SELECT id, tenant_id, account, unit, floor, created_at, version, remaining,
       active_remaining, cache_from, updated_at, debt, held, active_held, cache_until
FROM billing.pools_0_1_0;
SELECT pg_catalog.setval('billing.pools_id_seq', s.last_value, s.is_called) FROM billing.pools_0_1_0_id_seq s;
ALTER EXTENSION pg_billing DROP TABLE billing.pools_0_1_0;
ALTER EXTENSION pg_billing DROP SEQUENCE billing.pools_0_1_0_id_seq;
DROP TABLE billing.pools_0_1_0;
SELECT pg_catalog.pg_extension_config_dump('billing.pools', '');
SELECT pg_catalog.pg_extension_config_dump('billing.pools_id_seq', '');
-- 0.2.0 keeps no foreign key from grants to their pool either
ALTER TABLE billing.holds ADD CONSTRAINT holds_pool_id_fkey FOREIGN KEY (pool_id) REFERENCES billing.pools (id);

-- grants: lane shares, who granted and why; no CHECK constraints any more.
ALTER TABLE billing.grants
    DROP CONSTRAINT grants_amount_check,
    DROP CONSTRAINT grants_check,
    DROP CONSTRAINT grants_check1,
    DROP CONSTRAINT grants_check2,
    DROP CONSTRAINT grants_kind_check,
    DROP CONSTRAINT grants_status_check,
    ADD COLUMN parent_id  bigint,
    ADD COLUMN granted_by regrole,
    ADD COLUMN reason     text,
    ADD COLUMN exhausted  boolean NOT NULL DEFAULT false,
    SET (fillfactor = 70);
-- a grant used up, voided or revoked (0.1.0 kept remaining exact on the row)
UPDATE billing.grants SET exhausted = true WHERE remaining <= 0;
-- the drain reads active grants that are not used up
DROP INDEX billing.grants_drain_order;
CREATE INDEX grants_drain_order ON billing.grants
    (pool_id, priority, expires_at NULLS LAST, id) WHERE status = 'active' AND NOT exhausted;
CREATE UNIQUE INDEX grants_lane_share ON billing.grants (parent_id, pool_id) WHERE parent_id IS NOT NULL;
CREATE INDEX grants_by_pool ON billing.grants (pool_id);

-- What grant `g` has left: its row's remaining, less what its pool's row
-- has drawn from it since (pools.drawn_grant). Every reader of a grant's
-- remaining outside the ledger's own lock reads it here.
CREATE FUNCTION billing.grant_remaining(g billing.grants) RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT g.remaining - coalesce((SELECT p.drawn FROM billing.pools p
                                      WHERE p.id = g.pool_id AND p.drawn_grant = g.id), 0) $$;

-- usage_events: the price version instead of the unit price (unit_price is
-- dropped once the versions are written, below), booking time, and the
-- ledger entry an event may carry itself; no primary key, foreign key nor
-- CHECK constraints any more.
ALTER TABLE billing.usage_events
    DROP CONSTRAINT usage_events_pkey,
    DROP CONSTRAINT usage_events_check,
    DROP CONSTRAINT usage_events_cost_check,
    DROP CONSTRAINT usage_events_covered_check,
    DROP CONSTRAINT usage_events_debt_created_check,
    DROP CONSTRAINT usage_events_quantity_check,
    ALTER COLUMN drains DROP NOT NULL,
    ADD COLUMN price_version integer,
    ADD COLUMN booked_at     timestamptz,
    ADD COLUMN entry_version bigint,
    ADD COLUMN entry_grant   bigint,
    ADD COLUMN balance_after bigint,
    ADD COLUMN debt_after    bigint,
    ADD COLUMN held_after    bigint,
    ADD COLUMN entry_at      timestamptz;
DROP INDEX billing.usage_events_by_meter;
CREATE INDEX usage_events_by_pool ON billing.usage_events (pool_id, id);

-- What a priced meter charged a pool in one period (src/metering): the
-- period's aggregate quantity so far and the whole units charged. Each event
-- is charged what the period's total, priced and rounded once, grew by, so
-- the sum charged is the period's price however its usage is split. A new
-- price version applies from the quantity reached when it took over
-- (switch_quantity; base is what was charged before). Read and written
-- under the pool's lock.
CREATE TABLE billing.meter_periods (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       text        NOT NULL,
    pool_id         bigint      NOT NULL,
    meter           text        NOT NULL,
    period_start    timestamptz NOT NULL,
    quantity        numeric     NOT NULL,
    last_at         timestamptz,
    version         integer     NOT NULL,
    switch_quantity numeric     NOT NULL,
    -- additive prices (a cost card): the exact sum since the version took over
    exact           numeric     NOT NULL,
    base            bigint      NOT NULL,
    charged         bigint      NOT NULL,
    CONSTRAINT meter_periods_key UNIQUE (pool_id, meter, period_start)
) WITH (fillfactor = 70);

-- The distinct values a unique_count meter has seen in a pool's period.
CREATE TABLE billing.meter_uniques (
    tenant_id    text        NOT NULL,
    pool_id      bigint      NOT NULL,
    meter        text        NOT NULL,
    period_start timestamptz NOT NULL,
    value        text        NOT NULL,
    PRIMARY KEY (pool_id, meter, period_start, value)
);

-- Usage per hour, per pool row (a lane counts what it took), meter and
-- values of the meter's group_by properties: what reports read instead of
-- events (see the 0.2.0 install script).
CREATE TABLE billing.usage_counters (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   text        NOT NULL,
    pool_id     bigint      NOT NULL,
    account     text        NOT NULL,
    meter       text        NOT NULL,
    hour        timestamptz NOT NULL,
    groups      text        NOT NULL,
    events      bigint      NOT NULL,
    quantity    numeric     NOT NULL,
    last_at     timestamptz,
    cost        bigint      NOT NULL,
    revised_at  timestamptz,
    CONSTRAINT usage_counters_key UNIQUE (pool_id, meter, hour, groups)
) WITH (fillfactor = 70);

-- Recurring allowances (src/allowances.rs): credit that a pool receives
-- for every window (hour, day, week or month in a time zone, or once), as a
-- grant created when the pool is first used in the window, and counted by
-- the gate before that. One rule applies to a pool at a time: a change
-- ends the running rule at a window boundary and starts the new one there.
-- A window's credit stays spendable for keep_periods windows (rollover).
CREATE TABLE billing.allowances (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    text        NOT NULL,
    pool_id      bigint      NOT NULL REFERENCES billing.pools (id),
    account      text        NOT NULL,
    unit         text        NOT NULL,
    amount       bigint      NOT NULL CHECK (amount > 0),
    every        text        NOT NULL CHECK (every IN ('hour', 'day', 'week', 'month', 'never')),
    time_zone    text        NOT NULL,
    keep_periods integer     NOT NULL CHECK (keep_periods BETWEEN 1 AND 366),
    priority     integer     NOT NULL,
    starts_at    timestamptz NOT NULL,
    ends_at      timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- the tenant's default plan that made this rule (billing.apply_default_plan);
    -- NULL for a rule the application set
    default_plan bigint,
    CHECK (ends_at > starts_at)
);
CREATE INDEX allowances_by_pool ON billing.allowances (pool_id, starts_at);
CREATE INDEX allowances_of_default_plan ON billing.allowances (tenant_id, account) WHERE default_plan IS NOT NULL;

-- What has been reported to the payment provider of each account's usage
-- of a meter in a period (postpaid billing): the quantity the provider has,
-- and the key of the report that brought it there.
CREATE TABLE billing.usage_reports (
    tenant_id    text        NOT NULL,
    account      text        NOT NULL,
    meter        text        NOT NULL,
    period_start timestamptz NOT NULL,
    reported     numeric     NOT NULL,
    report_key   text        NOT NULL,
    reported_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, account, meter, period_start)
);

-- What each open reservation counts in the limits of its pool (src/limits.rs):
-- a reservation counts in the window it was made in until it is settled
-- (then its actual cost replaces it there), released or expired (then it
-- is given back).
CREATE TABLE billing.limit_holds (
    tenant_id    text        NOT NULL,
    hold_id      bigint      NOT NULL,
    limit_id     bigint      NOT NULL,
    window_start timestamptz NOT NULL,
    member       text        NOT NULL,
    amount       bigint      NOT NULL,
    PRIMARY KEY (hold_id, limit_id)
);

-- Guests converted to accounts (src/allowances.rs): each guest once, to
-- one account.
CREATE TABLE billing.guest_conversions (
    tenant_id    text        NOT NULL,
    guest        text        NOT NULL,
    account      text        NOT NULL,
    converted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, guest)
);

-- Limits (src/limits.rs): at most `max` of the pool's unit used per window
-- (hour, day, week, month in a time zone, or ever), for the account or for
-- each member (the event's "member" property), beside its credit. A strict
-- debit or a reservation that would pass a limit is refused as one that
-- would cross the floor.
CREATE TABLE billing.limits (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id  text        NOT NULL,
    pool_id    bigint      NOT NULL REFERENCES billing.pools (id),
    account    text        NOT NULL,
    unit       text        NOT NULL,
    name       text        NOT NULL,
    max        bigint      NOT NULL CHECK (max >= 0),
    every      text        NOT NULL CHECK (every IN ('hour', 'day', 'week', 'month', 'never')),
    time_zone  text        NOT NULL,
    per_member boolean     NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT limits_key UNIQUE (pool_id, name)
);

-- What each limit's window has used, per member ('' for the account's own
-- limits). Written under the pool's lock.
CREATE TABLE billing.limit_usage (
    tenant_id    text        NOT NULL,
    limit_id     bigint      NOT NULL,
    window_start timestamptz NOT NULL,
    member       text        NOT NULL,
    used         bigint      NOT NULL,
    PRIMARY KEY (limit_id, window_start, member)
);

-- Top-up quotes (src/quotes): the card fee of each card kind per currency,
-- and each currency's top-up limits and conversion surcharge.
CREATE TABLE billing.topup_fees (
    tenant_id  text        NOT NULL,
    currency   text        NOT NULL,
    card_kind  text        NOT NULL,
    percent    numeric     NOT NULL CHECK (percent >= 0 AND percent < 100 AND scale(trim_scale(percent)) <= 4),
    fixed      bigint      NOT NULL CHECK (fixed >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, currency, card_kind)
);
CREATE TABLE billing.topup_limits (
    tenant_id          text        NOT NULL,
    currency           text        NOT NULL,
    min_credit         bigint      NOT NULL CHECK (min_credit > 0),
    max_credit         bigint      NOT NULL,
    conversion_percent numeric     NOT NULL DEFAULT 0
                       CHECK (conversion_percent >= 0 AND conversion_percent < 100
                              AND scale(trim_scale(conversion_percent)) <= 4),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, currency),
    CHECK (max_credit >= min_credit)
);

-- Auto-reload (sql/reloads.sql): one rule per pool, and the requests that
-- debits write when they take the pool below the rule's threshold. A request
-- is open while pending or claimed; a pool has at most one open request.
CREATE TABLE billing.reload_rules (
    tenant_id      text        NOT NULL,
    account        text        NOT NULL,
    unit           text        NOT NULL,
    pool_id        bigint      NOT NULL REFERENCES billing.pools (id),
    threshold      bigint      NOT NULL,
    -- reload up to this available, or by this fixed amount (exactly one)
    reload_to      bigint,
    reload_amount  bigint      CHECK (reload_amount > 0),
    min_amount     bigint      NOT NULL DEFAULT 1 CHECK (min_amount > 0),
    max_amount     bigint      CHECK (max_amount > 0),
    min_interval   interval    NOT NULL DEFAULT '0' CHECK (min_interval >= '0'),
    max_per_day    integer     NOT NULL DEFAULT 10 CHECK (max_per_day > 0),
    requires_subscription boolean NOT NULL DEFAULT false,
    -- how the card is charged: the quote of each request (src/quotes)
    currency       text        NOT NULL,
    card_kind      text        NOT NULL,
    converted      boolean     NOT NULL DEFAULT false,
    credits_per_minor_unit bigint NOT NULL DEFAULT 1 CHECK (credits_per_minor_unit > 0),
    max_failures   integer     NOT NULL DEFAULT 3 CHECK (max_failures > 0),
    status         text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended', 'disabled')),
    status_reason  text,
    failures       integer     NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, account, unit),
    CHECK ((reload_to IS NULL) <> (reload_amount IS NULL)),
    CHECK (reload_to IS NULL OR reload_to > threshold),
    CHECK (max_amount IS NULL OR max_amount >= min_amount)
);
CREATE UNIQUE INDEX reload_rules_of_pool ON billing.reload_rules (pool_id);

CREATE TABLE billing.reload_requests (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id      text        NOT NULL,
    account        text        NOT NULL,
    unit           text        NOT NULL,
    pool_id        bigint      NOT NULL REFERENCES billing.pools (id),
    status         text        NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'claimed', 'completed', 'failed')),
    -- what the debit saw, and the credit asked for, in the pool's unit
    available_at_request bigint NOT NULL,
    credits        bigint      NOT NULL CHECK (credits > 0),
    -- the quote: credit in the currency's minor units, the worst-case fee
    -- on top, and the total to charge
    currency       text        NOT NULL,
    card_kind      text        NOT NULL,
    credits_per_minor_unit bigint NOT NULL,
    credit_minor   bigint      NOT NULL,
    fee            bigint      NOT NULL,
    total          bigint      NOT NULL,
    fee_percent    numeric     NOT NULL,
    fee_fixed      bigint      NOT NULL,
    attempts       integer     NOT NULL DEFAULT 0,
    -- which charge this is: the same for every claim until a failure, so a
    -- worker whose lease ran out and the one after it charge with one
    -- idempotency key (claim_reloads' charge_key)
    charge_attempt integer     NOT NULL DEFAULT 1,
    -- when it first became due (the rule's interval and daily cap count these)
    due_at         timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    claimed_by     text,
    lease_until    timestamptz,
    payment_ref    text,
    amount_paid    bigint,
    grant_id       bigint      REFERENCES billing.grants (id),
    failure_reason text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    closed_at      timestamptz
);
CREATE UNIQUE INDEX reload_requests_one_open ON billing.reload_requests (pool_id)
    WHERE status IN ('pending', 'claimed');
CREATE INDEX reload_requests_due ON billing.reload_requests (next_attempt_at)
    WHERE status IN ('pending', 'claimed');
CREATE INDEX reload_requests_of_pool ON billing.reload_requests (pool_id, created_at);
CREATE UNIQUE INDEX reload_requests_payment ON billing.reload_requests (tenant_id, payment_ref);

-- Balance alerts (sql/alerts.sql): named rules per pool, and the alerts they
-- fire, one per crossing, in the debit's own transaction.
CREATE TABLE billing.alert_rules (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id  text        NOT NULL,
    account    text        NOT NULL,
    unit       text        NOT NULL,
    pool_id    bigint      NOT NULL REFERENCES billing.pools (id),
    name       text        NOT NULL CHECK (name ~ '^[A-Za-z0-9_.:-]{1,63}$'),
    -- low_balance: available below threshold; zero: available at or below
    -- 0 (threshold 1); debt: the account owes (threshold 0)
    kind       text        NOT NULL CHECK (kind IN ('low_balance', 'zero', 'debt')),
    threshold  bigint      NOT NULL,
    armed      boolean     NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, account, unit, name)
);
CREATE INDEX alert_rules_of_pool ON billing.alert_rules (pool_id);

-- An alert is a pool's (a rule fired: its account, rule, and the pool's
-- available and debt then) or a cost audit's (kind cost_drift, from
-- billing.audit_costs in sql/reconcile.sql: the meter as name, the drift
-- allowed as threshold, its period, and what it found in details).
CREATE TABLE billing.alerts (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       text        NOT NULL,
    account         text,
    unit            text        NOT NULL,
    rule_id         bigint      REFERENCES billing.alert_rules (id) ON DELETE CASCADE,
    name            text        NOT NULL,
    kind            text        NOT NULL,
    threshold       bigint      NOT NULL,
    available       bigint,
    debt            bigint,
    period_start    timestamptz,
    period_end      timestamptz,
    details         jsonb,
    fired_at        timestamptz NOT NULL DEFAULT now(),
    acknowledged_at timestamptz,
    acknowledged_by text,
    CHECK (CASE WHEN kind = 'cost_drift'
                THEN rule_id IS NULL AND period_start IS NOT NULL AND period_end IS NOT NULL AND details IS NOT NULL
                ELSE rule_id IS NOT NULL AND account IS NOT NULL AND available IS NOT NULL AND debt IS NOT NULL END)
);
CREATE INDEX alerts_open ON billing.alerts (tenant_id, fired_at) WHERE acknowledged_at IS NULL;
-- a cost audit raises one alert per meter and period
CREATE UNIQUE INDEX alerts_cost_drift_once ON billing.alerts (tenant_id, name, period_start, period_end)
    WHERE kind = 'cost_drift';

-- Checkout intents (sql/checkouts.sql): a top-up the application confirms by
-- polling its payment provider. status is pending, paid or failed; a pending
-- intent past expires_at reads as expired (billing.checkout_state).
CREATE TABLE billing.checkout_intents (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id      text        NOT NULL,
    account        text        NOT NULL,
    unit           text        NOT NULL,
    key            text        NOT NULL,
    currency       text        NOT NULL,
    card_kind      text        NOT NULL,
    converted      boolean     NOT NULL,
    credits_per_minor_unit bigint NOT NULL CHECK (credits_per_minor_unit > 0),
    credits        bigint      NOT NULL CHECK (credits > 0),
    credit_minor   bigint      NOT NULL,
    fee            bigint      NOT NULL,
    total          bigint      NOT NULL,
    fee_percent    numeric     NOT NULL,
    fee_fixed      bigint      NOT NULL,
    status         text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'paid', 'failed')),
    status_reason  text,
    provider_session text,
    payment_ref    text,
    amount_paid    bigint,
    grant_id       bigint      REFERENCES billing.grants (id),
    expires_at     timestamptz NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    paid_at        timestamptz,
    UNIQUE (tenant_id, key)
);
CREATE UNIQUE INDEX checkout_intents_payment ON billing.checkout_intents (tenant_id, payment_ref);
CREATE UNIQUE INDEX checkout_intents_session ON billing.checkout_intents (tenant_id, provider_session);


-- ledger_entries: kind is an enum; identified by (pool_id, version), its id
-- unique but not indexed; no foreign key nor CHECK constraints any more.
ALTER TABLE billing.ledger_entries
    DROP CONSTRAINT ledger_entries_check,
    DROP CONSTRAINT ledger_entries_check1,
    DROP CONSTRAINT ledger_entries_check2,
    DROP CONSTRAINT ledger_entries_debt_after_check,
    DROP CONSTRAINT ledger_entries_held_after_check,
    DROP CONSTRAINT ledger_entries_kind_check,
    DROP CONSTRAINT ledger_entries_version_check,
    DROP CONSTRAINT ledger_entries_pkey,
    DROP CONSTRAINT ledger_entries_pool_id_version_key,
    ALTER COLUMN kind TYPE billing.entry_kind USING kind::billing.entry_kind,
    ADD PRIMARY KEY (pool_id, version);
DROP INDEX billing.ledger_entries_by_time;

-- ===== 3. the data ===========================================================

-- The price versions. 0.1.0 kept one unit_price per meter and each priced
-- event copied it; 0.2.0 keeps versions. Each run of one unit price among a
-- meter's priced events (in id order) is a version, effective from its first
-- event (the first from the meter's creation); the meter's current price
-- follows as a last version when it differs from the last run (or is the
-- only version: a meter that never priced an event, NULL for one whose
-- events pass their cost, as billing.define_meter writes it in 0.2.0).
-- Prices are written as src/pricing/price.rs writes a unit price (per_unit,
-- canonical decimal strings).
UPDATE billing.usage_events u SET price_version = v.version
FROM (SELECT r.id, sum(r.starts) OVER (PARTITION BY r.tenant_id, r.meter ORDER BY r.id)::integer AS version
      FROM (SELECT e.id, e.tenant_id, e.meter,
                   CASE WHEN lag(e.unit_price) OVER (PARTITION BY e.tenant_id, e.meter ORDER BY e.id) = e.unit_price
                        THEN 0 ELSE 1 END AS starts
            FROM billing.usage_events e WHERE e.unit_price IS NOT NULL) r) v
WHERE u.id = v.id;

WITH runs AS (
    SELECT e.tenant_id, e.meter, e.price_version AS version, min(e.unit_price) AS unit_price,
           min(e.recorded_at) AS first_at, max(e.recorded_at) AS last_at
    FROM billing.usage_events e WHERE e.price_version IS NOT NULL
    GROUP BY e.tenant_id, e.meter, e.price_version
), last_run AS (
    SELECT DISTINCT ON (r.tenant_id, r.meter) r.*
    FROM runs r ORDER BY r.tenant_id, r.meter, r.version DESC
), versions AS (
    SELECT r.tenant_id, r.meter, r.version,
           CASE WHEN r.version = 1 THEN least(m.created_at, r.first_at) ELSE r.first_at END AS effective_at,
           r.unit_price
    FROM runs r JOIN billing.meters m ON m.tenant_id = r.tenant_id AND m.meter = r.meter
    UNION ALL
    SELECT m.tenant_id, m.meter, coalesce(l.version, 0) + 1,
           CASE WHEN l.version IS NULL THEN m.created_at
                ELSE greatest(m.created_at, l.last_at + interval '1 microsecond') END,
           m.unit_price
    FROM billing.meters m
    LEFT JOIN last_run l ON l.tenant_id = m.tenant_id AND l.meter = m.meter
    WHERE l.version IS NULL OR l.unit_price IS DISTINCT FROM m.unit_price
)
INSERT INTO billing.meter_prices (tenant_id, meter, version, effective_at, price, created_at)
SELECT v.tenant_id, v.meter, v.version, v.effective_at,
       CASE WHEN v.unit_price IS NOT NULL THEN
           jsonb_build_object('model', 'per_unit', 'unit_price', trim_scale(v.unit_price)::text,
                              'included', '0', 'rounding', 'half_up') END,
       v.effective_at
FROM versions v
ORDER BY v.tenant_id, v.meter, v.version;

-- Priced usage per pool, meter and period (the calendar month, UTC), as
-- 0.2.0's metering would have left it: what was charged is what its events
-- were charged (billing.verify_ledger compares the two). 0.1.0 carried the
-- sub-unit remainder of each pool and meter in meter_carries; 0.2.0 prices
-- the period's total and rounds it once, so within a period that remainder
-- is what the row's quantity, priced, differs by from charged; the part
-- carried over from earlier months has no place in 0.2.0 (less than one
-- unit per pool and meter) and is dropped with meter_carries. The events
-- of 0.1.0 meters all aggregate by sum. Where the price changed within a
-- period, the row continues the last version: switch_quantity and base are
-- the quantity and charges before it took over.
INSERT INTO billing.meter_periods (tenant_id, pool_id, meter, period_start, quantity, last_at, version,
                                   switch_quantity, exact, base, charged)
SELECT min(x.tenant_id), x.pool_id, x.meter, x.period, sum(x.quantity), NULL, min(x.last_version),
       coalesce(sum(x.quantity) FILTER (WHERE x.id <= x.switch_id), 0), 0,
       coalesce(sum(x.cost) FILTER (WHERE x.id <= x.switch_id), 0)::bigint, sum(x.cost)::bigint
FROM (SELECT y.*, max(y.id) FILTER (WHERE y.price_version <> y.last_version) OVER p AS switch_id
      FROM (SELECT e.id, e.tenant_id, e.pool_id, e.meter, e.quantity, e.cost, e.price_version,
                   date_trunc('month', coalesce(e.booked_at, e.occurred_at) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS period,
                   last_value(e.price_version) OVER (
                       PARTITION BY e.pool_id, e.meter,
                                    date_trunc('month', coalesce(e.booked_at, e.occurred_at) AT TIME ZONE 'UTC')
                       ORDER BY e.id ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS last_version
            FROM billing.usage_events e WHERE e.price_version IS NOT NULL) y
      WINDOW p AS (PARTITION BY y.pool_id, y.meter, y.period)) x
GROUP BY x.pool_id, x.meter, x.period
ORDER BY x.pool_id, x.meter, x.period;

-- Every event counted in its hour (UTC), as 0.2.0's metering counts it: per
-- pool, meter and group (0.1.0 meters group by nothing: '{}'); revised_at
-- is the last arrival of an event after its hour had ended.
INSERT INTO billing.usage_counters (tenant_id, pool_id, account, meter, hour, groups, events, quantity, last_at,
                                    cost, revised_at)
SELECT min(x.tenant_id), x.pool_id, min(x.account), x.meter, x.hour, '{}', count(*), sum(x.quantity), NULL,
       sum(x.cost)::bigint, max(x.recorded_at) FILTER (WHERE x.recorded_at >= x.hour + interval '1 hour')
FROM (SELECT e.*, date_trunc('hour', coalesce(e.booked_at, e.occurred_at) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hour
      FROM billing.usage_events e) x
GROUP BY x.pool_id, x.meter, x.hour
ORDER BY x.pool_id, x.meter, x.hour;

ALTER TABLE billing.usage_events DROP COLUMN unit_price;
ALTER TABLE billing.meters DROP COLUMN unit_price;
-- out of the extension first: that also takes it out of the tables whose data
-- pg_dump keeps (pg_extension.extconfig), which DROP TABLE alone does not
ALTER EXTENSION pg_billing DROP TABLE billing.meter_carries;
DROP TABLE billing.meter_carries;

-- ===== 4. the 0.2.0 install script, from here on adapted =====================

-- Every change of a meter or unit empties every backend's meter cache
-- (src/pricing.rs): the trigger sends a relcache invalidation. Per row, so an
-- INSERT … ON CONFLICT DO NOTHING that changes nothing (a unit that exists)
-- sends none.
CREATE FUNCTION billing.meters_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog
AS $$
BEGIN
    PERFORM billing.forget_cached_meters(TG_RELID);
    RETURN NULL;
END
$$;
CREATE TRIGGER meters_changed AFTER INSERT OR UPDATE OR DELETE ON billing.meters
    FOR EACH ROW EXECUTE FUNCTION billing.meters_changed();
CREATE TRIGGER meters_truncated AFTER TRUNCATE ON billing.meters
    FOR EACH STATEMENT EXECUTE FUNCTION billing.meters_changed();
CREATE TRIGGER meter_prices_changed AFTER INSERT OR UPDATE OR DELETE ON billing.meter_prices
    FOR EACH ROW EXECUTE FUNCTION billing.meters_changed();
CREATE TRIGGER meter_prices_truncated AFTER TRUNCATE ON billing.meter_prices
    FOR EACH STATEMENT EXECUTE FUNCTION billing.meters_changed();
CREATE TRIGGER units_changed AFTER INSERT OR UPDATE OR DELETE ON billing.units
    FOR EACH ROW EXECUTE FUNCTION billing.meters_changed();
CREATE TRIGGER units_truncated AFTER TRUNCATE ON billing.units
    FOR EACH STATEMENT EXECUTE FUNCTION billing.meters_changed();

-- Append-only tables refuse UPDATE, DELETE and TRUNCATE for everyone.
CREATE FUNCTION billing.reject_ledger_change() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
BEGIN
    RAISE EXCEPTION 'billing.% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Correct a balance with billing.grant, billing.void_grant or billing.revoke_unused; the ledger records every change.';
END
$$;

CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON billing.ledger_entries
    FOR EACH ROW EXECUTE FUNCTION billing.reject_ledger_change();
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON billing.ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION billing.reject_ledger_change();
CREATE TRIGGER usage_events_append_only BEFORE UPDATE OR DELETE ON billing.usage_events
    FOR EACH ROW EXECUTE FUNCTION billing.reject_ledger_change();
CREATE TRIGGER usage_events_no_truncate BEFORE TRUNCATE ON billing.usage_events
    FOR EACH STATEMENT EXECUTE FUNCTION billing.reject_ledger_change();


-- Billing data must survive pg_dump/pg_restore of the database: the new tables
-- (the 0.1.0 ones are registered already).
SELECT pg_catalog.pg_extension_config_dump('billing.meter_prices', '');
SELECT pg_catalog.pg_extension_config_dump('billing.allowances', '');
SELECT pg_catalog.pg_extension_config_dump('billing.limits', '');
SELECT pg_catalog.pg_extension_config_dump('billing.usage_reports', '');
SELECT pg_catalog.pg_extension_config_dump('billing.limit_holds', '');
SELECT pg_catalog.pg_extension_config_dump('billing.guest_conversions', '');
SELECT pg_catalog.pg_extension_config_dump('billing.limit_usage', '');
SELECT pg_catalog.pg_extension_config_dump('billing.meter_periods', '');
SELECT pg_catalog.pg_extension_config_dump('billing.meter_uniques', '');
SELECT pg_catalog.pg_extension_config_dump('billing.usage_counters', '');
SELECT pg_catalog.pg_extension_config_dump('billing.topup_fees', '');
SELECT pg_catalog.pg_extension_config_dump('billing.topup_limits', '');
SELECT pg_catalog.pg_extension_config_dump('billing.reload_rules', '');
SELECT pg_catalog.pg_extension_config_dump('billing.reload_requests', '');
SELECT pg_catalog.pg_extension_config_dump('billing.checkout_intents', '');
SELECT pg_catalog.pg_extension_config_dump('billing.alert_rules', '');
SELECT pg_catalog.pg_extension_config_dump('billing.alerts', '');
SELECT pg_catalog.pg_extension_config_dump('billing.meter_periods_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.allowances_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.limits_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.usage_counters_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.reload_requests_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.checkout_intents_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.alert_rules_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.alerts_id_seq', '');

/* <begin connected objects> */
-- src/lib.rs:76
-- requires:
--   schema

-- Windows: the one place that cuts time into the windows of allowances
-- (src/allowances.rs) and limits (src/limits.rs). An hour window is an
-- hour of real time starting on a local hour (so the hour repeated when
-- clocks fall back is two windows); longer ones run between local
-- boundaries. A periodic window runs from one
-- local boundary (midnight, the hour, Monday, the 1st, in the rule's time
-- zone, so a day across a DST change lasts 23 or 25 hours) to the next; the
-- first runs from the rule's start to the next boundary. Each instant lies
-- in exactly one window: a window contains its start and not its end. A
-- window's credit expires keep_periods windows after its start; a 'never'
-- window starts with the rule and lasts until the rule ends.

-- The allowance rule a grant is a window of, from the grant's key
-- (`billing:allowance:<rule>:<window start>`, made by src/allowances.rs,
-- grant_due; `billing:` keys are reserved), or NULL for any other grant.
CREATE FUNCTION billing.allowance_rule_of(key text) RETURNS bigint
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog
AS $$
    SELECT CASE WHEN key LIKE 'billing:allowance:%' THEN split_part(key, ':', 3)::bigint END
$$;

-- The window of a limit that holds `at`: [starts_at, ends_at); 'never' is
-- one window for all time (ends_at NULL: it never resets).
CREATE FUNCTION billing.window_of(every text, time_zone text, at timestamptz)
RETURNS TABLE (starts_at timestamptz, ends_at timestamptz)
LANGUAGE sql STABLE
SET search_path = pg_catalog
AS $$
    SELECT CASE WHEN every = 'never' THEN '-infinity'::timestamptz
                ELSE date_trunc(every, at, time_zone) END,
           CASE WHEN every = 'never' THEN NULL
                -- an hour is 3600 seconds whatever the zone: an hour repeated
                -- when clocks fall back is two windows
                WHEN every = 'hour' THEN date_trunc('hour', at, time_zone) + interval '1 hour'
                ELSE (date_trunc(every, at AT TIME ZONE time_zone) + ('1 ' || every)::interval)
                     AT TIME ZONE time_zone END
$$;

-- The windows of allowance `a` that start in [since, at] and whose credit
-- is still spendable at `at`, oldest first.
CREATE FUNCTION billing.allowance_windows(a billing.allowances, since timestamptz, at timestamptz)
RETURNS TABLE (starts_at timestamptz, expires_at timestamptz)
LANGUAGE sql STABLE
SET search_path = pg_catalog
AS $$
    SELECT a.starts_at, a.ends_at
    WHERE a.every = 'never' AND a.starts_at >= since AND a.starts_at <= at
      AND (a.ends_at IS NULL OR a.ends_at > at)
    UNION ALL
    SELECT w.starts_at, w.expires_at
    FROM (SELECT interval '1 hour' AS step, date_trunc('hour', a.starts_at, a.time_zone) AS base,
                 date_trunc('hour', at, a.time_zone) AS here
          WHERE a.every = 'hour') s
    CROSS JOIN LATERAL generate_series(greatest(s.base, s.here - a.keep_periods * s.step), s.here, s.step) l
    CROSS JOIN LATERAL (
        SELECT CASE WHEN l = s.base THEN a.starts_at ELSE l END AS starts_at,
               l + a.keep_periods * s.step AS expires_at) w
    WHERE w.starts_at >= since AND w.starts_at <= at AND w.expires_at > at
      AND (a.ends_at IS NULL OR w.starts_at < a.ends_at)
    UNION ALL
    SELECT w.starts_at, w.expires_at
    FROM (SELECT ('1 ' || a.every)::interval AS step,
                 date_trunc(a.every, a.starts_at AT TIME ZONE a.time_zone) AS base,
                 date_trunc(a.every, at AT TIME ZONE a.time_zone) AS here
          WHERE a.every IN ('day', 'week', 'month')) s
    CROSS JOIN LATERAL generate_series(greatest(s.base, s.here - a.keep_periods * s.step), s.here, s.step) l
    CROSS JOIN LATERAL (
        SELECT CASE WHEN l = s.base THEN a.starts_at ELSE l AT TIME ZONE a.time_zone END AS starts_at,
               (l + a.keep_periods * s.step) AT TIME ZONE a.time_zone AS expires_at) w
    WHERE w.starts_at >= since AND w.starts_at <= at AND w.expires_at > at
      AND (a.ends_at IS NULL OR w.starts_at < a.ends_at)
    ORDER BY 1
$$;

-- What pool `pool` is owed at `at` and has not received: the windows of its
-- rules from its allowance_next on.
CREATE FUNCTION billing.allowance_due(pool bigint, at timestamptz)
RETURNS TABLE (allowance_id bigint, starts_at timestamptz, expires_at timestamptz, amount bigint,
               priority integer)
LANGUAGE sql STABLE
SET search_path = pg_catalog
AS $$
    SELECT a.id, w.starts_at, w.expires_at, a.amount, a.priority
    FROM billing.pools p
    JOIN billing.allowances a ON a.pool_id = p.id
    CROSS JOIN LATERAL billing.allowance_windows(a, p.allowance_next, at) w
    WHERE p.id = pool AND p.allowance_next <= at AND a.starts_at <= at
      AND (a.ends_at IS NULL OR a.ends_at > p.allowance_next)
    ORDER BY w.starts_at, a.id
$$;

-- The start of the first window of pool `pool`'s rules after `at`;
-- infinity when none will start.
CREATE FUNCTION billing.allowance_next_start(pool bigint, at timestamptz)
RETURNS timestamptz
LANGUAGE sql STABLE
SET search_path = pg_catalog
AS $$
    SELECT coalesce(min(n.starts_at), 'infinity')
    FROM billing.allowances a
    CROSS JOIN LATERAL (
        SELECT CASE WHEN a.starts_at > at THEN a.starts_at
                    WHEN a.every = 'never' THEN NULL
                    ELSE (SELECT w.ends_at FROM billing.window_of(a.every, a.time_zone, at) w) END AS starts_at) n
    WHERE a.pool_id = pool AND (a.ends_at IS NULL OR n.starts_at < a.ends_at)
$$;

-- The first window boundary after `at` of a rule of this shape: where a
-- changed rule takes over, so the window running at `at` keeps its credit
-- ('never': at once).
CREATE FUNCTION billing.allowance_boundary(every text, time_zone text, at timestamptz)
RETURNS timestamptz
LANGUAGE sql STABLE
SET search_path = pg_catalog
AS $$
    SELECT coalesce(w.ends_at, at) FROM billing.window_of(every, time_zone, at) w
$$;

-- Give back what holds counted in their pools' limits (released or
-- expired: nothing was used).
CREATE FUNCTION billing.give_back_limits(holds bigint[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
#variable_conflict use_column
BEGIN
    WITH released AS (DELETE FROM billing.limit_holds h WHERE h.hold_id = ANY(holds) RETURNING h.*),
         total AS (SELECT r.limit_id, r.window_start, r.member, sum(r.amount) AS amount
                   FROM released r GROUP BY 1, 2, 3)
    UPDATE billing.limit_usage u SET used = u.used - t.amount FROM total t
    WHERE u.limit_id = t.limit_id AND u.window_start = t.window_start AND u.member = t.member;
END
$$;

-- A settled hold: its actual cost replaces what it counted in its pool's
-- limits, in the windows where it counted; returns how many limits it
-- counted in (0: it counts like any usage, now).
CREATE FUNCTION billing.settle_limits(hold bigint, actual bigint) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
#variable_conflict use_column
DECLARE
    counted bigint;
BEGIN
    WITH settled AS (DELETE FROM billing.limit_holds h WHERE h.hold_id = hold RETURNING h.*),
         changed AS (UPDATE billing.limit_usage u SET used = u.used + actual - s.amount FROM settled s
                     WHERE u.limit_id = s.limit_id AND u.window_start = s.window_start AND u.member = s.member
                     RETURNING 1)
    SELECT count(*) INTO counted FROM settled;
    RETURN counted;
END
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:50 (webhooks: the tables are 0.1.0's, but for one key)

-- An object's lock row keeps no foreign key to its endpoint: the delivery's
-- own inbox row, which makes it in the same transaction, has one.
ALTER TABLE billing.webhook_objects DROP CONSTRAINT webhook_objects_endpoint_id_fkey;

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
/* </end connected objects> */

/* <begin connected objects> */
-- src/accounts.rs:32
-- pg_billing::accounts::account
CREATE  FUNCTION "account"(
	"account" TEXT, /* Option < & str > */
	"name" TEXT DEFAULT NULL, /* Option < & str > */
	"metadata" jsonb DEFAULT NULL /* Option < JsonArg > */
) RETURNS TABLE (
	"account" TEXT,  /* String */
	"name" TEXT,  /* Option < String > */
	"metadata" jsonb,  /* JsonB */
	"created_at" timestamp with time zone  /* Tstz */
)
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'account_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/subscriptions/mod.rs:18
-- pg_billing::subscriptions::allowance_periods
CREATE  FUNCTION "allowance_periods"(
	"period_start" timestamp with time zone, /* Option < Tstz > */
	"period_end" timestamp with time zone /* Option < Tstz > */
) RETURNS TABLE (
	"starts_at" timestamp with time zone,  /* Tstz */
	"ends_at" timestamp with time zone  /* Tstz */
)
IMMUTABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'allowance_periods_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/grants.rs:400
-- pg_billing::grants::approve_grant
CREATE  FUNCTION "approve_grant"(
	"grant_id" bigint /* Option < i64 > */
) RETURNS TABLE (
	"grant_id" bigint,  /* i64 */
	"status" TEXT,  /* String */
	"kind" TEXT,  /* String */
	"priority" INT,  /* i32 */
	"amount" bigint,  /* i64 */
	"remaining" bigint,  /* i64 */
	"effective_at" timestamp with time zone,  /* Tstz */
	"expires_at" timestamp with time zone,  /* Option < Tstz > */
	"debt_repaid" bigint,  /* i64 */
	"available" bigint  /* i64 */
)
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'approve_grant_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/reporting.rs:57
-- pg_billing::reporting::balance
CREATE  FUNCTION "balance"(
	"account" TEXT, /* Option < & str > */
	"unit" TEXT, /* Option < & str > */
	"as_of" timestamp with time zone DEFAULT NULL /* Option < Tstz > */
) RETURNS TABLE (
	"as_of" timestamp with time zone,  /* Tstz */
	"balance" bigint,  /* i64 */
	"held" bigint,  /* i64 */
	"debt" bigint,  /* i64 */
	"available" bigint  /* i64 */
)
STABLE SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'balance_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/tenancy.rs:118
-- pg_billing::tenancy::calling_role
CREATE  FUNCTION "calling_role"() RETURNS oid /* Oid */
STRICT STABLE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'calling_role_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/gate.rs:38
-- pg_billing::gate::check
CREATE  FUNCTION "check"(
	"account" TEXT, /* Option < & str > */
	"unit" TEXT, /* Option < & str > */
	"amount" bigint DEFAULT 0, /* Option < i64 > */
	"member" TEXT DEFAULT NULL, /* Option < & str > */
	"meter" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS billing.check_result /* :: pgrx :: heap_tuple :: PgHeapTuple < '_, :: pgrx :: pgbox :: AllocatedByRust
> */
STABLE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'check_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/allowances.rs:487
-- pg_billing::allowances::convert_guest
CREATE  FUNCTION "convert_guest"(
	"guest" TEXT, /* Option < & str > */
	"account" TEXT /* Option < & str > */
) RETURNS TABLE (
	"unit" TEXT,  /* Option < String > */
	"moved" bigint,  /* i64 */
	"status" TEXT  /* String */
)
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'convert_guest_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/tenancy.rs:182
-- pg_billing::tenancy::current_tenant
CREATE  FUNCTION "current_tenant"() RETURNS TEXT /* String */
STRICT STABLE SECURITY DEFINER 
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'current_tenant_sql_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/pricing/mod.rs:653
-- pg_billing::pricing::define_meter
CREATE  FUNCTION "define_meter"(
	"meter" TEXT, /* Option < & str > */
	"unit" TEXT, /* Option < & str > */
	"unit_price" NUMERIC DEFAULT NULL, /* Option < AnyNumeric > */
	"description" TEXT DEFAULT NULL, /* Option < & str > */
	"aggregation" TEXT DEFAULT 'sum', /* Option < & str > */
	"property" TEXT DEFAULT NULL, /* Option < & str > */
	"group_by" TEXT[] DEFAULT '{}', /* :: std :: option :: Option < Vec < Option < String > > > */
	"filter" jsonb DEFAULT NULL, /* Option < pgrx :: JsonB > */
	"lateness" interval DEFAULT '48 hours', /* Option < Interval > */
	"late_events" TEXT DEFAULT 'reject', /* Option < & str > */
	"future_skew" interval DEFAULT '5 minutes', /* Option < Interval > */
	"price" jsonb DEFAULT NULL /* Option < pgrx :: JsonB > */
) RETURNS TEXT /* String */
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'define_meter_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/pricing/mod.rs:404
-- pg_billing::pricing::define_unit
CREATE  FUNCTION "define_unit"(
	"unit" TEXT, /* Option < & str > */
	"description" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS TEXT /* String */
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'define_unit_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/pricing/mod.rs:792
-- pg_billing::pricing::disable_meter
CREATE  FUNCTION "disable_meter"(
	"meter" TEXT /* Option < & str > */
) RETURNS TEXT /* String */
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'disable_meter_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/pricing/mod.rs:799
-- pg_billing::pricing::enable_meter
CREATE  FUNCTION "enable_meter"(
	"meter" TEXT /* Option < & str > */
) RETURNS TEXT /* String */
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'enable_meter_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/allowances.rs:369
-- pg_billing::allowances::end_allowance
CREATE  FUNCTION "end_allowance"(
	"account" TEXT, /* Option < & str > */
	"unit" TEXT /* Option < & str > */
) RETURNS TABLE (
	"allowance_id" bigint,  /* Option < i64 > */
	"ends_at" timestamp with time zone,  /* Option < Tstz > */
	"status" TEXT  /* String */
)
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'end_allowance_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/pricing/mod.rs:386
-- pg_billing::pricing::forget_cached_meters
CREATE  FUNCTION "forget_cached_meters"(
	"relation" oid /* Option < pg_sys :: Oid > */
) RETURNS void
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'forget_cached_meters_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/grants.rs:178
-- pg_billing::grants::grant
CREATE  FUNCTION "grant"(
	"account" TEXT, /* Option < & str > */
	"unit" TEXT, /* Option < & str > */
	"amount" bigint, /* Option < i64 > */
	"kind" TEXT DEFAULT 'manual', /* Option < & str > */
	"priority" INT DEFAULT NULL, /* Option < i32 > */
	"effective_at" timestamp with time zone DEFAULT NULL, /* Option < Tstz > */
	"expires_at" timestamp with time zone DEFAULT NULL, /* Option < Tstz > */
	"key" TEXT DEFAULT NULL, /* Option < & str > */
	"metadata" jsonb DEFAULT '{}', /* Option < JsonArg > */
	"reason" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS TABLE (
	"grant_id" bigint,  /* i64 */
	"status" TEXT,  /* String */
	"kind" TEXT,  /* String */
	"priority" INT,  /* i32 */
	"amount" bigint,  /* i64 */
	"remaining" bigint,  /* i64 */
	"effective_at" timestamp with time zone,  /* Tstz */
	"expires_at" timestamp with time zone,  /* Option < Tstz > */
	"debt_repaid" bigint,  /* i64 */
	"available" bigint  /* i64 */
)
SECURITY DEFINER 
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'grant_credits_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/reporting.rs:138
-- pg_billing::reporting::grant_state
CREATE  FUNCTION "grant_state"(
	"status" TEXT, /* Option < & str > */
	"remaining" bigint, /* Option < i64 > */
	"effective_at" timestamp with time zone, /* Option < Tstz > */
	"expires_at" timestamp with time zone, /* Option < Tstz > */
	"at" timestamp with time zone /* Option < Tstz > */
) RETURNS TEXT /* Option < & '_ str > */
IMMUTABLE PARALLEL SAFE
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'grant_state_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:66
-- requires:
--   schema
--   webhooks
--   tenancy::current_tenant_sql
--   reporting::grant_state

-- Readable views over the ledger, and the invariant check. Views run with the
-- caller's rights (security_invoker), so row-level security applies to them.

-- Grants with their state at this instant; what the lanes of a split
-- pool hold of a grant counts as the grant's.
CREATE VIEW billing.grant_balances WITH (security_invoker = true) AS
SELECT g.id AS grant_id, g.account, g.unit, g.kind, g.priority, g.amount, r.remaining,
       g.effective_at, g.expires_at,
       billing.grant_state(g.status, r.remaining, g.effective_at, g.expires_at, now()) AS state,
       g.key, g.metadata, g.created_at
FROM billing.grants g
CROSS JOIN LATERAL (SELECT billing.grant_remaining(g)
                           + coalesce((SELECT sum(billing.grant_remaining(c)) FROM billing.grants c
                                       WHERE c.parent_id = g.id), 0)::bigint AS remaining) r
WHERE g.parent_id IS NULL;

-- Every ledger entry, with the grant, hold or event it concerns: the rows of
-- ledger_entries and the debits usage events carry themselves (schema.sql,
-- usage_events; their entry_id is NULL). Every reader of entries reads this.
CREATE VIEW billing.ledger WITH (security_invoker = true) AS
SELECT l.* FROM (
    SELECT e.account, e.unit, e.version, e.kind, e.amount, e.balance_after, e.debt_after,
           e.held_after, e.grant_id, e.hold_id, e.event_id, e.effective_at, e.recorded_at,
           e.grant_amount, e.debt_amount, e.hold_amount, e.balance_before, e.pool_id, e.id AS entry_id
    FROM billing.ledger_entries e
    UNION ALL
    SELECT u.account, u.unit, u.entry_version, 'debit'::billing.entry_kind, -u.covered, u.balance_after,
           u.debt_after, u.held_after, u.entry_grant, NULL::bigint, u.id, u.entry_at, u.recorded_at,
           -u.covered, 0::bigint, 0::bigint, u.balance_after + u.covered, u.pool_id, NULL::bigint
    FROM billing.usage_events u
) l
-- an event without an entry of its own (entry_version NULL) is not a row; the
-- test is out here, not on the events' branch, because PostgreSQL merges a
-- UNION ALL branch into the query (and so reads a pool's rows of both tables
-- by index when a query names its pools) only when the branch has no WHERE
WHERE l.version IS NOT NULL;

-- The hourly usage counters (src/metering): the rows of usage_counters, and
-- the counter each pool row keeps (pools.counter_*), which stands for the
-- row of the same key, if there is one, until it is written back there.
-- (Both tests are out here, not in the branches, for the reason given at
-- billing.ledger: a query that names its pools reads them by index.)
CREATE VIEW billing.hourly_usage WITH (security_invoker = true) AS
SELECT u.tenant_id, u.pool_id, u.account, u.meter, u.hour, u.groups, u.events, u.quantity,
       u.last_at, u.cost, u.revised_at
FROM (
    SELECT c.tenant_id, c.pool_id, c.account, c.meter, c.hour, c.groups, c.events, c.quantity,
           c.last_at, c.cost, c.revised_at, true AS written_back
    FROM billing.usage_counters c
    UNION ALL
    SELECT p.tenant_id, p.id, p.account, p.counter_meter, p.counter_hour, p.counter_groups, p.counter_events,
           p.counter_quantity, p.counter_last_at, p.counter_cost, p.counter_revised_at, false
    FROM billing.pools p
) u
WHERE u.meter IS NOT NULL
  AND NOT (u.written_back AND EXISTS (SELECT 1 FROM billing.pools p
                                      WHERE p.id = u.pool_id AND p.counter_meter = u.meter
                                        AND p.counter_hour = u.hour AND p.counter_groups = u.groups));

-- The entries of some grants (or lane shares), summed by kind: the rows of
-- ledger_entries that name them, and one 'debit' row per grant for the
-- debits usage events carry, which is what those rows leave unexplained of
-- its remaining (Σ grant_amount of a grant's entries = its remaining, rule 8).
-- Read from the grants' own rows and entries, never by scanning a pool's events.
CREATE FUNCTION billing.grant_entry_totals(grant_ids bigint[])
RETURNS TABLE (grant_id bigint, kind billing.entry_kind, grant_amount bigint, debt_amount bigint)
LANGUAGE sql STABLE
SET search_path = pg_catalog, billing
AS $$
    SELECT e.grant_id, e.kind, sum(e.grant_amount)::bigint, sum(e.debt_amount)::bigint
    FROM billing.ledger_entries e WHERE e.grant_id = ANY (grant_ids)
    GROUP BY e.grant_id, e.kind
    UNION ALL
    SELECT g.id, 'debit', c.carried, 0
    FROM billing.grants g
    CROSS JOIN LATERAL (SELECT billing.grant_remaining(g) - coalesce(sum(e.grant_amount), 0)::bigint AS carried
                        FROM billing.ledger_entries e WHERE e.grant_id = g.id) c
    WHERE g.id = ANY (grant_ids) AND c.carried <> 0
$$;

-- docs/architecture.md, rule 8, for every pool of the current tenant: returns one row per
-- violation, so an empty result means the ledger is consistent.
--   * entries chain: versions 1..n without gaps, balance_before = previous balance_after
--   * per grant: Σ grant_amount of its entries = its remaining
--     (Σ granted − Σ debits − Σ expired − Σ revoked − Σ voided = Σ remaining),
--     and no grant whose row holds credit is marked exhausted
--   * per hold: Σ hold_amount of its entries = its amount while open, 0 once closed
--   * the pool's cached totals equal what the entries sum to
--   * every grant, hold and event an entry names exists, in the entry's pool
--   * every hourly usage counter equals what its events add up to, and no
--     counter lacks events nor events a counter (src/metering)
--   * per pool, priced meter and period, what its price charged equals
--     what its priced events were charged
--   * every row rule of the tables written per event (which carry no CHECK
--     constraints nor foreign keys, see schema.sql): amounts in range, entries
--     balanced, every event and entry in an existing pool
--   * split pools (docs/architecture.md, "Split pools"): a share of a grant
--     sits on a lane of the grant's own pool with the grant's kind, priority
--     and window; transfers between a grant and its shares net to zero; a
--     grant and its shares hold no more than its amount, and nothing once it
--     is closed; a lane holds no holds and owes no debt
CREATE FUNCTION billing.verify_ledger()
RETURNS TABLE (pool_id bigint, account text, unit text, problem text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, billing
AS $$
WITH tenant_pools AS (
    SELECT * FROM billing.pools WHERE tenant_id = billing.current_tenant()
), chain AS (
    SELECT e.pool_id, e.version, e.balance_before, e.balance_after,
           lag(e.balance_after, 1, 0::bigint) OVER w AS prev_after,
           lag(e.debt_after, 1, 0::bigint) OVER w + e.debt_amount AS expect_debt, e.debt_after,
           lag(e.held_after, 1, 0::bigint) OVER w + e.hold_amount AS expect_held, e.held_after,
           row_number() OVER w AS n
    FROM billing.ledger e JOIN tenant_pools p ON p.id = e.pool_id
    WINDOW w AS (PARTITION BY e.pool_id ORDER BY e.version)
), grant_sums AS (
    SELECT e.grant_id, sum(e.grant_amount) AS total
    FROM billing.ledger e JOIN tenant_pools p ON p.id = e.pool_id
    WHERE e.grant_id IS NOT NULL GROUP BY e.grant_id
), metered AS (
    -- each event where its counters count it (src/metering)
    SELECT u.id, u.pool_id, u.account, u.unit, u.meter, u.quantity, u.cost, u.price_version,
           t.at, date_trunc('hour', t.at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hour,
           date_trunc('month', t.at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS period,
           coalesce(m.aggregation, 'sum') AS aggregation, u.properties ->> m.property AS value,
           coalesce((SELECT jsonb_object_agg(g, coalesce(u.properties -> g, 'null'::jsonb))
                     FROM unnest(m.group_by) g), '{}'::jsonb) AS groups
    FROM billing.usage_events u JOIN tenant_pools p ON p.id = u.pool_id
    CROSS JOIN LATERAL (SELECT coalesce(u.booked_at, u.occurred_at) AS at) t
    LEFT JOIN billing.meters m ON m.tenant_id = u.tenant_id AND m.meter = u.meter
), recount AS (
    SELECT f.pool_id, min(f.account) AS account, min(f.unit) AS unit, f.meter, f.hour, f.groups,
           count(*) AS events, sum(f.cost) AS cost,
           CASE min(f.aggregation)
               WHEN 'sum' THEN sum(f.quantity)
               WHEN 'count' THEN count(*)::numeric
               WHEN 'max' THEN max(f.quantity)
               WHEN 'last' THEN (array_agg(f.quantity ORDER BY f.at DESC, f.id DESC))[1]
               ELSE count(*) FILTER (WHERE f.first_seen AND f.value IS NOT NULL)::numeric END AS quantity
    FROM (SELECT m.*, row_number() OVER (PARTITION BY m.pool_id, m.meter, m.period, m.value
                                         ORDER BY m.id) = 1 AS first_seen
          FROM metered m) f
    GROUP BY f.pool_id, f.meter, f.hour, f.groups
)
SELECT c.pool_id, p.account, p.unit,
       format('entry version %s: %s', c.version,
              CASE WHEN c.version <> c.n THEN 'version gap'
                   WHEN c.balance_before <> c.prev_after THEN 'balance_before does not chain'
                   WHEN c.debt_after <> c.expect_debt THEN 'debt_after does not chain'
                   ELSE 'held_after does not chain' END)
FROM chain c JOIN tenant_pools p ON p.id = c.pool_id
WHERE c.version <> c.n OR c.balance_before <> c.prev_after
   OR c.debt_after <> c.expect_debt OR c.held_after <> c.expect_held
UNION ALL
SELECT g.pool_id, g.account, g.unit,
       format('grant %s: remaining %s but its entries sum to %s', g.id, r.remaining, coalesce(s.total, 0))
FROM billing.grants g JOIN tenant_pools p ON p.id = g.pool_id
CROSS JOIN LATERAL (SELECT billing.grant_remaining(g) AS remaining) r
LEFT JOIN grant_sums s ON s.grant_id = g.id
WHERE r.remaining <> coalesce(s.total, 0)
UNION ALL
SELECT g.pool_id, g.account, g.unit,
       format('grant %s: marked exhausted, but its row holds %s, which the drain would skip', g.id, g.remaining)
FROM billing.grants g JOIN tenant_pools p ON p.id = g.pool_id
WHERE g.exhausted AND g.remaining > 0
UNION ALL
SELECT h.pool_id, h.account, h.unit,
       format('hold %s (%s): its entries hold %s', h.id, h.status, coalesce(s.total, 0))
FROM billing.holds h JOIN tenant_pools p ON p.id = h.pool_id
LEFT JOIN LATERAL (SELECT sum(e.hold_amount) AS total FROM billing.ledger_entries e WHERE e.hold_id = h.id) s ON true
WHERE coalesce(s.total, 0) <> CASE WHEN h.status = 'open' THEN h.amount ELSE 0 END
UNION ALL
SELECT e.pool_id, e.account, e.unit, format('entry version %s names a missing %s', e.version,
       CASE WHEN e.grant_id IS NOT NULL AND g.id IS NULL THEN 'grant ' || e.grant_id
            WHEN e.hold_id IS NOT NULL AND h.id IS NULL THEN 'hold ' || e.hold_id
            ELSE 'usage event ' || e.event_id END)
FROM billing.ledger e JOIN tenant_pools p ON p.id = e.pool_id
LEFT JOIN billing.grants g ON g.id = e.grant_id AND g.pool_id = e.pool_id
LEFT JOIN billing.holds h ON h.id = e.hold_id AND h.pool_id = e.pool_id
LEFT JOIN billing.usage_events u ON u.id = e.event_id AND u.pool_id = e.pool_id
WHERE (e.grant_id IS NOT NULL AND g.id IS NULL) OR (e.hold_id IS NOT NULL AND h.id IS NULL)
   OR (e.event_id IS NOT NULL AND u.id IS NULL)
UNION ALL
SELECT p.id, p.account, p.unit,
       format('pool totals (version %s, remaining %s, debt %s, held %s) differ from the ledger (%s, %s, %s, %s)',
              p.version, p.remaining, p.debt, p.held,
              coalesce(l.version, 0), coalesce(gr.total, 0), coalesce(l.debt_after, 0), coalesce(l.held_after, 0))
FROM tenant_pools p
LEFT JOIN LATERAL (SELECT e.version, e.debt_after, e.held_after, e.balance_after FROM billing.ledger e
                   WHERE e.pool_id = p.id ORDER BY e.version DESC LIMIT 1) l ON true
LEFT JOIN LATERAL (SELECT sum(billing.grant_remaining(g)) AS total FROM billing.grants g WHERE g.pool_id = p.id) gr ON true
WHERE p.version <> coalesce(l.version, 0) OR p.remaining <> coalesce(gr.total, 0)
   OR p.debt <> coalesce(l.debt_after, 0) OR p.held <> coalesce(l.held_after, 0)
   OR coalesce(l.balance_after, 0) <> p.remaining - p.debt
UNION ALL
SELECT coalesce(r.pool_id, c.pool_id), coalesce(r.account, c.account), coalesce(r.unit, p.unit),
       format('meter %s, hour %s, groups %s: the counter (%s events, quantity %s, cost %s) differs from its events (%s, %s, %s)',
              coalesce(r.meter, c.meter), coalesce(r.hour, c.hour), coalesce(r.groups, c.groups::jsonb),
              c.events, c.quantity, c.cost, r.events, r.quantity, r.cost)
FROM recount r
FULL JOIN (SELECT c.* FROM billing.hourly_usage c JOIN tenant_pools p ON p.id = c.pool_id) c
  ON c.pool_id = r.pool_id AND c.meter = r.meter AND c.hour = r.hour AND c.groups::jsonb = r.groups
LEFT JOIN tenant_pools p ON p.id = c.pool_id
WHERE r.pool_id IS NULL OR c.pool_id IS NULL
   OR (c.events, c.quantity, c.cost) IS DISTINCT FROM (r.events, r.quantity, r.cost)
UNION ALL
SELECT coalesce(r.pool_id, c.pool_id), p.account, p.unit,
       format('meter %s, period from %s: %s charged by its price, but its events were charged %s',
              coalesce(r.meter, c.meter), coalesce(r.period, c.period_start), c.charged, r.charged)
FROM (SELECT m.pool_id, m.meter, m.period, sum(m.cost) AS charged FROM metered m
      WHERE m.price_version IS NOT NULL GROUP BY 1, 2, 3) r
FULL JOIN (SELECT c.* FROM billing.meter_periods c JOIN tenant_pools p ON p.id = c.pool_id) c
  ON c.pool_id = r.pool_id AND c.meter = r.meter AND c.period_start = r.period
JOIN tenant_pools p ON p.id = coalesce(r.pool_id, c.pool_id)
WHERE coalesce(c.charged, 0) <> coalesce(r.charged, 0)
UNION ALL
SELECT g.pool_id, g.account, g.unit, format('grant %s: %s', g.id, r.rule)
FROM billing.grants g JOIN tenant_pools p ON p.id = g.pool_id
CROSS JOIN LATERAL (SELECT billing.grant_remaining(g) AS remaining) gr
CROSS JOIN LATERAL (VALUES
    (g.amount <= 0, 'amount is not positive'),
    (gr.remaining < 0 OR gr.remaining > g.amount, 'remaining is outside 0..amount'),
    (g.expires_at <= g.effective_at, 'expires_at does not follow effective_at'),
    (g.status NOT IN ('active', 'suspended', 'voided', 'revoked'), 'unknown status ' || g.status),
    (g.status IN ('voided', 'revoked') AND gr.remaining <> 0, 'closed but keeps credit')) r(broken, rule)
WHERE r.broken
UNION ALL
SELECT u.pool_id, u.account, u.unit, format('usage event %s: %s', u.id, r.rule)
FROM billing.usage_events u JOIN tenant_pools p ON p.id = u.pool_id
CROSS JOIN LATERAL (VALUES
    (u.quantity < 0, 'negative quantity'),
    (u.cost < 0 OR u.covered < 0 OR u.debt_created < 0, 'negative amount'),
    (u.covered + u.debt_created <> u.cost, 'covered + debt_created differs from cost'),
    (u.entry_version IS NOT NULL AND (u.debt_created <> 0 OR u.covered <= 0 OR u.entry_grant IS NULL
                                      OR u.balance_after IS NULL OR u.debt_after IS NULL
                                      OR u.held_after IS NULL OR u.entry_at IS NULL),
     'carries a ledger entry that is not a whole debit of one grant'),
    ((u.entry_version IS NULL) = (u.drains IS NULL), 'has both its drains and a ledger entry, or neither')) r(broken, rule)
WHERE r.broken
UNION ALL
SELECT u.pool_id, u.account, u.unit, format('usage event %s: carries its debit and has entries too', u.id)
FROM billing.usage_events u JOIN tenant_pools p ON p.id = u.pool_id
JOIN (SELECT DISTINCT e.pool_id, e.event_id FROM billing.ledger_entries e JOIN tenant_pools p ON p.id = e.pool_id
      WHERE e.event_id IS NOT NULL) x ON x.pool_id = u.pool_id AND x.event_id = u.id
WHERE u.entry_version IS NOT NULL
UNION ALL
SELECT e.pool_id, e.account, e.unit, format('entry version %s: %s', e.version, r.rule)
FROM billing.ledger e JOIN tenant_pools p ON p.id = e.pool_id
CROSS JOIN LATERAL (VALUES
    (e.balance_before + e.amount <> e.balance_after, 'balance_before + amount differs from balance_after'),
    (e.amount <> e.grant_amount - e.debt_amount, 'amount differs from grant_amount - debt_amount'),
    (e.grant_amount <> 0 AND e.grant_id IS NULL, 'moves credit without naming a grant'),
    (e.debt_after < 0 OR e.held_after < 0, 'negative debt or held total')) r(broken, rule)
WHERE r.broken
UNION ALL
SELECT p.id, p.account, p.unit, 'pool: a negative booked total'
FROM tenant_pools p WHERE p.remaining < 0 OR p.debt < 0 OR p.held < 0
UNION ALL
SELECT p.id, p.account, p.unit, format('pool: draws %s from grant %s, which is not its own or has less', p.drawn, p.drawn_grant)
FROM tenant_pools p
WHERE p.drawn < 0 OR (p.drawn > 0 AND NOT EXISTS (SELECT 1 FROM billing.grants g
                                                  WHERE g.id = p.drawn_grant AND g.pool_id = p.id
                                                    AND g.remaining >= p.drawn))
UNION ALL
SELECT p.id, p.account, p.unit, format('lane %s: %s', p.lane, r.rule)
FROM tenant_pools p
CROSS JOIN LATERAL (VALUES
    (p.held <> 0, 'holds credit on hold'),
    (p.debt <> 0, 'owes debt')) r(broken, rule)
WHERE p.lane > 0 AND r.broken
UNION ALL
SELECT c.pool_id, c.account, c.unit, format('share %s of grant %s: %s', c.id, c.parent_id, r.rule)
FROM billing.grants c JOIN tenant_pools p ON p.id = c.pool_id
LEFT JOIN billing.grants g ON g.id = c.parent_id
LEFT JOIN billing.pools gp ON gp.id = g.pool_id
CROSS JOIN LATERAL (VALUES
    (g.id IS NULL, 'the grant is missing'),
    (p.lane = 0 OR gp.lane <> 0 OR gp.account <> p.account OR gp.unit <> p.unit,
     'not on a lane of the grant''s pool'),
    (g.kind <> c.kind OR g.priority <> c.priority OR g.effective_at <> c.effective_at
        OR g.expires_at IS DISTINCT FROM c.expires_at, 'differs from the grant in kind, priority or window'),
    (g.status <> 'active' AND billing.grant_remaining(c) <> 0, 'keeps credit of a grant that is not spendable (closed or suspended)')) r(broken, rule)
WHERE c.parent_id IS NOT NULL AND r.broken IS NOT FALSE
UNION ALL
SELECT g.pool_id, g.account, g.unit, format('grant %s: %s', g.id, r.rule)
FROM billing.grants g JOIN tenant_pools p ON p.id = g.pool_id
CROSS JOIN LATERAL (SELECT coalesce(sum(billing.grant_remaining(c)), 0) AS remaining, count(*) AS n
                    FROM billing.grants c WHERE c.parent_id = g.id) shares
CROSS JOIN LATERAL (SELECT coalesce(sum(e.grant_amount), 0) AS net
                    FROM billing.ledger_entries e
                    WHERE e.kind = 'transfer'
                      AND (e.grant_id = g.id OR e.grant_id IN (SELECT c.id FROM billing.grants c
                                                               WHERE c.parent_id = g.id))) t
CROSS JOIN LATERAL (VALUES
    (billing.grant_remaining(g) + shares.remaining > g.amount, 'it and its lanes'' shares hold more than its amount'),
    (t.net <> 0, 'transfers to and from its lanes'' shares do not net to zero')) r(broken, rule)
WHERE g.parent_id IS NULL AND shares.n > 0 AND r.broken
UNION ALL
SELECT x.pool_id, x.account, x.unit, x.what || ' names a missing pool'
FROM (SELECT u.pool_id, u.account, u.unit, 'usage event ' || u.id AS what
      FROM billing.usage_events u WHERE u.tenant_id = billing.current_tenant()
      UNION ALL
      SELECT e.pool_id, e.account, e.unit, 'entry version ' || e.version
      FROM billing.ledger_entries e WHERE e.tenant_id = billing.current_tenant()
      UNION ALL
      SELECT g.pool_id, g.account, g.unit, 'grant ' || g.id
      FROM billing.grants g WHERE g.tenant_id = billing.current_tenant()) x
WHERE NOT EXISTS (SELECT 1 FROM billing.pools p WHERE p.id = x.pool_id)
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:81
-- requires:
--   schema
--   views
--   tenancy::current_tenant_sql

-- Usage reports, read from the hourly counters (billing.hourly_usage)
-- rather than from events: a month of one account's usage is at most 744
-- counter rows per group, however many events it had.

-- Usage of one account and meter from `from` to `to`, per hour, day, week
-- or month in `time_zone` (any zone whose offset is a whole number of
-- hours, as counters are hourly), optionally per values of some of the
-- meter's group_by properties. Every period of the range is a row, with 0
-- when nothing was used; with groups, every group seen in the range gets
-- every period. quantity combines the hours as the meter aggregates: sum,
-- count and unique_count add up (unique_count counts the values first seen
-- in their calendar month, UTC, during the period), max takes the largest,
-- last the latest.
CREATE FUNCTION billing.usage(
    account text, meter text, "from" timestamptz, "to" timestamptz,
    granularity text DEFAULT 'day', group_by text[] DEFAULT '{}', time_zone text DEFAULT 'UTC')
RETURNS TABLE (period_start timestamptz, period_end timestamptz, groups jsonb,
               events bigint, quantity numeric, cost bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
    m record;
    step interval;
    periods bigint;
BEGIN
    IF usage.account IS NULL OR usage.meter IS NULL OR usage."from" IS NULL OR usage."to" IS NULL
       OR usage.granularity IS NULL OR usage.group_by IS NULL OR usage.time_zone IS NULL THEN
        RAISE EXCEPTION 'account, meter, from, to, granularity, group_by and time_zone must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF usage.granularity NOT IN ('hour', 'day', 'week', 'month') THEN
        RAISE EXCEPTION 'invalid granularity: "%" is not one of hour, day, week, month', usage.granularity
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF usage."to" <= usage."from" OR NOT isfinite(usage."from") OR NOT isfinite(usage."to") THEN
        RAISE EXCEPTION 'invalid range: "to" must follow "from", both finite'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_timezone_names z WHERE z.name = usage.time_zone)
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_timezone_abbrevs z WHERE z.abbrev = usage.time_zone) THEN
        RAISE EXCEPTION 'invalid time_zone: "%" is not a time zone PostgreSQL knows', usage.time_zone
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- counters are hourly (UTC hours): a zone whose offset is not a whole
    -- number of hours in the range would cut hours in two
    IF EXISTS (
        SELECT 1 FROM generate_series(usage."from", usage."to", interval '1 day') t
        WHERE extract(minute FROM (t AT TIME ZONE usage.time_zone) - (t AT TIME ZONE 'UTC')) <> 0) THEN
        RAISE EXCEPTION 'invalid time_zone: "%" is not a whole number of hours from UTC; counters are hourly', usage.time_zone
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT x.aggregation, x.group_by INTO m FROM billing.meters x
    WHERE x.tenant_id = tenant AND x.meter = usage.meter;
    IF NOT FOUND THEN
        IF NOT EXISTS (SELECT 1 FROM billing.units x WHERE x.tenant_id = tenant AND x.unit = usage.meter) THEN
            RAISE EXCEPTION 'unknown meter "%"', usage.meter USING ERRCODE = 'undefined_object';
        END IF;
        -- (a record takes its field names from a query, not from ROW())
        SELECT 'sum'::text AS aggregation, '{}'::text[] AS group_by INTO m;
    END IF;
    IF NOT usage.group_by <@ m.group_by THEN
        RAISE EXCEPTION 'invalid group_by: meter "%" counts by %', usage.meter,
            CASE WHEN cardinality(m.group_by) = 0 THEN 'no property' ELSE array_to_string(m.group_by, ', ') END
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    step := ('1 ' || usage.granularity)::interval;
    periods := (extract(epoch FROM usage."to" - usage."from") / extract(epoch FROM step))::bigint;
    IF periods > 10000 THEN
        RAISE EXCEPTION 'invalid range: % periods of a %; at most 10000', periods, usage.granularity
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH counted AS (
        SELECT date_trunc(usage.granularity, c.hour AT TIME ZONE usage.time_zone) AS local_start,
               coalesce((SELECT jsonb_object_agg(g, c.groups::jsonb -> g) FROM unnest(usage.group_by) g),
                        '{}'::jsonb) AS groups,
               c.events, c.quantity, c.last_at, c.cost
        FROM billing.pools p
        JOIN billing.hourly_usage c ON c.pool_id = p.id
        WHERE p.tenant_id = tenant AND p.account = usage.account AND c.meter = usage.meter
          AND c.hour >= date_trunc('hour', usage."from") AND c.hour < usage."to"
    ), summed AS (
        SELECT c.local_start, c.groups, sum(c.events)::bigint AS events, sum(c.cost)::bigint AS cost,
               CASE m.aggregation
                   WHEN 'max' THEN max(c.quantity)
                   WHEN 'last' THEN (array_agg(c.quantity ORDER BY c.last_at DESC))[1]
                   ELSE sum(c.quantity) END AS quantity
        FROM counted c GROUP BY c.local_start, c.groups
    ), slots AS (
        SELECT s AS local_start
        FROM generate_series(date_trunc(usage.granularity, usage."from" AT TIME ZONE usage.time_zone),
                             usage."to" AT TIME ZONE usage.time_zone - interval '1 microsecond', step) s
    ), groups_seen AS (
        SELECT DISTINCT s.groups FROM summed s
        UNION SELECT '{}'::jsonb WHERE NOT EXISTS (SELECT 1 FROM summed)
    )
    SELECT sl.local_start AT TIME ZONE usage.time_zone, (sl.local_start + step) AT TIME ZONE usage.time_zone,
           g.groups, coalesce(s.events, 0), coalesce(s.quantity, 0), coalesce(s.cost, 0)
    FROM slots sl CROSS JOIN groups_seen g
    LEFT JOIN summed s ON s.local_start = sl.local_start AND s.groups = g.groups
    ORDER BY sl.local_start, g.groups::text;
END
$$;

-- One account's calls, newest first: what each used and cost, with its
-- properties (member: the property per-member reports and limits read),
-- including calls settled through holds; only_meter narrows it to one
-- meter. Keyset-paged: pass the last
-- event_id of a page as before_id for the next one.
CREATE FUNCTION billing.usage_log(
    account text, only_meter text DEFAULT NULL, before_id bigint DEFAULT NULL, page_size integer DEFAULT 50)
RETURNS TABLE (event_id bigint, occurred_at timestamptz, recorded_at timestamptz, meter text,
               quantity numeric, unit text, cost bigint, covered bigint, debt_created bigint,
               member text, via text, key text, price_version integer, properties jsonb)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
BEGIN
    IF usage_log.account IS NULL OR usage_log.page_size IS NULL THEN
        RAISE EXCEPTION 'account and page_size must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF usage_log.page_size NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'invalid page_size: % is not between 1 and 1000', usage_log.page_size
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    SELECT e.id, e.occurred_at, e.recorded_at, e.meter, e.quantity, e.unit, e.cost, e.covered,
           e.debt_created, e.properties ->> 'member',
           CASE WHEN e.key LIKE 'billing:hold:%' THEN 'hold' ELSE 'ingest' END, e.key,
           e.price_version, e.properties
    FROM billing.pools p
    CROSS JOIN LATERAL (
        SELECT u.* FROM billing.usage_events u
        WHERE u.pool_id = p.id AND (usage_log.before_id IS NULL OR u.id < usage_log.before_id)
          AND (usage_log.only_meter IS NULL OR u.meter = usage_log.only_meter)
        ORDER BY u.id DESC LIMIT usage_log.page_size) e
    WHERE p.tenant_id = tenant AND p.account = usage_log.account
    ORDER BY e.id DESC LIMIT usage_log.page_size;
END
$$;

-- The calendar month (UTC) holding `at`: the period priced meters charge in.
CREATE FUNCTION billing.usage_period(at timestamptz)
RETURNS TABLE (period_start timestamptz, period_end timestamptz)
LANGUAGE sql STABLE
SET search_path = pg_catalog
AS $$
    SELECT date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
           (date_trunc('month', at AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC'
$$;

-- An invoice for one account's period (the calendar month, UTC, holding
-- period_at): per meter, the lines of its price at the period's quantity
-- (each tier, package or unit, exactly) and an adjustment to what was
-- charged (rounding once, earlier price versions); usage whose cost was
-- passed in; the plan fee of a live subscription; the credit each grant
-- paid; and, per unit, what is due: the sum of every other line of that
-- unit. With projected, a period in progress is priced at the quantities
-- its usage so far would reach at its end, at the same pace (no credits).
CREATE FUNCTION billing.invoice_preview(account text, period_at timestamptz DEFAULT now(),
                                        projected boolean DEFAULT false)
RETURNS TABLE (line integer, kind text, description text, meter text, unit text,
               quantity numeric, unit_price numeric, amount numeric)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
    ps timestamptz;
    pe timestamptz;
    pace numeric := 1;
BEGIN
    IF invoice_preview.account IS NULL OR invoice_preview.period_at IS NULL OR invoice_preview.projected IS NULL THEN
        RAISE EXCEPTION 'account, period_at and projected must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT p.period_start, p.period_end INTO ps, pe FROM billing.usage_period(invoice_preview.period_at) p;
    IF invoice_preview.projected AND now() > ps AND now() < pe THEN
        pace := extract(epoch FROM pe - ps) / extract(epoch FROM now() - ps);
    END IF;
    RETURN QUERY
    WITH pools AS (
        SELECT p.id, p.unit FROM billing.pools p
        WHERE p.tenant_id = tenant AND p.account = invoice_preview.account
    ), counted AS (
        SELECT c.meter, p.unit, sum(c.events) AS events, sum(c.cost) AS cost
        FROM pools p JOIN billing.hourly_usage c ON c.pool_id = p.id
        WHERE c.hour >= ps AND c.hour < pe
        GROUP BY c.meter, p.unit
    ), priced AS (
        SELECT mp.meter, p.unit, mp.quantity * pace AS quantity, mp.charged, pr.price
        FROM pools p JOIN billing.meter_periods mp ON mp.pool_id = p.id AND mp.period_start = ps
        JOIN billing.meter_prices pr ON pr.tenant_id = tenant AND pr.meter = mp.meter AND pr.version = mp.version
    ), tier_lines AS (
        SELECT 1 AS part, pc.meter, pc.unit, l.line AS n, 'usage'::text AS kind, l.description,
               l.quantity, l.unit_price, l.amount
        FROM priced pc CROSS JOIN LATERAL billing.price_lines(pc.price, pc.quantity) l
        WHERE pc.price ->> 'model' <> 'cost_card'
    ), priced_totals AS (
        SELECT pc.meter, pc.unit,
               CASE WHEN pc.price ->> 'model' = 'cost_card' THEN round(pc.charged * pace)
                    WHEN pace <> 1 THEN billing.price_total(pc.price, pc.quantity)::numeric
                    ELSE pc.charged END AS total,
               pc.price ->> 'model' = 'cost_card' AS by_card
        FROM priced pc
    ), adjustments AS (
        SELECT 2 AS part, t.meter, t.unit, 1 AS n,
               CASE WHEN t.by_card THEN 'usage' ELSE 'adjustment' END AS kind,
               CASE WHEN t.by_card THEN 'priced per event by its cost card, rounded once for the period'
                    ELSE 'rounded once for the period, and any earlier price version' END AS description,
               NULL::numeric AS quantity, NULL::numeric AS unit_price,
               t.total - coalesce((SELECT sum(tl.amount) FROM tier_lines tl
                                   WHERE tl.meter = t.meter AND tl.unit = t.unit), 0) AS amount
        FROM priced_totals t
    ), passed_in AS (
        SELECT 3 AS part, c.meter, c.unit, 1 AS n, 'usage'::text AS kind,
               'costs passed with its events' AS description, c.events * pace AS quantity, NULL::numeric,
               round((c.cost - coalesce(pc.charged, 0)) * pace) AS amount
        FROM counted c LEFT JOIN priced pc ON pc.meter = c.meter AND pc.unit = c.unit
        WHERE c.cost - coalesce(pc.charged, 0) <> 0
    ), plan_fee AS (
        SELECT 4 AS part, NULL::text AS meter, lower(pr ->> 'currency') AS unit, 1 AS n, 'plan_fee'::text AS kind,
               format('plan %s, %s', pl.key, pr ->> 'interval') AS description, 1::numeric AS quantity,
               (pr ->> 'amount')::numeric AS unit_price, (pr ->> 'amount')::numeric AS amount
        FROM billing.subscriptions s
        JOIN billing.plans pl ON pl.id = s.plan_id
        CROSS JOIN LATERAL jsonb_array_elements(pl.prices) pr
        WHERE s.tenant_id = tenant AND s.account = invoice_preview.account
          AND billing.subscription_is_live(s.status) AND pr ->> 'price_id' = s.price_id
          AND s.period_start < pe AND s.period_end > ps
    ), credits AS (
        SELECT 5 AS part, NULL::text AS meter, p.unit, min(g.id)::integer AS n, 'credit'::text AS kind,
               format('paid from grant %s (%s)', g.id, g.kind) AS description, NULL::numeric, NULL::numeric,
               sum(e.grant_amount)::numeric AS amount
        FROM pools p JOIN billing.ledger e ON e.pool_id = p.id
        JOIN billing.grants g ON g.id = coalesce((SELECT x.parent_id FROM billing.grants x WHERE x.id = e.grant_id), e.grant_id)
        WHERE NOT invoice_preview.projected AND e.kind IN ('debit', 'debt_repayment')
          AND e.effective_at >= ps AND e.effective_at < pe AND e.grant_id IS NOT NULL
        GROUP BY p.unit, g.id, g.kind
    ), body AS (
        SELECT * FROM tier_lines UNION ALL SELECT * FROM adjustments a WHERE a.amount <> 0
        UNION ALL SELECT * FROM passed_in UNION ALL SELECT * FROM plan_fee UNION ALL SELECT * FROM credits
    ), due AS (
        SELECT 6 AS part, NULL::text AS meter, b.unit, 1 AS n, 'due'::text AS kind,
               CASE WHEN invoice_preview.projected THEN 'projected for the period' ELSE 'due' END AS description,
               NULL::numeric, NULL::numeric, sum(b.amount) AS amount
        FROM body b GROUP BY b.unit
    )
    SELECT (row_number() OVER (ORDER BY x.unit, x.part > 3, x.meter, x.part, x.n))::integer, x.kind, x.description,
           x.meter, x.unit, trim_scale(x.quantity), trim_scale(x.unit_price), trim_scale(x.amount)
    FROM (SELECT * FROM body UNION ALL SELECT * FROM due) x
    ORDER BY x.unit, x.part > 3, x.meter, x.part, x.n;
END
$$;

-- What an account's usage of a meter in a period (the calendar month, UTC,
-- holding period_at) would cost with a proposed price, beside what it was
-- charged. Changes nothing.
CREATE FUNCTION billing.simulate_price(account text, meter text, price jsonb, period_at timestamptz DEFAULT now())
RETURNS TABLE (quantity numeric, charged bigint, simulated bigint, difference bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ps timestamptz;
    pe timestamptz;
    q numeric;
    c bigint;
    s bigint;
BEGIN
    IF simulate_price.price IS NULL OR simulate_price.period_at IS NULL THEN
        RAISE EXCEPTION 'price and period_at must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT p.period_start, p.period_end INTO ps, pe FROM billing.usage_period(simulate_price.period_at) p;
    SELECT u.quantity, u.cost INTO q, c
    FROM billing.usage(simulate_price.account, simulate_price.meter, ps, pe, 'month') u LIMIT 1;
    s := billing.price_total(simulate_price.price, q);
    RETURN QUERY SELECT q, c, s, s - c;
END
$$;

-- Postpaid usage for the payment provider: per account and meter with usage
-- in the period (the calendar month, UTC, holding period_at), the quantity
-- so far, what the provider was last told, the delta, and the key to send
-- the report with (the provider's idempotency key: a retried push of the
-- same delta is the same report). A worker pushes the delta (or, for a
-- max or last meter, the quantity) and then marks it (mark_reported);
-- reading this changes nothing, so a worker in shadow mode only reads.
CREATE FUNCTION billing.usage_to_report(period_at timestamptz DEFAULT now(), only_meter text DEFAULT NULL,
                                        max_rows integer DEFAULT 1000)
RETURNS TABLE (account text, customer text, meter text, period_start timestamptz, quantity numeric,
               reported numeric, delta numeric, report_key text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
    ps timestamptz;
    pe timestamptz;
BEGIN
    IF usage_to_report.period_at IS NULL OR usage_to_report.max_rows IS NULL THEN
        RAISE EXCEPTION 'period_at and max_rows must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF usage_to_report.max_rows NOT BETWEEN 1 AND 100000 THEN
        RAISE EXCEPTION 'invalid max_rows: % is not between 1 and 100000', usage_to_report.max_rows
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT p.period_start, p.period_end INTO ps, pe FROM billing.usage_period(usage_to_report.period_at) p;
    RETURN QUERY
    WITH used AS (
        SELECT DISTINCT p.account, c.meter
        FROM billing.pools p JOIN billing.hourly_usage c ON c.pool_id = p.id
        WHERE p.tenant_id = tenant AND c.hour >= ps AND c.hour < pe
          AND (usage_to_report.only_meter IS NULL OR c.meter = usage_to_report.only_meter)
    ), totals AS (
        SELECT u.account, u.meter, t.quantity
        FROM used u CROSS JOIN LATERAL billing.usage(u.account, u.meter, ps, pe, 'month') t
    )
    SELECT t.account, pc.customer, t.meter, ps, t.quantity, coalesce(r.reported, 0),
           t.quantity - coalesce(r.reported, 0),
           format('billing:report:%s:%s:%s:%s', t.account, t.meter,
                  to_char(ps AT TIME ZONE 'UTC', 'YYYY-MM'), trim_scale(t.quantity))
    FROM totals t
    LEFT JOIN billing.usage_reports r ON r.tenant_id = tenant AND r.account = t.account
         AND r.meter = t.meter AND r.period_start = ps
    LEFT JOIN billing.provider_customers pc ON pc.tenant_id = tenant AND pc.account = t.account
    WHERE t.quantity IS DISTINCT FROM r.reported
    ORDER BY t.account, t.meter
    LIMIT usage_to_report.max_rows;
END
$$;

-- Record that the provider now has `quantity` of an account's meter for the
-- period starting period_start, reported under `report_key`: once per key
-- (again: duplicate), never backwards (a lower quantity than recorded:
-- stale). With shadow, only says what it would do.
CREATE FUNCTION billing.mark_reported(account text, meter text, period_start timestamptz, quantity numeric,
                                      report_key text, shadow boolean DEFAULT false)
RETURNS TABLE (status text, reported numeric)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
    r billing.usage_reports;
BEGIN
    IF mark_reported.account IS NULL OR mark_reported.meter IS NULL OR mark_reported.period_start IS NULL
       OR mark_reported.quantity IS NULL OR mark_reported.report_key IS NULL OR mark_reported.shadow IS NULL THEN
        RAISE EXCEPTION 'account, meter, period_start, quantity, report_key and shadow must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF mark_reported.quantity < 0 THEN
        RAISE EXCEPTION 'invalid quantity: must not be negative' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF mark_reported.period_start <> (SELECT p.period_start FROM billing.usage_period(mark_reported.period_start) p) THEN
        RAISE EXCEPTION 'invalid period_start: % does not start a period (the 1st of a month, UTC)', mark_reported.period_start
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO r FROM billing.usage_reports x
    WHERE x.tenant_id = tenant AND x.account = mark_reported.account AND x.meter = mark_reported.meter
      AND x.period_start = mark_reported.period_start
    FOR UPDATE;
    IF FOUND AND r.report_key = mark_reported.report_key THEN
        RETURN QUERY SELECT 'duplicate'::text, r.reported;
        RETURN;
    END IF;
    IF FOUND AND mark_reported.quantity <= r.reported THEN
        RETURN QUERY SELECT 'stale'::text, r.reported;
        RETURN;
    END IF;
    IF mark_reported.shadow THEN
        RETURN QUERY SELECT 'would_mark'::text, mark_reported.quantity;
        RETURN;
    END IF;
    INSERT INTO billing.usage_reports AS x (tenant_id, account, meter, period_start, reported, report_key)
    VALUES (tenant, mark_reported.account, mark_reported.meter, mark_reported.period_start,
            mark_reported.quantity, mark_reported.report_key)
    ON CONFLICT ON CONSTRAINT usage_reports_pkey DO UPDATE
    SET reported = EXCLUDED.reported, report_key = EXCLUDED.report_key, reported_at = now()
    WHERE x.reported < EXCLUDED.reported;
    RETURN QUERY SELECT 'marked'::text, mark_reported.quantity;
END
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:55
-- requires:
--   schema
--   webhooks
--   views
--   tenancy::current_tenant_sql
--   subscriptions::allowance_periods

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
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:131
-- requires:
--   schema
--   subscriptions
--   tenancy::current_tenant_sql
--   tenancy::calling_role

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
/* </end connected objects> */

/* <begin connected objects> */
-- src/ingest.rs:199
-- pg_billing::ingest::ingest
CREATE  FUNCTION "ingest"(
	"account" TEXT, /* Option < & str > */
	"meter" TEXT, /* Option < & str > */
	"quantity" NUMERIC, /* Option < AnyNumeric > */
	"key" TEXT DEFAULT NULL, /* Option < & str > */
	"occurred_at" timestamp with time zone DEFAULT NULL, /* Option < Tstz > */
	"properties" jsonb DEFAULT '{}', /* Option < JsonArg > */
	"cost" bigint DEFAULT NULL, /* Option < i64 > */
	"strict" bool DEFAULT false /* Option < bool > */
) RETURNS TABLE (
	"event_id" bigint,  /* Option < i64 > */
	"status" TEXT,  /* String */
	"meter" TEXT,  /* String */
	"unit" TEXT,  /* String */
	"cost" bigint,  /* i64 */
	"covered" bigint,  /* i64 */
	"debt_created" bigint,  /* i64 */
	"drains" jsonb,  /* JsonB */
	"available" bigint,  /* i64 */
	"entitled" bool  /* bool */
)
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'ingest_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/ingest.rs:251
-- pg_billing::ingest::ingest_batch
CREATE  FUNCTION "ingest_batch"(
	"events" jsonb /* Option < JsonArg > */
) RETURNS TABLE (
	"key" TEXT,  /* String */
	"event_id" bigint,  /* Option < i64 > */
	"status" TEXT,  /* String */
	"meter" TEXT,  /* String */
	"unit" TEXT,  /* String */
	"cost" bigint,  /* i64 */
	"covered" bigint,  /* i64 */
	"debt_created" bigint,  /* i64 */
	"drains" jsonb,  /* JsonB */
	"available" bigint,  /* i64 */
	"entitled" bool  /* bool */
)
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'ingest_batch_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/limits.rs:364
-- pg_billing::limits::limits_status
CREATE  FUNCTION "limits_status"(
	"account" TEXT, /* Option < & str > */
	"unit" TEXT, /* Option < & str > */
	"member" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS TABLE (
	"name" TEXT,  /* String */
	"member" TEXT,  /* Option < String > */
	"max" bigint,  /* i64 */
	"used" bigint,  /* i64 */
	"remaining" bigint,  /* i64 */
	"window_start" timestamp with time zone,  /* Option < Tstz > */
	"resets_at" timestamp with time zone  /* Option < Tstz > */
)
STABLE SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'limits_status_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/quotes/mod.rs:316
-- pg_billing::quotes::paid_credit
CREATE  FUNCTION "paid_credit"(
	"paid" bigint, /* i64 */
	"percent" NUMERIC, /* AnyNumeric */
	"fixed" bigint, /* i64 */
	"quoted_total" bigint, /* i64 */
	"quoted_credit" bigint /* i64 */
) RETURNS bigint /* i64 */
IMMUTABLE STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'paid_credit_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:86
-- requires:
--   schema
--   quotes::paid_credit
--   grants::grant_credits

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
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:121
-- requires:
--   schema
--   webhooks
--   payments
--   tenancy::current_tenant_sql

-- Reconciliation with the provider's own records, so drift is found and
-- fixed through the normal idempotent paths.

-- Orphan usage: given the provider's request ids for a period (the usage
-- event keys the application sends), the ones with no usage event here
-- (missing 'here': re-ingest them with the same key, which is safe to repeat)
-- and the events here in [period_start, period_end) that the provider does
-- not list (missing 'there'), optionally of one meter or account.
CREATE FUNCTION billing.reconcile_usage(provider_keys text[], period_start timestamptz, period_end timestamptz,
    only_meter text DEFAULT NULL, only_account text DEFAULT NULL)
RETURNS TABLE (key text, missing text, account text, meter text, occurred_at timestamptz, cost bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
BEGIN
    IF provider_keys IS NULL OR period_start IS NULL OR period_end IS NULL THEN
        RAISE EXCEPTION 'provider_keys, period_start and period_end may not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF cardinality(provider_keys) > 1000000 OR period_end <= period_start THEN
        RAISE EXCEPTION 'at most 1,000,000 keys per call, and period_end after period_start'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    SELECT p.k, 'here'::text, NULL::text, NULL::text, NULL::timestamptz, NULL::bigint
    FROM (SELECT DISTINCT u.k FROM unnest(provider_keys) AS u(k) WHERE u.k IS NOT NULL) p
    WHERE NOT EXISTS (SELECT 1 FROM billing.usage_events e WHERE e.tenant_id = tenant AND e.key = p.k)
    UNION ALL
    SELECT e.key, 'there'::text, e.account, e.meter, e.occurred_at, e.cost
    FROM billing.usage_events e
    LEFT JOIN (SELECT DISTINCT u.k FROM unnest(provider_keys) AS u(k)) p ON p.k = e.key
    WHERE e.tenant_id = tenant AND e.occurred_at >= period_start AND e.occurred_at < period_end
      AND (only_meter IS NULL OR e.meter = only_meter)
      AND (only_account IS NULL OR e.account = only_account)
      AND p.k IS NULL
    ORDER BY 2, 1;
END
$$;

-- Payments: the provider's list of payments (a JSON array of
-- {"payment", "account", "paid", "refunded"}, amounts in minor units, e.g.
-- from Stripe's list of PaymentIntents and their charges) against the
-- ledger. Only drift is returned: a payment with no credit here
-- (`not_credited`: confirm it, or have the provider re-send its event; the
-- payment's key makes either safe), credited to another account
-- (`other_account`), or refunded by more or less than the refunds recorded
-- here by more than `epsilon` (`refund_drift`: re-send the refund's event).
CREATE FUNCTION billing.reconcile_payments(provider_payments jsonb, epsilon bigint DEFAULT 0)
RETURNS TABLE (payment text, account text, problem text, provider_paid bigint, provider_refunded bigint,
               credited bigint, refunded_here bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE
    tenant text := billing.current_tenant();
BEGIN
    IF provider_payments IS NULL OR epsilon IS NULL THEN
        RAISE EXCEPTION 'provider_payments and epsilon may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF jsonb_typeof(provider_payments) <> 'array' OR jsonb_array_length(provider_payments) > 1000000 OR epsilon < 0 THEN
        RAISE EXCEPTION 'provider_payments must be an array of at most 1,000,000 {"payment", "account", "paid", "refunded"}, epsilon not negative'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH p AS (
        SELECT x.payment, x.account, coalesce(x.paid, 0) AS paid, coalesce(x.refunded, 0) AS refunded
        FROM jsonb_to_recordset(provider_payments) AS x(payment text, account text, paid bigint, refunded bigint)
        WHERE x.payment IS NOT NULL),
    here AS (
        SELECT p.*, g.account AS credited_account, g.amount AS credited,
               coalesce((SELECT sum(r.amount) FROM billing.stripe_reversals r
                         WHERE r.tenant_id = tenant AND r.payment = p.payment AND r.source = 'refunds'), 0)::bigint
                   AS refunded_here
        FROM p LEFT JOIN billing.grants g ON g.tenant_id = tenant AND g.key = billing.payment_key(p.payment))
    SELECT h.payment, h.account,
           CASE WHEN h.credited IS NULL THEN 'not_credited'
                WHEN h.account IS DISTINCT FROM h.credited_account THEN 'other_account'
                ELSE 'refund_drift' END,
           h.paid, h.refunded, h.credited, h.refunded_here
    FROM here h
    WHERE h.credited IS NULL OR h.account IS DISTINCT FROM h.credited_account
       OR abs(h.refunded - h.refunded_here) > epsilon
    ORDER BY 1;
END
$$;

-- Cost audit: the provider's invoice (a JSON array of {"meter",
-- "period_start", "period_end", "cost"}, cost in the meter's unit; periods
-- in whole UTC hours, as usage is counted, read in UTC when they carry no
-- offset) against the cost recorded here for
-- each meter and period, from the hourly counters. Every line is returned
-- with its drift (recorded − invoiced); a drift beyond the tolerance, either
-- way (the larger of `tolerance` and `tolerance_percent` of the invoiced
-- cost), raises one alert (kind cost_drift, one per meter and period,
-- announced with NOTIFY billing_alert) whose id the line carries.
CREATE FUNCTION billing.audit_costs(invoice jsonb, tolerance_percent numeric DEFAULT 1, tolerance bigint DEFAULT 0)
RETURNS TABLE (meter text, unit text, period_start timestamptz, period_end timestamptz, recorded bigint,
               invoiced bigint, drift bigint, alert_id bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
SET TimeZone = 'UTC'
AS $$
-- a column named like an output (the conflict target's period_start) is the column
#variable_conflict use_column
DECLARE
    tenant text := billing.current_tenant();
    line record;
    m billing.meters;
    allowed bigint;
BEGIN
    IF invoice IS NULL OR tolerance_percent IS NULL OR tolerance IS NULL THEN
        RAISE EXCEPTION 'invoice, tolerance_percent and tolerance may not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF jsonb_typeof(invoice) <> 'array' OR jsonb_array_length(invoice) > 100000
       OR tolerance_percent < 0 OR tolerance_percent > 100 OR tolerance < 0 THEN
        RAISE EXCEPTION 'invoice must be an array of at most 100,000 {"meter", "period_start", "period_end", "cost"}; tolerance_percent between 0 and 100, tolerance not negative'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR line IN
        SELECT x.meter, x.period_start, x.period_end, x.cost
        FROM jsonb_to_recordset(invoice) AS x(meter text, period_start timestamptz, period_end timestamptz, cost bigint)
    LOOP
        IF line.meter IS NULL OR line.period_start IS NULL OR line.period_end IS NULL OR line.cost IS NULL
           OR line.cost < 0 OR line.period_end <= line.period_start
           OR date_trunc('hour', line.period_start) <> line.period_start
           OR date_trunc('hour', line.period_end) <> line.period_end THEN
            RAISE EXCEPTION 'invoice line % is not {"meter", "period_start", "period_end", "cost"} with a cost not negative and a period of whole hours', line
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT * INTO m FROM billing.meters x WHERE x.tenant_id = tenant AND x.meter = line.meter;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'unknown meter "%"', left(line.meter, 80) USING ERRCODE = 'undefined_object';
        END IF;
        meter := line.meter;
        unit := m.unit;
        period_start := line.period_start;
        period_end := line.period_end;
        invoiced := line.cost;
        SELECT coalesce(sum(c.cost), 0)::bigint INTO recorded FROM billing.hourly_usage c
        WHERE c.tenant_id = tenant AND c.meter = line.meter
          AND c.hour >= line.period_start AND c.hour < line.period_end;
        drift := recorded - invoiced;
        allowed := greatest(tolerance, ceil(invoiced * tolerance_percent / 100)::bigint);
        alert_id := NULL;
        IF abs(drift) > allowed THEN
            INSERT INTO billing.alerts (tenant_id, unit, name, kind, threshold, period_start, period_end, details)
            VALUES (tenant, m.unit, line.meter, 'cost_drift', allowed, line.period_start, line.period_end,
                    jsonb_build_object('recorded', recorded, 'invoiced', invoiced, 'drift', drift))
            ON CONFLICT (tenant_id, name, period_start, period_end) WHERE kind = 'cost_drift' DO NOTHING
            RETURNING id INTO alert_id;
            IF alert_id IS NULL THEN
                SELECT a.id INTO alert_id FROM billing.alerts a
                WHERE a.tenant_id = tenant AND a.kind = 'cost_drift' AND a.name = line.meter
                  AND a.period_start = line.period_start AND a.period_end = line.period_end;
            ELSE
                PERFORM pg_notify('billing_alert', alert_id::text);
            END IF;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/pricing/mod.rs:816
-- pg_billing::pricing::price_lines
CREATE  FUNCTION "price_lines"(
	"price" jsonb, /* Option < pgrx :: JsonB > */
	"quantity" NUMERIC /* Option < AnyNumeric > */
) RETURNS TABLE (
	"line" INT,  /* i32 */
	"description" TEXT,  /* String */
	"quantity" NUMERIC,  /* AnyNumeric */
	"unit_price" NUMERIC,  /* AnyNumeric */
	"amount" NUMERIC  /* AnyNumeric */
)
IMMUTABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'price_lines_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/pricing/mod.rs:855
-- pg_billing::pricing::price_total
CREATE  FUNCTION "price_total"(
	"price" jsonb, /* Option < pgrx :: JsonB > */
	"quantity" NUMERIC /* Option < AnyNumeric > */
) RETURNS bigint /* i64 */
IMMUTABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'price_total_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/quotes/mod.rs:205
-- pg_billing::quotes::quote
CREATE  FUNCTION "quote"(
	"credit_amount" bigint, /* Option < i64 > */
	"currency" TEXT, /* Option < & str > */
	"card_kind" TEXT, /* Option < & str > */
	"converted" bool DEFAULT false /* Option < bool > */
) RETURNS TABLE (
	"currency" TEXT,  /* String */
	"card_kind" TEXT,  /* String */
	"credit" bigint,  /* i64 */
	"fee" bigint,  /* i64 */
	"total" bigint,  /* i64 */
	"percent" NUMERIC,  /* AnyNumeric */
	"fixed" bigint  /* i64 */
)
STABLE SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'quote_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:109
-- requires:
--   schema
--   payments
--   tenancy::current_tenant_sql
--   quotes::quote
--   accounts::account
--   gate::check

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
/* </end connected objects> */

/* <begin connected objects> */
-- src/holds.rs:493
-- pg_billing::holds::release
CREATE  FUNCTION "release"(
	"hold_id" bigint /* Option < i64 > */
) RETURNS TABLE (
	"hold_id" bigint,  /* i64 */
	"status" TEXT,  /* String */
	"released" bigint,  /* i64 */
	"available" bigint  /* i64 */
)
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'release_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/limits.rs:336
-- pg_billing::limits::remove_limit
CREATE  FUNCTION "remove_limit"(
	"account" TEXT, /* Option < & str > */
	"unit" TEXT, /* Option < & str > */
	"name" TEXT /* Option < & str > */
) RETURNS bool /* bool */
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'remove_limit_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/holds.rs:65
-- pg_billing::holds::reserve
CREATE  FUNCTION "reserve"(
	"account" TEXT, /* Option < & str > */
	"unit" TEXT, /* Option < & str > */
	"amount" bigint, /* Option < i64 > */
	"key" TEXT DEFAULT NULL, /* Option < & str > */
	"ttl" interval DEFAULT '15 minutes', /* Option < Interval > */
	"metadata" jsonb DEFAULT '{}' /* Option < JsonArg > */
) RETURNS TABLE (
	"hold_id" bigint,  /* i64 */
	"status" TEXT,  /* String */
	"amount" bigint,  /* i64 */
	"expires_at" timestamp with time zone,  /* Tstz */
	"available" bigint  /* i64 */
)
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'reserve_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/grants.rs:886
-- pg_billing::grants::resume_grant
CREATE  FUNCTION "resume_grant"(
	"grant_id" bigint /* Option < i64 > */
) RETURNS TABLE (
	"grant_id" bigint,  /* i64 */
	"status" TEXT,  /* String */
	"remaining" bigint,  /* i64 */
	"available" bigint  /* i64 */
)
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'resume_grant_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/grants.rs:971
-- pg_billing::grants::reverse_grant
CREATE  FUNCTION "reverse_grant"(
	"grant_id" bigint, /* Option < i64 > */
	"total" bigint /* Option < i64 > */
) RETURNS TABLE (
	"grant_id" bigint,  /* i64 */
	"status" TEXT,  /* String */
	"total" bigint,  /* i64 */
	"revoked" bigint,  /* i64 */
	"debt_created" bigint,  /* i64 */
	"reinstated" bigint,  /* i64 */
	"available" bigint  /* i64 */
)
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'reverse_grant_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/grants.rs:773
-- pg_billing::grants::revoke_unused
CREATE  FUNCTION "revoke_unused"(
	"grant_id" bigint /* Option < i64 > */
) RETURNS TABLE (
	"grant_id" bigint,  /* i64 */
	"status" TEXT,  /* String */
	"removed" bigint,  /* i64 */
	"consumed" bigint,  /* i64 */
	"debt_created" bigint,  /* i64 */
	"available" bigint  /* i64 */
)
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'revoke_unused_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/webhooks.rs:107
-- pg_billing::webhooks::run_webhook_handler
-- requires:
--   webhooks
CREATE  FUNCTION "run_webhook_handler"(
	"handler" oid, /* Option < pg_sys :: Oid > */
	"event" billing.webhook_events /* Option < :: pgrx :: heap_tuple :: PgHeapTuple < '_, :: pgrx :: pgbox ::
AllocatedByRust > > */
) RETURNS jsonb /* Option < pgrx :: JsonB > */

SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'run_webhook_handler_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/webhooks/topup.rs
-- pg_billing::webhooks::topup::stripe_credit_topup
-- requires:
--   webhooks
CREATE  FUNCTION "stripe_credit_topup"(
	"ev" billing.webhook_events /* Option < :: pgrx :: heap_tuple :: PgHeapTuple < '_, :: pgrx :: pgbox ::
AllocatedByRust > > */
) RETURNS jsonb /* Option < JsonB > */

SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'stripe_credit_topup_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/webhooks/intake.rs
-- pg_billing::webhooks::intake::webhook_intake_decide
-- requires:
--   webhooks
CREATE  FUNCTION "webhook_intake_decide"(
	"ev" billing.webhook_events /* :: pgrx :: heap_tuple :: PgHeapTuple < '_, :: pgrx :: pgbox :: AllocatedByRust
> */
) RETURNS billing.webhook_events /* :: pgrx :: heap_tuple :: PgHeapTuple < '_, :: pgrx :: pgbox :: AllocatedByRust
> */
STRICT 
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'webhook_intake_decide_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/webhooks/intake.rs
-- pg_billing::webhooks::intake::verify_delivery
-- requires:
--   webhooks
CREATE  FUNCTION "verify_delivery"(
	"ep" billing.webhook_endpoints, /* :: pgrx :: heap_tuple :: PgHeapTuple < '_, :: pgrx :: pgbox :: AllocatedByRust
> */
	"headers" jsonb, /* Option < JsonArg > */
	"body" TEXT /* Option < & str > */
) RETURNS TABLE (
	"valid" bool,  /* bool */
	"reason" TEXT,  /* Option < String > */
	"event_id" TEXT,  /* Option < String > */
	"signed_at" timestamp with time zone  /* Option < Tstz > */
)
STABLE 
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'verify_delivery_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/webhooks/topup.rs
-- pg_billing::webhooks::topup::stripe_named_account
CREATE  FUNCTION "stripe_named_account"(
	"obj" jsonb /* crate :: input :: JsonArg */
) RETURNS TEXT /* Option < String > */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'stripe_named_account_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/webhooks/intake.rs
-- pg_billing::webhooks::intake::lock_webhook_object
-- requires:
--   webhooks
CREATE  FUNCTION "lock_webhook_object"(
	"endpoint_id" bigint, /* Option < i64 > */
	"tenant" TEXT, /* Option < & str > */
	"key" TEXT /* Option < & str > */
) RETURNS timestamp with time zone /* Tstz */

SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'lock_webhook_object_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/webhooks/topup.rs
-- pg_billing::webhooks::topup::payment_key
CREATE  FUNCTION "payment_key"(
	"payment_ref" TEXT /* & str */
) RETURNS TEXT /* String */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'payment_key_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/webhooks/topup.rs
-- pg_billing::webhooks::topup::stripe_checkout_intent
CREATE  FUNCTION "stripe_checkout_intent"(
	"obj" jsonb /* input :: JsonArg */
) RETURNS bigint /* Option < i64 > */
STRICT STABLE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'stripe_checkout_intent_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/allowances.rs:267
-- pg_billing::allowances::set_allowance
CREATE  FUNCTION "set_allowance"(
	"account" TEXT, /* Option < & str > */
	"unit" TEXT, /* Option < & str > */
	"amount" bigint, /* Option < i64 > */
	"every" TEXT DEFAULT 'month', /* Option < & str > */
	"time_zone" TEXT DEFAULT 'UTC', /* Option < & str > */
	"keep_periods" INT DEFAULT 1, /* Option < i32 > */
	"priority" INT DEFAULT 10, /* Option < i32 > */
	"starts_at" timestamp with time zone DEFAULT NULL /* Option < Tstz > */
) RETURNS TABLE (
	"allowance_id" bigint,  /* Option < i64 > */
	"starts_at" timestamp with time zone,  /* Option < Tstz > */
	"status" TEXT  /* String */
)
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'set_allowance_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/accounts.rs:97
-- pg_billing::accounts::set_floor
CREATE  FUNCTION "set_floor"(
	"account" TEXT, /* Option < & str > */
	"unit" TEXT, /* Option < & str > */
	"floor" bigint /* Option < i64 > */
) RETURNS bigint /* i64 */
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'set_floor_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/accounts.rs:112
-- pg_billing::accounts::set_lanes
CREATE  FUNCTION "set_lanes"(
	"account" TEXT, /* Option < & str > */
	"unit" TEXT, /* Option < & str > */
	"lanes" INT /* Option < i32 > */
) RETURNS INT /* i32 */
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'set_lanes_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/limits.rs:257
-- pg_billing::limits::set_limit
CREATE  FUNCTION "set_limit"(
	"account" TEXT, /* Option < & str > */
	"unit" TEXT, /* Option < & str > */
	"name" TEXT, /* Option < & str > */
	"max" bigint, /* Option < i64 > */
	"every" TEXT DEFAULT 'day', /* Option < & str > */
	"time_zone" TEXT DEFAULT 'UTC', /* Option < & str > */
	"per_member" bool DEFAULT false /* Option < bool > */
) RETURNS TABLE (
	"limit_id" bigint,  /* i64 */
	"name" TEXT,  /* String */
	"status" TEXT  /* String */
)
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'set_limit_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/pricing/mod.rs:737
-- pg_billing::pricing::set_price
CREATE  FUNCTION "set_price"(
	"meter" TEXT, /* Option < & str > */
	"price" jsonb, /* Option < pgrx :: JsonB > */
	"effective_at" timestamp with time zone DEFAULT NULL /* Option < pgrx :: datum :: TimestampWithTimeZone > */
) RETURNS TABLE (
	"meter" TEXT,  /* String */
	"version" INT,  /* i32 */
	"effective_at" timestamp with time zone,  /* pgrx :: datum :: TimestampWithTimeZone */
	"status" TEXT  /* String */
)
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'set_price_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/quotes/mod.rs:61
-- pg_billing::quotes::set_topup_fee
CREATE  FUNCTION "set_topup_fee"(
	"currency" TEXT, /* Option < & str > */
	"card_kind" TEXT, /* Option < & str > */
	"percent" NUMERIC, /* Option < AnyNumeric > */
	"fixed" bigint /* Option < i64 > */
) RETURNS TABLE (
	"currency" TEXT,  /* String */
	"card_kind" TEXT,  /* String */
	"percent" NUMERIC,  /* AnyNumeric */
	"fixed" bigint  /* i64 */
)
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'set_topup_fee_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/quotes/mod.rs:120
-- pg_billing::quotes::set_topup_limits
CREATE  FUNCTION "set_topup_limits"(
	"currency" TEXT, /* Option < & str > */
	"min_credit" bigint, /* Option < i64 > */
	"max_credit" bigint, /* Option < i64 > */
	"conversion_percent" NUMERIC DEFAULT 0 /* Option < AnyNumeric > */
) RETURNS TABLE (
	"currency" TEXT,  /* String */
	"min_credit" bigint,  /* i64 */
	"max_credit" bigint,  /* i64 */
	"conversion_percent" NUMERIC  /* AnyNumeric */
)
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'set_topup_limits_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/holds.rs:307
-- pg_billing::holds::settle
CREATE  FUNCTION "settle"(
	"hold_id" bigint, /* Option < i64 > */
	"actual" bigint, /* Option < i64 > */
	"key" TEXT DEFAULT NULL, /* Option < & str > */
	"meter" TEXT DEFAULT NULL, /* Option < & str > */
	"quantity" NUMERIC DEFAULT NULL, /* Option < AnyNumeric > */
	"properties" jsonb DEFAULT NULL /* Option < JsonArg > */
) RETURNS TABLE (
	"hold_id" bigint,  /* i64 */
	"status" TEXT,  /* String */
	"held" bigint,  /* i64 */
	"actual" bigint,  /* i64 */
	"covered" bigint,  /* i64 */
	"debt_created" bigint,  /* i64 */
	"drains" jsonb,  /* JsonB */
	"available" bigint,  /* i64 */
	"entitled" bool,  /* bool */
	"event_id" bigint  /* Option < i64 > */
)
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'settle_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/grants.rs:863
-- pg_billing::grants::suspend_grant
CREATE  FUNCTION "suspend_grant"(
	"grant_id" bigint /* Option < i64 > */
) RETURNS TABLE (
	"grant_id" bigint,  /* i64 */
	"status" TEXT,  /* String */
	"remaining" bigint,  /* i64 */
	"available" bigint  /* i64 */
)
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'suspend_grant_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/reporting.rs:116
-- pg_billing::reporting::sweep
CREATE  FUNCTION "sweep"(
	"max_pools" INT DEFAULT 1000 /* Option < i32 > */
) RETURNS bigint /* i64 */
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'sweep_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/reloads.rs:17
-- pg_billing::reloads::unsplit_pool
CREATE  FUNCTION "unsplit_pool"(
	"account" TEXT, /* Option < & str > */
	"unit" TEXT /* Option < & str > */
) RETURNS bigint /* i64 */
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'unsplit_pool_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:91
-- requires:
--   schema
--   subscriptions
--   payments
--   tenancy::current_tenant_sql
--   reloads::unsplit_pool
--   quotes::quote
--   gate::check

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
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:104
-- requires:
--   schema
--   tenancy::current_tenant_sql
--   reloads::unsplit_pool

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
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:141
-- requires:
--   schema
--   webhooks
--   checkouts
--   alerts
--   grant_controls

-- src/metrics.rs
-- pg_billing::metrics::usage_answers
CREATE  FUNCTION "usage_answers"() RETURNS TABLE (
	"outcome" TEXT,  /* String */
	"events" bigint  /* i64 */
)
STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'usage_answers_wrapper';

-- Counters an operator graphs (billing.metrics), one row per metric, tenant
-- and label, cheap enough to scrape every few seconds with a custom query of
-- postgres_exporter. Open work (alerts, holds, approvals, checkouts, reload
-- requests) is counted from small or partially indexed sets; pools in debt
-- and the debt owed scan the pools (one pass, no lock); usage events and
-- ledger entries written come from PostgreSQL's own table statistics (all
-- tenants, since the statistics were last reset). Webhook deliveries are
-- counted as kept: rejected ones are a bounded sample. Usage events answered
-- (applied, duplicate, rejected) are counted in shared memory when pg_billing
-- is preloaded (src/metrics.rs).
CREATE FUNCTION billing.metrics()
RETURNS TABLE (metric text, tenant text, label text, value bigint)
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
    SELECT 'usage_events_written', NULL, NULL, s.n_tup_ins
    FROM pg_catalog.pg_stat_user_tables s WHERE s.relid = 'billing.usage_events'::regclass
    UNION ALL
    SELECT 'ledger_entries_written', NULL, NULL, s.n_tup_ins
    FROM pg_catalog.pg_stat_user_tables s WHERE s.relid = 'billing.ledger_entries'::regclass
    UNION ALL
    SELECT 'usage_events_answered', NULL, a.outcome, a.events FROM billing.usage_answers() a
    UNION ALL
    SELECT 'webhook_deliveries', w.tenant_id, w.status, count(*) FROM billing.webhook_events w GROUP BY 2, 3
    UNION ALL
    SELECT 'reload_requests', r.tenant_id, r.status, count(*) FROM billing.reload_requests r GROUP BY 2, 3
    UNION ALL
    SELECT 'alerts_open', a.tenant_id, a.kind, count(*) FROM billing.alerts a
    WHERE a.acknowledged_at IS NULL GROUP BY 2, 3
    UNION ALL
    SELECT 'accounts_in_debt', p.tenant_id, p.unit, count(DISTINCT p.account) FROM billing.pools p
    WHERE p.debt > 0 GROUP BY 2, 3
    UNION ALL
    SELECT 'debt_owed', p.tenant_id, p.unit, sum(p.debt)::bigint FROM billing.pools p
    WHERE p.debt > 0 GROUP BY 2, 3
    UNION ALL
    SELECT 'holds_open', h.tenant_id, h.unit, count(*) FROM billing.holds h
    WHERE h.status = 'open' GROUP BY 2, 3
    UNION ALL
    SELECT 'grant_approvals_pending', g.tenant_id, g.unit, count(*) FROM billing.grant_approvals g
    WHERE g.status = 'pending' GROUP BY 2, 3
    UNION ALL
    SELECT 'checkouts_pending', c.tenant_id, c.unit, count(*) FROM billing.checkout_intents c
    WHERE c.status = 'pending' GROUP BY 2, 3
    ORDER BY 1, 2, 3
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/webhooks.rs:36
-- pg_billing::webhooks::verify_webhook
CREATE  FUNCTION "verify_webhook"(
	"scheme" TEXT, /* Option < & str > */
	"secret" TEXT, /* Option < & str > */
	"headers" jsonb, /* Option < JsonArg > */
	"body" TEXT, /* Option < & str > */
	"previous_secret" TEXT DEFAULT NULL, /* Option < & str > */
	"tolerance_seconds" INT DEFAULT 300, /* Option < i32 > */
	"signature_header" TEXT DEFAULT 'x-signature' /* Option < & str > */
) RETURNS TABLE (
	"valid" bool,  /* bool */
	"reason" TEXT,  /* Option < String > */
	"event_id" TEXT,  /* Option < String > */
	"signed_at" timestamp with time zone  /* Option < Tstz > */
)
STABLE PARALLEL SAFE
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'verify_webhook_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/grants.rs:750
-- pg_billing::grants::void_grant
CREATE  FUNCTION "void_grant"(
	"grant_id" bigint /* Option < i64 > */
) RETURNS TABLE (
	"grant_id" bigint,  /* i64 */
	"status" TEXT,  /* String */
	"removed" bigint,  /* i64 */
	"consumed" bigint,  /* i64 */
	"debt_created" bigint,  /* i64 */
	"available" bigint  /* i64 */
)
SECURITY DEFINER
SET search_path TO pg_catalog, billing, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'void_grant_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
/* <begin connected objects> */
-- src/lib.rs:152
-- finalize
-- Tenancy and privileges, applied last, over every table and function.
--
-- Three roles (created if missing; roles are cluster-wide and outlive the
-- extension):
--   billing_reader  reads balances, usage and the ledger of its tenants
--   billing_app     also moves money and records usage for its tenants
--   billing_admin   also configures units, meters, floors, webhooks and
--                   tenants, and may act for any tenant
--   billing_support reads like billing_reader and grants credit by hand
--                   (manual, promo) under the tenant's grant policy, and
--                   approves or rejects such grants
-- A login role acts for a tenant when it has the privileges of a role that
-- billing.grant_tenant(tenant, role) named (see src/tenancy.rs).

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'billing_reader') THEN
        CREATE ROLE billing_reader NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'billing_app') THEN
        CREATE ROLE billing_app NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'billing_admin') THEN
        CREATE ROLE billing_admin NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'billing_support') THEN
        CREATE ROLE billing_support NOLOGIN;
    END IF;
END
$$;
GRANT billing_reader TO billing_app;
GRANT billing_reader TO billing_support;
GRANT billing_app TO billing_admin;
GRANT USAGE ON SCHEMA billing TO billing_reader;

-- Secrets stay unreadable: other roles may read every column of
-- webhook_endpoints but the two secrets (column privileges below). This view
-- shows an endpoint's settings with the currencies it credits. Like every
-- view, it runs with the caller's rights, so row-level security filters the
-- rows before any function in the caller's WHERE clause sees them.
CREATE VIEW billing.webhook_endpoint_settings WITH (security_invoker = true, security_barrier = true) AS
SELECT e.name, e.scheme, e.tolerance_seconds, e.signature_header,
       (SELECT jsonb_object_agg(c.currency, jsonb_build_object('unit', c.unit,
                                 'credits_per_minor_unit', c.credits_per_minor_unit))
        FROM billing.webhook_currencies c WHERE c.endpoint_id = e.id) AS currencies,
       coalesce(e.previous_secret_expires_at > now(), false) AS rotating, e.created_at
FROM billing.webhook_endpoints e;

-- Row-level security, enabled and forced on every table. current_tenant()
-- raises for a tenant the role was not granted, so a forged setting reads
-- nothing; it is evaluated once per statement.
DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['accounts', 'units', 'meters', 'pools', 'grants', 'usage_events', 'holds', 'meter_prices',
                             'meter_periods', 'meter_uniques', 'usage_counters', 'allowances',
                             'limits', 'limit_usage', 'guest_conversions',
                             'usage_reports', 'limit_holds',
                             'ledger_entries', 'webhook_endpoints', 'webhook_currencies', 'webhook_events',
                             'webhook_objects', 'webhook_handlers', 'stripe_reversals', 'plans', 'plan_keys', 'plan_prices',
                             'provider_customers', 'subscriptions', 'subscription_conflicts',
                             'subscription_allowances', 'subscription_invoices', 'seats', 'seat_pushes',
                             'subscription_changes', 'invoice_payments', 'default_plans',
                             'topup_fees', 'topup_limits', 'reload_rules', 'reload_requests',
                             'checkout_intents', 'alert_rules', 'alerts', 'grant_policies',
                             'granted_per_day', 'grant_approvals'] LOOP
        EXECUTE format('ALTER TABLE billing.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE billing.%I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_isolation ON billing.%I '
                       'USING (tenant_id = (SELECT billing.current_tenant()))', t);
        EXECUTE format('REVOKE ALL ON billing.%I FROM PUBLIC', t);
    END LOOP;
END
$$;
ALTER TABLE billing.tenant_roles ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.tenant_roles FORCE ROW LEVEL SECURITY;
CREATE POLICY admins_only ON billing.tenant_roles
    USING (pg_catalog.pg_has_role(current_user, 'billing_admin', 'USAGE'));
REVOKE ALL ON billing.tenant_roles FROM PUBLIC;

GRANT SELECT ON billing.accounts, billing.units, billing.meters, billing.pools, billing.grants,
                billing.usage_events, billing.holds, billing.meter_prices, billing.meter_periods,
                billing.meter_uniques, billing.usage_counters, billing.allowances,
                billing.limits, billing.limit_usage, billing.guest_conversions, billing.usage_reports, billing.limit_holds,
                billing.ledger_entries,
                billing.webhook_events,
                billing.webhook_currencies, billing.webhook_objects, billing.webhook_handlers,
                billing.stripe_reversals, billing.grant_balances, billing.ledger, billing.hourly_usage,
                billing.webhook_endpoint_settings,
                billing.plans, billing.plan_keys, billing.plan_prices, billing.provider_customers, billing.subscriptions,
                billing.subscription_conflicts, billing.subscription_allowances, billing.subscription_invoices,
                billing.seats, billing.seat_pushes, billing.subscription_status, billing.subscription_changes, billing.invoice_payments,
                billing.subscription_drift, billing.default_plans, billing.topup_fees, billing.topup_limits,
                billing.reload_rules, billing.reload_requests, billing.checkout_intents,
                billing.alert_rules, billing.alerts, billing.grant_policies, billing.granted_per_day,
                billing.grant_approvals
    TO billing_reader;
GRANT SELECT (id, tenant_id, name, scheme, previous_secret_expires_at, tolerance_seconds, signature_header,
              created_at)
    ON billing.webhook_endpoints TO billing_reader;
GRANT SELECT ON billing.tenant_roles TO billing_admin;
-- The plain-INSERT interface of the webhook inbox: these three columns only.
GRANT INSERT (endpoint, headers, body) ON billing.webhook_events TO billing_app;

-- ----- tenants ---------------------------------------------------------------

-- Checks a change of tenant grants and returns the role: the tenant must be
-- a valid name and the role an existing role named exactly `role` (no case
-- folding). Grants of roles that were dropped grant nothing already (roles are
-- kept by OID); each change of tenant grants also removes them.
CREATE FUNCTION billing.tenant_grant_role(tenant text, role name) RETURNS regrole
LANGUAGE plpgsql
SET search_path = pg_catalog, billing, pg_temp
AS $$
DECLARE id oid;
BEGIN
    IF tenant IS NULL OR role IS NULL THEN
        RAISE EXCEPTION 'tenant and role must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF tenant !~ '^[A-Za-z0-9_.:-]{1,63}$' THEN
        RAISE EXCEPTION 'invalid tenant "%"', left(tenant, 80) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT r.oid INTO id FROM pg_catalog.pg_roles r WHERE r.rolname = role;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown role "%"', role USING ERRCODE = 'undefined_object';
    END IF;
    DELETE FROM billing.tenant_roles r WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles x WHERE x.oid = r.role_id);
    RETURN id::regrole;
END
$$;

CREATE FUNCTION billing.grant_tenant(tenant text, role name) RETURNS void
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
    INSERT INTO billing.tenant_roles (tenant_id, role_id) VALUES (tenant, billing.tenant_grant_role(tenant, role))
    ON CONFLICT DO NOTHING
$$;

CREATE FUNCTION billing.revoke_tenant(tenant text, role name) RETURNS boolean
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, billing, pg_temp
AS $$
    WITH r AS (SELECT billing.tenant_grant_role(tenant, role) AS id),
         d AS (DELETE FROM billing.tenant_roles t USING r WHERE t.tenant_id = tenant AND t.role_id = r.id RETURNING 1)
    SELECT count(*) > 0 FROM d
$$;

-- ----- who may call what -----------------------------------------------------

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA billing FROM PUBLIC;
-- needed by every querying role: row-level security calls it
GRANT EXECUTE ON FUNCTION billing.current_tenant(), billing.currency_exponent(text),
    billing.grant_state(text, bigint, timestamptz, timestamptz, timestamptz) TO PUBLIC;
GRANT EXECUTE ON FUNCTION
    billing."check"(text, text, bigint, text, text),
    billing.limits_status(text, text, text),
    billing.balance(text, text, timestamptz),
    billing.usage(text, text, timestamptz, timestamptz, text, text[], text),
    billing.usage_log(text, text, bigint, integer),
    billing.invoice_preview(text, timestamptz, boolean),
    billing.simulate_price(text, text, jsonb, timestamptz),
    billing.usage_to_report(timestamptz, text, integer),
    billing.price_lines(jsonb, numeric),
    billing.price_total(jsonb, numeric),
    billing.verify_ledger(),
    billing.grant_entry_totals(bigint[]),
    billing.grant_remaining(billing.grants),
    billing.quote(bigint, text, text, boolean),
    billing.checkout_status(bigint),
    billing.reconcile_usage(text[], timestamptz, timestamptz, text, text),
    billing.reconcile_payments(jsonb, bigint),
    billing.verify_webhook(text, text, jsonb, text, text, integer, text),
    billing.allowance_periods(timestamptz, timestamptz),
    billing.subscription_access(text, boolean)
    TO billing_reader;
GRANT EXECUTE ON FUNCTION
    billing."grant"(text, text, bigint, text, integer, timestamptz, timestamptz, text, jsonb, text),
    billing.approve_grant(bigint),
    billing.reject_grant(bigint, text),
    billing.audit_costs(jsonb, numeric, bigint),
    billing.void_grant(bigint),
    billing.revoke_unused(bigint),
    billing.suspend_grant(bigint),
    billing.resume_grant(bigint),
    billing.reverse_grant(bigint, bigint),
    billing.ingest(text, text, numeric, text, timestamptz, jsonb, bigint, boolean),
    billing.ingest_batch(jsonb),
    billing.reserve(text, text, bigint, text, interval, jsonb),
    billing.settle(bigint, bigint, text, text, numeric, jsonb),
    billing.release(bigint),
    billing.account(text, text, jsonb),
    billing.receive_webhook(text, jsonb, text),
    billing.sync_subscription(jsonb, timestamptz, text, text),
    billing.sync_invoice(jsonb, timestamptz, text),
    billing.lock_seats(text),
    billing.set_seats(text, integer),
    billing.ack_seat_push(bigint, integer),
    billing.count_seats(),
    billing.set_allowance(text, text, bigint, text, text, integer, integer, timestamptz),
    billing.end_allowance(text, text),
    billing.set_limit(text, text, text, bigint, text, text, boolean),
    billing.remove_limit(text, text, text),
    billing.convert_guest(text, text),
    billing.mark_reported(text, text, timestamptz, numeric, text, boolean),
    billing.set_reload(text, text, bigint, text, text, bigint, bigint, bigint, bigint, interval, integer,
                       boolean, boolean, bigint, integer),
    billing.disable_reload(text, text),
    billing.resume_reload(text, text),
    billing.claim_reloads(text, interval, integer),
    billing.complete_reload(bigint, text, bigint, text),
    billing.fail_reload(bigint, text, boolean, text),
    billing.open_checkout(text, text, bigint, text, text, text, interval, boolean, bigint),
    billing.attach_checkout(bigint, text),
    billing.confirm_checkout(bigint, text, bigint, text),
    billing.fail_checkout(bigint, text),
    billing.set_alert(text, text, text, text, bigint),
    billing.remove_alert(text, text, text),
    billing.ack_alert(bigint, text)
    TO billing_app;
GRANT EXECUTE ON FUNCTION
    billing.define_unit(text, text),
    billing.define_meter(text, text, numeric, text, text, text, text[], jsonb, interval, text, interval, jsonb),
    billing.set_price(text, jsonb, timestamptz),
    billing.disable_meter(text),
    billing.enable_meter(text),
    billing.set_floor(text, text, bigint),
    billing.set_lanes(text, text, integer),
    billing.sweep(integer),
    billing.define_webhook_endpoint(text, text, text, integer, text, text, bigint, text),
    billing.map_webhook_currency(text, text, text, integer, bigint),
    billing.purge_webhook_events(interval, boolean),
    billing.rotate_webhook_secret(text, text, interval),
    billing.register_webhook_handler(text, regprocedure, text),
    billing.grant_tenant(text, name),
    billing.revoke_tenant(text, name),
    billing.define_plan(text, jsonb, jsonb, text, integer, bigint, integer),
    billing.run_periodic(integer),
    billing.retire_plan(text),
    billing.set_default_plan(text),
    billing.set_topup_fee(text, text, numeric, bigint),
    billing.set_topup_limits(text, bigint, bigint, numeric),
    billing.set_grant_policy(text, bigint, bigint, bigint, text),
    billing.remove_grant_policy(text),
    billing.metrics()
    TO billing_admin;
-- an operator's monitoring role (postgres_exporter's) reads the counters of every tenant
GRANT EXECUTE ON FUNCTION billing.metrics() TO pg_monitor;
GRANT EXECUTE ON FUNCTION
    billing."grant"(text, text, bigint, text, integer, timestamptz, timestamptz, text, jsonb, text),
    billing.approve_grant(bigint),
    billing.reject_grant(bigint, text)
    TO billing_support;
/* </end connected objects> */

