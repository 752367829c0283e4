// End-to-end session tests: several clients of one client group, queries dropped while others still
// need their rows, failing mutations, a schema mismatch, and server restarts (with the client's
// cookie, and after SIGTERM with clients connected). The real @rocicorp/zero 1.9.0 client against
// the sync server under test (E2E_SERVER=zcache|zero-cache), a throwaway PostgreSQL and an
// in-process app server. The tests share one database and one server and run in order; every view
// is compared with the same query run in SQL.
import {sockets, socketsOf} from '../lib/wsspy.mjs';
import {test, before, after} from 'node:test';
import assert from 'node:assert/strict';
import postgres from 'postgres';
import {Zero, createSchema, table, string, number} from '@rocicorp/zero';
import {startPostgres, sqlOptions} from '../lib/pg.mjs';
import {startAppServer} from '../lib/appserver.mjs';
import {preflightServer, startServer} from '../lib/server.mjs';
import {schema, queries, mutators} from '../lib/schema.mjs';
import {plain, watchView, withTimeout} from '../lib/view.mjs';
import {sleep} from '../lib/proc.mjs';

const hydrateMs = 30_000; // hydration of a small view on a loaded 2-core machine
const changeMs = 20_000; // a PostgreSQL change or a mutation reaching a view
const reconnectMs = 30_000; // the client retries with backoff while the server is down
const testMs = 60_000; // whole-test ceiling

let pg, sql, app, server;
const clients = new Set();
const kind = process.env.E2E_SERVER || 'zcache';

function log(msg) {
  const at = (performance.now() / 1000).toFixed(1);
  console.log(`[e2e ${kind} +${at}s] ${msg}`);
}

// extra lines for timeout messages: what the server and the app server said last
function diag() {
  const lines = [];
  if (app?.errors.length) lines.push(`app server errors: ${app.errors.map(String).join('; ')}`);
  if (app) lines.push(`app server calls: ${JSON.stringify(app.calls)}`);
  if (server) lines.push(`${server.kind} output tail:\n${server.tail(15)}`);
  return lines.join('\n');
}

/**
 * A Zero client with an in-memory store. Zeros of the same userID and storageKey in this process
 * share that store and so one client group (like two tabs of one browser profile); a distinct
 * storageKey gives a distinct client group. `z.states` records every connection state.
 */
function newClient({storageKey, schema: clientSchema = schema, ...rest}) {
  const z = new Zero({
    server: server.url, schema: clientSchema, mutators, userID: 'u1', auth: 'u1', kvStore: 'mem', logLevel: 'error',
    storageKey,
    // the defaults reload the page (location.reload), which Node has not: record instead
    onUpdateNeeded: r => z.updateNeeded.push(r),
    onClientStateNotFound: () => z.clientStateNotFound++,
    ...rest,
  });
  z.updateNeeded = [];
  z.clientStateNotFound = 0;
  z.states = [z.connection.state.current];
  z.connection.state.subscribe(s => z.states.push(s));
  clients.add(z);
  return z;
}

async function closeClient(z) {
  clients.delete(z);
  await withTimeout(z.close(), 10_000, 'client close');
}

function waitForState(z, pred, what, ms = reconnectMs) {
  let unsubscribe = null;
  const hit = new Promise(resolve => {
    if (pred(z.connection.state.current)) return resolve(z.connection.state.current);
    unsubscribe = z.connection.state.subscribe(s => {
      if (pred(s)) resolve(s);
    });
  });
  return withTimeout(hit, ms, `connection state: ${what}`,
    () => `states so far: ${JSON.stringify(z.states)}\n${diag()}`).finally(() => unsubscribe?.());
}

function materialize(z, query, label, options = undefined) {
  const view = options ? z.materialize(query, options) : z.materialize(query);
  return {view, watch: watchView(view, label, diag)};
}

async function hydrated(v, what) {
  return v.watch.waitFor(s => s.resultType === 'complete', `${what}: resultType 'complete' (hydration)`, hydrateMs);
}

// ZQL completes orderBy with the primary key ascending and compares strings bytewise, hence
// `collate "C"`; a relationship without orderBy is ordered by the primary key.
async function sqlIssuesByStatus(status, limit) {
  const issues = await sql`
    select id, title, status, priority, created, owner_id from issue
    where status = ${status} order by created desc, id collate "C" limit ${limit}`;
  return withComments(issues, sql`created desc, id collate "C"`);
}

async function sqlIssuesByOwner(owner, limit) {
  const issues = await sql`
    select id, title, status, priority, created, owner_id from issue
    where owner_id = ${owner} order by created desc, id collate "C" limit ${limit}`;
  return withComments(issues, sql`id collate "C"`);
}

