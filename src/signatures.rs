//! Webhook signature schemes, in plain Rust so every byte of them is unit-tested:
//!
//! * Stripe: `Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>…]`, HMAC-SHA256 of `"<t>.<body>"`.
//! * Standard Webhooks / Svix: `webhook-id`, `webhook-timestamp`, `webhook-signature:
//!   v1,<base64> [v1,<base64>…]` (or the `svix-*` names), key = base64 after `whsec_`,
//!   HMAC-SHA256 of `"<id>.<timestamp>.<body>"`.
//! * Generic (Metronome style): HMAC-SHA256 of `"<Date header>\n<body>"`, hex or base64 in
//!   a configurable header.
//!
//! Comparison is constant-time (`Mac::verify_slice`); every candidate signature is tried
//! with the current secret and then the previous one (rotation). A valid signature is then
//! checked for freshness against the database clock.

use std::collections::HashMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

pub const MAX_HEADER_BYTES: usize = 8 * 1024;
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Stripe,
    Standard,
    Generic,
}

impl Scheme {
    pub fn parse(s: &str) -> Option<Scheme> {
        match s {
            "stripe" => Some(Scheme::Stripe),
            "standard" => Some(Scheme::Standard),
            "generic" => Some(Scheme::Generic),
            _ => None,
        }
    }
}

/// Why an event was refused. The text is what gets recorded with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    MissingHeader(String),
    Malformed(String),
    BadSignature,
    Stale { age_seconds: i64 },
    Future { ahead_seconds: i64 },
    BadSecret(String),
    TooLarge(String),
}

impl Rejection {
    pub fn reason(&self) -> String {
        match self {
            Rejection::MissingHeader(h) => format!("missing header: {h}"),
            Rejection::Malformed(what) => format!("malformed header: {what}"),
            Rejection::BadSignature => {
                "bad signature: no signature matches the endpoint's secrets".into()
            }
            Rejection::Stale { age_seconds } => {
                format!("stale: signed {age_seconds} s ago, beyond the tolerance")
            }
            Rejection::Future { ahead_seconds } => {
                format!("future: signed {ahead_seconds} s ahead, beyond the tolerance")
            }
            Rejection::BadSecret(why) => format!("endpoint secret unusable: {why}"),
            Rejection::TooLarge(what) => format!("too large: {what}"),
        }
    }
}

/// What a verified delivery tells us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The provider's event id when the scheme carries it in a header.
    pub event_id: Option<String>,
    /// When the provider signed it, in Unix seconds.
    pub signed_at: i64,
}

/// Header names are case-insensitive; each keeps its first value.
pub struct Headers(HashMap<String, String>);

impl Headers {
    pub fn from_json(v: &serde_json::Value) -> Result<Headers, Rejection> {
        let obj = v
            .as_object()
            .ok_or_else(|| Rejection::Malformed("headers must be a JSON object".into()))?;
        let mut map = HashMap::new();
        for (k, v) in obj {
            let value = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(a) => a
                    .iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            if value.len() > MAX_HEADER_BYTES {
                return Err(Rejection::TooLarge(format!(
                    "header {k} exceeds {MAX_HEADER_BYTES} bytes"
                )));
            }
            map.entry(k.to_ascii_lowercase()).or_insert(value);
        }
        Ok(Headers(map))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(&name.to_ascii_lowercase()).map(String::as_str)
    }

    fn require(&self, names: &[&str]) -> Result<&str, Rejection> {
        names
            .iter()
            .find_map(|n| self.get(n))
            .ok_or_else(|| Rejection::MissingHeader(names[0].to_string()))
    }
}

/// The endpoint's configuration as far as verification is concerned.
pub struct Endpoint<'a> {
    pub scheme: Scheme,
    pub secret: &'a str,
    pub previous_secret: Option<&'a str>,
    pub tolerance_seconds: i64,
    /// Generic scheme only: the header that carries the signature.
    pub signature_header: &'a str,
}

