//! Following the job container's log: one request per stream (stdout and stderr apart
//! where the cluster supports it), read line by line into the job loop.

use futures::AsyncBufReadExt;
use rustci_runners::OutputStream;
use tokio::sync::mpsc;

use crate::pod::CONTAINER;
use crate::runner::status_code;
use crate::script::{MarkerParser, Piece, Tag};

/// What a log reader sends.
pub(crate) enum LogItem {
    Piece(Piece),
    /// The request failed; `code` is the API's status when it answered.
    Failed {
        code: Option<u16>,
        message: String,
    },
}

/// Follows the job container's log (`stream`: `Stdout`, `Stderr`, or all when `None`),
/// sending its pieces; a failure is sent as the last item.
pub(crate) async fn read_log(
    client: kube::Client,
    path: String,
    stream: Option<&'static str>,
    nonce: String,
    tx: mpsc::Sender<LogItem>,
) {
    let mut parser = MarkerParser::new(&nonce);
    let mut pieces = Vec::new();
    let result = follow_log(&client, path, stream, &mut parser, &mut pieces, &tx).await;
    // What the parser held back is output, also when the stream broke.
    parser.finish(&mut pieces);
    for p in pieces.drain(..) {
        let _ = tx.send(LogItem::Piece(p)).await;
    }
    if let Err((code, message)) = result {
        let _ = tx.send(LogItem::Failed { code, message }).await;
    }
}

/// The request and read loop of [`read_log`]; `Err` carries the API's status code when
/// it answered. A receiver that went away ends it quietly.
pub(crate) async fn follow_log(
    client: &kube::Client,
    path: String,
    stream: Option<&'static str>,
    parser: &mut MarkerParser,
    pieces: &mut Vec<Piece>,
    tx: &mpsc::Sender<LogItem>,
) -> Result<(), (Option<u16>, String)> {
    let mut url = format!("{path}/log?container={CONTAINER}&follow=true");
    if let Some(s) = stream {
        url.push_str("&stream=");
        url.push_str(s);
    }
    let request = http::Request::get(url)
        .body(Vec::new())
        .map_err(|e| (None, e.to_string()))?;
    let body = client
        .request_stream(request)
        .await
        .map_err(|e| (status_code(&e), e.to_string()))?;
    let mut body = Box::pin(body);
    loop {
        // Parse the body's chunks where they lie, without copying them first.
        let chunk = body.fill_buf().await.map_err(|e| (None, e.to_string()))?;
        if chunk.is_empty() {
            return Ok(());
        }
        let n = chunk.len();
        parser.push(chunk, pieces);
        body.consume_unpin(n);
        for p in pieces.drain(..) {
            if tx.send(LogItem::Piece(p)).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// One log stream being read.
pub(crate) struct Reader {
    pub(crate) rx: mpsc::Receiver<LogItem>,
    pub(crate) task: tokio::task::JoinHandle<()>,
    /// The output stream its bytes belong to.
    pub(crate) stream: OutputStream,
    /// Which markers count on it.
    pub(crate) tag: Tag,
    /// The step its output belongs to now.
    pub(crate) step: Option<usize>,
    /// Waiting at the end of this step for the other stream.
    pub(crate) blocked: Option<usize>,
    /// An item taken early, handled once the reader is no longer blocked.
    pub(crate) stash: Option<LogItem>,
    pub(crate) done: bool,
    /// Output was delivered from it.
    pub(crate) delivered: bool,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}
