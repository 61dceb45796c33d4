//! Tests of the JSON query DSL, on a small committed index.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value as JsonValue};
use tempfile::TempDir;

use super::*;
use crate::index::{load_schema, AnalyzerConfig, IndexOperation, DEFAULT_SCHEMA_JSON, DEFAULT_TOKENIZER_JSON};

const TEST_WRITER_MEMORY_BYTES: usize = 30_000_000;

/// The shipped schema, with `tags` also a fast field so that it can be aggregated.
fn test_schema() -> tantivy::schema::Schema {
    let mut fields: JsonValue = serde_json::from_str(DEFAULT_SCHEMA_JSON).unwrap();
    for field in fields.as_array_mut().unwrap() {
        if field["name"] == "tags" {
            field["options"]["fast"] = json!({"with_tokenizer": "keyword_lowercase"});
        }
    }
    load_schema(&fields.to_string()).unwrap()
}

/// Five documents covering every field type of the schema.
fn books() -> (TempDir, SearchIndex) {
    let directory = tempfile::tempdir().unwrap();
    let analyzers = AnalyzerConfig::from_json(DEFAULT_TOKENIZER_JSON).unwrap();
    let index =
        SearchIndex::open_or_create(directory.path(), test_schema(), &analyzers, TEST_WRITER_MEMORY_BYTES).unwrap();
    let documents = [
        (
            "d1",
            json!({"title": "Rust programming language",
                   "body": "Rust is a systems programming language focused on safety",
                   "url": "https://example.com/rust", "tags": ["Rust", "Systems"], "category": "/lang/rust",
                   "year": 2015, "popularity": 100, "rating": 4.5, "published": "2015-05-15T00:00:00Z"}),
        ),
        (
            "d2",
            json!({"title": "Go programming", "body": "Go is a language designed at Google for concurrency",
                   "tags": ["Go"], "category": "/lang/go", "year": 2012, "popularity": 80, "rating": 4.0,
                   "published": "2012-03-28T00:00:00Z"}),
        ),
        (
            "d3",
            json!({"title": "Cooking pasta", "body": "Boil water and add salt before the pasta <b>&</b>",
                   "tags": ["Cooking", "Italian"], "category": "/cooking", "year": 2019, "popularity": 50,
                   "rating": 3.5, "published": "2019-06-01T00:00:00Z"}),
        ),
        (
            "d4",
            json!({"title": "Async Rust", "body": "Futures and async await in the Rust language",
                   "tags": ["Rust", "Async"], "category": "/lang/rust/async", "year": 2021, "rating": 4.8}),
        ),
        (
            "d5",
            json!({"title": "Python for data", "body": "Python is popular for data science",
                   "tags": ["Python"], "category": "/lang/python", "year": 2018, "popularity": 120,
                   "rating": 4.2, "published": "2018-01-01T00:00:00Z"}),
        ),
    ];
    let mut operations: Vec<IndexOperation> =
        documents.iter().map(|(id, document)| index.prepare_put(id, &document.to_string()).unwrap()).collect();
    operations.push(IndexOperation::Commit);
    index.apply(&operations, None).unwrap();
    (directory, index)
}

fn search(index: &SearchIndex, body: JsonValue) -> Result<JsonSearchResponse, IndexError> {
    let request = JsonSearchRequest::from_json(&body)?;
    index.search_json(&request, &QueryLimits::default(), SearchBudget::unlimited())
}

fn ids(response: &JsonSearchResponse) -> Vec<String> {
    response.hits.iter().map(|hit| hit.id.clone()).collect()
}

fn id_set(response: &JsonSearchResponse) -> BTreeSet<String> {
    response.hits.iter().map(|hit| hit.id.clone()).collect()
}

fn error_of(result: Result<JsonSearchResponse, IndexError>) -> IndexError {
    match result {
        Ok(response) => panic!("expected an error, got {response:?}"),
        Err(error) => error,
    }
}

