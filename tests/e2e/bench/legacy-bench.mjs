#!/usr/bin/env node
// Side-by-side benchmark of the legacy paths (JWT auth, ad-hoc ZQL query, CRUD mutator) of zcache
// and the real zero-cache 1.9.0, with the real @rocicorp/zero 1.9.0 client.
//
//   node bench/legacy-bench.mjs [--server zcache|zero-cache|both] [--connects N] [--mutations N]
//                               [--warmup N] [--json-out FILE] [--timeout-s S]
//
// For each server in turn (never two at once), on its own throwaway PostgreSQL (lib/pg.mjs seed),
// started without an app server with ZERO_AUTH_SECRET (as test/legacy.test.mjs), 'owner'
// permissions deployed with the real zero-deploy-permissions CLI:
//   1. connect: N sequential clients, each a new client group of user u1 with a freshly signed
//      HS256 token; time from `new Zero(...)` to the `connected` frame and to the first complete
//      result of `issue.where('id', <a u1 issue>)`; each client is closed before the next.
//   2. mutation: one client (u1), N sequential `z.mutate.issue.update({id, title: 'b<i>'})`; time
//      from the call to the poke whose lastMutationIDChanges carries its mutation id, and to the
//      commit of the row in PostgreSQL (a NOTIFY from an AFTER UPDATE trigger on issue).
// Then one table with both servers and the ratio zero-cache/zcache; `--json-out` writes the figures.
//
// zcache binary: $ZCACHE_BIN, else <repo>/target/release/zcache, else <repo>/target/debug/zcache.
import {onFrame} from './wstap.mjs';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {fileURLToPath} from 'node:url';
import {parseArgs} from 'node:util';
import postgres from 'postgres';
import {Zero} from '@rocicorp/zero';
import {startPostgres, sqlOptions} from '../lib/pg.mjs';
import {preflightServer, startServer} from '../lib/server.mjs';
import {legacySchema, deployOwnerPermissionsWithCli, signHS256} from '../lib/legacy.mjs';
import {withTimeout} from '../lib/view.mjs';

const e2eDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const repoDir = path.resolve(e2eDir, '..', '..');

const SECRET = 'e2e-bench-secret';
const ADMIN_PASSWORD = 'e2e';
const NOTIFY_CHANNEL = 'zbench_issue';
const hydrateMs = 60_000; // first hydration (and the permissions row replicating) on a 2-core machine
const opMs = 30_000; // one connect, one mutation
const closeMs = 10_000;

// ---------------------------------------------------------------------------------------------
// options

const usage = `usage: node bench/legacy-bench.mjs [--server zcache|zero-cache|both] [--connects N] [--mutations N]
                                   [--warmup N] [--json-out FILE] [--timeout-s S]
  --server     which server(s) to measure, one after the other (default both)
  --connects   sequential JWT connects measured per server (default 50)
  --mutations  sequential CRUD updates measured per server (default 200)
  --warmup     connects and mutations done first and not counted (default 3)
  --json-out   also write the figures (with every sample) as JSON to FILE
  --timeout-s  hard limit for the whole run; the script then exits with code 2 (default 1800)
zcache binary: $ZCACHE_BIN, else <repo>/target/release/zcache, else <repo>/target/debug/zcache`;

function parseOptions() {
  let values;
  try {
    ({values} = parseArgs({
      options: {
        server: {type: 'string', default: 'both'},
        connects: {type: 'string', default: '50'},
        mutations: {type: 'string', default: '200'},
        warmup: {type: 'string', default: '3'},
        'json-out': {type: 'string'},
        'timeout-s': {type: 'string', default: '1800'},
        help: {type: 'boolean', short: 'h', default: false},
      },
      strict: true,
    }));
  } catch (e) {
    console.error(`${e.message}\n${usage}`);
    process.exit(64);
  }
  if (values.help) {
    console.log(usage);
    process.exit(0);
  }
  const int = (name, min) => {
    const n = Number(values[name]);
    if (!Number.isInteger(n) || n < min) {
      console.error(`--${name} ${values[name]}: expected an integer >= ${min}\n${usage}`);
      process.exit(64);
    }
    return n;
  };
  const servers = {both: ['zcache', 'zero-cache'], zcache: ['zcache'], 'zero-cache': ['zero-cache']}[values.server];
  if (!servers) {
    console.error(`--server ${values.server}: expected zcache, zero-cache or both\n${usage}`);
    process.exit(64);
  }
  return {
    servers,
    connects: int('connects', 1),
    mutations: int('mutations', 1),
    warmup: int('warmup', 0),
    jsonOut: values['json-out'] ? path.resolve(values['json-out']) : null,
    timeoutS: int('timeout-s', 10),
  };
}

