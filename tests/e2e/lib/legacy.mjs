// The legacy (pre-custom) Zero features: a client schema with ad-hoc ZQL queries and CRUD mutators
// (`enableLegacyQueries`/`enableLegacyMutators`), row permissions compiled with the real
// `definePermissions` and deployed the way `zero-deploy-permissions` does it, and HS256 JWTs
// signed with Node's crypto for ZERO_AUTH_SECRET.
import crypto from 'node:crypto';
import {execFile} from 'node:child_process';
import path from 'node:path';
import {fileURLToPath} from 'node:url';
import {createSchema, definePermissions, ANYONE_CAN} from '@rocicorp/zero';
import {tables, relationshipsOf} from './schema.mjs';

const e2eDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

export const legacySchema = createSchema({
  tables: [tables.user, tables.issue, tables.comment],
  relationships: [relationshipsOf.issue],
  enableLegacyQueries: true,
  enableLegacyMutators: true,
});

const ownerIsSub = (authData, {cmp}) => cmp('owner_id', authData.sub);

/**
 * Compiled permissions (the JSON zero-deploy-permissions writes) for the test schema:
 *   'owner': issue rows are readable, insertable, updatable (before and after) and deletable only
 *            when owner_id = authData.sub; comment and user have no rules (nothing allowed).
 *   'all':   as 'owner', but every issue row is readable (select ANYONE_CAN).
 */
export async function compilePermissions(mode) {
  if (mode !== 'owner' && mode !== 'all') throw new Error(`unknown permissions mode ${mode}`);
  return definePermissions(legacySchema, () => ({
    issue: {
      row: {
        select: mode === 'all' ? ANYONE_CAN : [ownerIsSub],
        insert: [ownerIsSub],
        update: {preMutation: [ownerIsSub], postMutation: [ownerIsSub]},
        delete: [ownerIsSub],
      },
    },
  }));
}

/**
 * Writes compiled permissions upstream with the statement zero-deploy-permissions runs
 * (`UPDATE {app}.permissions SET permissions = $1 RETURNING hash`, its table created by the sync
 * server at startup). Returns the new hash (md5 of the JSON text, set by the table's trigger).
 */
export async function deployPermissions(sql, appId, permissions) {
  const rows = await sql`UPDATE ${sql(appId)}.permissions SET permissions = ${sql.json(permissions)} RETURNING hash`;
  if (rows.length !== 1) throw new Error(`UPDATE ${appId}.permissions touched ${rows.length} rows (is the server's global schema there?)`);
  return rows[0].hash;
}

const b64url = v => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');

/** An HS256 JWT of `payload` (iat defaults to now) signed with `secret` (its UTF-8 bytes, like zero-cache). */
export function signHS256(payload, secret) {
  const body = {iat: Math.floor(Date.now() / 1000), ...payload};
  const input = `${b64url({alg: 'HS256', typ: 'JWT'})}.${b64url(body)}`;
  const sig = crypto.createHmac('sha256', Buffer.from(secret, 'utf8')).update(input).digest('base64url');
  return `${input}.${sig}`;
}

/** An unsecured JWT (`alg: none`, empty signature). */
export function unsignedJwt(payload) {
  const body = {iat: Math.floor(Date.now() / 1000), ...payload};
  return `${b64url({alg: 'none', typ: 'JWT'})}.${b64url(body)}.`;
}

/**
 * Deploys the 'owner' permissions (lib/legacy-permissions.mjs) with the real
 * `zero-deploy-permissions` CLI from node_modules, against the upstream database (it validates the
 * rules against the app's published tables). Resolves with the CLI's output; rejects on a failure.
 */
export function deployOwnerPermissionsWithCli(pgUrl, appId) {
  const cli = path.join(e2eDir, 'node_modules', '@rocicorp', 'zero', 'out', 'zero', 'src', 'deploy-permissions.js');
  const schemaPath = path.join(e2eDir, 'lib', 'legacy-permissions.mjs');
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('ZERO_')));
  return new Promise((resolve, reject) => {
    execFile(process.execPath, [cli, '--schema-path', schemaPath, '--upstream-db', pgUrl, '--app-id', appId],
      {cwd: e2eDir, env, timeout: 60_000}, (err, stdout, stderr) => {
        const out = `${stdout}${stderr}`;
        if (err) reject(new Error(`zero-deploy-permissions failed (${err.message}):\n${out}`));
        else resolve(out);
      });
  });
}