#[test]
fn each_query_type_returns_the_expected_documents() {
    let (_directory, index) = books();
    let cases: Vec<(JsonValue, &[&str])> = vec![
        (json!({"match_all": {}}), &["d1", "d2", "d3", "d4", "d5"]),
        (json!({"match_all": {"boost": 2.0}}), &["d1", "d2", "d3", "d4", "d5"]),
        (json!({"match_none": {}}), &[]),
        (json!({"match": {"title": "rust"}}), &["d1", "d4"]),
        (json!({"match": {"body": {"query": "rust language", "operator": "and"}}}), &["d1", "d4"]),
        (json!({"match": {"body": "rust language"}}), &["d1", "d2", "d4"]),
        (json!({"match": {"body": {"query": "rust google pasta", "minimum_should_match": 2}}}), &[]),
        (json!({"match": {"body": {"query": "pyhton", "fuzziness": "AUTO"}}}), &["d5"]),
        (json!({"match": {"body": {"query": "pyhton", "fuzziness": 1, "fuzzy_transpositions": false}}}), &[]),
        (json!({"match": {"body": {"query": "the and", "zero_terms_query": "all"}}}), &["d1", "d2", "d3", "d4", "d5"]),
        (json!({"match": {"body": "the and"}}), &[]),
        (json!({"match": {"year": 2015}}), &["d1"]),
        (json!({"match": {"year": {"query": "not a year", "lenient": true}}}), &[]),
        (json!({"match_phrase": {"body": "programming language"}}), &["d1"]),
        (json!({"match_phrase": {"body": "systems language"}}), &[]),
        (json!({"match_phrase": {"body": {"query": "systems language", "slop": 1}}}), &["d1"]),
        (json!({"match_phrase_prefix": {"title": "async ru"}}), &["d4"]),
        (json!({"match_phrase_prefix": {"title": {"query": "pyth"}}}), &["d5"]),
        (json!({"multi_match": {"query": "rust", "fields": ["title^3", "body"]}}), &["d1", "d4"]),
        (json!({"multi_match": {"query": "rust", "fields": "t*", "type": "most_fields"}}), &["d1", "d4"]),
        (json!({"multi_match": {"query": "google"}}), &["d2"]),
        (
            json!({"multi_match": {"query": "programming language", "type": "phrase", "fields": ["body", "title"]}}),
            &["d1"],
        ),
        (json!({"query_string": {"query": "title:rust AND year:2021"}}), &["d4"]),
        (json!({"query_string": {"query": "pasta OR python", "default_field": "body"}}), &["d3", "d5"]),
        (
            json!({"query_string": {"query": "rust language", "fields": ["body"], "default_operator": "AND"}}),
            &["d1", "d4"],
        ),
        (json!({"query_string": {"query": "*"}}), &["d1", "d2", "d3", "d4", "d5"]),
        (json!({"simple_query_string": {"query": "pasta"}}), &["d3"]),
        (json!({"simple_query_string": {"query": "pasta ((("}}), &["d3"]),
        (json!({"term": {"tags": "rust"}}), &["d1", "d4"]),
        (json!({"term": {"tags": "Rust"}}), &[]),
        (json!({"term": {"tags": {"value": "Rust", "case_insensitive": true}}}), &["d1", "d4"]),
        (json!({"term": {"year": 2015}}), &["d1"]),
        (json!({"term": {"year": {"value": "2015", "boost": 2}}}), &["d1"]),
        (json!({"term": {"popularity": 80}}), &["d2"]),
        (json!({"term": {"rating": 4.5}}), &["d1"]),
        (json!({"term": {"published": "2015-05-15T00:00:00Z"}}), &["d1"]),
        (json!({"term": {"category": "/lang/rust"}}), &["d1", "d4"]),
        (json!({"term": {"category": "/lang/rust/async"}}), &["d4"]),
        (json!({"terms": {"category": ["/cooking", "/lang/go"]}}), &["d2", "d3"]),
        (json!({"term": {"url": "https://example.com/rust"}}), &["d1"]),
        (json!({"term": {"_id": "d3"}}), &["d3"]),
        (json!({"terms": {"year": [2012, 2019]}}), &["d2", "d3"]),
        (json!({"terms": {"popularity": [50, 120], "boost": 1.5}}), &["d3", "d5"]),
        (json!({"terms": {"tags": ["go", "python"]}}), &["d2", "d5"]),
        (json!({"terms": {"tags": []}}), &[]),
        (json!({"range": {"year": {"gte": 2015, "lt": 2020}}}), &["d1", "d3", "d5"]),
        (json!({"range": {"rating": {"gt": 4.5}}}), &["d4"]),
        (json!({"range": {"popularity": {"lte": 80}}}), &["d2", "d3"]),
        (json!({"range": {"published": {"gte": "2015-01-01T00:00:00Z"}}}), &["d1", "d3", "d5"]),
        (json!({"range": {"published": {"gte": 1_500_000_000_000_i64, "lte": null}}}), &["d3", "d5"]),
        (json!({"range": {"tags": {"gte": "p", "lt": "s"}}}), &["d1", "d4", "d5"]),
        (json!({"exists": {"field": "popularity"}}), &["d1", "d2", "d3", "d5"]),
        (json!({"exists": {"field": "published"}}), &["d1", "d2", "d3", "d5"]),
        (json!({"exists": {"field": "_id"}}), &["d1", "d2", "d3", "d4", "d5"]),
        (json!({"prefix": {"tags": "ru"}}), &["d1", "d4"]),
        (json!({"prefix": {"title": {"value": "prog"}}}), &["d1", "d2"]),
        (json!({"prefix": {"url": "https://example.com/"}}), &["d1"]),
        (json!({"prefix": {"tags": {"value": "RU", "case_insensitive": true}}}), &["d1", "d4"]),
        (json!({"wildcard": {"tags": "p*n"}}), &["d5"]),
        (json!({"wildcard": {"tags": {"value": "?o"}}}), &["d2"]),
        (json!({"wildcard": {"tags": {"wildcard": "r.*"}}}), &[]),
        (json!({"wildcard": {"url": "https://*.com/rust"}}), &["d1"]),
        (json!({"regexp": {"tags": "(go|python)"}}), &["d2", "d5"]),
        (json!({"fuzzy": {"tags": {"value": "pithon", "fuzziness": 1}}}), &["d5"]),
        (json!({"fuzzy": {"tags": "rusty"}}), &["d1", "d4"]),
        (json!({"fuzzy": {"tags": {"value": "rusty", "fuzziness": 0}}}), &[]),
        (json!({"ids": {"values": ["d2", "d5", "nope"]}}), &["d2", "d5"]),
        (json!({"ids": {"values": []}}), &[]),
        (json!({"bool": {"must": {"match": {"title": "rust"}}, "must_not": [{"term": {"year": 2021}}]}}), &["d1"]),
        (json!({"bool": {"filter": [{"term": {"tags": "rust"}}]}}), &["d1", "d4"]),
        (json!({"bool": {"must_not": {"term": {"tags": "rust"}}}}), &["d2", "d3", "d5"]),
        (json!({"bool": {}}), &["d1", "d2", "d3", "d4", "d5"]),
        (json!({"bool": {"should": [{"term": {"tags": "go"}}], "must_not": [{"term": {"year": 2021}}]}}), &["d2"]),
        (json!({"bool": {"must": {"match": {"title": "rust"}}, "should": {"term": {"year": 2021}}}}), &["d1", "d4"]),
        (json!({"constant_score": {"filter": {"term": {"tags": "rust"}}, "boost": 1.2}}), &["d1", "d4"]),
        (json!({"dis_max": {"queries": [{"term": {"tags": "go"}}, {"term": {"tags": "python"}}]}}), &["d2", "d5"]),
    ];
    for (query, expected) in cases {
        let response =
            search(&index, json!({"query": query.clone()})).unwrap_or_else(|error| panic!("{query}: {error}"));
        let expected: BTreeSet<String> = expected.iter().map(|id| id.to_string()).collect();
        assert_eq!(id_set(&response), expected, "query {query}");
        assert_eq!(
            response.total,
            Some(JsonTotal { value: expected.len() as u64, relation: TotalRelation::Eq }),
            "query {query}"
        );
        // `_count` agrees with `_search`.
        let count = index.count_json(Some(&query), &QueryLimits::default(), SearchBudget::unlimited()).unwrap();
        assert_eq!(count, expected.len() as u64, "count of {query}");
    }
}

