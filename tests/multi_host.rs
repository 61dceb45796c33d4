//! Clusters on real hosts: every node in its own network namespace with its own address, all on
//! the same port, joined by a bridge (see `common/netns.rs`). Needs root and iproute2; elsewhere
//! the tests print `skipping: …` and pass (set BAYARD_NETNS_REQUIRED=1 to make that a failure).

#[path = "common/netns.rs"]
mod netns;

use std::path::Path;
use std::time::{Duration, Instant};

use netns::{poll, NamespacedProcess, Network};

/// The same port on every host.
const PORT: u16 = 5001;
const SETTLE: Duration = Duration::from_secs(60);
const ELECTION: Duration = Duration::from_secs(30);

/// Runs `bayard <command> <admin flags for servers>` inside `host`.
fn call(
    network: &Network,
    directory: &Path,
    host: usize,
    command: &[&str],
    servers: &[usize],
) -> Result<serde_json::Value, String> {
    let mut arguments: Vec<String> = command.iter().map(|part| part.to_string()).collect();
    arguments.extend(Network::admin_arguments(&network.servers(servers, PORT)));
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    network.json(host, &arguments, directory)
}

/// Like [`call`], for a command that must succeed.
fn must(network: &Network, directory: &Path, host: usize, command: &[&str], servers: &[usize]) -> serde_json::Value {
    call(network, directory, host, command, servers).unwrap_or_else(|error| panic!("{error}"))
}

/// Node 1 starts the cluster on host 1, nodes 2 and 3 join through it from hosts 2 and 3; returns
/// once `peers` (asked inside host 1) lists all three at their advertised addresses and `status`
/// shows three live voters.
fn start_cluster(network: &Network, directory: &Path) -> Vec<NamespacedProcess> {
    network.make_certificates(directory);
    let mut nodes = vec![network.spawn(1, &network.serve_arguments(1, PORT, &[]), directory)];
    let joiners_started = Instant::now();
    for number in [2, 3] {
        nodes.push(network.spawn(number, &network.serve_arguments(number, PORT, &[1]), directory));
    }
    for node in &nodes {
        assert_eq!(node.local_address, format!("0.0.0.0:{PORT}"), "every node binds the same port on its own host");
    }
    let expected = serde_json::json!({
        "1": format!("{}:{PORT}", network.address(1)),
        "2": format!("{}:{PORT}", network.address(2)),
        "3": format!("{}:{PORT}", network.address(3)),
    });
    let mut last = String::new();
    let formed = poll(SETTLE, || {
        let peers = call(network, directory, 1, &["peers", "--timeout", "5s"], &[1]);
        let status = call(network, directory, 1, &["status", "--timeout", "5s"], &[1]);
        let settled = peers.as_ref().is_ok_and(|peers| peers == &expected)
            && status.as_ref().is_ok_and(|status| {
                status["nodes"].as_array().is_some_and(|nodes| {
                    nodes.len() == 3 && nodes.iter().all(|node| node["role"] == "voter" && node["state"] == "alive")
                })
            });
        last = format!("peers: {peers:?}; status: {status:?}");
        settled
    });
    let formed = formed.unwrap_or_else(|| {
        let logs: Vec<String> = nodes.iter().map(|node| node.logs_tail(20)).collect();
        panic!("the cluster did not form within {SETTLE:?}; last answers: {last}\nlogs:\n{}", logs.join("\n---\n"))
    });
    eprintln!(
        "cluster of 3 hosts formed {} ms after the last check began; {} ms from starting the two joining processes to both being voters",
        formed.as_millis(),
        joiners_started.elapsed().as_millis()
    );
    nodes
}

/// How many documents `query` finds on the node of `host`, asked inside `host` (local consistency).
fn local_count(network: &Network, directory: &Path, host: usize, query: &str) -> Result<u64, String> {
    let result = call(network, directory, host, &["search", "--timeout", "5s", query], &[host])?;
    result["count"].as_u64().ok_or_else(|| format!("no count in {result}"))
}

