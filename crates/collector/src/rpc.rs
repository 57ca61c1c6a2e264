//! The collector services over RPC: typed requests and responses (`proto/rpc.proto`), a
//! caller with retry policies per operation class, and a server side for collectors.
//!
//! ```no_run
//! # async fn demo(client: daemoneye_eventbus_client::Client) -> Result<(), Box<dyn std::error::Error>> {
//! use daemoneye_eventbus_collector::rpc::{
//!     CollectorLifecycleRequest, CollectorOperation, CollectorRpcClient, RpcConfig, RpcRequest,
//! };
//! use std::time::Duration;
//!
//! let rpc_client = CollectorRpcClient::new(client, "agent-id", RpcConfig::default());
//! let request = RpcRequest::lifecycle(
//!     "agent-id".to_string(),
//!     "control.collector.procmond".to_string(),
//!     CollectorOperation::Start,
//!     CollectorLifecycleRequest::start("procmond", None),
//!     Duration::from_secs(30),
//! );
//! let response = rpc_client.call(request, Duration::from_secs(30)).await?;
//! println!("started: {:?}", response.lifecycle());
//! # Ok(()) }
//! ```

mod policy;
mod service;

pub use policy::{Backoff, OperationClass, RetryPolicies, RetryPolicy, RpcConfig};
pub use service::{
    CollectorCall, CollectorHandler, CollectorService, serve_collector, serve_services_at,
};

pub use daemoneye_eventbus_client::{RpcError, RpcErrorKind};
pub use daemoneye_eventbus_schema::rpc::{
    CapabilitiesResponse, CollectorConfig, CollectorOperation, CollectorState, CollectorStatus,
    ConfigResponse, ConfigValidationError, HealthCheckResponse, HealthStatus, Heartbeat,
    LifecycleResponse, MetricsResponse, ResourceLimits, ShutdownResponse, TableRows, TaskRequest,
    TaskResponse, UpdateConfigResponse, ValidateConfigResponse, rpc_request, rpc_response,
};

/// The body of start / stop / restart / status requests (the seed's name).
pub type CollectorLifecycleRequest = daemoneye_eventbus_schema::rpc::LifecycleRequest;

use daemoneye_eventbus_client::{Client, Request};
use daemoneye_eventbus_core::{CorrelationMetadata, Topic};
use daemoneye_eventbus_schema::rpc as pb;
use prost::Message as _;
use std::time::{Duration, Instant};

/// A call to a collector: who calls, which collector (its topic), the operation, its body
/// and the deadline of each attempt.
#[derive(Debug, Clone)]
pub struct RpcRequest {
    /// The caller's id (sent in the request, for logs and audit).
    pub client_id: String,
    /// The collector's RPC topic, e.g. `control.collector.procmond`.
    pub target: String,
    /// The operation.
    pub operation: CollectorOperation,
    /// The operation's body.
    pub body: rpc_request::Body,
    /// Deadline of each attempt.
    pub timeout: Duration,
    /// Correlation metadata to send (default: a new root).
    pub correlation: Option<CorrelationMetadata>,
}

impl RpcRequest {
    fn new(
        client_id: String,
        target: String,
        operation: CollectorOperation,
        body: rpc_request::Body,
        timeout: Duration,
    ) -> Self {
        Self {
            client_id,
            target,
            operation,
            body,
            timeout,
            correlation: None,
        }
    }

    /// A lifecycle call: `operation` is `Start`, `Stop`, `Restart` or `Status`.
    pub fn lifecycle(
        client_id: String,
        target: String,
        operation: CollectorOperation,
        request: CollectorLifecycleRequest,
        timeout: Duration,
    ) -> Self {
        Self::new(
            client_id,
            target,
            operation,
            rpc_request::Body::Lifecycle(request),
            timeout,
        )
    }

    /// A health check (with the collector's metrics).
    pub fn health_check(client_id: String, target: String, timeout: Duration) -> Self {
        let body = rpc_request::Body::HealthCheck(pb::HealthCheckRequest {
            collector_id: collector_of(&target),
            include_metrics: true,
        });
        Self::new(
            client_id,
            target,
            CollectorOperation::HealthCheck,
            body,
            timeout,
        )
    }

    /// A heartbeat with sequence number `sequence`.
    pub fn heartbeat(client_id: String, target: String, sequence: u64, timeout: Duration) -> Self {
        let body = rpc_request::Body::Heartbeat(pb::HeartbeatRequest {
            collector_id: collector_of(&target),
            sequence,
        });
        Self::new(
            client_id,
            target,
            CollectorOperation::Heartbeat,
            body,
            timeout,
        )
    }

