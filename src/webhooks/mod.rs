//! The SQL face of webhook verification, the running of handlers, and the
//! Stripe top-up projection (`topup`). The inbox, deduplication, ordering
//! and the other handlers live in sql/webhooks.sql.

pub mod intake;
mod topup;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::datum::{DatumWithOid, TimestampWithTimeZone as Tstz};
use pgrx::pg_sys::{self, PgOid};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::AllocatedByRust;

use crate::db::{self, Row, Sql, OID};
use crate::error::{BillingError, OrRaise, Result};
use crate::input::{self, JsonArg};
use crate::rights::RunAs;
use crate::signatures::{self, Endpoint, Headers, Scheme};
use crate::tenancy;
use crate::time;

/// Seconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_UNIX: i64 = 946_684_800;

fn now_unix() -> i64 {
    time::now().div_euclid(1_000_000) + PG_EPOCH_UNIX
}

fn unix_to_sql(secs: i64) -> Option<Tstz> {
    let micros = (secs - PG_EPOCH_UNIX).checked_mul(1_000_000)?;
    Tstz::try_from(micros).ok()
}

/// Verify one delivery against an endpoint's secrets at the database's now().
/// Never raises for a bad delivery: `valid` is false and `reason` says why.
#[allow(clippy::too_many_arguments)]
#[pg_extern(stable, parallel_safe)]
#[search_path(pg_catalog, billing, pg_temp)]
fn verify_webhook(
    scheme: Option<&str>,
    secret: Option<&str>,
    headers: Option<JsonArg>,
    body: Option<&str>,
    previous_secret: default!(Option<&str>, "NULL"),
    tolerance_seconds: default!(Option<i32>, "300"),
    signature_header: default!(Option<&str>, "'x-signature'"),
) -> TableIterator<
    'static,
    (
        name!(valid, bool),
        name!(reason, Option<String>),
        name!(event_id, Option<String>),
        name!(signed_at, Option<Tstz>),
    ),
> {
    let required = (|| {
        Ok::<_, BillingError>((
            input::required("scheme", scheme)?,
            input::required("secret", secret)?,
            input::required("headers", headers)?,
            input::required("body", body)?,
            input::required("tolerance_seconds", tolerance_seconds)?,
            input::required("signature_header", signature_header)?,
        ))
    })();
    let (scheme, secret, headers, body, tolerance_seconds, signature_header) = required.or_raise();
    let result = (|| {
        let scheme = Scheme::parse(scheme)
            .ok_or_else(|| signatures::Rejection::BadSecret(format!("unknown scheme {scheme}")))?;
        let endpoint = Endpoint {
            scheme,
            secret,
            previous_secret,
            tolerance_seconds: tolerance_seconds.max(0) as i64,
            signature_header,
        };
        let headers = headers
            .value("headers")
            .map_err(|e| signatures::Rejection::Malformed(e.to_string()))?;
        verify_now(&endpoint, headers, body)
    })();
    TableIterator::once(match result {
        Ok(v) => (true, None, v.event_id, unix_to_sql(v.signed_at)),
        Err(r) => (false, Some(r.reason()), None, None),
    })
}

/// Verify a delivery to `endpoint` at the database's now().
fn verify_now(
    endpoint: &Endpoint<'_>,
    headers: &serde_json::Value,
    body: &str,
) -> std::result::Result<signatures::Verified, signatures::Rejection> {
    let headers = Headers::from_json(headers)?;
    signatures::verify(endpoint, &headers, body, now_unix())
}

// ----- running an application's handler ----------------------------------------

/// Who owns a handler, its qualified name, and whether it lives in a temporary
/// schema (which another session's owner could have put there).
static HANDLER_INFO: Sql = Sql {
    text: "SELECT p.proowner AS owner, \
                  pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(p.proname) AS name, \
                  (p.pronamespace = pg_catalog.pg_my_temp_schema() \
                    OR pg_catalog.pg_is_other_temp_schema(p.pronamespace)) AS temporary \
           FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
           WHERE p.oid = $1",
    args: &[OID],
};

/// Call a registered webhook handler on a verified event, with the rights of
/// the handler's owner and never more: as that role, in a restricted
/// operation, and with every billing call and row-level-security check held to
/// the event's tenant, which the owner must be allowed to act for. The intake
/// calls it; no other role may.
#[pg_extern(requires = ["webhooks"])]
#[search_path(pg_catalog, billing, pg_temp)]
fn run_webhook_handler(
    handler: Option<pg_sys::Oid>,
    event: Option<pgrx::composite_type!("billing.webhook_events")>,
) -> Option<pgrx::JsonB> {
    (|| -> Result<Option<pgrx::JsonB>> {
        let handler = input::required("handler", handler)?;
        let event = input::required("event", event)?;
        let tenant: String = event
            .get_by_name("tenant_id")
            .map_err(|e| BillingError::Internal(format!("event row: {e}")))?
            .ok_or_else(|| BillingError::Internal("event without tenant".into()))?;
        run_handler(handler, &tenant, event)
    })()
    .or_raise()
}

