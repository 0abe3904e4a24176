//! The request pipeline: route -> authenticate -> admit (rate limit) -> faults -> handler ->
//! accounting. One fallback handler so every path, known or not, gets HubSpot-shaped JSON.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State as AxState};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::Router;
use chrono::{DateTime, Utc};
use rand::Rng;

use crate::auth::{self, Authed};
use crate::ctx::Ctx;
use crate::errors::{into_response, ApiError, ApiResult};
use crate::limits;
use crate::routes::{self, Access, Endpoint};
use crate::state::{uuid, Shared, State};
use crate::{contacts, inspect, lifecycle, oauth, properties, search, timeline};

/// Large enough for a 100-input batch of 65,536-character values.
const MAX_BODY: usize = 64 * 1024 * 1024;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(entry).with_state(shared)
}

fn split_path(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect()
}

async fn entry(AxState(shared): AxState<Arc<Shared>>, req: Request) -> Response {
    let corr = uuid();
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let mut resp = match axum::body::to_bytes(body, MAX_BODY).await {
        Err(_) => into_response(
            Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "VALIDATION_ERROR",
                "Request body too large or unreadable",
            )),
            &corr,
        ),
        Ok(bytes) => {
            let segs = split_path(&path);
            if segs.first().map(String::as_str) == Some("_emulator") {
                inspect::handle(&shared, &parts.method, &segs[1..], &bytes)
            } else {
                api(
                    &shared,
                    &parts.method,
                    &segs,
                    &path,
                    &query,
                    &parts.headers,
                    &bytes,
                    &corr,
                )
                .await
            }
        }
    };
    if let Ok(v) = HeaderValue::from_str(&corr) {
        resp.headers_mut()
            .insert(HeaderName::from_static("x-hubspot-correlation-id"), v);
    }
    tracing::debug!(method = %parts.method, %path, status = resp.status().as_u16(), "request");
    resp
}

#[allow(clippy::too_many_arguments)]
async fn api(
    shared: &Shared,
    method: &Method,
    segs: &[String],
    path: &str,
    query: &str,
    headers: &HeaderMap,
    body: &[u8],
    corr: &str,
) -> Response {
    let ep = match routes::classify(method, segs, path) {
        Ok(ep) => ep,
        Err(e) => return into_response(Err(e), corr),
    };
    let query: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let now = Utc::now();
    match ep.access() {
        Access::Open => {
            let res = oauth::authorize(&mut shared.lock(), &ep, &query, now);
            into_response(res, corr)
        }
        Access::OAuth => {
            let portal = oauth::portal_hint(&shared.lock(), &ep, body);
            let res = match apply_faults(shared, portal).await {
                Some(e) => Err(e),
                None => oauth::handle(&mut shared.lock(), &ep, body, Utc::now()),
            };
            let applied = res.is_ok();
            let resp = finish(shared, portal, &ep, res, None, corr);
            if applied && loses_answer(shared, portal) {
                return lost(resp);
            }
            resp
        }
        Access::Developer => {
            let checked = {
                let st = shared.lock();
                developer_auth(&st, &ep, &query)
            };
            if let Err(e) = checked {
                return finish(shared, Some(0), &ep, Err(e), None, corr);
            }
            let res = match apply_faults(shared, None).await {
                Some(e) => Err(e),
                None => {
                    let ctx = Ctx {
                        portal: 0,
                        query,
                        now,
                    };
                    timeline::templates(&mut shared.lock(), &ctx, &ep, body)
                }
            };
            finish(shared, Some(0), &ep, res, None, corr)
        }
        Access::Api | Access::Search => {
            let search = ep.access() == Access::Search;
            let admitted = admit(shared, headers, &ep, search, now);
            let (authed, rate) = match admitted {
                Ok(x) => x,
                Err((res, portal, rate)) => {
                    return finish(shared, portal, &ep, Err(res), rate, corr)
                }
            };
            let portal = authed.portal;
            let res = match apply_faults(shared, Some(portal)).await {
                Some(e) => Err(e),
                None => {
                    let ctx = Ctx {
                        portal,
                        query,
                        now: Utc::now(),
                    };
                    let mut st = shared.lock();
                    auth::check_scopes(&authed, &ep)
                        .and_then(|_| dispatch(&mut st, &ctx, &ep, body))
                }
            };
            let applied = res.is_ok();
            let resp = finish(shared, Some(portal), &ep, res, rate, corr);
            if applied && loses_answer(shared, Some(portal)) {
                return lost(resp);
            }
            resp
        }
    }
}

