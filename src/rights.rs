//! Whose rights a piece of code runs with, switched the way PostgreSQL itself
//! switches them, and always put back.
//!
//! Most billing functions are SECURITY DEFINER with a pinned `search_path`.
//! The gate is not: entering such a function costs about as much as the
//! gate's whole answer from a pool row, so `check` runs as its caller, reads
//! only through `crate::direct` (no SQL, no name looked up by search path),
//! and takes the owner's rights with `as_owner` for the rare answer that
//! needs SQL.

use pgrx::pg_sys;

use crate::direct;
use crate::error::Result;

/// The search path every billing function runs with: nothing the caller put
/// in its own schemas (an operator, a function) is found before the catalog's.
const PINNED_SEARCH_PATH: &std::ffi::CStr = c"pg_catalog, billing, pg_temp";

/// Runs as another role until dropped, as PostgreSQL itself runs index
/// expressions and materialized view refreshes: a local user change that the
/// code running cannot undo (no SET ROLE). Dropping restores the caller's
/// role, also when an error unwinds through the call.
pub struct RunAs {
    user: pg_sys::Oid,
    context: i32,
}

impl RunAs {
    /// As `role`, in a restricted operation (no temp objects, no session
    /// state that outlives the call): for code an application registered.
    pub fn restricted(role: pg_sys::Oid) -> Self {
        Self::with_flags(
            role,
            pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        )
    }

    fn with_flags(role: pg_sys::Oid, flags: i32) -> Self {
        let (mut user, mut context) = (pg_sys::InvalidOid, 0);
        // SAFETY: reads and sets backend globals; restored in Drop.
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
            pg_sys::SetUserIdAndSecContext(role, context | flags);
        }
        RunAs { user, context }
    }
}

impl Drop for RunAs {
    fn drop(&mut self) {
        // SAFETY: puts back exactly what `with_flags` read.
        unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.context) }
    }
}

/// Runs `f` as a SECURITY DEFINER function of the extension runs: as the
/// extension's owner (the owner of its tables) with the pinned search path.
/// The setting is undone when `f` returns; when an error escapes, the
/// transaction's (or subtransaction's) abort undoes both, as it does for a
/// SECURITY DEFINER function.
pub fn as_owner<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let owner = extension_owner()?;
    // SAFETY: a new GUC nesting level, popped below on return; an error
    // unwinding past it is popped by the abort that follows.
    let nest = unsafe { pg_sys::NewGUCNestLevel() };
    let _as = RunAs::with_flags(owner, pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    // SAFETY: sets a USERSET setting at the new nesting level (elevel 0:
    // an invalid value raises, which cannot happen for this constant).
    unsafe {
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            PINNED_SEARCH_PATH.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
    }
    let result = f();
    // SAFETY: pops exactly the level pushed above.
    unsafe { pg_sys::AtEOXact_GUC(true, nest) };
    result
}

/// The role that owns the extension's tables (it created the extension).
fn extension_owner() -> Result<pg_sys::Oid> {
    let pools = direct::relation(c"pools")?;
    // SAFETY: a relcache lookup by a known OID inside a transaction; the
    // entry is released before returning.
    unsafe {
        let rel = pg_sys::RelationIdGetRelation(pools);
        if rel.is_null() {
            return Err(crate::error::BillingError::Internal(
                "billing.pools is missing".into(),
            ));
        }
        let owner = (*(*rel).rd_rel).relowner;
        pg_sys::RelationClose(rel);
        Ok(owner)
    }
}
