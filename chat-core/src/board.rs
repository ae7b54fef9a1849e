//! The group's board: FAQ entries and pins — answering once for everyone.
//!
//! An agent answers a question in the group (a reply quoting it); staff
//! can then make the pair an FAQ entry, and pin entries and messages (an
//! announcement, the size chart) so that every member sees them first.
//! Every change posts a BOARD message on the group's stream, so connected
//! clients refresh, and resume and history carry it like any message.

use qun_proto::v1;
use qun_storage::WriteOp;
use qun_storage::records::{FaqRecord, MessageRecord, PinRecord};

use crate::group::{GroupCell, GroupState, KIND_BOARD, KIND_TEXT};
use crate::groups::{Groups, durable};
use crate::permissions::{Operation, require};
use crate::{ChatError, Identity};

fn invalid(m: impl Into<String>) -> ChatError {
    ChatError::InvalidArgument(m.into())
}

fn pin_of(p: &PinRecord) -> v1::Pin {
    v1::Pin {
        target: Some(if p.faq_id != 0 {
            v1::pin::Target::FaqId(p.faq_id)
        } else {
            v1::pin::Target::MessageSeq(p.message_seq)
        }),
    }
}

fn entry_of(f: &FaqRecord) -> v1::FaqEntry {
    v1::FaqEntry {
        faq_id: f.faq_id,
        question: f.question.clone(),
        answer: f.answer.clone(),
        question_seq: f.question_seq,
        answer_seq: f.answer_seq,
        asked_by: f.asked_by.clone(),
        answered_by: f.answered_by.clone(),
        created_at_ms: f.created_at_ms,
    }
}

fn board(g: &GroupState) -> v1::FaqBoard {
    v1::FaqBoard {
        group_id: g.id(),
        entries: g.faq.values().map(entry_of).collect(),
        pins: g.record.pins.iter().map(pin_of).collect(),
    }
}

impl Groups {
    /// The group's FAQ entries and pins. Members, and staff of the shop.
    ///
    /// # Errors
    /// `ForbiddenRole`, `UnknownGroup`, `NotMember`, `WrongShop`.
    pub async fn list_faq(&self, who: &Identity, group_id: u64) -> Result<v1::FaqBoard, ChatError> {
        require(who, Operation::ReadBoard)?;
        let cell = self.cell(group_id).await?;
        let g = cell.lock();
        g.check_member_or_staff(who)?;
        Ok(board(&g))
    }

    /// Makes the message at `question_seq` and the one at `answer_seq`
    /// (visible text messages, not recalled, the answer after the question)
    /// an FAQ entry. Staff of the shop.
    ///
    /// # Errors
    /// `ForbiddenRole`, `WrongShop`, `InvalidArgument` (no such message, not
    /// text, recalled, out of order), `UnknownGroup`, `Storage`.
    pub async fn promote_faq(
        &self,
        who: &Identity,
        req: v1::PromoteFaq,
        now_ms: u64,
    ) -> Result<v1::FaqBoard, ChatError> {
        require(who, Operation::EditFaq)?;
        let group_id = req.group_id;
        if req.question_seq == 0 || req.answer_seq <= req.question_seq {
            return Err(invalid("answer_seq must come after question_seq"));
        }
        let cell = self.cell(group_id).await?;
        {
            let g = cell.lock();
            g.check_shop(who)?;
            if req.answer_seq > g.visible_seq() {
                return Err(invalid(format!(
                    "group {group_id} has no message {} yet",
                    req.answer_seq
                )));
            }
        }
        let question = self.text_message(group_id, req.question_seq).await?;
        let answer = self.text_message(group_id, req.answer_seq).await?;
        let entry = {
            let g = cell.lock();
            FaqRecord {
                group_id,
                faq_id: g.faq.keys().next_back().map_or(1, |k| k + 1),
                question: question.text,
                answer: answer.text,
                question_seq: question.seq,
                answer_seq: answer.seq,
                asked_by: question.sender_id,
                answered_by: answer.sender_id,
                created_at_ms: now_ms,
            }
        };
        let summary = format!("{} added an FAQ entry", who.display_name());
        self.change_board(&cell, who, summary, now_ms, |g| {
            if g.faq.contains_key(&entry.faq_id) {
                // Another promotion took the id meanwhile: ask again.
                return Err(ChatError::Storage(qun_storage::StorageError::Overloaded));
            }
            g.faq.insert(entry.faq_id, entry.clone());
            Ok(vec![WriteOp::PutFaq(entry.clone())])
        })
        .await
    }

    /// Removes an FAQ entry and its pin. Staff of the shop.
    ///
    /// # Errors
    /// `ForbiddenRole`, `WrongShop`, `InvalidArgument` (no such entry),
    /// `UnknownGroup`, `Storage`.
    pub async fn remove_faq(
        &self,
        who: &Identity,
        group_id: u64,
        faq_id: u64,
        now_ms: u64,
    ) -> Result<v1::FaqBoard, ChatError> {
        require(who, Operation::EditFaq)?;
        let cell = self.cell(group_id).await?;
        let summary = format!("{} removed an FAQ entry", who.display_name());
        self.change_board(&cell, who, summary, now_ms, |g| {
            if g.faq.remove(&faq_id).is_none() {
                return Err(invalid(format!(
                    "group {group_id} has no FAQ entry {faq_id}"
                )));
            }
            g.record.pins.retain(|p| p.faq_id != faq_id);
            Ok(vec![
                WriteOp::RemoveFaq { group_id, faq_id },
                WriteOp::PutGroup(g.record.clone()),
            ])
        })
        .await
    }

