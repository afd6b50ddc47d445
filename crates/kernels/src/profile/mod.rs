//! The profiler: time per op, per layer role and per pass, for any backend, at zero cost when off.
//!
//! Design (why a wrapper). [`Profiled<B>`] is itself a [`Backend`]: every op times the call and
//! delegates to the wrapped backend `B` (same buffer types, so nothing is converted). Model code is
//! generic over the backend, so a profiled run is the same code monomorphized for `Profiled<B>`; an
//! unprofiled run never sees the wrapper: no event is recorded, no clock is read, no sync is added.
//! The only thing that runs either way is the scope labelling below (a thread-local `Cell` write per
//! linear / attention / norm, a few nanoseconds).
//!
//! What is measured, per op call:
//! - **time**: on a backend with a device timer ([`Backend::device_timer`]: the CUDA backend's CUDA
//!   events on its stream) the device time between an event recorded just before the op and one just
//!   after it; on the CPU the op's wall time. The events are resolved once per step (one
//!   synchronization per step, in [`Profiler::end_step`]), or earlier when a step queues more than
//!   [`MAX_PENDING`] ops;
//! - **host time in the op** (the call's wall time) and the **host gap** before it (from the end of the
//!   previous op, or the step's start, to this call: model code, the trainer, the profiler's own
//!   bookkeeping);
//! - **device syncs**: ops that return host values (`to_host`, `sum_squares`, `cross_entropy`,
//!   `lm_head_ce`, `nf4_to_host`, `adam_state_to_host`) wait for the queued work; their count and host
//!   time are reported apart;
//! - the **label** in force ([`Scope`]): layer index, role ([`Role`]) and pass ([`Phase`]), set by the
//!   model code with [`layer_role`], [`role`] and [`phase`].
//!
//! Steps: the caller brackets each unit of work (a training step, an eval, a prompt) with
//! [`Profiler::begin_step`] / [`Profiler::end_step`]; ops outside steps (loading, checkpoints,
//! scheduled evals) are only counted. The report ([`Report`], `report.rs`) leaves out the first step
//! when there are several (warm-up: kernel compilation, allocator growth) and gives each row's share of
//! the measured steps' wall time. On the CPU, op time + host gaps = wall time exactly; on a device,
//! device busy + device idle = wall time, where wall time ends after the step's queued work finished.

mod report;
mod wrapper;

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::error::{KernelError, Result};

pub use report::{DetailRow, Report, Row, Timing};
pub use wrapper::Profiled;

/// Ops queued in one step before the profiler resolves their events early (one extra sync).
pub const MAX_PENDING: usize = 1 << 15;

/// What part of the model an op works for. Set by the model code around each piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Batch upload (ids, positions, segments, labels).
    Data,
    Embed,
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
    /// RoPE, attention and the KV cache.
    Attention,
    /// Every RMSNorm (the four per layer and the final one).
    Norm,
    /// GeGLU.
    MlpAct,
    /// The rest of the layers: buffer allocation and residual adds (also the buffers the model passes
    /// between layers).
    LayerOther,
    /// Tied LM head + soft-cap + cross-entropy (or the logits of evaluation and decoding).
    LmHead,
    /// Gradient zeroing, unscaling, norm and clipping.
    Grads,
    /// AdamW.
    Optimizer,
    /// Unlabelled.
    Other,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Data => "data",
            Role::Embed => "embed",
            Role::QProj => "q_proj",
            Role::KProj => "k_proj",
            Role::VProj => "v_proj",
            Role::OProj => "o_proj",
            Role::GateProj => "gate_proj",
            Role::UpProj => "up_proj",
            Role::DownProj => "down_proj",
            Role::Attention => "attention",
            Role::Norm => "norm",
            Role::MlpAct => "mlp_act",
            Role::LayerOther => "layer_other",
            Role::LmHead => "lm_head_ce",
            Role::Grads => "grads",
            Role::Optimizer => "optimizer",
            Role::Other => "other",
        }
    }

    /// The seven linear projections.
    pub fn is_linear(self) -> bool {
        matches!(
            self,
            Role::QProj
                | Role::KProj
                | Role::VProj
                | Role::OProj
                | Role::GateProj
                | Role::UpProj
                | Role::DownProj
        )
    }
}

/// Which pass an op belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    Forward,
    /// The forward of a layer re-run in the backward (activation checkpointing).
    Recompute,
    Backward,
    /// Outside the model's passes (gradients, optimizer).
    Other,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Recompute => "recompute",
            Phase::Backward => "backward",
            Phase::Other => "other",
        }
    }
}

