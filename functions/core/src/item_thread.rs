//! Work items on threads of their own.
//!
//! A local export item is CPU work end to end: SQLite copies rows out of the page cache, the
//! engine copies them into chunks, the kernel copies the chunks into files. Done as tokio tasks,
//! every page read and every chunk written was handed to the blocking pool and back (thousands
//! of thread wake-ups per export, each an inter-processor interrupt on a virtual machine), and two
//! items kept only ~1.5 of 2 cores busy. The in-process runner instead gives each item a thread
//! of its own, marked; adapters whose I/O blocks do it right there on a marked thread, so an item
//! reads, shapes and writes in turn the way `sqlite3 … > out.ndjson` does, one core per item
//! (measured on the 1M store: system export 0.86 → 0.64–0.72 s).
//!
//! Adapters that wait on the network (DynamoDB, S3: study exports on Lambda run through the same
//! runner) still await the runtime's I/O driver from the item's thread, and their store still
//! reads ahead (see [`crate::ports::ResourceStore::reads_on_calling_thread`]); that path was not
//! measured on Lambda.

use std::cell::Cell;
use std::future::Future;

thread_local! {
    static ON_ITEM_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Runs `future` on a new thread of its own, marked as an item thread, and answers its output
/// (an error if the thread could not start or panicked). A thread of its own, not one of tokio's
/// blocking pool: an item holds it for its whole run, and the pool's threads serve every other
/// blocking call of the process (SQLite reads of HTTP requests, file downloads).
pub async fn spawn<F>(future: F) -> std::io::Result<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let runtime = tokio::runtime::Handle::current();
    let (output, answer) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("export-item".into())
        .spawn(move || {
            ON_ITEM_THREAD.with(|on| on.set(true));
            let _ = output.send(runtime.block_on(future));
        })?;
    answer
        .await
        .map_err(|_| std::io::Error::other("the work item's thread panicked"))
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
        let (item_thread, work_thread, marked) = spawn(async {
            let here = std::thread::current().id();
            let there = blocking(|| std::thread::current().id()).await.unwrap();
            (here, there, is_current())
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
    async fn a_panicking_item_is_an_error() {
        let ended = spawn(async { panic!("an item failed") }).await;
        assert!(ended.is_err());
    }
}
