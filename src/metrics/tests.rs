use super::export::{render, BUCKET_BOUNDS_US};
use super::registry::{attach, publish_local, record_local, Collected, Registry, Timings};
use super::*;
use std::collections::BTreeMap;

/// One sample line of the text format: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `a="x",b="y"` (values without escapes, as zcache writes them).
fn parse_labels(s: &str) -> BTreeMap<String, String> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').expect("label has =");
            assert!(is_metric_name(k), "label name {k:?}");
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .expect("quoted label value");
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// Parses the whole exposition, asserting every line is `# HELP`, `# TYPE` or a sample,
/// and every sample's family was typed before it. Returns the samples and the types.
fn parse(text: &str) -> (Vec<Sample>, BTreeMap<String, String>) {
    let mut samples = Vec::new();
    let mut types = BTreeMap::new();
    assert!(text.ends_with('\n'), "the exposition ends with a line feed");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP has text");
            assert!(is_metric_name(name) && !help.is_empty(), "{line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a kind");
            assert!(is_metric_name(name), "{line}");
            assert!(["gauge", "histogram", "counter"].contains(&kind), "{line}");
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "{line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value of {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').expect("}"))),
            None => (series, BTreeMap::new()),
        };
        assert!(is_metric_name(name), "{line}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "{name} has no TYPE before it");
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    (samples, types)
}

fn value_of(samples: &[Sample], name: &str, label: Option<(&str, &str)>) -> f64 {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && label.is_none_or(|(k, v)| s.labels.get(k).map(String::as_str) == Some(v))
        })
        .unwrap_or_else(|| panic!("no sample {name} {label:?}"))
        .value
}

fn us(n: u64) -> Duration {
    Duration::from_micros(n)
}

fn sample_collected() -> Collected {
    let mut timings = Timings::default();
    for d in [us(50), us(300), us(2_000), us(40_000_000)] {
        timings.record(Timing::Hydration, d);
    }
    timings.record(Timing::PokeLatency, us(1_500));
    let gauges = ShardGauges {
        connections: 3,
        client_groups: 2,
        queries: 5,
        rows: 700,
        queued_bytes: 1234,
    };
    Collected {
        timings,
        gauges: vec![("0".into(), gauges), ("1".into(), ShardGauges::default())],
        uptime: Duration::from_millis(2500),
    }
}

#[test]
fn exposition_parses_and_every_family_is_typed() {
    let (samples, types) = parse(&render(&sample_collected()));
    for t in Timing::ALL {
        assert_eq!(types.get(t.name()).map(String::as_str), Some("histogram"));
    }
    for g in [
        "zero_sync_websocket_open_connections",
        "zero_sync_active_client_groups",
        "zero_sync_queries",
        "zero_sync_rows",
        "zcache_sync_queued_bytes",
        "zero_server_uptime_seconds",
    ] {
        assert_eq!(types.get(g).map(String::as_str), Some("gauge"), "{g}");
    }
    assert_eq!(
        value_of(&samples, "zero_sync_rows", Some(("shard", "0"))),
        700.0
    );
    assert_eq!(
        value_of(&samples, "zcache_sync_queued_bytes", Some(("shard", "0"))),
        1234.0
    );
    assert_eq!(
        value_of(
            &samples,
            "zero_sync_websocket_open_connections",
            Some(("shard", "1"))
        ),
        0.0
    );
    assert_eq!(value_of(&samples, "zero_server_uptime_seconds", None), 2.5);
}

#[test]
fn buckets_are_cumulative_and_end_in_inf_equal_to_count() {
    let (samples, _) = parse(&render(&sample_collected()));
    for t in Timing::ALL {
        let buckets: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.name == format!("{}_bucket", t.name()))
            .collect();
        assert_eq!(buckets.len(), BUCKET_BOUNDS_US.len() + 1, "{}", t.name());
        let mut previous_le = f64::NEG_INFINITY;
        let mut previous = 0.0;
        for b in &buckets {
            let le: f64 = match b.labels["le"].as_str() {
                "+Inf" => f64::INFINITY,
                v => v.parse().expect("le"),
            };
            assert!(le > previous_le, "bounds rise");
            assert!(b.value >= previous, "counts never fall");
            (previous_le, previous) = (le, b.value);
        }
        assert_eq!(
            buckets.last().map(|b| b.labels["le"].as_str()),
            Some("+Inf")
        );
        let count = value_of(&samples, &format!("{}_count", t.name()), None);
        assert_eq!(previous, count, "+Inf = count for {}", t.name());
    }
}

#[test]
fn durations_land_in_their_buckets() {
    let (samples, _) = parse(&render(&sample_collected()));
    let bucket = |le: &str| {
        samples
            .iter()
            .find(|s| s.name == "zero_sync_hydration_time_seconds_bucket" && s.labels["le"] == le)
            .map(|s| s.value)
            .expect("bucket")
    };
    // 50 us, 300 us, 2 ms, and 40 s (past the last bound).
    assert_eq!(bucket("0.0001"), 1.0);
    assert_eq!(bucket("0.00025"), 1.0);
    assert_eq!(bucket("0.0005"), 2.0);
    assert_eq!(bucket("0.001"), 2.0);
    assert_eq!(bucket("0.005"), 3.0);
    assert_eq!(bucket("30"), 3.0);
    assert_eq!(bucket("+Inf"), 4.0);
    let sum = value_of(&samples, "zero_sync_hydration_time_seconds_sum", None);
    assert!((sum - 40.00235).abs() < 1e-9, "{sum}");
    assert_eq!(
        value_of(&samples, "zero_sync_view_syncer_lag_seconds_count", None),
        1.0
    );
    assert_eq!(
        value_of(&samples, "zero_sync_cvr_flush_time_seconds_count", None),
        0.0
    );
}

