#!/usr/bin/env python3
"""Drives a bayard cluster with the official Elasticsearch Python client (8.x), unmodified.

Run by tests/elasticsearch_client.rs, which starts three nodes with their HTTPS door and passes:

- BAYARD_ES_URLS: comma-separated https URLs of the nodes (https://127.0.0.1:PORT,...)
- BAYARD_ES_CA: the cluster CA (PEM) the node certificates are issued by
- BAYARD_ES_API_KEY: an API key, base64(id:key), as `bayard keys create` prints it

Writes documents (index, helpers.bulk, a bulk with one bad item, delete), checks what every
answer says against the ES 8 semantics and against a ground truth computed here from the
documents, then prints ONE JSON object to stdout: every compared search with its body, the
hit ids, total and aggregations it got, and the counts. The Rust test runs the same bodies
through the QUIC client and compares. Any failed expectation exits non-zero with a message
on stderr.
"""

import json
import os
import sys
import time
import traceback
from datetime import datetime, timedelta, timezone

try:
    import elasticsearch
    from elasticsearch import (
        BadRequestError,
        ConflictError,
        Elasticsearch,
        NotFoundError,
        helpers,
    )
except ImportError as error:  # the Rust side checks the import first; this is a backstop
    print(f"the elasticsearch package is not importable: {error}", file=sys.stderr)
    sys.exit(3)

INDEX = "bayard"
WORDS = [
    "apple",
    "river",
    "mountain",
    "quantum",
    "garden",
    "engine",
    "violin",
    "harbor",
    "comet",
    "forest",
    "silver",
    "lantern",
]
GENERATED = 200
EPOCH = datetime(2020, 1, 1, tzinfo=timezone.utc)


class CheckFailed(Exception):
    pass


# Failed expectations so far: the check goes on after one, to report every discrepancy of a
# run at once, and exits non-zero at the end.
FAILURES = []


def check(condition, message):
    """An expectation: a failure is recorded and reported at the end."""
    if not condition:
        FAILURES.append(message)
        print(f"   FAILED: {message}", file=sys.stderr, flush=True)
    return bool(condition)


def require(condition, message):
    """An expectation the rest of the check cannot do without."""
    if not condition:
        raise CheckFailed(message)


def step(name):
    print(f"-- {name}", file=sys.stderr, flush=True)


