//! Validation of every caller-supplied value. A call that fails here has
//! written nothing: validation runs before the first statement.

use crate::error::{BillingError, Result};

pub const MAX_KEY_BYTES: usize = 255;
pub const MAX_ACCOUNT_BYTES: usize = 128;
pub const MAX_JSON_BYTES: usize = 16 * 1024;
pub const MAX_HOLD_TTL_SECONDS: i64 = 30 * 24 * 3600;

/// A required argument: NULL is the error 22004 naming it. Every SQL
/// function takes its arguments as Option and passes the required ones
/// through here, so a NULL never reaches pgrx's own unboxing (which raises
/// XX000) and never turns a call into a silent NULL result.
pub fn required<T>(field: &'static str, v: Option<T>) -> Result<T> {
    v.ok_or(BillingError::NullArgument(field))
}

/// An account and a unit, both required and well-formed: the pool a call names.
pub fn pool<'a>(account: Option<&'a str>, unit: Option<&'a str>) -> Result<(&'a str, &'a str)> {
    let account = required("account", account)?;
    let unit = required("unit", unit)?;
    self::account(account)?;
    name("unit", unit)?;
    Ok((account, unit))
}

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

/// Usage event keys that pg_billing makes itself (a settled hold's usage is
/// `billing:hold:<id>`) begin with this; callers' keys may not.
pub const RESERVED_KEY_PREFIX: &str = "billing:";

/// A caller's usage event key: a key, outside pg_billing's own namespace.
pub fn event_key(field: &'static str, k: &str) -> Result<()> {
    key(field, k)?;
    if k.starts_with(RESERVED_KEY_PREFIX) {
        return Err(BillingError::invalid(
            field,
            format!("keys beginning with \"{RESERVED_KEY_PREFIX}\" are reserved for pg_billing"),
        ));
    }
    Ok(())
}

/// A person's note (why a grant was given): at most 1,000 characters.
pub fn opt_note(field: &'static str, n: Option<&str>) -> Result<()> {
    match n {
        Some(n) if n.chars().count() > 1000 => Err(BillingError::invalid(
            field,
            "must be at most 1,000 characters",
        )),
        _ => Ok(()),
    }
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
pub fn json_object(field: &'static str, v: &serde_json::Value) -> Result<String> {
    if !v.is_object() {
        return Err(BillingError::invalid(field, "must be a JSON object"));
    }
    let text = v.to_string();
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

/// Bytes a jsonb argument parsed into a tree may have: far above every
/// limit checked on the parsed value (metadata, properties, headers), so it
/// only keeps a huge argument from being parsed at all. A batch of events is
/// read as text instead, under its own limit.
pub const MAX_JSON_ARG_BYTES: usize = 1024 * 1024;

/// A jsonb argument, converted on demand and without panicking. pgrx's
/// `JsonB` parses the value's text with serde_json when the call starts, and
/// panics (XX000) on JSON nested deeper than serde_json's limit of 128; this
/// keeps the datum, so the call can check the size first and report any
/// failure as a clear 22023.
pub struct JsonArg {
    datum: pgrx::pg_sys::Datum,
    parsed: std::cell::OnceCell<std::result::Result<serde_json::Value, String>>,
}

impl JsonArg {
    /// The size of the value in bytes, read without detoasting it.
    pub fn size(&self) -> usize {
        // SAFETY: the datum is the call's jsonb argument, valid for the call.
        unsafe { pgrx::pg_sys::toast_raw_datum_size(self.datum) }
    }

    /// Run `f` on the value's JSON text; the text is freed afterwards.
    pub fn with_text<T>(&self, f: impl FnOnce(&[u8]) -> T) -> T {
        use pgrx::pg_sys;
        // SAFETY: the datum is a jsonb varlena (the function's declared type);
        // jsonb_out returns a palloc'd C string, freed after use.
        unsafe {
            let varlena = self.datum.cast_mut_ptr::<pg_sys::varlena>();
            let detoasted = pg_sys::pg_detoast_datum_packed(varlena);
            let text = pgrx::direct_function_call::<&core::ffi::CStr>(
                pg_sys::jsonb_out,
                &[Some(detoasted.into())],
            )
            .expect("jsonb_out returns text");
            if detoasted != varlena {
                pg_sys::pfree(detoasted as *mut core::ffi::c_void);
            }
            let out = f(text.to_bytes());
            pg_sys::pfree(text.as_ptr() as *mut core::ffi::c_void);
            out
        }
    }

    /// The value, or the 22023 error that says why it is unusable.
    pub fn value(&self, field: &'static str) -> Result<&serde_json::Value> {
        self.parsed
            .get_or_init(|| {
                if self.size() > MAX_JSON_ARG_BYTES {
                    return Err(format!(
                        "is {} bytes; the limit is {MAX_JSON_ARG_BYTES}",
                        self.size()
                    ));
                }
                self.with_text(|t| serde_json::from_slice(t).map_err(|e| e.to_string()))
            })
            .as_ref()
            .map_err(|why| unusable_json(field, why))
    }
}

/// JSON text (a `JsonArg`'s, read by `with_text`) as a value, or the 22023
/// error `JsonArg::value` gives.
pub fn json_text_value(field: &'static str, text: &[u8]) -> Result<serde_json::Value> {
    serde_json::from_slice(text).map_err(|e| unusable_json(field, &e.to_string()))
}

fn unusable_json(field: &'static str, why: &str) -> BillingError {
    BillingError::invalid(field, format!("is not usable JSON: {why}"))
}

impl pgrx::FromDatum for JsonArg {
    unsafe fn from_polymorphic_datum(
        datum: pgrx::pg_sys::Datum,
        is_null: bool,
        _: pgrx::pg_sys::Oid,
    ) -> Option<Self> {
        if is_null {
            return None;
        }
        Some(JsonArg {
            datum,
            parsed: std::cell::OnceCell::new(),
        })
    }
}

// SAFETY: JsonArg is read from, and declared in SQL as, jsonb.
unsafe impl pgrx::pgrx_sql_entity_graph::metadata::SqlTranslatable for JsonArg {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(JsonArg);
    const TYPE_ORIGIN: pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin =
        pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin::External;
    const ARGUMENT_SQL: std::result::Result<
        pgrx::pgrx_sql_entity_graph::metadata::SqlMappingRef,
        pgrx::pgrx_sql_entity_graph::metadata::ArgumentError,
    > = Ok(pgrx::pgrx_sql_entity_graph::metadata::SqlMappingRef::literal("jsonb"));
    const RETURN_SQL: std::result::Result<
        pgrx::pgrx_sql_entity_graph::metadata::ReturnsRef,
        pgrx::pgrx_sql_entity_graph::metadata::ReturnsError,
    > = Ok(pgrx::pgrx_sql_entity_graph::metadata::ReturnsRef::One(
        pgrx::pgrx_sql_entity_graph::metadata::SqlMappingRef::literal("jsonb"),
    ));
}

// SAFETY: unboxed exactly as pgrx unboxes its own FromDatum types.
unsafe impl<'fcx> pgrx::callconv::ArgAbi<'fcx> for JsonArg {
    unsafe fn unbox_arg_unchecked(arg: pgrx::callconv::Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        unsafe { arg.unbox_arg_using_from_datum() }
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }

    unsafe fn unbox_nullable_arg(
        arg: pgrx::callconv::Arg<'_, 'fcx>,
    ) -> pgrx::nullable::Nullable<Self> {
        unsafe { arg.unbox_arg_using_from_datum() }.into()
    }
}
