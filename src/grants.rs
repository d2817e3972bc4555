//! Money in: grants, and taking unspent credit back out (void, revoke).

use pgrx::datum::TimestampWithTimeZone as Tstz;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;

use crate::db::{self, Row, Sql, BYTEA, INT4, INT8, JSONB, TEXT, TSTZ};
use crate::direct::{self, Key, Sequence, Snapshot, Tuple, Writer};
use crate::error::{BillingError, OrRaise, Result};
use crate::idempotency::{self, Fingerprint};
use crate::input::{self, JsonArg};
use crate::ledger::core::{grant_facts, grant_is_closed};
use crate::ledger::{set_grant_remaining, Create, EntryKind, GrantState, PoolLedger, SUSPENDED};
use crate::reversal::{self, Adjustment, GrantFacts};
use crate::tenancy::{self, current_tenant};
use crate::time::{self, Ts};

/// Kinds an operator gives by hand (goodwill, compensation, promotions): the
/// ones a tenant's grant policy controls (sql/grant_controls.sql).
pub fn given_by_hand(kind: &str) -> bool {
    matches!(kind, "manual" | "promo")
}

/// Default drain priority by kind: plans are spent first, bought credit last.
pub fn default_priority(kind: &str) -> Option<i32> {
    match kind {
        "plan" => Some(10),
        "promo" => Some(50),
        "manual" => Some(50),
        "refund" => Some(90),
        "topup" => Some(90),
        "reload" => Some(90),
        _ => None,
    }
}

struct GrantRequest<'a> {
    account: &'a str,
    unit: &'a str,
    amount: i64,
    kind: &'a str,
    priority: i32,
    effective_at: Option<Ts>,
    expires_at: Option<Ts>,
    key: Option<&'a str>,
    metadata: &'a serde_json::Value,
    metadata_text: String,
    reason: Option<&'a str>,
}

impl GrantRequest<'_> {
    /// Rules that hold whatever the time: checked before anything is read.
    fn validate(&self) -> Result<()> {
        input::account(self.account)?;
        input::name("unit", self.unit)?;
        input::positive("amount", self.amount)?;
        input::opt_key("key", self.key)?;
        input::opt_note("reason", self.reason)?;
        if !(0..=1000).contains(&self.priority) {
            return Err(BillingError::invalid(
                "priority",
                "must be between 0 and 1000",
            ));
        }
        Ok(())
    }

    /// Rules relative to now: checked only for a new grant, after its key was
    /// looked up, so a replay returns its original outcome forever.
    fn validate_at(&self, now: Ts) -> Result<()> {
        if let Some(exp) = self.expires_at {
            if exp <= self.effective_at.unwrap_or(now) {
                return Err(BillingError::invalid(
                    "expires_at",
                    "must be after effective_at",
                ));
            }
            if exp <= now {
                return Err(BillingError::invalid("expires_at", "must be in the future"));
            }
        }
        Ok(())
    }

    fn fingerprint(&self) -> Vec<u8> {
        let f = Fingerprint::new("grant")
            .text(self.account)
            .text(self.unit)
            .int(self.amount)
            .text(self.kind)
            .int(self.priority as i64)
            .opt_int(self.effective_at)
            .opt_int(self.expires_at)
            .text(&self.metadata_text);
        // a grant without a reason keeps the fingerprint it always had
        match self.reason {
            Some(r) => f.text("reason").text(r).finish(),
            None => f.finish(),
        }
    }
}

type GrantRow = (
    name!(grant_id, i64),
    name!(status, String),
    name!(kind, String),
    name!(priority, i32),
    name!(amount, i64),
    name!(remaining, i64),
    name!(effective_at, Tstz),
    name!(expires_at, Option<Tstz>),
    name!(debt_repaid, i64),
    name!(available, i64),
);

/// A grant by hand: refused, counted and perhaps sent for approval by the
/// unit's policy (sql/grant_controls.sql); `needs` says why it waits.
static GRANT_CONTROL: Sql = Sql {
    text: "SELECT billing.grant_control($1, $2, $3, $4, $5, $6::oid::regrole) AS needs",
    args: &[TEXT, TEXT, TEXT, INT8, TEXT, INT8],
};

