//! wsnotify: a RabbitMQ → WebSocket notification gateway tuned for connection density.
//!
//! The path of one notification, top to bottom:
//!
//! * [`amqp`] consumes the notify queue and acks; [`envelope`] parses and validates a message;
//! * [`frame`] encodes it once into WebSocket wire bytes;
//! * [`registry`] routes the frame through its shards to each recipient's mailbox;
//! * [`conn`] writes the mailbox to the socket.
//!
//! Around it: [`server`] accepts sockets and answers HTTP, [`api`] takes `POST /api/publish`, [`auth`] decides who a socket
//! belongs to, [`gateway`] wires everything and runs the ordered shutdown, [`shutdown`],
//! [`metrics`] and [`config`] do what they say.

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
pub mod metrics;
pub mod notification;
pub mod publisher;
pub mod registry;
pub mod server;
pub mod shutdown;
