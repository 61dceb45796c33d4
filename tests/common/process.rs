//! `bayard` as a process: start `serve` with flags, wait for it to listen, kill it with SIGKILL,
//! run client commands and read their JSON.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_bayard")
}

pub fn repository_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// A UDP port nobody uses right now on 127.0.0.1 (bound and released).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port()
}

/// A `bayard serve` process, killed when dropped.
pub struct ServeProcess {
    child: Child,
    /// The address it bound (from its "node listening" log line).
    pub local_address: String,
    logs: Arc<Mutex<Vec<String>>>,
    pub arguments: Vec<String>,
    pub directory: PathBuf,
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServeProcess {
    /// Starts `bayard serve <arguments> --log-format json` in `directory` and waits (bounded) for
    /// it to listen.
    pub fn start(directory: &Path, arguments: &[String]) -> ServeProcess {
        let mut child = Command::new(binary())
            .current_dir(directory)
            .arg("serve")
            .args(arguments)
            .args(["--log-format", "json"])
            .env_remove("BAYARD_CA")
            .env_remove("BAYARD_CERT")
            .env_remove("BAYARD_KEY")
            .env_remove("BAYARD_PEERS")
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bayard serve");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        // From here on, Drop kills and reaps the process whatever happens.
        let mut process = ServeProcess {
            child,
            local_address: String::new(),
            logs,
            arguments: arguments.to_vec(),
            directory: directory.to_path_buf(),
        };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
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
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!("bayard serve exited with {status}: {}", process.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("bayard serve did not start: {}", process.logs());
    }

    /// Starts the same command again (after a kill).
    pub fn restart(&self) -> ServeProcess {
        ServeProcess::start(&self.directory, &self.arguments)
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (bounded) for the process to exit by itself.
    pub fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }
}

/// Runs a `bayard` client command in `directory`.
pub fn run(directory: &Path, arguments: &[&str], stdin: Option<&str>) -> Output {
    run_with_environment(directory, arguments, stdin, &[])
}

/// [`run`] with extra environment variables.
pub fn run_with_environment(
    directory: &Path,
    arguments: &[&str],
    stdin: Option<&str>,
    environment: &[(&str, &str)],
) -> Output {
    let mut child = client_command(directory, arguments)
        .envs(environment.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bayard");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(input);
    child.wait_with_output().expect("bayard output")
}

/// `bayard arguments` run in `directory`, with none of the caller's `BAYARD_*` connection
/// settings: a test names its servers and certificates itself.
fn client_command(directory: &Path, arguments: &[&str]) -> Command {
    let mut command = Command::new(binary());
    command
        .current_dir(directory)
        .args(arguments)
        .env_remove("BAYARD_SERVERS")
        .env_remove("BAYARD_CA")
        .env_remove("BAYARD_CERT")
        .env_remove("BAYARD_KEY");
    command
}

/// Runs a command that must succeed and returns its stdout as JSON.
pub fn json(directory: &Path, arguments: &[&str], stdin: Option<&str>) -> serde_json::Value {
    let output = run(directory, arguments, stdin);
    assert!(output.status.success(), "bayard {arguments:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!("stdout of {arguments:?} is not JSON ({error}): {}", String::from_utf8_lossy(&output.stdout))
    })
}

/// Runs a command that must fail and returns its stderr.
pub fn failure(directory: &Path, arguments: &[&str], stdin: Option<&str>) -> String {
    let output = run(directory, arguments, stdin);
    assert!(!output.status.success(), "bayard {arguments:?} should have failed");
    assert!(output.stdout.is_empty(), "a failure prints nothing on stdout");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Retries `check` every 100 ms for at most `limit`.
pub fn eventually_blocking(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// What a client command printed on stderr, whether it succeeded, and the most memory it held
/// (its peak resident set, from `wait4`, which reports on that one child only).
pub struct MeasuredRun {
    pub success: bool,
    pub stderr: String,
    pub peak_resident_bytes: u64,
}

/// Runs a `bayard` client command in `directory` (stdout and stderr go to files there, so
/// nothing has to be read while it runs) and measures its peak memory.
pub fn run_measuring_memory(directory: &Path, arguments: &[&str]) -> MeasuredRun {
    let stderr_path = directory.join("measured.stderr");
    let child = client_command(directory, arguments)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(directory.join("measured.stdout")).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("spawn bayard");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: `usage` is a plain C struct that wait4 fills; the pid is our own child, which
    // nothing else waits for (the `Child` is forgotten so its drop does not touch the pid).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    std::mem::forget(child);
    assert_eq!(waited, pid, "wait4 on bayard {arguments:?} failed");
    MeasuredRun {
        success: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
        // Linux reports ru_maxrss in KiB.
        peak_resident_bytes: usage.ru_maxrss as u64 * 1024,
    }
}