/// The label in force: layer (None outside the decoder layers), role and pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Scope {
    pub layer: Option<u32>,
    pub role: Role,
    pub phase: Phase,
}

const NO_SCOPE: Scope = Scope {
    layer: None,
    role: Role::Other,
    phase: Phase::Other,
};

thread_local! {
    static SCOPE: Cell<Scope> = const { Cell::new(NO_SCOPE) };
}

/// The label ops called on this thread now get.
pub fn current() -> Scope {
    SCOPE.with(Cell::get)
}

/// Restores the previous label when dropped (labels nest).
#[must_use = "the label holds only while the guard lives"]
pub struct ScopeGuard {
    prev: Scope,
}

impl Drop for ScopeGuard {
    fn drop(&mut self) {
        SCOPE.with(|s| s.set(self.prev));
    }
}

fn set(f: impl FnOnce(Scope) -> Scope) -> ScopeGuard {
    SCOPE.with(|s| {
        let prev = s.get();
        s.set(f(prev));
        ScopeGuard { prev }
    })
}

/// Labels the ops of this thread with `role` of decoder layer `layer` until the guard drops.
pub fn layer_role(layer: usize, role: Role) -> ScopeGuard {
    set(|s| Scope {
        layer: Some(layer as u32),
        role,
        ..s
    })
}

/// Labels the ops of this thread with `role`, outside any decoder layer, until the guard drops.
pub fn role(role: Role) -> ScopeGuard {
    set(|s| Scope {
        layer: None,
        role,
        ..s
    })
}

/// Labels the ops of this thread with pass `phase` (layer and role unchanged) until the guard drops.
pub fn phase(phase: Phase) -> ScopeGuard {
    set(|s| Scope { phase, ..s })
}

/// A device-side clock: events recorded in stream order, resolved to elapsed times after a sync.
/// The CUDA backend's is CUDA events (timing enabled) on its stream, reused from step to step.
pub trait DeviceTimer: Send {
    /// Records an event after the work queued so far; returns its handle (valid until `resolve`).
    fn record(&mut self) -> Result<usize>;
    /// Waits for the device, returns the milliseconds between the events of each (start, end) pair
    /// and forgets every recorded event (their handles may be reused).
    fn resolve(&mut self, pairs: &[(usize, usize)]) -> Result<Vec<f64>>;
}

