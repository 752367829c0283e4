// The app server the sync server calls: POST /query (named query -> AST) and POST /mutate
// (runs custom mutators against PostgreSQL), built on @rocicorp/zero/server with the postgres.js
// adapter. Runs in the test process on a free 127.0.0.1 port.
import http from 'node:http';
import postgres from 'postgres';
import {handleQueryRequest, handleMutateRequest} from '@rocicorp/zero/server';
import {zeroPostgresJS} from '@rocicorp/zero/server/adapters/postgresjs';
import {mustGetQuery, mustGetMutator} from '@rocicorp/zero';
import {schema, queries, mutators} from './schema.mjs';

async function readBody(req) {
  const chunks = [];
  for await (const c of req) chunks.push(c);
  return Buffer.concat(chunks);
}

/**
 * Starts the app server against `pgUrl`. Returns {url, calls, errors, faults, close()}; `calls`
 * counts requests per endpoint, `errors` keeps handler exceptions (both help explain a failing
 * test). Setting `faults.mutateStatus` to an HTTP status makes /mutate answer with that status
 * (and no mutation runs) until it is set back to null.
 */
export async function startAppServer({pgUrl}) {
  const sql = postgres(pgUrl, {max: 5, onnotice: () => {}});
  const dbProvider = zeroPostgresJS(schema, sql);
  const calls = {query: 0, mutate: 0};
  const errors = [];
  const faults = {mutateStatus: null};

  const server = http.createServer(async (req, res) => {
    try {
      const body = await readBody(req);
      const url = new URL(req.url, 'http://127.0.0.1');
      const request = new Request(url, {method: req.method, headers: req.headers, body: req.method === 'GET' ? undefined : body});
      // no real auth: the opaque token the sync server forwards as a bearer token is
      // `<userID>[:<role>]`
      const token = (req.headers.authorization ?? '').replace(/^Bearer\s+/i, '');
      const [user, role] = token.split(':');
      const userID = user || 'anon';
      let result;
      if (url.pathname.endsWith('/query')) {
        calls.query++;
        result = await handleQueryRequest({
          handler: (name, args) => mustGetQuery(queries, name).fn({args, ctx: {userID, role}}),
          schema, request, userID,
        });
      } else if (url.pathname.endsWith('/mutate')) {
        calls.mutate++;
        if (faults.mutateStatus) {
          res.writeHead(faults.mutateStatus, {'content-type': 'text/plain'}).end(`e2e: injected HTTP ${faults.mutateStatus}`);
          return;
        }
        result = await handleMutateRequest({
          dbProvider,
          handler: transact => transact((tx, name, args) => mustGetMutator(mutators, name).fn({tx, args, ctx: {userID}})),
          request, userID,
        });
      } else {
        res.writeHead(404).end('not found');
        return;
      }
      res.writeHead(200, {'content-type': 'application/json'}).end(JSON.stringify(result));
    } catch (e) {
      errors.push(e);
      res.writeHead(500, {'content-type': 'application/json'}).end(JSON.stringify({error: String(e)}));
    }
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const {port} = server.address();
  return {
    url: `http://127.0.0.1:${port}`,
    calls,
    errors,
    faults,
    async close() {
      server.closeAllConnections?.();
      await new Promise(r => server.close(() => r()));
      await sql.end({timeout: 2});
    },
  };
}
