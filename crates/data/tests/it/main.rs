//! Every integration test of afinar-data, one module per former tests/*.rs file, in ONE test
//! binary: each separate binary linked and monomorphized the crate's generic code again, which
//! was most of CI's build time. New test files go here (`mod <file>;` below), not in tests/.

#[macro_use]
mod common;

mod fastpath;
mod golden_templates;
mod inspect;
mod pipeline;
