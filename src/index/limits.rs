//! Bounds on what one search may cost, checked before tantivy sees the request.
//!
//! tantivy's query parser recurses once per nested group: a query of a few thousand `(` is
//! enough to overflow the stack of the thread that parses it, which aborts the whole process.
//! Its cost also grows with the number of clauses, and a search's with the number of facet
//! prefixes. So the text is measured here first, in one pass and without recursion, and a request
//! over a bound is refused with `invalid_query` (or `invalid_search_request`) naming the bound.
//!
//! The search itself runs under a time budget: [`SearchBudget`] is checked while documents are
//! collected, and a search past it stops with [`IndexError::DeadlineExceeded`].

use std::time::Instant;

use tantivy::collector::{Collector, SegmentCollector};

use super::IndexError;

/// The bounds a node applies to every search (flags of `bayard serve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryLimits {
    /// Longest query text, in bytes.
    pub max_query_bytes: usize,
    /// Deepest nesting of parentheses.
    pub max_query_depth: usize,
    /// Most terms and operators (whitespace- or parenthesis-separated words).
    pub max_query_terms: usize,
    /// Most facet prefixes, over all facet fields of one request.
    pub max_facet_prefixes: usize,
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits { max_query_bytes: 16 * 1024, max_query_depth: 32, max_query_terms: 1024, max_facet_prefixes: 256 }
    }
}

/// The most terms a node can be configured with (each `NOT` of a chain nests as well).
pub const HARD_MAX_QUERY_TERMS: usize = 65_536;

/// The deepest nesting a node can be configured with. The parser's stack use per level was
/// measured (about 1 KiB; 3,000 levels overflowed the 2 MiB of a tokio thread): 256 levels parse
/// on a thread with a 1 MiB stack (see the tests), half of what a tokio blocking thread has, so
/// no setting of the flag can overflow a stack.
pub const HARD_MAX_QUERY_DEPTH: usize = 256;

/// What a query text looks like to the bounds: its nesting depth and number of words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueryShape {
    pub depth: usize,
    pub terms: usize,
}

/// Measures a query text in one pass, without trying to follow tantivy's grammar (it has `"…"`
/// and `'…'` phrases and `/…/` regexes, and what is quoted where is exactly what an attacker
/// would play with). So it over-counts on purpose: every `(` nests, quoted or not, and so does
/// every `NOT` of a chain (`NOT NOT NOT a` recurses too); words are runs of characters between
/// whitespace and parentheses. Over-counting only refuses odd queries earlier; under-counting
/// could abort the process.
pub fn query_shape(text: &str) -> QueryShape {
    let mut shape = QueryShape::default();
    let mut depth = 0_usize;
    let mut negations = 0_usize;
    let mut word = String::new();
    let end_word = |word: &mut String, shape: &mut QueryShape, negations: &mut usize, depth: usize| {
        if word.is_empty() {
            return;
        }
        shape.terms += 1;
        if word == "NOT" {
            *negations += 1;
            shape.depth = shape.depth.max(depth + *negations);
        } else {
            *negations = 0;
        }
        word.clear();
    };
    for character in text.chars() {
        match character {
            '(' => {
                end_word(&mut word, &mut shape, &mut negations, depth);
                depth += 1;
                shape.depth = shape.depth.max(depth + negations);
            }
            ')' => {
                end_word(&mut word, &mut shape, &mut negations, depth);
                depth = depth.saturating_sub(1);
            }
            other if other.is_whitespace() => end_word(&mut word, &mut shape, &mut negations, depth),
            other => {
                // Only the first characters matter for "is it NOT"; a long word costs no memory.
                if word.len() < 4 {
                    word.push(other);
                } else if word.len() == 4 {
                    word.push('_');
                }
            }
        }
    }
    end_word(&mut word, &mut shape, &mut negations, depth);
    shape
}

/// Refuses a query text over the bounds, before it is parsed.
pub fn check_query_bounds(text: &str, limits: &QueryLimits) -> Result<(), IndexError> {
    if text.len() > limits.max_query_bytes {
        return Err(IndexError::InvalidQuery(format!(
            "the query is {} bytes, over the limit of {} (--max-query-bytes)",
            text.len(),
            limits.max_query_bytes
        )));
    }
    let shape = query_shape(text);
    let max_depth = limits.max_query_depth.min(HARD_MAX_QUERY_DEPTH);
    if shape.depth > max_depth {
        return Err(IndexError::InvalidQuery(format!(
            "the query nests parentheses {} deep, over the limit of {max_depth} (--max-query-depth)",
            shape.depth
        )));
    }
    let max_terms = limits.max_query_terms.min(HARD_MAX_QUERY_TERMS);
    if shape.terms > max_terms {
        return Err(IndexError::InvalidQuery(format!(
            "the query has {} terms, over the limit of {max_terms} (--max-query-terms)",
            shape.terms
        )));
    }
    Ok(())
}

/// When a search must stop. `None` means no budget (tests, tools).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SearchBudget {
    pub deadline: Option<Instant>,
}

impl SearchBudget {
    pub fn until(deadline: Instant) -> Self {
        SearchBudget { deadline: Some(deadline) }
    }

    pub fn unlimited() -> Self {
        SearchBudget { deadline: None }
    }

