//! Integration tests: the real server over real HTTP, a fresh data dir per test.

mod blobs;
mod browser;
mod callbacks;
mod cluster;
mod crash;
mod csrf;
mod datadir;
mod errors;
mod flow;
mod graph;
mod helpers;
mod inputs;
mod jobs;
mod lanes;
mod observe;
mod openapi;
mod overload;
mod postgres;
mod process;
mod programs;
mod progress;
mod store;
mod store_graph;
mod stranded;
