//! Per-layer forward and backward (filled in next).
