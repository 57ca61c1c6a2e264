//! How `sub`, `request` and `stats` print.

use base64::Engine as _;
use daemoneye_eventbus::{BrokerStats, Message};
use std::io::{self, Write};

/// Prints one message: `topic payload` as text, or one JSON object with `--json`.
pub(crate) fn print_message(out: &mut impl Write, msg: &Message, json: bool) -> io::Result<()> {
    let text = std::str::from_utf8(msg.payload()).ok();
    if !json {
        if let Some(event) = decode_known(msg) {
            return writeln!(out, "{} {}", msg.topic(), event);
        }
        return match text {
            Some(t) => writeln!(out, "{} {}", msg.topic(), t),
            None => writeln!(out, "{} <{} bytes>", msg.topic(), msg.payload().len()),
        };
    }
    writeln!(out, "{}", serde_json::Value::Object(message_json(msg)))
}

/// A message as a JSON object: topic, payload (text, or base64 when not UTF-8), size, id,
/// correlation id, publisher.
pub(crate) fn message_json(msg: &Message) -> serde_json::Map<String, serde_json::Value> {
    let h = msg.header();
    let text = std::str::from_utf8(msg.payload()).ok();
    let mut obj = serde_json::Map::new();
    obj.insert("topic".into(), msg.topic().as_str().into());
    match text {
        Some(t) => obj.insert("payload".into(), t.into()),
        None => obj.insert(
            "payload_base64".into(),
            base64::engine::general_purpose::STANDARD
                .encode(msg.payload())
                .into(),
        ),
    };
    obj.insert("size".into(), msg.payload().len().into());
    obj.insert("message_id".into(), h.id.to_string().into());
    let corr = h.correlation.as_ref().map(|c| c.correlation_id.clone());
    obj.insert("correlation_id".into(), corr.into());
    obj.insert("publisher".into(), h.source.as_str().into());
    if let Some(event) = decode_known(msg) {
        obj.insert("event".into(), event);
    }
    obj
}

fn process_json(p: &daemoneye_eventbus::schema::events::ProcessEvent) -> serde_json::Value {
    serde_json::json!({
        "pid": p.pid,
        "name": p.name,
        "command_line": p.command_line,
        "executable_path": p.executable_path,
        "ppid": p.ppid,
        "start_time_ns": p.start_time_ns,
        "metadata": p.metadata.iter().collect::<std::collections::BTreeMap<_, _>>(),
    })
}

fn network_json(n: &daemoneye_eventbus::schema::events::NetworkEvent) -> serde_json::Value {
    use daemoneye_eventbus::schema::events as epb;
    let change = epb::SocketChange::try_from(n.change).map_or("unknown", |c| match c {
        epb::SocketChange::Opened => "opened",
        epb::SocketChange::Closed => "closed",
        epb::SocketChange::Present => "present",
        epb::SocketChange::Unspecified => "unspecified",
    });
    let protocol = epb::Protocol::try_from(n.protocol).map_or("unknown", |p| match p {
        epb::Protocol::Tcp => "tcp",
        epb::Protocol::Udp => "udp",
        epb::Protocol::Unspecified => "unspecified",
    });
    serde_json::json!({
        "change": change,
        "protocol": protocol,
        "ip_version": n.ip_version,
        "local_address": n.local_address,
        "local_port": n.local_port,
        "remote_address": n.remote_address,
        "remote_port": n.remote_port,
        "state": n.state,
        "inode": n.inode,
        "uid": n.uid,
        "pid": n.pid,
        "process_name": n.process_name,
        "observed_at_ns": n.observed_at_ns,
    })
}

