//! From [`WriteOp`]s to CQL statements and their bound values: pure, no I/O,
//! so every rule here is unit-tested without a cluster.
//!
//! Each [`Write`] is one prepared statement. A submission becomes a list of
//! [`Statement`]s; the writer sends one statement alone, several statements
//! of one partition as an unlogged batch, and statements of several
//! partitions as a logged batch (atomic: all of them land, or none).

use scylla::value::CqlValue;

#[cfg(test)]
use crate::keys::BUCKET_SIZE;
use crate::keys::bucket_of;
use crate::{StorageError, WriteOp};

/// The one partition of the single-partition index tables (`group_ids`, `due`).
pub(crate) const SINGLE_SHARD: i32 = 0;

/// One prepared write statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Write {
    PutGroup,
    PutGroupId,
    PutMember,
    PutUserGroup,
    DeleteMember,
    DeleteUserGroup,
    DeleteReadMark,
    AppendMessage,
    PutMessageBucket,
    PutSent,
    PutReply,
    PutReadMark,
    PutObject,
    PutDue,
    DeleteDue,
    PutEntry,
    DeleteEntry,
    PutProduct,
    PutCard,
    PutReachUse,
    PutFeedback,
    PutPromotionMute,
    DeletePromotionMute,
    PutReport,
    PutMemberFlags,
    DeleteMemberFlags,
    PutFaq,
    DeleteFaq,
    PutAutoReply,
    DeleteAutoReply,
    PutJoinRequest,
    DeleteJoinRequest,
    PutBuyerTags,
    DeleteBuyerTags,
    PutSchedule,
    DeleteSchedule,
    PutCsShop,
    PutCsBuyer,
}

impl Write {
    /// Every write statement, in the order they are prepared.
    pub(crate) const ALL: [Write; 38] = [
        Write::PutGroup,
        Write::PutGroupId,
        Write::PutMember,
        Write::PutUserGroup,
        Write::DeleteMember,
        Write::DeleteUserGroup,
        Write::DeleteReadMark,
        Write::AppendMessage,
        Write::PutMessageBucket,
        Write::PutSent,
        Write::PutReply,
        Write::PutReadMark,
        Write::PutObject,
        Write::PutDue,
        Write::DeleteDue,
        Write::PutEntry,
        Write::DeleteEntry,
        Write::PutProduct,
        Write::PutCard,
        Write::PutReachUse,
        Write::PutFeedback,
        Write::PutPromotionMute,
        Write::DeletePromotionMute,
        Write::PutReport,
        Write::PutMemberFlags,
        Write::DeleteMemberFlags,
        Write::PutFaq,
        Write::DeleteFaq,
        Write::PutAutoReply,
        Write::DeleteAutoReply,
        Write::PutJoinRequest,
        Write::DeleteJoinRequest,
        Write::PutBuyerTags,
        Write::DeleteBuyerTags,
        Write::PutSchedule,
        Write::DeleteSchedule,
        Write::PutCsShop,
        Write::PutCsBuyer,
    ];