#[test]
fn bool_minimum_should_match_counts_optional_clauses() {
    let (_directory, index) = books();
    let should = json!([{"term": {"tags": "rust"}}, {"term": {"year": 2015}}, {"term": {"rating": 4.5}}]);
    let cases: Vec<(JsonValue, &[&str])> = vec![
        (json!(1), &["d1", "d4"]),
        (json!(2), &["d1"]),
        (json!("2"), &["d1"]),
        (json!("67%"), &["d1"]),
        (json!(-1), &["d1"]),
        (json!("-34%"), &["d1"]),
        (json!(3), &["d1"]),
        (json!(4), &[]),
        (json!("0"), &["d1", "d4"]),
    ];
    for (minimum, expected) in cases {
        let query = json!({"bool": {"should": should.clone(), "minimum_should_match": minimum.clone()}});
        let response = search(&index, json!({"query": query})).unwrap();
        let expected: BTreeSet<String> = expected.iter().map(|id| id.to_string()).collect();
        assert_eq!(id_set(&response), expected, "minimum_should_match {minimum}");
    }
    let error =
        error_of(search(&index, json!({"query": {"bool": {"should": should, "minimum_should_match": "3<90%"}}})));
    assert!(matches!(error, IndexError::InvalidQuery(_)), "{error}");
}

fn scores_by_id(response: &JsonSearchResponse) -> Vec<(String, f32)> {
    let mut scores: Vec<(String, f32)> = response.hits.iter().map(|hit| (hit.id.clone(), hit.score.unwrap())).collect();
    scores.sort_by(|left, right| left.0.cmp(&right.0));
    scores
}

#[test]
fn filters_and_boosts_change_scores_as_elasticsearch_does() {
    let (_directory, index) = books();
    let plain = search(&index, json!({"query": {"match": {"body": "rust language"}}})).unwrap();
    let filtered = search(
        &index,
        json!({"query": {"bool": {"must": {"match": {"body": "rust language"}},
                                  "filter": {"range": {"year": {"gte": 2000}}}}}}),
    )
    .unwrap();
    assert_eq!(scores_by_id(&plain), scores_by_id(&filtered));

    let filter_only = search(&index, json!({"query": {"bool": {"filter": {"term": {"tags": "rust"}}}}})).unwrap();
    assert!(filter_only.hits.iter().all(|hit| hit.score == Some(0.0)), "{filter_only:?}");

    let constant =
        search(&index, json!({"query": {"constant_score": {"filter": {"term": {"tags": "rust"}}, "boost": 1.5}}}))
            .unwrap();
    assert!(constant.hits.iter().all(|hit| hit.score == Some(1.5)), "{constant:?}");
    assert_eq!(constant.max_score, Some(1.5));

    let boosted = search(&index, json!({"query": {"match_all": {"boost": 2.0}}})).unwrap();
    assert!(boosted.hits.iter().all(|hit| hit.score == Some(2.0)));

    // A field boost in `multi_match` ranks title matches first.
    let title_first =
        search(&index, json!({"query": {"multi_match": {"query": "language", "fields": ["title^10", "body"]}}}))
            .unwrap();
    assert_eq!(ids(&title_first).first().map(String::as_str), Some("d1"));

    let term_boost = search(&index, json!({"query": {"term": {"year": {"value": 2015, "boost": 3}}}})).unwrap();
    let unboosted = search(&index, json!({"query": {"term": {"year": 2015}}})).unwrap();
    let (boosted_score, plain_score) = (term_boost.hits[0].score.unwrap(), unboosted.hits[0].score.unwrap());
    assert!((boosted_score - 3.0 * plain_score).abs() < 1e-4, "{boosted_score} vs {plain_score}");
}

#[test]
fn sorting_by_a_fast_field_or_by_score() {
    let (_directory, index) = books();
    let ascending = search(&index, json!({"sort": "year"})).unwrap();
    assert_eq!(ids(&ascending), ["d2", "d1", "d5", "d3", "d4"]);
    assert!(ascending.hits.iter().all(|hit| hit.score.is_none()));
    assert_eq!(ascending.hits[0].sort, Some(vec![json!(2012)]));
    assert_eq!(ascending.max_score, None);

    let descending = search(&index, json!({"sort": [{"year": "desc"}, "_score"]})).unwrap();
    assert_eq!(ids(&descending), ["d4", "d3", "d5", "d1", "d2"]);
    let descending = search(&index, json!({"sort": [{"year": {"order": "desc"}}]})).unwrap();
    assert_eq!(ids(&descending), ["d4", "d3", "d5", "d1", "d2"]);

    // Dates sort as epoch milliseconds; documents without a value come last.
    let by_date = search(&index, json!({"sort": {"published": "desc"}, "size": 5})).unwrap();
    assert_eq!(ids(&by_date), ["d3", "d5", "d1", "d2", "d4"]);
    assert_eq!(by_date.hits[0].sort, Some(vec![json!(1_559_347_200_000_i64)]));
    assert_eq!(by_date.hits[4].sort, Some(vec![JsonValue::Null]));

    let by_rating = search(&index, json!({"sort": {"rating": "asc"}, "size": 1})).unwrap();
    assert_eq!(by_rating.hits[0].sort, Some(vec![json!(3.5)]));

    let by_score = search(&index, json!({"query": {"match": {"body": "rust"}}, "sort": ["_score"]})).unwrap();
    let first = &by_score.hits[0];
    assert_eq!(first.sort, Some(vec![json!(first.score.unwrap())]));
    let implicit = search(&index, json!({"query": {"match": {"body": "rust"}}})).unwrap();
    assert_eq!(implicit.hits[0].sort, None);

    for (sort, needle) in [
        (json!("body"), "cannot be used for sorting"),
        (json!("missing_field"), "unknown sort field `missing_field`"),
        (json!(["year", "rating"]), "more than one field"),
        (json!({"_score": "asc"}), "ascending"),
        (json!({"year": "sideways"}), "asc"),
        (json!({"year": {"mode": "min"}}), "`mode`"),
    ] {
        let error = error_of(search(&index, json!({ "sort": sort.clone() })));
        assert!(matches!(error, IndexError::InvalidRequest(_)), "{sort}: {error}");
        assert!(error.to_string().contains(needle), "{sort}: {error}");
    }
}

