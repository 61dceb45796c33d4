//! A one-pass check of a document's JSON text against the schema, for the common case of a
//! valid document.
//!
//! Validating a put used to parse the text into a `serde_json` map and build a throwaway tantivy
//! document from it; in a bulk load that happened twice (once in the CLI, once on the leader)
//! before each replica parsed and built the document again to index it. This check reads the
//! text once with a schema-aware visitor and copies nothing but short non-text values.
//!
//! It is a fast path, never the judge: when it returns `None` the caller runs the full
//! conversion, which either accepts the document or names exactly what is wrong with it. The
//! one rule it must keep is that it never vouches for a document the full conversion refuses
//! (tested in `tests.rs` from tables of cases and with generated documents).

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value as JsonValue;
use tantivy::schema::{FieldType, Schema};

use super::document::{check_document_id, convert_json_value};
use super::ID_FIELD;

/// What the check found in a document it vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CheckedDocument {
    /// The document's `_id` (the last one, as a JSON map keeps the last of repeated keys).
    pub embedded_id: Option<String>,
}

/// `Some` when `document_json` is a JSON object that the full conversion accepts (with its
/// `_id` replaced by a valid id); `None` when the full conversion has to decide.
pub(crate) fn check_document_text(schema: &Schema, document_json: &str) -> Option<CheckedDocument> {
    let mut deserializer = serde_json::Deserializer::from_str(document_json);
    let embedded_id = DocumentSeed { schema }.deserialize(&mut deserializer).ok()?;
    // Trailing text after the object is refused by the full conversion too.
    deserializer.end().ok()?;
    Some(CheckedDocument { embedded_id })
}

/// The top-level object: every key a schema field, every value of a kind that field takes.
struct DocumentSeed<'schema> {
    schema: &'schema Schema,
}

impl<'de> DeserializeSeed<'de> for DocumentSeed<'_> {
    type Value = Option<String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DocumentSeed<'_> {
    type Value = Option<String>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut embedded_id = None;
        while let Some(key) = map.next_key_seed(TextSeed)? {
            let field = self.schema.get_field(&key).map_err(|_| A::Error::custom("unknown field"))?;
            if key == ID_FIELD {
                let id = map.next_value_seed(TextSeed)?;
                check_document_id(&id).map_err(|_| A::Error::custom("invalid id"))?;
                embedded_id = Some(id.into_owned());
                continue;
            }
            let field_type = self.schema.get_field_entry(field).field_type();
            map.next_value_seed(FieldValueSeed { field_name: &key, field_type, array_allowed: true })?;
        }
        Ok(embedded_id)
    }
}

/// A string, borrowed from the text when it has no escapes.
struct TextSeed;

impl<'de> DeserializeSeed<'de> for TextSeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for TextSeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a string")
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(text))
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(text.to_string()))
    }
}

/// One field's value, or (at the top) an array of values.
struct FieldValueSeed<'a> {
    field_name: &'a str,
    field_type: &'a FieldType,
    array_allowed: bool,
}

impl FieldValueSeed<'_> {
    /// The full conversion of one small value, as the slow path would run it.
    fn convert<E: serde::de::Error>(&self, value: JsonValue) -> Result<(), E> {
        convert_json_value(self.field_name, self.field_type, &value).map(drop).map_err(|_| E::custom("wrong value"))
    }

    fn text<E: serde::de::Error>(&self, text: &str) -> Result<(), E> {
        // A string always converts into a text field; only other field types need the value.
        if matches!(self.field_type, FieldType::Str(_)) {
            return Ok(());
        }
        self.convert(JsonValue::String(text.to_string()))
    }
}