#[test]
fn three_hosts_same_port_form_a_cluster() {
    let Some(network) = netns::network_or_skip("three_hosts_same_port_form_a_cluster", 3) else { return };
    let directory = tempfile::tempdir().expect("temp dir");
    let root = directory.path();
    let _nodes = start_cluster(&network, root);

    let put = must(&network, root, 3, &["put", "--id", "1", r#"{"title":"hello"}"#], &[3]);
    assert_eq!(put["operations"], 1, "the put through host 3 wrote one document: {put}");
    must(&network, root, 3, &["commit"], &[3]);

    let mut last = Err(String::new());
    let found = poll(SETTLE, || {
        last = local_count(&network, root, 2, "title:hello");
        last == Ok(1)
    });
    let found = found.unwrap_or_else(|| panic!("host 2 never found the document written through host 3: {last:?}"));
    eprintln!("write through host 3 searchable on host 2 after {} ms", found.as_millis());
}

#[test]
fn cut_link_isolates_a_host() {
    let Some(network) = netns::network_or_skip("cut_link_isolates_a_host", 3) else { return };
    let directory = tempfile::tempdir().expect("temp dir");
    let root = directory.path();
    let nodes = start_cluster(&network, root);

    let status = must(&network, root, 1, &["status"], &[1]);
    let old_leader = status["leader"].as_u64().unwrap_or_else(|| panic!("no leader in {status}")) as usize;
    let old_term = status["term"].as_u64().unwrap_or_else(|| panic!("no term in {status}"));
    let survivors: Vec<usize> = (1..=3).filter(|host| *host != old_leader).collect();
    eprintln!("leader is node {old_leader} (term {old_term}); cutting host {old_leader} off");

    // Writes acknowledged before the cut must all survive it.
    for number in 0..20 {
        must(
            &network,
            root,
            1,
            &["put", "--id", &format!("before-{number}"), r#"{"title":"before the partition"}"#],
            &[1, 2, 3],
        );
    }
    must(&network, root, 1, &["commit"], &[1, 2, 3]);

    network.cut(old_leader);
    let cut_at = Instant::now();

    // The two others elect a new leader among themselves (watched from one of them) and accept a
    // write (tried through both of them from the moment of the cut), both timed from the cut.
    let (election, write) = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut last = Err(String::new());
            let elected = poll(ELECTION, || {
                last = call(&network, root, survivors[0], &["status", "--timeout", "2s"], &[survivors[0]]);
                last.as_ref().is_ok_and(|status| {
                    status["leader"].as_u64().is_some_and(|leader| survivors.contains(&(leader as usize)))
                })
            });
            (elected.map(|_| cut_at.elapsed()), last)
        });
        let mut last = Err(String::new());
        let written = poll(ELECTION, || {
            last = call(
                &network,
                root,
                survivors[1],
                &["put", "--timeout", "2s", "--id", "after-cut", r#"{"title":"written while the leader was cut off"}"#],
                &[survivors[1], survivors[0]],
            );
            last.is_ok()
        });
        (watcher.join().expect("the election watcher panicked"), (written.map(|_| cut_at.elapsed()), last))
    });
    let (Some(elected_after), new_status) = election else {
        panic!(
            "hosts {survivors:?} did not elect a new leader within {ELECTION:?} of cutting host {old_leader}: {:?}",
            election.1
        )
    };
    let new_status = new_status.expect("the last status succeeded");
    let new_leader = new_status["leader"].as_u64().unwrap();
    assert!(new_status["term"].as_u64().unwrap() > old_term, "a new election raises the term: {new_status}");
    let (Some(written_after), receipt) = write else {
        panic!("the majority {survivors:?} accepted no write within {ELECTION:?} of the cut: {:?}", write.1)
    };
    let receipt = receipt.expect("the last put succeeded");
    assert_eq!(receipt["operations"], 1, "the put wrote one document: {receipt}");
    eprintln!(
        "cut of the leader's host (node {old_leader}) to a new leader (node {new_leader}) seen: {} ms; to the first \
         accepted write on the majority: {} ms",
        elected_after.as_millis(),
        written_after.as_millis()
    );
    must(&network, root, survivors[1], &["commit"], &survivors);

    // The minority refuses writes: the old leader, asked on its own loopback, cannot commit one.
    let mut minority = vec!["put".to_string(), "--timeout".into(), "5s".into(), "--id".into(), "minority".into()];
    minority.push(r#"{"title":"written to the minority"}"#.into());
    minority.extend(Network::admin_arguments(&format!("127.0.0.1:{PORT}")));
    let minority: Vec<&str> = minority.iter().map(String::as_str).collect();
    let refused = network.run(old_leader, &minority, root);
    assert!(!refused.status.success(), "the minority accepted a write: {}", String::from_utf8_lossy(&refused.stdout));
    eprintln!("minority write refused: {}", String::from_utf8_lossy(&refused.stderr).trim());

    // The cut is real, both ways: the isolated host reaches nobody, and nobody reaches it.
    let outward = call(&network, root, old_leader, &["status", "--timeout", "2s"], &[survivors[0]]);
    assert!(outward.is_err(), "host {old_leader} is cut off but reached host {}: {outward:?}", survivors[0]);
    let inward = call(&network, root, survivors[1], &["status", "--timeout", "2s"], &[old_leader]);
    assert!(inward.is_err(), "host {old_leader} is cut off but host {} reached it: {inward:?}", survivors[1]);

    for host in &survivors {
        let mut last = Err(String::new());
        let found = poll(SETTLE, || {
            last = local_count(&network, root, *host, "title:cut");
            last == Ok(1)
        });
        assert!(found.is_some(), "host {host} of the majority never found the write: {last:?}");
    }

    network.restore(old_leader);
    let restored_at = Instant::now();
    let mut last = Err(String::new());
    let caught_up = poll(SETTLE, || {
        last = local_count(&network, root, old_leader, "title:cut");
        last == Ok(1)
    });
    assert!(
        caught_up.is_some(),
        "the old leader (host {old_leader}) did not catch up within {SETTLE:?} of the restore: {last:?}\nits logs:\n{}",
        nodes[old_leader - 1].logs_tail(40)
    );
    eprintln!("old leader caught up {} ms after the restore", restored_at.elapsed().as_millis());

    // Nothing acknowledged was lost, and the refused write appears nowhere.
    for host in 1..=3 {
        let mut last = Err(String::new());
        let complete = poll(SETTLE, || {
            last = local_count(&network, root, host, "title:partition");
            last == Ok(20)
        });
        assert!(complete.is_some(), "host {host} lost writes acknowledged before the partition: {last:?}");
        assert_eq!(local_count(&network, root, host, "title:minority"), Ok(0), "host {host} holds a refused write");
    }

    // It has moved on to the new term.
    let status = must(&network, root, old_leader, &["status"], &[old_leader]);
    assert!(status["term"].as_u64().unwrap() > old_term, "the old leader is still in term {old_term}: {status}");
}
