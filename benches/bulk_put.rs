//! Bulk-put throughput: one node versus a three-node cluster, in the same run, on loopback.
//!
//! `just bench` (or `cargo bench --bench bulk_put`). Every node is in this process but talks over
//! real QUIC + mutual TLS on 127.0.0.1; documents go through the client library in bulk requests,
//! then one commit. Prints documents per second for each setup and the ratio cluster / single.
//! Sizes: `BAYARD_BENCH_DOCUMENTS` (default 50000) documents of about 300 bytes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

mod common;

use common::Certificates;

use bayard::client::{Client, ClientOptions};
use bayard::index::{DEFAULT_SCHEMA_JSON, DEFAULT_TOKENIZER_JSON};
use bayard::node::{Node, NodeConfig, RunningNode};
use bayard::protocol::DocumentInput;
use bayard::transport::Role;

fn documents(count: usize) -> Vec<DocumentInput> {
    const WORDS: [&str; 12] = [
        "search", "engine", "raft", "quic", "index", "segment", "replica", "leader", "shard", "token", "query", "facet",
    ];
    (0..count)
        .map(|number| {
            let title: Vec<&str> = (0..6).map(|offset| WORDS[(number * 7 + offset * 5) % WORDS.len()]).collect();
            let body: Vec<&str> = (0..30).map(|offset| WORDS[(number * 3 + offset * 11) % WORDS.len()]).collect();
            let category = ["/lang/rust", "/lang/go", "/tool/editor"][number % 3];
            DocumentInput {
                id: None,
                document_json: format!(
                    r#"{{"_id":"d{number}","title":"{}","body":"{}","year":{},"category":"{category}"}}"#,
                    title.join(" "),
                    body.join(" "),
                    1990 + number % 35
                ),
            }
        })
        .collect()
}

async fn start(
    certificates: &Certificates,
    node_id: u64,
    data: &tempfile::TempDir,
    seed: Option<String>,
) -> RunningNode {
    let mut config = NodeConfig::new(
        node_id,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        data.path().to_path_buf(),
        DEFAULT_SCHEMA_JSON.to_string(),
        DEFAULT_TOKENIZER_JSON.to_string(),
        certificates.files(&Role::Node { node_id }, &format!("node-{node_id}")),
    );
    config.commit_interval = Duration::ZERO;
    config.writer_memory_bytes = 64 * 1024 * 1024;
    if let Some(seed) = seed {
        config.peers = vec![(1, seed)];
    }
    Node::start(config).await.expect("node starts")
}

async fn wait_for_voters(node: &RunningNode, voters: usize) {
    node.raft()
        .wait(Some(Duration::from_secs(60)))
        .metrics(
            |metrics| {
                metrics.membership_config.membership().voter_ids().count() == voters
                    && metrics.membership_config.membership().get_joint_config().len() == 1
                    && metrics.current_leader.is_some()
            },
            "cluster forms",
        )
        .await
        .expect("cluster forms");
}

/// Loads `documents` through `servers` and returns documents per second (commit included).
async fn load(certificates: &Certificates, servers: Vec<String>, documents: Vec<DocumentInput>) -> f64 {
    let options = ClientOptions::new(servers, certificates.files(&Role::Client { name: "bench".into() }, "client"));
    let client = Client::connect(options).expect("client");
    let count = documents.len();
    let started = Instant::now();
    client.bulk_put(documents, |_| {}).await.expect("bulk put");
    client.commit().await.expect("commit");
    let elapsed = started.elapsed();
    let status = client.status().await.expect("status");
    assert_eq!(status.document_count, count as u64, "every document is indexed");
    count as f64 / elapsed.as_secs_f64()
}

async fn single_node(count: usize) -> f64 {
    let certificates = Certificates::new();
    let data = tempfile::tempdir().expect("temp dir");
    let node = start(&certificates, 1, &data, None).await;
    wait_for_voters(&node, 1).await;
    let rate = load(&certificates, vec![node.local_address().to_string()], documents(count)).await;
    node.shutdown().await;
    rate
}

async fn three_nodes(count: usize) -> f64 {
    let certificates = Certificates::new();
    let directories: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("temp dir")).collect();
    let first = start(&certificates, 1, &directories[0], None).await;
    wait_for_voters(&first, 1).await;
    let seed = first.local_address().to_string();
    let second = start(&certificates, 2, &directories[1], Some(seed.clone())).await;
    wait_for_voters(&first, 2).await;
    let third = start(&certificates, 3, &directories[2], Some(seed.clone())).await;
    wait_for_voters(&first, 3).await;
    // Through the leader, as a client that found it would.
    let rate = load(&certificates, vec![seed], documents(count)).await;
    for node in [third, second, first] {
        node.shutdown().await;
    }
    rate
}

fn main() {
    let count: usize =
        std::env::var("BAYARD_BENCH_DOCUMENTS").ok().and_then(|value| value.parse().ok()).unwrap_or(50_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        // Warm-up: page cache, allocator, TLS session setup.
        single_node(count / 10).await;
        let single = single_node(count).await;
        let cluster = three_nodes(count).await;
        println!("bulk put of {count} documents, bulk requests of up to 1000 documents, then one commit");
        println!("single node:       {single:>10.0} documents/s");
        println!("three-node cluster:{cluster:>10.0} documents/s");
        println!("ratio cluster / single: {:.2}", cluster / single);
    });
}
