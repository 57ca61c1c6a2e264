//! The collector side: answer the collector services on `control.collector.<id>`, and
//! collection tasks on `control.collector.task.<id>`.

use super::{CollectorOperation, rpc_request, rpc_response};
use bytes::Bytes;
use daemoneye_eventbus_client::{Client, ServeOptions, Service, SubscribeError};
use daemoneye_eventbus_core::{Message, QueueGroup, ReplyStatus, catalog};
use daemoneye_eventbus_schema::rpc as pb;
use prost::Message as _;
use std::future::Future;
use std::sync::Arc;

/// One decoded request, as given to a [`CollectorHandler`].
#[derive(Debug, Clone)]
pub struct CollectorCall {
    /// The operation (never `Unspecified`).
    pub operation: CollectorOperation,
    /// Its body, already checked to match the operation.
    pub body: rpc_request::Body,
    /// Who called.
    pub client_id: String,
    /// The request message (correlation metadata, deadline, source).
    pub message: Message,
}

/// A collector's implementation of the services. Return the response body of the operation,
/// or a [`ReplyStatus`]: `ReplyStatus::invalid_operation` for an operation this collector
/// does not support, `ReplyStatus::execution_error` when it failed.
pub trait CollectorHandler: Send + Sync + 'static {
    /// Handles one call.
    fn handle(
        &self,
        call: CollectorCall,
    ) -> impl Future<Output = Result<rpc_response::Body, ReplyStatus>> + Send;

    /// The broker's policy refused the collection tasks' topic: they will not come.
    fn tasks_refused(&self) {}
}

/// What [`serve_collector`] serves: the collector's services, and its collection tasks when
/// the broker's policy lets it take them. Drain it to stop.
#[derive(Debug)]
pub struct CollectorService {
    calls: Service,
    tasks: Option<Service>,
}

impl CollectorService {
    /// Whether collection tasks are served (the policy may refuse their topic).
    #[must_use]
    pub fn takes_tasks(&self) -> bool {
        self.tasks.is_some()
    }

    /// Stops taking calls and tasks, and waits at most `timeout` for those in hand.
    pub async fn drain(self, timeout: std::time::Duration) {
        match self.tasks {
            Some(tasks) => {
                tokio::join!(self.calls.drain(timeout), tasks.drain(timeout));
            }
            None => self.calls.drain(timeout).await,
        }
    }
}

/// Serves the collector services of `collector_id` on `control.collector.<collector_id>`, and
/// its collection tasks (`EXECUTE_TASK`, and nothing else) on
/// `control.collector.task.<collector_id>`, each in queue group `<collector_id>`: several
/// instances of one collector share the calls. Tasks have their own four handlers, so they
/// never hold up health checks. When the broker's policy refuses the task topic, the
/// services are served without tasks, a warning says so, and the handler is told
/// ([`CollectorHandler::tasks_refused`]: a collector then announces no task capacity).
/// Requests that cannot be decoded, name no operation, carry a body that does not match
/// their operation, or come on the other topic than their operation's are answered with
/// `InvalidOperation` and never reach `handler`.
///
/// # Errors
///
/// [`SubscribeError`] when the id is not a valid topic segment or the subscription fails.
pub async fn serve_collector<H: CollectorHandler>(
    client: &Client,
    collector_id: &str,
    handler: H,
) -> Result<CollectorService, SubscribeError> {
    let topic = catalog::collector::addressed(collector_id)?;
    let task_topic = catalog::collector::tasks_of(collector_id)?;
    let group = QueueGroup::new(collector_id)?;
    let handler = Arc::new(handler);
    let calls = serve_shared(client, &[topic], group.clone(), Taking::Calls, &handler).await?;
    let tasks = match serve_shared(
        client,
        std::slice::from_ref(&task_topic),
        group,
        Taking::Tasks,
        &handler,
    )
    .await
    {
        Ok(tasks) => Some(tasks),
        // A policy written before collection tasks: the services without them.
        Err(SubscribeError::Refused {
            code: daemoneye_eventbus_core::codec::ErrorCode::NotAuthorized,
            message,
        }) => {
            tracing::warn!(
                %message,
                "collection tasks are not served: the broker's policy does not let this \
                 collector answer on {task_topic}"
            );
            handler.tasks_refused();
            None
        }
        Err(e) => {
            calls.drain(std::time::Duration::ZERO).await;
            return Err(e);
        }
    };
    Ok(CollectorService { calls, tasks })
}

/// Serves the collector services' envelopes at any topic, in queue group `group` (the agent
/// uses it for `control.agent.lifecycle`). Requests are checked as by [`serve_collector`]
/// (collection tasks are refused).
///
/// # Errors
///
/// [`SubscribeError`] when the subscription fails.
pub async fn serve_services_at<H: CollectorHandler>(
    client: &Client,
    topics: &[daemoneye_eventbus_core::Topic],
    group: QueueGroup,
    handler: H,
) -> Result<Service, SubscribeError> {
    serve_shared(client, topics, group, Taking::Calls, &Arc::new(handler)).await
}

/// What a service takes: the services' calls, or collection tasks only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taking {
    Calls,
    Tasks,
}

async fn serve_shared<H: CollectorHandler>(
    client: &Client,
    topics: &[daemoneye_eventbus_core::Topic],
    group: QueueGroup,
    taking: Taking,
    handler: &Arc<H>,
) -> Result<Service, SubscribeError> {
    let handler = Arc::clone(handler);
    client
        .serve(
            topics.iter().map(daemoneye_eventbus_core::Topic::as_str),
            ServeOptions::default().group(group).concurrency(4),
            move |msg: Message| {
                let handler = Arc::clone(&handler);
                async move { dispatch(handler.as_ref(), taking, msg).await }
            },
        )
        .await
}

async fn dispatch<H: CollectorHandler>(
    handler: &H,
    taking: Taking,
    msg: Message,
) -> Result<Bytes, ReplyStatus> {
    let request = pb::RpcRequest::decode(msg.payload().as_ref()).map_err(|e| {
        ReplyStatus::invalid_operation(format!("the request is not an RpcRequest: {e}"))
    })?;
    let operation = CollectorOperation::try_from(request.operation)
        .ok()
        .filter(|o| *o != CollectorOperation::Unspecified)
        .ok_or_else(|| {
            ReplyStatus::invalid_operation(format!(
                "unknown operation {}; this collector speaks daemoneye.rpc.v1",
                request.operation
            ))
        })?;
    match (taking, operation == CollectorOperation::ExecuteTask) {
        (Taking::Calls, true) => {
            return Err(ReplyStatus::invalid_operation(
                "collection tasks go to control.collector.task.<id>",
            ));
        }
        (Taking::Tasks, false) => {
            return Err(ReplyStatus::invalid_operation(format!(
                "only EXECUTE_TASK is taken here; send {} to control.collector.<id>",
                operation.as_str_name()
            )));
        }
        _ => {}
    }
    let body = request.body.ok_or_else(|| {
        ReplyStatus::invalid_operation(format!(
            "{} needs a {} body",
            operation.as_str_name(),
            operation.body_name()
        ))
    })?;
    if body.name() != operation.body_name() {
        return Err(ReplyStatus::invalid_operation(format!(
            "{} needs a {} body, not {}",
            operation.as_str_name(),
            operation.body_name(),
            body.name()
        )));
    }
    let response = handler
        .handle(CollectorCall {
            operation,
            body,
            client_id: request.client_id,
            message: msg,
        })
        .await?;
    Ok(Bytes::from(
        pb::RpcResponse {
            operation: operation as i32,
            body: Some(response),
        }
        .encode_to_vec(),
    ))
}
