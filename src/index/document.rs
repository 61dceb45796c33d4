//! Conversion between JSON documents and tantivy documents.
//!
//! tantivy's own `TantivyDocument::parse_json` silently ignores unknown fields and panics on a
//! facet that does not start with `/`, so documents are checked field by field here before
//! any value reaches tantivy.

use serde_json::{Map, Value as JsonValue};
use tantivy::schema::document::Document as _;
use tantivy::schema::{Facet, FieldType, OwnedValue, Schema};
use tantivy::TantivyDocument;

use super::{IndexError, ID_FIELD};

/// Longest accepted `_id`, in bytes. Ids are indexed as one term; a term that tantivy cannot
/// index would make the document impossible to update or delete.
pub const MAX_ID_BYTES: usize = 512;

/// Longest excerpt of an offending value quoted in an error message.
const MAX_QUOTED_VALUE_CHARS: usize = 80;

/// Checks that an id can be used as `_id`.
pub(crate) fn check_document_id(id: &str) -> Result<(), IndexError> {
    if id.is_empty() {
        return Err(IndexError::InvalidDocument(format!("`{ID_FIELD}` must not be empty")));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(IndexError::InvalidDocument(format!(
            "`{ID_FIELD}` is {} bytes long; the maximum is {MAX_ID_BYTES} bytes",
            id.len()
        )));
    }
    Ok(())
}

/// Parses a document: it must be valid JSON and a JSON object.
pub(crate) fn parse_json_object(document_json: &str) -> Result<Map<String, JsonValue>, IndexError> {
    let value: JsonValue = serde_json::from_str(document_json)
        .map_err(|error| IndexError::InvalidDocument(format!("the document is not valid JSON: {error}")))?;
    match value {
        JsonValue::Object(object) => Ok(object),
        other => Err(IndexError::InvalidDocument(format!(
            "the document must be a JSON object, got {}",
            describe_json_value(&other)
        ))),
    }
}

/// Reads the `_id` of a document object, if any; it must be a non-empty string.
pub(crate) fn embedded_document_id(object: &Map<String, JsonValue>) -> Result<Option<String>, IndexError> {
    let Some(id_value) = object.get(ID_FIELD) else {
        return Ok(None);
    };
    let JsonValue::String(id) = id_value else {
        return Err(IndexError::InvalidDocument(format!(
            "`{ID_FIELD}` must be a string, got {}",
            describe_json_value(id_value)
        )));
    };
    check_document_id(id)?;
    Ok(Some(id.clone()))
}

/// Converts a document object into a tantivy document, rejecting unknown fields and values of
/// the wrong type. The object is expected to contain `_id` already.
///
/// The object is consumed: its strings move into the document instead of being copied.
pub(crate) fn build_tantivy_document(
    schema: &Schema,
    object: Map<String, JsonValue>,
) -> Result<TantivyDocument, IndexError> {
    let mut document = TantivyDocument::default();
    for (field_name, json_value) in object {
        let field = schema
            .get_field(&field_name)
            .map_err(|_| IndexError::InvalidDocument(format!("unknown field `{field_name}` in document")))?;
        let field_type = schema.get_field_entry(field).field_type();
        // A JSON array means "several values for this field"; the items themselves may not be
        // arrays again, as tantivy has no nested multi-values.
        let items: Vec<JsonValue> = match json_value {
            JsonValue::Array(items) => items,
            single_value => vec![single_value],
        };
        for item in items {
            if item.is_array() {
                return Err(IndexError::InvalidDocument(format!(
                    "field `{field_name}` contains a nested array, which is not supported"
                )));
            }
            let owned_value = convert_owned_json_value(&field_name, field_type, item)?;
            document.add_field_value(field, &owned_value);
        }
    }
    Ok(document)
}

/// What a field of this type accepts, phrased for error messages; `None` for fields that can
/// never be set from JSON.
fn expected_value_description(field_type: &FieldType) -> Option<&'static str> {
    match field_type {
        FieldType::Str(_) => Some("a string"),
        FieldType::U64(_) => Some("a non-negative integer"),
        FieldType::I64(_) => Some("an integer"),
        FieldType::F64(_) => Some("a number"),
        FieldType::Bool(_) => Some("a boolean"),
        FieldType::Date(_) => Some(
            "an RFC 3339 date string between 1677-09-21 and 2262-04-11 (e.g. \
             \"2024-01-31T12:00:00Z\")",
        ),
        FieldType::Facet(_) => Some("a facet path string starting with `/` (e.g. \"/category/books\")"),
        FieldType::Bytes(_) => Some("a base64 string"),
        FieldType::JsonObject(_) => Some("a JSON object"),
        FieldType::IpAddr(_) => Some("an IP address string"),
        FieldType::TieBreaker | FieldType::Custom(_) => None,
    }
}

