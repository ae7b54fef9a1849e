//! Screening: who may join. A group is open, or admits buyers on approval:
//! a buyer's join is then recorded as a request, and staff approve (the
//! buyer becomes a member) or reject it. The buyer's devices are told the
//! decision with a `JoinDecided` push.

use std::sync::Arc;

use qun_proto::v1::{self, server_frame::Body};
use qun_storage::WriteOp;
use qun_storage::records::JoinRequestRecord;
use tokio::sync::oneshot;

use crate::group::{GroupCell, GroupState};
use crate::groups::{Groups, durable, durable_channel};
use crate::permissions::{Operation, require};
use crate::{ChatError, Identity, Role};

type Durable = oneshot::Receiver<Result<(), qun_storage::StorageError>>;

fn requests(g: &GroupState) -> v1::JoinRequests {
    let mut list: Vec<&JoinRequestRecord> = g.join_requests.values().collect();
    list.sort_by_key(|r| (r.requested_at_ms, r.user_id.clone()));
    v1::JoinRequests {
        group_id: g.id(),
        policy: i32::try_from(g.record.join_policy).unwrap_or(0),
        expression: g.record.join_expression.clone(),
        requests: list
            .into_iter()
            .map(|r| v1::JoinRequest {
                user_id: r.user_id.clone(),
                display_name: r.display_name.clone(),
                requested_at_ms: r.requested_at_ms,
            })
            .collect(),
    }
}

impl Groups {
    /// For a buyer joining a group that admits on approval: records the
    /// request (once) and returns its durability; the join then answers
    /// `JoinPending`. `None` when, under the lock, there is nothing to ask
    /// (approved meanwhile, or the policy changed).
    pub(crate) fn request_to_join(
        &self,
        cell: &Arc<GroupCell>,
        who: &Identity,
        now_ms: u64,
    ) -> Result<Option<Durable>, ChatError> {
        let mut g = cell.lock();
        if g.screening_for(who) != v1::JoinPolicy::Approval {
            return Ok(None);
        }
        g.check_not_banned(who.user_id(), now_ms)?;
        if g.join_requests.contains_key(who.user_id()) {
            // Asked before: nothing new to write.
            let (done, rx) = durable_channel();
            done(Ok(()));
            return Ok(Some(rx));
        }
        let record = JoinRequestRecord {
            group_id: g.id(),
            user_id: who.user_id().to_string(),
            display_name: who.display_name().to_string(),
            requested_at_ms: now_ms,
        };
        let (done, rx) = durable_channel();
        self.inner()
            .store
            .submit(vec![WriteOp::PutJoinRequest(record.clone())], done)?;
        g.join_requests.insert(record.user_id.clone(), record);
        Ok(Some(rx))
    }

    /// Sets how buyers join: open, on approval, or by tags (`expression`,
    /// a tag expression, for a threshold policy). Opening a group leaves
    /// pending requests to be decided. Staff of the shop.
    ///
    /// # Errors
    /// `ForbiddenRole`, `WrongShop`, `InvalidArgument` (a threshold without
    /// a valid expression), `UnknownGroup`, `Storage`.
    pub async fn set_join_policy(
        &self,
        who: &Identity,
        group_id: u64,
        policy: v1::JoinPolicy,
        expression: &str,
    ) -> Result<v1::JoinRequests, ChatError> {
        require(who, Operation::SetJoinPolicy)?;
        let expression = if policy == v1::JoinPolicy::Threshold {
            crate::segments::TagExpr::parse(expression)?;
            expression.trim().to_string()
        } else {
            String::new()
        };
        let cell = self.cell(group_id).await?;
        let (answer, rx) = {
            let mut g = cell.lock();
            g.check_shop(who)?;
            let mut record = g.record.clone();
            record.join_policy = policy as u32;
            record.join_expression = expression;
            let (done, rx) = durable_channel();
            self.inner()
                .store
                .submit(vec![WriteOp::PutGroup(record.clone())], done)?;
            g.record = record;
            (requests(&g), rx)
        };
        durable(rx).await?;
        Ok(answer)
    }

    /// The group's pending requests, oldest first. Staff of the shop.
    ///
    /// # Errors
    /// `ForbiddenRole`, `WrongShop`, `UnknownGroup`.
    pub async fn list_join_requests(
        &self,
        who: &Identity,
        group_id: u64,
    ) -> Result<v1::JoinRequests, ChatError> {
        require(who, Operation::DecideJoin)?;
        let cell = self.cell(group_id).await?;
        let g = cell.lock();
        g.check_shop(who)?;
        Ok(requests(&g))
    }

    /// Approves (the buyer becomes a member, their read mark at the newest
    /// message) or rejects a pending request, and tells the buyer's devices.
    /// Staff of the shop.
    ///
    /// # Errors
    /// `ForbiddenRole`, `WrongShop`, `InvalidArgument` (no such request),
    /// `GroupFull`, `Banned` (banned meanwhile), `UnknownGroup`, `Storage`.
    pub async fn decide_join(
        &self,
        who: &Identity,
        req: v1::DecideJoin,
        now_ms: u64,
    ) -> Result<v1::JoinRequests, ChatError> {
        require(who, Operation::DecideJoin)?;
        let group_id = req.group_id;
        let cell = self.cell(group_id).await?;
        let (answer, rx) = {
            let mut g = cell.lock();
            g.check_shop(who)?;
            let Some(request) = g.join_requests.get(&req.user_id).cloned() else {
                return Err(ChatError::InvalidArgument(format!(
                    "no request from {:?} to join group {group_id}",
                    req.user_id
                )));
            };
            let mut ops = vec![WriteOp::RemoveJoinRequest {
                group_id,
                user_id: request.user_id.clone(),
            }];
            let mut admitted = false;
            if req.approve {
                let buyer = Identity::new(
                    request.user_id.clone(),
                    request.display_name.clone(),
                    Role::Buyer,
                    None,
                )
                .map_err(|e| ChatError::InvalidArgument(e.to_string()))?;
                if let Some(member) = g.admit(&buyer, now_ms)? {
                    ops.push(WriteOp::PutMember(member));
                    ops.push(WriteOp::PutReadMark {
                        group_id,
                        user_id: request.user_id.clone(),
                        seq: g.visible_seq(),
                    });
                    admitted = true;
                }
            }
            let (done, rx) = durable_channel();
            if let Err(e) = self.inner().store.submit(ops, done) {
                if admitted {
                    g.unadmit(&request.user_id);
                }
                return Err(e.into());
            }
            if admitted {
                let read_to = g.visible_seq();
                g.advance_read_mark(&request.user_id, read_to);
            }
            g.join_requests.remove(&request.user_id);
            (requests(&g), rx)
        };
        durable(rx).await?;
        let decided = qun_proto::encode_server_frame(&v1::ServerFrame {
            request_id: 0,
            body: Some(Body::JoinDecided(v1::JoinDecided {
                group_id,
                approved: req.approve,
            })),
        });
        self.inner().devices.push_to_all(&req.user_id, &decided);
        Ok(answer)
    }
}
