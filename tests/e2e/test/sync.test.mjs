// End-to-end sync tests: the real @rocicorp/zero 1.9.0 client against the sync server under test
// (E2E_SERVER=zcache|zero-cache), a throwaway PostgreSQL and an in-process app server.
// The tests share one database and run in order; each leaves the data as SQL describes it, and
// every view is compared against the same query run in SQL.
import '../lib/ws.mjs';
import {test, before, after} from 'node:test';
import assert from 'node:assert/strict';
import postgres from 'postgres';
import {Zero} from '@rocicorp/zero';
import {startPostgres, sqlOptions} from '../lib/pg.mjs';
import {startAppServer} from '../lib/appserver.mjs';
import {preflightServer, startServer} from '../lib/server.mjs';
import {schema, queries, mutators} from '../lib/schema.mjs';
import {plain, watchView, withTimeout} from '../lib/view.mjs';

const hydrateMs = 60_000; // first hydration on a 2-core CI machine
const changeMs = 30_000; // a PostgreSQL change or a mutation reaching a view
const testMs = 240_000; // whole-test ceiling so a hang cannot stall the run
const viewLimit = 100;

let pg, sql, app, server;
const clients = [];

function log(msg) {
  const at = (performance.now() / 1000).toFixed(1);
  console.log(`[e2e ${process.env.E2E_SERVER || 'zcache'} +${at}s] ${msg}`);
}

// extra lines for timeout messages: what the server and the app server said last
function diag() {
  const lines = [];
  if (app?.errors.length) lines.push(`app server errors: ${app.errors.map(String).join('; ')}`);
  if (app) lines.push(`app server calls: ${JSON.stringify(app.calls)}`);
  if (server) lines.push(`${server.kind} output tail:\n${server.tail(15)}`);
  return lines.join('\n');
}

// Each client gets its own storageKey: with kvStore 'mem' the store (and so the client group) is
// shared by every Zero of the same user in one process otherwise.
function newClient() {
  const z = new Zero({
    server: server.url, schema, mutators, userID: 'u1', auth: 'u1', kvStore: 'mem', logLevel: 'error',
    storageKey: `client-${clients.length + 1}`,
  });
  clients.push(z);
  return z;
}

function openIssues(z, label) {
  const view = z.materialize(queries.issuesByStatus({status: 'open', limit: viewLimit}));
  return {view, watch: watchView(view, label, diag)};
}

// The view's query in SQL: ZQL completes orderBy with the primary key ascending, and compares
// strings bytewise, hence `collate "C"`.
async function expectedOpenIssues() {
  const issues = await sql`
    select id, title, status, priority, created, owner_id from issue
    where status = 'open' order by created desc, id collate "C" limit ${viewLimit}`;
  const ids = issues.map(i => i.id);
  const comments = ids.length === 0 ? [] : await sql`
    select id, issue_id, body, created from comment
    where issue_id in ${sql(ids)} order by created desc, id collate "C"`;
  const byIssue = new Map(ids.map(id => [id, []]));
  for (const c of comments) byIssue.get(c.issue_id).push(c);
  return plain(issues.map(i => ({...i, comments: byIssue.get(i.id)})));
}

async function assertMatchesSql(snapshot, what) {
  const expected = await expectedOpenIssues();
  assert.equal(snapshot.data.length, expected.length, `${what}: row count`);
  assert.deepStrictEqual(snapshot.data.map(r => r.id), expected.map(r => r.id), `${what}: issue ids and order`);
  assert.deepStrictEqual(snapshot.data, expected, `${what}: whole view (all columns, comments in order)`);
}

async function maxCreated(table) {
  const [{m}] = await sql`select max(created) as m from ${sql(table)}`;
  return m;
}

async function mutateOnServer(z, mutation, what) {
  const res = z.mutate(mutation);
  const clientResult = await withTimeout(res.client, changeMs, `${what}: client-side result`);
  assert.equal(clientResult.type, 'success', `${what}: client result ${JSON.stringify(clientResult)}`);
  const serverResult = await withTimeout(res.server, changeMs, `${what}: server result (mutation confirmed by the sync server)`, diag);
  assert.equal(serverResult.type, 'success', `${what}: server result ${JSON.stringify(serverResult)}`);
}