    /// Pins or unpins a message or an FAQ entry; at most `max_pins` pins
    /// at once. Pinning what is pinned, or unpinning what is not, changes
    /// nothing and posts nothing. Staff of the shop.
    ///
    /// # Errors
    /// `ForbiddenRole`, `WrongShop`, `InvalidArgument` (no target, no such
    /// message or entry, too many pins), `UnknownGroup`, `Storage`.
    pub async fn set_pin(
        &self,
        who: &Identity,
        req: v1::SetPin,
        now_ms: u64,
    ) -> Result<v1::FaqBoard, ChatError> {
        require(who, Operation::Pin)?;
        let group_id = req.group_id;
        let pin = match req.pin.and_then(|p| p.target) {
            Some(v1::pin::Target::MessageSeq(seq)) if seq > 0 => PinRecord {
                message_seq: seq,
                faq_id: 0,
            },
            Some(v1::pin::Target::FaqId(id)) if id > 0 => PinRecord {
                message_seq: 0,
                faq_id: id,
            },
            _ => return Err(invalid("pin needs a message_seq or an faq_id")),
        };
        let cell = self.cell(group_id).await?;
        {
            let g = cell.lock();
            g.check_shop(who)?;
            if g.record.pins.contains(&pin) == req.pinned {
                return Ok(board(&g));
            }
        }
        if req.pinned && pin.message_seq > 0 {
            let m = self.message_at(&cell, group_id, pin.message_seq).await?;
            if m.recalled {
                return Err(invalid(format!("message {} was recalled", m.seq)));
            }
        }
        let max = self.inner().config.max_pins;
        let what = if pin.faq_id > 0 {
            "an FAQ entry"
        } else {
            "a message"
        };
        let summary = format!(
            "{} {} {what}",
            who.display_name(),
            if req.pinned { "pinned" } else { "unpinned" }
        );
        self.change_board(&cell, who, summary, now_ms, |g| {
            if req.pinned {
                if pin.faq_id > 0 && !g.faq.contains_key(&pin.faq_id) {
                    return Err(invalid(format!(
                        "group {group_id} has no FAQ entry {}",
                        pin.faq_id
                    )));
                }
                if g.record.pins.len() >= max {
                    return Err(invalid(format!("at most {max} pins; unpin one first")));
                }
                g.record.pins.push(pin);
            } else {
                g.record.pins.retain(|p| *p != pin);
            }
            Ok(vec![WriteOp::PutGroup(g.record.clone())])
        })
        .await
    }

    /// Under the group's lock: applies `change` (which returns its writes)
    /// and posts a BOARD message with them in one batch; undoes the change
    /// in memory when the batch cannot be queued.
    async fn change_board(
        &self,
        cell: &std::sync::Arc<GroupCell>,
        who: &Identity,
        summary: String,
        now_ms: u64,
        change: impl FnOnce(&mut GroupState) -> Result<Vec<WriteOp>, ChatError>,
    ) -> Result<v1::FaqBoard, ChatError> {
        let (answer, rx) = {
            let mut g = cell.lock();
            g.check_shop(who)?;
            g.refuse_if_failed()?;
            let before = (g.faq.clone(), g.record.clone());
            let ops = change(&mut g)?;
            let mut record = g.next_event(
                who.user_id(),
                who.display_name(),
                who.role(),
                summary,
                Vec::new(),
                now_ms,
            );
            record.kind = KIND_BOARD;
            match self.submit_sequenced(cell, &mut g, record, ops) {
                Ok(rx) => (board(&g), rx),
                Err(e) => {
                    (g.faq, g.record) = before;
                    return Err(e.into());
                }
            }
        };
        durable(rx).await?;
        Ok(answer)
    }

    /// A visible message of the group, from the store (visible is durable).
    async fn message_at(
        &self,
        cell: &std::sync::Arc<GroupCell>,
        group_id: u64,
        seq: u64,
    ) -> Result<MessageRecord, ChatError> {
        if seq == 0 || seq > cell.lock().visible_seq() {
            return Err(invalid(format!(
                "group {group_id} has no message {seq} yet"
            )));
        }
        match self
            .inner()
            .store
            .messages_after(group_id, seq - 1, 1)
            .await?
            .pop()
        {
            Some(m) if m.seq == seq => Ok(m),
            _ => Err(invalid(format!("group {group_id} has no message {seq}"))),
        }
    }

    /// A visible text message that was not recalled.
    async fn text_message(&self, group_id: u64, seq: u64) -> Result<MessageRecord, ChatError> {
        let cell = self.cell(group_id).await?;
        let m = self.message_at(&cell, group_id, seq).await?;
        if m.kind != KIND_TEXT || m.recalled {
            return Err(invalid(format!(
                "message {seq} is not a text message one can quote"
            )));
        }
        Ok(m)
    }
}
