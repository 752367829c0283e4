//! The upstream write generator: updates rows the clients have in their views (keys collected
//! from their pokes), setting a text column to a unique token whose commit time is kept so the
//! clients can measure commit -> poke.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::watch;

use crate::protocol::token;
use crate::schema::{ClientSchema, ValueType};
use crate::stats::Stats;

/// Keys the writer picks from; more would not make the workload more realistic.
pub const KEY_POOL_MAX: usize = 10_000;
/// Tokens remembered for matching; the oldest are forgotten first (a few minutes at 1k rows/s).
pub const TOKEN_BOOK_MAX: usize = 256 * 1024;

/// A tiny xorshift generator: the harness needs spread, not cryptographic randomness.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: usize) -> usize {
        debug_assert!(n > 0);
        (self.next_u64() % n as u64) as usize
    }
}

/// Keys of write-table rows seen in pokes, bounded by [`KEY_POOL_MAX`].
///
/// Keys are picked in shuffled rounds: every key once (in random order) before any key again,
/// so two updates of one row are as far apart as the pool allows (pool size / rows per s; e.g.
/// 2,000 keys at 200 rows/s: 10 s). A server that coalesces versions for a lagging client then
/// rarely folds two tokens of a row into one poke, which would cost the earlier token its
/// samples (reported as `rows_superseded`).
pub struct KeyPool {
    inner: Mutex<PoolInner>,
    len: AtomicUsize,
    cap: usize,
}

#[derive(Default)]
struct PoolInner {
    list: Vec<String>,
    set: HashSet<String>,
    /// The current round: indices into `list` still to be picked, taken from the end.
    round: Vec<usize>,
}

impl KeyPool {
    pub fn new(cap: usize) -> KeyPool {
        KeyPool {
            inner: Mutex::new(PoolInner::default()),
            len: AtomicUsize::new(0),
            cap,
        }
    }

    /// Cheap check so clients only collect keys while the pool has room.
    pub fn wants_more(&self) -> bool {
        self.len.load(Ordering::Relaxed) < self.cap
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn add(&self, keys: impl IntoIterator<Item = String>) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let PoolInner { list, set, .. } = &mut *g;
        for k in keys {
            if list.len() >= self.cap {
                break;
            }
            if set.insert(k.clone()) {
                list.push(k);
            }
        }
        self.len.store(list.len(), Ordering::Relaxed);
        debug_assert!(list.len() <= self.cap);
    }

    /// Up to `n` distinct keys, the next ones of the current shuffled round (a new round, over
    /// every key known by then, starts when one ends).
    pub fn pick(&self, n: usize, rng: &mut Rng) -> Vec<String> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let PoolInner { list, round, .. } = &mut *g;
        if list.is_empty() {
            return Vec::new();
        }
        let want = n.min(list.len());
        let mut chosen: Vec<usize> = Vec::with_capacity(want);
        while chosen.len() < want {
            if round.is_empty() {
                round.extend(0..list.len());
                // Fisher-Yates.
                for i in (1..round.len()).rev() {
                    round.swap(i, rng.below(i + 1));
                }
            }
            if let Some(i) = round.pop() {
                // A round boundary inside one transaction: a key may not come twice in it.
                if !chosen.contains(&i) {
                    chosen.push(i);
                }
            }
        }
        chosen.into_iter().map(|i| list[i].clone()).collect()
    }
}

struct Entry {
    committed_at: Instant,
    receivers: u32,
    /// The row the token was written to (shared by every token of that row).
    key: Arc<str>,
}

/// Token sequence number -> the moment its COMMIT was sent, the row it went to and how many
/// clients received it, bounded by [`TOKEN_BOOK_MAX`].
pub struct TokenBook {
    inner: Mutex<(HashMap<u64, Entry>, VecDeque<u64>)>,
    cap: usize,
}

/// What became of the rows committed in the measured period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Delivery {
    /// Rows (tokens) committed in the period.
    pub committed: u64,
    /// Of those, received by no client.
    pub unseen: u64,
    /// Of the unseen, rows whose later token (a later update of the same row) some client
    /// received: the server folded both versions into one poke, so the earlier value was never
    /// on the wire. The rest (unseen - superseded) are lost updates.
    pub superseded: u64,
    /// Receiving clients per row (one commit->poke sample each): fewest, most, and the sum
    /// (= the commit->poke sample count).
    pub receivers_min: u64,
    pub receivers_max: u64,
    pub receivers_sum: u64,
}