static ASK_APPROVAL: Sql = Sql {
    text: "INSERT INTO billing.grant_approvals (grant_id, tenant_id, account, unit, kind, priority, amount, \
              effective_at, expires_at, key, request_hash, metadata, reason, needs, requested_by) \
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15::oid::regrole)",
    args: &[
        INT8, TEXT, TEXT, TEXT, TEXT, INT4, INT8, TSTZ, TSTZ, TEXT, BYTEA, JSONB, TEXT, TEXT, INT8,
    ],
};

static APPROVE: Sql = Sql {
    text: "SELECT already, account, unit, kind, priority, amount, effective_at, expires_at, key, request_hash, \
                  metadata, reason, requested_by::oid::bigint AS requested_by \
           FROM billing.approve_pending_grant($1, $2, $3::oid::regrole)",
    args: &[TEXT, INT8, INT8],
};

/// Add credits to an account's pool. Idempotent by `key`; a new grant first repays debt.
#[allow(clippy::too_many_arguments)]
#[pg_extern(name = "grant", security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn grant_credits(
    account: Option<&str>,
    unit: Option<&str>,
    amount: Option<i64>,
    kind: default!(Option<&str>, "'manual'"),
    priority: default!(Option<i32>, "NULL"),
    effective_at: default!(Option<Tstz>, "NULL"),
    expires_at: default!(Option<Tstz>, "NULL"),
    key: default!(Option<&str>, "NULL"),
    metadata: default!(Option<JsonArg>, "'{}'"),
    reason: default!(Option<&str>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(grant_id, i64),
        name!(status, String),
        name!(kind, String),
        name!(priority, i32),
        name!(amount, i64),
        name!(remaining, i64),
        name!(effective_at, Tstz),
        name!(expires_at, Option<Tstz>),
        name!(debt_repaid, i64),
        name!(available, i64),
    ),
> {
    let result = (|| {
        let metadata = input::required("metadata", metadata.as_ref())?;
        let req = build_request(
            input::required("account", account)?,
            input::required("unit", unit)?,
            input::required("amount", amount)?,
            input::required("kind", kind)?,
            priority,
            effective_at,
            expires_at,
            key,
            metadata,
            reason,
        )?;
        Spi::connect_mut(|client| apply_grant(client, &req))
    })();
    TableIterator::once(result.or_raise())
}

/// What a top-up grant became: its id, `applied` or `duplicate`, and its amount.
pub struct Credited {
    pub grant_id: i64,
    pub status: String,
    pub amount: i64,
}

/// A paid top-up, as `billing.grant(account, unit, amount, kind => 'topup',
/// key => key, metadata => metadata)` would credit it: the same request,
/// fingerprint and checks, without the call.
pub fn topup(
    client: &mut SpiClient<'_>,
    account: &str,
    unit: &str,
    amount: i64,
    key: &str,
    metadata: &serde_json::Value,
) -> Result<Credited> {
    let req = GrantRequest {
        account,
        unit,
        amount,
        kind: "topup",
        priority: default_priority("topup").unwrap_or_default(),
        effective_at: None,
        expires_at: None,
        key: Some(key),
        metadata,
        metadata_text: input::json_object("metadata", metadata)?,
        reason: None,
    };
    req.validate()?;
    let row = apply_grant(client, &req)?;
    Ok(Credited {
        grant_id: row.0,
        status: row.1,
        amount: row.4,
    })
}

#[allow(clippy::too_many_arguments)]
fn build_request<'a>(
    account: &'a str,
    unit: &'a str,
    amount: i64,
    kind: &'a str,
    priority: Option<i32>,
    effective_at: Option<Tstz>,
    expires_at: Option<Tstz>,
    key: Option<&'a str>,
    metadata: &'a JsonArg,
    reason: Option<&'a str>,
) -> Result<GrantRequest<'a>> {
    let default = default_priority(kind).ok_or_else(|| {
        BillingError::invalid(
            "kind",
            format!(
                "\"{}\" is not one of plan, promo, topup, reload, refund, manual",
                input::clip(kind)
            ),
        )
    })?;
    let req = GrantRequest {
        account,
        unit,
        amount,
        kind,
        priority: priority.unwrap_or(default),
        effective_at: time::opt_from_sql("effective_at", effective_at)?,
        expires_at: time::opt_from_sql("expires_at", expires_at)?,
        key,
        metadata: metadata.value("metadata")?,
        metadata_text: input::json_object("metadata", metadata.value("metadata")?)?,
        reason,
    };
    req.validate()?;
    Ok(req)
}

