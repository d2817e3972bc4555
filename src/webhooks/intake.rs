//! The intake of one delivery: verify, parse, deduplicate, order and apply.
//! The inbox's BEFORE INSERT trigger (sql/webhooks.sql) calls
//! `billing.webhook_intake_decide` on each new row and stores what it
//! returns: the row with its status and reason. Never raises for what a
//! sender controls.
//!
//! Reads go straight to the indexes (`crate::direct`); the lock on the object
//! and the handler's work are statements. The JSON operators are
//! PostgreSQL's own, called on the stored `jsonb`, so a field reads exactly
//! as `->>` reads it.

use std::cell::RefCell;
use std::ffi::{CStr, CString};

use pgrx::datum::TimestampWithTimeZone as Tstz;
use pgrx::prelude::*;
use pgrx::{AllocatedByRust, IntoDatum, PgTupleDesc};
use rustc_hash::FxHashMap;

use crate::db::{self, Sql, INT8, TEXT, TSTZ};
use crate::direct::{self, Key, RowAt, Snapshot, Writer};
use crate::error::{BillingError, OrRaise, Result};
use crate::input::{json_text_value, JsonArg};
use crate::signatures::{Endpoint, Rejection, Scheme};
use crate::tenancy::current_tenant;
use crate::time;

/// A delivery's body and headers beyond these are refused unread, so an
/// unauthenticated sender cannot make the database parse or keep them.
const MAX_BODY_BYTES: usize = 1024 * 1024;
const MAX_HEADERS_BYTES: usize = 64 * 1024;
/// The longest event id, type and object id kept (characters).
const MAX_ID_CHARS: usize = 255;
/// `created` beyond this (9999-12-31) is no instant.
const MAX_CREATED: i64 = 253_402_300_799;

/// A row of billing.webhook_events, decoded once and formed again once.
struct EventRow {
    desc: PgTupleDesc<'static>,
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
}

thread_local! {
    /// Column positions by (static) name; checked against the descriptor on
    /// each use, so a changed table is looked up again.
    static POSITIONS: RefCell<FxHashMap<usize, usize>> = RefCell::new(FxHashMap::default());
}

impl EventRow {
    fn new(ev: PgHeapTuple<'_, AllocatedByRust>) -> Result<EventRow> {
        let oid = ev
            .composite_type_oid()
            .ok_or_else(|| BillingError::Internal("event row has no type".into()))?;
        let desc = PgTupleDesc::for_composite_type_by_oid(oid)
            .ok_or_else(|| BillingError::Internal("billing.webhook_events is missing".into()))?;
        let n = desc.len();
        let mut values = vec![pg_sys::Datum::from(0); n];
        let mut nulls = vec![true; n];
        let tuple = ev.into_pg();
        // SAFETY: the tuple is a row of the descriptor's type; the values
        // point into it, and it lives in the call's memory.
        unsafe {
            pg_sys::heap_deform_tuple(
                tuple,
                desc.as_ptr(),
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
            )
        };
        Ok(EventRow {
            desc,
            values,
            nulls,
        })
    }

    fn position(&self, name: &'static CStr) -> Result<usize> {
        let key = name.as_ptr() as usize;
        let named = |i: usize| {
            self.desc
                .get(i)
                .is_some_and(|a| a.name().as_bytes() == name.to_bytes() && !a.is_dropped())
        };
        if let Some(i) = POSITIONS.with(|p| p.borrow().get(&key).copied()) {
            if named(i) {
                return Ok(i);
            }
        }
        let i = (0..self.desc.len()).find(|i| named(*i)).ok_or_else(|| {
            BillingError::Internal(format!(
                "billing.webhook_events has no column {}",
                name.to_string_lossy()
            ))
        })?;
        POSITIONS.with(|p| p.borrow_mut().insert(key, i));
        Ok(i)
    }

    fn datum(&self, name: &'static CStr) -> Result<Option<pg_sys::Datum>> {
        let i = self.position(name)?;
        Ok((!self.nulls[i]).then_some(self.values[i]))
    }

