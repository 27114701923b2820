//! Region keys from arbitrary bytes and strings: parsing never panics, and an accepted
//! key round-trips through both forms.

use pfs_transport::RegionKey;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(k) = RegionKey::from_bytes(data) {
            let again = RegionKey::from_bytes(&k.to_bytes()).expect("re-decodes");
            assert_eq!(again.to_bytes(), k.to_bytes());
            let s = k.to_string();
            assert_eq!(
                s.parse::<RegionKey>().expect("re-parses").to_bytes(),
                k.to_bytes()
            );
        }
        if let Ok(s) = std::str::from_utf8(data) {
            if let Ok(k) = s.parse::<RegionKey>() {
                assert_eq!(
                    k.to_string().parse::<RegionKey>().unwrap().to_bytes(),
                    k.to_bytes()
                );
            }
        }
    });
}
