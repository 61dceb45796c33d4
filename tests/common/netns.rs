//! Real hosts for tests: one Linux network namespace per host, all joined by a bridge that lives
//! in a namespace of its own (the "switch"), so every host has its own address and the same port
//! can be used on each of them. `bayard` runs inside a host with `ip netns exec`; a host's link can
//! be cut and restored.
//!
//! Nothing touches the machine's own interfaces: every interface is created directly inside a
//! namespace made here (which is also why interface names can be fixed and short: `eth0` in a
//! host, `br0` and `h<n>` in the switch), and the test subnet exists only inside them. Traffic
//! therefore only ever goes to loopback or to addresses inside these namespaces.
//!
//! Hosts are numbered from 1, like the node ids the conveniences below give them: host `n` has the
//! address `10.213.<x>.<n + 1>` and, in [`Network::serve_arguments`], node id `n`.
//!
//! Namespaces are named `bayardt-<pid>-<network>-sw` and `bayardt-<pid>-<network>-h<n>`. Dropping a
//! [`Network`] kills what runs in its namespaces and deletes them; [`Network::create`] first removes
//! the namespaces left by a crashed earlier run (same name prefix, or a `bayardt-<pid>-` whose
//! process no longer exists).
//!
//! Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2; [`available`] says why not.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Every namespace made here starts with this.
const NAME_PREFIX: &str = "bayardt-";
/// Upper bound for one client command run in a host (its own `--timeout` normally ends it first).
pub const RUN_LIMIT: Duration = Duration::from_secs(120);
/// Upper bound for a node to log "node listening".
pub const START_LIMIT: Duration = Duration::from_secs(60);
/// Set to make an unavailable network a test failure instead of a skip.
pub const REQUIRED_VARIABLE: &str = "BAYARD_NETNS_REQUIRED";

static NEXT_NETWORK: AtomicU32 = AtomicU32::new(0);

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_bayard")
}

/// Whether namespaced hosts can be made here: root, `ip` present, and a probe network (namespaces,
/// a bridge, a veth pair, `ip netns exec`) works. Checked once per test binary.
pub fn available() -> Result<(), String> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT.get_or_init(probe).clone()
}

/// For tests: `Some(network)`, or `None` after printing `skipping: <reason>` on stderr. With
/// [`REQUIRED_VARIABLE`] set, an unavailable network panics instead.
pub fn network_or_skip(test: &str, host_count: usize) -> Option<Network> {
    if let Err(reason) = available() {
        if std::env::var_os(REQUIRED_VARIABLE).is_some_and(|value| !value.is_empty()) {
            panic!("{test}: network namespaces are required ({REQUIRED_VARIABLE} is set) but {reason}");
        }
        eprintln!("skipping: {test}: {reason}");
        return None;
    }
    Some(Network::create(host_count).unwrap_or_else(|error| panic!("{test}: cannot create the network: {error}")))
}

fn probe() -> Result<(), String> {
    let uid = effective_uid()?;
    if uid != 0 {
        return Err(format!("network namespaces need root, and this runs as uid {uid}"));
    }
    match Command::new("ip").arg("-V").stdin(Stdio::null()).output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => return Err(format!("`ip -V` failed: {}", String::from_utf8_lossy(&output.stderr).trim())),
        Err(error) => return Err(format!("`ip` (iproute2) is not usable: {error}")),
    }
    let network = Network::create(1).map_err(|error| format!("cannot create a network namespace: {error}"))?;
    let output = bounded_output(
        Command::new("ip").args(["netns", "exec", &network.hosts[0].namespace, "true"]),
        Duration::from_secs(10),
    )
    .map_err(|error| format!("`ip netns exec` is not usable: {error}"))?;
    if !output.status.success() {
        return Err(format!("`ip netns exec` failed: {}", String::from_utf8_lossy(&output.stderr).trim()));
    }
    Ok(())
}