    fn get<T: FromDatum>(&self, name: &'static CStr) -> Result<Option<T>> {
        let i = self.position(name)?;
        // SAFETY: the datum is the column's, of the type the caller names.
        Ok(unsafe { T::from_datum(self.values[i], self.nulls[i]) })
    }

    fn set_datum(&mut self, name: &'static CStr, datum: Option<pg_sys::Datum>) -> Result<()> {
        let i = self.position(name)?;
        self.values[i] = datum.unwrap_or(pg_sys::Datum::from(0));
        self.nulls[i] = datum.is_none();
        Ok(())
    }

    fn set<T: IntoDatum>(&mut self, name: &'static CStr, value: T) -> Result<()> {
        self.set_datum(name, value.into_datum())
    }

    /// The row as it stands, formed anew.
    fn tuple(&self) -> Result<PgHeapTuple<'static, AllocatedByRust>> {
        let datums: Vec<Option<pg_sys::Datum>> = self
            .values
            .iter()
            .zip(&self.nulls)
            .map(|(v, null)| (!null).then_some(*v))
            .collect();
        // SAFETY: one datum per attribute, each of its column's type.
        unsafe { PgHeapTuple::from_datums(self.desc.clone(), datums) }
            .map_err(|e| BillingError::Internal(format!("webhook event row: {e}")))
    }
}

/// Decide a new delivery: verify, parse, deduplicate, order and apply it;
/// returns the row to store, with its status and reason.
#[pg_extern(requires = ["webhooks"])]
#[search_path(pg_catalog, billing, pg_temp)]
fn webhook_intake_decide(
    ev: pgrx::composite_type!("billing.webhook_events"),
) -> pgrx::composite_type!("billing.webhook_events") {
    (|| -> Result<PgHeapTuple<'static, AllocatedByRust>> {
        let mut row = EventRow::new(ev)?;
        decide(&mut row)?;
        row.tuple()
    })()
    .or_raise()
}

fn decide(ev: &mut EventRow) -> Result<()> {
    // whatever the caller put in the other columns is ignored
    let tenant = current_tenant()?;
    ev.set(c"tenant_id", tenant.as_str())?;
    ev.set(c"status", "rejected")?;
    for column in [
        c"payload",
        c"provider_event_id",
        c"event_type",
        c"object_id",
        c"event_time",
        c"signed_at",
        c"reason",
        c"error",
        c"result",
    ] {
        ev.set_datum(column, None)?;
    }
    ev.set(c"received_at", time::clock_now())?;
    if ev.datum(c"headers")?.is_none() {
        ev.set_datum(c"headers", Some(direct::jsonb("{}")?))?;
    }
    // a NULL name finds nothing, as no endpoint is named ''
    let name: String = ev.get(c"endpoint")?.unwrap_or_default();
    let Some(ep) = endpoint(&tenant, &name)? else {
        return ev.set(c"reason", "unknown endpoint");
    };
    ev.set(c"endpoint_id", ep.id)?;
    let headers: JsonArg = ev
        .get(c"headers")?
        .ok_or_else(|| BillingError::Internal("a delivery without headers".into()))?;
    let body: String = ev.get(c"body")?.unwrap_or_default();
    let verified = match verify(&ep, &headers, &body) {
        Ok(v) => v,
        Err(reason) => return ev.set(c"reason", reason),
    };
    let signed_at = super::unix_to_sql(verified.signed_at);
    ev.set(c"signed_at", signed_at)?;

    let Some(payload) = parse(&body)? else {
        return ev.set(c"reason", "unparseable body: not JSON");
    };
    if typeof_(payload) != "object" {
        return ev.set(c"reason", "unparseable body: not a JSON object");
    }
    ev.set_datum(c"payload", Some(payload))?;
    let event_id = verified.event_id.or_else(|| field_text(payload, c"id"));
    ev.set(c"provider_event_id", event_id.as_deref())?;
    let Some(event_id) = event_id.filter(|id| id.chars().count() <= MAX_ID_CHARS) else {
        ev.set_datum(c"payload", None)?;
        return ev.set(c"reason", "unparseable body: no event id");
    };
    let event_type = field_text(payload, c"type").map(left);
    let object_id = path_text(payload, &[c"data", c"object", c"id"])
        .or_else(|| path_text(payload, &[c"data", c"id"]))
        .map(left);
    ev.set(c"event_type", event_type.as_deref())?;
    ev.set(c"object_id", object_id.as_deref())?;
    let event_time = match field(payload, c"created").filter(|c| typeof_(*c) == "number") {
        Some(created) => match created_at(created) {
            Some(t) => Some(t),
            None => {
                ev.set_datum(c"payload", None)?;
                return ev.set(c"reason", "unparseable body: created is out of range");
            }
        },
        None => signed_at,
    };
    ev.set(c"event_time", event_time)?;

    // One delivery of an event, and of events about one object, at a time;
    // the loser of a race sees the winner's row.
    let object_key = object_id
        .clone()
        .unwrap_or_else(|| format!("event:{event_id}"));
    let id: Option<i64> = ev.get(c"id")?;
    let this_event = object_id.as_ref().and(event_time).map(|time| (time, id));
    let object = lock_or_create(ep.id, &tenant, &object_key, this_event)?;
    let about = About {
        tenant: &tenant,
        endpoint: &name,
        event_id: &event_id,
        event_type: event_type.as_deref(),
        object_id: object_id.as_deref(),
        object_key: &object_key,
        event_time,
    };
    let applied = apply(ev, &ep, &about, object.newest)?;
    if let (Some(object_id), Some(time)) = (&object_id, event_time) {
        match (applied, object.recorded) {
            (true, false) => record_newest(ep.id, object_id, object.at, Some((time, id)))?,
            // the row this delivery made says nothing until an event is applied
            (false, true) => record_newest(ep.id, object_id, object.at, None)?,
            _ => {}
        }
    }
    Ok(())
}

