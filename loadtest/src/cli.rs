//! Command line: every flag of the harness, with its parsing helpers.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, ValueEnum};
use serde_json::Value;

const ABOUT: &str = "Load harness for Zero sync servers (zcache, zero-cache 1.9): N simulated \
clients speaking sync protocol v51 over WebSockets, an upstream write generator, hdrhistogram \
latencies for connect, hydration and commit-to-poke.";

const LONG_ABOUT: &str = "Load harness for Zero sync servers (zcache, zero-cache 1.9).

N simulated clients in M client groups connect at --connect-rate, each desiring its named \
queries; a writer updates rows the clients have in their views (keys taken from the pokes they \
receive) at --write-rate rows/s, setting --write-column to a unique token lt-<seq>; clients find \
the token in the rowsPatch of the poke that carries it.

Timeline: clients start connecting at t=0 and the writer starts as soon as keys are known; \
--warmup later the measured period of --duration starts; then the writer stops, clients get \
--drain (1 s) to receive the last pokes, and everything closes.

Which samples count: connect and hydration are recorded for every client whenever it connects \
(they are one-off per client, so the whole run counts); commit->poke counts only rows committed \
inside the measured period; pokes/s, bytes/s and rows/s are over the measured period.

Commit->poke is measured from the moment the writer sends COMMIT (the client cannot see the row \
earlier) to the pokeEnd of the poke whose rowsPatch carries the token, once per receiving client. \
'commit' is the writer's own COMMIT round trip, to be subtracted if the acknowledgement is the \
reference wanted.";

#[derive(Parser, Debug, Clone)]
#[command(name = "loadtest", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Args {
    /// Sync server base URL (http, https, ws or wss); clients connect to <server>/sync/v51/connect.
    #[arg(long, default_value = "http://127.0.0.1:4848")]
    pub server: String,

    /// Number of simulated clients (one WebSocket each).
    #[arg(long, default_value_t = 50)]
    pub clients: usize,

    /// Number of client groups; client i belongs to group i mod M, so several clients of one
    /// group share its queries (and its CVR on the server). 0 means one group per client.
    #[arg(long, default_value_t = 0)]
    pub groups: usize,

    /// A named query as NAME=ARGS_JSON (ARGS_JSON is the single argument object, sent as
    /// args:[ARGS_JSON]; NAME alone sends args:[]). Repeatable. In the JSON's strings,
    /// `{group}` stands for the group's index g (0..M-1), `{group1}` for g+1, `{group%N}` for
    /// g mod N and `{group%N+1}` for (g mod N)+1, so each group can desire a query of its own
    /// (issueById={"id":"i{group1}"}) or one of N shared ones
    /// (issuesByOwner={"owner":"u{group%100+1}","limit":20}: 100 owners).
    /// Default: issuesByStatus={"status":"open","limit":100}.
    #[arg(long = "query", value_name = "NAME=JSON", value_parser = parse_query)]
    pub queries: Vec<NamedQuery>,

    /// How a group's queries are chosen from the --query list: 'all' = every group desires every
    /// query; 'round-robin' = group g desires only query g mod (number of queries).
    #[arg(long, value_enum, default_value_t = QueryMix::All)]
    pub query_mix: QueryMix,

    /// TTL (ms) sent with each desired query.
    #[arg(long, default_value_t = 300_000)]
    pub ttl_ms: u64,

    /// Clients started per second (0 = all at once).
    #[arg(long, default_value_t = 100.0)]
    pub connect_rate: f64,

    /// Upstream PostgreSQL URL: the client schema is derived from its tables in `public`
    /// (zero-cache requires one), and the write generator writes there. Without it no client
    /// schema is sent and no writes happen.
    #[arg(long, value_name = "URL")]
    pub upstream_db: Option<String>,

    /// Rows updated per second by the write generator (0 = no writes).
    #[arg(long, default_value_t = 0.0)]
    pub write_rate: f64,

    /// Rows per upstream transaction (the writer commits write-rate/tx-size transactions per second).
    #[arg(long, default_value_t = 1)]
    pub tx_size: usize,

    /// Table the writer updates (in `public`); its rows must appear in the clients' pokes.
    #[arg(long, default_value = "issue")]
    pub write_table: String,

    /// Primary-key column of --write-table used to pick rows (a single-column key).
    #[arg(long, default_value = "id")]
    pub write_key: String,

    /// Text column the writer sets to a unique token lt-<seq>.
    #[arg(long, default_value = "title")]
    pub write_column: String,

    /// Warm-up before the measured period (e.g. 5s, 500ms, 1m; a bare number is seconds).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub warmup: Duration,

    /// Length of the measured period.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub duration: Duration,

    /// After the measured period the writer stops and clients get this long for the pokes of
    /// the rows committed in it; a drain longer than 2 s ends early once no commit->poke sample
    /// has come for 2 s. Raise it when the server lags by seconds, or the last rows' samples
    /// (the slowest) are cut off.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub drain: Duration,

    /// Server process whose RSS is sampled every second from /proc (the process and all its
    /// descendants are summed, which covers zero-cache's worker processes).
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,

    /// Print one JSON object with every figure on stdout instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Also write the JSON object to this file (the table still goes to stdout unless --json).
    #[arg(long, value_name = "FILE")]
    pub json_out: Option<std::path::PathBuf>,

    /// Auth token sent in the Sec-WebSocket-Protocol payload (zero-cache forwards it to the app
    /// server as a bearer token).
    #[arg(long, value_name = "TOKEN")]
    pub auth: Option<String>,

    /// userID connect parameter (omitted when not given, like a logged-out client).
    #[arg(long)]
    pub user_id: Option<String>,

    /// Do not reconnect after a close or error frame (by default a client reconnects after 1 s
    /// with the last cookie it received).
    #[arg(long)]
    pub no_reconnect: bool,

    /// Runtime threads of the harness (1 = a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,

    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueryMix {
    All,
    RoundRobin,
}

