//! Who may do what: the role × operation matrix, in one place.
//!
//! Every operation of [`crate::Groups`] asks `require` before anything
//! else, so this table is the rule; docs/roles.md prints it, and a test
//! keeps the two equal cell by cell. Beyond the role, operations check the
//! rest of their rules themselves: staff act only in their own shop's
//! groups (`WRONG_SHOP`), most need membership (`NOT_MEMBER`), and a
//! buyer's own-message recall has a two-minute window.

use crate::{ChatError, Identity, Role};

/// An operation a client can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// Create a group for one's shop.
    CreateGroup,
    /// Join a group.
    JoinGroup,
    /// Leave a group.
    LeaveGroup,
    /// Post a text message.
    SendMessage,
    /// Read history, page a range, resume.
    ReadHistory,
    /// Move one's read mark.
    MarkRead,
    /// Create or update one of the shop's products.
    PutProduct,
    /// Post a product card.
    PostCard,
    /// Start a group-buy.
    StartGroupBuy,
    /// Join or leave a group-buy.
    JoinGroupBuy,
    /// Issue a coupon.
    IssueCoupon,
    /// Claim a coupon.
    ClaimCoupon,
    /// Open a poll.
    OpenPoll,
    /// Vote in a poll.
    Vote,
    /// Cancel a group-buy or close a poll early.
    EndCommerce,
    /// Read a commerce object's state.
    ViewCommerce,
    /// Mute or unmute a group's promotions for oneself.
    MutePromotions,
    /// Report a message.
    ReportMessage,
    /// Tell the shop a card was opened.
    OpenCard,
    /// Read the group's reach quota.
    ViewReachQuota,
    /// Read buyers' reports.
    ViewReports,
    /// Mute a buyer.
    MuteMember,
    /// Mute every buyer.
    MuteAllBuyers,
    /// Remove a buyer.
    RemoveMember,
    /// Recall one's own message (within two minutes for buyers).
    RecallOwn,
    /// Recall another member's message.
    RecallAny,
    /// Make a question and its answer an FAQ entry, or remove one.
    EditFaq,
    /// Pin or unpin a message or an FAQ entry.
    Pin,
    /// Read the group's FAQ and pins.
    ReadBoard,
    /// Create, change, remove or list the shop's auto-reply rules.
    ManageAutoReply,
    /// Set a group's join policy.
    SetJoinPolicy,
    /// List and decide buyers' requests to join.
    DecideJoin,
    /// Read and edit buyers' tags.
    ManageTags,
    /// Push a card or an announcement, to everyone or a segment.
    PushPromotion,
    /// Schedule, cancel and list pushes.
    ManageSchedules,
    /// Read the industry tag pool.
    ReadTagPool,
    /// Open, close and read the queue of exclusive customer-service
    /// sessions (buyers: their own; agents: proactively, their buyers').
    CsSession,
    /// Hand a session to another agent.
    CsTransfer,
    /// Set one's presence as an agent.
    SetPresence,
    /// Block a shop's proactive contact.
    CsBlock,
    /// Configure customer service, assign agents, report purchases.
    ManageCs,
}

impl Operation {
    /// Every operation, in the order docs/roles.md lists them.
    pub const ALL: [Operation; 41] = [
        Operation::CreateGroup,
        Operation::JoinGroup,
        Operation::LeaveGroup,
        Operation::SendMessage,
        Operation::ReadHistory,
        Operation::MarkRead,
        Operation::PutProduct,
        Operation::PostCard,
        Operation::StartGroupBuy,
        Operation::JoinGroupBuy,
        Operation::IssueCoupon,
        Operation::ClaimCoupon,
        Operation::OpenPoll,
        Operation::Vote,
        Operation::EndCommerce,
        Operation::ViewCommerce,
        Operation::MutePromotions,
        Operation::ReportMessage,
        Operation::OpenCard,
        Operation::ViewReachQuota,
        Operation::ViewReports,
        Operation::MuteMember,
        Operation::MuteAllBuyers,
        Operation::RemoveMember,
        Operation::RecallOwn,
        Operation::RecallAny,
        Operation::EditFaq,
        Operation::Pin,
        Operation::ReadBoard,
        Operation::ManageAutoReply,
        Operation::SetJoinPolicy,
        Operation::DecideJoin,
        Operation::ManageTags,
        Operation::PushPromotion,
        Operation::ManageSchedules,
        Operation::ReadTagPool,
        Operation::CsSession,
        Operation::CsTransfer,
        Operation::SetPresence,
        Operation::CsBlock,
        Operation::ManageCs,
    ];

