//! The process heap (glibc malloc): hands memory freed after a burst back to the kernel.
//!
//! Why: a node's live heap stays small (11–12 MB at the peak of the national run, measured with
//! heaptrack), but a burst — forty CSV batches sealed at once, a backlog arriving from a peer
//! that came back — leaves freed chunks scattered between long-lived ones, and glibc only
//! returns the top of each arena by itself. In the national run a node held 38 MiB of anonymous
//! memory of which one `malloc_trim(0)` returned 19 MiB. Trimmed each second, the nodes end that
//! run at 27–30 MiB resident instead of 33–50; the peak inside a burst (under a second) is not
//! lowered by trimming (tried every 250 ms: same peaks).
//! Must not: be called in a hot path — a trim walks every free chunk under the arena locks, and
//! pages it returned fault back in when reused (once a second cost nothing measurable in the
//! CSV bench: medians 1,230 without and 1,248 referrals/s with it, three alternating runs).

/// Returns free memory inside every malloc arena to the kernel. True when some was released.
/// A no-op (false) where the C library is not glibc.
pub fn release_free() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointers and only takes the arena locks glibc's own
        // malloc and free take; it is safe to call from any thread at any time.
        #[allow(unsafe_code)]
        let released = unsafe { libc::malloc_trim(0) };
        released == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory freed in the middle of the heap (between blocks still in use) is handed back:
    /// the resident size falls by most of what was freed.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_memory_between_live_blocks_is_returned_to_the_kernel() {
        fn rss_kib() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        }
        // 64 MiB in 16 KiB blocks (below the mmap threshold, so they come from an arena),
        // every block touched; then every other block freed, so no free run reaches the top.
        let mut blocks: Vec<Option<Vec<u8>>> =
            (0..4096).map(|_| Some(vec![1u8; 16 << 10])).collect();
        for b in blocks.iter_mut().step_by(2) {
            *b = None;
        }
        let before = rss_kib();
        assert!(release_free(), "malloc_trim released nothing");
        let after = rss_kib();
        // Half the blocks (32 MiB) were freed; at least half of that must be gone now.
        assert!(
            before.saturating_sub(after) >= 16 << 10,
            "RSS {before} KiB -> {after} KiB after the trim"
        );
        drop(blocks);
    }
}
