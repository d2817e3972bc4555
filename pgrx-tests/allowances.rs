// Recurring allowances: credit per window that resets with no job running,
// counted by the gate before the window's grant exists and granted once
// when the pool is first used in it; windows cut at local boundaries (DST
// included), each instant in exactly one window; rollover by keeping a
// window's credit for several windows; lifetime allowances; rule changes
// at a boundary.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::pgrx_tests::support::*;

    fn grants(account: &str) -> i64 {
        one(&format!(
            "SELECT count(*) FROM billing.grants WHERE account = '{account}'"
        ))
    }

    fn spend(account: &str, n: i64, key: &str) -> Option<String> {
        sqlstate(&format!(
            "SELECT * FROM billing.ingest('{account}', 'requests', {n}, key => '{key}', strict => true)"
        ))
    }

    /// The windows of a rule of this shape that start by `at` and are
    /// still spendable then, as "start..expiry" in UTC.
    fn windows(every: &str, tz: &str, keep: i32, starts: &str, at: &str) -> String {
        one(&format!(
            "SELECT string_agg(to_char(w.starts_at AT TIME ZONE 'UTC', 'MM-DD HH24:MI') || '..' || \
                               coalesce(to_char(w.expires_at AT TIME ZONE 'UTC', 'MM-DD HH24:MI'), 'never'), ' ') \
             FROM billing.allowance_windows(ROW(1, 'default', 1, 'a', 'requests', 5, '{every}', '{tz}', {keep}, 10, \
                  '{starts}'::timestamptz, NULL, now(), NULL)::billing.allowances, '-infinity', '{at}'::timestamptz) w"
        ))
    }

    #[pg_test]
    fn a_refusal_says_when_the_allowance_refills() {
        run("SELECT billing.set_allowance('u', 'requests', 2, every => 'day', time_zone => 'Europe/Paris')");
        assert_eq!(spend("u", 2, "a1"), None);
        assert_eq!(
            one::<String>(
                "SELECT concat_ws(' ', allowed, reason, \
                        resets_at = (date_trunc('day', now() AT TIME ZONE 'Europe/Paris') + interval '1 day') \
                                    AT TIME ZONE 'Europe/Paris') \
                 FROM billing.check('u', 'requests', 1)"
            ),
            "f insufficient_credits t",
            "the next window of the allowance, midnight in Paris"
        );
        // allowed, or no allowance at all: no reset to name
        assert!(opt::<pgrx::datum::TimestampWithTimeZone>(
            "SELECT resets_at FROM billing.check('u', 'requests', 0)"
        )
        .is_none());
        grant("v", "requests", 1, "");
        assert!(opt::<pgrx::datum::TimestampWithTimeZone>(
            "SELECT resets_at FROM billing.check('v', 'requests', 5)"
        )
        .is_none());
    }

    #[pg_test]
    fn the_boundary_instant_belongs_to_the_window_it_starts() {
        let day = |at| windows("day", "UTC", 1, "2026-03-01 10:00+00", at);
        assert_eq!(
            day("2026-03-01 10:00+00"),
            "03-01 10:00..03-02 00:00",
            "the rule's first window starts with it"
        );
        assert_eq!(
            day("2026-03-01 23:59:59.999999+00"),
            "03-01 10:00..03-02 00:00"
        );
        assert_eq!(day("2026-03-02 00:00+00"), "03-02 00:00..03-03 00:00");
        let month = |at| windows("month", "UTC", 1, "2026-01-31 00:00+00", at);
        assert_eq!(month("2026-02-28 23:00+00"), "02-01 00:00..03-01 00:00");
        let week = |at| windows("week", "UTC", 1, "2026-03-01 00:00+00", at);
        assert_eq!(
            week("2026-03-04 12:00+00"),
            "03-02 00:00..03-09 00:00",
            "weeks start on Monday"
        );
        let never = |at| windows("never", "UTC", 1, "2026-03-01 00:00+00", at);
        assert_eq!(never("2030-01-01 00:00+00"), "03-01 00:00..never");
    }

    #[pg_test]
    fn a_day_across_a_dst_change_runs_from_local_midnight_to_local_midnight() {
        // Europe/Paris springs forward on 29 March 2026 (23 hours) and falls back on 25 October (25 hours)
        let paris = |at| windows("day", "Europe/Paris", 1, "2026-03-01 00:00+01", at);
        assert_eq!(paris("2026-03-29 12:00+02"), "03-28 23:00..03-29 22:00");
        assert_eq!(paris("2026-10-25 12:00+01"), "10-24 22:00..10-25 23:00");
        // New York falls back on 1 November 2026: 01:00-02:00 local happens twice, as two hour windows
        let ny = |at| windows("hour", "America/New_York", 1, "2026-10-01 00:00-04", at);
        assert_eq!(ny("2026-11-01 05:30+00"), "11-01 05:00..11-01 06:00");
        assert_eq!(ny("2026-11-01 06:30+00"), "11-01 06:00..11-01 07:00");
        let limit_window: String = one(
            "SELECT to_char(starts_at AT TIME ZONE 'UTC', 'HH24:MI') || '..' || to_char(ends_at AT TIME ZONE 'UTC', 'HH24:MI') \
             FROM billing.window_of('hour', 'America/New_York', '2026-11-01 05:30+00')",
        );
        assert_eq!(limit_window, "05:00..06:00", "the window holds the instant");
        // a day in UTC ignores the change
        let utc = |at| windows("day", "UTC", 1, "2026-03-01 00:00+00", at);
        assert_eq!(utc("2026-03-29 12:00+02"), "03-29 00:00..03-30 00:00");
    }

    #[pg_test]
    fn keeping_a_windows_credit_rolls_it_over_and_no_longer() {
        let kept = |at| windows("day", "UTC", 2, "2026-03-01 00:00+00", at);
        assert_eq!(
            kept("2026-03-03 08:00+00"),
            "03-02 00:00..03-04 00:00 03-03 00:00..03-05 00:00",
            "yesterday's credit and today's"
        );
    }

    #[pg_test]
    fn a_daily_allowance_resets_at_the_boundary_without_a_job() {
        let set: String =
            one("SELECT status FROM billing.set_allowance('a', 'requests', 20, every => 'day')");
        assert_eq!(set, "set");
        assert_eq!(grants("a"), 1, "today's window is granted at once");
        assert_eq!(available("a", "requests"), 20);
        assert_eq!(spend("a", 15, "r1"), None);
        assert_eq!(
            spend("a", 6, "r2").as_deref(),
            Some("23514"),
            "5 left today"
        );
        travel("a", "1 day");
        // a new day: yesterday's 5 expired, today's 20 are owed before any grant exists
        assert_eq!(grants("a"), 1);
        assert_eq!(available("a", "requests"), 20);
        let allowed: bool = one("SELECT allowed FROM billing.check('a', 'requests', 20)");
        assert!(allowed);
        assert_eq!(spend("a", 20, "r3"), None);
        assert_eq!(grants("a"), 2, "used, the window's grant exists");
        assert_eq!(available("a", "requests"), 0);
        assert_eq!(spend("a", 1, "r4").as_deref(), Some("23514"));
        let key: String =
            one("SELECT key FROM billing.grants WHERE account = 'a' ORDER BY id DESC LIMIT 1");
        assert!(key.starts_with("billing:allowance:"), "{key}");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn an_idle_account_is_owed_only_the_running_windows() {
        run("SELECT billing.set_allowance('a', 'requests', 10, every => 'day', keep_periods => 2)");
        travel("a", "10 days");
        // ten windows passed unused: only yesterday's (kept two days) and today's count
        assert_eq!(available("a", "requests"), 20);
        assert_eq!(spend("a", 1, "r1"), None);
        assert_eq!(grants("a"), 3, "the first window, yesterday's and today's");
        assert_eq!(available("a", "requests"), 19);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_guests_lifetime_allowance_never_resets() {
        run("SELECT billing.set_allowance('guest:abc', 'requests', 5, every => 'never')");
        assert_eq!(spend("guest:abc", 5, "g1"), None);
        assert_eq!(spend("guest:abc", 1, "g2").as_deref(), Some("23514"));
        travel("guest:abc", "400 days");
        assert_eq!(available("guest:abc", "requests"), 0);
        assert_eq!(spend("guest:abc", 1, "g3").as_deref(), Some("23514"));
        assert_eq!(grants("guest:abc"), 1);
    }

    #[pg_test]
    fn a_changed_rule_takes_over_at_the_next_boundary() {
        run("SELECT billing.set_allowance('a', 'requests', 20, every => 'day')");
        let same: String =
            one("SELECT status FROM billing.set_allowance('a', 'requests', 20, every => 'day')");
        assert_eq!(same, "unchanged");
        let takes_over: bool = one(
            "SELECT starts_at = date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' + interval '1 day' \
             FROM billing.set_allowance('a', 'requests', 50, every => 'day')",
        );
        assert!(takes_over, "from tomorrow");
        assert_eq!(available("a", "requests"), 20, "today keeps its 20");
        travel("a", "1 day");
        assert_eq!(available("a", "requests"), 50);
        run("SELECT billing.end_allowance('a', 'requests')");
        assert_eq!(
            available("a", "requests"),
            50,
            "today's window keeps its credit"
        );
        travel("a", "1 day");
        assert_eq!(available("a", "requests"), 0, "ended: nothing more");
        assert_eq!(spend("a", 1, "r1").as_deref(), Some("23514"));
        assert_ledger_consistent();
    }

    #[pg_test]
    fn allowance_credit_is_spent_before_bought_credit() {
        grant("a", "requests", 100, ", kind => 'topup'");
        run("SELECT billing.set_allowance('a', 'requests', 10, every => 'day')");
        assert_eq!(spend("a", 12, "r1"), None);
        let left: String = one(
            "SELECT string_agg(kind || ':' || remaining, ',' ORDER BY priority) FROM billing.grant_balances WHERE account = 'a'",
        );
        assert_eq!(left, "plan:0,topup:98");
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_bad_allowance_is_refused_and_writes_nothing() {
        let before = footprint();
        for call in [
            "billing.set_allowance('a', 'requests', 0)",
            "billing.set_allowance('a', 'requests', 5, every => 'fortnight')",
            "billing.set_allowance('a', 'requests', 5, time_zone => 'Mars/Olympus')",
            "billing.set_allowance('a', 'requests', 5, keep_periods => 0)",
            "billing.set_allowance('a', 'requests', 5, starts_at => now() - interval '1 second')",
        ] {
            assert_rejected(&format!("SELECT * FROM {call}"), "22023");
        }
        assert_eq!(footprint(), before);
    }

    #[pg_test]
    fn a_guest_converted_on_sign_up_never_gets_the_free_allowance_twice() {
        run("SELECT billing.set_allowance('guest:d1', 'requests', 5, every => 'never')");
        assert_eq!(spend("guest:d1", 3, "g1"), None);
        let moved: String =
            one("SELECT string_agg(unit || ':' || moved || ':' || status, ',') FROM billing.convert_guest('guest:d1', 'user_7')");
        assert_eq!(moved, "requests:2:converted");
        assert_eq!(available("guest:d1", "requests"), 0);
        assert_eq!(
            available("user_7", "requests"),
            2,
            "what the guest had left"
        );
        // the sign-up code gives every new user the same lifetime allowance: it is the guest's
        let again: String = one(
            "SELECT status FROM billing.set_allowance('user_7', 'requests', 5, every => 'never')",
        );
        assert_eq!(again, "unchanged");
        assert_eq!(available("user_7", "requests"), 2);
        assert_eq!(spend("user_7", 2, "u1"), None);
        assert_eq!(spend("user_7", 1, "u2").as_deref(), Some("23514"));
        let replay: String = one("SELECT status FROM billing.convert_guest('guest:d1', 'user_7')");
        assert_eq!(replay, "duplicate");
        // the device signed out again: the converted guest gets no new free allowance
        assert_rejected(
            "SELECT * FROM billing.set_allowance('guest:d1', 'requests', 5, every => 'never')",
            "55000",
        );
        assert_eq!(available("guest:d1", "requests"), 0);
        assert_rejected(
            "SELECT * FROM billing.convert_guest('guest:d1', 'user_8')",
            "55000",
        );
        assert_rejected(
            "SELECT * FROM billing.convert_guest('user_7', 'user_7')",
            "22023",
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_converted_guests_daily_allowance_carries_on_for_the_account() {
        run("SELECT billing.set_allowance('guest:d2', 'requests', 20, every => 'day')");
        travel("guest:d2", "1 day");
        // the guest's window of today is owed, not granted: conversion grants and moves it
        assert_eq!(spend("guest:d2", 0, "g0"), None);
        assert_eq!(spend("guest:d2", 5, "g1"), None);
        let moved: i64 = one("SELECT moved FROM billing.convert_guest('guest:d2', 'user_9')");
        assert_eq!(moved, 15);
        assert_eq!(
            available("user_9", "requests"),
            15,
            "today's window is not granted again"
        );
        travel("user_9", "1 day");
        assert_eq!(
            available("user_9", "requests"),
            20,
            "the next day is the account's"
        );
        assert_ledger_consistent();
    }

    #[pg_test]
    fn replacing_a_rule_that_has_not_started_never_grants_a_window_twice() {
        run("SELECT billing.set_allowance('a', 'requests', 20, every => 'day')");
        run("SELECT billing.set_allowance('a', 'requests', 50, every => 'day')");
        let again: String =
            one("SELECT status FROM billing.set_allowance('a', 'requests', 50, every => 'day')");
        assert_eq!(again, "unchanged", "the pending rule is the same");
        let from_tomorrow: bool = one(
            "SELECT starts_at = date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' + interval '1 day' \
             FROM billing.set_allowance('a', 'requests', 30, every => 'day')",
        );
        assert!(
            from_tomorrow,
            "it replaces the pending rule where it would have started"
        );
        assert_eq!(
            available("a", "requests"),
            20,
            "today is still the first rule's"
        );
        travel("a", "1 day");
        assert_eq!(available("a", "requests"), 30);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn a_replayed_call_that_opens_a_window_leaves_the_ledger_whole() {
        run("SELECT billing.set_allowance('a', 'requests', 20, every => 'day')");
        grant("a", "requests", 5, ", kind => 'topup', key => 'pi_1'");
        travel("a", "1 day");
        // the first call of the day is a replay: it returns early, the window's grant is still whole
        grant("a", "requests", 5, ", kind => 'topup', key => 'pi_1'");
        assert_eq!(available("a", "requests"), 25);
        assert_ledger_consistent();
    }

    #[pg_test]
    fn allowances_and_split_pools_refuse_each_other() {
        run("SELECT billing.set_allowance('a', 'requests', 20, every => 'day')");
        assert_rejected("SELECT billing.set_lanes('a', 'requests', 4)", "55000");
        grant("b", "requests", 100, "");
        run("SELECT billing.set_lanes('b', 'requests', 4)");
        assert_rejected(
            "SELECT * FROM billing.set_allowance('b', 'requests', 20, every => 'day')",
            "55000",
        );
    }
}
