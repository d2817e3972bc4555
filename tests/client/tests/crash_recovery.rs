//! docs/architecture.md, rules 2, 6, 7, 8: across crashes. Six real sessions run mixed
//! billing traffic (grants, strict and non-strict ingests, batches, holds with
//! settle and release, signed Stripe webhooks, replays) against a cluster of
//! the test's own, which is SIGKILLed (postmaster and every child) several
//! times mid-flight and restarted through crash recovery. Every call carries
//! an idempotency key; the client records each outcome as acknowledged or
//! unknown (the connection died mid-call). At the end every unknown call is
//! re-sent with the same key and arguments until it is acknowledged, and the
//! database must hold exactly what the client was told: every acknowledged
//! write, once, with its acknowledged amounts; nothing else; a consistent
//! ledger; pools equal to a recomputation from the client's own record; and no
//! strict call accepted below its floor.
//!
//! Rounds: `PG_BILLING_CRASH_ROUNDS` (default 3; bin/crash-test runs 20).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pg_billing_client_tests::cluster::Cluster;
use pg_billing_client_tests::{ledger_problems, run_sessions, unix_now, Rng};
use postgres::{Client, NoTls};

const DIR: &str = "/tmp/pg_billing_crash_cluster";
const PORT: u16 = 28817;
const DB: &str = "pgb_crash";
const SESSIONS: usize = 6;
const ACCOUNTS: usize = 20;
const SECRET: &str = "whsec_crash";
/// Long enough that no hold expires during the test.
const TTL: &str = "1 hour";

fn account(i: usize) -> String {
    format!("acct_{i:02}")
}

/// Floors: none, positive ones, and a credit line.
fn floor_of(i: usize) -> i64 {
    [0, 200, 1000, -500][i % 4]
}

/// Credit granted at setup; a few accounts start empty.
fn seed_credit(i: usize) -> i64 {
    if i.is_multiple_of(5) {
        0
    } else {
        5_000
    }
}

fn stripe_headers(body: &str) -> String {
    pg_billing_client_tests::stripe_headers(body, SECRET)
}

// ----- calls and their outcomes ----------------------------------------------

#[derive(Clone, Debug)]
struct BatchEvent {
    account: String,
    cost: i64,
    key: String,
}

