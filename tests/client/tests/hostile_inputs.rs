//! DESIGN §5: random and hostile inputs — huge, empty, unicode, SQL-looking,
//! boundary integers, odd numerics, timestamps and JSON — thrown at every
//! public function. Each call succeeds or fails with a documented SQLSTATE;
//! the backend never crashes; the ledger invariants hold afterwards.

use pg_billing_client_tests::{fresh_db, ledger_problems, sqlstate, Rng};

const DB: &str = "pgb_hostile_inputs";
const CALLS: usize = 4000;

/// pg_billing's own codes (README "Errors") and PostgreSQL's for arguments
/// that do not even parse as their declared type.
const DOCUMENTED: &[&str] = &[
    "22023", "22003", "42704", "23505", "23514", "55000", "42501", // pg_billing
    "22P02", "22007", "22008", "22009", "22P05", "54000",
    "2201B", // PostgreSQL input syntax / range
];

fn pick<'a>(rng: &mut Rng, xs: &'a [String]) -> &'a str {
    &xs[(rng.next_u64() % xs.len() as u64) as usize]
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
        "x".repeat(63).as_str(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("k".repeat(255));
    v.push("k".repeat(256));
    v.push("x".repeat(64));
    v.push("z".repeat(100_000));
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
    [
        "0",
        "1",
        "-1",
        "2",
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
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn numerics() -> Vec<String> {
    [
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
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn timestamps() -> Vec<String> {
    [
        "infinity",
        "-infinity",
        "1970-01-01",
        "2000-01-01 00:00:00+00",
        "294276-12-31",
        "now",
        "tomorrow",
        "yesterday",
        "2026-13-45",
        "not a date",
        "",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn jsons(rng: &mut Rng) -> Vec<String> {
    let mut v: Vec<String> = [
        "{}",
        "[]",
        "null",
        "\"s\"",
        "1",
        "{\"a\":",
        "{\"a\":1}",
        "[{}]",
        "{\"\\u0000\":1}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
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
    [
        "0",
        "-1 day",
        "1 microsecond",
        "15 minutes",
        "1000 years",
        "1 month",
        "31 days",
        "junk",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn hostile_inputs_get_documented_errors_and_leave_the_ledger_consistent() {
    let mut c = fresh_db(DB);
    c.batch_execute(
        "SELECT billing.define_unit('usd'); SELECT * FROM billing.grant('org_1', 'usd', 1000000);
         SELECT billing.define_webhook_endpoint('hooks', 'stripe', 'whsec_x');",
    )
    .unwrap();
    let mut rng = Rng::new(20261122);
    let (t, i, n, ts, j, iv) = (
        texts(&mut rng),
        ints(),
        numerics(),
        timestamps(),
        jsons(&mut rng),
        intervals(),
    );
    let mut outcomes = std::collections::BTreeMap::<String, u32>::new();
    for call in 0..CALLS {
        let which = rng.range(0, 18);
        let (args, sql): (Vec<String>, &str) = match which {
            0 => {
                (
                vec![
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &i).into(),
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &ts).into(),
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &j).into(),
                ],
                "SELECT * FROM billing.grant($1, $2, $3::text::bigint, kind => $4, expires_at => $5::text::timestamptz, key => $6, metadata => $7::text::jsonb)",
                )
            }
            1 => {
                (
                vec![
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &n).into(),
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &j).into(),
                    pick(&mut rng, &i).into(),
                ],
                "SELECT * FROM billing.ingest($1, $2, $3::text::numeric, key => $4, properties => $5::text::jsonb, cost => $6::text::bigint)",
                )
            }
            2 => {
                (
                vec![
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &n).into(),
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &i).into(),
                ],
                "SELECT * FROM billing.ingest($1, 'usd', $2::text::numeric, key => $3, cost => $4::text::bigint, strict => true)",
                )
            }
            3 => {
                (
                vec![pick(&mut rng, &j).into()],
                "SELECT * FROM billing.ingest_batch($1::text::jsonb)",
                )
            }
            4 => {
                (
                vec![
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &i).into(),
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &iv).into(),
                ],
                "SELECT * FROM billing.reserve($1, $2, $3::text::bigint, key => $4, ttl => $5::text::interval)",
                )
            }
            5 => {
                (
                vec![
                    pick(&mut rng, &i).into(),
                    pick(&mut rng, &i).into(),
                    pick(&mut rng, &t).into(),
                ],
                "SELECT * FROM billing.settle($1::text::bigint, $2::text::bigint, $3)",
                )
            }
            6 => {
                (
                vec![pick(&mut rng, &i).into()],
                "SELECT * FROM billing.release($1::text::bigint)",
                )
            }
            7 => {
                (
                vec![pick(&mut rng, &i).into()],
                "SELECT * FROM billing.void_grant($1::text::bigint)",
                )
            }
            8 => {
                (
                vec![pick(&mut rng, &i).into()],
                "SELECT * FROM billing.revoke_unused($1::text::bigint)",
                )
            }
            9 => {
                (
                vec![pick(&mut rng, &i).into(), pick(&mut rng, &i).into()],
                "SELECT * FROM billing.reverse_grant($1::text::bigint, $2::text::bigint)",
                )
            }
            10 => {
                (
                vec![
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &i).into(),
                ],
                "SELECT * FROM billing.check($1, $2, $3::text::bigint)",
                )
            }
            11 => {
                (
                vec![
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &ts).into(),
                ],
                "SELECT * FROM billing.balance($1, $2, $3::text::timestamptz)",
                )
            }
            12 => {
                (
                vec![
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &j).into(),
                ],
                "SELECT * FROM billing.account($1, $2, $3::text::jsonb)",
                )
            }
            13 => {
                (
                vec![
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &n).into(),
                ],
                "SELECT billing.define_meter($1, $2, $3::text::numeric)",
                )
            }
            14 => {
                (
                vec![
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &i).into(),
                ],
                "SELECT billing.set_floor($1, $2, $3::text::bigint)",
                )
            }
            15 => {
                (
                vec![
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &j).into(),
                    pick(&mut rng, &t).into(),
                ],
                "SELECT * FROM billing.receive_webhook($1, $2::text::jsonb, $3)",
                )
            }
            16 => {
                (
                vec![
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &t).into(),
                    pick(&mut rng, &j).into(),
                    pick(&mut rng, &t).into(),
                ],
                "SELECT * FROM billing.verify_webhook($1, $2, $3::text::jsonb, $4)",
                )
            }
            17 => {
                (
                vec![pick(&mut rng, &t).into()],
                "SELECT set_config('billing.tenant', $1, false), billing.current_tenant()",
                )
            }
            _ => {
                (
                vec![pick(&mut rng, &t).into()],
                "SELECT billing.define_unit($1)",
                )
            }
        };
        let params: Vec<&(dyn postgres::types::ToSql + Sync)> = args
            .iter()
            .map(|a| a as &(dyn postgres::types::ToSql + Sync))
            .collect();
        let outcome = match c.query(sql, &params) {
            Ok(_) => "ok".to_string(),
            Err(e) => match sqlstate(&e) {
                Some(code) if DOCUMENTED.contains(&code.as_str()) => code,
                Some(code) => {
                    panic!("call {call}: {sql} with {args:?} failed with undocumented {code}: {e}")
                }
                None => panic!(
                    "call {call}: {sql} with {args:?}: connection lost (backend crash?): {e}"
                ),
            },
        };
        *outcomes.entry(format!("{which}:{outcome}")).or_insert(0) += 1;
        if which == 17 {
            c.batch_execute("RESET billing.tenant").unwrap();
        }
    }
    println!("{outcomes:?}");
    assert!(
        outcomes.keys().any(|k| k.ends_with(":ok")),
        "some calls must succeed"
    );
    assert!(
        outcomes.keys().filter(|k| !k.ends_with(":ok")).count() > 10,
        "many kinds of rejection"
    );
    c.query_one("SELECT 1", &[]).expect("the backend is alive");
    assert_eq!(ledger_problems(&mut c), Vec::<String>::new());
}