const opts = parseOptions();

// hard limit: whatever hangs, the script ends (lib/proc.mjs kills the children on exit)
const watchdog = setTimeout(() => {
  console.error(`legacy-bench: the whole run exceeded --timeout-s ${opts.timeoutS}; giving up`);
  process.exit(2);
}, opts.timeoutS * 1000);
watchdog.unref();

function log(msg) {
  console.log(`[bench +${(performance.now() / 1000).toFixed(1)}s] ${msg}`);
}

/** $ZCACHE_BIN, else target/release/zcache, else target/debug/zcache; with how it was chosen. */
function resolveZcacheBin() {
  if (process.env.ZCACHE_BIN) return {bin: path.resolve(process.env.ZCACHE_BIN), how: 'ZCACHE_BIN'};
  const release = path.join(repoDir, 'target', 'release', 'zcache');
  if (fs.existsSync(release)) return {bin: release, how: 'release build'};
  return {bin: path.join(repoDir, 'target', 'debug', 'zcache'), how: 'debug build (no release build found)'};
}

function describeBinary(kind) {
  if (kind === 'zero-cache') {
    const pkg = JSON.parse(fs.readFileSync(path.join(e2eDir, 'node_modules', '@rocicorp', 'zero', 'package.json'), 'utf8'));
    return `zero-cache from node_modules/@rocicorp/zero ${pkg.version} (node ${process.version})`;
  }
  const {bin, how} = resolveZcacheBin();
  let built = 'missing';
  try {
    built = `built ${fs.statSync(bin).mtime.toISOString()}`;
  } catch {
    // reported by preflightServer
  }
  return `zcache ${bin} (${how}, ${built})`;
}

// ---------------------------------------------------------------------------------------------
// statistics

/** Nearest-rank percentiles of `samples` (ms), rounded to 0.01 ms. */
function summarize(samples) {
  const s = [...samples].sort((a, b) => a - b);
  const n = s.length;
  if (n === 0) return {n: 0};
  const pct = p => s[Math.max(0, Math.ceil((p / 100) * n) - 1)];
  const r = x => Math.round(x * 100) / 100;
  return {
    n, min: r(s[0]), p50: r(pct(50)), p90: r(pct(90)), p99: r(pct(99)), max: r(s[n - 1]),
    mean: r(s.reduce((a, b) => a + b, 0) / n),
    samples: samples.map(r),
  };
}

const METRICS = [
  ['connectConnected', 'connect: new Zero -> connected frame'],
  ['connectComplete', 'connect: new Zero -> first complete result'],
  ['mutationPoke', 'update: call -> poke with its lmid'],
  ['mutationPg', 'update: call -> row committed in PG'],
];
const STATS = ['p50', 'p90', 'p99', 'max'];

// ---------------------------------------------------------------------------------------------
// one server

const now = () => Math.floor(Date.now() / 1000);
const tokenFor = sub => signHS256({sub, exp: now() + 3600}, SECRET);
let storageKeys = 0;

function newClient(server, kind) {
  return new Zero({
    server: server.url, schema: legacySchema, kvStore: 'mem', logLevel: 'error',
    userID: 'u1', auth: tokenFor('u1'),
    // a new storage key is a new client group
    storageKey: `bench-${kind}-${process.pid}-${++storageKeys}`,
  });
}

/**
 * Resolves with performance.now() at the first complete result of `view` holding exactly the row
 * `id`; rejects on a complete result without it (unless `patient`, for the warm-up, when the
 * permissions row may still be replicating) or on an `error` frame for the client.
 */
function firstComplete(view, id, {patient, failed}) {
  return new Promise((resolve, reject) => {
    failed.catch(reject);
    view.addListener((data, resultType) => {
      if (resultType !== 'complete') return;
      if (data.length === 1 && data[0].id === id) resolve(performance.now());
      else if (!patient) reject(new Error(`complete result without issue ${id}: ${JSON.stringify(data).slice(0, 300)}`));
    });
  });
}

