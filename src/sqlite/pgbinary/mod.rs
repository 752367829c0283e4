//! Binary COPY (`COPY ... TO STDOUT (FORMAT binary)`): the stream's framing (`framing`) and
//! the binary form of every type `pgtypes::column_kind` syncs, decoded straight into the SQLite
//! value the text path (`pgtypes::decode_text_sql`) stores for the same upstream value, so a
//! replica filled either way is the same, byte for byte.

mod framing;

pub use framing::*;
use framing::{be_i16, be_i32};

use super::pgtypes::{array_elems, oid, ArrayElems};
use crate::zql::schema::ColumnKind;
use crate::zql::value::{write_json_string, Value};
use rusqlite::types::{ToSqlOutput, ValueRef};

/// Postgres' MAXDIM: arrays have at most 6 dimensions.
pub const ARRAY_DIMS_MAX: usize = 6;
/// Days from 1970-01-01 to 2000-01-01, Postgres' epoch for dates and times.
const PG_EPOCH_DAYS: i64 = 10_957;
const DAY_MS: i64 = 86_400_000;
const DAY_US: i64 = 86_400_000_000;

// ---------------------------------------------------------------------------------------
// Values

/// A type whose binary form zcache reads.
///
/// Not float4, nor arrays of floats: the text path keeps the digits Postgres prints for
/// them (float4 read as f64 from its text, array elements verbatim), and Postgres' Ryu
/// differs from Rust's shortest formatting where a shorter decimal lies exactly on the
/// rounding interval's bound (Postgres excludes it) or exactly halfway (Postgres rounds to
/// even). Tables with such columns are copied in text. float8 itself round-trips exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scalar {
    Bool,
    Int2,
    Int4,
    Int8,
    Oid,
    Float8,
    Numeric,
    /// text, varchar, bpchar, name and enums: the characters themselves.
    Text,
    Uuid,
    Json,
    Jsonb,
    Date,
    Time,
    TimeTz,
    Timestamp,
    TimestampTz,
}

impl Scalar {
    /// The built-in type of this OID, if its binary form is read here.
    pub fn builtin(type_oid: u32) -> Option<Scalar> {
        use oid::*;
        Some(match type_oid {
            BOOL => Scalar::Bool,
            INT2 => Scalar::Int2,
            INT4 => Scalar::Int4,
            INT8 => Scalar::Int8,
            OID => Scalar::Oid,
            FLOAT8 => Scalar::Float8,
            NUMERIC => Scalar::Numeric,
            TEXT | BPCHAR | VARCHAR | NAME => Scalar::Text,
            UUID => Scalar::Uuid,
            JSON => Scalar::Json,
            JSONB => Scalar::Jsonb,
            DATE => Scalar::Date,
            TIME => Scalar::Time,
            TIMETZ => Scalar::TimeTz,
            TIMESTAMP => Scalar::Timestamp,
            TIMESTAMPTZ => Scalar::TimestampTz,
            _ => return None,
        })
    }

    /// What `array_to_json` makes of this type's elements in text form.
    fn elems(self) -> ArrayElems {
        match self {
            Scalar::Bool => ArrayElems::Booleans,
            Scalar::Int2
            | Scalar::Int4
            | Scalar::Int8
            | Scalar::Oid
            | Scalar::Float8
            | Scalar::Numeric => ArrayElems::Numbers,
            _ => ArrayElems::Strings,
        }
    }
}

/// OIDs not in `pgtypes::oid`.
const NAME: u32 = 19;

/// The element type of a built-in array type whose elements are read here.
pub fn builtin_array_elem(array_oid: u32) -> Option<u32> {
    use oid::*;
    Some(match array_oid {
        BOOL_ARRAY => BOOL,
        INT2_ARRAY => INT2,
        INT4_ARRAY => INT4,
        INT8_ARRAY => INT8,
        OID_ARRAY => OID,
        FLOAT8_ARRAY => FLOAT8,
        NUMERIC_ARRAY => NUMERIC,
        1009 => TEXT,
        1014 => BPCHAR,
        1015 => VARCHAR,
        1003 => NAME,
        2951 => UUID,
        199 => JSON,
        3807 => JSONB,
        1182 => DATE,
        1183 => TIME,
        1270 => TIMETZ,
        1115 => TIMESTAMP,
        1185 => TIMESTAMPTZ,
        _ => return None,
    })
}

