//! README, "Tenants and roles": random and hostile inputs — huge, empty, unicode, SQL-looking,
//! boundary integers, odd numerics, timestamps and JSON, and SQL NULL in any
//! argument position — thrown at every public function. Each call succeeds or
//! fails with a documented SQLSTATE (a NULL where a value is required is 22004,
//! never XX000); the backend never crashes; the ledger invariants hold
//! afterwards.
//!
//! Interleaved with the calls, webhook deliveries as a sender makes them:
//! Stripe, Standard Webhooks and generic endpoints receive hostile bodies with
//! valid signatures (realistic Stripe events with hostile field values) and
//! invalid, malformed, huge and duplicated signature headers, through
//! `billing.receive_webhook` and through a plain INSERT into the inbox. Nothing
//! a sender controls may make a delivery raise: each one returns a row whose
//! status says what happened, and a delivery that changed nothing keeps only a
//! bounded sample of its body.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use hmac::{Hmac, Mac};
use pg_billing_client_tests::{fresh_db, ledger_problems, sqlstate, unix_now, Rng};
use postgres::types::ToSql;
use postgres::Client;
use sha2::Sha256;

const DB: &str = "pgb_hostile_inputs";
/// Calls of the public functions with random arguments.
const CALLS: usize = 4000;
/// Webhook deliveries as a sender makes them, interleaved with the calls.
const DELIVERIES: usize = 1500;
/// Each argument of a call is SQL NULL one time in this many.
const NULL_ONE_IN: u64 = 14;

/// pg_billing's own codes (README "Errors") and PostgreSQL's for arguments
/// that do not even parse as their declared type.
const DOCUMENTED: &[&str] = &[
    "22023", "22004", "22003", "42704", "23505", "23514", "55000", "42501", // pg_billing
    "22P02", "22007", "22008", "22009", "22P05", "54000",
    "2201B", // PostgreSQL input syntax / range
];

/// What a delivery may end as.
const STATUSES: &[&str] = &["applied", "duplicate", "rejected", "failed", "superseded"];

/// What a delivery that changed nothing keeps of its body, at most.
const SAMPLE_BYTES: i32 = 2048;

const STRIPE_SECRET: &str = "whsec_fuzz_stripe_secret";
const STANDARD_KEY: &[u8] = b"pg_billing hostile standard key!";
const GENERIC_SECRET: &str = "generic fuzz secret";
const GENERIC_HEADER: &str = "X-Fuzz-Signature";

/// Findings are collected, not raised at once, so one run reports every kind;
/// this many examples of each kind are kept.
const EXAMPLES_PER_FINDING: usize = 3;

fn pick<'a>(rng: &mut Rng, xs: &'a [String]) -> &'a str {
    &xs[(rng.next_u64() % xs.len() as u64) as usize]
}

fn pick_str<'a>(rng: &mut Rng, xs: &[&'a str]) -> &'a str {
    xs[(rng.next_u64() % xs.len() as u64) as usize]
}

fn chance(rng: &mut Rng, percent: i64) -> bool {
    rng.range(0, 99) < percent
}

/// A value from `xs`, or SQL NULL one time in NULL_ONE_IN.
fn arg(rng: &mut Rng, xs: &[String]) -> Option<String> {
    if rng.next_u64().is_multiple_of(NULL_ONE_IN) {
        None
    } else {
        Some(pick(rng, xs).to_string())
    }
}

/// An optional argument: NULL half of the time, else a value from `xs`.
fn opt(rng: &mut Rng, xs: &[String]) -> Option<String> {
    if chance(rng, 50) {
        None
    } else {
        Some(pick(rng, xs).to_string())
    }
}

/// An optional argument: NULL half of the time, else mostly plausible.
fn opt2(rng: &mut Rng, likely: &[String], other: &[String]) -> Option<String> {
    if chance(rng, 50) {
        None
    } else if chance(rng, 70) {
        Some(pick(rng, likely).to_string())
    } else {
        Some(pick(rng, other).to_string())
    }
}

/// Mostly a plausible value from `likely`, else anything from `other`; NULL
/// one time in NULL_ONE_IN.
fn arg2(rng: &mut Rng, likely: &[String], other: &[String]) -> Option<String> {
    if chance(rng, 70) {
        arg(rng, likely)
    } else {
        arg(rng, other)
    }
}

fn strs(xs: &[&str]) -> Vec<String> {
    xs.iter().map(|s| s.to_string()).collect()
}

fn texts(rng: &mut Rng) -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        " ",
        "a",
        "org_1",
        "usd",
        "credits",
        "ai",
        "NULL",
        "null",
        "'",
        "''",
        "\\",
        "\"",
        "--",
        "'; DROP TABLE billing.grants; --",
        "$$; SELECT 1; $$",
        "%s%s%n",
        "☃",
        "ü𝄞漢字",
        "\u{202e}rtl",
        "tab\there",
        "line\nbreak",
        "Usd",
        "USD",
        "usd mills",
        "1abc",
        "_x",
        "a-b",
        "billing:hold:1",
        "x".repeat(63).as_str(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("k".repeat(255));
    v.push("k".repeat(256));
    v.push("x".repeat(64));
    v.push("z".repeat(100_000));
    v.push("漢".repeat(3000));
    for _ in 0..8 {
        let n = rng.range(1, 40) as usize;
        v.push(
            (0..n)
                .map(|_| char::from_u32(rng.range(0x20, 0x2FF) as u32).unwrap_or('?'))
                .collect(),
        );
    }
    v
}

fn ints() -> Vec<String> {
    strs(&[
        "0",
        "1",
        "-1",
        "2",
        "3",
        "18",
        "19",
        "100",
        "1000000",
        "9223372036854775807",
        "-9223372036854775808",
        "9223372036854775806",
        "4611686018427387904",
        "2147483647",
        "-2147483648",
        "12x",
        "",
        "1.5",
        "1e3",
    ])
}

/// Grant, hold and usage ids: mostly ones that exist.
fn ids() -> Vec<String> {
    let mut v: Vec<String> = (1..=40).map(|i| i.to_string()).collect();
    v.extend(strs(&["0", "-1", "9223372036854775807", "x"]));
    v
}

fn numerics() -> Vec<String> {
    strs(&[
        "0",
        "1",
        "-1",
        "0.5",
        "-0.5",
        "1e20",
        "1e-20",
        "NaN",
        "Infinity",
        "-Infinity",
        "123456789012345678901234567890.123",
        "99999999999999999999",
        "3",
        "2.5",
        "x",
    ])
}

fn timestamps() -> Vec<String> {
    strs(&[
        "infinity",
        "-infinity",
        "1970-01-01",
        "2000-01-01 00:00:00+00",
        "294276-12-31",
        "294277-01-01",
        "4714-11-24 BC",
        "now",
        "tomorrow",
        "yesterday",
        "2026-13-45",
        "not a date",
        "",
    ])
}

