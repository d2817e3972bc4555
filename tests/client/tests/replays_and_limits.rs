//! docs/architecture.md, rule 2; README, "Tenants and roles" over real connections and real time: a replay returns
//! its original outcome forever, even after a time-relative rule would refuse
//! its arguments; a batch's memory stays a small multiple of its size.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use pg_billing_client_tests::{connect, fresh_db, sqlstate};
use postgres::Client;

const DB: &str = "pgb_replays_and_limits";

fn status(c: &mut Client, sql: &str, ts: &str) -> String {
    match c.query_one(sql, &[&ts]) {
        Ok(row) => row.get(0),
        Err(e) => sqlstate(&e).unwrap_or_else(|| panic!("{sql}: {e}")),
    }
}

#[test]
fn a_replay_is_answered_after_its_time_rules_would_refuse_it() {
    let mut c = fresh_db(DB);
    c.batch_execute("SELECT billing.define_unit('usd_cents')")
        .unwrap();
    // a grant expiring in a moment, and an event at the edge of its meter's
    // 48-hour lateness window
    let soon: String = c
        .query_one("SELECT (now() + interval '1500 milliseconds')::text", &[])
        .unwrap()
        .get(0);
    let edge: String = c
        .query_one(
            "SELECT (now() - interval '48 hours' + interval '1500 milliseconds')::text",
            &[],
        )
        .unwrap()
        .get(0);
    let grant = "SELECT status FROM billing.grant('a', 'usd_cents', 10, key => 'g1', expires_at => $1::text::timestamptz)";
    let ingest = "SELECT status FROM billing.ingest('a', 'usd_cents', 1, key => 'e1', cost => 1, occurred_at => $1::text::timestamptz)";
    let batch = r#"SELECT status FROM billing.ingest_batch(jsonb_build_array(jsonb_build_object(
                     'account', 'a', 'meter', 'usd_cents', 'quantity', 1, 'key', 'e1', 'cost', 1, 'occurred_at', $1::text)))"#;
    assert_eq!(status(&mut c, grant, &soon), "applied");
    assert_eq!(status(&mut c, ingest, &edge), "applied");
    thread::sleep(Duration::from_millis(2000));
    assert_eq!(
        status(&mut c, grant, &soon),
        "duplicate",
        "the grant's expiry has passed"
    );
    assert_eq!(
        status(&mut c, ingest, &edge),
        "duplicate",
        "the event is now more than 48 hours late"
    );
    assert_eq!(status(&mut c, batch, &edge), "duplicate", "in a batch too");
    // a new call with the same arguments is still refused
    assert_eq!(
        status(
            &mut c,
            "SELECT status FROM billing.grant('a', 'usd_cents', 10, key => 'g2', expires_at => $1::text::timestamptz)",
            &soon
        ),
        "22023"
    );
    assert_eq!(
        status(
            &mut c,
            "SELECT status FROM billing.ingest('a', 'usd_cents', 1, key => 'e2', cost => 1, occurred_at => $1::text::timestamptz)",
            &edge
        ),
        "22023"
    );
}

/// Anonymous memory (palloc'd and Rust-allocated) of a backend, in bytes.
fn rss_anon(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .expect("RssAnon");
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// Run `sql` with `arg` on a fresh connection; (SQLSTATE or "ok", peak growth
/// of the backend's anonymous memory while it ran).
fn peak_growth(sql: &str, arg: &str) -> (String, u64) {
    let mut c = connect(DB);
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    c.batch_execute("SELECT billing.current_tenant()").unwrap();
    let base = rss_anon(pid);
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        thread::spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(rss_anon(pid));
                thread::sleep(Duration::from_millis(2));
            }
            peak
        })
    };
    let outcome = match c.query(sql, &[&arg]) {
        Ok(_) => "ok".to_string(),
        Err(e) => sqlstate(&e).unwrap_or_else(|| panic!("{e}")),
    };
    done.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap().max(rss_anon(pid));
    (outcome, peak.saturating_sub(base))
}

fn batch(events: usize, prefix: &str) -> String {
    let props = format!(r#"{{"model":"gpt-x","member":"user_{}"}}"#, "m".repeat(120));
    let items: Vec<String> = (0..events)
        .map(|i| {
            format!(
                r#"{{"account":"acct_{}","meter":"usd_cents","quantity":{},"key":"{prefix}{i}","cost":{},"properties":{props}}}"#,
                i % 500,
                i % 9 + 1,
                i % 7
            )
        })
        .collect();
    format!("[{}]", items.join(","))
}

#[test]
fn a_batch_uses_a_small_multiple_of_its_size_and_a_huge_one_is_refused() {
    let mut c = fresh_db(DB);
    c.batch_execute("SELECT billing.define_unit('usd_cents')")
        .unwrap();
    let json = batch(50_000, "k");
    let size = json.len() as u64;
    assert!(size > 10_000_000 && size < 16 * 1024 * 1024, "{size}");
    // PostgreSQL's own parse of the argument comes first, and is the yardstick
    let (_, parse) = peak_growth("SELECT jsonb_array_length($1::text::jsonb)", &json);
    let (outcome, growth) = peak_growth(
        "SELECT count(*) FROM billing.ingest_batch($1::text::jsonb)",
        &json,
    );
    assert_eq!(outcome, "ok");
    eprintln!(
        "batch of {size} bytes: PostgreSQL parses it in {parse} bytes; the whole ingest peaks at {growth} ({:.2}x)",
        growth as f64 / parse as f64
    );
    assert!(
        growth < parse * 3 / 2,
        "a {size}-byte batch grew the backend by {growth} bytes, parsing it alone by {parse}"
    );
    let events: i64 = c
        .query_one("SELECT count(*) FROM billing.usage_events", &[])
        .unwrap()
        .get(0);
    assert_eq!(events, 50_000);

    // beyond the documented limit: refused before it is read into events
    let huge = batch(70_000, "h");
    assert!(huge.len() > 16 * 1024 * 1024);
    let (_, parse) = peak_growth("SELECT jsonb_array_length($1::text::jsonb)", &huge);
    let (outcome, growth) = peak_growth(
        "SELECT count(*) FROM billing.ingest_batch($1::text::jsonb)",
        &huge,
    );
    assert_eq!(outcome, "22023");
    assert!(
        growth < parse * 11 / 10,
        "a refused batch grew the backend by {growth} bytes, parsing it alone by {parse}"
    );
}
