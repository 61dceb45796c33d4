//! `SearchIndex`: one tantivy index on disk with its writer and reader, and the operations
//! that replication applies to it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as JsonValue};
use tantivy::collector::TopDocs;
use tantivy::directory::MmapDirectory;
use tantivy::query::{QueryParser, TermQuery};
use tantivy::schema::{Field, FieldType, IndexRecordOption, Schema};
use tantivy::{Index, IndexReader, IndexSettings, IndexWriter, ReloadPolicy, TantivyDocument, TantivyError, Term};

use super::analyzers::{check_schema_tokenizers, AnalyzerConfig};
use super::document::{
    build_tantivy_document, check_document_id, embedded_document_id, parse_json_object, render_stored_document,
};
use super::document_check::{check_document_text, CheckedDocument};
use super::id_delete::IdDeletion;
use super::schema::{check_id_field, describe_schema_differences};
use super::{IndexError, ID_FIELD};

/// Bytes of stored documents compressed together in the doc store. tantivy's default is 16 KiB;
/// every hit of a search decompresses its whole block, and with documents of a few hundred bytes
/// lz4 was about an eighth of a search's CPU on the node (docs/performance.md). 4 KiB blocks
/// decompress a quarter as much per hit; the store grew 8.6% on the bench's corpus. tantivy's
/// cache of decompressed blocks (100 per segment) holds a quarter as many bytes with them.
pub const DOCSTORE_BLOCK_BYTES: usize = 4096;

/// The settings a new index is created with (an existing index keeps those in its meta.json).
pub fn new_index_settings() -> IndexSettings {
    IndexSettings { docstore_blocksize: DOCSTORE_BLOCK_BYTES, ..IndexSettings::default() }
}

/// A change to the index. This is what gets replicated: every node applies the same
/// operations in the same order with [`SearchIndex::apply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum IndexOperation {
    /// Upsert: replaces any document with the same `_id`. `document_json` is a JSON object
    /// that already contains `_id`.
    Put { id: String, document_json: String },
    /// Removes the document with this `_id`, if any.
    Delete { id: String },
    /// Makes every previous operation durable and visible to searches.
    Commit,
    /// Discards every operation since the last commit.
    Rollback,
    /// Merges all searchable segments into one.
    Merge,
}

/// What [`SearchIndex::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ApplyOutcome {
    /// Whether the batch contained a commit (which succeeded).
    pub committed: bool,
    /// Number of `Put` operations applied.
    pub documents_put: usize,
    /// Number of `Delete` operations applied (tantivy does not report whether a document with
    /// that id existed).
    pub documents_deleted: usize,
}

/// A document read back from the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDocument {
    pub id: String,
    /// The stored fields except `_id`, as a JSON object; a single value is rendered as a
    /// scalar, several values as an array.
    pub fields_json: String,
}

/// A tantivy index with its single writer and a reader that only sees committed data.
///
/// Shared through `Arc`; all methods take `&self`. Writes are serialized by the writer mutex.
pub struct SearchIndex {
    pub(crate) index_directory: PathBuf,
    pub(crate) index: Index,
    pub(crate) schema: Schema,
    pub(crate) schema_json: String,
    pub(crate) id_field: Field,
    /// Fields searched when a query term names no field: every indexed text field but `_id`,
    /// unless the schema file or `--default-search-fields` names them.
    pub(crate) default_search_fields: Vec<Field>,
    /// Boosts of default fields (`title^2`); a field absent here has boost 1.
    pub(crate) default_field_boosts: std::collections::HashMap<Field, f32>,
    /// The query-string parser for these defaults, built once: it shares the index's analyzers
    /// (registered before it is built) and is only read by searches.
    pub(crate) query_parser: QueryParser,
    pub(crate) writer: Mutex<IndexWriter>,
    pub(crate) reader: IndexReader,
    /// Set by puts and deletes, cleared by commit and rollback.
    pub(crate) has_uncommitted_changes: AtomicBool,
    /// Set while an explicit merge runs in the background: at most one at a time, so a stream
    /// of `merge` requests cannot pile up full-index merges (and threads).
    pub(crate) merging: std::sync::Arc<AtomicBool>,
}

impl std::fmt::Debug for SearchIndex {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SearchIndex")
            .field("index_directory", &self.index_directory)
            .field("has_uncommitted_changes", &self.has_uncommitted_changes())
            .finish_non_exhaustive()
    }
}