#[test]
fn pagination_keeps_the_overall_max_score() {
    let (_directory, index) = books();
    let all = search(&index, json!({"query": {"match": {"body": "rust language"}}})).unwrap();
    let page = search(&index, json!({"query": {"match": {"body": "rust language"}}, "from": 1, "size": 1})).unwrap();
    assert_eq!(ids(&page), [all.hits[1].id.clone()]);
    assert_eq!(page.max_score, all.max_score);
    assert_eq!(page.total, all.total);

    let none = search(&index, json!({"size": 0})).unwrap();
    assert!(none.hits.is_empty());
    assert_eq!(none.max_score, None);
    assert_eq!(none.total, Some(JsonTotal { value: 5, relation: TotalRelation::Eq }));
}

#[test]
fn source_filtering() {
    let (_directory, index) = books();
    let keys = |body: JsonValue| -> Vec<String> {
        let response = search(&index, json!({"query": {"ids": {"values": ["d1"]}}, "_source": body})).unwrap();
        response.hits[0].source.as_ref().map(|source| source.keys().cloned().collect()).unwrap_or_default()
    };
    assert_eq!(keys(json!(["title", "ta*"])), ["tags", "title"]);
    assert_eq!(keys(json!("year")), ["year"]);
    assert_eq!(keys(json!({"excludes": ["body", "p*"]})), ["category", "rating", "tags", "title", "url", "year"]);
    assert_eq!(keys(json!({"includes": ["*"], "excludes": ["*"]})), Vec::<String>::new());
    assert!(!keys(json!(true)).contains(&"_id".to_string()));
    let response = search(&index, json!({"_source": false})).unwrap();
    assert!(response.hits.iter().all(|hit| hit.source.is_none()));
    let response = search(&index, json!({"stored_fields": "_none_"})).unwrap();
    assert!(response.hits.iter().all(|hit| hit.source.is_none()));
    let full = search(&index, json!({"query": {"ids": {"values": ["d1"]}}})).unwrap();
    let source = full.hits[0].source.clone().unwrap();
    assert_eq!(source["tags"], json!(["Rust", "Systems"]));
    assert_eq!(source["year"], json!(2015));
    assert_eq!(source["published"], json!("2015-05-15T00:00:00Z"));

    let error = error_of(search(&index, json!({"_source": {"include_only": ["a"]}})));
    assert!(matches!(error, IndexError::InvalidRequest(_)), "{error}");
}

#[test]
fn highlighting_wraps_matches_in_tags() {
    let (_directory, index) = books();
    let response = search(
        &index,
        json!({"query": {"match": {"body": "rust"}}, "highlight": {"fields": {"body": {}, "title": {}}}}),
    )
    .unwrap();
    let d1 = response.hits.iter().find(|hit| hit.id == "d1").unwrap();
    let highlight = d1.highlight.as_ref().unwrap();
    assert_eq!(highlight["body"], vec!["<em>Rust</em> is a systems programming language focused on safety"]);
    // The query names `body` only, so titles have nothing to highlight.
    assert!(!highlight.contains_key("title"));

    let custom = search(
        &index,
        json!({"query": {"multi_match": {"query": "pasta", "fields": ["title", "body"]}},
               "highlight": {"pre_tags": ["["], "post_tags": ["]"],
                             "fields": [{"title": {}}, {"body": {"encoder": "html", "fragment_size": 20}}]}}),
    )
    .unwrap();
    let highlight = custom.hits[0].highlight.as_ref().unwrap();
    assert_eq!(highlight["title"], vec!["Cooking [pasta]"]);
    assert!(highlight["body"][0].contains("[pasta]") && highlight["body"][0].len() < 40, "{highlight:?}");

    let escaped = search(
        &index,
        json!({"query": {"match": {"body": "salt"}}, "highlight": {"encoder": "html", "number_of_fragments": 0,
                                                                   "fields": {"b*": {}}}}),
    )
    .unwrap();
    assert_eq!(
        escaped.hits[0].highlight.as_ref().unwrap()["body"],
        vec!["Boil water and add <em>salt</em> before the pasta &lt;b&gt;&amp;&lt;/b&gt;"]
    );

    let no_match =
        search(&index, json!({"query": {"term": {"year": 2015}}, "highlight": {"fields": {"body": {}}}})).unwrap();
    assert_eq!(no_match.hits[0].highlight, None);

    for highlight in [
        json!({"fields": {"year": {}}}),
        json!({"fields": {"nope": {}}}),
        json!({"fields": {"body": {"fragmenter": "span"}}}),
        json!({}),
    ] {
        let error = error_of(search(&index, json!({ "highlight": highlight.clone() })));
        assert!(matches!(error, IndexError::InvalidRequest(_)), "{highlight}: {error}");
    }
}