    /// Its position in [`Write::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The table it writes.
    pub(crate) fn table(self) -> &'static str {
        match self {
            Write::PutGroup => "groups",
            Write::PutGroupId => "group_ids",
            Write::PutMember | Write::DeleteMember => "members",
            Write::PutUserGroup | Write::DeleteUserGroup => "user_groups",
            Write::DeleteReadMark | Write::PutReadMark => "read_marks",
            Write::AppendMessage => "messages",
            Write::PutMessageBucket => "message_buckets",
            Write::PutSent => "sent",
            Write::PutReply => "replies",
            Write::PutObject => "objects",
            Write::PutDue | Write::DeleteDue => "due",
            Write::PutEntry | Write::DeleteEntry => "entries",
            Write::PutProduct => "products",
            Write::PutCard => "cards",
            Write::PutReachUse => "reach_use",
            Write::PutFeedback => "shop_feedback",
            Write::PutPromotionMute | Write::DeletePromotionMute => "promotion_mutes",
            Write::PutReport => "reports",
            Write::PutMemberFlags | Write::DeleteMemberFlags => "member_flags",
            Write::PutFaq | Write::DeleteFaq => "faq",
            Write::PutAutoReply | Write::DeleteAutoReply => "auto_replies",
            Write::PutJoinRequest | Write::DeleteJoinRequest => "join_requests",
            Write::PutBuyerTags | Write::DeleteBuyerTags => "buyer_tags",
            Write::PutSchedule | Write::DeleteSchedule => "schedules",
            Write::PutCsShop => "cs_shops",
            Write::PutCsBuyer => "cs_buyers",
        }
    }

    /// The CQL, with the keyspace `ks` written in.
    pub(crate) fn cql(self, ks: &str) -> String {
        let t = self.table();
        match self {
            Write::PutGroup => format!("INSERT INTO {ks}.{t} (group_id, record) VALUES (?, ?)"),
            Write::PutGroupId => format!("INSERT INTO {ks}.{t} (shard, group_id) VALUES (?, ?)"),
            Write::PutMember => {
                format!("INSERT INTO {ks}.{t} (group_id, user_id, record) VALUES (?, ?, ?)")
            }
            Write::PutUserGroup => {
                format!("INSERT INTO {ks}.{t} (user_id, group_id) VALUES (?, ?)")
            }
            Write::PutReachUse => {
                format!("INSERT INTO {ks}.{t} (group_id, day, used) VALUES (?, ?, ?)")
            }
            Write::PutFeedback => format!(
                "INSERT INTO {ks}.{t} (shop_id, day, positive, negative) VALUES (?, ?, ?, ?)"
            ),
            Write::PutPromotionMute => {
                format!("INSERT INTO {ks}.{t} (group_id, user_id) VALUES (?, ?)")
            }
            Write::PutReport => format!(
                "INSERT INTO {ks}.{t} (group_id, seq, reporter_id, record) VALUES (?, ?, ?, ?)"
            ),
            Write::PutBuyerTags => {
                format!("INSERT INTO {ks}.{t} (shop_id, user_id, record) VALUES (?, ?, ?)")
            }
            Write::DeleteBuyerTags => {
                format!("DELETE FROM {ks}.{t} WHERE shop_id = ? AND user_id = ?")
            }
            Write::PutJoinRequest => {
                format!("INSERT INTO {ks}.{t} (group_id, user_id, record) VALUES (?, ?, ?)")
            }
            Write::PutAutoReply => {
                format!("INSERT INTO {ks}.{t} (shop_id, rule_id, record) VALUES (?, ?, ?)")
            }
            Write::DeleteAutoReply => {
                format!("DELETE FROM {ks}.{t} WHERE shop_id = ? AND rule_id = ?")
            }
            Write::PutFaq => {
                format!("INSERT INTO {ks}.{t} (group_id, faq_id, record) VALUES (?, ?, ?)")
            }
            Write::DeleteFaq => format!("DELETE FROM {ks}.{t} WHERE group_id = ? AND faq_id = ?"),
            Write::PutSchedule => {
                format!("INSERT INTO {ks}.{t} (group_id, schedule_id, record) VALUES (?, ?, ?)")
            }
            Write::PutCsShop => format!("INSERT INTO {ks}.{t} (shop_id, record) VALUES (?, ?)"),
            Write::PutCsBuyer => {
                format!("INSERT INTO {ks}.{t} (shop_id, buyer_id, record) VALUES (?, ?, ?)")
            }
            Write::DeleteSchedule => {
                format!("DELETE FROM {ks}.{t} WHERE group_id = ? AND schedule_id = ?")
            }
            Write::PutMemberFlags => {
                format!("INSERT INTO {ks}.{t} (group_id, user_id, record) VALUES (?, ?, ?)")
            }
            Write::DeleteMember
            | Write::DeleteReadMark
            | Write::DeletePromotionMute
            | Write::DeleteMemberFlags
            | Write::DeleteJoinRequest => {
                format!("DELETE FROM {ks}.{t} WHERE group_id = ? AND user_id = ?")
            }
            Write::DeleteUserGroup => {
                format!("DELETE FROM {ks}.{t} WHERE user_id = ? AND group_id = ?")
            }
            Write::AppendMessage => {
                format!("INSERT INTO {ks}.{t} (group_id, bucket, seq, record) VALUES (?, ?, ?, ?)")
            }
            Write::PutMessageBucket => {
                format!("INSERT INTO {ks}.{t} (group_id, bucket) VALUES (?, ?)")
            }
            Write::PutSent => format!(
                "INSERT INTO {ks}.{t} (group_id, sender_id, client_msg_id, seq, ts_ms) \
                 VALUES (?, ?, ?, ?, ?)"
            ),
            Write::PutReply => {
                format!("INSERT INTO {ks}.{t} (group_id, quoted_seq, reply_seq) VALUES (?, ?, ?)")
            }
            Write::PutReadMark => {
                format!("INSERT INTO {ks}.{t} (group_id, user_id, seq) VALUES (?, ?, ?)")
            }
            Write::PutObject => {
                format!("INSERT INTO {ks}.{t} (group_id, object_id, record) VALUES (?, ?, ?)")
            }
            Write::PutDue => format!(
                "INSERT INTO {ks}.{t} (shard, group_id, object_id, due_ms) VALUES (?, ?, ?, ?)"
            ),
            Write::DeleteDue => {
                format!("DELETE FROM {ks}.{t} WHERE shard = ? AND group_id = ? AND object_id = ?")
            }
            Write::PutEntry => format!(
                "INSERT INTO {ks}.{t} (group_id, object_id, user_id, record) VALUES (?, ?, ?, ?)"
            ),
            Write::DeleteEntry => {
                format!("DELETE FROM {ks}.{t} WHERE group_id = ? AND object_id = ? AND user_id = ?")
            }
            Write::PutProduct => {
                format!("INSERT INTO {ks}.{t} (shop_id, product_id, record) VALUES (?, ?, ?)")
            }
            Write::PutCard => {
                format!("INSERT INTO {ks}.{t} (shop_id, product_id, group_id) VALUES (?, ?, ?)")
            }
        }
    }

    /// How many leading bound values form the partition key.
    fn partition_values(self) -> usize {
        match self {
            Write::AppendMessage
            | Write::PutReply
            | Write::PutProduct
            | Write::PutCard
            | Write::PutBuyerTags
            | Write::DeleteBuyerTags
            | Write::PutCsBuyer => 2,
            Write::PutFeedback => 1,
            Write::PutSent => 3,
            _ => 1,
        }
    }
}

