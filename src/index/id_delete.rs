//! Deleting by `_id`, the delete half of every upsert.
//!
//! tantivy's `IndexWriter::delete_term` wraps the term in a `TermQuery` and asks it for a weight
//! with scoring disabled, which still builds a BM25 weight: a 256-entry table of term-frequency
//! factors (1 KiB, behind an `Arc`) and an explanation string, computed once per delete in
//! `weight()` and kept in the delete queue until every segment has seen the delete; each segment
//! it is applied to clones the explanation and the `Arc`. A bulk load deletes before every add, so
//! that was a kilobyte and a table computation per document for a query that never scores.
//! [`IdDeletion`] matches the same documents (the postings of the term, read with `Basic`, as
//! tantivy's own delete reads them) with nothing to score.
//!
//! It goes in through `IndexWriter::delete_query`, which tantivy marks `#[doc(hidden)]` but keeps
//! public and calls from its own `delete_term`; the test below pins the two to the same result, so
//! a tantivy upgrade that changes either shows up there.

use tantivy::query::{ConstScorer, EmptyScorer, EnableScoring, Explanation, Query, Scorer, Weight};
use tantivy::schema::IndexRecordOption;
use tantivy::{DocId, DocSet, Score, SegmentReader, TantivyError, Term};

/// Matches every document whose indexed `_id` is `term`; only for `IndexWriter::delete_query`.
#[derive(Clone, Debug)]
pub(super) struct IdDeletion {
    term: Term,
}

impl IdDeletion {
    pub(super) fn new(term: Term) -> IdDeletion {
        IdDeletion { term }
    }
}

impl Query for IdDeletion {
    fn weight(&self, _scoring: EnableScoring<'_>) -> tantivy::Result<Box<dyn Weight>> {
        Ok(Box::new(IdDeletionWeight { term: self.term.clone() }))
    }
}

struct IdDeletionWeight {
    term: Term,
}

impl Weight for IdDeletionWeight {
    fn scorer(&self, reader: &SegmentReader, boost: Score) -> tantivy::Result<Box<dyn Scorer>> {
        let inverted_index = reader.inverted_index(self.term.field())?;
        Ok(match inverted_index.read_postings(&self.term, IndexRecordOption::Basic)? {
            Some(postings) => Box::new(ConstScorer::new(postings, boost)),
            None => Box::new(EmptyScorer),
        })
    }