/// What a client learns when it finds a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Matched {
    pub committed_at: Instant,
}

impl TokenBook {
    pub fn new(cap: usize) -> TokenBook {
        TokenBook {
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
            cap,
        }
    }

    pub fn insert(&self, seq: u64, committed_at: Instant, key: Arc<str>) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (map, order) = &mut *g;
        while order.len() >= self.cap {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
        map.insert(
            seq,
            Entry {
                committed_at,
                receivers: 0,
                key,
            },
        );
        order.push_back(seq);
        debug_assert!(map.len() <= self.cap);
    }

    /// Looks a token up and counts the receiving client; `None` for tokens of other runs or
    /// forgotten ones.
    pub fn matched(&self, seq: u64) -> Option<Matched> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let e = g.0.get_mut(&seq)?;
        e.receivers += 1;
        Some(Matched {
            committed_at: e.committed_at,
        })
    }

    /// What became of the tokens committed inside `[from, to)`.
    pub fn delivery_between(&self, from: Instant, to: Instant) -> Delivery {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // The newest received token of each row, over the whole book.
        let mut newest_seen: HashMap<&str, u64> = HashMap::new();
        for (&seq, e) in &g.0 {
            if e.receivers > 0 {
                let s = newest_seen.entry(&e.key).or_insert(seq);
                *s = (*s).max(seq);
            }
        }
        let mut d = Delivery {
            receivers_min: u64::MAX,
            ..Delivery::default()
        };
        for (&seq, e) in &g.0 {
            if e.committed_at < from || e.committed_at >= to {
                continue;
            }
            let n = u64::from(e.receivers);
            d.committed += 1;
            d.receivers_min = d.receivers_min.min(n);
            d.receivers_max = d.receivers_max.max(n);
            d.receivers_sum += n;
            if n == 0 {
                d.unseen += 1;
                if newest_seen.get(&*e.key).is_some_and(|&s| s > seq) {
                    d.superseded += 1;
                }
            }
        }
        if d.committed == 0 {
            d.receivers_min = 0;
        }
        d
    }
}