fn effective_uid() -> Result<u32, String> {
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(|error| format!("no /proc/self/status: {error}"))?;
    // "Uid:\t<real>\t<effective>\t<saved>\t<filesystem>"
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|effective| effective.parse().ok())
        .ok_or_else(|| "no Uid line in /proc/self/status".to_string())
}

/// Runs `ip <arguments>` (these return at once) and says what went wrong.
fn ip(arguments: &[&str]) -> Result<String, String> {
    let output = Command::new("ip")
        .args(arguments)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("cannot run `ip {}`: {error}", arguments.join(" ")))?;
    if !output.status.success() {
        return Err(format!("`ip {}` failed: {}", arguments.join(" "), String::from_utf8_lossy(&output.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn namespace_names() -> Vec<String> {
    // Lines are "name" or "name (id: 3)".
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_string))
        .collect()
}

/// SIGKILL to every process in a namespace made here (all started by these tests), by pid.
fn kill_processes_in(namespace: &str) {
    let Ok(pids) = ip(&["netns", "pids", namespace]) else { return };
    for pid in pids.split_whitespace().filter(|pid| pid.parse::<u32>().is_ok()) {
        let _ = Command::new("kill").args(["-KILL", pid]).stdin(Stdio::null()).output();
    }
}

fn remove_namespace(namespace: &str) {
    kill_processes_in(namespace);
    let _ = ip(&["netns", "delete", namespace]);
}

/// Removes the namespaces of `prefix`, and those of earlier test processes that are gone.
fn remove_leftovers(prefix: &str) {
    let own = format!("{prefix}-");
    for name in namespace_names() {
        let Some(rest) = name.strip_prefix(NAME_PREFIX) else { continue };
        let owner_gone =
            rest.split('-').next().and_then(|pid| pid.parse::<u32>().ok()).is_some_and(|pid| !process_alive(pid));
        if name.starts_with(&own) || owner_gone {
            remove_namespace(&name);
        }
    }
}

/// Whether `pid` runs (a zombie, killed but not yet reaped, does not).
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("State:"))
            .is_some_and(|state| !state.trim_start().starts_with('Z'))
    })
}

/// A host: a namespace with one interface (`eth0`) plugged into the switch.
#[derive(Debug, Clone)]
pub struct Host {
    /// `host<n>`.
    pub name: String,
    pub namespace: String,
    pub address: Ipv4Addr,
    /// The host's end of its link, inside `namespace`.
    interface: String,
    /// The switch's end of the link, a port of the bridge.
    switch_port: String,
}

/// Hosts on one switch. Dropping it kills everything running in its namespaces and deletes them.
pub struct Network {
    prefix: String,
    /// The namespace the bridge lives in.
    switch: String,
    bridge: String,
    hosts: Vec<Host>,
}

impl Drop for Network {
    fn drop(&mut self) {
        let own = format!("{}-", self.prefix);
        // Hosts first, the switch last; also whatever a failed `create` left half made.
        let mut names: Vec<String> = namespace_names().into_iter().filter(|name| name.starts_with(&own)).collect();
        names.sort_by_key(|name| name == &self.switch);
        for name in names {
            remove_namespace(&name);
        }
    }
}

