//! The official Elasticsearch Python client (8.x), unmodified, against a three-node cluster's
//! HTTPS doors: `tests/elasticsearch_client/es_client_check.py` writes, searches and checks every
//! answer, then prints what it got; this test runs the same searches through the QUIC client and
//! asserts both doors agree.
//!
//! The interpreter is `$BAYARD_PYTHON` (CI: a venv with `elasticsearch>=8,<9`), else `python3`.
//! Without an importable client the test is skipped with a banner, unless
//! `BAYARD_PYTHON_REQUIRED=1` (CI), where it fails.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bayard::access::{encode_api_key, KeyRole};
use bayard::protocol::Consistency;
use common::https::Https;
use common::{eventually, TestCluster};
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(30);
/// The script is killed after this long.
const SCRIPT_LIMIT: Duration = Duration::from_secs(120);

/// The searches the script must report (a script that silently skipped one would compare less).
const EXPECTED_SEARCHES: [&str; 25] = [
    "aggregations",
    "bool",
    "bool_should",
    "constant_score",
    "date_range",
    "exists",
    "fuzzy",
    "highlight",
    "match_and",
    "match_fuzziness",
    "match_or",
    "match_phrase",
    "more_aggregations",
    "msearch_0",
    "msearch_1",
    "msearch_2",
    "multi_match",
    "paging",
    "probe",
    "query_string",
    "query_string_fields",
    "simple_query_string",
    "sort_missing",
    "sorted",
    "wildcard",
];

fn script_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/elasticsearch_client/es_client_check.py")
}

fn python() -> String {
    std::env::var("BAYARD_PYTHON").ok().filter(|path| !path.is_empty()).unwrap_or_else(|| "python3".to_string())
}

fn python_required() -> bool {
    std::env::var("BAYARD_PYTHON_REQUIRED").is_ok_and(|value| value == "1")
}

/// The version of the `elasticsearch` package `python` imports, or why there is none usable.
fn elasticsearch_client_version(python: &str) -> Result<String, String> {
    let output = Command::new(python)
        .args(["-c", "import elasticsearch; print(elasticsearch.__versionstr__)"])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("cannot run `{python}`: {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "`{python}` cannot import elasticsearch: {}",
            String::from_utf8_lossy(&output.stderr).trim().lines().last().unwrap_or("no output")
        ));
    }
    let version = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if !version.starts_with("8.") {
        return Err(format!(
            "`{python}` has elasticsearch {version}; the check needs 8.x (pip install 'elasticsearch>=8,<9')"
        ));
    }
    Ok(version)
}

/// What the script did: its exit status (`None`: killed at the limit), stdout and stderr.
struct ScriptRun {
    status: Option<std::process::ExitStatus>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Runs the script with `environment`, killing it after `limit`. Output goes to files, so a
/// chatty script can never block on a full pipe.
fn run_script(python: &str, environment: Vec<(&'static str, String)>, limit: Duration) -> ScriptRun {
    let directory = tempfile::tempdir().expect("temp dir");
    let stdout_path = directory.path().join("stdout");
    let stderr_path = directory.path().join("stderr");
    let started = Instant::now();
    let mut child = Command::new(python)
        .arg(script_path())
        .envs(environment)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start `{python}` on {}: {error}", script_path().display()));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the script") {
            break Some(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ScriptRun {
        status,
        stdout: std::fs::read_to_string(&stdout_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
        elapsed: started.elapsed(),
    }
}

/// A bucket key as both sides spell it: integral numbers without a fraction.
fn bucket_key(key: &Value) -> String {
    match key {
        Value::String(text) => text.clone(),
        Value::Number(number) => match number.as_f64() {
            Some(float) if float.fract() == 0.0 && float.abs() < 9.0e15 => format!("{}", float as i64),
            _ => number.to_string(),
        },
        other => other.to_string(),
    }
}

/// The script's `normalize_aggregations`: buckets as `{key: doc_count}`, metrics as values.
fn normalize_aggregations(aggregations: Option<&Value>) -> Value {
    let mut out = serde_json::Map::new();
    let Some(Value::Object(aggregations)) = aggregations else {
        return Value::Object(out);
    };
    for (name, value) in aggregations {
        let normalized = if let Some(buckets) = value.get("buckets") {
            let list: Vec<(String, Value)> = match buckets {
                Value::Array(items) => {
                    items.iter().map(|bucket| (bucket_key(&bucket["key"]), bucket["doc_count"].clone())).collect()
                }
                Value::Object(keyed) => {
                    keyed.iter().map(|(key, bucket)| (key.clone(), bucket["doc_count"].clone())).collect()
                }
                other => panic!("aggregation {name}: buckets {other}"),
            };
            Value::Object(list.into_iter().collect())
        } else if let Some(values) = value.get("values") {
            values.clone()
        } else if value.get("count").is_some() && value.get("sum").is_some() {
            let picked = ["count", "min", "max", "avg", "sum"].map(|key| (key.to_string(), value[key].clone()));
            Value::Object(picked.into_iter().collect())
        } else {
            value.get("value").cloned().unwrap_or(Value::Null)
        };
        out.insert(name.clone(), normalized);
    }
    Value::Object(out)
}

/// Equal JSON, numbers within a relative 1e-6 (an average computed in another order).
fn approximately_equal(left: &Value, right: &Value) -> bool {
    match (left, right) {
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap_or(f64::NAN), b.as_f64().unwrap_or(f64::NAN));
            (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
        }
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| approximately_equal(a, b))
        }
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len()
                && a.iter().all(|(key, value)| b.get(key).is_some_and(|other| approximately_equal(value, other)))
        }
        _ => left == right,
    }
}

