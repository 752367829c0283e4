//! Binary COPY against text COPY on a real PostgreSQL: a table with a column of every type
//! zcache reads in binary (and arrays of them), extreme values and many random rows, copied
//! both ways; the two replicas must hold the same values, bit for bit.

mod support;

use rusqlite::types::Value as Sql;
use support::{cluster, psql, run, DB};
use zcache::pgrepl::{connect, ConnConfig};
use zcache::replicator::initial_sync::{copy_table_as, CopyFormat};
use zcache::replicator::schema::published_tables;
use zcache::sqlite::Replica;

/// Random rows on top of the hand-written extreme ones.
const RANDOM_ROWS: u32 = 20_000;

const SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy 😀');
CREATE TABLE every_type (
  id int PRIMARY KEY,
  i2 int2, i4 int4, i8 int8, f8 float8, num numeric, b bool,
  t text, vc varchar(40), bc char(12), u uuid, m mood, j json, jb jsonb,
  d date, tm time, ttz timetz, ts timestamp, tstz timestamptz,
  a_i2 int2[], a_i4 int4[], a_i8 int8[], a_num numeric[],
  a_b bool[], a_t text[], a_vc varchar[], a_bc char(3)[], a_u uuid[], a_m mood[],
  a_j json[], a_jb jsonb[], a_d date[], a_tm time[], a_ttz timetz[], a_ts timestamp[],
  a_tstz timestamptz[], a_name name[], a_oid oid[], a2_i4 int4[][], a3_t text[][][]
);
-- Floats whose printed digits the text path keeps: copied in text (see pgbinary::Scalar).
CREATE TABLE float_digits (id int PRIMARY KEY, f4 float4, a_f4 float4[], a_f8 float8[]);
CREATE PUBLICATION every_type_pub FOR TABLE every_type;
CREATE PUBLICATION float_digits_pub FOR TABLE float_digits;
"#;

const EXTREMES: &str = r#"
INSERT INTO every_type (id, i2, i4, i8, f8, num, b, t, vc, bc, u, m, j, jb, d, tm, ttz, ts, tstz,
  a_i2, a_i4, a_i8, a_num, a_b, a_t, a_vc, a_bc, a_u, a_m, a_j, a_jb, a_d, a_tm,
  a_ttz, a_ts, a_tstz, a_name, a_oid, a2_i4, a3_t) VALUES
(1, 32767, 2147483647, 9223372036854775807, 'NaN', 'NaN', true,
 E'unicode é 😀 \t tab \n newline \\ backslash "quote"', '', 'pad', '00000000-0000-0000-0000-000000000000',
 'happy 😀', '{"a" :1,  "b":[1,2]}', '{"b": [1, 2.50], "a": {"x": null}}',
 'infinity', '24:00:00', '24:00:00+14', 'infinity', 'infinity',
 '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}',
 '{}', '{}', '{}', '{}', '{}', '{}', '{}'),
(2, -32768, -2147483648, -9223372036854775808, '-Infinity', '1e1000', false,
 '', 'x', '', 'ffffffff-ffff-ffff-ffff-ffffffffffff', 'sad', '[]', '[]',
 '-infinity', '00:00:00', '00:00:00-15:59', '-infinity', '-infinity',
 '{1,NULL,-32768}', '{{1,2},{3,4}}', '{9007199254740993,-9223372036854775808}',
 '{NaN,Infinity,-Infinity,1e400,0.000001,-123.4500,0}',
 '{t,f,NULL}', E'{"NULL",NULL,"",",","{}","a b","q\\"x","back\\\\slash","😀"}',
 '{"",x}', '{a,"b c"}', '{00000000-0000-0000-0000-000000000001,NULL}', '{sad,"happy 😀",NULL}',
 ARRAY['{"a":1}'::json, '[1, 2]', NULL], ARRAY['{"a": 1}'::jsonb, 'null', '"s"', NULL],
 '{infinity,-infinity,2000-01-01,0044-03-15 BC,5874897-12-31}',
 '{24:00:00,00:00:00.000001,12:34:56.5}', '{24:00:00+14,12:00:00-05:30,00:00:01+00}',
 '{infinity,-infinity,"4713-01-01 00:00:00 BC","294276-12-31 23:59:59.999999","1999-12-31 23:59:59.5"}',
 '{infinity,-infinity,"0001-01-01 00:00:00+00 BC","1969-12-31 23:59:59.999999+00"}',
 '{pg_class,"a b"}', '{0,4294967295}', '[0:1][-1:0]={{1,NULL},{3,4}}',
 '{{{a,b},{c,d}},{{e,f},{NULL,h}}}'),