/// What a verified, parsed delivery is about.
struct About<'a> {
    tenant: &'a str,
    /// The endpoint's name.
    endpoint: &'a str,
    event_id: &'a str,
    event_type: Option<&'a str>,
    object_id: Option<&'a str>,
    /// The key of the object row it holds: its object, else `event:<id>`.
    object_key: &'a str,
    event_time: Option<Tstz>,
}

/// Apply a verified, parsed delivery whose object row this transaction
/// holds (`newest`: the newest event time applied to the object before):
/// true if applied, false if a duplicate, superseded or failed (its status
/// and reason set on `ev`).
fn apply(ev: &mut EventRow, ep: &EndpointRow, about: &About<'_>, newest: Tstz) -> Result<bool> {
    if let Some(applied) = applied_before(ep.id, about.event_id)? {
        ev.set(c"status", "duplicate")?;
        ev.set(
            c"reason",
            format!("already received as webhook event {applied}"),
        )?;
        return Ok(false);
    }
    if let (Some(object), Some(time)) = (about.object_id, about.event_time) {
        if time < newest {
            ev.set(c"status", "superseded")?;
            ev.set(
                c"reason",
                format!(
                    "older than the newest event applied to {object} ({})",
                    timestamptz_text(newest)
                ),
            )?;
            return Ok(false);
        }
    }
    let handler = handler_for(about.tenant, about.endpoint, about.event_type, &ep.scheme)?;
    match handler {
        None => {
            ev.set(c"status", "applied")?;
            let what = about.event_type.unwrap_or("untyped events");
            ev.set(c"reason", format!("no handler for {what}"))?;
        }
        Some(handler) => {
            let event = ev.tuple()?;
            let run = || db::catching(|| super::run_handler(handler, about.tenant, event));
            match holding(ep.id, about.object_key, run)? {
                Ok(result) => {
                    ev.set(c"result", result)?;
                    ev.set(c"status", "applied")?;
                }
                Err(failure) => {
                    // the handler's side effects were rolled back; a redelivery may succeed
                    ev.set(c"status", "failed")?;
                    ev.set(c"error", failure)?;
                    return Ok(false);
                }
            }
        }
    }
    Ok(true)
}

