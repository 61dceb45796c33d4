//! Named analyzers (tokenizer + token filters) declared in the tokenizer file.
//!
//! tantivy stores only the *name* of a field's tokenizer in the index, never the tokenizer
//! itself, so every analyzer must be registered again each time the index is opened. The
//! tokenizer file is the single source of truth for those definitions.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tantivy::schema::{FieldType, Schema};
use tantivy::tokenizer::{
    AlphaNumOnlyFilter, AsciiFoldingFilter, FacetTokenizer, Language, LowerCaser, NgramTokenizer, RawTokenizer,
    RemoveLongFilter, SimpleTokenizer, Stemmer, StopWordFilter, TextAnalyzer, TextAnalyzerBuilder, TokenizerManager,
    WhitespaceTokenizer,
};

use super::IndexError;

/// Tokenizer names that tantivy registers by itself in every `TokenizerManager`.
/// Declared analyzers may not reuse them: silently replacing `default` or `raw` would change
/// how existing fields (including `_id`) are indexed.
pub const BUILT_IN_TOKENIZERS: [&str; 4] = ["default", "raw", "en_stem", "whitespace"];

/// The content of the tokenizer file: analyzers by name.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalyzerConfig {
    #[serde(default)]
    pub analyzers: BTreeMap<String, AnalyzerDefinition>,
}

/// One analyzer: a tokenizer followed by token filters, applied in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalyzerDefinition {
    pub tokenizer: TokenizerDefinition,
    #[serde(default)]
    pub filters: Vec<TokenFilterDefinition>,
}

/// The tokenizers that can start an analyzer, tagged by `name`.
///
/// Parameterless variants are written `Raw {}` rather than `Raw`: serde only rejects unknown
/// keys (e.g. `min_gram` on a `simple` tokenizer, usually a mistake) for struct variants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum TokenizerDefinition {
    /// The whole text is one token.
    Raw {},
    /// Splits on every character that is not alphanumeric.
    Simple {},
    /// Splits on whitespace only.
    Whitespace {},
    /// Character n-grams of the whole text; `prefix_only` keeps only the n-grams that start
    /// the text (edge n-grams, useful for autocomplete).
    Ngram {
        min_gram: usize,
        max_gram: usize,
        #[serde(default)]
        prefix_only: bool,
    },
    /// Emits every ancestor of a facet path (`/a/b` gives `/a` and `/a/b`).
    Facet {},
}

/// The token filters, tagged by `name`. Parameterless variants are empty struct variants so
/// that unknown keys are rejected (see [`TokenizerDefinition`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum TokenFilterDefinition {
    LowerCase {},
    AsciiFolding {},
    AlphaNumOnly {},
    /// Drops tokens longer than `length_limit` bytes.
    RemoveLong {
        length_limit: usize,
    },
    Stemming {
        language: StemmingLanguage,
    },
    /// Drops the listed tokens; they are compared after the preceding filters ran, so list
    /// them lowercased when `lower_case` comes first.
    StopWord {
        words: Vec<String>,
    },
}

/// The stemming languages tantivy supports, spelled in lowercase in the tokenizer file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StemmingLanguage {
    Arabic,
    Danish,
    Dutch,
    English,
    Finnish,
    French,
    German,
    Greek,
    Hungarian,
    Italian,
    Norwegian,
    Portuguese,
    Romanian,
    Russian,
    Spanish,
    Swedish,
    Tamil,
    Turkish,
}

