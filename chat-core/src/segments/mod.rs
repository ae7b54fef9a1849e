//! Segments: buyers' tags, the tier derived from them, and tag expressions.
//!
//! A shop tags its buyers — from its own systems over the HTTP API
//! (`orders:5`, `spend:high`, `last_purchase:2026-11`), from the industry
//! pool (`size:s`, `style:sport`; see [`POOL`]: a pool name takes only the
//! pool's values), or by hand (an agent adds `vip`). Tags are lowercase
//! `name` or `name:value`. The tier follows from the tags:
//!
//! - **vip**: tag `vip`, or `spend:high`;
//! - **regular**: tag `returning`, or `orders:N` with N ≥ 2;
//! - **new**: everyone else.
//!
//! A tag expression selects buyers: tags and `tier:new|regular|vip` joined
//! with `AND`, `OR`, `NOT` and parentheses, e.g. `vip AND size:s`,
//! `tier:regular OR tier:vip`. `AND` binds tighter than `OR`.

use std::collections::BTreeSet;

use crate::ChatError;

mod ops;
mod pool;

pub use pool::{POOL, PoolGroup, check_pool, tag_pool};

/// Longest expression, in bytes.
const MAX_EXPR: usize = 200;
/// Deepest nesting of an expression.
const MAX_DEPTH: usize = 10;
/// Most tags one buyer has in one shop.
pub const MAX_TAGS: usize = 50;

/// A buyer's tier in a shop, derived from their tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// No sign of buying before.
    New,
    /// Has bought before.
    Regular,
    /// The shop's best buyers.
    Vip,
}

impl Tier {
    /// The name used in expressions and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::New => "new",
            Tier::Regular => "regular",
            Tier::Vip => "vip",
        }
    }
}

/// Checks one tag: `name` or `name:value`, lowercase letters, digits, `_`,
/// `-` (and `.` in the value), each part 1 to 32 characters; a name of the
/// industry pool with one of its values.
///
/// # Errors
/// `InvalidArgument` naming the tag.
pub fn check_tag(tag: &str) -> Result<(), ChatError> {
    let part = |s: &str, dot: bool| {
        (1..=32).contains(&s.len())
            && s.chars().all(|c| {
                c.is_ascii_lowercase()
                    || c.is_ascii_digit()
                    || c == '_'
                    || c == '-'
                    || (dot && c == '.')
            })
    };
    let ok = match tag.split_once(':') {
        Some((name, value)) => part(name, false) && part(value, true),
        None => part(tag, false),
    };
    if ok && !matches!(tag, "and" | "or" | "not") {
        check_pool(tag)
    } else {
        Err(ChatError::InvalidArgument(format!(
            "tag {tag:?}: use lowercase name or name:value (letters, digits, _ and -)"
        )))
    }
}

/// The tier of a buyer with these tags.
pub fn tier(tags: &BTreeSet<String>) -> Tier {
    if tags.contains("vip") || tags.contains("spend:high") {
        return Tier::Vip;
    }
    let orders = tags
        .iter()
        .filter_map(|t| t.strip_prefix("orders:"))
        .filter_map(|n| n.parse::<u32>().ok())
        .max()
        .unwrap_or(0);
    if tags.contains("returning") || orders >= 2 {
        Tier::Regular
    } else {
        Tier::New
    }
}

/// A parsed tag expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagExpr {
    /// A tag, or `tier:…`.
    Tag(String),
    /// Both.
    And(Box<TagExpr>, Box<TagExpr>),
    /// Either.
    Or(Box<TagExpr>, Box<TagExpr>),
    /// Not.
    Not(Box<TagExpr>),
}

impl TagExpr {
    /// Parses an expression.
    ///
    /// # Errors
    /// `InvalidArgument` saying where it is malformed.
    pub fn parse(text: &str) -> Result<Self, ChatError> {
        if text.len() > MAX_EXPR {
            return Err(bad(format!("longer than {MAX_EXPR} bytes")));
        }
        let tokens = tokenize(text)?;
        let mut p = Parser { tokens, at: 0 };
        let e = p.or(0)?;
        if p.at < p.tokens.len() {
            return Err(bad(format!("unexpected {:?}", p.tokens[p.at])));
        }
        Ok(e)
    }

    /// Whether a buyer with these tags matches.
    pub fn matches(&self, tags: &BTreeSet<String>) -> bool {
        match self {
            TagExpr::Tag(t) => match t.strip_prefix("tier:") {
                Some(name) => tier(tags).as_str() == name,
                None => tags.contains(t),
            },
            TagExpr::And(a, b) => a.matches(tags) && b.matches(tags),
            TagExpr::Or(a, b) => a.matches(tags) || b.matches(tags),
            TagExpr::Not(a) => !a.matches(tags),
        }
    }
}

fn bad(m: String) -> ChatError {
    ChatError::InvalidArgument(format!("tag expression: {m}"))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Open,
    Close,
    And,
    Or,
    Not,
    Tag(String),
}

