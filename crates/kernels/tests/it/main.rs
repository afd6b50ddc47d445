//! Every integration test of afinar-kernels, one module per former tests/*.rs file, in ONE test
//! binary: each separate binary linked and monomorphized the crate's generic code again, which
//! was most of CI's build time. New test files go here (`mod <file>;` below), not in tests/.

#[macro_use]
mod common;
#[path = "support/ulp.rs"]
mod ulp;

mod cuda_attention_paths;
mod cuda_f16;
mod cuda_linear_paths;
mod golden_adamw;
mod golden_nf4;
mod nccl;
mod ops_attention;
mod ops_copy_dropout;
mod ops_errors;
mod ops_fastmath;
mod ops_linear;
mod ops_loss;
mod ops_pointwise;
