//! What nodes say to each other, carried as pfs-transport messages (postcard-encoded).

use serde::{Deserialize, Serialize};

use crate::error::RemoteError;

/// Version of this message set; a node ignores messages of another version.
pub(crate) const VERSION: u8 = 1;

/// Where a region belongs in a striped array.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StripeInfo {
    /// The array's name.
    pub array: String,
    /// This stripe's index.
    pub index: u32,
    /// Number of stripes.
    pub count: u32,
    /// Logical length of the whole array in bytes.
    pub total_len: u64,
    /// Length of every stripe (the last may hold fewer logical bytes).
    pub stripe_len: u64,
}

/// One line of the region directory: a name and where its region lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DirEntry {
    pub name: String,
    pub owner: u64,
    pub addr: String,
    /// The region key in its string form.
    pub key: String,
    pub size: u64,
    pub rights: u8,
    /// When the owner exported it (ms since the epoch): the tie-breaker of conflicts.
    pub created_ms: u64,
    /// Set when the owner withdrew the name.
    pub removed: bool,
    pub stripe: Option<StripeInfo>,
}

/// Requests one node makes of another.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Request {
    /// Run `task` on the range of the named region (authorised by its key).
    Task {
        name: String,
        key: String,
        offset: u64,
        len: u64,
        task: String,
        args: Vec<u8>,
    },
    /// Write a range of the named local region into another node's region.
    Copy {
        name: String,
        key: String,
        offset: u64,
        len: u64,
        dst_addr: String,
        dst_key: String,
        dst_offset: u64,
    },
    /// Allocate and export a region here.
    Export {
        name: String,
        size: u64,
        rights: u8,
        stripe: Option<StripeInfo>,
    },
}

impl Request {
    pub(crate) fn what(&self) -> String {
        match self {
            Request::Task { name, task, .. } => format!("task {task:?} on {name:?}"),
            Request::Copy { name, .. } => format!("copy out of {name:?}"),
            Request::Export { name, .. } => format!("export of {name:?}"),
        }
    }
}

/// Everything that travels between nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Msg {
    /// A SWIM datagram for foca.
    Gossip(Vec<u8>),
    /// Directory entries the sender owns (sent to members that just came up).
    Directory(Vec<DirEntry>),
    Request {
        id: u64,
        req: Request,
    },
    Response {
        id: u64,
        result: Result<Vec<u8>, RemoteError>,
    },
}

pub(crate) fn encode(msg: &Msg) -> Vec<u8> {
    let mut out = vec![VERSION];
    // Encoding into a Vec cannot fail for these types.
    out.extend(postcard::to_allocvec(msg).unwrap_or_default());
    out
}

pub(crate) fn decode(data: &[u8]) -> Option<Msg> {
    match data.split_first() {
        Some((&VERSION, rest)) => postcard::from_bytes(rest).ok(),
        _ => None,
    }
}

pub(crate) fn to_bytes<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).unwrap_or_default()
}

pub(crate) fn from_bytes<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Option<T> {
    postcard::from_bytes(b).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let m = Msg::Request {
            id: 42,
            req: Request::Task {
                name: "n".into(),
                key: "k".into(),
                offset: 8,
                len: 16,
                task: "t".into(),
                args: vec![1, 2, 3],
            },
        };
        let b = encode(&m);
        assert_eq!(b[0], VERSION);
        match decode(&b) {
            Some(Msg::Request {
                id: 42,
                req: Request::Task { args, .. },
            }) => {
                assert_eq!(args, [1, 2, 3])
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_and_other_versions_are_ignored_without_panicking() {
        assert!(decode(&[]).is_none());
        let mut b = encode(&Msg::Gossip(vec![9; 10]));
        b[0] = VERSION + 1;
        assert!(decode(&b).is_none());
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for len in 0..2000usize {
            let mut buf = vec![VERSION];
            for _ in 0..len % 97 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            let _ = decode(&buf);
            let _ = from_bytes::<DirEntry>(&buf[1..]);
        }
    }
}