#[derive(Clone, Debug)]
enum Call {
    Grant {
        account: String,
        amount: i64,
        key: String,
    },
    Ingest {
        account: String,
        cost: i64,
        key: String,
        strict: bool,
    },
    Batch {
        events: Vec<BatchEvent>,
        json: String,
    },
    Reserve {
        account: String,
        amount: i64,
        key: String,
    },
    Settle {
        hold_key: String,
        hold_id: i64,
        actual: i64,
        key: String,
    },
    Release {
        hold_key: String,
        hold_id: i64,
    },
    Webhook {
        account: String,
        amount: i64,
        payment: String,
        event: String,
        body: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
struct Charge {
    event_id: i64,
    cost: i64,
    covered: i64,
    debt_created: i64,
}

/// What the server told the client about a call.
#[derive(Clone, Debug, PartialEq)]
enum Ack {
    Granted {
        grant_id: i64,
        amount: i64,
    },
    Charged(Charge),
    /// A strict ingest or a reservation refused with 23514: nothing written.
    Refused,
    Batch(Vec<Charge>),
    Reserved {
        hold_id: i64,
        amount: i64,
    },
    Settled {
        actual: i64,
        covered: i64,
        debt_created: i64,
    },
    Released,
    Credited,
}

/// How a call ended when it was not acknowledged.
enum Failure {
    /// The connection died: the call may or may not have been applied.
    Unknown(String),
    /// The server answered something the test does not accept.
    Wrong(String),
}

/// A call acknowledged as `fresh` (first application) or a duplicate (replay).
struct Answer {
    fresh: bool,
    ack: Ack,
}

fn fail(e: postgres::Error) -> Failure {
    match e.code().map(|c| c.code().to_string()) {
        // No SQLSTATE: I/O error, closed connection. Class 57 (operator
        // intervention: shutdown, crash) and 08 (connection exception).
        None => Failure::Unknown(e.to_string()),
        Some(c) if c.starts_with("57") || c.starts_with("08") => Failure::Unknown(e.to_string()),
        Some(c) => Failure::Wrong(format!("SQLSTATE {c}: {e}")),
    }
}

fn refused(e: &postgres::Error) -> bool {
    e.code().map(|c| c.code()) == Some("23514")
}

/// The status a call answers: `fresh` for a first application, "duplicate" for a replay.
fn status(s: &str, fresh: &str, call: &Call) -> Result<bool, Failure> {
    if s == fresh {
        Ok(true)
    } else if s == "duplicate" {
        Ok(false)
    } else {
        Err(Failure::Wrong(format!(
            "status {s:?} (expected {fresh:?} or \"duplicate\") for {call:?}"
        )))
    }
}

fn execute(c: &mut Client, call: &Call) -> Result<Answer, Failure> {
    match call {
        Call::Grant {
            account,
            amount,
            key,
        } => {
            let r = c
                .query_one(
                    "SELECT grant_id, status, amount FROM billing.grant($1, 'usd_cents', $2, \
                     kind => 'topup', key => $3)",
                    &[account, amount, key],
                )
                .map_err(fail)?;
            Ok(Answer {
                fresh: status(r.get(1), "applied", call)?,
                ack: Ack::Granted {
                    grant_id: r.get(0),
                    amount: r.get(2),
                },
            })
        }
        Call::Ingest {
            account,
            cost,
            key,
            strict,
        } => {
            let r = c.query_one(
                "SELECT event_id, status, cost, covered, debt_created FROM billing.ingest($1, \
                 'usd_cents', 1, key => $2, cost => $3, strict => $4)",
                &[account, key, cost, strict],
            );
            match r {
                Ok(r) => Ok(Answer {
                    fresh: status(r.get(1), "applied", call)?,
                    ack: Ack::Charged(Charge {
                        event_id: r.get::<_, Option<i64>>(0).unwrap_or(-1),
                        cost: r.get(2),
                        covered: r.get(3),
                        debt_created: r.get(4),
                    }),
                }),
                Err(e) if *strict && refused(&e) => Ok(Answer {
                    fresh: true,
                    ack: Ack::Refused,
                }),
                Err(e) => Err(fail(e)),
            }
        }
        Call::Batch { events, json } => {
            let rows = c
                .query(
                    "SELECT key, event_id, status, cost, covered, debt_created \
                     FROM billing.ingest_batch($1::text::jsonb)",
                    &[json],
                )
                .map_err(fail)?;
            if rows.len() != events.len() {
                return Err(Failure::Wrong(format!(
                    "batch of {} events answered {} rows: {call:?}",
                    events.len(),
                    rows.len()
                )));
            }
            let mut fresh = None;
            let mut charges = Vec::new();
            for (r, ev) in rows.iter().zip(events) {
                let key: String = r.get(0);
                if key != ev.key {
                    return Err(Failure::Wrong(format!(
                        "batch row for {key} where {} was expected: {call:?}",
                        ev.key
                    )));
                }
                let f = status(r.get(2), "applied", call)?;
                if fresh.is_some_and(|x| x != f) {
                    return Err(Failure::Wrong(format!(
                        "one batch answered both applied and duplicate: {call:?}"
                    )));
                }
                fresh = Some(f);
                charges.push(Charge {
                    event_id: r.get::<_, Option<i64>>(1).unwrap_or(-1),
                    cost: r.get(3),
                    covered: r.get(4),
                    debt_created: r.get(5),
                });
            }
            Ok(Answer {
                fresh: fresh.unwrap_or(true),
                ack: Ack::Batch(charges),
            })
        }
        Call::Reserve {
            account,
            amount,
            key,
        } => {
            let r = c.query_one(
                "SELECT hold_id, status, amount FROM billing.reserve($1, 'usd_cents', $2, \
                 key => $3, ttl => $4::text::interval)",
                &[account, amount, key, &TTL],
            );
            match r {
                Ok(r) => Ok(Answer {
                    fresh: status(r.get(1), "open", call)?,
                    ack: Ack::Reserved {
                        hold_id: r.get(0),
                        amount: r.get(2),
                    },
                }),
                Err(e) if refused(&e) => Ok(Answer {
                    fresh: true,
                    ack: Ack::Refused,
                }),
                Err(e) => Err(fail(e)),
            }
        }
        Call::Settle {
            hold_id,
            actual,
            key,
            ..
        } => {
            let r = c
                .query_one(
                    "SELECT status, actual, covered, debt_created FROM billing.settle($1, $2, key => $3)",
                    &[hold_id, actual, key],
                )
                .map_err(fail)?;
            Ok(Answer {
                fresh: status(r.get(0), "settled", call)?,
                ack: Ack::Settled {
                    actual: r.get(1),
                    covered: r.get(2),
                    debt_created: r.get(3),
                },
            })
        }
        Call::Release { hold_id, .. } => {
            let r = c
                .query_one("SELECT status FROM billing.release($1)", &[hold_id])
                .map_err(fail)?;
            Ok(Answer {
                fresh: status(r.get(0), "released", call)?,
                ack: Ack::Released,
            })
        }
        Call::Webhook { body, .. } => {
            // A provider's retry signs again with a fresh timestamp; the body is the same.
            let headers = stripe_headers(body);
            let r = c
                .query_one(
                    "SELECT status, reason FROM billing.receive_webhook('stripe', $1::text::jsonb, $2)",
                    &[&headers, body],
                )
                .map_err(fail)?;
            let s: String = r.get(0);
            let reason: Option<String> = r.get(1);
            if s != "applied" && s != "duplicate" {
                return Err(Failure::Wrong(format!(
                    "webhook answered {s:?} ({reason:?}) for {call:?}"
                )));
            }
            Ok(Answer {
                fresh: s == "applied",
                ack: Ack::Credited,
            })
        }
    }
}

// ----- the sessions ----------------------------------------------------------

struct Entry {
    call: Call,
    /// None: the outcome is unknown (the connection died mid-call).
    ack: Option<Ack>,
    /// The crash round during which the call was sent.
    round: usize,
}

#[derive(Default)]
struct Journal {
    entries: Vec<Entry>,
    /// Answers the test does not accept, each naming its call.
    problems: Vec<String>,
    replays: usize,
}

struct Shared {
    dsn: String,
    stop: AtomicBool,
    round: AtomicUsize,
    seed: u64,
}

struct Session<'a> {
    id: usize,
    shared: &'a Shared,
    client: Option<Client>,
    journal: Journal,
    rng: Rng,
    n: usize,
}

impl Session<'_> {
    /// A connection, reconnecting after a crash; None once the test stops.
    fn connected(&mut self) -> Option<&mut Client> {
        while self.client.is_none() {
            if self.shared.stop.load(Ordering::SeqCst) {
                return None;
            }
            match Client::connect(&self.shared.dsn, NoTls) {
                Ok(c) => self.client = Some(c),
                Err(_) => sleep(Duration::from_millis(20)),
            }
        }
        self.client.as_mut()
    }

