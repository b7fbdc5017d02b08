//! Every token case from the issue, and proof that a refused request reaches no upstream.

use uuid::Uuid;

use crate::keys::ES_KID;
use crate::support::{Options, TestEnv, ALLOWED_ORIGIN};

/// Sends `/echo` with `token` and checks the status; a 401 must carry the challenge and a
/// JSON error body.
async fn check(env: &TestEnv, name: &str, token: &str, expected: u16) {
    check_reason(env, name, token, expected, None).await;
}

/// As [`check`], and a refusal's `message` is exactly `reason`: a short stable sentence,
/// never the JWT library's or serde's wording.
async fn check_reason(env: &TestEnv, name: &str, token: &str, expected: u16, reason: Option<&str>) {
    let response = env.get("/echo", token).send().await.expect("request");
    let status = response.status().as_u16();
    let challenge = response.headers().get("www-authenticate").cloned();
    let body = response.text().await.expect("body");
    assert_eq!(status, expected, "{name}: {body}");
    if expected == 401 {
        assert!(
            challenge.is_some_and(|c| c.to_str().is_ok_and(|c| c.starts_with("Bearer"))),
            "{name}: challenge"
        );
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON error body");
        assert_eq!(json["error"], "invalid_token", "{name}");
        assert!(!body.contains(token), "{name}: the token is echoed back");
        if let Some(reason) = reason {
            assert_eq!(json["message"], reason, "{name}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_cases() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let keys = &env.keys;
    let user = Uuid::new_v4();
    let stranger = Uuid::new_v4();
    let valid = keys.claims(user);
    let with = |key: &str, value: serde_json::Value| {
        let mut claims = keys.claims(stranger);
        claims[key] = value;
        claims
    };

    // The first requests signed with a JWKS key arrive together: one fetch serves them all.
    let es256 = std::sync::Arc::new(keys.es256(&valid, ES_KID));
    let (http, url) = (env.http.clone(), format!("{}/echo", env.base));
    let statuses = crate::support::concurrently(20, |_| {
        let (http, url, token) = (http.clone(), url.clone(), es256.clone());
        async move { http.get(url).bearer_auth(&*token).send().await.expect("request").status() }
    })
    .await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(env.jwks.fetches.load(std::sync::atomic::Ordering::SeqCst), 1);

    // Accepted: the legacy secret, the JWKS keys, and `aud` as an array.
    check(&env, "valid HS256", &keys.hs256(&valid), 200).await;
    check(&env, "valid ES256 from JWKS", &keys.es256(&valid, ES_KID), 200).await;
    check(&env, "valid RS256 from JWKS", &keys.rs256(&valid), 200).await;
    let array_aud = {
        let mut claims = valid.clone();
        claims["aud"] = serde_json::json!(["authenticated", "other"]);
        claims
    };
    check(&env, "aud as an array", &keys.hs256(&array_aud), 200).await;

    // Refused, all for the stranger, who must never get a machine.
    let hour_ago = chrono::Utc::now().timestamp() - 3600;
    let cases: Vec<(&str, String, &str)> = vec![
        ("expired", keys.hs256(&with("exp", hour_ago.into())), "token expired"),
        ("wrong aud", keys.hs256(&with("aud", "anon".into())), "token claims invalid"),
        (
            "wrong iss",
            keys.hs256(&with("iss", "https://abcdefgh.supabase.co/auth/v1/".into())),
            "token claims invalid",
        ),
        ("alg none", keys.unsigned(&keys.claims(stranger)), "token malformed"),
        (
            "HS256 signed with the RSA public key",
            keys.hs256_with_rsa_public_key(&keys.claims(stranger)),
            "token signature invalid",
        ),
        (
            "unknown kid",
            keys.es256(&keys.claims(stranger), "no-such-kid"),
            "token signing key unknown",
        ),
        ("role anon", keys.hs256(&with("role", "anon".into())), "token claims invalid"),
        (
            "anonymous user",
            keys.hs256(&with("is_anonymous", true.into())),
            "anonymous users are not allowed",
        ),
        ("sub not a UUID", keys.hs256(&with("sub", "admin".into())), "token claims invalid"),
        (
            "sub the nil UUID",
            keys.hs256(&with("sub", Uuid::nil().to_string().into())),
            "token claims invalid",
        ),
        (
            "missing exp",
            {
                let mut claims = keys.claims(stranger);
                claims.as_object_mut().expect("object").remove("exp");
                keys.hs256(&claims)
            },
            "token claims invalid",
        ),
        (
            "missing sub",
            {
                let mut claims = keys.claims(stranger);
                claims.as_object_mut().expect("object").remove("sub");
                keys.hs256(&claims)
            },
            "token claims invalid",
        ),
        ("oversized", keys.hs256(&with("pad", "x".repeat(9 * 1024).into())), "token too large"),
        ("garbage", "not.a.jwt".to_owned(), "token malformed"),
    ];
    for (name, token, reason) in &cases {
        check_reason(&env, name, token, 401, Some(reason)).await;
    }

    // No token at all, and a token in the query string, are both refused.
    let response = env.http.get(format!("{}/echo", env.base)).send().await.expect("request");
    assert_eq!(response.status(), 401);
    let url = format!("{}/echo?access_token={}", env.base, keys.hs256(&keys.claims(stranger)));
    assert_eq!(env.http.get(url).send().await.expect("request").status(), 401);

    // The refused requests reached no upstream: the stranger has no machine, only one was
    // ever created, and the user's daemon saw exactly the 24 accepted requests.
    assert!(env.machines_of(stranger).await.is_empty());
    assert_eq!(env.count("create").await, 1);
    let machine = env.machine_of(user).await;
    assert_eq!(env.served(&machine).await, 24);

    // Unknown kids cost at most one JWKS refetch per cooldown, however many arrive.
    let before = env.jwks.fetches.load(std::sync::atomic::Ordering::SeqCst);
    for i in 0..20 {
        check(&env, "random kid", &keys.es256(&valid, &format!("kid-{i}")), 401).await;
    }
    let after = env.jwks.fetches.load(std::sync::atomic::Ordering::SeqCst);
    assert!(after - before <= 1, "{} JWKS fetches for 20 unknown kids", after - before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_cookie_needs_an_allowed_origin() {
    use base64::Engine;
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let user = Uuid::new_v4();
    let session = serde_json::json!({"access_token": env.token(user), "refresh_token": "r"});
    let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(session.to_string());
    let cookie = format!("sb-abcdefgh-auth-token=base64-{encoded}");
    let send = |origin: Option<&str>| {
        let mut request = env.http.get(format!("{}/echo", env.base)).header("cookie", &cookie);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        request.send()
    };

    assert_eq!(send(Some("https://evil.example")).await.expect("request").status(), 403);
    assert_eq!(send(None).await.expect("request").status(), 403);
    assert!(env.machines_of(user).await.is_empty(), "a cross-site request provisioned a machine");

    let response = send(Some(ALLOWED_ORIGIN)).await.expect("request");
    assert_eq!(response.status(), 200);
    let echo: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(echo["user_id"], user.to_string());
    // The session cookie is the user's credential: it never reaches the daemon.
    let headers = echo["headers"].as_array().expect("headers");
    assert!(headers.iter().all(|h| h[0] != "cookie"));
}
