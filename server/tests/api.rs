//! The REST API driven through the real router (`tower::ServiceExt::oneshot`)
//! against a fresh database per test: the auth matrix over every write,
//! every endpoint's happy path, pagination, validation errors, the allowlist
//! removing covered blocks, the abuse report, the OpenAPI document and the
//! dashboard assets. (`/metrics` has its own test binary: the recorder is
//! process-wide.)

mod common;

use std::collections::BTreeSet;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use fleetban_server::api::{self, AppState};
use fleetban_server::correlate::CorrelateConfig;
use serde_json::{Value, json};
use sqlx::PgPool;
use time::{Duration, OffsetDateTime};
use tower::ServiceExt;

fn app(pool: &PgPool) -> Router {
    api::router(AppState::new(pool.clone(), CorrelateConfig::default()))
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// Asserts the status and, for errors, the one error shape.
    fn expect(self, status: StatusCode) -> Self {
        assert_eq!(self.status, status, "body: {}", self.text());
        if status.is_client_error() || status.is_server_error() {
            let body = self.json();
            assert!(body["error"]["code"].is_string(), "{body}");
            assert!(body["error"]["message"].is_string(), "{body}");
        }
        self
    }
    fn code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or_default().to_owned()
    }
}

async fn call(app: &Router, method: Method, uri: &str, token: Option<&str>, body: Option<Value>) -> Reply {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = match body {
        Some(body) => request.header("content-type", "application/json").body(Body::from(body.to_string())),
        None => request.body(Body::empty()),
    }
    .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), 16 << 20).await.unwrap().to_vec();
    Reply { status, headers, body }
}

async fn get(app: &Router, uri: &str, token: &str) -> Reply {
    call(app, Method::GET, uri, Some(token), None).await
}