async function withComments(issues, order) {
  const ids = issues.map(i => i.id);
  const comments = ids.length === 0 ? [] : await sql`
    select id, issue_id, body, created from comment where issue_id in ${sql(ids)} order by ${order}`;
  const byIssue = new Map(ids.map(id => [id, []]));
  for (const c of comments) byIssue.get(c.issue_id).push(c);
  return plain(issues.map(i => ({...i, comments: byIssue.get(i.id)})));
}

function assertSameView(actual, expected, what) {
  assert.equal(actual.length, expected.length, `${what}: row count`);
  assert.deepStrictEqual(actual.map(r => r.id), expected.map(r => r.id), `${what}: issue ids and order`);
  assert.deepStrictEqual(actual, expected, `${what}: whole view (all columns, comments in order)`);
}

/** Waits until the view equals `expectedFn()` (SQL) and returns the snapshot. */
async function viewMatchesSql(v, expectedFn, what, ms = changeMs) {
  let expected = await expectedFn();
  const deadline = Date.now() + ms;
  for (;;) {
    const snap = v.watch.latest;
    if (snap?.resultType === 'complete' && JSON.stringify(snap.data) === JSON.stringify(expected)) return snap;
    if (Date.now() > deadline) {
      assertSameView(snap?.data ?? [], expected, `${what} (after waiting ${ms} ms)`);
      return snap;
    }
    await sleep(100);
    expected = await expectedFn();
  }
}

function countRows(view) {
  return view.reduce((a, i) => a + 1 + i.comments.length, 0);
}

async function mutate(z, mutation, what) {
  const res = z.mutate(mutation);
  const client = await withTimeout(res.client, changeMs, `${what}: client-side result`);
  const server = await withTimeout(res.server, changeMs, `${what}: server result`, diag);
  return {client: plain(client), server: plain(server)};
}

async function mutateOk(z, mutation, what) {
  const {client, server} = await mutate(z, mutation, what);
  assert.equal(client.type, 'success', `${what}: client result ${JSON.stringify(client)}`);
  assert.equal(server.type, 'success', `${what}: server result ${JSON.stringify(server)}`);
}

async function titleInPg(id) {
  const [row] = await sql`select title from issue where id = ${id}`;
  return row?.title;
}

async function maxCreated(table) {
  const [{m}] = await sql`select max(created) as m from ${sql(table)}`;
  return m;
}

/** The client's whole local store of `table` (every row any of its group's queries synced). */
async function storeIds(z, tableName) {
  const rows = await z.inspector.client.rows(tableName);
  return rows.map(r => r.id).sort();
}

function sorted(ids) {
  return [...new Set(ids)].sort();
}

async function waitForStore(z, tableName, expectedIds, what, ms = changeMs) {
  const want = JSON.stringify(sorted(expectedIds));
  const deadline = Date.now() + ms;
  let got;
  for (;;) {
    got = await storeIds(z, tableName);
    if (JSON.stringify(got) === want) return;
    if (Date.now() > deadline) break;
    await sleep(100);
  }
  const gotSet = new Set(got);
  const wantSet = new Set(JSON.parse(want));
  const extra = got.filter(id => !wantSet.has(id));
  const missing = [...wantSet].filter(id => !gotSet.has(id));
  assert.fail(`${what}: client store of ${tableName} after ${ms} ms: ${got.length} rows, expected ${wantSet.size}; ` +
    `extra ${extra.length} [${extra.slice(0, 8)}], missing ${missing.length} [${missing.slice(0, 8)}]`);
}

/** The socket (spy record) of `z` opened after `index` that reached `connected`, once it has. */
async function nextConnectedSocket(z, index, what, ms = reconnectMs) {
  const deadline = Date.now() + ms;
  for (;;) {
    const rec = sockets.slice(index).find(s => s.clientID === z.clientID && s.connected);
    if (rec) return rec;
    if (Date.now() > deadline) {
      throw new Error(`${what}: no new connected socket for client ${z.clientID} within ${ms} ms; ` +
        `its sockets: ${JSON.stringify(socketsOf(z.clientID).map(s => ({baseCookie: s.baseCookie, connected: s.connected, errors: s.errors, closed: s.closed})))}` +
        `; states ${JSON.stringify(z.states.slice(-5))}\n${diag()}`);
    }
    await sleep(100);
  }
}

function framesSummary(rec, n = 12) {
  return rec.frames.slice(0, n).map(f => JSON.stringify(f).slice(0, 200)).join('\n');
}

async function waitUntil(pred, what, ms) {
  const deadline = Date.now() + ms;
  while (!(await pred())) {
    if (Date.now() > deadline) assert.fail(`${what}: not within ${ms} ms`);
    await sleep(50);
  }
}

/**
 * After a restart: waits until every view equals SQL or some client got an error frame on a socket
 * opened since `index`, and fails on such an error (naming it) rather than on a stale view.
 */