fn apply_grant(client: &mut SpiClient<'_>, req: &GrantRequest<'_>) -> Result<GrantRow> {
    let tenant = current_tenant()?;
    let hash = req.fingerprint();
    let mut ledger = PoolLedger::open(client, &tenant, req.account, req.unit, Create::UnitAndPool)?;
    let id = match find_by_key(&tenant, req.key, &hash)? {
        Stored::Grant(mut row) => {
            if row.1 != "duplicate" {
                row.9 = ledger.available(); // waiting for approval, or rejected
            }
            return Ok(row);
        }
        Stored::None { new_id } => new_id,
    };
    req.validate_at(ledger.now)?;
    let effective_at = req.effective_at.unwrap_or(ledger.now);
    let by = tenancy::outer_role();
    if !given_by_hand(req.kind) && !tenancy::may_credit_payments(by) {
        return Err(BillingError::NotAllowed(format!(
            "role \"{}\" may grant only manual and promo credit, not {}: payments and plans are credited by the application's role",
            tenancy::role_name(by).unwrap_or_default(),
            req.kind
        )));
    }
    if given_by_hand(req.kind) {
        if let Some(needs) = control(client, &tenant, req, by)? {
            ask_approval(client, &tenant, id, req, &hash, &needs, by)?;
            return Ok((
                id,
                "pending_approval".into(),
                req.kind.into(),
                req.priority,
                req.amount,
                0,
                time::to_sql(effective_at),
                req.expires_at.map(time::to_sql),
                0,
                ledger.available(),
            ));
        }
    }
    let added = add_to_locked(
        &mut ledger,
        id,
        NewGrant {
            kind: req.kind,
            priority: req.priority,
            amount: req.amount,
            effective_at,
            expires_at: req.expires_at,
            key: req.key,
            hash,
            metadata: req.metadata.clone(),
            granted_by: Some(by),
            reason: req.reason,
        },
    )?;
    let (repaid, remaining, available) = (added.repaid, added.remaining, added.available);
    ledger.flush(client)?;
    if req.kind == "topup" && crate::reloads::suspended_rule(ledger.id)? {
        db::write(client, &RELOAD_AFTER_TOPUP, &[ledger.id.into()])?;
    }
    Ok((
        id,
        "applied".into(),
        req.kind.into(),
        req.priority,
        req.amount,
        remaining,
        time::to_sql(effective_at),
        req.expires_at.map(time::to_sql),
        repaid,
        available,
    ))
}

/// A role as a statement argument (cast back with `$n::oid::regrole`).
fn role_arg(role: pg_sys::Oid) -> i64 {
    i64::from(role.to_u32())
}

/// The unit's grant policy on a grant by hand by role `by`: refuses it
/// (raising), or says why it must wait for approval (None: apply it now).
fn control(
    client: &mut SpiClient<'_>,
    tenant: &str,
    req: &GrantRequest<'_>,
    by: pg_sys::Oid,
) -> Result<Option<String>> {
    let args = [
        tenant.into(),
        req.account.into(),
        req.unit.into(),
        req.amount.into(),
        req.reason.into(),
        role_arg(by).into(),
    ];
    db::write(client, &GRANT_CONTROL, &args)?
        .next()
        .map(|r| Row(&r).opt::<String>("needs"))
        .transpose()
        .map(Option::flatten)
}

/// Keep grant `id`, asked for by role `by`, waiting for a second role's
/// approval, under its key.
fn ask_approval(
    client: &mut SpiClient<'_>,
    tenant: &str,
    id: i64,
    req: &GrantRequest<'_>,
    hash: &[u8],
    needs: &str,
    by: pg_sys::Oid,
) -> Result<()> {
    db::write(
        client,
        &ASK_APPROVAL,
        &[
            id.into(),
            tenant.into(),
            req.account.into(),
            req.unit.into(),
            req.kind.into(),
            req.priority.into(),
            req.amount.into(),
            req.effective_at.map(time::to_sql).into(),
            req.expires_at.map(time::to_sql).into(),
            req.key.into(),
            hash.to_vec().into(),
            JsonB(req.metadata.clone()).into(),
            req.reason.into(),
            needs.into(),
            role_arg(by).into(),
        ],
    )?;
    Ok(())
}

