//! Membership and failure detection: foca (SWIM) driven by one thread per node, its
//! datagrams carried as pfs-transport messages, and the region directory replicated
//! through foca's custom broadcasts.

use std::collections::{HashMap, HashSet};
use std::num::{NonZeroU8, NonZeroUsize};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use foca::{BroadcastHandler, Foca, Identity, Invalidates, Notification, PostcardCodec, Timer};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};

use crate::node::Inner;
use crate::wire::{self, DirEntry, Msg};

/// A member's identity as foca sees it: node id, address, and start time (a process
/// restarted at the same address wins the address over its dead predecessor).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct Peer {
    pub id: u64,
    pub addr: String,
    pub started_ms: u64,
}

impl Identity for Peer {
    type Addr = String;

    /// A node the cluster wrongly declared down (it was paused, or its packets were
    /// lost) rejoins under a renewed identity: same node id and address, later start
    /// stamp. Its regions become reachable again when the others see it up.
    fn renew(&self) -> Option<Self> {
        Some(Peer {
            started_ms: self.started_ms + 1,
            ..self.clone()
        })
    }

    fn addr(&self) -> String {
        self.addr.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.started_ms, self.id) > (adversary.started_ms, adversary.id)
    }
}

/// What this node knows about the cluster.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Members seen up: id → (address, start stamp of the identity seen up).
    pub up: HashMap<u64, (String, u64)>,
    /// Members declared down.
    pub down: HashSet<u64>,
    /// The directory replica: name → entry.
    pub dir: HashMap<String, DirEntry>,
}

impl State {
    pub(crate) fn is_down(&self, id: u64) -> bool {
        self.down.contains(&id)
    }

    /// Merge an entry into the replica; returns whether it changed anything.
    ///
    /// Rules: the same owner's newer announcement replaces its older one (a removal is
    /// newer than the export it removes); between different owners, an entry whose
    /// owner is down or that was removed gives way; otherwise the earliest export (by
    /// its timestamp, then owner id) keeps the name.
    pub(crate) fn merge(&mut self, e: DirEntry) -> bool {
        let replace = match self.dir.get(&e.name) {
            None => true,
            Some(x) if *x == e => false,
            Some(x) if x.owner == e.owner => (e.created_ms, e.removed) > (x.created_ms, x.removed),
            Some(x) => {
                let x_gone = x.removed || self.is_down(x.owner);
                let e_gone = e.removed || self.is_down(e.owner);
                if x_gone != e_gone {
                    x_gone
                } else {
                    (e.created_ms, e.owner) < (x.created_ms, x.owner)
                }
            }
        };
        if replace {
            self.dir.insert(e.name.clone(), e);
        }
        replace
    }
}

/// Identifies a directory broadcast for foca's dissemination backlog.
#[derive(Debug)]
pub(crate) struct DirKey {
    name: String,
    owner: u64,
    version: (u64, bool),
}

impl Invalidates for DirKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.name == other.name && self.owner == other.owner && self.version >= other.version
    }
}

/// A directory broadcast that did not decode.
#[derive(Debug)]
pub(crate) struct BadBroadcast;

impl std::fmt::Display for BadBroadcast {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("malformed directory broadcast")
    }
}

impl std::error::Error for BadBroadcast {}

/// Feeds directory broadcasts into the replica.
pub(crate) struct DirHandler {
    state: Arc<Mutex<State>>,
}

impl BroadcastHandler<Peer> for DirHandler {
    type Key = DirKey;
    type Error = BadBroadcast;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&Peer>,
    ) -> Result<Option<DirKey>, BadBroadcast> {
        let e: DirEntry = wire::from_bytes(data).ok_or(BadBroadcast)?;
        let key = DirKey {
            name: e.name.clone(),
            owner: e.owner,
            version: (e.created_ms, e.removed),
        };
        let mut st = self.state.lock().expect("state lock poisoned");
        let changed = st.merge(e);
        // Our own announcements (no sender) are always disseminated.
        Ok((changed || sender.is_none()).then_some(key))
    }
}

/// Commands for the membership thread.
#[derive(Debug)]
pub(crate) enum Event {
    /// A SWIM datagram from the network.
    Gossip(Vec<u8>),
    /// A directory entry to disseminate.
    Broadcast(Vec<u8>),
    /// Leave the cluster and stop.
    Stop,
}

