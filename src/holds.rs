//! Holds: reserve credit for work whose final cost is not known yet, then
//! settle the actual cost or release it. An open hold counts against
//! availability until it expires, with no job needed for the expiry.

use pgrx::datum::{Interval, TimestampWithTimeZone as Tstz};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{AnyNumeric, JsonB};
use rust_decimal::Decimal;
use serde_json::json;

use crate::db::{self, Row, Sql, BYTEA, INT8, JSONB, TEXT, TSTZ};
use crate::error::{BillingError, OrRaise, Result};
use crate::idempotency::{self, Fingerprint};
use crate::ingest::{self, Event, Outcome};
use crate::input::RESERVED_KEY_PREFIX;
use crate::input::{self, JsonArg};
use crate::ledger::{drains_json, Create, EntryKind, PoolLedger};
use crate::limits::{self, Limits};
use crate::metering::store::Metering;
use crate::pricing;
use crate::tenancy::current_tenant;
use crate::time::{self, Ts};

type HoldRow = (
    name!(hold_id, i64),
    name!(status, String),
    name!(amount, i64),
    name!(expires_at, Tstz),
    name!(available, i64),
);

static FIND_HOLD_BY_KEY: Sql = Sql {
    text: "SELECT id, request_hash, amount, expires_at, available_after FROM billing.holds \
           WHERE tenant_id = $1 AND key = $2",
    args: &[TEXT, TEXT],
};

static INSERT_HOLD: Sql = Sql {
    text: "INSERT INTO billing.holds (tenant_id, pool_id, account, unit, key, amount, expires_at, \
              request_hash, metadata, available_after) \
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
    args: &[TEXT, INT8, TEXT, TEXT, TEXT, INT8, TSTZ, BYTEA, JSONB, INT8],
};

fn ttl_micros(ttl: &Interval) -> Result<i64> {
    if ttl.months() != 0 {
        return Err(BillingError::invalid(
            "ttl",
            "must be given in days, hours, minutes or seconds",
        ));
    }
    let micros = ttl.days() as i64 * 86_400_000_000 + ttl.micros();
    if micros <= 0 || micros > input::MAX_HOLD_TTL_SECONDS * 1_000_000 {
        return Err(BillingError::invalid(
            "ttl",
            "must be positive and at most 30 days",
        ));
    }
    Ok(micros)
}

/// Reserve `amount` for up to `ttl`. Accepted only if the floor rule holds
/// with the reservation counted (docs/architecture.md, rule 6); otherwise nothing is written.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn reserve(
    account: Option<&str>,
    unit: Option<&str>,
    amount: Option<i64>,
    key: default!(Option<&str>, "NULL"),
    ttl: default!(Option<Interval>, "'15 minutes'"),
    metadata: default!(Option<JsonArg>, "'{}'"),
) -> TableIterator<
    'static,
    (
        name!(hold_id, i64),
        name!(status, String),
        name!(amount, i64),
        name!(expires_at, Tstz),
        name!(available, i64),
    ),
> {
    let result = (|| -> Result<HoldRow> {
        let account = input::required("account", account)?;
        let unit = input::required("unit", unit)?;
        let amount = input::required("amount", amount)?;
        input::account(account)?;
        input::name("unit", unit)?;
        input::positive("amount", amount)?;
        input::opt_key("key", key)?;
        let ttl = ttl_micros(&input::required("ttl", ttl)?)?;
        let metadata = input::required("metadata", metadata.as_ref())?.value("metadata")?;
        let meta = input::json_object("metadata", metadata)?;
        let hash = Fingerprint::new("reserve")
            .text(account)
            .text(unit)
            .int(amount)
            .int(ttl)
            .text(&meta)
            .finish();
        let tenant = current_tenant()?;
        Spi::connect_mut(|client| {
            let mut ledger = PoolLedger::open(client, &tenant, account, unit, Create::Pool)?;
            if let Some(key) = key {
                if let Some(row) = find_hold_by_key(client, &tenant, key, &hash)? {
                    return Ok(row);
                }
            }
            if !ledger.allows(amount) {
                return Err(ledger.insufficient(amount));
            }
            let member = limits::member_of(metadata);
            let mut limits = Limits::default();
            if ledger.limited {
                if let Some(reached) =
                    limits.blocking(client, ledger.id, member.as_deref(), amount, ledger.now)?
                {
                    return Err(reached);
                }
            }
            let expires_at = ledger.now + ttl;
            let available = ledger.available() - amount;
            let id: i64 = db::write(
                client,
                &INSERT_HOLD,
                &[
                    tenant.as_str().into(),
                    ledger.id.into(),
                    account.into(),
                    unit.into(),
                    key.into(),
                    amount.into(),
                    time::to_sql(expires_at).into(),
                    hash.into(),
                    JsonB(metadata.clone()).into(),
                    available.into(),
                ],
            )?
            .first()
            .get_one()?
            .ok_or_else(|| BillingError::Internal("hold insert returned no id".into()))?;
            if ledger.limited {
                // the reservation counts in its window's limits until it is settled or given back
                for (limit_id, window_start, member) in
                    limits.count(client, ledger.id, member.as_deref(), amount, ledger.now)?
                {
                    db::write(
                        client,
                        &COUNT_HOLD_IN_LIMIT,
                        &[
                            tenant.as_str().into(),
                            id.into(),
                            limit_id.into(),
                            time::to_sql(window_start).into(),
                            member.as_str().into(),
                            amount.into(),
                        ],
                    )?;
                }
                limits.save(client, &tenant)?;
            }
            ledger.open_hold(id, amount, expires_at)?;
            ledger.flush(client)?;
            Ok((
                id,
                "open".into(),
                amount,
                time::to_sql(expires_at),
                available,
            ))
        })
    })();
    TableIterator::once(result.or_raise())
}