/// Approve grant `grant_id`, which waits for a second role's approval
/// (`billing.grant` answered `pending_approval`): it is applied now, as
/// asked, by the role that asked for it. Approving again returns it as a
/// duplicate.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn approve_grant(
    grant_id: Option<i64>,
) -> TableIterator<
    'static,
    (
        name!(grant_id, i64),
        name!(status, String),
        name!(kind, String),
        name!(priority, i32),
        name!(amount, i64),
        name!(remaining, i64),
        name!(effective_at, Tstz),
        name!(expires_at, Option<Tstz>),
        name!(debt_repaid, i64),
        name!(available, i64),
    ),
> {
    let result = (|| {
        let id = input::required("grant_id", grant_id)?;
        let tenant = current_tenant()?;
        Spi::connect_mut(|client| apply_approved(client, &tenant, id))
    })();
    TableIterator::once(result.or_raise())
}

fn apply_approved(client: &mut SpiClient<'_>, tenant: &str, id: i64) -> Result<GrantRow> {
    let args = [
        tenant.into(),
        id.into(),
        role_arg(tenancy::outer_role()).into(),
    ];
    let rows = db::write(client, &APPROVE, &args)?;
    let row = rows
        .into_iter()
        .next()
        .ok_or_else(|| BillingError::Internal("approval returned no row".into()))?;
    let row = Row(&row);
    if row.get::<bool>("already")? {
        let stored = direct::find_one(
            c"grants",
            c"grants_pkey",
            &[Key::Int8(id)],
            Snapshot::New,
            |t| Ok((t.get::<String>(c"tenant_id")?, stored_grant(t)?)),
        )?;
        return match stored {
            Some((of, (_, row))) if of == tenant => Ok(row),
            _ => Err(BillingError::Internal(format!(
                "approved grant {id} not found"
            ))),
        };
    }
    let (account, unit): (String, String) = (row.get("account")?, row.get("unit")?);
    let mut ledger = PoolLedger::open(client, tenant, &account, &unit, Create::UnitAndPool)?;
    let effective_at = row
        .opt::<Tstz>("effective_at")?
        .map_or(ledger.now, time::instant);
    let expires_at = row.opt::<Tstz>("expires_at")?.map(time::instant);
    if expires_at.is_some_and(|e| e <= ledger.now || e <= effective_at) {
        return Err(BillingError::WrongState(format!(
            "grant {id} expired while it waited for approval: reject it (billing.reject_grant) and ask again"
        )));
    }
    let (kind, priority, amount): (String, i32, i64) =
        (row.get("kind")?, row.get("priority")?, row.get("amount")?);
    let key: Option<String> = row.opt("key")?;
    let reason: Option<String> = row.opt("reason")?;
    let by = pg_sys::Oid::from(u32::try_from(row.get::<i64>("requested_by")?).unwrap_or(0));
    let added = add_to_locked(
        &mut ledger,
        id,
        NewGrant {
            kind: &kind,
            priority,
            amount,
            effective_at,
            expires_at,
            key: key.as_deref(),
            hash: row.get("request_hash")?,
            metadata: row.get::<JsonB>("metadata")?.0,
            granted_by: Some(by),
            reason: reason.as_deref(),
        },
    )?;
    ledger.flush(client)?;
    Ok((
        id,
        "applied".into(),
        kind,
        priority,
        amount,
        added.remaining,
        time::to_sql(effective_at),
        expires_at.map(time::to_sql),
        added.repaid,
        added.available,
    ))
}

/// A manual top-up makes an auto-reload rule suspended by failed charges active again.
static RELOAD_AFTER_TOPUP: Sql = Sql {
    text: "SELECT billing.reload_after_topup($1)",
    args: &[INT8],
};