async function assertNoReconnectErrors(zs, index, views, what) {
  const errors = () => zs.flatMap(z => socketsOf(z.clientID).filter(s => sockets.indexOf(s) >= index).flatMap(s => s.errors));
  const allMatch = async () => {
    for (const [v, expectedFn] of views) {
      if (JSON.stringify(v.watch.latest?.data) !== JSON.stringify(await expectedFn())) return false;
    }
    return true;
  };
  await waitUntil(async () => errors().length > 0 || zs.some(z => z.clientStateNotFound > 0) || (await allMatch()),
    `${what}: views equal SQL (or an error frame)`, changeMs);
  assert.deepStrictEqual(errors(), [], `${what}: no error frame on the reconnect (onClientStateNotFound calls: ${zs.map(z => z.clientStateNotFound)})`);
}

async function ensureServerRunning() {
  if (!server.running) {
    log(`${server.kind} was not running (an earlier test stopped it): restarting`);
    await server.restart();
  }
}

before(async () => {
  preflightServer();
  pg = await startPostgres();
  sql = postgres(pg.url, sqlOptions());
  app = await startAppServer({pgUrl: pg.url});
  const t = performance.now();
  server = await startServer({pgUrl: pg.url, appUrl: app.url});
  log(`${server.kind} ready on port ${server.port} after ${(performance.now() - t).toFixed(0)} ms (app id ${server.appId})`);
});

after(async () => {
  const steps = [
    ['close clients', clients.size > 0, () => Promise.all([...clients].map(z => z.close()))],
    ['stop sync server', server, () => server.stop()],
    ['stop app server', app, () => app.close()],
    ['close sql', sql, () => sql.end({timeout: 2})],
    ['stop PostgreSQL', pg, () => pg.stop()],
  ];
  for (const [name, started, step] of steps) {
    if (!started) continue;
    try {
      await withTimeout(Promise.resolve(step()), 30_000, name);
    } catch (e) {
      console.error(`teardown: ${name} failed: ${e.message}`);
    }
  }
});

test('two clients in one client group (two tabs) share rows, queries, upstream changes and mutations', {timeout: testMs}, async () => {
  const za = newClient({storageKey: 'tabs'});
  const va = materialize(za, queries.issuesByStatus({status: 'open', limit: 50}), 'tab A open issues');
  let snapA = await hydrated(va, 'tab A');
  assertSameView(snapA.data, await sqlIssuesByStatus('open', 50), 'tab A after hydration');

  const zb = newClient({storageKey: 'tabs'});
  assert.equal(await zb.clientGroupID, await za.clientGroupID, 'both tabs in one client group');
  assert.notEqual(zb.clientID, za.clientID, 'distinct clients');
  const vb = materialize(zb, queries.issuesByStatus({status: 'open', limit: 50}), 'tab B open issues');
  const snapB = await hydrated(vb, 'tab B');
  assertSameView(snapB.data, await sqlIssuesByStatus('open', 50), 'tab B after hydration');
  await waitForState(zb, s => s.name === 'connected', 'tab B connected');
  const sockB = await nextConnectedSocket(zb, 0, 'tab B');
  assert.equal(sockB.clientGroupID, await za.clientGroupID, "tab B's socket names the shared client group");

  // a query only tab B adds is hydrated for it
  const owner = snapA.data[0].owner_id;
  const vbOwner = materialize(zb, queries.issuesByOwner({owner, limit: 100}), `tab B issues of ${owner}`);
  const snapOwner = await hydrated(vbOwner, 'tab B owner query');
  assertSameView(snapOwner.data, await sqlIssuesByOwner(owner, 100), 'tab B owner query after hydration');
  assert.ok(snapOwner.data.length > 0, `${owner} owns issues`);

  // an upstream change reaches both tabs
  const target = snapA.data[1].id;
  const title = `pg-two-tabs-${Date.now()}`;
  await sql`update issue set title = ${title} where id = ${target}`;
  await va.watch.waitFor(s => s.data.find(i => i.id === target)?.title === title, `tab A: UPDATE of ${target}`, changeMs);
  await vb.watch.waitFor(s => s.data.find(i => i.id === target)?.title === title, `tab B: UPDATE of ${target}`, changeMs);
  await viewMatchesSql(va, () => sqlIssuesByStatus('open', 50), 'tab A after the upstream UPDATE');
  await viewMatchesSql(vb, () => sqlIssuesByStatus('open', 50), 'tab B after the upstream UPDATE');

  // tab A renames an issue only tab B's owner query shows (if any), else one both show
  const onlyB = snapOwner.data.find(i => !snapA.data.some(a => a.id === i.id)) ?? snapOwner.data[0];
  const titleA = `by-tab-A-${Date.now()}`;
  await mutateOk(za, mutators.issue.setTitle({id: onlyB.id, title: titleA}), 'tab A setTitle');
  assert.equal(await titleInPg(onlyB.id), titleA, 'tab A mutation in PostgreSQL');
  await vbOwner.watch.waitFor(s => s.data.find(i => i.id === onlyB.id)?.title === titleA, `tab B sees tab A's title for ${onlyB.id}`, changeMs);
  await viewMatchesSql(vbOwner, () => sqlIssuesByOwner(owner, 100), 'tab B owner query after tab A mutation');

  // and tab B's mutation reaches tab A
  const titleB = `by-tab-B-${Date.now()}`;
  const target2 = snapA.data[2].id;
  await mutateOk(zb, mutators.issue.setTitle({id: target2, title: titleB}), 'tab B setTitle');
  assert.equal(await titleInPg(target2), titleB, 'tab B mutation in PostgreSQL');
  snapA = await va.watch.waitFor(s => s.data.find(i => i.id === target2)?.title === titleB, `tab A sees tab B's title for ${target2}`, changeMs);
  await viewMatchesSql(va, () => sqlIssuesByStatus('open', 50), 'tab A at the end');
  await viewMatchesSql(vb, () => sqlIssuesByStatus('open', 50), 'tab B at the end');
  assert.ok(socketsOf(za.clientID).some(s => s.pokes > 0) && sockB.pokes > 0, 'both tabs received pokes on their own sockets');

  await closeClient(za);
  await closeClient(zb);
});

