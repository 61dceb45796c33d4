//! Search latency and throughput, in one run, over the same data: tantivy in-process (the
//! baseline), then one node through its QUIC client, its REST gateway (`POST /v1/search`) and its
//! Elasticsearch `_search` (the JSON query language), at concurrency 1, 8 and 32; and a QUIC
//! request with nothing to search for, the floor of the transport and the request path.
//!
//! `just bench` (or `cargo bench --bench search`). The corpus is real English text, the articles
//! of the GCIDE dictionary (`benches/common/corpus.rs`, fetched with `apt-get download
//! dict-gcide`); the queries are runs of 2–5 words from its articles. Every search asks for the
//! top 10, the count of matches, and the stored documents. `BAYARD_BENCH_DOCUMENTS` (default
//! 50000) and `BAYARD_BENCH_QUERIES` (default 1000) size it; `BAYARD_BENCH_CONCURRENCY` (say
//! `8`) and `BAYARD_BENCH_PATHS` (words of the rows' names, say `quic,in-process`) run only some
//! rows, for a profile of one. Everything (node and load generator) shares this machine's
//! cores: CPU per query is the whole process's.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bayard::client::{Client, ClientOptions};
use bayard::index::SearchRequest;
use bayard::protocol::{Consistency, DocumentInput};
use bayard::transport::Role;
use common::{corpus, process_cpu, tantivy_serve, Certificates, KeptConnection, Latencies};
use tantivy::collector::{Count, TopDocs};
use tantivy::query::QueryParser;
use tantivy::schema::document::Document as _;
use tantivy::schema::Value;

struct Figure {
    name: String,
    concurrency: usize,
    queries_per_second: f64,
    p50: Duration,
    p99: Duration,
    cpu_per_query: Duration,
}

fn environment_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

