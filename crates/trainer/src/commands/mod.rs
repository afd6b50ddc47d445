//! Subcommands of the `afinar` binary that live outside main.rs (main.rs stays under the 800-line
//! limit of the tidy test): argument structs and their thin command functions.

pub mod device;
pub mod infer;
pub mod inspect;
pub mod plan;