pub fn verify(
    ep: &Endpoint<'_>,
    headers: &Headers,
    body: &str,
    now_unix: i64,
) -> Result<Verified, Rejection> {
    if body.len() > MAX_BODY_BYTES {
        return Err(Rejection::TooLarge(format!(
            "body exceeds {MAX_BODY_BYTES} bytes"
        )));
    }
    let verified = match ep.scheme {
        Scheme::Stripe => verify_stripe(ep, headers, body)?,
        Scheme::Standard => verify_standard(ep, headers, body)?,
        Scheme::Generic => verify_generic(ep, headers, body)?,
    };
    let age = now_unix - verified.signed_at;
    if age > ep.tolerance_seconds {
        return Err(Rejection::Stale { age_seconds: age });
    }
    if -age > ep.tolerance_seconds {
        return Err(Rejection::Future {
            ahead_seconds: -age,
        });
    }
    Ok(verified)
}

/// The secrets to try, current first; each as HMAC key bytes.
fn keys(
    ep: &Endpoint<'_>,
    decode: fn(&str) -> Result<Vec<u8>, Rejection>,
) -> Result<Vec<Vec<u8>>, Rejection> {
    let mut keys = vec![decode(ep.secret)?];
    if let Some(prev) = ep.previous_secret.filter(|p| !p.is_empty()) {
        keys.push(decode(prev)?);
    }
    Ok(keys)
}

fn raw_key(secret: &str) -> Result<Vec<u8>, Rejection> {
    if secret.is_empty() {
        return Err(Rejection::BadSecret("empty".into()));
    }
    Ok(secret.as_bytes().to_vec())
}

fn whsec_key(secret: &str) -> Result<Vec<u8>, Rejection> {
    let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
    B64.decode(b64)
        .ok()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| Rejection::BadSecret("not whsec_<base64>".into()))
}

/// Constant-time: true if any candidate signature is the HMAC of `payload` under any key.
fn any_matches(keys: &[Vec<u8>], payload: &[u8], candidates: &[Vec<u8>]) -> bool {
    let mut matched = false;
    for key in keys {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
        mac.update(payload);
        for sig in candidates {
            // no early exit: every candidate is compared
            matched |= mac.clone().verify_slice(sig).is_ok();
        }
    }
    matched
}

fn parse_unix(what: &str, s: &str) -> Result<i64, Rejection> {
    let s = s.trim();
    if s.is_empty() || s.len() > 12 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Rejection::Malformed(format!(
            "{what} is not a Unix timestamp"
        )));
    }
    s.parse()
        .map_err(|_| Rejection::Malformed(format!("{what} is not a Unix timestamp")))
}

fn verify_stripe(ep: &Endpoint<'_>, headers: &Headers, body: &str) -> Result<Verified, Rejection> {
    let header = headers.require(&["stripe-signature"])?;
    let mut t = None;
    let mut v1 = Vec::new();
    let mut undecodable = 0;
    for part in header.split(',') {
        let Some((k, v)) = part.trim().split_once('=') else {
            return Err(Rejection::Malformed(
                "Stripe-Signature element without '='".into(),
            ));
        };
        match k {
            "t" if t.is_none() => t = Some(parse_unix("Stripe-Signature t", v)?),
            "v1" => match hex::decode(v) {
                Ok(sig) => v1.push(sig),
                Err(_) => undecodable += 1,
            },
            _ => {}
        }
    }
    let t = t.ok_or_else(|| Rejection::Malformed("Stripe-Signature has no t=".into()))?;
    if v1.is_empty() {
        let why = if undecodable > 0 {
            "v1 is not hex"
        } else {
            "Stripe-Signature has no v1="
        };
        return Err(Rejection::Malformed(why.into()));
    }
    let payload = format!("{t}.{body}");
    if !any_matches(&keys(ep, raw_key)?, payload.as_bytes(), &v1) {
        return Err(Rejection::BadSignature);
    }
    Ok(Verified {
        event_id: None,
        signed_at: t,
    })
}

