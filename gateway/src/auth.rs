//! API keys: a caller shows one as `Authorization: Bearer <key>`; the config holds only
//! their SHA-256 digests (`gateway.api_key_sha256`), so a leaked config file gives no
//! key away. Without keys the gateway serves only loopback ([`check_exposure`]).
//!
//! Keys are compared by digest: the presented key is hashed and the digests compared in
//! constant time, so neither the key nor how much of it matched leaks through timing.

use std::net::SocketAddr;

use axum::http::{header, HeaderMap, StatusCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// The accepted keys' digests.
#[derive(Clone, Debug, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl ApiKeys {
    /// Keys from their hex digests, as the config holds them.
    pub fn from_hex_digests(digests: &[String]) -> anyhow::Result<ApiKeys> {
        let digests = digests
            .iter()
            .enumerate()
            .map(|(index, text)| {
                parse_digest(text.trim()).ok_or_else(|| {
                    anyhow::anyhow!(
                        "gateway.api_key_sha256[{index}] is not a SHA-256 digest (64 hex digits); `classifier-gateway hash-key` prints one"
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(ApiKeys { digests })
    }

    /// Whether any key is configured (else every caller is let in).
    pub fn required(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Lets a request in if it shows a configured key (or none is configured); else 401.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if !self.required() {
            return Ok(());
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(key) = presented else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "an API key is required: send Authorization: Bearer <key>",
            ));
        };
        let digest = digest_of(key);
        let mut matched = false;
        for known in &self.digests {
            matched |= bool::from(known.ct_eq(&digest));
        }
        if matched {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the API key is not valid",
            ))
        }
    }
}

/// Refuses to serve beyond loopback without keys: anyone who can reach the port could
/// then use the servers.
pub fn check_exposure(listen: SocketAddr, keys: &ApiKeys) -> anyhow::Result<()> {
    if !listen.ip().is_loopback() && !keys.required() {
        anyhow::bail!(
            "refusing to listen on {listen} without API keys: anyone who reaches it could use the servers. \
             Set gateway.api_key_sha256 (`classifier-gateway hash-key` prints a key's digest) or listen on loopback"
        );
    }
    Ok(())
}

/// The hex SHA-256 digest of `key`, as the config holds it.
pub fn hex_digest(key: &str) -> String {
    hex::encode(digest_of(key))
}

fn digest_of(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
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
    fn only_a_configured_key_gets_in() {
        let keys = ApiKeys::from_hex_digests(&[hex_digest("s3cret")]).expect("keys");
        assert!(keys.check(&headers(Some("Bearer s3cret"))).is_ok());
        for refused in [
            None,
            Some("Bearer wrong"),
            Some("Basic s3cret"),
            Some("Bearer "),
        ] {
            let error = keys.check(&headers(refused)).expect_err("refused");
            assert_eq!(error.status, StatusCode::UNAUTHORIZED, "{refused:?}");
        }
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
        let error =
            ApiKeys::from_hex_digests(&[hex_digest("a"), "xyz".into()]).expect_err("refused");
        assert!(error.to_string().contains("api_key_sha256[1]"), "{error}");
    }

    #[test]
    fn no_keys_means_loopback_only() {
        let none = ApiKeys::default();
        assert!(none.check(&headers(None)).is_ok());
        assert!(check_exposure("127.0.0.1:8000".parse().expect("addr"), &none).is_ok());
        assert!(check_exposure("[::1]:8000".parse().expect("addr"), &none).is_ok());
        let error =
            check_exposure("0.0.0.0:8000".parse().expect("addr"), &none).expect_err("refused");
        assert!(error.to_string().contains("without API keys"), "{error}");
        let keys = ApiKeys::from_hex_digests(&[hex_digest("k")]).expect("keys");
        assert!(check_exposure("0.0.0.0:8000".parse().expect("addr"), &keys).is_ok());
    }
}