test('a dropped query removes only the rows no other query needs', {timeout: testMs}, async () => {
  const z = newClient({storageKey: 'drop'});
  // A: ttl 'none' so that dropping it takes effect at once; B overlaps A (A's first issue's owner)
  const va = materialize(z, queries.issuesByStatus({status: 'open', limit: 50}), 'query A (open issues)', {ttl: 'none'});
  const snapA = await hydrated(va, 'query A');
  assertSameView(snapA.data, await sqlIssuesByStatus('open', 50), 'query A after hydration');
  const owner = snapA.data[0].owner_id;
  const vb = materialize(z, queries.issuesByOwner({owner, limit: 100}), `query B (issues of ${owner})`);
  const snapB = await hydrated(vb, 'query B');
  assertSameView(snapB.data, await sqlIssuesByOwner(owner, 100), 'query B after hydration');

  const idsA = snapA.data.map(i => i.id);
  const idsB = snapB.data.map(i => i.id);
  const shared = idsA.filter(id => idsB.includes(id));
  assert.ok(shared.length > 0 && shared.length < idsA.length, `A and B overlap partly (${shared.length} shared issues)`);
  const commentIds = view => view.flatMap(i => i.comments.map(c => c.id));
  // before the drop the store holds exactly the union of both queries' rows
  await waitForStore(z, 'issue', [...idsA, ...idsB], 'before the drop');
  await waitForStore(z, 'comment', [...commentIds(snapA.data), ...commentIds(snapB.data)], 'before the drop');

  const t = performance.now();
  va.view.destroy();
  // with ttl 'none' the server removes A at once: the rows only A needed leave the store
  await waitForStore(z, 'issue', idsB, "after dropping A: only B's issues");
  await waitForStore(z, 'comment', commentIds(snapB.data), "after dropping A: only B's comments");
  log(`A's rows left the client store ${(performance.now() - t).toFixed(0)} ms after the drop`);
  // B is untouched and still equals SQL, and keeps following upstream changes
  assertSameView(vb.watch.latest.data, snapB.data, 'query B after dropping A (unchanged)');
  await viewMatchesSql(vb, () => sqlIssuesByOwner(owner, 100), 'query B after dropping A');
  const title = `after-drop-${Date.now()}`;
  await sql`update issue set title = ${title} where id = ${shared[0]}`;
  await vb.watch.waitFor(s => s.data.find(i => i.id === shared[0])?.title === title, `query B: UPDATE of shared ${shared[0]}`, changeMs);
  await viewMatchesSql(vb, () => sqlIssuesByOwner(owner, 100), 'query B after an upstream UPDATE');

  // C with the default TTL (5 min): dropping its view keeps its rows while the server keeps it
  const vc = materialize(z, queries.issuesByStatus({status: 'closed', limit: 5}), 'query C (closed issues)');
  const snapC = await hydrated(vc, 'query C');
  assertSameView(snapC.data, await sqlIssuesByStatus('closed', 5), 'query C after hydration');
  const idsC = snapC.data.map(i => i.id);
  await waitForStore(z, 'issue', [...idsB, ...idsC], 'with C');
  vc.view.destroy();
  await sleep(3_000);
  await waitForStore(z, 'issue', [...idsB, ...idsC], 'C dropped with the default TTL, 3 s later (rows kept for the TTL)', 1);
  await closeClient(z);
});

