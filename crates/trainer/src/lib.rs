//! afinar-trainer: the SFT loop (AdamW, schedules, gradient accumulation, clipping, eval), exact-resume
//! checkpoints, metrics and plots, and the library side of the `afinar` CLI.

pub mod checkpoint;
pub mod config;
pub mod device;
pub mod dist;
pub mod loss_scale;
pub mod metrics;
pub mod plan;
pub mod plot;
pub mod profile;
pub mod progress;
pub mod schedule;
pub mod signal;
pub mod suite;

pub use config::{Config, ConfigError};
pub use train::{train, train_with, Resume, TrainError, TrainOptions, TrainOutcome};
pub mod infer;
pub mod train;