/// The decoded fields of a message whose topic has a known schema (`None` otherwise, or when
/// the payload does not decode).
pub(crate) fn decode_known(msg: &Message) -> Option<serde_json::Value> {
    use daemoneye_eventbus::schema::{events as epb, rpc as rpb};
    use prost::Message as _;
    let topic = msg.topic().as_str();
    let payload = msg.payload().as_ref();
    let segments: Vec<&str> = topic.split('.').collect();
    match segments.as_slice() {
        ["events", "process", "batch"] => {
            let b = epb::ProcessBatch::decode(payload).ok()?;
            Some(serde_json::json!({
                "collector_id": b.collector_id,
                "collected_at_ns": b.collected_at_ns,
                "processes": b.processes.iter().map(process_json).collect::<Vec<_>>(),
            }))
        }
        ["events", "process", "integrity"] => {
            let h = epb::ExecutableHash::decode(payload).ok()?;
            Some(serde_json::json!({
                "pid": h.pid,
                "executable_path": h.executable_path,
                "sha256": h.sha256,
                "size_bytes": h.size_bytes,
            }))
        }
        ["events", "process", _] => {
            let e = epb::CollectionEvent::decode(payload).ok()?;
            match e.event? {
                epb::collection_event::Event::Process(p) => Some(process_json(&p)),
            }
        }
        ["events", "network", "batch"] => {
            let b = epb::NetworkBatch::decode(payload).ok()?;
            Some(serde_json::json!({
                "collector_id": b.collector_id,
                "collected_at_ns": b.collected_at_ns,
                "sockets": b.sockets.iter().map(network_json).collect::<Vec<_>>(),
            }))
        }
        ["events", "network", "connections"] => {
            Some(network_json(&epb::NetworkEvent::decode(payload).ok()?))
        }
        ["events", "alert", _] => {
            let a = epb::Alert::decode(payload).ok()?;
            let severity =
                epb::Severity::try_from(a.severity).map_or("unknown", |s| s.as_str_name());
            Some(serde_json::json!({
                "rule_id": a.rule_id,
                "rule_name": a.rule_name,
                "severity": severity.to_ascii_lowercase(),
                "description": a.description,
                "rows": a.rows.iter().map(|r| &r.columns).collect::<Vec<_>>(),
                "rows_left_out": a.rows_left_out,
                "task_correlation_id": a.task_correlation_id,
                "answered": a.answered,
                "missing": a.missing,
                "raised_at_ns": a.raised_at_ns,
                "event_correlation_ids": a.event_correlation_ids,
            }))
        }
        ["control", "agent", "status"] => serde_json::from_slice(payload).ok(),
        ["control", "health", "heartbeat", _] => {
            let h = rpb::Heartbeat::decode(payload).ok()?;
            let status =
                rpb::HealthStatus::try_from(h.status).map_or("unknown", |s| s.as_str_name());
            Some(serde_json::json!({
                "collector_id": h.collector_id,
                "sequence": h.sequence,
                "timestamp_ns": h.timestamp_ns,
                "status": status,
                "pid": h.pid,
            }))
        }
        _ => None,
    }
}

/// Prints a statistics snapshot as a table.
pub(crate) fn print_stats(out: &mut impl Write, s: &BrokerStats) -> io::Result<()> {
    let rows = [
        ("uptime (s)", s.uptime_secs),
        ("published", s.published),
        ("delivered", s.delivered),
        ("dropped", s.dropped),
        ("bytes in", s.bytes_in),
        ("bytes out", s.bytes_out),
        ("active connections", s.active_connections),
        ("total connections", s.total_connections),
        ("refused connections", s.refused_connections),
        ("protocol errors", s.protocol_errors),
        ("rejected publishes", s.rejected_publishes),
        ("requests w/o responders", s.no_responders),
        ("group deliveries re-offered", s.reoffered),
        ("message runs received", s.runs),
        ("subscriptions", s.active_subscriptions),
        ("topics (distinct filters)", s.active_topics),
        ("queued bytes", s.queued_bytes),
        ("subscription bytes", s.subscription_bytes),
        ("memory cap (bytes)", s.memory_cap_bytes),
        ("stalled subscriptions", s.stalled),
    ];
    for (k, v) in rows {
        writeln!(out, "{k:<28} {v}")?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<8} {:<20} {:<22} {:>5} {:>10} {:>10} {:>8} {:>7}",
        "session", "name", "peer", "subs", "published", "delivered", "dropped", "queued"
    )?;
    for c in &s.connections {
        writeln!(
            out,
            "{:<8} {:<20} {:<22} {:>5} {:>10} {:>10} {:>8} {:>7}",
            c.session_id,
            c.name,
            c.peer,
            c.subscriptions,
            c.published,
            c.delivered,
            c.dropped,
            c.queued_messages
        )?;
    }
    if !s.subscriptions.is_empty() {
        writeln!(out)?;
        writeln!(
            out,
            "{:<20} {:<22} {:>8} {:>8} {:>10} {:>8} {:>8} {:<8} filters",
            "durable",
            "attached to",
            "pending",
            "unacked",
            "delivered",
            "redeliv",
            "dropped",
            "state"
        )?;
        for d in &s.subscriptions {
            let attached = match (&d.client, d.session_id) {
                (Some(c), Some(id)) => format!("{c} ({id})"),
                _ => "-".into(),
            };
            let state = if d.stalled {
                "stalled"
            } else if d.session_id.is_some() {
                "active"
            } else {
                "waiting"
            };
            writeln!(
                out,
                "{:<20} {:<22} {:>8} {:>8} {:>10} {:>8} {:>8} {:<8} {}",
                d.durable.as_deref().unwrap_or("-"),
                attached,
                d.pending,
                d.unacked,
                d.delivered,
                d.redelivered,
                d.dropped,
                state,
                d.filters.join(" ")
            )?;
        }
    }
    Ok(())
}
