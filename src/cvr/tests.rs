use super::*;
use crate::zql::value::Value;

use super::issue_spec as spec;

fn rows(items: &[(&str, &str)]) -> QueryRows {
    items
        .iter()
        .map(|(id, title)| {
            (
                crate::zql::RowKey::new("issue", format!("{{\"id\":\"{id}\"}}")),
                crate::cvr::RowData::new(
                    spec(),
                    vec![Value::Text(id.to_string()), Value::Text(title.to_string())],
                ),
            )
        })
        .collect()
}

fn named() -> QuerySpec {
    QuerySpec::Named {
        name: "q".into(),
        args: vec![],
    }
}

/// The poke from `base` as parsed JSON parts merged: (desired, got, rows).
fn poke_json(cvr: &Cvr, base: Option<Version>) -> Vec<serde_json::Value> {
    let mut p = PokeBuilder::new("p", base.map(|b| b.cookie()).as_deref());
    cvr.write_patches(base, &mut p);
    p.finish(&cvr.version.cookie())
        .iter()
        .map(|m| serde_json::from_str(m).expect("json"))
        .collect()
}

fn row_ops(parts: &[serde_json::Value]) -> Vec<String> {
    let mut ops: Vec<String> = parts
        .iter()
        .filter(|m| m[0] == "pokePart")
        .flat_map(|m| m[1]["rowsPatch"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            format!(
                "{} {}",
                r["op"].as_str().unwrap_or(""),
                r.get("value")
                    .map(|v| v["id"].to_string())
                    .unwrap_or_else(|| r["id"]["id"].to_string())
            )
        })
        .collect();
    ops.sort();
    ops
}

#[test]
fn two_queries_share_a_row_until_both_drop_it() {
    let mut cvr = Cvr::new("g");
    let v1 = cvr.next_config_version();
    cvr.ensure_client("c1");
    assert!(cvr.put_desired("c1", "q1", named(), None, v1));
    assert!(cvr.put_desired("c1", "q2", named(), None, v1));
    cvr.version = v1;

    let v2 = cvr.next_data_version(100);
    assert!(cvr.set_query_rows("q1", &rows(&[("a", "A"), ("b", "B")]), v2));
    assert!(cvr.set_query_rows("q2", &rows(&[("b", "B")]), v2));
    cvr.version = v2;
    assert_eq!(
        row_ops(&poke_json(&cvr, Some(v1))),
        vec!["put \"a\"", "put \"b\""]
    );

    // q1 no longer reaches b: still referenced by q2, so no patch
    let v3 = cvr.next_data_version(101);
    assert!(!cvr.set_query_rows("q1", &rows(&[("a", "A")]), v3));
    // a's title changes: a put
    assert!(cvr.set_query_rows("q1", &rows(&[("a", "A2")]), v3));
    cvr.version = v3;
    assert_eq!(row_ops(&poke_json(&cvr, Some(v2))), vec!["put \"a\""]);

    // dropping q2 deletes b
    let v4 = cvr.next_config_version();
    assert!(cvr.remove_query("q2", v4));
    cvr.version = v4;
    let parts = poke_json(&cvr, Some(v3));
    assert_eq!(row_ops(&parts), vec!["del \"b\""]);
    assert_eq!(parts[1][1]["gotQueriesPatch"][0]["op"], "del");
}

#[test]
fn catch_up_from_any_cookie_equals_the_live_pokes() {
    let mut cvr = Cvr::new("g");
    let v1 = cvr.next_config_version();
    cvr.put_desired("c1", "q1", named(), None, v1);
    cvr.version = v1;
    let v2 = cvr.next_data_version(5);
    cvr.set_query_rows("q1", &rows(&[("a", "A"), ("b", "B")]), v2);
    cvr.version = v2;
    let v3 = cvr.next_data_version(6);
    cvr.set_query_rows("q1", &rows(&[("b", "B"), ("c", "C")]), v3);
    cvr.version = v3;

    // a client that has nothing gets exactly the live rows, no tombstones
    assert_eq!(
        row_ops(&poke_json(&cvr, None)),
        vec!["put \"b\"", "put \"c\""]
    );
    // a client at v2 gets the del of a and the put of c
    assert_eq!(
        row_ops(&poke_json(&cvr, Some(v2))),
        vec!["del \"a\"", "put \"c\""]
    );
    // a client at v3 gets nothing
    assert!(row_ops(&poke_json(&cvr, Some(v3))).is_empty());
}

