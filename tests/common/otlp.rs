//! An in-test OTLP/gRPC trace receiver on 127.0.0.1 (a random port) that keeps every span it is
//! sent. It runs on its own thread and runtime, so that both synchronous tests (which start
//! `bayard serve` processes) and async tests can use it.
//!
//! Include it with `#[path = "common/otlp.rs"] mod otlp;` (or `pub mod otlp;` in `common/mod.rs`).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;

/// One span as received, ids in lowercase hex as in a `traceparent`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// `None` for a root span.
    pub parent_span_id: Option<String>,
    pub name: String,
    pub service_name: Option<String>,
    pub service_instance_id: Option<String>,
    /// Span attributes, values rendered as text.
    pub attributes: BTreeMap<String, String>,
}

impl ReceivedSpan {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

pub struct OtlpReceiver {
    /// `http://127.0.0.1:PORT`, for `--otlp-endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: String,
    pub address: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OtlpReceiver {
    /// Binds 127.0.0.1:0 and serves the OTLP trace service until dropped.
    pub fn start() -> OtlpReceiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the otlp receiver");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let address = listener.local_addr().expect("receiver address");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let collector = Collector { spans: spans.clone() };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("otlp-receiver".to_string())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    let incoming = tonic::transport::server::TcpIncoming::from(listener);
                    let server = tonic::transport::Server::builder()
                        .add_service(TraceServiceServer::new(collector))
                        .serve_with_incoming(incoming);
                    // Stopping drops the server and, with the runtime, every open connection: an
                    // exporter that keeps its channel open cannot hold the test up.
                    tokio::select! {
                        result = server => result.expect("otlp receiver"),
                        _ = stopped => {}
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .expect("spawn the otlp receiver");
        OtlpReceiver { endpoint: format!("http://{address}"), address, spans, stop: Some(stop), thread: Some(thread) }
    }

    /// Everything received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// Spans of one trace.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans().into_iter().filter(|span| span.trace_id == trace_id).collect()
    }

    /// Blocks (polling) until `condition` holds for the spans received, at most `timeout`.
    /// `Err` carries what was received, for the failure message.
    pub fn wait_for(
        &self,
        condition: impl Fn(&[ReceivedSpan]) -> bool,
        timeout: Duration,
    ) -> Result<Vec<ReceivedSpan>, Vec<ReceivedSpan>> {
        let started = Instant::now();
        loop {
            let spans = self.spans();
            if condition(&spans) {
                return Ok(spans);
            }
            if started.elapsed() >= timeout {
                return Err(spans);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`OtlpReceiver::wait_for`] for async tests: sleeps without blocking the runtime.
    pub async fn wait_for_async(
        &self,
        condition: impl Fn(&[ReceivedSpan]) -> bool,
        timeout: Duration,
    ) -> Result<Vec<ReceivedSpan>, Vec<ReceivedSpan>> {
        let started = Instant::now();
        loop {
            let spans = self.spans();
            if condition(&spans) {
                return Ok(spans);
            }
            if started.elapsed() >= timeout {
                return Err(spans);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans.resource.map(|resource| attributes(&resource.attributes)).unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    received.push(ReceivedSpan {
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: (!span.parent_span_id.is_empty()).then(|| hex(&span.parent_span_id)),
                        name: span.name,
                        service_name: resource.get("service.name").cloned(),
                        service_instance_id: resource.get("service.instance.id").cloned(),
                        attributes: attributes(&span.attributes),
                    });
                }
            }
        }
        self.spans.lock().unwrap().extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn attributes(pairs: &[KeyValue]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|pair| {
            let value = match pair.value.as_ref().and_then(|value| value.value.as_ref()) {
                Some(Value::StringValue(text)) => text.clone(),
                Some(Value::BoolValue(flag)) => flag.to_string(),
                Some(Value::IntValue(number)) => number.to_string(),
                Some(Value::DoubleValue(number)) => number.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (pair.key.clone(), value)
        })
        .collect()
}
