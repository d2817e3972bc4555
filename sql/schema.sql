-- pg_billing schema: accounts, units, meters, pools, grants, usage events, holds
-- and the append-only ledger. Every table carries tenant_id and is protected by
-- row-level security; the billing.* functions are the only writers.
--
-- The tables written on every usage event (pools, grants, usage_events,
-- ledger_entries) carry no CHECK constraints: PostgreSQL re-reads and plans
-- each CHECK expression on every statement, which cost more than a tenth of an
-- ingest. Nor do usage_events and ledger_entries carry a foreign key to their
-- pool: each row's check was a query of its own, under the pool lock the row's
-- writer already holds. Their rules are enforced where the rows are computed
-- (the ledger core, src/ledger/core.rs) and every one of them is checked by
-- billing.verify_ledger(); pools and grants leave room on each page so the
-- update of every event stays a HOT update (no index entry written). A ledger
-- entry is identified by (pool_id, version); its id is unique but not indexed.
-- A usage event paid in full by one grant carries its own ledger entry (see
-- usage_events); billing.ledger reads both.

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

CREATE TABLE billing.accounts (
    tenant_id  text        NOT NULL,
    account    text        NOT NULL,
    name       text,
    metadata   jsonb       NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, account)
);

-- What a pool counts: money in minor units or an allowance.
CREATE TABLE billing.units (
    tenant_id   text        NOT NULL,
    unit        text        NOT NULL,
    description text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, unit)
);

-- How usage of one kind is measured: the unit it charges, how its events
-- aggregate per period (sum, count, max, last, or the count of distinct
-- values of one property), the properties its counters roll up by, the
-- properties its events must carry, and how late or early an event may say
-- it occurred. Its prices are versions in billing.meter_prices. A disabled
-- meter (a retired model) refuses new usage and keeps its history.
-- Columns added since 0.1.0 come after 0.1.0's, in every table an upgrade
-- alters (sql/pg_billing--0.1.0--0.2.0.sql appends them): a fresh install
-- and an upgraded one have the same columns in the same order.
CREATE TABLE billing.meters (
    tenant_id   text        NOT NULL,
    meter       text        NOT NULL,
    unit        text        NOT NULL,
    description text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    aggregation text        NOT NULL DEFAULT 'sum'
                CHECK (aggregation IN ('sum', 'count', 'max', 'last', 'unique_count')),
    -- unique_count: the property whose distinct values are counted
    property    text,
    group_by    text[]      NOT NULL DEFAULT '{}',
    filter      jsonb,
    lateness    interval    NOT NULL DEFAULT '48 hours',
    -- an event older than its lateness: 'reject', or 'current_period' (booked now)
    late_events text        NOT NULL DEFAULT 'reject' CHECK (late_events IN ('reject', 'current_period')),
    future_skew interval    NOT NULL DEFAULT '5 minutes',
    disabled_at timestamptz,
    PRIMARY KEY (tenant_id, meter),
    FOREIGN KEY (tenant_id, unit) REFERENCES billing.units (tenant_id, unit),
    CHECK ((aggregation = 'unique_count') = (property IS NOT NULL))
);

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

-- One pool per account and unit. remaining/debt/held are the booked totals
-- (they always equal what the ledger sums to). active_remaining/active_held
-- are the spendable figures as of cache_from, valid until cache_until, the
-- next instant at which a grant or hold changes state by the clock alone; the
-- gate answers from them with one row read and recomputes outside the window.
--
-- A hot pool may be split (billing.set_lanes): lane 0 is the pool, and
-- lanes 1..n are rows of their own, each holding a share of the first grant
-- in drain order, that concurrent debits take in parallel (see
-- docs/architecture.md, "Split pools"). Readers sum a pool over its lanes.
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

