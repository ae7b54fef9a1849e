//! Every connection of every user: one user, several devices.
//!
//! Group messages reach devices through their subscriptions; this registry
//! is for what concerns the *user* rather than a group — a read mark moved
//! on the phone must clear the badge on the tablet.

use bytes::Bytes;
use dashmap::DashMap;

use crate::group::ConnId;
use crate::outbox::Outbox;

/// Connections by user id, sharded.
#[derive(Debug, Default)]
pub(crate) struct Devices {
    by_user: DashMap<String, Vec<(ConnId, Outbox)>>,
}

impl Devices {
    pub(crate) fn attach(&self, user_id: &str, conn: ConnId, outbox: Outbox) {
        let mut devices = self.by_user.entry(user_id.to_string()).or_default();
        devices.retain(|(c, _)| *c != conn);
        devices.push((conn, outbox));
    }

    pub(crate) fn detach(&self, user_id: &str, conn: ConnId) {
        self.by_user.remove_if_mut(user_id, |_, devices| {
            devices.retain(|(c, _)| *c != conn);
            devices.is_empty()
        });
    }

    /// Pushes `frame` to every connection of `user_id` but `except`.
    pub(crate) fn push_to_others(&self, user_id: &str, except: ConnId, frame: &Bytes) {
        if let Some(devices) = self.by_user.get(user_id) {
            for (conn, outbox) in devices.iter() {
                if *conn != except {
                    let _ = outbox.push(frame.clone());
                }
            }
        }
    }

    /// Pushes `frame` to every connection of `user_id`.
    pub(crate) fn push_to_all(&self, user_id: &str, frame: &Bytes) {
        if let Some(devices) = self.by_user.get(user_id) {
            for (_, outbox) in devices.iter() {
                let _ = outbox.push(frame.clone());
            }
        }
    }

    pub(crate) fn count(&self, user_id: &str) -> usize {
        self.by_user.get(user_id).map_or(0, |d| d.len())
    }
}
