//! Library half of `cargo xtask`: the namespace lab that `run`, the end-to-end tests and the
//! benchmarks share, the `run` demo, the container image builder, and the record and count of
//! skipped tests. It must not depend on lb-userspace or anything that builds eBPF, so that
//! `cargo xtask` compiles on a bare machine.
pub mod deb;
pub mod demo;
pub mod image;
pub mod lab;
pub mod skips;
