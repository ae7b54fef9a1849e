//! How the embedded store is split into partitions, and which partition
//! holds what.
//!
//! One fjall database has one journal, and every commit inserts into its
//! memtables while holding the journal: a database is written by one thread
//! at a time. On the project's 2-core machine that tops out near 200k
//! durable appends/s. So a data folder holds several databases,
//! *partitions*, each with its own journal, fsync and writer thread, and the
//! cores share the work (docs/benchmarks.md, "Embedded store").
//!
//! # What lives where
//! Everything of one shop lives in one partition, `fnv1a(shop_id) % count`:
//! its products, feedback, rules, customer-service records and its groups.
//! A group's partition is decided the first time the store sees it, by the
//! shop of its record, and every row of the group follows it: messages,
//! members, read marks, objects, the user → group index. So every batch
//! chat-core writes touches one partition, stays atomic, and keeps its order
//! against the group's other writes. Listings that cut across shops (a
//! user's groups, objects due, schedules, the highest group id, the groups
//! showing a card) read every partition and merge.
//!
//! A submission that names several shops (the buyer-feedback tick writes
//! many shops at once) is split, one batch per partition: each part is
//! atomic, and the callback waits for all of them.
//!
//! # On disk
//! A new folder gets a `partitions` file holding the count, and one fjall
//! database per partition in `p0`, `p1`, …. The count is fixed when the
//! folder is created. A folder written before partitions existed (a fjall
//! database at its root) opens as one partition, unchanged.

use std::path::{Path, PathBuf};

use dashmap::DashMap;

use crate::{StorageError, WriteOp};

/// The file in a data folder that records how many partitions it has.
const COUNT_FILE: &str = "partitions";

use super::MAX_PARTITIONS;

/// The databases of the data folder at `root`, one per partition.
///
/// Reads the count of an existing folder; for a new one, records `wanted`
/// (clamped to 1..=[`MAX_PARTITIONS`]).
///
/// # Errors
/// [`StorageError::Backend`] when the folder or its count file cannot be
/// written or read, [`StorageError::Corrupt`] when the count file does not
/// hold a count.
pub(super) fn folders(root: &Path, wanted: usize) -> Result<Vec<PathBuf>, StorageError> {
    std::fs::create_dir_all(root).map_err(|e| StorageError::backend("create data dir", e))?;
    let count_file = root.join(COUNT_FILE);
    let count = match std::fs::read_to_string(&count_file) {
        Ok(text) => text
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PARTITIONS).contains(n))
            .ok_or_else(|| {
                StorageError::corrupt(
                    "partitions",
                    format!(
                        "{} should hold a count from 1 to {MAX_PARTITIONS}, not {text:?}",
                        count_file.display()
                    ),
                )
            })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // fjall writes `version` at the root of its database.
            if root.join("version").exists() {
                return Ok(vec![root.to_path_buf()]);
            }
            let count = wanted.clamp(1, MAX_PARTITIONS);
            write_count(root, count)?;
            count
        }
        Err(e) => return Err(StorageError::backend("read the partitions file", e)),
    };
    Ok((0..count).map(|i| root.join(format!("p{i}"))).collect())
}

/// Writes the count file whole or not at all: a temporary file, synced,
/// then renamed over, and the folder synced.
fn write_count(root: &Path, count: usize) -> Result<(), StorageError> {
    use std::io::Write;
    let err = |e| StorageError::backend("write the partitions file", e);
    let tmp = root.join(format!("{COUNT_FILE}.tmp"));
    let mut file = std::fs::File::create(&tmp).map_err(err)?;
    file.write_all(format!("{count}\n").as_bytes())
        .map_err(err)?;
    file.sync_all().map_err(err)?;
    std::fs::rename(&tmp, root.join(COUNT_FILE)).map_err(err)?;
    std::fs::File::open(root)
        .and_then(|dir| dir.sync_all())
        .map_err(err)
}

/// What a write belongs to, which decides its partition.
enum Owner<'a> {
    Group(u64),
    Shop(&'a str),
}