#[derive(Default)]
struct Rt {
    sends: Vec<(Peer, Vec<u8>)>,
    timers: Vec<(Timer<Peer>, Duration)>,
    notes: Vec<foca::OwnedNotification<Peer>>,
}

impl foca::Runtime<Peer> for Rt {
    fn notify(&mut self, n: Notification<'_, Peer>) {
        self.notes.push(n.to_owned());
    }

    fn send_to(&mut self, to: Peer, data: &[u8]) {
        self.sends.push((to, data.to_vec()));
    }

    fn submit_after(&mut self, event: Timer<Peer>, after: Duration) {
        self.timers.push((event, after));
    }
}

/// How often membership gossip goes out (and so how fast a down member is known).
pub(crate) const GOSSIP_EVERY: Duration = Duration::from_millis(100);
/// How often a node that has no members yet announces itself to its seeds again.
const REJOIN_EVERY: Duration = Duration::from_millis(500);

fn foca_config(inner: &Inner) -> foca::Config {
    let fd = inner.cfg.failure_detection;
    let mut c = foca::Config::simple();
    c.probe_period = fd.probe_period;
    c.probe_rtt = fd.probe_rtt;
    c.suspect_to_down_after = fd.suspect_to_down;
    c.num_indirect_probes = NonZeroUsize::new(2).expect("nonzero");
    c.max_transmissions = NonZeroU8::new(12).expect("nonzero");
    c.max_packet_size = NonZeroUsize::new(MAX_PACKET).expect("nonzero");
    c.remove_down_after = Duration::from_secs(120);
    c.notify_down_members = true;
    c.periodic_gossip = Some(foca::PeriodicParams {
        frequency: GOSSIP_EVERY,
        num_members: NonZeroUsize::new(3).expect("nonzero"),
    });
    c.periodic_announce = Some(foca::PeriodicParams {
        frequency: Duration::from_secs(5),
        num_members: NonZeroUsize::new(1).expect("nonzero"),
    });
    c
}

/// Largest SWIM datagram (one pfs-transport message; the transport segments it).
pub(crate) const MAX_PACKET: usize = 8192;

