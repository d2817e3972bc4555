//! Rows read from an index, locked and written straight into the tables,
//! without a statement.
//!
//! Running one prepared statement through SPI costs a fixed amount (plan
//! revalidation, executor start and end, snapshot handling) about as large
//! as a lookup by key or a one-row write: the hot paths (the gate, ingest's
//! lookups, pool locks and writes) use this instead. A lookup scans with either the calling query's snapshot (a pure
//! read such as the gate) or a new one (a read after waiting for a lock,
//! which must see what the previous holder committed), exactly as a read-only
//! or a writing statement would. Row-level security is not applied: callers
//! pass the tenant `tenancy::current_tenant` authorised as the first key,
//! which is all the policies would admit. Columns are found by name.

use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::ffi::CStr;

use pgrx::pg_guard;
use pgrx::pg_sys;
use pgrx::{FromDatum, IntoDatum};

use crate::error::{BillingError, Result};

const SCHEMA: &CStr = c"billing";

/// Whether the transaction reads one snapshot throughout (REPEATABLE READ
/// or SERIALIZABLE): a row changed since by another transaction is then a
/// serialization failure for a writer, as the executor makes it.
pub fn snapshot_isolation() -> bool {
    // SAFETY: reads a backend-local setting.
    unsafe { pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32 }
}

/// Refuse to lock or write in a read-only transaction (25006; a hot
/// standby's transactions are read-only) or in parallel mode, as a statement
/// that writes is refused.
pub fn writing(what: &CStr) {
    // SAFETY: both raise an ERROR, or return.
    unsafe {
        pg_sys::PreventCommandIfReadOnly(what.as_ptr());
        pg_sys::PreventCommandIfParallelMode(what.as_ptr());
    }
}

thread_local! {
    /// Attribute numbers found by name, per (relation, column name): the
    /// names are static, so their address names them. Emptied for a
    /// relation whenever its relcache entry is invalidated (its columns may
    /// have changed), by `forget_columns`.
    static COLUMNS: RefCell<FxHashMap<(pg_sys::Oid, usize), usize>> = RefCell::new(FxHashMap::default());
    /// The OIDs of billing.<name> by the (static) name's address, forgotten
    /// with the relation's relcache entry (it was dropped, or altered).
    static RELATIONS: RefCell<FxHashMap<usize, pg_sys::Oid>> = RefCell::new(FxHashMap::default());
}

/// Follow relcache invalidations (from `_PG_init`).
pub fn watch_column_changes() {
    // SAFETY: called from _PG_init; the callback only empties thread-local state.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(forget_columns), pg_sys::Datum::from(0)) }
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_columns(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    COLUMNS.with(|c| {
        let mut c = c.borrow_mut();
        if relid == pg_sys::InvalidOid {
            c.clear();
        } else {
            c.retain(|(rel, _), _| *rel != relid);
        }
    });
    RELATIONS.with(|r| {
        let mut r = r.borrow_mut();
        if relid == pg_sys::InvalidOid {
            r.clear();
        } else {
            r.retain(|_, oid| *oid != relid);
        }
    });
}

/// The attribute number of `column` of `rel`, from 0; an unknown column is an error.
fn column_index(rel: pg_sys::Relation, column: &'static CStr) -> Result<usize> {
    // SAFETY: the relation is open.
    let relid = unsafe { (*rel).rd_id };
    let key = (relid, column.as_ptr() as usize);
    if let Some(i) = COLUMNS.with(|c| c.borrow().get(&key).copied()) {
        return Ok(i);
    }
    // SAFETY: the relation is open; attnameAttNum returns 0 (InvalidAttrNumber)
    // for a name it does not know.
    let attno = unsafe { pg_sys::attnameAttNum(rel, column.as_ptr(), false) };
    if attno <= 0 {
        return Err(BillingError::Internal(format!(
            "billing.{} has no column {}",
            relation_name(rel),
            column.to_string_lossy()
        )));
    }
    let i = (attno - 1) as usize;
    COLUMNS.with(|c| c.borrow_mut().insert(key, i));
    Ok(i)
}

/// The row of `billing.<table>` whose leading `index` columns equal `keys`
/// (an index on a unique key), read by `read`; None if there is none.
pub fn find_one<T>(
    table: &'static CStr,
    index: &'static CStr,
    keys: &[Key],
    snapshot: Snapshot,
    read: impl FnMut(&Tuple) -> Result<T>,
) -> Result<Option<T>> {
    let mut lookup = Lookup::open(table, index, keys.len(), snapshot)?;
    let found = lookup.find(keys, read)?.into_iter().next();
    lookup.close();
    Ok(found)
}

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
    /// A timestamptz, in PostgreSQL's microseconds.
    Tstz(i64),
}