impl Network {
    /// `host_count` hosts (1, 2, …) on a fresh subnet `10.213.<x>.0/24`, links up.
    pub fn create(host_count: usize) -> Result<Network, String> {
        assert!((1..=200).contains(&host_count), "a network has 1 to 200 hosts, not {host_count}");
        let pid = std::process::id();
        let number = NEXT_NETWORK.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{NAME_PREFIX}{pid}-{number}");
        remove_leftovers(&prefix);
        // Each network is sealed off in its own namespaces, so subnets could even repeat; distinct
        // ones make logs of parallel tests easier to tell apart.
        let subnet = 1 + ((pid % 251) * 7 + number) % 250;
        let mut network =
            Network { switch: format!("{prefix}-sw"), bridge: "br0".to_string(), prefix, hosts: Vec::new() };
        // From here on, Drop removes whatever was made, also on an error.
        let switch = network.switch.clone();
        ip(&["netns", "add", &switch])?;
        ip(&["-n", &switch, "link", "set", "lo", "up"])?;
        ip(&["-n", &switch, "link", "add", &network.bridge, "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", &network.bridge, "up"])?;
        for number in 1..=host_count {
            let host = Host {
                name: format!("host{number}"),
                namespace: format!("{}-h{number}", network.prefix),
                address: Ipv4Addr::new(10, 213, subnet as u8, number as u8 + 1),
                interface: "eth0".to_string(),
                switch_port: format!("h{number}"),
            };
            let namespace = host.namespace.as_str();
            ip(&["netns", "add", namespace])?;
            ip(&["-n", namespace, "link", "set", "lo", "up"])?;
            // Made inside the host with its peer made directly inside the switch.
            ip(&[
                "-n",
                namespace,
                "link",
                "add",
                &host.interface,
                "type",
                "veth",
                "peer",
                "name",
                &host.switch_port,
                "netns",
                &switch,
            ])?;
            ip(&["-n", &switch, "link", "set", &host.switch_port, "master", &network.bridge])?;
            ip(&["-n", &switch, "link", "set", &host.switch_port, "up"])?;
            ip(&["-n", namespace, "address", "add", &format!("{}/24", host.address), "dev", &host.interface])?;
            ip(&["-n", namespace, "link", "set", &host.interface, "up"])?;
            network.hosts.push(host);
        }
        Ok(network)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Host `number` (from 1).
    pub fn host(&self, number: usize) -> &Host {
        assert!(
            (1..=self.hosts.len()).contains(&number),
            "there is no host {number}: hosts are numbered 1 to {}",
            self.hosts.len()
        );
        &self.hosts[number - 1]
    }

    pub fn address(&self, number: usize) -> Ipv4Addr {
        self.host(number).address
    }

    /// Starts `bayard serve <arguments> --log-format json` inside host `number`, in `directory`,
    /// and waits (bounded) for it to listen.
    pub fn spawn(&self, number: usize, arguments: &[String], directory: &Path) -> NamespacedProcess {
        NamespacedProcess::start(&self.host(number).namespace, directory, arguments)
    }

    /// Runs a `bayard` client command inside host `number`, in `directory` (bounded by [`RUN_LIMIT`];
    /// past it the command is killed and the output says so on stderr).
    pub fn run(&self, number: usize, arguments: &[&str], directory: &Path) -> Output {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.host(number).namespace, binary()]).args(arguments).current_dir(directory);
        for variable in BAYARD_VARIABLES {
            command.env_remove(variable);
        }
        bounded_output(&mut command, RUN_LIMIT)
            .unwrap_or_else(|error| panic!("cannot run bayard {arguments:?} in host {number}: {error}"))
    }

    /// Like [`Network::run`], for a command that prints JSON: the JSON, or why there is none.
    pub fn json(&self, number: usize, arguments: &[&str], directory: &Path) -> Result<serde_json::Value, String> {
        let output = self.run(number, arguments, directory);
        if !output.status.success() {
            return Err(format!(
                "bayard {arguments:?} in host {number} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        serde_json::from_slice(&output.stdout).map_err(|error| {
            format!(
                "stdout of bayard {arguments:?} in host {number} is not JSON ({error}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    /// Cuts host `number` off: both ends of its link go down, so it reaches nobody and nobody
    /// reaches it (its processes keep running; loopback still works inside it).
    pub fn cut(&self, number: usize) {
        let host = self.host(number);
        ip(&["-n", &self.switch, "link", "set", &host.switch_port, "down"])
            .and_then(|_| ip(&["-n", &host.namespace, "link", "set", &host.interface, "down"]))
            .unwrap_or_else(|error| panic!("cannot cut {}: {error}", host.name));
    }

    /// Plugs host `number` back in (its address and route come back with the link).
    pub fn restore(&self, number: usize) {
        let host = self.host(number);
        ip(&["-n", &host.namespace, "link", "set", &host.interface, "up"])
            .and_then(|_| ip(&["-n", &self.switch, "link", "set", &host.switch_port, "up"]))
            .unwrap_or_else(|error| panic!("cannot restore {}: {error}", host.name));
    }

    // ---- bayard conveniences: node `n` runs on host `n`.

    /// Makes, in `<directory>/certs`, a CA, `node-<n>` for every host with its address as an IP
    /// SAN, and the admin certificate `admin-ops`. Runs on the machine, not in a namespace.
    pub fn make_certificates(&self, directory: &Path) {
        let mut commands: Vec<Vec<String>> = vec![words(&["certs", "ca", "--out-dir", "certs"])];
        for (position, host) in self.hosts.iter().enumerate() {
            let id = (position + 1).to_string();
            let san = host.address.to_string();
            commands.push(words(&["certs", "node", "--id", &id, "--san", &san, "--out-dir", "certs"]));
        }
        commands.push(words(&["certs", "admin", "--name", "ops", "--out-dir", "certs"]));
        for arguments in commands {
            let mut command = Command::new(binary());
            command.args(&arguments).current_dir(directory);
            let output = bounded_output(&mut command, RUN_LIMIT)
                .unwrap_or_else(|error| panic!("cannot run bayard {arguments:?}: {error}"));
            assert!(
                output.status.success(),
                "bayard {arguments:?} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
    }

    /// `serve` flags for node `number` on host `number`: bound to 0.0.0.0:`port`, advertised at the
    /// host's address, data in `data/<n>`, certificates from [`Network::make_certificates`], joining
    /// through the nodes of `seeds` (none: it starts a cluster).
    pub fn serve_arguments(&self, number: usize, port: u16, seeds: &[usize]) -> Vec<String> {
        let id = number.to_string();
        let address = self.address(number).to_string();
        let mut arguments = words(&[
            "--id",
            &id,
            "--host",
            "0.0.0.0",
            "--advertise-host",
            &address,
            "--port",
            &port.to_string(),
            "--data-directory",
            &format!("data/{id}"),
            "--ca",
            "certs/ca.pem",
            "--cert",
            &format!("certs/node-{id}.pem"),
            "--key",
            &format!("certs/node-{id}.key"),
        ]);
        if !seeds.is_empty() {
            let peers: Vec<String> =
                seeds.iter().map(|seed| format!("{seed}={}:{port}", self.address(*seed))).collect();
            arguments.push("--peers".to_string());
            arguments.push(peers.join(","));
        }
        arguments
    }

    /// `host:port` of the given hosts, comma-separated, for `--servers`.
    pub fn servers(&self, numbers: &[usize], port: u16) -> String {
        numbers.iter().map(|number| format!("{}:{port}", self.address(*number))).collect::<Vec<_>>().join(",")
    }

    /// Client flags with the admin certificate, talking to `servers`.
    pub fn admin_arguments(servers: &str) -> Vec<String> {
        words(&[
            "--servers",
            servers,
            "--ca",
            "certs/ca.pem",
            "--cert",
            "certs/admin-ops.pem",
            "--key",
            "certs/admin-ops.key",
        ])
    }
}

const BAYARD_VARIABLES: [&str; 6] =
    ["BAYARD_SERVERS", "BAYARD_CA", "BAYARD_CERT", "BAYARD_KEY", "BAYARD_PEERS", "BAYARD_CONSISTENCY"];

fn words(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|part| part.to_string()).collect()
}

/// A child that is killed and reaped however its owner ends, panics included.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read_all(source: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut source) = source {
            let _ = source.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// `command.output()`, but killed after `limit` (then stderr ends with a line saying so).
fn bounded_output(command: &mut Command, limit: Duration) -> Result<Output, String> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| error.to_string())?;
    let mut child = Reaped(child);
    let stdout = read_all(child.0.stdout.take());
    let stderr = read_all(child.0.stderr.take());
    let started = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.0.try_wait().map_err(|error| error.to_string())? {
            break status;
        }
        if started.elapsed() > limit {
            timed_out = true;
            let _ = child.0.kill();
            break child.0.wait().map_err(|error| error.to_string())?;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = stdout.join().unwrap_or_default();
    let mut stderr = stderr.join().unwrap_or_default();
    if timed_out {
        stderr.extend_from_slice(format!("\n(killed after {limit:?})\n").as_bytes());
    }
    Ok(Output { status, stdout, stderr })
}

/// A `bayard serve` process inside a host, killed (and reaped) when dropped.
pub struct NamespacedProcess {
    child: Reaped,
    pub namespace: String,
    /// The address it bound (from its "node listening" log line).
    pub local_address: String,
    logs: Arc<Mutex<Vec<String>>>,
    pub arguments: Vec<String>,
    pub directory: PathBuf,
}

impl NamespacedProcess {
    /// Starts `ip netns exec <namespace> bayard serve <arguments> --log-format json` in `directory`
    /// and waits (bounded by [`START_LIMIT`]) for it to listen. `ip netns exec` execs, so the
    /// child is `bayard` itself.
    pub fn start(namespace: &str, directory: &Path, arguments: &[String]) -> NamespacedProcess {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", namespace, binary(), "serve"])
            .args(arguments)
            .args(["--log-format", "json"])
            .current_dir(directory)
            // BAYARD_TEST_RUST_LOG: more of the nodes' logs, when diagnosing a test.
            .env("RUST_LOG", std::env::var("BAYARD_TEST_RUST_LOG").unwrap_or_else(|_| "info,openraft=warn".to_string()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for variable in BAYARD_VARIABLES {
            command.env_remove(variable);
        }
        let child = command.spawn().unwrap_or_else(|error| panic!("cannot spawn bayard serve in {namespace}: {error}"));
        // From here on, Drop kills and reaps the process whatever happens.
        let mut child = Reaped(child);
        let stderr = child.0.stderr.take().expect("stderr is piped");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut process = NamespacedProcess {
            child,
            namespace: namespace.to_string(),
            local_address: String::new(),
            logs,
            arguments: arguments.to_vec(),
            directory: directory.to_path_buf(),
        };
        let started = Instant::now();
        while started.elapsed() < START_LIMIT {
            let address = process.logs.lock().unwrap().iter().find_map(|line| {
                let value: serde_json::Value = serde_json::from_str(line).ok()?;
                (value["fields"]["message"] == "node listening")
                    .then(|| value["fields"]["local_address"].as_str().map(str::to_string))
                    .flatten()
            });
            if let Some(local_address) = address {
                process.local_address = local_address;
                return process;
            }
            if let Ok(Some(status)) = process.child.0.try_wait() {
                panic!("bayard serve in {namespace} exited with {status}: {}", process.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("bayard serve in {namespace} did not listen within {START_LIMIT:?}: {}", process.logs());
    }

    /// Starts the same command again in the same host (after a kill).
    pub fn restart(&self) -> NamespacedProcess {
        NamespacedProcess::start(&self.namespace, &self.directory, &self.arguments)
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }

    /// Waits (bounded) for the process to exit by itself.
    pub fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(status)) = self.child.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// The last `count` log lines (for assertion messages).
    pub fn logs_tail(&self, count: usize) -> String {
        let logs = self.logs.lock().unwrap();
        logs[logs.len().saturating_sub(count)..].join("\n")
    }
}

/// Retries `check` every 100 ms for at most `limit`; how long it took, if it came true.
pub fn poll(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    loop {
        if check() {
            return Some(started.elapsed());
        }
        if started.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