impl SearchIndex {
    /// Opens the index in `index_directory`, or creates it (and the directory) when there is
    /// none. An existing index must have been created with exactly `schema`.
    ///
    /// The analyzers are registered on every open because tantivy only persists their names.
    /// `writer_memory_bytes` is the indexing memory budget, split among the indexing threads
    /// (at least 15 MB per thread; tantivy uses fewer threads for a smaller budget).
    pub fn open_or_create(
        index_directory: &Path,
        schema: Schema,
        analyzers: &AnalyzerConfig,
        writer_memory_bytes: usize,
    ) -> Result<Self, IndexError> {
        check_id_field(&schema)?;
        // Check the schema against the analyzers before anything is written to disk, so that a
        // wrong configuration never leaves a half-usable index behind. The index's own
        // managers get exactly the same registrations below.
        let validation_tokenizers = analyzers.tokenizer_manager()?;
        check_schema_tokenizers(&schema, &validation_tokenizers, &validation_tokenizers)?;

        std::fs::create_dir_all(index_directory).map_err(|source| IndexError::Io {
            context: format!("cannot create the index directory {}", index_directory.display()),
            source,
        })?;
        let open_error = |source: TantivyError| IndexError::OpenIndex { path: index_directory.to_path_buf(), source };
        let directory = MmapDirectory::open(index_directory).map_err(|error| open_error(error.into()))?;
        let index_exists = Index::exists(&directory).map_err(|error| open_error(error.into()))?;
        let index = if index_exists {
            let index = Index::open(directory).map_err(open_error)?;
            if index.schema() != schema {
                return Err(IndexError::SchemaMismatch {
                    path: index_directory.to_path_buf(),
                    details: format!(
                        "{}; use the schema the index was created with, or move the index \
                         directory away to build a new index",
                        describe_schema_differences(&index.schema(), &schema)
                    ),
                });
            }
            index
        } else {
            Index::create(directory, schema.clone(), new_index_settings()).map_err(open_error)?
        };

        analyzers.register_into(index.tokenizers())?;
        analyzers.register_into(index.fast_field_tokenizer())?;
        check_schema_tokenizers(&schema, index.tokenizers(), index.fast_field_tokenizer())?;

        let writer: IndexWriter = index.writer(writer_memory_bytes).map_err(open_error)?;
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into().map_err(open_error)?;

        let id_field = schema.get_field(ID_FIELD)?;
        let default_search_fields: Vec<Field> = schema
            .fields()
            .filter(|(field, field_entry)| {
                *field != id_field
                    && matches!(field_entry.field_type(), FieldType::Str(options)
                        if options.get_indexing_options().is_some())
            })
            .map(|(field, _field_entry)| field)
            .collect();
        let schema_json = serde_json::to_string_pretty(&schema)
            .map_err(|error| IndexError::Internal(format!("cannot serialize the schema: {error}")))?;

        let default_field_boosts = std::collections::HashMap::new();
        let query_parser = build_query_parser(&index, &default_search_fields, &default_field_boosts);
        tracing::info!(
            index_directory = %index_directory.display(),
            created = !index_exists,
            "opened the search index"
        );
        Ok(SearchIndex {
            index_directory: index_directory.to_path_buf(),
            index,
            schema,
            schema_json,
            id_field,
            default_search_fields,
            default_field_boosts,
            query_parser,
            writer: Mutex::new(writer),
            reader,
            has_uncommitted_changes: AtomicBool::new(false),
            merging: Default::default(),
        })
    }

    /// Validates a document before it is replicated and returns the `Put` to apply.
    ///
    /// The document must be a JSON object with schema fields only, each with values of the
    /// right type. Its `_id` is set to `id`; an `_id` already in the document must equal `id`.
    pub fn prepare_put(&self, id: &str, document_json: &str) -> Result<IndexOperation, IndexError> {
        check_document_id(id)?;
        if let Some(checked) = check_document_text(&self.schema, document_json) {
            if checked.embedded_id.as_deref().is_none_or(|embedded_id| embedded_id == id) {
                return Ok(IndexOperation::Put { id: id.to_string(), document_json: document_json.to_string() });
            }
        }
        let document_object = parse_json_object(document_json)?;
        if let Some(embedded_id) = embedded_document_id(&document_object)? {
            if embedded_id != id {
                return Err(IndexError::InvalidDocument(format!(
                    "the document's `{ID_FIELD}` ({embedded_id:?}) differs from the id it is \
                     stored under ({id:?})"
                )));
            }
        }
        self.check_put_object(id.to_string(), document_object, document_json)
    }

