//! The agent's configuration file: TOML or YAML with the seed's sections (`broker`, `rpc`,
//! `process_manager`, `collectors`) and `agent`. Unknown keys are refused; every error names
//! the file, the field and why.

use daemoneye_eventbus::broker::BrokerConfig;
use daemoneye_eventbus::rpc::RpcConfig;
use daemoneye_eventbus::supervisor::{CollectorSpec, ProcessManagerConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Why a configuration was refused. The message names the file, the field and why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The extension names no format this reader knows.
    #[error("{}: unknown configuration format; name the file *.toml, *.yaml or *.yml", path.display())]
    Format {
        /// The file.
        path: PathBuf,
    },
    /// The text does not parse, or names an unknown key (the parser's message shows the line,
    /// the key and the value).
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{}{reason}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Invalid {
        /// The file, when read from one.
        path: Option<PathBuf>,
        /// Which field and why.
        reason: String,
    },
    /// A bundled collector is not where it should be.
    #[error(
        "the bundled collector {name} is not at {}: install it there (from a checkout, \
         `cargo build --release` builds eventbus, procmond and netmond side by side), point \
         AgentOptions::bundled_dir at it when embedding the agent, or configure [[collectors]]",
        path.display()
    )]
    BundledMissing {
        /// The collector.
        name: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
}

fn invalid(reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: None,
        reason: reason.into(),
    }
}

/// The `agent` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSection {
    /// Seconds between statistics lines in the log, and `control.agent.status` reports.
    pub status_interval_seconds: u64,
    /// The live status view on a terminal (`false`: log lines only).
    pub live_view: bool,
    /// Detection rules, one per YAML or TOML file (`docs/rules.md`); unset: the built-in
    /// example rules.
    pub rules_dir: Option<PathBuf>,
    /// Deadline of a collection task and of a rule's query, in seconds.
    pub task_timeout_seconds: u64,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`host:port`), or `off`.
    /// Unset: [`DEFAULT_METRICS_LISTEN`] on loopback, skipped (logged) when another process
    /// holds it; set: that address, or the agent does not start. Unauthenticated, so another
    /// address exposes the figures to whoever reaches it.
    pub metrics_listen: Option<String>,
    /// The NATS JetStream bridge (`docs/operations.md`); unset: none.
    pub bridge: Option<daemoneye_eventbus_nats::BridgeConfig>,
}

/// Where the agent serves its metrics and health endpoints unless configured otherwise.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9477";

impl AgentSection {
    /// The metrics address: `None` when `metrics_listen` is `off`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] when it is neither `off` nor `host:port` (an IP address).
    pub fn metrics_addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        let text = self
            .metrics_listen
            .as_deref()
            .unwrap_or(DEFAULT_METRICS_LISTEN);
        if text == "off" {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            invalid(format!(
                "agent.metrics_listen must be `off` or an IP address and port such as {DEFAULT_METRICS_LISTEN}, not {text:?}"
            ))
        })
    }
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            status_interval_seconds: 10,
            live_view: true,
            rules_dir: None,
            task_timeout_seconds: 5,
            metrics_listen: None,
            bridge: None,
        }
    }
}

/// Everything the agent reads: the seeds' sections (`broker`, `rpc`, `process_manager`,
/// `collectors`) and `agent`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// The embedded broker.
    pub broker: BrokerConfig,
    /// Calls to the collectors: timeouts, retry policies per operation class.
    pub rpc: RpcConfig,
    /// The supervisor: shutdown, heartbeats, restarts.
    pub process_manager: ProcessManagerConfig,
    /// `None`: the bundled collectors (procmond and netmond), found beside the program.
    pub collectors: Option<Vec<CollectorSpec>>,
    /// The agent's own settings.
    pub agent: AgentSection,
}

/// The bundled collectors run when no `[[collectors]]` is configured: their names (also
/// their programs' names and their ids) and the event topics they publish on.
pub const BUNDLED: [(&str, &str); 2] = [
    ("procmond", "events.process.#"),
    ("netmond", "events.network.#"),
];