    /// The collector's metrics.
    pub fn get_metrics(client_id: String, target: String, timeout: Duration) -> Self {
        let body = rpc_request::Body::Metrics(pb::MetricsRequest {
            collector_id: collector_of(&target),
        });
        Self::new(
            client_id,
            target,
            CollectorOperation::GetMetrics,
            body,
            timeout,
        )
    }

    /// The collector's current configuration.
    pub fn get_config(client_id: String, target: String, timeout: Duration) -> Self {
        let body = rpc_request::Body::GetConfig(pb::GetConfigRequest {
            collector_id: collector_of(&target),
        });
        Self::new(
            client_id,
            target,
            CollectorOperation::GetConfig,
            body,
            timeout,
        )
    }

    /// Validates `config` without applying it.
    pub fn validate_config(
        client_id: String,
        target: String,
        config: CollectorConfig,
        timeout: Duration,
    ) -> Self {
        let body = rpc_request::Body::ValidateConfig(pb::ValidateConfigRequest {
            collector_id: collector_of(&target),
            config: Some(config),
        });
        Self::new(
            client_id,
            target,
            CollectorOperation::ValidateConfig,
            body,
            timeout,
        )
    }

    /// Applies `config` (or only validates it, with `validate_only`).
    pub fn update_config(
        client_id: String,
        target: String,
        config: CollectorConfig,
        validate_only: bool,
        timeout: Duration,
    ) -> Self {
        let body = rpc_request::Body::UpdateConfig(pb::UpdateConfigRequest {
            collector_id: collector_of(&target),
            new_config: Some(config),
            validate_only,
        });
        Self::new(
            client_id,
            target,
            CollectorOperation::UpdateConfig,
            body,
            timeout,
        )
    }

    /// What the collector can do.
    pub fn capabilities(client_id: String, target: String, timeout: Duration) -> Self {
        let body = rpc_request::Body::Capabilities(pb::CapabilitiesRequest {});
        Self::new(
            client_id,
            target,
            CollectorOperation::GetCapabilities,
            body,
            timeout,
        )
    }

    /// A collection task for collector `collector_id`: the rows of `tables` (sent on
    /// `control.collector.task.<collector_id>`).
    pub fn task(
        client_id: String,
        collector_id: &str,
        task: pb::TaskRequest,
        timeout: Duration,
    ) -> Self {
        Self::new(
            client_id,
            format!(
                "{}.{collector_id}",
                daemoneye_eventbus_core::catalog::collector::task()
            ),
            CollectorOperation::ExecuteTask,
            rpc_request::Body::Task(task),
            timeout,
        )
    }

    /// Asks the collector to shut down gracefully within `grace`.
    pub fn shutdown(
        client_id: String,
        target: String,
        reason: &str,
        grace: Duration,
        timeout: Duration,
    ) -> Self {
        let body = rpc_request::Body::Shutdown(pb::ShutdownRequest {
            reason: reason.to_owned(),
            timeout_seconds: u32::try_from(grace.as_secs()).unwrap_or(u32::MAX),
        });
        Self::new(
            client_id,
            target,
            CollectorOperation::Shutdown,
            body,
            timeout,
        )
    }

    /// Sends this correlation metadata.
    #[must_use]
    pub fn with_correlation(mut self, meta: CorrelationMetadata) -> Self {
        self.correlation = Some(meta);
        self
    }

    /// The encoded request envelope.
    pub fn encode(&self) -> Vec<u8> {
        pb::RpcRequest {
            client_id: self.client_id.clone(),
            operation: self.operation as i32,
            body: Some(self.body.clone()),
        }
        .encode_to_vec()
    }
}

/// The collector id at the end of `control.collector.<id>`.
fn collector_of(target: &str) -> String {
    target.rsplit('.').next().unwrap_or(target).to_owned()
}

/// A collector's answer: the operation and its typed body.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcResponse(pub pb::RpcResponse);

