//! afinar-gemma
