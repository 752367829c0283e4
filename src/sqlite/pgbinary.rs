//! Binary COPY (`COPY ... TO STDOUT (FORMAT binary)`): the stream's framing and the binary
//! form of every type `pgtypes::column_kind` syncs, decoded straight into the SQLite value
//! the text path (`pgtypes::decode_text_sql`) stores for the same upstream value, so a
//! replica filled either way is the same, byte for byte.
//!
//! The framing decoder takes the stream in chunks of any size (Postgres sends one row per
//! CopyData message, but nothing here relies on it) and holds back at most one incomplete
//! header or tuple between chunks.

use super::pgtypes::{array_elems, oid, ArrayElems};
use crate::zql::schema::ColumnKind;
use crate::zql::value::{write_json_string, Value};
use rusqlite::types::{ToSqlOutput, ValueRef};

/// The 11 bytes every binary COPY stream starts with.
pub const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// Signature, flags and the header extension's length.
const HEADER_FIXED_BYTES: usize = 19;
/// Largest header extension accepted (Postgres sends none).
pub const HEADER_EXTENSION_BYTES_MAX: usize = 1 << 20;
/// Largest tuple accepted: Postgres builds a COPY row in one buffer of at most 1 GiB.
pub const TUPLE_BYTES_MAX: usize = (1 << 30) + (64 << 10);
/// Flag bit 16: every tuple carries an OID (servers before 12); zcache never asks for it.
const FLAG_HAS_OIDS: u32 = 1 << 16;
/// Flag bits 16..31 are critical: a reader must refuse any it does not know.
const FLAGS_CRITICAL: u32 = 0xffff_0000;
/// Postgres' MAXDIM: arrays have at most 6 dimensions.
pub const ARRAY_DIMS_MAX: usize = 6;
/// Days from 1970-01-01 to 2000-01-01, Postgres' epoch for dates and times.
const PG_EPOCH_DAYS: i64 = 10_957;
const DAY_MS: i64 = 86_400_000;
const DAY_US: i64 = 86_400_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BinaryCopyError {
    #[error("binary COPY: the stream does not start with the PGCOPY signature")]
    Signature,
    #[error("binary COPY: unsupported header flags {0:#x}")]
    Flags(u32),
    #[error("binary COPY: a header extension of {0} bytes is over the limit")]
    Extension(u32),
    #[error("binary COPY: a tuple has {got} fields, not {want}")]
    FieldCount { got: i16, want: usize },
    #[error("binary COPY: invalid field length {0}")]
    FieldLength(i32),
    #[error("binary COPY: a tuple is over {TUPLE_BYTES_MAX} bytes")]
    TupleTooLarge,
    #[error("binary COPY: data after the trailer")]
    AfterTrailer,
    #[error("binary COPY: the stream ended before its trailer")]
    Truncated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Header,
    Tuples,
    Done,
}

/// What the bytes at the front of the stream hold.
enum Scan {
    /// A complete item of this many bytes (header, tuple or trailer).
    Item(usize),
    /// At least this many more bytes are needed to complete the item.
    Need(usize),
}

/// One tuple: its fields, `None` for NULL, borrowed from the stream.
pub struct Tuple<'a> {
    buf: &'a [u8],
    spans: &'a [Option<(usize, usize)>],
}

impl<'a> Tuple<'a> {
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Field `i`'s bytes, `None` when it is NULL (or out of range).
    #[inline]
    pub fn field(&self, i: usize) -> Option<&'a [u8]> {
        let (start, end) = (*self.spans.get(i)?)?;
        self.buf.get(start..end)
    }
}

/// Decodes a binary COPY stream fed in chunks of any size into tuples of `columns` fields.
pub struct CopyBinaryDecoder {
    columns: usize,
    stage: Stage,
    /// The start of an item that did not fit in the chunks so far: at most one item.
    carry: Vec<u8>,
    spans: Vec<Option<(usize, usize)>>,
}