/// What the catalog says about a user-defined type (OID from `FIRST_USER_OID` on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserType {
    Enum,
    ArrayOf {
        elem_oid: u32,
        elem_is_enum: bool,
    },
    /// Domains, composites, ranges, ...: not read in binary.
    Other,
}

/// How one column is read from binary COPY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryColumn {
    Scalar(Scalar),
    Array {
        elem: Scalar,
        elem_oid: u32,
        /// As the text path decides it, from the array type's OID.
        elems: ArrayElems,
    },
}

/// The binary reading of a column of `type_oid` kept as `kind`, or `None` when its binary
/// form is not read here (the table is then copied in text). `user` answers for
/// user-defined types.
pub fn plan_column(
    type_oid: u32,
    kind: ColumnKind,
    user: impl Fn(u32) -> UserType,
) -> Option<BinaryColumn> {
    let is_user = |o: u32| o >= oid::FIRST_USER_OID;
    let scalar = match kind {
        ColumnKind::Json if type_oid != oid::JSON && type_oid != oid::JSONB => {
            let (elem_oid, elem) = match builtin_array_elem(type_oid) {
                Some(e) => (e, Scalar::builtin(e)?),
                None if is_user(type_oid) => match user(type_oid) {
                    UserType::ArrayOf {
                        elem_oid,
                        elem_is_enum: true,
                    } => (elem_oid, Scalar::Text),
                    UserType::ArrayOf { elem_oid, .. } if !is_user(elem_oid) => {
                        (elem_oid, Scalar::builtin(elem_oid)?)
                    }
                    _ => return None,
                },
                None => return None,
            };
            if elem == Scalar::Float8 {
                return None;
            }
            let elems = array_elems(type_oid);
            // The text path's element kind comes from the array type; the binary one from
            // the element type. Read in binary only where the two agree.
            return (elem.elems() == elems).then_some(BinaryColumn::Array {
                elem,
                elem_oid,
                elems,
            });
        }
        ColumnKind::Null => return None,
        _ if is_user(type_oid) => match (kind, user(type_oid)) {
            (ColumnKind::String, UserType::Enum) => Scalar::Text,
            _ => return None,
        },
        _ => Scalar::builtin(type_oid)?,
    };
    let expected = match scalar {
        Scalar::Bool => ColumnKind::Boolean,
        Scalar::Text | Scalar::Uuid => ColumnKind::String,
        Scalar::Json | Scalar::Jsonb => ColumnKind::Json,
        _ => ColumnKind::Number,
    };
    (expected == kind && scalar != Scalar::Oid).then_some(BinaryColumn::Scalar(scalar))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read a binary {what:?} value of {len} bytes: {why}")]
pub struct BinaryValueError {
    pub what: Scalar,
    pub len: usize,
    pub why: &'static str,
}

fn fixed<const N: usize>(raw: &[u8]) -> Option<[u8; N]> {
    raw.try_into().ok()
}

/// The replica's value of one non-NULL binary field: what `decode_text_sql` gives for the
/// same value in text form. `scratch` is reused between calls.
#[inline]
pub fn decode_binary_sql<'a>(
    col: &BinaryColumn,
    raw: &'a [u8],
    scratch: &mut String,
) -> Result<ToSqlOutput<'a>, BinaryValueError> {
    match *col {
        BinaryColumn::Scalar(s) => decode_scalar(s, raw, scratch),
        BinaryColumn::Array {
            elem,
            elem_oid,
            elems,
        } => {
            let mut out = String::with_capacity(raw.len() + 8);
            write_array_json(raw, elem, elem_oid, elems, &mut out, scratch).map_err(|why| {
                BinaryValueError {
                    what: elem,
                    len: raw.len(),
                    why,
                }
            })?;
            Ok(ToSqlOutput::Owned(rusqlite::types::Value::Text(out)))
        }
    }
}

