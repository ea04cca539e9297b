//! Client tokens: HS256 JWTs whose `sub` is the user id and whose `exp` is
//! required and honoured to the second.

use std::io::Write;
use std::path::Path;

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Why a token was refused or could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Missing, malformed, expired, wrongly signed, or naming an invalid user.
    #[error("unauthorized")]
    Unauthorized,
    /// The secret file could not be read or created.
    #[error("jwt secret file {path}: {source}")]
    SecretFile {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The secret is too short to protect anything.
    #[error(
        "the jwt secret from {from} is {len} bytes; at least {MIN_SECRET_BYTES} are needed: \
         {MAKE_SECRET_HINT}"
    )]
    WeakSecret {
        /// Where it came from (the environment, the configuration, a file).
        from: String,
        /// Its length in bytes.
        len: usize,
    },
    /// Signing failed.
    #[error("cannot sign token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

/// Verifies and mints tokens with one secret.
#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens { .. }")
    }
}

impl Tokens {
    /// Tokens signed with `secret`.
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // The contract says `exp` is honoured: no grace period.
        validation.leeway = 0;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// The user id a valid token names.
    pub fn verify(&self, token: &str) -> Result<String, AuthError> {
        let data = decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| AuthError::Unauthorized)?;
        if !fanout_backend::is_valid_id(&data.claims.sub) {
            return Err(AuthError::Unauthorized);
        }
        Ok(data.claims.sub)
    }

    /// A token for `user` valid for `ttl_secs` seconds.
    pub fn mint(&self, user: &str, ttl_secs: u64) -> Result<String, AuthError> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: user.to_owned(),
            exp: now + ttl_secs,
        };
        Ok(encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }
}

/// The shortest HS256 secret accepted, in bytes: RFC 7518 asks for a key
/// at least as long as the hash (256 bits); an empty one would accept
/// tokens forged by anyone.
pub const MIN_SECRET_BYTES: usize = 32;

/// What to tell an operator whose secret is too short.
pub const MAKE_SECRET_HINT: &str = "make one with `openssl rand -hex 32`";

/// Checks a secret's length; `from` says where it came from, for the error.
pub fn check_secret(secret: &str, from: &str) -> Result<(), AuthError> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(AuthError::WeakSecret {
            from: from.to_owned(),
            len: secret.len(),
        });
    }
    Ok(())
}

/// Reads `data_dir/jwt-secret`, creating it with a random secret (mode 0600)
/// if it does not exist: the embedded default needs no setup, and `fanout
/// token` run in the same directory signs with the same secret.
///
/// The file appears only complete: the secret is written and synced to a
/// temporary file in the same directory, which is then hard-linked to the
/// final name. Linking never replaces an existing file, so of two processes
/// starting at once exactly one publishes its secret and the other reads
/// it back. An empty or short file (an older version's crash, a hand edit)
/// is refused rather than used or silently replaced: tokens minted with it
/// may be in circulation, and an operator has to decide.
pub fn load_or_create_secret(data_dir: &Path) -> Result<String, AuthError> {
    let path = data_dir.join("jwt-secret");
    let err = |source| AuthError::SecretFile {
        path: path.display().to_string(),
        source,
    };
    match read_secret(&path) {
        Ok(s) => return Ok(s),
        Err(AuthError::SecretFile { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(data_dir).map_err(err)?;
    let secret: String = {
        use rand::Rng;
        let bytes: [u8; 32] = rand::rng().random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    };
    let tmp = data_dir.join(format!(
        ".jwt-secret.{}.{}.tmp",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let published = write_synced(&tmp, secret.as_bytes()).and_then(|()| publish(&tmp, &path));
    let _ = std::fs::remove_file(&tmp);
    match published {
        Ok(true) => {
            sync_dir(data_dir).map_err(err)?;
            Ok(secret)
        }
        // Another process published first: use theirs, complete by
        // construction.
        Ok(false) => read_secret(&path),
        Err(e) => Err(err(e)),
    }
}

/// The trimmed content of a secret file, checked for length.
fn read_secret(path: &Path) -> Result<String, AuthError> {
    let s = std::fs::read_to_string(path).map_err(|source| AuthError::SecretFile {
        path: path.display().to_string(),
        source,
    })?;
    let s = s.trim().to_owned();
    check_secret(&s, &format!("the file {}", path.display()))?;
    Ok(s)
}

/// Creates `tmp` (mode 0600, never an existing file), writes `data` and
/// syncs it to disk.
fn write_synced(tmp: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(tmp)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Gives the complete `tmp` the name `path` unless `path` exists; `false`
/// if it did. A file system without hard links falls back to a rename,
/// which may replace a secret published in the same instant: the caller
/// then reads back whatever is there.
fn publish(tmp: &Path, path: &Path) -> std::io::Result<bool> {
    match std::fs::hard_link(tmp, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::Unsupported | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            if path.exists() {
                return Ok(false);
            }
            std::fs::rename(tmp, path)?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Makes a new name in `dir` durable (the file's own sync does not cover
/// its directory entry).
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let t = Tokens::new(b"0123456789abcdef0123");
        let tok = t.mint("alice", 60).expect("mint");
        assert_eq!(t.verify(&tok).expect("valid"), "alice");
        assert!(
            Tokens::new(b"another-secret-value").verify(&tok).is_err(),
            "wrong secret"
        );
        assert!(t.verify("garbage").is_err());
        let expired = t.mint("alice", 0).expect("mint");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert!(t.verify(&expired).is_err(), "expired");
        assert!(
            t.verify(&t.mint("a:b", 60).expect("mint")).is_err(),
            "invalid user id"
        );
    }

    #[test]
    fn secret_is_created_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = load_or_create_secret(dir.path()).expect("create");
        let b = load_or_create_secret(dir.path()).expect("read");
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("jwt-secret"))
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_name() != "jwt-secret")
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }

    #[test]
    fn empty_and_short_secret_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jwt-secret");
        for content in ["", "\n", "short-secret-0123456789\n"] {
            std::fs::write(&path, content).expect("write");
            let e = load_or_create_secret(dir.path()).expect_err("weak secret refused");
            assert!(e.to_string().contains("openssl rand -hex 32"), "{e}");
            assert_eq!(std::fs::read_to_string(&path).expect("read"), content);
        }
    }

    #[test]
    fn concurrent_first_starts_agree() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().expect("tempdir");
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
            let secrets: Vec<String> = (0..8)
                .map(|_| {
                    let (d, b) = (dir.path().to_owned(), barrier.clone());
                    std::thread::spawn(move || {
                        b.wait();
                        load_or_create_secret(&d).expect("secret")
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect();
            assert!(secrets.iter().all(|s| s == &secrets[0]), "{secrets:?}");
            assert_eq!(
                std::fs::read_to_string(dir.path().join("jwt-secret")).expect("read"),
                secrets[0]
            );
        }
    }
}