#[test]
fn lmids_and_mutation_results_patch_only_changes() {
    let mut cvr = Cvr::new("g");
    let v1 = cvr.next_data_version(10);
    assert!(cvr.set_lmids([("c1".to_string(), 1)].into(), v1));
    assert!(!cvr.set_lmids([("c1".to_string(), 1)].into(), v1));
    assert!(cvr.set_mutation_results(
        [(("c1".to_string(), 1), "{\"error\":\"app\"}".to_string())].into(),
        v1
    ));
    cvr.version = v1;
    let parts = poke_json(&cvr, Some(Version::default()));
    assert_eq!(parts[1][1]["lastMutationIDChanges"]["c1"], 1);
    assert_eq!(
        parts[1][1]["mutationsPatch"][0]["mutation"]["result"]["error"],
        "app"
    );

    let v2 = cvr.next_data_version(11);
    assert!(cvr.set_mutation_results(BTreeMap::new(), v2));
    cvr.version = v2;
    let parts = poke_json(&cvr, Some(v1));
    assert_eq!(parts[1][1]["mutationsPatch"][0]["op"], "del");
    assert!(parts[1][1].get("lastMutationIDChanges").is_none());
}

/// `(client, op, hash)` of every desired-query patch in the poke from `base`, sorted.
fn desired_ops(parts: &[serde_json::Value]) -> Vec<String> {
    let mut out = Vec::new();
    for m in parts.iter().filter(|m| m[0] == "pokePart") {
        if let Some(d) = m[1]["desiredQueriesPatches"].as_object() {
            for (client, ops) in d {
                for op in ops.as_array().cloned().unwrap_or_default() {
                    assert!(op.get("ttl").is_none(), "the echo carries no ttl: {op}");
                    out.push(format!(
                        "{client} {} {}",
                        op["op"].as_str().unwrap_or(""),
                        op["hash"].as_str().unwrap_or("")
                    ));
                }
            }
        }
    }
    out.sort();
    out
}

