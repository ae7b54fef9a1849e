//! A shop's products, their validation, and which groups hold their cards.

use std::collections::BTreeSet;

use qun_proto::v1;

use super::MAX_MONEY_MINOR;
use crate::ChatError;

/// A product as loaded, with the groups that hold a card of it. Kept in a
/// sharded map: an update bumps the version and copies `groups` under the
/// entry's lock, and a card registers its group under the same lock, so no
/// card misses an update.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProductSlot {
    pub(crate) product: Option<v1::Product>,
    pub(crate) groups: BTreeSet<u64>,
}

/// The key of a product in the map: shop and product id never hold NUL.
pub(crate) fn slot_key(shop_id: &str, product_id: &str) -> String {
    format!("{shop_id}\0{product_id}")
}

fn invalid(msg: String) -> ChatError {
    ChatError::InvalidArgument(msg)
}

/// An id: 1 to `max` bytes, no control characters (so no NUL).
pub(crate) fn check_id(what: &str, id: &str, max: usize) -> Result<(), ChatError> {
    if id.is_empty() || id.len() > max || id.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{what} must be 1 to {max} bytes without control characters"
        )));
    }
    Ok(())
}

/// Display text: trimmed, 1 to `max` characters, no control characters.
pub(crate) fn check_text(what: &str, text: &mut String, max: usize) -> Result<(), ChatError> {
    let trimmed = text.trim();
    let n = trimmed.chars().count();
    if n == 0 || n > max || trimmed.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{what} must be 1 to {max} characters without control characters"
        )));
    }
    *text = trimmed.to_string();
    Ok(())
}

/// Money in minor units: `min` to 10^12.
pub(crate) fn check_money(what: &str, minor: i64, min: i64) -> Result<(), ChatError> {
    if !(min..=MAX_MONEY_MINOR).contains(&minor) {
        return Err(invalid(format!(
            "{what} must be {min} to {MAX_MONEY_MINOR} minor units, not {minor}"
        )));
    }
    Ok(())
}

/// An ISO 4217 code; empty becomes CNY.
pub(crate) fn check_currency(currency: &mut String) -> Result<(), ChatError> {
    if currency.is_empty() {
        "CNY".clone_into(currency);
    }
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(invalid(format!(
            "currency must be an ISO 4217 code of three capital letters, not {currency:?}"
        )));
    }
    Ok(())
}

/// Optional URL: empty, or http(s) of at most 1,024 bytes without spaces.
pub(crate) fn check_url(what: &str, url: &str) -> Result<(), ChatError> {
    if url.is_empty() {
        return Ok(());
    }
    let scheme_ok = url.starts_with("https://") || url.starts_with("http://");
    if !scheme_ok || url.len() > 1024 || url.chars().any(|c| c.is_control() || c == ' ') {
        return Err(invalid(format!(
            "{what} must be an http(s) URL of at most 1024 bytes"
        )));
    }
    Ok(())
}

/// Checks and normalizes a product from a merchant; the server's fields
/// (shop, version, time) are set by the caller.
pub(crate) fn validate(p: &mut v1::Product) -> Result<(), ChatError> {
    check_id("product_id", &p.product_id, 64)?;
    check_text("title", &mut p.title, 128)?;
    check_money("price_minor", p.price_minor, 0)?;
    check_money("member_price_minor", p.member_price_minor, 0)?;
    if p.member_price_minor > p.price_minor {
        return Err(invalid(format!(
            "member_price_minor {} is above price_minor {}",
            p.member_price_minor, p.price_minor
        )));
    }
    check_currency(&mut p.currency)?;
    check_url("image_url", &p.image_url)?;
    check_url("link", &p.link)?;
    Ok(())
}

/// Whether two products show the same thing (the server's fields aside).
pub(crate) fn same_content(a: &v1::Product, b: &v1::Product) -> bool {
    let strip = |p: &v1::Product| v1::Product {
        version: 0,
        updated_at_ms: 0,
        ..p.clone()
    };
    strip(a) == strip(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product() -> v1::Product {
        v1::Product {
            product_id: "sku-1".into(),
            title: "  Trail shoe ".into(),
            price_minor: 39_900,
            member_price_minor: 35_900,
            ..Default::default()
        }
    }

    #[test]
    fn a_good_product_is_normalized() {
        let mut p = product();
        validate(&mut p).unwrap();
        assert_eq!(
            (p.title.as_str(), p.currency.as_str()),
            ("Trail shoe", "CNY")
        );
    }

    #[test]
    fn bad_products_are_refused_with_the_field_named() {
        type Spoil = fn(&mut v1::Product);
        let cases: Vec<(&str, Spoil)> = vec![
            ("price_minor", |p| p.price_minor = -1),
            ("price_minor", |p| p.price_minor = MAX_MONEY_MINOR + 1),
            ("member_price_minor", |p| {
                p.member_price_minor = p.price_minor + 1
            }),
            ("currency", |p| p.currency = "yuan".into()),
            ("title", |p| p.title = " ".into()),
            ("product_id", |p| p.product_id = "a\0b".into()),
            ("image_url", |p| p.image_url = "javascript:alert(1)".into()),
        ];
        for (field, spoil) in cases {
            let mut p = product();
            spoil(&mut p);
            let e = validate(&mut p).unwrap_err();
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn same_content_ignores_the_servers_fields() {
        let a = product();
        let mut b = a.clone();
        b.version = 9;
        assert!(same_content(&a, &b));
        b.price_minor += 1;
        assert!(!same_content(&a, &b));
    }
}