fn owner(op: &WriteOp) -> Owner<'_> {
    use Owner::{Group, Shop};
    match op {
        WriteOp::PutGroup(g) => Group(g.group_id),
        WriteOp::PutMember(m) => Group(m.group_id),
        WriteOp::AppendMessage(m) | WriteOp::RewriteMessage(m) => Group(m.group_id),
        WriteOp::PutObject(o) => Group(o.group_id),
        WriteOp::PutEntry(e) => Group(e.group_id),
        WriteOp::PutReport(r) => Group(r.group_id),
        WriteOp::PutJoinRequest(r) => Group(r.group_id),
        WriteOp::PutFaq(f) => Group(f.group_id),
        WriteOp::PutSchedule(s) => Group(s.group_id),
        WriteOp::RemoveMember { group_id, .. }
        | WriteOp::PutReadMark { group_id, .. }
        | WriteOp::RemoveEntry { group_id, .. }
        | WriteOp::PutCard { group_id, .. }
        | WriteOp::PutReachUse { group_id, .. }
        | WriteOp::PutPromotionMute { group_id, .. }
        | WriteOp::RemoveJoinRequest { group_id, .. }
        | WriteOp::RemoveFaq { group_id, .. }
        | WriteOp::RemoveSchedule { group_id, .. }
        | WriteOp::PutMemberFlags { group_id, .. } => Group(*group_id),
        WriteOp::PutProduct(p) => Shop(&p.shop_id),
        WriteOp::PutBuyerTags(t) => Shop(&t.shop_id),
        WriteOp::PutAutoReply(r) => Shop(&r.shop_id),
        WriteOp::PutCsShop(r) => Shop(&r.shop_id),
        WriteOp::PutCsBuyer(r) => Shop(&r.shop_id),
        WriteOp::PutFeedback { shop_id, .. } | WriteOp::RemoveAutoReply { shop_id, .. } => {
            Shop(shop_id)
        }
    }
}

/// Which partition each shop and group lives in.
#[derive(Debug)]
pub(super) struct Homes {
    count: usize,
    /// The partition of every group the store has seen: learned from the
    /// group records at open, and from writes since.
    groups: DashMap<u64, usize>,
}

impl Homes {
    pub(super) fn new(count: usize) -> Self {
        Self {
            count: count.max(1),
            groups: DashMap::new(),
        }
    }

    /// Records that `group_id`'s record was found in `partition`.
    pub(super) fn learn(&self, group_id: u64, partition: usize) {
        self.groups.insert(group_id, partition);
    }

    /// The partition of everything of `shop_id`.
    pub(super) fn of_shop(&self, shop_id: &str) -> usize {
        if self.count == 1 {
            return 0;
        }
        (fnv1a(shop_id.as_bytes()) % self.count as u64) as usize
    }

    /// The partition of `group_id`'s rows. A group the store has never seen
    /// has no rows anywhere; partition 0 answers for it.
    pub(super) fn of_group(&self, group_id: u64) -> usize {
        if self.count == 1 {
            return 0;
        }
        self.groups.get(&group_id).map_or(0, |p| *p)
    }

    /// Where `ops` go: one partition (every submission chat-core makes but
    /// the feedback tick), or the partition of each op, in order.
    ///
    /// A group seen for the first time is settled here, for good: with its
    /// shop when the submission carries its record, in partition 0 when
    /// its rows come before any record (which chat-core never does; a
    /// store fed by hand may).
    pub(super) fn settle(&self, ops: &[WriteOp]) -> Placement {
        if self.count == 1 {
            return Placement::One(0);
        }
        for op in ops {
            if let WriteOp::PutGroup(g) = op {
                let home = self.of_shop(&g.shop_id);
                self.groups.entry(g.group_id).or_insert(home);
            }
        }
        let home = |op: &WriteOp| match owner(op) {
            Owner::Shop(shop_id) => self.of_shop(shop_id),
            Owner::Group(group_id) => match self.groups.get(&group_id) {
                Some(p) => *p,
                None => *self.groups.entry(group_id).or_insert(0),
            },
        };
        let Some(first) = ops.first().map(home) else {
            return Placement::One(0);
        };
        match ops[1..].iter().position(|op| home(op) != first) {
            None => Placement::One(first),
            Some(_) => Placement::Each(ops.iter().map(home).collect()),
        }
    }
}

