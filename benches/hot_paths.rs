//! Benchmarks of the per-change and per-poke hot paths: decoding a replication message,
//! applying rows to the replica, evaluating a query, building a poke, framing it, and parsing
//! what clients send. Data follows the reference kit's seed (setup.sh): 10,000 issues,
//! 50,000 comments.
//!
//! Measurement windows are short so that `cargo bench --bench hot_paths` finishes in a few
//! minutes on a small shared machine.

use std::collections::HashMap;
use std::hint::black_box;
use std::rc::Rc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use zcache::pgrepl::pgoutput::{decode_bytes, PgOutput};
use zcache::protocol::down::PokeBuilder;
use zcache::protocol::up::{parse, Upstream};
use zcache::sqlite::Replica;
use zcache::ws::frame::{decode_frame, text_frame};
use zcache::zql::schema::TableSpec;
use zcache::zql::value::{Row, Value};
use zcache::zql::{evaluate, parse_ast, Source, ZqlError};

mod kit;
use kit::*;

// ---------------------------------------------------------------------------------------------
// pgoutput

/// An Insert ('I') into relation 16384 of the six text-format columns of an issue row.
fn pgoutput_insert(row: &[&str]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(16_384);
    b.put_u8(b'N');
    b.put_i16(i16::try_from(row.len()).expect("few columns"));
    for value in row {
        b.put_u8(b't');
        b.put_i32(i32::try_from(value.len()).expect("short value"));
        b.put_slice(value.as_bytes());
    }
    b.freeze()
}

fn bench_pgoutput(c: &mut Criterion) {
    let msg = pgoutput_insert(&[
        "i4242",
        "Issue title 4242",
        "open",
        "2",
        "1700004242000",
        "u43",
    ]);
    assert!(matches!(
        decode_bytes(&msg),
        Ok(PgOutput::Insert { ref new, .. }) if new.len() == 6
    ));
    let mut g = c.benchmark_group("pgoutput");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_insert_6_text_columns", |b| {
        b.iter(|| decode_bytes(black_box(&msg)))
    });
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// Pokes and frames

/// The first 100 rows of the kit's `issuesByStatus` result in view order: each open issue
/// (newest first) followed by its five comments, as in the reference trace's 13 KB parts.
fn poke_rows<'a>(issues: &'a TableSpec, comments: &'a TableSpec) -> Vec<(&'a TableSpec, Row)> {
    let open_issues = (1..=ISSUES)
        .rev()
        .filter(|i| STATUSES[(i % 3) as usize] == "open");
    let mut rows = Vec::new();
    for i in open_issues {
        rows.push((issues, issue_row(i)));
        // Comment c belongs to issue 1 + c % ISSUES.
        let of_issue = (0..COMMENTS / ISSUES)
            .map(|k| i - 1 + k * ISSUES)
            .filter(|&c| c >= 1);
        rows.extend(of_issue.map(|c| (comments, comment_row(c))));
        if rows.len() >= 100 {
            break;
        }
    }
    rows.truncate(100);
    rows
}

fn build_poke(rows: &[(&TableSpec, Row)]) -> Vec<String> {
    let mut poke = PokeBuilder::new("p1", Some("c1"));
    for (spec, row) in rows {
        poke.put_row(spec, row);
    }
    poke.finish("c2")
}

fn bench_poke(c: &mut Criterion) {
    let (issues, comments) = (issue_spec(), comment_spec());
    let rows = poke_rows(&issues, &comments);
    let messages = build_poke(&rows);
    // pokeStart, the part carrying the rows, pokeEnd.
    let part = messages
        .iter()
        .find(|m| m.starts_with("[\"pokePart\""))
        .expect("a poke with rows has a part")
        .clone();
    assert!(
        (12_500..=14_000).contains(&part.len()),
        "100 rows make a ~13 KB part, got {} bytes",
        part.len()
    );

    let mut g = c.benchmark_group("poke");
    g.throughput(Throughput::Elements(rows.len() as u64));
    g.bench_function("build_100_rows", |b| {
        b.iter(|| build_poke(black_box(&rows)))
    });
    g.finish();

    let mut g = c.benchmark_group("ws");
    g.throughput(Throughput::Bytes(part.len() as u64));
    g.bench_function(format!("text_frame_{}_bytes", part.len()), |b| {
        b.iter(|| text_frame(black_box(part.as_bytes())))
    });
    // The other direction: a client's masked frame of the same size, decoded and unmasked.
    let masked = masked_client_frame(part.as_bytes(), [0x37, 0xfa, 0x21, 0x3d]);
    g.bench_function(format!("decode_masked_frame_{}_bytes", part.len()), |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&masked[..]);
            let frame = decode_frame(black_box(&mut buf), 1 << 20).expect("valid frame");
            black_box(frame)
        })
    });
    g.finish();
}