impl<'de> DeserializeSeed<'de> for FieldValueSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FieldValueSeed<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a field value")
    }

    fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<(), E> {
        self.convert(JsonValue::Bool(value))
    }

    fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<(), E> {
        self.convert(JsonValue::from(value))
    }

    fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<(), E> {
        self.convert(JsonValue::from(value))
    }

    fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<(), E> {
        match serde_json::Number::from_f64(value) {
            Some(number) => self.convert(JsonValue::Number(number)),
            None => Err(E::custom("not a finite number")),
        }
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, text: &'de str) -> Result<(), E> {
        self.text(text)
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<(), E> {
        self.text(text)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        // No field type takes null.
        Err(E::custom("null"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut sequence: A) -> Result<(), A::Error> {
        if !self.array_allowed {
            return Err(A::Error::custom("nested array"));
        }
        let item_seed =
            || FieldValueSeed { field_name: self.field_name, field_type: self.field_type, array_allowed: false };
        while sequence.next_element_seed(item_seed())?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        if !matches!(self.field_type, FieldType::JsonObject(_)) {
            return Err(A::Error::custom("an object"));
        }
        // JSON fields are rare; they take the slow path's own value.
        let value = JsonValue::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
        self.convert(value)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{json, Map};

    use super::*;
    use crate::index::document::{build_tantivy_document, embedded_document_id, parse_json_object};
    use crate::index::{load_schema, DEFAULT_SCHEMA_JSON};

    fn schema() -> Schema {
        load_schema(DEFAULT_SCHEMA_JSON).unwrap()
    }

    /// The full conversion, the judge: the embedded id (if any) when the document is accepted.
    fn full_conversion(schema: &Schema, text: &str) -> Result<Option<String>, String> {
        let mut object = parse_json_object(text).map_err(|error| error.to_string())?;
        let embedded_id = embedded_document_id(&object).map_err(|error| error.to_string())?;
        let id = embedded_id.clone().unwrap_or_else(|| "given".to_string());
        object.insert(ID_FIELD.to_string(), JsonValue::String(id));
        build_tantivy_document(schema, object).map_err(|error| error.to_string())?;
        Ok(embedded_id)
    }

    /// The rule: whatever the check vouches for, the full conversion accepts, with the same id.
    fn assert_never_vouches_wrongly(schema: &Schema, text: &str) -> Option<CheckedDocument> {
        let checked = check_document_text(schema, text);
        if let Some(checked) = &checked {
            match full_conversion(schema, text) {
                Ok(embedded_id) => assert_eq!(embedded_id, checked.embedded_id, "{text}"),
                Err(error) => panic!("the check vouched for {text}, which the full conversion refuses: {error}"),
            }
        }
        checked
    }

    #[test]
    fn valid_documents_take_the_fast_path() {
        let schema = schema();
        let cases = [
            r#"{"title": "hello", "body": "world"}"#,
            r#"{"_id": "a1", "title": "with an id"}"#,
            r#"{"title": "esc\"aped \u00e9 text", "tags": ["x", "y"], "category": "/lang/rust"}"#,
            r#"{"year": -3, "popularity": 7, "rating": 4.5, "published": "2024-01-31T12:00:00Z"}"#,
            r#"{"rating": 4, "category": ["/a", "/a/b"], "tags": []}"#,
            r#"  {"title": "surrounding space"}  "#,
            r#"{}"#,
        ];
        for text in cases {
            assert!(assert_never_vouches_wrongly(&schema, text).is_some(), "the check refused {text}");
        }
        let checked = check_document_text(&schema, r#"{"_id": "one", "_id": "two"}"#).unwrap();
        assert_eq!(checked.embedded_id.as_deref(), Some("two"), "the last `_id` counts, as in a JSON map");
    }

    #[test]
    fn invalid_documents_are_left_to_the_full_conversion() {
        let schema = schema();
        let long_id = format!(r#"{{"_id": "{}"}}"#, "x".repeat(crate::index::MAX_ID_BYTES + 1));
        let cases = [
            r#"{"foo": 1}"#,
            r#"{"year": "abc"}"#,
            r#"{"year": 1.5}"#,
            r#"{"year": 9223372036854775808}"#,
            r#"{"popularity": -3}"#,
            r#"{"rating": true}"#,
            r#"{"title": 12}"#,
            r#"{"title": null}"#,
            r#"{"title": {"nested": "object"}}"#,
            r#"{"category": "lang/rust"}"#,
            r#"{"category": ["/ok", "not/ok"]}"#,
            r#"{"published": "yesterday"}"#,
            r#"{"published": "9999-01-01T00:00:00Z"}"#,
            r#"{"published": 1700000000}"#,
            r#"{"tags": [["nested"]]}"#,
            r#"{"title": "x", "#,
            r#"{"title": "x"} trailing"#,
            r#"{"title": "x"}{"title": "y"}"#,
            r#"["not", "an", "object"]"#,
            r#""text""#,
            r#"{"_id": 7}"#,
            r#"{"_id": ""}"#,
            r#"{"_id": ["a"]}"#,
            long_id.as_str(),
            r#"{"title": "\ud800 lone surrogate"}"#,
            "",
            "not json",
        ];
        for text in cases {
            assert!(full_conversion(&schema, text).is_err(), "the case {text} is valid; fix the table");
            assert!(check_document_text(&schema, text).is_none(), "the check vouched for {text}");
        }
        // A repeated key whose first value is wrong: a JSON map keeps the last, so the document is
        // valid; the check gives up and the full conversion accepts it.
        let repeated = r#"{"title": 5, "title": "fine"}"#;
        assert!(full_conversion(&schema, repeated).is_ok());
        assert!(check_document_text(&schema, repeated).is_none());
    }

    fn value_strategy() -> impl Strategy<Value = JsonValue> {
        let scalar = prop_oneof![
            Just(JsonValue::Null),
            any::<bool>().prop_map(JsonValue::Bool),
            any::<i64>().prop_map(JsonValue::from),
            any::<u64>().prop_map(JsonValue::from),
            (-1.0e6f64..1.0e6).prop_map(JsonValue::from),
            prop_oneof![
                Just("plain words".to_string()),
                Just("/facet/path".to_string()),
                Just("no/leading/slash".to_string()),
                Just("2024-01-31T12:00:00Z".to_string()),
                Just("12".to_string()),
                Just("true".to_string()),
                Just(String::new()),
                "[a-z/\"\\\\ é]{0,12}",
            ]
            .prop_map(JsonValue::String),
        ];
        scalar.prop_recursive(2, 8, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(JsonValue::Array),
                proptest::collection::vec(("[a-z]{1,3}", inner), 0..3)
                    .prop_map(|entries| JsonValue::Object(entries.into_iter().collect())),
            ]
        })
    }

    fn document_strategy() -> impl Strategy<Value = JsonValue> {
        let field = prop_oneof![
            Just("_id"),
            Just("title"),
            Just("body"),
            Just("url"),
            Just("tags"),
            Just("category"),
            Just("year"),
            Just("popularity"),
            Just("rating"),
            Just("published"),
            Just("unknown"),
        ];
        proptest::collection::vec((field, value_strategy()), 0..6).prop_map(|entries| {
            let object: Map<String, JsonValue> =
                entries.into_iter().map(|(name, value)| (name.to_string(), value)).collect();
            JsonValue::Object(object)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        /// Generated documents: the check never vouches for one the full conversion refuses, and
        /// it takes every valid one (a map has no repeated keys).
        #[test]
        fn the_check_agrees_with_the_full_conversion(document in document_strategy()) {
            let schema = schema();
            let text = document.to_string();
            let checked = assert_never_vouches_wrongly(&schema, &text);
            prop_assert_eq!(checked.is_some(), full_conversion(&schema, &text).is_ok(), "{}", text);
        }

        /// Cut or damaged text: never vouched for wrongly, never a panic.
        #[test]
        fn damaged_text_is_never_vouched_for_wrongly(document in document_strategy(), cut in 0usize..64, byte in any::<u8>()) {
            let schema = schema();
            let mut text = document.to_string().into_bytes();
            let position = cut.min(text.len());
            text.truncate(position.max(1));
            text.push(byte);
            if let Ok(text) = String::from_utf8(text) {
                assert_never_vouches_wrongly(&schema, &text);
            }
        }
    }

    #[test]
    fn a_json_field_takes_its_values_through_the_full_conversion() {
        let schema = load_schema(
            r#"[{"name": "attributes", "type": "json_object", "options": {"stored": true, "indexing": {"record": "basic", "tokenizer": "raw"}}}]"#,
        )
        .unwrap();
        let text = json!({"_id": "j", "attributes": {"color": "red", "sizes": [1, 2]}}).to_string();
        assert!(assert_never_vouches_wrongly(&schema, &text).is_some());
        assert!(check_document_text(&schema, r#"{"attributes": "not an object"}"#).is_none());
    }
}
