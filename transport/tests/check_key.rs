//! `Endpoint::check_key`: the owner's own check of a key, as strict as the one its target
//! side makes for one-sided operations (owner, region, token, revocation, expiry,
//! rights, bounds).

use std::time::Duration;

use pfs_transport::{Endpoint, EndpointConfig, Error, KeyOptions, Rights};

#[test]
fn keys_are_checked_like_remote_operations() {
    let ep = Endpoint::bind(EndpointConfig::new()).unwrap();
    let other = Endpoint::bind(EndpointConfig::new()).unwrap();
    let region = ep.alloc_region(4096, Rights::ALL).unwrap();
    let rw = region.key(Rights::READ | Rights::WRITE).unwrap();
    ep.check_key(&rw, Rights::READ, 0, 4096).unwrap();
    ep.check_key(&rw, Rights::WRITE, 4000, 96).unwrap();
    let err = |r: pfs_transport::Result<()>| r.expect_err("refused");
    assert!(matches!(
        err(ep.check_key(&rw, Rights::ATOMIC, 0, 8)),
        Error::AccessDenied { .. }
    ));
    assert!(matches!(
        err(ep.check_key(&rw, Rights::READ, 4000, 97)),
        Error::OutOfBounds { .. }
    ));
    assert!(matches!(
        err(ep.check_key(&rw, Rights::READ, u64::MAX, 2)),
        Error::OutOfBounds { .. }
    ));
    // A key of another endpoint's region.
    let theirs = other.alloc_region(4096, Rights::ALL).unwrap();
    let foreign = theirs.key(Rights::READ).unwrap();
    assert!(matches!(
        err(ep.check_key(&foreign, Rights::READ, 0, 1)),
        Error::AccessDenied { .. }
    ));
    // Expired, revoked, and a region that is gone.
    let brief = region
        .key_with(KeyOptions {
            rights: Rights::READ,
            expires_in: Some(Duration::from_millis(1)),
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(matches!(
        err(ep.check_key(&brief, Rights::READ, 0, 1)),
        Error::Expired
    ));
    region.revoke(&rw).unwrap();
    assert!(matches!(
        err(ep.check_key(&rw, Rights::READ, 0, 1)),
        Error::Revoked
    ));
    let fresh = region.key(Rights::READ).unwrap();
    drop(region);
    assert!(matches!(
        err(ep.check_key(&fresh, Rights::READ, 0, 1)),
        Error::UnknownRegion { .. }
    ));
}