/// A grant to add to a pool this call holds locked.
pub struct NewGrant<'a> {
    pub kind: &'a str,
    pub priority: i32,
    pub amount: i64,
    pub effective_at: Ts,
    pub expires_at: Option<Ts>,
    pub key: Option<&'a str>,
    pub hash: Vec<u8>,
    pub metadata: serde_json::Value,
    /// The role that gave it, for grants made by `billing.grant`.
    pub granted_by: Option<pg_sys::Oid>,
    pub reason: Option<&'a str>,
}

/// What adding a grant did.
pub struct Added {
    pub repaid: i64,
    pub remaining: i64,
    pub available: i64,
}

/// Add grant `id` to a locked pool: the core repays debt from it first, and
/// its row is written once with what it became, never updated in the same
/// call (the ledger's entries and the pool are written by the ledger's flush).
pub fn add_to_locked(ledger: &mut PoolLedger, id: i64, g: NewGrant<'_>) -> Result<Added> {
    let state = GrantState::new(id, g.priority, g.amount, g.effective_at, g.expires_at);
    let repaid = ledger.add_grant(state)?;
    let remaining = ledger.grant_remaining(id).unwrap_or(0);
    let available = ledger.available();
    let mut w = Writer::open(c"grants")?;
    w.set(c"id", id)?
        .set(c"tenant_id", ledger.tenant.as_str())?
        .set(c"pool_id", ledger.id)?
        .set(c"account", ledger.account.as_str())?
        .set(c"unit", ledger.unit.as_str())?
        .set(c"kind", g.kind)?
        .set(c"priority", g.priority)?
        .set(c"amount", g.amount)?
        .set(c"effective_at", time::to_sql(g.effective_at))?
        .set(c"expires_at", g.expires_at.map(time::to_sql))?
        .set(c"status", "active")?
        .set(c"key", g.key)?
        .set(c"request_hash", g.hash)?
        .set(c"metadata", JsonB(g.metadata))?
        .set(c"debt_repaid", repaid)?
        .set(c"available_after", available)?
        .set(c"created_at", time::to_sql(ledger.now))?
        .set(c"granted_by", g.granted_by)?
        .set(c"reason", g.reason)?;
    set_grant_remaining(&mut w, remaining)?;
    let at = w.insert()?;
    w.close();
    ledger.grant_inserted(id, at);
    Ok(Added {
        repaid,
        remaining,
        available,
    })
}

/// A fresh grant id.
pub fn next_grant_id() -> Result<i64> {
    Sequence::named(c"grants_id_seq")?.next()
}

/// What `find_by_key` found.
enum Stored {
    /// The outcome of the grant stored under the key, for a replay.
    Grant(GrantRow),
    /// Nothing: the id the new grant takes.
    None { new_id: i64 },
}

/// The grant stored under `key` (none for no key), else the grant waiting
/// for approval under it (sql/grant_controls.sql), else nothing and the id
/// the new grant takes. Read after the pool's lock with a new snapshot, so
/// a grant of the key committed by the lock's previous holder is seen.
fn find_by_key(tenant: &str, key: Option<&str>, hash: &[u8]) -> Result<Stored> {
    let found = match key {
        None => None,
        Some(key) => {
            let keys = [Key::Text(tenant), Key::Text(key)];
            match direct::find_one(
                c"grants",
                c"grants_tenant_id_key_key",
                &keys,
                Snapshot::New,
                stored_grant,
            )? {
                Some(grant) => Some(grant),
                None => direct::find_one(
                    c"grant_approvals",
                    c"grant_approvals_tenant_id_key_key",
                    &keys,
                    Snapshot::New,
                    awaiting_approval,
                )?,
            }
        }
    };
    let Some((stored_hash, row)) = found else {
        return Ok(Stored::None {
            new_id: next_grant_id()?,
        });
    };
    idempotency::same_request("grant", key.unwrap_or_default(), &stored_hash, hash)?;
    Ok(Stored::Grant(row))
}

/// A replay's answer from a stored grant (what remained when it was
/// granted), with the stored request's fingerprint.
fn stored_grant(t: &Tuple) -> Result<(Vec<u8>, GrantRow)> {
    let amount: i64 = t.get(c"amount")?;
    let debt_repaid: i64 = t.get(c"debt_repaid")?;
    Ok((
        t.get(c"request_hash")?,
        (
            t.get(c"id")?,
            "duplicate".into(),
            t.get(c"kind")?,
            t.get(c"priority")?,
            amount,
            amount - debt_repaid,
            t.get(c"effective_at")?,
            t.opt(c"expires_at")?,
            debt_repaid,
            t.get(c"available_after")?,
        ),
    ))
}