fn jsons(rng: &mut Rng) -> Vec<String> {
    let mut v = strs(&[
        "{}",
        "[]",
        "null",
        "\"s\"",
        "1",
        "{\"a\":",
        "{\"a\":1}",
        "[{}]",
        "{\"\\u0000\":1}",
        "{\"a\":\"\\ud800\"}",
        "{\"a\":1e400}",
    ]);
    v.push(format!("{{\"big\":\"{}\"}}", "y".repeat(20_000)));
    v.push(format!("{}1{}", "[".repeat(3000), "]".repeat(3000)));
    let events: Vec<String> = (0..rng.range(0, 5))
        .map(|i| {
            format!(
                r#"{{"account":"org_{}","meter":"usd","quantity":{},"key":"bk{}","cost":{}}}"#,
                rng.range(0, 3),
                rng.range(-2, 5),
                rng.range(0, 20) + i,
                rng.range(-1, 100)
            )
        })
        .collect();
    v.push(format!("[{}]", events.join(",")));
    v
}

fn intervals() -> Vec<String> {
    strs(&[
        "0",
        "-1 day",
        "1 microsecond",
        "15 minutes",
        "1000 years",
        "1 month",
        "31 days",
        "30 days",
        "infinity",
        "junk",
    ])
}

/// The argument pools of the calls.
struct Pools {
    t: Vec<String>,
    i: Vec<String>,
    ids: Vec<String>,
    n: Vec<String>,
    ts: Vec<String>,
    j: Vec<String>,
    iv: Vec<String>,
    bools: Vec<String>,
    kinds: Vec<String>,
    units: Vec<String>,
    /// plausible values, so that calls also get past validation
    accounts: Vec<String>,
    keys: Vec<String>,
    amounts: Vec<String>,
    quantities: Vec<String>,
    recent: Vec<String>,
    objects: Vec<String>,
    currencies: Vec<String>,
    schemes: Vec<String>,
    signature_headers: Vec<String>,
    secrets: Vec<String>,
    /// endpoints the configuration calls may redefine or rotate
    config_endpoints: Vec<String>,
    /// every endpoint, the senders' included
    endpoints: Vec<String>,
    event_types: Vec<String>,
    handlers: Vec<String>,
    roles: Vec<String>,
}

impl Pools {
    fn new(rng: &mut Rng) -> Pools {
        Pools {
            t: texts(rng),
            i: ints(),
            ids: ids(),
            n: numerics(),
            ts: timestamps(),
            j: jsons(rng),
            iv: intervals(),
            bools: strs(&["true", "false", "t", "f", "on", "maybe", ""]),
            kinds: strs(&[
                "manual", "plan", "promo", "topup", "reload", "refund", "Manual", "debt",
            ]),
            accounts: strs(&["org_1", "org_2", "acct ☃"]),
            keys: (0..300).map(|k| format!("k{k}")).collect(),
            amounts: strs(&["1", "2", "10", "100", "1000"]),
            quantities: strs(&["1", "2.5", "3", "0.5"]),
            recent: strs(&["now", "yesterday", "tomorrow", "infinity"]),
            objects: strs(&["{}", "{\"a\":1}"]),
            units: strs(&[
                "usd",
                "usd",
                "usd",
                "usd_cents",
                "jpy_credits",
                "ai_requests",
                "Usd",
                "",
                " ",
            ]),
            currencies: strs(&[
                "usd", "USD", "jpy", "kwd", "eur", "xyz", "", "us", "usdd", "üsd", "u1d",
            ]),
            schemes: strs(&["stripe", "standard", "generic", "Stripe", "svix", ""]),
            signature_headers: strs(&["x-signature", "X-Signature", "Stripe-Signature", "date"]),
            secrets: vec![
                "whsec_x".into(),
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
                "whsec_".into(),
                "whsec_!!!".into(),
                "".into(),
                "☃".into(),
                "s".repeat(10_000),
            ],
            config_endpoints: strs(&["hooks", "hooks2", "Hooks", "h"]),
            endpoints: strs(&["hooks", "stripe_in", "std_in", "gen_in", "nope"]),
            event_types: strs(&[
                "fuzz.ok",
                "fuzz.raise",
                "fuzz.null",
                "charge.dispute.closed",
                "invoice.paid",
                "",
                "*",
            ]),
            handlers: strs(&[
                "public.fuzz_ok(billing.webhook_events)",
                "public.fuzz_raise(billing.webhook_events)",
                "public.fuzz_null(billing.webhook_events)",
                "public.fuzz_wrong(integer)",
                "pg_temp.fuzz_tmp(billing.webhook_events)",
                "billing.stripe_credit_topup(billing.webhook_events)",
                "billing.stripe_reverse_payment(billing.webhook_events)",
                "billing.receive_webhook(text,jsonb,text)",
                "billing.verify_ledger()",
                "now()",
                "nosuch(integer)",
                "\"☃\"(text)",
            ]),
            roles: vec![
                "billing_app".into(),
                "billing_reader".into(),
                "billing_admin".into(),
                "postgres".into(),
                "BILLING_APP".into(),
                "nosuchrole".into(),
                "pg_read_all_data".into(),
                "".into(),
                "public".into(),
                "r".repeat(70),
            ],
        }
    }
}

/// How a call's result is judged.
#[derive(Clone, Copy)]
enum Rule {
    /// ok, or an error with a documented SQLSTATE
    Documented,
    /// a delivery: exactly one row with a final status; it raises only for a
    /// NULL endpoint (22004) or, when its headers are not JSON text at all,
    /// with the cast's own documented error
    Delivery {
        null_endpoint: bool,
        headers_parse: bool,
    },
    /// verify_ledger(): no rows
    NoRows,
}

struct Call {
    name: &'static str,
    sql: &'static str,
    args: Vec<Option<String>>,
    rule: Rule,
}

fn call(name: &'static str, sql: &'static str, args: Vec<Option<String>>) -> Call {
    Call {
        name,
        sql,
        args,
        rule: Rule::Documented,
    }
}

/// Every public function (sql/security.sql grants them), with random
/// arguments in every position, by the name its outcomes are counted under.
const FUNCTIONS: &[&str] = &[
    "grant",
    "ingest",
    "ingest strict",
    "ingest_batch",
    "reserve",
    "settle",
    "release",
    "void_grant",
    "revoke_unused",
    "reverse_grant",
    "check",
    "balance",
    "account",
    "define_meter",
    "set_floor",
    "receive_webhook",
    "verify_webhook",
    "current_tenant",
    "define_unit",
    "currency_exponent",
    "verify_ledger",
    "sweep",
    "define_webhook_endpoint",
    "rotate_webhook_secret",
    "register_webhook_handler",
    "map_webhook_currency",
    "purge_webhook_events",
    "grant_tenant",
    "revoke_tenant",
    "grant_state",
];

/// Functions that take no argument a NULL could be refused for: none, a
/// STRICT one (NULL in, NULL out), and set_config (NULL resets the setting).
const NO_REQUIRED_ARGUMENT: &[&str] = &[
    "verify_ledger",
    "currency_exponent",
    "current_tenant",
    "grant_state",
];

