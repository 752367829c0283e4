// A throwaway PostgreSQL for one test file: initdb in a temp dir, `postgres -D` as a child
// process on a free port (wal_level=logical for the sync server), seeded with the test data.
import {execFileSync} from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import postgres from 'postgres';
import {freePort, makeTempDir, removeTempDir, sleep, spawnGroup} from './proc.mjs';

const isRoot = process.getuid?.() === 0;
const pgStartTimeoutMs = 60_000;

/** Directory holding initdb and postgres: $PG_BIN, newest /usr/lib/postgresql/N/bin, pg_config. */
export function findPgBin() {
  const ok = dir => dir && fs.existsSync(path.join(dir, 'initdb')) && fs.existsSync(path.join(dir, 'postgres'));
  if (process.env.PG_BIN) {
    if (ok(process.env.PG_BIN)) return process.env.PG_BIN;
    throw new Error(`PG_BIN=${process.env.PG_BIN} does not contain initdb and postgres`);
  }
  const root = '/usr/lib/postgresql';
  if (fs.existsSync(root)) {
    const versions = fs.readdirSync(root).filter(v => /^\d+$/.test(v)).sort((a, b) => b - a);
    for (const v of versions) if (ok(path.join(root, v, 'bin'))) return path.join(root, v, 'bin');
  }
  try {
    const dir = execFileSync('pg_config', ['--bindir'], {encoding: 'utf8'}).trim();
    if (ok(dir)) return dir;
  } catch {
    // no pg_config on PATH
  }
  throw new Error('PostgreSQL server binaries not found (looked in /usr/lib/postgresql/*/bin and pg_config --bindir); set PG_BIN');
}

/** Runs a PostgreSQL binary as the `postgres` OS user when we are root (initdb refuses root). */
function asPg(bin, args) {
  return isRoot ? ['runuser', ['-u', 'postgres', '--', bin, ...args]] : [bin, args];
}

function chownToPg(...dirs) {
  if (!isRoot) return;
  for (const d of dirs) execFileSync('chown', ['-R', 'postgres:postgres', d]);
}

// Same data as the reference kit's setup.sh: 100 users, 10,000 issues, 50,000 comments.
export const SEED_SQL = `
SET client_min_messages = warning;
DROP TABLE IF EXISTS comment, issue, "user";
CREATE TABLE "user"(id text primary key, name text);
CREATE TABLE issue(id text primary key, title text, status text, priority int, created bigint, owner_id text);
CREATE TABLE comment(id text primary key, issue_id text, body text, created bigint);
INSERT INTO "user" SELECT 'u'||i, 'User '||i FROM generate_series(1,100) i;
INSERT INTO issue SELECT 'i'||i, 'Issue title '||i,
  (ARRAY['open','closed','in_progress'])[1+(i%3)], i%5, 1700000000000+i*1000, 'u'||(1+i%100)
  FROM generate_series(1,10000) i;
INSERT INTO comment SELECT 'c'||i, 'i'||(1+(i%10000)), 'Comment body '||i, 1700000000000+i*100
  FROM generate_series(1,50000) i;
CREATE INDEX ON comment(issue_id);
CREATE INDEX ON issue(status, created);
ANALYZE;
`;

/** postgres.js client options: int8 as JS numbers (the seed's values are far below 2^53). */
export function sqlOptions(extra = {}) {
  const parseInt8 = s => {
    const n = Number(s);
    if (!Number.isSafeInteger(n)) throw new Error(`int8 value ${s} is beyond 2^53`);
    return n;
  };
  return {
    max: 3,
    onnotice: () => {},
    types: {int8: {to: 20, from: [20], serialize: x => String(x), parse: parseInt8}},
    ...extra,
  };
}

