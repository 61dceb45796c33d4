//! Sequences with a bound on their length, checked while they are decoded.
//!
//! postcard announces a sequence's length before its items, and an item can cost one byte on the
//! wire yet 24 to 48 in memory (an empty `String`, a `DocumentInput`). A 16 MiB frame of empty ids
//! would decode into hundreds of MiB before anything could look at its length. Fields that hold
//! such sequences decode through [`vec_of_at_most`], which refuses an announced length over the
//! bound before allocating anything, and never reserves more than a few thousand items ahead.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};

/// Items reserved ahead of their arrival, at most.
const RESERVE_AHEAD: usize = 4096;

/// Decodes a `Vec<T>` of at most `MAX` items.
pub fn vec_of_at_most<'de, D, T, const MAX: usize>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Bounded<T, const MAX: usize>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for Bounded<T, MAX> {
        type Value = Vec<T>;

        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(formatter, "a sequence of at most {MAX} items")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut sequence: A) -> Result<Vec<T>, A::Error> {
            if let Some(announced) = sequence.size_hint().filter(|announced| *announced > MAX) {
                return Err(de::Error::invalid_length(announced, &self));
            }
            let mut items = Vec::with_capacity(sequence.size_hint().unwrap_or(0).min(RESERVE_AHEAD));
            while let Some(item) = sequence.next_element()? {
                if items.len() == MAX {
                    return Err(de::Error::invalid_length(MAX + 1, &self));
                }
                items.push(item);
            }
            Ok(items)
        }
    }

    deserializer.deserialize_seq(Bounded::<T, MAX>(PhantomData))
}

#[cfg(test)]
mod tests {
    #[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
    struct Holder {
        #[serde(deserialize_with = "super::vec_of_at_most::<_, _, 3>")]
        items: Vec<String>,
    }

    #[test]
    fn lengths_over_the_bound_are_refused_before_allocation() {
        let ok = Holder { items: vec!["a".into(), "b".into(), "c".into()] };
        let bytes = postcard::to_allocvec(&ok).unwrap();
        assert_eq!(postcard::from_bytes::<Holder>(&bytes).unwrap(), ok);
        let over = postcard::to_allocvec(&Holder { items: vec![String::new(); 4] }).unwrap();
        assert!(postcard::from_bytes::<Holder>(&over).is_err());
        // A length prefix of 2^32 with nothing behind it: refused on the prefix alone.
        let huge = [0x80, 0x80, 0x80, 0x80, 0x10];
        assert!(postcard::from_bytes::<Holder>(&huge).is_err());
        // JSON has no announced length: the bound holds item by item.
        assert!(serde_json::from_str::<Holder>(r#"{"items":["a","b","c","d"]}"#).is_err());
        assert!(serde_json::from_str::<Holder>(r#"{"items":["a"]}"#).is_ok());
    }
}
