//! The binary COPY stream's framing: signature, flags, header extension, then tuples of
//! length-prefixed fields and a trailer. Fed in chunks of any size (Postgres sends one row
//! per CopyData message, but nothing here relies on it); at most one incomplete header or
//! tuple is held back between chunks.

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

pub(super) fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}

pub(super) fn be_i32(b: &[u8], at: usize) -> i32 {
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
