//! The HTTP face of the emulator: Fly's `/v1` routes and the `/_emulator/` controls.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::controls::{Fault, SettingsPatch, Stats};
use super::engine::{is_app_name, Engine};
use super::error::ApiError;
use super::rate::Limiter;
use crate::client::LEASE_NONCE_HEADER;
use crate::types::{
    parse_go_duration, CreateAppRequest, CreateMachineRequest, CreateVolumeRequest, LeaseRequest,
    MachineState, StopConfig, UpdateMachineRequest, WaitState,
};

/// The largest request body the emulator reads.
const MAX_BODY: usize = 1 << 20;

/// Fly's default lease TTL when the request names none.
const DEFAULT_LEASE_TTL: u64 = 30;

type Answer = Response<Full<Bytes>>;

/// The API server's shared state.
pub(crate) struct Api {
    pub engine: Arc<Engine>,
    /// The token clients must send, as `Bearer` or `FlyV1`.
    token: String,
    stats: Mutex<Stats>,
    faults: Mutex<Vec<Fault>>,
    limiter: Mutex<Limiter>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One `/v1` call, parsed from the method and path.
#[derive(Debug, Default)]
struct Route {
    /// The action name used by stats, faults and rate limits.
    action: &'static str,
    app: String,
    /// Machine or volume id.
    id: Option<String>,
    /// Metadata key.
    key: Option<String>,
}

impl Route {
    fn parse(method: &Method, segments: &[&str]) -> Option<Self> {
        let route = |action, app: &str, id: Option<&str>, key: Option<&str>| Route {
            action,
            app: app.to_owned(),
            id: id.map(str::to_owned),
            key: key.map(str::to_owned),
        };
        let m = method.as_str();
        if segments.iter().any(|segment| segment.is_empty()) {
            return None;
        }
        if let ["v1", "apps", app, ..] = segments {
            if !is_app_name(app) {
                return None;
            }
        }
        Some(match segments {
            ["v1", "apps"] if m == "POST" => route("app_create", "", None, None),
            ["v1", "apps", app] if m == "GET" => route("app_get", app, None, None),
            ["v1", "apps", app, "machines"] => match m {
                "POST" => route("create", app, None, None),
                "GET" => route("list", app, None, None),
                _ => return None,
            },
            ["v1", "apps", app, "machines", id] => match m {
                "GET" => route("get", app, Some(id), None),
                "POST" => route("update", app, Some(id), None),
                "DELETE" => route("delete", app, Some(id), None),
                _ => return None,
            },
            ["v1", "apps", app, "machines", id, verb] => {
                let action = match (m, *verb) {
                    ("POST", "start") => "start",
                    ("POST", "stop") => "stop",
                    ("POST", "suspend") => "suspend",
                    ("GET", "wait") => "wait",
                    ("POST", "lease") => "lease_acquire",
                    ("GET", "lease") => "lease_get",
                    ("DELETE", "lease") => "lease_release",
                    ("GET", "metadata") => "metadata_get",
                    ("GET", "events") => "events",
                    _ => return None,
                };
                route(action, app, Some(id), None)
            }
            ["v1", "apps", app, "machines", id, "metadata", key] => match m {
                "POST" => route("metadata_set", app, Some(id), Some(key)),
                "DELETE" => route("metadata_delete", app, Some(id), Some(key)),
                _ => return None,
            },
            ["v1", "apps", app, "volumes"] => match m {
                "POST" => route("volume_create", app, None, None),
                "GET" => route("volume_list", app, None, None),
                _ => return None,
            },
            ["v1", "apps", app, "volumes", id] => match m {
                "GET" => route("volume_get", app, Some(id), None),
                "DELETE" => route("volume_delete", app, Some(id), None),
                _ => return None,
            },
            _ => return None,
        })
    }
}

/// A parsed request: route, query, nonce and body.
struct Call {
    route: Route,
    query: Vec<(String, String)>,
    nonce: Option<String>,
    body: Bytes,
}

impl Call {
    fn query(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.query(name), Some("true" | "1"))
    }