    fn key(&mut self, kind: &str) -> String {
        self.n += 1;
        format!("{kind}:s{}-{}", self.id, self.n)
    }

    fn random_account(&mut self) -> String {
        account(self.rng.range(0, ACCOUNTS as i64 - 1) as usize)
    }

    /// Send a new call and journal it; returns its acknowledgement, if any.
    fn send(&mut self, call: Call) -> Option<Ack> {
        let round = self.shared.round.load(Ordering::SeqCst);
        let c = self.connected()?;
        let result = execute(c, &call);
        let ack = match result {
            Ok(a) => {
                if !a.fresh {
                    self.journal
                        .problems
                        .push(format!("a new key answered \"duplicate\": {call:?}"));
                }
                Some(a.ack)
            }
            Err(Failure::Unknown(_)) => {
                self.client = None;
                None
            }
            Err(Failure::Wrong(e)) => {
                // Rolled back, so not journaled; the test fails on the problem.
                self.journal.problems.push(format!("{e} (call {call:?})"));
                return None;
            }
        };
        self.journal.entries.push(Entry {
            call,
            ack: ack.clone(),
            round,
        });
        ack
    }

    /// Re-send an acknowledged call: it must answer "duplicate" with the
    /// original outcome. An unknown outcome changes nothing here: the call
    /// was already applied once.
    fn replay(&mut self) {
        let candidates: Vec<usize> = self
            .journal
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(&e.ack, Some(a) if *a != Ack::Refused))
            .map(|(i, _)| i)
            .collect();
        if candidates.is_empty() {
            return;
        }
        let i = candidates[self.rng.range(0, candidates.len() as i64 - 1) as usize];
        let call = self.journal.entries[i].call.clone();
        let original = self.journal.entries[i].ack.clone();
        let Some(c) = self.connected() else { return };
        match execute(c, &call) {
            Ok(a) => {
                self.journal.replays += 1;
                let expected = match (&call, &original) {
                    // A release replayed answers duplicate with nothing released.
                    (Call::Release { .. }, _) => Some(Ack::Released),
                    _ => original,
                };
                if a.fresh || Some(&a.ack) != expected.as_ref() {
                    self.journal.problems.push(format!(
                        "replay of {call:?} answered {} {:?}; the original answer was {expected:?}",
                        if a.fresh { "fresh" } else { "duplicate" },
                        a.ack
                    ));
                }
            }
            Err(Failure::Unknown(_)) => self.client = None,
            Err(Failure::Wrong(e)) => self.journal.problems.push(format!("replay: {e}")),
        }
    }

    fn run(&mut self) {
        // Holds this session reserved and has not closed yet: (reserve key, id, amount).
        let mut open: Vec<(String, i64, i64)> = Vec::new();
        while !self.shared.stop.load(Ordering::SeqCst) {
            let op = self.rng.range(0, 99);
            match op {
                0..=11 => {
                    let call = Call::Grant {
                        account: self.random_account(),
                        amount: self.rng.range(100, 1500),
                        key: self.key("g"),
                    };
                    self.send(call);
                }
                12..=47 => {
                    let call = Call::Ingest {
                        account: self.random_account(),
                        cost: self.rng.range(1, 800),
                        key: self.key("i"),
                        strict: op >= 30,
                    };
                    self.send(call);
                }
                48..=55 => {
                    let base = self.key("b");
                    let events: Vec<BatchEvent> = (0..self.rng.range(2, 5))
                        .map(|j| BatchEvent {
                            account: self.random_account(),
                            cost: self.rng.range(1, 300),
                            key: format!("{base}-{j}"),
                        })
                        .collect();
                    let json = serde_json::Value::Array(
                        events
                            .iter()
                            .map(|e| {
                                serde_json::json!({
                                    "account": e.account, "meter": "usd_cents", "quantity": 1,
                                    "key": e.key, "cost": e.cost, "strict": false,
                                })
                            })
                            .collect(),
                    )
                    .to_string();
                    self.send(Call::Batch { events, json });
                }
                56..=69 => {
                    let (account, amount, key) =
                        (self.random_account(), self.rng.range(1, 800), self.key("h"));
                    let call = Call::Reserve {
                        account,
                        amount,
                        key: key.clone(),
                    };
                    if let Some(Ack::Reserved { hold_id, amount }) = self.send(call) {
                        open.push((key, hold_id, amount));
                    }
                }
                70..=81 => {
                    if open.is_empty() {
                        continue;
                    }
                    let i = self.rng.range(0, open.len() as i64 - 1) as usize;
                    let (hold_key, hold_id, amount) = open.swap_remove(i);
                    let call = if self.rng.range(0, 2) < 2 {
                        // Up to half above the estimate: the excess may become debt.
                        Call::Settle {
                            hold_key,
                            hold_id,
                            actual: self.rng.range(0, amount + amount / 2),
                            key: self.key("st"),
                        }
                    } else {
                        Call::Release { hold_key, hold_id }
                    };
                    self.send(call);
                }
                82..=89 => {
                    let (account, amount) = (self.random_account(), self.rng.range(100, 2000));
                    let tag = format!("s{}_{}", self.id, self.n);
                    self.n += 1;
                    let (payment, event) = (format!("pi_{tag}"), format!("evt_{tag}"));
                    let body = serde_json::json!({
                        "id": event, "object": "event", "type": "payment_intent.succeeded",
                        "created": unix_now(),
                        "data": {"object": {
                            "id": payment, "object": "payment_intent", "amount_received": amount,
                            "currency": "usd", "metadata": {"account": account},
                        }},
                    })
                    .to_string();
                    self.send(Call::Webhook {
                        account,
                        amount,
                        payment,
                        event,
                        body,
                    });
                }
                _ => self.replay(),
            }
        }
    }
}

