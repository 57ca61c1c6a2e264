//! In-process transport: a process-wide registry of named listeners; connections are pairs of
//! bounded frame channels.

use crate::error::TransportError;
use crate::framed::{FrameReader, FrameWriter, INPROC_CHANNEL_FRAMES};
use daemoneye_eventbus_core::Frame;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::OnceLock;
use tokio::sync::mpsc;

/// One side of an in-process connection.
pub(crate) struct InProcEnds {
    pub(crate) reader: FrameReader,
    pub(crate) writer: FrameWriter,
}

type Registry = Mutex<HashMap<String, mpsc::Sender<InProcEnds>>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

/// Accepts in-process connections for one name; unregisters on drop.
pub(crate) struct InProcListener {
    name: String,
    tx: mpsc::Sender<InProcEnds>,
    rx: mpsc::Receiver<InProcEnds>,
}

impl InProcListener {
    pub(crate) fn bind(name: &str) -> Result<Self, TransportError> {
        let mut reg = registry().lock();
        if reg.get(name).is_some_and(|tx| !tx.is_closed()) {
            return Err(TransportError::InProcNameTaken(name.to_owned()));
        }
        let (tx, rx) = mpsc::channel(64);
        reg.insert(name.to_owned(), tx.clone());
        Ok(Self {
            name: name.to_owned(),
            tx,
            rx,
        })
    }

    pub(crate) async fn accept(&mut self) -> Option<InProcEnds> {
        self.rx.recv().await
    }
}

impl Drop for InProcListener {
    fn drop(&mut self) {
        let mut reg = registry().lock();
        if reg
            .get(&self.name)
            .is_some_and(|tx| tx.same_channel(&self.tx))
        {
            reg.remove(&self.name);
        }
    }
}

/// Connects to the in-process listener `name`.
pub(crate) async fn connect(name: &str) -> Result<InProcEnds, TransportError> {
    let tx = registry()
        .lock()
        .get(name)
        .cloned()
        .ok_or_else(|| TransportError::NoInProcListener(name.to_owned()))?;
    let (to_broker, from_client) = mpsc::channel::<Frame>(INPROC_CHANNEL_FRAMES);
    let (to_client, from_broker) = mpsc::channel::<Frame>(INPROC_CHANNEL_FRAMES);
    let broker_side = InProcEnds {
        reader: FrameReader::inproc(from_client),
        writer: FrameWriter::inproc(to_client),
    };
    tx.send(broker_side)
        .await
        .map_err(|_| TransportError::NoInProcListener(name.to_owned()))?;
    Ok(InProcEnds {
        reader: FrameReader::inproc(from_broker),
        writer: FrameWriter::inproc(to_broker),
    })
}