(3, 0, 0, 0, '-0', '-0.000', NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 '0001-01-01 BC', '23:59:59.999999', '12:34:56.789123+05:30', '1900-02-28 12:00:00.000001',
 '2000-02-29 00:00:00.123456+00', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
(4, 1, 1, 9007199254740993, 5e-324, 1e-16383, true, 'a', 'b', 'c',
 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'ok', 'null', '1.000', '4713-01-01 BC', '00:00:00.0005',
 '00:00:00+00', '4713-01-01 00:00:00 BC', '294276-12-31 23:59:59.999999+00',
 NULL, '{1}', NULL, '{1e-16383}', NULL, '{x}', NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
(5, 2, 2, 2, 1.7976931348623157e308, '123456789012345678901234567890.123456789',
 false, 'z', 'z', 'z', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12', 'sad', '{}', '{}', '1970-01-01',
 '12:00:00', '12:00:00-01', '1970-01-01 00:00:00', '1970-01-01 00:00:00+00', NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 NULL, NULL);
INSERT INTO float_digits VALUES (1, 0.1, '{0.1,NaN}', '{1e15,0.1}');
"#;

/// `expr`, or NULL one time in ten.
fn maybe(expr: &str) -> String {
    format!("CASE WHEN random() < 0.1 THEN NULL ELSE {expr} END")
}

/// An array of 0..4 elements of `expr` (some NULL), as `ty`.
fn arr(expr: &str, ty: &str) -> String {
    maybe(&format!(
        "ARRAY(SELECT CASE WHEN random() < 0.15 THEN NULL ELSE {expr} END \
         FROM generate_series(1, (random() * 4)::int + g * 0))::{ty}"
    ))
}

fn random_rows_sql() -> String {
    let zone = "(ARRAY['+00','-05','+05:30','+14','-12:45','+01'])[1 + floor(random() * 6)::int]";
    let time = "(time '00:00' + random() * interval '24 hours')";
    let timetz = format!("(({time})::text || {zone})::timetz");
    let ts = "(timestamp '2000-01-01' + (random() - 0.5) * interval '1500000 days')";
    let tstz = "(timestamptz '2000-01-01 00:00+00' + (random() - 0.5) * interval '1500000 days')";
    let date = "(date '2000-01-01' + ((random() - 0.5) * 1500000)::int)";
    let f8 = "(sign(random() - 0.5) * power(10::float8, (random() - 0.5) * 600) * random())";
    let num = "round(((random() - 0.5) * power(10::numeric, (random() * 30)::int))::numeric, (random() * 20)::int)";
    let text = "(md5(random()::text) || chr((32 + random() * 50000)::int) || ' \"q\" ,{}\\')";
    let uuid = "md5(random()::text)::uuid";
    let mood = "(enum_range(NULL::mood))[1 + floor(random() * 3)::int]";
    let json = "json_build_object('n', random(), 's', md5(random()::text))";
    let jsonb = "jsonb_build_object('n', random(), 's', md5(random()::text), 'a', jsonb_build_array(1, 'x'))";
    let i8 = "((random() - 0.5) * 1.8e19)::int8";
    let cols = [
        maybe("((random() - 0.5) * 65534)::int2"),
        maybe("((random() - 0.5) * 4.29e9)::int4"),
        maybe(i8),
        maybe(f8),
        maybe(num),
        maybe("random() < 0.5"),
        maybe(text),
        maybe("left(md5(random()::text), (random() * 30)::int)"),
        maybe("left(md5(random()::text), (random() * 12)::int)"),
        maybe(uuid),
        maybe(mood),
        maybe(json),
        maybe(jsonb),
        maybe(date),
        maybe(time),
        maybe(&timetz),
        maybe(ts),
        maybe(tstz),
        arr("((random() - 0.5) * 65534)::int2", "int2[]"),
        arr("((random() - 0.5) * 4.29e9)::int4", "int4[]"),
        arr(i8, "int8[]"),
        arr(num, "numeric[]"),
        arr("random() < 0.5", "bool[]"),
        arr(text, "text[]"),
        arr("md5(random()::text)", "varchar[]"),
        arr("left(md5(random()::text), 2)", "char(3)[]"),
        arr(uuid, "uuid[]"),
        arr(mood, "mood[]"),
        arr(json, "json[]"),
        arr(jsonb, "jsonb[]"),
        arr(date, "date[]"),
        arr(time, "time[]"),
        arr(&timetz, "timetz[]"),
        arr(ts, "timestamp[]"),
        arr(tstz, "timestamptz[]"),
        arr("md5(random()::text)::name", "name[]"),
        arr("(random() * 4294967295)::int8::oid", "oid[]"),
        maybe("ARRAY[[(random() * 100)::int4, NULL], [1, (random() * 100)::int4]]"),
        maybe("ARRAY[[[md5(random()::text)]], [[NULL]]]"),
    ];
    format!(
        "SELECT setseed(0.42); INSERT INTO every_type SELECT g + 100, {} FROM generate_series(1, {RANDOM_ROWS}) g;",
        cols.join(", ")
    )
}

/// Every row of `table` in `path`, by primary key.
fn sqlite_rows(path: &std::path::Path, table: &str) -> Vec<Vec<Sql>> {
    let conn = rusqlite::Connection::open(path).expect("open replica");
    let mut stmt = conn
        .prepare(&format!("SELECT * FROM \"{table}\" ORDER BY id"))
        .expect("select");
    let n = stmt.column_count();
    let rows = stmt
        .query_map([], |r| (0..n).map(|i| r.get::<_, Sql>(i)).collect())
        .expect("query")
        .collect::<Result<Vec<Vec<Sql>>, _>>()
        .expect("rows");
    rows
}

/// Equal, floats bit for bit (so 0.0 and -0.0 differ).
fn same(a: &Sql, b: &Sql) -> bool {
    match (a, b) {
        (Sql::Real(x), Sql::Real(y)) => x.to_bits() == y.to_bits(),
        _ => a == b,
    }
}

#[test]
fn binary_copy_stores_what_text_copy_stores() {
    let pg = cluster(&[]);
    psql(&pg, SCHEMA);
    psql(&pg, EXTREMES);
    psql(&pg, &random_rows_sql());
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = ConnConfig::parse(&pg.url(DB)).expect("url");
    let copied = run(async {
        let mut conn = connect(&upstream, false).await.expect("connect");
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .expect("begin");
        let tables = published_tables(&mut conn, &["every_type_pub".to_string()])
            .await
            .expect("tables");
        assert_eq!(tables.len(), 1);
        let t = &tables[0];
        let floats = published_tables(&mut conn, &["float_digits_pub".to_string()])
            .await
            .expect("tables");
        let scratch = Replica::open(&dir.path().join("floats.db")).expect("replica");
        let refused = copy_table_as(&mut conn, &scratch, &floats[0], CopyFormat::Binary).await;
        assert!(
            refused.is_err(),
            "float4 and float arrays are copied in text"
        );
        assert_eq!(t.spec.columns.len(), 40, "every column is synced");
        let mut counts = Vec::new();
        for format in [CopyFormat::Text, CopyFormat::Binary] {
            let mut replica =
                Replica::open(&dir.path().join(format!("{format:?}.db"))).expect("replica");
            replica.begin_bulk_load().expect("bulk");
            replica.create_table(&t.spec).expect("table");
            let n = copy_table_as(&mut conn, &replica, t, format)
                .await
                .unwrap_or_else(|e| panic!("{format:?} copy: {e}"));
            replica.end_bulk_load().expect("commit");
            counts.push(n);
        }
        conn.execute("COMMIT").await.expect("commit");
        counts
    });
    let expected = u64::from(RANDOM_ROWS) + 5;
    assert_eq!(copied, [expected, expected]);
    let text = sqlite_rows(&dir.path().join("Text.db"), "every_type");
    let binary = sqlite_rows(&dir.path().join("Binary.db"), "every_type");
    assert_eq!(text.len() as u64, expected);
    assert_eq!(binary.len(), text.len());
    let names: Vec<String> = {
        let conn = rusqlite::Connection::open(dir.path().join("Text.db")).expect("open");
        let stmt = conn.prepare("SELECT * FROM every_type").expect("select");
        stmt.column_names().map(str::to_string).collect()
    };
    let mut diffs = Vec::new();
    let mut per_column = std::collections::BTreeMap::<&str, usize>::new();
    for (t_row, b_row) in text.iter().zip(&binary) {
        for (i, (tv, bv)) in t_row.iter().zip(b_row).enumerate() {
            if !same(tv, bv) {
                *per_column.entry(&names[i]).or_default() += 1;
                diffs.push(format!(
                    "id {:?} column {}: text {tv:?} binary {bv:?}",
                    t_row[0], names[i]
                ));
            }
        }
    }
    assert!(
        diffs.is_empty(),
        "{} differences ({per_column:?}), first: {:#?}",
        diffs.len(),
        &diffs[..diffs.len().min(20)]
    );
    // The comparison saw the values that matter, not rows of NULLs.
    let non_null = |col: usize| binary.iter().filter(|r| r[col] != Sql::Null).count();
    for (col, name) in names.iter().enumerate().skip(1) {
        assert!(non_null(col) > 100, "column {name} is mostly NULL");
    }
}
