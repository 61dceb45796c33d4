//! Telemetry: logs, traces and metrics.
//!
//! - Logs: human-readable lines by default, JSON lines for log shippers; filtering follows
//!   `RUST_LOG`. Logs go to stderr so that stdout stays the command's JSON output.
//! - Traces: `tracing` spans, exported over OTLP/gRPC only when an endpoint is configured
//!   ([`TelemetryConfig::otlp_endpoint`]). Without one no OpenTelemetry layer, tracer provider or
//!   exporter thread exists. W3C trace context crosses nodes in the stream header; see
//!   [`current_traceparent`] and [`set_parent_from_traceparent`].
//! - Metrics: a process-wide Prometheus registry ([`metrics`]) served with `/livez` and `/readyz`
//!   by [`serve_http`].
//!
//! `docs/observability.md` explains every span and metric and how to run Jaeger, Prometheus and
//! Grafana next to a cluster.

pub mod http;
pub mod metrics;
mod otel;
mod propagation;

use std::time::Duration;

use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub use http::{health_from_fn, serve_http, HealthSource};
pub use metrics::{raft_readiness, record_request, update_from_raft_metrics};
pub use otel::{otel_layer, resource, tracer_provider, SamplerConfig};
pub use propagation::{current_traceparent, set_parent_from_traceparent, traceparent_of_span};

/// The `service.name` resource attribute of every exported span.
pub const SERVICE_NAME: &str = "bayard";

/// Trace filter used when [`TelemetryConfig::trace_directive`] is left at its default: bayard's
/// own spans at info. Other crates' spans (openraft's long-lived task spans in particular) would
/// make traces that never end; their log events still reach the logs.
pub const DEFAULT_TRACE_DIRECTIVE: &str = "warn,bayard=info";

/// How long [`TelemetryGuard`] waits for the last spans to be exported at shutdown.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid otlp endpoint `{endpoint}`: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("the otlp exporter must be built inside a tokio runtime")]
    NoRuntime,
    #[error("invalid trace filter `{directive}`: {reason}")]
    Filter { directive: String, reason: String },
    #[error("invalid sampler: {0}")]
    Sampler(String),
    #[error("cannot shut the tracer provider down: {0}")]
    Shutdown(String),
    #[error("cannot render metrics: {0}")]
    Render(#[from] std::fmt::Error),
    #[error("metrics http server: {0}")]
    Io(#[from] std::io::Error),
}

/// What [`init`] installs.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// Log filter used when `RUST_LOG` is unset (or invalid).
    pub log_directive: String,
    /// `http://host:4317`. `None` (or empty): no tracing export at all.
    pub otlp_endpoint: Option<String>,
    /// The `service.instance.id` resource attribute: the node id for `serve`.
    pub service_instance_id: String,
    pub sampler: SamplerConfig,
    /// Which spans are exported (an `EnvFilter` directive, independent of `RUST_LOG` so that
    /// quiet logs do not silence traces).
    pub trace_directive: String,
}

impl TelemetryConfig {
    /// Defaults with no export; reads no environment variable.
    pub fn new(log_format: LogFormat, service_instance_id: impl Into<String>) -> Self {
        TelemetryConfig {
            log_format,
            log_directive: "info".to_string(),
            otlp_endpoint: None,
            service_instance_id: service_instance_id.into(),
            sampler: SamplerConfig::default(),
            trace_directive: DEFAULT_TRACE_DIRECTIVE.to_string(),
        }
    }