fn find_hold_by_key(
    client: &mut SpiClient<'_>,
    tenant: &str,
    key: &str,
    hash: &[u8],
) -> Result<Option<HoldRow>> {
    let mut rows = db::write(client, &FIND_HOLD_BY_KEY, &[tenant.into(), key.into()])?;
    let Some(row) = rows.next() else {
        return Ok(None);
    };
    let row = Row(&row);
    let stored: Vec<u8> = row.get("request_hash")?;
    idempotency::same_request("hold", key, &stored, hash)?;
    Ok(Some((
        row.get("id")?,
        "duplicate".into(),
        row.get("amount")?,
        row.get("expires_at")?,
        row.get("available_after")?,
    )))
}

// ----- settle and release ----------------------------------------------------

static FIND_HOLD: Sql = Sql {
    text: "SELECT account, unit FROM billing.holds WHERE id = $1 AND tenant_id = $2",
    args: &[INT8, TEXT],
};

/// Read after the pool lock, so the status is the committed one.
static HOLD_STATE: Sql = Sql {
    text: "SELECT status, amount, expires_at, settle_hash, settle_result, metadata \
           FROM billing.holds WHERE id = $1",
    args: &[INT8],
};

static SETTLE_HOLD: Sql = Sql {
    text: "UPDATE billing.holds SET status = 'settled', closed_at = now(), settled_amount = $2, \
              settle_key = $3, settle_result = $4, settle_hash = $5 WHERE id = $1",
    args: &[INT8, INT8, TEXT, JSONB, BYTEA],
};

/// A released hold is closed and gives back what it counted in its pool's limits.
static RELEASE_HOLD: Sql = Sql {
    text: "WITH released AS (UPDATE billing.holds SET status = 'released', closed_at = now() \
                             WHERE id = $1 RETURNING id) \
           SELECT billing.give_back_limits(array_agg(id)) FROM released",
    args: &[INT8],
};

static COUNT_HOLD_IN_LIMIT: Sql = Sql {
    text: "INSERT INTO billing.limit_holds (tenant_id, hold_id, limit_id, window_start, member, amount) \
           VALUES ($1, $2, $3, $4, $5, $6)",
    args: &[TEXT, INT8, INT8, TSTZ, TEXT, INT8],
};

static SETTLE_LIMITS: Sql = Sql {
    text: "SELECT billing.settle_limits($1, $2) AS counted",
    args: &[INT8, INT8],
};

struct HoldState {
    status: String,
    amount: i64,
    expires_at: Ts,
    settle_hash: Option<Vec<u8>>,
    settle_result: Option<JsonB>,
    metadata: JsonB,
}

/// Lock the hold's pool and read the hold's committed state.
fn open_hold(client: &mut SpiClient<'_>, hold_id: i64) -> Result<(PoolLedger, HoldState)> {
    let tenant = current_tenant()?;
    let ledger = PoolLedger::open_owner_of(client, &tenant, &FIND_HOLD, hold_id, "hold")?;
    let row = db::write(client, &HOLD_STATE, &[hold_id.into()])?
        .next()
        .ok_or_else(|| BillingError::Internal("hold vanished under the pool lock".into()))?;
    let row = Row(&row);
    let expires_at: Tstz = row.get("expires_at")?;
    let mut state = HoldState {
        status: row.get("status")?,
        amount: row.get("amount")?,
        expires_at: expires_at.into(),
        settle_hash: row.opt("settle_hash")?,
        settle_result: row.opt("settle_result")?,
        metadata: row.get("metadata")?,
    };
    if state.status == "open" && state.expires_at <= ledger.now {
        // the ledger recorded its expiry when it caught up
        state.status = "expired".into();
    }
    Ok((ledger, state))
}

