// Child-process and port helpers shared by the PostgreSQL, app-server and sync-server launchers.
//
// Every long-running child is started in its own process group (detached), so that teardown can
// reach the whole tree (zero-cache forks workers, postgres forks backends, runuser forks postgres)
// with one signal to the group. A process-wide 'exit' hook SIGKILLs any group still alive, so a
// crashed or failed test run leaves nothing behind.
import {spawn} from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

const liveGroups = new Set();
const tempDirs = new Set();

function emergencyCleanup() {
  for (const pgid of liveGroups) killGroup(pgid, 'SIGKILL');
  liveGroups.clear();
  if (process.env.E2E_KEEP_WORK) return;
  for (const dir of tempDirs) {
    try {
      fs.rmSync(dir, {recursive: true, force: true});
    } catch {
      // best effort while exiting
    }
  }
}
process.on('exit', emergencyCleanup);
// Children live in their own process groups, so a Ctrl-C or a kill of the test process would not
// reach them: forward the end to them (and exit as the signal would have).
for (const [signal, code] of [['SIGINT', 130], ['SIGTERM', 143], ['SIGHUP', 129]]) {
  process.once(signal, () => {
    emergencyCleanup();
    process.exit(code);
  });
}

/** Registers a temp dir to remove if the process ends before its owner removes it. */
export function makeTempDir(prefix) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  tempDirs.add(dir);
  return dir;
}

/** Removes a dir from makeTempDir (kept when E2E_KEEP_WORK is set, for post-mortems). */
export function removeTempDir(dir) {
  tempDirs.delete(dir);
  if (!process.env.E2E_KEEP_WORK) fs.rmSync(dir, {recursive: true, force: true});
}

export function killGroup(pgid, signal) {
  try {
    process.kill(-pgid, signal);
    return true;
  } catch {
    return false; // group already gone
  }
}

export function groupAlive(pgid) {
  try {
    process.kill(-pgid, 0);
    return true;
  } catch {
    return false;
  }
}

export const sleep = ms => new Promise(r => setTimeout(r, ms));

/** Resolves with `promise` or after `ms`, whichever is first, without leaving a timer behind. */
async function waitAtMost(promise, ms) {
  let timer;
  try {
    await Promise.race([promise, new Promise(r => (timer = setTimeout(r, ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Spawns `cmd args` in a new process group; stdout+stderr go to `logFile` and to an in-memory
 * tail. Returns a handle with `exited` (promise of {code, signal}), `tail(n)`, `output()`, and
 * `stop({signal, graceMs})` which signals the leader (or the group), waits, then SIGKILLs the group.
 */
export function spawnGroup(name, cmd, args, {env = process.env, cwd, logFile} = {}) {
  const child = spawn(cmd, args, {env, cwd, detached: true, stdio: ['ignore', 'pipe', 'pipe']});
  const pgid = child.pid;
  let out = '';
  const outMaxChars = 1 << 20; // keep the last 1 MiB of output in memory
  const log = logFile ? fs.createWriteStream(logFile, {flags: 'a'}) : null;
  const onData = chunk => {
    const s = chunk.toString('utf8');
    out += s;
    if (out.length > outMaxChars) out = out.slice(out.length - outMaxChars / 2);
    log?.write(chunk);
  };
  child.stdout.on('data', onData);
  child.stderr.on('data', onData);
  let exitInfo = null;
  const exited = new Promise(resolve => {
    child.on('error', err => {
      exitInfo = {code: null, signal: null, error: err};
      resolve(exitInfo);
    });
    child.on('exit', (code, signal) => {
      exitInfo = {code, signal};
      resolve(exitInfo);
    });
  });
  if (pgid) liveGroups.add(pgid);
  // 'close' comes after the output pipes are drained, unlike 'exit'
  child.on('close', () => log?.end());

  const handle = {
    name,
    pid: child.pid,
    exited,
    get exitInfo() {
      return exitInfo;
    },
    output: () => out,
    tail: (n = 30) => out.split('\n').slice(-n - 1).join('\n'),
    /** Graceful stop: `signal` to the leader (or to the whole group when `group`), then SIGKILL. */
    async stop({signal = 'SIGTERM', graceMs = 10_000, group = false, pid = null} = {}) {
      if (!pgid) return;
      if (!exitInfo) {
        try {
          if (group) process.kill(-pgid, signal);
          else process.kill(pid ?? child.pid, signal);
        } catch {
          // already exiting
        }
        await waitAtMost(exited, graceMs);
      }
      // the leader may be gone while forked workers linger: sweep the group
      killGroup(pgid, 'SIGKILL');
      const deadline = Date.now() + 5_000;
      while (groupAlive(pgid) && Date.now() < deadline) await sleep(50);
      liveGroups.delete(pgid);
    },
  };
  return handle;
}

/**
 * A TCP port that nothing listens on right now (the OS picks it). Without `host` it is checked on
 * all interfaces (:: when the host has IPv6, else 0.0.0.0), as a server binding [::] needs.
 */
export async function freePort(host = undefined) {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, host, () => {
      const {port} = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** True when `port` can be bound on all interfaces (zero-cache binds [::]). */
export async function portBindable(port) {
  return new Promise(resolve => {
    const s = net.createServer();
    s.once('error', () => resolve(false));
    s.listen(port, () => s.close(() => resolve(true)));
  });
}

/** A free port P whose P+1 is free too (zero-cache binds its change-streamer on port+1). */
export async function freePortPair() {
  for (let attempt = 0; attempt < 50; attempt++) {
    const p = await freePort();
    if (p < 65535 && (await portBindable(p)) && (await portBindable(p + 1))) return p;
  }
  throw new Error('could not find two consecutive free TCP ports');
}

/** True when something accepts a TCP connection on host:port. */
export function portAnswers(port, host = '127.0.0.1', timeoutMs = 1000) {
  return new Promise(resolve => {
    const sock = net.connect({port, host});
    const done = ok => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(timeoutMs, () => done(false));
    sock.once('connect', () => done(true));
    sock.once('error', () => done(false));
  });
}