fn decode_scalar<'a>(
    s: Scalar,
    raw: &'a [u8],
    scratch: &mut String,
) -> Result<ToSqlOutput<'a>, BinaryValueError> {
    let err = |why| BinaryValueError {
        what: s,
        len: raw.len(),
        why,
    };
    let size = || err("wrong size");
    let value = match s {
        Scalar::Bool => ValueRef::Integer((fixed::<1>(raw).ok_or_else(size)?[0] != 0) as i64),
        Scalar::Int2 => ValueRef::Integer(i16::from_be_bytes(fixed(raw).ok_or_else(size)?).into()),
        Scalar::Int4 => ValueRef::Integer(i32::from_be_bytes(fixed(raw).ok_or_else(size)?).into()),
        Scalar::Int8 => ValueRef::Integer(i64::from_be_bytes(fixed(raw).ok_or_else(size)?)),
        Scalar::Oid => ValueRef::Integer(u32::from_be_bytes(fixed(raw).ok_or_else(size)?).into()),
        Scalar::Float8 => real(f64::from_be_bytes(fixed(raw).ok_or_else(size)?)),
        Scalar::Numeric => {
            scratch.clear();
            numeric_text(raw, scratch).map_err(err)?;
            real(text_number(scratch).ok_or_else(|| err("not a number"))?)
        }
        Scalar::Text | Scalar::Json => ValueRef::Text(utf8(raw).ok_or_else(|| err("not UTF-8"))?),
        Scalar::Jsonb => ValueRef::Text(jsonb_text(raw).ok_or_else(|| err("not jsonb v1"))?),
        Scalar::Uuid => {
            let mut text = String::with_capacity(36);
            uuid_text(&fixed(raw).ok_or_else(size)?, &mut text);
            return Ok(ToSqlOutput::Owned(rusqlite::types::Value::Text(text)));
        }
        Scalar::Date => real(date_ms(i32::from_be_bytes(fixed(raw).ok_or_else(size)?))),
        Scalar::Time => {
            ValueRef::Integer(time_ms(i64::from_be_bytes(fixed(raw).ok_or_else(size)?), 0))
        }
        Scalar::TimeTz => {
            let (us, zone) = timetz_parts(raw).ok_or_else(size)?;
            ValueRef::Integer(time_ms(us, zone))
        }
        Scalar::Timestamp | Scalar::TimestampTz => real(timestamp_ms(i64::from_be_bytes(
            fixed(raw).ok_or_else(size)?,
        ))),
    };
    Ok(ToSqlOutput::Borrowed(value))
}

/// As `replica::to_sql` stores a float: NaN (which SQLite cannot hold) as NULL.
fn real(f: f64) -> ValueRef<'static> {
    if f.is_nan() {
        ValueRef::Null
    } else {
        ValueRef::Real(f)
    }
}

fn utf8(raw: &[u8]) -> Option<&[u8]> {
    std::str::from_utf8(raw).ok().map(str::as_bytes)
}

/// jsonb's binary form: a version byte (1), then the same text `jsonb_out` gives.
fn jsonb_text(raw: &[u8]) -> Option<&[u8]> {
    match raw.split_first() {
        Some((1, text)) => utf8(text),
        _ => None,
    }
}

/// The text path parses numbers with these spellings of the non-finite values.
fn text_number(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok(),
    }
}

fn uuid_text(b: &[u8; 16], out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(HEX[(byte >> 4) as usize] as char);
        out.push(HEX[(byte & 15) as usize] as char);
    }
}

// --- numeric

const NUMERIC_POS: u16 = 0x0000;
const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_NAN: u16 = 0xC000;
const NUMERIC_PINF: u16 = 0xD000;
const NUMERIC_NINF: u16 = 0xF000;
/// Postgres' NUMERIC_DSCALE_MAX.
const NUMERIC_DSCALE_MAX: u16 = 0x3FFF;

/// Appends `numeric_out`'s text for a binary numeric: the digits, exactly `dscale` of them
/// after the point.
pub fn numeric_text(raw: &[u8], out: &mut String) -> Result<(), &'static str> {
    if raw.len() < 8 {
        return Err("numeric header too short");
    }
    let ndigits = be_i16(raw, 0);
    let weight = be_i16(raw, 2) as i32;
    let sign = u16::from_be_bytes([raw[4], raw[5]]);
    let dscale = u16::from_be_bytes([raw[6], raw[7]]);
    let ndigits = usize::try_from(ndigits).map_err(|_| "negative digit count")?;
    if raw.len() != 8 + 2 * ndigits {
        return Err("numeric digit count does not match its size");
    }
    if dscale > NUMERIC_DSCALE_MAX {
        return Err("numeric scale out of range");
    }
    let digit = |i: i32| -> Result<u32, &'static str> {
        if i < 0 || i as usize >= ndigits {
            return Ok(0);
        }
        let d = be_i16(raw, 8 + 2 * i as usize);
        if !(0..10_000).contains(&d) {
            return Err("numeric digit out of range");
        }
        Ok(d as u32)
    };
    match sign {
        NUMERIC_NAN => {
            out.push_str("NaN");
            return Ok(());
        }
        NUMERIC_PINF => {
            out.push_str("Infinity");
            return Ok(());
        }
        NUMERIC_NINF => {
            out.push_str("-Infinity");
            return Ok(());
        }
        NUMERIC_NEG => out.push('-'),
        NUMERIC_POS => {}
        _ => return Err("invalid numeric sign"),
    }
    out.reserve(weight.max(0) as usize * 4 + dscale as usize + 6);
    if weight < 0 {
        out.push('0');
    } else {
        for i in 0..=weight {
            let d = digit(i)?;
            if i == 0 {
                push_u64(out, d.into());
            } else {
                push_padded(out, d, 4);
            }
        }
    }
    if dscale > 0 {
        out.push('.');
        let mut left = dscale as usize;
        let mut i = weight + 1;
        while left > 0 {
            let d = digit(i)?;
            let group = [d / 1000, d / 100 % 10, d / 10 % 10, d % 10];
            let take = left.min(4);
            for g in &group[..take] {
                out.push(char::from(b'0' + *g as u8));
            }
            left -= take;
            i += 1;
        }
    }
    Ok(())
}