/// Run `handler` on `event`, an event of `tenant`, as `run_webhook_handler` says.
pub fn run_handler(
    handler: pg_sys::Oid,
    tenant: &str,
    event: PgHeapTuple<'_, AllocatedByRust>,
) -> Result<Option<pgrx::JsonB>> {
    let info = handler_info(handler)?;
    if info.temporary {
        return Err(temporary_handler(&info.name));
    }
    let _tenant = tenancy::pin_tenant(tenant, info.owner)?;
    let _owner = RunAs::restricted(info.owner);
    // the built-in top-up projection is this library's: called, not queried
    if handler == intake::builtin_oid(topup::TOPUP_SIGNATURE)? {
        return topup::credit_topup(event);
    }
    let type_oid = event
        .composite_type_oid()
        .ok_or_else(|| BillingError::Internal("event row has no type".into()))?;
    Spi::connect_mut(|c| -> Result<Option<pgrx::JsonB>> {
        let call = handler_call(c, handler, &info.name, type_oid)?;
        // SAFETY: the datum is the composite the statement's $1 is declared as.
        let arg = unsafe { DatumWithOid::new(event, type_oid) };
        Ok(c.update(&*call, Some(1), &[arg])?
            .first()
            .get_one::<pgrx::JsonB>()?)
    })
}

/// Who owns a handler, its qualified name, and whether it lives in a
/// temporary schema.
#[derive(Clone)]
struct HandlerInfo {
    owner: pg_sys::Oid,
    name: String,
    temporary: bool,
}

thread_local! {
    /// What `HANDLER_INFO` said of each handler, until a function or schema changes.
    static HANDLERS: RefCell<HashMap<u32, HandlerInfo>> = RefCell::new(HashMap::new());
}

fn handler_info(handler: pg_sys::Oid) -> Result<HandlerInfo> {
    if let Some(info) = HANDLERS.with(|h| h.borrow().get(&handler.to_u32()).cloned()) {
        return Ok(info);
    }
    let info = Spi::connect(|c| -> Result<HandlerInfo> {
        let mut rows = db::read(c, &HANDLER_INFO, &[handler.into()])?;
        let row = rows.next().ok_or_else(|| {
            BillingError::unknown("webhook handler", handler.to_u32().to_string())
        })?;
        let row = Row(&row);
        Ok(HandlerInfo {
            owner: row.get("owner")?,
            name: row.get("name")?,
            temporary: row.get("temporary")?,
        })
    })?;
    HANDLERS.with(|h| h.borrow_mut().insert(handler.to_u32(), info.clone()));
    Ok(info)
}

/// Forget what was learnt of functions when any function or schema changes
/// (from `_PG_init`): a handler renamed, moved or given to another owner,
/// or the extension's own functions made again by an upgrade.
pub fn watch_function_changes() {
    // SAFETY: called from _PG_init; the callback only empties thread-local state.
    unsafe {
        for cache in [
            pg_sys::SysCacheIdentifier::PROCOID,
            pg_sys::SysCacheIdentifier::NAMESPACEOID,
        ] {
            pg_sys::CacheRegisterSyscacheCallback(
                cache as i32,
                Some(forget_functions),
                pg_sys::Datum::from(0),
            );
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_functions(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    HANDLERS.with(|h| h.borrow_mut().clear());
    intake::forget_builtins();
}

thread_local! {
    /// The call of each handler, planned once per backend; PostgreSQL replans
    /// it when the function or what it reads changes. Keyed by OID and name,
    /// as the plan's text names the function (a renamed handler is planned anew).
    static HANDLER_CALLS: RefCell<HashMap<(u32, String), Rc<OwnedPreparedStatement>>> =
        RefCell::new(HashMap::new());
}

fn handler_call(
    client: &mut SpiClient<'_>,
    handler: pg_sys::Oid,
    name: &str,
    event_type: pg_sys::Oid,
) -> Result<Rc<OwnedPreparedStatement>> {
    let key = (handler.to_u32(), name.to_string());
    if let Some(call) = HANDLER_CALLS.with(|c| c.borrow().get(&key).cloned()) {
        return Ok(call);
    }
    let sql = format!("SELECT {name}($1)");
    let call = Rc::new(client.prepare_mut(&sql, &[PgOid::from(event_type)])?.keep());
    HANDLER_CALLS.with(|c| c.borrow_mut().insert(key, call.clone()));
    Ok(call)
}

/// A handler in a temporary schema would run code another session planted.
fn temporary_handler(name: &str) -> BillingError {
    BillingError::invalid(
        "handler",
        format!("{name} is a temporary (pg_temp) function; a webhook handler must be a permanent function"),
    )
}
