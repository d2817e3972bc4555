//! Every error pg_billing raises, and the SQLSTATE each one maps to. This is the
//! only place that decides codes; README's error table mirrors it.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BillingError {
    /// A caller-supplied value is out of its allowed domain.
    #[error("invalid {field}: {problem}")]
    InvalidInput {
        field: &'static str,
        problem: String,
    },

    /// A required argument was NULL.
    #[error("{0} must not be null")]
    NullArgument(&'static str),

    /// An amount or a computed cost does not fit in a bigint.
    #[error("amount out of range: {0}")]
    Overflow(String),

    /// A unit, meter, account, grant or hold that does not exist in this tenant.
    #[error("unknown {kind} \"{name}\"")]
    Unknown { kind: &'static str, name: String },

    /// The same idempotency key arrived with different content.
    #[error("idempotency key reused with different parameters: {what} key \"{key}\"")]
    KeyReused { what: &'static str, key: String },

    /// A strict debit or a reservation would take the pool below its floor.
    #[error(
        "insufficient credits: {unit} available {available}, requested {requested}, floor {floor}"
    )]
    InsufficientCredits {
        unit: String,
        available: i64,
        requested: i64,
        floor: i64,
    },

    /// A strict debit or a reservation would pass one of the pool's limits.
    #[error("limit \"{name}\" reached: {used} of {max} used {window}, requested {requested}")]
    LimitReached {
        name: String,
        max: i64,
        used: i64,
        requested: i64,
        /// "this window, which resets at …" or "ever"
        window: String,
    },

    /// The object exists but is in a state that does not allow the operation.
    #[error("{0}")]
    WrongState(String),

    /// The calling role may not do this (a support role granting credit of a
    /// kind that only payments and plans create).
    #[error("{0}")]
    NotAllowed(String),

    /// The calling role was not granted the tenant it asked for.
    #[error("role \"{role}\" may not act for tenant \"{tenant}\"")]
    TenantDenied { tenant: String, role: String },

    /// A row this call needs (an account's pool, most often) stayed locked by
    /// another transaction for longer than the wait allowed.
    #[error("{what} is held by another transaction; gave up after {waited_ms} ms")]
    LockWait { what: String, waited_ms: i32 },

    /// A debit on a lane of a split pool found its credit not yet
    /// spendable at the transaction's start time (it became spendable while
    /// the transaction ran): nothing was written, a retry succeeds.
    #[error("{0}")]
    Retry(String),

    /// The session's tenant setting is not a usable tenant name.
    #[error("invalid tenant \"{0}\"")]
    InvalidTenant(String),

    /// A statement inside pg_billing failed; this is a bug, not a caller mistake.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, BillingError>;

impl BillingError {
    pub fn invalid(field: &'static str, problem: impl Into<String>) -> Self {
        BillingError::InvalidInput {
            field,
            problem: problem.into(),
        }
    }

    pub fn unknown(kind: &'static str, name: impl Into<String>) -> Self {
        BillingError::Unknown {
            kind,
            name: name.into(),
        }
    }

    pub fn sqlstate(&self) -> PgSqlErrorCode {
        use BillingError::*;
        match self {
            InvalidInput { .. } => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, // 22023
            NullArgument(_) => PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,      // 22004
            Overflow(_) => PgSqlErrorCode::ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,      // 22003
            Unknown { .. } => PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,             // 42704
            KeyReused { .. } => PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION,           // 23505
            InsufficientCredits { .. } => PgSqlErrorCode::ERRCODE_CHECK_VIOLATION,  // 23514
            LimitReached { .. } => PgSqlErrorCode::ERRCODE_CHECK_VIOLATION,         // 23514
            WrongState(_) => PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, // 55000
            InvalidTenant(_) => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,    // 22023
            TenantDenied { .. } => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,  // 42501
            NotAllowed(_) => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,        // 42501
            LockWait { .. } => PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,          // 55P03
            Retry(_) => PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,          // 40001
            Internal(_) => PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,                  // XX000
        }
    }

    /// What the caller should do about it.
    pub fn hint(&self) -> Option<String> {
        use BillingError::*;
        match self {
            InvalidInput { .. } => None,
            NullArgument(_) => Some("Pass a value, or leave the argument out to use its default.".into()),
            Overflow(_) => Some("Amounts are bigint minor units; split the amount or use a smaller unit.".into()),
            Unknown { kind: "unit", .. } => Some("Grant credits in the unit first, or create it with billing.define_unit().".into()),
            Unknown { kind: "meter or unit", .. } => Some("Define the meter with billing.define_meter(), or grant credits in a unit of that name.".into()),
            Unknown { .. } => None,
            KeyReused { .. } => Some("Use a new key for a new request; a retry must repeat the original parameters exactly.".into()),
            InsufficientCredits { .. } => Some("Grant or top up credits, release holds, or call without strict to record the usage as debt.".into()),
            LimitReached { .. } => Some("Wait for the limit's window to reset (billing.limits_status), raise it with billing.set_limit, or call without strict to record usage that was already incurred.".into()),
            WrongState(_) => None,
            LockWait { .. } => Some("A transaction that debited this account has not ended: billing calls hold the account's pool until their transaction commits. Keep them at the end of short transactions; for slow work, reserve in a short transaction, do the work outside it, then settle. To wait longer, raise lock_timeout or billing.lock_timeout (milliseconds; 0 waits without limit).".into()),
            Retry(_) => Some("Retry the transaction: a new transaction sees the credit.".into()),
            NotAllowed(_) => Some("Grant it as manual or promo (a support role's kinds), or from the application's role (billing_app).".into()),
            TenantDenied { .. } => Some("SET billing.tenant to a tenant granted to this role (billing.grant_tenant), or ask a billing_admin.".into()),
            InvalidTenant(_) => Some("SET billing.tenant to 1-63 characters of letters, digits, '_', '-', '.' or ':'.".into()),
            Internal(_) => Some("This is a pg_billing bug; please report it with the statement that caused it.".into()),
        }
    }

    /// Raise this error as a PostgreSQL ERROR; the transaction rolls back.
    pub fn raise(self) -> ! {
        let mut report = ErrorReport::new(self.sqlstate(), self.to_string(), "pg_billing");
        if let Some(hint) = self.hint() {
            report = report.set_hint(hint);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

impl From<pgrx::spi::SpiError> for BillingError {
    fn from(e: pgrx::spi::SpiError) -> Self {
        BillingError::Internal(format!("SPI: {e}"))
    }
}

/// Unwrap a result at the SQL boundary: a value, or the mapped ERROR.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.raise(),
        }
    }
}
