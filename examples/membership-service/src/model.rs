//! The member, as stored and as answered, and the validation of a PUT's body.

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// A membership level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// `basic`.
    Basic,
    /// `gold`.
    Gold,
    /// `platinum`.
    Platinum,
}

impl Level {
    /// The level named `s`, exactly.
    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "basic" => Some(Level::Basic),
            "gold" => Some(Level::Gold),
            "platinum" => Some(Level::Platinum),
            _ => None,
        }
    }

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Basic => "basic",
            Level::Gold => "gold",
            Level::Platinum => "platinum",
        }
    }
}

/// A stored member, as answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The id.
    pub id: u64,
    /// 1 to 64 Unicode scalar values, no control characters.
    pub name: String,
    /// The level.
    pub level: Level,
    /// RFC 3339, in UTC with microseconds (`2027-01-31T00:00:00.000000Z`).
    pub expires_at: String,
    /// Incremented by every change; the first is 1; never reused.
    pub version: u64,
    /// Set by the expiry job once `expires_at` has passed.
    pub expired: bool,
}

/// A PUT's body, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    name: String,
    level: String,
    expires_at: String,
}

/// A validated PUT body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInput {
    /// The name.
    pub name: String,
    /// The level.
    pub level: Level,
    /// `expires_at` normalized: RFC 3339 in UTC with microseconds.
    pub expires_at: String,
    /// `expires_at` as a MySQL `DATETIME(6)` literal in UTC.
    pub expires_at_sql: String,
}

/// Why a body was refused, and with which status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// Not JSON, or not an object: 400.
    #[error("{0}")]
    Malformed(String),
    /// A field missing, unknown, of the wrong type or with a bad value: 422.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field (empty for the object as a whole).
        field: String,
        /// Why.
        reason: String,
    },
}

fn invalid(field: &str, reason: impl Into<String>) -> InputError {
    InputError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The most scalar values in a name.
pub const MAX_NAME_CHARS: usize = 64;

impl MemberInput {
    /// Parses and validates a PUT body.
    pub fn parse(body: &[u8]) -> Result<MemberInput, InputError> {
        let value = parse_object(body)?;
        let raw: RawInput = serde_json::from_value(value).map_err(|e| {
            let msg = e.to_string();
            let field = ["name", "level", "expires_at"]
                .into_iter()
                .find(|f| msg.contains(&format!("`{f}`")))
                .unwrap_or("");
            invalid(field, msg)
        })?;
        let count = raw.name.chars().count();
        if count == 0 || count > MAX_NAME_CHARS {
            return Err(invalid(
                "name",
                format!("must be 1 to {MAX_NAME_CHARS} characters, not {count}"),
            ));
        }
        if raw.name.chars().any(char::is_control) {
            return Err(invalid("name", "must not contain control characters"));
        }
        let level = Level::parse(&raw.level).ok_or_else(|| {
            invalid(
                "level",
                format!("must be basic, gold or platinum, not {:?}", raw.level),
            )
        })?;
        let at = OffsetDateTime::parse(&raw.expires_at, &Rfc3339)
            .map_err(|e| invalid("expires_at", format!("not an RFC 3339 date-time: {e}")))?
            .to_offset(UtcOffset::UTC);
        if !(1000..=9999).contains(&at.year()) {
            return Err(invalid(
                "expires_at",
                "the year (in UTC) must be between 1000 and 9999",
            ));
        }
        let expires_at = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute(),
            at.second(),
            at.microsecond()
        );
        let expires_at_sql = format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute(),
            at.second(),
            at.microsecond()
        );
        Ok(MemberInput {
            name: raw.name,
            level,
            expires_at,
            expires_at_sql,
        })
    }
}

/// Parses a body that must be a JSON object: anything else is [`InputError::Malformed`].
pub fn parse_object(body: &[u8]) -> Result<serde_json::Value, InputError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| InputError::Malformed(format!("the body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(InputError::Malformed(
            "the body must be a JSON object".into(),
        ));
    }
    Ok(value)
}

/// Parses a path id: plain ASCII digits that fit a `u64` (no sign, no spaces).
pub fn parse_id(raw: &str) -> Option<u64> {
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    raw.parse().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn body(name: &str, level: &str, at: &str) -> Vec<u8> {
        serde_json::json!({"name": name, "level": level, "expires_at": at})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn a_good_body_is_normalized_to_utc() {
        let m = MemberInput::parse(&body("Zoë", "gold", "2027-01-31T08:00:00+08:00")).unwrap();
        assert_eq!(m.level, Level::Gold);
        assert_eq!(m.expires_at, "2027-01-31T00:00:00.000000Z");
        assert_eq!(m.expires_at_sql, "2027-01-31 00:00:00.000000");
    }

    #[test]
    fn names_count_scalar_values_and_refuse_controls() {
        let ok = "é".repeat(64);
        assert!(MemberInput::parse(&body(&ok, "basic", "2027-01-01T00:00:00Z")).is_ok());
        let long = "é".repeat(65);
        let e = MemberInput::parse(&body(&long, "basic", "2027-01-01T00:00:00Z")).unwrap_err();
        assert!(matches!(e, InputError::Invalid { ref field, .. } if field == "name"));
        for bad in ["", "a\u{0}b", "tab\there", "\u{7f}"] {
            let e = MemberInput::parse(&body(bad, "basic", "2027-01-01T00:00:00Z")).unwrap_err();
            assert!(
                matches!(e, InputError::Invalid { ref field, .. } if field == "name"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn bad_bodies_get_the_right_class() {
        for malformed in [&b"{"[..], b"[]", b"3", b"\"x\"", b"null", b""] {
            assert!(
                matches!(MemberInput::parse(malformed), Err(InputError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(malformed)
            );
        }
        let cases: [(&str, &str); 6] = [
            (r#"{"name":"a","level":"gold"}"#, "expires_at"),
            (
                r#"{"name":"a","level":"gold","expires_at":"2027-01-01T00:00:00Z","x":1}"#,
                "",
            ),
            (
                r#"{"name":1,"level":"gold","expires_at":"2027-01-01T00:00:00Z"}"#,
                "",
            ),
            (
                r#"{"name":"a","level":"Gold","expires_at":"2027-01-01T00:00:00Z"}"#,
                "level",
            ),
            (
                r#"{"name":"a","level":"gold","expires_at":"tomorrow"}"#,
                "expires_at",
            ),
            (
                r#"{"name":"a","level":"gold","expires_at":"0999-12-31T23:00:00Z"}"#,
                "expires_at",
            ),
        ];
        for (text, field) in cases {
            match MemberInput::parse(text.as_bytes()) {
                Err(InputError::Invalid { field: f, .. }) => {
                    if !field.is_empty() {
                        assert_eq!(f, field, "{text}");
                    }
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn ids_are_plain_digits_fitting_a_u64() {
        assert_eq!(parse_id("0"), Some(0));
        assert_eq!(parse_id("007"), Some(7));
        assert_eq!(parse_id("18446744073709551615"), Some(u64::MAX));
        for bad in [
            "",
            "+5",
            "-1",
            "abc",
            "18446744073709551616",
            " 5",
            "5 ",
            "٣",
            "1e3",
        ] {
            assert_eq!(parse_id(bad), None, "{bad:?}");
        }
    }
}