/// The object's row remembers the newest event applied to it (`newest`:
/// its time and inbox id), if newer than what it remembers; None forgets
/// what the row was made with, by the delivery that made it and was not
/// applied. Updated where its lock found it, unless that version is not the
/// current one any more (then by a statement).
fn record_newest(
    endpoint: i64,
    object: &str,
    at: RowAt,
    newest: Option<(Tstz, Option<i64>)>,
) -> Result<()> {
    let (time, id) = newest.unwrap_or_else(nothing_applied);
    let mut w = Writer::open(c"webhook_objects")?;
    w.set(c"newest_event_time", time)?
        .set(c"newest_event_id", id)?;
    let updated = w.update_if_current(at, |t| {
        Ok(t.get::<i64>(c"endpoint_id")? == endpoint
            && t.get::<String>(c"object_id")? == object
            && (newest.is_none() || t.get::<Tstz>(c"newest_event_time")? <= time))
    })?;
    w.close();
    if updated.is_none() {
        let statement = if newest.is_some() {
            &NEWEST_APPLIED
        } else {
            &NONE_APPLIED
        };
        Spi::connect_mut(|c| {
            db::write(
                c,
                statement,
                &[endpoint.into(), object.into(), time.into(), id.into()],
            )
            .map(|_| ())
        })?;
    }
    Ok(())
}

/// The first 255 characters, as `left(s, 255)`.
fn left(s: String) -> String {
    match s.char_indices().nth(MAX_ID_CHARS) {
        Some((at, _)) => s[..at].to_string(),
        None => s,
    }
}

/// What an endpoint's row says about verifying a delivery to it.
struct EndpointRow {
    id: i64,
    scheme: String,
    secret: String,
    /// The previous secret, while it is still accepted.
    previous_secret: Option<String>,
    tolerance_seconds: i32,
    signature_header: String,
}

/// The previous secret of an endpoint whose secret was rotated, while it is
/// still accepted: strictly before `until` (microseconds, as a timestamptz).
fn still_accepted(previous: Option<String>, until: Option<i64>) -> Option<String> {
    let now = time::now();
    previous.filter(|_| until.is_some_and(|until| until > now))
}

fn endpoint(tenant: &str, name: &str) -> Result<Option<EndpointRow>> {
    direct::find_one(
        c"webhook_endpoints",
        c"webhook_endpoints_tenant_id_name_key",
        &[Key::Text(tenant), Key::Text(name)],
        Snapshot::Query,
        |t| {
            Ok(EndpointRow {
                id: t.get(c"id")?,
                scheme: t.get(c"scheme")?,
                secret: t.get(c"secret")?,
                previous_secret: still_accepted(
                    t.opt(c"previous_secret")?,
                    t.opt(c"previous_secret_expires_at")?,
                ),
                tolerance_seconds: t.get(c"tolerance_seconds")?,
                signature_header: t.get(c"signature_header")?,
            })
        },
    )
}

/// Whether a delivery to `ep` is within the size bounds and signed by its
/// secret (or by its previous secret while that is still accepted): the one
/// check of a delivery, for the intake and for a sharding router that must
/// know a delivery is genuine before it reads whose it is.
fn verify(
    ep: &EndpointRow,
    headers: &JsonArg,
    body: &str,
) -> std::result::Result<crate::signatures::Verified, String> {
    // the headers' text is made once: measured, then parsed
    let headers = headers.with_text(|text| {
        if body.len() > MAX_BODY_BYTES || text.len() > MAX_HEADERS_BYTES {
            return Err("too large: body over 1 MiB or headers over 64 KiB".to_string());
        }
        json_text_value("headers", text).map_err(|e| Rejection::Malformed(e.to_string()).reason())
    })?;
    let scheme = Scheme::parse(&ep.scheme)
        .ok_or_else(|| Rejection::BadSecret(format!("unknown scheme {}", ep.scheme)).reason())?;
    let endpoint = Endpoint {
        scheme,
        secret: &ep.secret,
        previous_secret: ep.previous_secret.as_deref(),
        tolerance_seconds: ep.tolerance_seconds.max(0) as i64,
        signature_header: &ep.signature_header,
    };
    super::verify_now(&endpoint, &headers, body).map_err(|r| r.reason())
}

