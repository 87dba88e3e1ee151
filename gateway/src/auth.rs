//! API keys: a caller shows one as `Authorization: Bearer <key>`; the config holds only
//! their SHA-256 digests (`gateway.api_key_sha256`), so a leaked config file gives no
//! key away. Without keys the gateway serves only loopback ([`check_exposure`]).
//!
//! Keys are compared by digest, in constant time (`classifier_server::bearer`, which the
//! server's `/metrics` token uses too).

use std::net::SocketAddr;

use axum::http::{HeaderMap, StatusCode};
use classifier_server::bearer::{BearerTokens, Refusal};

use crate::error::ApiError;

pub use classifier_server::bearer::hex_digest;

/// The accepted keys' digests.
#[derive(Clone, Debug, Default)]
pub struct ApiKeys(BearerTokens);

impl ApiKeys {
    /// Keys from their hex digests, as the config holds them.
    pub fn from_hex_digests(digests: &[String]) -> anyhow::Result<ApiKeys> {
        BearerTokens::from_hex_digests("gateway.api_key_sha256", digests).map(ApiKeys)
    }

    /// Whether any key is configured (else every caller is let in).
    pub fn required(&self) -> bool {
        self.0.required()
    }

    /// Lets a request in if it shows a configured key (or none is configured); else 401.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        self.0.check(headers).map_err(|refusal| {
            let reason = match refusal {
                Refusal::Missing => "an API key is required: send Authorization: Bearer <key>",
                Refusal::Invalid => "the API key is not valid",
            };
            ApiError::new(StatusCode::UNAUTHORIZED, reason)
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{header, HeaderValue};

    /// Headers holding `Authorization: Bearer <key>`.
    fn bearer(key: &'static str) -> HeaderMap {
        let value = HeaderValue::from_str(&format!("Bearer {key}")).expect("header");
        HeaderMap::from_iter([(header::AUTHORIZATION, value)])
    }

    /// The matching and refusing is `classifier_server::bearer`'s (tested there): here,
    /// that a refusal is a 401 saying why.
    #[test]
    fn a_refused_key_is_a_401_that_says_why() {
        let keys = ApiKeys::from_hex_digests(&[hex_digest("s3cret")]).expect("keys");
        assert!(keys.check(&bearer("s3cret")).is_ok());
        let missing = keys.check(&HeaderMap::new()).expect_err("refused");
        assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
        assert!(missing.message.contains("required"), "{}", missing.message);
        let wrong = keys.check(&bearer("wrong")).expect_err("refused");
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
        assert!(wrong.message.contains("not valid"), "{}", wrong.message);
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
        assert!(none.check(&HeaderMap::new()).is_ok());
        assert!(check_exposure("127.0.0.1:8000".parse().expect("addr"), &none).is_ok());
        assert!(check_exposure("[::1]:8000".parse().expect("addr"), &none).is_ok());
        let error =
            check_exposure("0.0.0.0:8000".parse().expect("addr"), &none).expect_err("refused");
        assert!(error.to_string().contains("without API keys"), "{error}");
        let keys = ApiKeys::from_hex_digests(&[hex_digest("k")]).expect("keys");
        assert!(check_exposure("0.0.0.0:8000".parse().expect("addr"), &keys).is_ok());
    }
}
