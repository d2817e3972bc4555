//! Rows read straight from a table's unique index, without a statement.
//!
//! Running one prepared statement through SPI costs a fixed amount (plan
//! revalidation, executor start and end, snapshot handling) that was most of
//! a lookup by key: the gate's pool read and ingest's key lookup use this
//! instead. A lookup scans with either the calling query's snapshot (a pure
//! read such as the gate) or a new one (a read after waiting for a lock,
//! which must see what the previous holder committed), exactly as a read-only
//! or a writing statement would. Row-level security is not applied: callers
//! pass the tenant `tenancy::current_tenant` authorised as the first key,
//! which is all the policies would admit. Columns are found by name.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::{FromDatum, IntoDatum};

use crate::error::{BillingError, Result};

const SCHEMA: &CStr = c"billing";

/// Which snapshot a lookup reads with.
pub enum Snapshot {
    /// The calling query's: what a read-only statement sees.
    Query,
    /// A new one: what a statement run now sees (under READ COMMITTED, every
    /// commit so far; under REPEATABLE READ, the transaction's snapshot).
    New,
}

/// The value of one leading index column a lookup compares with.
#[derive(Clone, Copy)]
pub enum Key<'a> {
    Text(&'a str),
    Int8(i64),
    Int2(i16),
}

/// An open index scan over `billing.<table>` by the leading columns of one
/// of its indexes. `close` it when done; if an error is raised
/// first, the transaction's abort releases what it holds.
pub struct Lookup {
    rel: pg_sys::Relation,
    idx: pg_sys::Relation,
    scan: pg_sys::IndexScanDesc,
    slot: *mut pg_sys::TupleTableSlot,
    snapshot: pg_sys::Snapshot,
    registered: bool,
    keys: Vec<pg_sys::ScanKeyData>,
}

impl Lookup {
    pub fn open(table: &CStr, index: &CStr, nkeys: usize, snapshot: Snapshot) -> Result<Lookup> {
        Lookup::open_with(table, index, nkeys, snapshot, pg_sys::AccessShareLock)
    }

    /// A lookup whose rows `find_locked` locks, as `SELECT … FOR UPDATE`
    /// would (the table opened in RowShareLock, a new snapshot).
    pub fn open_for_update(table: &CStr, index: &CStr, nkeys: usize) -> Result<Lookup> {
        Lookup::open_with(table, index, nkeys, Snapshot::New, pg_sys::RowShareLock)
    }

    fn open_with(
        table: &CStr,
        index: &CStr,
        nkeys: usize,
        snapshot: Snapshot,
        table_lock: u32,
    ) -> Result<Lookup> {
        // SAFETY: called inside a SQL function, so a transaction, an active
        // snapshot and a memory context exist. Relation locks are kept to the
        // transaction's end, as a statement's are.
        unsafe {
            let schema = pg_sys::get_namespace_oid(SCHEMA.as_ptr(), false);
            let rel = pg_sys::table_open(relation(table, schema)?, table_lock as _);
            let idx = pg_sys::index_open(relation(index, schema)?, pg_sys::AccessShareLock as _);
            let (snapshot, registered) = match snapshot {
                Snapshot::Query => (pg_sys::GetActiveSnapshot(), false),
                Snapshot::New => (
                    pg_sys::RegisterSnapshot(pg_sys::GetTransactionSnapshot()),
                    true,
                ),
            };
            let scan = pg_sys::index_beginscan(rel, idx, snapshot, nkeys as i32, 0);
            let slot = pg_sys::table_slot_create(rel, std::ptr::null_mut());
            Ok(Lookup {
                rel,
                idx,
                scan,
                slot,
                snapshot,
                registered,
                keys: vec![std::mem::zeroed(); nkeys],
            })
        }
    }

    /// The rows whose leading index columns equal `keys`, in index order,
    /// each read by `read`.
    pub fn find<T>(
        &mut self,
        keys: &[Key],
        mut read: impl FnMut(&Tuple) -> Result<T>,
    ) -> Result<Vec<T>> {
        let mut rows = Vec::new();
        // SAFETY: the scan, slot and relations are open (see `open`).
        unsafe {
            self.rescan(keys);
            let dir = pg_sys::ScanDirection::ForwardScanDirection;
            while pg_sys::index_getnext_slot(self.scan, dir, self.slot) {
                rows.push(read(&self.tuple())?);
            }
        }
        Ok(rows)
    }

    /// As `find`, each row locked as `SELECT … FOR UPDATE` locks it: after
    /// waiting for a transaction that holds it, the row's latest version is
    /// locked and read (under REPEATABLE READ, a row changed since the
    /// snapshot raises 40001 instead, as the executor does).
    pub fn find_locked<T>(
        &mut self,
        keys: &[Key],
        mut read: impl FnMut(&Tuple) -> Result<T>,
    ) -> Result<Vec<T>> {
        let tids = self.find(keys, |t| Ok(t.tid))?;
        let mut rows = Vec::new();
        // SAFETY: the relation and slot are open; the tids are rows this
        // scan saw, which table_tuple_lock follows to their latest version.
        unsafe {
            for mut tid in tids {
                let mut failure: pg_sys::TM_FailureData = std::mem::zeroed();
                let result = pg_sys::table_tuple_lock(
                    self.rel,
                    &mut tid,
                    self.snapshot,
                    self.slot,
                    pg_sys::GetCurrentCommandId(true),
                    pg_sys::LockTupleMode::LockTupleExclusive,
                    pg_sys::LockWaitPolicy::LockWaitBlock,
                    pg_sys::TUPLE_LOCK_FLAG_FIND_LAST_VERSION as u8,
                    &mut failure,
                );
                match result {
                    pg_sys::TM_Result::TM_Ok => rows.push(read(&self.tuple())?),
                    // deleted meanwhile: not there (billing never deletes these rows)
                    pg_sys::TM_Result::TM_Deleted => {}
                    other => {
                        return Err(BillingError::Internal(format!(
                            "locking a row of billing.{} failed ({other})",
                            self.table_name()
                        )))
                    }
                }
            }
        }
        Ok(rows)
    }

