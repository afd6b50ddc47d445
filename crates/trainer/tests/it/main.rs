//! Every integration test of afinar-trainer, one module per former tests/*.rs file, in ONE test
//! binary: each separate binary linked and monomorphized the crate's generic code again, which
//! was most of CI's build time. New test files go here (`mod <file>;` below), not in tests/.

#[macro_use]
mod common;

mod cli;
mod cli_infer;
mod configs;
mod cuda_infer;
mod data_parallel;
mod eval_suite;
mod golden_mundo;
mod infer;
mod loss_scaling;
mod paged_optimizer;
mod plan_rss;
mod profile;
mod resume_fixture;
mod train_loop;
