// A schema module for the real `zero-deploy-permissions` CLI (it imports the file given with
// --schema-path and reads its `schema` and `permissions` exports): the 'owner' permissions of
// lib/legacy.mjs.
import {legacySchema, compilePermissions} from './legacy.mjs';

export const schema = legacySchema;
export const permissions = compilePermissions('owner');
