//! The HTTPS door against real nodes: TLS on TCP with the nodes' certificates, Bayard's REST
//! gateway, API keys across a cluster, the Elasticsearch subset's shapes, and hostile callers.

mod common;

use std::time::{Duration, Instant};

use bayard::access::{encode_api_key, KeyRole};
use bayard::node::HttpPort;
use bayard::protocol::{Consistency, ErrorCode};
use common::https::Https;
use common::{client_with, eventually, node_config, start_node, CertificateSet, TestCluster};
use serde_json::json;

/// A node with its HTTPS door on the QUIC port's number.
async fn http_node(
    configure: impl FnOnce(&mut bayard::node::NodeConfig),
) -> (CertificateSet, tempfile::TempDir, bayard::node::RunningNode) {
    let certificates = CertificateSet::new();
    let data = tempfile::tempdir().unwrap();
    let mut config = node_config(&certificates, 1, data.path());
    config.http_port = HttpPort::SameAsQuic;
    configure(&mut config);
    let node = start_node(config).await;
    (certificates, data, node)
}

fn ndjson(lines: &[serde_json::Value]) -> Vec<u8> {
    lines.iter().map(|line| format!("{line}\n")).collect::<String>().into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_gateway_answers_like_the_cli() {
    let (certificates, _data, node) = http_node(|_| {}).await;
    let address = node.http_address().expect("https is on");
    assert_eq!(address.port(), node.local_address().port(), "one port number for QUIC and HTTPS");
    let app = Https::with_certificate(address, &certificates.client("app"));

    let put = app
        .json(
            "PUT",
            "/v1/documents/1",
            &[],
            &json!({"title": "Hello bayard", "body": "search over https", "year": 2026}),
        )
        .await;
    assert_eq!(put.status, 200, "{:?}", put.body);
    assert_eq!(put.body["status"], "OK");
    assert_eq!(put.body["operations"], 1);
    let bulk = ndjson(&[
        json!({"_id": "2", "title": "Second", "body": "bulk line one", "year": 2020}),
        json!({"_id": "3", "title": "Third hello", "body": "bulk line two", "year": 2021}),
    ]);
    let answer = app.send("PUT", "/v1/documents", &[], Some(bulk)).await;
    assert_eq!((answer.status, answer.body["operations"].clone()), (200, json!(2)), "{:?}", answer.body);
    assert_eq!(app.get("/v1/commit", &[]).await.status, 200);

    let document = app.get("/v1/documents/1", &[]).await;
    assert_eq!(document.status, 200);
    assert_eq!(
        document.body,
        json!({"id": "1", "fields": {"title": "Hello bayard", "body": "search over https", "year": 2026}})
    );
    let missing = app.get("/v1/documents/nope", &[]).await;
    assert_eq!((missing.status, missing.body["error"]["code"].clone()), (404, json!("not_found")));

    // The same search over HTTP and over QUIC gives the same JSON.
    let found = app.send("POST", "/v1/search?limit=5&sort=-year", &[], Some(b"title:hello".to_vec())).await;
    assert_eq!(found.status, 200, "{:?}", found.body);
    assert_eq!(found.body["count"], 2);
    let quic = client_with(&node.local_address().to_string(), certificates.client("app"));
    let mut request = common::query("title:hello");
    request.limit = 5;
    request.sort = Some(bayard::index::SortSpec { field: "year".into(), descending: true });
    let over_quic = quic.search(request, Consistency::Local).await.unwrap();
    assert_eq!(found.body, serde_json::to_value(&over_quic).unwrap());
    assert_eq!(found.body["docs"][0]["id"], "1");

    assert_eq!(app.get("/v1/schema", &[]).await.body, quic.schema().await.unwrap());
    let status = app.get("/v1/status", &[]).await;
    assert_eq!((status.body["node_id"].clone(), status.body["status"].clone()), (json!(1), json!("OK")));
    let peers = app.get("/v1/peers", &[]).await;
    assert_eq!(peers.body, json!({"1": node.local_address().to_string()}));

    assert_eq!(app.send("DELETE", "/v1/documents/2", &[], None).await.status, 200);
    assert_eq!(app.send("POST", "/v1/commit", &[], None).await.status, 200);
    assert_eq!(app.get("/v1/documents/2", &[]).await.status, 404);

    // Errors are JSON with a fitting status.
    let bad = app.send("PUT", "/v1/documents/4", &[], Some(b"not json".to_vec())).await;
    assert_eq!((bad.status, bad.body["error"]["code"].clone()), (400, json!("invalid_argument")), "{:?}", bad.body);
    let no_id =
        app.send("PUT", "/v1/documents", &[], Some(ndjson(&[json!({"_id": "5"}), json!({"title": "x"})]))).await;
    assert_eq!(no_id.status, 400);
    assert!(no_id.body["error"]["message"].as_str().unwrap().contains("line 2"), "{:?}", no_id.body);
    let deep = app.send("POST", "/v1/search", &[], Some("(".repeat(3000).into_bytes())).await;
    assert_eq!((deep.status, deep.body["error"]["code"].clone()), (400, json!("invalid_query")), "{:?}", deep.body);
    let unknown = app.get("/v1/nothing", &[]).await;
    assert_eq!(unknown.status, 404);
    assert!(unknown.body["error"]["message"].is_string());

    // Who may call: no credentials is a 401, a node certificate a 403.
    let anonymous = Https::anonymous(address, &certificates.ca_path());
    let refused = anonymous.get("/v1/status", &[]).await;
    assert_eq!(refused.status, 401);
    assert!(refused.headers.contains_key("www-authenticate"));
    let as_node = Https::with_certificate(address, &certificates.node(2));
    assert_eq!(as_node.get("/v1/status", &[]).await.status, 403);

    // HTTP/2 with the same routes.
    let over_http2 = Https::with_certificate(address, &certificates.client("app")).http2();
    let document = over_http2.get("/v1/documents/1", &[]).await;
    assert_eq!((document.status, document.body["id"].clone()), (200, json!("1")));
    node.shutdown().await;
}

/// Sends a write with a key, the way any HTTP client would.
async fn put_with(https: &Https, authorization: &str, id: &str) -> u16 {
    let path = format!("/v1/documents/{id}");
    https.json("PUT", &path, &[("authorization", authorization)], &json!({"title": id})).await.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_work_on_every_node_and_revocation_reaches_all_of_them() {
    let mut cluster = TestCluster::new();
    cluster.http = true;
    cluster.start(1, None).await;
    cluster.wait_for_voters(1, &[1], Duration::from_secs(30)).await;
    cluster.start(2, Some(1)).await;
    cluster.start(3, Some(1)).await;
    for node_id in [1, 2, 3] {
        cluster.wait_for_voters(node_id, &[1, 2, 3], Duration::from_secs(30)).await;
    }
    let ca = cluster.certificates.ca_path();
    let addresses: std::collections::BTreeMap<u64, std::net::SocketAddr> =
        cluster.nodes.iter().map(|(node_id, node)| (*node_id, node.http_address().unwrap())).collect();
    let door = |node_id: u64| Https::anonymous(addresses[&node_id], &ca);

    // Keys are made by admins; a client certificate may not, nor a node certificate.
    let admin = cluster.client();
    let (web, web_secret) = admin.create_key("web", KeyRole::Client, false).await.unwrap();
    let (reader, reader_secret) = admin.create_key("reader", KeyRole::Client, true).await.unwrap();
    let app = client_with(&cluster.address(1), cluster.certificates.client("app"));
    let refused = app.create_key("sneaky", KeyRole::Admin, false).await.unwrap_err();
    assert_eq!(common::remote_error(refused).0, ErrorCode::PermissionDenied);
    let web_header = format!("ApiKey {}", encode_api_key(&web.id, &web_secret));
    let reader_header = format!("ApiKey {}", encode_api_key(&reader.id, &reader_secret));

    // Every node accepts the key (followers forward the write to the leader).
    for node_id in [1, 2, 3] {
        let accepted = eventually(Duration::from_secs(5), || async {
            put_with(&door(node_id), &web_header, &format!("doc-{node_id}")).await == 200
        })
        .await;
        assert!(accepted, "node {node_id} accepts the key");
    }
    assert_eq!(put_with(&door(2), &format!("Bearer {web_secret}"), "bearer").await, 200);
    // A read-only key reads and may not write; a wrong secret is a 401.
    let denied = door(3).json("PUT", "/v1/documents/x", &[("authorization", &reader_header)], &json!({})).await;
    assert_eq!((denied.status, denied.body["error"]["code"].clone()), (403, json!("permission_denied")));
    assert_eq!(door(3).get("/v1/status", &[("authorization", &reader_header)]).await.status, 200);
    let wrong = format!("ApiKey {}", encode_api_key(&web.id, &reader_secret));
    assert_eq!(door(1).get("/v1/status", &[("authorization", &wrong)]).await.status, 401);
    // A client key may not manage keys over HTTP; the list never shows digests.
    let over_http = door(1).json("POST", "/v1/keys", &[("authorization", &web_header)], &json!({"name": "x"})).await;
    assert_eq!(over_http.status, 403, "{:?}", over_http.body);
    let keys = admin.list_keys().await.unwrap();
    assert_eq!(keys.len(), 2);
    assert!(!serde_json::to_string(&keys).unwrap().contains(&web.secret_sha256));

    // Revocation: every node refuses the key within a second of the answer.
    admin.revoke_key(&web.id).await.unwrap();
    let revoked_at = Instant::now();
    for node_id in [1, 2, 3] {
        let refused = eventually(Duration::from_secs(1), || async {
            door(node_id).get("/v1/status", &[("authorization", &web_header)]).await.status == 401
        })
        .await;
        assert!(refused, "node {node_id} still accepts a revoked key after a second");
    }
    eprintln!("revocation refused on all three nodes {:?} after the answer", revoked_at.elapsed());
    assert_eq!(door(2).get("/v1/status", &[("authorization", &reader_header)]).await.status, 200);

    // Keys survive a restart (they are replicated state).
    let quic_address = cluster.nodes[&2].local_address();
    cluster.stop(2).await;
    let mut config = cluster.config(2, Vec::new());
    config.listen_address = quic_address;
    cluster.nodes.insert(2, start_node(config).await);
    let survives = eventually(Duration::from_secs(10), || async {
        door(2).get("/v1/status", &[("authorization", &reader_header)]).await.status == 200
    })
    .await;
    assert!(survives, "the read-only key works on node 2 after its restart");
    assert_eq!(door(2).get("/v1/status", &[("authorization", &web_header)]).await.status, 401);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_elasticsearch_subset_answers_in_its_shapes() {
    let (certificates, _data, node) = http_node(|_| {}).await;
    let es = Https::with_certificate(node.http_address().unwrap(), &certificates.client("app"));

    let info = es.get("/", &[]).await;
    assert_eq!(info.status, 200);
    assert!(info.body["version"]["number"].as_str().unwrap().starts_with("8."));
    assert_eq!(info.headers["x-elastic-product"], "Elasticsearch");
    let health = es.get("/_cluster/health", &[]).await;
    assert_eq!((health.body["status"].clone(), health.body["number_of_nodes"].clone()), (json!("green"), json!(1)));
    assert_eq!(es.send("HEAD", "/bayard", &[], None).await.status, 200);
    assert_eq!(es.send("HEAD", "/logs", &[], None).await.status, 404);
    let elsewhere = es.json("POST", "/logs/_search", &[], &json!({})).await;
    assert_eq!((elsewhere.status, elsewhere.body["error"]["type"].clone()), (404, json!("index_not_found_exception")));
    let mapping = es.get("/bayard/_mapping", &[]).await;
    assert_eq!(mapping.body["bayard"]["mappings"]["properties"]["title"]["type"], "text");

    // Documents: created, updated, conflicts, deleted.
    let document = json!({"title": "Hello elastic", "body": "a faithful subset of the search api", "year": 2024});
    let created = es.json("PUT", "/bayard/_doc/a", &[], &document).await;
    assert_eq!((created.status, created.body["result"].clone()), (201, json!("created")), "{:?}", created.body);
    assert_eq!(es.json("POST", "/bayard/_refresh", &[], &json!({})).await.status, 200);
    let updated = es.json("PUT", "/bayard/_doc/a?refresh=true", &[], &document).await;
    assert_eq!((updated.status, updated.body["result"].clone()), (200, json!("updated")));
    assert_eq!(es.json("PUT", "/bayard/_create/a", &[], &document).await.status, 409);
    let generated = es.json("POST", "/bayard/_doc?refresh=true", &[], &json!({"title": "no id given"})).await;
    assert_eq!(generated.status, 201);
    assert!(generated.body["_id"].as_str().is_some_and(|id| !id.is_empty()));
    let fetched = es.get("/bayard/_doc/a", &[]).await;
    assert_eq!((fetched.body["found"].clone(), fetched.body["_source"]["year"].clone()), (json!(true), json!(2024)));
    let gone = es
        .send("DELETE", &format!("/bayard/_doc/{}?refresh=true", generated.body["_id"].as_str().unwrap()), &[], None)
        .await;
    assert_eq!((gone.status, gone.body["result"].clone()), (200, json!("deleted")));
    assert_eq!(
        es.get("/bayard/_doc/missing", &[]).await.body,
        json!({"_index": "bayard", "_id": "missing", "found": false})
    );

    // A bulk with one bad item: that item fails, the others are written.
    let bulk = ndjson(&[
        json!({"index": {"_index": "bayard", "_id": "b1"}}),
        json!({"title": "bulk one", "body": "first of the bulk", "year": 2020}),
        json!({"index": {"_index": "bayard", "_id": "b2"}}),
        json!({"title": "bulk two", "year": "not a number"}),
        json!({"create": {"_index": "bayard", "_id": "b3"}}),
        json!({"title": "bulk three", "body": "third of the bulk", "year": 2022}),
        json!({"update": {"_index": "bayard", "_id": "b3"}}),
        json!({"doc": {"year": 2023}}),
        json!({"delete": {"_index": "bayard", "_id": "b9"}}),
    ]);
    let answer = es.send("POST", "/_bulk?refresh=true", &[("content-type", "application/x-ndjson")], Some(bulk)).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.body["errors"], true);
    let statuses: Vec<u64> = answer.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item.as_object().unwrap().values().next().unwrap()["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, vec![201, 400, 201, 200, 404], "{:?}", answer.body);
    assert_eq!(es.get("/bayard/_doc/b3", &[]).await.body["_source"]["year"], 2023);
    assert_eq!(es.get("/bayard/_doc/b2", &[]).await.status, 404);

    // Searches: bool, highlight, aggregations, counts.
    let search = json!({
        "query": {"bool": {"must": [{"match": {"body": "bulk"}}], "filter": [{"range": {"year": {"gte": 2021}}}]}},
        "highlight": {"fields": {"body": {}}},
        "aggs": {"years": {"terms": {"field": "year"}}},
    });
    let found = es.json("POST", "/bayard/_search", &[], &search).await;
    assert_eq!(found.status, 200, "{:?}", found.body);
    assert_eq!(found.body["hits"]["total"], json!({"value": 1, "relation": "eq"}));
    let hit = &found.body["hits"]["hits"][0];
    assert_eq!((hit["_id"].clone(), hit["_index"].clone()), (json!("b3"), json!("bayard")));
    assert!(hit["highlight"]["body"][0].as_str().unwrap().contains("<em>bulk</em>"), "{hit}");
    assert_eq!(found.body["aggregations"]["years"]["buckets"][0]["key"], 2023);
    assert_eq!(found.body["_shards"]["failed"], 0);
    let by_q = es.get("/bayard/_search?q=title:hello", &[]).await;
    assert_eq!(by_q.body["hits"]["hits"][0]["_id"], "a", "{:?}", by_q.body);
    let counted = es.json("POST", "/bayard/_count", &[], &json!({"query": {"match_all": {}}})).await;
    assert_eq!(counted.body["count"], 3, "{:?}", counted.body);
    let unsupported = es.json("POST", "/bayard/_search", &[], &json!({"query": {"geo_distance": {}}})).await;
    assert_eq!(unsupported.status, 400);
    assert!(unsupported.body["error"]["reason"].as_str().unwrap().contains("geo_distance"), "{:?}", unsupported.body);
    let searches = ndjson(&[
        json!({"index": "bayard"}),
        json!({"query": {"ids": {"values": ["a"]}}}),
        json!({}),
        json!({"size": 0}),
    ]);
    let multi = es.send("POST", "/_msearch", &[], Some(searches)).await;
    let responses = multi.body["responses"].as_array().unwrap();
    assert_eq!(responses.len(), 2);
    assert_eq!(responses[0]["hits"]["hits"][0]["_id"], "a");
    assert_eq!(responses[1]["hits"]["total"]["value"], 3);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_http_callers_are_refused_and_the_honest_one_is_served() {
    let (certificates, _data, node) = http_node(|config| {
        config.http.max_body_bytes = 1024 * 1024;
        config.http.max_connections = 4;
        config.http.read_timeout = Duration::from_secs(1);
        config.http.max_bulk_items = 100;
    })
    .await;
    let address = node.http_address().unwrap();
    let honest = Https::with_certificate(address, &certificates.client("app"));
    let served = |https: Https| async move {
        let body = Some(json!({"title": "still served"}).to_string().into_bytes());
        let answer = https.try_send("PUT", "/v1/documents/honest", &[], body).await;
        matches!(answer, Ok(answer) if answer.status == 200)
    };

    // A body over --http-max-body-mb: 413, nothing written.
    let huge = json!({"title": "x".repeat(1536 * 1024)});
    let refused = honest.json("PUT", "/v1/documents/huge", &[], &huge).await;
    assert_eq!(
        (refused.status, refused.body["error"]["code"].clone()),
        (413, json!("too_large")),
        "{:?}",
        refused.body
    );

    // A query nested past --max-query-depth, in JSON.
    let mut deep = json!({"match_all": {}});
    for _ in 0..100 {
        deep = json!({"bool": {"must": [deep]}});
    }
    let answer = honest.json("POST", "/bayard/_search", &[], &json!({"query": deep})).await;
    assert_eq!(answer.status, 400, "{:?}", answer.body);

    // A bulk of more actions than --http-max-bulk-items is refused before anything is done.
    let deletes = ndjson(&vec![json!({"delete": {"_index": "bayard", "_id": "x"}}); 101]);
    let answer = honest.send("POST", "/_bulk", &[], Some(deletes)).await;
    assert_eq!(answer.status, 400);
    assert!(answer.body["error"]["reason"].as_str().unwrap().contains("--http-max-bulk-items"), "{:?}", answer.body);

    // A retry under the same request id names the same document, and does not mint a second key.
    let retry = [("x-bayard-request-id", "000000000000000000000000000000aa")];
    let first = honest.json("POST", "/bayard/_doc", &retry, &json!({"title": "once"})).await;
    let again = honest.json("POST", "/bayard/_doc", &retry, &json!({"title": "once"})).await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    assert_eq!(first.body["_id"], again.body["_id"]);
    let admin = Https::with_certificate(address, &certificates.admin("ops"));
    let key_retry = [("x-bayard-request-id", "000000000000000000000000000000bb")];
    let made = admin.json("POST", "/v1/keys", &key_retry, &json!({"name": "once"})).await;
    assert_eq!(made.status, 200, "{:?}", made.body);
    let remade = admin.json("POST", "/v1/keys", &key_retry, &json!({"name": "once"})).await;
    assert_eq!(remade.status, 409, "a retry must not show a secret that was never stored: {:?}", remade.body);

    // Connections that say nothing are closed at the read timeout.
    let idle = tokio::net::TcpStream::connect(address).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        let mut buffer = [0_u8; 64];
        idle.readable().await.ok();
        loop {
            match idle.try_read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            idle.readable().await.ok();
        }
    })
    .await;
    assert!(closed.is_ok(), "a silent connection was never closed");

    // A connection that finished TLS and says nothing (no HTTP/1 request, no HTTP/2 preface) is
    // closed at the read timeout: silent connections cannot hold the slots.
    let mut silent = honest.open_silent().await;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio::io::AsyncReadExt;
        let mut buffer = [0_u8; 64];
        while let Ok(read) = silent.read(&mut buffer).await {
            if read == 0 {
                break;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a silent TLS connection was never closed");

    // More connections than --http-max-connections: the extra ones are dropped.
    let mut holders = Vec::new();
    for _ in 0..4 {
        holders.push(tokio::net::TcpStream::connect(address).await.unwrap());
    }
    // The listener takes connections in order: the next one finds every slot taken.
    assert!(honest.try_send("GET", "/v1/status", &[], None).await.is_err(), "a fifth connection was served");
    drop(holders);
    assert!(eventually(Duration::from_secs(10), || served(honest.clone())).await, "the honest client is served again");
    node.shutdown().await;
}
