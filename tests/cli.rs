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
