//! Prepared SPI statements, planned once per backend and reused.
//!
//! Every statement pg_billing runs is a `static Sql`; the first execution in a
//! backend prepares it with `SPI_keepplan`, later ones only bind and execute.

use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;

use pgrx::datum::DatumWithOid;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys::{self, Oid, PgOid};
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};
use pgrx::{PgSqlErrorCode, PgTryBuilder};

use crate::error::{BillingError, Result};

/// One SQL statement and the types of its `$n` parameters.
pub struct Sql {
    pub text: &'static str,
    pub args: &'static [Oid],
}

pub const TEXT: Oid = pg_sys::TEXTOID;
pub const OID: Oid = pg_sys::OIDOID;
pub const INT8: Oid = pg_sys::INT8OID;
pub const INT4: Oid = pg_sys::INT4OID;
pub const JSONB: Oid = pg_sys::JSONBOID;
pub const BYTEA: Oid = pg_sys::BYTEAOID;
pub const TSTZ: Oid = pg_sys::TIMESTAMPTZOID;
pub const BOOL: Oid = pg_sys::BOOLOID;
pub const INTERVAL: Oid = pg_sys::INTERVALOID;
pub const INT8_ARRAY: Oid = pg_sys::INT8ARRAYOID;
pub const INT4_ARRAY: Oid = pg_sys::INT4ARRAYOID;
pub const TEXT_ARRAY: Oid = pg_sys::TEXTARRAYOID;

/// A cached plan is prepared again after this many executions. A generic plan
/// made while a table was nearly empty (a fresh install) can be a sequential
/// scan, and PostgreSQL keeps it until an ANALYZE invalidates it; preparing
/// again lets the planner see the table's current size. One prepare per 1,024
/// executions costs nothing measurable.
const REPLAN_EVERY: u32 = 1024;

struct Cached {
    plan: Rc<OwnedPreparedStatement>,
    uses: u32,
}

thread_local! {
    static PLANS: RefCell<FxHashMap<(usize, bool), Cached>> = RefCell::new(FxHashMap::default());
}

/// A statement's address and whether it runs as a write identify its cached plan.
fn plan(
    client: &SpiClient<'_>,
    sql: &'static Sql,
    mutating: bool,
) -> Result<Rc<OwnedPreparedStatement>> {
    let key = (sql as *const Sql as usize, mutating);
    let cached = PLANS.with(|plans| {
        let mut plans = plans.borrow_mut();
        let c = plans.get_mut(&key)?;
        c.uses += 1;
        (c.uses < REPLAN_EVERY).then(|| c.plan.clone())
    });
    if let Some(p) = cached {
        return Ok(p);
    }
    let types: Vec<PgOid> = sql.args.iter().map(|o| PgOid::from(*o)).collect();
    let statement = if mutating {
        client.prepare_mut(sql.text, &types)?
    } else {
        client.prepare(sql.text, &types)?
    };
    let prepared = Rc::new(statement.keep());
    PLANS.with(|plans| {
        plans.borrow_mut().insert(
            key,
            Cached {
                plan: prepared.clone(),
                uses: 0,
            },
        )
    });
    Ok(prepared)
}

/// A backend setting changed for one statement: restored when it returns or
/// raises (the guard is dropped while the error unwinds).
struct Scoped {
    setting: *mut std::ffi::c_int,
    previous: std::ffi::c_int,
}

impl Scoped {
    /// SAFETY: `setting` is one of PostgreSQL's `int` GUC variables; a
    /// backend is single-threaded.
    unsafe fn set(setting: *mut std::ffi::c_int, value: std::ffi::c_int) -> Scoped {
        let previous = *setting;
        *setting = value;
        Scoped { setting, previous }
    }
}

impl Drop for Scoped {
    fn drop(&mut self) {
        // SAFETY: as for `set`.
        unsafe { *self.setting = self.previous }
    }
}

