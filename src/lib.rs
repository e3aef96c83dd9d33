//! wsnotify: a RabbitMQ → WebSocket notification gateway tuned for connection density.
//!
//! The path of one notification, top to bottom:
//!
//! * [`amqp`] takes it from the notify queue ([`envelope`] parses and validates it), appends it
//!   to the fan-out log, and reads the log back on every replica;
//! * [`notification`] is what it becomes: id, timestamp, target, and its [`frame`] encoded once;
//!   [`history`] keeps it for clients that reconnect with `?since=`;
//! * [`registry`] routes the frame through its shards to each recipient's [`mailbox`];
//! * [`conn`] writes the mailbox to the socket.
//!
//! Around it: [`server`] accepts sockets and answers HTTP ([`http`]), [`api`] takes
//! `POST /api/publish`, [`auth`] decides who a socket belongs to, [`gateway`] wires everything
//! and runs the ordered shutdown ([`shutdown`]), [`metrics`] and [`config`] do what they say;
//! [`publisher`] and [`cli`] are the publishing side for Rust backends and the command line.
//!
//! Dependencies point one way, down that path: no two modules import each other.

pub mod amqp;
pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod conn;
pub mod envelope;
pub mod frame;
pub mod gateway;
pub mod history;
pub mod http;
pub mod mailbox;
pub mod metrics;
pub mod notification;
pub mod publisher;
pub mod registry;
pub mod server;
pub mod shutdown;
