//! What the client may not pass on, and CORS for the browser app on an allowed origin.

use base64::Engine;
use uuid::Uuid;

use crate::support::{Options, TestEnv, ALLOWED_ORIGIN};

const FOREIGN_ORIGIN: &str = "https://evil.example";

/// A session cookie for `user`, as `@supabase/ssr` writes it.
pub fn session_cookie(env: &TestEnv, user: Uuid) -> String {
    let session = serde_json::json!({"access_token": env.token(user), "refresh_token": "r"});
    let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(session.to_string());
    format!("sb-abcdefgh-auth-token=base64-{encoded}")
}

fn cors_headers(response: &reqwest::Response) -> Vec<(String, String)> {
    response
        .headers()
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("access-control-"))
        .map(|(n, v)| (n.to_string(), v.to_str().expect("ascii").to_owned()))
        .collect()
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).map(|v| v.to_str().expect("ascii"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fly_headers_from_the_client_are_not_forwarded() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let user = Uuid::new_v4();
    let response = env
        .get("/echo", &env.token(user))
        .header("fly-client-ip", "6.6.6.6")
        .header("Fly-Forwarded-Port", "80")
        .header("fly-region", "evil")
        .header("fly_request_id", "spoofed")
        .header("accept", "application/json")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let echo: serde_json::Value = response.json().await.expect("JSON");
    let headers = echo["headers"].as_array().expect("headers");
    let names: Vec<&str> = headers.iter().map(|h| h[0].as_str().expect("name")).collect();
    assert!(names.iter().all(|n| !n.starts_with("fly")), "{names:?}");
    assert!(names.contains(&"accept"), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_grants_only_the_allowed_origin() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let user = Uuid::new_v4();
    let preflight = |origin: &str| {
        env.http
            .request(reqwest::Method::OPTIONS, format!("{}/events", env.base))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "last-event-id, content-type")
            .send()
    };

    // The preflight carries no credentials; the router answers it without a daemon.
    let response = preflight(ALLOWED_ORIGIN).await.expect("preflight");
    assert_eq!(response.status(), 204);
    assert_eq!(header(&response, "access-control-allow-origin"), Some(ALLOWED_ORIGIN));
    assert_eq!(header(&response, "access-control-allow-credentials"), Some("true"));
    let methods = header(&response, "access-control-allow-methods").expect("allowed methods");
    assert!(methods.contains("GET") && methods.contains("POST"), "{methods}");
    assert_eq!(
        header(&response, "access-control-allow-headers"),
        Some("last-event-id, content-type")
    );
    assert_eq!(header(&response, "vary"), Some("Origin"));

    let response = preflight(FOREIGN_ORIGIN).await.expect("preflight");
    assert_eq!(cors_headers(&response), vec![], "a foreign origin got CORS headers");
    assert!(env.machines_of(user).await.is_empty(), "a preflight provisioned a machine");

    // The actual cookie-authenticated request carries the same grant.
    let cookie = session_cookie(&env, user);
    let send = |origin: &str| {
        let url = format!("{}/echo", env.base);
        env.http.get(url).header("cookie", &cookie).header("origin", origin).send()
    };
    let response = send(ALLOWED_ORIGIN).await.expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "access-control-allow-origin"), Some(ALLOWED_ORIGIN));
    assert_eq!(header(&response, "access-control-allow-credentials"), Some("true"));
    assert_eq!(header(&response, "vary"), Some("Origin"));

    // A foreign origin: cookie authentication refused, and nothing the browser could read.
    let response = send(FOREIGN_ORIGIN).await.expect("request");
    assert_eq!(response.status(), 403);
    assert_eq!(cors_headers(&response), vec![]);
}