fn session(id: usize, start: &Barrier, shared: &Shared) -> Journal {
    let mut s = Session {
        id,
        shared,
        client: None,
        journal: Journal::default(),
        rng: Rng::new(shared.seed.wrapping_add(id as u64 * 7919)),
        n: 0,
    };
    s.connected().expect("first connection");
    start.wait();
    s.run();
    s.journal
}

// ----- the client's own record of what must be in the database ---------------

#[derive(Debug, PartialEq)]
enum HoldEnd {
    Open,
    Settled {
        actual: i64,
        covered: i64,
        debt_created: i64,
    },
    Released,
}

#[derive(Debug)]
struct HoldExp {
    account: String,
    hold_id: i64,
    amount: i64,
    end: HoldEnd,
}

#[derive(Default)]
struct Model {
    /// grant key → (account, amount): topups, webhook payments ('stripe:<pi>'), setup.
    grants: BTreeMap<String, (String, i64)>,
    /// usage event key → (account, charge, strict).
    events: BTreeMap<String, (String, Charge, bool)>,
    refused_events: BTreeSet<String>,
    holds: BTreeMap<String, HoldExp>,
    refused_holds: BTreeSet<String>,
    /// provider event id → payment.
    webhooks: BTreeMap<String, String>,
}

impl Model {
    fn build(entries: &[Entry], setup_grants: &[(String, String, i64)]) -> Model {
        let mut m = Model::default();
        for (key, account, amount) in setup_grants {
            m.grants.insert(key.clone(), (account.clone(), *amount));
        }
        let mut closes = Vec::new();
        for e in entries {
            let ack = e
                .ack
                .as_ref()
                .unwrap_or_else(|| panic!("unresolved call {:?}", e.call));
            match (&e.call, ack) {
                (
                    Call::Grant {
                        account,
                        amount,
                        key,
                    },
                    Ack::Granted { amount: got, .. },
                ) => {
                    assert_eq!(got, amount, "grant {key} acknowledged another amount");
                    m.grants.insert(key.clone(), (account.clone(), *amount));
                }
                (
                    Call::Ingest {
                        account,
                        key,
                        strict,
                        ..
                    },
                    Ack::Charged(ch),
                ) => {
                    m.events
                        .insert(key.clone(), (account.clone(), ch.clone(), *strict));
                }
                (Call::Ingest { key, .. }, Ack::Refused) => {
                    m.refused_events.insert(key.clone());
                }
                (Call::Batch { events, .. }, Ack::Batch(charges)) => {
                    for (ev, ch) in events.iter().zip(charges) {
                        m.events
                            .insert(ev.key.clone(), (ev.account.clone(), ch.clone(), false));
                    }
                }
                (Call::Reserve { account, key, .. }, Ack::Reserved { hold_id, amount }) => {
                    m.holds.insert(
                        key.clone(),
                        HoldExp {
                            account: account.clone(),
                            hold_id: *hold_id,
                            amount: *amount,
                            end: HoldEnd::Open,
                        },
                    );
                }
                (Call::Reserve { key, .. }, Ack::Refused) => {
                    m.refused_holds.insert(key.clone());
                }
                (Call::Settle { hold_key, .. }, Ack::Settled { .. })
                | (Call::Release { hold_key, .. }, Ack::Released) => {
                    closes.push((hold_key.clone(), ack.clone()));
                }
                (
                    Call::Webhook {
                        account,
                        amount,
                        payment,
                        event,
                        ..
                    },
                    Ack::Credited,
                ) => {
                    m.grants
                        .insert(format!("stripe:{payment}"), (account.clone(), *amount));
                    m.webhooks.insert(event.clone(), payment.clone());
                }
                (call, ack) => panic!("call {call:?} acknowledged as {ack:?}"),
            }
        }
        for (hold_key, ack) in closes {
            let h = m
                .holds
                .get_mut(&hold_key)
                .unwrap_or_else(|| panic!("hold {hold_key} closed but never reserved"));
            h.end = match ack {
                Ack::Settled {
                    actual,
                    covered,
                    debt_created,
                } => HoldEnd::Settled {
                    actual,
                    covered,
                    debt_created,
                },
                _ => HoldEnd::Released,
            };
        }
        m
    }

