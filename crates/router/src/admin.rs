//! `/admin/users`: list, get, provision and deprovision users' machines.
//!
//! Bearer `ROUTER_ADMIN_TOKEN`; with no token configured the routes do not exist (404).
//!
//! - `GET /admin/users`: every record
//! - `GET /admin/users/{id}`: one record with the machine's current state
//! - `POST /admin/users/{id}`: provision (idempotent)
//! - `DELETE /admin/users/{id}`: destroy the machine and the volume, then the record;
//!   `"volume": "orphaned"` in the answer when the volume was left to the sweep
//!
//! Every admin call first sweeps the volumes earlier deprovisions left behind
//! ([`crate::deprovision`]).

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use uuid::Uuid;

use crate::body::RouterBody;
use crate::error::ApiError;
use crate::fleet::error_chain;
use crate::service::{ok_json, require_bearer, AppState};

pub async fn handle(
    state: &Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<RouterBody>, ApiError> {
    let Some(expected) = state.admin_token.as_deref() else { return Err(ApiError::not_found()) };
    require_bearer(req.headers(), expected)?;
    crate::deprovision::sweep(state.fleet.fly(), state.fleet.store(), &state.metrics).await;

    let path = req.uri().path().trim_end_matches('/');
    let user = match path.strip_prefix("/admin/users") {
        Some("") => None,
        Some(rest) => Some(parse_user(rest.trim_start_matches('/'))?),
        None => return Err(ApiError::not_found()),
    };
    match (req.method().clone(), user) {
        (Method::GET, None) => {
            let users = state.fleet.list().await?;
            Ok(ok_json(serde_json::json!({ "users": users })))
        }
        (Method::GET, Some(user)) => get(state, user).await,
        (Method::POST, Some(user)) => {
            let record = state.fleet.provision(user).await?;
            Ok(ok_json(serde_json::json!({ "user": record })))
        }
        (Method::DELETE, Some(user)) => deprovision(state, user).await,
        (_, None) => Err(ApiError::method_not_allowed("GET")),
        (_, Some(_)) => Err(ApiError::method_not_allowed("GET, POST, DELETE")),
    }
}

fn parse_user(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text)
        .map_err(|_| ApiError::client(StatusCode::BAD_REQUEST, "bad_user_id", "not a user id"))
}

async fn get(state: &AppState, user: Uuid) -> Result<Response<RouterBody>, ApiError> {
    let record =
        state.fleet.store().get(user).await.map_err(|e| ApiError::internal(error_chain(&e)))?;
    let Some(record) = record else {
        return Err(ApiError::client(
            StatusCode::NOT_FOUND,
            "unknown_user",
            "no machine for this user",
        ));
    };
    let machine_state = match state.fleet.fly().get_machine(&record.machine_id).await {
        Ok(machine) => machine.state.as_str().to_owned(),
        Err(e) => format!("unknown ({})", e.status().map(|s| s.as_u16()).unwrap_or(0)),
    };
    Ok(ok_json(serde_json::json!({ "user": record, "machine_state": machine_state })))
}

async fn deprovision(state: &AppState, user: Uuid) -> Result<Response<RouterBody>, ApiError> {
    let store = state.fleet.store();
    let record = store.get(user).await.map_err(|e| ApiError::internal(error_chain(&e)))?;
    let Some(record) = record else {
        return Err(ApiError::client(
            StatusCode::NOT_FOUND,
            "unknown_user",
            "no machine for this user",
        ));
    };
    let volume = crate::deprovision::deprovision(&state.fleet, &state.metrics, &record).await?;
    Ok(ok_json(serde_json::json!({ "deleted": record, "volume": volume })))
}
