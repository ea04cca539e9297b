//! [`BackendError`], the one error type of every backend, and [`Detail`],
//! what its variants say (a text, and the error it came from).

use std::error::Error;
use std::fmt;
use std::ops::Deref;

/// The error a [`BackendError`] came from, if any.
type Source = Box<dyn Error + Send + Sync + 'static>;

/// What a [`BackendError`] says: a text for logs and clients, and the
/// broker client's error behind it, kept as the error's
/// [`source`](Error::source) so a caller can walk the chain.
///
/// It reads as the text: it derefs to `str`, and both `Display` and `Debug`
/// show the text as a `String` would, so every log line and client-visible
/// message stays what it was when the payloads were plain strings.
pub struct Detail {
    text: String,
    source: Option<Source>,
}

impl Detail {
    /// A detail with no error behind it.
    pub fn new(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            source: None,
        }
    }

    /// `"{context}: {err}"` (or just `err`'s text when `context` is empty),
    /// keeping `err` as the source.
    pub fn caused_by(context: &str, err: impl Error + Send + Sync + 'static) -> Self {
        let text = if context.is_empty() {
            err.to_string()
        } else {
            format!("{context}: {err}")
        };
        Self {
            text,
            source: Some(Box::new(err)),
        }
    }

    /// The text, as `Display` prints it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The error this detail came from, if any.
    pub fn source(&self) -> Option<&(dyn Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }
}

impl Deref for Detail {
    type Target = str;

    fn deref(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

impl From<String> for Detail {
    fn from(text: String) -> Self {
        Self::new(text)
    }
}

impl From<&str> for Detail {
    fn from(text: &str) -> Self {
        Self::new(text)
    }
}

/// Errors of every backend. Says whether a retry can help.
///
/// `Display` and `Error` are written by hand rather than derived with
/// thiserror's `#[source]`: the detail's text already includes its source's
/// message (`"{context}: {err}"`), so a reporter that prints the whole chain
/// would print it twice if the detail itself were the next link. Here
/// `source()` skips the detail and returns the broker client's error.
#[derive(Debug)]
#[non_exhaustive]
pub enum BackendError {
    /// The broker could not be reached or did not confirm in time. Worth
    /// retrying; clients get `unavailable`.
    Unavailable(Detail),
    /// The broker refused the operation for good (permissions, bad topology).
    Refused(Detail),
    /// The server id is already registered and live.
    Conflict(Detail),
    /// The server id is not registered on this backend.
    NotRegistered(Detail),
    /// An argument the backend cannot accept (for example an oversized
    /// payload).
    Invalid(Detail),
    /// The backend was shut down.
    Closed,
}

impl BackendError {
    /// Whether the same call may succeed later without any change.
    pub fn is_temporary(&self) -> bool {
        matches!(self, BackendError::Unavailable(_))
    }

    /// [`BackendError::Unavailable`] with `"{context}: {err}"` (just `err`
    /// when `context` is empty), keeping `err` as the source.
    pub fn unavailable(context: &str, err: impl Error + Send + Sync + 'static) -> Self {
        BackendError::Unavailable(Detail::caused_by(context, err))
    }

    /// [`BackendError::Refused`] with `"{context}: {err}"` (just `err` when
    /// `context` is empty), keeping `err` as the source.
    pub fn refused(context: &str, err: impl Error + Send + Sync + 'static) -> Self {
        BackendError::Refused(Detail::caused_by(context, err))
    }

    /// [`BackendError::Invalid`] with `"{context}: {err}"` (just `err` when
    /// `context` is empty), keeping `err` as the source.
    pub fn invalid(context: &str, err: impl Error + Send + Sync + 'static) -> Self {
        BackendError::Invalid(Detail::caused_by(context, err))
    }

    fn detail(&self) -> Option<&Detail> {
        match self {
            BackendError::Unavailable(d)
            | BackendError::Refused(d)
            | BackendError::Conflict(d)
            | BackendError::NotRegistered(d)
            | BackendError::Invalid(d) => Some(d),
            BackendError::Closed => None,
        }
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::Unavailable(d) => write!(f, "broker unavailable: {d}"),
            BackendError::Refused(d) => write!(f, "broker refused the operation: {d}"),
            BackendError::Conflict(d) => write!(f, "server {d} is already registered"),
            BackendError::NotRegistered(d) => write!(f, "server {d} is not registered"),
            BackendError::Invalid(d) => write!(f, "invalid argument: {d}"),
            BackendError::Closed => f.write_str("backend is shut down"),
        }
    }
}

impl Error for BackendError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        let source = self.detail()?.source()?;
        Some(source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_what_the_string_payloads_printed() {
        let cases = [
            (
                BackendError::Unavailable("x".into()),
                "broker unavailable: x",
            ),
            (
                BackendError::Refused("x".into()),
                "broker refused the operation: x",
            ),
            (
                BackendError::Conflict("gw-1".into()),
                "server gw-1 is already registered",
            ),
            (
                BackendError::NotRegistered("gw-1".into()),
                "server gw-1 is not registered",
            ),
            (BackendError::Invalid("x".into()), "invalid argument: x"),
            (BackendError::Closed, "backend is shut down"),
        ];
        for (e, shown) in cases {
            assert_eq!(e.to_string(), shown);
            assert!(e.source().is_none(), "{e:?}");
        }
        assert_eq!(
            format!("{:?}", BackendError::Unavailable("x".into())),
            r#"Unavailable("x")"#
        );
    }

    #[test]
    fn the_source_is_kept_and_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let e = BackendError::unavailable("publish", io);
        assert_eq!(e.to_string(), "broker unavailable: publish: reset");
        let source = e.source().expect("the io error");
        assert_eq!(source.to_string(), "reset");
        assert!(source.downcast_ref::<std::io::Error>().is_some());
        // The chain goes straight from the backend error to the io error.
        assert!(source.source().is_none());

        let e = BackendError::refused("", std::io::Error::other("denied"));
        assert_eq!(e.to_string(), "broker refused the operation: denied");
        match &e {
            BackendError::Refused(why) => assert!(why.contains("denied")),
            other => panic!("{other:?}"),
        }
    }
}
