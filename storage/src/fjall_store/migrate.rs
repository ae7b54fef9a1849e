//! Moves data written by earlier versions of the embedded store into
//! today's layout, when a data folder is opened.
//!
//! # Messages: `group | bucket | seq` → `group | seq`
//! Until 2026-12-03 messages lived in the keyspace `messages` under a
//! 24-byte key, `group_id | bucket | seq` (the ScyllaDB primary key, spelled
//! out). fjall keeps a key of up to 20 bytes inline in its memtable and a
//! longer one on the heap, so every comparison of the skiplist insert that
//! dominates the store's writer followed a pointer; dropping the bucket
//! (which only grows with seq, so the order is the same) made sustained
//! durable appends about an eighth faster (docs/benchmarks.md, "Embedded
//! store").
//!
//! Today's messages live in `messages_v2` under `group_id | seq`. A folder
//! that still has `messages` has it copied across at open, in batches, and
//! is then deleted. The copy is idempotent: a crash midway leaves `messages`
//! in place, and the next open copies it again and finishes.
//!
//! # The reply index
//! Since 2026-12-03 a reply's append also writes `group | quoted | reply`
//! to the keyspace `replies`, so that recalling a message finds the replies
//! that quote it. A folder without a whole index has it built from its
//! messages at open ([`index_replies`]).

use std::path::Path;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use crate::StorageError;
use crate::keys::reply_key;
use crate::records::MessageRecord;

/// The keyspace of messages in the old layout.
pub(super) const OLD_MESSAGES: &str = "messages";

/// Keys copied per batch.
const BATCH: usize = 10_000;

/// Copies every message of the old `messages` keyspace of `db` (if it has
/// one) into `messages` (today's `messages_v2`) under its new key,
/// persists, and deletes the old keyspace. Returns how many messages were
/// moved.
///
/// # Errors
/// [`StorageError::Corrupt`] when an old key is not 24 bytes (nothing is
/// deleted then); [`StorageError::Backend`] when fjall cannot read, write
/// or delete.
pub(super) fn messages_to_seq_keys(
    db: &Database,
    messages: &Keyspace,
    folder: &Path,
) -> Result<u64, StorageError> {
    if !db.keyspace_exists(OLD_MESSAGES) {
        return Ok(0);
    }
    let old = db
        .keyspace(OLD_MESSAGES, KeyspaceCreateOptions::default)
        .map_err(|e| StorageError::backend("open keyspace", e))?;
    tracing::info!(
        folder = %folder.display(),
        "moving messages to the current key layout; this runs once"
    );
    let mut moved = 0u64;
    let mut batch = db.batch();
    for guard in old.iter() {
        let (key, value) = guard
            .into_inner()
            .map_err(|e| StorageError::backend("read old messages", e))?;
        batch.insert(messages, &seq_key(&key)?[..], value);
        moved += 1;
        if batch.len() >= BATCH {
            std::mem::replace(&mut batch, db.batch())
                .commit()
                .map_err(|e| StorageError::backend("copy old messages", e))?;
            if moved.is_multiple_of(1_000_000) {
                tracing::info!(moved, "moving messages");
            }
        }
    }
    batch
        .commit()
        .map_err(|e| StorageError::backend("copy old messages", e))?;
    // Durable in the new keyspace before the old one goes.
    db.persist(PersistMode::SyncAll)
        .map_err(|e| StorageError::backend("persist journal", e))?;
    db.delete_keyspace(old)
        .map_err(|e| StorageError::backend("delete old messages", e))?;
    tracing::info!(moved, folder = %folder.display(), "messages moved");
    Ok(moved)
}

/// The key, in the reply index, that says the index is whole: shorter
/// than any entry (24 bytes), so no group's listing meets it.
const REPLIES_BUILT: &[u8] = b"built";

/// Builds the reply index (`group | quoted | reply`) from the messages of a
/// folder written before it existed, unless it is already whole; returns
/// how many replies were indexed. A crash midway leaves the index without
/// its mark, and the next open builds it again (the entries are the same).
///
/// # Errors
/// [`StorageError::Corrupt`] when a message does not decode;
/// [`StorageError::Backend`] when fjall cannot read or write.
pub(super) fn index_replies(
    db: &Database,
    messages: &Keyspace,
    replies: &Keyspace,
    folder: &Path,
) -> Result<u64, StorageError> {
    if replies
        .contains_key(REPLIES_BUILT)
        .map_err(|e| StorageError::backend("read the reply index", e))?
    {
        return Ok(0);
    }
    if !messages
        .is_empty()
        .map_err(|e| StorageError::backend("read messages", e))?
    {
        tracing::info!(
            folder = %folder.display(),
            "indexing replies by the message they quote; this runs once"
        );
    }
    let (mut indexed, mut read) = (0u64, 0u64);
    let mut batch = db.batch();
    for guard in messages.iter() {
        let value = guard
            .value()
            .map_err(|e| StorageError::backend("read messages", e))?;
        read += 1;
        if read.is_multiple_of(1_000_000) {
            tracing::info!(read, indexed, "indexing replies");
        }
        let m: MessageRecord = prost::Message::decode(&value[..])
            .map_err(|e| StorageError::corrupt("messages", e.to_string()))?;
        if m.reply_to == 0 {
            continue;
        }
        batch.insert(replies, reply_key(m.group_id, m.reply_to, m.seq), []);
        indexed += 1;
        if batch.len() >= BATCH {
            std::mem::replace(&mut batch, db.batch())
                .commit()
                .map_err(|e| StorageError::backend("index replies", e))?;
        }
    }
    batch.insert(replies, REPLIES_BUILT, []);
    batch
        .commit()
        .map_err(|e| StorageError::backend("index replies", e))?;
    db.persist(PersistMode::SyncAll)
        .map_err(|e| StorageError::backend("persist journal", e))?;
    if indexed > 0 {
        tracing::info!(indexed, folder = %folder.display(), "replies indexed for recall");
    }
    Ok(indexed)
}

/// `group_id | bucket | seq` → `group_id | seq`.
fn seq_key(old: &[u8]) -> Result<[u8; 16], StorageError> {
    if old.len() != 24 {
        return Err(StorageError::corrupt(
            OLD_MESSAGES,
            format!("a message key of {} bytes, not 24", old.len()),
        ));
    }
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&old[..8]);
    key[8..].copy_from_slice(&old[16..]);
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_is_dropped_and_group_and_seq_kept() {
        let mut old = Vec::new();
        old.extend_from_slice(&7u64.to_be_bytes());
        old.extend_from_slice(&2u64.to_be_bytes());
        old.extend_from_slice(&(2 * 16_384 + 5u64).to_be_bytes());
        assert_eq!(
            seq_key(&old).unwrap(),
            crate::keys::message_key(7, 2 * 16_384 + 5)
        );
    }

    #[test]
    fn a_key_of_another_length_is_corrupt() {
        let e = seq_key(&[0u8; 16]).unwrap_err();
        assert!(
            matches!(
                e,
                StorageError::Corrupt {
                    keyspace: "messages",
                    ..
                }
            ),
            "{e:?}"
        );
    }
}