/// The body as `jsonb`, read by PostgreSQL's own parser; None if it is not JSON.
fn parse(body: &str) -> Result<Option<pg_sys::Datum>> {
    let Ok(text) = CString::new(body) else {
        return Ok(None);
    };
    // SAFETY: jsonb_in takes a C string and returns a new jsonb or raises;
    // a raise is caught (and its subtransaction rolled back) by `catching`.
    let parsed = db::catching(|| unsafe {
        pgrx::direct_function_call_as_datum(pg_sys::jsonb_in, &[Some(text.as_ptr().into())])
            .ok_or_else(|| BillingError::Internal("jsonb_in returned NULL".into()))
    })?;
    Ok(parsed.ok())
}

fn typeof_(value: pg_sys::Datum) -> String {
    // SAFETY: jsonb_typeof takes a jsonb and returns text.
    unsafe {
        pgrx::direct_function_call::<String>(pg_sys::jsonb_typeof, &[Some(value)])
            .unwrap_or_default()
    }
}

/// `value -> name`: the field's value, None if `value` has no such field.
fn field(value: pg_sys::Datum, name: &CStr) -> Option<pg_sys::Datum> {
    let key = name.to_str().ok()?.into_datum();
    // SAFETY: jsonb_object_field takes a jsonb and a text and returns a jsonb or NULL.
    unsafe { pgrx::direct_function_call_as_datum(pg_sys::jsonb_object_field, &[Some(value), key]) }
}

/// `value ->> name`.
fn field_text(value: pg_sys::Datum, name: &CStr) -> Option<String> {
    let key = name.to_str().ok()?.into_datum();
    // SAFETY: jsonb_object_field_text takes a jsonb and a text and returns a text or NULL.
    unsafe {
        pgrx::direct_function_call::<String>(pg_sys::jsonb_object_field_text, &[Some(value), key])
    }
}

/// `value #>> path`.
fn path_text(value: pg_sys::Datum, path: &[&CStr]) -> Option<String> {
    let (last, parents) = path.split_last()?;
    let mut at = value;
    for name in parents {
        at = field(at, name)?;
    }
    field_text(at, last)
}

/// `to_timestamp(created)` of a `created` JSON number, if it lies between
/// the epoch and the year 9999 (compared exactly, as numerics: `1e400` is a
/// JSON number no double holds).
fn created_at(created: pg_sys::Datum) -> Option<Tstz> {
    // SAFETY: jsonb_numeric casts a jsonb number to numeric; int8_numeric,
    // numeric_cmp and numeric_float8 take and return what their names say;
    // float8_timestamptz is to_timestamp(double precision).
    unsafe {
        let seconds = pgrx::direct_function_call_as_datum(pg_sys::jsonb_numeric, &[Some(created)])?;
        let bound =
            |n: i64| pgrx::direct_function_call_as_datum(pg_sys::int8_numeric, &[n.into_datum()]);
        let cmp = |other: pg_sys::Datum| {
            pgrx::direct_function_call::<i32>(pg_sys::numeric_cmp, &[Some(seconds), Some(other)])
        };
        if cmp(bound(0)?)? < 0 || cmp(bound(MAX_CREATED)?)? > 0 {
            return None;
        }
        let seconds = pgrx::direct_function_call::<f64>(pg_sys::numeric_float8, &[Some(seconds)])?;
        pgrx::direct_function_call::<Tstz>(pg_sys::float8_timestamptz, &[seconds.into_datum()])
    }
}

