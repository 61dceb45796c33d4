//! Bad input of every kind gets a specific error, and the node keeps serving: the same connection
//! answers the next request, and nothing committed is lost.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bayard::certs::Validity;
use bayard::client::{Client, ClientError, ClientOptions};
use bayard::index::{FacetRequest, SortSpec};
use bayard::protocol::{ClientRequest, ClientResponse, Consistency, ErrorCode, StreamHeader, StreamKind, WireError};
use bayard::transport::{self, pool::ConnectionPool, Role, TlsMaterial};
use common::{
    assert_still_serving, client_with, node_config, node_with_one_document, query, remote_error, start_node,
    CertificateSet,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_documents_are_refused_whole_with_the_reason() {
    let test = node_with_one_document().await;
    let client = test.client();

    let (code, message) = remote_error(client.put("1", r#"{"title": "unterminated"#).await.unwrap_err());
    assert_eq!(code, ErrorCode::InvalidArgument);
    assert!(message.contains("not valid JSON"), "{message}");

    let (code, message) = remote_error(client.put("1", r#"{"title":"ok","year":"nineteen"}"#).await.unwrap_err());
    assert_eq!(code, ErrorCode::InvalidArgument);
    assert!(message.contains("year"), "{message}");

    let (_, message) = remote_error(client.put("1", r#"{"colour":"red"}"#).await.unwrap_err());
    assert!(message.contains("unknown field `colour`"), "{message}");

    let (_, message) = remote_error(client.put("1", r#"[1,2,3]"#).await.unwrap_err());
    assert!(message.contains("object"), "{message}");

    // One bad document in a batch: nothing of the batch is written, and the error names it.
    let documents = vec![
        bayard::protocol::DocumentInput { id: None, document_json: r#"{"_id":"good","title":"fine"}"#.into() },
        bayard::protocol::DocumentInput { id: None, document_json: r#"{"title":"no id"}"#.into() },
    ];
    let (_, message) = remote_error(client.put_documents(documents).await.unwrap_err());
    assert!(message.starts_with("document 2:") && message.contains("_id"), "{message}");
    client.commit().await.unwrap();
    assert!(client.get("good").await.unwrap().is_none());
    assert_still_serving(&test).await;
    test.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_sorts_and_facets_are_refused() {
    let test = node_with_one_document().await;
    let client = test.client();

    let (code, message) = remote_error(client.search(query("title:(unclosed"), Consistency::Local).await.unwrap_err());
    assert_eq!(code, ErrorCode::InvalidQuery);
    assert!(message.starts_with("invalid query"), "{message}");

    let (_, message) = remote_error(client.search(query("nosuchfield:value"), Consistency::Local).await.unwrap_err());
    assert!(message.contains("nosuchfield"), "{message}");

    let mut sorted = query("*");
    sorted.sort = Some(SortSpec { field: "shoe_size".into(), descending: false });
    let (code, message) = remote_error(client.search(sorted, Consistency::Local).await.unwrap_err());
    assert_eq!(code, ErrorCode::InvalidArgument);
    assert!(message.contains("unknown sort field `shoe_size`"), "{message}");

    let mut sorted_on_text = query("*");
    sorted_on_text.sort = Some(SortSpec { field: "title".into(), descending: true });
    let (_, message) = remote_error(client.search(sorted_on_text, Consistency::Local).await.unwrap_err());
    assert!(message.contains("title"), "{message}");

    let mut faceted = query("*");
    faceted.facets = vec![FacetRequest { field: "planet".into(), prefixes: vec![] }];
    let (_, message) = remote_error(client.search(faceted, Consistency::Local).await.unwrap_err());
    assert!(message.contains("unknown facet field `planet`"), "{message}");

    let mut faceted_on_text = query("*");
    faceted_on_text.facets = vec![FacetRequest { field: "title".into(), prefixes: vec![] }];
    let (_, message) = remote_error(client.search(faceted_on_text, Consistency::Local).await.unwrap_err());
    assert!(message.contains("title"), "{message}");
    assert_still_serving(&test).await;
    test.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_documents_and_frames_are_refused() {
    let certificates = CertificateSet::new();
    let data = tempfile::tempdir().unwrap();
    let mut config = node_config(&certificates, 1, data.path());
    config.max_frame_bytes = 64 * 1024;
    let node = start_node(config).await;
    let address = node.local_address().to_string();

    // The client's own limit: refused before anything is sent.
    let client = client_with(&address, certificates.client("app"));
    let huge = format!(r#"{{"title":"{}"}}"#, "x".repeat(17 * 1024 * 1024));
    let error = client.put("huge", &huge).await.unwrap_err();
    assert!(matches!(error, ClientError::Request(_)) && error.to_string().contains("exceeds the limit"), "{error}");

    // The node's limit: a client with a larger limit sends 100 KiB; the node refuses the frame on
    // its length prefix and says why.
    let large = format!(r#"{{"title":"{}"}}"#, "y".repeat(100 * 1024));
    let error = client.put("large", &large).await.unwrap_err();
    let (code, message) = remote_error(error);
    assert_eq!(code, ErrorCode::FrameTooLarge);
    assert!(message.contains("exceeds the limit of 65536 bytes"), "{message}");

    // Bulk loads are chunked under the limit and go through.
    let mut options = ClientOptions::new(vec![address.clone()], certificates.client("app"));
    options.max_frame_bytes = 64 * 1024;
    let chunked = Client::connect(options).unwrap();
    let documents: Vec<_> = (0..300)
        .map(|number| bayard::protocol::DocumentInput {
            id: None,
            document_json: format!(r#"{{"_id":"c{number}","body":"{}"}}"#, "z".repeat(1000)),
        })
        .collect();
    chunked.bulk_put(documents, |_| {}).await.unwrap();
    chunked.commit().await.unwrap();
    assert_eq!(chunked.status().await.unwrap().document_count, 300);
    node.shutdown().await;
}

/// A raw connection with a client certificate, to send what the client library never would.
async fn raw_connection(certificates: &CertificateSet, address: &str) -> quinn::Connection {
    let material = TlsMaterial::load(&certificates.client("raw")).unwrap();
    let config = transport::tls::client_config(&material, 16).unwrap();
    let endpoint = transport::bind_client_endpoint(config, false).unwrap();
    let pool = ConnectionPool::new(endpoint, common::TRUST_DOMAIN, Duration::from_secs(5));
    pool.get(address).await.unwrap()
}

async fn send_raw(connection: &quinn::Connection, bytes: &[u8]) -> Result<(), WireError> {
    let (mut send, mut receive) = connection.open_bi().await.unwrap();
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    transport::frame::read_frame::<_, Result<(), WireError>>(&mut receive, 1 << 20)
        .await
        .expect("the node answers with an error frame")
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(body);
    bytes
}

async fn search_on(connection: &quinn::Connection) -> ClientResponse {
    let request = ClientRequest::Search { request: query("*"), consistency: Consistency::Local };
    transport::call::<_, ClientResponse>(
        connection,
        StreamKind::Client,
        None,
        &request,
        Duration::from_secs(10),
        1 << 20,
    )
    .await
    .expect("transport")
    .expect("answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_and_unknown_kinds_end_only_their_stream() {
    let test = node_with_one_document().await;
    let connection = raw_connection(&test.certificates, &test.address()).await;

    // A header that does not decode.
    let error = send_raw(&connection, &frame(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff])).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::MalformedFrame);
    assert!(error.message.starts_with("stream header is malformed"), "{}", error.message);

    // A good header, then a request frame that does not decode.
    let header = StreamHeader::new(StreamKind::Client, None, 5_000);
    let mut bytes = frame(&postcard::to_allocvec(&header).unwrap());
    bytes.extend(frame(&[200, 1, 2, 3]));
    let error = send_raw(&connection, &bytes).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::MalformedFrame);
    assert!(error.message.starts_with("request frame is malformed"), "{}", error.message);

    // A header announcing a frame larger than any limit.
    let error = send_raw(&connection, &u32::MAX.to_be_bytes()).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::FrameTooLarge);

    // A kind this node does not know.
    let unknown = StreamHeader { kind: 9, ..StreamHeader::new(StreamKind::Client, None, 5_000) };
    let error = send_raw(&connection, &frame(&postcard::to_allocvec(&unknown).unwrap())).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::UnknownStreamKind);
    assert!(error.message.contains("unknown stream kind 9"), "{}", error.message);

    // The same connection still serves.
    assert!(connection.close_reason().is_none());
    match search_on(&connection).await {
        ClientResponse::Search { response, .. } => assert_eq!(response.count, Some(1)),
        other => panic!("unexpected {other:?}"),
    }
    test.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_admin_certificates_may_not_open_raft_or_membership_streams() {
    let test = node_with_one_document().await;
    for client in [test.client(), test.admin()] {
        for kind in [StreamKind::Raft, StreamKind::Membership] {
            let answer = client.raw_call(kind.to_byte(), &()).await.unwrap();
            let error = answer.unwrap_err();
            assert_eq!(error.code, ErrorCode::PermissionDenied);
            assert!(error.message.contains(&format!("may not open {} streams", kind.name())), "{}", error.message);
        }
    }
    let error = test.client().raw_call(StreamKind::Raft.to_byte(), &()).await.unwrap().unwrap_err();
    assert_eq!(error.message, "permission denied: client certificate may not open raft streams");
    assert_still_serving(&test).await;
    test.node.shutdown().await;
}

fn assert_refused(error: ClientError) {
    let text = error.to_string();
    assert!(matches!(error, ClientError::Unavailable { .. }), "{text}");
    assert!(
        text.contains("certificate") || text.contains("handshake") || text.contains("alert"),
        "the refusal should point at the certificate: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_valid_client_certificate_are_refused() {
    let test = node_with_one_document().await;
    let address = test.address();
    let quick = |tls| {
        let mut options = ClientOptions::new(vec![address.clone()], tls);
        options.connect_timeout = Duration::from_secs(3);
        options.request_timeout = Duration::from_secs(3);
        options.retry_rounds = 1;
        options
    };

    // No client certificate at all.
    let roots = transport::tls::read_roots(&test.certificates.ca_path()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let quic = transport::tls::quic_client_config(tls, 16).unwrap();
    let anonymous = Client::with_quic_config(quick(test.certificates.client("unused")), quic).unwrap();
    assert_refused(anonymous.status().await.unwrap_err());

    // A certificate from another CA (trusting this cluster's CA for the server side).
    let foreign = CertificateSet::new();
    let mut foreign_files = foreign.client("intruder");
    foreign_files.ca_certificate = test.certificates.ca_path();
    let intruder = Client::connect(quick(foreign_files)).unwrap();
    assert_refused(intruder.status().await.unwrap_err());

    // An expired certificate from the right CA.
    let now = time::OffsetDateTime::now_utc();
    let expired_files = test.certificates.files_with_validity(
        &Role::Client { name: "old".into() },
        "client-expired",
        Validity { not_before: now - time::Duration::days(10), not_after: now - time::Duration::days(1) },
    );
    let expired = Client::connect(quick(expired_files)).unwrap();
    assert_refused(expired.status().await.unwrap_err());

    // A node certificate naming this node's id but from another CA cannot pass as a node either.
    let mut impostor = foreign.node(1);
    impostor.ca_certificate = test.certificates.ca_path();
    let impostor = Client::connect(quick(impostor)).unwrap();
    assert_refused(impostor.status().await.unwrap_err());

    assert_still_serving(&test).await;
    test.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refuses_a_server_from_another_ca() {
    let test = node_with_one_document().await;
    // The client trusts only a different CA: the node's certificate does not verify.
    let other = CertificateSet::new();
    let mut options = ClientOptions::new(vec![test.address()], other.client("app"));
    options.retry_rounds = 1;
    let client = Client::connect(options).unwrap();
    let error = client.status().await.unwrap_err();
    assert!(error.to_string().contains("certificate"), "{error}");
    test.node.shutdown().await;
}
