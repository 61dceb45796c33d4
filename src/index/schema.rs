//! Loading and checking the schema file (tantivy's own schema JSON).

use std::collections::HashSet;

use tantivy::schema::{FieldEntry, FieldType, Schema, SchemaBuilder, STORED, STRING};
use tantivy::tokenizer::RAW_TOKENIZER_NAME;

use super::{IndexError, ID_FIELD};

/// A schema file's content: the schema, and the fields a query searches when it names none.
#[derive(Debug, Clone)]
pub struct SchemaFile {
    pub schema: Schema,
    /// Fields and boosts (`title^2`) searched by terms that name no field, when the file sets
    /// them; otherwise every indexed text field but `_id`, unboosted.
    pub default_search_fields: Option<Vec<(String, f32)>>,
}

/// Parses a schema file: either a JSON array of tantivy field entries (exactly what
/// `serde_json::to_string(&schema)` produces), or an object
/// `{"fields": [...], "default_search_fields": ["title^2", "body"]}` that also sets the default
/// search fields and their boosts. Adds the `_id` field (raw, indexed, stored) when the file does
/// not declare it.
pub fn load_schema_file(json: &str) -> Result<SchemaFile, IndexError> {
    let invalid = |error: serde_json::Error| IndexError::InvalidSchema(format!("cannot parse the schema: {error}"));
    let value: serde_json::Value = serde_json::from_str(json).map_err(invalid)?;
    let (fields, default_search_fields) = match value {
        serde_json::Value::Object(mut object) => {
            let fields = object.remove("fields").ok_or_else(|| {
                IndexError::InvalidSchema("a schema object needs `fields`, the list of field entries".to_string())
            })?;
            let defaults = match object.remove("default_search_fields") {
                None => None,
                Some(serde_json::Value::Array(items)) => {
                    let names: Option<Vec<&str>> = items.iter().map(serde_json::Value::as_str).collect();
                    let names = names.ok_or_else(|| {
                        IndexError::InvalidSchema("`default_search_fields` is a list of field names".to_string())
                    })?;
                    let parsed = super::parse_field_boosts(&names.join(","))
                        .map_err(|error| IndexError::InvalidSchema(format!("`default_search_fields`: {error}")))?;
                    Some(parsed)
                }
                Some(_) => {
                    return Err(IndexError::InvalidSchema(
                        "`default_search_fields` is a list of field names, e.g. [\"title^2\", \"body\"]".to_string(),
                    ))
                }
            };
            if let Some(key) = object.keys().next() {
                return Err(IndexError::InvalidSchema(format!(
                    "unknown key `{key}` in the schema object; it has `fields` and `default_search_fields`"
                )));
            }
            (fields, defaults)
        }
        array => (array, None),
    };
    let schema = schema_from_entries(fields)?;
    Ok(SchemaFile { schema, default_search_fields })
}

/// Parses a schema file and returns the schema alone (see [`load_schema_file`]).
pub fn load_schema(json: &str) -> Result<Schema, IndexError> {
    Ok(load_schema_file(json)?.schema)
}

fn schema_from_entries(fields: serde_json::Value) -> Result<Schema, IndexError> {
    // Deserialize the entries ourselves instead of `Schema` directly: tantivy's schema
    // builder panics on a duplicated field name, and a file must never be able to panic us.
    let field_entries: Vec<FieldEntry> = serde_json::from_value(fields)
        .map_err(|error| IndexError::InvalidSchema(format!("cannot parse the schema: {error}")))?;
    if field_entries.is_empty() {
        return Err(IndexError::InvalidSchema("the schema declares no field".to_string()));
    }

    let mut seen_field_names: HashSet<&str> = HashSet::new();
    for field_entry in &field_entries {
        let field_name = field_entry.name();
        if !tantivy::schema::is_valid_field_name(field_name) {
            return Err(IndexError::InvalidSchema(format!(
                "field name `{field_name}` is invalid: it must be non-empty and must not start \
                 with `-`"
            )));
        }
        if !seen_field_names.insert(field_name) {
            return Err(IndexError::InvalidSchema(format!("field `{field_name}` is declared more than once")));
        }
        if field_entry.field_type().is_custom() {
            return Err(IndexError::InvalidSchema(format!(
                "field `{field_name}` has a custom type, which needs a tantivy plugin and cannot \
                 be filled from JSON documents"
            )));
        }
    }
    let declares_id_field = seen_field_names.contains(ID_FIELD);

    let mut schema_builder = SchemaBuilder::new();
    for field_entry in field_entries {
        schema_builder.add_field(field_entry);
    }
    if !declares_id_field {
        schema_builder.add_text_field(ID_FIELD, STRING | STORED);
    }
    let schema = schema_builder.build();
    check_id_field(&schema)?;
    Ok(schema)
}

/// Checks that `_id` exists and is a stored text field indexed with the raw tokenizer: upserts
/// and deletes look documents up by the exact `_id` term, and `get`/search results read it
/// back from the store.
pub fn check_id_field(schema: &Schema) -> Result<(), IndexError> {
    let id_field = schema.get_field(ID_FIELD).map_err(|_| {
        IndexError::InvalidSchema(format!(
            "the schema has no `{ID_FIELD}` field (load the schema with `load_schema`, which \
             adds it)"
        ))
    })?;
    let field_entry = schema.get_field_entry(id_field);
    let FieldType::Str(text_options) = field_entry.field_type() else {
        return Err(IndexError::InvalidSchema(format!(
            "field `{ID_FIELD}` must be a text field, but it is of type {}",
            field_entry.field_type().value_type().name()
        )));
    };
    let Some(indexing) = text_options.get_indexing_options() else {
        return Err(IndexError::InvalidSchema(format!(
            "field `{ID_FIELD}` must be indexed (declare it like a `STRING | STORED` field)"
        )));
    };
    if indexing.tokenizer() != RAW_TOKENIZER_NAME {
        return Err(IndexError::InvalidSchema(format!(
            "field `{ID_FIELD}` must use the `raw` tokenizer so that each id is a single term, \
             but it uses `{}`",
            indexing.tokenizer()
        )));
    }
    if !text_options.is_stored() {
        return Err(IndexError::InvalidSchema(format!("field `{ID_FIELD}` must be stored")));
    }
    Ok(())
}

/// Describes how two schemas differ, field by field, for the schema mismatch error.
pub(crate) fn describe_schema_differences(existing: &Schema, requested: &Schema) -> String {
    let mut differences: Vec<String> = Vec::new();
    for (_field, existing_entry) in existing.fields() {
        match requested.get_field(existing_entry.name()) {
            Err(_) => differences
                .push(format!("field `{}` exists in the index but not in the schema file", existing_entry.name())),
            Ok(requested_field) => {
                let requested_entry = requested.get_field_entry(requested_field);
                if requested_entry != existing_entry {
                    differences.push(format!("field `{}` has different options", existing_entry.name()));
                }
            }
        }
    }
    for (_field, requested_entry) in requested.fields() {
        if existing.get_field(requested_entry.name()).is_err() {
            differences.push(format!("field `{}` is in the schema file but not in the index", requested_entry.name()));
        }
    }
    if differences.is_empty() {
        // Same fields with the same options, so only their order differs; tantivy identifies
        // fields by position, hence this still counts as a different schema.
        differences.push("the fields are declared in a different order".to_string());
    }
    differences.join("; ")
}