#[test]
fn durations_past_an_hour_count_as_an_hour() {
    let mut timings = Timings::default();
    timings.record(Timing::Advance, Duration::from_secs(100_000));
    let h = timings.get(Timing::Advance);
    assert_eq!(h.count(), 1);
    assert_eq!(h.sum_us(), registry::TIMING_US_MAX);
}

#[test]
fn registry_merges_every_slot() {
    let registry = Registry::default();
    let repl = registry.register("repl");
    let s10 = registry.register("10");
    let s2 = registry.register("2");
    let mut a = Timings::default();
    a.record(Timing::ReplicationLag, us(700));
    a.record(Timing::Hydration, us(100));
    let mut b = Timings::default();
    b.record(Timing::Hydration, us(900));
    b.record(Timing::Hydration, us(3_000));
    repl.publish(&a, None);
    s10.publish(
        &b,
        Some(ShardGauges {
            connections: 4,
            ..ShardGauges::default()
        }),
    );
    s2.publish(
        &Timings::default(),
        Some(ShardGauges {
            rows: 9,
            ..ShardGauges::default()
        }),
    );
    let c = registry.collect();
    let h = c.timings.get(Timing::Hydration);
    assert_eq!((h.count(), h.sum_us()), (3, 4_000));
    assert_eq!(c.timings.get(Timing::ReplicationLag).count(), 1);
    let labels: Vec<&str> = c.gauges.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(labels, ["2", "10"], "numeric order; repl has no gauges");
    assert_eq!(c.gauges[1].1.connections, 4);

    // A newer publication replaces the slot's figures (they are cumulative already), and
    // publishing without gauges keeps the last ones.
    b.record(Timing::Hydration, us(5));
    s10.publish(&b, None);
    let c = registry.collect();
    assert_eq!(c.timings.get(Timing::Hydration).count(), 4);
    assert_eq!(c.gauges[1].1.connections, 4);
}

#[test]
fn each_thread_records_into_its_own_histograms() {
    let registry: &'static Registry = Box::leak(Box::new(Registry::default()));
    let threads: Vec<_> = (0..3)
        .map(|i| {
            std::thread::spawn(move || {
                attach(registry, &i.to_string());
                for _ in 0..=i {
                    record_local(Timing::CvrFlush, us(1_000));
                }
                publish_local(Some(ShardGauges {
                    client_groups: i,
                    ..ShardGauges::default()
                }));
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    // A thread that never attached publishes nothing.
    std::thread::spawn(|| {
        record_local(Timing::CvrFlush, us(1));
        publish_local(None);
    })
    .join()
    .expect("thread");
    let c = registry.collect();
    assert_eq!(c.timings.get(Timing::CvrFlush).count(), 1 + 2 + 3);
    let groups: Vec<u64> = c.gauges.iter().map(|(_, g)| g.client_groups).collect();
    assert_eq!(groups, [0, 1, 2]);
}

#[test]
fn replication_lag_from_a_postgres_timestamp() {
    let commit_unix_us: u64 = 1_700_000_000_000_000;
    let pg_us = (commit_unix_us - PG_EPOCH_UNIX_SECONDS * 1_000_000) as i64;
    let now = SystemTime::UNIX_EPOCH + Duration::from_micros(commit_unix_us + 2_500);
    assert_eq!(lag_since_pg_time(pg_us, now), us(2_500));
    let before = SystemTime::UNIX_EPOCH + Duration::from_micros(commit_unix_us - 10);
    assert_eq!(
        lag_since_pg_time(pg_us, before),
        Duration::ZERO,
        "skew counts as 0"
    );
    assert_eq!(lag_since_pg_time(-5, now), Duration::ZERO);
}

fn request(raw: &str) -> crate::ws::handshake::UpgradeRequest {
    crate::ws::handshake::parse_request(raw.as_bytes(), 4096)
        .expect("valid head")
        .expect("whole head")
        .0
}

fn split(resp: &[u8]) -> (String, String) {
    let text = String::from_utf8(resp.to_vec()).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("head ends");
    (head.to_string(), body.to_string())
}

#[test]
fn health_checks_answer_as_zero_cache_does() {
    for path in ["/", "/keepalive", "/?x=1"] {
        let (head, body) = split(&http::answer(&request(&format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"
        ))));
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{path}: {head}");
        assert!(
            head.contains("Content-Type: text/plain; charset=utf-8"),
            "{head}"
        );
        assert_eq!(body, "OK");
    }
    let (head, body) = split(&http::answer(&request("HEAD /keepalive HTTP/1.1\r\n\r\n")));
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && head.contains("Content-Length: 2"));
    assert_eq!(body, "", "HEAD has no body");
}

#[test]
fn other_paths_get_fastifys_404() {
    for (raw, route) in [
        ("GET /api/keepalive HTTP/1.1\r\n\r\n", "GET:/api/keepalive"),
        ("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "POST:/"),
        ("GET /nope?a=b HTTP/1.1\r\n\r\n", "GET:/nope?a=b"),
    ] {
        let (head, body) = split(&http::answer(&request(raw)));
        assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{head}");
        assert!(head.contains("Content-Type: application/json; charset=utf-8"));
        let json: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "message": format!("Route {route} not found"),
                "error": "Not Found",
                "statusCode": 404
            })
        );
    }
}

#[test]
fn metrics_endpoint_serves_the_text_format() {
    let (head, body) = split(&http::answer(&request("GET /metrics HTTP/1.1\r\n\r\n")));
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
    assert!(head.contains(&format!("Content-Type: {}", export::CONTENT_TYPE)));
    let (_, types) = parse(&body);
    assert!(types.contains_key("zero_sync_hydration_time_seconds"));
}
