//! Search requests: query, pagination, facet counts and sorting by a fast field.

use serde::{Deserialize, Serialize};
use tantivy::collector::{Count, FacetCollector, FruitHandle, MultiCollector, TopDocs};
use tantivy::query::{AllQuery, Query};
use tantivy::schema::{Facet, FieldType, OwnedValue};
use tantivy::{DateTime, DocAddress, Order, Score, Searcher, TantivyDocument};

use super::document::{owned_value_to_json, render_stored_document};
use super::limits::{check_query_bounds, QueryLimits, SearchBudget, WithinBudget};
use super::{IndexError, SearchIndex};

/// Most facet fields one request may name (bounded while it is decoded).
pub const MAX_FACET_FIELDS: usize = 64;
/// Most facet prefixes one facet field may carry on the wire (bounded while it is decoded; the
/// node's `--max-facet-prefixes` refuses much fewer).
pub const MAX_DECODED_FACET_PREFIXES: usize = 16_384;

/// Largest page size a request may ask for.
pub const MAX_SEARCH_LIMIT: usize = 10_000;

/// Largest `from` a request may use. Collecting a page costs memory for `from + limit`
/// documents, so deep pagination is bounded too.
pub const MAX_SEARCH_OFFSET: usize = 100_000;

/// A search. Missing fields take their default when deserialized from JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct SearchRequest {
    /// tantivy query parser syntax. Terms without a field search every indexed text field
    /// except `_id`. Empty or `*` matches every document.
    pub query: String,
    /// Number of hits to skip.
    pub from: usize,
    /// Page size, at most [`MAX_SEARCH_LIMIT`]. 0 returns no documents.
    pub limit: usize,
    /// When true, `count` is `None` (saves counting every match).
    pub exclude_count: bool,
    /// When true, `docs` is empty.
    pub exclude_docs: bool,
    #[serde(deserialize_with = "crate::bounded::vec_of_at_most::<_, _, MAX_FACET_FIELDS>")]
    pub facets: Vec<FacetRequest>,
    /// Sort by a fast field instead of relevance.
    pub sort: Option<SortSpec>,
}

/// Counts the children of facet paths in a facet field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct FacetRequest {
    pub field: String,
    /// Facet paths whose children are counted, e.g. `/category`. Empty means `/`, the top
    /// level.
    #[serde(deserialize_with = "crate::bounded::vec_of_at_most::<_, _, MAX_DECODED_FACET_PREFIXES>")]
    pub prefixes: Vec<String>,
}