    fn id(&self) -> &str {
        self.route.id.as_deref().unwrap_or_default()
    }

    fn nonce(&self) -> Option<&str> {
        self.nonce.as_deref()
    }

    /// The JSON object body, Go type `go_type` on Fly; an empty body (or `null`) reads as
    /// `default`. Like Go's decoder, anything but an object is refused, where serde would
    /// read an array as a struct's fields.
    fn json<T: DeserializeOwned>(&self, default: Option<T>, go_type: &str) -> Result<T, ApiError> {
        let empty = self.body.iter().all(u8::is_ascii_whitespace);
        let value: Value = if empty {
            Value::Null
        } else {
            serde_json::from_slice(&self.body)
                .map_err(|e| ApiError::invalid_argument(format!("json: {e}")))?
        };
        let kind = match &value {
            Value::Object(_) => None,
            Value::Null => match default {
                Some(default) => return Ok(default),
                None if empty => return Err(ApiError::invalid_argument("json: empty body")),
                None => None,
            },
            Value::Array(_) => Some("array"),
            Value::String(_) => Some("string"),
            Value::Number(_) => Some("number"),
            Value::Bool(_) => Some("bool"),
        };
        if let Some(kind) = kind {
            return Err(ApiError::invalid_argument(format!(
                "json: cannot unmarshal {kind} into Go value of type {go_type}"
            )));
        }
        serde_json::from_value(value).map_err(|e| ApiError::invalid_argument(format!("json: {e}")))
    }
}

