// End-to-end tests of the legacy Zero features (spec: /work/shared/legacy-features.md): JWT auth
// against ZERO_AUTH_SECRET, row permissions deployed upstream, ad-hoc ZQL queries, CRUD mutators,
// the per-client-group mutation rate limit and the inspector. The real @rocicorp/zero 1.9.0 client
// (schema with enableLegacyQueries/enableLegacyMutators) against the sync server under test
// (E2E_SERVER=zcache|zero-cache) with no app server at all (no query/mutate URLs).
//
// One PostgreSQL; server A (JWT secret, admin password) runs the tests up to the inspector, then is
// stopped; server B (the same plus ZERO_PER_USER_MUTATION_LIMIT_MAX=2) runs the rate limit and,
// last, the `alg: none` token (which crashes zero-cache 1.9.0, see that test). The tests run in
// order and build on each other's state (client A's view, the deployed permissions).
import {sockets, socketsOf} from '../lib/wsspy.mjs';
import {test, before, after} from 'node:test';
import assert from 'node:assert/strict';
import postgres from 'postgres';
import {Zero} from '@rocicorp/zero';
import {startPostgres, sqlOptions} from '../lib/pg.mjs';
import {preflightServer, startServer} from '../lib/server.mjs';
import {legacySchema, compilePermissions, deployPermissions, deployOwnerPermissionsWithCli, signHS256, unsignedJwt} from '../lib/legacy.mjs';
import {plain, watchView, withTimeout} from '../lib/view.mjs';
import {sleep} from '../lib/proc.mjs';

const kind = process.env.E2E_SERVER || 'zcache';
const SECRET = 'e2e-legacy-secret';
const ADMIN_PASSWORD = 'e2e'; // lib/server.mjs sets it for zero-cache; passed in env for zcache too
const hydrateMs = 60_000; // first hydration (and the permissions row replicating) on a 2-core machine
const changeMs = 30_000; // a permissions UPDATE or a mutation reaching a view
const stateMs = 20_000; // a connection state change
const testMs = 120_000; // whole-test ceiling
const viewLimit = 20;

let pg, sql, serverA, serverB;
const clients = new Set();
let storageKeys = 0;

function log(msg) {
  const at = (performance.now() / 1000).toFixed(1);
  console.log(`[e2e ${kind} legacy +${at}s] ${msg}`);
}

function diag() {
  return [serverA, serverB].filter(s => s?.proc).map(s => `${s.kind} (${s.appId}) output tail:\n${s.tail(15)}`).join('\n');
}

const now = () => Math.floor(Date.now() / 1000);
const tokenFor = (sub, extra = {}) => signHS256({sub, exp: now() + 3600, ...extra}, SECRET);

/**
 * A Zero client with the legacy schema and an in-memory store; every client gets its own storage
 * key and so its own client group. `z.states` records every connection state.
 */