#[test]
fn aggregations_come_back_in_elasticsearch_shape() {
    let (_directory, index) = books();
    let response = search(
        &index,
        json!({"size": 0, "aggs": {
            "by_tag": {"terms": {"field": "tags", "size": 3}},
            "avg_rating": {"avg": {"field": "rating"}},
            "per_year": {"histogram": {"field": "year", "interval": 5},
                         "aggregations": {"max_rating": {"max": {"field": "rating"}}}},
        }}),
    )
    .unwrap();
    let aggregations = response.aggregations.unwrap();
    let buckets = aggregations["by_tag"]["buckets"].as_array().unwrap();
    assert_eq!(buckets[0], json!({"key": "rust", "doc_count": 2}));
    assert_eq!(buckets.len(), 3);
    assert!(aggregations["by_tag"].get("sum_other_doc_count").is_some());
    let average = aggregations["avg_rating"]["value"].as_f64().unwrap();
    assert!((average - 4.2).abs() < 1e-9, "{average}");
    let years = aggregations["per_year"]["buckets"].as_array().unwrap();
    assert_eq!(years[0]["key"], json!(2010.0));
    assert_eq!(years[0]["doc_count"], json!(1));
    assert_eq!(years[0]["max_rating"]["value"], json!(4.0));
    assert_eq!(years[1]["key"], json!(2015.0));
    assert_eq!(years[1]["doc_count"], json!(3));

    // Aggregations only see the matching documents.
    let filtered = search(
        &index,
        json!({"query": {"term": {"tags": "rust"}}, "aggregations": {"years": {"stats": {"field": "year"}}}}),
    )
    .unwrap();
    let stats = &filtered.aggregations.unwrap()["years"];
    assert_eq!(stats["count"], json!(2));
    assert_eq!(stats["min"], json!(2015.0));

    for (aggs, needle) in [
        (json!({"f": {"filter": {"query_string": "a"}}}), "not supported"),
        (json!({"t": {"top_hits": {"size": 1}}}), "not supported"),
        (json!({"a": {"avg": {"field": "body"}}}), "not a fast field"),
        (json!({"a": {"avg": {"field": "nope"}}}), "unknown field `nope`"),
        (json!({"a": {"terms": {"field": "tags", "size": 1_000_000}}}), "at most"),
        (json!({"a": {"avg": {"field": "year"}, "max": {"field": "year"}}}), "two types"),
        (json!({"a": {}}), "no type"),
        (
            json!({"a": {"histogram": {"field": "year", "interval": 0.000_001, "extended_bounds": {"min": 0, "max": 1e12}}}}),
            "",
        ),
    ] {
        let error = error_of(search(&index, json!({ "aggs": aggs.clone() })));
        assert!(matches!(error, IndexError::InvalidRequest(_)), "{aggs}: {error}");
        assert!(error.to_string().contains(needle), "{aggs}: {error}");
    }
    let mut deep = json!({"leaf": {"max": {"field": "year"}}});
    for level in 0..MAX_AGGREGATION_DEPTH {
        deep = json!({ format!("level{level}"): {"terms": {"field": "year"}, "aggs": deep} });
    }
    let error = error_of(search(&index, json!({ "aggs": deep })));
    assert!(error.to_string().contains("nest deeper"), "{error}");
    let error = error_of(search(&index, json!({"aggs": {}, "aggregations": {}})));
    assert!(error.to_string().contains("both"), "{error}");
}

#[test]
fn track_total_hits_variants() {
    let (_directory, index) = books();
    let total = |value: JsonValue| search(&index, json!({ "track_total_hits": value, "size": 1 })).unwrap().total;
    assert_eq!(total(json!(true)), Some(JsonTotal { value: 5, relation: TotalRelation::Eq }));
    assert_eq!(total(json!(false)), None);
    assert_eq!(total(json!(2)), Some(JsonTotal { value: 2, relation: TotalRelation::Gte }));
    assert_eq!(total(json!(5)), Some(JsonTotal { value: 5, relation: TotalRelation::Eq }));
    assert!(search(&index, json!({"track_total_hits": -1})).is_err());
    // Nothing to collect at all: still a valid (empty) answer.
    let nothing = search(&index, json!({"track_total_hits": false, "size": 0})).unwrap();
    assert_eq!(nothing, JsonSearchResponse { total: None, max_score: None, hits: vec![], aggregations: None });
}

