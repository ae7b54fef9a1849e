//! The kinds of client request, named once: the `kind` of a request's
//! tracing span and the `request` label of `qun_request_duration_seconds`.

use qun_proto::v1::client_frame;

/// Defines [`RequestKind`] from one list: each variant of
/// `client_frame::Body` and its name.
macro_rules! request_kinds {
    ($($variant:ident => $name:literal,)*) => {
        /// What a client frame asks for, one per variant of its body.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum RequestKind {
            $(
                #[doc = concat!("`", $name, "`")]
                $variant,
            )*
        }

        impl RequestKind {
            /// Every kind, in the order of [`RequestKind::index`].
            pub const ALL: &'static [RequestKind] = &[$(RequestKind::$variant,)*];

            /// The kind of request `body` is.
            pub fn of(body: &client_frame::Body) -> Self {
                match body {
                    $(client_frame::Body::$variant(_) => RequestKind::$variant,)*
                }
            }

            /// Its name, in snake case (`send_message`).
            pub fn name(self) -> &'static str {
                match self {
                    $(RequestKind::$variant => $name,)*
                }
            }
        }
    };
}

request_kinds! {
    Hello => "hello",
    CreateGroup => "create_group",
    JoinGroup => "join_group",
    LeaveGroup => "leave_group",
    SendMessage => "send_message",
    FetchHistory => "fetch_history",
    Ping => "ping",
    Resume => "resume",
    FetchRange => "fetch_range",
    MarkRead => "mark_read",
    ListMyGroups => "list_my_groups",
    PostCard => "post_card",
    StartGroupBuy => "start_group_buy",
    JoinGroupBuy => "join_group_buy",
    LeaveGroupBuy => "leave_group_buy",
    IssueCoupon => "issue_coupon",
    ClaimCoupon => "claim_coupon",
    OpenPoll => "open_poll",
    Vote => "vote",
    GetCommerce => "get_commerce",
    EndCommerce => "end_commerce",
    MutePromotions => "mute_promotions",
    ReportMessage => "report_message",
    OpenCard => "open_card",
    GetReachQuota => "get_reach_quota",
    MuteMember => "mute_member",
    MuteAllBuyers => "mute_all_buyers",
    RemoveMember => "remove_member",
    RecallMessage => "recall_message",
    PromoteFaq => "promote_faq",
    RemoveFaq => "remove_faq",
    SetPin => "set_pin",
    ListFaq => "list_faq",
    PutAutoReply => "put_auto_reply",
    RemoveAutoReply => "remove_auto_reply",
    ListAutoReplies => "list_auto_replies",
    SetJoinPolicy => "set_join_policy",
    ListJoinRequests => "list_join_requests",
    DecideJoin => "decide_join",
    TagBuyer => "tag_buyer",
    GetBuyerTags => "get_buyer_tags",
    PushPromotion => "push_promotion",
    SchedulePush => "schedule_push",
    CancelSchedule => "cancel_schedule",
    ListSchedules => "list_schedules",
    GetTagPool => "get_tag_pool",
    CsOpen => "cs_open",
    CsTransfer => "cs_transfer",
    CsClose => "cs_close",
    CsQueue => "cs_queue",
    SetPresence => "set_presence",
    CsBlock => "cs_block",
}

impl RequestKind {
    /// How many kinds there are.
    pub const COUNT: usize = Self::ALL.len();

    /// Its place in [`RequestKind::ALL`], for tables indexed by kind.
    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_place_and_name() {
        let names: std::collections::HashSet<_> =
            RequestKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), RequestKind::COUNT, "names are unique");
        for (i, k) in RequestKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i, "{k:?}");
        }
        let send = client_frame::Body::SendMessage(Default::default());
        assert_eq!(RequestKind::of(&send).name(), "send_message");
    }
}
