//! What one spool or journal record holds. The payload after the frame header is
//! `kind: u8 | received_us: i64 | redelivered: u8 | props_len: u32 | props | body`, where `props`
//! are the message's AMQP basic properties in their wire encoding (headers, message_id,
//! timestamp — everything `replay` needs to publish the message again as it arrived). The
//! header record (sequence 0) holds `kind = 0` and the owning job's name.

use lapin::protocol::basic::{gen_properties, parse_properties};
use lapin::BasicProperties;

use super::SpoolError;

/// Kind byte of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Sequence 0: names the job the file belongs to.
    Header = 0,
    /// A delivery as received.
    Delivery = 1,
    /// A redelivery of a message the spool already owns: acked and not loaded again; recorded
    /// so that the sequence numbers stay dense (every delivery of the job has one).
    Duplicate = 2,
}

const FIXED: usize = 1 + 8 + 1 + 4;

/// Payload of the header record.
pub fn header(job: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(1 + job.len());
    p.push(Kind::Header as u8);
    p.extend_from_slice(job.as_bytes());
    p
}

/// Payload of a delivery (or duplicate) record.
pub fn delivery(
    kind: Kind,
    received_us: i64,
    redelivered: bool,
    props: &BasicProperties,
    body: &[u8],
) -> Vec<u8> {
    let mut p = Vec::with_capacity(FIXED + 64 + body.len());
    p.push(kind as u8);
    p.extend_from_slice(&received_us.to_le_bytes());
    p.push(redelivered as u8);
    p.extend_from_slice(&[0; 4]);
    let start = p.len();
    // Writing into a Vec cannot fail; an empty property list is the fallback all the same.
    if let Ok(v) = cookie_factory::gen_simple(gen_properties(props), std::mem::take(&mut p)) {
        p = v;
    }
    if p.len() < start {
        p.resize(start, 0);
    }
    let props_len = (p.len() - start) as u32;
    p[start - 4..start].copy_from_slice(&props_len.to_le_bytes());
    p.extend_from_slice(body);
    p
}

/// A decoded record, borrowing from the file's bytes.
#[derive(Debug)]
pub enum Record<'a> {
    Header { job: String },
    Delivery(Box<Delivery<'a>>),
}

#[derive(Debug)]
pub struct Delivery<'a> {
    pub kind: Kind,
    pub received_us: i64,
    pub redelivered: bool,
    pub props: BasicProperties,
    pub body: &'a [u8],
}

pub fn decode(payload: &[u8]) -> Result<Record<'_>, SpoolError> {
    let bad = |why: &str| SpoolError::BadRecord(why.to_string());
    match payload.first() {
        Some(0) => Ok(Record::Header {
            job: String::from_utf8(payload[1..].to_vec()).map_err(|_| bad("job name"))?,
        }),
        Some(k @ (1 | 2)) => {
            if payload.len() < FIXED {
                return Err(bad("short record"));
            }
            let received_us =
                i64::from_le_bytes(payload[1..9].try_into().map_err(|_| bad("time"))?);
            let redelivered = payload[9] != 0;
            let props_len =
                u32::from_le_bytes(payload[10..14].try_into().map_err(|_| bad("length"))?) as usize;
            let props_bytes = payload
                .get(FIXED..FIXED + props_len)
                .ok_or_else(|| bad("properties length"))?;
            let props = if props_bytes.is_empty() {
                BasicProperties::default()
            } else {
                parse_properties(props_bytes)
                    .map(|(_, p)| p)
                    .map_err(|_| bad("properties"))?
            };
            Ok(Record::Delivery(Box::new(Delivery {
                kind: if *k == 1 {
                    Kind::Delivery
                } else {
                    Kind::Duplicate
                },
                received_us,
                redelivered,
                props,
                body: &payload[FIXED + props_len..],
            })))
        }
        _ => Err(bad("unknown kind")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldTable, ShortString};

    #[test]
    fn delivery_round_trip_keeps_properties_and_body() {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("x-queue-time"),
            AMQPValue::LongLongInt(1_700_000_000_000_000),
        );
        let props = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_timestamp(1_700_000_000)
            .with_headers(headers);
        let body = br#"{"id":"1"}"#;
        let p = delivery(Kind::Delivery, 42, true, &props, body);
        let Record::Delivery(d) = decode(&p).expect("decodes") else {
            panic!("not a delivery")
        };
        assert_eq!(
            (d.kind, d.received_us, d.redelivered, d.body),
            (Kind::Delivery, 42, true, &body[..])
        );
        assert_eq!(d.props, props);
    }

    #[test]
    fn header_and_empty_properties() {
        let Record::Header { job } = decode(&header("20261123_010203_p_01")).expect("header")
        else {
            panic!()
        };
        assert_eq!(job, "20261123_010203_p_01");
        let p = delivery(Kind::Duplicate, 1, false, &BasicProperties::default(), b"");
        let Record::Delivery(d) = decode(&p).expect("decodes") else {
            panic!()
        };
        assert_eq!((d.kind, d.body.len()), (Kind::Duplicate, 0));
        assert!(decode(&[9]).is_err() && decode(&[1, 2]).is_err());
    }
}
