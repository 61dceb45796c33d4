//! The OpenTelemetry pipeline: resource, sampler, batching OTLP/gRPC exporter, tracing layer.
//! Built only when an endpoint is configured.

use std::fmt;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetryLayer;
use tracing_subscriber::registry::LookupSpan;

use super::{TelemetryError, SERVICE_NAME};

/// Spans waiting for export. When the collector is slow or down the queue fills and new spans are
/// dropped: requests never wait for telemetry.
const MAX_QUEUE_SIZE: usize = 4096;
const MAX_EXPORT_BATCH_SIZE: usize = 512;
const SCHEDULED_DELAY: Duration = Duration::from_secs(1);
/// One export call (connect included) gives up after this.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The sampler, named as in `OTEL_TRACES_SAMPLER`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum SamplerConfig {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
    /// Follows the caller's decision; samples every new root. The OpenTelemetry default.
    #[default]
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedTraceIdRatio(f64),
}

impl SamplerConfig {
    /// Parses the values of `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`. The ratio
    /// samplers take a probability in [0, 1], 1.0 when the argument is absent.
    pub fn parse(name: &str, argument: Option<&str>) -> Result<SamplerConfig, TelemetryError> {
        let ratio = || -> Result<f64, TelemetryError> {
            match argument.map(str::trim).filter(|argument| !argument.is_empty()) {
                None => Ok(1.0),
                Some(text) => match text.parse::<f64>() {
                    Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
                    _ => Err(TelemetryError::Sampler(format!(
                        "sampler argument `{text}` is not a probability between 0 and 1"
                    ))),
                },
            }
        };
        match name.trim().to_ascii_lowercase().as_str() {
            "always_on" => Ok(SamplerConfig::AlwaysOn),
            "always_off" => Ok(SamplerConfig::AlwaysOff),
            "traceidratio" => Ok(SamplerConfig::TraceIdRatio(ratio()?)),
            "" | "parentbased_always_on" => Ok(SamplerConfig::ParentBasedAlwaysOn),
            "parentbased_always_off" => Ok(SamplerConfig::ParentBasedAlwaysOff),
            "parentbased_traceidratio" => Ok(SamplerConfig::ParentBasedTraceIdRatio(ratio()?)),
            other => Err(TelemetryError::Sampler(format!(
                "unknown sampler `{other}` (use always_on, always_off, traceidratio, parentbased_always_on, \
                 parentbased_always_off or parentbased_traceidratio)"
            ))),
        }
    }

    /// From `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`; the default when unset or invalid.
    pub fn from_env() -> SamplerConfig {
        Self::try_from_env().unwrap_or_default()
    }

    fn try_from_env() -> Result<SamplerConfig, TelemetryError> {
        match std::env::var("OTEL_TRACES_SAMPLER") {
            Ok(name) => SamplerConfig::parse(&name, std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().as_deref()),
            Err(_) => Ok(SamplerConfig::default()),
        }
    }

    /// Why the environment's sampler was not used, if it was not.
    pub(crate) fn env_warning() -> Option<String> {
        Self::try_from_env().err().map(|error| format!("{error}; using parentbased_always_on"))
    }

    fn sampler(self) -> Sampler {
        match self {
            SamplerConfig::AlwaysOn => Sampler::AlwaysOn,
            SamplerConfig::AlwaysOff => Sampler::AlwaysOff,
            SamplerConfig::TraceIdRatio(ratio) => Sampler::TraceIdRatioBased(ratio),
            SamplerConfig::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            SamplerConfig::ParentBasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            SamplerConfig::ParentBasedTraceIdRatio(ratio) => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
            }
        }
    }
}

impl fmt::Display for SamplerConfig {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SamplerConfig::AlwaysOn => write!(formatter, "always_on"),
            SamplerConfig::AlwaysOff => write!(formatter, "always_off"),
            SamplerConfig::TraceIdRatio(ratio) => write!(formatter, "traceidratio:{ratio}"),
            SamplerConfig::ParentBasedAlwaysOn => write!(formatter, "parentbased_always_on"),
            SamplerConfig::ParentBasedAlwaysOff => write!(formatter, "parentbased_always_off"),
            SamplerConfig::ParentBasedTraceIdRatio(ratio) => write!(formatter, "parentbased_traceidratio:{ratio}"),
        }
    }
}

/// `service.name=bayard`, `service.instance.id`, `service.version`, plus whatever
/// `OTEL_RESOURCE_ATTRIBUTES` adds (a deployment name, say).
pub fn resource(service_instance_id: &str) -> Resource {
    Resource::builder()
        .with_service_name(SERVICE_NAME)
        .with_attributes([
            KeyValue::new("service.instance.id", service_instance_id.to_string()),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        ])
        .build()
}

/// A tracer provider exporting to `endpoint` (`http://host:4317`) in batches from a bounded queue
/// on its own thread. Must be called inside a tokio runtime: the gRPC channel runs there.
///
/// [`super::init`] uses it for the global subscriber; tests and embedders can use it with
/// [`otel_layer`] for a subscriber of their own.
pub fn tracer_provider(
    endpoint: &str,
    service_instance_id: &str,
    sampler: &SamplerConfig,
) -> Result<SdkTracerProvider, TelemetryError> {
    let invalid = |reason: String| TelemetryError::Endpoint { endpoint: endpoint.to_string(), reason };
    // Checked here rather than left to the exporter: it would fall back to the environment or
    // localhost for an empty endpoint, and tonic panics outside a runtime.
    let uri: hyper::Uri = endpoint.parse().map_err(|error: hyper::http::uri::InvalidUri| invalid(error.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(invalid("https is not supported: bayard exports over plain http to a local collector".into()))
        }
        _ => return Err(invalid("use an http:// url, as in http://127.0.0.1:4317".into())),
    }
    if uri.host().is_none() {
        return Err(invalid("the url has no host".into()));
    }
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(TelemetryError::NoRuntime);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|error| invalid(error.to_string()))?;
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(MAX_QUEUE_SIZE)
        .with_max_export_batch_size(MAX_EXPORT_BATCH_SIZE)
        .with_scheduled_delay(SCHEDULED_DELAY)
        .build();
    let processor = BatchSpanProcessor::builder(exporter).with_batch_config(batch).build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(sampler.sampler())
        .with_resource(resource(service_instance_id))
        .build())
}

/// The `tracing` layer that turns spans into OpenTelemetry spans of `provider`.
pub fn otel_layer<S>(provider: &SdkTracerProvider) -> OpenTelemetryLayer<S, SdkTracer>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    let scope = InstrumentationScope::builder(SERVICE_NAME).with_version(env!("CARGO_PKG_VERSION")).build();
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer_with_scope(scope))
        // Thread names and ids say little about async work that hops between workers.
        .with_threads(false)
}
