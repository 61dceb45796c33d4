//! The HTTPS listener: TLS on TCP with the node's certificates, HTTP/1.1 and HTTP/2.
//!
//! Every connection holds a slot of `--http-max-connections` from before its handshake; the
//! handshake and each request's headers have a time limit; a request's body is read only once
//! room for it is reserved in the node's byte budget. At shutdown the listener stops accepting
//! and open connections finish their requests (bounded by the drain timeout).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

use super::auth::ConnectionCertificate;
use super::{Backend, HttpConfig, HttpState};
use crate::transport::identity::peer_from_certificate;

/// The TLS configuration of the HTTP door, replaced when the node reloads its certificates
/// (new connections use the new one).
pub struct HttpTls {
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl HttpTls {
    pub fn new(config: rustls::ServerConfig) -> Self {
        HttpTls { current: RwLock::new(Arc::new(config)) }
    }

    pub fn replace(&self, config: rustls::ServerConfig) {
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(config);
    }

    fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

/// Most HTTP/2 streams one connection may have open: more requests wait in the client.
const MAX_HTTP2_STREAMS: u32 = 64;

/// Serves HTTPS on `listener` until `shutdown` turns true.
pub async fn run(
    listener: TcpListener,
    tls: Arc<HttpTls>,
    backend: Arc<dyn Backend>,
    config: HttpConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let drain_timeout = config.drain_timeout;
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let state = Arc::new(HttpState { backend, config });
    let router = routes(state.clone());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
                continue;
            }
        };
        let (stream, remote_address) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, say: wait a moment rather than spin.
                tracing::warn!(%error, "could not accept an HTTP connection");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            crate::telemetry::metrics::record_limit_refusal("http_connections");
            crate::telemetry::metrics::record_refused_connection("too_many_http_connections");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
        let state = state.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            serve_connection(state, router, acceptor, stream, remote_address, watcher).await;
        });
    }
    drop(listener);
    if tokio::time::timeout(drain_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!("HTTP requests still running at shutdown; closing them");
    }
}

async fn serve_connection(
    state: Arc<HttpState>,
    router: Router,
    acceptor: tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    remote_address: SocketAddr,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let handshake = tokio::time::timeout(state.config.handshake_timeout, acceptor.accept(stream)).await;
    let tls_stream = match handshake {
        Err(_) => {
            crate::telemetry::metrics::record_refused_connection("http_handshake_timeout");
            return;
        }
        Ok(Err(error)) => {
            crate::telemetry::metrics::record_refused_connection("http_handshake");
            tracing::debug!(%remote_address, %error, "HTTPS handshake failed");
            return;
        }
        Ok(Ok(tls_stream)) => tls_stream,
    };
    // The chain was checked against the cluster CA by rustls; the role comes from the leaf.
    let certificate = match tls_stream.get_ref().1.peer_certificates().and_then(|chain| chain.first()) {
        None => None,
        Some(leaf) => match peer_from_certificate(leaf, &state.config.trust_domain) {
            Ok(peer) => Some(peer.role),
            Err(error) => {
                crate::telemetry::metrics::record_refused_connection("identity");
                tracing::debug!(%remote_address, %error, "HTTPS client certificate names no bayard role");
                return;
            }
        },
    };
    let certificate = ConnectionCertificate(certificate);
    let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(certificate.clone());
        router.clone().oneshot(request)
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(state.config.read_timeout).keep_alive(true);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(MAX_HTTP2_STREAMS);
    let connection = builder.serve_connection(TokioIo::new(tls_stream), service);
    if let Err(error) = watcher.watch(connection).await {
        tracing::debug!(%remote_address, %error, "HTTP connection ended");
    }
}

/// The rustls configuration of the HTTP door: the node's certificate, client certificates of the
/// cluster CA accepted but not required (API keys are the other way in), HTTP/2 and HTTP/1.1.
pub fn tls_config(
    material: &crate::transport::TlsMaterial,
) -> Result<rustls::ServerConfig, crate::transport::TlsError> {
    use crate::transport::TlsError;
    let provider = crate::transport::tls::crypto_provider();
    let client_verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(material.roots.clone(), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|error| TlsError::Config(error.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Config(error.to_string()))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(material.certificate_chain.clone(), material.private_key.clone_key())
        .map_err(|error| TlsError::Config(error.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn routes(state: Arc<HttpState>) -> Router {
    Router::new()
        .merge(super::rest::routes())
        .merge(super::elastic::routes())
        .fallback(super::elastic::no_route)
        .layer(axum::middleware::map_response(super::elastic::product_header))
        .with_state(state)
}
