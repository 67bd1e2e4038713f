//! The one error type of the REST API and its JSON shape.
//!
//! Every failure a client sees is `{"error": {"code": "...", "message": "..."}}`
//! with the status of [`ApiError::status_code`]. Database and other internal
//! details are logged with `tracing` and never sent: the client gets
//! `internal` and a generic message. A database that cannot be reached (the
//! pool timed out, the connection was refused or lost, Postgres is shutting
//! down) is not the client's fault nor a bug: it is a 503
//! `database_unavailable` whose message says so, so the CLI can tell the
//! operator what is wrong.
//!
//! The extractor wrappers [`ApiJson`], [`ApiQuery`] and [`ApiPath`] turn
//! axum's own rejections (malformed JSON, a bad query string, a body over the
//! size cap) into the same shape.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Everything an API call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No token, a malformed one, or an unknown or revoked one (401).
    #[error("{0}")]
    Unauthorized(String),
    /// The token's role may not do this (403).
    #[error("{0}")]
    Forbidden(String),
    /// A parameter or body is invalid: a bad CIDR, limit, cursor, time (400).
    #[error("{0}")]
    BadRequest(String),
    /// The request body is larger than the cap (413).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The resource does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state: a duplicate allowlist
    /// entry, a block that was already removed (409).
    #[error("{0}")]
    Conflict(String),
    /// Policy refuses it: an over-broad prefix without `force`, an
    /// allowlisted or fleet-own target (422).
    #[error("{0}")]
    Refused(String),
    /// The database failed; details are logged, never sent (500, or 503
    /// when the database cannot be reached: [`crate::db::is_unavailable`]).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Another internal failure; details are logged, never sent (500).
    #[error("internal error: {0}")]
    Internal(String),
}

/// The JSON body of every error response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message of an error.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code: `unauthorized`, `forbidden`,
    /// `bad_request`, `payload_too_large`, `not_found`, `conflict`, `refused`,
    /// `internal`, `database_unavailable`.
    pub code: std::borrow::Cow<'static, str>,
    /// Human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Refused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Database(error) if crate::db::is_unavailable(error) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Database(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code sent in the body.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::Refused(_) => "refused",
            ApiError::Database(error) if crate::db::is_unavailable(error) => "database_unavailable",
            ApiError::Database(_) | ApiError::Internal(_) => "internal",
        }
    }

    /// The message sent in the body; internal details are withheld.
    fn public_message(&self) -> String {
        match self {
            ApiError::Database(error) if crate::db::is_unavailable(error) => {
                "the database is unavailable (cannot connect to Postgres); the server's log names the cause, \
                 and requests succeed again once it is back"
                    .to_owned()
            }
            ApiError::Database(_) | ApiError::Internal(_) => "internal server error".to_owned(),
            other => other.to_string(),
        }
    }

    /// A 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest(message.into())
    }

    /// A 404 with `message`.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::NotFound(message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        match &self {
            ApiError::Database(error) if crate::db::is_unavailable(error) => {
                tracing::error!(
                    error = %crate::text::Escaped(&self.to_string()), hint = crate::db::hint(error),
                    "API request failed: the database is unavailable."
                );
            }
            // Database messages can quote the client's values.
            _ if status.is_server_error() => {
                tracing::error!(error = %crate::text::Escaped(&self.to_string()), "API request failed.");
            }
            _ => {}
        }
        let body = ErrorBody { error: ErrorDetail { code: self.code().into(), message: self.public_message() } };
        (status, Json(body)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge("request body is too large".to_owned())
        } else {
            ApiError::BadRequest(rejection.body_text())
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::BadRequest(rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::BadRequest(rejection.body_text())
    }
}

/// `Json<T>` whose rejections are [`ApiError`]s.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = Json::<T>::from_request(req, state).await?;
        Ok(ApiJson(value))
    }
}

/// `Query<T>` whose rejections are [`ApiError`]s.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Query(value) = axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(ApiQuery(value))
    }
}

/// `Path<T>` whose rejections are [`ApiError`]s.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(value) = axum::extract::Path::<T>::from_request_parts(parts, state).await?;
        Ok(ApiPath(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_details_are_not_sent() {
        let error = ApiError::Database(sqlx::Error::Protocol("secret table layout".into()));
        assert_eq!(error.status_code(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(error.code(), "internal");
        assert!(!error.public_message().contains("secret"));
    }

    #[test]
    fn an_unreachable_database_is_a_503_that_says_so() {
        for error in [sqlx::Error::PoolTimedOut, sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into())] {
            let error = ApiError::Database(error);
            assert_eq!(error.status_code(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(error.code(), "database_unavailable");
            assert!(error.public_message().contains("database is unavailable"), "{}", error.public_message());
        }
    }

    #[test]
    fn every_client_error_has_its_status() {
        let cases = [
            (ApiError::Unauthorized(String::new()), 401),
            (ApiError::Forbidden(String::new()), 403),
            (ApiError::BadRequest(String::new()), 400),
            (ApiError::PayloadTooLarge(String::new()), 413),
            (ApiError::NotFound(String::new()), 404),
            (ApiError::Conflict(String::new()), 409),
            (ApiError::Refused(String::new()), 422),
        ];
        for (error, status) in cases {
            assert_eq!(error.status_code().as_u16(), status, "{error:?}");
        }
    }
}
