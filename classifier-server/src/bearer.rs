//! Bearer tokens known only by their SHA-256 digests: a caller shows a token as
//! `Authorization: Bearer <token>`; the config holds only digests (64 hex digits), so a
//! leaked config file gives no token away. The presented token is hashed and the
//! digests compared in constant time, so neither the token nor how much of it matched
//! leaks through timing.
//!
//! The server's `/metrics` (`server.metrics_token_sha256`) and the HTTP gateway's API
//! keys (`gateway.api_key_sha256`) both use it. `printf %s TOKEN | sha256sum` (or
//! `classifier-gateway hash-key`) prints a token's digest.

use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The accepted tokens' digests.
#[derive(Clone, Debug, Default)]
pub struct BearerTokens {
    digests: Vec<[u8; 32]>,
}

/// Why a request was not let in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization: Bearer …` header.
    Missing,
    /// A token that matches none of the digests.
    Invalid,
}

impl BearerTokens {
    /// Tokens from their hex digests, as the config setting `setting` holds them; an
    /// error names the first malformed entry by its place.
    pub fn from_hex_digests(setting: &str, digests: &[String]) -> anyhow::Result<BearerTokens> {
        let digests = digests
            .iter()
            .enumerate()
            .map(|(index, text)| {
                parse_digest(text.trim()).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{setting}[{index}] is not a SHA-256 digest (64 hex digits); \
                         `printf %s TOKEN | sha256sum` prints one"
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(BearerTokens { digests })
    }

    /// Whether any token is configured (else every caller is let in).
    pub fn required(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Lets a request in if it shows a configured token (or none is configured).
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        if !self.required() {
            return Ok(());
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(token) = presented else {
            return Err(Refusal::Missing);
        };
        let digest = digest_of(token);
        let mut matched = false;
        for known in &self.digests {
            matched |= bool::from(known.ct_eq(&digest));
        }
        if matched {
            Ok(())
        } else {
            Err(Refusal::Invalid)
        }
    }
}

/// The hex SHA-256 digest of `token`, as the config holds it.
pub fn hex_digest(token: &str) -> String {
    hex::encode(digest_of(token))
}

fn digest_of(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let mut digest = [0u8; 32];
    hex::decode_to_slice(text, &mut digest).ok()?;
    Some(digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(authorization: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = authorization {
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(value).expect("header"),
            );
        }
        headers
    }

    #[test]
    fn only_a_configured_token_gets_in() {
        let tokens = BearerTokens::from_hex_digests("t", &[hex_digest("s3cret")]).expect("tokens");
        assert_eq!(tokens.check(&headers(Some("Bearer s3cret"))), Ok(()));
        assert_eq!(tokens.check(&headers(None)), Err(Refusal::Missing));
        assert_eq!(
            tokens.check(&headers(Some("Basic s3cret"))),
            Err(Refusal::Missing)
        );
        for wrong in ["Bearer wrong", "Bearer "] {
            assert_eq!(
                tokens.check(&headers(Some(wrong))),
                Err(Refusal::Invalid),
                "{wrong}"
            );
        }
        assert_eq!(BearerTokens::default().check(&headers(None)), Ok(()));
    }

    #[test]
    fn the_digest_is_sha256_hex() {
        // `printf abc | sha256sum`
        assert_eq!(
            hex_digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_malformed_digest_names_its_place() {
        let error = BearerTokens::from_hex_digests("keys", &[hex_digest("a"), "xyz".into()])
            .expect_err("refused");
        assert!(error.to_string().contains("keys[1]"), "{error}");
    }
}
