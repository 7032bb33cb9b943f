//! Per-caller request-rate quotas: one token bucket per identity (an XKS key store, a Cloud EKM
//! service account, an Azure client certificate under its prefix), answering at once whether a
//! request may go ahead. A front asks right after authentication, so only proven callers spend
//! (or own) a bucket, and a refused request never reaches the body parser or the HSM.
//!
//! Protocol-neutral and clock-neutral: the caller passes the bucket's settings and the current
//! `Instant` (tests inject their own; nothing here sleeps or reads a clock). Must not depend on
//! HTTP, wire JSON, the PKCS#11 bindings, `metrics` or any front end.
//!
//! Settings travel with each call rather than living in the map, so a reload needs no hook here:
//! the next request of an identity brings its new settings. A bucket whose settings changed is
//! rebuilt full at the new burst (see [`Quotas::admit`]); unchanged buckets keep their level, so a
//! reload made for some other reason (a certificate rotation) does not hand every throttled caller
//! a fresh burst.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;

/// How many buckets one [`Quotas`] holds at most. Identities come from authenticated principals,
/// so the map only grows with callers the configuration accepts; the cap bounds memory if a wide
/// allow-list (e.g. every Cloud EKM service agent) lets very many of them in.
pub const MAX_BUCKETS: usize = 10_000;

/// One quota's settings: requests are admitted at `rate_per_sec` on average, with up to `burst`
/// at once after a quiet period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    /// Tokens added per second (finite, greater than 0; validated by `config`).
    pub rate_per_sec: f64,
    /// Bucket size: the most requests admitted back to back (at least 1).
    pub burst: u32,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttled {
    /// The identity's bucket is empty: it asked faster than its quota.
    Exhausted,
    /// The identity has no bucket yet and [`MAX_BUCKETS`] busy buckets leave no room for one.
    /// Refused rather than admitted unmetered: an unbounded caller set must not void the quotas.
    TooManyCallers,
}

/// The buckets of one front end, keyed by identity. Shared by every request of the front and
/// kept across reloads.
#[derive(Debug)]
pub struct Quotas {
    /// Read-locked on the hot path (the identity has a bucket); write-locked only to add one.
    buckets: RwLock<HashMap<String, Arc<Mutex<Bucket>>>>,
    capacity: usize,
}

/// One identity's bucket.
#[derive(Debug)]
struct Bucket {
    /// The settings its level was computed with.
    limit: TokenBucket,
    /// Tokens left (fractional: refill is continuous).
    tokens: f64,
    /// When `tokens` was last brought up to date.
    last: Instant,
}

impl Bucket {
    fn full(limit: TokenBucket, now: Instant) -> Self {
        Self {
            limit,
            tokens: f64::from(limit.burst),
            last: now,
        }
    }