macro_rules! body_accessor {
    ($(#[$m:meta])* $name:ident, $variant:ident, $ty:ty) => {
        $(#[$m])*
        pub fn $name(&self) -> Option<&$ty> {
            match &self.0.body {
                Some(rpc_response::Body::$variant(b)) => Some(b),
                _ => None,
            }
        }
    };
}

impl RpcResponse {
    /// The operation answered.
    pub fn operation(&self) -> CollectorOperation {
        CollectorOperation::try_from(self.0.operation).unwrap_or(CollectorOperation::Unspecified)
    }
    body_accessor!(
        /// The lifecycle answer.
        lifecycle, Lifecycle, LifecycleResponse);
    body_accessor!(
        /// The health check answer.
        health_check, HealthCheck, HealthCheckResponse);
    body_accessor!(
        /// The heartbeat answer.
        heartbeat, Heartbeat, Heartbeat);
    body_accessor!(
        /// The metrics.
        metrics, Metrics, MetricsResponse);
    body_accessor!(
        /// The configuration.
        config, Config, ConfigResponse);
    body_accessor!(
        /// The validation result.
        validation, ValidateConfig, ValidateConfigResponse);
    body_accessor!(
        /// The update result.
        update, UpdateConfig, UpdateConfigResponse);
    body_accessor!(
        /// The capabilities.
        capabilities, Capabilities, CapabilitiesResponse);
    body_accessor!(
        /// The rows a collection task asked for.
        task, Task, TaskResponse);
    body_accessor!(
        /// The shutdown answer.
        shutdown, Shutdown, ShutdownResponse);
}

/// Calls collectors, applying the retry policy of each operation class.
#[derive(Debug, Clone)]
pub struct CollectorRpcClient {
    client: Client,
    client_id: String,
    config: RpcConfig,
}

impl CollectorRpcClient {
    /// A caller identified as `client_id` (sent in requests that name no caller), with these
    /// policies.
    pub fn new(client: Client, client_id: &str, config: RpcConfig) -> Self {
        Self {
            client,
            client_id: client_id.to_owned(),
            config,
        }
    }

    /// The underlying bus client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The policies in force.
    pub fn config(&self) -> &RpcConfig {
        &self.config
    }

    /// Calls a collector. Each attempt waits up to the shorter of the request's timeout and
    /// its operation class's `timeout_seconds`; transient failures (timeout, no responders,
    /// communication errors, busy) are retried per the class's policy while `timeout` — the
    /// deadline of the whole call, `rpc.default_timeout_seconds` when zero — allows. The last
    /// failure is returned.
    ///
    /// # Errors
    ///
    /// An [`RpcError`] with its kind; `InvalidOperation` also when the request is malformed
    /// (its body does not match its operation, or the target is not a valid topic).
    pub async fn call(
        &self,
        mut request: RpcRequest,
        timeout: Duration,
    ) -> Result<RpcResponse, RpcError> {
        if request.client_id.is_empty() {
            request.client_id.clone_from(&self.client_id);
        }
        let target = Topic::new(&request.target).map_err(|e| {
            RpcError::new(
                RpcErrorKind::InvalidOperation,
                format!("invalid target {:?}: {e}", request.target),
            )
        })?;
        if request.body.name() != request.operation.body_name() {
            return Err(RpcError::new(
                RpcErrorKind::InvalidOperation,
                format!(
                    "operation {} needs a {} body, not {}",
                    request.operation.as_str_name(),
                    request.operation.body_name(),
                    request.body.name()
                ),
            ));
        }
        let policy = self.config.policies.for_operation(request.operation);
        let timeout = if timeout.is_zero() {
            Duration::from_secs(self.config.default_timeout_seconds)
        } else {
            timeout
        };
        let attempt_timeout = request.timeout.min(policy.timeout());
        let payload = bytes::Bytes::from(request.encode());
        let started = Instant::now();
        let mut retry = 0;
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            let mut req = Request::new(target.clone(), payload.clone())
                .timeout(attempt_timeout.min(left).max(Duration::from_millis(1)))
                .operation(request.operation.as_str_name().to_ascii_lowercase());
            if let Some(meta) = request
                .correlation
                .clone()
                .filter(|_| self.config.enable_correlation_tracking)
            {
                req = req.correlation(meta);
            }
            let err = match self.client.call(req).await {
                Ok(reply) => return decode_response(&reply, request.operation),
                Err(e) => e,
            };
            let Some(delay) = policy
                .delay_before_retry(retry)
                .filter(|_| err.kind.is_transient())
            else {
                return Err(err);
            };
            if started.elapsed() + delay >= timeout {
                return Err(err);
            }
            tracing::debug!(error = %err, retry, "retrying {}", request.operation.as_str_name());
            tokio::time::sleep(delay).await;
            retry += 1;
        }
    }
}

fn decode_response(
    reply: &daemoneye_eventbus_core::Message,
    operation: CollectorOperation,
) -> Result<RpcResponse, RpcError> {
    let response = pb::RpcResponse::decode(reply.payload().as_ref()).map_err(|e| {
        RpcError::new(
            RpcErrorKind::CommunicationError,
            format!(
                "the reply to {} is not an RpcResponse: {e}",
                operation.as_str_name()
            ),
        )
    })?;
    let response = RpcResponse(response);
    if response.operation() != operation {
        return Err(RpcError::new(
            RpcErrorKind::CommunicationError,
            format!(
                "asked for {} but the reply answers {}",
                operation.as_str_name(),
                response.operation().as_str_name()
            ),
        ));
    }
    Ok(response)
}
