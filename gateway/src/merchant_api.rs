//! The merchant HTTP API: the shop's backend creates products, posts cards,
//! starts and cancels group-buys, issues coupons and opens polls, and reads
//! their state — JSON over HTTP, the same operations as the wire protocol's
//! commerce frames, run by the same chat-core code.
//!
//! Every request carries `Authorization: Bearer <token>` with the role
//! `owner` or `agent` of the shop that owns the group. Errors are JSON
//! `{"code": 43, "name": "INVALID_ARGUMENT", "message": "..."}` with the
//! wire protocol's codes. The contract is `docs/openapi.yaml`, also served
//! at `/openapi.json`.

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Json, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use qun_chat_core::{ChatError, Identity, state_name};
use qun_proto::ErrorCode;
use qun_proto::v1::{self, commerce_answer};
use serde::{Deserialize, Serialize};

use crate::connection::now_ms;
use crate::server::Shared;

/// The OpenAPI document, as written in docs/openapi.yaml.
const OPENAPI_YAML: &str = include_str!("../../docs/openapi.yaml");

/// The merchant routes, to be merged into the HTTP router.
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route(
            "/v1/products/{product_id}",
            get(get_product).put(put_product),
        )
        .route("/v1/groups/{group_id}/cards", post(post_card))
        .route("/v1/groups/{group_id}/group-buys", post(start_group_buy))
        .route("/v1/groups/{group_id}/group-buys/{id}", get(get_group_buy))
        .route(
            "/v1/groups/{group_id}/group-buys/{id}/cancel",
            post(cancel_group_buy),
        )
        .route("/v1/groups/{group_id}/coupons", post(issue_coupon))
        .route("/v1/groups/{group_id}/coupons/{id}", get(get_coupon))
        .route("/v1/groups/{group_id}/polls", post(open_poll))
        .route("/v1/groups/{group_id}/polls/{id}", get(get_poll))
        .route("/v1/groups/{group_id}/polls/{id}/close", post(close_poll))
        .route("/v1/groups/{group_id}/reach", get(get_reach))
        .route("/v1/groups/{group_id}/reports", get(get_reports))
        .route("/v1/groups/{group_id}/mute-all", post(mute_all))
        .route(
            "/v1/groups/{group_id}/members/{user_id}/mute",
            post(mute_member),
        )
        .route(
            "/v1/groups/{group_id}/members/{user_id}/remove",
            post(remove_member),
        )
        .route(
            "/v1/groups/{group_id}/messages/{seq}/recall",
            post(recall_message),
        )
        .route("/v1/groups/{group_id}/faq", get(get_faq).post(promote_faq))
        .route("/v1/groups/{group_id}/faq/{id}/remove", post(remove_faq))
        .route("/v1/groups/{group_id}/pins", post(set_pin))
        .route("/v1/groups/{group_id}/join-policy", post(set_join_policy))
        .route(
            "/v1/groups/{group_id}/join-requests",
            get(list_join_requests),
        )
        .route(
            "/v1/groups/{group_id}/join-requests/{user_id}/decide",
            post(decide_join),
        )
        .route(
            "/v1/buyers/{user_id}/tags",
            get(get_buyer_tags).put(put_buyer_tags),
        )
        .route("/v1/groups/{group_id}/pushes", post(push_promotion))
        .route(
            "/v1/groups/{group_id}/schedules",
            get(list_schedules).post(schedule_push),
        )
        .route(
            "/v1/groups/{group_id}/schedules/{id}/cancel",
            post(cancel_schedule),
        )
        .route("/v1/tag-pool", get(get_tag_pool))
        .route("/v1/cs/config", get(get_cs_config).put(put_cs_config))
        .route(
            "/v1/cs/buyers/{user_id}",
            get(get_cs_buyer).put(put_cs_buyer),
        )
        .route("/v1/cs/buyers/{user_id}/purchases", post(post_purchase))
        .route("/v1/auto-replies", get(list_auto_replies))
        .route(
            "/v1/auto-replies/{rule_id}",
            axum::routing::put(put_auto_reply),
        )
        .route("/v1/auto-replies/{rule_id}/remove", post(remove_auto_reply))
}

// ─────────────────────────────── errors ───────────────────────────────

