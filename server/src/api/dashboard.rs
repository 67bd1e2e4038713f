//! The dashboard: one page and its script and style sheet, embedded in the
//! binary (no build step at install time, no CDN). The page talks to the
//! REST API with a token the operator enters once, kept in the tab's session
//! storage; it asks `/api/v1/whoami` for the token's role and builds write
//! controls only for admin tokens. Its pages (overview with the attack,
//! block and slot series; hosts; blocks; shadow decisions; live feed; one
//! address or range) are chosen by the URL fragment and poll every five
//! seconds; charts are inline SVG drawn by the script. A strict content
//! security policy allows only the server's own scripts, styles and API.

use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS};
use axum::response::IntoResponse;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, content_type),
            (CONTENT_SECURITY_POLICY, CSP),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// The dashboard page.
#[utoipa::path(get, path = "/", tag = "dashboard",
    responses((status = 200, description = "The dashboard page", content_type = "text/html", body = String)))]
pub async fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// The dashboard script.
#[utoipa::path(get, path = "/dashboard/app.js", tag = "dashboard",
    responses((status = 200, description = "Script", content_type = "text/javascript", body = String)))]
pub async fn script() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// The dashboard style sheet.
#[utoipa::path(get, path = "/dashboard/app.css", tag = "dashboard",
    responses((status = 200, description = "Style sheet", content_type = "text/css", body = String)))]
pub async fn style() -> impl IntoResponse {
    asset("text/css; charset=utf-8", APP_CSS)
}