/// The membership thread: runs foca until told to stop.
pub(crate) fn run(inner: Arc<Inner>, rx: Receiver<Event>) {
    let me = Peer {
        id: inner.id,
        addr: inner.addr.clone(),
        started_ms: inner.started_ms,
    };
    let rng = SmallRng::seed_from_u64(inner.id ^ inner.started_ms);
    let mut foca = Foca::with_custom_broadcast(
        me,
        foca_config(&inner),
        rng,
        PostcardCodec,
        DirHandler {
            state: inner.state.clone(),
        },
    );
    let mut rt = Rt::default();
    let mut timers: Vec<(Instant, Timer<Peer>)> = Vec::new();
    let seeds: Vec<Peer> = inner
        .cfg
        .seeds
        .iter()
        .filter(|s| **s != inner.addr)
        .map(|s| Peer {
            id: 0,
            addr: s.clone(),
            started_ms: 0,
        })
        .collect();
    let mut last_join = Instant::now() - REJOIN_EVERY;
    loop {
        if foca.iter_members().next().is_none()
            && !seeds.is_empty()
            && last_join.elapsed() >= REJOIN_EVERY
        {
            for s in &seeds {
                if let Err(e) = foca.announce(s.clone(), &mut rt) {
                    tracing::debug!("announce to {}: {e}", s.addr);
                }
            }
            last_join = Instant::now();
        }
        flush(&inner, &mut rt, &mut timers);
        let now = Instant::now();
        let next = timers
            .iter()
            .map(|(at, _)| *at)
            .min()
            .unwrap_or(now + REJOIN_EVERY)
            .min(now + REJOIN_EVERY);
        match rx.recv_timeout(next.saturating_duration_since(now)) {
            Ok(Event::Gossip(d)) => {
                if let Err(e) = foca.handle_data(&d, &mut rt) {
                    tracing::trace!("membership datagram ignored: {e}");
                }
            }
            Ok(Event::Broadcast(d)) => {
                if let Err(e) = foca.add_broadcast(&d) {
                    tracing::warn!("directory broadcast not queued: {e}");
                }
                // Spread it now rather than at the next periodic gossip.
                let _ = foca.gossip(&mut rt);
            }
            Ok(Event::Stop) | Err(RecvTimeoutError::Disconnected) => {
                let _ = foca.leave_cluster(&mut rt);
                // Leaving makes foca report this node down to itself: not news.
                rt.notes.clear();
                flush(&inner, &mut rt, &mut timers);
                return;
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        let mut due = Vec::new();
        timers.retain(|(at, t)| {
            if *at <= now {
                due.push(t.clone());
                false
            } else {
                true
            }
        });
        for t in due {
            if let Err(e) = foca.handle_timer(t, &mut rt) {
                tracing::debug!("membership timer: {e}");
            }
        }
    }
}

fn flush(inner: &Arc<Inner>, rt: &mut Rt, timers: &mut Vec<(Instant, Timer<Peer>)>) {
    let now = Instant::now();
    for (t, after) in rt.timers.drain(..) {
        timers.push((now + after, t));
    }
    for (to, data) in rt.sends.drain(..) {
        inner.post(&to.addr, wire::encode(&Msg::Gossip(data)));
    }
    for n in rt.notes.drain(..) {
        use foca::OwnedNotification as N;
        match n {
            N::MemberUp(p) => member_up(inner, &p),
            N::MemberDown(p) => member_down(inner, &p),
            N::Rename(old, new) => {
                member_down(inner, &old);
                member_up(inner, &new);
            }
            N::Defunct => tracing::warn!(
                "node {:016x} was declared down by the cluster; rejoining",
                inner.id
            ),
            N::Rejoin(p) => tracing::info!("node {:016x} rejoined the cluster as {p:?}", inner.id),
            other => tracing::debug!("membership: {other:?}"),
        }
    }
}

fn member_up(inner: &Arc<Inner>, p: &Peer) {
    tracing::debug!(node = %format_args!("{:016x}", inner.id), "member up: {:016x} at {}", p.id, p.addr);
    let own: Vec<DirEntry> = {
        let mut st = inner.state.lock().expect("state lock poisoned");
        if st.up.get(&p.id).is_some_and(|(_, s)| *s > p.started_ms) {
            return;
        }
        st.down.remove(&p.id);
        st.up.insert(p.id, (p.addr.clone(), p.started_ms));
        st.dir
            .values()
            .filter(|e| e.owner == inner.id)
            .cloned()
            .collect()
    };
    // A member that joins late missed earlier broadcasts: each owner tells it its own
    // entries, so no single node's directory is needed.
    if !own.is_empty() {
        inner.post(&p.addr, wire::encode(&Msg::Directory(own)));
    }
}

fn member_down(inner: &Arc<Inner>, p: &Peer) {
    tracing::info!(node = %format_args!("{:016x}", inner.id), "member down: {:016x} at {}", p.id, p.addr);
    {
        let mut st = inner.state.lock().expect("state lock poisoned");
        // An older identity of a node that already rejoined going down changes nothing.
        if st.up.get(&p.id).is_some_and(|(_, s)| *s > p.started_ms) {
            return;
        }
        st.up.remove(&p.id);
        st.down.insert(p.id);
    }
    inner.drop_connection(&p.addr, p.id);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, owner: u64, created_ms: u64) -> DirEntry {
        DirEntry {
            name: name.into(),
            owner,
            addr: format!("tcp://127.0.0.1:{owner}"),
            key: String::new(),
            size: 8,
            rights: 7,
            created_ms,
            removed: false,
            stripe: None,
        }
    }

    #[test]
    fn earliest_export_wins_between_live_owners() {
        let mut s = State::default();
        assert!(s.merge(entry("a", 2, 10)));
        assert!(!s.merge(entry("a", 3, 11)));
        assert!(s.merge(entry("a", 1, 10)));
        assert_eq!(s.dir["a"].owner, 1);
        // Same order whatever the arrival order.
        let mut t = State::default();
        t.merge(entry("a", 1, 10));
        t.merge(entry("a", 3, 11));
        t.merge(entry("a", 2, 10));
        assert_eq!(t.dir["a"], s.dir["a"]);
    }

    #[test]
    fn down_or_removed_owner_gives_way() {
        let mut s = State::default();
        s.merge(entry("a", 1, 10));
        s.down.insert(1);
        assert!(s.merge(entry("a", 2, 20)));
        let mut r = entry("a", 2, 20);
        r.removed = true;
        assert!(s.merge(r.clone()));
        assert!(
            !s.merge(entry("a", 2, 20)),
            "a removal is newer than its export"
        );
        assert!(s.merge(entry("a", 3, 30)));
    }
}
