//! hass-train

pub mod align;
pub mod chart;
pub mod data;
pub mod loss;
pub mod model;
pub mod train;