/// A named query as sent in desiredQueriesPatch, with the opaque hash this harness assigns it.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedQuery {
    pub name: String,
    pub args: Vec<Value>,
    pub hash: String,
}

impl NamedQuery {
    pub fn new(name: &str, args: Vec<Value>) -> NamedQuery {
        let hash = query_hash(name, &args);
        NamedQuery {
            name: name.to_string(),
            args,
            hash,
        }
    }

    pub fn default_query() -> NamedQuery {
        NamedQuery::new(
            "issuesByStatus",
            vec![serde_json::json!({"status": "open", "limit": 100})],
        )
    }

    /// The query as group `group` sends it: the `{group...}` placeholders in its argument
    /// strings replaced (see [`expand_group`]; the hash follows the arguments, so each group's
    /// query is its own).
    pub fn for_group(&self, group: usize) -> NamedQuery {
        fn substitute(v: &Value, group: usize) -> Value {
            match v {
                // parse_query has checked every placeholder: an error cannot happen here.
                Value::String(s) if s.contains("{group") => {
                    Value::String(expand_group(s, group).unwrap_or_else(|_| s.clone()))
                }
                Value::Array(items) => {
                    Value::Array(items.iter().map(|i| substitute(i, group)).collect())
                }
                Value::Object(map) => Value::Object(
                    map.iter()
                        .map(|(k, v)| (k.clone(), substitute(v, group)))
                        .collect(),
                ),
                other => other.clone(),
            }
        }
        let args: Vec<Value> = self.args.iter().map(|a| substitute(a, group)).collect();
        if args == self.args {
            return self.clone();
        }
        NamedQuery::new(&self.name, args)
    }

    /// `NAME(ARGS)` for display.
    pub fn label(&self) -> String {
        let args: Vec<String> = self.args.iter().map(Value::to_string).collect();
        format!("{}({})", self.name, args.join(","))
    }
}

/// The server treats the hash as an opaque query ID; it only has to be the same for the same
/// (name, args) and differ otherwise. FNV-1a over the name and the serialized args.
fn query_hash(name: &str, args: &[Value]) -> String {
    let text = format!("{name}\u{0}{}", Value::Array(args.to_vec()));
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("lt{h:016x}")
}

