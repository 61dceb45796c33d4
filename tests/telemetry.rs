//! Telemetry without a node: OTLP export into an in-test receiver, W3C trace context across a
//! simulated node boundary, the Prometheus text, and the health endpoints.
//!
//! `telemetry::init` installs a process-wide subscriber, so the tests of `init` run in child
//! processes: this test binary again, filtered to one `child_process_*` test and told what to do
//! by an environment variable. Those `child_process_*` tests do nothing in a normal run.

#[path = "common/otlp.rs"]
mod otlp;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bayard::telemetry::metrics::{self as telemetry_metrics, ConnectionDirection, ConnectionMetrics};
use bayard::telemetry::{
    self, current_traceparent, set_parent_from_traceparent, LogFormat, SamplerConfig, TelemetryConfig, TelemetryError,
};
use openraft::{BasicNode, CommittedLeaderId, LogId, RaftMetrics, ServerState};
use otlp::{OtlpReceiver, ReceivedSpan};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing_subscriber::layer::SubscriberExt;

const CHILD_MODE: &str = "BAYARD_TELEMETRY_TEST_CHILD";
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Trace export and propagation, with a subscriber per simulated node (no global state).

/// Flushes without blocking the runtime, which drives the gRPC channel the flush waits for.
async fn flush(provider: &opentelemetry_sdk::trace::SdkTracerProvider) {
    let provider = provider.clone();
    tokio::task::spawn_blocking(move || provider.force_flush()).await.expect("join").expect("flush");
}

fn subscriber_for(
    provider: &opentelemetry_sdk::trace::SdkTracerProvider,
) -> impl tracing::Subscriber + Send + Sync + for<'span> tracing_subscriber::registry::LookupSpan<'span> {
    tracing_subscriber::registry().with(telemetry::otel_layer(provider))
}

fn traceparent_parts(traceparent: &str) -> (String, String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {traceparent}");
    assert_eq!(parts[0], "00", "traceparent version");
    (parts[1].to_string(), parts[2].to_string(), parts[3].to_string())
}

