//! The error type of the index module.

use std::path::PathBuf;

/// Everything that can go wrong while loading the schema or tokenizer files, validating
/// documents, applying operations or searching.
///
/// Messages are lowercase and name the offending field, value or file so that they can be
/// returned to a client as they are.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The schema file (or a schema built in code) cannot be used.
    #[error("invalid schema: {0}")]
    InvalidSchema(String),

    /// The tokenizer (analyzer) file cannot be used.
    #[error("invalid tokenizer file: {0}")]
    InvalidAnalyzers(String),

    /// A document does not match the schema.
    #[error("invalid document: {0}")]
    InvalidDocument(String),

    /// The query string cannot be parsed.
    #[error("invalid query: {0}")]
    InvalidQuery(String),

    /// A search request asks for something impossible (bad facet, sort, limit ...).
    #[error("invalid search request: {0}")]
    InvalidRequest(String),

    /// A search ran past its time budget and was stopped.
    #[error("the search ran past its time budget (--search-timeout) and was stopped")]
    DeadlineExceeded,

    /// An index already exists in the directory, but with another schema.
    #[error("the index at {path} was created with a different schema; {details}")]
    SchemaMismatch { path: PathBuf, details: String },

    /// Opening (or creating) the index, its writer or its reader failed.
    #[error("cannot open the index at {path}: {source}")]
    OpenIndex {
        path: PathBuf,
        #[source]
        source: tantivy::TantivyError,
    },

    /// Any other error reported by tantivy.
    #[error("tantivy error: {0}")]
    Tantivy(#[from] tantivy::TantivyError),

    /// A filesystem operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// Something that validation should have made impossible happened (a bug, or an index
    /// written by something else).
    #[error("internal index error: {0}")]
    Internal(String),
}
