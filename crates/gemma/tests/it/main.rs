//! Every integration test of afinar-gemma, one module per former tests/*.rs file, in ONE test
//! binary: each separate binary linked and monomorphized the crate's generic code again, which
//! was most of CI's build time. New test files go here (`mod <file>;` below), not in tests/.

mod io_common;

mod config;
mod generate_cache;
mod io_export;
mod io_generate;
mod io_peft;
mod model_golden;
mod model_load;
mod model_merged;
mod model_storage;
mod model_train;
