//! The inode table: a stable number for every node the kernel has been shown.
//!
//! An entry file's identity includes its blob's SHA-512, so when a name comes to show a
//! newer blob the kernel sees a new inode, and page-cache contents kept for the old one
//! (`FOPEN_KEEP_CACHE`) can never be served for the new content.

use crate::digest::Sha512;
use std::collections::HashMap;
use std::sync::Arc;

/// The root's inode number (FUSE's).
pub const ROOT_INO: u64 = 1;

/// What an inode stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Node {
    Root,
    /// `/.sha512`
    ShaDir,
    /// `/<key>`
    Key(String),
    /// `/<key>/<name>` showing one blob.
    Entry {
        key: String,
        name: String,
        sha: Sha512,
    },
    /// `/<key>/latest`
    Latest(String),
    /// `/<key>/.entries.json`
    EntriesJson(String),
    /// `/.sha512/<hex>`
    Blob(Sha512),
    /// A file written into a key directory, staged in the outbox (by item id).
    Staged(String),
}

/// Node ↔ inode number. Numbers are never reused within a mount. Each node is held
/// once, shared by both maps (a big key's entries are 20,000 nodes).
#[derive(Debug)]
pub struct Inodes {
    by_node: HashMap<Arc<Node>, u64>,
    by_ino: HashMap<u64, Arc<Node>>,
    next: u64,
}

impl Default for Inodes {
    fn default() -> Self {
        let mut t = Inodes {
            by_node: HashMap::new(),
            by_ino: HashMap::new(),
            next: ROOT_INO + 1,
        };
        let root = Arc::new(Node::Root);
        t.by_node.insert(root.clone(), ROOT_INO);
        t.by_ino.insert(ROOT_INO, root);
        t
    }
}

impl Inodes {
    /// The inode of a node, allocated on first use.
    pub fn ino(&mut self, node: &Node) -> u64 {
        if let Some(i) = self.by_node.get(node) {
            return *i;
        }
        let i = self.next;
        self.next += 1;
        let node = Arc::new(node.clone());
        self.by_node.insert(node.clone(), i);
        self.by_ino.insert(i, node);
        i
    }

    pub fn node(&self, ino: u64) -> Option<&Node> {
        self.by_ino.get(&ino).map(|n| &**n)
    }

    /// The inode of a node the kernel was already shown, without allocating one.
    pub fn known(&self, node: &Node) -> Option<u64> {
        self.by_node.get(node).copied()
    }

    /// Retires `ino`: it keeps standing for its node (open handles, the kernel's
    /// questions about it), but the next lookup of that node gets a new number. Used
    /// when the file behind a node changed in a way the kernel cannot be told about
    /// for the old inode (a passthrough backing file still held by older opens).
    pub fn retire(&mut self, ino: u64) {
        if let Some(node) = self.by_ino.get(&ino) {
            if self.by_node.get(&**node) == Some(&ino) {
                self.by_node.remove(&**node);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_numbers_and_new_inode_for_new_content() {
        let mut t = Inodes::default();
        assert_eq!(t.ino(&Node::Root), ROOT_INO);
        let a = Node::Entry {
            key: "k".into(),
            name: "f".into(),
            sha: Sha512::of(b"1"),
        };
        let b = Node::Entry {
            key: "k".into(),
            name: "f".into(),
            sha: Sha512::of(b"2"),
        };
        let ia = t.ino(&a);
        assert_eq!(t.ino(&a), ia);
        assert_ne!(t.ino(&b), ia);
        assert_eq!(t.node(ia), Some(&a));
        assert_eq!(t.node(999), None);
        assert_eq!(t.known(&a), Some(ia));
        t.retire(ia);
        assert_eq!(t.known(&a), None);
        assert_eq!(t.node(ia), Some(&a), "a retired inode still answers");
        let again = t.ino(&a);
        assert!(again != ia && again != t.ino(&b));
        t.retire(ia);
        assert_eq!(t.known(&a), Some(again), "retiring twice keeps the new one");
    }
}
