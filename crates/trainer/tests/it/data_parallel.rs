//! Data-parallel training on the CPU with the in-process collective (`dist::local_group`): N threads,
//! one rank each, one shared rendezvous. The NCCL transport has the same contract; these tests pin the
//! trainer's side of it (sharding, loss normalization, gradient sums, rank-0-only output, resume and
//! failure).

use crate::common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::opts;
use afinar_kernels::cpu::Cpu;
use afinar_trainer::dist::{local_group, Collective, DistError, LocalComm};
use afinar_trainer::train::{self, Faults};
use afinar_trainer::{Config, Resume, TrainOptions, TrainOutcome};

/// 22 training rows: with 2 ranks × micro-batch 3 the last global micro-batch of an epoch has 4 rows,
/// so rank 1 trains a short slice (1 row) there.
fn config(dir: &Path) -> Config {
    common::write_data(dir, 22, 6);
    let mut c = common::config(dir);
    c.lora.dropout = 0.1; // each row's dropout mask must not depend on the rank that trains it
    c.train.micro_batch_size = 3;
    c.train.grad_accum = 2;
    c.train.max_steps = 5;
    c
}

/// Runs every rank of `opts` on its own thread with its own collective; returns each rank's result.
fn run_ranks<C: Collective<Cpu> + 'static>(
    comms: Vec<C>,
    opts: &TrainOptions,
) -> Vec<afinar_trainer::train::Result<Option<TrainOutcome>>> {
    let handles: Vec<_> = comms
        .into_iter()
        .map(|c| {
            let o = opts.clone();
            std::thread::spawn(move || {
                train::train_with_dist(Arc::new(Cpu::new()), &o, &Faults::default(), &c)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn group(n: usize) -> Vec<LocalComm> {
    local_group(n, Duration::from_secs(120))
}

/// Rank 0's outcome; the other ranks return None.
fn lead(mut r: Vec<afinar_trainer::train::Result<Option<TrainOutcome>>>) -> TrainOutcome {
    let rest: Vec<_> = r.drain(1..).map(|x| x.unwrap()).collect();
    assert!(
        rest.iter().all(Option::is_none),
        "only rank 0 returns an outcome"
    );
    r.remove(0).unwrap().expect("rank 0 returns the outcome")
}

fn adapter_tensors(o: &TrainOutcome) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(o.run_dir.join("adapter/adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let v = st.tensor(&n).unwrap();
            let f: Vec<f32> = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n, f)
        })
        .collect()
}

/// Per adapter tensor: (‖a − b‖₂ / ‖b‖₂, max |a − b| / max |b|); the largest of each over all tensors.
fn rel_diffs(a: &TrainOutcome, b: &TrainOutcome) -> (f64, f64) {
    let (ta, tb) = (adapter_tensors(a), adapter_tensors(b));
    assert_eq!(ta.len(), tb.len());
    let (mut l2, mut linf) = (0.0f64, 0.0f64);
    for ((na, va), (nb, vb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        let norm = vb.iter().map(|&y| (y as f64).powi(2)).sum::<f64>().sqrt();
        let max = vb.iter().fold(0.0f64, |m, &y| m.max(y.abs() as f64));
        assert!(max > 0.0, "{nb} is all zeros: nothing was trained");
        let d2 = va
            .iter()
            .zip(vb)
            .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let dmax = va
            .iter()
            .zip(vb)
            .fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
        l2 = l2.max(d2 / norm);
        linf = linf.max(dmax / max);
    }
    (l2, linf)
}

#[test]
fn two_ranks_of_micro_batch_b_train_the_adapter_of_one_rank_of_2b() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.output.run_name = "two".into();
    let two = lead(run_ranks(group(2), &opts(cfg.clone())));

    let mut one_cfg = cfg.clone();
    one_cfg.output.run_name = "one".into();
    one_cfg.train.micro_batch_size = 6;
    let one = train::train(&opts(one_cfg)).unwrap();

    assert_eq!(two.summary.steps, 5);
    // Same windows, same global count: the per-step token counts are equal, and so (to f64
    // rounding of the loss sums) are the losses.
    for (a, b) in two.records.iter().zip(&one.records) {
        assert_eq!(a.tokens, b.tokens, "step {}", a.step);
        let (la, lb) = (a.loss.unwrap(), b.loss.unwrap());
        assert!(
            (la - lb).abs() <= 1e-6 * lb.abs(),
            "step {}: {la} vs {lb}",
            a.step
        );
    }
    // The gradients differ only in the order of f32 additions (two partial sums of 3 rows, then
    // their sum, against one sum of 6): the step's gradient norms agree to ~1e-8.
    for (a, b) in two.records.iter().zip(&one.records) {
        let (ga, gb) = (a.grad_norm.unwrap(), b.grad_norm.unwrap());
        assert!(
            (ga - gb).abs() <= 1e-6 * gb,
            "step {}: grad norm {ga} vs {gb}",
            a.step
        );
    }
    // The adapters: ≤ 1e-6 relative per tensor in the 2-norm (measured ≈ 3.5e-7). Elementwise the
    // worst entry is ≈ 2e-6 of the tensor's largest: AdamW's update g/(√v + ε) turns the absolute
    // rounding noise of a gradient entry near ε = 1e-8 into lr·noise/ε, so entries whose gradient
    // is ~0 amplify the summation-order noise. Bit equality would need the same f32 summation order.
    let (l2, linf) = rel_diffs(&two, &one);
    assert!(l2 <= 1e-6, "adapters differ by {l2:e} (relative, 2-norm)");
    assert!(
        linf <= 1e-5,
        "adapters differ by {linf:e} (relative, max-norm)"
    );
    // The check can fail: one process with micro-batch 3 (other global batches) is far away.
    let mut other = cfg.clone();
    other.output.run_name = "other".into();
    let other = train::train(&opts(other)).unwrap();
    let (l2, _) = rel_diffs(&two, &other);
    assert!(
        l2 > 1e-3,
        "a different batch size gave the same adapter ({l2:e})"
    );
    // Only rank 0 wrote: one run directory, with its files.
    assert!(two.run_dir.join("metrics.jsonl").is_file());
    assert_eq!(
        std::fs::read_dir(dir.path().join("runs")).unwrap().count(),
        3
    );
}

#[test]
fn a_data_parallel_run_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.output.run_name = "straight".into();
    let straight = lead(run_ranks(group(2), &opts(cfg.clone())));

    cfg.output.run_name = "resumed".into();
    let mut o = opts(cfg.clone());
    o.stop_after = Some(2);
    let part = lead(run_ranks(group(2), &o));
    assert_eq!(part.summary.steps, 2);
    let mut o = opts(cfg);
    o.resume = Some(Resume::Auto);
    let resumed = lead(run_ranks(group(2), &o));
    assert_eq!(resumed.summary.steps, 5);
    assert_eq!(common::loss_bits(&straight), common::loss_bits(&resumed));
    assert_eq!(
        common::adapter(&straight),
        common::adapter(&resumed),
        "adapters differ"
    );
}

/// Rank 1's collective, failing its `fail_at`-th gradient all-reduce (1-based) as a rank that dies
/// mid-run would: it returns the error, and the trainer tells the group.
struct Flaky {
    inner: LocalComm,
    fail_at: usize,
    calls: AtomicUsize,
}

impl Collective<Cpu> for Flaky {
    fn rank(&self) -> usize {
        Collective::<Cpu>::rank(&self.inner)
    }
    fn world_size(&self) -> usize {
        Collective::<Cpu>::world_size(&self.inner)
    }
    fn all_reduce_bufs(
        &self,
        be: &Cpu,
        bufs: &mut [&mut Vec<f32>],
    ) -> afinar_trainer::dist::Result<()> {
        if self.rank() == 1 && self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_at {
            return Err(DistError::Backend("injected failure: device lost".into()));
        }
        self.inner.all_reduce_bufs(be, bufs)
    }
    fn all_reduce_f64(&self, xs: &mut [f64]) -> afinar_trainer::dist::Result<()> {
        Collective::<Cpu>::all_reduce_f64(&self.inner, xs)
    }
    fn broadcast_bytes(&self, root: usize, b: &mut Vec<u8>) -> afinar_trainer::dist::Result<()> {
        Collective::<Cpu>::broadcast_bytes(&self.inner, root, b)
    }
    fn barrier(&self) -> afinar_trainer::dist::Result<()> {
        Collective::<Cpu>::barrier(&self.inner)
    }
    fn abort(&self, reason: &str) {
        Collective::<Cpu>::abort(&self.inner, reason)
    }
}

#[test]
fn a_failing_rank_ends_the_run_on_every_rank_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.train.save_every = 2;
    cfg.output.run_name = "straight".into();
    let straight = lead(run_ranks(group(2), &opts(cfg.clone())));

    cfg.output.run_name = "failing".into();
    let comms: Vec<Flaky> = group(2)
        .into_iter()
        .map(|inner| Flaky {
            inner,
            fail_at: 4,
            calls: AtomicUsize::new(0),
        })
        .collect();
    let out = run_ranks(comms, &opts(cfg.clone()));
    let errs: Vec<String> = out
        .into_iter()
        .map(|r| r.expect_err("every rank fails").to_string())
        .collect();
    assert!(
        errs[1].contains("injected failure: device lost"),
        "{}",
        errs[1]
    );
    assert!(
        errs[0].starts_with("rank 1 failed:") && errs[0].contains("injected failure"),
        "{}",
        errs[0]
    );
    // The step-2 checkpoint survives, and a healthy group resumes it to the uninterrupted result.
    let ck = dir.path().join("runs/failing/checkpoints");
    let names: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["step-00000002".to_string()]);
    let mut o = opts(cfg);
    o.resume = Some(Resume::Auto);
    let resumed = lead(run_ranks(group(2), &o));
    assert_eq!(common::adapter(&straight), common::adapter(&resumed));
}