    /// Like [`prepare_put`](Self::prepare_put) for documents that carry their own `_id`
    /// (bulk NDJSON lines): `_id` must be present and be a non-empty string.
    pub fn prepare_put_with_embedded_id(&self, document_json: &str) -> Result<IndexOperation, IndexError> {
        if let Some(CheckedDocument { embedded_id: Some(id) }) = check_document_text(&self.schema, document_json) {
            return Ok(IndexOperation::Put { id, document_json: document_json.to_string() });
        }
        let document_object = parse_json_object(document_json)?;
        let Some(id) = embedded_document_id(&document_object)? else {
            return Err(IndexError::InvalidDocument(format!("document has no `{ID_FIELD}` field")));
        };
        self.check_put_object(id, document_object, document_json)
    }

    /// Checks the parsed document against the schema and makes the operation of the client's own
    /// text: applying it parses that text again, adds `_id` when it is absent and finds the same
    /// embedded id when present, so nothing is gained by writing the JSON out anew (which was a
    /// tenth of the leader's work in a bulk load). This is the slow path, taken when
    /// [`check_document_text`] did not vouch for the document: it accepts what that check was
    /// unsure of or names what is wrong.
    fn check_put_object(
        &self,
        id: String,
        mut document_object: Map<String, JsonValue>,
        document_json: &str,
    ) -> Result<IndexOperation, IndexError> {
        document_object.insert(ID_FIELD.to_string(), JsonValue::String(id.clone()));
        // Built only to validate: every node builds its own tantivy document when applying.
        build_tantivy_document(&self.schema, document_object)?;
        Ok(IndexOperation::Put { id, document_json: document_json.to_string() })
    }

    /// Applies operations in order. A failing operation stops the batch; the operations
    /// before it stay applied (uncommitted unless a `Commit` came before the failure).
    ///
    /// `commit_payload` is stored with every `Commit` of the batch (for instance the last
    /// applied log id), and read back by [`last_commit_payload`](Self::last_commit_payload).
    /// `None` commits without a payload.
    pub fn apply(
        &self,
        operations: &[IndexOperation],
        commit_payload: Option<&str>,
    ) -> Result<ApplyOutcome, IndexError> {
        let mut writer = self.lock_writer();
        let mut outcome = ApplyOutcome::default();
        for operation in operations {
            match operation {
                IndexOperation::Put { id, document_json } => {
                    self.apply_put(&writer, id, document_json)?;
                    outcome.documents_put += 1;
                }
                IndexOperation::Delete { id } => {
                    self.delete_id(&writer, id)?;
                    self.has_uncommitted_changes.store(true, Ordering::SeqCst);
                    outcome.documents_deleted += 1;
                }
                IndexOperation::Commit => {
                    self.commit_with_writer(&mut writer, commit_payload)?;
                    outcome.committed = true;
                }
                IndexOperation::Rollback => self.rollback_with_writer(&mut writer)?,
                IndexOperation::Merge => self.merge_with_writer(&mut writer)?,
            }
        }
        Ok(outcome)
    }

    /// Whether puts or deletes happened since the last commit or rollback.
    pub fn has_uncommitted_changes(&self) -> bool {
        self.has_uncommitted_changes.load(Ordering::SeqCst)
    }

    /// Commits pending changes (used by the auto-commit timer); same as applying `Commit`.
    pub fn commit(&self, commit_payload: Option<&str>) -> Result<(), IndexError> {
        let mut writer = self.lock_writer();
        self.commit_with_writer(&mut writer, commit_payload)
    }

    /// The payload of the last commit, so that a restarted node knows which operations the
    /// index already contains. `None` for a new index or a commit without payload.
    pub fn last_commit_payload(&self) -> Result<Option<String>, IndexError> {
        Ok(self.index.load_metas()?.payload)
    }

    /// Reads a committed document by id.
    pub fn get(&self, id: &str) -> Result<Option<StoredDocument>, IndexError> {
        let searcher = self.reader.searcher();
        let id_query = TermQuery::new(self.id_term(id), IndexRecordOption::Basic);
        let top_documents = searcher.search(&id_query, &TopDocs::with_limit(1).order_by_score())?;
        let Some((_score, document_address)) = top_documents.into_iter().next() else {
            return Ok(None);
        };
        let document: TantivyDocument = searcher.doc(document_address)?;
        let rendered = render_stored_document(&self.schema, &document)?;
        Ok(Some(StoredDocument { id: rendered.id, fields_json: rendered.fields_json }))
    }