CREATE TABLE billing.grants (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    text        NOT NULL,
    -- no foreign key: a grant is written under its pool's row lock, pools
    -- are never deleted, and verify_ledger() reports a grant whose pool is
    -- missing (the key's check was a statement of its own on every grant)
    pool_id      bigint      NOT NULL,
    account      text        NOT NULL,
    unit         text        NOT NULL,
    kind         text        NOT NULL,
    priority     integer     NOT NULL,
    amount       bigint      NOT NULL,
    remaining    bigint      NOT NULL,
    effective_at timestamptz NOT NULL,
    expires_at   timestamptz,
    status       text        NOT NULL DEFAULT 'active',
    closed_at    timestamptz,
    key          text,
    request_hash bytea       NOT NULL,
    metadata     jsonb       NOT NULL DEFAULT '{}',
    -- the outcome returned to the first call, and to every replay of its key
    debt_repaid     bigint   NOT NULL DEFAULT 0,
    available_after bigint   NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- a lane's share of grant parent_id (same kind, priority and window;
    -- amount is the parent's, credit arrives by transfer entries)
    parent_id    bigint,
    -- who gave it through billing.grant (the session's role after any SET
    -- ROLE) and why (sql/grant_controls.sql); NULL for credit the extension
    -- grants itself (allowance windows, a guest's credit moved)
    granted_by   regrole,
    reason       text,
    -- whether its row's remaining is 0: set with every write of remaining
    -- (src/ledger, set_grant_remaining), so the drain-order index leaves out
    -- a used-up grant and a debit does not read every grant an account ever had
    exhausted    boolean     NOT NULL DEFAULT false,
    UNIQUE (tenant_id, key)
) WITH (fillfactor = 70);
-- The drain reads a pool's open grants in drain order: active ones not used
-- up. The predicate is on status and exhausted, not on remaining, so a write
-- of remaining that leaves the grant with credit is a HOT update that writes
-- no index entry; only the write that uses it up (or gives credit back to it)
-- moves it out of (or into) this index.
CREATE INDEX grants_drain_order ON billing.grants
    (pool_id, priority, expires_at NULLS LAST, id) WHERE status = 'active' AND NOT exhausted;
CREATE INDEX grants_by_account ON billing.grants (tenant_id, account, unit);
-- Every grant of a pool, whatever its state: balance and its history, the
-- plan windows a subscription replaces, verify_ledger. (The drain-order index
-- holds active grants only; without this one those reads scan every grant of
-- every tenant.) A debit changes no indexed column, so it stays a HOT update.
CREATE INDEX grants_by_pool ON billing.grants (pool_id);
CREATE UNIQUE INDEX grants_lane_share ON billing.grants (parent_id, pool_id) WHERE parent_id IS NOT NULL;

-- What grant `g` has left: its row's remaining, less what its pool's row
-- has drawn from it since (pools.drawn_grant). Every reader of a grant's
-- remaining outside the ledger's own lock reads it here.
CREATE FUNCTION billing.grant_remaining(g billing.grants) RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT g.remaining - coalesce((SELECT p.drawn FROM billing.pools p
                                      WHERE p.id = g.pool_id AND p.drawn_grant = g.id), 0) $$;

-- Keyed by (tenant_id, key); the id is unique (taken from its sequence by
-- the one writer) but not indexed: nothing looks an event up by id on a path
-- that needs an index, and every event would pay for its entry.
CREATE TABLE billing.usage_events (
    id              bigint      GENERATED ALWAYS AS IDENTITY,
    tenant_id       text        NOT NULL,
    key             text        NOT NULL,
    account         text        NOT NULL,
    meter           text        NOT NULL,
    unit            text        NOT NULL,
    pool_id         bigint      NOT NULL,
    quantity        numeric     NOT NULL,
    cost            bigint      NOT NULL,
    covered         bigint      NOT NULL,
    debt_created    bigint      NOT NULL,
    strict          boolean     NOT NULL,
    -- the grants that paid it; NULL when it carries its debit (below)
    drains          jsonb,
    available_after bigint      NOT NULL,
    entitled_after  boolean     NOT NULL,
    occurred_at     timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    properties      jsonb       NOT NULL DEFAULT '{}',
    request_hash    bytea       NOT NULL,
    -- the meter's price version that charged it (NULL: the caller's cost)
    price_version   integer,
    -- when the counters count it, if not when it occurred (a late event
    -- booked to the current period)
    booked_at       timestamptz,
    -- A debit that one grant paid in full (most usage) is its own ledger
    -- entry: the entry's columns are kept here instead of in a row of
    -- ledger_entries, so such an event writes one row and one index entry
    -- fewer. NULL when the event's entries are rows of ledger_entries. The
    -- entry is of kind 'debit' with amount = grant_amount = -covered and no
    -- debt or hold moved; billing.ledger shows both kinds of entries as one.
    entry_version   bigint,
    entry_grant     bigint,
    balance_after   bigint,
    debt_after      bigint,
    held_after      bigint,
    entry_at        timestamptz,
    UNIQUE (tenant_id, key)
);
-- Reports read the hourly counters (billing.usage_counters), so events need
-- no index by account, meter and time; the per-call usage log pages through
-- a pool's events newest first by this small one.
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
-- events. Maintained with every event under its pool's lock, so each key
-- has one row however the first events of an account race; quantity
-- aggregates as the meter says (unique_count: values first seen in the
-- period during that hour, so hours add up to the period). revised_at: the
-- last time an event arrived after the hour had ended (a late event).
-- Reports find an account's counters through its pools, by this key: a
-- second index would cost every account's first event of each hour.
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

CREATE TABLE billing.holds (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id      text        NOT NULL,
    pool_id        bigint      NOT NULL REFERENCES billing.pools (id),
    account        text        NOT NULL,
    unit           text        NOT NULL,
    key            text,
    amount         bigint      NOT NULL CHECK (amount > 0),
    status         text        NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'settled', 'released', 'expired')),
    expires_at     timestamptz NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    closed_at      timestamptz,
    settled_amount bigint      CHECK (settled_amount >= 0),
    settle_key     text,
    settle_hash    bytea,
    settle_result  jsonb,
    request_hash   bytea       NOT NULL,
    metadata       jsonb       NOT NULL DEFAULT '{}',
    available_after bigint     NOT NULL,
    UNIQUE (tenant_id, key),
    UNIQUE (tenant_id, settle_key)
);
CREATE INDEX holds_open ON billing.holds (pool_id, expires_at) WHERE status = 'open';

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

