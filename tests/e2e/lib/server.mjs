// Starts the sync server under test on free ports and waits until it is ready.
//   E2E_SERVER=zcache      (default) the zcache binary: $ZCACHE_BIN, else <repo>/target/debug/zcache
//   E2E_SERVER=zero-cache  the real zero-cache 1.9.0 from this project's node_modules
// Each call gets a fresh app id and replica file, so test files never share server state.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import {fileURLToPath} from 'node:url';
import {freePort, freePortPair, makeTempDir, portAnswers, removeTempDir, sleep, spawnGroup} from './proc.mjs';

const e2eDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const repoDir = path.resolve(e2eDir, '..', '..');
const zeroCacheCli = path.join(e2eDir, 'node_modules', '@rocicorp', 'zero', 'out', 'zero', 'src', 'cli.js');
const readyTimeoutMs = +(process.env.E2E_SERVER_START_TIMEOUT_MS ?? 120_000);

export function serverKind() {
  const kind = process.env.E2E_SERVER || 'zcache';
  if (kind !== 'zcache' && kind !== 'zero-cache') {
    throw new Error(`E2E_SERVER=${kind}: expected 'zcache' or 'zero-cache'`);
  }
  return kind;
}

export function zcacheBinPath() {
  return process.env.ZCACHE_BIN ? path.resolve(process.env.ZCACHE_BIN) : path.join(repoDir, 'target', 'debug', 'zcache');
}

/** Throws a clear error when the selected server cannot be started at all (checked before any setup). */
export function preflightServer() {
  const kind = serverKind();
  if (kind === 'zcache') {
    const bin = zcacheBinPath();
    let st = null;
    try {
      st = fs.statSync(bin);
    } catch {
      // reported below
    }
    if (!st || !st.isFile()) {
      throw new Error(`zcache binary not found at ${bin}: build it (cargo build) or set ZCACHE_BIN; ` +
        'E2E_SERVER=zero-cache runs the suite against the real zero-cache instead');
    }
    try {
      fs.accessSync(bin, fs.constants.X_OK);
    } catch {
      throw new Error(`zcache binary at ${bin} is not executable`);
    }
  } else if (!fs.existsSync(zeroCacheCli)) {
    throw new Error(`zero-cache not found at ${zeroCacheCli}: run npm ci in ${e2eDir}`);
  }
  return kind;
}

function newAppId() {
  // zero-cache app ids: lowercase letters, digits and '_'
  return 'e2e_' + crypto.randomBytes(5).toString('hex');
}

// `appUrl` null: no app server at all (legacy mode: no --query-url/--mutate-url, no
// ZERO_QUERY_URL/ZERO_MUTATE_URL, so that a JWT key option makes the server verify tokens itself).
// `env`: extra environment for the server (ZERO_* settings, read by zcache and zero-cache alike).
function launchSpec(kind, {pgUrl, appUrl, port, appId, replicaFile, env = {}}) {
  // a ZERO_* variable of the test's own environment must not turn a legacy server into a custom one
  const baseEnv = {...process.env};
  if (!appUrl) {
    delete baseEnv.ZERO_QUERY_URL;
    delete baseEnv.ZERO_MUTATE_URL;
  }
  const appUrls = appUrl ? {ZERO_QUERY_URL: `${appUrl}/query`, ZERO_MUTATE_URL: `${appUrl}/mutate`} : {};
  if (kind === 'zcache') {
    return {
      cmd: zcacheBinPath(),
      args: [
        '--upstream-db', pgUrl,
        '--replica-file', replicaFile,
        '--port', String(port),
        '--app-id', appId,
        ...(appUrl ? ['--query-url', `${appUrl}/query`, '--mutate-url', `${appUrl}/mutate`] : []),
        '--log-level', 'info',
      ],
      env: {...baseEnv, ...env},
      readyMarker: 'zcache ready',
    };
  }
  return {
    cmd: process.execPath,
    args: [zeroCacheCli],
    env: {
      ...baseEnv,
      ZERO_UPSTREAM_DB: pgUrl,
      ZERO_REPLICA_FILE: replicaFile,
      ZERO_PORT: String(port),
      ZERO_APP_ID: appId,
      ...appUrls,
      ZERO_ADMIN_PASSWORD: 'e2e',
      ZERO_LOG_LEVEL: 'info',
      ...env,
    },
    readyMarker: 'zero-cache ready',
  };
}

