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

/// Whether `role` may make this admin request (client certificates may only read).
pub fn authorize_admin_request(role: &Role, request: &AdminRequest) -> Result<(), WireError> {
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
    }
}
