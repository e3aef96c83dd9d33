//! Every integration test, in one binary (one link, one process): each module is a former
//! `tests/<name>.rs`, and [`support`] is the harness they share — the real `wsnotify` binary as a
//! child process, the real RabbitMQ at `AMQP_URL`, real sockets.
//!
//! All tests of the binary run in one process, `--test-threads` at a time (the number of CPUs by
//! default). Tests that open thousands of sockets or measure latency hold [`support::heavy`]
//! for their duration, so at most one of them runs at a time (as when each file was its own
//! binary), while the light tests keep the other threads busy.
//!
//! `broker_restart` (stops the shared broker) and `cluster` (forms a 3-node cluster) are
//! `#[ignore]`d; `scripts/test.sh` runs each alone at the end:
//!
//! ```text
//! cargo test --test it -- --ignored --test-threads=1 broker_restart::
//! cargo test --test it -- --ignored --test-threads=1 cluster::
//! ```

mod support;

mod auth;
mod backpressure;
mod broker_restart;
mod cluster;
mod dead_letter;
mod delivery;
mod fanout_traffic;
mod fuzz_envelope;
mod hostile_frames;
mod hostile_handshake;
mod http;
mod lifecycle;
mod loadtest_smoke;
mod monitoring;
mod publish;
mod recovery;
mod reliability_churn;
mod reliability_faults;
mod reliability_slow;
mod replicas;
