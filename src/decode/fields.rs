//! Routing a message's JSON fields to column slots: one pass over the object, borrowing each
//! value's raw text, with the previous message's field order as a cheap first guess.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::{Decoder, Reject, RejectKind};

/// Reused buffers: column slots, and the field order of the previous message. Publishers
/// almost always emit keys in the same order, so a key is first compared with the key seen at
/// the same position last time (one memcmp) before falling back to a hashed, lower-cased lookup.
#[derive(Debug, Default)]
pub(super) struct Scratch {
    /// Per column: byte range of the field's raw JSON value in the body.
    pub(super) slots: Vec<Option<(usize, usize)>>,
    pub(super) shape: Vec<(Box<str>, Route)>,
}

/// Where a JSON field goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    Column(usize),
    /// Carries the payload queue time; may also feed a column.
    QueueTime(Option<usize>),
    Ignore,
}

/// Deserializes the top-level object, recording each field's raw value range in its column's slot.
pub(super) struct FieldsSeed<'d, 's> {
    pub(super) decoder: &'d Decoder,
    /// Address of the body text: raw values are recorded as offsets from it.
    pub(super) base: usize,
    pub(super) slots: &'s mut [Option<(usize, usize)>],
    pub(super) shape: &'s mut Vec<(Box<str>, Route)>,
    pub(super) payload_qt: &'s mut Option<(usize, usize)>,
    pub(super) problem: &'s mut Option<Reject>,
}

/// A field name borrowed from the body when it has no escapes. (serde's own `Cow<str>` always
/// allocates: one String per field per row showed in the drain profile.)
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> DeserializeSeed<'de> for FieldsSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldsSeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object with one field per column")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        use serde::de::Error;
        let mut pos = 0;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let value: &'de RawValue = map.next_value()?;
            let start = value.get().as_ptr() as usize - self.base;
            let range = (start, start + value.get().len());
            let route = match self.shape.get(pos) {
                Some((k, r)) if **k == *key => *r,
                _ => match self.decoder.route(&key) {
                    Ok(r) => {
                        let entry = (Box::from(&*key), r);
                        match self.shape.get_mut(pos) {
                            Some(slot) => *slot = entry,
                            None => self.shape.push(entry),
                        }
                        r
                    }
                    Err(r) => {
                        *self.problem = Some(r);
                        return Err(A::Error::custom("rejected field"));
                    }
                },
            };
            pos += 1;
            let column = match route {
                Route::Column(i) => Some(i),
                Route::QueueTime(c) => {
                    *self.payload_qt = Some(range);
                    c
                }
                Route::Ignore => None,
            };
            if let Some(i) = column {
                if self.slots[i].is_some() {
                    *self.problem = Some(Reject::new(
                        RejectKind::DuplicateField,
                        Some(&self.decoder.columns[i].name),
                        format!("column {:?} is given twice", self.decoder.columns[i].name),
                    ));
                    return Err(A::Error::custom("duplicate field"));
                }
                self.slots[i] = Some(range);
            }
        }
        Ok(())
    }
}