fn verify_standard(
    ep: &Endpoint<'_>,
    headers: &Headers,
    body: &str,
) -> Result<Verified, Rejection> {
    let id = headers.require(&["webhook-id", "svix-id"])?;
    let ts = headers.require(&["webhook-timestamp", "svix-timestamp"])?;
    let sig_header = headers.require(&["webhook-signature", "svix-signature"])?;
    if id.is_empty() || id.len() > 255 {
        return Err(Rejection::Malformed(
            "webhook-id must be 1-255 bytes".into(),
        ));
    }
    let signed_at = parse_unix("webhook-timestamp", ts)?;
    let mut sigs = Vec::new();
    let mut undecodable = 0;
    for entry in sig_header.split_whitespace() {
        match entry.split_once(',') {
            Some(("v1", b64)) => match B64.decode(b64) {
                Ok(sig) => sigs.push(sig),
                Err(_) => undecodable += 1,
            },
            Some(_) => {} // other versions (v1a…) are not ours to check
            None => {
                return Err(Rejection::Malformed(
                    "webhook-signature entry without a version".into(),
                ))
            }
        }
    }
    if sigs.is_empty() {
        let why = if undecodable > 0 {
            "v1 signature is not base64"
        } else {
            "webhook-signature has no v1 entry"
        };
        return Err(Rejection::Malformed(why.into()));
    }
    let payload = format!("{id}.{ts}.{body}");
    if !any_matches(&keys(ep, whsec_key)?, payload.as_bytes(), &sigs) {
        return Err(Rejection::BadSignature);
    }
    Ok(Verified {
        event_id: Some(id.to_string()),
        signed_at,
    })
}