/// One write statement with its bound values.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Statement {
    pub(crate) write: Write,
    pub(crate) values: Vec<CqlValue>,
}

impl Statement {
    /// The table and partition key values: statements with equal partitions
    /// can share an unlogged batch.
    pub(crate) fn partition(&self) -> (&'static str, &[CqlValue]) {
        (
            self.write.table(),
            &self.values[..self.write.partition_values().min(self.values.len())],
        )
    }
}

/// How a submission's statements are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// Nothing to write.
    Empty,
    /// One statement.
    Single,
    /// Several statements of one partition: an unlogged batch is atomic.
    SamePartition,
    /// Several partitions: a logged batch, so that all land or none.
    Logged,
}

/// The shape of a submission's statements.
pub(crate) fn shape<'a>(statements: impl IntoIterator<Item = &'a Statement>) -> Shape {
    let mut it = statements.into_iter();
    let Some(first) = it.next() else {
        return Shape::Empty;
    };
    let p = first.partition();
    let mut shape = Shape::Single;
    for s in it {
        if s.partition() != p {
            return Shape::Logged;
        }
        shape = Shape::SamePartition;
    }
    shape
}

impl Statement {
    /// The `(group, bucket)` a `message_buckets` insert registers.
    pub(crate) fn registered_bucket(&self) -> Option<(u64, u64)> {
        match (self.write, &self.values[..]) {
            (Write::PutMessageBucket, [CqlValue::BigInt(g), CqlValue::BigInt(b)]) => {
                Some((u64::try_from(*g).ok()?, u64::try_from(*b).ok()?))
            }
            _ => None,
        }
    }

    /// Roughly how many bytes its values take in a request.
    pub(crate) fn approx_bytes(&self) -> usize {
        self.values
            .iter()
            .map(|v| match v {
                CqlValue::Blob(b) => b.len() + 4,
                CqlValue::Text(t) => t.len() + 4,
                _ => 12,
            })
            .sum()
    }
}

/// Splits one lane's submissions (in order) into runs written as one batch
/// each: consecutive submissions while the batch stays within `max_bytes`
/// and `max_statements`. A submission is never split (it must stay
/// atomic), so one larger than the limits is a run alone.
pub(crate) fn runs(
    submissions: &[&[Statement]],
    max_bytes: usize,
    max_statements: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let (mut bytes, mut count) = (0, 0);
    for (i, statements) in submissions.iter().enumerate() {
        let b: usize = statements.iter().map(Statement::approx_bytes).sum();
        let n = statements.len();
        if i > start && (bytes + b > max_bytes || count + n > max_statements) {
            out.push(start..i);
            start = i;
            (bytes, count) = (0, 0);
        }
        bytes += b;
        count += n;
    }
    if start < submissions.len() {
        out.push(start..submissions.len());
    }
    out
}