/// Cached plans run their generic plan. A statement over a parameter array
/// (`unnest($1)`, `= ANY($1)`) is estimated at 100 rows in its generic plan
/// and at the array's true length in a custom one, so PostgreSQL would plan
/// every call afresh (about a third of a one-client ingest); our statements
/// are written so the generic plan is right for any length.
fn generic_plans() -> Scoped {
    // SAFETY: plan_cache_mode is an int GUC variable.
    unsafe {
        Scoped::set(
            &raw mut pg_sys::plan_cache_mode,
            pg_sys::PlanCacheMode::PLAN_CACHE_MODE_FORCE_GENERIC_PLAN as std::ffi::c_int,
        )
    }
}

/// `billing.lock_timeout`: how long, in milliseconds, a billing call waits
/// for a row another transaction holds (an account's pool, most often) when
/// the session sets no `lock_timeout` of its own; 0 waits without limit.
pub static LOCK_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5000);

pub fn define_settings() {
    GucRegistry::define_int_guc(
        c"billing.lock_timeout",
        c"How long a billing call waits for a row another transaction holds.",
        c"Used when the session's lock_timeout is 0. In milliseconds; 0 waits without limit.",
        &LOCK_TIMEOUT_MS,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
}

/// Every lock wait is bounded: by the session's `lock_timeout` if it set one,
/// else by `billing.lock_timeout`. Returns the guard and the bound.
fn bounded_waits() -> (Scoped, std::ffi::c_int) {
    // SAFETY: LockTimeout is an int GUC variable.
    unsafe {
        let session = pg_sys::LockTimeout;
        let bound = if session > 0 {
            session
        } else {
            LOCK_TIMEOUT_MS.get()
        };
        (Scoped::set(&raw mut pg_sys::LockTimeout, bound), bound)
    }
}

/// Run a statement that may write (or lock) and return its rows.
pub fn write<'conn>(
    client: &mut SpiClient<'conn>,
    sql: &'static Sql,
    args: &[DatumWithOid<'_>],
) -> Result<SpiTupleTable<'conn>> {
    write_waiting_for(client, sql, args, "a row this call needs")
}

/// As `write`; a wait that outlasts the bound raises 55P03 naming `what`
/// (the caller knows which pool it was locking) and saying what to do.
pub fn write_waiting_for<'conn>(
    client: &mut SpiClient<'conn>,
    sql: &'static Sql,
    args: &[DatumWithOid<'_>],
    what: &str,
) -> Result<SpiTupleTable<'conn>> {
    // refused here, before pgrx asks for a transaction id (which on a hot
    // standby fails with an internal error instead of 25006)
    crate::direct::writing(c"this billing call");
    let p = plan(client, sql, true)?;
    let _generic = generic_plans();
    Ok(waiting_for(what, || client.update(&*p, None, args))?)
}

/// Run `work`, which may wait for locks, with every wait bounded (see
/// `bounded_waits`); a wait that outlasts the bound raises 55P03 naming
/// `what` and saying what to do.
pub fn waiting_for<T>(what: &str, work: impl FnOnce() -> T) -> T {
    let (_waits, waited_ms) = bounded_waits();
    PgTryBuilder::new(AssertUnwindSafe(work))
        .catch_when(PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE, |_| {
            BillingError::LockWait {
                what: what.to_string(),
                waited_ms,
            }
            .raise()
        })
        .execute()
}

/// Run `attempt` in a subtransaction, kept if it returns Some and rolled
/// back otherwise, an error included: row locks it took and had no use for
/// are released, so a caller that gives up waits for nothing while holding
/// them. An error raised inside is re-raised after the rollback, so a caller's
/// own subtransaction (a PL/pgSQL exception block around the billing call)
/// finds itself current when it catches it. What `attempt` returns must not
/// borrow from SPI results of the attempt.
pub fn attempt<T>(attempt: impl FnOnce() -> Result<Option<T>>) -> Result<Option<T>> {
    let sub = Subtransaction::begin();
    let result = PgTryBuilder::new(AssertUnwindSafe(attempt))
        .catch_others(|error| {
            sub.end(false);
            error.rethrow()
        })
        .execute();
    sub.end(matches!(result, Ok(Some(_))));
    result
}