fn verify_generic(ep: &Endpoint<'_>, headers: &Headers, body: &str) -> Result<Verified, Rejection> {
    let date = headers.require(&["date"])?;
    let sig = headers.require(&[ep.signature_header])?;
    let signed_at = httpdate::parse_http_date(date.trim())
        .map_err(|_| Rejection::Malformed("Date is not an HTTP date".into()))?
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| Rejection::Malformed("Date is before 1970".into()))?
        .as_secs() as i64;
    let sig = sig.trim();
    let decoded = hex::decode(sig)
        .ok()
        .filter(|s| s.len() == 32)
        .or_else(|| B64.decode(sig).ok())
        .ok_or_else(|| {
            Rejection::Malformed(format!("{} is neither hex nor base64", ep.signature_header))
        })?;
    let payload = format!("{date}\n{body}");
    if !any_matches(&keys(ep, raw_key)?, payload.as_bytes(), &[decoded]) {
        return Err(Rejection::BadSignature);
    }
    Ok(Verified {
        event_id: None,
        signed_at,
    })
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_614_265_330;

    fn hmac_hex(key: &[u8], msg: &str) -> String {
        let mut m = HmacSha256::new_from_slice(key).unwrap();
        m.update(msg.as_bytes());
        hex::encode(m.finalize().into_bytes())
    }

    fn ep(scheme: Scheme, secret: &str) -> Endpoint<'_> {
        Endpoint {
            scheme,
            secret,
            previous_secret: None,
            tolerance_seconds: 300,
            signature_header: "x-signature",
        }
    }

    fn headers(v: serde_json::Value) -> Headers {
        Headers::from_json(&v).unwrap()
    }

    // The published Standard Webhooks test vector.
    const STD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const STD_BODY: &str = r#"{"test": 2432232314}"#;
    fn std_headers(id: &str, ts: &str, sig: &str) -> Headers {
        headers(json!({"webhook-id": id, "webhook-timestamp": ts, "webhook-signature": sig}))
    }

    #[test]
    fn standard_webhooks_published_vector_verifies() {
        let h = std_headers(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        );
        let v = verify(&ep(Scheme::Standard, STD_SECRET), &h, STD_BODY, NOW).unwrap();
        assert_eq!(v.event_id.as_deref(), Some("msg_p5jXN8AQM9LWM0D4loKWxJek"));
        assert_eq!(v.signed_at, NOW);
        // svix-* names too
        let h = headers(
            json!({"svix-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "svix-timestamp": "1614265330",
                               "svix-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="}),
        );
        assert!(verify(&ep(Scheme::Standard, STD_SECRET), &h, STD_BODY, NOW).is_ok());
    }

    #[test]
    fn standard_webhooks_any_single_byte_change_fails() {
        let e = ep(Scheme::Standard, STD_SECRET);
        let (id, ts, sig) = (
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        );
        for i in 0..STD_BODY.len() {
            let mut b = STD_BODY.as_bytes().to_vec();
            b[i] ^= 0x01;
            let body = String::from_utf8(b).unwrap();
            assert_eq!(
                verify(&e, &std_headers(id, ts, &format!("v1,{sig}")), &body, NOW),
                Err(Rejection::BadSignature)
            );
        }
        for i in 0..id.len() {
            let mut b = id.as_bytes().to_vec();
            b[i] ^= 0x01;
            let id2 = String::from_utf8(b).unwrap();
            assert_eq!(
                verify(
                    &e,
                    &std_headers(&id2, ts, &format!("v1,{sig}")),
                    STD_BODY,
                    NOW
                ),
                Err(Rejection::BadSignature)
            );
        }
        let ts2 = "1614265331";
        assert_eq!(
            verify(
                &e,
                &std_headers(id, ts2, &format!("v1,{sig}")),
                STD_BODY,
                NOW
            ),
            Err(Rejection::BadSignature)
        );
        let raw = B64.decode(sig).unwrap();
        for i in 0..raw.len() {
            let mut s = raw.clone();
            s[i] ^= 0x01;
            let h = std_headers(id, ts, &format!("v1,{}", B64.encode(&s)));
            assert_eq!(verify(&e, &h, STD_BODY, NOW), Err(Rejection::BadSignature));
        }
    }

    #[test]
    fn standard_webhooks_several_signatures_and_rotation() {
        let good = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        let h = std_headers(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            &format!("v1,AAAA v1a,xyz {good}"),
        );
        assert!(verify(&ep(Scheme::Standard, STD_SECRET), &h, STD_BODY, NOW).is_ok());
        let rotated = Endpoint {
            previous_secret: Some(STD_SECRET),
            ..ep(Scheme::Standard, "whsec_bmV3LXNlY3JldC1rZXk=")
        };
        let h = std_headers("msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", good);
        assert!(
            verify(&rotated, &h, STD_BODY, NOW).is_ok(),
            "the previous secret still verifies"
        );
        let wrong = ep(Scheme::Standard, "whsec_bmV3LXNlY3JldC1rZXk=");
        assert_eq!(
            verify(&wrong, &h, STD_BODY, NOW),
            Err(Rejection::BadSignature)
        );
    }

    fn stripe_header(t: i64, body: &str, secret: &str) -> String {
        format!(
            "t={t},v1={}",
            hmac_hex(secret.as_bytes(), &format!("{t}.{body}"))
        )
    }

    #[test]
    fn stripe_signature_verifies_and_every_byte_matters() {
        let secret = "whsec_test_secret";
        let body = r#"{"id":"evt_1","type":"payment_intent.succeeded"}"#;
        let e = ep(Scheme::Stripe, secret);
        let h = stripe_header(NOW, body, secret);
        let ok = verify(&e, &headers(json!({"Stripe-Signature": h})), body, NOW).unwrap();
        assert_eq!(ok.signed_at, NOW);
        for i in 0..body.len() {
            let mut b = body.as_bytes().to_vec();
            b[i] ^= 0x01;
            let changed = String::from_utf8(b).unwrap();
            assert_eq!(
                verify(&e, &headers(json!({"stripe-signature": h})), &changed, NOW),
                Err(Rejection::BadSignature)
            );
        }
        let later = h.replacen(&format!("t={NOW}"), &format!("t={}", NOW + 1), 1);
        assert_eq!(
            verify(&e, &headers(json!({"stripe-signature": later})), body, NOW),
            Err(Rejection::BadSignature)
        );
        let sig = h.split("v1=").nth(1).unwrap();
        for i in 0..sig.len() {
            let mut s = sig.as_bytes().to_vec();
            s[i] = if s[i] == b'0' { b'1' } else { b'0' };
            let h2 = format!("t={NOW},v1={}", String::from_utf8(s).unwrap());
            assert_eq!(
                verify(&e, &headers(json!({"stripe-signature": h2})), body, NOW),
                Err(Rejection::BadSignature)
            );
        }
        assert_eq!(
            verify(
                &ep(Scheme::Stripe, "wrong"),
                &headers(json!({"stripe-signature": h})),
                body,
                NOW
            ),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn stripe_multiple_v1_and_rotation() {
        let body = "{}";
        let old = stripe_header(NOW, body, "old_secret");
        let new_sig = hmac_hex(b"new_secret", &format!("{NOW}.{body}"));
        let both = format!("{old},v1={new_sig},v0=ignored");
        assert!(verify(
            &ep(Scheme::Stripe, "new_secret"),
            &headers(json!({"stripe-signature": both})),
            body,
            NOW
        )
        .is_ok());
        let rotating = Endpoint {
            previous_secret: Some("old_secret"),
            ..ep(Scheme::Stripe, "new_secret")
        };
        assert!(verify(
            &rotating,
            &headers(json!({"stripe-signature": old})),
            body,
            NOW
        )
        .is_ok());
    }

    #[test]
    fn freshness_window_both_ways() {
        let body = "{}";
        let e = ep(Scheme::Stripe, "s");
        let at = |t: i64| headers(json!({"stripe-signature": stripe_header(t, body, "s")}));
        assert!(verify(&e, &at(NOW - 300), body, NOW).is_ok());
        assert!(verify(&e, &at(NOW + 300), body, NOW).is_ok());
        assert_eq!(
            verify(&e, &at(NOW - 301), body, NOW),
            Err(Rejection::Stale { age_seconds: 301 })
        );
        assert_eq!(
            verify(&e, &at(NOW + 301), body, NOW),
            Err(Rejection::Future { ahead_seconds: 301 })
        );
    }

    #[test]
    fn malformed_headers_are_named() {
        let e = ep(Scheme::Stripe, "s");
        let r = |v: serde_json::Value| verify(&e, &headers(v), "{}", NOW).unwrap_err();
        assert_eq!(
            r(json!({})),
            Rejection::MissingHeader("stripe-signature".into())
        );
        assert!(
            matches!(r(json!({"stripe-signature": "v1=00"})), Rejection::Malformed(m) if m.contains("no t="))
        );
        assert!(
            matches!(r(json!({"stripe-signature": "t=abc,v1=00"})), Rejection::Malformed(m) if m.contains("Unix"))
        );
        assert!(
            matches!(r(json!({"stripe-signature": "t=1614265330"})), Rejection::Malformed(m) if m.contains("no v1"))
        );
        assert!(
            matches!(r(json!({"stripe-signature": "t=1614265330,v1=zz"})), Rejection::Malformed(m) if m.contains("hex"))
        );
        assert!(matches!(
            r(json!({"stripe-signature": ""})),
            Rejection::Malformed(_)
        ));
        assert!(matches!(
            r(json!({"stripe-signature": "t=99999999999999999999,v1=00"})),
            Rejection::Malformed(_)
        ));
        let huge = "a".repeat(MAX_HEADER_BYTES + 1);
        assert!(matches!(
            Headers::from_json(&json!({"stripe-signature": huge})),
            Err(Rejection::TooLarge(_))
        ));
        let s = ep(Scheme::Standard, STD_SECRET);
        let bad64 = std_headers("msg_1", "1614265330", "v1,!!!");
        assert!(
            matches!(verify(&s, &bad64, "{}", NOW), Err(Rejection::Malformed(m)) if m.contains("base64"))
        );
        let bad_secret = ep(Scheme::Standard, "whsec_!!!");
        let h = std_headers("msg_1", "1614265330", "v1,AAAA");
        assert!(matches!(
            verify(&bad_secret, &h, "{}", NOW),
            Err(Rejection::BadSecret(_))
        ));
    }

    #[test]
    fn generic_hmac_over_date_and_body() {
        let date = "Thu, 25 Feb 2021 15:02:10 GMT"; // == NOW
        let body = r#"{"id":"evt_9","type":"invoice.finalized"}"#;
        let sig = hmac_hex(b"gen_secret", &format!("{date}\n{body}"));
        let e = ep(Scheme::Generic, "gen_secret");
        let h = headers(json!({"Date": date, "X-Signature": sig}));
        assert_eq!(verify(&e, &h, body, NOW).unwrap().signed_at, NOW);
        let b64 = B64.encode(hex::decode(&sig).unwrap());
        assert!(verify(
            &e,
            &headers(json!({"date": date, "x-signature": b64})),
            body,
            NOW
        )
        .is_ok());
        let other_date = "Thu, 25 Feb 2021 15:02:11 GMT";
        assert_eq!(
            verify(
                &e,
                &headers(json!({"date": other_date, "x-signature": sig})),
                body,
                NOW
            ),
            Err(Rejection::BadSignature)
        );
        assert!(matches!(
            verify(
                &e,
                &headers(json!({"date": "yesterday", "x-signature": sig})),
                body,
                NOW
            ),
            Err(Rejection::Malformed(_))
        ));
        let custom = Endpoint {
            signature_header: "metronome-webhook-signature",
            ..ep(Scheme::Generic, "gen_secret")
        };
        assert!(verify(
            &custom,
            &headers(json!({"date": date, "Metronome-Webhook-Signature": sig})),
            body,
            NOW
        )
        .is_ok());
    }
}
