//! Work items on threads of their own.
//!
//! A local export item is CPU work end to end: SQLite copies rows out of the page cache, the
//! engine copies them into chunks, the kernel copies the chunks into files. Done as tokio tasks,
//! every page read and every chunk written was handed to the blocking pool and back (thousands
//! of thread wake-ups per export, each an inter-processor interrupt on a virtual machine), and two
//! items kept only ~1.5 of 2 cores busy. The in-process runner instead gives each item a
//! blocking-pool thread and marks it; adapters whose I/O blocks do it right there on a marked
//! thread, so an item reads, shapes and writes in turn the way `sqlite3 … > out.ndjson` does,
//! one core per item (measured on the 1M store: system export 0.86 → 0.69 s).
//!
//! Adapters that wait on the network (DynamoDB, S3) are unaffected: their futures still await
//! the runtime's I/O driver, and the store still reads ahead (see
//! [`crate::ports::ResourceStore::reads_on_calling_thread`]).

use std::cell::Cell;
use std::future::Future;

thread_local! {
    static ON_ITEM_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Runs `future` to its end on the calling thread, marked as an item thread. Call it on a
/// thread that may block (`tokio::task::spawn_blocking`), never on a runtime worker.
pub fn run<F: Future>(runtime: &tokio::runtime::Handle, future: F) -> F::Output {
    /// Clears the mark however the future ends (a panic included): the blocking pool reuses
    /// the thread for other work.
    struct Unmark;
    impl Drop for Unmark {
        fn drop(&mut self) {
            ON_ITEM_THREAD.with(|on| on.set(false));
        }
    }
    ON_ITEM_THREAD.with(|on| on.set(true));
    let _unmark = Unmark;
    runtime.block_on(future)
}

/// Whether the calling thread runs a work item: then blocking I/O belongs here, not on another
/// thread.
pub fn is_current() -> bool {
    ON_ITEM_THREAD.with(Cell::get)
}

/// Runs blocking `work`: right here on an item thread, on tokio's blocking pool otherwise (where
/// it must not hold up a runtime worker). An error if the pool's task ended abnormally.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    if is_current() {
        return Ok(work());
    }
    tokio::task::spawn_blocking(work).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocking_work_stays_on_an_item_thread_and_leaves_a_worker() {
        let handle = tokio::runtime::Handle::current();
        let (item_thread, work_thread, marked) = tokio::task::spawn_blocking(move || {
            run(&handle, async {
                let here = std::thread::current().id();
                let there = blocking(|| std::thread::current().id()).await.unwrap();
                (here, there, is_current())
            })
        })
        .await
        .unwrap();
        assert_eq!(item_thread, work_thread);
        assert!(marked);

        let worker = std::thread::current().id();
        let elsewhere = blocking(|| (std::thread::current().id(), is_current()))
            .await
            .unwrap();
        assert_ne!(elsewhere.0, worker, "a runtime worker must not block");
        assert!(!elsewhere.1);
        assert!(!is_current());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_mark_goes_when_the_item_ends() {
        let handle = tokio::runtime::Handle::current();
        let after = tokio::task::spawn_blocking(move || {
            run(&handle, async {});
            is_current()
        })
        .await
        .unwrap();
        assert!(!after);
    }
}
