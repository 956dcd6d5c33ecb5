//! Shared helpers for the datapath and end-to-end tests.