#[test]
fn a_checkpoint_resumes_on_another_number_of_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.output.run_name = "changing".into();
    let mut o = opts(cfg.clone());
    o.stop_after = Some(2);
    let part = lead(run_ranks(group(2), &o));
    assert_eq!(part.summary.steps, 2);
    let state = |step: u64| -> serde_json::Value {
        let p = part
            .run_dir
            .join(format!("checkpoints/step-{step:08}/trainer_state.json"));
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    assert_eq!(state(2)["world_size"], 2);

    // One rank continues one step (with a warning: the global batch shrinks from 6 to 3 rows)...
    let mut o = opts(cfg.clone());
    o.resume = Some(Resume::Auto);
    o.stop_after = Some(1);
    let one = train::train(&o).unwrap();
    assert_eq!(one.summary.steps, 3);
    let s3 = state(3);
    assert!(
        s3.get("world_size").is_none(),
        "one rank is the default: {s3}"
    );
    // Step 2 ended the first epoch (2 steps × 2 batches = the 4 batches of 6, 6, 6, 4 rows); with
    // 3-row batches the finished epoch is position 8 of 8, and one more step takes batches 0 and 1
    // of epoch 1.
    assert_eq!(s3["cursor_origin"]["step"], 2);
    assert_eq!(s3["cursor_origin"]["epoch"], 0);
    assert_eq!(s3["cursor_origin"]["position"], 8);
    assert_eq!(s3["cursor"]["epoch"], 1);
    assert_eq!(s3["cursor"]["position"], 2);
    // ...and two ranks again finish the run: the cursor origin keeps the counters consistent.
    let mut o = opts(cfg);
    o.resume = Some(Resume::Auto);
    let done = lead(run_ranks(group(2), &o));
    assert_eq!(done.summary.steps, 5);
    assert!(done
        .records
        .iter()
        .all(|r| r.loss.is_some_and(f64::is_finite)));
}

