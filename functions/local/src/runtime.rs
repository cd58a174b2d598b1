//! The process's async runtime, tuned so memory stays flat however large an export is.

/// Builds the multi-threaded runtime for `serve` (and the benchmark).
///
/// Exports read SQLite and write files on threads of their own (one per running work item, see
/// `export_core::item_thread`), other requests on tokio's blocking pool. glibc gives every new
/// thread that contends for `malloc` an arena of its own, and freed pages of page-sized batches
/// linger in them: with many threads, resident memory creeps up with export size. Capping the
/// arenas and the blocking threads keeps peak RSS flat (measured: 28–49 MB from 1M to 10M
/// resources).
///
/// Pages and write chunks are buffers of a few hundred KB, allocated and freed thousands of times
/// per export. With glibc's adaptive thresholds they came from fresh `mmap`s and were given back
/// at once (40,000 page faults for a 330 MB export, ~10% of its CPU). Fixed thresholds keep them
/// in the heap and reuse the memory: 6,000 faults, 7–10% faster, and a lower peak (57 → 40 MB,
/// Patient level at 1M), since freed buffers are reused instead of new ones mapped.
pub fn build() -> std::io::Result<tokio::runtime::Runtime> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator tuning; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 * 1024 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 * 1024 * 1024);
    }
    tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(16)
        .enable_all()
        .build()
}