fn named<'a>(spans: &'a [ReceivedSpan], name: &str) -> Option<&'a ReceivedSpan> {
    spans.iter().find(|span| span.name == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_round_trip_makes_one_trace_across_nodes() {
    let receiver = OtlpReceiver::start();
    let node_a = telemetry::tracer_provider(&receiver.endpoint, "1", &SamplerConfig::default()).expect("provider a");
    let node_b = telemetry::tracer_provider(&receiver.endpoint, "2", &SamplerConfig::default()).expect("provider b");

    // Node 1 handles a request and calls node 2 with the trace context in the header.
    let header = tracing::subscriber::with_default(subscriber_for(&node_a), || {
        let span = tracing::info_span!("client.search", request = "search");
        let _entered = span.enter();
        current_traceparent()
    })
    .expect("a traceparent inside an exported span");
    let (trace_id, parent_span_id, flags) = traceparent_parts(&header);
    assert_eq!(flags, "01", "sampled");

    // Node 2 makes its request span a child of the header's context.
    let inner = tracing::subscriber::with_default(subscriber_for(&node_b), || {
        let span = tracing::info_span!("raft.append_entries");
        set_parent_from_traceparent(&span, Some(&header));
        let _entered = span.enter();
        current_traceparent()
    })
    .expect("a traceparent on node 2");
    let (inner_trace_id, inner_span_id, _) = traceparent_parts(&inner);
    assert_eq!(inner_trace_id, trace_id, "one trace across both nodes");
    assert_ne!(inner_span_id, parent_span_id);

    flush(&node_a).await;
    flush(&node_b).await;
    let spans = receiver
        .wait_for_async(|spans| spans.iter().filter(|span| span.trace_id == trace_id).count() >= 2, WAIT)
        .await
        .unwrap_or_else(|spans| panic!("both spans should arrive: {spans:#?}"));
    let root = named(&spans, "client.search").expect("root span");
    let child = named(&spans, "raft.append_entries").expect("child span");
    assert_eq!(root.trace_id, trace_id);
    assert_eq!(root.span_id, parent_span_id);
    assert_eq!(root.parent_span_id, None);
    assert_eq!(child.trace_id, trace_id);
    assert_eq!(child.span_id, inner_span_id);
    assert_eq!(child.parent_span_id.as_deref(), Some(parent_span_id.as_str()));
    assert_eq!(root.service_name.as_deref(), Some("bayard"));
    assert_eq!(root.service_instance_id.as_deref(), Some("1"));
    assert_eq!(child.service_instance_id.as_deref(), Some("2"));
    assert_eq!(root.attribute("request"), Some("search"));

    node_a.shutdown().expect("shutdown a");
    node_b.shutdown().expect("shutdown b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_or_missing_traceparents_start_a_new_trace() {
    let receiver = OtlpReceiver::start();
    let provider = telemetry::tracer_provider(&receiver.endpoint, "3", &SamplerConfig::AlwaysOn).expect("provider");
    let invalid = [
        None,
        Some(""),
        Some("garbage"),
        Some("00-00000000000000000000000000000000-0000000000000000-01"),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"),
    ];
    let mut trace_ids = Vec::new();
    tracing::subscriber::with_default(subscriber_for(&provider), || {
        for (position, traceparent) in invalid.iter().enumerate() {
            let span = tracing::info_span!("server.request", position);
            set_parent_from_traceparent(&span, *traceparent);
            let _entered = span.enter();
            let (trace_id, _, _) = traceparent_parts(&current_traceparent().expect("traceparent"));
            trace_ids.push(trace_id);
        }
    });
    flush(&provider).await;
    let spans = receiver
        .wait_for_async(|spans| spans.len() >= invalid.len(), WAIT)
        .await
        .unwrap_or_else(|spans| panic!("all spans should arrive: {spans:#?}"));
    for span in &spans {
        assert_eq!(span.parent_span_id, None, "{span:?} should be a root");
    }
    let distinct: std::collections::BTreeSet<_> = trace_ids.iter().collect();
    assert_eq!(distinct.len(), invalid.len(), "each invalid header starts its own trace");
    provider.shutdown().expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsampled_caller_keeps_the_trace_unsampled() {
    let receiver = OtlpReceiver::start();
    let provider = telemetry::tracer_provider(&receiver.endpoint, "4", &SamplerConfig::default()).expect("provider");
    let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let propagated = tracing::subscriber::with_default(subscriber_for(&provider), || {
        let span = tracing::info_span!("server.request");
        set_parent_from_traceparent(&span, Some(unsampled));
        let _entered = span.enter();
        let sampled_root = tracing::info_span!(parent: None, "server.sampled_root");
        drop(sampled_root);
        current_traceparent()
    })
    .expect("unsampled spans still propagate their context");
    let (trace_id, _, flags) = traceparent_parts(&propagated);
    assert_eq!(trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(flags, "00", "the caller's decision travels on");
    flush(&provider).await;
    // The sampled root shows that export works; the unsampled span must not be among the spans.
    let spans = receiver
        .wait_for_async(|spans| named(spans, "server.sampled_root").is_some(), WAIT)
        .await
        .unwrap_or_else(|spans| panic!("the sampled root should arrive: {spans:#?}"));
    assert!(named(&spans, "server.request").is_none(), "unsampled span exported: {spans:#?}");
    provider.shutdown().expect("shutdown");
}

#[test]
fn without_an_opentelemetry_layer_there_is_no_traceparent() {
    assert_eq!(current_traceparent(), None, "no span at all");
    let subscriber = tracing_subscriber::registry().with(tracing_subscriber::fmt::layer().with_test_writer());
    tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("server.request");
        // No layer to link to: must be a quiet no-op.
        set_parent_from_traceparent(&span, Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        let _entered = span.enter();
        assert_eq!(current_traceparent(), None);
    });
}

#[test]
fn tracer_provider_refuses_bad_endpoints_and_a_missing_runtime() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let inside = runtime.enter();
    for endpoint in ["https://127.0.0.1:4317", "127.0.0.1:4317", "not a url", ""] {
        match telemetry::tracer_provider(endpoint, "1", &SamplerConfig::default()) {
            Err(TelemetryError::Endpoint { .. }) => {}
            other => panic!("{endpoint:?} should be refused, got {other:?}"),
        }
    }
    drop(inside);
    match telemetry::tracer_provider("http://127.0.0.1:4317", "1", &SamplerConfig::default()) {
        Err(TelemetryError::NoRuntime) => {}
        other => panic!("outside a runtime, expected NoRuntime, got {other:?}"),
    }
}

#[test]
fn sampler_names_follow_the_opentelemetry_conventions() {
    let cases = [
        ("always_on", None, SamplerConfig::AlwaysOn),
        ("always_off", None, SamplerConfig::AlwaysOff),
        ("traceidratio", Some("0.25"), SamplerConfig::TraceIdRatio(0.25)),
        ("traceidratio", None, SamplerConfig::TraceIdRatio(1.0)),
        ("parentbased_always_on", None, SamplerConfig::ParentBasedAlwaysOn),
        ("parentbased_always_off", None, SamplerConfig::ParentBasedAlwaysOff),
        ("parentbased_traceidratio", Some("0.1"), SamplerConfig::ParentBasedTraceIdRatio(0.1)),
        ("ParentBased_TraceIdRatio", Some(" 0 "), SamplerConfig::ParentBasedTraceIdRatio(0.0)),
        ("", None, SamplerConfig::ParentBasedAlwaysOn),
    ];
    for (name, argument, expected) in cases {
        assert_eq!(SamplerConfig::parse(name, argument).expect(name), expected, "{name} {argument:?}");
    }
    for (name, argument) in [("traceidratio", Some("1.5")), ("traceidratio", Some("half")), ("jaeger_remote", None)] {
        assert!(matches!(SamplerConfig::parse(name, argument), Err(TelemetryError::Sampler(_))), "{name} {argument:?}");
    }
    assert_eq!(SamplerConfig::default(), SamplerConfig::ParentBasedAlwaysOn);
    assert_eq!(TelemetryConfig::new(LogFormat::Text, "1").with_otlp_endpoint(Some("  ".into())).otlp_endpoint, None);
}

// ---------------------------------------------------------------------------------------------
// `telemetry::init` in child processes.

/// Runs this test binary filtered to `test_name` with `mode` and `environment`; returns stdout.
fn run_child(test_name: &str, mode: &str, environment: &[(&str, &str)]) -> String {
    let mut command = Command::new(std::env::current_exe().expect("test binary"));
    command
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_MODE, mode)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_SDK_DISABLED")
        .env_remove("OTEL_TRACES_SAMPLER")
        .env_remove("OTEL_TRACES_SAMPLER_ARG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    for (name, value) in environment {
        command.env(name, value);
    }
    let output = command.output().expect("run the child test");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(
        output.status.success(),
        "child {test_name} failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    assert!(stdout.contains("1 passed"), "child {test_name} did not run: {stdout}");
    stdout
}

fn child_line<'a>(stdout: &'a str, prefix: &str) -> &'a str {
    stdout
        .lines()
        // libtest prints "test name ... " before the test's own output, on the same line.
        .find_map(|line| line.split_once(prefix).and_then(|(_, rest)| rest.split_whitespace().next()))
        .unwrap_or_else(|| panic!("no `{prefix}` line in the child's output:\n{stdout}"))
}

