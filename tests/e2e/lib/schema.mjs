// Zero 1.9 schema, synced (named) queries and custom mutators, shared by the test client and the
// app server. Tables match the seed in pg.mjs.
import {
  createSchema, table, string, number, relationships,
  createBuilder, defineQueries, defineQuery, defineMutators, defineMutator,
} from '@rocicorp/zero';

const user = table('user').columns({id: string(), name: string().optional()}).primaryKey('id');
const issue = table('issue').columns({
  id: string(),
  title: string().optional(),
  status: string().optional(),
  priority: number().optional(),
  created: number().optional(),
  owner_id: string().optional(),
}).primaryKey('id');
const comment = table('comment').columns({
  id: string(),
  issue_id: string().optional(),
  body: string().optional(),
  created: number().optional(),
}).primaryKey('id');

const issueRel = relationships(issue, ({many, one}) => ({
  comments: many({sourceField: ['id'], destField: ['issue_id'], destSchema: comment}),
  owner: one({sourceField: ['owner_id'], destField: ['id'], destSchema: user}),
}));

export const schema = createSchema({tables: [user, issue, comment], relationships: [issueRel]});
// the same tables for lib/legacy.mjs (a schema with legacy queries and CRUD mutators)
export const tables = {user, issue, comment};
export const relationshipsOf = {issue: issueRel};
export const zql = createBuilder(schema);

export const queries = defineQueries({
  // issues with a status, newest first, with their comments newest first
  issuesByStatus: defineQuery(({args}) =>
    zql.issue.where('status', args.status).orderBy('created', 'desc').limit(args.limit ?? 100)
      .related('comments', q => q.orderBy('created', 'desc'))),
  issuesByOwner: defineQuery(({args}) =>
    zql.issue.where('owner_id', args.owner).orderBy('created', 'desc').limit(args.limit ?? 100)
      .related('comments')),
  issueById: defineQuery(({args}) => zql.issue.where('id', args.id).related('owner').one()),
  // the viewer's newest issues, 20 or, for the role 'more', 40: the viewer and role come from the
  // auth token on the app server (ctx) and from the client's `context` option on the client
  issuesOfViewer: defineQuery(({ctx}) =>
    zql.issue.where('owner_id', ctx?.userID ?? '').orderBy('created', 'desc')
      .limit(ctx?.role === 'more' ? 40 : 20)),
});

export const mutators = defineMutators({
  issue: {
    setTitle: defineMutator(async ({tx, args}) => {
      await tx.mutate.issue.update({id: args.id, title: args.title});
    }),
    // args: {id, title, status, priority, created, owner_id}
    create: defineMutator(async ({tx, args}) => {
      await tx.mutate.issue.insert(args);
    }),
    // sets the title on the client (optimistically), then fails on the app server with an app
    // error, so the server's transaction is rolled back: args {id, title}
    setTitleFailsOnServer: defineMutator(async ({tx, args}) => {
      await tx.mutate.issue.update({id: args.id, title: args.title});
      if (tx.location === 'server') throw new Error(`e2e: setTitle of ${args.id} refused by the app server`);
    }),
  },
  comment: {
    // args: {id, issue_id, body, created}
    add: defineMutator(async ({tx, args}) => {
      await tx.mutate.comment.insert(args);
    }),
  },
});