/**
 * Starts the selected sync server against `pgUrl`, calling the app server at `appUrl` (null: none,
 * see launchSpec), with `env` added to its environment.
 * Returns {kind, url, port, appId, dir, logFile, proc, startMs, stop(), halt(), restart(), running}.
 */
export async function startServer({pgUrl, appUrl, env = {}}) {
  const kind = preflightServer();
  const dir = makeTempDir(`zcache-e2e-${kind}-`);
  // zero-cache also binds port+1 (change-streamer)
  const port = kind === 'zero-cache' ? await freePortPair() : await freePort();
  const appId = newAppId();
  const replicaFile = path.join(dir, 'replica.db');
  const logFile = path.join(dir, `${kind}.log`);
  const spec = launchSpec(kind, {pgUrl, appUrl, port, appId, replicaFile, env});

  const handle = {
    kind, port, appId, dir, logFile,
    proc: null,
    url: `http://127.0.0.1:${port}`,
    startMs: null,
    tail: n => handle.proc?.tail(n) ?? '',
    async stop() {
      // SIGTERM lets zero-cache drain and stop its workers; the group is SIGKILLed after the grace period
      await handle.proc?.stop({signal: 'SIGTERM', graceMs: 10_000});
      removeTempDir(dir);
    },
    /**
     * Stops the process but keeps its replica and work dir (for `restart`). Returns how the leader
     * ended, {code, signal, ms}: `ms` is the time from the signal to its exit (null when it had to
     * be SIGKILLed after `graceMs`).
     */
    async halt({signal = 'SIGTERM', graceMs = 10_000} = {}) {
      const proc = handle.proc;
      if (proc.exitInfo) return {...proc.exitInfo, ms: 0};
      const t = performance.now();
      let ms = null;
      proc.exited.then(() => (ms = performance.now() - t));
      await proc.stop({signal, graceMs});
      await proc.exited;
      return {...proc.exitInfo, ms: proc.exitInfo.signal === 'SIGKILL' ? null : ms};
    },
    /** Starts the server again with the same port, app id and replica file (after `halt`). */
    async restart() {
      if (handle.proc && !handle.proc.exitInfo) throw new Error(`${kind} is still running: halt it first`);
      await launch();
    },
    get running() {
      return Boolean(handle.proc && !handle.proc.exitInfo);
    },
  };

  async function launch() {
    const t0 = performance.now();
    const proc = spawnGroup(kind, spec.cmd, spec.args, {env: spec.env, cwd: e2eDir, logFile});
    handle.proc = proc;
    // the ready marker must come from this run's output, not an earlier one in the same log
    const deadline = Date.now() + readyTimeoutMs;
    for (;;) {
      if (proc.exitInfo) {
        const {code, signal, error} = proc.exitInfo;
        const why = error ? `could not be started (${error.message})` : `exited during startup (code ${code}, signal ${signal})`;
        throw new Error(`${kind} ${why}; ${proc.output().trim() ? `last output:\n${proc.tail(40)}` : "it printed nothing"}`);
      }
      if (proc.output().includes(spec.readyMarker) && (await portAnswers(port))) break;
      if (Date.now() > deadline) {
        throw new Error(`${kind} not ready within ${readyTimeoutMs} ms (no '${spec.readyMarker}' in its output, or port ${port} not answering); last output:\n${proc.tail(40)}`);
      }
      await sleep(100);
    }
    handle.startMs = performance.now() - t0;
  }

  try {
    await launch();
  } catch (e) {
    await handle.stop();
    throw e;
  }
  return handle;
}
