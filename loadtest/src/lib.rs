//! `loadtest`: measures a WebSocket notification gateway — wsnotify, or any server that speaks
//! its contract — the way its users load it: many mostly idle connections, notifications
//! published through RabbitMQ, and broadcasts fanned out to everyone.
//!
//! * [`client`]: a pool of lean client connections that timestamps every frame;
//! * [`worker`]: client worker processes (several source addresses, past one process's
//!   open-file limit) and the protocol that drives them;
//! * [`publish`]: backend-style publishing with send times in `data`;
//! * [`suite`]: the scenarios and their figures; [`report`]: tables;
//! * [`baseline`]: the naive tokio-tungstenite server every figure is compared with;
//! * [`nchan`]: nginx + nchan as a second baseline (HTTP publishing, no broker);
//! * [`server`]: starting the servers for `loadtest compare`;
//! * [`plot`]: SVG figures from the JSON results;
//! * [`probe`]: RabbitMQ alone, the floor under any gateway's latency; [`carrier`]: the
//!   broker's cost of each fan-out carrier, to choose one with numbers;
//! * [`procstat`], [`prom`]: the server's RSS and CPU from `/proc`, its `/metrics`.

pub mod baseline;
pub mod carrier;
pub mod client;
pub mod nchan;
pub mod plot;
pub mod probe;
pub mod procstat;
pub mod prom;
pub mod publish;
pub mod report;
pub mod server;
pub mod suite;
pub mod worker;
