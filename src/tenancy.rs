//! Which tenant a call acts for, decided in one place.
//!
//! The session names a tenant in the `billing.tenant` setting (default
//! `'default'`). The call may act for it only if the *outer* role — the role
//! of the session after any SET ROLE, which SECURITY DEFINER functions do not
//! change — is a superuser, has the privileges of `billing_admin`, or has the
//! privileges of a role granted that tenant in `billing.tenant_roles`. Changing
//! the setting therefore reaches no tenant the role was not granted.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::db::{self, Sql, OID, TEXT};
use crate::error::{BillingError, OrRaise, Result};

pub const DEFAULT_TENANT: &str = "default";

/// The tenant this call acts for, after checking the calling role may.
pub fn current_tenant() -> Result<String> {
    let tenant = requested_tenant()?;
    authorize(&tenant)?;
    Ok(tenant)
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

static TENANT_GRANTED: Sql = Sql {
    text: "SELECT 1 FROM billing.tenant_roles r \
           WHERE r.tenant_id = $1 AND pg_catalog.pg_has_role($2, r.role_name, 'USAGE') LIMIT 1",
    args: &[TEXT, OID],
};

fn authorize(tenant: &str) -> Result<()> {
    // SAFETY: plain catalog lookups on the current backend's user.
    let user = unsafe { pg_sys::GetOuterUserId() };
    if unsafe { pg_sys::superuser_arg(user) } {
        return Ok(());
    }
    let admin = unsafe { pg_sys::get_role_oid(c"billing_admin".as_ptr(), true) };
    if admin != pg_sys::InvalidOid && unsafe { pg_sys::has_privs_of_role(user, admin) } {
        return Ok(());
    }
    let granted = Spi::connect(|c| -> Result<bool> {
        Ok(!db::read(c, &TENANT_GRANTED, &[tenant.into(), user.into()])?.is_empty())
    })?;
    if granted {
        return Ok(());
    }
    let name = unsafe { CStr::from_ptr(pg_sys::GetUserNameFromId(user, true)) }
        .to_string_lossy()
        .into_owned();
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
