//! Key layout, shared by every backend.
//!
//! Messages are partitioned by `(group_id, bucket)` and clustered by `seq`,
//! with `bucket = seq / BUCKET_SIZE`: a ScyllaDB table with
//! `PRIMARY KEY ((group_id, bucket), seq)`. Buckets bound the size of one
//! partition (16,384 messages of at most 4 KiB). In fjall the key is
//! `group_id | seq` big-endian, which sorts the same way (a bucket only
//! grows with seq) and, at 16 bytes, is stored inline in fjall's memtable
//! keys instead of on the heap (docs/benchmarks.md, "Embedded store").

/// Messages per bucket (partition).
pub const BUCKET_SIZE: u64 = 16_384;

/// The bucket a seq falls in.
pub fn bucket_of(seq: u64) -> u64 {
    seq / BUCKET_SIZE
}

/// `group_id` big-endian: the key of a group, and the prefix of its members
/// and messages.
pub fn group_key(group_id: u64) -> [u8; 8] {
    group_id.to_be_bytes()
}

/// `group_id | seq`, both big-endian: a message's key in fjall.
pub fn message_key(group_id: u64, seq: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&group_id.to_be_bytes());
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// `group_id | quoted seq | reply seq`, big-endian: a reply's entry in the
/// reply index, under its quoted message's [`message_key`].
pub fn reply_key(group_id: u64, quoted: u64, reply: u64) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..16].copy_from_slice(&message_key(group_id, quoted));
    key[16..].copy_from_slice(&reply.to_be_bytes());
    key
}

/// `group_id | user_id`.
pub fn member_key(group_id: u64, user_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + user_id.len());
    key.extend_from_slice(&group_id.to_be_bytes());
    key.extend_from_slice(user_id.as_bytes());
    key
}

/// `user_id | 0x00 | group_id`: the index of a user's groups. User ids never
/// contain NUL, so `user_id | 0x00` is a prefix of this user's keys only.
pub fn user_group_key(user_id: &str, group_id: u64) -> Vec<u8> {
    let mut key = user_group_prefix(user_id);
    key.extend_from_slice(&group_id.to_be_bytes());
    key
}

/// `user_id | 0x00`.
pub fn user_group_prefix(user_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(user_id.len() + 9);
    key.extend_from_slice(user_id.as_bytes());
    key.push(0);
    key
}

/// `group_id | sender_id | 0x00 | client_msg_id`: the index that makes a
/// retried send find the message it already posted.
pub fn sent_key(group_id: u64, sender_id: &str, client_msg_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(9 + sender_id.len() + client_msg_id.len());
    key.extend_from_slice(&group_id.to_be_bytes());
    key.extend_from_slice(sender_id.as_bytes());
    key.push(0);
    key.extend_from_slice(client_msg_id.as_bytes());
    key
}

/// `group_id | object_id`: a group's live object, and the prefix of its entries.
pub fn object_key(group_id: u64, object_id: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&group_id.to_be_bytes());
    key[8..].copy_from_slice(&object_id.to_be_bytes());
    key
}

/// `group_id | object_id | user_id`.
pub fn entry_key(group_id: u64, object_id: u64, user_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(16 + user_id.len());
    key.extend_from_slice(&object_key(group_id, object_id));
    key.extend_from_slice(user_id.as_bytes());
    key
}

/// `shop_id | 0x00 | id`: a row of one shop, keyed by its own id within
/// the shop (a product, a buyer's tags, an auto-reply rule, a
/// customer-service buyer).
pub fn shop_key(shop_id: &str, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(shop_id.len() + 1 + id.len());
    key.extend_from_slice(shop_id.as_bytes());
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    key
}

/// `shop_id | 0x00 | product_id | 0x00`: the prefix of a product's cards.
pub fn card_prefix(shop_id: &str, product_id: &str) -> Vec<u8> {
    let mut key = shop_key(shop_id, product_id);
    key.push(0);
    key
}

/// `shop_id | 0x00 | product_id | 0x00 | group_id`: "this group has a card
/// of this product", so that an update reaches every card.
pub fn card_key(shop_id: &str, product_id: &str, group_id: u64) -> Vec<u8> {
    let mut key = card_prefix(shop_id, product_id);
    key.extend_from_slice(&group_id.to_be_bytes());
    key
}

/// `shop_id | 0x00`: the prefix of a shop's feedback days.
pub fn feedback_prefix(shop_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(shop_id.len() + 9);
    key.extend_from_slice(shop_id.as_bytes());
    key.push(0);
    key
}

/// `shop_id | 0x00 | day`: one day of a shop's buyer feedback.
pub fn feedback_key(shop_id: &str, day: u64) -> Vec<u8> {
    let mut key = feedback_prefix(shop_id);
    key.extend_from_slice(&day.to_be_bytes());
    key
}

/// `group_id | seq | reporter_id`: one report of one message.
pub fn report_key(group_id: u64, seq: u64, reporter_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(16 + reporter_id.len());
    key.extend_from_slice(&object_key(group_id, seq));
    key.extend_from_slice(reporter_id.as_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_keys_sort_by_group_then_seq() {
        let mut keys = vec![
            message_key(256, 1),
            message_key(1, BUCKET_SIZE),
            message_key(1, 2),
            message_key(255, u64::MAX),
            message_key(1, BUCKET_SIZE - 1),
        ];
        keys.sort();
        assert_eq!(
            keys,
            vec![
                message_key(1, 2),
                message_key(1, BUCKET_SIZE - 1),
                message_key(1, BUCKET_SIZE),
                message_key(255, u64::MAX),
                message_key(256, 1),
            ]
        );
    }

    #[test]
    fn bucket_boundaries() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(BUCKET_SIZE - 1), 0);
        assert_eq!(bucket_of(BUCKET_SIZE), 1);
    }

    #[test]
    fn sent_keys_do_not_collide_across_senders() {
        // "ab" + id "c" must differ from "a" + id "bc".
        assert_ne!(sent_key(1, "ab", "c"), sent_key(1, "a", "bc"));
    }

    #[test]
    fn card_prefix_does_not_cover_longer_product_ids() {
        let p = card_prefix("shop", "sku-1");
        assert!(card_key("shop", "sku-1", 7).starts_with(&p));
        assert!(!card_key("shop", "sku-10", 7).starts_with(&p));
        assert_ne!(shop_key("ab", "c"), shop_key("a", "bc"));
    }

    #[test]
    fn feedback_prefix_does_not_cover_longer_shop_ids() {
        let p = feedback_prefix("s1");
        assert!(feedback_key("s1", 3).starts_with(&p));
        assert!(!feedback_key("s10", 3).starts_with(&p));
        assert!(
            feedback_key("s1", 2) < feedback_key("s1", 256),
            "days sort numerically"
        );
    }

    #[test]
    fn user_prefix_does_not_cover_longer_ids() {
        let ab = user_group_prefix("ab");
        assert!(!user_group_key("abc", 1).starts_with(&ab));
        assert!(user_group_key("ab", 1).starts_with(&ab));
    }
}
