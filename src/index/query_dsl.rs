//! A JSON query language in the shape of Elasticsearch 8's search request body.
//!
//! Both the Elasticsearch-compatible HTTP front door (`_search`, `_count`, `_msearch`) and the
//! QUIC client call this module, so it only deals with JSON values and the index: no HTTP, no
//! Raft. Everything is synchronous; callers run it on a blocking thread.
//!
//! A request goes through two steps:
//!
//! 1. [`JsonSearchRequest::from_json`] checks the request body's *options* (`from`, `size`,
//!    `sort`, `_source`, `track_total_hits`, `highlight`, `aggs`) without an index, so a
//!    malformed body is refused before any work is done. It does not use serde's derive: the
//!    error messages are ours, name the offending key and say what is accepted.
//! 2. [`SearchIndex::search_json`] turns the `query` object into a tantivy query against the
//!    index's schema ([`parse_json_query`]) and runs it with one searcher, so that hits, total,
//!    aggregations and highlights are consistent with each other.
//!
//! # Threat model
//!
//! Any client may be hostile. Nothing here may panic, allocate without bound or recurse
//! without bound:
//!
//! * the query tree is at most `--max-query-depth` levels deep; the builder checks the depth
//!   *before* it descends, so its own recursion is bounded by the (capped) limit;
//! * leaf clauses plus the terms they expand to (analyzed tokens, `terms` lists, `ids`) are at
//!   most `--max-query-terms`;
//! * every text, term and pattern is at most `--max-query-bytes`; query strings go through
//!   [`check_query_bounds`] before tantivy's (recursive) query parser sees them;
//! * `size` ≤ [`MAX_SEARCH_LIMIT`], `from` ≤ [`MAX_SEARCH_OFFSET`], fuzziness ≤ 2 edits, fuzzy
//!   terms ≤ [`MAX_FUZZY_TERM_CHARS`] characters (a Levenshtein automaton grows with the term);
//! * aggregations are restricted to a list of types (tantivy's `filter` aggregation would parse
//!   a query string without our bounds, `top_hits` loads documents), nest at most
//!   [`MAX_AGGREGATION_DEPTH`] deep and run under tantivy's memory and bucket limits;
//! * tantivy constructors with preconditions (`TopDocs::with_limit(0)`, `RangeQuery` without
//!   bounds, `PhraseQuery` with one term, ...) are never called with inputs that break them;
//! * collection stops at the search budget with [`IndexError::DeadlineExceeded`].
//!
//! Anything not supported is refused with a message that names it, rather than silently
//! ignored: a client must not believe a filter was applied when it was not.

use std::collections::BTreeMap;
use std::ops::Bound;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as JsonValue};
use tantivy::aggregation::agg_req::{get_fast_field_names, Aggregations};
use tantivy::aggregation::{AggContextParams, AggregationCollector, AggregationLimitsGuard};
use tantivy::collector::{Count, FruitHandle, MultiCollector, MultiFruit, TopDocs};
use tantivy::query::{
    AllQuery, BooleanQuery, BoostQuery, ConstScoreQuery, DisjunctionMaxQuery, EmptyQuery, ExistsQuery, FuzzyTermQuery,
    Occur, PhrasePrefixQuery, PhraseQuery, Query, QueryParser, RangeQuery, RegexQuery, TermQuery, TermSetQuery,
};
use tantivy::schema::document::Document as _;
use tantivy::schema::{Facet, Field, FieldEntry, FieldType, IndexRecordOption, OwnedValue};
use tantivy::snippet::{collapse_overlapped_ranges, SnippetGenerator};
use tantivy::tokenizer::TokenStream;
use tantivy::{DateTime, DocAddress, Order, Score, Searcher, TantivyDocument, TantivyError, Term};

use super::document::{describe_json_value, owned_value_to_json};
use super::limits::{
    check_query_bounds, query_shape, QueryLimits, SearchBudget, WithinBudget, HARD_MAX_QUERY_DEPTH,
    HARD_MAX_QUERY_TERMS,
};
use super::search::{MAX_SEARCH_LIMIT, MAX_SEARCH_OFFSET};
use super::{IndexError, SearchIndex, ID_FIELD};

#[cfg(test)]
#[path = "query_dsl_tests.rs"]
mod tests;

/// Page size when the request has no `size` (Elasticsearch's default).
pub const DEFAULT_SEARCH_SIZE: usize = 10;

/// Elasticsearch's default `track_total_hits`: totals are exact up to this many hits, then
/// reported as "at least this many".
pub const DEFAULT_TRACK_TOTAL_HITS: u64 = 10_000;

/// Memory one request's aggregations may use (tantivy's estimate), before they fail.
pub const AGGREGATION_MEMORY_LIMIT: u64 = 256 * 1024 * 1024;

/// Most buckets one request's aggregations may return (Elasticsearch's `search.max_buckets`
/// default is 65,536; tantivy's default 65,000).
pub const AGGREGATION_BUCKET_LIMIT: u32 = 65_000;

/// Deepest nesting of sub-aggregations.
pub const MAX_AGGREGATION_DEPTH: usize = 8;

/// Most aggregations (sub-aggregations included) in one request.
pub const MAX_AGGREGATIONS: usize = 128;

/// Most fields one `highlight` may name.
pub const MAX_HIGHLIGHT_FIELDS: usize = 64;

/// Largest `fragment_size` and `number_of_fragments` accepted in `highlight`.
pub const MAX_FRAGMENT_SIZE: usize = 100_000;
pub const MAX_NUMBER_OF_FRAGMENTS: usize = 100;

/// Longest highlight tag, in bytes.
pub const MAX_HIGHLIGHT_TAG_BYTES: usize = 256;

/// Most patterns in `_source` (includes and excludes together) and longest pattern, in bytes.
pub const MAX_SOURCE_PATTERNS: usize = 256;
pub const MAX_FIELD_PATTERN_BYTES: usize = 1024;

/// Most keys in a `sort` array.
pub const MAX_SORT_KEYS: usize = 16;

/// Most fields a `multi_match`, `query_string` or `simple_query_string` may search.
pub const MAX_QUERY_FIELDS: usize = 256;

/// Longest term, in characters, that a fuzzy query accepts: the Levenshtein automaton tantivy
/// builds grows with the term's length.
pub const MAX_FUZZY_TERM_CHARS: usize = 256;

/// Largest `max_expansions` of `match_phrase_prefix`.
pub const MAX_PREFIX_EXPANSIONS: u32 = 10_000;

/// The query types [`parse_json_query`] understands, for error messages.
pub const SUPPORTED_QUERY_TYPES: &[&str] = &[
    "bool",
    "constant_score",
    "dis_max",
    "exists",
    "fuzzy",
    "ids",
    "match",
    "match_all",
    "match_none",
    "match_phrase",
    "match_phrase_prefix",
    "multi_match",
    "prefix",
    "query_string",
    "range",
    "regexp",
    "simple_query_string",
    "term",
    "terms",
    "wildcard",
];

/// The aggregation types accepted in `aggs`. Others are refused: `filter` would run tantivy's
/// query parser on an unchecked query string, `top_hits` loads documents without our limits,
/// `composite` and `multi_terms` were not reviewed for their cost.
pub const SUPPORTED_AGGREGATION_TYPES: &[&str] = &[
    "avg",
    "cardinality",
    "date_histogram",
    "extended_stats",
    "histogram",
    "max",
    "min",
    "percentiles",
    "range",
    "stats",
    "sum",
    "terms",
    "value_count",
];

/// The top-level keys of a search body. Besides the ones that change the search, a few that
/// Elasticsearch clients commonly send are accepted because ignoring them is harmless:
/// `timeout` (the node's own `--search-timeout` applies), `version` and
/// `seq_no_primary_term` (hits carry neither), `explain` and `profile` when false,
/// `stored_fields` when `"_none_"` (no `_source`), `track_scores`.
pub const SUPPORTED_REQUEST_KEYS: &[&str] = &[
    "query",
    "from",
    "size",
    "sort",
    "_source",
    "track_total_hits",
    "highlight",
    "aggs",
    "aggregations",
    "timeout",
    "track_scores",
    "version",
    "seq_no_primary_term",
    "stored_fields",
    "explain",
    "profile",
];

// ---------------------------------------------------------------------------------------------
// Request

/// An Elasticsearch-style search body: `query`, `from`, `size`, `sort`, `_source`,
/// `track_total_hits`, `highlight` and `aggs` (or `aggregations`).
///
/// Built by [`from_json`](Self::from_json), which checks every option. The fields are public so
/// that a front door can apply URL parameters (`?size=`, `?from=`); [`SearchIndex::search_json`]
/// checks the bounds again.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonSearchRequest {
    /// The query object, checked against the schema when the search runs. `None` matches every
    /// document, as Elasticsearch's default `match_all`.
    pub query: Option<JsonValue>,
    /// Number of hits to skip, at most [`MAX_SEARCH_OFFSET`].
    pub from: usize,
    /// Page size, at most [`MAX_SEARCH_LIMIT`]; 0 returns no hits (total and aggregations are
    /// still computed).
    pub size: usize,
    /// `None`: by relevance, without `sort` values in the hits (Elasticsearch's default).
    pub sort: Option<SortKey>,
    pub source: SourceFilter,
    pub track_total_hits: TrackTotalHits,
    pub highlight: Option<HighlightRequest>,
    /// Checked against the list of supported types, normalized (`aggregations` → `aggs`) and
    /// parsed by tantivy, whose aggregation module speaks Elasticsearch's JSON.
    pub aggregations: Option<Aggregations>,
}

impl Default for JsonSearchRequest {
    fn default() -> Self {
        JsonSearchRequest {
            query: None,
            from: 0,
            size: DEFAULT_SEARCH_SIZE,
            sort: None,
            source: SourceFilter::All,
            track_total_hits: TrackTotalHits::UpTo(DEFAULT_TRACK_TOTAL_HITS),
            highlight: None,
            aggregations: None,
        }
    }
}

/// The one sort key supported: relevance, or one fast i64/u64/f64/date field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SortKey {
    /// By score, descending, with each hit's score as its `sort` value.
    Score,
    /// By a fast field; hits have no score and their `sort` value is the field's value (dates
    /// as epoch milliseconds, like Elasticsearch). Documents without a value come last.
    Field { field: String, descending: bool },
}

/// Which stored fields a hit's `_source` carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceFilter {
    /// Every stored field (but `_id`, which is never part of `_source`).
    All,
    /// No `_source` at all.
    None,
    /// Fields matching one of `includes` (all fields when empty) and none of `excludes`.
    /// Patterns match whole field names; `*` matches any run of characters.
    Filter { includes: Vec<String>, excludes: Vec<String> },
}

/// How precisely the total number of hits is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackTotalHits {
    /// Exact count.
    Exact,
    /// No total in the response.
    Off,
    /// Exact up to N; beyond, `{value: N, relation: "gte"}`.
    UpTo(u64),
}

/// How highlight fragments are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HighlightEncoder {
    /// The text as stored (Elasticsearch's `default`).
    Default,
    /// The text HTML-escaped, the tags as given.
    Html,
}

/// Highlighting options, either for all fields or for one (which then wins).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HighlightOptions {
    pub pre_tag: Option<String>,
    pub post_tag: Option<String>,
    /// Characters per fragment; Elasticsearch's default is 100.
    pub fragment_size: Option<usize>,
    /// Fragments per field; 0 highlights each whole value. Elasticsearch's default is 5.
    pub number_of_fragments: Option<usize>,
    pub encoder: Option<HighlightEncoder>,
}

/// The `highlight` section: fields (names or `*` patterns) with their options.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HighlightRequest {
    pub fields: Vec<(String, HighlightOptions)>,
    pub defaults: HighlightOptions,
}

// ---------------------------------------------------------------------------------------------
// Response