fn push_padded(out: &mut String, d: u32, width: usize) {
    use std::fmt::Write;
    let _ = write!(out, "{d:0width$}");
}

fn push_u64(out: &mut String, v: u64) {
    use std::fmt::Write;
    let _ = write!(out, "{v}");
}

fn push_i64(out: &mut String, v: i64) {
    use std::fmt::Write;
    let _ = write!(out, "{v}");
}

// --- dates and times

/// Year, month, day of a day count since 1970-01-01 (proleptic Gregorian; year 0 is 1 BC).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A date as the text path stores it: epoch milliseconds of its midnight UTC.
fn date_ms(days: i32) -> f64 {
    match days {
        i32::MAX => f64::INFINITY,
        i32::MIN => f64::NEG_INFINITY,
        d => (i64::from(d) + PG_EPOCH_DAYS) as f64 * 86_400_000.0,
    }
}

/// A time (µs since midnight, zone offset in seconds west of UTC) as the text path stores
/// it: milliseconds since midnight UTC, sub-millisecond digits dropped, wrapped into a day.
fn time_ms(us: i64, zone_west_s: i32) -> i64 {
    (us.div_euclid(1000) + i64::from(zone_west_s) * 1000).rem_euclid(DAY_MS)
}

fn timetz_parts(raw: &[u8]) -> Option<(i64, i32)> {
    let b: [u8; 12] = fixed(raw)?;
    let us = i64::from_be_bytes(b[..8].try_into().ok()?);
    let zone = i32::from_be_bytes(b[8..].try_into().ok()?);
    Some((us, zone))
}

/// A timestamp (µs since 2000-01-01) as `parse_timestamp_ms` computes it from the text
/// form, with the same float operations in the same order, so both give the same bits
/// even where milliseconds since 1970 are not exact in an f64.
fn timestamp_ms(us: i64) -> f64 {
    match us {
        i64::MAX => return f64::INFINITY,
        i64::MIN => return f64::NEG_INFINITY,
        _ => {}
    }
    let us = i128::from(us) + i128::from(PG_EPOCH_DAYS) * i128::from(DAY_US);
    let days = us.div_euclid(i128::from(DAY_US)) as i64;
    let tod = us.rem_euclid(i128::from(DAY_US)) as i64;
    let (hh, mi, sec_us) = (tod / 3_600_000_000, tod / 60_000_000 % 60, tod % 60_000_000);
    let mut ms = days as f64 * 86_400_000.0;
    ms += (hh * 3_600_000 + mi * 60_000) as f64;
    // `SS.ffffff` parsed as an f64 is this quotient, both correctly rounded.
    let sec = sec_us as f64 / 1e6;
    ms += sec * 1000.0;
    (ms * 1000.0).round() / 1000.0
}

/// `YYYY-MM-DD` with Postgres' ISO year rule; true when the year is BC.
fn push_date(days_since_1970: i64, out: &mut String) -> bool {
    let (y, m, d) = civil_from_days(days_since_1970);
    let bc = y <= 0;
    let year = if bc { 1 - y } else { y };
    push_padded(out, year as u32, 4);
    out.push('-');
    push_padded(out, m, 2);
    out.push('-');
    push_padded(out, d, 2);
    bc
}

