//! A collector's answer to a collection task, as the agent takes it: decoded, aggregated and
//! loaded into SQLite, then queried. A collector may send anything; this must never panic,
//! never merge an answer twice, and either load the rows or refuse them with a reason.
#![no_main]

use daemoneye_agent::engine::Engine;
use daemoneye_agent::tasks::{Accepted, Aggregate};
use daemoneye_eventbus::schema::rpc::TaskResponse;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use std::collections::BTreeSet;
use std::time::Duration;

fuzz_target!(|data: &[u8]| {
    let Ok(answer) = TaskResponse::decode(data) else {
        return;
    };
    let mut aggregate = Aggregate::new(&answer.task_id, ["procmond".to_owned()]);
    assert_eq!(aggregate.accept("procmond", answer.clone()), Accepted::New);
    assert_eq!(aggregate.accept("procmond", answer), Accepted::Duplicate);
    let outcome = aggregate.complete(&BTreeSet::new());
    let mut engine = Engine::new().unwrap();
    if engine.load(&outcome.tables).is_ok() {
        let out = engine
            .query("SELECT count(*) FROM processes", Duration::from_secs(5))
            .unwrap();
        assert_eq!(out.rows.len(), 1);
    }
});
