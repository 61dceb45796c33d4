//! A standalone node over real QUIC + mutual TLS: writes, upserts, search options, restart.

mod common;

use std::time::Duration;

use bayard::index::{FacetRequest, SearchRequest, SortSpec};
use bayard::protocol::{Consistency, DocumentInput};
use common::{eventually, node_config, start_node, TestNode};

fn search_all() -> SearchRequest {
    SearchRequest { query: "*".into(), limit: 100, ..Default::default() }
}

fn bulk(documents: &[serde_json::Value]) -> Vec<DocumentInput> {
    documents.iter().map(|document| DocumentInput { id: None, document_json: document.to_string() }).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_commit_search_get_delete() {
    let test = TestNode::start().await;
    let client = test.client();

    client
        .put("1", r#"{"title":"Hello world","body":"the quick brown fox","year":2020,"category":"/lang/rust"}"#)
        .await
        .unwrap();
    // Not committed yet: searches see committed data only.
    let before = client.search(search_all(), Consistency::Local).await.unwrap();
    assert_eq!(before.count, Some(0));
    assert!(client.get("1").await.unwrap().is_none());

    client.commit().await.unwrap();
    let hits = client
        .search(SearchRequest { query: "title:hello".into(), limit: 10, ..Default::default() }, Consistency::Local)
        .await
        .unwrap();
    assert_eq!(hits.count, Some(1));
    assert_eq!(hits.docs[0].id, "1");
    assert_eq!(hits.docs[0].fields["title"], "Hello world");
    assert!(hits.docs[0].score.unwrap() > 0.0);
    assert_eq!(hits.node_id, 1);
    assert!(hits.applied_index >= 2);

    let document = client.get("1").await.unwrap().expect("document 1");
    assert_eq!(document.fields["year"], 2020);

    client.delete("1").await.unwrap();
    client.commit().await.unwrap();
    assert!(client.get("1").await.unwrap().is_none());
    assert_eq!(client.search(search_all(), Consistency::Local).await.unwrap().count, Some(0));
    test.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_is_an_upsert_by_id() {
    let test = TestNode::start().await;
    let client = test.client();
    client.put("7", r#"{"title":"first version","year":1999}"#).await.unwrap();
    client.commit().await.unwrap();
    client.put("7", r#"{"title":"second version","year":2001}"#).await.unwrap();
    // Same id twice in one batch: the last one wins.
    client
        .put_documents(bulk(&[
            serde_json::json!({"_id": "8", "title": "eight a"}),
            serde_json::json!({"_id": "8", "title": "eight b"}),
        ]))
        .await
        .unwrap();
    client.commit().await.unwrap();

    let all = client.search(search_all(), Consistency::Local).await.unwrap();
    assert_eq!(all.count, Some(2));
    let seven = client.get("7").await.unwrap().unwrap();
    assert_eq!(seven.fields["title"], "second version");
    assert_eq!(seven.fields["year"], 2001);
    assert_eq!(client.get("8").await.unwrap().unwrap().fields["title"], "eight b");
    let old = client
        .search(SearchRequest { query: "title:first".into(), limit: 10, ..Default::default() }, Consistency::Local)
        .await
        .unwrap();
    assert_eq!(old.count, Some(0));
    test.node.shutdown().await;
}

/// A bulk load writes its chunks several at a time; an id repeated within a chunk and across
/// chunks still ends with its last line, as if the lines were written one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_put_keeps_the_last_line_of_a_repeated_id() {
    let test = TestNode::start().await;
    let client = test.client();
    let chunk = bayard::client::BULK_CHUNK_DOCUMENTS;
    // Six chunks; "hot" is written in the first three (twice in the first), "warm" in every
    // chunk, the others once.
    let total = chunk * 6;
    let hot_positions = [3, chunk - 1, chunk + 5, 2 * chunk + 7];
    let documents: Vec<serde_json::Value> = (0..total)
        .map(|position| {
            let id = if hot_positions.contains(&position) {
                "hot".to_string()
            } else if position % chunk == 11 {
                "warm".to_string()
            } else {
                format!("doc-{position}")
            };
            serde_json::json!({"_id": id, "title": format!("line {position}"), "year": position as i64})
        })
        .collect();
    let receipt = client.bulk_put(bulk(&documents), |_| {}).await.unwrap();
    assert_eq!(receipt.operations, total as u64);
    client.commit().await.unwrap();

    let hot = client.get("hot").await.unwrap().expect("hot");
    assert_eq!(hot.fields["year"], (2 * chunk + 7) as i64);
    let warm = client.get("warm").await.unwrap().expect("warm");
    assert_eq!(warm.fields["year"], (5 * chunk + 11) as i64);
    // Every position is its own document except the four of "hot" and the six of "warm".
    let distinct = total - hot_positions.len() - 6 + 2;
    let all = SearchRequest { query: "*".into(), limit: 0, ..Default::default() };
    assert_eq!(client.search(all, Consistency::Local).await.unwrap().count, Some(distinct as u64));
    test.node.shutdown().await;
}

async fn load_catalogue(client: &bayard::client::Client) {
    let mut documents = Vec::new();
    for number in 0..60_u64 {
        let category = match number % 3 {
            0 => "/lang/rust",
            1 => "/lang/go",
            _ => "/tool/editor",
        };
        documents.push(serde_json::json!({
            "_id": format!("doc-{number:03}"),
            "title": format!("search engine number {number}"),
            "year": 1960 + number as i64,
            "rating": (number % 7) as f64 / 2.0,
            "category": category,
        }));
    }
    let receipt = client.bulk_put(bulk(&documents), |_| {}).await.unwrap();
    assert_eq!(receipt.operations, 60);
    client.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn facets_sort_and_pagination() {
    let test = TestNode::start().await;
    let client = test.client();
    load_catalogue(&client).await;

    let facets = client
        .search(
            SearchRequest {
                query: "*".into(),
                limit: 0,
                exclude_docs: true,
                facets: vec![FacetRequest { field: "category".into(), prefixes: vec!["/lang".into()] }],
                ..Default::default()
            },
            Consistency::Local,
        )
        .await
        .unwrap();
    assert!(facets.docs.is_empty());
    assert_eq!(facets.count, Some(60));
    let lang = &facets.facet["category"];
    assert_eq!(lang.get("/lang/rust"), Some(&20));
    assert_eq!(lang.get("/lang/go"), Some(&20));
    assert!(!lang.contains_key("/tool/editor"));

    let newest = client
        .search(
            SearchRequest {
                query: "title:search".into(),
                limit: 3,
                sort: Some(SortSpec { field: "year".into(), descending: true }),
                ..Default::default()
            },
            Consistency::Local,
        )
        .await
        .unwrap();
    let years: Vec<i64> = newest.docs.iter().map(|hit| hit.fields["year"].as_i64().unwrap()).collect();
    assert_eq!(years, vec![2019, 2018, 2017]);

    let by_rating = client
        .search(
            SearchRequest {
                query: "*".into(),
                limit: 60,
                sort: Some(SortSpec { field: "rating".into(), descending: false }),
                ..Default::default()
            },
            Consistency::Local,
        )
        .await
        .unwrap();
    let ratings: Vec<f64> = by_rating.docs.iter().map(|hit| hit.fields["rating"].as_f64().unwrap()).collect();
    assert!(ratings.windows(2).all(|pair| pair[0] <= pair[1]), "{ratings:?}");

    // Pages of 7 over all 60, sorted by year: no duplicates, nothing missing, in order.
    let mut seen = Vec::new();
    for page in 0..9 {
        let result = client
            .search(
                SearchRequest {
                    query: "*".into(),
                    from: page * 7,
                    limit: 7,
                    exclude_count: true,
                    sort: Some(SortSpec { field: "year".into(), descending: false }),
                    ..Default::default()
                },
                Consistency::Local,
            )
            .await
            .unwrap();
        assert_eq!(result.count, None);
        seen.extend(result.docs.into_iter().map(|hit| hit.id));
    }
    let expected: Vec<String> = (0..60).map(|number| format!("doc-{number:03}")).collect();
    assert_eq!(seen, expected);
    test.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_discards_uncommitted_writes() {
    let test = TestNode::start().await;
    let client = test.client();
    client.put("keep", r#"{"title":"kept"}"#).await.unwrap();
    client.commit().await.unwrap();
    client.put("drop", r#"{"title":"dropped"}"#).await.unwrap();
    client.delete("keep").await.unwrap();
    client.rollback().await.unwrap();
    client.commit().await.unwrap();
    assert!(client.get("keep").await.unwrap().is_some());
    assert!(client.get("drop").await.unwrap().is_none());
    test.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_leaves_one_segment_and_all_documents() {
    let test = TestNode::start().await;
    let client = test.client();
    for round in 0..3 {
        client.put(&format!("m{round}"), r#"{"title":"merge me"}"#).await.unwrap();
        client.commit().await.unwrap();
    }
    assert!(test.admin().status().await.unwrap().segment_count >= 2);
    // The merge runs in the background (applying it does not wait for it): the segments become
    // one soon after, every document kept.
    client.merge().await.unwrap();
    let admin = test.admin();
    let merged = eventually(std::time::Duration::from_secs(30), || async {
        admin.status().await.is_ok_and(|status| status.segment_count == 1)
    })
    .await;
    assert!(merged, "the segments were not merged");
    assert_eq!(admin.status().await.unwrap().document_count, 3);
    test.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_commit_makes_writes_searchable() {
    let certificates = common::CertificateSet::new();
    let data = tempfile::tempdir().unwrap();
    let mut config = node_config(&certificates, 1, data.path());
    config.commit_interval = Duration::from_millis(200);
    let node = start_node(config).await;
    let client = common::client_with(&node.local_address().to_string(), certificates.client("app"));
    client.put("auto", r#"{"title":"committed by the timer"}"#).await.unwrap();
    let visible = eventually(Duration::from_secs(10), || async { client.get("auto").await.unwrap().is_some() }).await;
    assert!(visible, "the timer never committed the write");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_committed_documents_and_position() {
    let certificates = common::CertificateSet::new();
    let data = tempfile::tempdir().unwrap();
    let node = start_node(node_config(&certificates, 1, data.path())).await;
    let client = common::client_with(&node.local_address().to_string(), certificates.client("app"));
    load_catalogue(&client).await;
    let applied_before = client.status().await.unwrap().applied_index;
    let cluster_before = client.status().await.unwrap().cluster_id;
    node.shutdown().await;

    let node = start_node(node_config(&certificates, 1, data.path())).await;
    let client = common::client_with(&node.local_address().to_string(), certificates.client("app"));
    let status = client.status().await.unwrap();
    assert_eq!(status.document_count, 60);
    // Resumes from its log: nothing applied is forgotten (a new term adds a blank entry).
    assert!(status.applied_index >= applied_before, "{} < {applied_before}", status.applied_index);
    assert_eq!(status.cluster_id, cluster_before);
    assert_eq!(client.get("doc-042").await.unwrap().unwrap().fields["year"], 2002);
    node.shutdown().await;

    // The data directory belongs to node 1; node 2 may not take it over.
    let error = bayard::node::Node::start(node_config(&certificates, 2, data.path())).await.err().unwrap();
    assert!(error.to_string().contains("belongs to node 1"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_peers_and_schema() {
    let test = TestNode::start().await;
    let client = test.client();
    // A new node returns from `start` once it leads its one-node cluster.
    let status = client.status().await.unwrap();
    assert_eq!(status.node_id, 1);
    assert_eq!(status.address, test.address());
    assert_eq!(status.role, "leader");
    let peers = client.peers().await.unwrap();
    assert_eq!(peers.get(&1), Some(&test.address()));
    let schema = client.schema().await.unwrap();
    let names: Vec<&str> = schema.as_array().unwrap().iter().map(|field| field["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"_id") && names.contains(&"title"), "{names:?}");
    test.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_moves_on_when_a_server_does_not_answer() {
    let test = TestNode::start().await;
    // A UDP port on loopback that nobody serves: bind and drop to get one.
    let unused = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut options =
        bayard::client::ClientOptions::new(vec![unused.to_string(), test.address()], test.certificates.client("app"));
    options.connect_timeout = Duration::from_millis(500);
    let client = bayard::client::Client::connect(options).unwrap();
    let status = client.status().await.unwrap();
    assert_eq!(status.node_id, 1);
    test.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_to_a_new_ca_without_restart() {
    let old = common::CertificateSet::new();
    let data = tempfile::tempdir().unwrap();
    let node = start_node(node_config(&old, 1, data.path())).await;
    let address = node.local_address().to_string();
    let old_client = common::client_with(&address, old.client("app"));
    old_client.put("before", r#"{"title":"written before rotation"}"#).await.unwrap();
    old_client.commit().await.unwrap();

    // Rotation: the node's files now hold a certificate from a new CA, and its CA file trusts
    // both CAs while clients move over.
    let new = common::CertificateSet::new();
    let node_files = old.node(1);
    std::fs::copy(new.node(1).certificate, &node_files.certificate).unwrap();
    std::fs::copy(new.node(1).private_key, &node_files.private_key).unwrap();
    let bundle = std::fs::read_to_string(old.ca_path()).unwrap() + &std::fs::read_to_string(new.ca_path()).unwrap();
    std::fs::write(&node_files.ca_certificate, bundle).unwrap();

    // Before the reload a client of the new CA is refused (the node still presents the old one).
    let mut options = bayard::client::ClientOptions::new(vec![address.clone()], new.client("app"));
    options.retry_rounds = 1;
    let early = bayard::client::Client::connect(options.clone()).unwrap();
    assert!(early.status().await.is_err());

    node.reload_certificates().unwrap();
    let new_client = bayard::client::Client::connect(options).unwrap();
    assert!(new_client.get("before").await.unwrap().is_some());
    // A broken file is refused and the node keeps serving with what it has.
    std::fs::write(&node_files.private_key, "not a key").unwrap();
    assert!(node.reload_certificates().is_err());
    assert!(new_client.get("before").await.unwrap().is_some());
    node.shutdown().await;
}
