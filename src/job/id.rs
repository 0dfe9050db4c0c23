//! [`RecordId`]: a record's id as its line wrote it.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A record's id exactly as its line gives it: a JSON string or number kept as its text, so
/// that a number past 2^64, `-0` or `1.50` is echoed as written and two ids that are written
/// differently stay apart. (Strings compare by their value, whatever their escapes.)
#[derive(Debug, Clone)]
pub struct RecordId(Box<RawValue>);

impl RecordId {
    /// No id (`null`): a line that is not JSON or has no `id`.
    pub fn null() -> Self {
        Self(RawValue::from_string("null".into()).unwrap_or_else(|_| unreachable!()))
    }

    /// The id of a JSON line, `null` when it has none or is not JSON.
    pub fn of_line(line: &str) -> Self {
        #[derive(Deserialize)]
        struct IdOnly {
            id: Option<Box<RawValue>>,
        }
        serde_json::from_str::<IdOnly>(line)
            .ok()
            .and_then(|v| v.id)
            .map_or_else(Self::null, Self)
    }

    /// An id from a JSON value (a string or a number as serde_json writes it).
    pub fn from_value(value: &serde_json::Value) -> Self {
        serde_json::value::to_raw_value(value).map_or_else(|_| Self::null(), Self)
    }

    /// The id's JSON text, as the line gave it.
    pub fn text(&self) -> &str {
        self.0.get().trim()
    }

    /// Whether the id is a string or a number (a usable id).
    pub fn is_valid(&self) -> bool {
        matches!(
            self.text().as_bytes().first(),
            Some(b'"' | b'-' | b'0'..=b'9')
        )
    }

    /// Whether there is no id.
    pub fn is_null(&self) -> bool {
        self.text() == "null"
    }

    /// What two ids are compared by: a string's value in JSON form, else the text.
    fn key(&self) -> std::borrow::Cow<'_, str> {
        let text = self.text();
        if text.starts_with('"') {
            if let Ok(s) = serde_json::from_str::<String>(text) {
                if let Ok(canonical) = serde_json::to_string(&s) {
                    return canonical.into();
                }
            }
        }
        text.into()
    }
}

impl PartialEq for RecordId {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for RecordId {}

impl PartialEq<serde_json::Value> for RecordId {
    fn eq(&self, other: &serde_json::Value) -> bool {
        *self == Self::from_value(other)
    }
}

impl std::hash::Hash for RecordId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl std::fmt::Display for RecordId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

impl Serialize for RecordId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_keep_their_text() {
        let big = RecordId::of_line(r#"{"id": 18446744073709551617, "text": "x"}"#);
        assert_eq!(big.text(), "18446744073709551617");
        let bigger = RecordId::of_line(r#"{"id":18446744073709551618}"#);
        assert_ne!(big, bigger, "ids past 2^64 stay apart");
        let zero = RecordId::of_line(r#"{"id": 0}"#);
        let minus_zero = RecordId::of_line(r#"{"id": -0}"#);
        assert_ne!(zero, minus_zero);
        assert_eq!(serde_json::to_string(&minus_zero).unwrap(), "-0");
        let escaped = RecordId::of_line(r#"{"id": "\u0041b"}"#);
        assert_eq!(escaped, RecordId::from_value(&serde_json::json!("Ab")));
        assert_eq!(escaped.to_string(), "\"Ab\"");
        assert!(RecordId::of_line("not json").is_null());
        assert!(!RecordId::of_line(r#"{"id": true}"#).is_valid());
        assert!(RecordId::of_line(r#"{"id": -3}"#).is_valid());
    }
}