/// (max, remaining, window) for the rate-limit headers.
type RateHeaders = Option<(u32, u32, Duration)>;
type Refusal = (ApiError, Option<u64>, RateHeaders);

/// Authenticates and admits a bearer-token request (all under one lock acquisition).
fn admit(
    shared: &Shared,
    headers: &HeaderMap,
    ep: &Endpoint,
    search: bool,
    now: DateTime<Utc>,
) -> Result<(Authed, RateHeaders), Refusal> {
    let mut st = shared.lock();
    let authed = auth::resolve(&st, headers, now).map_err(|f| (f.err, f.portal, None))?;
    let (max, window, search_max) = (
        st.cfg.rate_limit_per_10s,
        st.cfg.rate_window,
        st.cfg.search_rate_per_s,
    );
    let Some(p) = st.portals.get_mut(&authed.portal) else {
        return Err((ApiError::invalid_auth(), None, None));
    };
    let t = Instant::now();
    if search {
        // Search has its own secondly limit and carries no rate-limit headers.
        return match limits::admit(&mut p.search_window, t, Duration::from_secs(1), search_max) {
            Some(_) => Ok((authed, None)),
            None => Err((limits::secondly_error(), Some(authed.portal), None)),
        };
    }
    match limits::admit(&mut p.window, t, window, max) {
        Some(n) => {
            p.stats.peak_in_10s = p.stats.peak_in_10s.max(n);
            Ok((authed, Some((max, max.saturating_sub(n), window))))
        }
        None => {
            tracing::debug!(portal = p.id, op = ep.op(), "ten-secondly limit reached");
            Err((
                limits::ten_secondly_error(),
                Some(authed.portal),
                Some((max, 0, window)),
            ))
        }
    }
}

fn developer_auth(st: &State, ep: &Endpoint, query: &[(String, String)]) -> Result<(), ApiError> {
    let key = query
        .iter()
        .find(|(k, _)| k == "hapikey")
        .map(|(_, v)| v.as_str());
    if key != Some(st.cfg.developer_api_key.as_str()) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "INVALID_AUTHENTICATION",
            "The developer API key provided is invalid or missing (hapikey).",
        ));
    }
    if ep.app_id() != Some(st.cfg.app_id.to_string().as_str()) {
        // GUESS: status/category for a key that does not own the app.
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            format!(
                "The developer API key does not own app {}",
                ep.app_id().unwrap_or("")
            ),
        ));
    }
    Ok(())
}

fn dispatch(st: &mut State, ctx: &Ctx, ep: &Endpoint, body: &[u8]) -> ApiResult {
    use Endpoint::*;
    match ep {
        AccountDetails => oauth::account_details(st, ctx),
        GroupsCreate => properties::groups_create(st, ctx, body),
        GroupsList => properties::groups_list(st, ctx),
        GroupsRead(n) => properties::groups_read(st, ctx, n),
        GroupsUpdate(n) => properties::groups_update(st, ctx, n, body),
        GroupsArchive(n) => properties::groups_archive(st, ctx, n),
        PropsCreate => properties::create(st, ctx, body),
        PropsList => properties::list(st, ctx),
        PropsRead(n) => properties::read(st, ctx, n),
        PropsUpdate(n) => properties::update(st, ctx, n, body),
        PropsArchive(n) => properties::archive(st, ctx, n),
        PropsBatchCreate => properties::batch_create(st, ctx, body),
        PropsBatchRead => properties::batch_read(st, ctx, body),
        PropsBatchArchive => properties::batch_archive(st, ctx, body),
        ContactsBatchRead => contacts::batch_read(st, ctx, body),
        ContactsBatchUpdate => contacts::batch_update(st, ctx, body),
        ContactsBatchCreate => contacts::batch_create(st, ctx, body),
        ContactsBatchUpsert => contacts::batch_upsert(st, ctx, body),
        ContactsSearch => search::search(st, ctx, body),
        ContactsList => contacts::list(st, ctx),
        ContactsCreate => contacts::create(st, ctx, body),
        ContactsGet(id) => contacts::get(st, ctx, id),
        ContactsUpdate(id) => contacts::update(st, ctx, id, body),
        ContactsMerge => lifecycle::merge(st, ctx, body),
        ContactsArchive(id) => lifecycle::archive(st, ctx, id),
        ContactsGdprDelete => lifecycle::gdpr_delete(st, ctx, body),
        AppEventCreate => timeline::app_event_single(st, ctx, body),
        AppEventBatch => timeline::app_event_batch(st, ctx, body),
        TimelineEventCreate => timeline::v3_event_single(st, ctx, body),
        TimelineEventBatch => timeline::v3_event_batch(st, ctx, body),
        // OAuth and developer endpoints never reach here.
        _ => Err(ApiError::route_not_found(ep.op())),
    }
}

