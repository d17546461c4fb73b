//! iscsi-target-peer FILE ADDR:PORT IQN: serves FILE (raw, read-only) as LUN 0 of target IQN
//! with the `iscsi-target` crate, for scripts/bench-block. Reads go to the file with pread, so
//! the host's page cache is its cache (as for qemu-nbd and tgt).

use std::fs::File;
use std::os::unix::fs::FileExt;

use iscsi_target::{IscsiError, IscsiTarget, ScsiBlockDevice, ScsiResult};

struct RawFile {
    file: File,
    blocks: u64,
}

const BLOCK: u32 = 512;

impl ScsiBlockDevice for RawFile {
    fn read(&self, lba: u64, blocks: u32, block_size: u32) -> ScsiResult<Vec<u8>> {
        let mut buf = vec![0u8; blocks as usize * block_size as usize];
        self.file
            .read_exact_at(&mut buf, lba * u64::from(block_size))
            .map_err(|e| IscsiError::Scsi(e.to_string()))?;
        Ok(buf)
    }

    fn write(&mut self, _lba: u64, _data: &[u8], _block_size: u32) -> ScsiResult<()> {
        Err(IscsiError::Scsi("read-only".into()))
    }

    fn capacity(&self) -> u64 {
        self.blocks
    }

    fn block_size(&self) -> u32 {
        BLOCK
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, path, addr, iqn] = args.as_slice() else {
        return Err("usage: iscsi-target-peer FILE ADDR:PORT IQN".into());
    };
    let file = File::open(path)?;
    let blocks = file.metadata()?.len() / u64::from(BLOCK);
    let target = IscsiTarget::builder()
        .bind_addr(addr)
        .target_name(iqn)
        .build(RawFile { file, blocks })?;
    target.run()?;
    Ok(())
}
