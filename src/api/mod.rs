//! The HTTP API: routes, shared state, the extractors (each answering its rejections as
//! problem+json), and the token and cross-site request checks.

mod blobs;
mod error;
mod jobs;
mod ops;
mod schedules;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

pub use error::ApiError;

use crate::blob::BlobDir;
use crate::config::Settings;
use crate::dispatch::Dispatcher;
use crate::spec::SpecDefaults;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub dispatcher: Arc<Dispatcher>,
    /// This server's advertised URL, recorded with the blobs uploaded here.
    pub origin: Option<String>,
    pub health: Arc<crate::observe::RuntimeHealth>,
    pub blobs: BlobDir,
    pub settings: Arc<Settings>,
    pub started: Instant,
    /// The settings' `task_flow`, shared with every parse.
    pub task_flow: Arc<std::collections::BTreeMap<String, crate::flow::TaskFlow>>,
}

impl AppState {
    pub fn spec_defaults(&self) -> SpecDefaults {
        SpecDefaults {
            max_attempts: self.settings.default_max_attempts,
            process_threshold: self.settings.process_threshold_bytes,
            task_flow: self.task_flow.clone(),
            callbacks: self.dispatcher.callback_rules(),
        }
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/jobs", post(jobs::submit).get(jobs::list))
        .route("/v1/jobs/batch", post(jobs::submit_batch))
        .route("/v1/jobs/cancel", post(jobs::cancel_matching))
        .route("/v1/jobs/retry", post(jobs::retry_matching))
        .route("/v1/jobs/{id}", get(jobs::get_job).delete(jobs::delete_job))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/retry", post(jobs::retry))
        .route("/v1/jobs/{id}/events", get(jobs::events))
        .route("/v1/events", get(jobs::all_events))
        .route(
            "/v1/schedules",
            post(schedules::create).get(schedules::list),
        )
        .route(
            "/v1/schedules/{name}",
            get(schedules::get_schedule).delete(schedules::delete),
        )
        .route("/v1/schedules/{name}/pause", post(schedules::pause))
        .route("/v1/schedules/{name}/resume", post(schedules::resume))
        .route("/v1/blobs", post(blobs::upload))
        .route("/v1/blobs/{id}", get(blobs::download).delete(blobs::remove))
        .route("/v1/tasks", get(ops::tasks))
        .route("/v1/stats", get(ops::stats))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/", get(dashboard))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(middleware::from_fn(crate::observe::http_metrics))
        .layer(middleware::from_fn(crate::observe::request_id))
        .with_state(state)
}

/// The dashboard: one page, its script and styles inline, no CDN.
async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        include_str!("dashboard.html"),
    )
        .into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}; the API is described in openapi.yaml",
        req.method(),
        req.uri().path()
    ))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::method_not_allowed(format!(
        "{} is not allowed on {}",
        req.method(),
        req.uri().path()
    ))
}

/// The header the dashboard's script sends with every call. A page on another site cannot
/// add a custom header to a request without a CORS preflight, and this server answers no
/// preflight, so its presence shows the request was not forged by another site.
pub const CSRF_HEADER: &str = "x-offload-csrf";

/// With a token configured, every request but the health checks must carry it: as
/// `Authorization: Bearer`, or as the dashboard's cookie. A request that changes something
/// must also show it was not forged by another site (see [`cross_site_check`]).
async fn require_token(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(token) = &state.settings.api_token else {
        cross_site_check(&req, Credential::None)?;
        return Ok(next.run(req).await);
    };
    let path = req.uri().path();
    if path == "/healthz" || path == "/readyz" {
        return Ok(next.run(req).await);
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // A browser cannot add a header to a page it navigates to: the dashboard is opened
    // once as `/?token=...`, which sets an HttpOnly, SameSite=Strict cookie and redirects
    // to `/`.
    let cookie = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("offload_token="));
    let query = (path == "/")
        .then(|| req.uri().query())
        .flatten()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    let ok = |given: Option<&str>| {
        given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes()))
    };
    if ok(query) {
        let cookie = format!("offload_token={token}; HttpOnly; SameSite=Strict; Path=/");
        return Ok((
            StatusCode::SEE_OTHER,
            [
                (header::LOCATION, "/".to_string()),
                (header::SET_COOKIE, cookie),
            ],
        )
            .into_response());
    }
    if ok(bearer) {
        return Ok(next.run(req).await);
    }
    if ok(cookie) {
        cross_site_check(&req, Credential::Cookie)?;
        return Ok(next.run(req).await);
    }
    Err(ApiError::unauthorized())
}