/// A replay's answer from a grant waiting for approval (`pending_approval`)
/// or refused (`rejected`); its `available` is the pool's, set by the caller.
fn awaiting_approval(t: &Tuple) -> Result<(Vec<u8>, GrantRow)> {
    let status: String = t.get(c"status")?;
    let status = if status == "pending" {
        "pending_approval".to_string()
    } else {
        status
    };
    let effective_at = match t.opt::<Tstz>(c"effective_at")? {
        Some(at) => at,
        None => t.get(c"requested_at")?,
    };
    Ok((
        t.get(c"request_hash")?,
        (
            t.get(c"grant_id")?,
            status,
            t.get(c"kind")?,
            t.get(c"priority")?,
            t.get(c"amount")?,
            0,
            effective_at,
            t.opt(c"expires_at")?,
            0,
            0,
        ),
    ))
}

// ----- taking credit back: void, revoke, reversal ---------------------------

static FIND_GRANT: Sql = Sql {
    // a lane's share of a grant is not a grant of its own
    text: "SELECT account, unit FROM billing.grants \
           WHERE id = $1 AND tenant_id = $2 AND parent_id IS NULL",
    args: &[INT8, TEXT],
};

/// A grant's row and every entry that names it, read after the pool lock
/// once the ledger's catch-up is written, so they are the committed, current
/// ones; what they mean for a reversal is computed by `ledger::core::grant_facts`.
static GRANT_ROW: Sql = Sql {
    text: "SELECT g.status, g.amount, billing.grant_remaining(g) AS remaining FROM billing.grants g WHERE g.id = $1",
    args: &[INT8],
};

/// Its lane shares' entries count as its own (their transfers cancel out).
static GRANT_ENTRIES: Sql = Sql {
    text: "SELECT kind::text AS kind, grant_amount, debt_amount \
           FROM billing.grant_entry_totals(ARRAY(SELECT $1 UNION ALL \
                                                 SELECT c.id FROM billing.grants c WHERE c.parent_id = $1))",
    args: &[INT8],
};

static CLOSE_GRANT: Sql = Sql {
    text: "UPDATE billing.grants SET status = $2, closed_at = now() WHERE id = $1",
    args: &[INT8, TEXT],
};

/// A grant of this tenant with its pool locked and brought up to date.
struct LockedGrant {
    id: i64,
    status: String,
    facts: GrantFacts,
    ledger: PoolLedger,
}

fn lock_grant(client: &mut SpiClient<'_>, grant_id: i64) -> Result<LockedGrant> {
    let tenant = current_tenant()?;
    let mut ledger = PoolLedger::open_owner_of(client, &tenant, &FIND_GRANT, grant_id, "grant")?;
    ledger.flush(client)?; // the catch-up's entries count in the facts
    let row = db::write(client, &GRANT_ROW, &[grant_id.into()])?
        .next()
        .ok_or_else(|| BillingError::Internal("grant vanished under the pool lock".into()))?;
    let row = Row(&row);
    let status: String = row.get("status")?;
    if status == SUSPENDED {
        // in memory, kept out of every figure, so credit can be taken or given back
        ledger.load_grant(grant_id)?;
    }
    let entries = db::write(client, &GRANT_ENTRIES, &[grant_id.into()])?
        .map(|e| {
            let e = Row(&e);
            let kind: String = e.get("kind")?;
            let kind = EntryKind::parse(&kind)
                .ok_or_else(|| BillingError::Internal(format!("unknown entry kind {kind}")))?;
            Ok((kind, e.get("grant_amount")?, e.get("debt_amount")?))
        })
        .collect::<Result<Vec<_>>>()?;
    let facts = grant_facts(
        row.get("amount")?,
        row.get("remaining")?,
        grant_is_closed(&status),
        entries,
    );
    Ok(LockedGrant {
        id: grant_id,
        status,
        facts,
        ledger,
    })
}