/// Names of this process's threads (Linux).
fn thread_names() -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return Vec::new() };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

/// Whether the batch exporter's thread ("OpenTelemetry.Traces.BatchProcessor", cut to 15 bytes)
/// shows up within `limit`. A new thread names itself once it runs, hence the polling.
fn exporter_thread_within(limit: Duration) -> bool {
    let started = std::time::Instant::now();
    loop {
        if thread_names().iter().any(|name| name.starts_with("OpenTelemetry")) {
            return true;
        }
        if started.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn init_with_an_endpoint_exports_spans_with_the_node_resource() {
    let receiver = OtlpReceiver::start();
    let stdout = run_child(
        "child_process_init",
        "export",
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()), ("OTEL_TRACES_SAMPLER", "always_on")],
    );
    let traceparent = child_line(&stdout, "TRACEPARENT=");
    let (trace_id, inner_span_id, flags) = traceparent_parts(traceparent);
    assert_eq!(flags, "01");
    // The child shut its guard down before exiting: every span is there already.
    let spans = receiver
        .wait_for(|spans| spans.iter().filter(|span| span.trace_id == trace_id).count() >= 2, Duration::from_secs(5))
        .unwrap_or_else(|spans| panic!("the child's spans should have been flushed at shutdown: {spans:#?}"));
    let root = named(&spans, "child.request").expect("root");
    let inner = named(&spans, "child.inner").expect("inner");
    assert_eq!(inner.span_id, inner_span_id);
    assert_eq!(inner.parent_span_id.as_deref(), Some(root.span_id.as_str()));
    assert_eq!(root.parent_span_id, None);
    for span in [root, inner] {
        assert_eq!(span.service_name.as_deref(), Some("bayard"));
        assert_eq!(span.service_instance_id.as_deref(), Some("7"));
    }
    assert_eq!(root.attribute("request"), Some("search"));
}