/// `HH:MM:SS[.ffffff]` with trailing zeros of the fraction dropped, as Postgres writes it.
fn push_time_of_day(us: i64, out: &mut String) {
    let (hh, mi, s, frac) = (
        us / 3_600_000_000,
        us / 60_000_000 % 60,
        us / 1_000_000 % 60,
        us % 1_000_000,
    );
    push_padded(out, hh as u32, 2);
    out.push(':');
    push_padded(out, mi as u32, 2);
    out.push(':');
    push_padded(out, s as u32, 2);
    if frac != 0 {
        let mut f = format!("{frac:06}");
        while f.ends_with('0') {
            f.pop();
        }
        out.push('.');
        out.push_str(&f);
    }
}

/// Postgres' zone suffix for an offset in seconds west of UTC: `+HH`, `+HH:MM`, `+HH:MM:SS`.
fn push_zone(west_s: i32, out: &mut String) {
    out.push(if west_s <= 0 { '+' } else { '-' });
    let total = west_s.unsigned_abs();
    let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
    push_padded(out, h, 2);
    if m != 0 || s != 0 {
        out.push(':');
        push_padded(out, m, 2);
    }
    if s != 0 {
        out.push(':');
        push_padded(out, s, 2);
    }
}

fn date_text(days: i32, out: &mut String) {
    match days {
        i32::MAX => out.push_str("infinity"),
        i32::MIN => out.push_str("-infinity"),
        d => {
            if push_date(i64::from(d) + PG_EPOCH_DAYS, out) {
                out.push_str(" BC");
            }
        }
    }
}

fn timestamp_text(us: i64, with_zone: bool, out: &mut String) {
    match us {
        i64::MAX => return out.push_str("infinity"),
        i64::MIN => return out.push_str("-infinity"),
        _ => {}
    }
    let days = us.div_euclid(DAY_US) + PG_EPOCH_DAYS;
    let bc = push_date(days, out);
    out.push(' ');
    push_time_of_day(us.rem_euclid(DAY_US), out);
    if with_zone {
        // Sessions run with TimeZone=UTC.
        out.push_str("+00");
    }
    if bc {
        out.push_str(" BC");
    }
}

/// Appends the text form Postgres gives a scalar (DateStyle ISO, TimeZone UTC).
pub fn scalar_text(s: Scalar, raw: &[u8], out: &mut String) -> Result<(), &'static str> {
    const SIZE: &str = "wrong size";
    match s {
        Scalar::Bool => {
            let b = fixed::<1>(raw).ok_or(SIZE)?[0] != 0;
            out.push(if b { 't' } else { 'f' });
        }
        Scalar::Int2 => push_i64(out, i16::from_be_bytes(fixed(raw).ok_or(SIZE)?).into()),
        Scalar::Int4 => push_i64(out, i32::from_be_bytes(fixed(raw).ok_or(SIZE)?).into()),
        Scalar::Int8 => push_i64(out, i64::from_be_bytes(fixed(raw).ok_or(SIZE)?)),
        Scalar::Oid => push_u64(out, u32::from_be_bytes(fixed(raw).ok_or(SIZE)?).into()),
        // Never an array element (see `Scalar`); a scalar float8 is stored as its value.
        Scalar::Float8 => return Err("float text is not reproduced"),
        Scalar::Numeric => numeric_text(raw, out)?,
        Scalar::Text | Scalar::Json => {
            out.push_str(std::str::from_utf8(raw).map_err(|_| "not UTF-8")?)
        }
        Scalar::Jsonb => {
            let text = jsonb_text(raw).ok_or("not jsonb v1")?;
            out.push_str(std::str::from_utf8(text).map_err(|_| "not UTF-8")?);
        }
        Scalar::Uuid => uuid_text(&fixed(raw).ok_or(SIZE)?, out),
        Scalar::Date => date_text(i32::from_be_bytes(fixed(raw).ok_or(SIZE)?), out),
        Scalar::Time => {
            let us = i64::from_be_bytes(fixed(raw).ok_or(SIZE)?);
            if !(0..=DAY_US).contains(&us) {
                return Err("time out of range");
            }
            push_time_of_day(us, out);
        }
        Scalar::TimeTz => {
            let (us, zone) = timetz_parts(raw).ok_or(SIZE)?;
            if !(0..=DAY_US).contains(&us) {
                return Err("time out of range");
            }
            push_time_of_day(us, out);
            push_zone(zone, out);
        }
        Scalar::Timestamp => {
            timestamp_text(i64::from_be_bytes(fixed(raw).ok_or(SIZE)?), false, out)
        }
        Scalar::TimestampTz => {
            timestamp_text(i64::from_be_bytes(fixed(raw).ok_or(SIZE)?), true, out)
        }
    }
    Ok(())
}