test('a custom mutator failing on the app server: error result, PostgreSQL unchanged, client keeps working', {timeout: testMs}, async () => {
  const z = newClient({storageKey: 'failing-mutator'});
  const v = materialize(z, queries.issuesByStatus({status: 'open', limit: 20}), 'open issues');
  const snap = await hydrated(v, 'hydration');
  const target = snap.data[0].id;
  const before = await titleInPg(target);
  const sock = await nextConnectedSocket(z, 0, 'client');

  const {client, server: result} = await mutate(z, mutators.issue.setTitleFailsOnServer({id: target, title: 'must-not-stick'}), 'failing mutator');
  assert.equal(client.type, 'success', `client-side run of the mutator: ${JSON.stringify(client)}`);
  assert.equal(result.type, 'error', `server result: ${JSON.stringify(result)}`);
  assert.equal(result.error?.type, 'app', `server result error type: ${JSON.stringify(result)}`);
  assert.match(result.error?.message ?? '', /refused by the app server/, `server result message: ${JSON.stringify(result)}`);
  // the result came in a poke's mutationsPatch (the replicated mutations table), not a pushResponse
  const patches = sock.frames.filter(f => f[0] === 'pokePart').flatMap(f => f[1].mutationsPatch ?? []);
  const put = patches.find(p => p.op === 'put' && p.mutation?.id?.clientID === z.clientID);
  assert.ok(put, `a mutationsPatch put for the mutation; patches: ${JSON.stringify(patches)}`);
  assert.equal(put.mutation.result?.error, 'app', `mutationsPatch result: ${JSON.stringify(put)}`);
  assert.ok(!sock.frames.some(f => f[0] === 'pushResponse'), 'no pushResponse frame');
  assert.equal(sock.errors.length, 0, `no error frame: ${JSON.stringify(sock.errors)}`);

  assert.equal(await titleInPg(target), before, 'PostgreSQL unchanged');
  await v.watch.waitFor(s => s.data.find(i => i.id === target)?.title === before, `optimistic title of ${target} rolled back`, changeMs);
  await viewMatchesSql(v, () => sqlIssuesByStatus('open', 20), 'after the failed mutation');
  assert.equal(z.connection.state.current.name, 'connected', 'still connected');
  assert.equal(sock.closed, null, 'the socket stayed open');

  const title = `after-failure-${Date.now()}`;
  await mutateOk(z, mutators.issue.setTitle({id: target, title}), 'good mutation after the failed one');
  assert.equal(await titleInPg(target), title, 'good mutation in PostgreSQL');
  await viewMatchesSql(v, () => sqlIssuesByStatus('open', 20), 'after the good mutation');
  await closeClient(z);
});

test('the app server answering /mutate with HTTP 500: PushFailed, then the client recovers', {timeout: testMs}, async () => {
  const z = newClient({storageKey: 'push-failed'});
  const v = materialize(z, queries.issuesByStatus({status: 'open', limit: 20}), 'open issues');
  const snap = await hydrated(v, 'hydration');
  const sock = await nextConnectedSocket(z, 0, 'client');
  const target = snap.data[1].id;
  const before = await titleInPg(target);
  const title = `after-500-${Date.now()}`;

  app.faults.mutateStatus = 500;
  const calls = app.calls.mutate;
  let res;
  try {
    res = z.mutate(mutators.issue.setTitle({id: target, title}));
    await withTimeout(res.client, changeMs, 'client-side result');
    await waitForState(z, s => s.name === 'error', "state 'error' after PushFailed", changeMs);
  } finally {
    app.faults.mutateStatus = null;
  }
  const state = z.connection.state.current;
  log(`after HTTP 500: ${app.calls.mutate - calls} /mutate calls, state ${JSON.stringify(state)}, error frames ${JSON.stringify(sock.errors)}`);
  assert.equal(sock.errors.length, 1, `one error frame: ${JSON.stringify(sock.errors)}`);
  const err = sock.errors[0];
  assert.equal(err.kind, 'PushFailed', `error kind: ${JSON.stringify(err)}`);
  assert.equal(err.origin, 'zeroCache', `error origin: ${JSON.stringify(err)}`);
  assert.equal(err.reason, 'http', `error reason: ${JSON.stringify(err)}`);
  assert.equal(err.status, 500, `error status: ${JSON.stringify(err)}`);
  assert.equal(err.message, 'Fetch from API server returned non-OK status 500', `error message: ${JSON.stringify(err)}`);
  assert.equal(err.bodyPreview, 'e2e: injected HTTP 500', `error bodyPreview: ${JSON.stringify(err)}`);
  assert.ok(Array.isArray(err.mutationIDs) && err.mutationIDs.length > 0 && err.mutationIDs.every(m => m.clientID === z.clientID && Number.isInteger(m.id)),
    `error mutationIDs: ${JSON.stringify(err)}`);
  await waitUntil(() => sock.closed, 'the server closes the socket after the error frame', 5_000);
  assert.ok(app.calls.mutate - calls >= 1, 'the sync server called /mutate');
  assert.equal(await titleInPg(target), before, 'PostgreSQL unchanged');
  const serverResult = plain(await withTimeout(res.server, changeMs, 'server result after PushFailed'));
  assert.equal(serverResult.type, 'error', `server result after PushFailed: ${JSON.stringify(serverResult)}`);

  // the app resumes the connection; the client works again
  const index = sockets.length;
  await z.connection.connect();
  await waitForState(z, s => s.name === 'connected', 'connected after connect()');
  await nextConnectedSocket(z, index, 'reconnect after PushFailed');
  const title2 = `after-recovery-${Date.now()}`;
  await mutateOk(z, mutators.issue.setTitle({id: snap.data[2].id, title: title2}), 'mutation after recovery');
  assert.equal(await titleInPg(snap.data[2].id), title2, 'mutation after recovery in PostgreSQL');
  await viewMatchesSql(v, () => sqlIssuesByStatus('open', 20), 'after recovery');
  // the mutation that got PushFailed stayed pending in the client, which pushes it again on the new
  // connection: it is applied now (although its .server promise already resolved with the error)
  await waitUntil(async () => (await titleInPg(target)) === title, 'the PushFailed mutation re-pushed and applied after reconnect', changeMs);
  await closeClient(z);
});

