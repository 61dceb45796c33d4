//! Fault injection, Jepsen-style: three `bayard` processes, each on its own host (a network
//! namespace the test makes), and concurrent writers on a fourth host that record every
//! operation as invoked / ok / failed / unknown. Each round injects one fault — SIGKILL of the
//! leader or of a follower then a restart, SIGSTOP of the leader for a few seconds, a cut of the
//! leader's or a follower's link then a restore, a rolling restart of every node — and measures
//! the time from the fault to the first acknowledged write. At the end everything is healed and
//! checked on every node: every acknowledged write present, nothing present that was never
//! invoked, all replicas the same, one leader and everyone alive, a follower can leave, and a
//! linearizable search after an acknowledged commit misses nothing.
//!
//! `BAYARD_CHAOS_ROUNDS` sets the number of rounds (CI runs one round of each fault; `just chaos
//! ROUNDS=100` runs long), `BAYARD_CHAOS_FAULTS` which faults (`kill-leader,cut-leader`, … see
//! `Fault::key`). To see why a round was slow: `BAYARD_CHAOS_DUMP=1` prints each node's
//! election lines after every round (`BAYARD_CHAOS_LOGS=<dir>` writes every node's whole log
//! there after each round), and `BAYARD_TEST_RUST_LOG=info,openraft=info` makes the
//! nodes log them. Needs root for the namespaces: skipped with a message otherwise, and a
//! failure when `BAYARD_NETNS_REQUIRED` is set (CI sets it).

#[path = "common/netns.rs"]
mod netns;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bayard::client::{Client, ClientError, ClientOptions};
use bayard::index::SearchRequest;
use bayard::protocol::Consistency;
use bayard::transport::TlsFiles;
use netns::{NamespacedProcess, Network};

const PORT: u16 = 5001;
const NODES: usize = 3;
/// The writers' host.
const CLIENT_HOST: usize = 4;
const WRITERS: usize = 3;
/// How long a fault is held (a stopped or cut leader stays so; a killed node stays dead).
const FAULT_HELD: Duration = Duration::from_secs(3);
/// Upper bound for anything to recover: past it the round fails.
const RECOVERY_LIMIT: Duration = Duration::from_secs(20);
const SETTLE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillLeader,
    KillFollower,
    StopLeader,
    CutLeader,
    CutFollower,
    RollingRestart,
}

const FAULTS: [Fault; 6] = [
    Fault::KillLeader,
    Fault::KillFollower,
    Fault::StopLeader,
    Fault::CutLeader,
    Fault::CutFollower,
    Fault::RollingRestart,
];

impl Fault {
    /// The short name `BAYARD_CHAOS_FAULTS` takes.
    fn key(self) -> &'static str {
        match self {
            Fault::KillLeader => "kill-leader",
            Fault::KillFollower => "kill-follower",
            Fault::StopLeader => "stop-leader",
            Fault::CutLeader => "cut-leader",
            Fault::CutFollower => "cut-follower",
            Fault::RollingRestart => "rolling-restart",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Fault::KillLeader => "SIGKILL leader",
            Fault::KillFollower => "SIGKILL follower",
            Fault::StopLeader => "SIGSTOP leader",
            Fault::CutLeader => "leader's link cut",
            Fault::CutFollower => "follower's link cut",
            Fault::RollingRestart => "rolling restart (per node)",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// The node answered with an error: not applied.
    Failed,
    /// No answer: applied or not.
    Unknown,
}

#[derive(Debug, Clone)]
struct Operation {
    id: String,
    invoked: Instant,
    completed: Instant,
    outcome: Outcome,
}

/// Every operation of every writer.
#[derive(Default)]
struct History {
    operations: Mutex<Vec<Operation>>,
}

impl History {
    /// When the first write invoked at or after `since` was acknowledged.
    fn first_ack_after(&self, since: Instant) -> Option<Instant> {
        let operations = self.operations.lock().unwrap();
        operations
            .iter()
            .filter(|operation| operation.outcome == Outcome::Ok && operation.invoked >= since)
            .map(|operation| operation.completed)
            .min()
    }
}

/// A UDP socket bound inside the namespace `namespace`, on a thread that entered it (the
/// socket stays in that namespace; the thread ends).
fn socket_in_namespace(namespace: &str) -> std::net::UdpSocket {
    let path = format!("/run/netns/{namespace}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|error| panic!("cannot open {path}: {error}"));
        use std::os::fd::AsRawFd;
        // SAFETY: setns on this thread only, with a namespace file descriptor we own.
        let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns into {path}: {}", std::io::Error::last_os_error());
        std::net::UdpSocket::bind("0.0.0.0:0").expect("bind a socket in the client host")
    })
    .join()
    .expect("the namespace thread")
}

