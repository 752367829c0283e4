//! Binary COPY streams and values are upstream data: framing and decoding never panic, a
//! stream decodes to the same rows however it is split into chunks, and the decoder holds
//! back no more than one item between chunks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zcache::sqlite::pgbinary::{
    decode_binary_sql, plan_column, BinaryColumn, BinaryCopyError, CopyBinaryDecoder, UserType,
};
use zcache::sqlite::pgtypes::column_kind;

type Rows = Vec<Vec<Option<Vec<u8>>>>;

fn decode(columns: usize, chunks: &[&[u8]]) -> Result<Rows, BinaryCopyError> {
    let mut d = CopyBinaryDecoder::new(columns);
    let mut rows = Vec::new();
    let mut fed = 0;
    for c in chunks {
        d.feed(c, |t| {
            rows.push((0..t.len()).map(|i| t.field(i).map(<[u8]>::to_vec)).collect());
            Ok::<_, BinaryCopyError>(())
        })?;
        // What is held back is the start of one item, never more than was fed.
        fed += c.len();
        assert!(d.carried_bytes() <= fed);
    }
    d.finish()?;
    Ok(rows)
}

/// Type OIDs whose binary readings are exercised on the input's bytes.
const TYPES: [u32; 20] = [
    16, 20, 21, 23, 701, 1700, 25, 1043, 2950, 114, 3802, 1082, 1083, 1266, 1114, 1184, 1007,
    1009, 1182, 1185,
];

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let columns = usize::from(head % 5);
    let at = usize::from(head).min(rest.len());
    let whole = decode(columns, &[rest]);
    let split = decode(columns, &[&rest[..at], &rest[at..]]);
    if let Ok(rows) = &whole {
        assert_eq!(split.as_ref(), Ok(rows), "split decoding differs");
        assert!(rows.iter().all(|r| r.len() == columns));
    }
    let mut scratch = String::new();
    for oid in TYPES {
        let is_array = matches!(oid, 1007 | 1009 | 1182 | 1185);
        let Some(kind) = column_kind(oid, is_array) else {
            continue;
        };
        let Some(col) = plan_column(oid, kind, |_| UserType::Other) else {
            continue;
        };
        if let (Ok(v), BinaryColumn::Array { .. }) = (decode_binary_sql(&col, rest, &mut scratch), col) {
            if let rusqlite::types::ToSqlOutput::Owned(rusqlite::types::Value::Text(json)) = v {
                assert!(
                    serde_json::from_str::<serde_json::Value>(&json).is_ok_and(|j| j.is_array()),
                    "array JSON {json:?}"
                );
            }
        }
    }
});