    fn explain(&self, reader: &SegmentReader, doc: DocId) -> tantivy::Result<Explanation> {
        if doc >= reader.max_doc() {
            return Err(TantivyError::InvalidArgument(format!("document {doc} is not in this segment")));
        }
        let mut scorer = self.scorer(reader, 1.0)?;
        // `seek` may only move forward (tantivy debug-asserts it): a scorer already past `doc`,
        // including the empty one, whose current document is TERMINATED, does not match it.
        if scorer.doc() <= doc && scorer.seek(doc) == doc {
            Ok(Explanation::new("_id matches", 1.0))
        } else {
            Err(TantivyError::InvalidArgument(format!("document {doc} does not have this _id")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tantivy::collector::Count;
    use tantivy::indexer::NoMergePolicy;
    use tantivy::query::TermQuery;
    use tantivy::schema::{Field, Schema, STORED, STRING, TEXT};
    use tantivy::{doc, Index, IndexWriter};

    fn schema() -> (Schema, Field, Field) {
        let mut schema = Schema::builder();
        let id = schema.add_text_field("_id", STRING | STORED);
        let body = schema.add_text_field("body", TEXT);
        (schema.build(), id, body)
    }

    /// The same documents as tantivy's own delete of the term, in every place a document can be:
    /// committed segments (one id across several of them, a segment of one document and one where
    /// every document has the id, which tantivy's term weight answers with its match-all
    /// shortcut), the segment being written, before and after the delete, absent ids.
    #[test]
    fn deletes_what_tantivys_term_delete_deletes() {
        let (schema, id, body) = schema();
        let survivors = |use_ours: bool| -> Vec<(String, usize)> {
            let index = Index::create_in_ram(schema.clone());
            let mut writer: IndexWriter = index.writer_with_num_threads(1, 15_000_000).unwrap();
            // Segments stay as committed, so the one-document and all-one-id segments exist
            // when the deletes reach them: three segments are below the default policy's
            // threshold too, but the test should not depend on that.
            writer.set_merge_policy(Box::new(NoMergePolicy));
            let delete = |writer: &IndexWriter, value: &str| {
                let term = Term::from_field_text(id, value);
                if use_ours {
                    writer.delete_query(Box::new(IdDeletion::new(term))).unwrap();
                } else {
                    writer.delete_term(term);
                }
            };
            for number in 0..50 {
                writer.add_document(doc!(id => format!("a{}", number % 10), body => "old")).unwrap();
            }
            writer.commit().unwrap();
            writer.add_document(doc!(id => "solo", body => "alone")).unwrap();
            writer.commit().unwrap();
            for _ in 0..3 {
                writer.add_document(doc!(id => "a1", body => "again")).unwrap();
            }
            writer.commit().unwrap();
            let reader = index.reader().unwrap();
            let mut sizes: Vec<u32> =
                reader.searcher().segment_readers().iter().map(|segment| segment.max_doc()).collect();
            sizes.sort_unstable();
            assert_eq!(sizes, vec![1, 3, 50], "the segments the deletes are meant to meet");
            // Committed documents in two segments, a whole segment, one of one document, an id
            // never seen.
            delete(&writer, "a1");
            delete(&writer, "a2");
            delete(&writer, "solo");
            delete(&writer, "nobody");
            // Added after a delete of its id, then deleted again in the same segment.
            writer.add_document(doc!(id => "a1", body => "new")).unwrap();
            writer.add_document(doc!(id => "b", body => "new")).unwrap();
            delete(&writer, "b");
            writer.add_document(doc!(id => "b", body => "newer")).unwrap();
            writer.commit().unwrap();
            reader.reload().unwrap();
            let searcher = reader.searcher();
            let mut counts: Vec<(String, usize)> = ["a0", "a1", "a2", "a3", "b", "solo", "nobody"]
                .iter()
                .map(|value| {
                    let query = TermQuery::new(Term::from_field_text(id, value), IndexRecordOption::Basic);
                    (value.to_string(), searcher.search(&query, &Count).unwrap())
                })
                .collect();
            counts.push(("all".to_string(), searcher.num_docs() as usize));
            counts
        };
        let tantivys = survivors(false);
        assert_eq!(
            tantivys,
            vec![
                ("a0".to_string(), 5),
                ("a1".to_string(), 1),
                ("a2".to_string(), 0),
                ("a3".to_string(), 5),
                ("b".to_string(), 1),
                ("solo".to_string(), 0),
                ("nobody".to_string(), 0),
                ("all".to_string(), 42)
            ]
        );
        assert_eq!(survivors(true), tantivys);
    }

    /// `explain` says which documents match without walking a scorer backwards: documents before
    /// the first match, between matches, after the last, and an id with no postings at all.
    #[test]
    fn explains_a_match_and_refuses_every_other_document() {
        let (schema, id, body) = schema();
        let index = Index::create_in_ram(schema.clone());
        let mut writer: IndexWriter = index.writer_with_num_threads(1, 15_000_000).unwrap();
        for value in ["p", "x", "q", "x", "r"] {
            writer.add_document(doc!(id => value, body => "text")).unwrap();
        }
        writer.commit().unwrap();
        let searcher = index.reader().unwrap().searcher();
        let segment = searcher.segment_reader(0);
        let weight_for = |value: &str| {
            IdDeletion::new(Term::from_field_text(id, value))
                .weight(EnableScoring::disabled_from_schema(&schema))
                .unwrap()
        };
        let x = weight_for("x");
        let matched: Vec<bool> = (0..5).map(|doc| x.explain(segment, doc).is_ok()).collect();
        assert_eq!(matched, vec![false, true, false, true, false]);
        let absent = weight_for("absent");
        assert!((0..5).all(|doc| absent.explain(segment, doc).is_err()));
        // Past the segment, TERMINATED included (the empty scorer's own position).
        for beyond in [5, tantivy::TERMINATED] {
            assert!(x.explain(segment, beyond).is_err() && absent.explain(segment, beyond).is_err());
        }
    }
}