/// Key of the accumulators: op and label.
type Key = (&'static str, Scope);

#[derive(Clone, Copy, Debug, Default)]
struct Acc {
    calls: u64,
    /// Device time (or wall time without a device timer), ms.
    ms: f64,
    /// Host wall time inside the call, ms.
    host_ms: f64,
}

impl Acc {
    fn add(&mut self, ms: f64, host_ms: f64) {
        self.calls += 1;
        self.ms += ms;
        self.host_ms += host_ms;
    }
}

/// Totals of one step.
#[derive(Clone, Copy, Debug, Default)]
struct StepTotals {
    wall_ms: f64,
    ms: f64,
    host_ops_ms: f64,
    gaps_ms: f64,
    end_sync_ms: f64,
}

/// One op of the current step, waiting for its device time.
struct Pending {
    op: &'static str,
    scope: Scope,
    host_ms: f64,
    events: Option<(usize, usize)>,
}

struct State {
    timer: Option<Box<dyn DeviceTimer>>,
    /// Start of the current step (None between steps).
    step_start: Option<Instant>,
    /// End of the previous op of this step (or the step's start).
    last_end: Instant,
    pending: Vec<Pending>,
    cur: StepTotals,
    /// Completed steps (the current one not included).
    steps: Vec<StepTotals>,
    /// Per (op, label): the first step, and every later step.
    first: HashMap<Key, Acc>,
    rest: HashMap<Key, Acc>,
    outside_calls: u64,
    outside_host_ms: f64,
}

fn ms(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1e3
}

impl State {
    /// Moves the pending ops into the accumulators of the current step (resolving their events: a sync).
    fn resolve_pending(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pairs: Vec<(usize, usize)> = self.pending.iter().filter_map(|p| p.events).collect();
        let times = match &mut self.timer {
            Some(t) => t.resolve(&pairs)?,
            None => Vec::new(),
        };
        let mut times = times.into_iter();
        let acc = if self.steps.is_empty() {
            &mut self.first
        } else {
            &mut self.rest
        };
        for p in self.pending.drain(..) {
            let t = match p.events {
                Some(_) => times.next().ok_or_else(|| KernelError::Backend {
                    backend: "profile",
                    msg: "internal: the device timer returned fewer times than event pairs".into(),
                })?,
                None => p.host_ms,
            };
            acc.entry((p.op, p.scope)).or_default().add(t, p.host_ms);
            self.cur.ms += t;
            self.cur.host_ops_ms += p.host_ms;
        }
        Ok(())
    }
}

/// The profiler's state, shared by the ops of a [`Profiled`] backend. Reach it from generic code
/// through [`Backend::profiler`].
pub struct Profiler {
    backend: &'static str,
    timing: Timing,
    state: Mutex<State>,
}

impl Profiler {
    fn new(backend: &'static str, timer: Option<Box<dyn DeviceTimer>>) -> Self {
        let timing = if timer.is_some() {
            Timing::DeviceEvents
        } else {
            Timing::Wall
        };
        Profiler {
            backend,
            timing,
            state: Mutex::new(State {
                timer,
                step_start: None,
                last_end: Instant::now(),
                pending: Vec::new(),
                cur: StepTotals::default(),
                steps: Vec::new(),
                first: HashMap::new(),
                rest: HashMap::new(),
                outside_calls: 0,
                outside_host_ms: 0.0,
            }),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| KernelError::Backend {
            backend: "profile",
            msg: "the profiler's lock is poisoned (an op panicked while it was held)".into(),
        })
    }

    /// Starts a step (ends an unfinished one first).
    pub fn begin_step(&self) -> Result<()> {
        if self.lock()?.step_start.is_some() {
            self.end_step()?;
        }
        let mut st = self.lock()?;
        let now = Instant::now();
        st.step_start = Some(now);
        st.last_end = now;
        st.cur = StepTotals::default();
        Ok(())
    }

    /// Ends the current step: waits for its device work (one sync), adds its ops to the totals.
    /// Does nothing outside a step.
    pub fn end_step(&self) -> Result<()> {
        let mut st = self.lock()?;
        let Some(start) = st.step_start else {
            return Ok(());
        };
        let before_sync = Instant::now();
        st.resolve_pending()?;
        let end = Instant::now();
        let last = st.last_end;
        st.cur.gaps_ms += ms(last, before_sync);
        st.cur.end_sync_ms += ms(before_sync, end);
        st.cur.wall_ms = ms(start, end);
        let cur = st.cur;
        st.steps.push(cur);
        st.step_start = None;
        Ok(())
    }

    /// Times `f` as one call of `op` (see the module docs).
    fn timed<T>(&self, op: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let scope = current();
        let mut st = self.lock()?;
        if st.step_start.is_none() {
            drop(st);
            let t0 = Instant::now();
            let r = f();
            let host_ms = ms(t0, Instant::now());
            let mut st = self.lock()?;
            st.outside_calls += 1;
            st.outside_host_ms += host_ms;
            return r;
        }
        if st.pending.len() >= MAX_PENDING {
            st.resolve_pending()?;
        }
        let e0 = match &mut st.timer {
            Some(t) => Some(t.record()?),
            None => None,
        };
        drop(st);
        let t0 = Instant::now();
        let r = f();
        let t1 = Instant::now();
        let mut st = self.lock()?;
        let e1 = match &mut st.timer {
            Some(t) => Some(t.record()?),
            None => None,
        };
        let last = st.last_end;
        st.cur.gaps_ms += ms(last, t0);
        st.last_end = t1;
        // A failed op is not counted (its time stays in the gaps); the error goes to the caller.
        if r.is_ok() {
            st.pending.push(Pending {
                op,
                scope,
                host_ms: ms(t0, t1),
                events: e0.zip(e1),
            });
        } else {
            st.cur.gaps_ms += ms(t0, t1);
        }
        r
    }

    /// A snapshot of what was measured so far (completed steps only).
    pub fn report(&self) -> Result<Report> {
        let st = self.lock()?;
        Ok(report::build(
            self.backend,
            self.timing,
            &st.steps,
            &st.first,
            &st.rest,
            (st.outside_calls, st.outside_host_ms),
        ))
    }
}

/// Ops that return host values, and so wait for the device.
pub(crate) fn is_sync(op: &str) -> bool {
    matches!(
        op,
        "to_host"
            | "sum_squares"
            | "cross_entropy"
            | "lm_head_ce"
            | "nf4_to_host"
            | "adam_state_to_host"
    )
}

#[cfg(test)]
mod tests;
