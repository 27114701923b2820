//! Addresses that name their backend: `tcp://host:port`, `udp://host:port`,
//! `xdp://iface/host:port`, `rdma://host:port`, `auto://host:port`.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::str::FromStr;

use crate::error::{Error, Result};

/// The transport backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum BackendKind {
    /// Wire messages over TCP streams, driven by io_uring.
    Tcp,
    /// The reliable datagram protocol over kernel UDP, driven by io_uring.
    Udp,
    /// The reliable datagram protocol over AF_XDP sockets.
    Xdp,
    /// RDMA verbs (RC queue pairs).
    Rdma,
}

impl BackendKind {
    /// Every backend, in `auto`'s order of preference.
    pub const ALL: [BackendKind; 4] = [
        BackendKind::Rdma,
        BackendKind::Xdp,
        BackendKind::Udp,
        BackendKind::Tcp,
    ];

    /// The URL scheme naming this backend.
    pub fn scheme(self) -> &'static str {
        match self {
            BackendKind::Tcp => "tcp",
            BackendKind::Udp => "udp",
            BackendKind::Xdp => "xdp",
            BackendKind::Rdma => "rdma",
        }
    }

    /// Why this backend cannot run in this build, or `None` if it can.
    pub fn unavailable_reason(self) -> Option<String> {
        match self {
            BackendKind::Tcp => None,
            BackendKind::Udp => None,
            BackendKind::Xdp if cfg!(feature = "xdp") => None,
            BackendKind::Xdp => Some(
                "this build has no xdp backend: build pfs-transport with `--features xdp` \
                 (needs clang and libelf-dev; `cargo xtask deps` installs them), or use udp://"
                    .into(),
            ),
            #[cfg(feature = "rdma")]
            BackendKind::Rdma => crate::backend::rdma::unavailable_reason(),
            #[cfg(not(feature = "rdma"))]
            BackendKind::Rdma => Some(
                "this build has no rdma backend: build pfs-transport with `--features rdma` \
                 (needs libibverbs-dev, librdmacm-dev and libclang-dev; `cargo xtask deps` \
                 installs them), or use udp:// or tcp://"
                    .into(),
            ),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.scheme())
    }
}

impl FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tcp" => Ok(BackendKind::Tcp),
            "udp" => Ok(BackendKind::Udp),
            "xdp" => Ok(BackendKind::Xdp),
            "rdma" => Ok(BackendKind::Rdma),
            _ => Err(Error::InvalidArgument(format!(
                "unknown backend {s:?}: expected one of tcp, udp, xdp, rdma"
            ))),
        }
    }
}

/// A transport address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Address {
    /// `tcp://host:port`
    Tcp(SocketAddr),
    /// `udp://host:port`
    Udp(SocketAddr),
    /// `xdp://iface/host:port`
    Xdp {
        /// Network interface the XDP program and AF_XDP sockets attach to.
        iface: String,
        /// IP address and UDP port.
        addr: SocketAddr,
    },
    /// `rdma://host:port` (rdma_cm over IP)
    Rdma(SocketAddr),
    /// `auto://host:port`: the best backend that can reach the peer.
    Auto(SocketAddr),
}

const FORMS: &str = "tcp://HOST:PORT, udp://HOST:PORT, xdp://IFACE/HOST:PORT, \
                     rdma://HOST:PORT or auto://HOST:PORT (e.g. tcp://127.0.0.1:7000)";

fn resolve(input: &str, hostport: &str) -> Result<SocketAddr> {
    if let Ok(a) = hostport.parse::<SocketAddr>() {
        return Ok(a);
    }
    if !hostport.contains(':') {
        return Err(Error::InvalidAddress {
            input: input.into(),
            reason: format!("missing :PORT; expected {FORMS}"),
        });
    }
    let mut it = hostport
        .to_socket_addrs()
        .map_err(|e| Error::InvalidAddress {
            input: input.into(),
            reason: format!("cannot resolve {hostport:?}: {e}"),
        })?;
    it.next().ok_or_else(|| Error::InvalidAddress {
        input: input.into(),
        reason: format!("{hostport:?} resolves to no address"),
    })
}