/// Records the answer in the portal's stats and builds the response.
fn finish(
    shared: &Shared,
    portal: Option<u64>,
    ep: &Endpoint,
    res: ApiResult,
    rate: RateHeaders,
    corr: &str,
) -> Response {
    let status = match &res {
        Ok(r) => r.status,
        Err(e) => e.status,
    };
    if let Some(p) = portal {
        if let Some(stats) = shared.lock().stats_mut(p) {
            limits::record(stats, ep.op(), status.as_u16());
        }
    }
    let mut resp = into_response(res, corr);
    if let Some((max, remaining, window)) = rate {
        let h = resp.headers_mut();
        let mut set = |name: &'static str, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(HeaderName::from_static(name), v);
            }
        };
        set(
            "x-hubspot-ratelimit-interval-milliseconds",
            window.as_millis().to_string(),
        );
        set("x-hubspot-ratelimit-max", max.to_string());
        set("x-hubspot-ratelimit-remaining", remaining.to_string());
    }
    resp
}

/// Counts a request held by a `hang` fault, until it goes on or is dropped
/// (its client gave up).
struct Hung<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Hung<'a> {
    fn new(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Hung(count)
    }
}

impl Drop for Hung<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Applies the faults in force for `portal`: hang (until changed), latency, then 5xx at the
/// configured rate. Never holds the state lock while waiting.
async fn apply_faults(shared: &Shared, portal: Option<u64>) -> Option<ApiError> {
    let faults = loop {
        let notified = shared.faults_changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if shared.is_stopping() {
            return Some(unavailable());
        }
        let f = shared.lock().faults_for(portal);
        if !f.hang {
            break f;
        }
        let _held = Hung::new(&shared.hung);
        notified.await;
    };
    if let Some(d) = faults.latency {
        tokio::time::sleep(d).await;
    }
    if faults.error_rate > 0.0 {
        let (roll, pick): (f64, f64) = {
            let mut rng = rand::thread_rng();
            (rng.gen(), rng.gen())
        };
        if roll < faults.error_rate {
            return Some(if pick < 0.75 {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "INTERNAL_ERROR",
                    "internal error",
                )
            } else {
                unavailable()
            });
        }
    }
    None
}

/// Whether this applied call's answer is to be lost (`Faults::lose_answer_rate`).
fn loses_answer(shared: &Shared, portal: Option<u64>) -> bool {
    let rate = shared.lock().faults_for(portal).lose_answer_rate;
    rate > 0.0 && rand::thread_rng().gen::<f64>() < rate
}

/// The answer with its body broken off after the status line: what a client
/// sees when the connection resets while the answer is on its way.
fn lost(resp: Response) -> Response {
    let (parts, _) = resp.into_parts();
    let broken = futures_util::stream::once(async {
        Err::<axum::body::Bytes, std::io::Error>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "answer lost (emulated fault)",
        ))
    });
    Response::from_parts(parts, axum::body::Body::from_stream(broken))
}

fn unavailable() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "SERVICE_UNAVAILABLE",
        "Service Unavailable",
    )
}
