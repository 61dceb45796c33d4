//! Who may open which kind of stream (design §2). Checked on every stream before its body is read.
//!
//! | kind              | node | admin | client                    |
//! |-------------------|------|-------|---------------------------|
//! | Raft, Membership  | yes  | no    | no                        |
//! | Admin             | yes  | yes   | read-only (status, peers) |
//! | Client            | yes  | yes   | yes                       |

use crate::protocol::{AdminRequest, ErrorCode, StreamKind, WireError};
use crate::transport::Role;

/// Whether `role` may open a stream of `kind` at all.
pub fn authorize_stream(role: &Role, kind: StreamKind) -> Result<(), WireError> {
    let allowed = match (role, kind) {
        (Role::Node { .. }, _) => true,
        (_, StreamKind::Raft | StreamKind::Membership) => false,
        (Role::Admin { .. } | Role::Client { .. }, StreamKind::Admin | StreamKind::Client) => true,
    };
    if allowed {
        return Ok(());
    }
    Err(WireError::new(
        ErrorCode::PermissionDenied,
        format!("permission denied: {} certificate may not open {} streams", role.kind_name(), kind.name()),
    ))
}

/// Whether `role` may make this admin request (client certificates may only read; API keys are
/// managed by admins only).
pub fn authorize_admin_request(role: &Role, request: &AdminRequest) -> Result<(), WireError> {
    if request.is_key_management() && !matches!(role, Role::Admin { .. }) {
        return Err(WireError::new(
            ErrorCode::PermissionDenied,
            format!(
                "permission denied: {} certificate may not run `{}`; API keys are managed with an admin certificate",
                role.kind_name(),
                request.name()
            ),
        ));
    }
    if matches!(role, Role::Client { .. }) && !request.is_read_only() {
        return Err(WireError::new(
            ErrorCode::PermissionDenied,
            format!("permission denied: client certificate may not run `{}`; use an admin certificate", request.name()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_of_design_section_two_holds() {
        let node = Role::Node { node_id: 1 };
        let admin = Role::Admin { name: "ops".into() };
        let client = Role::Client { name: "app".into() };
        for kind in [StreamKind::Raft, StreamKind::Membership, StreamKind::Client, StreamKind::Admin] {
            assert!(authorize_stream(&node, kind).is_ok());
        }
        for role in [&admin, &client] {
            assert!(authorize_stream(role, StreamKind::Client).is_ok());
            assert!(authorize_stream(role, StreamKind::Admin).is_ok());
            for kind in [StreamKind::Raft, StreamKind::Membership] {
                let error = authorize_stream(role, kind).unwrap_err();
                assert_eq!(error.code, ErrorCode::PermissionDenied);
            }
        }
        let error = authorize_stream(&client, StreamKind::Raft).unwrap_err();
        assert_eq!(error.message, "permission denied: client certificate may not open raft streams");
        assert!(authorize_admin_request(&client, &AdminRequest::Status).is_ok());
        assert!(authorize_admin_request(&client, &AdminRequest::Peers).is_ok());
        // Keys: admins only, not even nodes.
        assert!(authorize_admin_request(&admin, &AdminRequest::ListKeys).is_ok());
        for role in [&node, &client] {
            let error = authorize_admin_request(role, &AdminRequest::ListKeys).unwrap_err();
            assert!(error.message.contains("admin certificate"), "{}", error.message);
        }
    }
}