/// Whether the JSON kind of `value` fits the field type. The exact content (date syntax,
/// base64, integer range) is checked afterwards by tantivy's own conversion.
fn json_kind_fits(field_type: &FieldType, value: &JsonValue) -> bool {
    match field_type {
        FieldType::Str(options) => {
            value.is_string() || (options.should_coerce() && (value.is_number() || value.is_boolean()))
        }
        FieldType::U64(options) => value.as_u64().is_some() || (options.should_coerce() && value.is_string()),
        FieldType::I64(options) => value.as_i64().is_some() || (options.should_coerce() && value.is_string()),
        FieldType::F64(options) => value.is_number() || (options.should_coerce() && value.is_string()),
        FieldType::Bool(options) => value.is_boolean() || (options.should_coerce() && value.is_string()),
        // tantivy would turn a number into an i64 value inside a date field; only accept
        // the unambiguous RFC 3339 form.
        FieldType::Date(_) => value.is_string(),
        // A facet string without a leading `/` makes tantivy panic, so it is parsed here.
        FieldType::Facet(_) => value.as_str().is_some_and(|text| Facet::from_text(text).is_ok()),
        FieldType::Bytes(_) | FieldType::IpAddr(_) => value.is_string(),
        FieldType::JsonObject(_) => value.is_object(),
        FieldType::TieBreaker | FieldType::Custom(_) => false,
    }
}

pub(crate) fn convert_json_value(
    field_name: &str,
    field_type: &FieldType,
    value: &JsonValue,
) -> Result<OwnedValue, IndexError> {
    let Some(expected) = expected_value_description(field_type) else {
        return Err(IndexError::InvalidDocument(format!(
            "field `{field_name}` is generated by the index and cannot be set in a document"
        )));
    };
    let type_error = || {
        IndexError::InvalidDocument(format!(
            "field `{field_name}` expects {expected}, got {}",
            describe_json_value(value)
        ))
    };
    if !json_kind_fits(field_type, value) {
        return Err(type_error());
    }
    field_type.value_from_json(value.clone()).map_err(|_| type_error())
}

/// [`convert_json_value`] for a value the caller gives up: a string for a text field (the bulk
/// of every document) moves into the tantivy value instead of being copied.
fn convert_owned_json_value(
    field_name: &str,
    field_type: &FieldType,
    value: JsonValue,
) -> Result<OwnedValue, IndexError> {
    match (field_type, value) {
        (FieldType::Str(_), JsonValue::String(text)) => Ok(OwnedValue::Str(text)),
        (_, other) => convert_json_value(field_name, field_type, &other),
    }
}

/// Describes a JSON value for error messages: its kind and a short excerpt.
pub(crate) fn describe_json_value(value: &JsonValue) -> String {
    match value {
        JsonValue::Null => "null".to_string(),
        JsonValue::Bool(boolean) => format!("boolean {boolean}"),
        JsonValue::Number(number) => format!("number {number}"),
        JsonValue::String(text) => {
            let excerpt: String = text.chars().take(MAX_QUOTED_VALUE_CHARS).collect();
            let ellipsis = if excerpt.len() < text.len() { "..." } else { "" };
            format!("string {excerpt:?}{ellipsis}")
        }
        JsonValue::Array(_) => "an array".to_string(),
        JsonValue::Object(_) => "an object".to_string(),
    }
}

/// A stored document split into its `_id` and its other stored fields as a JSON object.
pub(crate) struct RenderedDocument {
    pub id: String,
    pub fields_json: String,
}

/// Renders the stored fields of a document: single values as scalars, several values as an
/// array, `_id` apart.
pub(crate) fn render_stored_document(
    schema: &Schema,
    document: &TantivyDocument,
) -> Result<RenderedDocument, IndexError> {
    let named_document = document.to_named_doc(schema);
    let mut id: Option<String> = None;
    let mut fields = Map::new();
    for (field_name, mut values) in named_document.0 {
        if field_name == ID_FIELD {
            if let Some(OwnedValue::Str(stored_id)) = values.first() {
                id = Some(stored_id.clone());
            }
            continue;
        }
        let rendered_value = if values.len() == 1 {
            let single_value = values.remove(0);
            owned_value_to_json(&field_name, &single_value)?
        } else {
            let rendered_items = values
                .iter()
                .map(|value| owned_value_to_json(&field_name, value))
                .collect::<Result<Vec<JsonValue>, IndexError>>()?;
            JsonValue::Array(rendered_items)
        };
        fields.insert(field_name, rendered_value);
    }
    let Some(id) = id else {
        return Err(IndexError::Internal(format!("a stored document has no `{ID_FIELD}` value")));
    };
    let fields_json = serde_json::to_string(&JsonValue::Object(fields))
        .map_err(|error| IndexError::Internal(format!("cannot render document `{id}` as JSON: {error}")))?;
    Ok(RenderedDocument { id, fields_json })
}

/// Renders one tantivy value as JSON (dates as RFC 3339 strings, facets as paths, bytes as
/// base64), relying on `OwnedValue`'s serde implementation.
pub(crate) fn owned_value_to_json(field_name: &str, value: &OwnedValue) -> Result<JsonValue, IndexError> {
    serde_json::to_value(value).map_err(|error| {
        IndexError::Internal(format!("cannot render a value of field `{field_name}` as JSON: {error}"))
    })
}
