//! The broker nodes a backend may connect to: `RabbitMqConfig::url` is one
//! AMQP URL or a comma-separated list of them, the nodes of one cluster.
//!
//! A backend connects to one node at a time (both of its connections to
//! the same one). Each process starts at a random node of the list, so the
//! processes of a deployment spread over the cluster, and after a loss it
//! starts at the node after the one it lost, so a dead node is tried last.

use std::sync::atomic::{AtomicUsize, Ordering};

use fanout_backend::BackendError;
use lapin::uri::AMQPUri;

/// The validated node URLs of a configuration, in the order given.
pub(crate) fn parse(urls: &str) -> Result<Vec<String>, BackendError> {
    let mut nodes: Vec<String> = Vec::new();
    for (i, raw) in urls.split(',').enumerate() {
        let url = raw.trim();
        if url.is_empty() {
            return Err(BackendError::Invalid(
                format!(
                    "RabbitMQ URL list: entry {} is empty (a list is comma-separated URLs, \
                     with no empty entry; a comma inside a password is written %2C)",
                    i + 1
                )
                .into(),
            ));
        }
        let scheme_ok = url.split_once("://").is_some_and(|(s, _)| {
            s.eq_ignore_ascii_case("amqp") || s.eq_ignore_ascii_case("amqps")
        });
        if !scheme_ok {
            return Err(BackendError::Invalid(
                format!(
                    "RabbitMQ URL {} must start with amqp:// or amqps://, got {}",
                    i + 1,
                    redact(url)
                )
                .into(),
            ));
        }
        // lapin parses the URL again on connect; parsing now turns a typo
        // into an error at start instead of an endless reconnect loop.
        if let Err(e) = url.parse::<AMQPUri>() {
            return Err(BackendError::Invalid(
                format!("RabbitMQ URL {} ({}): {e}", i + 1, redact(url)).into(),
            ));
        }
        if nodes.iter().any(|n| n == url) {
            return Err(BackendError::Invalid(
                format!("RabbitMQ URL {} ({}) is listed twice", i + 1, redact(url)).into(),
            ));
        }
        nodes.push(url.to_owned());
    }
    Ok(nodes)
}

/// `amqp://user:secret@host:5672/%2f` -> `amqp://user:***@host:5672/%2f`,
/// for logs and `Debug`. Only the authority (up to the first `/` or `?`
/// after the scheme) is looked at, so a `@` in the path or query is left.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => format!("{scheme}://***@{host}{tail}"),
        },
        None => url.to_owned(),
    }
}

/// Every URL of a comma-separated list, redacted.
pub(crate) fn redact_list(urls: &str) -> String {
    urls.split(',')
        .map(|u| redact(u.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Where the next connection attempt starts in the node list.
#[derive(Debug)]
pub(crate) struct Cursor {
    next: AtomicUsize,
}

impl Cursor {
    /// Starts at a random node, so that the processes of one deployment
    /// spread over the cluster instead of all landing on the first node.
    pub(crate) fn random(nodes: usize) -> Self {
        let r = uuid::Uuid::new_v4().as_u128();
        let start = (r % nodes.max(1) as u128) as usize;
        Self {
            next: AtomicUsize::new(start),
        }
    }

    /// The order in which to try the `nodes` for the next connection.
    pub(crate) fn order(&self, nodes: usize) -> impl Iterator<Item = usize> {
        let n = nodes.max(1);
        let start = self.next.load(Ordering::Relaxed) % n;
        (0..n).map(move |i| (start + i) % n)
    }

    /// After connecting to `node`: the next attempt (after a loss) starts
    /// at the node after it, so the node that was just lost is tried last.
    pub(crate) fn connected(&self, node: usize, nodes: usize) {
        self.next
            .store((node + 1) % nodes.max(1), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_url_is_a_list_of_one() {
        let nodes = parse("amqp://guest:guest@127.0.0.1:5672/%2f").expect("valid");
        assert_eq!(nodes, ["amqp://guest:guest@127.0.0.1:5672/%2f"]);
    }

    #[test]
    fn a_list_is_split_and_trimmed() {
        let nodes = parse("amqp://a:5672/%2f, amqp://b:5673/%2f ,amqps://c/x").expect("valid");
        assert_eq!(
            nodes,
            ["amqp://a:5672/%2f", "amqp://b:5673/%2f", "amqps://c/x"]
        );
    }

    #[test]
    fn bad_lists_are_invalid_and_say_which_entry() {
        for (bad, says) in [
            ("", "entry 1 is empty"),
            ("amqp://a/%2f,", "entry 2 is empty"),
            ("amqp://a/%2f,,amqp://b/%2f", "entry 2 is empty"),
            ("http://a/", "must start with amqp:// or amqps://"),
            ("127.0.0.1:5672", "must start with amqp://"),
            ("amqp://a:notaport/", "URL 1"),
            ("amqp://a/%2f,amqp://a/%2f", "listed twice"),
        ] {
            match parse(bad) {
                Err(BackendError::Invalid(d)) => {
                    assert!(d.as_str().contains(says), "{bad:?}: {}", d.as_str());
                }
                other => panic!("{bad:?}: expected Invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn errors_never_show_a_password() {
        let Err(e) = parse("amqp://u:hunter2@a/%2f,ftp://u:hunter2@b/") else {
            panic!("expected an error");
        };
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn redaction_hides_every_password() {
        assert_eq!(
            redact("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://tok@h:1"), "amqp://***@h:1");
        assert_eq!(redact("amqp://h:1/%2f"), "amqp://h:1/%2f");
        assert_eq!(redact("amqp://h/v?x=a@b"), "amqp://h/v?x=a@b");
        assert_eq!(
            redact_list("amqp://a:p1@h1/%2f,amqp://b:p2@h2/%2f"),
            "amqp://a:***@h1/%2f,amqp://b:***@h2/%2f"
        );
    }

    #[test]
    fn the_cursor_tries_every_node_once_and_moves_past_a_lost_one() {
        let c = Cursor::random(3);
        let mut first: Vec<usize> = c.order(3).collect();
        first.sort_unstable();
        assert_eq!(first, [0, 1, 2]);
        c.connected(2, 3);
        assert_eq!(c.order(3).collect::<Vec<_>>(), [0, 1, 2]);
        c.connected(0, 3);
        assert_eq!(c.order(3).collect::<Vec<_>>(), [1, 2, 0]);
        let one = Cursor::random(1);
        assert_eq!(one.order(1).collect::<Vec<_>>(), [0]);
    }
}
