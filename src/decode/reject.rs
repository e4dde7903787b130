//! The closed set of reasons a message cannot become a row. The codes are stable: they are
//! stored in error tables and used as metric labels.

use std::fmt;

/// Why a message could not become a row. The string codes are stable: they are stored in error
/// tables and used as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectKind {
    Oversize,
    InvalidUtf8,
    MalformedJson,
    NotObject,
    DuplicateField,
    MissingField,
    ExtraField,
    NullNotAllowed,
    NulByte,
    WrongType,
    TooLong,
    InvalidInteger,
    InvalidDecimal,
    InvalidNumber,
    NumericOutOfRange,
    InvalidBoolean,
    InvalidDate,
    DateOutOfRange,
    InvalidTimestamp,
    InvalidUuid,
    InvalidQueueTime,
    /// The database refused the row as a duplicate of a unique key (SQLSTATE 23505).
    DuplicateKey,
    /// The database refused the row for another data reason (SQLSTATE classes 22 and 23).
    DbRefused,
    /// A routed pipeline: no route's `when` rule takes the message.
    NoRoute,
    /// A route's identity lookup found no row for the message's natural key.
    IdentityNotFound,
}

impl RejectKind {
    pub const ALL: [RejectKind; 25] = [
        RejectKind::Oversize,
        RejectKind::InvalidUtf8,
        RejectKind::MalformedJson,
        RejectKind::NotObject,
        RejectKind::DuplicateField,
        RejectKind::MissingField,
        RejectKind::ExtraField,
        RejectKind::NullNotAllowed,
        RejectKind::NulByte,
        RejectKind::WrongType,
        RejectKind::TooLong,
        RejectKind::InvalidInteger,
        RejectKind::InvalidDecimal,
        RejectKind::InvalidNumber,
        RejectKind::NumericOutOfRange,
        RejectKind::InvalidBoolean,
        RejectKind::InvalidDate,
        RejectKind::DateOutOfRange,
        RejectKind::InvalidTimestamp,
        RejectKind::InvalidUuid,
        RejectKind::InvalidQueueTime,
        RejectKind::DuplicateKey,
        RejectKind::DbRefused,
        RejectKind::NoRoute,
        RejectKind::IdentityNotFound,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectKind::Oversize => "oversize",
            RejectKind::InvalidUtf8 => "invalid_utf8",
            RejectKind::MalformedJson => "malformed_json",
            RejectKind::NotObject => "not_object",
            RejectKind::DuplicateField => "duplicate_field",
            RejectKind::MissingField => "missing_field",
            RejectKind::ExtraField => "extra_field",
            RejectKind::NullNotAllowed => "null_not_allowed",
            RejectKind::NulByte => "nul_byte",
            RejectKind::WrongType => "wrong_type",
            RejectKind::TooLong => "too_long",
            RejectKind::InvalidInteger => "invalid_integer",
            RejectKind::InvalidDecimal => "invalid_decimal",
            RejectKind::InvalidNumber => "invalid_number",
            RejectKind::NumericOutOfRange => "numeric_out_of_range",
            RejectKind::InvalidBoolean => "invalid_boolean",
            RejectKind::InvalidDate => "invalid_date",
            RejectKind::DateOutOfRange => "date_out_of_range",
            RejectKind::InvalidTimestamp => "invalid_timestamp",
            RejectKind::InvalidUuid => "invalid_uuid",
            RejectKind::InvalidQueueTime => "invalid_queue_time",
            RejectKind::DuplicateKey => "duplicate_key",
            RejectKind::DbRefused => "db_refused",
            RejectKind::NoRoute => "no_route",
            RejectKind::IdentityNotFound => "identity_not_found",
        }
    }
}

impl fmt::Display for RejectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message that will go to the error table instead of the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub kind: RejectKind,
    pub column: Option<String>,
    pub message: String,
    /// Set when the database refused the row.
    pub sqlstate: Option<String>,
}

impl Reject {
    pub fn new(kind: RejectKind, column: Option<&str>, message: impl Into<String>) -> Self {
        Reject {
            kind,
            column: column.map(str::to_string),
            message: message.into(),
            sqlstate: None,
        }
    }
}