    /// The level at `now`, without changing anything.
    fn level_at(&self, now: Instant) -> f64 {
        // `saturating_`: a request that read the clock just before another one may take the
        // lock just after it; its elapsed time is then zero, never negative.
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed * self.limit.rate_per_sec).min(f64::from(self.limit.burst))
    }

    /// Refill up to `now` and take one token if there is one.
    fn take(&mut self, limit: TokenBucket, now: Instant) -> bool {
        if self.limit != limit {
            // Rebuilt on a settings change: an operator who raises a throttled caller's quota
            // expects relief now, not after the old level refills; one who lowers it gets at
            // most the new burst at once, which the new settings allow anyway.
            *self = Self::full(limit, now);
        }
        self.tokens = self.level_at(now);
        if now > self.last {
            self.last = now;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Default for Quotas {
    fn default() -> Self {
        Self::with_capacity(MAX_BUCKETS)
    }
}

impl Quotas {
    /// An empty set holding at most [`MAX_BUCKETS`] buckets.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty set holding at most `capacity` buckets (tests use a small one).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            buckets: RwLock::new(HashMap::new()),
            capacity,
        }
    }

    /// Whether `identity` may make one more request at `now` under `limit`; takes a token if so.
    /// Never blocks beyond a short critical section and never sleeps.
    ///
    /// A new identity starts with a full bucket. When the map is full, buckets that have refilled
    /// completely are dropped first (a full bucket is indistinguishable from a new one, so nothing
    /// is lost); if every bucket is still in use the request is refused with
    /// [`Throttled::TooManyCallers`].
    pub fn admit(&self, identity: &str, limit: TokenBucket, now: Instant) -> Result<(), Throttled> {
        let bucket = self.bucket(identity, limit, now)?;
        let admitted = bucket
            .lock()
            // The state is two numbers and an Instant, consistent after every statement: a panic
            // elsewhere while holding the lock leaves nothing half-written.
            .unwrap_or_else(PoisonError::into_inner)
            .take(limit, now);
        if admitted {
            Ok(())
        } else {
            Err(Throttled::Exhausted)
        }
    }

    /// How many buckets exist (tests, diagnostics).
    pub fn len(&self) -> usize {
        self.buckets
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no bucket exists yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bucket of `identity`, made (full) if it has none.
    fn bucket(
        &self,
        identity: &str,
        limit: TokenBucket,
        now: Instant,
    ) -> Result<Arc<Mutex<Bucket>>, Throttled> {
        if let Some(b) = self
            .buckets
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(identity)
        {
            return Ok(b.clone());
        }
        let mut map = self.buckets.write().unwrap_or_else(PoisonError::into_inner);
        // Another request of the same identity may have added it between the two locks.
        if let Some(b) = map.get(identity) {
            return Ok(b.clone());
        }
        if map.len() >= self.capacity {
            // `try_lock`: a bucket locked right now is in use, hence not idle; no waiting while
            // the whole map is write-locked. No request holds a bucket lock while it takes the
            // map lock, so this cannot deadlock.
            map.retain(|_, b| {
                b.try_lock()
                    .map_or(true, |b| b.level_at(now) < f64::from(b.limit.burst))
            });
            if map.len() >= self.capacity {
                return Err(Throttled::TooManyCallers);
            }
        }
        let bucket = Arc::new(Mutex::new(Bucket::full(limit, now)));
        map.insert(identity.to_owned(), bucket.clone());
        Ok(bucket)
    }
}

/// A bucket identity made of a scope and a caller (Azure: prefix name and certificate subject),
/// unambiguous whatever either contains: the scope's length comes first.
pub fn scoped_identity(scope: &str, caller: &str) -> String {
    format!("{}:{scope}{caller}", scope.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const TWO_PER_SEC_BURST_3: TokenBucket = TokenBucket {
        rate_per_sec: 2.0,
        burst: 3,
    };

    #[test]
    fn a_burst_is_admitted_then_refused() {
        let q = Quotas::new();
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(q.admit("a", TWO_PER_SEC_BURST_3, t0), Ok(()), "request {i}");
        }
        assert_eq!(
            q.admit("a", TWO_PER_SEC_BURST_3, t0),
            Err(Throttled::Exhausted)
        );
        // Refusals take nothing: still refused, still not negative.
        assert_eq!(
            q.admit("a", TWO_PER_SEC_BURST_3, t0),
            Err(Throttled::Exhausted)
        );
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn tokens_refill_at_the_rate_up_to_the_burst() {
        let q = Quotas::new();
        let t0 = Instant::now();
        for _ in 0..3 {
            q.admit("a", TWO_PER_SEC_BURST_3, t0).unwrap();
        }
        // 2 per second: after 0.4 s not yet one token, after 0.5 s exactly one.
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(
            q.admit("a", TWO_PER_SEC_BURST_3, at(400)),
            Err(Throttled::Exhausted)
        );
        assert_eq!(q.admit("a", TWO_PER_SEC_BURST_3, at(500)), Ok(()));
        assert_eq!(
            q.admit("a", TWO_PER_SEC_BURST_3, at(500)),
            Err(Throttled::Exhausted)
        );
        // A long pause refills to the burst, never beyond it.
        let later = at(60_000);
        for _ in 0..3 {
            assert_eq!(q.admit("a", TWO_PER_SEC_BURST_3, later), Ok(()));
        }
        assert_eq!(
            q.admit("a", TWO_PER_SEC_BURST_3, later),
            Err(Throttled::Exhausted)
        );
    }

    #[test]
    fn a_clock_reading_older_than_the_last_one_adds_nothing() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let slow = TokenBucket {
            rate_per_sec: 1.0,
            burst: 1,
        };
        q.admit("a", slow, t1).unwrap();
        assert_eq!(q.admit("a", slow, t0), Err(Throttled::Exhausted));
        // And the bucket's time did not go back: one second after t1, one token.
        assert_eq!(q.admit("a", slow, t1 + Duration::from_secs(1)), Ok(()));
    }

    #[test]
    fn identities_have_their_own_buckets() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let one = TokenBucket {
            rate_per_sec: 0.001,
            burst: 1,
        };
        q.admit("a", one, t0).unwrap();
        assert_eq!(q.admit("a", one, t0), Err(Throttled::Exhausted));
        assert_eq!(q.admit("b", one, t0), Ok(()));
        assert_eq!(
            q.admit(&scoped_identity("p1", "x"), one, t0),
            Ok(()),
            "scoped"
        );
        assert_eq!(q.admit(&scoped_identity("p2", "x"), one, t0), Ok(()));
        assert_ne!(scoped_identity("ab", "c"), scoped_identity("a", "bc"));
    }

    #[test]
    fn changed_settings_rebuild_the_bucket_and_unchanged_ones_keep_its_level() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let tiny = TokenBucket {
            rate_per_sec: 0.001,
            burst: 2,
        };
        q.admit("a", tiny, t0).unwrap();
        q.admit("a", tiny, t0).unwrap();
        assert_eq!(q.admit("a", tiny, t0), Err(Throttled::Exhausted));
        // The same settings again (a reload that changed something else): still empty.
        assert_eq!(q.admit("a", tiny, t0), Err(Throttled::Exhausted));
        // Raised: full at the new burst at once.
        let raised = TokenBucket {
            rate_per_sec: 0.001,
            burst: 5,
        };
        for i in 0..5 {
            assert_eq!(q.admit("a", raised, t0), Ok(()), "raised, request {i}");
        }
        assert_eq!(q.admit("a", raised, t0), Err(Throttled::Exhausted));
        // Lowered: full at the (smaller) new burst.
        let lowered = TokenBucket {
            rate_per_sec: 0.001,
            burst: 1,
        };
        assert_eq!(q.admit("a", lowered, t0), Ok(()));
        assert_eq!(q.admit("a", lowered, t0), Err(Throttled::Exhausted));
    }

    #[test]
    fn the_map_is_bounded_and_idle_buckets_make_room() {
        let q = Quotas::with_capacity(2);
        let t0 = Instant::now();
        let limit = TokenBucket {
            rate_per_sec: 1.0,
            burst: 1,
        };
        q.admit("a", limit, t0).unwrap();
        q.admit("b", limit, t0).unwrap();
        // Both buckets are in use (empty): a third caller is refused, the first two are not
        // disturbed.
        assert_eq!(q.admit("c", limit, t0), Err(Throttled::TooManyCallers));
        assert_eq!(q.len(), 2);
        // A second later both have refilled completely: they make room for the newcomer.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(q.admit("c", limit, t1), Ok(()));
        assert_eq!(q.len(), 1);
        // A dropped identity comes back with a full bucket, as it would have had anyway.
        assert_eq!(q.admit("a", limit, t1), Ok(()));
        assert_eq!(q.admit("a", limit, t1), Err(Throttled::Exhausted));
    }

    #[test]
    fn concurrent_callers_never_get_more_than_the_burst() {
        let q = Arc::new(Quotas::new());
        let t0 = Instant::now();
        let limit = TokenBucket {
            rate_per_sec: 0.001,
            burst: 100,
        };
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let q = q.clone();
                std::thread::spawn(move || {
                    (0..50).filter(|_| q.admit("a", limit, t0).is_ok()).count()
                })
            })
            .collect();
        let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(admitted, 100);
    }
}
