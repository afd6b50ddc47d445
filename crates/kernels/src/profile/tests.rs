use super::*;
use crate::{Backend, Cpu};

#[test]
fn scopes_nest_and_restore() {
    assert_eq!(current().role, Role::Other);
    {
        let _p = phase(Phase::Backward);
        let _l = layer_role(3, Role::Norm);
        assert_eq!(
            current(),
            Scope {
                layer: Some(3),
                role: Role::Norm,
                phase: Phase::Backward
            }
        );
        {
            let _r = role(Role::LmHead);
            assert_eq!(current().layer, None);
            assert_eq!(current().role, Role::LmHead);
            assert_eq!(current().phase, Phase::Backward);
        }
        assert_eq!(current().role, Role::Norm);
        assert_eq!(current().layer, Some(3));
    }
    assert_eq!(current(), NO_SCOPE);
}

/// The wrapper computes what the backend computes, counts every op call under its label, leaves out
/// the first step, counts ops outside steps apart, and on the CPU op time + gaps = wall time.
#[test]
fn cpu_profile_counts_labels_and_adds_up() {
    let be = Profiled::new(Cpu::new()).unwrap();
    let prof = be.profiler().expect("a Profiled backend has a profiler");
    // Outside any step: counted, not in the tables.
    let x = be.from_host(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    let w = be.from_host(&[0.5, -1.0, 2.0, 0.25]).unwrap();
    for step in 0..3 {
        prof.begin_step().unwrap();
        let _p = phase(Phase::Forward);
        for layer in 0..2 {
            let _s = layer_role(layer, Role::QProj);
            let mut y = be.zeros(4).unwrap();
            be.matmul_xwt(&x, &w, &mut y, 2, 2, 2, crate::Accum::Overwrite)
                .unwrap();
            let mut want = Cpu.zeros(4).unwrap();
            Cpu.matmul_xwt(&x, &w, &mut want, 2, 2, 2, crate::Accum::Overwrite)
                .unwrap();
            assert_eq!(y, want);
        }
        {
            let _s = role(Role::Grads);
            let s = be.sum_squares(&x).unwrap();
            assert_eq!(s, 30.0);
        }
        // A failing op is not counted.
        assert!(be.axpy(1.0, &x, &mut vec![0.0; 3]).is_err());
        if step == 0 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        prof.end_step().unwrap();
    }
    let r = prof.report().unwrap();
    assert_eq!(r.backend, "cpu");
    assert_eq!(r.timing, Timing::Wall);
    assert_eq!((r.steps, r.measured_steps), (3, 2));
    assert!(r.first_step_ms.unwrap() >= 5.0);
    let calls =
        |rows: &[Row], name: &str| rows.iter().find(|r| r.name == name).map_or(0, |r| r.calls);
    assert_eq!(calls(&r.ops, "matmul_xwt"), 4);
    assert_eq!(calls(&r.ops, "zeros"), 4);
    assert_eq!(calls(&r.ops, "sum_squares"), 2);
    assert_eq!(calls(&r.ops, "axpy"), 0);
    assert_eq!(calls(&r.roles, "q_proj"), 8);
    assert_eq!(calls(&r.roles, "grads"), 2);
    assert_eq!(calls(&r.phases, "forward"), 10);
    assert_eq!(calls(&r.layers, "layer 0"), 4);
    assert_eq!(calls(&r.layers, "layer 1"), 4);
    assert_eq!(calls(&r.layers, "no layer"), 2);
    assert_eq!(r.layers.last().unwrap().name, "no layer");
    assert_eq!((r.sync_calls, r.syncs.len()), (2, 1));
    assert_eq!(r.outside_calls, 2);
    // On the CPU: op time = host time in ops, and ops + gaps + step-end = wall, exactly.
    assert_eq!(r.op_ms, r.host_ops_ms);
    let q: f64 = r
        .roles
        .iter()
        .filter(|x| x.name == "q_proj")
        .map(|x| x.ms)
        .sum();
    assert!(
        (r.linear_ms - q).abs() <= 1e-12 * q.max(1.0),
        "{} vs {q}",
        r.linear_ms
    );
    let total = r.op_ms + r.host_gaps_ms + r.end_sync_ms;
    assert!(
        (total - r.wall_ms).abs() < 1e-9 * r.wall_ms.max(1.0),
        "{total} vs {}",
        r.wall_ms
    );
    let shares: f64 = r.ops.iter().map(|o| o.share).sum::<f64>() + r.unaccounted_ms() / r.wall_ms;
    assert!((shares - 1.0).abs() < 1e-9, "{shares}");
    let table = r.table();
    assert!(
        table.contains("matmul_xwt") && table.contains("q_proj") && table.contains("(host gaps)"),
        "{table}"
    );
    assert!(
        table.contains("step 1") && table.contains("warm-up"),
        "{table}"
    );
}

/// A device clock that reports 2 ms per op, whatever happens on the host.
struct FakeTimer {
    recorded: usize,
    resolves: usize,
}

impl DeviceTimer for FakeTimer {
    fn record(&mut self) -> Result<usize> {
        self.recorded += 1;
        Ok(self.recorded - 1)
    }
    fn resolve(&mut self, pairs: &[(usize, usize)]) -> Result<Vec<f64>> {
        self.resolves += 1;
        self.recorded = 0;
        Ok(pairs.iter().map(|&(a, b)| 2.0 * (b - a) as f64).collect())
    }
}

/// With a device timer, op times are the timer's (an event pair per op), host times the calls', and
/// a step queueing more than MAX_PENDING ops resolves early instead of growing without bound.
#[test]
fn device_timer_times_ops_and_bounds_pending_events() {
    let p = Profiler::new(
        "fake",
        Some(Box::new(FakeTimer {
            recorded: 0,
            resolves: 0,
        })),
    );
    p.begin_step().unwrap();
    let n = MAX_PENDING + 10;
    for _ in 0..n {
        p.timed("fill", || Ok(())).unwrap();
    }
    assert!(p.lock().unwrap().pending.len() < MAX_PENDING);
    p.end_step().unwrap();
    let r = p.report().unwrap();
    assert_eq!(r.timing, Timing::DeviceEvents);
    assert_eq!(r.measured_steps, 1);
    assert_eq!(r.ops[0].calls, n as u64);
    assert!((r.op_ms - 2.0 * n as f64).abs() < 1e-6, "{}", r.op_ms);
    assert!(r.table().contains("device busy"));
}
