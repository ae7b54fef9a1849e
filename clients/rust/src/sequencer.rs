//! Per-group ordering on the client: drop duplicates, spot gaps.
//!
//! The server pushes each group's messages in seq order with no gap, and a
//! resume continues exactly where the client left off. The client still
//! checks, because it is the last line of defence against a lost message: a
//! [`Sequencer`] remembers, per group, the newest seq handed to the
//! application, drops anything at or below it (a duplicate) and reports a
//! jump as a [`Step::Gap`] so the caller fetches the missing range before
//! going on. It does no I/O, so its rules are unit-tested directly.

/// What to do with one pushed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Next in order (or the first seen of an untracked group): deliver it.
    Deliver,
    /// Already delivered: drop it.
    Duplicate,
    /// Messages `after + 1 ..= before - 1` are missing: fetch them, deliver
    /// them, then deliver this one.
    Gap {
        /// The newest seq delivered.
        after: u64,
        /// The seq that arrived.
        before: u64,
    },
}

/// The newest delivered seq of every group this client follows.
#[derive(Debug, Default, Clone)]
pub struct Sequencer {
    /// (group, cursor), ascending group id. A client follows a handful of
    /// groups, at most a few hundred: a sorted list is searched in a few
    /// comparisons within one allocation, where a hash map hashed every
    /// push's group id and kept its entries apart from the list's.
    cursors: Vec<(u64, u64)>,
    duplicates: u64,
    gaps: u64,
}

impl Sequencer {
    /// Where `group_id` is, or would be inserted.
    fn find(&self, group_id: u64) -> Result<usize, usize> {
        self.cursors.binary_search_by_key(&group_id, |&(g, _)| g)
    }

    /// Sets where a group stands (after a resume, or a join's recent list),
    /// never moving it backwards.
    pub fn track(&mut self, group_id: u64, seq: u64) {
        match self.find(group_id) {
            Ok(i) => self.cursors[i].1 = self.cursors[i].1.max(seq),
            Err(i) => self.cursors.insert(i, (group_id, seq)),
        }
    }

    /// Sets where a group stands, exactly (the client's own claim when it
    /// resumes from a saved cursor).
    pub fn reset(&mut self, group_id: u64, seq: u64) {
        match self.find(group_id) {
            Ok(i) => self.cursors[i].1 = seq,
            Err(i) => self.cursors.insert(i, (group_id, seq)),
        }
    }

    /// Stops following a group.
    pub fn forget(&mut self, group_id: u64) {
        if let Ok(i) = self.find(group_id) {
            self.cursors.remove(i);
        }
    }

    /// The newest seq delivered for a group.
    pub fn cursor(&self, group_id: u64) -> Option<u64> {
        self.find(group_id).ok().map(|i| self.cursors[i].1)
    }

    /// Every group followed and its cursor, ascending group id: what a
    /// reconnecting client sends in `Resume`.
    pub fn cursors(&self) -> Vec<(u64, u64)> {
        self.cursors.clone()
    }

    /// Decides about a pushed message; [`Step::Deliver`] advances the cursor.
    pub fn observe(&mut self, group_id: u64, seq: u64) -> Step {
        let c = match self.find(group_id) {
            Err(i) => {
                self.cursors.insert(i, (group_id, seq));
                return Step::Deliver;
            }
            Ok(i) => &mut self.cursors[i].1,
        };
        if seq <= *c {
            self.duplicates += 1;
            Step::Duplicate
        } else if seq == *c + 1 {
            *c = seq;
            Step::Deliver
        } else {
            self.gaps += 1;
            Step::Gap {
                after: *c,
                before: seq,
            }
        }
    }

    /// Duplicates dropped so far.
    pub fn duplicates_dropped(&self) -> u64 {
        self.duplicates
    }

    /// Gaps seen so far.
    pub fn gaps_seen(&self) -> u64 {
        self.gaps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_messages_are_delivered_and_advance() {
        let mut s = Sequencer::default();
        s.track(1, 10);
        assert_eq!(s.observe(1, 11), Step::Deliver);
        assert_eq!(s.observe(1, 12), Step::Deliver);
        assert_eq!(s.cursor(1), Some(12));
    }

    #[test]
    fn duplicates_are_dropped() {
        let mut s = Sequencer::default();
        s.track(1, 10);
        assert_eq!(s.observe(1, 10), Step::Duplicate);
        assert_eq!(s.observe(1, 3), Step::Duplicate);
        assert_eq!(s.duplicates_dropped(), 2);
        assert_eq!(s.cursor(1), Some(10));
    }

    #[test]
    fn a_jump_is_a_gap_that_does_not_move_the_cursor() {
        let mut s = Sequencer::default();
        s.track(1, 10);
        assert_eq!(
            s.observe(1, 14),
            Step::Gap {
                after: 10,
                before: 14
            }
        );
        assert_eq!(s.cursor(1), Some(10), "the caller fills, then tracks");
        s.track(1, 13);
        assert_eq!(s.observe(1, 14), Step::Deliver);
        assert_eq!(s.gaps_seen(), 1);
    }

    #[test]
    fn groups_are_independent_and_untracked_ones_start_where_they_are() {
        let mut s = Sequencer::default();
        s.track(1, 5);
        assert_eq!(s.observe(2, 40), Step::Deliver);
        assert_eq!(s.observe(2, 41), Step::Deliver);
        assert_eq!(s.observe(1, 6), Step::Deliver);
        assert_eq!(s.cursors(), [(1, 6), (2, 41)]);
    }

    #[test]
    fn many_groups_in_any_order_are_kept_apart_and_listed_ascending() {
        let mut s = Sequencer::default();
        // 300 groups, tracked in a scrambled order.
        let groups: Vec<u64> = (0..300u64).map(|i| (i * 7_919) % 300 + 1).collect();
        for &g in &groups {
            s.track(g, g * 10);
        }
        for &g in groups.iter().rev() {
            assert_eq!(s.observe(g, g * 10 + 1), Step::Deliver, "group {g}");
            assert_eq!(s.observe(g, g * 10), Step::Duplicate, "group {g}");
        }
        s.forget(150);
        let all = s.cursors();
        assert_eq!(all.len(), 299);
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "ascending");
        assert!(all.iter().all(|&(g, c)| c == g * 10 + 1));
        assert_eq!(s.cursor(150), None);
    }

    #[test]
    fn track_never_moves_back_but_reset_does() {
        let mut s = Sequencer::default();
        s.track(1, 9);
        s.track(1, 4);
        assert_eq!(s.cursor(1), Some(9));
        s.reset(1, 4);
        assert_eq!(s.cursor(1), Some(4));
        s.forget(1);
        assert_eq!(s.cursor(1), None);
    }
}
