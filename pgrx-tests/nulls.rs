// Every argument that may not be NULL is refused with 22004 and a message
// naming it, and the call writes nothing: never XX000, never a silent empty
// result. Every function of the schema is listed, so a new one must be too.
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::support::*;

    /// Each public function with valid arguments; `?` marks one that may
    /// not be NULL, `~` one whose NULL means "the default".
    const CALLS: &[&str] = &[
        "billing.grant(?'a', ?'mills', ?5, kind => ?'manual', priority => ~NULL, effective_at => ~NULL, expires_at => ~NULL, key => ~'g1', metadata => ?'{}', reason => ~NULL)",
        "billing.void_grant(?$grant)",
        "billing.revoke_unused(?$grant)",
        "billing.suspend_grant(?$grant)",
        "billing.resume_grant(?$grant)",
        "billing.reverse_grant(?$grant, ?1)",
        "billing.check(?'a', ?'mills', ?1, member => ~NULL, meter => ~NULL)",
        "billing.limits_status(?'a', ?'mills', member => ~NULL)",
        "billing.set_limit(?'a', ?'mills', ?'daily', ?100, every => ?'day', time_zone => ?'UTC', per_member => ?false)",
        "billing.remove_limit(?'a', ?'mills', ?'daily')",
        "billing.ingest(?'a', ?'mills', ?1, key => 'i1', occurred_at => ~NULL, properties => ?'{}', cost => ~NULL, strict => ?false)",
        "billing.ingest_batch(?'[]')",
        "billing.reserve(?'a', ?'mills', ?1, key => ~'r1', ttl => ?'1 minute', metadata => ?'{}')",
        "billing.settle(?$hold, ?1, key => ~NULL, meter => ~NULL, quantity => ~NULL, properties => ~NULL)",
        "billing.release(?$hold)",
        "billing.balance(?'a', ?'mills', as_of => ~NULL)",
        "billing.define_unit(?'u1', ~'d')",
        "billing.define_meter(?'m1', ?'mills', ~1, ~'d', aggregation => ?'sum', property => ~NULL, group_by => ?'{}', filter => ~NULL, lateness => ?'1 hour', late_events => ?'reject', future_skew => ?'1 minute', price => ~NULL)",
        "billing.set_price(?'m0', ?'{\"model\": \"per_unit\", \"unit_price\": 2}', effective_at => ~NULL)",
        "billing.disable_meter(?'m0')",
        "billing.enable_meter(?'m0')",
        "billing.invoice_preview(?'a', period_at => ?'2027-01-01'::timestamptz, projected => ?false)",
        "billing.simulate_price(?'a', ?'mills', ?'{\"model\": \"per_unit\", \"unit_price\": 1}', period_at => ?'2027-01-01'::timestamptz)",
        "billing.price_lines(?'{\"model\": \"per_unit\", \"unit_price\": 1}', ?5)",
        "billing.price_total(?'{\"model\": \"per_unit\", \"unit_price\": 1}', ?5)",
        "billing.usage_to_report(period_at => ?'2027-01-01'::timestamptz, only_meter => ~NULL, max_rows => ?10)",
        "billing.mark_reported(?'a', ?'mills', ?'2027-01-01'::timestamptz, ?1, ?'k1', shadow => ?true)",
        "billing.usage_log(?'a', only_meter => ~NULL, before_id => ~NULL, page_size => ?10)",
        "billing.usage(?'a', ?'mills', ?'2027-01-01'::timestamptz, ?'2027-01-02'::timestamptz, granularity => ?'day', group_by => ?'{}', time_zone => ?'UTC')",
        "billing.account(?'a', ~'n', ~'{}')",
        "billing.set_floor(?'a', ?'mills', ?0)",
        "billing.set_lanes(?'a', ?'mills', ?2)",
        "billing.sweep(?10)",
        "billing.verify_webhook(?'stripe', ?'s', ?'{}', ?'{}', ~NULL, ?300, ?'x-signature')",
        "billing.define_webhook_endpoint(?'e1', ?'stripe', ?'s', ?300, ?'x-signature', ?'usd_cents', ?1, ?'usd')",
        "billing.map_webhook_currency(?'e0', ?'eur', ?'eur_cents', ~2, ~NULL)",
        "billing.rotate_webhook_secret(?'e0', ?'s2', ?'1 hour')",
        "billing.register_webhook_handler(?'x', ?'billing.stripe_credit_topup(billing.webhook_events)', ?'*')",
        "billing.purge_webhook_events(?'1 day', ?false)",
        "billing.grant_tenant(?'t1', ?'null_test_role')",
        "billing.revoke_tenant(?'t1', ?'null_test_role')",
        "billing.receive_webhook(?'e0', ~'{}', ~'{}')",
        "billing.currency_exponent(~'usd')",
        "billing.grant_state(~'active', ~1, ~now(), ~NULL, ~now())",
        "billing.verify_ledger()",
        "billing.grant_entry_totals(~'{1}'::bigint[])",
        "billing.grant_remaining(~NULL::billing.grants)",
        "billing.set_topup_fee(?'usd', ?'domestic', ?2.9, ?30)",
        "billing.set_topup_limits(?'usd', ?500, ?100000, ?1)",
        "billing.quote(?1000, ?'usd', ?'domestic', ?false)",
        "billing.define_plan(?'p1', ?'{\"mills\": {\"amount\": 1}}', ?'[]', ~NULL, ?10, ~NULL, ?0)",
        "billing.set_default_plan(?'p1')",
        "billing.retire_plan(?'p1')",
        "billing.sync_subscription(?'{}', ?'2027-01-01'::timestamptz, ?'stripe', ?'poll')",
        "billing.run_periodic(?10)",
        "billing.allowance_periods(?'2027-01-01'::timestamptz, ?'2027-02-01'::timestamptz)",
        "billing.subscription_access(~'active', ~false)",
        "billing.sync_invoice(?'{}', ?'2027-01-01'::timestamptz, ?'stripe')",
        "billing.lock_seats(?'a')",
        "billing.set_seats(?'a', ?1)",
        "billing.ack_seat_push(?1, ?1)",
        "billing.count_seats()",
        "billing.set_allowance(?'a', ?'mills', ?5, every => ?'day', time_zone => ?'UTC', keep_periods => ?1, priority => ?10, starts_at => ~NULL)",
        "billing.end_allowance(?'a', ?'mills')",
        "billing.convert_guest(?'guest:n', ?'a')",
        "billing.set_reload(?'a', ?'mills', ?500, ?'usd', ?'domestic', reload_to => ~NULL, reload_amount => ~100, min_amount => ?1, max_amount => ~NULL, min_interval => ?'0', max_per_day => ?10, requires_subscription => ?false, converted => ?false, credits_per_minor_unit => ?1, max_failures => ?3)",
        "billing.disable_reload(?'a', ?'mills')",
        "billing.resume_reload(?'a', ?'mills')",
        "billing.claim_reloads(?'w', lease => ?'1 minute', max_requests => ?1)",
        "billing.complete_reload(?1, ?'pi', ?100, ?'usd')",
        "billing.fail_reload(?1, ?'declined', retry => ?true, worker => ~NULL)",
        "billing.open_checkout(?'a', ?'mills', ?1000, ?'usd', ?'domestic', ?'k1', expires_in => ?'1 hour', converted => ?false, credits_per_minor_unit => ?1)",
        "billing.attach_checkout(?1, ?'cs_1')",
        "billing.confirm_checkout(?1, ?'pi', ?100, ?'usd')",
        "billing.fail_checkout(?1, ?'expired')",
        "billing.checkout_status(~1)",
        "billing.set_alert(?'a', ?'mills', ?'low', ?'low_balance', ~100)",
        "billing.remove_alert(?'a', ?'mills', ?'low')",
        "billing.ack_alert(?1, ~'ops')",
        "billing.reconcile_usage(?'{k}', ?'2027-01-01'::timestamptz, ?'2027-01-02'::timestamptz, only_meter => ~NULL, only_account => ~NULL)",
        "billing.reconcile_payments(?'[]', ?0)",
        "billing.audit_costs(?'[]', ?1, ?0)",
        "billing.set_grant_policy(?'mills', max_per_grant => ~NULL, max_per_day => ~NULL, approval_above => ~NULL, when_canceled => ?'allow')",
        "billing.remove_grant_policy(?'mills')",
        "billing.approve_grant(?1)",
        "billing.reject_grant(?1, ~'no')",
        "billing.metrics()",
    ];

    /// `call` with argument `n` (of those marked) set to NULL; None past the last.
    fn with_null(call: &str, n: usize) -> Option<(String, bool)> {
        let mut out = String::new();
        let mut seen = 0;
        let mut hit = None;
        let mut chars = call.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '?' || c == '~' {
                let mut arg = String::new();
                while let Some(&d) = chars.peek() {
                    if (d == ',' || d == ')') && arg.matches('\'').count().is_multiple_of(2) {
                        break;
                    }
                    arg.push(d);
                    chars.next();
                }
                if seen == n {
                    out.push_str("NULL");
                    hit = Some(c == '?');
                } else {
                    out.push_str(&arg);
                }
                seen += 1;
            } else {
                out.push(c);
            }
        }
        hit.map(|required| (out, required))
    }

    #[pg_test]
    fn every_required_argument_refuses_null_and_writes_nothing() {
        run("CREATE ROLE null_test_role NOLOGIN");
        run("SELECT billing.define_webhook_endpoint('e0', 'stripe', 's')");
        run("SELECT billing.define_meter('m0', 'mills')");
        let g = grant("a", "mills", 1000, "");
        let h: i64 = one("SELECT hold_id FROM billing.reserve('a', 'mills', 10)");
        let listed: i64 = one(
            "SELECT count(DISTINCT proname) FROM pg_proc WHERE pronamespace = 'billing'::regnamespace \
             AND has_function_privilege('billing_admin', oid, 'EXECUTE') AND proname <> 'current_tenant'",
        );
        assert_eq!(
            listed as usize,
            CALLS.len(),
            "every callable function is listed here"
        );
        for template in CALLS {
            let call = template
                .replace("$grant", &g.to_string())
                .replace("$hold", &h.to_string());
            let mut n = 0;
            while let Some((sql, required)) = with_null(&call, n) {
                let sql = format!("SELECT * FROM {sql}");
                if required {
                    assert_rejected(&sql, "22004");
                } else {
                    let state = sqlstate(&sql);
                    assert!(
                        !matches!(state.as_deref(), Some("XX000" | "22004")),
                        "{sql}: a NULL that means the default failed with {state:?}"
                    );
                }
                n += 1;
            }
        }
    }
}
