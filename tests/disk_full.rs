//! A full disk refuses writes with a clear error, keeps serving reads, reports not ready, and
//! recovers by itself once space is free. The data directory lives on a small tmpfs that the test
//! mounts (root only: skipped with a message elsewhere, required in CI).

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bayard::client::ClientError;
use bayard::index::SearchRequest;
use bayard::protocol::{Consistency, ErrorCode};
use common::{client_with, eventually, node_config, start_node, CertificateSet};

/// A tmpfs mounted for the test, unmounted when dropped.
struct SmallFileSystem {
    directory: tempfile::TempDir,
}

impl SmallFileSystem {
    fn mount(megabytes: u64) -> Result<Self, String> {
        let directory = tempfile::tempdir().map_err(|error| error.to_string())?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(directory.path())
            .status()
            .map_err(|error| format!("cannot run mount: {error}"))?;
        if !status.success() {
            return Err(format!("mount -t tmpfs failed ({status}); this test needs root"));
        }
        Ok(SmallFileSystem { directory })
    }

    fn path(&self) -> &Path {
        self.directory.path()
    }
}

impl Drop for SmallFileSystem {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.directory.path()).status();
    }
}

fn http_get(address: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    Some((head.split(' ').nth(1)?.parse().ok()?, body.to_string()))
}

/// Fills the file system until `keep` bytes are left.
fn fill(directory: &Path, keep: u64) -> std::path::PathBuf {
    let path = directory.join("filler");
    let available = bayard::node::disk::available_bytes(directory).unwrap();
    let size = available.saturating_sub(keep);
    let mut file = std::fs::File::create(&path).unwrap();
    let block = vec![0xa5_u8; 1 << 20];
    let mut written = 0;
    while written < size {
        let chunk = (size - written).min(block.len() as u64) as usize;
        file.write_all(&block[..chunk]).unwrap();
        written += chunk as u64;
    }
    file.sync_all().unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_serves_reads_and_recovers() {
    let file_system = match SmallFileSystem::mount(96) {
        Ok(file_system) => file_system,
        Err(reason) if std::env::var_os("BAYARD_NETNS_REQUIRED").is_none() => {
            eprintln!("SKIPPED a_full_disk_refuses_writes_serves_reads_and_recovers: {reason}");
            return;
        }
        Err(reason) => panic!("{reason} (BAYARD_NETNS_REQUIRED is set: root tests must run)"),
    };
    let certificates = CertificateSet::new();
    let mut config = node_config(&certificates, 1, &file_system.path().join("data"));
    config.limits.min_free_disk_bytes = 32 * 1024 * 1024;
    config.metrics_address = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let node = start_node(config).await;
    let metrics = node.metrics_address().unwrap();
    let client = client_with(&node.local_address().to_string(), certificates.client("app"));
    client.put("before", r#"{"title":"written before the disk filled"}"#).await.unwrap();
    client.commit().await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            http_get(metrics, "/readyz").is_some_and(|(status, _)| status == 200)
        })
        .await
    );

    // Leave 8 MiB: under the 32 MiB margin.
    let filler = fill(file_system.path(), 8 * 1024 * 1024);
    let refused = eventually(Duration::from_secs(10), || async {
        // Probes written before the node noticed (it looks once a second) are fine.
        matches!(
            client.put("probe", r#"{"title":"x"}"#).await,
            Err(ClientError::Remote { code: ErrorCode::ResourceExhausted, .. })
        )
    })
    .await;
    assert!(refused, "writes are refused once the disk is full");
    let message = match client.put("during", r#"{"title":"x"}"#).await {
        Err(ClientError::Remote { message, .. }) => message,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(message.contains("disk full on node 1") && message.contains("--min-free-disk-mb"), "{message}");
    // Reads are served; readiness says why it is not ready; the metric says so.
    let hits = client
        .search(SearchRequest { query: "title:disk".into(), limit: 10, ..Default::default() }, Consistency::Local)
        .await
        .unwrap();
    assert_eq!(hits.count, Some(1));
    assert!(client.get("before").await.unwrap().is_some());
    let (status, body) = http_get(metrics, "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("disk full"), "{body}");
    let (_, text) = http_get(metrics, "/metrics").unwrap();
    assert!(text.lines().any(|line| line == "bayard_disk_full 1"), "no bayard_disk_full 1 in the metrics");

    // Space comes back: writes are accepted again, without a restart.
    std::fs::remove_file(filler).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async { client.put("after", r#"{"title":"after"}"#).await.is_ok() })
            .await,
        "writes resume once space is free"
    );
    client.commit().await.unwrap();
    assert!(client.get("after").await.unwrap().is_some());
    assert!(client.get("during").await.unwrap().is_none(), "a refused write was not applied");
    assert!(
        eventually(Duration::from_secs(10), || async {
            http_get(metrics, "/readyz").is_some_and(|(status, _)| status == 200)
        })
        .await
    );
    node.shutdown().await;
}
