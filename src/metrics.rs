//! Usage events answered, by outcome, counted in shared memory: applied,
//! duplicate (a replayed key) and rejected (what pg_billing refused: a strict
//! event it could not pay, bad input, a limit; a failed batch counts once).
//! An error PostgreSQL raises under the call (a lock or statement timeout, a
//! deadlock) ends it before it is counted.
//! Those answers write nothing a query could count afterwards, so they are
//! counted as they are given, whether or not the caller's transaction then
//! commits. The memory is set aside at server start, so the counters are kept
//! only when pg_billing is in `shared_preload_libraries`; otherwise nothing is
//! counted and `billing.metrics()` has no such rows.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};

#[derive(Default)]
pub struct UsageAnswers {
    applied: AtomicU64,
    duplicate: AtomicU64,
    rejected: AtomicU64,
}

// SAFETY: plain atomics, valid at any address and shared between processes.
unsafe impl PGRXSharedMemory for UsageAnswers {}

// SAFETY: the name is this extension's own.
static ANSWERS: PgAtomic<UsageAnswers> = unsafe { PgAtomic::new(c"pg_billing usage answers") };

/// Set in the postmaster when it preloads the library; its backends inherit it.
static KEPT: AtomicBool = AtomicBool::new(false);

/// From `_PG_init`: ask for the counters' memory when the server preloads
/// pg_billing (the only moment it can be asked for).
// pg_shmem_init! tests the features of PostgreSQL versions this crate does not declare
#[allow(unexpected_cfgs)]
pub fn init() {
    // SAFETY: a backend global, read in _PG_init.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        pg_shmem_init!(ANSWERS);
        KEPT.store(true, Ordering::Relaxed);
    }
}

fn answers() -> Option<&'static UsageAnswers> {
    KEPT.load(Ordering::Relaxed).then(|| ANSWERS.get())
}

/// Count one usage event answered with `status` (applied, duplicate; any
/// other is a rejection).
pub fn count(status: &str) {
    if let Some(a) = answers() {
        let counter = match status {
            "applied" => &a.applied,
            "duplicate" => &a.duplicate,
            _ => &a.rejected,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The counters, for `billing.metrics()` (sql/metrics.sql); no rows when
/// they are not kept. Volatile: they move while a statement runs.
#[pg_extern]
fn usage_answers() -> TableIterator<'static, (name!(outcome, String), name!(events, i64))> {
    let rows = answers().map_or_else(Vec::new, |a| {
        [
            ("applied", &a.applied),
            ("duplicate", &a.duplicate),
            ("rejected", &a.rejected),
        ]
        .into_iter()
        .map(|(outcome, n)| {
            let n = i64::try_from(n.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
            (outcome.to_string(), n)
        })
        .collect()
    });
    TableIterator::new(rows)
}
