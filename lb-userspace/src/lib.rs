//! lb: a sticky (client-IP affinity) XDP layer-4 load balancer. The library holds everything the
//! `lb` binary does, so the tests can drive the same code.
pub mod affinity;
pub mod agent;
pub mod announce;
pub mod api;
pub mod balance;
pub mod bpffs;
pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod environment;
pub mod health;
pub mod history;
pub mod journal;
pub mod maglev;
pub mod metrics;
pub mod neighbours;
pub mod page;
pub mod pincount;
pub mod routes;
pub mod run;
pub mod state;
pub mod trend;
pub mod whatif;