test('a client schema naming a table or column the replica lacks gets SchemaVersionNotSupported', {timeout: testMs}, async () => {
  // the test schema's tables, plus a column or a table that PostgreSQL does not have
  const issueCols = {
    id: string(), title: string().optional(), status: string().optional(), priority: number().optional(),
    created: number().optional(), owner_id: string().optional(),
  };
  const user = table('user').columns({id: string(), name: string().optional()}).primaryKey('id');
  const comment = table('comment').columns({
    id: string(), issue_id: string().optional(), body: string().optional(), created: number().optional(),
  }).primaryKey('id');
  const badColumn = createSchema({tables: [
    user, comment, table('issue').columns({...issueCols, e2e_no_such_column: string().optional()}).primaryKey('id'),
  ]});
  const badTable = createSchema({tables: [
    user, comment, table('issue').columns(issueCols).primaryKey('id'),
    table('e2e_no_such_table').columns({id: string()}).primaryKey('id'),
  ]});
  for (const [what, badSchema, name] of [['unknown column', badColumn, 'e2e_no_such_column'], ['unknown table', badTable, 'e2e_no_such_table']]) {
    const z = newClient({storageKey: `bad-schema-${name}`, schema: badSchema, mutators: undefined});
    const v = materialize(z, queries.issuesByStatus({status: 'open', limit: 5}), `${what} client`);
    // the error, or (a server that accepts the schema) the view hydrated
    await waitUntil(() => z.connection.state.current.name === 'error' || v.watch.latest?.resultType === 'complete',
      `${what}: state 'error' or a hydrated view`, changeMs);
    const recs = socketsOf(z.clientID);
    const errors = recs.flatMap(s => s.errors);
    log(`${what}: error frames ${JSON.stringify(errors)}; state ${JSON.stringify(z.connection.state.current)}`);
    assert.equal(errors.length, 1, `${what}: one error frame: ${JSON.stringify(errors)}; states ${JSON.stringify(z.states)}; ` +
      `view ${v.watch.latest?.resultType} with ${v.watch.latest?.data?.length} rows; first frames:\n${recs.map(r => framesSummary(r, 6)).join('\n')}`);
    assert.equal(errors[0].kind, 'SchemaVersionNotSupported', `${what}: error kind: ${JSON.stringify(errors[0])}`);
    assert.match(errors[0].message, new RegExp(name), `${what}: the message names ${name}`);
    assert.ok(recs.every(s => !s.frames.some(f => f[0] === 'pokePart' && f[1].rowsPatch?.length)), `${what}: no rows sent`);
    // the client disables its client group before it calls onUpdateNeeded
    await waitUntil(() => z.updateNeeded.length > 0, `${what}: onUpdateNeeded called`, 5_000);
    assert.equal(z.updateNeeded.length, 1, `${what}: onUpdateNeeded called once: ${JSON.stringify(z.updateNeeded)}`);
    assert.equal(z.updateNeeded[0].type, 'SchemaVersionNotSupported', `${what}: onUpdateNeeded reason`);
    assert.equal(v.watch.latest?.resultType === 'complete', false, `${what}: the view never completes`);
    await closeClient(z);
  }
  // the server still serves a client with the right schema
  const z = newClient({storageKey: 'good-schema-after-bad'});
  const v = materialize(z, queries.issuesByStatus({status: 'open', limit: 10}), 'good client');
  const snap = await hydrated(v, 'good client');
  assertSameView(snap.data, await sqlIssuesByStatus('open', 10), 'good client after the bad ones');
  await closeClient(z);
});