/// Which submissions must be written one after another. Submissions of
/// different lanes are independent and are written concurrently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Lane {
    /// Everything of one group.
    Group(u64),
    /// Shop-level writes (products), and submissions with nothing to write.
    Shop,
    /// Touches several groups, or a group and a product: written alone,
    /// after everything before it and before everything after it.
    Barrier,
}

/// The lane of a submission.
pub(crate) fn lane(ops: &[WriteOp]) -> Lane {
    let mut group = None;
    let mut shop = false;
    for op in ops {
        let g = match op {
            WriteOp::PutGroup(r) => r.group_id,
            WriteOp::PutMember(r) => r.group_id,
            WriteOp::RemoveMember { group_id, .. }
            | WriteOp::PutReadMark { group_id, .. }
            | WriteOp::RemoveEntry { group_id, .. }
            | WriteOp::PutCard { group_id, .. } => *group_id,
            WriteOp::AppendMessage(m) => m.group_id,
            WriteOp::PutObject(o) => o.group_id,
            WriteOp::PutEntry(e) => e.group_id,
            WriteOp::PutReachUse { group_id, .. } | WriteOp::PutPromotionMute { group_id, .. } => {
                *group_id
            }
            WriteOp::PutReport(r) => r.group_id,
            WriteOp::RewriteMessage(m) => m.group_id,
            WriteOp::PutMemberFlags { group_id, .. } | WriteOp::RemoveFaq { group_id, .. } => {
                *group_id
            }
            WriteOp::PutFaq(f) => f.group_id,
            WriteOp::PutSchedule(r) => r.group_id,
            WriteOp::RemoveSchedule { group_id, .. } => *group_id,
            WriteOp::PutJoinRequest(r) => r.group_id,
            WriteOp::RemoveJoinRequest { group_id, .. } => *group_id,
            WriteOp::PutProduct(_)
            | WriteOp::PutFeedback { .. }
            | WriteOp::PutAutoReply(_)
            | WriteOp::RemoveAutoReply { .. }
            | WriteOp::PutBuyerTags(_)
            | WriteOp::PutCsShop(_)
            | WriteOp::PutCsBuyer(_) => {
                shop = true;
                continue;
            }
        };
        match group {
            None => group = Some(g),
            Some(seen) if seen != g => return Lane::Barrier,
            Some(_) => {}
        }
    }
    match (group, shop) {
        (Some(g), false) => Lane::Group(g),
        (None, _) => Lane::Shop,
        (Some(_), true) => Lane::Barrier,
    }
}

/// A u64 id or seq as a CQL bigint.
///
/// # Errors
/// [`StorageError::OutOfRange`] above 2^63-1.
pub(crate) fn id64(what: &'static str, value: u64) -> Result<i64, StorageError> {
    i64::try_from(value).map_err(|_| StorageError::OutOfRange { what, value })
}

/// [`id64`] as a bound value.
pub(crate) fn bigint(what: &'static str, value: u64) -> Result<CqlValue, StorageError> {
    id64(what, value).map(CqlValue::BigInt)
}

fn text(s: &str) -> CqlValue {
    CqlValue::Text(s.to_string())
}

fn blob(m: &impl prost::Message) -> CqlValue {
    CqlValue::Blob(m.encode_to_vec())
}