fn timestamptz_text(t: Tstz) -> String {
    // SAFETY: timestamptz_out formats as the session's DateStyle and TimeZone.
    unsafe {
        pgrx::direct_function_call::<&CStr>(pg_sys::timestamptz_out, &[t.into_datum()])
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

static NEWEST_APPLIED: Sql = Sql {
    text: "UPDATE billing.webhook_objects o SET newest_event_time = $3, newest_event_id = $4 \
           WHERE o.endpoint_id = $1 AND o.object_id = $2 AND o.newest_event_time <= $3",
    args: &[INT8, TEXT, TSTZ, INT8],
};

static NONE_APPLIED: Sql = Sql {
    text: "UPDATE billing.webhook_objects o SET newest_event_time = $3, newest_event_id = $4 \
           WHERE o.endpoint_id = $1 AND o.object_id = $2",
    args: &[INT8, TEXT, TSTZ, INT8],
};

/// Lock the row of `key` (an object id or `event:<id>`) of
/// endpoint `endpoint_id` for this transaction, creating it if needed;
/// returns the newest event time applied to it (`-infinity` if none).
/// Concurrent deliveries concerning the same key queue here, behind a lock
/// only pg_billing can take.
#[pg_extern(requires = ["webhooks"])]
#[search_path(pg_catalog, billing, pg_temp)]
fn lock_webhook_object(endpoint_id: Option<i64>, tenant: Option<&str>, key: Option<&str>) -> Tstz {
    (|| {
        let endpoint_id = crate::input::required("endpoint_id", endpoint_id)?;
        let tenant = crate::input::required("tenant", tenant)?;
        let key = crate::input::required("key", key)?;
        lock_object(endpoint_id, tenant, key).map(|(newest, _)| newest)
    })()
    .or_raise()
}

pub fn lock_object(endpoint_id: i64, tenant: &str, key: &str) -> Result<(Tstz, RowAt)> {
    lock_or_create(endpoint_id, tenant, key, None).map(|o| (o.newest, o.at))
}

/// The newest event (time, inbox id) of an object's row to which none was applied.
fn nothing_applied() -> (Tstz, Option<i64>) {
    (Tstz::negative_infinity(), Some(0))
}

/// An object's row, locked by this transaction.
struct ObjectLock {
    /// The newest event time applied to the object before.
    newest: Tstz,
    at: RowAt,
    /// Made by this call with the delivery's event as its newest.
    recorded: bool,
}

/// `lock_object`, creating a missing row with `event` (the delivery's time
/// and inbox id) as its newest already: the delivery that makes the row
/// then writes it once, and puts it back if it is not applied.
fn lock_or_create(
    endpoint_id: i64,
    tenant: &str,
    key: &str,
    event: Option<(Tstz, Option<i64>)>,
) -> Result<ObjectLock> {
    let keys = [Key::Int8(endpoint_id), Key::Text(key)];
    loop {
        let mut objects =
            direct::Lookup::open_for_update(c"webhook_objects", c"webhook_objects_pkey", 2)?;
        let newest = objects.find_locked(&keys, |t| {
            Ok((t.get::<Tstz>(c"newest_event_time")?, t.at()))
        });
        objects.close();
        if let Some((newest, at)) = newest?.into_iter().next() {
            return Ok(ObjectLock {
                newest,
                at,
                recorded: false,
            });
        }
        // not there: create it, unless another delivery creates it first
        // (then this one waits for it above)
        let (time, id) = event.unwrap_or_else(nothing_applied);
        let mut made = None;
        let created = db::attempt_unless_key_taken(|| {
            let mut w = direct::Writer::open(c"webhook_objects")?;
            w.set(c"endpoint_id", endpoint_id)?
                .set(c"object_id", key)?
                .set(c"tenant_id", tenant)?
                .set(c"newest_event_time", time)?
                .set(c"newest_event_id", id)?;
            made = Some(w.insert()?);
            w.close();
            Ok(())
        })?;
        if let (true, Some(at)) = (created, made) {
            return Ok(ObjectLock {
                newest: nothing_applied().0,
                at,
                recorded: event.is_some(),
            });
        }
    }
}

thread_local! {
    /// The object row the delivery being applied holds (its transaction,
    /// endpoint and key), while its handler runs.
    static HELD: RefCell<Option<(pg_sys::TransactionId, i64, String)>> = const { RefCell::new(None) };
}

/// Run `f`, a delivery's handler, knowing that this transaction holds the
/// row of `key` of endpoint `endpoint` (the intake created or locked it), so
/// a handler that locks the same row (a payment's lock, when the event is
/// about the PaymentIntent itself) does not lock it again: from inside the
/// handler's subtransaction that would write a lock record and make the
/// row's later update by the delivery a multixact.
fn holding<T>(endpoint: i64, key: &str, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<(pg_sys::TransactionId, i64, String)>);
    impl Drop for Restore {
        fn drop(&mut self) {
            HELD.with(|h| *h.borrow_mut() = self.0.take());
        }
    }
    // SAFETY: reads the transaction's id, assigned by the object row's write.
    let xid = unsafe { pg_sys::GetTopTransactionIdIfAny() };
    let _restore = Restore(HELD.with(|h| h.replace(Some((xid, endpoint, key.to_string())))));
    f()
}

/// Lock the row of `key` of endpoint `endpoint` for this transaction, as
/// `lock_object`, unless the delivery being applied already holds it.
pub fn lock_unless_held(endpoint: i64, tenant: &str, key: &str) -> Result<()> {
    // SAFETY: reads the transaction's id.
    let xid = unsafe { pg_sys::GetTopTransactionIdIfAny() };
    let held = HELD.with(|h| {
        h.borrow()
            .as_ref()
            .is_some_and(|(x, e, k)| *x == xid && *e == endpoint && k == key)
    });
    if held {
        return Ok(());
    }
    lock_object(endpoint, tenant, key).map(|_| ())
}

/// The event `event_id` of endpoint `ep` already applied (or superseded),
/// read after the object's lock, so it sees what the lock's previous holder
/// committed.
fn applied_before(ep: i64, event_id: &str) -> Result<Option<i64>> {
    direct::find_one(
        c"webhook_events",
        c"webhook_events_once",
        &[Key::Int8(ep), Key::Text(event_id)],
        Snapshot::New,
        |t| t.get::<i64>(c"id"),
    )
}

/// The handler for an event: the application's (the endpoint's own first,
/// then one for every endpoint), else a built-in Stripe projection, else none.
fn handler_for(
    tenant: &str,
    endpoint: &str,
    event_type: Option<&str>,
    scheme: &str,
) -> Result<Option<pg_sys::Oid>> {
    let Some(event_type) = event_type else {
        return Ok(None);
    };
    for registered_for in [endpoint, "*"] {
        let found = direct::find_one(
            c"webhook_handlers",
            c"webhook_handlers_pkey",
            &[
                Key::Text(tenant),
                Key::Text(registered_for),
                Key::Text(event_type),
            ],
            Snapshot::Query,
            |t| t.get::<pg_sys::Oid>(c"handler"),
        )?;
        if found.is_some() {
            return Ok(found);
        }
    }
    match (scheme, builtin_handler(event_type)) {
        ("stripe", Some(name)) => builtin_oid(name).map(Some),
        _ => Ok(None),
    }
}

/// The built-in Stripe projection of an event type.
fn builtin_handler(event_type: &str) -> Option<&'static CStr> {
    Some(match event_type {
        "checkout.session.completed" | "payment_intent.succeeded" => super::topup::TOPUP_SIGNATURE,
        "customer.subscription.created"
        | "customer.subscription.updated"
        | "customer.subscription.deleted"
        | "customer.subscription.paused"
        | "customer.subscription.resumed"
        | "customer.subscription.pending_update_applied"
        | "customer.subscription.pending_update_expired"
        | "customer.subscription.trial_will_end" => {
            c"billing.stripe_subscription_event(billing.webhook_events)"
        }
        "invoice_payment.paid" => c"billing.stripe_invoice_payment_event(billing.webhook_events)",
        "invoice.paid"
        | "invoice.payment_succeeded"
        | "invoice.payment_failed"
        | "invoice.payment_action_required"
        | "invoice.finalized"
        | "invoice.voided"
        | "invoice.marked_uncollectible" => c"billing.stripe_invoice_event(billing.webhook_events)",
        "charge.refunded"
        | "charge.dispute.created"
        | "charge.dispute.funds_withdrawn"
        | "charge.dispute.closed"
        | "charge.dispute.funds_reinstated" => {
            c"billing.stripe_reverse_payment(billing.webhook_events)"
        }
        _ => return None,
    })
}

