//! Facts about a network interface, read with ioctls on a socket of the calling
//! thread's network namespace (not from /sys, which shows the namespace it was
//! mounted in).

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// What the xdp backend needs to know about its interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IfaceInfo {
    pub(crate) index: u32,
    pub(crate) mac: [u8; 6],
    pub(crate) ipv4: Option<Ipv4Addr>,
    pub(crate) mtu: u32,
    /// Receive queues (combined or rx channels); 1 when the driver does not say.
    pub(crate) queues: u32,
}

const ETHTOOL_GCHANNELS: u32 = 0x3c;

#[repr(C)]
#[derive(Default)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a valid interface name"),
        ));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: no memory preconditions; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `ioctl(fd, req, r)` for ifreq-based requests.
fn ioctl(fd: &OwnedFd, req: libc::Ioctl, r: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `r` is a valid, exclusively borrowed ifreq for the whole call. Every request
    // used here reads and writes only the ifreq, except SIOCETHTOOL, which writes through
    // `ifru_data` into an ethtool struct that the caller keeps alive across the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, r as *mut libc::ifreq) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Look up `name` in the calling thread's network namespace.
pub(crate) fn iface_info(name: &str) -> io::Result<IfaceInfo> {
    let c = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name contains NUL"))?;
    // SAFETY: `c` is a valid NUL-terminated string for the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {name:?} in this network namespace (see `ip link`)"),
        ));
    }
    let fd = socket()?;
    let mut r = ifreq(name)?;
    ioctl(&fd, libc::SIOCGIFHWADDR, &mut r)?;
    // SAFETY: SIOCGIFHWADDR filled the ifru_hwaddr member of the union.
    let hw = unsafe { r.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(hw.sa_data.iter()) {
        *d = *s as u8;
    }
    let mut r = ifreq(name)?;
    let ipv4 = match ioctl(&fd, libc::SIOCGIFADDR, &mut r) {
        Ok(()) => {
            // SAFETY: SIOCGIFADDR filled ifru_addr with a sockaddr_in for AF_INET.
            let sa = unsafe { r.ifr_ifru.ifru_addr };
            let b = sa.sa_data;
            Some(Ipv4Addr::new(
                b[2] as u8, b[3] as u8, b[4] as u8, b[5] as u8,
            ))
        }
        Err(_) => None,
    };
    let mut r = ifreq(name)?;
    ioctl(&fd, libc::SIOCGIFMTU, &mut r)?;
    // SAFETY: SIOCGIFMTU filled ifru_mtu.
    let mtu = unsafe { r.ifr_ifru.ifru_mtu } as u32;
    let mut ch = EthtoolChannels {
        cmd: ETHTOOL_GCHANNELS,
        ..Default::default()
    };
    let mut r = ifreq(name)?;
    r.ifr_ifru.ifru_data = (&mut ch as *mut EthtoolChannels).cast();
    let queues = match ioctl(&fd, libc::SIOCETHTOOL, &mut r) {
        Ok(()) => ch.combined_count.max(ch.rx_count).max(1),
        Err(_) => 1,
    };
    Ok(IfaceInfo {
        index,
        mac,
        ipv4,
        mtu,
        queues,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found_and_nonsense_is_not() {
        let lo = iface_info("lo").unwrap();
        assert!(lo.index > 0);
        assert_eq!(lo.ipv4, Some(Ipv4Addr::LOCALHOST));
        assert!(lo.mtu >= 1500);
        assert!(lo.queues >= 1);
        let e = iface_info("pfs-nonexistent").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(iface_info("").is_err());
        assert!(iface_info("a-name-that-is-far-too-long").is_err());
    }
}