/** Watches the frames of client `getClientID()`: `connected` time and the first `error` frame. */
function watchClient(getClientID) {
  const w = {connectedAt: null, errors: []};
  let fail;
  // rejects on the first error frame (handled here too, so an unused one is no unhandled rejection)
  w.failed = new Promise((_, reject) => (fail = reject));
  w.failed.catch(() => {});
  w.stop = onFrame((clientID, [tag, body], at) => {
    if (clientID !== getClientID()) return;
    if (tag === 'connected' && w.connectedAt === null) w.connectedAt = at;
    else if (tag === 'error') {
      w.errors.push(body);
      fail(new Error(`error frame from the server: ${JSON.stringify(body)}`));
    }
  });
  return w;
}

async function closeClient(z) {
  await withTimeout(z.close(), closeMs, 'client close');
}

/** One measured connect: {connected, complete} in ms from `new Zero`. */
async function oneConnect(server, kind, issueId, {patient = false, diag}) {
  let clientID = null;
  const w = watchClient(() => clientID);
  let z = null;
  try {
    const t0 = performance.now();
    z = newClient(server, kind);
    clientID = z.clientID;
    const view = z.query.issue.where('id', issueId).materialize();
    const completeAt = await withTimeout(firstComplete(view, issueId, {patient, failed: w.failed}),
      patient ? hydrateMs : opMs, `the first complete result of issue ${issueId}`, diag);
    view.destroy();
    return {connected: w.connectedAt === null ? null : w.connectedAt - t0, complete: completeAt - t0};
  } finally {
    w.stop();
    if (z) await closeClient(z);
  }
}

async function connectPhase(server, kind, issueId, diag) {
  for (let i = 0; i < opts.warmup; i++) {
    const r = await oneConnect(server, kind, issueId, {patient: i === 0, diag});
    log(`${kind}: warm-up connect ${i + 1}/${opts.warmup}: connected ${r.connected?.toFixed(1)} ms, complete ${r.complete.toFixed(1)} ms`);
  }
  const connected = [];
  const complete = [];
  for (let i = 0; i < opts.connects; i++) {
    const r = await oneConnect(server, kind, issueId, {diag});
    if (r.connected === null) throw new Error(`connect ${i + 1}: complete result without a connected frame`);
    connected.push(r.connected);
    complete.push(r.complete);
    if ((i + 1) % 10 === 0 || i + 1 === opts.connects) log(`${kind}: ${i + 1}/${opts.connects} connects`);
  }
  return {connected, complete};
}

