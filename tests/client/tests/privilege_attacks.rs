//! README, "Tenants and roles" attacked over real connections as real login roles: code an
//! application registers runs with its owner's rights only; no view leaks
//! another tenant's rows to a leaky function; roles are kept by OID; a
//! session whose role was dropped gets a clear error, not a crashed backend;
//! no role can stall the webhook intake by holding a lock.

use std::str::FromStr;
use std::sync::{Arc, Mutex};

use pg_billing_client_tests::{attempt, dsn, fresh_db, stripe_headers, unix_now};
use postgres::{Client, Config, NoTls};

const DB: &str = "pgb_privilege_attacks";
const SECRET_A: &str = "whsec_tenant_a";
const SECRET_B: &str = "whsec_tenant_b_must_not_leak";

fn login(role: &str, tenant: &str) -> Client {
    pg_billing_client_tests::login(DB, role, tenant)
}

/// Deliver an event of `kind` to tenant a's endpoint: (status, reason or error, result).
fn deliver(c: &mut Client, id: &str, kind: &str, extra: &str) -> (String, String, String) {
    let body = format!(
        r#"{{"id":"{id}","object":"event","type":"{kind}","created":{},"data":{{"object":{{"id":"obj_{id}"{extra}}}}}}}"#,
        unix_now()
    );
    let row = c
        .query_one(
            "SELECT status, coalesce(reason, ''), coalesce(result::text, '') \
             FROM billing.receive_webhook('hooks', $1::text::jsonb, $2)",
            &[&stripe_headers(&body, SECRET_A), &body],
        )
        .unwrap_or_else(|e| panic!("deliver {id}: {e}"));
    (row.get(0), row.get(1), row.get(2))
}

fn setup(admin: &mut Client) {
    admin
        .batch_execute(
            "DO $$ DECLARE r text; BEGIN
               FOREACH r IN ARRAY ARRAY['pgb_hook_app', 'pgb_hook_admin', 'pgb_b_app', 'pgb_gone', 'pgb_other'] LOOP
                 IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
                   EXECUTE format('DROP OWNED BY %I CASCADE', r); EXECUTE format('DROP ROLE %I', r);
                 END IF;
               END LOOP; END $$;
             CREATE ROLE pgb_hook_app LOGIN; CREATE ROLE pgb_hook_admin LOGIN; CREATE ROLE pgb_b_app LOGIN;
             GRANT billing_app TO pgb_hook_app, pgb_b_app; GRANT billing_admin TO pgb_hook_admin;
             SELECT billing.grant_tenant('a', 'pgb_hook_app'); SELECT billing.grant_tenant('b', 'pgb_b_app');
             CREATE SCHEMA app AUTHORIZATION pgb_hook_app;
             CREATE SCHEMA admin_code AUTHORIZATION pgb_hook_admin;
             SET billing.tenant = 'b';
             SELECT billing.define_webhook_endpoint('b_hooks', 'stripe', 'whsec_tenant_b_must_not_leak');
             SELECT * FROM billing.grant('b_secret_account', 'usd_cents', 777, key => 'b_secret_key');
             SET billing.tenant = 'a';
             SELECT billing.define_webhook_endpoint('hooks', 'stripe', 'whsec_tenant_a');",
        )
        .unwrap();
}