/// Where the ops of one submission go.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Placement {
    /// All to this partition.
    One(usize),
    /// Each op to its partition, in order.
    Each(Vec<usize>),
}

/// 64-bit FNV-1a: a hash that stays the same across Rust versions and
/// processes, because a shop's partition is kept on disk.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{GroupRecord, MessageRecord};

    #[test]
    fn fnv1a_matches_the_reference_values() {
        // From the FNV reference test suite: a changed hash would move
        // shops of existing folders to other partitions.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn a_group_follows_its_shop_and_its_rows_follow_it() {
        let homes = Homes::new(4);
        let shops: Vec<String> = (0..40).map(|i| format!("shop-{i}")).collect();
        let used: std::collections::HashSet<usize> =
            shops.iter().map(|s| homes.of_shop(s)).collect();
        assert_eq!(used.len(), 4, "40 shops spread over every partition");
        for (i, shop) in shops.iter().enumerate() {
            let group_id = 100 + i as u64;
            // The message comes before the record in the submission.
            let ops = vec![
                WriteOp::AppendMessage(MessageRecord {
                    group_id,
                    seq: 1,
                    ..Default::default()
                }),
                WriteOp::PutGroup(GroupRecord {
                    group_id,
                    shop_id: shop.clone(),
                    ..Default::default()
                }),
                WriteOp::PutFeedback {
                    shop_id: shop.clone(),
                    day: 1,
                    positive: 1,
                    negative: 0,
                },
            ];
            let home = homes.of_shop(shop);
            assert_eq!(homes.settle(&ops), Placement::One(home), "{shop}");
            assert_eq!(homes.of_group(group_id), home);
        }
    }

    #[test]
    fn a_group_seen_before_its_record_stays_where_it_was_first_written() {
        let homes = Homes::new(2);
        let shop = (0..)
            .map(|i| format!("s{i}"))
            .find(|s| homes.of_shop(s) == 1);
        let shop = shop.unwrap_or_default();
        let message = WriteOp::PutReadMark {
            group_id: 7,
            user_id: "u".into(),
            seq: 1,
        };
        assert_eq!(
            homes.settle(std::slice::from_ref(&message)),
            Placement::One(0)
        );
        let record = WriteOp::PutGroup(GroupRecord {
            group_id: 7,
            shop_id: shop,
            ..Default::default()
        });
        assert_eq!(
            homes.settle(&[record]),
            Placement::One(0),
            "not moved to its shop's"
        );
        assert_eq!(homes.of_group(7), 0);
    }

    #[test]
    fn a_new_folder_records_its_count_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = folders(dir.path(), 3).unwrap();
        assert_eq!(first.len(), 3);
        assert_eq!(first[2], dir.path().join("p2"));
        let again = folders(dir.path(), 1).unwrap();
        assert_eq!(again, first, "the count is the folder's, not the setting's");
        let clamped = tempfile::tempdir().unwrap();
        assert_eq!(folders(clamped.path(), 0).map(|f| f.len()).ok(), Some(1));
    }

    #[test]
    fn a_folder_with_a_database_at_its_root_is_one_partition() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("version"), b"3").unwrap();
        let f = folders(dir.path(), 4).unwrap();
        assert_eq!(f, vec![dir.path().to_path_buf()]);
        assert!(
            !dir.path().join(COUNT_FILE).exists(),
            "old folders are left as they are"
        );
    }

    #[test]
    fn a_damaged_count_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(COUNT_FILE), b"many\n").unwrap();
        let r = folders(dir.path(), 2);
        assert!(
            matches!(
                r,
                Err(StorageError::Corrupt {
                    keyspace: "partitions",
                    ..
                })
            ),
            "{r:?}"
        );
    }
}