fn tokenize(text: &str) -> Result<Vec<Token>, ChatError> {
    let mut out = Vec::new();
    let spaced = text.replace('(', " ( ").replace(')', " ) ");
    for word in spaced.split_whitespace() {
        out.push(match word {
            "(" => Token::Open,
            ")" => Token::Close,
            w if w.eq_ignore_ascii_case("and") => Token::And,
            w if w.eq_ignore_ascii_case("or") => Token::Or,
            w if w.eq_ignore_ascii_case("not") => Token::Not,
            w => {
                let tag = w.to_ascii_lowercase();
                if let Some(t) = tag.strip_prefix("tier:") {
                    if !matches!(t, "new" | "regular" | "vip") {
                        return Err(bad(format!("tier {t:?}: use new, regular or vip")));
                    }
                } else {
                    check_tag(&tag).map_err(|_| bad(format!("{w:?} is not a tag")))?;
                }
                Token::Tag(tag)
            }
        });
    }
    if out.is_empty() {
        return Err(bad("empty".into()));
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn or(&mut self, depth: usize) -> Result<TagExpr, ChatError> {
        let mut e = self.and(depth)?;
        while self.peek() == Some(&Token::Or) {
            self.at += 1;
            e = TagExpr::Or(Box::new(e), Box::new(self.and(depth)?));
        }
        Ok(e)
    }

    fn and(&mut self, depth: usize) -> Result<TagExpr, ChatError> {
        let mut e = self.factor(depth)?;
        while self.peek() == Some(&Token::And) {
            self.at += 1;
            e = TagExpr::And(Box::new(e), Box::new(self.factor(depth)?));
        }
        Ok(e)
    }

    fn factor(&mut self, depth: usize) -> Result<TagExpr, ChatError> {
        if depth > MAX_DEPTH {
            return Err(bad(format!("nested deeper than {MAX_DEPTH}")));
        }
        let token = self.peek().cloned();
        self.at += 1;
        match token {
            Some(Token::Not) => Ok(TagExpr::Not(Box::new(self.factor(depth + 1)?))),
            Some(Token::Open) => {
                let e = self.or(depth + 1)?;
                if self.peek() != Some(&Token::Close) {
                    return Err(bad("missing )".into()));
                }
                self.at += 1;
                Ok(e)
            }
            Some(Token::Tag(t)) => Ok(TagExpr::Tag(t)),
            Some(other) => Err(bad(format!("unexpected {other:?}"))),
            None => Err(bad("ends too early".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn tiers_follow_the_documented_rules() {
        assert_eq!(tier(&tags(&[])), Tier::New);
        assert_eq!(tier(&tags(&["orders:1"])), Tier::New);
        assert_eq!(tier(&tags(&["orders:2"])), Tier::Regular);
        assert_eq!(tier(&tags(&["returning"])), Tier::Regular);
        assert_eq!(tier(&tags(&["orders:9", "spend:high"])), Tier::Vip);
        assert_eq!(tier(&tags(&["vip"])), Tier::Vip);
    }

    #[test]
    fn expressions_parse_with_and_binding_tighter_than_or() {
        let e = TagExpr::parse("vip AND size:s OR tier:regular").unwrap();
        assert!(e.matches(&tags(&["vip", "size:s"])));
        assert!(!e.matches(&tags(&["vip", "size:m"])));
        assert!(e.matches(&tags(&["returning"])));
        let e = TagExpr::parse("vip and (size:s or size:m) and not blocked").unwrap();
        assert!(e.matches(&tags(&["vip", "size:m"])));
        assert!(!e.matches(&tags(&["vip", "size:m", "blocked"])));
        assert!(
            TagExpr::parse("tier:vip")
                .unwrap()
                .matches(&tags(&["spend:high"]))
        );
    }

    #[test]
    fn malformed_expressions_and_tags_are_refused() {
        for bad in [
            "",
            "vip AND",
            "(vip",
            "vip)",
            "AND vip",
            "Vip!",
            "tier:gold",
            "vip size:s",
            &"(".repeat(20),
            &"a ".repeat(150),
        ] {
            assert!(TagExpr::parse(bad).is_err(), "{bad:?} was accepted");
        }
        for ok in ["vip", "size:s", "last_purchase:2026.11", "spend:high"] {
            check_tag(ok).unwrap();
        }
        for bad in ["", "VIP", "a b", "x:", ":x", "and", &"x".repeat(33)] {
            assert!(check_tag(bad).is_err(), "{bad:?} was accepted");
        }
    }
}

/// Striped locks that serialize tag edits of one buyer.
#[derive(Debug)]
pub(crate) struct TagLocks {
    hasher: std::collections::hash_map::RandomState,
    stripes: Vec<std::sync::Arc<tokio::sync::Mutex<()>>>,
}

impl Default for TagLocks {
    fn default() -> Self {
        Self {
            hasher: std::collections::hash_map::RandomState::new(),
            stripes: (0..64)
                .map(|_| std::sync::Arc::new(tokio::sync::Mutex::new(())))
                .collect(),
        }
    }
}
