//! `tantivy serve` from tantivy-cli, the plain HTTP tantivy server that the search bench
//! compares against, run as a child process on loopback.
//!
//! tantivy-cli is not built by this project: `just bench-tools` installs it from crates.io into
//! `target/bench-tools` (or `BAYARD_BENCH_TANTIVY_CLI` names a binary). It knows only tantivy's
//! built-in analyzers, so its index has the node's schema with `en_stem` (simple tokenizer, long
//! tokens removed, lower case, English stemmer) where the node uses `lang_en` (the same plus
//! ASCII folding and a stop-word list). Its queries have those stop words removed, so both
//! servers look up the same terms.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bayard::index::{load_schema, DEFAULT_SCHEMA_JSON, DEFAULT_TOKENIZER_JSON};

use super::corpus;

/// Where the tantivy-cli binary is, if it is there.
pub fn binary() -> Option<PathBuf> {
    let path = match std::env::var_os("BAYARD_BENCH_TANTIVY_CLI") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-tools/bin/tantivy"),
    };
    path.is_file().then_some(path)
}

/// A running `tantivy serve` over its own copy of the corpus.
pub struct TantivyServe {
    child: Child,
    pub address: SocketAddr,
    /// Its index, built with tantivy's default settings.
    pub directory: tempfile::TempDir,
    stop_words: Vec<String>,
}

impl TantivyServe {
    /// Indexes `articles` (as the node's documents) with the built-in analyzers, then starts
    /// `tantivy serve` on it and waits until it answers.
    pub fn start(binary: &std::path::Path, articles: &[corpus::Article]) -> Self {
        let directory = tempfile::tempdir().expect("temp dir");
        let schema_json =
            DEFAULT_SCHEMA_JSON.replace("\"lang_en\"", "\"en_stem\"").replace("\"keyword_lowercase\"", "\"raw\"");
        let schema = load_schema(&schema_json).expect("schema with built-in analyzers");
        let index = tantivy::Index::create_in_dir(directory.path(), schema.clone()).expect("index");
        super::index_articles(&index, &schema, articles);

        // A free port: bound, read, released; tantivy serve takes it a moment later.
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port();
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(binary)
            .args(["serve", "--index"])
            .arg(directory.path())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tantivy serve");
        let stop_words = lang_en_stop_words();
        let server = TantivyServe { child, address, directory, stop_words };
        let started = Instant::now();
        loop {
            if server.search_blocking("dictionary").is_ok() {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "tantivy serve did not answer within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// The query as tantivy serve gets it: the node's stop words taken out.
    pub fn query_for(&self, text: &str) -> String {
        let words: Vec<&str> = text
            .split_whitespace()
            .filter(|word| !self.stop_words.iter().any(|stop_word| stop_word.eq_ignore_ascii_case(word)))
            .collect();
        if words.is_empty() {
            text.to_string()
        } else {
            words.join(" ")
        }
    }

    /// One search, top 10 with the count and the stored documents, on a new connection
    /// (`Connection: close`, as its server handles one request per connection best). Returns
    /// the response's size.
    pub fn search_blocking(&self, query: &str) -> Result<usize, String> {
        let mut stream = TcpStream::connect(self.address).map_err(|error| error.to_string())?;
        stream.set_nodelay(true).map_err(|error| error.to_string())?;
        let request = format!(
            "GET /api/?q={}&nhits=10 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            percent_encode(query)
        );
        stream.write_all(request.as_bytes()).map_err(|error| error.to_string())?;
        let mut response = Vec::with_capacity(16 * 1024);
        stream.read_to_end(&mut response).map_err(|error| error.to_string())?;
        if !response.starts_with(b"HTTP/1.1 200") && !response.starts_with(b"HTTP/1.0 200") {
            let head = String::from_utf8_lossy(&response[..response.len().min(200)]).into_owned();
            return Err(format!("tantivy serve answered {head:?}"));
        }
        Ok(response.len())
    }

    /// CPU time of the server process so far.
    pub fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
        let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = |index: usize| fields.get(index).and_then(|field| field.parse::<u64>().ok()).unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let total = ticks(11) + ticks(12);
        Duration::from_micros(total * 1_000_000 / ticks_per_second)
    }
}

impl Drop for TantivyServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lang_en_stop_words() -> Vec<String> {
    let config: serde_json::Value = serde_json::from_str(DEFAULT_TOKENIZER_JSON).expect("tokenizer file");
    config["analyzers"]["lang_en"]["filters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|filter| filter["name"] == "stop_word")
        .flat_map(|filter| filter["words"].as_array().cloned().unwrap_or_default())
        .filter_map(|word| word.as_str().map(str::to_string))
        .collect()
}

fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}