/// Sort by an i64, u64, f64 or date fast field. Documents without a value come last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct SortSpec {
    pub field: String,
    pub descending: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SearchResponse {
    /// Number of matching documents, unless excluded.
    pub count: Option<u64>,
    pub docs: Vec<SearchHit>,
    /// One entry per requested facet field, in request order.
    pub facets: Vec<FacetCounts>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SearchHit {
    pub id: String,
    /// Stored fields except `_id`, as a JSON object.
    pub fields_json: String,
    /// Relevance score; `None` when sorting by a field.
    pub score: Option<f32>,
    /// The sort field's value as JSON text (`2020`, `4.5`, `"2024-01-31T00:00:00Z"`); `None`
    /// without sort or when the document has no value.
    pub sort_value: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct FacetCounts {
    pub field: String,
    /// Facet path and number of matching documents, sorted by path.
    pub counts: Vec<(String, u64)>,
}

/// The fast value types that can be sorted on.
#[derive(Debug, Clone, Copy)]
enum SortValueType {
    I64,
    U64,
    F64,
    Date,
}

/// A sort request checked against the schema.
struct SortPlan {
    field_name: String,
    value_type: SortValueType,
    order: Order,
}

/// A facet request checked against the schema, its prefixes parsed and deduplicated.
struct FacetPlan {
    field_name: String,
    prefixes: Vec<Facet>,
}

/// The typed handle of the top-docs collector, whose fruit type depends on the sort.
enum TopDocsHandle {
    ByScore(FruitHandle<Vec<(Score, DocAddress)>>),
    ByI64(FruitHandle<Vec<(Option<i64>, DocAddress)>>),
    ByU64(FruitHandle<Vec<(Option<u64>, DocAddress)>>),
    ByF64(FruitHandle<Vec<(Option<f64>, DocAddress)>>),
    ByDate(FruitHandle<Vec<(Option<DateTime>, DocAddress)>>),
}

/// A hit before its stored fields are loaded.
struct RankedDocument {
    address: DocAddress,
    score: Option<f32>,
    sort_value: Option<OwnedValue>,
}

impl SearchIndex {
    /// Runs a search on the committed data. Count, documents and facets all come from the
    /// same searcher, so they are consistent with each other.
    pub fn search(&self, request: &SearchRequest) -> Result<SearchResponse, IndexError> {
        self.search_within(request, &QueryLimits::default(), SearchBudget::unlimited())
    }

    /// Checks the request against `limits` before anything is parsed, then searches until the
    /// budget runs out (then [`IndexError::DeadlineExceeded`]).
    pub fn search_within(
        &self,
        request: &SearchRequest,
        limits: &QueryLimits,
        budget: SearchBudget,
    ) -> Result<SearchResponse, IndexError> {
        check_query_bounds(&request.query, limits)?;
        let facet_prefixes: usize = request.facets.iter().map(|facet| facet.prefixes.len().max(1)).sum();
        if facet_prefixes > limits.max_facet_prefixes {
            return Err(IndexError::InvalidRequest(format!(
                "the request asks for {facet_prefixes} facet prefixes, over the limit of {} (--max-facet-prefixes)",
                limits.max_facet_prefixes
            )));
        }
        if request.limit > MAX_SEARCH_LIMIT {
            return Err(IndexError::InvalidRequest(format!(
                "limit {} exceeds the maximum of {MAX_SEARCH_LIMIT}",
                request.limit
            )));
        }
        if request.from > MAX_SEARCH_OFFSET {
            return Err(IndexError::InvalidRequest(format!(
                "from {} exceeds the maximum of {MAX_SEARCH_OFFSET}",
                request.from
            )));
        }
        let query = self.parse_query(&request.query)?;
        let facet_plans = request
            .facets
            .iter()
            .map(|facet_request| self.plan_facet(facet_request))
            .collect::<Result<Vec<FacetPlan>, IndexError>>()?;
        let sort_plan = request.sort.as_ref().map(|sort_spec| self.plan_sort(sort_spec)).transpose()?;

        let wants_count = !request.exclude_count;
        let wants_documents = !request.exclude_docs && request.limit > 0;
        if !wants_count && !wants_documents && facet_plans.is_empty() {
            // Nothing to collect; the query was still validated above.
            return Ok(SearchResponse::default());
        }

        if facet_plans.is_empty() && sort_plan.is_none() {
            return self.search_by_score(query.as_ref(), request, wants_count, wants_documents, budget);
        }

        let mut collectors = MultiCollector::new();
        let count_handle = wants_count.then(|| collectors.add_collector(Count));
        let top_docs_handle = wants_documents.then(|| {
            // `limit > 0` here, which `TopDocs::with_limit` requires.
            let top_docs = TopDocs::with_limit(request.limit).and_offset(request.from);
            add_top_docs_collector(&mut collectors, top_docs, sort_plan.as_ref())
        });
        // One collector per prefix: a single `FacetCollector` refuses (panics on) prefixes
        // that are ancestors of one another, which requests may legitimately contain.
        let facet_handles: Vec<Vec<FruitHandle<tantivy::collector::FacetCounts>>> = facet_plans
            .iter()
            .map(|facet_plan| {
                facet_plan
                    .prefixes
                    .iter()
                    .map(|prefix| {
                        let mut facet_collector = FacetCollector::for_field(&facet_plan.field_name);
                        facet_collector.add_facet(prefix.clone());
                        collectors.add_collector(facet_collector)
                    })
                    .collect()
            })
            .collect();

        let searcher = self.reader.searcher();
        let collector = WithinBudget { inner: collectors, budget };
        let mut fruits = searcher.search(query.as_ref(), &collector).map_err(|error| search_error(error, budget))?;

        let count = count_handle.map(|handle| handle.extract(&mut fruits) as u64);
        let ranked_documents = match top_docs_handle {
            Some(handle) => extract_ranked_documents(handle, &mut fruits),
            None => Vec::new(),
        };
        let mut facets = Vec::with_capacity(facet_plans.len());
        for (facet_plan, handles) in facet_plans.iter().zip(facet_handles) {
            let mut counts: Vec<(String, u64)> = Vec::new();
            for (prefix, handle) in facet_plan.prefixes.iter().zip(handles) {
                let facet_counts = handle.extract(&mut fruits);
                counts.extend(
                    facet_counts.get(prefix.clone()).map(|(facet, facet_count)| (facet.to_string(), facet_count)),
                );
            }
            counts.sort_by(|left, right| left.0.cmp(&right.0));
            // Overlapping prefixes (`/a` and `/a` twice) would repeat paths.
            counts.dedup_by(|left, right| left.0 == right.0);
            facets.push(FacetCounts { field: facet_plan.field_name.clone(), counts });
        }

        let docs = self.load_hits(&searcher, ranked_documents, sort_plan.as_ref())?;
        Ok(SearchResponse { count, docs, facets })
    }

    /// The common search, a page ranked by score and the count, with no facets and no sort: the
    /// collectors are one typed tuple. Through a `MultiCollector` every matching document went
    /// through two dynamic calls per collector, about 5% of the node's CPU per search on a
    /// union of a few terms over 50,000 documents (docs/performance.md). The JSON query
    /// language (`query_dsl`) still collects through a `MultiCollector`.
    fn search_by_score(
        &self,
        query: &dyn Query,
        request: &SearchRequest,
        wants_count: bool,
        wants_documents: bool,
        budget: SearchBudget,
    ) -> Result<SearchResponse, IndexError> {
        // `limit > 0` whenever documents are wanted, which `TopDocs::with_limit` requires.
        let top_docs =
            wants_documents.then(|| TopDocs::with_limit(request.limit).and_offset(request.from).order_by_score());
        let collector = WithinBudget { inner: (wants_count.then_some(Count), top_docs), budget };
        let searcher = self.reader.searcher();
        let (count, top_documents) = searcher.search(query, &collector).map_err(|error| search_error(error, budget))?;
        let ranked_documents = top_documents
            .unwrap_or_default()
            .into_iter()
            .map(|(score, address)| RankedDocument { address, score: Some(score), sort_value: None })
            .collect();
        let docs = self.load_hits(&searcher, ranked_documents, None)?;
        Ok(SearchResponse { count: count.map(|count| count as u64), docs, facets: Vec::new() })
    }

    fn parse_query(&self, query_text: &str) -> Result<Box<dyn Query>, IndexError> {
        let trimmed_query = query_text.trim();
        if trimmed_query.is_empty() || trimmed_query == "*" {
            return Ok(Box::new(AllQuery));
        }
        self.query_parser.parse_query(trimmed_query).map_err(|error| IndexError::InvalidQuery(error.to_string()))
    }

    fn plan_facet(&self, facet_request: &FacetRequest) -> Result<FacetPlan, IndexError> {
        let field_name = facet_request.field.as_str();
        let field = self
            .schema
            .get_field(field_name)
            .map_err(|_| IndexError::InvalidRequest(format!("unknown facet field `{field_name}`")))?;
        let field_type = self.schema.get_field_entry(field).field_type();
        if !matches!(field_type, FieldType::Facet(_)) {
            return Err(IndexError::InvalidRequest(format!(
                "field `{field_name}` is of type {}, not a facet field, and cannot be used for \
                 facet counts",
                field_type.value_type().name()
            )));
        }
        let mut prefixes: Vec<Facet> = Vec::new();
        let prefix_texts: Vec<&str> = if facet_request.prefixes.is_empty() {
            vec!["/"]
        } else {
            facet_request.prefixes.iter().map(String::as_str).collect()
        };
        for prefix_text in prefix_texts {
            let prefix = Facet::from_text(prefix_text).map_err(|_| {
                IndexError::InvalidRequest(format!(
                    "invalid facet prefix {prefix_text:?} for field `{field_name}`: a facet \
                     path must start with `/` (e.g. \"/category\")"
                ))
            })?;
            if !prefixes.contains(&prefix) {
                prefixes.push(prefix);
            }
        }
        Ok(FacetPlan { field_name: field_name.to_string(), prefixes })
    }

    fn plan_sort(&self, sort_spec: &SortSpec) -> Result<SortPlan, IndexError> {
        let field_name = sort_spec.field.as_str();
        let field = self
            .schema
            .get_field(field_name)
            .map_err(|_| IndexError::InvalidRequest(format!("unknown sort field `{field_name}`")))?;
        let field_entry = self.schema.get_field_entry(field);
        let value_type = match field_entry.field_type() {
            FieldType::I64(_) => SortValueType::I64,
            FieldType::U64(_) => SortValueType::U64,
            FieldType::F64(_) => SortValueType::F64,
            FieldType::Date(_) => SortValueType::Date,
            other_type => {
                return Err(IndexError::InvalidRequest(format!(
                    "field `{field_name}` is of type {} and cannot be used for sorting; sorting \
                     works on i64, u64, f64 and date fast fields",
                    other_type.value_type().name()
                )));
            }
        };
        if !field_entry.is_fast() {
            return Err(IndexError::InvalidRequest(format!(
                "field `{field_name}` is not a fast field and cannot be used for sorting"
            )));
        }
        let order = if sort_spec.descending { Order::Desc } else { Order::Asc };
        Ok(SortPlan { field_name: field_name.to_string(), value_type, order })
    }

    fn load_hits(
        &self,
        searcher: &Searcher,
        ranked_documents: Vec<RankedDocument>,
        sort_plan: Option<&SortPlan>,
    ) -> Result<Vec<SearchHit>, IndexError> {
        let mut hits = Vec::with_capacity(ranked_documents.len());
        for ranked_document in ranked_documents {
            let document: TantivyDocument = searcher.doc(ranked_document.address)?;
            let rendered = render_stored_document(&self.schema, &document)?;
            let sort_value = match (&ranked_document.sort_value, sort_plan) {
                (Some(value), Some(sort_plan)) => {
                    let json_value = owned_value_to_json(&sort_plan.field_name, value)?;
                    Some(json_value.to_string())
                }
                _ => None,
            };
            hits.push(SearchHit {
                id: rendered.id,
                fields_json: rendered.fields_json,
                score: ranked_document.score,
                sort_value,
            });
        }
        Ok(hits)
    }
}

/// A search that failed once its budget was spent stopped for that reason (`WithinBudget`).
fn search_error(error: tantivy::TantivyError, budget: SearchBudget) -> IndexError {
    if budget.expired() {
        IndexError::DeadlineExceeded
    } else {
        error.into()
    }
}

fn add_top_docs_collector(
    collectors: &mut MultiCollector<'_>,
    top_docs: TopDocs,
    sort_plan: Option<&SortPlan>,
) -> TopDocsHandle {
    let Some(sort_plan) = sort_plan else {
        return TopDocsHandle::ByScore(collectors.add_collector(top_docs.order_by_score()));
    };
    // Owned names: the returned collectors must not borrow the plan.
    let field_name = || sort_plan.field_name.clone();
    let order = sort_plan.order;
    // The fast value type must match the field type exactly, hence one arm per type.
    match sort_plan.value_type {
        SortValueType::I64 => {
            TopDocsHandle::ByI64(collectors.add_collector(top_docs.order_by_fast_field::<i64>(field_name(), order)))
        }
        SortValueType::U64 => {
            TopDocsHandle::ByU64(collectors.add_collector(top_docs.order_by_fast_field::<u64>(field_name(), order)))
        }
        SortValueType::F64 => {
            TopDocsHandle::ByF64(collectors.add_collector(top_docs.order_by_fast_field::<f64>(field_name(), order)))
        }
        SortValueType::Date => TopDocsHandle::ByDate(
            collectors.add_collector(top_docs.order_by_fast_field::<DateTime>(field_name(), order)),
        ),
    }
}

fn extract_ranked_documents(handle: TopDocsHandle, fruits: &mut tantivy::collector::MultiFruit) -> Vec<RankedDocument> {
    fn sorted_by_value<T>(
        top_documents: Vec<(Option<T>, DocAddress)>,
        to_owned_value: impl Fn(T) -> OwnedValue,
    ) -> Vec<RankedDocument> {
        top_documents
            .into_iter()
            .map(|(value, address)| RankedDocument { address, score: None, sort_value: value.map(&to_owned_value) })
            .collect()
    }
    match handle {
        TopDocsHandle::ByScore(handle) => handle
            .extract(fruits)
            .into_iter()
            .map(|(score, address)| RankedDocument { address, score: Some(score), sort_value: None })
            .collect(),
        TopDocsHandle::ByI64(handle) => sorted_by_value(handle.extract(fruits), OwnedValue::I64),
        TopDocsHandle::ByU64(handle) => sorted_by_value(handle.extract(fruits), OwnedValue::U64),
        TopDocsHandle::ByF64(handle) => sorted_by_value(handle.extract(fruits), OwnedValue::F64),
        TopDocsHandle::ByDate(handle) => sorted_by_value(handle.extract(fruits), OwnedValue::Date),
    }
}