#[test]
fn refusals_name_what_is_wrong() {
    let (_directory, index) = books();
    let query_cases: Vec<(JsonValue, &str)> = vec![
        (json!({"geo_distance": {"distance": "1km"}}), "query type `geo_distance` is not supported; supported: bool"),
        (json!({"match": {"nope": "x"}}), "unknown field `nope`"),
        (json!({"term": {"nope": "x"}}), "unknown field `nope`"),
        (json!({"match": {"body": {"query": "x", "analyzer": "standard"}}}), "option `analyzer`"),
        (json!({"match": {"body": {"operator": "and"}}}), "needs `query`"),
        (json!({"match": {"body": {"query": "x", "fuzziness": 3}}}), "over the maximum of 2"),
        (json!({"fuzzy": {"tags": {"value": "x", "fuzziness": "3"}}}), "over the maximum of 2"),
        (json!({"fuzzy": {"year": "x"}}), "text fields"),
        (json!({"exists": {"field": "body"}}), "`body` is not one"),
        (json!({"match_all": {}, "match_none": {}}), "exactly one key"),
        (json!({}), "exactly one key"),
        (json!("match_all"), "must be an object"),
        (json!({"term": {"tags": "a", "title": "b"}}), "exactly one field"),
        (json!({"term": {"year": "twenty"}}), "expects an integer"),
        (json!({"term": {"year": 20.5}}), "expects an integer"),
        (json!({"term": {"published": "yesterday"}}), "RFC 3339"),
        (json!({"term": {"category": "no-slash"}}), "facet path"),
        (json!({"terms": {"tags": {"index": "other", "id": "1"}}}), "terms lookup"),
        (json!({"range": {"year": {}}}), "at least one of"),
        (json!({"range": {"year": {"gt": 1, "gte": 2}}}), "not both"),
        (json!({"range": {"year": {"gte": "now-1d"}}}), "expects an integer"),
        (json!({"range": {"published": {"gte": "now-1d"}}}), "RFC 3339"),
        (json!({"range": {"year": {"gte": 1, "format": "yyyy"}}}), "option `format`"),
        (json!({"range": {"category": {"gte": "/a"}}}), "does not work"),
        (json!({"bool": {"must": [{"nope": {}}]}}), "query type `nope`"),
        (json!({"bool": {"should": "text"}}), "must be an object"),
        (json!({"bool": {"must": {"match_all": {}}, "boost": -1}}), "non-negative"),
        (json!({"bool": {"must": {}}}), "exactly one key"),
        (json!({"dis_max": {"queries": []}}), "must not be empty"),
        (json!({"constant_score": {}}), "needs `filter`"),
        (json!({"multi_match": {"query": "x", "type": "cross_fields"}}), "cross_fields"),
        (json!({"multi_match": {"query": "x", "type": "phrase", "fuzziness": 1}}), "fuzziness"),
        (json!({"multi_match": {"query": "x", "fields": ["title^abc"]}}), "invalid boost"),
        (json!({"query_string": {"query": "title:(a"}}), "`query_string`"),
        (
            json!({"query_string": {"query": "((((((((((((((((((((((((((((((((((a))))))))))))))))))))))))))))))))))"}}),
            "--max-query-depth",
        ),
        (json!({"query_string": {"query": "a", "fields": ["title"], "default_field": "body"}}), "not both"),
        (json!({"query_string": {"query": "nope:a"}}), "`query_string`"),
        (json!({"regexp": {"tags": "(unclosed"}}), "invalid pattern"),
        (json!({"prefix": {"year": "20"}}), "text fields"),
        (json!({"wildcard": {"tags": {"value": "a", "wildcard": "b"}}}), "not both"),
        (json!({"match_phrase": {"body": {"query": "x", "analyzer": "y"}}}), "option `analyzer`"),
        (json!({"ids": {"values": "d1"}}), "must be an array"),
        (json!({"match": {"popularity": "not a number"}}), "non-negative integer"),
    ];
    for (query, needle) in query_cases {
        let error = error_of(search(&index, json!({ "query": query.clone() })));
        assert!(matches!(error, IndexError::InvalidQuery(_)), "{query}: {error:?}");
        assert!(error.to_string().contains(needle), "{query}: {error}");
    }
    let request_cases: Vec<(JsonValue, &str)> = vec![
        (json!({"size": 10_001}), "`size` 10001 exceeds the maximum of 10000"),
        (json!({"size": -1}), "non-negative integer"),
        (json!({"from": 100_001}), "exceeds the maximum"),
        (json!({"post_filter": {}}), "search option `post_filter` is not supported; supported: query"),
        (json!({"explain": true}), "`explain: true`"),
        (json!({"stored_fields": ["title"]}), "_none_"),
        (json!({"track_scores": true, "sort": "year"}), "track_scores"),
        (json!([1, 2]), "must be a JSON object"),
    ];
    for (body, needle) in request_cases {
        let error = error_of(search(&index, body.clone()));
        assert!(matches!(error, IndexError::InvalidRequest(_)), "{body}: {error:?}");
        assert!(error.to_string().contains(needle), "{body}: {error}");
    }
    // Harmless options Elasticsearch clients send are accepted.
    search(
        &index,
        json!({"timeout": "5s", "version": true, "seq_no_primary_term": false, "explain": false,
                          "profile": false, "track_scores": true}),
    )
    .unwrap();
    // A body of `null` is an empty body.
    assert_eq!(ids(&search(&index, JsonValue::Null).unwrap()).len(), 5);
    // The request's public fields are checked again when searching.
    let request = JsonSearchRequest { size: MAX_SEARCH_LIMIT + 1, ..JsonSearchRequest::default() };
    let error = index.search_json(&request, &QueryLimits::default(), SearchBudget::unlimited()).unwrap_err();
    assert!(matches!(error, IndexError::InvalidRequest(_)), "{error}");
}

#[test]
fn query_bounds_are_enforced() {
    let (_directory, index) = books();
    let limits = QueryLimits { max_query_bytes: 64, max_query_depth: 3, max_query_terms: 5, max_facet_prefixes: 1 };
    let run = |query: JsonValue| {
        let request = JsonSearchRequest::from_json(&json!({ "query": query })).unwrap();
        index.search_json(&request, &limits, SearchBudget::unlimited())
    };
    let nested = |levels: usize| {
        let mut query = json!({"term": {"tags": "rust"}});
        for _ in 1..levels {
            query = json!({"bool": {"must": [query]}});
        }
        query
    };
    assert_eq!(id_set(&run(nested(3)).unwrap()).len(), 2);
    let error = run(nested(4)).unwrap_err();
    assert!(error.to_string().contains("--max-query-depth"), "{error}");
    let error = run(json!({"constant_score": {"filter": nested(3)}})).unwrap_err();
    assert!(error.to_string().contains("--max-query-depth"), "{error}");

    let error = run(json!({"terms": {"year": [1, 2, 3, 4, 5, 6]}})).unwrap_err();
    assert!(error.to_string().contains("--max-query-terms"), "{error}");
    let error = run(json!({"ids": {"values": ["a", "b", "c", "d", "e", "f"]}})).unwrap_err();
    assert!(error.to_string().contains("--max-query-terms"), "{error}");
    let error = run(json!({"match": {"body": "one two three four five six"}})).unwrap_err();
    assert!(error.to_string().contains("--max-query-terms"), "{error}");
    let clauses: Vec<JsonValue> = (0..6).map(|year| json!({"term": {"year": year}})).collect();
    let error = run(json!({"bool": {"should": clauses}})).unwrap_err();
    assert!(error.to_string().contains("--max-query-terms"), "{error}");

    let long = "x".repeat(65);
    for query in [
        json!({"wildcard": {"tags": long.clone()}}),
        json!({"regexp": {"tags": long.clone()}}),
        json!({"match": {"body": long.clone()}}),
        json!({"term": {"tags": long.clone()}}),
        json!({"query_string": {"query": long.clone()}}),
    ] {
        let error = run(query.clone()).unwrap_err();
        assert!(error.to_string().contains("--max-query-bytes"), "{query}: {error}");
    }
    let fuzzy = "y".repeat(MAX_FUZZY_TERM_CHARS + 1);
    let error = search(&index, json!({"query": {"fuzzy": {"tags": fuzzy}}})).unwrap_err();
    assert!(error.to_string().contains("longer than"), "{error}");

    // Even with a huge configured depth, the hard maximum holds; the value is built in code
    // (serde_json's parser stops at 128 levels) and refused without deep recursion.
    let huge = QueryLimits { max_query_depth: usize::MAX, max_query_terms: usize::MAX, ..QueryLimits::default() };
    let mut deep = json!({"match_all": {}});
    for _ in 0..(HARD_MAX_QUERY_DEPTH + 10) {
        deep = json!({"bool": {"must": deep}});
    }
    let error = parse_json_query(&index, &deep, &huge).map(|_| ()).unwrap_err();
    assert!(error.to_string().contains("--max-query-depth"), "{error}");
    // Dropping a deep value recurses; unwind it iteratively.
    let mut value = deep;
    while let Some(inner) = value.get_mut("bool").and_then(|bool| bool.get_mut("must")).map(JsonValue::take) {
        value = inner;
    }
}

