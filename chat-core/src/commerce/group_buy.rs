//! The group-buy (拼团) state machine: pure, with time passed in.
//!
//! ```text
//!            join reaches target            join takes the last slot
//!   OPEN ─────────────────────────▶ SUCCEEDED ───────────────────────▶ SOLD_OUT
//!    │  ╲ join takes the last slot (target == slots) ──────────────────▲
//!    │ deadline                         │ deadline
//!    ▼                                  ▼
//!  FAILED                        SUCCEEDED, closed
//! ```
//! Staff may cancel any group-buy that is not closed (→ CANCELLED). Every
//! arrow is a [`Transition`], broadcast once by the caller.

use std::collections::HashMap;

use qun_proto::v1::{self, CommerceResult, GroupBuyState};

/// A group-buy and its participants.
#[derive(Debug, Clone)]
pub(crate) struct GroupBuy {
    /// The state as it goes on the wire; `joined` equals `participants.len()`.
    pub(crate) wire: v1::GroupBuy,
    /// user → when they joined.
    participants: HashMap<String, u64>,
    /// `(state, closed, changed_at_ms)` before the last transition, so a
    /// transition whose write cannot be queued is undone.
    before_transition: (GroupBuyState, bool, u64),
}

/// A state change to broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transition;

/// What a join did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Joined {
    pub(crate) result: CommerceResult,
    /// Set when this join changed the state (succeeded or sold out).
    pub(crate) transition: Option<Transition>,
    /// The state before, to undo the join if its write cannot be queued.
    pub(crate) before: Option<(GroupBuyState, bool, u64)>,
}

impl GroupBuy {
    /// A new group-buy in state OPEN with no participants.
    pub(crate) fn new(mut wire: v1::GroupBuy) -> Self {
        wire.joined = 0;
        Self::restore(wire, HashMap::new())
    }

    /// Restores a stored group-buy and its participants.
    pub(crate) fn restore(mut wire: v1::GroupBuy, participants: HashMap<String, u64>) -> Self {
        wire.joined = count(participants.len());
        let before_transition = (wire.state(), wire.closed, wire.changed_at_ms);
        Self {
            wire,
            participants,
            before_transition,
        }
    }

    pub(crate) fn state(&self) -> GroupBuyState {
        self.wire.state()
    }

    pub(crate) fn has(&self, user_id: &str) -> bool {
        self.participants.contains_key(user_id)
    }

    /// When it next changes by itself: its deadline, or never once closed.
    pub(crate) fn due_ms(&self) -> u64 {
        if self.wire.closed {
            0
        } else {
            self.wire.deadline_ms
        }
    }

    /// Whether joining is over at `now_ms` (closed, or the deadline passed
    /// and is not yet resolved).
    fn ended(&self, now_ms: u64) -> bool {
        self.wire.closed || now_ms >= self.wire.deadline_ms
    }

    /// A buyer joins. Idempotent; never takes more than `slots`.
    pub(crate) fn join(&mut self, user_id: &str, now_ms: u64) -> Joined {
        let refused = |result| Joined {
            result,
            transition: None,
            before: None,
        };
        if self.has(user_id) {
            return refused(CommerceResult::AlreadyJoined);
        }
        if self.state() == GroupBuyState::SoldOut || self.wire.joined >= self.wire.slots {
            return refused(CommerceResult::SoldOut);
        }
        if self.ended(now_ms) {
            return refused(CommerceResult::Closed);
        }
        if now_ms < self.wire.starts_at_ms {
            return refused(CommerceResult::NotStarted);
        }
        let before = (self.state(), self.wire.closed, self.wire.changed_at_ms);
        self.participants.insert(user_id.to_string(), now_ms);
        self.wire.joined += 1;
        let next = if self.wire.joined >= self.wire.slots {
            Some(GroupBuyState::SoldOut)
        } else if self.state() == GroupBuyState::Open && self.wire.joined >= self.wire.target {
            Some(GroupBuyState::Succeeded)
        } else {
            None
        };
        let transition = next.map(|s| self.enter(s, now_ms));
        Joined {
            result: CommerceResult::Joined,
            transition,
            before: Some(before),
        }
    }