/// The statements of one operation. `new_bucket` says whether an appended
/// message's bucket must be registered in `message_buckets` (the store
/// remembers which buckets it has already registered).
///
/// # Errors
/// [`StorageError::OutOfRange`] for an id or seq above 2^63-1.
pub(crate) fn statements(
    op: &WriteOp,
    new_bucket: impl FnOnce(u64, u64) -> bool,
    out: &mut Vec<Statement>,
) -> Result<(), StorageError> {
    let mut push = |write, values| out.push(Statement { write, values });
    match op {
        WriteOp::PutGroup(g) => {
            let id = bigint("group id", g.group_id)?;
            push(Write::PutGroup, vec![id.clone(), blob(g)]);
            push(Write::PutGroupId, vec![CqlValue::Int(SINGLE_SHARD), id]);
        }
        WriteOp::PutMember(m) => {
            let id = bigint("group id", m.group_id)?;
            push(
                Write::PutMember,
                vec![id.clone(), text(&m.user_id), blob(m)],
            );
            push(Write::PutUserGroup, vec![text(&m.user_id), id]);
        }
        WriteOp::RemoveMember { group_id, user_id } => {
            let id = bigint("group id", *group_id)?;
            push(Write::DeleteMember, vec![id.clone(), text(user_id)]);
            push(Write::DeleteUserGroup, vec![text(user_id), id.clone()]);
            push(Write::DeleteReadMark, vec![id.clone(), text(user_id)]);
            push(Write::DeletePromotionMute, vec![id, text(user_id)]);
        }
        WriteOp::AppendMessage(m) => {
            let id = bigint("group id", m.group_id)?;
            let seq = bigint("seq", m.seq)?;
            let bucket = bucket_of(m.seq);
            let b = bigint("bucket", bucket)?;
            push(
                Write::AppendMessage,
                vec![id.clone(), b.clone(), seq.clone(), blob(m)],
            );
            if new_bucket(m.group_id, bucket) {
                push(Write::PutMessageBucket, vec![id.clone(), b]);
            }
            if !m.client_msg_id.is_empty() {
                push(
                    Write::PutSent,
                    vec![
                        id.clone(),
                        text(&m.sender_id),
                        text(&m.client_msg_id),
                        seq.clone(),
                        bigint("ts_ms", m.ts_ms)?,
                    ],
                );
            }
            if m.reply_to != 0 {
                push(
                    Write::PutReply,
                    vec![id, bigint("quoted seq", m.reply_to)?, seq],
                );
            }
        }
        WriteOp::PutReadMark {
            group_id,
            user_id,
            seq,
        } => push(
            Write::PutReadMark,
            vec![
                bigint("group id", *group_id)?,
                text(user_id),
                bigint("seq", *seq)?,
            ],
        ),
        WriteOp::PutObject(o) => {
            let id = bigint("group id", o.group_id)?;
            let object = bigint("object id", o.object_id)?;
            push(Write::PutObject, vec![id.clone(), object.clone(), blob(o)]);
            let shard = CqlValue::Int(SINGLE_SHARD);
            if o.due_ms > 0 {
                push(
                    Write::PutDue,
                    vec![shard, id, object, bigint("due_ms", o.due_ms)?],
                );
            } else {
                push(Write::DeleteDue, vec![shard, id, object]);
            }
        }
        WriteOp::PutEntry(e) => push(
            Write::PutEntry,
            vec![
                bigint("group id", e.group_id)?,
                bigint("object id", e.object_id)?,
                text(&e.user_id),
                blob(e),
            ],
        ),
        WriteOp::RemoveEntry {
            group_id,
            object_id,
            user_id,
        } => push(
            Write::DeleteEntry,
            vec![
                bigint("group id", *group_id)?,
                bigint("object id", *object_id)?,
                text(user_id),
            ],
        ),
        WriteOp::PutProduct(p) => push(
            Write::PutProduct,
            vec![text(&p.shop_id), text(&p.product_id), blob(p)],
        ),
        WriteOp::PutCard {
            shop_id,
            product_id,
            group_id,
        } => push(
            Write::PutCard,
            vec![
                text(shop_id),
                text(product_id),
                bigint("group id", *group_id)?,
            ],
        ),
        WriteOp::PutReachUse {
            group_id,
            day,
            used,
        } => push(
            Write::PutReachUse,
            vec![
                bigint("group id", *group_id)?,
                bigint("day", *day)?,
                CqlValue::Int(i32::try_from(*used).unwrap_or(i32::MAX)),
            ],
        ),
        WriteOp::PutFeedback {
            shop_id,
            day,
            positive,
            negative,
        } => push(
            Write::PutFeedback,
            vec![
                text(shop_id),
                bigint("day", *day)?,
                bigint("feedback count", *positive)?,
                bigint("feedback count", *negative)?,
            ],
        ),
        WriteOp::PutPromotionMute {
            group_id,
            user_id,
            muted,
        } => push(
            if *muted {
                Write::PutPromotionMute
            } else {
                Write::DeletePromotionMute
            },
            vec![bigint("group id", *group_id)?, text(user_id)],
        ),
        WriteOp::PutBuyerTags(t) => {
            if t.tags.is_empty() {
                push(
                    Write::DeleteBuyerTags,
                    vec![text(&t.shop_id), text(&t.user_id)],
                );
            } else {
                push(
                    Write::PutBuyerTags,
                    vec![text(&t.shop_id), text(&t.user_id), blob(t)],
                );
            }
        }
        WriteOp::PutJoinRequest(r) => push(
            Write::PutJoinRequest,
            vec![bigint("group id", r.group_id)?, text(&r.user_id), blob(r)],
        ),
        WriteOp::RemoveJoinRequest { group_id, user_id } => push(
            Write::DeleteJoinRequest,
            vec![bigint("group id", *group_id)?, text(user_id)],
        ),
        WriteOp::PutAutoReply(r) => push(
            Write::PutAutoReply,
            vec![text(&r.shop_id), text(&r.rule_id), blob(r)],
        ),
        WriteOp::RemoveAutoReply { shop_id, rule_id } => {
            push(Write::DeleteAutoReply, vec![text(shop_id), text(rule_id)])
        }
        WriteOp::PutFaq(f) => push(
            Write::PutFaq,
            vec![
                bigint("group id", f.group_id)?,
                bigint("faq id", f.faq_id)?,
                blob(f),
            ],
        ),
        WriteOp::RemoveFaq { group_id, faq_id } => push(
            Write::DeleteFaq,
            vec![bigint("group id", *group_id)?, bigint("faq id", *faq_id)?],
        ),
        WriteOp::PutCsShop(r) => push(Write::PutCsShop, vec![text(&r.shop_id), blob(r)]),
        WriteOp::PutCsBuyer(r) => push(
            Write::PutCsBuyer,
            vec![text(&r.shop_id), text(&r.buyer_id), blob(r)],
        ),
        WriteOp::PutSchedule(r) => push(
            Write::PutSchedule,
            vec![
                bigint("group id", r.group_id)?,
                bigint("schedule id", r.schedule_id)?,
                blob(r),
            ],
        ),
        WriteOp::RemoveSchedule {
            group_id,
            schedule_id,
        } => push(
            Write::DeleteSchedule,
            vec![
                bigint("group id", *group_id)?,
                bigint("schedule id", *schedule_id)?,
            ],
        ),
        WriteOp::RewriteMessage(m) => push(
            Write::AppendMessage,
            vec![
                bigint("group id", m.group_id)?,
                bigint("bucket", bucket_of(m.seq))?,
                bigint("seq", m.seq)?,
                blob(m),
            ],
        ),
        WriteOp::PutMemberFlags {
            group_id,
            user_id,
            flags,
        } => {
            let id = bigint("group id", *group_id)?;
            if *flags == crate::records::MemberFlagsRecord::default() {
                push(Write::DeleteMemberFlags, vec![id, text(user_id)]);
            } else {
                push(Write::PutMemberFlags, vec![id, text(user_id), blob(flags)]);
            }
        }
        WriteOp::PutReport(r) => push(
            Write::PutReport,
            vec![
                bigint("group id", r.group_id)?,
                bigint("seq", r.seq)?,
                text(&r.reporter_id),
                blob(r),
            ],
        ),
    }
    Ok(())
}