#[test]
fn an_expired_budget_stops_the_search() {
    let (_directory, index) = books();
    let request = JsonSearchRequest::from_json(&json!({"query": {"match_all": {}}})).unwrap();
    let expired = SearchBudget::until(Instant::now());
    let error = index.search_json(&request, &QueryLimits::default(), expired).unwrap_err();
    assert!(matches!(error, IndexError::DeadlineExceeded), "{error}");
    let error = index.count_json(None, &QueryLimits::default(), expired).unwrap_err();
    assert!(matches!(error, IndexError::DeadlineExceeded), "{error}");
    // A budget with time left searches document by document and finds the same.
    let later = SearchBudget::until(Instant::now() + Duration::from_secs(60));
    let response = index.search_json(&request, &QueryLimits::default(), later).unwrap();
    assert_eq!(response.hits.len(), 5);
    assert_eq!(index.count_json(None, &QueryLimits::default(), later).unwrap(), 5);
}

#[test]
fn field_boost_specs_parse() {
    assert_eq!(
        parse_field_boosts("title^2, body ,url^0.5").unwrap(),
        vec![("title".to_string(), 2.0), ("body".to_string(), 1.0), ("url".to_string(), 0.5)]
    );
    assert_eq!(parse_field_boosts("title,").unwrap(), vec![("title".to_string(), 1.0)]);
    for spec in ["", " , ", "title^", "^2", "title^-1", "title^NaN", "title^inf"] {
        let error = parse_field_boosts(spec).unwrap_err();
        assert!(matches!(error, IndexError::InvalidRequest(_)), "{spec:?}: {error}");
    }
}

#[test]
fn field_name_patterns_and_regex_escaping() {
    for (pattern, text, expected) in [
        ("title", "title", true),
        ("t*", "title", true),
        ("*e", "title", true),
        ("t*t*e", "title", true),
        ("*", "", true),
        ("a*b", "ab", true),
        ("a*b", "acbd", false),
        ("title", "titles", false),
        ("", "x", false),
    ] {
        assert_eq!(glob_matches(pattern, text), expected, "{pattern:?} on {text:?}");
    }
    assert_eq!(wildcard_to_regex("a.b*c?\\*", false), "(?s)a\\x{2E}b.*c.\\x{2A}");
}

/// A tiny deterministic generator of request bodies, mostly well-formed enough to reach deep
/// into the parser, with random junk in every position.
struct BodyGenerator {
    rng: StdRng,
}

const FIELDS: &[&str] =
    &["title", "body", "url", "tags", "category", "year", "popularity", "rating", "published", "_id", "nope"];
const QUERY_TYPES: &[&str] = &[
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
    "geo_shape",
];
const OPTION_KEYS: &[&str] = &[
    "query",
    "value",
    "boost",
    "operator",
    "fuzziness",
    "minimum_should_match",
    "slop",
    "fields",
    "type",
    "must",
    "should",
    "must_not",
    "filter",
    "gt",
    "gte",
    "lt",
    "lte",
    "field",
    "values",
    "queries",
    "tie_breaker",
    "default_field",
    "default_operator",
    "case_insensitive",
    "zero_terms_query",
    "lenient",
    "max_expansions",
    "wildcard",
    "transpositions",
    "_name",
    "bogus",
];
const WORDS: &[&str] = &[
    "rust",
    "Rust",
    "go",
    "python",
    "pasta",
    "*",
    "?",
    "(",
    ")",
    "a*b",
    "\\",
    "AND",
    "OR",
    "NOT",
    "title:rust",
    "\"",
    "/",
    "/lang",
    "2015",
    "-1",
    "AUTO",
    "AUTO:2,4",
    "75%",
    "and",
    "or",
    "all",
    "none",
    "2015-05-15T00:00:00Z",
    "",
    "ü",
    "[a",
    "title^2",
    "t*",
    "best_fields",
    "most_fields",
    "phrase",
    "phrase_prefix",
    "asc",
    "desc",
    "_score",
    "year",
];

