//! Striped arrays: one logical buffer over the regions of several nodes.

use crate::buffer::SharedBuffer;
use crate::builtin;
use crate::error::{Error, Result};
use crate::node::Node;
use crate::wire::{self, DirEntry, Request, StripeInfo};

/// One logical buffer striped over regions on several nodes — the cluster's "unified
/// memory space". Byte `o` of the array lives in stripe `o / stripe_len`, at offset
/// `o % stripe_len` of that stripe's region (named `name#i`).
///
/// Reads and writes take global offsets and are split across stripes; a range past the
/// array's end is refused before anything moves. [`map_reduce`](StripedArray::map_reduce)
/// runs a task at every stripe's owner in parallel.
#[derive(Debug, Clone)]
pub struct StripedArray {
    name: String,
    len: u64,
    stripe_len: u64,
    stripes: Vec<SharedBuffer>,
}

/// What is wrong with a striped array's layout as a directory entry describes it
/// (`None`: nothing): stripes a positive multiple of 8 bytes long, at least one, that
/// together cover the array's length.
fn layout_problem(s: &StripeInfo) -> Option<String> {
    if s.stripe_len == 0 || !s.stripe_len.is_multiple_of(8) {
        return Some(format!(
            "a stripe length of {} bytes (a positive multiple of 8 is made)",
            s.stripe_len
        ));
    }
    if s.count == 0 || s.total_len == 0 {
        return Some(format!(
            "{} stripes for {} bytes (an array has bytes and stripes)",
            s.count, s.total_len
        ));
    }
    // Stripes past the array's end (a short array over many nodes) hold nothing.
    let covered = u64::from(s.count).checked_mul(s.stripe_len);
    if covered.is_none_or(|c| c < s.total_len) {
        return Some(format!(
            "{} stripes of {} bytes for an array of {} bytes (they must cover it)",
            s.count, s.stripe_len, s.total_len
        ));
    }
    None
}

impl StripedArray {
    /// Refuse an empty array, no nodes, and a name holding the stripe separator.
    fn validate(name: &str, len: u64, nodes: usize) -> Result<()> {
        if len == 0 || nodes == 0 {
            return Err(Error::InvalidArgument(format!(
                "striped array {name:?} needs a length and a node count of at least 1 \
                 (got {len} bytes over {nodes} nodes)"
            )));
        }
        if name.contains('#') {
            return Err(Error::InvalidArgument(format!(
                "striped array names may not contain '#' (it separates the stripe index): {name:?}"
            )));
        }
        Ok(())
    }

    pub(crate) fn create(node: &Node, name: &str, len: u64, nodes: usize) -> Result<StripedArray> {
        Self::validate(name, len, nodes)?;
        let mut hosts: Vec<u64> = vec![node.inner.id];
        hosts.extend(node.members().into_iter().map(|m| m.id));
        hosts.sort();
        if hosts.len() < nodes {
            return Err(Error::InvalidArgument(format!(
                "striped array {name:?} over {nodes} nodes: only {} nodes are up",
                hosts.len()
            )));
        }
        hosts.truncate(nodes);
        Self::create_on(node, name, len, &hosts)
    }

    pub(crate) fn create_on(
        node: &Node,
        name: &str,
        len: u64,
        hosts: &[u64],
    ) -> Result<StripedArray> {
        let nodes = hosts.len();
        Self::validate(name, len, nodes)?;
        let inner = &node.inner;
        let up: std::collections::HashMap<u64, String> =
            node.members().into_iter().map(|m| (m.id, m.addr)).collect();
        let mut placed = Vec::with_capacity(nodes);
        for &id in hosts {
            if id == inner.id {
                placed.push((id, inner.addr.clone()));
            } else if let Some(addr) = up.get(&id) {
                placed.push((id, addr.clone()));
            } else {
                return Err(Error::InvalidArgument(format!(
                    "striped array {name:?}: node {id:016x} is not a member that is up"
                )));
            }
        }
        let count = nodes as u64;
        let stripe_len = len.div_ceil(count).div_ceil(8) * 8;
        let mut stripes = Vec::with_capacity(nodes);
        for (i, (id, addr)) in placed.into_iter().enumerate() {
            let sname = format!("{name}#{i}");
            let info = StripeInfo {
                array: name.to_string(),
                index: i as u32,
                count: nodes as u32,
                total_len: len,
                stripe_len,
            };
            let rights = pfs_transport::Rights::ALL;
            let entry = if id == inner.id {
                inner.export(&sname, stripe_len, rights, Some(info))?
            } else {
                let req = Request::Export {
                    name: sname.clone(),
                    size: stripe_len,
                    rights: rights.bits(),
                    stripe: Some(info),
                };
                let bytes = inner.request(&addr, id, &sname, req, inner.cfg.op_timeout)?;
                let e: DirEntry = wire::from_bytes(&bytes).ok_or_else(|| Error::Remote {
                    node: id,
                    what: format!("export of {sname:?}"),
                    message: "undecodable answer".into(),
                })?;
                inner.lock_state().merge(e.clone());
                e
            };
            stripes.push(SharedBuffer::new(inner.clone(), entry)?);
        }
        Ok(StripedArray {
            name: name.to_string(),
            len,
            stripe_len,
            stripes,
        })
    }

