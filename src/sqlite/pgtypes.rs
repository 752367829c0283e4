//! Postgres types as the replica stores them and the client sees them
//! (zero-protocol.md §4): numbers, strings, booleans, JSON, and times as epoch milliseconds.

use crate::zql::schema::ColumnKind;
use crate::zql::value::Value;

/// Postgres type OIDs zcache treats specially (from `pg_type.dat`).
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const TEXT: u32 = 25;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const UUID: u32 = 2950;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMETZ: u32 = 1266;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const JSONB: u32 = 3802;
    pub const BOOL_ARRAY: u32 = 1000;
    pub const INT2_ARRAY: u32 = 1005;
    pub const INT4_ARRAY: u32 = 1007;
    pub const INT8_ARRAY: u32 = 1016;
    pub const FLOAT4_ARRAY: u32 = 1021;
    pub const FLOAT8_ARRAY: u32 = 1022;
    pub const OID_ARRAY: u32 = 1028;
    pub const NUMERIC_ARRAY: u32 = 1231;
    /// Postgres' FirstNormalObjectId: types from here on are user-defined (enums, ...).
    pub const FIRST_USER_OID: u32 = 16384;
}

/// What the elements of an array type become in its JSON form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArrayElems {
    Numbers,
    Booleans,
    /// Every other element type (text, uuid, enums, times, ...): its text form, always a
    /// string, even when it reads like a number or a boolean (`{123,t}` of text[]).
    Strings,
}

/// The element kind of an array type, by the array type's OID.
pub fn array_elems(array_type_oid: u32) -> ArrayElems {
    use oid::*;
    match array_type_oid {
        BOOL_ARRAY => ArrayElems::Booleans,
        INT2_ARRAY | INT4_ARRAY | INT8_ARRAY | FLOAT4_ARRAY | FLOAT8_ARRAY | OID_ARRAY
        | NUMERIC_ARRAY => ArrayElems::Numbers,
        _ => ArrayElems::Strings,
    }
}

/// How a column of a Postgres type is kept: `None` for types zero-cache does not sync (it
/// syncs exactly these, `zero-cache/src/types/pg-data-type.ts`: numbers, date/time types,
/// text kinds and uuid, bool, json/jsonb, enums, and any array as JSON; not bytea, inet,
/// interval, money, oid, ...). `is_array` comes from `pg_type.typcategory = 'A'`.
/// User-defined types are taken as enums (text); the catalog is not asked per change.
pub fn column_kind(type_oid: u32, is_array: bool) -> Option<ColumnKind> {
    use oid::*;
    if is_array {
        return Some(ColumnKind::Json);
    }
    Some(match type_oid {
        BOOL => ColumnKind::Boolean,
        INT2 | INT4 | INT8 | FLOAT4 | FLOAT8 | NUMERIC | DATE | TIME | TIMETZ | TIMESTAMP
        | TIMESTAMPTZ => ColumnKind::Number,
        JSON | JSONB => ColumnKind::Json,
        TEXT | BPCHAR | VARCHAR | UUID => ColumnKind::String,
        t if t >= FIRST_USER_OID => ColumnKind::String,
        _ => return None,
    })
}

/// The SQLite declared type that gives the right affinity.
pub fn sqlite_decl(type_oid: u32, kind: ColumnKind) -> &'static str {
    use oid::*;
    match (kind, type_oid) {
        (ColumnKind::Boolean, _) => "BOOLEAN",
        (ColumnKind::Number, INT2 | INT4 | INT8 | OID | TIME | TIMETZ) => "INTEGER",
        (ColumnKind::Number, _) => "REAL",
        (ColumnKind::Json, _) => "JSON",
        _ => "TEXT",
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("cannot read {text:?} as Postgres type {type_oid}: {why}")]
pub struct TypeError {
    pub type_oid: u32,
    pub text: String,
    pub why: &'static str,
}

