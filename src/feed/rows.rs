//! Row generation for the feed: seed-like `person` rows (seeds/001's 33-column table) and the
//! five seed error kinds. Pure and deterministic from the RNG, so benches can reuse it.

use rand::Rng;

use super::vocab::*;
use super::BadKind;
use super::PERSON_BODY_KEYS;

// ---------------------------------------------------------------------------------------------
// Row generation
// ---------------------------------------------------------------------------------------------

fn pick<'a, R: Rng + ?Sized>(rng: &mut R, list: &[&'a str]) -> &'a str {
    list[rng.random_range(0..list.len())]
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

fn random_date<R: Rng + ?Sized>(rng: &mut R, years: std::ops::RangeInclusive<u32>) -> String {
    let y = rng.random_range(years);
    let m = rng.random_range(1..=12);
    let d = rng.random_range(1..=days_in_month(y, m));
    format!("{y:04}-{m:02}-{d:02}")
}

fn digits<R: Rng + ?Sized>(rng: &mut R, out: &mut String, n: usize) {
    for _ in 0..n {
        out.push(char::from(b'0' + rng.random_range(0..10u8)));
    }
}

/// A card number with a valid Luhn check digit, grouped like "4539-1488-0343-6467"
/// (Amex "3714-496353-98431").
pub(super) fn card_number<R: Rng + ?Sized>(rng: &mut R, kind: &str) -> String {
    let (prefix, len): (&str, usize) = match kind {
        "Visa" => ("4", 16),
        "MasterCard" => (pick(rng, &["51", "52", "53", "54", "55"]), 16),
        "Amex" => (pick(rng, &["34", "37"]), 15),
        "Discover" => ("6011", 16),
        "Diners Club" => ("36", 14),
        _ => ("35", 16), // JCB
    };
    let mut num = String::with_capacity(len);
    num.push_str(prefix);
    digits(rng, &mut num, len - prefix.len() - 1);
    // Luhn: double every second digit from the right, counting the check digit as first.
    let sum: u32 = num
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 0 {
                let dd = d * 2;
                if dd > 9 {
                    dd - 9
                } else {
                    dd
                }
            } else {
                d
            }
        })
        .sum();
    num.push(char::from(b'0' + ((10 - sum % 10) % 10) as u8));
    let groups: &[usize] = match len {
        15 => &[4, 6, 5],
        14 => &[4, 6, 4],
        _ => &[4, 4, 4, 4],
    };
    let mut out = String::with_capacity(len + 3);
    let mut at = 0;
    for (i, g) in groups.iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        out.push_str(&num[at..at + g]);
        at += g;
    }
    out
}

/// A JSON value in a generated body.
enum Val<'a> {
    Str(&'a str),
    Raw(&'a str),
}

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    if !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            c if (c as u32) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes());
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}

