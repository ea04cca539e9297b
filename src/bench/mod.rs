//! `fanout bench`: every selected backend, one after the other in one run,
//! as real gateway and worker processes on loopback, driven by the same
//! workload files, measured end to end, and written up as one report.

pub mod pg;
pub mod procs;
