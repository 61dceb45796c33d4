//! Who is calling over HTTP: a client certificate (the same roles as on QUIC) or an API key.
//!
//! A request with an `Authorization` header is judged by it alone (a wrong key is refused even
//! on a connection with a certificate: the caller asked to be that key). Without one, the
//! connection's client certificate speaks. Without either: 401. Node certificates are refused:
//! nodes talk to each other over QUIC, and a node certificate is exactly the credential the
//! threat model says may belong to a non-member.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::error::ApiError;
use crate::access::{parse_authorization, Credential, KeyRole};
use crate::transport::Role;

/// The role of the certificate a connection presented, if it presented one. Put into every
/// request's extensions by the server.
#[derive(Debug, Clone)]
pub struct ConnectionCertificate(pub Option<Role>);

/// How the caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    Certificate,
    ApiKey { id: String },
}

/// An authenticated caller.
#[derive(Clone)]
pub struct Caller {
    /// What it may do: a client or admin role (keys act as the role they were made with).
    pub role: Role,
    /// A read-only key: searches and gets only.
    pub read_only: bool,
    pub credentials: Credentials,
    /// The caller's place among its requests in progress, held as long as the request.
    pub slot: Option<std::sync::Arc<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Caller")
            .field("role", &self.role)
            .field("read_only", &self.read_only)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl Caller {
    /// The name its per-identity limits are counted under (`client/app`, `key/3fa…`).
    pub fn identity(&self) -> String {
        match &self.credentials {
            Credentials::Certificate => self.role.to_string(),
            Credentials::ApiKey { id } => format!("key/{id}"),
        }
    }

    pub fn is_admin(&self) -> bool {
        matches!(self.role, Role::Admin { .. })
    }
}

/// Judges a request's credentials: the `Authorization` header when there is one, else the
/// connection's certificate.
pub fn authenticate(
    authorization: Option<&str>,
    certificate: Option<&Role>,
    keys: &crate::access::ApiKeyTable,
) -> Result<Caller, ApiError> {
    if let Some(header) = authorization {
        let credential = parse_authorization(header).map_err(ApiError::unauthenticated)?;
        let key = match &credential {
            Credential::IdAndSecret { id, secret } => keys.verify(id, secret),
            Credential::Secret(secret) => keys.verify_secret(secret),
        };
        let Some(key) = key else {
            crate::telemetry::metrics::record_refused_connection("http_unknown_key");
            return Err(ApiError::unauthenticated("unknown or revoked API key"));
        };
        let name = format!("key-{}", key.name);
        let role = match key.role {
            KeyRole::Client => Role::Client { name },
            KeyRole::Admin => Role::Admin { name },
        };
        return Ok(Caller {
            role,
            read_only: key.read_only,
            credentials: Credentials::ApiKey { id: key.id.clone() },
            slot: None,
        });
    }
    match certificate {
        Some(Role::Node { node_id }) => Err(ApiError::forbidden(format!(
            "a node certificate (node {node_id}) may not use the HTTP API; use a client or admin certificate or an \
             API key"
        ))),
        Some(role) => {
            Ok(Caller { role: role.clone(), read_only: false, credentials: Credentials::Certificate, slot: None })
        }
        None => {
            crate::telemetry::metrics::record_refused_connection("http_no_credentials");
            Err(ApiError::unauthenticated(
                "no credentials: send `Authorization: ApiKey base64(id:key)` or `Bearer <key>`, or connect with a \
                 client certificate",
            ))
        }
    }
}

impl FromRequestParts<std::sync::Arc<super::HttpState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &std::sync::Arc<super::HttpState>,
    ) -> Result<Self, Self::Rejection> {
        let authorization = match parts.headers.get(axum::http::header::AUTHORIZATION) {
            Some(value) => {
                Some(value.to_str().map_err(|_| ApiError::unauthenticated("the Authorization header is not ASCII"))?)
            }
            None => None,
        };
        let certificate = parts.extensions.get::<ConnectionCertificate>().and_then(|found| found.0.as_ref());
        let mut caller = authenticate(authorization, certificate, &state.backend.api_keys())?;
        // Before the body is read: a caller's slow uploads count against its own requests.
        caller.slot = Some(std::sync::Arc::from(state.backend.admit(&caller)?));
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{encode_api_key, new_key, ApiKeyTable, KeyChange};

    #[test]
    fn who_is_calling_from_a_table() {
        let mut keys = ApiKeyTable::default();
        let (reader, reader_secret) = new_key("reader", KeyRole::Client, true).unwrap();
        let (ops, ops_secret) = new_key("ops", KeyRole::Admin, false).unwrap();
        keys.apply(&KeyChange::Create(reader.clone())).unwrap();
        keys.apply(&KeyChange::Create(ops.clone())).unwrap();
        let app = Role::Client { name: "app".into() };
        let reader_header = format!("ApiKey {}", encode_api_key(&reader.id, &reader_secret));
        let ops_header = format!("Bearer {ops_secret}");
        let wrong_header = format!("ApiKey {}", encode_api_key(&reader.id, &ops_secret));

        let caller = authenticate(Some(&reader_header), None, &keys).unwrap();
        assert!(caller.read_only && !caller.is_admin());
        assert_eq!(caller.identity(), format!("key/{}", reader.id));
        let caller = authenticate(Some(&ops_header), None, &keys).unwrap();
        assert!(caller.is_admin() && !caller.read_only);
        let caller = authenticate(None, Some(&app), &keys).unwrap();
        assert_eq!(caller.identity(), "client/app");
        // A wrong key is refused even with a certificate; no credentials at all is a 401.
        assert_eq!(authenticate(Some(&wrong_header), Some(&app), &keys).unwrap_err().status, 401);
        assert_eq!(authenticate(None, None, &keys).unwrap_err().status, 401);
        assert_eq!(authenticate(Some("Basic eDp5"), None, &keys).unwrap_err().status, 401);
        assert_eq!(authenticate(None, Some(&Role::Node { node_id: 2 }), &keys).unwrap_err().status, 403);
        keys.apply(&KeyChange::Revoke { id: reader.id }).unwrap();
        assert_eq!(authenticate(Some(&reader_header), None, &keys).unwrap_err().status, 401);
    }
}