    /// Undoes a [`GroupBuy::join`] whose write could not be queued.
    pub(crate) fn undo_join(&mut self, user_id: &str, before: (GroupBuyState, bool, u64)) {
        if self.participants.remove(user_id).is_some() {
            self.wire.joined -= 1;
        }
        let (state, closed, changed_at_ms) = before;
        self.wire.set_state(state);
        self.wire.closed = closed;
        self.wire.changed_at_ms = changed_at_ms;
    }

    /// A participant leaves; only while OPEN and before the deadline.
    pub(crate) fn leave(&mut self, user_id: &str, now_ms: u64) -> CommerceResult {
        if !self.has(user_id) {
            return CommerceResult::NotJoined;
        }
        if self.state() != GroupBuyState::Open || self.ended(now_ms) {
            return CommerceResult::Closed;
        }
        self.participants.remove(user_id);
        self.wire.joined -= 1;
        CommerceResult::Left
    }

    /// Undoes a [`GroupBuy::leave`] whose write could not be queued.
    pub(crate) fn undo_leave(&mut self, user_id: &str, joined_at_ms: u64) {
        if self
            .participants
            .insert(user_id.to_string(), joined_at_ms)
            .is_none()
        {
            self.wire.joined += 1;
        }
    }

    /// When `user_id` joined, if they did.
    pub(crate) fn joined_at(&self, user_id: &str) -> Option<u64> {
        self.participants.get(user_id).copied()
    }

    /// Resolves the deadline: OPEN fails, SUCCEEDED closes. `None` before
    /// the deadline or when already closed.
    pub(crate) fn expire(&mut self, now_ms: u64) -> Option<Transition> {
        if self.wire.closed || now_ms < self.wire.deadline_ms {
            return None;
        }
        let next = match self.state() {
            GroupBuyState::Open => GroupBuyState::Failed,
            other => other,
        };
        Some(self.enter(next, now_ms))
    }

    /// Staff end it now. `None` when it is already closed.
    pub(crate) fn cancel(&mut self, now_ms: u64) -> Option<Transition> {
        (!self.wire.closed).then(|| self.enter(GroupBuyState::Cancelled, now_ms))
    }

    /// Undoes the last [`GroupBuy::expire`] or [`GroupBuy::cancel`].
    pub(crate) fn reopen(&mut self) {
        let (state, closed, changed_at_ms) = self.before_transition;
        self.wire.set_state(state);
        self.wire.closed = closed;
        self.wire.changed_at_ms = changed_at_ms;
    }

