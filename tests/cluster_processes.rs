//! The cluster walkthrough as an operator runs it, with real `bayard` processes on loopback: three
//! nodes, `peers`, `status`, writes through any node, `leave`, a new node joining, the quorum guard,
//! and SIGKILL of the leader under a stream of writes with every acknowledged write surviving.

#[path = "common/process.rs"]
mod process;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use bayard::client::{Client, ClientOptions};
use bayard::transport::TlsFiles;
use process::{eventually_blocking, failure, free_udp_port, json, ServeProcess};

const SETTLE: Duration = Duration::from_secs(60);

fn make_certificates(root: &Path, node_ids: &[u64]) {
    json(root, &["certs", "ca", "--out-dir", "certs"], None);
    for node_id in node_ids {
        json(root, &["certs", "node", "--id", &node_id.to_string(), "--out-dir", "certs"], None);
    }
    json(root, &["certs", "admin", "--name", "ops", "--out-dir", "certs"], None);
}

fn serve_arguments(node_id: u64, host: &str, port: u16, peers: &str) -> Vec<String> {
    let mut arguments: Vec<String> = [
        "--id",
        &node_id.to_string(),
        "--host",
        host,
        "--port",
        &port.to_string(),
        "--data-directory",
        &format!("data/{node_id}"),
        "--ca",
        "certs/ca.pem",
        "--cert",
        &format!("certs/node-{node_id}.pem"),
        "--key",
        &format!("certs/node-{node_id}.key"),
    ]
    .iter()
    .map(|part| part.to_string())
    .collect();
    if !peers.is_empty() {
        arguments.push("--peers".to_string());
        arguments.push(peers.to_string());
    }
    arguments
}

/// Client flags for the admin certificate.
fn admin(servers: &str) -> Vec<String> {
    ["--servers", servers, "--ca", "certs/ca.pem", "--cert", "certs/admin-ops.pem", "--key", "certs/admin-ops.key"]
        .iter()
        .map(|part| part.to_string())
        .collect()
}

fn call(root: &Path, command: &[&str], servers: &str) -> serde_json::Value {
    let mut arguments: Vec<String> = command.iter().map(|part| part.to_string()).collect();
    arguments.extend(admin(servers));
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    json(root, &arguments, None)
}

fn call_failing(root: &Path, command: &[&str], servers: &str) -> String {
    let mut arguments: Vec<String> = command.iter().map(|part| part.to_string()).collect();
    arguments.extend(admin(servers));
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    failure(root, &arguments, None)
}

fn peer_ids(root: &Path, servers: &str) -> BTreeSet<String> {
    let peers = call(root, &["peers"], servers);
    peers.as_object().map(|object| object.keys().cloned().collect()).unwrap_or_default()
}

fn wait_for_peers(root: &Path, servers: &str, expected: &[&str]) {
    let expected: BTreeSet<String> = expected.iter().map(|id| id.to_string()).collect();
    let settled = eventually_blocking(SETTLE, || {
        peer_ids(root, servers) == expected && {
            let status = call(root, &["status"], servers);
            status["nodes"].as_array().is_some_and(|nodes| {
                nodes.len() == expected.len()
                    && nodes.iter().all(|node| node["role"] == "voter" && node["state"] == "alive")
            })
        }
    });
    assert!(settled, "members never became {expected:?}: {}", call(root, &["status"], servers));
}

