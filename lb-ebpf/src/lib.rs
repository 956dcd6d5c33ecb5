#![no_std]
//! Marker library so lb-userspace can name this crate as a build dependency; the program is
//! the `lb` binary target, built for bpfel-unknown-none by lb-userspace/build.rs.