impl CopyBinaryDecoder {
    pub fn new(columns: usize) -> Self {
        CopyBinaryDecoder {
            columns,
            stage: Stage::Header,
            carry: Vec::new(),
            spans: Vec::with_capacity(columns),
        }
    }

    /// Whether the trailer has been read.
    pub fn is_done(&self) -> bool {
        self.stage == Stage::Done
    }

    /// Bytes held back from earlier chunks.
    pub fn carried_bytes(&self) -> usize {
        self.carry.len()
    }

    /// Reads one chunk of the stream, handing every tuple completed by it to `on_row`.
    /// Errors from `on_row` stop the decoding and are returned as they are.
    pub fn feed<E>(
        &mut self,
        chunk: &[u8],
        mut on_row: impl FnMut(&Tuple<'_>) -> Result<(), E>,
    ) -> Result<(), E>
    where
        E: From<BinaryCopyError>,
    {
        let mut rest = chunk;
        loop {
            if !self.carry.is_empty() {
                // Complete the carried item with just the bytes it still needs.
                loop {
                    match scan(self.stage, self.columns, &self.carry, &mut self.spans)? {
                        Scan::Need(n) => {
                            if rest.is_empty() {
                                return Ok(());
                            }
                            let take = n.min(rest.len());
                            self.carry.extend_from_slice(&rest[..take]);
                            rest = &rest[take..];
                        }
                        Scan::Item(len) => {
                            debug_assert_eq!(len, self.carry.len());
                            let carry = std::mem::take(&mut self.carry);
                            let done = self.item(&carry, &mut on_row);
                            self.carry = carry;
                            self.carry.clear();
                            done?;
                            break;
                        }
                    }
                }
                continue;
            }
            if rest.is_empty() {
                return Ok(());
            }
            match scan(self.stage, self.columns, rest, &mut self.spans)? {
                Scan::Need(_) => {
                    // Shorter than the item, which is within its limit: bounded.
                    self.carry.extend_from_slice(rest);
                    return Ok(());
                }
                Scan::Item(len) => {
                    self.item(&rest[..len], &mut on_row)?;
                    rest = &rest[len..];
                }
            }
        }
    }

    /// Acts on one complete item whose fields `scan` left in `spans`.
    fn item<E>(
        &mut self,
        bytes: &[u8],
        on_row: &mut impl FnMut(&Tuple<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        match self.stage {
            Stage::Header => self.stage = Stage::Tuples,
            Stage::Tuples if bytes.len() == 2 && bytes == [0xff, 0xff] => self.stage = Stage::Done,
            Stage::Tuples => {
                debug_assert_eq!(self.spans.len(), self.columns);
                on_row(&Tuple {
                    buf: bytes,
                    spans: &self.spans,
                })?;
            }
            Stage::Done => debug_assert!(false, "no item follows the trailer"),
        }
        Ok(())
    }

    /// Checks that the stream ended where it may: right after its trailer.
    pub fn finish(&self) -> Result<(), BinaryCopyError> {
        if self.stage == Stage::Done && self.carry.is_empty() {
            Ok(())
        } else {
            Err(BinaryCopyError::Truncated)
        }
    }
}

fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}

fn be_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Measures the item at the front of `buf`; for a tuple, records its fields in `spans`.
fn scan(
    stage: Stage,
    columns: usize,
    buf: &[u8],
    spans: &mut Vec<Option<(usize, usize)>>,
) -> Result<Scan, BinaryCopyError> {
    match stage {
        Stage::Header => scan_header(buf),
        Stage::Tuples => scan_tuple(columns, buf, spans),
        Stage::Done => Err(BinaryCopyError::AfterTrailer),
    }
}

fn scan_header(buf: &[u8]) -> Result<Scan, BinaryCopyError> {
    let seen = buf.len().min(SIGNATURE.len());
    if buf[..seen] != SIGNATURE[..seen] {
        return Err(BinaryCopyError::Signature);
    }
    if buf.len() < HEADER_FIXED_BYTES {
        return Ok(Scan::Need(HEADER_FIXED_BYTES - buf.len()));
    }
    let flags = be_i32(buf, 11) as u32;
    if flags & FLAGS_CRITICAL != 0 {
        return Err(BinaryCopyError::Flags(
            flags & (FLAGS_CRITICAL | FLAG_HAS_OIDS),
        ));
    }
    let ext = be_i32(buf, 15) as u32;
    if ext as usize > HEADER_EXTENSION_BYTES_MAX {
        return Err(BinaryCopyError::Extension(ext));
    }
    let len = HEADER_FIXED_BYTES + ext as usize;
    Ok(match len.checked_sub(buf.len()) {
        Some(0) | None => Scan::Item(len),
        Some(n) => Scan::Need(n),
    })
}

fn scan_tuple(
    columns: usize,
    buf: &[u8],
    spans: &mut Vec<Option<(usize, usize)>>,
) -> Result<Scan, BinaryCopyError> {
    if buf.len() < 2 {
        return Ok(Scan::Need(2 - buf.len()));
    }
    let count = be_i16(buf, 0);
    if count == -1 {
        return Ok(Scan::Item(2));
    }
    if usize::try_from(count).ok() != Some(columns) {
        return Err(BinaryCopyError::FieldCount {
            got: count,
            want: columns,
        });
    }
    spans.clear();
    let mut pos = 2;
    for _ in 0..columns {
        if buf.len() < pos + 4 {
            return Ok(Scan::Need(pos + 4 - buf.len()));
        }
        let len = be_i32(buf, pos);
        pos += 4;
        if len == -1 {
            spans.push(None);
            continue;
        }
        let len = usize::try_from(len).map_err(|_| BinaryCopyError::FieldLength(len))?;
        let end = pos + len;
        if end > TUPLE_BYTES_MAX {
            return Err(BinaryCopyError::TupleTooLarge);
        }
        if end > buf.len() {
            return Ok(Scan::Need(end - buf.len()));
        }
        spans.push(Some((pos, end)));
        pos = end;
    }
    Ok(Scan::Item(pos))
}

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
mod tests {
    use super::*;
    use crate::sqlite::pgtypes::{array_to_json, parse_time_ms, parse_timestamp_ms};
    use proptest::prelude::*;