def generated(i):
    """Document i of the deterministic corpus (only fields of etc/schema.json)."""
    w = WORDS
    return {
        "title": f"{w[i % 12]} {w[(i * 7 + 3) % 12]}",
        "body": f"the {w[i % 12]} near the {w[(i * 5 + 1) % 12]} and {w[(i * 3 + 2) % 12]} story number {i}",
        "url": f"https://example.com/{i}",
        "tags": ["even" if i % 2 == 0 else "odd", f"group{i % 4}"],
        "category": f"/cat/{['news', 'blog', 'wiki'][i % 3]}",
        "year": 2000 + i % 20,
        "popularity": (i * 37) % 1000,
        "rating": round(((i * 13) % 50) / 10, 1),
        "published": (EPOCH + timedelta(days=i)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def doc_id(i):
    return f"doc-{i:03d}"


SPARSE = {"title": "sparse document", "body": "only a title a body and a year", "year": 1993}
AUTO = {
    "title": "drawn identifier",
    "body": "the node draws the id of this document",
    "url": "https://example.org/auto",
    "tags": ["auto"],
    "category": "/intro/auto",
    "year": 1994,
    "popularity": 5004,
    "rating": 1.5,
    "published": "2019-06-04T12:00:00Z",
}

INTRO = {
    "intro-1": {
        "title": "bayard speaks elasticsearch",
        "body": "an elasticsearch client talks to a bayard cluster over https",
        "url": "https://example.org/intro/1",
        "tags": ["intro"],
        "category": "/intro/a",
        "year": 1990,
        "popularity": 5001,
        "rating": 4.5,
        "published": "2019-06-01T12:00:00Z",
    },
    "intro-2": {
        "title": "replicated search",
        "body": "three voters agree on every write before it is applied",
        "url": "https://example.org/intro/2",
        "tags": ["intro"],
        "category": "/intro/b",
        "year": 1991,
        "popularity": 5002,
        "rating": 3.5,
        "published": "2019-06-02T12:00:00Z",
    },
    "intro-3": {
        "title": "deleted soon",
        "body": "this document is deleted by the check",
        "url": "https://example.org/intro/3",
        "tags": ["intro"],
        "category": "/intro/c",
        "year": 1992,
        "popularity": 5003,
        "rating": 2.5,
        "published": "2019-06-03T12:00:00Z",
    },
}


def analyzed(text):
    """Close enough to lang_en for this corpus: lower case words, stop words dropped (the
    words of the corpus stem to themselves or consistently)."""
    stop = {"a", "an", "and", "the", "to", "is", "it", "by", "on", "over", "this", "before"}
    return {token for token in text.lower().replace("/", " ").split() if token not in stop}


def client(urls, ca, key):
    return Elasticsearch(hosts=urls, ca_certs=ca, api_key=key, request_timeout=30)


def ids_of(response):
    return [hit["_id"] for hit in response["hits"]["hits"]]


def total_of(response):
    total = response["hits"].get("total")
    check(isinstance(total, dict), f"hits.total should be an object, got {total!r}")
    check(total.get("relation") == "eq", f"hits.total.relation should be eq, got {total!r}")
    return total["value"]


def bucket_key(key):
    if isinstance(key, float) and key.is_integer():
        return str(int(key))
    return str(key)


def normalize_aggregations(aggregations):
    """Buckets as {key: doc_count}, metrics as their values: the shape both sides compare."""
    out = {}
    for name, value in sorted((aggregations or {}).items()):
        if "buckets" in value:
            buckets = value["buckets"]
            if isinstance(buckets, dict):  # keyed range buckets
                buckets = [dict(b, key=k) for k, b in buckets.items()]
            out[name] = {bucket_key(b["key"]): b["doc_count"] for b in buckets}
        elif "values" in value:
            out[name] = value["values"]
        elif "count" in value and "sum" in value:
            out[name] = {k: value[k] for k in ("count", "min", "max", "avg", "sum")}
        else:
            out[name] = value.get("value")
    return out


def close(a, b, tolerance=1e-6):
    return a is not None and b is not None and abs(float(a) - float(b)) <= tolerance * max(1.0, abs(float(b)))


def main():
    urls = [url.strip() for url in os.environ["BAYARD_ES_URLS"].split(",") if url.strip()]
    ca = os.environ["BAYARD_ES_CA"]
    key = os.environ["BAYARD_ES_API_KEY"]
    require(len(urls) == 3, f"expected three node URLs, got {urls}")
    print(f"-- elasticsearch-py {elasticsearch.__versionstr__}", file=sys.stderr)

    es = client(urls, ca, key)
    per_node = [client([url], ca, key) for url in urls]

    # ---------------------------------------------------------------- info, health, index
    step("info on every node")
    names = set()
    for url, node in zip(urls, per_node):
        info = node.info()
        check(info["version"]["number"].startswith("8."), f"{url}: version {info['version']!r} is not 8.x")
        check("tagline" in info and "cluster_name" in info, f"{url}: info lacks fields: {info.body!r}")
        names.add(info["name"])
    check(len(names) == 3, f"the three URLs should be three nodes, got names {names}")

    step("cluster health")
    health = es.cluster.health()
    check(health["status"] in ("green", "yellow"), f"health status {health['status']!r}")
    check(health["number_of_nodes"] == 3, f"GET /_cluster/health: number_of_nodes {health['number_of_nodes']}, want 3: {health.body}")

    step("indices.exists / get_mapping")
    check(es.indices.exists(index=INDEX).body is True, "indices.exists(bayard) should be True")
    check(es.indices.exists(index="no-such-index").body is False, "indices.exists(no-such-index) should be False")
    settings = es.indices.get(index=INDEX)[INDEX]["settings"]["index"]
    check(
        settings.get("number_of_replicas") == "2",
        f"indices.get: number_of_replicas {settings.get('number_of_replicas')!r}, want '2' (three copies)",
    )
    mapping = es.indices.get_mapping(index=INDEX)
    properties = mapping[INDEX]["mappings"]["properties"]
    for field, kind in [("title", "text"), ("year", "long"), ("rating", "double"), ("published", "date")]:
        check(properties.get(field, {}).get("type") == kind, f"mapping of {field}: {properties.get(field)!r}, want {kind}")

    # ---------------------------------------------------------------- writes
    corpus = {}

    def settle(what, queries=()):
        """Waits (at most 20 s) until every node counts the corpus and every (query, count).

        A write acknowledged through one node is not yet applied on the others (see the read
        your writes step, which checks that on its own): the checks after a write wait here
        first so that they test what they are about, not replication lag."""
        wanted = [(None, len(corpus))] + list(queries)
        deadline = time.monotonic() + 20
        while True:
            lagging = []
            for url, node in zip(urls, per_node):
                for query, count in wanted:
                    got = node.count(index=INDEX, query=query)["count"] if query else node.count(index=INDEX)["count"]
                    if got != count:
                        lagging.append(f"{url}: count {query} = {got}, want {count}")
            if not lagging:
                return
            if time.monotonic() > deadline:
                raise CheckFailed(f"{what}: the nodes never converged: {lagging}")
            time.sleep(0.1)

    step("index with explicit ids, refresh=True")
    for node, (id_, document) in zip(per_node, INTRO.items()):
        response = node.index(index=INDEX, id=id_, document=document, refresh=True)
        check(response["result"] == "created", f"index {id_}: result {response['result']!r}, want created")
        check(response["_id"] == id_ and response["_index"] == INDEX, f"index {id_}: {response.body!r}")
        corpus[id_] = document
    settle("intro documents")
    response = es.index(index=INDEX, id="intro-1", document=INTRO["intro-1"], refresh=True)
    check(response["result"] == "updated", f"re-index intro-1: result {response['result']!r}, want updated")
    check(
        response["_shards"]["total"] == 3,
        f"index answer: _shards {response['_shards']!r}, want total 3 (a copy on each of three nodes)",
    )

    step("create of an existing id conflicts")
    try:
        es.create(index=INDEX, id="intro-2", document=INTRO["intro-2"])
        check(False, "create of an existing id should raise ConflictError (409)")
    except ConflictError as error:
        check(error.status_code == 409, f"create conflict: status {error.status_code}")

    step("create (PUT _create) of a sparse document, POST _doc with a drawn id, exists")
    response = es.create(index=INDEX, id="intro-4", document=SPARSE, refresh=True)
    check(response["result"] == "created", f"create intro-4: {response.body!r}")
    corpus["intro-4"] = SPARSE
    response = es.index(index=INDEX, document=AUTO, refresh=True)
    auto_id = response["_id"]
    check(response["result"] == "created" and auto_id, f"index without an id: {response.body!r}")
    corpus[auto_id] = AUTO
    settle("create and index without an id", [({"ids": {"values": ["intro-4", auto_id]}}, 2)])
    check(es.exists(index=INDEX, id=auto_id).body is True, f"exists({auto_id}) should be True")
    check(es.exists(index=INDEX, id="no-such-document").body is False, "exists(no-such-document) should be False")

    step(f"helpers.bulk of {GENERATED} documents")
    actions = [{"_index": INDEX, "_id": doc_id(i), "_source": generated(i)} for i in range(GENERATED)]
    success, errors = helpers.bulk(es, actions, chunk_size=80)
    require(success == GENERATED and not errors, f"helpers.bulk: {success} ok, errors {errors!r}")
    corpus.update({doc_id(i): generated(i) for i in range(GENERATED)})

    step("indices.refresh")
    es.indices.refresh(index=INDEX)
    settle("helpers.bulk")

    step("get")
    got = per_node[1].get(index=INDEX, id="doc-007")
    check(got["found"] is True and got["_id"] == "doc-007", f"get doc-007: {got.body!r}")
    source = dict(got["_source"])
    expected = generated(7)
    published = source.pop("published", None)
    check(
        isinstance(published, str) and published.startswith(expected["published"][:19]),
        f"get doc-007: published {published!r}, want {expected['published']}",
    )
    expected_rest = {k: v for k, v in expected.items() if k != "published"}
    check(source == expected_rest, f"get doc-007: _source {source!r}, want {expected_rest!r}")

    step("delete, then get raises NotFoundError")
    response = es.delete(index=INDEX, id="intro-3", refresh=True)
    check(response["result"] == "deleted", f"delete intro-3: result {response['result']!r}")
    del corpus["intro-3"]
    settle("delete intro-3")
    try:
        es.get(index=INDEX, id="intro-3")
        check(False, "get of a deleted document should raise NotFoundError")
    except NotFoundError as error:
        check(error.status_code == 404, f"get deleted: status {error.status_code}")
    try:
        es.delete(index=INDEX, id="intro-3")
        check(False, "delete of a missing document should raise NotFoundError")
    except NotFoundError as error:
        check(error.status_code == 404, f"delete missing: status {error.status_code}")

    step("bulk with one bad document")
    good_1, good_2 = generated(GENERATED), generated(GENERATED + 1)
    bad = dict(generated(GENERATED + 2), year="not a number")
    operations = [
        {"index": {"_index": INDEX, "_id": "bulk-ok-1"}},
        good_1,
        {"index": {"_index": INDEX, "_id": "bulk-bad"}},
        bad,
        {"create": {"_index": INDEX, "_id": "bulk-ok-2"}},
        good_2,
    ]
    response = es.bulk(operations=operations, refresh=True)
    check(response["errors"] is True, f"bulk with a bad item: errors {response.get('errors')!r}, want true")
    items = response["items"]
    check(len(items) == 3, f"bulk: {len(items)} items, want 3")
    statuses = [(kind, item["_id"], item["status"]) for entry in items for kind, item in entry.items()]
    check(
        [s[:2] for s in statuses] == [("index", "bulk-ok-1"), ("index", "bulk-bad"), ("create", "bulk-ok-2")],
        f"bulk items: {statuses}",
    )
    check(statuses[0][2] in (200, 201) and statuses[2][2] == 201, f"bulk good items: {statuses}")
    failed = items[1]["index"]
    check(failed["status"] == 400 and "error" in failed, f"bulk bad item: {failed!r}, want status 400 with error")
    check(
        isinstance(failed["error"], dict) and "year" in json.dumps(failed["error"]),
        f"bulk bad item's error should name the field year: {failed['error']!r}",
    )
    check(all("error" not in items[i][k] for i, k in [(0, "index"), (2, "create")]), f"good items carry errors: {items}")
    corpus["bulk-ok-1"], corpus["bulk-ok-2"] = good_1, good_2
    settle("bulk with a bad item")

    step("helpers.bulk(raise_on_error=False) reports the bad item only")
    success, errors = helpers.bulk(
        es,
        [
            {"_index": INDEX, "_id": "bulk-ok-1", "_source": good_1},
            {"_index": INDEX, "_id": "bulk-bad", "_source": bad},
        ],
        raise_on_error=False,
        refresh=True,
    )
    check(success == 1 and len(errors) == 1, f"helpers.bulk: {success} ok, errors {errors!r}")
    check(errors[0]["index"]["_id"] == "bulk-bad", f"helpers.bulk error names {errors[0]!r}")
    try:
        es.get(index=INDEX, id="bulk-bad")
        check(False, "the refused bulk document should not exist")
    except NotFoundError:
        pass

    step("bulk update, delete, and a create conflict")
    operations = [
        {"update": {"_index": INDEX, "_id": "doc-010"}},
        {"doc": {"title": "renamed entry", "rating": 0.25}},
        {"delete": {"_index": INDEX, "_id": "doc-011"}},
        {"create": {"_index": INDEX, "_id": "doc-012"}},
        generated(12),
        {"update": {"_index": INDEX, "_id": "no-such-document"}},
        {"doc": {"title": "nothing"}},
    ]
    response = es.bulk(operations=operations, refresh=True)
    statuses = [(kind, item["_id"], item["status"]) for entry in response["items"] for kind, item in entry.items()]
    want_statuses = [
        ("update", "doc-010", 200),
        ("delete", "doc-011", 200),
        ("create", "doc-012", 409),
        ("update", "no-such-document", 404),
    ]
    check(statuses == want_statuses, f"bulk update/delete/create: {statuses}, want {want_statuses}")
    check(response["errors"] is True, "bulk with a conflict: errors should be true")
    results = [item.get("result") for entry in response["items"] for item in entry.values()]
    check(results[:2] == ["updated", "deleted"], f"bulk results {results}")
    corpus["doc-010"] = dict(corpus["doc-010"], title="renamed entry", rating=0.25)
    del corpus["doc-011"]
    settle("bulk update and delete", [({"match": {"title": "renamed"}}, 1)])
    got = es.get(index=INDEX, id="doc-010")["_source"]
    check(got.get("title") == "renamed entry" and got.get("body") == corpus["doc-010"]["body"], f"updated doc-010: {got!r}")

    step("read your writes: index(refresh=True) through one node, then get on it and on another")
    rounds = 30
    missed_here, missed_there = [], []
    for k in range(rounds):
        writer, reader = per_node[k % 3], per_node[(k + 1) % 3]
        id_ = f"ryw-{k:02d}"
        document = {"title": "read your writes", "body": f"probe {k}", "year": 1980, "popularity": 6000 + k}
        writer.index(index=INDEX, id=id_, document=document, refresh=True)
        corpus[id_] = document
        for node, missed in ((writer, missed_here), (reader, missed_there)):
            try:
                node.get(index=INDEX, id=id_)
            except NotFoundError:
                missed.append(id_)
    check(
        not missed_here,
        f"read your writes: {len(missed_here)} of {rounds} GETs on the node that took index(refresh=True) "
        f"just before found nothing (404): {missed_here}",
    )
    check(
        not missed_there,
        f"read your writes: {len(missed_there)} of {rounds} GETs on another node right after index(refresh=True) "
        f"found nothing (404): {missed_there}",
    )
    settle("read your writes")

    # ---------------------------------------------------------------- errors
    step("unsupported query is a BadRequestError naming it")
    try:
        es.search(index=INDEX, query={"geo_distance": {"distance": "10km", "location": {"lat": 0, "lon": 0}}})
        check(False, "geo_distance should raise BadRequestError")
    except BadRequestError as error:
        check(error.status_code == 400, f"geo_distance: status {error.status_code}")
        check("geo_distance" in str(error) or "geo_distance" in json.dumps(error.body), f"geo_distance error: {error}")

    step("wrong index is index_not_found_exception")
    try:
        es.search(index="no-such-index", query={"match_all": {}})
        check(False, "a search of no-such-index should raise NotFoundError")
    except NotFoundError as error:
        check(error.error == "index_not_found_exception", f"wrong index: error {error.error!r}")
    try:
        es.get(index="no-such-index", id="doc-001")
        check(False, "a get in no-such-index should raise NotFoundError")
    except NotFoundError as error:
        check(error.error == "index_not_found_exception", f"get in wrong index: error {error.error!r}")

    # ---------------------------------------------------------------- searches
    # Every search below runs on the final corpus: the Rust side reruns them after this script.
    searches = {}
    counts = {}

    def has(id_, field, word):
        return word in analyzed(corpus[id_].get(field, ""))

    def record(name, body, response, ordered, detail=False):
        searches[name] = {
            "body": body,
            "ordered": ordered,
            "ids": ids_of(response),
            "total": total_of(response),
            "aggregations": normalize_aggregations(response.body.get("aggregations")),
        }
        if detail:  # what the hits carry besides their ids, by id
            hits = response["hits"]["hits"]
            searches[name]["sources"] = {hit["_id"]: hit["_source"] for hit in hits if "_source" in hit}
            searches[name]["highlights"] = {hit["_id"]: hit["highlight"] for hit in hits if "highlight" in hit}

    all_ids = set(corpus)
    check(len(all_ids) == GENERATED + 5 + 30, f"corpus of {len(all_ids)}")

    step("count on every node")
    for url, node in zip(urls, per_node):
        count = node.count(index=INDEX)["count"]
        check(count == len(all_ids), f"{url}: count {count}, want {len(all_ids)}")
    counts["all"] = {"query": None, "count": len(all_ids)}

    step("count with a term query")
    query = {"term": {"tags": "even"}}
    count = es.count(index=INDEX, query=query)["count"]
    want = sum(1 for d in corpus.values() if "even" in d.get("tags", []))
    check(count == want, f"count tags=even: {count}, want {want}")
    counts["tags_even"] = {"query": query, "count": count}

    step("bool: must match + filter range + must_not term")
    body = {
        "query": {
            "bool": {
                "must": [{"match": {"body": "quantum"}}],
                "filter": [{"range": {"year": {"gte": 2005, "lte": 2014}}}],
                "must_not": [{"term": {"tags": "odd"}}],
            }
        },
        "size": 100,
    }
    response = es.search(index=INDEX, **body)
    want = {
        i for i, d in corpus.items() if has(i, "body", "quantum") and 2005 <= d["year"] <= 2014 and "odd" not in d.get("tags", [])
    }
    check(want, "the bool search's ground truth is empty: fix the corpus")
    check(set(ids_of(response)) == want, f"bool: ids {sorted(ids_of(response))}, want {sorted(want)}")
    check(total_of(response) == len(want), f"bool: total {total_of(response)}, want {len(want)}")
    scores = [hit["_score"] for hit in response["hits"]["hits"]]
    check(scores == sorted(scores, reverse=True), f"bool: hits not by score: {scores}")
    record("bool", body, response, ordered=False)

    step("match with operator and")
    body = {"query": {"match": {"body": {"query": "apple lantern", "operator": "and"}}}, "size": 200}
    response = es.search(index=INDEX, **body)
    want = {i for i in corpus if has(i, "body", "apple") and has(i, "body", "lantern")}
    check(want, "the match/and ground truth is empty: fix the corpus")
    check(set(ids_of(response)) == want, f"match and: ids {sorted(ids_of(response))}, want {sorted(want)}")
    record("match_and", body, response, ordered=False)
    body_or = {"query": {"match": {"body": {"query": "apple lantern"}}}, "size": 200}
    response = es.search(index=INDEX, **body_or)
    want_or = {i for i in corpus if has(i, "body", "apple") or has(i, "body", "lantern")}
    check(len(want_or) > len(want), "the match/or ground truth should be larger than the and one")
    check(set(ids_of(response)) == want_or, f"match or: {len(ids_of(response))} ids, want {len(want_or)}")
    record("match_or", body_or, response, ordered=False)

    step("multi_match with ^boost")
    body = {"query": {"multi_match": {"query": "violin", "fields": ["title^3", "body"]}}, "size": 200}
    response = es.search(index=INDEX, **body)
    want = {i for i in corpus if has(i, "title", "violin") or has(i, "body", "violin")}
    got_ids = ids_of(response)
    check(set(got_ids) == want, f"multi_match: ids {sorted(got_ids)}, want {sorted(want)}")
    in_title = [has(i, "title", "violin") for i in got_ids]
    check(
        in_title == sorted(in_title, reverse=True) and any(in_title) and not all(in_title),
        f"multi_match title^3: every title match should rank above body-only matches: {list(zip(got_ids, in_title))}",
    )
    record("multi_match", body, response, ordered=False)

    step("aggregations: terms + avg + stats")
    body = {
        "size": 0,
        "query": {"match_all": {}},
        "track_total_hits": True,
        "aggs": {
            "by_year": {"terms": {"field": "year", "size": 50}},
            "avg_rating": {"avg": {"field": "rating"}},
            "popularity_stats": {"stats": {"field": "popularity"}},
            "max_year": {"max": {"field": "year"}},
        },
    }
    response = es.search(index=INDEX, **body)
    check(response["hits"]["hits"] == [], "size 0: hits should be empty")
    check(total_of(response) == len(corpus), f"aggs: total {total_of(response)}, want {len(corpus)}")
    aggregations = normalize_aggregations(response.body.get("aggregations"))
    want_years = {}
    for d in corpus.values():
        want_years[str(d["year"])] = want_years.get(str(d["year"]), 0) + 1
    check(aggregations.get("by_year") == want_years, f"terms year: {aggregations.get('by_year')}, want {want_years}")
    buckets = response["aggregations"]["by_year"]["buckets"]
    counts_in_order = [b["doc_count"] for b in buckets]
    check(counts_in_order == sorted(counts_in_order, reverse=True), f"terms buckets not by doc_count: {buckets}")
    ratings = [d["rating"] for d in corpus.values() if "rating" in d]
    check(
        close(aggregations.get("avg_rating"), sum(ratings) / len(ratings)),
        f"avg rating {aggregations.get('avg_rating')}, want {sum(ratings) / len(ratings)}",
    )
    popularity = [d["popularity"] for d in corpus.values() if "popularity" in d]
    stats = aggregations.get("popularity_stats") or {}
    want_stats = {
        "count": len(popularity),
        "min": min(popularity),
        "max": max(popularity),
        "avg": sum(popularity) / len(popularity),
        "sum": sum(popularity),
    }
    check(all(close(stats.get(k), v) for k, v in want_stats.items()), f"stats popularity {stats}, want {want_stats}")
    check(close(aggregations.get("max_year"), 2019), f"max year {aggregations.get('max_year')}, want 2019")
    record("aggregations", body, response, ordered=False)

    step("highlight on body")
    body = {
        "query": {"match": {"body": "lantern"}},
        "highlight": {"fields": {"body": {}}},
        "size": 200,
    }
    response = es.search(index=INDEX, **body)
    want = {i for i in corpus if has(i, "body", "lantern")}
    check(set(ids_of(response)) == want, f"highlight: ids {sorted(ids_of(response))}, want {sorted(want)}")
    for hit in response["hits"]["hits"]:
        fragments = (hit.get("highlight") or {}).get("body")
        check(
            isinstance(fragments, list) and fragments and all(isinstance(f, str) for f in fragments),
            f"highlight of {hit['_id']}: {hit.get('highlight')!r}, want highlight.body as a list of strings",
        )
        check(
            any("<em>lantern</em>" in f.lower() for f in fragments),
            f"highlight of {hit['_id']}: {fragments!r} should mark <em>lantern</em> (ES default pre/post tags)",
        )
    record("highlight", body, response, ordered=False, detail=True)

    step("sort by a fast numeric field, _source includes")
    body = {
        "query": {"range": {"rating": {"gte": 2.0}}},
        "sort": [{"popularity": {"order": "desc"}}],
        "_source": {"includes": ["title", "popularity"]},
        "size": 15,
    }
    response = es.search(index=INDEX, **body)
    matching = [i for i, d in corpus.items() if d.get("rating", -1) >= 2.0]
    want = sorted(matching, key=lambda i: corpus[i]["popularity"], reverse=True)[:15]
    check(ids_of(response) == want, f"sort popularity desc: {ids_of(response)}, want {want}")
    check(total_of(response) == len(matching), f"sort: total {total_of(response)}, want {len(matching)}")
    for hit in response["hits"]["hits"]:
        source = hit.get("_source")
        want_source = {k: corpus[hit["_id"]][k] for k in ("title", "popularity")}
        check(source == want_source, f"_source includes of {hit['_id']}: {source!r}, want {want_source!r}")
        check(
            hit.get("sort") == [corpus[hit["_id"]]["popularity"]],
            f"sort values of {hit['_id']}: {hit.get('sort')!r}",
        )
    record("sorted", body, response, ordered=True, detail=True)

    step("from/size paging with sort ascending")
    body = {"query": {"match_all": {}}, "sort": [{"popularity": "asc"}], "from": 10, "size": 5, "_source": False}
    response = es.search(index=INDEX, **body)
    # Documents without the sort field come last (ES: missing defaults to _last).
    want = sorted(corpus, key=lambda i: (0, corpus[i]["popularity"]) if "popularity" in corpus[i] else (1, 0))[10:15]
    check(ids_of(response) == want, f"paging: {ids_of(response)}, want {want}")
    check(all("_source" not in hit for hit in response["hits"]["hits"]), "_source: false should leave _source out")
    record("paging", body, response, ordered=True)

    step("date range")
    body = {
        "query": {"range": {"published": {"gte": "2020-03-01T00:00:00Z", "lt": "2020-04-01T00:00:00Z"}}},
        "sort": [{"popularity": "asc"}],
        "size": 100,
    }
    response = es.search(index=INDEX, **body)
    want = sorted(
        [i for i, d in corpus.items() if "2020-03-01" <= d.get("published", "")[:10] < "2020-04-01"],
        key=lambda i: corpus[i]["popularity"],
    )
    check(len(want) == 31, f"ground truth of March 2020 has {len(want)} documents")
    check(ids_of(response) == want, f"date range: {ids_of(response)}, want {want}")
    record("date_range", body, response, ordered=True)

    step("sort: documents without the field come last")
    body = {"query": {"range": {"year": {"lte": 1995}}}, "sort": [{"popularity": {"order": "desc"}}], "size": 100}
    response = es.search(index=INDEX, **body)
    low = [i for i, d in corpus.items() if d["year"] <= 1995]
    want = sorted([i for i in low if "popularity" in corpus[i]], key=lambda i: -corpus[i]["popularity"])
    want += [i for i in low if "popularity" not in corpus[i]]
    check(ids_of(response) == want, f"sort desc with a missing value: {ids_of(response)}, want {want} (missing _last)")
    record("sort_missing", body, response, ordered=True)

    def by_popularity(ids):
        return sorted(ids, key=lambda i: (0, corpus[i]["popularity"]) if "popularity" in corpus[i] else (1, 0))

    def sorted_search(name, query, want, what):
        body = {"query": query, "sort": [{"popularity": "asc"}], "size": 300}
        response = es.search(index=INDEX, **body)
        want = by_popularity(want)
        check(want, f"{name}: the ground truth is empty: fix the corpus")
        check(ids_of(response) == want, f"{what}: {ids_of(response)}, want {want}")
        check(total_of(response) == len(want), f"{what}: total {total_of(response)}, want {len(want)}")
        record(name, body, response, ordered=True)
        return response

    step("match_phrase")
    sorted_search(
        "match_phrase",
        {"match_phrase": {"body": "comet story"}},
        [i for i, d in corpus.items() if "comet story" in d.get("body", "")],
        "match_phrase body 'comet story'",
    )

    step("query_string and simple_query_string")
    sorted_search(
        "query_string",
        {"query_string": {"query": "violin AND forest", "default_field": "title"}},
        [i for i in corpus if has(i, "title", "violin") and has(i, "title", "forest")],
        "query_string 'violin AND forest' in title",
    )
    sorted_search(
        "query_string_fields",
        {"query_string": {"query": "title:harbor AND year:[2005 TO 2009]"}},
        [i for i, d in corpus.items() if has(i, "title", "harbor") and 2005 <= d["year"] <= 2009],
        "query_string 'title:harbor AND year:[2005 TO 2009]'",
    )
    sorted_search(
        "simple_query_string",
        {"simple_query_string": {"query": "comet -lantern", "fields": ["body"], "default_operator": "and"}},
        [i for i in corpus if has(i, "body", "comet") and not has(i, "body", "lantern")],
        "simple_query_string 'comet -lantern' (and)",
    )

    step("exists, wildcard, fuzzy, match with fuzziness, terms, ids")
    sorted_search(
        "exists",
        {"exists": {"field": "rating"}},
        [i for i, d in corpus.items() if "rating" in d],
        "exists rating",
    )
    sorted_search(
        "wildcard",
        {"wildcard": {"url": {"value": "https://example.com/1?5"}}},
        [i for i, d in corpus.items() if len(d.get("url", "")) == 23 and d["url"].startswith("https://example.com/1")
         and d["url"].endswith("5")],
        "wildcard url https://example.com/1?5",
    )
    sorted_search(
        "fuzzy",
        {"fuzzy": {"title": {"value": "violn", "fuzziness": 1}}},
        [i for i in corpus if has(i, "title", "violin")],
        "fuzzy title violn~1",
    )
    sorted_search(
        "match_fuzziness",
        {"match": {"title": {"query": "lanturn", "fuzziness": "AUTO"}}},
        [i for i in corpus if has(i, "title", "lantern")],
        "match title lanturn fuzziness AUTO",
    )
    sorted_search(
        "bool_should",
        {
            "bool": {
                "should": [
                    {"match": {"body": "apple"}},
                    {"match": {"body": "lantern"}},
                    {"match": {"body": "comet"}},
                ],
                "minimum_should_match": 2,
            }
        },
        [i for i in corpus if sum(has(i, "body", w) for w in ("apple", "lantern", "comet")) >= 2],
        "bool should (apple, lantern, comet) minimum_should_match 2",
    )

    step("constant_score")
    body = {"query": {"constant_score": {"filter": {"term": {"tags": "group2"}}, "boost": 1.5}}, "size": 300}
    response = es.search(index=INDEX, **body)
    want = {i for i, d in corpus.items() if "group2" in d.get("tags", [])}
    check(set(ids_of(response)) == want, f"constant_score: {sorted(ids_of(response))}, want {sorted(want)}")
    scores = {hit["_score"] for hit in response["hits"]["hits"]}
    check(scores == {1.5}, f"constant_score boost 1.5: scores {scores}, want all 1.5")
    record("constant_score", body, response, ordered=False)

    step("track_total_hits")
    response = es.search(index=INDEX, query={"match_all": {}}, size=0, track_total_hits=10)
    total = response["hits"].get("total")
    check(total == {"value": 10, "relation": "gte"}, f"track_total_hits 10: total {total!r}, want value 10, gte")
    response = es.search(index=INDEX, query={"match_all": {}}, size=1, track_total_hits=False)
    check("total" not in response["hits"], f"track_total_hits false: hits.total {response['hits'].get('total')!r}")
    count = es.count(index=INDEX, q="title:violin")["count"]
    want = sum(1 for i in corpus if has(i, "title", "violin"))
    check(count == want, f"count q=title:violin: {count}, want {want}")

    step("more aggregations: range, histogram, date_histogram, min/max/sum, cardinality, percentiles")
    interval_ms = 7 * 86400 * 1000
    body = {
        "size": 0,
        "query": {"range": {"year": {"gte": 2000}}},
        "aggs": {
            "rating_ranges": {"range": {"field": "rating", "ranges": [{"to": 2.0}, {"from": 2.0, "to": 4.0}, {"from": 4.0}]}},
            "year_histogram": {"histogram": {"field": "year", "interval": 5}},
            "weekly": {"date_histogram": {"field": "published", "fixed_interval": "7d"}},
            "min_rating": {"min": {"field": "rating"}},
            "sum_popularity": {"sum": {"field": "popularity"}},
            "years": {"cardinality": {"field": "year"}},
            "popularity_percentiles": {"percentiles": {"field": "popularity", "percents": [50, 90]}},
        },
    }
    response = es.search(index=INDEX, **body)
    aggregations = response["aggregations"]
    recent = [d for d in corpus.values() if d["year"] >= 2000]
    ranges = aggregations["rating_ranges"]["buckets"]
    want_ranges = [
        ("*-2.0", sum(1 for d in recent if d["rating"] < 2.0)),
        ("2.0-4.0", sum(1 for d in recent if 2.0 <= d["rating"] < 4.0)),
        ("4.0-*", sum(1 for d in recent if d["rating"] >= 4.0)),
    ]
    # Bucket keys are tantivy's: it writes the bounds of a double field as "2", where
    # Elasticsearch writes "2.0" (docs/http_api.md, "Different by design"); the bounds and counts
    # are Elasticsearch's.
    got_ranges = (
        [(b.get("from"), b.get("to"), b.get("doc_count")) for b in ranges] if isinstance(ranges, list) else ranges
    )
    want_bounds = [(None, 2.0), (2.0, 4.0), (4.0, None)]
    want_ranges = [(low, high, count) for (low, high), (_, count) in zip(want_bounds, want_ranges)]
    check(
        got_ranges == want_ranges,
        f"range agg on the double field rating: (from, to, doc_count) {got_ranges}, want {want_ranges}; "
        f"buckets: {ranges}",
    )
    want_histogram = {}
    for d in recent:
        key = str(d["year"] - d["year"] % 5)
        want_histogram[key] = want_histogram.get(key, 0) + 1
    histogram = {bucket_key(b["key"]): b["doc_count"] for b in aggregations["year_histogram"]["buckets"]}
    check(histogram == want_histogram, f"histogram year/5: {histogram}, want {want_histogram}")
    want_weeks = {}
    for d in recent:
        ms = int(datetime.strptime(d["published"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp() * 1000)
        key = ms - ms % interval_ms
        want_weeks[key] = want_weeks.get(key, 0) + 1
    for key in range(min(want_weeks), max(want_weeks) + 1, interval_ms):  # empty buckets in between
        want_weeks.setdefault(key, 0)
    weekly = aggregations["weekly"]["buckets"]
    got_weeks = {int(b["key"]): b["doc_count"] for b in weekly}
    check(got_weeks == want_weeks, f"date_histogram 7d: {got_weeks}, want {want_weeks}")
    check(
        all(isinstance(b.get("key_as_string"), str) for b in weekly),
        f"date_histogram buckets should carry key_as_string: {weekly[:2]}",
    )
    check(close(aggregations["min_rating"]["value"], min(d["rating"] for d in recent)), f"min: {aggregations['min_rating']}")
    check(
        close(aggregations["sum_popularity"]["value"], sum(d["popularity"] for d in recent)),
        f"sum: {aggregations['sum_popularity']}",
    )
    check(aggregations["years"]["value"] == 20, f"cardinality of year: {aggregations['years']}, want 20")
    values = aggregations["popularity_percentiles"].get("values", {})
    check(sorted(values) == ["50.0", "90.0"], f"percentiles keys: {sorted(values)}, want ['50.0', '90.0']")
    ordered_popularity = sorted(d["popularity"] for d in recent)
    for percent in (50, 90):
        true_value = ordered_popularity[int(len(ordered_popularity) * percent / 100)]
        got = values.get(f"{percent}.0")
        check(
            got is not None and abs(got - true_value) <= 0.05 * true_value + 15,
            f"percentile {percent} of popularity: {got}, want about {true_value}",
        )
    record("more_aggregations", body, response, ordered=False)

    step("msearch")
    bodies = [
        {"query": {"ids": {"values": ["doc-003", "intro-2", "intro-3", "doc-150"]}}, "sort": [{"popularity": "asc"}]},
        {"query": {"prefix": {"url": "https://example.com/1"}}, "sort": [{"popularity": "desc"}], "size": 200},
        {"query": {"terms": {"tags": ["group1", "intro"]}}, "sort": [{"popularity": "asc"}], "size": 200},
    ]
    searches_lines = []
    for search_body in bodies:
        searches_lines.append({"index": INDEX})
        searches_lines.append(search_body)
    response = es.msearch(searches=searches_lines)
    responses = response["responses"]
    check(len(responses) == len(bodies), f"msearch: {len(responses)} responses, want {len(bodies)}")
    wants = [
        sorted(["doc-003", "intro-2", "doc-150"], key=lambda i: corpus[i]["popularity"]),
        sorted([i for i, d in corpus.items() if d.get("url", "").startswith("https://example.com/1")],
               key=lambda i: corpus[i]["popularity"], reverse=True),
        sorted([i for i, d in corpus.items() if {"group1", "intro"} & set(d.get("tags", []))],
               key=lambda i: corpus[i]["popularity"]),
    ]
    for number, (search_body, answer, want) in enumerate(zip(bodies, responses, wants)):
        check(answer.get("status") == 200, f"msearch #{number}: status {answer.get('status')}: {answer!r}")
        got_ids = [hit["_id"] for hit in answer["hits"]["hits"]]
        check(got_ids == want, f"msearch #{number}: {got_ids}, want {want}")
        searches[f"msearch_{number}"] = {
            "body": search_body,
            "ordered": True,
            "ids": got_ids,
            "total": answer["hits"]["total"]["value"],
            "aggregations": normalize_aggregations(answer.get("aggregations")),
        }

    step("every node answers the same search")
    probe = {"query": {"match": {"body": "harbor"}}, "sort": [{"popularity": "asc"}], "size": 200}
    answers = [ids_of(node.search(index=INDEX, **probe)) for node in per_node]
    check(answers[0] == answers[1] == answers[2] and answers[0], f"nodes disagree on {probe}: {answers}")
    searches["probe"] = {
        "body": probe,
        "ordered": True,
        "ids": answers[0],
        "total": len(answers[0]),
        "aggregations": {},
    }

    for node in per_node:
        node.close()
    es.close()
    print(json.dumps({"searches": searches, "counts": counts}, sort_keys=True))


def report_failures():
    for number, failure in enumerate(FAILURES, 1):
        print(f"ES CLIENT CHECK FAILED ({number}/{len(FAILURES)}): {failure}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as failure:
        report_failures()
        print(f"ES CLIENT CHECK FAILED: {failure}", file=sys.stderr)
        sys.exit(1)
    except Exception:  # an unexpected exception from the client is a failure too
        report_failures()
        print("ES CLIENT CHECK FAILED with an exception:", file=sys.stderr)
        traceback.print_exc()
        sys.exit(2)
    if FAILURES:
        report_failures()
        sys.exit(1)
