//! A plain (not replication) connection for one caller at a time: opened at the first query
//! and again after an I/O error; a server error (a failed statement) leaves it open. Strings
//! are standard-conforming, as the callers' literal quoting assumes.

use super::{connect, ConnConfig, PgConn, PgError, PgStream, QueryResult};

pub struct Session {
    cfg: ConnConfig,
    conn: Option<PgConn<PgStream>>,
}

impl Session {
    pub fn new(cfg: ConnConfig) -> Self {
        Session { cfg, conn: None }
    }

    /// Runs `sql` (one or more statements) with the simple-query protocol.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<QueryResult>, PgError> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => {
                let mut conn = connect(&self.cfg, false).await?;
                conn.execute("SET standard_conforming_strings = on").await?;
                conn
            }
        };
        let result = conn.simple_query(sql).await;
        if result
            .as_ref()
            .map_or_else(|e| e.code().is_some(), |_| true)
        {
            self.conn = Some(conn);
        }
        result
    }
}