/// How a row lock meets a transaction that holds the row: wait for it, or
/// pass the row by (`SKIP LOCKED`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Waiting {
    Block,
    Skip,
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
    pub fn open(
        table: &'static CStr,
        index: &'static CStr,
        nkeys: usize,
        snapshot: Snapshot,
    ) -> Result<Lookup> {
        Lookup::open_with(table, index, nkeys, snapshot, pg_sys::AccessShareLock)
    }

    /// A lookup whose rows `find_locked` locks, as `SELECT … FOR UPDATE`
    /// would (the table opened in RowShareLock, a new snapshot).
    pub fn open_for_update(
        table: &'static CStr,
        index: &'static CStr,
        nkeys: usize,
    ) -> Result<Lookup> {
        writing(c"SELECT FOR UPDATE");
        Lookup::open_with(table, index, nkeys, Snapshot::New, pg_sys::RowShareLock)
    }

    fn open_with(
        table: &'static CStr,
        index: &'static CStr,
        nkeys: usize,
        snapshot: Snapshot,
        table_lock: u32,
    ) -> Result<Lookup> {
        // SAFETY: called inside a SQL function, so a transaction, an active
        // snapshot and a memory context exist. Relation locks are kept to the
        // transaction's end, as a statement's are.
        let (table, index) = (relation(table)?, relation(index)?);
        unsafe {
            let rel = pg_sys::table_open(table, table_lock as _);
            let idx = pg_sys::index_open(index, pg_sys::AccessShareLock as _);
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

    /// As `find`, each row locked as `SELECT … FOR UPDATE` locks it (see
    /// `lock_found`).
    pub fn find_locked<T>(
        &mut self,
        keys: &[Key],
        mut read: impl FnMut(&Tuple) -> Result<T>,
    ) -> Result<Vec<T>> {
        let found = self.find(keys, |t| Ok(t.at()))?;
        let mut rows = Vec::new();
        for at in found {
            if let Some(row) = self.lock_found(at, Waiting::Block, &mut read)? {
                rows.push(row);
            }
        }
        Ok(rows)
    }

    /// Lock the row whose version this lookup found `at`, as `SELECT … FOR
    /// UPDATE` locks it (`Waiting::Skip`: with SKIP LOCKED), and `read` the
    /// version locked. After waiting for a transaction that held it, the row's
    /// latest version is locked (under REPEATABLE READ or SERIALIZABLE, a row
    /// changed since the snapshot is a serialization failure, 40001, as the
    /// executor makes it). None: another transaction holds it (skipping), or
    /// it was deleted.
    pub fn lock_found<T>(
        &mut self,
        at: RowAt,
        waiting: Waiting,
        read: impl FnOnce(&Tuple) -> Result<T>,
    ) -> Result<Option<T>> {
        // as the executor locks rows: under READ COMMITTED a row changed
        // meanwhile is locked in its latest version
        let snapshot_isolation = snapshot_isolation();
        let flags = if snapshot_isolation {
            0
        } else {
            pg_sys::TUPLE_LOCK_FLAG_FIND_LAST_VERSION as u8
        };
        let policy = match waiting {
            Waiting::Block => pg_sys::LockWaitPolicy::LockWaitBlock,
            Waiting::Skip => pg_sys::LockWaitPolicy::LockWaitSkip,
        };
        let mut tid = at.0;
        // SAFETY: the relation and slot are open; `at` is a row version this
        // scan saw, which table_tuple_lock follows to its latest version.
        let result = unsafe {
            let mut failure: pg_sys::TM_FailureData = std::mem::zeroed();
            pg_sys::table_tuple_lock(
                self.rel,
                &mut tid,
                self.snapshot,
                self.slot,
                pg_sys::GetCurrentCommandId(true),
                pg_sys::LockTupleMode::LockTupleExclusive,
                policy,
                flags,
                &mut failure,
            )
        };
        match result {
            // SAFETY: the slot holds the version just locked.
            pg_sys::TM_Result::TM_Ok => Ok(Some(read(&unsafe { self.tuple() })?)),
            pg_sys::TM_Result::TM_Updated if snapshot_isolation => {
                Err(BillingError::Retry(format!(
                    "could not serialize access due to concurrent update of a row of billing.{}",
                    self.table_name()
                )))
            }
            // held by another transaction, and this lock skips it
            pg_sys::TM_Result::TM_WouldBlock => Ok(None),
            // deleted meanwhile: not there (billing never deletes these rows)
            pg_sys::TM_Result::TM_Deleted => Ok(None),
            other => Err(BillingError::Internal(format!(
                "locking a row of billing.{} failed ({other})",
                self.table_name()
            ))),
        }
    }

    unsafe fn rescan(&mut self, keys: &[Key]) {
        assert_eq!(keys.len(), self.keys.len(), "one value per scan key");
        for (i, key) in keys.iter().enumerate() {
            // a text datum is allocated in the current memory context, which outlives the scan
            let (proc, datum) = match *key {
                Key::Text(v) => (pg_sys::F_TEXTEQ, v.into_datum()),
                Key::Int8(v) => (pg_sys::F_INT8EQ, v.into_datum()),
                Key::Int2(v) => (pg_sys::F_INT2EQ, v.into_datum()),
                Key::Tstz(v) => (pg_sys::F_TIMESTAMPTZ_EQ, v.into_datum()),
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
        let (values, nulls) = slot_columns(self.slot, (*(*self.rel).rd_att).natts as usize);
        Tuple {
            rel: self.rel,
            tid: (*self.slot).tts_tid,
            values,
            nulls,
        }
    }

    fn table_name(&self) -> String {
        relation_name(self.rel)
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

fn relation_name(rel: pg_sys::Relation) -> String {
    // SAFETY: callers pass a relation they hold open.
    unsafe { CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// The oid of `billing.<name>`, a table, index or sequence.
/// The OID of relation `billing.<name>`.
pub fn relation(name: &'static CStr) -> Result<pg_sys::Oid> {
    let key = name.as_ptr() as usize;
    if let Some(oid) = RELATIONS.with(|r| r.borrow().get(&key).copied()) {
        return Ok(oid);
    }
    // SAFETY: catalog lookups inside a transaction.
    let oid = unsafe {
        let schema = pg_sys::get_namespace_oid(SCHEMA.as_ptr(), false);
        pg_sys::get_relname_relid(name.as_ptr(), schema)
    };
    if oid == pg_sys::InvalidOid {
        return Err(BillingError::Internal(format!(
            "billing.{} is missing",
            name.to_string_lossy()
        )));
    }
    RELATIONS.with(|r| r.borrow_mut().insert(key, oid));
    Ok(oid)
}

/// The columns of a slot's current row, all decoded.
///
/// # Safety
/// `slot` holds a row of a relation with `natts` columns; the slices are
/// valid until the slot changes.
unsafe fn slot_columns<'a>(
    slot: *mut pg_sys::TupleTableSlot,
    natts: usize,
) -> (&'a [pg_sys::Datum], &'a [bool]) {
    if usize::try_from((*slot).tts_nvalid).unwrap_or(0) < natts {
        pg_sys::slot_getsomeattrs_int(slot, natts as i32);
    }
    (
        std::slice::from_raw_parts((*slot).tts_values, natts),
        std::slice::from_raw_parts((*slot).tts_isnull, natts),
    )
}

/// Where a row version is in its table (its tid): as a lookup found it or
/// a write left it. A later update starts there instead of descending the
/// primary key again, if it is still the row's current version.
#[derive(Clone, Copy)]
pub struct RowAt(pg_sys::ItemPointerData);

/// A row found by a lookup, valid while its `read` runs.
pub struct Tuple<'a> {
    rel: pg_sys::Relation,
    tid: pg_sys::ItemPointerData,
    values: &'a [pg_sys::Datum],
    nulls: &'a [bool],
}

impl Tuple<'_> {
    /// Where this version of the row is.
    pub fn at(&self) -> RowAt {
        RowAt(self.tid)
    }

    /// A column that may be NULL.
    pub fn opt<T: FromDatum>(&self, name: &'static CStr) -> Result<Option<T>> {
        let i = column_index(self.rel, name)?;
        // SAFETY: the datum belongs to the slot's current tuple, of the
        // column's own type, which the caller names.
        unsafe { Ok(T::from_datum(self.values[i], self.nulls[i])) }
    }

    /// A column that is never NULL.
    pub fn get<T: FromDatum>(&self, name: &'static CStr) -> Result<T> {
        self.opt(name)?.ok_or_else(|| {
            BillingError::Internal(format!(
                "unexpected NULL in column {}",
                name.to_string_lossy()
            ))
        })
    }
}

/// A sequence `billing.<name>`, found once for the values a call takes.
pub struct Sequence(pg_sys::Oid);

impl Sequence {
    pub fn named(name: &'static CStr) -> Result<Sequence> {
        Ok(Sequence(relation(name)?))
    }

    /// Its next value, as `nextval` would give it (and with its privilege check).
    pub fn next(&self) -> Result<i64> {
        // SAFETY: inside a transaction; nextval_oid takes the sequence's oid.
        unsafe { pgrx::direct_function_call::<i64>(pg_sys::nextval_oid, &[self.0.into_datum()]) }
            .ok_or_else(|| BillingError::Internal("nextval returned NULL".into()))
    }
}

/// Rows written straight into `billing.<table>`, without a statement: the
/// heap and every index, as the executor writes them for INSERT and UPDATE
/// (the path PostgreSQL's logical replication apply takes): NOT NULL
/// constraints checked, AFTER triggers queued and fired at `close`, unique
/// indexes raising 23505. Column defaults are not applied: a writer sets every
/// column it needs, and a column left unset is NULL (a NOT NULL column then
/// raises). `close` makes the rows visible to the rest of the call.
pub struct Writer {
    table: &'static CStr,
    rel: pg_sys::Relation,
    estate: *mut pg_sys::EState,
    rri: *mut pg_sys::ResultRelInfo,
    slot: *mut pg_sys::TupleTableSlot,
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
    set: Vec<bool>,
    /// The table's primary key, for `update`.
    by_id: Option<Lookup>,
    /// The row an update starts from when its place is known.
    known: *mut pg_sys::TupleTableSlot,
    /// Where one row's values and its index entries are made; emptied
    /// after each row, so a large batch takes no more memory than one row.
    row_memory: pgrx::PgMemoryContexts,
}

impl Writer {
    pub fn open(table: &'static CStr) -> Result<Writer> {
        writing(c"INSERT or UPDATE");
        let oid = relation(table)?;
        // SAFETY: inside a SQL function's transaction. The executor state is
        // built as PostgreSQL's apply worker builds it for one relation.
        unsafe {
            let rel = pg_sys::table_open(oid, pg_sys::RowExclusiveLock as _);
            let estate = pg_sys::CreateExecutorState();
            let mut rte =
                pgrx::PgBox::<pg_sys::RangeTblEntry>::alloc_node(pg_sys::NodeTag::T_RangeTblEntry);
            rte.rtekind = pg_sys::RTEKind::RTE_RELATION;
            rte.relid = oid;
            rte.relkind = (*(*rel).rd_rel).relkind;
            rte.rellockmode = pg_sys::RowExclusiveLock as _;
            let range = pg_sys::lappend(std::ptr::null_mut(), rte.into_pg().cast());
            pg_sys::ExecInitRangeTable(estate, range);
            (*estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
            (*estate).es_snapshot = pg_sys::GetActiveSnapshot();
            let rri =
                pgrx::PgBox::<pg_sys::ResultRelInfo>::alloc_node(pg_sys::NodeTag::T_ResultRelInfo)
                    .into_pg();
            pg_sys::InitResultRelInfo(rri, rel, 1, std::ptr::null_mut(), 0);
            (*estate).es_opened_result_relations =
                pg_sys::lappend((*estate).es_opened_result_relations, rri.cast());
            pg_sys::ExecOpenIndices(rri, false);
            pg_sys::AfterTriggerBeginQuery();
            let slot = pg_sys::table_slot_create(rel, std::ptr::null_mut());
            let natts = (*(*rel).rd_att).natts as usize;
            Ok(Writer {
                table,
                rel,
                estate,
                rri,
                slot,
                values: vec![pg_sys::Datum::from(0); natts],
                nulls: vec![true; natts],
                set: vec![false; natts],
                by_id: None,
                known: std::ptr::null_mut(),
                row_memory: pgrx::PgMemoryContexts::new("billing row"),
            })
        }
    }

    /// Set a column of the next row (`None` for NULL).
    pub fn set<T: IntoDatum>(&mut self, column: &'static CStr, value: T) -> Result<&mut Self> {
        // SAFETY: the datum lives in the row's memory until the row is written.
        let datum = unsafe { self.row_memory.switch_to(|_| value.into_datum()) };
        self.put(column, datum)
    }

    /// Set a column of the next row to a datum of the column's own type,
    /// made by `make` in the row's memory.
    pub fn set_made(
        &mut self,
        column: &'static CStr,
        make: impl FnOnce() -> Result<pg_sys::Datum>,
    ) -> Result<&mut Self> {
        // SAFETY: as `set`.
        let datum = unsafe { self.row_memory.switch_to(|_| make()) }?;
        self.put(column, Some(datum))
    }

    fn put(&mut self, column: &'static CStr, datum: Option<pg_sys::Datum>) -> Result<&mut Self> {
        let i = column_index(self.rel, column)?;
        self.values[i] = datum.unwrap_or(pg_sys::Datum::from(0));
        self.nulls[i] = datum.is_none();
        self.set[i] = true;
        Ok(self)
    }

    /// Insert the row set so far; every column is unset again afterwards.
    /// Returns where the row is.
    pub fn insert(&mut self) -> Result<RowAt> {
        // SAFETY: the slot is the relation's; the values live in the row's
        // memory until `reset`, after the row is written, which left its
        // place in the slot.
        let at = unsafe {
            self.store(None);
            let (rri, estate, slot) = (self.rri, self.estate, self.slot);
            self.row_memory
                .switch_to(|_| pg_sys::ExecSimpleRelationInsert(rri, estate, slot));
            RowAt((*slot).tts_tid)
        };
        self.reset();
        Ok(at)
    }

    /// Update the row whose `id` is `id`: the columns set so far change,
    /// the others keep their values. The row must exist. `at` is where it
    /// was last seen (its lock, its read, its last update by this call):
    /// if that version is still the current one, the primary key is not
    /// searched. Returns where the new version is.
    pub fn update(&mut self, pkey: &'static CStr, id: i64, at: Option<RowAt>) -> Result<RowAt> {
        self.refuse_before_update_triggers()?;
        if let Some(at) = at {
            if let Some(new) = self.update_at(at, |t| Ok(t.get::<i64>(c"id")? == id))? {
                return Ok(new);
            }
        }
        if self.by_id.is_none() {
            self.by_id = Some(Lookup::open(self.table, pkey, 1, Snapshot::New)?);
        }
        let lookup = self.by_id.as_mut().expect("opened above");
        let found = lookup.find(&[Key::Int8(id)], |t| Ok(t.tid))?;
        let old = lookup.slot;
        if found.is_empty() {
            return Err(BillingError::Internal(format!(
                "billing.{} row {id} vanished",
                self.table_name()
            )));
        }
        // SAFETY: the lookup's slot holds the row just found (its current
        // version: this call holds the pool's lock, and the snapshot is new).
        Ok(unsafe { self.update_from(old) })
    }

    /// Update the row version at `at` if it is still its row's current
    /// version (what a new snapshot sees there) and `is_row` says it is the
    /// row meant; None, writing nothing, if not.
    pub fn update_if_current(
        &mut self,
        at: RowAt,
        is_row: impl FnOnce(&Tuple) -> Result<bool>,
    ) -> Result<Option<RowAt>> {
        self.refuse_before_update_triggers()?;
        self.update_at(at, is_row)
    }

    /// `update_if_current`, its trigger check done by the caller.
    fn update_at(
        &mut self,
        at: RowAt,
        is_row: impl FnOnce(&Tuple) -> Result<bool>,
    ) -> Result<Option<RowAt>> {
        // SAFETY: the relation is open; the slot is the relation's own and
        // holds the fetched version (pinned) until the update below.
        unsafe {
            if self.known.is_null() {
                self.known = pg_sys::table_slot_create(self.rel, std::ptr::null_mut());
            }
            let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetTransactionSnapshot());
            let mut tid = at.0;
            let visible =
                pg_sys::table_tuple_fetch_row_version(self.rel, &mut tid, snapshot, self.known);
            pg_sys::UnregisterSnapshot(snapshot);
            if !visible {
                return Ok(None);
            }
            let (values, nulls) = slot_columns(self.known, self.values.len());
            let found = Tuple {
                rel: self.rel,
                tid,
                values,
                nulls,
            };
            if !is_row(&found)? {
                pg_sys::ExecClearTuple(self.known);
                return Ok(None);
            }
            Ok(Some(self.update_from(self.known)))
        }
    }

    /// A BEFORE row trigger on UPDATE would need a recheck state this writer
    /// does not build (the append-only tables, which have one, are only
    /// inserted into).
    fn refuse_before_update_triggers(&self) -> Result<()> {
        // SAFETY: the relation is open.
        let triggers = unsafe { (*self.rel).trigdesc };
        if !triggers.is_null() && unsafe { (*triggers).trig_update_before_row } {
            return Err(BillingError::Internal(format!(
                "billing.{} has a BEFORE UPDATE row trigger, which pg_billing does not support",
                self.table_name()
            )));
        }
        Ok(())
    }

    /// Replace the row version `old` holds with the columns set so far and
    /// its other columns; where the new version is.
    ///
    /// # Safety
    /// `old` holds the current version of a row of this writer's relation.
    unsafe fn update_from(&mut self, old: *mut pg_sys::TupleTableSlot) -> RowAt {
        // its unchanged columns are copied into the new row before `old` moves on
        let natts = self.values.len();
        let (old_values, old_nulls) = slot_columns(old, natts);
        for i in 0..natts {
            if !self.set[i] {
                self.values[i] = old_values[i];
                self.nulls[i] = old_nulls[i];
            }
        }
        self.store(Some((*old).tts_tid));
        let (rri, estate, slot) = (self.rri, self.estate, self.slot);
        self.row_memory.switch_to(|_| {
            pg_sys::ExecSimpleRelationUpdate(rri, estate, std::ptr::null_mut(), old, slot)
        });
        // the update left the new version's place in the slot
        let new = RowAt((*self.slot).tts_tid);
        pg_sys::ExecClearTuple(old);
        self.reset();
        new
    }

    unsafe fn store(&mut self, tid: Option<pg_sys::ItemPointerData>) {
        pg_sys::ExecClearTuple(self.slot);
        let natts = self.values.len();
        std::slice::from_raw_parts_mut((*self.slot).tts_values, natts)
            .copy_from_slice(&self.values);
        std::slice::from_raw_parts_mut((*self.slot).tts_isnull, natts).copy_from_slice(&self.nulls);
        pg_sys::ExecStoreVirtualTuple(self.slot);
        if let Some(tid) = tid {
            (*self.slot).tts_tid = tid;
        }
    }

    /// Forget the row just written and free what it took.
    fn reset(&mut self) {
        self.nulls.fill(true);
        self.set.fill(false);
        // SAFETY: nothing refers to the row's memory once it is written: the
        // heap and index tuples were copied into their pages.
        unsafe {
            pg_sys::ExecClearTuple(self.slot);
            self.row_memory.reset();
            let per_tuple = (*self.estate).es_per_tuple_exprcontext;
            if !per_tuple.is_null() {
                pg_sys::MemoryContextReset((*per_tuple).ecxt_per_tuple_memory);
            }
        }
    }

    fn table_name(&self) -> String {
        relation_name(self.rel)
    }

    /// Fire the AFTER triggers the rows queued, release the executor state
    /// and make the rows visible to the rest of the call.
    pub fn close(self) {
        // SAFETY: everything was opened by `open` and is closed once.
        unsafe {
            if let Some(lookup) = self.by_id {
                lookup.close();
            }
            if !self.known.is_null() {
                pg_sys::ExecDropSingleTupleTableSlot(self.known);
            }
            pg_sys::ExecDropSingleTupleTableSlot(self.slot);
            pg_sys::AfterTriggerEndQuery(self.estate);
            pg_sys::ExecCloseResultRelations(self.estate);
            // slots the executor made (a trigger's old row) hold pins
            pg_sys::ExecResetTupleTable((*self.estate).es_tupleTable, false);
            pg_sys::FreeExecutorState(self.estate);
            pg_sys::table_close(self.rel, pg_sys::NoLock as _);
            pg_sys::CommandCounterIncrement();
        }
    }
}

/// An enum type `billing.<name>`, found once for the values a call writes.
pub struct EnumType(pg_sys::Oid);

impl EnumType {
    pub fn named(name: &CStr) -> Result<EnumType> {
        // SAFETY: a catalog lookup inside a transaction.
        let oid = unsafe {
            let schema = pg_sys::get_namespace_oid(SCHEMA.as_ptr(), false);
            pg_sys::GetSysCacheOid(
                pg_sys::SysCacheIdentifier::TYPENAMENSP as i32,
                pg_sys::Anum_pg_type_oid as i16,
                pg_sys::Datum::from(name.as_ptr()),
                pg_sys::Datum::from(schema),
                pg_sys::Datum::from(0),
                pg_sys::Datum::from(0),
            )
        };
        if oid == pg_sys::InvalidOid {
            return Err(BillingError::Internal(format!(
                "type billing.{} is missing",
                name.to_string_lossy()
            )));
        }
        Ok(EnumType(oid))
    }

    /// Its value `label`, as a datum.
    pub fn value(&self, label: &CStr) -> Result<pg_sys::Datum> {
        // SAFETY: enum_in takes the label and the type's oid.
        unsafe {
            pgrx::direct_function_call_as_datum(
                pg_sys::enum_in,
                &[
                    Some(pg_sys::Datum::from(label.as_ptr())),
                    Some(pg_sys::Datum::from(self.0)),
                ],
            )
        }
        .ok_or_else(|| BillingError::Internal("enum_in returned NULL".into()))
    }
}

/// JSON text as a `jsonb` datum, read by PostgreSQL's own parser (numbers
/// kept exactly as written).
pub fn jsonb(text: &str) -> Result<pg_sys::Datum> {
    let text = std::ffi::CString::new(text)
        .map_err(|_| BillingError::invalid("properties", "must not contain NUL"))?;
    // SAFETY: jsonb_in takes a C string, copied into the result.
    unsafe {
        pgrx::direct_function_call_as_datum(
            pg_sys::jsonb_in,
            &[Some(pg_sys::Datum::from(text.as_ptr()))],
        )
    }
    .ok_or_else(|| BillingError::Internal("jsonb_in returned NULL".into()))
}