async function mutationPhase(server, kind, sql, issueId, otherId, diag) {
  // upstream commits, seen through the trigger's NOTIFY ('<id>|<title>')
  const pgWaiters = new Map();
  const listening = await sql.listen(NOTIFY_CHANNEL, payload => {
    const at = performance.now();
    pgWaiters.get(payload)?.(at);
  });

  let z = null;
  let confirmed = 0;
  const lmidWaiters = new Set();
  const w = watchClient(() => z?.clientID);
  const stopPokes = onFrame((clientID, [tag, body], at) => {
    if (!z || clientID !== z.clientID || tag !== 'pokePart') return;
    const n = body?.lastMutationIDChanges?.[clientID];
    if (n === undefined || n <= confirmed) return;
    confirmed = n;
    for (const waiter of [...lmidWaiters]) waiter(n, at);
  });
  const waitLmid = lmid => new Promise(resolve => {
    const waiter = (n, at) => {
      if (n >= lmid) {
        lmidWaiters.delete(waiter);
        resolve(at);
      }
    };
    lmidWaiters.add(waiter);
  });
  const waitPg = key => new Promise(resolve => pgWaiters.set(key, at => {
    pgWaiters.delete(key);
    resolve(at);
  }));

  try {
    z = newClient(server, kind);
    const view = z.query.issue.where('id', issueId).materialize();
    await withTimeout(firstComplete(view, issueId, {patient: true, failed: w.failed}), hydrateMs,
      `the mutation client's view of issue ${issueId}`, diag);
    // the same work on both servers: the owner rule is enforced (u2's issue is not visible to u1)
    const foreign = z.query.issue.where('id', otherId).materialize();
    const seen = await withTimeout(new Promise(resolve => foreign.addListener((data, resultType) => {
      if (resultType === 'complete') resolve(data.length);
    })), opMs, `the complete result of u2's issue ${otherId}`, diag);
    foreign.destroy();
    if (seen !== 0) throw new Error(`u1 sees u2's issue ${otherId}: the 'owner' permissions are not enforced`);
    const base = confirmed;
    const poke = [];
    const pg = [];
    const total = opts.warmup + opts.mutations;
    for (let i = 1; i <= total; i++) {
      const title = `b${i}`;
      const lmid = base + i;
      const pgAt = waitPg(`${issueId}|${title}`);
      const pokeAt = waitLmid(lmid);
      const t0 = performance.now();
      const local = z.mutate.issue.update({id: issueId, title});
      const what = `update ${i} (title ${title})`;
      const ctx = () => [`confirmed lmid ${confirmed}, expected ${lmid}`, diag()].join('\n');
      await withTimeout(Promise.race([local, w.failed]), opMs, `${what}: the local write`, ctx);
      const [tPoke, tPg] = await withTimeout(Promise.race([Promise.all([pokeAt, pgAt]), w.failed]), opMs,
        `${what}: the poke with lastMutationIDChanges {${z.clientID}: ${lmid}} and the commit in PostgreSQL`, ctx);
      if (i > opts.warmup) {
        poke.push(tPoke - t0);
        pg.push(tPg - t0);
      }
      if (i % 50 === 0 || i === total) log(`${kind}: ${i}/${total} updates (${opts.warmup} warm-up)`);
    }
    view.destroy();
    const [{title}] = await sql`select title from issue where id = ${issueId}`;
    if (title !== `b${total}`) throw new Error(`issue ${issueId} has title ${title} in PostgreSQL, expected b${total}`);
    if (confirmed !== base + total) throw new Error(`confirmed lmid ${confirmed}, expected ${base + total}`);
    return {poke, pg};
  } finally {
    w.stop();
    stopPokes();
    if (z) await closeClient(z).catch(e => log(`${kind}: ${e.message}`));
    await listening.unlisten().catch(() => {});
  }
}

async function runServer(kind) {
  process.env.E2E_SERVER = kind;
  if (kind === 'zcache') process.env.ZCACHE_BIN = resolveZcacheBin().bin;
  const result = {server: kind, binary: describeBinary(kind), ok: false, error: null, startMs: null, metrics: {}};
  log(`=== ${result.binary}`);
  let pg = null;
  let sql = null;
  let server = null;
  const diag = () => (server?.proc ? `${kind} output tail:\n${server.tail(15)}` : '');
  try {
    preflightServer();
    let t = performance.now();
    pg = await startPostgres({dbName: 'zbench'});
    sql = postgres(pg.url, sqlOptions());
    // created before the sync server starts (it is DDL); it only reports commits
    await sql.unsafe(`
      CREATE FUNCTION zbench_notify() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN PERFORM pg_notify('${NOTIFY_CHANNEL}', NEW.id || '|' || NEW.title); RETURN NEW; END $$;
      CREATE TRIGGER zbench_notify AFTER UPDATE ON issue FOR EACH ROW EXECUTE FUNCTION zbench_notify();`);
    log(`${kind}: PostgreSQL on port ${pg.port} seeded in ${(performance.now() - t).toFixed(0)} ms`);

    t = performance.now();
    server = await startServer({pgUrl: pg.url, appUrl: null, env: {ZERO_AUTH_SECRET: SECRET, ZERO_ADMIN_PASSWORD: ADMIN_PASSWORD}});
    result.startMs = Math.round(server.startMs);
    await deployOwnerPermissionsWithCli(pg.url, server.appId);
    log(`${kind}: ready on port ${server.port} after ${result.startMs} ms, 'owner' permissions deployed ` +
      `(${(performance.now() - t).toFixed(0)} ms in all)`);

    // u1 owns i100, i200, ... (owner_id = 'u' || (1 + i % 100))
    const ids = (await sql`select id from issue where owner_id = 'u1' order by id collate "C" limit 2`).map(r => r.id);
    if (ids.length !== 2) throw new Error('the seed has fewer than two issues of u1');

    const c = await connectPhase(server, kind, ids[0], diag);
    result.metrics.connectConnected = summarize(c.connected);
    result.metrics.connectComplete = summarize(c.complete);
    const [{id: otherId}] = await sql`select id from issue where owner_id = 'u2' order by id collate "C" limit 1`;
    const m = await mutationPhase(server, kind, sql, ids[1], otherId, diag);
    result.metrics.mutationPoke = summarize(m.poke);
    result.metrics.mutationPg = summarize(m.pg);
    result.ok = true;
  } catch (e) {
    result.error = e.message;
    log(`${kind}: FAILED: ${e.message}`);
  } finally {
    const steps = [
      ['stop the server', server, () => server.stop()],
      ['close sql', sql, () => sql.end({timeout: 2})],
      ['stop PostgreSQL', pg, () => pg.stop()],
    ];
    for (const [name, started, step] of steps) {
      if (!started) continue;
      try {
        await withTimeout(Promise.resolve(step()), 30_000, `${kind}: ${name}`);
      } catch (e) {
        log(`teardown: ${e.message}`);
      }
    }
  }
  return result;
}