impl LockedGrant {
    /// Book an adjustment on the grant; `take_kind` names the removal entry.
    fn apply(&mut self, a: &Adjustment, take_kind: EntryKind) -> Result<()> {
        if a.return_unspent > 0 || a.return_debt > 0 {
            self.ledger.load_grant(self.id)?;
        }
        self.ledger.adjust_grant(self.id, a, take_kind)?;
        Ok(())
    }

    fn close(&mut self, client: &mut SpiClient<'_>, status: &str) -> Result<()> {
        self.ledger.flush(client)?;
        db::write(client, &CLOSE_GRANT, &[self.id.into(), status.into()])?;
        Ok(())
    }
}

type CloseRow = (
    name!(grant_id, i64),
    name!(status, String),
    name!(removed, i64),
    name!(consumed, i64),
    name!(debt_created, i64),
    name!(available, i64),
);

/// Cancel a grant as if it had never been given: its unspent credit is removed
/// and what was already spent from it becomes debt. Whatever a reversal (a
/// refund) already took back is not taken twice.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn void_grant(
    grant_id: Option<i64>,
) -> TableIterator<
    'static,
    (
        name!(grant_id, i64),
        name!(status, String),
        name!(removed, i64),
        name!(consumed, i64),
        name!(debt_created, i64),
        name!(available, i64),
    ),
> {
    let result = (|| {
        let grant_id = input::required("grant_id", grant_id)?;
        Spi::connect_mut(|client| close_grant(client, grant_id, Close::Void))
    })();
    TableIterator::once(result.or_raise())
}

/// Refund the unspent part of a grant: it shrinks to what was consumed.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn revoke_unused(
    grant_id: Option<i64>,
) -> TableIterator<
    'static,
    (
        name!(grant_id, i64),
        name!(status, String),
        name!(removed, i64),
        name!(consumed, i64),
        name!(debt_created, i64),
        name!(available, i64),
    ),
> {
    let result = (|| {
        let grant_id = input::required("grant_id", grant_id)?;
        Spi::connect_mut(|client| close_grant(client, grant_id, Close::Revoke))
    })();
    TableIterator::once(result.or_raise())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Close {
    Void,
    Revoke,
}

impl Close {
    fn entry_kind(self) -> EntryKind {
        match self {
            Close::Void => EntryKind::Void,
            Close::Revoke => EntryKind::Revoke,
        }
    }
    fn status(self) -> &'static str {
        match self {
            Close::Void => "voided",
            Close::Revoke => "revoked",
        }
    }
    fn adjustment(self, facts: &GrantFacts) -> Adjustment {
        match self {
            Close::Void => reversal::void(facts),
            Close::Revoke => Adjustment {
                take_unspent: facts.remaining,
                ..Adjustment::default()
            },
        }
    }
}

fn close_grant(client: &mut SpiClient<'_>, grant_id: i64, how: Close) -> Result<CloseRow> {
    let mut g = lock_grant(client, grant_id)?;
    let consumed = g.facts.consumed;
    if g.status == how.status() {
        let available = g.ledger.available();
        return Ok((grant_id, "duplicate".into(), 0, consumed, 0, available));
    }
    if grant_is_closed(&g.status) {
        return Err(BillingError::WrongState(format!(
            "grant {grant_id} is {}; only an active or suspended grant can be {}",
            g.status,
            how.status()
        )));
    }
    let a = how.adjustment(&g.facts);
    g.apply(&a, how.entry_kind())?;
    g.close(client, how.status())?;
    Ok((
        grant_id,
        how.status().into(),
        a.take_unspent,
        consumed,
        a.add_debt,
        g.ledger.available(),
    ))
}

type ToggleRow = (
    name!(grant_id, i64),
    name!(status, String),
    name!(remaining, i64),
    name!(available, i64),
);

/// Stop a grant from being spent while keeping its credit (a delinquent
/// subscription's plan credit): it leaves the pool's balance at once and
/// comes back with `resume_grant`. What was spent from it stays spent.
/// Idempotent: an already suspended grant answers `duplicate`.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn suspend_grant(
    grant_id: Option<i64>,
) -> TableIterator<
    'static,
    (
        name!(grant_id, i64),
        name!(status, String),
        name!(remaining, i64),
        name!(available, i64),
    ),