impl BodyGenerator {
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.rng.random_range(0..items.len())]
    }

    fn scalar(&mut self) -> JsonValue {
        match self.rng.random_range(0..8) {
            0 => JsonValue::Null,
            1 => json!(self.rng.random::<bool>()),
            2 => json!(self.rng.random_range(-3_i64..3000)),
            3 => json!(self.rng.random_range(-2.0_f64..5.0)),
            4 => json!(i64::MIN),
            5 => json!(u64::MAX),
            _ => json!(self.pick(WORDS)),
        }
    }

    fn value(&mut self, depth: usize) -> JsonValue {
        if depth == 0 {
            return self.scalar();
        }
        match self.rng.random_range(0..6) {
            0 | 1 => self.scalar(),
            2 => JsonValue::Array((0..self.rng.random_range(0..4)).map(|_| self.value(depth - 1)).collect()),
            3 => self.query(depth - 1),
            _ => {
                let mut object = serde_json::Map::new();
                for _ in 0..self.rng.random_range(0..4) {
                    let key = if self.rng.random_range(0..3) == 0 { self.pick(FIELDS) } else { self.pick(OPTION_KEYS) };
                    object.insert(key.to_string(), self.value(depth - 1));
                }
                JsonValue::Object(object)
            }
        }
    }

    /// A query of a plausible shape with random values, so that many bodies are accepted.
    fn plausible_query(&mut self, depth: usize) -> JsonValue {
        let field = self.pick(FIELDS);
        let word = self.pick(WORDS);
        match self.rng.random_range(0..12) {
            0 => json!({"match": { field: word }}),
            1 => json!({"match": { field: {"query": word, "operator": self.pick(&["and", "or"]),
                                            "fuzziness": self.pick(&["AUTO", "0", "1", "2"])} }}),
            2 => json!({"term": { field: self.scalar() }}),
            3 => json!({"terms": { field: [self.scalar(), self.scalar()] }}),
            4 => json!({"range": { field: { self.pick(&["gt", "gte", "lt", "lte"]): self.scalar() } }}),
            5 => json!({"prefix": { field: word }}),
            6 => json!({"wildcard": { field: word }}),
            7 => json!({"query_string": {"query": format!("{word} {}", self.pick(WORDS))}}),
            8 => json!({"multi_match": {"query": word, "type": self.pick(&["best_fields", "most_fields", "phrase"])}}),
            9 => json!({"exists": {"field": field}}),
            10 if depth > 0 => {
                let (must, should) = (self.plausible_query(depth - 1), self.query(depth - 1));
                json!({"bool": {"must": [must], "should": [should],
                                "minimum_should_match": self.pick(&["1", "50%", "-1"])}})
            }
            _ => json!({"match_phrase": { field: format!("{word} {}", self.pick(WORDS)) }}),
        }
    }

    fn query(&mut self, depth: usize) -> JsonValue {
        if self.rng.random_range(0..3) > 0 {
            return self.plausible_query(depth);
        }
        let query_type = self.pick(QUERY_TYPES);
        let body = if self.rng.random::<bool>() {
            let field = self.pick(FIELDS);
            json!({ field: self.value(depth) })
        } else {
            self.value(depth)
        };
        json!({ query_type: body })
    }

    fn body(&mut self) -> JsonValue {
        let mut body = serde_json::Map::new();
        body.insert("query".into(), self.query(4));
        if self.rng.random::<bool>() {
            let key =
                self.pick(&["from", "size", "sort", "_source", "track_total_hits", "highlight", "aggs", "version"]);
            let value = match key {
                "sort" => json!([{ self.pick(FIELDS): self.pick(&["asc", "desc"]) }, self.pick(WORDS)]),
                "highlight" => json!({"fields": { self.pick(FIELDS): {} }, "fragment_size": self.scalar()}),
                "aggs" => {
                    let aggregation_type = self.pick(SUPPORTED_AGGREGATION_TYPES);
                    let parameters = match aggregation_type {
                        "histogram" => json!({"field": self.pick(FIELDS), "interval": self.scalar()}),
                        "range" => json!({"field": self.pick(FIELDS), "ranges": [{"to": self.scalar()}]}),
                        "date_histogram" => json!({"field": self.pick(FIELDS), "fixed_interval": self.pick(WORDS)}),
                        _ => json!({"field": self.pick(FIELDS)}),
                    };
                    json!({"x": { aggregation_type: parameters }})
                }
                _ => self.scalar(),
            };
            body.insert(key.into(), value);
        }
        JsonValue::Object(body)
    }
}

#[test]
fn random_bodies_never_panic() {
    let (_directory, index) = books();
    let mut generator = BodyGenerator { rng: StdRng::seed_from_u64(0x5eed) };
    let limits = QueryLimits::default();
    let (mut accepted, mut refused) = (0, 0);
    for iteration in 0..800 {
        let body = generator.body();
        // Half the searches run with a deadline, which collects document by document.
        let budget = if iteration % 2 == 0 {
            SearchBudget::unlimited()
        } else {
            SearchBudget::until(Instant::now() + Duration::from_secs(60))
        };
        let outcome =
            JsonSearchRequest::from_json(&body).and_then(|request| index.search_json(&request, &limits, budget));
        match outcome {
            Ok(_) => accepted += 1,
            Err(IndexError::InvalidQuery(_) | IndexError::InvalidRequest(_)) => refused += 1,
            Err(other) => panic!("{body}: unexpected error kind {other:?}"),
        }
        let _ = index.count_json(body.get("query"), &limits, SearchBudget::unlimited());
    }
    // The generator reaches both outcomes.
    assert!(accepted > 100 && refused > 100, "accepted {accepted}, refused {refused}");
}

#[test]
fn patterns_whose_automaton_is_costly_are_refused_before_tantivy_builds_it() {
    let (_directory, index) = books();
    for pattern in ["(?s)(.{0,30}){0,30}", "(.{0,50}){0,50}", &"?".repeat(2000)] {
        let query_type = if pattern.starts_with('?') { "wildcard" } else { "regexp" };
        let body = serde_json::json!({"query": {query_type: {"title": pattern}}});
        let started = std::time::Instant::now();
        let error = search(&index, body).unwrap_err().to_string();
        assert!(error.contains("automaton of cost"), "{pattern}: {error}");
        assert!(started.elapsed() < std::time::Duration::from_millis(500), "{pattern} took {:?}", started.elapsed());
    }
    for pattern in ["hel+o", "[a-z]+ing", "colou?r", "(quick|brown).*"] {
        let body = serde_json::json!({"query": {"regexp": {"title": pattern}}});
        assert!(search(&index, body).is_ok(), "{pattern}");
    }
}