#[test]
fn dropping_the_guard_flushes_the_queued_spans() {
    let receiver = OtlpReceiver::start();
    let stdout = run_child(
        "child_process_init",
        "drop",
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()), ("OTEL_TRACES_SAMPLER", "always_on")],
    );
    let (trace_id, _, _) = traceparent_parts(child_line(&stdout, "TRACEPARENT="));
    receiver
        .wait_for(|spans| spans.iter().filter(|span| span.trace_id == trace_id).count() >= 2, Duration::from_secs(5))
        .unwrap_or_else(|spans| panic!("dropping the guard should flush the spans: {spans:#?}"));
}

#[test]
fn init_without_an_endpoint_exports_nothing_and_starts_no_exporter() {
    let receiver = OtlpReceiver::start();
    // OTEL_SDK_DISABLED wins over an endpoint in the environment, as the specification says.
    run_child(
        "child_process_init",
        "silent",
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()), ("OTEL_SDK_DISABLED", "true")],
    );
    run_child("child_process_init", "silent", &[("OTEL_EXPORTER_OTLP_ENDPOINT", "")]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(receiver.spans(), Vec::new(), "nothing may be exported without an endpoint");
}

/// The child side of the `init` tests; does nothing unless started by them.
#[test]
fn child_process_init() {
    let Ok(mode) = std::env::var(CHILD_MODE) else { return };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let mut config = TelemetryConfig::from_env(LogFormat::Json, "7");
        // The test's spans have the test crate as target, which the default filter leaves out.
        config.trace_directive = "info".to_string();
        match mode.as_str() {
            "export" | "drop" => {
                assert!(config.otlp_endpoint.is_some(), "endpoint from OTEL_EXPORTER_OTLP_ENDPOINT");
                assert_eq!(config.sampler, SamplerConfig::AlwaysOn, "sampler from OTEL_TRACES_SAMPLER");
                let guard = telemetry::init(config).expect("init");
                assert!(guard.is_exporting());
                assert!(exporter_thread_within(Duration::from_secs(5)), "threads: {:?}", thread_names());
                // A second init (another node in the same process) changes nothing.
                let second = telemetry::init(TelemetryConfig::new(LogFormat::Text, "8")).expect("second init");
                assert!(!second.is_exporting());
                {
                    let root = tracing::info_span!("child.request", request = "search");
                    let _root = root.enter();
                    let inner = tracing::info_span!("child.inner");
                    let _inner = inner.enter();
                    tracing::info!("inside the inner span");
                    println!("TRACEPARENT={}", current_traceparent().expect("traceparent"));
                }
                if mode == "export" {
                    guard.shutdown().await.expect("shutdown");
                } else {
                    // What `main` does when `run` returns: the guard is dropped on the thread
                    // that runs `block_on`, and must still flush.
                    drop(guard);
                }
            }
            "silent" => {
                assert_eq!(config.otlp_endpoint, None);
                let guard = telemetry::init(config).expect("init");
                assert!(!guard.is_exporting());
                let span = tracing::info_span!("child.request");
                set_parent_from_traceparent(&span, Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
                let _entered = span.enter();
                tracing::info!("logs still work");
                assert_eq!(current_traceparent(), None);
                assert!(!exporter_thread_within(Duration::from_millis(500)), "threads: {:?}", thread_names());
                guard.shutdown().await.expect("shutdown");
            }
            other => panic!("unknown child mode {other}"),
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Metrics. The registry is process-wide and tests run in parallel: each test uses label values
// of its own and checks only those.

fn scrape_metrics() -> prometheus_parse::Scrape {
    let text = telemetry_metrics::render().expect("render");
    check_openmetrics_structure(&text);
    prometheus_parse::Scrape::parse(text.lines().map(|line| Ok(line.to_string()))).expect("parse metrics")
}

/// What the lenient parser does not check: every sample belongs to a family announced by a
/// `# TYPE` line, with the suffixes its type allows, and the text ends with `# EOF`.
fn check_openmetrics_structure(text: &str) {
    assert_eq!(text.lines().last(), Some("# EOF"), "OpenMetrics text ends with # EOF");
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            families.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let name = line.split(['{', ' ']).next().expect("sample name");
        assert!(name.starts_with("bayard_"), "{name} is not prefixed with bayard_");
        let known = families.iter().any(|(family, kind)| {
            let suffixes: &[&str] = match kind.as_str() {
                "counter" => &["_total", "_created"],
                "histogram" => &["_bucket", "_sum", "_count", "_created"],
                "gauge" | "info" | "unknown" => &[""],
                _ => &[],
            };
            suffixes.iter().any(|suffix| name == format!("{family}{suffix}"))
        });
        assert!(known, "sample `{line}` has no matching # TYPE line");
    }
}

fn sample_value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape.samples.iter().find_map(|sample| {
        let matches =
            sample.metric == metric && labels.iter().all(|(key, value)| sample.labels.get(key) == Some(*value));
        if !matches {
            return None;
        }
        match &sample.value {
            prometheus_parse::Value::Counter(value)
            | prometheus_parse::Value::Gauge(value)
            | prometheus_parse::Value::Untyped(value) => Some(*value),
            prometheus_parse::Value::Histogram(buckets) => buckets.last().map(|bucket| bucket.count),
            prometheus_parse::Value::Summary(_) => None,
        }
    })
}

#[test]
fn metrics_render_as_prometheus_text_with_the_bayard_metrics() {
    telemetry::record_request("client", "metrics_test_search", "ok", Duration::from_millis(3));
    telemetry::record_request("client", "metrics_test_search", "ok", Duration::from_millis(40));
    telemetry::record_request("client", "metrics_test_search", "not_found", Duration::from_millis(1));
    telemetry_metrics::set_index_stats(1234, 5);
    telemetry_metrics::record_index_commit(Duration::from_millis(20));
    telemetry_metrics::record_stream("metrics_test_kind");
    telemetry_metrics::record_refused_connection("metrics_test_reason");
    telemetry_metrics::set_membership_members([("alive", 2), ("unreachable", 1)]);
    {
        let connection = ConnectionMetrics::open(ConnectionDirection::Inbound);
        let mut stats = quinn::ConnectionStats::default();
        stats.udp_tx.bytes = 1000;
        stats.udp_rx.bytes = 300;
        connection.observe(&stats);
        connection.observe(&stats);
        stats.udp_tx.bytes = 1500;
        connection.observe(&stats);
        let scrape = scrape_metrics();
        assert!(
            sample_value(&scrape, "bayard_quic_connections", &[("direction", "inbound")]).expect("connections") >= 1.0
        );
        assert!(sample_value(&scrape, "bayard_quic_sent_bytes_total", &[]).expect("sent") >= 1500.0);
        assert!(sample_value(&scrape, "bayard_quic_received_bytes_total", &[]).expect("received") >= 300.0);
    }

    let scrape = scrape_metrics();
    let ok = [("kind", "client"), ("request", "metrics_test_search"), ("outcome", "ok")];
    assert_eq!(sample_value(&scrape, "bayard_requests_total", &ok), Some(2.0));
    let not_found = [("kind", "client"), ("request", "metrics_test_search"), ("outcome", "not_found")];
    assert_eq!(sample_value(&scrape, "bayard_requests_total", &not_found), Some(1.0));
    let duration = [("kind", "client"), ("request", "metrics_test_search")];
    assert_eq!(sample_value(&scrape, "bayard_request_duration_seconds_count", &duration), Some(3.0));
    let buckets = scrape
        .samples
        .iter()
        .find(|sample| {
            sample.metric == "bayard_request_duration_seconds"
                && sample.labels.get("request") == Some("metrics_test_search")
        })
        .expect("request duration histogram");
    match &buckets.value {
        prometheus_parse::Value::Histogram(buckets) => {
            let at_5ms = buckets.iter().find(|bucket| bucket.less_than == 0.005).expect("5 ms bucket");
            assert_eq!(at_5ms.count, 2.0, "1 ms and 3 ms are under 5 ms, 40 ms is not");
        }
        other => panic!("expected a histogram, got {other:?}"),
    }
    assert_eq!(sample_value(&scrape, "bayard_index_documents", &[]), Some(1234.0));
    assert_eq!(sample_value(&scrape, "bayard_index_segments", &[]), Some(5.0));
    assert!(sample_value(&scrape, "bayard_index_commit_duration_seconds_count", &[]).expect("commits") >= 1.0);
    assert_eq!(sample_value(&scrape, "bayard_quic_streams_total", &[("kind", "metrics_test_kind")]), Some(1.0));
    assert_eq!(
        sample_value(&scrape, "bayard_refused_connections_total", &[("reason", "metrics_test_reason")]),
        Some(1.0)
    );
    assert_eq!(sample_value(&scrape, "bayard_membership_members", &[("state", "alive")]), Some(2.0));
    assert_eq!(sample_value(&scrape, "bayard_membership_members", &[("state", "unreachable")]), Some(1.0));
    assert_eq!(sample_value(&scrape, "bayard_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), Some(1.0));
    let names: std::collections::BTreeSet<&str> = scrape.samples.iter().map(|sample| sample.metric.as_str()).collect();
    for expected in ["bayard_quic_connections_opened_total", "bayard_quic_lost_packets_total"] {
        assert!(names.contains(expected), "{expected} missing from {names:?}");
    }

    telemetry_metrics::set_membership_members([("alive", 3)]);
    let scrape = scrape_metrics();
    assert_eq!(sample_value(&scrape, "bayard_membership_members", &[("state", "alive")]), Some(3.0));
    assert_eq!(
        sample_value(&scrape, "bayard_membership_members", &[("state", "unreachable")]),
        None,
        "states with no member go"
    );
}

fn log_id(term: u64, leader: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, leader), index)
}

fn leader_metrics(node: u64) -> RaftMetrics<u64, BasicNode> {
    let mut raft = RaftMetrics::new_initial(node);
    raft.current_term = 4;
    raft.state = ServerState::Leader;
    raft.current_leader = Some(node);
    raft.last_log_index = Some(10);
    raft.last_applied = Some(log_id(4, node, 10));
    raft.replication = Some(BTreeMap::from([
        (node, Some(log_id(4, node, 10))),
        (node + 1, Some(log_id(4, node, 7))),
        (node + 2, None),
    ]));
    raft
}

#[test]
fn raft_gauges_and_replication_lag_follow_raft_metrics() {
    let node = 9001;
    let labels = [("node", "9001")];
    telemetry::update_from_raft_metrics(node, &leader_metrics(node));
    telemetry_metrics::set_raft_commit_index(node, Some(10));
    let scrape = scrape_metrics();
    assert_eq!(sample_value(&scrape, "bayard_raft_term", &labels), Some(4.0));
    assert_eq!(sample_value(&scrape, "bayard_raft_leader_id", &labels), Some(9001.0));
    assert_eq!(sample_value(&scrape, "bayard_raft_is_leader", &labels), Some(1.0));
    assert_eq!(sample_value(&scrape, "bayard_raft_last_log_index", &labels), Some(10.0));
    assert_eq!(sample_value(&scrape, "bayard_raft_applied_index", &labels), Some(10.0));
    assert_eq!(sample_value(&scrape, "bayard_raft_commit_index", &labels), Some(10.0));
    let lag = |follower: &str| {
        sample_value(&scrape, "bayard_raft_replication_lag", &[("node", "9001"), ("follower", follower)])
    };
    assert_eq!(lag("9002"), Some(3.0), "10 - 7");
    assert_eq!(lag("9003"), Some(11.0), "nothing replicated: the whole log (indexes 0..=10)");
    assert_eq!(lag("9001"), None, "the leader is not its own follower");

    // Leadership lost: no more lag series for this node, and no leader known.
    let mut follower = RaftMetrics::<u64, BasicNode>::new_initial(node);
    follower.current_term = 5;
    follower.state = ServerState::Follower;
    telemetry::update_from_raft_metrics(node, &follower);
    let scrape = scrape_metrics();
    assert_eq!(sample_value(&scrape, "bayard_raft_replication_lag", &[("node", "9001")]), None);
    assert_eq!(sample_value(&scrape, "bayard_raft_leader_id", &labels), Some(-1.0));
    assert_eq!(sample_value(&scrape, "bayard_raft_is_leader", &labels), Some(0.0));
    assert_eq!(sample_value(&scrape, "bayard_raft_applied_index", &labels), Some(-1.0));
}

#[test]
fn readiness_needs_a_leader_and_everything_committed_applied() {
    let mut raft = RaftMetrics::<u64, BasicNode>::new_initial(1);
    assert_eq!(telemetry::raft_readiness(&raft, None), Err("no leader is known".to_string()));
    raft.current_leader = Some(2);
    assert_eq!(telemetry::raft_readiness(&raft, None), Ok(()));
    let behind = telemetry::raft_readiness(&raft, Some(3)).expect_err("nothing applied yet");
    assert!(behind.contains("behind the commit index 3"), "{behind}");
    raft.last_applied = Some(log_id(1, 2, 2));
    assert!(telemetry::raft_readiness(&raft, Some(3)).is_err());
    raft.last_applied = Some(log_id(1, 2, 3));
    assert_eq!(telemetry::raft_readiness(&raft, Some(3)), Ok(()));
    raft.state = ServerState::Shutdown;
    assert!(telemetry::raft_readiness(&raft, Some(3)).is_err());
}

// ---------------------------------------------------------------------------------------------
// The HTTP side port.

struct HttpAnswer {
    status: u16,
    headers: String,
    body: String,
}

/// One GET over a fresh connection, written by hand: the server must speak plain HTTP/1.1.
async fn get(address: SocketAddr, path: &str) -> HttpAnswer {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.expect("read");
        answer
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange).await.expect("answer in time");
    let answer = String::from_utf8(answer).expect("utf-8 answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("head and body");
    let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).expect("status code");
    HttpAnswer { status, headers: head.to_ascii_lowercase(), body: body.to_string() }
}