/// Run `work` in a subtransaction, as a PL/pgSQL exception block runs its
/// body: kept if it returns a value; rolled back if it fails, and then the
/// failure is the answer, as `SQLSTATE: message` (what the block's handler
/// reads as SQLSTATE and SQLERRM), whether it was raised or returned.
pub fn catching<T>(work: impl FnOnce() -> Result<T>) -> Result<std::result::Result<T, String>> {
    use pgrx::pg_sys::panic::CaughtError;
    let sub = Subtransaction::begin();
    let outcome = PgTryBuilder::new(AssertUnwindSafe(|| {
        work().map_err(|e| failure(e.sqlstate(), &e.to_string()))
    }))
    .catch_others(|caught| match caught {
        CaughtError::PostgresError(r)
        | CaughtError::ErrorReport(r)
        | CaughtError::RustPanic { ereport: r, .. } => {
            Err(failure(r.sql_error_code(), r.message()))
        }
    })
    .execute();
    sub.end(outcome.is_ok());
    Ok(outcome)
}

/// A subtransaction, begun and ended as PL/pgSQL begins and ends one around
/// an exception block: the caller's memory context and resource owner are
/// restored after it ends, whichever way it ends.
#[derive(Clone, Copy)]
struct Subtransaction {
    context: pg_sys::MemoryContext,
    owner: pg_sys::ResourceOwner,
}

impl Subtransaction {
    fn begin() -> Subtransaction {
        // SAFETY: inside a transaction; the caller's context is made current again.
        unsafe {
            let sub = Subtransaction {
                context: pg_sys::CurrentMemoryContext,
                owner: pg_sys::CurrentResourceOwner,
            };
            pg_sys::BeginInternalSubTransaction(std::ptr::null());
            pg_sys::MemoryContextSwitchTo(sub.context);
            sub
        }
    }

    /// Keep what it did, or roll it back.
    fn end(self, keep: bool) {
        // SAFETY: ends the subtransaction `begin` started, which is current.
        unsafe {
            if keep {
                pg_sys::ReleaseCurrentSubTransaction();
            } else {
                pg_sys::RollbackAndReleaseCurrentSubTransaction();
            }
            pg_sys::MemoryContextSwitchTo(self.context);
            pg_sys::CurrentResourceOwner = self.owner;
        }
    }
}

fn failure(code: PgSqlErrorCode, message: &str) -> String {
    // SAFETY: unpack_sql_state returns a static buffer of five characters.
    let state = unsafe { std::ffi::CStr::from_ptr(pg_sys::unpack_sql_state(code as i32)) };
    format!("{}: {message}", state.to_string_lossy())
}

/// Run `write` in a subtransaction and keep it, unless it raises a unique
/// violation (23505: a key another transaction recorded meanwhile): then the
/// subtransaction is rolled back, nothing it wrote remains, and the answer is
/// false. Any other error is raised.
pub fn attempt_unless_key_taken(write: impl FnOnce() -> Result<()>) -> Result<bool> {
    let kept = attempt(|| {
        PgTryBuilder::new(AssertUnwindSafe(|| write().map(Some)))
            .catch_when(PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION, |_| Ok(None))
            .execute()
    })?;
    Ok(kept.is_some())
}

/// Run a read-only statement. It takes no transaction id, so a read stays a pure read.
pub fn read<'conn>(
    client: &SpiClient<'conn>,
    sql: &'static Sql,
    args: &[DatumWithOid<'_>],
) -> Result<SpiTupleTable<'conn>> {
    let p = plan(client, sql, false)?;
    let _generic = generic_plans();
    Ok(client.select(&*p, None, args)?)
}

/// A row of a result, read by column name.
pub struct Row<'r, 'conn>(pub &'r pgrx::spi::SpiHeapTupleData<'conn>);

impl Row<'_, '_> {
    /// A required column.
    pub fn get<T: pgrx::FromDatum + pgrx::IntoDatum>(&self, name: &str) -> Result<T> {
        self.opt(name)?.ok_or_else(|| {
            crate::error::BillingError::Internal(format!("unexpected NULL in column {name}"))
        })
    }

    /// A column that may be NULL.
    pub fn opt<T: pgrx::FromDatum + pgrx::IntoDatum>(&self, name: &str) -> Result<Option<T>> {
        Ok(self.0.get_by_name::<T, _>(name)?)
    }
}