type SettleRow = (
    name!(hold_id, i64),
    name!(status, String),
    name!(held, i64),
    name!(actual, i64),
    name!(covered, i64),
    name!(debt_created, i64),
    name!(drains, JsonB),
    name!(available, i64),
    name!(entitled, bool),
    name!(event_id, Option<i64>),
);

fn settle_row(hold_id: i64, status: &str, r: &serde_json::Value) -> SettleRow {
    let int = |k: &str| r.get(k).and_then(|v| v.as_i64()).unwrap_or(0);
    (
        hold_id,
        status.into(),
        int("held"),
        int("actual"),
        int("covered"),
        int("debt_created"),
        JsonB(r.get("drains").cloned().unwrap_or(json!([]))),
        int("available"),
        r.get("entitled").and_then(|v| v.as_bool()).unwrap_or(false),
        r.get("event_id").and_then(|v| v.as_i64()),
    )
}

/// Charge the actual cost of held work and close the hold. The actual cost is
/// recorded even above the estimate or after expiry (docs/architecture.md, rule 7): what the
/// pool cannot cover becomes debt. The settlement is also recorded as a usage
/// event (key `billing:hold:<id>`): of `meter` and `quantity` when given,
/// else of the hold's unit with the actual cost as its quantity, with
/// `properties` (default: the hold's metadata). Settling again with the same
/// arguments returns the first outcome.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn settle(
    hold_id: Option<i64>,
    actual: Option<i64>,
    key: default!(Option<&str>, "NULL"),
    meter: default!(Option<&str>, "NULL"),
    quantity: default!(Option<AnyNumeric>, "NULL"),
    properties: default!(Option<JsonArg>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(hold_id, i64),
        name!(status, String),
        name!(held, i64),
        name!(actual, i64),
        name!(covered, i64),
        name!(debt_created, i64),
        name!(drains, JsonB),
        name!(available, i64),
        name!(entitled, bool),
        name!(event_id, Option<i64>),
    ),