async function waitAccepting(url, proc) {
  const deadline = Date.now() + pgStartTimeoutMs;
  let lastErr = null;
  while (Date.now() < deadline) {
    if (proc.exitInfo) throw new Error(`postgres exited during startup (${JSON.stringify(proc.exitInfo)}):\n${proc.tail(30)}`);
    const sql = postgres(url, {max: 1, connect_timeout: 2, onnotice: () => {}});
    try {
      await sql`select 1`;
      return;
    } catch (e) {
      lastErr = e;
    } finally {
      await sql.end({timeout: 1});
    }
    await sleep(100);
  }
  throw new Error(`postgres did not accept connections within ${pgStartTimeoutMs} ms (last error: ${lastErr?.message}):\n${proc.tail(30)}`);
}

/**
 * Starts PostgreSQL in a fresh temp dir and seeds database `dbName`.
 * Returns {url, port, dir, stop()}; `stop` shuts it down (SIGINT = fast shutdown) and removes the dir.
 */
export async function startPostgres({dbName = 'zbench', seed = true} = {}) {
  const bin = findPgBin();
  const dir = makeTempDir('zcache-e2e-pg-');
  const dataDir = path.join(dir, 'data');
  const sockDir = path.join(dir, 'sock');
  fs.mkdirSync(dataDir, {mode: 0o700});
  fs.mkdirSync(sockDir);
  // mkdtemp makes the dir 0700; the postgres OS user must be able to enter it
  fs.chmodSync(dir, 0o755);
  chownToPg(dataDir, sockDir);

  const [initCmd, initArgs] = asPg(path.join(bin, 'initdb'), ['-D', dataDir, '--no-sync', '-U', 'postgres', '--auth=trust', '-E', 'UTF8']);
  try {
    execFileSync(initCmd, initArgs, {stdio: 'pipe'});
  } catch (e) {
    removeTempDir(dir);
    throw new Error(`initdb failed: ${e.stderr?.toString() ?? e.message}`);
  }

  const port = await freePort('127.0.0.1');
  const conf = [
    '# --- zcache e2e ---',
    "listen_addresses = '127.0.0.1'",
    `port = ${port}`,
    `unix_socket_directories = '${sockDir}'`,
    'wal_level = logical',
    'max_wal_senders = 20',
    'max_replication_slots = 20',
    'fsync = off',
    // off would hold WAL shipping for up to wal_writer_delay and slow every replication wait
    'synchronous_commit = on',
    '',
  ].join('\n');
  fs.appendFileSync(path.join(dataDir, 'postgresql.conf'), conf);

  const [pgCmd, pgArgs] = asPg(path.join(bin, 'postgres'), ['-D', dataDir]);
  const proc = spawnGroup('postgres', pgCmd, pgArgs, {logFile: path.join(dir, 'postgres.log')});
  const adminUrl = `postgres://postgres@127.0.0.1:${port}/postgres`;
  const url = `postgres://postgres@127.0.0.1:${port}/${dbName}`;

  const stop = async () => {
    // runuser does not forward signals: signal the postmaster itself (first line of postmaster.pid)
    let postmasterPid = null;
    try {
      postmasterPid = +fs.readFileSync(path.join(dataDir, 'postmaster.pid'), 'utf8').split('\n')[0];
    } catch {
      // not started or already gone
    }
    // SIGINT = fast shutdown; without a pid file, signal the group (runuser ignores SIGINT)
    await proc.stop({signal: 'SIGINT', graceMs: 15_000, pid: postmasterPid || null, group: !postmasterPid});
    removeTempDir(dir);
  };

  try {
    await waitAccepting(adminUrl, proc);
    const admin = postgres(adminUrl, {max: 1, onnotice: () => {}});
    try {
      await admin.unsafe(`create database "${dbName}"`);
    } finally {
      await admin.end({timeout: 1});
    }
    if (seed) {
      const sql = postgres(url, {max: 1, onnotice: () => {}});
      try {
        await sql.unsafe(SEED_SQL);
      } finally {
        await sql.end({timeout: 1});
      }
    }
  } catch (e) {
    await stop();
    throw e;
  }
  return {url, adminUrl, port, dir, proc, stop};
}