/// The file format, from the extension.
fn is_yaml(path: &Path) -> Result<bool, ConfigError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => Ok(false),
        Some("yaml" | "yml") => Ok(true),
        _ => Err(ConfigError::Format {
            path: path.to_owned(),
        }),
    }
}

impl AgentConfig {
    /// Reads and checks a file.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the file, the field and why.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let parse = |message: String| ConfigError::Parse {
            path: path.to_owned(),
            message,
        };
        let config: Self = if is_yaml(path)? {
            serde_norway::from_str(&text).map_err(|e| parse(e.to_string()))?
        } else {
            // The error's own text shows the line, the key and the value it refused.
            toml::from_str(&text).map_err(|e| parse(e.to_string()))?
        };
        config.validate().map_err(|e| match e {
            ConfigError::Invalid { reason, .. } => ConfigError::Invalid {
                path: Some(path.to_owned()),
                reason,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Checks every section.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.broker
            .validate()
            .map_err(|e| invalid(format!("broker: {e}")))?;
        self.rpc.validate().map_err(|e| invalid(e.to_string()))?;
        self.process_manager
            .validate()
            .map_err(|e| invalid(e.to_string()))?;
        if self.agent.status_interval_seconds == 0 {
            return Err(invalid("agent.status_interval_seconds must be at least 1"));
        }
        if !(1..=300).contains(&self.agent.task_timeout_seconds) {
            return Err(invalid("agent.task_timeout_seconds must be 1 to 300"));
        }
        if self.agent.metrics_addr()?.is_some()
            && self.agent.metrics_listen.is_some()
            && !cfg!(feature = "http")
        {
            return Err(invalid(
                "agent.metrics_listen: this build of the agent has no HTTP endpoint (the \
                 daemoneye-agent feature `http`, which the eventbus binary has); set it to \"off\"",
            ));
        }
        if let Some(b) = &self.agent.bridge {
            b.validate().map_err(|e| match e {
                // Each reason starts with the key it is about.
                daemoneye_eventbus_nats::BridgeError::Config(reason) => {
                    invalid(format!("agent.bridge.{reason}"))
                }
                other => invalid(other.to_string()),
            })?;
        }
        if let Some(dir) = &self.agent.rules_dir
            && !dir.is_dir()
        {
            return Err(invalid(format!(
                "agent.rules_dir {}: not a directory",
                dir.display()
            )));
        }
        if let Some(cs) = &self.collectors {
            let mut seen = std::collections::BTreeSet::new();
            for (i, c) in cs.iter().enumerate() {
                if daemoneye_eventbus::core::QueueGroup::new(&c.id).is_err() {
                    return Err(invalid(format!(
                        "collectors[{i}].id {:?}: 1 to 64 characters of a-z 0-9 _ -",
                        c.id
                    )));
                }
                if !seen.insert(&c.id) {
                    return Err(invalid(format!(
                        "collectors[{i}].id {:?} appears twice (instances of one type need \
                         distinct ids; the type is collector_type)",
                        c.id
                    )));
                }
                if c.collector_type.as_deref() == Some("") {
                    return Err(invalid(format!(
                        "collectors[{i}].collector_type is empty (leave it out: the id is the type)"
                    )));
                }
                if c.binary.as_os_str().is_empty() {
                    return Err(invalid(format!("collectors[{i}].binary is empty")));
                }
                let l = &c.limits;
                for (name, v) in [
                    ("max_memory_bytes", l.max_memory_bytes),
                    ("max_open_files", l.max_open_files),
                    ("max_cpu_seconds", l.max_cpu_seconds),
                ] {
                    if v == Some(0) {
                        return Err(invalid(format!(
                            "collectors[{i}].limits.{name} must be at least 1 (or left out)"
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// The collectors to run: the configured ones, or the bundled ones ([`BUNDLED`]) found in
    /// `bundled_dir`, each told the broker's endpoint `socket` and to heartbeat well within
    /// the heartbeat timeout.
    ///
    /// # Errors
    ///
    /// [`ConfigError::BundledMissing`] when a bundled collector is not in `bundled_dir`.
    pub fn collectors(
        &self,
        socket: &str,
        bundled_dir: &Path,
    ) -> Result<Vec<CollectorSpec>, ConfigError> {
        if let Some(cs) = &self.collectors {
            return Ok(cs.clone());
        }
        let every = (self.process_manager.health_check_interval_seconds / 4).max(1);
        BUNDLED
            .iter()
            .map(|&(name, events)| {
                let path = bundled_dir.join(name);
                if !path.is_file() {
                    return Err(ConfigError::BundledMissing { name, path });
                }
                let mut spec = CollectorSpec::new(name, path);
                spec.args = vec![
                    "--socket".into(),
                    socket.into(),
                    "--heartbeat-secs".into(),
                    every.to_string(),
                ];
                // What the default policy lets it publish, besides its health.
                spec.events = vec![events.into()];
                Ok(spec)
            })
            .collect()
    }

    /// The commented default configuration (`eventbus config default`).
    #[must_use]
    pub fn default_toml() -> String {
        let d = Self::default();
        let b = &d.broker;
        let r = &d.rpc;
        let p = &d.process_manager;
        let pol = &r.policies;
        format!(
            r#"# eventbus agent configuration (TOML; a .yaml/.yml file with the same keys works too).
# Every key is optional (a [rpc.policies.*] table, when given, needs all three of its keys);
# unknown keys are refused. `eventbus config check FILE` checks a file.

[broker]
{broker}

[rpc]
default_timeout_seconds = {dt}
health_check_interval_seconds = {hci}
enable_correlation_tracking = {ect}
max_pending_requests = {mpr}

[rpc.policies.lifecycle]              # start, stop, restart, status, shutdown
timeout_seconds = {lt}
max_retries = {lr}
backoff = {{ kind = "immediate" }}

[rpc.policies.health_check]           # health check, metrics, capabilities, collection tasks
timeout_seconds = {ht}
max_retries = {hr}
backoff = {{ kind = "exponential", initial_ms = 100, multiplier = 2.0, max_ms = 1000 }}

[rpc.policies.configuration]          # get, validate, update configuration
timeout_seconds = {ct}
max_retries = {cr}
backoff = {{ kind = "exponential", initial_ms = 500, multiplier = 2.0, max_ms = 5000 }}

[rpc.policies.heartbeat]
timeout_seconds = {bt}
max_retries = {br}
backoff = {{ kind = "immediate" }}

[process_manager]
graceful_shutdown_timeout_seconds = {gst}  # shutdown request, then SIGTERM
force_shutdown_timeout_seconds = {fst}      # SIGTERM, then SIGKILL
health_check_interval_seconds = {phc}     # heartbeats silent this long: Unhealthy
enable_auto_restart = {ear}
max_restart_attempts = {mra}
restart_backoff_seconds = {rbs}             # doubled per restart in a row

[agent]
status_interval_seconds = {asi}           # log line and control.agent.status report
live_view = {lv}                     # redraw a status view when stdout is a terminal
task_timeout_seconds = {tts}             # deadline of a collection task and of a rule's query
# metrics_listen = "{ml}"    # /metrics, /healthz, /readyz over HTTP; "off" to disable;
                                     # unset: this address, skipped if another process has it

# To NATS JetStream (docs/operations.md): unset, no bridge.
# [agent.bridge]
# url = "nats://nats.example:4222"
# name = "host1"                     # its durable subscription, clients and loop marker
# stream = "DAEMONEYE_HOST1"         # made if missing, subjects <subject_prefix>.>
# subject_prefix = "daemoneye.host1"
# outbound = ["events.#"]            # local filters sent out
# credentials_file = "/etc/daemoneye/nats.creds"   # or user + password, or token
# tls = {{ ca = "/etc/daemoneye/nats-ca.pem" }}
# window = 256                       # publishes in flight
# ack_timeout_seconds = 5
# duplicate_window_seconds = 120
# [[agent.bridge.inbound]]
# subject = "fleet.rules.>"
# topic_prefix = "fleet"             # local topic: fleet.<subject>
# rules_dir = "/etc/daemoneye/rules"  # detection rules (docs/rules.md); unset: the built-in ones

# Without [[collectors]], the agent runs the bundled procmond and netmond found next to
# `eventbus`. Several instances of one type take distinct ids and the same collector_type.
# [[collectors]]
# id = "procmond"
# collector_type = "procmond"         # default: the id
# binary = "/usr/local/bin/procmond"
# args = ["--scan-interval-ms", "500"]
# env = {{ EVENTBUS_LOG = "info" }}
# working_dir = "/"
# heartbeats = true
# enabled = true
# events = ["events.process.#"]      # topics the default policy lets it publish on
# limits = {{ max_memory_bytes = 268435456, max_open_files = 1024, max_cpu_seconds = 3600 }}
"#,
            broker = broker_section(b),
            dt = r.default_timeout_seconds,
            hci = r.health_check_interval_seconds,
            ect = r.enable_correlation_tracking,
            mpr = r.max_pending_requests,
            lt = pol.lifecycle.timeout_seconds,
            lr = pol.lifecycle.max_retries,
            ht = pol.health_check.timeout_seconds,
            hr = pol.health_check.max_retries,
            ct = pol.configuration.timeout_seconds,
            cr = pol.configuration.max_retries,
            bt = pol.heartbeat.timeout_seconds,
            br = pol.heartbeat.max_retries,
            gst = p.graceful_shutdown_timeout_seconds,
            fst = p.force_shutdown_timeout_seconds,
            phc = p.health_check_interval_seconds,
            ear = p.enable_auto_restart,
            mra = p.max_restart_attempts,
            rbs = p.restart_backoff_seconds,
            asi = d.agent.status_interval_seconds,
            lv = d.agent.live_view,
            tts = d.agent.task_timeout_seconds,
            ml = DEFAULT_METRICS_LISTEN,
        )
    }
}

/// `eventbus config check FILE`: what the file configures, in one line.
///
/// # Errors
///
/// [`ConfigError`] naming the file, the field and why.
pub fn check(path: &Path) -> Result<String, ConfigError> {
    let c = AgentConfig::load(path)?;
    let collectors = c.collectors.as_ref().map_or_else(
        || "the bundled collectors".to_owned(),
        |cs| format!("{} collector(s)", cs.len()),
    );
    Ok(format!("{}: ok ({collectors})", path.display()))
}

/// The path given, made absolute for messages.
#[must_use]
pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

/// Every key of `[broker]` with its default (serialised, so none is forgotten), and a note:
/// keys without a default are shown commented out, with an example.
fn broker_section(b: &daemoneye_eventbus::broker::BrokerConfig) -> String {
    const NOTES: &[(&str, &str, &str)] = &[
        (
            "socket_path",
            "\"/run/daemoneye/eventbus.sock\"",
            "default: $XDG_RUNTIME_DIR/daemoneye/eventbus.sock",
        ),
        (
            "tcp_listen",
            "\"127.0.0.1:4222\"",
            "also listen here (plain TCP, loopback only)",
        ),
        (
            "tls",
            "{ listen = \"0.0.0.0:4443\", cert = \"/etc/daemoneye/tls/broker.pem\", key = \"/etc/daemoneye/tls/broker.key\", client_ca = \"/etc/daemoneye/tls/clients-ca.pem\" }",
            "other hosts over mutual TLS",
        ),
        (
            "socket_group",
            "1000",
            "let a group reach the socket (mode 0660)",
        ),
        (
            "acl_file",
            "\"/etc/daemoneye/acl.toml\"",
            "default: the built-in policy (SECURITY.md)",
        ),
        (
            "audit_log",
            "\"/var/log/daemoneye/audit.log\"",
            "SHA-256-chained; eventbus audit verify",
        ),
        (
            "data_dir",
            "\"/var/lib/daemoneye/eventbus\"",
            "default: \"state\" beside the socket",
        ),
        ("max_connections", "", "connections beyond are refused"),
        (
            "max_connections_per_identity",
            "",
            "per uid and executable or TLS subject",
        ),
        ("max_subscribers", "", "subscribers of one topic filter"),
        (
            "startup_timeout_seconds",
            "",
            "binding and reading back data_dir",
        ),
        (
            "enable_statistics",
            "",
            "$sys.broker.stats (the seed's enable_metrics)",
        ),
        ("message_buffer_size", "", "each queue, messages"),
        ("subscriber_buffer_bytes", "", "each queue, bytes"),
        ("max_memory_bytes", "", "all queues together"),
        ("max_message_size", "", "largest payload"),
        ("allowed_uids", "", "empty: the agent's own uid and root"),
        (
            "fsync",
            "",
            "always | interval | never (durable subscriptions)",
        ),
        ("durable_full_policy", "", "drop_oldest | drop_new"),
    ];
    let value = serde_json::to_value(b).unwrap_or_default();
    let Some(keys) = value.as_object() else {
        return String::new();
    };
    let mut out = Vec::new();
    for (key, v) in keys {
        let note = NOTES.iter().find(|(k, ..)| k == key);
        let comment = note.map_or(String::new(), |(_, _, n)| format!("   # {n}"));
        let line = match (v, note) {
            (serde_json::Value::Null, Some((_, example, _))) => {
                format!("# {key} = {example}{comment}")
            }
            (serde_json::Value::Null, None) => format!("# {key} ={comment}"),
            (v, _) => {
                let mut t = toml::Table::new();
                match toml::Value::try_from(v) {
                    Ok(v) => {
                        t.insert(key.clone(), v);
                        format!(
                            "{}{comment}",
                            toml::to_string(&t).unwrap_or_default().trim_end()
                        )
                    }
                    Err(_) => format!("# {key} ={comment}"),
                }
            }
        };
        out.push(line);
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tmp() -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("eb-cfg-{}-{}", std::process::id(), fastrand_id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn fastrand_id() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u8(1);
        h.finish()
    }

    /// Without the HTTP endpoint built in, a metrics address is refused, not ignored.
    #[cfg(not(feature = "http"))]
    #[test]
    fn a_metrics_address_without_the_endpoint_is_refused() {
        let mut c = AgentConfig::default();
        assert!(
            c.validate().is_ok(),
            "unset: nothing served, nothing refused"
        );
        c.agent.metrics_listen = Some("127.0.0.1:9477".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("no HTTP endpoint"), "{e}");
        c.agent.metrics_listen = Some("off".into());
        assert!(c.validate().is_ok());
    }

    /// `eventbus config default` shows every broker and agent key, so none is forgotten
    /// when added.
    #[test]
    fn the_default_names_every_broker_and_agent_key() {
        let text = AgentConfig::default_toml();
        let broker =
            serde_json::to_value(daemoneye_eventbus::broker::BrokerConfig::default()).unwrap();
        let agent = serde_json::to_value(AgentSection::default()).unwrap();
        let keys = broker
            .as_object()
            .unwrap()
            .keys()
            .chain(agent.as_object().unwrap().keys());
        for key in keys {
            assert!(
                text.contains(&format!("\n{key} ="))
                    || text.contains(&format!("\n# {key} ="))
                    || text.contains(&format!("\n# [agent.{key}]")),
                "{key} missing from eventbus config default"
            );
        }
    }

    /// The seed's configuration sections, as seed 003 writes them, are accepted and act.
    #[test]
    fn the_seeds_sections_as_written_are_accepted() {
        let d = tmp();
        let p = write(
            &d,
            "seed.yaml",
            "broker:\n  socket_path: /tmp/daemoneye-eventbus.sock\n  startup_timeout_seconds: 30\n  \
             max_subscribers: 100\n  message_buffer_size: 10000\n  enable_metrics: true\n\
             rpc:\n  default_timeout_seconds: 30\n  health_check_interval_seconds: 60\n  \
             enable_correlation_tracking: true\n  max_pending_requests: 1000\n\
             process_manager:\n  graceful_shutdown_timeout_seconds: 60\n  \
             force_shutdown_timeout_seconds: 5\n  health_check_interval_seconds: 120\n  \
             enable_auto_restart: true\n  max_restart_attempts: 3\n  restart_backoff_seconds: 5\n",
        );
        let c = AgentConfig::load(&p).unwrap();
        assert_eq!(c.broker.max_subscribers, 100);
        assert_eq!(c.broker.startup_timeout_seconds, 30);
        assert_eq!(c.broker.message_buffer_size, 10_000);
        assert!(c.broker.enable_statistics);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_rules_directory_that_is_not_one_and_a_task_timeout_out_of_range_are_refused() {
        let d = tmp();
        let p = write(&d, "a.yaml", "agent:\n  rules_dir: /nonexistent/rules\n");
        let e = AgentConfig::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("agent.rules_dir /nonexistent/rules: not a directory"),
            "{e}"
        );
        let p = write(&d, "b.yaml", "agent:\n  task_timeout_seconds: 0\n");
        let e = AgentConfig::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("agent.task_timeout_seconds must be 1 to 300"),
            "{e}"
        );
        let p = write(
            &d,
            "c.yaml",
            &format!(
                "agent:\n  rules_dir: {}\n  task_timeout_seconds: 2\n",
                d.display()
            ),
        );
        let c = AgentConfig::load(&p).unwrap();
        assert_eq!(c.agent.rules_dir.as_deref(), Some(d.as_path()));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn the_commented_default_parses_to_the_defaults() {
        let d = tmp();
        let p = write(&d, "agent.toml", &AgentConfig::default_toml());
        assert_eq!(AgentConfig::load(&p).unwrap(), AgentConfig::default());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn toml_and_yaml_say_the_same_and_errors_name_file_and_field() {
        let d = tmp();
        let t = write(
            &d,
            "a.toml",
            "[process_manager]\nmax_restart_attempts = 7\n\n[[collectors]]\nid = \"netmond\"\nbinary = \"/bin/true\"\n",
        );
        let y = write(
            &d,
            "a.yaml",
            "process_manager:\n  max_restart_attempts: 7\ncollectors:\n  - id: netmond\n    binary: /bin/true\n",
        );
        let (ct, cy) = (
            AgentConfig::load(&t).unwrap(),
            AgentConfig::load(&y).unwrap(),
        );
        assert_eq!(ct, cy);
        assert_eq!(ct.process_manager.max_restart_attempts, 7);
        let unknown = write(&d, "u.toml", "[process_manager]\nmax_restarts = 1\n");
        let e = AgentConfig::load(&unknown).unwrap_err().to_string();
        assert!(e.contains("u.toml") && e.contains("max_restarts"), "{e}");
        let unknown = write(&d, "u.yml", "rpc:\n  max_pending: 3\n");
        let e = AgentConfig::load(&unknown).unwrap_err().to_string();
        assert!(e.contains("u.yml") && e.contains("max_pending"), "{e}");
        let bad = write(
            &d,
            "b.toml",
            "[process_manager]\nforce_shutdown_timeout_seconds = 0\n",
        );
        let e = AgentConfig::load(&bad).unwrap_err().to_string();
        assert!(
            e.contains("b.toml") && e.contains("force_shutdown_timeout_seconds"),
            "{e}"
        );
        let dup = write(
            &d,
            "d.toml",
            "[[collectors]]\nid = \"x\"\nbinary = \"/a\"\n[[collectors]]\nid = \"x\"\nbinary = \"/b\"\n",
        );
        let e = AgentConfig::load(&dup).unwrap_err().to_string();
        assert!(e.contains("collectors[1].id"), "{e}");
        for (name, text) in [
            (
                "l.toml",
                "[[collectors]]\nid = \"x\"\nbinary = \"/a\"\nlimits = { max_mem = 1 }\n",
            ),
            (
                "p.toml",
                "[rpc.policies.heartbeat]\ntimeout_seconds = 1\nmax_retries = 1\nbackoff = { kind = \"immediate\", initial_ms = 5 }\n",
            ),
        ] {
            let f = write(&d, name, text);
            let e = AgentConfig::load(&f).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
        let zero = write(
            &d,
            "z.toml",
            "[[collectors]]\nid = \"x\"\nbinary = \"/a\"\nlimits = { max_open_files = 0 }\n",
        );
        let e = AgentConfig::load(&zero).unwrap_err().to_string();
        assert!(e.contains("collectors[0].limits.max_open_files"), "{e}");
        let ext = write(&d, "c.json", "{}");
        assert!(
            AgentConfig::load(&ext)
                .unwrap_err()
                .to_string()
                .contains("*.toml")
        );
        let _ = std::fs::remove_dir_all(d);
    }
}