    /// Per account: (Σ granted, Σ charged, Σ held), from the client's record alone.
    fn pools(&self) -> BTreeMap<String, (i64, i64, i64)> {
        let mut p: BTreeMap<String, (i64, i64, i64)> =
            (0..ACCOUNTS).map(|i| (account(i), (0, 0, 0))).collect();
        for (account, amount) in self.grants.values() {
            p.get_mut(account).unwrap().0 += amount;
        }
        for (account, ch, _) in self.events.values() {
            p.get_mut(account).unwrap().1 += ch.cost;
        }
        for h in self.holds.values() {
            let e = p.get_mut(&h.account).unwrap();
            match h.end {
                HoldEnd::Open => e.2 += h.amount,
                HoldEnd::Settled { actual, .. } => e.1 += actual,
                HoldEnd::Released => {}
            }
        }
        p
    }
}

// ----- the test --------------------------------------------------------------

fn rounds() -> usize {
    std::env::var("PG_BILLING_CRASH_ROUNDS")
        .ok()
        .map(|v| v.parse().expect("PG_BILLING_CRASH_ROUNDS must be a number"))
        .unwrap_or(3)
}

/// Sets the stop flag however the crash controller ends, so sessions never wait forever.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn setup(cluster: &Cluster) -> Vec<(String, String, i64)> {
    let mut admin = cluster.connect("postgres");
    admin
        .batch_execute(&format!("CREATE DATABASE {DB}"))
        .expect("create database");
    let mut c = cluster.connect(DB);
    c.batch_execute(&format!(
        "CREATE EXTENSION pg_billing;
         SELECT billing.define_unit('usd_cents');
         SELECT billing.define_webhook_endpoint('stripe', 'stripe', '{SECRET}');"
    ))
    .expect("install pg_billing and define the unit and the endpoint");
    let mut grants = Vec::new();
    for i in 0..ACCOUNTS {
        let a = account(i);
        c.query_one(
            "SELECT billing.set_floor($1, 'usd_cents', $2)",
            &[&a, &floor_of(i)],
        )
        .unwrap_or_else(|e| panic!("set_floor {a}: {e}"));
        if seed_credit(i) > 0 {
            let key = format!("setup:{a}");
            let row = c
                .query_one(
                    "SELECT status FROM billing.grant($1, 'usd_cents', $2, kind => 'topup', key => $3)",
                    &[&a, &seed_credit(i), &key],
                )
                .unwrap_or_else(|e| panic!("seed grant {a}: {e}"));
            assert_eq!(row.get::<_, String>(0), "applied");
            grants.push((key, a, seed_credit(i)));
        }
    }
    grants
}

