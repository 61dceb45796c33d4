//! The `bayard` binary as an operator uses it: certificates, serve, and every client command,
//! checking stdout JSON, stderr messages and exit codes.

#[path = "common/process.rs"]
mod process;

use std::path::Path;
use std::time::Duration;

use process::{failure, json, repository_file, ServeProcess};

struct Server {
    process: ServeProcess,
    address: String,
}

/// Starts `bayard serve` with `arguments` on a free port in `directory`.
fn serve(directory: &Path, arguments: &[&str]) -> Server {
    let mut arguments: Vec<String> = arguments.iter().map(|argument| argument.to_string()).collect();
    arguments.extend(["--port".to_string(), "0".to_string()]);
    let process = ServeProcess::start(directory, &arguments);
    let address = process.local_address.clone();
    Server { process, address }
}

#[test]
fn operator_flow_with_generated_certificates() {
    let directory = tempfile::tempdir().unwrap();
    let root = directory.path();
    json(root, &["certs", "ca", "--out-dir", "certs"], None);
    json(root, &["certs", "node", "--id", "1", "--san", "127.0.0.1,node-1.internal", "--out-dir", "certs"], None);
    json(root, &["certs", "client", "--name", "app", "--out-dir", "certs"], None);
    json(root, &["certs", "admin", "--name", "ops", "--out-dir", "certs"], None);
    // Refuses to overwrite the CA.
    assert!(failure(root, &["certs", "ca", "--out-dir", "certs"], None).contains("refusing to overwrite"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root.join("certs/ca.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "private keys are not readable by others");
    }

    let schema = repository_file("etc/schema.json");
    let tokenizer = repository_file("etc/tokenizer.json");
    let server = serve(
        root,
        &[
            "--id",
            "1",
            "--host",
            "127.0.0.1",
            "--data-directory",
            "data/1",
            "--schema-file",
            schema.to_str().unwrap(),
            "--tokenizer-file",
            tokenizer.to_str().unwrap(),
            "--ca",
            "certs/ca.pem",
            "--cert",
            "certs/node-1.pem",
            "--key",
            "certs/node-1.key",
            "--commit-interval",
            "0",
        ],
    );
    let servers = server.address.clone();
    let client = [
        "--servers",
        &servers,
        "--ca",
        "certs/ca.pem",
        "--cert",
        "certs/client-app.pem",
        "--key",
        "certs/client-app.key",
    ];
    let with = |command: &[&str]| -> Vec<String> {
        command.iter().chain(client.iter()).map(|part| part.to_string()).collect()
    };
    let call = |command: &[&str], stdin: Option<&str>| {
        let arguments = with(command);
        let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
        json(root, &arguments, stdin)
    };
    let fail = |command: &[&str], stdin: Option<&str>| {
        let arguments = with(command);
        let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
        failure(root, &arguments, stdin)
    };

    // Three ways to put one document.
    let receipt = call(
        &[
            "put",
            "--id",
            "1",
            r#"{"title":"Hello bayard","body":"search over quic","year":2024,"category":"/lang/rust"}"#,
        ],
        None,
    );
    assert_eq!(receipt["status"], "OK");
    std::fs::write(root.join("doc.json"), r#"{"title":"From a file","year":2023,"category":"/lang/go"}"#).unwrap();
    call(&["put", "--id", "2", "--file", "doc.json"], None);
    call(&["put", "--id", "3"], Some(r#"{"title":"From stdin","year":2022,"category":"/lang/rust"}"#));
    // Bulk NDJSON.
    let ndjson: String = (10..40)
        .map(|number| format!("{{\"_id\":\"{number}\",\"title\":\"bulk document {number}\",\"year\":{},\"category\":\"/lang/zig\"}}\n", 1990 + number))
        .collect();
    std::fs::write(root.join("docs.ndjson"), &ndjson).unwrap();
    assert_eq!(call(&["put", "--bulk", "--file", "docs.ndjson"], None)["operations"], 30);
    call(&["commit"], None);

    let hits = call(&["search", "title:hello"], None);
    assert_eq!(hits["count"], 1);
    assert_eq!(hits["docs"][0]["id"], "1");
    assert_eq!(hits["docs"][0]["fields"]["title"], "Hello bayard");
    assert!(hits["docs"][0]["score"].as_f64().unwrap() > 0.0);

    let faceted =
        call(&["search", "--facet-field", "category", "--facet-prefix", "/lang", "--exclude-docs", "*"], None);
    assert_eq!(faceted["count"], 33);
    assert_eq!(faceted["facet"]["category"]["/lang/rust"], 2);
    assert_eq!(faceted["facet"]["category"]["/lang/zig"], 30);
    assert_eq!(faceted["docs"].as_array().unwrap().len(), 0);

    let sorted =
        call(&["search", "--sort", "year:desc", "--limit", "2", "--from", "1", "--exclude-count", "title:bulk"], None);
    assert!(sorted.get("count").is_none());
    let ids: Vec<&str> = sorted["docs"].as_array().unwrap().iter().map(|hit| hit["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["38", "37"]);

    let document = call(&["get", "--id", "2"], None);
    assert_eq!(document["fields"]["title"], "From a file");

    call(&["delete", "--id", "2"], None);
    std::fs::write(root.join("ids.ndjson"), "\"10\"\n{\"_id\":\"11\"}\n12\n").unwrap();
    assert_eq!(call(&["delete", "--bulk", "--file", "ids.ndjson"], None)["operations"], 3);
    call(&["commit"], None);
    assert!(fail(&["get", "--id", "2"], None).contains("no document with id `2`"));
    assert_eq!(call(&["search", "--exclude-docs", "*"], None)["count"], 29);

    let status = call(&["status"], None);
    assert_eq!(status["node_id"], 1);
    assert_eq!(status["address"], servers);
    assert_eq!(status["document_count"], 29);
    assert_eq!(status["role"], "leader");
    let peers = call(&["peers"], None);
    assert_eq!(peers["1"], servers);
    let schema = call(&["schema"], None);
    assert!(schema.as_array().unwrap().iter().any(|field| field["name"] == "_id"));

    // Errors: on stderr, non-zero exit, specific.
    assert!(fail(&["put", "--id", "9", "{\"title\": "], None).contains("not valid JSON"));
    assert!(fail(&["put", "--id", "9", r#"{"year":"soon"}"#], None).contains("year"));
    assert!(fail(&["search", "title:(("], None).contains("invalid query"));
    assert!(fail(&["search", "--sort", "nope:desc", "*"], None).contains("unknown sort field `nope`"));
    assert!(fail(&["search", "--facet-field", "nope", "*"], None).contains("unknown facet field `nope`"));
    std::fs::write(root.join("bad.ndjson"), "{\"_id\":\"a\",\"title\":\"ok\"}\n\n{\"_id\":\"b\",\"year\":\"x\"}\n")
        .unwrap();
    let bulk_error = fail(&["put", "--bulk", "--file", "bad.ndjson"], None);
    assert!(bulk_error.contains("line 3"), "{bulk_error}");
    std::fs::write(root.join("broken.ndjson"), "{\"_id\":\"a\"}\n{broken\n").unwrap();
    assert!(fail(&["put", "--bulk", "--file", "broken.ndjson"], None).contains("line 2: malformed JSON"));
    // Certificate files that do not exist.
    let missing = failure(root, &["status", "--servers", &servers, "--ca", "certs/nope.pem"], None);
    assert!(missing.contains("certs/nope.pem"), "{missing}");
    // A client certificate may read status but not act as a node.
    assert_eq!(call(&["status"], None)["status"], "OK");
    // Nothing was lost along the way.
    assert_eq!(call(&["search", "--exclude-docs", "*"], None)["count"], 29);
    drop(server.process);
}

#[test]
fn serve_on_embedded_defaults_makes_development_certificates() {
    // An empty directory: no certs, no etc/: the built-in schema and analyzers are used.
    let directory = tempfile::tempdir().unwrap();
    let root = directory.path();
    let server = serve(root, &[]);
    for file in ["certs/ca.pem", "certs/ca.key", "certs/node-1.pem", "certs/admin-dev.pem", "data/1/node.json"] {
        assert!(root.join(file).exists(), "{file} was not made");
    }
    // The CLI's default certificate flags point at what serve made.
    let status = json(root, &["status", "--servers", &server.address], None);
    assert_eq!(status["node_id"], 1);
    json(root, &["put", "--servers", &server.address, "--id", "a", r#"{"title":"default schema"}"#], None);
    // The default commit interval (1 s) makes it searchable without an explicit commit.
    let mut found = false;
    for _ in 0..100 {
        let hits = json(root, &["search", "--servers", &server.address, "title:schema"], None);
        if hits["count"] == 1 {
            found = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(found, "the automatic commit never made the document searchable");
    drop(server);

    // A second start reuses the certificates and the data.
    let server = serve(root, &[]);
    let hits = json(root, &["search", "--servers", &server.address, "title:schema"], None);
    assert_eq!(hits["count"], 1);
}

#[test]
fn a_bulk_file_with_one_bad_line_writes_nothing() {
    let directory = tempfile::tempdir().unwrap();
    let root = directory.path();
    let server = serve(root, &["--commit-interval", "0"]);
    // A bad line in the first, a middle and the last request of 1,000 documents each.
    for bad_line in [1, 1501, 2500] {
        let text: String = (1..=2500)
            .map(|number| {
                if number == bad_line {
                    format!("{{\"_id\":\"d{number}\",\"title\":\"bad\",\"year\":\"not a number\"}}\n")
                } else {
                    format!("{{\"_id\":\"d{number}\",\"title\":\"document {number}\",\"year\":2000}}\n")
                }
            })
            .collect();
        std::fs::write(root.join("docs.ndjson"), text).unwrap();
        let error = failure(root, &["put", "--bulk", "--file", "docs.ndjson", "--servers", &server.address], None);
        assert!(error.contains(&format!("line {bad_line}: ")) && error.contains("year"), "{error}");
        assert!(error.contains("nothing was written: 1 of 2500 lines"), "{error}");
        json(root, &["commit", "--servers", &server.address], None);
        let status = json(root, &["status", "--servers", &server.address], None);
        assert_eq!(status["document_count"], 0, "a refused file wrote documents (bad line {bad_line})");
    }
    // The same file without the bad line loads whole.
    let text: String =
        (1..=2500).map(|number| format!("{{\"_id\":\"d{number}\",\"title\":\"document {number}\"}}\n")).collect();
    std::fs::write(root.join("docs.ndjson"), text).unwrap();
    let receipt = json(root, &["put", "--bulk", "--file", "docs.ndjson", "--servers", &server.address], None);
    assert_eq!(receipt["operations"], 2500);
}

/// A line longer than any request the node takes is refused by its number before the CLI holds
/// it whole: a file with one endless line (a binary file, a JSON array without newlines) must
/// not make the CLI's memory grow with it. The same holds for `put --file` and `delete --bulk`.
#[test]
fn an_endless_line_is_refused_without_reading_it_whole() {
    let directory = tempfile::tempdir().unwrap();
    let root = directory.path();
    let server = serve(root, &["--commit-interval", "0"]);
    // 96 MiB without a newline after a valid first line; requests are at most 1 MiB here. The
    // files are written a MiB at a time: the peak that wait4 reports for the CLI includes this
    // process's own peak (the child shares its memory until exec), which must stay small.
    let endless = |name: &str, start: &str| {
        use std::io::Write;
        let mut file = std::io::BufWriter::new(std::fs::File::create(root.join(name)).unwrap());
        file.write_all(start.as_bytes()).unwrap();
        let megabyte = vec![b'x'; 1 << 20];
        for _ in 0..96 {
            file.write_all(&megabyte).unwrap();
        }
        file.flush().unwrap();
    };
    endless("endless.ndjson", "{\"_id\":\"a\"}\n{\"_id\":\"big\",\"title\":\"");
    endless("endless.json", "{\"_id\":\"big\",\"title\":\"");
    endless("endless-ids.ndjson", "a\n");
    let limit = ["--max-frame-bytes", "1048576", "--servers", &server.address];
    for (command, expected) in [
        (vec!["put", "--bulk", "--file", "endless.ndjson"], "line 2: longer than 1048576 bytes"),
        (vec!["delete", "--bulk", "--file", "endless-ids.ndjson"], "line 2: longer than 1048576 bytes"),
        (vec!["put", "--file", "endless.json"], "larger than 1048576 bytes"),
    ] {
        let arguments: Vec<&str> = command.iter().chain(limit.iter()).copied().collect();
        let run = process::run_measuring_memory(root, &arguments);
        eprintln!("bayard {command:?}: peak {} MB", run.peak_resident_bytes >> 20);
        assert!(!run.success, "bayard {command:?} took an endless line");
        assert!(run.stderr.contains(expected) && run.stderr.contains("--max-frame-bytes"), "{}", run.stderr);
        // The CLI itself needs a few tens of MB; holding the line would take at least 96 MiB.
        assert!(
            run.peak_resident_bytes < 64 << 20,
            "bayard {command:?} held {} MB to refuse the line",
            run.peak_resident_bytes >> 20
        );
    }
    // Nothing was written, and the same node still takes an ordinary load.
    json(root, &["commit", "--servers", &server.address], None);
    assert_eq!(json(root, &["status", "--servers", &server.address], None)["document_count"], 0);
    std::fs::write(root.join("docs.ndjson"), "{\"_id\":\"a\"}\n{\"_id\":\"b\"}\n").unwrap();
    let receipt = json(root, &["put", "--bulk", "--file", "docs.ndjson", "--servers", &server.address], None);
    assert_eq!(receipt["operations"], 2);
}

/// Each ordinary mistake gets an error that names the fix, printed once.
#[test]
fn errors_name_the_fix() {
    let directory = tempfile::tempdir().unwrap();
    let root = directory.path();
    let server = serve(root, &["--commit-interval", "0"]);
    let port = server.address.rsplit(':').next().unwrap().to_string();
    let once = |error: &str, needle: &str| {
        assert!(error.contains(needle), "{error}");
        assert_eq!(error.lines().filter(|line| line.starts_with("error:")).count(), 1, "printed once: {error}");
    };

    once(&failure(root, &["certs", "ca", "--out-dir", "certs"], None), "pass --force");
    // Outside the directory that holds the development certificates.
    let elsewhere = tempfile::tempdir().unwrap();
    let error = failure(elsewhere.path(), &["status", "--servers", &server.address], None);
    once(&error, "pass --ca, --cert and --key (or set BAYARD_CA, BAYARD_CERT and BAYARD_KEY)");
    once(
        &failure(root, &["put", "--servers", &server.address, r#"{"title":"no id"}"#], None),
        "give --id <id>, or an \"_id\" field",
    );
    // A second node on the same data directory, and on the same port.
    let error = failure(root, &["serve", "--port", "0", "--commit-interval", "0"], None);
    once(&error, "data directory data/1 is in use by another bayard process");
    let error = failure(root, &["serve", "--port", &port, "--data-directory", "other"], None);
    once(&error, &format!("port {port} is in use"));
    assert!(!root.join("other").exists(), "a failed start left a new data directory behind");
    // A server that does not answer: the client gives up within --timeout, with one line.
    let dead = process::free_udp_port().to_string();
    let started = std::time::Instant::now();
    let error = failure(root, &["status", "--servers", &format!("127.0.0.1:{dead}"), "--timeout", "1s"], None);
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    once(&error, "no server answered");
    assert_eq!(error.matches(&dead).count(), 1, "{error}");
    // A host alone means the default port; `delete` says when nothing was there.
    let output = process::run(root, &["status", "--servers", "localhost", "--timeout", "2s"], None);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("localhost:5001") || output.status.success(), "{stderr}");
    let deleted = json(root, &["delete", "--servers", &server.address, "--id", "nosuch"], None);
    assert_eq!(deleted["deleted"], 0);
    assert!(deleted["note"].as_str().unwrap().contains("nosuch"));
    json(root, &["put", "--servers", &server.address, "--id", "here", r#"{"title":"here"}"#], None);
    json(root, &["commit", "--servers", &server.address], None);
    assert_eq!(json(root, &["delete", "--servers", &server.address, "--id", "here"], None)["deleted"], 1);
}

/// The original Bayard's forms: refused with what to use instead, or accepted.
#[test]
fn forms_of_the_original_bayard_are_answered() {
    let directory = tempfile::tempdir().unwrap();
    let root = directory.path();
    let cases: &[(&[&str], &str)] = &[
        (
            &["serve", "--host=0.0.0.0", "--raft-port=7001", "--index-port=5001", "--metrics-port=9001", "1"],
            "use --port",
        ),
        (&["serve", "--peer-raft-address=0.0.0.0:7001"], "use --peers \"1=host:port\""),
        (&["serve", "--data-directory=./data/1", "1"], "use `bayard serve --id 1`"),
    ];
    for (arguments, hint) in cases {
        let output = process::run(root, arguments, None);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{arguments:?}: {stderr}");
        assert!(stderr.contains(hint) && stderr.contains("docs/migrating.md"), "{arguments:?}: {stderr}");
        assert!(!stderr.contains("similar argument"), "{arguments:?}: {stderr}");
    }
    // `--server` and a positional id for `leave` are accepted.
    let server = serve(root, &["--commit-interval", "0"]);
    let status = json(root, &["status", &format!("--server={}", server.address)], None);
    assert_eq!(status["node_id"], 1);
    let error = failure(root, &["leave", "--server", &server.address, "3"], None);
    assert!(error.contains("node 3 is not a member"), "{error}");
    let error = failure(root, &["leave", "--server", &server.address, "--id", "3"], None);
    assert!(error.contains("node 3 is not a member"), "{error}");
}

#[test]
fn a_join_whose_seeds_never_answer_gives_up_naming_them() {
    let directory = tempfile::tempdir().unwrap();
    let root = directory.path();
    let dead = process::free_udp_port();
    let peers = format!("1=127.0.0.1:{dead}");
    let started = std::time::Instant::now();
    let output = process::run(
        root,
        &["serve", "--id", "2", "--port", "0", "--peers", &peers, "--join-timeout", "2s", "--log-format", "json"],
        None,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.contains("gave up after 2s") && last.contains(&peers) && last.contains("--join-timeout"), "{last}");
    assert!(stderr.contains("no seed answered"), "warns while it retries: {stderr}");
}

#[test]
fn development_certificates_take_extra_names_and_logs_to_files_have_no_colour() {
    let directory = tempfile::tempdir().unwrap();
    let root = directory.path();
    let mut child = std::process::Command::new(process::binary())
        .current_dir(root)
        .args(["serve", "--port", "0", "--dev-san", "search-1.example,10.1.2.3", "--log-format", "text"])
        .env_remove("NO_COLOR")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = Vec::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
        let listening = line.contains("node listening");
        lines.push(line);
        if listening || lines.len() > 200 {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = lines.join("\n");
    assert!(text.contains("node listening"), "{text}");
    assert!(!text.contains('\u{1b}'), "colour codes in a log that is not a terminal: {text}");
    let names = bayard::certs::certificate_names(&root.join("certs/node-1.pem")).unwrap();
    for wanted in ["search-1.example", "10.1.2.3", "localhost", "127.0.0.1"] {
        assert!(names.iter().any(|name| name == wanted), "{wanted} missing from {names:?}");
    }
}

#[test]
fn api_keys_and_json_searches_from_the_command_line() {
    let directory = tempfile::tempdir().unwrap();
    let root = directory.path();
    let server = serve(root, &["--commit-interval", "0s"]);
    let servers = server.address.as_str();
    let created = json(root, &["keys", "create", "--servers", servers, "--name", "web", "--read-only"], None);
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(
        (created["role"].clone(), created["read_only"].clone()),
        (serde_json::json!("client"), serde_json::json!(true))
    );
    assert!(created["key"].as_str().is_some_and(|key| key.len() >= 40));
    assert!(created["encoded"].is_string());
    let listed = json(root, &["keys", "list", "--servers", servers], None);
    assert_eq!(listed["keys"][0]["id"], id.as_str());
    assert!(!listed.to_string().contains(created["key"].as_str().unwrap()), "the list shows no secret");

    json(root, &["put", "--servers", servers, "--id", "1", r#"{"title":"Hello json","year":2024}"#], None);
    json(root, &["put", "--servers", servers, "--id", "2", r#"{"title":"Other","year":2020}"#], None);
    json(root, &["commit", "--servers", servers], None);
    let found = json(
        root,
        &[
            "search",
            "--servers",
            servers,
            "--query-json",
            r#"{"bool":{"should":[{"match":{"title":"hello"}},{"range":{"year":{"lte":2020}}}]}}"#,
            "--aggs-json",
            r#"{"years":{"terms":{"field":"year"}}}"#,
            "--highlight",
            "title",
            "--sort",
            "year:desc",
        ],
        None,
    );
    assert_eq!(found["total"]["value"], 2, "{found}");
    assert_eq!(found["hits"][0]["id"], "1");
    assert_eq!(found["hits"][0]["highlight"]["title"][0], "<em>Hello</em> json");
    assert_eq!(found["aggregations"]["years"]["buckets"].as_array().unwrap().len(), 2);
    let refused = failure(root, &["search", "--servers", servers, "--query-json", r#"{"geo_shape":{}}"#], None);
    assert!(refused.contains("geo_shape"), "{refused}");

    let revoked = json(root, &["keys", "revoke", "--servers", servers, "--id", &id], None);
    assert_eq!(revoked["revoked"], id.as_str());
    assert_eq!(json(root, &["keys", "list", "--servers", servers], None)["keys"], serde_json::json!([]));
    let unknown = failure(root, &["keys", "revoke", "--servers", servers, "--id", &id], None);
    assert!(unknown.contains("no key with id"), "{unknown}");
}
