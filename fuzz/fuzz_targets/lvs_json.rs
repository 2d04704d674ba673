//! `lvs --reportformat json` reports, `dmsetup status` lines and volume
//! specs must be refused cleanly, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapshot::lvm;

fuzz_target!(|data: &[u8]| {
    if let Ok(rows) = lvm::parse_lvs_report(data) {
        for row in &rows {
            let _ = row.snapshot_state();
            let _ = row.is_thin() || row.is_thin_pool() || row.is_thick_snapshot();
            // Names from a report need not be valid LVM names; building
            // dm names from them must still not panic.
            let _ = lvm::dm_name(&row.vg, &row.name, Some("tpool"));
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = lvm::parse_thin_pool_status(text);
        if let Ok(parts) = lvm::split_dm_name(text) {
            // Splitting then joining gives the same name back.
            assert_eq!(
                lvm::dm_name(&parts.vg, &parts.lv, parts.layer.as_deref()),
                text
            );
        }
        let _ = lvm::LvName::parse(text);
    }
});
