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