/// Replaces the group placeholders of one argument string for group index `group` (0..M-1):
/// `{group}` = the index, `{group1}` = index + 1, `{group%N}` = index mod N and `{group%N+1}` =
/// (index mod N) + 1 (so `u{group%100+1}` spreads the groups over owners u1..u100, 100 groups
/// per owner with 10,000 groups). Any other `{group...}` form is an error.
pub fn expand_group(s: &str, group: usize) -> anyhow::Result<String> {
    const OPEN: &str = "{group";
    let mut out = String::with_capacity(s.len() + 8);
    let mut rest = s;
    while let Some(at) = rest.find(OPEN) {
        out.push_str(&rest[..at]);
        let after = &rest[at + OPEN.len()..];
        let Some(close) = after.find('}') else {
            bail!("unclosed placeholder in '{s}'");
        };
        let spec = &after[..close];
        let value = if spec.is_empty() {
            group
        } else if spec == "1" {
            group + 1
        } else if let Some(m) = spec.strip_prefix('%') {
            let (n, plus_one) = match m.strip_suffix("+1") {
                Some(n) => (n, true),
                None => (m, false),
            };
            let n: usize = n.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                anyhow!("bad placeholder {{group{spec}}} in '{s}': N must be a positive integer")
            })?;
            group % n + usize::from(plus_one)
        } else {
            bail!("unknown placeholder {{group{spec}}} in '{s}' (known: {{group}}, {{group1}}, {{group%N}}, {{group%N+1}})");
        };
        out.push_str(&value.to_string());
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Checks every placeholder of every string in `v`.
fn check_placeholders(v: &Value) -> anyhow::Result<()> {
    match v {
        Value::String(s) if s.contains("{group") => expand_group(s, 0).map(|_| ()),
        Value::Array(items) => items.iter().try_for_each(check_placeholders),
        Value::Object(map) => map.values().try_for_each(check_placeholders),
        _ => Ok(()),
    }
}

pub fn parse_query(s: &str) -> anyhow::Result<NamedQuery> {
    let (name, args) = match s.split_once('=') {
        Some((name, json)) => {
            let v: Value = serde_json::from_str(json)
                .with_context(|| format!("query args of '{name}' are not JSON: {json}"))?;
            check_placeholders(&v)?;
            (name.trim(), vec![v])
        }
        None => (s.trim(), Vec::new()),
    };
    if name.is_empty() {
        bail!("query needs a name: NAME=ARGS_JSON");
    }
    Ok(NamedQuery::new(name, args))
}

pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let (num, unit_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000.0)
    } else {
        (s, 1000.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow!("bad duration '{s}' (e.g. 5s, 500ms, 1m)"))?;
    if !v.is_finite() || v < 0.0 {
        bail!("bad duration '{s}'");
    }
    Ok(Duration::from_secs_f64(v * unit_ms / 1000.0))
}

impl Args {
    pub fn effective_groups(&self) -> usize {
        if self.groups == 0 {
            self.clients
        } else {
            self.groups.min(self.clients)
        }
    }

    pub fn effective_queries(&self) -> Vec<NamedQuery> {
        if self.queries.is_empty() {
            vec![NamedQuery::default_query()]
        } else {
            self.queries.clone()
        }
    }

