use std::collections::HashSet;
use std::path::Path;

use tantivy::schema::{
    DateOptions, DateTimePrecision, FacetOptions, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, FAST,
    INDEXED, STORED, STRING, TEXT,
};
use tempfile::TempDir;

use super::*;

const TEST_WRITER_MEMORY_BYTES: usize = 30_000_000;

fn analyzed_text(tokenizer: &str, record: IndexRecordOption) -> TextOptions {
    TextOptions::default()
        .set_indexing_options(TextFieldIndexing::default().set_tokenizer(tokenizer).set_index_option(record))
        .set_stored()
}

/// The shipped `etc/schema.json`, built with tantivy's API (without `_id`).
fn example_schema_built_in_code() -> Schema {
    let mut builder = Schema::builder();
    builder.add_text_field("title", analyzed_text("lang_en", IndexRecordOption::WithFreqsAndPositions));
    builder.add_text_field("body", analyzed_text("lang_en", IndexRecordOption::WithFreqsAndPositions));
    builder.add_text_field("url", STRING | STORED);
    builder.add_text_field("tags", analyzed_text("keyword_lowercase", IndexRecordOption::Basic));
    builder.add_facet_field("category", FacetOptions::default().set_stored());
    builder.add_i64_field("year", INDEXED | STORED | FAST);
    builder.add_u64_field("popularity", STORED | FAST);
    builder.add_f64_field("rating", INDEXED | STORED | FAST);
    builder.add_date_field(
        "published",
        DateOptions::from(INDEXED | STORED | FAST).set_precision(DateTimePrecision::Seconds),
    );
    builder.build()
}

fn default_analyzers() -> AnalyzerConfig {
    AnalyzerConfig::from_json(DEFAULT_TOKENIZER_JSON).unwrap()
}

fn open_at(directory: &Path) -> SearchIndex {
    let schema = load_schema(DEFAULT_SCHEMA_JSON).unwrap();
    SearchIndex::open_or_create(directory, schema, &default_analyzers(), TEST_WRITER_MEMORY_BYTES).unwrap()
}

fn open_example_index() -> (TempDir, SearchIndex) {
    let directory = tempfile::tempdir().unwrap();
    let index = open_at(directory.path());
    (directory, index)
}

fn put(index: &SearchIndex, id: &str, document_json: &str) {
    let operation = index.prepare_put(id, document_json).unwrap();
    index.apply(&[operation], None).unwrap();
}

fn commit(index: &SearchIndex) {
    index.commit(None).unwrap();
}

fn search(index: &SearchIndex, request: SearchRequest) -> SearchResponse {
    index.search(&request).unwrap()
}

fn query(query_text: &str, limit: usize) -> SearchRequest {
    SearchRequest { query: query_text.to_string(), limit, ..SearchRequest::default() }
}

fn hit_ids(response: &SearchResponse) -> Vec<String> {
    response.docs.iter().map(|hit| hit.id.clone()).collect()
}

fn fields(document: &StoredDocument) -> serde_json::Value {
    serde_json::from_str(&document.fields_json).unwrap()
}

fn error_message<T: std::fmt::Debug>(result: Result<T, IndexError>) -> String {
    result.unwrap_err().to_string()
}

/// Ten books with distinct years and ratings, committed.
fn index_with_books() -> (TempDir, SearchIndex) {
    let (directory, index) = open_example_index();
    let books = [
        ("b1", "/lang/rust", 2015, 4.5),
        ("b2", "/lang/rust", 2018, 3.0),
        ("b3", "/lang/go", 2016, 4.9),
        ("b4", "/lang/go", 2012, 2.5),
        ("b5", "/lang/python", 2020, 4.0),
        ("b6", "/lang/rust/async", 2021, 4.7),
        ("b7", "/cooking", 2010, 3.3),
        ("b8", "/cooking/italian", 2019, 4.1),
        ("b9", "/lang/python", 2011, 1.5),
        ("b10", "/lang/rust", 2023, 3.9),
    ];
    let mut operations = Vec::new();
    for (id, category, year, rating) in books {
        let document = serde_json::json!({
            "title": format!("book {id}"),
            "category": category,
            "year": year,
            "rating": rating,
        });
        operations.push(index.prepare_put(id, &document.to_string()).unwrap());
    }
    operations.push(IndexOperation::Commit);
    index.apply(&operations, None).unwrap();
    (directory, index)
}

// ---------------------------------------------------------------------------------------------
// Shipped files, schema and tokenizer file

#[test]
fn shipped_schema_matches_the_schema_built_in_code() {
    let loaded = load_schema(DEFAULT_SCHEMA_JSON).unwrap();
    let mut expected_fields: Vec<serde_json::Value> =
        serde_json::from_str(&serde_json::to_string(&example_schema_built_in_code()).unwrap()).unwrap();
    // `load_schema` appends `_id` as a raw, stored string field.
    let mut id_only = Schema::builder();
    id_only.add_text_field(ID_FIELD, STRING | STORED);
    let id_entry: Vec<serde_json::Value> =
        serde_json::from_str(&serde_json::to_string(&id_only.build()).unwrap()).unwrap();
    expected_fields.extend(id_entry);
    let loaded_fields: serde_json::Value = serde_json::from_str(&serde_json::to_string(&loaded).unwrap()).unwrap();
    assert_eq!(loaded_fields, serde_json::Value::Array(expected_fields));
}

#[test]
fn shipped_files_open_an_index_and_stem_english() {
    let (_directory, index) = open_example_index();
    assert!(index.schema().get_field(ID_FIELD).is_ok());
    let schema_json: serde_json::Value = serde_json::from_str(&index.schema_json()).unwrap();
    assert!(schema_json.is_array());
    put(
        &index,
        "doc-1",
        r#"{"title": "How to run a marathon", "body": "Running is hard", "url": "https://example.com/1",
            "tags": ["Sport", "Health"], "category": "/sport/running", "year": 2020,
            "popularity": 7, "rating": 4.5, "published": "2020-05-01T10:00:00Z"}"#,
    );
    commit(&index);
    // "running" is stemmed to "run", which the title contains.
    let response = search(&index, query("title:running", 10));
    assert_eq!(hit_ids(&response), vec!["doc-1"]);
    // Default fields include every indexed text field: the lowercased keyword tag matches.
    let response = search(&index, query("health", 10));
    assert_eq!(hit_ids(&response), vec!["doc-1"]);
    // Stop words are removed: "the" matches nothing.
    assert_eq!(search(&index, query("the", 10)).count, Some(0));
    assert!(index.schema().get_field("title").is_ok());
}

