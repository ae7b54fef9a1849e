//! Flow control for buyers' chatter: token buckets.
//!
//! Two limits apply to buyers' messages (staff and the system are never
//! limited: an answer or a commerce update must always get through):
//! - per user, across all their groups and devices ([`UserRates`]);
//! - per group, all buyers together — *slow mode* — so that a flash-sale
//!   crowd cannot bury the merchant's answers (kept in the group's state).
//!
//! The clock is a parameter (`now_ms`), so every decision is deterministic
//! and unit-tested without sleeping.

use dashmap::DashMap;

/// A sustained rate with a burst allowance. `per_sec == 0.0` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_sec: f64,
    /// Most tokens held; a quiet sender can send this many at once.
    pub burst: u32,
}

impl Rate {
    /// No limit.
    pub const UNLIMITED: Rate = Rate {
        per_sec: 0.0,
        burst: 0,
    };

    /// Whether this rate limits anything.
    pub fn is_limited(&self) -> bool {
        self.per_sec > 0.0
    }
}

/// One token bucket.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenBucket {
    tokens: f64,
    updated_ms: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn full(rate: Rate, now_ms: u64) -> Self {
        Self {
            tokens: f64::from(rate.burst.max(1)),
            updated_ms: now_ms,
        }
    }

    fn refill(&mut self, rate: Rate, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.updated_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate.per_sec).min(f64::from(rate.burst.max(1)));
        self.updated_ms = self.updated_ms.max(now_ms);
    }

    /// Takes one token, or says how many milliseconds until one is there.
    pub(crate) fn take(&mut self, rate: Rate, now_ms: u64) -> Result<(), u64> {
        if !rate.is_limited() {
            return Ok(());
        }
        self.refill(rate, now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait_s = (1.0 - self.tokens) / rate.per_sec;
            Err(((wait_s * 1000.0).ceil() as u64).max(1))
        }
    }

    /// Gives back a token taken for a message that was then refused
    /// elsewhere.
    pub(crate) fn give_back(&mut self, rate: Rate) {
        self.tokens = (self.tokens + 1.0).min(f64::from(rate.burst.max(1)));
    }

    /// Whether the bucket is full again (and can be forgotten).
    fn is_full(&self, rate: Rate, now_ms: u64) -> bool {
        let mut probe = *self;
        probe.refill(rate, now_ms);
        probe.tokens >= f64::from(rate.burst.max(1))
    }
}

/// Per-user buckets, sharded; a user with a full bucket costs nothing and is
/// forgotten by [`UserRates::forget_idle`].
#[derive(Debug)]
pub(crate) struct UserRates {
    rate: Rate,
    buckets: DashMap<String, TokenBucket>,
}

impl UserRates {
    pub(crate) fn new(rate: Rate) -> Self {
        Self {
            rate,
            buckets: DashMap::new(),
        }
    }

    /// Takes a token for `user_id`, or says when to retry.
    pub(crate) fn take(&self, user_id: &str, now_ms: u64) -> Result<(), u64> {
        if !self.rate.is_limited() {
            return Ok(());
        }
        let mut bucket = self
            .buckets
            .entry(user_id.to_string())
            .or_insert_with(|| TokenBucket::full(self.rate, now_ms));
        bucket.take(self.rate, now_ms)
    }

    pub(crate) fn give_back(&self, user_id: &str) {
        if let Some(mut b) = self.buckets.get_mut(user_id) {
            b.give_back(self.rate);
        }
    }

    /// Drops the buckets that have refilled; returns how many remain.
    pub(crate) fn forget_idle(&self, now_ms: u64) -> usize {
        self.buckets.retain(|_, b| !b.is_full(self.rate, now_ms));
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIVE_PER_SEC: Rate = Rate {
        per_sec: 5.0,
        burst: 10,
    };

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let mut b = TokenBucket::full(FIVE_PER_SEC, 0);
        for i in 0..10 {
            assert_eq!(b.take(FIVE_PER_SEC, 0), Ok(()), "burst message {i}");
        }
        // Empty: one token comes every 200 ms.
        assert_eq!(b.take(FIVE_PER_SEC, 0), Err(200));
        assert_eq!(b.take(FIVE_PER_SEC, 100), Err(100));
        assert_eq!(b.take(FIVE_PER_SEC, 200), Ok(()));
        assert_eq!(b.take(FIVE_PER_SEC, 200), Err(200));
        // A long quiet spell refills to the burst, no more.
        for _ in 0..10 {
            assert_eq!(b.take(FIVE_PER_SEC, 60_000), Ok(()));
        }
        assert!(b.take(FIVE_PER_SEC, 60_000).is_err());
    }

    #[test]
    fn unlimited_never_refuses() {
        let mut b = TokenBucket::full(Rate::UNLIMITED, 0);
        for _ in 0..1000 {
            assert_eq!(b.take(Rate::UNLIMITED, 0), Ok(()));
        }
    }

    #[test]
    fn a_clock_going_backwards_does_not_mint_tokens() {
        let mut b = TokenBucket::full(FIVE_PER_SEC, 10_000);
        for _ in 0..10 {
            b.take(FIVE_PER_SEC, 10_000).unwrap();
        }
        assert!(b.take(FIVE_PER_SEC, 5_000).is_err());
        assert!(b.take(FIVE_PER_SEC, 10_000).is_err());
    }

    #[test]
    fn users_are_limited_separately_and_forgotten_when_idle() {
        let rates = UserRates::new(Rate {
            per_sec: 1.0,
            burst: 2,
        });
        assert!(rates.take("a", 0).is_ok());
        assert!(rates.take("a", 0).is_ok());
        assert_eq!(rates.take("a", 0), Err(1000));
        assert!(rates.take("b", 0).is_ok(), "b has its own bucket");
        rates.give_back("a");
        assert!(
            rates.take("a", 0).is_ok(),
            "a refused message costs nothing"
        );
        assert_eq!(rates.forget_idle(500), 2);
        assert_eq!(rates.forget_idle(10_000), 0);
    }
}
