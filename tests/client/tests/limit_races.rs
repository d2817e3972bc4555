//! A limit under real concurrency: 32 sessions spending strictly against a
//! daily cap (and per-member caps) of a well-funded pool never pass it
//! together; what was accepted is exactly what the limit counted.

use pg_billing_client_tests::{connect, fresh_db, ledger_problems, run_sessions, sqlstate};

const DB: &str = "pgb_limit_races";
const SESSIONS: usize = 32;
const TRIES: usize = 20;

#[test]
fn concurrent_strict_spending_never_passes_a_limit() {
    let mut admin = fresh_db(DB);
    admin
        .batch_execute(
            "SELECT billing.grant('org', 'usd_mills', 1000000, kind => 'topup');
             SELECT billing.set_limit('org', 'usd_mills', 'daily', 500);
             SELECT billing.set_limit('org', 'usd_mills', 'per_user', 80, per_member => true);",
        )
        .unwrap();
    let accepted = run_sessions(SESSIONS, |i, start| {
        let mut c = connect(DB);
        start.wait();
        let mut mine: Vec<(String, i64)> = Vec::new();
        for n in 0..TRIES {
            let cost = 1 + ((i * 7 + n * 3) % 9) as i64;
            let member = format!("u{}", i % 8);
            match c.execute(
                "SELECT * FROM billing.ingest('org', 'usd_mills', 1, key => $1, cost => $2, strict => true, \
                 properties => jsonb_build_object('member', $3::text))",
                &[&format!("s{i}:{n}"), &cost, &member],
            ) {
                Ok(_) => mine.push((member, cost)),
                Err(e) => assert_eq!(sqlstate(&e).as_deref(), Some("23514"), "{e}"),
            }
        }
        mine
    });
    let all: Vec<(String, i64)> = accepted.into_iter().flatten().collect();
    let total: i64 = all.iter().map(|(_, c)| c).sum();
    assert!(total <= 500, "the daily cap held: {total}");
    for m in 0..8 {
        let member = format!("u{m}");
        let used: i64 = all
            .iter()
            .filter(|(u, _)| *u == member)
            .map(|(_, c)| c)
            .sum();
        assert!(used <= 80, "{member} stayed within 80: {used}");
    }
    let counted: Vec<(String, i64)> = admin
        .query(
            "SELECT coalesce(member, '-'), used FROM billing.limits_status('org', 'usd_mills') \
             UNION ALL SELECT member, used FROM billing.limit_usage WHERE member <> '' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        counted[0],
        ("-".to_string(), total),
        "the cap counted what was accepted"
    );
    for (member, used) in &counted[1..] {
        let accepted: i64 = all
            .iter()
            .filter(|(u, _)| u == member)
            .map(|(_, c)| c)
            .sum();
        assert_eq!(*used, accepted, "{member}");
    }
    assert!(total > 400, "the sessions pushed against the caps: {total}");
    assert!(ledger_problems(&mut admin).is_empty());
}

#[test]
fn concurrent_reservations_never_pass_a_limit_together() {
    let mut admin = fresh_db("pgb_limit_hold_races");
    admin
        .batch_execute(
            "SELECT billing.grant('org', 'usd_mills', 1000000, kind => 'topup');
             SELECT billing.set_limit('org', 'usd_mills', 'daily', 500);",
        )
        .unwrap();
    let outcomes = run_sessions(SESSIONS, |_, start| {
        let mut c = pg_billing_client_tests::connect("pgb_limit_hold_races");
        start.wait();
        match c.query_one(
            "SELECT hold_id FROM billing.reserve('org', 'usd_mills', 100)",
            &[],
        ) {
            Ok(_) => "open".to_string(),
            Err(e) => sqlstate(&e).unwrap_or_else(|| panic!("{e}")),
        }
    });
    let open = outcomes.iter().filter(|o| *o == "open").count();
    assert_eq!(open, 5, "500 of reservations at most: {outcomes:?}");
    assert!(outcomes.iter().all(|o| o == "open" || o == "23514"));
    let used: i64 = admin
        .query_one(
            "SELECT used FROM billing.limits_status('org', 'usd_mills')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(used, 500);
    assert!(ledger_problems(&mut admin).is_empty());
}
