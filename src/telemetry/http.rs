//! The plain-HTTP side port (`--metrics-port`): `/metrics`, `/livez`, `/readyz`.
//!
//! It carries no secrets and accepts no input beyond the path, so it needs no TLS; bind it to
//! 127.0.0.1 or an address only the monitoring network reaches.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use super::{metrics, TelemetryError};

/// A client that has not sent its request headers by then is disconnected, so that idle
/// connections cannot pile up.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections may take to finish after shutdown is asked.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (out of file descriptors, say) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What `/livez` and `/readyz` report. Both are called on the async runtime for every probe: they
/// must answer from memory (a `watch` borrow, an atomic), never wait for I/O or a lock held long.
pub trait HealthSource: Send + Sync {
    /// The process works (its runtime answers; nothing fatal happened). A failing liveness probe
    /// gets the process restarted.
    fn live(&self) -> bool;
    /// The node can serve requests: for bayard, a leader is known and everything known to be
    /// committed is applied (see [`super::raft_readiness`]). `Err` holds the reason, which
    /// `/readyz` returns with status 503.
    fn ready(&self) -> Result<(), String>;
}

struct FnHealth<L, R> {
    live: L,
    ready: R,
}

impl<L, R> HealthSource for FnHealth<L, R>
where
    L: Fn() -> bool + Send + Sync,
    R: Fn() -> Result<(), String> + Send + Sync,
{
    fn live(&self) -> bool {
        (self.live)()
    }

    fn ready(&self) -> Result<(), String> {
        (self.ready)()
    }
}

/// A [`HealthSource`] from two closures.
pub fn health_from_fn<L, R>(live: L, ready: R) -> Arc<dyn HealthSource>
where
    L: Fn() -> bool + Send + Sync + 'static,
    R: Fn() -> Result<(), String> + Send + Sync + 'static,
{
    Arc::new(FnHealth { live, ready })
}

/// Serves `/metrics`, `/livez` and `/readyz` on `listener` until `shutdown` completes, then lets
/// open requests finish (bounded) and returns. Spawn it as a task next to the node.
pub async fn serve_http<F>(
    listener: TcpListener,
    health: Arc<dyn HealthSource>,
    shutdown: F,
) -> Result<(), TelemetryError>
where
    F: Future<Output = ()> + Send,
{
    let local_address = listener.local_addr()?;
    tracing::info!(%local_address, "metrics and health endpoints listening");
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, remote_address) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "metrics endpoint cannot accept a connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let health = health.clone();
        let service = service_fn(move |request| {
            let health = health.clone();
            async move { Ok::<_, Infallible>(respond(&request, health.as_ref())) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                log_connection_error(remote_address, &error);
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
        tracing::debug!("metrics connections still open at shutdown; leaving them");
    }
    Ok(())
}

fn log_connection_error(remote_address: SocketAddr, error: &hyper::Error) {
    // Probes that hang up early or time out are routine; nothing to warn about.
    tracing::debug!(%remote_address, %error, "metrics connection ended with an error");
}

fn respond(request: &Request<Incoming>, health: &dyn HealthSource) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".to_string());
        response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => match metrics::render() {
            Ok(body) => {
                let mut response = text(StatusCode::OK, body);
                response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(metrics::CONTENT_TYPE));
                response
            }
            Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")),
        },
        "/livez" => {
            if health.live() {
                text(StatusCode::OK, "ok\n".to_string())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not live\n".to_string())
            }
        }
        "/readyz" => match health.ready() {
            Ok(()) => text(StatusCode::OK, "ok\n".to_string()),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "not found; try /metrics, /livez or /readyz\n".to_string()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    // Probes and scrapes must see the state of now, never a cached answer.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
