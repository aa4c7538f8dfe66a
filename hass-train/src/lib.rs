//! hass-train
