//! Row-level permissions from `{app}.permissions`: the read transform of legacy queries and the write authorizer of CRUD mutations.