    type Rows = Vec<Vec<Option<Vec<u8>>>>;

    /// A binary COPY stream of `rows`, as Postgres frames it.
    fn encode(rows: &Rows, extension: &[u8]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(&0i32.to_be_bytes());
        out.extend_from_slice(&(extension.len() as i32).to_be_bytes());
        out.extend_from_slice(extension);
        for row in rows {
            out.extend_from_slice(&(row.len() as i16).to_be_bytes());
            for field in row {
                match field {
                    None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(b) => {
                        out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                        out.extend_from_slice(b);
                    }
                }
            }
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    /// Decodes `chunks` in order; the rows, and whether the stream was complete.
    fn decode(columns: usize, chunks: &[&[u8]]) -> Result<Rows, BinaryCopyError> {
        let mut d = CopyBinaryDecoder::new(columns);
        let mut rows = Vec::new();
        for c in chunks {
            d.feed(c, |t| {
                rows.push(
                    (0..t.len())
                        .map(|i| t.field(i).map(<[u8]>::to_vec))
                        .collect(),
                );
                Ok::<_, BinaryCopyError>(())
            })?;
        }
        d.finish()?;
        Ok(rows)
    }

    fn rows_strategy() -> impl Strategy<Value = (usize, Rows)> {
        (1usize..6).prop_flat_map(|cols| {
            let field = proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20));
            (
                Just(cols),
                proptest::collection::vec(proptest::collection::vec(field, cols), 0..12),
            )
        })
    }

    fn text_of(s: Scalar, raw: &[u8]) -> String {
        let mut out = String::new();
        scalar_text(s, raw, &mut out).expect("valid value");
        out
    }

