//! The profile of a run: totals, and the op time grouped by op, role, pass, layer and sync, each with its
//! share of the measured steps' wall time; [`Report::table`] prints it.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use super::{is_sync, Acc, Key, StepTotals};

/// Where op times come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timing {
    /// Host wall time of each op (the CPU backend: its ops run on the calling thread).
    Wall,
    /// Device time between events recorded around each op on the backend's stream.
    DeviceEvents,
}

impl Timing {
    pub fn name(self) -> &'static str {
        match self {
            Timing::Wall => "wall",
            Timing::DeviceEvents => "device-events",
        }
    }
}

/// One line of a grouping: calls, op time (device, or wall without a device timer), host time in the
/// calls, and the op time's share of the measured wall time (0–1).
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub name: String,
    pub calls: u64,
    pub ms: f64,
    pub host_ms: f64,
    pub share: f64,
}

impl Row {
    /// Mean op time per call, µs.
    pub fn mean_us(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.ms * 1e3 / self.calls as f64
        }
    }
}

/// One (op, role, pass) line, layers summed.
#[derive(Clone, Debug, PartialEq)]
pub struct DetailRow {
    pub op: String,
    pub role: String,
    pub phase: String,
    pub calls: u64,
    pub ms: f64,
    pub host_ms: f64,
}

/// What [`super::Profiler::report`] returns. Times are totals over the measured steps, in ms.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub backend: String,
    pub timing: Timing,
    /// Steps completed, and how many of them the tables cover (all but the first when there are
    /// several: the first pays for kernel compilation and allocator growth).
    pub steps: u64,
    pub measured_steps: u64,
    /// Wall time of the first step (also when it is excluded).
    pub first_step_ms: Option<f64>,
    /// Wall time of the measured steps; on a device it ends after their queued work finished.
    pub wall_ms: f64,
    /// Σ op time (device busy; on the CPU, time in ops).
    pub op_ms: f64,
    /// Op time of the seven projections (base + LoRA, dropout masks, their buffers; every pass):
    /// what "the linear layers of a step" means.
    pub linear_ms: f64,
    /// Host time inside op calls.
    pub host_ops_ms: f64,
    /// Host time between op calls (model and trainer code, the profiler's bookkeeping).
    pub host_gaps_ms: f64,
    /// Host time the profiler waited at the end of each step for the queued device work.
    pub end_sync_ms: f64,
    /// Calls and host time of the ops that return host values (they wait for the device).
    pub sync_calls: u64,
    pub sync_host_ms: f64,
    pub ops: Vec<Row>,
    pub roles: Vec<Row>,
    pub phases: Vec<Row>,
    /// Per decoder layer ("layer N"), then "no layer".
    pub layers: Vec<Row>,
    pub syncs: Vec<Row>,
    pub detail: Vec<DetailRow>,
    /// Op calls outside any step (loading, checkpoints, scheduled evaluation) and their host time.
    pub outside_calls: u64,
    pub outside_host_ms: f64,
}

impl Report {
    /// Mean wall time of a measured step, ms.
    pub fn step_ms(&self) -> f64 {
        self.wall_ms / self.measured_steps.max(1) as f64
    }

    /// The time of the step not in any op: device idle with device events, host gaps on the CPU.
    pub fn unaccounted_ms(&self) -> f64 {
        match self.timing {
            Timing::DeviceEvents => (self.wall_ms - self.op_ms).max(0.0),
            Timing::Wall => self.host_gaps_ms + self.end_sync_ms,
        }
    }

    /// The printed form: totals, then ops, roles and passes by op time, syncs.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let n = self.measured_steps.max(1) as f64;
        let dev = self.timing == Timing::DeviceEvents;
        let what = if dev {
            "device time (CUDA events)"
        } else {
            "wall time"
        };
        let excluded = if self.measured_steps < self.steps {
            format!(
                "; step 1 ({:.1} ms, warm-up) left out",
                self.first_step_ms.unwrap_or(0.0)
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "profile ({}, {what}): {} of {} steps measured{excluded}; {:.3} ms per step",
            self.backend,
            self.measured_steps,
            self.steps,
            self.step_ms()
        );
        let pct = |x: f64| 100.0 * x / self.wall_ms.max(1e-12);
        if dev {
            let _ = writeln!(
                s,
                "  device busy {:.3} ms/step ({:.1} %), idle {:.3} ms/step ({:.1} %)",
                self.op_ms / n,
                pct(self.op_ms),
                self.unaccounted_ms() / n,
                pct(self.unaccounted_ms())
            );
        }
        let _ = writeln!(
            s,
            "  the seven projections {:.3} ms/step ({:.1} %)",
            self.linear_ms / n,
            pct(self.linear_ms)
        );
        let _ = writeln!(
            s,
            "  host: in ops {:.3} ms/step ({:.1} %), gaps between ops {:.3} ms/step ({:.1} %), step-end sync {:.3} ms/step ({:.1} %)",
            self.host_ops_ms / n,
            pct(self.host_ops_ms),
            self.host_gaps_ms / n,
            pct(self.host_gaps_ms),
            self.end_sync_ms / n,
            pct(self.end_sync_ms)
        );
        let _ = writeln!(
            s,
            "  syncs: {:.1} per step, {:.3} ms/step host ({:.1} %)",
            self.sync_calls as f64 / n,
            self.sync_host_ms / n,
            pct(self.sync_host_ms)
        );
        let rest = if dev { "(device idle)" } else { "(host gaps)" };
        for (title, rows) in [
            ("op", &self.ops),
            ("role", &self.roles),
            ("pass", &self.phases),
        ] {
            let _ = writeln!(
                s,
                "  {title:<22} {:>10} {:>12} {:>10} {:>7}{}",
                "calls/step",
                "ms/step",
                "mean µs",
                "% step",
                if dev { "   host ms/step" } else { "" }
            );
            for r in rows.iter() {
                let _ = write!(
                    s,
                    "  {:<22} {:>10.1} {:>12.3} {:>10.1} {:>7.2}",
                    r.name,
                    r.calls as f64 / n,
                    r.ms / n,
                    r.mean_us(),
                    100.0 * r.share
                );
                if dev {
                    let _ = write!(s, " {:>14.3}", r.host_ms / n);
                }
                s.push('\n');
            }
            let _ = writeln!(
                s,
                "  {rest:<22} {:>10} {:>12.3} {:>10} {:>7.2}",
                "",
                self.unaccounted_ms() / n,
                "",
                pct(self.unaccounted_ms())
            );
        }
        if !self.syncs.is_empty() {
            let list: Vec<String> = self
                .syncs
                .iter()
                .map(|r| {
                    format!(
                        "{} {:.1}×/step {:.3} ms",
                        r.name,
                        r.calls as f64 / n,
                        r.host_ms / n
                    )
                })
                .collect();
            let _ = writeln!(s, "  syncs by op (host time per step): {}", list.join(", "));
        }
        if self.outside_calls > 0 {
            let _ = writeln!(
                s,
                "  outside steps (load, checkpoints, scheduled evals): {} op calls, {:.1} ms host",
                self.outside_calls, self.outside_host_ms
            );
        }
        s
    }
}

