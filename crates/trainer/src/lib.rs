//! afinar-trainer
