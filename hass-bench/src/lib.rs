//! Benchmarks of hass. `speed` measures one model on this machine: load time, peak
//! memory, prefill and decode throughput, and the cost of verifying M new tokens on
//! top of a long cache, next to the memory-bandwidth roofline measured in the same run.
//! `eval` runs vanilla and speculative decoding over the six prompt sets of the
//! literature and reports τ and speedup (spec §6); `sweep` picks the tree shape.

pub mod chart;
pub mod eval;
pub mod eval_cli;
pub mod machine;
pub mod prompts;
pub mod report;
pub mod speed;
pub mod sweep;
