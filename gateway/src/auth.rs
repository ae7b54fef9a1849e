//! Signed tokens: who a connection is.
//!
//! A token is a JWT (RFC 7519) signed with HMAC-SHA256 (`alg: HS256`), so any
//! JWT library can mint one with the same key. Its claims:
//!
//! | claim  | meaning                                        |
//! |--------|------------------------------------------------|
//! | `sub`  | user id (1–64 bytes, no control characters)    |
//! | `name` | display name                                   |
//! | `role` | `buyer`, `agent` or `owner`                    |
//! | `shop` | shop id; required for agents and owners only   |
//! | `exp`  | expiry, seconds since the Unix epoch           |
//! | `iat`  | issue time, seconds since the Unix epoch       |

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use qun_chat_core::{Identity, Role};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The shortest key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 32;

const KEY_FILE: &str = "token.key";

/// The secret that signs and verifies tokens.
#[derive(Clone)]
pub struct TokenKey(Vec<u8>);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not three base64url parts, bad JSON, wrong algorithm, or a claim
    /// that is missing or malformed. Get a new token.
    #[error("token is malformed: {0}")]
    Malformed(String),
    /// The signature does not verify: forged, or signed with another key.
    #[error("token signature is invalid")]
    BadSignature,
    /// `exp` has passed. Get a new token.
    #[error("token expired")]
    Expired,
}

/// Why a key could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is not hex or is shorter than [`MIN_KEY_BYTES`].
    #[error("key must be at least {MIN_KEY_BYTES} bytes of hex")]
    BadKey,
    /// The key file could not be read or created.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The claims of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Display name.
    pub name: String,
    /// `buyer`, `agent` or `owner`.
    pub role: String,
    /// Shop id of agents and owners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shop: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issue time, seconds since the Unix epoch.
    #[serde(default)]
    pub iat: u64,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    typ: String,
}

impl TokenKey {
    /// A key from hex.
    ///
    /// # Errors
    /// [`KeyError::BadKey`] when not hex or too short.
    pub fn from_hex(hex: &str) -> Result<Self, KeyError> {
        let hex = hex.trim();
        if !hex.len().is_multiple_of(2) || hex.len() < MIN_KEY_BYTES * 2 {
            return Err(KeyError::BadKey);
        }
        (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|b| u8::from_str_radix(b, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
            .map(Self)
            .ok_or(KeyError::BadKey)
    }

    /// Reads `<data_dir>/token.key`, creating it with a fresh random key
    /// (readable by the owner only) when it does not exist.
    ///
    /// # Errors
    /// [`KeyError`] when the file cannot be read or written, or holds a bad key.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, KeyError> {
        let path = data_dir.join(KEY_FILE);
        let io = |source| KeyError::Io {
            path: path.clone(),
            source,
        };
        match std::fs::read_to_string(&path) {
            Ok(hex) => Self::from_hex(&hex),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(data_dir).map_err(io)?;
                let mut key = vec![0u8; MIN_KEY_BYTES];
                getrandom::fill(&mut key).map_err(|e| io(std::io::Error::other(e.to_string())))?;
                let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
                write_private(&path, &hex).map_err(io)?;
                tracing::info!(path = %path.display(), "generated a new token key");
                Ok(Self(key))
            }
            Err(e) => Err(io(e)),
        }
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC accepts keys of any length.
        Hmac::<Sha256>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"))
    }

    /// Issues a token for a user, valid from `now_secs` for `ttl`: the
    /// claims are built here, then signed. (Whether the server will accept
    /// them is [`TokenKey::verify`]'s call.)
    pub fn issue(
        &self,
        user: &str,
        name: &str,
        role: &str,
        shop: Option<&str>,
        now_secs: u64,
        ttl: std::time::Duration,
    ) -> String {
        self.sign(&Claims {
            sub: user.to_string(),
            name: name.to_string(),
            role: role.to_string(),
            shop: shop.map(str::to_string),
            exp: now_secs + ttl.as_secs(),
            iat: now_secs,
        })
    }

