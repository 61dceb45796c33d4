//! rustls configuration for the node endpoint and for clients.
//!
//! Only the ring crypto provider is used, and it is passed explicitly to every builder: rustls
//! panics when two providers are compiled in and none is chosen, and being explicit keeps that
//! from ever depending on what other crates enable.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocol of bayard's wire protocol; a connection that offers anything else is refused.
pub const ALPN_PROTOCOL: &[u8] = b"bayard/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} file {path}: {reason}")]
    Read { what: &'static str, path: PathBuf, reason: String },
    #[error("{what} file {path} holds no {expected}")]
    Empty { what: &'static str, path: PathBuf, expected: &'static str },
    #[error("invalid CA certificate in {path}: {reason}")]
    InvalidCa { path: PathBuf, reason: String },
    #[error("tls configuration failed: {0}")]
    Config(String),
    #[error(
        "private key file {path} is readable by other users (mode {mode:04o}); run `chmod 600 {path}` \
         (bayard refuses keys others can read, as ssh does)"
    )]
    KeyTooOpen { path: PathBuf, mode: u32 },
}

/// Refuses a private key file that the group or other users may read or write.
pub fn check_private_key_permissions(path: &Path) -> Result<(), TlsError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let metadata = std::fs::metadata(path).map_err(|error| TlsError::Read {
            what: "private key",
            path: path.to_path_buf(),
            reason: error.to_string(),
        })?;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TlsError::KeyTooOpen { path: path.to_path_buf(), mode });
        }
    }
    Ok(())
}

/// Where a node's or client's certificate material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_certificate: PathBuf,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
}

/// Certificate material read from [`TlsFiles`].
#[derive(Debug)]
pub struct TlsMaterial {
    pub roots: Arc<RootCertStore>,
    pub certificate_chain: Vec<CertificateDer<'static>>,
    pub private_key: PrivateKeyDer<'static>,
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        TlsMaterial {
            roots: self.roots.clone(),
            certificate_chain: self.certificate_chain.clone(),
            private_key: self.private_key.clone_key(),
        }
    }
}

pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file.
pub fn read_certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_error = |reason: String| TlsError::Read { what, path: path.to_path_buf(), reason };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|error| read_error(error.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| read_error(error.to_string()))?;
    if certificates.is_empty() {
        return Err(TlsError::Empty { what, path: path.to_path_buf(), expected: "PEM certificate" });
    }
    Ok(certificates)
}

/// Builds the root store of the cluster CA.
pub fn read_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in read_certificates(path, "CA certificate")? {
        roots
            .add(certificate)
            .map_err(|error| TlsError::InvalidCa { path: path.to_path_buf(), reason: error.to_string() })?;
    }
    Ok(Arc::new(roots))
}

impl TlsMaterial {
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let roots = read_roots(&files.ca_certificate)?;
        let certificate_chain = read_certificates(&files.certificate, "certificate")?;
        check_private_key_permissions(&files.private_key)?;
        let private_key = PrivateKeyDer::from_pem_file(&files.private_key).map_err(|error| TlsError::Read {
            what: "private key",
            path: files.private_key.clone(),
            reason: error.to_string(),
        })?;
        Ok(TlsMaterial { roots, certificate_chain, private_key })
    }
}

/// Unread bytes one stream may hold: enough for full speed on a LAN and a few MB/s across a WAN.
pub const STREAM_RECEIVE_WINDOW: u32 = 1024 * 1024;
/// Unread bytes one connection may hold, all its streams together.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 4 * 1024 * 1024;

/// Keep-alive period of every connection: a PING whenever nothing else was sent for this long,
/// which the peer acknowledges at once. So a live peer is heard from at least this often, and a
/// call can tell a dead peer by its silence ([`super::stream::PEER_SILENCE_LIMIT`]).
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_millis(200);
/// Silence after which quinn closes a connection (requests in flight are also ended earlier, by
/// the silence limit of `call`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Transport settings shared by both sides: a keep-alive well under the idle timeout so quiet but
/// healthy connections stay open, while a peer that died (a killed process sends nothing) is
/// noticed within seconds and the requests waiting on it move on to another node. And a cap on
/// concurrent streams per connection.
pub fn transport_config(max_concurrent_streams: u32) -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    if let Ok(idle_timeout) = quinn::IdleTimeout::try_from(IDLE_TIMEOUT) {
        transport.max_idle_timeout(Some(idle_timeout));
    }
    transport.max_concurrent_bidi_streams(max_concurrent_streams.into());
    transport.max_concurrent_uni_streams(0_u32.into());
    // What a peer may send before the other side reads it: quinn's own connection window is
    // unbounded, which would let a caller park any amount of data in a node's memory behind a
    // stream the node has not read yet (waiting for the byte budget, say).
    transport.stream_receive_window(STREAM_RECEIVE_WINDOW.into());
    transport.receive_window(CONNECTION_RECEIVE_WINDOW.into());
    transport.send_window(u64::from(CONNECTION_RECEIVE_WINDOW));
    Arc::new(transport)
}

/// Server side: requires a client certificate chained to the cluster CA on every connection.
pub fn server_config(material: &TlsMaterial, max_concurrent_streams: u32) -> Result<quinn::ServerConfig, TlsError> {
    let provider = crypto_provider();
    let client_verifier = WebPkiClientVerifier::builder_with_provider(material.roots.clone(), provider.clone())
        .build()
        .map_err(|error| TlsError::Config(error.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| TlsError::Config(error.to_string()))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(material.certificate_chain.clone(), material.private_key.clone_key())
        .map_err(|error| TlsError::Config(error.to_string()))?;
    tls.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    // 0-RTT data could be replayed; bayard never accepts it.
    tls.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(tls).map_err(|error| TlsError::Config(error.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport_config(max_concurrent_streams));
    Ok(config)
}

/// Client side with a client certificate (how nodes dial each other and how clients connect).
pub fn client_config(material: &TlsMaterial, max_concurrent_streams: u32) -> Result<quinn::ClientConfig, TlsError> {
    let tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| TlsError::Config(error.to_string()))?
        .with_root_certificates(material.roots.clone())
        .with_client_auth_cert(material.certificate_chain.clone(), material.private_key.clone_key())
        .map_err(|error| TlsError::Config(error.to_string()))?;
    quic_client_config(tls, max_concurrent_streams)
}

/// Wraps a rustls client configuration for QUIC, setting bayard's ALPN. Tests use it to build
/// deliberately wrong clients (no certificate, another CA).
pub fn quic_client_config(
    mut tls: rustls::ClientConfig,
    max_concurrent_streams: u32,
) -> Result<quinn::ClientConfig, TlsError> {
    tls.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    tls.enable_early_data = false;
    let quic = QuicClientConfig::try_from(tls).map_err(|error| TlsError::Config(error.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport_config(max_concurrent_streams));
    Ok(config)
}
