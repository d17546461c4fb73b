//! Encoding of chunks: zstd compression on the way in; decompression and the BLAKE3 check on the
//! way out. A chunk whose bytes do not hash to its name is an error naming it; wrong bytes never
//! leave this module.
//!
//! Compression contexts are kept per thread (these functions run on blocking threads), so a chunk
//! costs no context allocation.

use std::cell::RefCell;

use bytes::Bytes;

use super::{pool, ChunkId, RepoError};

/// zstd level for chunks: level 1 keeps a backup well above disk speed on two cores, and the
/// ratio on VM disks is close to level 3's (see docs/decisions/0002-chunk-format.md).
pub(crate) const ZSTD_LEVEL: i32 = 1;

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses a chunk for storage.
pub(crate) fn compress(data: &[u8]) -> Result<Bytes, RepoError> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(compress_err)?);
        }
        let Some(c) = slot.as_mut() else {
            unreachable!("set just above")
        };
        c.compress(data).map(Bytes::from).map_err(compress_err)
    })
}

fn compress_err(e: std::io::Error) -> RepoError {
    RepoError::Invalid(format!("zstd compression failed: {e}"))
}

/// Decompresses a stored chunk of at most `max_len` bytes and checks it against its name.
pub(crate) fn decode(id: &ChunkId, stored: &[u8], max_len: usize) -> Result<Bytes, RepoError> {
    let corrupt = |what: String| RepoError::CorruptChunk { chunk: *id, what };
    // The frame header says how big the content is; refuse before allocating if it is too big.
    let size = match zstd::zstd_safe::get_frame_content_size(stored) {
        Ok(Some(n)) if n > max_len as u64 => {
            return Err(corrupt(format!(
                "it claims {n} bytes, more than the {max_len} a chunk may hold"
            )))
        }
        Ok(n) => n.map_or(max_len, |n| n as usize),
        Err(_) => return Err(corrupt("not a zstd frame".into())),
    };
    // A chunk of about the chunk size goes into a slot of the pool for that size (huge pages,
    // reused); a short one (a disk's last), and what is not a chunk (a config, up to 16 MiB),
    // into a buffer of the size the frame states.
    if size >= max_len / 2 {
        if let Some(mut slot) = pool::Slot::get(max_len) {
            let n = with_decompressor(id, |d| {
                d.decompress_to_buffer(stored, &mut slot.as_mut_slice()[..size])
            })?;
            let data = slot.freeze(n);
            let actual = ChunkId::of(&data);
            if actual != *id {
                return Err(corrupt(format!("its bytes hash to {actual}")));
            }
            return Ok(data);
        }
    }
    // As big as the frame says, not as big as a chunk may be.
    let mut out = Vec::with_capacity(size);
    with_decompressor(id, |d| d.decompress_to_buffer(stored, &mut out))?;
    // A frame that did not state its size does not keep a whole chunk's capacity.
    out.shrink_to_fit();
    let data = out;
    let actual = ChunkId::of(&data);
    if actual != *id {
        return Err(corrupt(format!("its bytes hash to {actual}")));
    }
    Ok(Bytes::from(data))
}

/// Runs `f` with this thread's decompression context; a zstd error is a corrupt chunk.
fn with_decompressor<T>(
    id: &ChunkId,
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<T>,
) -> Result<T, RepoError> {
    let corrupt = |what: String| RepoError::CorruptChunk { chunk: *id, what };
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| corrupt(format!("zstd context: {e}")))?,
            );
        }
        let Some(d) = slot.as_mut() else {
            unreachable!("set just above")
        };
        f(d).map_err(|e| corrupt(format!("zstd: {e}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_checks_digest() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let id = ChunkId::of(&data);
        let stored = compress(&data).unwrap();
        assert!(stored.len() < data.len());
        assert_eq!(&decode(&id, &stored, data.len()).unwrap()[..], &data[..]);
    }

    #[test]
    fn wrong_bytes_are_an_error_naming_the_chunk() {
        let data = vec![7u8; 4096];
        let id = ChunkId::of(&data);
        let other = compress(&[8u8; 4096]).unwrap();
        let err = decode(&id, &other, 4096).unwrap_err().to_string();
        assert!(err.contains(&id.to_hex()), "{err}");
        let err = decode(&id, b"garbage", 4096).unwrap_err().to_string();
        assert!(err.contains("not a zstd frame"), "{err}");
    }

    #[test]
    fn oversized_frame_is_refused_before_decompressing() {
        let data = vec![1u8; 8192];
        let stored = compress(&data).unwrap();
        let err = decode(&ChunkId::of(&data), &stored, 4096).unwrap_err();
        assert!(err.to_string().contains("more than the 4096"), "{err}");
    }

    #[test]
    fn chunks_of_pooled_sizes_round_trip_and_are_checked() {
        let max = 1 << 20;
        for len in [max, max - 4096, 70_000, 1] {
            let data: Vec<u8> = (0..len).map(|i| (i * 13 % 253) as u8).collect();
            let id = ChunkId::of(&data);
            let stored = compress(&data).unwrap();
            let out = decode(&id, &stored, max).unwrap();
            assert_eq!(out.len(), len);
            assert!(out[..] == data[..], "{len}");
            let other = compress(&data[..len / 2]).unwrap();
            let err = decode(&id, &other, max).unwrap_err().to_string();
            assert!(err.contains("hash to"), "{err}");
        }
        // A frame that does not state its size decodes into a whole slot.
        let data = vec![9u8; 200_000];
        let mut no_size = Vec::new();
        let mut e = zstd::stream::Encoder::new(&mut no_size, 1).unwrap();
        e.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut e, &data).unwrap();
        e.finish().unwrap();
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&no_size).unwrap(),
            None
        );
        assert!(decode(&ChunkId::of(&data), &no_size, max).unwrap()[..] == data[..]);
    }

    #[test]
    fn truncated_frame_is_an_error() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 256) as u8).collect();
        let stored = compress(&data).unwrap();
        let cut = &stored[..stored.len() / 2];
        assert!(decode(&ChunkId::of(&data), cut, 65536).is_err());
    }
}