fn parse_query(query: Option<&str>) -> Vec<(String, String)> {
    let Some(query) = query else { return Vec::new() };
    let Ok(url) = reqwest::Url::parse(&format!("http://emulator/?{query}")) else {
        return Vec::new();
    };
    url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

fn answer(status: StatusCode, body: Option<Value>) -> Answer {
    let mut response = Response::new(Full::new(match &body {
        Some(body) => Bytes::from(body.to_string()),
        None => Bytes::new(),
    }));
    *response.status_mut() = status;
    if body.is_some() {
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    response
}

fn error_answer(error: &ApiError) -> Answer {
    answer(error.status, Some(error.body()))
}

fn to_value<T: serde::Serialize>(value: T) -> Result<Value, ApiError> {
    serde_json::to_value(value).map_err(|e| ApiError::internal(format!("encoding: {e}")))
}

impl Api {
    pub fn new(engine: Arc<Engine>, token: &str) -> Self {
        let token = token.strip_prefix("FlyV1 ").unwrap_or(token);
        Self {
            engine,
            token: token.to_owned(),
            stats: Mutex::new(Stats::new()),
            faults: Mutex::new(Vec::new()),
            limiter: Mutex::new(Limiter::default()),
        }
    }

    /// Whether an `Authorization` value carries the token; the scheme is case-insensitive
    /// (RFC 7235).
    fn accepts(&self, authorization: &str) -> bool {
        let Some((scheme, token)) = authorization.trim().split_once(' ') else { return false };
        let known = ["Bearer", "FlyV1"].iter().any(|s| s.eq_ignore_ascii_case(scheme));
        known && token.trim_start() == self.token
    }

    /// Serves one request; never fails (errors become Fly-shaped answers).
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Result<Answer, Infallible> {
        let path = request.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        if segments.first() == Some(&"_emulator") {
            return Ok(self.controls(request, &segments).await);
        }
        Ok(self.api(request, &segments).await)
    }

    async fn api(&self, request: Request<Incoming>, segments: &[&str]) -> Answer {
        let authorized = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| self.accepts(v));
        if !authorized {
            return error_answer(&ApiError::unauthenticated());
        }
        let Some(route) = Route::parse(request.method(), segments) else {
            let text = format!("no route for {} /{}", request.method(), segments.join("/"));
            return error_answer(&ApiError::not_found(text));
        };
        *lock(&self.stats).entry(route.action.to_owned()).or_default() += 1;

        let fault = self.take_fault(&route);
        if let Some(fault) = fault.as_ref().filter(|f| !f.after) {
            return fault_answer(fault);
        }
        if let Some(limited) = self.rate_limited(&route) {
            return limited;
        }

        let query = parse_query(request.uri().query());
        let nonce = request
            .headers()
            .get(LEASE_NONCE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => return error_answer(&body_error(e.as_ref())),
        };
        let call = Call { route, query, nonce, body };

        let result = self.dispatch(&call).await;
        if let (Some(fault), Ok(_)) = (&fault, &result) {
            return fault_answer(fault);
        }
        match result {
            Ok((status, body)) => answer(status, body),
            Err(error) => {
                tracing::debug!(
                    action = call.route.action,
                    status = %error.status,
                    error = %error.error,
                    "answering an error"
                );
                error_answer(&error)
            }
        }
    }

    /// The first matching injected fault, consumed.
    fn take_fault(&self, route: &Route) -> Option<Fault> {
        let mut faults = lock(&self.faults);
        let position = faults.iter().position(|f| {
            f.action == route.action
                && f.machine_id.as_ref().is_none_or(|m| Some(m) == route.id.as_ref())
        })?;
        let fault = faults[position].clone();
        faults[position].count -= 1;
        if faults[position].count == 0 {
            faults.remove(position);
        }
        Some(fault)
    }

    fn rate_limited(&self, route: &Route) -> Option<Answer> {
        let limit = self.engine.settings().rate_limit?;
        let key = route.id.as_deref().unwrap_or(&route.app);
        if lock(&self.limiter).allow(&limit, route.action, key) {
            return None;
        }
        // Fly documents the limits, not the 429's body or whether it sends Retry-After.
        let error = ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            error: "resource_exhausted: rate limit exceeded".to_owned(),
            kind: None,
        };
        Some(error_answer(&error))
    }

    async fn dispatch(&self, call: &Call) -> Result<(StatusCode, Option<Value>), ApiError> {
        let engine = &self.engine;
        let app = call.route.app.as_str();
        let id = call.id();
        let ok = |value: Value| Ok((StatusCode::OK, Some(value)));
        match call.route.action {
            "app_create" => {
                let created = engine
                    .create_app(call.json::<CreateAppRequest>(None, "main.createAppRequest")?)?;
                let body = json!({"id": created.id, "created_at": created.created_at});
                Ok((StatusCode::CREATED, Some(body)))
            }
            "app_get" => ok(engine.get_app(app)),
            "create" => ok(to_value(engine.create(
                app,
                call.json::<CreateMachineRequest>(None, "api.LaunchMachineInput")?,
            )?)?),
            "list" => ok(self.list(call)?),
            "get" => ok(to_value(engine.get(app, id)?)?),
            "update" => {
                let request = call.json::<UpdateMachineRequest>(None, "api.LaunchMachineInput")?;
                ok(to_value(engine.update(app, id, request, call.nonce())?)?)
            }
            "delete" => {
                let force = call.flag("force") || call.flag("kill");
                engine.delete(app, id, force, call.nonce())?;
                ok(json!({"ok": true}))
            }
            "start" => ok(to_value(engine.start(app, id, call.nonce())?)?),
            "stop" => {
                let request = call.json(Some(StopConfig::default()), "main.stopRequest")?;
                engine.stop(app, id, request, call.nonce())?;
                ok(json!({"ok": true}))
            }
            "suspend" => {
                engine.suspend(app, id, call.nonce())?;
                ok(json!({"ok": true}))
            }
            "wait" => {
                let (states, version, timeout) = wait_parameters(call)?;
                ok(to_value(engine.wait(app, id, &states, version, timeout).await?)?)
            }
            "lease_acquire" => {
                let request = call.json(Some(LeaseRequest::default()), "main.leaseRequest")?;
                let query_ttl = match call.query("ttl") {
                    None => None,
                    Some(text) => Some(text.parse::<u64>().map_err(|_| {
                        ApiError::invalid_argument(format!("invalid ttl {text:?}"))
                    })?),
                };
                let ttl = request.ttl.or(query_ttl).unwrap_or(DEFAULT_LEASE_TTL).max(1);
                let description = request.description.unwrap_or_default();
                let lease = engine.acquire_lease(app, id, ttl, description, call.nonce())?;
                Ok((StatusCode::CREATED, Some(to_value(lease)?)))
            }
            "lease_get" => ok(to_value(engine.get_lease(app, id)?)?),
            "lease_release" => {
                engine.release_lease(app, id, call.nonce())?;
                ok(json!({"status": "success", "data": {"ok": true}}))
            }
            "metadata_get" => ok(to_value(engine.metadata(app, id)?)?),
            "metadata_set" => {
                #[derive(serde::Deserialize)]
                struct SetValue {
                    value: String,
                }
                let value = call.json::<SetValue>(None, "main.metadataValue")?.value;
                let key = call.route.key.as_deref().unwrap_or_default();
                engine.set_metadata(app, id, key, Some(value), call.nonce())?;
                Ok((StatusCode::NO_CONTENT, None))
            }
            "metadata_delete" => {
                let key = call.route.key.as_deref().unwrap_or_default();
                engine.set_metadata(app, id, key, None, call.nonce())?;
                Ok((StatusCode::NO_CONTENT, None))
            }
            "events" => {
                let limit = call.query("limit").and_then(|l| l.parse().ok()).unwrap_or(20usize);
                ok(to_value(engine.events(app, id, limit.clamp(1, 50))?)?)
            }
            "volume_create" => ok(to_value(engine.create_volume(
                app,
                call.json::<CreateVolumeRequest>(None, "api.CreateVolumeRequest")?,
            )?)?),
            "volume_list" => ok(to_value(engine.list_volumes(app))?),
            "volume_get" => ok(to_value(engine.get_volume(app, id)?)?),
            "volume_delete" => ok(to_value(engine.delete_volume(app, id)?)?),
            other => Err(ApiError::internal(format!("unrouted action {other}"))),
        }
    }

    fn list(&self, call: &Call) -> Result<Value, ApiError> {
        let metadata: BTreeMap<String, String> = call
            .query
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("metadata.")?.to_owned(), v.clone())))
            .collect();
        let mut states = Vec::new();
        for (_, value) in call.query.iter().filter(|(k, _)| k == "state") {
            for name in value.split(',').filter(|s| !s.is_empty()) {
                let state = serde_json::from_value(json!(name))
                    .ok()
                    .filter(|state| *state != MachineState::Unknown)
                    .ok_or_else(|| ApiError::invalid_argument(format!("invalid state {name:?}")))?;
                states.push(state);
            }
        }
        let machines = self.engine.list(
            &call.route.app,
            &metadata,
            &states,
            call.flag("include_deleted"),
            call.query("region"),
        );
        let mut listed = to_value(machines)?;
        if call.flag("summary") {
            for machine in listed.as_array_mut().into_iter().flatten() {
                if let Some(fields) = machine.as_object_mut() {
                    for omitted in ["config", "checks", "events", "host_status", "nonce"] {
                        fields.remove(omitted);
                    }
                }
            }
        }
        Ok(listed)
    }

    async fn controls(&self, request: Request<Incoming>, segments: &[&str]) -> Answer {
        let method = request.method().clone();
        let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => return error_answer(&body_error(e.as_ref())),
        };
        let parse = |bytes: &Bytes| -> Result<Value, ApiError> {
            serde_json::from_slice(bytes)
                .map_err(|e| ApiError::invalid_argument(format!("json: {e}")))
        };
        let result: Result<(StatusCode, Option<Value>), ApiError> = match (&method, segments) {
            (&Method::GET, [_, "stats"]) => {
                to_value(&*lock(&self.stats)).map(|v| (StatusCode::OK, Some(v)))
            }
            (&Method::DELETE, [_, "stats"]) => {
                lock(&self.stats).clear();
                Ok((StatusCode::NO_CONTENT, None))
            }
            (&Method::GET, [_, "faults"]) => {
                to_value(&*lock(&self.faults)).map(|v| (StatusCode::OK, Some(v)))
            }
            (&Method::POST, [_, "faults"]) => parse(&body)
                .and_then(|v| {
                    serde_json::from_value::<Fault>(v).map_err(ApiError::invalid_argument)
                })
                .and_then(|fault| {
                    StatusCode::from_u16(fault.status)
                        .map_err(|_| ApiError::invalid_argument("invalid status"))?;
                    if fault.count > 0 {
                        lock(&self.faults).push(fault);
                    }
                    Ok((StatusCode::NO_CONTENT, None))
                }),
            (&Method::DELETE, [_, "faults"]) => {
                lock(&self.faults).clear();
                Ok((StatusCode::NO_CONTENT, None))
            }
            (&Method::GET, [_, "settings"]) => {
                to_value(self.engine.settings()).map(|v| (StatusCode::OK, Some(v)))
            }
            (&Method::POST, [_, "settings"]) => parse(&body)
                .and_then(|v| {
                    serde_json::from_value::<SettingsPatch>(v).map_err(ApiError::invalid_argument)
                })
                .and_then(|patch| to_value(self.engine.update_settings(|s| s.apply(patch))))
                .map(|v| (StatusCode::OK, Some(v))),
            _ => Err(ApiError::not_found(format!("no control {method} /{}", segments.join("/")))),
        };
        match result {
            Ok((status, body)) => answer(status, body),
            Err(error) => error_answer(&error),
        }
    }
}

