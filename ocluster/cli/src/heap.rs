//! The scheduler's heap: how much is in use (its metric), and giving back to the system
//! what a burst took once it is freed.
//!
//! A burst of submissions (100 000 jobs in a few seconds) allocates messages and
//! per-call state that is freed as soon as the submits are answered, but glibc keeps the
//! freed memory in its free lists, scattered between what the queued jobs still hold:
//! the RSS stayed at the burst's peak (1.5 KiB per queued job where the jobs themselves
//! hold 0.9). `malloc_trim` hands the free pages in the middle of the heap back
//! (`MADV_DONTNEED`); it is called once the heap in use has fallen well below its last
//! high-water mark, so a steady scheduler never pays for it.

use std::time::Duration;

/// Bytes of heap in use (malloc'd and not freed), where the allocator says (glibc).
pub fn in_use() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        let m = unsafe { libc::mallinfo2() };
        Some(m.uordblks + m.hblkhd)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// Whether the heap in use (`now`) has fallen far enough below its high-water mark
/// (`high`) since the last trim for a trim to be worth it: by 8 MiB, and by an eighth.
pub fn worth_trimming(high: usize, now: usize) -> bool {
    let freed = high.saturating_sub(now);
    freed >= 8 << 20 && freed >= high / 8
}

/// Checks every `every` and trims after a burst (see the module's documentation).
/// Returns at once where the allocator cannot say or cannot trim.
pub async fn trim_after_bursts(every: Duration) {
    let Some(mut high) = in_use() else { return };
    loop {
        tokio::time::sleep(every).await;
        let Some(now) = in_use() else { return };
        high = high.max(now);
        if worth_trimming(high, now) {
            let t = std::time::Instant::now();
            trim();
            tracing::debug!(
                "heap: {} MiB freed since its high-water mark given back ({:?})",
                (high - now) >> 20,
                t.elapsed()
            );
            high = now;
        }
    }
}

fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_after_a_real_fall() {
        const M: usize = 1 << 20;
        assert!(!worth_trimming(100 * M, 100 * M));
        // Small in absolute terms, or small against the heap: not worth a walk of it.
        assert!(!worth_trimming(20 * M, 14 * M));
        assert!(!worth_trimming(1000 * M, 900 * M));
        assert!(worth_trimming(1000 * M, 800 * M));
        assert!(worth_trimming(150 * M, 90 * M));
        assert!(!worth_trimming(10 * M, 20 * M));
    }

    /// The real allocator: freeing a burst and trimming lowers the process's RSS.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_trim_gives_a_freed_burst_back() {
        fn rss_kib() -> usize {
            let s =
                std::fs::read_to_string(format!("/proc/{}/status", std::process::id())).unwrap();
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
                .unwrap()
        }
        // Many small blocks, every other one kept: the freed ones are between live ones,
        // where only a trim (not the heap's top shrinking) can give them back.
        let mut blocks: Vec<Vec<u8>> = (0..200_000).map(|i| vec![i as u8; 500]).collect();
        let kept: Vec<Vec<u8>> = blocks
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| i % 32 == 0)
            .map(|(_, b)| std::mem::take(b))
            .collect();
        drop(blocks);
        let before = rss_kib();
        trim();
        let after = rss_kib();
        assert_eq!(kept.len(), 6_250);
        assert!(
            after + 40_000 < before,
            "RSS {before} KiB before the trim, {after} KiB after"
        );
    }
}