function newClient(server, {userID, auth} = {}) {
  const z = new Zero({
    server: server.url, schema: legacySchema, kvStore: 'mem', logLevel: 'error',
    ...(userID ? {userID} : {}), ...(auth ? {auth} : {}),
    storageKey: `legacy-${++storageKeys}`,
    onUpdateNeeded: r => z.updateNeeded.push(r),
    onClientStateNotFound: () => z.clientStateNotFound++,
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

function waitForState(z, name, what, ms = stateMs) {
  let unsubscribe = null;
  const hit = new Promise(resolve => {
    if (z.connection.state.current.name === name) return resolve(z.connection.state.current);
    unsubscribe = z.connection.state.subscribe(s => {
      if (s.name === name) resolve(s);
    });
  });
  return withTimeout(hit, ms, `connection state '${name}': ${what}`,
    () => `states so far: ${JSON.stringify(z.states)}\nsockets: ${JSON.stringify(socketsOf(z.clientID).map(s => ({errors: s.errors, closed: s.closed})))}\n${diag()}`)
    .finally(() => unsubscribe?.());
}

async function waitUntil(pred, what, ms) {
  const deadline = Date.now() + ms;
  while (!(await pred())) {
    if (Date.now() > deadline) assert.fail(`${what}: not within ${ms} ms\n${diag()}`);
    await sleep(50);
  }
}

/** Materializes a query; `history` keeps every snapshot (to see optimistic rows that come and go). */
function materialize(query, label) {
  const view = query.materialize();
  const watch = watchView(view, label, diag);
  const history = [];
  view.addListener(data => history.push(plain(data)));
  return {view, watch, history};
}

// the legacy view of tests 1-2: the newest open issues (ZQL completes orderBy with the primary key)
const openIssuesQuery = z => z.query.issue.where('status', 'open').orderBy('created', 'desc').limit(viewLimit);

/** The same in SQL, for the issues readable by `owner` (null: every issue). */
async function sqlOpenIssues(owner) {
  const rows = owner === null
    ? await sql`select id, title, status, priority, created, owner_id from issue
        where status = 'open' order by created desc, id collate "C" limit ${viewLimit}`
    : await sql`select id, title, status, priority, created, owner_id from issue
        where status = 'open' and owner_id = ${owner} order by created desc, id collate "C" limit ${viewLimit}`;
  return plain(rows);
}

/** Waits until the view equals `expected()` (re-evaluated on each update), then asserts equality. */
async function viewEqualsSql(v, expectedFn, what, ms = changeMs) {
  let expected = await expectedFn();
  const ids = rows => JSON.stringify(rows.map(r => r.id));
  await v.watch.waitFor(s => s.resultType === 'complete' && ids(s.data) === ids(expected),
    `${what}: the ids of SQL (${expected.length} rows, first ${expected[0]?.id})`, ms);
  expected = await expectedFn();
  assert.deepStrictEqual(v.watch.latest.data, expected, `${what}: whole view equals SQL`);
  return v.watch.latest.data;
}

/** The highest lastMutationIDChanges[clientID] the client received in pokes. */
function confirmedLmid(z) {
  let lmid = 0;
  for (const s of socketsOf(z.clientID)) {
    for (const [tag, body] of s.frames) {
      const n = tag === 'pokePart' ? body?.lastMutationIDChanges?.[z.clientID] : undefined;
      if (n !== undefined && n > lmid) lmid = n;
    }
  }
  return lmid;
}

async function upstreamLmid(server, z) {
  const rows = await sql`select "lastMutationID" as lmid from ${sql(`${server.appId}_0`)}.clients where "clientID" = ${z.clientID}`;
  return rows.length ? Number(rows[0].lmid) : 0;
}

/** Waits for the server's confirmation of mutation `lmid` (a poke with lastMutationIDChanges). */
async function waitConfirmed(z, lmid, what) {
  await waitUntil(() => confirmedLmid(z) >= lmid, `${what}: poke with lastMutationIDChanges {${z.clientID}: ${lmid}}`, changeMs);
  assert.equal(confirmedLmid(z), lmid, `${what}: confirmed mutation id`);
}

const errorsOf = z => socketsOf(z.clientID).flatMap(s => s.errors);
const lastSocket = z => socketsOf(z.clientID).at(-1);

async function issueRow(id) {
  const rows = await sql`select id, title, status, priority, created, owner_id from issue where id = ${id}`;
  return rows.length ? plain(rows[0]) : null;
}

async function maxCreated() {
  const [{m}] = await sql`select max(created) as m from issue`;
  return Number(m);
}

function legacyEnv(extra = {}) {
  return {ZERO_AUTH_SECRET: SECRET, ZERO_ADMIN_PASSWORD: ADMIN_PASSWORD, ...extra};
}

let cliHash = null; // the hash of the 'owner' permissions as the real zero-deploy-permissions wrote them

async function startLegacyServer(env, label) {
  const t = performance.now();
  const server = await startServer({pgUrl: pg.url, appUrl: null, env});
  // the first deployment with the real CLI, the later ones with its UPDATE statement (test 2 checks
  // that both give the same JSON, i.e. the same hash)
  const out = await deployOwnerPermissionsWithCli(pg.url, server.appId);
  const [{hash}] = await sql`select hash from ${sql(server.appId)}.permissions`;
  assert.match(out, new RegExp(`Deployed new permissions \\(hash=${hash.slice(0, 7)}\\)`), `zero-deploy-permissions output:\n${out}`);
  cliHash ??= hash;
  log(`${label}: ${kind} ready on port ${server.port} after ${(performance.now() - t).toFixed(0)} ms ` +
    `(app id ${server.appId}, env ${JSON.stringify(env)}), 'owner' permissions deployed (hash ${hash})`);
  return server;
}

before(async () => {
  preflightServer();
  const t = performance.now();
  pg = await startPostgres();
  log(`PostgreSQL on port ${pg.port} seeded in ${(performance.now() - t).toFixed(0)} ms`);
  sql = postgres(pg.url, sqlOptions());
  serverA = await startLegacyServer(legacyEnv(), 'server A');
});

after(async () => {
  const steps = [
    ['close clients', clients.size > 0, () => Promise.all([...clients].map(z => z.close()))],
    ['stop server A', serverA, () => serverA.stop()],
    ['stop server B', serverB, () => serverB.stop()],
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

let zA, vA; // client A: user u1 with a valid token, the open-issues view (tests 1 to 4 and 7)

function needA() {
  if (!zA || vA?.watch.latest?.resultType !== 'complete') throw new Error('client A has no hydrated view (test 1 failed), so this test cannot run');
}

test('select rule owner_id = authData.sub: u1 and u2 see their own issues, anonymous sees none', {timeout: testMs}, async () => {
  // the rule must make a difference: the newest open issues overall are not all u1's
  const all = await sqlOpenIssues(null);
  assert.equal(all.length, viewLimit);
  assert.ok(all.filter(r => r.owner_id !== 'u1').length >= viewLimit - 1, 'the unrestricted view is mostly other owners');
  const u1 = await sqlOpenIssues('u1');
  assert.equal(u1.length, viewLimit, 'u1 has enough open issues for the view');
  assert.ok(u1.every(r => r.owner_id === 'u1'));

  let t = performance.now();
  zA = newClient(serverA, {userID: 'u1', auth: tokenFor('u1')});
  vA = materialize(openIssuesQuery(zA), 'client A (u1)');
  await viewEqualsSql(vA, () => sqlOpenIssues('u1'), 'u1 with a valid token', hydrateMs);
  log(`client A (u1) sees its ${viewLimit} issues after ${(performance.now() - t).toFixed(0)} ms`);

  t = performance.now();
  const zB = newClient(serverA, {userID: 'u2', auth: tokenFor('u2')});
  const vB = materialize(openIssuesQuery(zB), 'client B (u2)');
  const rowsB = await viewEqualsSql(vB, () => sqlOpenIssues('u2'), 'u2 with a valid token', hydrateMs);
  assert.ok(rowsB.length > 0 && rowsB.every(r => r.owner_id === 'u2'), 'u2 sees only u2 rows');
  assert.notEqual(await zB.clientGroupID, await zA.clientGroupID, 'distinct client groups');
  log(`client B (u2) sees its ${rowsB.length} issues after ${(performance.now() - t).toFixed(0)} ms`);

  // anonymous (no userID, no token): connects, but authData.sub is null, so the rule matches no row
  const zAnon = newClient(serverA);
  const vAnon = materialize(openIssuesQuery(zAnon), 'anonymous client');
  const snap = await vAnon.watch.waitFor(s => s.resultType === 'complete', "resultType 'complete'", hydrateMs);
  assert.deepStrictEqual(snap.data, [], 'anonymous sees no issue');
  assert.equal(zAnon.connection.state.current.name, 'connected', 'anonymous is connected');
  assert.deepStrictEqual(errorsOf(zAnon), [], 'no error frame for anonymous');
  // the anonymous view stays empty while the others have rows (no late rows arrive)
  await sleep(500);
  assert.deepStrictEqual(vAnon.watch.latest.data, [], 'anonymous still sees no issue');
  await closeClient(zB);
  await closeClient(zAnon);
});

test('a permissions UPDATE upstream changes what a live client sees, without a reconnect', {timeout: testMs}, async () => {
  needA();
  const socketsBefore = socketsOf(zA.clientID).length;
  const sock = lastSocket(zA);
  assert.equal(sock.closed, null, 'client A socket open');

  let hash = await deployPermissions(sql, serverA.appId, await compilePermissions('all'));
  log(`'all' permissions deployed (hash ${hash})`);
  const allRows = await viewEqualsSql(vA, () => sqlOpenIssues(null), "after the UPDATE to 'all' (select ANYONE_CAN)");
  assert.ok(allRows.some(r => r.owner_id !== 'u1'), 'rows of other owners arrived');

  hash = await deployPermissions(sql, serverA.appId, await compilePermissions('owner'));
  log(`'owner' permissions deployed again (hash ${hash})`);
  assert.equal(hash, cliHash, "the UPDATE statement wrote the same JSON as zero-deploy-permissions");
  const ownRows = await viewEqualsSql(vA, () => sqlOpenIssues('u1'), "after the UPDATE back to 'owner'");
  assert.ok(ownRows.every(r => r.owner_id === 'u1'), 'the rows of other owners left');

  assert.equal(socketsOf(zA.clientID).length, socketsBefore, 'no new socket (no reconnect)');
  assert.equal(sock.closed, null, 'the socket stayed open');
  assert.deepStrictEqual(sock.errors, [], 'no error frame');
  assert.equal(zA.connection.state.current.name, 'connected');
});

test('CRUD insert, update and delete from z.mutate.issue reach PostgreSQL and are confirmed', {timeout: testMs}, async () => {
  needA();
  const id = `leg-crud-${Date.now()}`;
  const row = {id, title: 'inserted by CRUD', status: 'open', priority: 3, created: (await maxCreated()) + 1000, owner_id: 'u1'};
  let lmid = confirmedLmid(zA);

  // insert: in 1.9.0 a CRUD mutator returns a plain Promise (resolved once the optimistic write is
  // in the client store), not the {client, server} pair of custom mutators; the server's outcome
  // reaches the client only as lastMutationIDChanges in a poke
  const p = zA.mutate.issue.insert(row);
  assert.equal(typeof p?.then, 'function', 'insert returns a promise');
  assert.equal(p.server, undefined, '1.9.0 CRUD mutators have no .server promise');
  await withTimeout(p, changeMs, 'insert: local write');
  assert.deepStrictEqual(vA.watch.latest.data[0], row, 'optimistic row at the top of the view');
  await waitConfirmed(zA, ++lmid, 'insert');
  assert.deepStrictEqual(await issueRow(id), row, 'inserted row in PostgreSQL');
  assert.equal(await upstreamLmid(serverA, zA), lmid, 'upstream clients.lastMutationID after insert');
  await viewEqualsSql(vA, () => sqlOpenIssues('u1'), 'view after the confirmed insert');

  // update
  await withTimeout(zA.mutate.issue.update({id, title: 'updated by CRUD', priority: 4}), changeMs, 'update: local write');
  assert.equal(vA.watch.latest.data[0].title, 'updated by CRUD', 'optimistic update in the view');
  await waitConfirmed(zA, ++lmid, 'update');
  assert.deepStrictEqual(await issueRow(id), {...row, title: 'updated by CRUD', priority: 4}, 'updated row in PostgreSQL');
  await viewEqualsSql(vA, () => sqlOpenIssues('u1'), 'view after the confirmed update');

  // upsert of the existing row (an update for the authorizer, INSERT ... ON CONFLICT DO UPDATE in SQL)
  await withTimeout(zA.mutate.issue.upsert({...row, title: 'upserted by CRUD'}), changeMs, 'upsert: local write');
  await waitConfirmed(zA, ++lmid, 'upsert');
  assert.deepStrictEqual(await issueRow(id), {...row, title: 'upserted by CRUD'}, 'upserted row in PostgreSQL');

  // delete
  await withTimeout(zA.mutate.issue.delete({id}), changeMs, 'delete: local write');
  assert.ok(!vA.watch.latest.data.some(r => r.id === id), 'optimistic delete in the view');
  await waitConfirmed(zA, ++lmid, 'delete');
  assert.equal(await issueRow(id), null, 'row deleted in PostgreSQL');
  assert.equal(await upstreamLmid(serverA, zA), lmid, 'upstream clients.lastMutationID after delete');
  await viewEqualsSql(vA, () => sqlOpenIssues('u1'), 'view after the confirmed delete');
  assert.deepStrictEqual(errorsOf(zA), [], 'no error frame');
});

test('denied CRUD writes are skipped upstream and reverted on the client', {timeout: testMs}, async () => {
  needA();
  let lmid = confirmedLmid(zA);
  const stamp = Date.now();

  // (a) insert of an issue owned by u2 (insert rule owner_id = sub fails after the mutation)
  const foreign = {id: `leg-deny-${stamp}`, title: 'u1 inserting for u2', status: 'open', priority: 1, created: (await maxCreated()) + 1000, owner_id: 'u2'};
  const vOne = materialize(zA.query.issue.where('id', foreign.id), `client A: issue ${foreign.id}`);
  await vOne.watch.waitFor(s => s.resultType === 'complete' && s.data.length === 0, 'empty before the insert', hydrateMs);
  await withTimeout(zA.mutate.issue.insert(foreign), changeMs, 'denied insert: local write');
  assert.ok(vOne.history.some(d => d.length === 1 && d[0].owner_id === 'u2'), 'the optimistic row was in the view');
  await waitConfirmed(zA, ++lmid, 'denied insert (lmid still bumped)');
  await vOne.watch.waitFor(s => s.data.length === 0, 'the optimistic row reverted', changeMs);
  assert.equal(await issueRow(foreign.id), null, 'the denied insert did not reach PostgreSQL');

  // (b) update of an own issue giving it to u2 (postMutation owner_id = sub fails)
  const own = (await sqlOpenIssues('u1'))[0];
  const vOwn = materialize(zA.query.issue.where('id', own.id), `client A: issue ${own.id}`);
  await vOwn.watch.waitFor(s => s.resultType === 'complete' && s.data[0]?.owner_id === 'u1', 'own issue hydrated', hydrateMs);
  await withTimeout(zA.mutate.issue.update({id: own.id, owner_id: 'u2', title: 'given away'}), changeMs, 'denied update: local write');
  assert.ok(vOwn.history.some(d => d[0]?.owner_id === 'u2' && d[0]?.title === 'given away'), 'the optimistic update was in the view');
  await waitConfirmed(zA, ++lmid, 'denied update (lmid still bumped)');
  const reverted = await vOwn.watch.waitFor(s => s.data[0]?.owner_id === 'u1', 'the optimistic update reverted', changeMs);
  assert.deepStrictEqual(reverted.data, [own], 'own issue as before');
  assert.deepStrictEqual(await issueRow(own.id), own, 'PostgreSQL unchanged');

  // (c) update and delete of u2's issue (preMutation owner_id = sub fails; client A cannot even see it)
  const [theirs] = await sqlOpenIssues('u2');
  await withTimeout(zA.mutate.issue.update({id: theirs.id, title: 'hijacked'}), changeMs, 'update of u2 row: local write');
  await waitConfirmed(zA, ++lmid, "denied update of u2's row");
  await withTimeout(zA.mutate.issue.delete({id: theirs.id}), changeMs, 'delete of u2 row: local write');
  await waitConfirmed(zA, ++lmid, "denied delete of u2's row");
  assert.deepStrictEqual(await issueRow(theirs.id), theirs, "u2's row untouched in PostgreSQL");

  // (d) insert into comment, which has no rules at all
  const comment = {id: `leg-c-${stamp}`, issue_id: own.id, body: 'no rules', created: 1};
  const vC = materialize(zA.query.comment.where('id', comment.id), `client A: comment ${comment.id}`);
  await vC.watch.waitFor(s => s.resultType === 'complete', 'comment view hydrated', hydrateMs);
  await withTimeout(zA.mutate.comment.insert(comment), changeMs, 'comment insert: local write');
  assert.ok(vC.history.some(d => d.length === 1 && d[0].id === comment.id), 'the optimistic comment was in the view');
  await waitConfirmed(zA, ++lmid, 'denied comment insert');
  await vC.watch.waitFor(s => s.data.length === 0, 'the optimistic comment reverted', changeMs);
  assert.equal((await sql`select count(*)::int as n from comment where id = ${comment.id}`)[0].n, 0, 'no comment in PostgreSQL');

  // a denial is not an error: no error frame, still connected, lmid bumped upstream for each
  assert.deepStrictEqual(errorsOf(zA), [], 'no error frame for denied writes');
  assert.equal(zA.connection.state.current.name, 'connected');
  assert.equal(await upstreamLmid(serverA, zA), lmid, 'upstream lastMutationID counts the denied mutations');
  for (const v of [vOne, vOwn, vC]) v.view.destroy();
  await viewEqualsSql(vA, () => sqlOpenIssues('u1'), 'client A view unchanged by the denied writes');
});

// zero-cache 1.9.0 (spec §1.4): AuthInvalidated, message `Failed to decode auth token: <jose error>`,
// error frame then close(3000, message); the client goes to needs-auth and does not retry.
const badTokens = [
  ['expired', () => signHS256({sub: 'u1', exp: now() - 60}, SECRET),
    'Failed to decode auth token: JWTExpired: "exp" claim timestamp check failed'],
  ['bad signature', () => signHS256({sub: 'u1', exp: now() + 3600}, SECRET + '-wrong'),
    'Failed to decode auth token: JWSSignatureVerificationFailed: signature verification failed'],
  ['wrong user (sub u2, userID u1)', () => tokenFor('u2'),
    'Failed to decode auth token: JWTClaimValidationFailed: unexpected "sub" claim value'],
];

for (const [name, makeToken, message] of badTokens) {
  test(`token ${name}: AuthInvalidated, close 3000, needs-auth; connect() with a good token recovers`, {timeout: testMs}, async () => {
    const z = newClient(serverA, {userID: 'u1', auth: makeToken()});
    const v = materialize(openIssuesQuery(z), `client with token ${name}`);
    const state = await waitForState(z, 'needs-auth', `token ${name}`);
    const [sock] = socketsOf(z.clientID);
    await waitUntil(() => sock.closed, 'the server closes the socket', 5_000);
    log(`token ${name}: state ${JSON.stringify(state)}; frames ${JSON.stringify(sock.frames)}; close ${JSON.stringify(sock.closed)}`);
    assert.deepStrictEqual(sock.errors, [{kind: 'AuthInvalidated', message, origin: 'zeroCache'}], 'the error frame');
    assert.equal(sock.connected, false, 'no connected frame');
    assert.equal(sock.closed.code, 3000, 'close code');
    assert.equal(sock.closed.reason, message, 'close reason = the message');
    // the public state carries the server's message, not the kind
    assert.deepStrictEqual(plain(state), {name: 'needs-auth', reason: {type: 'zero-cache', reason: message}}, 'client state');
    assert.equal(v.watch.latest?.resultType ?? 'unknown', 'unknown', 'the view never completed');
    await sleep(1000);
    assert.equal(socketsOf(z.clientID).length, 1, 'no retry while in needs-auth');
    assert.equal(z.connection.state.current.name, 'needs-auth', 'still needs-auth');

    // the app supplies a new token: the client connects and the view hydrates under u1's rules
    await z.connection.connect({auth: tokenFor('u1')});
    await waitForState(z, 'connected', 'after connect() with a valid token');
    await viewEqualsSql(v, () => sqlOpenIssues('u1'), `after recovering from token ${name}`, hydrateMs);
    assert.deepStrictEqual(lastSocket(z).errors, [], 'no error frame on the new socket');
    await closeClient(z);
  });
}

/**
 * A raw connect (no Zero client) with the client's URL and Sec-WebSocket-Protocol encoding (spec
 * §1.3); resolves with the frames received and how the socket closed.
 */
async function rawConnect(server, {clientID, clientGroupID, userID, auth}) {
  const {WebSocket} = await import('ws');
  const params = new URLSearchParams({clientID, clientGroupID, baseCookie: '', ts: String(Date.now()), lmid: '0', wsid: `w-${clientID}`});
  if (userID) params.set('userID', userID);
  const proto = encodeURIComponent(Buffer.from(JSON.stringify({
    initConnectionMessage: ['initConnection', {desiredQueriesPatch: []}], ...(auth ? {authToken: auth} : {}),
  })).toString('base64'));
  const ws = new WebSocket(`${server.url.replace('http', 'ws')}/sync/v51/connect?${params}`, proto);
  const frames = [];
  ws.on('message', d => frames.push(JSON.parse(String(d))));
  ws.on('error', () => {});
  const closed = await withTimeout(new Promise(r => ws.on('close', (code, reason) => r({code, reason: String(reason)}))),
    stateMs, `close of the raw connection ${clientID}`, () => `frames ${JSON.stringify(frames)}\n${diag()}`);
  return {frames, closed};
}

test('token without a userID (raw connect): Unauthorized, close 3000', {timeout: testMs}, async () => {
  // the client itself refuses auth without a userID, hence a raw connect
  const {frames, closed} = await rawConnect(serverA, {clientID: 'raw-nouser', clientGroupID: `cg-raw-${Date.now()}`, auth: tokenFor('u1')});
  log(`token without userID: frames ${JSON.stringify(frames)}, close ${JSON.stringify(closed)}`);
  const message = 'Authenticated connections require a userID.';
  assert.deepStrictEqual(frames, [['error', {kind: 'Unauthorized', message, origin: 'zeroCache'}]]);
  assert.deepStrictEqual(closed, {code: 3000, reason: message});
});

test("another user, or anonymous, joining client A's group (pinned to u1): Unauthorized, close 3000", {timeout: testMs}, async () => {
  needA();
  const clientGroupID = await zA.clientGroupID;
  const message = 'Client groups are pinned to a single userID. Connection userID does not match existing client group userID.';
  for (const [who, opts] of [['u2 with a valid token', {userID: 'u2', auth: tokenFor('u2')}], ['anonymous', {}]]) {
    const {frames, closed} = await rawConnect(serverA, {clientID: `raw-pin-${who.slice(0, 2)}`, clientGroupID, ...opts});
    log(`${who} joining a u1 group: frames ${JSON.stringify(frames)}, close ${JSON.stringify(closed)}`);
    assert.deepStrictEqual(frames, [['error', {kind: 'Unauthorized', message, origin: 'zeroCache'}]], `${who}: the error frame`);
    assert.deepStrictEqual(closed, {code: 3000, reason: message}, `${who}: the close`);
  }
  // client A is untouched
  await sleep(300);
  assert.equal(lastSocket(zA).closed, null, 'client A socket still open');
  assert.deepStrictEqual(errorsOf(zA), [], 'no error frame for client A');
});

test('updateAuth: a newer valid token is taken silently; an expired one gets AuthInvalidated and a close with no status (1005)', {timeout: testMs}, async () => {
  const z = newClient(serverA, {userID: 'u1', auth: tokenFor('u1')});
  const v = materialize(openIssuesQuery(z), 'updateAuth client');
  await viewEqualsSql(v, () => sqlOpenIssues('u1'), 'updateAuth client hydrated', hydrateMs);
  const sock = lastSocket(z);
  const updates = () => sock.frames.length;

  // connect() while connected sends ["updateAuth", {auth}]; a valid token (newer iat) is accepted
  await sleep(1100); // a strictly newer iat (seconds)
  const framesBefore = updates();
  await z.connection.connect({auth: tokenFor('u1')});
  await sleep(1000);
  assert.equal(sock.closed, null, 'still open after a valid updateAuth');
  assert.deepStrictEqual(sock.errors, [], 'no error frame after a valid updateAuth');
  assert.equal(z.connection.state.current.name, 'connected');
  log(`valid updateAuth: ${updates() - framesBefore} frames after it`);

  // an expired token: fatal, error frame then ws.close() without a status
  const expiredMsg = 'Failed to decode auth token: JWTExpired: "exp" claim timestamp check failed';
  await z.connection.connect({auth: signHS256({sub: 'u1', exp: now() - 60}, SECRET)});
  const state = await waitForState(z, 'needs-auth', 'after updateAuth with an expired token');
  await waitUntil(() => sock.closed, 'the server closes the socket', 5_000);
  log(`expired updateAuth: errors ${JSON.stringify(sock.errors)}, close ${JSON.stringify(sock.closed)}, state ${JSON.stringify(state)}`);
  assert.deepStrictEqual(sock.errors, [{kind: 'AuthInvalidated', message: expiredMsg, origin: 'zeroCache'}], 'the error frame');
  assert.equal(sock.closed.code, 1005, 'close with no status');
  assert.deepStrictEqual(plain(state), {name: 'needs-auth', reason: {type: 'zero-cache', reason: expiredMsg}}, 'client state');

  await z.connection.connect({auth: tokenFor('u1')});
  await waitForState(z, 'connected', 'after connect() with a valid token');
  await viewEqualsSql(v, () => sqlOpenIssues('u1'), 'after recovering from the expired updateAuth', hydrateMs);
  await closeClient(z);
});

test('a CRUD write PostgreSQL rejects: MutationFailed, lmid bumped, reverted; the client reconnects by itself', {timeout: testMs}, async () => {
  const z = newClient(serverA, {userID: 'u1', auth: tokenFor('u1')});
  const id = `leg-pgerr-${Date.now()}`;
  const v = materialize(z.query.issue.where('id', id), `issue ${id}`);
  await v.watch.waitFor(s => s.resultType === 'complete', 'hydrated', hydrateMs);
  const sock = lastSocket(z);
  // the client does not check value types; PostgreSQL refuses 'abc' for an int column
  await withTimeout(z.mutate.issue.insert({id, title: 'bad priority', priority: 'abc', owner_id: 'u1'}), changeMs, 'insert: local write');
  assert.ok(v.history.some(d => d.length === 1 && d[0].id === id), 'the optimistic row was in the view');
  await waitUntil(() => sock.errors.length > 0, 'an error frame', changeMs);
  await waitConfirmed(z, 1, 'the failed mutation (lmid still bumped)');
  await v.watch.waitFor(s => s.data.length === 0, 'the optimistic row reverted', changeMs);
  log(`PG error: errors ${JSON.stringify(sock.errors)}, close ${JSON.stringify(sock.closed)}`);
  assert.deepStrictEqual(sock.errors, [{kind: 'MutationFailed', message: 'PostgresError: invalid input syntax for type integer: "abc"', origin: 'zeroCache'}]);
  // The server treats MutationFailed as transient and keeps the socket, but the 1.9.0 client closes
  // it itself on every error frame other than MutationRateLimited (zero.js #handleErrorMessage ->
  // #disconnect: close() with no code, i.e. 1005, state 'connecting') and reconnects at once; the
  // spec's "no state change" holds only for the terminal states (no 'error', no 'needs-auth').
  await waitUntil(() => socketsOf(z.clientID).length >= 2 && lastSocket(z).connected, 'the client reconnects', changeMs);
  await waitForState(z, 'connected', 'after the reconnect');
  assert.equal(sock.closed?.code, 1005, 'the first socket closed by the client with no status');
  const names = z.states.map(st => st.name);
  assert.ok(names.includes('connecting', names.indexOf('connected')), `states: ${JSON.stringify(names)}`);
  assert.ok(!names.includes('error') && !names.includes('needs-auth'), `no terminal state: ${JSON.stringify(names)}`);
  assert.deepStrictEqual(lastSocket(z).errors, [], 'no error frame on the new socket');
  assert.equal(await issueRow(id), null, 'nothing in PostgreSQL');
  assert.equal(await upstreamLmid(serverA, z), 1, 'upstream lastMutationID bumped');
  // the next mutation on the same connection works
  const ok = {id: `${id}-ok`, title: 'good', status: 'closed', priority: 1, created: 1, owner_id: 'u1'};
  await withTimeout(z.mutate.issue.insert(ok), changeMs, 'second insert: local write');
  await waitConfirmed(z, 2, 'the next mutation');
  assert.deepStrictEqual(await issueRow(ok.id), ok, 'the next insert reached PostgreSQL');
  await sql`delete from issue where id = ${ok.id}`;
  await closeClient(z);
});

test('inspector: unauthenticated ops get authenticated:false, wrong password false, right one true, then version/queries/metrics', {timeout: testMs}, async () => {
  needA();
  // Node has no DOM: the inspector's password prompt falls back to the global prompt()
  const prompts = [];
  let promptAnswer = null;
  globalThis.prompt = msg => {
    prompts.push(msg);
    return promptAnswer;
  };
  try {
    const sock = lastSocket(zA);
    const inspectFrames = () => sock.frames.filter(([tag]) => tag === 'inspect').map(([, b]) => b);

    // (1) an op before authentication: the server answers authenticated:false, the client prompts
    // (answer: none) and gives up
    await assert.rejects(withTimeout(zA.inspector.serverVersion(), stateMs, 'serverVersion before authenticating'), /Authentication failed/);
    assert.deepStrictEqual(prompts, ['Enter password:'], 'the client prompted once');
    let replies = inspectFrames();
    assert.equal(replies.length, 1, `one inspect reply: ${JSON.stringify(replies)}`);
    assert.equal(replies[0].op, 'authenticated');
    assert.equal(replies[0].value, false, 'version before authenticating: authenticated:false');
    assert.equal(typeof replies[0].id, 'string');

    // (2) metrics before authentication too
    await assert.rejects(withTimeout(zA.inspector.metrics(), stateMs, 'metrics before authenticating'), /Authentication failed/);
    replies = inspectFrames();
    assert.deepStrictEqual(replies.slice(1).map(r => [r.op, r.value]), [['authenticated', false]], 'metrics before authenticating');
    assert.equal(prompts.length, 2, 'the client prompted again');

    // (3) wrong password, (4) right password
    assert.equal(await withTimeout(zA.inspector.authenticate('not-' + ADMIN_PASSWORD), stateMs, 'authenticate (wrong)'), false, 'wrong password');
    assert.equal(await withTimeout(zA.inspector.authenticate(ADMIN_PASSWORD), stateMs, 'authenticate (right)'), true, 'right password');
    replies = inspectFrames();
    assert.deepStrictEqual(replies.slice(2).map(r => [r.op, r.value]), [['authenticated', false], ['authenticated', true]]);

    // (5) version
    const version = await withTimeout(zA.inspector.serverVersion(), stateMs, 'serverVersion');
    assert.equal(version, '1.9.0', 'server version');

    // (6) the group's queries: the open-issues view with its row count
    const qs = await withTimeout(zA.inspector.clientGroup.queries(), stateMs, 'clientGroup.queries');
    log(`inspector queries: ${JSON.stringify(qs.map(q => ({id: q.id, clientID: q.clientID, zql: q.serverZQL, rowCount: q.rowCount, got: q.got, ttl: q.ttl, deleted: q.deleted, hydrateServer: q.hydrateServer})))}`);
    const open = qs.filter(q => q.serverZQL?.includes("'open'") && !q.deleted);
    assert.equal(open.length, 1, 'one open-issues query of client A');
    assert.equal(open[0].clientID, zA.clientID, 'its client');
    assert.equal(open[0].got, true, 'got');
    assert.equal(open[0].rowCount, viewLimit, 'row count of the open-issues query');
    assert.equal(open[0].serverZQL, open[0].clientZQL, 'server AST = the client AST');
    const mine = await withTimeout(zA.inspector.client.queries(), stateMs, 'client.queries');
    assert.ok(mine.some(q => q.id === open[0].id), 'client.queries has it too');

    // (7) metrics: server digests, with at least one hydration recorded
    const metrics = await withTimeout(zA.inspector.metrics(), stateMs, 'metrics');
    const hydr = metrics['query-materialization-server'];
    const upd = metrics['query-update-server'];
    log(`inspector metrics: materialization count ${hydr?.count()}, update count ${upd?.count()}`);
    assert.equal(typeof hydr?.count, 'function', 'query-materialization-server is a TDigest');
    assert.ok(hydr.count() >= 1, 'at least one server hydration recorded');
    assert.equal(typeof upd?.count, 'function', 'query-update-server is a TDigest');
    const last = inspectFrames().at(-1);
    assert.equal(last.op, 'metrics');
    assert.ok(Array.isArray(last.value['query-materialization-server']) && Array.isArray(last.value['query-update-server']),
      `raw metrics reply: ${JSON.stringify(last).slice(0, 300)}`);
    assert.deepStrictEqual(errorsOf(zA), [], 'no error frame');

    // (8) another client group: the client's own prompt flow (authenticated:false, prompt,
    // authenticate, retry) with the right password
    promptAnswer = ADMIN_PASSWORD;
    const zP = newClient(serverA, {userID: 'u1', auth: tokenFor('u1')});
    await waitForState(zP, 'connected', 'inspector client');
    const vP = materialize(openIssuesQuery(zP), 'inspector client');
    await vP.watch.waitFor(s => s.resultType === 'complete', 'hydrated', hydrateMs);
    assert.equal(await withTimeout(zP.inspector.serverVersion(), stateMs, 'serverVersion via the prompt'), '1.9.0');
    assert.equal(prompts.length, 3, 'prompted again (after the two prompts of client A) for the new client group');
    const pReplies = lastSocket(zP).frames.filter(([tag]) => tag === 'inspect').map(([, b]) => [b.op, b.value]);
    assert.deepStrictEqual(pReplies, [['authenticated', false], ['authenticated', true], ['version', '1.9.0']]);
    await closeClient(zP);
  } finally {
    delete globalThis.prompt;
  }
});

test('rate limit MAX=2: the third CRUD mutation gets MutationRateLimited, is not applied, the connection stays', {timeout: testMs}, async () => {
  // server A is done: stop it (and its clients) so that two servers do not share the 2 cores
  for (const z of [...clients]) await closeClient(z);
  await serverA.stop();
  serverA = null;
  // A day-long window: the sliding window's buckets start at multiples of the window on the
  // wall clock, so with the 60 s default a minute boundary between the second and the third
  // mutation lets the third through (zero-cache's algorithm; it happened in a run).
  serverB = await startLegacyServer(
    legacyEnv({ZERO_PER_USER_MUTATION_LIMIT_MAX: '2', ZERO_PER_USER_MUTATION_LIMIT_WINDOW_MS: '86400000'}),
    'server B');

  const z = newClient(serverB, {userID: 'u1', auth: tokenFor('u1')});
  const v = materialize(openIssuesQuery(z), 'rate-limited client');
  // the write authorizer reads the permissions from the replica: wait until they are there
  await viewEqualsSql(v, () => sqlOpenIssues('u1'), 'rate-limited client hydrated under the owner rule', hydrateMs);
  const stamp = Date.now();
  const base = await maxCreated();
  const rows = [1, 2, 3].map(i => ({id: `leg-rl-${stamp}-${i}`, title: `rate ${i}`, status: 'open', priority: 1, created: base + 1000 * i, owner_id: 'u1'}));
  const sock = lastSocket(z);

  for (const [i, row] of rows.entries()) {
    await withTimeout(z.mutate.issue.insert(row), changeMs, `insert ${i + 1}: local write`);
    if (i < 2) await waitConfirmed(z, i + 1, `insert ${i + 1}`);
  }
  await waitUntil(() => sock.errors.length > 0, 'an error frame for the third mutation', changeMs);
  await sleep(1000); // anything else the server would do with it
  log(`rate limit: errors ${JSON.stringify(sock.errors)}, close ${JSON.stringify(sock.closed)}, state ${JSON.stringify(z.connection.state.current)}, lmid ${confirmedLmid(z)}`);
  assert.deepStrictEqual(sock.errors, [{kind: 'MutationRateLimited', message: 'Rate limit exceeded', origin: 'zeroCache'}], 'one MutationRateLimited frame');
  assert.equal(sock.closed, null, 'the connection stays open');
  assert.equal(z.connection.state.current.name, 'connected', 'still connected (no state change)');
  assert.equal(socketsOf(z.clientID).length, 1, 'no reconnect');
  assert.deepStrictEqual(await issueRow(rows[0].id), rows[0], 'first insert applied');
  assert.deepStrictEqual(await issueRow(rows[1].id), rows[1], 'second insert applied');
  assert.equal(await issueRow(rows[2].id), null, 'third insert not applied');
  assert.equal(confirmedLmid(z), 2, 'the limited mutation was not confirmed');
  assert.equal(await upstreamLmid(serverB, z), 2, 'upstream lastMutationID not bumped by the limited mutation');
  // reads keep working on the same connection: a PostgreSQL write still reaches the view
  await sql`update issue set title = 'after the limit' where id = ${rows[0].id}`;
  await v.watch.waitFor(s => s.data.some(r => r.id === rows[0].id && r.title === 'after the limit'), 'a PostgreSQL UPDATE after the limit', changeMs);
  await closeClient(z);
});

test("token with alg 'none': AuthInvalidated and needs-auth", {timeout: testMs}, async () => {
  assert.ok(serverB?.running, 'server B is running');
  const z = newClient(serverB, {userID: 'u1', auth: unsignedJwt({sub: 'u1', exp: now() + 3600})});
  const state = await waitForState(z, 'needs-auth', "alg 'none'");
  const [sock] = socketsOf(z.clientID);
  await waitUntil(() => sock.closed, 'the socket closes', 5_000);
  log(`alg none: state ${JSON.stringify(state)}; frames ${JSON.stringify(sock.frames)}; close ${JSON.stringify(sock.closed)}`);
  // jose refuses a Uint8Array key for 'none' with a TypeError
  const message = 'Failed to decode auth token: TypeError: Key for the none algorithm must be one of type KeyObject, CryptoKey, or JSON Web Key. Received an instance of Uint8Array';
  assert.deepStrictEqual(sock.errors, [{kind: 'AuthInvalidated', message, origin: 'zeroCache'}], 'the error frame');
  assert.deepStrictEqual(plain(state), {name: 'needs-auth', reason: {type: 'zero-cache', reason: message}}, 'client state');
  if (kind === 'zero-cache') {
    // zero-cache 1.9.0 bug (spec §1.5): the message is over 123 bytes, so ws.close(3000, message)
    // throws a RangeError, which is unhandled: the whole server exits with code 13 and the socket
    // drops without a close frame (1006). zcache must not copy this.
    await waitUntil(() => !serverB.running, 'zero-cache 1.9.0 exits after the over-long close reason', 10_000);
    assert.equal(serverB.proc.exitInfo.code, 13, `zero-cache exit: ${JSON.stringify(serverB.proc.exitInfo)}`);
    assert.equal(sock.closed.code, 1006, 'abrupt close');
  } else {
    // the spec for zcache: close 3000 with the reason truncated to at most 123 bytes, server alive
    assert.equal(sock.closed.code, 3000, 'close code');
    assert.ok(Buffer.byteLength(sock.closed.reason) <= 123 && message.startsWith(sock.closed.reason) && sock.closed.reason.length > 0,
      `close reason truncated to <= 123 bytes: ${JSON.stringify(sock.closed.reason)}`);
    assert.ok(serverB.running, 'zcache still running');
  }
  await closeClient(z);
});
