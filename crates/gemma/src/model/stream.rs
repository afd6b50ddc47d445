//! The loading stream: base tensors go to the backend one at a time, in an order known up front (the
//! plan), so that while one tensor is converted, uploaded or quantized, a helper thread reads the
//! pages of the next one from the memory-mapped checkpoint (`TensorStore::prefetch`: parallel page
//! touches, i.e. parallel disk reads on a cold cache); once a tensor is on the backend its pages are
//! dropped from the process (`TensorStore::release`). Plus the progress display.
//!
//! Host memory bound of a load from a store: the pages of at most TWO stored tensors are mapped at any
//! time (the one in use and the one prefetched; for Gemma-2-9B in bf16 the largest pair is the
//! embedding + the first norm, 1.84 GB, then ≤ 2 × 103 MB), plus what the backend keeps on the host: on
//! the CUDA backend nothing (the bytes are uploaded from the map; NF4 is quantized on the device); on
//! the CPU backend the model itself (f32 buffers, NF4 tensors), built from the bytes with no second
//! f32 copy of any tensor.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use crate::safetensors_io::TensorStore;

/// The tensors of a load, in fetch order, with the prefetch helper.
pub(super) struct Stream<'a> {
    store: Option<&'a TensorStore>,
    plan: &'a [String],
    /// Index in `plan` of the tensor in use: the helper skips requests already behind it.
    pos: &'a AtomicUsize,
    /// Where in `plan` the next fetch is expected (a name out of order is looked up).
    cursor: usize,
    tx: mpsc::Sender<usize>,
    progress: Progress,
}

/// Runs `f` with a stream over `plan` (a helper thread prefetches when `store` is Some), then releases
/// every page of the store still mapped and prints the summary line when progress is on.
pub(super) fn with_stream<R>(
    store: Option<&TensorStore>,
    plan: &[String],
    total_bytes: u64,
    progress: bool,
    f: impl FnOnce(&mut Stream<'_>) -> R,
) -> R {
    let pos = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<usize>();
        if let Some(store) = store {
            let pos = &pos;
            scope.spawn(move || {
                for k in rx {
                    if k >= pos.load(Ordering::Relaxed) {
                        if let Some(name) = plan.get(k) {
                            store.prefetch(name);
                        }
                    }
                }
            });
        }
        let mut stream = Stream {
            store,
            plan,
            pos: &pos,
            cursor: 0,
            tx,
            progress: Progress::new(progress, plan.len(), total_bytes),
        };
        // The first tensor's pages are read while the caller sets up.
        let _ = stream.tx.send(0);
        let out = f(&mut stream);
        let Stream {
            tx, mut progress, ..
        } = stream;
        drop(tx); // ends the helper; the scope joins it
        if let Some(store) = store {
            // Small tensors the plan does not name (bnb quant states) and any page a late prefetch
            // touched.
            for name in store.names() {
                store.release(name);
            }
        }
        progress.finish();
        out
    })
}

impl Stream<'_> {
    /// Marks `name` as the tensor in use and asks the helper for the one after it.
    pub(super) fn begin(&mut self, name: &str) {
        let k = if self.plan.get(self.cursor).is_some_and(|n| n == name) {
            self.cursor
        } else {
            match self.plan.iter().position(|n| n == name) {
                Some(k) => k,
                None => return,
            }
        };
        self.pos.store(k, Ordering::Relaxed);
        self.cursor = k + 1;
        let _ = self.tx.send(k + 1);
    }

    /// `name` is on the backend: its pages are released and the progress advances by `bytes`.
    pub(super) fn done(&mut self, name: &str, bytes: u64) {
        if let Some(store) = self.store {
            store.release(name);
        }
        self.progress.inc(bytes);
    }
}

/// Progress of a load: an indicatif bar (bytes, throughput, tensors) on a terminal; plain lines at
/// every tenth of the bytes when stderr is not one; nothing when off.
struct Progress {
    on: bool,
    bar: Option<indicatif::ProgressBar>,
    start: Instant,
    tensors: usize,
    total_tensors: usize,
    bytes: u64,
    total_bytes: u64,
    /// Next tenth (1..=10) to report in plain mode.
    next_tenth: u64,
}

const GB: f64 = 1e9;

impl Progress {
    fn new(on: bool, total_tensors: usize, total_bytes: u64) -> Self {
        use std::io::IsTerminal;
        let bar = (on && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total_bytes);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "loading {bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {msg} {elapsed}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Progress {
            on,
            bar,
            start: Instant::now(),
            tensors: 0,
            total_tensors,
            bytes: 0,
            total_bytes,
            next_tenth: 1,
        }
    }

    fn inc(&mut self, bytes: u64) {
        self.tensors += 1;
        self.bytes += bytes;
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{}/{} tensors", self.tensors, self.total_tensors));
            bar.inc(bytes);
        } else if self.on && self.total_bytes > 0 {
            let tenth = self.bytes.saturating_mul(10) / self.total_bytes;
            if tenth >= self.next_tenth && self.tensors < self.total_tensors {
                self.next_tenth = tenth + 1;
                let s = self.start.elapsed().as_secs_f64();
                eprintln!(
                    "loading: {}/{} tensors, {:.2}/{:.2} GB, {:.2} GB/s, {s:.1} s",
                    self.tensors,
                    self.total_tensors,
                    self.bytes as f64 / GB,
                    self.total_bytes as f64 / GB,
                    self.bytes as f64 / GB / s.max(1e-9),
                );
            }
        }
    }

    /// Clears the bar and prints the summary line (when on).
    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if !self.on {
            return;
        }
        let s = self.start.elapsed().as_secs_f64();
        let rss = match host_peak_rss() {
            Some(b) => format!("; host peak RSS {:.2} GB", b as f64 / GB),
            None => String::new(),
        };
        eprintln!(
            "loaded {} tensors ({:.2} GB) in {s:.1} s ({:.2} GB/s){rss}",
            self.tensors,
            self.bytes as f64 / GB,
            self.bytes as f64 / GB / s.max(1e-9),
        );
    }
}

/// Peak resident set size of this process so far (`VmHWM` of /proc/self/status), in bytes; None where
/// there is no procfs. It counts mapped checkpoint pages too, which is why the loader releases them.
pub fn host_peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