#[test]
fn three_node_walkthrough_peers_status_leave_and_rejoin() {
    let directory = tempfile::tempdir().unwrap();
    let root = directory.path();
    make_certificates(root, &[1, 2, 3, 4]);
    let ports: Vec<u16> = (0..4).map(|_| free_udp_port()).collect();
    let (p1, p2, p3, p4) = (ports[0], ports[1], ports[2], ports[3]);

    let _node1 = ServeProcess::start(root, &serve_arguments(1, "0.0.0.0", p1, ""));
    let mut node2 = ServeProcess::start(root, &serve_arguments(2, "0.0.0.0", p2, &format!("1=0.0.0.0:{p1}")));
    let mut node3 =
        ServeProcess::start(root, &serve_arguments(3, "0.0.0.0", p3, &format!("1=0.0.0.0:{p1},2=0.0.0.0:{p2}")));
    let seed = format!("localhost:{p1}");
    wait_for_peers(root, &seed, &["1", "2", "3"]);

    // The exact `peers` output of the walkthrough.
    let peers = call(root, &["peers"], &seed);
    assert_eq!(
        peers,
        serde_json::json!({"1": format!("0.0.0.0:{p1}"), "2": format!("0.0.0.0:{p2}"), "3": format!("0.0.0.0:{p3}")})
    );
    let status = call(root, &["status"], &seed);
    assert_eq!(status["status"], "OK");
    assert!(status["leader"].as_u64().is_some());
    assert!(status["term"].as_u64().unwrap() >= 1);
    assert_eq!(status["nodes"][2]["id"], 3);
    assert_eq!(status["nodes"][2]["address"], format!("0.0.0.0:{p3}"));

    // Writes through any node are searchable on every node.
    let via_node3 = format!("127.0.0.1:{p3}");
    call(root, &["put", "--id", "w1", r#"{"title":"written through node three"}"#], &via_node3);
    call(root, &["commit"], &via_node3);
    for port in [p1, p2, p3] {
        let servers = format!("127.0.0.1:{port}");
        let found = eventually_blocking(SETTLE, || call(root, &["search", "title:three"], &servers)["count"] == 1);
        assert!(found, "node on port {port} never saw the write");
    }
    let linearizable = call(root, &["search", "--consistency", "linearizable", "title:three"], &via_node3);
    assert_eq!(linearizable["count"], 1);
    assert_eq!(linearizable["node_id"], status["leader"]);

    // Node 3 leaves: it stops serving and says why.
    let left = call(root, &["leave", "--id", "3"], &format!("127.0.0.1:{p1}"));
    assert_eq!(left["status"], "OK");
    let exit = node3.wait_for_exit(SETTLE).expect("node 3 stops after leaving");
    assert!(exit.success(), "leaving is not a failure: {exit}");
    assert!(node3.logs().contains("no longer a member"), "{}", node3.logs());
    wait_for_peers(root, &seed, &["1", "2"]);
    // Its data directory does not serve again.
    let mut restart_arguments = vec!["serve".to_string()];
    restart_arguments.extend(serve_arguments(3, "0.0.0.0", p3, ""));
    let restart_arguments: Vec<&str> = restart_arguments.iter().map(String::as_str).collect();
    let restart = process::run(root, &restart_arguments, None);
    assert!(!restart.status.success());
    assert!(String::from_utf8_lossy(&restart.stderr).contains("node 3 was removed from the cluster"));

    // A fresh node with a new id joins through a non-leader seed or the leader alike.
    let mut node4 = ServeProcess::start(root, &serve_arguments(4, "0.0.0.0", p4, &format!("2=0.0.0.0:{p2}")));
    wait_for_peers(root, &seed, &["1", "2", "4"]);
    assert!(eventually_blocking(SETTLE, || call(root, &["search", "title:three"], &format!("127.0.0.1:{p4}"))
        ["count"]
        == 1));

    // Quorum guard: with node 2 down, removing node 4 would leave {1, 2} with one voter answering.
    node2.kill();
    let refused = call_failing(root, &["leave", "--id", "4"], &format!("127.0.0.1:{p1},127.0.0.1:{p4}"));
    assert!(refused.contains("quorum") && refused.contains("--force"), "{refused}");
    // Node 2 comes back with the same flags: it resumes, it does not join again.
    let node2 = node2.restart();
    wait_for_peers(root, &seed, &["1", "2", "4"]);
    assert!(node2.logs().contains("resuming from the data directory"));
    call(root, &["leave", "--id", "4"], &format!("127.0.0.1:{p1},127.0.0.1:{p2}"));
    assert!(node4.wait_for_exit(SETTLE).is_some(), "node 4 keeps running after leaving");
    wait_for_peers(root, &seed, &["1", "2"]);
}

fn library_client(root: &Path, servers: Vec<String>) -> Client {
    let tls = TlsFiles {
        ca_certificate: root.join("certs/ca.pem"),
        certificate: root.join("certs/admin-ops.pem"),
        private_key: root.join("certs/admin-ops.key"),
    };
    let mut options = ClientOptions::new(servers, tls);
    options.request_timeout = Duration::from_secs(10);
    options.connect_timeout = Duration::from_secs(1);
    options.retry_rounds = 6;
    Client::connect(options).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_sigkill_of_the_leader() {
    let directory = tempfile::tempdir().unwrap();
    let root = directory.path().to_path_buf();
    make_certificates(&root, &[1, 2, 3]);
    let ports: Vec<u16> = (0..3).map(|_| free_udp_port()).collect();
    let mut nodes = vec![ServeProcess::start(&root, &serve_arguments(1, "127.0.0.1", ports[0], ""))];
    let seed = format!("1=127.0.0.1:{}", ports[0]);
    nodes.push(ServeProcess::start(&root, &serve_arguments(2, "127.0.0.1", ports[1], &seed)));
    nodes.push(ServeProcess::start(&root, &serve_arguments(3, "127.0.0.1", ports[2], &seed)));
    let addresses: Vec<String> = ports.iter().map(|port| format!("127.0.0.1:{port}")).collect();
    let client = library_client(&root, addresses.clone());
    let mut formed = false;
    let forming = Instant::now();
    while !formed && forming.elapsed() < SETTLE {
        formed = client
            .status()
            .await
            .is_ok_and(|status| status.members.len() == 3 && status.members.iter().all(|m| m.state == "alive"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(formed, "the cluster did not form");

    let leader = client.status().await.unwrap().leader.expect("a leader");
    let leader_position = (leader - 1) as usize;
    let mut acknowledged = Vec::new();
    let mut killed_at: Option<Instant> = None;
    let mut first_write_after_kill: Option<Duration> = None;
    let mut new_leader_elected = None;
    let started = Instant::now();
    // A bounded stream of writes: 300 puts or 90 s, whichever comes first.
    for number in 0..300_u32 {
        if started.elapsed() > Duration::from_secs(90) {
            break;
        }
        if number == 100 {
            nodes[leader_position].kill();
            let killed = Instant::now();
            killed_at = Some(killed);
            // Watch a surviving node for the new leader, to tell election time from client failover.
            let survivor = addresses[(leader_position + 1) % addresses.len()].clone();
            let watcher = library_client(&root, vec![survivor]);
            new_leader_elected = Some(tokio::spawn(async move {
                while killed.elapsed() < SETTLE {
                    if let Ok(status) = watcher.status().await {
                        if status.leader.is_some_and(|new_leader| new_leader != leader) {
                            return Some(killed.elapsed());
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                None
            }));
        }
        let id = format!("k{number}");
        match client.put(&id, &format!(r#"{{"title":"write {number}","year":{number}}}"#)).await {
            Ok(_) => {
                if let (Some(killed), None) = (killed_at, first_write_after_kill) {
                    first_write_after_kill = Some(killed.elapsed());
                }
                acknowledged.push(id);
            }
            Err(error) => eprintln!("write {number} not acknowledged: {error}"),
        }
    }
    let failover = first_write_after_kill.expect("writes resumed after the leader was killed");
    let election = new_leader_elected.expect("watcher started").await.unwrap().expect("a new leader was elected");
    eprintln!(
        "leader kill to new leader: {} ms; to first accepted write: {} ms",
        election.as_millis(),
        failover.as_millis()
    );
    assert!(failover < Duration::from_secs(15), "failover took {failover:?}");
    assert!(acknowledged.len() >= 250, "only {} writes acknowledged", acknowledged.len());
    client.commit().await.unwrap();

    // Every acknowledged write is on every surviving node, and on the killed one once restarted.
    nodes[leader_position] = nodes[leader_position].restart();
    for address in &addresses {
        let node = library_client(&root, vec![address.clone()]);
        let caught_up = bayard_wait(&node, acknowledged.len() as u64).await;
        assert!(caught_up, "{address} does not hold all {} acknowledged writes", acknowledged.len());
        for id in &acknowledged {
            assert!(node.get(id).await.unwrap().is_some(), "{address} lost acknowledged write {id}");
        }
    }
}

/// Waits (bounded) until the node's committed index holds at least `count` documents.
async fn bayard_wait(client: &Client, count: u64) -> bool {
    let request = bayard::index::SearchRequest { query: "*".into(), exclude_docs: true, ..Default::default() };
    let started = Instant::now();
    while started.elapsed() < SETTLE {
        if let Ok(result) = client.search(request.clone(), bayard::protocol::Consistency::Local).await {
            if result.count >= Some(count) {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}