> {
    let result = (|| -> Result<SettleRow> {
        let hold_id = input::required("hold_id", hold_id)?;
        let actual = input::required("actual", actual)?;
        input::non_negative("actual", actual)?;
        input::opt_key("key", key)?;
        if let Some(m) = meter {
            input::name("meter", m)?;
        }
        let quantity = match (meter, &quantity) {
            (_, Some(q)) => Some(pricing::decimal("quantity", q)?),
            (Some(_), None) => return Err(BillingError::NullArgument("quantity (with a meter)")),
            (None, None) => None,
        };
        if quantity.is_some_and(|q| q.is_sign_negative()) {
            return Err(BillingError::invalid("quantity", "must not be negative"));
        }
        let properties = properties
            .as_ref()
            .map(|p| {
                p.value("properties")
                    .and_then(|v| input::json_object("properties", v))
            })
            .transpose()?;
        let tenant = current_tenant()?;
        Spi::connect_mut(|client| {
            let (mut ledger, hold) = open_hold(client, hold_id)?;
            let usage = Event {
                account: ledger.account.clone(),
                meter: meter.unwrap_or(&ledger.unit).to_string(),
                quantity: quantity.unwrap_or_else(|| Decimal::from(actual)),
                key: format!("{RESERVED_KEY_PREFIX}hold:{hold_id}"),
                occurred_at: None,
                properties_text: match properties {
                    Some(p) => p,
                    None => hold.metadata.0.to_string(),
                },
                cost: Some(actual),
                strict: false,
            };
            let hash = Fingerprint::new("settle")
                .int(actual)
                .text(key.unwrap_or(""))
                .text(&usage.meter)
                .text(&usage.quantity.normalize().to_string())
                .text(&usage.properties_text)
                .finish();
            match hold.status.as_str() {
                "settled" => return replay_settle(hold_id, key, &hash, &hold),
                "released" => {
                    return Err(BillingError::WrongState(format!(
                        "hold {hold_id} was released; ingest the usage instead"
                    )))
                }
                _ => {}
            }
            let metered = pricing::find_meter(client, &tenant, &usage.meter)?;
            if metered.unit != ledger.unit {
                return Err(BillingError::invalid(
                    "meter",
                    format!(
                        "\"{}\" does not charge {}, the hold's unit",
                        usage.meter, ledger.unit
                    ),
                ));
            }
            let mut metering = Metering::new(&tenant);
            metering.know_pool(&ledger);
            let (counted, charging) = usage.metered(&metered, &ledger, true)?;
            let prepared = metering.prepare(&metered, &counted, charging)?;
            let member = counted.member.clone();
            if hold.status == "open" {
                ledger.close_hold(hold_id, hold.amount, EntryKind::Settle, true);
            }
            let event_id = ingest::allocate_event_id()?;
            ledger.current_hold = Some(hold_id);
            ledger.current_event = Some(event_id);
            let debit = ledger.debit(actual)?;
            let outcome = Outcome {
                key: usage.key.clone(),
                event_id: Some(event_id),
                status: "applied",
                meter: usage.meter.clone(),
                unit: ledger.unit.clone(),
                cost: actual,
                covered: debit.covered,
                debt_created: debit.uncovered,
                drains: drains_json(&debit.drains),
                available: ledger.available(),
                entitled: ledger.entitled(),
            };
            let result = json!({
                "held": hold.amount,
                "actual": actual,
                "covered": debit.covered,
                "debt_created": debit.uncovered,
                "drains": outcome.drains,
                "available": outcome.available,
                "entitled": outcome.entitled,
                "event_id": event_id,
            });
            metering.commit(&metered, prepared, ledger.now)?;
            let now = ledger.now;
            metering.keep_counters(std::slice::from_mut(&mut ledger), now);
            metering.save()?;
            // the actual cost replaces what the reservation counted in its limits
            let counted: i64 = db::write(client, &SETTLE_LIMITS, &[hold_id.into(), actual.into()])?
                .next()
                .map(|r| Row(&r).get::<i64>("counted"))
                .transpose()?
                .unwrap_or(0);
            if ledger.limited && counted == 0 {
                let mut limits = Limits::default();
                limits.count(client, ledger.id, member.as_deref(), actual, ledger.now)?;
                limits.save(client, &tenant)?;
            }
            ingest::flush_with_usage(client, &mut ledger, event_id, usage, outcome)?;
            db::write(
                client,
                &SETTLE_HOLD,
                &[
                    hold_id.into(),
                    actual.into(),
                    key.into(),
                    JsonB(result.clone()).into(),
                    hash.into(),
                ],
            )?;
            Ok(settle_row(hold_id, "settled", &result))
        })
    })();
    TableIterator::once(result.or_raise())
}

/// A settled hold settled again: the first outcome for the same arguments.
fn replay_settle(
    hold_id: i64,
    key: Option<&str>,
    hash: &[u8],
    hold: &HoldState,
) -> Result<SettleRow> {
    idempotency::same_request(
        "settlement of hold",
        &key.map_or_else(|| hold_id.to_string(), str::to_string),
        hold.settle_hash.as_deref().unwrap_or_default(),
        hash,
    )?;
    let result = hold
        .settle_result
        .as_ref()
        .map(|j| j.0.clone())
        .unwrap_or(json!({}));
    Ok(settle_row(hold_id, "duplicate", &result))
}

type ReleaseRow = (
    name!(hold_id, i64),
    name!(status, String),
    name!(released, i64),
    name!(available, i64),
);

/// Give a hold's reservation back without charging anything.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn release(
    hold_id: Option<i64>,
) -> TableIterator<
    'static,
    (
        name!(hold_id, i64),
        name!(status, String),
        name!(released, i64),
        name!(available, i64),
    ),
> {
    let result = input::required("hold_id", hold_id).and_then(|hold_id| {
        Spi::connect_mut(|client| -> Result<ReleaseRow> {
            let (mut ledger, hold) = open_hold(client, hold_id)?;
            match hold.status.as_str() {
                "open" => {
                    ledger.close_hold(hold_id, hold.amount, EntryKind::Release, true);
                    let available = ledger.available();
                    ledger.flush(client)?;
                    db::write(client, &RELEASE_HOLD, &[hold_id.into()])?;
                    Ok((hold_id, "released".into(), hold.amount, available))
                }
                "released" => Ok((hold_id, "duplicate".into(), 0, ledger.available())),
                "expired" => {
                    // Expiry already returned the credit; record it if the ledger caught up now.
                    let available = ledger.available();
                    ledger.flush(client)?;
                    Ok((hold_id, "expired".into(), 0, available))
                }
                _ => Err(BillingError::WrongState(format!(
                    "hold {hold_id} was settled; it cannot be released"
                ))),
            }
        })
    });
    TableIterator::once(result.or_raise())
}
