//! A pool's rows read straight from the pools table's unique index, without
//! a statement: the gate's one read. Planning-free and executor-free, it
//! costs what a primary-key lookup costs inside PostgreSQL, where running a
//! prepared statement through SPI cost the gate more than half its time.
//!
//! The scan uses the calling query's snapshot, as a read-only statement
//! would, and runs on a hot standby. Row-level security is not applied:
//! the scan keys name the tenant `tenancy::current_tenant` authorised, which
//! is all the pools policy admits. Columns are found by name.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::{FromDatum, IntoDatum};

use super::PoolRow;
use crate::error::{BillingError, Result};
use crate::time::Ts;

const SCHEMA: &CStr = c"billing";
const POOLS: &CStr = c"pools";
/// UNIQUE (tenant_id, account, unit, lane) of billing.pools.
const POOLS_KEY: &CStr = c"pools_tenant_id_account_unit_lane_key";

/// The rows of the (tenant, account, unit) pool, lane order (the pool's own
/// row first); empty if the pool does not exist.
pub fn read(tenant: &str, account: &str, unit: &str) -> Result<Vec<PoolRow>> {
    // SAFETY: called inside a query (a SQL function), so a transaction, an
    // active snapshot and a memory context exist; every relation, scan and
    // slot opened here is closed before returning, and on error the
    // transaction's abort releases them.
    unsafe {
        let schema = pg_sys::get_namespace_oid(SCHEMA.as_ptr(), false);
        let table = relation(POOLS, schema)?;
        let index = relation(POOLS_KEY, schema)?;
        let rel = pg_sys::table_open(table, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let idx = pg_sys::index_open(index, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let columns = Columns::of(rel);
        let mut keys: [pg_sys::ScanKeyData; 3] = std::mem::zeroed();
        for (i, value) in [tenant, account, unit].into_iter().enumerate() {
            pg_sys::ScanKeyEntryInitialize(
                &mut keys[i],
                0,
                (i + 1) as pg_sys::AttrNumber,
                pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::InvalidOid,
                // the index's own collation, so the descent orders as the index does
                *(*idx).rd_indcollation.add(i),
                pg_sys::Oid::from(pg_sys::F_TEXTEQ),
                value.into_datum().unwrap_or(pg_sys::Datum::from(0)),
            );
        }
        let scan = pg_sys::index_beginscan(rel, idx, pg_sys::GetActiveSnapshot(), 3, 0);
        pg_sys::index_rescan(scan, keys.as_mut_ptr(), 3, std::ptr::null_mut(), 0);
        let slot = pg_sys::table_slot_create(rel, std::ptr::null_mut());
        let mut rows = Vec::new();
        let mut result = Ok(());
        while pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot) {
            match columns.read(slot) {
                Ok(row) => rows.push(row),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        pg_sys::index_endscan(scan);
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::index_close(idx, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        result.map(|()| rows)
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

/// Attribute numbers of the columns the gate reads, found by name.
struct Columns {
    natts: i32,
    id: usize,
    lane: usize,
    lanes: usize,
    floor: usize,
    version: usize,
    remaining: usize,
    debt: usize,
    held: usize,
    active_remaining: usize,
    active_held: usize,
    cache_from: usize,
    cache_until: usize,
}

impl Columns {
    unsafe fn of(rel: pg_sys::Relation) -> Columns {
        let at = |name: &CStr| -> usize {
            // attnameAttNum raises if the column does not exist
            (pg_sys::attnameAttNum(rel, name.as_ptr(), false) - 1) as usize
        };
        Columns {
            natts: (*(*rel).rd_att).natts,
            id: at(c"id"),
            lane: at(c"lane"),
            lanes: at(c"lanes"),
            floor: at(c"floor"),
            version: at(c"version"),
            remaining: at(c"remaining"),
            debt: at(c"debt"),
            held: at(c"held"),
            active_remaining: at(c"active_remaining"),
            active_held: at(c"active_held"),
            cache_from: at(c"cache_from"),
            cache_until: at(c"cache_until"),
        }
    }

    unsafe fn read(&self, slot: *mut pg_sys::TupleTableSlot) -> Result<PoolRow> {
        if i32::from((*slot).tts_nvalid) < self.natts {
            pg_sys::slot_getsomeattrs_int(slot, self.natts);
        }
        let values = std::slice::from_raw_parts((*slot).tts_values, self.natts as usize);
        let nulls = std::slice::from_raw_parts((*slot).tts_isnull, self.natts as usize);
        let int8 = |i: usize| -> Result<i64> {
            i64::from_datum(values[i], nulls[i]).ok_or_else(|| null_column(i))
        };
        let int2 = |i: usize| -> Result<i32> {
            i16::from_datum(values[i], nulls[i])
                .map(i32::from)
                .ok_or_else(|| null_column(i))
        };
        // timestamptz is an int64 of microseconds; the infinities are its extremes
        let instant = |i: usize| -> Result<Ts> { int8(i) };
        Ok(PoolRow {
            id: int8(self.id)?,
            lane: int2(self.lane)?,
            lanes: int2(self.lanes)?,
            floor: int8(self.floor)?,
            version: int8(self.version)?,
            remaining: int8(self.remaining)?,
            debt: int8(self.debt)?,
            held: int8(self.held)?,
            active_remaining: int8(self.active_remaining)?,
            active_held: int8(self.active_held)?,
            cache_from: instant(self.cache_from)?,
            cache_until: instant(self.cache_until)?,
        })
    }
}

fn null_column(attno: usize) -> BillingError {
    BillingError::Internal(format!("billing.pools column {} is NULL", attno + 1))
}