    /// Defaults plus the OpenTelemetry environment variables: the endpoint from
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` (none when
    /// `OTEL_SDK_DISABLED=true`) and the sampler from `OTEL_TRACES_SAMPLER` /
    /// `OTEL_TRACES_SAMPLER_ARG`. An invalid sampler falls back to the default, as the
    /// OpenTelemetry specification asks; [`init`] logs a warning about it.
    pub fn from_env(log_format: LogFormat, service_instance_id: impl Into<String>) -> Self {
        let mut config = TelemetryConfig::new(log_format, service_instance_id);
        config.otlp_endpoint = otlp_endpoint_from_env();
        config.sampler = SamplerConfig::from_env();
        config
    }

    /// Sets the endpoint when `endpoint` is `Some` and not empty (a command-line flag overrides
    /// the environment).
    pub fn with_otlp_endpoint(mut self, endpoint: Option<String>) -> Self {
        if let Some(endpoint) = endpoint.filter(|endpoint| !endpoint.trim().is_empty()) {
            self.otlp_endpoint = Some(endpoint);
        }
        self
    }

    pub fn with_log_directive(mut self, directive: impl Into<String>) -> Self {
        self.log_directive = directive.into();
        self
    }
}

/// The OTLP trace endpoint the environment asks for, following the OpenTelemetry variable names.
pub fn otlp_endpoint_from_env() -> Option<String> {
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|value| value.trim().eq_ignore_ascii_case("true"));
    if disabled {
        return None;
    }
    ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .iter()
        .filter_map(|name| std::env::var(name).ok())
        .map(|value| value.trim().to_string())
        .find(|value| !value.is_empty())
}

/// Keeps the tracer provider of [`init`]. Dropping it (or [`TelemetryGuard::shutdown`]) flushes
/// the spans still queued and stops the exporter.
#[must_use = "dropping the guard stops trace export"]
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// A guard that owns nothing: what [`init`] returns when a global subscriber was already set.
    pub fn inert() -> Self {
        TelemetryGuard { provider: None }
    }

    /// Whether spans are exported (an endpoint was set and this call installed the subscriber).
    pub fn is_exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes and shuts the exporter down without blocking the async runtime. Prefer this to
    /// dropping the guard inside async code: the export runs on the runtime, so a blocking drop
    /// on a current-thread runtime could only wait for the timeout.
    pub async fn shutdown(mut self) -> Result<(), TelemetryError> {
        let Some(provider) = self.provider.take() else { return Ok(()) };
        tokio::task::spawn_blocking(move || shutdown_provider(&provider))
            .await
            .map_err(|error| TelemetryError::Shutdown(error.to_string()))?
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let Some(provider) = self.provider.take() else { return };
        let in_multi_thread_runtime = tokio::runtime::Handle::try_current()
            .is_ok_and(|handle| handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        // Shutting down waits for the last export; inside a multi-thread runtime, tell tokio so
        // that the other workers (which drive the gRPC connection) keep running.
        let result = if in_multi_thread_runtime {
            tokio::task::block_in_place(|| shutdown_provider(&provider))
        } else {
            shutdown_provider(&provider)
        };
        if let Err(error) = result {
            eprintln!("warning: {error}");
        }
    }
}

fn shutdown_provider(provider: &SdkTracerProvider) -> Result<(), TelemetryError> {
    provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT).map_err(|error| TelemetryError::Shutdown(error.to_string()))
}

/// Installs the global subscriber: the fmt layer (text or JSON, filtered by `RUST_LOG` or
/// `config.log_directive`) and, only when an endpoint is set, the OpenTelemetry layer with a
/// batching OTLP/gRPC exporter. Call it inside the tokio runtime (the gRPC channel lives there).
///
/// When a global subscriber is already set (tests that start several nodes in one process), this
/// installs nothing and returns an inert guard: export then depends on the subscriber already set.
pub fn init(config: TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    if tracing::dispatcher::has_been_set() {
        return Ok(TelemetryGuard::inert());
    }
    let endpoint = config.otlp_endpoint.as_deref().map(str::trim).filter(|endpoint| !endpoint.is_empty());
    let Some(endpoint) = endpoint else {
        install(config.log_format, &config.log_directive, None);
        return Ok(TelemetryGuard::inert());
    };
    let trace_filter = trace_filter(&config.trace_directive)?;
    let provider = tracer_provider(endpoint, &config.service_instance_id, &config.sampler)?;
    let layer = otel_layer(&provider).with_filter(trace_filter);
    if !install(config.log_format, &config.log_directive, Some(layer.boxed())) {
        // Lost a race with another initialisation: keep theirs, stop ours.
        let _ = shutdown_provider(&provider);
        return Ok(TelemetryGuard::inert());
    }
    if let Some(warning) = SamplerConfig::env_warning() {
        tracing::warn!("{warning}");
    }
    tracing::info!(endpoint, sampler = %config.sampler, "exporting traces over otlp");
    Ok(TelemetryGuard { provider: Some(provider) })
}

/// Installs the global subscriber with logs only. `default_directive` applies when `RUST_LOG` is
/// unset. A second call (tests that call this twice) keeps the first subscriber.
pub fn init_logging(format: LogFormat, default_directive: &str) {
    install(format, default_directive, None);
}

/// The `EnvFilter` for the OpenTelemetry layer. The exporter's own crates are always off: a span
/// of the gRPC client that exports spans would be exported in turn, without end.
fn trace_filter(directive: &str) -> Result<EnvFilter, TelemetryError> {
    const EXPORTER_CRATES: [&str; 8] =
        ["h2", "hyper", "hyper_util", "tonic", "tower", "opentelemetry", "opentelemetry_sdk", "opentelemetry_otlp"];
    let directives: Vec<String> = directive
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(str::to_string)
        .chain(EXPORTER_CRATES.iter().map(|name| format!("{name}=off")))
        .collect();
    EnvFilter::builder()
        .parse(directives.join(","))
        .map_err(|error| TelemetryError::Filter { directive: directive.to_string(), reason: error.to_string() })
}

type BoxedLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

/// Returns false when a global subscriber was already set.
fn install(format: LogFormat, default_directive: &str, otel: Option<BoxedLayer>) -> bool {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_directive));
    // Colour only for a person at a terminal: log files and pipes get plain text, and NO_COLOR
    // (any value) turns it off everywhere.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let fmt_layer: BoxedLayer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_ansi(colour).with_writer(std::io::stderr).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).boxed(),
    };
    // Per-layer filters: RUST_LOG decides what is logged, the trace filter what is exported.
    let mut layers = vec![fmt_layer.with_filter(filter).boxed()];
    layers.extend(otel);
    tracing_subscriber::registry().with(layers).try_init().is_ok()
}