/// An application's handler, as README's recipe writes it, owned by the
/// application's role; some of its event types try to escalate.
const APP_HANDLER: &str = r#"
CREATE FUNCTION app.on_event(ev billing.webhook_events) RETURNS jsonb LANGUAGE plpgsql AS $f$
BEGIN
  CASE ev.event_type
    WHEN 'attack.superuser' THEN ALTER ROLE pgb_hook_app SUPERUSER;
    WHEN 'attack.create_role' THEN CREATE ROLE pgb_planted SUPERUSER;
    WHEN 'attack.set_role' THEN SET ROLE postgres;
    WHEN 'attack.secrets' THEN RETURN (SELECT jsonb_agg(secret) FROM billing.webhook_endpoints);
    WHEN 'attack.other_tenant_rows' THEN
      PERFORM set_config('billing.tenant', 'b', true);
      RETURN (SELECT jsonb_agg(account) FROM billing.grants);
    WHEN 'attack.other_tenant_grant' THEN
      PERFORM set_config('billing.tenant', 'b', true);
      PERFORM billing.grant('b_secret_account', 'usd_cents', 1000000);
    ELSE
      PERFORM billing.grant(ev.payload #>> '{data,object,account}', 'usd_cents', 100, key => ev.provider_event_id);
      RETURN jsonb_build_object('ran_as', current_user, 'tenant', billing.current_tenant());
  END CASE;
  RETURN '{}';
END $f$;
GRANT USAGE ON SCHEMA app TO billing_admin;
"#;

const ATTACKS: &[&str] = &[
    "attack.superuser",
    "attack.create_role",
    "attack.set_role",
    "attack.secrets",
    "attack.other_tenant_rows",
    "attack.other_tenant_grant",
];

fn is_superuser(c: &mut Client, role: &str) -> bool {
    c.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role])
        .unwrap()
        .get(0)
}

fn tenant_b(admin: &mut Client) -> String {
    admin
        .query_one(
            "SELECT (SELECT md5(string_agg(g::text, '|')) FROM billing.grants g WHERE tenant_id = 'b') || \
                    (SELECT md5(string_agg(e::text, '|')) FROM billing.webhook_endpoints e WHERE tenant_id = 'b')",
            &[],
        )
        .unwrap()
        .get(0)
}

#[test]
fn handlers_run_with_their_owners_rights_and_never_more() {
    let mut admin = fresh_db(DB);
    setup(&mut admin);
    let before_b = tenant_b(&mut admin);

    let mut app = login("pgb_hook_app", "a");
    app.batch_execute(APP_HANDLER).unwrap();
    let mut boss = login("pgb_hook_admin", "a");
    for kind in ATTACKS.iter().chain(&["payment.done"]) {
        boss.batch_execute(&format!(
            "SELECT billing.register_webhook_handler('{kind}', 'app.on_event(billing.webhook_events)')"
        ))
        .unwrap();
    }

    // The handler runs as its owner, in the endpoint's tenant, whoever delivers.
    for (who, c) in [("superuser", &mut admin), ("app", &mut app)] {
        let (status, _, result) = deliver(
            c,
            &format!("evt_ok_{who}"),
            "payment.done",
            r#","account":"acct_a""#,
        );
        assert_eq!(status, "applied", "{who}");
        let result: serde_json::Value = serde_json::from_str(&result).unwrap();
        assert_eq!(
            result["ran_as"], "pgb_hook_app",
            "{who}: not as the extension's owner"
        );
        assert_eq!(result["tenant"], "a");
    }

    // Every escalation fails inside the handler, recorded as a failed event,
    // whether the session delivering it is the application or a superuser.
    for (who, c) in [("superuser", &mut admin), ("app", &mut app)] {
        for (i, kind) in ATTACKS.iter().enumerate() {
            let (status, error, result) = deliver(c, &format!("evt_{who}_{i}"), kind, "");
            assert_eq!(
                status, "failed",
                "{who} delivering {kind}: {error} {result}"
            );
            assert!(
                error.starts_with("42501"),
                "{who} delivering {kind}: refused for lack of privilege, got {error}"
            );
            assert!(!result.contains(SECRET_B) && !error.contains(SECRET_B));
        }
    }
    assert!(!is_superuser(&mut admin, "pgb_hook_app"));
    let planted: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname = 'pgb_planted'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(planted, 0);
    assert_eq!(tenant_b(&mut admin), before_b, "tenant b unchanged");

    // A non-superuser billing_admin: a pg_temp function is refused at
    // registration; its own permanent function runs as itself, no more.
    assert_eq!(
        attempt(
            &mut boss,
            "CREATE FUNCTION pg_temp.planted(ev billing.webhook_events) RETURNS jsonb LANGUAGE sql \
             AS $$ SELECT '{}'::jsonb $$; \
             SELECT billing.register_webhook_handler('admin.attack', 'pg_temp.planted(billing.webhook_events)')"
        ),
        "22023"
    );
    boss.batch_execute(
        "CREATE FUNCTION admin_code.grab(ev billing.webhook_events) RETURNS jsonb LANGUAGE plpgsql AS $f$
         BEGIN
           IF ev.event_type = 'admin.secrets' THEN
             RETURN (SELECT jsonb_agg(secret) FROM billing.webhook_endpoints);
           END IF;
           ALTER ROLE pgb_hook_admin SUPERUSER;
           RETURN '{}';
         END $f$;
         SELECT billing.register_webhook_handler('admin.secrets', 'admin_code.grab(billing.webhook_events)');
         SELECT billing.register_webhook_handler('admin.superuser', 'admin_code.grab(billing.webhook_events)');",
    )
    .unwrap();
    for kind in ["admin.secrets", "admin.superuser"] {
        let (status, error, result) = deliver(&mut admin, &format!("evt_{kind}"), kind, "");
        assert_eq!(
            (status.as_str(), &error[..5]),
            ("failed", "42501"),
            "{kind}: {error}"
        );
        assert!(!result.contains(SECRET_B));
    }
    assert!(!is_superuser(&mut admin, "pgb_hook_admin"));
}

