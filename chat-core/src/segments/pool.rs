//! The industry tag pool: tags every shop uses with the same meaning, so a
//! buyer tagged `size:s` by one system and by hand mean the same thing, and
//! an expression like `size:s AND style:sport` works across shops' tools.
//!
//! A tag whose name is in the pool must take one of the pool's values
//! (`size:huge` is refused); names outside it (`orders:5`,
//! `last_purchase:2026.11`, a shop's own `vip`) are the shop's to choose.

use qun_proto::v1;

use crate::ChatError;

/// One name of the pool with its values.
#[derive(Debug)]
pub struct PoolGroup {
    /// The tag name, e.g. `size`.
    pub name: &'static str,
    /// What it means.
    pub description: &'static str,
    /// The values, e.g. `s`.
    pub values: &'static [&'static str],
}

/// The pool, curated: apparel and shoe sizes, style, spend band, the
/// categories a buyer shops, and life stage.
pub const POOL: &[PoolGroup] = &[
    PoolGroup {
        name: "size",
        description: "apparel size the buyer wears",
        values: &["xxs", "xs", "s", "m", "l", "xl", "xxl", "xxxl"],
    },
    PoolGroup {
        name: "shoe",
        description: "EU shoe size",
        values: &[
            "34", "35", "36", "37", "38", "39", "40", "41", "42", "43", "44", "45", "46",
        ],
    },
    PoolGroup {
        name: "style",
        description: "the style the buyer buys",
        values: &["casual", "sport", "formal", "street", "outdoor", "classic"],
    },
    PoolGroup {
        name: "spend",
        description: "spend band from the shop's systems (spend:high makes a VIP)",
        values: &["low", "mid", "high"],
    },
    PoolGroup {
        name: "category",
        description: "what the buyer shops for",
        values: &[
            "apparel",
            "shoes",
            "beauty",
            "electronics",
            "home",
            "food",
            "kids",
            "pets",
            "sports",
        ],
    },
    PoolGroup {
        name: "life",
        description: "life stage",
        values: &["student", "new_parent", "parent", "retired"],
    },
];

/// Refuses a `name:value` tag whose name is the pool's and whose value is
/// not.
///
/// # Errors
/// `InvalidArgument` naming the values allowed.
pub fn check_pool(tag: &str) -> Result<(), ChatError> {
    let Some((name, value)) = tag.split_once(':') else {
        return Ok(());
    };
    match POOL.iter().find(|g| g.name == name) {
        Some(g) if !g.values.contains(&value) => Err(ChatError::InvalidArgument(format!(
            "tag {tag:?}: {name} is from the industry pool and takes {}",
            g.values.join(", ")
        ))),
        _ => Ok(()),
    }
}

/// The pool on the wire.
pub fn tag_pool() -> v1::TagPool {
    v1::TagPool {
        groups: POOL
            .iter()
            .map(|g| v1::TagPoolGroup {
                name: g.name.to_string(),
                description: g.description.to_string(),
                tags: g.values.iter().map(|v| format!("{}:{v}", g.name)).collect(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_tags_are_valid_tags_and_pool_names_take_pool_values() {
        for g in POOL {
            for v in g.values {
                let tag = format!("{}:{v}", g.name);
                crate::segments::check_tag(&tag).unwrap();
                check_pool(&tag).unwrap();
            }
        }
        assert!(check_pool("size:huge").is_err());
        assert!(check_pool("shoe:99").is_err());
        check_pool("orders:5").unwrap();
        check_pool("vip").unwrap();
        assert_eq!(tag_pool().groups.len(), POOL.len());
        assert!(tag_pool().groups[0].tags.contains(&"size:s".to_string()));
    }
}
