//! The request/reply example of README.md, run against an in-process broker (keep the two in
//! step).

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use daemoneye_eventbus::client::{RpcErrorKind, ServeOptions};
use daemoneye_eventbus::core::{QueueGroup, ReplyStatus};
use daemoneye_eventbus::{Broker, BrokerConfig, Client, ClientOptions, Message, Topic};
use std::time::Duration;

async fn rpc(responder: Client, caller: Client) -> Result<(), Box<dyn std::error::Error>> {
    let options = ServeOptions::default().group(QueueGroup::new("scanners")?);
    let service = responder
        .serve(["svc.scan"], options, |req: Message| async move {
            match req.payload().as_ref() {
                b"" => Err(ReplyStatus::invalid_operation("send the path to scan")),
                path => Ok(Bytes::from(format!(
                    "scanned {}",
                    String::from_utf8_lossy(path)
                ))),
            }
        })
        .await?;
    let reply = caller
        .request(&Topic::new("svc.scan")?, "/usr/bin", Duration::from_secs(2))
        .await?;
    assert_eq!(reply.payload().as_ref(), b"scanned /usr/bin");
    let err = caller
        .request(&Topic::new("svc.none")?, "", Duration::from_secs(2))
        .await
        .unwrap_err();
    assert_eq!(err.kind, RpcErrorKind::NoResponders); // at once, not after 2 s
    service.drain(Duration::from_secs(5)).await;
    Ok(())
}

#[tokio::test]
async fn readme_request_reply_example() {
    let broker = Broker::start_on(BrokerConfig::default(), &[])
        .await
        .unwrap();
    let ep = broker.inproc_endpoint().clone();
    let responder = Client::connect(&ep, ClientOptions::named("responder"))
        .await
        .unwrap();
    let caller = Client::connect(&ep, ClientOptions::named("caller"))
        .await
        .unwrap();
    rpc(responder, caller).await.unwrap();
    broker.shutdown().await;
}
