//! Criterion benchmarks of the ha-* crates live in `benches/` (`core.rs`, `ratelimit.rs`); this
//! library is empty.
#![forbid(unsafe_code)]