fn got_ops(parts: &[serde_json::Value]) -> Vec<String> {
    let mut out: Vec<String> = parts
        .iter()
        .filter(|m| m[0] == "pokePart")
        .flat_map(|m| {
            m[1]["gotQueriesPatch"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|g| {
            format!(
                "{} {}",
                g["op"].as_str().unwrap_or(""),
                g["hash"].as_str().unwrap_or("")
            )
        })
        .collect();
    out.sort();
    out
}

/// Applies one config change at the next config version, as the group does.
fn config<F: FnOnce(&mut Cvr, Version) -> bool>(cvr: &mut Cvr, f: F) -> (Version, bool) {
    let base = cvr.version;
    let at = cvr.next_config_version();
    let changed = f(cvr, at);
    if changed {
        cvr.version = at;
    }
    (base, changed)
}

/// Removes the expired queries at one data version, as hydration does; returns the poke
/// from the version before.
fn evict(cvr: &mut Cvr, state: u64) -> Vec<serde_json::Value> {
    let base = cvr.version;
    let at = cvr.next_data_version(state);
    let mut changed = false;
    for hash in cvr.expired_queries() {
        changed |= cvr.remove_query(&hash, at);
    }
    if changed {
        cvr.version = at;
    }
    poke_json(cvr, Some(base))
}

/// A group where `client` desires `hash` with `ttl` and the query is got with rows `items`.
fn got_query(cvr: &mut Cvr, client: &str, hash: &str, ttl: Option<f64>, items: &[(&str, &str)]) {
    config(cvr, |c, at| {
        c.ensure_client(client);
        c.put_desired(client, hash, named(), ttl, at)
    });
    let state = cvr.version.state + 1;
    let at = cvr.next_data_version(state);
    if cvr.set_query_rows(hash, &rows(items), at) {
        cvr.version = at;
    }
    assert!(cvr.queries[hash].got.is_some());
}

#[test]
fn ttl_is_parsed_and_clamped_like_zero_cache() {
    assert_eq!(clamp_ttl(None), TTL_DEFAULT_MS);
    assert_eq!(clamp_ttl(Some(0.0)), 0);
    assert_eq!(clamp_ttl(Some(1000.0)), 1000);
    assert_eq!(clamp_ttl(Some(TTL_MAX_MS as f64)), TTL_MAX_MS);
    assert_eq!(clamp_ttl(Some(TTL_MAX_MS as f64 + 1.0)), TTL_MAX_MS);
    assert_eq!(clamp_ttl(Some(-1.0)), TTL_MAX_MS, "forever becomes 10 min");
    assert_eq!(clamp_ttl(Some(f64::INFINITY)), TTL_MAX_MS);
    assert_eq!(clamp_ttl(Some(f64::NAN)), 0);
    assert_eq!(TTL_DEFAULT_MS, 300_000);
    assert_eq!(TTL_MAX_MS, 600_000);
    // A raise compares the unclamped incoming TTL with the stored one; forever is longest.
    assert!(ttl_raises(Some(2000.0), 1000));
    assert!(!ttl_raises(Some(1000.0), 1000));
    assert!(!ttl_raises(Some(500.0), 1000));
    assert!(ttl_raises(Some(-1.0), TTL_MAX_MS));
    assert!(ttl_raises(Some(TTL_MAX_MS as f64 * 2.0), TTL_MAX_MS));
    assert!(ttl_raises(None, 1000));
}

#[test]
fn a_repeated_put_matters_only_if_it_raises_the_ttl() {
    let mut cvr = Cvr::new("g");
    let (_, changed) = config(&mut cvr, |c, at| {
        c.ensure_client("c1");
        c.put_desired("c1", "q1", named(), Some(1000.0), at)
    });
    assert!(changed);
    let desire = |cvr: &Cvr| cvr.desires["c1"]["q1"].clone();
    assert_eq!(desire(&cvr).ttl_ms, 1000);

    for same_or_lower in [Some(1000.0), Some(500.0), Some(0.0)] {
        let (_, changed) = config(&mut cvr, |c, at| {
            c.put_desired("c1", "q1", named(), same_or_lower, at)
        });
        assert!(!changed, "{same_or_lower:?} does not raise 1000");
    }
    assert_eq!(desire(&cvr).ttl_ms, 1000);

    // Raised: a version bump and the desired put echoed again.
    let (base, changed) = config(&mut cvr, |c, at| {
        c.put_desired("c1", "q1", named(), Some(2000.0), at)
    });
    assert!(changed);
    assert_eq!(desire(&cvr).ttl_ms, 2000);
    assert_eq!(desired_ops(&poke_json(&cvr, Some(base))), vec!["c1 put q1"]);
    assert_eq!(desire(&cvr).patch, cvr.version);

    // Absent ttl is the 5 min default: a raise from 2 s.
    assert!(
        config(&mut cvr, |c, at| c.put_desired(
            "c1",
            "q1",
            named(),
            None,
            at
        ))
        .1
    );
    assert_eq!(desire(&cvr).ttl_ms, TTL_DEFAULT_MS);

    // Above the maximum: stored clamped, yet every such put raises the stored 10 min again.
    assert!(
        config(&mut cvr, |c, at| c.put_desired(
            "c1",
            "q1",
            named(),
            Some(3_600_000.0),
            at
        ))
        .1
    );
    assert_eq!(desire(&cvr).ttl_ms, TTL_MAX_MS);
    assert!(
        config(&mut cvr, |c, at| c.put_desired(
            "c1",
            "q1",
            named(),
            Some(3_600_000.0),
            at
        ))
        .1
    );
    assert!(
        config(&mut cvr, |c, at| c.put_desired(
            "c1",
            "q1",
            named(),
            Some(-1.0),
            at
        ))
        .1
    );
    assert_eq!(desire(&cvr).ttl_ms, TTL_MAX_MS);
    assert!(
        !config(&mut cvr, |c, at| c.put_desired(
            "c1",
            "q1",
            named(),
            Some(1.0),
            at
        ))
        .1
    );
}

#[test]
fn del_keeps_the_query_got_and_its_rows_until_the_ttl_runs_out() {
    let mut cvr = Cvr::new("g");
    got_query(
        &mut cvr,
        "c1",
        "q1",
        Some(1000.0),
        &[("a", "A"), ("b", "B")],
    );
    cvr.advance_ttl_clock(250);

    let (base, changed) = config(&mut cvr, |c, at| c.del_desired("c1", "q1", at));
    assert!(changed);
    let d = &cvr.desires["c1"]["q1"];
    assert_eq!(d.inactivated_at, Some(250), "inactivated at the TTL clock");
    assert_eq!(d.ttl_ms, 1000);
    let parts = poke_json(&cvr, Some(base));
    assert_eq!(
        desired_ops(&parts),
        vec!["c1 del q1"],
        "the desired del goes at once"
    );
    assert!(got_ops(&parts).is_empty(), "still got");
    assert!(row_ops(&parts).is_empty(), "rows stay");
    assert!(cvr.queries["q1"].got.is_some());
    // A second del changes nothing.
    assert!(!config(&mut cvr, |c, at| c.del_desired("c1", "q1", at)).1);

    assert_eq!(cvr.next_expiry_ms(), Some(1250));
    cvr.advance_ttl_clock(999);
    assert!(cvr.expired_queries().is_empty(), "1249 < 1250");
    assert!(got_ops(&evict(&mut cvr, 9)).is_empty());
    cvr.advance_ttl_clock(1);
    assert_eq!(cvr.expired_queries(), vec!["q1".to_string()]);
    let parts = evict(&mut cvr, 9);
    assert_eq!(got_ops(&parts), vec!["del q1"]);
    assert_eq!(row_ops(&parts), vec!["del \"a\"", "del \"b\""]);
    assert!(cvr.queries.is_empty());
    assert_eq!(cvr.next_expiry_ms(), None);
    // The desire stays as a tombstone: a client from before the del still gets it.
    assert!(cvr.desires["c1"]["q1"].removed);
    assert_eq!(
        desired_ops(&poke_json(
            &cvr,
            Some(Version {
                state: 1,
                config: 0
            })
        )),
        vec!["c1 del q1"]
    );
}

#[test]
fn expiry_takes_every_client_state_into_account() {
    let mut cvr = Cvr::new("g");
    got_query(&mut cvr, "c1", "q1", Some(1000.0), &[("a", "A")]);
    config(&mut cvr, |c, at| {
        c.ensure_client("c2");
        c.put_desired("c2", "q1", named(), Some(5000.0), at)
    });
    assert_eq!(cvr.next_expiry_ms(), None, "nothing is inactive");

    // c1 drops it at 0: c2 still desires it, so it never expires.
    config(&mut cvr, |c, at| c.del_desired("c1", "q1", at));
    cvr.advance_ttl_clock(10_000);
    assert!(cvr.expired_queries().is_empty());
    assert_eq!(cvr.next_expiry_ms(), None);

    // c2 drops it at 10 s with 5 s: the latest expiry of the two wins (15 s, not 1 s).
    config(&mut cvr, |c, at| c.del_desired("c2", "q1", at));
    assert_eq!(cvr.next_expiry_ms(), Some(15_000));
    cvr.advance_ttl_clock(4_999);
    assert!(cvr.expired_queries().is_empty());
    cvr.advance_ttl_clock(1);
    assert_eq!(cvr.expired_queries(), vec!["q1".to_string()]);

    // ttl 0: expired the moment it is dropped.
    got_query(&mut cvr, "c1", "q0", Some(0.0), &[("z", "Z")]);
    config(&mut cvr, |c, at| c.del_desired("c1", "q0", at));
    assert_eq!(
        cvr.expired_queries(),
        vec!["q0".to_string(), "q1".to_string()]
    );
}

#[test]
fn eviction_timer_delay() {
    assert_eq!(eviction_delay_ms(1000, 0), 1050, "50 ms of hysteresis");
    assert_eq!(eviction_delay_ms(1000, 1000), 50);
    assert_eq!(eviction_delay_ms(1000, 5000), 50, "overdue: at least 50 ms");
    assert_eq!(
        eviction_delay_ms(TTL_MAX_MS * 3, 0),
        TTL_MAX_MS,
        "at most 10 min"
    );
}

#[test]
fn a_row_another_query_reaches_survives_the_expiry() {
    let mut cvr = Cvr::new("g");
    got_query(&mut cvr, "c1", "q1", Some(0.0), &[("a", "A"), ("b", "B")]);
    got_query(&mut cvr, "c1", "q2", None, &[("b", "B")]);
    config(&mut cvr, |c, at| c.del_desired("c1", "q1", at));
    let parts = evict(&mut cvr, 50);
    assert_eq!(got_ops(&parts), vec!["del q1"]);
    assert_eq!(row_ops(&parts), vec!["del \"a\""], "b is still q2's");
    assert_eq!(
        cvr.rows[&crate::zql::RowKey::new("issue", "{\"id\":\"b\"}".to_string())].refs,
        1
    );
}

#[test]
fn clear_drops_the_desires_without_ttl() {
    let mut cvr = Cvr::new("g");
    got_query(&mut cvr, "c1", "q1", Some(600_000.0), &[("a", "A")]);
    got_query(&mut cvr, "c1", "q2", Some(600_000.0), &[("b", "B")]);
    let (base, changed) = config(&mut cvr, |c, at| c.clear_desired("c1", at));
    assert!(changed);
    assert_eq!(
        desired_ops(&poke_json(&cvr, Some(base))),
        vec!["c1 del q1", "c1 del q2"]
    );
    assert!(cvr.desires["c1"]
        .values()
        .all(|d| d.removed && d.inactivated_at.is_none()));
    // No client state left: expired at once, whatever the TTL was.
    assert_eq!(
        cvr.expired_queries(),
        vec!["q1".to_string(), "q2".to_string()]
    );
    assert_eq!(cvr.next_expiry_ms(), None, "nothing waits for a timer");
    assert!(
        !config(&mut cvr, |c, at| c.clear_desired("c1", at)).1,
        "nothing left to clear"
    );
}

#[test]
fn a_put_reactivates_an_inactivated_query_without_rehydration() {
    let mut cvr = Cvr::new("g");
    got_query(&mut cvr, "c1", "q1", Some(5000.0), &[("a", "A")]);
    let got_at = cvr.queries["q1"].got;
    config(&mut cvr, |c, at| c.del_desired("c1", "q1", at));
    cvr.advance_ttl_clock(1000);

    // Even a lower TTL reactivates.
    let (base, changed) = config(&mut cvr, |c, at| {
        c.put_desired("c1", "q1", named(), Some(10.0), at)
    });
    assert!(changed);
    let d = &cvr.desires["c1"]["q1"];
    assert!(d.is_active());
    assert_eq!(d.ttl_ms, 10);
    let parts = poke_json(&cvr, Some(base));
    assert_eq!(desired_ops(&parts), vec!["c1 put q1"]);
    assert!(got_ops(&parts).is_empty(), "still got: nothing to hydrate");
    assert!(row_ops(&parts).is_empty());
    assert_eq!(cvr.queries["q1"].got, got_at);
    cvr.advance_ttl_clock(1_000_000);
    assert!(cvr.expired_queries().is_empty());
    assert_eq!(cvr.next_expiry_ms(), None);

    // After a clear, a put brings it back too.
    config(&mut cvr, |c, at| c.clear_desired("c1", at));
    assert!(
        config(&mut cvr, |c, at| c.put_desired(
            "c1",
            "q1",
            named(),
            None,
            at
        ))
        .1
    );
    assert!(cvr.expired_queries().is_empty());
}

#[test]
fn deleting_a_client_inactivates_its_queries() {
    let mut cvr = Cvr::new("g");
    got_query(&mut cvr, "c1", "shared", Some(1000.0), &[("a", "A")]);
    got_query(&mut cvr, "c2", "shared", Some(1000.0), &[("a", "A")]);
    got_query(&mut cvr, "c2", "own", Some(2000.0), &[("b", "B")]);
    cvr.advance_ttl_clock(100);

    // Unknown client: nothing at all.
    assert!(!config(&mut cvr, |c, at| c.delete_client("nobody", at)).1);

    let (base, changed) = config(&mut cvr, |c, at| c.delete_client("c2", at));
    assert!(changed);
    assert!(!cvr.clients.contains_key("c2"));
    let parts = poke_json(&cvr, Some(base));
    assert_eq!(desired_ops(&parts), vec!["c2 del own", "c2 del shared"]);
    assert!(got_ops(&parts).is_empty(), "the queries expire later");
    let own = &cvr.desires["c2"]["own"];
    assert_eq!((own.inactivated_at, own.ttl_ms), (Some(100), 2000));

    // c1 still desires `shared`; `own` expires by c2's TTL.
    assert_eq!(cvr.next_expiry_ms(), Some(2100));
    cvr.advance_ttl_clock(2000);
    assert_eq!(cvr.expired_queries(), vec!["own".to_string()]);
    // The deleted client's inactive desire still counts once c1 drops `shared` too.
    // c2's state would expire at 1100, c1's at 3100: the latest wins.
    config(&mut cvr, |c, at| c.del_desired("c1", "shared", at));
    cvr.advance_ttl_clock(999);
    assert_eq!(cvr.expired_queries(), vec!["own".to_string()]);
    cvr.advance_ttl_clock(1);
    assert_eq!(
        cvr.expired_queries(),
        vec!["own".to_string(), "shared".to_string()]
    );

    // A client with no desires goes without a version bump.
    cvr.ensure_client("c3");
    assert!(!config(&mut cvr, |c, at| c.delete_client("c3", at)).1);
    assert!(!cvr.clients.contains_key("c3"));
    // A fresh client sees none of the deleted client's desires.
    assert!(desired_ops(&poke_json(&cvr, None)).is_empty());
}

#[test]
fn active_clients_and_deleted_pick_the_clients_to_delete() {
    let mut cvr = Cvr::new("g");
    for c in ["a", "b", "c", "me"] {
        cvr.ensure_client(c);
    }
    let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // Everyone not listed goes; the sender never does.
    assert_eq!(
        cvr.clients_to_delete("me", Some(&list(&["me", "b"])), &[]),
        list(&["a", "c"])
    );
    assert_eq!(
        cvr.clients_to_delete("me", Some(&list(&["b"])), &[]),
        list(&["a", "c"])
    );
    assert!(cvr.clients_to_delete("me", None, &[]).is_empty());
    // `deleted` adds its clients after, once each, known or not.
    assert_eq!(
        cvr.clients_to_delete(
            "me",
            Some(&list(&["me", "a", "b"])),
            &list(&["a", "x", "c"])
        ),
        list(&["c", "a", "x"])
    );
    assert_eq!(
        cvr.clients_to_delete("me", None, &list(&["x", "x"])),
        list(&["x"])
    );
}

#[test]
fn desire_records_roundtrip_through_serde() {
    let d = Desire {
        inactivated_at: Some(1234),
        ttl_ms: 5000,
        removed: false,
        patch: Version {
            state: 36,
            config: 2,
        },
    };
    let json = serde_json::to_value(&d).expect("serializes");
    assert_eq!(json["patch"], "110:02", "versions are stored as cookies");
    assert_eq!(serde_json::from_value::<Desire>(json).expect("parses"), d);
    // Missing fields take their defaults.
    let d: Desire = serde_json::from_str(r#"{"patch":"00:01"}"#).expect("parses");
    assert_eq!(d.ttl_ms, TTL_DEFAULT_MS);
    assert!(d.is_active());
    assert!(serde_json::from_str::<Desire>(r#"{"patch":"?"}"#).is_err());
    let c: ClientRecord = serde_json::from_str("{}").expect("parses");
    assert_eq!(c, ClientRecord::default());
}

/// The row keys a full scan finds patched after `base`, sorted.
fn scanned(cvr: &Cvr, base: Version) -> Vec<String> {
    let mut keys: Vec<String> = cvr
        .rows
        .iter()
        .filter(|(_, rec)| rec.patch > base)
        .map(|(k, _)| k.key().to_string())
        .collect();
    keys.sort();
    keys
}

proptest::proptest! {
    /// The recent patches stand in for a scan of every row: from any cookie handed out,
    /// they give the same rows, whatever was trimmed and however many patches there were.
    #[test]
    fn recent_patches_give_what_a_scan_of_every_row_gives(
        steps in proptest::collection::vec(
            (0usize..3, proptest::collection::vec((0u8..12, 0u8..3), 0..8), 0u8..4),
            1..60,
        )
    ) {
        let mut cvr = Cvr::new("g");
        let mut cookies = vec![cvr.version];
        let mut seen = 0;
        for (i, (query, members, trim)) in steps.into_iter().enumerate() {
            let at = Version { state: i as u64 + 1, config: 0 };
            let hash = format!("q{query}");
            if members.is_empty() {
                cvr.remove_query(&hash, at);
            } else {
                cvr.put_desired("c1", &hash, named(), None, at);
                let items: Vec<(String, String)> = members
                    .iter()
                    .map(|(id, title)| (format!("i{id}"), format!("t{title}")))
                    .collect();
                let items: Vec<(&str, &str)> =
                    items.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
                cvr.set_query_rows(&hash, &rows(&items), at);
            }
            cvr.version = at;
            cookies.push(at);
            // Sometimes every client caught up to an earlier cookie.
            if trim > 0 {
                let oldest = cookies[cookies.len().saturating_sub(trim as usize * 3)];
                cvr.trim_recent(oldest);
            }
            for &base in &cookies {
                let mut got: Vec<String> = cvr
                    .patched_rows(Some(base))
                    .into_iter()
                    .map(|(k, _)| k.key().to_string())
                    .collect();
                got.sort();
                seen += got.len();
                proptest::prop_assert_eq!(got, scanned(&cvr, base), "base {:?}", base);
            }
        }
        proptest::prop_assert!(seen > 0 || cvr.rows.is_empty(), "rows were patched");
    }
}
