//! Every failure of the HTTP door as JSON with a fitting status, never a blanket 500.
//!
//! One shape serves both audiences: Bayard's scripts read `error.code` and `error.message`;
//! Elasticsearch clients read `error.type`, `error.reason`, `error.root_cause` and `status`.
//!
//! ```json
//! {"error": {"code": "invalid_query", "message": "…", "type": "parsing_exception", "reason": "…",
//!            "root_cause": [{"type": "parsing_exception", "reason": "…"}]}, "status": 400}
//! ```

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::protocol::{ErrorCode, WireError};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// Bayard's name for the error (`invalid_argument`, `not_found`, …).
    pub code: &'static str,
    /// Elasticsearch's name for it (`illegal_argument_exception`, …).
    pub elastic_type: &'static str,
    pub message: String,
    /// Extra fields Elasticsearch puts in the error object (`index`, `resource.id`, …).
    pub extra: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, elastic_type: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, elastic_type, message: message.into(), extra: Vec::new() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_argument", "illegal_argument_exception", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "resource_not_found_exception", message)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", "security_exception", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "permission_denied", "security_exception", message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", "content_too_long_exception", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::CONFLICT, "conflict", "version_conflict_engine_exception", message)
    }

    pub fn index_not_found(index: &str) -> Self {
        let mut error = ApiError::new(
            StatusCode::NOT_FOUND,
            "index_not_found",
            "index_not_found_exception",
            format!("no such index [{index}]"),
        );
        error.extra = vec![
            ("index", index.to_string()),
            ("resource.type", "index_or_alias".to_string()),
            ("resource.id", index.to_string()),
        ];
        error
    }

    /// The `error` object (for per-item errors of `_bulk` and `_msearch`).
    pub fn error_object(&self) -> serde_json::Value {
        let mut cause = json!({"type": self.elastic_type, "reason": self.message});
        for (key, value) in &self.extra {
            cause[*key] = json!(value);
        }
        let mut error = cause.clone();
        error["root_cause"] = json!([cause]);
        error["code"] = json!(self.code);
        error["message"] = json!(self.message);
        error
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": self.error_object(), "status": self.status.as_u16()})
    }
}

impl From<WireError> for ApiError {
    fn from(error: WireError) -> Self {
        let (status, elastic_type) = match error.code {
            ErrorCode::InvalidArgument => (StatusCode::BAD_REQUEST, "illegal_argument_exception"),
            ErrorCode::InvalidQuery => (StatusCode::BAD_REQUEST, "parsing_exception"),
            ErrorCode::MalformedFrame | ErrorCode::UnknownStreamKind | ErrorCode::UnsupportedVersion => {
                (StatusCode::BAD_REQUEST, "illegal_argument_exception")
            }
            ErrorCode::FrameTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "content_too_long_exception"),
            ErrorCode::PermissionDenied => (StatusCode::FORBIDDEN, "security_exception"),
            ErrorCode::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout_exception"),
            ErrorCode::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable_shards_exception"),
            ErrorCode::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "es_rejected_execution_exception"),
            ErrorCode::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "exception"),
        };
        ApiError::new(status, error.code.name(), elastic_type, error.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert("www-authenticate", HeaderValue::from_static("ApiKey, Bearer, Certificate"));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
