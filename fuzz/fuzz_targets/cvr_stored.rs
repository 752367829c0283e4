//! A client group's stored record comes back from the CVR database, which other processes
//! (an older zcache, an operator) may have written: reading it must never panic, and a
//! record that loads must flush back to the same configuration.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zcache::cvr::store::Loaded;
use zcache::cvr::{Cvr, StoredRow};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\u{1}');
    let version = parts.next().unwrap_or_default().to_string();
    let config = parts.next().unwrap_or_default().to_string();
    let rows = parts
        .next()
        .unwrap_or_default()
        .split('\u{2}')
        .map(|r| {
            let mut f = r.split('\u{3}');
            let mut next = || f.next().unwrap_or_default().to_string();
            StoredRow {
                table: next(),
                key: next(),
                patch: next(),
                queries: next().split(',').filter(|q| !q.is_empty()).map(String::from).collect(),
                digest: next().parse().ok(),
            }
        })
        .collect();
    let loaded = Loaded { version, config, rows };
    if let Ok(mut cvr) = Cvr::from_stored("g", loaded) {
        cvr.force_flush();
        let batch = cvr.take_flush().expect("a forced flush writes the configuration");
        let again = Cvr::from_stored(
            "g",
            Loaded { version: batch.version, config: batch.config, rows: vec![] },
        );
        assert!(again.is_ok(), "a loaded record flushes to a loadable one");
    }
});
