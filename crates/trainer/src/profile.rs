//! `train.profile` / `AFINAR_PROFILE=1`: the profiler of afinar-kernels (`afinar_kernels::profile`) in
//! the product. A profiled command runs on `Profiled<B>` (the backend wrapped so that every op is
//! timed); this module decides when, and turns the report into profile.json.
//!
//! profile.json (all times in ms, totals over the measured steps; `share` is of their wall time):
//! `backend`, `timing` ("wall" or "device-events"), `steps`, `measured_steps`, `first_step_ms`,
//! `step_ms` (mean wall time of a measured step), `totals` {`wall_ms`, `op_ms` (device busy, or time in
//! ops on the CPU), `linear_ms` (the seven projections, every pass), `unaccounted_ms` (device idle, or host gaps on the CPU), `host_ops_ms`,
//! `host_gaps_ms`, `end_sync_ms`, `sync_calls`, `sync_host_ms`}, and the groupings `ops`, `roles`,
//! `phases`, `layers`, `syncs` (rows {`name`, `calls`, `ms`, `mean_us`, `host_ms`, `share`}), `detail`
//! (rows {`op`, `role`, `phase`, `calls`, `ms`, `host_ms`}), `outside_steps` {`calls`, `host_ms`}.

use std::path::Path;

use afinar_kernels::profile::{Report, Row};
use afinar_kernels::{Backend, KernelError};
use serde_json::{json, Value};

/// `AFINAR_PROFILE` is set to "1" or "true".
pub fn env_enabled() -> bool {
    std::env::var("AFINAR_PROFILE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

fn rows(rs: &[Row]) -> Value {
    rs.iter()
        .map(|r| {
            json!({
                "name": r.name,
                "calls": r.calls,
                "ms": r.ms,
                "mean_us": r.mean_us(),
                "host_ms": r.host_ms,
                "share": r.share,
            })
        })
        .collect()
}

/// The report as profile.json holds it (see the module docs).
pub fn to_json(r: &Report) -> Value {
    json!({
        "backend": r.backend,
        "timing": r.timing.name(),
        "steps": r.steps,
        "measured_steps": r.measured_steps,
        "first_step_ms": r.first_step_ms,
        "step_ms": r.step_ms(),
        "totals": {
            "wall_ms": r.wall_ms,
            "op_ms": r.op_ms,
            "linear_ms": r.linear_ms,
            "unaccounted_ms": r.unaccounted_ms(),
            "host_ops_ms": r.host_ops_ms,
            "host_gaps_ms": r.host_gaps_ms,
            "end_sync_ms": r.end_sync_ms,
            "sync_calls": r.sync_calls,
            "sync_host_ms": r.sync_host_ms,
        },
        "ops": rows(&r.ops),
        "roles": rows(&r.roles),
        "phases": rows(&r.phases),
        "layers": rows(&r.layers),
        "syncs": rows(&r.syncs),
        "detail": r.detail.iter().map(|d| json!({
            "op": d.op,
            "role": d.role,
            "phase": d.phase,
            "calls": d.calls,
            "ms": d.ms,
            "host_ms": d.host_ms,
        })).collect::<Value>(),
        "outside_steps": { "calls": r.outside_calls, "host_ms": r.outside_host_ms },
    })
}

/// Writes `to_json(r)` to `path` (pretty-printed).
pub fn write_json(r: &Report, path: &Path) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(&to_json(r)).expect("a JSON value serializes");
    std::fs::write(path, text + "\n")
}

/// Runs `f` as one profiler step when `backend` is a profiled one; otherwise just runs it.
pub fn step<B: Backend, T, E: From<KernelError>>(
    backend: &B,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    let Some(p) = backend.profiler() else {
        return f();
    };
    p.begin_step()?;
    let r = f()?;
    p.end_step()?;
    Ok(r)
}

/// The end of a profiled command without a run directory (`afinar eval`, `afinar generate`): prints
/// the table to stderr and writes profile.json to `$AFINAR_PROFILE_JSON` when set. Nothing when
/// `backend` is not profiled.
pub fn finish<B: Backend>(backend: &B) -> anyhow::Result<()> {
    let Some(p) = backend.profiler() else {
        return Ok(());
    };
    let r = p.report()?;
    eprint!("{}", r.table());
    if let Some(path) = std::env::var_os("AFINAR_PROFILE_JSON") {
        let path = std::path::PathBuf::from(path);
        write_json(&r, &path)
            .map_err(|e| anyhow::anyhow!("AFINAR_PROFILE_JSON={}: {e}", path.display()))?;
        eprintln!("profile written to {}", path.display());
    }
    Ok(())
}