    /// The queries desired by every client of group `group`.
    pub fn group_queries(&self, group: usize) -> Vec<NamedQuery> {
        let all = self.effective_queries();
        let chosen = match self.query_mix {
            QueryMix::All => all,
            QueryMix::RoundRobin => vec![all[group % all.len()].clone()],
        };
        chosen.iter().map(|q| q.for_group(group)).collect()
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.clients == 0 {
            bail!("--clients must be at least 1");
        }
        if self.write_rate < 0.0 || !self.write_rate.is_finite() {
            bail!("--write-rate must be >= 0");
        }
        if self.write_rate > 0.0 && self.upstream_db.is_none() {
            bail!("--write-rate needs --upstream-db");
        }
        if self.tx_size == 0 {
            bail!("--tx-size must be at least 1");
        }
        if self.connect_rate < 0.0 || !self.connect_rate.is_finite() {
            bail!("--connect-rate must be >= 0");
        }
        if self.duration.is_zero() {
            bail!("--duration must be > 0");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_placeholders_make_one_query_per_group() {
        let q = parse_query(r#"issueById={"id":"i{group1}","tag":["g{group}"],"n":3}"#).unwrap();
        let g0 = q.for_group(0);
        let g41 = q.for_group(41);
        assert_eq!(
            g0.args,
            vec![serde_json::json!({"id":"i1","tag":["g0"],"n":3})]
        );
        assert_eq!(
            g41.args,
            vec![serde_json::json!({"id":"i42","tag":["g41"],"n":3})]
        );
        assert_ne!(g0.hash, g41.hash, "each group's query has its own hash");
        assert_eq!(g41, NamedQuery::new("issueById", g41.args.clone()));
        let plain = parse_query(r#"issuesByStatus={"status":"open"}"#).unwrap();
        assert_eq!(
            plain.for_group(7),
            plain,
            "no placeholder: the same query for all"
        );
    }

    #[test]
    fn modulo_placeholders_spread_groups_over_n_values() {
        assert_eq!(expand_group("u{group%100+1}", 0).unwrap(), "u1");
        assert_eq!(expand_group("u{group%100+1}", 99).unwrap(), "u100");
        assert_eq!(expand_group("u{group%100+1}", 100).unwrap(), "u1");
        assert_eq!(expand_group("u{group%100+1}", 9_999).unwrap(), "u100");
        assert_eq!(expand_group("{group%7}", 15).unwrap(), "1");
        assert_eq!(expand_group("{group%1}", 15).unwrap(), "0");
        assert_eq!(
            expand_group("a{group}-{group1}-{group%3}-{group%3+1}z", 4).unwrap(),
            "a4-5-1-2z"
        );
        assert_eq!(expand_group("plain {grou}", 4).unwrap(), "plain {grou}");
        for bad in [
            "{group%0}",
            "{group%x}",
            "{group%}",
            "{group2}",
            "{group",
            "{group%5+2}",
        ] {
            assert!(expand_group(bad, 1).is_err(), "{bad}");
            let spec = format!(r#"q={{"a":"{}"}}"#, bad.replace('"', ""));
            assert!(parse_query(&spec).is_err(), "{spec}");
        }

        // 10,000 groups over 100 owners: 100 groups on each owner's query, one hash per owner.
        let q = parse_query(r#"issuesByOwner={"owner":"u{group%100+1}","limit":20}"#).unwrap();
        let mut per_owner: std::collections::HashMap<String, (String, usize)> = Default::default();
        for g in 0..10_000 {
            let gq = q.for_group(g);
            let owner = gq.args[0]["owner"].as_str().unwrap().to_string();
            assert_eq!(gq.args[0]["limit"], 20);
            let e = per_owner.entry(owner).or_insert((gq.hash.clone(), 0));
            assert_eq!(e.0, gq.hash, "groups of one owner send the same query");
            e.1 += 1;
        }
        assert_eq!(per_owner.len(), 100);
        assert!(per_owner.values().all(|(_, n)| *n == 100));
        assert_eq!(per_owner["u1"].0, q.for_group(100).hash);
        assert_ne!(per_owner["u1"].0, per_owner["u2"].0);
    }

    #[test]
    fn query_spec_parses_name_and_args() {
        let q = parse_query(r#"issuesByStatus={"status":"open","limit":100}"#).unwrap();
        assert_eq!(q.name, "issuesByStatus");
        assert_eq!(
            q.args,
            vec![serde_json::json!({"status":"open","limit":100})]
        );
        let bare = parse_query("allIssues").unwrap();
        assert!(bare.args.is_empty());
        assert!(parse_query("=1").is_err());
        assert!(parse_query("x={nope").is_err());
    }

    #[test]
    fn hash_is_stable_and_distinguishes_args() {
        let a = parse_query(r#"q={"a":1}"#).unwrap();
        let b = parse_query(r#"q={"a":1}"#).unwrap();
        let c = parse_query(r#"q={"a":2}"#).unwrap();
        let d = parse_query(r#"r={"a":1}"#).unwrap();
        assert_eq!(a.hash, b.hash);
        assert_ne!(a.hash, c.hash);
        assert_ne!(a.hash, d.hash);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn round_robin_gives_each_group_one_query() {
        let args = Args::parse_from([
            "loadtest",
            "--clients",
            "4",
            "--groups",
            "2",
            "--query",
            "a",
            "--query",
            "b",
            "--query-mix",
            "round-robin",
        ]);
        assert_eq!(args.group_queries(0)[0].name, "a");
        assert_eq!(args.group_queries(1)[0].name, "b");
        assert_eq!(args.effective_groups(), 2);
        let all = Args::parse_from(["loadtest", "--query", "a", "--query", "b"]);
        assert_eq!(all.group_queries(1).len(), 2);
        assert_eq!(all.effective_groups(), 50);
    }
}