> {
    let result = (|| {
        let grant_id = input::required("grant_id", grant_id)?;
        Spi::connect_mut(|client| suspend_or_resume(client, grant_id, Toggle::Suspend))
    })();
    TableIterator::once(result.or_raise())
}

/// Make a suspended grant spendable again; if its expiry passed meanwhile,
/// it expires now, and its credit repays debt first. Idempotent: an active
/// grant answers `duplicate`.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn resume_grant(
    grant_id: Option<i64>,
) -> TableIterator<
    'static,
    (
        name!(grant_id, i64),
        name!(status, String),
        name!(remaining, i64),
        name!(available, i64),
    ),
> {
    let result = (|| {
        let grant_id = input::required("grant_id", grant_id)?;
        Spi::connect_mut(|client| suspend_or_resume(client, grant_id, Toggle::Resume))
    })();
    TableIterator::once(result.or_raise())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Toggle {
    Suspend,
    Resume,
}

impl Toggle {
    /// The status the grant ends in.
    fn status(self) -> &'static str {
        match self {
            Toggle::Suspend => SUSPENDED,
            Toggle::Resume => "active",
        }
    }
}

/// Suspend or resume one open grant of this tenant, under its pool's lock.
fn suspend_or_resume(client: &mut SpiClient<'_>, grant_id: i64, how: Toggle) -> Result<ToggleRow> {
    let mut g = lock_grant(client, grant_id)?;
    if g.status == how.status() {
        let available = g.ledger.available();
        return Ok((grant_id, "duplicate".into(), g.facts.remaining, available));
    }
    if grant_is_closed(&g.status) {
        return Err(BillingError::WrongState(format!(
            "grant {grant_id} is {}; only an open grant can be suspended or resumed",
            g.status
        )));
    }
    g.ledger.load_grant(grant_id)?;
    let done = match how {
        Toggle::Suspend => g.ledger.suspend(grant_id),
        Toggle::Resume => g.ledger.resume(grant_id).is_some(),
    };
    if !done {
        return Err(BillingError::Internal(format!(
            "grant {grant_id} is not in its pool under the lock"
        )));
    }
    // read before the flush, which forgets a suspended grant
    let remaining = g.ledger.grant_remaining(grant_id).unwrap_or(0);
    g.ledger.flush(client)?;
    db::write(
        client,
        &SET_GRANT_STATUS,
        &[grant_id.into(), how.status().into()],
    )?;
    Ok((
        grant_id,
        how.status().into(),
        remaining,
        g.ledger.available(),
    ))
}

static SET_GRANT_STATUS: Sql = Sql {
    text: "UPDATE billing.grants SET status = $2 WHERE id = $1",
    args: &[INT8, TEXT],
};

/// Bring the total taken back from a grant to `total` (capped at what the
/// grant gave): its unspent credit first, then debt for what the customer used
/// and did not pay for. Idempotent: the same total again changes nothing. A
/// lower total than before (a won dispute) gives the difference back, except
/// on a voided or revoked grant. Used when a funded payment is refunded or disputed.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, billing, pg_temp)]
fn reverse_grant(
    grant_id: Option<i64>,
    total: Option<i64>,
) -> TableIterator<
    'static,
    (
        name!(grant_id, i64),
        name!(status, String),
        name!(total, i64),
        name!(revoked, i64),
        name!(debt_created, i64),
        name!(reinstated, i64),
        name!(available, i64),
    ),
> {
    let result = (|| {
        let grant_id = input::required("grant_id", grant_id)?;
        let total = input::required("total", total)?;
        input::non_negative("total", total)?;
        Spi::connect_mut(|client| {
            let mut g = lock_grant(client, grant_id)?;
            let a = reversal::adjust(&g.facts, total);
            let status = if a.is_none() { "unchanged" } else { "applied" };
            g.apply(&a, EntryKind::Revoke)?;
            g.ledger.flush(client)?;
            Ok((
                grant_id,
                status.to_string(),
                reversal::capped_total(&g.facts, total),
                a.take_unspent,
                a.add_debt,
                a.return_unspent + a.return_debt,
                g.ledger.available(),
            ))
        })
    })();
    TableIterator::once(result.or_raise())
}
