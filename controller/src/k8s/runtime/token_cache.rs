//! Accepted TokenReviews, kept until their token expires: an agent that reconnects (after a
//! network blip, or a controller failover of leadership) costs the API server nothing more.
//! Only accepted tokens are kept, by their SHA-256, never the token itself.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, SystemTime},
};

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use sha2::{Digest, Sha256};

/// At most this many tokens are remembered (an agent holds one; a new one every rotation).
const MAX_ENTRIES: usize = 16_384;

/// How long a token without a readable expiry is trusted without a new review.
const DEFAULT_TTL: Duration = Duration::from_secs(60);

/// Longest a review is reused, whatever the token says. A token whose pod is deleted is
/// refused at once all the same: [`crate::k8s::runtime::auth`] reuses no review of a pod seen deleted.
const MAX_TTL: Duration = Duration::from_secs(10 * 60);

#[derive(Debug, Default)]
pub struct TokenCache {
    entries: Mutex<HashMap<[u8; 32], (SystemTime, TokenReviewStatus)>>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// When a JWT expires, from its `exp` claim (read, not verified: the review verified it).
pub fn expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(exp))
}

impl TokenCache {
    /// The accepted review of `token`, if it has not expired.
    pub fn get(&self, token: &str, now: SystemTime) -> Option<TokenReviewStatus> {
        let entries = self.entries.lock().ok()?;
        let (until, status) = entries.get(&digest(token))?;
        (now < *until).then(|| status.clone())
    }

    /// Keeps an accepted review until the token expires (at most `MAX_TTL`).
    pub fn put(&self, token: &str, status: TokenReviewStatus, now: SystemTime) {
        let until = expiry(token)
            .unwrap_or(now + DEFAULT_TTL)
            .min(now + MAX_TTL);
        if until <= now {
            return;
        }
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= MAX_ENTRIES {
                entries.retain(|_, (u, _)| *u > now);
            }
            if entries.len() < MAX_ENTRIES {
                entries.insert(digest(token), (until, status));
            }
        }
    }

    /// Drops the review of `token` (its pod is gone: the API server must be asked again).
    pub fn forget(&self, token: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(&digest(token));
        }
    }

    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(exp: u64) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256"}"#),
            b64(&format!(r#"{{"aud":["valkey-controller"],"exp":{exp}}}"#))
        )
    }

    fn accepted() -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            ..TokenReviewStatus::default()
        }
    }

    #[test]
    fn a_review_is_reused_until_the_token_expires_and_never_past_ten_minutes() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let cache = TokenCache::default();
        let short = jwt(1_000_300); // expires in 5 minutes
        cache.put(&short, accepted(), now);
        assert!(cache.get(&short, now + Duration::from_secs(299)).is_some());
        assert!(cache.get(&short, now + Duration::from_secs(300)).is_none());

        let long = jwt(1_000_000 + 3600); // an hour: reused for ten minutes only
        cache.put(&long, accepted(), now);
        assert!(cache.get(&long, now + Duration::from_secs(599)).is_some());
        assert!(cache.get(&long, now + Duration::from_secs(600)).is_none());

        // No readable expiry: a minute. Already expired: not kept. Unknown: nothing.
        cache.put("opaque", accepted(), now);
        assert!(cache.get("opaque", now + Duration::from_secs(59)).is_some());
        assert!(cache.get("opaque", now + Duration::from_secs(60)).is_none());
        let stale = jwt(999_000);
        cache.put(&stale, accepted(), now);
        assert!(cache.get(&stale, now).is_none());
        assert!(cache.get(&jwt(1_000_300 + 1), now).is_none());
        assert_eq!(cache.len(), 3);
    }
}
