//! The shard's copy of the row-level permissions (`{app}.permissions`, replicated like any
//! table): read at first use and again whenever a version changes the row, which makes
//! every legacy query take the new rules (zero-cache resets its pipelines).

use super::group::Group;
use super::{Shard, VersionReady};
use crate::permissions::{self, Permissions};
use crate::zql::ast::Ast;
use std::rc::Rc;

#[derive(Default)]
pub struct PermCache {
    /// Whether the replica was read since the start (or since the last change).
    loaded: bool,
    /// None: nothing deployed (or unreadable), which denies every legacy query.
    perms: Option<Rc<Permissions>>,
    hash: Option<String>,
}

impl Shard {
    /// The replica table holding the permissions row.
    fn permissions_table(&self) -> String {
        format!("{}.permissions", self.cfg.app_id)
    }

    /// The current permissions (None: nothing deployed).
    pub fn permissions(&self) -> Option<Rc<Permissions>> {
        if !self.perms.borrow().loaded {
            self.reload_permissions();
        }
        self.perms.borrow().perms.clone()
    }

    /// Reads the permissions row again; returns whether the rules changed.
    fn reload_permissions(&self) -> bool {
        let loaded = permissions::load(&self.reader.borrow(), &self.cfg.app_id);
        let (perms, hash) = match loaded {
            Ok(Some((p, hash))) => (Some(Rc::new(p)), Some(hash)),
            Ok(None) => (None, None),
            Err(e) => {
                // zero-cache fails the queries; denying them all is as safe and keeps the
                // connections (a fixed deployment is picked up at the next change).
                tracing::error!(error = %e, "upstream permissions cannot be used: every legacy query is denied");
                (None, None)
            }
        };
        let mut cache = self.perms.borrow_mut();
        let changed = !cache.loaded || cache.hash != hash;
        if changed && cache.loaded {
            tracing::info!(old = ?cache.hash, new = ?hash, "permissions changed: legacy queries re-authorized");
        }
        *cache = PermCache {
            loaded: true,
            perms,
            hash,
        };
        changed
    }

    /// Whether `v` changed the permissions row to other rules (read at once: every group
    /// must use the new ones from this version on).
    pub(super) fn permissions_changed(&self, v: &VersionReady) -> bool {
        let table = self.permissions_table();
        if !v.tables.contains(&table) {
            return false;
        }
        let was_loaded = self.perms.borrow().loaded;
        self.reload_permissions() && was_loaded
    }

    /// New rules: every group's legacy queries are authorized again; those of connected
    /// groups now (rows the rules now deny leave, rows they allow arrive, in one poke),
    /// the others when a client returns.
    pub(super) fn reauthorize_legacy_queries(self: &Rc<Self>) {
        let groups: Vec<Rc<Group>> = self.groups.borrow().values().cloned().collect();
        for g in groups {
            if !g.queries.borrow().has_legacy() {
                continue;
            }
            g.queries.borrow_mut().mark_legacy_stale();
            if !g.has_connections() {
                continue;
            }
            let shard = self.clone();
            glommio::spawn_local(async move {
                if let Err(e) = g.rehydrate(&shard).await {
                    tracing::warn!(group = %g.id, error = %e, "re-authorizing queries failed");
                    g.fail_all(&e);
                }
            })
            .detach();
        }
    }

    /// A legacy AST with the read rules applied and bound to `auth_data` (the JWT payload;
    /// None: anonymous).
    pub fn authorize_read(&self, ast: &Ast, auth_data: Option<&serde_json::Value>) -> Ast {
        permissions::authorize_read(ast, self.permissions().as_deref(), auth_data)
    }
}
