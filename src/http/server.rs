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

/// How often a connection's watchdog looks at it.
const WATCHDOG_PERIOD: std::time::Duration = std::time::Duration::from_millis(250);

/// What a connection's watchdog sees: requests in progress, and when the last one ended.
#[derive(Default)]
struct Activity {
    in_flight: std::sync::atomic::AtomicUsize,
    /// Milliseconds since the connection began at which the last request ended (0: none yet).
    last_ended_millis: std::sync::atomic::AtomicU64,
}

/// Counts a request in progress on its connection while alive.
struct InFlight(Arc<Activity>, std::time::Instant);

impl Drop for InFlight {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        self.0.last_ended_millis.store(self.1.elapsed().as_millis().max(1) as u64, Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Open connections per remote address, bounded (`--http-max-connections-per-address`).
#[derive(Default)]
struct PerAddress {
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

struct AddressSlot(Arc<PerAddress>, std::net::IpAddr);

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.0.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = open.get_mut(&self.1) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.1);
            }
        }
    }
}

impl PerAddress {
    fn enter(self: &Arc<Self>, address: std::net::IpAddr, max: usize) -> Option<AddressSlot> {
        let mut open = self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = open.entry(address).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(AddressSlot(self.clone(), address))
    }
}

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
    let per_address = Arc::new(PerAddress::default());
    let state = Arc::new(HttpState { backend, config });
    let router = routes(state.clone());
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
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
        let Some(address_slot) = per_address.enter(remote_address.ip(), state.config.max_connections_per_address)
        else {
            crate::telemetry::metrics::record_limit_refusal("http_connections_per_address");
            crate::telemetry::metrics::record_refused_connection("too_many_http_connections_per_address");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
        let state = state.clone();
        let router = router.clone();
        let connection_shutdown = shutdown.clone();
        connections.spawn(async move {
            let _slots = (slot, address_slot);
            serve_connection(state, router, acceptor, stream, remote_address, connection_shutdown).await;
        });
    }
    drop(listener);
    // Open connections finish the requests they have (each is told to close), bounded.
    let drained = tokio::time::timeout(drain_timeout, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!("HTTP requests still running at shutdown; closing them");
        connections.abort_all();
    }
}

async fn serve_connection(
    state: Arc<HttpState>,
    router: Router,
    acceptor: tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    remote_address: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
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
    let began = std::time::Instant::now();
    let activity = Arc::new(Activity::default());
    let request_timeout = state.config.request_timeout;
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(certificate.clone());
            activity.in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let in_flight = InFlight(activity.clone(), began);
            let router = router.clone();
            async move {
                let _in_flight = in_flight;
                // The whole request, body and every sub-request included, within the timeout.
                match tokio::time::timeout(request_timeout, router.oneshot(request)).await {
                    Ok(answer) => answer,
                    Err(_) => Ok(axum::response::IntoResponse::into_response(super::error::ApiError::new(
                        axum::http::StatusCode::GATEWAY_TIMEOUT,
                        "deadline_exceeded",
                        "timeout_exception",
                        format!("the request did not finish within {request_timeout:?} (--http-request-timeout)"),
                    ))),
                }
            }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(state.config.read_timeout).keep_alive(true);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(MAX_HTTP2_STREAMS);
    let connection = builder.serve_connection(TokioIo::new(tls_stream), service);
    tokio::pin!(connection);
    // The watchdog: a connection with no request in progress is closed once it has been idle
    // for the read timeout before its first request, or the idle timeout after one (so silent
    // connections cannot hold slots, whatever protocol they speak); a connection that is being
    // closed gets a few seconds to finish writing, then it is dropped (a caller that never reads
    // its answer cannot keep it either).
    let first_request_limit = state.config.read_timeout;
    let idle_limit = state.config.idle_timeout;
    let mut closing_since: Option<std::time::Instant> = None;
    let mut ticks = tokio::time::interval(WATCHDOG_PERIOD);
    loop {
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(error) = ended {
                    tracing::debug!(%remote_address, %error, "HTTP connection ended");
                }
                return;
            }
            changed = shutdown.changed(), if closing_since.is_none() => {
                if changed.is_err() || *shutdown.borrow() {
                    connection.as_mut().graceful_shutdown();
                    closing_since = Some(std::time::Instant::now());
                }
            }
            _ = ticks.tick() => {
                use std::sync::atomic::Ordering;
                if let Some(since) = closing_since {
                    if since.elapsed() >= CLOSING_GRACE {
                        crate::telemetry::metrics::record_refused_connection("http_stalled");
                        return;
                    }
                    continue;
                }
                if activity.in_flight.load(Ordering::SeqCst) > 0 {
                    continue;
                }
                let last = activity.last_ended_millis.load(Ordering::SeqCst);
                let (quiet, limit) = if last == 0 {
                    (began.elapsed(), first_request_limit)
                } else {
                    (began.elapsed().saturating_sub(std::time::Duration::from_millis(last)), idle_limit)
                };
                if quiet >= limit {
                    if last == 0 {
                        crate::telemetry::metrics::record_refused_connection("http_no_request");
                    }
                    connection.as_mut().graceful_shutdown();
                    closing_since = Some(std::time::Instant::now());
                }
            }
        }
    }
}

/// How long a closing connection may take to finish what it is writing.
const CLOSING_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

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
