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

/// Reads `data_dir/jwt-secret`, creating it with a random secret (mode 0600)
/// if it does not exist: the embedded default needs no setup, and `fanout
/// token` run in the same directory signs with the same secret.
pub fn load_or_create_secret(data_dir: &Path) -> Result<String, AuthError> {
    let path = data_dir.join("jwt-secret");
    let err = |source| AuthError::SecretFile {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    std::fs::create_dir_all(data_dir).map_err(err)?;
    let secret: String = {
        use rand::Rng;
        let bytes: [u8; 32] = rand::rng().random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    match opts.open(&path) {
        Ok(mut f) => {
            f.write_all(secret.as_bytes()).map_err(err)?;
            Ok(secret)
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => std::fs::read_to_string(&path)
            .map(|s| s.trim().to_owned())
            .map_err(err),
        Err(e) => Err(err(e)),
    }
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
    }
}