    pub fn expired(&self) -> bool {
        self.deadline.is_some_and(|deadline| Instant::now() >= deadline)
    }
}

/// Runs the inner collector segment by segment, document by document, and stops with an error
/// once the budget is spent: tantivy has no cancellation of its own, and a search that nobody
/// waits for any more must not keep a core busy.
pub(super) struct WithinBudget<C> {
    pub inner: C,
    pub budget: SearchBudget,
}

/// Documents between two looks at the clock.
const DOCUMENTS_PER_BUDGET_CHECK: u32 = 4096;

fn budget_spent() -> tantivy::TantivyError {
    tantivy::TantivyError::InternalError("search time budget spent".to_string())
}

impl<C: Collector> Collector for WithinBudget<C> {
    type Fruit = C::Fruit;
    type Child = C::Child;

    fn for_segment(&self, segment_ord: u32, reader: &tantivy::SegmentReader) -> tantivy::Result<Self::Child> {
        self.inner.for_segment(segment_ord, reader)
    }

    fn requires_scoring(&self) -> bool {
        self.inner.requires_scoring()
    }

    fn merge_fruits(
        &self,
        segment_fruits: Vec<<Self::Child as SegmentCollector>::Fruit>,
    ) -> tantivy::Result<Self::Fruit> {
        self.inner.merge_fruits(segment_fruits)
    }

    fn collect_segment(
        &self,
        weight: &dyn tantivy::query::Weight,
        segment_ord: u32,
        reader: &tantivy::SegmentReader,
    ) -> tantivy::Result<<Self::Child as SegmentCollector>::Fruit> {
        if self.budget.deadline.is_none() {
            return self.inner.collect_segment(weight, segment_ord, reader);
        }
        if self.budget.expired() {
            return Err(budget_spent());
        }
        let mut segment_collector = self.inner.for_segment(segment_ord, reader)?;
        let mut scorer = weight.scorer(reader, 1.0)?;
        let alive = reader.alive_bitset();
        let scoring = self.inner.requires_scoring();
        let mut since_check = 0_u32;
        let mut document = tantivy::DocSet::doc(&scorer);
        while document != tantivy::TERMINATED {
            if alive.is_none_or(|alive| alive.is_alive(document)) {
                let score = if scoring { tantivy::query::Scorer::score(&mut scorer) } else { 0.0 };
                segment_collector.collect(document, score);
            }
            since_check += 1;
            if since_check == DOCUMENTS_PER_BUDGET_CHECK {
                since_check = 0;
                if self.budget.expired() {
                    return Err(budget_spent());
                }
            }
            document = tantivy::DocSet::advance(&mut scorer);
        }
        Ok(segment_collector.harvest())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_from_a_table_of_queries() {
        let cases: &[(&str, usize, usize)] = &[
            ("", 0, 0),
            ("hello", 0, 1),
            ("title:hello world", 0, 2),
            ("(a OR b) AND c", 1, 5),
            ("((a))", 2, 1),
            ("\"((( quoted )))\"", 3, 3),
            ("'\"' (((a)))", 3, 2),
            ("title:/\"/ ((a))", 2, 2),
            ("NOT NOT NOT a", 3, 4),
            ("a NOT b NOT c", 1, 5),
            ("(NOT (NOT a))", 4, 3),
            ("a\\(b", 1, 2),
            (")))(((", 3, 0),
            ("year:[2000 TO 2010]", 0, 3),
            ("((a) (b (c)))", 3, 3),
        ];
        for (text, depth, terms) in cases {
            assert_eq!(query_shape(text), QueryShape { depth: *depth, terms: *terms }, "query {text:?}");
        }
    }

    #[test]
    fn bounds_refuse_with_the_flag_named() {
        let limits =
            QueryLimits { max_query_bytes: 100, max_query_depth: 3, max_query_terms: 4, max_facet_prefixes: 1 };
        let cases: &[(&str, Option<&str>)] = &[
            ("a b c d", None),
            ("a b c d e", Some("--max-query-terms")),
            ("(((a)))", None),
            ("((((a))))", Some("--max-query-depth")),
            ("((((a", Some("--max-query-depth")),
            (&"x".repeat(101), Some("--max-query-bytes")),
        ];
        for (text, refusal) in cases {
            let outcome = check_query_bounds(text, &limits);
            match refusal {
                None => assert!(outcome.is_ok(), "{text:?}: {outcome:?}"),
                Some(flag) => {
                    let message = outcome.expect_err(text).to_string();
                    assert!(message.starts_with("invalid query:") && message.contains(flag), "{text:?}: {message}");
                }
            }
        }
    }

    #[test]
    fn the_depth_limit_is_capped_by_the_hard_maximum() {
        let limits = QueryLimits { max_query_depth: usize::MAX, ..QueryLimits::default() };
        let text = format!("{}a{}", "(".repeat(HARD_MAX_QUERY_DEPTH + 1), ")".repeat(HARD_MAX_QUERY_DEPTH + 1));
        assert!(check_query_bounds(&text, &QueryLimits { max_query_bytes: 1 << 20, ..limits }).is_err());
    }

    #[test]
    fn budgets_expire() {
        assert!(!SearchBudget::unlimited().expired());
        assert!(SearchBudget::until(Instant::now()).expired());
        assert!(!SearchBudget::until(Instant::now() + std::time::Duration::from_secs(60)).expired());
    }
}