#[test]
fn acknowledged_billing_survives_crashes_and_replays_apply_once() {
    let started = Instant::now();
    let rounds = rounds();
    let cluster = Cluster::create(DIR, PORT);
    let setup_grants = setup(&cluster);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    println!("crash_recovery: {rounds} rounds, {SESSIONS} sessions, seed {seed}");

    let shared = Arc::new(Shared {
        dsn: cluster.dsn(DB),
        stop: AtomicBool::new(false),
        round: AtomicUsize::new(0),
        seed,
    });

    // Load in the sessions; crashes from a controller thread.
    let journals = std::thread::scope(|scope| {
        let (cluster, ctl) = (&cluster, shared.clone());
        scope.spawn(move || {
            let _stop = StopOnDrop(&ctl.stop);
            let mut rng = Rng::new(seed ^ 0xC0FFEE);
            for round in 1..=rounds {
                sleep(Duration::from_millis(rng.range(1000, 2000) as u64));
                let t = Instant::now();
                let killed = cluster.crash();
                let dead = t.elapsed();
                sleep(Duration::from_millis(100)); // sessions find the server gone
                let t = Instant::now();
                cluster.start();
                ctl.round.store(round, Ordering::SeqCst);
                println!(
                    "round {round}: killed {killed} processes in {dead:.1?}, recovered in {:.1?}",
                    t.elapsed()
                );
            }
            sleep(Duration::from_millis(1000)); // load after the last recovery
        });
        let s = shared.clone();
        run_sessions(SESSIONS, move |id, start| session(id, start, &s))
    });

    let mut problems: Vec<String> = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    let mut replays = 0;
    for j in journals {
        problems.extend(j.problems);
        entries.extend(j.entries);
        replays += j.replays;
    }

    // Re-send every call whose outcome is unknown, same key and arguments.
    let unknown = entries.iter().filter(|e| e.ack.is_none()).count();
    let mut committed_unacked = 0; // re-sends answered "duplicate": applied before the kill
    let mut c = cluster.connect(DB);
    for e in entries.iter_mut().filter(|e| e.ack.is_none()) {
        for attempt in 1.. {
            match execute(&mut c, &e.call) {
                Ok(a) => {
                    committed_unacked += usize::from(!a.fresh);
                    e.ack = Some(a.ack);
                    break;
                }
                Err(Failure::Unknown(err)) if attempt < 5 => {
                    eprintln!("re-send of {:?}: {err}; reconnecting", e.call);
                    sleep(Duration::from_millis(200));
                    c = cluster.connect(DB);
                }
                Err(Failure::Unknown(err) | Failure::Wrong(err)) => {
                    panic!("re-sending {:?} after the crashes: {err}", e.call)
                }
            }
        }
    }

    // The load really ran through every crash.
    let mut acked_per_round = vec![0usize; rounds + 1];
    for e in entries.iter().filter(|e| e.ack.is_some()) {
        acked_per_round[e.round] += 1;
    }
    let count = |f: &dyn Fn(&Entry) -> bool| entries.iter().filter(|e| f(e)).count();
    let strict_ok = count(&|e| {
        matches!(e.call, Call::Ingest { strict: true, .. })
            && matches!(e.ack, Some(Ack::Charged(_)))
    });
    let strict_refused = count(&|e| {
        matches!(e.call, Call::Ingest { .. } | Call::Reserve { .. }) && e.ack == Some(Ack::Refused)
    });
    println!(
        "{} calls ({unknown} unknown, re-sent: {committed_unacked} had committed), {replays} replays, {strict_ok} strict ingests accepted, \
         {strict_refused} strict calls refused; acknowledged per round {acked_per_round:?}",
        entries.len()
    );
    assert!(
        unknown > 0,
        "no call was in flight at any kill: the crashes tested nothing"
    );
    for (round, n) in acked_per_round.iter().enumerate() {
        assert!(
            *n > 0,
            "no call was acknowledged after crash {round}: the sessions did not resume"
        );
    }
    assert!(
        strict_ok > 0 && strict_refused > 0,
        "the pools must both accept and refuse strict calls, or the floors were not tested \
         ({strict_ok} accepted, {strict_refused} refused)"
    );
    let recoveries = cluster
        .log()
        .matches("was not properly shut down; automatic recovery in progress")
        .count();
    assert_eq!(
        recoveries, rounds,
        "the server log should show one crash recovery per round"
    );

    let model = Model::build(&entries, &setup_grants);
    check_database(&mut c, &model, &mut problems);

    println!(
        "crash_recovery: {} problems, finished in {:?}",
        problems.len(),
        started.elapsed()
    );
    assert!(
        problems.is_empty(),
        "{} problems after {rounds} crashes (seed {seed}):\n{}",
        problems.len(),
        problems
            .iter()
            .take(60)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Compare the database with the client's record; push one line per discrepancy.
fn check_database(c: &mut Client, m: &Model, problems: &mut Vec<String>) {
    let floors: HashMap<String, i64> = c
        .query(
            "SELECT account, floor FROM billing.pools WHERE unit = 'usd_cents'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for i in 0..ACCOUNTS {
        if floors.get(&account(i)) != Some(&floor_of(i)) {
            problems.push(format!(
                "pool {} has floor {:?}, set to {}",
                account(i),
                floors.get(&account(i)),
                floor_of(i)
            ));
        }
    }

    // Usage events: each acknowledged one once, with its acknowledged amounts;
    // each settled hold's usage once; refused ones absent; nothing else.
    let mut settled_usage: BTreeMap<String, (&String, i64, i64, i64)> = BTreeMap::new();
    for (key, h) in &m.holds {
        if let HoldEnd::Settled {
            actual,
            covered,
            debt_created,
        } = h.end
        {
            settled_usage.insert(
                format!("billing:hold:{}", h.hold_id),
                (key, actual, covered, debt_created),
            );
        }
    }
    let rows = c
        .query(
            "SELECT e.key, e.id, e.account, e.cost, e.covered, e.debt_created, e.strict, \
                    e.available_after, p.floor \
             FROM billing.usage_events e JOIN billing.pools p ON p.id = e.pool_id",
            &[],
        )
        .unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &rows {
        let key: String = r.get(0);
        *seen.entry(key.clone()).or_default() += 1;
        let (id, account, cost, covered, debt, strict, after, floor): (
            i64,
            String,
            i64,
            i64,
            i64,
            bool,
            i64,
            i64,
        ) = (
            r.get(1),
            r.get(2),
            r.get(3),
            r.get(4),
            r.get(5),
            r.get(6),
            r.get(7),
            r.get(8),
        );
        if strict && after < floor {
            problems.push(format!(
                "strict usage event {key} was accepted below its floor: available after {after} < floor {floor}"
            ));
        }
        if let Some((acct, ch, st)) = m.events.get(&key) {
            let got = Charge {
                event_id: id,
                cost,
                covered,
                debt_created: debt,
            };
            if (&account, &got, strict) != (acct, ch, *st) {
                problems.push(format!(
                    "usage event {key}: database has {account} {got:?} strict={strict}, \
                     the client was told {acct} {ch:?} strict={st}"
                ));
            }
        } else if let Some((hold_key, actual, cov, debt_c)) = settled_usage.get(&key) {
            if (cost, covered, debt) != (*actual, *cov, *debt_c) {
                problems.push(format!(
                    "settlement usage {key} of hold {hold_key}: database has cost {cost} covered {covered} \
                     debt {debt}, the client was told actual {actual} covered {cov} debt {debt_c}"
                ));
            }
        } else if m.refused_events.contains(&key) {
            problems.push(format!(
                "strict ingest {key} was refused (23514) but has a usage event"
            ));
        } else {
            problems.push(format!(
                "usage event {key} ({account}, cost {cost}) was never acknowledged to the client: \
                 double application or an unknown write"
            ));
        }
    }
    for key in m.events.keys().chain(settled_usage.keys()) {
        match seen.get(key).copied().unwrap_or(0) {
            1 => {}
            0 => problems.push(format!(
                "acknowledged usage {key} is missing after recovery: {:?}",
                m.events
                    .get(key)
                    .map(|e| format!("{e:?}"))
                    .or_else(|| settled_usage.get(key).map(|s| format!("{s:?}")))
            )),
            n => problems.push(format!("usage {key} is recorded {n} times")),
        }
    }

    // Grants: each acknowledged one (top-up, webhook payment, setup) once, with its amount; nothing else.
    let rows = c
        .query(
            "SELECT coalesce(key, '<no key> ' || id), account, amount, unit FROM billing.grants",
            &[],
        )
        .unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &rows {
        let (key, account, amount, unit): (String, String, i64, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        *seen.entry(key.clone()).or_default() += 1;
        match m.grants.get(&key) {
            Some((a, n)) if (a, *n, unit.as_str()) == (&account, amount, "usd_cents") => {}
            Some((a, n)) => problems.push(format!(
                "grant {key}: database has {amount} {unit} to {account}, the client was told {n} to {a}"
            )),
            None => problems.push(format!(
                "grant {key} ({amount} to {account}) was never acknowledged to the client: \
                 double application or an unknown write"
            )),
        }
    }
    for (key, (a, n)) in &m.grants {
        match seen.get(key).copied().unwrap_or(0) {
            1 => {}
            0 => problems.push(format!(
                "acknowledged grant {key} ({n} to {a}) is missing after recovery"
            )),
            k => problems.push(format!("grant {key} is recorded {k} times")),
        }
    }

    // Holds: each acknowledged reservation once, in the state the client was told, none below its floor.
    let rows = c
        .query(
            "SELECT coalesce(h.key, '<no key> ' || h.id), h.id, h.account, h.amount, h.status, \
                    h.settled_amount, h.available_after, p.floor \
             FROM billing.holds h JOIN billing.pools p ON p.id = h.pool_id",
            &[],
        )
        .unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &rows {
        let key: String = r.get(0);
        *seen.entry(key.clone()).or_default() += 1;
        let (id, account, amount, status, settled, after, floor): (
            i64,
            String,
            i64,
            String,
            Option<i64>,
            i64,
            i64,
        ) = (
            r.get(1),
            r.get(2),
            r.get(3),
            r.get(4),
            r.get(5),
            r.get(6),
            r.get(7),
        );
        if after < floor {
            problems.push(format!(
                "hold {key} was accepted below its floor: available after {after} < floor {floor}"
            ));
        }
        let Some(h) = m.holds.get(&key) else {
            problems.push(if m.refused_holds.contains(&key) {
                format!("reservation {key} was refused (23514) but has a hold")
            } else {
                format!("hold {key} ({amount} on {account}) was never acknowledged to the client")
            });
            continue;
        };
        let expected = match h.end {
            HoldEnd::Open => ("open", None),
            HoldEnd::Settled { actual, .. } => ("settled", Some(actual)),
            HoldEnd::Released => ("released", None),
        };
        if (id, &account, amount) != (h.hold_id, &h.account, h.amount)
            || (status.as_str(), settled) != expected
        {
            problems.push(format!(
                "hold {key}: database has id {id} {amount} on {account}, {status} settled_amount {settled:?}; \
                 the client was told id {} {} on {}, {:?}",
                h.hold_id, h.amount, h.account, h.end
            ));
        }
    }
    for key in m.holds.keys() {
        match seen.get(key).copied().unwrap_or(0) {
            1 => {}
            0 => problems.push(format!(
                "acknowledged hold {key} is missing after recovery: {:?}",
                m.holds[key]
            )),
            k => problems.push(format!("hold {key} is recorded {k} times")),
        }
    }

    // Webhooks: each acknowledged delivery applied exactly once; none rejected or failed.
    let rows = c
        .query(
            "SELECT coalesce(provider_event_id, '<none>'), status, count(*) FROM billing.webhook_events \
             GROUP BY 1, 2",
            &[],
        )
        .unwrap();
    let mut applied: HashMap<String, i64> = HashMap::new();
    for r in &rows {
        let (evt, status, n): (String, String, i64) = (r.get(0), r.get(1), r.get(2));
        match status.as_str() {
            "applied" => {
                applied.insert(evt.clone(), n);
                if !m.webhooks.contains_key(&evt) {
                    problems.push(format!(
                        "webhook {evt} applied but never acknowledged to the client"
                    ));
                }
            }
            "duplicate" => {}
            other => problems.push(format!("{n} deliveries of webhook {evt} are {other}")),
        }
    }
    for (evt, payment) in &m.webhooks {
        let n = applied.get(evt).copied().unwrap_or(0);
        if n != 1 {
            problems.push(format!(
                "acknowledged webhook {evt} (payment {payment}) is applied {n} times"
            ));
        }
    }

    problems.extend(
        ledger_problems(c)
            .into_iter()
            .map(|p| format!("verify_ledger: {p}")),
    );

    // Every pool equals a recomputation from the client's own record.
    for (account, (granted, charged, held)) in m.pools() {
        let r = c
            .query_one(
                "SELECT balance, debt, held, available FROM billing.check($1, 'usd_cents')",
                &[&account],
            )
            .unwrap();
        let (balance, debt, db_held, available): (i64, i64, i64, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        if balance - debt != granted - charged {
            problems.push(format!(
                "pool {account}: balance {balance} − debt {debt} = {}, but the client's record gives \
                 granted {granted} − charged {charged} = {}",
                balance - debt,
                granted - charged
            ));
        }
        if db_held != held {
            problems.push(format!(
                "pool {account}: held {db_held}, but the client left {held} in open holds"
            ));
        }
        if available != balance - db_held - debt {
            problems.push(format!(
                "pool {account}: available {available} ≠ balance {balance} − held {db_held} − debt {debt}"
            ));
        }
    }
}