    fn sql(col: BinaryColumn, raw: &[u8]) -> rusqlite::types::Value {
        let mut scratch = String::new();
        match decode_binary_sql(&col, raw, &mut scratch).expect("valid value") {
            ToSqlOutput::Borrowed(r) => r.try_into().expect("utf-8"),
            ToSqlOutput::Owned(v) => v,
            _ => unreachable!(),
        }
    }

    fn text_sql(type_oid: u32, kind: ColumnKind, text: &str) -> rusqlite::types::Value {
        crate::sqlite::replica::to_sql(
            &crate::sqlite::pgtypes::decode_text(type_oid, kind, text).expect("valid text"),
        )
    }

    /// A binary numeric from its parts.
    fn numeric(weight: i16, sign: u16, dscale: u16, digits: &[i16]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(digits.len() as i16).to_be_bytes());
        b.extend_from_slice(&weight.to_be_bytes());
        b.extend_from_slice(&sign.to_be_bytes());
        b.extend_from_slice(&dscale.to_be_bytes());
        for d in digits {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b
    }

    /// A one- or more-dimensional binary array of `elems` (already encoded, None = NULL).
    fn array(elem_oid: u32, dims: &[i32], elems: &[Option<Vec<u8>>]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(dims.len() as i32).to_be_bytes());
        b.extend_from_slice(&(elems.iter().any(Option::is_none) as i32).to_be_bytes());
        b.extend_from_slice(&elem_oid.to_be_bytes());
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
            b.extend_from_slice(&1i32.to_be_bytes());
        }
        for e in elems {
            match e {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
            }
        }
        b
    }

    #[test]
    fn frames_header_rows_and_trailer() {
        let rows: Rows = vec![
            vec![Some(b"a".to_vec()), None],
            vec![Some(Vec::new()), Some(vec![0, 1, 2])],
        ];
        let stream = encode(&rows, b"ext");
        assert_eq!(decode(2, &[&stream]), Ok(rows.clone()));
        // Every byte its own chunk.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(decode(2, &bytes), Ok(rows));
        assert_eq!(
            decode(3, &[&stream]),
            Err(BinaryCopyError::FieldCount { got: 2, want: 3 })
        );
        assert_eq!(
            decode(2, &[&stream[..stream.len() - 1]]),
            Err(BinaryCopyError::Truncated)
        );
        let mut extra = stream.clone();
        extra.push(0);
        assert_eq!(decode(2, &[&extra]), Err(BinaryCopyError::AfterTrailer));
        assert_eq!(
            decode(2, &[b"PGCOPY\n\xfe"]),
            Err(BinaryCopyError::Signature)
        );
        let mut oids = stream.clone();
        oids[12] = 1; // flag bit 16
        assert!(matches!(
            decode(2, &[&oids]),
            Err(BinaryCopyError::Flags(_))
        ));
    }

    #[test]
    fn carries_at_most_one_item() {
        let big = vec![7u8; 100_000];
        let rows: Rows = vec![vec![Some(big.clone())], vec![Some(big)]];
        let stream = encode(&rows, b"");
        let mut d = CopyBinaryDecoder::new(1);
        let mut max_carry = 0;
        for c in stream.chunks(4096) {
            d.feed(c, |_| Ok::<_, BinaryCopyError>(())).expect("valid");
            max_carry = max_carry.max(d.carried_bytes());
        }
        d.finish().expect("complete");
        assert!(max_carry <= 100_000 + 6, "carried {max_carry}");
    }

    #[test]
    fn plans_only_types_read_here() {
        let none = |_| UserType::Other;
        assert_eq!(
            plan_column(oid::INT8, ColumnKind::Number, none),
            Some(BinaryColumn::Scalar(Scalar::Int8))
        );
        assert_eq!(plan_column(1186, ColumnKind::Number, none), None); // interval
        assert_eq!(plan_column(1187, ColumnKind::Json, none), None); // interval[]
        assert_eq!(plan_column(20_000, ColumnKind::String, none), None); // a domain
        assert_eq!(
            plan_column(20_000, ColumnKind::String, |_| UserType::Enum),
            Some(BinaryColumn::Scalar(Scalar::Text))
        );
        let enum_array = |_| UserType::ArrayOf {
            elem_oid: 20_001,
            elem_is_enum: true,
        };
        assert_eq!(
            plan_column(20_000, ColumnKind::Json, enum_array),
            Some(BinaryColumn::Array {
                elem: Scalar::Text,
                elem_oid: 20_001,
                elems: ArrayElems::Strings
            })
        );
        assert_eq!(
            plan_column(oid::INT4_ARRAY, ColumnKind::Json, none),
            Some(BinaryColumn::Array {
                elem: Scalar::Int4,
                elem_oid: oid::INT4,
                elems: ArrayElems::Numbers
            })
        );
    }

    #[test]
    fn numerics_as_text_and_value() {
        let cases: [(Vec<u8>, &str); 8] = [
            (numeric(0, NUMERIC_POS, 0, &[]), "0"),
            (numeric(0, NUMERIC_POS, 2, &[12, 3400]), "12.34"),
            (numeric(1, NUMERIC_NEG, 0, &[1, 0]), "-10000"),
            (numeric(-2, NUMERIC_POS, 8, &[12]), "0.00000012"),
            (numeric(0, NUMERIC_POS, 3, &[5, 1234]), "5.123"),
            (numeric(0, NUMERIC_NAN, 0, &[]), "NaN"),
            (numeric(0, NUMERIC_PINF, 0, &[]), "Infinity"),
            (numeric(0, NUMERIC_NINF, 0, &[]), "-Infinity"),
        ];
        for (raw, text) in cases {
            assert_eq!(text_of(Scalar::Numeric, &raw), text);
            assert_eq!(
                sql(BinaryColumn::Scalar(Scalar::Numeric), &raw),
                text_sql(oid::NUMERIC, ColumnKind::Number, text),
                "{text}"
            );
        }
        assert!(numeric_text(&numeric(0, 0x1234, 0, &[]), &mut String::new()).is_err());
        assert!(numeric_text(&numeric(0, 0, 0, &[10_000]), &mut String::new()).is_err());
    }

    #[test]
    fn float8_is_stored_as_its_value_and_float4_is_left_to_text() {
        for f in [0.1, -0.0, 5e-324, f64::INFINITY, 1.7976931348623157e308] {
            assert_eq!(
                sql(BinaryColumn::Scalar(Scalar::Float8), &f.to_be_bytes()),
                rusqlite::types::Value::Real(f)
            );
        }
        assert_eq!(
            sql(
                BinaryColumn::Scalar(Scalar::Float8),
                &f64::NAN.to_be_bytes()
            ),
            rusqlite::types::Value::Null
        );
        let none = |_| UserType::Other;
        assert_eq!(plan_column(oid::FLOAT4, ColumnKind::Number, none), None);
        assert_eq!(plan_column(oid::FLOAT4_ARRAY, ColumnKind::Json, none), None);
        assert_eq!(plan_column(oid::FLOAT8_ARRAY, ColumnKind::Json, none), None);
    }

    #[test]
    fn uuids_and_jsonb() {
        let raw: Vec<u8> = (0u8..16).collect();
        assert_eq!(
            text_of(Scalar::Uuid, &raw),
            "00010203-0405-0607-0809-0a0b0c0d0e0f"
        );
        assert_eq!(
            sql(BinaryColumn::Scalar(Scalar::Jsonb), b"\x01{\"a\": 1}"),
            rusqlite::types::Value::Text("{\"a\": 1}".into())
        );
        let mut scratch = String::new();
        let bad = decode_binary_sql(
            &BinaryColumn::Scalar(Scalar::Jsonb),
            b"\x02{}",
            &mut scratch,
        );
        assert!(bad.is_err());
    }

    #[test]
    fn arrays_as_array_to_json() {
        let int4 = |v: i32| Some(v.to_be_bytes().to_vec());
        let col = |elem, elem_oid, array_oid| BinaryColumn::Array {
            elem,
            elem_oid,
            elems: array_elems(array_oid),
        };
        let ints = col(Scalar::Int4, oid::INT4, oid::INT4_ARRAY);
        let cases: Vec<(BinaryColumn, Vec<u8>, &str, ArrayElems)> = vec![
            (ints, array(oid::INT4, &[], &[]), "{}", ArrayElems::Numbers),
            (
                ints,
                array(oid::INT4, &[2, 2], &[int4(1), int4(2), None, int4(-4)]),
                "{{1,2},{NULL,-4}}",
                ArrayElems::Numbers,
            ),
            (
                col(Scalar::Text, oid::TEXT, 1009),
                array(
                    oid::TEXT,
                    &[3],
                    &[Some(b"a \"b\"".to_vec()), Some(b"NULL".to_vec()), None],
                ),
                r#"{"a \"b\"","NULL",NULL}"#,
                ArrayElems::Strings,
            ),
            (
                col(Scalar::Bool, oid::BOOL, oid::BOOL_ARRAY),
                array(oid::BOOL, &[2], &[Some(vec![1]), Some(vec![0])]),
                "{t,f}",
                ArrayElems::Booleans,
            ),
            (
                col(Scalar::TimestampTz, oid::TIMESTAMPTZ, 1185),
                array(oid::TIMESTAMPTZ, &[1], &[Some(0i64.to_be_bytes().to_vec())]),
                r#"{"2000-01-01 00:00:00+00"}"#,
                ArrayElems::Strings,
            ),
        ];
        for (col, raw, text, elems) in cases {
            let want = array_to_json(text, elems).expect("valid literal");
            assert_eq!(sql(col, &raw), rusqlite::types::Value::Text(want), "{text}");
        }
        let mut scratch = String::new();
        // The element type must be the column's.
        let wrong = array(oid::INT8, &[1], &[Some(vec![0; 8])]);
        assert!(decode_binary_sql(&ints, &wrong, &mut scratch).is_err());
        // A count the bytes cannot hold is refused before any element is read.
        let huge = array(oid::INT4, &[1 << 30, 1 << 30], &[]);
        assert!(decode_binary_sql(&ints, &huge, &mut scratch).is_err());
    }

    const ALL_SCALARS: [Scalar; 16] = [
        Scalar::Bool,
        Scalar::Int2,
        Scalar::Int4,
        Scalar::Int8,
        Scalar::Oid,
        Scalar::Float8,
        Scalar::Numeric,
        Scalar::Text,
        Scalar::Uuid,
        Scalar::Json,
        Scalar::Jsonb,
        Scalar::Date,
        Scalar::Time,
        Scalar::TimeTz,
        Scalar::Timestamp,
        Scalar::TimestampTz,
    ];

    /// Postgres' timestamp range: 4714-11-24 BC to 294276 AD, in µs since 2000.
    const TS_MIN_US: i64 = -211_813_488_000_000_000;
    const TS_MAX_US: i64 = 9_223_371_331_200_000_000 - 1;

    proptest! {
        #[test]
        fn split_streams_decode_like_whole_ones(
            (cols, rows) in rows_strategy(),
            ext in proptest::collection::vec(any::<u8>(), 0..8),
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..8),
        ) {
            let stream = encode(&rows, &ext);
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
            at.sort_unstable();
            let mut chunks = Vec::new();
            let mut prev = 0;
            for a in at {
                chunks.push(&stream[prev..a]);
                prev = a;
            }
            chunks.push(&stream[prev..]);
            let whole = decode(cols, &[&stream]);
            prop_assert_eq!(&whole, &Ok(rows));
            prop_assert_eq!(decode(cols, &chunks), whole);
        }

        #[test]
        fn random_bytes_never_panic(
            cols in 0usize..4,
            data in proptest::collection::vec(any::<u8>(), 0..200),
            prefix in any::<bool>(),
            split in any::<proptest::sample::Index>(),
        ) {
            let mut bytes = if prefix { encode(&vec![], &[])[..19].to_vec() } else { Vec::new() };
            bytes.extend_from_slice(&data);
            let at = split.index(bytes.len() + 1);
            let _ = decode(cols, &[&bytes[..at], &bytes[at..]]);
            let mut scratch = String::new();
            for s in ALL_SCALARS {
                let _ = decode_binary_sql(&BinaryColumn::Scalar(s), &data, &mut scratch);
                let _ = scalar_text(s, &data, &mut scratch);
                for elems in [ArrayElems::Numbers, ArrayElems::Booleans, ArrayElems::Strings] {
                    let col = BinaryColumn::Array { elem: s, elem_oid: 23, elems };
                    let _ = decode_binary_sql(&col, &data, &mut scratch);
                }
            }
        }

        #[test]
        fn timestamps_match_the_text_path(us in prop_oneof![
            TS_MIN_US..TS_MAX_US,
            -100_000_000_000_000i64..100_000_000_000_000,
            Just(i64::MAX), Just(i64::MIN),
        ]) {
            for (s, oid) in [(Scalar::Timestamp, oid::TIMESTAMP), (Scalar::TimestampTz, oid::TIMESTAMPTZ)] {
                let raw = us.to_be_bytes();
                let text = text_of(s, &raw);
                prop_assert_eq!(
                    sql(BinaryColumn::Scalar(s), &raw),
                    text_sql(oid, ColumnKind::Number, &text),
                    "{}", text
                );
                prop_assert_eq!(Some(timestamp_ms(us).to_bits()), parse_timestamp_ms(&text).map(f64::to_bits));
            }
        }

        #[test]
        fn dates_and_times_match_the_text_path(
            days in prop_oneof![-2_451_545i32..2_147_483_494, Just(i32::MAX), Just(i32::MIN)],
            us in 0i64..=DAY_US,
            zone_min in -15 * 60i32..=15 * 60,
        ) {
            let raw = days.to_be_bytes();
            let text = text_of(Scalar::Date, &raw);
            prop_assert_eq!(
                sql(BinaryColumn::Scalar(Scalar::Date), &raw),
                text_sql(oid::DATE, ColumnKind::Number, &text),
                "{}", text
            );
            let text = text_of(Scalar::Time, &us.to_be_bytes());
            prop_assert_eq!(Some(time_ms(us, 0)), parse_time_ms(&text), "{}", text);
            let mut tz = us.to_be_bytes().to_vec();
            tz.extend_from_slice(&(zone_min * 60).to_be_bytes());
            let text = text_of(Scalar::TimeTz, &tz);
            prop_assert_eq!(
                sql(BinaryColumn::Scalar(Scalar::TimeTz), &tz),
                text_sql(oid::TIMETZ, ColumnKind::Number, &text),
                "{}", text
            );
        }

        #[test]
        fn float8_matches_the_text_path(bits in any::<u64>()) {
            // Postgres prints a float8 with digits that read back as the same f64.
            let f = f64::from_bits(bits);
            let text = if f.is_nan() { "NaN".to_string() } else if f.is_infinite() {
                (if f > 0.0 { "Infinity" } else { "-Infinity" }).to_string()
            } else { format!("{f:e}") };
            prop_assert_eq!(
                sql(BinaryColumn::Scalar(Scalar::Float8), &f.to_be_bytes()),
                text_sql(oid::FLOAT8, ColumnKind::Number, &text)
            );
        }

        #[test]
        fn numerics_match_the_text_path(
            weight in -10i16..10,
            neg in any::<bool>(),
            dscale in 0u16..40,
            digits in proptest::collection::vec(0i16..10_000, 0..8),
        ) {
            let raw = numeric(weight, if neg { NUMERIC_NEG } else { NUMERIC_POS }, dscale, &digits);
            let text = text_of(Scalar::Numeric, &raw);
            prop_assert_eq!(
                sql(BinaryColumn::Scalar(Scalar::Numeric), &raw),
                text_sql(oid::NUMERIC, ColumnKind::Number, &text),
                "{}", text
            );
        }
    }
}
