//! The CVR store against a real PostgreSQL: what a flush writes, a load gives back exactly,
//! whatever the row keys and query hashes hold (they come from clients and upstream rows),
//! and a second flush of the same rows updates them in place.

use zcache::cvr::store::{CvrStore, FlushBatch, Loaded};
use zcache::cvr::StoredRow;
use zcache::embedded::pgcluster::{PgCluster, PgClusterOptions};
use zcache::pgrepl::ConnConfig;

mod support;
use support::run;

/// Strings that break naive quoting in SQL, in array literals or in JSON.
const AWKWARD: &[&str] = &[
    r#"{"id":"plain"}"#,
    r#"{"id":"it's"}"#,
    r#"{"id":"a \"quoted\" one"}"#,
    r#"{"id":"back\\slash\\"}"#,
    r#"{"id":"{braces},commas"}"#,
    "NULL",
    "",
    r#"{"id":"ünïcødé ✓"}"#,
    r#"{"id":" spaced "}"#,
];

fn row(table: &str, key: &str, queries: &[&str], digest: Option<u64>) -> StoredRow {
    StoredRow {
        table: table.into(),
        key: key.into(),
        patch: "1a2b".into(),
        queries: queries.iter().map(|q| q.to_string()).collect(),
        digest,
    }
}

async fn write_and_load(store: &mut CvrStore, batch: FlushBatch) -> Loaded {
    store
        .flush(std::slice::from_ref(&batch))
        .await
        .expect("flush");
    store
        .load(&batch.group)
        .await
        .expect("load")
        .expect("stored")
}

fn sorted(mut rows: Vec<StoredRow>) -> Vec<StoredRow> {
    rows.sort_by(|a, b| (&a.table, &a.key).cmp(&(&b.table, &b.key)));
    rows
}

#[test]
fn what_a_flush_writes_a_load_gives_back() {
    let pg = PgCluster::start(PgClusterOptions::default()).expect("postgres");
    let cfg = ConnConfig::parse(&pg.url("postgres")).expect("url");
    run(async move {
        let mut store = CvrStore::new(cfg, "zapp_0");
        store.migrate().await.expect("migrate");
        let mut rows: Vec<StoredRow> = AWKWARD
            .iter()
            .enumerate()
            .map(|(i, key)| {
                let hash = AWKWARD[(i + 1) % AWKWARD.len()];
                row("issue", key, &[hash, "q\"2"], Some(u64::MAX - i as u64))
            })
            .collect();
        rows.push(row("it's a \"table\"", "{}", &[], None));
        let batch = |rows: Vec<StoredRow>, version: &str| {
            FlushBatch {
            group: "group 'one' \"1\"".into(),
            version: version.into(),
            digests_at: version.into(),
            config: Some(r#"{"clients":[],"desires":{},"queries":{},"removed_queries":{},"lmids":{},"mutation_results":[]}"#.into()),
            rows,
        }
        };
        let loaded = write_and_load(&mut store, batch(rows.clone(), "1a2b")).await;
        assert_eq!(sorted(loaded.rows), sorted(rows.clone()));
        // The same rows again, changed: updated in place, none added.
        for r in &mut rows {
            r.patch = "1a2c".into();
            r.digest = r.digest.map(|d| d / 2);
            r.queries.reverse();
        }
        let loaded = write_and_load(&mut store, batch(rows.clone(), "1a2c")).await;
        assert_eq!(loaded.version, "1a2c");
        assert_eq!(sorted(loaded.rows), sorted(rows));
    });
}
