//! Polls: one vote per buyer, changeable until the close unless final.

use std::collections::HashMap;

use qun_proto::v1::{self, CommerceResult};

/// A poll and every buyer's vote.
#[derive(Debug, Clone)]
pub(crate) struct Poll {
    /// As it goes on the wire; tallies and `voters` follow `votes`.
    pub(crate) wire: v1::Poll,
    votes: HashMap<String, u32>,
}

/// What a vote did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Voted {
    pub(crate) result: CommerceResult,
    /// The buyer's vote before, to undo it: `None` when the tallies did not
    /// change, `Some(None)` for a first vote.
    pub(crate) before: Option<Option<u32>>,
}

impl Poll {
    pub(crate) fn new(wire: v1::Poll) -> Self {
        Self::restore(wire, HashMap::new())
    }

    /// Restores a stored poll; votes naming no option are ignored.
    pub(crate) fn restore(mut wire: v1::Poll, mut votes: HashMap<String, u32>) -> Self {
        let options = wire.options.len();
        votes.retain(|_, o| (*o as usize) < options);
        for option in &mut wire.options {
            option.votes = 0;
        }
        for o in votes.values() {
            wire.options[*o as usize].votes += 1;
        }
        wire.voters = u32::try_from(votes.len()).unwrap_or(u32::MAX);
        Self { wire, votes }
    }

    /// The buyer's vote as `option + 1`, 0 for none.
    pub(crate) fn vote_of(&self, user_id: &str) -> u32 {
        self.votes.get(user_id).map_or(0, |o| o + 1)
    }

    pub(crate) fn due_ms(&self) -> u64 {
        if self.wire.closed {
            0
        } else {
            self.wire.deadline_ms
        }
    }

    fn ended(&self, now_ms: u64) -> bool {
        self.wire.closed || now_ms >= self.wire.deadline_ms
    }

    /// A buyer votes for `option` (already checked to exist).
    pub(crate) fn vote(&mut self, user_id: &str, option: u32, now_ms: u64) -> Voted {
        if self.ended(now_ms) {
            return Voted {
                result: CommerceResult::VoteClosed,
                before: None,
            };
        }
        let previous = self.votes.get(user_id).copied();
        match previous {
            Some(p) if p == option => Voted {
                result: CommerceResult::Voted,
                before: None,
            },
            Some(_) if self.wire.votes_final => Voted {
                result: CommerceResult::VoteClosed,
                before: None,
            },
            _ => {
                self.set(user_id, Some(option));
                Voted {
                    result: CommerceResult::Voted,
                    before: Some(previous),
                }
            }
        }
    }

    /// Puts a buyer's vote back to `before` (undo).
    pub(crate) fn set(&mut self, user_id: &str, vote: Option<u32>) {
        let old = match vote {
            Some(o) => self.votes.insert(user_id.to_string(), o),
            None => self.votes.remove(user_id),
        };
        if let Some(o) = old {
            self.wire.options[o as usize].votes -= 1;
        }
        if let Some(o) = vote {
            self.wire.options[o as usize].votes += 1;
        }
        self.wire.voters = u32::try_from(self.votes.len()).unwrap_or(u32::MAX);
    }

    /// Closes at the deadline (`now_ms` past it) or when staff end it
    /// (`early`). `false` when already closed or not yet due.
    pub(crate) fn close(&mut self, now_ms: u64, early: bool) -> bool {
        if self.wire.closed || (!early && now_ms < self.wire.deadline_ms) {
            return false;
        }
        self.wire.closed = true;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    fn poll(votes_final: bool) -> Poll {
        Poll::new(v1::Poll {
            poll_id: 4,
            question: "Which colour next?".into(),
            options: ["red", "green", "blue"]
                .into_iter()
                .map(|t| v1::PollOption {
                    text: t.into(),
                    votes: 0,
                })
                .collect(),
            deadline_ms: T0 + 1_000,
            votes_final,
            ..Default::default()
        })
    }

    fn tallies(p: &Poll) -> Vec<u32> {
        p.wire.options.iter().map(|o| o.votes).collect()
    }

    #[test]
    fn one_vote_per_buyer_that_can_change() {
        let mut p = poll(false);
        p.vote("a", 0, T0);
        p.vote("b", 0, T0);
        assert_eq!(tallies(&p), [2, 0, 0]);
        assert_eq!(p.vote("a", 2, T0).result, CommerceResult::Voted);
        assert_eq!(tallies(&p), [1, 0, 1]);
        assert_eq!(p.wire.voters, 2);
        assert_eq!(p.vote_of("a"), 3);
        assert_eq!(
            p.vote("a", 2, T0).before,
            None,
            "the same vote changes nothing"
        );
    }

    #[test]
    fn final_votes_cannot_change() {
        let mut p = poll(true);
        p.vote("a", 1, T0);
        assert_eq!(p.vote("a", 0, T0).result, CommerceResult::VoteClosed);
        assert_eq!(tallies(&p), [0, 1, 0]);
    }

    #[test]
    fn the_deadline_closes_once_and_stops_votes() {
        let mut p = poll(false);
        assert!(!p.close(T0 + 999, false), "not yet due");
        assert_eq!(
            p.vote("a", 0, T0 + 1_000).result,
            CommerceResult::VoteClosed
        );
        assert!(p.close(T0 + 1_000, false));
        assert!(!p.close(T0 + 2_000, false), "closed once");
        assert_eq!(p.due_ms(), 0);
    }

    #[test]
    fn staff_can_close_early() {
        let mut p = poll(false);
        assert!(p.close(T0, true));
        assert_eq!(p.vote("a", 0, T0).result, CommerceResult::VoteClosed);
    }

    #[test]
    fn undo_puts_the_previous_vote_back() {
        let mut p = poll(false);
        p.vote("a", 0, T0);
        let v = p.vote("a", 1, T0);
        p.set("a", v.before.unwrap());
        assert_eq!(tallies(&p), [1, 0, 0]);
        let first = p.vote("b", 2, T0);
        p.set("b", first.before.unwrap());
        assert_eq!((tallies(&p), p.wire.voters), (vec![1, 0, 0], 1));
    }

    #[test]
    fn restore_recounts_and_drops_votes_for_missing_options() {
        let p = Poll::restore(
            poll(false).wire,
            HashMap::from([("a".into(), 1), ("b".into(), 1), ("c".into(), 7)]),
        );
        assert_eq!((tallies(&p), p.wire.voters), (vec![0, 2, 0], 2));
    }
}
