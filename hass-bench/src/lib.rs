//! Benchmarks of hass. `speed` measures one model on this machine: load time, peak
//! memory, prefill and decode throughput, and the cost of verifying M new tokens on
//! top of a long cache, next to the memory-bandwidth roofline measured in the same run.

pub mod machine;
pub mod speed;