    unsafe fn rescan(&mut self, keys: &[Key]) {
        assert_eq!(keys.len(), self.keys.len(), "one value per scan key");
        for (i, key) in keys.iter().enumerate() {
            // a text datum is allocated in the current memory context, which outlives the scan
            let (proc, datum) = match *key {
                Key::Text(v) => (pg_sys::F_TEXTEQ, v.into_datum()),
                Key::Int8(v) => (pg_sys::F_INT8EQ, v.into_datum()),
                Key::Int2(v) => (pg_sys::F_INT2EQ, v.into_datum()),
            };
            pg_sys::ScanKeyEntryInitialize(
                &mut self.keys[i],
                0,
                (i + 1) as pg_sys::AttrNumber,
                pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::InvalidOid,
                // the index's own collation, so the descent orders as the index does
                *(*self.idx).rd_indcollation.add(i),
                pg_sys::Oid::from(proc),
                datum.unwrap_or(pg_sys::Datum::from(0)),
            );
        }
        let n = self.keys.len() as i32;
        pg_sys::index_rescan(
            self.scan,
            self.keys.as_mut_ptr(),
            n,
            std::ptr::null_mut(),
            0,
        );
    }

    /// The slot's current row, all its columns decoded.
    unsafe fn tuple(&self) -> Tuple<'_> {
        let natts = (*(*self.rel).rd_att).natts;
        pg_sys::slot_getsomeattrs_int(self.slot, natts);
        Tuple {
            rel: self.rel,
            tid: (*self.slot).tts_tid,
            values: std::slice::from_raw_parts((*self.slot).tts_values, natts as usize),
            nulls: std::slice::from_raw_parts((*self.slot).tts_isnull, natts as usize),
        }
    }

    fn table_name(&self) -> String {
        // SAFETY: the relation is open.
        unsafe { CStr::from_ptr((*(*self.rel).rd_rel).relname.data.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    pub fn close(self) {
        // SAFETY: everything was opened by `open` and is closed once.
        unsafe {
            pg_sys::index_endscan(self.scan);
            pg_sys::ExecDropSingleTupleTableSlot(self.slot);
            if self.registered {
                pg_sys::UnregisterSnapshot(self.snapshot);
            }
            pg_sys::index_close(self.idx, pg_sys::NoLock as _);
            pg_sys::table_close(self.rel, pg_sys::NoLock as _);
        }
    }
}

unsafe fn relation(name: &CStr, schema: pg_sys::Oid) -> Result<pg_sys::Oid> {
    let oid = pg_sys::get_relname_relid(name.as_ptr(), schema);
    if oid == pg_sys::InvalidOid {
        return Err(BillingError::Internal(format!(
            "billing.{} is missing",
            name.to_string_lossy()
        )));
    }
    Ok(oid)
}

/// A row found by a lookup, valid while its `read` runs.
pub struct Tuple<'a> {
    rel: pg_sys::Relation,
    tid: pg_sys::ItemPointerData,
    values: &'a [pg_sys::Datum],
    nulls: &'a [bool],
}

impl Tuple<'_> {
    /// A column that may be NULL.
    pub fn opt<T: FromDatum>(&self, name: &CStr) -> Result<Option<T>> {
        // SAFETY: the relation is open; attnameAttNum raises for an unknown
        // column. The datum belongs to the slot's current tuple, of the
        // column's own type, which the caller names.
        unsafe {
            let attno = pg_sys::attnameAttNum(self.rel, name.as_ptr(), false);
            let i = (attno - 1) as usize;
            Ok(T::from_datum(self.values[i], self.nulls[i]))
        }
    }

    /// A column that is never NULL.
    pub fn get<T: FromDatum>(&self, name: &CStr) -> Result<T> {
        self.opt(name)?.ok_or_else(|| {
            BillingError::Internal(format!(
                "unexpected NULL in column {}",
                name.to_string_lossy()
            ))
        })
    }
}

/// The next value of the sequence `billing.<sequence>`, as `nextval` would
/// give it (and with its privilege check).
pub fn next_value(sequence: &CStr) -> Result<i64> {
    // SAFETY: inside a transaction; nextval_oid takes the sequence's oid.
    unsafe {
        let schema = pg_sys::get_namespace_oid(SCHEMA.as_ptr(), false);
        let seq = relation(sequence, schema)?;
        pgrx::direct_function_call::<i64>(pg_sys::nextval_oid, &[seq.into_datum()])
            .ok_or_else(|| BillingError::Internal("nextval returned NULL".into()))
    }
}
