//! Mapping of lapin's errors and of elapsed deadlines into [`BackendError`].
//!
//! The rule: anything a retry can fix (a lost connection, a closed channel,
//! a queue that will be declared again, a deadline) is `Unavailable`; what
//! only an operator can fix (permissions, a queue declared with other
//! arguments) is `Refused`.

use std::future::Future;
use std::time::Duration;

use fanout_backend::BackendError;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};

/// Maps a lapin error met while doing `what`; the error stays the
/// [`BackendError`]'s source.
pub(crate) fn map_err(what: &str, e: &lapin::Error) -> BackendError {
    use lapin::ErrorKind as K;
    // lapin's errors are cheap to clone (shared inner parts); the clone is
    // what the chain keeps.
    let source = e.clone();
    match e.kind() {
        K::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
            | AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
            | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
            | AMQPErrorKind::Hard(AMQPHardError::INVALIDPATH) => {
                BackendError::refused(what, source)
            }
            AMQPErrorKind::Soft(AMQPSoftError::CONTENTTOOLARGE) => {
                BackendError::invalid(what, source)
            }
            // NOT_FOUND (a queue or exchange that a reconnect re-declares),
            // RESOURCE_LOCKED (callers that mean Conflict check for it
            // first), CONNECTION_FORCED, INTERNAL_ERROR, ...: transient.
            _ => BackendError::unavailable(what, source),
        },
        K::AuthProviderError(_) | K::InvalidProtocolVersion(_) => {
            BackendError::refused(what, source)
        }
        _ => BackendError::unavailable(what, source),
    }
}

/// Whether `e` is the broker's RESOURCE_LOCKED (an exclusive queue owned by
/// another connection).
pub(crate) fn is_resource_locked(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp)
        if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED)))
}

/// Runs one broker call with a deadline: every call the contract exposes is
/// bounded, so a stalled broker (blocked connection, lost packets before the
/// heartbeat notices) turns into `Unavailable` instead of a hang.
pub(crate) async fn bounded<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = lapin::Result<T>>,
) -> Result<T, BackendError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(map_err(what, &e)),
        Err(_) => Err(BackendError::Unavailable(
            format!("{what}: no answer from the broker within {limit:?}").into(),
        )),
    }
}

/// Like [`bounded`] for futures that already speak `BackendError`.
pub(crate) async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(BackendError::Unavailable(
            format!("{what}: no answer from the broker within {limit:?}").into(),
        )),
    }
}
