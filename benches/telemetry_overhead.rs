//! The cost of trace export: the same load against a `bayard serve` process with OTLP export off
//! and on (to an OTLP receiver in this process), alternating, in one run.
//!
//! `just bench` (or `cargo bench --bench telemetry_overhead`). Prints documents/s of a bulk load
//! and requests/s of single puts for each mode, and the ratios on / off.

#[path = "../tests/common/otlp.rs"]
mod otlp;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bayard::certs::{self, CertificateAuthority, Validity};
use bayard::client::{Client, ClientOptions};
use bayard::protocol::DocumentInput;
use bayard::transport::{Role, TlsFiles};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port()
}

fn documents(count: usize, prefix: &str) -> Vec<DocumentInput> {
    (0..count)
        .map(|number| DocumentInput {
            id: None,
            document_json: format!(
                r#"{{"_id":"{prefix}{number}","title":"document {number} about search","body":"quic raft tantivy index segment replica leader {number}","year":{}}}"#,
                1990 + number % 35
            ),
        })
        .collect()
}

struct Measurement {
    bulk_documents_per_second: f64,
    puts_per_second: f64,
}

async fn measure(
    directory: &std::path::Path,
    node: &TlsFiles,
    client: &TlsFiles,
    endpoint: Option<&str>,
) -> Measurement {
    let port = free_udp_port();
    let data = tempfile::tempdir_in(directory).expect("data dir");
    let mut command = Command::new(env!("CARGO_BIN_EXE_bayard"));
    command
        .args(["serve", "--id", "1", "--host", "127.0.0.1", "--port", &port.to_string(), "--commit-interval", "0"])
        .arg("--data-directory")
        .arg(data.path())
        .arg("--ca")
        .arg(&node.ca_certificate)
        .arg("--cert")
        .arg(&node.certificate)
        .arg("--key")
        .arg(&node.private_key)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(endpoint) = endpoint {
        command.args(["--otlp-endpoint", endpoint]);
    }
    let _server = Server(command.spawn().expect("spawn bayard serve"));
    let mut options = ClientOptions::new(vec![format!("127.0.0.1:{port}")], client.clone());
    options.connect_timeout = Duration::from_millis(500);
    let client = Client::connect(options).expect("client");
    let started = Instant::now();
    while client.status().await.map(|status| status.leader.is_none()).unwrap_or(true) {
        assert!(started.elapsed() < Duration::from_secs(30), "the node did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let bulk = documents(20_000, "b");
    let count = bulk.len();
    let started = Instant::now();
    client.bulk_put(bulk, |_| {}).await.expect("bulk put");
    client.commit().await.expect("commit");
    let bulk_documents_per_second = count as f64 / started.elapsed().as_secs_f64();

    let singles = 500;
    let started = Instant::now();
    for number in 0..singles {
        client.put(&format!("s{number}"), r#"{"title":"one at a time"}"#).await.expect("put");
    }
    let puts_per_second = singles as f64 / started.elapsed().as_secs_f64();
    Measurement { bulk_documents_per_second, puts_per_second }
}

fn main() {
    let directory = tempfile::tempdir().expect("temp dir");
    let (authority, pair) = CertificateAuthority::generate("bench ca", Validity::days_from_now(1)).expect("ca");
    certs::write_pair(directory.path(), "ca", &pair, false).expect("write ca");
    let issue = |role: Role, stem: &str| {
        let names = certs::default_node_subject_alternative_names();
        let pair = authority.issue(&role, "bayard", &names, Validity::days_from_now(1)).expect("issue");
        let (certificate, private_key) = certs::write_pair(directory.path(), stem, &pair, true).expect("write");
        TlsFiles { ca_certificate: directory.path().join("ca.pem"), certificate, private_key }
    };
    let node = issue(Role::Node { node_id: 1 }, "node-1");
    let client = issue(Role::Client { name: "bench".into() }, "client");
    let receiver = otlp::OtlpReceiver::start();

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let mut off = Vec::new();
        let mut on = Vec::new();
        // Alternate so that drift (page cache, CPU frequency) hits both modes alike.
        for _round in 0..2 {
            off.push(measure(directory.path(), &node, &client, None).await);
            on.push(measure(directory.path(), &node, &client, Some(&receiver.endpoint)).await);
        }
        let mean = |values: &[Measurement], pick: fn(&Measurement) -> f64| {
            values.iter().map(pick).sum::<f64>() / values.len() as f64
        };
        let (bulk_off, bulk_on) =
            (mean(&off, |m| m.bulk_documents_per_second), mean(&on, |m| m.bulk_documents_per_second));
        let (puts_off, puts_on) = (mean(&off, |m| m.puts_per_second), mean(&on, |m| m.puts_per_second));
        println!("single node, 20000 documents in bulk requests then commit; 500 single puts; mean of 2 rounds each");
        println!("export off: {bulk_off:>8.0} documents/s  {puts_off:>7.0} puts/s");
        println!(
            "export on:  {bulk_on:>8.0} documents/s  {puts_on:>7.0} puts/s   ({} spans received)",
            receiver.spans().len()
        );
        println!("ratio on / off: bulk {:.2}, single puts {:.2}", bulk_on / bulk_off, puts_on / puts_off);
    });
}
