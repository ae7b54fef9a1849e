//! Tags on the registry: staff edit a buyer's tags; a threshold group
//! admits only buyers whose tags match its expression.

use std::collections::BTreeSet;
use std::sync::Arc;

use qun_proto::v1;
use qun_storage::WriteOp;
use qun_storage::records::BuyerTagsRecord;

use super::{MAX_TAGS, TagExpr, check_tag, tier};
use crate::group::GroupCell;
use crate::groups::{Groups, durable, durable_channel};
use crate::permissions::{Operation, require};
use crate::{ChatError, Identity, Role};

fn wire(user_id: &str, tags: &BTreeSet<String>) -> v1::BuyerTags {
    v1::BuyerTags {
        user_id: user_id.to_string(),
        tags: tags.iter().cloned().collect(),
        tier: tier(tags).as_str().to_string(),
    }
}

impl Groups {
    /// A buyer's tags in a shop (empty when none).
    pub(crate) async fn tags_of(
        &self,
        shop_id: &str,
        user_id: &str,
    ) -> Result<BTreeSet<String>, ChatError> {
        Ok(self
            .inner()
            .store
            .load_buyer_tags(shop_id, user_id)
            .await?
            .map(|r| r.tags.into_iter().collect())
            .unwrap_or_default())
    }

    /// Adds and removes tags of a buyer in the caller's shop; with
    /// `replace`, the buyer's tags become `add` exactly (how the shop's
    /// own systems push them). Staff only. Changes of one buyer are
    /// applied one at a time, so none is lost.
    ///
    /// # Errors
    /// `ForbiddenRole`, `InvalidArgument` (a malformed tag, more than 50
    /// tags, a bad user id), `Storage`.
    pub async fn tag_buyer(
        &self,
        who: &Identity,
        user_id: &str,
        add: Vec<String>,
        remove: Vec<String>,
        replace: bool,
    ) -> Result<v1::BuyerTags, ChatError> {
        require(who, Operation::ManageTags)?;
        Identity::new(user_id, "buyer", Role::Buyer, None)
            .map_err(|e| ChatError::InvalidArgument(e.to_string()))?;
        let add: Vec<String> = add.iter().map(|t| t.trim().to_ascii_lowercase()).collect();
        for t in &add {
            check_tag(t)?;
        }
        let shop = who.shop_id().unwrap_or_default().to_string();
        let lock = self.tag_lock(&shop, user_id);
        let _serial = lock.lock().await;
        let mut tags = if replace {
            BTreeSet::new()
        } else {
            self.tags_of(&shop, user_id).await?
        };
        tags.extend(add);
        for t in &remove {
            tags.remove(&t.trim().to_ascii_lowercase());
        }
        if tags.len() > MAX_TAGS {
            return Err(ChatError::InvalidArgument(format!(
                "a buyer has at most {MAX_TAGS} tags in a shop"
            )));
        }
        let (done, rx) = durable_channel();
        self.inner().store.submit(
            vec![WriteOp::PutBuyerTags(BuyerTagsRecord {
                shop_id: shop,
                user_id: user_id.to_string(),
                tags: tags.iter().cloned().collect(),
            })],
            done,
        )?;
        durable(rx).await?;
        Ok(wire(user_id, &tags))
    }

    /// The industry tag pool. Anyone signed in.
    ///
    /// # Errors
    /// `ForbiddenRole` (the system).
    pub fn tag_pool(&self, who: &Identity) -> Result<v1::TagPool, ChatError> {
        require(who, Operation::ReadTagPool)?;
        Ok(super::tag_pool())
    }

    /// A buyer's tags and tier in the caller's shop. Staff only.
    ///
    /// # Errors
    /// `ForbiddenRole`, `Storage`.
    pub async fn buyer_tags(
        &self,
        who: &Identity,
        user_id: &str,
    ) -> Result<v1::BuyerTags, ChatError> {
        require(who, Operation::ManageTags)?;
        let shop = who.shop_id().unwrap_or_default();
        Ok(wire(user_id, &self.tags_of(shop, user_id).await?))
    }

    /// For a buyer joining a group that admits by tags: `NotEligible`
    /// unless their tags match its expression.
    pub(crate) async fn check_threshold(
        &self,
        cell: &Arc<GroupCell>,
        who: &Identity,
    ) -> Result<(), ChatError> {
        let (shop, expression) = {
            let g = cell.lock();
            (g.record.shop_id.clone(), g.record.join_expression.clone())
        };
        let expr = TagExpr::parse(&expression)?;
        if expr.matches(&self.tags_of(&shop, who.user_id()).await?) {
            Ok(())
        } else {
            Err(ChatError::NotEligible)
        }
    }

    fn tag_lock(&self, shop: &str, user: &str) -> Arc<tokio::sync::Mutex<()>> {
        use std::hash::BuildHasher;
        let locks = &self.inner().tag_locks;
        let h = locks.hasher.hash_one((shop, user));
        locks.stripes[(h as usize) % locks.stripes.len()].clone()
    }
}
