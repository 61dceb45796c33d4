//! The benchmarks' corpus: real English text, the articles of the GNU Collaborative
//! International Dictionary of English as Debian packages it (`dict-gcide`), fetched with
//! `apt-get download` into `target/bench-corpus/` on first use (about 15 MB) and kept there.
//! Every article becomes a document: its headword as `title`, its text as `body`. Queries are
//! runs of two to five words taken from the articles themselves.

use std::path::PathBuf;
use std::process::Command;

pub struct Article {
    pub title: String,
    pub body: String,
}

fn corpus_directory() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("target"));
    target.join("bench-corpus")
}

fn run(command: &mut Command, what: &str) {
    let status = command.status().unwrap_or_else(|error| panic!("cannot run {what}: {error}"));
    assert!(status.success(), "{what} failed ({status}); the benchmarks need Debian's apt-get, dpkg-deb and gzip");
}

/// The dictionary text and index, fetched and unpacked once.
fn dictionary_files() -> (PathBuf, PathBuf) {
    let directory = corpus_directory();
    let dictionary = directory.join("gcide.dict");
    let index = directory.join("gcide.index");
    if dictionary.exists() && index.exists() {
        return (dictionary, index);
    }
    std::fs::create_dir_all(&directory).expect("corpus directory");
    eprintln!("fetching the corpus: apt-get download dict-gcide into {}", directory.display());
    run(
        Command::new("apt-get").arg("download").arg("dict-gcide").current_dir(&directory),
        "apt-get download dict-gcide",
    );
    let package = std::fs::read_dir(&directory)
        .expect("corpus directory")
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|extension| extension == "deb"))
        .expect("the downloaded package");
    let unpacked = directory.join("unpacked");
    run(Command::new("dpkg-deb").arg("-x").arg(&package).arg(&unpacked), "dpkg-deb -x");
    let shared = unpacked.join("usr/share/dictd");
    std::fs::copy(shared.join("gcide.index"), &index).expect("copy the index");
    let compressed = std::fs::File::open(shared.join("gcide.dict.dz")).expect("gcide.dict.dz");
    let output = std::fs::File::create(&dictionary).expect("gcide.dict");
    run(Command::new("gzip").arg("-dc").stdin(compressed).stdout(output), "gzip -dc gcide.dict.dz");
    (dictionary, index)
}

/// dictd's base-64 numbers (offsets and lengths in the index).
fn decode_number(text: &str) -> Option<usize> {
    const DIGITS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    text.bytes().try_fold(0_usize, |value, byte| Some(value * 64 + DIGITS.iter().position(|&digit| digit == byte)?))
}

/// Up to `count` articles, spread evenly over the dictionary (so every letter is in).
pub fn articles(count: usize) -> Vec<Article> {
    let (dictionary, index) = dictionary_files();
    let text = std::fs::read(&dictionary).expect("read the dictionary");
    let index = std::fs::read_to_string(&index).expect("read the index");
    let mut entries: Vec<(usize, usize, &str)> = index
        .lines()
        .filter(|line| !line.starts_with("00-database"))
        .filter_map(|line| {
            let mut fields = line.split('\t');
            let (headword, offset, length) = (fields.next()?, fields.next()?, fields.next()?);
            Some((decode_number(offset)?, decode_number(length)?, headword))
        })
        .collect();
    entries.sort_by_key(|(offset, _, _)| *offset);
    entries.dedup_by_key(|(offset, _, _)| *offset);
    let stride = (entries.len() / count.max(1)).max(1);
    entries
        .iter()
        .step_by(stride)
        .take(count)
        .filter_map(|(offset, length, headword)| {
            let body = std::str::from_utf8(text.get(*offset..offset + length)?).ok()?;
            // Articles are a few hundred characters; the few very long ones are cut.
            let body: String = body.chars().take(2000).collect();
            Some(Article { title: headword.to_string(), body: body.split_whitespace().collect::<Vec<_>>().join(" ") })
        })
        .collect()
}

/// `count` queries of two to five words, each a run of words from an article's text.
pub fn queries(articles: &[Article], count: usize) -> Vec<String> {
    let mut queries = Vec::with_capacity(count);
    let mut number = 0_usize;
    while queries.len() < count && number < articles.len() * 4 {
        let article = &articles[(number * 7919) % articles.len()];
        let words: Vec<String> = article
            .body
            .split(|character: char| !character.is_ascii_alphabetic())
            .filter(|word| word.len() >= 3)
            .map(str::to_lowercase)
            .collect();
        let length = 2 + number % 4;
        if words.len() >= length + 2 {
            let start = (number * 31) % (words.len() - length);
            queries.push(words[start..start + length].join(" "));
        }
        number += 1;
    }
    queries
}

/// The articles as bayard's bulk NDJSON documents (`_id`, `title`, `body`).
pub fn document_json(number: usize, article: &Article) -> String {
    serde_json::json!({"_id": format!("a{number}"), "title": article.title, "body": article.body}).to_string()
}