    fn enter(&mut self, state: GroupBuyState, now_ms: u64) -> Transition {
        self.before_transition = (self.state(), self.wire.closed, self.wire.changed_at_ms);
        self.wire.set_state(state);
        self.wire.changed_at_ms = now_ms;
        self.wire.closed = match state {
            GroupBuyState::SoldOut | GroupBuyState::Failed | GroupBuyState::Cancelled => true,
            _ => now_ms >= self.wire.deadline_ms,
        };
        Transition
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    fn group_buy(target: u32, slots: u32) -> GroupBuy {
        GroupBuy::new(v1::GroupBuy {
            group_buy_id: 5,
            group_id: 1,
            target,
            slots,
            starts_at_ms: T0,
            deadline_ms: T0 + 60_000,
            state: GroupBuyState::Open as i32,
            changed_at_ms: T0,
            ..Default::default()
        })
    }

    #[test]
    fn reaching_the_target_succeeds_once_and_joining_goes_on() {
        let mut gb = group_buy(2, 4);
        let a = gb.join("a", T0 + 1);
        assert_eq!((a.result, a.transition), (CommerceResult::Joined, None));
        let b = gb.join("b", T0 + 2);
        assert_eq!(b.transition, Some(Transition));
        assert_eq!(gb.state(), GroupBuyState::Succeeded);
        assert!(!gb.wire.closed);
        let c = gb.join("c", T0 + 3);
        assert_eq!((c.result, c.transition), (CommerceResult::Joined, None));
        assert_eq!(gb.wire.joined, 3);
    }

    #[test]
    fn the_last_slot_sells_out_and_no_slot_is_oversold() {
        let mut gb = group_buy(2, 3);
        for u in ["a", "b"] {
            gb.join(u, T0 + 1);
        }
        let last = gb.join("c", T0 + 2);
        assert_eq!(last.transition, Some(Transition));
        assert_eq!(gb.state(), GroupBuyState::SoldOut);
        assert!(gb.wire.closed);
        assert_eq!(gb.join("d", T0 + 3).result, CommerceResult::SoldOut);
        assert_eq!(gb.wire.joined, 3);
        assert_eq!(gb.due_ms(), 0, "a closed group-buy has no deadline left");
    }

    #[test]
    fn target_equal_to_slots_goes_straight_to_sold_out() {
        let mut gb = group_buy(2, 2);
        gb.join("a", T0);
        assert!(gb.join("b", T0).transition.is_some());
        assert_eq!(gb.state(), GroupBuyState::SoldOut);
    }

    #[test]
    fn joins_are_idempotent_even_after_closing() {
        let mut gb = group_buy(2, 2);
        gb.join("a", T0);
        assert_eq!(gb.join("a", T0 + 1).result, CommerceResult::AlreadyJoined);
        gb.join("b", T0 + 1);
        assert_eq!(gb.join("a", T0 + 2).result, CommerceResult::AlreadyJoined);
        assert_eq!(gb.wire.joined, 2);
    }

    #[test]
    fn the_deadline_fails_an_open_group_buy() {
        let mut gb = group_buy(3, 5);
        gb.join("a", T0);
        assert_eq!(gb.expire(T0 + 59_999), None, "not yet");
        assert_eq!(gb.join("b", T0 + 60_000).result, CommerceResult::Closed);
        assert_eq!(gb.expire(T0 + 60_000), Some(Transition));
        assert_eq!(gb.state(), GroupBuyState::Failed);
        assert!(gb.wire.closed);
        assert_eq!(gb.expire(T0 + 70_000), None, "resolved once");
    }

    #[test]
    fn the_deadline_closes_a_succeeded_group_buy_without_changing_its_state() {
        let mut gb = group_buy(1 + 1, 5);
        gb.join("a", T0);
        gb.join("b", T0);
        assert_eq!(gb.expire(T0 + 60_000), Some(Transition));
        assert_eq!(gb.state(), GroupBuyState::Succeeded);
        assert!(gb.wire.closed);
    }

    #[test]
    fn joining_before_the_start_is_refused() {
        let mut gb = group_buy(2, 5);
        gb.wire.starts_at_ms = T0 + 1_000;
        assert_eq!(gb.join("a", T0).result, CommerceResult::NotStarted);
        assert_eq!(gb.join("a", T0 + 1_000).result, CommerceResult::Joined);
    }

    #[test]
    fn leaving_only_while_open() {
        let mut gb = group_buy(3, 5);
        gb.join("a", T0);
        assert_eq!(gb.leave("b", T0), CommerceResult::NotJoined);
        assert_eq!(gb.leave("a", T0), CommerceResult::Left);
        assert_eq!(gb.wire.joined, 0);
        for u in ["a", "b", "c"] {
            gb.join(u, T0);
        }
        assert_eq!(gb.state(), GroupBuyState::Succeeded);
        assert_eq!(gb.leave("a", T0), CommerceResult::Closed, "the deal is on");
        assert_eq!(gb.wire.joined, 3);
    }

    #[test]
    fn undo_restores_the_state_before_the_join() {
        let mut gb = group_buy(1 + 1, 2);
        gb.join("a", T0);
        let j = gb.join("b", T0 + 5);
        assert_eq!(gb.state(), GroupBuyState::SoldOut);
        gb.undo_join("b", j.before.unwrap());
        assert_eq!(gb.state(), GroupBuyState::Open);
        assert!(!gb.wire.closed);
        assert_eq!(gb.wire.joined, 1);
        assert!(!gb.has("b"));
    }

    #[test]
    fn cancel_ends_only_what_is_not_closed() {
        let mut gb = group_buy(2, 5);
        assert_eq!(gb.cancel(T0), Some(Transition));
        assert_eq!(gb.state(), GroupBuyState::Cancelled);
        assert_eq!(gb.cancel(T0), None);
        assert_eq!(gb.join("a", T0).result, CommerceResult::Closed);
    }
}
