//! Who is on the other end of a connection, read from the certificate it presented.
//!
//! Every bayard certificate carries one SPIFFE-style URI SAN naming its role:
//! `spiffe://<trust-domain>/node/<id>`, `spiffe://<trust-domain>/client/<name>` or
//! `spiffe://<trust-domain>/admin/<name>`. The TLS layer has already checked the chain against the
//! cluster CA; this module only turns the leaf certificate into a [`Peer`].

use std::fmt;

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

/// The trust domain of certificates made by `bayard certs`.
pub const DEFAULT_TRUST_DOMAIN: &str = "bayard";

/// The role a certificate grants.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    Node { node_id: u64 },
    Admin { name: String },
    Client { name: String },
}

impl Role {
    /// The URI SAN that names this role in `trust_domain`.
    pub fn spiffe_uri(&self, trust_domain: &str) -> String {
        match self {
            Role::Node { node_id } => format!("spiffe://{trust_domain}/node/{node_id}"),
            Role::Admin { name } => format!("spiffe://{trust_domain}/admin/{name}"),
            Role::Client { name } => format!("spiffe://{trust_domain}/client/{name}"),
        }
    }

    pub fn kind_name(&self) -> &'static str {
        match self {
            Role::Node { .. } => "node",
            Role::Admin { .. } => "admin",
            Role::Client { .. } => "client",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Node { node_id } => write!(formatter, "node/{node_id}"),
            Role::Admin { name } => write!(formatter, "admin/{name}"),
            Role::Client { name } => write!(formatter, "client/{name}"),
        }
    }
}

/// An authenticated peer: the role its certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub role: Role,
    pub trust_domain: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("peer presented no certificate")]
    NoCertificate,
    #[error("peer certificate does not parse: {0}")]
    Unparsable(String),
    #[error("peer certificate has no spiffe:// URI SAN naming a bayard role")]
    NoRole,
    #[error("peer certificate names {found} roles; exactly one is allowed")]
    SeveralRoles { found: usize },
    #[error("invalid role URI `{uri}`: {reason}")]
    InvalidUri { uri: String, reason: String },
    #[error("certificate trust domain `{found}` is not this cluster's `{expected}`")]
    ForeignTrustDomain { found: String, expected: String },
}

/// Parses a role URI such as `spiffe://bayard/node/3`.
pub fn parse_role_uri(uri: &str) -> Result<(String, Role), IdentityError> {
    let invalid = |reason: &str| IdentityError::InvalidUri { uri: uri.to_string(), reason: reason.to_string() };
    let Some(rest) = uri.strip_prefix("spiffe://") else {
        return Err(invalid("not a spiffe:// URI"));
    };
    let mut parts = rest.split('/');
    let (Some(trust_domain), Some(kind), Some(name), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("expected spiffe://<trust-domain>/<role>/<name>"));
    };
    if trust_domain.is_empty() || name.is_empty() {
        return Err(invalid("empty trust domain or name"));
    }
    let role = match kind {
        "node" => {
            let node_id = name.parse::<u64>().map_err(|_| invalid("node id is not a number"))?;
            Role::Node { node_id }
        }
        "admin" => Role::Admin { name: name.to_string() },
        "client" => Role::Client { name: name.to_string() },
        _ => return Err(invalid("role must be node, admin or client")),
    };
    Ok((trust_domain.to_string(), role))
}

/// Reads the role from a leaf certificate and checks its trust domain.
pub fn peer_from_certificate(
    certificate: &CertificateDer<'_>,
    expected_trust_domain: &str,
) -> Result<Peer, IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref())
        .map_err(|error| IdentityError::Unparsable(error.to_string()))?;
    let alternative_names = parsed
        .subject_alternative_name()
        .map_err(|error| IdentityError::Unparsable(error.to_string()))?
        .ok_or(IdentityError::NoRole)?;
    let role_uris: Vec<&str> = alternative_names
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
            _ => None,
        })
        .collect();
    let uri = match role_uris.as_slice() {
        [] => return Err(IdentityError::NoRole),
        [uri] => *uri,
        several => return Err(IdentityError::SeveralRoles { found: several.len() }),
    };
    let (trust_domain, role) = parse_role_uri(uri)?;
    if trust_domain != expected_trust_domain {
        return Err(IdentityError::ForeignTrustDomain {
            found: trust_domain,
            expected: expected_trust_domain.to_string(),
        });
    }
    Ok(Peer { role, trust_domain })
}

/// Reads the peer of an established QUIC connection.
pub fn peer_of_connection(connection: &quinn::Connection, expected_trust_domain: &str) -> Result<Peer, IdentityError> {
    let identity = connection.peer_identity().ok_or(IdentityError::NoCertificate)?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().map_err(|_| IdentityError::NoCertificate)?;
    let leaf = chain.first().ok_or(IdentityError::NoCertificate)?;
    peer_from_certificate(leaf, expected_trust_domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_uris_parse() {
        assert_eq!(
            parse_role_uri("spiffe://bayard/node/3").unwrap(),
            ("bayard".to_string(), Role::Node { node_id: 3 })
        );
        assert_eq!(parse_role_uri("spiffe://prod/admin/ops").unwrap().1, Role::Admin { name: "ops".into() });
        assert!(parse_role_uri("spiffe://bayard/node/x").is_err());
        assert!(parse_role_uri("spiffe://bayard/root/x").is_err());
        assert!(parse_role_uri("https://bayard/node/1").is_err());
        assert!(parse_role_uri("spiffe://bayard/node/1/extra").is_err());
        for role in [Role::Node { node_id: 9 }, Role::Client { name: "app".into() }] {
            assert_eq!(parse_role_uri(&role.spiffe_uri("td")).unwrap(), ("td".to_string(), role));
        }
    }
}
