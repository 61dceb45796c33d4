//! Bulk ingest: the CLI loading an NDJSON file (`bayard put --bulk --file`, then `bayard commit`)
//! into one node and into three nodes, against tantivy in-process indexing the same documents
//! with the same schema, analyzers, threads and memory, in the same run.
//!
//! `just bench` (or `cargo bench --bench bulk_put`). The nodes run in this process and talk real
//! QUIC + mutual TLS on 127.0.0.1; the CLI is the real binary, a child process. Documents are
//! GCIDE dictionary articles (`benches/common/corpus.rs`): `BAYARD_BENCH_DOCUMENTS` of them
//! (default 90000). Prints documents per second, the ratio to tantivy, the CLI's peak memory,
//! and the sizes of the Raft log and the index.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::{corpus, Certificates};

use bayard::transport::{Role, TlsFiles};

const WRITER_MEMORY_BYTES: usize = 128 * 1024 * 1024;

/// tantivy alone: parse every line, add it, commit; documents per second and CPU µs per document.
fn raw_tantivy(file: &Path, directory: &Path) -> (f64, f64) {
    let (index, schema) = common::raw_tantivy_index(directory);
    let started = Instant::now();
    let cpu_before = common::process_cpu();
    let text = std::fs::read_to_string(file).expect("read the file");
    let mut writer: tantivy::IndexWriter = index.writer_with_num_threads(2, WRITER_MEMORY_BYTES).expect("writer");
    let mut count = 0;
    for line in text.lines() {
        writer.add_document(tantivy::TantivyDocument::parse_json(&schema, line).expect("document")).expect("add");
        count += 1;
    }
    writer.commit().expect("commit");
    let cpu = common::process_cpu().saturating_sub(cpu_before);
    (count as f64 / started.elapsed().as_secs_f64(), cpu.as_secs_f64() * 1e6 / count as f64)
}

struct Load {
    documents_per_second: f64,
    cli_peak_rss_mb: f64,
    /// CPU µs per document of this process (the nodes) and of the CLI.
    node_cpu_us: f64,
    cli_cpu_us: f64,
}

/// Runs the CLI and returns its peak resident memory in MB: the last `VmHWM` read from
/// `/proc/<pid>/status` before it exits. (The first reads, before exec, are this large process's
/// own; `getrusage` of children counts those too.)
fn cli(files: &TlsFiles, server: &str, arguments: &[&str]) -> f64 {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bayard"))
        .args(arguments)
        .env("BAYARD_SERVERS", server)
        .env("BAYARD_CA", &files.ca_certificate)
        .env("BAYARD_CERT", &files.certificate)
        .env("BAYARD_KEY", &files.private_key)
        .env("BAYARD_TIMEOUT", "120s")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the CLI");
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0_u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_path) {
            let high_water = text
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
            peak_kb = high_water.unwrap_or(peak_kb);
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the CLI ran for over 10 minutes");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    assert!(status.success(), "bayard {arguments:?}: {stderr}");
    peak_kb as f64 / 1024.0
}

/// `put --bulk --file` then `commit`, both through the CLI, timed together.
async fn load(certificates: &Certificates, server: String, file: &Path, count: usize) -> Load {
    let files = certificates.files(&Role::Client { name: "bench".into() }, "client");
    let file = file.to_path_buf();
    let started = Instant::now();
    let (node_cpu_before, cli_cpu_before) = (common::process_cpu(), common::children_cpu());
    let (elapsed, cli_peak_rss_mb, files, server) = tokio::task::spawn_blocking(move || {
        let peak = cli(&files, &server, &["put", "--bulk", "--file", &file.to_string_lossy()]);
        cli(&files, &server, &["commit"]);
        (started.elapsed(), peak, files, server)
    })
    .await
    .expect("cli");
    let per_document = |cpu: Duration| cpu.as_secs_f64() * 1e6 / count as f64;
    let node_cpu_us = per_document(common::process_cpu().saturating_sub(node_cpu_before));
    let cli_cpu_us = per_document(common::children_cpu().saturating_sub(cli_cpu_before));
    let options = bayard::client::ClientOptions::new(vec![server], files);
    let client = bayard::client::Client::connect(options).expect("client");
    let status = client.status().await.expect("status");
    assert_eq!(status.document_count, count as u64, "every document is indexed");
    Load { documents_per_second: count as f64 / elapsed.as_secs_f64(), cli_peak_rss_mb, node_cpu_us, cli_cpu_us }
}