fn hit_ids(response: &Value) -> Vec<String> {
    response["hits"]
        .as_array()
        .unwrap_or_else(|| panic!("search_json answer without hits: {response}"))
        .iter()
        .map(|hit| hit["id"].as_str().unwrap_or_else(|| panic!("hit without id: {hit}")).to_string())
        .collect()
}

/// `field` of every hit that has it, by id.
fn hit_details(response: &Value, field: &str) -> Value {
    let details: serde_json::Map<String, Value> = response["hits"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|hit| !hit[field].is_null())
        .map(|hit| (hit["id"].as_str().unwrap_or_default().to_string(), hit[field].clone()))
        .collect();
    Value::Object(details)
}

/// Compares one search as the QUIC client answers it with what the Python client got.
fn compare_search(name: &str, node: &str, expected: &Value, response: &Value) {
    let want_ids: Vec<String> = serde_json::from_value(expected["ids"].clone()).expect("ids");
    let got_ids = hit_ids(response);
    if expected["ordered"] == Value::Bool(true) {
        assert_eq!(got_ids, want_ids, "search `{name}` on {node}: QUIC hit ids (in order) differ from the ES client's");
    } else {
        let got: BTreeSet<&String> = got_ids.iter().collect();
        let want: BTreeSet<&String> = want_ids.iter().collect();
        assert_eq!(got, want, "search `{name}` on {node}: QUIC hit ids differ from the ES client's");
    }
    assert_eq!(
        response["total"]["value"], expected["total"],
        "search `{name}` on {node}: QUIC total {} differs from the ES client's",
        response["total"]
    );
    let aggregations = normalize_aggregations(response.get("aggregations"));
    assert!(
        approximately_equal(&aggregations, &expected["aggregations"]),
        "search `{name}` on {node}: QUIC aggregations {aggregations} differ from the ES client's {}",
        expected["aggregations"]
    );
    for (field, quic_field) in [("sources", "source"), ("highlights", "highlight")] {
        if let Some(want) = expected.get(field) {
            let got = hit_details(response, quic_field);
            assert_eq!(
                &got, want,
                "search `{name}` on {node}: QUIC {quic_field} of the hits differ from the ES client's"
            );
        }
    }
}