    /// Signs claims into a token.
    pub fn sign(&self, claims: &Claims) -> String {
        let header = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = B64.encode(serde_json::to_vec(claims).unwrap_or_default());
        let signing_input = format!("{header}.{payload}");
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        let sig = B64.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{sig}")
    }

    /// Verifies a token at time `now_secs` and returns who it names.
    ///
    /// # Errors
    /// [`TokenError`] saying why the token is not accepted.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<Identity, TokenError> {
        let malformed = |m: &str| TokenError::Malformed(m.to_string());
        let mut parts = token.trim().split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("expected three dot-separated parts"));
        };
        let header: Header = B64
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| malformed("bad header"))?;
        if header.alg != "HS256" {
            return Err(malformed("algorithm must be HS256"));
        }
        let sig = B64
            .decode(s)
            .map_err(|_| malformed("bad signature encoding"))?;
        let mut mac = self.mac();
        mac.update(h.as_bytes());
        mac.update(b".");
        mac.update(p.as_bytes());
        mac.verify_slice(&sig)
            .map_err(|_| TokenError::BadSignature)?;
        let claims: Claims = B64
            .decode(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| malformed("bad claims"))?;
        if claims.exp <= now_secs {
            return Err(TokenError::Expired);
        }
        let role: Role = claims
            .role
            .parse()
            .map_err(|e| TokenError::Malformed(format!("{e}")))?;
        if role == Role::System {
            return Err(malformed("system tokens are not issued to clients"));
        }
        Identity::new(claims.sub, claims.name, role, claims.shop)
            .map_err(|e| TokenError::Malformed(e.to_string()))
    }
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TokenKey {
        TokenKey::from_hex(&"ab".repeat(32)).unwrap()
    }

    fn claims(role: &str, shop: Option<&str>, exp: u64) -> Claims {
        Claims {
            sub: "u1".into(),
            name: "Ann".into(),
            role: role.into(),
            shop: shop.map(Into::into),
            exp,
            iat: 0,
        }
    }

    #[test]
    fn signed_tokens_verify() {
        let t = key().sign(&claims("agent", Some("shop-1"), 100));
        let id = key().verify(&t, 99).unwrap();
        assert_eq!(
            (id.user_id(), id.role(), id.shop_id()),
            ("u1", Role::Agent, Some("shop-1"))
        );
    }

    #[test]
    fn refusals() {
        let k = key();
        assert_eq!(
            k.verify(&k.sign(&claims("buyer", None, 100)), 100),
            Err(TokenError::Expired)
        );
        let other = TokenKey::from_hex(&"cd".repeat(32)).unwrap();
        assert_eq!(
            other.verify(&k.sign(&claims("buyer", None, 100)), 1),
            Err(TokenError::BadSignature)
        );
        // A payload swapped in under the old signature.
        let good = k.sign(&claims("buyer", None, 100));
        let forged_payload = k.sign(&claims("owner", Some("s"), 100));
        let mut parts: Vec<&str> = good.split('.').collect();
        parts[1] = forged_payload.split('.').nth(1).unwrap();
        assert_eq!(k.verify(&parts.join("."), 1), Err(TokenError::BadSignature));
        for junk in ["", "a.b", "a.b.c.d", "!!.!!.!!"] {
            assert!(
                matches!(k.verify(junk, 1), Err(TokenError::Malformed(_))),
                "{junk}"
            );
        }
        assert!(matches!(
            k.verify(&k.sign(&claims("agent", None, 100)), 1),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            k.verify(&k.sign(&claims("system", None, 100)), 1),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            k.verify(&k.sign(&claims("king", None, 100)), 1),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn key_file_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = TokenKey::load_or_create(dir.path()).unwrap();
        let k2 = TokenKey::load_or_create(dir.path()).unwrap();
        let t = k1.sign(&claims("buyer", None, 100));
        assert!(k2.verify(&t, 1).is_ok());
        assert!(TokenKey::from_hex("zz").is_err());
        assert!(TokenKey::from_hex(&"ab".repeat(31)).is_err());
    }
}