#[test]
fn no_view_shows_another_tenants_rows_to_a_leaky_function() {
    let mut admin = fresh_db(DB);
    setup(&mut admin);
    admin
        .batch_execute(
            "SET billing.tenant = 'b';
             SELECT * FROM billing.ingest('b_secret_account', 'usd_cents', 1, key => 'b_secret_event', cost => 5);",
        )
        .unwrap();
    let notices = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = notices.clone();
    let mut config = Config::from_str(&format!("{} dbname={DB} user=pgb_hook_app", dsn())).unwrap();
    config.notice_callback(move |n| sink.lock().unwrap().push(n.message().to_string()));
    let mut app = config.connect(NoTls).unwrap();
    // The attacker also steers the planner away from index scans, so that
    // every row of a table passes through the filter.
    app.batch_execute(
        "SET billing.tenant = 'a';
         SET enable_indexscan = off; SET enable_indexonlyscan = off; SET enable_bitmapscan = off;
         CREATE FUNCTION app.leak(text) RETURNS boolean LANGUAGE plpgsql COST 0.0000001 AS $$
         BEGIN RAISE NOTICE 'leak:%', $1; RETURN true; END $$;",
    )
    .unwrap();
    let columns: Vec<(String, String)> = admin
        .query(
            "SELECT c.table_name::text, c.column_name::text FROM information_schema.columns c \
             JOIN pg_views v ON v.schemaname = c.table_schema AND v.viewname = c.table_name \
             WHERE c.table_schema = 'billing' ORDER BY 1, 2",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let views: std::collections::BTreeSet<&str> = columns.iter().map(|(v, _)| v.as_str()).collect();
    assert!(views.len() >= 3, "{views:?}");
    for (view, column) in &columns {
        let sql = format!("SELECT count(*) FROM billing.{view} WHERE app.leak({column}::text)");
        assert_eq!(attempt(&mut app, &sql), "ok", "{sql}");
    }
    let seen = notices.lock().unwrap();
    assert!(!seen.is_empty() || columns.is_empty());
    for n in seen.iter() {
        assert!(
            !n.contains("b_hooks") && !n.contains("b_secret") && !n.contains(SECRET_B),
            "a view showed tenant b's row to a leaky function: {n}"
        );
    }
}

#[test]
fn roles_are_kept_by_oid_and_a_dropped_roles_session_gets_a_clear_error() {
    let mut admin = fresh_db(DB);
    setup(&mut admin);
    admin
        .batch_execute(
            "CREATE ROLE pgb_gone LOGIN; CREATE ROLE pgb_other LOGIN;
             GRANT billing_app TO pgb_gone, pgb_other;
             SELECT billing.grant_tenant('g', 'pgb_gone'); SELECT billing.grant_tenant('g2', 'pgb_other');
             SET billing.tenant = 'g'; SELECT billing.define_unit('usd_cents');
             SET billing.tenant = 'g2'; SELECT billing.define_unit('usd_cents');",
        )
        .unwrap();
    let mut gone = login("pgb_gone", "g");
    assert_eq!(
        attempt(&mut gone, "SELECT * FROM billing.check('x', 'usd_cents')"),
        "ok"
    );
    admin
        .batch_execute("REVOKE billing_app FROM pgb_gone; DROP ROLE pgb_gone")
        .unwrap();

    // Its session is still connected: every billing call is refused, clearly,
    // directly (it lost the schema with its role) and through an
    // application's SECURITY DEFINER function, which keeps the session's role
    // as the one billing authorizes — for its own tenant and for one nobody
    // was granted (where looking up the role's name to report it found none,
    // and the backend crashed).
    admin
        .batch_execute(
            "CREATE FUNCTION public.app_check() RETURNS text LANGUAGE sql SECURITY DEFINER AS $$
               SELECT billing.current_tenant() || (SELECT available FROM billing.check('x', 'usd_cents'))::text $$;
             ALTER FUNCTION public.app_check() OWNER TO pgb_other;",
        )
        .unwrap();
    for sql in [
        "SELECT * FROM billing.check('x', 'usd_cents')",
        "SELECT * FROM billing.grant('x', 'usd_cents', 5)",
        "SELECT public.app_check()",
        "SET billing.tenant = 'nobody'; SELECT public.app_check()",
    ] {
        let state = attempt(&mut gone, sql);
        assert!(
            state == "42501" || state == "42704",
            "{sql}: the dropped role's session got {state}"
        );
    }
    // Other roles are not affected by the dangling grant.
    let mut other = login("pgb_other", "g2");
    assert_eq!(
        attempt(&mut other, "SELECT * FROM billing.check('x', 'usd_cents')"),
        "ok"
    );
    // A new role under the dropped name inherits nothing.
    admin
        .batch_execute("CREATE ROLE pgb_gone LOGIN; GRANT billing_app TO pgb_gone")
        .unwrap();
    let mut impostor = login("pgb_gone", "g");
    assert_eq!(
        attempt(
            &mut impostor,
            "SELECT * FROM billing.check('x', 'usd_cents')"
        ),
        "42501"
    );
    // and the next change of tenant grants forgets the dropped role
    admin
        .batch_execute("SELECT billing.grant_tenant('g3', 'pgb_other')")
        .unwrap();
    let dangling: i64 = admin
        .query_one(
            "SELECT count(*) FROM billing.tenant_roles WHERE tenant_id = 'g'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(dangling, 0);
    admin
        .batch_execute("DROP FUNCTION public.app_check(); DROP ROLE pgb_gone")
        .unwrap();
}

#[test]
fn no_lock_another_role_can_take_stalls_the_webhook_intake() {
    let mut admin = fresh_db(DB);
    setup(&mut admin);
    let endpoint: i64 = admin
        .query_one(
            "SELECT id FROM billing.webhook_endpoints WHERE name = 'hooks'",
            &[],
        )
        .unwrap()
        .get(0);
    // Another tenant's role holds every lock it can think of.
    let mut attacker = login("pgb_b_app", "b");
    attacker
        .batch_execute(&format!(
            "SELECT pg_advisory_lock(hashtextextended('billing.webhook:{endpoint}:evt_lock', 0));
             SELECT pg_advisory_lock(hashtextextended('billing.webhook-object:{endpoint}:pi_lock', 0));
             SELECT pg_advisory_lock(hashtextextended('billing.stripe-payment:{endpoint}:pi_lock', 0));
             BEGIN;
             LOCK TABLE billing.webhook_events, billing.webhook_objects, billing.grants, billing.pools IN ACCESS SHARE MODE;"
        ))
        .unwrap();
    for sql in [
        "SELECT * FROM billing.webhook_objects FOR UPDATE",
        "SELECT * FROM billing.webhook_objects FOR KEY SHARE",
        "LOCK TABLE billing.webhook_objects IN ROW EXCLUSIVE MODE",
    ] {
        attacker.batch_execute("SAVEPOINT s").unwrap();
        assert_eq!(attempt(&mut attacker, sql), "42501", "{sql}");
        attacker.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    }
    let mut app = login("pgb_hook_app", "a");
    app.batch_execute("SET lock_timeout = '2s'").unwrap();
    let body = format!(
        r#"{{"id":"evt_lock","object":"event","type":"payment_intent.succeeded","created":{},"data":{{"object":{{"id":"pi_lock","object":"payment_intent","amount_received":500,"currency":"usd","metadata":{{"account":"acct_lock"}}}}}}}}"#,
        unix_now()
    );
    let status: String = app
        .query_one(
            "SELECT status FROM billing.receive_webhook('hooks', $1::text::jsonb, $2)",
            &[&stripe_headers(&body, SECRET_A), &body],
        )
        .unwrap_or_else(|e| panic!("the intake was stalled: {e}"))
        .get(0);
    assert_eq!(status, "applied");
    let available: i64 = app
        .query_one(
            "SELECT available FROM billing.check('acct_lock', 'usd_cents')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(available, 500);
    attacker.batch_execute("ROLLBACK").unwrap();
}

/// `check` runs as its caller (it is the one billing function that is not
/// SECURITY DEFINER, for speed); what it answers with SQL runs as the
/// extension's owner with the pinned search path. A caller that puts its own
/// `=` for text before the catalog's must not get it called, whichever way the
/// gate answers: from the pool row alone, a refusal that looks up why, a pool
/// not made yet, or a meter to vet.
#[test]
fn the_gate_never_runs_the_callers_operators_with_the_owners_rights() {
    let mut admin = fresh_db(DB);
    setup(&mut admin);
    admin
        .batch_execute(
            "SELECT * FROM billing.grant('acct_a', 'usd_cents', 500, key => 'gate_a');
             SELECT billing.define_meter('calls', 'usd_cents', unit_price => 1);",
        )
        .unwrap();
    let mut app = login("pgb_hook_app", "a");
    app.batch_execute(
        "CREATE TABLE app.ran (who text);
         CREATE FUNCTION app.eq_evil(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $f$
         BEGIN
           INSERT INTO app.ran VALUES (current_user);
           IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
             ALTER ROLE pgb_hook_app SUPERUSER;
           END IF;
           RETURN a OPERATOR(pg_catalog.=) b;
         END $f$;
         CREATE OPERATOR app.= (LEFTARG = text, RIGHTARG = text, FUNCTION = app.eq_evil);
         SET search_path = app, pg_catalog;",
    )
    .unwrap();
    // the hijack is live for the caller's own SQL
    let own: bool = app
        .query_one("SELECT 'x'::text = 'x'::text", &[])
        .unwrap()
        .get(0);
    assert!(own);
    app.batch_execute("TRUNCATE app.ran").unwrap();

    let gate = |c: &mut Client, sql: &str| -> (bool, i64, String) {
        let row = c
            .query_one(sql, &[])
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        (row.get(0), row.get(1), row.get(2))
    };
    let cases = [
        ("SELECT allowed, available, reason FROM billing.check('acct_a', 'usd_cents', 100)", (true, 500, "ok")),
        ("SELECT allowed, available, reason FROM billing.check('acct_a', 'usd_cents', 501)", (false, 500, "insufficient_credits")),
        ("SELECT allowed, available, reason FROM billing.check('nobody_yet', 'usd_cents', 1)", (false, 0, "insufficient_credits")),
        ("SELECT allowed, available, reason FROM billing.check('acct_a', 'usd_cents', 1, meter => 'calls')", (true, 500, "ok")),
    ];
    for (sql, (allowed, available, reason)) in cases {
        assert_eq!(
            gate(&mut app, sql),
            (allowed, available, reason.to_string()),
            "{sql}"
        );
    }
    assert_eq!(
        attempt(
            &mut app,
            "SELECT billing.check('acct_a', 'no_such_unit', 1)"
        ),
        "42704"
    );
    let ran: i64 = app
        .query_one("SELECT count(*) FROM app.ran", &[])
        .unwrap()
        .get(0);
    assert_eq!(ran, 0, "the caller's operator ran inside the gate");
    assert!(!is_superuser(&mut admin, "pgb_hook_app"));
    // and the caller's own setting is what it was after the call
    let path: String = app.query_one("SHOW search_path", &[]).unwrap().get(0);
    assert_eq!(path, "app, pg_catalog");
}