/// One generated seed-like person row as a JSON object body (pure; used by benches too).
///
/// `n` is the row's id number: the id is `format!("{n:020}")` (20 digits, fits `char(20)`).
/// `bad` puts exactly one defect in the row (see [`BadKind`]); for
/// [`BadKind::DuplicateKey`] the defect is the id, which becomes `duplicate_of` (the id number
/// of an earlier good row) — with `duplicate_of = None` that row is not actually bad.
/// `duplicate_of` is ignored for other kinds. The random content does not depend on `bad`:
/// the same `rng` state gives the same row apart from the defect.
pub fn person_row(
    n: u64,
    rng: &mut impl rand::Rng,
    bad: Option<BadKind>,
    duplicate_of: Option<u64>,
) -> Vec<u8> {
    let male = rng.random_bool(0.5);
    let fname = pick(rng, if male { MALE_NAMES } else { FEMALE_NAMES });
    let mname = pick(rng, if male { MALE_NAMES } else { FEMALE_NAMES });
    let lname = pick(rng, LAST_NAMES);
    let prefix = if rng.random_bool(0.08) {
        "Dr."
    } else if male {
        "Mr."
    } else {
        pick(rng, &["Mrs.", "Ms.", "Ms."])
    };
    let suffix = pick(rng, SUFFIXES);
    let age = rng.random_range(18..=89u32).to_string();
    let income_cents: u64 = rng.random_range(1_500_000..=35_000_000);
    let income = format!("{}.{:02}", income_cents / 100, income_cents % 100);
    let (city, state, zip3, area, dma) = PLACES[rng.random_range(0..PLACES.len())];
    let mut zip = String::with_capacity(10);
    zip.push_str(zip3);
    digits(rng, &mut zip, 2);
    zip.push('-');
    digits(rng, &mut zip, 4);
    let telephone = format!(
        "({area}) {}-{:04}",
        rng.random_range(200..=999u32),
        rng.random_range(0..=9999u32)
    );
    let address1 = format!(
        "{} {}{} {}",
        rng.random_range(1..=99_999u32),
        pick(rng, DIRECTIONS),
        pick(rng, STREETS),
        pick(rng, STREET_SUFFIXES)
    );
    let address2 = match rng.random_range(0..5u32) {
        0 => format!(
            "Apt {}{}",
            rng.random_range(1..=40u32),
            pick(rng, &["A", "B", "C", "D"])
        ),
        1 => format!("Suite {}", rng.random_range(100..=2_500u32)),
        2 => format!("Unit {}", rng.random_range(1..=999u32)),
        3 => format!("PO Box {}", rng.random_range(1..=99_999u32)),
        _ => format!("Floor {}", rng.random_range(2..=60u32)),
    };
    let (os, platform, browsers) = PLATFORMS[rng.random_range(0..PLATFORMS.len())];
    let browser_name = pick(rng, browsers);
    let version = match browser_name {
        "Safari" => format!(
            "{}.{}",
            rng.random_range(15..=17u32),
            rng.random_range(0..=6u32)
        ),
        "SamsungBrowser" => format!("{}.0", rng.random_range(20..=24u32)),
        _ => format!("{}.0", rng.random_range(110..=126u32)),
    };
    let browser = format!("{browser_name}/{version} ({platform})");
    let occupation = pick(rng, OCCUPATIONS);
    let education = pick(rng, EDUCATION);
    let credit_type = pick(
        rng,
        &[
            "Visa",
            "Visa",
            "MasterCard",
            "Amex",
            "Discover",
            "Diners Club",
            "JCB",
        ],
    );
    let creditnum = card_number(rng, credit_type);
    let exp_year = rng.random_range(2025..=2032u32);
    let exp_month = rng.random_range(1..=12u32);
    let creditexp = format!(
        "{exp_year:04}-{exp_month:02}-{:02}",
        days_in_month(exp_year, exp_month)
    );
    let last_update = random_date(rng, 2018..=2025);
    let mut events = String::with_capacity(50);
    for _ in 0..rng.random_range(1..=4u32) {
        let e = pick(rng, EVENTS);
        if events.len() + e.len() + 1 > 50 {
            break;
        }
        if !events.is_empty() {
            events.push(',');
        }
        events.push_str(e);
    }
    let letters = |s: &str| -> String {
        s.chars()
            .filter(char::is_ascii_alphabetic)
            .map(|c| c.to_ascii_lowercase())
            .collect()
    };
    let domain = pick(rng, EMAIL_DOMAINS);
    let sep = pick(rng, &[".", "_", ""]);
    let mut email = format!(
        "{}{sep}{}{}@{domain}",
        letters(fname),
        letters(lname),
        rng.random_range(1..=99u32)
    );
    if email.len() > 55 {
        email = format!("{}{}@{domain}", letters(&fname[..1]), letters(lname));
    }

    let id = match (bad, duplicate_of) {
        (Some(BadKind::DuplicateKey), Some(orig)) => orig,
        _ => n,
    };
    let id = format!("{id:020}");
    let last_update = match bad {
        Some(BadKind::InvalidDate) => "2021-02-30".to_string(),
        _ => last_update,
    };
    let age = match bad {
        Some(BadKind::LettersInInteger) => Val::Str("4x2"),
        _ => Val::Raw(&age),
    };
    let income = match bad {
        Some(BadKind::LettersInDecimal) => "12a4.50".to_string(),
        _ => income,
    };
    let creditexp = match bad {
        Some(BadKind::DateOutOfRange) => "9999999-01-01".to_string(),
        _ => creditexp,
    };

    let fields: [(&str, Val<'_>); PERSON_BODY_KEYS] = [
        ("id", Val::Str(&id)),
        ("home_status", Val::Str(pick(rng, HOME_STATUS))),
        ("age", age),
        ("gender", Val::Str(if male { "M" } else { "F" })),
        ("occupation", Val::Str(occupation)),
        ("income", Val::Str(&income)),
        ("os", Val::Str(os)),
        ("last_update", Val::Str(&last_update)),
        ("marital_status", Val::Str(pick(rng, MARITAL))),
        ("zip", Val::Str(&zip)),
        ("education", Val::Str(education)),
        ("prefix_description", Val::Str(prefix)),
        ("isp", Val::Str(pick(rng, ISPS))),
        ("fname", Val::Str(fname)),
        ("dma_lu", Val::Str(dma)),
        ("lname", Val::Str(lname)),
        ("browser", Val::Str(&browser)),
        ("mname", Val::Str(mname)),
        ("creditnum", Val::Str(&creditnum)),
        ("suffix_description", Val::Str(suffix)),
        ("creditexp", Val::Str(&creditexp)),
        ("address1", Val::Str(&address1)),
        ("work_status", Val::Str(pick(rng, WORK_STATUS))),
        ("credit_type", Val::Str(credit_type)),
        ("events", Val::Str(&events)),
        ("address2", Val::Str(&address2)),
        ("city", Val::Str(city)),
        ("telephone", Val::Str(&telephone)),
        ("email", Val::Str(&email)),
        ("state", Val::Str(state)),
        ("country", Val::Str("United States")),
    ];
    let mut out = Vec::with_capacity(900);
    out.push(b'{');
    let mut first = true;
    for (key, val) in &fields {
        if !first {
            out.push(b',');
        }
        first = false;
        push_json_str(&mut out, key);
        out.push(b':');
        match val {
            Val::Str(s) => push_json_str(&mut out, s),
            Val::Raw(s) => out.extend_from_slice(s.as_bytes()),
        }
    }
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    /// Column → max characters, from deploy/sql/person.sql (None: not a character column).
    const LENGTHS: [(&str, Option<usize>); PERSON_BODY_KEYS] = [
        ("id", Some(20)),
        ("home_status", Some(12)),
        ("age", None),
        ("gender", Some(1)),
        ("occupation", Some(50)),
        ("income", None),
        ("os", Some(15)),
        ("last_update", None),
        ("marital_status", Some(12)),
        ("zip", Some(10)),
        ("education", Some(24)),
        ("prefix_description", Some(4)),
        ("isp", Some(100)),
        ("fname", Some(20)),
        ("dma_lu", Some(12)),
        ("lname", Some(20)),
        ("browser", Some(55)),
        ("mname", Some(20)),
        ("creditnum", Some(20)),
        ("suffix_description", Some(4)),
        ("creditexp", None),
        ("address1", Some(40)),
        ("work_status", Some(12)),
        ("credit_type", Some(12)),
        ("events", Some(50)),
        ("address2", Some(40)),
        ("city", Some(20)),
        ("telephone", Some(14)),
        ("email", Some(55)),
        ("state", Some(20)),
        ("country", Some(20)),
    ];

    type Obj = serde_json::Map<String, serde_json::Value>;

    fn parse(body: &[u8]) -> Obj {
        match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(serde_json::Value::Object(m)) => m,
            other => panic!(
                "not a JSON object: {other:?}: {}",
                String::from_utf8_lossy(body)
            ),
        }
    }

    fn valid_date(s: &str) -> bool {
        s.len() == 10 && chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok()
    }

    fn valid_decimal_9_2(s: &str) -> bool {
        let Some((int, frac)) = s.split_once('.') else {
            return false;
        };
        !int.is_empty()
            && int.len() <= 7
            && frac.len() == 2
            && int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    }

    /// Everything a good row must satisfy, except the id (checked by callers).
    fn assert_good_fields(m: &Obj) {
        assert_eq!(m.len(), PERSON_BODY_KEYS, "keys: {:?}", m.keys());
        for (col, max) in LENGTHS {
            let v = m.get(col).unwrap_or_else(|| panic!("missing key {col}"));
            if let Some(max) = max {
                let s = v
                    .as_str()
                    .unwrap_or_else(|| panic!("{col} is not a string: {v}"));
                assert!(!s.is_empty(), "{col} is empty");
                assert!(s.chars().count() <= max, "{col} = {s:?} longer than {max}");
            }
        }
        assert!(!m.contains_key("queue_time") && !m.contains_key("db_time"));
        let age = m["age"].as_i64().expect("age is an integer");
        assert!((0..=150).contains(&age));
        let income = m["income"].as_str().expect("income is a string");
        assert!(valid_decimal_9_2(income), "income {income:?}");
        for col in ["last_update", "creditexp"] {
            let d = m[col].as_str().expect("date is a string");
            assert!(valid_date(d), "{col} = {d:?}");
        }
        assert_eq!(m["telephone"].as_str().map(str::len), Some(14));
        assert_eq!(m["zip"].as_str().map(str::len), Some(10));
        assert!(m["email"].as_str().is_some_and(|e| e.contains('@')));
    }

    #[test]
    fn good_rows_fit_the_table() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut total = 0usize;
        let rows = 2_000u64;
        for n in 0..rows {
            let id = 1_000_000 + n;
            let body = person_row(id, &mut rng, None, None);
            assert!(
                (550..=900).contains(&body.len()),
                "{} bytes: {}",
                body.len(),
                String::from_utf8_lossy(&body)
            );
            total += body.len();
            let m = parse(&body);
            assert_good_fields(&m);
            let id_s = m["id"].as_str().expect("id is a string");
            assert_eq!(id_s.len(), 20);
            assert_eq!(id_s.parse::<u64>().ok(), Some(id));
        }
        let avg = total as u64 / rows;
        assert!((650..=830).contains(&avg), "average body {avg} bytes");
    }

    #[test]
    fn keys_are_the_column_names_in_order() {
        let mut rng = StdRng::seed_from_u64(1);
        let body = String::from_utf8(person_row(5, &mut rng, None, None)).expect("utf-8");
        let mut at = 0;
        for (col, _) in LENGTHS {
            let key = format!("\"{col}\":");
            let pos = body[at..]
                .find(&key)
                .unwrap_or_else(|| panic!("{col} out of order"));
            at += pos + key.len();
        }
    }

    #[test]
    fn each_bad_kind_has_exactly_its_defect() {
        for seed in 0..50u64 {
            let good = parse(&person_row(
                42,
                &mut StdRng::seed_from_u64(seed),
                None,
                None,
            ));
            for kind in BadKind::ALL {
                let body = person_row(42, &mut StdRng::seed_from_u64(seed), Some(kind), Some(17));
                let m = parse(&body);
                let (col, expect) = match kind {
                    BadKind::DuplicateKey => ("id", serde_json::json!("00000000000000000017")),
                    BadKind::InvalidDate => ("last_update", serde_json::json!("2021-02-30")),
                    BadKind::LettersInInteger => ("age", serde_json::json!("4x2")),
                    BadKind::LettersInDecimal => ("income", serde_json::json!("12a4.50")),
                    BadKind::DateOutOfRange => ("creditexp", serde_json::json!("9999999-01-01")),
                };
                assert_eq!(m[col], expect, "{kind:?}");
                // Everything else is identical to the good row from the same RNG state.
                let mut differing: Vec<&String> = m
                    .keys()
                    .filter(|k| m[k.as_str()] != good[k.as_str()])
                    .collect();
                differing.sort();
                assert_eq!(differing, vec![col], "{kind:?}");
                if kind == BadKind::DuplicateKey {
                    assert_good_fields(&m);
                }
            }
        }
    }

    #[test]
    fn same_seed_same_bytes() {
        let gen = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..100u64)
                .map(|n| person_row(n, &mut rng, None, None))
                .collect::<Vec<_>>()
        };
        assert_eq!(gen(3), gen(3));
        assert_ne!(gen(3), gen(4));
    }

    #[test]
    fn card_numbers_pass_luhn() {
        let mut rng = StdRng::seed_from_u64(9);
        for kind in [
            "Visa",
            "MasterCard",
            "Amex",
            "Discover",
            "Diners Club",
            "JCB",
        ] {
            for _ in 0..50 {
                let c = card_number(&mut rng, kind);
                let digits: Vec<u32> = c.chars().filter_map(|ch| ch.to_digit(10)).collect();
                let sum: u32 = digits
                    .iter()
                    .rev()
                    .enumerate()
                    .map(|(i, &d)| {
                        if i % 2 == 1 {
                            (d * 2) % 9 + if d == 9 { 9 } else { 0 }
                        } else {
                            d
                        }
                    })
                    .sum();
                assert_eq!(sum % 10, 0, "{kind} {c}");
            }
        }
    }
}