async fn audit_actions(pool: &PgPool) -> Vec<(String, String, String)> {
    sqlx::query_as("select actor, action, coalesce(target, '') from audit_log order by id")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// A concrete request for each route template.
fn concrete(path: &str) -> String {
    path.replace("{id}", "1").replace("{ip}", "203.0.113.7").replace("{name}", "spamhaus-drop")
}

fn write_body(method: &Method, path: &str) -> Option<Value> {
    match (method.as_str(), path) {
        ("POST", "/api/v1/blocks") => Some(json!({"cidr": "203.0.113.7", "reason": "test"})),
        ("POST", "/api/v1/allowlist") => Some(json!({"cidr": "198.51.100.0/24", "note": "partner"})),
        ("PATCH", "/api/v1/agents/{id}") => Some(json!({"name": "renamed"})),
        ("POST", "/api/v1/tokens") => Some(json!({"role": "read"})),
        ("POST", "/api/v1/enroll-tokens") => Some(json!({})),
        ("POST", "/api/v1/import") => Some(json!({"format": "plain", "text": "203.0.113.60\n"})),
        _ => None,
    }
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn auth_matrix_over_every_route(pool: PgPool) {
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    let public: BTreeSet<&str> =
        ["/", "/dashboard/app.js", "/dashboard/app.css", "/healthz", "/readyz", "/metrics", "/api/v1/openapi.json"]
            .into();
    // Credentials are the admin's to see.
    let admin_reads: BTreeSet<&str> = ["/api/v1/tokens", "/api/v1/enroll-tokens"].into();
    let routes = api::routes();
    let writes: Vec<_> = routes.iter().filter(|(m, _, _)| *m != Method::GET).collect();
    assert_eq!(writes.len(), 15, "every write must be in this matrix");
    for (method, path, _) in &routes {
        let uri = match *path {
            "/api/v1/allowlist" if *method == Method::DELETE => "/api/v1/allowlist?cidr=198.51.100.0/24".to_owned(),
            // Not the matrix's own admin token.
            "/api/v1/tokens/{id}" => "/api/v1/tokens/999".to_owned(),
            p => concrete(p),
        };
        let body = write_body(method, path);
        if public.contains(path) {
            let reply = call(&app, method.clone(), &uri, None, None).await;
            assert_eq!(reply.status, StatusCode::OK, "{method} {path} is public: {}", reply.text());
            continue;
        }
        // No token, a malformed header, an unknown token: 401.
        let none = call(&app, method.clone(), &uri, None, body.clone()).await.expect(StatusCode::UNAUTHORIZED);
        assert_eq!(none.code(), "unauthorized");
        let bogus = call(&app, method.clone(), &uri, Some("fbt_0000"), body.clone()).await;
        bogus.expect(StatusCode::UNAUTHORIZED);
        let mut request = Request::builder().method(method.clone()).uri(&uri).header("authorization", "Basic abc");
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let request = request.body(Body::from(body.clone().map(|b| b.to_string()).unwrap_or_default())).unwrap();
        assert_eq!(app.clone().oneshot(request).await.unwrap().status(), StatusCode::UNAUTHORIZED, "{method} {path}");

        let read = call(&app, method.clone(), &uri, Some(&t.read), body.clone()).await;
        if *method == Method::GET && !admin_reads.contains(path) {
            assert!(
                read.status != StatusCode::UNAUTHORIZED && read.status != StatusCode::FORBIDDEN,
                "read token may {method} {path}: {} {}",
                read.status,
                read.text()
            );
        } else {
            let read = read.expect(StatusCode::FORBIDDEN);
            assert_eq!(read.code(), "forbidden");
            // The admin token passes authorisation (the outcome depends on state).
            let admin = call(&app, method.clone(), &uri, Some(&t.admin), body.clone()).await;
            assert!(
                admin.status != StatusCode::UNAUTHORIZED && admin.status != StatusCode::FORBIDDEN,
                "admin may {method} {path}: {} {}",
                admin.status,
                admin.text()
            );
        }
    }
    // A revoked token is refused.
    sqlx::query("update api_tokens set revoked_at = now() where name = 'ops-read'").execute(&pool).await.unwrap();
    call(&app, Method::GET, "/api/v1/agents", Some(&t.read), None).await.expect(StatusCode::UNAUTHORIZED);
    // Tokens record their last use.
    let used: i64 = sqlx::query_scalar(
        "select count(*) from api_tokens where last_used_at is not null and name in ('ops-admin', 'ops-read')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(used, 2);
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn every_write_is_audited(pool: PgPool) {
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    let agent = common::agent(&pool, "mx1", "mx1.example.net", true, &["192.0.2.10"]).await;
    call(&app, Method::DELETE, &format!("/api/v1/agents/{agent}"), Some(&t.admin), None)
        .await
        .expect(StatusCode::NO_CONTENT);
    let block = call(
        &app,
        Method::POST,
        "/api/v1/blocks",
        Some(&t.admin),
        Some(json!({"cidr": "203.0.113.7", "reason": "manual", "ttl_secs": 600})),
    )
    .await
    .expect(StatusCode::CREATED)
    .json();
    let id = block["id"].as_i64().unwrap();
    call(&app, Method::DELETE, &format!("/api/v1/blocks/{id}"), Some(&t.admin), None)
        .await
        .expect(StatusCode::NO_CONTENT);
    let allowed = call(
        &app,
        Method::POST,
        "/api/v1/allowlist",
        Some(&t.admin),
        Some(json!({"cidr": "198.51.100.0/24", "note": "partner"})),
    )
    .await
    .expect(StatusCode::CREATED)
    .json();
    call(&app, Method::DELETE, "/api/v1/allowlist?cidr=198.51.100.0/24", Some(&t.admin), None)
        .await
        .expect(StatusCode::NO_CONTENT);
    call(&app, Method::POST, "/api/v1/allowlist", Some(&t.admin), Some(json!({"cidr": "198.51.100.9"})))
        .await
        .expect(StatusCode::CREATED);
    let entry: i64 = sqlx::query_scalar("select id from allowlist").fetch_one(&pool).await.unwrap();
    assert_ne!(Some(entry), allowed["entry"]["id"].as_i64());
    call(&app, Method::DELETE, &format!("/api/v1/allowlist/{entry}"), Some(&t.admin), None)
        .await
        .expect(StatusCode::NO_CONTENT);
    // Refused and failed writes leave no trace.
    call(&app, Method::DELETE, "/api/v1/blocks/999", Some(&t.admin), None).await.expect(StatusCode::NOT_FOUND);
    call(&app, Method::POST, "/api/v1/blocks", Some(&t.read), Some(json!({"cidr": "203.0.113.8", "reason": "x"})))
        .await
        .expect(StatusCode::FORBIDDEN);

    // Credential and agent lifecycle.
    let mx2 = common::agent(&pool, "mx2", "mx2.example.net", false, &[]).await;
    call(&app, Method::PATCH, &format!("/api/v1/agents/{mx2}"), Some(&t.admin), Some(json!({"name": "mx3"})))
        .await
        .expect(StatusCode::OK);
    call(&app, Method::POST, &format!("/api/v1/agents/{mx2}/revoke"), Some(&t.admin), None)
        .await
        .expect(StatusCode::NO_CONTENT);
    let token = call(&app, Method::POST, "/api/v1/tokens", Some(&t.admin), Some(json!({"role": "read", "name": "ci"})))
        .await
        .expect(StatusCode::CREATED)
        .json();
    call(&app, Method::DELETE, &format!("/api/v1/tokens/{}", token["id"]), Some(&t.admin), None)
        .await
        .expect(StatusCode::NO_CONTENT);
    let enroll = call(&app, Method::POST, "/api/v1/enroll-tokens", Some(&t.admin), Some(json!({"uses": 3})))
        .await
        .expect(StatusCode::CREATED)
        .json();
    call(&app, Method::DELETE, &format!("/api/v1/enroll-tokens/{}", enroll["id"]), Some(&t.admin), None)
        .await
        .expect(StatusCode::NO_CONTENT);

    let actions = audit_actions(&pool).await;
    let enroll_id = enroll["id"].to_string();
    let expected = vec![
        ("ops-admin".to_owned(), "agent.remove".to_owned(), agent.to_string()),
        ("ops-admin".to_owned(), "block.create".to_owned(), "203.0.113.7/32".to_owned()),
        ("ops-admin".to_owned(), "block.delete".to_owned(), "203.0.113.7/32".to_owned()),
        ("ops-admin".to_owned(), "allowlist.create".to_owned(), "198.51.100.0/24".to_owned()),
        ("ops-admin".to_owned(), "allowlist.delete".to_owned(), "198.51.100.0/24".to_owned()),
        ("ops-admin".to_owned(), "allowlist.create".to_owned(), "198.51.100.9/32".to_owned()),
        ("ops-admin".to_owned(), "allowlist.delete".to_owned(), "198.51.100.9/32".to_owned()),
        ("ops-admin".to_owned(), "agent.rename".to_owned(), mx2.to_string()),
        ("ops-admin".to_owned(), "agent.revoke".to_owned(), mx2.to_string()),
        ("ops-admin".to_owned(), "token.create".to_owned(), "ci".to_owned()),
        ("ops-admin".to_owned(), "token.revoke".to_owned(), "ci".to_owned()),
        ("ops-admin".to_owned(), "enroll_token.create".to_owned(), enroll_id.clone()),
        ("ops-admin".to_owned(), "enroll_token.revoke".to_owned(), enroll_id),
    ];
    assert_eq!(actions, expected);
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn agents_list_get_and_revoke(pool: PgPool) {
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    let mx1 = common::agent(&pool, "mx1", "mx1.example.net", true, &["192.0.2.10", "2001:db8::10"]).await;
    let mx2 = common::agent(&pool, "mx2", "mx2.example.net", false, &[]).await;
    let list = get(&app, "/api/v1/agents", &t.read).await.expect(StatusCode::OK).json();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["id"], mx1.to_string());
    assert_eq!(list[0]["name"], "mx1");
    assert_eq!(list[0]["hostname"], "mx1.example.net");
    assert_eq!(list[0]["connected"], true);
    assert_eq!(list[0]["addresses"], json!(["192.0.2.10", "2001:db8::10"]));
    for key in ["version", "last_seen", "blocklist_version", "firewall_entries"] {
        assert!(!list[0][key].is_null(), "{key}");
    }
    assert_eq!(list[1]["connected"], false);

    let one = get(&app, &format!("/api/v1/agents/{mx2}"), &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(one["name"], "mx2");
    get(&app, &format!("/api/v1/agents/{}", uuid::Uuid::new_v4()), &t.read).await.expect(StatusCode::NOT_FOUND);
    let bad = get(&app, "/api/v1/agents/not-a-uuid", &t.read).await.expect(StatusCode::BAD_REQUEST);
    assert_eq!(bad.code(), "bad_request");

    call(&app, Method::POST, &format!("/api/v1/agents/{mx1}/revoke"), Some(&t.admin), None)
        .await
        .expect(StatusCode::NO_CONTENT);
    let (revoked, connected): (bool, bool) =
        sqlx::query_as("select revoked_at is not null, connected from agents where id = $1")
            .bind(mx1)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(revoked && !connected);
    let shown = get(&app, &format!("/api/v1/agents/{mx1}"), &t.read).await.expect(StatusCode::OK).json();
    assert!(shown["revoked_at"].is_string());
    assert!(shown["removed_at"].is_null());
    assert_eq!(shown["connected"], false);
    let again = call(&app, Method::POST, &format!("/api/v1/agents/{mx1}/revoke"), Some(&t.admin), None)
        .await
        .expect(StatusCode::CONFLICT);
    assert_eq!(again.code(), "conflict");
    call(&app, Method::POST, &format!("/api/v1/agents/{}/revoke", uuid::Uuid::new_v4()), Some(&t.admin), None)
        .await
        .expect(StatusCode::NOT_FOUND);
    call(&app, Method::DELETE, &format!("/api/v1/agents/{}", uuid::Uuid::new_v4()), Some(&t.admin), None)
        .await
        .expect(StatusCode::NOT_FOUND);
}

/// Rename, revoke and remove: names stay unique among the fleet's agents, a
/// removed agent leaves the list (its history stays) and frees its name.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn agents_rename_and_remove(pool: PgPool) {
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    let mx1 = common::agent(&pool, "mx1", "mx1.example.net", true, &[]).await;
    let mx2 = common::agent(&pool, "mx2", "mx2.example.net", true, &[]).await;
    let now = OffsetDateTime::now_utc();
    common::event(&pool, mx1, 1, now - Duration::seconds(5), "auth_failed", "203.0.113.7", "line").await;

    // Rename: to a free name; a taken one (any case) is 409 naming the holder.
    let path = format!("/api/v1/agents/{mx1}");
    let renamed = call(&app, Method::PATCH, &path, Some(&t.admin), Some(json!({"name": "mx1-old"})))
        .await
        .expect(StatusCode::OK)
        .json();
    assert_eq!(renamed["name"], "mx1-old");
    assert_eq!(renamed["id"], mx1.to_string());
    let taken = call(&app, Method::PATCH, &path, Some(&t.admin), Some(json!({"name": "MX2"})))
        .await
        .expect(StatusCode::CONFLICT);
    assert!(taken.text().contains(&mx2.to_string()), "{}", taken.text());
    call(&app, Method::PATCH, &path, Some(&t.admin), Some(json!({"name": ""}))).await.expect(StatusCode::BAD_REQUEST);
    call(&app, Method::PATCH, &path, Some(&t.admin), Some(json!({"name": "x", "extra": 1})))
        .await
        .expect(StatusCode::BAD_REQUEST);
    call(&app, Method::PATCH, &path, Some(&t.read), Some(json!({"name": "x"}))).await.expect(StatusCode::FORBIDDEN);

    // Remove: revokes, leaves the list, keeps the row and the events.
    call(&app, Method::DELETE, &path, Some(&t.admin), None).await.expect(StatusCode::NO_CONTENT);
    let list = get(&app, "/api/v1/agents", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(list.as_array().unwrap().iter().map(|a| a["name"].clone()).collect::<Vec<_>>(), [json!("mx2")]);
    let all = get(&app, "/api/v1/agents?removed=true", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(all.as_array().unwrap().len(), 2);
    assert!(all[1]["removed_at"].is_string() && all[1]["revoked_at"].is_string(), "{all}");
    let events = get(&app, "/api/v1/events?ip=203.0.113.7", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(events[0]["agent"], "mx1-old", "history stays attached: {events}");
    let again = call(&app, Method::DELETE, &path, Some(&t.admin), None).await.expect(StatusCode::CONFLICT);
    assert!(again.text().contains("already removed"), "{}", again.text());
    call(&app, Method::PATCH, &path, Some(&t.admin), Some(json!({"name": "mx9"}))).await.expect(StatusCode::CONFLICT);
    // Its name is free again.
    call(&app, Method::PATCH, &format!("/api/v1/agents/{mx2}"), Some(&t.admin), Some(json!({"name": "mx1-old"})))
        .await
        .expect(StatusCode::OK);
    // A revoked agent can still be removed (the usual way out for a dead host).
    call(&app, Method::POST, &format!("/api/v1/agents/{mx2}/revoke"), Some(&t.admin), None)
        .await
        .expect(StatusCode::NO_CONTENT);
    call(&app, Method::DELETE, &format!("/api/v1/agents/{mx2}"), Some(&t.admin), None)
        .await
        .expect(StatusCode::NO_CONTENT);
    let detail: Value =
        sqlx::query_scalar("select detail from audit_log where action = 'agent.remove' order by id desc")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(detail, json!({"name": "mx1-old", "was_revoked": true}));
}

/// API tokens over the API: created once with their text, listed without it,
/// refused once revoked or expired with a message that says so.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn api_tokens_list_revoke_and_expire(pool: PgPool) {
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    let created = call(
        &app,
        Method::POST,
        "/api/v1/tokens",
        Some(&t.admin),
        Some(json!({"role": "read", "name": "grafana", "ttl_secs": 3600})),
    )
    .await
    .expect(StatusCode::CREATED)
    .json();
    let token = created["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("fbt_") && created["prefix"] == token[..12], "{created}");
    assert!(created["expires_at"].is_string());
    get(&app, "/api/v1/agents", &token).await.expect(StatusCode::OK);

    let listed = get(&app, "/api/v1/tokens", &t.admin).await.expect(StatusCode::OK);
    assert!(!listed.text().contains(&token), "a listing shows a token");
    assert!(!listed.text().contains(&t.read) && !listed.text().contains(&t.admin));
    let listed = listed.json();
    let grafana = listed.as_array().unwrap().iter().find(|x| x["name"] == "grafana").unwrap().clone();
    assert_eq!(grafana["prefix"], created["prefix"]);
    assert_eq!(grafana["role"], "read");
    assert_eq!(grafana["active"], true);
    assert!(grafana["last_used_at"].is_string() && grafana["expires_at"].is_string(), "{grafana}");
    assert!(grafana.get("token").is_none() && grafana.get("token_hash").is_none(), "{grafana}");

    // Expired: refused, saying so and how to get another.
    sqlx::query("update api_tokens set expires_at = now() - interval '1 minute' where name = 'grafana'")
        .execute(&pool)
        .await
        .unwrap();
    let refused = get(&app, "/api/v1/agents", &token).await.expect(StatusCode::UNAUTHORIZED);
    let message = refused.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("expired at") && message.contains("tokens create"), "{message}");
    let active = get(&app, "/api/v1/tokens", &t.admin).await.expect(StatusCode::OK).json();
    assert!(active.as_array().unwrap().iter().all(|x| x["name"] != "grafana"), "expired ones are hidden: {active}");
    let all = get(&app, "/api/v1/tokens?all=true", &t.admin).await.expect(StatusCode::OK).json();
    assert_eq!(all.as_array().unwrap().len(), 3);

    // Revoked: refused, saying so; revoking twice is 409, an unknown id 404.
    let ops_read: i64 =
        sqlx::query_scalar("select id from api_tokens where name = 'ops-read'").fetch_one(&pool).await.unwrap();
    call(&app, Method::DELETE, &format!("/api/v1/tokens/{ops_read}"), Some(&t.admin), None)
        .await
        .expect(StatusCode::NO_CONTENT);
    let refused = get(&app, "/api/v1/agents", &t.read).await.expect(StatusCode::UNAUTHORIZED);
    assert!(refused.text().contains("was revoked at"), "{}", refused.text());
    call(&app, Method::DELETE, &format!("/api/v1/tokens/{ops_read}"), Some(&t.admin), None)
        .await
        .expect(StatusCode::CONFLICT);
    call(&app, Method::DELETE, "/api/v1/tokens/99999", Some(&t.admin), None).await.expect(StatusCode::NOT_FOUND);
    let unknown = get(&app, "/api/v1/agents", "fbt_0000").await.expect(StatusCode::UNAUTHORIZED);
    assert!(unknown.text().contains("unknown token"), "{}", unknown.text());

    // Bad bodies.
    for body in [json!({"role": "root"}), json!({"role": "read", "ttl_secs": 0}), json!({"role": "read", "x": 1})] {
        call(&app, Method::POST, "/api/v1/tokens", Some(&t.admin), Some(body)).await.expect(StatusCode::BAD_REQUEST);
    }
}

/// Enrollment tokens over the API: created, listed without their text,
/// revoked; expired, used-up and revoked tokens are refused at enrollment
/// with their own messages.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn enroll_tokens_list_revoke_and_expire(pool: PgPool) {
    use fleetban_server::auth::{self, AuthError};
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    let create = |body: Value| call(&app, Method::POST, "/api/v1/enroll-tokens", Some(&t.admin), Some(body));
    let one =
        create(json!({"uses": 1, "ttl_secs": 600, "note": "mx1 rollout"})).await.expect(StatusCode::CREATED).json();
    let two = create(json!({"uses": 2})).await.expect(StatusCode::CREATED).json();
    let three = create(json!({})).await.expect(StatusCode::CREATED).json();
    let token = |v: &Value| v["token"].as_str().unwrap().to_owned();
    assert!(token(&one).starts_with("fbe_") && one["prefix"] == token(&one)[..12]);
    // Default lifetime: 24 h.
    let expires =
        OffsetDateTime::parse(three["expires_at"].as_str().unwrap(), &time::format_description::well_known::Rfc3339)
            .unwrap();
    assert!((expires - OffsetDateTime::now_utc() - Duration::hours(24)).abs() < Duration::minutes(1));

    auth::enroll(&pool, &token(&one), "mx1.example.net", "0.1.0", &[]).await.unwrap();
    let listed = get(&app, "/api/v1/enroll-tokens?all=true", &t.admin).await.expect(StatusCode::OK);
    for v in [&one, &two, &three] {
        assert!(!listed.text().contains(&token(v)), "a listing shows a token");
    }
    let listed = listed.json();
    let first = listed.as_array().unwrap().iter().find(|x| x["id"] == one["id"]).unwrap();
    assert_eq!((first["uses_left"].clone(), first["uses_granted"].clone()), (json!(0), json!(1)));
    assert_eq!(first["note"], "mx1 rollout");
    assert_eq!(first["active"], false);
    assert!(first["last_used_at"].is_string());
    let active = get(&app, "/api/v1/enroll-tokens", &t.admin).await.expect(StatusCode::OK).json();
    assert_eq!(active.as_array().unwrap().len(), 2, "the used-up one is hidden: {active}");
    get(&app, "/api/v1/enroll-tokens", &t.read).await.expect(StatusCode::FORBIDDEN);

    let used_up = auth::enroll(&pool, &token(&one), "mx2", "0.1.0", &[]).await.unwrap_err();
    assert!(matches!(used_up, AuthError::TokenUsedUp), "{used_up:?}");
    call(&app, Method::DELETE, &format!("/api/v1/enroll-tokens/{}", two["id"]), Some(&t.admin), None)
        .await
        .expect(StatusCode::NO_CONTENT);
    call(&app, Method::DELETE, &format!("/api/v1/enroll-tokens/{}", two["id"]), Some(&t.admin), None)
        .await
        .expect(StatusCode::CONFLICT);
    let revoked = auth::enroll(&pool, &token(&two), "mx2", "0.1.0", &[]).await.unwrap_err();
    assert!(matches!(revoked, AuthError::TokenRevoked), "{revoked:?}");
    sqlx::query("update enrollment_tokens set expires_at = now() - interval '1 second' where id = $1")
        .bind(three["id"].as_i64().unwrap())
        .execute(&pool)
        .await
        .unwrap();
    let expired = auth::enroll(&pool, &token(&three), "mx2", "0.1.0", &[]).await.unwrap_err();
    assert!(expired.to_string().contains("expired at") && expired.to_string().contains("enroll-token create"));
    for body in [json!({"uses": 0}), json!({"ttl_secs": 0}), json!({"uses": 1, "bogus": true})] {
        create(body).await.expect(StatusCode::BAD_REQUEST);
    }
}

/// The audit log: newest first, filtered by time and action, readable with a
/// read token; agent enrollments appear under their enrollment token.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn audit_log_newest_first(pool: PgPool) {
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    let token =
        fleetban_server::auth::new_enrollment_token(&pool, 1, std::time::Duration::from_secs(60), "").await.unwrap();
    let enrolled = fleetban_server::auth::enroll(&pool, &token.token, "mx1", "0.1.0", &[]).await.unwrap();
    create_block(&app, &t.admin, json!({"cidr": "203.0.113.7", "reason": "manual"})).await.expect(StatusCode::CREATED);
    call(
        &app,
        Method::PATCH,
        &format!("/api/v1/agents/{}", enrolled.agent_id),
        Some(&t.admin),
        Some(json!({"name": "mx9"})),
    )
    .await
    .expect(StatusCode::OK);
    sqlx::query(
        "insert into audit_log (at, actor, action, target) values (now() - interval '3 days', 'old', 'x.y', 't')",
    )
    .execute(&pool)
    .await
    .unwrap();

    let log = get(&app, "/api/v1/audit", &t.read).await.expect(StatusCode::OK).json();
    let rows: Vec<(String, String, String)> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap().into(),
                e["action"].as_str().unwrap().into(),
                e["target"].as_str().unwrap().into(),
            )
        })
        .collect();
    let agent = enrolled.agent_id.to_string();
    assert_eq!(
        rows,
        [
            ("ops-admin".to_owned(), "agent.rename".to_owned(), agent.clone()),
            ("ops-admin".to_owned(), "block.create".to_owned(), "203.0.113.7/32".to_owned()),
            (format!("enroll-token:{}", token.id), "agent.enroll".to_owned(), agent),
        ]
    );
    assert_eq!(log[0]["detail"], json!({"from": "mx1", "to": "mx9"}));
    assert!(log[0]["at"].is_string());
    let week = get(&app, "/api/v1/audit?since=7d", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(week.as_array().unwrap().len(), 4);
    let agents = get(&app, "/api/v1/audit?action=agent.", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(agents.as_array().unwrap().len(), 2);
    let exact = get(&app, "/api/v1/audit?action=block.create", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(exact.as_array().unwrap().len(), 1);
    let page = get(&app, "/api/v1/audit?limit=2", &t.read).await.expect(StatusCode::OK);
    let cursor = page.headers.get("x-next-cursor").unwrap().to_str().unwrap().to_owned();
    let rest =
        get(&app, &format!("/api/v1/audit?limit=2&cursor={cursor}"), &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(rest[0]["action"], "agent.enroll");
    get(&app, "/api/v1/audit?since=yesterday", &t.read).await.expect(StatusCode::BAD_REQUEST);
    call(&app, Method::GET, "/api/v1/audit", None, None).await.expect(StatusCode::UNAUTHORIZED);
}

async fn create_block(app: &Router, token: &str, body: Value) -> Reply {
    call(app, Method::POST, "/api/v1/blocks", Some(token), Some(body)).await
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn blocks_create_list_filter_delete(pool: PgPool) {
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    let mx1 = common::agent(&pool, "mx1", "mx1.example.net", true, &["192.0.2.10"]).await;
    let mx2 = common::agent(&pool, "mx2", "mx2.example.net", true, &["192.0.2.11"]).await;
    let now = OffsetDateTime::now_utc();
    common::evidence(&pool, mx1, "203.0.113.7", "auth_failed", 12, now - Duration::minutes(5), "line a").await;
    common::evidence(&pool, mx2, "203.0.113.7", "refused_too_many", 3, now - Duration::minutes(1), "line b").await;

    let created =
        create_block(&app, &t.admin, json!({"cidr": "203.0.113.7", "reason": "brute force", "ttl_secs": 3600}))
            .await
            .expect(StatusCode::CREATED)
            .json();
    assert_eq!(created["cidr"], "203.0.113.7/32");
    assert_eq!(created["source"], "manual");
    assert_eq!(created["reason"], "brute force");
    assert_eq!(created["created_by"], "ops-admin");
    assert_eq!(created["active"], true);
    assert_eq!(created["evidence"]["agents"], 2);
    assert_eq!(created["evidence"]["events"], 15);
    assert_eq!(created["evidence"]["kinds"], json!(["auth_failed", "refused_too_many"]));
    assert!(created["evidence"]["first_seen"].is_string() && created["evidence"]["last_seen"].is_string());
    let expires =
        OffsetDateTime::parse(created["expires_at"].as_str().unwrap(), &time::format_description::well_known::Rfc3339)
            .unwrap();
    assert!((expires - now - Duration::hours(1)).abs() < Duration::minutes(1), "{expires}");
    let id = created["id"].as_i64().unwrap();
    // The block is versioned like any other: an `add` change exists.
    let ops: Vec<String> = sqlx::query_scalar("select op from block_changes where block_id = $1 order by version")
        .bind(id)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(ops, ["add"]);

    // Permanent range block; host bits are cleared.
    let range = create_block(&app, &t.admin, json!({"cidr": "198.51.100.77/24", "reason": "spam run"}))
        .await
        .expect(StatusCode::CREATED)
        .json();
    assert_eq!(range["cidr"], "198.51.100.0/24");
    assert!(range["expires_at"].is_null());

    // Filters.
    let list = get(&app, "/api/v1/blocks", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[0]["id"], range["id"], "newest first");
    let contains = get(&app, "/api/v1/blocks?contains=198.51.100.5", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(
        contains.as_array().unwrap().iter().map(|b| b["cidr"].clone()).collect::<Vec<_>>(),
        [json!("198.51.100.0/24")]
    );
    let exact = get(&app, "/api/v1/blocks?cidr=203.0.113.7/32", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(exact.as_array().unwrap().len(), 1);
    let one = get(&app, &format!("/api/v1/blocks/{id}"), &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(one["id"], id);
    get(&app, "/api/v1/blocks/424242", &t.read).await.expect(StatusCode::NOT_FOUND);

    // Delete: gone from the active list, kept with active=false, a `remove` change.
    call(&app, Method::DELETE, &format!("/api/v1/blocks/{id}"), Some(&t.admin), None)
        .await
        .expect(StatusCode::NO_CONTENT);
    let active = get(&app, "/api/v1/blocks?active=true", &t.read).await.expect(StatusCode::OK).json();
    assert!(active.as_array().unwrap().iter().all(|b| b["id"] != id));
    let all = get(&app, "/api/v1/blocks?active=false", &t.read).await.expect(StatusCode::OK).json();
    let gone = all.as_array().unwrap().iter().find(|b| b["id"] == id).unwrap();
    assert_eq!(gone["active"], false);
    assert!(gone["revoked_at"].is_string());
    let ops: Vec<String> = sqlx::query_scalar("select op from block_changes where block_id = $1 order by version")
        .bind(id)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(ops, ["add", "remove"]);
    let again = call(&app, Method::DELETE, &format!("/api/v1/blocks/{id}"), Some(&t.admin), None)
        .await
        .expect(StatusCode::CONFLICT);
    assert_eq!(again.code(), "conflict");
    call(&app, Method::DELETE, "/api/v1/blocks/424242", Some(&t.admin), None).await.expect(StatusCode::NOT_FOUND);
    call(&app, Method::DELETE, "/api/v1/blocks/abc", Some(&t.admin), None).await.expect(StatusCode::BAD_REQUEST);
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn block_validation_and_policy(pool: PgPool) {
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    common::agent(&pool, "mx1", "mx1.example.net", true, &["192.0.2.10"]).await;
    let bad = [
        json!({"cidr": "203.0.113.300", "reason": "x"}),
        json!({"cidr": "not an ip", "reason": "x"}),
        json!({"cidr": "203.0.113.7", "reason": ""}),
        json!({"cidr": "203.0.113.7", "reason": "x".repeat(300)}),
        json!({"cidr": "203.0.113.7", "reason": "x", "ttl_secs": 0}),
        json!({"cidr": "203.0.113.7", "reason": "x", "ttl_secs": -5}),
        json!({"cidr": "203.0.113.7", "reason": "x", "colour": "red"}),
        json!({"reason": "x"}),
    ];
    for body in bad {
        let reply = create_block(&app, &t.admin, body.clone()).await.expect(StatusCode::BAD_REQUEST);
        assert_eq!(reply.code(), "bad_request", "{body}");
    }
    // Malformed JSON, wrong content type, oversized body.
    let request = Request::post("/api/v1/blocks")
        .header("authorization", format!("Bearer {}", t.admin))
        .header("content-type", "application/json")
        .body(Body::from("{\"cidr\": "))
        .unwrap();
    assert_eq!(app.clone().oneshot(request).await.unwrap().status(), StatusCode::BAD_REQUEST);
    let huge = json!({"cidr": "203.0.113.7", "reason": "x".repeat(api::MAX_BODY_BYTES)});
    let reply = create_block(&app, &t.admin, huge).await.expect(StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.code(), "payload_too_large");

    // Policy: over-broad without force, never_block, the fleet's own address.
    let broad = create_block(&app, &t.admin, json!({"cidr": "203.0.0.0/8", "reason": "x"}))
        .await
        .expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(broad.code(), "refused");
    assert!(broad.json()["error"]["message"].as_str().unwrap().contains("203.0.0.0/8"));
    create_block(&app, &t.admin, json!({"cidr": "203.0.0.0/8", "reason": "x", "force": true}))
        .await
        .expect(StatusCode::CREATED);
    // Absurd TTLs are clamped, not an internal error.
    let forever = create_block(&app, &t.admin, json!({"cidr": "203.0.113.99", "reason": "x", "ttl_secs": u64::MAX}))
        .await
        .expect(StatusCode::CREATED)
        .json();
    assert!(forever["expires_at"].as_str().unwrap() > "2100", "{forever}");
    let allow_forever = call(
        &app,
        Method::POST,
        "/api/v1/allowlist",
        Some(&t.admin),
        Some(json!({"cidr": "198.18.0.0/24", "ttl_secs": u64::MAX})),
    )
    .await
    .expect(StatusCode::CREATED)
    .json();
    assert!(allow_forever["entry"]["expires_at"].as_str().unwrap() > "2100", "{allow_forever}");
    create_block(&app, &t.admin, json!({"cidr": "10.1.2.3", "reason": "x"}))
        .await
        .expect(StatusCode::UNPROCESSABLE_ENTITY);
    // A range holding an agent's own address: agents' word never vetoes an
    // operator (it vetoes automatic blocks only).
    create_block(&app, &t.admin, json!({"cidr": "192.0.2.0/24", "reason": "x"})).await.expect(StatusCode::CREATED);
    // Allowlisted target.
    call(&app, Method::POST, "/api/v1/allowlist", Some(&t.admin), Some(json!({"cidr": "198.51.100.0/24"})))
        .await
        .expect(StatusCode::CREATED);
    let allowed = create_block(&app, &t.admin, json!({"cidr": "198.51.100.9", "reason": "x", "force": true}))
        .await
        .expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(allowed.json()["error"]["message"].as_str().unwrap().contains("198.51.100.0/24"), "{}", allowed.text());
    // Bad query parameters.
    for uri in [
        "/api/v1/blocks?limit=0",
        "/api/v1/blocks?limit=1001",
        "/api/v1/blocks?limit=x",
        "/api/v1/blocks?contains=nope",
        "/api/v1/blocks?cursor=zz",
        "/api/v1/blocks?active=maybe",
        "/api/v1/blocks?bogus=1",
    ] {
        get(&app, uri, &t.read).await.expect(StatusCode::BAD_REQUEST);
    }
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn blocks_paginate_without_gaps_or_repeats(pool: PgPool) {
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    for i in 1..=7 {
        create_block(&app, &t.admin, json!({"cidr": format!("203.0.113.{i}"), "reason": "r"}))
            .await
            .expect(StatusCode::CREATED);
    }
    let mut seen = Vec::new();
    let mut uri = "/api/v1/blocks?limit=3".to_owned();
    let mut pages = 0;
    loop {
        let reply = get(&app, &uri, &t.read).await.expect(StatusCode::OK);
        pages += 1;
        let page = reply.json();
        let ids: Vec<i64> = page.as_array().unwrap().iter().map(|b| b["id"].as_i64().unwrap()).collect();
        assert!(ids.len() <= 3);
        seen.extend(ids);
        match reply.headers.get("x-next-cursor") {
            Some(cursor) => uri = format!("/api/v1/blocks?limit=3&cursor={}", cursor.to_str().unwrap()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let mut sorted = seen.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    sorted.dedup();
    assert_eq!(seen, sorted, "newest first, no repeats");
    assert_eq!(seen.len(), 7);
}

/// An allowlist entry suppresses the live blocks it overlaps without
/// removing them (no change reaches the agents but the allowlist itself),
/// and removing the entry leaves them live, so they are enforced again.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn allowlist_suppresses_covered_blocks_until_it_is_removed(pool: PgPool) {
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    let mut ids = Vec::new();
    for cidr in ["198.51.100.7", "198.51.100.64/26", "198.51.100.0/24", "203.0.113.9"] {
        let b = create_block(&app, &t.admin, json!({"cidr": cidr, "reason": "r"})).await.expect(StatusCode::CREATED);
        ids.push(b.json()["id"].as_i64().unwrap());
    }
    let before: i64 = sqlx::query_scalar("select count(*) from block_changes").fetch_one(&pool).await.unwrap();
    let reply = call(
        &app,
        Method::POST,
        "/api/v1/allowlist",
        Some(&t.admin),
        Some(json!({"cidr": "198.51.100.0/24", "note": "partner relay", "ttl_secs": 86400})),
    )
    .await
    .expect(StatusCode::CREATED)
    .json();
    assert_eq!(reply["entry"]["cidr"], "198.51.100.0/24");
    assert_eq!(reply["entry"]["note"], "partner relay");
    assert_eq!(reply["entry"]["created_by"], "ops-admin");
    assert!(reply["entry"]["expires_at"].is_string());
    assert_eq!(reply["suppressed_blocks"], json!([ids[0], ids[1], ids[2]]));
    assert_eq!(reply["removed_blocks"], json!([]));
    let changes: i64 = sqlx::query_scalar("select count(*) from block_changes").fetch_one(&pool).await.unwrap();
    assert_eq!(changes, before, "suppressing writes no block change");
    assert_eq!(fleetban_server::push::live_allowlist(&pool).await.unwrap(), ["198.51.100.0/24".parse().unwrap()]);
    // The block list says which blocks agents no longer enforce.
    let listed = get(&app, "/api/v1/blocks", &t.read).await.expect(StatusCode::OK).json();
    let suppressed = |listed: &Value, id: i64| {
        listed.as_array().unwrap().iter().find(|b| b["id"] == id).unwrap()["suppressed"].clone()
    };
    assert_eq!(suppressed(&listed, ids[0]), "whole");
    assert_eq!(suppressed(&listed, ids[2]), "whole");
    assert_eq!(suppressed(&listed, ids[3]), Value::Null);
    // Policy refuses new blocks inside it meanwhile.
    create_block(&app, &t.admin, json!({"cidr": "198.51.100.200", "reason": "r"}))
        .await
        .expect(StatusCode::UNPROCESSABLE_ENTITY);

    let list = get(&app, "/api/v1/allowlist", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let dup = call(&app, Method::POST, "/api/v1/allowlist", Some(&t.admin), Some(json!({"cidr": "198.51.100.0/24"})))
        .await
        .expect(StatusCode::CONFLICT);
    assert_eq!(dup.code(), "conflict");
    for body in [json!({"cidr": "x"}), json!({"cidr": "198.51.100.0/24", "ttl_secs": 0}), json!({"note": "n"})] {
        call(&app, Method::POST, "/api/v1/allowlist", Some(&t.admin), Some(body)).await.expect(StatusCode::BAD_REQUEST);
    }
    call(&app, Method::DELETE, "/api/v1/allowlist?cidr=203.0.113.0/24", Some(&t.admin), None)
        .await
        .expect(StatusCode::NOT_FOUND);
    call(&app, Method::DELETE, "/api/v1/allowlist?cidr=bad", Some(&t.admin), None)
        .await
        .expect(StatusCode::BAD_REQUEST);
    call(&app, Method::DELETE, "/api/v1/allowlist?cidr=198.51.100.0/24", Some(&t.admin), None)
        .await
        .expect(StatusCode::NO_CONTENT);
    let list = get(&app, "/api/v1/allowlist", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(list, json!([]));
    call(&app, Method::DELETE, "/api/v1/allowlist/77", Some(&t.admin), None).await.expect(StatusCode::NOT_FOUND);
    // Unallowed: every block it suppressed is live and pushed as before,
    // and the agents receive an allowlist without the range.
    let active = get(&app, "/api/v1/blocks", &t.read).await.expect(StatusCode::OK).json();
    let mut active: Vec<i64> = active.as_array().unwrap().iter().map(|b| b["id"].as_i64().unwrap()).collect();
    active.sort_unstable();
    assert_eq!(active, ids, "the suppressed blocks are enforced again");
    let listed = get(&app, "/api/v1/blocks", &t.read).await.expect(StatusCode::OK).json();
    assert!(listed.as_array().unwrap().iter().all(|b| b["suppressed"].is_null()), "{listed}");
    let snapshot = fleetban_server::blocks::snapshot(&pool).await.unwrap();
    assert_eq!(snapshot.entries.len(), 4);
    assert!(fleetban_server::push::live_allowlist(&pool).await.unwrap().is_empty());
}

/// `allow` has the breadth guard `block` has: broader than /16 (IPv4) or
/// /32 (IPv6) needs `force`.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn broad_allowlist_entries_need_force(pool: PgPool) {
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    for cidr in ["0.0.0.0/0", "198.0.0.0/15", "2001:db8::/31", "::/0"] {
        let refused = call(&app, Method::POST, "/api/v1/allowlist", Some(&t.admin), Some(json!({"cidr": cidr})))
            .await
            .expect(StatusCode::UNPROCESSABLE_ENTITY);
        assert!(refused.json()["error"]["message"].as_str().unwrap().contains("needs force"), "{cidr}");
    }
    assert!(fleetban_server::push::live_allowlist(&pool).await.unwrap().is_empty(), "a refusal writes nothing");
    for cidr in ["198.51.0.0/16", "2001:db8::/32"] {
        call(&app, Method::POST, "/api/v1/allowlist", Some(&t.admin), Some(json!({"cidr": cidr})))
            .await
            .expect(StatusCode::CREATED);
    }
    call(&app, Method::POST, "/api/v1/allowlist", Some(&t.admin), Some(json!({"cidr": "0.0.0.0/0", "force": true})))
        .await
        .expect(StatusCode::CREATED);
}

/// Two agents; 203.0.113.7 hits both, 203.0.113.8 one; events for timelines.
async fn seed_attack(pool: &PgPool) -> (uuid::Uuid, uuid::Uuid, OffsetDateTime) {
    let mx1 = common::agent(pool, "mx1", "mx1.example.net", true, &["192.0.2.10"]).await;
    let mx2 = common::agent(pool, "mx2", "mx2.example.net", true, &["192.0.2.11"]).await;
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let raw = |host: &str, ip: &str| {
        format!(
            "2026-11-27 01:00:00 dovecot_login authenticator failed for ({host}) [{ip}]:41000 I=[192.0.2.10]:587: \
             535 Incorrect authentication data (set_id=info@example.com)"
        )
    };
    for i in 0..6 {
        let t = now - Duration::seconds(30 + i);
        common::event(pool, mx1, 1, t, "auth_failed", "203.0.113.7", &raw("mx1.example.net", "203.0.113.7")).await;
        common::event(pool, mx2, 1, t, "connect", "203.0.113.7", "connection line").await;
    }
    common::event(pool, mx2, 2, now - Duration::hours(3), "auth_failed", "203.0.113.8", &raw("mx2", "203.0.113.8"))
        .await;
    common::evidence(
        pool,
        mx1,
        "203.0.113.7",
        "auth_failed",
        6,
        now - Duration::seconds(30),
        &raw("mx1.example.net", "203.0.113.7"),
    )
    .await;
    common::evidence(pool, mx2, "203.0.113.7", "refused_too_many", 2, now - Duration::seconds(40), "refused line")
        .await;
    common::evidence(pool, mx2, "203.0.113.8", "auth_failed", 40, now - Duration::hours(3), &raw("mx2", "203.0.113.8"))
        .await;
    (mx1, mx2, now)
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn attackers_rank_and_detail(pool: PgPool) {
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    seed_attack(&pool).await;
    fleetban_server::asn::import(&pool, "203.0.113.0\t203.0.113.255\t64500\tNL\tEXAMPLE-NET\n".as_bytes())
        .await
        .unwrap();
    create_block(&app, &t.admin, json!({"cidr": "203.0.113.7", "reason": "r"})).await.expect(StatusCode::CREATED);

    let list = get(&app, "/api/v1/attackers", &t.read).await.expect(StatusCode::OK).json();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    // Two hosts beat one host with more events.
    assert_eq!(list[0]["ip"], "203.0.113.7");
    assert_eq!(list[0]["hosts"], 2);
    assert_eq!(list[0]["events"], 8);
    assert_eq!(list[0]["kinds"], json!(["auth_failed", "refused_too_many"]));
    assert_eq!(list[0]["blocked"], true);
    assert_eq!(list[0]["asn"], json!({"asn": 64500, "name": "EXAMPLE-NET", "country": "NL"}));
    assert_eq!(list[1]["ip"], "203.0.113.8");
    assert_eq!(list[1]["blocked"], false);
    let recent = get(&app, "/api/v1/attackers?since=1h&limit=5", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(recent.as_array().unwrap().len(), 1);
    let limited = get(&app, "/api/v1/attackers?limit=1", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(limited.as_array().unwrap().len(), 1);
    get(&app, "/api/v1/attackers?since=yesterday", &t.read).await.expect(StatusCode::BAD_REQUEST);

    let detail = get(&app, "/api/v1/attackers/203.0.113.7", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(detail["summary"]["hosts"], 2);
    assert_eq!(detail["asn"]["asn"], 64500);
    let hosts = detail["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 2);
    assert_eq!(hosts[0]["agent"], "mx1");
    assert_eq!(hosts[0]["hostname"], "mx1.example.net");
    assert!(hosts[0]["sample_raw"].as_str().unwrap().contains("535 Incorrect authentication data"));
    let timeline = detail["timeline"].as_array().unwrap();
    assert_eq!(timeline.len(), 12);
    assert!(timeline.iter().any(|e| e["agent"] == "mx2" && e["kind"] == "connect"));
    assert!(timeline.iter().any(|e| e["raw"].as_str().unwrap_or_default().contains("set_id=info@example.com")));
    assert_eq!(detail["blocks"][0]["cidr"], "203.0.113.7/32");
    assert_eq!(detail["blocks"][0]["active"], true);
    get(&app, "/api/v1/attackers/198.51.100.200", &t.read).await.expect(StatusCode::NOT_FOUND);
    get(&app, "/api/v1/attackers/not-an-ip", &t.read).await.expect(StatusCode::BAD_REQUEST);
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn events_filter_and_keyset_pagination(pool: PgPool) {
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    let (mx1, _mx2, now) = seed_attack(&pool).await;
    // 13 events in total; several share a timestamp, which the keyset must handle.
    let mut seen = Vec::new();
    let mut uri = "/api/v1/events?limit=5".to_owned();
    loop {
        let reply = get(&app, &uri, &t.read).await.expect(StatusCode::OK);
        let page = reply.json();
        for e in page.as_array().unwrap() {
            seen.push((e["time"].as_str().unwrap().to_owned(), e["id"].as_i64().unwrap()));
        }
        match reply.headers.get("x-next-cursor") {
            Some(c) => uri = format!("/api/v1/events?limit=5&cursor={}", c.to_str().unwrap()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 13);
    let ids: BTreeSet<i64> = seen.iter().map(|(_, id)| *id).collect();
    assert_eq!(ids.len(), 13, "no event repeated across pages");
    let times: Vec<OffsetDateTime> = seen
        .iter()
        .map(|(t, _)| OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first");

    let by_ip = get(&app, "/api/v1/events?ip=203.0.113.8", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(by_ip.as_array().unwrap().len(), 1);
    let by_range = get(&app, "/api/v1/events?ip=203.0.113.0/24", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(by_range.as_array().unwrap().len(), 13);
    let by_agent = get(&app, "/api/v1/events?agent=mx1", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(by_agent.as_array().unwrap().len(), 6);
    let by_id =
        get(&app, &format!("/api/v1/events?agent={mx1}&kind=auth_failed"), &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(by_id.as_array().unwrap().len(), 6);
    assert_eq!(by_id[0]["agent"], "mx1");
    assert_eq!(by_id[0]["remote"], "203.0.113.7/32");
    let by_kind = get(&app, "/api/v1/events?kind=connect", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(by_kind.as_array().unwrap().len(), 6);
    let since = get(&app, "/api/v1/events?since=1h", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(since.as_array().unwrap().len(), 12);
    let until = (now - Duration::hours(1)).format(&time::format_description::well_known::Rfc3339).unwrap();
    let old = get(&app, &format!("/api/v1/events?until={until}"), &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(old.as_array().unwrap().len(), 1);

    for uri in [
        "/api/v1/events?ip=x",
        "/api/v1/events?agent=nobody",
        "/api/v1/events?kind=DROP%20TABLE",
        "/api/v1/events?since=tomorrow",
        "/api/v1/events?cursor=abc",
        "/api/v1/events?limit=0",
    ] {
        get(&app, uri, &t.read).await.expect(StatusCode::BAD_REQUEST);
    }
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn stats_count_the_fleet(pool: PgPool) {
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    let (mx1, _, _) = seed_attack(&pool).await;
    common::agent(&pool, "mx3", "mx3.example.net", false, &[]).await;
    create_block(&app, &t.admin, json!({"cidr": "203.0.113.7", "reason": "r"})).await.expect(StatusCode::CREATED);
    create_block(&app, &t.admin, json!({"cidr": "203.0.113.8", "reason": "r"})).await.expect(StatusCode::CREATED);
    // mx1 has applied everything, mx2 nothing.
    sqlx::query("update agents set blocklist_version = (select max(version) from block_changes) where id = $1")
        .bind(mx1)
        .execute(&pool)
        .await
        .unwrap();
    let stats = get(&app, "/api/v1/stats", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(stats["events_per_sec_1m"].as_f64().unwrap(), 12.0 / 60.0);
    assert_eq!(stats["events_per_sec_1h"].as_f64().unwrap(), 12.0 / 3600.0);
    assert_eq!(stats["events_by_kind_1h"], json!({"auth_failed": 6, "connect": 6}));
    assert_eq!(stats["active_blocks"], 2);
    assert_eq!(stats["blocks_by_source"], json!({"manual": 2}));
    assert_eq!(stats["agents_connected"], 2);
    assert_eq!(stats["agents_total"], 3);
    assert_eq!(stats["max_versions_behind"], stats["blocklist_version"]);
    assert!(stats["propagation_lag_secs"].as_f64().unwrap() >= 0.0);
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn abuse_report_contents(pool: PgPool) {
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    seed_attack(&pool).await;
    create_block(&app, &t.admin, json!({"cidr": "203.0.113.7", "reason": "fleet abuse", "ttl_secs": 21600}))
        .await
        .expect(StatusCode::CREATED);

    let reply = get(&app, "/api/v1/reports/abuse?target=203.0.113.7", &t.read).await.expect(StatusCode::OK);
    assert!(reply.headers["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = reply.text();
    assert!(text.contains("Abuse report: SMTP abuse from 203.0.113.7"), "{text}");
    assert!(text.contains("203.0.113.7 caused 8 abusive SMTP events against 2 of our mail servers"), "{text}");
    assert!(text.contains("Our logs also hold 6 SMTP connections from 203.0.113.7"), "{text}");
    assert!(text.contains("State: blocked"), "{text}");
    // The evidence is the abuse lines the summary counts, not connections.
    assert!(text.contains("Evidence: 6 log lines") && !text.contains("connection line"), "{text}");
    assert!(text.contains(" UTC and "), "{text}");
    assert!(text.contains("Blocked now: 203.0.113.7/32 on all our mail servers since"), "{text}");
    assert!(text.contains("(reason: fleet abuse)"), "{text}");
    assert!(text.contains("535 Incorrect authentication data"), "{text}");
    assert!(text.contains("mx1.example.net"), "{text}");
    assert!(!text.contains("Network: AS"), "no ASN data loaded: {text}");

    fleetban_server::asn::import(&pool, "203.0.113.0\t203.0.113.255\t64500\tNL\tEXAMPLE-NET\n".as_bytes())
        .await
        .unwrap();
    let redacted = get(&app, "/api/v1/reports/abuse?target=203.0.113.0/24&redact=true", &t.read)
        .await
        .expect(StatusCode::OK)
        .text();
    assert!(redacted.contains("Network: AS64500 EXAMPLE-NET, NL"), "{redacted}");
    assert!(redacted.contains("2 addresses in 203.0.113.0/24"), "{redacted}");
    assert!(!redacted.contains("example.net") && !redacted.contains("mx1") && !redacted.contains("mx2"), "{redacted}");
    assert!(!redacted.contains("192.0.2.10"), "{redacted}");
    assert!(!redacted.contains("info@") && !redacted.contains("example.com"), "{redacted}");
    assert!(redacted.contains("(set_id=[user])"), "{redacted}");
    assert!(redacted.contains("server-1"), "{redacted}");

    get(&app, "/api/v1/reports/abuse?target=198.51.100.1", &t.read).await.expect(StatusCode::NOT_FOUND);
    get(&app, "/api/v1/reports/abuse?target=garbage", &t.read).await.expect(StatusCode::BAD_REQUEST);
    get(&app, "/api/v1/reports/abuse", &t.read).await.expect(StatusCode::BAD_REQUEST);
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn openapi_document_covers_every_route(pool: PgPool) {
    let app = app(&pool);
    let reply = call(&app, Method::GET, "/api/v1/openapi.json", None, None).await.expect(StatusCode::OK);
    let doc = reply.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{}", doc["openapi"]);
    assert_eq!(doc["info"]["version"], fleetban_server::VERSION);
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    let paths = doc["paths"].as_object().unwrap();
    let mut documented = BTreeSet::new();
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    let routed: BTreeSet<(String, String)> =
        api::routes().iter().map(|(m, p, _)| (m.as_str().to_owned(), (*p).to_owned())).collect();
    assert_eq!(routed, documented, "router and OpenAPI document must describe the same routes");
    // Every operation documents its responses; API routes require the bearer scheme.
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()), "{method} {path}");
            if path.starts_with("/api/v1/") && path != "/api/v1/openapi.json" {
                assert_eq!(op["security"][0]["bearer"], json!([]), "{method} {path}");
            }
        }
    }
    // Referenced schemas exist.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in
        ["Agent", "Block", "Evidence", "AllowEntry", "Attacker", "AttackerDetail", "Event", "Stats", "ErrorBody"]
    {
        assert!(schemas.contains_key(name), "schema {name}");
    }
    let text = reply.text();
    for reference in text.split("\"$ref\": \"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap();
        assert!(schemas.contains_key(name), "dangling $ref {name}");
    }
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn dashboard_assets_and_fallback(pool: PgPool) {
    let app = app(&pool);
    let page = call(&app, Method::GET, "/", None, None).await.expect(StatusCode::OK);
    assert!(page.headers["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(page.headers["content-security-policy"].to_str().unwrap().contains("script-src 'self'"));
    let html = page.text();
    assert!(html.contains("id=\"token\"") && html.contains("/dashboard/app.js"), "{html}");
    let js = call(&app, Method::GET, "/dashboard/app.js", None, None).await.expect(StatusCode::OK).text();
    assert!(js.contains("sessionStorage") && js.contains("/api/v1/blocks/"), "{js}");
    assert!(!js.contains("innerHTML"), "the dashboard must not inject API data as HTML");
    call(&app, Method::GET, "/dashboard/app.css", None, None).await.expect(StatusCode::OK);
    let missing = call(&app, Method::GET, "/api/v1/nothing", None, None).await.expect(StatusCode::NOT_FOUND);
    assert_eq!(missing.code(), "not_found");
    // No CORS headers, even when asked.
    let request = Request::get("/api/v1/stats").header("origin", "https://evil.example").body(Body::empty()).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    assert!(response.headers().get("access-control-allow-origin").is_none());
}

/// `::ffff:a.b.c.d` is the IPv4 address on every REST path: block create
/// and its policy, allowlist create, list filters. Reported: mapped
/// loopback and all of IPv4 were accepted without `force`.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn mapped_addresses_are_checked_as_ipv4(pool: PgPool) {
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    common::agent(&pool, "mx1", "mx1.example.net", true, &["192.0.2.10"]).await;
    for (cidr, force) in [
        ("::ffff:127.0.0.1", false),
        ("::ffff:127.0.0.1", true),
        ("::ffff:0.0.0.0/96", false),
        ("::ffff:0.0.0.0/96", true),
        ("::ffff:10.0.0.1/128", false),
        ("::ffff:100.64.0.1", false),
        ("255.255.255.255", false),
        ("240.0.0.0/4", true),
        ("100.64.0.0/10", true),
    ] {
        let reply = create_block(&app, &t.admin, json!({"cidr": cidr, "reason": "x", "force": force}))
            .await
            .expect(StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(reply.code(), "refused", "{cidr}");
    }
    let block = create_block(&app, &t.admin, json!({"cidr": "::ffff:203.0.113.50", "reason": "x"}))
        .await
        .expect(StatusCode::CREATED)
        .json();
    assert_eq!(block["cidr"], "203.0.113.50/32");
    let found = get(&app, "/api/v1/blocks?contains=::ffff:203.0.113.50", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(found.as_array().unwrap().len(), 1, "{found}");
    let allowed =
        call(&app, Method::POST, "/api/v1/allowlist", Some(&t.admin), Some(json!({"cidr": "::ffff:203.0.113.0/120"})))
            .await
            .expect(StatusCode::CREATED)
            .json();
    assert_eq!(allowed["entry"]["cidr"], "203.0.113.0/24");
    assert_eq!(allowed["suppressed_blocks"], json!([block["id"]]));
    call(&app, Method::DELETE, "/api/v1/allowlist?cidr=::ffff:203.0.113.0/120", Some(&t.admin), None)
        .await
        .expect(StatusCode::NO_CONTENT);
}

/// Every query parameter is range-checked: out-of-range values are 400,
/// never a panic or a database error. Reported: a cursor far before year 1
/// panicked the handler, `since=2500000d` was a 500.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn out_of_range_parameters_are_400(pool: PgPool) {
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    for uri in [
        "/api/v1/events?cursor=-377705116800000000000.1",
        "/api/v1/events?cursor=253402300800000000000.1",
        "/api/v1/events?cursor=-1.1",
        "/api/v1/events?since=2500000d",
        "/api/v1/events?since=99999999999999999999d",
        "/api/v1/events?until=0001-01-01T00:00:00Z",
        "/api/v1/events?since=-1000-01-01T00:00:00Z",
        "/api/v1/events?limit=99999999999999999999",
        "/api/v1/events?ip=::ffff:1.2.3.4/200",
        "/api/v1/attackers?since=2500000d",
        "/api/v1/attackers?since=1969-12-31T23:59:59Z",
        "/api/v1/blocks?cursor=99999999999999999999",
        "/api/v1/reports/abuse?target=x",
    ] {
        let reply = get(&app, uri, &t.read).await.expect(StatusCode::BAD_REQUEST);
        assert_eq!(reply.code(), "bad_request", "{uri}");
    }
    // The ends of the accepted range work.
    for uri in [
        "/api/v1/events?cursor=0.1",
        "/api/v1/events?cursor=253402300799000000000.1",
        "/api/v1/events?since=1970-01-01T00:00:00Z&until=9999-12-31T23:59:59Z",
        "/api/v1/events?until=1970-01-01T00:00:00Z",
        "/api/v1/attackers?since=1970-01-01T00:00:00Z",
    ] {
        get(&app, uri, &t.read).await.expect(StatusCode::OK);
    }
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn shadow_decisions_are_listed_and_filtered(pool: PgPool) {
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    let correlator = fleetban_server::correlate::Correlator::new(pool.clone(), CorrelateConfig::default());
    let agent = common::agent(&pool, "mx1", "mx1.example.net", true, &[]).await;
    let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
    assert!(
        correlator
            .on_shadow_local_block(agent, net("203.0.113.7/32"), "slot_exhaustion", "held 8 of 20")
            .await
            .unwrap()
    );
    assert!(correlator.on_shadow_local_block(agent, net("198.51.100.9/32"), "auth", "10 failures").await.unwrap());
    // The same range and rule again within the hour: recorded once.
    assert!(
        !correlator.on_shadow_local_block(agent, net("203.0.113.7/32"), "slot_exhaustion", "held 9").await.unwrap()
    );
    let all = get(&app, "/api/v1/shadow", &t.read).await.expect(StatusCode::OK).json();
    let rows = all.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0]["cidr"].as_str(), rows[0]["rule"].as_str()), (Some("198.51.100.9/32"), Some("auth")));
    assert_eq!(rows[1]["evidence"]["local"]["evidence"], "held 8 of 20");
    assert_eq!(rows[1]["source"], "agent");
    let one = get(&app, "/api/v1/shadow?rule=slot_exhaustion", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(one.as_array().unwrap().len(), 1);
    let inside = get(&app, "/api/v1/shadow?contains=203.0.113.7", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(inside[0]["cidr"], "203.0.113.7/32");
    let page = get(&app, "/api/v1/shadow?limit=1", &t.read).await.expect(StatusCode::OK);
    let cursor = page.headers["x-next-cursor"].to_str().unwrap().to_owned();
    let next =
        get(&app, &format!("/api/v1/shadow?limit=1&cursor={cursor}"), &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(next[0]["cidr"], "203.0.113.7/32");
    get(&app, "/api/v1/shadow?since=yesterday", &t.read).await.expect(StatusCode::BAD_REQUEST);
    get(&app, "/api/v1/shadow?limit=0", &t.read).await.expect(StatusCode::BAD_REQUEST);
    // Nothing was blocked.
    let blocks = get(&app, "/api/v1/blocks", &t.read).await.expect(StatusCode::OK).json();
    assert!(blocks.as_array().unwrap().is_empty());
}

/// A bulk import is judged row by row and applied in one transaction; a dry
/// run reports the same and writes nothing; what is exported imports back.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn import_in_one_transaction_with_a_summary_and_export_round_trip(pool: PgPool) {
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    create_block(&app, &t.admin, json!({"cidr": "203.0.113.5", "reason": "already"})).await.expect(StatusCode::CREATED);
    call(&app, Method::POST, "/api/v1/allowlist", Some(&t.admin), Some(json!({"cidr": "192.0.2.0/28"})))
        .await
        .expect(StatusCode::CREATED);
    let deny = "# csf.deny\n\
                203.0.113.5 # lfd: already blocked - Fri Nov 27 00:00:00 2026\n\
                203.0.113.6 # lfd: 5 failed logins - Fri Nov 27 00:00:00 2026\n\
                198.0.0.0/8 # too broad\n\
                tcp|in|d=25|s=198.51.100.9\n\
                192.0.2.3 # inside the allowlist\n\
                garbage\n\
                203.0.113.6\n\
                127.0.0.1\n";
    let body = |dry_run: bool| json!({"format": "csf-deny", "text": deny, "dry_run": dry_run, "ttl_secs": 3600});
    let version = fleetban_server::blocks::current_version(&pool).await.unwrap();
    let dry = call(&app, Method::POST, "/api/v1/import", Some(&t.admin), Some(body(true)))
        .await
        .expect(StatusCode::OK)
        .json();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(fleetban_server::blocks::current_version(&pool).await.unwrap(), version, "a dry run writes nothing");
    let real = call(&app, Method::POST, "/api/v1/import", Some(&t.admin), Some(body(false)))
        .await
        .expect(StatusCode::OK)
        .json();
    for summary in [&dry, &real] {
        let lines = |key: &str| {
            summary[key].as_array().unwrap().iter().map(|r| r["line"].as_i64().unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(lines("added"), [3], "{summary}");
        assert_eq!(lines("already_present"), [2, 8], "the second line of a range in one file is present: {summary}");
        assert_eq!(lines("skipped"), [4, 5, 6, 7, 9], "{summary}");
        let reasons: Vec<&str> =
            summary["skipped"].as_array().unwrap().iter().map(|s| s["reason"].as_str().unwrap()).collect();
        assert!(reasons[0].contains("broader than /16") && reasons[0].contains("force"), "{reasons:?}");
        assert!(reasons[1].contains("advanced CSF filter"), "{reasons:?}");
        assert!(reasons[2].contains("allowlisted"), "{reasons:?}");
        assert!(reasons[3].contains("not an IP address"), "{reasons:?}");
        assert!(reasons[4].contains("never_block"), "{reasons:?}");
    }
    let (reason, ttl): (String, f64) = sqlx::query_as(
        "select reason, extract(epoch from expires_at - created_at)::float8 from blocks where cidr = '203.0.113.6/32'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((reason.as_str(), ttl), ("lfd: 5 failed logins", 3600.0));
    assert_eq!(fleetban_server::blocks::current_version(&pool).await.unwrap(), version + 1, "one new block, pushed");
    // --force takes the broad range too.
    let forced = call(
        &app,
        Method::POST,
        "/api/v1/import",
        Some(&t.admin),
        Some(json!({"format": "plain", "text": "198.0.0.0/8 # wide\n", "force": true})),
    )
    .await
    .expect(StatusCode::OK)
    .json();
    assert_eq!(forced["added"].as_array().unwrap().len(), 1, "{forced}");
    // The allowlist side: csf.allow, advanced entries skipped.
    let allow = call(
        &app,
        Method::POST,
        "/api/v1/import",
        Some(&t.admin),
        Some(json!({"format": "csf-allow", "text": "198.51.100.20 # office\ntcp|in|d=22|s=198.51.100.21\n"})),
    )
    .await
    .expect(StatusCode::OK)
    .json();
    assert_eq!((allow["added"][0]["list"].as_str(), allow["skipped"][0]["line"].as_i64()), (Some("allow"), Some(2)));
    call(&app, Method::POST, "/api/v1/import", Some(&t.admin), Some(json!({"format": "xml", "text": ""})))
        .await
        .expect(StatusCode::BAD_REQUEST);

    // Export everything as CSV and import it into a fresh database's view:
    // here, into the same one, where every row is already present.
    let csv = get(&app, "/api/v1/export?format=csv", &t.read).await.expect(StatusCode::OK).text();
    assert!(
        csv.starts_with("cidr,list,reason,ttl_secs\n") && csv.contains("203.0.113.6/32,block,lfd: 5 failed logins,")
    );
    assert!(csv.contains("198.51.100.20/32,allow,office,"), "{csv}");
    let again = call(
        &app,
        Method::POST,
        "/api/v1/import",
        Some(&t.admin),
        Some(json!({"format": "csv", "text": csv, "force": true})),
    )
    .await
    .expect(StatusCode::OK)
    .json();
    assert!(
        again["added"].as_array().unwrap().is_empty() && again["skipped"].as_array().unwrap().is_empty(),
        "{again}"
    );
    assert_eq!(again["already_present"].as_array().unwrap().len(), 5, "{again}");
    let deny_out = get(&app, "/api/v1/export?format=csf-deny", &t.read).await.expect(StatusCode::OK).text();
    assert!(
        deny_out.contains("203.0.113.6 # lfd: 5 failed logins\n") && !deny_out.contains("198.51.100.20"),
        "{deny_out}"
    );
    get(&app, "/api/v1/export?format=xml", &t.read).await.expect(StatusCode::BAD_REQUEST);
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn timeseries_whoami_and_why(pool: PgPool) {
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    let (mx1, mx2, _) = seed_attack(&pool).await;
    for (agent, ago, kind, n) in [(mx1, 5, "auth_failed", 6), (mx2, 5, "auth_failed", 2), (mx2, 50, "relay_denied", 3)]
    {
        sqlx::query(
            "insert into abuse_minutes (agent_id, minute, kind, events) \
             values ($1, date_trunc('minute', now() - make_interval(mins => $2)), $3, $4)",
        )
        .bind(agent)
        .bind(ago)
        .bind(kind)
        .bind(n)
        .execute(&pool)
        .await
        .unwrap();
    }
    for (table, column, unit) in [("slot_minutes", "minute", "minute"), ("slot_hours", "hour", "hour")] {
        sqlx::query(&format!(
            "insert into {table} (agent_id, {column}, max_connections, refused_full) \
             values ($1, date_trunc('{unit}', now() - interval '3 minutes'), 100, 7)"
        ))
        .bind(mx1)
        .execute(&pool)
        .await
        .unwrap();
    }

    let kinds = get(&app, "/api/v1/timeseries/abuse?range=1h", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(kinds["step_secs"], 60);
    assert_eq!(kinds["buckets"].as_array().unwrap().len(), 60);
    let totals: Vec<(String, i64)> = kinds["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["key"].as_str().unwrap().to_owned(), l["total"].as_i64().unwrap()))
        .collect();
    assert_eq!(totals, [("auth_failed".to_owned(), 8), ("relay_denied".to_owned(), 3)]);
    let hosts = get(&app, "/api/v1/timeseries/abuse?range=24h&by=host", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(hosts["series"][0]["key"], "mx1");
    assert_eq!(hosts["series"][1]["key"], "mx2");
    assert_eq!(hosts["series"][1]["total"], 5);
    get(&app, "/api/v1/timeseries/abuse?range=2h", &t.read).await.expect(StatusCode::BAD_REQUEST);
    get(&app, "/api/v1/timeseries/abuse?by=asn", &t.read).await.expect(StatusCode::BAD_REQUEST);
    call(&app, Method::GET, "/api/v1/timeseries/abuse", None, None).await.expect(StatusCode::UNAUTHORIZED);

    let slots = get(&app, "/api/v1/timeseries/slots?range=1h", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(slots["hosts"][0]["agent"], "mx1");
    assert_eq!(slots["hosts"][0]["smtp_accept_max"], 100);
    assert!(slots["hosts"][0]["max_connections"].as_array().unwrap().contains(&json!(100)));

    let block = create_block(&app, &t.admin, json!({"cidr": "203.0.113.7", "reason": "seen in the logs"}))
        .await
        .expect(StatusCode::CREATED)
        .json();
    assert_eq!(block["why"], "Blocked by hand by ops-admin: seen in the logs.");
    let series = get(&app, "/api/v1/timeseries/blocks?range=7d", &t.read).await.expect(StatusCode::OK).json();
    let keys: Vec<&str> = series["series"].as_array().unwrap().iter().map(|l| l["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["made", "expired", "revoked"]);
    assert_eq!(series["series"][0]["total"], 1);
    let detail = get(&app, "/api/v1/attackers/203.0.113.7", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(detail["blocks"][0]["why"], "Blocked by hand by ops-admin: seen in the logs.");
    let count = |v: Value| v.as_array().unwrap().len();
    let manual = get(&app, "/api/v1/blocks?source=manual", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(count(manual), 1);
    let auto = get(&app, "/api/v1/blocks?source=auto", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(count(auto), 0);
    let by_rule = get(&app, "/api/v1/blocks?rule=seen%20in%20the%20logs", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(count(by_rule), 1);
    let by_agent = get(&app, &format!("/api/v1/blocks?agent={mx1}"), &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(count(by_agent), 0, "a manual block has no agent evidence");
    get(&app, "/api/v1/blocks?source=robot", &t.read).await.expect(StatusCode::BAD_REQUEST);

    let abuse = get(&app, "/api/v1/events?abuse=true&limit=100", &t.read).await.expect(StatusCode::OK).json();
    let kinds: std::collections::BTreeSet<&str> =
        abuse.as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.into_iter().collect::<Vec<_>>(), ["auth_failed"], "connects are context, not abuse");
    let all = get(&app, "/api/v1/events?limit=100", &t.read).await.expect(StatusCode::OK).json();
    assert!(all.as_array().unwrap().iter().any(|e| e["kind"] == "connect"));

    let within =
        get(&app, "/api/v1/attackers?since=7d&within=203.0.113.8/32", &t.read).await.expect(StatusCode::OK).json();
    let ips: Vec<&str> = within.as_array().unwrap().iter().map(|a| a["ip"].as_str().unwrap()).collect();
    assert_eq!(ips, ["203.0.113.8"]);
    let range =
        get(&app, "/api/v1/attackers?since=7d&within=203.0.113.0/24", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(range.as_array().unwrap().len(), 2);

    // mx1 reports blocklist version 0; the block above is waiting for it.
    sqlx::query("update agents set blocklist_version = (select max(version) from block_changes) where id = $1")
        .bind(mx2)
        .execute(&pool)
        .await
        .unwrap();
    let agents = get(&app, "/api/v1/agents", &t.read).await.expect(StatusCode::OK).json();
    let lag = |name: &str| {
        agents.as_array().unwrap().iter().find(|a| a["name"] == name).unwrap()["lag_secs"].as_f64().unwrap()
    };
    assert!(lag("mx1") > 0.0, "{agents}");
    assert_eq!(lag("mx2"), 0.0, "{agents}");

    let me = get(&app, "/api/v1/whoami", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(me, json!({"name": "ops-read", "role": "read", "can_write": false}));
    let me = get(&app, "/api/v1/whoami", &t.admin).await.expect(StatusCode::OK).json();
    assert_eq!(me["role"], "admin");
    assert_eq!(me["can_write"], true);
}

/// `/api/v1/summaries`: what agents summarised, stored through ingest,
/// newest interval first, filtered, paged without gaps or repeats.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn summaries_filter_and_keyset_pagination(pool: PgPool) {
    use fleetban_proto::v1::{ContextSummary, EventBatch, EventKind, KindCount};
    use std::net::IpAddr;
    let app = app(&pool);
    let t = common::tokens(&pool).await;
    let mx1 = common::agent(&pool, "mx1", "mx1.example.net", true, &["192.0.2.10"]).await;
    let mx2 = common::agent(&pool, "mx2", "mx2.example.net", true, &["192.0.2.11"]).await;
    let ingest = fleetban_server::ingest::Ingest::new(pool.clone());
    let minute = OffsetDateTime::now_utc().unix_timestamp() / 60 * 60_000;
    let summary = |remote: &str, start: i64, kinds: &[(EventKind, u32)]| ContextSummary {
        remote: Some(remote.parse::<IpAddr>().unwrap().into()),
        service: 0,
        interval_start_ms: start,
        interval_secs: 60,
        counts: kinds
            .iter()
            .map(|(k, n)| KindCount { kind: *k as i32, lines: *n, last_seen_ms: start + 30_000 })
            .collect(),
        first_seen_ms: start + 1_000,
        last_seen_ms: start + 30_000,
        max_connection_count: 7,
        host_name: String::new(),
        samples: vec![format!("SMTP connection from [{remote}]:41000 (TCP/IP connection count = 7)")],
    };
    // Per agent: 4 intervals of 2 addresses (a relay with mail, a client
    // that only connects); 16 summaries, pairs share an interval start.
    for (agent, seq0) in [(mx1, 1u64), (mx2, 1)] {
        for i in 0..4i64 {
            let start = minute - (i + 1) * 60_000;
            let batch = EventBatch {
                seq: seq0 + i as u64,
                summaries: vec![
                    summary("198.51.100.7", start, &[(EventKind::Connect, 5), (EventKind::Accepted, 3)]),
                    summary("203.0.113.9", start, &[(EventKind::Connect, 2)]),
                ],
                ..Default::default()
            };
            assert_eq!(ingest.store(agent, batch).await.unwrap().summaries, 2);
        }
    }
    let mut seen = BTreeSet::new();
    let mut starts = Vec::new();
    let mut uri = "/api/v1/summaries?limit=3".to_owned();
    loop {
        let reply = get(&app, &uri, &t.read).await.expect(StatusCode::OK);
        for s in reply.json().as_array().unwrap() {
            let key = (
                s["agent_id"].as_str().unwrap().to_owned(),
                s["batch_seq"].as_i64().unwrap(),
                s["batch_index"].as_i64().unwrap(),
            );
            assert!(seen.insert(key), "repeated: {s}");
            starts.push(
                OffsetDateTime::parse(
                    s["interval_start"].as_str().unwrap(),
                    &time::format_description::well_known::Rfc3339,
                )
                .unwrap(),
            );
        }
        match reply.headers.get("x-next-cursor") {
            Some(c) => uri = format!("/api/v1/summaries?limit=3&cursor={}", c.to_str().unwrap()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 16, "every summary once");
    assert!(starts.windows(2).all(|w| w[0] >= w[1]), "newest interval first");

    let relay = get(&app, "/api/v1/summaries?ip=198.51.100.7&agent=mx1", &t.read).await.expect(StatusCode::OK).json();
    let relay = relay.as_array().unwrap();
    assert_eq!(relay.len(), 4);
    assert_eq!(relay[0]["agent"], "mx1");
    assert_eq!(relay[0]["remote"], "198.51.100.7/32");
    assert_eq!(relay[0]["lines"], 8);
    assert_eq!(relay[0]["kinds"], json!({"accepted": 3, "connect": 5}));
    assert_eq!(relay[0]["standing"], 3);
    assert_eq!(relay[0]["max_connection_count"], 7);
    assert_eq!(relay[0]["service"], "smtp");
    assert!(relay[0]["samples"][0].as_str().unwrap().contains("connection count = 7"));
    let accepted = get(&app, "/api/v1/summaries?kind=accepted", &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(accepted.as_array().unwrap().len(), 8);
    let since = OffsetDateTime::from_unix_timestamp(minute / 1000 - 150)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let range = get(&app, &format!("/api/v1/summaries?ip=203.0.113.0/24&since={since}"), &t.read)
        .await
        .expect(StatusCode::OK)
        .json();
    assert_eq!(range.as_array().unwrap().len(), 4, "two intervals of two agents: {range}");
    let by_id = get(&app, &format!("/api/v1/summaries?agent={mx2}"), &t.read).await.expect(StatusCode::OK).json();
    assert_eq!(by_id.as_array().unwrap().len(), 8);

    for uri in [
        "/api/v1/summaries?ip=x",
        "/api/v1/summaries?agent=nobody",
        "/api/v1/summaries?kind=auth_failed",
        "/api/v1/summaries?kind=DROP%20TABLE",
        "/api/v1/summaries?service=ftp",
        "/api/v1/summaries?since=tomorrow",
        "/api/v1/summaries?cursor=garbage",
        "/api/v1/summaries?cursor=1.2.3.4",
        "/api/v1/summaries?limit=0",
        "/api/v1/summaries?color=red",
    ] {
        let reply = get(&app, uri, &t.read).await.expect(StatusCode::BAD_REQUEST);
        assert!(reply.json()["error"]["message"].as_str().is_some(), "{uri}");
    }
}