fn random_call(rng: &mut Rng, p: &Pools, valid_json: &HashSet<String>) -> Call {
    let r = rng;
    match r.range(0, FUNCTIONS.len() as i64 - 1) {
        0 => call(
            "grant",
            "SELECT * FROM billing.grant($1, $2, $3::text::bigint, $4, $5::text::int, \
             $6::text::timestamptz, $7::text::timestamptz, $8, $9::text::jsonb)",
            vec![
                arg2(r, &p.accounts, &p.t),
                arg2(r, &p.units, &p.t),
                arg2(r, &p.amounts, &p.i),
                arg2(r, &p.kinds, &p.t),
                opt(r, &p.i),
                opt2(r, &p.recent, &p.ts),
                opt2(r, &p.recent, &p.ts),
                opt2(r, &p.keys, &p.t),
                arg2(r, &p.objects, &p.j),
            ],
        ),
        1 => call(
            "ingest",
            "SELECT * FROM billing.ingest($1, $2, $3::text::numeric, $4, $5::text::timestamptz, \
             $6::text::jsonb, $7::text::bigint, $8::text::boolean)",
            vec![
                arg2(r, &p.accounts, &p.t),
                arg2(r, &p.units, &p.t),
                arg2(r, &p.quantities, &p.n),
                arg2(r, &p.keys, &p.t),
                opt2(r, &p.recent, &p.ts),
                arg2(r, &p.objects, &p.j),
                opt(r, &p.i),
                arg(r, &p.bools),
            ],
        ),
        2 => call(
            "ingest strict",
            "SELECT * FROM billing.ingest($1, 'usd', $2::text::numeric, key => $3, \
             cost => $4::text::bigint, strict => true)",
            vec![arg(r, &p.t), arg(r, &p.n), arg(r, &p.t), arg(r, &p.i)],
        ),
        3 => call(
            "ingest_batch",
            "SELECT * FROM billing.ingest_batch($1::text::jsonb)",
            vec![arg(r, &p.j)],
        ),
        4 => call(
            "reserve",
            "SELECT * FROM billing.reserve($1, $2, $3::text::bigint, $4, $5::text::interval, \
             $6::text::jsonb)",
            vec![
                arg2(r, &p.accounts, &p.t),
                arg2(r, &p.units, &p.t),
                arg2(r, &p.amounts, &p.i),
                arg2(r, &p.keys, &p.t),
                arg(r, &p.iv),
                arg2(r, &p.objects, &p.j),
            ],
        ),
        5 => call(
            "settle",
            "SELECT * FROM billing.settle($1::text::bigint, $2::text::bigint, $3, $4, \
             $5::text::numeric, $6::text::jsonb)",
            vec![
                arg(r, &p.ids),
                arg2(r, &p.amounts, &p.i),
                opt2(r, &p.keys, &p.t),
                opt2(r, &p.units, &p.t),
                opt2(r, &p.quantities, &p.n),
                opt2(r, &p.objects, &p.j),
            ],
        ),
        6 => call(
            "release",
            "SELECT * FROM billing.release($1::text::bigint)",
            vec![arg(r, &p.ids)],
        ),
        7 => call(
            "void_grant",
            "SELECT * FROM billing.void_grant($1::text::bigint)",
            vec![arg(r, &p.ids)],
        ),
        8 => call(
            "revoke_unused",
            "SELECT * FROM billing.revoke_unused($1::text::bigint)",
            vec![arg(r, &p.ids)],
        ),
        9 => call(
            "reverse_grant",
            "SELECT * FROM billing.reverse_grant($1::text::bigint, $2::text::bigint)",
            vec![arg(r, &p.ids), arg(r, &p.i)],
        ),
        10 => call(
            "check",
            "SELECT * FROM billing.check($1, $2, $3::text::bigint)",
            vec![arg(r, &p.t), arg2(r, &p.units, &p.t), arg(r, &p.i)],
        ),
        11 => call(
            "balance",
            "SELECT * FROM billing.balance($1, $2, $3::text::timestamptz)",
            vec![arg(r, &p.t), arg2(r, &p.units, &p.t), arg(r, &p.ts)],
        ),
        12 => call(
            "account",
            "SELECT * FROM billing.account($1, $2, $3::text::jsonb)",
            vec![arg(r, &p.t), arg(r, &p.t), arg(r, &p.j)],
        ),
        13 => call(
            "define_meter",
            "SELECT billing.define_meter($1, $2, $3::text::numeric, $4)",
            vec![
                arg(r, &p.t),
                arg2(r, &p.units, &p.t),
                arg(r, &p.n),
                arg(r, &p.t),
            ],
        ),
        14 => call(
            "set_floor",
            "SELECT billing.set_floor($1, $2, $3::text::bigint)",
            vec![arg(r, &p.t), arg2(r, &p.units, &p.t), arg(r, &p.i)],
        ),
        15 => {
            let args = vec![
                arg2(r, &p.endpoints, &p.t),
                arg(r, &p.j),
                arg2(r, &p.j, &p.t),
            ];
            let rule = Rule::Delivery {
                null_endpoint: args[0].is_none(),
                headers_parse: args[1].as_ref().is_none_or(|h| valid_json.contains(h)),
            };
            Call {
                name: "receive_webhook",
                sql: "SELECT webhook_event_id, status, reason \
                      FROM billing.receive_webhook($1, $2::text::jsonb, $3)",
                args,
                rule,
            }
        }
        16 => call(
            "verify_webhook",
            "SELECT * FROM billing.verify_webhook($1, $2, $3::text::jsonb, $4, $5, \
             $6::text::int, $7)",
            vec![
                arg2(r, &p.schemes, &p.t),
                arg2(r, &p.secrets, &p.t),
                arg(r, &p.j),
                arg(r, &p.t),
                arg2(r, &p.secrets, &p.t),
                arg(r, &p.i),
                arg(r, &p.t),
            ],
        ),
        17 => call(
            "current_tenant",
            "SELECT set_config('billing.tenant', $1, false), billing.current_tenant()",
            vec![arg(r, &p.t)],
        ),
        18 => call(
            "define_unit",
            "SELECT billing.define_unit($1, $2)",
            vec![arg2(r, &p.units, &p.t), arg(r, &p.t)],
        ),
        19 => call(
            "currency_exponent",
            "SELECT billing.currency_exponent($1)",
            vec![arg2(r, &p.currencies, &p.t)],
        ),
        20 => Call {
            name: "verify_ledger",
            sql: "SELECT problem FROM billing.verify_ledger()",
            args: vec![],
            rule: Rule::NoRows,
        },
        21 => call(
            "sweep",
            "SELECT billing.sweep($1::text::int)",
            vec![arg(r, &p.i)],
        ),
        22 => call(
            "define_webhook_endpoint",
            "SELECT billing.define_webhook_endpoint($1, $2, $3, $4::text::int, $5, $6, \
             $7::text::bigint, $8)",
            vec![
                arg2(r, &p.config_endpoints, &p.t),
                arg2(r, &p.schemes, &p.t),
                arg2(r, &p.secrets, &p.t),
                arg2(r, &p.amounts, &p.i),
                arg2(r, &p.signature_headers, &p.t),
                arg2(r, &p.units, &p.t),
                arg2(r, &p.amounts, &p.i),
                arg2(r, &p.currencies, &p.t),
            ],
        ),
        23 => call(
            "rotate_webhook_secret",
            "SELECT billing.rotate_webhook_secret($1, $2, $3::text::interval)",
            vec![
                arg2(r, &p.config_endpoints, &p.t),
                arg2(r, &p.secrets, &p.t),
                arg(r, &p.iv),
            ],
        ),
        24 => call(
            // to_regprocedure: a well-formed name of no function is NULL
            "register_webhook_handler",
            "SELECT billing.register_webhook_handler($1, to_regprocedure($2), $3)",
            vec![
                arg2(r, &p.event_types, &p.t),
                arg(r, &p.handlers),
                arg2(r, &p.endpoints, &p.t),
            ],
        ),
        25 => call(
            "map_webhook_currency",
            "SELECT billing.map_webhook_currency($1, $2, $3, $4::text::int, $5::text::bigint)",
            vec![
                arg2(r, &p.endpoints, &p.t),
                arg2(r, &p.currencies, &p.t),
                arg2(r, &p.units, &p.t),
                opt(r, &p.i),
                opt(r, &p.i),
            ],
        ),
        26 => call(
            "purge_webhook_events",
            "SELECT billing.purge_webhook_events($1::text::interval, $2::text::boolean)",
            vec![arg(r, &p.iv), arg(r, &p.bools)],
        ),
        27 => call(
            "grant_tenant",
            "SELECT billing.grant_tenant($1, $2::text::name)",
            vec![arg(r, &p.t), arg2(r, &p.roles, &p.t)],
        ),
        28 => call(
            "revoke_tenant",
            "SELECT billing.revoke_tenant($1, $2::text::name)",
            vec![arg(r, &p.t), arg2(r, &p.roles, &p.t)],
        ),
        _ => call(
            "grant_state",
            "SELECT billing.grant_state($1, $2::text::bigint, $3::text::timestamptz, \
             $4::text::timestamptz, $5::text::timestamptz)",
            vec![
                arg(r, &p.t),
                arg2(r, &p.amounts, &p.i),
                arg2(r, &p.recent, &p.ts),
                arg2(r, &p.recent, &p.ts),
                arg2(r, &p.recent, &p.ts),
            ],
        ),
    }
}

