//! The engine's control plane (being written).