before(async () => {
  // fail fast (before PostgreSQL starts) when the server under test is missing
  const kind = preflightServer();
  let t = performance.now();
  pg = await startPostgres();
  log(`PostgreSQL on port ${pg.port} seeded in ${(performance.now() - t).toFixed(0)} ms`);
  sql = postgres(pg.url, sqlOptions());
  app = await startAppServer({pgUrl: pg.url});
  t = performance.now();
  server = await startServer({pgUrl: pg.url, appUrl: app.url});
  log(`${kind} ready on port ${server.port} after ${(performance.now() - t).toFixed(0)} ms (app id ${server.appId})`);
});

after(async () => {
  const steps = [
    ['close clients', clients.length > 0, () => Promise.all(clients.map(z => z.close()))],
    ['stop sync server', server, () => server.stop()],
    ['stop app server', app, () => app.close()],
    ['close sql', sql, () => sql.end({timeout: 2})],
    ['stop PostgreSQL', pg, () => pg.stop()],
  ];
  for (const [name, started, step] of steps) {
    if (!started) continue;
    const t = performance.now();
    try {
      await withTimeout(Promise.resolve(step()), 30_000, name);
      log(`teardown: ${name} took ${(performance.now() - t).toFixed(0)} ms`);
    } catch (e) {
      console.error(`teardown: ${name} failed: ${e.message}`);
    }
  }
});

let z1, v1;

// The later tests build on client 1's hydrated view from the first test.
function hydratedView1() {
  const snap = v1?.watch.latest;
  if (snap?.resultType !== 'complete' || snap.data.length !== viewLimit) {
    throw new Error('client 1 has no hydrated view (the hydration test failed), so this test cannot run');
  }
  return snap.data;
}

test('hydrates issuesByStatus with comments, identical to SQL', {timeout: testMs}, async () => {
  const t = performance.now();
  z1 = newClient();
  v1 = openIssues(z1, 'client 1');
  const snap = await v1.watch.waitFor(v => v.resultType === 'complete', "resultType 'complete' (hydration)", hydrateMs);
  log(`client 1 hydrated in ${(performance.now() - t).toFixed(0)} ms`);
  assert.equal(snap.data.length, 100, 'hydrated issue count');
  assert.equal(snap.data.reduce((a, i) => a + i.comments.length, 0), 500, 'hydrated comment count');
  await assertMatchesSql(snap, 'after hydration');
});

test('PostgreSQL writes reach the view', {timeout: testMs}, async () => {
  const before = hydratedView1();

  // UPDATE of a visible row
  const target = before[3].id;
  const title = `pg-update-${Date.now()}`;
  await sql`update issue set title = ${title} where id = ${target}`;
  let snap = await v1.watch.waitFor(v => v.data.find(i => i.id === target)?.title === title, `UPDATE of ${target}.title`, changeMs);
  await assertMatchesSql(snap, 'after UPDATE');

  // INSERT at the top of the window pushes the last row out of the limit
  const lastId = before[99].id;
  const top = {id: 'e2e-top', title: 'inserted in PG', status: 'open', priority: 1, created: (await maxCreated('issue')) + 1000, owner_id: 'u7'};
  await sql`insert into issue ${sql(top)}`;
  snap = await v1.watch.waitFor(
    v => v.data[0]?.id === top.id && v.data.length === 100 && !v.data.some(i => i.id === lastId),
    `INSERTed issue ${top.id} at the top and ${lastId} out of the window`, changeMs);
  assert.deepStrictEqual(snap.data[0], {...top, comments: []}, 'inserted row as the client sees it');
  await assertMatchesSql(snap, 'after INSERT');

  // DELETE brings the previous last row back
  await sql`delete from issue where id = ${top.id}`;
  snap = await v1.watch.waitFor(
    v => !v.data.some(i => i.id === top.id) && v.data[99]?.id === lastId,
    `DELETE of ${top.id} and ${lastId} back as the last row`, changeMs);
  await assertMatchesSql(snap, 'after DELETE');

  // comment INSERT and DELETE on a visible issue
  const issueId = snap.data[1].id;
  const comment = {id: 'e2e-c1', issue_id: issueId, body: 'comment from PG', created: (await maxCreated('comment')) + 1};
  await sql`insert into comment ${sql(comment)}`;
  snap = await v1.watch.waitFor(
    v => v.data.find(i => i.id === issueId)?.comments[0]?.id === comment.id,
    `INSERTed comment ${comment.id} first in ${issueId}.comments`, changeMs);
  assert.deepStrictEqual(snap.data.find(i => i.id === issueId).comments[0], comment, 'inserted comment as the client sees it');
  assert.equal(snap.data.find(i => i.id === issueId).comments.length, 6, 'comments of the issue');
  await assertMatchesSql(snap, 'after comment INSERT');

  await sql`delete from comment where id = ${comment.id}`;
  snap = await v1.watch.waitFor(
    v => {
      const cs = v.data.find(i => i.id === issueId)?.comments;
      return cs && !cs.some(c => c.id === comment.id);
    },
    `DELETE of comment ${comment.id} from ${issueId}.comments`, changeMs);
  await assertMatchesSql(snap, 'after comment DELETE');
});