thread_local! {
    /// The built-in projections' OIDs by signature, until a function changes.
    static BUILTINS: RefCell<FxHashMap<usize, pg_sys::Oid>> = RefCell::new(FxHashMap::default());
}

pub fn forget_builtins() {
    BUILTINS.with(|b| b.borrow_mut().clear());
}

/// The OID of a built-in function by its (static) signature.
pub fn builtin_oid(signature: &'static CStr) -> Result<pg_sys::Oid> {
    let key = signature.as_ptr() as usize;
    if let Some(oid) = BUILTINS.with(|b| b.borrow().get(&key).copied()) {
        return Ok(oid);
    }
    let oid = function_oid(signature)?;
    BUILTINS.with(|b| b.borrow_mut().insert(key, oid));
    Ok(oid)
}

/// The OID of a function by its signature, as `'…'::regprocedure`.
fn function_oid(signature: &CStr) -> Result<pg_sys::Oid> {
    // SAFETY: regprocedurein takes a C string and returns an oid or raises.
    unsafe {
        pgrx::direct_function_call::<pg_sys::Oid>(
            pg_sys::regprocedurein,
            &[Some(signature.as_ptr().into())],
        )
    }
    .ok_or_else(|| BillingError::Internal(format!("{} is missing", signature.to_string_lossy())))
}