/// Converts a value in Postgres text output format to the replica's value.
pub fn decode_text(type_oid: u32, kind: ColumnKind, text: &str) -> Result<Value, TypeError> {
    use oid::*;
    let err = |why| TypeError {
        type_oid,
        text: text.chars().take(64).collect(),
        why,
    };
    Ok(match (kind, type_oid) {
        (ColumnKind::Boolean, _) => match text {
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            _ => return Err(err("not a boolean")),
        },
        (ColumnKind::Number, INT2 | INT4 | INT8 | OID) => {
            Value::Int(text.parse().map_err(|_| err("not an integer"))?)
        }
        (ColumnKind::Number, DATE) => {
            Value::Float(parse_timestamp_ms(text).ok_or_else(|| err("not a date"))?)
        }
        (ColumnKind::Number, TIME | TIMETZ) => {
            Value::Int(parse_time_ms(text).ok_or_else(|| err("not a time"))?)
        }
        (ColumnKind::Number, TIMESTAMP | TIMESTAMPTZ) => {
            Value::Float(parse_timestamp_ms(text).ok_or_else(|| err("not a timestamp"))?)
        }
        (ColumnKind::Number, _) => match text {
            "NaN" => Value::Float(f64::NAN),
            "Infinity" => Value::Float(f64::INFINITY),
            "-Infinity" => Value::Float(f64::NEG_INFINITY),
            _ => Value::Float(text.parse().map_err(|_| err("not a number"))?),
        },
        (ColumnKind::Json, JSON | JSONB) => Value::Json(text.to_string()),
        (ColumnKind::Json, _) => Value::Json(
            array_to_json(text, array_elems(type_oid)).ok_or_else(|| err("not an array"))?,
        ),
        _ => Value::Text(text.to_string()),
    })
}