test('reconnect after a server restart resumes from the cookie with a diff, not a resync', {timeout: testMs}, async () => {
  await ensureServerRunning();
  const z = newClient({storageKey: 'restart-cookie'});
  const v = materialize(z, queries.issuesByStatus({status: 'open', limit: 100}), 'open issues');
  const snap = await hydrated(v, 'hydration');
  assertSameView(snap.data, await sqlIssuesByStatus('open', 100), 'after hydration');
  const first = await nextConnectedSocket(z, 0, 'first connection');
  const viewRows = countRows(snap.data);
  assert.ok(first.rowsPatched >= viewRows, `hydration sent the view's ${viewRows} rows (${first.rowsPatched} rowsPatch entries)`);

  const halted = await server.halt({signal: 'SIGTERM'});
  log(`${server.kind} stopped: ${JSON.stringify(halted)}`);
  await waitForState(z, s => s.name !== 'connected', 'not connected while the server is down', 15_000);
  // upstream changes while the server is down: one visible title, one new comment
  const target = snap.data[5].id;
  const title = `while-down-${Date.now()}`;
  await sql`update issue set title = ${title} where id = ${target}`;
  const comment = {id: `e2e-down-${Date.now()}`, issue_id: snap.data[7].id, body: 'added while down', created: (await maxCreated('comment')) + 1};
  await sql`insert into comment ${sql(comment)}`;

  const index = sockets.length;
  await server.restart();
  log(`${server.kind} restarted`);
  const again = await nextConnectedSocket(z, index, 'reconnect after restart');
  assert.ok(again.baseCookie, `the client reconnects with its cookie (baseCookie ${JSON.stringify(again.baseCookie)})`);
  await assertNoReconnectErrors([z], index, [[v, () => sqlIssuesByStatus('open', 100)]], 'after the restart');
  const after = await viewMatchesSql(v, () => sqlIssuesByStatus('open', 100), 'after the restart');
  assert.ok(after.data.find(i => i.id === target).title === title, 'the title changed while down');
  await waitForState(z, s => s.name === 'connected', 'connected after the restart');
  await sleep(1_000); // let any further pokes of the reconnect arrive before counting
  const reconnectSockets = socketsOf(z.clientID).filter(s => sockets.indexOf(s) >= index);
  const rowsAfter = reconnectSockets.reduce((a, s) => a + s.rowsPatched, 0);
  const errors = reconnectSockets.flatMap(s => s.errors);
  log(`after the restart: ${reconnectSockets.length} socket(s), ${rowsAfter} rowsPatch entries (view has ${viewRows} rows), errors ${JSON.stringify(errors)}, clientStateNotFound ${z.clientStateNotFound}`);
  assert.deepStrictEqual(errors, [], 'no error frame on reconnect');
  assert.equal(z.clientStateNotFound, 0, 'the server found the client state (no ClientNotFound)');
  assert.ok(rowsAfter >= 2, `the 2 changes made while down were sent (${rowsAfter} rows)`);
  assert.ok(rowsAfter <= 10, `a diff, not a resync: ${rowsAfter} rows sent after the reconnect for a view of ${viewRows}\nfirst frames:\n${framesSummary(again)}`);
  await closeClient(z);
});