/// 413 for a body over [`MAX_BODY`], 400 for one that could not be read.
fn body_error(error: &(dyn std::error::Error + 'static)) -> ApiError {
    if error.is::<LengthLimitError>() {
        return ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            error: format!("invalid_argument: request body larger than {MAX_BODY} bytes"),
            kind: None,
        };
    }
    ApiError::invalid_argument(format!("reading body: {error}"))
}

fn fault_answer(fault: &Fault) -> Answer {
    let status = StatusCode::from_u16(fault.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let text = if status == StatusCode::TOO_MANY_REQUESTS {
        "resource_exhausted: rate limit exceeded (injected fault)"
    } else {
        "unavailable: injected fault"
    };
    let mut response = answer(status, Some(json!({ "error": text })));
    if let Some(seconds) = fault.retry_after {
        response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// `state` (repeated or comma-separated, default `started`), `timeout` (1-60 s, default
/// 60) and `version` (alias `instance_id`, required for `stopped`).
fn wait_parameters(call: &Call) -> Result<(Vec<WaitState>, Option<&str>, Duration), ApiError> {
    let mut states = Vec::new();
    for (_, value) in call.query.iter().filter(|(k, _)| k == "state") {
        for name in value.split(',').filter(|s| !s.is_empty()) {
            let state = WaitState::parse(name)
                .ok_or_else(|| ApiError::invalid_argument(format!("invalid state {name:?}")))?;
            states.push(state);
        }
    }
    if states.is_empty() {
        states.push(WaitState::Started);
    }

    let timeout = match call.query("timeout") {
        None => Some(Duration::from_secs(60)),
        Some(text) => match text.parse::<u64>() {
            Ok(seconds) => Some(Duration::from_secs(seconds)),
            Err(_) => parse_go_duration(text).ok(),
        },
    };
    let in_range = |t: &Duration| (Duration::from_secs(1)..=Duration::from_secs(60)).contains(t);
    let Some(timeout) = timeout.filter(in_range) else {
        return Err(ApiError::invalid_argument(
            "invalid WaitMachineRequest.Timeout: value must be inside range [1s, 1m0s]",
        ));
    };

    let version =
        call.query("version").or_else(|| call.query("instance_id")).filter(|v| !v.is_empty());
    if let Some(version) = version.filter(|v| ulid::Ulid::from_string(v).is_err()) {
        return Err(ApiError::invalid_argument(format!(
            "invalid version {version:?}: expected a 26-character instance id"
        )));
    }
    if states.contains(&WaitState::Stopped) && version.is_none() {
        return Err(ApiError::invalid_argument(
            "instance_id (version) is required when waiting for the stopped state",
        ));
    }
    Ok((states, version, timeout))
}