impl StemmingLanguage {
    fn to_tantivy_language(self) -> Language {
        match self {
            StemmingLanguage::Arabic => Language::Arabic,
            StemmingLanguage::Danish => Language::Danish,
            StemmingLanguage::Dutch => Language::Dutch,
            StemmingLanguage::English => Language::English,
            StemmingLanguage::Finnish => Language::Finnish,
            StemmingLanguage::French => Language::French,
            StemmingLanguage::German => Language::German,
            StemmingLanguage::Greek => Language::Greek,
            StemmingLanguage::Hungarian => Language::Hungarian,
            StemmingLanguage::Italian => Language::Italian,
            StemmingLanguage::Norwegian => Language::Norwegian,
            StemmingLanguage::Portuguese => Language::Portuguese,
            StemmingLanguage::Romanian => Language::Romanian,
            StemmingLanguage::Russian => Language::Russian,
            StemmingLanguage::Spanish => Language::Spanish,
            StemmingLanguage::Swedish => Language::Swedish,
            StemmingLanguage::Tamil => Language::Tamil,
            StemmingLanguage::Turkish => Language::Turkish,
        }
    }
}

impl AnalyzerConfig {
    /// Parses and validates a tokenizer file. Every analyzer is built once here so that bad
    /// parameters are reported when the file is loaded, not when the index is opened.
    pub fn from_json(json: &str) -> Result<Self, IndexError> {
        let config: AnalyzerConfig =
            serde_json::from_str(json).map_err(|error| IndexError::InvalidAnalyzers(error.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks names and parameters of every analyzer without registering anything.
    pub fn validate(&self) -> Result<(), IndexError> {
        for (analyzer_name, definition) in &self.analyzers {
            validate_analyzer_name(analyzer_name)?;
            build_text_analyzer(analyzer_name, definition)?;
        }
        Ok(())
    }

    /// The declared analyzer names, sorted.
    pub fn analyzer_names(&self) -> impl Iterator<Item = &str> {
        self.analyzers.keys().map(String::as_str)
    }

    /// Builds every analyzer and registers it under its name. Must be called on every open,
    /// because tantivy does not persist custom analyzers.
    pub fn register_into(&self, tokenizer_manager: &TokenizerManager) -> Result<(), IndexError> {
        for (analyzer_name, definition) in &self.analyzers {
            validate_analyzer_name(analyzer_name)?;
            let text_analyzer = build_text_analyzer(analyzer_name, definition)?;
            tokenizer_manager.register(analyzer_name, text_analyzer);
        }
        Ok(())
    }

    /// A `TokenizerManager` holding tantivy's built-in tokenizers plus every declared analyzer.
    pub fn tokenizer_manager(&self) -> Result<TokenizerManager, IndexError> {
        let tokenizer_manager = TokenizerManager::default();
        self.register_into(&tokenizer_manager)?;
        Ok(tokenizer_manager)
    }
}

fn validate_analyzer_name(analyzer_name: &str) -> Result<(), IndexError> {
    if analyzer_name.trim().is_empty() {
        return Err(IndexError::InvalidAnalyzers("an analyzer has an empty name".to_string()));
    }
    if BUILT_IN_TOKENIZERS.contains(&analyzer_name) {
        return Err(IndexError::InvalidAnalyzers(format!(
            "analyzer name `{analyzer_name}` is reserved for a tantivy built-in tokenizer \
             (reserved names: {})",
            BUILT_IN_TOKENIZERS.join(", ")
        )));
    }
    Ok(())
}

fn build_text_analyzer(analyzer_name: &str, definition: &AnalyzerDefinition) -> Result<TextAnalyzer, IndexError> {
    // The builder is boxed (`dynamic`) because the filter chain is only known at runtime.
    let mut builder: TextAnalyzerBuilder = match &definition.tokenizer {
        TokenizerDefinition::Raw {} => TextAnalyzer::builder(RawTokenizer::default()).dynamic(),
        TokenizerDefinition::Simple {} => TextAnalyzer::builder(SimpleTokenizer::default()).dynamic(),
        TokenizerDefinition::Whitespace {} => TextAnalyzer::builder(WhitespaceTokenizer::default()).dynamic(),
        TokenizerDefinition::Facet {} => TextAnalyzer::builder(FacetTokenizer::default()).dynamic(),
        TokenizerDefinition::Ngram { min_gram, max_gram, prefix_only } => {
            let ngram_tokenizer = build_ngram_tokenizer(analyzer_name, *min_gram, *max_gram, *prefix_only)?;
            TextAnalyzer::builder(ngram_tokenizer).dynamic()
        }
    };
    for filter in &definition.filters {
        builder = match filter {
            TokenFilterDefinition::LowerCase {} => builder.filter_dynamic(LowerCaser),
            TokenFilterDefinition::AsciiFolding {} => builder.filter_dynamic(AsciiFoldingFilter),
            TokenFilterDefinition::AlphaNumOnly {} => builder.filter_dynamic(AlphaNumOnlyFilter),
            TokenFilterDefinition::RemoveLong { length_limit } => {
                if *length_limit == 0 {
                    return Err(IndexError::InvalidAnalyzers(format!(
                        "analyzer `{analyzer_name}`: remove_long length_limit must be greater \
                         than 0 (0 would drop every token)"
                    )));
                }
                builder.filter_dynamic(RemoveLongFilter::limit(*length_limit))
            }
            TokenFilterDefinition::Stemming { language } => {
                builder.filter_dynamic(Stemmer::new(language.to_tantivy_language()))
            }
            TokenFilterDefinition::StopWord { words } => {
                builder.filter_dynamic(StopWordFilter::remove(words.iter().cloned()))
            }
        };
    }
    Ok(builder.build())
}

fn build_ngram_tokenizer(
    analyzer_name: &str,
    min_gram: usize,
    max_gram: usize,
    prefix_only: bool,
) -> Result<NgramTokenizer, IndexError> {
    // Checked here rather than relying on tantivy's error so the message names the analyzer
    // and the values.
    if min_gram == 0 {
        return Err(IndexError::InvalidAnalyzers(format!(
            "analyzer `{analyzer_name}`: ngram min_gram must be greater than 0"
        )));
    }
    if min_gram > max_gram {
        return Err(IndexError::InvalidAnalyzers(format!(
            "analyzer `{analyzer_name}`: ngram min_gram ({min_gram}) must not be greater than \
             max_gram ({max_gram})"
        )));
    }
    NgramTokenizer::new(min_gram, max_gram, prefix_only)
        .map_err(|error| IndexError::InvalidAnalyzers(format!("analyzer `{analyzer_name}`: {error}")))
}

/// Checks that every tokenizer named by the schema (indexing tokenizers of text and JSON
/// fields, and tokenizers of fast text fields) exists in the given managers. tantivy would
/// otherwise only fail when the first document reaches that field.
pub fn check_schema_tokenizers(
    schema: &Schema,
    tokenizer_manager: &TokenizerManager,
    fast_field_tokenizer_manager: &TokenizerManager,
) -> Result<(), IndexError> {
    for (_field, field_entry) in schema.fields() {
        let (indexing_tokenizer, fast_tokenizer) = match field_entry.field_type() {
            FieldType::Str(text_options) => (
                text_options.get_indexing_options().map(|indexing| indexing.tokenizer()),
                text_options.get_fast_field_tokenizer_name(),
            ),
            FieldType::JsonObject(json_options) => (
                json_options.get_text_indexing_options().map(|indexing| indexing.tokenizer()),
                json_options.get_fast_field_tokenizer_name(),
            ),
            _ => (None, None),
        };
        if let Some(tokenizer_name) = indexing_tokenizer {
            if tokenizer_manager.get(tokenizer_name).is_none() {
                return Err(undeclared_tokenizer_error(field_entry.name(), tokenizer_name));
            }
        }
        if let Some(tokenizer_name) = fast_tokenizer {
            if fast_field_tokenizer_manager.get(tokenizer_name).is_none() {
                return Err(undeclared_tokenizer_error(field_entry.name(), tokenizer_name));
            }
        }
    }
    Ok(())
}

fn undeclared_tokenizer_error(field_name: &str, tokenizer_name: &str) -> IndexError {
    IndexError::InvalidSchema(format!(
        "field `{field_name}` uses tokenizer `{tokenizer_name}`, which is not declared in the \
         tokenizer file (built-in tokenizers: {})",
        BUILT_IN_TOKENIZERS.join(", ")
    ))
}