    /// The schema of the index, `_id` included.
    /// Sets the fields (and boosts) searched by query terms that name no field. Each must be an
    /// indexed text field; `_id` may not be one.
    pub fn set_default_search_fields(&mut self, fields: &[(String, f32)]) -> Result<(), IndexError> {
        if fields.is_empty() {
            return Err(IndexError::InvalidSchema("the default search fields are empty".to_string()));
        }
        let mut chosen = Vec::new();
        let mut boosts = std::collections::HashMap::new();
        for (name, boost) in fields {
            let field = self.schema.get_field(name).map_err(|_| {
                IndexError::InvalidSchema(format!("default search field `{name}` is not in the schema"))
            })?;
            let indexed_text = matches!(self.schema.get_field_entry(field).field_type(), FieldType::Str(options)
                if options.get_indexing_options().is_some());
            if field == self.id_field || !indexed_text {
                return Err(IndexError::InvalidSchema(format!(
                    "default search field `{name}` must be an indexed text field other than `{ID_FIELD}`"
                )));
            }
            if !boost.is_finite() || *boost <= 0.0 {
                return Err(IndexError::InvalidSchema(format!("the boost of `{name}` must be a positive number")));
            }
            if !chosen.contains(&field) {
                chosen.push(field);
            }
            if (*boost - 1.0).abs() > f32::EPSILON {
                boosts.insert(field, *boost);
            }
        }
        self.query_parser = build_query_parser(&self.index, &chosen, &boosts);
        self.default_search_fields = chosen;
        self.default_field_boosts = boosts;
        Ok(())
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The schema in tantivy's JSON format (pretty-printed).
    pub fn schema_json(&self) -> String {
        self.schema_json.clone()
    }

    /// Number of live committed documents.
    pub fn document_count(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    /// Number of committed segments currently searchable.
    pub fn segment_count(&self) -> usize {
        self.reader.searcher().segment_readers().len()
    }

    /// The directory holding the index files.
    pub fn index_directory(&self) -> &Path {
        &self.index_directory
    }

    fn lock_writer(&self) -> MutexGuard<'_, IndexWriter> {
        // A poisoned mutex means a panic happened while writing; tantivy's writer keeps a
        // consistent state (uncommitted work can still be rolled back), so keep serving.
        self.writer.lock().unwrap_or_else(|poisoned| {
            tracing::warn!("the index writer mutex was poisoned by a panic; continuing");
            poisoned.into_inner()
        })
    }

    fn id_term(&self, id: &str) -> Term {
        Term::from_field_text(self.id_field, id)
    }

    /// Queues the delete of every document with this `_id` (`id_delete`: tantivy's
    /// `delete_term` builds a scoring weight of a kilobyte for each one).
    fn delete_id(&self, writer: &IndexWriter, id: &str) -> Result<(), IndexError> {
        writer.delete_query(Box::new(IdDeletion::new(self.id_term(id))))?;
        Ok(())
    }

    fn apply_put(&self, writer: &IndexWriter, id: &str, document_json: &str) -> Result<(), IndexError> {
        // The document was validated by `prepare_put` before replication; failing here means
        // a bug or a log written by another version, so report it rather than panic.
        let mut document_object = parse_json_object(document_json)?;
        match embedded_document_id(&document_object)? {
            Some(embedded_id) if embedded_id != id => {
                return Err(IndexError::InvalidDocument(format!(
                    "the put of document {id:?} carries a document whose `{ID_FIELD}` is \
                     {embedded_id:?}"
                )));
            }
            Some(_) => {}
            None => {
                check_document_id(id)?;
                document_object.insert(ID_FIELD.to_string(), JsonValue::String(id.to_string()));
            }
        }
        let document = build_tantivy_document(&self.schema, document_object)?;
        // Delete then add: tantivy applies a delete to every document added before it, so the
        // new version survives and any older one (even from this batch) is removed.
        self.delete_id(writer, id)?;
        writer.add_document(document)?;
        self.has_uncommitted_changes.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn commit_with_writer(&self, writer: &mut IndexWriter, commit_payload: Option<&str>) -> Result<(), IndexError> {
        let mut prepared_commit = writer.prepare_commit()?;
        if let Some(payload) = commit_payload {
            prepared_commit.set_payload(payload);
        }
        let opstamp = prepared_commit.commit()?;
        self.has_uncommitted_changes.store(false, Ordering::SeqCst);
        // The reload policy is manual so that searches only ever see committed data, and see
        // it right after the commit returns.
        self.reader.reload()?;
        tracing::debug!(opstamp, "committed the index");
        Ok(())
    }

    fn rollback_with_writer(&self, writer: &mut IndexWriter) -> Result<(), IndexError> {
        let opstamp = writer.rollback()?;
        self.has_uncommitted_changes.store(false, Ordering::SeqCst);
        self.reader.reload()?;
        tracing::debug!(opstamp, "rolled back the index to the last commit");
        Ok(())
    }

    /// Starts merging every searchable segment into one and returns at once: a large merge takes
    /// minutes, and applying the log (on every replica at once) must not wait for it. tantivy
    /// runs the merge on its own threads and publishes the merged segment when it is done (the
    /// index metas keep the last commit's payload); a thread of ours then makes searches use it.
    ///
    /// At most one explicit merge runs: a `Merge` while one is running changes nothing (every
    /// replica may decide differently here, which is harmless: merging changes no document).
    fn merge_with_writer(&self, writer: &mut IndexWriter) -> Result<(), IndexError> {
        let segment_ids = self.index.searchable_segment_ids()?;
        if segment_ids.len() < 2 {
            return Ok(());
        }
        if self.merging.swap(true, Ordering::SeqCst) {
            tracing::info!("a merge is already running; this one is skipped");
            return Ok(());
        }
        let segment_count = segment_ids.len();
        let merging = writer.merge(&segment_ids);
        let reader = self.reader.clone();
        let running = self.merging.clone();
        let started = std::thread::Builder::new().name("bayard-merge".into()).spawn(move || {
            // Cleared however the merge ends.
            struct Done(std::sync::Arc<AtomicBool>);
            impl Drop for Done {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::SeqCst);
                }
            }
            let _done = Done(running);
            match merging.wait() {
                Ok(_merged_segment) => {
                    if let Err(error) = reader.reload() {
                        tracing::warn!(%error, "could not reload the reader after a merge");
                    }
                    tracing::info!(segment_count, "merged all searchable segments into one");
                }
                // tantivy's merge policy also merges in the background, and does not stop an
                // explicit merge from taking segments a background merge is working on: whichever
                // finishes second fails with `InvalidArgument`. The index stays consistent (the
                // losing result is dropped), it is merely less compacted, so this is not an error.
                Err(TantivyError::InvalidArgument(reason)) => {
                    tracing::warn!(%reason, "explicit merge skipped: its segments changed meanwhile");
                }
                Err(error) => tracing::error!(%error, "merge failed; the index keeps its segments"),
            }
        });
        if let Err(error) = started {
            // Not an error of the index: the segments stay as they are, on this replica only.
            self.merging.store(false, Ordering::SeqCst);
            tracing::warn!(%error, "cannot start a merge thread; the segments stay as they are");
        }
        Ok(())
    }