/// What authenticated a request that carries no valid bearer token.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Credential {
    /// No token is configured: nothing to authenticate with.
    None,
    /// The dashboard's cookie, which the browser attaches by itself.
    Cookie,
}

/// Refuses a request that changes something (any method but GET, HEAD and OPTIONS) when
/// another site could have made a browser send it (cross-site request forgery).
///
/// A bearer token is never attached by a browser on its own, so requests that carry one are
/// not checked. A cookie is: SameSite=Strict keeps it off requests from other *sites*, but a
/// site is a host without its port, so a page served from another port of this host (any
/// local dev server) counts as same-site and its forms would carry the cookie. So a
/// cookie-authenticated change needs the [`CSRF_HEADER`], which only a same-origin script can
/// send. Without a token there is no credential to steal, but a page on another origin could
/// still make a visitor's browser POST here (a plain form can cancel a job): a change whose
/// `Origin` names another origin than this `Host` is refused unless it carries the header.
/// Clients that are not browsers send no `Origin` and are not affected.
fn cross_site_check(req: &Request, credential: Credential) -> Result<(), ApiError> {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
        || req.headers().contains_key(CSRF_HEADER)
    {
        return Ok(());
    }
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let forged = match credential {
        Credential::Cookie => true,
        Credential::None => match (header(header::ORIGIN), header(header::HOST)) {
            (None, _) => false,
            (Some(origin), Some(host)) => !["http://", "https://"].iter().any(|scheme| {
                origin
                    .strip_prefix(scheme)
                    .is_some_and(|o| o.eq_ignore_ascii_case(host))
            }),
            (Some(_), None) => true,
        },
    };
    if forged {
        return Err(ApiError::forbidden(format!(
            "a {} authenticated by a cookie, or sent from another origin, must carry the \
             header `X-Offload-Csrf: 1` (the dashboard sends it); API clients should send \
             `Authorization: Bearer <token>` instead",
            req.method()
        )));
    }
    Ok(())
}

/// Compares without an early exit, so the time taken does not reveal how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | ((a.len() ^ b.len()) >> 8) as u8;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= x ^ y;
    }
    diff == 0 && a.len() == b.len()
}

/// A JSON object body: 415 for another content type, 413 over the limit (without reading
/// more than the limit), 400 if it is not JSON or not an object.
pub struct JsonObject(pub Map<String, Value>);

impl FromRequest<AppState> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let limit = state.settings.max_body_bytes;
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mime = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if mime != "application/json" && !mime.ends_with("+json") {
            return Err(ApiError::unsupported_media(format!(
                "send the body as JSON with `Content-Type: application/json` (got `{content_type}`)"
            )));
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let too_large = || {
            ApiError::too_large(format!(
                "the body is over the {limit}-byte limit (--max-body-bytes); send fewer jobs per request"
            ))
        };
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let mut bytes = Vec::with_capacity(declared.unwrap_or(0).min(limit as u64) as usize);
        let mut stream = req.into_body().into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|e| ApiError::bad_request(format!("could not read the body: {e}")))?;
            if bytes.len() + chunk.len() > limit {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(JsonObject(map)),
            Ok(_) => Err(ApiError::bad_request("the body must be a JSON object")),
            Err(e) => Err(ApiError::bad_request(format!(
                "the body is not valid JSON: {e}"
            ))),
        }
    }
}

/// axum's `Path`, answering its rejections as problem+json. Every path parameter here is an
/// id, and one that is not valid UTF-8 once percent-decoded (`/v1/jobs/%FF`) names nothing
/// that could exist: a 404, like any other id that names nothing.
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => {
                let path = parts.uri.path();
                Err(match e.kind() {
                    ErrorKind::InvalidUtf8InPathParam { key } => ApiError::not_found(format!(
                        "nothing is at {path}: its `{key}` is not valid UTF-8 once \
                         percent-decoded, and every id here is"
                    )),
                    _ => ApiError::not_found(format!("nothing is at {path}: {}", e.body_text())),
                })
            }
            Err(other) => Err(ApiError::internal(other.body_text())),
        }
    }
}

/// axum's `Query`, answering its rejections as problem+json: a 422, as for any other query
/// parameter the server cannot use.
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(e) => Err(ApiError::invalid(format!(
                "the query string: {}",
                e.body_text()
            ))),
        }
    }
}