/// Runs `total` searches over `concurrency` workers, each worker with its own state.
async fn measure<State, Make, MakeFuture, Search, SearchFuture>(
    name: &str,
    concurrency: usize,
    total: usize,
    make: Make,
    search: Search,
) -> Figure
where
    State: Send + 'static,
    Make: Fn(usize) -> MakeFuture,
    MakeFuture: std::future::Future<Output = State>,
    Search: Fn(State, usize) -> SearchFuture + Send + Sync + Clone + 'static,
    SearchFuture: std::future::Future<Output = State> + Send,
{
    let mut states = Vec::new();
    for worker in 0..concurrency {
        states.push(make(worker).await);
    }
    let cpu_before = process_cpu();
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for (worker, mut state) in states.into_iter().enumerate() {
        let search = search.clone();
        workers.spawn(async move {
            let mut latencies = Vec::new();
            let mut number = worker;
            while number < total {
                let began = Instant::now();
                state = search(state, number).await;
                latencies.push(began.elapsed());
                number += concurrency;
            }
            latencies
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = workers.join_next().await {
        latencies.extend(done.expect("worker"));
    }
    let elapsed = started.elapsed();
    let cpu = process_cpu().saturating_sub(cpu_before);
    let mut latencies = Latencies(latencies);
    Figure {
        name: name.to_string(),
        concurrency,
        queries_per_second: total as f64 / elapsed.as_secs_f64(),
        p50: latencies.percentile(0.50),
        p99: latencies.percentile(0.99),
        cpu_per_query: cpu / total as u32,
    }
}

/// tantivy alone, in this process: the same schema and analyzers, the same default fields, the
/// same work per search (top 10, count, stored documents as JSON).
struct RawTantivy {
    reader: tantivy::IndexReader,
    parser: QueryParser,
    schema: tantivy::schema::Schema,
}

impl RawTantivy {
    fn build(directory: &std::path::Path, articles: &[corpus::Article]) -> Self {
        let (index, schema) = common::raw_tantivy_index(directory);
        common::index_articles(&index, &schema, articles);
        let fields = schema
            .fields()
            .filter(|(_, entry)| entry.is_indexed() && entry.name() != "_id")
            .filter(|(_, entry)| matches!(entry.field_type(), tantivy::schema::FieldType::Str(_)))
            .map(|(field, _)| field)
            .collect();
        let parser = QueryParser::for_index(&index, fields);
        let reader = index.reader().expect("reader");
        RawTantivy { reader, parser, schema }
    }

    fn search(&self, text: &str) -> usize {
        let query = self.parser.parse_query(text).expect("query");
        let searcher = self.reader.searcher();
        let (top, count) = searcher.search(&query, &(TopDocs::with_limit(10).order_by_score(), Count)).expect("search");
        let mut bytes = 0;
        for (_, address) in top {
            let document: tantivy::TantivyDocument = searcher.doc(address).expect("doc");
            bytes += document.to_json(&self.schema).len();
            bytes += document
                .get_first(self.schema.get_field("title").expect("title"))
                .and_then(|v| v.as_str())
                .map_or(0, str::len);
        }
        bytes + count
    }
}

const IN_PROCESS: &str = "tantivy in-process";
const TANTIVY_SERVE: &str = "tantivy serve (HTTP, Connection: close)";
const QUIC_CLIENT: &str = "QUIC client";
const QUIC_FLOOR: &str = "QUIC empty request (floor)";

fn print_table(figures: &[Figure]) {
    println!(
        "| path | c | QPS | p50 ms | p99 ms | CPU/query ms | QPS / in-process | QPS / tantivy serve | QPS / QUIC |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for figure in figures {
        let same = |name: &str| {
            figures
                .iter()
                .find(|other| other.name == name && other.concurrency == figure.concurrency)
                .map(|other| other.queries_per_second)
        };
        let ratio =
            |base: Option<f64>| base.map_or("-".to_string(), |base| format!("{:.2}", figure.queries_per_second / base));
        println!(
            "| {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {} | {} | {} |",
            figure.name,
            figure.concurrency,
            figure.queries_per_second,
            figure.p50.as_secs_f64() * 1000.0,
            figure.p99.as_secs_f64() * 1000.0,
            figure.cpu_per_query.as_secs_f64() * 1000.0,
            ratio(same(IN_PROCESS)),
            ratio(same(TANTIVY_SERVE)),
            ratio(same(QUIC_CLIENT)),
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let document_count = environment_number("BAYARD_BENCH_DOCUMENTS", 50_000);
    let query_count = environment_number("BAYARD_BENCH_QUERIES", 1_000);
    let articles = corpus::articles(document_count);
    let queries = Arc::new(corpus::queries(&articles, query_count));
    println!("corpus: {} GCIDE articles, {} queries (2–5 words from the articles)", articles.len(), queries.len());

    let raw_directory = tempfile::tempdir().expect("temp dir");
    let raw = Arc::new(RawTantivy::build(raw_directory.path(), &articles));

    let tantivy_serve = match tantivy_serve::binary() {
        Some(binary) => Some(Arc::new(tantivy_serve::TantivyServe::start(&binary, &articles))),
        None => {
            println!(
                "SKIPPED: the `tantivy serve` baseline; no tantivy-cli binary in target/bench-tools \
                 (`just bench-tools` installs it) or at BAYARD_BENCH_TANTIVY_CLI"
            );
            None
        }
    };

    let megabytes = |directory: &std::path::Path| common::doc_store_bytes(directory) as f64 / 1e6;
    let default_blocks = tantivy_serve.as_ref().map_or(String::new(), |server| {
        format!(
            ", {:.1} MB in tantivy's default 16384 B blocks (the tantivy serve index)",
            megabytes(server.directory.path())
        )
    });
    println!(
        "doc store: {:.1} MB in {} B blocks (the node's settings, the in-process index){default_blocks}",
        megabytes(raw_directory.path()),
        bayard::index::DOCSTORE_BLOCK_BYTES,
    );

    let certificates = Certificates::new();
    let data = tempfile::tempdir().expect("temp dir");
    let node = common::start_node(&certificates, data.path()).await;
    let client_files = certificates.files(&Role::Client { name: "bench".into() }, "client-bench");
    let client = Client::connect(ClientOptions::new(vec![node.local_address().to_string()], client_files.clone()))
        .expect("client");
    let loaded = Instant::now();
    let documents = articles
        .iter()
        .enumerate()
        .map(|(number, article)| DocumentInput { id: None, document_json: corpus::document_json(number, article) })
        .collect();
    client.bulk_put(documents, |_| {}).await.expect("load");
    client.commit().await.expect("commit");
    println!("loaded the node in {:.1} s", loaded.elapsed().as_secs_f64());
    let http_address = node.http_address().expect("https");

    // For profiling one row: `BAYARD_BENCH_CONCURRENCY=8 BAYARD_BENCH_PATHS=quic` runs only the
    // rows at that concurrency whose name contains one of the (comma-separated, any case) words.
    let concurrencies: Vec<usize> = match std::env::var("BAYARD_BENCH_CONCURRENCY") {
        Ok(list) => list
            .split(',')
            .map(|item| match item.trim().parse() {
                Ok(concurrency) if concurrency > 0 => concurrency,
                _ => panic!("BAYARD_BENCH_CONCURRENCY is a comma-separated list of numbers above 0, not {list:?}"),
            })
            .collect(),
        Err(_) => vec![1, 8, 32],
    };
    let path_words: Vec<String> = std::env::var("BAYARD_BENCH_PATHS")
        .map(|list| list.split(',').map(|word| word.trim().to_lowercase()).filter(|word| !word.is_empty()).collect())
        .unwrap_or_default();
    let wanted = |name: &str| path_words.is_empty() || path_words.iter().any(|word| name.to_lowercase().contains(word));
    // Each QUIC worker has its own client, and so its own connection.
    let node_address = node.local_address().to_string();
    let connect_quic = |_worker: usize| {
        let options = ClientOptions::new(vec![node_address.clone()], client_files.clone());
        async move { Arc::new(Client::connect(options).expect("client")) }
    };
    let mut figures = Vec::new();
    for concurrency in concurrencies {
        let total = queries.len().max(concurrency * 100);
        if wanted(IN_PROCESS) {
            let in_process = {
                let (raw, queries) = (raw.clone(), queries.clone());
                measure(
                    IN_PROCESS,
                    concurrency,
                    total,
                    |_| async {},
                    move |(), number| {
                        let (raw, queries) = (raw.clone(), queries.clone());
                        async move {
                            tokio::task::spawn_blocking(move || raw.search(&queries[number % queries.len()]))
                                .await
                                .expect("search");
                        }
                    },
                )
                .await
            };
            figures.push(in_process);
        }

        if let Some(server) = tantivy_serve.as_ref().filter(|_| wanted(TANTIVY_SERVE)) {
            let server_cpu_before = server.cpu();
            let (server, queries) = (server.clone(), queries.clone());
            let mut figure = measure(
                TANTIVY_SERVE,
                concurrency,
                total,
                |_| async {},
                move |(), number| {
                    let (server, queries) = (server.clone(), queries.clone());
                    async move {
                        tokio::task::spawn_blocking(move || {
                            let query = server.query_for(&queries[number % queries.len()]);
                            server.search_blocking(&query).expect("tantivy serve search")
                        })
                        .await
                        .expect("search");
                    }
                },
            )
            .await;
            if let Some(server) = &tantivy_serve {
                // Its process's CPU, beside this one's (the load generator).
                figure.cpu_per_query += server.cpu().saturating_sub(server_cpu_before) / total as u32;
            }
            figures.push(figure);
        }

        if wanted(QUIC_CLIENT) {
            let quic = {
                let queries = queries.clone();
                measure(QUIC_CLIENT, concurrency, total, &connect_quic, move |client, number| {
                    let queries = queries.clone();
                    async move {
                        let request = SearchRequest {
                            query: queries[number % queries.len()].clone(),
                            limit: 10,
                            ..Default::default()
                        };
                        client.search(request, Consistency::Local).await.expect("search");
                        client
                    }
                })
                .await
            };
            figures.push(quic);
        }

        if wanted(QUIC_FLOOR) {
            // The same round trip with nothing to search for (no count, no documents): what the
            // transport and the node's request path cost on their own.
            let figure = measure(QUIC_FLOOR, concurrency, total, &connect_quic, move |client, _| async move {
                let request = SearchRequest {
                    query: "*".to_string(),
                    limit: 0,
                    exclude_count: true,
                    exclude_docs: true,
                    ..Default::default()
                };
                client.search(request, Consistency::Local).await.expect("search");
                client
            })
            .await;
            figures.push(figure);
        }

        for (name, path) in
            [("HTTPS /v1/search", "/v1/search?limit=10"), ("HTTPS _search (JSON DSL)", "/bayard/_search")]
        {
            if !wanted(name) {
                continue;
            }
            let queries = queries.clone();
            let files = client_files.clone();
            let figure = measure(
                name,
                concurrency,
                total,
                |_| KeptConnection::open(http_address, &files),
                move |mut connection, number| {
                    let queries = queries.clone();
                    async move {
                        let text = &queries[number % queries.len()];
                        let body = if path.starts_with("/v1") {
                            text.clone()
                        } else {
                            serde_json::json!({"query": {"query_string": {"query": text}}, "size": 10}).to_string()
                        };
                        connection.post(path, body).await;
                        connection
                    }
                },
            )
            .await;
            figures.push(figure);
        }
    }
    print_table(&figures);
    node.shutdown().await;
}