impl Address {
    /// Parse and resolve an address string.
    pub fn parse(s: &str) -> Result<Address> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| Error::InvalidAddress {
            input: s.into(),
            reason: format!("missing scheme; expected {FORMS}"),
        })?;
        match scheme {
            "tcp" => Ok(Address::Tcp(resolve(s, rest)?)),
            "udp" => Ok(Address::Udp(resolve(s, rest)?)),
            "rdma" => Ok(Address::Rdma(resolve(s, rest)?)),
            "auto" => Ok(Address::Auto(resolve(s, rest)?)),
            "xdp" => {
                let (iface, hp) = rest.split_once('/').ok_or_else(|| Error::InvalidAddress {
                    input: s.into(),
                    reason: "xdp addresses name the interface: xdp://IFACE/HOST:PORT".into(),
                })?;
                if iface.is_empty()
                    || iface.len() > 15
                    || !iface
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
                {
                    return Err(Error::InvalidAddress {
                        input: s.into(),
                        reason: format!("{iface:?} is not a valid interface name"),
                    });
                }
                Ok(Address::Xdp {
                    iface: iface.into(),
                    addr: resolve(s, hp)?,
                })
            }
            other => Err(Error::InvalidAddress {
                input: s.into(),
                reason: format!("unknown scheme {other:?}; expected {FORMS}"),
            }),
        }
    }

    /// The IP address and port.
    pub fn socket_addr(&self) -> SocketAddr {
        match self {
            Address::Tcp(a) | Address::Udp(a) | Address::Rdma(a) | Address::Auto(a) => *a,
            Address::Xdp { addr, .. } => *addr,
        }
    }

    /// The backend this address names (`None` for `auto`).
    pub fn backend(&self) -> Option<BackendKind> {
        match self {
            Address::Tcp(_) => Some(BackendKind::Tcp),
            Address::Udp(_) => Some(BackendKind::Udp),
            Address::Xdp { .. } => Some(BackendKind::Xdp),
            Address::Rdma(_) => Some(BackendKind::Rdma),
            Address::Auto(_) => None,
        }
    }

    /// The same host and port with another backend.
    pub fn with_backend(&self, kind: BackendKind) -> Address {
        let a = self.socket_addr();
        match kind {
            BackendKind::Tcp => Address::Tcp(a),
            BackendKind::Udp => Address::Udp(a),
            BackendKind::Rdma => Address::Rdma(a),
            BackendKind::Xdp => match self {
                Address::Xdp { iface, .. } => Address::Xdp {
                    iface: iface.clone(),
                    addr: a,
                },
                _ => Address::Xdp {
                    iface: String::new(),
                    addr: a,
                },
            },
        }
    }
}

impl FromStr for Address {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Address::parse(s)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "tcp://{a}"),
            Address::Udp(a) => write!(f, "udp://{a}"),
            Address::Rdma(a) => write!(f, "rdma://{a}"),
            Address::Auto(a) => write!(f, "auto://{a}"),
            Address::Xdp { iface, addr } => write!(f, "xdp://{iface}/{addr}"),
        }
    }
}

/// What `auto` decided for one address, with the reason for every backend it passed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// The backend chosen, if any can reach the peer.
    pub chosen: Option<BackendKind>,
    /// Each backend that was refused, with why.
    pub refused: Vec<(BackendKind, String)>,
}

impl fmt::Display for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.chosen {
            Some(k) => write!(f, "auto chose {k}")?,
            None => write!(f, "auto found no usable backend")?,
        }
        for (k, why) in &self.refused {
            write!(f, "; {k}: {why}")?;
        }
        Ok(())
    }
}

/// Decide which backend `auto` uses for `addr` (DESIGN decision 1): rdma when an RDMA
/// device routes to the peer, xdp only on an interface configured for it, else tcp.
pub fn select(addr: &Address) -> Selection {
    if let Some(k) = addr.backend() {
        return match k.unavailable_reason() {
            None => Selection {
                chosen: Some(k),
                refused: vec![],
            },
            Some(why) => Selection {
                chosen: None,
                refused: vec![(k, why)],
            },
        };
    }
    let mut refused = Vec::new();
    for k in BackendKind::ALL {
        if k == BackendKind::Xdp {
            refused.push((
                k,
                "auto never attaches an XDP program to an interface on its own: name one, \
                 xdp://IFACE/HOST:PORT"
                    .to_string(),
            ));
            continue;
        }
        if k == BackendKind::Udp {
            refused.push((
                k,
                "auto uses the datagram path only with kernel bypass (xdp); name udp:// to \
                 use it over the kernel"
                    .to_string(),
            ));
            continue;
        }
        match k.unavailable_reason() {
            None => {
                return Selection {
                    chosen: Some(k),
                    refused,
                };
            }
            Some(why) => refused.push((k, why)),
        }
    }
    Selection {
        chosen: None,
        refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(
            Address::parse("tcp://127.0.0.1:7000").unwrap(),
            Address::Tcp("127.0.0.1:7000".parse().unwrap())
        );
        assert_eq!(
            Address::parse("xdp://veth0/198.18.0.1:7000").unwrap(),
            Address::Xdp {
                iface: "veth0".into(),
                addr: "198.18.0.1:7000".parse().unwrap()
            }
        );
        assert_eq!(
            Address::parse("auto://[::1]:9").unwrap().to_string(),
            "auto://[::1]:9"
        );
        assert!(Address::parse("tcp://localhost:1").is_ok());
    }

    #[test]
    fn rejects_bad_forms_with_the_valid_form() {
        for bad in [
            "127.0.0.1:7000",
            "ftp://1.2.3.4:5",
            "tcp://1.2.3.4",
            "xdp://1.2.3.4:5",
            "xdp://a b/1.2.3.4:5",
        ] {
            let e = Address::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
        let e = Address::parse("tcp://1.2.3.4").unwrap_err().to_string();
        assert!(e.contains("tcp://HOST:PORT"), "{e}");
    }

    #[test]
    fn auto_explains_refusals() {
        let s = select(&Address::parse("auto://127.0.0.1:1").unwrap());
        assert_eq!(s.chosen, Some(BackendKind::Tcp));
        assert_eq!(s.refused.len(), 3);
        assert!(s.to_string().contains("rdma:"));
    }
}
