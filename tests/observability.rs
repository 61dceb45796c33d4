//! Observability end to end, with real `bayard` processes: one client request is one trace
//! across the nodes it touched (exported over OTLP to a receiver in this test), `/metrics` parses
//! and agrees with `bayard status`, `/readyz` waits for a leader.

#[path = "common/otlp.rs"]
mod otlp;
#[path = "common/process.rs"]
mod process;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use otlp::{OtlpReceiver, ReceivedSpan};
use process::{eventually_blocking, free_udp_port, json, run_with_environment, ServeProcess};

const SETTLE: Duration = Duration::from_secs(60);

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP GET on 127.0.0.1, by hand: (status, body).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

fn make_certificates(root: &Path, nodes: &[u64]) {
    json(root, &["certs", "ca", "--out-dir", "certs"], None);
    for node_id in nodes {
        json(root, &["certs", "node", "--id", &node_id.to_string(), "--out-dir", "certs"], None);
    }
    json(root, &["certs", "admin", "--name", "ops", "--out-dir", "certs"], None);
}

fn serve_arguments(node_id: u64, port: u16, peers: &str, extra: &[String]) -> Vec<String> {
    let mut arguments: Vec<String> = vec![
        "--id".into(),
        node_id.to_string(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
        "--data-directory".into(),
        format!("data/{node_id}"),
        "--ca".into(),
        "certs/ca.pem".into(),
        "--cert".into(),
        format!("certs/node-{node_id}.pem"),
        "--key".into(),
        format!("certs/node-{node_id}.key"),
    ];
    if !peers.is_empty() {
        arguments.extend(["--peers".into(), peers.to_string()]);
    }
    arguments.extend(extra.iter().cloned());
    arguments
}

fn admin(command: &[&str], servers: &str) -> Vec<String> {
    let mut arguments: Vec<String> = command.iter().map(|part| part.to_string()).collect();
    arguments.extend(
        ["--servers", servers, "--ca", "certs/ca.pem", "--cert", "certs/admin-ops.pem", "--key", "certs/admin-ops.key"]
            .iter()
            .map(|part| part.to_string()),
    );
    arguments
}

fn call(root: &Path, command: &[&str], servers: &str) -> serde_json::Value {
    let arguments = admin(command, servers);
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    json(root, &arguments, None)
}

fn instance(span: &ReceivedSpan) -> &str {
    span.service_instance_id.as_deref().unwrap_or("")
}

#[test]
fn a_put_through_a_follower_is_one_trace_across_nodes() {
    let receiver = OtlpReceiver::start();
    let directory = tempfile::tempdir().unwrap();
    let root = directory.path();
    make_certificates(root, &[1, 2, 3]);
    let ports: Vec<u16> = (0..3).map(|_| free_udp_port()).collect();
    let export = vec!["--otlp-endpoint".to_string(), receiver.endpoint.clone()];
    let _first = ServeProcess::start(root, &serve_arguments(1, ports[0], "", &export));
    let seed = format!("1=127.0.0.1:{}", ports[0]);
    let _second = ServeProcess::start(root, &serve_arguments(2, ports[1], &seed, &export));
    let _third = ServeProcess::start(root, &serve_arguments(3, ports[2], &seed, &export));
    let everyone = ports.iter().map(|port| format!("127.0.0.1:{port}")).collect::<Vec<_>>().join(",");
    let formed = eventually_blocking(SETTLE, || {
        let status = call(root, &["status"], &everyone);
        status["nodes"].as_array().is_some_and(|nodes| nodes.len() == 3 && nodes.iter().all(|n| n["state"] == "alive"))
    });
    assert!(formed, "the cluster did not form");
    let leader = call(root, &["status"], &everyone)["leader"].as_u64().expect("a leader");
    let follower = (1..=3).find(|node_id| *node_id != leader).unwrap();
    let follower_address = format!("127.0.0.1:{}", ports[(follower - 1) as usize]);

    // The CLI is the root of the trace: it exports its own span too.
    let arguments = admin(&["put", "--id", "traced", r#"{"title":"follow me"}"#], &follower_address);
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    let output = run_with_environment(root, &arguments, None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint)]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let (follower_id, leader_id) = (follower.to_string(), leader.to_string());
    let complete = |spans: &[ReceivedSpan]| {
        spans.iter().filter(|span| span.name == "bayard.client" && instance(span) == "cli").any(|root_span| {
            let trace: Vec<&ReceivedSpan> = spans.iter().filter(|span| span.trace_id == root_span.trace_id).collect();
            trace.iter().any(|span| instance(span) == follower_id && span.name == "bayard.request")
                && trace.iter().any(|span| instance(span) == leader_id && span.name == "bayard.request")
        })
    };
    let spans = receiver
        .wait_for(complete, Duration::from_secs(30))
        .unwrap_or_else(|spans| panic!("no complete trace; received {} spans: {spans:#?}", spans.len()));
    let root_span = spans
        .iter()
        .find(|span| {
            span.name == "bayard.client" && instance(span) == "cli" && {
                let trace_id = &span.trace_id;
                spans.iter().any(|other| &other.trace_id == trace_id && instance(other) == leader_id)
            }
        })
        .unwrap();
    let trace: Vec<&ReceivedSpan> = spans.iter().filter(|span| span.trace_id == root_span.trace_id).collect();
    let nodes: std::collections::BTreeSet<&str> = trace.iter().map(|span| instance(span)).collect();
    assert!(nodes.contains(follower_id.as_str()) && nodes.contains(leader_id.as_str()), "{nodes:?}");

    // Parent links: client → follower's request → follower's forward → leader's request.
    let by_id = |id: &str| trace.iter().find(|span| span.span_id == id).copied();
    let follower_request =
        trace.iter().find(|span| instance(span) == follower_id && span.name == "bayard.request").unwrap();
    assert_eq!(follower_request.parent_span_id.as_deref(), Some(root_span.span_id.as_str()));
    let leader_request =
        trace.iter().find(|span| instance(span) == leader_id && span.name == "bayard.request").unwrap();
    let forward = by_id(leader_request.parent_span_id.as_deref().expect("the leader's span has a parent"))
        .expect("the parent of the leader's span is in the trace");
    assert_eq!(forward.name, "bayard.forward_to_leader");
    assert_eq!(instance(forward), follower_id);
    // The forward span descends from the follower's request span.
    let mut ancestor = forward.parent_span_id.clone();
    let mut found = false;
    for _ in 0..10 {
        let Some(id) = ancestor else { break };
        if id == follower_request.span_id {
            found = true;
            break;
        }
        ancestor = by_id(&id).and_then(|span| span.parent_span_id.clone());
    }
    assert!(found, "the forward span does not descend from the follower's request span");
}

#[test]
fn metrics_agree_with_status_and_readiness_waits_for_a_leader() {
    let directory = tempfile::tempdir().unwrap();
    let root = directory.path();
    make_certificates(root, &[1, 2]);

    // A node whose only seed never answers has no leader: live, not ready.
    let lonely_metrics = free_tcp_port();
    let dead_seed = format!("9=127.0.0.1:{}", free_udp_port());
    let lonely_extra = vec!["--metrics-port".to_string(), lonely_metrics.to_string()];
    let _lonely = ServeProcess::start(root, &serve_arguments(2, free_udp_port(), &dead_seed, &lonely_extra));
    assert_eq!(http_get(lonely_metrics, "/livez").map(|answer| answer.0), Some(200));
    let (status, reason) = http_get(lonely_metrics, "/readyz").expect("readyz answers");
    assert_eq!(status, 503, "{reason}");
    assert!(reason.contains("no leader"), "{reason}");

    // A node that leads its own cluster becomes ready, and its metrics agree with `status`.
    let metrics_port = free_tcp_port();
    let port = free_udp_port();
    let extra = vec!["--metrics-port".to_string(), metrics_port.to_string()];
    let _node = ServeProcess::start(root, &serve_arguments(1, port, "", &extra));
    let server = format!("127.0.0.1:{port}");
    assert!(eventually_blocking(SETTLE, || http_get(metrics_port, "/readyz").is_some_and(|answer| answer.0 == 200)));
    call(root, &["put", "--id", "m", r#"{"title":"measured"}"#], &server);
    call(root, &["commit"], &server);
    let status = call(root, &["status"], &server);
    let agrees = eventually_blocking(SETTLE, || {
        let Some((200, text)) = http_get(metrics_port, "/metrics") else { return false };
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|line| Ok(line.to_string()))).expect("parses");
        let value = |name: &str| {
            scrape
                .samples
                .iter()
                .find(|sample| sample.metric == name && sample.labels.get("node") == Some("1"))
                .and_then(|sample| match sample.value {
                    prometheus_parse::Value::Gauge(value) | prometheus_parse::Value::Untyped(value) => Some(value),
                    _ => None,
                })
        };
        let documents =
            scrape.samples.iter().find(|sample| sample.metric == "bayard_index_documents").map(|s| match s.value {
                prometheus_parse::Value::Gauge(value) | prometheus_parse::Value::Untyped(value) => value,
                _ => -1.0,
            });
        value("bayard_raft_term") == status["term"].as_f64()
            && value("bayard_raft_leader_id") == status["leader"].as_f64()
            && value("bayard_raft_applied_index") >= status["applied_index"].as_f64()
            && documents == Some(1.0)
            && scrape.samples.iter().any(|sample| sample.metric.starts_with("bayard_requests"))
    });
    assert!(agrees, "metrics do not agree with status {status}: {:?}", http_get(metrics_port, "/metrics"));
}