-- The append-only ledger. One row per change of a pool; version is the pool's
-- version after the entry, and the chain balance_before + amount = balance_after
-- runs over the net booked balance (Σ remaining of grants − debt).
-- amount = grant_amount − debt_amount; hold_amount moves the held total.
CREATE TABLE billing.ledger_entries (
    id             bigint      GENERATED ALWAYS AS IDENTITY,
    tenant_id      text        NOT NULL,
    pool_id        bigint      NOT NULL,
    account        text        NOT NULL,
    unit           text        NOT NULL,
    version        bigint      NOT NULL,
    kind           billing.entry_kind NOT NULL,
    amount         bigint      NOT NULL,
    grant_amount   bigint      NOT NULL DEFAULT 0,
    debt_amount    bigint      NOT NULL DEFAULT 0,
    hold_amount    bigint      NOT NULL DEFAULT 0,
    balance_before bigint      NOT NULL,
    balance_after  bigint      NOT NULL,
    debt_after     bigint      NOT NULL,
    held_after     bigint      NOT NULL,
    -- Written by the same call, in the same transaction, as the grant, hold or
    -- event they name; billing.verify_ledger() checks the link instead of a
    -- foreign key, which would cost a lookup per entry on the hot path.
    grant_id       bigint,
    hold_id        bigint,
    event_id       bigint,
    effective_at   timestamptz NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (pool_id, version)
);
CREATE INDEX ledger_entries_by_grant ON billing.ledger_entries (grant_id) WHERE grant_id IS NOT NULL;
CREATE INDEX ledger_entries_by_hold ON billing.ledger_entries (hold_id) WHERE hold_id IS NOT NULL;

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

-- Billing data must survive pg_dump/pg_restore of the database.
SELECT pg_catalog.pg_extension_config_dump('billing.accounts', '');
SELECT pg_catalog.pg_extension_config_dump('billing.units', '');
SELECT pg_catalog.pg_extension_config_dump('billing.meters', '');
SELECT pg_catalog.pg_extension_config_dump('billing.pools', '');
SELECT pg_catalog.pg_extension_config_dump('billing.grants', '');
SELECT pg_catalog.pg_extension_config_dump('billing.usage_events', '');
SELECT pg_catalog.pg_extension_config_dump('billing.holds', '');
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
SELECT pg_catalog.pg_extension_config_dump('billing.ledger_entries', '');
SELECT pg_catalog.pg_extension_config_dump('billing.topup_fees', '');
SELECT pg_catalog.pg_extension_config_dump('billing.topup_limits', '');
SELECT pg_catalog.pg_extension_config_dump('billing.reload_rules', '');
SELECT pg_catalog.pg_extension_config_dump('billing.reload_requests', '');
SELECT pg_catalog.pg_extension_config_dump('billing.checkout_intents', '');
SELECT pg_catalog.pg_extension_config_dump('billing.alert_rules', '');
SELECT pg_catalog.pg_extension_config_dump('billing.alerts', '');
-- and so must the identity sequences, or restored ids would be handed out again
-- (one call per statement: each call rewrites the extension's catalog row)
SELECT pg_catalog.pg_extension_config_dump('billing.pools_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.grants_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.usage_events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.holds_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.ledger_entries_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.meter_periods_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.allowances_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.limits_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.usage_counters_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.reload_requests_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.checkout_intents_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.alert_rules_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.alerts_id_seq', '');

-- Which roles may act for which tenant (see src/tenancy.rs). Managed by
-- billing_admin through billing.grant_tenant / billing.revoke_tenant. A role
-- is kept by OID (regrole), so renaming it keeps its tenants, and a role
-- created later under a dropped role's name inherits nothing; a dump writes
-- role names, and a restore resolves them in the target cluster.
CREATE TABLE billing.tenant_roles (
    tenant_id  text        NOT NULL CHECK (tenant_id ~ '^[A-Za-z0-9_.:-]{1,63}$'),
    role_id    regrole     NOT NULL,
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, role_id)
);
SELECT pg_catalog.pg_extension_config_dump('billing.tenant_roles', '');