    pub(crate) fn open(node: &Node, name: &str) -> Result<StripedArray> {
        let inner = &node.inner;
        let entries: Vec<DirEntry> = {
            let st = inner.lock_state();
            st.dir
                .values()
                .filter(|e| !e.removed && e.stripe.as_ref().is_some_and(|s| s.array == name))
                .cloned()
                .collect()
        };
        let Some((first, owner)) = entries
            .first()
            .and_then(|e| e.stripe.clone().map(|s| (s, e.owner)))
        else {
            return Err(Error::NotFound {
                name: name.to_string(),
                known: node.names().len(),
            });
        };
        // The layout comes from the directory, which peers fill: check it before it
        // sizes anything or indexes the stripes.
        layout_problem(&first).map_or(Ok(()), |why| {
            Err(Error::Remote {
                node: owner,
                what: format!("the layout of striped array {name:?}"),
                message: why,
            })
        })?;
        if first.count as usize > entries.len() {
            return Err(Error::NotFound {
                name: format!(
                    "{name} ({} of its {} stripes known here)",
                    entries.len(),
                    first.count
                ),
                known: node.names().len(),
            });
        }
        let mut slots: Vec<Option<DirEntry>> = vec![None; first.count as usize];
        for e in entries {
            let s = e.stripe.as_ref().expect("filtered");
            if s.count == first.count
                && s.total_len == first.total_len
                && s.stripe_len == first.stripe_len
                && e.size >= first.stripe_len
                && let Some(slot) = slots.get_mut(s.index as usize)
            {
                *slot = Some(e);
            }
        }
        let missing: Vec<String> = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_none())
            .map(|(i, _)| format!("{name}#{i}"))
            .collect();
        if !missing.is_empty() {
            return Err(Error::NotFound {
                name: format!("{name} (stripes {} not yet known here)", missing.join(", ")),
                known: node.names().len(),
            });
        }
        let stripes = slots
            .into_iter()
            .map(|e| SharedBuffer::new(inner.clone(), e.expect("checked")))
            .collect::<Result<Vec<_>>>()?;
        Ok(StripedArray {
            name: name.to_string(),
            len: first.total_len,
            stripe_len: first.stripe_len,
            stripes,
        })
    }

    /// The array's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Logical length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the array is empty (never).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Length of each stripe's region (a multiple of 8).
    pub fn stripe_len(&self) -> u64 {
        self.stripe_len
    }

    /// The stripes, in order.
    pub fn stripes(&self) -> &[SharedBuffer] {
        &self.stripes
    }

    /// The logical bytes stripe `i` holds: `start..end` in global offsets.
    pub fn stripe_range(&self, i: usize) -> std::ops::Range<u64> {
        let start = (i as u64 * self.stripe_len).min(self.len);
        start..(start + self.stripe_len).min(self.len)
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        Error::check_range(&self.name, offset, len, self.len)
    }

    /// Pieces of `offset..offset+len`: (stripe, offset in stripe, offset in the range,
    /// length).
    fn pieces(&self, offset: u64, len: u64) -> Vec<(usize, u64, u64, u64)> {
        let mut v = Vec::new();
        let mut done = 0u64;
        while done < len {
            let g = offset + done;
            let i = (g / self.stripe_len) as usize;
            let at = g % self.stripe_len;
            let n = (self.stripe_len - at).min(len - done);
            v.push((i, at, done, n));
            done += n;
        }
        v
    }

    /// Copy `buf.len()` bytes at global `offset` out of the array.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        for (i, at, from, n) in self.pieces(offset, buf.len() as u64) {
            self.stripes[i].read(at, &mut buf[from as usize..(from + n) as usize])?;
        }
        Ok(())
    }

    /// Write `data` at global `offset`. A bad range writes nothing; an owner failing
    /// during the write may leave the stripes before it written.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        let pieces = self.pieces(offset, data.len() as u64);
        for (i, _, _, _) in &pieces {
            if !self.stripes[*i]
                .rights()
                .contains(pfs_transport::Rights::WRITE)
            {
                return Err(Error::ReadOnly {
                    name: self.name.clone(),
                    op: "write",
                    held: "read-only".into(),
                });
            }
        }
        for (i, at, from, n) in pieces {
            self.stripes[i].write(at, &data[from as usize..(from + n) as usize])?;
        }
        Ok(())
    }

    /// Read `count` u64s from global element `index`.
    pub fn read_u64s(&self, index: u64, count: usize) -> Result<Vec<u64>> {
        let (o, l) = self.elems(index, count as u64)?;
        let mut bytes = vec![0u8; l as usize];
        self.read(o, &mut bytes)?;
        Ok(builtin::decode_u64s(&bytes))
    }

    /// Write `values` from global element `index`.
    pub fn write_u64s(&self, index: u64, values: &[u64]) -> Result<()> {
        let (o, _) = self.elems(index, values.len() as u64)?;
        self.write(o, &builtin::encode_u64s(values))
    }

    fn elems(&self, index: u64, count: u64) -> Result<(u64, u64)> {
        let (o, l) = Error::elem_range(&self.name, index, count, self.len)?;
        self.check(o, l)?;
        Ok((o, l))
    }

    /// Run `task` with `args` at every stripe's owner, in parallel, over the logical
    /// bytes of each stripe; one result per stripe, in order (a failed stripe does not
    /// keep the others from completing).
    pub fn map(&self, task: &str, args: &[u8]) -> Vec<Result<Vec<u8>>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = self
                .stripes
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let r = self.stripe_range(i);
                    let local = 0..(r.end - r.start);
                    s.spawn(move || b.dispatch_range(local, task, args))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::InvalidArgument("a dispatch thread panicked".into()))
                    })
                })
                .collect()
        })
    }

    /// [`map`](StripedArray::map), then fold the results in stripe order; the first
    /// failed stripe's error if any failed.
    pub fn map_reduce<R>(
        &self,
        task: &str,
        args: &[u8],
        init: R,
        mut fold: impl FnMut(R, Vec<u8>) -> R,
    ) -> Result<R> {
        let mut acc = init;
        for r in self.map(task, args) {
            acc = fold(acc, r?);
        }
        Ok(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeConfig;

    fn info(count: u32, total_len: u64, stripe_len: u64) -> StripeInfo {
        StripeInfo {
            array: "arr".into(),
            index: 0,
            count,
            total_len,
            stripe_len,
        }
    }

    #[test]
    fn layouts_that_would_index_or_size_wrongly_are_refused() {
        // What `create` makes: 10,001 u64s over 3 nodes; 10 bytes over 4 (stripes past
        // the end hold nothing).
        assert_eq!(layout_problem(&info(3, 80_008, 26_672)), None);
        assert_eq!(layout_problem(&info(4, 10, 8)), None);
        for bad in [
            info(1, 8, 0),
            info(1, 8, 12),
            info(0, 8, 8),
            info(1, 0, 8),
            info(2, 1 << 20, 8),
            info(u32::MAX, u64::MAX, u64::MAX - 7),
        ] {
            assert!(layout_problem(&bad).is_some(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_forged_directory_entry_fails_open_striped_and_panics_nothing() {
        // Directory entries come from peers. One that re-announces a stripe with a
        // newer time and another layout must not size or index anything by it.
        let node = Node::start(NodeConfig::new("tcp://127.0.0.1:0")).unwrap();
        let arr = node.create_striped("arr", 8192, 1).unwrap();
        assert_eq!(arr.stripes().len(), 1);
        let real = {
            let st = node.inner.lock_state();
            st.dir
                .values()
                .find(|e| e.stripe.is_some())
                .cloned()
                .expect("the stripe's entry")
        };
        let forgeries = [
            (1, 1 << 20, 8192),  // longer than its stripes cover
            (1, 8192, 0),        // no stripe length
            (u32::MAX, 8192, 8), // four billion stripes
        ];
        for (i, (count, total_len, stripe_len)) in forgeries.into_iter().enumerate() {
            let mut e = real.clone();
            e.created_ms += 1 + i as u64;
            let s = e.stripe.as_mut().expect("stripe");
            (s.count, s.total_len, s.stripe_len) = (count, total_len, stripe_len);
            node.inner.lock_state().merge(e);
            let r = node.open_striped("arr");
            assert!(
                r.is_err(),
                "forged layout {count} × {stripe_len} for {total_len} bytes opened"
            );
        }
        node.shutdown();
    }
}
