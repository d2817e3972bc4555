// Plans and subscriptions (docs/architecture.md, "Plans and subscriptions"):
// the catalogue's versions, the projection of Stripe's subscription object
// (by poll and by webhook), and the plan credit each period opens, holds
// back, raises and ends. Subscriptions are Stripe's own example object with
// the fields a test is about set.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;
    use serde_json::{json, Value};

    use crate::pgrx_tests::stripe::*;
    use crate::pgrx_tests::support::*;

    const DAY: i64 = 86_400;
    const BASIC: &str = r#"[{"price_id": "price_basic_m", "interval": "month", "amount": 2000},
                            {"price_id": "price_basic_y", "interval": "year", "amount": 20000}]"#;

    fn plans() {
        run("SELECT * FROM billing.define_unit('credits')");
        define("basic", r#"{"credits": {"amount": 1000}}"#, BASIC);
        define(
            "pro",
            r#"{"credits": {"amount": 2000}}"#,
            r#"[{"price_id": "price_pro_m", "interval": "month", "amount": 5000}]"#,
        );
        define(
            "team",
            r#"{"credits": {"amount": 100, "per_seat": true}}"#,
            r#"[{"price_id": "price_team_m", "interval": "month", "amount": 1000}]"#,
        );
    }

    /// "status:version" of defining `key`.
    fn define(key: &str, allowances: &str, prices: &str) -> String {
        Spi::get_one_with_args::<String>(
            "SELECT status || ':' || version FROM billing.define_plan($1, $2::jsonb, $3::jsonb)",
            &[key.into(), allowances.into(), prices.into()],
        )
        .expect("define_plan")
        .expect("a row")
    }

    /// What it did to plan credit, as `credit` formats it.
    const CREDIT: &str =
        "concat_ws('/', credit_granted, credit_suspended, credit_resumed, credit_revoked)";

    /// "outcome|status|credit" of applying `s` as observed now.
    fn sync(s: &Value) -> String {
        Spi::get_one_with_args::<String>(
            &format!("SELECT concat_ws('|', outcome, status, {CREDIT}) FROM billing.sync_subscription($1::jsonb)"),
            &[s.to_string().into()],
        )
        .expect("sync_subscription")
        .expect("a row")
    }

    fn sync_sql(s: &Value) -> String {
        format!(
            "SELECT * FROM billing.sync_subscription('{}'::jsonb)",
            s.to_string().replace('\'', "''")
        )
    }

    /// "outcome|credit" of applying invoice `inv` as observed now.
    fn pay(inv: &Value) -> String {
        Spi::get_one_with_args::<String>(
            &format!(
                "SELECT concat_ws('|', outcome, {CREDIT}) FROM billing.sync_invoice($1::jsonb)"
            ),
            &[inv.to_string().into()],
        )
        .expect("sync_invoice")
        .expect("a row")
    }

    /// "granted/suspended/resumed/revoked": amounts granted and revoked,
    /// grants suspended and resumed.
    fn credit(granted: i64, suspended: i64, resumed: i64, revoked: i64) -> String {
        format!("{granted}/{suspended}/{resumed}/{revoked}")
    }

    fn credits(account: &str) -> i64 {
        available(account, "credits")
    }

    /// A monthly period that started 10 days ago.
    fn month() -> (i64, i64) {
        let t = now_unix();
        (t - 10 * DAY, t + 20 * DAY)
    }

    fn with(mut s: Value, fields: Value) -> Value {
        for (k, v) in fields.as_object().unwrap() {
            s[k] = v.clone();
        }
        s
    }

    #[pg_test]
    fn plans_are_versioned_and_a_subscription_keeps_the_version_it_bought() {
        plans();
        assert_eq!(
            define("basic", r#"{"credits": {"amount": 1000}}"#, BASIC),
            "unchanged:1",
            "the same definition again is no new version"
        );
        let (start, end) = month();
        sync(&subscription(
            "sub_1",
            "org_1",
            "active",
            "price_basic_m",
            1,
            start,
            end,
        ));
        assert_eq!(credits("org_1"), 1000);
        assert_eq!(
            define("basic", r#"{"credits": {"amount": 1500}}"#, BASIC),
            "created:2"
        );
        assert_eq!(
            sync(&subscription(
                "sub_1",
                "org_1",
                "active",
                "price_basic_m",
                1,
                start,
                end
            )),
            format!("unchanged|active|{}", credit(0, 0, 0, 0)),
            "a new version changes nothing retroactively"
        );
        let version = |sub: &str| -> i32 {
            one(&format!(
                "SELECT plan_version FROM billing.subscription_status WHERE subscription = '{sub}'"
            ))
        };
        assert_eq!(version("sub_1"), 1);
        assert_eq!(credits("org_1"), 1000);
        sync(&subscription(
            "sub_2",
            "org_2",
            "active",
            "price_basic_m",
            1,
            start,
            end,
        ));
        assert_eq!(
            version("sub_2"),
            2,
            "a new subscription buys the newest version"
        );
        assert_eq!(credits("org_2"), 1500);

        run("SELECT * FROM billing.retire_plan('basic')");
        assert_rejected(
            &format!("SELECT * FROM billing.define_plan('basic', '{{\"credits\": {{\"amount\": 1}}}}', '{BASIC}')"),
            "55000",
        );
        assert_rejected(
            &sync_sql(&subscription(
                "sub_3",
                "org_3",
                "active",
                "price_basic_y",
                1,
                start,
                end + 300 * DAY,
            )),
            "55000",
        );
        assert_eq!(
            sync(&subscription(
                "sub_1",
                "org_1",
                "past_due",
                "price_basic_m",
                1,
                start,
                end
            )),
            format!("updated|past_due|{}", credit(0, 1, 0, 0)),
            "a retired plan keeps serving its subscriptions"
        );
        assert_rejected(
            r#"SELECT * FROM billing.define_plan('other', '{"credits": {"amount": 1}}', '[{"price_id": "price_pro_m", "interval": "month"}]')"#,
            "22023",
        );
        assert_rejected(
            r#"SELECT * FROM billing.define_plan('x', '{"tokens": {"amount": 1}}')"#,
            "42704",
        );
        for bad in [
            r#"{"credits": {"amount": -1}}"#,
            r#"{"credits": {"amount": 1.5}}"#,
            r#"{"credits": {"amount": 1, "per_seat": "yes"}}"#,
            r#"{"credits": 5}"#,
            r#"{}"#,
        ] {
            assert_rejected(
                &format!("SELECT * FROM billing.define_plan('x', '{bad}')"),
                "22023",
            );
        }
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_paid_period_grants_the_plan_allowance_once_expiring_at_its_end() {
        plans();
        let (start, end) = month();
        let s = subscription("sub_1", "org_1", "active", "price_basic_m", 1, start, end);
        assert_eq!(
            sync(&s),
            format!("created|active|{}", credit(1000, 0, 0, 0))
        );
        assert_eq!(sync(&s), format!("unchanged|active|{}", credit(0, 0, 0, 0)));
        let g: String = one(&format!(
            "SELECT concat_ws(',', kind, priority, amount, effective_at = to_timestamp({start}), \
                              expires_at = to_timestamp({end})) FROM billing.grants WHERE account = 'org_1'"
        ));
        assert_eq!(g, "plan,10,1000,t,t");
        let status: String = one(
            "SELECT concat_ws(',', plan, status, access, seats, allowance, allowance_left) \
             FROM billing.subscription_status",
        );
        assert_eq!(status, "basic,active,open,1,1000,1000");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn an_annual_subscription_grants_monthly_never_a_lump() {
        plans();
        let t = now_unix();
        let start = t - 40 * DAY;
        let end: i64 = one(&format!(
            "SELECT extract(epoch FROM (to_timestamp({start}) AT TIME ZONE 'UTC' + interval '1 year') \
                                       AT TIME ZONE 'UTC')::bigint"
        ));
        sync(&subscription(
            "sub_1",
            "org_1",
            "active",
            "price_basic_y",
            1,
            start,
            end,
        ));
        assert_eq!(
            credits("org_1"),
            1000,
            "only this month's allowance is spendable"
        );
        // month k runs from start + k months to start + k + 1 months (UTC)
        let slices: String = one(&format!(
            "SELECT string_agg(s::text || '-' || e::text, ',' ORDER BY s) FROM generate_series(0, 11) k, \
             LATERAL (SELECT (to_timestamp({start}) AT TIME ZONE 'UTC' + k * interval '1 month') AT TIME ZONE 'UTC' AS s, \
                             (to_timestamp({start}) AT TIME ZONE 'UTC' + (k + 1) * interval '1 month') AT TIME ZONE 'UTC' AS e) m \
             WHERE e > now()"
        ));
        let grants: String = one(
            "SELECT string_agg(effective_at::text || '-' || expires_at::text, ',' ORDER BY effective_at) \
             FROM billing.grants WHERE account = 'org_1'",
        );
        assert_eq!(
            grants, slices,
            "one grant per month still to come, each to its month's end"
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.grants WHERE account = 'org_1'"),
            11,
            "the month that already ended is not granted"
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.grant_balances WHERE state = 'pending'"),
            10
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_delinquent_subscription_holds_plan_credit_back_and_recovery_restores_the_rest() {
        plans();
        grant("org_1", "credits", 500, ", kind => 'topup'");
        let (start, end) = month();
        let s =
            |status: &str| subscription("sub_1", "org_1", status, "price_basic_m", 1, start, end);
        sync(&s("active"));
        ingest("org_1", "credits", 300, "e1");
        assert_eq!(credits("org_1"), 1200);
        assert_eq!(
            one::<String>(
                "SELECT concat_ws(',', allowance, allowance_used, allowance_left, allowance_suspended) \
                 FROM billing.subscription_status"
            ),
            "1000,300,700,0"
        );
        for status in ["past_due", "unpaid", "paused"] {
            assert_eq!(
                sync(&s(status)),
                format!("updated|{status}|{}", credit(0, 1, 0, 0))
            );
            assert_eq!(
                credits("org_1"),
                500,
                "{status}: top-ups stay spendable, the plan's do not"
            );
            let reason = |amount: i64| -> String {
                one(&format!(
                    "SELECT reason FROM billing.check('org_1', 'credits', {amount})"
                ))
            };
            assert_eq!(
                reason(501),
                format!("subscription_{status}"),
                "check says why"
            );
            assert_eq!(reason(500), "ok", "what the top-up covers is allowed");
            assert_eq!(
                one::<String>(
                    "SELECT concat_ws(',', allowance_used, allowance_left, allowance_suspended) \
                     FROM billing.subscription_status"
                ),
                "300,0,700",
                "{status}: what is held back is shown as such"
            );
            assert_rejected(
                "SELECT * FROM billing.ingest('org_1', 'credits', 1, key => 'big', cost => 501, strict => true)",
                "23514",
            );
            assert_eq!(
                sync(&s("active")),
                format!("updated|active|{}", credit(0, 0, 1, 0))
            );
            assert_eq!(
                credits("org_1"),
                1200,
                "what was used stays used, the rest is back"
            );
        }
        let paused = with(
            s("active"),
            json!({"pause_collection": {"behavior": "void", "resumes_at": null}}),
        );
        assert_eq!(
            sync(&paused),
            format!("updated|active|{}", credit(0, 1, 0, 0)),
            "active but not collecting payment: not paid for"
        );
        assert_eq!(credits("org_1"), 500);
        assert_eq!(
            one::<String>("SELECT reason FROM billing.check('org_1', 'credits', 501)"),
            "subscription_collection_paused"
        );
        run("SELECT * FROM billing.define_unit('other')");
        assert_eq!(
            one::<String>("SELECT reason FROM billing.check('org_1', 'other', 1)"),
            "insufficient_credits",
            "a unit the plan does not include is not held back by it"
        );
        assert_eq!(
            sync(&s("active")),
            format!("updated|active|{}", credit(0, 0, 1, 0))
        );
        assert_eq!(
            sync(&s("incomplete")),
            "stale|active|0/0/0/0",
            "a paid subscription never returns to incomplete"
        );
        assert_eq!(credits("org_1"), 1200);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn credit_held_back_across_the_period_end_expires_when_the_subscription_recovers() {
        plans();
        let t = now_unix();
        let first_period = |status: &str| {
            subscription(
                "sub_1",
                "org_1",
                status,
                "price_basic_m",
                1,
                t - 10 * DAY,
                t + 20 * DAY,
            )
        };
        sync(&first_period("active"));
        let first: i64 = one("SELECT id FROM billing.grants");
        sync(&first_period("past_due"));
        travel("org_1", "30 days"); // the period ended while it was held back
        assert_eq!(remaining(first), 1000, "kept while suspended");
        // recovered: the provider rolled to the next period (20 days ago, as travelled)
        let renewed = subscription(
            "sub_1",
            "org_1",
            "active",
            "price_basic_m",
            1,
            t - 10 * DAY,
            t + 20 * DAY,
        );
        let outcome = sync(&renewed);
        assert!(
            outcome.starts_with("unchanged|active|") || outcome.starts_with("updated|active|"),
            "{outcome}"
        );
        assert_eq!(
            remaining(first),
            0,
            "its expiry is recorded once it comes back"
        );
        let expired: i64 = one(&format!(
            "SELECT -grant_amount FROM billing.ledger WHERE grant_id = {first} AND kind = 'expire'"
        ));
        assert_eq!(expired, 1000);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn an_annual_subscription_cancelled_mid_year_and_reactivated_keeps_its_months() {
        plans();
        let t = now_unix();
        let start = t - 5 * DAY;
        let end = start + 365 * DAY;
        let s = subscription("sub_1", "org_1", "active", "price_basic_y", 1, start, end);
        sync(&s);
        let open = || -> i64 {
            one("SELECT coalesce(sum(billing.grant_remaining(g)), 0)::bigint FROM billing.grants g WHERE status = 'active'")
        };
        assert_eq!(open(), 12_000);
        let cancel_at = with(s.clone(), json!({"cancel_at": start + 100 * DAY}));
        let cancelled = sync(&cancel_at);
        assert!(cancelled.ends_with("/8000"), "{cancelled}");
        assert_eq!(open(), 4000, "the months after the cancellation are gone");
        assert_eq!(
            sync(&s),
            format!("updated|active|{}", credit(8000, 0, 0, 0))
        );
        assert_eq!(open(), 12_000, "reactivated: every month is back");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_refused_subscription_applies_once_the_live_one_ends() {
        plans();
        let (start, end) = month();
        sync(&subscription(
            "sub_1",
            "org_1",
            "incomplete",
            "price_basic_m",
            1,
            start,
            end,
        ));
        assert_eq!(
            sync(&subscription(
                "sub_2",
                "org_1",
                "active",
                "price_basic_m",
                1,
                start,
                end
            )),
            format!("created|active|{}", credit(1000, 0, 0, 0)),
            "an unpaid checkout holds no place"
        );
        let third = subscription("sub_3", "org_1", "active", "price_pro_m", 1, start, end);
        assert!(sync(&third).starts_with("conflict|"));
        assert!(
            sync(&subscription(
                "sub_1",
                "org_1",
                "active",
                "price_basic_m",
                1,
                start,
                end
            ))
            .starts_with("conflict|"),
            "the abandoned checkout paid late is a conflict too"
        );
        let canceled = with(
            subscription("sub_2", "org_1", "canceled", "price_basic_m", 1, start, end),
            json!({"ended_at": now_unix()}),
        );
        sync(&canceled);
        let live: String = one(
            "SELECT string_agg(provider_id || ':' || status, ',' ORDER BY provider_id) FROM billing.subscriptions \
             WHERE status NOT IN ('canceled', 'incomplete', 'incomplete_expired')",
        );
        assert_eq!(live, "sub_3:active", "the first refused one took the place");
        assert_eq!(
            credits("org_1"),
            2000,
            "with its own allowance, less what the ended one used (nothing)"
        );
        let open: i64 =
            one("SELECT count(*) FROM billing.subscription_conflicts WHERE resolved_at IS NULL");
        assert_eq!(open, 1, "the other stays recorded for a refund");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn an_upgrade_raises_the_ceiling_a_downgrade_never_shrinks_the_period_and_seats_only_rise() {
        plans();
        let (start, end) = month();
        sync(&subscription(
            "sub_1",
            "org_1",
            "active",
            "price_basic_m",
            1,
            start,
            end,
        ));
        ingest("org_1", "credits", 300, "e1");
        assert_eq!(
            sync(&subscription(
                "sub_1",
                "org_1",
                "active",
                "price_pro_m",
                1,
                start,
                end
            )),
            format!("updated|active|{}", credit(1000, 0, 0, 0)),
            "raised to the new allowance: no second full allowance"
        );
        assert_eq!(credits("org_1"), 1700);
        assert_eq!(
            sync(&subscription(
                "sub_1",
                "org_1",
                "active",
                "price_basic_m",
                1,
                start,
                end
            )),
            format!("updated|active|{}", credit(0, 0, 0, 0))
        );
        assert_eq!(
            credits("org_1"),
            1700,
            "a downgrade waits for the next period"
        );
        let next = subscription(
            "sub_1",
            "org_1",
            "active",
            "price_basic_m",
            1,
            end,
            end + 30 * DAY,
        );
        sync(&next);
        pay(&invoice("in_2", "sub_1", "paid", 2000, end, end + 30 * DAY));
        let next_grant: i64 = one(&format!(
            "SELECT amount FROM billing.grants WHERE effective_at = to_timestamp({end})"
        ));
        assert_eq!(
            next_grant, 1000,
            "the next period has the lower plan's allowance"
        );

        let team = |seats: i64| {
            subscription(
                "sub_t",
                "org_t",
                "active",
                "price_team_m",
                seats,
                start,
                end,
            )
        };
        assert_eq!(
            sync(&team(3)),
            format!("created|active|{}", credit(300, 0, 0, 0))
        );
        assert_eq!(
            sync(&team(5)),
            format!("updated|active|{}", credit(200, 0, 0, 0))
        );
        assert_eq!(
            sync(&team(2)),
            format!("updated|active|{}", credit(0, 0, 0, 0))
        );
        assert_eq!(
            sync(&team(4)),
            format!("updated|active|{}", credit(0, 0, 0, 0))
        );
        assert_eq!(
            credits("org_t"),
            500,
            "the period's high-water mark of seats"
        );
        assert_rejected(&sync_sql(&team(0)), "22023");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn cancelling_keeps_the_period_then_ends_it_and_resubscribing_gives_no_second_allowance() {
        plans();
        let (start, end) = month();
        let s = subscription("sub_1", "org_1", "active", "price_basic_m", 1, start, end);
        sync(&s);
        ingest("org_1", "credits", 300, "e1");
        let at_end = with(s.clone(), json!({"cancel_at_period_end": true}));
        assert_eq!(
            sync(&at_end),
            format!("updated|active|{}", credit(0, 0, 0, 0))
        );
        assert_eq!(credits("org_1"), 700, "kept to the period's end");
        let ends: bool = one(&format!(
            "SELECT ends_at = to_timestamp({end}) FROM billing.subscriptions"
        ));
        assert!(
            ends,
            "cancel_at_period_end means access ends at the period end"
        );
        assert_eq!(
            sync(&s),
            format!("updated|active|{}", credit(0, 0, 0, 0)),
            "reactivated before the end"
        );
        assert!(one::<bool>(
            "SELECT ends_at IS NULL FROM billing.subscriptions"
        ));

        let canceled = with(
            subscription("sub_1", "org_1", "canceled", "price_basic_m", 1, start, end),
            json!({"canceled_at": now_unix(), "ended_at": now_unix()}),
        );
        assert_eq!(
            sync(&canceled),
            format!("updated|canceled|{}", credit(0, 0, 0, 700))
        );
        assert_eq!(credits("org_1"), 0);
        let t = now_unix();
        assert_eq!(
            sync(&subscription(
                "sub_2",
                "org_1",
                "active",
                "price_basic_m",
                1,
                t,
                t + 30 * DAY
            )),
            format!("created|active|{}", credit(700, 0, 0, 0)),
            "what the cancelled period used counts: never two full allowances in one period"
        );
        assert_eq!(credits("org_1"), 700);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn an_account_has_at_most_one_live_subscription_and_one_customer() {
        plans();
        let (start, end) = month();
        sync(&subscription(
            "sub_1",
            "org_1",
            "active",
            "price_basic_m",
            1,
            start,
            end,
        ));
        let second = subscription("sub_2", "org_1", "active", "price_pro_m", 1, start, end);
        let outcome: String = one(&format!(
            "SELECT outcome || ':' || (changes ->> 'live_subscription_id' = \
                    (SELECT id::text FROM billing.subscriptions WHERE provider_id = 'sub_1'))::text \
             FROM ({}) r",
            sync_sql(&second)
        ));
        assert_eq!(outcome, "conflict:true");
        assert_eq!(
            one::<String>(
                "SELECT provider_id || ':' || status FROM billing.subscription_conflicts"
            ),
            "sub_2:active",
            "recorded for the application to refund"
        );
        assert_eq!(credits("org_1"), 1000, "the second one grants nothing");
        assert_eq!(one::<i64>("SELECT count(*) FROM billing.subscriptions"), 1);

        let other_customer = with(
            subscription("sub_3", "org_1", "active", "price_basic_m", 1, start, end),
            json!({"customer": "cus_someone_else"}),
        );
        assert_rejected(&sync_sql(&other_customer), "55000");
        let other_account = with(
            subscription("sub_4", "org_2", "active", "price_basic_m", 1, start, end),
            json!({"customer": "cus_org_1"}),
        );
        assert_rejected(&sync_sql(&other_account), "55000");
        assert_eq!(credits("org_1"), 1000);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn an_older_observation_changes_nothing_and_bad_objects_are_refused() {
        plans();
        let (start, end) = month();
        let active = subscription("sub_1", "org_1", "active", "price_basic_m", 1, start, end);
        sync(&active);
        let canceled = subscription("sub_1", "org_1", "canceled", "price_basic_m", 1, start, end);
        let applied: String = one(&format!(
            "SELECT outcome FROM billing.sync_subscription('{}'::jsonb, now() + interval '1 minute')",
            canceled.to_string().replace('\'', "''")
        ));
        assert_eq!(applied, "updated");
        let late: String = one(&format!(
            "SELECT outcome FROM billing.sync_subscription('{}'::jsonb, now())",
            active.to_string().replace('\'', "''")
        ));
        assert_eq!(late, "stale", "an older state arriving late is not applied");
        let same_second: String = one(&format!(
            "SELECT outcome FROM billing.sync_subscription('{}'::jsonb, now() + interval '1 minute')",
            active.to_string().replace('\'', "''")
        ));
        assert_eq!(
            same_second, "stale",
            "an ended subscription never lives again"
        );
        assert_rejected(
            &format!(
                "SELECT * FROM billing.sync_subscription('{}'::jsonb, now() + interval '1 day')",
                active.to_string().replace('\'', "''")
            ),
            "22023",
        );
        assert_eq!(credits("org_1"), 0);
        assert_eq!(
            one::<String>("SELECT status FROM billing.subscriptions"),
            "canceled"
        );

        let unknown_price = subscription("sub_9", "org_9", "active", "price_nope", 1, start, end);
        assert_rejected(&sync_sql(&unknown_price), "22023");
        let bad_status = subscription("sub_9", "org_9", "weird", "price_basic_m", 1, start, end);
        assert_rejected(&sync_sql(&bad_status), "22023");
        let no_account = with(
            subscription("sub_9", "org_9", "active", "price_basic_m", 1, start, end),
            json!({"metadata": {}, "customer": "cus_unknown"}),
        );
        assert_rejected(&sync_sql(&no_account), "22023");
        assert_rejected(
            r#"SELECT * FROM billing.sync_subscription('{"object": "invoice", "id": "in_1"}')"#,
            "22023",
        );
    }

    #[pg_test]
    fn stripe_subscription_events_apply_in_any_order_and_subscription_payments_are_not_top_ups() {
        setup();
        plans();
        let (start, end) = month();
        let t = now_unix();
        let s =
            |status: &str| subscription("sub_1", "org_1", status, "price_basic_m", 1, start, end);
        let created = event(
            "evt_1",
            "customer.subscription.created",
            t - 60,
            s("incomplete"),
        );
        let active = event(
            "evt_2",
            "customer.subscription.updated",
            t - 30,
            s("active"),
        );
        let late = event(
            "evt_3",
            "customer.subscription.updated",
            t - 45,
            s("past_due"),
        );
        assert_eq!(deliver(&active), "applied|", "an update before its create");
        assert_eq!(credits("org_1"), 1000);
        assert!(deliver(&created).starts_with("superseded|"));
        assert!(deliver(&late).starts_with("superseded|"));
        assert!(deliver(&active).starts_with("duplicate|"));
        assert_eq!(credits("org_1"), 1000, "still active, granted once");
        let failed = event(
            "evt_4",
            "customer.subscription.updated",
            t - 20,
            subscription("sub_1", "org_1", "active", "price_nope", 1, start, end),
        );
        let outcome = deliver(&failed);
        assert!(
            outcome.starts_with("failed|") && outcome.contains("no price maps to a plan"),
            "{outcome}"
        );
        let past_due = event(
            "evt_5",
            "customer.subscription.updated",
            t - 10,
            s("past_due"),
        );
        assert_eq!(deliver(&past_due), "applied|");
        assert_eq!(credits("org_1"), 0, "held back at once");

        let mut checkout: Value = serde_json::from_str(include_str!(
            "../tests/fixtures/stripe/checkout_session.json"
        ))
        .unwrap();
        checkout["mode"] = json!("subscription");
        checkout["payment_status"] = json!("paid");
        checkout["amount_total"] = json!(2000);
        checkout["currency"] = json!("usd");
        checkout["client_reference_id"] = json!("org_1");
        checkout["subscription"] = json!("sub_1");
        assert_eq!(
            deliver(&event("evt_6", "checkout.session.completed", t, checkout)),
            "applied|"
        );
        let mut invoice_payment = payment_intent("pi_sub", 2000, "usd", "org_1");
        invoice_payment["description"] = json!("Subscription creation");
        invoice_payment["metadata"] = json!({});
        assert_eq!(
            deliver(&event(
                "evt_7",
                "payment_intent.succeeded",
                t,
                invoice_payment
            )),
            "applied|"
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.grants WHERE kind = 'topup'"),
            0,
            "a subscription's payments buy its plan, not credits"
        );

        // a checkout names the account; the subscription's events name only its customer
        let mut checkout_2: Value = serde_json::from_str(include_str!(
            "../tests/fixtures/stripe/checkout_session.json"
        ))
        .unwrap();
        checkout_2["mode"] = json!("subscription");
        checkout_2["payment_status"] = json!("paid");
        checkout_2["client_reference_id"] = json!("org_2");
        checkout_2["customer"] = json!("cus_org_2");
        assert_eq!(
            deliver(&event("evt_8", "checkout.session.completed", t, checkout_2)),
            "applied|"
        );
        let unnamed = with(
            subscription("sub_2", "org_2", "active", "price_basic_m", 1, start, end),
            json!({"metadata": {}}),
        );
        assert_eq!(
            deliver(&event("evt_9", "customer.subscription.created", t, unnamed)),
            "applied|"
        );
        assert_eq!(credits("org_2"), 1000, "found through its customer");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_renewal_opens_no_allowance_until_its_invoice_is_paid() {
        plans();
        let t = now_unix();
        let (start, end) = (t - 40 * DAY, t - 10 * DAY);
        let first = subscription("sub_1", "org_1", "active", "price_basic_m", 1, start, end);
        sync(&first); // the first period ended 10 days ago
        let renewed = subscription(
            "sub_1",
            "org_1",
            "active",
            "price_basic_m",
            1,
            end,
            end + 30 * DAY,
        );
        assert_eq!(
            sync(&renewed),
            format!("updated|active|{}", credit(0, 0, 0, 0)),
            "renewed but not paid yet: no allowance"
        );
        assert_eq!(credits("org_1"), 0);
        assert_eq!(
            one::<String>("SELECT reason FROM billing.check('org_1', 'credits', 1)"),
            "subscription_renewal_unpaid"
        );
        // neither a paid proration of a mid-period change nor an add-on on a
        // yearly price pays the plan's renewal
        let mut proration = invoice("in_p", "sub_1", "paid", 300, end, end + 30 * DAY);
        proration["lines"]["data"][0]["parent"]["subscription_item_details"]["proration"] =
            json!(true);
        assert_eq!(pay(&proration), "updated|0/0/0/0");
        let mut addon = invoice("in_a", "sub_1", "paid", 9000, end, end + 365 * DAY);
        addon["lines"]["data"][0]["pricing"] = json!({"type": "price_details", "price_details": {"price": "price_addon_y", "product": "prod_a"}});
        assert_eq!(pay(&addon), "updated|0/0/0/0");
        assert_eq!(credits("org_1"), 0, "the renewal is still unpaid");
        let unpaid = invoice("in_2", "sub_1", "open", 0, end, end + 30 * DAY);
        assert_eq!(pay(&unpaid), "updated|0/0/0/0");
        assert_eq!(credits("org_1"), 0, "an open invoice pays nothing");
        let paid = invoice("in_2", "sub_1", "paid", 2000, end, end + 30 * DAY);
        assert_eq!(pay(&paid), format!("updated|{}", credit(1000, 0, 0, 0)));
        assert_eq!(credits("org_1"), 1000, "paid: the period opens");
        assert_eq!(pay(&paid), "unchanged|0/0/0/0", "a replay changes nothing");
        assert_eq!(
            pay(&unpaid),
            "unchanged|0/0/0/0",
            "an older observation never unpays it"
        );

        // the next renewal is paid before its subscription update arrives, with $0
        let later = end + 30 * DAY;
        let free = invoice("in_3", "sub_1", "paid", 0, later, later + 30 * DAY);
        assert_eq!(pay(&free), format!("updated|{}", credit(0, 0, 0, 0)));
        travel("org_1", "30 days");
        let next = subscription(
            "sub_1",
            "org_1",
            "active",
            "price_basic_m",
            1,
            later,
            later + 30 * DAY,
        );
        let outcome = sync(&next);
        assert!(
            outcome.starts_with("updated|active|1000/"),
            "a $0 invoice is paid, and it counted before the update: {outcome}"
        );

        // polled with its latest invoice expanded
        let mut polled = subscription("sub_2", "org_2", "trialing", "price_basic_m", 1, start, end);
        sync(&polled);
        polled["status"] = json!("active");
        polled["items"]["data"][0]["current_period_start"] = json!(end);
        polled["items"]["data"][0]["current_period_end"] = json!(end + 30 * DAY);
        polled["latest_invoice"] = invoice("in_4", "sub_2", "paid", 2000, end, end + 30 * DAY);
        let outcome = sync(&polled);
        assert!(outcome.contains("|1000/"), "{outcome}");
        assert_eq!(
            pay(&json!({"object": "invoice", "id": "in_5", "status": "paid"})),
            "ignored|0/0/0/0",
            "an invoice of no subscription is not ours"
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn seats_counted_from_the_membership_table_raise_the_allowance_at_once() {
        plans();
        run("CREATE TABLE pg_temp.members (org text, user_id text, role text, pending boolean)");
        run(
            "CREATE TRIGGER billing_seats AFTER INSERT OR UPDATE OR DELETE ON pg_temp.members \
             FOR EACH ROW EXECUTE FUNCTION billing.count_seats('org', 'user_id', 'NOT pending')",
        );
        let seats = || -> i32 { one("SELECT seats FROM billing.seats WHERE account = 'org_t'") };
        // members added before the account has any billing: counted all the same
        run("INSERT INTO pg_temp.members VALUES ('org_t', 'u1', 'owner', false), ('org_t', 'bot1', 'bot', false), \
                                                ('org_t', 'u2', 'member', true), ('org_t', 'u1', 'admin', false)");
        assert_eq!(
            seats(),
            2,
            "owner and bot count, a pending invitation does not, u1 once"
        );
        let (start, end) = month();
        let team =
            |status: &str| subscription("sub_t", "org_t", status, "price_team_m", 1, start, end);
        assert_eq!(
            sync(&team("active")),
            format!("created|active|{}", credit(200, 0, 0, 0)),
            "the higher of the provider's quantity and the members counted"
        );
        run("UPDATE pg_temp.members SET pending = false WHERE user_id = 'u2'");
        assert_eq!(seats(), 3);
        assert_eq!(
            credits("org_t"),
            300,
            "a seat added raises the allowance at once"
        );
        run("DELETE FROM pg_temp.members WHERE user_id IN ('u2', 'bot1')");
        assert_eq!(seats(), 1);
        assert_eq!(
            credits("org_t"),
            300,
            "a seat removed never lowers the period"
        );
        let pending: String = one(
            "SELECT string_agg(id || ':' || seats, ',') FROM billing.seat_pushes WHERE pushed_at IS NULL",
        );
        let id: i64 = one("SELECT id FROM billing.seat_pushes WHERE pushed_at IS NULL");
        assert_eq!(
            pending,
            format!("{id}:1"),
            "one pending push, with the latest count"
        );
        assert!(
            !one::<bool>(&format!("SELECT billing.ack_seat_push({id}, 3)")),
            "a stale count is not acknowledged"
        );
        assert!(one::<bool>(&format!(
            "SELECT billing.ack_seat_push({id}, 1)"
        )));
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.seat_pushes WHERE pushed_at IS NULL"),
            0
        );

        // a seat added while delinquent applies on recovery
        sync(&team("past_due"));
        run("INSERT INTO pg_temp.members VALUES ('org_t', 'u3', 'member', false), ('org_t', 'u4', 'member', false), \
                                                ('org_t', 'u5', 'member', false), ('org_t', 'u6', 'member', false)");
        assert_eq!(seats(), 5);
        assert_eq!(credits("org_t"), 0, "held back");
        assert_eq!(
            sync(&team("active")),
            format!("updated|active|{}", credit(200, 0, 2, 0)),
            "recovered: both grants of the period back, and the new seats' allowance"
        );
        assert_eq!(credits("org_t"), 500);
        assert_rejected("SELECT * FROM billing.set_seats('org_t', -1)", "22023");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn the_periodic_work_opens_a_paid_renewal_whose_update_was_lost_and_expires_held_back_credit() {
        plans();
        let t = now_unix();
        let (start, end) = (t - 40 * DAY, t - 10 * DAY);
        sync(&subscription(
            "sub_1",
            "org_1",
            "active",
            "price_basic_m",
            1,
            start,
            end,
        ));
        // the renewal's invoice arrived, its subscription update was lost
        pay(&invoice("in_2", "sub_1", "paid", 2000, end, end + 30 * DAY));
        assert_eq!(
            credits("org_1"),
            0,
            "the subscription still says the old period"
        );
        let periodic = || -> String {
            one("SELECT string_agg(task || '=' || done, ',' ORDER BY task) FROM billing.run_periodic()")
        };
        assert_eq!(periodic(), "expiries=0,held_back=0,renewals=1");
        assert_eq!(credits("org_1"), 1000, "the paid period is open");
        assert_eq!(
            periodic(),
            "expiries=0,held_back=0,renewals=0",
            "idempotent"
        );

        let (s2, e2) = month();
        sync(&subscription(
            "sub_2",
            "org_2",
            "active",
            "price_basic_m",
            1,
            s2,
            e2,
        ));
        let held: i64 = one("SELECT g.id FROM billing.grants g WHERE g.account = 'org_2'");
        sync(&subscription(
            "sub_2",
            "org_2",
            "past_due",
            "price_basic_m",
            1,
            s2,
            e2,
        ));
        travel("org_2", "30 days");
        assert_eq!(periodic(), "expiries=0,held_back=1,renewals=0");
        assert_eq!(
            remaining(held),
            0,
            "credit held back past its period is expired"
        );
        assert_eq!(
            one::<String>(&format!("SELECT kind::text FROM billing.ledger WHERE grant_id = {held} ORDER BY version DESC LIMIT 1")),
            "expire"
        );
        assert_eq!(periodic(), "expiries=0,held_back=0,renewals=0");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_poll_that_changes_something_is_drift_and_every_change_is_kept() {
        plans();
        setup();
        let (start, end) = month();
        let t = now_unix();
        let s =
            |status: &str| subscription("sub_1", "org_1", status, "price_basic_m", 1, start, end);
        assert_eq!(
            deliver(&event(
                "evt_1",
                "customer.subscription.created",
                t - 60,
                s("active")
            )),
            "applied|"
        );
        // the past_due event was lost; the daily pull finds it
        sync(&s("past_due"));
        sync(&s("past_due"));
        let drift: String = one(
            "SELECT string_agg(concat_ws(':', subscription, field, was, became), ',') FROM billing.subscription_drift",
        );
        assert_eq!(drift, "sub_1:status:active:past_due");
        let history: String = one(
            "SELECT string_agg(source || ':' || (credit ->> 'granted') || '/' || (credit ->> 'suspended'), ',' ORDER BY id) \
             FROM billing.subscription_changes",
        );
        assert_eq!(
            history, "webhook:1000/0,poll:0/1",
            "a replayed poll changes nothing and is not kept"
        );
        assert_rejected(
            &format!(
                "SELECT * FROM billing.sync_subscription('{}', now(), 'stripe', 'magic')",
                s("active")
            ),
            "22023",
        );
    }

    #[pg_test]
    fn a_subscription_moved_to_another_account_keeps_each_accounts_history() {
        plans();
        let (start, end) = month();
        let on = |account: &str| {
            with(
                subscription("sub_1", "org_1", "active", "price_basic_m", 1, start, end),
                json!({"metadata": {"account": account}}),
            )
        };
        sync(&on("org_1"));
        ingest("org_1", "credits", 300, "e1");
        let moved = sync(&on("org_2"));
        assert!(
            moved.starts_with("updated|active|700/"),
            "the rest of the allowance, not a second one: {moved}"
        );
        assert_eq!(
            credits("org_1"),
            0,
            "its unused plan credit left with the subscription"
        );
        assert_eq!(credits("org_2"), 700);
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.usage_events WHERE account = 'org_1'"),
            1,
            "what org_1 used stays in org_1's history"
        );
        assert_eq!(
            one::<String>(
                "SELECT account FROM billing.provider_customers WHERE customer = 'cus_org_1'"
            ),
            "org_2",
            "its customer moved with it"
        );
        let change: String = one(
            "SELECT changes -> 'account' ->> 0 || '>' || (changes -> 'account' ->> 1) FROM billing.subscription_changes \
             WHERE changes ? 'account'",
        );
        assert_eq!(change, "org_1>org_2");

        // into an account with a live subscription (and customer) of its own: refused, nothing moves
        sync(&with(
            subscription("sub_3", "org_3", "active", "price_pro_m", 1, start, end),
            json!({"customer": "cus_org_3"}),
        ));
        assert_rejected(&sync_sql(&on("org_3")), "55000");
        assert_eq!(credits("org_2"), 700, "nothing moved");
        assert_eq!(
            one::<String>(
                "SELECT account FROM billing.provider_customers WHERE customer = 'cus_org_1'"
            ),
            "org_2"
        );
        // into an account that is another customer's
        sync(&with(
            subscription("sub_4", "org_4", "canceled", "price_basic_m", 1, start, end),
            json!({"customer": "cus_org_4"}),
        ));
        assert_rejected(&sync_sql(&on("org_4")), "55000");
        assert_eq!(credits("org_2"), 700);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_disputed_subscription_payment_holds_plan_credit_back_until_won_and_a_refund_does_not() {
        setup();
        plans();
        grant("org_1", "credits", 50, ", kind => 'topup'");
        let (start, end) = month();
        let t = now_unix();
        sync(&subscription(
            "sub_1",
            "org_1",
            "active",
            "price_basic_m",
            1,
            start,
            end,
        ));
        let mut paid = invoice("in_1", "sub_1", "paid", 2000, start, end);
        paid["payment_intent"] = json!("pi_sub_1");
        pay(&paid);
        assert_eq!(credits("org_1"), 1050);
        let refunded = deliver(&event(
            "evt_r",
            "charge.refunded",
            t - 50,
            charge("pi_sub_1", 2000, 2000, "usd"),
        ));
        assert_eq!(refunded, "applied|");
        assert_eq!(
            credits("org_1"),
            1050,
            "a refund leaves the subscription alone"
        );
        let opened = deliver(&event(
            "evt_d1",
            "charge.dispute.created",
            t - 40,
            dispute("dp_1", "pi_sub_1", 2000, "usd", "needs_response"),
        ));
        assert_eq!(opened, "applied|");
        assert_eq!(credits("org_1"), 50, "held back at once; top-ups stay");
        assert_eq!(
            one::<String>("SELECT reason FROM billing.check('org_1', 'credits', 51)"),
            "subscription_disputed"
        );
        let won = deliver(&event(
            "evt_d2",
            "charge.dispute.closed",
            t - 30,
            dispute("dp_1", "pi_sub_1", 2000, "usd", "won"),
        ));
        assert_eq!(won, "applied|");
        assert_eq!(credits("org_1"), 1050, "won: the credit is back");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_plans_credit_line_holds_while_its_access_is_open() {
        plans();
        run(
            r#"SELECT * FROM billing.define_plan('pro_credit', '{"credits": {"amount": 1000}}',
                 '[{"price_id": "price_credit_m", "interval": "month"}]', floor => -500)"#,
        );
        let (start, end) = month();
        let s =
            |status: &str| subscription("sub_1", "org_1", status, "price_credit_m", 1, start, end);
        sync(&s("active"));
        let allowed = |amount: i64| -> bool {
            one(&format!(
                "SELECT allowed FROM billing.check('org_1', 'credits', {amount})"
            ))
        };
        assert!(
            allowed(1500) && !allowed(1501),
            "the allowance and a 500 credit line"
        );
        sync(&s("past_due"));
        assert!(!allowed(1), "delinquent: no plan credit and no credit line");
        sync(&s("active"));
        assert!(allowed(1500) && !allowed(1501));
        let canceled = with(s("canceled"), json!({"ended_at": now_unix()}));
        sync(&canceled);
        assert_eq!(
            one::<i64>("SELECT floor FROM billing.pools WHERE account = 'org_1'"),
            0
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_dispute_finds_its_subscription_through_the_invoice_payment_in_any_currency() {
        setup();
        plans();
        let (start, end) = month();
        let t = now_unix();
        sync(&subscription(
            "sub_1",
            "org_1",
            "active",
            "price_basic_m",
            1,
            start,
            end,
        ));
        // the newest API versions: the invoice names no payment; invoice_payment.paid does
        pay(&invoice("in_1", "sub_1", "paid", 2000, start, end));
        let invoice_payment = json!({"id": "inpay_1", "object": "invoice_payment", "invoice": "in_1",
            "amount_paid": 2000, "currency": "eur", "is_default": true, "livemode": false, "status": "paid",
            "payment": {"type": "payment_intent", "payment_intent": "pi_eur"},
            "status_transitions": {"paid_at": t, "canceled_at": null}, "created": t});
        assert_eq!(
            deliver(&event(
                "evt_p",
                "invoice_payment.paid",
                t - 50,
                invoice_payment
            )),
            "applied|"
        );
        assert_eq!(credits("org_1"), 1000);
        let opened = deliver(&event(
            "evt_d",
            "charge.dispute.created",
            t - 40,
            dispute("dp_1", "pi_eur", 2000, "eur", "needs_response"),
        ));
        assert_eq!(
            opened, "applied|",
            "a currency the endpoint does not credit is still a subscription's"
        );
        assert_eq!(credits("org_1"), 0);
        let history: String =
            one("SELECT string_agg(source, ',' ORDER BY id) FROM billing.subscription_changes");
        assert_eq!(history, "poll,dispute");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn an_abandoned_checkout_does_not_speak_for_a_live_subscription() {
        plans();
        let (start, end) = month();
        sync(&subscription(
            "sub_1",
            "org_1",
            "active",
            "price_basic_m",
            1,
            start,
            end,
        ));
        sync(&with(
            subscription("sub_2", "org_1", "incomplete", "price_pro_m", 1, start, end),
            json!({"customer": "cus_org_1"}),
        ));
        assert_eq!(
            one::<String>("SELECT reason FROM billing.check('org_1', 'credits', 1001)"),
            "insufficient_credits"
        );
    }

    #[pg_test]
    fn a_switch_from_monthly_to_annual_keeps_the_monthly_bookkeeping() {
        plans();
        let (start, end) = month();
        sync(&subscription(
            "sub_1",
            "org_1",
            "active",
            "price_basic_m",
            1,
            start,
            end,
        ));
        ingest("org_1", "credits", 300, "e1");
        // the provider restarts the billing cycle at the switch: a year from now
        let t = now_unix();
        let mut annual = subscription(
            "sub_1",
            "org_1",
            "active",
            "price_basic_y",
            1,
            t,
            t + 365 * DAY,
        );
        annual["latest_invoice"] = invoice("in_y", "sub_1", "paid", 20000, t, t + 365 * DAY);
        let switched = sync(&annual);
        assert!(
            switched.starts_with("updated|active|11700/"),
            "this month the rest of the monthly allowance, then 11 full months: {switched}"
        );
        assert_eq!(credits("org_1"), 700, "no second allowance this month");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM billing.grants WHERE account = 'org_1' AND status = 'active' AND effective_at > now()"),
            11
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_subscription_paid_by_invoice_later_opens_when_its_invoice_is_paid() {
        plans();
        let (start, end) = month();
        let invoiced = with(
            subscription("sub_1", "org_1", "active", "price_basic_m", 1, start, end),
            json!({"collection_method": "send_invoice", "days_until_due": 30}),
        );
        assert_eq!(
            sync(&invoiced),
            format!("created|active|{}", credit(0, 0, 0, 0)),
            "active while its invoice is still due: not paid"
        );
        assert_eq!(credits("org_1"), 0);
        assert_eq!(
            pay(&invoice("in_1", "sub_1", "paid", 2000, start, end)),
            format!("updated|{}", credit(1000, 0, 0, 0))
        );
        assert_eq!(credits("org_1"), 1000);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn the_catalogue_seats_and_invoices_refuse_bad_input_and_answer_replays_alike() {
        plans();
        let retired = || -> String {
            one("SELECT versions || ':' || (retired_at = now()) FROM billing.retire_plan('pro')")
        };
        assert_eq!(retired(), "1:true");
        assert_eq!(retired(), "1:true", "retiring again changes nothing");
        assert_rejected("SELECT * FROM billing.retire_plan('nope')", "42704");

        let (start, end) = month();
        let set = |n: i32| -> String {
            one(&format!(
                "SELECT seat_count || ':' || changed FROM billing.set_seats('org_1', {n})"
            ))
        };
        assert_eq!(set(3), "3:true");
        assert_eq!(set(3), "3:false", "the same count again changes nothing");
        assert_eq!(one::<i64>("SELECT count(*) FROM billing.seat_pushes"), 1);

        assert_rejected(
            r#"SELECT * FROM billing.sync_invoice('{"object": "charge", "id": "ch_1"}')"#,
            "22023",
        );
        assert_rejected(
            &format!(
                "SELECT * FROM billing.sync_invoice('{}', now() + interval '1 day')",
                invoice("in_1", "sub_1", "paid", 1, start, end)
            ),
            "22023",
        );
        assert_rejected(
            &format!(
                "SELECT * FROM billing.sync_invoice('{}')",
                invoice("in_1", "sub_1", "weird", 1, start, end)
            ),
            "22023",
        );
        assert_rejected(
            "SELECT * FROM billing.allowance_periods(now(), now() - interval '1 day')",
            "22023",
        );
        assert_rejected(
            "SELECT * FROM billing.allowance_periods(now(), 'infinity')",
            "22023",
        );
    }
}
