//! The full-text index: a tantivy index plus the schema and analyzer files that describe it.
//!
//! This module knows nothing about networking or replication. Writes go through
//! [`IndexOperation`]s: a document is validated once with [`SearchIndex::prepare_put`] (before
//! it is replicated) and the resulting operation is applied with [`SearchIndex::apply`] on
//! every node. Everything here is synchronous; async callers run it on a blocking thread.

mod analyzers;
mod document;
mod document_check;
mod error;
mod export;
mod id_delete;
mod limits;
mod query_dsl;
mod schema;
mod search;
mod search_index;

#[cfg(test)]
mod tests;

pub use analyzers::{
    check_schema_tokenizers, AnalyzerConfig, AnalyzerDefinition, StemmingLanguage, TokenFilterDefinition,
    TokenizerDefinition, BUILT_IN_TOKENIZERS,
};
pub use document::MAX_ID_BYTES;
pub use error::IndexError;
pub use export::{CommittedState, SharedIndex, META_FILE_NAME};
pub use limits::{check_query_bounds, query_shape, QueryLimits, QueryShape, SearchBudget, HARD_MAX_QUERY_DEPTH};
pub use query_dsl::{
    parse_field_boosts, parse_json_query, HighlightEncoder, HighlightOptions, HighlightRequest, JsonHit,
    JsonSearchRequest, JsonSearchResponse, JsonTotal, SortKey, SourceFilter, TotalRelation, TrackTotalHits,
    DEFAULT_SEARCH_SIZE, DEFAULT_TRACK_TOTAL_HITS, SUPPORTED_AGGREGATION_TYPES, SUPPORTED_QUERY_TYPES,
    SUPPORTED_REQUEST_KEYS,
};
pub use schema::{check_id_field, load_schema, load_schema_file, SchemaFile};
pub use search::{
    FacetCounts, FacetRequest, SearchHit, SearchRequest, SearchResponse, SortSpec, MAX_SEARCH_LIMIT, MAX_SEARCH_OFFSET,
};
pub use search_index::{
    new_index_settings, validate_document, ApplyOutcome, IndexOperation, SearchIndex, StoredDocument,
    DOCSTORE_BLOCK_BYTES,
};

/// The field holding each document's unique id. Added to the schema when the schema file does
/// not declare it.
pub const ID_FIELD: &str = "_id";

/// The example schema shipped in `etc/schema.json`, also the embedded default.
pub const DEFAULT_SCHEMA_JSON: &str = include_str!("../../etc/schema.json");

/// The example tokenizer file shipped in `etc/tokenizer.json`, also the embedded default.
pub const DEFAULT_TOKENIZER_JSON: &str = include_str!("../../etc/tokenizer.json");
