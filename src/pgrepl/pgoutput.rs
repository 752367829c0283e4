//! Decoder for the messages of Postgres's `pgoutput` logical decoding plugin, protocol
//! version 1 (the payload of each XLogData). Input comes from the network: every length and
//! count is checked against what is actually there, and garbage is a `DecodeError`, never a
//! panic or an oversized allocation.

use bytes::Bytes;

use super::lsn::Lsn;

/// Bit of `RelColumn::flags` marking a column that is part of the replica identity key.
pub const COLUMN_FLAG_KEY: u8 = 1;
/// Bits of `PgOutput::Truncate::options`.
pub const TRUNCATE_CASCADE: u8 = 1;
pub const TRUNCATE_RESTART_IDENTITY: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutput {
    Begin {
        final_lsn: Lsn,
        commit_time_us: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time_us: i64,
    },
    Origin {
        lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation_oid: u32,
        new: Vec<TupleValue>,
    },
    Update {
        relation_oid: u32,
        old: Option<OldTuple>,
        new: Vec<TupleValue>,
    },
    Delete {
        relation_oid: u32,
        old: OldTuple,
    },
    Truncate {
        options: u8,
        relation_oids: Vec<u32>,
    },
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    /// 'd' default (primary key), 'n' nothing, 'f' full, 'i' index.
    pub replica_identity: u8,
    pub columns: Vec<RelColumn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelColumn {
    /// `COLUMN_FLAG_KEY` when the column is part of the replica identity.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

impl RelColumn {
    pub fn is_key(&self) -> bool {
        self.flags & COLUMN_FLAG_KEY != 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// 'K': only the replica identity key columns are set (others are Null).
    Key,
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Full,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldTuple {
    pub kind: OldKind,
    pub values: Vec<TupleValue>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    Null,
    /// A TOASTed value that did not change (sent in updates): keep the old one.
    UnchangedToast,
    Text(Bytes),
    Binary(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput message")]
    Empty,
    #[error("unknown pgoutput message tag {0:#04x}")]
    UnknownTag(u8),
    #[error("pgoutput message ends inside {0}")]
    Truncated(&'static str),
    #[error("pgoutput {0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    #[error("pgoutput {what} is negative: {value}")]
    Negative { what: &'static str, value: i64 },
    #[error("pgoutput {what}: unexpected marker {marker:#04x}")]
    BadMarker { what: &'static str, marker: u8 },
    #[error("pgoutput message has {0} unexpected trailing bytes")]
    TrailingBytes(usize),
}

/// Decodes one pgoutput message. Values are copied once, into a buffer they all share.
pub fn decode(data: &[u8]) -> Result<PgOutput, DecodeError> {
    decode_bytes(&Bytes::copy_from_slice(data))
}

/// Decodes one pgoutput message; values are zero-copy slices of `data`.
pub fn decode_bytes(data: &Bytes) -> Result<PgOutput, DecodeError> {
    let mut r = Reader { data, pos: 0 };
    let msg = match r.u8("message tag").map_err(|_| DecodeError::Empty)? {
        b'B' => PgOutput::Begin {
            final_lsn: r.lsn("Begin final LSN")?,
            commit_time_us: r.i64("Begin commit time")?,
            xid: r.u32("Begin xid")?,
        },
        b'C' => PgOutput::Commit {
            flags: r.u8("Commit flags")?,
            commit_lsn: r.lsn("Commit LSN")?,
            end_lsn: r.lsn("Commit end LSN")?,
            commit_time_us: r.i64("Commit time")?,
        },
        b'O' => PgOutput::Origin {
            lsn: r.lsn("Origin LSN")?,
            name: r.cstr("Origin name")?,
        },
        b'R' => PgOutput::Relation(relation(&mut r)?),
        b'Y' => PgOutput::Type {
            oid: r.u32("Type OID")?,
            namespace: r.cstr("Type namespace")?,
            name: r.cstr("Type name")?,
        },
        b'I' => {
            let relation_oid = r.u32("Insert relation OID")?;
            r.expect(b'N', "Insert new-tuple marker")?;
            PgOutput::Insert {
                relation_oid,
                new: tuple(&mut r)?,
            }
        }
        b'U' => update(&mut r)?,
        b'D' => {
            let relation_oid = r.u32("Delete relation OID")?;
            let kind = old_kind(r.u8("Delete old-tuple marker")?, "Delete old-tuple marker")?;
            PgOutput::Delete {
                relation_oid,
                old: OldTuple {
                    kind,
                    values: tuple(&mut r)?,
                },
            }
        }
        b'T' => truncate(&mut r)?,
        b'M' => PgOutput::Message {
            transactional: r.u8("Message flags")? & 1 != 0,
            lsn: r.lsn("Message LSN")?,
            prefix: r.cstr("Message prefix")?,
            content: {
                let len = r.len_i32("Message content length")?;
                r.bytes(len, "Message content")?
            },
        },
        tag => return Err(DecodeError::UnknownTag(tag)),
    };
    match data.len() - r.pos {
        0 => Ok(msg),
        extra => Err(DecodeError::TrailingBytes(extra)),
    }
}

fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let oid = r.u32("Relation OID")?;
    let namespace = r.cstr("Relation namespace")?;
    let name = r.cstr("Relation name")?;
    let replica_identity = r.u8("Relation replica identity")?;
    let count = r.len_i16("Relation column count")?;
    // Each column takes at least 10 bytes, so the count cannot make us over-allocate.
    let mut columns = Vec::with_capacity(count.min(r.remaining() / 10));
    for _ in 0..count {
        columns.push(RelColumn {
            flags: r.u8("column flags")?,
            name: r.cstr("column name")?,
            type_oid: r.u32("column type OID")?,
            type_modifier: r.i32("column type modifier")?,
        });
    }
    Ok(Relation {
        oid,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn update(r: &mut Reader<'_>) -> Result<PgOutput, DecodeError> {
    let relation_oid = r.u32("Update relation OID")?;
    let mut marker = r.u8("Update tuple marker")?;
    let mut old = None;
    if marker != b'N' {
        let kind = old_kind(marker, "Update tuple marker")?;
        old = Some(OldTuple {
            kind,
            values: tuple(r)?,
        });
        marker = r.u8("Update new-tuple marker")?;
    }
    if marker != b'N' {
        return Err(DecodeError::BadMarker {
            what: "Update new-tuple marker",
            marker,
        });
    }
    Ok(PgOutput::Update {
        relation_oid,
        old,
        new: tuple(r)?,
    })
}

fn truncate(r: &mut Reader<'_>) -> Result<PgOutput, DecodeError> {
    let count = r.len_i32("Truncate relation count")?;
    let options = r.u8("Truncate options")?;
    if count.saturating_mul(4) > r.remaining() {
        return Err(DecodeError::Truncated("Truncate relation OIDs"));
    }
    let relation_oids = (0..count)
        .map(|_| r.u32("Truncate relation OID"))
        .collect::<Result<_, _>>()?;
    Ok(PgOutput::Truncate {
        options,
        relation_oids,
    })
}

fn old_kind(marker: u8, what: &'static str) -> Result<OldKind, DecodeError> {
    match marker {
        b'K' => Ok(OldKind::Key),
        b'O' => Ok(OldKind::Full),
        marker => Err(DecodeError::BadMarker { what, marker }),
    }
}

fn tuple(r: &mut Reader<'_>) -> Result<Vec<TupleValue>, DecodeError> {
    let count = r.len_i16("tuple column count")?;
    // Each value takes at least 1 byte.
    let mut values = Vec::with_capacity(count.min(r.remaining()));
    for _ in 0..count {
        let value = match r.u8("tuple value kind")? {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::UnchangedToast,
            b't' => {
                let len = r.len_i32("text value length")?;
                TupleValue::Text(r.bytes(len, "text value")?)
            }
            b'b' => {
                let len = r.len_i32("binary value length")?;
                TupleValue::Binary(r.bytes(len, "binary value")?)
            }
            marker => {
                return Err(DecodeError::BadMarker {
                    what: "tuple value kind",
                    marker,
                })
            }
        };
        values.push(value);
    }
    Ok(values)
}

struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let end = self.pos.checked_add(N).filter(|e| *e <= self.data.len());
        let end = end.ok_or(DecodeError::Truncated(what))?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.data[self.pos..end]);
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take::<1>(what)?[0])
    }

    fn expect(&mut self, want: u8, what: &'static str) -> Result<(), DecodeError> {
        match self.u8(what)? {
            m if m == want => Ok(()),
            marker => Err(DecodeError::BadMarker { what, marker }),
        }
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.take(what)?))
    }

    fn lsn(&mut self, what: &'static str) -> Result<Lsn, DecodeError> {
        Ok(Lsn(u64::from_be_bytes(self.take(what)?)))
    }

    fn len_i16(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let v = i16::from_be_bytes(self.take(what)?);
        usize::try_from(v).map_err(|_| DecodeError::Negative {
            what,
            value: v.into(),
        })
    }

    fn len_i32(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let v = self.i32(what)?;
        usize::try_from(v).map_err(|_| DecodeError::Negative {
            what,
            value: v.into(),
        })
    }

    fn bytes(&mut self, len: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        if len > self.remaining() {
            return Err(DecodeError::Truncated(what));
        }
        let out = self.data.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = &self.data[self.pos..];
        let nul = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or(DecodeError::Truncated(what))?;
        let s = std::str::from_utf8(&rest[..nul]).map_err(|_| DecodeError::InvalidUtf8(what))?;
        self.pos += nul + 1;
        Ok(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Writes messages the way pgoutput does, to check the decoder against.
    fn encode(msg: &PgOutput) -> Vec<u8> {
        let mut out = Vec::new();
        let cstr = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        };
        match msg {
            PgOutput::Begin {
                final_lsn,
                commit_time_us,
                xid,
            } => {
                out.push(b'B');
                out.extend_from_slice(&final_lsn.0.to_be_bytes());
                out.extend_from_slice(&commit_time_us.to_be_bytes());
                out.extend_from_slice(&xid.to_be_bytes());
            }
            PgOutput::Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_time_us,
            } => {
                out.push(b'C');
                out.push(*flags);
                out.extend_from_slice(&commit_lsn.0.to_be_bytes());
                out.extend_from_slice(&end_lsn.0.to_be_bytes());
                out.extend_from_slice(&commit_time_us.to_be_bytes());
            }
            PgOutput::Origin { lsn, name } => {
                out.push(b'O');
                out.extend_from_slice(&lsn.0.to_be_bytes());
                cstr(&mut out, name);
            }
            PgOutput::Relation(rel) => {
                out.push(b'R');
                out.extend_from_slice(&rel.oid.to_be_bytes());
                cstr(&mut out, &rel.namespace);
                cstr(&mut out, &rel.name);
                out.push(rel.replica_identity);
                out.extend_from_slice(&(rel.columns.len() as i16).to_be_bytes());
                for c in &rel.columns {
                    out.push(c.flags);
                    cstr(&mut out, &c.name);
                    out.extend_from_slice(&c.type_oid.to_be_bytes());
                    out.extend_from_slice(&c.type_modifier.to_be_bytes());
                }
            }
            PgOutput::Type {
                oid,
                namespace,
                name,
            } => {
                out.push(b'Y');
                out.extend_from_slice(&oid.to_be_bytes());
                cstr(&mut out, namespace);
                cstr(&mut out, name);
            }
            PgOutput::Insert { relation_oid, new } => {
                out.push(b'I');
                out.extend_from_slice(&relation_oid.to_be_bytes());
                out.push(b'N');
                encode_tuple(&mut out, new);
            }
            PgOutput::Update {
                relation_oid,
                old,
                new,
            } => {
                out.push(b'U');
                out.extend_from_slice(&relation_oid.to_be_bytes());
                if let Some(old) = old {
                    encode_old(&mut out, old);
                }
                out.push(b'N');
                encode_tuple(&mut out, new);
            }
            PgOutput::Delete { relation_oid, old } => {
                out.push(b'D');
                out.extend_from_slice(&relation_oid.to_be_bytes());
                encode_old(&mut out, old);
            }
            PgOutput::Truncate {
                options,
                relation_oids,
            } => {
                out.push(b'T');
                out.extend_from_slice(&(relation_oids.len() as i32).to_be_bytes());
                out.push(*options);
                for oid in relation_oids {
                    out.extend_from_slice(&oid.to_be_bytes());
                }
            }
            PgOutput::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                out.push(b'M');
                out.push(u8::from(*transactional));
                out.extend_from_slice(&lsn.0.to_be_bytes());
                cstr(&mut out, prefix);
                out.extend_from_slice(&(content.len() as i32).to_be_bytes());
                out.extend_from_slice(content);
            }
        }
        out
    }

    fn encode_old(out: &mut Vec<u8>, old: &OldTuple) {
        out.push(match old.kind {
            OldKind::Key => b'K',
            OldKind::Full => b'O',
        });
        encode_tuple(out, &old.values);
    }

    fn encode_tuple(out: &mut Vec<u8>, values: &[TupleValue]) {
        out.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for v in values {
            match v {
                TupleValue::Null => out.push(b'n'),
                TupleValue::UnchangedToast => out.push(b'u'),
                TupleValue::Text(b) | TupleValue::Binary(b) => {
                    out.push(if matches!(v, TupleValue::Text(_)) {
                        b't'
                    } else {
                        b'b'
                    });
                    out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    out.extend_from_slice(b);
                }
            }
        }
    }

    fn name() -> impl Strategy<Value = String> {
        "[^\u{0}]{0,12}"
    }

    fn lsn() -> impl Strategy<Value = Lsn> {
        any::<u64>().prop_map(Lsn)
    }

    fn value() -> impl Strategy<Value = TupleValue> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..40).prop_map(Bytes::from);
        prop_oneof![
            Just(TupleValue::Null),
            Just(TupleValue::UnchangedToast),
            bytes().prop_map(TupleValue::Text),
            bytes().prop_map(TupleValue::Binary),
        ]
    }

    fn values() -> impl Strategy<Value = Vec<TupleValue>> {
        proptest::collection::vec(value(), 0..8)
    }

    fn old() -> impl Strategy<Value = OldTuple> {
        (
            prop_oneof![Just(OldKind::Key), Just(OldKind::Full)],
            values(),
        )
            .prop_map(|(kind, values)| OldTuple { kind, values })
    }

    fn message() -> impl Strategy<Value = PgOutput> {
        let column = (any::<u8>(), name(), any::<u32>(), any::<i32>()).prop_map(
            |(flags, name, type_oid, type_modifier)| RelColumn {
                flags,
                name,
                type_oid,
                type_modifier,
            },
        );
        let relation = (
            any::<u32>(),
            name(),
            name(),
            any::<u8>(),
            proptest::collection::vec(column, 0..6),
        )
            .prop_map(|(oid, namespace, name, replica_identity, columns)| {
                PgOutput::Relation(Relation {
                    oid,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            });
        prop_oneof![
            (lsn(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_time_us, xid)| {
                PgOutput::Begin {
                    final_lsn,
                    commit_time_us,
                    xid,
                }
            }),
            (any::<u8>(), lsn(), lsn(), any::<i64>()).prop_map(
                |(flags, commit_lsn, end_lsn, commit_time_us)| {
                    PgOutput::Commit {
                        flags,
                        commit_lsn,
                        end_lsn,
                        commit_time_us,
                    }
                }
            ),
            (lsn(), name()).prop_map(|(lsn, name)| PgOutput::Origin { lsn, name }),
            relation,
            (any::<u32>(), name(), name()).prop_map(|(oid, namespace, name)| PgOutput::Type {
                oid,
                namespace,
                name
            }),
            (any::<u32>(), values())
                .prop_map(|(relation_oid, new)| PgOutput::Insert { relation_oid, new }),
            (any::<u32>(), proptest::option::of(old()), values()).prop_map(
                |(relation_oid, old, new)| PgOutput::Update {
                    relation_oid,
                    old,
                    new
                }
            ),
            (any::<u32>(), old())
                .prop_map(|(relation_oid, old)| PgOutput::Delete { relation_oid, old }),
            (any::<u8>(), proptest::collection::vec(any::<u32>(), 0..6)).prop_map(
                |(options, relation_oids)| PgOutput::Truncate {
                    options,
                    relation_oids
                }
            ),
            (
                any::<bool>(),
                lsn(),
                name(),
                proptest::collection::vec(any::<u8>(), 0..40)
            )
                .prop_map(|(transactional, lsn, prefix, content)| PgOutput::Message {
                    transactional,
                    lsn,
                    prefix,
                    content: Bytes::from(content)
                }),
        ]
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&data);
        }

        #[test]
        fn random_bytes_after_a_valid_tag_never_panic(
            tag in prop_oneof![Just(b'B'), Just(b'C'), Just(b'O'), Just(b'R'), Just(b'Y'),
                               Just(b'I'), Just(b'U'), Just(b'D'), Just(b'T'), Just(b'M')],
            rest in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut data = vec![tag];
            data.extend_from_slice(&rest);
            let _ = decode(&data);
        }

        #[test]
        fn roundtrip(msg in message()) {
            prop_assert_eq!(decode(&encode(&msg)), Ok(msg));
        }

        #[test]
        fn every_truncation_is_an_error(msg in message(), cut in any::<prop::sample::Index>()) {
            let data = encode(&msg);
            let cut = cut.index(data.len());
            prop_assert!(decode(&data[..cut]).is_err());
        }

        #[test]
        fn trailing_bytes_are_an_error(msg in message(), extra in proptest::collection::vec(any::<u8>(), 1..8)) {
            let mut data = encode(&msg);
            data.extend_from_slice(&extra);
            prop_assert_eq!(decode(&data), Err(DecodeError::TrailingBytes(extra.len())));
        }

        #[test]
        fn mutated_messages_never_panic(msg in message(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut data = encode(&msg);
            let i = at.index(data.len());
            data[i] = byte;
            let _ = decode(&data);
        }
    }

    #[test]
    fn huge_counts_do_not_allocate() {
        // Truncate claiming 2^31-1 relations, with none present.
        let mut data = vec![b'T'];
        data.extend_from_slice(&i32::MAX.to_be_bytes());
        data.push(0);
        assert_eq!(
            decode(&data),
            Err(DecodeError::Truncated("Truncate relation OIDs"))
        );
        // Insert claiming 32767 columns, with none present.
        let mut data = vec![b'I', 0, 0, 0, 1, b'N'];
        data.extend_from_slice(&i16::MAX.to_be_bytes());
        assert!(matches!(decode(&data), Err(DecodeError::Truncated(_))));
        let mut data = vec![b'I', 0, 0, 0, 1, b'N', 0xFF, 0xFF];
        data.push(b'n');
        assert!(matches!(decode(&data), Err(DecodeError::Negative { .. })));
    }

    #[test]
    fn known_bytes() {
        // An Insert of (1, 'a', NULL) into relation 16384, as pgoutput sends it.
        let data = b"I\x00\x00\x40\x00N\x00\x03t\x00\x00\x00\x011t\x00\x00\x00\x01an";
        let msg = decode(data).unwrap();
        assert_eq!(
            msg,
            PgOutput::Insert {
                relation_oid: 16384,
                new: vec![
                    TupleValue::Text(Bytes::from_static(b"1")),
                    TupleValue::Text(Bytes::from_static(b"a")),
                    TupleValue::Null
                ]
            }
        );
        assert_eq!(decode(b""), Err(DecodeError::Empty));
        assert_eq!(decode(b"Z"), Err(DecodeError::UnknownTag(b'Z')));
    }
}
