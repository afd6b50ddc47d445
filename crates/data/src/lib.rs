//! afinar-data