#[test]
fn shipped_tokenizer_file_declares_the_documented_analyzers() {
    let analyzers = default_analyzers();
    let names: Vec<&str> = analyzers.analyzer_names().collect();
    for expected in ["lang_en", "lang_fr", "ngram_2_3", "autocomplete", "keyword_lowercase", "whitespace_lowercase"] {
        assert!(names.contains(&expected), "missing analyzer {expected}");
    }
}

#[test]
fn load_schema_keeps_a_valid_explicit_id_field() {
    let mut builder = Schema::builder();
    builder.add_text_field("title", TEXT);
    builder.add_text_field(ID_FIELD, STRING | STORED | FAST);
    let schema_json = serde_json::to_string(&builder.build()).unwrap();
    let schema = load_schema(&schema_json).unwrap();
    assert_eq!(schema.num_fields(), 2);
    assert!(schema.get_field_entry(schema.get_field(ID_FIELD).unwrap()).is_fast());
}

#[test]
fn load_schema_rejects_bad_files() {
    let message = error_message(load_schema("{not json"));
    assert!(message.starts_with("invalid schema: cannot parse the schema"), "{message}");

    let message = error_message(load_schema(r#"{"name": "title"}"#));
    assert!(message.contains("needs `fields`"), "{message}");
    let message = error_message(load_schema(r#"{"fields": [], "boosts": {}}"#));
    assert!(message.contains("unknown key `boosts`"), "{message}");

    let message = error_message(load_schema("[]"));
    assert!(message.contains("declares no field"), "{message}");

    let mut builder = Schema::builder();
    builder.add_text_field("title", TEXT);
    let single = serde_json::to_value(builder.build()).unwrap();
    let duplicated = serde_json::Value::Array(vec![single[0].clone(), single[0].clone()]);
    let message = error_message(load_schema(&duplicated.to_string()));
    assert!(message.contains("field `title` is declared more than once"), "{message}");

    let mut renamed = single[0].clone();
    renamed["name"] = serde_json::json!("-title");
    let message = error_message(load_schema(&serde_json::json!([renamed]).to_string()));
    assert!(message.contains("field name `-title` is invalid"), "{message}");
}

#[test]
fn load_schema_rejects_an_unusable_id_field() {
    let schema_with_id = |id_options: Option<TextOptions>, id_as_integer: bool| {
        let mut builder = Schema::builder();
        builder.add_text_field("title", TEXT);
        if id_as_integer {
            builder.add_i64_field(ID_FIELD, INDEXED | STORED);
        } else if let Some(options) = id_options {
            builder.add_text_field(ID_FIELD, options);
        }
        serde_json::to_string(&builder.build()).unwrap()
    };
    let message = error_message(load_schema(&schema_with_id(None, true)));
    assert!(message.contains("must be a text field"), "{message}");
    let message = error_message(load_schema(&schema_with_id(Some(STRING), false)));
    assert!(message.contains("must be stored"), "{message}");
    let message = error_message(load_schema(&schema_with_id(Some(TEXT | STORED), false)));
    assert!(message.contains("must use the `raw` tokenizer"), "{message}");
    let message = error_message(load_schema(&schema_with_id(Some(TextOptions::default().set_stored()), false)));
    assert!(message.contains("must be indexed"), "{message}");
}

#[test]
fn tokenizer_file_errors_are_clear() {
    let cases = [
        (r#"{"analyzers": {"x": {"tokenizer": {"name": "magic"}}}}"#, "unknown variant `magic`"),
        (
            r#"{"analyzers": {"x": {"tokenizer": {"name": "simple"}, "filters": [{"name": "upper_case"}]}}}"#,
            "unknown variant `upper_case`",
        ),
        (
            r#"{"analyzers": {"x": {"tokenizer": {"name": "simple"}, "filters": [{"name": "stemming", "language": "klingon"}]}}}"#,
            "unknown variant `klingon`",
        ),
        (
            r#"{"analyzers": {"x": {"tokenizer": {"name": "ngram", "min_gram": 3, "max_gram": 2}}}}"#,
            "analyzer `x`: ngram min_gram (3) must not be greater than max_gram (2)",
        ),
        (
            r#"{"analyzers": {"x": {"tokenizer": {"name": "ngram", "min_gram": 0, "max_gram": 2}}}}"#,
            "analyzer `x`: ngram min_gram must be greater than 0",
        ),
        (r#"{"analyzers": {"x": {"tokenizer": {"name": "ngram", "min_gram": 1}}}}"#, "missing field `max_gram`"),
        (
            r#"{"analyzers": {"x": {"tokenizer": {"name": "simple"}, "filters": [{"name": "remove_long", "length_limit": 0}]}}}"#,
            "length_limit must be greater than 0",
        ),
        (r#"{"analyzers": {"default": {"tokenizer": {"name": "simple"}}}}"#, "analyzer name `default` is reserved"),
        (r#"{"analysers": {}}"#, "unknown field `analysers`"),
        (r#"{"analyzers": {"x": {"tokenizer": {"name": "simple", "min_gram": 2}}}}"#, "unknown field `min_gram`"),
        (
            r#"{"analyzers": {"x": {"tokenizer": {"name": "simple"}, "filters": [{"name": "lower_case", "language": "english"}]}}}"#,
            "unknown field `language`",
        ),
        ("[1, 2", "invalid tokenizer file"),
    ];
    for (json, expected) in cases {
        let message = error_message(AnalyzerConfig::from_json(json));
        assert!(message.starts_with("invalid tokenizer file: "), "{json}: {message}");
        assert!(message.contains(expected), "{json}: {message}");
    }
}

#[test]
fn every_stemming_language_of_tantivy_is_accepted() {
    for language in [
        "arabic",
        "danish",
        "dutch",
        "english",
        "finnish",
        "french",
        "german",
        "greek",
        "hungarian",
        "italian",
        "norwegian",
        "portuguese",
        "romanian",
        "russian",
        "spanish",
        "swedish",
        "tamil",
        "turkish",
    ] {
        let json = format!(
            r#"{{"analyzers": {{"x": {{"tokenizer": {{"name": "simple"}}, "filters": [{{"name": "stemming", "language": "{language}"}}]}}}}}}"#
        );
        AnalyzerConfig::from_json(&json).unwrap();
    }
}

#[test]
fn a_field_with_an_undeclared_tokenizer_is_rejected() {
    let mut builder = Schema::builder();
    builder.add_text_field("body", analyzed_text("foo", IndexRecordOption::Basic));
    let schema = load_schema(&serde_json::to_string(&builder.build()).unwrap()).unwrap();
    let directory = tempfile::tempdir().unwrap();
    let index_directory = directory.path().join("index");
    let message = error_message(SearchIndex::open_or_create(
        &index_directory,
        schema,
        &AnalyzerConfig::default(),
        TEST_WRITER_MEMORY_BYTES,
    ));
    assert!(
        message.contains("field `body` uses tokenizer `foo`, which is not declared in the tokenizer file"),
        "{message}"
    );
    // Validation happens before anything is created on disk.
    assert!(!index_directory.exists());
}

#[test]
fn built_in_tokenizers_need_no_declaration() {
    let mut builder = Schema::builder();
    for (name, tokenizer) in [("a", "default"), ("b", "raw"), ("c", "en_stem"), ("d", "whitespace")] {
        builder.add_text_field(name, analyzed_text(tokenizer, IndexRecordOption::Basic));
    }
    let schema = load_schema(&serde_json::to_string(&builder.build()).unwrap()).unwrap();
    let directory = tempfile::tempdir().unwrap();
    SearchIndex::open_or_create(directory.path(), schema, &AnalyzerConfig::default(), TEST_WRITER_MEMORY_BYTES)
        .unwrap();
}

#[test]
fn ngram_analyzers_match_prefixes_and_substrings() {
    let mut builder = Schema::builder();
    builder
        .add_text_field("title_autocomplete", analyzed_text("autocomplete", IndexRecordOption::WithFreqsAndPositions));
    builder.add_text_field("title_ngram", analyzed_text("ngram_2_3", IndexRecordOption::WithFreqsAndPositions));
    let schema = load_schema(&serde_json::to_string(&builder.build()).unwrap()).unwrap();
    let directory = tempfile::tempdir().unwrap();
    let index =
        SearchIndex::open_or_create(directory.path(), schema, &default_analyzers(), TEST_WRITER_MEMORY_BYTES).unwrap();
    put(&index, "1", r#"{"title_autocomplete": "Programming Rust", "title_ngram": "Programming Rust"}"#);
    put(&index, "2", r#"{"title_autocomplete": "Cooking pasta", "title_ngram": "Cooking pasta"}"#);
    commit(&index);
    // "Prog" is a prefix of the first title only (prefix n-grams: p, pr, pro, prog).
    let response = search(&index, query("title_autocomplete:Prog", 10));
    assert_eq!(hit_ids(&response), vec!["1"]);
    // A phrase of all prefix n-grams of "rust" is not a prefix of either title.
    let response = search(&index, query("title_autocomplete:\"rust\"", 10));
    assert_eq!(response.count, Some(0));
    // 2-3 grams match substrings: "ust" only occurs in the first title.
    let response = search(&index, query("title_ngram:ust", 10));
    assert_eq!(hit_ids(&response), vec!["1"]);
}

// ---------------------------------------------------------------------------------------------
// Operations

#[test]
fn put_twice_upserts_one_document_with_the_latest_content() {
    let (_directory, index) = open_example_index();
    put(&index, "a", r#"{"title": "first version"}"#);
    commit(&index);
    put(&index, "a", r#"{"title": "second version"}"#);
    commit(&index);
    assert_eq!(index.document_count(), 1);
    let document = index.get("a").unwrap().unwrap();
    assert_eq!(document.id, "a");
    assert_eq!(fields(&document)["title"], "second version");

    // Several puts of the same id in one batch: the last one wins.
    let operations = vec![
        index.prepare_put("b", r#"{"title": "one"}"#).unwrap(),
        index.prepare_put("b", r#"{"title": "two"}"#).unwrap(),
        index.prepare_put("b", r#"{"title": "three"}"#).unwrap(),
        IndexOperation::Commit,
    ];
    let outcome = index.apply(&operations, None).unwrap();
    assert_eq!(outcome, ApplyOutcome { committed: true, documents_put: 3, documents_deleted: 0 });
    assert_eq!(index.document_count(), 2);
    assert_eq!(fields(&index.get("b").unwrap().unwrap())["title"], "three");
    assert_eq!(search(&index, query("title:one", 10)).count, Some(0));
}

#[test]
fn delete_removes_the_document() {
    let (_directory, index) = open_example_index();
    put(&index, "a", r#"{"title": "alpha"}"#);
    put(&index, "b", r#"{"title": "beta"}"#);
    commit(&index);
    let outcome = index
        .apply(
            &[
                IndexOperation::Delete { id: "a".to_string() },
                IndexOperation::Delete { id: "missing".to_string() },
                IndexOperation::Commit,
            ],
            None,
        )
        .unwrap();
    assert_eq!(outcome.documents_deleted, 2);
    assert!(outcome.committed);
    assert_eq!(index.get("a").unwrap(), None);
    assert!(index.get("b").unwrap().is_some());
    assert_eq!(index.document_count(), 1);
    // A put after a delete in the same batch brings the document back.
    index
        .apply(
            &[
                IndexOperation::Delete { id: "b".to_string() },
                index.prepare_put("b", r#"{"title": "beta again"}"#).unwrap(),
                IndexOperation::Commit,
            ],
            None,
        )
        .unwrap();
    assert_eq!(fields(&index.get("b").unwrap().unwrap())["title"], "beta again");
}

#[test]
fn rollback_discards_uncommitted_changes() {
    let (_directory, index) = open_example_index();
    put(&index, "kept", r#"{"title": "kept"}"#);
    commit(&index);
    put(&index, "discarded", r#"{"title": "discarded"}"#);
    index.apply(&[IndexOperation::Delete { id: "kept".to_string() }], None).unwrap();
    assert!(index.has_uncommitted_changes());
    index.apply(&[IndexOperation::Rollback], None).unwrap();
    assert!(!index.has_uncommitted_changes());
    commit(&index);
    assert_eq!(index.document_count(), 1);
    assert!(index.get("kept").unwrap().is_some());
    assert_eq!(index.get("discarded").unwrap(), None);
    // The writer keeps working after a rollback.
    put(&index, "after", r#"{"title": "after rollback"}"#);
    commit(&index);
    assert_eq!(index.document_count(), 2);
}

#[test]
fn searches_and_gets_see_committed_data_only() {
    let (_directory, index) = open_example_index();
    assert!(!index.has_uncommitted_changes());
    put(&index, "a", r#"{"title": "invisible until committed"}"#);
    assert!(index.has_uncommitted_changes());
    assert_eq!(search(&index, query("*", 10)).count, Some(0));
    assert_eq!(index.get("a").unwrap(), None);
    assert_eq!(index.document_count(), 0);
    commit(&index);
    assert!(!index.has_uncommitted_changes());
    assert_eq!(search(&index, query("invisible", 10)).count, Some(1));
    assert!(index.get("a").unwrap().is_some());
    assert_eq!(index.document_count(), 1);
}

#[test]
fn reopen_keeps_committed_documents_and_the_commit_payload() {
    let directory = tempfile::tempdir().unwrap();
    {
        let index = open_at(directory.path());
        assert_eq!(index.last_commit_payload().unwrap(), None);
        put(&index, "committed", r#"{"title": "committed"}"#);
        let outcome = index.apply(&[IndexOperation::Commit], Some(r#"{"term":3,"index":42}"#)).unwrap();
        assert!(outcome.committed);
        assert_eq!(index.last_commit_payload().unwrap().as_deref(), Some(r#"{"term":3,"index":42}"#));
        put(&index, "uncommitted", r#"{"title": "lost"}"#);
    }
    let index = open_at(directory.path());
    assert_eq!(index.last_commit_payload().unwrap().as_deref(), Some(r#"{"term":3,"index":42}"#));
    assert_eq!(index.document_count(), 1);
    assert!(index.get("committed").unwrap().is_some());
    assert_eq!(index.get("uncommitted").unwrap(), None);
    // The analyzers are registered again on open: stemming still works on the new writer.
    put(&index, "second", r#"{"title": "runners running"}"#);
    index.commit(Some("next")).unwrap();
    assert_eq!(hit_ids(&search(&index, query("run", 10))), vec!["second"]);
    assert_eq!(index.last_commit_payload().unwrap().as_deref(), Some("next"));
    assert_eq!(index.index_directory(), directory.path());
}

#[test]
fn reopening_with_a_different_schema_is_an_error() {
    let directory = tempfile::tempdir().unwrap();
    drop(open_at(directory.path()));
    let mut builder = Schema::builder();
    builder.add_text_field("title", TEXT | STORED);
    let other_schema = load_schema(&serde_json::to_string(&builder.build()).unwrap()).unwrap();
    let message = error_message(SearchIndex::open_or_create(
        directory.path(),
        other_schema,
        &default_analyzers(),
        TEST_WRITER_MEMORY_BYTES,
    ));
    assert!(message.contains("was created with a different schema"), "{message}");
    assert!(message.contains("field `title` has different options"), "{message}");
    assert!(message.contains("field `body` exists in the index but not in the schema file"), "{message}");
}

#[test]
fn merge_combines_segments() {
    let (_directory, index) = open_example_index();
    for round in 0..3 {
        put(&index, &format!("doc-{round}"), r#"{"title": "merge me"}"#);
        commit(&index);
    }
    put(&index, "doc-0", r#"{"title": "merge me again"}"#);
    commit(&index);
    assert!(index.segment_count() >= 2);
    // The merge runs in the background: applying it returns at once, the segments become one
    // soon after (waited for, bounded).
    index.apply(&[IndexOperation::Merge], None).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while index.segment_count() != 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(index.segment_count(), 1);
    assert_eq!(index.document_count(), 3);
    assert_eq!(search(&index, query("merge", 10)).count, Some(3));
    // Merging a single segment is a no-op.
    index.apply(&[IndexOperation::Merge], None).unwrap();
    assert_eq!(index.segment_count(), 1);
}

#[test]
fn get_renders_stored_fields() {
    let (_directory, index) = open_example_index();
    put(
        &index,
        "doc",
        r#"{"title": "Title", "tags": ["one", "two"], "category": "/lang/rust", "year": 2020,
            "popularity": 12, "rating": 4.25, "published": "2021-03-04T05:06:07Z",
            "url": ["https://only.one/"]}"#,
    );
    commit(&index);
    let document = index.get("doc").unwrap().unwrap();
    assert_eq!(document.id, "doc");
    assert_eq!(
        fields(&document),
        serde_json::json!({
            "title": "Title",
            "tags": ["one", "two"],
            "category": "/lang/rust",
            "year": 2020,
            "popularity": 12,
            "rating": 4.25,
            "published": "2021-03-04T05:06:07Z",
            "url": "https://only.one/",
        })
    );
    assert_eq!(index.get("nope").unwrap(), None);
}

#[test]
fn a_put_that_fails_at_apply_time_is_an_error_not_a_panic() {
    let (_directory, index) = open_example_index();
    let malformed = IndexOperation::Put { id: "x".to_string(), document_json: "{broken".to_string() };
    assert!(index.apply(&[malformed], None).is_err());
    let unknown_field =
        IndexOperation::Put { id: "x".to_string(), document_json: r#"{"_id": "x", "nope": 1}"#.to_string() };
    assert!(index.apply(&[unknown_field], None).is_err());
    let mismatched_id = IndexOperation::Put { id: "x".to_string(), document_json: r#"{"_id": "y"}"#.to_string() };
    assert!(index.apply(&[mismatched_id], None).is_err());
    // A Put whose JSON lacks `_id` gets it from the operation.
    let without_id =
        IndexOperation::Put { id: "z".to_string(), document_json: r#"{"title": "no id inside"}"#.to_string() };
    index.apply(&[without_id, IndexOperation::Commit], None).unwrap();
    assert!(index.get("z").unwrap().is_some());
}

// ---------------------------------------------------------------------------------------------
// Document validation

#[test]
fn prepare_put_keeps_the_clients_text_and_applying_adds_the_id() {
    let (_directory, index) = open_example_index();
    let text = r#"{"title": "hello", "year": 2001}"#;
    let operation = index.prepare_put("abc", text).unwrap();
    assert_eq!(operation, IndexOperation::Put { id: "abc".into(), document_json: text.into() });
    index.apply(&[operation, IndexOperation::Commit], None).unwrap();
    let stored = index.get("abc").unwrap().unwrap();
    assert_eq!((stored.id.as_str(), &fields(&stored)["title"]), ("abc", &serde_json::json!("hello")));
    // An `_id` equal to the id is accepted.
    index.prepare_put("abc", r#"{"_id": "abc", "title": "hello"}"#).unwrap();
    // The embedded form takes the id from the document.
    let operation = index.prepare_put_with_embedded_id(r#"{"_id": "line-1", "title": "bulk"}"#).unwrap();
    assert!(matches!(operation, IndexOperation::Put { ref id, .. } if id == "line-1"));
}

#[test]
fn prepare_put_rejects_bad_documents() {
    let (_directory, index) = open_example_index();
    let long_id = "x".repeat(MAX_ID_BYTES + 1);
    let cases: Vec<(&str, &str, String)> = vec![
        ("a", r#"{"foo": 1}"#, "unknown field `foo` in document".to_string()),
        ("a", r#"{"year": "abc"}"#, r#"field `year` expects an integer, got string "abc""#.to_string()),
        ("a", r#"{"year": 1.5}"#, "field `year` expects an integer, got number 1.5".to_string()),
        ("a", r#"{"popularity": -3}"#, "field `popularity` expects a non-negative integer, got number -3".to_string()),
        ("a", r#"{"rating": true}"#, "field `rating` expects a number, got boolean true".to_string()),
        ("a", r#"{"title": 12}"#, "field `title` expects a string, got number 12".to_string()),
        ("a", r#"{"title": null}"#, "field `title` expects a string, got null".to_string()),
        (
            "a",
            r#"{"category": "lang/rust"}"#,
            r#"field `category` expects a facet path string starting with `/`"#.to_string(),
        ),
        ("a", r#"{"published": "yesterday"}"#, r#"field `published` expects an RFC 3339 date string"#.to_string()),
        ("a", r#"{"published": 1700000000}"#, "field `published` expects an RFC 3339 date string".to_string()),
        ("a", r#"{"tags": [["nested"]]}"#, "field `tags` contains a nested array".to_string()),
        ("a", r#"{"title": "x", "#, "the document is not valid JSON".to_string()),
        ("a", r#"["not", "an", "object"]"#, "the document must be a JSON object, got an array".to_string()),
        ("a", r#""text""#, r#"the document must be a JSON object, got string "text""#.to_string()),
        (
            "a",
            r#"{"_id": "b"}"#,
            r#"the document's `_id` ("b") differs from the id it is stored under ("a")"#.to_string(),
        ),
        ("a", r#"{"_id": 7}"#, "`_id` must be a string, got number 7".to_string()),
        ("", r#"{"title": "x"}"#, "`_id` must not be empty".to_string()),
        (long_id.as_str(), r#"{"title": "x"}"#, format!("the maximum is {MAX_ID_BYTES} bytes")),
    ];
    for (id, document_json, expected) in cases {
        let error = index.prepare_put(id, document_json).unwrap_err();
        assert!(matches!(error, IndexError::InvalidDocument(_)), "{document_json}: {error:?}");
        let message = error.to_string();
        assert!(message.starts_with("invalid document: "), "{message}");
        assert!(message.contains(&expected), "{document_json}: expected {expected:?} in {message:?}");
    }
}

#[test]
fn prepare_put_with_embedded_id_requires_an_id() {
    let (_directory, index) = open_example_index();
    let message = error_message(index.prepare_put_with_embedded_id(r#"{"title": "x"}"#));
    assert_eq!(message, "invalid document: document has no `_id` field");
    let message = error_message(index.prepare_put_with_embedded_id(r#"{"_id": ""}"#));
    assert!(message.contains("`_id` must not be empty"), "{message}");
    let message = error_message(index.prepare_put_with_embedded_id(r#"{"_id": ["a"]}"#));
    assert!(message.contains("`_id` must be a string, got an array"), "{message}");
    let message = error_message(index.prepare_put_with_embedded_id("not json"));
    assert!(message.contains("not valid JSON"), "{message}");
}

// ---------------------------------------------------------------------------------------------
// Search

#[test]
fn facet_counts_children_of_each_prefix() {
    let (_directory, index) = index_with_books();
    let request = SearchRequest {
        query: "*".to_string(),
        exclude_docs: true,
        facets: vec![
            FacetRequest { field: "category".to_string(), prefixes: Vec::new() },
            FacetRequest {
                field: "category".to_string(),
                // An ancestor and its descendant in one request are fine.
                prefixes: vec!["/lang".to_string(), "/lang/rust".to_string(), "/lang".to_string()],
            },
        ],
        ..SearchRequest::default()
    };
    let response = search(&index, request);
    assert!(response.docs.is_empty());
    assert_eq!(response.count, Some(10));
    assert_eq!(
        response.facets,
        vec![
            FacetCounts {
                field: "category".to_string(),
                counts: vec![("/cooking".to_string(), 2), ("/lang".to_string(), 8)],
            },
            FacetCounts {
                field: "category".to_string(),
                counts: vec![
                    ("/lang/go".to_string(), 2),
                    ("/lang/python".to_string(), 2),
                    ("/lang/rust".to_string(), 4),
                    ("/lang/rust/async".to_string(), 1),
                ],
            },
        ]
    );
    // Facets count the matching documents only.
    let response = search(
        &index,
        SearchRequest {
            query: "year:[2019 TO 2023]".to_string(),
            exclude_docs: true,
            facets: vec![FacetRequest { field: "category".to_string(), prefixes: vec!["/".to_string()] }],
            ..SearchRequest::default()
        },
    );
    assert_eq!(response.count, Some(4));
    assert_eq!(response.facets[0].counts, vec![("/cooking".to_string(), 1), ("/lang".to_string(), 3)]);
}

#[test]
fn bad_facet_requests_are_rejected() {
    let (_directory, index) = index_with_books();
    let facet_request = |field: &str, prefix: &str| SearchRequest {
        facets: vec![FacetRequest { field: field.to_string(), prefixes: vec![prefix.to_string()] }],
        ..SearchRequest::default()
    };
    let message = error_message(index.search(&facet_request("genre", "/")));
    assert_eq!(message, "invalid search request: unknown facet field `genre`");
    let message = error_message(index.search(&facet_request("title", "/")));
    assert!(message.contains("field `title` is of type"), "{message}");
    assert!(message.contains("not a facet field"), "{message}");
    let message = error_message(index.search(&facet_request("category", "lang")));
    assert!(message.contains("invalid facet prefix \"lang\""), "{message}");
}

#[test]
fn sort_by_i64_and_f64_in_both_directions() {
    let (_directory, index) = index_with_books();
    // A document without year nor rating sorts last in both directions.
    put(&index, "no-values", r#"{"title": "book without values"}"#);
    commit(&index);
    let sorted = |field: &str, descending: bool| {
        search(
            &index,
            SearchRequest {
                query: "book".to_string(),
                limit: 20,
                sort: Some(SortSpec { field: field.to_string(), descending }),
                ..SearchRequest::default()
            },
        )
    };

    let response = sorted("year", false);
    assert_eq!(hit_ids(&response), vec!["b7", "b9", "b4", "b1", "b3", "b2", "b8", "b5", "b6", "b10", "no-values"]);
    assert_eq!(response.docs[0].sort_value.as_deref(), Some("2010"));
    assert_eq!(response.docs[0].score, None);
    assert_eq!(response.docs[10].sort_value, None);

    let response = sorted("year", true);
    assert_eq!(hit_ids(&response), vec!["b10", "b6", "b5", "b8", "b2", "b3", "b1", "b4", "b9", "b7", "no-values"]);

    let response = sorted("rating", true);
    assert_eq!(hit_ids(&response), vec!["b3", "b6", "b1", "b8", "b5", "b10", "b7", "b2", "b4", "b9", "no-values"]);
    assert_eq!(response.docs[0].sort_value.as_deref(), Some("4.9"));

    let response = sorted("rating", false);
    assert_eq!(hit_ids(&response), vec!["b9", "b4", "b2", "b7", "b10", "b5", "b8", "b1", "b6", "b3", "no-values"]);
    assert_eq!(response.docs[0].sort_value.as_deref(), Some("1.5"));
}

#[test]
fn sort_by_u64_and_date() {
    let (_directory, index) = open_example_index();
    put(&index, "old", r#"{"popularity": 5, "published": "2001-01-01T00:00:00Z"}"#);
    put(&index, "new", r#"{"popularity": 1, "published": "2024-06-30T12:00:00Z"}"#);
    commit(&index);
    let sorted = |field: &str, descending: bool| {
        search(
            &index,
            SearchRequest {
                limit: 10,
                sort: Some(SortSpec { field: field.to_string(), descending }),
                ..SearchRequest::default()
            },
        )
    };
    let response = sorted("published", true);
    assert_eq!(hit_ids(&response), vec!["new", "old"]);
    assert_eq!(response.docs[0].sort_value.as_deref(), Some("\"2024-06-30T12:00:00Z\""));
    let response = sorted("popularity", false);
    assert_eq!(hit_ids(&response), vec!["new", "old"]);
    assert_eq!(response.docs[1].sort_value.as_deref(), Some("5"));
}

#[test]
fn bad_sort_requests_are_rejected() {
    let (_directory, index) = index_with_books();
    let sort_request = |field: &str| SearchRequest {
        limit: 10,
        sort: Some(SortSpec { field: field.to_string(), descending: false }),
        ..SearchRequest::default()
    };
    let message = error_message(index.search(&sort_request("price")));
    assert_eq!(message, "invalid search request: unknown sort field `price`");
    let message = error_message(index.search(&sort_request("title")));
    assert!(message.contains("field `title` is of type"), "{message}");
    let message = error_message(index.search(&sort_request("category")));
    assert!(message.contains("cannot be used for sorting"), "{message}");

    let mut builder = Schema::builder();
    builder.add_i64_field("slow", INDEXED | STORED);
    let schema = load_schema(&serde_json::to_string(&builder.build()).unwrap()).unwrap();
    let directory = tempfile::tempdir().unwrap();
    let index =
        SearchIndex::open_or_create(directory.path(), schema, &AnalyzerConfig::default(), TEST_WRITER_MEMORY_BYTES)
            .unwrap();
    let message = error_message(index.search(&sort_request("slow")));
    assert_eq!(message, "invalid search request: field `slow` is not a fast field and cannot be used for sorting");
}

#[test]
fn pagination_is_stable_without_duplicates() {
    let (_directory, index) = open_example_index();
    let mut operations = Vec::new();
    for number in 0..25 {
        let document = serde_json::json!({"title": "same words everywhere", "year": number % 4});
        operations.push(index.prepare_put(&format!("doc-{number:02}"), &document.to_string()).unwrap());
        // Several commits give several segments.
        if number % 7 == 6 {
            operations.push(IndexOperation::Commit);
        }
    }
    operations.push(IndexOperation::Commit);
    index.apply(&operations, None).unwrap();

    for sort in [None, Some(SortSpec { field: "year".to_string(), descending: true })] {
        let page = |from: usize| {
            let request = SearchRequest {
                query: "words".to_string(),
                from,
                limit: 10,
                sort: sort.clone(),
                ..SearchRequest::default()
            };
            let response = search(&index, request);
            assert_eq!(response.count, Some(25));
            hit_ids(&response)
        };
        let first_pages: Vec<Vec<String>> = vec![page(0), page(10), page(20)];
        assert_eq!(first_pages[0].len(), 10);
        assert_eq!(first_pages[1].len(), 10);
        assert_eq!(first_pages[2].len(), 5);
        // Asking again gives the same pages.
        assert_eq!(first_pages, vec![page(0), page(10), page(20)]);
        let all_ids: Vec<String> = first_pages.concat();
        let unique_ids: HashSet<&String> = all_ids.iter().collect();
        assert_eq!(unique_ids.len(), 25);
        assert!(page(30).is_empty());
    }
}

#[test]
fn relevance_order_has_scores() {
    let (_directory, index) = open_example_index();
    put(&index, "weak", r#"{"body": "rust is mentioned once among many other words here"}"#);
    put(&index, "strong", r#"{"title": "rust rust rust", "body": "rust"}"#);
    commit(&index);
    let response = search(&index, query("rust", 10));
    assert_eq!(hit_ids(&response), vec!["strong", "weak"]);
    let scores: Vec<f32> = response.docs.iter().map(|hit| hit.score.unwrap()).collect();
    assert!(scores[0] > scores[1]);
    assert!(response.docs.iter().all(|hit| hit.sort_value.is_none()));
}

#[test]
fn exclude_count_and_exclude_docs() {
    let (_directory, index) = index_with_books();
    let response = search(&index, SearchRequest { limit: 3, exclude_count: true, ..SearchRequest::default() });
    assert_eq!(response.count, None);
    assert_eq!(response.docs.len(), 3);

    let response = search(&index, SearchRequest { limit: 3, exclude_docs: true, ..SearchRequest::default() });
    assert_eq!(response.count, Some(10));
    assert!(response.docs.is_empty());

    let response = search(
        &index,
        SearchRequest {
            query: "book".to_string(),
            limit: 3,
            exclude_docs: true,
            exclude_count: true,
            ..SearchRequest::default()
        },
    );
    assert_eq!(response, SearchResponse::default());

    // limit 0 means no documents, but still a count.
    let response = search(&index, query("", 0));
    assert_eq!(response.count, Some(10));
    assert!(response.docs.is_empty());
}

#[test]
fn bad_queries_and_limits_are_rejected() {
    let (_directory, index) = index_with_books();
    for bad_query in ["title:(unclosed", "nosuchfield:value", "year:abc"] {
        let error = index.search(&query(bad_query, 10)).unwrap_err();
        assert!(matches!(error, IndexError::InvalidQuery(_)), "{bad_query}: {error:?}");
        assert!(error.to_string().starts_with("invalid query: "));
    }
    // A bad query is reported even when nothing is collected.
    let request = SearchRequest {
        query: "title:(unclosed".to_string(),
        exclude_count: true,
        exclude_docs: true,
        ..SearchRequest::default()
    };
    assert!(matches!(index.search(&request), Err(IndexError::InvalidQuery(_))));
    let message = error_message(index.search(&query("*", MAX_SEARCH_LIMIT + 1)));
    assert_eq!(message, "invalid search request: limit 10001 exceeds the maximum of 10000");
    let request = SearchRequest { from: MAX_SEARCH_OFFSET + 1, limit: 10, ..SearchRequest::default() };
    assert!(matches!(index.search(&request), Err(IndexError::InvalidRequest(_))));
    // The largest allowed page works.
    assert_eq!(search(&index, query("*", MAX_SEARCH_LIMIT)).docs.len(), 10);
}

// ---------------------------------------------------------------------------------------------
// Types shared with the rest of the server

#[test]
fn operations_and_search_types_roundtrip_through_postcard() {
    let operations = vec![
        IndexOperation::Put { id: "a".to_string(), document_json: r#"{"_id":"a"}"#.to_string() },
        IndexOperation::Delete { id: "b".to_string() },
        IndexOperation::Commit,
        IndexOperation::Rollback,
        IndexOperation::Merge,
    ];
    let bytes = postcard::to_allocvec(&operations).unwrap();
    let decoded: Vec<IndexOperation> = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(decoded, operations);

    let request = SearchRequest {
        query: "rust".to_string(),
        from: 5,
        limit: 10,
        exclude_count: true,
        exclude_docs: false,
        facets: vec![FacetRequest { field: "category".to_string(), prefixes: vec!["/lang".to_string()] }],
        sort: Some(SortSpec { field: "year".to_string(), descending: true }),
    };
    let bytes = postcard::to_allocvec(&request).unwrap();
    assert_eq!(postcard::from_bytes::<SearchRequest>(&bytes).unwrap(), request);

    let response = SearchResponse {
        count: Some(3),
        docs: vec![SearchHit {
            id: "a".to_string(),
            fields_json: "{}".to_string(),
            score: Some(1.5),
            sort_value: Some("2020".to_string()),
        }],
        facets: vec![FacetCounts { field: "category".to_string(), counts: vec![("/lang".to_string(), 3)] }],
    };
    let bytes = postcard::to_allocvec(&response).unwrap();
    assert_eq!(postcard::from_bytes::<SearchResponse>(&bytes).unwrap(), response);

    // JSON clients may leave fields out.
    let request: SearchRequest = serde_json::from_str(r#"{"query": "x", "limit": 5}"#).unwrap();
    assert_eq!(request.limit, 5);
    assert!(request.facets.is_empty());
}

#[test]
fn search_index_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<SearchIndex>();
    assert_send_sync::<IndexError>();
}

/// The deepest nesting any setting allows parses on a thread with half the stack of a runtime
/// thread: the bound keeps the parser's recursion well inside it.
#[test]
fn the_deepest_allowed_query_parses_on_a_small_stack() {
    let (directory, index) = open_example_index();
    let index = std::sync::Arc::new(index);
    let limits =
        QueryLimits { max_query_depth: HARD_MAX_QUERY_DEPTH, max_query_bytes: 1 << 20, ..QueryLimits::default() };
    for (open, close) in [("(", ")"), ("-(", ")"), ("+(a OR ", ")"), ("(NOT ", ")"), ("NOT ", ""), ("'\"' (", ")")] {
        let text = format!("{}title:a{}", open.repeat(HARD_MAX_QUERY_DEPTH), close.repeat(HARD_MAX_QUERY_DEPTH));
        let index = index.clone();
        let parsed = std::thread::Builder::new()
            .stack_size(1024 * 1024)
            .spawn(move || {
                let request = SearchRequest { query: text, limit: 1, ..Default::default() };
                index.search_within(&request, &limits, SearchBudget::unlimited()).map(|response| response.docs.len())
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
        assert!(parsed.is_ok() || matches!(parsed, Err(IndexError::InvalidQuery(_))), "{open}: {parsed:?}");
    }
    drop(directory);
}

#[test]
fn the_schema_file_may_set_the_default_search_fields_and_their_boosts() {
    let fields: serde_json::Value = serde_json::from_str(DEFAULT_SCHEMA_JSON).unwrap();
    let file = serde_json::json!({"fields": fields, "default_search_fields": ["title^4", "body"]}).to_string();
    let loaded = crate::index::load_schema_file(&file).unwrap();
    assert_eq!(loaded.default_search_fields, Some(vec![("title".to_string(), 4.0), ("body".to_string(), 1.0)]));
    let directory = tempfile::tempdir().unwrap();
    let mut index =
        SearchIndex::open_or_create(directory.path(), loaded.schema, &default_analyzers(), TEST_WRITER_MEMORY_BYTES)
            .unwrap();
    put(&index, "in-body", r#"{"title":"other","body":"lighthouse keeper"}"#);
    put(&index, "in-title", r#"{"title":"lighthouse","body":"a keeper of lights and a long long story"}"#);
    put(&index, "in-url", r#"{"title":"x","url":"lighthouse"}"#);
    commit(&index);
    // Every text field is searched by default, unboosted.
    assert_eq!(search(&index, query("lighthouse", 10)).count, Some(3));
    index.set_default_search_fields(&[("title".to_string(), 4.0), ("body".to_string(), 1.0)]).unwrap();
    let found = search(&index, query("lighthouse", 10));
    assert_eq!(hit_ids(&found), vec!["in-title", "in-body"], "the title match ranks first and url is not searched");
    let refused = index.set_default_search_fields(&[("year".to_string(), 1.0)]).unwrap_err().to_string();
    assert!(refused.contains("indexed text field"), "{refused}");
}

#[test]
fn a_search_without_facets_or_sort_answers_as_the_general_collectors_do() {
    // Searches with neither facets nor a sort take typed collectors; with a facet they go
    // through a MultiCollector. Both must agree on count, page, order and scores, with and
    // without a time budget (the budget runs its own loop), across segments and deletions.
    let (_directory, index) = index_with_books();
    let more: Vec<IndexOperation> = (11..=30)
        .map(|number| {
            let document = serde_json::json!({
                "title": format!("book {number} about rust and go"),
                "body": "a second segment of books",
                "category": "/lang/rust",
                "year": 2000 + number,
            });
            index.prepare_put(&format!("b{number}"), &document.to_string()).unwrap()
        })
        // One deletion in the new segment, one in the older one.
        .chain([
            IndexOperation::Delete { id: "b12".to_string() },
            IndexOperation::Delete { id: "b3".to_string() },
            IndexOperation::Commit,
        ])
        .collect();
    index.apply(&more, None).unwrap();
    let limits = QueryLimits::default();
    let budgets = [
        SearchBudget::unlimited(),
        SearchBudget::until(std::time::Instant::now() + std::time::Duration::from_secs(60)),
    ];
    let cases: &[(&str, usize, usize, bool, bool)] = &[
        // query, from, limit, exclude_count, exclude_docs
        ("book", 0, 10, false, false),
        ("book", 5, 10, false, false),
        ("rust go", 0, 3, false, false),
        ("rust go", 0, 3, true, false),
        ("rust", 0, 0, false, false),
        ("*", 0, 50, false, false),
        ("title:b1 OR segment", 2, 4, false, false),
        ("book", 0, 10, false, true),
        ("nothing-matches-this", 0, 10, false, false),
        ("book", 40, 10, false, false),
    ];
    for &(query_text, from, limit, exclude_count, exclude_docs) in cases {
        let plain = SearchRequest {
            query: query_text.to_string(),
            from,
            limit,
            exclude_count,
            exclude_docs,
            ..SearchRequest::default()
        };
        let with_facet = SearchRequest {
            facets: vec![FacetRequest { field: "category".to_string(), prefixes: vec!["/".to_string()] }],
            ..plain.clone()
        };
        for budget in budgets {
            let typed = index.search_within(&plain, &limits, budget).unwrap();
            let general = index.search_within(&with_facet, &limits, budget).unwrap();
            let case = format!("{query_text:?} from {from} limit {limit} budget {:?}", budget.deadline.is_some());
            assert_eq!(typed.count, general.count, "{case}");
            assert_eq!(typed.docs, general.docs, "{case}");
            assert!(typed.facets.is_empty(), "{case}");
            assert_eq!(general.facets.len(), 1, "{case}");
        }
    }
    // And the answers are what the documents say.
    let response = index.search_within(&query("book", 100), &limits, budgets[1]).unwrap();
    assert_eq!(response.count, Some(28));
    assert_eq!(response.docs.len(), 28);
    assert!(!hit_ids(&response).contains(&"b12".to_string()));
    assert!(!hit_ids(&response).contains(&"b3".to_string()));
    assert!(response.docs.windows(2).all(|pair| pair[0].score >= pair[1].score));
    let past_the_end = SearchRequest { from: 40, ..query("book", 10) };
    let response = index.search_within(&past_the_end, &limits, budgets[1]).unwrap();
    assert_eq!((response.count, response.docs.len()), (Some(28), 0));
}

fn docstore_blocksize(directory: &Path) -> u64 {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(directory.join("meta.json")).unwrap()).unwrap();
    meta["index_settings"]["docstore_blocksize"].as_u64().unwrap()
}

#[test]
fn a_new_index_stores_documents_in_small_blocks_and_an_old_one_keeps_its_own() {
    let (directory, index) = open_example_index();
    put(&index, "a", r#"{"title": "small blocks"}"#);
    commit(&index);
    assert_eq!(docstore_blocksize(directory.path()), 4096);

    // An index made with tantivy's defaults (16 KiB blocks, as before) opens, takes writes and
    // keeps its setting.
    let old = tempfile::tempdir().unwrap();
    let schema = load_schema(DEFAULT_SCHEMA_JSON).unwrap();
    tantivy::Index::create_in_dir(old.path(), schema).unwrap();
    assert_eq!(docstore_blocksize(old.path()), 16_384);
    let index = open_at(old.path());
    put(&index, "b", r#"{"title": "large blocks"}"#);
    commit(&index);
    assert_eq!(hit_ids(&search(&index, query("blocks", 10))), vec!["b".to_string()]);
    assert_eq!(docstore_blocksize(old.path()), 16_384);
}
