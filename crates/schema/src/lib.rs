//! Protocol Buffers schemas of daemoneye-eventbus (`proto/` in this crate), compiled with
//! protox and prost at build time. Unknown fields are tolerated, so schemas evolve compatibly.

/// `daemoneye.events.v1`: event payloads.
#[allow(missing_docs, clippy::all)]
pub mod events {
    include!(concat!(env!("OUT_DIR"), "/daemoneye.events.v1.rs"));
}

/// `daemoneye.rpc.v1`: collector service requests and responses.
#[allow(missing_docs, clippy::all)]
pub mod rpc {
    include!(concat!(env!("OUT_DIR"), "/daemoneye.rpc.v1.rs"));
}

impl rpc::LifecycleRequest {
    /// Start `collector_type` (its id is the type unless set), with an optional configuration.
    pub fn start(collector_type: &str, config: Option<rpc::CollectorConfig>) -> Self {
        Self {
            collector_id: collector_type.to_owned(),
            collector_type: collector_type.to_owned(),
            config,
            ..Self::default()
        }
    }

    /// Stop `collector_id`: gracefully (shutdown request, then SIGTERM, then SIGKILL) or at
    /// once.
    pub fn stop(collector_id: &str, graceful: bool) -> Self {
        Self {
            collector_id: collector_id.to_owned(),
            force: !graceful,
            ..Self::default()
        }
    }

    /// Restart `collector_id`, with a new configuration if given.
    pub fn restart(collector_id: &str, config: Option<rpc::CollectorConfig>) -> Self {
        Self {
            collector_id: collector_id.to_owned(),
            config,
            ..Self::default()
        }
    }

    /// Status of `collector_id`.
    pub fn status(collector_id: &str) -> Self {
        Self {
            collector_id: collector_id.to_owned(),
            ..Self::default()
        }
    }
}

impl rpc::CollectorOperation {
    /// The request body this operation carries (its `oneof` field name).
    pub fn body_name(self) -> &'static str {
        use rpc::CollectorOperation as O;
        match self {
            O::Start | O::Stop | O::Restart | O::Status | O::Pause | O::Resume => "lifecycle",
            O::HealthCheck => "health_check",
            O::Heartbeat => "heartbeat",
            O::GetMetrics => "metrics",
            O::GetConfig => "get_config",
            O::ValidateConfig => "validate_config",
            O::UpdateConfig => "update_config",
            O::GetCapabilities => "capabilities",
            O::Shutdown => "shutdown",
            O::ExecuteTask => "task",
            O::Unspecified => "none",
        }
    }
}

impl rpc::rpc_request::Body {
    /// The `oneof` field name of this body.
    pub fn name(&self) -> &'static str {
        use rpc::rpc_request::Body as B;
        match self {
            B::Lifecycle(_) => "lifecycle",
            B::HealthCheck(_) => "health_check",
            B::Heartbeat(_) => "heartbeat",
            B::Metrics(_) => "metrics",
            B::GetConfig(_) => "get_config",
            B::ValidateConfig(_) => "validate_config",
            B::UpdateConfig(_) => "update_config",
            B::Capabilities(_) => "capabilities",
            B::Shutdown(_) => "shutdown",
            B::Task(_) => "task",
        }
    }
}

impl rpc::rpc_response::Body {
    /// The `oneof` field name of this body (the same names as the request's).
    pub fn name(&self) -> &'static str {
        use rpc::rpc_response::Body as B;
        match self {
            B::Lifecycle(_) => "lifecycle",
            B::HealthCheck(_) => "health_check",
            B::Heartbeat(_) => "heartbeat",
            B::Metrics(_) => "metrics",
            B::Config(_) => "get_config",
            B::ValidateConfig(_) => "validate_config",
            B::UpdateConfig(_) => "update_config",
            B::Capabilities(_) => "capabilities",
            B::Shutdown(_) => "shutdown",
            B::Task(_) => "task",
        }
    }
}
