//! A pool's rows, read straight from the pools' unique index (see
//! `crate::direct`): the gate's one read.

use super::PoolRow;
use crate::direct::{Key, Lookup, Snapshot, Tuple};
use crate::error::Result;
use crate::metering::store::KeptCounter;

/// The rows of the (tenant, account, unit) pool, in lane order (the pool's
/// own row first), with the calling query's snapshot; empty if the pool does
/// not exist.
pub fn read(tenant: &str, account: &str, unit: &str) -> Result<Vec<PoolRow>> {
    let mut lookup = Lookup::open(c"pools", super::POOLS_KEY, 3, Snapshot::Query)?;
    let keys = [Key::Text(tenant), Key::Text(account), Key::Text(unit)];
    let rows = lookup.find(&keys, pool_row);
    lookup.close();
    rows
}

pub fn pool_row(t: &Tuple) -> Result<PoolRow> {
    Ok(PoolRow {
        id: t.get(c"id")?,
        lane: t.get::<i16>(c"lane")?.into(),
        lanes: t.get::<i16>(c"lanes")?.into(),
        floor: t.get(c"floor")?,
        version: t.get(c"version")?,
        remaining: t.get(c"remaining")?,
        debt: t.get(c"debt")?,
        held: t.get(c"held")?,
        active_remaining: t.get(c"active_remaining")?,
        active_held: t.get(c"active_held")?,
        // a timestamptz is its microseconds; the infinities are i64's extremes, as `Ts`'s
        cache_from: t.get::<i64>(c"cache_from")?,
        cache_until: t.get::<i64>(c"cache_until")?,
        allowance_next: t.get::<i64>(c"allowance_next")?,
        limited: t.get(c"limited")?,
        reload_below: t.opt(c"reload_below")?,
        alerts: super::AlertBounds {
            below: t.opt(c"alert_below")?,
            above: t.opt(c"alert_above")?,
        },
        // the gate never needs it
        counter: None,
        at: Some(t.at()),
        drawn: super::Drawn {
            grant: t.opt(c"drawn_grant")?,
            amount: t.get(c"drawn")?,
        },
    })
}

/// A pool row locked for a change: with the usage counter it keeps.
pub fn locked_pool_row(t: &Tuple) -> Result<PoolRow> {
    Ok(PoolRow {
        counter: KeptCounter::from_tuple(t)?,
        ..pool_row(t)?
    })
}
