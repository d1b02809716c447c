//! refex
pub mod crypto;
pub mod digest;
pub mod types;