test('SIGTERM with clients connected: exit 0 within seconds, clients reconnect after a restart', {timeout: testMs}, async () => {
  await ensureServerRunning();
  const z1 = newClient({storageKey: 'sigterm-1'});
  const z2 = newClient({storageKey: 'sigterm-2'});
  const v1 = materialize(z1, queries.issuesByStatus({status: 'in_progress', limit: 30}), 'client 1 in_progress issues');
  const v2 = materialize(z2, queries.issuesByOwner({owner: 'u3', limit: 100}), 'client 2 issues of u3');
  const s1 = await hydrated(v1, 'client 1');
  const s2 = await hydrated(v2, 'client 2');
  assertSameView(s1.data, await sqlIssuesByStatus('in_progress', 30), 'client 1 after hydration');
  assertSameView(s2.data, await sqlIssuesByOwner('u3', 100), 'client 2 after hydration');
  const sock1 = await nextConnectedSocket(z1, 0, 'client 1');
  const sock2 = await nextConnectedSocket(z2, 0, 'client 2');

  const halted = await server.halt({signal: 'SIGTERM', graceMs: 15_000});
  log(`SIGTERM: ${JSON.stringify(halted)}; client sockets closed ${JSON.stringify([sock1.closed, sock2.closed])}, ` +
    `error frames ${JSON.stringify([...sock1.errors, ...sock2.errors])}`);
  assert.equal(halted.signal, null, `exited by itself, not killed: ${JSON.stringify(halted)}\n${server.tail(20)}`);
  assert.equal(halted.code, 0, `exit status 0: ${JSON.stringify(halted)}\n${server.tail(20)}`);
  assert.ok(halted.ms < 5_000, `exited within 5 s of SIGTERM (${halted.ms?.toFixed(0)} ms)`);
  await waitForState(z1, s => s.name !== 'connected', 'client 1 sees the disconnect', 15_000);
  await waitForState(z2, s => s.name !== 'connected', 'client 2 sees the disconnect', 15_000);
  await waitUntil(() => sock1.closed && sock2.closed, 'both sockets closed', 5_000);
  log(`after SIGTERM: socket closes ${JSON.stringify([sock1.closed, sock2.closed])}, states ${JSON.stringify([z1.states.at(-1), z2.states.at(-1)])}`);

  // a change while the server is down reaches both clients after the restart
  const t1 = s1.data[0].id;
  const t2 = s2.data[0].id;
  await sql`update issue set title = ${'after-sigterm-1'} where id = ${t1}`;
  await sql`update issue set title = ${'after-sigterm-2'} where id = ${t2}`;
  const index = sockets.length;
  await server.restart();
  await nextConnectedSocket(z1, index, 'client 1 reconnect');
  await nextConnectedSocket(z2, index, 'client 2 reconnect');
  await assertNoReconnectErrors([z1, z2], index,
    [[v1, () => sqlIssuesByStatus('in_progress', 30)], [v2, () => sqlIssuesByOwner('u3', 100)]], 'after the restart');
  await waitForState(z1, s => s.name === 'connected', 'client 1 connected again');
  await waitForState(z2, s => s.name === 'connected', 'client 2 connected again');
  await viewMatchesSql(v1, () => sqlIssuesByStatus('in_progress', 30), 'client 1 after the restart');
  await viewMatchesSql(v2, () => sqlIssuesByOwner('u3', 100), 'client 2 after the restart');
  assert.equal(v1.watch.latest.data.find(i => i.id === t1).title, 'after-sigterm-1', 'client 1 got the change made while down');
  assert.equal(v2.watch.latest.data.find(i => i.id === t2).title, 'after-sigterm-2', 'client 2 got the change made while down');
  const title = `after-restart-${Date.now()}`;
  await mutateOk(z1, mutators.issue.setTitle({id: t2, title}), 'mutation after the restart');
  await v2.watch.waitFor(s => s.data.find(i => i.id === t2)?.title === title, "client 2 sees client 1's mutation", changeMs);
  await viewMatchesSql(v2, () => sqlIssuesByOwner('u3', 100), 'client 2 at the end');
  // zero-cache drains on SIGTERM: it closes the client sockets itself (a clean close, code 1005, no
  // error frame) before it exits, rather than leaving them to die with the process (1006)
  assert.deepStrictEqual([sock1.errors, sock2.errors], [[], []], 'no error frame on SIGTERM');
  assert.ok(sock1.closed.wasClean && sock2.closed.wasClean, `clean closes on SIGTERM: ${JSON.stringify([sock1.closed, sock2.closed])}`);
  await closeClient(z1);
  await closeClient(z2);
});

test('a new auth token (updateAuth) has the named queries transformed again with it', {timeout: testMs}, async () => {
  const newest = async n => (await sql`
    select id from issue where owner_id = 'u5' order by created desc, id collate "C" limit ${n}`).map(r => r.id);
  const z = newClient({storageKey: 'auth', userID: 'u5', auth: 'u5', context: {userID: 'u5'}});
  const v = materialize(z, queries.issuesOfViewer(), 'issues of the viewer');
  const snap = await hydrated(v, 'viewer query');
  const first20 = await newest(20);
  assert.deepStrictEqual(snap.data.map(i => i.id), first20, "the view holds u5's 20 newest issues");
  await waitForStore(z, 'issue', first20, "u5's 20 newest issues in the store");
  await waitForState(z, s => s.name === 'connected', 'connected');

  // a new token of the same user on the open connection: the server asks the app server again,
  // with the new token, and the store follows what the query now means (40 issues)
  const queryCalls = app.calls.query;
  const index = sockets.length;
  await z.connection.connect({auth: 'u5:more'});
  await waitForStore(z, 'issue', await newest(40), "after updateAuth: u5's 40 newest issues");
  assert.ok(app.calls.query > queryCalls, 'the query was transformed again');
  assert.equal(sockets.length, index, 'on the same socket (no reconnect)');
  await closeClient(z);
});