/// Sums `acc` by `group`, sorted by op time, largest first.
fn group(acc: &HashMap<Key, Acc>, wall_ms: f64, name: impl Fn(&Key) -> String) -> Vec<Row> {
    let mut m: BTreeMap<String, Acc> = BTreeMap::new();
    for (k, a) in acc {
        let e = m.entry(name(k)).or_default();
        e.calls += a.calls;
        e.ms += a.ms;
        e.host_ms += a.host_ms;
    }
    let mut rows: Vec<Row> = m
        .into_iter()
        .map(|(name, a)| Row {
            name,
            calls: a.calls,
            ms: a.ms,
            host_ms: a.host_ms,
            share: a.ms / wall_ms.max(1e-12),
        })
        .collect();
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.name.cmp(&b.name)));
    rows
}

pub(super) fn build(
    backend: &str,
    timing: super::Timing,
    steps: &[StepTotals],
    first: &HashMap<Key, Acc>,
    rest: &HashMap<Key, Acc>,
    outside: (u64, f64),
) -> Report {
    let skip = usize::from(steps.len() >= 2);
    let measured = &steps[skip..];
    let acc = if skip == 1 { rest } else { first };
    let sum = |f: fn(&StepTotals) -> f64| measured.iter().map(f).sum::<f64>();
    let wall_ms = sum(|s| s.wall_ms);
    let syncs: HashMap<Key, Acc> = acc
        .iter()
        .filter(|(k, _)| is_sync(k.0))
        .map(|(k, a)| (*k, *a))
        .collect();
    let sync_rows = group(&syncs, wall_ms, |k| k.0.to_string());
    let mut layers = group(acc, wall_ms, |k| match k.1.layer {
        Some(l) => format!("layer {l}"),
        None => "no layer".into(),
    });
    // Layers in order, "no layer" last.
    layers.sort_by_key(|r| {
        r.name
            .strip_prefix("layer ")
            .and_then(|x| x.parse::<u64>().ok())
            .unwrap_or(u64::MAX)
    });
    let mut detail: BTreeMap<(String, String, String), Acc> = BTreeMap::new();
    for (k, a) in acc {
        let e = detail
            .entry((
                k.0.to_string(),
                k.1.role.name().to_string(),
                k.1.phase.name().to_string(),
            ))
            .or_default();
        e.calls += a.calls;
        e.ms += a.ms;
        e.host_ms += a.host_ms;
    }
    let mut detail: Vec<DetailRow> = detail
        .into_iter()
        .map(|((op, role, phase), a)| DetailRow {
            op,
            role,
            phase,
            calls: a.calls,
            ms: a.ms,
            host_ms: a.host_ms,
        })
        .collect();
    detail.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    Report {
        backend: backend.to_string(),
        timing,
        steps: steps.len() as u64,
        measured_steps: measured.len() as u64,
        first_step_ms: steps.first().map(|s| s.wall_ms),
        wall_ms,
        op_ms: sum(|s| s.ms),
        linear_ms: acc
            .iter()
            .filter(|(k, _)| k.1.role.is_linear())
            .map(|(_, a)| a.ms)
            .sum(),
        host_ops_ms: sum(|s| s.host_ops_ms),
        host_gaps_ms: sum(|s| s.gaps_ms),
        end_sync_ms: sum(|s| s.end_sync_ms),
        sync_calls: sync_rows.iter().map(|r| r.calls).sum(),
        sync_host_ms: sync_rows.iter().map(|r| r.host_ms).sum(),
        ops: group(acc, wall_ms, |k| k.0.to_string()),
        roles: group(acc, wall_ms, |k| k.1.role.name().to_string()),
        phases: group(acc, wall_ms, |k| k.1.phase.name().to_string()),
        layers,
        syncs: sync_rows,
        detail,
        outside_calls: outside.0,
        outside_host_ms: outside.1,
    }
}
