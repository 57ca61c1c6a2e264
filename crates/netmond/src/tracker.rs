//! Which sockets opened and closed between two readings. Pure.

use crate::procnet::{Proto, Socket};
use std::collections::HashMap;

/// A socket's identity while it is open: its protocol and inode.
pub type Key = (Proto, u64);

/// The sockets open at the last reading.
#[derive(Debug, Default)]
pub struct Tracker {
    open: HashMap<Key, Socket>,
}

/// What changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Sockets not open at the last reading.
    pub opened: Vec<Socket>,
    /// Sockets open at the last reading and gone now (as last seen).
    pub closed: Vec<Socket>,
}

impl Tracker {
    /// Takes a reading: the sockets a process holds (inode not 0; one no process holds any
    /// more, such as TIME_WAIT, counts as closed) and what changed since the last one.
    pub fn update(&mut self, now: Vec<Socket>) -> Changes {
        let mut next = HashMap::with_capacity(now.len());
        let mut changes = Changes::default();
        for s in now.into_iter().filter(|s| s.inode != 0) {
            let key = (s.proto, s.inode);
            if !self.open.contains_key(&key) {
                changes.opened.push(s.clone());
            }
            next.insert(key, s);
        }
        for (key, s) in self.open.drain() {
            if !next.contains_key(&key) {
                changes.closed.push(s);
            }
        }
        self.open = next;
        changes
    }

    /// The sockets open now.
    pub fn open(&self) -> impl Iterator<Item = &Socket> {
        self.open.values()
    }

    /// How many are open.
    #[must_use]
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// None is open.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(proto: Proto, inode: u64, state: u8) -> Socket {
        Socket {
            proto,
            local: "127.0.0.1:80".parse().unwrap(),
            remote: "0.0.0.0:0".parse().unwrap(),
            state,
            uid: 0,
            inode,
        }
    }

    #[test]
    fn opens_and_closes_are_told_once() {
        let mut t = Tracker::default();
        let c = t.update(vec![s(Proto::Tcp, 1, 10), s(Proto::Udp, 1, 7)]);
        assert_eq!(
            c.opened.len(),
            2,
            "the same inode number in two protocols is two sockets"
        );
        let c = t.update(vec![s(Proto::Tcp, 1, 10), s(Proto::Udp, 1, 7)]);
        assert_eq!(c, Changes::default());
        // A state change is the same socket; TIME_WAIT (inode 0) is a close.
        let c = t.update(vec![s(Proto::Tcp, 1, 1), s(Proto::Tcp, 0, 6)]);
        assert!(c.opened.is_empty());
        assert_eq!(c.closed, vec![s(Proto::Udp, 1, 7)]);
        assert_eq!(t.len(), 1);
    }
}