pub struct WriterConfig {
    pub url: String,
    pub table: String,
    pub key: String,
    pub column: String,
    pub rows_per_s: f64,
    pub tx_size: usize,
    /// First token sequence number; unique per run so that tokens left by earlier runs never match.
    pub first_seq: u64,
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `UPDATE t SET col = $1 WHERE key = $2::text::<key type>`; checks that the table, key and
/// column exist and that the column holds strings.
pub fn update_sql(cfg: &WriterConfig, schema: &ClientSchema) -> anyhow::Result<String> {
    let Some(t) = schema.tables.get(&cfg.table) else {
        bail!("--write-table {} is not a table in public", cfg.table);
    };
    match t.columns.get(&cfg.column) {
        Some(ValueType::String) => {}
        Some(other) => bail!(
            "--write-column {} is a {} column; the token needs a text column",
            cfg.column,
            other.as_str()
        ),
        None => bail!(
            "--write-column {} is not a column of {}",
            cfg.column,
            cfg.table
        ),
    }
    let Some(key_type) = t.pg_types.get(&cfg.key) else {
        bail!("--write-key {} is not a column of {}", cfg.key, cfg.table);
    };
    Ok(format!(
        "UPDATE {} SET {} = $1 WHERE {} = $2::text::{}",
        quote_ident(&cfg.table),
        quote_ident(&cfg.column),
        quote_ident(&cfg.key),
        key_type
    ))
}

pub struct WriterShared {
    pub stats: Arc<Stats>,
    pub keys: Arc<KeyPool>,
    pub book: Arc<TokenBook>,
}

/// Writes until `stop` turns true. Connection or SQL errors are counted; the writer reconnects.
pub async fn run_writer(
    cfg: WriterConfig,
    sql: String,
    shared: Arc<WriterShared>,
    mut stop: watch::Receiver<bool>,
) {
    let tx_per_s = cfg.rows_per_s / cfg.tx_size as f64;
    let period = Duration::from_secs_f64(1.0 / tx_per_s.max(1e-3));
    let mut rng = Rng::new(cfg.first_seq ^ 0x9e37_79b9_7f4a_7c15);
    let mut seq = cfg.first_seq;
    while !*stop.borrow() {
        let mut client = match connect(&cfg.url).await {
            Ok(c) => c,
            Err(e) => {
                shared.stats.error("writer_connect");
                eprintln!("writer: {e:#}");
                if sleep_or_stop(&mut stop, Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
        };
        let stmt = match client.prepare(&sql).await {
            Ok(s) => s,
            Err(e) => {
                shared.stats.error("writer_prepare");
                eprintln!("writer: {e:#}");
                if sleep_or_stop(&mut stop, Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
        };
        // Burst: a late transaction is followed by the missed ones, so the rate holds on average.
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            let keys = shared.keys.pick(cfg.tx_size, &mut rng);
            if keys.is_empty() {
                continue; // no client has hydrated yet
            }
            match write_tx(&mut client, &stmt, &keys, &mut seq, &shared).await {
                Ok(()) => {}
                Err(e) => {
                    shared.stats.error("writer_tx");
                    if client.is_closed() {
                        eprintln!("writer: connection lost: {e:#}");
                        break;
                    }
                }
            }
        }
    }
}

async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

async fn write_tx(
    client: &mut tokio_postgres::Client,
    stmt: &tokio_postgres::Statement,
    keys: &[String],
    seq: &mut u64,
    shared: &WriterShared,
) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    let seqs: Vec<u64> = (0..keys.len() as u64).map(|i| *seq + i).collect();
    *seq += keys.len() as u64;
    let tokens: Vec<String> = seqs.iter().map(|&s| token(s)).collect();
    // The updates are pipelined on the connection: one round trip for the whole batch.
    type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);
    let params: Vec<[Param<'_>; 2]> = keys
        .iter()
        .zip(&tokens)
        .map(|(k, t)| [t as Param<'_>, k])
        .collect();
    let updates = params.iter().map(|p| tx.execute(stmt, p));
    let counts = futures_util::future::try_join_all(updates).await?;
    let written: Vec<(u64, &String)> = seqs
        .iter()
        .zip(keys)
        .zip(counts)
        .filter(|(_, n)| *n > 0)
        .map(|((&s, k), _)| (s, k))
        .collect();
    // Registered before COMMIT is sent: no client can see the row earlier, and the entry must
    // exist before a poke could carry it.
    let commit_sent = Instant::now();
    for &(s, k) in &written {
        shared.book.insert(s, commit_sent, Arc::from(k.as_str()));
    }
    tx.commit().await?;
    if shared.stats.in_measured_period(commit_sent) {
        shared.stats.commit.record(commit_sent.elapsed());
    }
    shared.stats.rows_written.add(written.len() as u64);
    shared.stats.txs_written.inc();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::ClientSchema;

    #[test]
    fn key_pool_is_bounded_and_distinct() {
        let pool = KeyPool::new(3);
        assert!(pool.wants_more());
        pool.add(["a", "b", "a"].map(String::from));
        assert_eq!(pool.len(), 2);
        pool.add(["c", "d", "e"].map(String::from));
        assert_eq!(pool.len(), 3);
        assert!(!pool.wants_more());
        let mut rng = Rng::new(7);
        let picked = pool.pick(5, &mut rng);
        assert_eq!(picked.len(), 3);
        let set: HashSet<_> = picked.iter().collect();
        assert_eq!(set.len(), 3);
        assert!(KeyPool::new(3).pick(2, &mut rng).is_empty());
    }

    /// Every key once per round: with 2,000 keys picked one by one, a key comes back only after
    /// the rest of its round and at most all of the next (gap 1..=3,999 picks, mostly ~2,000),
    /// and transactions never repeat a key, also across a round boundary.
    #[test]
    fn keys_are_picked_in_shuffled_rounds() {
        let pool = KeyPool::new(KEY_POOL_MAX);
        pool.add((0..2000).map(|i| format!("i{i}")));
        let mut rng = Rng::new(42);
        let mut last: HashMap<String, usize> = HashMap::new();
        let mut gaps = Vec::new();
        for n in 0..10_000 {
            let k = pool.pick(1, &mut rng).pop().unwrap();
            if let Some(prev) = last.insert(k, n) {
                gaps.push(n - prev);
            }
        }
        assert_eq!(last.len(), 2000, "every key is picked");
        assert_eq!(gaps.len(), 8000);
        assert!(gaps.iter().all(|&g| (1..4000).contains(&g)));
        let near = gaps.iter().filter(|&&g| g < 200).count();
        assert!(near < 100, "{near} of 8000 repeats within 200 picks");
        // Rounds of 7 keys in transactions of 3: never a key twice in one transaction, and
        // each key comes up about equally often.
        let small = KeyPool::new(10);
        small.add((0..7).map(|i| format!("k{i}")));
        let mut count: HashMap<String, usize> = HashMap::new();
        for _ in 0..700 {
            let tx = small.pick(3, &mut rng);
            assert_eq!(tx.len(), 3);
            assert_eq!(tx.iter().collect::<HashSet<_>>().len(), 3, "{tx:?}");
            for k in tx {
                *count.entry(k).or_default() += 1;
            }
        }
        assert!(
            count.values().all(|&c| (290..=310).contains(&c)),
            "{count:?}"
        );
        // Keys added mid-way join the next round.
        small.add(["k7".to_string()]);
        let seen: HashSet<String> = (0..20).flat_map(|_| small.pick(1, &mut rng)).collect();
        assert!(seen.contains("k7"));
    }

    #[test]
    fn token_book_matches_and_forgets_oldest() {
        let book = TokenBook::new(2);
        let t0 = Instant::now();
        let k: Arc<str> = Arc::from("i1");
        book.insert(1, t0, k.clone());
        book.insert(2, t0 + Duration::from_millis(1), k.clone());
        book.insert(3, t0 + Duration::from_millis(2), Arc::from("i2"));
        assert_eq!(book.matched(1), None);
        assert_eq!(
            book.matched(2),
            Some(Matched {
                committed_at: t0 + Duration::from_millis(1)
            })
        );
        assert_eq!(book.matched(99), None);
        let d = book.delivery_between(t0, t0 + Duration::from_secs(1));
        assert_eq!((d.committed, d.unseen, d.superseded), (2, 1, 0));
    }

    /// Receivers per row, and unseen rows told apart: superseded (a later token of the same row
    /// was received) or lost.
    #[test]
    fn delivery_counts_receivers_and_superseded_rows() {
        let book = TokenBook::new(100);
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) =
            (Arc::from("a"), Arc::from("b"), Arc::from("c"));
        book.insert(1, at(0), a.clone()); // before the period: not counted
        book.insert(2, at(10), a.clone()); // unseen, superseded by 3
        book.insert(3, at(20), a.clone()); // 3 receivers
        book.insert(4, at(30), b.clone()); // unseen and lost (no later token of b seen)
        book.insert(5, at(40), c.clone()); // 2 receivers
        book.insert(6, at(50), c.clone()); // unseen, nothing later: lost
        book.insert(7, at(200), b.clone()); // after the period, but received: supersedes 4
        for _ in 0..3 {
            book.matched(3).unwrap();
        }
        book.matched(5).unwrap();
        book.matched(5).unwrap();
        book.matched(1).unwrap();
        let d = book.delivery_between(at(5), at(100));
        assert_eq!(
            d,
            Delivery {
                committed: 5,
                unseen: 3,
                superseded: 1,
                receivers_min: 0,
                receivers_max: 3,
                receivers_sum: 5,
            }
        );
        book.matched(7).unwrap();
        let d = book.delivery_between(at(5), at(100));
        assert_eq!((d.unseen, d.superseded), (3, 2));
        assert_eq!(book.delivery_between(at(300), at(400)), Delivery::default());
    }

    #[test]
    fn update_sql_checks_the_schema() {
        let mut s = ClientSchema::default();
        s.add_column("issue", "id", "text", "S", "text");
        s.add_column("issue", "title", "text", "S", "text");
        s.add_column("issue", "priority", "int4", "N", "integer");
        let cfg = |col: &str, key: &str| WriterConfig {
            url: String::new(),
            table: "issue".into(),
            key: key.into(),
            column: col.into(),
            rows_per_s: 1.0,
            tx_size: 1,
            first_seq: 0,
        };
        assert_eq!(
            update_sql(&cfg("title", "id"), &s).unwrap(),
            r#"UPDATE "issue" SET "title" = $1 WHERE "id" = $2::text::text"#
        );
        assert!(update_sql(&cfg("priority", "id"), &s).is_err());
        assert!(update_sql(&cfg("nope", "id"), &s).is_err());
        assert!(update_sql(&cfg("title", "nope"), &s).is_err());
    }
}