/// The buckets to read, newest first, for messages with seq at most
/// `through`, given the buckets a group has used (any order).
pub(crate) fn buckets_down_from(known: &[u64], through: u64) -> Vec<u64> {
    let top = bucket_of(through);
    let mut out: Vec<u64> = known.iter().copied().filter(|b| *b <= top).collect();
    out.sort_unstable_by(|a, b| b.cmp(a));
    out.dedup();
    out
}

/// The buckets to read, oldest first, for messages with seq at least `from`.
pub(crate) fn buckets_up_from(known: &[u64], from: u64) -> Vec<u64> {
    let bottom = bucket_of(from);
    let mut out: Vec<u64> = known.iter().copied().filter(|b| *b >= bottom).collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{MessageRecord, ObjectRecord, ProductRecord};

    fn all(op: &WriteOp, new_bucket: bool) -> Vec<Statement> {
        let mut out = Vec::new();
        statements(op, |_, _| new_bucket, &mut out).unwrap();
        out
    }

    fn writes(s: &[Statement]) -> Vec<Write> {
        s.iter().map(|s| s.write).collect()
    }

    fn message(group_id: u64, seq: u64, client_msg_id: &str) -> WriteOp {
        WriteOp::AppendMessage(MessageRecord {
            group_id,
            seq,
            sender_id: "u1".into(),
            client_msg_id: client_msg_id.into(),
            text: "hi".into(),
            ..Default::default()
        })
    }

    #[test]
    fn every_write_has_cql_naming_its_table_and_as_many_markers_as_values() {
        for w in Write::ALL {
            assert_eq!(Write::ALL[w.index()], w, "ALL is out of order at {w:?}");
            let cql = w.cql("qun_test");
            assert!(cql.contains(&format!("qun_test.{} ", w.table())), "{cql}");
        }
        // Count the markers against the values each op binds.
        let ops = [
            WriteOp::PutGroup(Default::default()),
            WriteOp::PutMember(Default::default()),
            WriteOp::RemoveMember {
                group_id: 1,
                user_id: "u".into(),
            },
            message(1, 1, "c-1"),
            WriteOp::AppendMessage(MessageRecord {
                group_id: 1,
                seq: 2,
                reply_to: 1,
                ..Default::default()
            }),
            WriteOp::PutReadMark {
                group_id: 1,
                user_id: "u".into(),
                seq: 3,
            },
            WriteOp::PutObject(ObjectRecord {
                due_ms: 5,
                ..Default::default()
            }),
            WriteOp::PutObject(Default::default()),
            WriteOp::PutEntry(Default::default()),
            WriteOp::RemoveEntry {
                group_id: 1,
                object_id: 2,
                user_id: "u".into(),
            },
            WriteOp::PutProduct(Default::default()),
            WriteOp::PutCard {
                shop_id: "s".into(),
                product_id: "p".into(),
                group_id: 1,
            },
            WriteOp::PutReachUse {
                group_id: 1,
                day: 20_000,
                used: 2,
            },
            WriteOp::PutFeedback {
                shop_id: "s".into(),
                day: 20_000,
                positive: 5,
                negative: 1,
            },
            WriteOp::PutPromotionMute {
                group_id: 1,
                user_id: "u".into(),
                muted: true,
            },
            WriteOp::PutPromotionMute {
                group_id: 1,
                user_id: "u".into(),
                muted: false,
            },
            WriteOp::PutReport(Default::default()),
            WriteOp::PutMemberFlags {
                group_id: 1,
                user_id: "u".into(),
                flags: crate::records::MemberFlagsRecord {
                    muted_until_ms: 5,
                    banned_until_ms: 0,
                },
            },
            WriteOp::PutMemberFlags {
                group_id: 1,
                user_id: "u".into(),
                flags: Default::default(),
            },
            WriteOp::PutFaq(Default::default()),
            WriteOp::PutAutoReply(Default::default()),
            WriteOp::PutJoinRequest(Default::default()),
            WriteOp::PutBuyerTags(Default::default()),
            WriteOp::PutBuyerTags(crate::records::BuyerTagsRecord {
                tags: vec!["vip".into()],
                ..Default::default()
            }),
            WriteOp::RemoveJoinRequest {
                group_id: 1,
                user_id: "u".into(),
            },
            WriteOp::RemoveAutoReply {
                shop_id: "s".into(),
                rule_id: "r".into(),
            },
            WriteOp::RemoveFaq {
                group_id: 1,
                faq_id: 2,
            },
            WriteOp::PutCsShop(Default::default()),
            WriteOp::PutCsBuyer(Default::default()),
            WriteOp::PutSchedule(Default::default()),
            WriteOp::RemoveSchedule {
                group_id: 1,
                schedule_id: 2,
            },
        ];
        let mut seen = std::collections::HashSet::new();
        for op in &ops {
            for s in all(op, true) {
                let markers = s.write.cql("ks").matches('?').count();
                assert_eq!(markers, s.values.len(), "{:?}", s.write);
                seen.insert(s.write);
            }
        }
        assert_eq!(seen.len(), Write::ALL.len(), "some write is never used");
    }

    #[test]
    fn a_message_writes_its_bucket_only_when_new_and_its_sent_entry_only_with_an_id() {
        assert_eq!(
            writes(&all(&message(7, 3, "c-9"), false)),
            [Write::AppendMessage, Write::PutSent]
        );
        assert_eq!(
            writes(&all(&message(7, 3, ""), true)),
            [Write::AppendMessage, Write::PutMessageBucket]
        );
        // A reply is indexed under the message it quotes.
        let WriteOp::AppendMessage(mut reply) = message(7, 9, "c-10") else {
            unreachable!()
        };
        reply.reply_to = 4;
        let s = all(&WriteOp::AppendMessage(reply), false);
        assert_eq!(
            writes(&s),
            [Write::AppendMessage, Write::PutSent, Write::PutReply]
        );
        assert_eq!(
            s[2].values,
            [
                CqlValue::BigInt(7),
                CqlValue::BigInt(4),
                CqlValue::BigInt(9)
            ],
            "partition (group, quoted seq), then the reply's seq"
        );
        let s = all(&message(7, BUCKET_SIZE + 2, ""), false);
        assert_eq!(
            s[0].values[..3],
            [
                CqlValue::BigInt(7),
                CqlValue::BigInt(1),
                CqlValue::BigInt(BUCKET_SIZE as i64 + 2)
            ],
            "partition (group, bucket), then seq"
        );
        let registered: Vec<_> = all(&message(7, BUCKET_SIZE, ""), true)
            .iter()
            .filter_map(Statement::registered_bucket)
            .collect();
        assert_eq!(registered, [(7, 1)]);
        let mut asked = None;
        statements(
            &message(7, 2 * BUCKET_SIZE, ""),
            |g, b| {
                asked = Some((g, b));
                false
            },
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!(asked, Some((7, 2)));
    }

    #[test]
    fn values_above_bigint_are_refused_not_wrapped() {
        let mut out = Vec::new();
        let r = statements(&message(1, u64::MAX, ""), |_, _| true, &mut out);
        assert!(
            matches!(r, Err(StorageError::OutOfRange { what: "seq", .. })),
            "{r:?}"
        );
        assert_eq!(
            bigint("x", i64::MAX as u64).unwrap(),
            CqlValue::BigInt(i64::MAX)
        );
    }

    #[test]
    fn shapes() {
        assert_eq!(shape(&[]), Shape::Empty);
        assert_eq!(shape([&all(&message(1, 1, ""), false)[0]]), Shape::Single);
        assert_eq!(shape(&all(&message(1, 1, ""), false)), Shape::Single);
        // Message + sent entry: two partitions, so logged.
        assert_eq!(shape(&all(&message(1, 1, "c"), false)), Shape::Logged);
        let mut same = all(&message(1, 1, ""), false);
        same.extend(all(&message(1, 2, ""), false));
        assert_eq!(shape(&same), Shape::SamePartition);
        let mut across = all(&message(1, 1, ""), false);
        across.extend(all(&message(1, BUCKET_SIZE, ""), false));
        assert_eq!(
            shape(&across),
            Shape::Logged,
            "another bucket is another partition"
        );
    }

    #[test]
    fn runs_fill_batches_up_to_the_limits_without_splitting_a_submission() {
        let one = all(&message(1, 1, "c"), false); // 2 statements
        let bytes: usize = one.iter().map(Statement::approx_bytes).sum();
        let subs: Vec<&[Statement]> = vec![&one; 5];
        assert_eq!(runs(&subs, bytes * 2, 100), [0..2, 2..4, 4..5]);
        assert_eq!(runs(&subs, usize::MAX, 4), [0..2, 2..4, 4..5]);
        assert_eq!(runs(&subs, usize::MAX, 100), vec![(0..5)]);
        // Larger than the limit alone: still written, alone.
        assert_eq!(runs(&subs, 1, 1), [0..1, 1..2, 2..3, 3..4, 4..5]);
        assert!(runs(&[], 10, 10).is_empty());
    }

    #[test]
    fn lanes() {
        assert_eq!(lane(&[]), Lane::Shop);
        assert_eq!(
            lane(&[message(3, 1, ""), message(3, 2, "")]),
            Lane::Group(3)
        );
        assert_eq!(lane(&[message(3, 1, ""), message(4, 1, "")]), Lane::Barrier);
        let product = WriteOp::PutProduct(ProductRecord::default());
        assert_eq!(lane(std::slice::from_ref(&product)), Lane::Shop);
        assert_eq!(lane(&[product, message(3, 1, "")]), Lane::Barrier);
    }

    #[test]
    fn bucket_walks() {
        let known = [0, 2, 1, 3];
        assert_eq!(buckets_down_from(&known, 2 * BUCKET_SIZE + 5), [2, 1, 0]);
        assert_eq!(buckets_down_from(&known, BUCKET_SIZE - 1), [0]);
        assert_eq!(buckets_up_from(&known, BUCKET_SIZE), [1, 2, 3]);
        assert_eq!(buckets_up_from(&known, 9 * BUCKET_SIZE), Vec::<u64>::new());
    }
}
