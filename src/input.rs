//! Validation of every caller-supplied value. A call that fails here has
//! written nothing: validation runs before the first statement.

use pgrx::JsonB;

use crate::error::{BillingError, Result};

pub const MAX_KEY_BYTES: usize = 255;
pub const MAX_ACCOUNT_BYTES: usize = 128;
pub const MAX_JSON_BYTES: usize = 16 * 1024;
pub const MAX_HOLD_TTL_SECONDS: i64 = 30 * 24 * 3600;

fn printable(s: &str) -> bool {
    !s.chars().any(|c| c.is_control())
}

/// An account id: the application's own id, 1–128 bytes, no control characters.
pub fn account(a: &str) -> Result<()> {
    if a.is_empty() || a.trim().is_empty() {
        return Err(BillingError::invalid("account", "must not be empty"));
    }
    if a.len() > MAX_ACCOUNT_BYTES || !printable(a) {
        return Err(BillingError::invalid(
            "account",
            format!("must be at most {MAX_ACCOUNT_BYTES} bytes without control characters"),
        ));
    }
    Ok(())
}

/// Unit and meter names: a lowercase identifier, so typos cannot hide in case or spaces.
pub fn name(field: &'static str, n: &str) -> Result<()> {
    let mut chars = n.chars();
    let ok = n.len() <= 63
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(BillingError::invalid(
            field,
            format!("\"{}\" must match ^[a-z][a-z0-9_]{{0,62}}$", clip(n)),
        ))
    }
}

/// An idempotency key: 1–255 bytes, no control characters.
pub fn key(field: &'static str, k: &str) -> Result<()> {
    if k.trim().is_empty() {
        return Err(BillingError::invalid(field, "must not be empty"));
    }
    if k.len() > MAX_KEY_BYTES || !printable(k) {
        return Err(BillingError::invalid(
            field,
            format!("must be at most {MAX_KEY_BYTES} bytes without control characters"),
        ));
    }
    Ok(())
}

pub fn opt_key(field: &'static str, k: Option<&str>) -> Result<()> {
    k.map_or(Ok(()), |k| key(field, k))
}

pub fn positive(field: &'static str, v: i64) -> Result<()> {
    if v <= 0 {
        return Err(BillingError::invalid(
            field,
            format!("must be greater than 0, got {v}"),
        ));
    }
    Ok(())
}

pub fn non_negative(field: &'static str, v: i64) -> Result<()> {
    if v < 0 {
        return Err(BillingError::invalid(
            field,
            format!("must not be negative, got {v}"),
        ));
    }
    Ok(())
}

/// A JSON object of bounded size (metadata, properties).
pub fn json_object(field: &'static str, v: &JsonB) -> Result<String> {
    if !v.0.is_object() {
        return Err(BillingError::invalid(field, "must be a JSON object"));
    }
    let text = v.0.to_string();
    if text.len() > MAX_JSON_BYTES {
        return Err(BillingError::invalid(
            field,
            format!("is {} bytes; the limit is {MAX_JSON_BYTES}", text.len()),
        ));
    }
    Ok(text)
}

pub fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}
