//! hass-bench