// --- arrays

/// Writes a binary array as the JSON `pgtypes::array_to_json` makes of its text form.
pub fn write_array_json(
    raw: &[u8],
    elem: Scalar,
    elem_oid: u32,
    elems: ArrayElems,
    out: &mut String,
    scratch: &mut String,
) -> Result<(), &'static str> {
    if raw.len() < 12 {
        return Err("array header too short");
    }
    let ndim = be_i32(raw, 0);
    let flags = be_i32(raw, 4);
    let got_oid = be_i32(raw, 8) as u32;
    let ndim = usize::try_from(ndim).map_err(|_| "negative dimension count")?;
    if ndim > ARRAY_DIMS_MAX {
        return Err("too many dimensions");
    }
    if flags & !1 != 0 {
        return Err("invalid array flags");
    }
    if ndim > 0 && got_oid != elem_oid {
        return Err("unexpected element type");
    }
    let dims_end = 12 + ndim * 8;
    if raw.len() < dims_end {
        return Err("array dimensions cut short");
    }
    let mut dims = [0usize; ARRAY_DIMS_MAX];
    let mut total: usize = 1;
    for (i, dim) in dims.iter_mut().enumerate().take(ndim) {
        let n = be_i32(raw, 12 + i * 8);
        *dim = usize::try_from(n).map_err(|_| "negative dimension")?;
        total = total.saturating_mul(*dim);
    }
    let body = &raw[dims_end..];
    if ndim == 0 || total == 0 {
        // Postgres writes every empty array as `{}`.
        return if body.is_empty() {
            out.push_str("[]");
            Ok(())
        } else {
            Err("bytes after an empty array")
        };
    }
    // Every element takes at least its 4-byte length: refuse counts the bytes cannot hold.
    if total > body.len() / 4 {
        return Err("more elements than bytes");
    }
    let mut pos = 0;
    let mut w = ArrayWriter {
        body,
        pos: &mut pos,
        elem,
        elems,
        scratch,
    };
    w.level(&dims[..ndim], out)?;
    if pos != body.len() {
        return Err("bytes after the last element");
    }
    Ok(())
}

struct ArrayWriter<'b, 'p, 's> {
    body: &'b [u8],
    pos: &'p mut usize,
    elem: Scalar,
    elems: ArrayElems,
    scratch: &'s mut String,
}

impl ArrayWriter<'_, '_, '_> {
    fn level(&mut self, dims: &[usize], out: &mut String) -> Result<(), &'static str> {
        out.push('[');
        for i in 0..dims[0] {
            if i > 0 {
                out.push(',');
            }
            if dims.len() > 1 {
                self.level(&dims[1..], out)?;
            } else {
                self.element(out)?;
            }
        }
        out.push(']');
        Ok(())
    }

    fn element(&mut self, out: &mut String) -> Result<(), &'static str> {
        let at = *self.pos;
        if self.body.len() < at + 4 {
            return Err("array element cut short");
        }
        let len = be_i32(self.body, at);
        *self.pos = at + 4;
        if len == -1 {
            out.push_str("null");
            return Ok(());
        }
        let len = usize::try_from(len).map_err(|_| "invalid element length")?;
        let raw = self
            .body
            .get(*self.pos..*self.pos + len)
            .ok_or("array element cut short")?;
        *self.pos += len;
        match (self.elems, self.elem) {
            (ArrayElems::Booleans, Scalar::Bool) => {
                let b = fixed::<1>(raw).ok_or("wrong size")?[0] != 0;
                out.push_str(if b { "true" } else { "false" });
            }
            (ArrayElems::Numbers, Scalar::Int2 | Scalar::Int4 | Scalar::Int8 | Scalar::Oid) => {
                scalar_text(self.elem, raw, out)?;
            }
            (ArrayElems::Numbers, _) => {
                self.scratch.clear();
                scalar_text(self.elem, raw, self.scratch)?;
                write_json_number(self.scratch, out);
            }
            _ => {
                self.scratch.clear();
                scalar_text(self.elem, raw, self.scratch)?;
                write_json_string(self.scratch, out);
            }
        }
        Ok(())
    }
}

/// `pgtypes`' rule for a numeric element: verbatim when valid JSON, else its f64 value;
/// NaN and infinities become null.
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

#[cfg(test)]
mod tests;