    /// The name docs/roles.md uses.
    pub fn name(self) -> &'static str {
        match self {
            Operation::CreateGroup => "create a group",
            Operation::JoinGroup => "join a group",
            Operation::LeaveGroup => "leave a group",
            Operation::SendMessage => "send a message",
            Operation::ReadHistory => "read history, page, resume",
            Operation::MarkRead => "mark read",
            Operation::PutProduct => "create or update a product",
            Operation::PostCard => "post a product card",
            Operation::StartGroupBuy => "start a group-buy",
            Operation::JoinGroupBuy => "join or leave a group-buy",
            Operation::IssueCoupon => "issue a coupon",
            Operation::ClaimCoupon => "claim a coupon",
            Operation::OpenPoll => "open a poll",
            Operation::Vote => "vote",
            Operation::EndCommerce => "cancel a group-buy, close a poll",
            Operation::ViewCommerce => "read a group-buy, coupon or poll",
            Operation::MutePromotions => "mute promotions for oneself",
            Operation::ReportMessage => "report a message",
            Operation::OpenCard => "open a card",
            Operation::ViewReachQuota => "read the reach quota",
            Operation::ViewReports => "read reports",
            Operation::MuteMember => "mute a buyer",
            Operation::MuteAllBuyers => "mute all buyers",
            Operation::RemoveMember => "remove a buyer",
            Operation::RecallOwn => "recall one's own message",
            Operation::RecallAny => "recall another's message",
            Operation::EditFaq => "add or remove an FAQ entry",
            Operation::Pin => "pin or unpin",
            Operation::ReadBoard => "read the FAQ and pins",
            Operation::ManageAutoReply => "manage auto-reply rules",
            Operation::SetJoinPolicy => "set the join policy",
            Operation::DecideJoin => "list and decide join requests",
            Operation::ManageTags => "read and edit buyers' tags",
            Operation::PushPromotion => "push a promotion",
            Operation::ManageSchedules => "schedule pushes",
            Operation::ReadTagPool => "read the industry tag pool",
            Operation::CsSession => "open or close a service session",
            Operation::CsTransfer => "transfer a service session",
            Operation::SetPresence => "set agent presence",
            Operation::CsBlock => "block a shop's proactive contact",
            Operation::ManageCs => "configure customer service",
        }
    }
}

/// Whether `role` may ask for `op` at all.
pub fn permits(role: Role, op: Operation) -> bool {
    use Operation as O;
    match role {
        // The platform itself: it posts commerce state changes and progress
        // from inside the server and has no token, so it asks for nothing.
        Role::System => false,
        Role::Buyer => matches!(
            op,
            O::JoinGroup
                | O::LeaveGroup
                | O::SendMessage
                | O::ReadHistory
                | O::MarkRead
                | O::JoinGroupBuy
                | O::ClaimCoupon
                | O::Vote
                | O::ViewCommerce
                | O::MutePromotions
                | O::ReportMessage
                | O::OpenCard
                | O::RecallOwn
                | O::ReadBoard
                | O::ReadTagPool
                | O::CsSession
                | O::CsBlock
        ),
        // Agents and owners have the same rights in their shop's groups;
        // the buyers' own actions (joining a group-buy, claiming, voting)
        // are not theirs.
        Role::Agent | Role::Owner => {
            !matches!(op, O::JoinGroupBuy | O::ClaimCoupon | O::Vote | O::CsBlock)
        }
    }
}

/// `ForbiddenRole` unless the caller's role permits `op`.
pub(crate) fn require(who: &Identity, op: Operation) -> Result<(), ChatError> {
    if permits(who.role(), op) {
        Ok(())
    } else {
        Err(ChatError::ForbiddenRole {
            role: who.role().as_str(),
            action: op.name(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/roles.md and [`permits`] say the same, cell by cell.
    #[test]
    fn the_documented_matrix_is_the_enforced_one() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/roles.md");
        let doc = std::fs::read_to_string(&path).unwrap();
        let roles = [Role::Buyer, Role::Agent, Role::Owner, Role::System];
        let mut rows = 0;
        for line in doc
            .lines()
            .filter(|l| l.starts_with("| ") && l.contains('✓') | l.contains('✗'))
        {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            let name = cells[0].trim_matches('`');
            let Some(op) = Operation::ALL.into_iter().find(|o| o.name() == name) else {
                panic!("docs/roles.md names an unknown operation {name:?}");
            };
            for (role, cell) in roles.iter().zip(&cells[1..]) {
                let documented = cell.starts_with('✓');
                assert_eq!(
                    documented,
                    permits(*role, op),
                    "docs/roles.md says {} for {:?} × {name:?}",
                    cell,
                    role
                );
            }
            rows += 1;
        }
        assert_eq!(rows, Operation::ALL.len(), "every operation has a row");
    }
}
