//! Writing disks out in forms hypervisors read: VMDK descriptors, the small text file that tells
//! ESXi (and QEMU) where a disk's flat data file is and how big it is.
//!
//! Pure text generation, no I/O. The extent size must equal the flat file's size exactly: ESXi
//! treats a descriptor that points past the end of its extent as a truncated disk.

/// Bus type recorded in the descriptor (`ddb.adapterType`); it also picks the geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterType {
    Ide,
    LsiLogic,
}

impl AdapterType {
    /// The adapter for a .vmx device key such as `ide0:0` or `scsi0:1`.
    pub fn for_device(device: &str) -> Self {
        if device.to_ascii_lowercase().starts_with("ide") {
            AdapterType::Ide
        } else {
            AdapterType::LsiLogic
        }
    }
}

/// A descriptor (createType `vmfs`, one `VMFS` extent) for a flat file of `size` bytes named
/// `flat_name`, in the same folder. `None` when `size` is not a whole number of 512-byte
/// sectors, which no VMDK can describe.
pub fn flat_descriptor(
    size: u64,
    flat_name: &str,
    adapter: AdapterType,
    cid: u32,
) -> Option<String> {
    if !size.is_multiple_of(512) {
        return None;
    }
    let sectors = size / 512;
    let (heads, per_track, max_cyl) = match adapter {
        AdapterType::Ide => (16u64, 63u64, 16383u64),
        AdapterType::LsiLogic => (255, 63, 65535),
    };
    let cylinders = (sectors / (heads * per_track)).clamp(1, max_cyl);
    let adapter = match adapter {
        AdapterType::Ide => "ide",
        AdapterType::LsiLogic => "lsilogic",
    };
    let name = flat_name.replace('"', "");
    Some(format!(
        "# Disk DescriptorFile\n\
         version=1\n\
         encoding=\"UTF-8\"\n\
         CID={cid:08x}\n\
         parentCID=ffffffff\n\
         createType=\"vmfs\"\n\
         \n\
         # Extent description\n\
         RW {sectors} VMFS \"{name}\"\n\
         \n\
         # The Disk Data Base\n\
         #DDB\n\
         \n\
         ddb.adapterType = \"{adapter}\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"{heads}\"\n\
         ddb.geometry.sectors = \"{per_track}\"\n\
         ddb.virtualHWVersion = \"13\"\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_names_flat_file_and_exact_size() {
        let d = flat_descriptor(
            16 << 30,
            "web01-flat.vmdk",
            AdapterType::LsiLogic,
            0xfffffffe,
        )
        .unwrap();
        assert!(d.starts_with("# Disk DescriptorFile\n"));
        assert!(d.contains("RW 33554432 VMFS \"web01-flat.vmdk\"\n"), "{d}");
        assert!(d.contains("CID=fffffffe\n"));
        assert!(d.contains("ddb.geometry.cylinders = \"2088\""), "{d}");
        assert!(d.contains("ddb.adapterType = \"lsilogic\""));
    }

    #[test]
    fn sizes_that_are_not_whole_sectors_get_no_descriptor() {
        assert!(flat_descriptor(1000, "x-flat.vmdk", AdapterType::Ide, 1).is_none());
        let d = flat_descriptor(512, "x-flat.vmdk", AdapterType::Ide, 1).unwrap();
        assert!(d.contains("RW 1 VMFS"));
        assert!(d.contains("cylinders = \"1\""));
        assert_eq!(AdapterType::for_device("ide1:0"), AdapterType::Ide);
        assert_eq!(AdapterType::for_device("scsi0:0"), AdapterType::LsiLogic);
    }
}