fn directory_mb(path: &Path) -> f64 {
    fn walk(path: &Path) -> u64 {
        match std::fs::read_dir(path) {
            Ok(entries) => entries.filter_map(Result::ok).map(|entry| walk(&entry.path())).sum(),
            Err(_) => std::fs::metadata(path).map(|metadata| metadata.len()).unwrap_or(0),
        }
    }
    walk(path) as f64 / 1e6
}

fn main() {
    let count = std::env::var("BAYARD_BENCH_DOCUMENTS").ok().and_then(|value| value.parse().ok()).unwrap_or(90_000);
    let articles = corpus::articles(count);
    let count = articles.len();
    let scratch = tempfile::tempdir().expect("temp dir");
    let file = scratch.path().join("corpus.ndjson");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&file).expect("ndjson"));
        for (number, article) in articles.iter().enumerate() {
            writeln!(out, "{}", corpus::document_json(number, article)).expect("write");
        }
    }
    drop(articles);
    let file_mb = std::fs::metadata(&file).expect("ndjson").len() as f64 / 1e6;

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let certificates = Certificates::new();
        // Warm-up of the page cache and the allocator, not reported.
        raw_tantivy(&file, tempfile::tempdir().expect("temp dir").path());
        let (raw, raw_cpu_us) = raw_tantivy(&file, tempfile::tempdir().expect("temp dir").path());

        let data = tempfile::tempdir().expect("temp dir");
        let node = common::start_member(&certificates, 1, data.path(), None, Some(WRITER_MEMORY_BYTES)).await;
        common::wait_for_voters(&node, 1).await;
        let reads_before = common::log_reads();
        let single = load(&certificates, node.local_address().to_string(), &file, count).await;
        let single_reads = common::log_reads();
        node.shutdown().await;
        let single_log_mb = directory_mb(&data.path().join("raft"));
        let single_index_mb = directory_mb(&data.path().join("index"));

        let directories: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("temp dir")).collect();
        let [first, second, third] = common::three_nodes(&certificates, &directories, Some(WRITER_MEMORY_BYTES)).await;
        let seed = first.local_address().to_string();
        // Through the leader, as a client that found it would.
        let cluster_reads_before = common::log_reads();
        let cluster = load(&certificates, seed, &file, count).await;
        let cluster_reads = common::log_reads();
        for node in [third, second, first] {
            node.shutdown().await;
        }

        println!(
            "bulk ingest of {count} GCIDE articles ({file_mb:.1} MB of NDJSON), then one commit; tantivy with 2 \
             threads and {} MB",
            WRITER_MEMORY_BYTES >> 20
        );
        println!("| setup | documents/s | ratio to tantivy | CPU µs/document: nodes + CLI | CLI peak RSS MB |");
        println!("|---|---|---|---|---|");
        println!("| tantivy in-process | {raw:.0} | 1.00 | {raw_cpu_us:.0} | - |");
        for (name, load) in [
            ("one node, `bayard put --bulk --file` + `commit`", &single),
            ("three nodes on this host, via the leader", &cluster),
        ] {
            println!(
                "| {name} | {:.0} | {:.2} | {:.0} + {:.0} | {:.0} |",
                load.documents_per_second,
                load.documents_per_second / raw,
                load.node_cpu_us,
                load.cli_cpu_us,
                load.cli_peak_rss_mb
            );
        }
        println!(
            "one node's data directory after the load: raft log {single_log_mb:.1} MB, index {single_index_mb:.1} MB"
        );
        println!(
            "Raft log reads answered from memory (of all): one node {:.0} of {:.0}, three nodes {:.0} of {:.0}",
            single_reads.0 - reads_before.0,
            single_reads.0 + single_reads.1 - reads_before.0 - reads_before.1,
            cluster_reads.0 - cluster_reads_before.0,
            cluster_reads.0 + cluster_reads.1 - cluster_reads_before.0 - cluster_reads_before.1
        );
    });
}
