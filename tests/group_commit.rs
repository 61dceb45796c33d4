//! Group commit against a real node over QUIC + mTLS: concurrent single-document puts share
//! Raft entries (the log grows by fewer entries than there were requests), every one of them is
//! applied exactly once with its own answer, a retried request inside a group changes nothing,
//! and a bad document in a group is refused alone.

mod common;

use std::sync::Arc;

use bayard::protocol::{ClientRequest, DocumentInput, ErrorCode};
use bayard::raft::types::RequestId;
use common::{remote_error, TestNode};

fn put(id: &str, text: &str, request_id: u128) -> ClientRequest {
    ClientRequest::Put {
        documents: vec![DocumentInput {
            id: Some(id.to_string()),
            document_json: format!(r#"{{"title":"{text}","body":"grouped writes"}}"#),
        }],
        request_id: RequestId(request_id),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_share_entries_and_each_is_applied_once() {
    let node = TestNode::start().await;
    let client = Arc::new(node.client());
    client.put("warm", r#"{"title":"warm"}"#).await.expect("first put");
    let log_before = node.node.raft().metrics().borrow().last_log_index.unwrap_or(0);

    // 256 puts from 64 tasks at once; request ids 1..=256.
    const PUTS: u128 = 256;
    let mut tasks = Vec::new();
    for worker in 0..64_u128 {
        let client = Arc::clone(&client);
        tasks.push(tokio::spawn(async move {
            let mut receipts = Vec::new();
            let mut number = worker + 1;
            while number <= PUTS {
                let receipt = client.send_write(put(&format!("g{number}"), "group", number)).await;
                receipts.push(receipt.expect("every grouped put is answered"));
                number += 64;
            }
            receipts
        }));
    }
    let mut receipts = Vec::new();
    for task in tasks {
        receipts.extend(task.await.expect("task"));
    }
    assert_eq!(receipts.len(), PUTS as usize);
    assert!(receipts.iter().all(|receipt| receipt.operations == 1 && !receipt.duplicate));
    let log_after = node.node.raft().metrics().borrow().last_log_index.unwrap_or(0);
    let entries = log_after - log_before;
    assert!(entries < PUTS as u64, "{PUTS} concurrent puts took {entries} log entries: nothing was grouped");
    // Answers name the entry that carried them: several requests per entry.
    let mut indexes: Vec<u64> = receipts.iter().map(|receipt| receipt.applied_index).collect();
    indexes.sort_unstable();
    indexes.dedup();
    assert!(indexes.len() < PUTS as usize, "every put had its own entry");

    // Retries of requests applied in a group change nothing, even racing a new write of the
    // same document and riding in a group themselves.
    let overwrite = client.send_write(put("g1", "overwritten", 10_000)).await.expect("overwrite");
    let mut retries = Vec::new();
    for number in 1..=32_u128 {
        let client = Arc::clone(&client);
        retries.push(tokio::spawn(async move { client.send_write(put(&format!("g{number}"), "group", number)).await }));
    }
    for retry in retries {
        let receipt = retry.await.expect("task").expect("a retry is answered");
        assert!(receipt.duplicate, "a retried request is reported as a duplicate");
        assert!(receipt.applied_index < overwrite.applied_index);
    }

    // A document the index refuses fails alone; its neighbours in the group are applied.
    let mut mixed = Vec::new();
    for number in 0..16_u128 {
        let client = Arc::clone(&client);
        mixed.push(tokio::spawn(async move {
            let request = if number == 7 {
                ClientRequest::Put {
                    documents: vec![DocumentInput {
                        id: Some("bad".into()),
                        document_json: r#"{"year":"not a number"}"#.into(),
                    }],
                    request_id: RequestId(20_000 + number),
                }
            } else {
                put(&format!("m{number}"), "mixed", 20_000 + number)
            };
            (number, client.send_write(request).await)
        }));
    }
    for task in mixed {
        let (number, result) = task.await.expect("task");
        if number == 7 {
            let (code, message) = remote_error(result.expect_err("the bad document is refused"));
            assert_eq!(code, ErrorCode::InvalidArgument, "{message}");
        } else {
            result.expect("its neighbours are applied");
        }
    }

    client.commit().await.expect("commit");
    let status = client.status().await.expect("status");
    // warm + 256 grouped + 15 mixed (g1 overwritten in place).
    assert_eq!(status.document_count, 1 + PUTS as u64 + 15);
    let g1 = client.get("g1").await.expect("get").expect("g1 exists");
    assert!(g1.fields.to_string().contains("overwritten"), "a retry reverted a newer write: {}", g1.fields);
    for number in [2, 100, 256] {
        assert!(client.get(&format!("g{number}")).await.expect("get").is_some(), "g{number} was applied");
    }
    let metrics = bayard::telemetry::metrics::render().expect("metrics");
    assert!(metrics.contains("bayard_write_group_requests_count"), "the group sizes are counted");
    node.node.shutdown().await;
}

/// Groups are made by the leader only: a member forwarding a "group" of its own (here one that
/// hides a rollback behind a put) is refused, nothing changes, and the honest client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_group_is_refused() {
    use bayard::index::IndexOperation;
    use bayard::protocol::{RaftRequest, RaftResponse, StreamKind};
    use bayard::raft::types::{GroupedRequest, IndexBatch};

    let node = TestNode::start().await;
    let client = node.client();
    client.put("kept", r#"{"title":"kept"}"#).await.expect("put");
    let log_before = node.node.raft().metrics().borrow().last_log_index;

    let mut batch = IndexBatch::of_request(
        vec![IndexOperation::Put { id: "smuggled".into(), document_json: r#"{"_id":"smuggled"}"#.into() }],
        RequestId(7),
    );
    batch.grouped = vec![GroupedRequest { operations: vec![IndexOperation::Rollback], request_id: RequestId(8) }];
    let member = common::raw_connection_with(&node.certificates.node(1), &node.address()).await;
    let answer: Result<RaftResponse, bayard::protocol::WireError> =
        common::call_raw(&member, StreamKind::Raft, &RaftRequest::Propose(batch)).await.expect("the node answers");
    let error = answer.expect_err("a forwarded group is refused");
    assert_eq!(error.code, ErrorCode::InvalidArgument, "{}", error.message);
    assert!(error.message.contains("one request"), "{}", error.message);
    assert_eq!(node.node.raft().metrics().borrow().last_log_index, log_before, "nothing was appended");

    client.commit().await.expect("the honest client is served");
    assert!(client.get("kept").await.expect("get").is_some(), "the uncommitted put was not rolled back");
    assert!(client.get("smuggled").await.expect("get").is_none());
    node.node.shutdown().await;
}

/// At-most-once is bounded by log time, not by a count: a retry that comes after more requests
/// than the 10,000 the table used to hold (about a second and a half of writes here) is still
/// recognized, and still after a restart (the table and its clock are in the commit marker).
/// Log time here is the test's own duration, far under the two minutes of retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_many_newer_requests_is_still_applied_once() {
    let certificates = common::CertificateSet::new();
    let data = tempfile::tempdir().expect("temp dir");
    let node = common::start_node(common::node_config(&certificates, 1, data.path())).await;
    let client = Arc::new(common::client_with(&node.local_address().to_string(), certificates.client("app")));
    const RETRIED: u128 = 1 << 64;
    let first = client.send_write(put("r", "first", RETRIED)).await.expect("first attempt");
    client.send_write(put("r", "second", RETRIED + 1)).await.expect("newer write");

    // 12,000 newer requests, 64 at a time.
    const NEWER: u128 = 12_000;
    let mut tasks = Vec::new();
    for worker in 0..64_u128 {
        let client = Arc::clone(&client);
        tasks.push(tokio::spawn(async move {
            let mut number = worker;
            while number < NEWER {
                client.send_write(put(&format!("n{number}"), "newer", RETRIED + 2 + number)).await?;
                number += 64;
            }
            Ok::<(), bayard::client::ClientError>(())
        }));
    }
    for task in tasks {
        task.await.expect("task").expect("every newer put is answered");
    }

    let retry = client.send_write(put("r", "first", RETRIED)).await.expect("the retry is answered");
    assert!(retry.duplicate, "a retry after {NEWER} newer requests was applied again");
    assert_eq!(retry.applied_index, first.applied_index, "answered with the first attempt's outcome");
    client.commit().await.expect("commit");
    // (A process-wide gauge: other tests' nodes set it too, so only its presence is checked.)
    let metrics = bayard::telemetry::metrics::render().expect("metrics");
    assert!(metrics.contains("bayard_remembered_requests "), "the remembered requests are a metric");
    node.shutdown().await;

    // After a restart the table comes back from the commit marker, clock and all.
    let node = common::start_node(common::node_config(&certificates, 1, data.path())).await;
    let client = common::client_with(&node.local_address().to_string(), certificates.client("app"));
    let retry = client.send_write(put("r", "first", RETRIED)).await.expect("the retry is answered");
    assert!(retry.duplicate, "after a restart, the retry was applied again");
    client.commit().await.expect("commit");
    let r = client.get("r").await.expect("get").expect("r exists");
    assert!(r.fields.to_string().contains("second"), "a retry reverted a newer write: {}", r.fields);
    assert_eq!(client.status().await.expect("status").document_count, 1 + NEWER as u64);
    node.shutdown().await;
}