/// Milliseconds since midnight UTC of a `time`/`timetz` (`HH:MM:SS[.ffffff][+-HH[:MM]]`), as
/// zero-cache reads them: sub-millisecond digits dropped, the zone offset applied, wrapped into
/// one day (24:00:00 is the end of the day).
pub fn parse_time_ms(text: &str) -> Option<i64> {
    const DAY_MS: i64 = 86_400_000;
    let zone_at = text.find(['+', '-']).unwrap_or(text.len());
    let (time, zone) = text.split_at(zone_at);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut parts = hms.splitn(3, ':');
    let (h, m, sec) = (
        num(parts.next()?)?,
        num(parts.next()?)?,
        num(parts.next()?)?,
    );
    if h > 24 || m >= 60 || sec >= 60 || (h == 24 && (m, sec) != (0, 0)) || frac.len() > 6 {
        return None;
    }
    let millis = if frac.is_empty() {
        0
    } else {
        num(&format!("{frac:0<6}")[..3])?
    };
    let mut ms = h * 3_600_000 + m * 60_000 + sec * 1000 + millis;
    if !zone.is_empty() {
        let sign = if zone.starts_with('-') { -1 } else { 1 };
        let mut z = zone[1..].splitn(2, ':');
        let zh = num(z.next()?)?;
        let zm = z.next().map(num).unwrap_or(Some(0))?;
        ms -= sign * (zh * 3_600_000 + zm * 60_000);
    }
    Some(ms.rem_euclid(DAY_MS))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn num(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses ISO `YYYY-MM-DD[ HH:MM:SS[.ffffff]][+HH[:MM[:SS]]]` (Postgres' output with
/// DateStyle=ISO) to milliseconds since the epoch, UTC.
pub fn parse_timestamp_ms(text: &str) -> Option<f64> {
    match text {
        "infinity" => return Some(f64::INFINITY),
        "-infinity" => return Some(f64::NEG_INFINITY),
        _ => {}
    }
    let (text, bc) = match text.strip_suffix(" BC") {
        Some(t) => (t, true),
        None => (text, false),
    };
    let (date, rest) = text.split_at(text.find([' ', 'T']).unwrap_or(text.len()));
    let mut parts = date.splitn(3, '-');
    let mut y = num(parts.next()?)?;
    let m = num(parts.next()?)?;
    let d = num(parts.next()?)?;
    if bc {
        y = 1 - y;
    }
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let mut ms = days_from_civil(y, m, d) as f64 * 86_400_000.0;
    let rest = rest.trim_start_matches([' ', 'T']);
    if rest.is_empty() {
        return Some(ms);
    }
    // time, then an optional zone offset starting with + or -
    let zone_at = rest.find(['+', '-']).unwrap_or(rest.len());
    let (time, zone) = rest.split_at(zone_at);
    let mut t = time.splitn(3, ':');
    let hh = num(t.next()?)?;
    let mi = num(t.next()?)?;
    let sec: f64 = t.next().unwrap_or("0").parse().ok()?;
    ms += (hh * 3_600_000 + mi * 60_000) as f64 + sec * 1000.0;
    if !zone.is_empty() {
        let sign = if zone.starts_with('-') { -1.0 } else { 1.0 };
        let mut z = zone[1..].splitn(3, ':');
        let zh = num(z.next()?)? as f64;
        let zm = z.next().map(num).unwrap_or(Some(0))? as f64;
        let zs = z.next().map(num).unwrap_or(Some(0))? as f64;
        ms -= sign * (zh * 3_600_000.0 + zm * 60_000.0 + zs * 1000.0);
    }
    // Microsecond inputs give fractions of a millisecond; keep them as Postgres does.
    Some((ms * 1000.0).round() / 1000.0)
}

/// Converts a Postgres array literal (`{1,2}`, `{"a b",NULL}`, nested) to JSON text.
/// An unquoted `NULL` becomes null; other unquoted elements are numbers or booleans only when
/// `elems` says the array holds them, quoted elements are always strings.
pub fn array_to_json(text: &str, elems: ArrayElems) -> Option<String> {
    let bytes = text.as_bytes();
    // Skip an optional dimension decoration like `[1:2]=`.
    let start = if bytes.first() == Some(&b'[') {
        text.find('=')? + 1
    } else {
        0
    };
    let mut out = String::with_capacity(text.len() + 8);
    let mut pos = start;
    parse_array(bytes, &mut pos, &mut out, elems)?;
    (pos == bytes.len()).then_some(out)
}

fn parse_array(b: &[u8], pos: &mut usize, out: &mut String, elems: ArrayElems) -> Option<()> {
    if b.get(*pos) != Some(&b'{') {
        return None;
    }
    *pos += 1;
    out.push('[');
    if b.get(*pos) == Some(&b'}') {
        *pos += 1;
        out.push(']');
        return Some(());
    }
    loop {
        match b.get(*pos)? {
            b'{' => parse_array(b, pos, out, elems)?,
            b'"' => {
                *pos += 1;
                let mut s = Vec::new();
                loop {
                    match b.get(*pos)? {
                        b'\\' => {
                            s.push(*b.get(*pos + 1)?);
                            *pos += 2;
                        }
                        b'"' => {
                            *pos += 1;
                            break;
                        }
                        &c => {
                            s.push(c);
                            *pos += 1;
                        }
                    }
                }
                crate::zql::value::write_json_string(std::str::from_utf8(&s).ok()?, out);
            }
            _ => {
                let begin = *pos;
                while !matches!(b.get(*pos)?, b',' | b'}') {
                    *pos += 1;
                }
                let raw = std::str::from_utf8(&b[begin..*pos]).ok()?;
                if raw == "NULL" {
                    out.push_str("null");
                } else if elems == ArrayElems::Numbers {
                    write_json_number(raw, out);
                } else if elems == ArrayElems::Booleans && (raw == "t" || raw == "f") {
                    out.push_str(if raw == "t" { "true" } else { "false" });
                } else {
                    crate::zql::value::write_json_string(raw, out);
                }
            }
        }
        match b.get(*pos)? {
            b',' => {
                out.push(',');
                *pos += 1;
            }
            b'}' => {
                *pos += 1;
                out.push(']');
                return Some(());
            }
            _ => return None,
        }
    }
}

/// A numeric array element as a JSON number: verbatim when it already is valid JSON, else
/// its f64 value; NaN and infinities (which JSON lacks) become null, as `JSON.stringify` does.
fn write_json_number(raw: &str, out: &mut String) {
    if serde_json::from_str::<serde_json::Number>(raw).is_ok() {
        out.push_str(raw);
        return;
    }
    match raw.parse::<f64>() {
        Ok(f) if f.is_finite() => Value::Float(f).write_json(out),
        _ => out.push_str("null"),
    }
}

/// Splits one line of text-format COPY output into its fields, undoing COPY's escapes.
/// `None` marks SQL NULL (`\N`).
pub fn split_copy_line(line: &[u8]) -> Result<Vec<Option<String>>, &'static str> {
    let mut fields = Vec::new();
    let mut scratch = Vec::new();
    copy_line_fields(
        line,
        &mut scratch,
        |e| e,
        |_, f| {
            fields.push(f.map(str::to_string));
            Ok(())
        },
    )?;
    Ok(fields)
}

/// Like `split_copy_line` without allocating per field: hands each field (its index, `None`
/// for NULL) to `f`, borrowed from `line` when it has no escapes, else unescaped into
/// `scratch`. Returns the number of fields.
pub fn copy_line_fields<E>(
    line: &[u8],
    scratch: &mut Vec<u8>,
    on_error: impl Fn(&'static str) -> E,
    mut f: impl FnMut(usize, Option<&str>) -> Result<(), E>,
) -> Result<usize, E> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let mut n = 0;
    for raw in line.split(|&b| b == b'\t') {
        if raw == b"\\N" {
            f(n, None)?;
        } else if !raw.contains(&b'\\') {
            let text = std::str::from_utf8(raw).map_err(|_| on_error(NOT_UTF8))?;
            f(n, Some(text))?;
        } else {
            scratch.clear();
            unescape_copy_field(raw, scratch).map_err(&on_error)?;
            let text = std::str::from_utf8(scratch).map_err(|_| on_error(NOT_UTF8))?;
            f(n, Some(text))?;
        }
        n += 1;
    }
    Ok(n)
}

const NOT_UTF8: &str = "COPY data is not UTF-8";

/// Undoes text COPY's backslash escapes of one field, appending to `out`.
fn unescape_copy_field(raw: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
    out.reserve(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != b'\\' {
            out.push(raw[i]);
            i += 1;
            continue;
        }
        let c = *raw.get(i + 1).ok_or("dangling backslash in COPY data")?;
        i += 2;
        match c {
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = (c - b'0') as u32;
                let mut n = 1;
                while n < 3 && i < raw.len() && (b'0'..=b'7').contains(&raw[i]) {
                    v = v * 8 + (raw[i] - b'0') as u32;
                    i += 1;
                    n += 1;
                }
                out.push(v as u8);
            }
            b'x' => {
                let mut v = 0u32;
                let mut n = 0;
                while n < 2 && i < raw.len() && raw[i].is_ascii_hexdigit() {
                    v = v * 16 + (raw[i] as char).to_digit(16).unwrap_or(0);
                    i += 1;
                    n += 1;
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
    Ok(())
}

/// `replica::to_sql(&decode_text(..)?)` without allocating for the common kinds: text is
/// borrowed, integers and booleans are parsed in place.
#[inline]
pub fn decode_text_sql<'a>(
    type_oid: u32,
    kind: ColumnKind,
    text: &'a str,
) -> Result<rusqlite::types::ToSqlOutput<'a>, TypeError> {
    use oid::*;
    use rusqlite::types::{ToSqlOutput, ValueRef};
    let borrowed = match (kind, type_oid) {
        (ColumnKind::String | ColumnKind::Null, _) => Some(ValueRef::Text(text.as_bytes())),
        (ColumnKind::Number, INT2 | INT4 | INT8 | OID) => text.parse().ok().map(ValueRef::Integer),
        (ColumnKind::Boolean, _) => match text {
            "t" | "true" => Some(ValueRef::Integer(1)),
            "f" | "false" => Some(ValueRef::Integer(0)),
            _ => None,
        },
        _ => None,
    };
    match borrowed {
        Some(v) => Ok(ToSqlOutput::Borrowed(v)),
        // Floats, times, JSON, arrays and every error: the one general decoder.
        None => Ok(ToSqlOutput::Owned(super::replica::to_sql(&decode_text(
            type_oid, kind, text,
        )?))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_to_ms_since_midnight() {
        assert_eq!(parse_time_ms("00:00:00"), Some(0));
        assert_eq!(parse_time_ms("12:34:56.789123"), Some(45_296_789));
        assert_eq!(parse_time_ms("01:00:00+02"), Some(82_800_000));
        assert_eq!(parse_time_ms("23:30:00-01:30"), Some(3_600_000));
        assert_eq!(parse_time_ms("24:00:00"), Some(0));
        assert_eq!(parse_time_ms("25:00:00"), None);
        assert_eq!(parse_time_ms("x"), None);
    }

    #[test]
    fn only_zero_cache_types_are_synced() {
        assert_eq!(column_kind(oid::TIME, false), Some(ColumnKind::Number));
        assert_eq!(column_kind(oid::UUID, false), Some(ColumnKind::String));
        assert_eq!(column_kind(16_500, false), Some(ColumnKind::String)); // an enum
        assert_eq!(column_kind(17, true), Some(ColumnKind::Json)); // any array
        for unsynced in [
            oid::BYTEA,
            oid::OID,
            869,  /* inet */
            1186, /* interval */
            790,  /* money */
        ] {
            assert_eq!(column_kind(unsynced, false), None, "{unsynced}");
        }
    }

    #[test]
    fn timestamps_to_epoch_ms() {
        assert_eq!(parse_timestamp_ms("1970-01-01"), Some(0.0));
        assert_eq!(
            parse_timestamp_ms("2023-11-14 22:13:20"),
            Some(1_700_000_000_000.0)
        );
        assert_eq!(
            parse_timestamp_ms("2023-11-14 23:13:20+01"),
            Some(1_700_000_000_000.0)
        );
        assert_eq!(
            parse_timestamp_ms("2023-11-14 22:13:20.123456+00"),
            Some(1_700_000_000_123.456)
        );
        assert_eq!(
            parse_timestamp_ms("1969-12-31 23:59:59-00:30"),
            Some(1_799_000.0)
        );
        assert_eq!(parse_timestamp_ms("garbage"), None);
    }

    #[test]
    fn arrays_to_json() {
        use ArrayElems::*;
        assert_eq!(array_to_json("{}", Numbers).as_deref(), Some("[]"));
        assert_eq!(
            array_to_json("{1,2,3}", Numbers).as_deref(),
            Some("[1,2,3]")
        );
        assert_eq!(
            array_to_json(r#"{"a b",NULL,c,"q\"x"}"#, Strings).as_deref(),
            Some(r#"["a b",null,"c","q\"x"]"#)
        );
        assert_eq!(
            array_to_json("{{1,2},{3,4}}", Numbers).as_deref(),
            Some("[[1,2],[3,4]]")
        );
        assert_eq!(array_to_json("{1,2", Numbers), None);
        // Postgres' forms that are not JSON numbers (found by fuzzing).
        assert_eq!(
            array_to_json("{-08,0.,+1,.5,NaN,Infinity}", Numbers).as_deref(),
            Some("[-8,0,1,0.5,null,null]")
        );
        // text[] elements that read like numbers or booleans are still strings
        assert_eq!(
            array_to_json("{123,t,1e5,NULL}", Strings).as_deref(),
            Some(r#"["123","t","1e5",null]"#)
        );
        assert_eq!(
            array_to_json("{t,f,NULL}", Booleans).as_deref(),
            Some("[true,false,null]")
        );
        assert_eq!(array_elems(oid::INT4_ARRAY), Numbers);
        assert_eq!(array_elems(oid::BOOL_ARRAY), Booleans);
        assert_eq!(array_elems(1009), Strings); // text[]
    }

    #[test]
    fn copy_lines() {
        let f = split_copy_line(b"i1\ta\\tb\\\\c\t\\N\t\\101\n").expect("valid");
        assert_eq!(
            f,
            vec![
                Some("i1".into()),
                Some("a\tb\\c".into()),
                None,
                Some("A".into())
            ]
        );
    }

    #[test]
    fn decodes_by_type() {
        assert_eq!(
            decode_text(oid::INT8, ColumnKind::Number, "42"),
            Ok(Value::Int(42))
        );
        assert_eq!(
            decode_text(oid::BOOL, ColumnKind::Boolean, "t"),
            Ok(Value::Bool(true))
        );
        assert_eq!(
            decode_text(oid::NUMERIC, ColumnKind::Number, "1.5"),
            Ok(Value::Float(1.5))
        );
        assert!(decode_text(oid::INT4, ColumnKind::Number, "x").is_err());
    }

    #[test]
    fn copy_fields_borrow_or_unescape() {
        let mut scratch = Vec::new();
        let mut seen = Vec::new();
        let n = copy_line_fields(
            b"plain\t\\N\tx\\ny\t\n",
            &mut scratch,
            |e| e,
            |i, f| {
                seen.push((i, f.map(str::to_string)));
                Ok(())
            },
        )
        .expect("valid");
        assert_eq!(n, 4);
        assert_eq!(
            seen,
            vec![
                (0, Some("plain".into())),
                (1, None),
                (2, Some("x\ny".into())),
                (3, Some(String::new()))
            ]
        );
        assert!(split_copy_line(b"a\\").is_err());
        assert!(split_copy_line(b"\xff").is_err());
        assert!(split_copy_line(b"\\377").is_err());
    }

    /// The kinds and types the replica distinguishes, for the equivalence property.
    const KINDS: [(u32, ColumnKind); 12] = [
        (25, ColumnKind::String),
        (oid::INT2, ColumnKind::Number),
        (oid::INT4, ColumnKind::Number),
        (oid::INT8, ColumnKind::Number),
        (oid::FLOAT8, ColumnKind::Number),
        (oid::NUMERIC, ColumnKind::Number),
        (oid::TIMESTAMPTZ, ColumnKind::Number),
        (oid::DATE, ColumnKind::Number),
        (oid::BOOL, ColumnKind::Boolean),
        (oid::JSONB, ColumnKind::Json),
        (oid::INT4_ARRAY, ColumnKind::Json),
        (1009, ColumnKind::Json),
    ];

    fn owned(v: rusqlite::types::ToSqlOutput<'_>) -> rusqlite::types::Value {
        use rusqlite::types::ToSqlOutput;
        match v {
            ToSqlOutput::Borrowed(r) => rusqlite::types::Value::try_from(r).expect("utf-8 text"),
            ToSqlOutput::Owned(v) => v,
            _ => panic!("unexpected output"),
        }
    }

    proptest::proptest! {
        #[test]
        fn decode_text_sql_matches_decode_text(
            k in 0..KINDS.len(),
            s in proptest::prop_oneof![
                proptest::string::string_regex("-?[0-9]{1,20}").expect("regex"),
                proptest::string::string_regex("(t|f|true|false|NaN|Infinity)").expect("regex"),
                proptest::string::string_regex("\\{[0-9,]{0,8}\\}").expect("regex"),
                proptest::string::string_regex("20[0-9]{2}-0[1-9]-1[0-9]( 1[0-9]:[0-5][0-9]:[0-5][0-9])?").expect("regex"),
                proptest::arbitrary::any::<String>(),
            ],
        ) {
            let (oid, kind) = KINDS[k];
            let general = decode_text(oid, kind, &s).map(|v| crate::sqlite::replica::to_sql(&v));
            let fast = decode_text_sql(oid, kind, &s).map(owned);
            proptest::prop_assert_eq!(general, fast);
        }

        #[test]
        fn decoders_never_panic(s: String, b: Vec<u8>) {
            let _ = parse_timestamp_ms(&s);
            let _ = array_to_json(&s, ArrayElems::Strings);
            let _ = array_to_json(&s, ArrayElems::Numbers);
            let _ = split_copy_line(&b);
        }
    }
}