// ---------------------------------------------------------------------------------------------
// report

function ratioOf(results, metric, stat) {
  const a = results.zcache?.metrics[metric]?.[stat];
  const b = results['zero-cache']?.metrics[metric]?.[stat];
  return a > 0 && b !== undefined ? Math.round((b / a) * 100) / 100 : null;
}

function printTable(results) {
  const kinds = opts.servers;
  const head = ['metric (ms)', 'stat', ...kinds, ...(kinds.length === 2 ? ['zero-cache/zcache'] : [])];
  const rows = [];
  const cell = (kind, metric, stat) => {
    const r = results[kind];
    if (!r.ok) return 'failed';
    return r.metrics[metric][stat].toFixed(1);
  };
  for (const [metric, label] of METRICS) {
    for (const stat of STATS) {
      const ratio = ratioOf(results, metric, stat);
      rows.push([stat === 'p50' ? label : '', stat, ...kinds.map(k => cell(k, metric, stat)),
        ...(kinds.length === 2 ? [ratio === null ? '-' : `${ratio.toFixed(2)}x`] : [])]);
    }
  }
  rows.push(['server start -> ready', '', ...kinds.map(k => (results[k].startMs === null ? '-' : String(results[k].startMs))),
    ...(kinds.length === 2 ? [''] : [])]);
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map(r => r[i].length)));
  const line = r => r.map((c, i) => (i < 2 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ');
  console.log('');
  console.log(`legacy paths: ${opts.connects} connects, ${opts.mutations} updates (after ${opts.warmup} warm-up each); ` +
    `${os.cpus().length} CPUs, load ${os.loadavg().map(x => x.toFixed(2)).join(' ')}`);
  for (const k of kinds) console.log(`  ${k}: ${results[k].binary}${results[k].ok ? '' : `\n    FAILED: ${results[k].error}`}`);
  console.log('');
  console.log(line(head));
  console.log(widths.map(w => '-'.repeat(w)).join('  '));
  for (const r of rows) console.log(line(r));
  console.log('');
}

async function main() {
  const results = {};
  for (const kind of opts.servers) results[kind] = await runServer(kind);
  printTable(results);
  if (opts.jsonOut) {
    const ratios = {};
    if (opts.servers.length === 2) {
      for (const [metric] of METRICS) ratios[metric] = Object.fromEntries(STATS.map(s => [s, ratioOf(results, metric, s)]));
    }
    const out = {
      generatedAt: new Date().toISOString(),
      host: {cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model, loadavg: os.loadavg(), node: process.version},
      options: {connects: opts.connects, mutations: opts.mutations, warmup: opts.warmup},
      metrics: Object.fromEntries(METRICS),
      servers: results,
      ratiosZeroCacheOverZcache: ratios,
    };
    fs.mkdirSync(path.dirname(opts.jsonOut), {recursive: true});
    fs.writeFileSync(opts.jsonOut, JSON.stringify(out, null, 2) + '\n');
    log(`figures written to ${opts.jsonOut}`);
  }
  return opts.servers.every(k => results[k].ok) ? 0 : 1;
}

main().then(
  code => process.exit(code),
  e => {
    console.error(`legacy-bench: ${e.stack ?? e}`);
    process.exit(1);
  },
);
