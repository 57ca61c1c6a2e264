//! Reads a detection rule file, as YAML and as TOML. Must never panic: a rule is accepted or
//! refused with a reason, and an accepted one reads at least one known table and is one
//! read-only SELECT as far as the SQL parser can tell.
#![no_main]

use daemoneye_agent::rules::{check_sql, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for name in ["fuzz.yaml", "fuzz.toml"] {
        match parse(name, text) {
            Ok(rule) => {
                assert!(!rule.tables.is_empty());
                assert_eq!(check_sql(&rule.sql).ok(), Some(rule.tables.clone()));
            }
            Err(e) => assert!(!e.reason.is_empty()),
        }
    }
    // The text as a query on its own.
    if let Ok(tables) = check_sql(text) {
        assert!(!tables.is_empty());
    }
});
