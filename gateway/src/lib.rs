//! Qun's server: sockets, auth, connections, HTTP — everything with I/O.
//!
//! The gateway holds no business rules; it turns frames into calls on
//! [`qun_chat_core::Groups`] and answers into frames. Errors become wire
//! codes in exactly one place ([`error::RequestError::to_frame`]).
//!
//! # Layout
//! - [`config`]: the typed configuration (file, then `QUN_*`, then flags).
//! - [`auth`]: HS256 tokens and the key that signs them.
//! - [`server`]: [`run`] — binds nothing itself; takes [`Listeners`] and a
//!   shutdown token, so tests run the real server on port 0.
//! - `connection`: one connection's session (a reader task and a writer
//!   task), whatever its transport; [`transport`]: what a transport gives
//!   it; [`quic`]: the QUIC listener and framing.
//! - `http`: `/healthz` and `/metrics`.
//! - [`metrics`]: Prometheus counters.
//!
//! # Example
//! ```no_run
//! use qun_gateway::{Config, Listeners, run};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn f() -> anyhow::Result<()> {
//! let config = Config::default();
//! let listeners = Listeners::bind(&config).await?;
//! let shutdown = CancellationToken::new();
//! run(config, listeners, shutdown).await?;
//! # Ok(()) }
//! ```

pub mod auth;
pub mod config;
mod connection;
mod descriptors;
pub mod error;
mod http;
mod merchant_api;
pub mod metrics;
pub mod quic;
pub mod request_kind;
pub mod server;
pub mod transport;
mod websocket;

pub use config::{Config, ConfigError, Overrides};
pub use connection::{IDLE_CLOSE_CODE, WS_PATH};
pub use server::{Listeners, ServerError, run};
