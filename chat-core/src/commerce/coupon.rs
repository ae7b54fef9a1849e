//! Coupons: atomic claims against a total and a per-buyer limit.

use std::collections::HashMap;

use qun_proto::v1::{self, CommerceResult};

/// A coupon and who holds how many.
#[derive(Debug, Clone)]
pub(crate) struct Coupon {
    /// As it goes on the wire; `claimed` is the sum of `holders`.
    pub(crate) wire: v1::Coupon,
    holders: HashMap<String, u32>,
}

/// What a claim did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Claimed {
    pub(crate) result: CommerceResult,
    /// This claim took the last coupon (broadcast once).
    pub(crate) exhausted_now: bool,
    /// How many the buyer holds now.
    pub(crate) held: u32,
}

impl Coupon {
    pub(crate) fn new(mut wire: v1::Coupon) -> Self {
        wire.claimed = 0;
        Self {
            wire,
            holders: HashMap::new(),
        }
    }

    pub(crate) fn restore(mut wire: v1::Coupon, holders: HashMap<String, u32>) -> Self {
        wire.claimed = holders.values().sum();
        Self { wire, holders }
    }

    pub(crate) fn held_by(&self, user_id: &str) -> u32 {
        self.holders.get(user_id).copied().unwrap_or(0)
    }

    /// A buyer claims one: refused when expired, at their limit, or when
    /// none is left.
    pub(crate) fn claim(&mut self, user_id: &str, now_ms: u64) -> Claimed {
        let held = self.held_by(user_id);
        let refused = |result| Claimed {
            result,
            exhausted_now: false,
            held,
        };
        if now_ms >= self.wire.expires_at_ms {
            return refused(CommerceResult::Expired);
        }
        if held >= self.wire.per_buyer_limit {
            return refused(CommerceResult::LimitReached);
        }
        if self.wire.claimed >= self.wire.quantity {
            return refused(CommerceResult::Exhausted);
        }
        self.holders.insert(user_id.to_string(), held + 1);
        self.wire.claimed += 1;
        Claimed {
            result: CommerceResult::Claimed,
            exhausted_now: self.wire.claimed == self.wire.quantity,
            held: held + 1,
        }
    }

    /// Undoes a claim whose write could not be queued.
    pub(crate) fn undo_claim(&mut self, user_id: &str) {
        let held = self.held_by(user_id);
        if held == 0 {
            return;
        }
        if held == 1 {
            self.holders.remove(user_id);
        } else {
            self.holders.insert(user_id.to_string(), held - 1);
        }
        self.wire.claimed -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    fn coupon(quantity: u32, per_buyer_limit: u32) -> Coupon {
        Coupon::new(v1::Coupon {
            coupon_id: 3,
            quantity,
            per_buyer_limit,
            expires_at_ms: T0 + 1_000,
            ..Default::default()
        })
    }

    #[test]
    fn claims_stop_at_the_quantity_and_exhaustion_is_reported_once() {
        let mut c = coupon(2, 1);
        assert!(!c.claim("a", T0).exhausted_now);
        let last = c.claim("b", T0);
        assert_eq!(last.result, CommerceResult::Claimed);
        assert!(last.exhausted_now);
        let late = c.claim("c", T0);
        assert_eq!(
            (late.result, late.exhausted_now),
            (CommerceResult::Exhausted, false)
        );
        assert_eq!(c.wire.claimed, 2);
    }

    #[test]
    fn the_per_buyer_limit_holds() {
        let mut c = coupon(10, 2);
        assert_eq!(c.claim("a", T0).held, 1);
        assert_eq!(c.claim("a", T0).held, 2);
        let third = c.claim("a", T0);
        assert_eq!(
            (third.result, third.held),
            (CommerceResult::LimitReached, 2)
        );
        assert_eq!(c.wire.claimed, 2);
    }

    #[test]
    fn expired_coupons_cannot_be_claimed() {
        let mut c = coupon(10, 1);
        assert_eq!(c.claim("a", T0 + 999).result, CommerceResult::Claimed);
        assert_eq!(c.claim("b", T0 + 1_000).result, CommerceResult::Expired);
    }

    #[test]
    fn undo_gives_the_coupon_back() {
        let mut c = coupon(1, 1);
        c.claim("a", T0);
        c.undo_claim("a");
        assert_eq!((c.wire.claimed, c.held_by("a")), (0, 0));
        assert_eq!(c.claim("b", T0).result, CommerceResult::Claimed);
    }

    #[test]
    fn restore_counts_every_holder() {
        let c = Coupon::restore(
            coupon(9, 3).wire,
            HashMap::from([("a".into(), 2), ("b".into(), 1)]),
        );
        assert_eq!(c.wire.claimed, 3);
    }
}
