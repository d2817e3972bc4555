//! Which tenant a call acts for. Every function resolves its tenant here, so
//! the role model tightens one place.

use std::ffi::CStr;

use pgrx::pg_sys;

use crate::error::{BillingError, Result};

pub const DEFAULT_TENANT: &str = "default";

/// The session's tenant: `billing.tenant`, or `'default'` when unset or empty.
pub fn current_tenant() -> Result<String> {
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

fn validate_tenant(t: &str) -> Result<()> {
    let ok = t.len() <= 63
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(BillingError::InvalidTenant(t.chars().take(80).collect()))
    }
}