    /// Waits (bounded) until no explicit merge runs, so that the index directory can be swapped
    /// (a snapshot install) without a merge still writing into it. False if one still runs.
    pub fn wait_for_merge(&self, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while self.merging.load(Ordering::SeqCst) {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        true
    }
}

fn build_query_parser(
    index: &Index,
    default_search_fields: &[Field],
    default_field_boosts: &std::collections::HashMap<Field, f32>,
) -> QueryParser {
    let mut query_parser = QueryParser::for_index(index, default_search_fields.to_vec());
    for (field, boost) in default_field_boosts {
        query_parser.set_field_boost(*field, *boost);
    }
    query_parser
}

/// Checks a document against `schema` exactly as [`SearchIndex::prepare_put`] (with `id`) or
/// [`SearchIndex::prepare_put_with_embedded_id`] (without) would, without an index: the client
/// checks a whole bulk file against the schema the node reports before it sends anything.
/// Returns the document's id.
pub fn validate_document(schema: &Schema, id: Option<&str>, document_json: &str) -> Result<String, IndexError> {
    if let Some(checked) = check_document_text(schema, document_json) {
        match (id, checked.embedded_id) {
            (Some(id), None) if check_document_id(id).is_ok() => return Ok(id.to_string()),
            (Some(id), Some(embedded)) if embedded == id => return Ok(embedded),
            (None, Some(embedded)) => return Ok(embedded),
            // The slow path below names the problem.
            _ => {}
        }
    }
    let mut document_object = parse_json_object(document_json)?;
    let embedded = embedded_document_id(&document_object)?;
    let id = match (id, embedded) {
        (Some(id), Some(embedded)) if embedded != id => {
            return Err(IndexError::InvalidDocument(format!(
                "the document's `{ID_FIELD}` ({embedded:?}) differs from the id it is stored under ({id:?})"
            )))
        }
        (Some(id), _) => {
            check_document_id(id)?;
            id.to_string()
        }
        (None, Some(embedded)) => embedded,
        (None, None) => return Err(IndexError::InvalidDocument(format!("document has no `{ID_FIELD}` field"))),
    };
    document_object.insert(ID_FIELD.to_string(), JsonValue::String(id.clone()));
    build_tantivy_document(schema, document_object)?;
    Ok(id)
}
