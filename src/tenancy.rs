//! Which tenant a call acts for, decided in one place.
//!
//! The session names a tenant in the `billing.tenant` setting (default
//! `'default'`). The call may act for it only if the *outer* role — the role
//! of the session after any SET ROLE, which SECURITY DEFINER functions do not
//! change — is a superuser, has the privileges of `billing_admin`, or has the
//! privileges of a role granted that tenant in `billing.tenant_roles` (roles are
//! kept by OID, so a dropped role's grants are never inherited by a new role
//! of the same name). Changing the setting therefore reaches no tenant the role
//! was not granted.
//!
//! While an application's webhook handler runs, the tenant is pinned to the
//! endpoint's: the handler's owner must be allowed to act for it, and nothing
//! the handler does (such as changing the setting) reaches another tenant.

use std::cell::RefCell;
use std::ffi::CStr;

use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;

use crate::direct::{Key, Lookup, Snapshot};
use crate::error::{BillingError, OrRaise, Result};

pub const DEFAULT_TENANT: &str = "default";

thread_local! {
    /// The tenant every call is held to while a webhook handler runs.
    static PINNED: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The tenant this call acts for, after checking the calling role may.
pub fn current_tenant() -> Result<String> {
    let tenant = requested_tenant()?;
    match PINNED.with(|p| p.borrow().clone()) {
        Some(pinned) if pinned == tenant => {}
        Some(pinned) => {
            return Err(BillingError::TenantDenied {
                tenant,
                role: format!("webhook handler of tenant {pinned}"),
            })
        }
        None => authorize(outer_role(), &tenant)?,
    }
    Ok(tenant)
}

/// While the returned guard lives, every call acts for `tenant` only, and
/// `role` (a webhook handler's owner) must be allowed to act for it.
pub fn pin_tenant(tenant: &str, role: Oid) -> Result<TenantPin> {
    authorize(role, tenant)?;
    let previous = PINNED.with(|p| p.replace(Some(tenant.to_string())));
    Ok(TenantPin { previous })
}

/// Restores the previous pin (none, or an outer handler's) when dropped,
/// including when an error unwinds through the handler call.
pub struct TenantPin {
    previous: Option<String>,
}

impl Drop for TenantPin {
    fn drop(&mut self) {
        let previous = self.previous.take();
        PINNED.with(|p| *p.borrow_mut() = previous);
    }
}

/// `billing.tenant`, or `'default'` when unset or empty.
fn requested_tenant() -> Result<String> {
    // SAFETY: GetConfigOption returns NULL or a pointer to the setting's value,
    // valid until the setting changes, which cannot happen while we copy it.
    let raw = unsafe { pg_sys::GetConfigOption(c"billing.tenant".as_ptr(), true, false) };
    let value = if raw.is_null() {
        String::new()
    } else {
        unsafe { CStr::from_ptr(raw) }
            .to_string_lossy()
            .into_owned()
    };
    if value.is_empty() {
        return Ok(DEFAULT_TENANT.to_string());
    }
    validate_tenant(&value)?;
    Ok(value)
}

pub fn validate_tenant(t: &str) -> Result<()> {
    let ok = !t.is_empty()
        && t.len() <= 63
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(BillingError::InvalidTenant(t.chars().take(80).collect()))
    }
}

/// The session's role after any SET ROLE; SECURITY DEFINER does not change it.
pub fn outer_role() -> Oid {
    // SAFETY: reads a backend global.
    unsafe { pg_sys::GetOuterUserId() }
}

/// May `role` grant credit of the kinds payments and plans create (topup,
/// reload, refund, plan)? Roles with `billing_app`'s privileges may (the
/// application's own money-in code); a support role (`billing_support`
/// alone) grants only by hand, under the tenant's grant policy.
pub fn may_credit_payments(role: Oid) -> bool {
    has_privileges_of(role, c"billing_app")
}

/// Has `role` the privileges of the role named `name` (one of the billing
/// roles; false if it does not exist)? A superuser has every role's.
fn has_privileges_of(role: Oid, name: &CStr) -> bool {
    // SAFETY: plain catalog lookups.
    let named = unsafe { pg_sys::get_role_oid(name.as_ptr(), true) };
    named != pg_sys::InvalidOid && unsafe { pg_sys::has_privs_of_role(role, named) }
}

/// The calling role (`outer_role`), for the SQL functions that record who
/// decided something (sql/grant_controls.sql).
#[pg_extern(stable)]
fn calling_role() -> Oid {
    outer_role()
}

/// The name of a role, or None when no role has that OID (it was dropped,
/// possibly while one of its sessions is still connected).
pub fn role_name(role: Oid) -> Option<String> {
    // SAFETY: with noerr = true the lookup returns NULL for a missing role
    // instead of raising; a non-NULL result is a palloc'd C string.
    let raw = unsafe { pg_sys::GetUserNameFromId(role, true) };
    if raw.is_null() {
        return None;
    }
    Some(
        unsafe { CStr::from_ptr(raw) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Is `tenant` granted to `role` or to a role whose privileges it has
/// (`pg_has_role(…, 'USAGE')`)? Read straight from `tenant_roles`' primary
/// key (`crate::direct`), since every billing call asks.
fn tenant_granted(role: Oid, tenant: &str) -> Result<bool> {
    let mut lookup = Lookup::open(c"tenant_roles", c"tenant_roles_pkey", 1, Snapshot::Query)?;
    let granted = lookup.find(&[Key::Text(tenant)], |t| t.get::<Oid>(c"role_id"))?;
    lookup.close();
    // SAFETY: a catalog lookup; a granted role dropped since has no members.
    Ok(granted
        .into_iter()
        .any(|granted| unsafe { pg_sys::has_privs_of_role(role, granted) }))
}

/// May `role` act for `tenant`? A role that no longer exists may not.
fn authorize(role: Oid, tenant: &str) -> Result<()> {
    // SAFETY: a catalog lookup (cached for the last role asked); a role
    // that no longer exists is not a superuser.
    if unsafe { pg_sys::superuser_arg(role) } {
        return Ok(());
    }
    let Some(name) = role_name(role) else {
        return Err(BillingError::TenantDenied {
            tenant: tenant.to_string(),
            role: format!("{} (dropped)", role.to_u32()),
        });
    };
    if has_privileges_of(role, c"billing_admin") {
        return Ok(());
    }
    let granted = tenant_granted(role, tenant)?;
    if granted {
        return Ok(());
    }
    Err(BillingError::TenantDenied {
        tenant: tenant.to_string(),
        role: name,
    })
}

/// The tenant this session acts for; raises 42501 if its role may not.
/// Row-level security policies compare every row's tenant_id with it.
#[pg_extern(name = "current_tenant", security_definer, stable)]
#[search_path(pg_catalog, billing, pg_temp)]
fn current_tenant_sql() -> String {
    current_tenant().or_raise()
}
