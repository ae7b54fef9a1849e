//! Who is acting: users, roles and shops.

use qun_proto::v1;

/// A user's role. Buyers join groups of their own choice; agents and owners
/// are the staff of one shop; the system posts on the platform's behalf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// A shopper.
    Buyer,
    /// A merchant's customer-service agent.
    Agent,
    /// The shop's owner.
    Owner,
    /// The platform itself (commerce updates, bots).
    System,
}

impl Role {
    /// Staff of a shop: agents and owners.
    pub fn is_staff(self) -> bool {
        matches!(self, Role::Agent | Role::Owner)
    }

    /// The number kept in storage records.
    pub fn to_u32(self) -> u32 {
        self.to_proto() as u32
    }

    /// The role for a stored number; unknown numbers read as `None`.
    pub fn from_u32(n: u32) -> Option<Self> {
        i32::try_from(n)
            .ok()
            .and_then(|n| v1::Role::try_from(n).ok())
            .and_then(Self::from_proto)
    }

    /// The wire enum.
    pub fn to_proto(self) -> v1::Role {
        match self {
            Role::Buyer => v1::Role::Buyer,
            Role::Agent => v1::Role::Agent,
            Role::Owner => v1::Role::Owner,
            Role::System => v1::Role::System,
        }
    }

    /// From the wire enum; `Unspecified` has no role.
    pub fn from_proto(role: v1::Role) -> Option<Self> {
        match role {
            v1::Role::Unspecified => None,
            v1::Role::Buyer => Some(Role::Buyer),
            v1::Role::Agent => Some(Role::Agent),
            v1::Role::Owner => Some(Role::Owner),
            v1::Role::System => Some(Role::System),
        }
    }

    /// The lowercase name used in tokens and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Buyer => "buyer",
            Role::Agent => "agent",
            Role::Owner => "owner",
            Role::System => "system",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "buyer" => Ok(Role::Buyer),
            "agent" => Ok(Role::Agent),
            "owner" => Ok(Role::Owner),
            "system" => Ok(Role::System),
            other => Err(IdentityError::UnknownRole(other.to_string())),
        }
    }
}

/// Why an identity is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The role name is not buyer, agent, owner or system.
    #[error("unknown role {0:?} (expected buyer, agent or owner)")]
    UnknownRole(String),
    /// User and shop ids are 1 to 64 bytes with no control characters.
    #[error("{what} must be 1 to 64 bytes without control characters")]
    BadId {
        /// Which field.
        what: &'static str,
    },
    /// Display names are 1 to 64 characters.
    #[error("display name must be 1 to 64 characters")]
    BadName,
    /// Agents and owners belong to a shop; buyers do not.
    #[error("agents and owners need a shop id; buyers and the system have none")]
    ShopMismatch,
}

/// An authenticated user: what a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    user_id: String,
    display_name: String,
    role: Role,
    shop_id: Option<String>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && !id.chars().any(char::is_control)
}

impl Identity {
    /// Checks and builds an identity.
    ///
    /// # Errors
    /// [`IdentityError`] when an id or the name is malformed, or when the
    /// shop id is missing for staff or present for a buyer.
    pub fn new(
        user_id: impl Into<String>,
        display_name: impl Into<String>,
        role: Role,
        shop_id: Option<String>,
    ) -> Result<Self, IdentityError> {
        let user_id = user_id.into();
        let display_name = display_name.into();
        if !valid_id(&user_id) {
            return Err(IdentityError::BadId { what: "user id" });
        }
        let name_len = display_name.chars().count();
        if name_len == 0 || name_len > 64 || display_name.chars().any(char::is_control) {
            return Err(IdentityError::BadName);
        }
        match (&shop_id, role.is_staff()) {
            (Some(shop), true) if valid_id(shop) => {}
            (Some(_), true) => return Err(IdentityError::BadId { what: "shop id" }),
            (None, false) => {}
            _ => return Err(IdentityError::ShopMismatch),
        }
        Ok(Self {
            user_id,
            display_name,
            role,
            shop_id,
        })
    }

    /// The user's id.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// The name shown to others.
    pub fn display_name(&self) -> &str {
        &self.display_name
    }

    /// The user's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The shop of an agent or owner.
    pub fn shop_id(&self) -> Option<&str> {
        self.shop_id.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_through_storage_numbers() {
        for role in [Role::Buyer, Role::Agent, Role::Owner, Role::System] {
            assert_eq!(Role::from_u32(role.to_u32()), Some(role));
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert_eq!(Role::from_u32(0), None);
        assert_eq!(Role::from_u32(99), None);
    }

    #[test]
    fn identity_rules() {
        assert!(Identity::new("u1", "Ann", Role::Buyer, None).is_ok());
        assert!(Identity::new("a1", "Bo", Role::Agent, Some("shop".into())).is_ok());
        assert_eq!(
            Identity::new("a1", "Bo", Role::Agent, None),
            Err(IdentityError::ShopMismatch)
        );
        assert_eq!(
            Identity::new("u1", "Ann", Role::Buyer, Some("s".into())),
            Err(IdentityError::ShopMismatch)
        );
        assert_eq!(
            Identity::new("u\0", "Ann", Role::Buyer, None),
            Err(IdentityError::BadId { what: "user id" })
        );
        assert_eq!(
            Identity::new("u1", "", Role::Buyer, None),
            Err(IdentityError::BadName)
        );
        assert_eq!(
            Identity::new("x".repeat(65), "Ann", Role::Buyer, None),
            Err(IdentityError::BadId { what: "user id" })
        );
    }
}
