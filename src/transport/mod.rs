//! QUIC + mutual TLS: the one endpoint a node has, the frames on its streams, and who is on the
//! other end. Nothing here knows what a search or a Raft message is; `protocol` defines those.

pub mod frame;
pub mod identity;
pub mod pool;
pub mod stream;
pub mod tls;

use std::net::SocketAddr;

pub use frame::{FrameError, DEFAULT_MAX_FRAME_BYTES};
pub use identity::{Peer, Role};
pub use pool::ConnectionPool;
pub use stream::{call, CallError, ErrorCode, LeaderHint, StreamHeader, StreamKind, WireError};
pub use tls::{TlsError, TlsFiles, TlsMaterial};

/// Streams one connection may have open at once, on either side (`--max-streams-per-connection`).
/// A caller over it waits for QUIC to grant another stream; it is not an error.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 128;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot bind udp {address}: {source}")]
    Bind { address: SocketAddr, source: std::io::Error },
    #[error("port {} is in use on {} (udp): another process, perhaps another bayard, holds it; stop it or pick another --port", .address.port(), .address.ip())]
    PortInUse { address: SocketAddr },
}

/// Binds the node's endpoint: a QUIC server that requires client certificates, which also dials
/// peers from the same socket with the node's own certificate.
pub fn bind_node_endpoint(
    address: SocketAddr,
    material: &TlsMaterial,
    max_concurrent_streams: u32,
) -> Result<quinn::Endpoint, TransportError> {
    let server_config = tls::server_config(material, max_concurrent_streams)?;
    let client_config = tls::client_config(material, max_concurrent_streams)?;
    let mut endpoint = quinn::Endpoint::server(server_config, address).map_err(|source| match source.kind() {
        std::io::ErrorKind::AddrInUse => TransportError::PortInUse { address },
        _ => TransportError::Bind { address, source },
    })?;
    endpoint.set_default_client_config(client_config);
    Ok(endpoint)
}

/// A client-only endpoint on a socket bound by the caller.
pub fn client_endpoint_on_socket(
    client_config: quinn::ClientConfig,
    socket: std::net::UdpSocket,
) -> Result<quinn::Endpoint, TransportError> {
    let address = socket.local_addr().map_err(|source| TransportError::Bind {
        address: SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)),
        source,
    })?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| TransportError::Bind { address, source: std::io::Error::other("no async runtime for quinn") })?;
    let mut endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
        .map_err(|source| TransportError::Bind { address, source })?;
    endpoint.set_default_client_config(client_config);
    Ok(endpoint)
}

/// Binds a client-only endpoint on an ephemeral port of the given address family.
pub fn bind_client_endpoint(client_config: quinn::ClientConfig, ipv6: bool) -> Result<quinn::Endpoint, TransportError> {
    let address: SocketAddr = if ipv6 {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
    };
    let mut endpoint = quinn::Endpoint::client(address).map_err(|source| TransportError::Bind { address, source })?;
    endpoint.set_default_client_config(client_config);
    Ok(endpoint)
}
