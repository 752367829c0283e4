//! Indexes a query's lookups need and upstream lacks: the syncer side finds them
//! (`LiveQuery::lookups`, `ReplicaReader::has_index_on`) and the replicator, the replica's only
//! writer, builds them between transactions while it streams.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use zcache::sqlite::{IndexRequests, ReplicaReader};
use zcache::zql::ivm::LiveQuery;
use zcache::zql::parse_ast;

#[test]
fn a_join_column_upstream_never_indexed_gets_an_index_while_streaming() {
    let pg = cluster(&[]);
    psql(
        &pg,
        "CREATE TABLE issue (id text PRIMARY KEY, status text, created int8);
         CREATE TABLE comment (id text PRIMARY KEY, issue_id text, body text);
         INSERT INTO issue SELECT 'i' || i, 'open', i FROM generate_series(1, 50) i;
         INSERT INTO comment SELECT 'c' || i, 'i' || (i % 50), 'b' FROM generate_series(1, 200) i;",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let cfg = config(&pg, &path, "ix", &[]);
    let requests = Arc::new(IndexRequests::default());
    run(async {
        let prepared = prepare(&cfg).await;
        let st = start_streaming_with(&cfg, prepared, requests.clone()).await;
        let reader = ReplicaReader::open(&path).expect("reader");
        let issue_id = vec!["issue_id".to_string()];
        assert!(!reader.has_index_on("comment", &issue_id).expect("indexes"));
        assert!(reader
            .has_index_on("issue", &["id".to_string()])
            .expect("the key index counts"));

        // The syncer side: a query reading comments by issue_id names that lookup.
        let ast = parse_ast(
            &serde_json::json!({"table":"issue","orderBy":[["created","desc"]],"limit":10,
            "related":[{"correlation":{"parentField":["id"],"childField":["issue_id"]},
                "subquery":{"table":"comment","alias":"comments"}}]}),
        )
        .expect("ast");
        reader.begin_snapshot().expect("snapshot");
        let live = LiveQuery::hydrate(&ast, &reader).expect("hydrate");
        reader.end_snapshot().expect("end");
        let lookups = live.lookups();
        assert!(lookups.contains(&("comment".to_string(), issue_id.clone())));
        assert!(lookups.contains(&("issue".to_string(), vec!["id".to_string()])));
        for (table, columns) in lookups {
            if !reader.has_index_on(&table, &columns).expect("indexes") {
                assert!(requests.request(&table, &columns));
            }
        }

        // The replicator builds it at its next turn (a transaction wakes it up).
        let at = commit(&pg, "UPDATE issue SET status = 'closed' WHERE id = 'i1';");
        version_of(&st.rx, at).await;
        let mut built = false;
        for _ in 0..100 {
            if reader.has_index_on("comment", &issue_id).expect("indexes") {
                built = true;
                break;
            }
            glommio::timer::sleep(Duration::from_millis(50)).await;
        }
        assert!(built, "the requested index was built");
        assert!(requests.take().is_empty(), "and the request consumed");
        // Streaming goes on, and the index serves reads.
        let at = commit(&pg, "INSERT INTO comment VALUES ('new', 'i2', 'x');");
        version_of(&st.rx, at).await;
        reader.begin_snapshot().expect("snapshot");
        let rows = reader
            .fetch_rows(
                "comment",
                &[(1, zcache::zql::value::Value::Text("i2".into()))],
            )
            .expect("fetch");
        reader.end_snapshot().expect("end");
        assert_eq!(rows.len(), 5, "4 seeded comments of i2 and the new one");
        st.stop().await;
    });
}