// ----- webhook senders ----------------------------------------------------------

fn hmac(key: &[u8], msg: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(msg.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn b64(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(A[((n >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// An IMF-fixdate, as in an HTTP `Date` header.
fn http_date(secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    // civil-from-days (H. Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A JSON string literal.
fn js(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn deep_array(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

fn deep_object(depth: usize) -> String {
    format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
}

/// JSON values of every type and odd shape, as raw JSON text.
fn odd_value(rng: &mut Rng) -> String {
    match rng.range(0, 17) {
        0 => "null".into(),
        1 => "true".into(),
        2 => "0".into(),
        3 => "-1".into(),
        4 => "1.5".into(),
        5 => "\"\"".into(),
        6 => js("☃ü𝄞"),
        7 => "{}".into(),
        8 => "[]".into(),
        9 => "[1,\"a\",null]".into(),
        10 => "\"\\u0000\"".into(),
        11 => "\"\\ud800\"".into(),
        12 => "1e400".into(),
        13 => js(&"q".repeat(rng.range(256, 5000) as usize)),
        14 => js(&"漢".repeat(rng.range(100, 3000) as usize)),
        15 => deep_array(rng.range(100, 5000) as usize),
        16 => js("'; DROP TABLE billing.grants; --"),
        _ => "-9223372036854775809".into(),
    }
}

/// A field's value: usually `normal`, sometimes odd, sometimes missing (None).
fn field(rng: &mut Rng, normal: impl FnOnce(&mut Rng) -> String) -> Option<String> {
    match rng.range(0, 99) {
        0..=3 => None,
        4..=15 => Some(odd_value(rng)),
        _ => Some(normal(rng)),
    }
}

fn amount(rng: &mut Rng) -> String {
    if chance(rng, 70) {
        return rng.range(1, 5000).to_string();
    }
    pick_str(
        rng,
        &[
            "0",
            "-1",
            "-100",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "1e30",
            "1.5",
            "100.0",
            "\"100\"",
            "\"abc\"",
            "null",
            "{}",
            "[100]",
            "true",
            "1e400",
            "4611686018427387904",
        ],
    )
    .to_string()
}

fn currency(rng: &mut Rng) -> String {
    if chance(rng, 55) {
        return js("usd");
    }
    match rng.range(0, 12) {
        0 => js("USD"),
        1 => js("Usd"),
        2 => js("jpy"),
        3 => js("kwd"),
        4 => js("eur"),
        5 => js("xyz"),
        6 => js(""),
        7 => js("usdusd"),
        8 => js(&"c".repeat(1000)),
        9 => js("üsd"),
        10 => "5".into(),
        _ => "null".into(),
    }
}

fn account_id(rng: &mut Rng) -> String {
    if chance(rng, 80) {
        return js(&format!("org_{}", rng.range(1, 3)));
    }
    match rng.range(0, 7) {
        0 => js(""),
        1 => js(" "),
        2 => js(&"a".repeat(200)),
        3 => js("☃"),
        4 => js("tab\there"),
        5 => js("billing:x"),
        6 => "42".into(),
        _ => "null".into(),
    }
}

fn object(fields: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = fields
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{}:{v}", js(k))))
        .collect();
    format!("{{{}}}", parts.join(","))
}

/// A Stripe event as Stripe sends it, with hostile values in any field;
/// created around `t0`, the start of the run, so runs are alike.
fn stripe_event(rng: &mut Rng, t0: i64) -> String {
    const TYPES: &[&str] = &[
        "payment_intent.succeeded",
        "payment_intent.succeeded",
        "charge.refunded",
        "charge.dispute.created",
        "charge.dispute.closed",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.funds_reinstated",
        "checkout.session.completed",
        "invoice.paid",
        "fuzz.ok",
        "fuzz.raise",
        "fuzz.null",
    ];
    let ty = pick_str(rng, TYPES);
    let payment = js(&format!("pi_{}", rng.range(0, 40)));
    let obj = match ty {
        "payment_intent.succeeded" => {
            let metadata = if chance(rng, 90) {
                object(&[("account", field(rng, account_id))])
            } else {
                odd_value(rng)
            };
            object(&[
                ("id", field(rng, |_| payment.clone())),
                ("object", Some(js("payment_intent"))),
                ("amount_received", field(rng, amount)),
                ("currency", field(rng, currency)),
                ("metadata", field(rng, |_| metadata)),
            ])
        }
        "charge.refunded" => object(&[
            ("id", field(rng, |r| js(&format!("ch_{}", r.range(0, 40))))),
            ("payment_intent", field(rng, |_| payment.clone())),
            ("amount_refunded", field(rng, amount)),
            ("currency", field(rng, currency)),
        ]),
        "checkout.session.completed" => {
            let paid = pick_str(rng, &["paid", "paid", "unpaid", "no_payment_required"]);
            object(&[
                ("id", field(rng, |r| js(&format!("cs_{}", r.range(0, 40))))),
                ("payment_intent", field(rng, |_| payment.clone())),
                ("amount_total", field(rng, amount)),
                ("currency", field(rng, currency)),
                ("payment_status", field(rng, |_| js(paid))),
                ("client_reference_id", field(rng, account_id)),
            ])
        }
        _ => {
            let status = pick_str(
                rng,
                &[
                    "needs_response",
                    "under_review",
                    "lost",
                    "won",
                    "warning_needs_response",
                    "prevented",
                    "LOST",
                ],
            );
            object(&[
                ("id", field(rng, |r| js(&format!("dp_{}", r.range(0, 20))))),
                ("payment_intent", field(rng, |_| payment.clone())),
                ("amount", field(rng, amount)),
                ("currency", field(rng, currency)),
                ("status", field(rng, |_| js(status))),
            ])
        }
    };
    let data = match rng.range(0, 99) {
        0..=2 => None,
        3..=11 => Some(odd_value(rng)),
        12..=16 => Some(object(&[("object", Some(odd_value(rng)))])),
        17..=19 => Some(object(&[
            ("object", Some(obj)),
            ("nested", Some(deep_object(rng.range(100, 3000) as usize))),
        ])),
        _ => Some(object(&[("object", Some(obj))])),
    };
    let created = if chance(rng, 80) {
        (t0 - rng.range(0, 60)).to_string()
    } else {
        pick_str(
            rng,
            &[
                "1e20",
                "-5",
                "\"1700000000\"",
                "1700000000.5",
                "0",
                "253402300799",
                "253402300800",
                "-0",
                "1e400",
                "1e-7",
                "null",
                "[1]",
                "99999999999999999999999999999",
            ],
        )
        .to_string()
    };
    let mut fields = vec![
        (
            "id",
            field(rng, |r| js(&format!("evt_{}", r.range(0, 600)))),
        ),
        ("object", Some(js("event"))),
        ("type", field(rng, |_| js(ty))),
        ("created", Some(created)),
        ("livemode", Some("false".into())),
        ("data", data),
    ];
    if chance(rng, 3) {
        // a duplicated key: JSON keeps the last
        fields.push(("id", Some(js(&format!("evt_dup_{}", rng.range(0, 5))))));
    }
    object(&fields)
}

/// A body a sender might send: mostly a Stripe-like event, else anything.
fn sender_body(rng: &mut Rng, t0: i64) -> String {
    if chance(rng, 80) {
        return stripe_event(rng, t0);
    }
    match rng.range(0, 17) {
        0 => "".into(),
        1 => " ".into(),
        2 => "null".into(),
        3 => "[]".into(),
        4 => "{}".into(),
        5 => "\"str\"".into(),
        6 => "not json".into(),
        7 => "{\"id\":".into(),
        8 => r#"{"id":"evt_only_id"}"#.into(),
        9 => r#"{"type":"payment_intent.succeeded","data":{"object":{}}}"#.into(),
        10 => deep_array(rng.range(1000, 20_000) as usize),
        11 => deep_object(rng.range(1000, 10_000) as usize),
        12 => r#"{"id":"evt_\u0000","type":"fuzz.ok"}"#.into(),
        13 => "漢".repeat(rng.range(700, 5000) as usize),
        14 => "'; DROP TABLE billing.grants; --".into(),
        15 if chance(rng, 30) => "x".repeat(1_100_000),
        15 => format!(
            r#"{{"id":"evt_big_{}","type":"fuzz.ok","pad":"{}"}}"#,
            rng.range(0, 9),
            "p".repeat(200_000)
        ),
        _ => format!(
            r#"{{"id":"evt_u_{}","type":"fuzz.ok","note":{}}}"#,
            rng.range(0, 9),
            js(&"ü".repeat(rng.range(1000, 4000) as usize))
        ),
    }
}

/// Header sets every scheme must refuse without raising.
fn hostile_headers(rng: &mut Rng) -> String {
    match rng.range(0, 6) {
        0 => "[]".into(),
        1 => "\"Stripe-Signature\"".into(),
        2 => "1".into(),
        3 => "null".into(),
        4 => {
            // over 64 KiB in all
            let fields: Vec<String> = (0..20)
                .map(|k| format!("\"x-pad-{k}\":{}", js(&"h".repeat(4000))))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        5 => {
            let fields: Vec<String> = (0..1000).map(|k| format!("\"x-{k}\":\"{k}\"")).collect();
            format!("{{{}}}", fields.join(","))
        }
        _ => object(&[("webhook-signature", Some(js(&"v1,".repeat(5000))))]),
    }
}

fn stripe_sig(secret: &str, t: &str, body: &str) -> String {
    format!(
        "t={t},v1={}",
        hex::encode(hmac(secret.as_bytes(), &format!("{t}.{body}")))
    )
}

/// Stripe headers for `body`: (headers JSON text, whether the signature is
/// valid for `secret`).
fn stripe_headers(rng: &mut Rng, body: &str, secret: &str) -> (String, bool) {
    let now = unix_now().to_string();
    let sig = stripe_sig(secret, &now, body);
    let bogus = hex::encode([0xabu8; 32]);
    if chance(rng, 65) {
        let h = match rng.range(0, 5) {
            0 => object(&[
                ("stripe-signature", Some(js(&sig))),
                ("Content-Type", Some(js("application/json; charset=utf-8"))),
                (
                    "User-Agent",
                    Some(js("Stripe/1.0 (+https://stripe.com/docs/webhooks)")),
                ),
            ]),
            1 => object(&[(
                "Stripe-Signature",
                Some(js(&format!("{sig},v1={bogus},v0={bogus}"))),
            )]),
            2 => format!("{{\"Stripe-Signature\":[{}]}}", js(&sig)),
            // a duplicated header: JSON keeps the last, the valid one
            3 => format!(
                "{{\"Stripe-Signature\":{},\"Stripe-Signature\":{}}}",
                js(&format!("t={now},v1={bogus}")),
                js(&sig)
            ),
            4 => object(&[("Stripe-Signature", Some(js(&sig.replace(',', " , "))))]),
            _ => object(&[("Stripe-Signature", Some(js(&sig)))]),
        };
        return (h, true);
    }
    let t = unix_now() as i64;
    let bad = match rng.range(0, 22) {
        0 => "{}".into(),
        1 => js(&format!("v1={}", &sig[sig.find("v1=").unwrap() + 3..])),
        2 => js(&format!("t=abc,{}", &sig[sig.find("v1=").unwrap()..])),
        3 => js("t=,v1="),
        4 => js(&stripe_sig(secret, "99999999999999999999", body)),
        5 => js(&stripe_sig(secret, "-5", body)),
        6 => js(&stripe_sig(secret, "1.5", body)),
        7 => js(&stripe_sig(secret, &(t - 100_000).to_string(), body)),
        8 => js(&stripe_sig(secret, &(t + 100_000).to_string(), body)),
        9 => js(&stripe_sig("whsec_wrong", &now, body)),
        10 => js(&format!("t={now},v1=zz")),
        11 => js(",,,,"),
        12 => js("="),
        13 => js(&format!("t={now},v1={}", "ab".repeat(5000))),
        14 => js(&format!(
            "t={now},{}",
            (0..100)
                .map(|_| format!("v1={bogus}"))
                .collect::<Vec<_>>()
                .join(",")
        )),
        15 => "12345".into(),
        16 => "{\"t\":1}".into(),
        17 => "null".into(),
        // an array header holding one valid signature among junk
        18 => {
            return (
                object(&[("Stripe-Signature", Some(format!("[1,{{}},{}]", js(&sig))))]),
                true,
            )
        }
        // the duplicate that JSON keeps is the bad one
        19 => {
            return (
                format!(
                    "{{\"Stripe-Signature\":{},\"Stripe-Signature\":{}}}",
                    js(&sig),
                    js(&format!("t={now},v1={bogus}"))
                ),
                false,
            )
        }
        20 => js(&stripe_sig(secret, &now, &format!("{body} "))),
        21 => js(&format!("{sig}☃")),
        _ => return (hostile_headers(rng), false),
    };
    if bad == "{}" {
        return (bad, false);
    }
    let name = pick_str(
        rng,
        &["Stripe-Signature", "stripe-signature", "STRIPE-SIGNATURE"],
    );
    (object(&[(name, Some(bad))]), false)
}

fn standard_headers(rng: &mut Rng, body: &str) -> (String, bool) {
    let id = if chance(rng, 85) {
        format!("msg_{}", rng.range(0, 300))
    } else {
        pick_str(rng, &["msg_☃", " ", "evt with spaces", "'--"]).to_string()
    };
    let now = unix_now() as i64;
    let sign = |key: &[u8], id: &str, ts: &str| b64(&hmac(key, &format!("{id}.{ts}.{body}")));
    let ts = now.to_string();
    let sig = sign(STANDARD_KEY, &id, &ts);
    let headers = |id: &str, ts: &str, sig: &str| {
        object(&[
            ("webhook-id", Some(js(id))),
            ("webhook-timestamp", Some(js(ts))),
            ("webhook-signature", Some(js(sig))),
        ])
    };
    if chance(rng, 65) {
        let h = match rng.range(0, 3) {
            0 => object(&[
                ("svix-id", Some(js(&id))),
                ("svix-timestamp", Some(js(&ts))),
                ("svix-signature", Some(js(&format!("v1,{sig}")))),
            ]),
            1 => headers(&id, &ts, &format!("v1a,xyz v1,{} v1,{sig}", b64(b"nope"))),
            _ => headers(&id, &ts, &format!("v1,{sig}")),
        };
        return (h, true);
    }
    let h = match rng.range(0, 11) {
        0 => object(&[
            ("webhook-timestamp", Some(js(&ts))),
            ("webhook-signature", Some(js(&format!("v1,{sig}")))),
        ]),
        1 => headers("", &ts, &format!("v1,{}", sign(STANDARD_KEY, "", &ts))),
        2 => {
            let long = "m".repeat(256);
            headers(
                &long,
                &ts,
                &format!("v1,{}", sign(STANDARD_KEY, &long, &ts)),
            )
        }
        3 => headers(
            &id,
            "abc",
            &format!("v1,{}", sign(STANDARD_KEY, &id, "abc")),
        ),
        4 => {
            let old = (now - 100_000).to_string();
            headers(&id, &old, &format!("v1,{}", sign(STANDARD_KEY, &id, &old)))
        }
        5 => {
            let ahead = (now + 100_000).to_string();
            headers(
                &id,
                &ahead,
                &format!("v1,{}", sign(STANDARD_KEY, &id, &ahead)),
            )
        }
        6 => headers(&id, &ts, "v1,!!!"),
        7 => headers(&id, &ts, &sig),
        8 => headers(&id, &ts, &format!("v2,{sig}")),
        9 => headers(&id, &ts, &format!("v1,{}", sign(b"wrong key", &id, &ts))),
        10 => headers(
            &id,
            &ts,
            &format!("v1,{}", sign(STANDARD_KEY, "other", &ts)),
        ),
        _ => hostile_headers(rng),
    };
    (h, false)
}

fn generic_headers(rng: &mut Rng, body: &str) -> (String, bool) {
    let date = http_date(unix_now());
    let mac = hmac(GENERIC_SECRET.as_bytes(), &format!("{date}\n{body}"));
    let headers = |date: &str, sig: &str| {
        object(&[("Date", Some(js(date))), (GENERIC_HEADER, Some(js(sig)))])
    };
    if chance(rng, 65) {
        let sig = if chance(rng, 50) {
            hex::encode(&mac)
        } else {
            b64(&mac)
        };
        return (headers(&date, &sig), true);
    }
    let h = match rng.range(0, 8) {
        0 => object(&[(GENERIC_HEADER, Some(js(&hex::encode(&mac))))]),
        1 => headers("yesterday", &hex::encode(&mac)),
        2 => {
            let old = "Thu, 01 Jan 1970 00:00:00 GMT";
            let mac = hmac(GENERIC_SECRET.as_bytes(), &format!("{old}\n{body}"));
            headers(old, &hex::encode(mac))
        }
        3 => headers("Mon, 01 Jan 1900 00:00:00 GMT", "00"),
        4 => headers(&date, &hex::encode(&mac[..16])),
        5 => headers(&date, "zz!!"),
        6 => headers(
            &date,
            &hex::encode(hmac(b"wrong", &format!("{date}\n{body}"))),
        ),
        7 => object(&[("Date", Some(js(&date)))]),
        _ => hostile_headers(rng),
    };
    (h, false)
}

struct Delivery {
    endpoint: Option<String>,
    headers: Option<String>,
    body: Option<String>,
    via_insert: bool,
    label: String,
}

fn delivery(rng: &mut Rng, t0: i64) -> Delivery {
    let body = sender_body(rng, t0);
    let (endpoint, kind) = match rng.range(0, 99) {
        0..=54 => (Some("stripe_in".to_string()), "stripe"),
        55..=69 => (Some("std_in".to_string()), "standard"),
        70..=84 => (Some("gen_in".to_string()), "generic"),
        85..=89 => (Some("hooks".to_string()), "hooks"),
        90..=98 => {
            let name = match rng.range(0, 5) {
                0 => "".to_string(),
                1 => "STRIPE_IN".to_string(),
                2 => "e".repeat(10_000),
                3 => "☃".to_string(),
                _ => "stripe_in'; --".to_string(),
            };
            (Some(name), "unknown endpoint")
        }
        _ => (None, "null endpoint"),
    };
    let (headers, valid) = match kind {
        "standard" => standard_headers(rng, &body),
        "generic" => generic_headers(rng, &body),
        // the secret 'hooks' starts with; the calls may rotate or redefine it
        "hooks" => stripe_headers(rng, &body, "whsec_x"),
        _ => stripe_headers(rng, &body, STRIPE_SECRET),
    };
    // what an HTTP handler gives when the request has no headers or no body
    let headers = if chance(rng, 2) { None } else { Some(headers) };
    let body = if chance(rng, 2) { None } else { Some(body) };
    let via_insert = endpoint.is_some() && body.is_some() && chance(rng, 20);
    let signed = if valid && headers.is_some() && body.is_some() {
        "signed"
    } else {
        "unsigned"
    };
    Delivery {
        endpoint,
        headers,
        body,
        via_insert,
        label: format!("deliver {kind} {signed}"),
    }
}

// ----- running and judging ------------------------------------------------------

/// Arguments as they may be printed: long ones clipped.
fn show(args: &[Option<String>]) -> String {
    let clipped: Vec<String> = args
        .iter()
        .map(|a| match a {
            None => "NULL".into(),
            Some(s) if s.chars().count() > 120 => {
                let head: String = s.chars().take(100).collect();
                format!("{head:?}… ({} bytes)", s.len())
            }
            Some(s) => format!("{s:?}"),
        })
        .collect();
    format!("[{}]", clipped.join(", "))
}

struct Run {
    c: Client,
    outcomes: BTreeMap<String, u32>,
    /// kind of finding → (how many, the first examples)
    findings: BTreeMap<String, (usize, Vec<String>)>,
}

impl Run {
    fn finding(&mut self, kind: String, example: String) {
        let entry = self.findings.entry(kind).or_default();
        entry.0 += 1;
        if entry.1.len() < EXAMPLES_PER_FINDING {
            entry.1.push(example);
        }
    }

    fn count(&mut self, key: String) {
        *self.outcomes.entry(key).or_insert(0) += 1;
    }

    /// Run `sql`; a lost connection (a crashed backend) ends the test.
    fn query(
        &mut self,
        n: usize,
        sql: &str,
        args: &[Option<String>],
    ) -> Result<Vec<postgres::Row>, (String, String)> {
        let params: Vec<&(dyn ToSql + Sync)> =
            args.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        self.c.query(sql, &params).map_err(|e| match sqlstate(&e) {
            Some(code) => (code, e.to_string()),
            None => panic!(
                "step {n}: {sql} with {}: connection lost (backend crash?): {e}",
                show(args)
            ),
        })
    }

    fn run_call(&mut self, n: usize, call: &Call) {
        let result = self.query(n, call.sql, &call.args);
        let outcome = match (call.rule, result) {
            (Rule::Documented, Ok(_)) => "ok".to_string(),
            (Rule::NoRows, Ok(rows)) => {
                if !rows.is_empty() {
                    let problems: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                    self.finding(
                        "verify_ledger() reports problems".into(),
                        format!("step {n}: {problems:?}"),
                    );
                }
                "ok".to_string()
            }
            (Rule::Delivery { .. }, Ok(rows)) => {
                self.judge_delivery_rows(n, call.sql, &call.args, &rows, None)
            }
            (Rule::Documented | Rule::NoRows, Err((code, e))) => {
                if !DOCUMENTED.contains(&code.as_str()) {
                    self.finding(
                        format!("{} fails with undocumented {code}", call.name),
                        format!("step {n}: {} with {}: {e}", call.sql, show(&call.args)),
                    );
                }
                code
            }
            (
                Rule::Delivery {
                    null_endpoint,
                    headers_parse,
                },
                Err((code, e)),
            ) => {
                let allowed = (null_endpoint && code == "22004")
                    || (!headers_parse && DOCUMENTED.contains(&code.as_str()));
                if !allowed {
                    self.finding(
                        format!("{} raises {code}", call.name),
                        format!("step {n}: {} with {}: {e}", call.sql, show(&call.args)),
                    );
                }
                code
            }
        };
        self.count(format!("{}:{outcome}", call.name));
        if call.name == "current_tenant" {
            self.c.batch_execute("RESET billing.tenant").unwrap();
        }
    }

    /// A delivery's result: one row with a final status, and a sample only if
    /// it changed nothing. Returns the status.
    fn judge_delivery_rows(
        &mut self,
        n: usize,
        sql: &str,
        args: &[Option<String>],
        rows: &[postgres::Row],
        body_bytes: Option<i32>,
    ) -> String {
        if rows.len() != 1 {
            self.finding(
                format!("a delivery returns {} rows", rows.len()),
                format!("step {n}: {sql} with {}", show(args)),
            );
            return format!("{} rows", rows.len());
        }
        let (id, status, reason): (i64, String, Option<String>) =
            (rows[0].get(0), rows[0].get(1), rows[0].get(2));
        if !STATUSES.contains(&status.as_str()) {
            self.finding(
                format!("a delivery ends {status}"),
                format!("step {n}: ({reason:?}): {sql} with {}", show(args)),
            );
        }
        if status == "rejected" || status == "duplicate" {
            let kept = match body_bytes {
                Some(b) => Some(b),
                None => self
                    .c
                    .query_opt(
                        "SELECT octet_length(body) FROM billing.webhook_events WHERE id = $1",
                        &[&id],
                    )
                    .unwrap()
                    .map(|r| r.get(0)),
            };
            if let Some(kept) = kept.filter(|b| *b > SAMPLE_BYTES) {
                self.finding(
                    format!("a {status} delivery keeps over {SAMPLE_BYTES} bytes of body"),
                    format!(
                        "step {n}: delivery {id} ({reason:?}) kept {kept} bytes: {sql} with {}",
                        show(args)
                    ),
                );
            }
        }
        status
    }

    fn run_delivery(&mut self, n: usize, d: &Delivery) {
        let args = vec![d.endpoint.clone(), d.headers.clone(), d.body.clone()];
        let (sql, route) = if d.via_insert {
            (
                "INSERT INTO billing.webhook_events (endpoint, headers, body) \
                 VALUES ($1, $2::text::jsonb, $3) \
                 RETURNING id, status, coalesce(reason, error), octet_length(body)",
                "insert",
            )
        } else {
            (
                "SELECT webhook_event_id, status, reason \
                 FROM billing.receive_webhook($1, $2::text::jsonb, $3)",
                "receive",
            )
        };
        let outcome = match self.query(n, sql, &args) {
            Ok(rows) => {
                let body_bytes = if d.via_insert {
                    rows.first().map(|r| r.get(3))
                } else {
                    None
                };
                self.judge_delivery_rows(n, sql, &args, &rows, body_bytes)
            }
            Err((code, e)) => {
                if !(d.endpoint.is_none() && code == "22004") {
                    self.finding(
                        format!("a delivery ({route}) raises {code}"),
                        format!("step {n}: {sql} with {}: {e}", show(&args)),
                    );
                }
                code
            }
        };
        self.count(format!("{}:{outcome}", d.label));
        self.count(format!("deliver via {route}:{outcome}"));
    }
}

fn setup(c: &mut Client) {
    let std_secret = format!("whsec_{}", b64(STANDARD_KEY));
    c.batch_execute(&format!(
        "SELECT billing.define_unit('usd');
         SELECT * FROM billing.grant('org_1', 'usd', 1000000);
         SELECT r.hold_id FROM generate_series(1, 5) i, billing.reserve('org_1', 'usd', 10, key => 'h' || i) r;
         SELECT billing.define_webhook_endpoint('hooks', 'stripe', 'whsec_x');
         SELECT billing.define_webhook_endpoint('stripe_in', 'stripe', '{STRIPE_SECRET}');
         SELECT billing.map_webhook_currency('stripe_in', 'jpy', 'jpy_credits', unit_exponent => 0);
         SELECT billing.map_webhook_currency('stripe_in', 'kwd', 'kwd_mills', unit_exponent => 3);
         SELECT billing.map_webhook_currency('stripe_in', 'eur', 'ai_requests', credits_per_minor_unit => 10);
         SELECT billing.define_webhook_endpoint('std_in', 'standard', '{std_secret}');
         SELECT billing.define_webhook_endpoint('gen_in', 'generic', '{GENERIC_SECRET}',
                                                signature_header => '{GENERIC_HEADER}');
         CREATE FUNCTION public.fuzz_ok(ev billing.webhook_events) RETURNS jsonb
             LANGUAGE sql AS $$ SELECT jsonb_build_object('seen', ev.provider_event_id) $$;
         CREATE FUNCTION public.fuzz_raise(ev billing.webhook_events) RETURNS jsonb
             LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'handler refuses %', ev.id; END $$;
         CREATE FUNCTION public.fuzz_null(ev billing.webhook_events) RETURNS jsonb
             LANGUAGE sql AS $$ SELECT NULL::jsonb $$;
         CREATE FUNCTION public.fuzz_wrong(x integer) RETURNS jsonb
             LANGUAGE sql AS $$ SELECT '{{}}'::jsonb $$;
         CREATE FUNCTION pg_temp.fuzz_tmp(ev billing.webhook_events) RETURNS jsonb
             LANGUAGE sql AS $$ SELECT '{{}}'::jsonb $$;
         SELECT billing.register_webhook_handler('fuzz.ok', 'public.fuzz_ok(billing.webhook_events)');
         SELECT billing.register_webhook_handler('fuzz.raise', 'public.fuzz_raise(billing.webhook_events)');
         SELECT billing.register_webhook_handler('fuzz.null', 'public.fuzz_null(billing.webhook_events)', 'std_in');"
    ))
    .unwrap();
}

#[test]
fn hostile_inputs_get_documented_errors_and_leave_the_ledger_consistent() {
    let started = Instant::now();
    let mut c = fresh_db(DB);
    setup(&mut c);
    let mut rng = Rng::new(20261122);
    let t0 = unix_now() as i64;
    let pools = Pools::new(&mut rng);
    // which JSON texts parse at all: a delivery whose headers do not is
    // refused by the cast, before receive_webhook runs
    let valid_json: HashSet<String> = pools
        .j
        .iter()
        .filter(|s| c.query_one("SELECT $1::text::jsonb", &[s]).is_ok())
        .cloned()
        .collect();
    let mut run = Run {
        c,
        outcomes: BTreeMap::new(),
        findings: BTreeMap::new(),
    };
    let total = CALLS + DELIVERIES;
    for n in 0..total {
        if rng.range(0, total as i64 - 1) < DELIVERIES as i64 {
            let d = delivery(&mut rng, t0);
            run.run_delivery(n, &d);
        } else {
            let call = random_call(&mut rng, &pools, &valid_json);
            run.run_call(n, &call);
        }
    }
    let Run {
        mut c,
        outcomes,
        findings,
    } = run;
    for (k, v) in &outcomes {
        println!("{k:>55} {v}");
    }
    for (kind, (count, examples)) in &findings {
        println!("FINDING ({count}x): {kind}");
        for e in examples {
            println!("    e.g. {e}");
        }
    }
    c.query_one("SELECT 1", &[]).expect("the backend is alive");

    // no delivery that changed nothing kept more than a sample
    let oversized: Vec<(i64, String, i32)> = c
        .query(
            "SELECT id, status, octet_length(body) FROM billing.webhook_events
             WHERE status IN ('rejected', 'duplicate') AND octet_length(body) > $1 ORDER BY id",
            &[&SAMPLE_BYTES],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let by_status: Vec<(String, i64, i32, i32)> = c
        .query(
            "SELECT status, count(*), max(octet_length(body)), max(octet_length(headers::text))
             FROM billing.webhook_events GROUP BY status ORDER BY status",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    println!("inbox now (status, rows, largest body, largest headers): {by_status:?}");
    let credited: i64 = c
        .query_one(
            "SELECT count(*) FROM billing.grants WHERE key LIKE 'stripe:%'",
            &[],
        )
        .unwrap()
        .get(0);
    println!(
        "{credited} Stripe payments credited; {} kinds of finding; {:.1} s",
        findings.len(),
        started.elapsed().as_secs_f64()
    );

    assert!(
        !by_status.iter().any(|(s, ..)| s == "received"),
        "no delivery is left undecided"
    );
    assert_eq!(ledger_problems(&mut c), Vec::<String>::new());

    // the run reached what it means to test
    let seen = |prefix: &str| {
        outcomes
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| *v)
            .sum::<u32>()
    };
    assert!(
        outcomes.keys().any(|k| k.ends_with(":ok")),
        "some calls must succeed"
    );
    assert!(
        outcomes.keys().filter(|k| !k.ends_with(":ok")).count() > 10,
        "many kinds of rejection"
    );
    for f in FUNCTIONS {
        assert!(seen(&format!("{f}:")) > 0, "{f} was called");
        if !NO_REQUIRED_ARGUMENT.contains(f) {
            assert!(
                seen(&format!("{f}:22004")) > 0,
                "{f} refuses a NULL argument with 22004"
            );
        }
    }
    for kind in ["stripe", "standard", "generic"] {
        assert!(
            seen(&format!("deliver {kind} signed:applied")) > 0,
            "validly signed {kind} deliveries apply"
        );
        assert!(
            seen(&format!("deliver {kind} unsigned:rejected")) > 0,
            "badly signed {kind} deliveries are rejected"
        );
    }
    for status in ["duplicate", "failed", "superseded"] {
        assert!(
            seen(&format!("deliver stripe signed:{status}")) > 0,
            "some signed Stripe deliveries end {status}"
        );
    }
    assert!(credited > 0, "some Stripe payments credit an account");

    // last, so that a run with findings has checked everything else
    assert!(
        findings.is_empty(),
        "findings (see FINDING lines above): {:?}",
        findings.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        oversized,
        Vec::<(i64, String, i32)>::new(),
        "rejected and duplicate deliveries keep at most {SAMPLE_BYTES} bytes of body"
    );
}