#[tokio::test]
async fn health_and_metrics_endpoints() {
    let ready = Arc::new(AtomicBool::new(false));
    let health = {
        let ready = ready.clone();
        telemetry::health_from_fn(
            || true,
            move || if ready.load(Ordering::SeqCst) { Ok(()) } else { Err("no leader is known".to_string()) },
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(telemetry::serve_http(listener, health, async {
        let _ = stopped.await;
    }));

    let live = get(address, "/livez").await;
    assert_eq!(live.status, 200);
    assert_eq!(live.body, "ok\n");

    let not_ready = get(address, "/readyz").await;
    assert_eq!(not_ready.status, 503);
    assert!(not_ready.body.contains("no leader is known"), "{}", not_ready.body);
    ready.store(true, Ordering::SeqCst);
    assert_eq!(get(address, "/readyz").await.status, 200);

    telemetry::record_request("admin", "http_test_status", "ok", Duration::from_millis(2));
    let metrics = get(address, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.headers.contains("content-type: application/openmetrics-text"), "{}", metrics.headers);
    check_openmetrics_structure(&metrics.body);
    let scrape = prometheus_parse::Scrape::parse(metrics.body.lines().map(|line| Ok(line.to_string()))).expect("parse");
    let labels = [("kind", "admin"), ("request", "http_test_status"), ("outcome", "ok")];
    assert_eq!(sample_value(&scrape, "bayard_requests_total", &labels), Some(1.0));

    assert_eq!(get(address, "/nothing-here").await.status, 404);

    stop.send(()).expect("stop");
    let stopped = tokio::time::timeout(Duration::from_secs(10), server).await.expect("server stops in time");
    stopped.expect("join").expect("serve_http");
}
