//! README, "Webhooks": replays and concurrent duplicate deliveries apply once. Eight real
//! sessions deliver the same 200 signed Stripe events (100 payments, each
//! reported by two event types) at once, each in its own order.

use pg_billing_client_tests::{
    connect, fresh_db, ledger_problems, run_sessions, stripe_headers, Rng,
};
use std::collections::HashMap;
use std::sync::Barrier;

const DB: &str = "pgb_webhook_deliveries";
const SECRET: &str = "whsec_client_test";
const PAYMENTS: usize = 100;
const SESSIONS: usize = 8;

fn amount(i: usize) -> i64 {
    (i as i64 + 1) * 10
}

/// The two events reporting payment i: (event id, body).
fn events() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in 0..PAYMENTS {
        let a = amount(i);
        out.push((
            format!("evt_pi_{i}"),
            format!(
                r#"{{"id":"evt_pi_{i}","type":"payment_intent.succeeded","created":1700000000,"data":{{"object":{{"id":"pi_{i}","amount_received":{a},"currency":"usd","metadata":{{"account":"org_1"}}}}}}}}"#
            ),
        ));
        out.push((
            format!("evt_cs_{i}"),
            format!(
                r#"{{"id":"evt_cs_{i}","type":"checkout.session.completed","created":1700000000,"data":{{"object":{{"id":"cs_{i}","payment_intent":"pi_{i}","payment_status":"paid","amount_total":{a},"currency":"usd","client_reference_id":"org_1"}}}}}}"#
            ),
        ));
    }
    out
}

fn session(id: usize, start: &Barrier) -> Vec<(String, String)> {
    let mut c = connect(DB);
    let mut evs = events();
    Rng::new(id as u64 + 7).shuffle(&mut evs);
    start.wait();
    evs.into_iter()
        .map(|(evt, body)| {
            let headers = stripe_headers(&body, SECRET);
            let row = c
                .query_one(
                    "SELECT status FROM billing.receive_webhook('stripe', $1::text::jsonb, $2)",
                    &[&headers, &body],
                )
                .unwrap_or_else(|e| panic!("deliver {evt}: {e}"));
            (evt, row.get::<_, String>(0))
        })
        .collect()
}

#[test]
fn concurrent_duplicate_deliveries_apply_once() {
    let mut c = fresh_db(DB);
    c.batch_execute(&format!(
        "SELECT billing.define_webhook_endpoint('stripe', 'stripe', '{SECRET}')"
    ))
    .unwrap();
    let results = run_sessions(SESSIONS, session);
    let mut statuses: HashMap<String, Vec<String>> = HashMap::new();
    for result in results {
        for (evt, status) in result {
            statuses.entry(evt).or_default().push(status);
        }
    }
    assert_eq!(statuses.len(), 2 * PAYMENTS);
    for (evt, s) in &statuses {
        let applied = s.iter().filter(|x| *x == "applied").count();
        let duplicate = s.iter().filter(|x| *x == "duplicate").count();
        assert_eq!((applied, duplicate), (1, SESSIONS - 1), "{evt}: {s:?}");
    }
    let credited: i64 = c
        .query_one(
            "SELECT balance FROM billing.check('org_1', 'usd_cents')",
            &[],
        )
        .unwrap()
        .get(0);
    let paid: i64 = (0..PAYMENTS).map(amount).sum();
    assert_eq!(credited, paid, "each payment credited exactly once");
    let grants: i64 = c
        .query_one("SELECT count(*) FROM billing.grants", &[])
        .unwrap()
        .get(0);
    assert_eq!(grants, PAYMENTS as i64);
    assert_eq!(ledger_problems(&mut c), Vec::<String>::new());
}