/// A final masked text frame as a client sends it (RFC 6455 §5.2), built here independently of
/// zcache's encoder.
fn masked_client_frame(payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let mut out = vec![0x81];
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

// ---------------------------------------------------------------------------------------------
// ZQL evaluation over an in-memory source

/// Hashable stand-in for the values the bench tables index (text and integers).
#[derive(Clone, PartialEq, Eq, Hash)]
enum IndexKey {
    Text(String),
    Int(i64),
}

impl IndexKey {
    fn of(v: &Value) -> Option<IndexKey> {
        match v {
            Value::Text(s) => Some(IndexKey::Text(s.clone())),
            Value::Int(i) => Some(IndexKey::Int(*i)),
            _ => None,
        }
    }
}

/// One table's rows with single-column hash indexes, standing in for the replica's B-tree
/// indexes (the kit creates `comment(issue_id)` and `issue(status, created)`).
struct MemTable {
    spec: Rc<TableSpec>,
    rows: Vec<Row>,
    indexes: HashMap<usize, HashMap<IndexKey, Vec<usize>>>,
}

impl MemTable {
    fn new(spec: TableSpec, rows: Vec<Row>, indexed: &[&str]) -> Self {
        let mut indexes = HashMap::new();
        for name in indexed {
            let col = spec.column_index(name).expect("indexed column exists");
            let mut index: HashMap<IndexKey, Vec<usize>> = HashMap::new();
            for (pos, row) in rows.iter().enumerate() {
                if let Some(key) = IndexKey::of(&row[col]) {
                    index.entry(key).or_default().push(pos);
                }
            }
            indexes.insert(col, index);
        }
        MemTable {
            spec: Rc::new(spec),
            rows,
            indexes,
        }
    }

    /// Candidate positions from the first indexed equality, else every row.
    fn candidates(&self, eq: &[(usize, Value)]) -> Vec<usize> {
        for (col, value) in eq {
            if let Some(index) = self.indexes.get(col) {
                return IndexKey::of(value)
                    .and_then(|k| index.get(&k).cloned())
                    .unwrap_or_default();
            }
        }
        (0..self.rows.len()).collect()
    }
}

struct MemSource {
    tables: HashMap<String, MemTable>,
}

impl Source for MemSource {
    fn table(&self, name: &str) -> Option<Rc<TableSpec>> {
        self.tables.get(name).map(|t| Rc::clone(&t.spec))
    }

    fn fetch(&self, table: &str, eq: &[(usize, Value)]) -> Result<Vec<Row>, ZqlError> {
        let t = self
            .tables
            .get(table)
            .ok_or_else(|| ZqlError::Source(format!("no table {table:?}")))?;
        Ok(t.candidates(eq)
            .into_iter()
            .map(|pos| &t.rows[pos])
            .filter(|row| eq.iter().all(|(c, v)| row[*c].sql_eq(v)))
            .cloned()
            .collect())
    }
}

fn kit_source() -> MemSource {
    let issues = MemTable::new(
        issue_spec(),
        (1..=ISSUES).map(issue_row).collect(),
        &["status"],
    );
    let comments = MemTable::new(
        comment_spec(),
        (1..=COMMENTS).map(comment_row).collect(),
        &["issue_id"],
    );
    MemSource {
        tables: HashMap::from([("issue".into(), issues), ("comment".into(), comments)]),
    }
}

/// `issue where status='open' orderBy created desc limit 100 related comments`, as the kit's
/// `issuesByStatus` query reaches zero-cache (from the reference app-server trace).
const ISSUES_BY_STATUS_AST: &str = r#"{"table":"issue","where":{"type":"simple","left":{"type":"column","name":"status"},"right":{"type":"literal","value":"open"},"op":"="},"related":[{"correlation":{"parentField":["id"],"childField":["issue_id"]},"subquery":{"table":"comment","alias":"comments","orderBy":[["created","desc"]]},"system":"client"}],"limit":100,"orderBy":[["created","desc"]]}"#;

fn bench_zql(c: &mut Criterion) {
    let src = kit_source();
    let json: serde_json::Value = serde_json::from_str(ISSUES_BY_STATUS_AST).expect("AST JSON");
    let ast = parse_ast(&json).expect("AST parses");
    let ev = evaluate(&ast, &src).expect("query evaluates");
    assert_eq!(ev.nodes.len(), 100);
    // 100 open issues, each with its 5 comments.
    assert_eq!(ev.rows.len(), 100 + 500);

    let mut g = c.benchmark_group("zql");
    g.throughput(Throughput::Elements(1));
    g.bench_function("evaluate_open_issues_limit_100_with_comments", |b| {
        b.iter(|| evaluate(black_box(&ast), &src))
    });
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// Replica writes

fn bench_replica(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut replica = Replica::open(&dir.path().join("replica.db")).expect("open replica");
    replica.create_table(&issue_spec()).expect("create issue");
    let rows: Vec<Row> = (1..=1000).map(issue_row).collect();
    let mut watermark = 0u64;

    let mut g = c.benchmark_group("replica");
    g.throughput(Throughput::Elements(rows.len() as u64));
    g.bench_function("upsert_1000_rows_one_transaction", |b| {
        b.iter(|| {
            watermark += 1;
            replica.begin().expect("begin");
            for row in &rows {
                replica.upsert("issue", black_box(row)).expect("upsert");
            }
            replica.commit(watermark).expect("commit");
        })
    });
    g.finish();
    // Nothing ran when a filter left this bench out.
    let expected = (watermark > 0).then_some(watermark);
    assert_eq!(replica.watermark().expect("watermark"), expected);
}

// ---------------------------------------------------------------------------------------------
// Upstream messages

/// A `push` as the reference client sent it (trace-zero-1.9.jsonl).
const CAPTURED_PUSH: &str = r#"["push",{"timestamp":1795617436698,"clientGroupID":"p06t78l8h9913hqlss","mutations":[{"type":"custom","timestamp":1795617436694,"id":1,"clientID":"qidq9pu82ntlq0hhjg","name":"issue.setTitle","args":[{"id":"i9999","title":"mutated-1795617436694"}]}],"pushVersion":1,"requestID":"qidq9pu82ntlq0hhjg-582b98-4"}]"#;

fn bench_upstream(c: &mut Criterion) {
    assert!(matches!(
        parse(&mut CAPTURED_PUSH.as_bytes().to_vec()),
        Ok(Upstream::Push(ref h, _)) if h.mutations.len() == 1
    ));
    let mut g = c.benchmark_group("upstream");
    g.throughput(Throughput::Bytes(CAPTURED_PUSH.len() as u64));
    // simd-json parses in place, so every iteration gets a fresh copy (outside the timing).
    g.bench_function("parse_push", |b| {
        b.iter_batched_ref(
            || CAPTURED_PUSH.as_bytes().to_vec(),
            |buf| parse(black_box(buf)),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// What a connect costs with JWT auth: one verification per algorithm family, with the
/// fixture tokens (tests/fixtures/jwt), claims checked as at a real connect.
fn bench_jwt(c: &mut Criterion) {
    let fixtures: serde_json::Value =
        serde_json::from_str(include_str!("../tests/fixtures/jwt/fixtures.json"))
            .expect("fixtures");
    let secret = fixtures["secret"].as_str().expect("secret");
    let user = fixtures["claims"]["sub"].as_str().expect("sub");
    let issuer = fixtures["claims"]["iss"].as_str().map(String::from);
    let audience = fixtures["claims"]["aud"].as_str().map(String::from);
    let now_s = 1_700_000_100;
    let mut g = c.benchmark_group("jwt_verify");
    let cases: Vec<(&str, zcache::auth::Verifier)> = vec![
        (
            "HS256",
            zcache::auth::Verifier::with_secret(secret, issuer.clone(), audience.clone())
                .expect("secret"),
        ),
        ("RS256", jwk_verifier(&fixtures, "rsa", &issuer, &audience)),
        ("ES256", jwk_verifier(&fixtures, "p256", &issuer, &audience)),
        (
            "EdDSA",
            jwk_verifier(&fixtures, "ed25519", &issuer, &audience),
        ),
    ];
    for (alg, verifier) in &cases {
        let token = fixtures["tokens"][*alg].as_str().expect("token");
        verifier
            .verify(token, user, now_s)
            .expect("the fixture verifies");
        g.bench_function(*alg, |b| {
            b.iter(|| verifier.verify(black_box(token), user, now_s))
        });
    }
    g.finish();
}

fn jwk_verifier(
    fixtures: &serde_json::Value,
    key: &str,
    issuer: &Option<String>,
    audience: &Option<String>,
) -> zcache::auth::Verifier {
    let jwk = fixtures["keys"][key]["jwk"].to_string();
    zcache::auth::Verifier::with_jwk(&jwk, issuer.clone(), audience.clone()).expect("jwk")
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = hot_paths;
    config = config();
    targets = bench_pgoutput, bench_poke, bench_zql, bench_replica, bench_upstream, bench_jwt
}
criterion_main!(hot_paths);
