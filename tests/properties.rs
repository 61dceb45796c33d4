//! Property tests (proptest, stable Rust): whatever bytes arrive, the decoders of frames, headers
//! and requests, the query bounds, the query parser behind them and document validation answer
//! with a value or an error — never a panic, never an allocation beyond the frame limit.

use std::sync::OnceLock;

use bayard::cluster::membership::MembershipDigest;
use bayard::index::{
    check_query_bounds, load_schema, validate_document, AnalyzerConfig, QueryLimits, SearchBudget, SearchIndex,
    SearchRequest, DEFAULT_SCHEMA_JSON, DEFAULT_TOKENIZER_JSON,
};
use bayard::protocol::{AdminRequest, ClientRequest, RaftRequest};
use bayard::transport::frame::{read_frame_bytes, FrameError};
use bayard::transport::stream::decode_header;
use proptest::prelude::*;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"))
}

/// One index on disk for every case, with a few documents.
fn index() -> &'static SearchIndex {
    static INDEX: OnceLock<(tempfile::TempDir, SearchIndex)> = OnceLock::new();
    &INDEX
        .get_or_init(|| {
            let directory = tempfile::tempdir().expect("temp dir");
            let schema = load_schema(DEFAULT_SCHEMA_JSON).expect("schema");
            let analyzers = AnalyzerConfig::from_json(DEFAULT_TOKENIZER_JSON).expect("analyzers");
            let index = SearchIndex::open_or_create(directory.path(), schema, &analyzers, 20_000_000).expect("index");
            let operations: Vec<_> = ["alpha beta", "beta gamma", "(quoted) \"text\""]
                .iter()
                .enumerate()
                .map(|(number, title)| {
                    index.prepare_put(&number.to_string(), &serde_json::json!({ "title": title }).to_string()).unwrap()
                })
                .chain([bayard::index::IndexOperation::Commit])
                .collect();
            index.apply(&operations, None).expect("apply");
            (directory, index)
        })
        .1
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn frames_never_panic_and_never_exceed_the_limit(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut reader = bytes.as_slice();
        match runtime().block_on(read_frame_bytes(&mut reader, 512)) {
            Ok(body) => prop_assert!(body.len() <= 512),
            Err(FrameError::TooLarge { frame_bytes, limit_bytes }) => prop_assert!(frame_bytes > limit_bytes),
            Err(_) => {}
        }
    }

    #[test]
    fn headers_and_requests_decode_or_refuse(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_header(&bytes);
        let _ = postcard::from_bytes::<ClientRequest>(&bytes);
        let _ = postcard::from_bytes::<AdminRequest>(&bytes);
        let _ = postcard::from_bytes::<RaftRequest>(&bytes);
        let _ = postcard::from_bytes::<MembershipDigest>(&bytes);
    }

    #[test]
    fn queries_within_the_bounds_parse_and_run(text in "([()\"'/\\\\ a-c:*+\\-^~\\[\\]{}0-9]|NOT |AND |OR ){0,400}") {
        let limits = QueryLimits::default();
        if check_query_bounds(&text, &limits).is_ok() {
            let request = SearchRequest { query: text, limit: 3, ..Default::default() };
            // An error for a bad query is fine; a panic or a stack overflow is not.
            let _ = index().search_within(&request, &limits, SearchBudget::unlimited());
        }
    }

    #[test]
    fn deep_nesting_is_always_refused(
        depth in 33_usize..5_000,
        closing in any::<bool>(),
        prefix in prop_oneof![Just(""), Just("'\"' "), Just("title:/\"/ "), Just("\" "), Just("NOT ")],
    ) {
        let text = format!("{prefix}{}a{}", "(".repeat(depth), if closing { ")".repeat(depth) } else { String::new() });
        let limits = QueryLimits { max_query_bytes: 1 << 20, ..QueryLimits::default() };
        prop_assert!(check_query_bounds(&text, &limits).is_err());
    }

    #[test]
    fn documents_validate_or_refuse(text in ".{0,300}") {
        let schema = index().schema();
        let _ = validate_document(schema, None, &text);
        let _ = validate_document(schema, Some("id"), &text);
        let _ = index().prepare_put_with_embedded_id(&text);
    }

    #[test]
    fn json_documents_validate_or_refuse(
        fields in proptest::collection::btree_map(
            "(_id|title|body|year|rating|category|published|tags|url|other)",
            prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<f64>().prop_map(|number| serde_json::json!(number)),
                ".{0,20}".prop_map(serde_json::Value::from),
                proptest::collection::vec(".{0,5}", 0..3).prop_map(serde_json::Value::from),
            ],
            0..6,
        )
    ) {
        let document = serde_json::Value::Object(fields.into_iter().collect()).to_string();
        let schema = index().schema();
        let checked = validate_document(schema, Some("doc"), &document);
        let prepared = index().prepare_put("doc", &document);
        // The client's check and the node's agree.
        prop_assert_eq!(checked.is_ok(), prepared.is_ok(), "{}", document);
    }
}