test('custom mutator issue.setTitle reaches PostgreSQL and the view', {timeout: testMs}, async () => {
  const target = hydratedView1()[2].id;
  const title = `mutated-${Date.now()}`;
  const mutateCalls = app.calls.mutate;
  const t = performance.now();
  await mutateOnServer(z1, mutators.issue.setTitle({id: target, title}), 'issue.setTitle');
  log(`setTitle confirmed by the server after ${(performance.now() - t).toFixed(0)} ms`);
  assert.ok(app.calls.mutate > mutateCalls, 'the sync server called the app server /mutate');
  const [row] = await sql`select title from issue where id = ${target}`;
  assert.equal(row.title, title, 'title in PostgreSQL after the mutation');
  const snap = await v1.watch.waitFor(v => v.data.find(i => i.id === target)?.title === title, `mutated title of ${target} in the view`, changeMs);
  await assertMatchesSql(snap, 'after setTitle');
});

test("a second client group sees the first client's mutations and vice versa", {timeout: testMs}, async () => {
  hydratedView1();
  const t = performance.now();
  const z2 = newClient();
  const v2 = openIssues(z2, 'client 2');
  let snap2 = await v2.watch.waitFor(v => v.resultType === 'complete', "resultType 'complete' (hydration)", hydrateMs);
  log(`client 2 hydrated in ${(performance.now() - t).toFixed(0)} ms`);
  assert.notEqual(await z2.clientGroupID, await z1.clientGroupID, 'distinct client groups');
  await assertMatchesSql(snap2, 'client 2 after hydration');

  // client 1 creates an issue (top of the window) and a comment on it
  const issue = {id: 'e2e-m1', title: 'created by client 1', status: 'open', priority: 2, created: (await maxCreated('issue')) + 1000, owner_id: 'u1'};
  const comment = {id: 'e2e-mc1', issue_id: issue.id, body: 'first!', created: (await maxCreated('comment')) + 1};
  await mutateOnServer(z1, mutators.issue.create(issue), 'issue.create');
  await mutateOnServer(z1, mutators.comment.add(comment), 'comment.add');
  snap2 = await v2.watch.waitFor(
    v => v.data[0]?.id === issue.id && v.data[0].comments[0]?.id === comment.id,
    `issue ${issue.id} with comment ${comment.id} created by client 1`, changeMs);
  assert.deepStrictEqual(snap2.data[0], {...issue, comments: [comment]}, 'created issue as client 2 sees it');
  await assertMatchesSql(snap2, 'client 2 after client 1 mutations');

  // client 2 renames an issue; client 1 sees it
  const target = snap2.data[4].id;
  const title = `renamed-by-client-2-${Date.now()}`;
  await mutateOnServer(z2, mutators.issue.setTitle({id: target, title}), 'issue.setTitle by client 2');
  const snap1 = await v1.watch.waitFor(v => v.data.find(i => i.id === target)?.title === title, `client 2's title for ${target}`, changeMs);
  await assertMatchesSql(snap1, 'client 1 after client 2 mutation');
  const final2 = await v2.watch.waitFor(v => v.data.find(i => i.id === target)?.title === title, `own title for ${target}`, changeMs);
  await assertMatchesSql(final2, 'client 2 at the end');
  assert.deepStrictEqual(snap1.data, final2.data, 'both clients converge on the same view');
});
