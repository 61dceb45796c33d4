//! Single-document puts: concurrency 1 and 64, on one node and on three nodes through the
//! leader, against what the disk itself allows in the same run (one 4 KiB write + fdatasync,
//! which is what a durable put cannot go below).
//!
//! `just bench` (or `cargo bench --bench puts`). Every node is in this process and talks real
//! QUIC + mutual TLS on 127.0.0.1; every put is one client request (its own request id, answered
//! once committed by a quorum and applied). Documents are GCIDE dictionary articles
//! (`benches/common/corpus.rs`). Sizes: `BAYARD_BENCH_PUTS` (default 20000) puts at c=64, a
//! tenth of that at c=1.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{corpus, Certificates, Latencies};

use bayard::client::{Client, ClientOptions};
use bayard::transport::Role;

struct Run {
    puts_per_second: f64,
    latencies: Latencies,
    cpu_per_put: Duration,
}

/// `total` puts from `concurrency` tasks sharing one client (one QUIC connection).
async fn puts(client: Arc<Client>, documents: Arc<Vec<String>>, concurrency: usize, total: usize) -> Run {
    let cpu_before = common::process_cpu();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let client = Arc::clone(&client);
        let documents = Arc::clone(&documents);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut number = worker;
            while number < total {
                let document = &documents[number % documents.len()];
                let began = Instant::now();
                client.put(&format!("p{number}"), document).await.expect("put");
                latencies.push(began.elapsed());
                number += concurrency;
            }
            latencies
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    for task in tasks {
        latencies.extend(task.await.expect("worker"));
    }
    let elapsed = started.elapsed();
    let cpu = common::process_cpu().saturating_sub(cpu_before);
    Run {
        puts_per_second: total as f64 / elapsed.as_secs_f64(),
        latencies: Latencies(latencies),
        cpu_per_put: cpu / total as u32,
    }
}

/// p50 and p99 of one 4 KiB write followed by fdatasync, in `directory`: the disk's floor for
/// one durable write.
fn fdatasync_floor(directory: &std::path::Path, count: usize) -> Latencies {
    let mut file = std::fs::File::create(directory.join("floor")).expect("floor file");
    let block = vec![7_u8; 4096];
    let mut latencies = Vec::with_capacity(count);
    for _ in 0..count {
        let began = Instant::now();
        file.write_all(&block).expect("write");
        file.sync_data().expect("fdatasync");
        latencies.push(began.elapsed());
    }
    Latencies(latencies)
}

fn report(setup: &str, concurrency: usize, run: &mut Run, floor: Duration) {
    let p50 = run.latencies.percentile(0.50);
    println!(
        "| {setup} | {concurrency} | {:.0} | {:.2} | {:.2} | {:.3} | {:.1} |",
        run.puts_per_second,
        p50.as_secs_f64() * 1e3,
        run.latencies.percentile(0.99).as_secs_f64() * 1e3,
        run.cpu_per_put.as_secs_f64() * 1e3,
        p50.as_secs_f64() / floor.as_secs_f64(),
    );
}

async fn measure(setup: &str, client: Client, documents: &Arc<Vec<String>>, total: usize, floor: Duration) {
    let client = Arc::new(client);
    // Warm-up: connection, allocator, page cache.
    puts(Arc::clone(&client), Arc::clone(documents), 8, 200).await;
    let before = common::resident_mb();
    let mut after = (0.0, 0.0);
    for concurrency in [1, 64] {
        let count = if concurrency == 1 { total / 10 } else { total };
        let mut run = puts(Arc::clone(&client), Arc::clone(documents), concurrency, count).await;
        report(setup, concurrency, &mut run, floor);
        after = common::resident_mb();
    }
    // The bench's nodes do not commit by themselves (`commit_interval` 0), so until a commit the
    // documents just put sit in tantivy's in-memory segment. Commit as a node's automatic commit
    // (1 s by default) would, then idle for a while: freed memory can go back to the kernel.
    client.commit().await.expect("commit");
    tokio::time::sleep(Duration::from_secs(12)).await;
    let later = common::resident_mb();
    MEMORY.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(format!(
        "{setup}: this process's RSS (of it anonymous) {:.0} ({:.0}) MB before the puts, {:.0} ({:.0}) MB right \
         after, {:.0} ({:.0}) MB 12 s later",
        before.0, before.1, after.0, after.1, later.0, later.1
    ));
}

/// Memory lines, printed after the table.
static MEMORY: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn client(certificates: &Certificates, server: String) -> Client {
    let options =
        ClientOptions::new(vec![server], certificates.files(&Role::Client { name: "bench".into() }, "client"));
    Client::connect(options).expect("client")
}

fn main() {
    let total: usize = std::env::var("BAYARD_BENCH_PUTS").ok().and_then(|value| value.parse().ok()).unwrap_or(20_000);
    let articles = corpus::articles(20_000);
    let documents: Arc<Vec<String>> = Arc::new(
        articles
            .iter()
            .map(|article| serde_json::json!({"title": article.title, "body": article.body}).to_string())
            .collect(),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let certificates = Certificates::new();
        let scratch = tempfile::tempdir().expect("temp dir");
        let mut floor = fdatasync_floor(scratch.path(), 2000);
        let floor_p50 = floor.percentile(0.50);
        println!(
            "single-document puts of GCIDE articles ({} bytes on average); the disk's floor here, 4 KiB write + fdatasync: p50 {:.3} ms, p99 {:.3} ms",
            documents.iter().map(String::len).sum::<usize>() / documents.len(),
            floor_p50.as_secs_f64() * 1e3,
            floor.percentile(0.99).as_secs_f64() * 1e3
        );
        println!("| setup | c | puts/s | p50 ms | p99 ms | CPU/put ms | p50 / fdatasync p50 |");
        println!("|---|---|---|---|---|---|---|");

        let data = tempfile::tempdir().expect("temp dir");
        let node = common::start_member(&certificates, 1, data.path(), None, None).await;
        common::wait_for_voters(&node, 1).await;
        measure("one node", client(&certificates, node.local_address().to_string()), &documents, total, floor_p50)
            .await;
        node.shutdown().await;

        let directories: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("temp dir")).collect();
        let [first, second, third] = common::three_nodes(&certificates, &directories, None).await;
        let seed = first.local_address().to_string();
        measure("three nodes, via the leader", client(&certificates, seed), &documents, total, floor_p50).await;
        for node in [third, second, first] {
            node.shutdown().await;
        }
        for line in MEMORY.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).iter() {
            println!("{line}");
        }
    });
}