/// Three voters, each with its HTTPS door on the port number of its QUIC endpoint.
async fn three_voters_with_http() -> TestCluster {
    let mut cluster = TestCluster::new();
    cluster.http = true;
    cluster.start(1, None).await;
    cluster.wait_for_voters(1, &[1], SETTLE).await;
    cluster.start(2, Some(1)).await;
    cluster.start(3, Some(1)).await;
    for node_id in [1, 2, 3] {
        cluster.wait_for_voters(node_id, &[1, 2, 3], SETTLE).await;
    }
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_official_python_client_works_against_every_node_and_agrees_with_quic() {
    let python = python();
    let version = match elasticsearch_client_version(&python) {
        Ok(version) => version,
        Err(why) if python_required() => {
            panic!("BAYARD_PYTHON_REQUIRED=1 but the Elasticsearch Python client is not usable: {why}")
        }
        Err(why) => {
            eprintln!("\n{}", "=".repeat(100));
            eprintln!("SKIPPED: the Elasticsearch Python client check did not run: {why}.");
            eprintln!(
                "  python3 -m venv target/es-venv && target/es-venv/bin/pip install 'elasticsearch>=8,<9', then \
                 BAYARD_PYTHON=target/es-venv/bin/python (BAYARD_PYTHON_REQUIRED=1 makes this a failure)"
            );
            eprintln!("{}\n", "=".repeat(100));
            return;
        }
    };
    eprintln!("elasticsearch-py {version} ({python})");

    let cluster = three_voters_with_http().await;
    let admin = cluster.client();
    let (record, secret) = admin.create_key("es-python", KeyRole::Client, false).await.expect("create an API key");
    let api_key = encode_api_key(&record.id, &secret);

    // Every door is up and knows the key (the key table is replicated, applied a little later
    // on followers) before the script starts.
    let ca = cluster.certificates.ca_path();
    let authorization = format!("ApiKey {api_key}");
    let mut urls = Vec::new();
    for (node_id, node) in &cluster.nodes {
        let address = node.http_address().unwrap_or_else(|| panic!("node {node_id} has no HTTPS door"));
        assert_eq!(address.port(), node.local_address().port(), "node {node_id}: HTTPS on the QUIC port number");
        let door = Https::anonymous(address, &ca);
        let header = authorization.clone();
        let ready = eventually(SETTLE, || {
            let door = door.clone();
            let header = header.clone();
            async move {
                door.try_send("GET", "/", &[("authorization", header.as_str())], None)
                    .await
                    .is_ok_and(|answer| answer.status == 200)
            }
        })
        .await;
        assert!(ready, "node {node_id}: GET / with the API key never answered 200");
        urls.push(format!("https://127.0.0.1:{}", address.port()));
    }

    let environment = vec![
        ("BAYARD_ES_URLS", urls.join(",")),
        ("BAYARD_ES_CA", ca.display().to_string()),
        ("BAYARD_ES_API_KEY", api_key.clone()),
    ];
    let python_for_run = python.clone();
    let run = tokio::task::spawn_blocking(move || run_script(&python_for_run, environment, SCRIPT_LIMIT))
        .await
        .expect("script runner");
    // The report (stdout) is long; what went wrong is on stderr.
    let stdout_excerpt: String = run.stdout.trim_end().chars().take(4000).collect();
    let transcript = format!(
        "--- script stdout (first 4000 characters) ---\n{stdout_excerpt}\n--- script stderr ---\n{}\n---",
        run.stderr.trim_end()
    );
    match run.status {
        None => panic!("the ES client check ran over {SCRIPT_LIMIT:?} and was killed\n{transcript}"),
        Some(status) if !status.success() => {
            panic!("the ES client check failed ({status}) after {:?}\n{transcript}", run.elapsed)
        }
        Some(_) => eprintln!("ES client check passed in {:?}", run.elapsed),
    }
    let report: Value = run
        .stdout
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("the script's last line is not its JSON report\n{transcript}"));
    let searches = report["searches"].as_object().unwrap_or_else(|| panic!("no searches in the report\n{transcript}"));
    let names: BTreeSet<&str> = searches.keys().map(String::as_str).collect();
    assert_eq!(names, EXPECTED_SEARCHES.into_iter().collect(), "the report's searches");
    let counts = report["counts"].as_object().unwrap_or_else(|| panic!("no counts in the report\n{transcript}"));
    let everything = counts["all"]["count"].as_u64().expect("counts.all");

    // Every node has applied every write the script made (local reads from here on).
    let clients: BTreeMap<u64, bayard::client::Client> =
        cluster.nodes.keys().map(|node_id| (*node_id, cluster.client_of(*node_id))).collect();
    for (node_id, client) in &clients {
        let caught_up = eventually(SETTLE, || async {
            client.count_json(None, Consistency::Local).await.is_ok_and(|count| count == everything)
        })
        .await;
        assert!(caught_up, "node {node_id} never counted the {everything} documents the script left");
    }

    // The same searches through QUIC: every one on node 1 (the first server of the cluster's
    // client), the ordered ones (sorted by a fast field, so fixed) on every node.
    let client = cluster.client();
    for (name, expected) in searches {
        let response = client
            .search_json(&expected["body"], Consistency::Local)
            .await
            .unwrap_or_else(|error| panic!("search `{name}` through QUIC: {error:?} (body {})", expected["body"]));
        compare_search(name, "the cluster client", expected, &response);
        if expected["ordered"] == Value::Bool(true) {
            for (node_id, node_client) in &clients {
                let response = node_client
                    .search_json(&expected["body"], Consistency::Local)
                    .await
                    .unwrap_or_else(|error| panic!("search `{name}` on node {node_id}: {error:?}"));
                compare_search(name, &format!("node {node_id}"), expected, &response);
            }
        }
    }
    for (name, expected) in counts {
        let query = expected["query"].clone();
        let count = client
            .count_json((!query.is_null()).then_some(&query), Consistency::Local)
            .await
            .unwrap_or_else(|error| panic!("count `{name}` through QUIC: {error:?}"));
        assert_eq!(Some(count), expected["count"].as_u64(), "count `{name}` through QUIC differs from the ES client's");
    }

    // A few of the script's writes, read back through QUIC.
    let document = client.get("doc-007").await.expect("get doc-007").expect("doc-007 exists");
    assert_eq!(document.fields["title"], "harbor garden");
    assert!(client.get("intro-3").await.expect("get intro-3").is_none(), "intro-3 was deleted through HTTP");
    assert!(client.get("bulk-bad").await.expect("get bulk-bad").is_none(), "the refused bulk item was not written");
    assert!(client.get("bulk-ok-2").await.expect("get bulk-ok-2").is_some(), "the bulk's good items were written");

    drop(clients);
    drop(client);
    drop(admin);
    cluster.shutdown().await;
}
