//! The CUDA backend's device clock for the profiler (`crate::profile`): CUDA events with timing
//! enabled, recorded on the backend's stream, kept in a pool and reused from step to step (creating an
//! event per op would cost a driver call each).

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};

use super::{be, Cuda};
use crate::error::{KernelError, Result};
use crate::profile::DeviceTimer;

pub(crate) struct EventTimer {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    pool: Vec<CudaEvent>,
    /// Events of `pool` recorded since the last `resolve`.
    used: usize,
}

impl EventTimer {
    pub(crate) fn new(cuda: &Cuda) -> Self {
        EventTimer {
            ctx: cuda.ctx.clone(),
            stream: cuda.stream.clone(),
            pool: Vec::new(),
            used: 0,
        }
    }
}

impl DeviceTimer for EventTimer {
    fn record(&mut self) -> Result<usize> {
        if self.used == self.pool.len() {
            let ev = self
                .ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(be("creating a profiling event"))?;
            self.pool.push(ev);
        }
        self.pool[self.used]
            .record(&self.stream)
            .map_err(be("recording a profiling event"))?;
        self.used += 1;
        Ok(self.used - 1)
    }

    fn resolve(&mut self, pairs: &[(usize, usize)]) -> Result<Vec<f64>> {
        // Everything on the stream, so every recorded event, has completed after this.
        self.stream
            .synchronize()
            .map_err(be("synchronize (profiler)"))?;
        let mut out = Vec::with_capacity(pairs.len());
        for &(a, b) in pairs {
            if a >= self.used || b >= self.used {
                return Err(KernelError::Backend {
                    backend: "cuda",
                    msg: format!("internal: profiling event {a} or {b} was not recorded"),
                });
            }
            let ms = self.pool[a]
                .elapsed_ms(&self.pool[b])
                .map_err(be("reading a profiling event"))?;
            out.push(f64::from(ms));
        }
        self.used = 0;
        Ok(out)
    }
}
