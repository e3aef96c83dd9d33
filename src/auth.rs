//! Who is on the other end of a socket, decided before the upgrade (contract §2).
//!
//! JWT mode checks a signed token from `?token=` or `Authorization: Bearer`; its `sub` is the
//! user id and its `exp` is required — the connection is later closed with 1008 when it
//! passes. Insecure mode trusts `?user_id=` and exists for development only.
//!
//! This module must not know about sockets or the registry: it answers "who is this" from a
//! request head, or why not.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{AuthMode, Config, ConfigError};
use crate::envelope::valid_user_id;

/// Tokens longer than this are refused without being parsed.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// An authenticated user.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: Arc<str>,
    /// Unix seconds after which the connection must be closed (1008).
    pub expires_at: Option<u64>,
}

/// Why a handshake is refused with 401. The reason is logged at debug level, never sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unauthorized(pub String);

pub enum Authenticator {
    Insecure,
    Jwt {
        key: Box<DecodingKey>,
        validation: Box<Validation>,
    },
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

impl Authenticator {
    pub fn from_config(cfg: &Config) -> Result<Self, ConfigError> {
        if cfg.auth_mode == AuthMode::Insecure {
            return Ok(Authenticator::Insecure);
        }
        let (key, alg) = match (&cfg.jwt_secret, &cfg.jwt_public_key_file) {
            (Some(secret), None) => (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            ),
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|e| {
                    ConfigError::new(
                        "JWT_PUBLIC_KEY_FILE",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                    (k, Algorithm::RS256)
                } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                    (k, Algorithm::ES256)
                } else {
                    return Err(ConfigError::new(
                        "JWT_PUBLIC_KEY_FILE",
                        "not a PEM RSA (RS256) or P-256 EC (ES256) public key",
                    ));
                }
            }
            _ => {
                return Err(ConfigError::new(
                    "JWT_SECRET",
                    "set exactly one of JWT_SECRET or JWT_PUBLIC_KEY_FILE",
                ));
            }
        };
        // One algorithm per deployment: a token signed with any other (or `none`) fails.
        let mut validation = Validation::new(alg);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        match &cfg.jwt_issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &cfg.jwt_audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Ok(Authenticator::Jwt {
            key: Box::new(key),
            validation: Box::new(validation),
        })
    }

    pub fn is_insecure(&self) -> bool {
        matches!(self, Authenticator::Insecure)
    }

    /// Identifies the client from the request's query string and bearer token.
    pub fn authenticate(
        &self,
        query: Option<&str>,
        bearer: Option<&str>,
    ) -> Result<Identity, Unauthorized> {
        match self {
            Authenticator::Insecure => {
                let user =
                    query_param(query, "user_id").ok_or_else(|| unauthorized("missing user_id"))?;
                if !valid_user_id(&user) {
                    return Err(unauthorized("user_id must be 1 to 128 bytes"));
                }
                Ok(Identity {
                    user: user.into(),
                    expires_at: None,
                })
            }
            Authenticator::Jwt { key, validation } => {
                let token = match bearer {
                    Some(t) => t.to_owned(),
                    None => {
                        query_param(query, "token").ok_or_else(|| unauthorized("missing token"))?
                    }
                };
                if token.len() > MAX_TOKEN_BYTES {
                    return Err(unauthorized("token too long"));
                }
                let data = jsonwebtoken::decode::<Claims>(&token, key, validation)
                    .map_err(|e| unauthorized(format!("invalid token: {e}")))?;
                if !valid_user_id(&data.claims.sub) {
                    return Err(unauthorized("sub must be 1 to 128 bytes"));
                }
                Ok(Identity {
                    user: data.claims.sub.into(),
                    expires_at: Some(data.claims.exp),
                })
            }
        }
    }
}

fn unauthorized(why: impl Into<String>) -> Unauthorized {
    Unauthorized(why.into())
}

/// First value of `name` in a URL query string, percent-decoded.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_param(Some("a=1&user_id=u%201"), "user_id").as_deref(),
            Some("u 1")
        );
        assert_eq!(query_param(Some("a=1"), "user_id"), None);
        assert_eq!(query_param(None, "user_id"), None);
    }
}