/// A refused request: an HTTP status and the wire protocol's code.
#[derive(Debug)]
pub(crate) struct ApiError {
    code: ErrorCode,
    message: String,
    /// For limits (`QUOTA_EXHAUSTED`, `RATE_LIMITED`): when to retry.
    retry_after_ms: Option<u64>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: i32,
    name: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

impl ApiError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    /// The HTTP status for a wire code.
    fn status(&self) -> StatusCode {
        match self.code {
            ErrorCode::TokenInvalid | ErrorCode::TokenExpired | ErrorCode::NotAuthenticated => {
                StatusCode::UNAUTHORIZED
            }
            ErrorCode::ForbiddenRole | ErrorCode::WrongShop | ErrorCode::NotMember => {
                StatusCode::FORBIDDEN
            }
            ErrorCode::UnknownGroup | ErrorCode::UnknownProduct | ErrorCode::UnknownObject => {
                StatusCode::NOT_FOUND
            }
            ErrorCode::GroupFull => StatusCode::CONFLICT,
            ErrorCode::RateLimited | ErrorCode::SlowMode | ErrorCode::QuotaExhausted => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ErrorCode::Muted | ErrorCode::Banned => StatusCode::FORBIDDEN,
            ErrorCode::JoinPending => StatusCode::ACCEPTED,
            ErrorCode::NotEligible | ErrorCode::ContactBlocked | ErrorCode::ProactiveOff => {
                StatusCode::FORBIDDEN
            }
            ErrorCode::StorageUnavailable | ErrorCode::Overloaded | ErrorCode::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> Self {
        let code = e.code();
        if matches!(
            code,
            ErrorCode::Internal | ErrorCode::StorageUnavailable | ErrorCode::Overloaded
        ) {
            tracing::warn!(error = %e, ?code, "merchant request failed on the server side");
        }
        Self {
            retry_after_ms: e.retry_after_ms(),
            ..Self::new(code, e.client_message())
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        Self::invalid(format!("request body: {}", e.body_text()))
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        Self::invalid(format!("path: {}", e.body_text()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let name = self.code.as_str_name();
        let body = ErrorBody {
            code: self.code as i32,
            name: name.strip_prefix("ERROR_CODE_").unwrap_or(name),
            message: &self.message,
            retry_after_ms: self.retry_after_ms,
        };
        let mut response = (self.status(), axum::Json(body)).into_response();
        if let Some(ms) = self.retry_after_ms
            && let Ok(v) = header::HeaderValue::from_str(&ms.div_ceil(1000).to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}

type ApiResult<T> = Result<(StatusCode, axum::Json<T>), ApiError>;

fn ok<T>(body: T) -> ApiResult<T> {
    Ok((StatusCode::OK, axum::Json(body)))
}

fn created<T>(body: T) -> ApiResult<T> {
    Ok((StatusCode::CREATED, axum::Json(body)))
}

/// The caller, from `Authorization: Bearer <token>`.
fn caller(shared: &Shared, headers: &HeaderMap) -> Result<Identity, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotAuthenticated,
                "send Authorization: Bearer <token> (an owner or agent token of the shop)",
            )
        })?;
    shared.key.verify(token, now_ms() / 1000).map_err(|e| {
        let code = match e {
            crate::auth::TokenError::Expired => ErrorCode::TokenExpired,
            _ => ErrorCode::TokenInvalid,
        };
        ApiError::new(code, e.to_string())
    })
}

// ──────────────────────────────── JSON ────────────────────────────────

/// A product as the API shows it.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct ProductJson {
    product_id: String,
    shop_id: String,
    title: String,
    image_url: String,
    price_minor: i64,
    member_price_minor: i64,
    currency: String,
    stock_hint: u32,
    link: String,
    sold_out: bool,
    version: u64,
    updated_at_ms: u64,
}

impl From<v1::Product> for ProductJson {
    fn from(p: v1::Product) -> Self {
        Self {
            product_id: p.product_id,
            shop_id: p.shop_id,
            title: p.title,
            image_url: p.image_url,
            price_minor: p.price_minor,
            member_price_minor: p.member_price_minor,
            currency: p.currency,
            stock_hint: p.stock_hint,
            link: p.link,
            sold_out: p.sold_out,
            version: p.version,
            updated_at_ms: p.updated_at_ms,
        }
    }
}

/// The body of `PUT /v1/products/{product_id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProductInput {
    title: String,
    price_minor: i64,
    #[serde(default)]
    member_price_minor: i64,
    #[serde(default)]
    currency: String,
    #[serde(default)]
    stock_hint: u32,
    #[serde(default)]
    image_url: String,
    #[serde(default)]
    link: String,
    #[serde(default)]
    sold_out: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CardInput {
    product_id: String,
}

#[derive(Debug, Serialize)]
struct CardJson {
    group_id: u64,
    seq: u64,
    product: Option<ProductJson>,
}

/// A deadline given as a time or as a duration from now.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupBuyInput {
    product_id: String,
    price_minor: i64,
    target: u32,
    slots: u32,
    #[serde(default)]
    starts_at_ms: u64,
    #[serde(default)]
    deadline_ms: u64,
    #[serde(default)]
    duration_ms: u64,
}

#[derive(Debug, Serialize)]
struct GroupBuyJson {
    group_buy_id: u64,
    group_id: u64,
    product: Option<ProductJson>,
    price_minor: i64,
    target: u32,
    slots: u32,
    joined: u32,
    starts_at_ms: u64,
    deadline_ms: u64,
    state: &'static str,
    closed: bool,
    started_by: String,
    changed_at_ms: u64,
    server_time_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CouponInput {
    title: String,
    amount_minor: i64,
    #[serde(default)]
    min_spend_minor: i64,
    #[serde(default)]
    currency: String,
    quantity: u32,
    #[serde(default)]
    per_buyer_limit: u32,
    #[serde(default)]
    expires_at_ms: u64,
    #[serde(default)]
    expires_in_ms: u64,
}

#[derive(Debug, Serialize)]
struct CouponJson {
    coupon_id: u64,
    group_id: u64,
    title: String,
    amount_minor: i64,
    min_spend_minor: i64,
    currency: String,
    quantity: u32,
    claimed: u32,
    per_buyer_limit: u32,
    expires_at_ms: u64,
    issued_by: String,
    issued_at_ms: u64,
    server_time_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PollInput {
    question: String,
    options: Vec<String>,
    #[serde(default)]
    deadline_ms: u64,
    #[serde(default)]
    duration_ms: u64,
    #[serde(default)]
    votes_final: bool,
}

#[derive(Debug, Serialize)]
struct PollOptionJson {
    text: String,
    votes: u32,
}

#[derive(Debug, Serialize)]
struct PollJson {
    poll_id: u64,
    group_id: u64,
    question: String,
    options: Vec<PollOptionJson>,
    deadline_ms: u64,
    votes_final: bool,
    closed: bool,
    voters: u32,
    opened_by: String,
    opened_at_ms: u64,
    server_time_ms: u64,
}

/// `at`, or `now + duration`; exactly one of them.
fn when(what: &str, at: u64, duration: u64, now: u64) -> Result<u64, ApiError> {
    match (at, duration) {
        (at, 0) if at > 0 => Ok(at),
        (0, d) if d > 0 => Ok(now.saturating_add(d)),
        _ => Err(ApiError::invalid(format!(
            "give exactly one of {what}_ms and its duration"
        ))),
    }
}

fn group_buy_json(a: v1::CommerceAnswer) -> Result<GroupBuyJson, ApiError> {
    let server_time_ms = a.server_time_ms;
    let Some(commerce_answer::Object::GroupBuy(g)) = a.object else {
        return Err(not_this_kind("group-buy"));
    };
    Ok(GroupBuyJson {
        state: state_name(g.state()),
        group_buy_id: g.group_buy_id,
        group_id: g.group_id,
        product: g.product.map(ProductJson::from),
        price_minor: g.price_minor,
        target: g.target,
        slots: g.slots,
        joined: g.joined,
        starts_at_ms: g.starts_at_ms,
        deadline_ms: g.deadline_ms,
        closed: g.closed,
        started_by: g.started_by,
        changed_at_ms: g.changed_at_ms,
        server_time_ms,
    })
}

fn coupon_json(a: v1::CommerceAnswer) -> Result<CouponJson, ApiError> {
    let server_time_ms = a.server_time_ms;
    let Some(commerce_answer::Object::Coupon(c)) = a.object else {
        return Err(not_this_kind("coupon"));
    };
    Ok(CouponJson {
        coupon_id: c.coupon_id,
        group_id: c.group_id,
        title: c.title,
        amount_minor: c.amount_minor,
        min_spend_minor: c.min_spend_minor,
        currency: c.currency,
        quantity: c.quantity,
        claimed: c.claimed,
        per_buyer_limit: c.per_buyer_limit,
        expires_at_ms: c.expires_at_ms,
        issued_by: c.issued_by,
        issued_at_ms: c.issued_at_ms,
        server_time_ms,
    })
}

fn poll_json(a: v1::CommerceAnswer) -> Result<PollJson, ApiError> {
    let server_time_ms = a.server_time_ms;
    let Some(commerce_answer::Object::Poll(p)) = a.object else {
        return Err(not_this_kind("poll"));
    };
    Ok(PollJson {
        poll_id: p.poll_id,
        group_id: p.group_id,
        question: p.question,
        options: p
            .options
            .into_iter()
            .map(|o| PollOptionJson {
                text: o.text,
                votes: o.votes,
            })
            .collect(),
        deadline_ms: p.deadline_ms,
        votes_final: p.votes_final,
        closed: p.closed,
        voters: p.voters,
        opened_by: p.opened_by,
        opened_at_ms: p.opened_at_ms,
        server_time_ms,
    })
}

fn not_this_kind(kind: &str) -> ApiError {
    ApiError::new(
        ErrorCode::UnknownObject,
        format!("the group has no {kind} with that id"),
    )
}

// ─────────────────────────────── handlers ───────────────────────────────

type Shared_ = State<Arc<Shared>>;

/// Reads the object at `/v1/groups/{group_id}/…/{id}` as the kind that
/// `convert` accepts (another kind is `UNKNOWN_OBJECT`).
async fn read_object<T>(
    shared: &Shared,
    headers: &HeaderMap,
    path: Result<Path<(u64, u64)>, PathRejection>,
    convert: fn(v1::CommerceAnswer) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let who = caller(shared, headers)?;
    let Path((group_id, id)) = path?;
    let a = shared
        .groups
        .commerce_object(&who, group_id, id, now_ms())
        .await?;
    convert(a)
}

/// Ends the object at the path (cancel a group-buy, close a poll), after
/// checking it is the kind `convert` accepts: ending a poll through the
/// group-buy route would be a surprise.
async fn end_object<T>(
    shared: &Shared,
    headers: &HeaderMap,
    path: Result<Path<(u64, u64)>, PathRejection>,
    convert: fn(v1::CommerceAnswer) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let who = caller(shared, headers)?;
    let Path((group_id, id)) = path?;
    let now = now_ms();
    convert(
        shared
            .groups
            .commerce_object(&who, group_id, id, now)
            .await?,
    )?;
    convert(shared.groups.end_commerce(&who, group_id, id, now).await?)
}

async fn openapi() -> Response {
    static JSON: OnceLock<Result<serde_json::Value, String>> = OnceLock::new();
    match JSON.get_or_init(|| serde_norway::from_str(OPENAPI_YAML).map_err(|e| e.to_string())) {
        Ok(doc) => axum::Json(doc).into_response(),
        Err(e) => ApiError::new(ErrorCode::Internal, format!("openapi.yaml: {e}")).into_response(),
    }
}

async fn put_product(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<ProductInput>, JsonRejection>,
) -> ApiResult<ProductJson> {
    let who = caller(&shared, &headers)?;
    let Path(product_id) = path?;
    let Json(p) = body?;
    let product = v1::Product {
        product_id,
        shop_id: String::new(),
        title: p.title,
        image_url: p.image_url,
        price_minor: p.price_minor,
        member_price_minor: p.member_price_minor,
        currency: p.currency,
        stock_hint: p.stock_hint,
        link: p.link,
        sold_out: p.sold_out,
        version: 0,
        updated_at_ms: 0,
    };
    let saved = shared.groups.put_product(&who, product, now_ms()).await?;
    ok(saved.into())
}

async fn get_product(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<ProductJson> {
    let who = caller(&shared, &headers)?;
    let Path(product_id) = path?;
    ok(shared.groups.product(&who, &product_id).await?.into())
}

async fn post_card(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<u64>, PathRejection>,
    body: Result<Json<CardInput>, JsonRejection>,
) -> ApiResult<CardJson> {
    let who = caller(&shared, &headers)?;
    let Path(group_id) = path?;
    let Json(c) = body?;
    let req = v1::PostCard {
        group_id,
        product_id: c.product_id,
        product: None,
    };
    let a = shared.groups.post_card(&who, req, now_ms()).await?;
    let product = match a.object {
        Some(commerce_answer::Object::Product(p)) => Some(p.into()),
        _ => None,
    };
    created(CardJson {
        group_id,
        seq: a.seq,
        product,
    })
}

async fn start_group_buy(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<u64>, PathRejection>,
    body: Result<Json<GroupBuyInput>, JsonRejection>,
) -> ApiResult<GroupBuyJson> {
    let who = caller(&shared, &headers)?;
    let Path(group_id) = path?;
    let Json(g) = body?;
    let now = now_ms();
    let req = v1::StartGroupBuy {
        group_id,
        product_id: g.product_id,
        price_minor: g.price_minor,
        target: g.target,
        slots: g.slots,
        starts_at_ms: g.starts_at_ms,
        deadline_ms: when("deadline", g.deadline_ms, g.duration_ms, now)?,
    };
    created(group_buy_json(
        shared.groups.start_group_buy(&who, req, now).await?,
    )?)
}

async fn get_group_buy(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<(u64, u64)>, PathRejection>,
) -> ApiResult<GroupBuyJson> {
    ok(read_object(&shared, &headers, path, group_buy_json).await?)
}

async fn cancel_group_buy(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<(u64, u64)>, PathRejection>,
) -> ApiResult<GroupBuyJson> {
    ok(end_object(&shared, &headers, path, group_buy_json).await?)
}

async fn issue_coupon(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<u64>, PathRejection>,
    body: Result<Json<CouponInput>, JsonRejection>,
) -> ApiResult<CouponJson> {
    let who = caller(&shared, &headers)?;
    let Path(group_id) = path?;
    let Json(c) = body?;
    let now = now_ms();
    let req = v1::IssueCoupon {
        group_id,
        title: c.title,
        amount_minor: c.amount_minor,
        min_spend_minor: c.min_spend_minor,
        currency: c.currency,
        quantity: c.quantity,
        per_buyer_limit: c.per_buyer_limit,
        expires_at_ms: when("expires_at", c.expires_at_ms, c.expires_in_ms, now)?,
    };
    created(coupon_json(
        shared.groups.issue_coupon(&who, req, now).await?,
    )?)
}

async fn get_coupon(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<(u64, u64)>, PathRejection>,
) -> ApiResult<CouponJson> {
    ok(read_object(&shared, &headers, path, coupon_json).await?)
}

async fn open_poll(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<u64>, PathRejection>,
    body: Result<Json<PollInput>, JsonRejection>,
) -> ApiResult<PollJson> {
    let who = caller(&shared, &headers)?;
    let Path(group_id) = path?;
    let Json(p) = body?;
    let now = now_ms();
    let req = v1::OpenPoll {
        group_id,
        question: p.question,
        options: p.options,
        deadline_ms: when("deadline", p.deadline_ms, p.duration_ms, now)?,
        votes_final: p.votes_final,
    };
    created(poll_json(shared.groups.open_poll(&who, req, now).await?)?)
}

async fn get_poll(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<(u64, u64)>, PathRejection>,
) -> ApiResult<PollJson> {
    ok(read_object(&shared, &headers, path, poll_json).await?)
}

async fn close_poll(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<(u64, u64)>, PathRejection>,
) -> ApiResult<PollJson> {
    ok(end_object(&shared, &headers, path, poll_json).await?)
}

/// A group's reach quota today, as the merchant API shows it.
#[derive(Serialize)]
struct ReachJson {
    group_id: u64,
    used: u32,
    /// 0 when the quota is off.
    limit: u32,
    base: u32,
    resets_at_ms: u64,
    /// The shop's score, -1 to 1.
    score: f64,
    positive: u64,
    negative: u64,
}

async fn get_reach(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<u64>, PathRejection>,
) -> ApiResult<ReachJson> {
    let who = caller(&shared, &headers)?;
    let Path(group_id) = path?;
    let q = shared.groups.reach_quota(&who, group_id, now_ms()).await?;
    ok(ReachJson {
        group_id: q.group_id,
        used: q.used,
        limit: q.limit,
        base: q.base,
        resets_at_ms: q.resets_at_ms,
        score: f64::from(q.score_milli) / 1000.0,
        positive: q.positive,
        negative: q.negative,
    })
}

// ───────────────────────────── moderation ─────────────────────────────

/// What a moderation request did.
#[derive(Serialize)]
struct ModeratedJson {
    group_id: u64,
    /// The RECALL message's seq; 0 for the other requests.
    seq: u64,
}

impl From<v1::Moderated> for ModeratedJson {
    fn from(m: v1::Moderated) -> Self {
        Self {
            group_id: m.group_id,
            seq: m.seq,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MuteInput {
    /// 0 unmutes.
    duration_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MuteAllInput {
    muted: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveInput {
    #[serde(default)]
    ban_ms: u64,
}

async fn mute_member(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<(u64, String)>, PathRejection>,
    body: Result<Json<MuteInput>, JsonRejection>,
) -> ApiResult<ModeratedJson> {
    let who = caller(&shared, &headers)?;
    let Path((group_id, user_id)) = path?;
    let Json(m) = body?;
    let req = v1::MuteMember {
        group_id,
        user_id,
        duration_ms: m.duration_ms,
    };
    ok(shared.groups.mute_member(&who, req, now_ms()).await?.into())
}

async fn mute_all(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<u64>, PathRejection>,
    body: Result<Json<MuteAllInput>, JsonRejection>,
) -> ApiResult<ModeratedJson> {
    let who = caller(&shared, &headers)?;
    let Path(group_id) = path?;
    let Json(m) = body?;
    ok(shared
        .groups
        .mute_all_buyers(&who, group_id, m.muted)
        .await?
        .into())
}

async fn remove_member(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<(u64, String)>, PathRejection>,
    body: Result<Json<RemoveInput>, JsonRejection>,
) -> ApiResult<ModeratedJson> {
    let who = caller(&shared, &headers)?;
    let Path((group_id, user_id)) = path?;
    let Json(r) = body?;
    let req = v1::RemoveMember {
        group_id,
        user_id,
        ban_ms: r.ban_ms,
    };
    ok(shared
        .groups
        .remove_member(&who, req, now_ms())
        .await?
        .into())
}

async fn recall_message(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<(u64, u64)>, PathRejection>,
) -> ApiResult<ModeratedJson> {
    let who = caller(&shared, &headers)?;
    let Path((group_id, seq)) = path?;
    ok(shared
        .groups
        .recall(&who, group_id, seq, now_ms())
        .await?
        .into())
}

/// One buyer's report of a message.
#[derive(Serialize)]
struct ReportJson {
    seq: u64,
    reporter_id: String,
    reason: String,
    ts_ms: u64,
}

async fn get_reports(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<u64>, PathRejection>,
) -> ApiResult<Vec<ReportJson>> {
    let who = caller(&shared, &headers)?;
    let Path(group_id) = path?;
    let reports = shared.groups.reports(&who, group_id).await?;
    ok(reports
        .into_iter()
        .map(|r| ReportJson {
            seq: r.seq,
            reporter_id: r.reporter_id,
            reason: r.reason,
            ts_ms: r.ts_ms,
        })
        .collect())
}

// ───────────────────────────── FAQ and pins ─────────────────────────────

#[derive(Serialize)]
struct FaqEntryJson {
    faq_id: u64,
    question: String,
    answer: String,
    question_seq: u64,
    answer_seq: u64,
    asked_by: String,
    answered_by: String,
    created_at_ms: u64,
}

#[derive(Serialize)]
struct PinJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    message_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    faq_id: Option<u64>,
}

#[derive(Serialize)]
struct BoardJson {
    group_id: u64,
    entries: Vec<FaqEntryJson>,
    pins: Vec<PinJson>,
}

impl From<v1::FaqBoard> for BoardJson {
    fn from(b: v1::FaqBoard) -> Self {
        Self {
            group_id: b.group_id,
            entries: b
                .entries
                .into_iter()
                .map(|e| FaqEntryJson {
                    faq_id: e.faq_id,
                    question: e.question,
                    answer: e.answer,
                    question_seq: e.question_seq,
                    answer_seq: e.answer_seq,
                    asked_by: e.asked_by,
                    answered_by: e.answered_by,
                    created_at_ms: e.created_at_ms,
                })
                .collect(),
            pins: b
                .pins
                .into_iter()
                .map(|p| match p.target {
                    Some(v1::pin::Target::FaqId(id)) => PinJson {
                        message_seq: None,
                        faq_id: Some(id),
                    },
                    Some(v1::pin::Target::MessageSeq(seq)) => PinJson {
                        message_seq: Some(seq),
                        faq_id: None,
                    },
                    None => PinJson {
                        message_seq: None,
                        faq_id: None,
                    },
                })
                .collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteInput {
    question_seq: u64,
    answer_seq: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PinInput {
    #[serde(default)]
    message_seq: u64,
    #[serde(default)]
    faq_id: u64,
    #[serde(default = "yes")]
    pinned: bool,
}

fn yes() -> bool {
    true
}

async fn get_faq(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<u64>, PathRejection>,
) -> ApiResult<BoardJson> {
    let who = caller(&shared, &headers)?;
    let Path(group_id) = path?;
    ok(shared.groups.list_faq(&who, group_id).await?.into())
}

async fn promote_faq(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<u64>, PathRejection>,
    body: Result<Json<PromoteInput>, JsonRejection>,
) -> ApiResult<BoardJson> {
    let who = caller(&shared, &headers)?;
    let Path(group_id) = path?;
    let Json(p) = body?;
    let req = v1::PromoteFaq {
        group_id,
        question_seq: p.question_seq,
        answer_seq: p.answer_seq,
    };
    created(shared.groups.promote_faq(&who, req, now_ms()).await?.into())
}

async fn remove_faq(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<(u64, u64)>, PathRejection>,
) -> ApiResult<BoardJson> {
    let who = caller(&shared, &headers)?;
    let Path((group_id, faq_id)) = path?;
    ok(shared
        .groups
        .remove_faq(&who, group_id, faq_id, now_ms())
        .await?
        .into())
}

async fn set_pin(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<u64>, PathRejection>,
    body: Result<Json<PinInput>, JsonRejection>,
) -> ApiResult<BoardJson> {
    let who = caller(&shared, &headers)?;
    let Path(group_id) = path?;
    let Json(p) = body?;
    let target = match (p.message_seq, p.faq_id) {
        (seq, 0) if seq > 0 => v1::pin::Target::MessageSeq(seq),
        (0, id) if id > 0 => v1::pin::Target::FaqId(id),
        _ => {
            return Err(ApiError::invalid(
                "give exactly one of message_seq and faq_id",
            ));
        }
    };
    let req = v1::SetPin {
        group_id,
        pin: Some(v1::Pin {
            target: Some(target),
        }),
        pinned: p.pinned,
    };
    ok(shared.groups.set_pin(&who, req, now_ms()).await?.into())
}

// ───────────────────────────── screening ─────────────────────────────

#[derive(Serialize)]
struct JoinRequestsJson {
    group_id: u64,
    /// "open", "approval" or "threshold".
    policy: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    expression: String,
    requests: Vec<JoinRequestJson>,
}

#[derive(Serialize)]
struct JoinRequestJson {
    user_id: String,
    display_name: String,
    requested_at_ms: u64,
}

impl From<v1::JoinRequests> for JoinRequestsJson {
    fn from(r: v1::JoinRequests) -> Self {
        Self {
            group_id: r.group_id,
            policy: match r.policy() {
                v1::JoinPolicy::Open => "open",
                v1::JoinPolicy::Approval => "approval",
                v1::JoinPolicy::Threshold => "threshold",
            },
            expression: r.expression,
            requests: r
                .requests
                .into_iter()
                .map(|q| JoinRequestJson {
                    user_id: q.user_id,
                    display_name: q.display_name,
                    requested_at_ms: q.requested_at_ms,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyInput {
    /// "open", "approval" or "threshold".
    policy: String,
    /// For "threshold": the tag expression.
    #[serde(default)]
    expression: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideInput {
    approve: bool,
}

async fn set_join_policy(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<u64>, PathRejection>,
    body: Result<Json<PolicyInput>, JsonRejection>,
) -> ApiResult<JoinRequestsJson> {
    let who = caller(&shared, &headers)?;
    let Path(group_id) = path?;
    let Json(p) = body?;
    let policy = match p.policy.as_str() {
        "open" => v1::JoinPolicy::Open,
        "approval" => v1::JoinPolicy::Approval,
        "threshold" => v1::JoinPolicy::Threshold,
        other => {
            return Err(ApiError::invalid(format!(
                "policy {other:?}: use open, approval or threshold"
            )));
        }
    };
    ok(shared
        .groups
        .set_join_policy(&who, group_id, policy, &p.expression)
        .await?
        .into())
}

async fn list_join_requests(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<u64>, PathRejection>,
) -> ApiResult<JoinRequestsJson> {
    let who = caller(&shared, &headers)?;
    let Path(group_id) = path?;
    ok(shared
        .groups
        .list_join_requests(&who, group_id)
        .await?
        .into())
}

async fn decide_join(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<(u64, String)>, PathRejection>,
    body: Result<Json<DecideInput>, JsonRejection>,
) -> ApiResult<JoinRequestsJson> {
    let who = caller(&shared, &headers)?;
    let Path((group_id, user_id)) = path?;
    let Json(d) = body?;
    let req = v1::DecideJoin {
        group_id,
        user_id,
        approve: d.approve,
    };
    ok(shared.groups.decide_join(&who, req, now_ms()).await?.into())
}

// ───────────────────────────── tags ─────────────────────────────

#[derive(Serialize)]
struct BuyerTagsJson {
    user_id: String,
    tags: Vec<String>,
    tier: String,
}

impl From<v1::BuyerTags> for BuyerTagsJson {
    fn from(t: v1::BuyerTags) -> Self {
        Self {
            user_id: t.user_id,
            tags: t.tags,
            tier: t.tier,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TagsInput {
    tags: Vec<String>,
}

async fn get_buyer_tags(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<BuyerTagsJson> {
    let who = caller(&shared, &headers)?;
    let Path(user_id) = path?;
    ok(shared.groups.buyer_tags(&who, &user_id).await?.into())
}

/// Replaces a buyer's tags: how the shop's own systems push consumption
/// data (orders, spend band, last purchase).
async fn put_buyer_tags(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<TagsInput>, JsonRejection>,
) -> ApiResult<BuyerTagsJson> {
    let who = caller(&shared, &headers)?;
    let Path(user_id) = path?;
    let Json(t) = body?;
    ok(shared
        .groups
        .tag_buyer(&who, &user_id, t.tags, Vec::new(), true)
        .await?
        .into())
}

#[derive(Serialize)]
struct TagPoolGroupJson {
    name: String,
    description: String,
    tags: Vec<String>,
}

async fn get_tag_pool(
    State(shared): Shared_,
    headers: HeaderMap,
) -> ApiResult<Vec<TagPoolGroupJson>> {
    let who = caller(&shared, &headers)?;
    let pool = shared.groups.tag_pool(&who)?;
    ok(pool
        .groups
        .into_iter()
        .map(|g| TagPoolGroupJson {
            name: g.name,
            description: g.description,
            tags: g.tags,
        })
        .collect())
}

// ───────────────────────────── pushes and schedules ─────────────────────────────

/// What a push carries: exactly one of `product_id` and `announcement`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct PushJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    product_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    announcement: Option<String>,
    #[serde(default)]
    audience: String,
}

impl PushJson {
    fn into_wire(self) -> Result<v1::PushContent, ApiError> {
        use v1::push_content::Kind;
        let kind = match (self.product_id, self.announcement) {
            (Some(p), None) => Kind::ProductId(p),
            (None, Some(a)) => Kind::Announcement(a),
            _ => {
                return Err(ApiError::invalid(
                    "give exactly one of product_id and announcement",
                ));
            }
        };
        Ok(v1::PushContent {
            kind: Some(kind),
            audience: self.audience,
        })
    }

    fn from_wire(c: Option<v1::PushContent>) -> Self {
        use v1::push_content::Kind;
        let c = c.unwrap_or_default();
        let (product_id, announcement) = match c.kind {
            Some(Kind::ProductId(p)) => (Some(p), None),
            Some(Kind::Announcement(a)) => (None, Some(a)),
            None => (None, None),
        };
        Self {
            product_id,
            announcement,
            audience: c.audience,
        }
    }
}

#[derive(Serialize)]
struct PushedJson {
    group_id: u64,
    seq: u64,
    audience_size: u32,
}

async fn push_promotion(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<u64>, PathRejection>,
    body: Result<Json<PushJson>, JsonRejection>,
) -> ApiResult<PushedJson> {
    let who = caller(&shared, &headers)?;
    let Path(group_id) = path?;
    let Json(p) = body?;
    let req = v1::PushPromotion {
        group_id,
        content: Some(p.into_wire()?),
    };
    let a = shared.groups.push_promotion(&who, req, now_ms()).await?;
    created(PushedJson {
        group_id,
        seq: a.seq,
        audience_size: a.audience_size,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleInput {
    #[serde(default)]
    product_id: Option<String>,
    #[serde(default)]
    announcement: Option<String>,
    #[serde(default)]
    audience: String,
    first_at_ms: u64,
    #[serde(default)]
    every_ms: u64,
}

#[derive(Serialize)]
struct ScheduleJson {
    schedule_id: u64,
    #[serde(flatten)]
    push: PushJson,
    first_at_ms: u64,
    every_ms: u64,
    next_at_ms: u64,
    fired: u32,
    skipped: u32,
    last_seq: u64,
    last_outcome: String,
    created_by: String,
}

#[derive(Serialize)]
struct SchedulesJson {
    group_id: u64,
    schedules: Vec<ScheduleJson>,
    #[serde(skip_serializing_if = "is_zero")]
    created: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl From<v1::Schedules> for SchedulesJson {
    fn from(s: v1::Schedules) -> Self {
        Self {
            group_id: s.group_id,
            created: s.created,
            schedules: s
                .schedules
                .into_iter()
                .map(|s| ScheduleJson {
                    schedule_id: s.schedule_id,
                    push: PushJson::from_wire(s.content),
                    first_at_ms: s.first_at_ms,
                    every_ms: s.every_ms,
                    next_at_ms: s.next_at_ms,
                    fired: s.fired,
                    skipped: s.skipped,
                    last_seq: s.last_seq,
                    last_outcome: s.last_outcome,
                    created_by: s.created_by,
                })
                .collect(),
        }
    }
}

async fn schedule_push(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<u64>, PathRejection>,
    body: Result<Json<ScheduleInput>, JsonRejection>,
) -> ApiResult<SchedulesJson> {
    let who = caller(&shared, &headers)?;
    let Path(group_id) = path?;
    let Json(s) = body?;
    let push = PushJson {
        product_id: s.product_id,
        announcement: s.announcement,
        audience: s.audience,
    };
    let req = v1::SchedulePush {
        group_id,
        content: Some(push.into_wire()?),
        first_at_ms: s.first_at_ms,
        every_ms: s.every_ms,
    };
    created(
        shared
            .groups
            .schedule_push(&who, req, now_ms())
            .await?
            .into(),
    )
}

async fn list_schedules(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<u64>, PathRejection>,
) -> ApiResult<SchedulesJson> {
    let who = caller(&shared, &headers)?;
    let Path(group_id) = path?;
    ok(shared.groups.list_schedules(&who, group_id).await?.into())
}

async fn cancel_schedule(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<(u64, u64)>, PathRejection>,
) -> ApiResult<SchedulesJson> {
    let who = caller(&shared, &headers)?;
    let Path((group_id, id)) = path?;
    ok(shared
        .groups
        .cancel_schedule(&who, group_id, id)
        .await?
        .into())
}

// ───────────────────────────── customer service ─────────────────────────────

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct CsConfigJson {
    required_tier: String,
    agent_cap: u32,
    idle_close_ms: u64,
    proactive_base: u32,
}

impl From<qun_storage::records::CsShopRecord> for CsConfigJson {
    fn from(r: qun_storage::records::CsShopRecord) -> Self {
        Self {
            required_tier: r.required_tier,
            agent_cap: r.agent_cap,
            idle_close_ms: r.idle_close_ms,
            proactive_base: r.proactive_base,
        }
    }
}

async fn get_cs_config(State(shared): Shared_, headers: HeaderMap) -> ApiResult<CsConfigJson> {
    let who = caller(&shared, &headers)?;
    ok(shared.groups.cs_config(&who).await?.into())
}

async fn put_cs_config(
    State(shared): Shared_,
    headers: HeaderMap,
    body: Result<Json<CsConfigJson>, JsonRejection>,
) -> ApiResult<CsConfigJson> {
    let who = caller(&shared, &headers)?;
    let Json(c) = body?;
    ok(shared
        .groups
        .set_cs_config(
            &who,
            &c.required_tier,
            c.agent_cap,
            c.idle_close_ms,
            c.proactive_base,
            now_ms(),
        )
        .await?
        .into())
}

#[derive(Serialize)]
struct CsBuyerJson {
    user_id: String,
    assigned_agent: String,
    session_id: u64,
    state: &'static str,
    agent_id: String,
    blocked: bool,
}

impl From<qun_storage::records::CsBuyerRecord> for CsBuyerJson {
    fn from(r: qun_storage::records::CsBuyerRecord) -> Self {
        let state = match i32::try_from(r.state)
            .ok()
            .and_then(|s| v1::CsState::try_from(s).ok())
        {
            Some(v1::CsState::Open) => "open",
            Some(v1::CsState::Queued) => "queued",
            _ => "closed",
        };
        Self {
            user_id: r.buyer_id,
            assigned_agent: r.assigned_agent,
            session_id: r.session_id,
            state,
            agent_id: r.agent_id,
            blocked: r.blocked,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AssignInput {
    assigned_agent: String,
}

async fn get_cs_buyer(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<CsBuyerJson> {
    let who = caller(&shared, &headers)?;
    let Path(user_id) = path?;
    ok(shared.groups.cs_buyer_record(&who, &user_id).await?.into())
}

/// Assigns a buyer's exclusive agent ("" removes it).
async fn put_cs_buyer(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<AssignInput>, JsonRejection>,
) -> ApiResult<CsBuyerJson> {
    let who = caller(&shared, &headers)?;
    let Path(user_id) = path?;
    let Json(a) = body?;
    ok(shared
        .groups
        .assign_cs_agent(&who, &user_id, &a.assigned_agent)
        .await?
        .into())
}

#[derive(Serialize)]
struct PurchaseJson {
    user_id: String,
    recorded: bool,
}

/// The shop's systems report a purchase: positive buyer feedback.
async fn post_purchase(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<PurchaseJson> {
    let who = caller(&shared, &headers)?;
    let Path(user_id) = path?;
    shared
        .groups
        .record_purchase(&who, &user_id, now_ms())
        .await?;
    created(PurchaseJson {
        user_id,
        recorded: true,
    })
}

// ───────────────────────────── auto-reply ─────────────────────────────

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct AutoReplyJson {
    #[serde(default, skip_deserializing)]
    rule_id: String,
    #[serde(default)]
    keywords: Vec<String>,
    #[serde(default)]
    pattern: String,
    answer: String,
    #[serde(default)]
    cooldown_ms: u64,
}

fn rules_json(r: v1::AutoReplies) -> Vec<AutoReplyJson> {
    r.rules
        .into_iter()
        .map(|r| AutoReplyJson {
            rule_id: r.rule_id,
            keywords: r.keywords,
            pattern: r.pattern,
            answer: r.answer,
            cooldown_ms: r.cooldown_ms,
        })
        .collect()
}

async fn list_auto_replies(
    State(shared): Shared_,
    headers: HeaderMap,
) -> ApiResult<Vec<AutoReplyJson>> {
    let who = caller(&shared, &headers)?;
    ok(rules_json(shared.groups.list_auto_replies(&who).await?))
}

async fn put_auto_reply(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<AutoReplyJson>, JsonRejection>,
) -> ApiResult<Vec<AutoReplyJson>> {
    let who = caller(&shared, &headers)?;
    let Path(rule_id) = path?;
    let Json(r) = body?;
    let rule = v1::AutoReplyRule {
        rule_id,
        keywords: r.keywords,
        pattern: r.pattern,
        answer: r.answer,
        cooldown_ms: r.cooldown_ms,
    };
    ok(rules_json(shared.groups.put_auto_reply(&who, rule).await?))
}

async fn remove_auto_reply(
    State(shared): Shared_,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Vec<AutoReplyJson>> {
    let who = caller(&shared, &headers)?;
    let Path(rule_id) = path?;
    ok(rules_json(
        shared.groups.remove_auto_reply(&who, &rule_id).await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_parses_and_names_every_route() {
        let doc: serde_json::Value = serde_norway::from_str(OPENAPI_YAML).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for path in [
            "/v1/products/{product_id}",
            "/v1/groups/{group_id}/cards",
            "/v1/groups/{group_id}/group-buys",
            "/v1/groups/{group_id}/group-buys/{id}",
            "/v1/groups/{group_id}/group-buys/{id}/cancel",
            "/v1/groups/{group_id}/coupons",
            "/v1/groups/{group_id}/coupons/{id}",
            "/v1/groups/{group_id}/polls",
            "/v1/groups/{group_id}/polls/{id}",
            "/v1/groups/{group_id}/polls/{id}/close",
            "/v1/groups/{group_id}/reach",
            "/v1/groups/{group_id}/reports",
            "/v1/groups/{group_id}/mute-all",
            "/v1/groups/{group_id}/members/{user_id}/mute",
            "/v1/groups/{group_id}/members/{user_id}/remove",
            "/v1/groups/{group_id}/messages/{seq}/recall",
            "/v1/groups/{group_id}/faq",
            "/v1/groups/{group_id}/faq/{id}/remove",
            "/v1/groups/{group_id}/pins",
            "/v1/groups/{group_id}/join-policy",
            "/v1/groups/{group_id}/join-requests",
            "/v1/groups/{group_id}/join-requests/{user_id}/decide",
            "/v1/buyers/{user_id}/tags",
            "/v1/auto-replies",
            "/v1/auto-replies/{rule_id}",
            "/v1/auto-replies/{rule_id}/remove",
            "/v1/groups/{group_id}/pushes",
            "/v1/groups/{group_id}/schedules",
            "/v1/groups/{group_id}/schedules/{id}/cancel",
            "/v1/tag-pool",
            "/v1/cs/config",
            "/v1/cs/buyers/{user_id}",
            "/v1/cs/buyers/{user_id}/purchases",
        ] {
            assert!(paths.contains_key(path), "{path} is not documented");
        }
        assert_eq!(paths.len(), 33, "a documented path is not served");
    }

    #[test]
    fn statuses_follow_the_codes() {
        let status = |c| ApiError::new(c, "").status();
        assert_eq!(status(ErrorCode::WrongShop), StatusCode::FORBIDDEN);
        assert_eq!(status(ErrorCode::UnknownObject), StatusCode::NOT_FOUND);
        assert_eq!(status(ErrorCode::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(status(ErrorCode::TokenExpired), StatusCode::UNAUTHORIZED);
        assert_eq!(
            status(ErrorCode::Overloaded),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status(ErrorCode::QuotaExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
    }

    #[test]
    fn a_deadline_is_a_time_or_a_duration_never_both() {
        assert_eq!(when("deadline", 5, 0, 1).unwrap(), 5);
        assert_eq!(when("deadline", 0, 5, 1).unwrap(), 6);
        assert!(when("deadline", 5, 5, 1).is_err());
        assert!(when("deadline", 0, 0, 1).is_err());
    }
}
