//! A copy whose destination is not read again soon: a WRITE's payload
//! going into the export file's mapping.
//!
//! An ordinary copy (`memcpy`, `rep movsb`) first reads every destination
//! cache line it writes. The mapping's pages for a WRITE are seldom in the
//! CPU's cache, so that read costs as much as the copy. Streaming
//! (non-temporal) stores write whole lines without reading them and leave
//! the cache to the data that is used next. In a C test on tmpfs, 1 MiB
//! from a buffer in cache into a mapping whose pages were mapped before,
//! the whole 1 GiB file in turn: `memcpy` 64-66 µs per MiB, 16-byte
//! streaming stores 41-43 (64-byte ones the same: the memory is the limit).

/// Copies `src` to `dst` with stores that bypass the cache where the CPU
/// has them (SSE2, every x86-64), else as `copy_nonoverlapping` does.
/// Every byte is visible to other CPUs when this returns.
///
/// # Safety
/// As `std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len())`: `dst`
/// is valid for `src.len()` bytes of writes and does not overlap `src`.
pub(crate) unsafe fn copy_streaming(dst: *mut u8, src: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the caller's promise, passed on.
        unsafe { x86_64::copy(dst, src) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // SAFETY: the caller's promise, passed on.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_64 {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};

    /// One cache line: streaming stores combine best as whole lines.
    const LINE: usize = 64;
    const LANE: usize = 16;

    /// # Safety
    /// As [`super::copy_streaming`].
    pub(super) unsafe fn copy(dst: *mut u8, src: &[u8]) {
        let len = src.len();
        // The head up to the first line boundary of `dst`, and the tail
        // after the last, take ordinary stores.
        let head = dst.align_offset(LINE).min(len);
        let lines = (len - head) / LINE;
        let body_end = head + lines * LINE;
        // SAFETY: `dst` is valid for `len` bytes of writes apart from
        // `src` (the caller's promise); every range below lies in
        // `0..len`. Streaming stores go to `dst + head`, which is 64-byte
        // aligned, in 16-byte lanes, as `_mm_stream_si128` requires; SSE2
        // is part of x86-64. Loads are unaligned.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst, head);
            let mut at = head;
            while at < body_end {
                for lane in (0..LINE).step_by(LANE) {
                    let value = _mm_loadu_si128(src.as_ptr().add(at + lane).cast::<__m128i>());
                    _mm_stream_si128(dst.add(at + lane).cast::<__m128i>(), value);
                }
                at += LINE;
            }
            std::ptr::copy_nonoverlapping(
                src.as_ptr().add(body_end),
                dst.add(body_end),
                len - body_end,
            );
            // Streaming stores are weakly ordered: without the fence a
            // reply sent after the copy could be seen before its bytes.
            _mm_sfence();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::copy_streaming;

    #[test]
    fn every_byte_arrives_whatever_the_alignment_and_length() {
        let src: Vec<u8> = (0..9000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for dst_skew in [0usize, 1, 15, 16, 17, 63, 64, 65] {
            for src_skew in [0usize, 1, 33] {
                for len in [0usize, 1, 15, 63, 64, 65, 127, 128, 4096, 4097, 8191] {
                    let mut dst = vec![0xAAu8; dst_skew + len + 64];
                    let from = &src[src_skew..src_skew + len];
                    // SAFETY: `dst` has room for `len` bytes from
                    // `dst_skew`, and is a buffer of its own.
                    unsafe { copy_streaming(dst.as_mut_ptr().add(dst_skew), from) };
                    assert_eq!(
                        &dst[dst_skew..dst_skew + len],
                        from,
                        "dst+{dst_skew} src+{src_skew} len {len}"
                    );
                    assert!(
                        dst[..dst_skew].iter().all(|&b| b == 0xAA)
                            && dst[dst_skew + len..].iter().all(|&b| b == 0xAA),
                        "dst+{dst_skew} src+{src_skew} len {len}: a byte outside the range changed"
                    );
                }
            }
        }
    }
}
