//! Read marks, unread counts, and the list of a user's groups.
//!
//! Each member has a read mark: the seq they have read up to. Unread is the
//! number of visible messages above it. Marks only move forwards; they are
//! stored (so a restart keeps them) and every other device of the user is
//! told at once with a `ReadState` push.

use qun_proto::v1::{self, server_frame::Body};
use qun_storage::WriteOp;

use crate::group::ConnId;
use crate::groups::{Groups, durable, durable_channel};
use crate::outbox::Outbox;
use crate::{ChatError, Identity};

impl Groups {
    /// Registers one connection of a user, for user-wide pushes (read state).
    pub fn attach_device(&self, who: &Identity, conn: ConnId, outbox: Outbox) {
        self.inner().devices.attach(who.user_id(), conn, outbox);
    }

    /// Forgets a connection registered with [`Groups::attach_device`].
    pub fn detach_device(&self, who: &Identity, conn: ConnId) {
        self.inner().devices.detach(who.user_id(), conn);
    }

    /// Connections a user has registered now.
    pub fn device_count(&self, user_id: &str) -> usize {
        self.inner().devices.count(user_id)
    }

    /// Moves the caller's read mark in `group_id` forwards to `seq` (capped
    /// at the newest message; a lower seq changes nothing) and tells the
    /// caller's other connections (all but `conn`).
    ///
    /// # Errors
    /// `UnknownGroup`, `NotMember`, `Storage`.
    pub async fn mark_read(
        &self,
        who: &Identity,
        conn: ConnId,
        group_id: u64,
        seq: u64,
    ) -> Result<v1::ReadMarked, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::MarkRead)?;
        let cell = self.cell(group_id).await?;
        let rx = {
            let mut g = cell.lock();
            g.member(who)?;
            let visible = g.visible_seq();
            let moved = g.advance_read_mark(who.user_id(), seq.min(visible));
            match moved {
                None => None,
                Some(mark) => {
                    let (done, rx) = durable_channel();
                    let op = WriteOp::PutReadMark {
                        group_id,
                        user_id: who.user_id().to_string(),
                        seq: mark,
                    };
                    self.inner().store.submit(vec![op], done)?;
                    Some(rx)
                }
            }
        };
        let moved = rx.is_some();
        if let Some(rx) = rx {
            durable(rx).await?;
        }
        let (last_read_seq, unread) = {
            let g = cell.lock();
            (g.read_mark(who.user_id()), g.unread(who.user_id()))
        };
        if moved {
            let frame = qun_proto::encode_server_frame(&v1::ServerFrame {
                request_id: 0,
                body: Some(Body::ReadState(v1::ReadState {
                    group_id,
                    last_read_seq,
                    unread,
                })),
            });
            self.inner()
                .devices
                .push_to_others(who.user_id(), conn, &frame);
        }
        Ok(v1::ReadMarked {
            group_id,
            last_read_seq,
            unread,
        })
    }

    /// The groups the caller is a member of, ascending id, with their read
    /// marks and unread counts. Groups are loaded into memory as needed.
    ///
    /// # Errors
    /// `Storage`.
    pub async fn my_groups(&self, who: &Identity) -> Result<v1::MyGroups, ChatError> {
        let ids = self.inner().store.groups_of_user(who.user_id()).await?;
        let mut groups = Vec::with_capacity(ids.len());
        for group_id in ids {
            let cell = match self.cell(group_id).await {
                Ok(cell) => cell,
                Err(ChatError::UnknownGroup(_)) => continue,
                Err(e) => return Err(e),
            };
            let g = cell.lock();
            let Ok(member) = g.member(who) else { continue };
            groups.push(v1::MyGroup {
                group: Some(g.info()),
                role: member.role.to_proto() as i32,
                last_read_seq: g.read_mark(who.user_id()),
                unread: g.unread(who.user_id()),
            });
        }
        Ok(v1::MyGroups { groups })
    }
}