struct Chaos {
    network: Network,
    directory: tempfile::TempDir,
    nodes: BTreeMap<usize, NamespacedProcess>,
}

impl Chaos {
    fn servers(&self) -> Vec<String> {
        (1..=NODES).map(|number| format!("{}:{PORT}", self.network.address(number))).collect()
    }

    fn root(&self) -> &Path {
        self.directory.path()
    }

    fn client(&self, servers: Vec<String>, timeout: Duration) -> Client {
        let root = self.root();
        let tls = TlsFiles {
            ca_certificate: root.join("certs/ca.pem"),
            certificate: root.join("certs/admin-ops.pem"),
            private_key: root.join("certs/admin-ops.key"),
        };
        let mut options = ClientOptions::new(servers, tls);
        options.request_timeout = timeout;
        options.retry_rounds = 3;
        let socket = socket_in_namespace(&self.network.host(CLIENT_HOST).namespace);
        Client::on_socket(options, socket).expect("client")
    }

    /// The leader every answering node agrees on, waited for.
    async fn leader(&self) -> usize {
        let deadline = Instant::now() + SETTLE;
        while Instant::now() < deadline {
            let mut seen = BTreeSet::new();
            let mut answered = 0;
            for server in self.servers() {
                let status = self.client(vec![server], Duration::from_secs(1)).status().await;
                if let Ok(status) = status {
                    answered += 1;
                    seen.insert(status.leader);
                }
            }
            if answered == NODES && seen.len() == 1 {
                if let Some(Some(leader)) = seen.into_iter().next() {
                    return leader as usize;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the nodes did not agree on a leader within {SETTLE:?}");
    }

    /// Every node answers, names one leader and sees every member alive.
    async fn wait_healthy(&self) {
        let deadline = Instant::now() + SETTLE;
        let leader = self.leader().await;
        while Instant::now() < deadline {
            let status = self.client(vec![self.servers()[leader - 1].clone()], Duration::from_secs(1)).status().await;
            if status.is_ok_and(|status| {
                status.members.len() == NODES && status.members.iter().all(|member| member.state == "alive")
            }) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the cluster did not become healthy within {SETTLE:?}");
    }

    fn kill(&mut self, number: usize) {
        self.nodes.get_mut(&number).expect("node runs").kill();
    }

    fn restart(&mut self, number: usize) {
        let restarted = self.nodes[&number].restart();
        self.nodes.insert(number, restarted);
    }

    fn signal(&self, number: usize, signal: libc::c_int) {
        let pid = self.nodes[&number].pid() as libc::pid_t;
        // SAFETY: a signal to a child process this test started and still owns.
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(sent, 0, "kill({pid}, {signal}): {}", std::io::Error::last_os_error());
    }

    /// Polls `observer` (a node that stays up) until it names a leader other than `old`: the
    /// election's share of a failover.
    fn watch_election(&self, observer: usize, old: usize, fault: Instant) -> tokio::task::JoinHandle<Option<Duration>> {
        let client = self.client(vec![self.servers()[observer - 1].clone()], Duration::from_millis(500));
        tokio::spawn(async move {
            while fault.elapsed() < RECOVERY_LIMIT {
                if let Ok(status) = client.status().await {
                    if status.leader.is_some_and(|leader| leader as usize != old) {
                        return Some(fault.elapsed());
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            None
        })
    }

    /// Waits until a write invoked after `fault` is acknowledged; the time it took.
    async fn recovery(&self, history: &History, fault: Instant) -> Duration {
        let deadline = fault + RECOVERY_LIMIT;
        while Instant::now() < deadline {
            if let Some(acknowledged) = history.first_ack_after(fault) {
                return acknowledged - fault;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut logs = String::new();
        for (number, node) in &self.nodes {
            logs.push_str(&format!("---- node {number}, last log lines:\n{}\n", node.logs_tail(60)));
        }
        panic!("no write was acknowledged within {RECOVERY_LIMIT:?} of the fault\n{logs}");
    }
}

/// Years of one writer's documents: writer `w` writes years from `w * YEARS_PER_WRITER` on.
const YEARS_PER_WRITER: u64 = 10_000_000;
/// Documents read back per search.
const PAGE: u64 = 5_000;

/// One writer: puts of unique ids, one after the other, until `stop`.
async fn write_until(client: Client, writer: usize, history: Arc<History>, stop: Arc<AtomicBool>) {
    let mut sequence = 0_u64;
    // Bounded whatever happens: at most a million writes.
    while !stop.load(Ordering::Relaxed) && sequence < 1_000_000 {
        let id = format!("w{writer}-{sequence}");
        let invoked = Instant::now();
        // The year is unique per operation, so the check below can read every document back in
        // ranges of it.
        let year = writer as u64 * YEARS_PER_WRITER + sequence;
        let result = client.put(&id, &format!(r#"{{"title":"chaos {writer}","year":{year}}}"#)).await;
        let outcome = match result {
            Ok(_) => Outcome::Ok,
            Err(ClientError::Remote { code, .. }) if code != bayard::protocol::ErrorCode::Unavailable => {
                Outcome::Failed
            }
            Err(_) => Outcome::Unknown,
        };
        history.operations.lock().unwrap().push(Operation { id, invoked, completed: Instant::now(), outcome });
        sequence += 1;
    }
}

/// The document ids a node holds in the writers' year ranges (read in ranges of years, up to
/// `operations_per_writer` per writer), and how many documents it holds in all: more in all
/// than in the ranges means documents nobody wrote.
async fn ids_on(client: &Client, operations_per_writer: u64) -> (BTreeSet<String>, u64) {
    let mut ids = BTreeSet::new();
    for writer in 0..WRITERS as u64 {
        let mut start = 0;
        while start < operations_per_writer {
            let (low, high) = (writer * YEARS_PER_WRITER + start, writer * YEARS_PER_WRITER + start + PAGE - 1);
            let request = SearchRequest {
                query: format!("year:[{low} TO {high}]"),
                limit: PAGE as usize,
                exclude_count: true,
                ..Default::default()
            };
            let page = client.search(request, Consistency::Local).await.expect("search a node");
            ids.extend(page.docs.into_iter().map(|hit| hit.id));
            start += PAGE;
        }
    }
    let everything = SearchRequest { query: "*".into(), exclude_docs: true, ..Default::default() };
    let total = client.search(everything, Consistency::Local).await.expect("count a node").count.unwrap_or(0);
    (ids, total)
}

/// A node that is neither the leader nor `victim`.
fn follower_other(leader: usize, victim: usize) -> usize {
    (1..=NODES).find(|number| *number != leader && *number != victim).expect("a third node")
}

/// Prints when a new leader was seen (for faults of the leader).
async fn report_election(fault: Fault, election: tokio::task::JoinHandle<Option<Duration>>) {
    if matches!(fault, Fault::KillLeader | Fault::StopLeader | Fault::CutLeader) {
        let seen = tokio::time::timeout(RECOVERY_LIMIT, election).await.ok().and_then(Result::ok).flatten();
        eprintln!("  {}: new leader seen after {:?}", fault.name(), seen);
    } else {
        election.abort();
    }
}

fn summary(samples: &[Duration]) -> (Duration, Duration, Duration) {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let at = |fraction: f64| sorted[((sorted.len() - 1) as f64 * fraction).round() as usize];
    (at(0.5), at(0.9), sorted[sorted.len() - 1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_lose_no_acknowledged_write_and_writes_resume() {
    let Some(network) = netns::network_or_skip("faults_lose_no_acknowledged_write_and_writes_resume", NODES + 1) else {
        return;
    };
    let rounds: usize = std::env::var("BAYARD_CHAOS_ROUNDS").ok().and_then(|value| value.parse().ok()).unwrap_or(6);
    // `BAYARD_CHAOS_FAULTS=kill-leader,cut-leader` runs only those faults, in rotation.
    let faults: Vec<Fault> = match std::env::var("BAYARD_CHAOS_FAULTS") {
        Ok(list) => list
            .split(',')
            .map(|key| {
                FAULTS.into_iter().find(|fault| fault.key() == key.trim()).unwrap_or_else(|| {
                    let known: Vec<&str> = FAULTS.iter().map(|fault| fault.key()).collect();
                    panic!("BAYARD_CHAOS_FAULTS: unknown fault `{key}`; the faults are {known:?}")
                })
            })
            .collect(),
        Err(_) => FAULTS.to_vec(),
    };
    let directory = tempfile::tempdir().unwrap();
    network.make_certificates(directory.path());
    let mut chaos = Chaos { network, directory, nodes: BTreeMap::new() };
    let first = chaos.network.spawn(1, &chaos.network.serve_arguments(1, PORT, &[]), chaos.root());
    chaos.nodes.insert(1, first);
    for number in 2..=NODES {
        let node = chaos.network.spawn(number, &chaos.network.serve_arguments(number, PORT, &[1]), chaos.root());
        chaos.nodes.insert(number, node);
    }
    chaos.wait_healthy().await;

    let history = Arc::new(History::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let client = chaos.client(chaos.servers(), Duration::from_secs(5));
        writers.push(tokio::spawn(write_until(client, writer, history.clone(), stop.clone())));
    }

    let mut recoveries: BTreeMap<Fault, Vec<Duration>> = BTreeMap::new();
    let run_started = Instant::now();
    for round in 0..rounds {
        let fault = faults[round % faults.len()];
        let leader = chaos.leader().await;
        let follower = (1..=NODES).find(|number| *number != leader).expect("a follower");
        let mut record = |duration: Duration| {
            eprintln!("  {}: first acknowledged write after {} ms", fault.name(), duration.as_millis());
            recoveries.entry(fault).or_default().push(duration)
        };
        match fault {
            Fault::KillLeader | Fault::KillFollower => {
                let victim = if fault == Fault::KillLeader { leader } else { follower };
                let at = Instant::now();
                let election = chaos.watch_election(follower_other(leader, victim), leader, at);
                chaos.kill(victim);
                record(chaos.recovery(&history, at).await);
                report_election(fault, election).await;
                tokio::time::sleep(FAULT_HELD).await;
                chaos.restart(victim);
            }
            Fault::StopLeader => {
                let at = Instant::now();
                let election = chaos.watch_election(follower, leader, at);
                chaos.signal(leader, libc::SIGSTOP);
                let recovered = chaos.recovery(&history, at).await;
                report_election(fault, election).await;
                tokio::time::sleep(FAULT_HELD).await;
                chaos.signal(leader, libc::SIGCONT);
                record(recovered);
            }
            Fault::CutLeader | Fault::CutFollower => {
                let victim = if fault == Fault::CutLeader { leader } else { follower };
                let at = Instant::now();
                let election = chaos.watch_election(follower_other(leader, victim), leader, at);
                chaos.network.cut(victim);
                let recovered = chaos.recovery(&history, at).await;
                report_election(fault, election).await;
                tokio::time::sleep(FAULT_HELD).await;
                chaos.network.restore(victim);
                record(recovered);
            }
            Fault::RollingRestart => {
                for number in 1..=NODES {
                    // As an operator restarts: SIGTERM, wait for the exit, start again.
                    let at = Instant::now();
                    chaos.signal(number, libc::SIGTERM);
                    let exited = chaos.nodes.get_mut(&number).expect("node runs").wait_for_exit(SETTLE);
                    assert!(exited.is_some(), "node {number} did not stop on SIGTERM");
                    chaos.restart(number);
                    record(chaos.recovery(&history, at).await);
                    chaos.wait_healthy().await;
                }
            }
        }
        chaos.wait_healthy().await;
        eprintln!("round {} of {rounds}: {} done ({:?} into the run)", round + 1, fault.name(), run_started.elapsed());
        if let Some(directory) = std::env::var_os("BAYARD_CHAOS_LOGS") {
            for (number, node) in &chaos.nodes {
                let path = Path::new(&directory).join(format!("round{}-node{number}.log", round + 1));
                let _ = std::fs::write(path, node.logs());
            }
        }
        if std::env::var_os("BAYARD_CHAOS_DUMP").is_some() {
            for (number, node) in &chaos.nodes {
                let logs = node.logs();
                let about_elections: Vec<&str> = logs
                    .lines()
                    .filter(|line| ["elect", "vote", "leader", "timeout"].iter().any(|word| line.contains(word)))
                    .collect();
                let tail = &about_elections[about_elections.len().saturating_sub(40)..];
                eprintln!("---- node {number}, election lines:\n{}", tail.join("\n"));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.expect("writer");
    }

    // Healed: check every node.
    chaos.wait_healthy().await;
    let admin = chaos.client(chaos.servers(), Duration::from_secs(30));
    admin.commit().await.expect("a commit after healing");
    let operations = history.operations.lock().unwrap().clone();
    let acknowledged: BTreeSet<String> = operations
        .iter()
        .filter(|operation| operation.outcome == Outcome::Ok)
        .map(|operation| operation.id.clone())
        .collect();
    let invoked: BTreeSet<String> = operations.iter().map(|operation| operation.id.clone()).collect();
    let failed = operations.iter().filter(|operation| operation.outcome == Outcome::Failed).count();
    let unknown = operations.iter().filter(|operation| operation.outcome == Outcome::Unknown).count();
    // Linearizable, through every node, right after the acknowledged commit: nothing missing.
    for server in chaos.servers() {
        let request = SearchRequest { query: "*".into(), exclude_docs: true, ..Default::default() };
        let found = chaos
            .client(vec![server.clone()], Duration::from_secs(30))
            .search(request, Consistency::Linearizable)
            .await;
        let count = found.expect("a linearizable search").count.unwrap_or(0);
        assert!(
            count >= acknowledged.len() as u64,
            "{server}: a linearizable search after the commit found {count} of {}",
            acknowledged.len()
        );
    }
    let operations_per_writer = operations.len() as u64;
    let mut replicas = Vec::new();
    for server in chaos.servers() {
        let client = chaos.client(vec![server.clone()], Duration::from_secs(30));
        // Each node applies the commit soon (the linearizable read above waited on the leader).
        let deadline = Instant::now() + SETTLE;
        let (mut ids, mut total) = ids_on(&client, operations_per_writer).await;
        while !acknowledged.is_subset(&ids) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            (ids, total) = ids_on(&client, operations_per_writer).await;
        }
        let unaccounted = total.saturating_sub(ids.len() as u64) as usize;
        replicas.push((server, ids, unaccounted));
    }
    let lost: usize = replicas.iter().map(|(_, ids, _)| acknowledged.difference(ids).count()).max().unwrap_or(0);
    let phantom: usize =
        replicas.iter().map(|(_, ids, unaccounted)| ids.difference(&invoked).count() + unaccounted).max().unwrap_or(0);
    let diverged = replicas.windows(2).filter(|pair| pair[0].1 != pair[1].1 || pair[0].2 != pair[1].2).count();

    eprintln!(
        "{rounds} rounds, {} operations: {} acknowledged, {failed} failed, {unknown} unknown",
        operations.len(),
        acknowledged.len()
    );
    eprintln!("| fault | rounds | median | p90 | max |");
    eprintln!("|---|---|---|---|---|");
    for (fault, samples) in &recoveries {
        let (median, p90, max) = summary(samples);
        eprintln!(
            "| {} | {} | {} ms | {} ms | {} ms |",
            fault.name(),
            samples.len(),
            median.as_millis(),
            p90.as_millis(),
            max.as_millis()
        );
    }
    eprintln!("lost={lost} phantom={phantom} diverged={diverged}");
    assert_eq!(
        (lost, phantom, diverged),
        (0, 0, 0),
        "replicas: {:?}",
        replicas.iter().map(|(server, ids, _)| (server, ids.len())).collect::<Vec<_>>()
    );
    assert!(!acknowledged.is_empty(), "no write was acknowledged at all");

    // Everyone alive with one leader, and a follower can leave.
    chaos.wait_healthy().await;
    let leader = chaos.leader().await;
    let follower = (1..=NODES).rev().find(|number| *number != leader).expect("a follower");
    admin.leave(follower as u64, false).await.expect("a follower leaves after the faults");
    let exited = chaos.nodes.get_mut(&follower).expect("node runs").wait_for_exit(SETTLE);
    assert!(exited.is_some(), "the follower that left keeps running");
}