/// Whether a delivery to endpoint `ep` is genuine (see `verify`), for a
/// sharding router that must know before it reads whose the delivery is.
#[pg_extern(stable, requires = ["webhooks"])]
#[search_path(pg_catalog, billing, pg_temp)]
fn verify_delivery(
    ep: pgrx::composite_type!("billing.webhook_endpoints"),
    headers: Option<JsonArg>,
    body: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(valid, bool),
        name!(reason, Option<String>),
        name!(event_id, Option<String>),
        name!(signed_at, Option<Tstz>),
    ),
> {
    let ep = endpoint_of_row(&ep).or_raise();
    let verdict = match headers {
        Some(h) => verify(&ep, &h, body.unwrap_or_default()),
        None => Err("headers must be a JSON object".into()),
    };
    TableIterator::once(match verdict {
        Ok(v) => (true, None, v.event_id, super::unix_to_sql(v.signed_at)),
        Err(reason) => (false, Some(reason), None, None),
    })
}

/// An endpoint's row given as a value, read as `endpoint` reads it from the table.
fn endpoint_of_row(ep: &PgHeapTuple<'_, AllocatedByRust>) -> Result<EndpointRow> {
    macro_rules! column {
        ($name:literal) => {
            ep.get_by_name($name)
                .map_err(|e| BillingError::Internal(format!("endpoint row: {e}")))?
        };
    }
    let required = |name: &str| BillingError::Internal(format!("endpoint row without {name}"));
    let rotated_until: Option<Tstz> = column!("previous_secret_expires_at");
    let previous_secret: Option<String> = column!("previous_secret");
    Ok(EndpointRow {
        id: column!("id").ok_or_else(|| required("id"))?,
        scheme: column!("scheme").ok_or_else(|| required("scheme"))?,
        secret: column!("secret").ok_or_else(|| required("secret"))?,
        previous_secret: still_accepted(previous_secret, rotated_until.map(i64::from)),
        tolerance_seconds: column!("tolerance_seconds")
            .ok_or_else(|| required("tolerance_seconds"))?,
        signature_header: column!("signature_header")
            .ok_or_else(|| required("signature_header"))?,
    })
}