#[test]
fn the_cli_refuses_data_parallel_cpu_runs_and_bad_rank_variables() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let p = dir.path().join("run.toml");
    std::fs::write(&p, cfg.to_toml()).unwrap();
    let afinar = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_afinar"));
        for k in [
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
        ] {
            c.env_remove(k);
        }
        c.args(["train", "--config", p.to_str().unwrap(), "--quiet"]);
        c
    };
    let check = |o: std::process::Output, want: &str| {
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(2), "{e}");
        assert!(e.contains(want), "{e}");
    };
    check(
        afinar().args(["--nproc", "2"]).output().unwrap(),
        "runs on CUDA GPUs over NCCL",
    );
    let ranked = |c: &mut std::process::Command| {
        c.env("WORLD_SIZE", "2")
            .env("RANK", "1")
            .env("LOCAL_RANK", "1")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", "29599");
    };
    let mut c = afinar();
    ranked(&mut c);
    check(
        c.output().unwrap(),
        "WORLD_SIZE = 2: data-parallel training runs on CUDA GPUs",
    );
    let mut c = afinar();
    ranked(&mut c);
    c.env_remove("RANK");
    check(c.output().unwrap(), "WORLD_SIZE is set but RANK is not");
    // Refused before anything was written.
    assert!(!dir.path().join("runs").exists());
}
