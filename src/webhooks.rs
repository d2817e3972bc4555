//! The SQL face of webhook verification. The inbox, deduplication, ordering and
//! handlers live in sql/webhooks.sql; this is the part that must be exact bytes.

use pgrx::datum::TimestampWithTimeZone as Tstz;
use pgrx::prelude::*;

use crate::input::JsonArg;
use crate::signatures::{self, Endpoint, Headers, Scheme};
use crate::time;

/// Seconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_UNIX: i64 = 946_684_800;

fn now_unix() -> i64 {
    time::now().div_euclid(1_000_000) + PG_EPOCH_UNIX
}

fn unix_to_sql(secs: i64) -> Option<Tstz> {
    let micros = (secs - PG_EPOCH_UNIX).checked_mul(1_000_000)?;
    Tstz::try_from(micros).ok()
}

/// Verify one delivery against an endpoint's secrets at the database's now().
/// Never raises for a bad delivery: `valid` is false and `reason` says why.
#[allow(clippy::too_many_arguments)]
#[pg_extern(stable, parallel_safe)]
#[search_path(pg_catalog, billing, pg_temp)]
fn verify_webhook(
    scheme: &str,
    secret: &str,
    headers: JsonArg,
    body: &str,
    previous_secret: default!(Option<&str>, "NULL"),
    tolerance_seconds: default!(i32, "300"),
    signature_header: default!(&str, "'x-signature'"),
) -> TableIterator<
    'static,
    (
        name!(valid, bool),
        name!(reason, Option<String>),
        name!(event_id, Option<String>),
        name!(signed_at, Option<Tstz>),
    ),
> {
    let result = (|| {
        let scheme = Scheme::parse(scheme)
            .ok_or_else(|| signatures::Rejection::BadSecret(format!("unknown scheme {scheme}")))?;
        let endpoint = Endpoint {
            scheme,
            secret,
            previous_secret,
            tolerance_seconds: tolerance_seconds.max(0) as i64,
            signature_header,
        };
        let headers = headers
            .value("headers")
            .map_err(|e| signatures::Rejection::Malformed(e.to_string()))?;
        let headers = Headers::from_json(headers)?;
        signatures::verify(&endpoint, &headers, body, now_unix())
    })();
    TableIterator::once(match result {
        Ok(v) => (true, None, v.event_id, unix_to_sql(v.signed_at)),
        Err(r) => (false, Some(r.reason()), None, None),
    })
}