/// The hits part of an Elasticsearch search response. The front door adds `took`,
/// `timed_out`, `_shards` and `_index`, and renames `id`, `score`, `source` to `_id`, `_score`
/// and `_source`.
///
/// No field skips serialization, so the type also round-trips through non-self-describing
/// formats; the `serde_json::Value` parts however need a self-describing one (or JSON text).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct JsonSearchResponse {
    /// `None` when `track_total_hits` is false.
    pub total: Option<JsonTotal>,
    /// Highest score among all matches; `None` when sorting by a field, when `size` is 0 or
    /// when nothing matched.
    pub max_score: Option<f32>,
    pub hits: Vec<JsonHit>,
    /// Elasticsearch-shaped aggregation results, keyed by aggregation name.
    pub aggregations: Option<JsonValue>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonTotal {
    pub value: u64,
    pub relation: TotalRelation,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TotalRelation {
    /// `value` is the exact number of matches.
    #[serde(rename = "eq")]
    Eq,
    /// There are at least `value` matches.
    #[serde(rename = "gte")]
    Gte,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct JsonHit {
    pub id: String,
    /// `None` when sorting by a field (as Elasticsearch without `track_scores`).
    pub score: Option<f32>,
    /// The stored fields allowed by `_source`; `None` when `_source` is false.
    pub source: Option<Map<String, JsonValue>>,
    /// Highlighted fragments per field; fields without a match are absent, and so is the map
    /// when no field matched or highlighting was not asked for.
    pub highlight: Option<BTreeMap<String, Vec<String>>>,
    /// The sort values when the request had a `sort`.
    pub sort: Option<Vec<JsonValue>>,
}

// ---------------------------------------------------------------------------------------------
// Parsing the request body

fn request_error(message: impl Into<String>) -> IndexError {
    IndexError::InvalidRequest(message.into())
}

fn query_error(message: impl Into<String>) -> IndexError {
    IndexError::InvalidQuery(message.into())
}

impl JsonSearchRequest {
    /// Parses and checks a search body. Unknown top-level keys are refused (naming the key),
    /// except the harmless ones listed in [`SUPPORTED_REQUEST_KEYS`]. The `query` itself is
    /// checked against the schema by [`SearchIndex::search_json`].
    pub fn from_json(body: &JsonValue) -> Result<Self, IndexError> {
        let object = match body {
            JsonValue::Object(object) => object,
            JsonValue::Null => return Ok(JsonSearchRequest::default()),
            other => {
                return Err(request_error(format!(
                    "the search body must be a JSON object, got {}",
                    describe_json_value(other)
                )))
            }
        };
        let mut request = JsonSearchRequest::default();
        let mut track_scores = false;
        let mut aggregations: Option<(&str, &JsonValue)> = None;
        for (key, value) in object {
            match key.as_str() {
                "query" => request.query = Some(value.clone()),
                "from" => request.from = parse_count("from", value, MAX_SEARCH_OFFSET)?,
                "size" => request.size = parse_count("size", value, MAX_SEARCH_LIMIT)?,
                "sort" => request.sort = parse_sort(value)?,
                "_source" => request.source = parse_source(value)?,
                "track_total_hits" => request.track_total_hits = parse_track_total_hits(value)?,
                "highlight" => request.highlight = Some(parse_highlight(value)?),
                "aggs" | "aggregations" => {
                    if let Some((previous, _)) = aggregations {
                        return Err(request_error(format!(
                            "the body has both `{previous}` and `{key}`; use one of them"
                        )));
                    }
                    aggregations = Some((key.as_str(), value));
                }
                "timeout" => {
                    if !value.is_string() && !value.is_number() {
                        return Err(request_error(format!(
                            "`timeout` must be a time value such as \"10s\", got {}",
                            describe_json_value(value)
                        )));
                    }
                }
                "track_scores" => track_scores = parse_bool("track_scores", value)?,
                "version" | "seq_no_primary_term" => {
                    parse_bool(key, value)?;
                }
                "explain" | "profile" => {
                    if parse_bool(key, value)? {
                        return Err(request_error(format!("`{key}: true` is not supported")));
                    }
                }
                "stored_fields" => {
                    if value.as_str() != Some("_none_") {
                        return Err(request_error(
                            "`stored_fields` is only supported as \"_none_\"; use `_source` to choose fields",
                        ));
                    }
                    request.source = SourceFilter::None;
                }
                other => {
                    return Err(request_error(format!(
                        "search option `{other}` is not supported; supported: {}",
                        SUPPORTED_REQUEST_KEYS.join(", ")
                    )))
                }
            }
        }
        if track_scores && matches!(request.sort, Some(SortKey::Field { .. })) {
            return Err(request_error("`track_scores` with a sort by field is not supported"));
        }
        if let Some((_key, value)) = aggregations {
            request.aggregations = parse_aggregations(value)?;
        }
        Ok(request)
    }
}

fn parse_bool(key: &str, value: &JsonValue) -> Result<bool, IndexError> {
    value
        .as_bool()
        .ok_or_else(|| request_error(format!("`{key}` must be true or false, got {}", describe_json_value(value))))
}

fn parse_count(key: &str, value: &JsonValue, max: usize) -> Result<usize, IndexError> {
    let Some(count) = value.as_u64() else {
        return Err(request_error(format!(
            "`{key}` must be a non-negative integer, got {}",
            describe_json_value(value)
        )));
    };
    match usize::try_from(count) {
        Ok(count) if count <= max => Ok(count),
        _ => Err(request_error(format!("`{key}` {count} exceeds the maximum of {max}"))),
    }
}

fn parse_track_total_hits(value: &JsonValue) -> Result<TrackTotalHits, IndexError> {
    match value {
        JsonValue::Bool(true) => Ok(TrackTotalHits::Exact),
        JsonValue::Bool(false) => Ok(TrackTotalHits::Off),
        other => match other.as_u64() {
            Some(limit) => Ok(TrackTotalHits::UpTo(limit)),
            None => Err(request_error(format!(
                "`track_total_hits` must be true, false or a non-negative integer, got {}",
                describe_json_value(other)
            ))),
        },
    }
}

/// Parses `sort`: `"_score"`, `"field"`, `{"field": "desc"}`, `{"field": {"order": "asc"}}` or
/// an array of those. Only the first key sorts: later `_score` keys (a tie-break) are ignored,
/// a later field key is refused, since tantivy collects by one key only.
fn parse_sort(value: &JsonValue) -> Result<Option<SortKey>, IndexError> {
    let keys: Vec<&JsonValue> = match value {
        JsonValue::Array(items) => {
            if items.len() > MAX_SORT_KEYS {
                return Err(request_error(format!(
                    "`sort` has {} keys, over the maximum of {MAX_SORT_KEYS}",
                    items.len()
                )));
            }
            items.iter().collect()
        }
        single => vec![single],
    };
    let mut primary: Option<SortKey> = None;
    for key in keys {
        let parsed = parse_sort_key(key)?;
        match (&primary, parsed) {
            (None, parsed) => primary = Some(parsed),
            (Some(_), SortKey::Score) => {}
            (Some(_), SortKey::Field { field, .. }) => {
                return Err(request_error(format!(
                    "sorting by more than one field is not supported (second sort key `{field}`); \
                     sort by one fast field, optionally followed by `_score`"
                )))
            }
        }
    }
    Ok(primary)
}

fn parse_sort_key(value: &JsonValue) -> Result<SortKey, IndexError> {
    let (name, order) = match value {
        JsonValue::String(name) => (name.as_str(), None),
        JsonValue::Object(object) if object.len() == 1 => {
            let Some((name, order)) = object.iter().next() else {
                return Err(request_error("a sort key object must have exactly one field"));
            };
            (name.as_str(), Some(order))
        }
        other => {
            return Err(request_error(format!(
                "a sort key must be a field name or an object like {{\"year\": \"desc\"}}, got {}",
                describe_json_value(other)
            )))
        }
    };
    let descending = match order {
        None => None,
        Some(JsonValue::String(order)) => Some(parse_order(name, order)?),
        Some(JsonValue::Object(options)) => {
            let mut descending = None;
            for (option, option_value) in options {
                match option.as_str() {
                    "order" => match option_value.as_str() {
                        Some(order) => descending = Some(parse_order(name, order)?),
                        None => {
                            return Err(request_error(format!("sort `{name}`: `order` must be \"asc\" or \"desc\"")))
                        }
                    },
                    // Documents without a value always come last here.
                    "missing" if option_value.as_str() == Some("_last") => {}
                    other => {
                        return Err(request_error(format!(
                            "sort `{name}`: option `{other}` is not supported; supported: order, missing: \"_last\""
                        )))
                    }
                }
            }
            descending
        }
        Some(other) => {
            return Err(request_error(format!(
                "sort `{name}`: expected \"asc\", \"desc\" or an object with `order`, got {}",
                describe_json_value(other)
            )))
        }
    };
    match name {
        "_score" => {
            if descending == Some(false) {
                return Err(request_error("sorting by `_score` ascending is not supported"));
            }
            Ok(SortKey::Score)
        }
        "_doc" | "_shard_doc" => Err(request_error(format!("sorting by `{name}` is not supported"))),
        "" => Err(request_error("a sort field name must not be empty")),
        // Elasticsearch's default order is ascending for fields.
        field => Ok(SortKey::Field { field: field.to_string(), descending: descending.unwrap_or(false) }),
    }
}

fn parse_order(field: &str, order: &str) -> Result<bool, IndexError> {
    match order {
        "asc" => Ok(false),
        "desc" => Ok(true),
        other => Err(request_error(format!("sort `{field}`: order must be \"asc\" or \"desc\", got {other:?}"))),
    }
}

fn parse_source(value: &JsonValue) -> Result<SourceFilter, IndexError> {
    let (includes, excludes) = match value {
        JsonValue::Bool(true) => return Ok(SourceFilter::All),
        JsonValue::Bool(false) => return Ok(SourceFilter::None),
        JsonValue::String(_) | JsonValue::Array(_) => (parse_patterns("_source", value)?, Vec::new()),
        JsonValue::Object(object) => {
            let mut includes = Vec::new();
            let mut excludes = Vec::new();
            for (key, patterns) in object {
                match key.as_str() {
                    "includes" | "include" => includes.extend(parse_patterns("_source.includes", patterns)?),
                    "excludes" | "exclude" => excludes.extend(parse_patterns("_source.excludes", patterns)?),
                    other => {
                        return Err(request_error(format!(
                            "`_source` option `{other}` is not supported; supported: includes, excludes"
                        )))
                    }
                }
            }
            (includes, excludes)
        }
        other => {
            return Err(request_error(format!(
                "`_source` must be a boolean, a field pattern, an array of patterns or an object with \
                 `includes`/`excludes`, got {}",
                describe_json_value(other)
            )))
        }
    };
    if includes.len() + excludes.len() > MAX_SOURCE_PATTERNS {
        return Err(request_error(format!("`_source` has more than {MAX_SOURCE_PATTERNS} patterns")));
    }
    if includes.is_empty() && excludes.is_empty() {
        return Ok(SourceFilter::All);
    }
    Ok(SourceFilter::Filter { includes, excludes })
}

/// A pattern or an array of patterns (field names with `*` wildcards).
fn parse_patterns(context: &str, value: &JsonValue) -> Result<Vec<String>, IndexError> {
    let items: Vec<&JsonValue> = match value {
        JsonValue::Array(items) => {
            if items.len() > MAX_SOURCE_PATTERNS {
                return Err(request_error(format!("`{context}` has more than {MAX_SOURCE_PATTERNS} patterns")));
            }
            items.iter().collect()
        }
        single => vec![single],
    };
    items
        .into_iter()
        .map(|item| match item.as_str() {
            Some(pattern) if pattern.len() <= MAX_FIELD_PATTERN_BYTES => Ok(pattern.to_string()),
            Some(_) => {
                Err(request_error(format!("`{context}`: a pattern is longer than {MAX_FIELD_PATTERN_BYTES} bytes")))
            }
            None => Err(request_error(format!(
                "`{context}` must contain field name patterns (strings), got {}",
                describe_json_value(item)
            ))),
        })
        .collect()
}

fn parse_highlight(value: &JsonValue) -> Result<HighlightRequest, IndexError> {
    let Some(object) = value.as_object() else {
        return Err(request_error(format!("`highlight` must be an object, got {}", describe_json_value(value))));
    };
    let mut request = HighlightRequest::default();
    let mut fields_value = None;
    for (key, option_value) in object {
        if key == "fields" {
            fields_value = Some(option_value);
        } else {
            parse_highlight_option(&mut request.defaults, "highlight", key, option_value)?;
        }
    }
    let Some(fields_value) = fields_value else {
        return Err(request_error("`highlight` needs `fields`, e.g. {\"fields\": {\"body\": {}}}"));
    };
    // `fields` is an object, or an array of single-key objects (which keeps the order).
    let entries: Vec<(&String, &JsonValue)> = match fields_value {
        JsonValue::Object(fields) => fields.iter().collect(),
        JsonValue::Array(items) => {
            let mut entries = Vec::new();
            for item in items {
                match item.as_object() {
                    Some(single) if single.len() == 1 => entries.extend(single.iter()),
                    _ => {
                        return Err(request_error(
                            "`highlight.fields` as an array must contain objects with exactly one field each",
                        ))
                    }
                }
                if entries.len() > MAX_HIGHLIGHT_FIELDS {
                    break;
                }
            }
            entries
        }
        other => {
            return Err(request_error(format!(
                "`highlight.fields` must be an object, got {}",
                describe_json_value(other)
            )))
        }
    };
    if entries.len() > MAX_HIGHLIGHT_FIELDS {
        return Err(request_error(format!("`highlight` names more than {MAX_HIGHLIGHT_FIELDS} fields")));
    }
    for (name, field_options) in entries {
        if name.len() > MAX_FIELD_PATTERN_BYTES {
            return Err(request_error(format!(
                "`highlight`: a field name is longer than {MAX_FIELD_PATTERN_BYTES} bytes"
            )));
        }
        let Some(field_options) = field_options.as_object() else {
            return Err(request_error(format!("`highlight.fields.{name}` must be an object (possibly empty)")));
        };
        let mut options = HighlightOptions::default();
        for (key, option_value) in field_options {
            parse_highlight_option(&mut options, &format!("highlight.fields.{name}"), key, option_value)?;
        }
        request.fields.push((name.clone(), options));
    }
    Ok(request)
}

fn parse_highlight_option(
    options: &mut HighlightOptions,
    context: &str,
    key: &str,
    value: &JsonValue,
) -> Result<(), IndexError> {
    match key {
        "pre_tags" => options.pre_tag = Some(parse_tag(context, key, value)?),
        "post_tags" => options.post_tag = Some(parse_tag(context, key, value)?),
        "fragment_size" => {
            options.fragment_size = Some(parse_count(&format!("{context}.fragment_size"), value, MAX_FRAGMENT_SIZE)?)
        }
        "number_of_fragments" => {
            options.number_of_fragments =
                Some(parse_count(&format!("{context}.number_of_fragments"), value, MAX_NUMBER_OF_FRAGMENTS)?)
        }
        "encoder" => {
            options.encoder = Some(match value.as_str() {
                Some("default") => HighlightEncoder::Default,
                Some("html") => HighlightEncoder::Html,
                _ => return Err(request_error(format!("`{context}.encoder` must be \"default\" or \"html\""))),
            })
        }
        // One highlighter here; accepting the names Elasticsearch knows changes nothing.
        "type" if matches!(value.as_str(), Some("unified" | "plain" | "fvh")) => {}
        "require_field_match" if value.as_bool() == Some(true) => {}
        other => {
            return Err(request_error(format!(
                "`{context}` option `{other}` (with this value) is not supported; supported: fields, pre_tags, \
                 post_tags, fragment_size, number_of_fragments, encoder, type, require_field_match: true"
            )))
        }
    }
    Ok(())
}

/// `pre_tags`/`post_tags`: an array of strings (the first is used) or a single string.
fn parse_tag(context: &str, key: &str, value: &JsonValue) -> Result<String, IndexError> {
    let tag = match value {
        JsonValue::String(tag) => Some(tag),
        JsonValue::Array(tags) => match tags.first() {
            Some(JsonValue::String(tag)) => Some(tag),
            _ => None,
        },
        _ => None,
    };
    match tag {
        Some(tag) if tag.len() <= MAX_HIGHLIGHT_TAG_BYTES => Ok(tag.clone()),
        Some(_) => {
            Err(request_error(format!("`{context}.{key}`: a tag is longer than {MAX_HIGHLIGHT_TAG_BYTES} bytes")))
        }
        None => Err(request_error(format!("`{context}.{key}` must be a non-empty array of strings"))),
    }
}

/// Checks the aggregation tree (types, nesting, sizes), renames `aggregations` to `aggs` and
/// lets tantivy parse the result.
fn parse_aggregations(value: &JsonValue) -> Result<Option<Aggregations>, IndexError> {
    let mut count = 0_usize;
    let normalized = normalize_aggregations(value, 1, &mut count)?;
    if count == 0 {
        return Ok(None);
    }
    serde_json::from_value::<Aggregations>(normalized)
        .map(Some)
        .map_err(|error| request_error(format!("invalid aggregation: {error}")))
}

/// Recursion bounded by [`MAX_AGGREGATION_DEPTH`], checked before descending.
fn normalize_aggregations(value: &JsonValue, depth: usize, count: &mut usize) -> Result<JsonValue, IndexError> {
    if depth > MAX_AGGREGATION_DEPTH {
        return Err(request_error(format!("aggregations nest deeper than {MAX_AGGREGATION_DEPTH} levels")));
    }
    let Some(aggregations) = value.as_object() else {
        return Err(request_error(format!(
            "`aggs` must be an object of named aggregations, got {}",
            describe_json_value(value)
        )));
    };
    let mut normalized = Map::new();
    for (name, body) in aggregations {
        *count += 1;
        if *count > MAX_AGGREGATIONS {
            return Err(request_error(format!("the request has more than {MAX_AGGREGATIONS} aggregations")));
        }
        let Some(body) = body.as_object() else {
            return Err(request_error(format!("aggregation `{name}` must be an object")));
        };
        let mut normalized_body = Map::new();
        let mut kind: Option<&str> = None;
        for (key, parameters) in body {
            match key.as_str() {
                "aggs" | "aggregations" => {
                    if normalized_body.contains_key("aggs") {
                        return Err(request_error(format!("aggregation `{name}` has both `aggs` and `aggregations`")));
                    }
                    normalized_body.insert("aggs".to_string(), normalize_aggregations(parameters, depth + 1, count)?);
                }
                aggregation_type if SUPPORTED_AGGREGATION_TYPES.contains(&aggregation_type) => {
                    if let Some(previous) = kind {
                        return Err(request_error(format!(
                            "aggregation `{name}` has two types, `{previous}` and `{aggregation_type}`"
                        )));
                    }
                    check_aggregation_parameters(name, aggregation_type, parameters)?;
                    kind = Some(aggregation_type);
                    normalized_body.insert(key.clone(), parameters.clone());
                }
                other => {
                    return Err(request_error(format!(
                        "aggregation type `{other}` (in `{name}`) is not supported; supported: {}",
                        SUPPORTED_AGGREGATION_TYPES.join(", ")
                    )))
                }
            }
        }
        if kind.is_none() {
            return Err(request_error(format!(
                "aggregation `{name}` has no type; supported: {}",
                SUPPORTED_AGGREGATION_TYPES.join(", ")
            )));
        }
        normalized.insert(name.clone(), JsonValue::Object(normalized_body));
    }
    Ok(JsonValue::Object(normalized))
}

/// Bounds that tantivy does not check up front: a `terms` aggregation's sizes decide how much
/// it keeps per segment.
fn check_aggregation_parameters(name: &str, aggregation_type: &str, parameters: &JsonValue) -> Result<(), IndexError> {
    if aggregation_type == "terms" {
        for key in ["size", "shard_size", "segment_size"] {
            if let Some(size) = parameters.get(key) {
                if size.as_u64().is_none_or(|size| size > u64::from(AGGREGATION_BUCKET_LIMIT)) {
                    return Err(request_error(format!(
                        "aggregation `{name}`: `{key}` must be an integer of at most {AGGREGATION_BUCKET_LIMIT}"
                    )));
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Running a search

/// The fast value types that can be sorted on.
#[derive(Debug, Clone, Copy)]
enum SortValueType {
    I64,
    U64,
    F64,
    Date,
}

struct SortPlan {
    field_name: String,
    value_type: SortValueType,
    order: Order,
}

enum RankedHandle {
    Score(FruitHandle<Vec<(Score, DocAddress)>>),
    I64(FruitHandle<Vec<(Option<i64>, DocAddress)>>),
    U64(FruitHandle<Vec<(Option<u64>, DocAddress)>>),
    F64(FruitHandle<Vec<(Option<f64>, DocAddress)>>),
    Date(FruitHandle<Vec<(Option<DateTime>, DocAddress)>>),
}

struct RankedDocument {
    address: DocAddress,
    score: Option<f32>,
    sort_value: Option<JsonValue>,
}

/// A highlighted field: its generator (built from the query) and resolved options.
struct HighlightPlan {
    field_name: String,
    field: Field,
    pre_tag: String,
    post_tag: String,
    fragment_size: usize,
    number_of_fragments: usize,
    encoder: HighlightEncoder,
}

impl SearchIndex {
    /// Runs an Elasticsearch-style search on the committed data, with one searcher for hits,
    /// total, aggregations and highlights. Stops with [`IndexError::DeadlineExceeded`] once the
    /// budget is spent.
    pub fn search_json(
        &self,
        request: &JsonSearchRequest,
        limits: &QueryLimits,
        budget: SearchBudget,
    ) -> Result<JsonSearchResponse, IndexError> {
        // The fields are public: check again what `from_json` checked.
        if request.size > MAX_SEARCH_LIMIT {
            return Err(request_error(format!("`size` {} exceeds the maximum of {MAX_SEARCH_LIMIT}", request.size)));
        }
        if request.from > MAX_SEARCH_OFFSET {
            return Err(request_error(format!("`from` {} exceeds the maximum of {MAX_SEARCH_OFFSET}", request.from)));
        }
        let query = match &request.query {
            Some(query_json) => parse_json_query(self, query_json, limits)?,
            None => Box::new(AllQuery),
        };
        let sort_plan = match &request.sort {
            Some(SortKey::Field { field, descending }) => Some(self.plan_json_sort(field, *descending)?),
            _ => None,
        };
        let highlight_plans = match &request.highlight {
            Some(highlight) => self.plan_highlight(highlight)?,
            None => Vec::new(),
        };
        if let Some(aggregations) = &request.aggregations {
            self.check_aggregation_fields(aggregations)?;
        }
        if budget.expired() {
            return Err(IndexError::DeadlineExceeded);
        }

        let wants_total = request.track_total_hits != TrackTotalHits::Off;
        let wants_hits = request.size > 0;
        let by_score = sort_plan.is_none();
        let mut response = JsonSearchResponse { total: None, max_score: None, hits: Vec::new(), aggregations: None };
        if !wants_total && !wants_hits && request.aggregations.is_none() {
            // Nothing to collect; the request was still checked above.
            return Ok(response);
        }

        let searcher = self.reader.searcher();
        let mut collectors = MultiCollector::new();
        let count_handle = wants_total.then(|| collectors.add_collector(Count));
        let ranked_handle = wants_hits.then(|| {
            // `size > 0` here, which `TopDocs::with_limit` requires.
            let top_docs = TopDocs::with_limit(request.size).and_offset(request.from);
            add_ranked_collector(&mut collectors, top_docs, sort_plan.as_ref())
        });
        // Past the first page, the best score overall is not among the hits.
        let max_score_handle = (wants_hits && by_score && request.from > 0)
            .then(|| collectors.add_collector(TopDocs::with_limit(1).order_by_score()));
        let aggregation_handle = request.aggregations.as_ref().map(|aggregations| {
            let limits = AggregationLimitsGuard::new(Some(AGGREGATION_MEMORY_LIMIT), Some(AGGREGATION_BUCKET_LIMIT));
            let context = AggContextParams::new(limits, self.index.tokenizers().clone());
            collectors.add_collector(AggregationCollector::from_aggs(aggregations.clone(), context))
        });

        let mut fruits = run_within_budget(&searcher, query.as_ref(), collectors, budget)?;

        if let Some(handle) = count_handle {
            let count = handle.extract(&mut fruits) as u64;
            response.total = Some(match request.track_total_hits {
                TrackTotalHits::UpTo(limit) if count > limit => {
                    JsonTotal { value: limit, relation: TotalRelation::Gte }
                }
                _ => JsonTotal { value: count, relation: TotalRelation::Eq },
            });
        }
        let ranked = match ranked_handle {
            Some(handle) => extract_ranked(handle, &mut fruits),
            None => Vec::new(),
        };
        if by_score && wants_hits {
            response.max_score = match max_score_handle {
                Some(handle) => handle.extract(&mut fruits).first().map(|(score, _)| *score),
                None => ranked.first().and_then(|document| document.score),
            };
        }
        if let Some(handle) = aggregation_handle {
            let results = handle.extract(&mut fruits);
            let json = serde_json::to_value(&results)
                .map_err(|error| IndexError::Internal(format!("cannot render the aggregations as JSON: {error}")))?;
            response.aggregations = Some(json);
        }

        let mut generators = Vec::with_capacity(highlight_plans.len());
        for plan in &highlight_plans {
            let mut generator = SnippetGenerator::create(&searcher, query.as_ref(), plan.field)?;
            generator.set_max_num_chars(if plan.number_of_fragments == 0 {
                usize::MAX / 2
            } else {
                plan.fragment_size
            });
            generators.push(generator);
        }
        let explicit_score_sort = request.sort == Some(SortKey::Score);
        response.hits.reserve(ranked.len());
        for document in ranked {
            if budget.expired() {
                return Err(IndexError::DeadlineExceeded);
            }
            let sort = if sort_plan.is_some() {
                Some(vec![document.sort_value.unwrap_or(JsonValue::Null)])
            } else if explicit_score_sort {
                Some(vec![document.score.map_or(JsonValue::Null, score_to_json)])
            } else {
                None
            };
            let stored: TantivyDocument = searcher.doc(document.address)?;
            response.hits.push(self.render_hit(
                &stored,
                document.score,
                sort,
                &request.source,
                &highlight_plans,
                &generators,
            )?);
        }
        Ok(response)
    }

    /// Counts the documents matching `query` (every document when `None`), as Elasticsearch's
    /// `_count`.
    pub fn count_json(
        &self,
        query: Option<&JsonValue>,
        limits: &QueryLimits,
        budget: SearchBudget,
    ) -> Result<u64, IndexError> {
        let query = match query {
            Some(query_json) => parse_json_query(self, query_json, limits)?,
            None => Box::new(AllQuery),
        };
        if budget.expired() {
            return Err(IndexError::DeadlineExceeded);
        }
        let searcher = self.reader.searcher();
        let mut collectors = MultiCollector::new();
        let count_handle = collectors.add_collector(Count);
        let mut fruits = run_within_budget(&searcher, query.as_ref(), collectors, budget)?;
        Ok(count_handle.extract(&mut fruits) as u64)
    }

    fn plan_json_sort(&self, field_name: &str, descending: bool) -> Result<SortPlan, IndexError> {
        let field = self
            .schema
            .get_field(field_name)
            .map_err(|_| request_error(format!("unknown sort field `{field_name}`")))?;
        let field_entry = self.schema.get_field_entry(field);
        let value_type = match field_entry.field_type() {
            FieldType::I64(_) => SortValueType::I64,
            FieldType::U64(_) => SortValueType::U64,
            FieldType::F64(_) => SortValueType::F64,
            FieldType::Date(_) => SortValueType::Date,
            other => {
                return Err(request_error(format!(
                    "field `{field_name}` is of type {} and cannot be used for sorting; sorting works on i64, \
                     u64, f64 and date fast fields, or `_score`",
                    other.value_type().name()
                )))
            }
        };
        if !field_entry.is_fast() {
            return Err(request_error(format!(
                "field `{field_name}` is not a fast field and cannot be used for sorting"
            )));
        }
        let order = if descending { Order::Desc } else { Order::Asc };
        Ok(SortPlan { field_name: field_name.to_string(), value_type, order })
    }

    /// Resolves highlight field names (and `*` patterns) to stored text fields.
    fn plan_highlight(&self, highlight: &HighlightRequest) -> Result<Vec<HighlightPlan>, IndexError> {
        let mut plans: Vec<HighlightPlan> = Vec::new();
        for (pattern, options) in &highlight.fields {
            let fields: Vec<(Field, String)> = if pattern.contains('*') {
                self.schema
                    .fields()
                    .filter(|(field, entry)| {
                        *field != self.id_field && is_highlightable(entry) && glob_matches(pattern, entry.name())
                    })
                    .map(|(field, entry)| (field, entry.name().to_string()))
                    .collect()
            } else {
                let field = self
                    .schema
                    .get_field(pattern)
                    .map_err(|_| request_error(format!("unknown highlight field `{pattern}`")))?;
                let entry = self.schema.get_field_entry(field);
                if !is_highlightable(entry) {
                    return Err(request_error(format!(
                        "field `{pattern}` cannot be highlighted: only stored, indexed text fields can"
                    )));
                }
                vec![(field, pattern.clone())]
            };
            for (field, field_name) in fields {
                if plans.iter().any(|plan| plan.field == field) {
                    continue;
                }
                let pick = |own: &Option<String>, default: &Option<String>, fallback: &str| {
                    own.clone().or_else(|| default.clone()).unwrap_or_else(|| fallback.to_string())
                };
                plans.push(HighlightPlan {
                    field_name,
                    field,
                    pre_tag: pick(&options.pre_tag, &highlight.defaults.pre_tag, "<em>"),
                    post_tag: pick(&options.post_tag, &highlight.defaults.post_tag, "</em>"),
                    fragment_size: options.fragment_size.or(highlight.defaults.fragment_size).unwrap_or(100).max(1),
                    number_of_fragments: options
                        .number_of_fragments
                        .or(highlight.defaults.number_of_fragments)
                        .unwrap_or(5),
                    encoder: options.encoder.or(highlight.defaults.encoder).unwrap_or(HighlightEncoder::Default),
                });
                if plans.len() > MAX_HIGHLIGHT_FIELDS {
                    return Err(request_error(format!("`highlight` covers more than {MAX_HIGHLIGHT_FIELDS} fields")));
                }
            }
        }
        Ok(plans)
    }

    /// tantivy silently aggregates nothing over a missing field; Elasticsearch users expect an
    /// error for a typo, and for a field that cannot be aggregated.
    fn check_aggregation_fields(&self, aggregations: &Aggregations) -> Result<(), IndexError> {
        for field_name in get_fast_field_names(aggregations) {
            let Some((field, _path)) = self.schema.find_field(&field_name) else {
                return Err(request_error(format!("aggregation on unknown field `{field_name}`")));
            };
            if !self.schema.get_field_entry(field).is_fast() {
                return Err(request_error(format!(
                    "field `{field_name}` is not a fast field; aggregations need fast fields (\"fast\": true in \
                     the schema)"
                )));
            }
        }
        Ok(())
    }

    fn render_hit(
        &self,
        document: &TantivyDocument,
        score: Option<f32>,
        sort: Option<Vec<JsonValue>>,
        source_filter: &SourceFilter,
        highlight_plans: &[HighlightPlan],
        generators: &[SnippetGenerator],
    ) -> Result<JsonHit, IndexError> {
        let named_document = document.to_named_doc(&self.schema);
        let mut id: Option<String> = None;
        let mut source = Map::new();
        let mut highlight: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (field_name, values) in &named_document.0 {
            if field_name == ID_FIELD {
                if let Some(OwnedValue::Str(stored_id)) = values.first() {
                    id = Some(stored_id.clone());
                }
                continue;
            }
            if let Some(index) = highlight_plans.iter().position(|plan| &plan.field_name == field_name) {
                if let (Some(plan), Some(generator)) = (highlight_plans.get(index), generators.get(index)) {
                    let fragments = highlight_values(plan, generator, values);
                    if !fragments.is_empty() {
                        highlight.insert(field_name.clone(), fragments);
                    }
                }
            }
            if !source_filter.keeps(field_name) {
                continue;
            }
            let rendered = if values.len() == 1 {
                values.first().map(|value| owned_value_to_json(field_name, value)).transpose()?.unwrap_or_default()
            } else {
                JsonValue::Array(values.iter().map(|value| owned_value_to_json(field_name, value)).collect::<Result<
                    Vec<JsonValue>,
                    IndexError,
                >>(
                )?)
            };
            source.insert(field_name.clone(), rendered);
        }
        let Some(id) = id else {
            return Err(IndexError::Internal(format!("a stored document has no `{ID_FIELD}` value")));
        };
        Ok(JsonHit {
            id,
            score,
            source: (*source_filter != SourceFilter::None).then_some(source),
            highlight: (!highlight.is_empty()).then_some(highlight),
            sort,
        })
    }
}

fn is_highlightable(entry: &FieldEntry) -> bool {
    matches!(entry.field_type(), FieldType::Str(options) if options.get_indexing_options().is_some())
        && entry.is_stored()
}

impl SourceFilter {
    fn keeps(&self, field_name: &str) -> bool {
        match self {
            SourceFilter::All => true,
            SourceFilter::None => false,
            SourceFilter::Filter { includes, excludes } => {
                (includes.is_empty() || includes.iter().any(|pattern| glob_matches(pattern, field_name)))
                    && !excludes.iter().any(|pattern| glob_matches(pattern, field_name))
            }
        }
    }
}

/// The highlighted fragments of a field's values, at most `number_of_fragments` (all values'
/// best fragment when 0, each whole).
fn highlight_values(plan: &HighlightPlan, generator: &SnippetGenerator, values: &[OwnedValue]) -> Vec<String> {
    let mut fragments = Vec::new();
    for value in values {
        let OwnedValue::Str(text) = value else { continue };
        let snippet = generator.snippet(text);
        if snippet.highlighted().is_empty() {
            continue;
        }
        fragments.push(if plan.number_of_fragments == 0 {
            // The whole value, as Elasticsearch does: the fragment's ranges are relative to
            // the fragment, which tantivy cuts at token boundaries.
            let start = snippet.fragment_range().start;
            let ranges: Vec<std::ops::Range<usize>> = snippet
                .highlighted()
                .iter()
                .map(|range| range.start.saturating_add(start)..range.end.saturating_add(start))
                .collect();
            render_highlighted(text, &ranges, plan)
        } else {
            render_highlighted(snippet.fragment(), snippet.highlighted(), plan)
        });
        if plan.number_of_fragments > 0 && fragments.len() >= plan.number_of_fragments {
            break;
        }
    }
    fragments
}

/// Like `Snippet::to_html`, with the choice of escaping: Elasticsearch's default encoder
/// leaves the text as it is.
fn render_highlighted(fragment: &str, highlighted: &[std::ops::Range<usize>], plan: &HighlightPlan) -> String {
    let push_text = |output: &mut String, text: &str| match plan.encoder {
        HighlightEncoder::Default => output.push_str(text),
        HighlightEncoder::Html => {
            for character in text.chars() {
                match character {
                    '<' => output.push_str("&lt;"),
                    '>' => output.push_str("&gt;"),
                    '&' => output.push_str("&amp;"),
                    '"' => output.push_str("&quot;"),
                    '\'' => output.push_str("&#x27;"),
                    other => output.push(other),
                }
            }
        }
    };
    let mut output = String::with_capacity(fragment.len() + 16);
    let mut position = 0_usize;
    for range in collapse_overlapped_ranges(highlighted) {
        // `get` rather than indexing: a range that does not fit is skipped, never a panic.
        let (Some(before), Some(highlighted)) = (fragment.get(position..range.start), fragment.get(range.clone()))
        else {
            continue;
        };
        push_text(&mut output, before);
        output.push_str(&plan.pre_tag);
        push_text(&mut output, highlighted);
        output.push_str(&plan.post_tag);
        position = range.end;
    }
    push_text(&mut output, fragment.get(position..).unwrap_or_default());
    output
}

fn score_to_json(score: f32) -> JsonValue {
    serde_json::Number::from_f64(f64::from(score)).map_or(JsonValue::Null, JsonValue::Number)
}

fn add_ranked_collector(
    collectors: &mut MultiCollector<'_>,
    top_docs: TopDocs,
    sort_plan: Option<&SortPlan>,
) -> RankedHandle {
    let Some(sort_plan) = sort_plan else {
        return RankedHandle::Score(collectors.add_collector(top_docs.order_by_score()));
    };
    let name = || sort_plan.field_name.clone();
    let order = sort_plan.order;
    // The fast value type must match the field type exactly, hence one arm per type.
    match sort_plan.value_type {
        SortValueType::I64 => {
            RankedHandle::I64(collectors.add_collector(top_docs.order_by_fast_field::<i64>(name(), order)))
        }
        SortValueType::U64 => {
            RankedHandle::U64(collectors.add_collector(top_docs.order_by_fast_field::<u64>(name(), order)))
        }
        SortValueType::F64 => {
            RankedHandle::F64(collectors.add_collector(top_docs.order_by_fast_field::<f64>(name(), order)))
        }
        SortValueType::Date => {
            RankedHandle::Date(collectors.add_collector(top_docs.order_by_fast_field::<DateTime>(name(), order)))
        }
    }
}

fn extract_ranked(handle: RankedHandle, fruits: &mut MultiFruit) -> Vec<RankedDocument> {
    fn by_value<T>(documents: Vec<(Option<T>, DocAddress)>, to_json: impl Fn(T) -> JsonValue) -> Vec<RankedDocument> {
        documents
            .into_iter()
            .map(|(value, address)| RankedDocument { address, score: None, sort_value: value.map(&to_json) })
            .collect()
    }
    match handle {
        RankedHandle::Score(handle) => handle
            .extract(fruits)
            .into_iter()
            .map(|(score, address)| RankedDocument { address, score: Some(score), sort_value: None })
            .collect(),
        RankedHandle::I64(handle) => by_value(handle.extract(fruits), JsonValue::from),
        RankedHandle::U64(handle) => by_value(handle.extract(fruits), JsonValue::from),
        RankedHandle::F64(handle) => by_value(handle.extract(fruits), |value| {
            serde_json::Number::from_f64(value).map_or(JsonValue::Null, JsonValue::Number)
        }),
        // Elasticsearch reports dates in `sort` as epoch milliseconds.
        RankedHandle::Date(handle) => {
            by_value(handle.extract(fruits), |value| JsonValue::from(value.into_timestamp_millis()))
        }
    }
}

/// Runs the collectors under the budget and sorts tantivy's errors into ours.
fn run_within_budget(
    searcher: &Searcher,
    query: &dyn Query,
    collectors: MultiCollector<'_>,
    budget: SearchBudget,
) -> Result<MultiFruit, IndexError> {
    let collector = WithinBudget { inner: collectors, budget };
    match searcher.search(query, &collector) {
        Ok(fruits) => Ok(fruits),
        Err(_) if budget.expired() => Err(IndexError::DeadlineExceeded),
        Err(TantivyError::AggregationError(error)) => Err(request_error(format!("aggregation failed: {error}"))),
        // Checked up front as far as possible; what remains is a request the schema cannot
        // serve (e.g. an aggregation on a field of the wrong type).
        Err(TantivyError::SchemaError(message) | TantivyError::InvalidArgument(message)) => {
            Err(request_error(format!("the search cannot run: {message}")))
        }
        Err(TantivyError::FieldNotFound(field)) => Err(request_error(format!("unknown field `{field}`"))),
        Err(error) => Err(error.into()),
    }
}

// ---------------------------------------------------------------------------------------------
// The query DSL

/// Turns an Elasticsearch query object into a tantivy query against `index`'s schema, within
/// `limits` (depth, number of clauses and terms, text sizes).
pub fn parse_json_query(
    index: &SearchIndex,
    value: &JsonValue,
    limits: &QueryLimits,
) -> Result<Box<dyn Query>, IndexError> {
    let mut builder = QueryBuilder {
        index,
        limits,
        max_depth: limits.max_query_depth.clamp(1, HARD_MAX_QUERY_DEPTH),
        max_terms: limits.max_query_terms.min(HARD_MAX_QUERY_TERMS),
        terms: 0,
    };
    builder.build(value, 1)
}

/// Parses a field list with optional boosts, such as `"title^2,body"`, into
/// `[("title", 2.0), ("body", 1.0)]`. Used for a default-search-fields setting; the schema is
/// not consulted here.
pub fn parse_field_boosts(spec: &str) -> Result<Vec<(String, f32)>, IndexError> {
    let mut fields = Vec::new();
    for item in spec.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        fields.push(parse_field_boost(item).map_err(|message| request_error(format!("{message} in {spec:?}")))?);
    }
    if fields.is_empty() {
        return Err(request_error(format!("no field in {spec:?}; expected e.g. \"title^2,body\"")));
    }
    Ok(fields)
}

/// `"title^2.5"` → `("title", 2.5)`, `"body"` → `("body", 1.0)`.
fn parse_field_boost(item: &str) -> Result<(String, f32), String> {
    let (name, boost) = match item.rsplit_once('^') {
        Some((name, boost_text)) => {
            let boost: f32 =
                boost_text.trim().parse().map_err(|_| format!("invalid boost {boost_text:?} of field `{name}`"))?;
            (name.trim(), boost)
        }
        None => (item.trim(), 1.0),
    };
    if name.is_empty() {
        return Err(format!("a field name is missing before `^` in {item:?}"));
    }
    if !boost.is_finite() || boost < 0.0 {
        return Err(format!("the boost of field `{name}` must be a non-negative number"));
    }
    Ok((name.to_string(), boost))
}

/// What a fuzzy match may change.
#[derive(Debug, Clone, Copy)]
enum Fuzziness {
    Fixed(u8),
    /// Elasticsearch's `AUTO:low,high`: 0 edits below `low` characters, 1 below `high`, else 2.
    Auto {
        low: usize,
        high: usize,
    },
}

impl Fuzziness {
    fn distance(self, term: &str) -> u8 {
        match self {
            Fuzziness::Fixed(distance) => distance,
            Fuzziness::Auto { low, high } => {
                let length = term.chars().count();
                if length < low {
                    0
                } else if length < high {
                    1
                } else {
                    2
                }
            }
        }
    }
}

fn parse_fuzziness(context: &str, value: &JsonValue) -> Result<Fuzziness, IndexError> {
    let too_far = |distance: &dyn std::fmt::Display| {
        query_error(format!("{context}: fuzziness {distance} is over the maximum of 2 edits"))
    };
    if let Some(number) = value.as_f64() {
        if number.fract() != 0.0 || number < 0.0 {
            return Err(query_error(format!("{context}: fuzziness must be 0, 1, 2 or \"AUTO\", got {number}")));
        }
        if number > 2.0 {
            return Err(too_far(&number));
        }
        return Ok(Fuzziness::Fixed(number as u8));
    }
    let Some(text) = value.as_str() else {
        return Err(query_error(format!(
            "{context}: fuzziness must be 0, 1, 2 or \"AUTO\", got {}",
            describe_json_value(value)
        )));
    };
    let text = text.trim();
    if text.eq_ignore_ascii_case("auto") {
        return Ok(Fuzziness::Auto { low: 3, high: 6 });
    }
    if let Some(bounds) = text.get(..5).filter(|head| head.eq_ignore_ascii_case("auto:")).and(text.get(5..)) {
        let parsed = bounds
            .split_once(',')
            .and_then(|(low, high)| Some((low.trim().parse::<usize>().ok()?, high.trim().parse::<usize>().ok()?)));
        return match parsed {
            Some((low, high)) if low <= high => Ok(Fuzziness::Auto { low, high }),
            _ => Err(query_error(format!("{context}: invalid fuzziness {text:?}; expected e.g. \"AUTO:3,6\""))),
        };
    }
    match text.parse::<u64>() {
        Ok(distance) if distance <= 2 => Ok(Fuzziness::Fixed(distance as u8)),
        Ok(distance) => Err(too_far(&distance)),
        Err(_) => Err(query_error(format!("{context}: fuzziness must be 0, 1, 2 or \"AUTO\", got {text:?}"))),
    }
}

/// Resolves `minimum_should_match` (`2`, `-1`, `"75%"`, `"-25%"`) against the number of
/// optional clauses, as Elasticsearch does. The combined form (`"3<90%"`) is refused.
fn resolve_minimum_should_match(
    context: &str,
    value: &JsonValue,
    optional_clauses: usize,
) -> Result<usize, IndexError> {
    let invalid = || {
        query_error(format!(
            "{context}: minimum_should_match must be an integer or a percentage such as \"75%\", got {}",
            describe_json_value(value)
        ))
    };
    let apply_count = |count: i64| -> usize {
        let magnitude = usize::try_from(count.unsigned_abs()).unwrap_or(usize::MAX);
        if count >= 0 {
            magnitude
        } else {
            optional_clauses.saturating_sub(magnitude)
        }
    };
    if let Some(count) = value.as_i64() {
        return Ok(apply_count(count));
    }
    let text = value.as_str().ok_or_else(invalid)?.trim();
    if let Some(percent_text) = text.strip_suffix('%') {
        let percent: i64 = percent_text.trim().parse().map_err(|_| invalid())?;
        if !(-100..=100).contains(&percent) {
            return Err(invalid());
        }
        let share = optional_clauses.saturating_mul(percent.unsigned_abs() as usize) / 100;
        return Ok(if percent >= 0 { share } else { optional_clauses.saturating_sub(share) });
    }
    let count: i64 = text.parse().map_err(|_| invalid())?;
    Ok(apply_count(count))
}

/// A query object's parameters, checked against the options the query type accepts.
struct Parameters<'a> {
    query_type: &'a str,
    map: &'a Map<String, JsonValue>,
}

impl<'a> Parameters<'a> {
    /// Refuses any key not in `allowed` (`_name` is always accepted, and ignored).
    fn new(query_type: &'a str, value: &'a JsonValue, allowed: &[&str]) -> Result<Self, IndexError> {
        let Some(map) = value.as_object() else {
            return Err(query_error(format!("`{query_type}` expects an object, got {}", describe_json_value(value))));
        };
        for key in map.keys() {
            if key != "_name" && !allowed.contains(&key.as_str()) {
                let supported = if allowed.is_empty() { "none".to_string() } else { allowed.join(", ") };
                return Err(query_error(format!(
                    "`{query_type}` does not support option `{key}`; supported: {supported}"
                )));
            }
        }
        Ok(Parameters { query_type, map })
    }

    /// A parameter; JSON null counts as absent.
    fn get(&self, key: &str) -> Option<&'a JsonValue> {
        self.map.get(key).filter(|value| !value.is_null())
    }

    fn required(&self, key: &str) -> Result<&'a JsonValue, IndexError> {
        self.get(key).ok_or_else(|| query_error(format!("`{}` needs `{key}`", self.query_type)))
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>, IndexError> {
        match self.get(key) {
            None => Ok(None),
            Some(JsonValue::String(text)) => Ok(Some(text)),
            Some(other) => Err(query_error(format!(
                "`{}`: `{key}` must be a string, got {}",
                self.query_type,
                describe_json_value(other)
            ))),
        }
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>, IndexError> {
        match self.get(key) {
            None => Ok(None),
            Some(JsonValue::Bool(flag)) => Ok(Some(*flag)),
            Some(other) => Err(query_error(format!(
                "`{}`: `{key}` must be true or false, got {}",
                self.query_type,
                describe_json_value(other)
            ))),
        }
    }

    /// A non-negative finite number (`boost`, `tie_breaker`).
    fn number(&self, key: &str) -> Result<Option<f32>, IndexError> {
        match self.get(key) {
            None => Ok(None),
            Some(value) => match value.as_f64() {
                Some(number) if number.is_finite() && number >= 0.0 && number <= f64::from(f32::MAX) => {
                    Ok(Some(number as f32))
                }
                _ => Err(query_error(format!(
                    "`{}`: `{key}` must be a non-negative number, got {}",
                    self.query_type,
                    describe_json_value(value)
                ))),
            },
        }
    }

    fn boost(&self) -> Result<f32, IndexError> {
        Ok(self.number("boost")?.unwrap_or(1.0))
    }

    fn unsigned(&self, key: &str, max: u32) -> Result<Option<u32>, IndexError> {
        match self.get(key) {
            None => Ok(None),
            Some(value) => match value.as_u64() {
                Some(number) if number <= u64::from(max) => Ok(Some(number as u32)),
                _ => Err(query_error(format!(
                    "`{}`: `{key}` must be an integer between 0 and {max}, got {}",
                    self.query_type,
                    describe_json_value(value)
                ))),
            },
        }
    }

    fn operator_is_and(&self, key: &str) -> Result<bool, IndexError> {
        match self.string(key)? {
            None => Ok(false),
            Some(operator) if operator.eq_ignore_ascii_case("or") => Ok(false),
            Some(operator) if operator.eq_ignore_ascii_case("and") => Ok(true),
            Some(other) => {
                Err(query_error(format!("`{}`: `{key}` must be \"and\" or \"or\", got {other:?}", self.query_type)))
            }
        }
    }

    /// `zero_terms_query`: what a text that analyzes to no term matches.
    fn zero_terms_match_all(&self) -> Result<bool, IndexError> {
        match self.string("zero_terms_query")? {
            None | Some("none") => Ok(false),
            Some("all") => Ok(true),
            Some(other) => Err(query_error(format!(
                "`{}`: `zero_terms_query` must be \"none\" or \"all\", got {other:?}",
                self.query_type
            ))),
        }
    }
}

/// How a text is matched against an analyzed field.
enum TextMatch<'a> {
    /// Any (or all) of the analyzed terms, optionally fuzzy.
    Terms {
        conjunction: bool,
        fuzziness: Option<Fuzziness>,
        transpositions: bool,
        minimum_should_match: Option<&'a JsonValue>,
    },
    Phrase {
        slop: u32,
    },
    PhrasePrefix {
        max_expansions: u32,
    },
}

/// Options of a text match that are not about how terms combine.
struct MatchSettings {
    zero_terms_match_all: bool,
    /// Values that do not fit a non-text field match nothing instead of failing.
    lenient: bool,
}

struct QueryBuilder<'a> {
    index: &'a SearchIndex,
    limits: &'a QueryLimits,
    max_depth: usize,
    max_terms: usize,
    /// Leaf clauses and terms so far.
    terms: usize,
}

fn with_boost(query: Box<dyn Query>, boost: f32) -> Box<dyn Query> {
    if boost == 1.0 {
        query
    } else {
        Box::new(BoostQuery::new(query, boost))
    }
}

/// The record option a term query reads postings with: frequencies when the field has them.
fn term_record_option(entry: &FieldEntry) -> IndexRecordOption {
    match entry.field_type().get_index_record_option() {
        Some(option) if option.has_freq() => IndexRecordOption::WithFreqs,
        _ => IndexRecordOption::Basic,
    }
}

fn has_positions(entry: &FieldEntry) -> bool {
    entry.field_type().get_index_record_option().is_some_and(|option| option.has_positions())
}

/// A scalar as text (Elasticsearch accepts numbers and booleans where text is expected).
fn scalar_text(value: &JsonValue) -> Option<String> {
    match value {
        JsonValue::String(text) => Some(text.clone()),
        JsonValue::Number(number) => Some(number.to_string()),
        JsonValue::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

/// Appends `text` to a regex as literals: ASCII punctuation is written as a `\x{..}` escape,
/// which the regex syntax accepts for every character, so no metacharacter survives.
fn push_regex_literal(pattern: &mut String, character: char) {
    if character.is_ascii() && !character.is_ascii_alphanumeric() {
        pattern.push_str(&format!("\\x{{{:X}}}", character as u32));
    } else {
        pattern.push(character);
    }
}

/// Elasticsearch's wildcard syntax (`*` any run of characters, `?` one character, `\` escapes
/// the next character) as a regex matching whole terms.
fn wildcard_to_regex(wildcard: &str, case_insensitive: bool) -> String {
    let mut pattern = String::with_capacity(wildcard.len() * 2 + 8);
    pattern.push_str(if case_insensitive { "(?si)" } else { "(?s)" });
    let mut characters = wildcard.chars();
    while let Some(character) = characters.next() {
        match character {
            '*' => pattern.push_str(".*"),
            '?' => pattern.push('.'),
            '\\' => match characters.next() {
                Some(escaped) => push_regex_literal(&mut pattern, escaped),
                None => push_regex_literal(&mut pattern, '\\'),
            },
            other => push_regex_literal(&mut pattern, other),
        }
    }
    pattern
}

/// Whether a field name matches a pattern where `*` matches any run of characters. Iterative
/// (greedy with one backtrack point), so it costs at most pattern × name steps.
fn glob_matches(pattern: &str, text: &str) -> bool {
    let (pattern, text) = (pattern.as_bytes(), text.as_bytes());
    let (mut pattern_index, mut text_index) = (0_usize, 0_usize);
    let mut star: Option<usize> = None;
    let mut star_text_index = 0_usize;
    while text_index < text.len() {
        match pattern.get(pattern_index) {
            Some(b'*') => {
                star = Some(pattern_index);
                pattern_index += 1;
                star_text_index = text_index;
            }
            Some(byte) if Some(byte) == text.get(text_index) => {
                pattern_index += 1;
                text_index += 1;
            }
            _ => match star {
                Some(star_index) => {
                    pattern_index = star_index + 1;
                    star_text_index += 1;
                    text_index = star_text_index;
                }
                None => return false,
            },
        }
    }
    pattern.get(pattern_index..).unwrap_or_default().iter().all(|byte| *byte == b'*')
}

impl<'a> QueryBuilder<'a> {
    fn count_terms(&mut self, count: usize) -> Result<(), IndexError> {
        self.terms = self.terms.saturating_add(count);
        if self.terms > self.max_terms {
            return Err(query_error(format!(
                "the query has more than {} clauses and terms, over the limit of {} (--max-query-terms)",
                self.max_terms, self.max_terms
            )));
        }
        Ok(())
    }

    fn check_text_size(&self, context: &str, text: &str) -> Result<(), IndexError> {
        if text.len() > self.limits.max_query_bytes {
            return Err(query_error(format!(
                "{context}: the text is {} bytes, over the limit of {} (--max-query-bytes)",
                text.len(),
                self.limits.max_query_bytes
            )));
        }
        Ok(())
    }

    fn field(&self, name: &str) -> Result<(Field, &'a FieldEntry), IndexError> {
        let schema = &self.index.schema;
        let field = schema.get_field(name).map_err(|_| query_error(format!("unknown field `{name}`")))?;
        Ok((field, schema.get_field_entry(field)))
    }

    /// Builds one query object. `depth` is this object's level (the root is 1); compound
    /// queries check the limit here, before building their children, so the recursion never
    /// goes deeper than the (capped) limit.
    fn build(&mut self, value: &JsonValue, depth: usize) -> Result<Box<dyn Query>, IndexError> {
        if depth > self.max_depth {
            return Err(query_error(format!(
                "the query nests more than {} levels deep, over the limit of {} (--max-query-depth)",
                self.max_depth, self.max_depth
            )));
        }
        let Some(object) = value.as_object() else {
            return Err(query_error(format!(
                "a query must be an object such as {{\"match_all\": {{}}}}, got {}",
                describe_json_value(value)
            )));
        };
        let mut entries = object.iter();
        let (Some((query_type, body)), None) = (entries.next(), entries.next()) else {
            let keys: Vec<&str> = object.keys().take(4).map(String::as_str).collect();
            return Err(query_error(format!(
                "a query object must have exactly one key, the query type; got {} keys ({})",
                object.len(),
                keys.join(", ")
            )));
        };
        match query_type.as_str() {
            "match_all" => {
                let parameters = Parameters::new("match_all", body, &["boost"])?;
                self.count_terms(1)?;
                Ok(with_boost(Box::new(AllQuery), parameters.boost()?))
            }
            "match_none" => {
                Parameters::new("match_none", body, &[])?;
                self.count_terms(1)?;
                Ok(Box::new(EmptyQuery))
            }
            "bool" => self.build_bool(body, depth),
            "constant_score" => {
                let parameters = Parameters::new("constant_score", body, &["filter", "boost"])?;
                let filter = self.build(parameters.required("filter")?, depth + 1)?;
                Ok(Box::new(ConstScoreQuery::new(filter, parameters.boost()?)))
            }
            "dis_max" => {
                let parameters = Parameters::new("dis_max", body, &["queries", "tie_breaker", "boost"])?;
                let Some(queries) = parameters.required("queries")?.as_array() else {
                    return Err(query_error("`dis_max`: `queries` must be an array of queries"));
                };
                if queries.is_empty() {
                    return Err(query_error("`dis_max`: `queries` must not be empty"));
                }
                let tie_breaker = parameters.number("tie_breaker")?.unwrap_or(0.0);
                if tie_breaker > 1.0 {
                    return Err(query_error("`dis_max`: `tie_breaker` must be between 0 and 1"));
                }
                let mut disjuncts = Vec::with_capacity(queries.len().min(self.max_terms));
                for query in queries {
                    disjuncts.push(self.build(query, depth + 1)?);
                }
                Ok(with_boost(
                    Box::new(DisjunctionMaxQuery::with_tie_breaker(disjuncts, tie_breaker)),
                    parameters.boost()?,
                ))
            }
            "match" => self.build_match(body),
            "match_phrase" | "match_phrase_prefix" => self.build_match_phrase(query_type, body),
            "multi_match" => self.build_multi_match(body),
            "query_string" | "simple_query_string" => self.build_query_string(query_type, body),
            "term" => self.build_term(body),
            "terms" => self.build_terms(body),
            "range" => self.build_range(body),
            "exists" => self.build_exists(body),
            "prefix" | "wildcard" | "regexp" => self.build_pattern(query_type, body),
            "fuzzy" => self.build_fuzzy(body),
            "ids" => self.build_ids(body),
            other => Err(query_error(format!(
                "query type `{other}` is not supported; supported: {}",
                SUPPORTED_QUERY_TYPES.join(", ")
            ))),
        }
    }

    /// `{"bool": {"must": .., "should": .., "must_not": .., "filter": .., "minimum_should_match": ..}}`.
    ///
    /// Elasticsearch's semantics: filter clauses must match but do not score (a constant 0);
    /// without must or filter clauses at least one should clause must match; only must_not
    /// clauses match every other document; no clause at all matches every document.
    fn build_bool(&mut self, body: &JsonValue, depth: usize) -> Result<Box<dyn Query>, IndexError> {
        let parameters = Parameters::new(
            "bool",
            body,
            &["must", "should", "must_not", "filter", "minimum_should_match", "boost", "adjust_pure_negative"],
        )?;
        if parameters.boolean("adjust_pure_negative")? == Some(false) {
            return Err(query_error("`bool`: `adjust_pure_negative: false` is not supported"));
        }
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        let mut counts = [0_usize; 4];
        for (slot, (key, occur)) in
            [("must", Occur::Must), ("filter", Occur::Must), ("should", Occur::Should), ("must_not", Occur::MustNot)]
                .into_iter()
                .enumerate()
        {
            let Some(value) = parameters.get(key) else { continue };
            let items: Vec<&JsonValue> = match value {
                JsonValue::Array(items) => items.iter().collect(),
                single => vec![single],
            };
            for item in items {
                let query = self.build(item, depth + 1)?;
                let query: Box<dyn Query> =
                    if key == "filter" { Box::new(ConstScoreQuery::new(query, 0.0)) } else { query };
                clauses.push((occur, query));
                if let Some(count) = counts.get_mut(slot) {
                    *count += 1;
                }
            }
        }
        let [must, filter, should, must_not] = counts;
        let boost = parameters.boost()?;
        if clauses.is_empty() {
            return Ok(with_boost(Box::new(AllQuery), boost));
        }
        let required = must + filter > 0;
        let mut minimum = match parameters.get("minimum_should_match") {
            Some(value) => resolve_minimum_should_match("`bool`", value, should)?,
            None => usize::from(!required && should > 0),
        };
        if !required && should > 0 {
            // A query of optional clauses only matches what at least one of them matches.
            minimum = minimum.max(1);
        }
        if !required && should == 0 && must_not > 0 {
            clauses.push((Occur::Must, Box::new(ConstScoreQuery::new(Box::new(AllQuery), 0.0))));
        }
        Ok(with_boost(Box::new(BooleanQuery::with_minimum_required_clauses(clauses, minimum)), boost))
    }

    /// The single `field: value` entry of a field-level query (`term`, `match`, `range`, ...).
    fn single_field<'v>(&self, query_type: &str, body: &'v JsonValue) -> Result<(&'v str, &'v JsonValue), IndexError> {
        let Some(object) = body.as_object() else {
            return Err(query_error(format!(
                "`{query_type}` expects an object such as {{\"field\": ...}}, got {}",
                describe_json_value(body)
            )));
        };
        let mut entries = object.iter();
        match (entries.next(), entries.next()) {
            (Some((field, value)), None) => Ok((field.as_str(), value)),
            (None, _) => Err(query_error(format!("`{query_type}` needs a field"))),
            (Some(_), Some(_)) => {
                Err(query_error(format!("`{query_type}` takes exactly one field; combine several with `bool`")))
            }
        }
    }

    /// `{"match": {"field": "text"}}` or `{"match": {"field": {"query": .., "operator": ..}}}`.
    fn build_match(&mut self, body: &JsonValue) -> Result<Box<dyn Query>, IndexError> {
        let (field_name, value) = self.single_field("match", body)?;
        if !value.is_object() {
            let kind = TextMatch::Terms {
                conjunction: false,
                fuzziness: None,
                transpositions: true,
                minimum_should_match: None,
            };
            let settings = MatchSettings { zero_terms_match_all: false, lenient: false };
            return self.match_field(field_name, value, &kind, &settings);
        }
        let parameters = Parameters::new(
            "match",
            value,
            &[
                "query",
                "operator",
                "fuzziness",
                "fuzzy_transpositions",
                "minimum_should_match",
                "zero_terms_query",
                "lenient",
                "boost",
            ],
        )?;
        let kind = TextMatch::Terms {
            conjunction: parameters.operator_is_and("operator")?,
            fuzziness: parameters.get("fuzziness").map(|value| parse_fuzziness("`match`", value)).transpose()?,
            transpositions: parameters.boolean("fuzzy_transpositions")?.unwrap_or(true),
            minimum_should_match: parameters.get("minimum_should_match"),
        };
        let settings = MatchSettings {
            zero_terms_match_all: parameters.zero_terms_match_all()?,
            lenient: parameters.boolean("lenient")?.unwrap_or(false),
        };
        let query = self.match_field(field_name, parameters.required("query")?, &kind, &settings)?;
        Ok(with_boost(query, parameters.boost()?))
    }

    fn build_match_phrase(&mut self, query_type: &str, body: &JsonValue) -> Result<Box<dyn Query>, IndexError> {
        let prefix = query_type == "match_phrase_prefix";
        let (field_name, value) = self.single_field(query_type, body)?;
        let (text, kind, settings, boost) = if value.is_object() {
            let allowed: &[&str] = if prefix {
                &["query", "max_expansions", "zero_terms_query", "boost"]
            } else {
                &["query", "slop", "zero_terms_query", "boost"]
            };
            let parameters = Parameters::new(query_type, value, allowed)?;
            let kind = if prefix {
                TextMatch::PhrasePrefix {
                    max_expansions: parameters.unsigned("max_expansions", MAX_PREFIX_EXPANSIONS)?.unwrap_or(50),
                }
            } else {
                TextMatch::Phrase { slop: parameters.unsigned("slop", u32::MAX)?.unwrap_or(0) }
            };
            let settings = MatchSettings { zero_terms_match_all: parameters.zero_terms_match_all()?, lenient: false };
            (parameters.required("query")?, kind, settings, parameters.boost()?)
        } else {
            let kind =
                if prefix { TextMatch::PhrasePrefix { max_expansions: 50 } } else { TextMatch::Phrase { slop: 0 } };
            (value, kind, MatchSettings { zero_terms_match_all: false, lenient: false }, 1.0)
        };
        let query = self.match_field(field_name, text, &kind, &settings)?;
        Ok(with_boost(query, boost))
    }

    /// A match on one field. Text fields: the text is analyzed with the field's analyzer and
    /// the terms combined per `kind`. Other fields: an exact term, as Elasticsearch does.
    fn match_field(
        &mut self,
        field_name: &str,
        value: &JsonValue,
        kind: &TextMatch<'_>,
        settings: &MatchSettings,
    ) -> Result<Box<dyn Query>, IndexError> {
        let (field, entry) = self.field(field_name)?;
        if !matches!(entry.field_type(), FieldType::Str(_)) {
            let term = match self.value_term(field, entry, field_name, value, TermPurpose::Search) {
                Ok(term) => term,
                Err(_) if settings.lenient => return Ok(Box::new(EmptyQuery)),
                Err(error) => return Err(error),
            };
            return self.exact_term_query(entry, field_name, term);
        }
        if !entry.is_indexed() {
            return Err(query_error(format!("field `{field_name}` is not indexed and cannot be searched")));
        }
        let Some(text) = scalar_text(value) else {
            return Err(query_error(format!(
                "the text to match in `{field_name}` must be a string, got {}",
                describe_json_value(value)
            )));
        };
        let terms = self.analyze(field, field_name, &text)?;
        if terms.is_empty() {
            return Ok(if settings.zero_terms_match_all { Box::new(AllQuery) } else { Box::new(EmptyQuery) });
        }
        let record_option = term_record_option(entry);
        match kind {
            TextMatch::Terms { conjunction, fuzziness, transpositions, minimum_should_match } => {
                let mut queries: Vec<Box<dyn Query>> = Vec::with_capacity(terms.len());
                for (_position, term) in terms {
                    let distance = match fuzziness {
                        Some(fuzziness) => {
                            let term_value = term.value();
                            let text = term_value.as_str().unwrap_or_default();
                            check_fuzzy_term(field_name, text)?;
                            fuzziness.distance(text)
                        }
                        None => 0,
                    };
                    if distance == 0 {
                        queries.push(Box::new(TermQuery::new(term, record_option)));
                    } else {
                        queries.push(Box::new(FuzzyTermQuery::new(term, distance, *transpositions)));
                    }
                }
                if queries.len() == 1 {
                    if let Some(query) = queries.pop() {
                        return Ok(query);
                    }
                }
                let optional = queries.len();
                if *conjunction {
                    return Ok(Box::new(BooleanQuery::new(
                        queries.into_iter().map(|query| (Occur::Must, query)).collect(),
                    )));
                }
                let minimum = match minimum_should_match {
                    Some(value) => resolve_minimum_should_match("`match`", value, optional)?.max(1),
                    None => 1,
                };
                let clauses = queries.into_iter().map(|query| (Occur::Should, query)).collect();
                Ok(Box::new(BooleanQuery::with_minimum_required_clauses(clauses, minimum)))
            }
            TextMatch::Phrase { slop } => {
                if terms.len() == 1 {
                    return Ok(match terms.into_iter().next() {
                        Some((_, term)) => Box::new(TermQuery::new(term, record_option)),
                        None => Box::new(EmptyQuery),
                    });
                }
                self.require_positions(entry, field_name)?;
                Ok(Box::new(PhraseQuery::new_with_offset_and_slop(terms, *slop)))
            }
            TextMatch::PhrasePrefix { max_expansions } => {
                if terms.len() > 1 {
                    self.require_positions(entry, field_name)?;
                }
                let mut query = PhrasePrefixQuery::new_with_offset(terms);
                query.set_max_expansions(*max_expansions);
                Ok(Box::new(query))
            }
        }
    }

    fn require_positions(&self, entry: &FieldEntry, field_name: &str) -> Result<(), IndexError> {
        if has_positions(entry) {
            Ok(())
        } else {
            Err(query_error(format!(
                "field `{field_name}` is indexed without positions, so phrase queries cannot run on it"
            )))
        }
    }

    /// The terms of `text` as the field's analyzer produces them, with their positions.
    fn analyze(&mut self, field: Field, field_name: &str, text: &str) -> Result<Vec<(usize, Term)>, IndexError> {
        self.check_text_size(&format!("the text to match in `{field_name}`"), text)?;
        let mut analyzer = self
            .index
            .index
            .tokenizer_for_field(field)
            .map_err(|error| query_error(format!("cannot analyze text for field `{field_name}`: {error}")))?;
        let mut stream = analyzer.token_stream(text);
        let mut terms = Vec::new();
        while stream.advance() {
            self.count_terms(1)?;
            let token = stream.token();
            terms.push((token.position, Term::from_field_text(field, &token.text)));
        }
        Ok(terms)
    }

    /// Field list items `name^boost`; patterns with `*` expand to the searchable text fields;
    /// no list means the index's default search fields.
    fn resolve_fields(
        &self,
        query_type: &str,
        value: Option<&JsonValue>,
    ) -> Result<Vec<(Field, String, f32)>, IndexError> {
        let items: Vec<&JsonValue> = match value {
            None => {
                return Ok(self
                    .index
                    .default_search_fields
                    .iter()
                    .map(|field| {
                        let boost = self.index.default_field_boosts.get(field).copied().unwrap_or(1.0);
                        (*field, self.index.schema.get_field_name(*field).to_string(), boost)
                    })
                    .collect())
            }
            Some(JsonValue::Array(items)) => items.iter().collect(),
            Some(single) => vec![single],
        };
        if items.len() > MAX_QUERY_FIELDS {
            return Err(query_error(format!("`{query_type}` names more than {MAX_QUERY_FIELDS} fields")));
        }
        let mut fields: Vec<(Field, String, f32)> = Vec::new();
        for item in items {
            let Some(spec) = item.as_str() else {
                return Err(query_error(format!(
                    "`{query_type}`: `fields` must contain field names, got {}",
                    describe_json_value(item)
                )));
            };
            if spec.len() > MAX_FIELD_PATTERN_BYTES {
                return Err(query_error(format!(
                    "`{query_type}`: a field name is longer than {MAX_FIELD_PATTERN_BYTES} bytes"
                )));
            }
            let (name, boost) =
                parse_field_boost(spec).map_err(|message| query_error(format!("`{query_type}`: {message}")))?;
            if name.contains('*') {
                for field in &self.index.default_search_fields {
                    let field_name = self.index.schema.get_field_name(*field);
                    if glob_matches(&name, field_name) && !fields.iter().any(|(known, _, _)| known == field) {
                        fields.push((*field, field_name.to_string(), boost));
                    }
                }
            } else {
                let (field, _entry) = self.field(&name)?;
                if !fields.iter().any(|(known, _, _)| *known == field) {
                    fields.push((field, name, boost));
                }
            }
        }
        Ok(fields)
    }

    /// `multi_match`: the same text matched in several fields, combined as `best_fields`
    /// (the best field's score, plus `tie_breaker` times the others), `most_fields` (the sum),
    /// `phrase` or `phrase_prefix` (per-field phrases, best field).
    fn build_multi_match(&mut self, body: &JsonValue) -> Result<Box<dyn Query>, IndexError> {
        let parameters = Parameters::new(
            "multi_match",
            body,
            &[
                "query",
                "fields",
                "type",
                "operator",
                "minimum_should_match",
                "fuzziness",
                "fuzzy_transpositions",
                "tie_breaker",
                "slop",
                "max_expansions",
                "lenient",
                "zero_terms_query",
                "boost",
            ],
        )?;
        let text = parameters.required("query")?;
        let fields = self.resolve_fields("multi_match", parameters.get("fields"))?;
        let match_type = parameters.string("type")?.unwrap_or("best_fields");
        let fuzziness = parameters.get("fuzziness").map(|value| parse_fuzziness("`multi_match`", value)).transpose()?;
        let phrase = matches!(match_type, "phrase" | "phrase_prefix");
        if phrase && fuzziness.is_some() {
            return Err(query_error(format!("`multi_match`: fuzziness is not allowed with type `{match_type}`")));
        }
        let kind = match match_type {
            "best_fields" | "most_fields" => TextMatch::Terms {
                conjunction: parameters.operator_is_and("operator")?,
                fuzziness,
                transpositions: parameters.boolean("fuzzy_transpositions")?.unwrap_or(true),
                minimum_should_match: parameters.get("minimum_should_match"),
            },
            "phrase" => TextMatch::Phrase { slop: parameters.unsigned("slop", u32::MAX)?.unwrap_or(0) },
            "phrase_prefix" => TextMatch::PhrasePrefix {
                max_expansions: parameters.unsigned("max_expansions", MAX_PREFIX_EXPANSIONS)?.unwrap_or(50),
            },
            other => {
                return Err(query_error(format!(
                    "`multi_match` type `{other}` is not supported; supported: best_fields, most_fields, phrase, \
                     phrase_prefix"
                )))
            }
        };
        let settings = MatchSettings {
            zero_terms_match_all: parameters.zero_terms_match_all()?,
            lenient: parameters.boolean("lenient")?.unwrap_or(false),
        };
        let tie_breaker = parameters.number("tie_breaker")?.unwrap_or(0.0);
        if tie_breaker > 1.0 {
            return Err(query_error("`multi_match`: `tie_breaker` must be between 0 and 1"));
        }
        let mut per_field: Vec<Box<dyn Query>> = Vec::with_capacity(fields.len());
        for (_field, name, field_boost) in fields {
            let query = self.match_field(&name, text, &kind, &settings)?;
            per_field.push(with_boost(query, field_boost));
        }
        let query: Box<dyn Query> = if per_field.is_empty() {
            Box::new(EmptyQuery)
        } else if match_type == "most_fields" {
            Box::new(BooleanQuery::with_minimum_required_clauses(
                per_field.into_iter().map(|query| (Occur::Should, query)).collect(),
                1,
            ))
        } else {
            Box::new(DisjunctionMaxQuery::with_tie_breaker(per_field, tie_breaker))
        };
        Ok(with_boost(query, parameters.boost()?))
    }

    /// `query_string` and `simple_query_string`, run through tantivy's query parser with the
    /// requested fields and boosts. The text is measured by [`check_query_bounds`] first: the
    /// parser recurses per nesting level and would overflow the stack on hostile input.
    ///
    /// `simple_query_string` is parsed leniently (syntax errors are dropped, as Elasticsearch
    /// never fails it), but with tantivy's syntax, not Elasticsearch's simple syntax (`|`, `+`
    /// as operators between terms).
    fn build_query_string(&mut self, query_type: &str, body: &JsonValue) -> Result<Box<dyn Query>, IndexError> {
        let simple = query_type == "simple_query_string";
        let allowed: &[&str] = if simple {
            &["query", "fields", "default_operator", "lenient", "analyze_wildcard", "boost"]
        } else {
            &["query", "default_field", "fields", "default_operator", "lenient", "analyze_wildcard", "boost"]
        };
        let parameters = Parameters::new(query_type, body, allowed)?;
        let Some(text) = parameters.string("query")? else {
            return Err(query_error(format!("`{query_type}` needs `query`")));
        };
        check_query_bounds(text, self.limits)?;
        self.count_terms(query_shape(text).terms.max(1))?;
        parameters.boolean("analyze_wildcard")?;
        let fields_value = match (parameters.get("fields"), parameters.string("default_field")?) {
            (Some(_), Some(_)) => {
                return Err(query_error(format!("`{query_type}`: use either `fields` or `default_field`, not both")))
            }
            (Some(fields), None) => Some(fields.clone()),
            (None, Some("*")) | (None, None) => None,
            (None, Some(field)) => Some(JsonValue::String(field.to_string())),
        };
        let fields = self.resolve_fields(query_type, fields_value.as_ref())?;
        for (_field, name, _boost) in &fields {
            let (_, entry) = self.field(name)?;
            if !entry.is_indexed() {
                return Err(query_error(format!(
                    "`{query_type}`: field `{name}` is not indexed and cannot be searched"
                )));
            }
        }
        let boost = parameters.boost()?;
        if text.trim() == "*" {
            return Ok(with_boost(Box::new(AllQuery), boost));
        }
        let mut parser = QueryParser::for_index(&self.index.index, fields.iter().map(|(field, _, _)| *field).collect());
        for (field, _name, field_boost) in &fields {
            if *field_boost != 1.0 {
                parser.set_field_boost(*field, *field_boost);
            }
        }
        if parameters.operator_is_and("default_operator")? {
            parser.set_conjunction_by_default();
        }
        let query = if simple || parameters.boolean("lenient")? == Some(true) {
            parser.parse_query_lenient(text).0
        } else {
            parser.parse_query(text).map_err(|error| query_error(format!("`{query_type}`: {error}")))?
        };
        Ok(with_boost(query, boost))
    }

    /// `{"term": {"field": value}}` or `{"term": {"field": {"value": .., "boost": ..}}}`. Text
    /// is not analyzed (Elasticsearch's term semantics): it must equal an indexed term.
    fn build_term(&mut self, body: &JsonValue) -> Result<Box<dyn Query>, IndexError> {
        let (field_name, value) = self.single_field("term", body)?;
        let (value, boost, case_insensitive) = if value.is_object() {
            let parameters = Parameters::new("term", value, &["value", "boost", "case_insensitive"])?;
            (
                parameters.required("value")?,
                parameters.boost()?,
                parameters.boolean("case_insensitive")?.unwrap_or(false),
            )
        } else {
            (value, 1.0, false)
        };
        let (field, entry) = self.field(field_name)?;
        if case_insensitive && matches!(entry.field_type(), FieldType::Str(_)) {
            let Some(text) = scalar_text(value) else {
                return Err(query_error(format!("`term` on `{field_name}`: the value must be a string")));
            };
            self.check_text_size(&format!("`term` on `{field_name}`"), &text)?;
            let mut pattern = String::from("(?si)");
            text.chars().for_each(|character| push_regex_literal(&mut pattern, character));
            return Ok(with_boost(self.regex_query(entry, field, field_name, "term", &pattern)?, boost));
        }
        let term = self.value_term(field, entry, field_name, value, TermPurpose::Search)?;
        Ok(with_boost(self.exact_term_query(entry, field_name, term)?, boost))
    }

    /// One exact term. A fast field that is not indexed (such as a u64 kept only for sorting)
    /// is searched with a one-value range on its fast values instead.
    fn exact_term_query(
        &mut self,
        entry: &FieldEntry,
        field_name: &str,
        term: Term,
    ) -> Result<Box<dyn Query>, IndexError> {
        self.count_terms(1)?;
        if entry.is_indexed() {
            return Ok(Box::new(TermQuery::new(term, term_record_option(entry))));
        }
        if entry.is_fast() && !matches!(entry.field_type(), FieldType::Str(_) | FieldType::Facet(_)) {
            return Ok(Box::new(RangeQuery::new(Bound::Included(term.clone()), Bound::Included(term))));
        }
        Err(query_error(format!("field `{field_name}` is not indexed and cannot be searched")))
    }

    /// `{"terms": {"field": [v1, v2, ...], "boost": ..}}`: any of the exact terms.
    fn build_terms(&mut self, body: &JsonValue) -> Result<Box<dyn Query>, IndexError> {
        let Some(object) = body.as_object() else {
            return Err(query_error(format!("`terms` expects an object, got {}", describe_json_value(body))));
        };
        let mut boost = 1.0_f32;
        let mut target: Option<(&str, &JsonValue)> = None;
        for (key, value) in object {
            match key.as_str() {
                "boost" => {
                    boost = match value.as_f64() {
                        Some(number) if number.is_finite() && number >= 0.0 && number <= f64::from(f32::MAX) => {
                            number as f32
                        }
                        _ => return Err(query_error("`terms`: `boost` must be a non-negative number")),
                    }
                }
                "_name" => {}
                field => {
                    if target.is_some() {
                        return Err(query_error("`terms` takes exactly one field; combine several with `bool`"));
                    }
                    target = Some((field, value));
                }
            }
        }
        let Some((field_name, values)) = target else {
            return Err(query_error("`terms` needs a field"));
        };
        let Some(values) = values.as_array() else {
            return Err(query_error(format!(
                "`terms` on `{field_name}`: expected an array of values (terms lookup is not supported), got {}",
                describe_json_value(values)
            )));
        };
        let (field, entry) = self.field(field_name)?;
        // Counted before anything is built, so a huge list is refused at once.
        self.count_terms(values.len().max(1))?;
        let mut terms = Vec::with_capacity(values.len());
        for value in values {
            terms.push(self.value_term(field, entry, field_name, value, TermPurpose::Search)?);
        }
        if terms.is_empty() {
            return Ok(Box::new(EmptyQuery));
        }
        let query: Box<dyn Query> = if entry.is_indexed() {
            Box::new(TermSetQuery::new(terms))
        } else if entry.is_fast() && !matches!(entry.field_type(), FieldType::Str(_) | FieldType::Facet(_)) {
            let clauses = terms
                .into_iter()
                .map(|term| {
                    let query: Box<dyn Query> =
                        Box::new(RangeQuery::new(Bound::Included(term.clone()), Bound::Included(term)));
                    (Occur::Should, query)
                })
                .collect();
            Box::new(BooleanQuery::with_minimum_required_clauses(clauses, 1))
        } else {
            return Err(query_error(format!("field `{field_name}` is not indexed and cannot be searched")));
        };
        Ok(with_boost(query, boost))
    }

    /// `{"range": {"field": {"gte": .., "lt": ..}}}` on numbers, dates (RFC 3339 strings or
    /// epoch milliseconds), booleans and text (compared as raw terms).
    fn build_range(&mut self, body: &JsonValue) -> Result<Box<dyn Query>, IndexError> {
        let (field_name, value) = self.single_field("range", body)?;
        let parameters = Parameters::new("range", value, &["gt", "gte", "lt", "lte", "boost"])?;
        let (field, entry) = self.field(field_name)?;
        match entry.field_type() {
            FieldType::Str(_)
            | FieldType::U64(_)
            | FieldType::I64(_)
            | FieldType::F64(_)
            | FieldType::Date(_)
            | FieldType::Bool(_) => {}
            other => {
                return Err(query_error(format!(
                    "`range` does not work on field `{field_name}` of type {}",
                    other.value_type().name()
                )))
            }
        }
        let usable = entry.is_indexed() || (entry.is_fast() && !matches!(entry.field_type(), FieldType::Str(_)));
        if !usable {
            return Err(query_error(format!("field `{field_name}` is not indexed and cannot be searched")));
        }
        self.count_terms(1)?;
        let bound = |inclusive: &str, exclusive: &str| -> Result<Bound<Term>, IndexError> {
            match (parameters.get(inclusive), parameters.get(exclusive)) {
                (Some(_), Some(_)) => Err(query_error(format!(
                    "`range` on `{field_name}`: use either `{inclusive}` or `{exclusive}`, not both"
                ))),
                (Some(value), None) => {
                    Ok(Bound::Included(self.value_term(field, entry, field_name, value, TermPurpose::Range)?))
                }
                (None, Some(value)) => {
                    Ok(Bound::Excluded(self.value_term(field, entry, field_name, value, TermPurpose::Range)?))
                }
                (None, None) => Ok(Bound::Unbounded),
            }
        };
        let lower = bound("gte", "gt")?;
        let upper = bound("lte", "lt")?;
        if matches!((&lower, &upper), (Bound::Unbounded, Bound::Unbounded)) {
            // `RangeQuery` needs at least one bound.
            return Err(query_error(format!("`range` on `{field_name}` needs at least one of gt, gte, lt, lte")));
        }
        Ok(with_boost(Box::new(RangeQuery::new(lower, upper)), parameters.boost()?))
    }

    /// `{"exists": {"field": "name"}}`: documents with a value in the field. tantivy answers it
    /// from fast fields only.
    fn build_exists(&mut self, body: &JsonValue) -> Result<Box<dyn Query>, IndexError> {
        let parameters = Parameters::new("exists", body, &["field", "boost"])?;
        let Some(field_name) = parameters.string("field")? else {
            return Err(query_error("`exists` needs `field`"));
        };
        let (field, entry) = self.field(field_name)?;
        self.count_terms(1)?;
        if field == self.index.id_field {
            // Every document has an id.
            return Ok(with_boost(Box::new(AllQuery), parameters.boost()?));
        }
        if !entry.is_fast() {
            return Err(query_error(format!(
                "`exists` needs a fast field, and field `{field_name}` is not one (declare it with \"fast\": true in \
                 the schema)"
            )));
        }
        Ok(with_boost(Box::new(ExistsQuery::new(field_name.to_string(), false)), parameters.boost()?))
    }

    /// `prefix`, `wildcard` and `regexp` on text fields, all as a regex over the field's terms
    /// (the value is not analyzed, as in Elasticsearch). The pattern is bounded in length;
    /// tantivy bounds the automaton's size.
    fn build_pattern(&mut self, query_type: &str, body: &JsonValue) -> Result<Box<dyn Query>, IndexError> {
        let (field_name, value) = self.single_field(query_type, body)?;
        let (text, boost, case_insensitive) = if value.is_object() {
            let allowed: &[&str] = if query_type == "wildcard" {
                &["value", "wildcard", "boost", "case_insensitive"]
            } else {
                &["value", "boost", "case_insensitive"]
            };
            let parameters = Parameters::new(query_type, value, allowed)?;
            let text = match (parameters.string("value")?, parameters.string("wildcard")?) {
                (Some(text), None) | (None, Some(text)) => text,
                (Some(_), Some(_)) => {
                    return Err(query_error(format!("`{query_type}`: use either `value` or `wildcard`, not both")))
                }
                (None, None) => return Err(query_error(format!("`{query_type}` needs `value`"))),
            };
            (text, parameters.boost()?, parameters.boolean("case_insensitive")?.unwrap_or(false))
        } else {
            match value.as_str() {
                Some(text) => (text, 1.0, false),
                None => {
                    return Err(query_error(format!(
                        "`{query_type}` on `{field_name}`: the value must be a string, got {}",
                        describe_json_value(value)
                    )))
                }
            }
        };
        let (field, entry) = self.field(field_name)?;
        self.check_text_size(&format!("`{query_type}` on `{field_name}`"), text)?;
        self.count_terms(1)?;
        let pattern = match query_type {
            "prefix" => {
                let mut pattern = String::from(if case_insensitive { "(?si)" } else { "(?s)" });
                text.chars().for_each(|character| push_regex_literal(&mut pattern, character));
                pattern.push_str(".*");
                pattern
            }
            "wildcard" => wildcard_to_regex(text, case_insensitive),
            _ => {
                if case_insensitive {
                    format!("(?i){text}")
                } else {
                    text.to_string()
                }
            }
        };
        Ok(with_boost(self.regex_query(entry, field, field_name, query_type, &pattern)?, boost))
    }

    fn regex_query(
        &self,
        entry: &FieldEntry,
        field: Field,
        field_name: &str,
        query_type: &str,
        pattern: &str,
    ) -> Result<Box<dyn Query>, IndexError> {
        self.require_indexed_text(entry, field_name, query_type)?;
        check_automaton_cost(pattern)
            .map_err(|reason| query_error(format!("`{query_type}` on `{field_name}`: {reason}")))?;
        let query = RegexQuery::from_pattern(pattern, field)
            .map_err(|error| query_error(format!("`{query_type}` on `{field_name}`: invalid pattern: {error}")))?;
        Ok(Box::new(query))
    }

    fn require_indexed_text(&self, entry: &FieldEntry, field_name: &str, query_type: &str) -> Result<(), IndexError> {
        match entry.field_type() {
            FieldType::Str(options) if options.get_indexing_options().is_some() => Ok(()),
            FieldType::Str(_) => {
                Err(query_error(format!("field `{field_name}` is not indexed and cannot be searched")))
            }
            other => Err(query_error(format!(
                "`{query_type}` works on text fields; field `{field_name}` is of type {}",
                other.value_type().name()
            ))),
        }
    }

    /// `{"fuzzy": {"field": {"value": .., "fuzziness": "AUTO"|0|1|2, "transpositions": ..}}}`:
    /// terms within an edit distance of the (not analyzed) value.
    fn build_fuzzy(&mut self, body: &JsonValue) -> Result<Box<dyn Query>, IndexError> {
        let (field_name, value) = self.single_field("fuzzy", body)?;
        let (text, fuzziness, transpositions, boost) = if value.is_object() {
            let parameters = Parameters::new("fuzzy", value, &["value", "fuzziness", "transpositions", "boost"])?;
            let text = scalar_text(parameters.required("value")?)
                .ok_or_else(|| query_error(format!("`fuzzy` on `{field_name}`: the value must be a string")))?;
            let fuzziness = match parameters.get("fuzziness") {
                Some(value) => parse_fuzziness("`fuzzy`", value)?,
                None => Fuzziness::Auto { low: 3, high: 6 },
            };
            (text, fuzziness, parameters.boolean("transpositions")?.unwrap_or(true), parameters.boost()?)
        } else {
            let text = scalar_text(value)
                .ok_or_else(|| query_error(format!("`fuzzy` on `{field_name}`: the value must be a string")))?;
            (text, Fuzziness::Auto { low: 3, high: 6 }, true, 1.0)
        };
        let (field, entry) = self.field(field_name)?;
        self.require_indexed_text(entry, field_name, "fuzzy")?;
        check_fuzzy_term(field_name, &text)?;
        self.count_terms(1)?;
        let term = Term::from_field_text(field, &text);
        let distance = fuzziness.distance(&text);
        let query: Box<dyn Query> = if distance == 0 {
            Box::new(TermQuery::new(term, term_record_option(entry)))
        } else {
            Box::new(FuzzyTermQuery::new(term, distance, transpositions))
        };
        Ok(with_boost(query, boost))
    }

    /// `{"ids": {"values": ["a", "b"]}}`: documents by `_id`.
    fn build_ids(&mut self, body: &JsonValue) -> Result<Box<dyn Query>, IndexError> {
        let parameters = Parameters::new("ids", body, &["values", "boost"])?;
        let Some(values) = parameters.required("values")?.as_array() else {
            return Err(query_error("`ids`: `values` must be an array of ids"));
        };
        self.count_terms(values.len().max(1))?;
        let mut terms = Vec::with_capacity(values.len());
        for value in values {
            let Some(id) = scalar_text(value) else {
                return Err(query_error(format!("`ids`: ids must be strings, got {}", describe_json_value(value))));
            };
            terms.push(Term::from_field_text(self.index.id_field, &id));
        }
        if terms.is_empty() {
            return Ok(Box::new(EmptyQuery));
        }
        Ok(with_boost(Box::new(TermSetQuery::new(terms)), parameters.boost()?))
    }

    /// Converts a JSON value into a term of the field's type. Text is taken as it is (not
    /// analyzed); dates are RFC 3339 strings or epoch milliseconds.
    fn value_term(
        &self,
        field: Field,
        entry: &FieldEntry,
        field_name: &str,
        value: &JsonValue,
        purpose: TermPurpose,
    ) -> Result<Term, IndexError> {
        let mismatch = |expected: &str| {
            query_error(format!("field `{field_name}` expects {expected}, got {}", describe_json_value(value)))
        };
        match entry.field_type() {
            FieldType::Str(_) => {
                let text = scalar_text(value).ok_or_else(|| mismatch("a string"))?;
                self.check_text_size(&format!("a value for `{field_name}`"), &text)?;
                Ok(Term::from_field_text(field, &text))
            }
            FieldType::U64(_) => {
                let number = match value {
                    JsonValue::String(text) => text.trim().parse::<u64>().ok(),
                    other => other.as_u64(),
                };
                number
                    .map(|number| Term::from_field_u64(field, number))
                    .ok_or_else(|| mismatch("a non-negative integer"))
            }
            FieldType::I64(_) => {
                let number = match value {
                    JsonValue::String(text) => text.trim().parse::<i64>().ok(),
                    other => other.as_i64(),
                };
                number.map(|number| Term::from_field_i64(field, number)).ok_or_else(|| mismatch("an integer"))
            }
            FieldType::F64(_) => {
                let number = match value {
                    JsonValue::String(text) => text.trim().parse::<f64>().ok(),
                    other => other.as_f64(),
                };
                number
                    .filter(|number| number.is_finite())
                    .map(|number| Term::from_field_f64(field, number))
                    .ok_or_else(|| mismatch("a number"))
            }
            FieldType::Bool(_) => {
                let flag = match value {
                    JsonValue::Bool(flag) => Some(*flag),
                    JsonValue::String(text) if text == "true" => Some(true),
                    JsonValue::String(text) if text == "false" => Some(false),
                    _ => None,
                };
                flag.map(|flag| Term::from_field_bool(field, flag)).ok_or_else(|| mismatch("a boolean"))
            }
            FieldType::Date(_) => {
                let date = match value {
                    JsonValue::String(text) if text.len() <= 64 => {
                        match entry.field_type().value_from_json(JsonValue::String(text.clone())) {
                            Ok(OwnedValue::Date(date)) => Some(date),
                            _ => None,
                        }
                    }
                    other => other.as_i64().map(DateTime::from_timestamp_millis),
                };
                let date = date.ok_or_else(|| {
                    mismatch("an RFC 3339 date (e.g. \"2024-01-31T12:00:00Z\") or epoch milliseconds")
                })?;
                Ok(match purpose {
                    // Indexed dates are truncated to seconds; a term must be too.
                    TermPurpose::Search => Term::from_field_date_for_search(field, date),
                    TermPurpose::Range => Term::from_field_date(field, date),
                })
            }
            // tantivy indexes a facet with all its ancestors, so the term of `/lang` matches
            // `/lang/rust` too: a facet term selects a subtree.
            FieldType::Facet(_) => {
                let facet = value
                    .as_str()
                    .filter(|text| text.len() <= self.limits.max_query_bytes)
                    .and_then(|text| Facet::from_text(text).ok())
                    .ok_or_else(|| mismatch("a facet path starting with `/`"))?;
                Ok(Term::from_facet(field, &facet))
            }
            other => Err(query_error(format!(
                "queries on field `{field_name}` of type {} are not supported",
                other.value_type().name()
            ))),
        }
    }
}

/// What a term built from a JSON value is for.
#[derive(Debug, Clone, Copy)]
enum TermPurpose {
    /// Looked up in the inverted index.
    Search,
    /// A range bound.
    Range,
}

fn check_fuzzy_term(field_name: &str, text: &str) -> Result<(), IndexError> {
    if text.chars().count() > MAX_FUZZY_TERM_CHARS {
        return Err(query_error(format!(
            "a fuzzy term for `{field_name}` is longer than {MAX_FUZZY_TERM_CHARS} characters"
        )));
    }
    Ok(())
}

/// Most "automaton units" a pattern may cost (see [`automaton_cost`]). tantivy compiles a
/// pattern into a DFA eagerly, and that work grows with the size of the pattern's expanded
/// program times its states: 19 bytes like `(?s)(.{0,30}){0,30}` took seconds of CPU before the
/// search's time budget could even start. Ordinary patterns (`colou?r`, `qu*ck`, `[a-z]+ing`)
/// cost tens.
pub const MAX_AUTOMATON_COST: u64 = 1_000;

/// Refuses a pattern whose automaton would be expensive to build, before tantivy builds it.
fn check_automaton_cost(pattern: &str) -> Result<(), String> {
    let hir = regex_syntax::ParserBuilder::new()
        .nest_limit(64)
        .build()
        .parse(pattern)
        .map_err(|error| format!("invalid pattern: {error}"))?;
    let cost = automaton_cost(&hir);
    if cost > MAX_AUTOMATON_COST {
        return Err(format!(
            "the pattern would build an automaton of cost {cost}, over the limit of {MAX_AUTOMATON_COST}; use fewer \
             or smaller repetitions and wildcards"
        ));
    }
    Ok(())
}

/// The size of a pattern's program once repetitions are expanded (a counted repetition is
/// that many copies; a class of any character costs what its UTF-8 ranges cost). Bounded
/// recursion: the parser refuses nesting over 64.
fn automaton_cost(hir: &regex_syntax::hir::Hir) -> u64 {
    use regex_syntax::hir::{Class, HirKind};
    match hir.kind() {
        HirKind::Empty | HirKind::Look(_) => 1,
        HirKind::Literal(literal) => literal.0.len() as u64,
        HirKind::Class(Class::Unicode(class)) => class
            .ranges()
            .iter()
            .map(|range| u64::from(range.end()).saturating_sub(u64::from(range.start())).min(6) + 1)
            .sum(),
        HirKind::Class(Class::Bytes(class)) => class.ranges().len() as u64,
        HirKind::Repetition(repetition) => {
            let copies = u64::from(repetition.max.unwrap_or(repetition.min).max(repetition.min).max(1));
            copies.saturating_mul(automaton_cost(&repetition.sub)).saturating_add(1)
        }
        HirKind::Capture(capture) => automaton_cost(&capture.sub),
        HirKind::Concat(parts) | HirKind::Alternation(parts) => {
            parts.iter().map(automaton_cost).fold(0_u64, u64::saturating_add)
        }
    }
}
